"""Crash safety, proved from outside: the real CLI runs as a subprocess over an existing index folder or report
and is killed with SIGKILL, at seeded random moments spread over its whole run (start-up, data loading,
embedding, writing) and right after each step of its save (the test watches the folder and kills when it sees
the step). After every kill the folder must hold the old result or the new one, whole: loadable, and equal to one
of them. No test hook in the product: the test only watches the file system, as any observer could.

A save's steps (renames, unlinks) follow each other within microseconds, too fast to kill between them reliably.
Where strace works, the CLI runs under it in slow motion: strace holds every rename and unlink for STEP_DELAY_US
before letting it run (nothing else changes), so the test sees each step and kills before the next. Without it the
same kills are attempted at natural speed, where they cannot be sure to land between the steps: those tests then
end as skipped, saying what is missing (the report test, which cannot see the swap without it, skips at once);
with RETRIEVAL_REQUIRE_STRACE set (CI sets it) they fail at once instead.
"""

from __future__ import annotations

import functools
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from cli_helpers import run_cli

from retrieval import workflows
from retrieval.checkpoint import save_checkpoint
from retrieval.errors import RetrievalError
from retrieval.fsutil import exclusive_lock
from retrieval.index import META_NAME, is_index_folder_content, load_index, save_index
from retrieval.reports import REPORT_FILES, check_report_target, exchange_paths
from retrieval.towers import build_tower
from retrieval.workflows import Selection

RUN_TIMEOUT_S = 120  # one CLI run; they take a few seconds
MUTATIONS = "rename,renameat,renameat2,unlink,unlinkat,rmdir"  # the syscalls that change what a folder names
STEP_DELAY_US = 50_000
REQUIRE_STRACE = "RETRIEVAL_REQUIRE_STRACE"


# -- running and killing the CLI --------------------------------------------------------------------------------
@functools.cache
def _strace() -> tuple[tuple[str, ...] | None, str]:
    """(the strace command line that delays every rename/unlink of the program it runs, "") where strace works
    here, else (None, what is missing)."""
    exe = shutil.which("strace")
    if exe is None:
        return None, "strace is not installed (apt-get install strace)"
    cmd = (exe, "-f", "--seccomp-bpf", "-qq", "-o", os.devnull, "-e", f"trace={MUTATIONS}",
           "-e", f"inject={MUTATIONS}:delay_enter={STEP_DELAY_US}")
    probe = "import os, tempfile; os.rmdir(tempfile.mkdtemp())"
    start = time.perf_counter()
    try:
        proc = subprocess.run([*cmd, sys.executable, "-c", probe], capture_output=True, text=True, timeout=60,
                              check=False)
    except (OSError, subprocess.TimeoutExpired) as e:
        return None, f"{exe} could not run a probe: {e}"
    if proc.returncode != 0:
        said = (proc.stderr.strip().splitlines() or [f"exit status {proc.returncode}"])[0]
        return None, (f"{exe} cannot trace here ({said}; tracing needs ptrace: in a container, the SYS_PTRACE "
                      "capability and a seccomp profile that allows it)")
    if time.perf_counter() - start < STEP_DELAY_US / 1e6:
        return None, f"{exe} ran the probe without delaying its rmdir (needs strace >= 5.3: --seccomp-bpf, inject delay)"
    return cmd, ""


def slow_motion() -> tuple[str, ...] | None:
    """The strace command line of the slow motion, None where strace cannot give it."""
    return _strace()[0]


def require_slow_motion(skip: bool = False) -> None:
    """At a test's start: fail at once when slow motion is unavailable but required (CI); with `skip`, skip the
    test when it is unavailable and not required (a test that cannot observe the save without it)."""
    if slow_motion() is None and os.environ.get(REQUIRE_STRACE):
        pytest.fail(f"{_strace()[1]}, but {REQUIRE_STRACE} is set: kills between a save's steps cannot be made")
    if slow_motion() is None and skip:
        pytest.skip(f"needs strace's slow motion to see the steps of the swap: {_strace()[1]} "
                    f"(set {REQUIRE_STRACE}=1 to fail instead)")


def skip_unless_slow_motion() -> None:
    """At a test's end, after the checks that hold at natural speed: say so when the between-steps ones could not
    run (a skip names what is missing)."""
    if slow_motion() is None:
        pytest.skip(f"kills between the save's steps not checked: {_strace()[1]} "
                    f"(set {REQUIRE_STRACE}=1 to fail instead)")


