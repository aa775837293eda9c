"""The `retrieval` command line: a thin typer layer over retrieval.workflows (each group lives in its own module).

Function-level imports in the command modules keep `retrieval --help` fast: torch, Faiss and the workflows are
imported only when a command runs.
"""

from __future__ import annotations

import os
import sys
import traceback

import typer

from retrieval.errors import RetrievalError, as_cli_message
from retrieval.logs import setup_cli_logging

app = typer.Typer(
    name="retrieval",
    help=(
        "Metric-learning retrieval: train a Siamese tower on labelled images, index its embeddings with Faiss, "
        "query similar images, classify from a few examples and measure it all.\n\n"
        "Add --debug (or set RETRIEVAL_DEBUG=1) to see tracebacks."
    ),
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _print_version(value: bool) -> None:
    if value:
        import retrieval

        print(f"retrieval {retrieval.__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Only warnings and errors on stderr; no progress bars."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Also debug messages on stderr."),
    version: bool = typer.Option(False, "--version", help="Print the version and exit.", callback=_print_version,
                                 is_eager=True),
) -> None:
    setup_cli_logging(-1 if quiet else 1 if verbose else 0)


def _register() -> None:
    # Each module adds its commands/groups to `app`.
    for name in ("data", "train", "index", "evaluate", "fewshot", "export", "quickstart", "serve", "gate"):
        __import__(f"retrieval.cli.{name}")


_register()


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = os.environ.get("RETRIEVAL_DEBUG", "") not in ("", "0")
    if "--debug" in argv:
        argv.remove("--debug")
        debug = True
    setup_cli_logging()  # before the callback runs: options are parsed first, and may already fail
    try:
        # not standalone: usage errors reach us, to be one line like every other error (typer draws a boxed panel)
        code = app(args=argv, prog_name="retrieval", standalone_mode=False)
    except typer.Abort:  # Ctrl-C outside a command's own handling
        print("\nAborted!", file=sys.stderr)
        sys.exit(1)
    except typer.TyperException as e:  # a usage error (exit 2): bad option value, missing argument, no such command
        ctx = getattr(e, "ctx", None)
        message = " ".join(e.format_message().split()) if hasattr(e, "format_message") else str(e)
        hint = f" (see `{ctx.command_path} -h`)" if ctx is not None else ""
        print(f"error: {message}{hint}", file=sys.stderr)
        sys.exit(getattr(e, "exit_code", 2))
    except RetrievalError as e:
        if debug:
            traceback.print_exc()
        print(f"error: {as_cli_message(str(e))}", file=sys.stderr)
        sys.exit(e.exit_code)
    except Exception as e:  # an unexpected failure (a bug): one line unless --debug
        if debug:
            raise
        print(f"error: {type(e).__name__}: {e} (rerun with --debug for the traceback)", file=sys.stderr)
        sys.exit(1)
    sys.exit(code if isinstance(code, int) else 0)  # typer.Exit(code) returns its code when not standalone
