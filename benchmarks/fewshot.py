"""Few-shot classification of digits the tower never saw: raw pixels against the tower trained by
configs/mnist-fewshot.toml (digits 1, 2, 3, 6, 7, 9 only), side by side on the very same episodes.

Protocol (issue 5): mnist:test images of 0, 4, 5, 8; 4-way, 1 and 5 shots, 15 queries per class, 1000 episodes,
nearest re-normalised prototype (and 1-NN over the support set); mean accuracy with a 95% CI. Target: >= 0.95
(1-shot) and >= 0.985 (5-shot). The same figures on the TRAIN split of 0, 4, 5, 8 are printed as well: that split
is the one used to choose the config (the test images are looked at only here, for the report).

    .venv/bin/python benchmarks/fewshot.py                 # reuse runs/mnist-fewshot when it holds a checkpoint
    .venv/bin/python benchmarks/fewshot.py --retrain       # train it first (timed), then evaluate
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks._report import append_section, machine  # noqa: E402
from retrieval.checkpoint import load_checkpoint, resolve_checkpoint  # noqa: E402
from retrieval.data.specs import load_dataset  # noqa: E402
from retrieval.embed import embed_images  # noqa: E402
from retrieval.errors import RetrievalError  # noqa: E402
from retrieval.fewshot import evaluate_fewshot, pixel_embeddings  # noqa: E402
from retrieval.run_folder import RunFolder  # noqa: E402

HELD_OUT = ["0", "4", "5", "8"]
TARGET = {1: 0.95, 5: 0.985}


def training_seconds(run: Path) -> float | None:
    """Training time recorded by the trainer (state.json), if any."""
    try:
        return float(json.loads(RunFolder(run).state.read_text())["train_seconds"])
    except (OSError, ValueError, KeyError):
        return None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(ROOT / "configs" / "mnist-fewshot.toml"))
    ap.add_argument("--run", default=str(ROOT / "runs" / "mnist-fewshot"), help="run folder (reused unless --retrain)")
    ap.add_argument("--retrain", action="store_true", help="train the config into --run first, replacing a run there")
    ap.add_argument("--device", default=None, help="training/embedding device (default: cuda when available)")
    ap.add_argument("--episodes", type=int, default=1000)
    ap.add_argument("--queries", type=int, default=15)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-readme", action="store_true", help="print only; do not append to benchmarks/history.md")
    args = ap.parse_args(argv)

    run = Path(args.run)
    wall = None
    try:
        has_checkpoint = bool(resolve_checkpoint(run))
    except RetrievalError:
        has_checkpoint = False
    if args.retrain or not has_checkpoint:
        from retrieval.logs import setup_cli_logging
        from retrieval.training import train

        setup_cli_logging()  # the trainer's messages on stderr, as the CLI shows them

        start = time.perf_counter()
        train(args.config, run, device=args.device, overwrite=True)
        wall = time.perf_counter() - start
    ckpt = load_checkpoint(run, device=args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    seen = set(ckpt.meta.get("classes_seen") or [])
    if seen & set(HELD_OUT):
        raise SystemExit(f"{ckpt.path} was trained on {sorted(seen & set(HELD_OUT))}: not a held-out evaluation")
    train_s = training_seconds(run)

    rows = []  # (split, embeddings, method, [results])
    for split in ("mnist:test", "mnist:train"):
        ds = load_dataset(split, classes=HELD_OUT)
        t0 = time.perf_counter()
        tower_emb = embed_images(ckpt.tower, ds.images)
        embed_s = time.perf_counter() - t0
        for name, emb in (("raw pixels", pixel_embeddings(ds.images)), (f"tower ({ckpt.path.parent.name})", tower_emb)):
            for method in ("prototype", "knn"):
                t0 = time.perf_counter()
                results = evaluate_fewshot(emb, ds.labels, ways=4, shots=[1, 5], queries=args.queries,
                                           episodes=args.episodes, method=method, seed=args.seed)
                rows.append((split, len(ds), name, method, results, time.perf_counter() - t0))
        print(f"{split}: {len(ds):,} images of {', '.join(HELD_OUT)}; tower embedding took {embed_s:.1f}s", file=sys.stderr)

    def fmt(r) -> str:
        return f"{r.accuracy:.4f} ± {r.ci95:.4f}"

    table = ["| images | embeddings | method | 4-way 1-shot | 4-way 5-shot | episodes scored in |",
             "| --- | --- | --- | --- | --- | --- |"]
    for split, n, name, method, results, secs in rows:
        table.append(f"| {split} ({n:,}) | {name} | {method} | {fmt(results[0])} | {fmt(results[1])} | {secs:.2f}s |")
    test_tower = next(r for s, _, name, m, r, _ in rows if s == "mnist:test" and name.startswith("tower") and m == "prototype")
    test_pixels = next(r for s, _, name, m, r, _ in rows if s == "mnist:test" and name == "raw pixels" and m == "prototype")
    verdict = []
    for res, pix in zip(test_tower, test_pixels):
        goal = TARGET[res.shots]
        ok = "met" if res.accuracy >= goal else "NOT met"
        fewer = 1 - (1 - res.accuracy) / max(1 - pix.accuracy, 1e-9)
        verdict.append(f"{res.shots}-shot {res.accuracy:.4f} (target {goal}: {ok}; error rate {1 - res.accuracy:.4f} "
                       f"against {1 - pix.accuracy:.4f} for raw pixels: {fewer:.0%} fewer errors)")
    meta = ckpt.meta
    train_line = (f"training: {wall:.0f}s wall-clock in this script" if wall is not None else "training: reused run")
    if train_s is not None:
        train_line += f"; the trainer's own step time {train_s:.0f}s"
    lines = [
        f"## Few-shot on held-out digits ({dt.date.today().isoformat()})",
        "",
        f"Machine: {machine()}. Command: `.venv/bin/python benchmarks/fewshot.py {' '.join(sys.argv[1:] if argv is None else argv)}`.",
        f"Tower: {ckpt.path} ({meta.get('tower')}, {meta.get('embedding_size')}-d, objective "
        f"{(meta.get('objective') or {}).get('name', '?')}, epoch {meta.get('epoch')}, classes seen "
        f"{', '.join(sorted(seen)) or '?'}); {train_line}.",
        f"Protocol: 4-way, {args.queries} queries per class, {args.episodes} episodes per cell, seed {args.seed} "
        "(the same episodes for every row of a split); mean accuracy ± 95% CI.",
        "",
        *table,
        "",
        "Test split, prototypes: " + "; ".join(verdict) + ".",
        "The train split of 0, 4, 5, 8 is the one the config was chosen on; the test split is only reported.",
    ]
    print("\n".join(lines))
    if not args.no_readme:
        append_section(lines + [""])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
