"""The parts of a training loop that both stages share.

Optimiser and learning-rate schedule, EMA weights, RNG capture and per-step reseeding
for exact resume, a resumable data stream, non-finite checks that name the loss term,
`torch.compile`, Rich progress, the comparison of a resumed run's recipe against the
one it was started with, and the step loop with its stop protocol: signals and data
errors stop every rank of a torchrun job at the same step boundary, and rank 0 writes
the checkpoint (see `run_steps` and `sundae_cli.distributed`).
"""

from __future__ import annotations

import copy
import logging
import math
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sundae_cli.errors import (
    CheckpointError,
    DataError,
    InputError,
    Interrupted,
    TrainingError,
)

if TYPE_CHECKING:
    import torch

    from sundae_cli.recipes import OptimSection

log = logging.getLogger(__name__)


# ------------------------------------------------------------------ optimiser


def build_optimizer(params: Any, section: OptimSection) -> torch.optim.Optimizer:
    """AdamW with the section's rate, betas and weight decay."""
    import torch

    return torch.optim.AdamW(
        params,
        lr=section.learning_rate,
        betas=tuple(section.betas),
        weight_decay=section.weight_decay,
    )


def lr_factor(step: int, section: OptimSection) -> float:
    """Multiplier of the base rate at `step`: warm-up, then constant or cosine."""
    if section.warmup_steps and step < section.warmup_steps:
        return (step + 1) / section.warmup_steps
    if section.schedule == "cosine":
        span = max(1, section.steps - section.warmup_steps)
        progress = min(1.0, (step - section.warmup_steps) / span)
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    return 1.0


def build_scheduler(
    optimizer: torch.optim.Optimizer, section: OptimSection
) -> torch.optim.lr_scheduler.LambdaLR:
    import torch

    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, section)
    )


