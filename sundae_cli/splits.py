"""Deterministic train/validation splits keyed by source image.

An item's side is decided by a keyed hash (BLAKE2b) of its source image index, never by
Python's `hash()` or a random generator, so the split is the same in every process, on
every machine and Python version, and both flips of one image (same `source_index`)
always fall on the same side. The validation share is `fraction` in expectation.
"""

from __future__ import annotations

import hashlib

import numpy as np

SALT = "sundae-split-v1"


def _check_fraction(fraction: float) -> None:
    """Refuse fractions outside [0, 1]."""
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"validation fraction must be in [0, 1], got {fraction}")


def split_value(source_index: int, *, salt: str = SALT) -> float:
    """Uniform number in [0, 1) derived from the salt and the source index."""
    digest = hashlib.blake2b(
        f"{salt}:{int(source_index)}".encode(), digest_size=8
    ).digest()
    return int.from_bytes(digest, "big") / 2**64


def is_validation(source_index: int, fraction: float, *, salt: str = SALT) -> bool:
    """True when the source image belongs to the validation split."""
    _check_fraction(fraction)
    return split_value(source_index, salt=salt) < fraction


def split_indices(
    source_indices: np.ndarray, fraction: float, *, salt: str = SALT
) -> tuple[np.ndarray, np.ndarray]:
    """Item positions (train_idx, val_idx), int64, ascending, from per-item sources.

    Each distinct source index is hashed once, so a dataset of 2N items (N images and
    their flips) costs N hashes.
    """
    _check_fraction(fraction)
    sources = np.asarray(source_indices, dtype=np.int64).reshape(-1)
    unique, inverse = np.unique(sources, return_inverse=True)
    unique_val = np.fromiter(
        (split_value(index, salt=salt) < fraction for index in unique.tolist()),
        dtype=bool,
        count=len(unique),
    )
    is_val = unique_val[inverse.reshape(-1)]
    positions = np.arange(len(sources), dtype=np.int64)
    return positions[~is_val], positions[is_val]
