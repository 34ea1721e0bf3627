#!/usr/bin/env python3
"""Copy a trained autoencoder run and prior run into the package as the bundled model.

    python scripts/bundle_model.py AUTOENCODER_RUN PRIOR_RUN

Writes `sundae_cli/data/models/digits-autoencoder` and `.../digits-prior`: run.json,
recipe.toml and the newest complete checkpoint's model.safetensors and meta.json (no
training state, to keep the package small). The prior's record of its autoencoder is
pointed at the bundled copy; the sha256 that ties them together is unchanged.

The prior's [sampling] section (the defaults of `sundae sample`) is taken from
recipes/digits.toml, where it was tuned after training with
benchmarks/quality_digits.py. Sampling settings never affect the weights; a prior
trained from the current recipe already records the same section.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

from sundae_cli.checkpoints import META, WEIGHTS, require_checkpoint
from sundae_cli.console import result
from sundae_cli.models import bundled_models_dir
from sundae_cli.recipe_files import to_toml
from sundae_cli.recipes import load_recipe

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "digits.toml"


def current_sampling() -> dict:
    """The [sampling] section of recipes/digits.toml, as a recipe records it."""
    section = load_recipe(RECIPE).sampling.model_dump(mode="json")
    return {key: value for key, value in section.items() if value is not None}


def bundle(
    run: Path,
    name: str,
    autoencoder_name: str | None = None,
    sampling: dict | None = None,
) -> Path:
    target = bundled_models_dir() / name
    if target.exists():
        shutil.rmtree(target)
    ckpt = require_checkpoint(run)
    dest = target / "checkpoints" / ckpt.name
    dest.mkdir(parents=True)
    shutil.copyfile(ckpt / WEIGHTS, dest / WEIGHTS)
    meta = json.loads((ckpt / META).read_text())
    info = json.loads((run / "run.json").read_text())
    if autoencoder_name is not None:
        for record in (meta, info):
            record["autoencoder"] = {**record["autoencoder"], "run": autoencoder_name}
            record["autoencoder"].pop("latents", None)
    if sampling is not None:
        meta["recipe"]["sampling"] = sampling
    (dest / META).write_text(json.dumps(meta, indent=2) + "\n")
    (target / "run.json").write_text(json.dumps(info, indent=2) + "\n")
    (target / "recipe.toml").write_text(to_toml(meta["recipe"]))
    return target


def main() -> None:
    if len(sys.argv) != 3:
        sys.exit("usage: python scripts/bundle_model.py AUTOENCODER_RUN PRIOR_RUN")
    autoencoder, prior = Path(sys.argv[1]), Path(sys.argv[2])
    result(str(bundle(autoencoder, "digits-autoencoder")))
    sampling = current_sampling()
    result(str(bundle(prior, "digits-prior", "digits-autoencoder", sampling)))
    total = sum(
        p.stat().st_size for p in bundled_models_dir().rglob("*") if p.is_file()
    )
    result(f"bundled models: {total / 2**20:.1f} MiB")


if __name__ == "__main__":
    main()
