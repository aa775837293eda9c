"""Training across processes and machines on torch.distributed: the process group of a torchrun launch and the
pieces that make N processes compute what one process computes on the same global batch.

A run is distributed when its launcher says so in the environment (torchrun sets RANK, WORLD_SIZE, LOCAL_RANK,
LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT) with WORLD_SIZE > 1; WORLD_SIZE 1 (torchrun --nproc-per-node 1) is a
plain run. Backend gloo on CPU, NCCL on CUDA (each process takes the GPU of its local rank).

What keeps N processes equal to one (see retrieval.training and retrieval.objectives for the rest):
- batch norm over the global batch: torch.nn.SyncBatchNorm on CUDA; on CPU, where torch refuses it,
  GlobalBatchNorm2d below (torch's fused CPU batch-norm kernels, with the per-channel statistics and the
  per-channel gradient sums all-reduced);
- gather_batch: every process's share of a batch in rank order (the order of the single-process batch), the
  local rows keeping their gradient, for objectives that are not PML losses (the pair head);
- DistributedDataParallel around the modules that hold parameters (gradients averaged over the processes).

Failures: every collective has a timeout (`timeout_s`, default DEFAULT_TIMEOUT_S), so a process that stops
answering fails the others with a message instead of a hang; a process that dies closes its connections, which
fails its peers at once (gloo) or at the timeout (NCCL); torchrun then stops the rest of the job.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import os
import sys
import tempfile
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from retrieval.errors import RetrievalError, UsageError

logger = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 300.0


def launched_world_size() -> int:
    """WORLD_SIZE as the launcher set it (1 when not launched by torchrun or alike)."""
    value = os.environ.get("WORLD_SIZE", "1").strip() or "1"
    try:
        return int(value)
    except ValueError:
        raise RetrievalError(f"environment variable WORLD_SIZE={value!r} is not a number of processes") from None


def is_follower() -> bool:
    """A process of a distributed launch other than rank 0 (it writes and prints nothing of the run's)."""
    return launched_world_size() > 1 and os.environ.get("RANK", "0").strip() not in ("", "0")


def _env_int(name: str, default: int | None = None) -> int:
    value = os.environ.get(name)
    if value is None or not value.strip():
        if default is not None:
            return default
        raise RetrievalError(f"a distributed launch (WORLD_SIZE > 1) needs the environment variable {name}; "
                             "launch with torchrun")
    try:
        return int(value)
    except ValueError:
        raise RetrievalError(f"environment variable {name}={value!r} is not an integer") from None


def rendezvous_address() -> str:
    return f"{os.environ.get('MASTER_ADDR', '?')}:{os.environ.get('MASTER_PORT', '?')}"


@dataclass
class ProcessGroup:
    """This process's place in the job (the default torch.distributed group, initialised by join())."""

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    device: torch.device  # this process's training device
    backend: str  # gloo | nccl
    timeout_s: float
    released: bool = False  # rank 0 has answered the others' wait_release

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that writes the run folder, logs and draws the progress bar."""
        return self.rank == 0

    def describe(self) -> dict:
        return {"processes": self.world_size, "backend": self.backend}

    # -- small collectives ---------------------------------------------------------------------------------
    def _comm_device(self) -> torch.device:
        return self.device if self.backend == "nccl" else torch.device("cpu")

    def broadcast_bytes(self, payload: bytes | None) -> bytes:
        """Rank 0's `payload` on every rank (no pickling: a length, then the bytes as a uint8 tensor)."""
        dev = self._comm_device()
        size = torch.tensor([len(payload) if self.is_main and payload is not None else 0], dtype=torch.int64,
                            device=dev)
        dist.broadcast(size, src=0)
        n = int(size.item())
        if self.is_main:
            buf = torch.frombuffer(bytearray(payload or b""), dtype=torch.uint8).to(dev) if n else \
                torch.empty(0, dtype=torch.uint8, device=dev)
        else:
            buf = torch.empty(n, dtype=torch.uint8, device=dev)
        if n:
            dist.broadcast(buf, src=0)
        return bytes(buf.cpu().numpy().tobytes()) if not self.is_main else (payload or b"")

    # rank 0 does some work alone (reading the run folder) and then hands the outcome to the others: a value,
    # or its error, so that the others fail with it instead of waiting for a collective that never comes
    def release(self, value: Any) -> None:
        """Rank 0: send the JSON `value` to the others (waiting in wait_release)."""
        self.broadcast_bytes(json.dumps({"ok": value}).encode())
        self.released = True

    def fail(self, error: BaseException) -> None:
        """Rank 0: send the others `error` instead of a value."""
        kind = "usage" if isinstance(error, UsageError) else "error"
        self.broadcast_bytes(json.dumps({kind: str(error) or type(error).__name__}).encode())
        self.released = True

    def wait_release(self, what: str) -> Any:
        """Ranks other than 0: rank 0's value, or a one-line error saying rank 0 failed `what`."""
        message = json.loads(self.broadcast_bytes(None).decode())
        if "ok" in message:
            return message["ok"]
        error = UsageError if "usage" in message else RetrievalError
        raise error(f"rank 0 failed {what}: {message.get('usage', message.get('error'))}")

    def from_main(self, fn: Callable[[], Any], what: str) -> Any:
        """Run `fn` on rank 0 only and hand its JSON result to every rank; if it fails there, every rank fails
        (rank 0 with its own error, the others with an error saying rank 0 failed `what`)."""
        if not self.is_main:
            return self.wait_release(what)
        try:
            value = fn()
        except BaseException as e:
            self.fail(e)
            raise
        self.release(value)
        return value

    def any(self, flag: bool) -> bool:
        """True on every rank when `flag` is true on any rank."""
        t = torch.tensor([1.0 if flag else 0.0], device=self._comm_device())
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    def barrier(self) -> None:
        if self.backend == "nccl":
            dist.barrier(device_ids=[self.device.index])
        else:
            dist.barrier()

    # -- models ----------------------------------------------------------------------------------------------
    def sync_batchnorm(self, module: nn.Module) -> nn.Module:
        """Batch norm layers normalising over the global batch (parameters and buffers kept, so an optimizer
        built before still holds them; state dict keys unchanged)."""
        if self.device.type == "cuda":
            return nn.SyncBatchNorm.convert_sync_batchnorm(module)
        return GlobalBatchNorm2d.convert(module)

    def wrap(self, module: nn.Module) -> nn.Module:
        """DistributedDataParallel: gradients averaged over the processes in backward. Buffers are not
        broadcast (the batch norm statistics are global, so the same on every rank)."""
        import inspect

        from torch.nn.parallel import DistributedDataParallel

        # torch >= 2.12 renamed the switch (buffers are synced once at init either way: the same on every rank)
        sync = "forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(
            DistributedDataParallel.__init__).parameters else "broadcast_buffers"
        kwargs: dict[str, Any] = {sync: False}
        if self.device.type == "cuda":
            kwargs.update(device_ids=[self.device.index], output_device=self.device.index)
        return DistributedDataParallel(module, **kwargs)

    def close(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()


def _local_device(device: str | torch.device | None, local_rank: int, local_world_size: int) -> torch.device:
    """`device` for this process: auto/cuda -> cuda:LOCAL_RANK (cpu when there is no GPU for auto)."""
    text = "auto" if device is None else str(device).strip().lower()
    if text == "auto":
        text = "cuda" if torch.cuda.is_available() else "cpu"
    if text == "cpu":
        return torch.device("cpu")
    if not text.startswith("cuda"):
        raise UsageError(f"`device` {device}: expected cpu, cuda, cuda:N or auto")
    if not torch.cuda.is_available():
        raise UsageError(f"`device` {device}: CUDA is not available on this machine (use cpu)")
    if text != "cuda":
        try:
            index = torch.device(text).index
        except RuntimeError:
            raise UsageError(f"`device` {device}: expected cpu, cuda, cuda:N or auto") from None
        if local_world_size > 1:
            raise UsageError(f"`device` {device} names one GPU for the {local_world_size} processes on this "
                             "machine: use cuda (each process takes the GPU of its local rank)")
        return torch.device("cuda", index)
    if local_rank >= torch.cuda.device_count():
        raise UsageError(f"this machine runs {local_world_size} processes but has {torch.cuda.device_count()} "
                         "GPU(s): start at most one process per GPU (--nproc-per-node)")
    return torch.device("cuda", local_rank)


def join(device: str | torch.device | None = "auto", timeout_s: float | None = None) -> ProcessGroup | None:
    """Join the job's process group when launched with WORLD_SIZE > 1 (None otherwise: a plain run).

    Raises a one-line error naming the rendezvous address when it cannot be reached within the timeout."""
    world = launched_world_size()
    if world <= 1:
        return None
    timeout_s = DEFAULT_TIMEOUT_S if timeout_s is None else float(timeout_s)
    if not timeout_s > 0:
        raise UsageError(f"`timeout` must be a positive number of seconds, got {timeout_s}")
    rank, local_rank = _env_int("RANK"), _env_int("LOCAL_RANK", 0)
    local_world = _env_int("LOCAL_WORLD_SIZE", world)
    if not os.environ.get("MASTER_ADDR", "").strip():
        raise RetrievalError("a distributed launch (WORLD_SIZE > 1) needs the environment variable MASTER_ADDR; "
                             "launch with torchrun")
    _env_int("MASTER_PORT")
    dev = _local_device(device, local_rank, local_world)
    backend = "nccl" if dev.type == "cuda" else "gloo"
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if dist.is_initialized():  # joined by the caller (e.g. an application that set up its own group)
        return ProcessGroup(dist.get_rank(), dist.get_world_size(), local_rank, local_world, dev,
                            dist.get_backend(), timeout_s)
    try:
        kwargs: dict[str, Any] = {}
        if dev.type == "cuda":
            kwargs["device_id"] = dev
        with _native_stderr_held():
            dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s), **kwargs)
    except (dist.DistError, RuntimeError, ValueError) as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise RetrievalError(
            f"cannot join the training job's process group at {rendezvous_address()} (rank {rank} of {world}, "
            f"{backend}, timeout {timeout_s:g}s): {reason}; check that this address is reachable from every "
            "machine and that all processes of the job were started") from None
    return ProcessGroup(rank, world, local_rank, local_world, dev, backend, timeout_s)


