"""The run store: one directory per training run, found again by name or recency.

Layout of a run directory:

    run.json          kind ("autoencoder" or "prior"), name, backend, creation time,
                      and for priors the autoencoder run (and sha256) that made the
                      latents, so later commands can decode
    recipe.toml       the fully resolved recipe the run was started with
    metrics.jsonl     one JSON object per logged step
    checkpoints/      step-XXXXXXXX/ directories (see sundae_cli.checkpoints)
    samples/          reconstruction or sample grids

Runs live under `platformdirs.user_data_dir("sundae")/runs`, or `$SUNDAE_HOME/runs`
when that variable is set; training commands take `--out DIR` for a run elsewhere.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sundae_cli.errors import CheckpointError
from sundae_cli.fsutil import write_text_atomic

KINDS = ("autoencoder", "prior")


def sundae_home() -> Path:
    """Root of everything sundae stores: `$SUNDAE_HOME` or the user data dir."""
    override = os.environ.get("SUNDAE_HOME")
    if override:
        return Path(override).expanduser()
    import platformdirs

    return Path(platformdirs.user_data_dir("sundae"))


def runs_root() -> Path:
    return sundae_home() / "runs"


@dataclass(frozen=True)
class RunInfo:
    """A run directory and its `run.json`."""

    path: Path
    info: dict[str, Any]

    @property
    def kind(self) -> str:
        return str(self.info.get("kind", "?"))

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def created(self) -> float:
        return float(self.info.get("created", 0.0))


def create_run(
    kind: str, recipe_name: str, info: dict[str, Any], out: Path | None = None
) -> RunInfo:
    """Make a new run directory (under the store, or exactly `out`) with run.json."""
    assert kind in KINDS
    if out is not None:
        path = Path(out)
        if path.exists() and not path.is_dir():
            raise CheckpointError(
                f"--out {path} is a file", hint="pass a new or empty folder to --out"
            )
        if (path / "run.json").exists():
            raise CheckpointError(
                f"{path} already holds a run",
                hint=f"resume it with --resume {path}, or pick another --out",
            )
    else:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        base = runs_root() / f"{kind}-{_slug(recipe_name)}-{stamp}"
        path, suffix = base, 1
        while path.exists():
            suffix += 1
            path = base.with_name(f"{base.name}-{suffix}")
    path.mkdir(parents=True, exist_ok=True)
    full = {"kind": kind, "recipe": recipe_name, "created": time.time(), **info}
    write_text_atomic(path / "run.json", json.dumps(full, indent=2) + "\n")
    return RunInfo(path, full)


def update_run_info(run: RunInfo, **changes: Any) -> RunInfo:
    info = {**run.info, **changes}
    write_text_atomic(run.path / "run.json", json.dumps(info, indent=2) + "\n")
    return RunInfo(run.path, info)


def _slug(text: str) -> str:
    cleaned = "".join(ch if ch.isalnum() or ch in "-_" else "-" for ch in text)
    return cleaned.strip("-") or "run"


def read_run(path: Path) -> RunInfo:
    """Read a run directory; anything without a readable run.json is an error."""
    info_path = Path(path) / "run.json"
    try:
        info = json.loads(info_path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise CheckpointError(
            f"{path} is not a sundae run (no run.json)",
            hint="see `sundae runs list` for the runs in the store",
        ) from exc
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{info_path} is unreadable: {exc}") from exc
    return RunInfo(Path(path), info)


def list_runs(kind: str | None = None) -> list[RunInfo]:
    """Runs in the store, newest first, optionally of one kind."""
    root = runs_root()
    runs = []
    if root.is_dir():
        for child in root.iterdir():
            if (child / "run.json").is_file():
                try:
                    run = read_run(child)
                except CheckpointError:
                    continue
                if kind is None or run.kind == kind:
                    runs.append(run)
    return sorted(runs, key=lambda run: (run.created, run.name), reverse=True)


def resolve_run(name_or_path: str | Path | None, kind: str) -> RunInfo:
    """A run given by path or by name in the store; None means the newest of `kind`."""
    if name_or_path is None:
        runs = list_runs(kind)
        if not runs:
            raise CheckpointError(
                f"no {kind} run in {runs_root()}",
                hint=f"train one (`sundae train {_train_cmd(kind)}`) or pass --model",
            )
        return runs[0]
    path = Path(name_or_path).expanduser()
    if not path.exists():
        path = runs_root() / str(name_or_path)
    if not path.exists():
        raise CheckpointError(
            f"no run {str(name_or_path)!r} (not a path, not in {runs_root()})",
            hint="see `sundae runs list`",
        )
    run = read_run(path)
    if run.kind != kind:
        raise CheckpointError(
            f"{path} is a {run.kind} run, but a {kind} run is needed here",
            hint=f"pass a {kind} run (see `sundae runs list`)",
        )
    return run


def _train_cmd(kind: str) -> str:
    return "vqgan" if kind == "autoencoder" else "prior"


def append_metrics(run_path: Path, record: dict[str, Any]) -> None:
    """Append one JSON line to the run's metrics log."""
    with open(run_path / "metrics.jsonl", "a", encoding="utf-8") as handle:
        handle.write(json.dumps(record) + "\n")
