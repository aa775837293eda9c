"""One million real embeddings (issue 18): streaming builds from the CLI, compressed and on-disk Faiss indexes,
search speed and recall against exact search, and 1 vs 2 processes for the sharded build.

Data: MNIST train + test (70,000 images) and seeded augmented copies of them (a random affine: rotation, scale,
shear, shift; and an elastic warp, in one grid_sample per batch) up to --images (1,000,000), written once as an
uncompressed IDX pair (idx:DIR, 784 MB; kept in --work for later runs). Queries: two sets of 1,000 other
augmented copies of mnist:test images (other seeds; none is in the index): `select` chooses each index's search
parameters (`retrieval index tune`, recall@10 >= 0.95), `test` measures the chosen setting once.

Builds, each one CLI process (`retrieval index build`, its peak RSS from wait4; the embedding time is the build's
own embed phase, timed inside the same process, so the ratio is side by side by construction):
    IVF4096,PQ16x4fs,RFlat            the compressed index with a refine stage (its refine stage holds the exact
                                      vectors: the exact ground truth and the other indexes are made from them)
    IVF1024,Flat --on-disk            inverted lists memory-mapped from the index folder
From those vectors, in this process (index time only, the embedding excluded): Flat, HNSW32, IVF1024,Flat.
Sharded: IVF4096,PQ16x4fs,RFlat over --shard-images of the data, 1 process (2 threads) vs torchrun 2 processes
(1 thread each), and whether both answer the same.

    .venv/bin/python benchmarks/large_index.py --checkpoint runs/mnist-default
    .venv/bin/python benchmarks/large_index.py --images 200000 --shard-images 50000 --no-readme   # a quick look

--precisions fp32,bf16 measures only this: the build of IVF1024,Flat over the same images in each precision
(`retrieval index build --precision P`), the precisions alternating over --repeats rounds, each its own CLI process;
wall time and the build's own phases, medians, and each precision's ratio to the first.

    .venv/bin/python benchmarks/large_index.py --precisions fp32,bf16 --repeats 2
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import statistics
import struct
import subprocess
import sys
import time
from pathlib import Path

# On a shared machine, OpenMP threads that spin while waiting lose their cores to the other jobs: the default
# tower embedded 9,500 images/s on 1 thread but 2,200 on 2 (load 5-7 on 2 cores). Passive waiting keeps 2 threads
# at least as fast as 1. Set here, before torch and Faiss start, for this process and the builds it runs.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._report import append_section, machine  # noqa: E402

K = 10
TARGET_RECALL = 0.95
# The compressed index built from the CLI: 1,024 lists train and fill in about 2 s for a million vectors where
# 4,096 took 8-9 s (k-means and list assignment scale with the lists), and 32 x 4-bit codes keep recall@10 at
# 0.95 with a shorter refine than 16 (chosen on the `select` queries among IVF1024 with PQ16x4fs, PQ16x4fsr and
# PQ32x4fs, and IVF2048,PQ16x4fs; the 4,096-list indexes are still measured, in process)
COMPRESSED = "IVF1024,PQ32x4fs,RFlat"
PREVIOUS = "IVF4096,PQ16x4fs,RFlat"  # Faiss's parser makes PQ..x4fs without residuals (by_residual = False)
RESIDUAL = "IVF4096,PQ16x4fsr,RFlat"  # the same codes on the residuals to the list centroids
ON_DISK = "IVF1024,Flat"
# the grid `index tune` walks here (with its pruning: along the last parameter, a row stops at the first setting
# reaching the recall); narrower than its default to keep the run short, around where the settings fall
TUNE_GRID = {"IVF": {"nprobe": [4, 8, 12, 16, 20, 24, 32, 48, 64]},
             "refine": {"k_factor_rf": [64, 128, 256, 384, 512, 768, 1024]},
             "HNSW": {"efSearch": [16, 32, 64, 128, 256]}}


def load() -> str:
    return " / ".join(f"{x:.1f}" for x in os.getloadavg())


# -- data -----------------------------------------------------------------------------------------------------------
def augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """uint8 (n, 28, 28) -> an affine (rotation +-12 deg, scale 0.9-1.1, shear +-10 deg, shift +-2 px) and an
    elastic warp (1.5 px, a 4x4 field upsampled bicubically) of each image, sampled once (bilinear)."""
    n = len(x)
    f = torch.nn.functional
    u = torch.rand(n, 5, generator=g) * 2 - 1
    angle, shear = u[:, 0] * np.radians(12), u[:, 1] * np.radians(10)
    scale = 1.0 + 0.1 * u[:, 2]
    cos, sin = torch.cos(angle), torch.sin(angle)
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0], theta[:, 0, 1] = cos / scale, (-sin + torch.tan(shear) * cos) / scale
    theta[:, 1, 0], theta[:, 1, 1] = sin / scale, cos / scale
    theta[:, 0, 2], theta[:, 1, 2] = u[:, 3] * 4 / 28, u[:, 4] * 4 / 28
    grid = f.affine_grid(theta, (n, 1, 28, 28), align_corners=False)
    coarse = torch.rand(n, 2, 4, 4, generator=g) * 2 - 1
    field = f.interpolate(coarse, size=(28, 28), mode="bicubic", align_corners=True).clamp_(-1, 1)
    grid = grid + field.permute(0, 2, 3, 1) * (2 * 1.5 / 28)
    out = f.grid_sample(x.unsqueeze(1).float() / 255, grid, mode="bilinear", padding_mode="zeros",
                        align_corners=False)
    return (out.squeeze(1) * 255).round_().clamp_(0, 255).to(torch.uint8)


def write_idx_pair(folder: Path, n: int, chunks) -> None:
    """An uncompressed IDX image/label pair written a chunk at a time (renamed into place when complete)."""
    folder.mkdir(parents=True, exist_ok=True)
    images, labels = folder / "images-idx3-ubyte", folder / "labels-idx1-ubyte"
    tmp_i, tmp_l = images.with_suffix(".tmp"), labels.with_suffix(".tmp")
    with open(tmp_i, "wb") as fi, open(tmp_l, "wb") as fl:
        fi.write(bytes([0, 0, 8, 3]) + struct.pack(">3I", n, 28, 28))
        fl.write(bytes([0, 0, 8, 1]) + struct.pack(">I", n))
        written = 0
        for x, y in chunks:
            fi.write(x.numpy().tobytes())
            fl.write(y.numpy().astype(np.uint8).tobytes())
            written += len(x)
    assert written == n, (written, n)
    os.replace(tmp_i, images)
    os.replace(tmp_l, labels)


def make_data(work: Path, n: int, seed: int) -> dict[str, Path]:
    from retrieval.data.specs import load_dataset

    train, test = load_dataset("mnist:train"), load_dataset("mnist:test")
    base_x = torch.cat([train.images, test.images])
    base_y = torch.cat([train.labels, test.labels])
    folders = {"index": work / f"data-{n}-{seed}", "select": work / f"queries-select-{seed}",
               "test": work / f"queries-test-{seed}"}

    def index_chunks(chunk: int = 65_536):
        yield base_x[: min(n, len(base_x))], base_y[: min(n, len(base_x))]
        made, c = len(base_x), 0
        while made < n:
            take = min(chunk, n - made)
            pos = torch.arange(made, made + take) % len(base_x)
            g = torch.Generator().manual_seed(seed * 1_000_003 + c)
            yield augment(base_x[pos], g), base_y[pos]
            made += take
            c += 1

    def query_chunks(which: int):
        g = torch.Generator().manual_seed(10_000 + 7919 * seed + which)
        pos = torch.randperm(len(test.images), generator=g)[:1000]
        yield augment(test.images[pos], g), test.labels[pos]

    for name, chunks, count in (("index", index_chunks(), n), ("select", query_chunks(1), 1000),
                                ("test", query_chunks(2), 1000)):
        if not (folders[name] / "images-idx3-ubyte").is_file():
            start = time.perf_counter()
            write_idx_pair(folders[name], count, chunks)
            print(f"[data] {name}: {count:,} images in {time.perf_counter() - start:.0f}s -> {folders[name]}",
                  file=sys.stderr)
    return folders


# -- CLI runs -------------------------------------------------------------------------------------------------------
def run_build(args, out: Path, factory: str, data: Path, extra=(), processes: int = 1) -> dict:
    """`retrieval index build` as its own process: wall time, peak RSS, the build's phases (meta.build)."""
    shutil.rmtree(out, ignore_errors=True)
    build = ["index", "build", "--checkpoint", str(args.checkpoint), "--data", f"idx:{data}", "--factory", factory,
             "--out", str(out), "--json", "--device", "cpu", *map(str, extra)]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    if processes == 1:
        cmd = [sys.executable, str(Path(__file__).with_name("_rss.py")), sys.executable, "-m", "retrieval", *build]
    else:
        env["OMP_NUM_THREADS"] = "1"
        cmd = [sys.executable, str(Path(__file__).with_name("_rss.py")), sys.executable, "-m",
               "torch.distributed.run", "--standalone", "--nproc-per-node", str(processes), "-m", "retrieval", *build]
    print(f"[build] {factory} {' '.join(map(str, extra))} ({processes} process{'es' if processes > 1 else ''}), "
          f"load {load()}", file=sys.stderr)
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"build failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stderr[-3000:]}")
    lines = proc.stdout.strip().splitlines()
    rss = json.loads(lines[-1])  # _rss.py's last line
    result = json.loads("\n".join(lines[:-1]))
    meta = result["meta"]
    phases = meta["build"]["seconds"]
    print(f"[build]   {wall:.0f}s wall, phases {phases}, peak RSS {rss['max_rss'] / 2**30:.2f} GiB", file=sys.stderr)
    return {"factory": factory, "extra": list(map(str, extra)), "processes": processes, "wall": wall,
            "phases": phases, "max_rss": rss["max_rss"], "folder": str(out), "count": meta["count"],
            "train_size": meta.get("train_size"), "load": load()}


