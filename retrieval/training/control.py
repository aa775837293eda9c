"""What steers a training from outside the loop: CPU threads, Ctrl-C, and the words for a lost process."""

from __future__ import annotations

import contextlib
import logging
import signal
import sys
import threading
from pathlib import Path

import torch
from tqdm import tqdm

from retrieval.distributed import ProcessGroup
from retrieval.embed import available_cores
from retrieval.errors import UsageError

logger = logging.getLogger(__name__)

STOP_CHECK_STEPS = 10  # distributed: how often the processes agree on stopping (Ctrl-C)


def above_bars(msg: str, level: int = logging.INFO) -> None:
    """Log `msg` with any progress bar on stderr cleared first and redrawn after."""
    with tqdm.external_write_mode(file=sys.stderr):
        logger.log(level, msg)


@contextlib.contextmanager
def cpu_threads(device: torch.device, threads: int | None = None):
    """On CPU use `threads` (default: every core this process may run on); restore the caller's setting after."""
    if device.type != "cpu":
        yield
        return
    if threads is not None and threads < 1:
        raise UsageError(f"`threads` must be a positive number, got {threads}")
    before = torch.get_num_threads()
    torch.set_num_threads(threads or available_cores())
    try:
        yield
    finally:
        torch.set_num_threads(before)


class TrainingInterrupted(KeyboardInterrupt):
    """Raised by Trainer.run after Ctrl-C once `last` and the training state are saved (or could not be)."""

    def __init__(self, message: str, saved: bool, run_dir: Path):
        super().__init__(message)
        self.message, self.saved, self.run_dir = message, saved, run_dir


class StopRequest:
    """First Ctrl-C: finish the current step, save, stop. Second Ctrl-C: stop at once (state not saved)."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        above_bars("\nCtrl-C: stopping after this step and saving (press again to stop at once, without saving)")

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


def lost_contact_message(group: ProcessGroup, e: BaseException, where: str) -> str:
    reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
    return (f"rank {group.rank} of {group.world_size}: distributed training stopped {where}: another process of the "
            f"job failed or stopped answering within {group.timeout_s:g}s ({reason}); the run folder keeps the state "
            "saved at the last finished epoch (or Ctrl-C): `resume` continues from it, with any number of processes")
