"""Distributed training benchmark: 1 process against 2 processes (torchrun, gloo, one thread each) on mnist-default,
side by side in one script, on a fraction of an epoch.

Runs, alternated in rounds so that the load of other jobs on the machine hits all alike (medians reported):
  p1       one process, 1 thread, global batch 256 (a plain run)
  p2       torchrun --nproc-per-node 2, 1 thread each, global batch 256 (128 per process)
  p1-half  one process, 1 thread, batch 128: one process's share of p2's work without any communication
  p1-t2    one process, 2 threads, batch 256: what a plain run does with the same 2 cores

Each run trains `--steps` optimizer steps of mnist-default (full MNIST train less its validation slice) through
retrieval.training (build_trainer + Trainer.run, as `retrieval train` does) and times every step (between
consecutive on_step callbacks); the first `--warmup` steps are dropped, the median step time of the rest gives
images/s. In p2, rank 0 also times every collective it takes part in: the Python-level torch.distributed calls
(batch norm all_reduce, PML's all_gather, the Ctrl-C agreement) by wrapping them, and DDP's gradient all-reduce
through a communication hook (launch to completion; it overlaps the rest of the backward pass).

    .venv/bin/python benchmarks/distributed.py                 # 3 rounds of 60 steps (about 5 minutes here)
    .venv/bin/python benchmarks/distributed.py --rounds 1 --steps 20 --no-readme
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

RUNS = {  # name -> (processes, threads per process, global batch)
    "p1": (1, 1, 256),
    "p2": (2, 1, 256),
    "p1-half": (1, 1, 128),
    "p1-t2": (1, 2, 256),
}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------------ worker
def worker(args) -> None:
    """One process of a run (rank 0 writes the figures to args.out)."""
    import warnings

    warnings.filterwarnings("ignore")
    import torch
    import torch.distributed as dist

    from retrieval.config import load_config
    from retrieval.distributed import join
    from retrieval.training import TrainingInterrupted, build_trainer
    from retrieval.workflows import resolve_config_path

    torch.set_num_threads(args.threads)
    group = join("cpu", 600)
    comm: dict[str, float] = {}
    per_step: list[dict[str, float]] = []

    if group is not None:  # time every collective rank 0 takes part in
        def timed(fn, name):
            def call(*a, **k):
                t0 = time.perf_counter()
                try:
                    return fn(*a, **k)
                finally:
                    comm[name] = comm.get(name, 0.0) + time.perf_counter() - t0
            return call

        for name in ("all_reduce", "all_gather", "broadcast", "barrier"):
            setattr(dist, name, timed(getattr(dist, name), name))

    cfg = load_config(resolve_config_path("mnist-default"), [f"train.batch_size={args.batch}", "train.epochs=1"])
    stamps: list[float] = []
    cpu: list[float] = []

    def on_step(info):
        stamps.append(time.perf_counter())
        cpu.append(time.process_time())
        per_step.append(dict(comm))
        if info.global_step >= args.steps:
            raise KeyboardInterrupt  # on every rank at the same step: a clean, agreed stop

    with tempfile.TemporaryDirectory() as tmp:
        trainer = build_trainer(cfg, Path(tmp), torch.device("cpu"), args.root, progress=False, on_step=on_step,
                                group=group)
        if group is not None:
            world = group.world_size

            def hook(state, bucket):
                t0 = time.perf_counter()
                fut = torch.distributed.distributed_c10d.all_reduce(bucket.buffer(), async_op=True).get_future()

                def done(f):
                    comm["ddp_grad_allreduce"] = comm.get("ddp_grad_allreduce", 0.0) + time.perf_counter() - t0
                    return f.value()[0].div_(world)

                return fut.then(done)

            trainer.loss_step.register_comm_hook(None, hook)
        try:
            trainer.run()
        except TrainingInterrupted:
            pass
    if group is None or group.is_main:
        steps = [b - a for a, b in zip(stamps[args.warmup:], stamps[args.warmup + 1:])]
        comm_steps = []
        for a, b in zip(per_step[args.warmup:], per_step[args.warmup + 1:]):
            comm_steps.append({k: b.get(k, 0.0) - a.get(k, 0.0) for k in b})
        cpu_steps = [b - a for a, b in zip(cpu[args.warmup:], cpu[args.warmup + 1:])]
        result = {"step_s": statistics.median(steps), "steps_timed": len(steps), "images_per_step": args.batch,
                  "cpu_s": statistics.median(cpu_steps),
                  "comm_s": {k: statistics.median(s[k] for s in comm_steps) for k in (comm_steps[0] if comm_steps else {})},
                  "comm_total_s": statistics.median(sum(s.values()) for s in comm_steps) if comm_steps else 0.0}
        Path(args.out).write_text(json.dumps(result))
    if group is not None:
        group.close()


# ------------------------------------------------------------------------------------------------ driver
def launch(name: str, args, out: Path) -> dict:
    procs, threads, batch = RUNS[name]
    common = [str(Path(__file__).resolve()), "--worker", "--out", str(out), "--threads", str(threads), "--batch",
              str(batch), "--steps", str(args.steps), "--warmup", str(args.warmup)]
    if args.root:
        common += ["--root", str(args.root)]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR")}
    env["OMP_NUM_THREADS"] = str(threads)
    cmd = ([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(procs), *common]
           if procs > 1 else [sys.executable, *common])
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=3600)
    if proc.returncode != 0:
        raise SystemExit(f"{name} failed:\n{proc.stderr[-4000:]}")
    return json.loads(out.read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=60, help="optimizer steps per run (235 make an epoch at 256)")
    ap.add_argument("--warmup", type=int, default=10, help="first steps left out of the timing")
    ap.add_argument("--root", type=Path, default=None, help="data root (default: RETRIEVAL_DATA_ROOT or the cache)")
    ap.add_argument("--no-readme", action="store_true")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    ap.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("--batch", type=int, default=256, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args)

    from benchmarks._report import append_section, machine

    load_before = os.getloadavg()[0]
    results: dict[str, list[dict]] = {name: [] for name in RUNS}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for name in RUNS:
                res = launch(name, args, Path(tmp) / f"{name}-{r}.json")
                results[name].append(res)
                log(f"round {r + 1}/{args.rounds} {name}: {res['images_per_step'] / res['step_s']:,.0f} img/s "
                    f"(step {res['step_s'] * 1000:.1f} ms, collectives {res['comm_total_s'] * 1000:.1f} ms)")
    load_after = os.getloadavg()[0]

    def med(name: str, key: str = "step_s") -> float:
        return statistics.median(r[key] for r in results[name])

    ips = {name: RUNS[name][2] / med(name) for name in RUNS}
    eff = ips["p2"] / (2 * ips["p1"])
    overhead = med("p2") - med("p1-half")
    comm_keys = sorted({k for r in results["p2"] for k in r["comm_s"]})
    comm = {k: statistics.median(r["comm_s"].get(k, 0.0) for r in results["p2"]) for k in comm_keys}
    comm_total = med("p2", "comm_total_s")
    lines = [
        f"## Distributed training: 1 vs 2 processes on 2 CPU cores ({dt.date.today().isoformat()}, CPU, gloo)",
        "",
        f"Machine: {machine()}. `benchmarks/distributed.py --rounds {args.rounds} --steps {args.steps} --warmup "
        f"{args.warmup}`: mnist-default (default tower, multi-similarity, m-per-class), {args.steps} optimizer "
        f"steps per run ({args.steps * 256:,} images at batch 256, {args.steps * 256 / 55000:.2f} of an epoch), the first "
        f"{args.warmup} left out of the timing; median step time per run, median over {args.rounds} rounds of the "
        f"runs alternated. Other jobs shared the machine: load average {load_before:.1f} before, "
        f"{load_after:.1f} after (2 cores).",
        "",
        "| run | processes x threads | global batch | step ms | CPU ms per step (rank 0) | images/s |",
        "|---|---|---|---|---|---|",
    ]
    for name, (procs, threads, batch) in RUNS.items():
        lines.append(f"| {name} | {procs} x {threads} | {batch} | {med(name) * 1000:.1f} | "
                     f"{med(name, 'cpu_s') * 1000:.1f} | {ips[name]:,.0f} |")
    lines += [
        "",
        f"Scaling efficiency, 2 processes against 1 (one thread each, same global batch): {ips['p2']:,.0f} / "
        f"(2 x {ips['p1']:,.0f}) = {eff:.2f} (speed-up {ips['p2'] / ips['p1']:.2f}x). Two processes against a "
        f"plain run using both cores (p1-t2): {ips['p2'] / ips['p1-t2']:.2f}x. Per round (runs of one round are "
        "seconds apart), p2 over p1: " + ", ".join(f"{a['step_s'] / b['step_s']:.2f}x"
                                                    for a, b in zip(results["p1"], results["p2"])) + ".",
        "",
        f"Time in collectives per step on rank 0 of p2 (median): {comm_total * 1000:.1f} ms in all, of which "
        + ", ".join(f"{k} {v * 1000:.2f} ms" for k, v in comm.items())
        + " (ddp_grad_allreduce: launch to completion, overlapping the rest of the backward pass; the others are "
          "blocking calls, and include waiting for the other process). A p2 step takes "
          f"{overhead * 1000:+.1f} ms against one process doing one process's share alone (p1-half).",
    ]
    print("\n".join(lines))
    if not args.no_readme:
        append_section(lines)


if __name__ == "__main__":
    main()
