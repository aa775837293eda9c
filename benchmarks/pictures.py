"""The picture path (retrieval.data.preprocess: decode -> grey -> background -> ink crop -> 28x28), before and
after issue 25, side by side in one run.

Speed (default): per payload, the milliseconds to decode and preprocess one picture file's bytes, one thread,
median over the payload's distinct pictures and repeats, the baseline (benchmarks/_preprocess_before.py, the
path at commit 1a91827: full decode, exif_transpose, preprocess at full resolution) and the current path
(retrieval.data.preprocess: decode_image, preprocess_image) interleaved picture by picture. Payloads (`payloads()`,
importable: benchmarks/serve.py sends the same files): a 28x28 PNG, the page's 280x280 RGBA canvas export (opaque
white, #111 round pen 18 px; retrieval.data.pictures canvas-mouse), the same strokes on a transparent canvas,
a 1024x768 JPEG phone photo (photo-1024) and a 3000x4000 one (photo-3000).

Quality (--quality): precision@1 of the pictures of retrieval.data.pictures families through each path, on the
selection split of each run (references: the run's training slice of mnist:train; queries: its validation slice,
each image rendered with seed 10,000,000 + its position, as benchmarks/robustness.py --pictures --selection
renders them); a refused picture counts as a miss. Families HELD_OUT there are reported apart.

    .venv/bin/python benchmarks/pictures.py --pictures 100 --repeats 5
    .venv/bin/python benchmarks/pictures.py --quality --runs runs/mnist-default runs/mnist-robust --subset 1000
    git archive <commit> | tar -x -C /tmp/base-src     # the speed against another tree's picture path:
    .venv/bin/python benchmarks/pictures.py --baseline-src /tmp/base-src --repeats 8
    .venv/bin/python benchmarks/pictures.py --baseline-src /tmp/base-src --folder 4000 --payloads canvas,photo
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.util
import io
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks._report import append_section, machine  # noqa: E402

PAYLOADS = ("mnist", "canvas", "canvas-transparent", "photo", "photo-3000")


def baseline_module(src: Path | None = None):
    """benchmarks/_preprocess_before.py as a module (the picture path before issue 25), or, with `src`, the picture
    path of that source tree (its retrieval/data/preprocess.py)."""
    path = src / "retrieval" / "data" / "preprocess.py" if src else Path(__file__).with_name("_preprocess_before.py")
    spec = importlib.util.spec_from_file_location("preprocess_before", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# -- payloads ---------------------------------------------------------------------------------------------------------
def _digits(n: int, seed: int, root=None):
    from retrieval.data.specs import load_dataset

    ds = load_dataset("mnist:test", root=root, subset=n, seed=seed)
    return ds.images.numpy(), ds.labels.numpy()


def _transparent(data: bytes) -> bytes:
    """The page's opaque export with its white turned transparent: black strokes, alpha = ink."""
    from PIL import Image

    grey = Image.open(io.BytesIO(data)).convert("L")
    rgba = Image.new("RGBA", grey.size, (0, 0, 0, 0))
    rgba.putalpha(grey.point(lambda v: 255 - v))
    buf = io.BytesIO()
    rgba.save(buf, format="PNG")
    return buf.getvalue()


def payloads(n: int = 50, names=PAYLOADS, root=None) -> dict[str, list[tuple[str, bytes, str]]]:
    """{payload: [(filename, bytes, content type)] * n}: the same files on every run (seeded mnist:test subsets,
    seeded renderers)."""
    from PIL import Image

    from retrieval.data.pictures import render

    out = {}
    for name in names:
        digits, labels = _digits(n, {"mnist": 0, "canvas": 1, "canvas-transparent": 1, "photo": 2,
                                     "photo-3000": 3}[name], root)
        files = []
        for i, digit in enumerate(digits):
            if name == "mnist":
                buf = io.BytesIO()
                Image.fromarray(digit).save(buf, format="PNG")
                files.append((f"test-{i}.png", buf.getvalue(), "image/png"))
            elif name.startswith("canvas"):
                data = render(digit, "canvas-mouse", seed=i).data
                files.append((f"canvas-{i}.png", _transparent(data) if name == "canvas-transparent" else data,
                              "image/png"))
            else:
                family = "photo-1024" if name == "photo" else "photo-3000"
                files.append((f"{name}-{i}.jpg", render(digit, family, seed=i).data, "image/jpeg"))
        out[name] = files
    return out


