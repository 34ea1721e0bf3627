"""Inpainting masks: reading, mapping to the token grid, padding and pasting back.

Conventions (one behaviour for every mask a user can draw):

- White means regenerate; `invert=True` flips it. Masks are read upright (EXIF
  orientation applied, like images) as one channel and thresholded at half scale:
  a grey level >= 128 is masked. Soft or blurred edges, JPEG artefacts and near-black
  backgrounds such as (1, 1, 1) therefore land on the side of the drawn shape.
- RGB and greyscale masks are read by luminance (ITU-R 601, Pillow's `convert("L")`).
- Alpha rule: a mask with real transparency (an alpha channel that is not fully opaque,
  or a palette's transparent index) whose visible pixels (alpha >= 128) all share one
  grey level (spread <= `UNIFORM_SPREAD`) is a stroke layer: its alpha is the mask and
  opaque means regenerate, whatever the stroke colour. Any other mask with alpha is
  composited over black and read by luminance.
- A mask of another size than its image is an error unless `resize=True`; then the grey
  mask is resized bilinearly to the image size and thresholded afterwards.
- Sizes are (height, width) in arguments, WxH in messages.
- Images whose sides are not multiples of the downsampling factor are padded on the
  right and bottom by edge replication (no reflect: it needs the pad to be smaller than
  the image, which fails for 7x7 and f=16), and cropped back afterwards, so the output
  has the input's exact size.
"""

from __future__ import annotations

import logging
import os

import numpy as np
from PIL import Image, ImageOps

from sundae_cli.errors import DataError
from sundae_cli.images import strict_decoding

logger = logging.getLogger(__name__)

THRESHOLD = 128
"""Grey level (of 255) from which a mask pixel means regenerate."""

UNIFORM_SPREAD = 32
"""Largest grey-level spread of visible pixels for which alpha is read as the mask."""

TOKEN_POLICIES = ("any", "all", "threshold")


def _alpha_rule(img: Image.Image) -> np.ndarray:
    """Grey levels (H, W) uint8 of a mask that has (possibly) transparency."""
    rgba = img.convert("RGBA")
    alpha = np.asarray(rgba.getchannel("A"))
    if alpha.min() == 255:
        return np.asarray(rgba.convert("L"))
    grey = np.asarray(rgba.convert("L"))
    visible = grey[alpha >= THRESHOLD]
    if visible.size and int(visible.max()) - int(visible.min()) <= UNIFORM_SPREAD:
        return alpha
    ground = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
    return np.asarray(Image.alpha_composite(ground, rgba).convert("L"))


def _grey_levels(img: Image.Image) -> np.ndarray:
    """One channel (H, W) uint8 of a mask image following the module's rules."""
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info:
        return _alpha_rule(img)
    if img.mode.startswith("I") or img.mode == "F":
        values = np.asarray(img, dtype=np.float64)
        values = values / 257.0 if img.mode != "F" else values
        return np.clip(np.rint(values), 0, 255).astype(np.uint8)
    return np.asarray(img.convert("L"))


def _open_mask(path: str | os.PathLike) -> Image.Image:
    """Open a mask upright; errors name the file."""
    try:
        with strict_decoding(), Image.open(path) as img:
            img.load()
            return ImageOps.exif_transpose(img)
    except FileNotFoundError as err:
        raise DataError(f"mask {path} does not exist", "check the path") from err
    except (OSError, SyntaxError, ValueError, EOFError) as err:
        raise DataError(
            f"cannot read mask {path}: {err}",
            "save the mask as PNG (white = regenerate, black = keep)",
        ) from err


def load_mask(
    path: str | os.PathLike,
    *,
    image_size: tuple[int, int] | None = None,
    invert: bool = False,
    resize: bool = False,
) -> np.ndarray:
    """Read a mask file as bool (H, W); True means regenerate.

    Args:
        path: mask image (any mode Pillow reads; see the module rules).
        image_size: (height, width) of the image it belongs to, checked when given.
        invert: flip the convention (black means regenerate).
        resize: scale a mask of another size to `image_size` instead of refusing.
    """
    img = _open_mask(path)
    grey = Image.fromarray(_grey_levels(img), "L")
    if image_size is not None and grey.size != (image_size[1], image_size[0]):
        if not resize:
            raise DataError(
                f"mask {path} is {grey.width}x{grey.height} but image is "
                f"{image_size[1]}x{image_size[0]}",
                "pass --resize-mask to scale the mask to the image, or draw it at the "
                "image's size",
            )
        grey = grey.resize((image_size[1], image_size[0]), Image.Resampling.BILINEAR)
    mask = np.asarray(grey) >= THRESHOLD
    return ~mask if invert else mask


def masked_fraction(mask: np.ndarray) -> float:
    """Fraction of True entries of a bool mask, in [0, 1]."""
    return float(np.asarray(mask, dtype=bool).mean()) if mask.size else 0.0


