"""`retrieval serve`: every endpoint through the real app (TestClient), answers equal to the CLI's, tokens, each
bad input answered 4xx with {"error"} and nothing changed, adds that persist across a restart, schemathesis
against /openapi.json, and a real server process under concurrent load and stopped by SIGTERM mid-request."""

from __future__ import annotations

import asyncio
import collections
import base64
import io
import json
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from cli_helpers import HEIC_HEAD, run_cli
from serve_helpers import (
    SEVEN, STAR, TOKEN, RawRequest, ServerProcess, assert_same_answer, copy_index, drawing, get_json, serve_artifacts,
    wait_in_flight,
)

pytest.importorskip("fastapi")


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory, data_root):
    return serve_artifacts(tmp_path_factory, data_root)


def open_client(index: Path, token_file: Path | None = None, **limits):
    import warnings

    with warnings.catch_warnings():  # newer Starlette suggests httpx2 for its TestClient; httpx is what we have
        warnings.filterwarnings("ignore", message=".*httpx2.*")
        from fastapi.testclient import TestClient

    from retrieval.serve import Limits, Service, create_app

    service = Service.open(index, token_file=token_file, limits=Limits(**limits))
    return TestClient(create_app(service)), service


@pytest.fixture(scope="module")
def served(artifacts, tmp_path_factory):
    """A TestClient over a copy of the index (adding enabled with the token), and that copy's folder."""
    folder = copy_index(artifacts, tmp_path_factory.mktemp("served") / "index")
    client, service = open_client(folder, artifacts / "token.txt")
    with client:
        yield client, folder, service


@pytest.fixture(scope="module")
def mnist_test(data_root):
    from retrieval.data import load_dataset

    return load_dataset("mnist:test", root=data_root, subset=40, seed=3)


def png(image) -> bytes:
    from retrieval.serve.library import png_bytes

    return png_bytes(image)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def assert_error(resp, status: int, *needles: str):
    assert resp.status_code == status, (resp.status_code, resp.text[:500])
    assert resp.headers["content-type"].startswith("application/json")
    body = resp.json()
    assert set(body) == {"error"} and body["error"], body
    for needle in needles:
        assert needle in body["error"], (needle, body)


def meta_bytes(folder: Path) -> bytes:
    return (folder / "meta.json").read_bytes()


# ------------------------------------------------------------------ endpoints and equality with the CLI
def test_health_index_page_and_docs(served, capsys):
    client, folder, _ = served
    health = client.get("/health").json()
    assert health["status"] == "ok" and health["items"] == 500 and health["classes"] == 10 and health["adding"]
    code, out, err = run_cli(capsys, "index", "info", folder, "--json")
    assert code == 0, err
    assert client.get("/index").json() == json.loads(out)
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "<canvas" in page.text and 'id="answer-label"' in page.text
    assert "http://" not in page.text and "https://" not in page.text  # self-contained: no CDN, no external asset
    doc = client.get("/openapi.json").json()
    assert {"/health", "/index", "/query", "/classify", "/items", "/items/{item_id}/image"} <= set(doc["paths"])
    assert client.get("/docs").status_code == 200


def test_query_answers_equal_the_cli(served, tmp_path, capsys):
    client, folder, _ = served
    files = [tmp_path / "seven.png", tmp_path / "star.png", tmp_path / "seven-moved.png"]
    files[0].write_bytes(drawing(SEVEN))
    files[1].write_bytes(drawing(STAR))
    files[2].write_bytes(drawing(SEVEN, jitter=(12, -5)))
    for extra_cli, extra_api in ([], {}), (["--k", "7"], {"k": 7}), (["--k", "3", "--max-distance", "0.2"],
                                                                    {"k": 3, "max_distance": 0.2}):
        code, out, err = run_cli(capsys, "query", "--index", folder, "--json", *extra_cli, *files)
        assert code == 0, err
        expected = json.loads(out)
        as_json = client.post("/query", json={"images": [{"name": str(f), "data": b64(f.read_bytes())} for f in files],
                                              **extra_api})
        assert as_json.status_code == 200, as_json.text
        assert as_json.json() == expected
        as_upload = client.post("/query", files=[("images", (str(f), f.read_bytes(), "image/png")) for f in files],
                                data={k: str(v) for k, v in extra_api.items()})
        assert as_upload.status_code == 200, as_upload.text
        assert as_upload.json() == expected
    assert expected[0]["label"] == "unknown" or expected[0]["neighbors"][0]["distance"] <= 0.2
    # a k larger than the index is clamped as the CLI does it
    client2, _ = open_client(folder, max_k=1000)
    with client2:
        code, out, _ = run_cli(capsys, "query", "--index", folder, "--json", "--k", "600", files[0])
        answer = client2.post("/query", json={"images": [{"name": str(files[0]), "data": b64(files[0].read_bytes())}],
                                              "k": 600}).json()
        assert answer == json.loads(out) and len(answer[0]["neighbors"]) == 500


