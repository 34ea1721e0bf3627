"""One place for terminal output: results to stdout, everything else to stderr.

Consoles are created on demand against the *current* `sys.stdout`/`sys.stderr`, so
output lands where Typer's test runner (or a redirect) expects it.
"""

from __future__ import annotations

import logging
import sys

from rich.console import Console

from sundae_cli.errors import SundaeError

_state = {"debug": False, "verbosity": 0}


def err_console() -> Console:
    """The console for progress, logs, warnings and errors (stderr)."""
    return Console(file=sys.stderr, soft_wrap=True, highlight=False)


def out_console() -> Console:
    """The console for results (stdout): paths written, tables, JSON."""
    return Console(file=sys.stdout, soft_wrap=True, highlight=False)


def result(text: str) -> None:
    """Print one result line on stdout, without markup interpretation."""
    print(text, file=sys.stdout, flush=True)


def setup_logging(verbosity: int = 0, debug: bool = False) -> None:
    """Route all `sundae*` loggers through one Rich handler on stderr.

    verbosity: -1 quiet (warnings and errors), 0 normal (info), 1+ verbose (debug).
    """
    from rich.logging import RichHandler

    _state["debug"] = debug
    _state["verbosity"] = verbosity
    level = logging.DEBUG if (verbosity > 0 or debug) else logging.INFO
    if verbosity < 0:
        level = logging.WARNING
    handler = RichHandler(
        console=err_console(),
        show_time=False,
        show_path=debug,
        markup=False,
        rich_tracebacks=debug,
    )
    for name in ("sundae_cli", "sundae_vqgan", "sundae_hourglass"):
        logger = logging.getLogger(name)
        logger.handlers = [handler]
        logger.setLevel(level)
        logger.propagate = False


def is_debug() -> bool:
    return bool(_state["debug"])


def is_quiet() -> bool:
    return int(_state["verbosity"]) < 0


def report_error(error: SundaeError) -> None:
    """Print `error: ...` (plus one line per problem) and `hint: ...` on stderr."""
    console = err_console()
    console.print(f"[bold red]error:[/] {error.message}", markup=True, highlight=False)
    for problem in getattr(error, "problems", []) or []:
        console.print(f"  {problem}", markup=False)
    if error.hint:
        console.print(f"[bold]hint:[/] {error.hint}", markup=True, highlight=False)
