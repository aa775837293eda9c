"""Robustness of trained towers to corrupted queries: precision@1 and MAP@R per corruption (retrieval.data.corrupt:
the 15 MNIST-C corruptions, low resolution, stroke width, photo-like, web canvas) against the clean train index.

Test mode (default): for every run given (by default runs/NAME for each shipped config that has
a checkpoint), a Flat index of mnist:train is built with the run's tower (workflows.build_index), and every
`mnist-c:test/NAME` spec (made once and cached in the data root) is evaluated against it (workflows.evaluate: the
same code as `retrieval evaluate`), on a seeded subset of the 10,000 test images (`--subset`, 0 for all). One table
(rows: corruptions, columns: runs) goes to stdout and, with --write, to benchmarks/history.md.

Selection mode (--selection): the split used to CHOOSE a recipe. References are the run's training slice of
mnist:train, queries its validation slice (the 5,000 images the trainer held out, same seed), corrupted with seed 1
(test sets use seed 0); nothing from mnist:test is read.

Pictures (--pictures, with --selection or on the test split): every family of retrieval/data/pictures.py (scans,
canvas exports, phone photos, lined paper, screenshots, MNIST-C as pictures) rendered from the query digits as
picture files, written and read back with load_image_file (the code `retrieval query FILE` and folder specs run),
beside the family's 28x28 array counterpart (retrieval/data/corrupt.py); a refused picture counts as a miss.
Held-out families (retrieval.data.pictures.HELD_OUT) are reported apart.

`--references N` takes a seeded subset of N references instead of all (a quick look; the tests use it with an
untrained tower); `--index-dir DIR` builds the test mode's indexes in DIR/RUN and keeps them.

    .venv/bin/python benchmarks/robustness.py --runs runs/mnist-default --subset 2000
    .venv/bin/python benchmarks/robustness.py --selection --runs runs/mnist-default runs/mnist-robust
    .venv/bin/python benchmarks/robustness.py --pictures --selection --subset 500 --runs runs/mnist-robust
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks._report import append_section, machine  # noqa: E402
from retrieval.data.corrupt import CORRUPTIONS, KIND, corrupt  # noqa: E402
from retrieval.precision import resolve_precision  # noqa: E402
from retrieval.workflows import Compute, Selection

# Families the mnist-robust recipe's training augmentation imitates; the others are held out from training.
TRAINED_FAMILIES = {"noise", "blur", "low resolution", "stroke width", "contrast", "affine", "edges"}
TRAINED_EXCEPT = {"fog"}  # contrast family, but fog's plasma texture is nothing the training draws
TRAINED_ALSO = {"stripe"}  # an occlusion, but inverted margins (augment.bands) are what it is


def trained(name: str) -> bool:
    c = CORRUPTIONS[name]
    return (c.family in TRAINED_FAMILIES and name not in TRAINED_EXCEPT) or name in TRAINED_ALSO


def default_runs() -> list[Path]:
    from retrieval.run_folder import BEST, RunFolder
    from retrieval.workflows import shipped_configs

    out = []
    for name in shipped_configs():
        if RunFolder(ROOT / "runs" / name).weights(BEST).is_file():
            out.append(ROOT / "runs" / name)
    return out


def _index_folder(index_dir: Path | None, run: Path, tmp: str) -> Path:
    return Path(index_dir) / run.name if index_dir else Path(tmp) / "index"


def test_figures(run: Path, names: list[str], subset: int | None, root, device: str, references=None,
                 index_dir: Path | None = None) -> dict:
    from retrieval.workflows import build_index, evaluate

    out = {}
    with tempfile.TemporaryDirectory(prefix="robustness-") as tmp:
        folder = _index_folder(index_dir, run, tmp)
        build_index(run, Selection(["mnist:train"], root=root, subset=references, seed=0), folder,
                    compute=Compute(device=device))
        for name in ["clean", *names]:
            spec = "mnist:test" if name == "clean" else f"{KIND}:test/{name}"
            t = time.perf_counter()
            ev = evaluate(folder, Selection(spec, root=root, subset=subset, seed=0), ks=(1,),
                          compute=Compute(device=device))
            out[name] = {"precision@1": ev.metrics.precision[1], "map@r": ev.metrics.map_at_r,
                         "seconds": time.perf_counter() - t}
            print(f"{run.name:24s} {name:16s} p@1 {out[name]['precision@1']:.4f}  MAP@R {out[name]['map@r']:.4f}",
                  flush=True)
    return out


def _seeded_part(positions: torch.Tensor, n: int | None, seed: int = 0) -> torch.Tensor:
    if not n or n >= len(positions):
        return positions
    g = torch.Generator().manual_seed(seed)
    return positions[torch.randperm(len(positions), generator=g)[:n].sort().values]


def selection_split(run: Path, subset: int | None, root, references: int | None = None):
    """(checkpoint, mnist:train, training positions, validation positions) of a run: the validation slice its
    trainer held out (same size and seed), cut to a seeded `subset`, and the rest (its training slice), cut to a
    seeded `references`."""
    from retrieval.checkpoint import load_checkpoint
    from retrieval.data.specs import load_dataset
    from retrieval.data.splits import run_split

    ckpt = load_checkpoint(run)
    ds = load_dataset("mnist:train", root=root)
    train_pos, val_pos = run_split(ckpt.meta, ds.labels)
    return ckpt, ds, _seeded_part(train_pos, references), _seeded_part(val_pos, subset)


def selection_figures(run: Path, names: list[str], subset: int | None, root, device: str,
                      references: int | None = None) -> dict:
    from retrieval.embed import embed_images
    from retrieval.metrics import retrieval_metrics

    ckpt, ds, train_pos, val_pos = selection_split(run, subset, root, references)
    precision = resolve_precision(None, device)  # as `retrieval index build` and `evaluate` embed by default
    refs = embed_images(ckpt.tower, ds.images[train_pos], device=device, precision=precision)
    ref_labels = ds.labels[train_pos].numpy()
    clean = ds.images[val_pos].numpy()
    labels = ds.labels[val_pos].numpy()
    out = {}
    for name in ["clean", *names]:
        images = clean if name == "clean" else corrupt(clean, name, seed=1)
        emb = embed_images(ckpt.tower, torch.from_numpy(images), device=device, precision=precision)
        m = retrieval_metrics(emb, labels, refs, ref_labels, ks=(1,))
        out[name] = {"precision@1": m.precision[1], "map@r": m.map_at_r}
        print(f"{run.name:24s} {name:16s} p@1 {m.precision[1]:.4f}  MAP@R {m.map_at_r:.4f}", flush=True)
    return out


NON_DIGITS = ("letters", "symbols", "scribbles", "shapes", "blank", "noisy")
# Marks of those sets that the usual OCR confusions pair with a digit (B/8, b/6, G/6, Q/0, z/2; brackets, braces
# and ! read as 1; an ellipse is a 0): a tower that answers digits has to answer these too, so their rejection is
# also reported without them. The list was made after seeing which marks a run answers (benchmarks/history.md).
DIGIT_LOOK_ALIKES = {"B": "8", "b": "6", "G": "6", "Q": "0", "z": "2", "[": "1", "]": "1", "!": "1", "{": "1",
                     "}": "1", "ellipse": "0"}


def non_digit_pictures(kind: str, n: int, seed: int = 0) -> list[tuple[np.ndarray, str]]:
    """Pictures (uint8 grey, 112x112, dark marks on light paper) of things that are not digits, never used in
    training, each with what it shows (a character, a shape's name or the kind): letters and symbols rendered
    from the system's fonts, random pen scribbles, geometric shapes, blank pages (paper tone and a little noise)
    and noisy pages (strong noise, specks)."""
    from PIL import Image, ImageDraw, ImageFont

    rng = np.random.default_rng([seed, len(kind)])
    # DejaVu and Liberation only: other fonts on the machine (handwriting fonts) may be training sources of the gate
    fonts = sorted(f for d in ("dejavu", "liberation") for f in Path("/usr/share/fonts/truetype", d).glob("*.ttf"))
    letters = "ABCDEFGHJKMNPQRTUVWXYabcdefhkmnprtuvwxyz"  # not the ones that are digits in disguise (O, l, I, S...)
    symbols = "@#%&*+=?!$<>{}[]~^"
    out = []
    for i in range(n):
        mark = kind
        paper = int(rng.integers(170, 256))
        img = Image.new("L", (112, 112), paper)
        d = ImageDraw.Draw(img)
        ink = int(rng.integers(0, max(1, paper - 90)))
        if kind in ("letters", "symbols"):
            chars = letters if kind == "letters" else symbols
            font = ImageFont.truetype(str(fonts[int(rng.integers(len(fonts)))]), int(rng.integers(60, 90)))
            mark = chars[int(rng.integers(len(chars)))]
            d.text((56, 56), mark, fill=ink, font=font, anchor="mm")
        elif kind == "scribbles":
            pts = np.cumsum(rng.normal(0, 14, (int(rng.integers(4, 12)), 2)), axis=0) + 56
            d.line([tuple(p) for p in np.clip(pts, 8, 104)], fill=ink, width=int(rng.integers(3, 9)), joint="curve")
        elif kind == "shapes":
            x0, y0 = rng.integers(10, 45, 2)
            x1, y1 = rng.integers(65, 102, 2)
            which = int(rng.integers(3))
            w = int(rng.integers(3, 9))
            mark = ("ellipse", "rectangle", "triangle")[which]
            if which == 0:
                d.ellipse((x0, y0, x1, y1), outline=ink, width=w)
            elif which == 1:
                d.rectangle((x0, y0, x1, y1), outline=ink, width=w)
            else:
                d.polygon([(x0, y1), ((x0 + x1) // 2, y0), (x1, y1)], outline=ink, width=w)
        a = np.asarray(img, dtype=np.float32)
        if kind == "blank":
            a = a + rng.normal(0, 3, a.shape)
        elif kind == "noisy":
            a = a + rng.normal(0, 40, a.shape)
            specks = rng.random(a.shape) < 0.03
            a[specks] = 0
        out.append((np.clip(a, 0, 255).astype(np.uint8), mark))
    return out


def unknown_figures(run: Path, names: list[str], subset: int | None, root, device: str,
                    accepts: list[float], references: int | None = None, index_dir: Path | None = None,
                    non_digits: int = 300) -> dict[float, dict]:
    """For each acceptance rate: calibrate it on clean mnist:test (the documented default rule, no negatives) on
    a Flat index of mnist:train; then the fraction of non-digits rejected and of each corrupted set still answered.
    Every set is embedded once; only the threshold differs between rates."""
    from retrieval.data.fetch import dataset_files_present
    from retrieval.data.idx import write_idx
    from retrieval.data.specs import default_data_root
    from retrieval.knn import nearest_neighbors
    from retrieval.workflows import build_index, calibrate, index_search, load_index_queries

    dists: dict[str, np.ndarray] = {}
    looks: dict[str, tuple[np.ndarray, list[str]]] = {}
    with tempfile.TemporaryDirectory(prefix="robustness-unknown-") as tmp:
        folder = _index_folder(index_dir, run, tmp)
        build_index(run, Selection(["mnist:train"], root=root, subset=references, seed=0), folder,
                    compute=Compute(device=device))
        thresholds = {a: calibrate(folder, Selection("mnist:test", root=root, subset=subset, seed=0), store=False,
                      accept=a, compute=Compute(device=device))[0].max_distance for a in accepts}

        def nearest(spec):
            iq = load_index_queries(folder, Selection(spec, root=root, subset=subset, seed=1),
                                    compute=Compute(device=device))
            dist, _ = nearest_neighbors(iq.embeddings, index_search(iq.index), 1, iq.self_ids)
            return dist[:, 0]

        dists["clean mnist:test answered"] = nearest("mnist:test")  # seed 1: other images than the calibration's
        for name in names:
            dists[f"{name} answered"] = nearest(f"{KIND}:test/{name}")
        data_root = Path(root) if root else default_data_root()
        if dataset_files_present("fashion-mnist", data_root):
            dists["fashion-mnist:test rejected"] = nearest("fashion-mnist:test")
        for kind in NON_DIGITS:
            images, ok, marks = _preprocessed_non_digits(kind, non_digits, seed=0)
            d = np.full(len(ok), np.inf)  # a picture with no ink fails the query: never answered
            if len(images):
                folder_k = Path(tmp) / kind
                folder_k.mkdir()
                write_idx(folder_k / "images-idx3-ubyte", images)
                write_idx(folder_k / "labels-idx1-ubyte", np.zeros(len(images), np.uint8))
                d[ok] = nearest(f"idx:{folder_k}")
            looks[kind] = (d, marks)
    res = {}
    for a, t in thresholds.items():
        out = {"threshold": t}
        for key, d in dists.items():
            out[key] = float((d > t).mean() if key.endswith("rejected") else (d <= t).mean())
        for kind, (d, marks) in looks.items():
            out.update(_rejected_rows(kind, d > t, marks))
        for k, v in out.items():
            print(f"{run.name:24s} accept {a:<6g} {k:36s} {v:.4f}", flush=True)
        res[a] = out
    return res


def _preprocessed_non_digits(kind: str, n: int, seed: int) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """non_digit_pictures through the query preprocessing: (28x28 uint8 images of those it accepts, which of the
    n pictures those are (the others have no ink: the query fails, nothing answered), what each picture shows)."""
    from PIL import Image

    from retrieval.data.preprocess import preprocess_image
    from retrieval.errors import RetrievalError

    pics, ok, marks = [], np.zeros(n, bool), []
    for i, (p, mark) in enumerate(non_digit_pictures(kind, n, seed)):
        marks.append(mark)
        try:
            pics.append(preprocess_image(Image.fromarray(p, mode="L")).numpy())
            ok[i] = True
        except RetrievalError:
            pass
    return (np.stack(pics) if pics else np.zeros((0, 28, 28), np.uint8)), ok, marks


def _rejected_rows(kind: str, rejected: np.ndarray, marks: list[str]) -> dict:
    """The rejected fraction of one kind of non-digit picture, and the same without DIGIT_LOOK_ALIKES."""
    out = {f"{kind} rejected": float(rejected.mean())}
    plain = np.array([m not in DIGIT_LOOK_ALIKES for m in marks])
    if not plain.all():
        out[f"{kind} rejected, no look-alikes"] = float(rejected[plain].mean())
    return out


def unknown_selection_figures(run: Path, names: list[str], subset: int | None, root, device: str,
                              accept: float, references: int | None = None, non_digits: int = 300) -> dict:
    """unknown_figures on the selection split, to choose recipes without the test split: the threshold answers
    `accept` of the run's clean validation slice against its training slice (pairs.acceptance_threshold, as
    `calibrate` does); then answered fractions of the validation slice corrupted with seed 1, and rejected
    fractions of Fashion-MNIST *train* (never trained on) and of non-digit pictures drawn with seed 1 (the test
    measure uses seed 0)."""
    from retrieval.data.fetch import dataset_files_present
    from retrieval.data.specs import default_data_root, load_dataset
    from retrieval.embed import embed_images
    from retrieval.knn import ExactSearch
    from retrieval.pairs import acceptance_threshold

    ckpt, ds, train_pos, val_pos = selection_split(run, subset, root, references)
    precision = resolve_precision(None, device)  # as `retrieval index build` and `query` embed by default
    search = ExactSearch(embed_images(ckpt.tower, ds.images[train_pos], device=device, precision=precision))
    clean = ds.images[val_pos].numpy()

    def nearest(images: np.ndarray) -> np.ndarray:
        if len(images) == 0:
            return np.zeros(0)
        dist, _ = search(embed_images(ckpt.tower, torch.from_numpy(images), device=device, precision=precision), 1)
        return dist[:, 0]

    d_clean = nearest(clean)
    t = acceptance_threshold(d_clean, np.ones(len(d_clean), bool), accept).max_distance
    out = {"threshold": t}
    for name in names:
        out[f"{name} answered"] = float((nearest(corrupt(clean, name, seed=1)) <= t).mean())
    data_root = Path(root) if root else default_data_root()
    if dataset_files_present("fashion-mnist", data_root):
        fashion = load_dataset("fashion-mnist:train", root=root, subset=subset or None, seed=0)
        out["fashion-mnist:train rejected"] = float((nearest(fashion.images.numpy()) > t).mean())
    for kind in NON_DIGITS:
        images, ok, marks = _preprocessed_non_digits(kind, non_digits, seed=1)
        rejected = ~ok
        rejected[ok] = nearest(images) > t
        out.update(_rejected_rows(kind, rejected, marks))
    for k, v in out.items():
        print(f"{run.name:24s} {k:36s} {v:.4f}", flush=True)
    return out


# -- pictures as users send them (issue 25) ----------------------------------------------------------------------
LARGE_FAMILIES = {"photo-3000"}  # slow to render and decode: measured on --large-subset of the queries


def picture_seed(position: int, selection: bool) -> int:
    """The seed of the picture made from the image at `position` of its split (selection and test draw apart)."""
    return (10_000_000 if selection else 0) + int(position)


def picture_queries(family: str, images: np.ndarray, labels: list[str], positions: np.ndarray, selection: bool,
                    folder: Path) -> tuple[np.ndarray, np.ndarray, float]:
    """Each digit rendered as `family`'s picture file (retrieval.data.pictures), written to `folder` and read back
    through retrieval.data.preprocess.load_image_file (what `retrieval query FILE` and folder specs do): (28x28
    uint8 images of those read, which of the pictures those are (a refused picture is an answer missed), seconds
    per picture)."""
    from retrieval.data.pictures import render
    from retrieval.data.preprocess import load_image_file
    from retrieval.errors import RetrievalError

    folder.mkdir(parents=True, exist_ok=True)
    out, ok = [], np.zeros(len(images), bool)
    start = time.perf_counter()
    for i, (digit, label, pos) in enumerate(zip(images, labels, positions)):
        pic = render(digit, family, picture_seed(pos, selection), label=label)
        path = folder / f"{i}{pic.suffix}"
        path.write_bytes(pic.data)
        try:
            out.append(load_image_file(path).numpy())
            ok[i] = True
        except RetrievalError:
            pass
        path.unlink()
    seconds = (time.perf_counter() - start) / max(len(images), 1)
    return (np.stack(out) if out else np.zeros((0, 28, 28), np.uint8)), ok, seconds


def _missed_as_wrong(metrics, ok: np.ndarray) -> dict:
    """precision@1 and MAP@R over every query, a refused picture counting 0."""
    share = float(ok.mean()) if len(ok) else 0.0
    return {"precision@1": metrics.precision[1] * share if metrics else 0.0,
            "map@r": metrics.map_at_r * share if metrics else 0.0}


def picture_figures(runs: list[Path], families: list[str], subset: int | None, root, device: str, selection: bool,
                    references: int | None = None, large_subset: int = 50) -> dict[str, dict]:
    """Per run and picture family: precision@1 / MAP@R of the pictures (through the picture path) and of the
    family's 28x28 array counterpart (retrieval.data.corrupt; the clean digit where none), against the run's
    references. Selection: the run's validation slice against its training slice (pictures and arrays seeded
    apart from test); test: a seeded `subset` of mnist:test against mnist:train. Pictures are rendered and read
    once per query set, whatever the number of runs."""
    from retrieval.checkpoint import load_checkpoint
    from retrieval.data.pictures import ARRAY_COUNTERPART
    from retrieval.data.specs import load_dataset
    from retrieval.embed import embed_images
    from retrieval.metrics import retrieval_metrics

    made: dict[tuple, tuple] = {}
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="robustness-pictures-") as tmp:
        for run in runs:
            if selection:
                ckpt, ds, ref_pos, query_pos = selection_split(run, subset, root, references)
                queries = ds
            else:
                ckpt = load_checkpoint(run)
                ds = load_dataset("mnist:train", root=root)
                ref_pos = _seeded_part(torch.arange(len(ds)), references)
                queries = load_dataset("mnist:test", root=root)
                query_pos = _seeded_part(torch.arange(len(queries)), subset)
            precision = resolve_precision(None, device)

            def embed(images):
                return embed_images(ckpt.tower, torch.as_tensor(images), device=device, precision=precision)

            refs, ref_labels = embed(ds.images[ref_pos]), ds.labels[ref_pos].numpy()
            clean = queries.images[query_pos].numpy()
            labels = queries.labels[query_pos].numpy()
            names = [queries.classes[i] for i in labels]
            positions = query_pos.numpy()
            out = {}
            for family in families:
                take = slice(None) if family not in LARGE_FAMILIES else slice(0, large_subset)
                key = (family, tuple(positions[take].tolist()))
                if key not in made:
                    made[key] = picture_queries(family, clean[take], names[take], positions[take], selection,
                                                Path(tmp) / family)
                images, ok, seconds = made[key]
                m = retrieval_metrics(embed(images), labels[take][ok], refs, ref_labels, ks=(1,)) if ok.any() else None
                counterpart = ARRAY_COUNTERPART[family]
                arrays = clean[take] if counterpart is None else corrupt(clean[take], counterpart,
                                                                         seed=1 if selection else 0)
                a = retrieval_metrics(embed(arrays), labels[take], refs, ref_labels, ks=(1,))
                out[family] = {"pictures": _missed_as_wrong(m, ok), "refused": int((~ok).sum()),
                               "n": int(len(ok)), "seconds_per_picture": seconds,
                               "arrays": {"precision@1": a.precision[1], "map@r": a.map_at_r},
                               "array_counterpart": counterpart or "clean"}
                f = out[family]
                print(f"{run.name:24s} {family:22s} pictures p@1 {f['pictures']['precision@1']:.4f} "
                      f"(refused {f['refused']}/{f['n']})  arrays ({f['array_counterpart']}) p@1 "
                      f"{f['arrays']['precision@1']:.4f}", flush=True)
            results[run.name] = out
    return results


def picture_table(results: dict[str, dict], families: list[str]) -> list[str]:
    from retrieval.data.pictures import FAMILIES, HELD_OUT

    runs = list(results)
    head = ("| pictures | n | array counterpart | " +
            " | ".join(f"{r} pictures p@1 / MAP@R (refused) | {r} arrays p@1 / MAP@R" for r in runs) + " |")
    lines = [head, "|" + "---|" * (3 + 2 * len(runs))]

    def cell(f):
        return f"{f['precision@1']:.4f} / {f['map@r']:.4f}"

    for fam in families:
        first = results[runs[0]][fam]
        name = fam + (" (held out)" if fam in HELD_OUT else "")
        lines.append(f"| {name} | {first['n']} | {first['array_counterpart']} | " + " | ".join(
            f"{cell(results[r][fam]['pictures'])} ({results[r][fam]['refused']}) | {cell(results[r][fam]['arrays'])}"
            for r in runs) + " |")
    groups = {}
    for group in dict.fromkeys(FAMILIES[f] for f in families):
        groups[f"mean, {group} (chosen on)"] = [f for f in families if FAMILIES[f] == group and f not in HELD_OUT]
    groups["mean, every family chosen on"] = [f for f in families if f not in HELD_OUT]
    groups["mean, held out"] = [f for f in families if f in HELD_OUT]
    for label, members in groups.items():
        if not members:
            continue
        parts = []
        for r in runs:
            mean = {c: {k: statistics.fmean(results[r][f][c][k] for f in members) for k in ("precision@1", "map@r")}
                    for c in ("pictures", "arrays")}
            parts.append(f"{cell(mean['pictures'])} | {cell(mean['arrays'])}")
        lines.append(f"| **{label}** | | | " + " | ".join(parts) + " |")
    return lines


def step_times(configs: list[str], steps: int, block: int, root, device: str) -> dict:
    """Median training step time (make_batch: index, scale, augment; then train_step) of shipped configs built
    side by side in one process, blocks of `block` steps alternating so machine load hits them alike."""
    from retrieval.config import load_config
    from retrieval.seeding import make_generator
    from retrieval.training import build_trainer
    from retrieval.workflows import shipped_config

    dev = torch.device(device)
    trainers = {}
    for name in configs:
        with tempfile.TemporaryDirectory() as tmp:
            trainers[name] = build_trainer(load_config(shipped_config(name)), Path(tmp), dev, data_root=root,
                                           progress=False)
    plans = {n: t.sampler.epoch_batches(0).to(dev) for n, t in trainers.items()}
    times: dict[str, list[float]] = {n: [] for n in trainers}
    s = 0
    while min(len(v) for v in times.values()) < steps:
        for n, t in trainers.items():
            for _ in range(block):
                g = make_generator(0, "bench", s)
                t0 = time.perf_counter()
                x, y = t.make_batch(plans[n][s % len(plans[n])], g)
                t.train_step(x, y, g)
                times[n].append(time.perf_counter() - t0)
                s += 1
    out = {n: {"step_ms": statistics.median(v[1:]) * 1e3, "steps": len(v)} for n, v in times.items()}
    base = out[configs[0]]["step_ms"]
    for n in out:
        out[n]["ratio"] = out[n]["step_ms"] / base
        print(f"{n:24s} median step {out[n]['step_ms']:.1f} ms  ({out[n]['ratio']:.3f}x {configs[0]})", flush=True)
    return out


def summary_rows(results: dict[str, dict], names: list[str]) -> list[tuple[str, dict]]:
    """Mean p@1 / MAP@R over groups: MNIST-C, low resolution, stroke width, trained / held-out families."""
    groups = {
        "mean, MNIST-C (15)": [n for n in names if CORRUPTIONS[n].mnist_c],
        "mean, low resolution": [n for n in names if CORRUPTIONS[n].family == "low resolution"],
        "mean, stroke width": [n for n in names if CORRUPTIONS[n].family == "stroke width"],
        "mean, photo + canvas": [n for n in names if CORRUPTIONS[n].family in ("photo", "canvas")],
        "mean, families in mnist-robust's training": [n for n in names if trained(n)],
        "mean, held out from mnist-robust's training": [n for n in names if not trained(n)],
    }
    rows = []
    for label, members in groups.items():
        if not members:
            continue
        row = {}
        for run, figs in results.items():
            row[run] = {k: statistics.fmean(figs[n][k] for n in members) for k in ("precision@1", "map@r")}
        rows.append((label, row))
    return rows


def table(results: dict[str, dict], names: list[str]) -> list[str]:
    runs = list(results)
    head = "| queries | family | " + " | ".join(f"{r} p@1 / MAP@R" for r in runs) + " |"
    lines = [head, "|" + "---|" * (2 + len(runs))]

    def cell(f):
        return f"{f['precision@1']:.4f} / {f['map@r']:.4f}"

    for name in ["clean", *names]:
        fam = "-" if name == "clean" else CORRUPTIONS[name].family + ("" if trained(name) else " (held out)")
        lines.append(f"| {name} | {fam} | " + " | ".join(cell(results[r][name]) for r in runs) + " |")
    for label, row in summary_rows(results, names):
        lines.append(f"| **{label}** | | " + " | ".join(cell(row[r]) for r in runs) + " |")
    return lines


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", nargs="*", type=Path, help="run folders (default: a run for every shipped config)")
    p.add_argument("--corruptions", default=",".join(CORRUPTIONS), help="comma-separated names")
    p.add_argument("--subset", type=int, default=2000, help="query images per set, seeded (0: all)")
    p.add_argument("--selection", action="store_true", help="corrupted validation slice of mnist:train instead")
    p.add_argument("--root", default=None, help="data root (default: $RETRIEVAL_DATA_ROOT or the cache)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--write", action="store_true", help="append the table to benchmarks/history.md")
    p.add_argument("--json", type=Path, help="also write the figures here")
    p.add_argument("--note", default="", help="a paragraph added under the table")
    p.add_argument("--references", type=int, default=0, help="a seeded subset of this many references (0: all)")
    p.add_argument("--index-dir", type=Path, help="build the test mode's indexes in DIR/RUN and keep them")
    p.add_argument("--non-digits", type=int, default=300, help="with --unknown: pictures of each non-digit kind")
    p.add_argument("--pictures", action="store_true", help="the picture families of retrieval.data.pictures, "
                   "through the picture path, beside their 28x28 array counterparts")
    p.add_argument("--families", default="", help="with --pictures: comma-separated families (default: all)")
    p.add_argument("--large-subset", type=int, default=50, help="with --pictures: queries of the slow "
                   f"families ({', '.join(sorted(LARGE_FAMILIES))})")
    p.add_argument("--unknown", action="store_true",
                   help="unknown inputs: calibrate --accept of clean test, then rejection of non-digits")
    p.add_argument("--accept", default="0.99", help="with --unknown: the acceptance rate(s) to calibrate, "
                   "comma-separated (e.g. 0.95,0.99,0.995: one column each; every set is embedded once)")
    p.add_argument("--steptime", default="", help="configs to time training steps of, side by side "
                   "(e.g. mnist-default,mnist-robust)")
    a = p.parse_args(argv)
    if a.steptime:
        res = step_times([c.strip() for c in a.steptime.split(",")], 40, 10, a.root, a.device)
        if a.json:
            a.json.write_text(json.dumps(res, indent=2) + "\n")
        return 0
    names = [n.strip() for n in a.corruptions.split(",") if n.strip()]
    refs = a.references or None
    if a.write and refs:
        p.error("--write records figures against every reference: leave out --references")
    if a.pictures:
        from retrieval.data.pictures import FAMILIES

        families = [f.strip() for f in a.families.split(",") if f.strip()] or list(FAMILIES)
        unknown = [f for f in families if f not in FAMILIES]
        if unknown:
            p.error(f"--families: unknown {', '.join(unknown)}; expected some of {', '.join(FAMILIES)}")
        start = time.perf_counter()
        runs = a.runs or default_runs()
        res = picture_figures(runs, families, a.subset or None, a.root, a.device, a.selection, refs, a.large_subset)
        lines = picture_table(res, families)
        print("\n".join(lines))
        if a.json:
            a.json.write_text(json.dumps(res, indent=2) + "\n")
        if a.write:
            split = ("SELECTION split: the runs' validation slices of mnist:train against their training slices, "
                     "pictures and arrays seeded apart from test" if a.selection else
                     "TEST split: mnist:test (seeded subset) against all 60,000 mnist:train images")
            append_section([
                f"## Pictures through the picture path ({dt.date.today().isoformat()}, {a.device})", "",
                f"Machine: {machine()}. `benchmarks/robustness.py {' '.join(argv if argv is not None else sys.argv[1:])}`"
                f" ({time.perf_counter() - start:.0f} s). {split}. Each query digit rendered as a picture file of the "
                "family (retrieval/data/pictures.py), written and read back with load_image_file (as `retrieval "
                "query` and folder specs read files); a refused picture counts as a miss. Beside it, the family's "
                "28x28 array counterpart (retrieval/data/corrupt.py). Held-out families are kept out of every choice.",
                "", *lines, "", *([a.note, ""] if a.note else []),
            ])
        return 0
    if a.unknown:
        start = time.perf_counter()
        runs = a.runs or default_runs()
        accepts = [float(v) for v in a.accept.split(",") if v.strip()]
        if a.selection and len(accepts) > 1:
            p.error("--selection takes one --accept rate")
        if a.selection:
            res = {r.name: unknown_selection_figures(r, names, a.subset or None, a.root, a.device, accepts[0],
                                                     refs, a.non_digits)
                   for r in runs}
        else:
            res = {(r.name if len(accepts) == 1 else f"{r.name}, accept {acc:g}"): figures
                   for r in runs
                   for acc, figures in unknown_figures(r, names, a.subset or None, a.root, a.device, accepts, refs,
                                                       a.index_dir, a.non_digits).items()}
        rows = list(next(iter(res.values())))
        lines = ["| measure | " + " | ".join(res) + " |", "|" + "---|" * (1 + len(res))]
        lines += [f"| {k} | " + " | ".join(f"{res[r][k]:.4f}" for r in res) + " |" for k in rows]
        print("\n".join(lines))
        if a.json:
            a.json.write_text(json.dumps(res, indent=2) + "\n")
        if a.write:
            append_section([
                f"## Unknown inputs: rejection with the default calibration ({dt.date.today().isoformat()})", "",
                f"Machine: {machine()}. `benchmarks/robustness.py {' '.join(argv if argv is not None else sys.argv[1:])}`"
                f" ({time.perf_counter() - start:.0f} s). Flat index of all mnist:train; threshold from `calibrate` "
                f"with no negatives (answer {a.accept} of clean mnist:test, {a.subset or 'all'} images, seed 0); "
                "answered fractions on other test images (seed 1) and the corrupted sets; rejected fractions on "
                "non-digits never used in training (Fashion-MNIST test; 300 each of letters and symbols from the "
                "system fonts, pen scribbles, shapes, blank and noisy pages, through the query preprocessing; a "
                "picture with no ink fails preprocessing and counts as rejected).", "",
                *lines, "", *([a.note, ""] if a.note else []),
            ])
        return 0
    runs = a.runs or default_runs()
    subset = a.subset or None
    start = time.perf_counter()
    results = {}
    for run in runs:
        if a.selection:
            results[run.name] = selection_figures(run, names, subset, a.root, a.device, refs)
        else:
            results[run.name] = test_figures(run, names, subset, a.root, a.device, refs, a.index_dir)
    lines = table(results, names)
    print("\n".join(lines))
    if a.json:
        a.json.write_text(json.dumps(results, indent=2) + "\n")
    if a.write:
        split = ("SELECTION split: mnist:train validation slice corrupted with seed 1, references the run's "
                 "training slice" if a.selection else "TEST split: mnist-c:test/NAME specs (seed 0) against a Flat "
                 "index of all 60,000 mnist:train images")
        append_section([
            f"## Robustness to corrupted queries ({dt.date.today().isoformat()}, {a.device})", "",
            f"Machine: {machine()}. `benchmarks/robustness.py {' '.join(argv if argv is not None else sys.argv[1:])}`"
            f" ({time.perf_counter() - start:.0f} s). {split}; {subset or 'all'} queries per set (seeded subset). "
            "Columns: precision@1 / MAP@R per run. Families marked \"held out\" are not imitated by mnist-robust's "
            "training augmentation (configs/mnist-robust.toml).", "",
            *lines, "", *( [a.note, ""] if a.note else []),
        ])
    return 0


if __name__ == "__main__":
    sys.exit(main())
