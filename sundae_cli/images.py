"""Image folders, loading and the one resize-and-crop policy used everywhere.

Policies (shared by `train vqgan`, `encode`, `generate --init` and `inpaint`):

- Files are recognised by content, not by extension: anything Pillow opens as PNG,
  JPEG (or MPO, the multi-picture JPEG phones write), WebP, BMP, GIF or TIFF. Hidden
  files and folders (names starting with ".") are ignored.
- `scan_folder` fully decodes every file once (JPEGs at reduced DCT scale, which still
  reads the whole stream) so truncated or corrupt files are found, and skipped with one
  warning each, before any model is built. Pillow's `LOAD_TRUNCATED_IMAGES` is forced
  off while decoding, so a cut file is never grey-filled. A file that fails to load
  after the scan (it changed on disk) raises `DataError` naming it.
- `load_rgb` applies the EXIF orientation first, then converts any mode to RGB.
  Transparency (an alpha channel or a palette's transparent index) is composited over
  `BACKGROUND`, black: the bundled digits are white on black, so black is the neutral
  colour. The colour hidden under fully transparent pixels never shows.
- `fit_to` scales the image so it covers the target (the shorter relative side fits),
  Lanczos with a reducing gap, and crops the rest: centred for encoding and inference,
  at a random offset for training. The crop is taken in source coordinates before
  resampling, so extreme aspect ratios (8x300, 1x100000) never allocate a huge image.
  Training may instead take `crop="patch"`: random patches at the image's own scale.
- Tensors are (3, H, W) float32 in [-1, 1].
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, ImageOps

from sundae_cli.errors import DataError
from sundae_cli.fsutil import atomic_path

logger = logging.getLogger(__name__)

BACKGROUND: tuple[int, int, int] = (0, 0, 0)
"""Colour transparent pixels are composited over (black, like the digits' ground)."""

ACCEPTED_FORMATS: tuple[str, ...] = ("PNG", "JPEG", "MPO", "WEBP", "BMP", "GIF", "TIFF")
FORMATS_TEXT = "PNG, JPEG, WebP, BMP, GIF, TIFF"
RESAMPLE = Image.Resampling.LANCZOS
REDUCING_GAP = 3.0  # box-reduce first when shrinking by more than 3x: fast, no aliasing


@dataclass
class FolderScan:
    """Result of `scan_folder`: decodable files, skipped files and original modes."""

    root: Path
    files: list[Path] = field(default_factory=list)
    skipped: list[tuple[Path, str]] = field(default_factory=list)
    modes: Counter = field(default_factory=Counter)

    def summary(self) -> str:
        """One line for the console, e.g. `120 images (RGB 100, L 20), 2 skipped`."""
        modes = ", ".join(
            f"{mode} {count}" for mode, count in sorted(self.modes.items())
        )
        return f"{len(self.files)} images ({modes}), {len(self.skipped)} skipped"


@contextlib.contextmanager
def strict_decoding() -> Iterator[None]:
    """Keep Pillow from padding truncated files with grey while decoding."""
    previous = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        yield
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = previous


def _formats() -> tuple[str, ...]:
    """Accepted formats whose Pillow plugins are available (loads them once)."""
    Image.init()
    return tuple(name for name in ACCEPTED_FORMATS if name in Image.OPEN)


def _decode_errors() -> tuple[type[BaseException], ...]:
    """Exceptions Pillow raises for files it cannot identify or decode."""
    return (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError)


def _check_image(path: Path) -> tuple[str | None, str]:
    """Fully decode one file; return (original mode, "") or (None, reason)."""
    try:
        with strict_decoding(), Image.open(path, formats=_formats()) as img:
            mode = img.mode
            if img.format in ("JPEG", "MPO"):
                img.draft(None, (1, 1))  # decode at 1/8 scale; the stream is still read
            img.load()
    except Image.UnidentifiedImageError:
        return None, f"not a decodable image (looked for {FORMATS_TEXT})"
    except PermissionError as err:
        return None, f"cannot be read ({err.strerror})"
    except _decode_errors() as err:
        return None, f"truncated or corrupt image ({err})"
    return mode, ""


def _is_hidden(relative: Path) -> bool:
    """True when any part of the relative path starts with a dot."""
    return any(part.startswith(".") for part in relative.parts)


def _candidate_files(root: Path) -> list[Path]:
    """All non-hidden regular files under root, sorted by relative POSIX path."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [name for name in dirnames if not name.startswith(".")]
        for name in filenames:
            path = Path(dirpath) / name
            if not _is_hidden(path.relative_to(root)) and path.is_file():
                found.append(path)
    return sorted(found, key=lambda path: path.relative_to(root).as_posix())


def scan_folder(path: str | os.PathLike, *, strict: bool = False) -> FolderScan:
    """Find every decodable image under `path`, recursively, in a deterministic order.

    Each file is opened, fully decoded and closed in turn, so memory stays bounded.
    Undecodable files are skipped with one warning each, or raise `DataError` when
    `strict` is set. No decodable image at all raises `DataError`.
    """
    root = Path(path)
    if not root.exists():
        raise DataError(f"image folder {root} does not exist", "check the path")
    if not root.is_dir():
        raise DataError(
            f"{root} is a file, not a folder of images",
            "pass the folder that contains the images",
        )
    scan = FolderScan(root=root)
    for file in _candidate_files(root):
        mode, reason = _check_image(file)
        if mode is None:
            if strict:
                raise DataError(
                    f"{file}: {reason}", "remove or fix the file, or drop --strict"
                )
            logger.warning("skipping %s: %s", file, reason)
            scan.skipped.append((file, reason))
            continue
        scan.files.append(file)
        scan.modes[mode] += 1
    if not scan.files:
        raise DataError(
            f"no decodable images in {root} (looked for {FORMATS_TEXT} files, "
            "recursively)",
            "point at a folder that holds images; hidden files are ignored",
        )
    return scan


def _to_8bit(img: Image.Image) -> Image.Image:
    """Map 16-bit, 32-bit integer and float greyscale to 8-bit `L`.

    Integer modes are read as 16-bit (0..65535); float mode is clipped to 0..255.
    """
    values = np.asarray(img, dtype=np.float64)
    if img.mode != "F":
        values = values / 257.0
    return Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8), "L")


def _has_transparency(img: Image.Image) -> bool:
    """True for alpha modes and for images whose info names a transparent colour."""
    return img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert an image of any mode to RGB, compositing alpha over `BACKGROUND`."""
    if img.mode.startswith("I") or img.mode == "F":
        img = _to_8bit(img)
    if _has_transparency(img):
        rgba = img.convert("RGBA")
        ground = Image.new("RGBA", rgba.size, (*BACKGROUND, 255))
        return Image.alpha_composite(ground, rgba).convert("RGB")
    return img.convert("RGB")


def load_rgb(path: str | os.PathLike) -> Image.Image:
    """Load an image upright (EXIF orientation applied) as RGB over `BACKGROUND`."""
    try:
        with strict_decoding(), Image.open(path, formats=_formats()) as img:
            img.load()
            upright = ImageOps.exif_transpose(img)
            return to_rgb(upright)
    except FileNotFoundError as err:
        raise DataError(f"image {path} does not exist", "check the path") from err
    except _decode_errors() as err:
        raise DataError(
            f"cannot load image {path}: {err}",
            "the file is not a readable PNG, JPEG, WebP, BMP, GIF or TIFF; "
            "convert, replace or remove it",
        ) from err


def _crop_box(
    width: int, height: int, aspect: float, crop: str, rng: np.random.Generator | None
) -> tuple[float, float, float, float]:
    """The largest box of the target aspect (width/height) inside the source."""
    box_w, box_h = float(width), float(height)
    if width / height > aspect:
        box_w = height * aspect
    else:
        box_h = width / aspect
    spare_x, spare_y = width - box_w, height - box_h
    if crop == "center":
        left, top = spare_x / 2, spare_y / 2
    elif crop == "random":
        if rng is None:
            raise ValueError("crop='random' needs an rng")
        left, top = rng.uniform(0, spare_x), rng.uniform(0, spare_y)
    else:
        raise ValueError(f"crop must be 'center' or 'random', not {crop!r}")
    return (left, top, left + box_w, top + box_h)


def fit_to(
    img: Image.Image,
    size: tuple[int, int],
    *,
    crop: str = "center",
    rng: np.random.Generator | None = None,
) -> Image.Image:
    """Scale `img` to cover `size` = (height, width), then crop to exactly that size.

    `crop="center"` is deterministic; `crop="random"` draws the offset from `rng`.
    `crop="patch"` (training only) takes a random `size` patch at the image's own
    scale, no resampling, falling back to "random" for images smaller than `size`.
    Small images (down to 1x1) are upscaled; the same policy serves every command.
    """
    height, width = size
    if height < 1 or width < 1:
        raise ValueError(f"target size must be positive, got {size}")
    if crop == "patch":
        if img.width >= width and img.height >= height and rng is not None:
            left = int(rng.integers(0, img.width - width + 1))
            top = int(rng.integers(0, img.height - height + 1))
            return img.crop((left, top, left + width, top + height))
        crop = "random"
    box = _crop_box(img.width, img.height, width / height, crop, rng)
    if img.size == (width, height) and box == (0.0, 0.0, width, height):
        return img.copy()
    return img.resize((width, height), RESAMPLE, box=box, reducing_gap=REDUCING_GAP)


def to_tensor(img: Image.Image):
    """RGB image to a float32 tensor (3, H, W) in [-1, 1]."""
    import torch

    pixels = np.asarray(img.convert("RGB"), dtype=np.uint8)  # (H, W, 3)
    tensor = torch.from_numpy(pixels.copy()).permute(2, 0, 1)  # (3, H, W)
    return tensor.to(torch.float32) / 127.5 - 1.0


def to_image(tensor) -> Image.Image:
    """Float tensor (3, H, W) in [-1, 1] to an RGB image (clamped, rounded)."""
    if tensor.dim() != 3 or tensor.shape[0] != 3:
        raise ValueError(f"expected a (3, H, W) tensor, got {tuple(tensor.shape)}")
    scaled = (tensor.detach().float().clamp(-1, 1) + 1) * 127.5
    pixels = scaled.round().to("cpu").permute(1, 2, 0).numpy().astype(np.uint8)
    return Image.fromarray(pixels, "RGB")


def save_png_atomic(img: Image.Image, path: str | os.PathLike, **save_args) -> Path:
    """Write `img` as PNG to a temporary name beside `path`, then rename into place.

    An interrupted or failed write never leaves a partial file at `path`; a write error
    raises `SundaeError` naming the path and the OS error. Extra keyword arguments go
    to `Image.save` (for example `pnginfo`).
    """
    with atomic_path(path) as temp, open(temp, "wb") as handle:
        img.save(handle, format="PNG", **save_args)
        handle.flush()
        os.fsync(handle.fileno())
    return Path(path)


class ImageFolderDataset:
    """Map-style dataset of fitted image tensors (3, H, W) in [-1, 1].

    Works with `torch.utils.data.DataLoader` (it implements `__len__` and
    `__getitem__`; torch is imported only when an item is built). Randomness (crop
    offset, horizontal flip) comes from a generator seeded by (seed, epoch, index), so
    an item is the same whatever the worker, batch size or resume point. Files are
    expected to come from `scan_folder`, which already dropped unreadable ones; a file
    that fails later raises `DataError` naming it.
    """

    def __init__(
        self,
        files: Sequence[str | os.PathLike],
        size: tuple[int, int],
        *,
        flip_p: float = 0.5,
        crop: str = "center",
        seed: int = 0,
    ) -> None:
        if crop not in ("center", "random", "patch"):
            raise ValueError(f"crop must be center, random or patch, not {crop!r}")
        self.files = [Path(file) for file in files]
        self.size = size
        self.flip_p = flip_p
        self.crop = crop
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose crops and flips `__getitem__` returns."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int):
        rng = np.random.default_rng([self.seed, self.epoch, index])
        img = fit_to(load_rgb(self.files[index]), self.size, crop=self.crop, rng=rng)
        if rng.random() < self.flip_p:
            img = ImageOps.mirror(img)
        return to_tensor(img)


def make_grid(images, ncols: int | None = None, padding: int = 2) -> Image.Image:
    """Tile images (a list of PIL images, or a tensor (b, 3, H, W) in [-1, 1]).

    `ncols` defaults to ceil(sqrt(b)); cells take the largest image's size, padding is
    `BACKGROUND`-coloured.
    """
    if not isinstance(images, list | tuple):
        images = [to_image(tensor) for tensor in images]
    if not images:
        raise ValueError("make_grid needs at least one image")
    ncols = ncols or math.ceil(math.sqrt(len(images)))
    nrows = math.ceil(len(images) / ncols)
    cell_w = max(img.width for img in images)
    cell_h = max(img.height for img in images)
    grid = Image.new(
        "RGB",
        (
            ncols * cell_w + (ncols + 1) * padding,
            nrows * cell_h + (nrows + 1) * padding,
        ),
        BACKGROUND,
    )
    for position, img in enumerate(images):
        row, col = divmod(position, ncols)
        left = padding + col * (cell_w + padding)
        top = padding + row * (cell_h + padding)
        grid.paste(img.convert("RGB"), (left, top))
    return grid
