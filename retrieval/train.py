"""Training a Siamese tower: a PML-style composition of tower, objective (loss + miner, or pair head), batch
sampler, device-side augmentation, AdamW and a learning-rate schedule, with per-epoch validation and a run folder.

Run folder (everything written to a temp name and renamed):
  config.json        the resolved config
  metrics.jsonl      one record per epoch (loss, lr, images/s, validation precision@1 and MAP@R)
  last.*, best.*     checkpoints (retrieval.checkpoint): best by validation MAP@R
  state.json + state-*.safetensors   the training state for --resume (weights, optimizer, scheduler, position)

Reproducibility: every random choice of epoch e, step s is drawn from a generator seeded with (seed, e, s), so
the training state is just weights + optimizer + scheduler + position, and a resumed run ends with the same weights
as an uninterrupted one (bit for bit on CPU with the same thread count).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import shutil
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
import torchvision.transforms.v2.functional as TF
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from retrieval.checkpoint import fingerprint_state, save_checkpoint
from retrieval.config import config_diff, load_config, resolve_config
from retrieval.embed import embed_images
from retrieval.errors import RetrievalError, UsageError
from retrieval.fsutil import atomic_path, atomic_write_json, atomic_write_text, ensure_writable_dir, exclusive_lock, read_json
from retrieval.metrics import retrieval_metrics
from retrieval.objectives import build_objective
from retrieval.towers import Tower, build_tower

STATE_FORMAT = "retrieval-train-state/1"
Log = Callable[[str], None]


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr)


# ------------------------------------------------------------------------------------------------ randomness
def derive_seed(seed: int, *parts: Any) -> int:
    """A 63-bit seed that is a pure function of (seed, parts): independent streams per purpose/epoch/step."""
    digest = hashlib.blake2b(repr((seed, *parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def make_generator(seed: int, *parts: Any) -> torch.Generator:
    return torch.Generator().manual_seed(derive_seed(seed, *parts))


# ------------------------------------------------------------------------------------------------ samplers
class ClassBalancedBatchSampler:
    """Class-balanced batches, as PML's MPerClassSampler: each batch is batch_size/m class slots of m images.

    Unlike MPerClassSampler it is seeded (no global NumPy state), addressable by epoch, gives classes slots in
    proportion to their size and draws each class's images without replacement (so an epoch sees about every
    image once), and allows more slots than classes (with MNIST's 10 classes, batch 256 = 16 slots of 16: every
    class once, six of them twice).
    """

    name = "m-per-class"

    def __init__(self, labels: torch.Tensor, batch_size: int, m: int, seed: int):
        if batch_size % m:
            raise UsageError(f"batch size {batch_size} must be a multiple of m={m} for the m-per-class sampler")
        labels = labels.detach().to("cpu")
        self.batch_size, self.m, self.seed = batch_size, m, seed
        self.classes = torch.unique(labels)
        self.members = [torch.nonzero(labels == c).flatten() for c in self.classes]
        self.num_batches = len(labels) // batch_size
        if self.num_batches == 0:
            raise UsageError(f"batch size {batch_size} is larger than the {len(labels)} training images")

    def __len__(self) -> int:
        return self.num_batches

    def epoch_batches(self, epoch: int) -> torch.Tensor:
        """(num_batches, batch_size) int64 positions into the training set, a pure function of (seed, epoch)."""
        g = make_generator(self.seed, "sampler", epoch)
        n_classes, slots = len(self.classes), self.batch_size // self.m
        full, extra = divmod(slots, n_classes)
        share = torch.tensor([len(m) for m in self.members], dtype=torch.float64)
        share /= share.sum()
        used = torch.zeros(n_classes, dtype=torch.float64)
        per_batch = []
        for b in range(self.num_batches):
            # the extra slots go to the classes furthest behind their share of the data (random among equals),
            # so over an epoch each class is drawn in proportion to its size and images repeat only at the end
            deficit = share * (b + 1) * slots - used - full + torch.rand(n_classes, generator=g, dtype=torch.float64) * 1e-3
            chosen = torch.argsort(deficit, descending=True)[:extra]
            slot_classes = torch.cat([torch.arange(n_classes).repeat(full), chosen])
            used += torch.bincount(slot_classes, minlength=n_classes)
            per_batch.append(slot_classes[torch.randperm(len(slot_classes), generator=g)])
        slot_classes = torch.stack(per_batch)  # (num_batches, slots)
        need = torch.bincount(slot_classes.flatten(), minlength=n_classes) * self.m
        streams = []  # per class: concatenated permutations of its members, long enough for the epoch
        for members, k in zip(self.members, need.tolist()):
            reps = -(-k // len(members)) if k else 0
            streams.append(torch.cat([members[torch.randperm(len(members), generator=g)] for _ in range(reps)])
                           if reps else members[:0])
        cursor = [0] * n_classes
        out = torch.empty(self.num_batches, self.batch_size, dtype=torch.long)
        for b in range(self.num_batches):
            for s, c in enumerate(slot_classes[b].tolist()):
                out[b, s * self.m : (s + 1) * self.m] = streams[c][cursor[c] : cursor[c] + self.m]
                cursor[c] += self.m
        return out

    def describe(self) -> dict:
        return {"name": self.name, "m": self.m, "batch_size": self.batch_size}


class RandomBatchSampler:
    """Plain shuffled batches (each image once per epoch, the remainder dropped), a pure function of (seed, epoch)."""

    name = "random"

    def __init__(self, labels: torch.Tensor, batch_size: int, seed: int):
        self.n, self.batch_size, self.seed = len(labels), batch_size, seed
        self.num_batches = self.n // batch_size
        if self.num_batches == 0:
            raise UsageError(f"batch size {batch_size} is larger than the {self.n} training images")

    def __len__(self) -> int:
        return self.num_batches

    def epoch_batches(self, epoch: int) -> torch.Tensor:
        perm = torch.randperm(self.n, generator=make_generator(self.seed, "sampler", epoch))
        return perm[: self.num_batches * self.batch_size].view(self.num_batches, self.batch_size)

    def describe(self) -> dict:
        return {"name": self.name, "batch_size": self.batch_size}


# ------------------------------------------------------------------------------------------------ augmentation
class BatchAugment:
    """Small random affine (rotation, translation, zoom, shear) on a float batch on its device, through
    torchvision.transforms.v2.functional.affine. One random transform per group of `group` images: the v2 kernel
    takes one set of parameters per call, and groups keep the number of calls per batch small."""

    def __init__(self, degrees: float = 10.0, translate: float = 0.1, scale: tuple[float, float] = (0.9, 1.1),
                 shear: float = 0.0, group: int = 8):
        self.degrees, self.translate, self.scale, self.shear, self.group = degrees, translate, tuple(scale), shear, group

    @property
    def enabled(self) -> bool:
        return bool(self.degrees or self.translate or self.shear or self.scale != (1.0, 1.0))

    def __call__(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        if not self.enabled:
            return x
        chunks = x.split(self.group)
        u = torch.rand(len(chunks), 5, generator=generator, dtype=torch.float64).mul_(2).sub_(1).tolist()
        h, w = x.shape[-2:]
        lo, hi = self.scale
        out = []
        for chunk, (a, tx, ty, s, sh) in zip(chunks, u):
            out.append(TF.affine(
                chunk, angle=a * self.degrees, translate=[tx * self.translate * w, ty * self.translate * h],
                scale=lo + (s + 1) / 2 * (hi - lo), shear=[sh * self.shear, 0.0],
                interpolation=TF.InterpolationMode.BILINEAR,  # uncovered pixels are 0 (background)
            ))
        return torch.cat(out)

    def describe(self) -> dict:
        return {"degrees": self.degrees, "translate": self.translate, "scale": list(self.scale),
                "shear": self.shear, "group": self.group, "kernel": "torchvision.transforms.v2.functional.affine"}


class ElasticAugment:
    """Elastic distortion (Simard et al., 2003): every image is warped by its own smooth random displacement
    field, drawn on a coarse 4x4 grid and upsampled bicubically, moving pixels by at most `pixels` pixels. It
    imitates handwriting's wobble, which affine transforms cannot, and teaches invariances that hold for any
    digit (useful for classes never seen in training)."""

    def __init__(self, pixels: float = 0.0):
        self.pixels = float(pixels)

    def __call__(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        if not self.pixels:
            return x
        n, _, h, w = x.shape
        coarse = torch.rand(n, 2, 4, 4, generator=generator).mul_(2).sub_(1).to(x.device)
        field = torch.nn.functional.interpolate(coarse, size=(h, w), mode="bicubic", align_corners=True)
        field = field.clamp_(-1, 1).permute(0, 2, 3, 1) * torch.tensor([2 * self.pixels / w, 2 * self.pixels / h],
                                                                           device=x.device)
        ys = torch.linspace(-1 + 1 / h, 1 - 1 / h, h, device=x.device)
        xs = torch.linspace(-1 + 1 / w, 1 - 1 / w, w, device=x.device)
        identity = torch.stack(torch.meshgrid(xs, ys, indexing="xy"), dim=-1)  # (h, w, 2) as (x, y)
        return torch.nn.functional.grid_sample(x, identity + field, mode="bilinear", padding_mode="zeros",
                                               align_corners=False)


class CompositeClasses:
    """Class expansion by composition: with probability `p`, the `group` images of a class slot (class a) are
    cut in half, top/bottom or left/right, and completed by the other halves of another slot's images
    (class b); the triple (a, b, cut) counts as a class of its own, num_classes + (cut * num_classes + a) *
    num_classes + b. Six digits give 60 such classes of strokes in new arrangements (the top of a 9 on the
    bottom of a 6 is a double loop no training digit has): more to tell apart, so features carry over better
    to classes never seen. Halves of two slots of the same class keep that class's label."""

    CUTS = ("top/bottom", "left/right")

    def __init__(self, p: float, num_classes: int, group: int = 1):
        self.p, self.num_classes, self.group = float(p), int(num_classes), max(1, int(group))

    def __call__(self, x: torch.Tensor, y: torch.Tensor, generator: torch.Generator):
        m, n_groups = self.group, len(x) // self.group
        if not self.p or n_groups < 2:
            return x, y
        chosen = torch.rand(n_groups, generator=generator) < self.p
        partner = torch.randint(0, n_groups - 1, (n_groups,), generator=generator)
        partner += partner >= torch.arange(n_groups)  # any slot but itself
        cut = torch.randint(0, len(self.CUTS), (n_groups,), generator=generator)
        chosen, partner, cut = chosen.to(x.device), partner.to(x.device), cut.to(x.device)
        n = n_groups * m
        xg, yg = x[:n].unflatten(0, (n_groups, m)), y[:n].view(n_groups, m)
        h, w = x.shape[-2:]
        lower = (torch.arange(h, device=x.device) >= h // 2).view(h, 1).expand(h, w)
        right = (torch.arange(w, device=x.device) >= w // 2).view(1, w).expand(h, w)
        from_partner = torch.where(cut.view(-1, 1, 1) == 0, lower, right) & chosen.view(-1, 1, 1)  # (G, H, W)
        out = torch.where(from_partner[:, None, None], xg[partner], xg).flatten(0, 1)
        a, b, k = yg[:, 0], yg[partner, 0], self.num_classes
        relabel = chosen & (a != b)
        labels = torch.where(relabel.view(-1, 1), (k + (cut * k + a) * k + b).view(-1, 1), yg).flatten()
        return torch.cat([out, x[n:]]), torch.cat([labels, y[n:]])


class DihedralClasses:
    """Class expansion: each group of `group` consecutive images (one class slot of the m-per-class sampler)
    is turned by one of the 8 symmetries of the square (rotation by 0, 90, 180 or 270 degrees, mirrored or not)
    and the pair (class, symmetry) counts as a class of its own, label * 8 + symmetry. Six digits become 48
    classes of strokes in new arrangements: features learnt to tell those apart carry over to classes never
    seen (as rotated classes do for Omniglot in Prototypical Networks)."""

    def __init__(self, group: int = 1):
        self.group = max(1, int(group))

    def __call__(self, x: torch.Tensor, y: torch.Tensor, generator: torch.Generator):
        n_groups = -(-len(x) // self.group)
        sym = torch.randint(0, 8, (n_groups,), generator=generator).repeat_interleave(self.group)[: len(x)]
        sym = sym.to(x.device)
        out = x.clone()
        for s in range(8):
            rows = torch.nonzero(sym == s).flatten()
            if len(rows):
                out[rows] = self.apply(x[rows], s)
        return out, y * 8 + sym

    @staticmethod
    def apply(x: torch.Tensor, symmetry: int) -> torch.Tensor:
        """Symmetry s of the square on (..., H, W) images: mirror left-right when s >= 4, then rotate by
        (s mod 4) quarter turns counter-clockwise."""
        if symmetry >= 4:
            x = torch.flip(x, dims=(-1,))
        return torch.rot90(x, symmetry % 4, dims=(-2, -1)) if symmetry % 4 else x


# ------------------------------------------------------------------------------------------------ devices
def available_cores() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


def resolve_device(device: str | torch.device | None) -> torch.device:
    """None / "auto" -> CUDA when available, else CPU; an explicit CUDA device that is missing is an error."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise UsageError(f"--device {device!r}: expected cpu, cuda, cuda:N or auto") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {device}: CUDA is not available on this machine (use cpu)")
    if dev.type not in ("cpu", "cuda"):
        raise UsageError(f"--device {device}: only cpu and cuda are supported")
    return dev


@contextlib.contextmanager
def _cpu_threads(device: torch.device, threads: int | None = None):
    """On CPU use `threads` (default: every core this process may run on); restore the caller's setting after."""
    if device.type != "cpu":
        yield
        return
    if threads is not None and threads < 1:
        raise UsageError(f"--threads must be a positive number, got {threads}")
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

    def __init__(self, log: Log):
        self.requested = False
        self._log = log
        self._previous = None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        self._log("\nCtrl-C: stopping after this step and saving (press again to stop at once, without saving)")

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


class Trainer:
    """Runs the training loop over a composition of parts; owns nothing global (device and data are passed in).

    tower, objective: modules (the objective may carry a trainable head); sampler: .epoch_batches(epoch) ->
    (steps, batch) positions into `images`; augment: callable(batch, generator); optimizer, scheduler: torch
    objects over the tower's and the objective's parameters, the scheduler stepped once per optimizer step.
    """

    def __init__(
        self,
        tower: Tower,
        objective: torch.nn.Module,
        sampler,
        augment: BatchAugment,
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
        log: Log = _stderr,
        progress: bool = True,
        on_step: Callable[[StepInfo], None] | None = None,
        elastic: ElasticAugment | None = None,
        class_expansions: Sequence[Callable] = (),
    ):
        self.tower, self.objective, self.sampler, self.augment = tower, objective, sampler, augment
        self.elastic, self.class_expansions = elastic, tuple(class_expansions)
        self.optimizer, self.scheduler = optimizer, scheduler
        self.images, self.labels = images, labels  # uint8 (N, H, W) and int64 (N,) on the training device
        self.val_images, self.val_labels = val_images, val_labels
        self.epochs, self.seed, self.device = epochs, seed, device
        self.out_dir = Path(out_dir)
        self.checkpoint_meta = dict(checkpoint_meta or {})
        self.state_meta = dict(state_meta or {})
        self.log, self.progress, self.on_step = log, progress, on_step
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

    def _reset_epoch_totals(self, loss_sum: float = 0.0, steps: int = 0, seconds: float = 0.0) -> None:
        self._loss_sum = torch.tensor(loss_sum, dtype=torch.float64, device=self.device)
        self._epoch_steps, self._epoch_seconds = steps, seconds

    # -- one step ------------------------------------------------------------------------------------------
    def make_batch(self, positions: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Index the on-device uint8 images, scale to [0, 1] and augment: the whole data path of a step."""
        x = self.images[positions].unsqueeze(1).float().div_(255.0)
        y = self.labels[positions]
        for expand in self.class_expansions:  # new classes made from the sampled ones (few-shot towers)
            x, y = expand(x, y, generator)
        x = self.augment(x, generator)
        if self.elastic is not None:
            x = self.elastic(x, generator)
        # channels-last: faster convolutions on CUDA and with oneDNN on CPU (~20% per step measured here)
        return x.contiguous(memory_format=torch.channels_last), y

    def train_step(self, x: torch.Tensor, y: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Forward (bf16 autocast on CUDA), objective, backward, optimizer and scheduler step; returns the loss."""
        self.tower.train()
        self.objective.train()
        if self.device.type == "cuda":
            with torch.autocast("cuda", dtype=torch.bfloat16):
                emb = self.tower(x)
        else:
            emb = self.tower(x)
        loss = self.objective(emb.float(), y, generator)
        if self.device.type == "cpu":
            self._check_finite(float(loss.detach()))
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.scheduler.step()
        return loss.detach()

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
        emb = embed_images(self.tower, self.val_images, device=self.device)
        scores = retrieval_metrics(emb, self.val_labels.numpy(), ks=(1,))  # leave-one-out within the slice
        return {"val_precision_at_1": scores.precision[1], "val_map_at_r": scores.map_at_r}

    # -- the loop ------------------------------------------------------------------------------------------
    def run(self, resume: bool = False) -> Path:
        """Train to the last epoch (continuing from the saved state when resume=True); returns the run folder."""
        if resume:
            self.load_state()
            if self.epoch >= self.epochs:
                self.log(f"{self.out_dir}: training already finished ({self.epochs} epochs); nothing to do")
                return self.out_dir
            self.log(f"resuming {self.out_dir} at epoch {self.epoch + 1}, step {self.step} of {self.steps_per_epoch}")
        self._session = {"started_at_step": self.global_step, "steps_run": 0, "device": self.device.type,
                         "threads": self._threads()}
        if resume:
            self._warn_if_threads_differ()
        self.tower.to(self.device)
        self.objective.to(self.device)
        total = self.epochs * self.steps_per_epoch
        bar = tqdm(total=total, initial=self.global_step, desc="train", unit="step", disable=not self.progress,
                   dynamic_ncols=True, mininterval=0.5, file=sys.stderr)
        consistent = True  # False while weights/optimizer are mid-update: nothing may be saved then
        try:
            with _StopRequest(self._write_log(bar)) as stop:
                while self.epoch < self.epochs:
                    plan = self.sampler.epoch_batches(self.epoch).to(self.device)
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
                        if stop.requested:
                            raise KeyboardInterrupt
                    consistent = False  # validation and checkpoints: a forced stop here keeps the older state
                    self._end_epoch(bar)
                    consistent = True
                    if stop.requested:
                        raise KeyboardInterrupt
        except KeyboardInterrupt:
            bar.close()
            if not consistent:
                raise TrainingInterrupted(
                    f"stopped at once; the last saved state (epoch {len(self.history)}) is kept in {self.out_dir}",
                    saved=False, run_dir=self.out_dir) from None
            self.save_state()
            save_checkpoint(self.out_dir / "last", self.tower, self.objective.head,
                            **self._ckpt_meta(interrupted=True))
            raise TrainingInterrupted(
                f"interrupted at epoch {self.epoch + 1}, step {self.step}/{self.steps_per_epoch}; saved "
                f"{self.out_dir / 'last.safetensors'} and the training state", saved=True, run_dir=self.out_dir) from None
        bar.close()
        return self.out_dir

    def _threads(self) -> int | None:
        return torch.get_num_threads() if self.device.type == "cpu" else None

    def _warn_if_threads_differ(self) -> None:
        # CPU kernels split reductions by thread, so another thread count changes the last bits of the weights.
        before = self.sessions[-1].get("threads") if self.sessions else None
        now = self._session["threads"]
        if before is not None and now is not None and before != now:
            self.log(f"warning: {self.out_dir} was trained with {before} CPU threads and resumes with {now}: "
                     f"training continues, but the weights will not be bit-identical to an uninterrupted run "
                     f"(resume with --threads {before} for that)")

    def _write_log(self, bar) -> Log:
        def write(msg: str) -> None:
            with tqdm.external_write_mode(file=sys.stderr):
                self.log(msg)
        return write

    def _postfix(self) -> str:
        lr = self.scheduler.get_last_lr()[0]
        last = self.history[-1] if self.history else {}
        # between epochs (totals just reset) show the finished epoch's speed rather than 0
        ips = (self._epoch_steps * self.sampler.batch_size / max(self._epoch_seconds, 1e-9) if self._epoch_steps
               else last.get("images_per_s", 0.0))
        val = f" val MAP@R {last['val_map_at_r']:.4f}" if "val_map_at_r" in last else ""
        return f"epoch {min(self.epoch + 1, self.epochs)}/{self.epochs} loss {self._running_loss:.4f} lr {lr:.2e} {ips:,.0f} img/s{val}"

    def _end_epoch(self, bar) -> None:
        record = {
            "epoch": self.epoch + 1,
            "global_step": self.global_step,
            "loss": float(self._loss_sum) / max(self._epoch_steps, 1),
            "lr": self.scheduler.get_last_lr()[0],
            "images_per_s": self._epoch_steps * self.sampler.batch_size / max(self._epoch_seconds, 1e-9),
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
        self._write_log(bar)(
            f"epoch {record['epoch']}/{self.epochs}: loss {record['loss']:.4f}  {record['images_per_s']:,.0f} img/s"
            f"  {record['epoch_seconds']:.1f}s{val}"
        )
        bar.set_postfix_str(self._postfix())

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
        if metrics.is_file():
            for line in metrics.read_text("utf-8").splitlines():
                if line.strip():
                    record = json.loads(line)
                    if record["epoch"] <= self.epoch:  # drop epochs done after the saved state (a crash)
                        self.history.append(record)


# ------------------------------------------------------------------------------------------------ from a config
def build_sampler(config: Mapping, labels: torch.Tensor):
    batch_size, seed = config["train"]["batch_size"], config["seed"]
    if config["sampler"]["name"] == "m-per-class":
        return ClassBalancedBatchSampler(labels, batch_size, config["sampler"]["m"], seed)
    return RandomBatchSampler(labels, batch_size, seed)


def build_augment(config: Mapping) -> BatchAugment:
    a = config["augment"]
    return BatchAugment(a["degrees"], a["translate"], tuple(a["scale"]), a["shear"], a["group"])


def build_optimizer(config: Mapping, params, steps_per_epoch: int):
    o, epochs = config["optimizer"], config["train"]["epochs"]
    optimizer = torch.optim.AdamW(params, lr=o["lr"], weight_decay=o["weight_decay"])
    total = epochs * steps_per_epoch
    if o["schedule"] == "one-cycle":
        scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=o["lr"], total_steps=total,
                                                        pct_start=o["warmup"])
    elif o["schedule"] == "cosine":
        warm = max(1, round(o["warmup"] * total))

        def factor(step: int) -> float:  # linear warm-up, then cosine to zero
            if step < warm:
                return (step + 1) / warm
            return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warm) / max(1, total - warm))))

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    else:
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    return optimizer, scheduler


