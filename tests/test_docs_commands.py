"""The commands and Python snippets of README.md and docs/*.md, run as written, so the docs cannot go stale silently.

Every command in a ```bash block, every `$ ` line of a ```text transcript and every ```python block is either run
or skipped with its reason, by the first rule of RULES it matches; a command no rule matches fails
`test_every_command_in_the_docs_has_a_rule` (so a new command in the docs is run or its skip is explained), and a
rule matching no command fails too (so the list stays the docs' own). Skipped commands show up as skipped tests
with their reason (`pytest -ra`).

What stands in for the user's machine: a work folder holding examples/ (the pictures the docs use), a small MNIST
data root (RETRIEVAL_DATA_ROOT: the first TRAIN_IMAGES / TEST_IMAGES images of each split, so `--data mnist:train`
as written embeds a few thousand images, not 60,000) and runs/mnist-default, a 1-epoch tower trained by the
documented `retrieval train --config mnist-default` on a subset (the trained run the docs assume). Commands of one
doc file run in the order written, in one work folder shared by the session (a later command uses what an earlier
one built, as a reader's would).
"""

from __future__ import annotations

import contextlib
import importlib.util
import inspect
import io
import logging
import os
import re
import shlex
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest

from repo_scripts import REPO
from retrieval.cli import main

DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
TRAIN_IMAGES, TEST_IMAGES = 2560, 600  # the small data root: IVF256 (docs/large-indexes.md) gets 10 per list
TINY_TRAINING = ["--set", "data.subset=600", "--set", "data.val_size=200", "--set", "train.epochs=1"]

OPTIONAL_MODULES = ("onnx", "onnxruntime")  # the `export` extra: a command naming one is left out where it is missing
RUN = "run"  # run with the small data root
RUN_FULL_DATA = "run against the test run's full, verified MNIST root"  # `data fetch` verifies the real files

# (pattern matched at the start of a command or snippet, RUN / RUN_FULL_DATA or the reason it is skipped)
RULES: list[tuple[str, str]] = [
    (r"python3 -m venv \.venv && \.venv/bin/pip install -e \. ", "creates a venv, installs, then quickstart trains "
     "both recipes for minutes (tests/test_quickstart.py runs quickstart --tiny)"),
    (r"python3 -m venv \.venv && \.venv/bin/pip install -e '\.\[test\]'", "installs and runs the whole suite "
     "(.ci/run does exactly this)"),
    (r"pip (install|uninstall)", "changes the installed packages (GPU Faiss)"),
    (r"retrieval data fetch ", RUN_FULL_DATA),
    (r"retrieval data info ", RUN),
    (r"retrieval quickstart", "fetches and trains both shipped recipes for minutes (tests/test_quickstart.py runs "
     "quickstart --tiny)"),
    (r"retrieval train --config mnist-default$", "12 epochs on 55,000 images; the session's runs/mnist-default is "
     "this command with " + " ".join(TINY_TRAINING[1::2])),
    (r"retrieval index build --checkpoint runs/mnist-default ", RUN),
    (r"retrieval index info ", RUN),
    (r"retrieval index tune ", RUN),
    (r"retrieval query ", RUN),
    (r"retrieval evaluate ", RUN),
    (r"retrieval fewshot ", RUN),
    (r"retrieval export ", RUN),
    (r"retrieval gate train ", "trains the digit-or-not gate for minutes (tests/test_gate.py trains "
     "a small one)"),
    (r"retrieval index build --checkpoint runs/mnist-robust-gate ", "needs the gate run of `retrieval gate train`"),
    (r"retrieval calibrate --index indexes/robust ", "needs indexes/robust, built from the gate run"),
    (r"retrieval serve ", "starts a server that runs until stopped (tests/test_serve.py starts one)"),
    (r"curl ", "needs the server of `retrieval serve` (tests/test_serve.py sends these requests)"),
    (r"torchrun ", "launches several processes (tests/test_distributed.py runs torchrun on 2 processes)"),
    (r"import logging\nfrom retrieval import workflows", RUN),
    (r"import numpy as np, onnxruntime as ort", RUN),
]