# -- search measurements ----------------------------------------------------------------------------------------------
def grid_for(index) -> dict:
    from retrieval.faiss_tools import index_ivf
    from retrieval.tune import default_grid

    grid = {}
    for name in default_grid(index):
        if name == "nprobe":
            nlist = index_ivf(index.index).nlist
            grid["nprobe"] = [p for p in TUNE_GRID["IVF"]["nprobe"] if p <= nlist]
        elif name == "efSearch":
            grid.update(TUNE_GRID["HNSW"])
        elif name == "k_factor_rf":
            grid.update(TUNE_GRID["refine"])
    return grid


def measure_index(name: str, index, select_q: np.ndarray, test_q: np.ndarray, exact_test: np.ndarray,
                  single: int, repeats: int) -> dict:
    """Tune on `select` (fastest setting with recall@10 >= 0.95), then measure it once on `test`."""
    from retrieval.tune import fastest_reaching, measure, measure_grid

    grid = grid_for(index)
    chosen = None
    tuned = []
    if grid:
        results, _ = measure_grid(index, select_q, K, grid, repeats=repeats, single=50, target=TARGET_RECALL)
        tuned = [r.to_json() for r in results]
        best = fastest_reaching(results, TARGET_RECALL)
        chosen = best.search_params if best else max(results, key=lambda r: r.recall).search_params
    setting = measure(index, test_q, K, chosen or "", exact_test, repeats=repeats, single=single)
    lat = []
    q = test_q[:single]
    for row in q:  # the latency distribution of one query at a time
        start = time.perf_counter()
        index.search(row[None], K, params=chosen or None)
        lat.append(time.perf_counter() - start)
    print(f"[search] {name}: {chosen or '(exact)'} recall@10 {setting.recall:.4f} (test), "
          f"{setting.queries_per_s:,.0f} q/s batched, {setting.latency_ms:.3f} ms/query, load {load()}",
          file=sys.stderr)
    return {"name": name, "search_params": chosen, "recall": setting.recall, "qps": setting.queries_per_s,
            "latency_ms": 1000 * statistics.median(lat), "latency_p95_ms": 1000 * float(np.percentile(lat, 95)),
            "tuned_on_select": tuned}


