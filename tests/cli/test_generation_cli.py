"""`sundae sample`, `generate` and `inpaint` end to end on tiny random models."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFilter
from typer.testing import CliRunner

from tests.helpers import generation_app, make_runs, save_autoencoder

FAST = ["--steps", "3", "--min-steps", "1", "--device", "cpu"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return make_runs(tmp_path_factory.mktemp("runs"))


@pytest.fixture(scope="module")
def app():
    return generation_app()


@pytest.fixture
def run(app, runs):
    """Invoke a generation command on the tiny prior; returns the Click result."""
    runner = CliRunner()

    def invoke(*args, model=True):
        extra = ["--model", str(runs.prior)] if model else []
        argv = [str(arg) for arg in (*args, *extra)]
        return runner.invoke(app, argv, catch_exceptions=False)

    return invoke


def files(folder: Path, pattern: str) -> list[Path]:
    return sorted(folder.glob(pattern))


def photo(size: tuple[int, int], path: Path) -> Path:
    """Save a smooth RGB image of (height, width) pixels at `path`."""
    rng = np.random.default_rng(3)
    small = Image.fromarray(rng.integers(0, 256, (4, 4, 3), dtype=np.uint8))
    small.resize((size[1], size[0]), Image.Resampling.BILINEAR).save(path)
    return path


def box_mask(size: tuple[int, int], path: Path, ground=(0, 0, 0), **save) -> Path:
    """White centred box covering half of each side on `ground`, saved at `path`."""
    height, width = size
    mask = Image.new("RGB", (width, height), ground)
    box = (width // 4, height // 4, width * 3 // 4 - 1, height * 3 // 4 - 1)
    ImageDraw.Draw(mask).rectangle(box, fill=(255, 255, 255))
    mask.save(path, **save)
    return path


def pixel_fraction(stderr: str) -> float:
    return float(re.search(r"mask: ([\d.]+)% of pixels", stderr).group(1))


# --- sample (C16) ---------------------------------------------------------------


def test_sample_writes_exactly_n_images_with_sidecars(run, tmp_path):
    out = tmp_path / "ten"
    result = run("sample", "-n", 10, "--batch-size", 4, "--out", out, *FAST)
    assert result.exit_code == 0, result.stderr
    assert len(files(out, "*.png")) == 10 and len(files(out, "*.json")) == 10
    assert result.stdout.splitlines() == [str(p) for p in files(out, "*.png")]
    assert "10 images in" in result.stderr and "mean 3.0 steps used" in result.stderr
    assert "prior: prior (step 1" in result.stderr

    one = run("sample", "-n", 1, "--batch-size", 64, "--out", tmp_path / "one", *FAST)
    assert one.exit_code == 0
    assert [p.name for p in files(tmp_path / "one", "*")] == [
        "sample-00000.json",
        "sample-00000.png",
    ]


def test_sample_rejects_zero_and_negative_counts(run, tmp_path):
    for count in (0, -3):
        result = run("sample", "-n", count, "--out", tmp_path, *FAST)
        assert result.exit_code == 2
    assert not tmp_path.exists() or not any(tmp_path.iterdir())


def test_rerun_gives_same_bytes_and_never_overwrites_silently(run, tmp_path):
    first, second = tmp_path / "first", tmp_path / "second"
    assert run("sample", "-n", 3, "--seed", 5, "--out", first, *FAST).exit_code == 0
    again = run("sample", "-n", 3, "--seed", 5, "--out", second, "--overwrite", *FAST)
    assert again.exit_code == 0
    for path in files(first, "*"):
        assert path.read_bytes() == (second / path.name).read_bytes()

    before = {path: path.stat().st_mtime_ns for path in files(first, "*")}
    refused = run("sample", "-n", 3, "--seed", 6, "--out", first, *FAST)
    assert refused.exit_code == 2
    assert "already exists" in refused.stderr and "--overwrite" in refused.stderr
    assert {path: path.stat().st_mtime_ns for path in files(first, "*")} == before
    replaced = run("sample", "-n", 3, "--seed", 6, "--out", first, "--overwrite", *FAST)
    assert replaced.exit_code == 0
    assert (first / "sample-00000.png").read_bytes() != (
        second / "sample-00000.png"
    ).read_bytes()


def test_sidecar_records_seeds_settings_and_models(run, runs, tmp_path):
    args = ["--temperature", "1.0:0.5", "--proportion", "0.7", "--top-k", 20]
    result = run(
        "sample", "-n", 2, "--seed", 9, "--out", tmp_path, "--update", "confidence",
        *args, *FAST,
    )  # fmt: skip
    assert result.exit_code == 0, result.stderr
    sidecar = json.loads((tmp_path / "sample-00001.json").read_text())
    assert sidecar["seed"] == 9 and sidecar["index"] == 1
    assert isinstance(sidecar["sample_seed"], int)
    assert sidecar["sampler"] == {
        "steps": 3,
        "temperature": [1.0, 0.5],
        "proportion": [0.7, 0.7],
        "top_k": 20,
        "update": "confidence",
        "min_steps": 1,
        "early_stop": True,
        "history_every": 0,
    }
    assert sidecar["prior"]["run"] == "prior"
    assert sidecar["autoencoder"]["sha256"] == runs.autoencoder_sha256
    assert sidecar["grid"] == [8, 8] and sidecar["image_size"] == [32, 32]
    assert 1 <= sidecar["steps_used"] <= 3 and sidecar["class"] is None


def test_grid_and_history_gif(run, tmp_path):
    result = run("sample", "-n", 2, "--out", tmp_path, "--grid", "--history", 1, *FAST)
    assert result.exit_code == 0, result.stderr
    assert (tmp_path / "grid.png").is_file()
    with Image.open(tmp_path / "sample-00000.gif") as gif:
        assert gif.n_frames == 4  # the random start and 3 steps


def test_bad_schedule_names_the_flag(run, tmp_path):
    result = run("sample", "--temperature", "warm", "--out", tmp_path, *FAST)
    assert result.exit_code == 2 and "--temperature" in result.stderr


def test_another_autoencoder_is_refused_by_sha(run, runs, tmp_path):
    other, sha = save_autoencoder(runs.recipe, tmp_path / "other-ae", seed=1)
    result = run("sample", "--autoencoder", other, "--out", tmp_path / "s", *FAST)
    assert result.exit_code == 2
    assert sha[:12] in result.stderr and runs.autoencoder_sha256[:12] in result.stderr
    assert not (tmp_path / "s").exists()


def test_class_flag_checks(run, tmp_path):
    result = run("sample", "--class", 1, "--out", tmp_path, *FAST)
    assert result.exit_code == 2 and "unconditional" in result.stderr

    conditional = make_runs(tmp_path / "cond", ["prior.num_classes=3"])
    argv = ["sample", "-n", 2, "--out", tmp_path / "c", *FAST]
    bad = run(*argv, "--class", 3, "--model", conditional.prior, model=False)
    assert bad.exit_code == 2 and "0..2" in bad.stderr
    good = run(*argv, "--class", 2, "--model", conditional.prior, model=False)
    assert good.exit_code == 0, good.stderr
    assert json.loads((tmp_path / "c" / "sample-00001.json").read_text())["class"] == 2

    # Without --class a conditional prior cycles through its classes, and says so.
    cycled = run(
        "sample", "-n", 4, "--out", tmp_path / "d", *FAST,
        "--model", conditional.prior, model=False,
    )  # fmt: skip
    assert cycled.exit_code == 0, cycled.stderr
    assert "image i gets class i mod 3" in " ".join(cycled.stderr.split())
    sidecars = files(tmp_path / "d", "*.json")
    assert [json.loads(p.read_text())["class"] for p in sidecars] == [0, 1, 2, 0]


def test_command_module_does_not_import_torch():
    code = (
        "import sys\nimport sundae_cli.commands.sample_cmd\n"
        "print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.stdout.strip() == "False"


# --- generate (C17) ---------------------------------------------------------------


def test_generate_native_equals_sample(run, tmp_path):
    sampled = run("sample", "-n", 2, "--seed", 4, "--out", tmp_path / "s", *FAST)
    generated = run("generate", "-n", 2, "--seed", 4, "--out", tmp_path / "g", *FAST)
    assert sampled.exit_code == 0 and generated.exit_code == 0, generated.stderr
    for index in range(2):
        name = f"{index:05d}.png"
        assert (tmp_path / "s" / f"sample-{name}").read_bytes() == (
            tmp_path / "g" / f"generate-{name}"
        ).read_bytes()


def test_generate_size_not_divisible_fails_at_validation(run, tmp_path):
    result = run("generate", "--size", "30x30", "--out", tmp_path, *FAST)
    assert result.exit_code == 2
    assert "factor 4" in result.stderr
    assert "--size 28x28" in result.stderr and "--size 32x32" in result.stderr
    malformed = run("generate", "--size", "big", "--out", tmp_path, *FAST)
    assert malformed.exit_code == 2 and "WIDTHxHEIGHT" in malformed.stderr


def test_generate_too_large_canvas_fails_fast_in_gib(run, tmp_path):
    result = run(
        "generate", "--size", "16384x16384", "--batch-size", 64, "--out", tmp_path,
        *FAST,
    )  # fmt: skip
    assert result.exit_code == 2
    assert "GiB" in result.stderr and "--size" in result.stderr
    assert "autoencoder:" not in result.stderr  # refused before loading weights


def test_generate_non_square_larger_canvas(run, tmp_path):
    result = run("generate", "--size", "64x32", "--out", tmp_path, *FAST)
    assert result.exit_code == 0, result.stderr
    assert Image.open(tmp_path / "generate-00000.png").size == (64, 32)
    sidecar = json.loads((tmp_path / "generate-00000.json").read_text())
    assert sidecar["grid"] == [8, 16] and sidecar["window"] == [8, 8]


def test_generate_shifted_tiling(run, tmp_path):
    result = run(
        "generate", "--size", "64x32", "--tiling", "shifted", "--seed", 3,
        "--out", tmp_path / "s", *FAST,
    )  # fmt: skip
    assert result.exit_code == 0, result.stderr
    assert "2 window(s)" in result.stderr and "shifted tiling" in result.stderr
    assert Image.open(tmp_path / "s" / "generate-00000.png").size == (64, 32)
    sidecar = json.loads((tmp_path / "s" / "generate-00000.json").read_text())
    assert sidecar["tiling"] == "shifted" and sidecar["grid"] == [8, 16]
    both = run(
        "generate", "--size", "64x32", "--tiling", "shifted", "--overlap", 2,
        "--out", tmp_path / "b", *FAST,
    )  # fmt: skip
    assert both.exit_code == 2 and "--overlap applies to --tiling overlap" in (
        " ".join(both.stderr.split())
    )
    assert not (tmp_path / "b").exists()


def test_generate_canvas_smaller_than_the_window(run, tmp_path):
    fits = run("generate", "--size", "32x16", "--out", tmp_path / "a", *FAST)
    assert fits.exit_code == 0, fits.stderr
    assert Image.open(tmp_path / "a" / "generate-00000.png").size == (32, 16)
    odd = run("generate", "--size", "32x12", "--out", tmp_path / "b", *FAST)
    assert odd.exit_code == 2 and "shortening" in odd.stderr


def test_generate_overlap_and_resolution_flags(run, tmp_path):
    bad = run("generate", "--size", "64x32", "--overlap", 8, "--out", tmp_path, *FAST)
    assert bad.exit_code == 2 and "--overlap must be in [0, 7]" in bad.stderr
    native = run("generate", "--resolution", "native", "--out", tmp_path / "n", *FAST)
    assert native.exit_code == 0, native.stderr
    assert Image.open(tmp_path / "n" / "generate-00000.png").size == (32, 32)
    both = run("generate", "--size", "32x32", "--resolution", "256", "--out", tmp_path)
    assert both.exit_code == 2 and "--resolution" in both.stderr


# --- inpaint (C18-C20) ---------------------------------------------------------------


def test_inpaint_size_and_preserved_pixels(run, tmp_path):
    image = photo((53, 37), tmp_path / "in.png")
    mask = box_mask((53, 37), tmp_path / "mask.png")
    result = run("inpaint", image, mask, "-n", 2, "--out", tmp_path / "o", *FAST)
    assert result.exit_code == 0, result.stderr
    outputs = [Path(line) for line in result.stdout.splitlines()]
    assert len(outputs) == 2
    keep = np.asarray(Image.open(mask).convert("L")) < 128
    original = np.asarray(Image.open(image))
    for path in outputs:
        output = np.asarray(Image.open(path))
        assert output.shape == original.shape
        assert np.array_equal(output[keep], original[keep])


def test_inpaint_mask_of_another_size(run, tmp_path):
    image = photo((40, 40), tmp_path / "in.png")
    mask = box_mask((20, 20), tmp_path / "mask.png")
    refused = run("inpaint", image, mask, "--out", tmp_path / "a", *FAST)
    assert refused.exit_code == 2 and "--resize-mask" in refused.stderr
    resized = run(
        "inpaint", image, mask, "--resize-mask", "-n", 1, "--out", tmp_path / "b",
        *FAST,
    )  # fmt: skip
    assert resized.exit_code == 0, resized.stderr


def test_inpaint_mask_fraction_warnings_and_invert(run, tmp_path):
    image = photo((40, 40), tmp_path / "in.png")
    mask = box_mask((40, 40), tmp_path / "mask.png")
    square = run("inpaint", image, mask, "-n", 1, "--out", tmp_path / "a", *FAST)
    assert square.exit_code == 0
    assert pixel_fraction(square.stderr) == pytest.approx(25.0)
    assert "% of tokens" in square.stderr

    inverted = run(
        "inpaint", image, mask, "--invert-mask", "-n", 1, "--out", tmp_path / "b",
        *FAST,
    )  # fmt: skip
    assert pixel_fraction(inverted.stderr) == pytest.approx(75.0)

    black = tmp_path / "black.png"
    Image.new("L", (40, 40), 0).save(black)
    empty = run("inpaint", image, black, "-n", 2, "--out", tmp_path / "c", *FAST)
    assert empty.exit_code == 0 and "nothing to regenerate" in empty.stderr
    for path in files(tmp_path / "c", "*.png"):
        assert path.read_bytes() != b"" and np.array_equal(
            np.asarray(Image.open(path)), np.asarray(Image.open(image))
        )

    white = tmp_path / "white.png"
    Image.new("L", (40, 40), 255).save(white)
    full = run("inpaint", image, white, "-n", 1, "--out", tmp_path / "d", *FAST)
    assert full.exit_code == 0 and "100.0% of the image is masked" in full.stderr


def test_inpaint_mask_fraction_is_robust(run, tmp_path):
    """C19: blurred edge, JPEG quality 30 and a (1, 1, 1) ground read alike."""
    image = photo((64, 64), tmp_path / "in.png")
    sharp = box_mask((64, 64), tmp_path / "sharp.png")
    blurred = tmp_path / "blurred.png"
    Image.open(sharp).filter(ImageFilter.GaussianBlur(2)).save(blurred)
    variants = [
        sharp,
        blurred,
        box_mask((64, 64), tmp_path / "q30.jpg", quality=30),
        box_mask((64, 64), tmp_path / "ground.png", ground=(1, 1, 1)),
    ]
    fractions = []
    for index, mask in enumerate(variants):
        out = tmp_path / f"o{index}"
        result = run("inpaint", image, mask, "-n", 1, "--out", out, *FAST)
        assert result.exit_code == 0, result.stderr
        fractions.append(pixel_fraction(result.stderr))
    assert max(fractions) - min(fractions) <= 2.0, fractions


def test_inpaint_help_documents_the_convention(app):
    text = CliRunner().invoke(app, ["inpaint", "--help"]).stdout
    assert "white = regenerate" in text and "--invert-mask" in text
