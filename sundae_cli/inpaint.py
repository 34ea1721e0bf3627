"""Inpainting: regenerate the masked part of an image, keep the rest.

Axes: `h w` token grid height and width; pixel sizes are (height, width).

Canvas policy: resize, not pad. The prior knows one canvas, its recipe's
`data.image_size` (a grid of H0/f x W0/f tokens). An input of any size (283x530,
37x53, 7x7 ...) is resized to that canvas (Lanczos, aspect ratio not kept), inpainted
there, and the result is resized back to the input's exact size, which undoes the
aspect distortion. With `paste` on (the default) the input's own pixels are then
pasted back outside the mask, optionally with a feathered edge of `feather` pixels;
with feather 0 every unmasked pixel of the output is the input's exactly. Padding
was rejected because an image far from the canvas's size would either leave most
of the grid as padding or not fit the prior's grid at all.

Masks follow `sundae_cli.masks`: white means regenerate (`invert` flips it), read
upright as one channel, thresholded at half scale, alpha rule for transparent masks;
a mask of another size than the image is an error unless `resize_mask`. The pixel
mask is resized to the canvas by area (a canvas pixel's value is the masked share
of the input pixels it covers); under the default "any" policy a canvas pixel
touched by any masked pixel is masked and a token is regenerated if any pixel of its
patch is, so nothing the user marked survives. "all" and "threshold" read the
canvas mask at half coverage and apply their own token rule.

Known tokens are the encoding of the resized input and stay fixed at every step;
regenerated tokens start random. Completion i uses `derive_seed(seed, i)`.

Nothing to regenerate (an all-black mask, or no token selected by the policy): a
warning, and every completion is an exact copy of the input; no model is run. Above
`WARN_FRACTION` masked: a warning that little of the input constrains the result.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from sundae_cli.canvas import (
    GenerationOptions,
    batch_size,
    check_memory,
    estimate_memory,
    finish_run,
    make_job,
    prepare_run,
)
from sundae_cli.errors import InputError
from sundae_cli.generation import (
    GenerationModels,
    JobResult,
    PriorChoice,
    load_models,
    prior_logits_fn,
    write_output,
)
from sundae_cli.masks import (
    TOKEN_POLICIES,
    feather_alpha,
    load_mask,
    masked_fraction,
    paste_known,
    token_mask,
)

log = logging.getLogger(__name__)

WARN_FRACTION = 0.95  # warn when more than this share of the image is regenerated
RESAMPLE = Image.Resampling.LANCZOS


@dataclass
class InpaintOptions(GenerationOptions):
    image: Path = Path()
    mask: Path = Path()
    out: Path = Path("inpaint")
    count: int = 4
    invert_mask: bool = False
    mask_policy: str = "any"  # any, all or threshold (see sundae_cli.masks)
    resize_mask: bool = False
    paste: bool = True
    feather: int = 0  # pixels of soft edge when pasting the input back


@dataclass(frozen=True)
class MaskPlan:
    """The user's mask (H, W), its canvas version (H0, W0) and the tokens (h, w)."""

    pixels: np.ndarray
    canvas: np.ndarray
    tokens: np.ndarray

    def describe(self) -> str:
        return (
            f"mask: {100 * masked_fraction(self.pixels):.1f}% of pixels, "
            f"{100 * masked_fraction(self.tokens):.1f}% of tokens "
            f"({int(self.tokens.sum())} of {self.tokens.size}) regenerated"
        )


def canvas_mask(pixels: np.ndarray, canvas: tuple[int, int], policy: str) -> np.ndarray:
    """Resize a bool mask (H, W) to the canvas (H0, W0) by area coverage.

    "any" marks every canvas pixel that a masked pixel touches; the other policies
    mark canvas pixels at least half covered.
    """
    coverage = Image.fromarray(pixels.astype(np.float32), "F").resize(
        (canvas[1], canvas[0]), Image.Resampling.BOX
    )
    values = np.asarray(coverage)
    return values > 1e-6 if policy == "any" else values >= 0.5


def plan_mask(
    pixels: np.ndarray, canvas: tuple[int, int], factor: int, policy: str
) -> MaskPlan:
    """Map the user's pixel mask to the canvas and to the token grid by `policy`."""
    if policy not in TOKEN_POLICIES:
        raise InputError(
            f"--mask-policy {policy!r} is not one of {', '.join(TOKEN_POLICIES)}",
            hint="--mask-policy any regenerates every token the mask touches",
        )
    on_canvas = canvas_mask(pixels, canvas, policy)
    return MaskPlan(pixels, on_canvas, token_mask(on_canvas, factor, policy))