def _env(data_root) -> dict:
    return {**os.environ, "RETRIEVAL_DATA_ROOT": str(data_root)}


class Child:
    """`python -m retrieval ARGS` as a subprocess (under slow_motion() where available); kill() SIGKILLs the CLI
    process itself, and finish() returns once it is gone: -SIGKILL when killed, else its exit status."""

    def __init__(self, args, data_root, log: Path | None = None):
        self.wrapped = slow_motion() is not None
        cmd = [*(slow_motion() or ()), sys.executable, "-m", "retrieval", *map(str, args)]
        self.log = log
        with open(log or os.devnull, "w") as err:
            self.proc = subprocess.Popen(cmd, env=_env(data_root), stdout=subprocess.DEVNULL, stderr=err)
        self.start = time.perf_counter()
        self._pid = None if self.wrapped else self.proc.pid

    def running(self) -> bool:
        return self.proc.poll() is None

    def _cli_pid(self) -> int | None:
        while self._pid is None and self.running():  # strace's child is the CLI
            try:
                children = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read_text().split()
            except OSError:
                children = []
            if children:
                self._pid = int(children[0])
            else:
                time.sleep(0.001)
        return self._pid

    def kill(self) -> None:
        pid = self._cli_pid()
        if pid is not None and self.running():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def finish(self) -> int:
        return self.proc.wait(timeout=RUN_TIMEOUT_S)

    def output(self) -> str:
        return self.log.read_text()[-3000:] if self.log else ""


def drive(child: Child, watch=None, *, at: float | None = None, when: Callable[[], bool] | None = None) -> int:
    """Poll `watch` while `child` runs; SIGKILL it `at` seconds after its start or as soon as `when()` holds.
    Returns its exit status."""
    try:
        while child.running():
            if watch is not None:
                watch.poll()
            now = time.perf_counter()
            if (at is not None and now - child.start >= at) or (when is not None and when()):
                child.kill()
                break
            assert now - child.start < RUN_TIMEOUT_S, "the CLI run does not end"
            time.sleep(watch.pause if watch is not None else 0.0005)
    except BaseException:
        child.kill()  # leave nothing running
        child.finish()
        raise
    code = child.finish()
    if at is None and when is None:
        assert code == 0, child.output()
    return code


# -- fixtures ---------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def base(tmp_path_factory, data_root):
    """Two random-init towers (different seeds) and a 200-image index of mnist:test built with the first."""
    base = tmp_path_factory.mktemp("atomicity")
    for name, seed in (("run_a", 0), ("run_b", 1)):
        torch.manual_seed(seed)
        save_checkpoint(base / name / "best", build_tower("default"))
    workflows.build_index(base / "run_a", Selection(["mnist:test"], root=data_root, subset=200), base / "index")
    return base


# -- index folders ----------------------------------------------------------------------------------------------
def _snapshot(folder: Path, queries: np.ndarray) -> tuple:
    """Everything a user of the index sees: count, ids, labels, sources, classes, tower, and a query's answer."""
    index = load_index(folder)  # whole: meta.json, both data files and their checksums agree
    dist, ids = index.search(queries, 5)
    return (len(index), index.ids.tobytes(), index.labels.tobytes(), tuple(index.sources), tuple(index.classes),
            index.meta["tower"]["fingerprint"], ids.tobytes(), np.round(dist, 5).tobytes())


def _leftovers(folder: Path) -> list[str]:
    """Files of the folder that its meta.json does not name (all of them must be the index's own files)."""
    meta = (folder / META_NAME).read_text()
    extra = sorted(p.name for p in folder.iterdir()
                   if p.name not in (META_NAME, ".lock") and json.dumps(p.name) not in meta)
    assert all(is_index_folder_content(name) for name in extra), extra
    return extra


def _inode(path: Path) -> int | None:
    try:
        return os.stat(path).st_ino
    except FileNotFoundError:
        return None


class IndexWatch:
    """Polls an index folder. `started`: a file the save writes (a temp file) appeared. `steps`: how many times
    what the folder names changed since (a file renamed into place, meta.json replaced, an old file deleted):
    each is one rename or unlink of the save. `commit`: the step that replaced meta.json."""

    pause = 0.0002

    def __init__(self, folder: Path):
        self.folder = folder
        self.before = set(os.listdir(folder))
        self.state = self._state()
        self.started = False
        self.steps = 0
        self.commit = None
        self.last = None  # when the folder last changed

    def _state(self):
        return frozenset(n for n in os.listdir(self.folder) if not n.startswith(".")), _inode(self.folder / META_NAME)

    def poll(self) -> None:
        listing = set(os.listdir(self.folder))
        if not self.started and listing - self.before:
            self.started, self.last = True, time.perf_counter()
        state = self._state()
        if state != self.state:
            if state[1] != self.state[1] and self.commit is None:
                self.commit = self.steps + 1
            self.state, self.steps, self.last = state, self.steps + 1, time.perf_counter()


