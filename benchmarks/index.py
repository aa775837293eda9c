"""Faiss index types against plain numpy brute force on real MNIST embeddings (60k train indexed, 10k test queries).

For each factory: build time (train + add), batched QPS (all test queries in one call), one-at-a-time QPS (single
query calls, as a service answers them), and recall@10 against exact neighbours. Exact references: the package's
numpy brute force (retrieval.knn.ExactSearch, the engine behind the metrics) and Faiss Flat; Flat's 10k x 60k
k=10 time is the "well under 1 s" target.
All searches go through EmbeddingIndex.search (ids mapped, distances converted), i.e. what `retrieval query` runs.

    .venv/bin/python benchmarks/index.py                              # newest runs/*/ checkpoint, else untrained
    .venv/bin/python benchmarks/index.py --checkpoint runs/NAME --single 500
"""

from __future__ import annotations

import argparse
import datetime as dt
import sys
import time
from pathlib import Path

import faiss
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._report import append_section, machine, median_time  # noqa: E402
from retrieval.checkpoint import load_checkpoint  # noqa: E402
from retrieval.data.specs import load_dataset  # noqa: E402
from retrieval.embed import embed_images  # noqa: E402
from retrieval.index import build_index  # noqa: E402
from retrieval.knn import ExactSearch  # noqa: E402
from retrieval.run_folder import newest_checkpoint  # noqa: E402
from retrieval.towers import build_tower  # noqa: E402
from retrieval.tune import recall_at_k  # noqa: E402

K = 10
# (factory, [search params to try]); None = the defaults build_index stores.
CONFIGS = [
    ("Flat", [None]),
    ("HNSW32", ["efSearch=16", "efSearch=64", "efSearch=128"]),
    ("IVF256,Flat", ["nprobe=1", "nprobe=8", "nprobe=16", "nprobe=32"]),
    ("IVF256,PQ16", ["nprobe=8", "nprobe=16", "nprobe=32"]),
    ("IVF256,PQ16,RFlat", ["nprobe=16,k_factor_rf=4", "nprobe=16,k_factor_rf=16"]),
]


