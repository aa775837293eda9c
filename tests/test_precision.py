"""Precision (retrieval.precision): what `auto` resolves to, bf16 training against fp32, exact resume under bf16,
and the precision recorded in run folders and index metadata (which queries and additions then follow).

Tiny real runs on real MNIST images; the capability answer of a CPU without bfloat16 units is simulated by
replacing torch's own checks, so every branch runs on any machine."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from retrieval import precision as precision_module
from retrieval.checkpoint import load_checkpoint
from retrieval.config import resolve_config
from retrieval.data import load_dataset
from retrieval.embed import embed_images, inference_tower
from retrieval.errors import UsageError
from retrieval.precision import cpu_has_native_bf16, resolve_precision
from retrieval.query import Searcher
from retrieval.training import TrainingInterrupted, train
from retrieval.workflows import add_to_index, build_index, evaluate

from cli_helpers import run_cli
from retrieval.workflows import Compute, Selection

pytestmark = pytest.mark.usefixtures("one_thread")

# A tiny run: 1,200 images (240 for validation), 3 epochs of 15 steps of 64 at mnist-default's peak learning rate.
# Big enough for validation figures to mean something (one validation image is 0.004 of precision@1), small enough
# for a few seconds per run.
TINY = {"name": "tiny", "data": {"subset": 1200, "val_size": 240}, "train": {"epochs": 3, "batch_size": 64},
        "sampler": {"m": 8}, "optimizer": {"lr": 0.006}}
# bf16 against fp32 after the same tiny training (stated in benchmarks/README.md, "Precision"): validation
# precision@1 and MAP@R within these; they are measured on 240 images, so one image is 0.004 of precision@1.
TOLERANCE = {"val_precision_at_1": 0.03, "val_map_at_r": 0.03}


def tiny(precision: str, epochs: int = 3) -> dict:
    return {**TINY, "train": {**TINY["train"], "precision": precision, "epochs": epochs}}


def simulate_cpu(monkeypatch, bf16_units: bool) -> None:
    """torch's answer for an x86 CPU with (AVX-512 BF16) or without (AVX-512 only: oneDNN would emulate bf16)
    native bfloat16 units."""
    monkeypatch.setattr(precision_module.platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: bf16_units)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)


# ------------------------------------------------------------------------------------------ resolving auto
def test_auto_is_bf16_only_on_a_cpu_with_native_bf16_units(monkeypatch):
    monkeypatch.delenv("RETRIEVAL_PRECISION", raising=False)
    simulate_cpu(monkeypatch, bf16_units=False)
    assert not cpu_has_native_bf16()
    assert resolve_precision("auto", "cpu") == "fp32"
    assert resolve_precision(None, torch.device("cpu")) == "fp32"
    assert resolve_precision("auto", "cpu", prefer="bf16") == "fp32"  # an index's bf16 is not emulated either
    assert resolve_precision("fp32", "cpu") == "fp32"
    assert resolve_precision("BF16", "cpu") == "bf16"  # explicit: honoured (with a warning, it is emulated)

    simulate_cpu(monkeypatch, bf16_units=True)
    assert cpu_has_native_bf16()
    assert resolve_precision("auto", "cpu") == "bf16"
    assert resolve_precision("auto", "cpu", prefer="fp32") == "fp32"  # an fp32 index's queries stay fp32
    assert resolve_precision("fp32", "cpu") == "fp32"

    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True)  # Intel AMX
    assert resolve_precision("auto", "cpu") == "bf16"

    monkeypatch.setenv("RETRIEVAL_PRECISION", "fp32")  # what auto means when set
    assert resolve_precision("auto", "cpu") == "fp32" and resolve_precision("bf16", "cpu") == "bf16"


def test_emulated_bf16_warns(monkeypatch, log_messages):
    monkeypatch.delenv("RETRIEVAL_PRECISION", raising=False)
    simulate_cpu(monkeypatch, bf16_units=False)
    assert resolve_precision("bf16", "cpu") == "bf16"
    assert any("emulated" in m for m in log_messages())


def test_precision_settings_are_checked(tmp_path, capsys):
    with pytest.raises(UsageError, match=r"`precision` 'fp16': expected one of auto, fp32, bf16"):
        resolve_precision("fp16", "cpu")
    with pytest.raises(UsageError, match=r"train\.precision must be one of auto, fp32, bf16, got 'half'"):
        resolve_config({"train": {"precision": "half"}})
    assert resolve_config({}).train.precision == "auto"
    code, out, err = run_cli(capsys, "train", "--config", "mnist-default", "--out", tmp_path / "run",
                             "--precision", "fp16")
    assert code == 2 and out == "" and err.strip().count("\n") == 0 and "--precision 'fp16'" in err, err
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------------------------------ training
@pytest.fixture(scope="module")
def runs(tmp_path_factory, data_root):
    """The tiny recipe trained in fp32 and in bf16 (explicitly: bf16 runs, emulated or not, on every machine)."""
    base = tmp_path_factory.mktemp("precision-runs")
    return {p: train(tiny(p), base / p, device="cpu", data_root=data_root, progress=False, threads=1)
            for p in ("fp32", "bf16")}


def _records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _val_history(run: Path) -> list[tuple]:
    return [(r["epoch"], r["loss"], r["val_precision_at_1"], r["val_map_at_r"]) for r in _records(run)]


def test_bf16_training_reaches_the_fp32_validation_figures(runs):
    fp32, bf16 = _records(runs["fp32"])[-1], _records(runs["bf16"])[-1]
    for key, tolerance in TOLERANCE.items():
        assert abs(bf16[key] - fp32[key]) <= tolerance, (key, bf16[key], fp32[key])
    for run in runs.values():  # both learned: the comparison means something
        losses = [r["loss"] for r in _records(run)]
        assert losses == sorted(losses, reverse=True) and losses[-1] < 0.9 * losses[0], losses
    # bf16 really ran: the weights differ from fp32's (and are fp32 tensors: the optimizer updates fp32 weights)
    a, b = load_file(str(runs["fp32"] / "last.safetensors")), load_file(str(runs["bf16"] / "last.safetensors"))
    assert all(t.dtype in (torch.float32, torch.int64) for t in b.values())
    assert any(not torch.equal(a[k], b[k]) for k in a if a[k].is_floating_point())
    state = json.loads((runs["bf16"] / "state.json").read_text())
    opt = load_file(str(runs["bf16"] / state["tensors"]))
    assert {t.dtype for k, t in opt.items() if k.startswith("optimizer.") and t.numel() > 1} == {torch.float32}


def test_the_run_folder_says_which_precision_trained_it(runs):
    for precision, run in runs.items():
        assert json.loads((run / "config.json").read_text())["train"]["precision"] == precision
        for name in ("best", "last"):
            assert json.loads((run / f"{name}.json").read_text())["precision"] == precision
        sessions = json.loads((run / "state.json").read_text())["sessions"]
        assert [s["precision"] for s in sessions] == [precision]


def test_bf16_embeddings_agree_with_fp32(runs, data_root):
    """The same trained tower embedding in bf16 and fp32: nearly the same vectors, unit-norm fp32 both."""
    tower = load_checkpoint(runs["fp32"], device="cpu").tower
    images = load_dataset("mnist:test", root=data_root, subset=500, seed=1).images
    e32 = embed_images(tower, images, precision="fp32")
    e16 = embed_images(tower, images, precision="bf16")
    assert e16.dtype == np.float32 and np.allclose(np.linalg.norm(e16, axis=1), 1.0, atol=1e-5)
    cosine = (e32 * e16).sum(1)
    assert cosine.min() > 0.999 and not np.array_equal(e32, e16), cosine.min()



def test_the_inference_tower_casts_once_what_autocast_casts_every_time(runs, data_root):
    """Searcher embeds with inference_tower's copy: bf16 weights cast once give the embeddings autocast gives,
    bit for bit, one image at a time or many; the tower it was made from keeps its fp32 weights."""
    tower = load_checkpoint(runs["bf16"], device="cpu").tower.eval()
    images = load_dataset("mnist:test", root=data_root, subset=64, seed=2).images
    fast = inference_tower(tower, "bf16")
    assert fast is not tower and inference_tower(tower, "fp32") is tower
    assert {p.dtype for p in tower.parameters()} == {torch.float32}
    assert torch.bfloat16 in {p.dtype for p in fast.parameters()}
    expected = embed_images(tower, images, precision="bf16")
    assert np.array_equal(embed_images(fast, images, precision="bf16"), expected)
    assert np.array_equal(np.concatenate([embed_images(fast, images[i:i + 1], precision="bf16")
                                          for i in range(8)]), expected[:8])
    assert not any(m.training for m in fast.modules())

def test_bf16_resume_is_bit_identical_and_another_precision_warns(tmp_path, data_root, caplog):
    cfg = tiny("bf16", epochs=2)
    whole = train(cfg, tmp_path / "whole", device="cpu", data_root=data_root, progress=False, threads=1)

    def stop(info):
        if info.global_step == 17:  # inside the second epoch
            raise KeyboardInterrupt

    with pytest.raises(TrainingInterrupted):
        train(cfg, tmp_path / "cut", device="cpu", data_root=data_root, progress=False, on_step=stop, threads=1)
    train(None, tmp_path / "cut", device="cpu", resume=True, data_root=data_root, progress=False, threads=1)
    a, b = (load_file(str(r / "last.safetensors")) for r in (whole, tmp_path / "cut"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert _val_history(whole) == _val_history(tmp_path / "cut")

    # resuming in another precision trains on (the config's precision may change like the thread count), warning
    with pytest.raises(TrainingInterrupted):
        train(cfg, tmp_path / "mixed", device="cpu", data_root=data_root, progress=False, on_step=stop, threads=1)
    with caplog.at_level(logging.WARNING, logger="retrieval"):
        train(None, tmp_path / "mixed", device="cpu", resume=True, data_root=data_root, progress=False, threads=1,
              overrides=["train.precision=fp32"])
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "trained in bf16 and resumes in fp32" in warnings[0], warnings
    sessions = json.loads((tmp_path / "mixed" / "state.json").read_text())["sessions"]
    assert [s["precision"] for s in sessions] == ["bf16", "fp32"]
    assert json.loads((tmp_path / "mixed" / "last.json").read_text())["precision"] == "fp32"


# ------------------------------------------------------------------------------------------ indexes
def test_index_records_its_precision_and_queries_and_additions_follow_it(tmp_path, runs, monkeypatch,
                                                                         log_messages, capsys):
    monkeypatch.delenv("RETRIEVAL_PRECISION", raising=False)
    run = runs["fp32"]
    bf16 = build_index(run, Selection(["mnist:test"], subset=300), tmp_path / "bf16", compute=Compute(device="cpu",
                       precision="bf16"))
    fp32 = build_index(run, Selection(["mnist:test"], subset=300), tmp_path / "fp32", compute=Compute(device="cpu",
                       precision="fp32"))
    for index, precision in ((bf16, "bf16"), (fp32, "fp32")):
        meta = json.loads((index.folder / "meta.json").read_text())
        assert meta["precision"] == precision and [d["precision"] for d in meta["data"]] == [precision]
    assert not np.array_equal(bf16.flat_vectors(), fp32.flat_vectors())

    # auto follows the index where the CPU runs its precision natively
    simulate_cpu(monkeypatch, bf16_units=True)
    for folder, precision in ((tmp_path / "bf16", "bf16"), (tmp_path / "fp32", "fp32")):
        assert Searcher.open(folder).precision == precision
        added = add_to_index(folder, Selection(["mnist:train"], subset=10), compute=Compute(device="cpu"))[0]
        assert added.meta["data"][-1]["precision"] == precision
    # an indexed image queried as its index embedded it: its own entry at distance 0
    searcher = Searcher.open(tmp_path / "bf16")
    source = searcher.index.sources[0]
    own = searcher.query([source], k=1)[0]
    assert own.neighbors[0].source == source and own.neighbors[0].distance < 1e-6, own
    assert not [m for m in log_messages() if "distances may differ" in m]

    # another precision than the index's is honoured, with a warning (query, evaluate, add)
    assert Searcher.open(tmp_path / "bf16", precision="fp32").precision == "fp32"
    evaluate(tmp_path / "bf16", Selection("mnist:test", subset=50), compute=Compute(device="cpu", precision="fp32"))
    code, out, err = run_cli(capsys, "index", "add", "--index", tmp_path / "fp32", "--data", "mnist:train",
                             "--subset", "5", "--precision", "bf16", "--device", "cpu")
    assert code == 0, err
    warned = [m for m in log_messages() if "distances may differ" in m]
    assert len(warned) == 3 and "embedded in fp32, the index's embeddings in bf16" in warned[0], warned
    assert "embedded in bf16, the index's embeddings in fp32" in warned[-1]
    meta = json.loads((tmp_path / "fp32" / "meta.json").read_text())
    assert meta["precision"] == "fp32" and [d["precision"] for d in meta["data"]] == ["fp32", "fp32", "bf16"]

    # a CPU without bf16 units queries a bf16 index in fp32 (never emulated), silently
    simulate_cpu(monkeypatch, bf16_units=False)
    assert Searcher.open(tmp_path / "bf16").precision == "fp32"


def test_a_searcher_view_reuses_the_tower_prepared_for_its_precision(tmp_path, runs, monkeypatch, data_root):
    """The service's per-threshold view of its searcher (serve.library.searcher_for) embeds with the tower the
    searcher prepared, not a copy made for every batch; in another precision it prepares its own. Either way it
    embeds as a Searcher of its own precision does."""
    from retrieval.serve.library import searcher_for

    monkeypatch.delenv("RETRIEVAL_PRECISION", raising=False)
    build_index(runs["fp32"], Selection(["mnist:test"], subset=100), tmp_path / "ix",
                compute=Compute(device="cpu", precision="bf16"))
    simulate_cpu(monkeypatch, bf16_units=True)
    images = load_dataset("mnist:test", root=data_root, subset=8, seed=4).images
    for precision in ("auto", "fp32"):
        searcher = Searcher.open(tmp_path / "ix", precision=precision)
        view = searcher_for(searcher, max_distance=0.5)
        assert view.precision == "bf16" and view.max_distance == 0.5
        assert (view.embedding_tower is searcher.embedding_tower) == (searcher.precision == "bf16")
        own = Searcher(view.index, view.tower, precision="bf16")
        assert np.array_equal(view.embed(images), own.embed(images))


def test_cli_index_build_records_the_precision(tmp_path, runs, capsys):
    code, out, err = run_cli(capsys, "index", "build", "--checkpoint", runs["bf16"], "--data", "mnist:test",
                             "--subset", "50", "--out", tmp_path / "index", "--precision", "fp32", "--device", "cpu",
                             "--json")
    assert code == 0, err
    assert json.loads(out)["meta"]["precision"] == "fp32"
    code, out, err = run_cli(capsys, "query", "--index", tmp_path / "index", "--precision", "half", "mnist:test[0]")
    assert code == 2 and "--precision 'half'" in err and err.strip().count("\n") == 0, err


# ------------------------------------------------------------------------------------------ the CLI
@pytest.fixture(scope="module")
def small_index(runs, tmp_path_factory):
    folder = tmp_path_factory.mktemp("precision-index") / "index"
    build_index(runs["fp32"], Selection(["mnist:test"], subset=200), folder, compute=Compute(device="cpu",
                precision="bf16"))
    return folder


def _commands(run: Path, index: Path, out: Path) -> dict[str, list]:
    """Every command that runs the tower, with arguments that work (up to the precision)."""
    return {
        "train": ["train", "--config", "mnist-default", "--out", out / "run"],
        "index build": ["index", "build", "--checkpoint", run, "--data", "mnist:test", "--subset", "20",
                        "--out", out / "built"],
        "index add": ["index", "add", "--index", index, "--data", "mnist:train", "--subset", "5"],
        "query": ["query", "--index", index, "mnist:test[0]"],
        "evaluate": ["evaluate", "--index", index, "--queries", "mnist:test", "--subset", "20"],
        "calibrate": ["calibrate", "--index", index, "--queries", "mnist:test", "--subset", "50", "--dry-run"],
        "evaluate-pairs": ["evaluate-pairs", "--checkpoint", run, "--data", "mnist:test", "--subset", "200",
                           "--pairs-per-class", "5"],
        "fewshot": ["fewshot", "--checkpoint", run, "--data", "mnist:test", "--classes", "0,1,2", "--ways", "3",
                    "--shots", "1", "--episodes", "5", "--queries", "2"],
        "serve": ["serve", "--index", index, "--port", "0"],
        "quickstart": ["quickstart", "--out", out / "qs", "--tiny"],
    }


@pytest.mark.parametrize("command", list(_commands(Path("r"), Path("i"), Path("o"))))
def test_every_command_that_runs_the_tower_offers_precision(command, runs, small_index, tmp_path, capsys):
    """--precision is offered and checked before anything runs or is written: one line naming the option."""
    args = _commands(runs["fp32"], small_index, tmp_path)[command]
    code, out, err = run_cli(capsys, *args, "--precision", "half")
    assert code == 2 and out == "" and err.strip().count("\n") == 0 and "--precision 'half'" in err, (code, err)
    assert not any(tmp_path.iterdir())
    code, out, err = run_cli(capsys, *command.split(), "--help")
    assert "--precision" in out


@pytest.mark.parametrize("command", ["evaluate-pairs", "calibrate", "fewshot", "evaluate", "query"])
def test_precision_reaches_the_tower(command, runs, small_index, tmp_path, monkeypatch, capsys, log_messages):
    """The option is what the tower runs in: an explicit bf16 on a CPU without bfloat16 units warns that it is
    emulated (and auto does not)."""
    monkeypatch.delenv("RETRIEVAL_PRECISION", raising=False)
    simulate_cpu(monkeypatch, bf16_units=False)
    args = _commands(runs["fp32"], small_index, tmp_path)[command]
    code, out, err = run_cli(capsys, *args, "--device", "cpu")
    assert code == 0, err
    assert not [m for m in log_messages() if "emulated" in m]
    code, out, err = run_cli(capsys, *args, "--device", "cpu", "--precision", "bf16")
    assert code == 0, err
    assert [m for m in log_messages() if "emulated" in m]


def test_embedding_leaves_each_module_in_the_mode_it_found_it(runs, data_root):
    """embed_images runs the tower in eval mode and gives every submodule back its own mode (training, or eval
    inside a training tower, as the trunk gate's frozen trunk is)."""
    tower = load_checkpoint(runs["fp32"], device="cpu").tower
    images = load_dataset("mnist:test", root=data_root, subset=8, seed=3).images
    tower.train()
    frozen = tower.backbone[1]  # a batch norm kept in eval mode inside a training tower
    frozen.eval()
    modes = [m.training for m in tower.modules()]
    expected = embed_images(tower.eval(), images, precision="fp32")
    tower.train()
    frozen.eval()
    assert np.array_equal(embed_images(tower, images, precision="fp32"), expected)  # in eval mode meanwhile
    assert [m.training for m in tower.modules()] == modes
