"""The training loop: a Trainer runs epochs of steps over built collaborators, validates after each epoch and
keeps the run folder (retrieval.run_folder) current: checkpoints, metrics.jsonl, the training state."""

from __future__ import annotations

import logging
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from tqdm import tqdm

from retrieval.checkpoint import save_checkpoint
from retrieval.distributed import ProcessGroup, is_comm_error
from retrieval.embed import embed_images
from retrieval.errors import RetrievalError
from retrieval.fsutil import atomic_write_text
from retrieval.logs import show_progress
from retrieval.metrics import retrieval_metrics
from retrieval.objectives import Objective
from retrieval.precision import resolve_precision
from retrieval.run_folder import LAST, RunFolder
from retrieval.seeding import make_generator
from retrieval.towers import Tower
from retrieval.training.batches import Batches
from retrieval.training.control import (
    STOP_CHECK_STEPS, StopRequest, TrainingInterrupted, above_bars, lost_contact_message,
)
from retrieval.training.state import load_state, save_state, warn_if_setup_differs
from retrieval.training.step import EpochTotals, TrainStep

logger = logging.getLogger(__name__)


@dataclass
class StepInfo:
    """What an on_step callback sees after each optimizer step."""

    epoch: int  # 0-based epoch in progress
    step: int  # steps done in this epoch
    global_step: int
    steps_per_epoch: int
    loss: torch.Tensor  # this step's loss (detached, on the training device)
    trainer: "Trainer"


@dataclass(frozen=True)
class TrainerSettings:
    """A Trainer's settings beyond its collaborators. precision: the tower's arithmetic in training and validation:
    auto (bf16 where `device` has native bfloat16 units), fp32 or bf16 (retrieval.precision). checkpoint_meta: what
    every checkpoint's sidecar records; state_meta: what the training state records and a resume must match."""

    epochs: int
    seed: int
    device: torch.device
    precision: str | None = "auto"
    progress: bool = True
    on_step: Callable[[StepInfo], None] | None = None
    checkpoint_meta: Mapping[str, Any] = field(default_factory=dict)
    state_meta: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Validation:
    """The held-out slice validated after each epoch: each image queried against the others of the slice."""

    images: torch.Tensor  # uint8 (N, H, W) on the training device
    labels: torch.Tensor

    def __len__(self) -> int:
        return len(self.images)

    def __call__(self, tower: Tower, device: torch.device, precision: str) -> dict[str, float]:
        emb = embed_images(tower, self.images, device=device, precision=precision)
        scores = retrieval_metrics(emb, self.labels.numpy(), ks=(1,))  # leave-one-out within the slice
        return {"val_precision_at_1": scores.precision[1], "val_map_at_r": scores.map_at_r}


