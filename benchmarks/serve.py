"""`retrieval serve` under load on loopback, against a 60k MNIST index, with the pictures users send:

- payloads: `mnist`, a 28x28 PNG (mnist:test digits); `canvas`, the draw-a-digit page's 280x280 RGBA PNG export
  (mnist:test digits drawn as thick dark strokes on the page's white canvas); `photo`, a 1024x768 JPEG phone photo
  of a digit on paper (lighting gradient, paper texture, a shadow, blur). All made deterministically from seeded
  mnist:test subsets; each payload rotates through its distinct pictures.
- per payload: decode + preprocess time (median, one thread, the service's own function, in a new process
  importing the server's source tree);
  one client's p50 latency (sequential requests on one keep-alive connection); queries/s, p50 and p99 at 32
  clients, with wrk when it is installed (apt-get install wrk), else with the asyncio client below.
- for the mnist payload as before: p50/p99 and queries/s at 1, 8 and 32 clients (asyncio client), the server's
  RSS over a long run, and the CLI's cold start for one query.

`--baseline-src DIR` measures a second server from another source tree (e.g. `git archive <commit> | tar -x -C
DIR`) side by side on the same index, payloads and machine: both run at once, each payload is measured on one,
then the other, for `--rounds` rounds, and the medians are reported (the machine's other load drifts).

Each request is one POST /query with one picture as a multipart upload and k=5; latency is from the request's
first byte sent to its last byte received. The load generators run on the same cores as the server.

    .venv/bin/python benchmarks/serve.py --index indexes/serve-bench          # an existing 60k index
    .venv/bin/python benchmarks/serve.py --checkpoint runs/NAME               # build indexes/serve-bench first
    .venv/bin/python benchmarks/serve.py --train-epochs 2                     # train a quick tower first
    .venv/bin/python benchmarks/serve.py --index DIR --long 0 --cold-repeats 0 --clients "" --no-readme
    # side by side with the tree before a change, three rounds:
    git archive <commit> | tar -x -C /tmp/base-src
    .venv/bin/python benchmarks/serve.py --index DIR --baseline-src /tmp/base-src --rounds 3 --one-client 150 \
        --duration 8 --long 0 --cold-repeats 0 --clients "" --no-readme
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import io
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks._report import append_section, machine  # noqa: E402

RETRIEVAL = [sys.executable, "-m", "retrieval"]
CONTENT_LENGTH = re.compile(rb"(?i)\r\ncontent-length:\s*(\d+)")
BOUNDARY = "----retrieval-bench-7d1f"
PAYLOADS = ("mnist", "canvas", "photo")
PAYLOAD_TEXT = {"mnist": "28x28 PNG", "canvas": "280x280 RGBA canvas PNG", "photo": "1024x768 JPEG photo"}


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
    from retrieval.run_folder import BEST, RunFolder

    checkpoint = args.checkpoint
    how = f"checkpoint {checkpoint}"
    if checkpoint is None:
        checkpoint = REPO / "runs" / "serve-bench"
        if not RunFolder(checkpoint).weights(BEST).is_file():
            print(f"training the shipped config mnist-default for {args.train_epochs} epoch(s) -> {checkpoint}", flush=True)
            run_cli("train", "--config", "mnist-default", "--out", checkpoint,
                    "--epochs", args.train_epochs, "--device", "cpu", "--no-progress")
        how = (f"a {args.train_epochs}-epoch training of the shipped mnist-default config (`retrieval train --epochs "
               f"{args.train_epochs}`; the shipped config trains 12)")
    out = REPO / "indexes" / "serve-bench"
    print(f"building the 60k index -> {out}", flush=True)
    run_cli("index", "build", "--checkpoint", checkpoint, "--data", "mnist:train", "--out", out, "--device", "cpu")
    return out, f"{how}; index: all 60,000 mnist:train images, Flat (exact), metric ip"


# -- payloads ---------------------------------------------------------------------------------------------------------
def _digits(n: int, seed: int):
    from retrieval.data import load_dataset

    return load_dataset("mnist:test", subset=n, seed=seed).images.numpy()


def mnist_pictures(n: int) -> list[tuple[str, bytes, str]]:
    from PIL import Image

    out = []
    for i, digit in enumerate(_digits(n, 0)):
        buf = io.BytesIO()
        Image.fromarray(digit).save(buf, format="PNG")
        out.append((f"test-{i}.png", buf.getvalue(), "image/png"))
    return out


def canvas_pictures(n: int) -> list[tuple[str, bytes, str]]:
    """The page's export: an opaque 280x280 RGBA canvas, white, with the digit in #111 ink, anti-aliased edges
    (an mnist:test digit scaled 10x and thresholded into a thick stroke, like the page's 18 px round pen)."""
    import numpy as np
    from PIL import Image, ImageFilter

    out = []
    for i, digit in enumerate(_digits(n, 1)):
        big = Image.fromarray(digit).resize((280, 280), Image.Resampling.BILINEAR)
        ink = np.clip((np.asarray(big, dtype=np.float32) - 60.0) * 4.0, 0, 255)
        ink = np.asarray(Image.fromarray(ink.astype(np.uint8)).filter(ImageFilter.GaussianBlur(0.8)),
                         dtype=np.float32) / 255.0
        rgb = (255.0 * (1 - ink) + 17.0 * ink).round().astype(np.uint8)
        rgba = np.dstack([rgb, rgb, rgb, np.full_like(rgb, 255)])
        buf = io.BytesIO()
        Image.fromarray(rgba, mode="RGBA").save(buf, format="PNG")
        out.append((f"canvas-{i}.png", buf.getvalue(), "image/png"))
    return out


def photo_pictures(n: int) -> list[tuple[str, bytes, str]]:
    """A phone photo of a digit written on paper: 1024x768, a lighting gradient across the sheet, paper texture,
    a soft shadow along one side, the digit (an mnist:test digit scaled to ~380 px) in dark ink, slightly blurred,
    JPEG quality 88. Seeded: the same bytes on every run."""
    import numpy as np
    from PIL import Image, ImageFilter

    rng = np.random.default_rng(25)
    yy, xx = np.mgrid[0:768, 0:1024].astype(np.float32)
    out = []
    for i, digit in enumerate(_digits(n, 2)):
        gx, gy = rng.uniform(-40, 40, 2)
        paper = 185 + gx * (xx / 1024 - 0.5) + gy * (yy / 768 - 0.5)
        texture = np.asarray(Image.fromarray(rng.normal(0, 10, (192, 256)).astype(np.float32), mode="F")
                             .resize((1024, 768), Image.Resampling.BILINEAR))
        shadow_edge = rng.uniform(80, 240)
        paper = paper + texture - 45 * np.clip((shadow_edge - xx) / 120, 0, 1)
        size = int(rng.uniform(340, 420))
        mark = np.asarray(Image.fromarray(digit).resize((size, size), Image.Resampling.BICUBIC),
                          dtype=np.float32) / 255.0
        top, left = int(rng.uniform(120, 768 - size - 60)), int(rng.uniform(260, 1024 - size - 120))
        ink = np.zeros((768, 1024), np.float32)
        ink[top:top + size, left:left + size] = np.clip(mark * 1.3, 0, 1)
        picture = paper * (1 - ink) + 45 * ink
        rgb = np.dstack([picture * 1.02, picture, picture * 0.94])
        img = Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8), mode="RGB").filter(
            ImageFilter.GaussianBlur(rng.uniform(0.8, 1.8)))
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=88)
        out.append((f"photo-{i}.jpg", buf.getvalue(), "image/jpeg"))
    return out


