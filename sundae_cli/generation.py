"""Shared machinery of `sundae sample`, `generate` and `inpaint`.

Axes: `b` batch, `h w` token grid height and width, `k` codebook size.

Policies shared by the three commands:

- Seeds. Image i of a run seeded with S is sampled with `derive_seed(S, i)`, i its
  global index, so image i is the same whatever `-n` or `--batch-size`.
- Models. `--model` picks the prior (default: the newest prior run, else the bundled
  model). The autoencoder is the one recorded in the prior's checkpoint, found by
  sha256; one passed with `--autoencoder` must have that sha256, and its codebook
  size and downsampling factor must be the ones the prior was trained on (C10).
- Outputs. `<kind>-00000.png` plus a JSON sidecar `<kind>-00000.json` (seeds, every
  sampler setting, class, model runs and sha256s, steps used, grid, image size),
  optionally an animated `<kind>-00000.gif` of the refinement and `grid.png`. Every
  planned path is checked before any model is loaded or sampled, and an existing one
  is refused unless `overwrite`. Files are written atomically; PNGs carry no
  metadata and sidecars have sorted keys and no time stamps or paths, so a rerun with
  the same seed writes the same bytes.
- Decoding runs on the sampling device in chunks of at most `DECODE_PIXELS` pixels
  (at least one image), which bounds the decoder's activations.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from sundae_cli.checkpoints import META, read_meta
from sundae_cli.devices import autocast, resolve_device, resolve_precision
from sundae_cli.errors import CheckpointError, InputError
from sundae_cli.fsutil import atomic_path, write_text_atomic
from sundae_cli.images import make_grid, save_png_atomic, to_image
from sundae_cli.models import (
    LoadedModel,
    autoencoder_for_prior,
    describe,
    load_autoencoder_checked,
    load_checkpoint,
    resolve_prior_ref,
)
from sundae_cli.recipes import Recipe, SamplingSection, recipe_from_dict
from sundae_cli.sampler import LogitsFn, SamplerSettings, derive_seed, sample_tokens
from sundae_cli.training import Progress

log = logging.getLogger(__name__)

DECODE_PIXELS = 1 << 20  # pixels per decoder call (at least one image)
GIF_FRAME_MS = 80  # display time of each refinement frame
GIF_LAST_FRAME_MS = 1500  # the finished image stays up longer

# (indices, seeds) -> (init tokens (b, h, w), fixed mask (b, h, w) | None) or None
StartFn = Callable[[list[int], list[int]], tuple[torch.Tensor, torch.Tensor | None]]


# --------------------------------------------------------------- settings


def parse_schedule(text: str, flag: str) -> tuple[float, float]:
    """`"0.8"` -> (0.8, 0.8); `"1.0:0.7"` -> (1.0, 0.7), moved linearly over steps."""
    parts = text.strip().split(":")
    try:
        values = [float(part) for part in parts]
    except ValueError:
        values = []
    if len(parts) > 2 or not values or not all(map(math.isfinite, values)):
        raise InputError(
            f"{flag} {text!r} is not a number or START:END",
            hint=f"for example {flag} 0.8, or {flag} 1.0:0.7 to move linearly",
        )
    return values[0], values[-1]


def sampler_settings(section: SamplingSection, **overrides: Any) -> SamplerSettings:
    """The recipe's `[sampling]` defaults with every non-None flag override applied.

    Override keys are `SamplerSettings` fields (steps, temperature, proportion, top_k,
    update, min_steps, early_stop, history_every).
    """
    known = {item.name for item in fields(SamplerSettings)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise TypeError(f"unknown sampler settings: {unknown}")
    values = section.model_dump(exclude={"batch_size"})
    values.update({key: value for key, value in overrides.items() if value is not None})
    settings = SamplerSettings(**values)
    if max(settings.proportion) == 0:
        raise InputError(
            "--proportion 0 updates no token: every sample would stay its random start",
            hint="for example --proportion 0.5 (or sampling.proportion in the recipe)",
        )
    return settings


def settings_record(settings: SamplerSettings) -> dict[str, Any]:
    """Sampler settings as JSON-ready values (pairs as lists), for sidecars."""
    return json.loads(json.dumps(asdict(settings)))


# --------------------------------------------------------------- models


@dataclass(frozen=True)
class PriorChoice:
    """The prior checkpoint a command will use, read without loading weights."""

    checkpoint: Path
    bundled: bool
    recipe: Recipe

    @property
    def num_classes(self) -> int:
        return int(getattr(self.recipe.prior.config, "num_classes", 0) or 0)


def choose_prior(model: str | Path | None) -> PriorChoice:
    """Resolve `--model` (default: newest prior run, else the bundled model)."""
    ckpt, bundled = resolve_prior_ref(model)
    recipe = recipe_from_dict(read_meta(ckpt)["recipe"], source=str(ckpt / META))
    return PriorChoice(ckpt, bundled, recipe)


@dataclass
class GenerationModels:
    """A prior, the autoencoder that decodes its tokens, and where they run."""

    prior: LoadedModel
    autoencoder: LoadedModel
    device: torch.device
    dtype: torch.dtype
    bundled: bool = False

    @property
    def codebook_size(self) -> int:
        return int(self.autoencoder.model.codebook_size)

    @property
    def factor(self) -> int:
        return int(self.autoencoder.model.downsample_factor)

    def record(self) -> dict[str, Any]:
        """Run names, steps and sha256s of both models, for sidecars."""
        pairs = (("prior", self.prior), ("autoencoder", self.autoencoder))
        return {
            kind: {
                "run": m.run_path.name,
                "step": m.meta.get("step"),
                "sha256": m.sha256,
            }
            for kind, m in pairs
        }


def load_models(
    choice: PriorChoice, autoencoder: str | Path | None, device: str
) -> GenerationModels:
    """Load the prior and its autoencoder (checked against each other) on `device`."""
    target = resolve_device(device)
    prior = load_checkpoint(choice.checkpoint, "prior", target)
    if autoencoder is None:
        decoder = autoencoder_for_prior(prior, target)
    else:
        decoder = load_autoencoder_checked(autoencoder, prior, target)
    check_pair(prior, decoder)
    where = "using bundled model" if choice.bundled else "prior"
    log.info("%s: %s", where, describe(prior))
    log.info("autoencoder: %s", describe(decoder))
    dtype = resolve_precision(prior.recipe.precision, target)
    return GenerationModels(prior, decoder, target, dtype, choice.bundled)


def check_pair(prior: LoadedModel, autoencoder: LoadedModel) -> None:
    """Refuse an autoencoder whose codebook or grid is not what the prior learned."""
    model, recipe = autoencoder.model, prior.recipe
    pairs = [
        ("codebook size", recipe.codebook_size, model.codebook_size),
        ("downsampling factor", recipe.downsample_factor, model.downsample_factor),
    ]
    for what, wanted, got in pairs:
        if int(wanted) != int(got):
            raise CheckpointError(
                f"autoencoder {autoencoder.checkpoint} has {what} {got}, but prior "
                f"{prior.checkpoint} was trained on latents with {what} {wanted}",
                hint="drop --autoencoder to use the one recorded with the prior",
            )


def prior_logits_fn(models: GenerationModels) -> LogitsFn:
    """The prior as the sampler's logits function, under the recipe's precision."""
    model, device, dtype = models.prior.model, models.device, models.dtype

    def logits_fn(tokens: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        with autocast(device, dtype):
            return model(tokens, labels)  # (b, h, w, k)

    return logits_fn


def check_class(num_classes: int, class_label: int | None) -> None:
    """Refuse `--class` for an unconditional prior or outside 0..num_classes-1."""
    if class_label is None:
        return
    if not num_classes:
        raise InputError(
            f"--class {class_label} was given but this prior is unconditional",
            hint="drop --class, or pass a class-conditional prior with --model",
        )
    if not 0 <= class_label < num_classes:
        raise InputError(
            f"--class {class_label} is out of range: the prior has {num_classes} "
            f"classes (0..{num_classes - 1})",
            hint=f"pass --class between 0 and {num_classes - 1}",
        )


def class_of(num_classes: int, class_label: int | None, index: int) -> int | None:
    """Class of image `index`: `--class`, else cycling through all classes."""
    if not num_classes:
        return None
    return class_label if class_label is not None else index % num_classes


# --------------------------------------------------------------- outputs


def planned_outputs(
    out: Path, kind: str, count: int, *, gif: bool = False, grid: bool = False
) -> list[Path]:
    """Every file a run of `count` images will write, in writing order."""
    suffixes = (".png", ".json", ".gif") if gif else (".png", ".json")
    paths = [
        out / f"{kind}-{i:05d}{suffix}" for i in range(count) for suffix in suffixes
    ]
    return paths + ([out / "grid.png"] if grid else [])


def refuse_existing(paths: list[Path], overwrite: bool) -> None:
    """Raise `InputError` if any planned output exists (unless `overwrite`)."""
    for folder in {path.parent for path in paths}:
        if folder.exists() and not folder.is_dir():
            raise InputError(f"--out {folder} is a file", hint="pass a folder to --out")
    existing = [path for path in paths if path.exists()]
    if existing and not overwrite:
        more = f" (and {len(existing) - 1} more)" if len(existing) > 1 else ""
        raise InputError(
            f"{existing[0]}{more} already exists; nothing was written",
            hint="pass --overwrite to replace earlier outputs, or choose another --out",
        )


def write_output(image: Image.Image, path: Path, sidecar: dict[str, Any]) -> None:
    """Write a PNG and its JSON sidecar (same stem), both atomically."""
    save_png_atomic(image, path)
    text = json.dumps(sidecar, indent=2, sort_keys=True) + "\n"
    write_text_atomic(path.with_suffix(".json"), text)


def write_gif(frames: list[Image.Image], path: Path) -> None:
    """Write an animated GIF that loops, the last frame held longer."""
    durations = [GIF_FRAME_MS] * (len(frames) - 1) + [GIF_LAST_FRAME_MS]
    with atomic_path(path) as temp:
        frames[0].save(
            temp,
            format="GIF",
            save_all=True,
            append_images=frames[1:],
            duration=durations,
            loop=0,
        )


def decode_images(autoencoder: Any, tokens: torch.Tensor, device: torch.device):
    """Token grids (b, h, w) int64 -> list of RGB images, decoded on `device`."""
    height, width = tokens.shape[1:]
    pixels = height * width * autoencoder.downsample_factor**2
    chunk = max(1, DECODE_PIXELS // pixels)
    images: list[Image.Image] = []
    for start in range(0, tokens.shape[0], chunk):
        batch = tokens[start : start + chunk].to(device)
        decoded = autoencoder.decode(batch).float().cpu()  # (b, 3, H, W)
        images += [to_image(item) for item in decoded]
    return images


# --------------------------------------------------------------- the run


@dataclass
class Job:
    """One generation run: what to sample and where to write it."""

    kind: str  # file prefix and sidecar kind: "sample", "generate", "inpaint"
    count: int
    seed: int
    batch_size: int
    settings: SamplerSettings
    out: Path
    grid: tuple[int, int]  # token grid (h, w) of the canvas
    logits_fn: LogitsFn
    class_label: int | None = None
    num_classes: int = 0
    start: StartFn | None = None  # init tokens and fixed mask per batch
    finish: Callable[[Image.Image], Image.Image] | None = None  # per image
    grid_image: bool = False  # also write grid.png
    sidecar: dict[str, Any] = field(default_factory=dict)  # extra sidecar fields


@dataclass
class JobResult:
    """What a run wrote, how long it took, and the final tokens (n, h, w)."""

    paths: list[Path]
    seconds: float
    steps_used: list[int]
    tokens: torch.Tensor

    def summary(self) -> str:
        count = len(self.steps_used)
        mean_steps = sum(self.steps_used) / max(count, 1)
        return (
            f"{count} image{'s' if count != 1 else ''} in {self.seconds:.1f} s "
            f"({self.seconds / max(count, 1):.2f} s per image), "
            f"mean {mean_steps:.1f} steps used"
        )


def _sample_batch(job: Job, models: GenerationModels, indices: list[int]):
    """Sample the images `indices` of the job; returns the `SampleResult`."""
    seeds = [derive_seed(job.seed, index) for index in indices]
    init, fixed = job.start(indices, seeds) if job.start else (None, None)
    classes = [class_of(job.num_classes, job.class_label, i) for i in indices]
    labels = None if classes[0] is None else torch.tensor(classes)
    return sample_tokens(
        job.logits_fn,
        batch_size=len(indices),
        grid=job.grid,
        codebook_size=models.codebook_size,
        seeds=seeds,
        settings=job.settings,
        init_tokens=init,
        fixed_mask=fixed,
        class_labels=labels,
        device=models.device,
    )


def _sidecar(
    job: Job, models: GenerationModels, index: int, steps: int, image: Image.Image
) -> dict[str, Any]:
    """Everything needed to reproduce image `index`, and nothing that varies."""
    return {
        **job.sidecar,
        "kind": job.kind,
        "index": index,
        "seed": job.seed,
        "sample_seed": derive_seed(job.seed, index),
        "class": class_of(job.num_classes, job.class_label, index),
        "sampler": settings_record(job.settings),
        "steps_used": steps,
        "grid": list(job.grid),
        "image_size": [image.height, image.width],
        **models.record(),
    }


def _write_batch(
    job: Job, models: GenerationModels, indices: list[int], result: Any
) -> tuple[list[Path], list[Image.Image]]:
    """Decode one sampled batch; write its images, sidecars and GIFs."""
    finish = job.finish or (lambda image: image)
    decoder, device = models.autoencoder.model, models.device
    images = [finish(img) for img in decode_images(decoder, result.tokens, device)]
    frames = [decode_images(decoder, snap, device) for snap in result.history]
    written = []
    for offset, index in enumerate(indices):
        image, path = images[offset], job.out / f"{job.kind}-{index:05d}.png"
        steps = result.steps_used[offset]
        write_output(image, path, _sidecar(job, models, index, steps, image))
        written.append(path)
        if frames:
            gif = path.with_suffix(".gif")
            write_gif([finish(snapshot[offset]) for snapshot in frames], gif)
            written.append(gif)
    return written, images


def run_job(models: GenerationModels, job: Job) -> JobResult:
    """Sample, decode and write `job.count` images in batches of `job.batch_size`."""
    if job.num_classes and job.class_label is None:
        log.info(
            "class-conditional prior: image i gets class i mod %d (--class picks one)",
            job.num_classes,
        )
    started = time.perf_counter()
    paths: list[Path] = []
    steps_used: list[int] = []
    tokens, thumbnails = [], []
    with torch.inference_mode(), Progress(job.count, 0, job.kind, True) as progress:
        for first in range(0, job.count, job.batch_size):
            indices = list(range(first, min(first + job.batch_size, job.count)))
            result = _sample_batch(job, models, indices)
            written, images = _write_batch(job, models, indices, result)
            paths += written
            thumbnails += images if job.grid_image else []
            steps_used += result.steps_used
            tokens.append(result.tokens.cpu())
            rate = (time.perf_counter() - started) / len(steps_used)
            progress.update(len(steps_used), f"{rate:.2f} s/image")
    if job.grid_image:
        paths.append(save_png_atomic(make_grid(thumbnails), job.out / "grid.png"))
    seconds = time.perf_counter() - started
    return JobResult(paths, seconds, steps_used, torch.cat(tokens))
