#!/usr/bin/env bash
# The GPU figures of issue 17 in one run on a device machine (one H200; `run` tool, README of the device library):
# epoch time and images/s of mnist-default, time to test precision@1 0.995 (and 0.98), the same run launched by
# `torchrun --nproc-per-node 1`, and embedding throughput. Everything lands in $OUT (JSON + logs).
#
# That machine has torch, torchvision, typer, safetensors, scikit-learn and pillow, and reaches nothing outside:
# prepare here once what it lacks (pytorch-metric-learning and faiss-cpu wheels for its Python 3.12, and MNIST),
# then carry it:
#     benchmarks/device_run.sh --prepare            # here: fills .device/ (about 35 MB, git-ignored)
#     run(command="bash benchmarks/device_run.sh", carry=[".device"], timeout_s=540)
# A CPU rehearsal of the whole script (tiny: a subset and one epoch) checks it before spending device time:
#     DEVICE=cpu SMOKE=1 PY=.venv/bin/python OUT=/tmp/device-smoke benchmarks/device_run.sh
set -euo pipefail
cd "$(dirname "$0")/.."
HERE=$PWD
if [[ "${1:-}" == "--prepare" ]]; then
    mkdir -p .device/wheels .device/data/mnist
    .venv/bin/pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 \
        --platform manylinux_2_28_x86_64 -d .device/wheels pytorch-metric-learning faiss-cpu
    cp "${RETRIEVAL_DATA_ROOT:-$HOME/.cache/retrieval/data}"/mnist/*.gz .device/data/mnist/
    du -sh .device
    exit 0
fi
PY=${PY:-python3}
DEVICE=${DEVICE:-cuda}
OUT=${OUT:?set by the device tool: where results go}
WORK=$(mktemp -d)  # run folders and logs; $OUT gets at most 8 files back, so they travel as one archive
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 RETRIEVAL_DATA_ROOT=$HERE/.device/data
if [[ "$DEVICE" == cuda ]]; then
    "$PY" -m pip install --quiet --no-index --no-deps .device/wheels/*.whl
    "$PY" -m pip install --quiet --no-index --no-deps --no-build-isolation -e .
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$WORK/gpu.txt"
fi
RETRIEVAL=("$PY" -m retrieval)
SET=()
EVALS=0.5,1,2,3,4,6,8,10,12
EMBED=(--batch-sizes 1024,4096,16384 --images 65536)
if [[ -n "${SMOKE:-}" ]]; then
    SET=(--set train.epochs=1 --set data.subset=3000 --set data.val_size=500); EVALS=1
    EMBED=(--batch-sizes 1024 --images 2048 --threads 2)
fi

# 1. mnist-default: per-epoch images/s and seconds (metrics.jsonl), and test precision@1 at points in training
"$PY" benchmarks/train.py --device "$DEVICE" --parts ours --ours-evals "$EVALS" ${SMOKE:+--subset 3000} \
    --out "$WORK/ours" --json "$OUT/train.json" --no-readme 2>&1 | tee "$WORK/train.log"
# 2. the same recipe as a plain run and under torchrun with one process: the same command, the same figures
"${RETRIEVAL[@]}" train --config mnist-default --device "$DEVICE" --out "$WORK/plain" --json "${SET[@]}" \
    > "$OUT/plain.json" 2> "$WORK/plain.log"
"$PY" -m torch.distributed.run --standalone --nproc-per-node 1 -m retrieval train --config mnist-default \
    --device "$DEVICE" --out "$WORK/torchrun" --json "${SET[@]}" > "$OUT/torchrun.json" 2> "$WORK/torchrun.log"
# 3. embedding throughput of the shipped towers
"$PY" benchmarks/embed.py --device "$DEVICE" --towers default,seed "${EMBED[@]}" --no-readme 2>&1 | tee "$OUT/embed.log"
find "$WORK" -name '*.safetensors' -delete
tar -czf "$OUT/logs.tar.gz" -C "$WORK" .
echo "done: $(ls "$OUT")"