def make_payload(name: str, n: int) -> list[tuple[str, bytes, str]]:
    return {"mnist": mnist_pictures, "canvas": canvas_pictures, "photo": photo_pictures}[name](n)


def multipart_body(filename: str, data: bytes, content_type: str) -> bytes:
    return (f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"images\"; filename=\"{filename}\"\r\n"
            f"Content-Type: {content_type}\r\n\r\n".encode() + data
            + f"\r\n--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"k\"\r\n\r\n5\r\n--{BOUNDARY}--\r\n".encode())


def http_requests(pictures) -> list[bytes]:
    """One HTTP/1.1 POST /query (k=5) per picture, head and body."""
    out = []
    for filename, data, content_type in pictures:
        body = multipart_body(filename, data, content_type)
        head = (f"POST /query HTTP/1.1\r\nHost: bench\r\nContent-Type: multipart/form-data; boundary={BOUNDARY}\r\n"
                f"Content-Length: {len(body)}\r\n\r\n").encode()
        out.append(head + body)
    return out


DECODE_TIMER = """
import statistics, sys, time
from pathlib import Path
import torch
import retrieval
from retrieval.serve.library import decode_upload
torch.set_num_threads(1)
assert Path(retrieval.__file__).resolve().is_relative_to(Path.cwd().resolve()), retrieval.__file__
repeats = int(sys.argv[1])
for folder in sys.argv[2:]:
    pictures = [(f.name, f.read_bytes()) for f in sorted(Path(folder).iterdir())]
    for name, data in pictures[:3]:
        decode_upload(data, name)
    times, cpu_times = [], []
    for _ in range(repeats):
        for name, data in pictures:
            t0, c0 = time.perf_counter(), time.thread_time()
            decode_upload(data, name)
            times.append(time.perf_counter() - t0)
            cpu_times.append(time.thread_time() - c0)
    print(statistics.median(times) * 1000, statistics.median(cpu_times) * 1000)
"""


