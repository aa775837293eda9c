"""`retrieval evaluate`, `evaluate-pairs`, `calibrate` and reports on real MNIST subsets, real towers and real
Faiss indexes, checked against pytorch-metric-learning's AccuracyCalculator."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import faiss
import numpy as np
import pytest
import torch
from PIL import Image

from retrieval.checkpoint import load_checkpoint, save_checkpoint
from retrieval.data.specs import load_dataset
from retrieval.embed import embed_images, images_to_input
from retrieval.grid import SourceImages
from retrieval.index import load_index
from retrieval.workflows import build_index, evaluate
from retrieval.objectives import PairHead
from retrieval.towers import build_tower
from cli_helpers import BAR, run_cli, run_cli_on_a_terminal
from figures import assert_tiles_show, grid_tiles, heatmap_fractions
from retrieval.workflows import Selection

def pml(queries, query_labels, references=None, reference_labels=None) -> dict:
    from pytorch_metric_learning.utils import common_functions
    from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator

    common_functions.LOGGER.setLevel(logging.ERROR)
    calc = AccuracyCalculator(include=("precision_at_1", "mean_average_precision_at_r", "r_precision"),
                              device=torch.device("cpu"))
    return calc.get_accuracy(queries, query_labels, references, reference_labels)


def assert_matches_pml(values: dict, expected: dict) -> None:
    assert abs(values["precision@1"] - expected["precision_at_1"]) < 1e-6
    assert abs(values["map@r"] - expected["mean_average_precision_at_r"]) < 1e-6
    assert abs(values["r_precision"] - expected["r_precision"]) < 1e-6


def stored_vectors(folder: Path) -> tuple[np.ndarray, np.ndarray, list[str]]:
    index = load_index(folder)
    inner = faiss.downcast_index(index.index.index)
    return inner.reconstruct_n(0, inner.ntotal), index.labels, index.classes


# -- fixtures ---------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def run_dir(untrained_run):
    return untrained_run


@pytest.fixture(scope="module")
def index_dir(run_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("eval-index") / "ix"
    build_index(run_dir, Selection(["mnist:train"], subset=600, seed=0), folder)
    return folder


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, data_root):
    """A small tower trained for a few dozen steps (pytorch-metric-learning multi-similarity loss) on digits
    0-4 only: enough for digits it never saw to land away from the ones it did."""
    from pytorch_metric_learning import losses, miners

    torch.manual_seed(0)
    ds = load_dataset("mnist:train", classes="0,1,2,3,4", subset=1000, seed=0)
    tower = build_tower("default", 32)
    optimizer = torch.optim.Adam(tower.parameters(), 2e-3)
    loss_fn, miner = losses.MultiSimilarityLoss(), miners.MultiSimilarityMiner()
    generator = torch.Generator().manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small batches: one thread is faster, and much faster on a busy machine
    try:
        tower.train()
        for _ in range(80):
            batch = torch.randint(len(ds), (64,), generator=generator)
            emb = tower(images_to_input(ds.images[batch]))
            loss = loss_fn(emb, ds.labels[batch], miner(emb, ds.labels[batch]))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    finally:
        torch.set_num_threads(threads)
    base = tmp_path_factory.mktemp("trained-run")
    save_checkpoint(base / "best", tower.eval())
    return base


# -- evaluate ---------------------------------------------------------------------------------------------------
def test_evaluate_json_equals_accuracy_calculator(index_dir, run_dir, capsys):
    code, out, err = run_cli(capsys, "evaluate", "--index", index_dir, "--queries", "mnist:test", "--subset", 300,
                             "--json")
    assert code == 0, err
    result = json.loads(out)
    assert result["n_queries"] == 300 and result["n_references"] == 600
    assert {f"recall@{k}" for k in (1, 2, 4, 8, 16)} <= set(result)
    assert {f"precision@{k}" for k in (1, 2, 4, 8, 16)} <= set(result)
    assert result["left_out_own_entries"] == 0
    assert 0.3 < result["recall@1"] < 1.0  # an untrained tower: far from perfect, far from chance
    assert result["recall@1"] == result["precision@1"] <= result["recall@16"]
    assert set(result["per_class"]) == {str(d) for d in range(10)}
    assert sum(row["queries"] for row in result["per_class"].values()) == 300
    # the same embeddings through pytorch-metric-learning
    refs, ref_labels, classes = stored_vectors(index_dir)
    ds = load_dataset("mnist:test", subset=300, seed=0)
    queries = embed_images(load_checkpoint(run_dir).tower, ds.images)
    query_labels = np.array([classes.index(name) for name in ds.label_names()])
    assert_matches_pml(result, pml(queries, query_labels, refs, ref_labels))
    confusion = np.array(result["confusion_matrix"]["counts"])
    assert confusion.sum() == 300 and np.trace(confusion) == round(result["recall@1"] * 300)


def test_evaluate_leaves_each_indexed_query_out(index_dir, capsys):
    # the indexed images themselves: each query's own entry must not count as its neighbour
    code, out, err = run_cli(capsys, "evaluate", "--index", index_dir, "--queries", "mnist:train", "--subset", 600,
                             "--k", "1,5", "--json")
    assert code == 0, err
    result = json.loads(out)
    assert result["left_out_own_entries"] == 600
    assert result["recall@1"] < 0.99 and "recall@5" in result and "recall@2" not in result
    refs, ref_labels, _ = stored_vectors(index_dir)
    assert_matches_pml(result, pml(refs, ref_labels))  # PML's own leave-one-out (queries = references)


def test_evaluate_text_table_and_class_names(tmp_path, run_dir, capsys):
    # an index of digits 3 and 5 only: query labels are matched by name, other digits are lone
    folder = tmp_path / "ix35"
    build_index(run_dir, Selection(["mnist:train"], classes="5,3", subset=200, seed=0), folder)
    code, out, err = run_cli(capsys, "evaluate", "--index", folder, "--queries", "mnist:test", "--classes", "3,5,7",
                             "--subset", 150)
    assert code == 0, err
    assert "recall@k" in out and "MAP@R" in out and "R-precision" in out
    assert "lone" in out and "7" in err  # digit 7 is not in the index
    result = evaluate(folder, Selection("mnist:test", classes="3,5,7", subset=150))
    metrics, iq = result.metrics, result.queries
    assert iq.missing_classes == ["7"]
    assert set(metrics.per_class) == {"3", "5"}
    names = np.array(iq.dataset.label_names())
    assert metrics.n_lone == int((names == "7").sum()) > 0
    scored = names != "7"
    assert [iq.classes[c] for c in metrics.query_labels[scored]] == names[scored].tolist()


def test_report_folder(index_dir, tmp_path, capsys):
    out_dir = tmp_path / "report"
    code, out, err = run_cli(capsys, "evaluate", "--index", index_dir, "--queries", "mnist:test", "--subset", 200,
                             "--report", out_dir, "--json")
    assert code == 0, err
    names = {p.name for p in out_dir.iterdir()}
    assert names == {"metrics.json", "summary.md", "recall_at_k.png", "confusion_matrix.png", "failures.png",
                     "embeddings_pca.png"}
    saved = json.loads((out_dir / "metrics.json").read_text())
    assert json.loads(out) == saved  # --json prints what the report holds
    # ... and those are the right figures: pytorch-metric-learning's AccuracyCalculator on the same queries
    refs, ref_labels, classes = stored_vectors(index_dir)
    queries = load_dataset("mnist:test", subset=200, seed=0)
    tower = load_checkpoint(load_index(index_dir).meta["tower"]["checkpoint"]).tower
    query_labels = np.array([classes.index(queries.classes[c]) for c in queries.labels.tolist()])
    expected = pml(embed_images(tower, queries.images), query_labels, refs, ref_labels)
    assert saved["n_queries"] == 200 and saved["n_references"] == 600
    assert_matches_pml(saved, expected)
    for png in out_dir.glob("*.png"):
        with Image.open(png) as img:
            assert img.format == "PNG" and img.size[0] > 200 and img.size[1] > 200
    # the plots show these figures: the confusion matrix's cells are the rows' fractions (its diagonal adds up to
    # the queries whose nearest neighbour is right) ...
    counts = np.array(saved["confusion_matrix"]["counts"])
    shown = heatmap_fractions(out_dir / "confusion_matrix.png", len(counts))
    assert np.abs(shown - counts / counts.sum(1, keepdims=True)).max() < 0.02
    assert abs((np.diag(shown) * counts.sum(1)).sum() - saved["precision@1"] * 200) < 1
    # ... and the failures grid shows the closest wrong nearest neighbours, each query beside its neighbours
    metrics = evaluate(index_dir, Selection("mnist:test", subset=200)).metrics
    assert metrics.precision[1] == saved["precision@1"]
    wrong = np.flatnonzero(~metrics.nn_correct)
    wrong = wrong[np.argsort(metrics.neighbor_distances[wrong, 0], kind="stable")][:10]
    index = load_index(index_dir)
    pictures = SourceImages()
    expected = [[queries.images[i]] + [pictures.get(index.sources_of([n])[0]) for n in metrics.neighbor_ids[i, :6]]
                for i in wrong]
    assert len(expected) == 10 and all(len(row) == 7 for row in expected)
    assert_tiles_show(grid_tiles(out_dir / "failures.png"), expected)
    summary = (out_dir / "summary.md").read_text()
    assert "| recall@k |" in summary and "MAP@R" in summary and "![failures.png](failures.png)" in summary
    # a second run replaces the report; a folder holding anything else is refused, untouched
    code, _, err = run_cli(capsys, "evaluate", "--index", index_dir, "--queries", "mnist:test", "--subset", 100,
                           "--report", out_dir)
    assert code == 0, err
    assert json.loads((out_dir / "metrics.json").read_text())["n_queries"] == 100
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    code, _, err = run_cli(capsys, "evaluate", "--index", index_dir, "--queries", "mnist:test", "--subset", 100,
                           "--report", other)
    assert code == 2 and "notes.txt" in err
    assert [p.name for p in other.iterdir()] == ["notes.txt"]
    code, _, err = run_cli(capsys, "evaluate", "--index", index_dir, "--queries", "mnist:test", "--subset", 100,
                           "--report", other / "notes.txt" / "report")
    assert code == 2 and "not a folder" in err
    assert not list(tmp_path.glob(".*.tmp"))


def test_approximate_index_is_searched_by_faiss(tmp_path, run_dir):
    # IVF probing one inverted list: each answer can only come from the query's nearest list, a restriction
    # exact search does not have; so the neighbours show whether Faiss's approximate search (and the stored
    # search parameters) were used.
    folder = tmp_path / "ivf"
    build_index(run_dir, Selection(["mnist:train"], subset=400, seed=0), folder, factory="IVF8,Flat",
                search_params="nprobe=1")
    evaluation = evaluate(folder, Selection("mnist:test", subset=100))
    approx, iq = evaluation.metrics, evaluation.queries
    flat = tmp_path / "flat"
    build_index(run_dir, Selection(["mnist:train"], subset=400, seed=0), flat)
    exact = evaluate(flat, Selection("mnist:test", subset=100)).metrics
    assert approx.n_references == exact.n_references == 400

    ivf = faiss.extract_index_ivf(iq.index.index)
    list_of = {}
    for number in range(ivf.nlist):
        size = ivf.invlists.list_size(number)
        for position in faiss.rev_swig_ptr(ivf.invlists.get_ids(number), size).tolist():
            list_of[int(iq.index.ids[position])] = number

    def lists_per_query(neighbor_ids):
        return [len({list_of[i] for i in row.tolist() if i >= 0}) for row in neighbor_ids]

    assert max(lists_per_query(approx.neighbor_ids)) == 1
    assert max(lists_per_query(exact.neighbor_ids)) > 1  # so the restriction above is not a property of the data
    assert (approx.neighbor_ids != exact.neighbor_ids).any()


def test_evaluate_bad_input(index_dir, tmp_path, capsys):
    code, _, err = run_cli(capsys, "evaluate", "--index", tmp_path / "missing", "--queries", "mnist:test")
    assert code == 1 and "index folder not found" in err
    for bad in ("0,1", "a,b", ","):
        code, _, err = run_cli(capsys, "evaluate", "--index", index_dir, "--queries", "mnist:test", "--k", bad)
        assert code == 2 and "--k" in err
    code, _, err = run_cli(capsys, "evaluate", "--index", index_dir, "--queries", "nope:x")
    assert code == 2 and "nope:x" in err


def test_help_defines_the_metrics(capsys):
    code, out, _ = run_cli(capsys, "evaluate", "--help")
    assert code == 0
    for word in ("recall@k", "precision@k", "MAP@R", "R-precision", "leave-one-out", "1-NN accuracy"):
        assert word in out


# -- messages and progress bars (README: bars only on a terminal, --quiet keeps warnings and errors, the
# library logs and never prints) -----------------------------------------------------------------------------------
def test_evaluate_writes_no_bar_into_redirected_stderr_and_quiet_keeps_it_empty(index_dir, capsys):
    args = ["evaluate", "--index", index_dir, "--queries", "mnist:test", "--subset", 120, "--json"]
    code, out, err = run_cli(capsys, *args)  # stderr is pytest's capture: not a terminal
    assert code == 0 and json.loads(out)["n_queries"] == 120, err
    assert not BAR.search(err), err
    code, out, err = run_cli(capsys, "--quiet", *args)
    assert code == 0 and json.loads(out)["n_queries"] == 120 and err == "", err


def _python(code: str, data_root, **popen) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], text=True, timeout=300, stdin=subprocess.DEVNULL,
                          env={**os.environ, "RETRIEVAL_DATA_ROOT": str(data_root)}, **popen)


def test_the_library_never_prints_and_the_cli_draws_bars_only_on_a_terminal(index_dir, tmp_path, data_root):
    """workflows.evaluate in a fresh interpreter with no logging set up writes nothing at all to stdout or stderr;
    the same evaluation through the CLI with stderr on a terminal (a pseudo-terminal) draws the bar there."""
    report = tmp_path / "report"
    library = _python(f"from retrieval import workflows; "
                      f"workflows.evaluate({str(index_dir)!r}, workflows.Selection('mnist:test', subset=120), "
                      f"report={str(report)!r})",
                      data_root, capture_output=True)
    assert library.returncode == 0, library.stderr
    assert (library.stdout, library.stderr) == ("", "") and (report / "metrics.json").is_file()

    code, stdout, terminal = run_cli_on_a_terminal(
        ["evaluate", "--index", index_dir, "--queries", "mnist:test", "--subset", "120"],
        {"RETRIEVAL_DATA_ROOT": str(data_root)})
    assert code == 0, terminal
    assert "recall@k" in stdout and "neighbours" in terminal and BAR.search(terminal)


# -- pair verification ------------------------------------------------------------------------------------------
def test_evaluate_pairs_by_distance_is_seeded(run_dir, capsys):
    args = ["evaluate-pairs", "--checkpoint", run_dir, "--data", "mnist:test", "--pairs-per-class", 30, "--json"]
    code, out, err = run_cli(capsys, *args)
    assert code == 0, err
    first = json.loads(out)
    assert first["pairs"] == 600 and first["same_pairs"] == first["different_pairs"] == 300
    assert first["score"] == "distance" and first["rule"].startswith("same when distance <=")
    assert 0.6 < first["roc_auc"] <= 1.0 and 0.55 < first["accuracy"] <= 1.0 and first["threshold"] > 0
    assert json.loads(run_cli(capsys, *args)[1]) == first
    other = json.loads(run_cli(capsys, *args[:-1], "--seed", 1, "--json")[1])
    assert other["seed"] == 1 and other["roc_auc"] != first["roc_auc"]
    code, out, _ = run_cli(capsys, *args[:-1])
    assert "ROC AUC" in out and "threshold" in out


def test_evaluate_pairs_uses_the_pair_head(tmp_path, capsys):
    torch.manual_seed(0)
    tower = build_tower("default", 16)
    head = PairHead(16)
    with torch.no_grad():  # P(same) falls with |f(a) - f(b)|: a head that behaves like a distance
        head.linear.weight.copy_(torch.stack([torch.full((16,), 4.0), torch.full((16,), -4.0)]))
        head.linear.bias.zero_()
    save_checkpoint(tmp_path / "pair" / "best", tower, head=head)
    code, out, err = run_cli(capsys, "evaluate-pairs", "--checkpoint", tmp_path / "pair", "--data", "mnist:test",
                             "--classes", "0,1,2", "--pairs-per-class", 20, "--json")
    assert code == 0, err
    result = json.loads(out)
    assert result["score"] == "pair head" and 0 < result["threshold"] < 1 and result["pairs"] == 120
    assert result["roc_auc"] > 0.6


def test_evaluate_pairs_needs_two_classes(run_dir, capsys):
    code, _, err = run_cli(capsys, "evaluate-pairs", "--checkpoint", run_dir, "--data", "mnist:test", "--classes",
                           "3", "--pairs-per-class", 5)
    assert code == 1 and "2 classes" in err


# -- calibration ------------------------------------------------------------------------------------------------
def query_labels(capsys, folder, items) -> list[str]:
    code, out, err = run_cli(capsys, "query", "--index", folder, "-k", 1, "--json", *items)
    assert code == 0, err
    return [r["label"] for r in json.loads(out)]


def test_calibration_makes_an_unseen_class_unknown(trained_run, tmp_path, capsys):
    folder = tmp_path / "digits0-4"
    build_index(trained_run, Selection(["mnist:train"], classes="0,1,2,3,4", subset=1000, seed=0), folder)
    test = load_dataset("mnist:test")
    names = np.array(test.label_names())
    calibration = {s for s in load_dataset("mnist:test", subset=500, seed=0).sources}
    # query images the calibration does not see
    unseen = [f"mnist:test[{i}]" for i in range(len(test)) if f"mnist:test[{i}]" not in calibration]
    sevens = [s for s in unseen if names[int(s[11:-1])] == "7"][:40]
    known = [s for s in unseen if names[int(s[11:-1])] in "01234"][:40]
    assert "unknown" not in query_labels(capsys, folder, sevens)  # no threshold yet: every 7 gets a digit

    code, out, err = run_cli(capsys, "calibrate", "--index", folder, "--queries", "mnist:test", "--subset", 500,
                             "--json")
    assert code == 0, err
    record = json.loads(out)
    meta = json.loads((folder / "meta.json").read_text())
    assert meta["calibration"] == record
    assert record["queries"] == "mnist:test" and record["created"] and record["n_queries"] == 500
    assert record["max_distance"] > 0 and 0.5 < record["f1"] <= 1
    assert record["classes_not_in_index"] == ["5", "6", "7", "8", "9"]

    labels = query_labels(capsys, folder, sevens)
    assert labels.count("unknown") >= 0.8 * len(sevens)
    answered = query_labels(capsys, folder, known)
    truth = [names[int(item[11:-1])] for item in known]
    assert sum(a == t for a, t in zip(answered, truth)) >= 0.75 * len(known)


def test_unknown_reaches_query_and_classify_on_a_calibrated_prototype_index(trained_run, tmp_path, capsys):
    """A few-shot prototype index (one vector per class) calibrated like any index: digits of classes it does not
    hold come back `unknown` from `retrieval query` and from the service's /classify alike."""
    pytest.importorskip("fastapi")
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*httpx2.*")
        from fastapi.testclient import TestClient
    from retrieval.serve import Service, create_app
    from retrieval.serve.library import png_bytes

    folder = tmp_path / "prototypes0-4"
    build_index(trained_run, Selection(["mnist:train"], classes="0,1,2,3,4", subset=1000, seed=0), folder,
                prototypes=True)
    code, out, err = run_cli(capsys, "calibrate", "--index", folder, "--queries", "mnist:test", "--subset", 500,
                             "--json")
    assert code == 0, err
    threshold = json.loads(out)["max_distance"]
    test = load_dataset("mnist:test")
    names = np.array(test.label_names())
    calibration = {s for s in load_dataset("mnist:test", subset=500, seed=0).sources}
    unseen = [i for i in range(len(test)) if f"mnist:test[{i}]" not in calibration]
    picks = [i for i in unseen if names[i] == "7"][:15] + [i for i in unseen if names[i] in "01234"][:15]
    items = [f"mnist:test[{i}]" for i in picks]
    code, out, err = run_cli(capsys, "query", "--index", folder, "-k", 1, "--json", *items)
    assert code == 0, err
    answers = json.loads(out)
    by_query = [a["label"] for a in answers]
    assert by_query[:15].count("unknown") >= 10 and by_query[15:].count("unknown") <= 5
    assert all((a["label"] == "unknown") == (a["neighbors"][0]["distance"] > threshold) for a in answers)
    client = TestClient(create_app(Service.open(folder)))
    with client:
        files = [("images", (f"{i}.png", png_bytes(test.images[i]), "image/png")) for i in picks]
        classified = client.post("/classify", files=files).json()
    assert [c["label"] for c in classified] == by_query and classified[0]["max_distance"] == threshold


def test_calibrate_dry_run_and_errors(index_dir, tmp_path, capsys):
    before = (index_dir / "meta.json").read_text()
    code, out, err = run_cli(capsys, "calibrate", "--index", index_dir, "--queries", "mnist:test", "--subset", 100,
                             "--dry-run")
    assert code == 0, err
    assert "max distance" in out and "F1" in out and "not stored" in err
    assert (index_dir / "meta.json").read_text() == before
    code, _, err = run_cli(capsys, "calibrate", "--index", tmp_path / "nothing", "--queries", "mnist:test")
    assert code == 1 and "index folder not found" in err
