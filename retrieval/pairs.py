"""Pair verification (the original Siamese task) and the distance threshold that turns lookups into "unknown".

Pairs are drawn as in the original write-up's BalancedMNISTPair: for every class c and j < pairs_per_class, one
same pair (the j-th image of c, the image a random 1..100 places later in c) and one different pair (the j-th
image of c, the j-th image of a random other class). The write-up draws offsets 0..100, so 1 in 101 of its
"same" pairs is an image with itself; we start at 1. Positions wrap around classes smaller than that.

A pair is scored by the pair head's P(same) when the checkpoint has one, else by the embedding distance; we
report ROC AUC (rank-based, ties averaged) and the accuracy at the best threshold.

Calibration picks the nearest-neighbour distance threshold t maximising the F1 score of "the nearest neighbour
has the query's label", where a query counts as answered only when its nearest neighbour is within t. Queries of
classes the index lacks are never right, so including some teaches t where "unknown" should start.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch

from retrieval.errors import RetrievalError, UsageError

MAX_OFFSET = 100  # the write-up's `random.randint(0, 100)` distance between the two images of a same pair


@dataclass
class Pairs:
    """Positions into a dataset: pair i is (first[i], second[i]); same[i] says whether the labels agree."""

    first: np.ndarray
    second: np.ndarray
    same: np.ndarray

    def __len__(self) -> int:
        return len(self.same)


def balanced_pairs(labels, pairs_per_class: int = 500, seed: int = 0) -> Pairs:
    """pairs_per_class same and pairs_per_class different pairs per class (see the module docstring)."""
    labels = np.asarray(labels, dtype=np.int64)
    if pairs_per_class <= 0:
        raise UsageError(f"`pairs_per_class` must be positive, got {pairs_per_class}")
    present = np.unique(labels)
    if len(present) < 2:
        raise RetrievalError(f"pair verification needs at least 2 classes, the data has {len(present)}")
    members = {int(c): np.flatnonzero(labels == c) for c in present}
    small = [str(c) for c, m in members.items() if len(m) < 2]
    if small:
        raise RetrievalError(f"pair verification needs at least 2 images per class; class(es) {', '.join(small)} have 1")
    rng = np.random.default_rng(seed)
    j = np.arange(pairs_per_class)
    first, second, same = [], [], []
    for c in present.tolist():
        own = members[c]
        offsets = rng.integers(1, MAX_OFFSET + 1, size=pairs_per_class)
        others = rng.integers(0, len(present) - 1, size=pairs_per_class)
        others = present[others + (others >= np.searchsorted(present, c))]  # any class but c, uniformly
        anchor = own[j % len(own)]
        first += [anchor, anchor]
        second.append(own[(j + offsets) % len(own)])
        second.append(np.array([members[int(o)][i % len(members[int(o)])] for i, o in zip(j, others)], np.int64))
        same += [np.ones(pairs_per_class, bool), np.zeros(pairs_per_class, bool)]
    return Pairs(np.concatenate(first), np.concatenate(second), np.concatenate(same))


def _binary(scores, positive) -> tuple[np.ndarray, np.ndarray]:
    scores = np.asarray(scores, dtype=np.float64)
    positive = np.asarray(positive, dtype=bool)
    if scores.shape != positive.shape or scores.ndim != 1:
        raise ValueError(f"scores {scores.shape} and labels {positive.shape} must be 1-d and of one length")
    return scores, positive


def roc_auc(scores, positive) -> float:
    """Area under the ROC curve of `scores` (higher = more likely positive), ties counted half (scikit-learn's
    roc_auc_score: the Mann-Whitney U statistic over n_pos * n_neg)."""
    from sklearn.metrics import roc_auc_score

    scores, positive = _binary(scores, positive)
    n_pos = int(positive.sum())
    if n_pos == 0 or n_pos == len(positive):
        raise RetrievalError("ROC AUC needs both same and different pairs")
    return float(roc_auc_score(positive, scores))


def best_threshold(scores, positive) -> tuple[float, float]:
    """(accuracy, threshold) of the rule "positive when score >= threshold" that classifies most pairs right.

    Every distinct score is a candidate cut (scikit-learn's roc_curve, all points kept); ties in accuracy go to the
    stricter cut. Thresholds lie halfway between consecutive distinct scores (or just beyond the extremes)."""
    from sklearn.metrics import roc_curve

    scores, positive = _binary(scores, positive)
    if len(scores) == 0:
        raise RetrievalError("no pairs to score")
    n_pos = int(positive.sum())
    n_neg = len(positive) - n_pos
    values, counts = np.unique(scores, return_counts=True)
    values = values[::-1]  # distinct scores, descending: the cuts roc_curve walks through
    if n_pos == 0 or n_neg == 0:  # one class only (no ROC curve): right = accepted, or right = rejected
        accepted = np.r_[0, np.cumsum(counts[::-1])]
        correct = accepted if n_neg == 0 else len(scores) - accepted
    else:
        fpr, tpr, _ = roc_curve(positive, scores, drop_intermediate=False)  # first point: accept nothing
        correct = np.rint(tpr * n_pos + (1.0 - fpr) * n_neg).astype(np.int64)  # true positives + true negatives
    best = int(np.argmax(correct))
    if best == 0:
        threshold = values[0] + max(1e-6, abs(values[0]) * 1e-6)
    elif best == len(values):
        threshold = values[-1]
    else:
        threshold = (values[best - 1] + values[best]) / 2.0
    return float(correct[best] / len(scores)), float(threshold)


@dataclass
class Verification:
    pairs: int
    same_pairs: int
    different_pairs: int
    score: str  # "pair head" or "distance"
    rule: str
    threshold: float
    accuracy: float
    roc_auc: float
    pairs_per_class: int
    seed: int

    def to_json(self) -> dict:
        return asdict(self)


def verify_pairs(first_emb, second_emb, same, head: torch.nn.Module | None = None, *,
                 pairs_per_class: int = 0, seed: int = 0) -> Verification:
    """Score embedding pairs (pair head P(same) if given, else Euclidean distance) and measure verification."""
    a = torch.as_tensor(np.asarray(first_emb, dtype=np.float32))
    b = torch.as_tensor(np.asarray(second_emb, dtype=np.float32))
    same = np.asarray(same, dtype=bool)
    if head is not None:
        device = next(head.parameters()).device
        with torch.inference_mode():
            prob = head.same_probability(a.to(device), b.to(device)).float().cpu().numpy().astype(np.float64)
        accuracy, threshold = best_threshold(prob, same)
        auc = roc_auc(prob, same)
        score, rule = "pair head", "same when P(same) >= threshold"
    else:
        dist = torch.linalg.vector_norm(a - b, dim=1).numpy().astype(np.float64)
        accuracy, neg_threshold = best_threshold(-dist, same)
        auc = roc_auc(-dist, same)
        threshold = -neg_threshold
        score, rule = "distance", "same when distance <= threshold"
    return Verification(
        pairs=len(same), same_pairs=int(same.sum()), different_pairs=int((~same).sum()), score=score, rule=rule,
        threshold=threshold, accuracy=accuracy, roc_auc=auc, pairs_per_class=pairs_per_class, seed=seed,
    )


# -- calibration of the "unknown" threshold ------------------------------------------------------------------------
@dataclass
class Calibration:
    max_distance: float
    f1: float
    precision: float  # of the answered queries, the fraction whose nearest neighbour has their label
    recall: float  # of the queries whose nearest neighbour has their label, the fraction answered
    n_answered: int
    n_queries: int
    n_correct: int  # queries whose nearest neighbour has their label (at any distance)

    def to_json(self) -> dict:
        return asdict(self)


DEFAULT_ACCEPT = 0.99  # calibrate's default rule without out-of-index queries: answer 99% of in-distribution ones


def _answered_queries(nn_distances, nn_correct) -> tuple[np.ndarray, np.ndarray]:
    """Nearest-neighbour distances and rightness of the queries that have a neighbour (finite distance)."""
    d = np.asarray(nn_distances, dtype=np.float64)
    ok = np.asarray(nn_correct, dtype=bool)
    keep = np.isfinite(d)
    if not keep.any():
        raise RetrievalError("no query has a nearest neighbour; nothing to calibrate")
    return d[keep], ok[keep]


def acceptance_threshold(nn_distances, nn_correct, accept: float = DEFAULT_ACCEPT) -> Calibration:
    """The threshold that answers the fraction `accept` of the queries (all taken as in-distribution): halfway
    between the ceil(accept * n)-th smallest nearest-neighbour distance and the next (the largest distance when
    accept is 1). No negatives needed: what lies farther than nearly every real query is "unknown". Precision,
    recall and F1 are reported as calibrate_threshold reports them, at this threshold."""
    if not 0 < accept <= 1:
        raise UsageError(f"`accept` must be a fraction in (0, 1], got {accept}")
    d, ok = _answered_queries(nn_distances, nn_correct)
    order = np.argsort(d, kind="stable")
    ds = d[order]
    k = min(len(d), max(1, int(np.ceil(accept * len(d) - 1e-9))))
    threshold = ds[-1] if k == len(d) else (ds[k - 1] + ds[k]) / 2.0
    answered = d <= threshold
    n_answered, total_correct = int(answered.sum()), int(ok.sum())
    tp = int((answered & ok).sum())
    precision = tp / n_answered if n_answered else 0.0
    recall = tp / total_correct if total_correct else 0.0
    f1 = 2.0 * tp / (n_answered + total_correct) if (n_answered + total_correct) else 0.0
    return Calibration(max_distance=float(threshold), f1=float(f1), precision=float(precision),
                       recall=float(recall), n_answered=n_answered, n_queries=len(d), n_correct=total_correct)


def calibrate_threshold(nn_distances, nn_correct) -> Calibration:
    """The threshold t maximising F1 of "answered (distance <= t) and right" (see the module docstring): precision
    and recall of "right" ranked by -distance, every distinct distance a candidate (scikit-learn's
    precision_recall_curve); ties in F1 go to the smaller threshold.

    t lies halfway between the last accepted distance and the next one (the largest distance when all are
    accepted)."""
    from sklearn.metrics import precision_recall_curve

    d, ok = _answered_queries(nn_distances, nn_correct)
    total_correct = int(ok.sum())
    if total_correct == 0:
        raise RetrievalError("no query's nearest neighbour has its label; a threshold cannot help (wrong tower?)")
    _, recall, cuts = precision_recall_curve(ok, -d, drop_intermediate=False)
    # cuts ascend in -distance; drop the final (precision 1, recall 0) point and walk distances ascending
    recall, values = recall[:-1][::-1], -cuts[::-1]
    tp = np.rint(recall * total_correct).astype(np.int64)
    answered = np.searchsorted(np.sort(d), values, side="right")  # queries within each candidate distance
    f1 = 2.0 * tp / (answered + total_correct)
    best = int(np.argmax(f1))
    threshold = values[best] if best == len(values) - 1 else (values[best] + values[best + 1]) / 2.0
    return Calibration(
        max_distance=float(threshold),
        f1=float(f1[best]),
        precision=float(tp[best] / answered[best]),
        recall=float(tp[best] / total_correct),
        n_answered=int(answered[best]),
        n_queries=len(d),
        n_correct=total_correct,
    )
