"""`retrieval evaluate`, `retrieval evaluate-pairs`, `retrieval calibrate`: how good is a tower and its index."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from retrieval.cli import app
from retrieval.cli.common import (
    BatchSizeOption, ClassesOption, DataRootOption, DeviceOption, ExcludeOption, IndexCheckpointOption,
    PrecisionOption, SeedOption, SpecHelp, SubsetOption,
    print_json,
)
from retrieval.data import SPEC_HELP
from retrieval.errors import UsageError

IndexOption = typer.Option(..., "--index", help="Index folder (from `retrieval index build`).")
QueriesOption = typer.Option(
    ..., "--queries",
    help=f"Query images, as a dataset spec ({SPEC_HELP}). Labels are matched to the index's classes by name.",
)

def _k_list(text: str) -> list[int]:
    try:
        ks = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise UsageError(f"--k expects comma-separated positive integers like 1,2,4,8,16; got {text!r}") from None
    if not ks or min(ks) <= 0:
        raise UsageError(f"--k expects comma-separated positive integers like 1,2,4,8,16; got {text!r}")
    return sorted(set(ks))


@app.command("evaluate")
def evaluate(
    index: Path = IndexOption,
    queries: str = QueriesOption,
    k: str = typer.Option("1,2,4,8,16", "--k", help="The k of recall@k and precision@k, comma-separated."),
    json_out: bool = typer.Option(
        False, "--json",
        help='Print JSON: {"n_queries", "n_references", "recall@1", ..., "precision@1", ..., "map@r", '
             '"r_precision", "per_class": {...}, ...}.',
    ),
    report: Optional[Path] = typer.Option(
        None, "--report",
        help="Also write a report folder: metrics.json, summary.md, recall_at_k.png, confusion_matrix.png, "
             "failures.png (worst failures beside their neighbours), embeddings_pca.png. A previous report there "
             "is replaced.",
    ),
    classes: Optional[str] = ClassesOption,
    exclude: Optional[str] = ExcludeOption,
    subset: Optional[int] = SubsetOption,
    seed: int = SeedOption,
    root: Optional[Path] = DataRootOption,
    checkpoint: Optional[Path] = IndexCheckpointOption,
    batch_size: Optional[int] = BatchSizeOption,
    device: str = DeviceOption,
    precision: str = PrecisionOption,
) -> None:
    """Retrieval metrics of query images against an index: embed the queries with the index's tower, find their nearest indexed images, score the labels.

    Neighbours: the indexed images ordered by distance (ties by id). A query whose own image is in the index (same source, e.g. --queries equal to an indexed spec) has that entry left out (leave-one-out). R = number of indexed images with the query's label (not counting its own entry).

    recall@k: fraction of queries with at least one image of their label among their k nearest (Recall@K of the metric-learning literature).

    precision@k: mean fraction of the k nearest that have the query's label.

    MAP@R: mean over queries of (1/R) x the sum, over the ranks i <= R holding the query's label, of precision@i. R-precision: mean fraction of the R nearest with the query's label. Both as pytorch-metric-learning's AccuracyCalculator defines them, and equal to its values.

    Per class: 1-NN accuracy (the nearest neighbour has the query's label), MAP@R, R-precision; and the confusion matrix of the nearest neighbour's class. Queries of classes the index lacks (R = 0) are left out of the averages and counted as lone.

    Exact (Flat) indexes are searched exactly over their stored vectors; approximate ones (HNSW, IVF, PQ) with their own search, as their users get it.

    Example: retrieval evaluate --index indexes/run-mnist-train --queries mnist:test --report reports/mnist-test
    """
    from retrieval.workflows import Compute, Selection, evaluate as run

    result = run(index, Selection(queries, root, classes, exclude, subset, seed), _k_list(k), report=report,
                 compute=Compute(device, batch_size, precision), checkpoint=checkpoint)
    if json_out:
        print_json(result.payload)
        return
    metrics, context = result.metrics, result.context
    print(f"index       {index}  ({context['index_description']})")
    print(f"queries     {context['queries']}")
    if metrics.n_lone:
        print(f"lone        {metrics.n_lone:,} queries without another indexed image of their class (left out)")
    width = max(7, *(len(f"{x:.4f}") for x in metrics.recall.values()))
    print(f"{'k':<12}" + "".join(f"{kk:>{width + 2}}" for kk in metrics.ks))
    print(f"{'recall@k':<12}" + "".join(f"{metrics.recall[kk]:>{width + 2}.4f}" for kk in metrics.ks))
    print(f"{'precision@k':<12}" + "".join(f"{metrics.precision[kk]:>{width + 2}.4f}" for kk in metrics.ks))
    print(f"{'MAP@R':<12}{metrics.map_at_r:>{width + 2}.4f}")
    print(f"{'R-precision':<12}{metrics.r_precision:>{width + 2}.4f}")
    if metrics.per_class:
        name_width = max(5, *(len(c) for c in metrics.per_class))
        print(f"per class:\n  {'class':<{name_width}}  {'queries':>8}  {'1-NN acc':>8}  {'MAP@R':>7}  {'R-prec':>7}")
        for name, row in metrics.per_class.items():
            print(f"  {name:<{name_width}}  {row['queries']:>8,}  {row['nn_accuracy']:>8.4f}  {row['map@r']:>7.4f}"
                  f"  {row['r_precision']:>7.4f}")


@app.command("evaluate-pairs")
def evaluate_pairs(
    checkpoint: Path = typer.Option(
        ..., "--checkpoint", help="A training run folder (its best, else last checkpoint) or a .safetensors file."
    ),
    data: str = typer.Option(..., "--data", help=SpecHelp),
    pairs_per_class: int = typer.Option(500, "--pairs-per-class", min=1,
                                        help="Same pairs per class; as many different pairs."),
    seed: int = typer.Option(0, "--seed", help="Seed of the pair draw (and of --subset)."),
    json_out: bool = typer.Option(
        False, "--json",
        help='Print JSON: {"pairs", "same_pairs", "different_pairs", "score", "rule", "threshold", "accuracy", '
             '"roc_auc", "pairs_per_class", "seed"}.',
    ),
    classes: Optional[str] = ClassesOption,
    exclude: Optional[str] = ExcludeOption,
    subset: Optional[int] = SubsetOption,
    root: Optional[Path] = DataRootOption,
    batch_size: Optional[int] = BatchSizeOption,
    device: str = DeviceOption,
    precision: str = PrecisionOption,
) -> None:
    """Pair verification, the original Siamese task: are two images of the same class?

    Pairs are drawn as in the original write-up (BalancedMNISTPair): for each class and j < --pairs-per-class, a same pair (the j-th image of the class and the one a random 1..100 places later) and a different pair (the j-th image and the j-th image of a random other class). The draw depends only on --seed.

    A checkpoint trained with the pair head scores a pair by the head's P(same); any other by the distance between the two embeddings. Reported: ROC AUC (rank-based, ties count half), and the accuracy at the best threshold with that threshold.
    """
    from retrieval.data.specs import filters_text
    from retrieval.workflows import Compute, Selection, evaluate_pairs as run

    evaluation = run(checkpoint, Selection(data, root, classes, exclude, subset, seed), pairs_per_class, seed,
                     compute=Compute(device, batch_size, precision))
    result, ckpt, ds = evaluation.verification, evaluation.checkpoint, evaluation.dataset
    if json_out:
        print_json(result.to_json())
        return
    print(f"checkpoint  {ckpt.path}")
    print(f"data        {ds.spec}" + (f" ({filters_text(ds.filters)})" if ds.filters else "") + f": {len(ds):,} images")
    print(f"pairs       {result.pairs:,} ({result.same_pairs:,} same, {result.different_pairs:,} different; "
          f"{pairs_per_class} per class, seed {seed})")
    print(f"scored by   {result.score}")
    print(f"ROC AUC     {result.roc_auc:.4f}")
    print(f"accuracy    {result.accuracy:.4f}  ({result.rule}, threshold {result.threshold:.4f})")


@app.command("calibrate")
def calibrate(
    index: Path = IndexOption,
    queries: str = QueriesOption,
    dry_run: bool = typer.Option(False, "--dry-run", help="Measure and print, but do not store the threshold."),
    json_out: bool = typer.Option(False, "--json", help="Print the stored calibration record as JSON."),
    accept: Optional[float] = typer.Option(
        None, "--accept", help="Answer this fraction of the in-distribution queries (e.g. 0.99). Default: 0.99 when "
        "no query is of a class the index lacks, else the threshold of best F1."),
    non_digits: Optional[str] = typer.Option(
        None, "--non-digits", help="A data spec of pictures that are no digit (e.g. folder:DIR): a tower with a "
        "digit-or-not gate gets the gate threshold that best separates them from the queries, instead of --accept's."),
    distance_accept: Optional[float] = typer.Option(
        None, "--distance-accept", help="With a gated tower and no query of a class the index lacks: also set a "
        "distance threshold answering this fraction of the queries (default: none, the gate refuses non-digits)."),
    classes: Optional[str] = ClassesOption,
    exclude: Optional[str] = ExcludeOption,
    subset: Optional[int] = SubsetOption,
    seed: int = SeedOption,
    root: Optional[Path] = DataRootOption,
    checkpoint: Optional[Path] = IndexCheckpointOption,
    batch_size: Optional[int] = BatchSizeOption,
    device: str = DeviceOption,
    precision: str = PrecisionOption,
) -> None:
    """Choose the distance beyond which `retrieval query` answers "unknown", and store it in the index.

    For each query image, its nearest indexed image (its own entry left out) is either of its class (right) or not. Without negatives (every query of a class the index holds), the default threshold answers 99% of the queries (--accept sets the rate): farther than nearly every real query means "unknown". With queries of classes the index lacks (e.g. --queries mnist:test on an index built with --exclude), the threshold t maximises F1 of "answered and right", where a query is answered when its nearest neighbour is within t: precision = right answered / answered, recall = right answered / right; --accept then applies the acceptance rule instead.

    A tower with a digit-or-not gate (`retrieval gate train`) gets its gate threshold as well: answering --accept (0.99) of the queries, or best separating them from --non-digits. Its "unknown" then says "not a digit"; the distance threshold ("far from every class") is set only with queries of classes the index lacks, or with --distance-accept.

    Stored as meta.json "calibration" {"max_distance", "f1", "queries", "gate": {"threshold", ...}, "created", ...}; `retrieval query --max-distance` overrides the distance.
    """
    from retrieval.workflows import Compute, Selection, calibrate as run

    cal, record = run(index, Selection(queries, root, classes, exclude, subset, seed), store=not dry_run,
                      compute=Compute(device, batch_size, precision), checkpoint=checkpoint, accept=accept,
                      non_digits=non_digits, distance_accept=distance_accept)
    if json_out:
        print_json(record)
    else:
        print(f"index         {index}")
        print(f"queries       {queries}: {cal.n_queries:,} images, {cal.n_correct:,} with a nearest neighbour of "
              "their class")
        if record["queries_not_in_index"]:
            print(f"unknown       {record['queries_not_in_index']:,} queries of classes the index lacks "
                  f"({', '.join(record['classes_not_in_index'])}); {record['rejected_not_in_index']:,} of them "
                  "answered unknown at this threshold")
        print(f"rule          {record['rule']}")
        print("max distance  " + ("not set" if cal.max_distance is None else f"{cal.max_distance:.4f}"))
        if record.get("gate"):
            gate = record["gate"]
            print(f"gate          digit score >= {gate['threshold']:.4f} ({gate['rule']}): "
                  f"{gate['answered']:.4f} of in-distribution queries answered"
                  + (f", {gate['refused_non_digits']:.4f} of non-digits refused" if "refused_non_digits" in gate
                     else ""))
        print(f"F1            {cal.f1:.4f}  (precision {cal.precision:.4f}, recall {cal.recall:.4f}; "
              f"{cal.n_answered:,} of {cal.n_queries:,} answered)")