def test_classify_uses_the_calibrated_threshold(artifacts, tmp_path, mnist_test):
    from retrieval.index import update_index_meta

    folder = copy_index(artifacts, tmp_path / "index")
    images = [png(mnist_test.images[i]) for i in range(8)] + [drawing(STAR)]
    files = [("images", (f"{i}.png", d, "image/png")) for i, d in enumerate(images)]
    client, _ = open_client(folder)
    with client:  # no calibration: every image gets its nearest neighbour's label
        plain = client.post("/classify", files=files).json()
    assert all(a["max_distance"] is None and a["label"] == a["nearest"]["label"] for a in plain)
    right = sum(a["label"] == mnist_test.classes[int(mnist_test.labels[i])] for i, a in enumerate(plain[:8]))
    assert right >= 6
    # the threshold `retrieval calibrate` stores in the metadata (set here between the distances seen)
    middle = sorted(a["distance"] for a in plain)[4:6]
    threshold = (middle[0] + middle[1]) / 2  # halfway between two distances (the answers round them to 6 places)
    update_index_meta(folder, calibration={"max_distance": threshold, "f1": 0.9, "queries": "test"})
    client, _ = open_client(folder)
    with client:
        assert client.get("/health").json()["max_distance"] == threshold
        answers = client.post("/classify", files=files).json()
        for a, p in zip(answers, plain):
            assert a["max_distance"] == threshold and a["distance"] == p["distance"] == a["nearest"]["distance"]
            assert a["label"] == ("unknown" if a["distance"] > threshold else p["label"])
        assert {a["label"] == "unknown" for a in answers} == {True, False}
        forced = client.post("/classify", json={"images": [b64(images[0])], "max_distance": 0}).json()
        assert forced[0]["label"] == "unknown" and forced[0]["max_distance"] == 0
        k3 = client.post("/classify", json={"images": [b64(images[0])], "k": 3, "max_distance": 10}).json()
        assert k3[0]["label"] in mnist_test.classes and k3[0]["max_distance"] == 10


def test_item_image_is_the_stored_reference(served, data_root):
    from retrieval.data import load_dataset
    from retrieval.data.specs import parse_item_spec

    client, folder, service = served
    index = service.searcher.index
    item_id = int(index.ids[17])
    resp = client.get(f"/items/{item_id}/image")
    assert resp.status_code == 200 and resp.headers["content-type"] == "image/png"
    spec, pos = parse_item_spec(index.sources[17])
    expected = load_dataset(spec, root=data_root).images[pos].numpy()
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(resp.content))), expected)
    assert_error(client.get("/items/987654/image"), 404, "987654")
    assert_error(client.get("/items/-1/image"), 404)
    assert_error(client.get("/items/99999999999999999999999/image"), 404)
    assert_error(client.get("/items/seven/image"), 422, "item_id")


