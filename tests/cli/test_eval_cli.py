"""`sundae eval fid` and `sundae eval recon` end to end on tiny folders."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import typer
from PIL import Image
from typer.testing import CliRunner

from sundae_cli.app import SundaeGroup
from sundae_cli.commands import eval_cmd
from sundae_cli.console import setup_logging

REPO = Path(__file__).resolve().parents[2]

# TorchScript is deprecated in torch 2.13 but is the format of the standard Inception
# feature file, so these tests build one on purpose.
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit:DeprecationWarning")


class TinyFeatures(torch.nn.Module):
    """A conv net with the Inception calling convention: (b, 3, S, S) -> (b, 8)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3, stride=2)

    def forward(self, x: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        features = torch.relu(self.conv(x / 127.5 - 1)).mean(dim=(2, 3))  # (b, 8)
        if return_features:
            return features
        return features.sum(dim=1, keepdim=True)


@pytest.fixture
def run_eval():
    """Invoke `eval ...` through an app with the real error boundary and logging."""
    app = typer.Typer(cls=SundaeGroup)

    @app.callback()
    def _setup() -> None:
        setup_logging(0)

    app.add_typer(eval_cmd.app, name="eval")
    runner = CliRunner()

    def invoke(*args):
        return runner.invoke(app, ["eval", *[str(a) for a in args]])

    return invoke


def write_folder(folder: Path, count: int, seed: int, brightness: int) -> Path:
    """`count` noisy 24x24 PNGs around a brightness level."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for index in range(count):
        pixels = rng.normal(brightness, 40, (24, 24, 3)).clip(0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"{index:03d}.png")
    return folder


@pytest.fixture
def features_file(tmp_path) -> Path:
    torch.manual_seed(0)
    path = tmp_path / "features.pt"
    torch.jit.script(TinyFeatures()).save(str(path))
    return path


def fid_args(real, fake, features, tmp_path, report="report.json"):
    return [
        "fid",
        real,
        fake,
        "--features",
        features,
        "--size",
        "32",
        "--batch-size",
        "8",
        "--kid-subsets",
        "5",
        "--kid-subset-size",
        "10",
        "--cache-dir",
        tmp_path / "cache",
        "--report",
        tmp_path / report,
        "--device",
        "cpu",
    ]


def test_fid_report_and_reference_cache(run_eval, tmp_path, features_file):
    real = write_folder(tmp_path / "real", 20, seed=1, brightness=80)
    fake = write_folder(tmp_path / "fake", 20, seed=2, brightness=170)

    first = run_eval(*fid_args(real, fake, features_file, tmp_path))
    assert first.exit_code == 0, first.stderr
    report = json.loads((tmp_path / "report.json").read_text())
    for key in ("fid", "kid_mean", "kid_std", "real_images", "fake_images"):
        assert key in report
    assert report["fid"] > 0 and report["kid_mean"] > 0
    assert report["real_images"] == report["fake_images"] == 20
    assert report["resize_mode"] == "bicubic" and report["size"] == 32
    assert report["features"] == str(features_file)
    assert len(report["features_sha256"]) == 64 and report["feature_width"] == 8
    assert report["reference_from_cache"] is False
    assert first.stdout.startswith(f"fid\t{report['fid']:.4f}")
    assert "only 20 real images" in first.stderr

    cached = list((tmp_path / "cache").glob("*.npz"))
    assert len(cached) == 1
    mtime = cached[0].stat().st_mtime_ns
    second = run_eval(*fid_args(real, fake, features_file, tmp_path, "again.json"))
    assert second.exit_code == 0, second.stderr
    assert "using cached reference statistics" in second.stderr
    assert cached[0].stat().st_mtime_ns == mtime
    again = json.loads((tmp_path / "again.json").read_text())
    assert again["reference_from_cache"] is True
    assert again["fid"] == pytest.approx(report["fid"], rel=1e-9)


def test_fid_of_a_folder_with_itself_is_zero(run_eval, tmp_path, features_file):
    real = write_folder(tmp_path / "real", 12, seed=3, brightness=120)
    result = run_eval(
        *fid_args(real, real, features_file, tmp_path), "--resize-mode", "lanczos"
    )
    assert result.exit_code == 0, result.stderr
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["fid"] == pytest.approx(0.0, abs=1e-6)
    assert report["resize_mode"] == "lanczos"


def test_fid_missing_or_broken_features_is_bad_input(run_eval, tmp_path):
    real = write_folder(tmp_path / "real", 3, seed=4, brightness=100)
    missing = tmp_path / "inception-2015-12-05.pt"
    result = run_eval(*fid_args(real, real, missing, tmp_path))
    assert result.exit_code == 2
    assert "error:" in result.stderr and str(missing) in result.stderr
    assert "--features" in result.stderr

    broken = tmp_path / "broken.pt"
    broken.write_text("not torchscript")
    result = run_eval(*fid_args(real, real, broken, tmp_path))
    assert result.exit_code == 2 and "is not a TorchScript file" in result.stderr
    assert not (tmp_path / "report.json").exists()


def test_fid_rejects_an_unknown_resize_mode(run_eval, tmp_path, features_file):
    real = write_folder(tmp_path / "real", 3, seed=5, brightness=100)
    result = run_eval(
        *fid_args(real, real, features_file, tmp_path), "--resize-mode", "nearest"
    )
    assert result.exit_code == 2 and "nearest" in result.stderr


@pytest.fixture
def tiny_autoencoder_run(tmp_path) -> Path:
    """An untrained tiny VQ-GAN saved as a complete autoencoder run."""
    from sundae_cli.checkpoints import save_checkpoint
    from sundae_cli.plugins import get_autoencoder_backend
    from sundae_cli.recipes import load_recipe
    from sundae_cli.runs import create_run

    torch.manual_seed(0)
    recipe = load_recipe(REPO / "recipes" / "tiny.toml")
    model = get_autoencoder_backend("vqgan").build(recipe.autoencoder.config)
    run_dir = tmp_path / "ae-run"
    create_run("autoencoder", "tiny", {}, out=run_dir)
    meta = {"kind": "autoencoder", "recipe": recipe.to_dict()}
    save_checkpoint(run_dir, 1, model.state_dict(), None, meta)
    return run_dir


def test_recon_reports_metrics_in_range(run_eval, tmp_path, tiny_autoencoder_run):
    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(6)
    for index in range(3):  # non-square, so the centre fit has work to do
        pixels = rng.integers(0, 256, (40, 56, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"{index}.png")

    args = ["recon", "--model", tiny_autoencoder_run, folder, "--batch-size", "2"]
    result = run_eval(*args, "--json", "--device", "cpu")
    assert result.exit_code == 0, result.stderr
    metrics = json.loads(result.stdout)
    assert metrics["images"] == 3
    assert math.isfinite(metrics["psnr"]) and 0 < metrics["psnr"] < 100
    assert -1 < metrics["ssim"] < 1
    assert metrics["codebook_size"] == 128
    assert 0 < metrics["codebook_usage"] <= 1
    assert 1 <= metrics["perplexity"] <= metrics["codes_used"] + 1e-6

    table = run_eval(*args, "--limit", "1")
    assert table.exit_code == 0, table.stderr
    rows = dict(line.split(maxsplit=1) for line in table.stdout.splitlines())
    assert rows["images"] == "1"
    assert "psnr (dB)" in table.stdout and "codebook usage" in table.stdout


def test_recon_without_a_run_is_bad_input(run_eval, tmp_path):
    folder = write_folder(tmp_path / "images", 1, seed=7, brightness=90)
    result = run_eval("recon", folder)
    assert result.exit_code == 2
    assert "no autoencoder run" in result.stderr and "hint:" in result.stderr
