"""Embedding throughput (images/s) of the shipped towers in fp32 and bf16, against the pytorch-metric-learning
example network, and where each stands against this machine's matrix-multiply bounds.

Towers: a tower name (default, hires, seed), a shipped config's name (its tower as the config builds it, inference
options included: mnist-robust averages 9 shifted passes, mnist-fewshot deskews and averages 9) or pml-example: the
PML example's MNIST embedder (conv(1,32,3)-ReLU-conv(32,64,3)-ReLU-maxpool2-flatten-fc(9216,128)), wrapped in the
same Tower (input normalisation + L2 normalisation) and run through the same `embed_images` path as ours, so the
ratio compares the networks alone. Every (tower, precision) pair is timed interleaved inside each repeat, so load
from other processes on a shared machine hits them alike; we report medians.

--gemm also measures the machine's bounds: the median rate of square matrix products (fp32, and bf16 as autocast
runs them) on the benchmark's threads, the best over a few sizes; each tower's rate is then its multiply-adds
per image (convolutions and linear layers, counted by hooks over one batch, every pass of shift averaging
included) x images/s, as a fraction of the bound of the precision it ran in.

    .venv/bin/python benchmarks/embed.py                       # CPU: batch 256/1024/4096, torch threads 1 and 2
    .venv/bin/python benchmarks/embed.py --towers mnist-default,mnist-robust,mnist-fewshot,mnist-seed-pair \\
        --batch-sizes 256 --threads 2 --gemm                   # the precision targets (bf16 >= 1.7x fp32)
    .venv/bin/python benchmarks/embed.py --device cuda --threads 1
    .venv/bin/python benchmarks/embed.py --agreement runs/mnist-default   # a bf16 index's answers vs an fp32 one's
"""

from __future__ import annotations

import argparse
import datetime as dt
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._report import append_section, machine  # noqa: E402
from retrieval.data.specs import load_dataset  # noqa: E402
from retrieval.embed import embed_images  # noqa: E402
from retrieval.precision import autocast, resolve_precision  # noqa: E402
from retrieval.towers import Tower, build_tower  # noqa: E402
from retrieval.workflows import Compute


def pml_example_tower() -> Tower:
    """The embedder of PML's MNIST examples (dropout layers are identities at inference and left out)."""
    backbone = nn.Sequential(
        nn.Conv2d(1, 32, 3, 1), nn.ReLU(),
        nn.Conv2d(32, 64, 3, 1), nn.ReLU(),
        nn.MaxPool2d(2), nn.Flatten(),
        nn.Linear(9216, 128),
    )
    return Tower("pml-example", backbone, 128).to(memory_format=torch.channels_last)


def make_tower(name: str) -> Tower:
    """A tower name, a shipped config's name (its tower with its inference options) or pml-example."""
    if name == "pml-example":
        return pml_example_tower()
    if name.startswith("mnist-"):
        from retrieval.config import load_config
        from retrieval.workflows import shipped_config

        t = load_config(shipped_config(name)).tower
        return build_tower(t.name, t.embedding_size or None, t.deskew, t.test_shifts)
    return build_tower(name)


