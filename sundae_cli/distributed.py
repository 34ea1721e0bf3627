"""torch.distributed plumbing for `torchrun`: one process per device, DDP.

A single process (no `WORLD_SIZE` in the environment) is the default and needs none
of this. Under torchrun every rank trains on its own shard of the data; only rank 0
logs and writes files (other ranks of a new run need nothing on disk; a resumed run is
read by every rank). NCCL is used on CUDA and Gloo on the CPU; MPS is refused.

How a distributed run ends (see also `sundae_cli.training.run_steps`):

- Ctrl-C or SIGTERM only sets a flag; the ranks agree on it before each step, so all
  stop at the same step boundary, rank 0 writes a checkpoint and every rank exits
  with 130. A data error on one rank is agreed on the same way: rank 0 checkpoints,
  every rank exits with an error.
- A non-finite loss on any rank is agreed on before the backward pass, so every rank
  skips or stops at the same step.
- A failure inside a step (out of memory, a crash) cannot be agreed on: that rank
  exits, and its peers fail in their next collective (Gloo notices the closed
  connection at once; NCCL when the process-group timeout runs out) or torchrun
  stops them. Resume from the last periodic checkpoint. The timeout is
  `SUNDAE_DIST_TIMEOUT` seconds (default 1800); it also bounds how long the other
  ranks wait while rank 0 evaluates, draws sample grids and writes checkpoints.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from sundae_cli.errors import InputError, TrainingError

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

TIMEOUT_ENV = "SUNDAE_DIST_TIMEOUT"
DEFAULT_TIMEOUT_S = 1800.0
T = TypeVar("T")


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits: rank among world_size, and its local device index."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def process_group_timeout() -> float:
    """Seconds a collective may wait for the other ranks (`SUNDAE_DIST_TIMEOUT`)."""
    text = os.environ.get(TIMEOUT_ENV, "").strip()
    if not text:
        return DEFAULT_TIMEOUT_S
    try:
        seconds = float(text)
    except ValueError:
        seconds = -1.0
    if seconds <= 0:
        raise InputError(
            f"{TIMEOUT_ENV}={text!r} is not a positive number of seconds",
            hint=f"set {TIMEOUT_ENV} to e.g. 1800, or unset it",
        )
    return seconds


def setup(device: torch.device) -> tuple[DistInfo, torch.device]:
    """Join the process group if launched by torchrun; pick this rank's device."""
    from datetime import timedelta

    import torch
    import torch.distributed as dist

    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistInfo(), device
    if device.type == "mps":
        raise InputError(
            "multi-process training (torchrun) is not supported on MPS",
            hint="run a single process, or use --device cpu or cuda",
        )
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        timeout = timedelta(seconds=process_group_timeout())
        dist.init_process_group(backend=backend, timeout=timeout)
    info = DistInfo(rank=rank, world_size=world_size, local_rank=local_rank)
    if not info.is_main:
        # Only rank 0 talks: silence the other ranks' loggers.
        for name in ("sundae_cli", "sundae_vqgan", "sundae_hourglass"):
            logging.getLogger(name).setLevel(logging.ERROR)
    return info, device


def teardown() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier(info: DistInfo) -> None:
    if info.enabled:
        import torch.distributed as dist

        dist.barrier()


def any_ranks(flags: list[bool], info: DistInfo, device: torch.device) -> list[bool]:
    """Each flag true on every rank if it is true on any rank; one collective."""
    if not info.enabled:
        return list(flags)
    import torch
    import torch.distributed as dist

    values = torch.tensor([1.0 if flag else 0.0 for flag in flags], device=device)
    dist.all_reduce(values, op=dist.ReduceOp.MAX)
    return [bool(value > 0) for value in values.tolist()]


def any_rank(flag: bool, info: DistInfo, device: torch.device) -> bool:
    """True on every rank if `flag` is true on any rank (for stop decisions)."""
    return any_ranks([flag], info, device)[0]


def on_all_ranks(fn: Callable[[], T], info: DistInfo, device: torch.device) -> T:
    """Call `fn` on every rank; if it raises on any rank, raise on every rank.

    For work before the first step (opening or resuming a run) whose failure on one
    rank would otherwise leave the others waiting in DDP's first broadcast.
    """
    try:
        value, error = fn(), None
    except Exception as exc:  # re-raised below, on this rank as it was
        value, error = None, exc
    if any_rank(error is not None, info, device):
        if error is not None:
            raise error
        raise TrainingError("another process failed before training started")
    return value  # type: ignore[return-value]


def sync_batchnorm(module: torch.nn.Module, info: DistInfo, device: torch.device):
    """Convert BatchNorm layers to SyncBatchNorm under DDP on CUDA; else unchanged.

    With SyncBatchNorm the statistics are those of the global batch, as in one
    process with the whole batch, and the running statistics stay equal on every
    rank. Deviation: SyncBatchNorm needs CUDA, so under Gloo on the CPU each rank
    normalises by its own batch; parameters still stay equal (gradients are
    averaged) and DDP broadcasts rank 0's running statistics before each
    discriminator step. `autoencoder.disc_norm = "group"` avoids batch statistics.
    """
    if not info.enabled or device.type != "cuda":
        return module
    import torch

    return torch.nn.SyncBatchNorm.convert_sync_batchnorm(module)


def wrap(model: torch.nn.Module, info: DistInfo, device: torch.device) -> Any:
    """Wrap in DistributedDataParallel when distributed, else return the model.

    DDP broadcasts rank 0's parameters once here and rank 0's buffers before every
    forward; it expects every parameter to get a gradient in every backward.
    """
    if not info.enabled:
        return model
    from torch.nn.parallel import DistributedDataParallel

    device_ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=device_ids)


def no_sync(model: Any, sync: bool) -> Any:
    """DDP's `no_sync()` (skip the gradient all-reduce) unless `sync`; else a no-op.

    For gradient accumulation: every micro-batch but the last accumulates locally.
    """
    import contextlib

    if sync or not hasattr(model, "no_sync"):
        return contextlib.nullcontext()
    return model.no_sync()


def unwrap(model: Any) -> torch.nn.Module:
    return getattr(model, "module", model)