def decode_ms(src: Path, payloads: dict, workdir: Path, pictures_timed: int = 60, repeats: int = 2) -> dict:
    """{payload: (wall, CPU) median milliseconds of the service's decode + preprocess
    (retrieval.serve.library.decode_upload) per picture} over the payload's first `pictures_timed` pictures, each
    `repeats` times, one thread, in a new process importing the source tree `src`. On a shared machine the thread's
    CPU time is the closer estimate of the wall time on an idle one."""
    folders = []
    for payload, pictures in payloads.items():
        folder = workdir / "decode" / payload
        if not folder.is_dir():
            folder.mkdir(parents=True)
            for i, (name, data, _) in enumerate(pictures[:pictures_timed]):
                (folder / f"{i:04d}-{name}").write_bytes(data)
        folders.append(str(folder))
    proc = subprocess.run([sys.executable, "-c", DECODE_TIMER, str(repeats), *folders], cwd=src,
                          capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if proc.returncode != 0:
        sys.exit(f"timing decode_upload from {src} failed:\n{proc.stderr[-3000:]}")
    return {payload: tuple(map(float, line.split())) for payload, line in zip(payloads, proc.stdout.splitlines())}


# -- load generators --------------------------------------------------------------------------------------------------
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
            "p50_ms": statistics.median(latencies) * 1000, "p99_ms": q[98] * 1000, "tool": "asyncio"}


WRK_SCRIPT = """
local dir, n = os.getenv("BENCH_DIR"), tonumber(os.getenv("BENCH_N"))
local requests, at = {}, 0
function init(args)
  for i = 0, n - 1 do
    local f = assert(io.open(string.format("%s/body-%04d.bin", dir, i), "rb"))
    local body = f:read("*a")
    f:close()
    requests[i + 1] = wrk.format("POST", "/query",
      {["Content-Type"] = "multipart/form-data; boundary=" .. os.getenv("BENCH_BOUNDARY")}, body)
  end
  at = math.random(n)
end
function request()
  at = at % n + 1
  return requests[at]
end
"""


def _duration_ms(text: str) -> float:
    value, unit = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text).groups()
    return float(value) * {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60000.0}[unit]