# ---------------------------------------------------------------------------------------------- the bounds
def multiply_adds(tower: nn.Module, images: torch.Tensor, training: bool = False) -> float:
    """Multiply-adds per image of the convolutions and linear layers in one forward pass of `tower` over `images`
    (uint8 N x 28 x 28; eval mode unless `training`: then no deskew and one pass, as in training)."""
    total = [0]

    def count(module, inputs, output):
        if isinstance(module, nn.Conv2d):
            k = module.in_channels // module.groups * module.kernel_size[0] * module.kernel_size[1]
            total[0] += output.numel() * k
        elif isinstance(module, nn.Linear):
            total[0] += output.numel() * module.in_features

    hooks = [m.register_forward_hook(count) for m in tower.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    was = tower.training
    tower.train(training)
    try:
        with torch.no_grad():
            tower(images.unsqueeze(1).float().div(255.0).contiguous(memory_format=torch.channels_last))
    finally:
        tower.train(was)
        for h in hooks:
            h.remove()
    return total[0] / len(images)


def gemm_rate(precision: str, size: int, repeats: int, device: torch.device) -> float:
    """Median multiply-adds/s of a size x size x size matrix product in `precision` (bf16: as autocast runs it)."""
    a = torch.randn(size, size, device=device)
    b = torch.randn(size, size, device=device)
    times = []
    for i in range(repeats + 2):  # two warm-up products
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        with autocast(device, precision):
            torch.mm(a, b)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= 2:
            times.append(time.perf_counter() - start)
    return size ** 3 / statistics.median(times)


def gemm_bounds(device: torch.device, sizes=(256, 512, 1024, 2048), repeats: int = 15) -> dict[str, dict]:
    """Per precision: the best median rate over `sizes` (the bound) and the rate at each size, interleaved."""
    rates: dict[str, dict[int, list]] = {p: {s: [] for s in sizes} for p in ("fp32", "bf16")}
    for _ in range(3):  # rounds: load from other processes hits both precisions alike
        for size in sizes:
            for precision in rates:
                rates[precision][size].append(gemm_rate(precision, size, max(3, repeats // 3), device))
    out = {}
    for precision, by_size in rates.items():
        medians = {s: statistics.median(v) for s, v in by_size.items()}
        out[precision] = {"bound": max(medians.values()), "by_size": medians}
    return out


# ---------------------------------------------------------------------------------------------- agreement
def index_agreement(run: str, k: int, device: torch.device, references: str = "mnist:train",
                    queries: str = "mnist:test") -> dict:
    """One checkpoint's index of `references` built, and `queries` evaluated against it, in fp32 and in bf16
    (workflows.build_index and evaluate, as `retrieval index build` and `evaluate --precision` do): each one's
    test figures, and recall@k of the bf16 index's answers against the fp32 index's (the share of each query's k
    nearest in fp32 that the bf16 index also answers, averaged over the queries)."""
    import tempfile

    from retrieval.knn import nearest_neighbors
    from retrieval.tune import recall_at_k
    from retrieval.workflows import build_index, evaluate, index_search

    out: dict = {"run": run, "k": k, "references": references, "queries": queries, "by_precision": {}}
    answers = {}
    with tempfile.TemporaryDirectory() as tmp:
        for p in ("fp32", "bf16"):
            folder = Path(tmp) / p
            build_index(run, [references], folder, compute=Compute(device=device, precision=p))
            ev = evaluate(folder, queries, compute=Compute(device=device, precision=p))
            iq = ev.queries
            answers[p] = nearest_neighbors(iq.embeddings, index_search(iq.index), k, iq.self_ids)[1]
            out["by_precision"][p] = {key: ev.payload[key] for key in ("precision@1", "map@r")}
    overlap = [len(set(a) & set(b)) / k for a, b in zip(answers["fp32"], answers["bf16"])]
    out["recall_at_k"] = recall_at_k(answers["bf16"], answers["fp32"])
    out["queries_with_all_k"] = float(np.mean([o == 1.0 for o in overlap]))
    out["same_first"] = float(np.mean(answers["fp32"][:, 0] == answers["bf16"][:, 0]))
    return out


# ---------------------------------------------------------------------------------------------- throughput
def time_embedding(tower, images, batch_size, device, precision) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    embed_images(tower, images, batch_size=batch_size, device=device, precision=precision)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return len(images) / (time.perf_counter() - start)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch-sizes", default="256,1024,4096")
    ap.add_argument("--threads", default="1,2", help="torch intra-op thread counts to try (CPU)")
    ap.add_argument("--images", type=int, default=4096, help="images embedded per measurement (at least one batch)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--towers", default="default,seed,pml-example",
                    help="tower names, shipped config names (mnist-robust, ...) or pml-example")
    ap.add_argument("--precisions", default="fp32,bf16", help="fp32, bf16 (auto: what this machine resolves it to)")
    ap.add_argument("--gemm", action="store_true", help="also measure the fp32/bf16 matrix-multiply bounds")
    ap.add_argument("--note", default="", help="a line added to the README section (e.g. how busy the machine was)")
    ap.add_argument("--agreement", default="", help="run folders (comma-separated): instead of throughput, each "
                    "checkpoint's mnist:train index built and mnist:test queried in fp32 and bf16; recall@k of "
                    "the bf16 answers against the fp32 ones and both test figures")
    ap.add_argument("--k", type=int, default=10, help="--agreement: neighbours compared")
    ap.add_argument("--no-readme", action="store_true", help="print only; do not append to benchmarks/history.md")
    args = ap.parse_args(argv)
    if args.agreement:
        return agreement_report(args, argv)

    device = torch.device(args.device)
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    threads = [int(t) for t in args.threads.split(",")]
    precisions = list(dict.fromkeys(resolve_precision(p.strip(), device) for p in args.precisions.split(",")))
    torch.manual_seed(0)
    towers = {name: make_tower(name).to(device).eval() for name in args.towers.split(",")}
    n_max = max(args.images, max(batch_sizes))
    pool = load_dataset("mnist:test").images
    all_images = pool.repeat((n_max + len(pool) - 1) // len(pool), 1, 1)[:n_max].contiguous()
    macs = {name: multiply_adds(t, pool[:64]) for name, t in towers.items()}
    pairs = [(name, p) for name in towers for p in precisions]

    rows = []  # (threads, batch size, {(tower, precision): median images/s}, gemm bounds or None)
    for t in threads:
        if device.type == "cpu":
            torch.set_num_threads(t)
        bounds = gemm_bounds(device) if args.gemm else None
        if bounds:
            print(f"threads {t}  GEMM bounds: " + "  ".join(
                f"{p} {b['bound'] / 1e9:,.1f} GMAC/s" for p, b in bounds.items()), file=sys.stderr, flush=True)
        for bs in batch_sizes:
            images = all_images[: max(args.images, bs)]  # at least one full batch
            n = len(images)
            for name, p in pairs:  # warm-up (allocator, kernels, oneDNN primitives, cudnn autotune)
                time_embedding(towers[name], images[: min(bs, n)], bs, device, p)
            samples = {pair: [] for pair in pairs}
            for _ in range(args.repeats):
                for name, p in pairs:
                    samples[(name, p)].append(time_embedding(towers[name], images, bs, device, p))
            medians = {pair: statistics.median(v) for pair, v in samples.items()}
            rows.append((t, bs, medians, bounds))
            cells = "  ".join(f"{name} {p} {v:9,.0f}" for (name, p), v in medians.items())
            print(f"threads {t}  batch {bs:5d}  {cells}", file=sys.stderr, flush=True)

    names = list(towers)
    sizes = ", ".join(f"{name} {sum(p.numel() for p in t.parameters()):,} parameters ({t.embedding_size}-d, "
                      f"{macs[name] / 1e6:.2f}M multiply-adds/image)" for name, t in towers.items())
    print(f"towers: {sizes}")
    both = "fp32" in precisions and "bf16" in precisions
    header = "| torch threads | batch | " + " | ".join(
        f"{n} {p} img/s" for n in names for p in precisions) + " |"
    if both:
        header += " " + " | ".join(f"{n} bf16 / fp32" for n in names) + " |"
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    ratios: dict[str, list[float]] = {n: [] for n in names}
    for t, bs, med, _ in rows:
        cells = " | ".join(f"{med[(n, p)]:,.0f}" for n in names for p in precisions)
        line = f"| {t if device.type == 'cpu' else '-'} | {bs} | {cells} |"
        if both:
            for n in names:
                ratios[n].append(med[(n, "bf16")] / med[(n, "fp32")])
            line += " " + " | ".join(f"{ratios[n][-1]:.2f}x" for n in names) + " |"
        lines.append(line)
    table = "\n".join(lines)
    print(table)
    summary = []
    if both:
        summary.append("bf16 / fp32: " + "; ".join(
            f"{n} median {statistics.median(r):.2f}x ({min(r):.2f}x-{max(r):.2f}x)" for n, r in ratios.items())
            + " (target >= 1.7x for every shipped tower)")
    pml = "pml-example" in towers and ("default" in towers or "mnist-default" in towers)
    if pml:
        ours = "default" if "default" in towers else "mnist-default"
        r = [med[(ours, p)] / med[("pml-example", p)] for _, _, med, _ in rows for p in precisions]
        summary.append(f"{ours} / PML example, same precision: median {statistics.median(r):.2f}x, range "
                       f"{min(r):.2f}x-{max(r):.2f}x (target >= 4x)")
    bound_lines = []
    if args.gemm:
        bound_lines = ["| torch threads | batch | precision | GEMM bound GMAC/s | " + " | ".join(
            f"{n} GMAC/s (of bound)" for n in names) + " |"]
        bound_lines.append("|" + "---|" * (bound_lines[0].count("|") - 1))
        for t, bs, med, bounds in rows:
            for p in precisions:
                b = bounds[p]["bound"]
                cells = " | ".join(f"{macs[n] * med[(n, p)] / 1e9:,.1f} ({macs[n] * med[(n, p)] / b:.0%})"
                                   for n in names)
                bound_lines.append(f"| {t if device.type == 'cpu' else '-'} | {bs} | {p} | {b / 1e9:,.1f} | {cells} |")
        seen = []
        for t, _, _, bounds in rows:
            if t in seen:
                continue
            seen.append(t)
            summary.append(f"GEMM rates, {t} thread(s), square products by size: " + "; ".join(
                f"{p} " + ", ".join(f"{s}: {v / 1e9:,.1f}" for s, v in bounds[p]["by_size"].items())
                for p in ("fp32", "bf16")) + " GMAC/s (bf16 / fp32 bound "
                f"{bounds['bf16']['bound'] / bounds['fp32']['bound']:.2f}x)")
        print("\n".join(bound_lines))
    for line in summary:
        print(line)
    if not args.no_readme:
        section = [
            f"## Embedding throughput, fp32 and bf16 ({dt.date.today().isoformat()}, {args.device})",
            "",
            f"Machine: {machine()}. `benchmarks/embed.py {' '.join(argv if argv is not None else sys.argv[1:])}`: "
            "images/s through `embed_images` (uint8 -> float -> tower, inference mode), median of the repeats, "
            f"(tower, precision) pairs interleaved; untrained weights (speed does not depend on them). Towers: {sizes}.",
        ]
        if args.note:
            section += ["", args.note]
        section += ["", table, ""]
        if bound_lines:
            section += ["\n".join(bound_lines), ""]
        section += [line + "\n" for line in summary]
        append_section(section)
    return 0


def agreement_report(args, argv) -> int:
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(int(args.threads.split(",")[-1]))
    lines = [f"| run | fp32 precision@1 | bf16 precision@1 | fp32 MAP@R | bf16 MAP@R | recall@{args.k} bf16 vs fp32 "
             f"| queries with all {args.k} | same first neighbour |", "|---|---|---|---|---|---|---|---|"]
    for run in [r.strip() for r in args.agreement.split(",") if r.strip()]:
        a = index_agreement(run, args.k, device)
        f, b = a["by_precision"]["fp32"], a["by_precision"]["bf16"]
        lines.append(f"| {run} | {f['precision@1']:.4f} | {b['precision@1']:.4f} | {f['map@r']:.4f} | "
                     f"{b['map@r']:.4f} | {a['recall_at_k']:.5f} | {a['queries_with_all_k']:.4f} | "
                     f"{a['same_first']:.4f} |")
        print(lines[-1], file=sys.stderr, flush=True)
    table = "\n".join(lines)
    print(table)
    if not args.no_readme:
        append_section([f"## bf16 and fp32 indexes of one checkpoint ({dt.date.today().isoformat()}, {args.device})",
                        "", f"Machine: {machine()}. `benchmarks/embed.py {' '.join(argv or sys.argv[1:])}`: "
                        "mnist:train indexed (Flat) and the 10,000 mnist:test queries evaluated in each precision.",
                        "", table, ""])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
