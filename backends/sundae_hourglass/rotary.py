"""2D axial rotary position embeddings for token grids.

Axes: `b` batch, `h w` grid height and width, `n` flattened tokens (row-major),
`g` attention heads, `e` width of one head.

Each head's `e` features form `e / 2` rotated pairs (feature j with feature j + e/2,
the "rotate half" layout). The first half of the pairs turns with the row index, the
second half with the column index, each with its own geometric set of `e / 4`
frequencies `base ** (-i / (e / 4))`. The score q . k between two positions then
depends only on their row offset and column offset, separately, for every head.
"""

from __future__ import annotations

import torch
from einops import rearrange, repeat
from torch import nn

MAX_CACHED_GRIDS = 16  # distinct (grid, device, dtype) tables kept; a few in practice


def axial_angles(grid: tuple[int, int], head_dim: int, base: float) -> torch.Tensor:
    """Rotation angles (n, e/2) float64 for the positions of a grid (h, w).

    Computed in float64 on the CPU so large positions keep their precision.
    """
    h, w = grid
    pairs_per_axis = head_dim // 4
    exponents = torch.arange(pairs_per_axis, dtype=torch.float64) / pairs_per_axis
    frequencies = base**-exponents  # (e/4,)
    rows = repeat(torch.arange(h, dtype=torch.float64), "h -> (h w)", w=w)
    cols = repeat(torch.arange(w, dtype=torch.float64), "w -> (h w)", h=h)
    row_angles = rows[:, None] * frequencies  # (n, e/4)
    col_angles = cols[:, None] * frequencies  # (n, e/4)
    return torch.cat((row_angles, col_angles), dim=-1)  # (n, e/2)


def apply_rotary(
    x: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor
) -> torch.Tensor:
    """Rotate (..., n, e) queries or keys by the tables of `AxialRotary`.

    With x = [x1, x2] split in halves: [x1 cos - x2 sin, x2 cos + x1 sin].
    """
    x1, x2 = x.chunk(2, dim=-1)
    swapped = torch.cat((x2, x1), dim=-1)
    return torch.addcmul(x * cos, swapped, sin_signed)


class AxialRotary(nn.Module):
    """Cached cos / signed-sin tables (n, e) of the 2D rotary embedding per grid.

    The tables depend only on the grid, device and dtype, so each is computed once
    and kept (not saved with the weights).
    """

    def __init__(self, head_dim: int, base: float = 10000.0) -> None:
        super().__init__()
        if head_dim % 4 != 0:
            raise ValueError(f"head width {head_dim} must be a multiple of 4")
        self.head_dim = head_dim
        self.base = base
        self._cache: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    def forward(
        self, grid: tuple[int, int], device: torch.device, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (cos, sin_signed), each (n, e) in `dtype` on `device`."""
        key = (grid, str(device), dtype)
        tables = self._cache.get(key)
        if tables is None:
            if len(self._cache) >= MAX_CACHED_GRIDS:
                self._cache.clear()
            # Built outside inference mode so that tables first made while sampling
            # can still be saved for backward by a later training step.
            with torch.inference_mode(False):
                tables = self._build(grid, device, dtype)
            self._cache[key] = tables
        return tables

    def _build(
        self, grid: tuple[int, int], device: torch.device, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        angles = axial_angles(grid, self.head_dim, self.base)  # (n, e/2)
        cos = rearrange([angles.cos(), angles.cos()], "two n e -> n (two e)")
        sin_signed = rearrange([-angles.sin(), angles.sin()], "two n e -> n (two e)")
        return (
            cos.to(device=device, dtype=dtype).contiguous(),
            sin_signed.to(device=device, dtype=dtype).contiguous(),
        )