@contextlib.contextmanager
def _native_stderr_held():
    """Hold what native code writes to stderr meanwhile (c10d logs a C++ stack trace when it cannot connect):
    written out after success; after a failure only logged at debug level (the error says it in one line)."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):  # no usable fd 2
        yield
        return
    held = tempfile.TemporaryFile()
    os.dup2(held.fileno(), 2)
    ok = False
    try:
        yield
        ok = True
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        held.seek(0)
        text = held.read()
        held.close()
        if text and ok:
            os.write(2, text)
        elif text:
            logger.debug(text.decode("utf-8", "replace"))


@contextlib.contextmanager
def sigterm_as_error(group: ProcessGroup):
    """SIGTERM raises a one-line RetrievalError: torchrun sends it to every process of the job when one of them
    failed, and the default action (a silent exit) would leave the user with nothing but torchrun's report."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handle(signum, frame):
        raise RetrievalError(
            f"rank {group.rank} of {group.world_size}: stopped by SIGTERM, which torchrun sends to every process of "
            "the job when another process of the job failed (its report below names the first); the run folder "
            "keeps the state saved at the last finished epoch: `resume` continues from it")

    previous = signal.signal(signal.SIGTERM, handle)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def is_comm_error(e: BaseException) -> bool:
    """A failure of the process group (a peer died or stopped answering), as opposed to a bug or bad input."""
    if isinstance(e, dist.DistError):
        return True
    if not isinstance(e, RuntimeError):
        return False
    text = str(e).lower()
    return any(w in text for w in ("gloo", "nccl", "connection", "timed out", "timeout", "socket", "peer"))


