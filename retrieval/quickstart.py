"""The whole product in one call: fetch MNIST, train, index, evaluate, few-shot, query, summarise.

Every step reuses what an earlier run left in the output folder (a finished training run, an index built by
the same tower) unless `force` is set; an interrupted training run is resumed.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from retrieval.checkpoint import load_checkpoint
from retrieval.errors import RetrievalError

Log = Callable[[str], None]

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
FEWSHOT_CLASSES = ["0", "4", "5", "8"]
QUERY_ITEMS = [f"mnist:test[{i}]" for i in range(6)]
# A tiny mode for tests and smoke checks: a small subset, one short epoch, few episodes.
TINY = {"train_subset": 800, "val_size": 200, "epochs": 1, "query_subset": 300, "episodes": 100}


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr)


def config_path(name: str) -> Path:
    path = CONFIG_DIR / f"{name}.toml"
    if not path.is_file():
        raise RetrievalError(f"shipped config {path} not found (quickstart runs from a source checkout)")
    return path


@dataclass
class QuickstartResult:
    out: Path
    run: Path
    index: Path
    report: Path
    fewshot_run: Path | None
    metrics: dict
    fewshot: list = field(default_factory=list)
    queries: list = field(default_factory=list)
    seconds: dict = field(default_factory=dict)

    def summary_lines(self) -> list[str]:
        m = self.metrics
        lines = ["", "quickstart summary", "------------------"]
        rows = [(f"recall@{k}", m[f"recall@{k}"]) for k in (1, 2, 4, 8)]
        rows += [("precision@1", m["precision@1"]), ("MAP@R", m["map@r"])]
        lines.append(f"retrieval: mnist:test ({m['n_queries']:,} queries) vs index of mnist:train "
                     f"({m['n_references']:,} references)")
        lines += [f"  {name:<12} {value:.4f}" for name, value in rows]
        if self.fewshot:
            lines.append(f"few-shot: digits {','.join(FEWSHOT_CLASSES)} never seen in training, "
                         f"{self.fewshot[0].ways}-way, {self.fewshot[0].episodes} episodes")
            lines += [f"  {r.shots}-shot       {r.accuracy:.4f} +- {r.ci95:.4f}" for r in self.fewshot]
        if self.queries:
            lines.append("queries:")
            for r in self.queries:
                truth = f" (true {r.true_label})" if r.true_label is not None else ""
                lines.append(f"  {r.query:<16} -> {r.label}{truth}, nearest distance {r.neighbors[0].distance:.3f}")
        lines.append("time: " + ", ".join(f"{k} {v:.0f}s" for k, v in self.seconds.items()))
        lines.append("wrote:")
        lines.append(f"  run folder      {self.run}")
        if self.fewshot_run:
            lines.append(f"  few-shot run    {self.fewshot_run}")
        lines.append(f"  index           {self.index}")
        lines.append(f"  report          {self.report}  (summary.md, metrics.json, plots)")
        return lines


def _finished(run: Path, epochs: int) -> bool:
    """A run folder whose `last` checkpoint is from the final epoch of an uninterrupted run."""
    meta_path = run / "last.json"
    if not (meta_path.is_file() and (run / "best.safetensors").is_file()):
        return False
    try:
        meta = json.loads(meta_path.read_text("utf-8"))
    except (ValueError, OSError):
        return False
    return meta.get("epoch") == epochs and not meta.get("interrupted")


def _train(config: str, run: Path, overrides: list[str], force: bool, device, root, log: Log) -> Path:
    from retrieval.config import load_config
    from retrieval.train import train

    cfg = load_config(config_path(config), overrides)
    epochs = cfg["train"]["epochs"]
    if not force and _finished(run, epochs):
        log(f"[train] reusing the finished run in {run} (--force to retrain)")
        return run
    resume = not force and (run / "state.json").is_file()
    log(f"[train] {'resuming' if resume else 'training'} {config} -> {run}")
    return train(config_path(config), run, device=device, resume=resume, log=log, overrides=overrides,
                 data_root=root, overwrite=force)


def _index(run: Path, folder: Path, subset: int | None, force: bool, device, root, log: Log) -> Path:
    from retrieval.index import build_index_folder, read_index_meta

    fingerprint = load_checkpoint(run).fingerprint
    if not force and (folder / "meta.json").is_file():
        try:
            if read_index_meta(folder)["tower"]["fingerprint"] == fingerprint:
                log(f"[index] reusing {folder} (built by the same tower)")
                return folder
        except (RetrievalError, KeyError, TypeError):
            pass
    log(f"[index] embedding mnist:train and building a Flat index -> {folder}")
    build_index_folder(run, ["mnist:train"], folder, subset=subset, device=device, root=root, log=log)
    return folder


def run_quickstart(out: str | os.PathLike = "quickstart", *, force: bool = False, tiny: bool = False,
                   fewshot: bool = True, device=None, root=None, log: Log = _stderr) -> QuickstartResult:
    """Run every step into `out` (runs/, indexes/, reports/ inside it) and return what was measured."""
    from retrieval.data.fetch import fetch_dataset
    from retrieval.data.specs import default_data_root, load_dataset
    from retrieval.embed import embed_images
    from retrieval.fewshot import evaluate_fewshot
    from retrieval.metrics import evaluate_index
    from retrieval.query import Searcher
    from retrieval.reports import write_report

    out = Path(out)
    root = Path(root) if root is not None else default_data_root()
    seconds: dict[str, float] = {}
    t = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal t
        now = time.perf_counter()
        seconds[name] = now - t
        t = now

    log(f"[data] MNIST in {root}")
    fetch_dataset("mnist", root, log=log)
    lap("fetch")

    overrides = []
    if tiny:
        overrides = [f"data.subset={TINY['train_subset']}", f"data.val_size={TINY['val_size']}",
                     f"train.epochs={TINY['epochs']}"]
    run = _train("mnist-default", out / "runs" / "mnist-default", overrides, force, device, root, log)
    lap("train")

    index = _index(run, out / "indexes" / "mnist-default-train", TINY["train_subset"] if tiny else None,
                   force, device, root, log)
    lap("index")

    log("[evaluate] mnist:test against the index")
    query_subset = TINY["query_subset"] if tiny else None
    metrics, iq = evaluate_index(index, "mnist:test", (1, 2, 4, 8, 16), root=root, subset=query_subset,
                                 device=device or "cpu", log=log)
    report = out / "reports" / "mnist-default-test"
    write_report(report, metrics, iq, {"index": str(index), "queries": "mnist:test", "checkpoint": str(run)},
                 root=root, log=log)
    lap("evaluate")

    fewshot_run, fewshot_results = None, []
    if fewshot:
        fewshot_run = _train("mnist-fewshot", out / "runs" / "mnist-fewshot", overrides, force, device, root, log)
        log(f"[fewshot] 4-way episodes on mnist:test digits {','.join(FEWSHOT_CLASSES)}")
        ckpt = load_checkpoint(fewshot_run, device=device or "cpu")
        held_out = load_dataset("mnist:test", root=root, classes=FEWSHOT_CLASSES, log=log)
        emb = embed_images(ckpt.tower, held_out.images, batch_size=256, progress=True)
        fewshot_results = evaluate_fewshot(emb, held_out.labels, ways=4, shots=[1, 5], queries=15,
                                           episodes=TINY["episodes"] if tiny else 1000, seed=0,
                                           class_names=held_out.classes)
        lap("fewshot")
    else:
        log("[fewshot] skipped; to run it: retrieval train --config configs/mnist-fewshot.toml && "
            "retrieval fewshot --checkpoint runs/mnist-fewshot --data mnist:test --classes 0,4,5,8 --ways 4 --shots 1,5")

    log(f"[query] {', '.join(QUERY_ITEMS)}")
    searcher = Searcher.open(index, device=device or "cpu")
    queries = searcher.query(QUERY_ITEMS, k=5, root=root, log=log)
    lap("query")

    return QuickstartResult(out=out, run=run, index=index, report=report, fewshot_run=fewshot_run,
                            metrics=metrics.to_json(), fewshot=fewshot_results, queries=queries, seconds=seconds)
