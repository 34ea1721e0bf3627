"""Resolution presets: defaults a recipe gets from `resolution = "..."`.

A preset fills the data geometry and sampling defaults here; the model sizes for each
backend come from that backend's own `presets` table (see `sundae_cli.plugins`).
Explicit recipe fields and `--set` overrides always win over a preset.

Paper settings (McKinney and Willcocks 2022): 256 px uses a f=16 VQ-GAN with 1024 codes
(16x16 grid) and samples at temperature 0.8; 1024 px uses f=32 with 8192 codes (32x32
grid) and temperature 0.7; both update half of the tokens per step for 100 steps.
"""

from __future__ import annotations

from typing import Any

RESOLUTION_PRESETS: dict[str, dict[str, Any]] = {
    "256": {
        "data": {"image_size": 256},
        "sampling": {"temperature": 0.8, "proportion": 0.5, "steps": 100},
    },
    "512": {
        "data": {"image_size": 512},
        "sampling": {"temperature": 0.8, "proportion": 0.5, "steps": 100},
    },
    "1024": {
        "data": {"image_size": 1024},
        "sampling": {"temperature": 0.7, "proportion": 0.5, "steps": 100},
    },
    # Small presets sized for a laptop CPU (f=4 and f=8 autoencoders).
    "cpu32": {
        "data": {"image_size": 32},
        "sampling": {"temperature": 0.8, "proportion": 0.5, "steps": 50},
    },
    "cpu64": {
        "data": {"image_size": 64},
        "sampling": {"temperature": 0.8, "proportion": 0.5, "steps": 50},
    },
}


def deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """Return `base` updated by `override`, merging nested tables key by key."""
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged
