"""Entry point of the hourglass prior backend (`sundae.priors` group).

Imports no torch: the network is built by `sundae_hourglass.model:build_prior` only
when a command needs it.
"""

from __future__ import annotations

from sundae_cli.plugins import PriorBackend
from sundae_hourglass.config import HourglassConfig

# Model sizes per resolution preset. The paper's models use 8 heads at width 1024,
# i.e. 128-wide heads, so the presets set heads=8 explicitly; a recipe that leaves
# `heads` out of its own config still gets these, and a config with no preset gets the
# 64-wide default.
PRESETS = {
    # Paper, 256 px (f=16, 1024 codes, 16x16 grid): about 178M parameters.
    "256": {"width": 1024, "depth": [2, 10, 2], "heads": 8, "shortening": 2},
    # Not in the paper: our choice, the 256 px model reused for a 32x32 grid.
    "512": {"width": 1024, "depth": [2, 10, 2], "heads": 8, "shortening": 2},
    # Paper, 1024 px (f=32, 8192 codes, 32x32 grid, 16x16 valley): about 214M.
    "1024": {"width": 1024, "depth": [3, 10, 3], "heads": 8, "shortening": 2},
    # Small CPU models with 64-wide heads.
    "cpu32": {"width": 128, "depth": [2, 4, 2], "heads": 2, "shortening": 2},
    "cpu64": {"width": 192, "depth": [2, 4, 2], "heads": 3, "shortening": 2},
}

backend = PriorBackend(
    name="hourglass",
    config_model=HourglassConfig,
    factory="sundae_hourglass.model:build_prior",
    presets=PRESETS,
    description="2D-aware hourglass transformer trained with the SUNDAE objective",
)