class EMA:
    """Exponential moving average of a model's parameters (used for sampling).

    The decay warms up as min(decay, (1 + n) / (10 + n)) over the first n updates, so
    a short run's EMA is not dominated by the random initialisation.
    """

    def __init__(self, model: torch.nn.Module, decay: float) -> None:
        self.decay = decay
        self.updates = 0
        self.shadow = {
            name: tensor.detach().clone().float()
            for name, tensor in model.state_dict().items()
        }

    def update(self, model: torch.nn.Module) -> None:
        import torch

        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        self.updates += 1
        with torch.no_grad():
            for name, tensor in model.state_dict().items():
                shadow = self.shadow[name]
                if tensor.dtype.is_floating_point:
                    shadow.lerp_(tensor.detach().float(), 1.0 - decay)
                else:
                    shadow.copy_(tensor)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The averaged weights (what inference loads)."""
        return dict(self.shadow)

    def load_state_dict(self, state: dict[str, torch.Tensor], updates: int) -> None:
        for name, tensor in state.items():
            self.shadow[name].copy_(tensor)
        self.updates = updates


def compile_modules(
    modules: list[torch.nn.Module], device: torch.device, retain_graph: bool = False
) -> None:
    """`torch.compile` each module in place (`Module.compile`: state-dict keys stay).

    On the CPU torch.compile generates C++; a missing compiler is reported here
    rather than as a long traceback at the first step. `retain_graph` allows more
    than one backward pass through a compiled graph (the VQ-GAN's adaptive weight),
    which compiled backward functions refuse while they donate buffers.
    """
    if device.type == "cpu":
        _check_cpu_compiler()
    if retain_graph:
        import torch._functorch.config as functorch_config

        functorch_config.donated_buffer = False
    for module in modules:
        module.compile()
    log.info("torch.compile: the first steps are slow while kernels are compiled")


def _check_cpu_compiler() -> None:
    try:
        from torch._inductor.cpp_builder import get_cpp_compiler
    except ImportError:  # a torch without this helper: let torch.compile report
        return
    try:
        get_cpp_compiler()
    except Exception as exc:
        raise InputError(
            f"--compile on the CPU needs a C++ compiler for torch.compile ({exc})",
            hint="install g++ (or set CXX to a C++ compiler), or drop --compile",
        ) from exc


# ------------------------------------------------------------------ RNG


def capture_rng() -> dict[str, Any]:
    """Every RNG state a training step touches, as tensors and plain values.

    Plain lists and ints only, so `torch.load(weights_only=True)` reads it back.
    """
    import torch

    version, internal, gauss_next = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": {"version": version, "internal": list(internal), "gauss": gauss_next},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    import torch

    torch.set_rng_state(state["torch"])
    python = state["python"]
    random.setstate((python["version"], tuple(python["internal"]), python["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ------------------------------------------------------------------ data


@dataclass
class DataPosition:
    """Where a resumable stream stands: epoch and items consumed in that epoch."""

    epoch: int = 0
    offset: int = 0

    def as_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "offset": self.offset}


def check_batch_fits(items: int, batch_size: int, world_size: int, key: str) -> None:
    """Refuse, before a run directory exists, a batch larger than a process's shard."""
    per_process = items // max(world_size, 1)
    if per_process < batch_size:
        raise DataError(
            f"{items} training items ({per_process} per process) is fewer than "
            f"{key} = {batch_size}",
            hint=f"lower {key} (--set {key}=N) or add more data",
        )


@dataclass
class ResumableStream:
    """Endless batches over a dataset in an order fixed by (seed, epoch).

    Each rank of a distributed run reads every `world_size`-th item of the epoch's
    permutation, starting at its rank, so the shards are disjoint. The position counts
    items per rank, so a resumed stream continues exactly where it stopped.
    """

    dataset: Any
    batch_size: int
    seed: int
    rank: int = 0
    world_size: int = 1
    num_workers: int = 0
    pin_memory: bool = False
    position: DataPosition = field(default_factory=DataPosition)

    def _epoch_indices(self, epoch: int) -> list[int]:
        import torch

        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        order = torch.randperm(len(self.dataset), generator=generator).tolist()
        shard = order[self.rank :: self.world_size]
        usable = len(shard) - len(shard) % self.batch_size
        if usable == 0:
            raise TrainingError(
                f"{len(shard)} training items per process is fewer than the batch "
                f"size {self.batch_size}",
                hint="lower train.*.batch_size or add more data",
            )
        return shard[:usable]

    def __iter__(self) -> Iterator[Any]:
        from torch.utils.data import DataLoader

        while True:
            if hasattr(self.dataset, "set_epoch"):
                self.dataset.set_epoch(self.position.epoch)
            indices = self._epoch_indices(self.position.epoch)[self.position.offset :]
            loader = DataLoader(
                self.dataset,
                batch_size=self.batch_size,
                sampler=indices,
                num_workers=self.num_workers,
                pin_memory=self.pin_memory,
                drop_last=True,
                persistent_workers=False,
            )
            for batch in loader:
                self.position.offset += self.batch_size
                yield batch
            self.position = DataPosition(self.position.epoch + 1, 0)


# ------------------------------------------------------------------ checks


def check_finite(step: int, terms: dict[str, torch.Tensor | float]) -> str | None:
    """Return the name of the first non-finite loss term, or None."""
    for name, value in terms.items():
        number = float(value.detach()) if hasattr(value, "detach") else float(value)
        if not math.isfinite(number):
            return name
    return None


def nonfinite_error(
    step: int, term: str, last_good: str | None, command: str
) -> TrainingError:
    where = f"; the last good checkpoint is {last_good}" if last_good else ""
    key = f"train.{command}"
    return TrainingError(
        f"loss term {term!r} became non-finite at step {step}; stopped without "
        f"writing a checkpoint{where}",
        hint=f"lower the learning rate (--set {key}.learning_rate=...), or set "
        f'{key}.nonfinite = "skip" to skip such steps',
    )


def recipe_diff(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list:
    """Flat (key, old, new) differences between two recipe dicts."""
    changes = []
    for key in sorted(set(old) | set(new)):
        path = f"{prefix}{key}"
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            changes += recipe_diff(a, b, path + ".")
        elif a != b:
            changes.append((path, a, b))
    return changes


def check_resume_recipe(old: dict[str, Any], new: dict[str, Any], stage: str) -> None:
    """Refuse architecture changes on resume; warn about other changes.

    Only the sections that shape the network matter to this stage: `autoencoder` for
    stage 1, `prior` for stage 2, plus the image size and resolution for both.
    """
    relevant = ("autoencoder" if stage == "vqgan" else "prior", "data.image_size")
    changes = recipe_diff(old, new)
    blocking = [c for c in changes if c[0].startswith(relevant) or c[0] == "resolution"]
    text = "; ".join(f"{key}: {a!r} -> {b!r}" for key, a, b in blocking)
    if blocking:
        raise CheckpointError(
            f"the recipe changed the architecture since the run started ({text})",
            hint="undo those changes to resume, or start a new run without --resume",
        )
    for key, a, b in changes:
        log.warning("recipe changed since the run started: %s: %r -> %r", key, a, b)


# ------------------------------------------------------------------ progress


class Progress:
    """A Rich progress bar on stderr with loss and rate, plus periodic log lines."""

    def __init__(self, total: int, start: int, description: str, enabled: bool):
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            TextColumn,
            TimeRemainingColumn,
        )
        from rich.progress import (
            Progress as RichProgress,
        )

        from sundae_cli.console import err_console, is_quiet

        self.enabled = enabled and not is_quiet()
        self._bar = RichProgress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[status]}"),
            TimeRemainingColumn(),
            console=err_console(),
            disable=not self.enabled,
            transient=False,
        )
        self._task = self._bar.add_task(
            description, total=total, completed=start, status=""
        )
        self._last = time.perf_counter()

    def __enter__(self) -> Progress:
        self._bar.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._bar.__exit__(*exc)

    def update(self, step: int, status: str) -> None:
        self._bar.update(self._task, completed=step, status=status)


