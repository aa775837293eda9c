"""`retrieval serve` under load on loopback: p50/p99 latency and queries/s at 1, 8 and 32 concurrent clients
against a 60k MNIST index, beside the CLI's cold start for one query, and the server's RSS over a long run.

Each client holds one keep-alive HTTP/1.1 connection and sends one query at a time (one mnist:test image as a
PNG multipart upload, k=5); latency is from the request's first byte sent to its last byte received. The load
generator is a lean asyncio client in this process (no HTTP library), so most of the 2 cores go to the server.

    .venv/bin/python benchmarks/serve.py --index indexes/serve-bench          # an existing 60k index
    .venv/bin/python benchmarks/serve.py --checkpoint runs/NAME               # build indexes/serve-bench first
    .venv/bin/python benchmarks/serve.py --train-epochs 2                     # train a quick tower first
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import io
import json
import os
import re
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks._report import append_section, machine  # noqa: E402

RETRIEVAL = [sys.executable, "-m", "retrieval"]
CONTENT_LENGTH = re.compile(rb"(?i)\r\ncontent-length:\s*(\d+)")


def run_cli(*args: str) -> str:
    proc = subprocess.run([*RETRIEVAL, *map(str, args)], cwd=REPO, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"retrieval {' '.join(map(str, args))} failed:\n{proc.stderr[-3000:]}")
    return proc.stdout


def prepare_index(args) -> tuple[Path, str]:
    """The 60k index to serve and a sentence saying where its tower came from."""
    if args.index:
        meta = json.loads((Path(args.index) / "meta.json").read_text())
        return Path(args.index), f"index {args.index} ({meta['count']:,} vectors, tower {meta['tower']['checkpoint']})"
    checkpoint = args.checkpoint
    how = f"checkpoint {checkpoint}"
    if checkpoint is None:
        checkpoint = REPO / "runs" / "serve-bench"
        if not (checkpoint / "best.safetensors").is_file():
            print(f"training the shipped config mnist-default for {args.train_epochs} epoch(s) -> {checkpoint}", flush=True)
            run_cli("train", "--config", "mnist-default", "--out", checkpoint,
                    "--epochs", args.train_epochs, "--device", "cpu", "--no-progress")
        how = (f"a {args.train_epochs}-epoch training of the shipped mnist-default config (`retrieval train --epochs "
               f"{args.train_epochs}`; the shipped config trains 12)")
    out = REPO / "indexes" / "serve-bench"
    print(f"building the 60k index -> {out}", flush=True)
    run_cli("index", "build", "--checkpoint", checkpoint, "--data", "mnist:train", "--out", out, "--device", "cpu")
    return out, f"{how}; index: all 60,000 mnist:train images, Flat (exact), metric ip"


def query_bodies(n: int) -> list[bytes]:
    """n HTTP requests: POST /query with one mnist:test image as a PNG upload and k=5."""
    from PIL import Image

    from retrieval.data import load_dataset

    ds = load_dataset("mnist:test", subset=n, seed=0)
    requests = []
    for i in range(n):
        buf = io.BytesIO()
        Image.fromarray(ds.images[i].numpy()).save(buf, format="PNG")
        boundary = f"----bench{i:08d}"
        body = (
            f"--{boundary}\r\nContent-Disposition: form-data; name=\"images\"; filename=\"test-{i}.png\"\r\n"
            f"Content-Type: image/png\r\n\r\n".encode() + buf.getvalue()
            + f"\r\n--{boundary}\r\nContent-Disposition: form-data; name=\"k\"\r\n\r\n5\r\n--{boundary}--\r\n".encode()
        )
        head = (f"POST /query HTTP/1.1\r\nHost: bench\r\nContent-Type: multipart/form-data; boundary={boundary}\r\n"
                f"Content-Length: {len(body)}\r\n\r\n").encode()
        requests.append(head + body)
    return requests


async def client(host: str, port: int, requests: list[bytes], start: int, count: int, latencies: list,
                 errors: list) -> None:
    reader, writer = await asyncio.open_connection(host, port)
    try:
        for i in range(count):
            req = requests[(start + i) % len(requests)]
            t0 = time.perf_counter()
            writer.write(req)
            try:
                head = await reader.readuntil(b"\r\n\r\n")
                m = CONTENT_LENGTH.search(head)
                body = await reader.readexactly(int(m.group(1)) if m else 0)
            except (asyncio.IncompleteReadError, ConnectionError) as e:
                errors.append(repr(e))
                return
            latencies.append(time.perf_counter() - t0)
            if not head.startswith(b"HTTP/1.1 200"):
                errors.append(head.split(b"\r\n", 1)[0].decode() + " " + body[:200].decode("utf-8", "replace"))
    finally:
        writer.close()


async def load(host: str, port: int, requests: list[bytes], clients: int, total: int) -> dict:
    latencies: list[float] = []
    errors: list[str] = []
    per = [total // clients + (1 if i < total % clients else 0) for i in range(clients)]
    t0 = time.perf_counter()
    await asyncio.gather(*(client(host, port, requests, i * 7919, n, latencies, errors) for i, n in enumerate(per)))
    seconds = time.perf_counter() - t0
    q = statistics.quantiles(latencies, n=100, method="inclusive") if len(latencies) > 1 else latencies * 99
    return {"clients": clients, "requests": total, "answered": len(latencies), "errors": len(errors),
            "first_errors": errors[:3], "seconds": seconds, "qps": len(latencies) / seconds,
            "p50_ms": statistics.median(latencies) * 1000, "p99_ms": q[98] * 1000}


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (all its threads)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def cli_cold_start(index: Path, repeats: int) -> tuple[float, float]:
    """Median wall seconds and peak RSS (MiB) of `retrieval query --index DIR --json mnist:test[0]`."""
    times, peaks = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        proc = subprocess.Popen([*RETRIEVAL, "query", "--index", str(index), "--json", "mnist:test[0]"], cwd=REPO,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        _, status, usage = os.wait4(proc.pid, 0)
        times.append(time.perf_counter() - t0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.returncode != 0:
            sys.exit(f"retrieval query failed: {proc.stderr.read().decode()[-2000:]}")
        peaks.append(usage.ru_maxrss / 1024)
    return statistics.median(times), max(peaks)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--index", help="a 60k index folder to serve")
    ap.add_argument("--checkpoint", help="build indexes/serve-bench from this checkpoint")
    ap.add_argument("--train-epochs", type=int, default=2, help="epochs of the quick training (no --index/--checkpoint)")
    ap.add_argument("--requests", type=int, default=3000, help="requests per concurrency level")
    ap.add_argument("--long", type=int, default=10_000, help="requests of the RSS run (32 clients)")
    ap.add_argument("--clients", default="1,8,32")
    ap.add_argument("--cold-repeats", type=int, default=3)
    ap.add_argument("--no-readme", action="store_true", help="print the section instead of appending it")
    args = ap.parse_args()

    index, how = prepare_index(args)
    requests = query_bodies(1000)
    load_before = os.getloadavg()[0]
    cold_s, cold_rss = cli_cold_start(index, args.cold_repeats)
    print(f"CLI cold start: {cold_s:.2f} s, peak RSS {cold_rss:.0f} MiB", flush=True)

    t_start = time.perf_counter()
    server = subprocess.Popen([*RETRIEVAL, "serve", "--index", str(index), "--port", "0"], cwd=REPO,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    for line in server.stderr:
        m = re.search(r"listening on http://([\d.]+):(\d+)/", line)
        if m:
            host, port = m.group(1), int(m.group(2))
            break
    else:
        sys.exit("the server did not start")
    threading.Thread(target=lambda: [None for _ in server.stderr], daemon=True).start()
    rows, samples = [], []
    try:
        asyncio.run(load(host, port, requests, 1, 1))  # waits for the first answer
        startup_s = time.perf_counter() - t_start
        asyncio.run(load(host, port, requests, 8, 400))  # warm-up
        for clients in [int(c) for c in args.clients.split(",")]:
            cpu0 = cpu_seconds(server.pid)
            row = asyncio.run(load(host, port, requests, clients, args.requests))
            row["cpu_ms"] = (cpu_seconds(server.pid) - cpu0) / max(1, row["answered"]) * 1000
            rows.append(row)
            print(f"{clients:3d} clients: p50 {row['p50_ms']:.2f} ms, p99 {row['p99_ms']:.2f} ms, "
                  f"{row['qps']:,.0f} q/s, {row['errors']} errors {row['first_errors']}, "
                  f"server CPU {row['cpu_ms']:.2f} ms/query", flush=True)
        # the long run: 32 clients, RSS sampled every 0.5 s
        stop = threading.Event()

        def sample():
            t0 = time.perf_counter()
            while not stop.is_set():
                samples.append((time.perf_counter() - t0, rss_mib(server.pid)))
                stop.wait(0.5)

        sampler = threading.Thread(target=sample)
        sampler.start()
        cpu0 = cpu_seconds(server.pid)
        long_row = asyncio.run(load(host, port, requests, 32, args.long))
        long_row["cpu_ms"] = (cpu_seconds(server.pid) - cpu0) / max(1, long_row["answered"]) * 1000
        stop.set()
        sampler.join()
        samples.append((samples[-1][0] + 0.01, rss_mib(server.pid)))
        health = json.loads(subprocess.run(["curl", "-s", f"http://{host}:{port}/health"], capture_output=True,
                                           text=True).stdout or "{}")
    finally:
        server.terminate()
        server.wait(timeout=60)
    print(f"long run: {long_row['answered']:,} answered, {long_row['errors']} errors, {long_row['qps']:,.0f} q/s, "
          f"RSS {samples[0][1]:.0f} -> {max(s for _, s in samples):.0f} (max) -> {samples[-1][1]:.0f} MiB", flush=True)

    load_after = os.getloadavg()[0]
    first_q = [s for t, s in samples if t <= samples[-1][0] / 4]
    last_q = [s for t, s in samples if t >= samples[-1][0] * 3 / 4]
    batching = health.get("batching", {})
    lines = [
        f"## Serving: `retrieval serve` under load on loopback ({dt.date.today().isoformat()}, CPU)",
        "",
        f"Machine: {machine()}. `benchmarks/serve.py --requests {args.requests} --long {args.long}`. Tower: {how}. "
        "Each client holds one keep-alive connection and sends one query at a time: one mnist:test image as a PNG "
        "multipart upload to POST /query, k=5 (1,000 distinct images in rotation); latency from the first byte "
        "sent to the last byte received. The load generator (asyncio, no HTTP library) runs on the same 2 cores "
        "as the server. Other jobs shared the machine: load average "
        f"{load_before:.1f} before the run, {load_after:.1f} after it (2 cores).",
        "",
        "| clients | requests | p50 ms | p99 ms | queries/s | errors | server CPU ms/query |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in [*rows, {**long_row, "clients": "32 (long run)"}]:
        lines.append(f"| {r['clients']} | {r['requests']:,} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} | "
                     f"{r['qps']:,.0f} | {r['errors']} | {r['cpu_ms']:.2f} |")
    lines += [
        "",
        f"CLI cold start for one query (`retrieval query --index DIR --json mnist:test[0]`, a new process): "
        f"{cold_s:.2f} s median of {args.cold_repeats}, peak RSS {cold_rss:.0f} MiB. The server starts in "
        f"{startup_s:.1f} s (to its first answer) and then answers in milliseconds.",
        "",
        f"Server RSS over the {args.long:,}-request run: {samples[0][1]:.0f} MiB at the start, "
        f"{statistics.mean(first_q):.0f} MiB mean over the first quarter, {statistics.mean(last_q):.0f} MiB over the "
        f"last quarter, {max(s for _, s in samples):.0f} MiB at most, {samples[-1][1]:.0f} MiB at the end "
        f"({len(samples)} samples). Micro-batching over the whole benchmark: {batching.get('jobs', 0):,} queries in "
        f"{batching.get('batches', 0):,} batches (mean {batching.get('mean_jobs_per_batch', 0)} queries per tower "
        f"forward and Faiss search, largest {batching.get('largest_batch', 0)}).",
    ]
    text = "\n".join(lines)
    print("\n" + text)
    if not args.no_readme:
        append_section(lines)
        print("\nappended to benchmarks/README.md")


if __name__ == "__main__":
    main()