# ------------------------------------------------------------------------------------------------ batch pieces
class _ScaleGrad(torch.autograd.Function):
    """Identity forward; backward multiplies the gradient by `factor`."""

    @staticmethod
    def forward(ctx, x, factor: float):
        ctx.factor = factor
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.factor, None


def gather_batch(x: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Every process's rows of the batch, concatenated in rank order (the single-process batch's order).

    The other processes' rows carry no gradient; this process's rows keep theirs, multiplied by the number of
    processes, so that DistributedDataParallel's average over processes gives the gradient of a loss computed
    on the whole batch in one process. (A loss computed identically on every rank from the gathered batch gives
    its own parameters, e.g. the pair head's, the same gradient on every rank, which the average keeps.)"""
    world, rank = dist.get_world_size(), dist.get_rank()
    parts = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(parts, x.detach().contiguous())
    parts[rank] = _ScaleGrad.apply(x, float(world))
    label_parts = [torch.empty_like(labels) for _ in range(world)]
    dist.all_gather(label_parts, labels.contiguous())
    return torch.cat(parts), torch.cat(label_parts)


class _GlobalBatchNorm(torch.autograd.Function):
    """Training-mode batch norm over the global batch, from torch's fused CPU kernels and two all_reduces.

    forward: local mean and variance (batch_norm_update_stats), counts and moments summed over the processes in
    float64, then the normalisation with the global statistics (batch_norm in eval mode, fused).
    backward: the local sums of dy and dy * x_hat (native_batch_norm_backward's weight and bias gradients) summed
    over the processes, then dx = weight * invstd * (dy - mean(dy) - x_hat * mean(dy * x_hat)) with the global
    means, as two fused per-channel affine maps; the weight and bias get this process's sums (DDP adds the
    processes' up). Fused kernels, because the same formula written with autograd is many times slower."""

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, eps: float, factor: float):
        c = x.size(1)
        count = x.numel() // c
        mean, var = torch.batch_norm_update_stats(x, None, None, 0.0)  # this process's, var biased
        mean64, var64 = mean.double(), var.double()
        moments = torch.cat([mean64 * count, (var64 + mean64 * mean64) * count,
                             torch.tensor([float(count)], dtype=torch.float64, device=x.device)])
        dist.all_reduce(moments, op=dist.ReduceOp.SUM)
        n = float(moments[-1])
        g_mean = moments[:c] / n
        g_var = (moments[c:2 * c] / n - g_mean * g_mean).clamp_min(0.0)
        if running_mean is not None:
            running_mean.mul_(1 - factor).add_(g_mean.to(running_mean.dtype), alpha=factor)
            running_var.mul_(1 - factor).add_((g_var * (n / max(n - 1.0, 1.0))).to(running_var.dtype),
                                              alpha=factor)
        # the statistics in the parameters' dtype: under bf16 autocast x is bfloat16 and the weights fp32, which
        # torch's CPU kernels take as one mixed-dtype call (as a plain BatchNorm2d does)
        stat = weight.dtype if weight is not None else (torch.float32 if x.dtype == torch.bfloat16 else x.dtype)
        mean32, var32 = g_mean.to(stat), g_var.to(stat)
        w = weight if weight is not None else torch.ones(c, dtype=stat, device=x.device)
        y = F.batch_norm(x, mean32, var32, w, bias, False, 0.0, eps)
        ctx.save_for_backward(x, w, mean32, var32)
        ctx.eps, ctx.n, ctx.affine = eps, n, (weight is not None, bias is not None)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, w, mean, var = ctx.saved_tensors
        c, n, eps = x.size(1), ctx.n, ctx.eps
        dy = dy.contiguous(memory_format=torch.channels_last) if x.is_contiguous(
            memory_format=torch.channels_last) else dy.contiguous()
        invstd = torch.rsqrt(var + eps)
        _, sum_dy_xhat, sum_dy = torch.ops.aten.native_batch_norm_backward(
            dy, x, w, None, None, mean, invstd, True, eps, [False, True, True])
        sums = torch.cat([sum_dy, sum_dy_xhat]).double()
        dist.all_reduce(sums, op=dist.ReduceOp.SUM)
        gi = w.double() * invstd.double()
        zeros, ones = torch.zeros_like(mean), torch.ones_like(mean)
        # dx = gi * dy - gi * mean(dy) - x_hat * gi * mean(dy * x_hat), x_hat = (x - mean) * invstd
        dx = F.batch_norm(x, mean, var, (-gi * sums[c:] / n).to(mean.dtype), (-gi * sums[:c] / n).to(mean.dtype),
                          False, 0.0, eps)
        dx.add_(F.batch_norm(dy, zeros, ones, gi.to(mean.dtype), None, False, 0.0, 0.0))
        has_weight, has_bias = ctx.affine
        return (dx, sum_dy_xhat if has_weight else None, sum_dy if has_bias else None, None, None, None, None)


class GlobalBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d whose training statistics are those of the global batch across the process group, for CPU
    (gloo), where torch.nn.SyncBatchNorm refuses to run (its kernels are CUDA's): each process computes its
    per-channel mean and variance, the counts and moments are summed over the processes, and the layer
    normalises with the global mean and variance and updates its running statistics with them, as one process
    holding the whole batch would; its backward sums the two per-channel gradient reductions likewise
    (_GlobalBatchNorm). Outside training or without a process group it is a plain BatchNorm2d."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        self._check_input_dim(x)
        factor = 0.0
        if self.track_running_stats:
            self.num_batches_tracked.add_(1)
            factor = (1.0 / float(self.num_batches_tracked)) if self.momentum is None else self.momentum
        return _GlobalBatchNorm.apply(x, self.weight, self.bias,
                                      self.running_mean if self.track_running_stats else None,
                                      self.running_var if self.track_running_stats else None, self.eps, factor)

    @classmethod
    def convert(cls, module: nn.Module) -> nn.Module:
        """Every BatchNorm2d in `module` replaced by a GlobalBatchNorm2d holding the same parameters and buffers."""
        if isinstance(module, nn.BatchNorm2d) and not isinstance(module, cls):
            new = cls(module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats)
            new._parameters = module._parameters  # the same Parameter objects (an optimizer may hold them)
            new._buffers = module._buffers
            new.training = module.training
            return new
        for name, child in module.named_children():
            converted = cls.convert(child)
            if converted is not child:
                setattr(module, name, converted)
        return module