def embed_queries(args, folder: Path) -> np.ndarray:
    from retrieval.checkpoint import load_checkpoint
    from retrieval.data.specs import load_dataset
    from retrieval.embed import embed_images

    tower = load_checkpoint(args.checkpoint).tower
    return embed_images(tower, load_dataset(f"idx:{folder}").images, batch_size=256)


def rss_of_search(folder: Path, queries: Path) -> dict:
    """A fresh process: resident memory after loading the index, and after searching 1,000 queries."""
    code = (
        "import json, sys, numpy as np\n"
        "def rss():  # anonymous (the process's own) and file-backed (mapped files, page cache) resident memory\n"
        "    f = dict(l.split(':', 1) for l in open('/proc/self/status') if l.startswith(('RssAnon', 'RssFile')))\n"
        "    return {k: int(v.split()[0]) * 1024 for k, v in f.items()}\n"
        "import faiss, torch\n"
        "from retrieval.index import load_index\n"
        "before = rss()\n"
        f"ix = load_index({str(folder)!r})\n"
        "loaded = rss()\n"
        f"q = np.load({str(queries)!r})\n"
        "ix.search(q, 10)\n"
        "after = rss()\n"
        "print(json.dumps({k: {'loaded': loaded[k] - before[k], 'searched': after[k] - before[k]} for k in before}))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, default=Path("runs/mnist-default"))
    parser.add_argument("--images", type=int, default=1_000_000)
    parser.add_argument("--shard-images", type=int, default=300_000, help="images of the 1 vs 2 process builds")
    parser.add_argument("--work", type=Path, default=Path("/tmp/retrieval-large-index"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--single", type=int, default=500, help="queries timed one at a time")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-readme", action="store_true")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--precisions", default="", help="only the builds in each of these precisions, side by side")
    args = parser.parse_args()
    t_all = time.perf_counter()
    torch.set_num_threads(len(os.sched_getaffinity(0)))
    args.work.mkdir(parents=True, exist_ok=True)
    folders = make_data(args.work, args.images, args.seed)
    print(f"[start] {machine()}, load {load()}", file=sys.stderr)
    if args.precisions:
        lines = precision_builds(args, folders["index"], [p for p in args.precisions.split(",") if p])
        print("\n".join(lines))
        if not args.no_readme:
            append_section(lines)
        return

    builds = {
        "compressed": run_build(args, args.work / "ix-compressed", COMPRESSED, folders["index"]),
        "on_disk": run_build(args, args.work / "ix-ondisk", ON_DISK, folders["index"], ["--on-disk"]),
    }

    from retrieval.index import build_index, index_sizes, load_index, save_index
    from retrieval.tune import exact_vectors

    compressed = load_index(builds["compressed"]["folder"])
    on_disk = load_index(builds["on_disk"]["folder"])
    # the exact vectors, from the compressed index's refine stage, in id order
    vectors = np.concatenate([x for x, _ in exact_vectors(compressed)])
    labels, classes, sources = compressed.labels, compressed.classes, compressed.sources

    in_process = {}
    indexes = {}
    for factory in ("Flat", "HNSW32", ON_DISK, PREVIOUS, RESIDUAL):
        print(f"[build] {factory} from the vectors, load {load()}", file=sys.stderr)
        start = time.perf_counter()
        indexes[factory] = build_index(vectors, labels, classes, sources, factory=factory, seed=args.seed)
        in_process[factory] = {"seconds": time.perf_counter() - start, "train_size": indexes[factory].meta.get(
            "train_size")}
        print(f"[build]   {in_process[factory]['seconds']:.1f}s", file=sys.stderr)
    del vectors
    indexes[COMPRESSED] = compressed
    indexes[PREVIOUS] = indexes.pop(PREVIOUS)
    indexes[RESIDUAL] = indexes.pop(RESIDUAL)
    indexes[f"{ON_DISK} on disk"] = on_disk

    select_q, test_q = embed_queries(args, folders["select"]), embed_queries(args, folders["test"])
    np.save(args.work / "test-queries.npy", test_q)
    exact_test = indexes["Flat"].search(test_q, K)[1]
    searches = {name: measure_index(name, ix, select_q, test_q, exact_test, args.single, args.repeats)
                for name, ix in indexes.items()}

    sizes = {}
    for name, ix in indexes.items():
        s = index_sizes(ix)
        sizes[name] = {"disk": s["disk"].get("total") or s["memory"]["index"], "memory": s["memory"]["total"],
                       "mapped": s["mapped"]}
    ivf_folder = args.work / "ix-ivf-memory"
    shutil.rmtree(ivf_folder, ignore_errors=True)
    indexes[ON_DISK].meta.update(tower=compressed.meta.get("tower"))
    save_index(indexes[ON_DISK], ivf_folder)
    resident = {"in memory": rss_of_search(ivf_folder, args.work / "test-queries.npy"),
                "on disk": rss_of_search(Path(builds["on_disk"]["folder"]), args.work / "test-queries.npy")}
    del indexes

    # sharded: 1 process vs 2 on a part of the data
    shard = {}
    for processes in (1, 2):
        shard[processes] = run_build(args, args.work / f"ix-shard{processes}", COMPRESSED, folders["index"],
                                     ["--subset", args.shard_images], processes=processes)
    a, b = load_index(shard[1]["folder"]), load_index(shard[2]["folder"])
    same = bool(np.array_equal(a.search(test_q, K)[1], b.search(test_q, K)[1]) and np.array_equal(a.ids, b.ids))
    total = time.perf_counter() - t_all
    report = {"date": dt.date.today().isoformat(), "machine": machine(), "images": args.images, "builds": builds,
              "in_process": in_process, "searches": searches, "sizes": sizes, "resident": resident,
              "shard": shard, "shard_same_answers": same, "seconds": total, "load_end": load(),
              "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"), "single": args.single}
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    lines = summarize(report)
    print("\n".join(lines))
    if not args.no_readme:
        append_section(lines)


def precision_builds(args, data: Path, precisions: list[str]) -> list[str]:
    """The same IVF1024,Flat build in each precision, alternating over args.repeats rounds -> the report's lines."""
    runs: dict[str, list[dict]] = {p: [] for p in precisions}
    for r in range(args.repeats):
        for p in (precisions if r % 2 == 0 else precisions[::-1]):
            runs[p].append(run_build(args, args.work / f"ix-{p}", ON_DISK, data, ["--precision", p]))
    med = {p: {"wall": statistics.median(b["wall"] for b in bs),
               "embed": statistics.median(b["phases"]["embed"] for b in bs)} for p, bs in runs.items()}
    base = precisions[0]
    lines = [f"## Indexes of a million: the build in each precision ({dt.date.today().isoformat()}, CPU)", "",
             f"`benchmarks/large_index.py --images {args.images} --precisions {','.join(precisions)} --repeats "
             f"{args.repeats}`: `retrieval index build --data idx:DIR --factory {ON_DISK} --precision P` of "
             f"{args.images:,} images (MNIST train+test and seeded affine+elastic copies), checkpoint "
             f"{args.checkpoint}, each build its own CLI process (2 threads), the precisions alternating; medians. "
             f"{machine()}; load at the end {load()}.", "",
             f"| precision | wall | the build's embedding phase (read + embed) | wall / {base}'s | embedding / {base}'s |",
             "|---|---|---|---|---|"]
    for p in precisions:
        lines.append(f"| {p} | {med[p]['wall']:.1f} s | {med[p]['embed']:.1f} s | "
                     f"{med[p]['wall'] / med[base]['wall']:.2f}x | {med[p]['embed'] / med[base]['embed']:.2f}x |")
    return lines


def summarize(r: dict) -> list[str]:
    gib = 2 ** 30
    lines = [f"## Indexes of a million: streaming builds, compressed and on-disk search ({r['date']}, CPU, shared "
             f"machine)", "",
             f"`benchmarks/large_index.py`: {r['images']:,} real embeddings (mnist-default tower, MNIST train+test "
             f"and seeded affine+elastic copies), {r['machine']}; load average at the end {r['load_end']} (other "
             f"engineers' jobs ran alongside: absolute times are for this load; each ratio is measured within one "
             f"process; OMP_WAIT_POLICY={r.get('omp_wait_policy')}, see the script). Total benchmark time "
             f"{r['seconds'] / 60:.1f} min.", "",
             "Builds from the CLI (`retrieval index build --data idx:DIR`, 1 process, 2 threads); *embed* is the "
             "build's own embedding phase (read + embed the chunks), timed in the same process:", "",
             "| factory | wall | embed | train | fill + merge | wall / embed (target <= 1.2) | peak RSS | peak RSS "
             "beyond the index (target <= 2 GiB) |", "|---|---|---|---|---|---|---|---|"]
    for key in ("compressed", "on_disk"):
        b = r["builds"][key]
        name = f"{b['factory']} {' '.join(b['extra'])}".strip()
        index_mem = r["sizes"][COMPRESSED if key == "compressed" else f"{ON_DISK} on disk"]["memory"]
        ph = b["phases"]
        lines.append(f"| {name} | {b['wall']:.0f} s | {ph['embed']:.0f} s | {ph.get('train', 0):.1f} s | "
                     f"{ph.get('fill', 0) + ph.get('merge', 0):.1f} s | {b['wall'] / ph['embed']:.2f} | "
                     f"{b['max_rss'] / gib:.2f} GiB | {(b['max_rss'] - index_mem) / gib:.2f} GiB |")
    lines += ["", "Indexes made from the same vectors in one process (index time only, the embedding excluded): "
              + ", ".join(f"{k} {v['seconds']:.1f} s" for k, v in r["in_process"].items()) + ".", "",
              f"Search: each index's setting chosen on 1,000 `select` queries (fastest with recall@10 >= "
              f"{TARGET_RECALL} on the select set), then measured once on 1,000 other `test` queries (held-out "
              "augmented test digits); recall@10 against exact (Flat) search; batched = all 1,000 in one call "
              f"(median of 3), one at a time = median (p95) over {r['single']} single-query calls:", "",
              "| index | setting | recall@10 | queries/s batched | ms per query | size on disk | in memory |",
              "|---|---|---|---|---|---|---|"]
    for name, s in r["searches"].items():
        sz = r["sizes"][name]
        mem = f"{sz['memory'] / 2**20:.0f} MiB" + (f" (+ {sz['mapped'] / 2**20:.0f} MiB mapped)" if sz["mapped"]
                                                   else "")
        lines.append(f"| {name} | {s['search_params'] or '(exact)'} | {s['recall']:.4f} | {s['qps']:,.0f} | "
                     f"{s['latency_ms']:.3f} ({s['latency_p95_ms']:.3f}) | {sz['disk'] / 2**20:.0f} MiB | {mem} |")
    res = r["resident"]

    def mib(where, kind, when):
        return f"{res[where][kind][when] / 2**20:.0f}"

    lines += ["", f"Resident memory a fresh process adds by loading {ON_DISK} and searching the 1,000 test queries "
              "(default nprobe=64: most lists are read), its own (anonymous) and file-backed (the mapped lists: page "
              "cache the kernel may evict): in memory "
              f"{mib('in memory', 'RssAnon', 'loaded')} MiB own after loading, {mib('in memory', 'RssAnon', 'searched')}"
              f" after searching; on disk {mib('on disk', 'RssAnon', 'loaded')} / "
              f"{mib('on disk', 'RssAnon', 'searched')} MiB own, plus {mib('on disk', 'RssFile', 'searched')} MiB of "
              "the lists file mapped after searching.", ""]
    s1, s2 = r["shard"][1], r["shard"][2]
    lines += [f"Sharded build of {COMPRESSED} over {s1['count']:,} images: 1 process (2 threads) "
              f"{s1['wall']:.0f} s (embed {s1['phases']['embed']:.0f} s), torchrun 2 processes (1 thread each) "
              f"{s2['wall']:.0f} s (embed {s2['phases']['embed']:.0f} s): x{s1['wall'] / s2['wall']:.2f}; same "
              f"answers and ids: {r['shard_same_answers']}.", ""]
    compressed = [r["searches"][n] for n in (COMPRESSED, PREVIOUS, RESIDUAL)]
    meeting = [s for s in compressed if s["recall"] >= 0.95]
    best = max(meeting, key=lambda s: s["qps"]) if meeting else max(compressed, key=lambda s: s["recall"])
    lines += [f"Targets: build peak RSS beyond the index <= 2 GiB: "
              f"{'met' if all(r['builds'][k]['max_rss'] - r['sizes'][COMPRESSED if k == 'compressed' else ON_DISK + ' on disk']['memory'] <= 2 * gib for k in r['builds']) else 'missed'}; "
              f"best compressed ({best['name']}, {best['search_params']}) at recall@10 >= 0.95 with >= 2,000 q/s "
              f"batched and <= 2 ms per query: "
              f"{'met' if best['recall'] >= 0.95 and best['qps'] >= 2000 and best['latency_ms'] <= 2 else 'missed'} "
              f"({best['recall']:.4f}, {best['qps']:,.0f} q/s, {best['latency_ms']:.2f} ms); build <= 1.2x the "
              f"embedding: "
              + ", ".join(f"{r['builds'][k]['factory']} {r['builds'][k]['wall'] / r['builds'][k]['phases']['embed']:.2f}x"
                          for k in r["builds"]) + ".", ""]
    return lines


if __name__ == "__main__":
    main()
