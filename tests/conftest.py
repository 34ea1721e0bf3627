"""Shared fixtures: every test gets its own run store and working directory."""

from __future__ import annotations

import os
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
    """Two cores are shared by everything; keep torch from oversubscribing."""
    import torch

    torch.set_num_threads(min(2, os.cpu_count() or 1))
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
