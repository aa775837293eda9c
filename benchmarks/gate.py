"""The digit-or-not gate (retrieval/gate.py, issue 26): choosing its form on the selection split, then one table on
the test split with today's distance threshold side by side.

Selection (--selection): for each candidate (form, degrade_p, steps, width), a gate is trained for the run's tower
(positives: its training slice of mnist:train; negatives: retrieval.data.nondigits' TRAIN sources), its threshold
answers --accept of 2,000 clean digits of the run's validation slice, and it is measured on that slice corrupted
with seed 1 (every corruption of retrieval.data.corrupt: answered) and on the SELECTION sources (held-out handwriting
fonts, held-out KanjiVG characters and LaTeX symbols, Animal-MNIST) and Fashion-MNIST train (refused). Nothing of
the test split is read. --train-sources trains on other sources than TRAIN (e.g. TRAIN and handtex-train).

Test (--test RUN): RUN is a gated run (`retrieval gate train`). A Flat index of mnist:train; `calibrate` on clean
mnist:test (2,000, seed 0) sets the gate threshold (answer --accept) and, for the side-by-side column, today's
distance threshold (answer --accept, no negatives); then answered fractions of other clean test images (seed 1)
and of every mnist-c:test set, refused fractions of Fashion-MNIST test, letters and symbols of DejaVu / Liberation
(look-alikes apart), scribbles, shapes, blank and noisy pages (benchmarks/robustness.py's pictures, seed 0).

Cost (--cost RUN --base-run BASE): RUN is a gated run made from BASE (the same tower, no gate). Two index folders
of the same --cost-index images, one from each, calibrated as a user would (the gated one's gate threshold, the other's
distance threshold, both answering --accept of clean mnist:test). First the service's own work per picture
(Service.process) for both and an A/A copy, in this process, in turn; then a `retrieval serve` process on each and
one client sending the same pictures to both in turn (POST /classify, one picture per request, alternating which
server goes first); p50 and p90 of each and their ratios.

    .venv/bin/python benchmarks/gate.py --selection --runs runs/mnist-robust --forms cnn,trunk,embedding
    .venv/bin/python benchmarks/gate.py --test runs/mnist-robust-gate
    .venv/bin/python benchmarks/gate.py --cost runs/mnist-robust-gate --base-run runs/mnist-robust
"""

from __future__ import annotations

import argparse
import json
import os
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
from retrieval.workflows import Compute, Selection


def _nearest_distances(ckpt, run: Path, val: np.ndarray, sets: dict, root, device: str) -> tuple[np.ndarray, dict]:
    """Each picture's distance to its nearest digit of the run's training slice (the references an index of the
    run's own training data holds), for the validation digits and every set: what the distance threshold reads."""
    from benchmarks.robustness import selection_split
    from retrieval.compute import Compute
    from retrieval.knn import ExactSearch, nearest_neighbors

    _, ds, train_pos, _ = selection_split(run, None, root)
    compute = Compute(device).pinned()  # as `retrieval index build` and `query` embed by default
    search = ExactSearch(compute.embed(ckpt.tower, ds.images[train_pos]))

    def nearest(images: np.ndarray) -> np.ndarray:
        return nearest_neighbors(compute.embed(ckpt.tower, torch.from_numpy(images)), search, 1)[0][:, 0]

    return nearest(val), {name: nearest(images) for name, images in sets.items()}


def _with_distance(res: dict, scores: dict, threshold: float, val_dist: np.ndarray, dists: dict,
                   distance_accept: float) -> None:
    """The gate and a distance threshold answering `distance_accept` of the validation digits, together: a picture
    is answered when the gate answers it and it lies within the threshold (calibrate --distance-accept)."""
    from retrieval.pairs import acceptance_threshold as distance_threshold

    limit = distance_threshold(val_dist, np.ones(len(val_dist), bool), distance_accept).max_distance
    key = f"+distance {distance_accept:g}"
    for name, s in scores.items():
        answered = (s >= threshold) & (dists[name] <= limit)
        res[f"{name} {key}"] = float((~answered).mean() if name.endswith("refused") else answered.mean())
    answered = [v for k, v in res.items() if k.endswith(f"answered {key}") and not k.startswith("lowres-8")]
    refused = [v for k, v in res.items() if k.endswith(f"refused {key}")]
    res[f"min answered (no lowres-8) {key}"] = min(answered)
    res[f"mean refused {key}"] = float(np.mean(refused))
    res[f"min refused {key}"] = min(refused)


