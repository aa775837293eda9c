"""`retrieval serve` options, each seen working on one real server process started with all of them (--host,
--uploads, --max-body-mb, --max-k, --batch-wait-ms, --threads, --access-log, --max-distance) over a small IVF index;
and micro-batching of concurrent requests that mix k, max_distance, search_params and 1 to 64 images: they share
tower forwards and Faiss searches (split at the batch's image limit) and each gets the answer it gets alone."""

from __future__ import annotations

import base64
import io
import json
import random
import socket
import time

import httpx
import numpy as np
import pytest
from PIL import Image

from serve_helpers import (
    INDEX_SIZE, SEVEN, STAR, TOKEN, RawRequest, ServerProcess, assert_same_answer, cli, drawing, get_json,
    serve_artifacts, wait_in_flight,
)

pytest.importorskip("fastapi")

HOST = "127.0.0.2"  # a loopback address other than the default 127.0.0.1
MAX_BODY_MB = 0.1
MAX_K = 7
THREADS = 2


def png(image) -> bytes:
    from retrieval.serve.library import png_bytes

    return png_bytes(image)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory, data_root):
    return serve_artifacts(tmp_path_factory, data_root)


@pytest.fixture(scope="module")
def pictures(data_root) -> list[bytes]:
    """40 mnist:test digits as 28x28 PNGs."""
    from retrieval.data import load_dataset

    ds = load_dataset("mnist:test", subset=40, seed=7)
    return [png(ds.images[i]) for i in range(len(ds))]


@pytest.fixture(scope="module")
def ivf_index(artifacts, tmp_path_factory, data_root):
    """The serve tests' 500 mnist:train images in an IVF8,Flat index (search_params such as nprobe=1 apply)."""
    folder = tmp_path_factory.mktemp("options") / "index"
    cli("index", "build", "--checkpoint", artifacts / "run", "--data", "mnist:train", "--subset", INDEX_SIZE,
        "--seed", 1, "--factory", "IVF8,Flat", "--out", folder, "--device", "cpu", "--root", data_root)
    return folder


@pytest.fixture(scope="module")
def probes(pictures) -> dict[str, bytes]:
    return {**{f"digit{i}": pictures[i] for i in range(8)}, "star": drawing(STAR), "seven": drawing(SEVEN)}


@pytest.fixture(scope="module")
def threshold(ivf_index, probes) -> float:
    """A --max-distance between the probes' nearest distances (in the widest gap of the middle ones), computed
    with the service's own code in this process: some probes fall inside it, some outside."""
    import torch

    from retrieval.serve import Service, library

    service = Service.open(ivf_index)
    images = torch.stack([library.decode_upload(data, name) for name, data in probes.items()])
    answers = library.answer_queries(service.searcher, library.embed(service.searcher, images), 1, list(probes))
    nearest = sorted(a["neighbors"][0]["distance"] for a in answers)
    gaps = [(nearest[i + 1] - nearest[i], i) for i in range(2, len(nearest) - 3)]
    width, i = max(gaps)
    assert width > 0.002, nearest
    return round((nearest[i] + nearest[i + 1]) / 2, 6)


@pytest.fixture(scope="module")
def server(artifacts, ivf_index, threshold, tmp_path_factory):
    uploads = tmp_path_factory.mktemp("options-uploads") / "taught"
    with ServerProcess(ivf_index, "--token-file", artifacts / "token.txt", "--host", HOST, "--uploads", uploads,
                       "--max-body-mb", MAX_BODY_MB, "--max-k", MAX_K, "--batch-wait-ms", 5000, "--threads", THREADS,
                       "--access-log", "--max-distance", threshold) as server:
        server.folder, server.uploads = ivf_index, uploads
        yield server


