"""Where the time of exact k-NN search goes on this machine: 10,000 mnist:test embeddings against the 60,000
mnist:train embeddings, k=10, side by side in one process (median of repeats):

- Faiss IndexFlatIP (what `retrieval index build` makes by default) with its default block sizes and others,
- the matrix product alone (numpy; the BLAS Faiss also calls), i.e. the floor of any exact brute-force search,
- the same search on the first 32 and 16 dimensions (how much of the time the dimension explains).

    .venv/bin/python benchmarks/exact_search.py --checkpoint runs/mnist-default
"""

from __future__ import annotations

import argparse
import datetime as dt
import sys
from pathlib import Path

import faiss
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks._report import append_section, machine, median_time  # noqa: E402
from retrieval.checkpoint import load_checkpoint, resolve_checkpoint  # noqa: E402
from retrieval.data.specs import load_dataset  # noqa: E402
from retrieval.embed import embed_images  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True, help="run folder or .safetensors of a trained tower")
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="Faiss/BLAS threads (default: all cores available)")
    ap.add_argument("--no-readme", action="store_true", help="print only; do not append to benchmarks/history.md")
    args = ap.parse_args(argv)

    if args.threads:
        faiss.omp_set_num_threads(args.threads)
    ckpt = load_checkpoint(resolve_checkpoint(args.checkpoint))
    refs = embed_images(ckpt.tower, load_dataset("mnist:train").images, batch_size=256)
    queries = embed_images(ckpt.tower, load_dataset("mnist:test").images, batch_size=256)
    n_q, n_r, dim = len(queries), len(refs), refs.shape[1]
    gflop = 2 * n_q * n_r * dim / 1e9

    rows = []
    flat = faiss.IndexFlatIP(dim)
    flat.add(refs)
    _, exact_ids = flat.search(queries, args.k)
    default_bs = (faiss.cvar.distance_compute_blas_query_bs, faiss.cvar.distance_compute_blas_database_bs)
    for q_bs, db_bs in [default_bs, (256, 1024), (1024, 8192)]:
        faiss.cvar.distance_compute_blas_query_bs, faiss.cvar.distance_compute_blas_database_bs = q_bs, db_bs
        seconds = median_time(lambda: flat.search(queries, args.k), args.repeats)
        tag = " (Faiss default)" if (q_bs, db_bs) == default_bs else ""
        rows.append((f"Faiss IndexFlatIP, blocks {q_bs} x {db_bs}{tag}", dim, seconds))
    faiss.cvar.distance_compute_blas_query_bs, faiss.cvar.distance_compute_blas_database_bs = default_bs
    refs_t = np.ascontiguousarray(refs.T)
    seconds = median_time(lambda: queries @ refs_t, args.repeats)
    rows.append(("matrix product alone (numpy), no k-selection", dim, seconds))
    for d in (32, 16):
        sub = faiss.IndexFlatIP(d)
        sub.add(np.ascontiguousarray(refs[:, :d]))
        q = np.ascontiguousarray(queries[:, :d])
        rows.append((f"Faiss IndexFlatIP on the first {d} dimensions (not the same neighbours)", d,
                     median_time(lambda: sub.search(q, args.k), args.repeats)))

    lines = [f"| search ({n_q:,} x {n_r:,}, k={args.k}) | dims | seconds (median of {args.repeats}) |", "|---|---|---|"]
    lines += [f"| {name} | {d} | {s:.3f} |" for name, d, s in rows]
    product = rows[3][2]
    lines += ["", f"The {dim}-d product is {gflop:.0f} GFLOP: {gflop / product:.0f} GFLOP/s here with "
              f"{faiss.omp_get_max_threads()} thread(s); a brute-force exact search with this BLAS cannot be faster "
              "than that product."]
    print("\n".join(lines))
    if not args.no_readme:
        cmd = "benchmarks/exact_search.py " + " ".join(argv if argv is not None else sys.argv[1:])
        append_section([f"## Exact search: where the time goes ({dt.date.today().isoformat()}, CPU)", "",
                        f"Machine: {machine()}. `{cmd.strip()}`. Embeddings of a trained tower "
                        f"({ckpt.meta.get('tower', 'default')}, {dim}-d); Faiss {faiss.__version__}.", ""] + lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
