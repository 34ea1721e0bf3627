"""Checkpoints: weights in safetensors, metadata in JSON, training state for resume.

A checkpoint is a directory `checkpoints/step-XXXXXXXX/` holding

    model.safetensors   the weights used for inference (EMA weights for priors)
    state.pt            training state: raw weights, optimisers, schedulers, RNG states,
                        data position; tensors and plain containers only, so it loads
                        with `torch.load(weights_only=True)` and never unpickles code
    meta.json           step, sha256 of model.safetensors, the resolved recipe, versions

The directory is assembled under a temporary name and renamed into place, so a crash
or a full disk never leaves a checkpoint that looks complete; `latest_checkpoint` only
ever returns complete ones (meta.json present and the weights' sha256 matching).
"""

from __future__ import annotations

import json
import logging
import platform
import re
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sundae_cli.errors import CheckpointError
from sundae_cli.fsutil import atomic_directory, make_shareable, sha256_file

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

WEIGHTS = "model.safetensors"
STATE = "state.pt"
META = "meta.json"
_STEP_DIR = re.compile(r"^step-(\d{8})$")


def versions() -> dict[str, str]:
    import torch

    import sundae_cli

    return {
        "sundae": sundae_cli.__version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
    }


def save_checkpoint(
    run_path: Path,
    step: int,
    weights: dict[str, torch.Tensor],
    state: dict[str, Any] | None,
    meta: dict[str, Any],
    keep: int = 3,
) -> Path:
    """Write a complete checkpoint atomically and prune all but the newest `keep`."""
    import torch
    from safetensors.torch import save_file

    final = run_path / "checkpoints" / f"step-{step:08d}"
    if final.exists():
        shutil.rmtree(final)
    with atomic_directory(final) as tmp:
        tensors = {k: v.detach().contiguous().cpu() for k, v in weights.items()}
        save_file(tensors, str(tmp / WEIGHTS))
        make_shareable(tmp / WEIGHTS)  # safetensors writes it 0600
        if state is not None:
            torch.save(state, tmp / STATE)
        full_meta = {
            "step": step,
            "sha256": sha256_file(tmp / WEIGHTS),
            "versions": versions(),
            **meta,
        }
        (tmp / META).write_text(json.dumps(full_meta, indent=2) + "\n")
    _prune(run_path / "checkpoints", keep)
    return final


def _prune(folder: Path, keep: int) -> None:
    complete = _step_dirs(folder)
    for old in complete[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)


def _step_dirs(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    dirs = [p for p in folder.iterdir() if p.is_dir() and _STEP_DIR.match(p.name)]
    return sorted(dirs, key=lambda p: p.name)


def is_complete(ckpt: Path) -> bool:
    """meta.json exists and the weights hash to the recorded sha256."""
    try:
        meta = json.loads((ckpt / META).read_text())
        return sha256_file(ckpt / WEIGHTS) == meta.get("sha256")
    except (OSError, json.JSONDecodeError):
        return False


def latest_checkpoint(run_path: Path) -> Path | None:
    """The newest complete checkpoint of a run, skipping partial or corrupt ones."""
    for ckpt in reversed(_step_dirs(run_path / "checkpoints")):
        if is_complete(ckpt):
            return ckpt
        log.warning("skipping incomplete checkpoint %s", ckpt)
    return None


def require_checkpoint(run_path: Path) -> Path:
    ckpt = latest_checkpoint(run_path)
    if ckpt is None:
        raise CheckpointError(
            f"run {run_path} has no complete checkpoint",
            hint="train it further (or resume it with --resume) before using it",
        )
    return ckpt


def read_meta(ckpt: Path) -> dict[str, Any]:
    try:
        return json.loads((ckpt / META).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{ckpt / META} is unreadable: {exc}") from exc


def load_weights(ckpt: Path, device: str | torch.device = "cpu") -> dict[str, Any]:
    """Load model.safetensors after checking its sha256 against meta.json."""
    from safetensors.torch import load_file

    meta = read_meta(ckpt)
    if sha256_file(ckpt / WEIGHTS) != meta.get("sha256"):
        raise CheckpointError(
            f"{ckpt / WEIGHTS} does not match the sha256 in {ckpt / META}",
            hint="the file was changed or cut short; use an earlier checkpoint",
        )
    return load_file(str(ckpt / WEIGHTS), device=str(device))


def load_state(ckpt: Path) -> dict[str, Any]:
    """Load state.pt with `weights_only=True` (no arbitrary unpickling)."""
    import torch

    path = ckpt / STATE
    if not path.is_file():
        raise CheckpointError(
            f"{ckpt} has no training state ({STATE})",
            hint="this checkpoint can be used for inference but not resumed",
        )
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt zip, foreign pickle: all mean "cannot resume"
        raise CheckpointError(f"{path} is unreadable: {exc}") from exc


def weights_sha256(ckpt: Path) -> str:
    return str(read_meta(ckpt)["sha256"])