# -- speed ------------------------------------------------------------------------------------------------------------
def decode_before(before, data: bytes, name: str):
    """The baseline's decode + preprocess of one file's bytes (what load_image_file and the service did)."""
    from PIL import Image, ImageOps

    img = Image.open(io.BytesIO(data))
    if hasattr(before, "decode_image"):  # a tree of issue 25 or later (--baseline-src)
        return before.preprocess_image(before.decode_image(img, name), source=name)
    before.check_pixel_budget(*img.size, name)
    img = ImageOps.exif_transpose(img)
    img.load()
    return before.preprocess_image(img, source=name)


def decode_now(data: bytes, name: str):
    from PIL import Image

    from retrieval.data.preprocess import decode_image, preprocess_image

    return preprocess_image(decode_image(Image.open(io.BytesIO(data)), name), source=name)


def speed(files, repeats: int, baseline_src: Path | None = None) -> dict:
    """Median ms per picture of both paths, interleaved picture by picture (the same machine state for both)."""
    before = baseline_module(baseline_src)
    for name, data, _ in files[:3]:
        decode_before(before, data, name)
        decode_now(data, name)
    times = {"before": [], "now": []}
    for r in range(repeats):
        for name, data, _ in files:
            order = (("before", lambda: decode_before(before, data, name)), ("now", lambda: decode_now(data, name)))
            for key, fn in (order if r % 2 == 0 else order[::-1]):
                t0 = time.perf_counter()
                fn()
                times[key].append(time.perf_counter() - t0)
    return {k: statistics.median(v) * 1000 for k, v in times.items()}


def folder_speed(files, count: int, rounds: int, baseline_src: Path) -> dict:
    """Pictures/s of load_image_files over `count` files (the payload's pictures in turn, in a temporary folder):
    this tree's on its default decoders and on one, and the baseline tree's on its default decoders; the three
    in turn, `rounds` times (medians)."""
    import tempfile

    from retrieval.data.preprocess import decode_workers, load_image_files

    before = baseline_module(baseline_src)
    with tempfile.TemporaryDirectory(prefix="pictures-folder-") as tmp:
        paths = []
        for i in range(count):
            data = files[i % len(files)][1]
            suffix = ".jpg" if data[:2] == b"\xff\xd8" else ".png"
            paths.append(Path(tmp) / f"{i:06d}{suffix}")
            paths[-1].write_bytes(data)
        ways = {"now": lambda: load_image_files(paths), "now, 1 decoder": lambda: load_image_files(paths, workers=1),
                "before": lambda: before.load_image_files(paths)}
        rates = {k: [] for k in ways}
        for r in range(rounds):
            for key, fn in (list(ways.items()) if r % 2 == 0 else list(ways.items())[::-1]):
                t0 = time.perf_counter()
                fn()
                rates[key].append(count / (time.perf_counter() - t0))
    return {**{k: statistics.median(v) for k, v in rates.items()}, "decoders": decode_workers()}