def _warn(plan: MaskPlan, policy: str) -> None:
    log.info(plan.describe())
    if not plan.pixels.any():
        log.warning("the mask is all black: nothing to regenerate; writing copies")
    elif not plan.tokens.any():
        log.warning(
            "no token is regenerated under --mask-policy %s: nothing to regenerate; "
            "writing copies (try --mask-policy any)",
            policy,
        )
    elif masked_fraction(plan.pixels) > WARN_FRACTION:
        log.warning(
            "%.1f%% of the image is masked: little of it constrains the result "
            "(white means regenerate; --invert-mask flips the mask)",
            100 * masked_fraction(plan.pixels),
        )


def _copies(options: InpaintOptions, original: Image.Image, plan) -> JobResult:
    """Nothing to regenerate: write each completion as an exact copy of the input."""
    paths = []
    for index in range(options.count):
        path = options.out / f"inpaint-{index:05d}.png"
        sidecar = {
            "kind": "inpaint",
            "index": index,
            "seed": options.seed,
            "copy_of_input": True,
            "masked_fraction": masked_fraction(plan.pixels),
            "image_size": [original.height, original.width],
        }
        write_output(original, path, sidecar)
        paths.append(path)
    empty = torch.empty(0, *plan.tokens.shape, dtype=torch.int64)
    return JobResult(paths, 0.0, [0] * options.count, empty)


def encode_canvas(models: GenerationModels, image: Image.Image) -> torch.Tensor:
    """Encode an RGB image already at canvas size; tokens (1, h, w) int64 on CPU."""
    from sundae_cli.images import to_tensor

    with torch.inference_mode():
        pixels = to_tensor(image)[None].to(models.device)
        return models.autoencoder.model.encode(pixels).cpu()


def _finisher(options: InpaintOptions, original: Image.Image, pixels: np.ndarray):
    """Per completion: resize back to the input's size and paste known pixels."""
    alpha = feather_alpha(pixels, options.feather) if options.paste else None

    def finish(generated: Image.Image) -> Image.Image:
        restored = generated.resize(original.size, RESAMPLE)
        return restored if alpha is None else paste_known(original, restored, alpha)

    return finish


def _load(options: InpaintOptions) -> tuple[Image.Image, np.ndarray]:
    from sundae_cli.images import load_rgb

    if options.feather < 0:
        raise InputError(f"--feather must be >= 0, got {options.feather}")
    original = load_rgb(options.image)
    pixels = load_mask(
        options.mask,
        image_size=(original.height, original.width),
        invert=options.invert_mask,
        resize=options.resize_mask,
    )
    return original, pixels


def inpaint(options: InpaintOptions) -> JobResult:
    """`sundae inpaint`: `count` completions of the masked region, input-sized."""
    original, pixels = _load(options)
    choice: PriorChoice = prepare_run(options, "inpaint")
    recipe = choice.recipe
    canvas = tuple(recipe.data.image_size)
    plan = plan_mask(pixels, canvas, recipe.downsample_factor, options.mask_policy)
    _warn(plan, options.mask_policy)
    if not plan.tokens.any():
        return _copies(options, original, plan)

    estimate = estimate_memory(choice, batch_size(options, choice), recipe.grid, True)
    check_memory(estimate, options.device, "choose a smaller --batch-size")
    models = load_models(choice, options.autoencoder, options.device)
    known = encode_canvas(models, original.resize((canvas[1], canvas[0]), RESAMPLE))
    fixed = torch.from_numpy(~plan.tokens)[None]  # (1, h, w) True = keep

    def start(indices: list[int], seeds: list[int]):
        return known.expand(len(indices), -1, -1), fixed.expand(len(indices), -1, -1)

    sidecar = {
        "masked_fraction": masked_fraction(plan.pixels),
        "masked_token_fraction": masked_fraction(plan.tokens),
        "mask_policy": options.mask_policy,
        "paste": options.paste,
        "feather": options.feather,
    }
    job = make_job(
        options,
        choice,
        "inpaint",
        recipe.grid,
        prior_logits_fn(models),
        start=start,
        finish=_finisher(options, original, plan.pixels),
        sidecar=sidecar,
    )
    return finish_run(models, job)
