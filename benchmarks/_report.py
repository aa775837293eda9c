"""Shared by the benchmark scripts: describe the machine, append a dated section to benchmarks/history.md (the
journal; benchmarks/README.md holds the current figure for each question, kept by hand)."""

from __future__ import annotations

import os
import platform
import statistics
import time
from pathlib import Path

README = Path(__file__).with_name("history.md")  # the journal the scripts append to


def machine() -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    text = f"{cpu}, {cores} cores available, torch {torch.__version__}, Python {platform.python_version()}"
    if torch.cuda.is_available():
        text += f", GPU {torch.cuda.get_device_name(0)}"
    return text


def median_time(fn, repeats: int) -> float:
    """Median wall time of `repeats` calls of fn(), in seconds."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def append_section(lines: list[str]) -> None:
    """Append a markdown section to benchmarks/history.md (created with a title when missing)."""
    if README.exists():
        text = README.read_text()
        prefix = "" if text.endswith("\n\n") or not text else ("\n" if text.endswith("\n") else "\n\n")
    else:
        prefix = "# Benchmarks\n\nFigures appended by the scripts in this folder (newest last).\n\n"
    with open(README, "a") as f:
        f.write(prefix + "\n".join(lines).rstrip("\n") + "\n")
