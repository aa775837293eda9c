"""Training benchmark: our mnist-default recipe against the pytorch-metric-learning MNIST triplet example, side by
side in one script, plus a check that the data path is not the bottleneck and (optionally) other shipped configs.

Parts (--parts; datapath, ours and baseline by default):
  datapath  step time with real batches (index the on-device uint8 tensor, scale, augment) against the same number
            of steps on one fixed, already prepared batch; blocks of steps alternate so machine load hits both alike
  ours      `retrieval.training.train(configs/mnist-default.toml)` on full MNIST train (minus its validation slice)
  baseline  the PML example recipe: conv(1,32,3)-ReLU-conv(32,64,3)-ReLU-maxpool-dropout(0.25)-fc(9216,128),
            TripletMarginLoss(margin 0.2, cosine similarity, ThresholdReducer(low=0)) with a semi-hard
            TripletMarginMiner(margin 0.2), Adam lr 0.01, batch 256, shuffled DataLoader with per-image
            ToTensor + Normalize, 1 epoch
  precision  training steps of mnist-default (real batches: index + scale + augment + forward + objective + backward
            + optimizer) in each of --precisions, blocks of steps interleaved; ms/step, images/s, the bf16 / fp32
            ratio, and (--gemm) each precision's multiply-add rate against this machine's GEMM bound
            (benchmarks/embed.py): training multiply-adds per image taken as 3x the forward pass's
  quickstart `retrieval quickstart` (subprocess, from an empty data root each, so MNIST is fetched again) in each of
            --precisions, one after the other; wall time per step and the whole, and the ratio to fp32
  --configs NAME,...  also train these shipped configs and report their test figures
  --precision P  the precision of the `ours` and --configs trainings (default: the configs' own, auto)

Test figures: the 10,000 mnist:test queries against the 60,000 mnist:train references, exact search,
precision@1 and MAP@R as pytorch-metric-learning defines them (retrieval.metrics). Time to 0.98 precision@1: test
precision@1 measured at points during training (--ours-evals, --baseline-evals, in epochs); evaluation time is
taken off the training clock, so the figure is the training time at the first point that reaches the target (an
upper bound at that resolution).

    .venv/bin/python benchmarks/train.py                        # CPU, all cores available (2 here)
    .venv/bin/python benchmarks/train.py --device cuda
    .venv/bin/python benchmarks/train.py --parts ours --configs mnist-triplet,mnist-contrastive --no-readme
    .venv/bin/python benchmarks/train.py --parts ours --json ours.json --no-readme    # parts run separately ...
    .venv/bin/python benchmarks/train.py --combine ours.json baseline.json datapath.json  # ... reported together
    .venv/bin/python benchmarks/train.py --parts precision,quickstart --gemm   # bf16 against fp32, side by side
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

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._report import append_section, machine  # noqa: E402
from retrieval.config import load_config  # noqa: E402
from retrieval.data.specs import load_dataset  # noqa: E402
from retrieval.embed import available_cores, embed_images, resolve_device  # noqa: E402
from retrieval.knn import ExactSearch  # noqa: E402
from retrieval.metrics import retrieval_metrics  # noqa: E402
from retrieval.logs import setup_cli_logging  # noqa: E402
from retrieval.seeding import make_generator  # noqa: E402
from retrieval.towers import Tower  # noqa: E402
from retrieval.run_folder import BEST, LAST, RunFolder  # noqa: E402
from retrieval.training import build_trainer, train  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TARGET_P1 = 0.98


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


class TestSet:
    """mnist:test queries and mnist:train references, embedded by a tower on demand."""

    def __init__(self, root, subset: int | None = None):
        self.train = load_dataset("mnist:train", root=root, subset=subset)
        self.test = load_dataset("mnist:test", root=root, subset=subset and max(1, subset // 6))

    def embed(self, tower, device):
        return (embed_images(tower, self.test.images, device=device, batch_size=1024),
                embed_images(tower, self.train.images, device=device, batch_size=1024))

    def precision_at_1(self, tower, device) -> float:
        q, r = self.embed(tower, device)
        _, ids = ExactSearch(r)(q, 1)
        return float((self.train.labels.numpy()[ids[:, 0]] == self.test.labels.numpy()).mean())

    def scores(self, tower, device, seen: list[str] | None = None) -> dict:
        """Test vs train figures; with `seen` (the classes a run trained on, when it held some out) also the
        figures of the seen and of the unseen classes alone (queries and references of those classes only)."""
        q, r = self.embed(tower, device)
        ql, rl = self.test.labels.numpy(), self.train.labels.numpy()
        m = retrieval_metrics(q, ql, r, rl, ks=(1,))
        out = {"precision_at_1": m.precision[1], "map_at_r": m.map_at_r}
        if seen is not None and len(seen) < len(self.train.classes):
            for part, keep in (("seen", seen), ("unseen", [c for c in self.train.classes if c not in seen])):
                ids = [self.train.classes.index(c) for c in keep]
                qm, rm = np.isin(ql, ids), np.isin(rl, ids)
                sub = retrieval_metrics(q[qm], ql[qm], r[rm], rl[rm], ks=(1,))
                out[part] = {"classes": keep, "precision_at_1": sub.precision[1], "map_at_r": sub.map_at_r}
        return out


class Checkpoints:
    """Evaluates test precision@1 at given training positions; keeps its own time off the training clock."""

    def __init__(self, testset: TestSet, device, at_epochs: list[float]):
        self.testset, self.device, self.at_epochs = testset, device, at_epochs
        self.points: list[dict] = []
        self.eval_seconds = 0.0

    def __call__(self, step: int, steps_per_epoch: int, train_seconds: float, tower: nn.Module) -> None:
        if step not in {max(1, round(e * steps_per_epoch)) for e in self.at_epochs}:
            return
        epoch_fraction = step / steps_per_epoch
        t0 = time.perf_counter()
        p1 = self.testset.precision_at_1(tower, self.device)
        tower.train()
        self.eval_seconds += time.perf_counter() - t0
        self.points.append({"step": step, "epochs": round(epoch_fraction, 3), "train_seconds": train_seconds,
                            "precision_at_1": p1})
        log(f"  at {epoch_fraction:.2f} epochs ({train_seconds:.1f}s of training): test precision@1 {p1:.4f}")

    def time_to(self, target: float) -> float | None:
        hit = [p["train_seconds"] for p in self.points if p["precision_at_1"] >= target]
        return min(hit) if hit else None


# ---------------------------------------------------------------------------------------------- data path
def bench_datapath(config: Path, device, root, steps: int, block: int, overrides=()) -> dict:
    """Median step time: real batches (index + scale + augment + step) vs steps on one prepared batch."""
    cfg = load_config(config, overrides)
    with tempfile.TemporaryDirectory() as tmp:
        trainer = build_trainer(cfg, Path(tmp), device, data_root=root, progress=False)
    trainer.tower.to(device)
    plan = trainer.sampler.epoch_batches(0).to(device)
    fixed_x, fixed_y = trainer.make_batch(plan[0], make_generator(0, "fixed"))
    real, fixed, batch_only = [], [], []
    s = 0
    for _ in range(2):  # warm-up
        trainer.train_step(fixed_x, fixed_y, make_generator(0, "warm"))
    while len(real) < steps:
        for _ in range(block):
            g = make_generator(cfg.seed, "bench", s)
            sync(device)
            t0 = time.perf_counter()
            x, y = trainer.make_batch(plan[s % len(plan)], g)
            sync(device)
            t1 = time.perf_counter()
            trainer.train_step(x, y, g)
            sync(device)
            t2 = time.perf_counter()
            real.append(t2 - t0)
            batch_only.append(t1 - t0)
            s += 1
        for _ in range(block):
            g = make_generator(cfg.seed, "bench", s)
            sync(device)
            t0 = time.perf_counter()
            trainer.train_step(fixed_x, fixed_y, g)
            sync(device)
            fixed.append(time.perf_counter() - t0)
            s += 1
    med = statistics.median
    return {
        "batch_size": trainer.sampler.batch_size,
        "steps": len(real),
        "real_ms": med(real) * 1e3,
        "fixed_ms": med(fixed) * 1e3,
        "batch_ms": med(batch_only) * 1e3,
        "ratio": med(real) / med(fixed),
    }


# ---------------------------------------------------------------------------------------------- precision
def bench_precision(config: Path, device, root, precisions: list[str], steps: int, block: int, gemm: bool,
                    overrides=()) -> dict:
    """Median step time (real batches, the whole step) of the config trained in each precision, blocks of
    `block` steps interleaved, every trainer from the same seed walking the same batches."""
    from benchmarks.embed import gemm_bounds, multiply_adds

    trainers = {}
    for p in precisions:
        cfg = load_config(config, [*overrides, f"train.precision={p}"])
        with tempfile.TemporaryDirectory() as tmp:
            trainers[p] = build_trainer(cfg, Path(tmp), device, data_root=root, progress=False)
    first = next(iter(trainers.values()))
    plan = first.sampler.epoch_batches(0).to(device)
    times = {p: [] for p in trainers}
    for p, trainer in trainers.items():  # warm-up: oneDNN primitives, allocator
        trainer.tower.to(device)
        for s in range(3):
            g = make_generator(0, "warm", s)
            trainer.train_step(*trainer.make_batch(plan[s], g), g)
    s = 0
    while min(len(v) for v in times.values()) < steps:
        for p, trainer in trainers.items():
            for i in range(block):
                g = make_generator(0, "bench", s + i)
                sync(device)
                t0 = time.perf_counter()
                x, y = trainer.make_batch(plan[(s + i) % len(plan)], g)
                trainer.train_step(x, y, g)
                sync(device)
                times[p].append(time.perf_counter() - t0)
        s += block
    batch = first.images_per_step
    out = {"config": str(config), "batch_size": batch, "steps": steps, "by_precision": {}}
    macs = 3 * multiply_adds(first.tower, first.images[:64], training=True)
    bounds = gemm_bounds(device) if gemm else None
    for p, v in times.items():
        ms = statistics.median(v) * 1e3
        entry = {"ms_per_step": ms, "images_per_s": batch / ms * 1e3}
        if bounds:
            entry["gmac_per_s"] = macs * entry["images_per_s"] / 1e9
            entry["bound_gmac_per_s"] = bounds[p]["bound"] / 1e9
        out["by_precision"][p] = entry
    out["train_macs_per_image"] = macs
    if bounds:
        out["gemm"] = {p: {"bound": b["bound"], "by_size": {str(k): v for k, v in b["by_size"].items()}}
                       for p, b in bounds.items()}
    return out


# ---------------------------------------------------------------------------------------------- quickstart
def bench_quickstart(precisions: list[str], tiny: bool, keep: Path | None = None) -> dict:
    """`retrieval quickstart` in each precision from an empty data root (MNIST fetched anew each time); its
    output folder (runs, index, report) kept in `keep`/<precision> when given."""
    runs = {}
    for p in precisions:
        with tempfile.TemporaryDirectory() as tmp:
            env = {**os.environ, "RETRIEVAL_DATA_ROOT": str(Path(tmp) / "data")}
            out = keep / p if keep else Path(tmp) / "qs"
            if out.exists():
                raise SystemExit(f"--quickstart-out: {out} exists (quickstart would reuse what it holds)")
            cmd = [sys.executable, "-m", "retrieval", "--quiet", "quickstart", "--out", str(out),
                   "--precision", p, "--json", "--device", "cpu"] + (["--tiny"] if tiny else [])
            log(f"quickstart --precision {p} ...")
            start = time.perf_counter()
            done = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=tmp)
            wall = time.perf_counter() - start
            if done.returncode != 0:
                raise SystemExit(f"quickstart --precision {p} failed: {done.stderr.strip()[-2000:]}")
            summary = json.loads(done.stdout)
        runs[p] = {"wall_seconds": wall, "seconds": summary["seconds"],
                   "precision_at_1": summary["metrics"]["precision@1"], "map_at_r": summary["metrics"]["map@r"],
                   "fewshot": [{k: r.get(k) for k in ("shots", "accuracy", "ci95")} for r in summary["fewshot"]]}
        log(f"  {wall:.0f}s: " + ", ".join(f"{k} {v:.0f}s" for k, v in summary["seconds"].items()))
    return {"tiny": tiny, "runs": runs}


# ---------------------------------------------------------------------------------------------- ours
def bench_ours(config: Path, device, root, testset: TestSet, evals: list[float], threads: int | None,
               out: Path | None, overrides=()) -> dict:
    cfg = load_config(config, overrides)
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = out or Path(tmp) / cfg.name
        points = Checkpoints(testset, device, evals)
        start = time.perf_counter()

        def on_step(info):
            wall = time.perf_counter() - start - points.eval_seconds
            points(info.global_step, info.steps_per_epoch, wall, info.trainer.tower)

        train(config, run_dir, device=device, data_root=root, progress=False, on_step=on_step,
              threads=threads, overwrite=True, overrides=overrides)
        wall = time.perf_counter() - start - points.eval_seconds
        folder = RunFolder(run_dir)
        records = folder.history()
        from retrieval.checkpoint import load_checkpoint

        final = {}
        for name in (BEST, LAST):
            ckpt = load_checkpoint(folder.checkpoint(name), device=device)
            if name == LAST and ckpt.fingerprint == final[BEST]["fingerprint"]:
                final[LAST] = final[BEST]
                continue
            final[name] = {**testset.scores(ckpt.tower, device, ckpt.meta["classes_seen"]),
                           "epoch": ckpt.meta["epoch"], "fingerprint": ckpt.fingerprint}
    images = sum(r["images_per_s"] * r["epoch_seconds"] for r in records)
    return {
        "name": cfg.name, "tower": cfg.tower.name, "objective": cfg.objective.name,
        "epochs": cfg.train.epochs, "wall_seconds": wall,
        "train_seconds": records[-1]["train_seconds"],
        "images_per_s": images / records[-1]["train_seconds"],
        "best": final["best"], "last": final["last"],
        "points": points.points, "time_to_target": points.time_to(TARGET_P1),
    }


# ---------------------------------------------------------------------------------------------- baseline
class PMLExampleNet(nn.Module):
    """The network of pytorch-metric-learning's MNIST examples (its unused dropout2 left out)."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, 3, 1)
        self.conv2 = nn.Conv2d(32, 64, 3, 1)
        self.dropout1 = nn.Dropout2d(0.25)
        self.fc1 = nn.Linear(9216, 128)

    def forward(self, x):
        x = torch.relu(self.conv2(torch.relu(self.conv1(x))))
        x = self.dropout1(nn.functional.max_pool2d(x, 2))
        return self.fc1(torch.flatten(x, 1))