def one_at_a_time_qps(search, queries: np.ndarray) -> float:
    start = time.perf_counter()
    for q in queries:
        search(q[None, :], K)
    return len(queries) / (time.perf_counter() - start)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", help="run folder or .safetensors (default: newest under runs/)")
    ap.add_argument("--device", default="cpu", help="device for embedding the images (search runs on CPU)")
    ap.add_argument("--repeats", type=int, default=3, help="repeats of each batched search (median)")
    ap.add_argument("--single", type=int, default=500, help="queries sent one at a time for the single-query QPS")
    ap.add_argument("--base-size", type=int, default=None, help="index only this many train images (smoke runs)")
    ap.add_argument("--query-size", type=int, default=None, help="query only this many test images (smoke runs)")
    ap.add_argument("--factories", help="only these factories, separated by ';' (e.g. 'Flat;HNSW32')")
    ap.add_argument("--no-readme", action="store_true", help="print only; do not append to benchmarks/history.md")
    args = ap.parse_args(argv)

    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    ckpt_path = Path(args.checkpoint) if args.checkpoint else newest_checkpoint(Path("runs"))
    if ckpt_path is not None:
        ckpt = load_checkpoint(ckpt_path, device=args.device)
        tower, tower_note = ckpt.tower, f"trained checkpoint {ckpt.path} ({ckpt.meta.get('tower')}, {ckpt.tower.embedding_size}-d)"
    else:
        torch.manual_seed(0)
        tower = build_tower("default").to(args.device).eval()
        tower_note = ("an UNTRAINED default tower (random init, seed 0; no checkpoint under runs/): its embeddings "
                      "are far less spread out than a trained tower's, so recall figures are pessimistic")
    log(f"tower: {tower_note}")

    train = load_dataset("mnist:train", subset=args.base_size)
    test = load_dataset("mnist:test", subset=args.query_size)
    start = time.perf_counter()
    base = embed_images(tower, train.images, batch_size=1024, device=args.device)
    queries = embed_images(tower, test.images, batch_size=1024, device=args.device)
    embed_s = time.perf_counter() - start
    log(f"embedded {len(base) + len(queries):,} images in {embed_s:.1f}s")
    labels = train.labels.numpy()

    threads = faiss.omp_get_max_threads()
    start = time.perf_counter()
    _, exact = ExactSearch(base)(queries, K)  # smallest Euclidean distance = largest inner product on unit vectors
    numpy_s = time.perf_counter() - start
    log(f"numpy brute force: {numpy_s:.2f}s")

    rows = [("numpy brute force", "-", "-", numpy_s, len(queries) / numpy_s, None, None, None, 1.0)]
    single = queries[: args.single]
    configs = CONFIGS
    if args.factories:
        wanted = [f.strip() for f in args.factories.split(";") if f.strip()]
        configs = [(f, dict(CONFIGS).get(f, [None])) for f in wanted]
    for factory, param_sets in configs:
        start = time.perf_counter()
        index = build_index(base, labels, train.classes, train.sources, factory=factory, seed=0)
        build_s = time.perf_counter() - start
        for params in param_sets:
            if params is not None:
                index.set_search_params(params)
            shown = index.meta["search_params"] or "-"
            batch_s = median_time(lambda: index.search(queries, K), args.repeats)
            _, ids = index.search(queries, K)
            single_qps = one_at_a_time_qps(index.search, single)  # runs lone queries on one Faiss thread
            team_qps = one_at_a_time_qps(index.index.search, single)  # raw Faiss, with its thread team
            faiss.omp_set_num_threads(1)
            try:
                raw1_qps = one_at_a_time_qps(index.index.search, single)  # raw Faiss, one thread
            finally:
                faiss.omp_set_num_threads(threads)
            recall = recall_at_k(ids, exact)
            rows.append((factory, shown, f"{build_s:.2f}", batch_s, len(queries) / batch_s, single_qps, raw1_qps,
                         team_qps, recall))
            log(f"{factory:12s} {shown:12s} build {build_s:6.2f}s  batch {batch_s:.3f}s  "
                f"single {single_qps:8,.0f} q/s (raw Faiss: {raw1_qps:8,.0f} 1 thread, {team_qps:8,.0f} {threads} threads)  "
                f"recall@{K} {recall:.4f}")

    header = (f"| index | search params | build s | all queries s | batched QPS | one-at-a-time QPS | "
              f"one-at-a-time, raw Faiss 1 thread | one-at-a-time, raw Faiss {threads} threads | recall@{K} vs exact |")
    lines = [header, "|---|---|---|---|---|---|---|---|---|"]
    fmt = lambda v: "-" if v is None else f"{v:,.0f}"  # noqa: E731
    for factory, params, build_s, batch_s, qps, single_qps, raw1_qps, team_qps, recall in rows:
        lines.append(f"| {factory} | {params} | {build_s} | {batch_s:.3f} | {qps:,.0f} | {fmt(single_qps)} | "
                     f"{fmt(raw1_qps)} | {fmt(team_qps)} | {recall:.4f} |")
    flat_s = next((r[3] for r in rows if r[0] == "Flat"), None)
    summary = "" if flat_s is None else (
        f"Exact search, {len(queries):,} test x {len(base):,} train embeddings, k={K}: Faiss Flat {flat_s:.3f}s "
        f"(target well under 1 s), numpy brute force {numpy_s:.3f}s ({numpy_s / flat_s:.1f}x slower).")
    table = "\n".join(lines)
    print(table)
    print(summary)
    if not args.no_readme:
        append_section([
            f"## Index search: Flat / HNSW / IVF / PQ vs numpy ({dt.date.today().isoformat()})",
            "",
            f"Machine: {machine()}; Faiss {faiss.__version__} with {threads} OpenMP threads. "
            f"`benchmarks/index.py --repeats {args.repeats} --single {args.single}`. Tower: {tower_note}. "
            f"{len(base):,} mnist:train embeddings indexed ({base.shape[1]}-d, metric ip), {len(queries):,} "
            f"mnist:test queries, k={K}; batched = all queries in one call (median of {args.repeats}), "
            f"one-at-a-time = {len(single)} single-query calls through EmbeddingIndex.search (which runs a lone query "
            f"on one Faiss thread), beside the raw Faiss call on 1 and on {threads} threads; recall@{K} against "
            "numpy's exact neighbours. "
            "HNSW is built single-threaded (deterministic graph).",
            "",
            table,
            "",
            summary,
        ])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