# ------------------------------------------------------------------ limits and bad input
def bad_requests(good: bytes, tmp_path: Path):
    """(description, request kwargs, status, needle) for each kind of bad input."""
    text = b"this is not a picture\n"
    flat = io.BytesIO()
    Image.new("L", (40, 40), 255).save(flat, format="PNG")
    upload = lambda *parts: [("images", (name, data, "image/png")) for name, data in parts]  # noqa: E731
    return [
        ("empty upload", dict(files=upload(("empty.png", b""))), 400, "empty.png: empty file"),
        ("text upload", dict(files=upload(("notes.png", text))), 400, "notes.png: not a readable image"),
        ("HEIC upload", dict(files=upload(("IMG_0001.HEIC", HEIC_HEAD + bytes(100)))), 400,
         "IMG_0001.HEIC: a HEIC/HEIF picture (as iPhones save photos)"),
        ("truncated PNG", dict(files=upload(("cut.png", good[:60]))), 400, "cut.png"),
        ("inkless image", dict(files=upload(("blank.png", flat.getvalue()))), 400, "no ink"),
        ("one bad among good", dict(files=upload(("a.png", good), ("b.png", text))), 400, "b.png"),
        ("too many images", dict(files=upload(*[(f"{i}.png", good) for i in range(9)])), 400, "at most 8"),
        ("k zero", dict(files=upload(("a.png", good)), data={"k": "0"}), 400, "k: must be between 1 and 100"),
        ("k too big", dict(json={"images": [b64(good)], "k": 101}), 400, "between 1 and 100"),
        ("k not a number", dict(json={"images": [b64(good)], "k": "five"}), 400, "k: expected an integer"),
        ("k a bool", dict(json={"images": [b64(good)], "k": True}), 400, "k: expected an integer"),
        ("negative max_distance", dict(json={"images": [b64(good)], "max_distance": -1}), 400, "max_distance"),
        ("wrong content type", dict(content=good, headers={"content-type": "image/png"}), 415, "image/png"),
        ("no content type", dict(content=b"{}"), 415, "no content type"),
        ("missing images (JSON)", dict(json={"k": 3}), 400, "images: missing"),
        ("missing images (multipart)", dict(data={"k": "3"}, files=[("other", ("x.txt", b"x", "text/plain"))]),
         400, "unexpected file field 'other'"),
        ("images as text field", dict(data={"images": "abc"}, files=[("k", (None, b"3"))]), 400, "images"),
        ("not JSON", dict(content=b"{images:", headers={"content-type": "application/json"}), 400, "not valid JSON"),
        ("JSON list", dict(json=[b64(good)]), 400, "JSON object"),
        ("unknown field", dict(json={"images": [b64(good)], "colour": "red"}), 400, "unexpected field 'colour'"),
        ("bad base64", dict(json={"images": ["@@@@"]}), 400, "images[0]: not valid base64"),
        ("base64 of text", dict(json={"images": [b64(text)]}), 400, "not a readable image"),
        ("images not a list", dict(json={"images": b64(good)}), 400, "images: expected a list"),
        ("image object without data", dict(json={"images": [{"name": "x"}]}), 400, "images[0]"),
        ("no images", dict(json={"images": []}), 400, "no image"),
    ]


def test_each_bad_input_is_a_clear_4xx_and_changes_nothing(served, tmp_path, monkeypatch):
    client, folder, _ = served
    good = drawing(SEVEN)
    small, service = open_client(folder, max_images=8, max_body_bytes=200_000)
    before = meta_bytes(folder)
    with small:
        for description, kwargs, status, needle in bad_requests(good, tmp_path):
            for path in ("/query", "/classify"):
                assert_error(small.post(path, **kwargs), status, needle)
            if "k" not in description and "max_distance" not in description:  # /items has no k
                resp = small.post("/items", **_with_label(kwargs))
                assert 400 <= resp.status_code < 500 and set(resp.json()) == {"error"}, (description, resp.text)
        # the body limit, declared and streamed (no Content-Length)
        big = b"x" * 300_000
        assert_error(small.post("/query", content=big, headers={"content-type": "application/json"}), 413, "limit")

        def chunks():
            for _ in range(30):
                yield b"y" * 10_000

        assert_error(small.post("/query", content=chunks(), headers={"content-type": "application/json"}), 413)
        # the pixel budget: the CLI's, from $RETRIEVAL_MAX_PIXELS, checked before decoding
        monkeypatch.setenv("RETRIEVAL_MAX_PIXELS", "10000")
        assert_error(small.post("/query", files=[("images", ("big.png", good, "image/png"))]), 413, "pixel budget")
        monkeypatch.delenv("RETRIEVAL_MAX_PIXELS")
        assert small.get("/health").json()["status"] == "ok"
        assert small.post("/query", files=[("images", ("ok.png", good, "image/png"))]).status_code == 200
    assert meta_bytes(folder) == before


