"""Robustness suite (issue 15): corrupted query sets (`mnist-c:SPLIT/NAME`) and the degradations of training
augmentation. What each corruption does: tests/test_corrupt_properties.py; benchmarks/robustness.py end to end:
tests/test_robustness_benchmark.py."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from retrieval.augment import DegradeAugment, Rows
from retrieval.data.corrupt import CORRUPTIONS, corrupt, corrupted_dir
from retrieval.data.specs import load_dataset
from retrieval.errors import UsageError
from cli_helpers import run_cli

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def digits(data_root):
    return load_dataset("mnist:test", subset=12, seed=0).images.numpy()


@pytest.mark.parametrize("name", list(CORRUPTIONS))
def test_each_corruption_is_deterministic_keeps_shape_and_dtype_and_changes_pixels(digits, name):
    a = corrupt(digits, name, seed=3)
    assert a.shape == digits.shape and a.dtype == np.uint8
    assert np.array_equal(a, corrupt(digits, name, seed=3))
    changed = (a != digits).any(axis=(1, 2))
    assert changed.all(), f"{name} left {int((~changed).sum())} image(s) unchanged"


def test_random_corruptions_depend_on_the_seed(digits):
    for name in ("shot_noise", "impulse_noise", "glass_blur", "motion_blur", "fog", "spatter", "zigzag", "photo",
                 "canvas"):
        assert not np.array_equal(corrupt(digits, name, seed=0), corrupt(digits, name, seed=1)), name


def test_corrupt_refuses_bad_input(digits):
    with pytest.raises(UsageError, match="unknown corruption 'nope'"):
        corrupt(digits, "nope")
    with pytest.raises(UsageError, match="uint8"):
        corrupt(digits.astype(np.float32), "fog")


@pytest.fixture
def own_root(tmp_path, data_root):
    """A data root of the test's own, with the run's MNIST linked in: the corrupted sets it makes stay here."""
    (tmp_path / "mnist").symlink_to(Path(data_root) / "mnist")
    return tmp_path


def test_corrupted_spec_is_made_once_cached_and_loads_like_any_spec(own_root):
    clean = load_dataset("mnist:test", root=own_root)
    ds = load_dataset("mnist-c:test/stripe", root=own_root)
    assert ds.images.shape == clean.images.shape and ds.images.dtype == torch.uint8
    assert torch.equal(ds.labels, clean.labels) and ds.classes == clean.classes
    assert ds.sources[5] == "mnist-c:test/stripe[5]"
    assert np.array_equal(ds.images[:100].numpy(), corrupt(clean.images[:2000].numpy(), "stripe")[:100])
    folder = corrupted_dir(own_root, "test", "stripe")
    stamp = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}
    again = load_dataset("mnist-c:test/stripe", root=own_root, classes="3", subset=20, seed=1)
    assert {p.name: p.stat().st_mtime_ns for p in folder.iterdir()} == stamp  # read from the cache
    assert len(again) == 20 and set(again.label_names()) == {"3"}
    assert not [p for p in folder.iterdir() if p.name.endswith(".tmp")]


@pytest.mark.parametrize("spec, message", [
    ("mnist-c:test/nope", "unknown corruption 'nope'"),
    ("mnist-c:fog", "expected mnist-c:train/NAME or mnist-c:test/NAME"),
    ("mnist-c:valid/fog", "expected mnist-c:train/NAME"),
])
def test_bad_corrupted_specs_are_refused_in_one_line(own_root, capsys, spec, message):
    code, out, err = run_cli(capsys, "data", "info", spec, "--root", own_root)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1
    assert not (own_root / "mnist-c").exists() or not any((own_root / "mnist-c").iterdir())


@pytest.fixture(scope="module")
def seeded_run(untrained_run):
    return untrained_run


def test_corrupted_spec_works_wherever_a_spec_is_accepted(seeded_run, tmp_path, capsys):
    index = tmp_path / "ix"
    code, out, err = run_cli(capsys, "index", "build", "--checkpoint", seeded_run, "--data", "mnist-c:test/lowres-8",
                             "--subset", 200, "--out", index, "--device", "cpu")
    assert code == 0, err
    code, out, err = run_cli(capsys, "evaluate", "--index", index, "--queries", "mnist-c:test/brightness",
                             "--subset", 50, "--json", "--device", "cpu")
    assert code == 0, err
    assert json.loads(out)["n_queries"] == 50
    code, out, err = run_cli(capsys, "query", "--index", index, "mnist-c:test/stripe[3]", "--json", "--device", "cpu")
    assert code == 0, err
    answer = json.loads(out)
    assert answer[0]["query"] == "mnist-c:test/stripe[3]" and len(answer[0]["neighbors"]) == 5
    code, out, err = run_cli(capsys, "fewshot", "--checkpoint", seeded_run, "--data", "mnist-c:test/stripe",
                             "--ways", 3, "--shots", 1, "--queries", 2, "--episodes", 5, "--json", "--device", "cpu")
    assert code == 0, err
    assert json.loads(out)["episodes"] == 5


# -- training-side degradations ----------------------------------------------------------------------------------
def test_degrade_augment_is_seeded_keeps_shape_and_splits_by_rows(digits):
    x = torch.from_numpy(digits).unsqueeze(1).float().div(255).repeat(4, 1, 1, 1)  # 48 images
    aug = DegradeAugment(lowres=1, blur=1.5, stroke=1.5, noise=0.3, contrast=0.6, p=0.5)
    a = aug(x, torch.Generator().manual_seed(7))
    assert a.shape == x.shape and a.dtype == x.dtype and float(a.min()) >= 0 and float(a.max()) <= 1
    assert torch.equal(a, aug(x, torch.Generator().manual_seed(7)))
    assert not torch.equal(a, aug(x, torch.Generator().manual_seed(8)))
    changed = (a - x).abs().amax(dim=(1, 2, 3)) > 1e-3
    assert 0.5 < float(changed.float().mean()) < 1.0  # most images, not all (each kind on half of them)
    parts = [aug(x[s:e], torch.Generator().manual_seed(7), Rows(s, e, len(x))) for s, e in ((0, 20), (20, 48))]
    assert torch.allclose(torch.cat(parts), a, atol=1e-6)
    off = DegradeAugment()
    assert not off.enabled and off(x, torch.Generator().manual_seed(0)) is x


def test_edges_and_bands_are_seeded_keep_shape_and_draw_after_the_other_kinds(digits):
    x = torch.from_numpy(digits).unsqueeze(1).float().div(255).repeat(4, 1, 1, 1)
    plain = DegradeAugment(lowres=1, noise=0.3, p=0.5)
    more = DegradeAugment(lowres=1, noise=0.3, p=0.5, edges=True, bands=8)
    a = more(x, torch.Generator().manual_seed(3))
    assert a.shape == x.shape and a.dtype == x.dtype and float(a.min()) >= 0 and float(a.max()) <= 1
    assert torch.equal(a, more(x, torch.Generator().manual_seed(3)))
    assert not torch.equal(a, plain(x, torch.Generator().manual_seed(3)))
    # recipes without edges and bands draw exactly as before those kinds existed (same images for a seed)
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    assert torch.equal(plain(x, g1), DegradeAugment(lowres=1, noise=0.3, p=0.5)(x, g2))
    parts = [more(x[s:e], torch.Generator().manual_seed(3), Rows(s, e, len(x))) for s, e in ((0, 17), (17, 48))]
    assert torch.allclose(torch.cat(parts), a, atol=1e-6)


def test_edges_imitate_canny_and_bands_invert_opposite_margins(digits):
    x = torch.from_numpy(digits).unsqueeze(1).float().div(255)
    ours = DegradeAugment._canny(x, torch.full((len(x),), 0.1))[:, 0].numpy() > 0
    theirs = corrupt(digits, "canny_edges") > 0  # MNIST-C's thresholds (0.1 / 0.2)
    assert (ours & theirs).sum() / (ours | theirs).sum() > 0.95
    aug = DegradeAugment(bands=6, p=1.0)
    blank = torch.zeros(16, 1, 28, 28)
    y = aug(blank, torch.Generator().manual_seed(0))[:, 0]
    for img in y:  # two opposite bands of ones, 1..7 px wide, along columns or rows
        cols, rows = img.amax(0) > 0.5, img.amax(1) > 0.5
        inverted = cols if bool(img[14].amax() > 0.5) and not bool(img[:, 14].amax() > 0.5) else rows
        assert bool(inverted[0]) and bool(inverted[-1]) and not bool(inverted[14])
        assert 2 <= int(inverted.sum()) <= 14


def test_non_digits_are_seeded_framed_and_share_one_label():
    from retrieval.augment import NON_DIGIT_LABEL, NonDigitExposure, draw_non_digits

    a = draw_non_digits(70, 28, torch.Generator().manual_seed(1))
    assert a.shape == (70, 1, 28, 28) and float(a.min()) >= 0 and float(a.max()) <= 1
    assert torch.equal(a, draw_non_digits(70, 28, torch.Generator().manual_seed(1)))
    framed = 0  # drawn marks (4 of the 7 kinds) are framed as the query preprocessing frames ink: side ~20 px
    for img in a[:, 0] > 0.5:
        rows, cols = torch.nonzero(img.any(1)).flatten(), torch.nonzero(img.any(0)).flatten()
        if len(rows) and rows.min() >= 2 and rows.max() <= 25 and cols.min() >= 2 and cols.max() <= 25:
            framed += 1
            assert 17 <= max(rows.max() - rows.min(), cols.max() - cols.min()) + 1 <= 24
    assert framed >= 30
    x, y = torch.rand(64, 1, 28, 28), torch.arange(64) // 16
    out, labels = NonDigitExposure(slots=1, group=16)(x, y, torch.Generator().manual_seed(0))
    assert torch.equal(out[:48], x[:48]) and not torch.equal(out[48:], x[48:])
    assert labels[:48].tolist() == y[:48].tolist() and set(labels[48:].tolist()) == {NON_DIGIT_LABEL}


def test_non_digit_slots_take_mirrored_and_overlaid_digits_of_the_batch():
    from retrieval.augment import NON_DIGIT_LABEL, NonDigitExposure

    x, y = torch.rand(64, 1, 28, 28), torch.arange(64) // 16  # classes 0-3, 16 images each; class 3's slot goes
    expose = NonDigitExposure(slots=1, group=16, mirror_labels=[2], overlays=True)
    out, labels = expose(x, y, torch.Generator().manual_seed(0))
    again, _ = expose(x, y, torch.Generator().manual_seed(0))
    assert torch.equal(out, again) and torch.equal(out[:48], x[:48]) and set(labels[48:].tolist()) == {NON_DIGIT_LABEL}
    mirrored = overlaid = 0
    for img in out[48:, 0]:
        if any(torch.equal(img, torch.flip(x[j, 0], dims=(-1,))) for j in range(48)):
            assert any(torch.equal(img, torch.flip(x[j, 0], dims=(-1,))) for j in range(32, 48))  # class 2 only
            mirrored += 1
        pairs = [(a, b) for a in range(48) for b in range(48) if torch.equal(img, torch.maximum(x[a, 0], x[b, 0]))]
        if pairs:
            assert all(int(y[a]) != int(y[b]) for a, b in pairs)  # two different classes
            overlaid += 1
    assert mirrored >= 2 and overlaid >= 2 and mirrored + overlaid < 16  # synthetic ones keep a share


@pytest.mark.parametrize("key, value", [("blur", 9.0), ("noise", -0.1), ("degrade_p", 2.0), ("bands", 20),
                                        ("non_digit_slots", 16), ("non_digit_mirrors", ["3"]),
                                        ("non_digit_overlays", True)])
def test_degrade_options_are_validated(key, value):
    from retrieval.config import resolve_config

    with pytest.raises(UsageError, match=f"augment.{key}"):
        resolve_config({"augment": {key: value}, "train": {"batch_size": 256}, "sampler": {"m": 16}})


def test_shipped_robust_config_turns_every_degradation_on():
    from retrieval.config import load_config

    a = load_config(REPO / "configs" / "mnist-robust.toml").augment
    assert a.lowres and a.blur and a.stroke and a.noise and a.contrast and a.edges and a.bands
    assert 0 < a.degrade_p < 1 and a.non_digit_slots >= 1


# -- unknown inputs: calibrate without negatives ----------------------------------------------------------------
def test_acceptance_threshold_answers_the_asked_fraction():
    from retrieval.pairs import acceptance_threshold

    d = np.arange(100, dtype=float) / 100
    ok = np.ones(100, bool)
    cal = acceptance_threshold(d, ok, 0.9)
    assert cal.n_answered == 90 and 0.89 < cal.max_distance < 0.90 and cal.recall == pytest.approx(0.9)
    assert acceptance_threshold(d, ok, 1.0).n_answered == 100
    assert acceptance_threshold(d, ok).n_answered == 99  # the documented default, 0.99
    with pytest.raises(UsageError, match="`accept`"):
        acceptance_threshold(d, ok, 0.0)


def test_calibrate_without_negatives_defaults_to_an_acceptance_rate(seeded_run, tmp_path, capsys):
    index = tmp_path / "ix"
    code, _, err = run_cli(capsys, "index", "build", "--checkpoint", seeded_run, "--data", "mnist:train",
                           "--subset", 300, "--out", index, "--device", "cpu")
    assert code == 0, err
    code, out, err = run_cli(capsys, "calibrate", "--index", index, "--queries", "mnist:test", "--subset", 200,
                             "--json", "--device", "cpu")
    assert code == 0, err
    record = json.loads(out)
    assert record["rule"] == "accept 0.99 of in-distribution queries" and record["n_answered"] == 198
    code, out, err = run_cli(capsys, "calibrate", "--index", index, "--queries", "mnist:test", "--subset", 200,
                             "--accept", 0.9, "--json", "--device", "cpu")
    assert code == 0, err
    assert json.loads(out)["n_answered"] == 180
    assert json.loads((index / "meta.json").read_text())["calibration"]["n_answered"] == 180
    # with negatives (classes the index lacks) the F1 rule stays the default
    part = tmp_path / "ix04"
    code, _, err = run_cli(capsys, "index", "build", "--checkpoint", seeded_run, "--data", "mnist:train",
                           "--classes", "0,1,2,3,4", "--subset", 300, "--out", part, "--device", "cpu")
    assert code == 0, err
    code, out, err = run_cli(capsys, "calibrate", "--index", part, "--queries", "mnist:test", "--subset", 200,
                             "--json", "--device", "cpu")
    assert code == 0, err
    assert json.loads(out)["rule"] == "max-f1"


# -- query preprocessing on photos ---------------------------------------------------------------------------------
def test_preprocessing_finds_the_digit_on_uneven_grey_paper(digits):
    from PIL import Image

    from retrieval.data.preprocess import preprocess_image

    def picture(digit, paper):
        ink = np.asarray(Image.fromarray(digit).resize((112, 112), Image.Resampling.BILINEAR), np.float32) / 255
        return Image.fromarray(np.clip(paper * (1 - ink) + 0.2 * paper * ink, 0, 255).astype(np.uint8))

    yy, xx = np.mgrid[0:112, 0:112] / 111.0
    uneven = 120 + 110 * xx + 10 * yy - 60 * np.exp(-((yy - 0.3) ** 2 + (xx - 0.7) ** 2) / 0.05)
    rng = np.random.default_rng(0)
    scores = []
    for digit in digits:
        clean = preprocess_image(picture(digit, np.full((112, 112), 250.0))).numpy().astype(float)
        noisy = uneven + rng.normal(0, 4, uneven.shape)
        photo = preprocess_image(picture(digit, noisy)).numpy().astype(float)
        scores.append(np.corrcoef(clean.ravel(), photo.ravel())[0, 1])
    assert np.mean(scores) > 0.85 and min(scores) > 0.6, [round(s, 3) for s in scores]


def test_training_applies_the_degradations_a_config_asks_for(data_root, tmp_path):
    from retrieval.config import resolve_config
    from retrieval.seeding import make_generator
    from retrieval.training import build_trainer

    def batch(**augment):
        cfg = resolve_config({"name": "tiny", "data": {"subset": 400, "val_size": 80}, "sampler": {"m": 8},
                              "train": {"epochs": 1, "batch_size": 32},
                              "augment": {"degrees": 0.0, "translate": 0.0, "scale": [1.0, 1.0], **augment}})
        trainer = build_trainer(cfg, tmp_path / str(len(augment)), torch.device("cpu"), progress=False)
        x, _ = trainer.make_batch(trainer.sampler.epoch_batches(0)[0], make_generator(0, "t"))
        return x, trainer.checkpoint_meta["augment"]

    plain, meta = batch()
    degraded, dmeta = batch(noise=0.3, contrast=0.6, degrade_p=1.0)
    assert "degrade" not in meta and dmeta["degrade"]["noise"] == 0.3
    assert plain.shape == degraded.shape and (degraded - plain).abs().amax() > 0.1


def test_non_digit_pictures_say_what_they_show_and_look_alikes_are_reported_apart():
    from repo_scripts import load_script

    bench = load_script("benchmarks/robustness.py", "robustness_bench")
    images, ok, marks = bench._preprocessed_non_digits("symbols", 60, seed=0)
    assert len(marks) == 60 and images.shape == (int(ok.sum()), 28, 28) and set(marks) <= set("@#%&*+=?!$<>{}[]~^")
    look_alike = np.array([m in bench.DIGIT_LOOK_ALIKES for m in marks])
    assert 0 < look_alike.sum() < 60
    rows = bench._rejected_rows("symbols", look_alike, marks)  # as if exactly the look-alikes were rejected
    assert rows["symbols rejected"] == pytest.approx(look_alike.mean()) and rows["symbols rejected, no look-alikes"] == 0
    assert list(bench._rejected_rows("blank", np.ones(3, bool), ["blank"] * 3)) == ["blank rejected"]
    assert {m for _, m in bench.non_digit_pictures("shapes", 30, seed=0)} == {"ellipse", "rectangle", "triangle"}


def test_shift_averaging_repeats_the_border_so_an_even_background_stays_even():
    from retrieval.towers import build_tower

    torch.manual_seed(0)
    tower = build_tower("default", test_shifts=1).eval()
    grey = torch.full((2, 1, 28, 28), 0.4)  # a hazy page: every shifted view must be the same page
    grey[1, :, 8:20, 12:15] = 1.0  # and a stroke on it
    with torch.no_grad():
        averaged = tower(grey)
        tower.test_shifts = 0
        plain = tower(grey)
    assert torch.allclose(averaged[0], plain[0], atol=1e-5)  # zero fill would add a dark strip to each view
    assert not torch.allclose(averaged[1], plain[1], atol=1e-5)
