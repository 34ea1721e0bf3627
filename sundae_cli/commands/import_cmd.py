"""`sundae import taming CKPT`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(no_args_is_help=True, help="Import models trained elsewhere.")


@app.command("taming")
def taming(
    checkpoint: Annotated[
        Path, typer.Argument(help="taming-transformers .ckpt (VQModel or GPT).")
    ],
    config: Annotated[
        Path | None,
        typer.Option("--config", help="The checkpoint's taming YAML (checked)."),
    ] = None,
    resolution: Annotated[
        int | None,
        typer.Option(
            "--resolution", min=1, help="Training image size without --config [256]."
        ),
    ] = None,
    out: Annotated[
        Path | None,
        typer.Option("--out", help="Run directory (default: a new run in the store)."),
    ] = None,
) -> None:
    """Import a taming VQ-GAN as an autoencoder run, without running pickled code.

    The architecture is read off the weights' shapes (and checked against --config);
    the run works with `sundae encode --model RUN` and the samplers.
    """
    from sundae_cli.console import result
    from sundae_cli.importers import import_taming

    imported = import_taming(checkpoint, config=config, resolution=resolution, out=out)
    height, width = imported.recipe.grid
    typer.echo(
        f"autoencoder: f={imported.recipe.downsample_factor}, "
        f"{imported.recipe.codebook_size} codes, {height}x{width} grid; encode with "
        f"`sundae encode DIR --out latents.h5 --model {imported.run_path}`",
        err=True,
    )
    result(str(imported.run_path))