@dataclass(frozen=True)
class DocCommand:
    doc: Path
    line: int
    kind: str  # "shell" or "python"
    text: str

    @property
    def name(self) -> str:
        first = self.text.splitlines()[0]
        return f"{self.doc.name}:{self.line} {first[:70]}"

    def rule(self) -> str | None:
        return next((how for pattern, how in RULES if re.match(pattern, self.text)), None)


def _joined(lines: list[tuple[int, str]]) -> list[tuple[int, str]]:
    """Shell lines with their backslash continuations joined: (line number of the first, text)."""
    out: list[tuple[int, str]] = []
    pending: tuple[int, str] | None = None
    for number, text in lines:
        start, so_far = pending or (number, "")
        text = so_far + text.strip()
        if text.endswith("\\"):
            pending = (start, text[:-1].rstrip() + " ")
        else:
            pending = None
            out.append((start, text))
    return out


def doc_commands(doc: Path) -> list[DocCommand]:
    """The commands of one doc file, in order: ```bash lines (comments dropped), `$ ` lines of ```text
    transcripts (their output left out) and ```python blocks whole."""
    commands: list[DocCommand] = []
    lines = doc.read_text("utf-8").splitlines()
    i = 0
    while i < len(lines):
        fence = re.match(r"^```(\w*)\s*$", lines[i])
        if not fence:
            i += 1
            continue
        lang, start = fence.group(1), i + 1
        end = next(j for j in range(start, len(lines)) if lines[j].startswith("```"))
        body = [(j + 1, lines[j]) for j in range(start, end)]
        if lang == "python":
            commands.append(DocCommand(doc, start, "python", "\n".join(text for _, text in body)))
        elif lang in ("bash", "text"):
            shell = _transcript_commands(body) if lang == "text" else \
                [(n, t) for n, t in body if t.strip() and not t.lstrip().startswith("#")]
            for number, text in _joined(shell):
                commands.append(DocCommand(doc, number, "shell", _without_comment(text)))
        i = end + 1
    return commands


def _transcript_commands(body: list[tuple[int, str]]) -> list[tuple[int, str]]:
    """The `$ ` lines of a transcript and their backslash continuations; the rest is output."""
    shell: list[tuple[int, str]] = []
    continued = False
    for number, text in body:
        if text.startswith("$ ") or continued:
            shell.append((number, text[2:] if text.startswith("$ ") else text))
            continued = text.rstrip().endswith("\\")
    return shell


def _without_comment(line: str) -> str:
    """The line without a trailing `# comment` (a # inside quotes stays)."""
    quote, cut = None, len(line)
    for at, char in enumerate(line):
        if quote:
            quote = None if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char == "#" and (at == 0 or line[at - 1].isspace()):
            cut = at
            break
    return line[:cut].rstrip()


ALL = [command for doc in DOCS for command in doc_commands(doc)]


def test_every_command_in_the_docs_has_a_rule():
    assert len(ALL) > 20, f"found only {len(ALL)} commands: is the parsing still right?"
    unruled = [c.name for c in ALL if c.rule() is None]
    assert not unruled, f"commands in the docs with no rule in RULES (run them or say why not): {unruled}"
    unused = [pattern for pattern, _ in RULES if not any(re.match(pattern, c.text) for c in ALL)]
    assert not unused, f"rules matching no command of the docs (remove them): {unused}"


@pytest.mark.parametrize("command", [c for c in ALL if c.rule() not in (RUN, RUN_FULL_DATA)], ids=lambda c: c.name)
def test_skipped_doc_command(command):
    pytest.skip(f"{command.name}: {command.rule()}")


