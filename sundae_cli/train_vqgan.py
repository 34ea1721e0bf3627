"""Stage 1: train the VQ-GAN autoencoder on an image folder.

`train_vqgan` is what `sundae train vqgan` calls. Two networks and two optimisers: the
autoencoder minimises L1 (+ perceptual, when VGG16 weights are supplied) + codebook
and commitment terms + the adaptive-weighted hinge GAN term once the discriminator has
started; the PatchGAN discriminator minimises the hinge loss from then on.

Images come from `sundae_cli.images`: recognised by content, EXIF-rotated, alpha
composited over black, fitted to the recipe's canvas (centre or random crop) and flipped
at random. A deterministic held-out split (by file index) gives the PSNR reported
every `eval_every` steps next to a reconstruction grid.

Deviation: the discriminator sees real and reconstructed images in one concatenated
batch (taming calls it twice), so batch-norm statistics mix both halves and DDP sees
a single forward per backward.

Under torchrun (DDP) the autoencoder and the discriminator each have a DDP wrapper.
The generator pass calls the bare discriminator with its parameters frozen, so it
never enters the discriminator's DDP reducer; the discriminator's own step goes
through its wrapper, only once `disc_start` is reached. The adaptive GAN weight takes
`torch.autograd.grad` at the decoder's last layer, which runs no DDP hooks; the
gradient all-reduce happens once, in the backward of the total loss. On CUDA the
discriminator's BatchNorm becomes SyncBatchNorm (see `distributed.sync_batchnorm`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from sundae_cli.errors import DataError, TrainingError
from sundae_cli.training import (
    ResumableStream,
    TrainResult,
    build_optimizer,
    capture_rng,
    check_batch_fits,
    restore_rng,
)

if TYPE_CHECKING:
    from sundae_cli.distributed import DistInfo
    from sundae_cli.recipes import Recipe
    from sundae_cli.runs import RunInfo

log = logging.getLogger(__name__)

STAGE = "autoencoder"
EVAL_IMAGES = 16  # held-out images for PSNR and the reconstruction grid


@dataclass
class VQSetup:
    """Everything a VQ-GAN run needs before its first step."""

    recipe: Recipe
    device: torch.device
    dtype: torch.dtype
    dist: DistInfo
    train_files: list[Path]
    val_files: list[Path]
    perceptual_weights: Path | None
    compile_model: bool = False  # torch.compile encoder and decoder (`--compile`)
    # The objective, built before the run directory exists: a bad perceptual
    # weights file then fails without leaving an empty run behind.
    loss: Any = None


def prepare(
    recipe: Recipe, data: Path | None, perceptual_weights: Path | None
) -> VQSetup:
    """Scan the folder (before any model is built), split it, pick the device."""
    from sundae_cli import distributed
    from sundae_cli.devices import resolve_device, resolve_precision
    from sundae_cli.images import scan_folder
    from sundae_cli.splits import split_indices

    folder = data or (Path(recipe.data.dir) if recipe.data.dir else None)
    if folder is None:
        raise DataError(
            "no image folder given",
            hint="pass --data DIR or set data.dir in the recipe",
        )
    # Join torchrun first, so that only rank 0 logs what the scan found.
    device = resolve_device(recipe.device)
    dist, device = distributed.setup(device)
    scan = scan_folder(folder)
    log.info("%s: %s", folder, scan.summary())
    files = [Path(f) for f in scan.files]
    train_idx, val_idx = split_indices(np.arange(len(files)), recipe.data.val_fraction)
    if len(train_idx) == 0:
        raise DataError(
            f"{folder}: no training images left after the validation split",
            hint="add images or lower data.val_fraction",
        )
    check_batch_fits(
        len(train_idx),
        recipe.train.vqgan.batch_size,
        dist.world_size,
        "train.vqgan.batch_size",
    )
    dtype = resolve_precision(recipe.precision, device)
    torch.manual_seed(recipe.seed + dist.rank)
    weights = perceptual_weights or recipe.train.vqgan.perceptual_weights
    return VQSetup(
        recipe,
        device,
        dtype,
        dist,
        [files[i] for i in train_idx],
        [files[i] for i in val_idx],
        Path(weights) if weights else None,
    )


def build_loss(setup: VQSetup) -> Any:
    """The generator/discriminator objective, perceptual term only with weights."""
    from sundae_vqgan.losses import VQGANLoss
    from sundae_vqgan.vgg import load_perceptual

    section = setup.recipe.train.vqgan
    perceptual = None
    if setup.perceptual_weights is not None and section.perceptual_weight > 0:
        perceptual = load_perceptual(setup.perceptual_weights).to(setup.device)
    elif section.perceptual_weight > 0:
        log.info(
            "perceptual loss off: no VGG16 weights given (pass --perceptual-weights "
            "PATH or set train.vqgan.perceptual_weights); nothing is downloaded"
        )
    return VQGANLoss(
        perceptual,
        l1_weight=section.l1_weight,
        perceptual_weight=section.perceptual_weight,
        codebook_weight=section.codebook_weight,
        disc_weight=section.disc_weight,
        disc_start=section.disc_start,
    )


class VQTrainer:
    """The autoencoder, the discriminator, their optimisers and the data stream."""

    def __init__(self, setup: VQSetup, run: RunInfo) -> None:
        from sundae_cli import distributed
        from sundae_cli.images import ImageFolderDataset
        from sundae_cli.plugins import get_autoencoder_backend
        from sundae_cli.training import compile_modules
        from sundae_vqgan.losses import build_discriminator

        self.setup, self.run = setup, run
        recipe = setup.recipe
        self.section = recipe.train.vqgan
        config = recipe.autoencoder.config
        self.model = get_autoencoder_backend(recipe.autoencoder.backend).build(config)
        self.discriminator = distributed.sync_batchnorm(
            build_discriminator(config), setup.dist, setup.device
        )
        self.model.to(setup.device)
        self.discriminator.to(setup.device)
        if setup.compile_model:
            # Encoder and decoder apart: the quantizer's nearest-code search and
            # codebook bookkeeping stay eager. The adaptive GAN weight goes back
            # through the decoder more than once (retain_graph).
            compile_modules(
                [self.model.encoder, self.model.decoder],
                setup.device,
                retain_graph=True,
            )
        self.model_ddp = distributed.wrap(self.model, setup.dist, setup.device)
        self.disc_ddp = distributed.wrap(self.discriminator, setup.dist, setup.device)
        self.loss = setup.loss if setup.loss is not None else build_loss(setup)
        self.opt_ae = build_optimizer(self.model.parameters(), self.section)
        self.opt_disc = build_optimizer(self.discriminator.parameters(), self.section)
        dataset = ImageFolderDataset(
            setup.train_files,
            tuple(recipe.data.image_size),
            flip_p=0.5 if recipe.data.flip else 0.0,
            crop=recipe.data.crop,
            seed=recipe.seed,
        )
        self.stream = ResumableStream(
            dataset,
            batch_size=self.section.batch_size,
            seed=recipe.seed,
            rank=setup.dist.rank,
            world_size=setup.dist.world_size,
            num_workers=self.section.num_workers,
            pin_memory=setup.device.type == "cuda",
        )
        self.step = 0
        self.last_checkpoint: Path | None = None

    def state(self) -> dict[str, Any]:
        return {
            "discriminator": self.discriminator.state_dict(),
            "autoencoder_full": self.model.state_dict(),
            "opt_ae": self.opt_ae.state_dict(),
            "opt_disc": self.opt_disc.state_dict(),
            "step": self.step,
            "rng": capture_rng(),
            "data": self.stream.position.as_dict(),
        }

    def load_state(self, state: dict[str, Any]) -> None:
        from sundae_cli.training import DataPosition

        self.model.load_state_dict(state["autoencoder_full"])
        self.discriminator.load_state_dict(state["discriminator"])
        self.opt_ae.load_state_dict(state["opt_ae"])
        self.opt_disc.load_state_dict(state["opt_disc"])
        # The saved param groups carry the old rate; a rate changed in the recipe
        # (warned about by check_resume_recipe) applies from here on.
        for optimizer in (self.opt_ae, self.opt_disc):
            for group in optimizer.param_groups:
                group["lr"] = self.section.learning_rate
        self.step = int(state["step"])
        restore_rng(state["rng"])
        self.stream.position = DataPosition(**state["data"])

    def train_step(self, batches: Any) -> dict[str, float]:
        """One step of each network (the discriminator once it has started).

        Gradients of `accumulate` micro-batches add up before each optimiser steps;
        under DDP only the last micro-batch all-reduces them (`no_sync`).
        """
        section = self.section
        self.model.train()
        self.opt_ae.zero_grad(set_to_none=True)
        self.opt_disc.zero_grad(set_to_none=True)
        disc_on = self.loss.discriminator_active(self.step)
        totals: dict[str, float] = {}
        for micro in range(section.accumulate):
            sync = micro == section.accumulate - 1
            terms = self._micro_step(next(batches), sync, disc_on)
            if "nonfinite" in terms:
                return terms
            for key, value in terms.items():
                totals[key] = totals.get(key, 0.0) + value / section.accumulate
        # The discriminator's update used reconstructions made before this one, as
        # when the autoencoder steps first (taming's order).
        self._clip(self.model)
        self.opt_ae.step()
        if disc_on:
            self._clip(self.discriminator)
            self.opt_disc.step()
        return totals

    def _micro_step(self, images: Any, sync: bool, disc_on: bool) -> dict[str, Any]:
        """Generator (and discriminator) forward and backward of one micro-batch."""
        from sundae_cli.devices import autocast
        from sundae_cli.distributed import no_sync
        from sundae_cli.training import agreed_nonfinite

        setup = self.setup
        images = images.to(setup.device, non_blocking=True)
        with no_sync(self.model_ddp, sync):
            with autocast(setup.device, setup.dtype):
                reconstructions, codebook_loss, _ = self.model_ddp(images)
                total, terms = self._generator_loss(
                    images, reconstructions, codebook_loss
                )
            # The terms first, so a failure names the one that broke, not "total".
            bad = agreed_nonfinite({**terms, "total": total}, setup)
            if bad:
                return {"nonfinite": 1.0, "term": bad}
            (total / self.section.accumulate).backward()
        reconstructions = reconstructions.detach()
        if disc_on:
            d_terms = self._discriminator_pass(images, reconstructions, sync)
            if "nonfinite" in d_terms:
                return d_terms
            terms.update(d_terms)
        terms["loss"] = float(total.detach())
        terms["psnr_batch"] = psnr(images, reconstructions)
        return terms

    def _generator_loss(self, images, reconstructions, codebook_loss):
        # The discriminator judges the reconstructions but must not get gradients
        # from the generator's loss: freeze it for this pass.
        self.discriminator.requires_grad_(False)
        try:
            return self.loss.generator_loss(
                images,
                reconstructions,
                codebook_loss,
                step=self.step,
                discriminator=self.discriminator,
                last_layer_weight=self.model.last_layer_weight,
            )
        finally:
            self.discriminator.requires_grad_(True)

    def _discriminator_pass(
        self, images: torch.Tensor, reconstructions: torch.Tensor, sync: bool
    ) -> dict[str, Any]:
        """Hinge loss of the discriminator (through its DDP wrapper) and backward."""
        from sundae_cli.devices import autocast
        from sundae_cli.distributed import no_sync
        from sundae_cli.training import agreed_nonfinite
        from sundae_vqgan.losses import hinge_d_loss

        with no_sync(self.disc_ddp, sync):
            with autocast(self.setup.device, self.setup.dtype):
                logits = self.disc_ddp(torch.cat([images, reconstructions]))
                real, fake = logits.float().chunk(2)
                d_loss = hinge_d_loss(real, fake)
            bad = agreed_nonfinite({"d_loss": d_loss}, self.setup)
            if bad:
                return {"nonfinite": 1.0, "term": bad}
            (d_loss / self.section.accumulate).backward()
        return {"d_loss": float(d_loss.detach())}

    def _clip(self, module: torch.nn.Module) -> None:
        if self.section.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(module.parameters(), self.section.grad_clip)


def psnr(images: torch.Tensor, reconstructions: torch.Tensor) -> float:
    """Mean PSNR in dB of images in [-1, 1] (peak-to-peak range 2)."""
    error = (images.float() - reconstructions.float().clamp(-1, 1)).pow(2)
    mse = error.flatten(1).mean(1).clamp_min(1e-10)
    return float((10 * torch.log10(4.0 / mse)).mean())


# ---------------------------------------------------------------- periodic work


@torch.no_grad()
def evaluate(trainer: VQTrainer) -> tuple[dict[str, float], Any]:
    """Held-out PSNR (centred views, no flips) and a reconstruction grid image."""
    from sundae_cli.images import load_rgb, make_grid, to_tensor

    setup = trainer.setup
    files = setup.val_files[:EVAL_IMAGES] or setup.train_files[:EVAL_IMAGES]
    size = tuple(setup.recipe.data.image_size)
    crop = setup.recipe.data.crop
    images = torch.stack(
        [to_tensor(held_out_view(load_rgb(f), size, crop)) for f in files]
    )
    trainer.model.eval()
    reconstructions = []
    for chunk in images.split(trainer.section.batch_size):
        reconstructions.append(trainer.model(chunk.to(setup.device))[0].float().cpu())
    recon = torch.cat(reconstructions)
    key = "val_psnr" if setup.val_files else "train_psnr"
    grid = make_grid(torch.cat([images[:8], recon[:8]]), ncols=min(8, len(files)))
    return {key: psnr(images, recon)}, grid


def held_out_view(img: Any, size: tuple[int, int], crop: str) -> Any:
    """The deterministic view of an image that evaluation measures.

    Under `crop="patch"` training sees native-scale patches, so evaluation takes the
    centre patch at native scale (an image smaller than `size` is fitted, as in
    training); otherwise the image is scaled to cover `size` and centre-cropped.
    """
    from sundae_cli.images import fit_to

    height, width = size
    if crop == "patch" and img.width >= width and img.height >= height:
        left, top = (img.width - width) // 2, (img.height - height) // 2
        return img.crop((left, top, left + width, top + height))
    return fit_to(img, size)


def save(trainer: VQTrainer) -> Path:
    """Write a checkpoint (rank 0 only), refusing non-finite weights."""
    from sundae_cli.checkpoints import save_checkpoint

    for module in (trainer.model, trainer.discriminator):
        for name, tensor in module.state_dict().items():
            if tensor.is_floating_point() and not torch.isfinite(tensor).all():
                raise TrainingError(
                    f"weights {name!r} are non-finite at step {trainer.step}; no "
                    "checkpoint written",
                    hint="lower train.vqgan.learning_rate and resume from the last "
                    "good checkpoint",
                )
    setup = trainer.setup
    meta = {
        "kind": STAGE,
        "recipe": setup.recipe.to_dict(),
        "backend": setup.recipe.autoencoder.backend,
        "world_size": setup.dist.world_size,
        "effective_batch": effective_batch(setup),
        "perceptual": trainer.loss.perceptual is not None,
    }
    trainer.last_checkpoint = save_checkpoint(
        trainer.run.path,
        trainer.step,
        trainer.model.state_dict(),
        trainer.state(),
        meta,
        keep=trainer.section.keep_checkpoints,
    )
    return trainer.last_checkpoint


def effective_batch(setup: VQSetup) -> int:
    """Images per optimiser step: per-process batch x processes x accumulation."""
    section = setup.recipe.train.vqgan
    return section.batch_size * section.accumulate * setup.dist.world_size


def periodic(trainer: VQTrainer, window: list[dict[str, float]]) -> dict | None:
    """Log (with codebook health), evaluate PSNR with a grid, checkpoint."""
    from sundae_cli.images import save_png_atomic
    from sundae_cli.runs import append_metrics

    section, step = trainer.section, trainer.step
    done = step == section.steps
    record = None
    if step % section.log_every == 0 or done:
        keys = {k for m in window for k in m}
        record = {k: sum(m.get(k, 0.0) for m in window) / len(window) for k in keys}
        record.update(trainer.model.quantize.usage.stats())
        record["step"] = step
        if step % section.eval_every == 0 or done:
            scores, grid = evaluate(trainer)
            record.update(scores)
            path = trainer.run.path / "samples" / f"recon-{step:08d}.png"
            save_png_atomic(grid, path)
        append_metrics(trainer.run.path, record)
        log.info(_log_line(record))
        window.clear()
    if step % section.checkpoint_every == 0 and not done:
        save(trainer)
    return record


def _log_line(record: dict[str, float]) -> str:
    parts = [f"step {int(record['step'])}", f"loss {record['loss']:.4f}"]
    parts.append(f"l1 {record.get('l1', 0.0):.4f}")
    for key in ("val_psnr", "train_psnr"):
        if key in record:
            parts.append(f"{key} {record[key]:.2f} dB")
    if "d_loss" in record:
        parts.append(f"d_loss {record['d_loss']:.3f}")
    parts.append(f"codes used {record.get('codebook_usage', 0.0):.1%}")
    parts.append(f"{record['ms_per_step']:.0f} ms/step")
    return "  ".join(parts)


def _status(metrics: dict[str, float]) -> str:
    return (
        f"l1 {metrics.get('l1', float('nan')):.3f} "
        f"psnr {metrics.get('psnr_batch', 0.0):.1f} dB "
        f"{metrics['ms_per_step']:.0f} ms/step"
    )


# ---------------------------------------------------------------- the run


def open_run(
    setup: VQSetup, out: Path | None, resume: str | None
) -> tuple[RunInfo, dict[str, Any] | None]:
    """A new run directory, or the resumed run and its training state."""
    from sundae_cli.training import open_run as open_training_run

    info = {
        "backend": setup.recipe.autoencoder.backend,
        "world_size": setup.dist.world_size,
        "effective_batch": effective_batch(setup),
    }
    return open_training_run(
        STAGE, "vqgan", setup.recipe, setup.dist, out=out, resume=resume, info=info
    )


def train_vqgan(
    recipe: Recipe,
    *,
    data: Path | None = None,
    out: Path | None = None,
    resume: str | None = None,
    perceptual_weights: Path | None = None,
    compile_model: bool = False,
) -> TrainResult:
    """Train (or resume) an autoencoder run on an image folder.

    Under torchrun every rank calls this; only rank 0 creates the run directory
    and writes into it, while every rank reads the checkpoint of a resumed run.
    `compile_model` applies `torch.compile` to the encoder and the decoder.
    """
    from sundae_cli import distributed
    from sundae_cli.recipes import to_toml
    from sundae_cli.training import run_steps

    setup = prepare(recipe, data, perceptual_weights)
    setup.compile_model = compile_model
    try:
        setup.loss = build_loss(setup)
        run, state = distributed.on_all_ranks(
            lambda: open_run(setup, out, resume), setup.dist, setup.device
        )
        trainer = VQTrainer(setup, run)
        if state is not None:
            trainer.load_state(state)
        if setup.dist.is_main:
            _announce(trainer)
            (run.path / "recipe.toml").write_text(to_toml(recipe.to_dict()))
        metrics = run_steps(
            trainer,
            command="vqgan",
            periodic=lambda window: periodic(trainer, window),
            save=lambda: save(trainer),
            status=_status,
        )
        return TrainResult(run.path, trainer.step, trainer.last_checkpoint, metrics)
    finally:
        distributed.teardown()


def _announce(trainer: VQTrainer) -> None:
    setup = trainer.setup
    count = sum(p.numel() for p in trainer.model.parameters())
    disc = sum(p.numel() for p in trainer.discriminator.parameters())
    height, width = setup.recipe.data.image_size
    log.info(
        "vqgan: %s parameters (+%s discriminator), %dx%d images, f=%d, %d codes, "
        "%d train / %d held-out images, device %s",
        f"{count:,}",
        f"{disc:,}",
        height,
        width,
        setup.recipe.downsample_factor,
        setup.recipe.codebook_size,
        len(setup.train_files),
        len(setup.val_files),
        setup.device,
    )
    log.info(
        "effective batch %d (per-process %d x %d processes x %d accumulation); "
        "discriminator from step %d",
        effective_batch(setup),
        trainer.section.batch_size,
        setup.dist.world_size,
        trainer.section.accumulate,
        trainer.section.disc_start,
    )
