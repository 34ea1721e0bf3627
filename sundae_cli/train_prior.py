"""Stage 2: train a prior on an HDF5 latent dataset with the SUNDAE objective.

`train_prior` is what `sundae train prior` calls. It checks the latent file against the
recipe before step 1, records in the run which autoencoder made the latents (so later
commands can decode), and then runs the shared loop: AdamW, schedule, clipping,
accumulation, EMA weights for sampling, periodic eval loss, sample grids and
checkpoints with exact resume, Ctrl-C saving a checkpoint, non-finite stops.

Randomness of the objective (corruption rates, replacement tokens, unroll samples) is
drawn from a generator seeded by (recipe seed, rank, step, micro-batch), so a resumed
run repeats exactly the draws an uninterrupted one would have made.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from sundae_cli.errors import DataError, TrainingError
from sundae_cli.objective import unrolled_loss
from sundae_cli.training import TrainResult

if TYPE_CHECKING:
    from sundae_cli.distributed import DistInfo
    from sundae_cli.latents import LatentFile
    from sundae_cli.recipes import Recipe
    from sundae_cli.runs import RunInfo

log = logging.getLogger(__name__)

EVAL_BATCHES = 8  # validation batches per evaluation (fixed, seeded draws)
STAGE = "prior"


def step_seed(seed: int, rank: int, step: int, micro: int = 0) -> int:
    """A distinct, reproducible seed for each (rank, step, micro-batch)."""
    return (seed * 1_000_003 + rank * 7_919 + step * 131 + micro) % (2**63 - 1)


@dataclass
class PriorSetup:
    """Everything a prior run needs before its first step."""

    recipe: Recipe
    device: torch.device
    dtype: torch.dtype
    dist: DistInfo
    latents: LatentFile
    train_indices: Any
    val_indices: Any
    autoencoder: dict[str, Any]
    compile_model: bool = False  # torch.compile the prior network (`--compile`)


def open_checked_latents(recipe: Recipe, path: Path) -> LatentFile:
    """Open the latent file and refuse it if it does not fit the recipe."""
    from sundae_cli.latents import open_latents

    latents = open_latents(
        path, expect_codebook_size=recipe.codebook_size, expect_grid=recipe.grid
    )
    num_classes = recipe.prior.config.num_classes
    if num_classes:
        if latents.labels is None:
            latents.close()
            raise DataError(
                f"{path} has no labels but prior.num_classes = {num_classes}",
                hint="encode with --labels-from-subfolders, or set prior.num_classes=0",
            )
        top = int(latents.labels.max()) if len(latents.labels) else -1
        if top >= num_classes:
            latents.close()
            raise DataError(
                f"{path} has label {top} but prior.num_classes = {num_classes}",
                hint=f"set prior.num_classes to at least {top + 1}",
            )
    return latents


def prepare(recipe: Recipe, latents_path: Path) -> PriorSetup:
    """Resolve device, join torchrun if present, open and split the latents."""
    from sundae_cli import distributed
    from sundae_cli.devices import resolve_device, resolve_precision
    from sundae_cli.splits import split_indices
    from sundae_cli.training import check_batch_fits

    device = resolve_device(recipe.device)
    dist, device = distributed.setup(device)
    dtype = resolve_precision(recipe.precision, device)
    torch.manual_seed(recipe.seed + dist.rank)
    latents = open_checked_latents(recipe, latents_path)
    train_idx, val_idx = split_indices(latents.source_index, recipe.data.val_fraction)
    if len(train_idx) == 0:
        raise DataError(
            f"{latents_path}: no training items after the validation split",
            hint="lower data.val_fraction or encode more images",
        )
    check_batch_fits(
        len(train_idx),
        recipe.train.prior.batch_size,
        dist.world_size,
        "train.prior.batch_size",
    )
    autoencoder = {
        "run": latents.attrs.get("autoencoder_run"),
        "sha256": latents.attrs.get("autoencoder_sha256"),
        "backend": latents.attrs.get("autoencoder_backend"),
        "latents": str(latents_path),
    }
    return PriorSetup(
        recipe, device, dtype, dist, latents, train_idx, val_idx, autoencoder
    )


class PriorTrainer:
    """Holds the network, its optimiser state and the data stream of one run."""

    def __init__(self, setup: PriorSetup, run: RunInfo) -> None:
        from sundae_cli import distributed
        from sundae_cli.plugins import get_prior_backend
        from sundae_cli.training import (
            EMA,
            ResumableStream,
            build_optimizer,
            build_scheduler,
            compile_modules,
        )

        self.setup, self.run = setup, run
        recipe = setup.recipe
        self.section = recipe.train.prior
        backend = get_prior_backend(recipe.prior.backend)
        self.model = backend.build(
            recipe.prior.config, codebook_size=recipe.codebook_size
        )
        self.model.to(setup.device)
        if setup.compile_model:
            compile_modules([self.model], setup.device)
        self.objective = distributed.wrap(
            UnrolledObjective(self.model, recipe), setup.dist, setup.device
        )
        self.optimizer = build_optimizer(self.model.parameters(), self.section)
        self.scheduler = build_scheduler(self.optimizer, self.section)
        self.ema = EMA(self.model, self.section.ema_decay)
        self.stream = ResumableStream(
            setup.latents.dataset(setup.train_indices),
            batch_size=self.section.batch_size,
            seed=recipe.seed,
            rank=setup.dist.rank,
            world_size=setup.dist.world_size,
            num_workers=self.section.num_workers,
            pin_memory=setup.device.type == "cuda",
        )
        self.step = 0
        self.last_checkpoint: Path | None = None

    @property
    def parameter_count(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    def state(self) -> dict[str, Any]:
        from sundae_cli.training import capture_rng

        return {
            "model": self.model.state_dict(),
            "ema": self.ema.state_dict(),
            "ema_updates": self.ema.updates,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "step": self.step,
            "rng": capture_rng(),
            "data": self.stream.position.as_dict(),
        }

    def load_state(self, state: dict[str, Any]) -> None:
        from sundae_cli.training import DataPosition, restore_rng

        self.model.load_state_dict(state["model"])
        self.ema.load_state_dict(state["ema"], int(state["ema_updates"]))
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        # The saved state carries the old base rate; a rate changed in the recipe
        # (warned about by check_resume_recipe) applies from here on.
        rate = self.section.learning_rate
        self.scheduler.base_lrs = [rate for _ in self.optimizer.param_groups]
        for group in self.optimizer.param_groups:
            group["initial_lr"] = rate
            group["lr"] = rate * self.scheduler.lr_lambdas[0](self.scheduler.last_epoch)
        self.step = int(state["step"])
        restore_rng(state["rng"])
        self.stream.position = DataPosition(**state["data"])

    def train_step(self, batches: Any) -> dict[str, float]:
        """One optimiser step over `accumulate` micro-batches; returns metrics.

        Under DDP only the last micro-batch's backward all-reduces the gradients
        (`no_sync` for the others), and a non-finite loss on any rank stops every
        rank before its backward pass.
        """
        from sundae_cli.distributed import no_sync

        section = self.section
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        totals: dict[str, float] = {}
        for micro in range(section.accumulate):
            last_micro = micro == section.accumulate - 1
            with no_sync(self.objective, sync=last_micro):
                metrics = self._micro_step(next(batches), micro)
            if "nonfinite" in metrics:
                return metrics
            for key, value in metrics.items():
                totals[key] = totals.get(key, 0.0) + value / section.accumulate
        if section.grad_clip > 0:
            norm = torch.nn.utils.clip_grad_norm_(
                self.model.parameters(), section.grad_clip
            )
            totals["grad_norm"] = float(norm)
        self.optimizer.step()
        self.scheduler.step()
        self.ema.update(self.model)
        totals["lr"] = self.scheduler.get_last_lr()[0]
        return totals

    def _micro_step(self, batch: Any, micro: int) -> dict[str, Any]:
        """Forward and backward of one micro-batch, the loss scaled for accumulation."""
        from sundae_cli.devices import autocast
        from sundae_cli.training import agreed_nonfinite

        setup = self.setup
        tokens, labels = batch
        tokens = tokens.to(setup.device, non_blocking=True)
        labels = self._labels(labels.to(setup.device, non_blocking=True))
        seed = step_seed(setup.recipe.seed, setup.dist.rank, self.step, micro)
        with autocast(setup.device, setup.dtype):
            loss, metrics = self.objective(tokens, labels, seed)
        bad = agreed_nonfinite({"sundae_loss": loss}, setup)
        if bad:
            return {"nonfinite": 1.0, "term": bad}
        (loss / self.section.accumulate).backward()
        return metrics

    def _labels(self, labels: torch.Tensor) -> torch.Tensor | None:
        return labels if self.setup.recipe.prior.config.num_classes else None

    def ema_model(self) -> torch.nn.Module:
        """A copy of the network holding the EMA weights, in eval mode."""
        model = copy.deepcopy(self.model)
        model.load_state_dict(self.ema.state_dict())
        return model.eval()


class UnrolledObjective(torch.nn.Module):
    """The SUNDAE loss as one module, so DDP sees one forward per backward.

    All unroll steps run inside this forward; a parameter used by several steps gets
    one accumulated gradient, which is what DDP's reducer expects.
    """

    def __init__(self, prior: torch.nn.Module, recipe: Recipe) -> None:
        super().__init__()
        self.prior = prior
        self.codebook_size = recipe.codebook_size
        self.unroll_steps = recipe.train.prior.unroll_steps

    def forward(
        self, tokens: torch.Tensor, labels: torch.Tensor | None, seed: int
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """(b, h, w) clean tokens -> (loss, per-unroll-step loss and accuracy)."""
        generator = torch.Generator(device=tokens.device).manual_seed(seed)
        result = unrolled_loss(
            self.prior,
            tokens,
            codebook_size=self.codebook_size,
            unroll_steps=self.unroll_steps,
            class_labels=labels,
            generator=generator,
        )
        metrics = {"loss": float(result.loss.detach())}
        pairs = zip(result.step_losses, result.step_accuracies, strict=True)
        for index, (step_loss, accuracy) in enumerate(pairs, start=1):
            metrics[f"loss_{index}"] = float(step_loss)
            metrics[f"acc_{index}"] = float(accuracy)
        return result.loss, metrics


# ---------------------------------------------------------------- periodic work


@torch.no_grad()
def evaluate(trainer: PriorTrainer) -> dict[str, float]:
    """Validation loss and accuracy of the EMA weights on fixed, seeded draws."""
    setup = trainer.setup
    if len(setup.val_indices) == 0:
        return {}
    model = trainer.ema_model()
    objective = UnrolledObjective(model, setup.recipe)
    dataset = setup.latents.dataset(setup.val_indices)
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=trainer.section.batch_size, shuffle=False
    )
    totals: dict[str, float] = {}
    count = 0
    for index, (tokens, labels) in enumerate(loader):
        if index >= EVAL_BATCHES:
            break
        tokens = tokens.to(setup.device)
        labels = trainer._labels(labels.to(setup.device))
        _, metrics = objective(
            tokens, labels, step_seed(setup.recipe.seed, 0, -1, index)
        )
        for key, value in metrics.items():
            totals[key] = totals.get(key, 0.0) + value
        count += 1
    return {f"val_{key}": value / count for key, value in totals.items()}


@torch.no_grad()
def write_sample_grid(trainer: PriorTrainer, decoder: Any) -> Path:
    """Sample 16 grids with the EMA weights, decode them and save a PNG grid.

    Without gradients and under the run's precision, as `sundae sample` samples.
    """
    from sundae_cli.devices import autocast
    from sundae_cli.images import make_grid, save_png_atomic
    from sundae_cli.sampler import SamplerSettings, derive_seed, sample_tokens

    setup = trainer.setup
    sampling = setup.recipe.sampling
    settings = SamplerSettings(
        steps=sampling.steps,
        temperature=tuple(sampling.temperature),
        proportion=tuple(sampling.proportion),
        top_k=sampling.top_k,
        update=sampling.update,
        min_steps=sampling.min_steps,
        early_stop=sampling.early_stop,
    )
    model = trainer.ema_model()
    count = 16
    labels = None
    if setup.recipe.prior.config.num_classes:
        classes = setup.recipe.prior.config.num_classes
        labels = torch.arange(count, device=setup.device) % classes

    def logits_fn(tokens: torch.Tensor, class_labels: torch.Tensor | None):
        with autocast(setup.device, setup.dtype):
            return model(tokens, class_labels)  # (b, h, w, k)

    result = sample_tokens(
        logits_fn,
        batch_size=count,
        grid=setup.recipe.grid,
        codebook_size=setup.recipe.codebook_size,
        seeds=[derive_seed(setup.recipe.seed, i) for i in range(count)],
        settings=settings,
        class_labels=labels,
        device=setup.device,
    )
    images = decoder.decode(result.tokens.to(setup.device)).float().cpu()
    path = trainer.run.path / "samples" / f"step-{trainer.step:08d}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    save_png_atomic(make_grid(images, ncols=4), path)
    return path


def load_decoder(setup: PriorSetup) -> Any:
    """The autoencoder that made the latents, for sample grids; None if not found."""
    from sundae_cli.errors import CheckpointError
    from sundae_cli.models import find_autoencoder

    try:
        loaded = find_autoencoder(
            setup.autoencoder.get("sha256"), setup.autoencoder.get("run"), setup.device
        )
    except CheckpointError as exc:
        log.warning("no sample grids: %s", exc.message)
        return None
    return loaded.model


def save(trainer: PriorTrainer) -> Path:
    """Write a checkpoint (rank 0 only), refusing non-finite weights."""
    from sundae_cli.checkpoints import save_checkpoint

    for name, tensor in trainer.model.state_dict().items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise TrainingError(
                f"weights {name!r} are non-finite at step {trainer.step}; no "
                "checkpoint written"
                + (
                    f" (last good: {trainer.last_checkpoint})"
                    if trainer.last_checkpoint
                    else ""
                ),
                hint="lower train.prior.learning_rate and resume from the last good",
            )
    setup = trainer.setup
    meta = {
        "kind": STAGE,
        "recipe": setup.recipe.to_dict(),
        "backend": setup.recipe.prior.backend,
        "parameters": trainer.parameter_count,
        "autoencoder": setup.autoencoder,
        "world_size": setup.dist.world_size,
        "effective_batch": effective_batch(setup),
    }
    trainer.last_checkpoint = save_checkpoint(
        trainer.run.path,
        trainer.step,
        trainer.ema.state_dict(),
        trainer.state(),
        meta,
        keep=trainer.section.keep_checkpoints,
    )
    return trainer.last_checkpoint


def effective_batch(setup: PriorSetup) -> int:
    section = setup.recipe.train.prior
    return section.batch_size * section.accumulate * setup.dist.world_size


# ---------------------------------------------------------------- the run


def open_run(
    setup: PriorSetup, out: Path | None, resume: str | None
) -> tuple[RunInfo, dict[str, Any] | None]:
    """A new run directory, or the resumed run and its training state."""
    from sundae_cli.training import open_run as open_training_run

    info = {
        "backend": setup.recipe.prior.backend,
        "autoencoder": setup.autoencoder,
        "effective_batch": effective_batch(setup),
        "world_size": setup.dist.world_size,
    }
    return open_training_run(
        STAGE, "prior", setup.recipe, setup.dist, out=out, resume=resume, info=info
    )


def _latents_path(recipe: Recipe, latents: Path | None, resume: str | None) -> Path:
    """--latents, else the file a resumed run trained on, else latents.path."""
    if latents is not None:
        return Path(latents)
    if resume is not None:
        from sundae_cli.runs import resolve_run

        recorded = resolve_run(resume, STAGE).info.get("autoencoder", {}).get("latents")
        if recorded:
            return Path(recorded)
    return Path(recipe.latents.path)


def train_prior(
    recipe: Recipe,
    *,
    latents: Path | None = None,
    out: Path | None = None,
    resume: str | None = None,
    compile_model: bool = False,
) -> TrainResult:
    """Train (or resume) a prior run; returns where it is and its last metrics.

    Under torchrun every rank calls this; only rank 0 creates the run directory
    and writes into it, while every rank reads the checkpoint of a resumed run.
    `compile_model` applies `torch.compile` to the prior network.
    """
    from sundae_cli import distributed

    setup = prepare(recipe, _latents_path(recipe, latents, resume))
    setup.compile_model = compile_model
    try:
        run, state = distributed.on_all_ranks(
            lambda: open_run(setup, out, resume), setup.dist, setup.device
        )
        trainer = PriorTrainer(setup, run)
        if state is not None:
            trainer.load_state(state)
        if setup.dist.is_main:
            announce(trainer)
            recipe_text = _recipe_toml(recipe)
            (run.path / "recipe.toml").write_text(recipe_text)
        metrics = run_loop(trainer)
        return TrainResult(run.path, trainer.step, trainer.last_checkpoint, metrics)
    finally:
        setup.latents.close()
        distributed.teardown()


def _recipe_toml(recipe: Recipe) -> str:
    from sundae_cli.recipes import to_toml

    return to_toml(recipe.to_dict())


def announce(trainer: PriorTrainer) -> None:
    setup = trainer.setup
    grid_h, grid_w = setup.recipe.grid
    log.info(
        "prior %s: %s parameters, grid %dx%d, %d codes, %d train / %d val items",
        setup.recipe.prior.backend,
        f"{trainer.parameter_count:,}",
        grid_h,
        grid_w,
        setup.recipe.codebook_size,
        len(setup.train_indices),
        len(setup.val_indices),
    )
    log.info(
        "effective batch %d (per-process %d x %d processes x %d accumulation), "
        "device %s, %s",
        effective_batch(setup),
        trainer.section.batch_size,
        setup.dist.world_size,
        trainer.section.accumulate,
        setup.device,
        str(setup.dtype).replace("torch.", ""),
    )


def run_loop(trainer: PriorTrainer) -> dict[str, float]:
    """Step until `train.prior.steps`; periodic logs, evals, grids, checkpoints."""
    from sundae_cli.training import run_steps

    decoder = load_decoder(trainer.setup) if trainer.setup.dist.is_main else None
    return run_steps(
        trainer,
        command="prior",
        periodic=lambda window: periodic(trainer, window, decoder),
        save=lambda: save(trainer),
        status=_status,
    )


def _status(metrics: dict[str, float]) -> str:
    accuracy = metrics.get("acc_1", 0.0)
    return (
        f"loss {metrics.get('loss', float('nan')):.3f} acc {accuracy:.3f} "
        f"{metrics['ms_per_step']:.0f} ms/step"
    )


def periodic(
    trainer: PriorTrainer, window: list[dict[str, float]], decoder: Any
) -> dict[str, float] | None:
    """Log, evaluate, draw sample grids and checkpoint when their turn comes."""
    from sundae_cli.runs import append_metrics

    section, step = trainer.section, trainer.step
    done = step == section.steps
    record: dict[str, float] | None = None
    if step % section.log_every == 0 or done:
        record = {
            k: sum(m.get(k, 0.0) for m in window) / len(window) for k in window[0]
        }
        record["step"] = step
        if step % section.eval_every == 0 or done:
            record.update(evaluate(trainer))
        append_metrics(trainer.run.path, record)
        log.info(_log_line(record))
        window.clear()
    # Checkpoint before drawing: a failing preview must not cost training.
    if step % section.checkpoint_every == 0 and not done:
        save(trainer)
    if decoder is not None and (step % section.sample_every == 0 or done):
        log.info("sample grid: %s", write_sample_grid(trainer, decoder))
    return record


def _log_line(record: dict[str, float]) -> str:
    parts = [f"step {int(record['step'])}", f"loss {record['loss']:.4f}"]
    parts.append(f"acc {record.get('acc_1', 0.0):.3f}")
    if "val_loss" in record:
        parts.append(f"val_loss {record['val_loss']:.4f}")
        parts.append(f"val_acc {record.get('val_acc_1', 0.0):.3f}")
    parts.append(f"{record['ms_per_step']:.0f} ms/step")
    return "  ".join(parts)
