"""EmbeddingIndex, index folders and `retrieval index build|add|info`: real towers, real Faiss, real MNIST subsets."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from retrieval.checkpoint import save_checkpoint
from retrieval.data.specs import load_dataset
from retrieval.embed import embed_images
from retrieval.errors import RetrievalError, UsageError
from retrieval import workflows
from retrieval.index import META_NAME, build_index, load_index, load_index_tower, save_index, update_index_meta
from retrieval.towers import build_tower
from cli_helpers import run_cli
from retrieval.workflows import Selection


# -- fixtures ---------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two untrained default towers (different seeds) and one 32-d tower, saved as run folders."""
    base = tmp_path_factory.mktemp("runs")
    out = {}
    for name, seed, size in (("a", 0, None), ("b", 1, None), ("small", 2, 32)):
        torch.manual_seed(seed)
        save_checkpoint(base / name / "best", build_tower("default", size))
        out[name] = base / name
    return out


@pytest.fixture(scope="module")
def test_subset():
    return load_dataset("mnist:test", subset=300, seed=0)


@pytest.fixture(scope="module")
def embedded(runs, test_subset):
    from retrieval.checkpoint import load_checkpoint

    ckpt = load_checkpoint(runs["a"])
    return ckpt, embed_images(ckpt.tower, test_subset.images, batch_size=128)


def built_index(tmp_path, runs, name="idx", subset=200, **kw) -> Path:
    out = tmp_path / name
    workflows.build_index(runs["a"], Selection(["mnist:test"], subset=subset), out, **kw)
    return out


# -- in-memory index --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("factory", ["Flat", "HNSW32", "IVF4,Flat", "IVF4,PQ8x4", "IVF4,PQ8x4,RFlat"])
def test_build_save_load_returns_identical_neighbours(tmp_path, embedded, test_subset, factory):
    _, emb = embedded
    index = build_index(emb, test_subset.labels.numpy(), test_subset.classes, test_subset.sources,
                        factory=factory, seed=3, tower={"name": "default"})
    dist, ids = index.search(emb[:40], 7)
    save_index(index, tmp_path / "ix")
    loaded = load_index(tmp_path / "ix")
    dist2, ids2 = loaded.search(emb[:40], 7)
    np.testing.assert_array_equal(ids, ids2)
    np.testing.assert_array_equal(dist, dist2)
    assert loaded.meta["factory"] == factory and loaded.meta["count"] == 300 and loaded.meta["dimension"] == 64
    assert loaded.sources == test_subset.sources
    np.testing.assert_array_equal(loaded.labels, test_subset.labels.numpy())
    np.testing.assert_array_equal(loaded.labels_of(ids2), test_subset.labels.numpy()[ids2])
    assert np.all(np.diff(dist2, axis=1) >= 0)
    # the same seed and data give the same index (determinism rule)
    again = build_index(emb, test_subset.labels.numpy(), test_subset.classes, test_subset.sources,
                        factory=factory, seed=3)
    np.testing.assert_array_equal(again.search(emb[:40], 7)[1], ids)


def test_distances_are_euclidean_for_both_metrics(embedded, test_subset):
    _, emb = embedded
    labels, classes, sources = test_subset.labels.numpy(), test_subset.classes, test_subset.sources
    exact = np.sqrt(((emb[:5, None, :] - emb[None, :, :]) ** 2).sum(-1))
    want_ids = np.argsort(exact, axis=1, kind="stable")[:, :4]
    for metric in ("ip", "l2"):
        dist, ids = build_index(emb, labels, classes, sources, metric=metric).search(emb[:5], 4)
        np.testing.assert_allclose(dist, np.take_along_axis(exact, want_ids, 1), atol=2e-3)
        assert ids[:, 0].tolist() == list(range(5))  # each vector finds itself first


