"""`sundae sample`, `sundae generate` and `sundae inpaint`.

Each command parses its flags, calls one library function (`sundae_cli.canvas.sample`,
`sundae_cli.canvas.generate`, `sundae_cli.inpaint.inpaint`) and prints the images it
wrote on stdout, one path per line; model names, progress and the summary go to
stderr.
"""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

import typer


class Update(StrEnum):
    """Which proposals replace tokens each step."""

    random = "random"
    confidence = "confidence"


class Tiling(StrEnum):
    """How `generate` covers a canvas larger than the prior's grid with windows."""

    overlap = "overlap"
    shifted = "shifted"


class MaskPolicy(StrEnum):
    """When a token counts as masked (see `sundae_cli.masks.token_mask`)."""

    any = "any"
    all = "all"
    threshold = "threshold"


class Resolution(StrEnum):
    """Square canvas sizes, or the prior's own."""

    px256 = "256"
    px512 = "512"
    px1024 = "1024"
    native = "native"


ModelOption = Annotated[
    str | None,
    typer.Option(
        "--model",
        help="Prior run name or path, or 'bundled' (default: newest, else bundled).",
    ),
]
AutoencoderOption = Annotated[
    str | None,
    typer.Option(
        "--autoencoder",
        help="Autoencoder run; must be the one the prior was trained on (sha256).",
    ),
]
SeedOption = Annotated[
    int, typer.Option("--seed", help="Image i uses a seed derived from (seed, i).")
]
BatchOption = Annotated[
    int | None,
    typer.Option(
        "--batch-size", min=1, help="Images sampled at once (default: recipe)."
    ),
]
StepsOption = Annotated[
    int | None,
    typer.Option("--steps", min=1, help="Most refinement steps (default: recipe)."),
]
TemperatureOption = Annotated[
    str | None,
    typer.Option("--temperature", help="Temperature T or START:END (linear)."),
]
ProportionOption = Annotated[
    str | None,
    typer.Option(
        "--proportion", help="Share of tokens updated per step, P or START:END."
    ),
]
TopKOption = Annotated[
    int | None,
    typer.Option("--top-k", min=1, help="Draw proposals among the k likeliest."),
]
UpdateOption = Annotated[
    Update | None,
    typer.Option("--update", help="random (the paper's) or confidence."),
]
MinStepsOption = Annotated[
    int | None,
    typer.Option("--min-steps", min=0, help="Steps before a sample may stop early."),
]
NoEarlyStopOption = Annotated[
    bool,
    typer.Option("--no-early-stop", help="Run every step even when nothing changes."),
]
ClassOption = Annotated[
    int | None,
    typer.Option(
        "--class",
        help="Class label for a class-conditional prior (default: cycle classes).",
    ),
]
OverwriteOption = Annotated[
    bool, typer.Option("--overwrite", help="Replace existing output files.")
]
DeviceOption = Annotated[
    str, typer.Option("--device", help="auto, cpu, cuda, cuda:N or mps.")
]


def _sampler_flags(
    steps: int | None,
    temperature: str | None,
    proportion: str | None,
    top_k: int | None,
    update: Update | None,
    min_steps: int | None,
    no_early_stop: bool,
) -> dict[str, Any]:
    """Sampler overrides from the flags; None keeps the recipe's value."""
    from sundae_cli.generation import parse_schedule

    return {
        "steps": steps,
        "temperature": (
            None
            if temperature is None
            else parse_schedule(temperature, "--temperature")
        ),
        "proportion": (
            None if proportion is None else parse_schedule(proportion, "--proportion")
        ),
        "top_k": top_k,
        "update": None if update is None else update.value,
        "min_steps": min_steps,
        "early_stop": False if no_early_stop else None,
    }


def _report(paths: list[Path]) -> None:
    from sundae_cli.console import result

    for path in paths:
        result(str(path))


