"""Writing the HDF5 latent dataset (schema in `sundae_cli.latents`), resumably.

Writing goes to `<stem>.partial.h5` beside the final path and is renamed into place by
`LatentWriter.finish`, so a file at the final path is always complete. Each `append`
writes the datasets first and bumps `num_items`/`num_sources` last, then flushes; on
resume the datasets are cut back to those counts and `code_usage` is recounted, so a
crash between writes leaves a consistent, resumable partial.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

import h5py
import numpy as np

from sundae_cli.errors import DataError, SundaeError
from sundae_cli.latents import (
    ITEM_DATASETS,
    READ_BLOCK,
    SCHEMA_VERSION,
    count_codes,
    partial_path_for,
    plain_value,
    smallest_uint_dtype,
)

logger = logging.getLogger(__name__)


def _create_datasets(file: h5py.File, grid, dtype, with_labels: bool) -> None:
    """Empty, resizable datasets of the schema; tokens chunked per item."""
    specs = {
        "tokens": (tuple(grid), dtype),
        "source_index": ((), np.int64),
        "flipped": ((), np.uint8),
        "source_paths": ((), h5py.string_dtype("utf-8")),
    }
    if with_labels:
        specs["labels"] = ((), np.int64)
    for name, (tail, column_dtype) in specs.items():
        chunks = (1, *tail) if tail else (READ_BLOCK,)
        file.create_dataset(
            name, (0, *tail), maxshape=(None, *tail), chunks=chunks, dtype=column_dtype
        )


class LatentWriter:
    """Stream token grids into a (resumable) partial file; `finish` renames it.

    Use as a context manager: a clean exit calls `finish`, an exception leaves the
    partial for the next run to resume. Skip the sources in `done_paths()`.
    A matching partial (same autoencoder sha256 and geometry) is resumed even with
    `overwrite`; one from another autoencoder or geometry is refused unless `overwrite`,
    which discards it. An existing final file is replaced only at `finish`.
    """

    def __init__(
        self,
        final_path: str | os.PathLike,
        *,
        codebook_size: int,
        grid: tuple[int, int],
        image_size: tuple[int, int],
        autoencoder_backend: str,
        autoencoder_sha256: str,
        autoencoder_run: str = "",
        with_labels: bool = False,
        class_names: Sequence[str] | None = None,
        overwrite: bool = False,
    ) -> None:
        self.final_path = Path(final_path)
        self.partial_path = partial_path_for(self.final_path)
        self.codebook_size = int(codebook_size)
        self.dtype = smallest_uint_dtype(self.codebook_size)
        self.grid = (int(grid[0]), int(grid[1]))
        self.with_labels = with_labels
        self.autoencoder_sha256 = autoencoder_sha256
        self._identity = {
            "schema_version": SCHEMA_VERSION,
            "autoencoder_backend": autoencoder_backend,
            "codebook_size": self.codebook_size,
            "grid_h": self.grid[0],
            "grid_w": self.grid[1],
            "image_h": int(image_size[0]),
            "image_w": int(image_size[1]),
        }
        self._extra = {"autoencoder_run": str(autoencoder_run)}
        if class_names is not None:
            self._extra["class_names"] = json.dumps(list(class_names))
        self._refuse_final(overwrite)
        self._file = self._resume(overwrite) or self._create()
        self._skipped = json.loads(self._file.attrs["skipped_files"])
        self._usage = count_codes(
            self._file["tokens"], self.items_done, self.codebook_size
        )
        self._finished = False

    def _refuse_final(self, overwrite: bool) -> None:
        """Never replace an existing final file without `overwrite`."""
        if overwrite or not self.final_path.exists():
            return
        try:
            with h5py.File(self.final_path, "r") as file:
                complete = bool(file.attrs.get("complete", False))
        except OSError:
            complete = False
        state = "is complete" if complete else "is not a complete latent file"
        raise DataError(
            f"{self.final_path} already exists and {state}",
            "pass --overwrite to replace it, or choose another --out",
        )

    def _mismatch(self, file: h5py.File) -> str | None:
        """Why a partial cannot be resumed by this writer, or None."""
        old_sha = str(plain_value(file.attrs.get("autoencoder_sha256", "")))
        if old_sha != self.autoencoder_sha256:
            return (
                f"was started with autoencoder {old_sha[:12]}, you passed "
                f"{self.autoencoder_sha256[:12]}"
            )
        for key, value in self._identity.items():
            old = plain_value(file.attrs.get(key))
            if old != value:
                return f"was started with {key}={old}, you asked for {value}"
        if ("labels" in file) != self.with_labels:
            return f"was started with labels={'labels' in file}"
        return None

    def _resume(self, overwrite: bool) -> h5py.File | None:
        """Reopen a matching partial, cut back to its last consistent count."""
        if not self.partial_path.exists():
            return None
        try:
            file = h5py.File(self.partial_path, "r+")
        except OSError as err:
            logger.warning("discarding unreadable %s (%s)", self.partial_path, err)
            self.partial_path.unlink()
            return None
        problem = self._mismatch(file)
        if problem is not None:
            file.close()
            if not overwrite:
                raise DataError(
                    f"{self.partial_path} {problem}",
                    f"delete {self.partial_path} or pass --overwrite to start again",
                )
            logger.warning("discarding %s: it %s", self.partial_path, problem)
            self.partial_path.unlink()
            return None
        counts = {name: int(file.attrs["num_items"]) for name in ITEM_DATASETS}
        counts["source_paths"] = sources = int(file.attrs["num_sources"])
        for name, count in counts.items():
            if name in file:
                file[name].resize(count, axis=0)
        file.attrs["complete"] = False
        logger.info("resuming %s: %d sources done", self.partial_path, sources)
        return file

    def _create(self) -> h5py.File:
        """A fresh, empty partial file with the schema's datasets and attributes."""
        try:
            self.partial_path.parent.mkdir(parents=True, exist_ok=True)
            file = h5py.File(self.partial_path, "w")
        except OSError as err:
            raise SundaeError(
                f"could not create {self.partial_path}: {err}",
                "check that the --out folder is writable",
            ) from err
        _create_datasets(file, self.grid, self.dtype, self.with_labels)
        file.attrs.update({**self._identity, **self._extra})
        file.attrs.update(
            autoencoder_sha256=self.autoencoder_sha256,
            num_items=0,
            num_sources=0,
            skipped_files="[]",
            complete=False,
            created=datetime.now(UTC).isoformat(timespec="seconds"),
        )
        file.flush()
        return file

    @property
    def items_done(self) -> int:
        """Items (grids) written so far."""
        return int(self._file.attrs["num_items"])

    @property
    def sources_done(self) -> int:
        """Source images fully written so far."""
        return int(self._file.attrs["num_sources"])

    @property
    def skipped_files(self) -> list[list[str]]:
        """[path, reason] of every source recorded as skipped."""
        return list(self._skipped)

    def done_paths(self) -> set[str]:
        """Source paths already encoded or recorded as skipped: skip these on resume."""
        written = self._file["source_paths"].asstr()[: self.sources_done]
        return set(written.tolist()) | {path for path, _ in self._skipped}

    def _check_batch(self, tokens, source_index, flipped, labels, new_sources) -> None:
        """Programmer errors in a batch: shapes, token range, source ownership."""
        count = tokens.shape[0]
        if tokens.shape[1:] != self.grid:
            raise ValueError(f"tokens {tokens.shape} do not match grid {self.grid}")
        if source_index.shape != (count,) or flipped.shape != (count,):
            raise ValueError("source_index and flipped need one entry per item")
        if self.with_labels != (labels is not None):
            raise ValueError(
                f"labels {'required' if self.with_labels else 'unexpected'}"
            )
        if count and (tokens.min() < 0 or tokens.max() >= self.codebook_size):
            raise ValueError(f"token ids outside [0, {self.codebook_size})")
        first = self.sources_done
        if count and (source_index.min() < first or source_index.max() >= new_sources):
            raise ValueError(f"source_index must be in [{first}, {new_sources})")

    def append(
        self,
        tokens: np.ndarray,
        source_index: np.ndarray,
        flipped: np.ndarray,
        labels: np.ndarray | None = None,
        *,
        source_paths: Sequence[str],
    ) -> None:
        """Write a batch of items together with the source images they came from.

        Args:
            tokens: int (b, h, w) token ids in [0, codebook_size).
            source_index: int (b,), each in [sources_done, sources_done + len(paths)).
            flipped: bool (b,), True for the flipped copy.
            labels: int (b,) when the writer was made `with_labels`, else None.
            source_paths: the new source images these items cover, in index order; all
                items of a source (as is and flipped) must come in the same call.
        """
        tokens = np.asarray(tokens)
        source_index = np.asarray(source_index, dtype=np.int64)
        flipped = np.asarray(flipped, dtype=np.uint8)
        new_sources = self.sources_done + len(source_paths)
        self._check_batch(tokens, source_index, flipped, labels, new_sources)
        start, count = self.items_done, tokens.shape[0]
        columns = {"tokens": tokens.astype(self.dtype), "source_index": source_index}
        columns["flipped"] = flipped
        if labels is not None:
            columns["labels"] = np.asarray(labels, dtype=np.int64)
        for name, values in columns.items():
            self._file[name].resize(start + count, axis=0)
            self._file[name][start:] = values
        self._file["source_paths"].resize((new_sources,))
        self._file["source_paths"][self.sources_done :] = list(source_paths)
        self._usage += np.bincount(tokens.ravel(), minlength=self.codebook_size)

        # The counts are the commit point: bumped only after the data is written.
        self._file.attrs["num_items"] = start + count
        self._file.attrs["num_sources"] = new_sources
        self._file.flush()

    def record_skipped(self, path: str | os.PathLike, reason: str) -> None:
        """Remember a source that could not be encoded (stored in `skipped_files`)."""
        if str(path) not in {known for known, _ in self._skipped}:
            self._skipped.append([str(path), reason])
            self._file.attrs["skipped_files"] = json.dumps(self._skipped)

    def finish(self) -> Path:
        """Store code usage, mark complete and rename the partial to the final path."""
        if self._finished:
            return self.final_path
        if "code_usage" in self._file:
            del self._file["code_usage"]
        self._file.create_dataset("code_usage", data=self._usage.astype(np.int64))
        self._file.attrs["complete"] = True
        self._file.close()
        with open(self.partial_path, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(self.partial_path, self.final_path)
        self._finished = True
        logger.info("wrote %s", self.final_path)
        return self.final_path

    def close(self) -> None:
        """Close without finishing: the partial stays for a later resume."""
        if self._file.id.valid:
            self._file.close()

    def __enter__(self) -> LatentWriter:
        return self

    def __exit__(self, exc_type, exc, traceback) -> None:
        if exc_type is None and not self._finished:
            self.finish()
        else:
            self.close()
