"""The digit-or-not gate (issue 26): its non-digit sources (retrieval/data/nondigits.py) and the gate itself
(retrieval/gate.py) on real data, real fonts and real training."""

from __future__ import annotations

import numpy as np
import pytest

from retrieval.data import nondigits as nd
from retrieval.gate import GateRecipe
from retrieval.workflows import Compute, Selection

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module", autouse=True)
def one_thread_module():
    """One torch thread for the module's fixtures too (they train before the per-test one_thread fixture runs; on
    2 shared cores a 2-thread team is ten times slower)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


DIGITS_OF_SCRIPTS = "0123456789" "٠٣۵" "०३९" "০৩" "૩" "೩" "๐๓" "〇一二三四五六七八九十百千万" "ⅫⅣ½²"


def test_no_digit_of_any_script_and_no_look_alike_is_a_negative():
    for ch in DIGITS_OF_SCRIPTS:
        assert nd.is_digit_char(ch), ch
        assert not nd.allowed_char(ch), ch
    for ch in "OoDQIl|!ZzSsgqbGB":
        assert not nd.allowed_char(ch), ch
    for ch in "AKMwx@#&?あカ漢ψЖक":
        assert nd.allowed_char(ch), ch


def test_hershey_records_parse_and_digit_positions_are_left_out():
    # '!' of Hershey's futural.jhf: two strokes (a bar and a dot)
    glyph = nd.parse_jhf("12345  9MWRFRT RRYQZR[SZRY\n")[0]
    assert [len(s) for s in glyph] == [2, 5]
    marks = {ch for _, ch, _ in nd.hershey_glyphs()}
    assert marks and not marks & set("0123456789") and not marks & nd.LOOK_ALIKES
    assert all(nd.allowed_char(ch) for ch in marks)


def test_svg_paths_of_kanjivg_become_polylines():
    lines = nd.svg_path_points("M10,20c1,2,3,4,5,6L30,40M0,0h5v5z", per_curve=4)
    assert len(lines) == 2
    np.testing.assert_allclose(lines[0][0], [10, 20])
    np.testing.assert_allclose(lines[0][4], [15, 26])  # the curve's end, relative to its start
    np.testing.assert_allclose(lines[0][-1], [30, 40])
    np.testing.assert_allclose(lines[1], [[0, 0], [5, 0], [5, 5], [0, 0]])


def test_latex_symbols_that_are_written_like_a_digit_are_left_out():
    for command in ("\\mathbb{1}", "\\mathds{7}", "\\mathcal{O}", "\\mathfrak{S}", "\\circ", "\\bigcirc",
                    "\\bigodot", "\\oplus", "\\varnothing", "\\textonehalf", "\\texttwosuperior", "\\mid",
                    "\\vert", "|", "/", "\\lbrace", "\\backslash", "\\prime", "\\theta", "\\ell", "\\O"):
        assert not nd.allowed_command(command), command
    for command in ("\\alpha", "\\infty", "\\rightarrow", "\\mathcal{A}", "\\sqrt{}", "\\omega", "+", "*",
                    "\\bigstar", "\\pitchfork"):
        assert nd.allowed_command(command), command


def test_glyph_svgs_become_outlines_where_their_uses_place_them():
    svg = ('<svg xmlns="http://www.w3.org/2000/svg" xmlns:xlink="http://www.w3.org/1999/xlink" viewBox="0 0 4 4">'
           '<defs><g id="a"><path d="m0 0h2v2h-2z"/></g></defs>'
           '<g transform="translate(-10 -20)"><use x="11" y="21" xlink:href="#a"/><use x="10" y="20" '
           'xlink:href="#a"/></g></svg>')
    outlines = nd.svg_outlines(svg)
    assert len(outlines) == 2
    np.testing.assert_allclose(outlines[0], [[1, 1], [3, 1], [3, 3], [1, 3], [1, 1]])
    np.testing.assert_allclose(outlines[1], [[0, 0], [2, 0], [2, 2], [0, 2], [0, 0]])


def test_outlines_fill_by_the_nonzero_rule():
    from retrieval.data.hand_drawing import draw_outlines

    def square(x0, y0, side, clockwise=True):
        pts = np.array([[x0, y0], [x0 + side, y0], [x0 + side, y0 + side], [x0, y0 + side]], np.float32)
        return pts if clockwise else pts[::-1]

    def ink(outlines) -> np.ndarray:
        return 255.0 - draw_outlines(outlines, np.random.default_rng(0)).astype(np.float32)

    def middle(a: np.ndarray) -> float:  # the ink at the picture's middle, 0 the paper's, 1 the darkest
        h, w = a.shape
        paper = float(np.median(np.r_[a[0], a[-1], a[:, 0], a[:, -1]]))
        return (float(a[h // 2 - 1:h // 2 + 2, w // 2 - 1:w // 2 + 2].mean()) - paper) / (float(a.max()) - paper)

    # a hole runs the other way round: the middle is paper; two squares that overlap running the same way round:
    # the overlap is ink (an even-odd fill would leave it empty)
    assert middle(ink([square(0, 0, 10), square(2, 2, 6, clockwise=False)])) < 0.2
    assert middle(ink([square(0, 0, 7), square(3, 3, 7)])) > 0.6


def test_latex_symbols_split_by_command(data_root):
    train = {c for c, _ in nd.handtex_part(data_root, "train")}
    selection = {c for c, _ in nd.handtex_part(data_root, "selection")}
    assert len(train) > 500 and len(selection) > 500 and not train & selection
    assert all(nd.allowed_command(c) for c in train | selection)


@pytest.mark.parametrize("source", nd.SOURCES)
def test_sources_render_deterministically_for_a_seed_and_hold_no_digit(source, data_root):
    folder = data_root / nd.FOLDER
    for f in folder.glob(f"{nd._cache_name(source, 12, 5)}.*") if folder.is_dir() else ():
        f.unlink()  # rendered here, not read from an earlier run's cache
    first = nd.load_source(source, 12, seed=5, root=data_root)
    assert first.images.shape == (12, 28, 28) and first.images.dtype == np.uint8
    assert (first.images.reshape(12, -1).max(1) > 0).sum() >= 6  # ink (synthetic blank pages have none)
    if source.startswith("handtex-"):
        assert all(nd.allowed_command(m) for m in first.marks), first.marks
    elif source not in ("synthetic", "animal-mnist"):
        assert all(nd.allowed_char(m) for m in first.marks), first.marks
    cached = nd.load_source(source, 12, seed=5, root=data_root)
    np.testing.assert_array_equal(cached.images, first.images)
    for f in folder.glob(f"{nd._cache_name(source, 12, 5)}.*"):
        f.unlink()
    again = nd.load_source(source, 12, seed=5, root=data_root)
    np.testing.assert_array_equal(again.images, first.images)
    assert again.marks == first.marks
    other = nd.load_source(source, 12, seed=6, root=data_root)
    assert not np.array_equal(other.images, first.images)


def test_a_damaged_cached_set_is_made_again(data_root):
    path = data_root / nd.FOLDER / f"{nd._cache_name('hershey', 6, 11)}.npz"
    path.unlink(missing_ok=True)  # rendered by this code, not an earlier run's
    first = nd.load_source("hershey", 6, seed=11, root=data_root)
    blob = bytearray(path.read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    path.write_bytes(bytes(blob))
    again = nd.load_source("hershey", 6, seed=11, root=data_root)
    np.testing.assert_array_equal(again.images, first.images)


def test_train_and_selection_sources_share_no_font_package():
    train, selection = set(nd.FONT_SPLIT["fonts-train"]), set(nd.FONT_SPLIT["fonts-selection"])
    assert not train & selection
    assert not set(nd.SPLITS["train"]) & set(nd.SPLITS["selection"])
    for group in nd.FONT_SPLIT:
        assert not any("dejavu" in str(f).lower() or "liberation" in str(f).lower() for _, f in nd.font_files(group))


# -- the gate ----------------------------------------------------------------------------------------------------------


def _letters(data_root, n: int, seed: int) -> np.ndarray:
    return np.concatenate([nd.load_source("hershey", n, seed=seed, root=data_root).images,
                           nd.load_source("fonts-train", n, seed=seed, root=data_root).images])


@pytest.fixture(scope="module")
def tiny_gate(untrained_run, data_root):
    """A cnn gate trained in the test: 400 digits of the training slice against 400 rendered letters, 120 steps."""
    from retrieval.checkpoint import load_checkpoint
    from retrieval.gate import GateRecipe, digit_pictures, train_gate

    ckpt = load_checkpoint(untrained_run)
    positives, _, validation = digit_pictures(ckpt.meta, root=data_root, n=400, seed=0, val_n=200)
    gate = train_gate(ckpt.tower, positives, _letters(data_root, 200, seed=0),
                      GateRecipe(steps=120, batch_size=64, lr=0.005), log_every=0)
    return ckpt, gate, validation


def test_a_tiny_gate_separates_rendered_letters_from_digits(tiny_gate, data_root):
    from retrieval.gate import attach_gate, digit_scores

    ckpt, gate, validation = tiny_gate
    attach_gate(ckpt.tower, gate)
    try:
        digits = digit_scores(ckpt.tower, validation)
        letters = digit_scores(ckpt.tower, _letters(data_root, 80, seed=1))  # other pictures than the training's
    finally:
        attach_gate(ckpt.tower, None)
    accuracy = ((digits >= 0.5).sum() + (letters < 0.5).sum()) / (len(digits) + len(letters))
    assert accuracy > 0.8, accuracy  # chance: 0.5


def test_threshold_rules():
    from retrieval.gate import acceptance_threshold, separating_threshold

    scores = np.linspace(0, 1, 101)
    t = acceptance_threshold(scores, 0.9)
    assert (scores >= t).mean() == pytest.approx(0.9, abs=0.011)
    assert (scores >= acceptance_threshold(scores, 1.0)).all()
    assert separating_threshold(np.array([0.6, 0.7, 0.9]), np.array([0.1, 0.2, 0.65])) == pytest.approx(0.7)


@pytest.fixture(scope="module")
def gated(untrained_run, data_root, tmp_path_factory):
    """`retrieval gate train` (tiny settings) on the untrained run, a 300-image index built from its output and a
    few-shot index of class prototypes (one vector per class) of the same images."""
    from retrieval.workflows import build_index, train_digit_gate

    base = tmp_path_factory.mktemp("gated")
    sidecar = train_digit_gate(untrained_run, base / "run", recipe=GateRecipe(steps=20), digits=300, non_digits=30,
                               root=data_root, device="cpu")
    for name, prototypes in (("index", False), ("prototypes", True)):
        build_index(base / "run", Selection(["mnist:train"], root=data_root, subset=300, seed=0), base / name,
                    prototypes=prototypes, compute=Compute(device="cpu"))
    return base, sidecar


def _cli_json(*args):
    import contextlib
    import io
    import json

    from retrieval.cli import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        try:
            main([str(a) for a in args])
        except SystemExit as e:
            assert not e.code, e.code
    return json.loads(out.getvalue())


def test_the_gate_ships_in_the_checkpoint_and_the_index_folder(gated, data_root):
    from retrieval.checkpoint import load_checkpoint
    from retrieval.gate import tower_gate
    from retrieval.query import Searcher

    base, sidecar = gated
    assert sidecar["gate"]["form"] == "cnn" and 0 < sidecar["gate"]["threshold"] < 1
    ckpt = load_checkpoint(base / "run")
    assert tower_gate(ckpt.tower) is not None and ckpt.meta["gate"]["threshold"] == sidecar["gate"]["threshold"]
    searcher = Searcher.open(base / "index")  # the index folder's own copy of the tower
    assert tower_gate(searcher.tower) is not None
    images = nd.load_source("hershey", 6, seed=2, root=data_root).images
    np.testing.assert_allclose(searcher.digit_scores(images), Searcher.open(base / "index", checkpoint=base / "run")
                               .digit_scores(images), atol=1e-6)


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_export_parity_includes_the_gate_output(gated, tmp_path, fmt):
    from retrieval.checkpoint import load_checkpoint
    from retrieval.export import GATE_OUTPUT_NAME, check_images, export_tower, run_exported
    from retrieval.gate import digit_scores

    base, _ = gated
    ckpt = load_checkpoint(base / "run")
    sidecar = export_tower(ckpt, fmt, tmp_path / ("tower.onnx" if fmt == "onnx" else "tower.pt"))
    assert sidecar["gate_output"]["name"] == GATE_OUTPUT_NAME
    assert set(sidecar["parity"]["max_abs_diff_per_output"]) == {"embeddings", GATE_OUTPUT_NAME}
    x = check_images()
    embeddings, scores = run_exported(tmp_path / sidecar["file"], fmt, x.numpy(), all_outputs=True)
    want = digit_scores(ckpt.tower, (x[:, 0] * 255).round().byte())
    np.testing.assert_allclose(scores, want, atol=2e-2)  # the uint8 round trip of the check images
    assert embeddings.shape == (len(x), ckpt.tower.embedding_size)


@pytest.mark.parametrize("kind", ["index", "prototypes"])
def test_calibrate_sets_the_gate_threshold_and_the_reason_reaches_cli_json(gated, data_root, kind):
    from retrieval.index import update_index_meta
    from retrieval.workflows import calibrate

    base, _ = gated
    folder = base / kind
    _, record = calibrate(folder, Selection("mnist:test", root=data_root, subset=200, seed=0), accept=0.9,
                          compute=Compute(device="cpu"))
    assert record["gate"]["answered"] == pytest.approx(0.9, abs=0.011)
    assert record["max_distance"] is None  # the gate refuses non-digits; no distance threshold without negatives
    update_index_meta(str(folder), calibration={"gate": {"threshold": 1.5}})  # no score reaches it
    answers = _cli_json("query", "--index", folder, "--json", "--root", data_root, "mnist:test[0]", "mnist:test[1]")
    assert [a["unknown"] for a in answers] == ["not a digit"] * 2 and all(a["label"] == "unknown" for a in answers)
    assert all(0 <= a["digit_score"] <= 1 for a in answers)
    update_index_meta(str(folder), calibration={"gate": {"threshold": 0.0}, "max_distance": 0.0})
    answers = _cli_json("query", "--index", folder, "--json", "--root", data_root, "mnist:test[0]")
    assert answers[0]["label"] == "unknown" and answers[0]["unknown"] == "far from every class"
    update_index_meta(str(folder), calibration={"gate": {"threshold": 0.0}, "max_distance": None})
    answers = _cli_json("query", "--index", folder, "--json", "--root", data_root, "mnist:test[0]")
    assert answers[0]["label"] != "unknown" and "unknown" not in answers[0]


# -- the service and the page ------------------------------------------------------------------------------------------


@pytest.fixture
def forced_index(gated, tmp_path, request):
    """A copy of the gated index (or, parametrized indirectly, of the prototype index) whose stored gate threshold
    no picture reaches: every answer is "not a digit"."""
    import shutil

    from retrieval.index import update_index_meta

    base, _ = gated
    folder = shutil.copytree(base / getattr(request, "param", "index"), tmp_path / "index")
    update_index_meta(str(folder), calibration={"gate": {"threshold": 1.5}})
    return folder


@pytest.mark.parametrize("forced_index", ["index", "prototypes"], indirect=True)
def test_the_unknown_reason_reaches_classify(forced_index):
    import warnings

    from serve_helpers import SEVEN, drawing

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*httpx2.*")
        from fastapi.testclient import TestClient
    from retrieval.index import update_index_meta
    from retrieval.serve import Service, create_app

    files = [("images", ("seven.png", drawing(SEVEN), "image/png"))]
    with TestClient(create_app(Service.open(forced_index))) as client:
        answer = client.post("/classify", files=files).json()[0]
    assert answer["label"] == "unknown" and answer["unknown"] == "not a digit" and 0 <= answer["digit_score"] <= 1
    update_index_meta(str(forced_index), calibration={"gate": {"threshold": 0.0}, "max_distance": 0.0})
    with TestClient(create_app(Service.open(forced_index))) as client:
        answer = client.post("/classify", files=files).json()[0]
    assert answer["label"] == "unknown" and answer["unknown"] == "far from every class"


def test_a_class_a_user_taught_is_not_refused_as_not_a_digit(forced_index, data_root, tmp_path):
    """Symbols taught to a gated index (the page's teach panel, `retrieval index add`) are answered as themselves:
    the gate refuses what would be answered as a digit, not the user's own classes."""
    from PIL import Image

    from retrieval.workflows import add_to_index

    taught = tmp_path / "taught" / "star"
    taught.mkdir(parents=True)
    for i, image in enumerate(nd.load_source("hershey", 3, seed=4, root=data_root).images):
        Image.fromarray(image).save(taught / f"{i}.png")
    add_to_index(forced_index, Selection([f"folder:{taught.parent}"], root=data_root), compute=Compute(device="cpu"))
    answers = _cli_json("query", "--index", forced_index, "--json", "--k", 1, "--root", data_root,
                        taught / "0.png", "mnist:test[0]")
    assert answers[0]["label"] == "star" and "unknown" not in answers[0]
    assert answers[1]["label"] == "unknown" and answers[1]["unknown"] == "not a digit"


def _chromium() -> str:
    import os
    import shutil

    path = next((p for p in (os.environ.get("RETRIEVAL_CHROMIUM"), "/usr/bin/chromium", shutil.which("chromium"))
                 if p and os.path.isfile(p)), None)
    if path is None:
        if os.environ.get("RETRIEVAL_REQUIRE_BROWSER"):
            pytest.fail("Chromium is not installed (apt-get install chromium) but RETRIEVAL_REQUIRE_BROWSER is set")
        pytest.skip("Chromium is not installed (apt-get install chromium)")
    return path


@pytest.fixture(scope="module")
def page_index(tmp_path_factory, data_root):
    """The serve tests' tiny trained tower with a gate trained here as `retrieval gate train` does, only smaller
    (2,000 digits against 500 pictures of each training source, 300 steps: about a minute), an index of 500 digits
    and `calibrate` as a user runs it: the gate threshold answering 95% of mnist:test digits, no distance
    threshold."""
    from serve_helpers import serve_artifacts

    from retrieval.workflows import build_index, calibrate, train_digit_gate

    base = serve_artifacts(tmp_path_factory, data_root)
    here = tmp_path_factory.mktemp("page-gate")
    train_digit_gate(base / "run", here / "run", recipe=GateRecipe(steps=300), digits=2000, non_digits=500,
                     root=data_root, device="cpu")
    build_index(here / "run", Selection(["mnist:train"], root=data_root, subset=500, seed=1), here / "index",
                compute=Compute(device="cpu"))
    _, record = calibrate(here / "index", Selection("mnist:test", root=data_root, subset=300, seed=0), accept=0.95,
                          compute=Compute(device="cpu"))
    assert record["max_distance"] is None and record["gate"]["answered"] >= 0.94
    return here / "index"


def _arc(cx, cy, r, start, stop, n=16):
    return [(cx + r * np.cos(np.radians(a)), cy + r * np.sin(np.radians(a))) for a in np.linspace(start, stop, n)]


# Mouse strokes in the pad's own 280x280 frame.
PAGE_DIGITS = {
    "7": [[(70, 62), (212, 62), (118, 232)]],
    "1": [[(120, 80), (150, 50), (150, 235)]],
    "4": [[(170, 235), (170, 45), (60, 170), (215, 170)]],
}
PAGE_NON_DIGITS = {
    "the letter K": [[(80, 40), (80, 240)], [(210, 40), (82, 150), (210, 240)]],
    "a star": [[(140, 40), (140, 240)], [(54, 92), (226, 188)], [(54, 188), (226, 92)]],
    "a smiley": [_arc(140, 140, 100, 0, 360, 24), [(105, 110), (108, 113)], [(175, 110), (178, 113)],
                 _arc(140, 150, 50, 20, 160, 12)],
}


def test_the_page_answers_drawn_digits_and_refuses_a_letter_a_star_and_a_smiley(page_index):
    """Drawn with the mouse in Chromium on `retrieval serve` over the calibrated gated index: the digits are
    answered, a letter, a star and a smiley are "unknown" because they do not look like a digit."""
    from serve_helpers import ServerProcess

    playwright_api = pytest.importorskip("playwright.sync_api")
    path = _chromium()
    with ServerProcess(page_index) as server, playwright_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=path, args=["--no-sandbox", "--disable-gpu", "--no-first-run"])
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 940})
            page.add_init_script("window.__queries = 0; const f = window.fetch; window.fetch = (...a) => "
                                 "{ if (String(a[0]).startsWith('/query')) window.__queries++; return f(...a); };")
            page.goto(server.url + "/")
            page.wait_for_function("document.getElementById('index-meta').textContent.includes('references')")
            box = page.locator("#pad").bounding_box()
            scale = box["width"] / 280

            def drawn(strokes) -> tuple[str, str]:
                page.click("#clear")
                for k, stroke in enumerate(strokes):
                    sent = page.evaluate("window.__queries")
                    points = [(box["x"] + x * scale, box["y"] + y * scale) for x, y in stroke]
                    page.mouse.move(*points[0])
                    page.mouse.down()
                    for point in points[1:]:
                        page.mouse.move(*point, steps=8)
                    page.mouse.up()
                    # each stroke is sent when it ends: the answer shown is the whole drawing's after the last
                    page.wait_for_function(f"document.body.dataset.busy === '0' && window.__queries > {sent}",
                                           timeout=20_000)
                return (page.locator("#answer-label").text_content().strip(),
                        page.locator("#answer-why").text_content())

            for digit, strokes in PAGE_DIGITS.items():
                label, why = drawn(strokes)
                assert label in "0123456789" and label != "", (digit, label, why)
                if digit == "7":
                    assert label == "7", why
            for what, strokes in PAGE_NON_DIGITS.items():
                label, why = drawn(strokes)
                assert label == "unknown" and "does not look like a digit" in why, (what, label, why)
        finally:
            browser.close()


