"""Shortening and upsampling between the levels of the hourglass.

Axes: `b` batch, `h w` grid height and width (of the shorter grid in patterns),
`n` flattened tokens, `d` model width, `s1 s2` position inside a patch, each of size
`s` (the shortening factor per axis), `l` tokens of one patch (s * s).

"2d" resampling merges each s x s patch of the grid (the paper's fix). "1d" merges runs
of s * s consecutive tokens of the row-major flattened grid (the original hourglass),
which shortens only the column axis. The 1D valley keeps a 2D grid for its rotary
positions where it can: when the width is a multiple of s * s every run lies inside
one row, so the valley is the (h, w / s^2) grid of run coordinates; otherwise runs
straddle rows and the valley is an (n / s^2, 1) column, i.e. 1D positions as the row
index with column 0.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from einops import rearrange
from torch import nn

from sundae_cli.errors import InputError
from sundae_hourglass.layers import PatchAttention

Resampling = Literal["2d", "1d"]


def shortened_grid(grid: tuple[int, int], s: int, mode: Resampling) -> tuple[int, int]:
    """Grid of the shorter level; assumes `grid` fits (see `plan_grids`)."""
    h, w = grid
    if mode == "2d":
        return h // s, w // s
    if w % (s * s) == 0:
        return h, w // (s * s)
    return h * w // (s * s), 1


def _fits(grid: tuple[int, int], s: int, mode: Resampling) -> bool:
    h, w = grid
    if mode == "2d":
        return h % s == 0 and w % s == 0
    return (h * w) % (s * s) == 0


def plan_grids(
    grid: tuple[int, int], shortenings: list[int], mode: Resampling
) -> list[tuple[int, int]]:
    """Grids of every level, outermost first; raise `InputError` where one won't fit."""
    grids = [grid]
    for level, s in enumerate(shortenings, start=1):
        current = grids[-1]
        if not _fits(current, s, mode):
            message = _misfit_message(grids, shortenings[:level], mode)
            raise InputError(message, hint=_hint())
        grids.append(shortened_grid(current, s, mode))
    return grids


def _misfit_message(
    grids: list[tuple[int, int]], shortenings: list[int], mode: Resampling
) -> str:
    (h, w), current = grids[0], grids[-1]
    level, s = len(shortenings), shortenings[-1]
    total = math.prod(shortenings)  # the grid must be a multiple of all factors
    what = f"grid {h}x{w}"
    if level > 1:
        what += f" (shortened to {current[0]}x{current[1]} before level {level})"
    if mode == "2d":
        return (
            f"{what} is not divisible by the shortening {s} at level {level}; use a "
            f"grid whose height and width are multiples of {total}"
        )
    return (
        f"{what} has {current[0] * current[1]} tokens, not divisible by the 1D "
        f"shortening run of {s * s} at level {level}; use a grid whose token count "
        f"is a multiple of {total * total}"
    )


def _hint() -> str:
    return "change the image size or --size so the token grid fits the prior"


def group_patches(
    x: torch.Tensor, grid: tuple[int, int], s: int, mode: Resampling
) -> torch.Tensor:
    """(b, n, d) tokens of `grid` -> (b, n / s^2, s^2, d) grouped by patch or run."""
    h, w = grid
    if mode == "2d":
        return rearrange(
            x, "b (h s1 w s2) d -> b (h w) (s1 s2) d", h=h // s, s1=s, w=w // s, s2=s
        )
    return rearrange(x, "b (n s1 s2) d -> b n (s1 s2) d", s1=s, s2=s)


def ungroup_patches(
    patches: torch.Tensor, grid: tuple[int, int], s: int, mode: Resampling
) -> torch.Tensor:
    """Inverse of `group_patches`: (b, n / s^2, s^2, d) -> (b, n, d) on `grid`."""
    h, w = grid
    if mode == "2d":
        return rearrange(
            patches,
            "b (h w) (s1 s2) d -> b (h s1 w s2) d",
            h=h // s,
            s1=s,
            w=w // s,
            s2=s,
        )
    return rearrange(patches, "b n (s1 s2) d -> b (n s1 s2) d", s1=s, s2=s)


class Shortening(nn.Module):
    """Merge each patch (or run) of s * s tokens into one: (b, n, d) -> (b, n/s^2, d).

    Linear mode concatenates the patch's features and projects them to d. Attention
    mode then adds attention from the merged token (query) over the patch's tokens.
    """

    def __init__(
        self, width: int, s: int, mode: Resampling, attention_heads: int | None
    ) -> None:
        super().__init__()
        self.s = s
        self.mode = mode
        self.proj = nn.Linear(s * s * width, width)
        self.attention = (
            PatchAttention(width, attention_heads) if attention_heads else None
        )

    def forward(self, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """(b, n, d) on `grid` -> (b, n / s^2, d) on the shorter grid."""
        patches = group_patches(x, grid, self.s, self.mode)  # (b, n', l, d)
        merged = self.proj(rearrange(patches, "b n l d -> b n (l d)"))  # (b, n', d)
        if self.attention is None:
            return merged
        attended = self.attention(merged[:, :, None], patches)  # (b, n', 1, d)
        return merged + attended[:, :, 0]


class Upsampling(nn.Module):
    """Spread each shortened token back over its patch, plus the level's residual.

    Linear mode projects d -> s^2 d and scatters the pieces to the patch's positions.
    Attention mode then adds self-attention among the s^2 tokens of each patch.
    """

    def __init__(
        self, width: int, s: int, mode: Resampling, attention_heads: int | None
    ) -> None:
        super().__init__()
        self.s = s
        self.mode = mode
        self.proj = nn.Linear(width, s * s * width)
        self.attention = (
            PatchAttention(width, attention_heads) if attention_heads else None
        )

    def forward(
        self, short: torch.Tensor, residual: torch.Tensor, grid: tuple[int, int]
    ) -> torch.Tensor:
        """Shortened (b, n/s^2, d) and residual (b, n, d) on `grid` -> (b, n, d)."""
        s = self.s
        pieces = rearrange(
            self.proj(short), "b n (s1 s2 d) -> b n (s1 s2) d", s1=s, s2=s
        )
        if self.attention is None:
            return residual + ungroup_patches(pieces, grid, s, self.mode)
        patches = pieces + group_patches(residual, grid, s, self.mode)
        patches = patches + self.attention(patches, patches)
        return ungroup_patches(patches, grid, s, self.mode)
