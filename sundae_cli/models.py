"""Loading trained models for inference: autoencoder and prior runs, or bundled ones.

A model reference is a run name in the store, a path to a run directory, or a path to
one checkpoint directory inside a run. Weights are safetensors checked against the
sha256 in their checkpoint's meta.json; no pickle is ever loaded here.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sundae_cli.checkpoints import META, latest_checkpoint, load_weights, read_meta
from sundae_cli.errors import CheckpointError
from sundae_cli.recipes import Recipe, recipe_from_dict
from sundae_cli.runs import list_runs, read_run, resolve_run

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)


@dataclass
class LoadedModel:
    """A network in eval mode plus where it came from."""

    model: Any
    kind: str
    checkpoint: Path
    sha256: str
    recipe: Recipe
    meta: dict[str, Any]

    @property
    def run_path(self) -> Path:
        return self.checkpoint.parent.parent


def bundled_models_dir() -> Path:
    """Folder of the models shipped inside the package (see README)."""
    return Path(__file__).parent / "data" / "models"


def bundled_run(kind: str) -> Path | None:
    """The bundled default run of `kind`, if the package ships one."""
    path = bundled_models_dir() / ("digits-" + kind)
    return path if (path / "run.json").is_file() else None


def find_checkpoint(ref: str | Path | None, kind: str) -> Path:
    """Resolve a model reference to a complete checkpoint directory of `kind`."""
    if ref is not None and (Path(ref) / META).is_file():
        ckpt = Path(ref)
        meta_kind = read_meta(ckpt).get("kind")
        if meta_kind != kind:
            raise CheckpointError(
                f"{ckpt} is a {meta_kind} checkpoint, but a {kind} is needed here",
                hint=f"pass a {kind} run or checkpoint",
            )
        return ckpt
    run = resolve_run(ref, kind)
    ckpt = latest_checkpoint(run.path)
    if ckpt is None:
        raise CheckpointError(
            f"run {run.path} has no complete checkpoint yet",
            hint="let training reach its first checkpoint, or pick another run",
        )
    return ckpt


def load_checkpoint(ckpt: Path, kind: str, device: torch.device) -> LoadedModel:
    """Rebuild the network from the checkpoint's recipe and load its weights."""
    from sundae_cli.plugins import get_autoencoder_backend, get_prior_backend

    meta = read_meta(ckpt)
    recipe = recipe_from_dict(meta["recipe"], source=str(ckpt / META))
    if kind == "autoencoder":
        backend = get_autoencoder_backend(recipe.autoencoder.backend)
        model = backend.build(recipe.autoencoder.config)
    else:
        backend = get_prior_backend(recipe.prior.backend)
        model = backend.build(recipe.prior.config, codebook_size=recipe.codebook_size)
    weights = load_weights(ckpt)
    try:
        model.load_state_dict(weights, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(
            f"{ckpt}: weights do not fit the network its recipe describes: "
            f"{str(exc).splitlines()[0]}",
            hint="the checkpoint was edited or comes from another version",
        ) from exc
    model.to(device).eval()
    return LoadedModel(model, kind, ckpt, str(meta["sha256"]), recipe, meta)


def load_autoencoder(ref: str | Path | None, device: torch.device) -> LoadedModel:
    return load_checkpoint(find_checkpoint(ref, "autoencoder"), "autoencoder", device)


BUNDLED = "bundled"  # `--model bundled` always means the model in the package


def resolve_prior_ref(ref: str | Path | None) -> tuple[Path, bool]:
    """The prior checkpoint to use, and whether it is the bundled default.

    None means the newest prior run in the store, else the bundled model.
    """
    wants_bundled = str(ref) == BUNDLED and not Path(BUNDLED).exists()
    if wants_bundled or (ref is None and not list_runs("prior")):
        bundled = bundled_run("prior")
        if bundled is not None:
            return find_checkpoint(bundled, "prior"), True
        if wants_bundled:
            raise CheckpointError(
                "this installation has no bundled model",
                hint="reinstall sundae, or pass --model with a prior run",
            )
    return find_checkpoint(ref, "prior"), False


def autoencoder_for_prior(prior: LoadedModel, device: torch.device) -> LoadedModel:
    """The autoencoder whose latents the prior learned, verified by sha256."""
    wanted = prior.meta.get("autoencoder", {})
    return find_autoencoder(
        wanted.get("sha256"), wanted.get("run"), device, near=prior.run_path
    )


def find_autoencoder(
    sha256: str | None,
    run_hint: str | None,
    device: torch.device,
    near: Path | None = None,
) -> LoadedModel:
    """Find the autoencoder checkpoint with this sha256: the recorded run first,
    then a run of the same name next to `near`, the store, and the bundled model."""
    candidates: list[Path] = []
    if run_hint:
        candidates.append(Path(run_hint))
        if near is not None:
            candidates.append(near.parent / Path(run_hint).name)  # moved together
    candidates += [run.path for run in list_runs("autoencoder")]
    bundled = bundled_run("autoencoder")
    if bundled is not None:
        candidates.append(bundled)
    for path in candidates:
        ckpts = sorted((path / "checkpoints").glob("step-*"), reverse=True)
        for ckpt in ckpts:
            if (ckpt / META).is_file() and read_meta(ckpt).get("sha256") == sha256:
                return load_checkpoint(ckpt, "autoencoder", device)
    raise CheckpointError(
        f"the autoencoder that encoded these latents (sha256 {str(sha256)[:12]}, "
        f"run {run_hint}) is not in the run store",
        hint="copy that autoencoder run into the store, or pass --autoencoder RUN",
    )


def load_autoencoder_checked(
    ref: str | Path, prior: LoadedModel, device: torch.device
) -> LoadedModel:
    """An explicitly chosen autoencoder, refused if it did not make the latents."""
    loaded = load_autoencoder(ref, device)
    wanted = prior.meta.get("autoencoder", {}).get("sha256")
    if wanted and loaded.sha256 != wanted:
        raise CheckpointError(
            f"autoencoder {loaded.checkpoint} (sha256 {loaded.sha256[:12]}) is not the "
            f"one this prior was trained on (sha256 {wanted[:12]})",
            hint="drop --autoencoder to use the recorded one",
        )
    return loaded


def describe(loaded: LoadedModel) -> str:
    run = (
        read_run(loaded.run_path).name
        if (loaded.run_path / "run.json").exists()
        else "?"
    )
    return f"{run} (step {loaded.meta.get('step')}, sha256 {loaded.sha256[:12]})"
