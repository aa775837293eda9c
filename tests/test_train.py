"""Training: objectives, samplers, augmentation, the loop, checkpoints, exact resume, config errors and the CLI.

Tiny real runs on a few hundred real MNIST images (fetched through the data layer when absent)."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from retrieval.augment import BatchAugment
from retrieval.checkpoint import load_checkpoint, save_checkpoint, tower_fingerprint
from retrieval.config import Config, OptimizerConfig, load_config, resolve_config
from retrieval.data import load_dataset
from retrieval.embed import embed_images
from retrieval.errors import RetrievalError, UsageError
from retrieval.objectives import PairObjective, balanced_pairs, build_objective
from retrieval.sampling import ClassBalancedBatchSampler, RandomBatchSampler
from retrieval.seeding import make_generator
from retrieval.towers import build_tower
from retrieval.training import Batches, Trainer, TrainerSettings, TrainingInterrupted, build_optimizer, train

REPO = Path(__file__).resolve().parents[1]

# A tiny run: 400 images (80 for validation), 10 steps of 32 per epoch.
TINY = {
    "name": "tiny",
    "data": {"subset": 400, "val_size": 80},
    "train": {"epochs": 2, "batch_size": 32},
    "sampler": {"m": 8},
}


def tiny(**sections) -> dict:
    cfg = json.loads(json.dumps(TINY))
    for section, values in sections.items():
        if isinstance(values, dict):
            cfg.setdefault(section, {}).update(values)
        else:
            cfg[section] = values
    return cfg


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def mnist_small(data_root):
    return load_dataset("mnist:train", root=data_root, subset=400, seed=0)


# ------------------------------------------------------------------------------------------ objectives, towers
@pytest.mark.parametrize("tower_name", ["default", "hires", "seed"])
@pytest.mark.parametrize("objective_name", ["multi-similarity", "triplet", "contrastive", "pair"])
def test_loss_is_finite_and_falls_on_a_repeated_batch(mnist_small, tower_name, objective_name):
    torch.manual_seed(0)
    tower = build_tower(tower_name)
    objective = build_objective(objective_name, tower.embedding_size)
    sampler = ClassBalancedBatchSampler(mnist_small.labels, 40, 4, seed=0)
    cfg = OptimizerConfig(lr=1e-3, weight_decay=0.0, schedule="constant", warmup=0.2)
    optimizer, scheduler = build_optimizer(cfg, [*tower.parameters(), *objective.parameters()], len(sampler))
    batches = Batches(mnist_small.images, mnist_small.labels, sampler, BatchAugment(degrees=0, translate=0, scale=(1, 1)))
    trainer = Trainer(tower, objective, batches, optimizer, scheduler,
                      TrainerSettings(epochs=1, seed=0, device=torch.device("cpu")), Path("unused"))
    positions = sampler.epoch_batches(0)[0]
    losses = []
    for _ in range(8):
        x, y = trainer.make_batch(positions, make_generator(0, "fixed"))
        losses.append(float(trainer.train_step(x, y, make_generator(0, "fixed"))))
    assert all(np.isfinite(losses)), losses
    assert min(losses[-3:]) < losses[0], losses


def test_pair_objective_draws_balanced_partners():
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 2, 3])
    a, b, same = balanced_pairs(labels, make_generator(0, "pairs"))
    pos, neg = same == 1, same == 0
    assert torch.equal(labels[a[pos]], labels[b[pos]]) and bool((a[pos] != b[pos]).all())
    assert bool((labels[a[neg]] != labels[b[neg]]).all())
    assert int(pos.sum()) == 7 and int(neg.sum()) == 8  # the lone 3 has no positive partner
    again = balanced_pairs(labels, make_generator(0, "pairs"))
    assert all(torch.equal(x, y) for x, y in zip((a, b, same), again))


def test_objective_arguments_are_checked():
    obj = build_objective("triplet", 64, "batch-hard", {"margin": 0.3})
    assert obj.describe()["miner"] == "BatchHardMiner" and obj.loss.margin == 0.3
    assert build_objective("triplet", 64, "hard").miner.margin == 0.2  # the miner follows the loss margin
    assert build_objective("contrastive", 64, "none").miner is None
    assert isinstance(build_objective("pair", 64), PairObjective)
    with pytest.raises(UsageError, match=r"loss_args\.margn.*did you mean 'margin'"):
        build_objective("triplet", 64, loss_args={"margn": 0.1})
    with pytest.raises(UsageError, match="objective.miner: 'semihard' does not work with contrastive"):
        build_objective("contrastive", 64, "semihard")
    with pytest.raises(UsageError, match="distance"):
        build_objective("multi-similarity", 64, loss_args={"distance": "manhattan"})
    with pytest.raises(UsageError, match="fails on a test batch"):
        build_objective("triplet", 64, loss_args={"margin": "wide"})
    with pytest.raises(UsageError, match="unknown objective"):
        build_objective("arcface", 64)


# ------------------------------------------------------------------------------------------ sampler, augment, scores
def test_class_balanced_sampler_is_balanced_seeded_and_covers_the_data():
    labels = torch.arange(1000) % 10
    sampler = ClassBalancedBatchSampler(labels, 64, 8, seed=3)
    plan = sampler.epoch_batches(0)
    assert plan.shape == (15, 64)
    for batch in plan:
        counts = torch.bincount(labels[batch], minlength=10)
        assert int((counts > 0).sum()) == 8 and set(counts[counts > 0].tolist()) == {8}
    assert len(torch.unique(plan)) == plan.numel()  # without replacement within an epoch
    assert torch.equal(plan, ClassBalancedBatchSampler(labels, 64, 8, seed=3).epoch_batches(0))
    assert not torch.equal(plan, sampler.epoch_batches(1))
    wide = ClassBalancedBatchSampler(labels, 256, 16, seed=0).epoch_batches(0)  # 16 slots over 10 classes
    assert all(int(c.min()) >= 16 for c in (torch.bincount(labels[b], minlength=10) for b in wide))
    rnd = RandomBatchSampler(labels, 100, seed=0).epoch_batches(0)
    assert sorted(rnd.flatten().tolist()) == list(range(1000))
    with pytest.raises(UsageError, match="multiple of m"):
        ClassBalancedBatchSampler(labels, 60, 8, seed=0)


def test_augment_is_seeded_and_keeps_shape(mnist_small):
    x = mnist_small.images[:20].unsqueeze(1).float() / 255
    aug = BatchAugment(degrees=15, translate=0.1, scale=(0.9, 1.1), shear=5, group=4)
    a, b = aug(x, make_generator(1, "a")), aug(x, make_generator(1, "a"))
    assert a.shape == x.shape and torch.equal(a, b)
    assert not torch.equal(a, x) and not torch.equal(a, aug(x, make_generator(2, "a")))
    assert torch.equal(BatchAugment(0, 0, (1, 1), 0)(x, make_generator(0)), x)


# ------------------------------------------------------------------------------------------ runs and checkpoints
@pytest.mark.parametrize("objective", ["multi-similarity", "pair"])
def test_run_folder_and_checkpoint_round_trip(tmp_path, data_root, mnist_small, objective):
    cfg = tiny(objective={"name": objective}, train={"epochs": 2, "batch_size": 32})
    run = train(cfg, tmp_path / "run", device="cpu", data_root=data_root, progress=False, threads=1)
    names = {p.name for p in run.iterdir()}
    assert {"config.json", "metrics.jsonl", "best.safetensors", "best.json", "last.safetensors", "last.json",
            "state.json"} <= names
    assert not [n for n in names if n.endswith(".tmp")]
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2]
    for r in records:
        assert 0 <= r["val_precision_at_1"] <= 1 and 0 <= r["val_map_at_r"] <= 1 and np.isfinite(r["loss"])
        assert r["images_per_s"] > 0 and r["lr"] > 0
    saved_cfg = json.loads((run / "config.json").read_text())
    assert saved_cfg == resolve_config(cfg).to_dict()

    ckpt = load_checkpoint(run / "last")
    meta = ckpt.meta
    assert meta["tower"] == "default" and meta["embedding_size"] == 64 and meta["epoch"] == 2
    assert meta["objective"]["name"] == objective and meta["config"] == "tiny"
    assert meta["data"]["spec"] == "mnist:train" and meta["data"]["train_images"] == 320
    assert meta["classes_seen"] == [str(d) for d in range(10)] and meta["preprocessing"]
    assert meta["has_pair_head"] is (objective == "pair") and (ckpt.head is not None) is (objective == "pair")
    best_epoch = max(records, key=lambda r: (r["val_map_at_r"], -r["epoch"]))["epoch"]
    assert load_checkpoint(run).meta["val"]["epoch"] == best_epoch  # a run folder resolves to best

    # the checkpoint holds exactly the trained weights: same embeddings as the tower in the training state
    state = json.loads((run / "state.json").read_text())
    tensors = load_file(str(run / state["tensors"]))
    trained = build_tower("default")
    trained.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("tower.")})
    images = mnist_small.images[:64]
    assert np.array_equal(embed_images(ckpt.tower, images), embed_images(trained, images))
    # and a save/load round trip keeps them identical
    save_checkpoint(tmp_path / "copy", ckpt.tower, ckpt.head, **{k: v for k, v in meta.items()
                                                                  if k not in ("format", "tower", "embedding_size",
                                                                               "fingerprint", "has_pair_head")})
    again = load_checkpoint(tmp_path / "copy")
    assert np.array_equal(embed_images(again.tower, images), embed_images(ckpt.tower, images))
    if objective == "pair":
        a, b = torch.randn(5, 64), torch.randn(5, 64)
        assert torch.equal(again.head.same_probability(a, b), ckpt.head.same_probability(a, b))


def _final_weights(run: Path) -> dict:
    return load_file(str(run / "last.safetensors"))


def _val_history(run: Path) -> list:
    return [(r["epoch"], r["loss"], r["val_precision_at_1"], r["val_map_at_r"])
            for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())]


@pytest.mark.parametrize("objective,stop_at", [("multi-similarity", 13), ("pair", 10)])
def test_resume_after_interruption_gives_identical_weights(tmp_path, data_root, objective, stop_at):
    cfg = tiny(objective={"name": objective}, train={"epochs": 3, "batch_size": 32})
    whole = train(cfg, tmp_path / "whole", device="cpu", data_root=data_root, progress=False, threads=1)

    def stop(info):
        if info.global_step == stop_at:
            raise KeyboardInterrupt

    with pytest.raises(TrainingInterrupted) as e:
        train(cfg, tmp_path / "cut", device="cpu", data_root=data_root, progress=False, on_step=stop, threads=1)
    assert e.value.saved
    state = json.loads((tmp_path / "cut" / "state.json").read_text())
    assert state["global_step"] == stop_at and not state["finished"]
    assert load_checkpoint(tmp_path / "cut" / "last").meta["interrupted"] is True
    steps_after_resume = []
    train(None, tmp_path / "cut", device="cpu", resume=True, data_root=data_root, progress=False,
          threads=1, on_step=lambda info: steps_after_resume.append(info.global_step))

    # the resumed run started at the saved step and executed only the rest (a silent restart from step 0 would
    # give the same seeded weights, so the weights alone cannot tell)
    total = json.loads((tmp_path / "whole" / "state.json").read_text())["global_step"]
    assert steps_after_resume == list(range(stop_at + 1, total + 1))
    sessions = json.loads((tmp_path / "cut" / "state.json").read_text())["sessions"]
    assert [(s["started_at_step"], s["steps_run"]) for s in sessions] == [(0, stop_at), (stop_at, total - stop_at)]
    a, b = _final_weights(whole), _final_weights(tmp_path / "cut")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert _val_history(whole) == _val_history(tmp_path / "cut")
    assert len(list((tmp_path / "cut").glob("state-*.safetensors"))) == 1
    # resuming a finished run is a no-op; starting over in the folder needs --overwrite
    train(None, tmp_path / "cut", resume=True, data_root=data_root, progress=False, threads=1)
    with pytest.raises(RetrievalError, match="already holds a training run"):
        train(cfg, tmp_path / "cut", data_root=data_root, progress=False, threads=1)


def test_resume_refuses_a_different_config(tmp_path, data_root):
    cfg = tiny(train={"epochs": 1, "batch_size": 32})

    def stop(info):
        raise KeyboardInterrupt

    with pytest.raises(TrainingInterrupted):
        train(cfg, tmp_path / "run", data_root=data_root, progress=False, on_step=stop, threads=1)
    with pytest.raises(UsageError, match="optimizer.lr"):
        train(cfg, tmp_path / "run", resume=True, overrides=["optimizer.lr=0.1"], data_root=data_root,
              threads=1)
    with pytest.raises(RetrievalError, match="no training state"):
        train(cfg, tmp_path / "fresh", resume=True, data_root=data_root, threads=1)
    assert not (tmp_path / "fresh").exists()  # nothing written, no empty run folder left behind
    with pytest.raises(UsageError, match=r"data\.classes: x not among the classes"):
        train(tiny(data={"classes": ["1", "x"]}), tmp_path / "bad", data_root=data_root, threads=1)
    assert not (tmp_path / "bad").exists()


# ------------------------------------------------------------------------------------------ config errors
def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_bad_config_keys_and_values_are_named(tmp_path):
    with pytest.raises(UsageError, match=r"unknown config key 'optimizer\.lrr' \(did you mean 'optimizer\.lr'\?\)"):
        load_config(write(tmp_path / "a.toml", "[optimizer]\nlrr = 0.1\n"))
    with pytest.raises(UsageError, match=r"unknown config key 'epochs' \(did you mean 'train\.epochs'\?\)"):
        load_config(write(tmp_path / "b.toml", "epochs = 3\n"))
    with pytest.raises(UsageError, match=r"unknown config key 'trian'.*'train'"):
        load_config(write(tmp_path / "c.toml", "[trian]\nepochs = 3\n"))
    with pytest.raises(UsageError, match=r"train\.epochs must be an integer, got 'five'"):
        load_config(write(tmp_path / "d.toml", '[train]\nepochs = "five"\n'))
    with pytest.raises(UsageError, match=r"train\.epochs must be a positive number of epochs, got -1"):
        load_config(write(tmp_path / "e.toml", "[train]\nepochs = -1\n"))
    with pytest.raises(RetrievalError, match="f.toml is not valid TOML"):
        load_config(write(tmp_path / "f.toml", "[train\n"))
    with pytest.raises(RetrievalError, match="config file not found"):
        load_config(tmp_path / "missing.toml")
    with pytest.raises(UsageError, match=r"unknown config key 'optimizer\.lrr'"):
        resolve_config({}, ["optimizer.lrr=0.1"])
    with pytest.raises(UsageError, match=r"--set optimizer\.lr=fast: expected a number"):
        resolve_config({}, ["optimizer.lr=fast"])
    with pytest.raises(UsageError, match="'tower' is a section; set one of its keys, e.g. tower.name"):
        resolve_config({}, ["tower=seed"])
    with pytest.raises(UsageError, match="multiple of sampler.m"):
        resolve_config({"train": {"batch_size": 100}})
    with pytest.raises(UsageError, match="training split"):
        resolve_config({"data": {"spec": "mnist:test"}})


def test_overrides_are_typed_by_the_default():
    cfg = resolve_config({}, ["optimizer.lr=0.01", "train.epochs=7", "data.exclude=0,4,5,8", "augment.scale=[0.8, 1.2]",
                              "objective.loss_args.margin=0.3", "name=x"])
    assert cfg.optimizer.lr == 0.01 and cfg.train.epochs == 7
    assert cfg.data.exclude == ("0", "4", "5", "8") and cfg.augment.scale == (0.8, 1.2)
    assert cfg.objective.loss_args == {"margin": 0.3} and cfg.name == "x"
    assert set(Config().to_dict()) == set(cfg.to_dict())


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.toml")), ids=lambda p: p.stem)
def test_shipped_configs_load_and_build(path):
    cfg = load_config(path)
    assert cfg.name == path.stem
    assert path.read_text().lstrip().startswith("#"), "each shipped config starts with a comment saying what it is for"
    tower = build_tower(cfg.tower.name, cfg.tower.embedding_size or None)
    o = cfg.objective
    build_objective(o.name, tower.embedding_size, o.miner, o.loss_args, o.miner_args)


def test_fewshot_config_holds_out_digits():
    cfg = load_config(REPO / "configs" / "mnist-fewshot.toml")
    kept = set(cfg.data.classes) or set("0123456789") - set(cfg.data.exclude)
    assert kept == set("123679")


# ------------------------------------------------------------------------------------------ CLI
def test_cli_train_runs_and_reports_bad_keys(tmp_path, data_root, monkeypatch, capsys):
    from typer.testing import CliRunner

    from retrieval.cli import app

    config = write(tmp_path / "tiny.toml", "# tiny\n[data]\nval_size = 60\n[sampler]\nm = 8\n")
    runner = CliRunner()
    result = runner.invoke(app, ["train", "--config", str(config), "--out", str(tmp_path / "run"), "--epochs", "1",
                                 "--subset", "300", "--set", "train.batch_size=32", "--device", "cpu",
                                 "--root", str(data_root), "--no-progress", "--threads", "1"])
    assert result.exit_code == 0, result.output
    assert result.stdout.strip().endswith(str(tmp_path / "run"))
    cfg = json.loads((tmp_path / "run" / "config.json").read_text())
    assert cfg["name"] == "tiny" and cfg["train"]["epochs"] == 1 and cfg["data"]["subset"] == 300
    assert load_checkpoint(tmp_path / "run").meta["config"] == "tiny"

    from retrieval.cli import main

    monkeypatch.chdir(tmp_path)
    for args, words in ((["--set", "optimizer.lrr=1"], ["optimizer.lrr", "did you mean 'optimizer.lr'"]),
                        (["--epochs", "-2"], ["train.epochs", "positive"]),
                        (["--set", "train.epochs=many"], ["train.epochs=many", "integer"]),
                        (["--root", str(data_root), "--set", "augment.non_digit_slots=1", "--set",
                          "augment.non_digit_mirrors=2,x"], ["augment.non_digit_mirrors", "x not among the classes"])):
        with pytest.raises(SystemExit) as exit_info:
            main(["train", "--config", str(config), *args])
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and err.startswith("error: ") and all(w in err for w in words), err
    assert not (tmp_path / "runs").exists()  # nothing written for a rejected config


def test_cli_overwrite_replaces_the_run_and_keeps_other_files(tmp_path, data_root, capsys):
    """A folder holding a run is refused without --overwrite (untouched); with it, the old run's checkpoints,
    training state, history and card are deleted and the new run's written, and files that are not the run's
    (notes of the user's) are kept."""
    from cli_helpers import run_cli

    config = write(tmp_path / "tiny.toml", "# tiny\n[data]\nval_size = 60\n[sampler]\nm = 8\n")
    run = tmp_path / "run"
    args = ["train", "--config", config, "--out", run, "--subset", 300, "--set", "train.batch_size=32", "--device",
            "cpu", "--root", data_root, "--no-progress", "--threads", 1]
    code, _, err = run_cli(capsys, *args, "--epochs", 2)
    assert code == 0, err
    (run / "notes.txt").write_text("mine")
    old = {p.name: p.read_bytes() for p in run.iterdir()}
    old_state = json.loads(old["state.json"])["tensors"]
    code, out, err = run_cli(capsys, *args, "--epochs", 1, "--set", "seed=1")
    assert code == 1 and out == "" and "already holds a training run" in err and "--overwrite" in err, err
    assert {p.name: p.read_bytes() for p in run.iterdir()} == old

    code, out, err = run_cli(capsys, *args, "--epochs", 1, "--set", "seed=1", "--overwrite")
    assert code == 0 and out.strip() == str(run), err
    new = {p.name: p.read_bytes() for p in run.iterdir()}
    state = json.loads(new["state.json"])
    assert old_state not in new and state["tensors"] in new  # the old training state is gone, the new one there
    assert sorted(new) == sorted({*old, state["tensors"]} - {old_state})
    assert [json.loads(line)["epoch"] for line in new["metrics.jsonl"].decode().splitlines()] == [1]
    assert [s["started_at_step"] for s in state["sessions"]] == [0]  # a fresh run, not a continuation
    assert json.loads(new["config.json"])["seed"] == 1 and json.loads(new["config.json"])["train"]["epochs"] == 1
    for name in ("best", "last"):
        assert load_checkpoint(run / name).meta["epoch"] == 1 and new[f"{name}.safetensors"] != old[f"{name}.safetensors"]
    assert b"epoch 2" not in new["card.md"] and new["card.md"] != old["card.md"]
    assert new["notes.txt"] == b"mine"


def test_overwrite_interrupted_before_its_first_epoch_leaves_nothing_of_the_old_run(tmp_path, data_root):
    """--overwrite deletes the old run's checkpoints, history and card before training: a new run stopped in its
    first epoch leaves its own interrupted state and nothing of the old one (no best checkpoint of another run
    beside the new config); the user's own files stay."""
    cfg = tiny(train={"epochs": 2, "batch_size": 32})
    run = tmp_path / "run"
    train(cfg, run, device="cpu", data_root=data_root, progress=False, threads=1)
    (run / "notes.txt").write_text("mine")
    old_card = (run / "card.md").read_text()
    assert {"best.safetensors", "metrics.jsonl"} <= {p.name for p in run.iterdir()}

    def stop(info):
        if info.global_step == 2:
            raise KeyboardInterrupt

    with pytest.raises(TrainingInterrupted):
        train({**cfg, "seed": 1}, run, device="cpu", data_root=data_root, progress=False, threads=1,
              overwrite=True, on_step=stop)
    names = {p.name for p in run.iterdir()}
    assert not any(n.startswith("best.") for n in names), names
    assert "card.md" not in names or (run / "card.md").read_text() != old_card  # the new run's card, if any
    assert "metrics.jsonl" not in names or not (run / "metrics.jsonl").read_text().strip()
    state = json.loads((run / "state.json").read_text())
    assert state["global_step"] == 2 and [s["started_at_step"] for s in state["sessions"]] == [0]
    assert load_checkpoint(run / "last").meta["interrupted"] is True
    assert (run / "notes.txt").read_text() == "mine"


def test_cli_ctrl_c_saves_and_resume_finishes_identically(tmp_path, data_root):
    cfg = tiny(train={"epochs": 4, "batch_size": 32})
    config = write(tmp_path / "tiny.toml", "# tiny\n")
    overrides = ["data.subset=400", "data.val_size=80", "train.epochs=4", "train.batch_size=32", "sampler.m=8"]
    sets = [a for o in overrides for a in ("--set", o)]
    env = {**os.environ, "RETRIEVAL_DATA_ROOT": str(data_root)}
    run = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "retrieval", "train", "--config", str(config), "--out", str(run),
                             "--device", "cpu", "--no-progress", "--threads", "1", *sets],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.time() + 600  # generous: shared CI machines can be very slow
    while not (run / "metrics.jsonl").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, f"training ended before it could be interrupted: {proc.communicate()[1]}"
    proc.send_signal(signal.SIGINT)  # after epoch 1 of 4: the handler is installed, training is under way
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 130, err
    assert "interrupted" in err and "--resume" in err
    state = json.loads((run / "state.json").read_text())
    assert not state["finished"] and (run / "last.safetensors").is_file()

    from retrieval.cli import main

    with pytest.raises(SystemExit) as exit_info:  # resumed in-process: same code path, no second interpreter
        main(["train", "--resume", "--out", str(run), "--device", "cpu", "--no-progress", "--threads", "1",
              "--root", str(data_root)])
    assert exit_info.value.code in (0, None)
    whole = train(cfg, tmp_path / "whole", device="cpu", data_root=data_root, progress=False, threads=1)
    total = json.loads((whole / "state.json").read_text())["global_step"]
    sessions = json.loads((run / "state.json").read_text())["sessions"]
    saved = state["global_step"]
    assert 0 < saved < total and sessions[0]["started_at_step"] == 0
    assert (sessions[-1]["started_at_step"], sessions[-1]["steps_run"]) == (saved, total - saved)
    a, b = _final_weights(whole), _final_weights(run)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert tower_fingerprint(load_checkpoint(run / "last").tower) == tower_fingerprint(load_checkpoint(whole / "last").tower)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_run_interrupts_resumes_and_loads_on_cpu(tmp_path, data_root):
    cfg = tiny(train={"epochs": 2, "batch_size": 32}, objective={"name": "pair"})

    def stop(info):
        if info.global_step == 13:
            raise KeyboardInterrupt

    with pytest.raises(TrainingInterrupted):
        train(cfg, tmp_path / "run", device="cuda", data_root=data_root, progress=False, on_step=stop)
    train(None, tmp_path / "run", device="cuda", resume=True, data_root=data_root, progress=False)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2] and all(np.isfinite(r["loss"]) for r in records)
    ckpt = load_checkpoint(tmp_path / "run", device="cpu")
    emb = embed_images(ckpt.tower, load_dataset("mnist:test", root=data_root, subset=50).images)
    assert np.isfinite(emb).all() and np.allclose(np.linalg.norm(emb, axis=1), 1, atol=1e-4)
    assert ckpt.head is not None


def test_resume_under_another_thread_count_warns(tmp_path, data_root, caplog):
    cfg = tiny(train={"epochs": 1, "batch_size": 32})

    def stop(info):
        if info.global_step == 3:
            raise KeyboardInterrupt

    with pytest.raises(TrainingInterrupted):
        train(cfg, tmp_path / "run", device="cpu", data_root=data_root, progress=False, on_step=stop,
              threads=1)
    assert json.loads((tmp_path / "run" / "state.json").read_text())["sessions"][0]["threads"] == 1
    with caplog.at_level(logging.INFO, logger="retrieval"):
        train(None, tmp_path / "run", device="cpu", resume=True, data_root=data_root, progress=False, threads=2)
    messages = [r.getMessage() for r in caplog.records]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "1 CPU threads" in warnings[0] and "--threads 1" in warnings[0], messages
