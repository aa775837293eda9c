"""The whole chain into one folder: fetch, train, index, evaluate, few-shot, query."""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from retrieval.cards import write_run_card
from retrieval.checkpoint import load_checkpoint
from retrieval.compute import Compute
from retrieval.config import load_config
from retrieval.data.fetch import fetch_dataset
from retrieval.data.selection import Selection
from retrieval.data.specs import data_root
from retrieval.embed import resolve_device
from retrieval.errors import RetrievalError
from retrieval.index import IndexFolder, read_index_meta
from retrieval.precision import check_precision
from retrieval.run_folder import RunFolder
from retrieval.workflows.evaluation import Evaluation, evaluate, fewshot
from retrieval.workflows.indexing import build_index
from retrieval.workflows.querying import query
from retrieval.workflows.training import shipped_config, train

logger = logging.getLogger(__name__)

FEWSHOT_CLASSES = ["0", "4", "5", "8"]
QUICKSTART_QUERIES = [f"mnist:test[{i}]" for i in range(6)]
# A tiny mode for tests and smoke checks: a small subset, one short epoch, few episodes.
TINY = {"train_subset": 800, "val_size": 200, "epochs": 1, "query_subset": 300, "episodes": 100}


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
        lines.append(f"  model card      {RunFolder(self.run).card}")
        return lines

    def to_json(self) -> dict:
        """What `retrieval quickstart --json` prints."""
        return {
            "out": str(self.out), "run": str(self.run),
            "fewshot_run": str(self.fewshot_run) if self.fewshot_run else None,
            "index": str(self.index), "report": str(self.report), "card": str(RunFolder(self.run).card),
            "metrics": self.metrics,
            "fewshot": [{"classes": FEWSHOT_CLASSES, **r.to_dict()} for r in self.fewshot],
            "queries": [r.to_json() for r in self.queries],
            "seconds": {k: round(v, 3) for k, v in self.seconds.items()},
        }


def _quickstart_train(config_name: str, run: Path, overrides: list[str], force: bool, device, root) -> Path:
    path = shipped_config(config_name)
    cfg = load_config(path, overrides)
    folder = RunFolder(run)
    if not force and folder.finished(cfg.train.epochs):
        logger.info(f"[train] reusing the finished run in {run} (--force to retrain)")
        return run
    resume = not force and folder.state.is_file()
    logger.info(f"[train] {'resuming' if resume else 'training'} {config_name} -> {run}")
    return train(path, run, device=device, resume=resume, overrides=overrides, data_root=root, overwrite=force)


def _quickstart_index(run: Path, folder: Path, subset: int | None, force: bool, compute: Compute, root) -> Path:
    fingerprint = load_checkpoint(run).fingerprint
    if not force and IndexFolder(folder).holds_index():
        try:
            if read_index_meta(folder)["tower"]["fingerprint"] == fingerprint:
                logger.info(f"[index] reusing {folder} (built by the same tower)")
                return folder
        except (RetrievalError, KeyError, TypeError):
            pass
    logger.info(f"[index] embedding mnist:train and building a Flat index -> {folder}")
    build_index(run, Selection(["mnist:train"], root=root, subset=subset), folder, compute=compute)
    return folder


def _card_with_test_figures(run: Path, evaluation: "Evaluation") -> None:
    """Rewrite the run's model card with the test figures just measured."""
    m = evaluation.metrics.to_json()
    ds = evaluation.queries.dataset
    test = {**{k: m.get(k) for k in ("recall@1", "precision@1", "map@r", "r_precision", "per_class")},
            "queries": f"{ds.spec} ({len(ds):,} images" + "".join(f", {k} {v}" for k, v in (ds.filters or {}).items())
                       + ")",
            "references": f"an index of mnist:train ({m['n_references']:,} images)"}
    write_run_card(run, test=test)


class _Laps:
    """Seconds each step took, by name."""

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self._t = time.perf_counter()

    def __call__(self, name: str) -> None:
        t = time.perf_counter()
        self.seconds[name] = t - self._t
        self._t = t


def _quickstart_fewshot(out: Path, overrides: list[str], force: bool, compute: Compute, root: Path, tiny: bool):
    """Train mnist-fewshot and run its 4-way episodes on digits it never saw -> (run folder, results)."""
    run = _quickstart_train("mnist-fewshot", out / "runs" / "mnist-fewshot", overrides, force, compute.device,
                            root)
    logger.info(f"[fewshot] 4-way episodes on mnist:test digits {','.join(FEWSHOT_CLASSES)}")
    return run, fewshot(run, Selection("mnist:test", root=root, classes=FEWSHOT_CLASSES), ways=4, shots=[1, 5],
                        queries=15, episodes=TINY["episodes"] if tiny else 1000, seed=0,
                        compute=Compute(compute.device, 256, compute.precision)).results


def _training_overrides(tiny: bool, precision: str) -> list[str]:
    overrides = []
    if tiny:
        overrides = [f"data.subset={TINY['train_subset']}", f"data.val_size={TINY['val_size']}",
                     f"train.epochs={TINY['epochs']}"]
    if precision != "auto":  # else the configs' own train.precision (auto)
        overrides.append(f"train.precision={precision}")
    return overrides


def quickstart(out: str | os.PathLike = "quickstart", *, force: bool = False, tiny: bool = False,
               fewshot_step: bool = True, device="auto", root=None,
               precision: str | None = "auto") -> QuickstartResult:
    """Fetch MNIST, train mnist-default, index mnist:train, evaluate mnist:test with a report, train mnist-fewshot
    and run its episodes, answer a few queries: every step into `out` (runs/, indexes/, reports/), each reusing
    what an earlier run left there. `precision` (auto, fp32, bf16): the towers' arithmetic in every step.
    A straight sequence of the steps, each timed."""
    out, root = Path(out), data_root(root)
    compute = Compute(str(resolve_device(device)), precision=check_precision(precision))
    lap = _Laps()
    logger.info(f"[data] MNIST in {root}")
    fetch_dataset("mnist", root)
    lap("fetch")

    overrides = _training_overrides(tiny, compute.precision)
    run = _quickstart_train("mnist-default", out / "runs" / "mnist-default", overrides, force, compute.device, root)
    lap("train")
    index = _quickstart_index(run, out / "indexes" / "mnist-default-train", TINY["train_subset"] if tiny else None,
                              force, compute, root)
    lap("index")

    logger.info("[evaluate] mnist:test against the index")
    report = out / "reports" / "mnist-default-test"
    evaluation = evaluate(index, Selection("mnist:test", root=root, subset=TINY["query_subset"] if tiny else None),
                          (1, 2, 4, 8, 16), report=report, compute=compute)
    _card_with_test_figures(run, evaluation)
    lap("evaluate")

    fewshot_run, fewshot_results = None, []
    if fewshot_step:
        fewshot_run, fewshot_results = _quickstart_fewshot(out, overrides, force, compute, root, tiny)
        lap("fewshot")
    else:
        logger.info("[fewshot] skipped; to run it: retrieval train --config mnist-fewshot && "
                    "retrieval fewshot --checkpoint runs/mnist-fewshot --data mnist:test --classes 0,4,5,8 "
                    "--ways 4 --shots 1,5")

    logger.info(f"[query] {', '.join(QUICKSTART_QUERIES)}")
    answers = query(index, QUICKSTART_QUERIES, k=5, root=root, compute=compute)
    lap("query")
    return QuickstartResult(out=out, run=run, index=index, report=report, fewshot_run=fewshot_run,
                            metrics=evaluation.metrics.to_json(), fewshot=fewshot_results, queries=answers.results,
                            seconds=lap.seconds)