def wrk_load(host: str, port: int, pictures, clients: int, seconds: float, workdir: Path) -> dict:
    """wrk -t2 -c<clients> -d<seconds>s --latency, rotating through the payload's requests."""
    bodies = workdir / "bodies"
    shutil.rmtree(bodies, ignore_errors=True)
    bodies.mkdir(parents=True)
    for i, picture in enumerate(pictures):
        (bodies / f"body-{i:04d}.bin").write_bytes(multipart_body(*picture))
    script = workdir / "rotate.lua"
    script.write_text(WRK_SCRIPT)
    env = {**os.environ, "BENCH_DIR": str(bodies), "BENCH_N": str(len(pictures)), "BENCH_BOUNDARY": BOUNDARY}
    proc = subprocess.run(["wrk", f"-t{min(2, clients)}", f"-c{clients}", f"-d{seconds:g}s", "--latency",
                           "--timeout", "10s", "-s", str(script), f"http://{host}:{port}"],
                          capture_output=True, text=True, env=env)
    text = proc.stdout
    if proc.returncode != 0 or "Requests/sec" not in text:
        sys.exit(f"wrk failed ({proc.returncode}):\n{text}\n{proc.stderr}")
    percent = dict(re.findall(r"^\s+(50|99)(?:\.000)?%\s+(\S+)\s*$", text, re.M))
    if set(percent) != {"50", "99"}:
        sys.exit(f"cannot read wrk's latency distribution:\n{text}")
    total = int(re.search(r"(\d+) requests in", text).group(1))
    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
    socket_errors = re.search(r"Socket errors: (.*)$", text, re.M)
    errors = (int(non_2xx.group(1)) if non_2xx else 0)
    if socket_errors:
        errors += sum(int(x) for x in re.findall(r"\d+", socket_errors.group(1)))
    return {"clients": clients, "requests": total, "answered": total, "errors": errors,
            "first_errors": [socket_errors.group(0)] if socket_errors else [],
            "seconds": seconds, "qps": float(re.search(r"Requests/sec:\s+([\d.]+)", text).group(1)),
            "p50_ms": _duration_ms(percent["50"]), "p99_ms": _duration_ms(percent["99"]), "tool": "wrk"}


# -- the server -------------------------------------------------------------------------------------------------------
def process_tree(pid: int) -> list[int]:
    """`pid` and its descendants (a server's worker processes, with --workers)."""
    out = [pid]
    for task in Path(f"/proc/{pid}/task").iterdir():
        for child in (task / "children").read_text().split():
            out += process_tree(int(child))
    return out


def cpu_seconds(pid: int) -> float:
    """User + system CPU time so far of a process and its descendants (all their threads)."""
    total = 0
    for p in process_tree(pid):
        fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


