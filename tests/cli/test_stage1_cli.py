"""Stage 1 at the command level: `train vqgan`, `encode` and `latents info` on real
and awkward folders (cases C01-C09, C13, C15), Ctrl-C and perceptual weights."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from PIL import Image

from sundae_cli.checkpoints import latest_checkpoint, read_meta
from sundae_cli.datasets import export_photos
from sundae_cli.errors import DataError
from sundae_cli.latents import open_latents, partial_path_for
from sundae_cli.recipes import load_recipe
from sundae_cli.runs import runs_root

from ..conftest import TINY, make_autoencoder_run
from ..helpers import CPU_FP32, save_autoencoder
from ..unit.test_train_vqgan import COLLAPSE, FAST, two_colour_folder

FORMATS = "PNG, JPEG, WebP, BMP, GIF, TIFF"


@pytest.fixture(autouse=True)
def _wide_console(monkeypatch):
    """Log lines that Rich does not wrap (conftest already sets one torch thread)."""
    monkeypatch.setenv("COLUMNS", "400")


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    folder = tmp_path_factory.mktemp("photos") / "photos"
    export_photos(folder)
    return folder


@pytest.fixture
def autoencoder(tmp_path):
    """A random tiny VQ-GAN run (32 px, f=4, 128 codes) outside the store."""
    return make_autoencoder_run(tmp_path / "ae")


def sets(*overrides: str) -> list[str]:
    return [part for text in overrides for part in ("--set", text)]


def train(cli, *args, overrides=()):
    return cli("train", "vqgan", TINY, *args, *sets(*FAST, *overrides))


def encode(cli, folder, out, model, *args):
    return cli("encode", folder, "--out", out, "--model", model, *args)


def metrics(run: Path) -> list[dict]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def save_noise(path: Path, size: tuple[int, int], mode: str = "RGB", seed: int = 0):
    """A random image of (width, height) `size` in `mode`, format from the suffix."""
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).convert(mode).save(path)
    return path


def noise_folder(folder: Path, count: int) -> list[Path]:
    folder.mkdir()
    sizes = [(37, 53), (64, 48), (300, 8), (40, 40), (90, 120), (33, 33), (50, 70)]
    return [
        save_noise(folder / f"{index:02d}.png", sizes[index % len(sizes)], seed=index)
        for index in range(count)
    ]


# ------------------------------------------------------------------ train vqgan


def test_ctrl_c_exits_130_with_a_checkpoint_and_resume_finishes(
    cli, photos, tmp_path, monkeypatch
):
    import sundae_cli.train_vqgan as module

    real = module.VQTrainer.train_step

    def interrupt_at_three(self, batches):
        if self.step == 3:
            raise KeyboardInterrupt
        return real(self, batches)

    monkeypatch.setattr(module.VQTrainer, "train_step", interrupt_at_three)
    run = tmp_path / "run"
    stopped = train(
        cli, "--data", photos, "--out", run, overrides=["train.vqgan.steps=5"]
    )

    assert stopped.exit_code == 130
    assert f"interrupted at step 3; checkpoint written to {run}" in stopped.stderr
    assert f"sundae train vqgan --resume {run}" in stopped.stderr
    assert latest_checkpoint(run).name == "step-00000003"

    monkeypatch.setattr(module.VQTrainer, "train_step", real)
    resumed = cli("train", "vqgan", "--resume", run, "--data", photos)
    assert resumed.exit_code == 0, resumed.stderr
    assert resumed.stdout.strip() == str(run)
    assert latest_checkpoint(run).name == "step-00000005"


def test_perceptual_weights_on_off_and_bad_file(cli, photos, tmp_path):
    from safetensors.torch import save_file

    from sundae_vqgan.vgg import VGG16Features

    torch.manual_seed(0)
    weights = tmp_path / "vgg16.safetensors"
    save_file(VGG16Features().state_dict(), str(weights))
    bad = tmp_path / "vgg16.pth"
    bad.write_text("these are not weights")
    two_steps = ["train.vqgan.steps=2", "train.vqgan.log_every=1"]

    on = train(
        cli,
        *("--data", photos, "--out", tmp_path / "on"),
        *("--perceptual-weights", weights),
        overrides=two_steps,
    )
    off = train(cli, "--data", photos, "--out", tmp_path / "off", overrides=two_steps)
    broken = train(
        cli,
        *("--data", photos, "--out", tmp_path / "broken"),
        *("--perceptual-weights", bad),
        overrides=two_steps,
    )

    assert on.exit_code == 0, on.stderr
    assert all(record["perceptual"] > 0 for record in metrics(tmp_path / "on"))
    assert read_meta(latest_checkpoint(tmp_path / "on"))["perceptual"] is True
    assert "perceptual loss off" not in on.stderr
    assert off.exit_code == 0
    assert off.stderr.count("perceptual loss off") == 1
    assert all(record["perceptual"] == 0 for record in metrics(tmp_path / "off"))
    assert broken.exit_code == 2
    assert f"{bad}: cannot read weights" in broken.stderr
    assert "hint: give a VGG16 state dict" in broken.stderr
    assert not (tmp_path / "broken").exists()  # refused before the run was made


def test_cases_c01_c02_c05_c07_messy_folder_trains(cli, tmp_path):
    folder = tmp_path / "messy"
    folder.mkdir()
    save_noise(folder / "tall.png", (37, 53))
    save_noise(folder / "strip.png", (8, 300), "L")
    save_noise(folder / "grey-alpha.png", (40, 40), "LA")
    palette = Image.open(save_noise(tmp_path / "palette.png", (30, 30), "P"))
    palette.save(folder / "palette.png", transparency=0)  # C02: a transparent index
    hidden_red = Image.new("RGBA", (1, 1), (255, 0, 0, 0))  # C02: red under alpha 0
    hidden_red.save(folder / "dot.png")
    save_noise(tmp_path / "real.webp", (64, 48))
    shutil.copyfile(tmp_path / "real.webp", folder / "holiday.jpg")  # WebP as .jpg
    (folder / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    (folder / "notes.txt").write_text("shopping list")
    (folder / "fake.png").write_text("I am text, not a PNG")

    result = train(
        cli,
        *("--data", folder, "--out", tmp_path / "run"),
        overrides=["train.vqgan.steps=2"],
    )

    assert result.exit_code == 0, result.stderr
    assert "6 images (L 1, LA 1, P 1, RGB 2, RGBA 1), 2 skipped" in result.stderr
    assert f"skipping {folder / 'notes.txt'}: not a decodable image" in result.stderr
    assert f"skipping {folder / 'fake.png'}: not a decodable image" in result.stderr
    assert ".DS_Store" not in result.stderr
    assert latest_checkpoint(tmp_path / "run").name == "step-00000002"


def test_case_c06_empty_and_upper_case_folders(cli, tmp_path, autoencoder):
    empty = tmp_path / "empty"
    empty.mkdir()
    upper = tmp_path / "upper"
    upper.mkdir()
    save_noise(upper / "IMG_0001.JPG", (40, 30))
    save_noise(upper / "b.Jpeg", (30, 40), seed=1)

    trained = train(cli, "--data", empty, "--out", tmp_path / "run")
    encoded = cli("encode", empty, "--out", tmp_path / "x.h5")  # no run in the store
    found = encode(cli, upper, tmp_path / "upper.h5", autoencoder)

    for result in (trained, encoded):
        assert result.exit_code == 2
        assert f"no decodable images in {empty} (looked for {FORMATS}" in result.stderr
    assert not (tmp_path / "run").exists() and not runs_root().exists()
    assert not (tmp_path / "x.h5").exists()
    assert found.exit_code == 0, found.stderr
    assert "\t2 images\t4 grids\t0 skipped" in found.stdout


def test_batch_larger_than_the_folder_is_bad_input_and_leaves_no_run(cli, tmp_path):
    noise_folder(tmp_path / "few", 4)
    result = train(
        cli,
        "--data",
        tmp_path / "few",
        "--out",
        tmp_path / "run",
        overrides=("train.vqgan.batch_size=8", "data.val_fraction=0"),
    )
    assert result.exit_code == 2
    assert "4 training items (4 per process) is fewer than" in result.stderr
    assert "train.vqgan.batch_size = 8" in result.stderr
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------ encode


def test_case_c04_truncated_files_skipped_recorded_or_strict(
    cli, tmp_path, autoencoder
):
    folder = tmp_path / "images"
    noise_folder(folder, 3)
    cut_jpeg = save_noise(folder / "cut.jpg", (64, 64), seed=7)
    cut_png = save_noise(folder / "cut.png", (64, 64), seed=8)
    for path in (cut_jpeg, cut_png):
        data = path.read_bytes()
        path.write_bytes(data[: len(data) * 2 // 3])
    out = tmp_path / "latents.h5"

    lenient = encode(cli, folder, out, autoencoder, "--workers", "0")
    strict = encode(cli, folder, tmp_path / "strict.h5", autoencoder, "--strict")
    info = cli("latents", "info", out, "--json")

    assert lenient.exit_code == 0, lenient.stderr
    for path in (cut_jpeg, cut_png):
        assert lenient.stderr.count(f"skipping {path}: truncated or corrupt") == 1
    assert "\t3 images\t6 grids\t2 skipped" in lenient.stdout
    described = json.loads(info.stdout)
    assert sorted(path for path, _ in described["skipped_files"]) == [
        str(cut_jpeg),
        str(cut_png),
    ]
    assert described["num_skipped"] == 2 and described["num_sources"] == 3
    assert strict.exit_code == 2
    assert f"{cut_jpeg}: truncated or corrupt" in strict.stderr
    assert "drop --strict" in strict.stderr
    assert not (tmp_path / "strict.h5").exists()


def test_encode_records_the_autoencoder_run_as_an_absolute_path(
    cli, tmp_path, autoencoder, monkeypatch
):
    # `encode --model runs/ae` in one folder, `train prior` in another: the recorded
    # run must still point at the autoencoder.
    noise_folder(tmp_path / "imgs", 2)
    monkeypatch.chdir(autoencoder.parent)
    result = encode(cli, tmp_path / "imgs", tmp_path / "x.h5", autoencoder.name)
    assert result.exit_code == 0, result.stderr
    with open_latents(tmp_path / "x.h5") as latents:
        assert latents.attrs["autoencoder_run"] == str(autoencoder.resolve())


def test_case_c08_tokens_do_not_depend_on_the_batch_size(cli, tmp_path, autoencoder):
    folder = tmp_path / "sizes"
    folder.mkdir()
    for index, size in enumerate([(37, 53), (8, 300), (229, 1024), (1, 1), (64, 64)]):
        save_noise(folder / f"{index}.png", size, seed=index)
    tokens = {}
    for batch_size in (1, 3):
        out = tmp_path / f"bs{batch_size}.h5"
        result = encode(cli, folder, out, autoencoder, "--batch-size", batch_size)
        assert result.exit_code == 0, result.stderr
        with open_latents(out) as file:
            # Items are stored batch by batch (images, then their mirror images).
            order = np.lexsort((file.flipped, file.source_index))
            tokens[batch_size] = (file.source_paths(), file.tokens(order))

    assert tokens[1][0] == tokens[3][0] and len(tokens[1][0]) == 5
    assert tokens[1][1].shape == (10, 8, 8)
    assert np.array_equal(tokens[1][1], tokens[3][1])


def test_case_c09_killed_encode_is_refused_then_resumed_never_overwritten(
    cli, tmp_path, autoencoder, monkeypatch
):
    import sundae_cli.encode as module

    folder = tmp_path / "images"
    files = noise_folder(folder, 6)
    out = tmp_path / "latents.h5"
    partial = partial_path_for(out)
    real = module._append
    batches = []

    def killed_after_first_batch(*args, **kwargs):
        if batches:
            raise KeyboardInterrupt
        batches.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(module, "_append", killed_after_first_batch)
    args = ("--batch-size", "2", "--workers", "0")
    killed = encode(cli, folder, out, autoencoder, *args)

    assert killed.exit_code == 130
    assert partial.exists() and not out.exists()
    with pytest.raises(DataError) as info:
        open_latents(partial)
    assert "is incomplete" in info.value.message
    assert "re-run `sundae encode`" in info.value.hint
    prior = cli("train", "prior", TINY, "--latents", partial, "--out", tmp_path / "p")
    assert prior.exit_code == 2 and "re-run `sundae encode`" in prior.stderr
    assert not (tmp_path / "p").exists()

    # Another autoencoder (same geometry, other weights) must not append to it.
    other, other_sha = save_autoencoder(
        load_recipe(TINY, CPU_FP32), tmp_path / "other", seed=1
    )
    mine_sha = read_meta(latest_checkpoint(autoencoder))["sha256"]
    refused = encode(cli, folder, out, other, *args)
    assert refused.exit_code == 2
    assert f"autoencoder {mine_sha[:12]}, you passed {other_sha[:12]}" in (
        refused.stderr
    )

    monkeypatch.setattr(module, "_append", real)
    resumed = encode(cli, folder, out, autoencoder, *args)

    assert resumed.exit_code == 0, resumed.stderr
    assert "resuming: 2 of 6 images already encoded" in resumed.stderr
    assert not partial.exists()
    with open_latents(out) as file:
        assert sorted(file.source_paths()) == sorted(str(f) for f in files)
        assert np.bincount(file.source_index).tolist() == [2] * 6
        pairs = zip(file.source_index.tolist(), file.flipped.tolist(), strict=True)
        assert sorted(pairs) == [
            (source, flipped) for source in range(6) for flipped in (False, True)
        ]
    again = encode(cli, folder, out, autoencoder, *args)
    assert again.exit_code == 2
    assert "already exists and is complete" in again.stderr
    assert "--overwrite" in again.stderr

    cut = tmp_path / "cut.h5"
    data = out.read_bytes()
    cut.write_bytes(data[: len(data) // 3])
    refused_cut = cli("train", "prior", TINY, "--latents", cut)
    assert refused_cut.exit_code == 2
    assert f"{cut} is not a readable HDF5 file" in refused_cut.stderr
    assert "re-run `sundae encode`" in refused_cut.stderr


def test_case_c15_encode_write_error_names_path_and_keeps_the_old_file(
    cli, tmp_path, autoencoder, monkeypatch
):
    from sundae_cli.latent_writer import LatentWriter

    folder = tmp_path / "images"
    noise_folder(folder, 3)
    out = tmp_path / "latents.h5"
    assert encode(cli, folder, out, autoencoder).exit_code == 0
    before = out.read_bytes()

    def disk_full(self, *args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(LatentWriter, "append", disk_full)
    failed = encode(cli, folder, out, autoencoder, "--overwrite")

    assert failed.exit_code == 1
    assert (
        f"could not write {partial_path_for(out)}: No space left on device"
        in failed.stderr
    )
    assert "hint: free disk space" in failed.stderr
    assert out.read_bytes() == before
    with open_latents(out) as file:
        assert len(file) == 6


def test_case_c13_collapse_is_warned_counted_and_shown(cli, tmp_path):
    images = two_colour_folder(tmp_path / "two-colours")
    run = tmp_path / "run"
    out = tmp_path / "latents.h5"

    trained = train(cli, "--data", images, "--out", run, overrides=COLLAPSE)
    encoded = encode(cli, images, out, run)
    text = cli("latents", "info", out)
    as_json = cli("latents", "info", out, "--json")

    assert trained.exit_code == 0, trained.stderr
    assert "codebook collapse: only 0.1% of 1024 codes used in the last 2 batches" in (
        trained.stderr
    )
    assert all(record["codebook_usage"] <= 2 / 1024 for record in metrics(run))
    assert encoded.exit_code == 0, encoded.stderr
    with open_latents(out) as file:
        assert len(file) == 64
    with h5py.File(out) as file:
        usage = file["code_usage"][:]
    assert usage.shape == (1024,) and usage.sum() == 64
    assert 1 <= np.count_nonzero(usage) <= 2
    lines = dict(line.split("\t", 1) for line in text.stdout.splitlines())
    assert float(lines["usage_fraction"]) == np.count_nonzero(usage) / 1024
    assert lines["codebook_size"] == "1024" and lines["num_items"] == "64"
    described = json.loads(as_json.stdout)
    assert described["usage_fraction"] == float(lines["usage_fraction"])
    assert described["dead_codes"] == 1024 - np.count_nonzero(usage)
    assert described["complete"] is True