def test_pictures_decoded_in_parallel_are_answered_in_order(served, tmp_path):
    """The pictures of a request are decoded by several threads at once: the answers keep the request's order, and
    of two undecodable pictures the error names the first one, even when the second fails sooner."""
    from cli_helpers import write_png_header_only

    client, folder, _ = served
    rng = np.random.default_rng(0)
    noisy = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (1200, 1200), dtype=np.uint8)).save(noisy, format="PNG")
    slow_to_fail = noisy.getvalue()[: len(noisy.getvalue()) * 9 // 10]  # decodes 90% of its rows, then fails
    quick_to_fail = write_png_header_only(tmp_path / "h.png", 50, 50).read_bytes()  # no pixel data at all
    parallel, service = open_client(folder, decode_threads=2)
    with parallel:
        assert service.decode_threads == 2 and parallel.get("/health").json()["decode_threads"] == 2
        files = [("images", ("slow.png", slow_to_fail, "image/png")), ("images", ("quick.png", quick_to_fail,
                                                                                 "image/png"))]
        assert_error(parallel.post("/query", files=files), 400, "slow.png: cannot decode image")
        pictures = [drawing(SEVEN, jitter=(i, -i)) for i in range(5)] + [drawing(STAR)]
        together = parallel.post("/query", json={"images": [{"name": f"p{i}", "data": b64(d)}
                                                            for i, d in enumerate(pictures)]}).json()
        for i, d in enumerate(pictures):
            alone = client.post("/query", json={"images": [{"name": f"p{i}", "data": b64(d)}]}).json()[0]
            assert_same_answer(together[i], alone)


def test_a_photo_is_turned_upright_by_its_exif_orientation(served):
    """A picture stored turned (pixels rotated, EXIF orientation 6 saying how to show it) is answered as the
    upright picture: exactly for a PNG, the same answer for a JPEG."""
    client, _, _ = served
    upright = Image.open(io.BytesIO(drawing(SEVEN, jitter=(10, 0))))
    stored = upright.transpose(Image.Transpose.ROTATE_90)  # orientation 6: turn 90 degrees clockwise to show it
    exif = Image.Exif()
    exif[0x0112] = 6

    def encoded(img, fmt, **kw) -> bytes:
        buf = io.BytesIO()
        img.save(buf, format=fmt, **kw)
        return buf.getvalue()

    def answer(data: bytes) -> dict:
        resp = client.post("/query", files=[("images", ("p", data, "image/*"))], data={"k": "5"})
        assert resp.status_code == 200, resp.text
        return resp.json()[0]

    want = answer(encoded(upright, "PNG"))
    assert answer(encoded(stored, "PNG", exif=exif)) == want
    assert answer(encoded(stored, "PNG")) != want  # without the tag it is another picture
    jpeg_upright = answer(encoded(upright, "JPEG", quality=95))
    jpeg_turned = answer(encoded(stored, "JPEG", quality=95, exif=exif))
    assert jpeg_turned["label"] == jpeg_upright["label"] == want["label"]
    assert [n["id"] for n in jpeg_turned["neighbors"][:3]] == [n["id"] for n in jpeg_upright["neighbors"][:3]]


def _with_label(kwargs: dict) -> dict:
    kwargs = dict(kwargs)
    kwargs["headers"] = {**kwargs.get("headers", {}), "Authorization": f"Bearer {TOKEN}"}
    if isinstance(kwargs.get("json"), dict):
        kwargs["json"] = {**kwargs["json"], "label": "star"}
    elif "files" in kwargs:
        kwargs["data"] = {**kwargs.get("data", {}), "label": "star"}
    return kwargs


# ------------------------------------------------------------------ adding items
def test_adding_needs_the_token(served, artifacts, tmp_path):
    client, folder, _ = served
    before = meta_bytes(folder)
    body = {"images": [b64(drawing(STAR))], "label": "star"}
    resp = client.post("/items", json=body)
    assert_error(resp, 401, "token")
    assert resp.headers["www-authenticate"] == "Bearer"
    assert_error(client.post("/items", json=body, headers={"Authorization": "Bearer nope"}), 403, "wrong token")
    assert_error(client.post("/items", json=body, headers={"Authorization": f"Basic {TOKEN}"}), 403)
    closed, _ = open_client(folder)  # no --token-file: adding is disabled
    with closed:
        assert_error(closed.post("/items", json=body, headers={"Authorization": f"Bearer {TOKEN}"}), 403, "disabled")
    assert meta_bytes(folder) == before
    from retrieval.errors import UsageError
    from retrieval.serve import Service

    (tmp_path / "empty.txt").write_text("\n")
    for path, needle in ((tmp_path / "missing.txt", "not found"), (tmp_path / "empty.txt", "one token")):
        with pytest.raises(UsageError, match=needle):
            Service.open(folder, token_file=path)


def test_add_then_query_finds_it_and_a_restart_keeps_it(artifacts, tmp_path, capsys):
    folder = copy_index(artifacts, tmp_path / "index")
    auth = {"Authorization": f"Bearer {TOKEN}"}
    examples = [drawing(STAR, jitter=j) for j in ((0, 0), (6, -4), (-5, 5))]
    client, _ = open_client(folder, artifacts / "token.txt")
    with client:
        bad_label = client.post("/items", headers=auth, data={"label": "unknown"},
                                files=[("images", ("s.png", examples[0], "image/png"))])
        assert_error(bad_label, 400, "'unknown'")
        assert_error(client.post("/items", headers=auth, json={"images": [b64(examples[0])], "label": "a/b"}), 400)
        assert_error(client.post("/items", headers=auth, json={"images": [b64(examples[0])]}), 400, "label")
        added = client.post("/items", headers=auth, data={"label": "star"},
                            files=[("images", (f"ex{i}.png", d, "image/png")) for i, d in enumerate(examples)])
        assert added.status_code == 201, added.text
        out = added.json()
        assert out["label"] == "star" and out["ids"] == [500, 501, 502] and out["count"] == 503
        assert out["label_counts"]["star"] == 3
        probe = drawing(STAR, jitter=(3, 3))
        answer = client.post("/query", json={"images": [b64(probe)]}).json()[0]
        assert answer["label"] == "star", answer
        assert {n["id"] for n in answer["neighbors"][:3]} == {500, 501, 502}
        stored = client.get("/items/501/image")
        assert stored.status_code == 200 and Image.open(io.BytesIO(stored.content)).size == (28, 28)
        assert client.get("/index").json()["label_counts"]["star"] == 3
    uploads = sorted((folder.parent / "index.uploads" / "star").glob("*.png"))
    assert len(uploads) == 3
    # an add that fails half-way (its images cannot be stored) changes nothing
    before = meta_bytes(folder)
    broken, _ = open_client(folder, artifacts / "token.txt")
    with broken:
        shutil.move(folder.parent / "index.uploads", tmp_path / "moved")
        (folder.parent / "index.uploads").write_text("not a folder")
        resp = broken.post("/items", headers=auth, json={"images": [b64(examples[0])], "label": "ring"})
        assert_error(resp, 400, "uploads")
        assert broken.get("/health").json()["items"] == 503
    assert meta_bytes(folder) == before
    (folder.parent / "index.uploads").unlink()
    shutil.move(tmp_path / "moved", folder.parent / "index.uploads")
    # a restart (a new service on the same folder) and the CLI both see the added items
    again, _ = open_client(folder)
    with again:
        assert again.get("/health").json()["items"] == 503
        assert again.post("/query", json={"images": [b64(probe)]}).json()[0]["label"] == "star"
    probe_file = tmp_path / "probe.png"
    probe_file.write_bytes(probe)
    code, out, err = run_cli(capsys, "query", "--index", folder, "--json", probe_file)
    assert code == 0 and json.loads(out)[0]["label"] == "star", err
    code, out, err = run_cli(capsys, "index", "build", "--checkpoint", artifacts / "run", "--data",
                             f"folder:{folder.parent / 'index.uploads'}", "--out", tmp_path / "rebuilt")
    assert code == 0, err  # the uploads folder is a folder: dataset of what was taught


def _hold_folder_lock(folder: Path) -> subprocess.Popen:
    """Another process holding the index folder's writer lock until its stdin is closed."""
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys\nfrom retrieval.fsutil import exclusive_lock\n"
                               "with exclusive_lock(sys.argv[1]):\n    print('held', flush=True)\n    sys.stdin.read()",
         str(folder)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    return holder


def test_an_add_waits_for_another_writer_and_answers_409_past_the_timeout(artifacts, tmp_path):
    folder = copy_index(artifacts, tmp_path / "index")
    auth = {"Authorization": f"Bearer {TOKEN}"}
    body = {"label": "star", "images": [b64(drawing(STAR))]}
    uploads = folder.parent / "index.uploads"
    client, _ = open_client(folder, artifacts / "token.txt", lock_timeout=0.5)
    before = meta_bytes(folder)
    with client:
        holder = _hold_folder_lock(folder)
        try:
            t0 = time.perf_counter()
            assert_error(client.post("/items", headers=auth, json=body), 409, "being written by another process")
            assert time.perf_counter() - t0 >= 0.5  # it waited for the writer first
            assert meta_bytes(folder) == before and not list(uploads.rglob("*.png"))
            assert client.get("/health").json()["items"] == 500
        finally:
            holder.stdin.close()
            holder.wait()
        # a writer that finishes within the timeout is waited for
        holder = _hold_folder_lock(folder)
        releaser = threading.Timer(0.2, holder.stdin.close)
        releaser.start()
        try:
            waited, _ = open_client(folder, artifacts / "token.txt", lock_timeout=30)
            with waited:
                resp = waited.post("/items", headers=auth, json=body)
        finally:
            releaser.join()
            holder.wait()
        assert resp.status_code == 201 and resp.json()["count"] == 501, resp.text
    assert len(list(uploads.rglob("*.png"))) == 1


def test_a_prototype_index_refuses_a_class_it_already_has(artifacts, tmp_path, capsys):
    folder = tmp_path / "prototypes"
    code, _, err = run_cli(capsys, "index", "build", "--checkpoint", artifacts / "run", "--data", "mnist:train",
                           "--subset", 200, "--seed", 2, "--prototypes", "--out", folder)
    assert code == 0, err
    auth = {"Authorization": f"Bearer {TOKEN}"}
    uploads = folder.parent / "prototypes.uploads"
    before = meta_bytes(folder)
    client, _ = open_client(folder, artifacts / "token.txt")
    with client:
        assert client.get("/health").json()["items"] == 10
        resp = client.post("/items", headers=auth, json={"label": "7", "images": [b64(drawing(SEVEN))]})
        assert_error(resp, 409, "one prototype per class", "'7'")
        assert meta_bytes(folder) == before and not list(uploads.rglob("*"))
        added = client.post("/items", headers=auth, json={"label": "star", "images": [b64(drawing(STAR))]})
        assert added.status_code == 201, added.text
        assert added.json()["label_counts"]["star"] == 1 and added.json()["count"] == 11


# ------------------------------------------------------------------ schemathesis
@pytest.fixture(scope="module")
def live_server(artifacts, tmp_path_factory):
    folder = copy_index(artifacts, tmp_path_factory.mktemp("live") / "index")
    with ServerProcess(folder, "--token-file", artifacts / "token.txt", "--max-images", "16") as server:
        server.folder = folder
        yield server


@pytest.mark.filterwarnings("ignore")
def test_openapi_schemathesis(live_server):
    """schemathesis against /openapi.json of a real server (20 valid and 20 invalid generated requests per
    operation, derandomized): no 5xx, and every answer has a documented status, content type and schema."""
    schemathesis = pytest.importorskip("schemathesis")
    from hypothesis import HealthCheck, given, settings
    from hypothesis.errors import Unsatisfiable
    from schemathesis import GenerationMode
    from schemathesis.checks import (
        content_type_conformance, not_a_server_error, response_schema_conformance, status_code_conformance,
    )

    checks = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]
    schema = schemathesis.openapi.from_url(live_server.url + "/openapi.json")
    tested, statuses = [], collections.Counter()
    for result in schema.get_all_operations():
        operation = result.ok()
        headers = {"Authorization": f"Bearer {TOKEN}"} if operation.path == "/items" else None
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            @given(case=operation.as_strategy(generation_mode=mode))
            @settings(max_examples=20, deadline=None, derandomize=True, database=None,
                      suppress_health_check=list(HealthCheck))
            def check(case):
                response = case.call_and_validate(headers=headers, checks=checks)
                statuses[operation.label, response.status_code] += 1

            try:
                check()
            except Unsatisfiable:  # nothing to make invalid (GET /health, GET /index)
                if mode is GenerationMode.POSITIVE:
                    raise
        tested.append(operation.label)
    assert len(tested) == 6, tested
    assert {status for (_, status) in statuses} >= {200, 400, 404}, statuses  # answers and refusals both reached
    assert get_json(live_server.url + "/health")["status"] == "ok"