def sample(
    count: Annotated[
        int, typer.Option("-n", "--count", min=1, help="Number of images.")
    ] = 16,
    model: ModelOption = None,
    autoencoder: AutoencoderOption = None,
    batch_size: BatchOption = None,
    steps: StepsOption = None,
    temperature: TemperatureOption = None,
    proportion: ProportionOption = None,
    top_k: TopKOption = None,
    update: UpdateOption = None,
    min_steps: MinStepsOption = None,
    no_early_stop: NoEarlyStopOption = False,
    seed: SeedOption = 0,
    class_label: ClassOption = None,
    out: Annotated[Path, typer.Option("--out", help="Output folder.")] = Path(
        "samples"
    ),
    grid: Annotated[
        bool, typer.Option("--grid", help="Also write all images as grid.png.")
    ] = False,
    history: Annotated[
        int,
        typer.Option(
            "--history",
            min=0,
            help="Decode every K-th step into an animated GIF per sample (0: none).",
        ),
    ] = 0,
    overwrite: OverwriteOption = False,
    device: DeviceOption = "auto",
) -> None:
    """Sample images from a prior: sample-00000.png ... each with a JSON sidecar.

    Image i depends only on --seed and i, not on -n or --batch-size.
    """
    from sundae_cli.canvas import SampleOptions
    from sundae_cli.canvas import sample as run_sample

    flags = _sampler_flags(
        steps, temperature, proportion, top_k, update, min_steps, no_early_stop
    )
    options = SampleOptions(
        count=count,
        seed=seed,
        out=out,
        model=model,
        autoencoder=autoencoder,
        batch_size=batch_size,
        class_label=class_label,
        sampler=flags,
        overwrite=overwrite,
        device=device,
        grid=grid,
        history=history,
    )
    _report(run_sample(options).paths)


def _check_size(value: str | None) -> str | None:
    """Reject a --size that is not WxH before anything is loaded."""
    if value is None:
        return None
    from sundae_cli.canvas import parse_size
    from sundae_cli.errors import InputError

    try:
        parse_size(value)
    except InputError as error:
        raise typer.BadParameter(f"{error.message} ({error.hint})") from None
    return value


def generate(
    size: Annotated[
        str | None,
        typer.Option(
            "--size",
            callback=_check_size,
            help="Canvas WIDTHxHEIGHT in pixels, multiples of the downsampling factor.",
        ),
    ] = None,
    resolution: Annotated[
        Resolution | None,
        typer.Option("--resolution", help="Square canvas, or the prior's native."),
    ] = None,
    count: Annotated[
        int, typer.Option("-n", "--count", min=1, help="Number of images.")
    ] = 1,
    overlap: Annotated[
        int | None,
        typer.Option(
            "--overlap",
            min=0,
            help="Tokens shared by neighbouring windows (default: half a window; "
            "0 is fastest). Only with --tiling overlap.",
        ),
    ] = None,
    tiling: Annotated[
        Tiling,
        typer.Option(
            "--tiling",
            help="Windows on a larger canvas: 'overlap' averages fixed overlapping "
            "windows; 'shifted' puts windows side by side and moves them by half a "
            "window every other step (about the cost of --overlap 0, no fixed seams).",
        ),
    ] = Tiling.overlap,
    init: Annotated[
        Path | None,
        typer.Option("--init", help="Start from this image (upscale or vary it)."),
    ] = None,
    strength: Annotated[
        float,
        typer.Option("--strength", help="Share of --init tokens re-randomised, 0..1."),
    ] = 0.5,
    model: ModelOption = None,
    autoencoder: AutoencoderOption = None,
    batch_size: BatchOption = None,
    steps: StepsOption = None,
    temperature: TemperatureOption = None,
    proportion: ProportionOption = None,
    top_k: TopKOption = None,
    update: UpdateOption = None,
    min_steps: MinStepsOption = None,
    no_early_stop: NoEarlyStopOption = False,
    seed: SeedOption = 0,
    class_label: ClassOption = None,
    out: Annotated[Path, typer.Option("--out", help="Output folder.")] = Path(
        "generated"
    ),
    overwrite: OverwriteOption = False,
    device: DeviceOption = "auto",
) -> None:
    """Generate at any resolution: generate-00000.png ... with JSON sidecars.

    A canvas larger than the prior's grid is sampled with overlapping windows whose
    predictions are averaged (or, with --tiling shifted, side-by-side windows whose
    tiling moves by half a window every other step), all positions updated in
    parallel each step. The memory needed is estimated first; a canvas that does not
    fit is refused.
    """
    from sundae_cli.canvas import GenerateOptions, parse_size
    from sundae_cli.canvas import generate as run_generate

    flags = _sampler_flags(
        steps, temperature, proportion, top_k, update, min_steps, no_early_stop
    )
    options = GenerateOptions(
        count=count,
        seed=seed,
        out=out,
        model=model,
        autoencoder=autoencoder,
        batch_size=batch_size,
        class_label=class_label,
        sampler=flags,
        overwrite=overwrite,
        device=device,
        size=None if size is None else parse_size(size),
        resolution=None if resolution is None else resolution.value,
        overlap=overlap,
        tiling=tiling.value,
        init=init,
        strength=strength,
    )
    _report(run_generate(options).paths)


