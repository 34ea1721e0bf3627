"""`sundae encode DIR --out latents.h5`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer


def encode(
    folder: Annotated[
        Path, typer.Argument(help="Image folder (searched recursively).")
    ],
    out: Annotated[Path, typer.Option("--out", help="HDF5 file to write.")],
    model: Annotated[
        str | None,
        typer.Option("--model", help="Autoencoder run (default: the newest)."),
    ] = None,
    no_flip: Annotated[
        bool, typer.Option("--no-flip", help="Do not add flipped copies.")
    ] = False,
    labels_from_subfolders: Annotated[
        bool,
        typer.Option(
            "--labels-from-subfolders", help="Class label = first sub-folder name."
        ),
    ] = False,
    batch_size: Annotated[
        int, typer.Option("--batch-size", min=1, help="Images per encoder forward.")
    ] = 32,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace a complete file at --out.")
    ] = False,
    strict: Annotated[
        bool, typer.Option("--strict", help="Fail on an undecodable file.")
    ] = False,
    workers: Annotated[
        int, typer.Option("--workers", min=0, help="Image decoding processes.")
    ] = 1,
    device: Annotated[
        str, typer.Option("--device", help="auto, cpu, cuda, cuda:N or mps.")
    ] = "auto",
) -> None:
    """Encode an image folder into the HDF5 latent dataset the prior trains on.

    Every image is stored as is and flipped; an interrupted encode resumes; a
    complete file is never overwritten without --overwrite.
    """
    from sundae_cli.console import result
    from sundae_cli.devices import resolve_device
    from sundae_cli.encode import encode_folder
    from sundae_cli.images import scan_folder
    from sundae_cli.models import describe, load_autoencoder

    scan = scan_folder(folder, strict=strict)  # bad folders fail before the model
    target = resolve_device(device)
    loaded = load_autoencoder(model, target)
    typer.echo(f"autoencoder: {describe(loaded)}", err=True)
    outcome = encode_folder(
        folder,
        out,
        loaded,
        flip=not no_flip,
        labels_from_subfolders=labels_from_subfolders,
        batch_size=batch_size,
        overwrite=overwrite,
        strict=strict,
        num_workers=workers,
        device=target,
        scan=scan,
    )
    result(
        f"{outcome.path}\t{outcome.sources} images\t{outcome.items} grids\t"
        f"{outcome.skipped} skipped"
    )
