"""Artifacts that travel: self-contained index folders, ONNX/TorchScript export, the wheel, --version, --json,
model cards, and the scikit-learn replacements of our own ROC AUC / threshold / PCA code.

Real towers, real MNIST subsets, real Faiss, onnxruntime and torch.jit, a real wheel built and installed."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from cli_helpers import run_cli
from retrieval import workflows
from retrieval.checkpoint import load_checkpoint, save_checkpoint
from retrieval.data.specs import load_dataset
from retrieval.embed import embed_images
from retrieval.index import META_NAME, build_index, load_index, save_index, tower_files
from retrieval.query import Searcher
from retrieval.towers import build_tower
from retrieval.workflows import Selection

REPO = Path(__file__).resolve().parents[1]
QUERIES = [f"mnist:test[{i}]" for i in range(8)]


def _tower(name: str, size=None, deskew=False, shifts=0, seed=0):
    """A tower with random weights and random batch-norm statistics (so eval-mode batch norm is not an identity)."""
    torch.manual_seed(seed)
    tower = build_tower(name, size, deskew, shifts)
    with torch.no_grad():
        for m in tower.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.3, 0.3)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    return tower


@pytest.fixture(scope="module")
def run(tmp_path_factory, data_root):
    """A run folder with a short real training run (card.md and all), as `retrieval train` leaves it."""
    base = tmp_path_factory.mktemp("artifacts")
    config = base / "tiny.toml"
    config.write_text("# tiny\nname = \"tiny\"\n[data]\nsubset = 600\nval_size = 100\n[sampler]\nm = 8\n"
                      "[train]\nepochs = 1\nbatch_size = 80\n")
    out = workflows.train(config, base / "run", device="cpu", progress=False, data_root=data_root)
    return out


# -- self-contained index folders ---------------------------------------------------------------------------------
def _query_json(capsys, index: Path, *extra) -> list[dict]:
    code, out, err = run_cli(capsys, "query", "--index", index, "--k", 4, "--json", *QUERIES, *extra)
    assert code == 0, err
    return json.loads(out)


def test_an_index_folder_moved_away_from_its_deleted_run_answers_the_same(tmp_path, run, data_root, capsys):
    shutil.copytree(run, tmp_path / "run")  # a run of our own to delete
    code, out, err = run_cli(capsys, "index", "build", "--checkpoint", tmp_path / "run", "--data", "mnist:test",
                             "--subset", 300, "--out", tmp_path / "built", "--json")
    assert code == 0, err
    built = json.loads(out)
    assert built["folder"] == str(tmp_path / "built") and built["meta"]["count"] == 300 and built["seconds"] > 0
    assert sum(built["label_counts"].values()) == 300

    meta = json.loads((tmp_path / "built" / META_NAME).read_text())
    files = tower_files(meta)
    assert set(files) == {"weights", "sidecar", "card"}
    fingerprint = meta["tower"]["fingerprint"]
    for name in files.values():  # relative names, carrying the fingerprint, files in the folder
        assert "/" not in name and name.startswith(f"tower-{fingerprint[:16]}.")
        assert (tmp_path / "built" / name).is_file()
    assert (tmp_path / "built" / files["weights"]).read_bytes() == (tmp_path / "run" / "best.safetensors").read_bytes()
    assert (tmp_path / "built" / files["card"]).read_text() == (tmp_path / "run" / "card.md").read_text()
    size = sum(p.stat().st_size for p in (tmp_path / "built").iterdir())
    tower_size = sum((tmp_path / "built" / n).stat().st_size for n in files.values())
    assert tower_size < size and tower_size < 2_000_000  # the default tower's copy is about 1 MB

    before = _query_json(capsys, tmp_path / "built")
    evaluated_before = workflows.evaluate(tmp_path / "built", Selection("mnist:test", subset=100, seed=3), (1,
                                          4)).payload

    # what `cp -r` / `mv` / rsync do: the folder elsewhere, under another name; the run folder deleted
    shutil.move(tmp_path / "built", tmp_path / "elsewhere" / "copied")
    shutil.rmtree(tmp_path / "run")
    moved = tmp_path / "elsewhere" / "copied"
    assert _query_json(capsys, moved) == before
    after = workflows.evaluate(moved, Selection("mnist:test", subset=100, seed=3), (1, 4)).payload
    assert {k: after[k] for k in ("recall@1", "map@r")} == {k: evaluated_before[k] for k in ("recall@1", "map@r")}
    searcher = Searcher.open(moved)  # what the service opens
    assert searcher.index.meta["tower"]["fingerprint"] == fingerprint
    code, _, err = run_cli(capsys, "calibrate", "--index", moved, "--queries", "mnist:test", "--subset", 100)
    assert code == 0, err
    code, _, err = run_cli(capsys, "index", "add", "--index", moved, "--data", "mnist:train", "--subset", 20)
    assert code == 0, err
    assert len(load_index(moved)) == 320 and tower_files(load_index(moved).meta) == files
    assert sorted(p.name for p in moved.iterdir() if p.name.startswith("tower-")) == sorted(files.values())
    code, out, _ = run_cli(capsys, "index", "info", moved)
    assert code == 0 and files["weights"] in out and "(missing" not in out


def test_saving_a_loaded_index_keeps_or_copies_its_tower(tmp_path, run, data_root):
    index = workflows.build_index(run, Selection(["mnist:test"], subset=50), tmp_path / "a")
    names = tower_files(index.meta)
    weights = tmp_path / "a" / names["weights"]
    inode = weights.stat().st_ino
    loaded = load_index(tmp_path / "a")
    save_index(loaded, tmp_path / "a")  # a new version in the same folder: the tower files stay as they are
    assert weights.stat().st_ino == inode
    save_index(loaded, tmp_path / "b")  # saved elsewhere: copied from the folder it was loaded from
    shutil.rmtree(tmp_path / "a")
    assert Searcher.open(tmp_path / "b").query(["mnist:test[3]"], 2)[0].neighbors


def test_a_damaged_or_foreign_tower_copy_is_refused(tmp_path, run, data_root, capsys):
    workflows.build_index(run, Selection(["mnist:test"], subset=50), tmp_path / "ix")
    names = tower_files(load_index(tmp_path / "ix").meta)
    weights = tmp_path / "ix" / names["weights"]
    original = weights.read_bytes()
    damaged = bytearray(original)
    damaged[-9] ^= 0xFF  # a bit of the last tensor's data
    weights.write_bytes(bytes(damaged))
    code, _, err = run_cli(capsys, "query", "--index", tmp_path / "ix", "mnist:test[0]")
    assert code == 1 and names["weights"] in err and "fingerprint" in err
    # another tower's files under this name: the fingerprints differ
    other = tmp_path / "other"
    save_checkpoint(other / "best", _tower("default", seed=5))
    weights.write_bytes((other / "best.safetensors").read_bytes())
    (tmp_path / "ix" / names["sidecar"]).write_bytes((other / "best.json").read_bytes())
    code, _, err = run_cli(capsys, "query", "--index", tmp_path / "ix", "mnist:test[0]")
    assert code == 1 and "is not the tower this index was built with" in err
    # metadata naming a file outside the folder is refused
    meta = json.loads((tmp_path / "ix" / META_NAME).read_text())
    meta["tower"]["files"]["weights"] = "../../run/best.safetensors"
    (tmp_path / "ix" / META_NAME).write_text(json.dumps(meta))
    code, _, err = run_cli(capsys, "query", "--index", tmp_path / "ix", "mnist:test[0]")
    assert code == 1 and "tower-<hex>.safetensors" in err


def _as_written_by_an_earlier_version(folder: Path) -> None:
    """What index folders were before towers were copied: meta["tower"] = name, size, fingerprint, absolute path."""
    meta = json.loads((folder / META_NAME).read_text())
    for name in tower_files(meta).values():
        (folder / name).unlink()
    meta["tower"].pop("files")
    meta["tool_version"] = "0.1.0"
    (folder / META_NAME).write_text(json.dumps(meta, indent=2))


def test_indexes_of_earlier_versions_still_load_with_a_hint_to_rebuild(tmp_path, run, data_root, capsys):
    shutil.copytree(run, tmp_path / "run")
    workflows.build_index(tmp_path / "run", Selection(["mnist:test"], subset=200), tmp_path / "old")
    current = _query_json(capsys, tmp_path / "old")
    _as_written_by_an_earlier_version(tmp_path / "old")
    shutil.copytree(tmp_path / "old", tmp_path / "old2")

    code, out, err = run_cli(capsys, "query", "--index", tmp_path / "old", "--k", 4, "--json", *QUERIES)
    assert code == 0 and json.loads(out) == current  # through the absolute path it names
    assert "earlier version" in err and "rebuild" in err
    code, out, _ = run_cli(capsys, "index", "info", tmp_path / "old")
    assert code == 0 and "earlier version" in out

    # `index add` makes it self-contained
    code, _, err = run_cli(capsys, "index", "add", "--index", tmp_path / "old", "--data", "mnist:train", "--subset", 10)
    assert code == 0, err
    assert set(tower_files(load_index(tmp_path / "old").meta)) == {"weights", "sidecar", "card"}

    # its checkpoint gone: a clear error; a copy of it given as --checkpoint works (with the hint)
    shutil.copytree(tmp_path / "run", tmp_path / "run-copy")
    shutil.rmtree(tmp_path / "run")
    code, _, err = run_cli(capsys, "query", "--index", tmp_path / "old2", "mnist:test[0]")
    assert code == 1 and "is gone" in err and "--checkpoint" in err and "rebuild" in err
    code, out, err = run_cli(capsys, "query", "--index", tmp_path / "old2", "--k", 4, "--json", *QUERIES,
                             "--checkpoint", tmp_path / "run-copy")
    assert code == 0 and json.loads(out) == current and "rebuild" in err
    # and the upgraded one no longer needs the run folder at all
    shutil.rmtree(tmp_path / "run-copy")
    assert _query_json(capsys, tmp_path / "old")[0]["neighbors"]


# -- export ----------------------------------------------------------------------------------------------------------
TOWERS = {  # the shipped towers, hires with the inference options mnist-fewshot uses
    "default": dict(name="default"),
    "seed": dict(name="seed"),
    "hires-deskew-shifts": dict(name="hires", size=128, deskew=True, shifts=1),
}


@pytest.fixture(scope="module")
def parity_data(data_root):
    ds = load_dataset("mnist:test", subset=400, seed=7)
    return ds.images, ds.labels.numpy()


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")
@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
@pytest.mark.parametrize("kind", list(TOWERS))
def test_exported_tower_gives_the_towers_embeddings_and_neighbours(tmp_path, parity_data, kind, fmt, capsys):
    from retrieval.export import run_exported

    spec = TOWERS[kind]
    save_checkpoint(tmp_path / "run" / "best", _tower(spec["name"], spec.get("size"), spec.get("deskew", False),
                                                        spec.get("shifts", 0), seed=3), config=kind)
    ckpt = load_checkpoint(tmp_path / "run")
    out = tmp_path / ("tower.onnx" if fmt == "onnx" else "tower.pt")
    code, printed, err = run_cli(capsys, "export", "--checkpoint", tmp_path / "run", "--format", fmt, "--out", out,
                                 "--json")
    assert code == 0, err
    sidecar = json.loads(printed)
    assert sidecar == json.loads((tmp_path / f"{out.name}.json").read_text())
    assert sidecar["fingerprint"] == ckpt.fingerprint and sidecar["embedding_size"] == ckpt.tower.embedding_size
    assert "pixel / 255" in sidecar["input"]["scaling"] and sidecar["input"]["shape"] == ["N", 1, 28, 28]
    assert "20x20" in sidecar["preprocessing"]["pictures"]
    assert sidecar["inference"] == {"deskew": spec.get("deskew", False), "test_shifts": spec.get("shifts", 0)}
    assert sidecar["parity"]["max_abs_diff"] <= 1e-5

    images, labels = parity_data
    want = embed_images(ckpt.tower, images, batch_size=128, precision="fp32")  # the exported graphs are fp32
    got = run_exported(out, fmt, images.unsqueeze(1).float().div(255.0).numpy())
    diff = float(np.abs(got - want).max())
    assert got.shape == want.shape and diff <= 1e-5, f"{kind} {fmt}: max |exported - tower| = {diff:.2e}"
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    # the same nearest neighbours on a small index of the tower's own embeddings, up to neighbours tied within
    # what the embeddings differ by (a random-weight tower packs its points closely: on some CPUs two neighbours
    # of one query lie 1e-7 apart, and the exported graph's rounding swaps them)
    index = build_index(want[:300], labels[:300], [str(c) for c in range(10)], [str(i) for i in range(300)])
    dist_tower, ids_tower = index.search(want[300:], 5)  # Euclidean distances of unit vectors
    _, ids_exported = index.search(got[300:], 5)
    tie = 2.0 * float(np.linalg.norm(got - want, axis=1).max())
    sims_of_exported = np.einsum("qd,qkd->qk", want[300:], want[:300][ids_exported])  # the tower's own similarity
    differ = (ids_exported != ids_tower).any(axis=1)
    assert differ.mean() <= 0.02, f"{kind} {fmt}: {differ.sum()} of {len(differ)} queries answered differently"
    np.testing.assert_allclose(sims_of_exported[differ], 1.0 - dist_tower[differ] ** 2 / 2.0, atol=tie)

    # the file carries its own description
    if fmt == "onnx":
        import onnx

        props = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
        assert props["retrieval.fingerprint"] == ckpt.fingerprint
    else:
        extra = {"retrieval.json": ""}
        torch.jit.load(str(out), _extra_files=extra)
        assert json.loads(extra["retrieval.json"])["fingerprint"] == ckpt.fingerprint


def test_export_refuses_what_it_cannot_express_and_writes_nothing(tmp_path, capsys):
    save_checkpoint(tmp_path / "run" / "best", _tower("hires", deskew=True))
    code, _, err = run_cli(capsys, "export", "--checkpoint", tmp_path / "run", "--format", "onnx", "--opset", 15,
                           "--out", tmp_path / "t.onnx")
    assert code == 2 and "deskew" in err and "tower.deskew" in err and "--opset 16" in err
    code, _, err = run_cli(capsys, "export", "--checkpoint", tmp_path / "run", "--format", "tflite",
                           "--out", tmp_path / "t.tflite")
    assert code == 2 and "--format" in err and "onnx, torchscript" in err
    code, _, err = run_cli(capsys, "export", "--checkpoint", tmp_path / "run", "--format", "onnx",
                           "--out", tmp_path / "t.json")
    assert code == 2 and "sidecar" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


# -- packaging, --version ----------------------------------------------------------------------------------------
def _pyproject_version() -> str:
    try:
        import tomllib
    except ImportError:  # Python 3.10
        import tomli as tomllib

    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]


def test_version_is_defined_once_and_printed(capsys):
    import retrieval

    code, out, _ = run_cli(capsys, "--version")
    assert code == 0 and out.strip() == f"retrieval {_pyproject_version()}" == f"retrieval {retrieval.__version__}"
    literals = [p for p in (REPO / "retrieval").rglob("*.py") if f'"{_pyproject_version()}"' in p.read_text()]
    assert literals == []


def test_the_wheel_carries_configs_and_web_page_and_quickstart_runs_from_it(tmp_path, data_root):
    src = tmp_path / "src"  # the checkout's package files alone: the build leaves nothing in the shared tree
    src.mkdir()
    for name in ("pyproject.toml", "setup.py", "README.md"):
        shutil.copy(REPO / name, src / name)
    for folder in ("retrieval", "configs"):
        shutil.copytree(REPO / folder, src / folder, ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path / "dist"), str(src)], check=True, capture_output=True, timeout=300)
    (wheel,) = (tmp_path / "dist").glob("retrieval-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    shipped = sorted(p.name for p in (REPO / "configs").glob("*.toml"))
    assert len(shipped) == 6 and {f"retrieval/configs/{n}" for n in shipped} <= names  # mnist-robust: the 6th
    assert "retrieval/web/index.html" in names and "retrieval/export.py" in names

    # installed as files (not editable), used from a folder far from the checkout
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site), str(wheel)],
                   check=True, capture_output=True, timeout=300)
    env = {**os.environ, "PYTHONPATH": str(site), "RETRIEVAL_DATA_ROOT": str(data_root)}
    work = tmp_path / "work"
    work.mkdir()

    def run(*args, timeout=300):
        return subprocess.run([sys.executable, *args], cwd=work, env=env, capture_output=True, text=True,
                              timeout=timeout, stdin=subprocess.DEVNULL)

    where = run("-c", "import retrieval, retrieval.workflows as w; print(retrieval.__file__); "
                      "print(w.shipped_config('mnist-fewshot'))")
    assert where.returncode == 0, where.stderr
    assert all(line.startswith(str(site)) for line in where.stdout.split())
    version = run("-m", "retrieval", "--version")
    assert version.stdout.strip() == f"retrieval {_pyproject_version()}"
    qs = run("-m", "retrieval", "quickstart", "--tiny", "--no-fewshot", "--json", "--device", "cpu")
    assert qs.returncode == 0, qs.stderr[-3000:]
    summary = json.loads(qs.stdout)
    assert summary["run"] == "quickstart/runs/mnist-default" and summary["metrics"]["n_queries"] == 300
    assert summary["metrics"]["precision@1"] > 0.5 and len(summary["queries"]) == 6
    assert set(summary["seconds"]) == {"fetch", "train", "index", "evaluate", "query"}
    card = (work / summary["card"]).read_text()
    assert "Test (mnist:test" in card and f"{summary['metrics']['map@r']:.4f}" in card
    meta = json.loads((work / summary["index"] / META_NAME).read_text())
    assert (work / summary["index"] / tower_files(meta)["card"]).is_file()


def test_an_unknown_shipped_config_name_lists_the_shipped_ones(capsys, tmp_path):
    code, _, err = run_cli(capsys, "train", "--config", "mnist-nope", "--out", tmp_path / "r")
    assert code == 2 and "mnist-default" in err and "mnist-fewshot" in err
    assert not (tmp_path / "r").exists()


# -- train --json and the model card -------------------------------------------------------------------------------
def test_train_json_summary_and_the_model_card(tmp_path, run, data_root, capsys):
    summary_records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    card = (run / "card.md").read_text()
    best = json.loads((run / "best.json").read_text())
    assert best["fingerprint"] in card and "# Model card: tiny" in card
    assert f"{summary_records[-1]['val_map_at_r']:.4f}" in card
    for needle in ("0, 1, 2, 3, 4, 5, 6, 7, 8, 9", "28x28 grayscale", "Known weak inputs", "## Intended use",
                   "multi-similarity"):
        assert needle in card, needle

    config = tmp_path / "tiny.toml"
    config.write_text("# tiny\n[data]\nsubset = 400\nval_size = 80\nexclude = [\"4\"]\n[sampler]\nm = 8\n"
                      "[train]\nepochs = 2\nbatch_size = 64\n")
    code, out, err = run_cli(capsys, "train", "--config", config, "--out", tmp_path / "r", "--json", "--device", "cpu",
                             "--no-progress")
    assert code == 0, err
    summary = json.loads(out)
    records = [json.loads(line) for line in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    best_record = max(records, key=lambda r: r["val_map_at_r"])
    assert summary["run"] == str(tmp_path / "r") and summary["epochs"] == 2 and summary["finished"]
    assert summary["best"]["epoch"] == best_record["epoch"]
    assert summary["best"]["val_map_at_r"] == best_record["val_map_at_r"]
    assert summary["last"]["epoch"] == 2 and len(summary["validation"]) == 2
    assert summary["times"]["wall_seconds"] >= summary["times"]["train_seconds"] > 0
    assert Path(summary["files"]["card.md"]).is_file()
    assert "never seen in training (1): 4" in (tmp_path / "r" / "card.md").read_text()


def test_an_interrupted_run_gets_a_card_that_says_so(tmp_path, data_root):
    from retrieval.training import TrainingInterrupted

    def stop(info):
        if info.step == 2:
            raise KeyboardInterrupt

    config = {"name": "cut", "data": {"subset": 400, "val_size": 80}, "sampler": {"m": 8},
              "train": {"epochs": 2, "batch_size": 64}}
    with pytest.raises(TrainingInterrupted):
        workflows.train(config, tmp_path / "r", device="cpu", progress=False, on_step=stop)
    card = (tmp_path / "r" / "card.md").read_text()
    assert "**Interrupted** at epoch 1, step 2" in card and "--resume" in card


# -- scikit-learn in place of our own copies: the same results ------------------------------------------------------
def _roc_auc_reference(scores, positive):
    """The Mann-Whitney implementation this project had before scikit-learn."""
    scores, positive = np.asarray(scores, np.float64), np.asarray(positive, bool)
    n_pos = int(positive.sum())
    n_neg = len(positive) - n_pos
    order = np.argsort(scores, kind="stable")
    ss = scores[order]
    starts = np.flatnonzero(np.r_[True, ss[1:] != ss[:-1]])
    ends = np.r_[starts[1:], len(scores)]
    ranks = np.empty(len(scores))
    ranks[order] = np.repeat((starts + 1 + ends) / 2.0, ends - starts)
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def _best_threshold_reference(scores, positive):
    scores, positive = np.asarray(scores, np.float64), np.asarray(positive, bool)
    order = np.argsort(-scores, kind="stable")
    s, p = scores[order], positive[order]
    last = np.r_[s[1:] != s[:-1], True]
    tp = np.cumsum(p)[last]
    accepted = np.flatnonzero(last) + 1
    correct = np.r_[len(p) - p.sum(), tp + ((len(p) - accepted) - (p.sum() - tp))]
    best, values = int(np.argmax(correct)), s[last]
    if best == 0:
        t = values[0] + max(1e-6, abs(values[0]) * 1e-6)
    elif best == len(values):
        t = values[-1]
    else:
        t = (values[best - 1] + values[best]) / 2.0
    return float(correct[best] / len(p)), float(t)


def _calibration_reference(d, ok):
    d, ok = np.asarray(d, np.float64), np.asarray(ok, bool)
    total = int(ok.sum())
    order = np.argsort(d, kind="stable")
    d, ok = d[order], ok[order]
    last = np.r_[d[1:] != d[:-1], True]
    tp = np.cumsum(ok)[last]
    answered = np.flatnonzero(last) + 1
    f1 = 2.0 * tp / (answered + total)
    best, values = int(np.argmax(f1)), d[last]
    t = values[best] if best == len(values) - 1 else (values[best] + values[best + 1]) / 2.0
    return float(t), float(f1[best]), float(tp[best] / answered[best]), float(tp[best] / total), int(answered[best])


def _pca_reference(x):
    x = np.asarray(x, np.float64)
    centered = x - x.mean(0)
    vt = np.linalg.svd(centered, full_matrices=False)[2][:2]
    vt = vt * np.sign(vt[np.arange(len(vt)), np.abs(vt).argmax(1)])[:, None]
    out = centered @ vt.T
    return out if out.shape[1] == 2 else np.c_[out, np.zeros(len(out))]


def test_scikit_learn_gives_the_same_auc_thresholds_calibration_and_projection():
    from retrieval.pairs import best_threshold, calibrate_threshold, roc_auc
    from retrieval.reports import pca_2d

    rng = np.random.default_rng(0)
    for _ in range(200):
        n = int(rng.integers(2, 300))
        scores = np.round(rng.normal(size=n), int(rng.integers(0, 3)))  # coarse rounding: many ties
        positive = rng.random(n) < rng.random()
        if 0 < positive.sum() < n:
            assert roc_auc(scores, positive) == pytest.approx(_roc_auc_reference(scores, positive), abs=1e-12)
        assert best_threshold(scores, positive) == _best_threshold_reference(scores, positive)
        if positive.any():
            c = calibrate_threshold(np.abs(scores), positive)
            assert (c.max_distance, c.f1, c.precision, c.recall, c.n_answered) == \
                _calibration_reference(np.abs(scores), positive)
    for shape in [(500, 64), (3, 64), (40, 2), (30, 1)]:
        x = rng.normal(size=shape) * np.linspace(3, 1, shape[1])
        np.testing.assert_allclose(pca_2d(x), _pca_reference(x), atol=1e-10)
    assert np.all(pca_2d(rng.normal(size=(1, 5))) == 0)
