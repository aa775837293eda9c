"""Our retrieval metrics against pytorch-metric-learning's AccuracyCalculator on real MNIST embeddings.

Same embeddings on both sides (10k mnist:test queries against 60k mnist:train references, and the 10k test
images against themselves, leave-one-out): precision@1, MAP@R and R-precision must agree to 1e-6; times are the
median of --repeats interleaved runs. AccuracyCalculator runs with k="max_bin_count" (its own setting for MAP@R:
it searches max R neighbours); its default k=None searches all 60k references per query and needs more than the
24 GB of the development machine. Also timed once: the same metrics through a Faiss Flat index's own search at
MAP@R depth (the k-heap this module avoids).

    .venv/bin/python benchmarks/evaluate.py                        # newest runs/*/ checkpoint, else untrained
    .venv/bin/python benchmarks/evaluate.py --checkpoint runs/NAME --repeats 5
"""

from __future__ import annotations

import argparse
import datetime as dt
import logging
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._report import append_section, machine  # noqa: E402
from retrieval.checkpoint import load_checkpoint  # noqa: E402
from retrieval.data.specs import load_dataset  # noqa: E402
from retrieval.embed import embed_images  # noqa: E402
from retrieval.metrics import retrieval_metrics  # noqa: E402
from retrieval.run_folder import newest_checkpoint  # noqa: E402
from retrieval.towers import build_tower  # noqa: E402

PML_KEYS = {"precision@1": "precision_at_1", "map@r": "mean_average_precision_at_r", "r_precision": "r_precision"}


def pml_metrics(queries, query_labels, references=None, reference_labels=None) -> dict:
    from pytorch_metric_learning.utils import common_functions
    from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator

    common_functions.LOGGER.setLevel(logging.ERROR)
    calc = AccuracyCalculator(include=tuple(PML_KEYS.values()), k="max_bin_count", device=torch.device("cpu"))
    out = calc.get_accuracy(queries, query_labels, references, reference_labels)
    return {ours: out[theirs] for ours, theirs in PML_KEYS.items()}


def our_metrics(queries, query_labels, references=None, reference_labels=None) -> dict:
    m = retrieval_metrics(queries, query_labels, references, reference_labels)
    return {"precision@1": m.precision[1], "map@r": m.map_at_r, "r_precision": m.r_precision}


def index_search_metrics(queries, query_labels, references, reference_labels) -> dict:
    from retrieval.index import build_index

    index = build_index(references, reference_labels, [str(i) for i in range(10)],
                        [str(i) for i in range(len(references))], factory="Flat", metric="l2")
    m = retrieval_metrics(queries, query_labels, search=index.search, reference_labels=index.labels,
                          reference_ids=index.ids)
    return {"precision@1": m.precision[1], "map@r": m.map_at_r, "r_precision": m.r_precision}


