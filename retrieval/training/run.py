"""train(): a config -> a run folder, in one process or as one of a torchrun job's processes.

The caller's options become one TrainRequest, built once and handed down: train() joins the process group,
rank 0 (or the only process) resolves the config, checks the run folder and trains in it; the other processes
follow with the config and folder rank 0 sends them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Sequence

import torch

from retrieval.config import Config, config_diff, load_config, resolve_config
from retrieval.distributed import ProcessGroup, is_comm_error, sigterm_as_error
from retrieval.distributed import join as join_process_group
from retrieval.embed import available_cores, resolve_device
from retrieval.errors import RetrievalError, UsageError
from retrieval.fsutil import atomic_write_json, ensure_writable_dir, exclusive_lock, read_json
from retrieval.run_folder import RunFolder
from retrieval.training.control import cpu_threads, lost_contact_message
from retrieval.training.loop import StepInfo, Trainer
from retrieval.training.setup import build_trainer

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainRequest:
    """What one call of train() asks for (see train for each option); device is resolved before training."""

    config: Config | Mapping | str | os.PathLike | None
    out_dir: str | os.PathLike | None = None
    device: str | torch.device | None = "auto"
    resume: bool = False
    overrides: Sequence[str] = ()
    data_root: str | os.PathLike | None = None
    overwrite: bool = False
    progress: bool = True
    on_step: Callable[[StepInfo], None] | None = None
    threads: int | None = None


def train(
    config: Config | Mapping | str | os.PathLike | None,
    out_dir: str | os.PathLike | None = None,
    device: str | torch.device | None = "auto",
    resume: bool = False,
    *,
    overrides: Sequence[str] = (),
    data_root: str | os.PathLike | None = None,
    overwrite: bool = False,
    progress: bool = True,
    on_step: Callable[[StepInfo], None] | None = None,
    threads: int | None = None,
    dist_timeout: float | None = None,
) -> Path:
    """Train a tower as `config` says (a Config, a TOML/YAML path or a dict over the defaults) into `out_dir`.

    out_dir defaults to runs/<config name>/. resume=True continues the run saved there (config may then be None:
    the run's own config.json is used; a given config must agree with it). overwrite=True starts afresh in a
    folder that holds a run. On CPU torch uses `threads` threads (default: all cores this process may use; bit-exact
    resumption needs the same count). Returns the run folder. Raises TrainingInterrupted after Ctrl-C.

    Launched by torchrun with more than one process, every process calls this with the same arguments: each joins
    the job's process group (`device` auto/cuda: the GPU of its local rank; `threads` default: this machine's
    cores shared out among its processes; `dist_timeout`: seconds any process waits for the others, default
    retrieval.distributed.DEFAULT_TIMEOUT_S), rank 0 does all of the above with the run folder, and all train
    together; every process returns the run folder.
    """
    request = TrainRequest(config, out_dir, device, resume, tuple(overrides), data_root, overwrite, progress,
                           on_step, threads)
    group = join_process_group(device, dist_timeout)  # None: a plain run (no torchrun, or a single process)
    if group is None:
        return _train_as_main(dataclasses.replace(request, device=resolve_device(device)), None)
    try:
        if threads is None and group.device.type == "cpu":
            request = dataclasses.replace(request, threads=max(1, available_cores() // group.local_world_size))
        request = dataclasses.replace(request, device=group.device)
        with sigterm_as_error(group):
            if group.is_main:
                return _train_as_main(request, group)
            return _follow(request, group)
    except Exception as e:
        if is_comm_error(e):
            raise RetrievalError(lost_contact_message(group, e, "before training")) from None
        raise
    finally:
        group.close()


def _follow(request: TrainRequest, group: ProcessGroup) -> Path:
    """A process other than rank 0: train alongside it with the config and run folder it sends, writing nothing."""
    setup = group.wait_release("to set up the run")
    cfg = resolve_config(setup["config"], source="rank 0's config")
    out = Path(setup["out"])
    with cpu_threads(group.device, request.threads):
        trainer = build_trainer(cfg, out, group.device, request.data_root, progress=False, on_step=request.on_step,
                                group=group)
        trainer.run(resume=setup["resume"])
    return out


def _train_as_main(request: TrainRequest, group: ProcessGroup | None) -> Path:
    """train() in one process, or as rank 0 of a distributed run (which releases the others once the run folder
    is checked, or hands them its error)."""
    try:
        cfg = _resolve_request_config(request)
        out = Path(request.out_dir) if request.out_dir is not None else Path("runs") / cfg.name
        _train_in_new_or_existing(out, cfg, request, group)
        return out
    except BaseException as e:
        if group is not None and not group.released:
            with contextlib.suppress(Exception):  # the others may be gone already: the error at hand is e
                group.fail(e)
        raise


def _resolve_request_config(request: TrainRequest) -> Config:
    """The request's config (a Config, a file, a dict; None: the run folder's own when resuming) with its
    overrides."""
    config, overrides = request.config, request.overrides
    if config is None:
        if not (request.resume and request.out_dir):
            raise UsageError("a config is needed (only resuming a run folder can reuse the run's own config)")
        saved = RunFolder(request.out_dir).config
        return resolve_config(read_json(saved, "run config"), overrides, source=str(saved))
    if isinstance(config, (str, os.PathLike)):
        return load_config(config, overrides)
    return resolve_config(config, overrides, source="config")


def _train_in_new_or_existing(out: Path, cfg: Config, request: TrainRequest, group: ProcessGroup | None) -> None:
    """Train in `out`, creating it (and its parents) as needed: a run that fails before writing anything leaves
    no empty folders behind."""
    created = out  # the outermost folder this call creates (runs/ too, on a first run)
    while not created.parent.exists() and created.parent != created.parent.parent:
        created = created.parent
    created = None if out.exists() else created
    ensure_writable_dir(out, "run folder")
    try:
        _train_in(RunFolder(out), cfg, request, group)
    except BaseException:
        if created is not None and out.is_dir() and all(p.name == ".lock" for p in out.iterdir()):
            shutil.rmtree(created, ignore_errors=True)
        raise


def _train_in(folder: RunFolder, cfg: Config, request: TrainRequest, group: ProcessGroup | None = None) -> None:
    """Under the run folder's lock: check it for a resume or a fresh start, release the other processes, build
    the trainer and run it; the model card is written whether the run finished or was interrupted."""
    with exclusive_lock(folder.path):
        _prepare_folder(folder, cfg, request.resume, request.overwrite)
        if group is not None:  # the run folder is fine: the other processes may start
            group.release({"config": cfg.to_dict(), "out": str(folder.path), "resume": request.resume})
        with cpu_threads(request.device, request.threads):
            trainer = build_trainer(cfg, folder.path, request.device, request.data_root, request.progress,
                                    request.on_step, group)
            if not request.resume:
                atomic_write_json(folder.config, cfg.to_dict())
            _log_start(cfg, trainer, group)
            try:
                trainer.run(resume=request.resume)
            finally:
                _write_card(folder.path)  # finished or interrupted: the card says which


def _prepare_folder(folder: RunFolder, cfg: Config, resume: bool, overwrite: bool) -> None:
    """A resume needs the folder's state and the config it was trained with; a fresh start needs a folder
    without a run, or `overwrite` (which clears the old run)."""
    out = folder.path
    if resume:
        if not folder.state.is_file():
            raise RetrievalError(f"`resume`: {out} holds no training state ({folder.state.name}) to resume from")
        # the saved config resolved as a fresh one is (keys added since default), and the precision may change
        # on resume like the thread count (a warning: the weights then differ in the last bits)
        saved = resolve_config(read_json(folder.config, "run config"), source=str(folder.config))
        differ = [k for k in config_diff(saved.to_dict(), cfg.to_dict()) if k != "train.precision"]
        if differ:
            raise UsageError(f"`resume`: the config differs from the one {out} was trained with, in: "
                             f"{', '.join(differ)}; resume with the same config (or start a new run folder)")
    elif folder.holds_run():
        if not overwrite:
            raise RetrievalError(f"{out} already holds a training run; use `resume` to continue it, "
                                 "`overwrite` to start afresh, or another run folder")
        folder.clear_run()


def _log_start(cfg: Config, trainer: Trainer, group: ProcessGroup | None) -> None:
    dev = trainer.device
    threads_note = f"{torch.get_num_threads()} threads, " if dev.type == "cpu" else ""
    where = f"{dev.type} ({threads_note}{trainer.precision})"
    if group is not None:
        where = f"{group.world_size} processes ({group.backend}; rank 0 on {where})"
    validating = len(trainer.validation) if trainer.validation is not None else 0
    logger.info(
        f"training {cfg.name}: {cfg.tower.name} tower, {cfg.objective.name} objective, "
        f"{len(trainer.images):,} images ({validating:,} for validation), {trainer.epochs} epochs x "
        f"{trainer.steps_per_epoch} steps on {where} -> {trainer.out_dir}")


def _write_card(out: Path) -> None:
    """The run's model card (retrieval.cards); a failure to write it is a warning, never the run's outcome."""
    from retrieval.cards import write_run_card

    try:
        write_run_card(out)
    except (OSError, RetrievalError, ValueError, TypeError, KeyError) as e:
        logger.warning(f"could not write the model card {RunFolder(out).card}: {e}")