def inpaint(
    image: Annotated[Path, typer.Argument(help="Image to complete (any size).")],
    mask: Annotated[
        Path,
        typer.Argument(help="Mask image: white = regenerate, black = keep."),
    ],
    count: Annotated[
        int, typer.Option("-n", "--count", min=1, help="Number of completions.")
    ] = 4,
    invert_mask: Annotated[
        bool,
        typer.Option("--invert-mask", help="Black means regenerate instead."),
    ] = False,
    mask_policy: Annotated[
        MaskPolicy,
        typer.Option(
            "--mask-policy",
            help="A token is regenerated if any / all / over half of its pixels are.",
        ),
    ] = MaskPolicy.any,
    resize_mask: Annotated[
        bool,
        typer.Option("--resize-mask", help="Scale a mask of another size to fit."),
    ] = False,
    paste: Annotated[
        bool,
        typer.Option("--paste/--no-paste", help="Paste the known pixels back."),
    ] = True,
    feather: Annotated[
        int,
        typer.Option("--feather", min=0, help="Soft edge of the paste, in pixels."),
    ] = 0,
    model: ModelOption = None,
    autoencoder: AutoencoderOption = None,
    batch_size: BatchOption = None,
    steps: StepsOption = None,
    temperature: TemperatureOption = None,
    proportion: ProportionOption = None,
    top_k: TopKOption = None,
    update: UpdateOption = None,
    min_steps: MinStepsOption = None,
    no_early_stop: NoEarlyStopOption = False,
    seed: SeedOption = 0,
    class_label: ClassOption = None,
    out: Annotated[Path, typer.Option("--out", help="Output folder.")] = Path(
        "inpaint"
    ),
    overwrite: OverwriteOption = False,
    device: DeviceOption = "auto",
) -> None:
    """Regenerate the masked region of IMAGE: inpaint-00000.png ... (input's size).

    The mask is white where the image is regenerated and black where it is kept
    (--invert-mask flips this); grey levels from 128 count as white. The image is
    resized to the prior's canvas, completed there, resized back to its own size,
    and its unmasked pixels are pasted back unchanged (--no-paste keeps the decoded
    pixels everywhere). An all-black mask writes copies of the input.
    """
    from sundae_cli.inpaint import InpaintOptions
    from sundae_cli.inpaint import inpaint as run_inpaint

    flags = _sampler_flags(
        steps, temperature, proportion, top_k, update, min_steps, no_early_stop
    )
    options = InpaintOptions(
        count=count,
        seed=seed,
        out=out,
        model=model,
        autoencoder=autoencoder,
        batch_size=batch_size,
        class_label=class_label,
        sampler=flags,
        overwrite=overwrite,
        device=device,
        image=image,
        mask=mask,
        invert_mask=invert_mask,
        mask_policy=mask_policy.value,
        resize_mask=resize_mask,
        paste=paste,
        feather=feather,
    )
    _report(run_inpaint(options).paths)
