"""Embedding throughput (images/s) of our towers against the pytorch-metric-learning example network.

The PML example's MNIST embedder (conv(1,32,3)-ReLU-conv(32,64,3)-ReLU-maxpool2-flatten-fc(9216,128)) is wrapped
in the same Tower (input normalisation + L2 normalisation) and run through the same `embed_images` path as our
towers, so the ratio compares the networks alone. Towers are timed interleaved inside each repeat, so load from
other processes on a shared machine hits them alike; we report medians.

    .venv/bin/python benchmarks/embed.py                       # CPU: batch 256/1024/4096, torch threads 1 and 2
    .venv/bin/python benchmarks/embed.py --device cuda --threads 1
"""

from __future__ import annotations

import argparse
import datetime as dt
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._report import append_section, machine  # noqa: E402
from retrieval.data.specs import load_dataset  # noqa: E402
from retrieval.embed import embed_images  # noqa: E402
from retrieval.towers import Tower, build_tower  # noqa: E402

def pml_example_tower() -> Tower:
    """The embedder of PML's MNIST examples (dropout layers are identities at inference and left out)."""
    backbone = nn.Sequential(
        nn.Conv2d(1, 32, 3, 1), nn.ReLU(),
        nn.Conv2d(32, 64, 3, 1), nn.ReLU(),
        nn.MaxPool2d(2), nn.Flatten(),
        nn.Linear(9216, 128),
    )
    return Tower("pml-example", backbone, 128)


def time_embedding(tower, images, batch_size, device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    embed_images(tower, images, batch_size=batch_size, device=device)
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
    ap.add_argument("--towers", default="default,seed,pml-example")
    ap.add_argument("--no-readme", action="store_true", help="print only; do not append to benchmarks/README.md")
    args = ap.parse_args(argv)

    device = torch.device(args.device)
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    threads = [int(t) for t in args.threads.split(",")]
    torch.manual_seed(0)
    makers = {"default": lambda: build_tower("default"), "seed": lambda: build_tower("seed"), "pml-example": pml_example_tower}
    towers = {name: makers[name]().to(device).eval() for name in args.towers.split(",")}
    n_max = max(args.images, max(batch_sizes))
    pool = load_dataset("mnist:test").images
    all_images = pool.repeat((n_max + len(pool) - 1) // len(pool), 1, 1)[:n_max].contiguous()

    rows = []  # (threads, batch size, {tower: median images/s})
    for t in threads:
        torch.set_num_threads(t)
        for bs in batch_sizes:
            images = all_images[: max(args.images, bs)]  # at least one full batch
            n = len(images)
            for tower in towers.values():  # warm-up (allocator, kernels, cudnn autotune)
                time_embedding(tower, images[: min(bs, n)], bs, device)
            samples = {name: [] for name in towers}
            for _ in range(args.repeats):
                for name, tower in towers.items():
                    samples[name].append(time_embedding(tower, images, bs, device))
            medians = {name: statistics.median(v) for name, v in samples.items()}
            rows.append((t, bs, medians))
            cells = "  ".join(f"{name} {v:9,.0f}" for name, v in medians.items())
            print(f"threads {t}  batch {bs:5d}  {cells}", file=sys.stderr, flush=True)

    names = list(towers)
    sizes = ", ".join(f"{name} {sum(p.numel() for p in t.parameters()):,} parameters ({t.embedding_size}-d)"
                      for name, t in towers.items())
    print(f"towers: {sizes}")
    ratio = "default" in towers and "pml-example" in towers
    header = "| torch threads | batch | " + " | ".join(f"{n} img/s" for n in names) + (" | default / PML |" if ratio else " |")
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for t, bs, med in rows:
        cells = " | ".join(f"{med[n]:,.0f}" for n in names)
        lines.append(f"| {t if device.type == 'cpu' else '-'} | {bs} | {cells} |"
                     + (f" {med['default'] / med['pml-example']:.2f}x |" if ratio else ""))
    table = "\n".join(lines)
    print(table)
    if ratio:
        ratios = [med["default"] / med["pml-example"] for _, _, med in rows]
        summary = (f"default / PML example: median {statistics.median(ratios):.2f}x, range "
                   f"{min(ratios):.2f}x-{max(ratios):.2f}x (target >= 4x)")
        print(summary)
    if not args.no_readme:
        section = [
            f"## Embedding throughput ({dt.date.today().isoformat()}, {args.device})",
            "",
            f"Machine: {machine()}. `benchmarks/embed.py --device {args.device} --batch-sizes {args.batch_sizes} "
            f"--threads {args.threads} --images {args.images} --repeats {args.repeats}`: images/s through `embed_images` "
            "(uint8 -> float -> tower, inference mode), median of the repeats, towers interleaved; untrained "
            f"weights (speed does not depend on them). Towers: {sizes}.",
            "",
            table,
            "",
        ]
        if ratio:
            section += [summary, ""]
        append_section(section)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
