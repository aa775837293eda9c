"""Retrieval metrics, pair verification and calibration on hand-made embeddings with known answers, and equality
with pytorch-metric-learning's AccuracyCalculator on random, clustered and tie-heavy embeddings."""

from __future__ import annotations

import logging

import faiss
import numpy as np
import pytest
import torch

from retrieval.errors import RetrievalError, UsageError
from retrieval.knn import ExactSearch, drop_self, nearest_neighbors
from retrieval.metrics import retrieval_metrics
from retrieval.pairs import balanced_pairs, best_threshold, calibrate_threshold, roc_auc, verify_pairs


def line(*xs) -> np.ndarray:
    """1-d embeddings: points on a line, so distances are easy to work out by hand."""
    return np.array(xs, dtype=np.float32).reshape(-1, 1)


# -- hand-made answers ------------------------------------------------------------------------------------------
def test_known_answers_against_separate_references():
    refs, ref_labels = line(0, 1, 2, 3, 10), [0, 0, 1, 1, 0]
    # query A at 0.4 (label 0): order 0,1,2,3,4 -> labels 0,0,1,1,0; R = 3 -> relevant ranks 1,2 of the first 3
    # query B at 2.4 (label 0): order 2,3,1,0,4 -> labels 1,1,0,0,0; R = 3 -> relevant rank 3 only
    m = retrieval_metrics(line(0.4, 2.4), [0, 0], refs, ref_labels, ks=(1, 2, 4))
    assert m.n_queries == 2 and m.n_references == 5 and m.n_scored == 2
    assert m.recall == {1: 0.5, 2: 0.5, 4: 1.0}
    assert m.precision[1] == 0.5
    assert m.precision[2] == pytest.approx((2 / 2 + 0 / 2) / 2)
    assert m.precision[4] == pytest.approx((2 / 4 + 2 / 4) / 2)
    assert m.r_precision == pytest.approx((2 / 3 + 1 / 3) / 2)
    ap_a = (1 / 1 + 2 / 2) / 3
    ap_b = (1 / 3) / 3
    assert m.map_at_r == pytest.approx((ap_a + ap_b) / 2)
    assert m.average_precision.tolist() == pytest.approx([ap_a, ap_b])
    assert m.neighbor_ids[:, :4].tolist() == [[0, 1, 2, 3], [2, 3, 1, 0]]
    assert m.neighbor_distances[0, :2].tolist() == pytest.approx([0.4, 0.6], rel=1e-5)
    assert m.confusion.tolist() == [[1, 1], [0, 0]]
    assert m.per_class == {"0": {"queries": 2, "nn_accuracy": 0.5, "map@r": pytest.approx((ap_a + ap_b) / 2),
                                 "r_precision": pytest.approx(0.5)}}


@pytest.mark.parametrize("labels, p1, ap", [([1, 0, 0], 0.0, 0.25), ([0, 0, 1], 1.0, 1.0)])
def test_equal_distances_are_ordered_by_reference_id(labels, p1, ap):
    # three references at the same point: the one with the smallest id comes first, as in Faiss
    m = retrieval_metrics(line(0), [0], line(1, 1, 1), labels, ks=(1,))
    assert m.neighbor_ids[0, 0] == 0
    assert m.precision[1] == p1
    assert m.map_at_r == pytest.approx(ap)


def test_leave_one_out_excludes_each_query_itself():
    x, y = line(0, 0.1, 5, 5.2, 0.3), [0, 0, 1, 1, 1]
    m = retrieval_metrics(x, y, ks=(1, 2))
    # point 4 (0.3, label 1): others at 0.2 (id 1, label 0), 0.3 (id 0, label 0), 4.7, 4.9 -> R = 2, no hit in 2
    # point 0 (0, label 0): nearest id 1 (label 0); R = 1 -> AP 1
    # point 2 (5, label 1): nearest 3 (label 1) then 4 (label 1); R = 2 -> AP 1
    assert m.relevant.tolist() == [1, 1, 2, 2, 2]
    assert m.neighbor_ids[:, 0].tolist() == [1, 0, 3, 2, 1]
    assert m.average_precision.tolist() == pytest.approx([1, 1, 1, 1, 0])
    assert m.precision[1] == pytest.approx(4 / 5)
    assert m.recall[2] == pytest.approx(4 / 5)
    assert m.map_at_r == pytest.approx(4 / 5)


