"""Indexes of millions (issue 18): streaming builds equal to the in-memory build, memory bounded by the chunk, the
training sample, on-disk inverted lists, per-query search parameters, `index tune`, sharded builds under torchrun
equal to one process, and index folders of earlier versions (items-*.json) still loading.

Real towers (untrained, seeded), real Faiss, real MNIST subsets, the real CLI; torchrun as a subprocess (gloo,
one thread per process), as users launch it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tracemalloc

import faiss
import numpy as np
import pytest

from retrieval import index_build, workflows
from retrieval.checkpoint import load_checkpoint
from retrieval.data.specs import load_dataset
from retrieval.embed import embed_images
from retrieval.errors import RetrievalError, UsageError
from retrieval.faiss_tools import default_train_size, lists_on_disk, search_parameters
from retrieval.index import META_NAME, build_index, load_index
from retrieval.items import SourceTable, read_items, write_items
from cli_helpers import run_cli
from retrieval.workflows import Selection

N = 3000  # images of mnist:test in the builds compared


@pytest.fixture(scope="module")
def run(untrained_run):
    return untrained_run


@pytest.fixture(scope="module")
def data(run, data_root):
    """The N images the builds index, their embeddings (one pass, in memory) and 200 query embeddings."""
    ds = load_dataset("mnist:test", subset=N, seed=1)
    tower = load_checkpoint(run).tower
    emb = embed_images(tower, ds.images, batch_size=256)
    queries = embed_images(tower, load_dataset("mnist:train", subset=200, seed=5).images, batch_size=256)
    return ds, emb, queries


def _same_answers(a, b, queries, k=10):
    d1, i1 = a.search(queries, k)
    d2, i2 = b.search(queries, k)
    np.testing.assert_array_equal(i1, i2)
    np.testing.assert_array_equal(d1, d2)
    np.testing.assert_array_equal(a.ids, b.ids)
    np.testing.assert_array_equal(a.labels, b.labels)
    assert a.sources == b.sources and a.classes == b.classes


# -- streaming build == in-memory build ----------------------------------------------------------------------------
@pytest.mark.parametrize("factory,on_disk", [("Flat", False), ("HNSW16", False), ("IVF16,Flat", False),
                                             ("IVF16,PQ8x4fs,RFlat", False), ("IVF16,PQ8,RFlat", True)])
def test_streaming_build_equals_the_in_memory_build(tmp_path, run, data, factory, on_disk, monkeypatch):
    ds, emb, queries = data
    # chunks of 512 images, on-disk blocks of 700 vectors (the default block, 262,144, lowered to the data's
    # scale): every path through chunks and blocks is taken
    monkeypatch.setattr(index_build, "DEFAULT_BLOCK_SIZE", 700)
    streamed = workflows.build_index(run, Selection(["mnist:test"], subset=N, seed=1), tmp_path / "ix",
                                     factory=factory, train_size=1500, chunk_size=500, on_disk=on_disk)
    in_memory = build_index(emb, ds.labels.numpy(), ds.classes, ds.sources, factory=factory, seed=1,
                            train_size=1500)
    assert streamed.meta["build"]["chunk_size"] == 512  # rounded up to whole embedding batches
    _same_answers(in_memory, streamed, queries)
    loaded = load_index(tmp_path / "ix")
    _same_answers(in_memory, loaded, queries)
    assert lists_on_disk(loaded.index) == on_disk
    assert loaded.meta.get("train_size") == (1500 if "IVF" in factory else None)
    assert [p.suffix for p in sorted((tmp_path / "ix").glob("items-*"))] == [".npz"]  # arrays, no JSON per item


def test_streaming_memory_is_bounded_by_the_chunk(tmp_path, run, data_root):
    """Python-side allocations (images read, embeddings, items, file buffers) peak at a few chunks, 2 MiB of file
    buffers (hashing and copying read 1 MiB blocks) and ~40 bytes per row for ids, labels and sources, whatever
    the number of images; Faiss's and torch's own memory is not traced (the index and the tower are allowed).
    Holding every image at once breaks the bound, shown by the same build with one chunk of everything."""
    n, chunk = 10_000, 512
    bound = (2 << 20) + 4 * chunk * (28 * 28 + 64 * 4) + 60 * n  # 4.8 MB; the images alone are 7.8 MB
    workflows.build_index(run, Selection(["mnist:test"], subset=100),
                          tmp_path / "warm")  # imports and caches: not counted

    def peak(chunk_size: int, subset: int | None = None) -> int:
        tracemalloc.start()
        try:
            workflows.build_index(run, Selection(["mnist:test"], subset=subset), tmp_path / f"ix{chunk_size}-{subset}",
                                  chunk_size=chunk_size)
            return tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()

    bounded, smaller = peak(chunk), peak(chunk, subset=2_000)
    assert bounded < bound, f"peak {bounded:,} bytes of Python allocations > bound {bound:,}"
    assert bounded - smaller < 100 * (n - 2_000), (bounded, smaller)  # 8,000 more images: only their item rows
    assert peak(n) > bound  # the bound catches a build that holds every image at once
    assert len(load_index(tmp_path / f"ix{chunk}-None")) == n


# -- training sample -------------------------------------------------------------------------------------------------
def test_trained_index_uses_a_seeded_sample_with_a_warning_when_too_few(tmp_path, run, capsys):
    index = faiss.index_factory(64, "IVF16,PQ8x4fs,RFlat")
    assert default_train_size(index) == 39 * 16
    code, out, err = run_cli(capsys, "index", "build", "--checkpoint", run, "--data", "mnist:test", "--subset", 2000,
                             "--factory", "IVF16,Flat", "--out", tmp_path / "default", "--json")
    assert code == 0 and "warning" not in err, err
    assert json.loads(out)["meta"]["train_size"] == 624  # 39 per centroid
    code, out, err = run_cli(capsys, "index", "build", "--checkpoint", run, "--data", "mnist:test", "--subset", 2000,
                             "--factory", "IVF16,Flat", "--train-size", 300, "--out", tmp_path / "few", "--json")
    assert code == 0 and json.loads(out)["meta"]["train_size"] == 300
    warnings = [line for line in err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "300 training vectors for 16 centroids" in warnings[0]
    assert "Faiss wants about 39 per centroid (624)" in warnings[0]
    assert "raise --train-size (up to the 2,000 vectors indexed)" in warnings[0]
    code, out, err = run_cli(capsys, "index", "build", "--checkpoint", run, "--data", "mnist:test", "--factory",
                             "IVF16,Flat", "--train-size", 10, "--subset", 2000, "--out", tmp_path / "none")
    assert code == 1 and "needs at least 16 training vectors" in err and not (tmp_path / "none").exists()


# -- on-disk inverted lists ------------------------------------------------------------------------------------------
def test_on_disk_ivf_is_searchable_anywhere_and_info_shows_sizes(tmp_path, run, data, capsys):
    ds, emb, queries = data
    folder = tmp_path / "ix"
    code, out, err = run_cli(capsys, "index", "build", "--checkpoint", run, "--data", "mnist:test", "--subset", N,
                             "--seed", 1, "--factory", "IVF16,Flat", "--train-size", 1500, "--on-disk",
                             "--out", folder)
    assert code == 0 and out.strip() == str(folder), out  # nothing else on stdout (Faiss prints when it maps)
    lists = sorted(folder.glob("lists-*.ivfdata"))
    assert len(lists) == 1 and lists[0].stat().st_size >= N * 64 * 4
    code, out, err = run_cli(capsys, "index", "info", folder)
    assert code == 0 and "IVF16,Flat  (inverted lists on disk)" in out
    assert "size on disk" in out and f"lists {lists[0].stat().st_size / 1e3:.1f} KB" in out
    assert "stay on disk, memory-mapped" in out
    code, out, err = run_cli(capsys, "index", "info", folder, "--json")
    sizes = json.loads(out)["sizes"]
    assert sizes["mapped"] == lists[0].stat().st_size and sizes["disk"]["lists"] == sizes["mapped"]
    assert sizes["memory"]["total"] < sizes["mapped"] / 2  # the lists are not in memory

    # a copied folder answers from its own lists file (the original gone), as the in-memory index does
    moved = shutil.copytree(folder, tmp_path / "elsewhere")
    shutil.rmtree(folder)
    in_memory = build_index(emb, ds.labels.numpy(), ds.classes, ds.sources, factory="IVF16,Flat", seed=1,
                            train_size=1500)
    loaded = load_index(moved)
    assert lists_on_disk(loaded.index) and loaded.lists_file.parent == moved
    _same_answers(in_memory, loaded, queries)

    # adding never writes to the committed lists file (a hard link to it keeps its bytes in view): a new one is
    # written and the old one removed
    old_bytes = (moved / lists[0].name).read_bytes()
    os.link(moved / lists[0].name, tmp_path / "kept.ivfdata")
    code, out, err = run_cli(capsys, "index", "add", "--index", moved, "--data", "mnist:train", "--subset", 30)
    assert code == 0, err
    after = load_index(moved)
    assert len(after) == N + 30 and lists_on_disk(after.index) and after.lists_file.name != lists[0].name
    assert not (moved / lists[0].name).exists() and (tmp_path / "kept.ivfdata").read_bytes() == old_bytes
    added = load_dataset("mnist:train", subset=30, seed=0)
    code, out, err = run_cli(capsys, "query", "--index", moved, "--json", "--k", "1", *added.sources[:3])
    assert code == 0
    assert [r["neighbors"][0]["source"] for r in json.loads(out)] == added.sources[:3]

    # a damaged lists file is named
    lists_now = after.lists_file
    with open(lists_now, "r+b") as f:
        f.truncate(lists_now.stat().st_size - 8)
    with pytest.raises(RetrievalError, match=f"{lists_now.name} is corrupt or was changed"):
        load_index(moved)
    code, out, err = run_cli(capsys, "index", "build", "--checkpoint", run, "--data", "mnist:test", "--subset", 100,
                             "--factory", "HNSW16", "--on-disk", "--out", tmp_path / "nope")
    assert code == 2 and "--on-disk needs an IVF index" in err and not (tmp_path / "nope").exists()


# -- search parameters per query -------------------------------------------------------------------------------------
def test_search_params_per_query_leave_the_index_alone(tmp_path, run, data, capsys):
    import faiss.contrib.torch_utils  # noqa: F401  (as pytorch-metric-learning does: it replaces Index.search)

    ds, emb, queries = data
    index = build_index(emb, ds.labels.numpy(), ds.classes, ds.sources, factory="IVF16,PQ8x4fs,RFlat", seed=1)
    assert index.meta["search_params"] == "nprobe=8,k_factor_rf=4"
    narrow = build_index(emb, ds.labels.numpy(), ds.classes, ds.sources, factory="IVF16,PQ8x4fs,RFlat", seed=1,
                         search_params="nprobe=1,k_factor_rf=1")
    d, i = index.search(queries, 10, params="nprobe=1,k_factor=1")  # k_factor: the refine stage's field
    np.testing.assert_array_equal(i, narrow.search(queries, 10)[1])
    assert not np.array_equal(i, index.search(queries, 10)[1])  # the stored setting is still in force
    for bad in ("efSearch=10", "nprobe=x", "nprobe"):
        with pytest.raises(UsageError, match="search parameters"):
            search_parameters(index.index, bad)

    folder = tmp_path / "ix"
    workflows.build_index(run, Selection(["mnist:test"], subset=N, seed=1), folder, factory="IVF16,PQ8x4fs,RFlat")
    code, wide, _ = run_cli(capsys, "query", "--index", folder, "--json", "--k", "5", "mnist:train[1]")
    code, one, _ = run_cli(capsys, "query", "--index", folder, "--json", "--k", "5", "--search-params", "nprobe=1",
                           "mnist:train[1]")
    assert code == 0 and json.loads(one) != json.loads(wide)
    code, out, err = run_cli(capsys, "query", "--index", folder, "--search-params", "efSearch=3", "mnist:train[1]")
    assert code == 2 and len(err.strip().splitlines()) == 1 and "efSearch" in err and out == ""


# -- index tune ------------------------------------------------------------------------------------------------------
def test_tune_stores_the_fastest_setting_reaching_the_recall(tmp_path, run, data, capsys):
    from retrieval.tune import Setting, exact_neighbors, fastest_reaching, recall_at_k

    folder = tmp_path / "ix"
    workflows.build_index(run, Selection(["mnist:test"], subset=N, seed=1), folder, factory="IVF32,Flat",
                          search_params="nprobe=1")
    code, out, err = run_cli(capsys, "index", "tune", "--index", folder, "--queries", "mnist:train", "--subset", 200,
                             "--recall", 0.9, "--repeats", 1, "--json")
    assert code == 0, err
    report = json.loads(out)
    chosen, settings = report["chosen"], report["settings"]
    measured = [s["search_params"] for s in settings]
    # nprobe grows until the recall is reached; larger ones only cost more and are skipped
    assert measured == [f"nprobe={p}" for p in (1, 2, 4, 8, 16, 32)][:len(measured)] and len(measured) >= 2
    assert all(s["recall"] < 0.9 for s in settings[:-1]) and settings[-1]["recall"] >= 0.9
    assert chosen["recall"] >= 0.9 and report["stored"]
    assert chosen["queries_per_s"] == max(s["queries_per_s"] for s in settings if s["recall"] >= 0.9)
    index = load_index(folder)
    assert index.meta["search_params"] == chosen["search_params"] and index.meta["tuned"]["k"] == 10
    # the stored setting reaches the recall, checked independently of the tune run
    q = embed_images(load_checkpoint(run).tower, load_dataset("mnist:train", subset=200, seed=0).images)
    flat = workflows.build_index(run, Selection(["mnist:test"], subset=N, seed=1), tmp_path / "flat")
    assert recall_at_k(index.search(q, 10)[1], flat.search(q, 10)[1]) >= 0.9
    np.testing.assert_array_equal(exact_neighbors(index, q, 10), flat.search(q, 10)[1])
    nprobe_one = recall_at_k(index.search(q, 10, params="nprobe=1")[1], flat.search(q, 10)[1])
    assert nprobe_one < 0.9  # so the choice was not trivial

    # the rule: the most queries/s among the settings reaching the recall
    picks = [Setting("nprobe=4", 0.96, 1000.0, 1.0), Setting("nprobe=2", 0.99, 3000.0, 1.0),
             Setting("nprobe=1", 0.90, 9000.0, 1.0)]
    assert fastest_reaching(picks, 0.95).search_params == "nprobe=2" and fastest_reaching(picks, 0.999) is None

    code, out, err = run_cli(capsys, "index", "tune", "--index", folder, "--queries", "mnist:train", "--subset", 100,
                             "--grid", "nprobe=1", "--recall", 1.0, "--repeats", 1)
    assert code == 1 and "no setting reaches recall@10 >= 1.0" in err
    assert load_index(folder).meta["search_params"] == chosen["search_params"]  # nothing stored
    code, out, err = run_cli(capsys, "index", "tune", "--index", tmp_path / "flat", "--queries", "mnist:train",
                             "--subset", 10)
    assert code == 2 and "nothing to tune" in err


# -- sharded builds under torchrun -----------------------------------------------------------------------------------
def _torchrun_build(tmp_path, run, data_root, out, *args) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env.update(RETRIEVAL_DATA_ROOT=str(data_root), OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    # --standalone: a rendezvous on a free local port
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m",
           "retrieval", "index", "build", "--checkpoint", str(run), "--data", "mnist:test", "--subset", str(N),
           "--seed", "1", "--chunk-size", "512", "--device", "cpu", "--out", str(out), *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)


@pytest.mark.parametrize("factory,extra", [("IVF16,PQ8x4fs,RFlat", ()), ("HNSW16", ()),
                                           ("IVF16,Flat", ("--on-disk",))])
def test_two_process_build_answers_as_one_process(tmp_path, run, data, data_root, factory, extra, capsys, one_thread):
    """The one-process build runs on one thread as each torchrun process does: on some CPUs (AMX) the kernels'
    arithmetic depends on the thread count, which is not what this compares."""
    ds, emb, queries = data
    proc = _torchrun_build(tmp_path, run, data_root, tmp_path / "two", "--factory", factory, "--train-size", 1500,
                           *extra)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == str(tmp_path / "two")  # rank 0 prints the folder, the other rank nothing
    code, out, err = run_cli(capsys, "index", "build", "--checkpoint", run, "--data", "mnist:test", "--subset", N,
                             "--seed", 1, "--chunk-size", 512, "--factory", factory, "--train-size", 1500, *extra,
                             "--out", tmp_path / "one")
    assert code == 0, err
    two, one = load_index(tmp_path / "two"), load_index(tmp_path / "one")
    assert two.meta["build"]["processes"] == 2 and one.meta["build"]["processes"] == 1
    _same_answers(one, two, queries)
    _same_answers(one, two, emb[:300], k=5)  # the indexed images themselves


# -- formats ---------------------------------------------------------------------------------------------------------
def test_index_written_with_json_items_still_loads_and_is_converted_on_save(tmp_path, run, data, capsys):
    """An index folder as the previous version wrote it: items-<token>.json with one entry per item."""
    ds, emb, queries = data
    folder = tmp_path / "old"
    index = workflows.build_index(run, Selection(["mnist:test"], subset=500, seed=2), folder)
    meta = json.loads((folder / META_NAME).read_text())
    items = folder / meta["files"]["items"]
    ids, labels, sources = read_items(items)
    old_items = folder / items.name.replace(".npz", ".json")
    old_items.write_text(json.dumps({"ids": ids.tolist(), "labels": labels.tolist(), "sources": list(sources)}))
    items.unlink()
    import hashlib

    meta["files"].update(items=old_items.name, items_sha256=hashlib.sha256(old_items.read_bytes()).hexdigest())
    (folder / META_NAME).write_text(json.dumps(meta))

    old = load_index(folder)
    _same_answers(index, old, queries)
    code, out, err = run_cli(capsys, "index", "add", "--index", folder, "--data", "mnist:train", "--subset", 5)
    assert code == 0, err
    assert sorted(p.suffix for p in folder.glob("items-*")) == [".npz"]  # converted, the JSON file removed
    assert load_index(folder).sources[:500] == list(sources)


def test_source_table_round_trips_every_kind_of_source(tmp_path):
    sources = ["mnist:train[0]", "mnist:train[59999]", "/data/forms/ä ö/x[3].png", "idx:/d/x[7]", "x[007]",
               "prototype:7 (12 images)", "mnist:test[5]", "[1]", "a[1]b", ""]
    table = SourceTable.from_strings(sources)
    assert table == sources and list(table) == sources and table[-3] == "[1]"
    assert table.prefixes == ["mnist:train", "idx:/d/x", "mnist:test"]  # "x[007]" is not canonical: kept as text
    write_items(tmp_path / "items.npz", np.arange(len(sources)), np.zeros(len(sources), int), table)
    ids, labels, back = read_items(tmp_path / "items.npz")
    assert back == sources and ids.tolist() == list(range(len(sources)))
    rows = back.rows_of(["mnist:test[5]", "x[007]", "mnist:train[1]", "/data/forms/ä ö/x[3].png"])
    assert rows.tolist() == [6, 4, -1, 2]
    table.extend(["mnist:train[3]", "new.png"])
    assert table[-2:] == ["mnist:train[3]", "new.png"] and len(table) == len(sources) + 2
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    with pytest.raises(RetrievalError, match="bad.npz is not a readable index items file"):
        read_items(tmp_path / "bad.npz")


# -- the service: search parameters per request ---------------------------------------------------------------------
def test_service_takes_search_params_per_request_as_the_cli_does(tmp_path, run, capsys):
    pytest.importorskip("fastapi")
    import base64
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*httpx2.*")
        from fastapi.testclient import TestClient
    from retrieval.serve import Service, create_app

    folder = tmp_path / "ix"
    workflows.build_index(run, Selection(["mnist:test"], subset=N, seed=1), folder, factory="IVF16,Flat")
    from retrieval.data.specs import DatasetCache
    from retrieval.serve.library import png_bytes

    cache = DatasetCache()
    items = []  # the same PNG files for the CLI and the service (both preprocess them the same way)
    for i in (1, 2, 3):
        path = tmp_path / f"train{i}.png"
        path.write_bytes(png_bytes(cache.item("mnist:train", i)[0]))
        items.append(path)
    images = [{"name": str(p), "data": base64.b64encode(p.read_bytes()).decode()} for p in items]
    with TestClient(create_app(Service.open(folder))) as client:
        for params in (None, "nprobe=1", "nprobe=16"):
            extra = ["--search-params", params] if params else []
            code, out, err = run_cli(capsys, "query", "--index", folder, "--json", "--k", 5, *extra, *items)
            body = {"images": images, "k": 5, **({"search_params": params} if params else {})}
            answer = client.post("/query", json=body)
            assert answer.status_code == 200, answer.text
            got = answer.json()
            want = json.loads(out)
            assert [[n["id"] for n in g["neighbors"]] for g in got] == [[n["id"] for n in w["neighbors"]] for w in want]
            if params == "nprobe=1":
                narrow = got
        assert narrow != got  # nprobe=1 answered differently from nprobe=16
        for bad in ("efSearch=10", "nprobe=0", "nprobe=1e30", "x"):
            resp = client.post("/query", json={"images": images[:1], "search_params": bad})
            assert resp.status_code == 400 and "search_params" in resp.json()["error"], (bad, resp.text)
        assert load_index(folder).meta["search_params"] == "nprobe=8"  # the index itself is untouched
