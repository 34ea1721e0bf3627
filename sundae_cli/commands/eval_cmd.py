"""`sundae eval recon` and `sundae eval fid`."""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(
    no_args_is_help=True, help="Measure reconstructions (PSNR, SSIM) and samples (FID)."
)


class ResizeMode(StrEnum):
    """PIL filters for resizing images to the feature network's input size."""

    bilinear = "bilinear"
    bicubic = "bicubic"
    lanczos = "lanczos"


FolderArg = Annotated[
    Path, typer.Argument(help="Folder of images (searched recursively).")
]
BatchOption = Annotated[
    int, typer.Option("--batch-size", min=1, help="Images per forward pass.")
]
DeviceOption = Annotated[
    str, typer.Option("--device", help="auto, cpu, cuda, cuda:N or mps.")
]


@app.command("recon")
def recon(
    folder: FolderArg,
    model: Annotated[
        str | None,
        typer.Option("--model", help="Autoencoder run (default: the newest)."),
    ] = None,
    batch_size: BatchOption = 16,
    limit: Annotated[
        int | None,
        typer.Option("--limit", min=1, help="Use only the first N images (sorted)."),
    ] = None,
    json_: Annotated[
        bool, typer.Option("--json", help="Print the results as JSON.")
    ] = False,
    device: DeviceOption = "auto",
) -> None:
    """Encode and decode a folder: mean PSNR, SSIM, codebook usage and perplexity.

    Images are scaled to cover the model's recipe data.image_size and centre-cropped.
    """
    import json

    from sundae_cli.console import result
    from sundae_cli.devices import resolve_device
    from sundae_cli.evaluation import evaluate_reconstruction
    from sundae_cli.images import scan_folder
    from sundae_cli.models import describe, load_autoencoder

    torch_device = resolve_device(device)
    loaded = load_autoencoder(model, torch_device)
    files = scan_folder(folder).files[:limit]
    image_size = tuple(loaded.recipe.data.image_size)
    metrics = evaluate_reconstruction(
        loaded.model, files, image_size, batch_size, torch_device
    )
    if json_:
        info = {"model": describe(loaded), "image_size": list(image_size)}
        result(json.dumps({**info, **metrics}, indent=2))
        return
    for line in _recon_table(metrics):
        result(line)


def _recon_table(metrics: dict) -> list[str]:
    usage = (
        f"{metrics['codebook_usage']:.4f} "
        f"({metrics['codes_used']}/{metrics['codebook_size']})"
    )
    rows = [
        ("images", str(metrics["images"])),
        ("psnr (dB)", f"{metrics['psnr']:.3f}"),
        ("ssim", f"{metrics['ssim']:.4f}"),
        ("codebook usage", usage),
        ("perplexity", f"{metrics['perplexity']:.2f}"),
    ]
    return [f"{name:<16}{value}" for name, value in rows]


@app.command("fid")
def fid(
    real_dir: Annotated[Path, typer.Argument(help="Reference images (cached).")],
    fake_dir: Annotated[Path, typer.Argument(help="Generated images.")],
    features: Annotated[
        Path,
        typer.Option(
            "--features",
            help="TorchScript feature network, e.g. inception-2015-12-05.pt.",
        ),
    ],
    resize_mode: Annotated[
        ResizeMode, typer.Option("--resize-mode", help="PIL resize filter.")
    ] = ResizeMode.bicubic,
    size: Annotated[
        int, typer.Option("--size", min=1, help="Network input height and width.")
    ] = 299,
    batch_size: BatchOption = 50,
    report: Annotated[
        Path, typer.Option("--report", help="Where to write the JSON report.")
    ] = Path("fid-report.json"),
    cache_dir: Annotated[
        Path | None,
        typer.Option("--cache-dir", help="Reference cache (default: store/fid-cache)."),
    ] = None,
    kid_subsets: Annotated[
        int, typer.Option("--kid-subsets", min=1, help="KID random subsets.")
    ] = 100,
    kid_subset_size: Annotated[
        int, typer.Option("--kid-subset-size", min=2, help="Images per KID subset.")
    ] = 1000,
    device: DeviceOption = "auto",
) -> None:
    """FID and KID of FAKE_DIR against REAL_DIR with your own feature network.

    Nothing is downloaded. Images are resized to SIZE x SIZE and fed as float
    (b, 3, SIZE, SIZE) in [0, 255].
    """
    import json

    from sundae_cli.console import result
    from sundae_cli.devices import resolve_device
    from sundae_cli.fid import FidSettings, evaluate_fid, load_feature_network
    from sundae_cli.fsutil import write_text_atomic
    from sundae_cli.images import scan_folder

    network = load_feature_network(features, resolve_device(device))
    real_files = scan_folder(real_dir).files
    fake_files = scan_folder(fake_dir).files
    settings = FidSettings(
        size=size,
        resize_mode=resize_mode.value,
        batch_size=batch_size,
        kid_subsets=kid_subsets,
        kid_subset_size=kid_subset_size,
        cache_dir=cache_dir,
    )
    scores = evaluate_fid(real_files, fake_files, network, settings)
    write_text_atomic(report, json.dumps(scores, indent=2) + "\n")
    result(f"fid\t{scores['fid']:.4f}")
    result(f"kid\t{scores['kid_mean']:.6f} +/- {scores['kid_std']:.6f}")
    result(f"report\t{report}")