class Trainer:
    """Runs the training loop over a composition of parts; owns nothing global (device and data are passed in).

    tower; objective (it may carry a trainable head); batches: each step's batch (sampler, augmentation);
    optimizer, scheduler: torch objects over the tower's and the objective's parameters, the scheduler stepped once
    per optimizer step; out_dir: the run folder. group: the process group of a distributed run (then the batches'
    sampler is a ShardedBatchSampler and the tower's batch norm global): rank 0 alone validates, writes the run
    folder, logs and draws the progress bar.
    """

    def __init__(self, tower: Tower, objective: Objective, batches: Batches, optimizer: torch.optim.Optimizer,
                 scheduler, settings: TrainerSettings, out_dir: str | Path, *, validation: Validation | None = None,
                 group: ProcessGroup | None = None):
        self.tower, self.objective, self.batches = tower, objective, batches
        self.optimizer, self.scheduler, self.validation = optimizer, scheduler, validation
        self.epochs, self.seed, self.device = settings.epochs, settings.seed, settings.device
        self.precision = resolve_precision(settings.precision, self.device)  # fp32 or bf16
        self.run_folder = RunFolder(out_dir)
        self.out_dir = self.run_folder.path
        self.checkpoint_meta = dict(settings.checkpoint_meta or {})
        self.state_meta = dict(settings.state_meta or {})
        self.progress, self.on_step = settings.progress, settings.on_step
        self.steps_per_epoch = batches.steps_per_epoch
        self.epoch, self.step, self.global_step = 0, 0, 0
        self.best: dict | None = None
        self.history: list[dict] = []
        self.train_seconds = 0.0
        # One entry per run of the loop (the first, then each resume): where it started and how many optimizer
        # steps it executed, counted in the loop itself, so a resume that silently restarted shows in state.json.
        self.sessions: list[dict] = []
        self.session: dict = {}
        self.running_loss = float("nan")
        self.totals = EpochTotals(self.device)
        self.group = group
        self.is_main = group is None or group.is_main  # the process that validates, writes, logs, draws the bar
        self.loss_scale = 1.0
        if group is None:
            self.loss_step: torch.nn.Module = TrainStep(tower, objective, self.device, self.precision)
        else:
            if batches.rows is None:
                raise ValueError("a distributed Trainer needs a ShardedBatchSampler")
            step_objective = objective.distributed()
            self.loss_scale = step_objective.loss_scale
            # DistributedDataParallel around tower and objective: it averages the gradients over the processes
            self.loss_step = group.wrap(TrainStep(tower, step_objective, self.device, self.precision))
        self._consistent = True  # False while weights/optimizer are mid-update: nothing may be saved then

    # -- the parts, as callers name them -------------------------------------------------------------------
    @property
    def sampler(self):
        return self.batches.sampler

    @property
    def images(self) -> torch.Tensor:
        return self.batches.images

    @property
    def labels(self) -> torch.Tensor:
        return self.batches.labels

    @property
    def images_per_step(self) -> int:
        """Images of one optimizer step, over all processes."""
        return self.batches.images_per_step

    def make_batch(self, positions: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch of `positions` (Batches.make)."""
        return self.batches.make(positions, generator)

    def epoch_plan(self, epoch: int) -> torch.Tensor:
        """The positions of each step's batch of `epoch` (Batches.plan)."""
        return self.batches.plan(epoch)

    # -- one step ------------------------------------------------------------------------------------------
    def train_step(self, x: torch.Tensor, y: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Forward (TrainStep: the tower in the trainer's precision, the objective in fp32), backward, optimizer
        and scheduler step; returns the loss. Distributed: on this process's rows, DDP averaging the gradients of
        the global batch's loss over the processes; the loss returned is the global batch's (the same on every
        process)."""
        self.tower.train()
        self.objective.train()
        loss = self.loss_step(x, y, generator)
        value = loss.detach() / self.loss_scale if self.loss_scale != 1 else loss.detach()
        if self.device.type == "cpu":
            self.check_finite(float(value))
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.scheduler.step()
        return value

    def stop_agreed(self, requested: bool) -> bool:
        """Whether to stop after this step: Ctrl-C reaches the processes at different moments (or only those of
        one machine), so in a distributed run they agree to stop after the same step; they compare notes every
        STOP_CHECK_STEPS steps and at epoch ends (each check is one more point where every process waits for the
        slowest), so a distributed run stops up to that many steps after Ctrl-C."""
        if self.group is None:
            return requested
        if self.step % STOP_CHECK_STEPS and self.step != self.steps_per_epoch:
            return False
        return self.group.any(requested)

    def check_finite(self, loss: float) -> None:
        if not math.isfinite(loss):
            raise RetrievalError(
                f"training diverged: loss is {loss} at epoch {self.epoch + 1}, step {self.step + 1}; "
                "lower optimizer.lr or change the objective's settings"
            )

    def validate(self) -> dict[str, float]:
        if self.validation is None or len(self.validation) == 0:
            return {}
        return self.validation(self.tower, self.device, self.precision)

    # -- the loop ------------------------------------------------------------------------------------------
    def run(self, resume: bool = False) -> Path:
        """Train to the last epoch (continuing from the saved state when resume=True); returns the run folder."""
        if resume and not self._resume():
            return self.out_dir
        self._begin_session(resume)
        bar = tqdm(total=self.epochs * self.steps_per_epoch, initial=self.global_step, desc="train", unit="step",
                   disable=not (self.is_main and show_progress(self.progress)), dynamic_ncols=True, mininterval=0.5,
                   file=sys.stderr)
        self._consistent = True
        try:
            with StopRequest() as stop:
                self._train_epochs(bar, stop)
        except KeyboardInterrupt:
            bar.close()
            raise self._interrupted() from None
        except Exception as e:
            bar.close()
            if self.group is not None and is_comm_error(e):
                raise RetrievalError(lost_contact_message(self.group, e, f"at epoch {self.epoch + 1}, step "
                                                                         f"{self.step + 1}")) from None
            raise
        bar.close()
        return self.out_dir

    def _resume(self) -> bool:
        """Load the saved state; False when that run is already finished (nothing to do)."""
        self.load_state()
        if self.epoch >= self.epochs:
            if self.is_main:
                logger.info(f"{self.out_dir}: training already finished ({self.epochs} epochs); nothing to do")
            return False
        if self.is_main:
            logger.info(f"resuming {self.out_dir} at epoch {self.epoch + 1}, step {self.step} of "
                        f"{self.steps_per_epoch}")
        return True

    def _begin_session(self, resume: bool) -> None:
        self.session = {"started_at_step": self.global_step, "steps_run": 0, "device": self.device.type,
                        "threads": self._threads(), "processes": self.group.world_size if self.group else 1,
                        "precision": self.precision}
        if resume:
            warn_if_setup_differs(self)
        self.tower.to(self.device)
        self.objective.to(self.device)

    def _train_epochs(self, bar: tqdm, stop: StopRequest) -> None:
        while self.epoch < self.epochs:
            plan = self.epoch_plan(self.epoch).to(self.device)
            while self.step < self.steps_per_epoch:
                self._run_step(plan, bar)
                if self.stop_agreed(stop.requested):
                    raise KeyboardInterrupt
            self._consistent = False  # validation and checkpoints: a forced stop here keeps the older state
            self._end_epoch()
            bar.set_postfix_str(self._postfix())
            self._consistent = True
            if self.stop_agreed(stop.requested):
                raise KeyboardInterrupt

    def _run_step(self, plan: torch.Tensor, bar: tqdm) -> None:
        """The next step of the epoch: its seeded batch, the optimizer step, the totals, the bar, on_step."""
        t0 = time.perf_counter()
        self._consistent = False
        g = make_generator(self.seed, "step", self.epoch, self.step)
        x, y = self.make_batch(plan[self.step], g)
        loss = self.train_step(x, y, g)
        self.step += 1
        self.global_step += 1
        self.session["steps_run"] += 1
        self._consistent = True
        self.totals.loss_sum += loss
        if self.device.type == "cpu" or self.step % 20 == 0:  # .item() syncs a GPU: not every step
            self.running_loss = float(loss)
            self.check_finite(self.running_loss)
        self.totals.steps += 1
        dt = time.perf_counter() - t0
        self.totals.seconds += dt
        self.train_seconds += dt
        bar.update(1)
        if bar.n % 5 == 0 or self.step == self.steps_per_epoch:
            bar.set_postfix_str(self._postfix(), refresh=False)
        if self.on_step is not None:
            self.on_step(StepInfo(self.epoch, self.step, self.global_step, self.steps_per_epoch, loss, self))

    def _interrupted(self) -> TrainingInterrupted:
        """After Ctrl-C: save `last` and the state when the weights are consistent; the exception to raise."""
        if not self._consistent:
            return TrainingInterrupted(
                f"stopped at once; the last saved state (epoch {len(self.history)}) is kept in {self.out_dir}",
                saved=False, run_dir=self.out_dir)
        if self.is_main:
            self.save_state()
            save_checkpoint(self.run_folder.last, self.tower, self.objective.head,
                            **self._checkpoint_meta(interrupted=True))
        if self.group is not None:  # the others wait: torchrun stops the job when a process exits non-zero
            self.group.barrier()
        return TrainingInterrupted(
            f"interrupted at epoch {self.epoch + 1}, step {self.step}/{self.steps_per_epoch}; saved "
            f"{self.run_folder.weights(LAST)} and the training state", saved=True, run_dir=self.out_dir)

    def _threads(self) -> int | None:
        return torch.get_num_threads() if self.device.type == "cpu" else None

    def _postfix(self) -> str:
        lr = self.scheduler.get_last_lr()[0]
        last = self.history[-1] if self.history else {}
        # between epochs (totals just reset) show the finished epoch's speed rather than 0
        totals = self.totals
        ips = (totals.steps * self.images_per_step / max(totals.seconds, 1e-9) if totals.steps
               else last.get("images_per_s", 0.0))
        val = f" val MAP@R {last['val_map_at_r']:.4f}" if "val_map_at_r" in last else ""
        return (f"epoch {min(self.epoch + 1, self.epochs)}/{self.epochs} loss {self.running_loss:.4f} lr {lr:.2e} "
                f"{ips:,.0f} img/s{val}")

    # -- the end of an epoch ---------------------------------------------------------------------------------
    def _end_epoch(self) -> None:
        """Rank 0: validate, record, save (checkpoints, then metrics, then the state: a crash in between repeats
        this epoch, identically) and log; the other processes move on to the next epoch."""
        if not self.is_main:
            self._next_epoch()
            return
        record = self._epoch_record()
        improved = "val_map_at_r" in record and (self.best is None or record["val_map_at_r"] > self.best["val_map_at_r"])
        record["best"] = improved
        self.history.append(record)
        self._next_epoch()
        if improved:
            self.best = {k: record[k] for k in ("epoch", "val_precision_at_1", "val_map_at_r")}
            save_checkpoint(self.run_folder.best, self.tower, self.objective.head, **self._checkpoint_meta())
        save_checkpoint(self.run_folder.last, self.tower, self.objective.head, **self._checkpoint_meta())
        self._write_metrics()
        self.save_state()
        self._log_epoch(record, improved)

    def _next_epoch(self) -> None:
        self.epoch += 1
        self.step = 0
        self.totals = EpochTotals(self.device)

    def _epoch_record(self) -> dict:
        totals = self.totals
        record = {
            "epoch": self.epoch + 1,
            "global_step": self.global_step,
            "loss": float(totals.loss_sum) / max(totals.steps, 1),
            "lr": self.scheduler.get_last_lr()[0],
            "images_per_s": totals.steps * self.images_per_step / max(totals.seconds, 1e-9),
            "epoch_seconds": totals.seconds,
            "train_seconds": self.train_seconds,
        }
        t0 = time.perf_counter()
        record.update(self.validate())
        record["val_seconds"] = time.perf_counter() - t0
        return record

    def _log_epoch(self, record: dict, improved: bool) -> None:
        val = (f"  val precision@1 {record['val_precision_at_1']:.4f}  MAP@R {record['val_map_at_r']:.4f}"
               + ("  (best)" if improved else "")) if "val_map_at_r" in record else ""
        above_bars(
            f"epoch {record['epoch']}/{self.epochs}: loss {record['loss']:.4f}  {record['images_per_s']:,.0f} img/s"
            f"  {record['epoch_seconds']:.1f}s{val}"
        )

    def _checkpoint_meta(self, interrupted: bool = False) -> dict:
        last = self.history[-1] if self.history else {}
        meta = {**self.checkpoint_meta, "epoch": self.epoch, "global_step": self.global_step}
        if interrupted:
            meta.update(interrupted=True, step_in_epoch=self.step)
        if "val_map_at_r" in last:
            meta["val"] = {"epoch": last["epoch"], "precision_at_1": last["val_precision_at_1"],
                           "map_at_r": last["val_map_at_r"]}
        return meta

    def _write_metrics(self) -> None:
        atomic_write_text(self.run_folder.metrics, self.run_folder.history_text(self.history))

    # -- the training state (retrieval.training.state) ---------------------------------------------------------
    def save_state(self) -> None:
        save_state(self)

    def load_state(self) -> None:
        load_state(self)
