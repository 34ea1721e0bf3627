"""The HDF5 latent dataset: token grids of every image, as is and flipped.

Schema (version 1), one file per dataset:

- `tokens` (num_items, h, w): the smallest unsigned dtype that holds codebook_size - 1,
  chunked per item (1, h, w), resizable along the first axis.
- `source_index` int64 (num_items,): position of the item's image in `source_paths`;
  `flipped` uint8 (num_items,): 1 for the horizontally flipped copy; optional `labels`
  int64 (num_items,).
- `source_paths` UTF-8 strings (num_sources,); `code_usage` int64 (k,): count per code.
- Attributes: `schema_version`, `autoencoder_backend`, `autoencoder_sha256`,
  `autoencoder_run`, `codebook_size`, `grid_h`, `grid_w`, `image_h`, `image_w`,
  `num_items`, `num_sources`, `class_names` (JSON list, optional), `skipped_files` (JSON
  list of [path, reason]), `complete`, `created` (ISO 8601, UTC).

This module reads the format (`open_latents`, `LatentFile`, `LatentTokenDataset`,
`describe_latents`); `sundae_cli.latent_writer.LatentWriter` writes it.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import h5py
import numpy as np

from sundae_cli.errors import DataError

logger = logging.getLogger(__name__)

SCHEMA_VERSION = 1
READ_BLOCK = 4096  # items per read when scanning tokens: bounded memory
ITEM_DATASETS = ("tokens", "source_index", "flipped", "labels")
REQUIRED_ATTRS = ("schema_version", "codebook_size", "grid_h", "grid_w", "num_items")
REENCODE = "re-run `sundae encode` to write it again"


def smallest_uint_dtype(codebook_size: int) -> np.dtype:
    """Smallest unsigned integer dtype holding token ids 0 .. codebook_size - 1."""
    if codebook_size < 1:
        raise ValueError(f"codebook_size must be positive, got {codebook_size}")
    for dtype in (np.uint8, np.uint16, np.uint32):
        if codebook_size - 1 <= np.iinfo(dtype).max:
            return np.dtype(dtype)
    raise ValueError(f"codebook_size {codebook_size} does not fit in uint32")


def partial_path_for(final_path: str | os.PathLike) -> Path:
    """Temporary name an unfinished latent file is written under."""
    final = Path(final_path)
    return final.with_name(f"{final.stem}.partial{final.suffix or '.h5'}")


def plain_value(value):
    """HDF5 attribute value as a plain Python value."""
    if isinstance(value, bytes):
        return value.decode("utf-8")
    return value.item() if isinstance(value, np.generic) else value


def _attrs_dict(file: h5py.File) -> dict:
    """All file attributes as plain Python values."""
    return {key: plain_value(value) for key, value in file.attrs.items()}


def count_codes(tokens: h5py.Dataset, count: int, codebook_size: int) -> np.ndarray:
    """Per-code counts int64 (k,) over the first `count` items, read in blocks."""
    usage = np.zeros(codebook_size, dtype=np.int64)
    for start in range(0, count, READ_BLOCK):
        block = tokens[start : min(start + READ_BLOCK, count)]
        usage += np.bincount(block.ravel(), minlength=codebook_size)[:codebook_size]
    return usage


def _open_readonly(path: str | os.PathLike) -> h5py.File:
    """Open an HDF5 file read-only; errors say how to make a good one."""
    path = Path(path)
    if not path.exists():
        raise DataError(
            f"latent file {path} does not exist",
            f"run `sundae encode DIR --out {path}` to create it",
        )
    try:
        return h5py.File(path, "r")
    except OSError as err:
        if path.name.endswith(".partial.h5"):
            # A killed encode can leave its partial file unreadable; the next
            # encode discards such a partial and starts again.
            raise DataError(
                f"{path} is the unreadable partial file of an interrupted encode",
                "re-run the same `sundae encode` command: it resumes a readable "
                "partial and replaces an unreadable one",
            ) from err
        raise DataError(
            f"{path} is not a readable HDF5 file (truncated?)", REENCODE
        ) from err


def _require(condition: bool, path: Path, problem: str, hint: str = REENCODE) -> None:
    """Raise `DataError` naming the file when a check fails."""
    if not condition:
        raise DataError(f"{path} {problem}", hint)


def _validate_layout(file: h5py.File, path: Path) -> dict:
    """Schema, completion and dataset shapes; returns the plain attributes."""
    attrs = _attrs_dict(file)
    for key in REQUIRED_ATTRS:
        _require(key in attrs, path, f"is not a sundae latent file ({key} missing)")
    version = attrs["schema_version"]
    _require(
        version == SCHEMA_VERSION,
        path,
        f"has schema_version {version}; this sundae reads version {SCHEMA_VERSION}",
    )
    _require(
        bool(attrs.get("complete", False)),
        path,
        "is incomplete",
        "re-run `sundae encode` to finish it",
    )
    count, grid = attrs["num_items"], (attrs["grid_h"], attrs["grid_w"])
    for name in ITEM_DATASETS:
        if name in file or name != "labels":
            shape = file[name].shape if name in file else None
            expected = (count, *grid) if name == "tokens" else (count,)
            _require(
                shape == expected, path, f"has {name} {shape}, expected {expected}"
            )
    return attrs


def _check_expected(path: Path, key: str, actual, expected) -> None:
    """Refuse a file whose attribute differs from what the caller needs."""
    if expected is not None and actual != expected:
        raise DataError(
            f"{path} has {key} {actual}, expected {expected}",
            "encode the images with the autoencoder the recipe uses (`sundae encode`), "
            "or point the recipe at a matching latent file",
        )


def _check_token_range(file: h5py.File, path: Path, codebook_size: int) -> None:
    """Every token id below codebook_size, read in bounded blocks."""
    tokens = file["tokens"]
    for start in range(0, tokens.shape[0], READ_BLOCK):
        top = int(tokens[start : start + READ_BLOCK].max())
        if top >= codebook_size:
            raise DataError(
                f"{path}: token id {top} found but codebook_size is {codebook_size}",
                "the file is damaged or was written for another codebook; " + REENCODE,
            )


class LatentFile:
    """A validated, read-only latent file; small per-item arrays are in memory."""

    def __init__(self, path: Path, file: h5py.File, attrs: dict) -> None:
        self.path = path
        self.attrs = attrs
        self._file = file
        self.codebook_size = int(attrs["codebook_size"])
        self.grid = (int(attrs["grid_h"]), int(attrs["grid_w"]))
        self.image_size = (int(attrs.get("image_h", 0)), int(attrs.get("image_w", 0)))
        self.source_index = file["source_index"][:]
        self.flipped = file["flipped"][:].astype(bool)
        self.labels = file["labels"][:] if "labels" in file else None
        self.class_names = json.loads(attrs.get("class_names", "null"))
        self.skipped_files = json.loads(attrs.get("skipped_files", "[]"))

    def __len__(self) -> int:
        return int(self.attrs["num_items"])

    def source_paths(self) -> list[str]:
        """Source image paths, indexed by `source_index`."""
        return self._file["source_paths"].asstr()[:].tolist()

    def tokens(self, indices) -> np.ndarray:
        """Token grids (len(indices), h, w) in the stored dtype, in the given order."""
        if isinstance(indices, int | slice):
            return self._file["tokens"][indices]
        wanted = np.asarray(indices, dtype=np.int64)
        unique, inverse = np.unique(wanted, return_inverse=True)
        if unique.size == 0:
            return np.empty((0, *self.grid), dtype=self._file["tokens"].dtype)
        return self._file["tokens"][unique][inverse.reshape(-1)]

    def dataset(self, indices: Sequence[int] | None = None) -> LatentTokenDataset:
        """A picklable dataset over `indices` (all items by default)."""
        return LatentTokenDataset(self.path, indices)

    def close(self) -> None:
        """Close the file handle."""
        self._file.close()

    def __enter__(self) -> LatentFile:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def open_latents(
    path: str | os.PathLike,
    *,
    expect_codebook_size: int | None = None,
    expect_grid: tuple[int, int] | None = None,
    expect_autoencoder_sha256: str | None = None,
) -> LatentFile:
    """Open and validate a latent file; any problem raises `DataError` with the fix."""
    path = Path(path)
    file = _open_readonly(path)
    try:
        attrs = _validate_layout(file, path)
        _check_expected(
            path, "codebook_size", attrs["codebook_size"], expect_codebook_size
        )
        grid = (attrs["grid_h"], attrs["grid_w"])
        _check_expected(path, "grid (h, w)", grid, expect_grid and tuple(expect_grid))
        sha = attrs.get("autoencoder_sha256")
        _check_expected(path, "autoencoder_sha256", sha, expect_autoencoder_sha256)
        _check_token_range(file, path, int(attrs["codebook_size"]))
        return LatentFile(path, file, attrs)
    except OSError as err:
        file.close()
        raise DataError(f"{path} cannot be read ({err}); truncated?", REENCODE) from err
    except BaseException:
        file.close()
        raise


class LatentTokenDataset:
    """Map-style dataset of (tokens int64 (h, w), label int64 scalar or -1).

    Picklable: each process (DataLoader worker) opens its own read-only handle on first
    use, and a handle is never carried across fork or pickling.
    """

    def __init__(
        self, path: str | os.PathLike, indices: Sequence[int] | None = None
    ) -> None:
        self.path = str(path)
        if indices is None:
            with h5py.File(self.path, "r") as file:
                indices = range(int(file.attrs["num_items"]))
        self.indices = np.asarray(indices, dtype=np.int64)
        self._file: h5py.File | None = None
        self._labels: np.ndarray | None = None
        self._pid: int | None = None

    def _handle(self) -> h5py.File:
        """This process's own handle, opened lazily."""
        if self._file is None or self._pid != os.getpid():
            self._file = h5py.File(self.path, "r")
            self._labels = self._file["labels"][:] if "labels" in self._file else None
            self._pid = os.getpid()
        return self._file

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state.update(_file=None, _labels=None, _pid=None)
        return state

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, position: int):
        import torch

        index = int(self.indices[position])
        grid = self._handle()["tokens"][index].astype(np.int64)  # (h, w)
        label = -1 if self._labels is None else int(self._labels[index])
        return torch.from_numpy(grid), torch.tensor(label, dtype=torch.int64)