def test_leave_one_out_with_duplicates_drops_the_query_wherever_it_ranks():
    # ids 0, 1 and 2 are the same point; for query 2 the ids 0 and 1 tie with itself and rank first
    x, y = line(0, 0, 0, 9), [1, 0, 0, 0]
    m = retrieval_metrics(x, y, ks=(1, 3))
    assert m.neighbor_ids[2, :3].tolist() == [0, 1, 3]
    assert m.neighbor_ids[1, :3].tolist() == [0, 2, 3]
    # query 2 (label 0): R = 2; ranks: id 0 (label 1), id 1 (label 0) -> AP = (1/2)/2
    assert m.average_precision[2] == pytest.approx(0.25)
    # query 0 is the only label-1 point: lone, left out of every average
    assert m.n_scored == 3 and m.n_lone == 1 and np.isnan(m.average_precision[0])


def test_query_self_ids_and_unknown_classes_are_handled_per_query():
    refs, ref_labels = line(0, 1, 2), [0, 0, 1]
    # query 0 is reference 0 itself (leave it out), query 1 is new, query 2 has a class no reference has
    m = retrieval_metrics(line(0, 0.9, 2), [0, 0, 2], refs, ref_labels, query_self_ids=[0, -1, -1], ks=(1,),
                          classes=["a", "b", "c"])
    assert m.relevant.tolist() == [1, 2, 0]
    assert m.neighbor_ids[:, 0].tolist() == [1, 1, 2]
    assert m.n_scored == 2 and m.precision[1] == 1.0
    assert m.confusion.tolist() == [[2, 0, 0], [0, 0, 0], [0, 1, 0]]
    assert set(m.per_class) == {"a"}
    assert m.to_json()["n_lone"] == 1


def test_k_larger_than_the_references_counts_missing_neighbours_as_misses():
    m = retrieval_metrics(line(0), [0], line(1, 2), [0, 1], ks=(1, 4))
    assert m.precision[4] == pytest.approx(1 / 4)
    assert m.neighbor_ids[0].tolist() == [0, 1, -1, -1]
    assert np.isinf(m.neighbor_distances[0, 2])


