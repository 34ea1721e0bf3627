"""The `sundae` command-line program: global flags, command groups, error boundary.

Command modules import only Typer at module level; torch, h5py and the backends are
imported inside command bodies so that `sundae --help` stays fast.
"""

from __future__ import annotations

from typing import Annotated

import typer
from typer.core import TyperGroup

from sundae_cli import __version__
from sundae_cli.commands import (
    backends_cmd,
    data_cmd,
    devices_cmd,
    encode_cmd,
    eval_cmd,
    import_cmd,
    latents_cmd,
    recipes_cmd,
    runs_cmd,
    sample_cmd,
    train_cmd,
)
from sundae_cli.console import is_debug, report_error, setup_logging
from sundae_cli.errors import EXIT_INTERRUPTED, SundaeError


class SundaeGroup(TyperGroup):
    """The top-level group: turns `SundaeError` and Ctrl-C into exit codes."""

    def invoke(self, ctx):  # type: ignore[no-untyped-def]
        try:
            return super().invoke(ctx)
        except SundaeError as error:
            if is_debug():
                raise
            report_error(error)
            ctx.exit(error.exit_code)
        except KeyboardInterrupt:
            typer.echo("interrupted", err=True)
            ctx.exit(EXIT_INTERRUPTED)
        except OSError as error:  # a path problem no check above foresaw
            if is_debug() or isinstance(error, BrokenPipeError):  # `| head`
                raise
            where = f"{error.filename}: " if error.filename else ""
            report_error(
                SundaeError(
                    f"{where}{error.strerror or error}",
                    hint="check the path and its permissions (--debug for details)",
                )
            )
            ctx.exit(SundaeError.exit_code)


app = typer.Typer(
    name="sundae",
    cls=SundaeGroup,
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    help="Fast two-stage image generation: VQ-GAN + SUNDAE hourglass prior.",
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"sundae {__version__}")
        raise typer.Exit()


@app.callback()
def _global_options(
    verbose: Annotated[
        int, typer.Option("--verbose", "-v", count=True, help="More log output.")
    ] = 0,
    quiet: Annotated[
        bool, typer.Option("--quiet", "-q", help="Only warnings and errors.")
    ] = False,
    debug: Annotated[
        bool, typer.Option("--debug", help="Show tracebacks for errors.")
    ] = False,
    version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_version, is_eager=True, help="Print version."
        ),
    ] = False,
) -> None:
    """Global options apply to every command."""
    setup_logging(-1 if quiet else verbose, debug)


app.add_typer(recipes_cmd.app, name="recipes")
app.add_typer(backends_cmd.app, name="backends")
app.add_typer(runs_cmd.app, name="runs")
app.add_typer(train_cmd.app, name="train")
app.add_typer(data_cmd.app, name="data")
app.add_typer(latents_cmd.app, name="latents")
app.add_typer(import_cmd.app, name="import")
app.command("encode")(encode_cmd.encode)
app.add_typer(eval_cmd.app, name="eval")
app.command("sample")(sample_cmd.sample)
app.command("generate")(sample_cmd.generate)
app.command("inpaint")(sample_cmd.inpaint)
app.command("devices")(devices_cmd.devices)


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point."""
    app(args=argv, prog_name="sundae")