# ------------------------------------------------------------------ a real server: load, concurrent adds, SIGTERM
def test_load_concurrent_clients_are_batched_and_all_answered(live_server, mnist_test):
    """16 clients x 20 requests on loopback: every answer 200 and the same as the query alone; batches form. (The
    number of requests is bounded, each with a timeout; how long they take is the benchmark's business.)"""
    images = [png(mnist_test.images[i]) for i in range(16)]
    alone = [httpx.post(live_server.url + "/query", json={"images": [b64(d)], "k": 3}).json()[0] for d in images]
    before = get_json(live_server.url + "/health")["batching"]

    async def client(i: int, http: httpx.AsyncClient) -> list:
        out = []
        for r in range(20):
            j = (i + r) % len(images)
            resp = await http.post("/query", files=[("images", ("0", images[j], "image/png"))], data={"k": "3"})
            out.append((j, resp.status_code, resp.json()))
        return out

    async def run():
        async with httpx.AsyncClient(base_url=live_server.url, timeout=60) as http:
            return await asyncio.gather(*(client(i, http) for i in range(16)))

    results = [x for per_client in asyncio.run(run()) for x in per_client]
    assert len(results) == 320 and all(status == 200 for _, status, _ in results)
    for j, _, body in results:
        assert_same_answer(body[0], alone[j])
    after = get_json(live_server.url + "/health")["batching"]
    jobs, batches = after["jobs"] - before["jobs"], after["batches"] - before["batches"]
    assert jobs == 320 and batches < jobs, (jobs, batches)  # requests shared tower forwards and searches
    # no --access-log: no line per request (test_serve_options checks the lines with it)
    assert '"POST /query HTTP/1.1"' not in live_server.log


