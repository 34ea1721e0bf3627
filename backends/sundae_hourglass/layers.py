"""Transformer layers of the hourglass prior: pre-norm attention and MLP.

Axes: `b` batch, `n` flattened tokens, `d` model width, `g` attention heads, `e`
width of one head, `l` tokens inside one patch (s * s).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from sundae_hourglass.rotary import apply_rotary


class SelfAttention(nn.Module):
    """Non-causal multi-head self-attention with a fused qkv projection and 2D rotary.

    Uses `scaled_dot_product_attention`, so the fused (flash or memory-efficient)
    kernels run where the device has them.
    """

    def __init__(self, width: int, heads: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.heads = heads
        self.dropout = dropout
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(
        self, x: torch.Tensor, rotary: tuple[torch.Tensor, torch.Tensor]
    ) -> torch.Tensor:
        """(b, n, d) normed features, rotary tables (n, e) -> (b, n, d)."""
        qkv = rearrange(
            self.qkv(x), "b n (three g e) -> three b g n e", three=3, g=self.heads
        )
        query_key = apply_rotary(qkv[:2], *rotary)  # (2, b, g, n, e)
        out = F.scaled_dot_product_attention(
            query_key[0],
            query_key[1],
            qkv[2],
            dropout_p=self.dropout if self.training else 0.0,
        )
        return self.proj(rearrange(out, "b g n e -> b n (g e)"))


class MLP(nn.Sequential):
    """Two linear layers with a GELU between them: (..., d) -> (..., d)."""

    def __init__(self, width: int, ratio: float) -> None:
        hidden = int(round(width * ratio))
        super().__init__(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, width))


class TransformerLayer(nn.Module):
    """Pre-norm layer: x + attention(norm(x)), then x + mlp(norm(x))."""

    def __init__(
        self, width: int, heads: int, mlp_ratio: float, dropout: float = 0.0
    ) -> None:
        super().__init__()
        self.attention_norm = nn.LayerNorm(width)
        self.attention = SelfAttention(width, heads, dropout)
        self.mlp_norm = nn.LayerNorm(width)
        self.mlp = MLP(width, mlp_ratio)
        self.residual_dropout = nn.Dropout(dropout)

    def forward(
        self, x: torch.Tensor, rotary: tuple[torch.Tensor, torch.Tensor]
    ) -> torch.Tensor:
        """(b, n, d) -> (b, n, d)."""
        attended = self.attention(self.attention_norm(x), rotary)
        x = x + self.residual_dropout(attended)
        return x + self.residual_dropout(self.mlp(self.mlp_norm(x)))


class PatchAttention(nn.Module):
    """Attention restricted to one patch: queries and keys of the same patch only.

    Used by the "attention" resampling mode. No position embedding: the patch is
    tiny and its tokens already differ by the position-specific linear resampling.
    """

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.query_norm = nn.LayerNorm(width)
        self.key_norm = nn.LayerNorm(width)
        self.query = nn.Linear(width, width)
        self.key_value = nn.Linear(width, 2 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, queries: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        """Queries (b, n, l, d) attend to keys (b, n, l', d) of their patch n."""
        q = rearrange(
            self.query(self.query_norm(queries)),
            "b n l (g e) -> (b n) g l e",
            g=self.heads,
        )
        k, v = rearrange(
            self.key_value(self.key_norm(keys)),
            "b n l (two g e) -> two (b n) g l e",
            two=2,
            g=self.heads,
        )
        out = F.scaled_dot_product_attention(q, k, v)  # ((b n), g, l, e)
        out = rearrange(out, "(b n) g l e -> b n l (g e)", b=queries.shape[0])
        return self.proj(out)
