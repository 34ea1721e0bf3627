"""`sundae latents info FILE`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(no_args_is_help=True, help="Inspect HDF5 latent datasets.")


@app.command("info")
def info(
    file: Annotated[Path, typer.Argument(help="Latent file written by `encode`.")],
    json_: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Print a latent file's attributes and codebook usage."""
    import json

    from sundae_cli.console import result
    from sundae_cli.latents import describe_latents

    described = describe_latents(file)
    if json_:
        result(json.dumps(described, indent=2, default=str))
        return
    for key, value in described.items():
        if isinstance(value, dict):
            for sub, sub_value in value.items():
                result(f"{key}.{sub}\t{sub_value}")
        else:
            result(f"{key}\t{value}")
