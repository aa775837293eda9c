"""Training a Siamese tower: a PML-style composition of tower, objective (loss + miner, or pair head), batch
sampler, device-side augmentation, an optimizer and a learning-rate schedule, with per-epoch validation and a run
folder.

Run folder (everything written to a temp name and renamed):
  config.json        the resolved config (Config.to_dict())
  metrics.jsonl      one record per epoch (loss, lr, images/s, validation precision@1 and MAP@R)
  last.*, best.*     checkpoints (retrieval.checkpoint): best by validation MAP@R
  state.json + state-*.safetensors   the training state for resuming (weights, optimizer, scheduler, position,
                     and one "sessions" entry per run of the loop: where it started, steps run, device, threads,
                     precision)

Precision (train.precision, retrieval.precision): the tower's forward pass in fp32 or under bf16 autocast; the
objective (loss, miner, distances, a pair head), the gradients the optimizer sees and its state stay fp32. The
checkpoints' sidecars and every session in state.json say which precision trained them.

Reproducibility: every random choice of epoch e, step s is drawn from a generator seeded with (seed, e, s)
(retrieval.seeding), so the training state is just weights + optimizer + scheduler + position, and a resumed run
ends with the same weights as an uninterrupted one (bit for bit on CPU with the same thread count).

Distributed (launched by torchrun with more than one process, retrieval.distributed): every process holds the
data and a replica of the tower (batch norm over the global batch, DistributedDataParallel), takes its disjoint
share of each global batch (sampling.ShardedBatchSampler; train.batch_size is the global batch), augments its rows
with the whole batch's seeded draws, and computes the objective's loss of the global batch (objectives'
distributed() forms), so N processes train as one process would, up to floating-point rounding. Rank 0 alone
validates, writes the run folder (checkpoints, metrics.jsonl, the state), logs and draws the progress bar; the
state is the same whatever the number of processes, so a run resumes under any number of them.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import re
import shutil
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_bytes
from safetensors.torch import load_file, save_file
from safetensors.torch import save as save_bytes
from tqdm import tqdm

from retrieval.augment import (
    BatchAugment, BatchTransform, Chain, ClassExpansion, DegradeAugment, ElasticAugment, Rows, build_class_expansions,
)
from retrieval.checkpoint import fingerprint_state, save_checkpoint
from retrieval.config import Config, OptimizerConfig, config_diff, load_config, resolve_config
from retrieval.data.specs import class_indices, load_dataset
from retrieval.distributed import ProcessGroup, is_comm_error, sigterm_as_error
from retrieval.distributed import join as join_process_group
from retrieval.embed import available_cores, embed_images, resolve_device
from retrieval.errors import RetrievalError, UsageError
from retrieval.fsutil import atomic_path, atomic_write_json, atomic_write_text, ensure_writable_dir, exclusive_lock, read_json
from retrieval.logs import show_progress
from retrieval.metrics import retrieval_metrics
from retrieval.objectives import Objective, build_objective
from retrieval.optim import OPTIMIZERS, SCHEDULES
from retrieval.precision import autocast, resolve_precision
from retrieval.sampling import SAMPLERS, Sampler, ShardedBatchSampler
from retrieval.seeding import derive_seed, make_generator
from retrieval.towers import Tower, build_tower

logger = logging.getLogger(__name__)

STATE_FORMAT = "retrieval-train-state/1"
STOP_CHECK_STEPS = 10  # distributed: how often the processes agree on stopping (Ctrl-C)


def _above_bars(msg: str, level: int = logging.INFO) -> None:
    """Log `msg` with any progress bar on stderr cleared first and redrawn after."""
    with tqdm.external_write_mode(file=sys.stderr):
        logger.log(level, msg)


# ------------------------------------------------------------------------------------------------ threads
@contextlib.contextmanager
def _cpu_threads(device: torch.device, threads: int | None = None):
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


# ------------------------------------------------------------------------------------------------ Ctrl-C
class TrainingInterrupted(KeyboardInterrupt):
    """Raised by Trainer.run after Ctrl-C once `last` and the training state are saved (or could not be)."""

    def __init__(self, message: str, saved: bool, run_dir: Path):
        super().__init__(message)
        self.message, self.saved, self.run_dir = message, saved, run_dir


class _StopRequest:
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
        _above_bars("\nCtrl-C: stopping after this step and saving (press again to stop at once, without saving)")

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


# ------------------------------------------------------------------------------------------------ the trainer
@dataclass
class StepInfo:
    """What an on_step callback sees after each optimizer step."""

    epoch: int  # 0-based epoch in progress
    step: int  # steps done in this epoch
    global_step: int
    steps_per_epoch: int
    loss: torch.Tensor  # this step's loss (detached, on the training device)
    trainer: "Trainer"


def forward_loss(tower: Tower, objective: Objective, x: torch.Tensor, y: torch.Tensor, generator: torch.Generator,
                 device: torch.device, precision: str) -> torch.Tensor:
    """The one place a training step computes: the tower under the precision's autocast (retrieval.precision),
    the objective (loss, miner, distances, a pair head) on fp32 embeddings outside it."""
    with autocast(device, precision):
        emb = tower(x)
    return objective(emb.float(), y, generator)


class _TrainStep(torch.nn.Module):
    """Tower and objective as one module, for DistributedDataParallel around both (the pair head included):
    this process's rows -> embeddings -> the objective's distributed loss (forward_loss)."""

    def __init__(self, tower: Tower, objective: Objective, device: torch.device, precision: str):
        super().__init__()
        self.tower, self.objective, self.device, self.precision = tower, objective, device, precision

    def forward(self, x: torch.Tensor, y: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        return forward_loss(self.tower, self.objective, x, y, generator, self.device, self.precision)


def lost_contact_message(group: ProcessGroup, e: BaseException, where: str) -> str:
    reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
    return (f"rank {group.rank} of {group.world_size}: distributed training stopped {where}: another process of the "
            f"job failed or stopped answering within {group.timeout_s:g}s ({reason}); the run folder keeps the state "
            "saved at the last finished epoch (or Ctrl-C): `resume` continues from it, with any number of processes")


class Trainer:
    """Runs the training loop over a composition of parts; owns nothing global (device and data are passed in).

    tower; objective (it may carry a trainable head); sampler: the positions into `images` of each step's batch;
    augment and elastic: batch transforms, after the class expansions; optimizer, scheduler: torch objects over
    the tower's and the objective's parameters, the scheduler stepped once per optimizer step. group: the process
    group of a distributed run (then `sampler` is a ShardedBatchSampler and the tower's batch norm global).
    precision: the tower's arithmetic in training and validation: auto (bf16 where `device` has native bfloat16
    units), fp32 or bf16 (retrieval.precision).
    """

    def __init__(
        self,
        tower: Tower,
        objective: Objective,
        sampler: Sampler,
        augment: BatchTransform,
        optimizer: torch.optim.Optimizer,
        scheduler,
        *,
        images: torch.Tensor,
        labels: torch.Tensor,
        epochs: int,
        seed: int,
        device: torch.device,
        out_dir: Path,
        val_images: torch.Tensor | None = None,
        val_labels: torch.Tensor | None = None,
        checkpoint_meta: Mapping[str, Any] | None = None,
        state_meta: Mapping[str, Any] | None = None,
        progress: bool = True,
        on_step: Callable[[StepInfo], None] | None = None,
        elastic: BatchTransform | None = None,
        class_expansions: Sequence[ClassExpansion] = (),
        group: ProcessGroup | None = None,
        precision: str | None = "auto",
    ):
        self.tower, self.objective, self.sampler, self.augment = tower, objective, sampler, augment
        self.elastic, self.class_expansions = elastic, tuple(class_expansions)
        self.optimizer, self.scheduler = optimizer, scheduler
        self.images, self.labels = images, labels  # uint8 (N, H, W) and int64 (N,) on the training device
        self.val_images, self.val_labels = val_images, val_labels
        self.epochs, self.seed, self.device = epochs, seed, device
        self.precision = resolve_precision(precision, device)  # fp32 or bf16
        self.out_dir = Path(out_dir)
        self.checkpoint_meta = dict(checkpoint_meta or {})
        self.state_meta = dict(state_meta or {})
        self.progress, self.on_step = progress, on_step
        self.steps_per_epoch = len(sampler)
        self.epoch, self.step, self.global_step = 0, 0, 0
        self.best: dict | None = None
        self.history: list[dict] = []
        self.train_seconds = 0.0
        # One entry per run of the loop (the first, then each resume): where it started and how many optimizer
        # steps it executed, counted in the loop itself, so a resume that silently restarted shows in state.json.
        self.sessions: list[dict] = []
        self._session: dict = {}
        self._running_loss = float("nan")
        self._reset_epoch_totals()
        self.group = group
        self.is_main = group is None or group.is_main  # the process that validates, writes, logs, draws the bar
        self._rows: Rows | None = None  # this process's rows of each global batch (distributed)
        self._ddp: torch.nn.Module | None = None
        self._loss_scale = 1.0
        if group is not None:
            if not isinstance(sampler, ShardedBatchSampler):
                raise ValueError("a distributed Trainer needs a ShardedBatchSampler")
            self._rows = Rows(sampler.start, sampler.stop, sampler.global_batch_size)
            step_objective = objective.distributed()
            self._loss_scale = step_objective.loss_scale
            self._ddp = group.wrap(_TrainStep(tower, step_objective, device, precision))

    @property
    def images_per_step(self) -> int:
        """Images of one optimizer step, over all processes."""
        return getattr(self.sampler, "global_batch_size", self.sampler.batch_size)

    def _reset_epoch_totals(self, loss_sum: float = 0.0, steps: int = 0, seconds: float = 0.0) -> None:
        self._loss_sum = torch.tensor(loss_sum, dtype=torch.float64, device=self.device)
        self._epoch_steps, self._epoch_seconds = steps, seconds

    # -- one step ------------------------------------------------------------------------------------------
    def make_batch(self, positions: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Index the on-device uint8 images, scale to [0, 1] and augment: the whole data path of a step.

        Distributed: `positions` are this process's share of the step's batch, or the whole batch when class
        expansions mix it (they then run on the whole batch and this process keeps its rows); the transforms
        draw for the whole batch and apply this process's rows (augment.Rows)."""
        x = self.images[positions].unsqueeze(1).float().div_(255.0)
        y = self.labels[positions]
        for expand in self.class_expansions:  # new classes made from the sampled ones (few-shot towers)
            x, y = expand(x, y, generator)
        rows = self._rows
        if rows is not None and len(x) == rows.total:  # the whole batch was made here: keep this process's rows
            x, y = x[rows.start:rows.stop], y[rows.start:rows.stop]
        x = self.augment(x, generator) if rows is None else self.augment(x, generator, rows)
        if self.elastic is not None:
            x = self.elastic(x, generator) if rows is None else self.elastic(x, generator, rows)
        # channels-last: faster convolutions on CUDA and with oneDNN on CPU, in fp32 and bf16 alike
        return x.contiguous(memory_format=torch.channels_last), y

    def train_step(self, x: torch.Tensor, y: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Forward (forward_loss: the tower in the trainer's precision, the objective in fp32), backward, optimizer
        and scheduler step; returns the loss. Distributed: on this process's rows, DDP averaging the gradients of
        the global batch's loss over the processes; the loss returned is the global batch's (the same on every
        process)."""
        self.tower.train()
        self.objective.train()
        if self._ddp is not None:
            loss = self._ddp(x, y, generator)
            value = loss.detach() / self._loss_scale if self._loss_scale != 1 else loss.detach()
        else:
            loss = forward_loss(self.tower, self.objective, x, y, generator, self.device, self.precision)
            value = loss.detach()
        if self.device.type == "cpu":
            self._check_finite(float(value))
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.scheduler.step()
        return value

    def _stop_agreed(self, requested: bool) -> bool:
        """Whether to stop after this step: Ctrl-C reaches the processes at different moments (or only those of
        one machine), so in a distributed run they agree to stop after the same step; they compare notes every
        STOP_CHECK_STEPS steps and at epoch ends (each check is one more point where every process waits for the
        slowest), so a distributed run stops up to that many steps after Ctrl-C."""
        if self.group is None:
            return requested
        if self.step % STOP_CHECK_STEPS and self.step != self.steps_per_epoch:
            return False
        return self.group.any(requested)

    def _check_finite(self, loss: float) -> None:
        if not math.isfinite(loss):
            raise RetrievalError(
                f"training diverged: loss is {loss} at epoch {self.epoch + 1}, step {self.step + 1}; "
                "lower optimizer.lr or change the objective's settings"
            )

    # -- validation ----------------------------------------------------------------------------------------
    def validate(self) -> dict[str, float]:
        if self.val_images is None or len(self.val_images) == 0:
            return {}
        emb = embed_images(self.tower, self.val_images, device=self.device, precision=self.precision)
        scores = retrieval_metrics(emb, self.val_labels.numpy(), ks=(1,))  # leave-one-out within the slice
        return {"val_precision_at_1": scores.precision[1], "val_map_at_r": scores.map_at_r}

    # -- the loop ------------------------------------------------------------------------------------------
    def run(self, resume: bool = False) -> Path:
        """Train to the last epoch (continuing from the saved state when resume=True); returns the run folder."""
        if resume:
            self.load_state()
            if self.epoch >= self.epochs:
                if self.is_main:
                    logger.info(f"{self.out_dir}: training already finished ({self.epochs} epochs); nothing to do")
                return self.out_dir
            if self.is_main:
                logger.info(f"resuming {self.out_dir} at epoch {self.epoch + 1}, step {self.step} of "
                            f"{self.steps_per_epoch}")
        self._session = {"started_at_step": self.global_step, "steps_run": 0, "device": self.device.type,
                         "threads": self._threads(), "processes": self.group.world_size if self.group else 1,
                         "precision": self.precision}
        if resume:
            self._warn_if_setup_differs()
        self.tower.to(self.device)
        self.objective.to(self.device)
        total = self.epochs * self.steps_per_epoch
        bar = tqdm(total=total, initial=self.global_step, desc="train", unit="step",
                   disable=not (self.is_main and show_progress(self.progress)), dynamic_ncols=True, mininterval=0.5,
                   file=sys.stderr)
        consistent = True  # False while weights/optimizer are mid-update: nothing may be saved then
        try:
            with _StopRequest() as stop:
                while self.epoch < self.epochs:
                    plan = self.epoch_plan(self.epoch).to(self.device)
                    while self.step < self.steps_per_epoch:
                        t0 = time.perf_counter()
                        consistent = False
                        g = make_generator(self.seed, "step", self.epoch, self.step)
                        x, y = self.make_batch(plan[self.step], g)
                        loss = self.train_step(x, y, g)
                        self.step += 1
                        self.global_step += 1
                        self._session["steps_run"] += 1
                        consistent = True
                        self._loss_sum += loss
                        if self.device.type == "cpu" or self.step % 20 == 0:  # .item() syncs a GPU: not every step
                            self._running_loss = float(loss)
                            self._check_finite(self._running_loss)
                        self._epoch_steps += 1
                        dt = time.perf_counter() - t0
                        self._epoch_seconds += dt
                        self.train_seconds += dt
                        bar.update(1)
                        if bar.n % 5 == 0 or self.step == self.steps_per_epoch:
                            bar.set_postfix_str(self._postfix(), refresh=False)
                        if self.on_step is not None:
                            self.on_step(StepInfo(self.epoch, self.step, self.global_step, self.steps_per_epoch,
                                                  loss, self))
                        if self._stop_agreed(stop.requested):
                            raise KeyboardInterrupt
                    consistent = False  # validation and checkpoints: a forced stop here keeps the older state
                    self._end_epoch()
                    bar.set_postfix_str(self._postfix())
                    consistent = True
                    if self._stop_agreed(stop.requested):
                        raise KeyboardInterrupt
        except KeyboardInterrupt:
            bar.close()
            if not consistent:
                raise TrainingInterrupted(
                    f"stopped at once; the last saved state (epoch {len(self.history)}) is kept in {self.out_dir}",
                    saved=False, run_dir=self.out_dir) from None
            if self.is_main:
                self.save_state()
                save_checkpoint(self.out_dir / "last", self.tower, self.objective.head,
                                **self._ckpt_meta(interrupted=True))
            if self.group is not None:  # the others wait: torchrun stops the job when a process exits non-zero
                self.group.barrier()
            raise TrainingInterrupted(
                f"interrupted at epoch {self.epoch + 1}, step {self.step}/{self.steps_per_epoch}; saved "
                f"{self.out_dir / 'last.safetensors'} and the training state", saved=True, run_dir=self.out_dir) from None
        except Exception as e:
            bar.close()
            if self.group is not None and is_comm_error(e):
                raise RetrievalError(lost_contact_message(self.group, e, f"at epoch {self.epoch + 1}, step "
                                                                         f"{self.step + 1}")) from None
            raise
        bar.close()
        return self.out_dir

    def epoch_plan(self, epoch: int) -> torch.Tensor:
        """The positions of each step's batch: this process's share, or in a distributed run with class
        expansions the whole batch (make_batch keeps this process's rows after expanding)."""
        if self._rows is not None and self.class_expansions:
            return self.sampler.global_batches(epoch)
        return self.sampler.epoch_batches(epoch)

    def _threads(self) -> int | None:
        return torch.get_num_threads() if self.device.type == "cpu" else None

    def _warn_if_setup_differs(self) -> None:
        # CPU kernels split reductions by thread, so another thread count changes the last bits of the weights.
        if not self.is_main:
            return
        before = self.sessions[-1].get("threads") if self.sessions else None
        now = self._session["threads"]
        if before is not None and now is not None and before != now:
            logger.warning(f"{self.out_dir} was trained with {before} CPU threads and resumes with {now}: "
                           f"training continues, but the weights will not be bit-identical to an uninterrupted run "
                           f"(resume with --threads {before} for that)")
        last = self.sessions[-1] if self.sessions else {}  # sessions before precisions were recorded: CUDA autocast
        before = (last.get("precision") or ("bf16" if last.get("device") == "cuda" else "fp32")) if last else None
        now = self._session["precision"]
        if before is not None and before != now:
            logger.warning(f"{self.out_dir} was trained in {before} and resumes in {now}: training continues, but "
                           f"the weights will not be bit-identical to an uninterrupted run (resume with --precision "
                           f"{before} for that)")
        before = self.sessions[-1].get("processes", 1) if self.sessions else None
        now = self._session["processes"]
        if before is not None and before != now:
            logger.warning(f"{self.out_dir} was trained with {before} process(es) and resumes with {now}: the global "
                           "batches are the same, but floating-point sums differ in the last bits, so the weights "
                           "will not be bit-identical to an uninterrupted run")

    def _postfix(self) -> str:
        lr = self.scheduler.get_last_lr()[0]
        last = self.history[-1] if self.history else {}
        # between epochs (totals just reset) show the finished epoch's speed rather than 0
        ips = (self._epoch_steps * self.images_per_step / max(self._epoch_seconds, 1e-9) if self._epoch_steps
               else last.get("images_per_s", 0.0))
        val = f" val MAP@R {last['val_map_at_r']:.4f}" if "val_map_at_r" in last else ""
        return f"epoch {min(self.epoch + 1, self.epochs)}/{self.epochs} loss {self._running_loss:.4f} lr {lr:.2e} {ips:,.0f} img/s{val}"

    def _end_epoch(self) -> None:
        if not self.is_main:  # rank 0 validates, writes and logs; the others move on to the next epoch
            self.epoch += 1
            self.step = 0
            self._reset_epoch_totals()
            return
        record = {
            "epoch": self.epoch + 1,
            "global_step": self.global_step,
            "loss": float(self._loss_sum) / max(self._epoch_steps, 1),
            "lr": self.scheduler.get_last_lr()[0],
            "images_per_s": self._epoch_steps * self.images_per_step / max(self._epoch_seconds, 1e-9),
            "epoch_seconds": self._epoch_seconds,
            "train_seconds": self.train_seconds,
        }
        t0 = time.perf_counter()
        record.update(self.validate())
        record["val_seconds"] = time.perf_counter() - t0
        improved = "val_map_at_r" in record and (self.best is None or record["val_map_at_r"] > self.best["val_map_at_r"])
        record["best"] = improved
        self.history.append(record)
        self.epoch += 1
        self.step = 0
        self._reset_epoch_totals()
        # checkpoints, then metrics, then the state: a crash in between repeats this epoch, identically
        if improved:
            self.best = {k: record[k] for k in ("epoch", "val_precision_at_1", "val_map_at_r")}
            save_checkpoint(self.out_dir / "best", self.tower, self.objective.head, **self._ckpt_meta())
        save_checkpoint(self.out_dir / "last", self.tower, self.objective.head, **self._ckpt_meta())
        self._write_metrics()
        self.save_state()
        val = (f"  val precision@1 {record['val_precision_at_1']:.4f}  MAP@R {record['val_map_at_r']:.4f}"
               + ("  (best)" if improved else "")) if "val_map_at_r" in record else ""
        _above_bars(
            f"epoch {record['epoch']}/{self.epochs}: loss {record['loss']:.4f}  {record['images_per_s']:,.0f} img/s"
            f"  {record['epoch_seconds']:.1f}s{val}"
        )

    def _ckpt_meta(self, interrupted: bool = False) -> dict:
        last = self.history[-1] if self.history else {}
        meta = {**self.checkpoint_meta, "epoch": self.epoch, "global_step": self.global_step}
        if interrupted:
            meta.update(interrupted=True, step_in_epoch=self.step)
        if "val_map_at_r" in last:
            meta["val"] = {"epoch": last["epoch"], "precision_at_1": last["val_precision_at_1"],
                           "map_at_r": last["val_map_at_r"]}
        return meta

    def _write_metrics(self) -> None:
        atomic_write_text(self.out_dir / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in self.history))

    # -- training state --------------------------------------------------------------------------------------
    def save_state(self) -> None:
        """Weights, optimizer tensors (safetensors) and everything else (JSON), written so that a crash at any
        moment leaves a complete older or newer state: tensors under a new name first, then state.json."""
        tensors = {f"tower.{k}": v for k, v in self.tower.state_dict().items()}
        if self.objective.head is not None:
            tensors.update({f"head.{k}": v for k, v in self.objective.head.state_dict().items()})
        opt = self.optimizer.state_dict()
        opt_scalars: dict[str, dict] = {}
        for pid, slots in opt["state"].items():
            for name, value in slots.items():
                if torch.is_tensor(value):
                    tensors[f"optimizer.{pid}.{name}"] = value
                else:
                    opt_scalars.setdefault(str(pid), {})[name] = value
        tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
        name = f"state-e{self.epoch:04d}-s{self.step:06d}.safetensors"
        with atomic_path(self.out_dir / name) as tmp:
            save_file(tensors, str(tmp), metadata={"format": STATE_FORMAT})
        state = {
            "format": STATE_FORMAT,
            "tensors": name,
            "tensors_fingerprint": fingerprint_state(tensors),
            "epoch": self.epoch,
            "step": self.step,
            "global_step": self.global_step,
            "steps_per_epoch": self.steps_per_epoch,
            "epochs": self.epochs,
            "finished": self.epoch >= self.epochs,
            "best": self.best,
            "train_seconds": self.train_seconds,
            "partial_epoch": {"loss_sum": float(self._loss_sum), "steps": self._epoch_steps, "seconds": self._epoch_seconds},
            "optimizer": {"param_groups": opt["param_groups"], "scalars": opt_scalars},
            "scheduler": self.scheduler.state_dict(),
            "rng": {"seed": self.seed, "scheme": "every draw of epoch e, step s comes from blake2b(seed, e, s)"},
            "sessions": [*self.sessions, dict(self._session)] if self._session else list(self.sessions),
            **self.state_meta,
        }
        atomic_write_json(self.out_dir / "state.json", state)
        for old in self.out_dir.glob("state-*.safetensors"):
            if old.name != name:
                old.unlink(missing_ok=True)

    def load_state(self) -> None:
        """The saved training state, checked against this run. Distributed: rank 0 reads the run folder (the
        other processes may run on machines without it) and sends its contents to the others."""
        state, tensors = self._read_state() if self.group is None else self._shared_state()
        self._apply_state(state, tensors)

    def _shared_state(self) -> tuple[dict, dict]:
        read: dict = {}

        def on_main() -> dict:
            state, read["tensors"] = self._read_state()
            return state

        state = self.group.from_main(on_main, "to read the training state")
        blob = self.group.broadcast_bytes(save_bytes(read["tensors"]) if self.is_main else None)
        return state, (read["tensors"] if self.is_main else load_bytes(blob))

    def _read_state(self) -> tuple[dict, dict]:
        path = self.out_dir / "state.json"
        state = read_json(path, "training state")
        if state.get("format") != STATE_FORMAT:
            raise RetrievalError(f"{path} is not a retrieval training state")
        for key, value in self.state_meta.items():
            if state.get(key) != value:
                raise RetrievalError(f"{path}: the saved run has {key}={state.get(key)!r}, this one {value!r}; "
                                     "resume with the run's own config")
        if state["steps_per_epoch"] != self.steps_per_epoch or state["epochs"] != self.epochs:
            raise RetrievalError(f"{path}: the saved run has {state['epochs']} epochs of {state['steps_per_epoch']} "
                                 f"steps, this one {self.epochs} of {self.steps_per_epoch}")
        weights = self.out_dir / state["tensors"]
        try:
            tensors = load_file(str(weights))
        except (SafetensorError, OSError, ValueError) as e:
            raise RetrievalError(f"{weights}: cannot read the training state ({e})") from None
        if fingerprint_state(tensors) != state["tensors_fingerprint"]:
            raise RetrievalError(f"{weights} does not match {path} (file changed or corrupt)")
        return state, tensors

    def _apply_state(self, state: dict, tensors: dict) -> None:
        def part(prefix: str) -> dict:
            return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}

        self.tower.load_state_dict(part("tower."))
        if self.objective.head is not None:
            self.objective.head.load_state_dict(part("head."))
        self.tower.to(self.device)
        self.objective.to(self.device)
        opt_state: dict[int, dict] = {}
        for key, value in part("optimizer.").items():
            pid, name = key.split(".", 1)
            opt_state.setdefault(int(pid), {})[name] = value
        for pid, scalars in state["optimizer"]["scalars"].items():
            opt_state.setdefault(int(pid), {}).update(scalars)
        self.optimizer.load_state_dict({"state": opt_state, "param_groups": state["optimizer"]["param_groups"]})
        self.scheduler.load_state_dict(state["scheduler"])
        self.epoch, self.step, self.global_step = state["epoch"], state["step"], state["global_step"]
        self.best, self.train_seconds = state["best"], state["train_seconds"]
        self.sessions = list(state.get("sessions", []))
        partial = state["partial_epoch"]
        self._reset_epoch_totals(partial["loss_sum"], partial["steps"], partial["seconds"])
        metrics = self.out_dir / "metrics.jsonl"
        self.history = []
        if self.is_main and metrics.is_file():
            for line in metrics.read_text("utf-8").splitlines():
                if line.strip():
                    record = json.loads(line)
                    if record["epoch"] <= self.epoch:  # drop epochs done after the saved state (a crash)
                        self.history.append(record)


# ------------------------------------------------------------------------------------------------ from a config
def build_optimizer(o: OptimizerConfig, params, total_steps: int):
    """The optimizer (optimizer.name) and its learning-rate schedule (optimizer.schedule) over `total_steps`."""
    optimizer = OPTIMIZERS[o.name](params, lr=o.lr, weight_decay=o.weight_decay)
    return optimizer, SCHEDULES[o.schedule](optimizer, o.lr, o.warmup, total_steps)


def split_validation(labels: torch.Tensor, val_size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded (train positions, validation positions) of a training split."""
    perm = torch.randperm(len(labels), generator=make_generator(seed, "validation"))
    return perm[val_size:].sort().values, perm[:val_size].sort().values


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
    group = join_process_group(device, dist_timeout)  # None: a plain run (no torchrun, or a single process)
    if group is None:
        return _train(config, out_dir, resolve_device(device), resume, overrides, data_root, overwrite, progress,
                      on_step, threads, None)
    try:
        if threads is None and group.device.type == "cpu":
            threads = max(1, available_cores() // group.local_world_size)
        with sigterm_as_error(group):
            if group.is_main:
                return _train(config, out_dir, group.device, resume, overrides, data_root, overwrite, progress,
                              on_step, threads, group)
            return _follow(group, data_root, on_step, threads)
    except Exception as e:
        if is_comm_error(e):
            raise RetrievalError(lost_contact_message(group, e, "before training")) from None
        raise
    finally:
        group.close()


def _follow(group: ProcessGroup, data_root, on_step, threads: int | None) -> Path:
    """A process other than rank 0: train alongside it with the config and run folder it sends, writing nothing."""
    setup = group.wait_release("to set up the run")
    cfg = resolve_config(setup["config"], source="rank 0's config")
    out = Path(setup["out"])
    with _cpu_threads(group.device, threads):
        trainer = build_trainer(cfg, out, group.device, data_root, progress=False, on_step=on_step, group=group)
        trainer.run(resume=setup["resume"])
    return out


def _train(config, out_dir, dev: torch.device, resume: bool, overrides, data_root, overwrite: bool, progress: bool,
           on_step, threads: int | None, group: ProcessGroup | None) -> Path:
    """train() in one process, or as rank 0 of a distributed run (which releases the others once the run folder
    is checked, or hands them its error)."""
    try:
        return _train_checked(config, out_dir, dev, resume, overrides, data_root, overwrite, progress, on_step,
                              threads, group)
    except BaseException as e:
        if group is not None and not group.released:
            with contextlib.suppress(Exception):  # the others may be gone already: the error at hand is e
                group.fail(e)
        raise


def _train_checked(config, out_dir, dev: torch.device, resume: bool, overrides, data_root, overwrite: bool,
                   progress: bool, on_step, threads: int | None, group: ProcessGroup | None) -> Path:
    if config is None:
        if not (resume and out_dir):
            raise UsageError("a config is needed (only resuming a run folder can reuse the run's own config)")
        saved = Path(out_dir) / "config.json"
        cfg = resolve_config(read_json(saved, "run config"), overrides, source=str(saved))
    elif isinstance(config, (str, os.PathLike)):
        cfg = load_config(config, overrides)
    else:
        cfg = resolve_config(config, overrides, source="config")
    out = Path(out_dir) if out_dir is not None else Path("runs") / cfg.name
    created = out  # the outermost folder this call creates (runs/ too, on a first run)
    while not created.parent.exists() and created.parent != created.parent.parent:
        created = created.parent
    created = None if out.exists() else created
    ensure_writable_dir(out, "run folder")
    try:
        _train_in(out, cfg, dev, resume, overwrite, data_root, progress, on_step, threads, group)
    except BaseException:
        if created is not None and out.is_dir() and all(p.name == ".lock" for p in out.iterdir()):
            shutil.rmtree(created, ignore_errors=True)  # failed before writing anything: leave no empty folders
        raise
    return out


def _train_in(out: Path, cfg: Config, dev: torch.device, resume: bool, overwrite: bool, data_root, progress: bool,
              on_step, threads: int | None, group: ProcessGroup | None = None) -> None:
    with exclusive_lock(out):
        if resume:
            if not (out / "state.json").is_file():
                raise RetrievalError(f"`resume`: {out} holds no training state (state.json) to resume from")
            # the saved config resolved as a fresh one is (keys added since default), and the precision may change
            # on resume like the thread count (a warning: the weights then differ in the last bits)
            saved = resolve_config(read_json(out / "config.json", "run config"), source=str(out / "config.json"))
            differ = [k for k in config_diff(saved.to_dict(), cfg.to_dict()) if k != "train.precision"]
            if differ:
                raise UsageError(f"`resume`: the config differs from the one {out} was trained with, in: "
                                 f"{', '.join(differ)}; resume with the same config (or start a new run folder)")
        elif (out / "state.json").is_file() or (out / "last.safetensors").is_file():
            if not overwrite:
                raise RetrievalError(f"{out} already holds a training run; use `resume` to continue it, "
                                     "`overwrite` to start afresh, or another run folder")
            for old in [*out.glob("state*"), *out.glob("last.*"), *out.glob("best.*"), out / "metrics.jsonl",
                        out / "card.md"]:
                old.unlink(missing_ok=True)
        if group is not None:  # the run folder is fine: the other processes may start
            group.release({"config": cfg.to_dict(), "out": str(out), "resume": resume})
        with _cpu_threads(dev, threads):
            trainer = build_trainer(cfg, out, dev, data_root, progress, on_step, group)
            if not resume:
                atomic_write_json(out / "config.json", cfg.to_dict())
            threads_note = f"{torch.get_num_threads()} threads, " if dev.type == "cpu" else ""
            where = f"{dev.type} ({threads_note}{trainer.precision})"
            if group is not None:
                where = f"{group.world_size} processes ({group.backend}; rank 0 on {where})"
            logger.info(
                f"training {cfg.name}: {cfg.tower.name} tower, {cfg.objective.name} objective, "
                f"{len(trainer.images):,} images ({len(trainer.val_labels) if trainer.val_labels is not None else 0:,} "
                f"for validation), {trainer.epochs} epochs x {trainer.steps_per_epoch} steps on {where} -> {out}")
            try:
                trainer.run(resume=resume)
            finally:
                _write_card(out)  # finished or interrupted: the card says which


def _write_card(out: Path) -> None:
    """The run's model card (retrieval.cards); a failure to write it is a warning, never the run's outcome."""
    from retrieval.cards import write_run_card

    try:
        write_run_card(out)
    except (OSError, RetrievalError, ValueError, TypeError, KeyError) as e:
        logger.warning(f"could not write the model card {out / 'card.md'}: {e}")


def config_sha256(cfg: Config) -> str:
    """What a training state is checked against on resume: the config, less train.precision (a run may resume in
    another precision, with a warning, as under another thread count; runs saved before the key existed match)."""
    plain = cfg.to_dict()
    del plain["train"]["precision"]
    return hashlib.sha256(json.dumps(plain, sort_keys=True).encode()).hexdigest()


# the data layer names its arguments in backticks; here they are the config's data.* keys
_DATA_ARGUMENT = re.compile(r"`(classes|exclude|subset)`")


def build_trainer(cfg: Config, out: Path, dev: torch.device, data_root=None, progress: bool = True,
                  on_step: Callable[[StepInfo], None] | None = None, group: ProcessGroup | None = None) -> Trainer:
    """Everything a resolved config describes: data (on `dev`), validation slice, seeded tower, objective,
    sampler, augmentation, optimizer and schedule, composed into a Trainer that writes to `out`. With a process
    `group`: batch norm over the global batch and this process's share of each batch."""
    d, t, o, a, seed = cfg.data, cfg.tower, cfg.objective, cfg.augment, cfg.seed
    try:
        ds = load_dataset(d.spec, root=data_root, classes=d.classes or None, exclude=d.exclude or None,
                          subset=d.subset or None, seed=seed)
    except UsageError as e:
        raise UsageError(_DATA_ARGUMENT.sub(r"data.\1", str(e))) from None
    val_size = d.val_size
    if val_size and val_size > len(ds) // 5:
        capped = len(ds) // 5
        logger.info(f"data.val_size {val_size} is more than a fifth of the {len(ds):,} images; validating on {capped:,}")
        val_size = capped
    train_pos, val_pos = split_validation(ds.labels, val_size, seed)
    train_labels = ds.labels[train_pos]
    classes_seen = [ds.classes[i] for i in torch.unique(train_labels).tolist()]
    mirror_labels = class_indices(ds.classes, a.non_digit_mirrors, d.spec, "augment.non_digit_mirrors")
    with torch.random.fork_rng(devices=[]):  # seeded initial weights without touching the caller's RNG
        torch.manual_seed(derive_seed(seed, "init"))
        tower = build_tower(t.name, t.embedding_size or None, t.deskew, t.test_shifts)
        objective = build_objective(o.name, tower.embedding_size, o.miner, o.loss_args, o.miner_args)
    precision = resolve_precision(cfg.train.precision, dev)
    tower.to(dev, memory_format=torch.channels_last)
    objective.to(dev)
    sampler = SAMPLERS[cfg.sampler.name](train_labels, cfg.train.batch_size, cfg.sampler.m, seed)
    if group is not None:
        tower = group.sync_batchnorm(tower)
        sampler = ShardedBatchSampler(sampler, group.rank, group.world_size)
    augment = BatchAugment(a.degrees, a.translate, a.scale, a.shear, a.group)
    degrade = DegradeAugment(a.lowres, a.blur, a.stroke, a.noise, a.contrast, a.degrade_p, a.edges, a.bands)
    params = list(tower.parameters()) + list(objective.parameters())
    optimizer, scheduler = build_optimizer(cfg.optimizer, params, cfg.train.epochs * len(sampler))
    data_meta = {"spec": d.spec, "classes": list(d.classes) or None, "exclude": list(d.exclude) or None,
                 "subset": d.subset or None, "filters": ds.filters, "train_images": len(train_pos),
                 "val_images": len(val_pos), "val_seed": seed}
    checkpoint_meta = {
        "objective": objective.describe(),
        "data": data_meta,
        "classes": ds.classes,
        "classes_seen": classes_seen,
        "preprocessing": ds.preprocessing,
        "config": cfg.name,
        "precision": precision,
        "seed": seed,
        "epochs": cfg.train.epochs,
        "sampler": sampler.describe(),
        "augment": {**augment.describe(), "elastic": a.elastic, "composite_classes": a.composite_classes,
                    "dihedral_classes": a.dihedral_classes,
                    **({"degrade": degrade.describe()} if degrade.enabled else {}),
                    **({"non_digit_slots": a.non_digit_slots} if a.non_digit_slots else {}),
                    **({"non_digit_mirrors": list(a.non_digit_mirrors)} if a.non_digit_mirrors else {}),
                    **({"non_digit_overlays": True} if a.non_digit_overlays else {})},
    }
    if group is not None:
        checkpoint_meta["distributed"] = group.describe()
    state_meta = {"config_sha256": config_sha256(cfg)}
    val_images = ds.images[val_pos].to(dev) if len(val_pos) else None
    val_labels = ds.labels[val_pos] if len(val_pos) else None
    return Trainer(
        tower, objective, sampler, augment, optimizer, scheduler,
        images=ds.images[train_pos].to(dev), labels=train_labels.to(dev),
        epochs=cfg.train.epochs, seed=seed, device=dev, out_dir=out,
        val_images=val_images, val_labels=val_labels,
        checkpoint_meta=checkpoint_meta, state_meta=state_meta,
        progress=progress, on_step=on_step,
        elastic=(Chain(ElasticAugment(a.elastic) if a.elastic else None, degrade) if degrade.enabled
                 else ElasticAugment(a.elastic) if a.elastic else None),  # after the affine: elastic, then degrade
        class_expansions=build_class_expansions(a.composite_classes, a.dihedral_classes, len(ds.classes), sampler.m,
                                                 a.non_digit_slots, mirror_labels,
                                                 a.non_digit_overlays),
        group=group,
        precision=precision,
    )
