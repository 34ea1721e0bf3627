"""Import first-stage models trained elsewhere as ordinary autoencoder runs.

`import_taming` turns a taming-transformers checkpoint (a `VQModel` or the
`first_stage_model` inside a cond-transformer) into a run that `sundae encode`,
`train prior` and the samplers use like one trained here:

1. read the checkpoint with the safe loader of `sundae_vqgan.taming` (tensors and
   plain containers only: pickled objects become inert records, no code runs);
2. keep the VQ-GAN tensors and infer the architecture from their shapes, confirmed
   by the taming YAML when one is given (the YAML also supplies the resolution);
3. build a recipe around that architecture: the resolution preset nearest the image
   size, `data.image_size` = the model's resolution;
4. load the weights into our VQ-GAN strictly, so a layout we cannot reproduce fails
   here and not later;
5. write the run (run.json, recipe.toml, one checkpoint without training state).

Deviation: an imported run has no optimiser or discriminator state, so it can be
used for inference and encoding but not resumed with `train vqgan --resume`.
"""

from __future__ import annotations

import logging
import math
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sundae_cli.errors import CheckpointError, InputError
from sundae_cli.presets import RESOLUTION_PRESETS

if TYPE_CHECKING:
    import torch

    from sundae_cli.recipes import Recipe

log = logging.getLogger(__name__)

BACKEND = "vqgan"
DEFAULT_RESOLUTION = 256  # taming's usual training size, used without YAML or flag


@dataclass(frozen=True)
class ImportResult:
    """Where an imported model went and what it is."""

    run_path: Path
    checkpoint: Path
    source_sha256: str
    recipe: Recipe
    config: dict[str, Any]


def preset_for(image_size: int) -> str:
    """The resolution preset whose image size is nearest `image_size` (log scale).

    An exact match wins ("256" for 256); ties go to the smaller preset.
    """
    sizes = {
        name: int(preset["data"]["image_size"])
        for name, preset in RESOLUTION_PRESETS.items()
    }
    return min(
        sizes,
        key=lambda name: (abs(math.log2(sizes[name] / image_size)), sizes[name]),
    )


def _read_yaml(config: Path | None) -> str | None:
    """The YAML text, or None; an unreadable file names itself."""
    if config is None:
        return None
    try:
        return Path(config).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(
            f"cannot read the taming config {config}: {exc}",
            hint="pass the project YAML that came with the checkpoint, or omit "
            "--config",
        ) from exc


def _check_resolution(fields: dict[str, Any], resolution: int | None) -> None:
    """Refuse a --resolution that contradicts the YAML's ddconfig.resolution."""
    declared = int(fields["resolution"])
    if resolution is not None and resolution != declared:
        raise InputError(
            f"--resolution {resolution} disagrees with the config's "
            f"ddconfig.resolution {declared}",
            hint="drop --resolution (the YAML's value is used) or fix the YAML",
        )


def taming_recipe(fields: dict[str, Any], name: str, source: str) -> Recipe:
    """A validated recipe whose autoencoder section is exactly `fields`."""
    from sundae_cli.recipes import recipe_from_dict

    image_size = int(fields["resolution"])
    tables = {
        "schema_version": 1,
        "name": name,
        "resolution": preset_for(image_size),
        "data": {"image_size": image_size},
        "autoencoder": {"backend": BACKEND, **fields},
    }
    return recipe_from_dict(tables, source=source)


def _strict_load(
    recipe: Recipe, state: dict[str, torch.Tensor], path: Path
) -> torch.nn.Module:
    """Our VQ-GAN for the recipe, holding `state`; a mismatch names the checkpoint."""
    from sundae_cli.plugins import get_autoencoder_backend

    model = get_autoencoder_backend(BACKEND).build(recipe.autoencoder.config)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        details = "; ".join(
            line.strip() for line in str(exc).splitlines()[1:4] if line.strip()
        )
        raise CheckpointError(
            f"{path}: the VQ-GAN weights do not fit the inferred architecture "
            f"({details or exc})",
            hint="the checkpoint uses a layout sundae cannot reproduce; pass its "
            "taming YAML with --config to check the architecture",
        ) from exc
    return model


def import_taming(
    path: Path,
    *,
    config: Path | None = None,
    resolution: int | None = None,
    out: Path | None = None,
) -> ImportResult:
    """Import a taming-transformers VQ-GAN checkpoint as an autoencoder run.

    Args:
        path: the `.ckpt` (zip-format torch file) to import; never unpickled.
        config: the taming YAML; confirms the inferred architecture and gives the
            resolution.
        resolution: training image size when there is no YAML (default 256).
        out: run directory (default: a new run in the store).
    """
    from sundae_cli.fsutil import sha256_file
    from sundae_vqgan.taming import import_taming_checkpoint

    path = Path(path)
    yaml_text = _read_yaml(config)
    state, fields = import_taming_checkpoint(
        path, yaml_text, resolution or DEFAULT_RESOLUTION
    )
    if yaml_text is not None:
        _check_resolution(fields, resolution)
    recipe = taming_recipe(fields, f"taming-{path.stem}", str(path))
    model = _strict_load(recipe, state, path)
    source_sha256 = sha256_file(path)
    run_path, checkpoint = _write_run(recipe, model, path, source_sha256, out)
    log.info(
        "imported %s: f=%d, %d codes, %dx%d grid at %d px",
        path,
        recipe.downsample_factor,
        recipe.codebook_size,
        *recipe.grid,
        recipe.data.image_size[0],
    )
    return ImportResult(run_path, checkpoint, source_sha256, recipe, fields)


def _write_run(
    recipe: Recipe,
    model: torch.nn.Module,
    path: Path,
    source_sha256: str,
    out: Path | None,
) -> tuple[Path, Path]:
    """run.json, one checkpoint (weights and meta) and recipe.toml.

    On failure the half-made run is taken apart again (run.json removed, a folder
    this call created removed), so the store never lists a run without weights.
    """
    from sundae_cli.checkpoints import save_checkpoint
    from sundae_cli.fsutil import write_text_atomic
    from sundae_cli.recipes import to_toml
    from sundae_cli.runs import create_run

    existed = out is not None and Path(out).exists()
    provenance = {
        "backend": BACKEND,
        "imported_from": str(path.resolve()),
        "source_sha256": source_sha256,
    }
    run = create_run("autoencoder", recipe.name, provenance, out)
    meta = {"kind": "autoencoder", "recipe": recipe.to_dict(), **provenance}
    try:
        checkpoint = save_checkpoint(run.path, 0, model.state_dict(), None, meta)
        write_text_atomic(run.path / "recipe.toml", to_toml(recipe.to_dict()))
    except BaseException:
        (run.path / "run.json").unlink(missing_ok=True)
        if not existed:
            shutil.rmtree(run.path, ignore_errors=True)
        raise
    return run.path, checkpoint
