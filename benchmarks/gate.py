"""The digit-or-not gate (retrieval/gate.py, issue 26): choosing its form on the selection split, then one table on
the test split with today's distance threshold side by side.

Selection (--selection): for each candidate (form, degrade_p, steps, width), a gate is trained for the run's tower
(positives: its training slice of mnist:train; negatives: retrieval.data.nondigits' TRAIN sources), its threshold
answers --accept of 2,000 clean digits of the run's validation slice, and it is measured on that slice corrupted
with seed 1 (every corruption of retrieval.data.corrupt: answered) and on the SELECTION sources (held-out handwriting
fonts, held-out KanjiVG characters, Animal-MNIST) and Fashion-MNIST train (refused). Nothing of the test split is
read.

Test (--test RUN): RUN is a gated run (`retrieval gate train`). A Flat index of mnist:train; `calibrate` on clean
mnist:test (2,000, seed 0) sets the gate threshold (answer --accept) and, for the side-by-side column, today's
distance threshold (answer --accept, no negatives); then answered fractions of other clean test images (seed 1)
and of every mnist-c:test set, refused fractions of Fashion-MNIST test, letters and symbols of DejaVu / Liberation
(look-alikes apart), scribbles, shapes, blank and noisy pages (benchmarks/robustness.py's pictures, seed 0).

    .venv/bin/python benchmarks/gate.py --selection --runs /work/runs/mnist-robust --forms cnn,trunk,embedding
    .venv/bin/python benchmarks/gate.py --test /work/runs/mnist-robust-gate
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from retrieval.data.corrupt import CORRUPTIONS, KIND, corrupt  # noqa: E402


def _concat(sets) -> np.ndarray:
    return np.concatenate([s.images for s in sets.values()])


def selection(run: Path, recipes, root, device: str, accept: float, n_pos: int, n_neg: int) -> dict:
    from retrieval.checkpoint import load_checkpoint
    from retrieval.data.fetch import dataset_files_present
    from retrieval.data.nondigits import load_split
    from retrieval.data.specs import default_data_root, load_dataset
    from retrieval.gate import acceptance_threshold, digit_pictures, digit_scores, attach_gate, train_gate

    ckpt = load_checkpoint(run, device=device)
    data_root = Path(root) if root else default_data_root()
    # the digits and their corrupted copies take minutes to make: cached per split and size (the tower's weights
    # play no part in them)
    cache = data_root / "gate-selection" / f"v{ckpt.meta.get('data', {}).get('val_seed', 0)}-pos{n_pos}.npz"
    if cache.is_file():
        with np.load(cache, allow_pickle=False) as z:
            pos, val = z["pos"], z["val"]
            sets = {f"{name} answered": z[f"c_{name}"] for name in CORRUPTIONS}
    else:
        pos, val = digit_pictures(ckpt.meta, root=root, n=n_pos, seed=0, val_n=2000)
        sets = {f"{name} answered": corrupt(val, name, seed=1) for name in CORRUPTIONS}
        cache.parent.mkdir(parents=True, exist_ok=True)
        np.savez(cache, pos=pos, val=val, **{f"c_{k.split(' ')[0]}": v for k, v in sets.items()})
    negatives = _concat(load_split("train", n_neg, seed=0, root=root))
    held_out = load_split("selection", 2000, seed=1, root=root)
    for s, nd in held_out.items():
        sets[f"{s} refused"] = nd.images
    if dataset_files_present("fashion-mnist", data_root):
        sets["fashion-mnist:train refused"] = load_dataset("fashion-mnist:train", root=root, subset=2000,
                                                           seed=0).images.numpy()
    print(f"positives {len(pos)}, negatives {len(negatives)} (train sources), validation {len(val)}", flush=True)
    out = {}
    for recipe in recipes:
        key = f"{recipe.form} w{recipe.width} p{recipe.degrade_p:g} {recipe.steps} steps"
        t = time.perf_counter()
        gate = train_gate(ckpt.tower, pos, negatives, recipe, device=device)
        seconds = time.perf_counter() - t
        attach_gate(ckpt.tower, gate)
        threshold = acceptance_threshold(digit_scores(ckpt.tower, val, device=device), accept)
        res = {"train seconds": seconds, "threshold": threshold}
        for name, images in sets.items():
            s = digit_scores(ckpt.tower, images, device=device)
            res[name] = float((s < threshold).mean() if name.endswith("refused") else (s >= threshold).mean())
        answered = [v for k, v in res.items() if k.endswith("answered") and not k.startswith("lowres-8")]
        refused = [v for k, v in res.items() if k.endswith("refused")]
        res["min answered (no lowres-8)"] = min(answered)
        res["mean refused"] = float(np.mean(refused))
        res["min refused"] = min(refused)
        attach_gate(ckpt.tower, None)
        out[key] = res
        print(key, json.dumps({k: round(v, 4) for k, v in res.items()}), flush=True)
    return out


def test_table(run: Path, root, device: str, accept: float) -> dict:
    """Refused / answered fractions for the gated run's gate and today's distance threshold, side by side."""
    from retrieval.data.fetch import dataset_files_present
    from retrieval.data.nondigits import LOOK_ALIKES
    from retrieval.data.specs import default_data_root, load_dataset
    from retrieval.gate import digit_scores
    from retrieval.knn import nearest_neighbors
    from retrieval.workflows import build_index, calibrate, index_search, load_index_queries

    from benchmarks.robustness import DIGIT_LOOK_ALIKES, NON_DIGITS, _preprocessed_non_digits

    look_alike = set(LOOK_ALIKES) | set(DIGIT_LOOK_ALIKES)
    data_root = Path(root) if root else default_data_root()
    rows: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="gate-test-") as tmp:
        folder = Path(tmp) / "index"
        build_index(run, ["mnist:train"], folder, root=root, device=device)
        cal, record = calibrate(folder, "mnist:test", store=True, root=root, subset=2000, seed=0, device=device,
                                accept=accept)
        distance_t = calibrate(folder, "mnist:test", store=False, root=root, subset=2000, seed=0, device=device,
                               accept=accept, gate=False)[0].max_distance
        gate_t = record["gate"]["threshold"]
        print(f"thresholds: gate {gate_t:.4f}, distance {distance_t:.4f}", flush=True)

        def measure(spec: str | None = None, images: np.ndarray | None = None, ok: np.ndarray | None = None):
            if images is None:
                iq = load_index_queries(folder, spec, root=root, subset=2000, seed=1, device=device)
                images = iq.dataset.images.numpy()
                emb = iq.embeddings
                ok = np.ones(len(images), bool)
                tower, dist = iq.tower, nearest_neighbors(emb, index_search(iq.index), 1, iq.self_ids)[0][:, 0]
                return digit_scores(tower, images, emb, device=device), dist
            from retrieval.query import Searcher

            searcher = Searcher.open(folder, device=device)
            n = len(ok)
            score, dist = np.full(n, -np.inf), np.full(n, np.inf)  # no ink: the query fails, never answered
            if len(images):
                emb = searcher.embed(torch.from_numpy(images))
                d, _ = searcher.index.search(emb, 1)
                score[ok] = digit_scores(searcher.tower, images, emb, device=device)
                dist[ok] = d[:, 0]
            return score, dist

        def row(name, score, dist, refused: bool):
            g = score < gate_t
            d = dist > distance_t
            both = g | d
            if refused:
                rows[name] = {"gate": g.mean(), "distance": d.mean(), "n": len(score)}
            else:
                rows[name] = {"gate": (~g).mean(), "distance": (~d).mean(), "n": len(score)}
            rows[name] = {k: float(v) for k, v in rows[name].items()}
            print(f"{name:40s} gate {rows[name]['gate']:.4f}  distance {rows[name]['distance']:.4f}", flush=True)
            del both

        row("clean mnist:test answered", *measure("mnist:test"), refused=False)
        for name in CORRUPTIONS:
            row(f"{name} answered", *measure(f"{KIND}:test/{name}"), refused=False)
        if dataset_files_present("fashion-mnist", data_root):
            row("fashion-mnist:test refused", *measure("fashion-mnist:test"), refused=True)
        for kind in NON_DIGITS:
            images, ok, marks = _preprocessed_non_digits(kind, 300, seed=0)
            score, dist = measure(images=images, ok=ok)
            plain = np.array([m not in look_alike for m in marks])
            row(f"{kind} refused" + (", look-alikes excluded" if not plain.all() else ""), score[plain],
                dist[plain], refused=True)
            if not plain.all():
                row(f"{kind}: look-alikes refused ({''.join(sorted({m for m in marks if m in look_alike}))})"
                    if kind != "shapes" else "shapes: ellipses refused", score[~plain], dist[~plain], refused=True)
    return {"gate_threshold": gate_t, "distance_threshold": distance_t, "rows": rows}


def main(argv=None) -> int:
    from retrieval.gate import GateRecipe

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--selection", action="store_true")
    p.add_argument("--runs", nargs="*", type=Path, default=[])
    p.add_argument("--forms", default="cnn")
    p.add_argument("--degrade-p", default="0.3")
    p.add_argument("--steps", default="1500")
    p.add_argument("--widths", default="16")
    p.add_argument("--n-pos", type=int, default=20000)
    p.add_argument("--n-neg", type=int, default=6000, help="pictures per training source")
    p.add_argument("--test", type=Path, help="a gated run: the test table")
    p.add_argument("--accept", type=float, default=0.99)
    p.add_argument("--root", default=None)
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", type=Path)
    p.add_argument("--threads", type=int, default=1, help="torch threads (one: a shared machine's cores)")
    p.add_argument("--batch-size", type=int, default=256)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    res = {}
    if a.selection:
        recipes = [replace(GateRecipe(), form=f, degrade_p=float(d), steps=int(s), width=int(w),
                           batch_size=a.batch_size)
                   for f in a.forms.split(",") for d in a.degrade_p.split(",") for s in a.steps.split(",")
                   for w in a.widths.split(",")]
        for run in a.runs:
            res[run.name] = selection(run, recipes, a.root, a.device, a.accept, a.n_pos, a.n_neg)
    if a.test:
        res["test"] = test_table(a.test, a.root, a.device, a.accept)
        rows = res["test"]["rows"]
        print("| set | gate | distance threshold (today) |\n|---|---|---|")
        for k, v in rows.items():
            print(f"| {k} | {v['gate']:.4f} | {v['distance']:.4f} |")
    if a.json:
        a.json.write_text(json.dumps(res, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