def test_search_callable_gives_the_same_metrics_as_embeddings():
    from retrieval.index import build_index

    rng = np.random.default_rng(3)
    refs = rng.standard_normal((400, 8)).astype(np.float32)
    refs /= np.linalg.norm(refs, axis=1, keepdims=True)
    labels = rng.integers(0, 4, 400)
    queries = refs[:50] + 0.05 * rng.standard_normal((50, 8)).astype(np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    index = build_index(refs, labels, ["a", "b", "c", "d"], [str(i) for i in range(400)], factory="Flat",
                        metric="ip")
    exact = retrieval_metrics(queries, labels[:50], refs, labels, query_self_ids=np.arange(50))
    via_index = retrieval_metrics(queries, labels[:50], search=index.search, reference_labels=index.labels,
                                  reference_ids=index.ids, query_self_ids=np.arange(50))
    a, b = via_index.to_json(), exact.to_json()
    assert a.pop("confusion_matrix") == b.pop("confusion_matrix")
    for name, row in a.pop("per_class").items():
        assert row == pytest.approx(b["per_class"][name])
    b.pop("per_class")
    assert a == pytest.approx(b)


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(UsageError, match="`k`"):
        retrieval_metrics(line(0), [0], line(1), [0], ks=(0, 1))
    with pytest.raises(RetrievalError, match="NaN"):
        retrieval_metrics(line(np.nan), [0], line(1), [0])
    with pytest.raises(RetrievalError, match="labels"):
        retrieval_metrics(line(0, 1), [0], line(1), [0])


@pytest.mark.parametrize("kind", ["integer", "random"])
def test_rank_path_equals_neighbour_list_path(kind):
    # the exact path (ranks without neighbour lists) against the same search through neighbour lists
    rng = np.random.default_rng(2)
    if kind == "integer":  # distance ties everywhere, broken by id
        refs = rng.integers(-1, 2, (900, 4)).astype(np.float32)
    else:
        refs = unit(rng.standard_normal((900, 8)))
    labels = rng.integers(0, 6, 900)
    queries, query_labels = refs[:200], labels[:200].copy()
    query_labels[:10] = 7  # a class no reference has
    self_ids = np.where(np.arange(200) % 3 == 0, np.arange(200), -1)  # some queries are references
    a = retrieval_metrics(queries, query_labels, refs, labels, query_self_ids=self_ids, classes=list("abcdefgh"))
    b = retrieval_metrics(queries, query_labels, search=ExactSearch(refs), reference_labels=labels,
                          query_self_ids=self_ids, classes=list("abcdefgh"))
    np.testing.assert_array_equal(a.neighbor_ids, b.neighbor_ids)
    # (float32 |q|^2 + |r|^2 - 2 q.r: a distance of ~0 comes out within ~1e-3 of 0)
    np.testing.assert_allclose(a.neighbor_distances, b.neighbor_distances, rtol=1e-5, atol=1e-3)
    np.testing.assert_allclose(a.average_precision, b.average_precision, rtol=1e-12)
    assert a.to_json()["recall@16"] == b.to_json()["recall@16"] and a.precision == b.precision
    assert a.n_lone == 10 and a.r_precision == pytest.approx(b.r_precision, rel=1e-12)


# -- ExactSearch agrees with Faiss ----------------------------------------------------------------------------
@pytest.mark.parametrize("k", [1, 7, 60, 500])
def test_exact_search_matches_faiss_order_including_ties(k):
    rng = np.random.default_rng(k)
    # small integer coordinates: distances are exact in float32 and ties are everywhere
    refs = rng.integers(-2, 3, (3000, 5)).astype(np.float32)
    queries = rng.integers(-2, 3, (70, 5)).astype(np.float32)
    flat = faiss.IndexFlatL2(5)
    flat.add(refs)
    d2, ids = flat.search(queries, k)
    dist, got = ExactSearch(refs)(queries, k)
    np.testing.assert_array_equal(got, ids)
    np.testing.assert_allclose(dist, np.sqrt(d2), rtol=1e-6, atol=1e-6)


def test_exact_search_takes_whole_rows_when_the_sampled_threshold_is_short():
    # the threshold comes from every 8th column; make those the nearest, so too few others fall below it
    # (integer coordinates: exact distances, with ties among near and far ones)
    rng = np.random.default_rng(0)
    refs = (20 + rng.integers(0, 6, (800, 2))).astype(np.float32)
    refs[::8] = rng.integers(0, 4, (100, 2))
    queries = np.zeros((3, 2), np.float32)
    dist, ids = ExactSearch(refs)(queries, 150)
    d2 = (refs.astype(np.float64) ** 2).sum(1)
    np.testing.assert_array_equal(ids[0], np.lexsort((np.arange(800), d2))[:150])
    assert (ids == ids[0]).all()


def test_drop_self_removes_the_own_id_or_the_last_column():
    dist = np.array([[0.0, 0.1, 0.2], [0.0, 0.0, 0.3]], np.float32)
    ids = np.array([[5, 6, 7], [1, 2, 3]])
    d, i = drop_self(dist, ids, np.array([6, 9]))
    assert i.tolist() == [[5, 7], [1, 2]]
    d, i = nearest_neighbors(line(0, 1), ExactSearch(line(0, 1, 3)), 1, self_ids=[0, -1])
    assert i.tolist() == [[1], [1]]


# -- equality with pytorch-metric-learning --------------------------------------------------------------------
def pml_values(queries, query_labels, references=None, reference_labels=None) -> dict:
    from pytorch_metric_learning.utils import common_functions
    from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator

    common_functions.LOGGER.setLevel(logging.ERROR)
    calc = AccuracyCalculator(include=("precision_at_1", "mean_average_precision_at_r", "r_precision"),
                              device=torch.device("cpu"))
    return calc.get_accuracy(queries, query_labels, references, reference_labels)


def assert_same_as_pml(m, pml):
    assert abs(m.precision[1] - pml["precision_at_1"]) < 1e-6
    assert abs(m.map_at_r - pml["mean_average_precision_at_r"]) < 1e-6
    assert abs(m.r_precision - pml["r_precision"]) < 1e-6


def unit(x):
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def embeddings(kind: str, n: int, rng, centers=None):
    if kind == "integer":  # exact distances, many ties
        return rng.integers(-1, 2, (n, 4)).astype(np.float32), rng.integers(0, 4, n)
    if kind == "random":
        return unit(rng.standard_normal((n, 16))), rng.integers(0, 5, n)
    labels = rng.integers(0, 5, n)
    return unit(centers[labels] + rng.standard_normal((n, 16))), labels


@pytest.mark.parametrize("kind", ["integer", "random", "clustered"])
def test_equals_accuracy_calculator(kind):
    rng = np.random.default_rng(11)
    centers = 1.5 * rng.standard_normal((5, 16))
    q, ql = embeddings(kind, 300, rng, centers)
    r, rl = embeddings(kind, 1500, rng, centers)
    assert_same_as_pml(retrieval_metrics(q, ql, r, rl), pml_values(q, ql, r, rl))
    # leave-one-out: queries are the references
    assert_same_as_pml(retrieval_metrics(r, rl), pml_values(r, rl))


def test_equals_accuracy_calculator_with_lone_and_unmatched_queries():
    rng = np.random.default_rng(5)
    r, rl = unit(rng.standard_normal((600, 8))), rng.integers(0, 3, 600)
    q, ql = unit(rng.standard_normal((100, 8))), rng.integers(0, 4, 100)  # label 3: no reference has it
    m = retrieval_metrics(q, ql, r, rl)
    assert m.n_lone == int((ql == 3).sum()) > 0
    assert_same_as_pml(m, pml_values(q, ql, r, rl))
    rl_loo = rl.copy()
    rl_loo[7] = 9  # a class with one member: lone under leave-one-out
    m = retrieval_metrics(r, rl_loo)
    assert m.n_lone == 1
    assert_same_as_pml(m, pml_values(r, rl_loo))


# -- pair verification ----------------------------------------------------------------------------------------
def test_balanced_pairs_follow_the_writeup_and_are_seeded():
    labels = np.repeat(np.arange(3), [150, 120, 200])
    pairs = balanced_pairs(labels, pairs_per_class=40, seed=1)
    assert len(pairs) == 3 * 80 and pairs.same.sum() == 120
    assert (labels[pairs.first] == labels[pairs.second]).tolist() == pairs.same.tolist()
    assert not (pairs.first == pairs.second).any()
    # anchors are the first 40 images of each class, once for its same and once for its different pair
    assert pairs.first[:40].tolist() == list(range(40)) and pairs.first[40:80].tolist() == list(range(40))
    offsets = pairs.second[:40] - pairs.first[:40]
    assert offsets.min() >= 1 and offsets.max() <= 100
    again = balanced_pairs(labels, pairs_per_class=40, seed=1)
    other = balanced_pairs(labels, pairs_per_class=40, seed=2)
    assert np.array_equal(pairs.second, again.second) and not np.array_equal(pairs.second, other.second)
    with pytest.raises(RetrievalError, match="2 classes"):
        balanced_pairs(np.zeros(10, int))


def test_roc_auc_and_best_threshold_known_values():
    assert roc_auc([0.9, 0.8, 0.3, 0.1], [1, 1, 0, 0]) == 1.0
    assert roc_auc([0.1, 0.2, 0.8, 0.9], [1, 1, 0, 0]) == 0.0
    # one positive-negative pair tied: counts half
    assert roc_auc([0.5, 0.5, 0.1], [1, 0, 0]) == pytest.approx(0.75)
    acc, t = best_threshold([0.9, 0.8, 0.6, 0.3, 0.1], [1, 1, 0, 1, 0])
    assert acc == pytest.approx(0.8) and 0.8 > t > 0.6
    assert roc_auc(np.arange(10.0), np.arange(10) >= 5) == 1.0


def test_verify_pairs_by_distance_and_by_head():
    from retrieval.objectives import PairHead

    a = np.array([[1, 0], [1, 0], [1, 0], [1, 0]], np.float32)
    b = np.array([[1, 0], [0.8, 0.6], [0, 1], [-1, 0]], np.float32)
    v = verify_pairs(a, b, [True, True, False, False])
    assert v.score == "distance" and v.accuracy == 1.0 and v.roc_auc == 1.0
    assert np.linalg.norm(a[1] - b[1]) < v.threshold < np.linalg.norm(a[2] - b[2])
    head = PairHead(2)
    with torch.no_grad():  # P(same) falls with |a - b|
        head.linear.weight.copy_(torch.tensor([[1.0, 1.0], [-1.0, -1.0]]))
        head.linear.bias.zero_()
    v = verify_pairs(a, b, [True, True, False, False], head=head)
    assert v.score == "pair head" and v.accuracy == 1.0 and 0 < v.threshold < 1


# -- calibration ------------------------------------------------------------------------------------------------
def test_calibrate_threshold_maximises_f1():
    # right answers near, wrong ones far, one wrong answer among the near ones
    d = [0.1, 0.2, 0.25, 0.3, 0.9, 1.0, 1.1]
    ok = [True, True, False, True, False, False, True]
    cal = calibrate_threshold(d, ok)
    # accepting the first 4: TP 3, answered 4, correct 4 -> F1 = 6/8; accepting all 7: 8/11
    assert cal.f1 == pytest.approx(0.75)
    assert cal.max_distance == pytest.approx((0.3 + 0.9) / 2)
    assert (cal.n_answered, cal.n_queries, cal.n_correct) == (4, 7, 4)
    with pytest.raises(RetrievalError, match="label"):
        calibrate_threshold([0.1, 0.2], [False, False])


def test_blocks_mixing_tied_and_untied_queries_match_both_references():
    # the rank path handles a block's rows in whole-array operations and sends rows with a value shared across
    # classes to the one-row path: copies of some references under another label make a few such rows
    # (integer coordinates, widely spread: distances are exact, so a tie is a tie in every computation order,
    # and the only ties are those of the copies; about half of the query rows hold one among their candidates)
    rng = np.random.default_rng(8)
    r = rng.integers(-500, 501, (1200, 4)).astype(np.float32)
    rl = rng.integers(0, 3, 1200)
    r[1197:] = r[:3]
    rl[1197:] = (rl[:3] + 1) % 3
    q, ql = r[:300] + rng.integers(-2, 3, (300, 4)).astype(np.float32), rl[:300].copy()
    q[:3] = r[:3]  # distance-0 ties
    a = retrieval_metrics(q, ql, r, rl)
    b = retrieval_metrics(q, ql, search=ExactSearch(r), reference_labels=rl)
    np.testing.assert_array_equal(a.neighbor_ids, b.neighbor_ids)
    np.testing.assert_allclose(a.average_precision, b.average_precision, rtol=1e-12)
    assert a.precision == b.precision and a.recall == b.recall
    assert_same_as_pml(a, pml_values(q, ql, r, rl))
    assert_same_as_pml(retrieval_metrics(r, rl), pml_values(r, rl))
