"""The model that ships in the package: consistent, small, and used by default."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from sundae_cli.checkpoints import META, WEIGHTS, require_checkpoint
from sundae_cli.fsutil import sha256_file
from sundae_cli.models import bundled_models_dir
from sundae_cli.recipes import load_recipe
from tests.helpers import generation_app

ROOT = Path(__file__).resolve().parents[2]
FAST = ["--steps", "3", "--min-steps", "1", "--device", "cpu"]


@pytest.fixture(scope="module")
def run():
    app, runner = generation_app(), CliRunner()

    def invoke(*args):
        argv = [str(arg) for arg in args]
        return runner.invoke(app, argv, catch_exceptions=False)

    return invoke


def bundled_meta(kind: str) -> dict:
    ckpt = require_checkpoint(bundled_models_dir() / f"digits-{kind}")
    return json.loads((ckpt / META).read_text())


def test_bundle_is_consistent_and_small():
    autoencoder = require_checkpoint(bundled_models_dir() / "digits-autoencoder")
    prior = bundled_meta("prior")
    assert prior["autoencoder"]["sha256"] == sha256_file(autoencoder / WEIGHTS)
    assert prior["recipe"]["prior"]["num_classes"] == 10
    total = sum(p.stat().st_size for p in bundled_models_dir().rglob("*"))
    assert total <= 15 * 10**6
    # The sampling defaults that ship are the recipe's (scripts/bundle_model.py).
    recipe = load_recipe(ROOT / "recipes" / "digits.toml")
    shipped = prior["recipe"]["sampling"]
    assert shipped["temperature"] == list(recipe.sampling.temperature)
    assert shipped["proportion"] == list(recipe.sampling.proportion)


def test_sample_uses_the_bundled_model_when_the_store_is_empty(run, tmp_path):
    result = run("sample", "-n", 3, "--out", tmp_path, *FAST)
    assert result.exit_code == 0, result.stderr
    assert "using bundled model" in result.stderr
    sidecars = sorted(tmp_path.glob("sample-*.json"))
    assert [json.loads(p.read_text())["class"] for p in sidecars] == [0, 1, 2]
    for png in sorted(tmp_path.glob("sample-*.png")):
        assert Image.open(png).size == (32, 32)


def test_inpaint_a_digit_with_the_bundled_model(run, tmp_path):
    image, mask = ROOT / "examples" / "digit.png", ROOT / "examples" / "mask.png"
    result = run(
        "inpaint", image, mask, "-n", 2, "--class", 3, "--model", "bundled",
        "--out", tmp_path, *FAST,
    )  # fmt: skip
    assert result.exit_code == 0, result.stderr
    original = np.asarray(Image.open(image).convert("RGB"))
    keep = np.asarray(Image.open(mask).convert("L")) < 128
    for png in sorted(tmp_path.glob("inpaint-*.png")):
        completed = np.asarray(Image.open(png).convert("RGB"))
        assert completed.shape == original.shape
        assert (completed[keep] == original[keep]).all()  # known pixels pasted back
        assert json.loads(png.with_suffix(".json").read_text())["class"] == 3
