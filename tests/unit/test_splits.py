"""Deterministic train/validation splits keyed by source image."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from sundae_cli.splits import is_validation, split_indices, split_value


def test_split_values_are_pinned():
    # Pinned so a change of hash, salt or encoding cannot silently move images
    # between train and validation.
    values = [split_value(index) for index in range(3)]

    assert values == pytest.approx([0.258785505652, 0.52335184121, 0.952189002539])


def test_same_in_a_fresh_process_with_another_hash_seed():
    code = "from sundae_cli.splits import split_value; print(repr(split_value(7)))"
    env = {**os.environ, "PYTHONHASHSEED": "123"}

    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    )

    assert float(out.stdout) == split_value(7)


def test_both_flips_of_an_image_land_on_the_same_side():
    sources = np.repeat(np.arange(500), 2)  # each image as is and flipped

    train, val = split_indices(sources, 0.2)

    assert len(train) + len(val) == len(sources)
    assert set(sources[train]).isdisjoint(sources[val])
    counts = np.bincount(sources[val], minlength=500)
    assert (counts[sources[val]] == 2).all()


def test_fraction_is_respected_on_average():
    sources = np.arange(10_000)

    _, val = split_indices(sources, 0.1)

    assert 0.09 < len(val) / len(sources) < 0.11


def test_split_indices_agrees_with_is_validation():
    sources = np.array([5, 3, 5, 9, 3, 11, 0])

    train, val = split_indices(sources, 0.5)

    expected = [
        index for index, source in enumerate(sources) if is_validation(source, 0.5)
    ]
    assert val.tolist() == expected
    assert sorted(train.tolist() + val.tolist()) == list(range(len(sources)))
    assert train.dtype == np.int64 and val.dtype == np.int64


def test_edges_salt_and_bad_fractions():
    sources = np.arange(200)

    assert len(split_indices(sources, 0.0)[1]) == 0
    assert len(split_indices(sources, 1.0)[0]) == 0
    assert not np.array_equal(
        split_indices(sources, 0.5)[1], split_indices(sources, 0.5, salt="other")[1]
    )
    with pytest.raises(ValueError, match="fraction"):
        is_validation(0, 1.5)
