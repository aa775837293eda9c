"""The training state a resume continues from: weights, optimizer and scheduler, position, and the sessions.

Written so that a crash at any moment leaves a complete older or newer state: the tensors under a new name first
(state-e<epoch>-s<step>.safetensors), then state.json naming them (retrieval.run_folder names both). Each function
takes the Trainer (retrieval.training.loop) whose state it is.
"""

from __future__ import annotations

import logging

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_bytes
from safetensors.torch import load_file, save_file
from safetensors.torch import save as save_bytes

from retrieval.checkpoint import fingerprint_state
from retrieval.errors import RetrievalError
from retrieval.fsutil import atomic_path, atomic_write_json, read_json
from retrieval.training.step import EpochTotals

logger = logging.getLogger(__name__)

STATE_FORMAT = "retrieval-train-state/1"


def save_state(trainer) -> None:
    """Weights, optimizer tensors (safetensors) and everything else (JSON), then the older tensors removed."""
    opt = trainer.optimizer.state_dict()
    tensors, opt_scalars = _state_tensors(trainer, opt)
    folder = trainer.run_folder
    path = folder.state_tensors(trainer.epoch, trainer.step)
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={"format": STATE_FORMAT})
    state = {
        "format": STATE_FORMAT,
        "tensors": path.name,
        "tensors_fingerprint": fingerprint_state(tensors),
        "epoch": trainer.epoch,
        "step": trainer.step,
        "global_step": trainer.global_step,
        "steps_per_epoch": trainer.steps_per_epoch,
        "epochs": trainer.epochs,
        "finished": trainer.epoch >= trainer.epochs,
        "best": trainer.best,
        "train_seconds": trainer.train_seconds,
        "partial_epoch": trainer.totals.to_json(),
        "optimizer": {"param_groups": opt["param_groups"], "scalars": opt_scalars},
        "scheduler": trainer.scheduler.state_dict(),
        "rng": {"seed": trainer.seed, "scheme": "every draw of epoch e, step s comes from blake2b(seed, e, s)"},
        "sessions": [*trainer.sessions, dict(trainer.session)] if trainer.session else list(trainer.sessions),
        **trainer.state_meta,
    }
    atomic_write_json(folder.state, state)
    for old in folder.state_tensor_files():
        if old.name != path.name:
            old.unlink(missing_ok=True)


