"""`sundae train vqgan` and `sundae train prior`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(no_args_is_help=True, help="Train the autoencoder or the prior.")

RecipeArg = Annotated[
    str | None,
    typer.Argument(help="Recipe name or .toml path (optional with --resume)."),
]
SetOption = Annotated[
    list[str] | None,
    typer.Option("--set", help="Override a recipe field: key.path=value."),
]
OutOption = Annotated[
    Path | None,
    typer.Option("--out", help="Run directory (default: a new run in the store)."),
]
ResumeOption = Annotated[
    str | None,
    typer.Option("--resume", help="Continue this run (name or path) exactly."),
]
DeviceOption = Annotated[
    str | None,
    typer.Option("--device", help="Override the recipe's device (auto, cpu, cuda)."),
]
CompileOption = Annotated[
    bool,
    typer.Option(
        "--compile",
        help="torch.compile the networks (slow first steps; CPU needs a C++ compiler).",
    ),
]


def _recipe(recipe: str | None, resume: str | None, kind: str, sets: list[str]):
    """The recipe from the argument, or the resumed run's saved recipe."""
    from sundae_cli.errors import InputError
    from sundae_cli.recipes import load_recipe
    from sundae_cli.runs import resolve_run

    if recipe is None:
        if resume is None:
            raise InputError(
                "missing RECIPE", hint="pass a recipe name or path, or --resume RUN"
            )
        recipe = str(resolve_run(resume, kind).path / "recipe.toml")
    return load_recipe(recipe, sets)


@app.command("prior")
def prior(
    recipe: RecipeArg = None,
    latents: Annotated[
        Path | None,
        typer.Option("--latents", help="HDF5 latents (default: recipe latents.path)."),
    ] = None,
    resume: ResumeOption = None,
    out: OutOption = None,
    device: DeviceOption = None,
    compile_model: CompileOption = False,
    set_: SetOption = None,
) -> None:
    """Train a SUNDAE prior on a latent dataset written by `sundae encode`.

    Under torchrun each process trains on its own shard (DDP); rank 0 writes the run.
    """
    from sundae_cli.console import result
    from sundae_cli.train_prior import train_prior

    sets = list(set_ or []) + ([f"device={device!r}"] if device else [])
    loaded = _recipe(recipe, resume, "prior", sets)
    outcome = train_prior(
        loaded, latents=latents, out=out, resume=resume, compile_model=compile_model
    )
    if outcome.checkpoint is not None:
        result(str(outcome.run_path))


@app.command("vqgan")
def vqgan(
    recipe: RecipeArg = None,
    data: Annotated[
        Path | None,
        typer.Option("--data", help="Image folder (default: recipe data.dir)."),
    ] = None,
    perceptual_weights: Annotated[
        Path | None,
        typer.Option(
            "--perceptual-weights",
            help="VGG16 (LPIPS) weights file; without it the perceptual loss is off.",
        ),
    ] = None,
    resume: ResumeOption = None,
    out: OutOption = None,
    device: DeviceOption = None,
    compile_model: CompileOption = False,
    set_: SetOption = None,
) -> None:
    """Train the VQ-GAN autoencoder on an image folder.

    Under torchrun each process trains on its own shard (DDP); rank 0 writes the run.
    """
    from sundae_cli.console import result
    from sundae_cli.train_vqgan import train_vqgan

    sets = list(set_ or []) + ([f"device={device!r}"] if device else [])
    loaded = _recipe(recipe, resume, "autoencoder", sets)
    outcome = train_vqgan(
        loaded,
        data=data,
        out=out,
        resume=resume,
        perceptual_weights=perceptual_weights,
        compile_model=compile_model,
    )
    if outcome.checkpoint is not None:
        result(str(outcome.run_path))
