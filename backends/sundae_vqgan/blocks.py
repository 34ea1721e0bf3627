"""Building blocks of the VQ-GAN encoder and decoder, in taming's parameter layout.

Attribute names (`norm1`, `conv1`, `nin_shortcut`, `q`, `k`, `v`, `proj_out`, `conv`)
are those of taming-transformers' `ResnetBlock`, `AttnBlock`, `Downsample` and
`Upsample`, so their checkpoints load without renaming.

Axes: b batch, c channels, h w feature-map height and width, n flattened positions.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

TAMING_GROUPS = 32


def group_norm(channels: int) -> nn.GroupNorm:
    """GroupNorm with taming's 32 groups, eps 1e-6 and affine parameters.

    Deviation: taming always uses 32 groups, which needs channels divisible by 32. For
    small CPU models whose widths are not, we use gcd(32, channels) groups; for every
    width taming supports this is exactly 32, so its checkpoints behave identically.
    """
    groups = math.gcd(TAMING_GROUPS, channels)
    return nn.GroupNorm(num_groups=groups, num_channels=channels, eps=1e-6, affine=True)


def swish(x: torch.Tensor) -> torch.Tensor:
    """x * sigmoid(x), taming's nonlinearity."""
    return x * torch.sigmoid(x)


class ResnetBlock(nn.Module):
    """Two norm-swish-conv steps plus a (1x1-projected when widths differ) shortcut."""

    def __init__(self, in_channels: int, out_channels: int, dropout: float) -> None:
        super().__init__()
        self.norm1 = group_norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = group_norm(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1)
        else:
            self.nin_shortcut = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(b, c_in, h, w) -> (b, c_out, h, w)."""
        hidden = self.conv1(swish(self.norm1(x)))
        hidden = self.conv2(self.dropout(swish(self.norm2(hidden))))
        return self.nin_shortcut(x) + hidden


class AttnBlock(nn.Module):
    """Single-head self-attention over all positions of a feature map, residual."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.norm = group_norm(channels)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(b, c, h, w) -> (b, c, h, w); works for any h, w."""
        h, w = x.shape[-2:]
        normed = self.norm(x)

        # One head of width c; scaled_dot_product_attention scales by c ** -0.5 as
        # taming does.
        q, k, v = (
            rearrange(proj(normed), "b c h w -> b 1 (h w) c")
            for proj in (self.q, self.k, self.v)
        )
        attended = F.scaled_dot_product_attention(q, k, v)  # (b, 1, n, c)
        attended = rearrange(attended, "b 1 (h w) c -> b c h w", h=h, w=w)
        return x + self.proj_out(attended)


class Downsample(nn.Module):
    """Halve h and w: pad right and bottom by one, then a 3x3 stride-2 convolution."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(b, c, h, w) -> (b, c, h/2, w/2)."""
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Double h and w: nearest-neighbour repeat, then a 3x3 convolution."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(b, c, h, w) -> (b, c, 2h, 2w)."""
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Level(nn.Module):
    """One resolution level: residual blocks, optional attention, optional resampler.

    Holds `block`, `attn` and `downsample` / `upsample` exactly where taming's anonymous
    level modules do; an empty `attn` list adds no state-dict keys.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        num_blocks: int,
        use_attention: bool,
        dropout: float,
    ) -> None:
        super().__init__()
        widths = [in_channels] + [out_channels] * num_blocks
        self.block = nn.ModuleList(
            ResnetBlock(c_in, c_out, dropout)
            for c_in, c_out in zip(widths[:-1], widths[1:], strict=True)
        )
        self.attn = nn.ModuleList(
            AttnBlock(out_channels) for _ in range(num_blocks if use_attention else 0)
        )

    def run_blocks(self, x: torch.Tensor) -> torch.Tensor:
        """Residual blocks, each followed by its attention block when there is one."""
        for index, block in enumerate(self.block):
            x = block(x)
            if len(self.attn) > 0:
                x = self.attn[index](x)
        return x


class MidBlock(nn.Module):
    """ResnetBlock, attention, ResnetBlock at the lowest resolution (taming's `mid`)."""

    def __init__(self, channels: int, dropout: float) -> None:
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, dropout)
        self.attn_1 = AttnBlock(channels)
        self.block_2 = ResnetBlock(channels, channels, dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(b, c, h, w) -> (b, c, h, w)."""
        return self.block_2(self.attn_1(self.block_1(x)))
