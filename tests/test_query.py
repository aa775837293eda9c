"""Queries: the Python API (Searcher, predict_labels), `retrieval query`, grids, and pictures of digits drawn with
Pillow. Real towers (untrained, seeded), real Faiss, real MNIST subsets."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from retrieval.checkpoint import save_checkpoint
from retrieval.data.preprocess import load_image_file
from retrieval.data.specs import load_dataset
from retrieval.errors import RetrievalError, UsageError
from retrieval.grid import GridCell, GridRow, SourceImages, query_grid_rows, render_grid
from retrieval.index import load_index, update_index_meta
from retrieval.workflows import build_index
from retrieval.query import UNKNOWN, Searcher, predict_labels, resolve_query_inputs
from retrieval.towers import build_tower
from cli_helpers import BAR, HEIC_HEAD, run_cli, run_cli_on_a_terminal
from figures import assert_tiles_show, grid_tiles
from retrieval.workflows import Compute, Selection


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    base = tmp_path_factory.mktemp("qruns")
    torch.manual_seed(0)
    save_checkpoint(base / "a" / "best", build_tower("default"))
    torch.manual_seed(1)
    save_checkpoint(base / "b" / "best", build_tower("default"))
    return base


@pytest.fixture(scope="module")
def index_dir(run_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("qindex") / "ix"
    build_index(run_dir / "a", Selection(["mnist:test"], subset=250, seed=0), folder)
    return folder


@pytest.fixture(scope="module")
def indexed():
    return load_dataset("mnist:test", subset=250, seed=0)


def draw_digit(path: Path, strokes, size=(160, 200), width=14, mode="RGB") -> Path:
    """Black strokes on a white canvas, like a digit written on paper."""
    img = Image.new(mode, size, "white")
    draw = ImageDraw.Draw(img)
    for line in strokes:
        draw.line(line, fill="black", width=width, joint="curve")
    img.save(path)
    return path


SEVEN = [[(30, 40), (130, 40), (70, 170)]]
ONE = [[(80, 30), (80, 175)]]
FOUR = [[(100, 170), (100, 30), (30, 120), (135, 120)]]


# -- label prediction ----------------------------------------------------------------------------------------------
def test_predict_labels_majority_ties_and_threshold():
    labels = np.array([
        [1, 2, 2, 1, 3],   # 2 votes each for 1 and 2: 1 has the smaller summed distance (0.1+0.4 vs 0.2+0.3 = equal)
        [4, 5, 5, 4, 5],   # majority 5 despite 4 being nearest
        [7, 8, -1, -1, -1],  # a 1-1 tie: label 7 is nearer
        [-1, -1, -1, -1, -1],
        [6, 6, 6, 6, 6],
    ])
    dist = np.array([
        [0.1, 0.2, 0.3, 0.45, 0.5],
        [0.1, 0.2, 0.3, 0.4, 0.5],
        [0.2, 0.3, np.inf, np.inf, np.inf],
        [np.inf] * 5,
        [0.9, 0.95, 1.0, 1.0, 1.1],
    ])
    assert predict_labels(labels, dist).tolist() == [2, 5, 7, -1, 6]  # row 0: 0.5 vs 0.55 summed -> 2
    assert predict_labels(labels, dist, max_distance=0.5).tolist() == [2, 5, 7, -1, -1]
    # equal summed distances: the label holding the nearest neighbour wins
    assert predict_labels(np.array([[3, 4, 4, 3]]), np.array([[0.1, 0.2, 0.3, 0.4]])).tolist() == [3]


# -- Python API ----------------------------------------------------------------------------------------------------
def test_searcher_on_dataset_items_and_tensors(index_dir, indexed):
    searcher = Searcher.open(index_dir)
    pos = [0, 17, 99]
    results = searcher.query([indexed.sources[p] for p in pos], k=4)
    for p, r in zip(pos, results):
        assert r.ok and r.true_label == indexed.classes[int(indexed.labels[p])]
        assert r.neighbors[0].source == indexed.sources[p] and r.neighbors[0].distance < 1e-3
        assert r.neighbors[0].id == p  # ids are positions in the build order
        assert [n.distance for n in r.neighbors] == sorted(n.distance for n in r.neighbors)
        assert r.label in searcher.index.classes and len(r.neighbors) == 4
    same = searcher.query_images(indexed.images[pos], k=4)
    assert [[n.id for n in r.neighbors] for r in same] == [[n.id for n in r.neighbors] for r in results]
    emb = searcher.embed(indexed.images[pos])
    assert emb.shape == (3, 64) and np.allclose(np.linalg.norm(emb, axis=1), 1, atol=1e-5)


def test_searcher_k_limits(index_dir, indexed):
    searcher = Searcher.open(index_dir)
    with pytest.raises(UsageError):
        searcher.query([indexed.sources[0]], k=0)
    k, note = searcher.effective_k(1000)
    assert k == 250 and "larger than the index (250 items)" in note
    (r,) = searcher.query([indexed.sources[0]], k=1000)
    assert len(r.neighbors) == 250 and len({n.id for n in r.neighbors}) == 250


def test_threshold_marks_unknown(index_dir, indexed):
    far = Searcher.open(index_dir, max_distance=0.0)
    inside, outside = far.query([indexed.sources[3], "mnist:train[0]"], k=3)
    assert inside.label != UNKNOWN  # distance 0 to itself
    assert outside.label == UNKNOWN and len(outside.neighbors) == 3
    update_index_meta(index_dir, calibration={"max_distance": 0.0})
    try:
        assert Searcher.open(index_dir).max_distance == 0.0
        assert Searcher.open(index_dir, max_distance=5.0).query(["mnist:train[0]"], k=3)[0].label != UNKNOWN
    finally:
        update_index_meta(index_dir, calibration=None)
    with pytest.raises(UsageError):
        Searcher.open(index_dir, max_distance=-1)


def test_faiss_searches_on_the_cpu_unless_a_gpu_build_and_a_cuda_device_are_both_there(index_dir, caplog):
    import faiss

    from retrieval.faiss_gpu import gpu_count, to_search_device

    index = load_index(index_dir)
    queries = index.flat_vectors()[:5]
    before = index.search(queries, 3)
    assert index.use_device("cpu") is False and not index.on_gpu
    if gpu_count() == 0:  # faiss-cpu (the default): a CUDA device still searches on the CPU, and says why, once
        with caplog.at_level("INFO", logger="retrieval.faiss_gpu"):
            assert to_search_device(faiss.IndexFlatL2(4), torch.device("cuda")) is None
            assert "no GPU support" in caplog.text and "faiss-gpu-cu12" in caplog.text
            caplog.clear()
            for _ in range(3):  # the service makes a Searcher per request: the index is asked once
                Searcher(index, build_tower("default", 16), device=torch.device("cuda"))
            assert caplog.text.count("no GPU support") == 1 and not index.on_gpu
    else:  # a GPU build: the same neighbours from the GPU copy
        assert index.use_device("cuda") and index.on_gpu
    after = index.search(queries, 3)
    assert np.array_equal(before[1], after[1]) and np.allclose(before[0], after[0], atol=1e-4)


def test_resolve_inputs(tmp_path):
    draw_digit(tmp_path / "a.png", SEVEN)
    (tmp_path / "sub").mkdir()
    draw_digit(tmp_path / "sub" / "b.jpg", ONE)
    (tmp_path / "sub" / "notes.txt").write_text("not an image")
    (tmp_path / "sub" / "bad.png").write_text("text named .png")
    inputs = resolve_query_inputs([str(tmp_path), "mnist:test[5]", "mnist:test[99999]", str(tmp_path / "nope.png")])
    names = [(Path(q.name).name, q.error is None) for q in inputs]
    assert names == [("a.png", True), ("b.jpg", True), ("bad.png", False), ("mnist:test[5]", True),
                     ("mnist:test[99999]", False), ("nope.png", False)]
    assert "out of range" in inputs[4].error and "not found" in inputs[5].error
    assert inputs[3].true_label == "1"  # mnist:test[5] is a 1
    empty = tmp_path / "empty"
    empty.mkdir()
    (only,) = resolve_query_inputs([str(empty)])
    assert "no image files" in only.error


def test_a_folder_s_pictures_as_browsers_and_phones_save_them(tmp_path):
    """A JPEG named .jfif and an AVIF (where Pillow reads AVIF) are queries; an iPhone's HEIC photo is listed too,
    and refused by name with what to do."""
    from PIL import features

    drawing = draw_digit(tmp_path / "seven.png", SEVEN)
    (tmp_path / "pics").mkdir()
    Image.open(drawing).save(tmp_path / "pics" / "seven.jfif", format="JPEG", quality=95)
    (tmp_path / "pics" / "seven.heic").write_bytes(HEIC_HEAD + bytes(100))
    names = ["seven.heic", "seven.jfif"]
    if features.check("avif"):
        Image.open(drawing).save(tmp_path / "pics" / "seven.avif", quality=95)
        names.insert(0, "seven.avif")
    inputs = resolve_query_inputs([str(tmp_path / "pics")])
    assert [Path(q.name).name for q in inputs] == names
    heic = inputs[names.index("seven.heic")]
    assert heic.error.endswith("seven.heic: a HEIC/HEIF picture (as iPhones save photos), which cannot be read "
                               "here; save it as JPEG or PNG")
    clean = load_image_file(drawing).float()
    for q in inputs:  # the drawing, through lossy compression
        if q is not heic:
            assert q.error is None and (q.image.float() - clean).abs().mean() < 8, q.name


def test_other_tower_is_refused(index_dir, run_dir):
    with pytest.raises(RetrievalError, match="is not the tower this index was built with"):
        Searcher.open(index_dir, checkpoint=run_dir / "b")


# -- pictures drawn with Pillow ------------------------------------------------------------------------------------
def test_drawn_digit_is_embedded_and_answered(tmp_path, index_dir, capsys):
    png = draw_digit(tmp_path / "seven.png", SEVEN)
    image = load_image_file(png)
    assert image.dtype == torch.uint8 and image.shape == (28, 28)
    assert image[0].sum() == 0 and image.max() == 255  # white ink on black with an empty border, like MNIST
    code, out, err = run_cli(capsys, "query", "--index", index_dir, "--k", "5", "--json", png)
    assert code == 0, err
    (answer,) = json.loads(out)
    assert answer["query"] == str(png) and answer["label"] in load_index(index_dir).classes
    assert len(answer["neighbors"]) == 5
    assert set(answer["neighbors"][0]) == {"id", "label", "distance", "source"}
    dists = [n["distance"] for n in answer["neighbors"]]
    assert dists == sorted(dists) and dists[0] > 0


def test_few_shot_prototypes_from_drawings(tmp_path, run_dir, capsys):
    """The few-shot feature: a folder of a few labelled pictures per new class -> prototype index -> queries."""
    shots = tmp_path / "shots"
    for label, strokes in (("seven", SEVEN), ("one", ONE), ("four", FOUR)):
        (shots / label).mkdir(parents=True)
        draw_digit(shots / label / "x.png", strokes)
    draw_digit(shots / "seven" / "y.png", [[(25, 50), (135, 45), (60, 175)]], width=10)
    code, out, err = run_cli(capsys, "index", "build", "--checkpoint", run_dir / "a", "--data", f"folder:{shots}",
                             "--prototypes", "--out", tmp_path / "protos")
    assert code == 0, err
    index = load_index(tmp_path / "protos")
    assert sorted(index.sources) == ["prototype:four (1 image)", "prototype:one (1 image)",
                                     "prototype:seven (2 images)"]
    # a class with one picture has that picture's embedding as prototype: querying it answers its class
    code, out, err = run_cli(capsys, "query", "--index", tmp_path / "protos", "--k", "1", "--json",
                             shots / "one" / "x.png", shots / "four" / "x.png")
    assert code == 0, err
    answers = json.loads(out)
    assert [a["label"] for a in answers] == ["one", "four"]
    assert all(a["neighbors"][0]["distance"] < 1e-3 for a in answers)
    # k above the 3 prototypes: the whole index, with a note
    code, out, err = run_cli(capsys, "query", "--index", tmp_path / "protos", shots / "one" / "x.png")
    assert code == 0 and "larger than the index (3 items)" in err and out.count("prototype:") == 3


# -- the query command ------------------------------------------------------------------------------------------
def test_cli_text_output_and_unreadable_image(tmp_path, index_dir, indexed, capsys):
    good = draw_digit(tmp_path / "one.png", ONE, mode="L")
    broken = tmp_path / "broken.png"
    broken.write_bytes(good.read_bytes()[:60])  # a truncated PNG
    code, out, err = run_cli(capsys, "query", "--index", index_dir, "--k", "2", good, broken, indexed.sources[7])
    assert code == 1
    assert f"{good} -> " in out and f"{indexed.sources[7]} -> " in out and "broken.png" not in out
    assert "(true label" in out and out.count("distance") == 4
    assert f"error: {broken}" in err and "1 of 3 queries could not be answered" in err
    code, out, err = run_cli(capsys, "query", "--index", index_dir, "--json", good, broken)
    assert code == 1
    answers = json.loads(out)
    assert answers[0]["label"] is not None and answers[1]["label"] is None and "error" in answers[1]


def test_a_failed_query_is_logged_by_the_library_and_said_once_by_the_cli(tmp_path, index_dir, capsys,
                                                                          log_messages):
    """workflows.query answers the others and returns label None for a file that is missing: the log says
    which input failed and why (a library user without the CLI sees it), and the CLI shows that line once."""
    from retrieval import workflows

    missing = tmp_path / "gone.png"
    answers = workflows.query(index_dir, [str(missing), "mnist:test[3]"], k=2, compute=Compute(device="cpu"))
    assert [r.label is None for r in answers.results] == [True, False] and len(answers.failed) == 1
    assert [m for m in log_messages() if str(missing) in m] == [answers.failed[0].error], log_messages()
    assert "not found" in answers.failed[0].error
    capsys.readouterr()  # the library call's lines (the CLI's handler may be set up in this process already)
    code, out, err = run_cli(capsys, "--quiet", "query", "--index", index_dir, missing, "mnist:test[3]")
    assert code == 1 and "mnist:test[3] -> " in out
    assert [line for line in err.splitlines() if str(missing) in line] == [f"error: {answers.failed[0].error}"], err


def test_a_query_loads_no_training_library(tmp_path, index_dir, data_root):
    """`retrieval query` of a picture, in a new process, answers without importing pytorch-metric-learning (and
    the SciPy statistics it brings): they are training's, and cost a one-picture query's cold start ~0.5 s."""
    draw_digit(tmp_path / "seven.png", SEVEN)
    code = ("import sys; from retrieval.cli import main\n"
            "try:\n    main()\nexcept SystemExit as e:\n    assert not e.code, e.code\n"
            "print('loaded:', ','.join(m for m in ('pytorch_metric_learning', 'scipy.stats') if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code, "query", "--index", str(index_dir), str(tmp_path / "seven.png")],
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "RETRIEVAL_DATA_ROOT": str(data_root)})
    assert proc.returncode == 0, proc.stderr
    assert "seven.png -> " in proc.stdout and proc.stdout.strip().splitlines()[-1] == "loaded:", proc.stdout


def test_a_folder_query_draws_its_decoding_bar_only_on_a_terminal(tmp_path, index_dir, data_root, capsys):
    (tmp_path / "pics").mkdir()
    for i in range(40):
        draw_digit(tmp_path / "pics" / f"{i:02d}.png", SEVEN if i % 2 else ONE)
    code, stdout, terminal = run_cli_on_a_terminal(["query", "--index", index_dir, "--json", tmp_path / "pics"],
                                                   {"RETRIEVAL_DATA_ROOT": str(data_root)})
    assert code == 0, terminal
    assert len(json.loads(stdout)) == 40 and "decoding" in terminal and BAR.search(terminal), terminal
    code, out, err = run_cli(capsys, "query", "--index", index_dir, "--json", tmp_path / "pics")  # not a terminal
    assert code == 0 and json.loads(out) == json.loads(stdout) and not BAR.search(err), err


def test_cli_bad_options_and_files(tmp_path, index_dir, run_dir, capsys):
    code, out, err = run_cli(capsys, "query", "--index", index_dir, "--k", "0", "mnist:test[0]")
    assert code == 2 and "--k" in err
    code, out, err = run_cli(capsys, "query", "--index", tmp_path / "nothing", "mnist:test[0]")
    assert code == 1 and err.strip() == f"error: index folder not found: {tmp_path / 'nothing'}"
    code, out, err = run_cli(capsys, "query", "--index", index_dir, "--checkpoint", run_dir / "b", "mnist:test[0]")
    assert code == 1 and "is not the tower this index was built with" in err and out == ""
    code, out, err = run_cli(capsys, "query", "--index", index_dir, "--grid", tmp_path / "g.jpg", "mnist:test[0]")
    assert code == 2 and "expected a .png" in err
    (tmp_path / "file").write_text("a file, not a folder")
    code, out, err = run_cli(capsys, "query", "--index", index_dir, "--grid", tmp_path / "file" / "g.png",
                             "mnist:test[0]")
    assert code == 1 and "--grid folder" in err and str(tmp_path / "file") in err and out == ""


def test_grid_png(tmp_path, index_dir, indexed, capsys):
    png = draw_digit(tmp_path / "four.png", FOUR)
    out_png = tmp_path / "grid.png"
    code, out, err = run_cli(capsys, "query", "--index", index_dir, "--k", "4", "--grid", out_png, "--json",
                             png, indexed.sources[1], indexed.sources[2])
    assert code == 0, err
    with Image.open(out_png) as img:
        assert img.format == "PNG" and img.width > img.height > 150
    # what it shows: a row per query, the query (as embedded: the drawing after the preprocessing) then its
    # 4 neighbours' pictures in the order of the answer
    sources = SourceImages()
    queries = [load_image_file(png), *(sources.get(s) for s in indexed.sources[1:3])]
    expected = [[query, *(sources.get(n["source"]) for n in answer["neighbors"])]
                for query, answer in zip(queries, json.loads(out))]
    assert [len(row) for row in expected] == [5, 5, 5]
    assert_tiles_show(grid_tiles(out_png), expected)


def test_render_grid_is_reusable(tmp_path, indexed):
    """The grid API takes any rows: e.g. the worst failures of an evaluation, with missing pictures."""
    sources = SourceImages()
    assert torch.equal(sources.get(indexed.sources[4]), indexed.images[4])
    assert sources.get("prototype:3 (5 images)") is None and sources.get(str(tmp_path / "gone.png")) is None
    rows = [
        GridRow(GridCell(indexed.images[i], f"query {i}", "#cf222e"),
                [GridCell(sources.get(indexed.sources[j]), f"n{j}") for j in range(3)] + [GridCell(None, "gone")])
        for i in range(5)
    ]
    assert render_grid(rows, tmp_path / "failures.png", title="worst failures", max_rows=3) == 3
    with Image.open(tmp_path / "failures.png") as img:
        assert img.format == "PNG"
    with pytest.raises(RetrievalError, match="nothing to draw"):
        render_grid([], tmp_path / "empty.png")
    assert not (tmp_path / "empty.png").exists()
    assert query_grid_rows([], sources) == []