def test_a_batch_of_queries_is_searched_through_blas_and_faiss_keeps_its_own_setting():
    """From BLAS_FROM_QUERIES queries a flat search goes through Faiss's BLAS kernels (cheaper per query there), a
    lone query through Faiss's one-at-a-time ones; the process-wide setting is Faiss's own again after the search."""
    import faiss

    from retrieval.embedding_index import as_unit_float32
    from retrieval.faiss_tools import BLAS_FROM_QUERIES

    rng = np.random.default_rng(0)
    x = rng.standard_normal((5000, 64)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    index = build_index(x, np.zeros(5000, np.int64), ["a"], [None] * 5000)
    queries = x[:BLAS_FROM_QUERIES] + 0.1 * rng.standard_normal((BLAS_FROM_QUERIES, 64)).astype(np.float32)
    own = faiss.cvar.distance_compute_blas_threshold

    def raw(q, threshold):  # Faiss itself, its path forced; distances as EmbeddingIndex gives them
        faiss.cvar.distance_compute_blas_threshold = threshold
        try:
            scores, ids = index.index.search(as_unit_float32(q), 5)  # (scaled as EmbeddingIndex.search does)
        finally:
            faiss.cvar.distance_compute_blas_threshold = own
        return np.sqrt(np.maximum(0.0, 2.0 - 2.0 * scores)).astype(np.float32), ids

    blas, one_by_one = raw(queries, 1), raw(queries, 2**30)
    assert not np.array_equal(blas[0], one_by_one[0])  # the two paths round differently: the test can tell them
    batch = index.search(queries, 5)
    lone = [index.search(q[None], 5) for q in queries]
    np.testing.assert_array_equal(batch[0], blas[0])
    np.testing.assert_array_equal(batch[1], blas[1])
    np.testing.assert_array_equal(np.concatenate([d for d, _ in lone]), one_by_one[0])
    np.testing.assert_array_equal(np.concatenate([i for _, i in lone]), one_by_one[1])
    assert faiss.cvar.distance_compute_blas_threshold == own


def test_k_beyond_index_size_pads_with_missing(embedded, test_subset):
    _, emb = embedded
    index = build_index(emb[:6], test_subset.labels.numpy()[:6], test_subset.classes, test_subset.sources[:6])
    dist, ids = index.search(emb[:2], 10)
    assert (ids[:, 6:] == -1).all() and np.isinf(dist[:, 6:]).all()
    assert sorted(ids[0, :6].tolist()) == list(range(6))
    assert (index.labels_of(ids)[:, 6:] == -1).all()
    with pytest.raises(UsageError):
        index.search(emb[:2], 0)
    with pytest.raises(RetrievalError, match="dimension 32"):
        index.search(emb[:2, :32], 3)


def test_training_needs_enough_points(embedded, test_subset, caplog):
    _, emb = embedded
    args = (test_subset.labels.numpy(), test_subset.classes, test_subset.sources)
    with caplog.at_level(logging.WARNING, logger="retrieval"):
        build_index(emb, *args, factory="IVF16,Flat")
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "39 per centroid" in warnings[0] and "IVF16,Flat" in warnings[0]
    with pytest.raises(RetrievalError, match="at least 512 training vectors"):
        build_index(emb, *args, factory="IVF512,Flat")
    with pytest.raises(UsageError, match="Faiss cannot build"):
        build_index(emb, *args, factory="NotAnIndex99")
    with pytest.raises(UsageError, match="metric"):
        build_index(emb, *args, metric="cosine")
    # an IDMap prefix is accepted (ids are always kept) and dropped
    assert build_index(emb, *args, factory="IDMap2,Flat").meta["factory"] == "Flat"


def test_add_appends_new_ids_and_classes(embedded, test_subset):
    _, emb = embedded
    index = build_index(emb[:100], test_subset.labels.numpy()[:100], test_subset.classes, test_subset.sources[:100])
    new = index.add(emb[100:103], [0, 1, 0], ["A", "7"], ["x.png", "y.png", "z.png"], data=[{"spec": "folder:x"}])
    assert new.tolist() == [100, 101, 102]
    assert index.classes[-1] == "A" and len(index) == 103
    assert [index.classes[i] for i in index.labels_of(new)] == ["A", "7", "A"]
    dist, ids = index.search(emb[101:102], 1)
    assert ids[0, 0] == 101 and index.sources_of(ids)[0] == "y.png"
    assert index.meta["data"][-1]["ids"] == [100, 102]


# -- index folders: bad and damaged files -------------------------------------------------------------------------
def test_load_errors_name_the_broken_file(tmp_path, runs):
    folder = built_index(tmp_path, runs)
    meta = json.loads((folder / META_NAME).read_text())
    faiss_file = folder / meta["files"]["faiss"]
    good_bytes = faiss_file.read_bytes()

    with pytest.raises(RetrievalError, match="index folder not found"):
        load_index(tmp_path / "nowhere")

    faiss_file.write_bytes(good_bytes[: len(good_bytes) // 2])  # truncated
    with pytest.raises(RetrievalError, match=f"{faiss_file.name} is corrupt"):
        load_index(folder)
    # without the checksum, Faiss itself must refuse the garbage, and we say which file
    meta_nosum = {**meta, "files": {k: v for k, v in meta["files"].items() if not k.endswith("sha256")}}
    (folder / META_NAME).write_text(json.dumps(meta_nosum))
    faiss_file.write_bytes(b"this is not a faiss index" * 10)
    with pytest.raises(RetrievalError, match=f"{faiss_file.name} is not a readable Faiss index"):
        load_index(folder)
    faiss_file.write_bytes(good_bytes)
    assert len(load_index(folder)) == 200

    for key, value, pattern in (("count", 150, "says 150 vectors"), ("dimension", 32, "says dimension 32")):
        (folder / META_NAME).write_text(json.dumps({**meta_nosum, key: value}))
        with pytest.raises(RetrievalError, match=pattern):
            load_index(folder)

    (folder / META_NAME).write_text(json.dumps(meta))
    faiss_file.unlink()
    with pytest.raises(RetrievalError, match=f"index file not found: .*{faiss_file.name}"):
        load_index(folder)

    (folder / META_NAME).write_text("{not json")
    with pytest.raises(RetrievalError, match="meta.json is not valid JSON"):
        load_index(folder)
    (folder / META_NAME).write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(RetrievalError, match="not retrieval index metadata"):
        load_index(folder)
    (folder / META_NAME).unlink()
    with pytest.raises(RetrievalError, match="index metadata not found: .*meta.json"):
        load_index(folder)


def test_items_file_disagreeing_with_faiss_is_refused(tmp_path, runs):
    folder = built_index(tmp_path, runs)
    meta = json.loads((folder / META_NAME).read_text())
    items_path = folder / meta["files"]["items"]
    assert items_path.suffix == ".npz"  # arrays, not one JSON object per item
    with np.load(items_path) as z:
        items = {name: z[name] for name in z.files}
    items["ids"] = items["ids"][:-1]
    with open(items_path, "wb") as f:
        np.savez(f, **items)
    meta["files"].pop("items_sha256")
    (folder / META_NAME).write_text(json.dumps(meta))
    with pytest.raises(RetrievalError, match=f"{items_path.name} lists 199 ids"):
        load_index(folder)


def test_tower_must_match(tmp_path, runs):
    folder = built_index(tmp_path, runs)
    index = load_index(folder)
    assert load_index_tower(index).fingerprint == index.meta["tower"]["fingerprint"]
    with pytest.raises(RetrievalError, match="is not the tower this index was built with"):
        load_index_tower(index, checkpoint=runs["b"])
    with pytest.raises(RetrievalError, match="embeds into 32 dimensions"):
        load_index_tower(index, checkpoint=runs["small"])


def test_update_index_meta(tmp_path, runs):
    folder = built_index(tmp_path, runs)
    update_index_meta(folder, calibration={"max_distance": 0.7, "fpr": 0.05})
    assert load_index(folder).meta["calibration"]["max_distance"] == 0.7
    update_index_meta(folder, calibration=None)
    assert "calibration" not in load_index(folder).meta
    with pytest.raises(ValueError, match="count"):
        update_index_meta(folder, count=3)
    with pytest.raises(RetrievalError, match="not found"):
        update_index_meta(tmp_path / "missing", calibration={})


# -- CLI ---------------------------------------------------------------------------------------------------------
def test_cli_build_add_info_query(tmp_path, runs, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, out, err = run_cli(capsys, "index", "build", "--checkpoint", runs["a"], "--data", "mnist:test",
                             "--subset", "150", "--factory", "HNSW32")
    assert code == 0, err
    folder = Path(out.strip())
    assert folder == Path("indexes") / "a-mnist-test-subset150"
    assert "images/s" in err
    meta = json.loads((folder / META_NAME).read_text())
    assert meta["tower"]["checkpoint"] == str((runs["a"] / "best.safetensors").resolve())
    assert meta["data"][0]["spec"] == "mnist:test" and meta["count"] == 150
    assert meta["search_params"] == "efSearch=64"

    # the new items: training images not in the index yet
    code, out, err = run_cli(capsys, "index", "add", "--index", folder, "--data", "mnist:train", "--subset", "20",
                             "--seed", "4")
    assert code == 0, err
    assert "added 20 vectors (ids 150..169)" in err
    added = load_dataset("mnist:train", subset=20, seed=4)
    code, out, err = run_cli(capsys, "query", "--index", folder, "--json", "--k", "3", *added.sources[:5])
    assert code == 0, err
    for item, source in zip(json.loads(out), added.sources[:5]):
        first = item["neighbors"][0]
        assert first["source"] == source and first["id"] >= 150 and first["distance"] < 1e-3

    code, out, err = run_cli(capsys, "index", "info", folder)
    assert code == 0 and "vectors        170" in out and "mnist:train: 20 images" in out and "labels (10):" in out
    code, out, err = run_cli(capsys, "index", "info", folder, "--json")
    info = json.loads(out)
    assert sum(info["label_counts"].values()) == 170 and info["meta"]["count"] == 170

    # adding with another tower's checkpoint is refused, nothing changes
    code, out, err = run_cli(capsys, "index", "add", "--index", folder, "--data", "mnist:test", "--subset", "5",
                             "--checkpoint", runs["b"])
    assert code == 1 and "is not the tower this index was built with" in err
    assert load_index(folder).meta["count"] == 170


def test_cli_exclude_drops_classes_in_build_add_evaluate_and_info(tmp_path, runs, capsys):
    """--exclude (README, dataset specs) on the commands that take it: the dropped digits never reach the index,
    the queries or the counts, and the seeded subset is drawn from what is left, as the library draws it."""
    folder = tmp_path / "no35"
    code, _, err = run_cli(capsys, "index", "build", "--checkpoint", runs["a"], "--data", "mnist:test", "--exclude",
                           "3,5", "--subset", 120, "--out", folder)
    assert code == 0, err
    index = load_index(folder)
    kept = load_dataset("mnist:test", exclude="3,5", subset=120, seed=0)
    assert list(index.sources) == kept.sources and set(index.label_counts()) == set("01246789")
    assert index.meta["data"][0]["filters"] == kept.filters and kept.filters["exclude"] == ["3", "5"]
    code, _, err = run_cli(capsys, "index", "add", "--index", folder, "--data", "mnist:train", "--exclude",
                           "0,1,2,3,4,5,6,7,8", "--subset", 10)
    assert code == 0, err
    index = load_index(folder)
    assert [index.classes[c] for c in index.labels[120:]] == ["9"] * 10
    code, out, err = run_cli(capsys, "evaluate", "--index", folder, "--queries", "mnist:test", "--exclude", "3,5",
                             "--subset", 80, "--json")
    assert code == 0, err
    result = json.loads(out)
    assert result["n_queries"] == 80 and result["n_lone"] == 0 and set(result["per_class"]) == set("01246789")
    code, out, err = run_cli(capsys, "data", "info", "mnist:test", "--exclude", "0,1,2,3,4,5,6,7", "--json")
    assert code == 0, err
    assert json.loads(out)["per_class"] == {"8": 974, "9": 1009}


def test_cli_errors_are_one_line(tmp_path, runs, capsys):
    code, out, err = run_cli(capsys, "index", "info", tmp_path / "absent")
    assert code == 1 and err.strip() == f"error: index folder not found: {tmp_path / 'absent'}"
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    code, out, err = run_cli(capsys, "index", "build", "--checkpoint", runs["a"], "--data", "mnist:test",
                             "--out", tmp_path / "busy")
    assert code == 2 and "holds other files (notes.txt)" in err
    code, out, err = run_cli(capsys, "index", "build", "--checkpoint", runs["a"], "--data", "mnist:test",
                             "--out", tmp_path / "new", "--factory", "IVF9999,Flat", "--subset", "100")
    assert code == 1 and "needs at least 9,999 training vectors" in err
    assert not (tmp_path / "new").exists()  # a failed first build leaves nothing behind
    code, out, err = run_cli(capsys, "index", "build", "--checkpoint", tmp_path / "nockpt", "--data", "mnist:test",
                             "--out", tmp_path / "new")
    assert code == 1 and "checkpoint not found" in err and "Traceback" not in err
    (tmp_path / "file").write_text("a file, not a folder")
    code, out, err = run_cli(capsys, "index", "build", "--checkpoint", runs["a"], "--data", "mnist:test",
                             "--out", tmp_path / "file" / "ix")
    assert code == 1 and "output folder" in err and str(tmp_path / "file") in err and out == ""
    code, out, err = run_cli(capsys, "index", "build", "--checkpoint", runs["a"], "--data", "mnist:test",
                             "--out", tmp_path / "new", "--metric", "cosine")
    assert code == 2 and "--metric" in err and not (tmp_path / "new").exists()


def test_prototype_index(tmp_path, runs, embedded, test_subset):
    ckpt, emb = embedded
    index = workflows.build_index(runs["a"], Selection(["mnist:test"], subset=300), tmp_path / "protos",
                                  prototypes=True)
    assert len(index) == 10 and index.meta["prototypes"] is True
    labels = test_subset.labels.numpy()
    for pos, source in enumerate(index.sources):
        c = int(index.labels[pos])
        n = int((labels == c).sum())
        assert source == f"prototype:{test_subset.classes[c]} ({n} images)"
        mean = emb[labels == c].mean(0)
        want = mean / np.linalg.norm(mean)
        got = index.index.reconstruct(int(index.ids[pos]))
        np.testing.assert_allclose(got, want, atol=1e-5)
    with pytest.raises(UsageError, match="one prototype per class"):
        workflows.add_to_index(tmp_path / "protos", Selection(["mnist:train"], subset=30))


def test_quiet_keeps_stderr_for_warnings_and_errors(tmp_path, runs, capsys):
    code, out, err = run_cli(capsys, "index", "build", "--checkpoint", runs["a"], "--data", "mnist:test",
                             "--subset", 50, "--out", tmp_path / "loud")
    assert code == 0 and "index: 50 vectors" in err
    code, out, err = run_cli(capsys, "--quiet", "index", "build", "--checkpoint", runs["a"], "--data", "mnist:test",
                             "--subset", 50, "--out", tmp_path / "quiet")
    assert code == 0 and err == "" and out.strip() == str(tmp_path / "quiet")
    code, out, err = run_cli(capsys, "--quiet", "index", "build", "--checkpoint", runs["a"], "--data", "mnist:test",
                             "--subset", 50, "--factory", "IVF4,Flat", "--out", tmp_path / "warned")
    assert code == 0 and err.startswith("warning: factory 'IVF4,Flat'") and len(err.splitlines()) == 1
