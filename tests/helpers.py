"""Tiny random-initialised model runs for generation tests, and a CLI app to drive.

`make_runs` saves an autoencoder run and a prior run that records it (run path and
checkpoint sha256), exactly as `train vqgan` and `train prior` would, but without
training: the weights are a seeded random initialisation.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TINY = REPO / "recipes" / "tiny.toml"
# Where the recipe and device settings are fixed for tests: fp32 on the CPU.
CPU_FP32 = ['device="cpu"', 'precision="fp32"']


@dataclass(frozen=True)
class Runs:
    """Paths of a saved autoencoder run and prior run, and their recipe."""

    autoencoder: Path
    prior: Path
    autoencoder_sha256: str
    recipe: object


def save_autoencoder(recipe, out: Path, seed: int = 0) -> tuple[Path, str]:
    """Build, seed and save an autoencoder run at `out`; (run path, sha256)."""
    import torch

    from sundae_cli.checkpoints import read_meta, save_checkpoint
    from sundae_cli.plugins import get_autoencoder_backend
    from sundae_cli.runs import create_run

    torch.manual_seed(seed)
    model = get_autoencoder_backend(recipe.autoencoder.backend).build(
        recipe.autoencoder.config
    )
    run = create_run("autoencoder", recipe.name, {}, out=out)
    meta = {"kind": "autoencoder", "recipe": recipe.to_dict()}
    ckpt = save_checkpoint(run.path, 1, model.state_dict(), None, meta)
    return run.path, str(read_meta(ckpt)["sha256"])


def save_prior(
    recipe, out: Path, autoencoder: Path, sha256: str, seed: int = 0, peak=None
) -> Path:
    """Build, seed and save a prior run recording its autoencoder.

    `peak`: a code the prior strongly prefers everywhere (a large logit bias), so
    samples converge and stop early like a trained model's.
    """
    import torch

    from sundae_cli.checkpoints import save_checkpoint
    from sundae_cli.plugins import get_prior_backend
    from sundae_cli.runs import create_run

    torch.manual_seed(seed)
    model = get_prior_backend(recipe.prior.backend).build(
        recipe.prior.config, codebook_size=recipe.codebook_size
    )
    if peak is not None:
        with torch.no_grad():
            model.to_logits.bias[peak] = 30.0
    record = {"run": str(autoencoder), "sha256": sha256}
    run = create_run("prior", recipe.name, {"autoencoder": record}, out=out)
    meta = {"kind": "prior", "recipe": recipe.to_dict(), "autoencoder": record}
    save_checkpoint(run.path, 1, model.state_dict(), None, meta)
    return run.path


def make_runs(
    root: Path,
    overrides: list[str] | tuple[str, ...] = (),
    recipe_path: Path = TINY,
    peak: int | None = None,
    seed: int = 0,
) -> Runs:
    """Save a tiny autoencoder run and a prior run that records it under `root`."""
    from sundae_cli.recipes import load_recipe

    recipe = load_recipe(recipe_path, [*CPU_FP32, *overrides])
    ae_path, sha = save_autoencoder(recipe, root / "ae", seed)
    prior_path = save_prior(recipe, root / "prior", ae_path, sha, seed, peak)
    return Runs(ae_path, prior_path, sha, recipe)


def generation_app():
    """A Typer app with `sample`, `generate` and `inpaint` and the real error
    boundary (`SundaeGroup`), as the lead registers them in `sundae_cli.app`."""
    import typer

    from sundae_cli.app import SundaeGroup
    from sundae_cli.commands import sample_cmd
    from sundae_cli.console import setup_logging

    app = typer.Typer(cls=SundaeGroup, add_completion=False)

    @app.callback()
    def _callback() -> None:
        setup_logging(0, False)  # route logs to the runner's stderr

    app.command("sample")(sample_cmd.sample)
    app.command("generate")(sample_cmd.generate)
    app.command("inpaint")(sample_cmd.inpaint)
    return app