def _state_tensors(trainer, opt: dict) -> tuple[dict, dict]:
    """The tensors to save (tower, pair head, the optimizer's tensors; on the CPU) and the optimizer's scalars."""
    tensors = {f"tower.{k}": v for k, v in trainer.tower.state_dict().items()}
    if trainer.objective.head is not None:
        tensors.update({f"head.{k}": v for k, v in trainer.objective.head.state_dict().items()})
    opt_scalars: dict[str, dict] = {}
    for pid, slots in opt["state"].items():
        for name, value in slots.items():
            if torch.is_tensor(value):
                tensors[f"optimizer.{pid}.{name}"] = value
            else:
                opt_scalars.setdefault(str(pid), {})[name] = value
    return {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, opt_scalars


def load_state(trainer) -> None:
    """The saved training state, checked against this run. Distributed: rank 0 reads the run folder (the other
    processes may run on machines without it) and sends its contents to the others."""
    state, tensors = _read_state(trainer) if trainer.group is None else _shared_state(trainer)
    _apply_state(trainer, state, tensors)


def _shared_state(trainer) -> tuple[dict, dict]:
    read: dict = {}

    def on_main() -> dict:
        state, read["tensors"] = _read_state(trainer)
        return state

    state = trainer.group.from_main(on_main, "to read the training state")
    blob = trainer.group.broadcast_bytes(save_bytes(read["tensors"]) if trainer.is_main else None)
    return state, (read["tensors"] if trainer.is_main else load_bytes(blob))


def _read_state(trainer) -> tuple[dict, dict]:
    path = trainer.run_folder.state
    state = read_json(path, "training state")
    if state.get("format") != STATE_FORMAT:
        raise RetrievalError(f"{path} is not a retrieval training state")
    for key, value in trainer.state_meta.items():
        if state.get(key) != value:
            raise RetrievalError(f"{path}: the saved run has {key}={state.get(key)!r}, this one {value!r}; "
                                 "resume with the run's own config")
    if state["steps_per_epoch"] != trainer.steps_per_epoch or state["epochs"] != trainer.epochs:
        raise RetrievalError(f"{path}: the saved run has {state['epochs']} epochs of {state['steps_per_epoch']} "
                             f"steps, this one {trainer.epochs} of {trainer.steps_per_epoch}")
    weights = trainer.run_folder.path / state["tensors"]
    try:
        tensors = load_file(str(weights))
    except (SafetensorError, OSError, ValueError) as e:
        raise RetrievalError(f"{weights}: cannot read the training state ({e})") from None
    if fingerprint_state(tensors) != state["tensors_fingerprint"]:
        raise RetrievalError(f"{weights} does not match {path} (file changed or corrupt)")
    return state, tensors


def _apply_state(trainer, state: dict, tensors: dict) -> None:
    def part(prefix: str) -> dict:
        return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}

    trainer.tower.load_state_dict(part("tower."))
    if trainer.objective.head is not None:
        trainer.objective.head.load_state_dict(part("head."))
    trainer.tower.to(trainer.device)
    trainer.objective.to(trainer.device)
    opt_state: dict[int, dict] = {}
    for key, value in part("optimizer.").items():
        pid, name = key.split(".", 1)
        opt_state.setdefault(int(pid), {})[name] = value
    for pid, scalars in state["optimizer"]["scalars"].items():
        opt_state.setdefault(int(pid), {}).update(scalars)
    trainer.optimizer.load_state_dict({"state": opt_state, "param_groups": state["optimizer"]["param_groups"]})
    trainer.scheduler.load_state_dict(state["scheduler"])
    trainer.epoch, trainer.step, trainer.global_step = state["epoch"], state["step"], state["global_step"]
    trainer.best, trainer.train_seconds = state["best"], state["train_seconds"]
    trainer.sessions = list(state.get("sessions", []))
    partial = state["partial_epoch"]
    trainer.totals = EpochTotals(trainer.device, partial["loss_sum"], partial["steps"], partial["seconds"])
    # epochs recorded after the saved state (a crash between metrics.jsonl and state.json) are dropped
    trainer.history = ([r for r in trainer.run_folder.history() if r["epoch"] <= trainer.epoch]
                       if trainer.is_main else [])


def warn_if_setup_differs(trainer) -> None:
    """Warn when a resume runs under another thread count, precision or number of processes than the session
    before: CPU kernels split reductions by thread, so any of these changes the last bits of the weights."""
    if not trainer.is_main:
        return
    out, sessions, now = trainer.out_dir, trainer.sessions, trainer.session
    before = sessions[-1].get("threads") if sessions else None
    if before is not None and now["threads"] is not None and before != now["threads"]:
        logger.warning(f"{out} was trained with {before} CPU threads and resumes with {now['threads']}: "
                       f"training continues, but the weights will not be bit-identical to an uninterrupted run "
                       f"(resume with --threads {before} for that)")
    last = sessions[-1] if sessions else {}  # sessions before precisions were recorded: CUDA autocast
    before = (last.get("precision") or ("bf16" if last.get("device") == "cuda" else "fp32")) if last else None
    if before is not None and before != now["precision"]:
        logger.warning(f"{out} was trained in {before} and resumes in {now['precision']}: training continues, but "
                       f"the weights will not be bit-identical to an uninterrupted run (resume with --precision "
                       f"{before} for that)")
    before = sessions[-1].get("processes", 1) if sessions else None
    if before is not None and before != now["processes"]:
        logger.warning(f"{out} was trained with {before} process(es) and resumes with {now['processes']}: the "
                       "global batches are the same, but floating-point sums differ in the last bits, so the weights "
                       "will not be bit-identical to an uninterrupted run")
