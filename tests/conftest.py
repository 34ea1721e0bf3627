"""Shared fixtures: every test gets its own run store and working directory."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def isolated_store(tmp_path_factory, monkeypatch):
    """Point SUNDAE_HOME at a fresh folder so no test sees another's runs."""
    home = tmp_path_factory.mktemp("sundae-home")
    monkeypatch.setenv("SUNDAE_HOME", str(home))
    monkeypatch.delenv("SUNDAE_RECIPES", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    return home


@pytest.fixture(autouse=True)
def _few_threads():
    """One intra-op thread: the test models are tiny, and a second OpenMP thread on
    a shared 2-core machine costs far more in spinning than it gains."""
    import torch

    torch.set_num_threads(1)
    yield


@pytest.fixture
def cli():
    """Invoke the sundae app in-process and return the Click result."""
    from typer.testing import CliRunner

    from sundae_cli.app import app

    runner = CliRunner()

    def invoke(*args: str):
        return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)

    return invoke


TINY = REPO / "recipes" / "tiny.toml"


def make_autoencoder_run(path: Path, overrides: list[str] | None = None):
    """A random-initialised tiny VQ-GAN saved as a complete autoencoder run."""
    import torch

    from sundae_cli.checkpoints import save_checkpoint
    from sundae_cli.plugins import get_autoencoder_backend
    from sundae_cli.recipes import load_recipe
    from sundae_cli.runs import create_run

    recipe = load_recipe(TINY, overrides or [])
    torch.manual_seed(0)
    model = get_autoencoder_backend("vqgan").build(recipe.autoencoder.config)
    run = create_run("autoencoder", "tiny", {}, out=path)
    meta = {"kind": "autoencoder", "recipe": recipe.to_dict()}
    save_checkpoint(run.path, 1, model.state_dict(), None, meta)
    return run.path


@pytest.fixture(scope="session")
def digit_latents(tmp_path_factory):
    """Real digits (30 per class) encoded by a random tiny VQ-GAN: (latents, ae run)."""
    import torch

    from sundae_cli.datasets import export_digits
    from sundae_cli.encode import encode_folder
    from sundae_cli.models import load_autoencoder

    root = tmp_path_factory.mktemp("digits")
    export_digits(root / "images", per_class=30)
    ae_path = make_autoencoder_run(root / "ae")
    loaded = load_autoencoder(ae_path, torch.device("cpu"))
    out = root / "latents.h5"
    encode_folder(
        root / "images", out, loaded, labels_from_subfolders=True, num_workers=0
    )
    return out, ae_path
