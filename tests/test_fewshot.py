"""Few-shot episodes: sampling, classification with known answers, validation, and the `retrieval fewshot` CLI."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from retrieval.errors import UsageError
from retrieval.fewshot import (
    Episodes,
    classify_episodes,
    evaluate_fewshot,
    pixel_embeddings,
    sample_episodes,
    summarise,
)
from cli_helpers import run_cli


def _clusters(n_classes: int, per_class: list[int] | int, dim: int = 16, noise: float = 0.05, seed: int = 0):
    """Unit embeddings around orthogonal class centres (far apart compared with the noise)."""
    rng = np.random.default_rng(seed)
    sizes = per_class if isinstance(per_class, list) else [per_class] * n_classes
    labels = np.repeat(np.arange(n_classes), sizes)
    x = np.eye(dim, dtype=np.float32)[labels] + noise * rng.standard_normal((len(labels), dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True), labels


def test_sampling_is_deterministic_and_valid():
    labels = np.repeat(np.arange(6), [20, 31, 25, 40, 21, 22])
    a = sample_episodes(labels, ways=4, shots=3, queries=5, episodes=300, seed=7)
    b = sample_episodes(labels, ways=4, shots=3, queries=5, episodes=300, seed=7)
    c = sample_episodes(labels, ways=4, shots=3, queries=5, episodes=300, seed=8)
    for name in ("classes", "support", "query"):
        assert np.array_equal(getattr(a, name), getattr(b, name))
    assert not np.array_equal(a.support, c.support)
    assert a.support.shape == (300, 4, 3) and a.query.shape == (300, 4, 5) and a.classes.shape == (300, 4)
    for e in range(300):
        assert len(set(a.classes[e])) == 4  # distinct classes per episode
        positions = np.concatenate([a.support[e].ravel(), a.query[e].ravel()])
        assert len(set(positions.tolist())) == len(positions)  # no image used twice in an episode
        for w in range(4):
            assert (labels[a.support[e, w]] == a.classes[e, w]).all()
            assert (labels[a.query[e, w]] == a.classes[e, w]).all()
    # every class and every image of a class gets drawn (uniform sampling, not a fixed prefix)
    assert set(a.classes.ravel().tolist()) == set(range(6))
    used = np.unique(np.concatenate([a.support.ravel(), a.query.ravel()]))
    assert len(used) == len(labels)


def test_well_separated_clusters_are_classified_perfectly():
    emb, labels = _clusters(6, 30)
    for method, k in (("prototype", 1), ("knn", 1), ("knn", 3)):
        results = evaluate_fewshot(emb, labels, ways=5, shots=[1, 5], queries=10, episodes=200, method=method, k=k)
        assert [r.shots for r in results] == [1, 5]
        for r in results:
            assert r.accuracy == 1.0 and r.ci95 == 0.0 and r.episodes == 200 and r.ways == 5


def test_overlapping_clusters_score_below_one_and_more_shots_help():
    emb, labels = _clusters(5, 60, dim=8, noise=0.9, seed=1)
    one, five = evaluate_fewshot(emb, labels, ways=5, shots=[1, 5], queries=10, episodes=300, seed=3)
    assert 0.2 < one.accuracy < five.accuracy < 1.0
    assert 0 < five.ci95 < one.ci95


def test_prototype_and_knn_known_answers():
    """2-D unit vectors at given angles; way 0's query at 85 deg is nearer way 1's prototype (50 deg) than its
    own (45 deg, mean of 0 and 90 deg), but nearest to its own support image at 90 deg."""
    angles = np.radians([0, 90, 50, 50, 85, 50])  # support w0, support w0, support w1 x2, query w0, query w1
    emb = np.stack([np.cos(angles), np.sin(angles)], axis=1).astype(np.float32)
    ep = Episodes(classes=np.array([[0, 1]]), support=np.array([[[0, 1], [2, 3]]]), query=np.array([[[4], [5]]]))
    assert classify_episodes(emb, ep, "prototype").tolist() == [0.5]
    assert classify_episodes(emb, ep, "knn", k=1).tolist() == [1.0]
    assert classify_episodes(emb, ep, "knn", k=2).tolist() == [1.0]  # 1 vote each: larger summed similarity wins
    assert classify_episodes(emb, ep, "knn", k=3).tolist() == [0.5]  # two votes for way 1
    # scale does not matter: embeddings are compared by cosine similarity
    assert classify_episodes(emb * np.array([[3.0], [0.5], [2], [1], [7], [1]], dtype=np.float32), ep,
                             "knn", k=1).tolist() == [1.0]


def test_summary_mean_and_confidence_interval():
    r = summarise(np.array([1.0, 0.5, 0.75, 0.75]), ways=2, shots=1, queries=2, method="prototype")
    assert r.accuracy == pytest.approx(0.75)
    assert r.std == pytest.approx(math.sqrt(0.03125))
    assert r.ci95 == pytest.approx(1.96 * math.sqrt(0.03125) / 2)


def test_results_do_not_depend_on_other_shot_counts_and_are_deterministic():
    emb, labels = _clusters(5, 40, dim=8, noise=0.8, seed=2)
    both = evaluate_fewshot(emb, labels, ways=3, shots=[1, 5], queries=5, episodes=100, seed=11)
    again = evaluate_fewshot(emb, labels, ways=3, shots=[1, 5], queries=5, episodes=100, seed=11)
    alone = evaluate_fewshot(emb, labels, ways=3, shots=5, queries=5, episodes=100, seed=11)
    other = evaluate_fewshot(emb, labels, ways=3, shots=5, queries=5, episodes=100, seed=12)
    assert both == again
    assert both[1] == alone[0]
    assert other[0].accuracy != alone[0].accuracy


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(ways=6), "`ways` 6 is more than the 5 class(es) available"),
        (dict(ways=1), "`ways` must be an integer >= 2"),
        (dict(shots=0), "`shots` must be an integer >= 1"),
        (dict(shots=[1, 0]), "`shots` must be an integer >= 1"),
        (dict(queries=0), "`queries` must be an integer >= 1"),
        (dict(episodes=0), "`episodes` must be an integer >= 1"),
        (dict(shots=8, queries=5), "'c3' has 12"),
        (dict(method="svm"), "`method` must be one of prototype, knn"),
        (dict(method="knn", k=4, shots=1), "`k` must be between 1 and ways * shots = 3"),
        (dict(seed=-1), "`seed` must be a non-negative integer"),
    ],
)
def test_impossible_settings_fail_clearly(kwargs, message):
    emb, labels = _clusters(5, [20, 20, 20, 12, 20])
    args = dict(ways=3, shots=1, queries=5, episodes=10, class_names=[f"c{i}" for i in range(5)]) | kwargs
    with pytest.raises(UsageError) as e:
        evaluate_fewshot(emb, labels, **args)
    assert message in str(e.value)  # the library names its arguments; the CLI shows them as flags


def test_pixel_embeddings_are_unit_rows():
    images = np.random.default_rng(0).integers(0, 256, size=(10, 28, 28), dtype=np.uint8)
    emb = pixel_embeddings(images)
    assert emb.shape == (10, 784) and emb.dtype == np.float32
    assert np.allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)


# --- the CLI, on real MNIST test images -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def untrained_checkpoint(tmp_path_factory):
    from retrieval.checkpoint import save_checkpoint
    from retrieval.towers import build_tower
    import torch

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ckpt") / "tower"
    save_checkpoint(path, build_tower("default", 32))
    return path


def test_cli_json_is_deterministic(data_root, untrained_checkpoint, capsys):
    argv = ["fewshot", "--checkpoint", str(untrained_checkpoint), "--data", "mnist:test", "--root", str(data_root),
            "--classes", "0,4,5", "--ways", "3", "--shots", "1,3", "--queries", "4", "--episodes", "40",
            "--seed", "5", "--json"]
    code, out, _ = run_cli(capsys, *argv)
    assert code == 0
    rows = json.loads(out)
    assert [sorted(r) for r in rows] == [["accuracy", "ci95", "episodes", "shots", "ways"]] * 2
    assert [(r["ways"], r["shots"], r["episodes"]) for r in rows] == [(3, 1, 40), (3, 3, 40)]
    assert all(0.0 <= r["accuracy"] <= 1.0 and r["ci95"] >= 0 for r in rows)
    assert run_cli(capsys, *argv)[1] == out  # same seed, same figures

    code, out_knn, _ = run_cli(capsys, *argv + ["--method", "knn", "--k", "3"])
    assert code == 0 and [r["shots"] for r in json.loads(out_knn)] == [1, 3]
    code, _, err = run_cli(capsys, *argv + ["--method", "knn", "--k", "4"])  # 3 ways x 1 shot: only 3 neighbours
    assert code == 2 and "--k must be between 1 and ways * shots = 3 for 1-shot" in err


def test_cli_pixels_table_and_single_json(data_root, capsys):
    base = ["fewshot", "--checkpoint", "pixels", "--data", "mnist:test", "--root", str(data_root),
            "--classes", "0,4,5,8", "--ways", "4", "--queries", "5", "--episodes", "50"]
    code, out, _ = run_cli(capsys, *base + ["--shots", "5", "--json"])
    assert code == 0
    row = json.loads(out)
    assert isinstance(row, dict) and row["shots"] == 5 and row["ways"] == 4 and 0.5 < row["accuracy"] < 1.0
    code, out, _ = run_cli(capsys, *base + ["--shots", "1,5"])
    assert code == 0
    assert "raw pixels" in out and "shots" in out and len([ln for ln in out.splitlines() if "±" in ln]) == 2


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--ways", "5"], "--ways 5 is more than the 4 class(es) available"),
        (["--shots", "1,two"], "--shots expects comma-separated integers"),
        (["--shots", "900", "--queries", "15"], "'5' has 892"),
        (["--episodes", "0"], "--episodes must be an integer >= 1"),
        (["--method", "nearest"], "--method must be one of prototype, knn"),
        (["--k", "3"], "--k applies to --method knn only"),
        (["--method", "prototype", "--k", "1"], "--k applies to --method knn only"),
    ],
)
def test_cli_bad_values_exit_2(data_root, capsys, extra, message):
    argv = ["fewshot", "--checkpoint", "pixels", "--data", "mnist:test", "--root", str(data_root),
            "--classes", "0,4,5,8", "--ways", "4", "--shots", "1", "--episodes", "5"] + extra
    code, out, err = run_cli(capsys, *argv)
    assert code == 2 and out == ""
    assert err.startswith("error: ") and message in err


def test_cli_missing_checkpoint_exit_1(data_root, tmp_path, capsys):
    code, out, err = run_cli(capsys, "fewshot", "--checkpoint", tmp_path / "nothing", "--data", "mnist:test",
                             "--root", data_root, "--ways", "4")
    assert code == 1 and out == "" and "checkpoint not found" in err


# --- the trainer's few-shot features (augment.dihedral_classes, augment.elastic) --------------------------------

def test_dihedral_classes_turn_each_group_and_relabel():
    import torch

    from retrieval.augment import DihedralClasses

    x = torch.rand(12, 1, 28, 28)
    y = torch.tensor([0] * 4 + [1] * 4 + [2] * 4)
    out, labels = DihedralClasses(group=4)(x, y, torch.Generator().manual_seed(3))
    assert torch.equal(labels // 8, y)
    symmetries = labels % 8
    for g in range(3):  # one symmetry per group (a class slot of the sampler), so positives stay positives
        assert len(set(symmetries[g * 4:(g + 1) * 4].tolist())) == 1
    for i in range(12):
        assert torch.equal(out[i], DihedralClasses.apply(x[i], int(symmetries[i])))
    # the 8 symmetries are distinct on an asymmetric image, and 4 quarter turns / 2 mirrors are the identity
    img = torch.arange(16.0).view(1, 4, 4)
    assert len({tuple(DihedralClasses.apply(img, s).flatten().tolist()) for s in range(8)}) == 8
    assert torch.equal(DihedralClasses.apply(DihedralClasses.apply(img, 4), 4), img)
    again = DihedralClasses(group=4)(x, y, torch.Generator().manual_seed(3))
    assert torch.equal(again[0], out) and torch.equal(again[1], labels)


def test_composite_classes_join_halves_of_two_slots_and_relabel():
    import torch

    from retrieval.augment import CompositeClasses

    x = torch.rand(4 * 3 + 2, 1, 28, 28)  # 4 slots of 3 images, 2 spare images that stay as they are
    y = torch.tensor([0] * 3 + [1] * 3 + [2] * 3 + [2] * 3 + [1, 1])
    g = torch.Generator().manual_seed(0)
    out, labels = CompositeClasses(1.0, num_classes=10, group=3)(x, y, g)
    assert torch.equal(out[12:], x[12:]) and torch.equal(labels[12:], y[12:])
    for slot in range(4):
        rows = slice(slot * 3, slot * 3 + 3)
        assert len(set(labels[rows].tolist())) == 1  # a slot stays one class
        own = x[rows]
        # each image is its own top (or left) half and, below (or right of) the cut, the same other slot's image
        partners = [p for p in range(4) if p != slot]
        joined = [(cut, p) for cut in (0, 1) for p in partners if torch.equal(out[rows], torch.cat(
            [own[..., :14, :], x[p * 3:p * 3 + 3, ..., 14:, :]], dim=-2) if cut == 0 else torch.cat(
            [own[..., :14], x[p * 3:p * 3 + 3, ..., 14:]], dim=-1))]
        assert len(joined) == 1
        cut, p = joined[0]
        a, b = int(y[slot * 3]), int(y[p * 3])
        assert int(labels[slot * 3]) == (a if a == b else 10 + (cut * 10 + a) * 10 + b)
    assert int(labels.max()) >= 10  # with 3 distinct classes, some slot got a new class
    # off at p = 0; seeded
    assert CompositeClasses(0.0, 10, 3)(x, y, g)[0] is x
    again = CompositeClasses(1.0, 10, 3)(x, y, torch.Generator().manual_seed(0))
    assert torch.equal(again[0], out) and torch.equal(again[1], labels)


def test_deskew_straightens_a_slanted_stroke_and_only_at_inference():
    import torch

    from retrieval.towers import build_tower, deskew

    x = torch.zeros(1, 1, 28, 28)
    for row in range(6, 22):  # a stroke leaning right: one pixel across for every two rows down
        x[0, 0, row, 14 + (row - 14) // 2] = 1.0
    straight = deskew(x)[0, 0]
    cols = (straight * torch.arange(28.0)).sum(1)[6:22] / straight.sum(1)[6:22]
    assert float(cols.max() - cols.min()) < 1.0  # the slanted stroke spanned 8 columns
    assert abs(float(straight.sum() - x.sum())) < 0.5  # ink is moved, not lost
    skewing, plain = build_tower("default", 8, deskew=True), build_tower("default", 8)
    plain.load_state_dict(skewing.state_dict())
    batch = torch.cat([x, torch.rand(3, 1, 28, 28)])
    with torch.no_grad():
        for mode in (True, False):  # training sees the raw image, inference the deskewed one
            skewing.train(mode), plain.train(mode)
            expected = plain(batch if mode else deskew(batch))
            assert torch.allclose(skewing(batch), expected, atol=1e-5)
    assert not torch.allclose(plain(batch), plain(deskew(batch)), atol=1e-3)


def test_test_shifts_average_the_shifted_views_at_inference_only():
    import torch
    import torch.nn.functional as F

    from retrieval.towers import build_tower

    shifting, plain = build_tower("default", 8, test_shifts=1), build_tower("default", 8)
    plain.load_state_dict(shifting.state_dict())
    x = torch.zeros(2, 1, 28, 28)
    x[:, :, 8:20, 12:16] = 1.0
    x[1, :, 8:12, 12:22] = 1.0  # a 7-ish shape
    with torch.no_grad():
        shifting.train(), plain.train()
        assert torch.allclose(shifting(x), plain(x), atol=1e-6)  # training sees one view
        shifting.eval(), plain.eval()
        views = [torch.roll(x, (dy, dx), dims=(2, 3)) for dy in (-1, 0, 1) for dx in (-1, 0, 1)]  # no ink on the rim
        expected = F.normalize(sum(plain(v) for v in views), dim=1)
        assert torch.allclose(shifting(x), expected, atol=1e-5)
        assert not torch.allclose(shifting(x), plain(x), atol=1e-4)


def test_shifted_views_go_through_together_with_the_one_view_at_a_time_embeddings():
    """A lone query's nine views take one pass of the backbone (not nine), as do a few images' up to VIEW_ROWS rows;
    a batch goes one view at a time. The embeddings are those of one view at a time either way."""
    import torch
    import torch.nn.functional as F

    from retrieval.towers import VIEW_ROWS, build_tower

    torch.manual_seed(0)
    tower = build_tower("default", 16, test_shifts=1).eval()
    passes = []
    tower.backbone.register_forward_hook(lambda module, args, out: passes.append(len(args[0])))
    few, many = VIEW_ROWS // 9, VIEW_ROWS // 9 + 1
    x = torch.rand(many, 1, 28, 28)
    out = {}
    with torch.no_grad():
        for n in (1, few, many):
            passes.clear()
            out[n] = tower(x[:n])
            assert passes == ([9 * n] if n <= few else [n] * 9), n
        padded = F.pad(x, (1, 1, 1, 1), mode="replicate")
        one_at_a_time = F.normalize(sum(tower._embed(padded[..., 1 + dy:29 + dy, 1 + dx:29 + dx].contiguous(
            memory_format=torch.channels_last)) for dy in (-1, 0, 1) for dx in (-1, 0, 1)), dim=1)
    for n, embedded in out.items():
        assert torch.allclose(embedded, one_at_a_time[:n], atol=1e-6), n


def test_elastic_warp_is_seeded_small_and_off_at_zero():
    import torch

    from retrieval.augment import ElasticAugment

    x = torch.zeros(2, 1, 28, 28)
    x[:, :, 10:18, 13:15] = 1.0  # a vertical bar
    assert ElasticAugment(0.0)(x, torch.Generator()) is x
    assert torch.allclose(ElasticAugment(1e-6)(x, torch.Generator().manual_seed(0)), x, atol=1e-4)
    a = ElasticAugment(2.0)(x, torch.Generator().manual_seed(0))
    b = ElasticAugment(2.0)(x, torch.Generator().manual_seed(0))
    c = ElasticAugment(2.0)(x, torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and not torch.equal(a, c) and not torch.equal(a[0], a[1])
    # at most 2 pixels of displacement: nothing lands far from the bar
    far = torch.ones(28, 28, dtype=torch.bool)
    far[7:21, 10:18] = False
    assert float(a[:, 0][:, far].abs().max()) == 0.0 and float(a.sum()) > 0.5 * float(x.sum())


def test_trainer_uses_dihedral_classes_and_elastic(data_root, tmp_path):
    import torch

    from retrieval.config import resolve_config
    from retrieval.seeding import make_generator
    from retrieval.training import build_trainer

    cfg = resolve_config({"data": {"exclude": ["0", "4", "5", "8"], "subset": 400, "val_size": 80},
                          "train": {"epochs": 1, "batch_size": 32}, "sampler": {"m": 8},
                          "augment": {"dihedral_classes": True, "elastic": 1.5}})
    trainer = build_trainer(cfg, tmp_path, torch.device("cpu"), data_root=data_root, progress=False)
    positions = trainer.sampler.epoch_batches(0)[0]
    x, y = trainer.make_batch(positions, make_generator(0, "step", 0, 0))
    assert x.shape == (32, 1, 28, 28) and torch.equal(y // 8, trainer.labels[positions])
    assert len(set((y % 8).tolist())) > 1
    loss = trainer.train_step(x, y, make_generator(0, "step", 0, 0))
    assert torch.isfinite(loss)
    with pytest.raises(UsageError, match="augment.elastic"):
        resolve_config({"augment": {"elastic": 9.0}})


def test_trainer_with_composite_classes_and_deskew(data_root, tmp_path):
    import torch

    from retrieval.checkpoint import load_checkpoint
    from retrieval.config import resolve_config
    from retrieval.seeding import make_generator
    from retrieval.training import build_trainer, train

    cfg = resolve_config({"data": {"exclude": ["0", "4", "5", "8"], "subset": 400, "val_size": 80},
                          "train": {"epochs": 1, "batch_size": 32}, "sampler": {"m": 8},
                          "tower": {"embedding_size": 16, "deskew": True},
                          "augment": {"composite_classes": 1.0, "dihedral_classes": True}})
    trainer = build_trainer(cfg, tmp_path / "peek", torch.device("cpu"), data_root=data_root, progress=False)
    x, y = trainer.make_batch(trainer.sampler.epoch_batches(0)[0], make_generator(0, "step", 0, 0))
    assert int(y.max()) >= 10 * 8  # composites (labels past the ten digits), then turned by the symmetries
    run = train(cfg, tmp_path / "run", data_root=data_root, progress=False)
    ck = load_checkpoint(run)
    assert ck.tower.deskew and not ck.tower.training
    assert ck.meta["deskew"] is True and ck.meta["augment"]["composite_classes"] == 1.0
    with pytest.raises(UsageError, match="augment.composite_classes"):
        resolve_config({"augment": {"composite_classes": 1.5}})