# ------------------------------------------------------------------ micro-batching of mixed requests
def mixed_requests(pictures: list[bytes]) -> list[dict]:
    """12 requests of 1-3 images with a seeded mix of k, max_distance (absent, null, 0, 5) and search_params, and
    4 of 64 images: 284 images in all, more than one batch holds (256)."""
    rng = random.Random(0)
    specs = []
    for r in range(12):
        spec = {"images": [(f"r{r}-{j}", pictures[i]) for j, i in enumerate(rng.sample(range(40), rng.randint(1, 3)))],
                "k": rng.choice([1, 3, MAX_K]), "search_params": rng.choice([None, "nprobe=1", "nprobe=2"])}
        distance = rng.choice(["absent", None, 0.0, 5.0])
        if distance != "absent":
            spec["max_distance"] = distance
        specs.append(spec)
    for r in range(12, 16):
        specs.append({"images": [(f"r{r}-{j}", pictures[(r * 7 + j) % 40]) for j in range(64)], "k": 2,
                      "search_params": "nprobe=1" if r % 2 else None})
    rng.shuffle(specs)
    for n, spec in enumerate(specs):
        spec["multipart"] = n % 2 == 1
    return specs


def http_request(url: str, spec: dict) -> httpx.Request:
    fields = {k: spec[k] for k in ("k", "max_distance", "search_params") if k in spec and spec[k] is not None}
    if spec["multipart"]:
        return httpx.Request("POST", url + "/query", data={k: str(v) for k, v in fields.items()},
                             files=[("images", (name, data, "image/png")) for name, data in spec["images"]])
    body = {"images": [{"name": name, "data": b64(data)} for name, data in spec["images"]], **fields}
    if "max_distance" in spec and spec["max_distance"] is None:
        body["max_distance"] = None
    return httpx.Request("POST", url + "/query", json=body)


def test_mixed_requests_share_batches_and_each_gets_its_own_answer(server, pictures):
    """Every request is read up to its last byte before any is complete (so all are announced to the batcher),
    then they complete one by one 20 ms apart: with --batch-wait-ms 5000 they form exactly two batches (284 images,
    256 at most per batch), and each answer equals that request's answer when it is sent alone."""
    specs = mixed_requests(pictures)
    with httpx.Client(timeout=60) as http:
        alone = []
        for spec in specs:
            resp = http.send(http_request(server.url, spec))
            assert resp.status_code == 200, resp.text
            alone.append(resp.json())
    assert {a["label"] for answers in alone for a in answers} >= {"unknown", "7"}  # the thresholds differ
    before = get_json(server.url + "/health")["batching"]
    raws = [RawRequest.of(server, http_request(server.url, spec)) for spec in specs]
    for raw in raws:
        raw.start(len(raw.body) - 1)
    wait_in_flight(server.url, len(raws))
    for raw in raws:
        raw.finish()
        time.sleep(0.02)
    answers = []
    for raw in raws:
        status, _, body = raw.response()
        raw.close()
        assert status == 200, body[:300]
        answers.append(json.loads(body))
    after = get_json(server.url + "/health")["batching"]
    assert after["jobs"] - before["jobs"] == 16
    assert after["batches"] - before["batches"] == 2, (before, after)
    assert after["largest_batch_items"] <= 256, after  # 284 images in all: one batch cannot take them
    for spec, got, want in zip(specs, answers, alone):
        assert len(got) == len(want) == len(spec["images"])
        assert [len(a["neighbors"]) for a in got] == [min(spec["k"], INDEX_SIZE)] * len(got)
        for g, w in zip(got, want):
            assert_same_answer(g, w)


# ------------------------------------------------------------------ each option
def test_host(server):
    assert server.host == HOST and server.url.startswith(f"http://{HOST}:")
    assert get_json(server.url + "/health")["status"] == "ok"
    with pytest.raises(ConnectionRefusedError):  # nothing listens on the default address
        socket.create_connection(("127.0.0.1", server.port), timeout=5).close()


def test_max_k(server, pictures):
    assert get_json(server.url + "/health")["max_k"] == MAX_K
    ok = httpx.post(server.url + "/query", json={"images": [b64(pictures[0])], "k": MAX_K})
    assert ok.status_code == 200 and len(ok.json()[0]["neighbors"]) == MAX_K
    refused = httpx.post(server.url + "/query", json={"images": [b64(pictures[0])], "k": MAX_K + 1})
    assert refused.status_code == 400 and refused.json() == {"error": f"k: must be between 1 and {MAX_K}, got 8"}
    schema = get_json(server.url + "/openapi.json")["components"]["schemas"]["QueryJSON"]
    assert schema["properties"]["k"]["maximum"] == MAX_K


