"""The HDF5 latent format: round trip, resume (C09), refusals (C09, C10), loading."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
import textwrap

import h5py
import numpy as np
import pytest

from sundae_cli.errors import DataError
from sundae_cli.latent_writer import LatentWriter
from sundae_cli.latents import (
    describe_latents,
    open_latents,
    partial_path_for,
    smallest_uint_dtype,
)

SHA = "a" * 64
OTHER_SHA = "b" * 64
GRID = (3, 5)  # deliberately not square
CODES = 16


def make_writer(path, **overrides) -> LatentWriter:
    """A writer with small test geometry; keyword arguments override defaults."""
    options = dict(
        codebook_size=CODES,
        grid=GRID,
        image_size=(12, 20),
        autoencoder_backend="vqgan",
        autoencoder_sha256=SHA,
        autoencoder_run="runs/vqgan-test",
        with_labels=True,
        class_names=["zero", "one"],
    )
    options.update(overrides)
    return LatentWriter(path, **options)


def grids_for(sources: range) -> np.ndarray:
    """Deterministic tokens (2 per source: as is, flipped), int64 (b, h, w)."""
    rng = np.random.default_rng(list(sources))
    return rng.integers(0, CODES, (2 * len(sources), *GRID))


def append_sources(writer: LatentWriter, sources: range) -> None:
    """Append each source as is and flipped, in one call."""
    writer.append(
        grids_for(sources),
        np.repeat(np.array(sources), 2),
        np.tile([False, True], len(sources)),
        np.repeat(np.array(sources) % 2, 2),
        source_paths=[f"img/{index:03d}.png" for index in sources],
    )


def write_complete(path, count: int = 4):
    """A finished latent file with `count` sources; returns the written tokens."""
    with make_writer(path) as writer:
        append_sources(writer, range(0, count // 2))
        append_sources(writer, range(count // 2, count))
    return np.concatenate(
        [grids_for(range(0, count // 2)), grids_for(range(count // 2, count))]
    )


@pytest.mark.parametrize(
    ("codebook_size", "dtype"),
    [
        (1, np.uint8),
        (256, np.uint8),
        (257, np.uint16),
        (65536, np.uint16),
        (65537, np.uint32),
    ],
)
def test_smallest_uint_dtype(codebook_size, dtype):
    assert smallest_uint_dtype(codebook_size) == np.dtype(dtype)


def test_smallest_uint_dtype_rejects_zero():
    with pytest.raises(ValueError, match="positive"):
        smallest_uint_dtype(0)


def test_round_trip(tmp_path):
    path = tmp_path / "latents.h5"
    tokens = write_complete(path, count=4)

    with open_latents(path, expect_codebook_size=CODES, expect_grid=GRID) as latents:
        stored = latents.tokens(slice(None))
        picked = latents.tokens([5, 1, 5])
        usage = latents._file["code_usage"][:]

        assert len(latents) == 8 and stored.dtype == np.uint8
        assert np.array_equal(stored, tokens)
        assert np.array_equal(picked, tokens[[5, 1, 5]])
        assert latents.source_index.tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
        assert latents.flipped.tolist() == [False, True] * 4
        assert latents.labels.tolist() == [0, 0, 1, 1, 0, 0, 1, 1]
        assert latents.source_paths()[3] == "img/003.png"
        assert latents.class_names == ["zero", "one"]
        assert latents.grid == GRID and latents.image_size == (12, 20)
        assert latents.attrs["complete"] is True
        assert latents.attrs["autoencoder_run"] == "runs/vqgan-test"
        assert np.array_equal(usage, np.bincount(tokens.ravel(), minlength=CODES))


def test_describe_reports_usage(tmp_path):
    path = tmp_path / "latents.h5"
    write_complete(path)

    info = describe_latents(path)

    assert info["num_items"] == 8 and info["num_sources"] == 4
    assert info["codebook_size"] == CODES and info["num_skipped"] == 0
    assert 0 < info["usage_fraction"] <= 1
    assert 1 < info["perplexity"] <= CODES
    assert info["dead_codes"] == round(CODES * (1 - info["usage_fraction"]))
    counts = [count for _, count in info["top_codes"]]
    assert counts == sorted(counts, reverse=True)


def test_partial_never_at_final_path_before_finish(tmp_path):
    path = tmp_path / "latents.h5"
    writer = make_writer(path)
    append_sources(writer, range(2))

    assert partial_path_for(path).name == "latents.partial.h5"
    assert partial_path_for(path).exists() and not path.exists()
    writer.finish()
    assert path.exists() and not partial_path_for(path).exists()


def test_exception_leaves_partial_for_resume(tmp_path):
    path = tmp_path / "latents.h5"

    with pytest.raises(RuntimeError), make_writer(path) as writer:
        append_sources(writer, range(2))
        raise RuntimeError("killed")

    assert not path.exists()
    with make_writer(path) as resumed:
        assert resumed.sources_done == 2 and resumed.items_done == 4


def test_resume_after_torn_write_cuts_back_to_last_commit(tmp_path):
    path = tmp_path / "latents.h5"
    writer = make_writer(path)
    append_sources(writer, range(2))
    writer.record_skipped("img/bad.png", "truncated")
    writer.close()
    with h5py.File(partial_path_for(path), "r+") as file:  # data written, no commit
        file["tokens"].resize(7, axis=0)
        file["tokens"][4:] = 15
        file["source_paths"].resize((3,))

    writer = make_writer(path)
    done = writer.done_paths()
    append_sources(writer, range(2, 4))
    writer.finish()

    assert done == {"img/000.png", "img/001.png", "img/bad.png"}
    with open_latents(path) as latents:
        assert len(latents) == 8 and latents.source_index.tolist()[-2:] == [3, 3]
        assert np.array_equal(latents.tokens(slice(4, 8)), grids_for(range(2, 4)))
        assert latents.skipped_files == [["img/bad.png", "truncated"]]
        usage = latents._file["code_usage"][:]
        assert usage.sum() == 8 * GRID[0] * GRID[1]


def test_resume_after_process_killed(tmp_path):
    path = tmp_path / "latents.h5"
    script = textwrap.dedent(
        f"""
        import os, sys
        sys.path.insert(0, {os.path.dirname(__file__)!r})
        from test_latents import make_writer, append_sources
        writer = make_writer({str(path)!r})
        append_sources(writer, range(3))
        os._exit(9)
        """
    )

    killed = subprocess.run([sys.executable, "-c", script], check=False)
    writer = make_writer(path)

    assert killed.returncode == 9 and not path.exists()
    assert writer.sources_done == 3 and writer.items_done == 6
    append_sources(writer, range(3, 5))
    writer.finish()
    with open_latents(path) as latents:
        assert len(latents) == 10


def test_refuses_partial_from_another_autoencoder(tmp_path):
    path = tmp_path / "latents.h5"
    make_writer(path).close()

    with pytest.raises(DataError) as error:
        make_writer(path, autoencoder_sha256=OTHER_SHA)
    with pytest.raises(DataError, match="grid_w=5, you asked for 6"):
        make_writer(path, grid=(3, 6))
    fresh = make_writer(path, autoencoder_sha256=OTHER_SHA, overwrite=True)

    assert "was started with autoencoder aaaaaaaaaaaa, you passed bbbbbbbbbbbb" in str(
        error.value
    )
    assert "--overwrite" in error.value.hint
    assert fresh.sources_done == 0


def test_refuses_complete_file_without_overwrite(tmp_path):
    path = tmp_path / "latents.h5"
    old_tokens = write_complete(path, count=2)

    with pytest.raises(DataError, match="already exists and is complete") as error:
        make_writer(path)
    writer = make_writer(path, overwrite=True)
    append_sources(writer, range(5))
    still_old = open_latents(path)

    assert "--overwrite" in error.value.hint
    assert np.array_equal(still_old.tokens(slice(None)), old_tokens)
    still_old.close()
    writer.finish()
    with open_latents(path) as latents:
        assert len(latents) == 10


def test_truncated_file_is_refused(tmp_path):
    path = tmp_path / "latents.h5"
    write_complete(path, count=40)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3])

    with pytest.raises(DataError, match="not a readable HDF5 file") as error:
        open_latents(path)

    assert "re-run `sundae encode`" in error.value.hint

    # The same damage to an interrupted encode's partial file says it will resume.
    partial = tmp_path / "latents.partial.h5"
    path.rename(partial)
    with pytest.raises(DataError, match="unreadable partial file") as error:
        describe_latents(partial)
    assert "re-run the same `sundae encode`" in error.value.hint


def test_missing_and_incomplete_files_are_refused(tmp_path):
    path = tmp_path / "latents.h5"
    write_complete(path)
    with h5py.File(path, "r+") as file:
        file.attrs["complete"] = False

    with pytest.raises(DataError, match="is incomplete") as incomplete:
        open_latents(path)
    with pytest.raises(DataError, match="does not exist") as missing:
        open_latents(tmp_path / "nothing.h5")

    assert "re-run `sundae encode` to finish it" in incomplete.value.hint
    assert "sundae encode" in missing.value.hint


def test_token_id_equal_to_codebook_size_is_refused(tmp_path):
    path = tmp_path / "latents.h5"
    write_complete(path)
    with h5py.File(path, "r+") as file:
        file["tokens"][3, 1, 1] = CODES

    with pytest.raises(
        DataError, match=f"token id {CODES} found but codebook_size is {CODES}"
    ):
        open_latents(path)


def test_expectation_mismatches_name_expected_and_actual(tmp_path):
    path = tmp_path / "latents.h5"
    write_complete(path)

    with pytest.raises(DataError, match="codebook_size 16, expected 512") as error:
        open_latents(path, expect_codebook_size=512)
    with pytest.raises(DataError, match=r"grid \(h, w\) \(3, 5\), expected \(5, 3\)"):
        open_latents(path, expect_grid=(5, 3))
    with pytest.raises(DataError, match="autoencoder_sha256"):
        open_latents(path, expect_autoencoder_sha256=OTHER_SHA)

    assert str(path) in error.value.message and "sundae encode" in error.value.hint


def test_append_rejects_programmer_errors(tmp_path):
    writer = make_writer(tmp_path / "latents.h5", with_labels=False)
    tokens = np.zeros((2, *GRID), np.int64)

    with pytest.raises(ValueError, match="outside"):
        writer.append(tokens + CODES, [0, 0], [0, 1], source_paths=["a"])
    with pytest.raises(ValueError, match="source_index"):
        writer.append(tokens, [0, 1], [0, 1], source_paths=["a"])
    with pytest.raises(ValueError, match="labels"):
        writer.append(tokens, [0, 0], [0, 1], [1, 1], source_paths=["a"])
    writer.close()


def test_dataset_in_dataloader_with_two_workers(tmp_path):
    torch = pytest.importorskip("torch")
    path = tmp_path / "latents.h5"
    tokens = write_complete(path, count=6)
    dataset = open_latents(path).dataset([11, 0, 4, 7, 2])

    loader = torch.utils.data.DataLoader(dataset, batch_size=2, num_workers=2)
    batches = list(loader)
    grids = torch.cat([grid for grid, _ in batches])
    labels = torch.cat([label for _, label in batches])

    assert dataset._file is None  # the parent never opened a handle to share
    assert grids.dtype == torch.int64 and tuple(grids.shape) == (5, *GRID)
    assert np.array_equal(grids.numpy(), tokens[[11, 0, 4, 7, 2]])
    assert labels.tolist() == [1, 0, 0, 1, 1]


def test_dataset_reopens_after_pickle_and_fork(tmp_path):
    path = tmp_path / "latents.h5"
    write_complete(path)
    dataset = open_latents(path).dataset()
    first = dataset[0]
    handle = dataset._file

    copy = pickle.loads(pickle.dumps(dataset))
    dataset._pid = -1  # as if this object had been inherited by a forked child
    dataset[1]

    assert copy._file is None and bool((copy[0][0] == first[0]).all())
    assert dataset._file is not handle
    assert len(copy) == 8 and int(first[1]) == 0


def test_describe_counts_codes_of_a_partial(tmp_path):
    path = tmp_path / "latents.h5"
    writer = make_writer(path)
    append_sources(writer, range(2))
    writer.record_skipped("img/bad.png", "truncated")
    writer.close()

    info = describe_latents(partial_path_for(path))

    assert info["complete"] is False and info["num_items"] == 4
    assert info["num_skipped"] == 1 and info["class_names"] == ["zero", "one"]
    assert sum(count for _, count in info["top_codes"]) <= 4 * GRID[0] * GRID[1]
    assert info["usage_fraction"] > 0