def selection(run: Path, recipes, root, device: str, accept: float, n_pos: int, n_neg: int,
              gated: Path | None = None, distance_accepts: tuple[float, ...] = (),
              train_sources: tuple[str, ...] | None = None) -> dict:
    """Selection figures of a gate trained here for each recipe, or (`gated`: a run of `retrieval gate train` from
    `run`) of that run's own gate, measured without training; with `distance_accepts`, also the gate and a distance
    threshold answering each of those shares of the validation digits, together."""
    from retrieval.checkpoint import load_checkpoint
    from retrieval.data.fetch import dataset_files_present
    from retrieval.data.nondigits import SPLITS, load_source, load_split
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
            pos_labels = z["pos_labels"] if "pos_labels" in z else None
            sets = {f"{name} answered": z[f"c_{name}"] for name in CORRUPTIONS}
    if not cache.is_file() or pos_labels is None:  # (caches of before the labels were kept are made again)
        pos, pos_labels, val = digit_pictures(ckpt.meta, root=root, n=n_pos, seed=0, val_n=2000)
        sets = {f"{name} answered": corrupt(val, name, seed=1) for name in CORRUPTIONS}
        cache.parent.mkdir(parents=True, exist_ok=True)
        np.savez(cache, pos=pos, pos_labels=pos_labels, val=val,
                 **{f"c_{k.split(' ')[0]}": v for k, v in sets.items()})
    negatives = (np.concatenate([load_source(s, n_neg, seed=0, root=root).images
                                 for s in (train_sources or SPLITS["train"])])
                 if gated is None else np.zeros((0, 28, 28)))
    held_out = load_split("selection", 2000, seed=1, root=root)
    for s, nd in held_out.items():
        sets[f"{s} refused"] = nd.images
    if dataset_files_present("fashion-mnist", data_root):
        sets["fashion-mnist:train refused"] = load_dataset("fashion-mnist:train", root=root, subset=2000,
                                                           seed=0).images.numpy()
    print(f"positives {len(pos)}, negatives {len(negatives)} (train sources), validation {len(val)}", flush=True)
    if distance_accepts:  # the tower's embeddings do not depend on its gate: measured once
        val_dist, dists = _nearest_distances(ckpt, run, val, sets, root, device)
    out = {}
    for recipe in (recipes if gated is None else [None]):
        if recipe is None:
            from retrieval.gate import tower_gate

            trained = load_checkpoint(gated, device=device)
            key = f"{gated.name}: {trained.meta['gate']['recipe']}"
            gate, seconds = tower_gate(trained.tower), trained.meta["gate"]["seconds"]
        else:
            key = (f"{recipe.form} w{recipe.width} p{recipe.degrade_p:g} {recipe.steps} steps"
                   + (f" {recipe.classes} classes" if recipe.classes else ""))
            t = time.perf_counter()
            gate = train_gate(ckpt.tower, pos, negatives, recipe, device=device, positive_labels=pos_labels)
            seconds = time.perf_counter() - t
        attach_gate(ckpt.tower, gate)
        threshold = acceptance_threshold(digit_scores(ckpt.tower, val, device=device), accept)
        res = {"train seconds": seconds, "threshold": threshold}
        scores = {name: digit_scores(ckpt.tower, images, device=device) for name, images in sets.items()}
        for name, s in scores.items():
            res[name] = float((s < threshold).mean() if name.endswith("refused") else (s >= threshold).mean())
        answered = [v for k, v in res.items() if k.endswith("answered") and not k.startswith("lowres-8")]
        refused = [v for k, v in res.items() if k.endswith("refused")]
        res["min answered (no lowres-8)"] = min(answered)
        res["mean refused"] = float(np.mean(refused))
        res["min refused"] = min(refused)
        for distance_accept in distance_accepts:
            _with_distance(res, scores, threshold, val_dist, dists, distance_accept)
        attach_gate(ckpt.tower, None)
        out[key] = res
        print(key, json.dumps({k: round(v, 4) for k, v in res.items()}), flush=True)
    return out