# -- the stand-in machine ------------------------------------------------------------------------------------------
def _call_cli(args: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main(args)
            code = 0
        except SystemExit as stop:
            code = 0 if stop.code is None else stop.code
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="session")
def workspace(tmp_path_factory, data_root):
    """A work folder as the docs assume one: examples/, a small MNIST root and the trained runs/mnist-default."""
    from retrieval.data.fetch import FILES
    from retrieval.data.idx import read_idx, write_idx

    work = tmp_path_factory.mktemp("docs")
    shutil.copytree(REPO / "examples", work / "examples", ignore=shutil.ignore_patterns("*.py", "__pycache__"))
    small = work / "data"
    (small / "mnist").mkdir(parents=True)
    for name in FILES:
        keep = TRAIN_IMAGES if name.startswith("train") else TEST_IMAGES
        write_idx(small / "mnist" / name, read_idx(Path(data_root) / "mnist" / name)[:keep])
    here = os.getcwd()
    os.chdir(work)
    try:
        code, _, err = _call_cli(["train", "--config", "mnist-default", "--out", "runs/mnist-default", "--root",
                                  str(small), *TINY_TRAINING])
    finally:
        os.chdir(here)
    assert code == 0, err[-3000:]
    shutil.copytree(work / "runs" / "mnist-default", work / "runs" / "mnist-fewshot")  # for the TorchScript export
    return {"work": work, "small": small, "full": Path(data_root)}


def _run_shell(command: DocCommand) -> str:
    args = shlex.split(command.text)
    assert args[0] == "retrieval" and not set(args) & {"&&", "|", ";", ">"}, f"not one retrieval command: {command}"
    code, out, err = _call_cli(args[1:])
    assert code == 0, f"{command.name} failed as written (exit {code}):\n{err[-3000:]}"
    return out


def _run_python(command: DocCommand, monkeypatch, capsys) -> str:
    """Runs a snippet in a fresh namespace. The README's `workflows.train` (12 epochs) is the one call that stands
    in: it checks the config name as the real one would and answers the session's trained run folder."""
    from retrieval import workflows

    real_train = workflows.train

    def train_stand_in(config, out_dir=None, **options):
        inspect.signature(real_train).bind(config, out_dir, **options)
        workflows.resolve_config_path(config)  # the shipped config the snippet names exists
        assert Path(out_dir).is_dir(), f"the session has no trained run at {out_dir}"
        return Path(out_dir)

    monkeypatch.setattr(workflows, "train", train_stand_in)
    root_level = logging.getLogger().level
    try:
        exec(compile(command.text, command.name, "exec"), {"__name__": "__doc_snippet__"})
    finally:
        logging.getLogger().setLevel(root_level)
    out = capsys.readouterr().out
    assert "None" not in out.split(), f"{command.name} printed None:\n{out}"
    return out


@pytest.mark.parametrize("doc", [d for d in DOCS if any(c.rule() in (RUN, RUN_FULL_DATA) for c in doc_commands(d))],
                         ids=lambda d: d.name)
def test_doc_commands_run_as_written(doc, workspace, monkeypatch, capsys):
    monkeypatch.chdir(workspace["work"])
    missing = []  # commands needing an optional module this environment lacks (the `export` and `test` extras)
    for command in doc_commands(doc):
        how = command.rule()
        if how not in (RUN, RUN_FULL_DATA):
            continue
        needs = [m for m in OPTIONAL_MODULES if m in command.text and importlib.util.find_spec(m) is None]
        if needs:
            missing.append(f"{command.name} (no {', '.join(needs)})")
            continue
        root = workspace["full"] if how == RUN_FULL_DATA else workspace["small"]
        monkeypatch.setenv("RETRIEVAL_DATA_ROOT", str(root))
        if command.kind == "python":
            _run_python(command, monkeypatch, capsys)
        else:
            _run_shell(command)
    if missing:
        pytest.skip(f"the rest ran; not run: {missing}")
