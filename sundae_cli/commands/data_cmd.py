"""`sundae data digits|photos`: the bundled real images as image folders."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(no_args_is_help=True, help="Export the bundled real images.")


@app.command("digits")
def digits(
    out: Annotated[Path, typer.Argument(help="New folder to write into.")],
    per_class: Annotated[
        int | None,
        typer.Option("--per-class", min=1, max=500, help="Only this many per class."),
    ] = None,
    split: Annotated[
        str,
        typer.Option(
            "--split", help="all, train (4,000) or test (1,000: every 5th per class)."
        ),
    ] = "all",
) -> None:
    """Write the 5,000 handwritten digits as OUT/<label>/*.png (20x20, greyscale)."""
    from sundae_cli.console import result
    from sundae_cli.datasets import export_digits

    count = export_digits(out, per_class, split)
    result(f"{out}\t{count} digits")


@app.command("photos")
def photos(
    out: Annotated[Path, typer.Argument(help="New folder to write into.")],
) -> None:
    """Copy the twelve bundled public-domain photos into OUT."""
    from sundae_cli.console import result
    from sundae_cli.datasets import export_photos

    count = export_photos(out)
    result(f"{out}\t{count} photos")