def code_usage_stats(usage: np.ndarray, top: int = 10) -> dict:
    """Usage fraction, perplexity, dead codes and the most used codes of counts (k,)."""
    total = int(usage.sum())
    probs = usage[usage > 0] / max(total, 1)
    order = np.argsort(-usage, kind="stable")[:top]
    return {
        "usage_fraction": float((usage > 0).mean()) if usage.size else 0.0,
        "perplexity": float(np.exp(-(probs * np.log(probs)).sum())) if total else 0.0,
        "dead_codes": int((usage == 0).sum()),
        "top_codes": [[int(code), int(usage[code])] for code in order if usage[code]],
    }


def describe_latents(path: str | os.PathLike) -> dict:
    """Attributes, counts and codebook usage of a latent file (complete or not)."""
    path = Path(path)
    with _open_readonly(path) as file:
        info = {"path": str(path), **_attrs_dict(file)}
        for key in REQUIRED_ATTRS:
            _require(key in info, path, f"is not a sundae latent file ({key} missing)")
        for key, default in (("class_names", "null"), ("skipped_files", "[]")):
            info[key] = json.loads(info.get(key, default))
        info["num_skipped"] = len(info["skipped_files"])
        if "code_usage" in file:
            usage = file["code_usage"][:]
        else:
            usage = count_codes(
                file["tokens"], int(info["num_items"]), int(info["codebook_size"])
            )
        info.update(code_usage_stats(usage))
    return info
