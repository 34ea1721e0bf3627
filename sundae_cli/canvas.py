"""Canvases: `sundae sample` on the prior's native grid, `sundae generate` on any size.

Axes: `b` batch, `h w` token grid height and width, `n` flattened tokens, `k`
codebook size.

- `sample` draws `-n` images on the prior's native token grid (its recipe's
  `data.image_size` divided by the downsampling factor f).
- `generate` draws on a canvas of W x H pixels; both must be multiples of f (checked
  before any model is loaded; the error names the nearest valid sizes). At the native
  size it is exactly `sample`: same seeds, same code path, same bytes. On a larger or
  non-square canvas the prior runs on overlapping windows of its native grid each
  step (`windows.windowed_logits_fn`: the windows' log-probabilities are averaged per
  position), or with `--tiling shifted` on side-by-side windows whose tiling moves
  by half a window every other step (`windows.ShiftedTilings`); either way every
  position is updated in parallel. A canvas smaller than the
  native grid runs as one clipped window if the prior accepts that grid; otherwise
  the prior's own error is reported.
- Memory: before weights are loaded, the peak is estimated (`estimate_memory`: the
  sampler and one network call from `windows.estimate_sampling_memory`, the VQ-GAN's
  activations while decoding, the prior's weights) and compared with what the device
  has available; a canvas that will not fit is refused with the estimate in GiB.
- `--init IMG` (SUNDAE's self-correction as an upscaler): the image is fitted to the
  canvas (scaled to cover, centre-cropped: `images.fit_to`), encoded, and a share
  `strength` of its token positions, drawn per sample from a generator seeded by the
  sample's own seed, is replaced by uniformly random tokens; the sampler then refines
  every position freely from that start.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from sundae_cli.devices import resolve_device
from sundae_cli.errors import InputError
from sundae_cli.generation import (
    DECODE_PIXELS,
    GenerationModels,
    Job,
    JobResult,
    PriorChoice,
    check_class,
    choose_prior,
    load_models,
    planned_outputs,
    prior_logits_fn,
    refuse_existing,
    run_job,
    sampler_settings,
)
from sundae_cli.images import fit_to, load_rgb, to_tensor
from sundae_cli.recipes import Recipe
from sundae_cli.sampler import LogitsFn, derive_seed
from sundae_cli.windows import (
    ShiftedTilings,
    estimate_sampling_memory,
    shifted_tilings,
    window_positions,
    windowed_logits_fn,
)

log = logging.getLogger(__name__)

WINDOW_BATCH = 16  # windows per network call on a large canvas
ACTIVATION_COPIES = 6  # feature maps alive at once at the VQ-GAN's widest level
INIT_STREAM = 0x1A17  # derive_seed(sample seed, INIT_STREAM) seeds --init's noise
RESOLUTIONS = ("256", "512", "1024", "native")
GIB = 2**30


# --------------------------------------------------------------- geometry


def parse_size(text: str) -> tuple[int, int]:
    """`"WxH"` -> (height, width) in pixels; raises `InputError` naming --size."""
    width, sep, height = text.strip().lower().partition("x")
    if not sep or not width.isdigit() or not height.isdigit():
        raise InputError(
            f"--size {text!r} is not WIDTHxHEIGHT", hint="for example --size 1024x768"
        )
    if int(width) < 1 or int(height) < 1:
        raise InputError(f"--size {text!r} must be positive", hint="--size 1024x1024")
    return int(height), int(width)


def _nearest(value: int, factor: int) -> list[int]:
    lower = value // factor * factor
    return [size for size in (lower, lower + factor) if size > 0]


def canvas_grid(size: tuple[int, int], factor: int) -> tuple[int, int]:
    """Token grid (h, w) of a canvas (height, width) in pixels, or `InputError`."""
    height, width = size
    if height % factor == 0 and width % factor == 0:
        return height // factor, width // factor
    options = [
        f"{w}x{h}" for h in _nearest(height, factor) for w in _nearest(width, factor)
    ]
    raise InputError(
        f"--size {width}x{height} is not a multiple of the autoencoder's "
        f"downsampling factor {factor} on both sides",
        hint=f"use a size whose sides are multiples of {factor}, for example --size "
        + " or --size ".join(options),
    )


def requested_size(
    recipe: Recipe, size: tuple[int, int] | None, resolution: str | None
) -> tuple[int, int]:
    """Canvas (height, width) from --size or --resolution (default: native)."""
    if size is not None and resolution is not None:
        raise InputError("--size and --resolution both given", hint="pass only one")
    if size is not None:
        return size
    if resolution in (None, "native"):
        return tuple(recipe.data.image_size)
    if resolution not in RESOLUTIONS:
        raise InputError(
            f"--resolution {resolution!r} is not one of {', '.join(RESOLUTIONS)}",
            hint="or pass --size WxH",
        )
    return int(resolution), int(resolution)


# --------------------------------------------------------------- memory


def available_memory(device: torch.device) -> int:
    """Bytes free for tensors on `device` (CPU: MemAvailable, else physical RAM)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        with open("/proc/meminfo", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def vqgan_activation_bytes(config: Any, size: tuple[int, int], images: int) -> int:
    """Peak activation bytes of the VQ-GAN decoder (or encoder) on `images` images.

    About `ACTIVATION_COPIES` fp32 feature maps of the widest level at once: level i
    holds ch * ch_mult[i] channels and upsamples to the size of level i - 1.
    Attention runs through PyTorch's fused attention, which never stores the n x n
    weights, so it is not counted.
    """
    pixels = size[0] * size[1]
    widths = [config.ch * mult for mult in config.ch_mult]
    widest = max(
        width * pixels // 4 ** max(level - 1, 0) for level, width in enumerate(widths)
    )
    return images * ACTIVATION_COPIES * widest * 4


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes of the three parts that are alive at the peak (sampling or decoding)."""

    sampling: int
    decoding: int
    weights: int

    @property
    def total(self) -> int:
        return self.weights + max(self.sampling, self.decoding)

    def describe(self) -> str:
        return (
            f"about {self.total / GIB:.2f} GiB (sampling {self.sampling / GIB:.2f}, "
            f"decoding {self.decoding / GIB:.2f}, weights {self.weights / GIB:.2f})"
        )


def estimate_memory(
    choice: PriorChoice, batch: int, grid: tuple[int, int], encode: bool = False
) -> MemoryEstimate:
    """Estimate the peak of sampling `batch` canvases of `grid` tokens and decoding.

    The decoder runs on as many images as one decoder call takes (see
    `generation.DECODE_PIXELS`); `encode` counts one encoder pass as well (--init).
    """
    recipe = choice.recipe
    factor, window = recipe.downsample_factor, recipe.grid
    width = int(getattr(recipe.prior.config, "width", 1024))
    sampling = estimate_sampling_memory(
        batch, grid, window, recipe.codebook_size, width, 4, WINDOW_BATCH
    )
    size = (grid[0] * factor, grid[1] * factor)
    per_call = max(1, min(batch, DECODE_PIXELS // (size[0] * size[1])))
    config = recipe.autoencoder.config
    decoding = vqgan_activation_bytes(config, size, per_call + int(encode))
    weights = (choice.checkpoint / "model.safetensors").stat().st_size
    return MemoryEstimate(sampling, decoding, weights)


def check_memory(estimate: MemoryEstimate, device: str, hint: str) -> None:
    """Refuse (exit 2) a run whose estimate exceeds the device's available memory."""
    target = resolve_device(device)
    available = available_memory(target)
    log.debug(
        "memory: needs %s, %s has %d bytes", estimate.describe(), target, available
    )
    if estimate.total > available:
        raise InputError(
            f"this needs {estimate.describe()}, but {target} has only "
            f"{available / GIB:.2f} GiB available",
            hint=hint,
        )


# --------------------------------------------------------------- init and windows


def perturb_tokens(
    tokens: torch.Tensor, strength: float, codebook_size: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Re-randomise round(strength * n) positions of tokens (h, w) int64.

    Returns the new tokens (h, w) and the chosen positions (h, w) bool. Positions
    and their new tokens come from a CPU generator seeded with `seed`.
    """
    generator = torch.Generator().manual_seed(seed)
    flat = tokens.flatten().cpu()
    count = round(strength * flat.numel())
    order = torch.randperm(flat.numel(), generator=generator)
    chosen = torch.zeros(flat.numel(), dtype=torch.bool)
    chosen[order[:count]] = True
    noise = torch.randint(codebook_size, flat.shape, generator=generator)
    new = torch.where(chosen, noise, flat)
    return new.reshape(tokens.shape), chosen.reshape(tokens.shape)


def canvas_logits_fn(
    logits_fn: LogitsFn,
    canvas: tuple[int, int],
    window: tuple[int, int],
    overlap: int | None,
    tiling: str = "overlap",
) -> LogitsFn:
    """Logits for a canvas (h, w) of tokens from a prior trained on `window`.

    `tiling` "overlap": fixed overlapping windows, averaged (`--overlap` tokens
    shared); "shifted": windows side by side, shifted by half a window every other
    step (`windows.ShiftedTilings`).
    """
    if tiling == "shifted" and (canvas[0] > window[0] or canvas[1] > window[1]):
        return ShiftedTilings(logits_fn, canvas, window, max_batch=WINDOW_BATCH)
    return windowed_logits_fn(
        logits_fn, canvas=canvas, window=window, overlap=overlap, max_batch=WINDOW_BATCH
    )


def windows_per_step(
    canvas: tuple[int, int], window: tuple[int, int], overlap: int | None, tiling: str
) -> float:
    """Tokens the network sees per sampler step, in whole windows (the cost).

    For the shifted tiling this is the mean of its two tilings, with a half-size
    edge window counting as half a window.
    """
    area = window[0] * window[1]
    if tiling == "shifted":
        tilings = shifted_tilings(canvas, window)
        tokens = sum(h * w for tiling in tilings for *_, h, w in tiling)
        return tokens / len(tilings) / area
    fitted = min(canvas[0], window[0]) * min(canvas[1], window[1])
    return len(window_positions(canvas, window, overlap)) * fitted / area


def _init_start(models: GenerationModels, path: Path, grid, strength: float):
    """The `Job.start` of --init: the encoded image, perturbed per sample."""
    factor = models.factor
    image = fit_to(load_rgb(path), (grid[0] * factor, grid[1] * factor))
    with torch.inference_mode():
        pixels = to_tensor(image)[None].to(models.device)
        encoded = models.autoencoder.model.encode(pixels)[0].cpu()  # (h, w)

    def start(indices: list[int], seeds: list[int]):
        perturbed = [
            perturb_tokens(
                encoded, strength, models.codebook_size, derive_seed(s, INIT_STREAM)
            )[0]
            for s in seeds
        ]
        return torch.stack(perturbed), None

    return start


# --------------------------------------------------------------- entry points


@dataclass
class GenerationOptions:
    """Flags shared by `sample`, `generate` and `inpaint`."""

    count: int = 1
    seed: int = 0
    out: Path = Path("samples")
    model: str | None = None
    autoencoder: str | None = None
    batch_size: int | None = None
    class_label: int | None = None
    sampler: dict[str, Any] = field(default_factory=dict)  # flag overrides
    overwrite: bool = False
    device: str = "auto"


@dataclass
class SampleOptions(GenerationOptions):
    grid: bool = False  # also write grid.png
    history: int = 0  # decode every k-th step into an animated GIF per sample


@dataclass
class GenerateOptions(GenerationOptions):
    out: Path = Path("generated")
    size: tuple[int, int] | None = None  # (height, width) pixels
    resolution: str | None = None  # 256, 512, 1024 or native
    overlap: int | None = None  # tokens shared by neighbouring windows
    tiling: str = "overlap"  # "overlap" or "shifted" (see canvas_logits_fn)
    init: Path | None = None
    strength: float = 0.5


def prepare_run(options: GenerationOptions, kind: str, **outputs: bool) -> PriorChoice:
    """Checks that need no weights (count, class, settings, outputs); the prior."""
    if options.count < 1:
        raise InputError(f"-n must be at least 1, got {options.count}", hint="-n 1")
    choice = choose_prior(options.model)
    check_class(choice.num_classes, options.class_label)
    sampler_settings(choice.recipe.sampling, **options.sampler)  # flag errors
    paths = planned_outputs(options.out, kind, options.count, **outputs)
    refuse_existing(paths, options.overwrite)
    return choice


def batch_size(options: GenerationOptions, choice: PriorChoice) -> int:
    """--batch-size (else the recipe's `sampling.batch_size`), at most -n."""
    return min(options.batch_size or choice.recipe.sampling.batch_size, options.count)


def make_job(
    options: GenerationOptions,
    choice: PriorChoice,
    kind: str,
    grid: tuple[int, int],
    logits_fn: LogitsFn,
    **extra: Any,
) -> Job:
    """The `Job` of a command from its options; `extra` sets further `Job` fields."""
    history = getattr(options, "history", 0)
    settings = sampler_settings(
        choice.recipe.sampling, history_every=history, **options.sampler
    )
    return Job(
        kind=kind,
        count=options.count,
        seed=options.seed,
        batch_size=batch_size(options, choice),
        settings=settings,
        out=options.out,
        grid=grid,
        logits_fn=logits_fn,
        class_label=options.class_label,
        num_classes=choice.num_classes,
        **extra,
    )


def finish_run(models: GenerationModels, job: Job) -> JobResult:
    """Run the job and log its summary on stderr."""
    result = run_job(models, job)
    log.info(result.summary())
    return result


def sample(options: SampleOptions) -> JobResult:
    """`sundae sample`: images on the prior's native grid, written with sidecars."""
    choice = prepare_run(options, "sample", gif=options.history > 0, grid=options.grid)
    estimate = estimate_memory(choice, batch_size(options, choice), choice.recipe.grid)
    check_memory(estimate, options.device, "choose a smaller --batch-size")
    models = load_models(choice, options.autoencoder, options.device)
    logits_fn = prior_logits_fn(models)
    job = make_job(
        options,
        choice,
        "sample",
        choice.recipe.grid,
        logits_fn,
        grid_image=options.grid,
    )
    return finish_run(models, job)


def _canvas_plan(options: GenerateOptions, choice: PriorChoice) -> tuple[int, int]:
    """Validate --strength and --size/--resolution; the canvas grid (h, w)."""
    if not 0.0 <= options.strength <= 1.0:
        raise InputError(
            f"--strength must be in [0, 1], got {options.strength}",
            hint="--strength 0.5 re-randomises half of the --init image's tokens",
        )
    if options.tiling not in ("overlap", "shifted"):
        raise InputError(
            f"--tiling must be 'overlap' or 'shifted', got {options.tiling!r}",
            hint="--tiling shifted is the faster of the two",
        )
    if options.tiling == "shifted" and options.overlap is not None:
        raise InputError(
            "--overlap applies to --tiling overlap only; shifted windows never overlap",
            hint="drop --overlap, or use --tiling overlap",
        )
    recipe = choice.recipe
    size = requested_size(recipe, options.size, options.resolution)
    return canvas_grid(size, recipe.downsample_factor)


def generate(options: GenerateOptions) -> JobResult:
    """`sundae generate`: a canvas of any valid size, optionally started from --init."""
    choice = prepare_run(options, "generate")
    grid = _canvas_plan(options, choice)
    encode = options.init is not None
    estimate = estimate_memory(choice, batch_size(options, choice), grid, encode)
    check_memory(estimate, options.device, "choose a smaller --size or --batch-size")
    window = choice.recipe.grid
    windows = windows_per_step(grid, window, options.overlap, options.tiling)
    models = load_models(choice, options.autoencoder, options.device)
    log.info(
        "canvas %dx%d tokens: %g window(s) of %dx%d worth of tokens per step (%s "
        "tiling)",
        *grid, windows, *window, options.tiling,
    )  # fmt: skip
    logits_fn = canvas_logits_fn(
        prior_logits_fn(models), grid, window, options.overlap, options.tiling
    )
    start = None
    if options.init is not None:
        start = _init_start(models, options.init, grid, options.strength)
    sidecar = {
        "window": list(window),
        "windows": windows,
        "overlap": options.overlap,
        "tiling": options.tiling,
        "init": None if options.init is None else Path(options.init).name,
        "strength": options.strength if options.init is not None else None,
    }
    job = make_job(
        options, choice, "generate", grid, logits_fn, start=start, sidecar=sidecar
    )
    return finish_run(models, job)