def _kill_loop(base: Path, tmp_path: Path, data_root, args: Callable[[Path], list], *, anywhere: int,
               steps: int, seed: int, last_run: bool) -> list:
    """Run `args(folder)` over a copy of the old index: `anywhere` kills at random moments, and `steps` kills
    right after steps of the save (when it begins and around its commit, the others drawn at random), then one
    after its first step; old-or-new after each. With `last_run`, a whole run then follows the last kill."""
    require_slow_motion()
    folder = tmp_path / "index"
    shutil.copytree(base / "index", folder)
    old_index = load_index(folder)
    queries = np.random.default_rng(seed).standard_normal((8, old_index.dimension)).astype(np.float32)
    old = _snapshot(folder, queries)

    clean = IndexWatch(folder)
    child = Child(args(folder), data_root, log=tmp_path / "clean.log")
    drive(child, clean)
    new = _snapshot(folder, queries)
    assert new != old and _leftovers(folder) == []
    assert clean.started and clean.commit and clean.steps >= 3, f"saw too little of the save: {clean.steps} steps"
    saved = clean.last - child.start  # when the save ended (the process then tears down for a while)

    rng = random.Random(seed)
    # 0: the save began (a temp file); k: after its k-th step (after the last one, the new index is complete)
    must = sorted({0, clean.commit - 1, clean.commit} - {1})  # just before and just after the commit
    others = [k for k in range(clean.steps) if k not in must and k != 1]
    points = must + rng.sample(others, max(0, min(steps - len(must), len(others))))
    plan = [("anywhere", rng.uniform(0, saved)) for _ in range(anywhere)] + [("step", k) for k in points]
    rng.shuffle(plan)
    plan.append(("step", 1))  # last: a kill that leaves the old index and the new data files (see the end)
    outcomes = []
    for kind, value in plan:
        save_index(old_index, folder)  # back to the old index (a successful save)...
        assert _snapshot(folder, queries) == old
        assert _leftovers(folder) == []  # ...which removed whatever the killed run left
        watch = IndexWatch(folder)
        child = Child(args(folder), data_root)
        if kind == "anywhere":
            code = drive(child, watch, at=value)
            where = f"at {value:.3f}s (the save ends at {saved:.3f}s)"
        else:
            code = drive(child, watch, when=lambda w=watch, k=value: w.started and w.steps >= k)
            where = f"after step {value} of {clean.steps} of the save (step {clean.commit} commits)"
        assert code in (-signal.SIGKILL, 0), (code, where)
        try:
            snap = _snapshot(folder, queries)
        except (RetrievalError, OSError, ValueError, KeyError) as e:
            pytest.fail(f"killed {where}: the folder holds no whole index: {e}\nso far: {outcomes}")
        assert snap in (old, new), f"killed {where}: the folder holds neither the old nor the new index"
        outcomes.append((kind, "killed" if code else "finished", "old" if snap == old else "new",
                         len(_leftovers(folder)), where))

    print(*outcomes, sep="\n")
    in_save = [o for o in outcomes if o[1] == "killed" and o[3]]  # the kill left a save's files behind
    assert len(in_save) >= 2, f"too few kills landed inside the save: {outcomes}"
    if slow_motion():
        assert all(o[1] == "killed" for o in outcomes if o[0] == "step"), outcomes
        # killed before the commit, and after it (the old data files not yet deleted)
        assert {("old", True), ("new", True)} <= {(o[2], o[3] > 0) for o in outcomes}, outcomes
    if last_run:  # the next CLI run over what the last kill left (the new data files) saves the new index, cleanly
        assert outcomes[-1][1:3] == ("killed", "old") and outcomes[-1][3] > 0 or not slow_motion(), outcomes[-1]
        drive(Child(args(folder), data_root, log=tmp_path / "last.log"))
        assert _snapshot(folder, queries) == new and _leftovers(folder) == []
    skip_unless_slow_motion()
    return outcomes


