"""Figures of a tower or an index: retrieval metrics, the "unknown" thresholds, pair verification, few-shot
episodes."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from retrieval.checkpoint import Checkpoint, load_checkpoint
from retrieval.compute import Compute
from retrieval.data.selection import Selection
from retrieval.data.specs import ImageDataset
from retrieval.errors import UsageError
from retrieval.fewshot import FewShotResult, check_fewshot_settings, check_method, evaluate_fewshot, pixel_embeddings
from retrieval.gate import acceptance_threshold as gate_acceptance, digit_scores, separating_threshold
from retrieval.index import IndexFolder, load_index_tower, update_index_meta
from retrieval.knn import nearest_neighbors
from retrieval.metrics import DEFAULT_KS, RetrievalMetrics, retrieval_metrics
from retrieval.pairs import (
    DEFAULT_ACCEPT, Calibration, Verification, acceptance_threshold, balanced_pairs, calibrate_threshold, verify_pairs
)
from retrieval.reports import check_report_target, write_report
from retrieval.workflows.common import now
from retrieval.workflows.querying import IndexQueries, index_search, load_index_queries

logger = logging.getLogger(__name__)

PIXELS = "pixels"  # fewshot's checkpoint argument for the raw-pixel baseline


@dataclass
class Evaluation:
    metrics: RetrievalMetrics
    queries: IndexQueries
    payload: dict  # what `retrieval evaluate --json` prints and the report's metrics.json holds
    context: dict  # how the report describes the index, tower and queries
    report_files: list[Path] = field(default_factory=list)


def evaluate(
    index: str | os.PathLike,
    queries: Selection | str,
    ks: Sequence[int] = DEFAULT_KS,
    *,
    report: str | os.PathLike | None = None,
    compute: Compute | None = None,
    checkpoint=None,
) -> Evaluation:
    """Retrieval metrics of the images of `queries` (a single-spec Selection, or a spec) against the index in
    `index` (see retrieval.metrics), and a report folder in `report` (replaced atomically) when given.

    Queries whose own image is in the index are evaluated leave-one-out; queries of classes the index lacks have
    R = 0 and are left out of the averages (counted as lone). Exact (Flat) indexes are searched exactly over their
    vectors, approximate ones with their own search, as their users get it."""
    queries = Selection.of(queries)
    if report is not None:
        check_report_target(report)
    iq = load_index_queries(index, queries, compute=compute, checkpoint=checkpoint)
    vectors = iq.index.flat_vectors()
    metrics = retrieval_metrics(
        iq.embeddings, iq.labels, vectors, iq.index.labels, search=None if vectors is not None else iq.index.search,
        reference_ids=iq.index.ids, query_self_ids=iq.self_ids, ks=ks, classes=iq.classes, progress=True,
    )
    if iq.missing_classes:
        logger.info(f"note: the index has no images of class(es) {', '.join(iq.missing_classes)}: "
                    f"{metrics.n_lone:,} lone queries are left out of the averages")
    payload = {**metrics.to_json(), "index": str(index), "queries": queries.spec, "filters": iq.dataset.filters,
               "left_out_own_entries": int((iq.self_ids >= 0).sum())}
    result = Evaluation(metrics, iq, payload, _report_context(index, iq))
    if report is not None:
        result.report_files = write_report(report, metrics, iq, result.context, payload=payload,
                                           root=queries.data_root, seed=queries.seed)
        logger.info(f"wrote {report}/ ({', '.join(p.name for p in result.report_files)})")
    return result


def _report_context(index, iq: IndexQueries) -> dict:
    """How the report describes the index, tower and queries."""
    meta = iq.index.meta
    tower = meta.get("tower") or {}
    return {
        "index": str(index),
        "index_description": f"{meta['factory']}, metric {meta['metric']}, {len(iq.index):,} vectors, "
                             f"{len(iq.index.classes)} classes",
        "tower": f"{tower.get('name')} ({tower.get('fingerprint', '')[:12]}) {tower.get('checkpoint', '')}",
        "queries": iq.describe(),
    }


def calibrate(
    index: str | os.PathLike,
    queries: Selection | str,
    *,
    store: bool = True,
    compute: Compute | None = None,
    checkpoint=None,
    accept: float | None = None,
    gate: bool = True,
    non_digits: str | None = None,
    distance_accept: float | None = None,
) -> tuple[Calibration, dict]:
    """Embed `queries` with the index's tower, calibrate the "unknown" threshold on nearest neighbours (own entries
    left out), and store it in the index metadata (unless store=False). Returns the calibration and the record.

    A tower with a digit-or-not gate (retrieval.gate; `gate=False` ignores it) gets its threshold here too, in
    record["gate"]: answering `accept` (default 0.99) of the in-distribution queries, or, with `non_digits` (a
    data spec of pictures that are no digit), the threshold that best separates the two (most digits answered
    minus non-digits answered). The gate then says "not a digit"; the distance threshold is left for "a digit of
    a class this index lacks": set by the rules below when some queries are of such classes, else only when
    `distance_accept` asks for it (the share of in-distribution queries it answers), since refusing far-off digits
    by distance is what refused badly corrupted digits before the gate (benchmarks/README.md). `compute`'s
    precision: the queries' arithmetic (auto: the index's, as for `query`).

    The rule: with `accept` given, the threshold answers that fraction of the in-distribution queries (those of the
    index's classes; pairs.acceptance_threshold). Without it: when some queries are of classes the index lacks
    (negatives), the threshold maximising F1 of "answered and right" (pairs.calibrate_threshold); when none are,
    the default acceptance rate pairs.DEFAULT_ACCEPT (0.99) of the queries, so that no hand-picked negatives
    are needed (F1 alone would then answer almost everything)."""
    queries = Selection.of(queries)
    iq = load_index_queries(index, queries, compute=compute, checkpoint=checkpoint)
    dist, ids = nearest_neighbors(iq.embeddings, index_search(iq.index), 1, iq.self_ids)
    nearest = dist[:, 0]
    correct = iq.index.labels_of(ids[:, 0]) == iq.labels
    outside = iq.labels >= len(iq.index.classes)
    cal, rule = _distance_threshold(nearest, correct, outside, accept)
    gate_record = None
    if gate:
        gate_record = _calibrate_gate(iq, outside, accept, non_digits and Selection(non_digits, root=queries.root),
                                      Compute.of(compute).on_device(), checkpoint)
    if gate_record is not None and not outside.any():
        cal, rule = _distance_threshold_beside_gate(nearest, correct, distance_accept)
    record = {**cal.to_json(), "rule": rule, "queries": queries.spec, "filters": iq.dataset.filters,
              **_counts(iq, nearest, outside, cal), **({"gate": gate_record} if gate_record is not None else {}),
              "created": now()}
    if store:
        update_index_meta(os.fspath(index), calibration=record)
        logger.info(f"stored in {IndexFolder(index).meta_path}")
    else:
        logger.info("not stored (dry run)")
    return cal, record


def _counts(iq: IndexQueries, nearest: np.ndarray, outside: np.ndarray, cal: Calibration) -> dict:
    return {"classes_not_in_index": iq.missing_classes,
            "rejected_not_in_index": int((nearest[outside] > cal.max_distance).sum()),
            "queries_not_in_index": int(outside.sum()), "left_out_own_entries": int((iq.self_ids >= 0).sum()),
            "index_count": len(iq.index)}


def _distance_threshold(nearest: np.ndarray, correct: np.ndarray, outside: np.ndarray,
                        accept: float | None) -> tuple[Calibration, str]:
    """calibrate's rule for the distance threshold (see its docstring) -> the calibration and the rule's name."""
    if accept is None and outside.any():
        return calibrate_threshold(nearest, correct), "max-f1"
    rate = DEFAULT_ACCEPT if accept is None else float(accept)
    inside = ~outside
    base = acceptance_threshold(nearest[inside], correct[inside], rate)
    if outside.any():  # report over all queries, as the F1 rule does
        answered = nearest <= base.max_distance
        tp, total = int((answered & correct).sum()), int(correct.sum())
        n = int(answered.sum())
        base = Calibration(base.max_distance, 2.0 * tp / (n + total) if n + total else 0.0, tp / n if n else 0.0,
                           tp / total if total else 0.0, n, int(np.isfinite(nearest).sum()), total)
    return base, f"accept {rate:g} of in-distribution queries"


def _distance_threshold_beside_gate(nearest: np.ndarray, correct: np.ndarray,
                                    distance_accept: float | None) -> tuple[Calibration, str]:
    """With a gate and no queries of other classes: no distance threshold unless `distance_accept` asks for one."""
    if distance_accept is None:
        every = acceptance_threshold(nearest, correct, 1.0)  # what answering every query scores
        return (Calibration(None, every.f1, every.precision, every.recall, every.n_answered, every.n_queries,
                            every.n_correct), "not set: the gate refuses non-digits (distance_accept sets one)")
    return (acceptance_threshold(nearest, correct, float(distance_accept)),
            f"accept {float(distance_accept):g} of in-distribution queries")


def _calibrate_gate(iq: IndexQueries, outside: np.ndarray, accept: float | None, non_digits: Selection | None,
                    compute: Compute, checkpoint) -> dict | None:
    """The gate threshold of calibrate (None for a tower without a gate)."""
    ckpt = load_index_tower(iq.index, device=compute.device, checkpoint=checkpoint)
    scores = digit_scores(ckpt.tower, iq.dataset.images, iq.embeddings, device=compute.device)
    if scores is None:
        if non_digits:
            raise UsageError("`non_digits` calibrates a digit-or-not gate, and this index's tower has none "
                             "(retrieval gate train adds one)")
        return None
    inside = scores[~outside]
    out: dict = {}
    if non_digits:
        refused_scores = digit_scores(ckpt.tower, non_digits.load_one().images, device=compute.device)
        threshold = separating_threshold(inside, refused_scores)
        out.update(rule=f"most digits answered minus non-digits answered ({non_digits.spec})",
                   non_digits=non_digits.spec, non_digit_queries=int(len(refused_scores)),
                   refused_non_digits=float((refused_scores < threshold).mean()))
    else:
        rate = DEFAULT_ACCEPT if accept is None else float(accept)
        threshold = gate_acceptance(inside, rate)
        out["rule"] = f"accept {rate:g} of in-distribution queries"
    return {"threshold": threshold, **out, "answered": float((inside >= threshold).mean()),
            "in_distribution_queries": int(len(inside))}


@dataclass
class PairEvaluation:
    verification: Verification
    checkpoint: Checkpoint
    dataset: ImageDataset


def evaluate_pairs(
    checkpoint: str | os.PathLike,
    data: Selection | str,
    pairs_per_class: int = 500,
    seed: int = 0,
    *,
    compute: Compute | None = None,
) -> PairEvaluation:
    """Balanced same/different pairs (drawn with `seed`) from the images of `data` (a single-spec Selection, or a
    spec of which the seeded subset uses `seed` too), embedded by the checkpoint's tower (in `compute`'s precision:
    auto, fp32 or bf16), verified by the pair head (if the tower was trained with one) or by distance."""
    data = Selection.of(data, seed=seed)
    compute = Compute.of(compute).pinned()
    ckpt = load_checkpoint(checkpoint, device=compute.device)
    ds = data.load_one()
    pairs = balanced_pairs(ds.labels.numpy(), pairs_per_class, seed)
    used, inverse = np.unique(np.r_[pairs.first, pairs.second], return_inverse=True)
    emb = compute.embed(ckpt.tower, ds.images[torch.from_numpy(used)])
    a, b = emb[inverse[: len(pairs)]], emb[inverse[len(pairs):]]
    result = verify_pairs(a, b, pairs.same, ckpt.head, pairs_per_class=pairs_per_class, seed=seed)
    return PairEvaluation(result, ckpt, ds)


@dataclass
class FewShotRun:
    results: list[FewShotResult]
    embeddings_of: str  # "raw pixels" or the checkpoint path
    dataset: ImageDataset


def fewshot(
    checkpoint: str | os.PathLike,
    data: Selection | str,
    *,
    ways: int = 5,
    shots: int | Sequence[int] = (1, 5),
    queries: int = 15,
    episodes: int = 1000,
    method: str = "prototype",
    k: int = 1,
    seed: int = 0,
    compute: Compute | None = None,
) -> FewShotRun:
    """N-way K-shot episodes (see retrieval.fewshot) over the images of `data` (a single-spec Selection, or a
    spec), embedded once by the checkpoint's tower (in `compute`'s precision: auto, fp32 or bf16; batches of
    1024 unless it names a batch size), or by raw pixels when checkpoint is "pixels"."""
    compute = Compute.of(compute)
    shot_counts = [shots] if isinstance(shots, int) else list(shots)
    check_method(method, k, ways, shot_counts)  # before loading anything
    ckpt = None
    if str(checkpoint) != PIXELS:
        compute = compute.pinned()
        ckpt = load_checkpoint(checkpoint, device=compute.device)
    ds = Selection.of(data).load_one()
    # fail on impossible settings before spending time on embeddings
    check_fewshot_settings(ds.labels.numpy(), ways, shot_counts, queries, episodes, method, k, ds.classes)
    if ckpt is None:
        embeddings, what = pixel_embeddings(ds.images), "raw pixels"
    else:
        batch = 1024 if compute.batch_size is None else compute.batch_size
        embeddings = Compute(compute.device, batch, compute.precision).embed(ckpt.tower, ds.images)
        what = str(ckpt.path)
    results = evaluate_fewshot(embeddings, ds.labels, ways, shot_counts, queries=queries, episodes=episodes,
                               method=method, seed=seed, k=k, class_names=ds.classes)
    return FewShotRun(results, what, ds)