def test_concurrent_adds_each_keep_their_label_images_and_files(live_server, capsys):
    """8 concurrent adds, each of its own label and two pictures of its own: every id answers with its request's
    label and image, the uploads folder holds exactly the added pictures, nothing is lost or mixed."""
    from retrieval.index import load_index
    from retrieval.serve.library import decode_upload

    url, folder = live_server.url, live_server.folder
    uploads = folder.parent / "index.uploads"
    files_before = set(uploads.rglob("*")) if uploads.exists() else set()
    start_count = get_json(url + "/health")["items"]
    sent = {f"sym{i}": [drawing(STAR, jitter=(i, -i)), drawing(SEVEN, jitter=(-i, 2 * i))] for i in range(8)}
    results = {}

    def add(label: str):
        resp = httpx.post(url + "/items", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=60,
                          json={"label": label, "images": [b64(d) for d in sent[label]]})
        results[label] = (resp.status_code, resp.json())

    threads = [threading.Thread(target=add, args=(label,)) for label in sent]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(status == 201 for status, _ in results.values()), results
    ids = sorted(i for _, body in results.values() for i in body["ids"])
    assert len(ids) == 16 and len(set(ids)) == 16
    assert get_json(url + "/health")["items"] == start_count + 16
    index = load_index(folder)
    assert len(index) == start_count + 16
    added_files = set()
    for label, (_, body) in results.items():
        assert body["label"] == label and len(body["ids"]) == 2
        positions = index.positions_of(np.array(body["ids"]))
        assert [index.classes[index.labels[p]] for p in positions] == [label, label]
        for item_id, picture, pos in zip(body["ids"], sent[label], positions):
            stored = httpx.get(f"{url}/items/{item_id}/image")
            assert stored.status_code == 200
            assert np.array_equal(np.asarray(Image.open(io.BytesIO(stored.content))),
                                  decode_upload(picture, "sent").numpy()), (label, item_id)
            source = Path(index.sources[pos])
            assert source.parent == uploads / label
            added_files.add(source)
    files_after = {f for f in uploads.rglob("*") if f.is_file()}
    assert files_after - {f for f in files_before if f.is_file()} == added_files  # no stray or temporary file
    code, out, err = run_cli(capsys, "index", "info", folder, "--json")
    assert code == 0 and json.loads(out)["meta"]["count"] == start_count + 16, err