def test_index_build_killed_at_any_moment_leaves_the_old_or_the_new_index(tmp_path, base, data_root):
    def args(folder):
        return ["index", "build", "--checkpoint", base / "run_b", "--data", "mnist:test", "--subset", 120,
                "--seed", 9, "--out", folder]

    _kill_loop(base, tmp_path, data_root, args, anywhere=2, steps=4, seed=1, last_run=True)


def test_index_add_killed_at_any_moment_leaves_the_old_or_the_new_index(tmp_path, base, data_root):
    def args(folder):
        return ["index", "add", "--index", folder, "--data", "mnist:train", "--subset", 100]

    _kill_loop(base, tmp_path, data_root, args, anywhere=1, steps=3, seed=2, last_run=False)


def test_a_second_writer_fails_at_once_and_leaves_the_index_alone(tmp_path, base, data_root):
    folder = shutil.copytree(base / "index", tmp_path / "index")
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    build = ["index", "build", "--checkpoint", base / "run_b", "--data", "mnist:test", "--out", folder, "--subset"]
    with exclusive_lock(folder):  # another writer holds the folder (a real flock, as `index build` takes it)
        proc = subprocess.run([sys.executable, "-m", "retrieval", *map(str, [*build, 50])], env=_env(data_root),
                              capture_output=True, text=True, timeout=RUN_TIMEOUT_S, check=False)
    assert proc.returncode == 1 and "is being written by another process" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    # two builds started together: each one wins whole or fails clearly; the folder holds a winner
    procs = [subprocess.Popen([sys.executable, "-m", "retrieval", *map(str, [*build, n])], env=_env(data_root),
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for n in (60, 90)]
    results = [(p.wait(timeout=RUN_TIMEOUT_S), p.stderr.read()) for p in procs]
    for p in procs:
        p.stderr.close()
    assert all(code == 0 or (code == 1 and "is being written by another process" in err) for code, err in results)
    winners = {n for n, (code, _) in zip((60, 90), results) if code == 0}
    assert winners and len(load_index(folder)) in winners and _leftovers(folder) == []


# -- report folders ---------------------------------------------------------------------------------------------
def _report_state(out: Path) -> tuple[bytes, bytes, tuple]:
    """A complete report: metrics.json parses, summary.md and every plot are there. (metrics, summary, files)."""
    assert out.is_dir(), f"no report at {out}"
    metrics = (out / "metrics.json").read_bytes()
    json.loads(metrics)
    summary = (out / "summary.md").read_bytes()
    assert summary.startswith(b"# Retrieval evaluation")
    names = tuple(sorted(p.name for p in out.iterdir()))
    assert set(names) <= set(REPORT_FILES) and all((out / n).stat().st_size > 0 for n in names)
    return metrics, summary, names


class ReportWatch:
    """Polls a report's parent folder. `ready`: the writer's temp folder holds summary.md, its last file (the
    swap comes next). `steps`: how many times, since, the report folder or the parent's listing changed (the
    swap's renames, the removal of the temp folder). `gaps`: moments the report folder lacked metrics.json or
    summary.md, checked at every poll."""

    pause = 0.0002

    def __init__(self, out: Path):
        self.out, self.parent, self.prefix = out, out.parent, f".{out.name}."
        self.tmp = None
        self.ready = False
        self.steps = 0
        self.state = self._state()
        self.gaps: list[float] = []
        self.done = None  # when the temp folder was gone

    def _state(self):
        return frozenset(os.listdir(self.parent)), _inode(self.out)

    def poll(self) -> None:
        if not (os.path.exists(self.out / "metrics.json") and os.path.exists(self.out / "summary.md")):
            self.gaps.append(time.perf_counter())
        if self.tmp is None:
            names = [n for n in os.listdir(self.parent) if n.startswith(self.prefix) and n.endswith(".tmp")]
            if names:
                self.tmp = self.parent / names[0]
        if self.tmp is not None and not self.ready:
            self.ready = os.path.exists(self.tmp / "summary.md")
            self.state = self._state()
        elif self.ready:
            state = self._state()
            if state != self.state:
                self.state, self.steps = state, self.steps + 1
                if not os.path.exists(self.tmp):
                    self.done = self.done or time.perf_counter()


def test_report_killed_at_any_moment_leaves_a_whole_report(tmp_path, base, data_root, capsys):
    require_slow_motion(skip=True)  # at natural speed the swap is over before a watcher sees its temp folder whole
    out = tmp_path / "reports" / "mnist-test"
    index = base / "index"
    code, _, err = run_cli(capsys, "evaluate", "--index", index, "--queries", "mnist:test", "--subset", 40,
                           "--report", out)
    assert code == 0, err
    template = shutil.copytree(out, tmp_path / "old-report")
    old = _report_state(out)
    args = ["evaluate", "--index", index, "--queries", "mnist:test", "--subset", 60, "--seed", 1, "--report", out]

    clean = ReportWatch(out)
    child = Child(args, data_root, log=tmp_path / "clean.log")
    drive(child, clean)
    new = _report_state(out)
    assert not clean.gaps, "the report folder was missing or incomplete while the run replaced it"
    assert new[0] != old[0]
    assert clean.ready and clean.done, "did not see the report being swapped into place"
    done = clean.done - child.start

    rng = random.Random(3)
    plan = [("anywhere", rng.uniform(0, done))]  # start-up, embedding, searching, plotting, swapping
    # 0: every file written; k: after the k-th step of the swap (after the last one, the clean-up is over)
    plan += [("step", k) for k in range(clean.steps)]
    outcomes = []
    for kind, value in plan:
        shutil.rmtree(out)
        shutil.copytree(template, out)
        for stale in list(out.parent.iterdir()):  # what killed runs left: their temp folders
            if stale.name != out.name:
                shutil.rmtree(stale)
        watch = ReportWatch(out)
        child = Child(args, data_root)
        if kind == "anywhere":
            code = drive(child, watch, at=value)
            where = f"at {value:.3f}s (the report is in place at {done:.3f}s)"
        else:
            code = drive(child, watch, when=lambda w=watch, k=value: w.ready and w.steps >= k)
            where = f"after step {value} of {clean.steps} of the swap"
        assert code in (-signal.SIGKILL, 0), (code, where)
        assert not watch.gaps, f"{where}: the report folder was missing or incomplete while the run replaced it"
        try:
            state = _report_state(out)
        except (AssertionError, OSError, ValueError) as e:
            pytest.fail(f"killed {where}: no whole report: {e}\nso far: {outcomes}")
        assert state in (old, new), f"killed {where}: the report is neither the old nor the new one"
        outcomes.append((kind, "killed" if code else "finished", "old" if state == old else "new", where))
    print(*outcomes, sep="\n")
    swap = [o for o in outcomes if o[0] == "step"]
    assert all(o[1] == "killed" for o in swap), outcomes
    assert {o[2] for o in swap} == {"old", "new"}, f"the kills did not straddle the swap: {outcomes}"


def test_exchange_paths_swaps_two_folders(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    (a / "from_a").write_text("a")
    (b / "from_b").write_text("b")
    if not exchange_paths(a, b):
        pytest.skip("renameat2(RENAME_EXCHANGE) is not available here: reports use the two-rename fallback")
    assert [p.name for p in a.iterdir()] == ["from_b"] and [p.name for p in b.iterdir()] == ["from_a"]
    with pytest.raises(FileNotFoundError):
        exchange_paths(a, tmp_path / "missing")
    assert [p.name for p in a.iterdir()] == ["from_b"] and not (tmp_path / "missing").exists()


def test_report_moved_aside_by_an_interrupted_fallback_swap_is_restored(tmp_path, base, data_root, capsys):
    """Without renameat2 the swap is two renames (report -> .<name>.<random>.tmp.old, new -> report); a crash
    between them leaves no report. The next run puts the previous one back before anything else."""
    out = tmp_path / "mnist-test"
    code, _, err = run_cli(capsys, "evaluate", "--index", base / "index", "--queries", "mnist:test", "--subset", 30,
                           "--report", out)
    assert code == 0, err
    old = _report_state(out)
    os.replace(out, tmp_path / ".mnist-test.k3j_x9a2.tmp.old")  # exactly what the first rename leaves
    check_report_target(out)  # what `evaluate --report` runs first
    assert _report_state(out) == old and sorted(p.name for p in tmp_path.iterdir()) == ["mnist-test"]
    # and a whole run over that state replaces it with the new report, leaving nothing beside it
    os.replace(out, tmp_path / ".mnist-test.k3j_x9a2.tmp.old")
    code, _, err = run_cli(capsys, "evaluate", "--index", base / "index", "--queries", "mnist:test", "--subset", 20,
                           "--report", out)
    assert code == 0, err
    assert json.loads((out / "metrics.json").read_text())["n_queries"] == 20
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mnist-test"]