class PILDataset(torch.utils.data.Dataset):
    """What torchvision.datasets.MNIST does per item: a PIL image through the example's transform."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor):
        from torchvision import transforms

        self.images, self.labels = images.numpy(), labels
        self.transform = transforms.Compose([transforms.ToTensor(), transforms.Normalize((0.1307,), (0.3081,))])

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        from PIL import Image

        return self.transform(Image.fromarray(self.images[i], mode="L")), self.labels[i]


def bench_baseline(device, testset: TestSet, evals: list[float], seed: int = 0) -> dict:
    from pytorch_metric_learning import distances, losses, miners, reducers

    torch.manual_seed(seed)
    net = PMLExampleNet().to(device)
    # Tower = the same input normalisation as the example's transform + L2 normalisation (cosine, as trained)
    tower = Tower("pml-example", net, 128)
    distance = distances.CosineSimilarity()
    loss_func = losses.TripletMarginLoss(margin=0.2, distance=distance, reducer=reducers.ThresholdReducer(low=0))
    mining_func = miners.TripletMarginMiner(margin=0.2, distance=distance, type_of_triplets="semihard")
    optimizer = torch.optim.Adam(net.parameters(), lr=0.01)
    data = PILDataset(testset.train.images, testset.train.labels)
    loader = torch.utils.data.DataLoader(data, batch_size=256, shuffle=True,
                                         generator=torch.Generator().manual_seed(seed))
    steps = len(loader)
    points = Checkpoints(testset, device, evals)
    start = time.perf_counter()
    net.train()
    for step, (x, y) in enumerate(loader, 1):
        x, y = x.to(device), y.to(device)
        optimizer.zero_grad()
        emb = net(x)
        loss = loss_func(emb, y, mining_func(emb, y))
        loss.backward()
        optimizer.step()
        sync(device)
        points(step, steps, time.perf_counter() - start - points.eval_seconds, tower)
    wall = time.perf_counter() - start - points.eval_seconds
    final = {**testset.scores(tower, device), "epoch": 1}
    return {
        "name": "pml-example", "tower": "conv32-conv64-fc128", "objective": "triplet (semihard)", "epochs": 1,
        "wall_seconds": wall, "train_seconds": wall, "images_per_s": len(data) / wall,
        "best": final, "last": final, "points": points.points, "time_to_target": points.time_to(TARGET_P1),
    }


# ---------------------------------------------------------------------------------------------- report
def fmt_time(run: dict) -> str:
    if not run["points"]:
        return "-"
    return f"{run['time_to_target']:.1f}" if run["time_to_target"] is not None else "not reached"


def report(results: dict, args_line: str) -> list[str]:
    lines = []
    runs = [r for r in (results.get("ours"), results.get("baseline")) if r] + results.get("configs", [])
    if runs:
        lines += [
            "| recipe | tower | objective | epochs | training wall s | train img/s | test precision@1 | test MAP@R "
            f"| time to {TARGET_P1} precision@1 s |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for r in runs:
            lines.append(
                f"| {r['name']} | {r['tower']} | {r['objective']} | {r['epochs']} | {r['wall_seconds']:.1f} | "
                f"{r['images_per_s']:,.0f} | {r['best']['precision_at_1']:.4f} | {r['best']['map_at_r']:.4f} | "
                f"{fmt_time(r)} |"
            )
        lines.append("")
        for r in runs:
            if r["points"]:
                pts = ", ".join(f"{p['epochs']:g} ep / {p['train_seconds']:.0f}s: {p['precision_at_1']:.4f}"
                                for p in r["points"])
                lines.append(f"- {r['name']} test precision@1 during training: {pts}")
            for part in ("seen", "unseen"):
                if part in r["best"]:
                    b = r["best"][part]
                    lines.append(f"- {r['name']}, {part} classes {','.join(b['classes'])} alone: precision@1 "
                                 f"{b['precision_at_1']:.4f}, MAP@R {b['map_at_r']:.4f}")
            if r["best"]["epoch"] != r["last"]["epoch"]:
                lines.append(f"- {r['name']}: best checkpoint (by validation MAP@R) is epoch {r['best']['epoch']}; "
                             f"last epoch: precision@1 {r['last']['precision_at_1']:.4f}, "
                             f"MAP@R {r['last']['map_at_r']:.4f}")
        lines.append("")
    ours, base = results.get("ours"), results.get("baseline")
    if ours and base:
        speed = base["wall_seconds"] / ours["wall_seconds"]
        lines.append(
            f"Ours vs the PML example: precision@1 {ours['best']['precision_at_1']:.4f} vs "
            f"{base['best']['precision_at_1']:.4f} ({ours['best']['precision_at_1'] - base['best']['precision_at_1']:+.4f}), "
            f"MAP@R {ours['best']['map_at_r']:.4f} vs {base['best']['map_at_r']:.4f} "
            f"({ours['best']['map_at_r'] - base['best']['map_at_r']:+.4f}); whole training {ours['wall_seconds']:.0f}s "
            f"vs {base['wall_seconds']:.0f}s ({speed:.2f}x the baseline's time per run)."
        )
        if ours["time_to_target"] and base["time_to_target"]:
            lines.append(f"Time to {TARGET_P1} test precision@1: {ours['time_to_target']:.1f}s vs "
                         f"{base['time_to_target']:.1f}s: {base['time_to_target'] / ours['time_to_target']:.1f}x faster "
                         "(target >= 5x).")
        elif ours["time_to_target"]:
            lines.append(f"Time to {TARGET_P1} test precision@1: {ours['time_to_target']:.1f}s; the baseline did not "
                         f"reach it in its {base['wall_seconds']:.0f}s run (> "
                         f"{base['wall_seconds'] / ours['time_to_target']:.1f}x).")
        lines.append("")
    pr = results.get("precision")
    if pr:
        by = pr["by_precision"]
        lines += [f"Training steps of {Path(pr['config']).stem} (batch {pr['batch_size']}, real batches: indexing, "
                  f"augmentation, forward, objective, backward, optimizer; median of {pr['steps']} steps each, "
                  f"blocks of 5 interleaved; {pr['train_macs_per_image'] / 1e6:.1f}M multiply-adds per image, 3x the "
                  "forward pass):", "",
                  "| precision | ms/step | images/s | vs fp32 |" + (" GMAC/s | GEMM bound GMAC/s | of bound |"
                                                                  if "gemm" in pr else ""),
                  "|---|---|---|---|" + ("---|---|---|" if "gemm" in pr else "")]
        base = by.get("fp32")
        for p, e in by.items():
            vs = f"{e['images_per_s'] / base['images_per_s']:.2f}x" if base else "-"
            line = f"| {p} | {e['ms_per_step']:.1f} | {e['images_per_s']:,.0f} | {vs} |"
            if "gemm" in pr:
                line += f" {e['gmac_per_s']:.1f} | {e['bound_gmac_per_s']:.1f} | {e['gmac_per_s'] / e['bound_gmac_per_s']:.0%} |"
            lines.append(line)
        lines.append("")
    qs = results.get("quickstart")
    if qs:
        runs = qs["runs"]
        steps = list(next(iter(runs.values()))["seconds"])
        lines += [f"`retrieval quickstart{' --tiny' if qs['tiny'] else ''}` from an empty data root, one precision "
                  "after the other:", "",
                  "| precision | " + " | ".join(f"{k} s" for k in steps) + " | whole s | vs fp32 | test precision@1 "
                  "| test MAP@R | few-shot |",
                  "|---|" + "---|" * (len(steps) + 5)]
        base = runs.get("fp32")
        for p, r in runs.items():
            shots = ", ".join(f"{f['shots']}-shot {f['accuracy']:.4f} +- {f['ci95']:.4f}" for f in r["fewshot"])
            lines.append(f"| {p} | " + " | ".join(f"{r['seconds'][k]:.0f}" for k in steps) +
                         f" | {r['wall_seconds']:.0f} | " +
                         (f"{r['wall_seconds'] / base['wall_seconds']:.2f}x" if base else "-") +
                         f" | {r['precision_at_1']:.4f} | {r['map_at_r']:.4f} | {shots} |")
        lines.append("")
    dp = results.get("datapath")
    if dp:
        lines.append(
            f"Data path (mnist-default, batch {dp['batch_size']}, median of {dp['steps']} steps each, interleaved): "
            f"{dp['real_ms']:.1f} ms/step with real batches (of which indexing + scaling + augmentation "
            f"{dp['batch_ms']:.1f} ms) vs {dp['fixed_ms']:.1f} ms/step on one fixed batch: ratio {dp['ratio']:.3f}."
        )
        lines.append("")
    return lines


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    ap.add_argument("--threads", type=int, default=None, help="CPU threads (default: all cores available)")
    ap.add_argument("--root", default=None, help="data root (default: RETRIEVAL_DATA_ROOT or the cache)")
    ap.add_argument("--config", default=str(REPO / "configs" / "mnist-default.toml"))
    ap.add_argument("--parts", default="datapath,ours,baseline")
    ap.add_argument("--configs", default="", help="also train these shipped configs (names, comma-separated)")
    ap.add_argument("--ours-evals", default="0.25,0.5,0.75,1", help="epochs at which to measure test precision@1")
    ap.add_argument("--baseline-evals", default="0.25,0.5,0.75,1")
    ap.add_argument("--datapath-steps", type=int, default=40)
    ap.add_argument("--precisions", default="fp32,bf16", help="precision and quickstart parts: the precisions compared")
    ap.add_argument("--precision", default=None, help="ours and --configs: train.precision (default: the configs')")
    ap.add_argument("--precision-steps", type=int, default=60, help="precision part: steps per precision")
    ap.add_argument("--gemm", action="store_true", help="precision part: also measure the GEMM bounds")
    ap.add_argument("--quickstart-tiny", action="store_true", help="quickstart part: --tiny runs (a smoke test)")
    ap.add_argument("--quickstart-out", default=None, help="quickstart part: keep each run's folder in DIR/PRECISION")
    ap.add_argument("--subset", type=int, default=None,
                    help="smoke runs: train on this many images, test on a sixth as many against as many references")
    ap.add_argument("--out", default=None, help="keep the mnist-default run here (default: a temp folder)")
    ap.add_argument("--json", default=None, help="also write the results as JSON here")
    ap.add_argument("--combine", nargs="+", default=None, help="report these JSON result files together")
    ap.add_argument("--note", default="", help="a line added to the README section (e.g. how the machine was set)")
    ap.add_argument("--no-readme", action="store_true", help="print only; do not append to benchmarks/history.md")
    args = ap.parse_args(argv)
    setup_cli_logging()  # the trainer's messages (epoch lines) on stderr, as the CLI shows them

    if args.combine:
        results: dict = {}
        for path in args.combine:
            part = json.loads(Path(path).read_text())
            if "quickstart" in part and "quickstart" in results:  # precisions run separately: one table
                part["quickstart"]["runs"] = {**results["quickstart"]["runs"], **part["quickstart"]["runs"]}
            results.update({k: v for k, v in part.items() if k != "configs"})
            results.setdefault("configs", []).extend(part.get("configs", []))
    else:
        device = resolve_device(args.device)
        if device.type == "cpu":
            torch.set_num_threads(args.threads or available_cores())
        parts = {p.strip() for p in args.parts.split(",") if p.strip()}
        evals = lambda text: [float(x) for x in text.split(",") if x.strip()]  # noqa: E731
        results = {"device": str(device), "threads": torch.get_num_threads() if device.type == "cpu" else None,
                   "machine": machine(), "date": dt.date.today().isoformat(), "configs": []}
        testset = TestSet(args.root, args.subset) if parts & {"ours", "baseline"} or args.configs else None
        sets = [f"data.subset={args.subset}"] if args.subset else []
        precisions = [p.strip() for p in args.precisions.split(",") if p.strip()]
        if "precision" in parts:
            log(f"training steps in {', '.join(precisions)} ...")
            results["precision"] = bench_precision(Path(args.config), device, args.root, precisions,
                                                   args.precision_steps, 5, args.gemm, sets)
        if "quickstart" in parts:
            results["quickstart"] = bench_quickstart(precisions, args.quickstart_tiny,
                                                     Path(args.quickstart_out) if args.quickstart_out else None)
        if args.precision:
            sets = [*sets, f"train.precision={args.precision}"]
        if "datapath" in parts:
            log("data path check ...")
            results["datapath"] = bench_datapath(Path(args.config), device, args.root, args.datapath_steps, 5,
                                                 sets)
        if "ours" in parts:
            log(f"training {args.config} ...")
            results["ours"] = bench_ours(Path(args.config), device, args.root, testset, evals(args.ours_evals),
                                         args.threads, Path(args.out) if args.out else None, sets)
        if "baseline" in parts:
            log("training the PML example recipe ...")
            results["baseline"] = bench_baseline(device, testset, evals(args.baseline_evals))
        for name in [c.strip() for c in args.configs.split(",") if c.strip()]:
            log(f"training configs/{name}.toml ...")
            results["configs"].append(bench_ours(REPO / "configs" / f"{name}.toml", device, args.root, testset, [],
                                                 args.threads, None, sets))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    where = f"{results['device']}" + (f", {results['threads']} torch threads" if results.get("threads") else "")
    lines = report(results, "")
    print("\n".join(lines))
    if not args.no_readme:
        cmd = "benchmarks/train.py " + " ".join(argv if argv is not None else sys.argv[1:])
        title = ("Training: mnist-default vs the PML MNIST triplet example" if results.get("ours") or results.get("baseline")
                 else "Training and quickstart in fp32 and bf16" if results.get("precision") or results.get("quickstart")
                 else "Training")
        head = [f"## {title} ({results['date']}, {where})", "",
                f"Machine: {results['machine']}. `{cmd.strip()}`. Test queries: 10,000 mnist:test against the "
                "60,000 mnist:train references (exact; precision@1 and MAP@R as PML defines them). Training wall "
                "time excludes the benchmark's own test evaluations; ours includes its per-epoch validation."]
        if args.note:
            head += ["", args.note]
        append_section(head + [""] + lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