def timed(fn, *args) -> tuple[float, dict]:
    start = time.perf_counter()
    out = fn(*args)
    return time.perf_counter() - start, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, help="run folder or .safetensors (default: newest under runs/)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch / BLAS / Faiss threads for both sides (default: as the libraries choose)")
    parser.add_argument("--skip-faiss-search", action="store_true",
                        help="do not time metrics through Faiss Flat search at MAP@R depth")
    parser.add_argument("--no-readme", action="store_true", help="print only; do not append to benchmarks/history.md")
    args = parser.parse_args()

    if args.threads:
        import faiss
        from threadpoolctl import threadpool_limits

        torch.set_num_threads(args.threads)
        faiss.omp_set_num_threads(args.threads)
        threadpool_limits(args.threads)  # in force from here on (not restored)
    root = Path(__file__).resolve().parents[1]
    ckpt_path = args.checkpoint or newest_checkpoint(root / "runs")
    if ckpt_path is not None:
        tower = load_checkpoint(ckpt_path).tower
        which = f"trained checkpoint {ckpt_path}"
    else:
        torch.manual_seed(0)
        tower = build_tower("default").eval()
        which = "an UNTRAINED default tower (random init, seed 0; no checkpoint under runs/)"
    print(f"tower: {which}", flush=True)
    train, test = load_dataset("mnist:train"), load_dataset("mnist:test")
    refs = embed_images(tower, train.images, batch_size=256, progress=True)
    queries = embed_images(tower, test.images, batch_size=256, progress=True)
    ref_labels, query_labels = train.labels.numpy(), test.labels.numpy()

    cases = [
        ("10k test queries vs 60k train references", (queries, query_labels, refs, ref_labels)),
        ("10k test vs themselves (leave-one-out)", (queries, query_labels)),
    ]
    rows = []
    for name, data in cases:
        ours_t, pml_t = [], []
        for rep in range(args.repeats):  # interleaved, so load changes hit both sides alike
            t, ours = timed(our_metrics, *data)
            ours_t.append(t)
            t, pml = timed(pml_metrics, *data)
            pml_t.append(t)
            print(f"{name}: repeat {rep + 1}: ours {ours_t[-1]:.2f}s, PML {pml_t[-1]:.2f}s", flush=True)
        diff = max(abs(ours[key] - pml[key]) for key in PML_KEYS)
        row = {"case": name, "ours": ours, "pml": pml, "diff": diff, "ours_s": statistics.median(ours_t),
               "pml_s": statistics.median(pml_t)}
        if not args.skip_faiss_search and len(data) == 4:
            t, via_faiss = timed(index_search_metrics, *data)
            row["faiss_s"] = t
            row["faiss_diff"] = max(abs(via_faiss[key] - pml[key]) for key in PML_KEYS)
            print(f"{name}: through Faiss Flat search: {t:.2f}s", flush=True)
        rows.append(row)

    table = [
        "| case | precision@1 (ours / PML) | MAP@R (ours / PML) | R-precision (ours / PML) | max abs diff | ours s | "
        "PML s | PML / ours |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        o, p = r["ours"], r["pml"]
        table.append(
            f"| {r['case']} | {o['precision@1']:.6f} / {p['precision@1']:.6f} | {o['map@r']:.6f} / {p['map@r']:.6f} "
            f"| {o['r_precision']:.6f} / {p['r_precision']:.6f} | {r['diff']:.1e} | {r['ours_s']:.2f} | "
            f"{r['pml_s']:.2f} | {r['pml_s'] / r['ours_s']:.1f}x |"
        )
    for line in table:
        print(line)
    notes = []
    for r in rows:
        if "faiss_s" in r:
            notes.append(
                f"Through a Faiss Flat index's own search at MAP@R depth (k = max R = {int(np.bincount(ref_labels).max())}"
                f", EmbeddingIndex.search): {r['faiss_s']:.2f}s for the first case (one run; values within "
                f"{r['faiss_diff']:.1e} of PML), i.e. {r['faiss_s'] / r['ours_s']:.1f}x ours."
            )
    for note in notes:
        print(note)
    if args.no_readme:
        return
    threads = f"{args.threads} thread(s) for torch/BLAS/Faiss" if args.threads else "library default threads"
    append_section([
        f"## Retrieval metrics vs pytorch-metric-learning AccuracyCalculator ({dt.date.today().isoformat()}, CPU)",
        "",
        f"Machine: {machine()}; {threads}. `benchmarks/evaluate.py --repeats {args.repeats}"
        + (f" --threads {args.threads}" if args.threads else "") + "`. Tower: " + which + ". Embeddings of all "
        "60,000 mnist:train and 10,000 mnist:test images; the same arrays go to both sides. AccuracyCalculator with "
        "k=\"max_bin_count\" (its setting for MAP@R; the default k=None searches all 60k references per query and "
        "ran out of the machine's 24 GB); ours: `retrieval.metrics.retrieval_metrics` (exact search, depth max(R, 16) "
        "per query, ranks without neighbour lists). Times: median of the interleaved repeats, seconds.",
        "",
        *table,
        "",
        *notes,
        "",
    ])


if __name__ == "__main__":
    main()
