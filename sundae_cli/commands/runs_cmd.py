"""`sundae runs list|show`."""

from __future__ import annotations

from typing import Annotated

import typer

app = typer.Typer(no_args_is_help=True, help="Inspect training runs in the run store.")


@app.command("list")
def list_(
    kind: Annotated[
        str | None, typer.Option(help="Only runs of this kind: autoencoder or prior.")
    ] = None,
) -> None:
    """List runs, newest first, with their latest checkpoint step."""
    import time

    from sundae_cli.checkpoints import latest_checkpoint, read_meta
    from sundae_cli.console import err_console, result
    from sundae_cli.runs import list_runs, runs_root

    runs = list_runs(kind)
    if not runs:
        err_console().print(f"no runs in {runs_root()}")
    for run in runs:
        ckpt = latest_checkpoint(run.path)
        step = read_meta(ckpt)["step"] if ckpt else "-"
        created = time.strftime("%Y-%m-%d %H:%M", time.localtime(run.created))
        result(f"{run.name}\t{run.kind}\tstep {step}\t{created}\t{run.path}")


@app.command("show")
def show(
    run: Annotated[str, typer.Argument(help="Run name (in the store) or path.")],
) -> None:
    """Print a run's info, its checkpoints and its last metrics as JSON."""
    import json
    from pathlib import Path

    from sundae_cli.checkpoints import latest_checkpoint, read_meta
    from sundae_cli.console import result
    from sundae_cli.errors import CheckpointError
    from sundae_cli.runs import read_run, runs_root

    path = Path(run) if Path(run).exists() else runs_root() / run
    if not path.exists():
        raise CheckpointError(f"no run {run!r}", hint="see `sundae runs list`")
    info = read_run(path)
    ckpt = latest_checkpoint(path)
    metrics = path / "metrics.jsonl"
    last = metrics.read_text().strip().splitlines()[-1:] if metrics.exists() else []
    report = {
        "path": str(path),
        **info.info,
        "latest_checkpoint": str(ckpt) if ckpt else None,
        "step": read_meta(ckpt)["step"] if ckpt else None,
        "last_metrics": json.loads(last[0]) if last else None,
    }
    result(json.dumps(report, indent=2))
