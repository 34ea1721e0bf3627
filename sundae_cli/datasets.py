"""The real images bundled with sundae, turned into ordinary image folders.

`export_digits` cuts the 5,000-digit sheet (50 rows of 100 digits, 20x20 px each, five
rows per class) into one PNG per digit under `DIR/<label>/`, the layout that
`sundae encode --labels-from-subfolders` reads. `export_photos` copies the photos.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from PIL import Image

from sundae_cli.errors import DataError

DATA_DIR = Path(__file__).parent / "data"
DIGIT_SHEET = DATA_DIR / "digits" / "digits.png"
PHOTOS_DIR = DATA_DIR / "photos"
DIGIT_SIZE = 20  # pixels per digit cell in the sheet
DIGITS_PER_ROW = 100
ROWS_PER_CLASS = 5


def digit_cells() -> list[tuple[int, int, Image.Image]]:
    """Every digit of the sheet as (label, index within its class, 20x20 L image)."""
    sheet = Image.open(DIGIT_SHEET).convert("L")
    rows = sheet.height // DIGIT_SIZE
    cells = []
    for row in range(rows):
        label = row // ROWS_PER_CLASS
        for col in range(sheet.width // DIGIT_SIZE):
            box = (
                col * DIGIT_SIZE,
                row * DIGIT_SIZE,
                (col + 1) * DIGIT_SIZE,
                (row + 1) * DIGIT_SIZE,
            )
            index = (row % ROWS_PER_CLASS) * DIGITS_PER_ROW + col
            cells.append((label, index, sheet.crop(box)))
    return cells


def in_split(index: int, split: str) -> bool:
    """The fixed digits split: every fifth digit of a class is held out ("test")."""
    if split == "all":
        return True
    held_out = index % 5 == 4
    return held_out if split == "test" else not held_out


def export_digits(out: Path, per_class: int | None = None, split: str = "all") -> int:
    """Write digits as `out/<label>/<label>_<index>.png`; returns how many.

    `split` is "all", "train" (4,000 digits) or "test" (the 1,000 held out, every
    fifth of each class); `per_class` then keeps the first that many of each class.
    """
    if split not in ("all", "train", "test"):
        raise DataError(f"unknown split {split!r}", hint="use all, train or test")
    _prepare(out)
    count = 0
    kept: dict[int, int] = {}
    for label, index, image in digit_cells():
        if not in_split(index, split):
            continue
        if per_class is not None and kept.get(label, 0) >= per_class:
            continue
        kept[label] = kept.get(label, 0) + 1
        folder = out / str(label)
        folder.mkdir(parents=True, exist_ok=True)
        image.save(folder / f"{label}_{index:04d}.png")
        count += 1
    return count


def export_photos(out: Path) -> int:
    """Copy the bundled photos (mixed RGB, greyscale and RGBA) into `out`."""
    _prepare(out)
    files = sorted(p for p in PHOTOS_DIR.iterdir() if p.suffix in (".png", ".jpg"))
    for path in files:
        shutil.copyfile(path, out / path.name)
    return len(files)


def _prepare(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise DataError(f"{out} is a file", hint="pass a new or empty folder")
    if out.exists() and any(out.iterdir()):
        raise DataError(
            f"{out} exists and is not empty",
            hint="pick a new folder; nothing was written",
        )
    out.mkdir(parents=True, exist_ok=True)
