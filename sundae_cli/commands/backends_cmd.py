"""`sundae backends list`."""

from __future__ import annotations

import typer

app = typer.Typer(no_args_is_help=True, help="Inspect autoencoder and prior backends.")


@app.command("list")
def list_() -> None:
    """Print group, name, distribution, version and whether each backend loads."""
    from rich.table import Table

    from sundae_cli.console import out_console
    from sundae_cli.errors import BackendError
    from sundae_cli.plugins import GROUPS, discover, load_entry

    table = Table("group", "name", "distribution", "version", "status")
    for group in GROUPS:
        try:
            entries = discover(group)
        except BackendError as exc:
            table.add_row(group, "-", "-", "-", f"error: {exc.message}")
            continue
        for entry in entries.values():
            try:
                load_entry(entry)
                status = "ok"
            except BackendError as exc:
                status = f"error: {exc.message}"
            table.add_row(group, entry.name, entry.distribution, entry.version, status)
    out_console().print(table)
