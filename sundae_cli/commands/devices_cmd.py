"""`sundae devices`."""

from __future__ import annotations

from typing import Annotated

import typer


def devices(
    json_: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Show CPU threads, CUDA devices with memory, MPS, and what `auto` picks."""
    import json

    from sundae_cli.console import result
    from sundae_cli.devices import describe_devices

    info = describe_devices()
    if json_:
        result(json.dumps(info, indent=2))
        return
    result(f"torch        {info['torch']}")
    result(
        f"cpu          {info['cpu_count']} cores, {info['cpu_threads']} torch threads"
    )
    for gpu in info["cuda"]:
        result(
            f"cuda:{gpu['index']}       {gpu['name']}, {gpu['memory_gib']} GiB, "
            f"compute {gpu['capability']}"
        )
    if not info["cuda"]:
        result("cuda         not available")
    result(f"mps          {'available' if info['mps'] else 'not available'}")
    result(f"auto         {info['auto_device']} ({info['auto_precision']})")