def test_table(run: Path, root, device: str, accept: float, references: int | None = None, subset: int = 2000,
               non_digits: int = 300, index_dir: Path | None = None, distance_accept: float | None = None) -> dict:
    """Refused / answered fractions for the gated run's gate and today's distance threshold, side by side: an index
    of `references` mnist:train images (all: None), `subset` images of each query set, `non_digits` pictures of
    each kind of benchmarks/robustness.py's. `index_dir`: where the index is built (kept, and used as it is when
    it already holds one), else a temporary folder."""
    from retrieval.data.fetch import dataset_files_present
    from retrieval.data.nondigits import LOOK_ALIKES
    from retrieval.data.specs import default_data_root
    from retrieval.gate import digit_scores
    from retrieval.knn import nearest_neighbors
    from retrieval.workflows import build_index, calibrate, index_search, load_index_queries

    from benchmarks.robustness import DIGIT_LOOK_ALIKES, NON_DIGITS, _preprocessed_non_digits

    look_alike = set(LOOK_ALIKES) | set(DIGIT_LOOK_ALIKES)
    data_root = Path(root) if root else default_data_root()
    rows: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="gate-test-") as tmp:
        folder = index_dir or Path(tmp) / "index"
        if not (folder / "meta.json").is_file():
            build_index(run, Selection(["mnist:train"], root=root, subset=references, seed=0), folder,
                        compute=Compute(device=device))
        cal, record = calibrate(folder, Selection("mnist:test", root=root, subset=2000, seed=0), store=True,
                                accept=accept, compute=Compute(device=device))
        distance_t = calibrate(folder, Selection("mnist:test", root=root, subset=2000, seed=0), store=False,
                               accept=accept, gate=False, compute=Compute(device=device))[0].max_distance
        gate_t = record["gate"]["threshold"]
        both_t = np.inf  # the distance threshold beside the gate (--distance-accept), as calibrate stores it
        if distance_accept is not None:
            both_t = calibrate(folder, Selection("mnist:test", root=root, subset=2000, seed=0), store=False,
                               accept=accept, distance_accept=distance_accept,
                               compute=Compute(device=device))[1]["max_distance"]
        print(f"thresholds: gate {gate_t:.4f}, distance {distance_t:.4f}, beside the gate {both_t:.4f}", flush=True)
        from retrieval.query import Searcher

        searcher = Searcher.open(folder, device=device)

        def measure(spec: str | None = None, images: np.ndarray | None = None, ok: np.ndarray | None = None):
            if images is None:
                iq = load_index_queries(folder, Selection(spec, root=root, subset=subset, seed=1),
                                        compute=Compute(device=device))
                images = iq.dataset.images.numpy()
                emb = iq.embeddings
                dist = nearest_neighbors(emb, index_search(iq.index), 1, iq.self_ids)[0][:, 0]
                return digit_scores(searcher.tower, images, emb, device=device), dist
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
            b = g | (dist > both_t)
            if refused:
                rows[name] = {"gate": g.mean(), "distance": d.mean(), "both": b.mean(), "n": len(score)}
            else:
                rows[name] = {"gate": (~g).mean(), "distance": (~d).mean(), "both": (~b).mean(), "n": len(score)}
            rows[name] = {k: float(v) for k, v in rows[name].items()}
            print(f"{name:40s} gate {rows[name]['gate']:.4f}  distance {rows[name]['distance']:.4f}  "
                  f"both {rows[name]['both']:.4f}", flush=True)

        row("clean mnist:test answered", *measure("mnist:test"), refused=False)
        for name in CORRUPTIONS:
            row(f"{name} answered", *measure(f"{KIND}:test/{name}"), refused=False)
        if dataset_files_present("fashion-mnist", data_root):
            row("fashion-mnist:test refused", *measure("fashion-mnist:test"), refused=True)
        for kind in NON_DIGITS:
            images, ok, marks = _preprocessed_non_digits(kind, non_digits, seed=0)
            score, dist = measure(images=images, ok=ok)
            plain = np.array([m not in look_alike for m in marks])
            row(f"{kind} refused" + (", look-alikes excluded" if not plain.all() else ""), score[plain],
                dist[plain], refused=True)
            if not plain.all():
                row(f"{kind}: look-alikes refused ({''.join(sorted({m for m in marks if m in look_alike}))})"
                    if kind != "shapes" else "shapes: ellipses refused", score[~plain], dist[~plain], refused=True)
    return {"gate_threshold": gate_t, "distance_threshold": distance_t, "rows": rows}


def _multipart(name: str, data: bytes) -> tuple[bytes, str]:
    boundary = "gate-cost-boundary"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"images\"; filename=\"{name}\"\r\n"
            f"Content-Type: image/png\r\n\r\n").encode() + data + f"\r\n--{boundary}--\r\n".encode()
    return body, f"multipart/form-data; boundary={boundary}"