# ------------------------------------------------------------------ stopping


class StopSignals:
    """SIGINT and SIGTERM ask the step loop to stop at the next step boundary.

    The first signal only records its name in `requested`; the ranks agree on it
    before each step, so every rank stops at the same step and rank 0 writes a
    checkpoint that resumes exactly. A second SIGINT raises KeyboardInterrupt at once
    (the checkpoint then repeats the interrupted step's data on resume, but its
    weights may already hold part of that step). Handlers are installed only in the
    main thread and restored on exit.
    """

    def __init__(self) -> None:
        self.requested: str | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopSignals:
        import signal
        import threading

        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        import signal

        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum: int, frame: Any) -> None:
        import signal

        if self.requested is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = signal.Signals(signum).name
        log.warning(
            "%s received: stopping after this step (Ctrl-C again to stop at once)",
            self.requested,
        )


def reseed_step(seed: int, rank: int, step: int) -> None:
    """Seed torch's global RNG from (seed, rank, step) before each step.

    Dropout and any other draw from the global generator then depend only on where
    the run stands, so a resumed run repeats them exactly on every rank, although a
    checkpoint stores only rank 0's RNG state.
    """
    import hashlib

    import torch

    digest = hashlib.blake2b(f"{seed}/{rank}/{step}".encode(), digest_size=8)
    torch.manual_seed(int.from_bytes(digest.digest(), "little") >> 1)


def agreed_nonfinite(terms: dict[str, torch.Tensor | float], setup: Any) -> str | None:
    """Name of the first non-finite term here, or of a failure on another rank.

    Every rank calls this at the same point before its backward pass, so a
    non-finite loss on one rank makes every rank skip or stop together (a rank that
    skipped DDP's backward alone would leave the others waiting in its all-reduce).
    """
    from sundae_cli.distributed import any_rank

    bad = check_finite(0, terms)
    if any_rank(bad is not None, setup.dist, setup.device):
        return bad or "loss on another process"
    return None


# ------------------------------------------------------------------ the loop


def run_steps(
    trainer: Any,
    *,
    command: str,
    periodic: Any,
    save: Any,
    status: Any,
) -> dict[str, float]:
    """The step loop both stages share.

    `trainer` offers `step`, `section` (steps, accumulate, nonfinite), `setup` (dist,
    device, recipe), `stream`, `run`, `last_checkpoint` and
    `train_step(batches) -> metrics`, where metrics holding "nonfinite" name the bad
    loss term under "term" (every rank must agree; see `agreed_nonfinite`).
    `periodic(window)` runs on rank 0 after every step and returns a logged record or
    None; `save()` writes a checkpoint; `status(metrics)` is the progress-bar text.

    Before each step every rank fetches the step's micro-batches, then all ranks
    agree whether to go on: a stop signal or a data error on any rank stops every
    rank at this boundary, with a checkpoint from rank 0 (see `sundae_cli.distributed`
    for failures that cannot be agreed on).
    """
    setup, section = trainer.setup, trainer.section
    main = setup.dist.is_main
    batches = iter(trainer.stream)
    window: list[dict[str, float]] = []
    last: dict[str, float] = {}
    progress = Progress(section.steps, trainer.step, f"train {command}", main)
    with progress, StopSignals() as signals:
        while trainer.step < section.steps:
            started = time.perf_counter()
            metrics = _guarded_step(trainer, batches, signals, command, save)
            if "nonfinite" in metrics:
                _skip_or_stop(trainer, command, metrics.get("term", "loss"))
                continue
            trainer.step += 1
            metrics["ms_per_step"] = 1000 * (time.perf_counter() - started)
            window.append(metrics)
            progress.update(trainer.step, status(metrics))
            if main:
                try:
                    last = periodic(window) or last
                except KeyboardInterrupt:  # a second Ctrl-C during rank 0's work
                    raise _interrupted(trainer, command, save) from None
    if main and trainer.step > 0:
        save()
    return last