def token_mask(
    pixel_mask: np.ndarray,
    factor: int,
    policy: str = "any",
    threshold: float = 0.5,
) -> np.ndarray:
    """Map a pixel mask bool (H, W) to the token grid bool (H/f, W/f).

    A token is regenerated when any pixel of its f x f patch is masked (`"any"`, the
    default: nothing the user marked survives), when all are (`"all"`), or when more
    than `threshold` of them are (`"threshold"`). H and W must be multiples of `factor`;
    pad first with `pad_to_multiple`.
    """
    height, width = pixel_mask.shape
    if height % factor or width % factor:
        raise ValueError(
            f"mask {width}x{height} is not a multiple of {factor}; pad it first"
        )
    patches = np.asarray(pixel_mask, dtype=bool).reshape(
        height // factor, factor, width // factor, factor
    )
    if policy == "any":
        return patches.any(axis=(1, 3))
    if policy == "all":
        return patches.all(axis=(1, 3))
    if policy == "threshold":
        return patches.mean(axis=(1, 3)) > threshold
    raise ValueError(f"policy must be one of {TOKEN_POLICIES}, not {policy!r}")


def pad_amounts(height: int, width: int, factor: int) -> tuple[int, int]:
    """(pad_right, pad_bottom) that make a height x width image divisible by factor."""
    return (-width) % factor, (-height) % factor


def pad_to_multiple(img, factor: int):
    """Pad a PIL image or array (H, W[, C]) right and bottom by edge replication.

    Returns `(padded, (pad_right, pad_bottom))`; `unpad` undoes it exactly.
    """
    array = np.asarray(img)
    pad_right, pad_bottom = pad_amounts(array.shape[0], array.shape[1], factor)
    widths = [(0, pad_bottom), (0, pad_right)] + [(0, 0)] * (array.ndim - 2)
    padded = np.pad(array, widths, mode="edge")
    if isinstance(img, Image.Image):
        return Image.fromarray(padded, img.mode), (pad_right, pad_bottom)
    return padded, (pad_right, pad_bottom)


def unpad(img, pads: tuple[int, int]):
    """Remove the right and bottom padding added by `pad_to_multiple`."""
    pad_right, pad_bottom = pads
    if isinstance(img, Image.Image):
        return img.crop((0, 0, img.width - pad_right, img.height - pad_bottom))
    array = np.asarray(img)
    return array[: array.shape[0] - pad_bottom, : array.shape[1] - pad_right]


def _box_mean(values: np.ndarray, radius: int) -> np.ndarray:
    """Mean over a (2r+1) square window, edges replicated; exact, O(pixels)."""
    size = 2 * radius + 1
    padded = np.pad(values, radius, mode="edge")
    for axis in (0, 1):
        cumulative = np.cumsum(padded, axis=axis, dtype=np.float64)
        cumulative = np.concatenate(
            [np.zeros_like(np.take(cumulative, [0], axis=axis)), cumulative], axis=axis
        )
        upper = np.take(cumulative, np.arange(size, cumulative.shape[axis]), axis=axis)
        lower = np.take(cumulative, np.arange(cumulative.shape[axis] - size), axis=axis)
        padded = (upper - lower) / size
    return padded


def feather_alpha(mask: np.ndarray, feather_px: int) -> np.ndarray:
    """Blend weight float32 (H, W) in [0, 1] for the generated image.

    1 inside the regenerate region, fading to 0 over `feather_px` pixels outside it
    (dilate by half the width, then box-blur by half the width), so known pixels far
    from the mask are kept exactly.
    """
    inside = np.asarray(mask, dtype=np.float64)
    if feather_px <= 0 or not inside.any():
        return inside.astype(np.float32)
    radius = max(1, feather_px // 2)
    dilated = (_box_mean(inside, radius) > 0).astype(np.float64)
    soft = _box_mean(dilated, radius)
    return np.clip(np.maximum(soft, inside), 0.0, 1.0).astype(np.float32)


def paste_known(
    original: Image.Image, generated: Image.Image, mask_alpha: np.ndarray
) -> Image.Image:
    """Blend `generated` over `original` (RGB, same size) by `mask_alpha` float (H, W).

    Where the weight is 0 the original pixels come back unchanged.
    """
    if original.size != generated.size:
        raise ValueError(f"sizes differ: {original.size} vs {generated.size}")
    weight = np.asarray(mask_alpha, dtype=np.float64)[..., None]  # (H, W, 1)
    known = np.asarray(original.convert("RGB"), dtype=np.float64)
    new = np.asarray(generated.convert("RGB"), dtype=np.float64)
    blended = weight * new + (1.0 - weight) * known
    return Image.fromarray(np.clip(np.rint(blended), 0, 255).astype(np.uint8), "RGB")