def _pictures(n: int, root) -> list[tuple[str, bytes]]:
    """PNG files as users send them: half MNIST test digits at 28x28, half the page's 280x280 canvas drawing of
    them (retrieval.data.corrupt's canvas path, upscaled)."""
    import io

    from PIL import Image

    from retrieval.data.specs import load_dataset

    digits = load_dataset("mnist:test", root=root, subset=n, seed=3).images.numpy()
    drawn = corrupt(digits, "canvas", seed=3)
    out = []
    for i, (a, b) in enumerate(zip(digits, drawn)):
        for name, img in ((f"mnist-{i}.png", Image.fromarray(255 - a)),
                          (f"canvas-{i}.png", Image.fromarray(255 - b).resize((280, 280), Image.BILINEAR))):
            buf = io.BytesIO()
            img.save(buf, format="PNG")
            out.append((name, buf.getvalue()))
    return out[:n]


def _compute_times(folders: dict[str, Path], requests: int, root) -> dict:
    """The service's own work for one picture (Service.process: tower, gate, search, answer), in this process, the
    services asked in turn (rotating which goes first): no HTTP, decoding or scheduling of separate processes, whose
    noise on a shared machine is larger than the gate (an A/A pair of server processes differed by 12%). The copy
    of the index without the gate is the A/A control."""
    from retrieval.data.specs import load_dataset
    from retrieval.serve.app import QueryJob, Service

    services = {name: Service.open(folder) for name, folder in folders.items()}
    images = load_dataset("mnist:test", root=root, subset=64, seed=3).images
    names = list(services)
    times: dict[str, list[float]] = {name: [] for name in names}
    for i in range(requests + 30):  # the first 30 rounds warm up
        for name in names[i % len(names):] + names[:i % len(names)]:
            job = QueryJob(images[i % len(images)].unsqueeze(0), ["q"], 5, None)
            t = time.perf_counter()
            services[name].process([job])
            if i >= 30:
                times[name].append((time.perf_counter() - t) * 1000)
    out = {name: {"p50_ms": float(np.median(ms)), "p90_ms": float(np.percentile(ms, 90))} for name, ms in times.items()}
    base = out["without gate"]["p50_ms"]
    out["p50 ratio (with / without)"] = out["with gate"]["p50_ms"] / base
    out["p50 ratio A/A (copy / without)"] = out["without gate (copy)"]["p50_ms"] / base
    return out


def cost(run: Path, base_run: Path, root, accept: float, index_images: int, requests: int, threads: int) -> dict:
    """p50 / p90 of POST /classify (one picture) at one client, the gated index beside the same index without it."""
    import http.client

    from retrieval.workflows import build_index, calibrate

    out: dict = {"index_images": index_images, "requests_per_server": requests}
    with tempfile.TemporaryDirectory(prefix="gate-cost-") as tmp:
        folders = {}
        for name, checkpoint in (("with gate", run), ("without gate", base_run)):
            folders[name] = Path(tmp) / name.replace(" ", "-")
            build_index(checkpoint, Selection(["mnist:train"], root=root, subset=index_images, seed=0), folders[name],
                        compute=Compute(device="cpu"))
            calibrate(folders[name], Selection("mnist:test", root=root, subset=2000, seed=0), accept=accept,
                      compute=Compute(device="cpu"))
        import shutil

        control = shutil.copytree(folders["without gate"], Path(tmp) / "without-gate-copy")
        out["service compute"] = _compute_times({**folders, "without gate (copy)": control}, requests, root)
        from benchmarks.serve import Server

        env = dict(os.environ, OMP_NUM_THREADS=str(threads))  # one torch thread, as --threads asks
        servers = {name: Server(folder, env=env) for name, folder in folders.items()}
        try:
            conns = {name: http.client.HTTPConnection(s.host, s.port, timeout=120) for name, s in servers.items()}
            pictures = _pictures(64, root)
            times: dict[str, list[float]] = {name: [] for name in servers}
            order = list(servers)
            for i in range(requests + 20):  # the first 20 of each warm up and are not counted
                body, ctype = _multipart(*pictures[i % len(pictures)])
                for name in (order if i % 2 else order[::-1]):
                    t = time.perf_counter()
                    conns[name].request("POST", "/classify", body=body, headers={"Content-Type": ctype})
                    response = conns[name].getresponse()
                    answer = response.read()
                    elapsed = time.perf_counter() - t
                    if response.status != 200:
                        raise RuntimeError(f"{name}: /classify answered {response.status}: {answer[:300]!r}")
                    if i >= 20:
                        times[name].append(elapsed * 1000)
        finally:
            for s in servers.values():
                s.stop()
    for name, ms in times.items():
        out[name] = {"p50_ms": float(np.median(ms)), "p90_ms": float(np.percentile(ms, 90))}
    out["p50 ratio (with / without)"] = out["with gate"]["p50_ms"] / out["without gate"]["p50_ms"]
    print(json.dumps(out, indent=2), flush=True)
    return out