def split_validation(labels: torch.Tensor, val_size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded (train positions, validation positions) of a training split."""
    perm = torch.randperm(len(labels), generator=make_generator(seed, "validation"))
    return perm[val_size:].sort().values, perm[:val_size].sort().values


def _as_config(config: Mapping | str | os.PathLike, overrides) -> dict:
    if isinstance(config, (str, os.PathLike)):
        return load_config(config, overrides)
    return resolve_config(config, overrides, source="config")


def train(
    config: Mapping | str | os.PathLike | None,
    out_dir: str | os.PathLike | None = None,
    device: str | torch.device | None = None,
    resume: bool = False,
    log: Log = _stderr,
    *,
    overrides: list[str] | tuple[str, ...] = (),
    data_root: str | os.PathLike | None = None,
    overwrite: bool = False,
    progress: bool = True,
    on_step: Callable[[StepInfo], None] | None = None,
    threads: int | None = None,
) -> Path:
    """Train a tower as `config` says (a TOML path or a dict over retrieval.config.DEFAULTS) into `out_dir`.

    out_dir defaults to runs/<config name>/. resume=True continues the run saved there (config may then be None:
    the run's own config.json is used; a given config must agree with it). overwrite=True starts afresh in a
    folder that holds a run. On CPU torch uses `threads` threads (default: all cores this process may use; bit-exact
    resumption needs the same count). Returns the run folder. Raises TrainingInterrupted after Ctrl-C.
    """
    if config is None:
        if not (resume and out_dir):
            raise UsageError("a config is needed (only --resume with --out can reuse the run's own config)")
        config = read_json(Path(out_dir) / "config.json", "run config")
        cfg = resolve_config(config, overrides, source=str(Path(out_dir) / "config.json"))
    else:
        cfg = _as_config(config, overrides)
    out = Path(out_dir) if out_dir is not None else Path("runs") / cfg["name"]
    dev = resolve_device(device)
    created = not out.exists()
    ensure_writable_dir(out, "run folder")
    try:
        _train_in(out, cfg, dev, resume, overwrite, log, data_root, progress, on_step, threads)
    except BaseException:
        if created and out.is_dir() and all(p.name == ".lock" for p in out.iterdir()):
            shutil.rmtree(out, ignore_errors=True)  # failed before writing anything: leave no empty run folder
        raise
    return out


def _train_in(out: Path, cfg: dict, dev: torch.device, resume: bool, overwrite: bool, log: Log, data_root,
              progress: bool, on_step, threads: int | None) -> None:
    with exclusive_lock(out):
        if resume:
            if not (out / "state.json").is_file():
                raise RetrievalError(f"--resume: {out} holds no training state (state.json) to resume from")
            saved = read_json(out / "config.json", "run config")
            differ = config_diff(saved, cfg)
            if differ:
                raise UsageError(f"--resume: the config differs from the one {out} was trained with, in: "
                                 f"{', '.join(differ)}; resume with the same config (or start a new --out)")
        elif (out / "state.json").is_file() or (out / "last.safetensors").is_file():
            if not overwrite:
                raise RetrievalError(f"{out} already holds a training run; use --resume to continue it, "
                                     "--overwrite to start afresh, or another --out")
            for old in [*out.glob("state*"), *out.glob("last.*"), *out.glob("best.*"), out / "metrics.jsonl"]:
                old.unlink(missing_ok=True)
        with _cpu_threads(dev, threads):
            trainer = build_trainer(cfg, out, dev, log, data_root, progress, on_step)
            if not resume:
                atomic_write_json(out / "config.json", cfg)
            where = f"{dev.type}" + (f" ({torch.get_num_threads()} threads)" if dev.type == "cpu" else "")
            log(f"training {cfg['name']}: {cfg['tower']['name']} tower, {cfg['objective']['name']} objective, "
                f"{len(trainer.images):,} images ({len(trainer.val_labels) if trainer.val_labels is not None else 0:,} "
                f"for validation), {trainer.epochs} epochs x {trainer.steps_per_epoch} steps on {where} -> {out}")
            trainer.run(resume=resume)


def build_trainer(cfg: dict, out: Path, dev: torch.device, log: Log = _stderr, data_root=None, progress: bool = True,
                  on_step: Callable[[StepInfo], None] | None = None) -> Trainer:
    """Everything a resolved config describes: data (on `dev`), validation slice, seeded tower, objective,
    sampler, augmentation, optimizer and schedule, composed into a Trainer that writes to `out`."""
    from retrieval.data import load_dataset

    d, seed = cfg["data"], cfg["seed"]
    try:
        ds = load_dataset(d["spec"], root=data_root, classes=d["classes"] or None, exclude=d["exclude"] or None,
                          subset=d["subset"] or None, seed=seed, log=log)
    except RetrievalError as e:  # the data layer names CLI options; say which config section it came from
        raise type(e)(f"config [data]: {e}".replace("--classes", "data.classes").replace("--exclude", "data.exclude")
                      .replace("--subset", "data.subset")) from None
    val_size = d["val_size"]
    if val_size and val_size > len(ds) // 5:
        capped = len(ds) // 5
        log(f"data.val_size {val_size} is more than a fifth of the {len(ds):,} images; validating on {capped:,}")
        val_size = capped
    train_pos, val_pos = split_validation(ds.labels, val_size, seed)
    train_labels = ds.labels[train_pos]
    classes_seen = [ds.classes[i] for i in torch.unique(train_labels).tolist()]
    t = cfg["tower"]
    with torch.random.fork_rng(devices=[]):  # seeded initial weights without touching the caller's RNG
        torch.manual_seed(derive_seed(seed, "init"))
        tower = build_tower(t["name"], t["embedding_size"] or None, t["deskew"], t["test_shifts"])
        o = cfg["objective"]
        objective = build_objective(o["name"], tower.embedding_size, o["miner"], o["loss_args"], o["miner_args"])
    tower.to(dev, memory_format=torch.channels_last)
    objective.to(dev)
    sampler = build_sampler(cfg, train_labels)
    augment = build_augment(cfg)
    params = list(tower.parameters()) + list(objective.parameters())
    optimizer, scheduler = build_optimizer(cfg, params, len(sampler))
    data_meta = {"spec": d["spec"], "classes": d["classes"] or None, "exclude": d["exclude"] or None,
                 "subset": d["subset"] or None, "filters": ds.filters, "train_images": len(train_pos),
                 "val_images": len(val_pos), "val_seed": seed}
    checkpoint_meta = {
        "objective": objective.describe(),
        "data": data_meta,
        "classes": ds.classes,
        "classes_seen": classes_seen,
        "preprocessing": ds.preprocessing,
        "config": cfg["name"],
        "seed": seed,
        "epochs": cfg["train"]["epochs"],
        "sampler": sampler.describe(),
        "augment": {**augment.describe(), "elastic": cfg["augment"]["elastic"],
                    "composite_classes": cfg["augment"]["composite_classes"],
                    "dihedral_classes": cfg["augment"]["dihedral_classes"]},
    }
    state_meta = {"config_sha256": hashlib.sha256(json.dumps(cfg, sort_keys=True).encode()).hexdigest()}
    val_images = ds.images[val_pos].to(dev) if len(val_pos) else None
    val_labels = ds.labels[val_pos] if len(val_pos) else None
    return Trainer(
        tower, objective, sampler, augment, optimizer, scheduler,
        images=ds.images[train_pos].to(dev), labels=train_labels.to(dev),
        epochs=cfg["train"]["epochs"], seed=seed, device=dev, out_dir=out,
        val_images=val_images, val_labels=val_labels,
        checkpoint_meta=checkpoint_meta, state_meta=state_meta,
        log=log, progress=progress, on_step=on_step,
        elastic=ElasticAugment(cfg["augment"]["elastic"]) if cfg["augment"]["elastic"] else None,
        class_expansions=build_class_expansions(cfg, len(ds.classes), getattr(sampler, "m", 1)),
    )


def build_class_expansions(config: Mapping, num_classes: int, group: int) -> list[Callable]:
    """augment.composite_classes, then augment.dihedral_classes (the symmetries turn composites as well)."""
    a = config["augment"]
    out: list[Callable] = []
    if a["composite_classes"]:
        out.append(CompositeClasses(a["composite_classes"], num_classes, group))
    if a["dihedral_classes"]:
        out.append(DihedralClasses(group))
    return out
