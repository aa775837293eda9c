"""Distributed training (torchrun, gloo on CPU): the sharded sampler, augmentation of one process's rows, one
step's gradients on 2 processes against 1, whole runs launched the way users launch them (torchrun as a
subprocess, one thread per process) against a plain run, Ctrl-C and resume under another number of processes, a
dying process and an unreachable rendezvous.

Tolerances. One step on 2 processes against 1: the loss within 1e-5 (relative; measured <= 1.5e-6); gradients
and batch-norm statistics against the same step computed in float64: within 5e-2 and within 5x one float32
process's own error (measured: <= 6.8e-3 and <= 3.9x; float32 batch norm backward loses 1e-3..1e-2 of the
gradients behind it to cancellation, in one process as in two). Bugs broken in on purpose are far outside: batch
norm over each process's half, PML's efficient=True, the pair objective without its gradient scaling (0.5 and more
off). Over a whole run the difference grows, as any change of float summation order does in training with Adam:
a plain run on 2 threads instead of 1 drifts as far (measured on this tiny config: epoch losses within 1.2%,
checkpoint embeddings' cosine >= 0.995). So whole runs are held to: the first epoch's loss within 1e-3, every
epoch's within 3%, the last checkpoint's embeddings' cosine >= 0.98 (mean >= 0.99) on 200 test images.

This file is also the gradient check's worker: torchrun runs it as a script (see _gradient_worker).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from retrieval.augment import BatchAugment, ElasticAugment, Rows
from retrieval.checkpoint import load_checkpoint
from retrieval.config import resolve_config
from retrieval.data import load_dataset
from retrieval.embed import embed_images
from retrieval.sampling import ClassBalancedBatchSampler, RandomBatchSampler, ShardedBatchSampler
from retrieval.seeding import make_generator
from retrieval.training import TrainingInterrupted, build_trainer, train

# 320 training images (80 validation), 5 global batches of 64 per epoch, 4 epochs.
TINY = {"name": "tiny", "data": {"subset": 400, "val_size": 80}, "train": {"epochs": 4, "batch_size": 64},
        "sampler": {"m": 8}}
TINY_TOML = """# tiny: 4 epochs of 5 batches of 64
name = "tiny"
[data]
subset = 400
val_size = 80
[train]
epochs = 4
batch_size = 64
[sampler]
m = 8
"""
# one step's gradients are compared for each kind of objective (multi-similarity and contrastive: PML loss and
# miner wrappers, triplet goes the same way; pair: the gathered batch), and with class expansions (made from the
# whole batch) and the elastic warp (drawn for the whole batch)
_FP32 = {"train": {**TINY["train"], "precision": "fp32"}}  # the identities hold to float32 rounding, not bf16's
GRADIENT_CASES = {
    "multi-similarity": _FP32,
    "contrastive": {**_FP32, "objective": {"name": "contrastive"}},
    "pair": {**_FP32, "objective": {"name": "pair"}},
    "expansions": {**_FP32, "augment": {"dihedral_classes": True, "composite_classes": 0.5, "elastic": 1.5}},
    # bf16 autocast (the default on CPUs with bfloat16 units): global batch norm on bfloat16 activations
    "bf16": {"train": {**TINY["train"], "precision": "bf16"}},
}


pytestmark = pytest.mark.usefixtures("one_thread")


def _env(data_root) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    return {**env, "RETRIEVAL_DATA_ROOT": str(data_root), "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


def _torchrun(*args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", *args]


def _train_cmd(config: Path, out: Path, *extra: str) -> list[str]:
    return _torchrun("--standalone", "--nproc-per-node", "2", "-m", "retrieval", "train", "--config", str(config),
                     "--out", str(out), "--device", "cpu", "--threads", "1", "--no-progress",
                     "--dist-timeout", "60", *extra)


def _losses(run: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def _sessions(run: Path) -> list[tuple]:
    state = json.loads((run / "state.json").read_text())
    return [(s["started_at_step"], s["steps_run"], s["processes"]) for s in state["sessions"]]


def _assert_same_training(run: Path, ref: Path, images: torch.Tensor) -> None:
    a, b = np.array(_losses(run)), np.array(_losses(ref))
    assert len(a) == len(b) == TINY["train"]["epochs"]
    rel = np.abs(a - b) / b
    assert rel[0] < 1e-3 and rel.max() < 0.03, (a, b)
    ea, eb = (embed_images(load_checkpoint(r / "last").tower, images) for r in (run, ref))
    cos = (ea * eb).sum(1)
    assert cos.min() >= 0.98 and cos.mean() >= 0.99, (cos.min(), cos.mean())


@pytest.fixture(scope="module")
def reference(tmp_path_factory, data_root):
    """The plain single-process run (one thread) every distributed run is compared with."""
    return train(TINY, tmp_path_factory.mktemp("ref") / "run", device="cpu", data_root=data_root, progress=False,
                 threads=1)


@pytest.fixture(scope="module")
def test_images(data_root):
    return load_dataset("mnist:test", root=data_root, subset=200, seed=1).images


# ------------------------------------------------------------------------------------------ pieces, in process
@pytest.mark.parametrize("world", [2, 4])
def test_sharded_sampler_shards_are_disjoint_and_make_up_the_batch(world):
    labels = torch.arange(1000) % 10
    for inner in (ClassBalancedBatchSampler(labels, 64, 8, seed=3), RandomBatchSampler(labels, 64, seed=3)):
        shards = [ShardedBatchSampler(inner, rank, world) for rank in range(world)]
        for epoch in (0, 5):
            whole = inner.epoch_batches(epoch)
            parts = [s.epoch_batches(epoch) for s in shards]
            assert all(p.shape == (len(inner), 64 // world) for p in parts)
            assert torch.equal(torch.cat(parts, dim=1), whole)  # together: the single-process batches, in order
            for step in range(len(inner)):
                seen = torch.cat([p[step] for p in parts])
                assert len(torch.unique(seen)) == len(seen)  # disjoint
            assert torch.equal(parts[1], ShardedBatchSampler(inner, 1, world).epoch_batches(epoch))  # seeded
        assert shards[0].global_batch_size == 64 and shards[0].describe() == inner.describe()
    with pytest.raises(Exception, match="multiple of the number of processes"):
        ShardedBatchSampler(ClassBalancedBatchSampler(labels, 64, 8, seed=0), 0, 3)


def test_augmenting_a_share_of_the_batch_gives_those_rows_of_the_whole(data_root):
    x = load_dataset("mnist:train", root=data_root, subset=48, seed=0).images.unsqueeze(1).float() / 255
    for transform in (BatchAugment(15, 0.1, (0.9, 1.1), 5, group=8), ElasticAugment(2.0)):
        g = make_generator(0, "step", 0, 0)
        whole, after = transform(x, g), torch.rand(1, generator=g)
        for cuts in ((0, 24, 48), (0, 12, 28, 48)):  # 2 shares; 3 unequal ones, cutting augmentation groups
            parts = []
            for start, stop in zip(cuts, cuts[1:]):
                g = make_generator(0, "step", 0, 0)
                parts.append(transform(x[start:stop], g, Rows(start, stop, len(x))))
                assert torch.equal(torch.rand(1, generator=g), after)  # the same draws as the whole batch
            assert torch.allclose(torch.cat(parts), whole, atol=1e-6), type(transform).__name__


# ------------------------------------------------------------------------------------------ one step, 2 processes
def _one_step(trainer, exact: bool = False) -> dict[str, torch.Tensor]:
    """Loss, gradients and batch-norm statistics after the first step of `trainer`; exact=True: in one process
    with the tower in float64 (the loss on its float32 embeddings), the reference both are measured against."""
    g = make_generator(trainer.seed, "step", 0, 0)
    x, y = trainer.make_batch(trainer.epoch_plan(0)[0], g)
    if exact:
        trainer.tower.double().train()
        loss = trainer.objective(trainer.tower(x.double()), y, g)
        loss.backward()
        out = {"loss": loss.detach().reshape(1)}
    else:
        out = {"loss": trainer.train_step(x, y, g).reshape(1)}
    modules = {"tower": trainer.tower, "head": trainer.objective.head}
    for prefix, module in modules.items():
        if module is not None:
            out.update({f"{prefix}.{n}.grad": p.grad for n, p in module.named_parameters()})
            out.update({f"{prefix}.{n}": b for n, b in module.named_buffers() if "running" in n})
    return {k: v.detach().double().contiguous() for k, v in out.items()}


def _gradient_worker(out: Path, data_root: str) -> None:
    """Run by torchrun (2 processes): one step of each case on the process group; rank 0 saves what it sees."""
    from safetensors.torch import save_file

    from retrieval.distributed import join

    torch.set_num_threads(1)
    group = join("cpu", 60)
    try:
        for case, cfg in GRADIENT_CASES.items():
            trainer = build_trainer(resolve_config({**TINY, **cfg}), out / case, group.device, data_root,
                                    progress=False, group=group)
            result = _one_step(trainer)
            if group.is_main:
                save_file(result, str(out / f"{case}.safetensors"))
    finally:
        group.close()


def test_one_step_on_two_processes_has_the_gradients_of_one(tmp_path, data_root):
    from safetensors.torch import load_file

    proc = subprocess.run(_torchrun("--standalone", "--nproc-per-node", "2", __file__, str(tmp_path), str(data_root)),
                          capture_output=True, text=True, timeout=300, env=_env(data_root))
    assert proc.returncode == 0, proc.stderr[-3000:]
    def error(a: torch.Tensor, b: torch.Tensor) -> float:
        return float((a - b).norm() / b.norm().clamp_min(1e-12))

    for case, cfg in GRADIENT_CASES.items():
        two = load_file(str(tmp_path / f"{case}.safetensors"))
        one, exact = (_one_step(build_trainer(resolve_config({**TINY, **cfg}), tmp_path / case, torch.device("cpu"),
                                              data_root, progress=False), exact=e) for e in (False, True))
        assert two.keys() == one.keys() == exact.keys()
        assert any(k.startswith("head.") for k in one) == (case == "pair")
        if case == "bf16":  # bfloat16 rounds to 3 significant digits: the two runs agree to that, not to float32's
            assert error(two["loss"], one["loss"]) < 1e-2, case
            for key, want in exact.items():
                two_err, one_err = error(two[key], want), error(one[key], want)
                # about 0.1 of the float64 gradient for both; a process-local batch norm is off by 0.5 or more
                assert two_err < 0.25 and two_err < 1.5 * one_err + 2e-2, f"{case} {key}: {two_err:.1e} ({one_err:.1e})"
            continue
        assert error(two["loss"], one["loss"]) < 1e-5, case
        for key, want in exact.items():
            # float32 batch norm backward loses 1e-3..1e-2 of the gradients behind it to cancellation (torch's
            # kernels in one process; the same kernels with global sums on two): both are held to 5e-2 of the
            # float64 gradient, two processes also to 5x one process's error (a bug is off by 0.5 or more)
            two_err, one_err = error(two[key], want), error(one[key], want)
            assert two_err < 5e-2 and two_err < 5 * one_err + 1e-4, f"{case} {key}: {two_err:.1e} ({one_err:.1e})"
            assert one_err < 5e-2, f"{case} {key}: 1 process off by {one_err:.1e}"


# ------------------------------------------------------------------------------------------ whole runs, torchrun
def test_resumed_on_two_processes_a_run_ends_as_the_plain_run(tmp_path, data_root, reference, test_images):
    """1 process interrupted in epoch 2, resumed by torchrun with 2: the run's loss curve and checkpoint are the
    plain run's; rank 0 alone writes and prints."""
    config = tmp_path / "tiny.toml"
    config.write_text(TINY_TOML)
    run = tmp_path / "run"

    def stop(info):
        if info.global_step == 7:
            raise KeyboardInterrupt

    with pytest.raises(TrainingInterrupted):
        train(str(config), run, device="cpu", data_root=data_root, progress=False, threads=1, on_step=stop)
    proc = subprocess.run(_train_cmd(config, run, "--resume"), capture_output=True, text=True, timeout=300,
                          env=_env(data_root))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == str(run)  # printed once, by rank 0
    assert proc.stderr.count("epoch 4/4: loss") == 1  # logged once, by rank 0
    assert "was trained with 1 process(es) and resumes with 2" in proc.stderr
    assert _sessions(run) == [(0, 7, 1), (7, 13, 2)]
    assert load_checkpoint(run / "last").meta["distributed"] == {"processes": 2, "backend": "gloo"}
    assert not [p for p in run.iterdir() if p.name.endswith(".tmp")]
    _assert_same_training(run, reference, test_images)


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="finds the worker processes through /proc")
def test_ctrl_c_stops_all_processes_after_one_step_and_one_process_resumes(tmp_path, data_root, reference,
                                                                           test_images):
    config = tmp_path / "tiny.toml"
    config.write_text(TINY_TOML)
    run = tmp_path / "run"
    proc = subprocess.Popen(_train_cmd(config, run), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=_env(data_root))
    deadline = time.time() + 300
    while not (run / "metrics.jsonl").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    assert proc.poll() is None, f"training ended before it could be interrupted: {proc.communicate()[1][-3000:]}"
    # Ctrl-C reaches torchrun, which passes it on to its machine's processes, at slightly different moments; with
    # two machines, only those of one: here rank 1 alone gets it, and rank 0 must stop after the same step and save
    rank1 = [pid for pid, env in _children(proc.pid).items() if env.get("RANK") == "1"]
    assert len(rank1) == 1
    os.kill(rank1[0], signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode != 0 and "interrupted at epoch" in err and "--resume" in err, err[-3000:]
    state = json.loads((run / "state.json").read_text())
    assert not state["finished"] and 5 <= state["global_step"] < 20
    assert load_checkpoint(run / "last").meta["interrupted"] is True
    assert _sessions(run) == [(0, state["global_step"], 2)]  # both processes stopped after the same step
    train(None, run, device="cpu", resume=True, data_root=data_root, progress=False, threads=1)
    assert _sessions(run)[-1] == (state["global_step"], 20 - state["global_step"], 1)
    _assert_same_training(run, reference, test_images)


def test_torchrun_with_one_process_is_a_plain_run(tmp_path, data_root, reference):
    from safetensors.torch import load_file

    config = tmp_path / "tiny.toml"
    config.write_text(TINY_TOML)
    cmd = _train_cmd(config, tmp_path / "run")
    cmd[cmd.index("--nproc-per-node") + 1] = "1"
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=_env(data_root))
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = load_file(str(tmp_path / "run" / "last.safetensors")), load_file(str(reference / "last.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # bit for bit
    assert _sessions(tmp_path / "run") == [(0, 20, 1)] and "distributed" not in load_checkpoint(
        tmp_path / "run" / "last").meta


def _children(parent: int) -> dict[int, dict]:
    """pid -> environment of the live children of `parent` (Linux /proc)."""
    out = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            status = (entry / "status").read_text()
            ppid = int(next(line.split()[1] for line in status.splitlines() if line.startswith("PPid:")))
            if ppid == parent:
                env = (entry / "environ").read_bytes().split(b"\0")
                out[int(entry.name)] = dict(e.decode().split("=", 1) for e in env if b"=" in e)
        except (OSError, StopIteration, ValueError):
            continue
    return out


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="finds the worker processes through /proc")
def test_a_dying_process_takes_the_job_down_with_a_message(tmp_path, data_root):
    config = tmp_path / "tiny.toml"
    config.write_text(TINY_TOML)
    run = tmp_path / "run"
    proc = subprocess.Popen(_train_cmd(config, run, "--epochs", "200"), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=_env(data_root))
    deadline = time.time() + 300
    while not (run / "metrics.jsonl").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, proc.communicate()[1][-3000:]
    rank1 = [pid for pid, env in _children(proc.pid).items() if env.get("RANK") == "1"]
    assert len(rank1) == 1
    killed = time.time()
    os.kill(rank1[0], signal.SIGKILL)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode != 0 and time.time() - killed < 60
    # rank 0 says it, whether the broken connection or torchrun's SIGTERM reaches it first
    assert "rank 0 of 2: " in err and "another process of the job failed" in err, err[-3000:]
    assert json.loads((run / "state.json").read_text())["epoch"] >= 1  # the last finished epoch's state is kept


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_an_unreachable_rendezvous_fails_with_a_message_naming_it(tmp_path, data_root, monkeypatch, capfd):
    config = tmp_path / "tiny.toml"
    config.write_text(TINY_TOML)
    port = _free_port()  # nothing listens there
    # the second machine of a two-machine launch whose first machine never came up
    proc = subprocess.run(
        _torchrun("--nnodes", "2", "--node-rank", "1", "--nproc-per-node", "1", "--rdzv-endpoint",
                  f"127.0.0.1:{port}", "--rdzv-conf", "timeout=1", "-m", "retrieval", "train", "--config",
                  str(config), "--out", str(tmp_path / "run"), "--device", "cpu"),
        capture_output=True, text=True, timeout=120, env=_env(data_root))
    assert proc.returncode != 0 and f"127.0.0.1, {port}" in proc.stderr, proc.stderr[-3000:]
    # a process started by another launcher (WORLD_SIZE, RANK, MASTER_ADDR, MASTER_PORT) that cannot reach rank 0
    from retrieval.cli import main

    for name, value in {"WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                        "MASTER_PORT": str(port)}.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--config", str(config), "--out", str(tmp_path / "run"), "--device", "cpu",
              "--dist-timeout", "2"])
    err = capfd.readouterr().err
    assert exit_info.value.code == 1
    assert err.startswith(f"error: cannot join the training job's process group at 127.0.0.1:{port} (rank 1 of 2"), err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "run").exists()
    assert not torch.distributed.is_initialized()


if __name__ == "__main__":  # torchrun tests/test_distributed.py OUT DATA_ROOT
    _gradient_worker(Path(sys.argv[1]), sys.argv[2])