def main(argv=None) -> int:
    from retrieval.gate import GateRecipe

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--selection", action="store_true")
    p.add_argument("--runs", nargs="*", type=Path, default=[])
    p.add_argument("--gated", type=Path, help="with --selection and one --runs RUN: measure this gated run's own "
                   "gate (retrieval gate train --checkpoint RUN), no training")
    p.add_argument("--forms", default="cnn")
    p.add_argument("--degrade-p", default="0.3")
    p.add_argument("--steps", default="1500")
    p.add_argument("--widths", default="16")
    p.add_argument("--classes", default="0", help="--selection: 0 (one digit-or-not output) and/or 10 (an output "
                   "per digit class and one for no digit)")
    p.add_argument("--n-pos", type=int, default=20000)
    p.add_argument("--n-neg", type=int, default=6000, help="pictures per training source")
    p.add_argument("--train-sources", default="", help="--selection: the gate's training sources, comma-separated "
                   "(default: retrieval.data.nondigits.SPLITS['train'])")
    p.add_argument("--test", type=Path, help="a gated run: the test table")
    p.add_argument("--cost", type=Path, help="a gated run: its service's query time beside --base-run's")
    p.add_argument("--base-run", type=Path, help="the run the --cost run's gate was trained for (no gate)")
    p.add_argument("--cost-index", type=int, default=10000, help="images of mnist:train in the --cost indexes")
    p.add_argument("--requests", type=int, default=300, help="timed requests per server (--cost)")
    p.add_argument("--accept", type=float, default=0.99)
    p.add_argument("--distance-accepts", default="", help="--selection: also the gate with a distance threshold "
                   "answering each of these shares of the validation digits (comma-separated), together")
    p.add_argument("--distance-accept", type=float, help="--test: also the gate with a distance threshold "
                   "answering this share of clean mnist:test, together (calibrate --distance-accept)")
    p.add_argument("--references", type=int, help="mnist:train images in the --test index (default: all)")
    p.add_argument("--subset", type=int, default=2000, help="images of each query set (--test)")
    p.add_argument("--non-digits", type=int, default=300, help="pictures of each non-digit kind (--test)")
    p.add_argument("--index-dir", type=Path, help="build the --test index here and keep it (reused when present)")
    p.add_argument("--root", default=None)
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", type=Path)
    p.add_argument("--threads", type=int, default=1, help="torch threads (one: a shared machine's cores)")
    p.add_argument("--batch-size", type=int, default=256)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    res = {}
    if a.selection:
        recipes = [replace(GateRecipe(), form=f, degrade_p=float(d), steps=int(s), width=int(w), classes=int(c),
                           batch_size=a.batch_size)
                   for f in a.forms.split(",") for d in a.degrade_p.split(",") for s in a.steps.split(",")
                   for w in a.widths.split(",") for c in a.classes.split(",")]
        for run in a.runs:
            res[run.name] = selection(run, recipes, a.root, a.device, a.accept, a.n_pos, a.n_neg, a.gated,
                                      tuple(float(x) for x in a.distance_accepts.split(",") if x),
                                      tuple(s for s in a.train_sources.split(",") if s) or None)
    if a.test:
        res["test"] = test_table(a.test, a.root, a.device, a.accept, a.references, a.subset, a.non_digits,
                                 a.index_dir, a.distance_accept)
        rows = res["test"]["rows"]
        both = a.distance_accept is not None
        print("| set | gate | distance threshold (today) |" + (f" gate + distance {a.distance_accept:g} |" if both else "")
              + "\n|---|---|---|" + ("---|" if both else ""))
        for k, v in rows.items():
            print(f"| {k} | {v['gate']:.4f} | {v['distance']:.4f} |" + (f" {v['both']:.4f} |" if both else ""))
    if a.cost:
        if a.base_run is None:
            p.error("--cost needs --base-run (the same run without the gate)")
        res["cost"] = cost(a.cost, a.base_run, a.root, a.accept, a.cost_index, a.requests, a.threads)
    if a.json:
        a.json.write_text(json.dumps(res, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