# -- quality ----------------------------------------------------------------------------------------------------------
def quality(run: Path, families: list[str], subset: int, root, device: str) -> dict:
    """{family: {"before": (precision@1, refused), "now": (...)}} on the run's selection split."""
    import torch

    from retrieval.checkpoint import load_checkpoint
    from retrieval.data.pictures import NEEDS_LABEL, render
    from retrieval.data.specs import load_dataset
    from retrieval.embed import embed_images
    from retrieval.errors import RetrievalError
    from retrieval.knn import ExactSearch
    from retrieval.data.splits import run_split

    before = baseline_module()
    ckpt = load_checkpoint(run)
    ds = load_dataset("mnist:train", root=root)
    train_pos, val_pos = run_split(ckpt.meta, ds.labels)
    if subset and subset < len(val_pos):
        g = torch.Generator().manual_seed(0)
        val_pos = val_pos[torch.randperm(len(val_pos), generator=g)[:subset].sort().values]
    nearest_reference = ExactSearch(embed_images(ckpt.tower, ds.images[train_pos], device=device))
    ref_labels = ds.labels[train_pos].numpy()
    digits, labels = ds.images[val_pos].numpy(), ds.labels[val_pos].numpy()
    out = {}
    for family in families:
        files = [render(d, family, seed=10_000_000 + int(p), label=int(y) if family in NEEDS_LABEL else None).data
                 for d, p, y in zip(digits, val_pos.tolist(), labels)]
        row = {}
        for key, fn in (("before", lambda b: decode_before(before, b, family)), ("now", lambda b: decode_now(b, family))):
            images = np.zeros((len(files), 28, 28), np.uint8)
            refused_rows = np.zeros(len(files), bool)  # a refused picture is a miss
            for i, b in enumerate(files):
                try:
                    images[i] = fn(b).numpy()
                except RetrievalError:
                    refused_rows[i] = True
            refused = int(refused_rows.sum())
            _, ids = nearest_reference(embed_images(ckpt.tower, torch.from_numpy(images), device=device), 1)
            nearest = ref_labels[ids[:, 0]]
            hits = float(((nearest == labels) & ~refused_rows).sum())
            row[key] = (hits / len(files), refused)
        out[family] = row
        print(f"{run.name:20s} {family:22s} before p@1 {row['before'][0]:.3f} (refused {row['before'][1]})  "
              f"now {row['now'][0]:.3f} (refused {row['now'][1]})", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--payloads", default=",".join(PAYLOADS), help=f"speed: some of {', '.join(PAYLOADS)}")
    ap.add_argument("--pictures", type=int, default=50, help="speed: distinct pictures per payload")
    ap.add_argument("--repeats", type=int, default=5, help="speed: passes over each payload's pictures")
    ap.add_argument("--quality", action="store_true", help="precision@1 of picture families instead of speed")
    ap.add_argument("--runs", nargs="*", type=Path, default=[], help="quality: run folders")
    ap.add_argument("--families", default="", help="quality: comma-separated families (default: all but mnistc-*)")
    ap.add_argument("--subset", type=int, default=1000, help="quality: validation images per family (0: all 5,000)")
    ap.add_argument("--root", default=None, help="data root (default: the usual)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--baseline-src", type=Path, help="speed: compare with the picture path of this source tree "
                    "(e.g. `git archive <commit> | tar -x -C DIR`) instead of the path before issue 25")
    ap.add_argument("--folder", type=int, default=0, metavar="N",
                    help="speed: instead, pictures/s of load_image_files over N files of each payload (a folder, as "
                    "`index build --data folder:DIR` reads it), against --baseline-src's")
    ap.add_argument("--rounds", type=int, default=3, help="--folder: rounds (medians reported)")
    ap.add_argument("--write", action="store_true", help="append the table to benchmarks/history.md")
    args = ap.parse_args()

    import torch

    torch.set_num_threads(1)
    today = dt.date.today().isoformat()
    if args.quality:
        from retrieval.data.pictures import FAMILIES, HELD_OUT

        if not args.runs:
            ap.error("--quality needs --runs")
        families = [f for f in args.families.split(",") if f] or [f for f in FAMILIES if not f.startswith("mnistc-")]
        results = {run: quality(run, families, args.subset, args.root, args.device) for run in args.runs}
        lines = [f"## Picture path quality, before and after issue 25 ({today}, selection split)", "",
                 f"Machine: {machine()}. `benchmarks/pictures.py --quality --subset {args.subset}`: precision@1 of "
                 "each retrieval.data.pictures family (validation slice of mnist:train, selection seeds, against "
                 "the run's training slice); refused pictures count as misses (refused in brackets). Before: the "
                 "path at commit 1a91827 (benchmarks/_preprocess_before.py); now: retrieval.data.preprocess. "
                 "Held-out families (kept out of every choice) last.", "",
                 "| family | " + " | ".join(f"{r.name} before | {r.name} now" for r in args.runs) + " |",
                 "|---|" + "---:|---:|" * len(args.runs)]
        for family in sorted(families, key=lambda f: (f in HELD_OUT, families.index(f))):
            cells = []
            for run in args.runs:
                for key in ("before", "now"):
                    p, refused = results[run][family][key]
                    cells.append(f"{p:.3f}" + (f" ({refused})" if refused else ""))
            lines.append(f"| {family}{' (held out)' if family in HELD_OUT else ''} | " + " | ".join(cells) + " |")
    else:
        names = [p for p in args.payloads.split(",") if p]
        unknown = set(names) - set(PAYLOADS)
        if unknown:
            ap.error(f"--payloads: unknown {sorted(unknown)}; expected some of {', '.join(PAYLOADS)}")
        files = payloads(args.pictures, names, args.root)
        if args.folder:
            if not args.baseline_src:
                ap.error("--folder needs --baseline-src (a tree whose preprocess.py has load_image_files)")
            lines = [f"## Picture folders decoded, this tree vs another ({today}, CPU)", "",
                     f"Machine: {machine()}. `benchmarks/pictures.py --folder {args.folder} --rounds {args.rounds} "
                     f"--pictures {args.pictures}`: load_image_files over {args.folder:,} files of each payload (its "
                     f"{args.pictures} distinct pictures in turn), pictures/s, medians of {args.rounds} rounds, the "
                     f"three ways in turn. Before: the source tree {args.baseline_src}.", "",
                     "| payload | now, default decoders | now, 1 decoder | before, default decoders | now / before |",
                     "|---|---:|---:|---:|---:|"]
            for name in names:
                r = folder_speed(files[name], args.folder, args.rounds, args.baseline_src)
                lines.append(f"| {name} | {r['now']:,.0f} ({r['decoders']}) | {r['now, 1 decoder']:,.0f} | "
                             f"{r['before']:,.0f} | {r['now'] / r['before']:.2f}x |")
                print(lines[-1], flush=True)
            print("\n".join(lines))
            if args.write:
                append_section(lines)
            return
        against = "this tree vs another" if args.baseline_src else "before and after issue 25"
        lines = [f"## Picture path speed, {against} ({today}, CPU, one thread)", "",
                 f"Machine: {machine()}. `benchmarks/pictures.py --pictures {args.pictures} --repeats {args.repeats}`: "
                 "decode + preprocess of one picture file's bytes, median ms over the payload's distinct pictures x "
                 "repeats, both paths interleaved picture by picture in one process. Before: "
                 + (f"the picture path of the source tree {args.baseline_src}" if args.baseline_src else
                    "full decode, exif_transpose, preprocessing at full resolution (commit 1a91827)")
                 + "; now: decode_image + preprocess_image.", "",
                 "| payload | bytes (median) | before ms | now ms | speed-up |", "|---|---:|---:|---:|---:|"]
        for name in names:
            t = speed(files[name], args.repeats, args.baseline_src)
            size = int(statistics.median(len(d) for _, d, _ in files[name]))
            lines.append(f"| {name} | {size:,} | {t['before']:.3f} | {t['now']:.3f} | {t['before'] / t['now']:.1f}x |")
            print(lines[-1], flush=True)
    print("\n".join(lines))
    if args.write:
        append_section(lines)


if __name__ == "__main__":
    main()