def test_max_body_mb(server, pictures):
    limit = int(MAX_BODY_MB * 1024 * 1024)
    body = b'{"images": ["' + b"A" * (limit + 10) + b'"]}'
    resp = httpx.post(server.url + "/query", content=body, headers={"content-type": "application/json"})
    assert resp.status_code == 413 and resp.json() == {"error": f"request body over the limit of {limit:,} bytes"}
    assert httpx.post(server.url + "/query", json={"images": [b64(p) for p in pictures[:20]]}).status_code == 200


def test_threads(server):
    assert get_json(server.url + "/health")["compute_threads"] == {"torch": THREADS, "faiss": THREADS}


def test_access_log(server):
    httpx.get(server.url + "/index")
    server.wait_for(r'"GET /index HTTP/1\.1" 200', timeout=30)


def test_max_distance(server, probes, threshold):
    health = get_json(server.url + "/health")
    assert health["max_distance"] == threshold
    assert f"unknown past distance {threshold:.4f}" in server.log
    files = [("images", (name, data, "image/png")) for name, data in probes.items()]
    answers = httpx.post(server.url + "/query", files=files, data={"k": "1"}).json()
    for answer in answers:
        nearest = answer["neighbors"][0]
        assert (answer["label"] == "unknown") == (nearest["distance"] > threshold), answer
    assert {a["label"] == "unknown" for a in answers} == {True, False}
    classified = httpx.post(server.url + "/classify", files=files).json()
    assert all(c["max_distance"] == threshold for c in classified)


def test_uploads(server):
    from retrieval.index import load_index

    pictures = [drawing(STAR, jitter=(i, 2 * i)) for i in range(2)]
    resp = httpx.post(server.url + "/items", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=60,
                      files=[("images", (f"kite{i}.png", p, "image/png")) for i, p in enumerate(pictures)],
                      data={"label": "kite"})
    assert resp.status_code == 201, resp.text
    stored = sorted((server.uploads / "kite").glob("*.png"))
    assert len(stored) == 2
    default = server.folder.parent / f"{server.folder.name}.uploads"
    assert not default.exists()
    index = load_index(server.folder)
    sources = {index.sources[p] for p in index.positions_of(np.array(resp.json()["ids"]))}
    assert sources == {str(p.resolve()) for p in stored}
    assert all(Image.open(io.BytesIO(p.read_bytes())).size == (28, 28) for p in stored)


# ------------------------------------------------------------------ --workers
def test_workers_share_the_port_and_each_answers_as_one_server_does(artifacts, pictures):
    """--workers 2: two processes accept on the one port (/health names the one that answered), each answers a
    query as the service in this process does, and SIGTERM stops both."""
    import os
    import torch

    from retrieval.serve import Service, library

    folder = artifacts / "index"
    service = Service.open(folder)
    images = torch.stack([library.decode_upload(p, f"d{i}.png") for i, p in enumerate(pictures[:4])])
    want = library.answer_queries(service.searcher, library.embed(service.searcher, images), 3,
                                  [f"d{i}.png" for i in range(4)])
    with ServerProcess(folder, "--workers", 2) as server:
        assert "2 worker processes" in server.log
        pids, deadline = set(), time.time() + 60
        while len(pids) < 2 and time.time() < deadline:  # each request on a new connection
            pids.add(get_json(server.url + "/health")["pid"])
        assert len(pids) == 2 and server.proc.pid not in pids, pids
        for _ in range(4):  # whichever worker takes the connection
            files = [("images", (f"d{i}.png", p, "image/png")) for i, p in enumerate(pictures[:4])]
            got = httpx.post(server.url + "/query", files=files, data={"k": "3"}, timeout=60).json()
            for g, w in zip(got, want):
                assert_same_answer(g, w)
        assert server.stop() == 0
    for pid in pids:
        assert not os.path.exists(f"/proc/{pid}"), pid  # stopped and reaped


def test_workers_refuse_adding(artifacts):
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "retrieval", "serve", "--index", str(artifacts / "index"),
                           "--workers", "2", "--token-file", str(artifacts / "token.txt"), "--port", "0"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and "listening" not in done.stderr
    assert "--workers: adding images (--token-file) needs one worker" in done.stderr, done.stderr