def test_a_cli_add_while_serving_survives_the_next_served_add(live_server, capsys):
    """`retrieval index add` writes the folder while the server runs; the server's next add starts from the folder
    as saved (with the CLI's items), not from the index it loaded."""
    from retrieval.index import load_index

    url, folder = live_server.url, live_server.folder
    before = get_json(url + "/health")["items"]
    ids_before = set(load_index(folder).ids.tolist())
    code, _, err = run_cli(capsys, "index", "add", "--index", folder, "--data", "mnist:test", "--subset", 5,
                           "--seed", 11)
    assert code == 0, err
    cli_ids = set(load_index(folder).ids.tolist()) - ids_before
    assert len(cli_ids) == 5
    resp = httpx.post(url + "/items", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=60,
                      json={"label": "ring", "images": [b64(drawing([[(60, 60), (140, 60), (140, 140), (60, 140),
                                                                       (60, 60)]]))]})
    assert resp.status_code == 201, resp.text
    assert resp.json()["count"] == before + 6
    index = load_index(folder)
    assert len(index) == before + 6 and cli_ids <= set(index.ids.tolist())
    assert sum(1 for s in index.sources if str(s).startswith("mnist:test[")) >= 5
    assert get_json(url + "/health")["items"] == before + 6


def test_clients_that_hang_up_mid_body_are_not_errors(live_server):
    """Clients that send half a body and leave (JSON and multipart): nothing in the server's log at its default
    level (no 'unexpected error', no traceback), and it keeps answering."""
    lines_before = len(live_server.lines)
    picture = drawing(SEVEN)
    requests = [httpx.Request("POST", live_server.url + "/query", json={"images": [b64(picture)]}),
                httpx.Request("POST", live_server.url + "/query", files=[("images", ("a.png", picture, "image/png"))]),
                httpx.Request("POST", live_server.url + "/classify", json={"images": [b64(picture)] * 3})]
    for i in range(30):
        raw = RawRequest.of(live_server, requests[i % len(requests)])
        raw.start(len(raw.body) // 2)
        raw.close()
    deadline = time.time() + 30
    while get_json(live_server.url + "/health")["in_flight"] > 0:  # until the server has seen every one leave
        assert time.time() < deadline, "requests still in flight"
        time.sleep(0.02)
    assert live_server.lines[lines_before:] == [], "".join(live_server.lines[lines_before:])
    answer = httpx.post(live_server.url + "/query", json={"images": [b64(picture)]})
    assert answer.status_code == 200


def test_sigterm_lets_the_request_in_flight_finish_and_a_stalled_body_is_cut(artifacts, tmp_path):
    """SIGTERM arrives while an add request is half sent: the server stops taking connections, answers that
    request (201, persisted), then exits 0. After a restart, a body that stops arriving is answered 408 after
    --read-timeout and its connection closed (it holds nothing); Ctrl-C (SIGINT) stops the server cleanly."""
    folder = copy_index(artifacts, tmp_path / "index")
    body = json.dumps({"label": "star", "images": [b64(drawing(STAR))]}).encode()
    with ServerProcess(folder, "--token-file", artifacts / "token.txt") as server:
        request = RawRequest(server, "POST", "/items", body, "application/json",
                             {"Authorization": f"Bearer {TOKEN}"}).start(100)
        wait_in_flight(server.url, 1)  # the server has read the head and is reading the body
        server.proc.send_signal(signal.SIGTERM)
        deadline = time.time() + 30
        while True:  # shutting down: new connections are refused
            try:
                socket.create_connection((server.host, server.port), timeout=5).close()
            except ConnectionRefusedError:
                break
            assert time.time() < deadline, "the server still accepts connections after SIGTERM"
            time.sleep(0.02)
        assert server.proc.poll() is None  # still answering the request in flight
        status, _, answer = request.finish().response()
        request.close()
        code = server.stop(signal.SIGTERM)
        assert code == 0, server.log
        assert status == 201, answer[:500]
        assert json.loads(answer)["ids"] == [500]
        assert "stopped (SIGTERM)" in server.log and "Traceback" not in server.log
    from retrieval.index import load_index

    assert load_index(folder).label_counts()["star"] == 1
    with ServerProcess(folder, "--read-timeout", "1") as server:  # a restart keeps the item
        assert get_json(server.url + "/health")["items"] == 501
        stalled = RawRequest(server, "POST", "/query", body, "application/json").start(len(body) // 2)
        status, headers, answer = stalled.response()
        assert status == 408 and headers["connection"] == "close", (status, headers)
        assert json.loads(answer) == {"error": "the request body did not arrive within 1 s"}
        assert stalled.closed_by_server()
        stalled.close()
        assert get_json(server.url + "/health")["in_flight"] == 0
        assert server.stop(signal.SIGINT) == 0, server.log
        assert "stopped (SIGINT)" in server.log and "Traceback" not in server.log