def _guarded_step(
    trainer: Any, batches: Iterator[Any], signals: StopSignals, command: str, save: Any
) -> dict[str, Any]:
    """Fetch, agree to go on, run one step; a stop rewinds the data position.

    The checkpoint written on a stop then resumes with this step's batches.
    """
    setup = trainer.setup
    position = copy.copy(trainer.stream.position)
    try:
        fetched = _fetch_or_stop(trainer, batches, signals)
        reseed_step(setup.recipe.seed, setup.dist.rank, trainer.step)
        return trainer.train_step(iter(fetched))
    except KeyboardInterrupt:
        trainer.stream.position = position
        raise _interrupted(trainer, command, save) from None
    except _Stop as stop:
        trainer.stream.position = position
        raise stop.error(trainer, command, save) from None


class _Stop(Exception):
    """Raised inside the loop when the ranks agreed to stop before a step."""

    def __init__(self, signal_name: str | None, failure: Exception | None) -> None:
        super().__init__(signal_name or "failure")
        self.signal_name = signal_name
        self.failure = failure

    def error(self, trainer: Any, command: str, save: Any) -> BaseException:
        """Checkpoint on rank 0, then the error this rank exits with."""
        if self.failure is None and self.signal_name is not None:
            return _interrupted(trainer, command, save, self.signal_name)
        where = _save_on_main(trainer, save)
        if self.failure is not None:
            if where:
                log.error("stopped at step %d%s", trainer.step, where)
            return self.failure
        return TrainingError(
            f"another process failed while reading its data before step "
            f"{trainer.step + 1}{where}",
            hint="see that process's error; after fixing it continue with "
            f"`sundae train {command} --resume RUN`",
        )


def _fetch_or_stop(
    trainer: Any, batches: Iterator[Any], signals: StopSignals
) -> list[Any]:
    """This step's micro-batches, unless any rank was signalled or failed to read."""
    from sundae_cli.distributed import any_ranks

    setup = trainer.setup
    failure: Exception | None = None
    fetched: list[Any] = []
    try:
        fetched = [next(batches) for _ in range(trainer.section.accumulate)]
    except Exception as exc:  # agreed on below, then re-raised on this rank
        failure = exc
    stop, failed = any_ranks(
        [signals.requested is not None, failure is not None], setup.dist, setup.device
    )
    if failed:
        raise _Stop(None, failure)
    if stop:
        raise _Stop(signals.requested or "SIGINT", None)
    return fetched


def _skip_or_stop(trainer: Any, command: str, term: str) -> None:
    last = str(trainer.last_checkpoint) if trainer.last_checkpoint else None
    if trainer.section.nonfinite == "stop":
        raise nonfinite_error(trainer.step + 1, term, last, command)
    log.warning("skipping step %d: non-finite %s", trainer.step + 1, term)
    trainer.step += 1


def _save_on_main(trainer: Any, save: Any) -> str:
    if trainer.setup.dist.is_main and trainer.step > 0:
        return f"; checkpoint written to {save()}"
    return ""


def _interrupted(
    trainer: Any, command: str, save: Any, signal_name: str = "SIGINT"
) -> Interrupted:
    """Save a checkpoint (rank 0) on Ctrl-C and build the error to exit 130 with."""
    where = _save_on_main(trainer, save)
    what = "interrupted" if signal_name == "SIGINT" else f"stopped by {signal_name}"
    return Interrupted(
        f"{what} at step {trainer.step}{where}",
        hint=f"continue with `sundae train {command} --resume {trainer.run.path}`",
    )


# ------------------------------------------------------------------ runs


@dataclass
class TrainResult:
    """Where a finished (or stopped) training run is, and its last logged metrics."""

    run_path: Path
    step: int
    checkpoint: Path | None
    metrics: dict[str, float]


def open_run(
    kind: str,
    stage: str,
    recipe: Any,
    dist: Any,
    *,
    out: Path | None,
    resume: str | None,
    info: dict[str, Any],
) -> tuple[Any, dict[str, Any] | None]:
    """A new run directory, or the resumed run and its training state.

    `kind` is the run kind ("autoencoder" or "prior"), `stage` the recipe section
    whose architecture must not change on resume ("vqgan" or "prior"). Only rank 0
    creates a new run; the other ranks get a placeholder they never write into.
    """
    from sundae_cli.checkpoints import load_state, read_meta, require_checkpoint
    from sundae_cli.runs import RunInfo, create_run, resolve_run

    if resume is not None:
        run = resolve_run(resume, kind)
        ckpt = require_checkpoint(run.path)
        check_resume_recipe(read_meta(ckpt)["recipe"], recipe.to_dict(), stage)
        log.info("resuming %s from %s", run.name, ckpt.name)
        return run, load_state(ckpt)
    if not dist.is_main:
        return RunInfo(Path(out or "."), {}), None
    return create_run(kind, recipe.name, info, out), None
