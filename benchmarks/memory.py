"""Peak memory (resident set size) of training and of index build, each run as the CLI a user runs, in a fresh
process of its own, so the figure is the whole tool's (Python, torch, Faiss, the data) and not a share of this
script's.

    .venv/bin/python benchmarks/memory.py                       # 1 epoch of mnist-default, then a Flat index
    .venv/bin/python benchmarks/memory.py --epochs 12 --factory HNSW32

Peak RSS comes from the kernel's accounting of each finished child (os.wait4 -> ru_maxrss), wall time from this
script's clock.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks._report import append_section, machine  # noqa: E402


def run_measured(args: list[str]) -> tuple[float, float]:
    """Run a command to completion; (peak RSS in MiB, wall seconds). Fails loudly on a non-zero exit."""
    start = time.perf_counter()
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        raise SystemExit(f"{' '.join(args)} exited with {proc.returncode}")
    return usage.ru_maxrss / 1024, wall  # ru_maxrss is in KiB on Linux


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(ROOT / "configs" / "mnist-default.toml"))
    ap.add_argument("--epochs", type=int, default=1, help="training epochs (memory does not grow with them)")
    ap.add_argument("--data", default="mnist:train", help="what the index holds")
    ap.add_argument("--factory", default="Flat")
    ap.add_argument("--no-readme", action="store_true", help="print only; do not append to benchmarks/history.md")
    args = ap.parse_args(argv)

    cli = [sys.executable, "-m", "retrieval"]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp) / "run"
        steps = [
            (f"train {Path(args.config).stem}, {args.epochs} epoch(s)",
             cli + ["train", "--config", args.config, "--epochs", str(args.epochs), "--out", str(run)]),
            (f"index build {args.factory} of {args.data}",
             cli + ["index", "build", "--checkpoint", str(run), "--data", args.data, "--factory", args.factory,
                    "--out", str(Path(tmp) / "index")]),
            ("baseline: `python -c 'import retrieval.cli, torch, faiss'`",
             [sys.executable, "-c", "import retrieval.cli, torch, faiss"]),
        ]
        for label, command in steps:
            print(f"running {label} ...", file=sys.stderr, flush=True)
            rss, wall = run_measured(command)
            rows.append((label, rss, wall))

    lines = ["| step | peak RSS MiB | wall s |", "|---|---|---|"]
    lines += [f"| {label} | {rss:,.0f} | {wall:.1f} |" for label, rss, wall in rows]
    print("\n".join(lines))
    if not args.no_readme:
        cmd = "benchmarks/memory.py " + " ".join(argv if argv is not None else sys.argv[1:])
        append_section([f"## Peak memory of training and index build ({dt.date.today().isoformat()}, CPU)", "",
                        f"Machine: {machine()}. `{cmd.strip()}`: each step is the CLI in a fresh process; peak "
                        "resident set size from the kernel (ru_maxrss of the finished child). The import-only "
                        "row is the floor every command pays (Python, torch, Faiss).", ""] + lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