def rss_mib(pid: int) -> float:
    """Resident memory of a process and its descendants."""
    total = 0
    for p in process_tree(pid):
        for line in Path(f"/proc/{p}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                total += int(line.split()[1])
    return total / 1024


class Server:
    """`python -m retrieval serve --index DIR --port 0` run from the source tree `src` (environment `env`: None,
    this process's), its URL read from its log."""

    def __init__(self, index: Path, src: Path = REPO, env: dict | None = None, workers: int = 1):
        self.t_start = time.perf_counter()
        extra = ["--workers", str(workers)] if workers > 1 else []
        self.proc = subprocess.Popen([*RETRIEVAL, "serve", "--index", str(index), "--port", "0", *extra], cwd=src,
                                     env=env,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        for line in self.proc.stderr:
            m = re.search(r"listening on http://([\d.]+):(\d+)/", line)
            if m:
                self.host, self.port = m.group(1), int(m.group(2))
                break
        else:
            sys.exit(f"the server from {src} did not start")
        threading.Thread(target=lambda: [None for _ in self.proc.stderr], daemon=True).start()
        self.pid = self.proc.pid

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=60)

    def health(self) -> dict:
        import urllib.request

        with urllib.request.urlopen(f"http://{self.host}:{self.port}/health", timeout=30) as r:
            return json.loads(r.read())


def measure_payload(server: Server, name: str, pictures, args, workdir: Path) -> dict:
    """{"one": one client's row, "many": the row at args.many clients} for one payload on one server."""
    requests = http_requests(pictures)
    asyncio.run(load(server.host, server.port, requests, 4, min(100, 4 * len(requests))))  # warm-up
    one = asyncio.run(load(server.host, server.port, requests, 1, args.one_client))
    cpu0 = cpu_seconds(server.pid)
    if shutil.which("wrk") and not args.no_wrk:
        many = wrk_load(server.host, server.port, pictures, args.many, args.duration, workdir)
    else:
        many = asyncio.run(load(server.host, server.port, requests, args.many,
                                int(args.duration * 300) if name != "photo" else int(args.duration * 60)))
    many["cpu_ms"] = (cpu_seconds(server.pid) - cpu0) / max(1, many["answered"]) * 1000
    print(f"  {name:6s}: one client p50 {one['p50_ms']:.2f} ms ({one['errors']} errors); {args.many} clients "
          f"({many['tool']}): {many['qps']:,.0f} q/s, p50 {many['p50_ms']:.1f} ms, p99 {many['p99_ms']:.1f} ms, "
          f"{many['errors']} errors {many['first_errors']}, server CPU {many['cpu_ms']:.2f} ms/query", flush=True)
    return {"one": one, "many": many}


def median_row(runs: list[dict]) -> dict:
    """The rounds of one payload on one server: the median of each figure, errors summed."""
    def med(part, key):
        return statistics.median(r[part][key] for r in runs)

    return {"one_p50_ms": med("one", "p50_ms"), "qps": med("many", "qps"), "p50_ms": med("many", "p50_ms"),
            "p99_ms": med("many", "p99_ms"), "cpu_ms": med("many", "cpu_ms"),
            "errors": sum(r["one"]["errors"] + r["many"]["errors"] for r in runs)}


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
    ap.add_argument("--payloads", default=",".join(PAYLOADS), help="which payloads to measure (mnist,canvas,photo)")
    ap.add_argument("--pictures", type=int, default=200, help="distinct pictures per payload")
    ap.add_argument("--one-client", type=int, default=400, help="requests of the one-client run per payload")
    ap.add_argument("--many", type=int, default=32, help="clients of the loaded run per payload")
    ap.add_argument("--duration", type=float, default=10.0, help="seconds of each loaded run (wrk)")
    ap.add_argument("--no-wrk", action="store_true", help="use the asyncio client even when wrk is installed")
    ap.add_argument("--baseline-src", help="also measure the server of this source tree, side by side")
    ap.add_argument("--workers", type=int, default=1, help="`retrieval serve --workers` of this tree's server")
    ap.add_argument("--baseline-workers", type=int, default=1,
                    help="`retrieval serve --workers` of the baseline's server (a tree that has the option)")
    ap.add_argument("--rounds", type=int, default=1,
                    help="measure every payload on every server this many times, in turn (medians reported)")
    ap.add_argument("--requests", type=int, default=3000, help="requests per concurrency level (mnist payload)")
    ap.add_argument("--long", type=int, default=10_000, help="requests of the RSS run (32 clients; 0: skip)")
    ap.add_argument("--clients", default="1,8,32", help="concurrency levels of the mnist run ('': skip)")
    ap.add_argument("--cold-repeats", type=int, default=3, help="CLI cold starts (0: skip)")
    ap.add_argument("--no-readme", action="store_true", help="print the section instead of appending it")
    args = ap.parse_args()
    if args.rounds < 1:
        sys.exit(f"--rounds: expected 1 or more, got {args.rounds}")
    if args.baseline_src and not (Path(args.baseline_src) / "retrieval" / "__main__.py").is_file():
        sys.exit(f"--baseline-src {args.baseline_src}: no retrieval package there; expected a source tree "
                 "(git archive <commit> | tar -x -C DIR)")

    index, how = prepare_index(args)
    names = [p for p in args.payloads.split(",") if p]
    if unknown := set(names) - set(PAYLOADS):
        sys.exit(f"--payloads: unknown {sorted(unknown)}; expected some of {', '.join(PAYLOADS)}")
    payloads = {name: make_payload(name, args.pictures) for name in names}
    for name, pictures in payloads.items():
        print(f"{name}: {len(pictures)} pictures, median "
              f"{statistics.median(len(d) for _, d, _ in pictures) / 1024:.1f} KiB", flush=True)
    load_before = os.getloadavg()[0]
    cold_s = cold_rss = None
    if args.cold_repeats:
        cold_s, cold_rss = cli_cold_start(index, args.cold_repeats)
        print(f"CLI cold start: {cold_s:.2f} s, peak RSS {cold_rss:.0f} MiB", flush=True)

    variants = {"this tree": REPO}
    if args.baseline_src:
        variants["baseline"] = Path(args.baseline_src).resolve()
    runs: dict[tuple[str, str], list[dict]] = {}  # (server, payload) -> one measure_payload row per round
    decode: dict[tuple[str, str], list[tuple]] = {}  # (server, payload) -> decode + preprocess (ms, CPU ms) per round
    rows, samples, long_row, health, startup_s = [], [], None, {}, None
    servers: dict[str, Server] = {}
    with tempfile.TemporaryDirectory(prefix="serve-bench-") as tmp:
        try:
            for variant, src in variants.items():  # all started first; each measured in turn, the others idle
                servers[variant] = Server(index, src, workers=args.workers if variant == "this tree"
                                          else args.baseline_workers)
                asyncio.run(load(servers[variant].host, servers[variant].port,
                                 http_requests(payloads[names[0]][:1]), 1, 1))
                if variant == "this tree":
                    startup_s = time.perf_counter() - servers[variant].t_start
            for round_ in range(args.rounds):
                order = list(servers) if round_ % 2 == 0 else list(servers)[::-1]  # neither always goes first
                for variant in order:
                    for name, (ms, cpu_ms) in decode_ms(variants[variant], payloads, Path(tmp)).items():
                        decode.setdefault((variant, name), []).append((ms, cpu_ms))
                        print(f"round {round_ + 1}, {variant}: {name} decode + preprocess {ms:.2f} ms, CPU "
                              f"{cpu_ms:.2f} ms (median, one thread)", flush=True)
                for name, pictures in payloads.items():
                    for variant in order:
                        print(f"round {round_ + 1}, {variant}:", flush=True)
                        runs.setdefault((variant, name), []).append(
                            measure_payload(servers[variant], name, pictures, args, Path(tmp)))
            server = servers["this tree"]
            mnist_requests = http_requests(mnist_pictures(1000))
            for clients in [int(c) for c in args.clients.split(",") if c]:
                cpu0 = cpu_seconds(server.pid)
                row = asyncio.run(load(server.host, server.port, mnist_requests, clients, args.requests))
                row["cpu_ms"] = (cpu_seconds(server.pid) - cpu0) / max(1, row["answered"]) * 1000
                rows.append(row)
                print(f"{clients:3d} clients (mnist, asyncio): p50 {row['p50_ms']:.2f} ms, p99 "
                      f"{row['p99_ms']:.2f} ms, {row['qps']:,.0f} q/s, {row['errors']} errors", flush=True)
            if args.long:
                stop = threading.Event()

                def sample():
                    t0 = time.perf_counter()
                    while not stop.is_set():
                        samples.append((time.perf_counter() - t0, rss_mib(server.pid)))
                        stop.wait(0.5)

                sampler = threading.Thread(target=sample)
                sampler.start()
                cpu0 = cpu_seconds(server.pid)
                long_row = asyncio.run(load(server.host, server.port, mnist_requests, 32, args.long))
                long_row["cpu_ms"] = (cpu_seconds(server.pid) - cpu0) / max(1, long_row["answered"]) * 1000
                stop.set()
                sampler.join()
                samples.append((samples[-1][0] + 0.01, rss_mib(server.pid)))
            health = server.health()
        finally:
            for server in servers.values():
                server.stop()
    load_after = os.getloadavg()[0]

    lines = [
        f"## Serving: `retrieval serve` under load on loopback, by payload ({dt.date.today().isoformat()}, CPU)",
        "",
        f"Machine: {machine()}. `benchmarks/serve.py --payloads {args.payloads} --pictures {args.pictures} "
        f"--duration {args.duration:g} --rounds {args.rounds}"
        + (f" --workers {args.workers}" if args.workers > 1 else "")
        + (f" --baseline-workers {args.baseline_workers}" if args.baseline_workers > 1 else "")
        + f"`. Tower: {how}. One picture per POST /query (multipart, k=5), {args.pictures} distinct pictures per "
        f"payload in rotation; 1 client: {args.one_client} sequential requests on one keep-alive connection; "
        f"{args.many} clients: "
        + ("wrk -t2 --latency (a Lua script rotating the bodies)" if shutil.which("wrk") and not args.no_wrk
           else "the asyncio client") +
        f", {args.duration:g} s. Decode + preprocess: the service's decode_upload on 60 of the pictures twice, one "
        f"thread, in a new process importing the server's source tree. "
        + (f"Both servers run at once; in each of {args.rounds} round(s) each payload is measured on one, then the "
           "other (the first alternating), the other idle; medians of the rounds. " if len(variants) > 1 else
           f"Medians of {args.rounds} round(s). ") +
        f"Load generators on the same cores as the servers. Other jobs shared the machine: load average "
        f"{load_before:.1f} before the run, {load_after:.1f} after it.",
        "",
        "| server | payload | decode + preprocess ms, 1 thread (CPU ms) | 1 client p50 ms | "
        f"{args.many} clients q/s | p50 ms | p99 ms | errors | server CPU ms/query |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name in names:
        for variant in variants:
            r = median_row(runs[variant, name])
            ms, cpu_ms = (statistics.median(column) for column in zip(*decode[variant, name]))
            lines.append(f"| {variant} | {PAYLOAD_TEXT[name]} | {ms:.2f} ({cpu_ms:.2f}) | {r['one_p50_ms']:.2f} | "
                         f"{r['qps']:,.0f} | {r['p50_ms']:.1f} | {r['p99_ms']:.1f} | {r['errors']} | "
                         f"{r['cpu_ms']:.2f} |")
    if "baseline" in variants:
        ratios = []
        for name in names:
            this, base = median_row(runs["this tree", name]), median_row(runs["baseline", name])
            decode_ratio = (statistics.median(ms for ms, _ in decode["this tree", name])
                            / statistics.median(ms for ms, _ in decode["baseline", name]))
            ratios.append(f"{PAYLOAD_TEXT[name]}: {this['qps'] / base['qps']:.2f}x the queries/s at {args.many} "
                          f"clients, p99 {this['p99_ms'] / base['p99_ms']:.2f}x, one-client p50 "
                          f"{this['one_p50_ms'] / base['one_p50_ms']:.2f}x, decode + preprocess {decode_ratio:.2f}x")
        lines += ["", "This tree against the baseline (medians): " + "; ".join(ratios) + "."]
    if rows or long_row:
        lines += ["", "mnist payload, asyncio client:", "",
                  "| clients | requests | p50 ms | p99 ms | queries/s | errors | server CPU ms/query |",
                  "|---|---|---|---|---|---|---|"]
        for r in [*rows, *([{**long_row, "clients": "32 (long run)"}] if long_row else [])]:
            lines.append(f"| {r['clients']} | {r['requests']:,} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} | "
                         f"{r['qps']:,.0f} | {r['errors']} | {r['cpu_ms']:.2f} |")
    if cold_s is not None:
        lines += ["", f"CLI cold start for one query (`retrieval query --index DIR --json mnist:test[0]`, a new "
                      f"process): {cold_s:.2f} s median of {args.cold_repeats}, peak RSS {cold_rss:.0f} MiB. The "
                      f"server starts in {startup_s:.1f} s (to its first answer) and then answers in milliseconds."]
    if samples:
        first_q = [s for t, s in samples if t <= samples[-1][0] / 4]
        last_q = [s for t, s in samples if t >= samples[-1][0] * 3 / 4]
        batching = health.get("batching", {})
        lines += ["", f"Server RSS over the {args.long:,}-request run: {samples[0][1]:.0f} MiB at the start, "
                      f"{statistics.mean(first_q):.0f} MiB mean over the first quarter, "
                      f"{statistics.mean(last_q):.0f} MiB over the last quarter, "
                      f"{max(s for _, s in samples):.0f} MiB at most, {samples[-1][1]:.0f} MiB at the end "
                      f"({len(samples)} samples). Micro-batching over the whole benchmark: "
                      f"{batching.get('jobs', 0):,} queries in {batching.get('batches', 0):,} batches (mean "
                      f"{batching.get('mean_jobs_per_batch', 0)} queries per tower forward and Faiss search, largest "
                      f"{batching.get('largest_batch', 0)})."]
    text = "\n".join(lines)
    print("\n" + text)
    if not args.no_readme:
        append_section(lines)
        print("\nappended to benchmarks/history.md")


if __name__ == "__main__":
    main()