def test_a_gate_with_digit_classes_trains_ships_and_exports(untrained_run, data_root, tmp_path):
    """`gate train --digit-classes`: eleven outputs (each digit, no digit) trained on the digits' labels; the score is
    still one digit probability, in the checkpoint, after reloading it and in the ONNX graph."""
    from retrieval.checkpoint import load_checkpoint
    from retrieval.export import check_images, export_tower, run_exported
    from retrieval.gate import digit_scores, tower_gate

    run = tmp_path / "run"
    _cli_json("gate", "train", "--checkpoint", untrained_run, "--out", run, "--steps", 20, "--digit-classes",
              "--digits", 300, "--non-digits", 30,
              "--root", data_root, "--device", "cpu", "--json")
    ckpt = load_checkpoint(run)
    gate = tower_gate(ckpt.tower)
    assert ckpt.meta["gate"]["classes"] == 10 and gate.classes == 10 and gate.net[-1].out_features == 11
    x = check_images()
    images = (x[:, 0] * 255).round().byte()
    scores = digit_scores(ckpt.tower, images)
    assert scores.shape == (len(x),) and ((scores > 0) & (scores < 1)).all()
    sidecar = export_tower(ckpt, "onnx", tmp_path / "tower.onnx")
    _, exported = run_exported(tmp_path / sidecar["file"], "onnx", x.numpy(), all_outputs=True)
    np.testing.assert_allclose(exported, scores, atol=2e-2)  # the uint8 round trip of the check images
