"""The 2D-aware hourglass transformer prior (McKinney and Willcocks 2022).

Axes: `b` batch, `h w` grid height and width, `n` flattened tokens (row-major),
`d` model width, `k` codebook size.

A non-causal transformer over the flattened token grid. Each level runs some layers
at its resolution, shortens the grid (s x s patches merge into one token), runs the
next level on the shorter grid, upsamples back, adds the residual from before the
shortening and runs more layers. Positions enter only through 2D axial rotary
embeddings (`sundae_hourglass.rotary`), so grids need not be square and the model
runs on any grid whose sides are multiples of the shortening factors.

Deviation: the merged-patch resampling keeps the original hourglass's "linear" form
(concatenate, project), but applies no causal shift: the SUNDAE prior is non-causal.
The "attention" resampling mode is patch-local (see `resampling`), not the original
hourglass's attention over the whole shortened sequence.

Sizes: the "256" preset has 186.8M parameters with 1024 codes and the "1024" preset
226.7M with 8192 codes; the paper quotes about 178M and 214M. Without our two
resampling projections (4 d^2 each) the first is 178.4M, so the paper's count
probably leaves them out or uses a lighter resampling; the second is then 218.3M.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from einops import rearrange
from torch import nn

from sundae_cli.errors import InputError
from sundae_hourglass.config import HourglassConfig
from sundae_hourglass.layers import TransformerLayer
from sundae_hourglass.resampling import Shortening, Upsampling, plan_grids
from sundae_hourglass.rotary import AxialRotary

log = logging.getLogger(__name__)

INIT_STD = 0.02  # GPT-2 style initialisation of linear and embedding weights


def _layers(config: HourglassConfig, count: int) -> nn.ModuleList:
    return nn.ModuleList(
        TransformerLayer(
            config.width, config.num_heads, config.mlp_ratio, config.dropout
        )
        for _ in range(count)
    )


class HourglassLevel(nn.Module):
    """One level: pre layers, then (if nested) shorten, inner level, upsample, post.

    `depth` is a normalised spec: `[n]` (layers only) or `[pre, inner, post]`.
    """

    def __init__(self, config: HourglassConfig, depth: list[Any], level: int) -> None:
        super().__init__()
        self.pre = _layers(config, depth[0])
        self.inner: HourglassLevel | None = None
        if len(depth) == 1:
            return
        inner_depth = depth[1] if isinstance(depth[1], list) else [depth[1]]
        s = config.level_shortenings[level]
        heads = config.num_heads if config.resampling_mode == "attention" else None
        self.shorten = Shortening(config.width, s, config.resampling, heads)
        self.inner = HourglassLevel(config, inner_depth, level + 1)
        self.upsample = Upsampling(config.width, s, config.resampling, heads)
        self.post = _layers(config, depth[2])

    def forward(
        self, x: torch.Tensor, grids: list[tuple[int, int]], rotary: AxialRotary
    ) -> torch.Tensor:
        """(b, n, d) on grids[0] -> (b, n, d); grids[1:] are the inner levels'."""
        grid = grids[0]
        tables = rotary(grid, x.device, x.dtype) if len(self.pre) else None
        for layer in self.pre:
            x = layer(x, tables)
        if self.inner is None:
            return x

        residual = x
        short = self.shorten(x, grid)  # (b, n / s^2, d)
        short = self.inner(short, grids[1:], rotary)
        x = self.upsample(short, residual, grid)  # (b, n, d)

        if len(self.post):
            tables = rotary(grid, x.device, x.dtype)
        for layer in self.post:
            x = layer(x, tables)
        return x


class HourglassPrior(nn.Module):
    """Token grid (b, h, w) int64 [+ class labels (b,)] -> logits (b, h, w, k).

    Satisfies `sundae_cli.plugins.Prior`.
    """

    def __init__(self, config: HourglassConfig, codebook_size: int) -> None:
        super().__init__()
        if codebook_size < 2:
            raise InputError(f"codebook size must be >= 2, got {codebook_size}")
        self.config = config
        self.codebook_size = codebook_size
        self.num_classes = config.num_classes
        self.token_embedding = nn.Embedding(codebook_size, config.width)
        self.class_embedding = (
            nn.Embedding(config.num_classes, config.width)
            if config.num_classes
            else None
        )
        self.rotary = AxialRotary(config.head_dim, config.rotary_base)
        self.body = HourglassLevel(config, config.depth, level=0)
        self.final_norm = nn.LayerNorm(config.width)
        self.to_logits = nn.Linear(config.width, codebook_size)
        self.apply(_init_weights)

    def forward(
        self, tokens: torch.Tensor, class_labels: torch.Tensor | None = None
    ) -> torch.Tensor:
        """(b, h, w) int64 tokens [, (b,) int64 labels] -> (b, h, w, k) logits."""
        grid = self._check_inputs(tokens, class_labels)
        grids = plan_grids(grid, self.config.level_shortenings, self.config.resampling)
        x = self._embed(tokens, class_labels)  # (b, n, d)
        x = self.body(x, grids, self.rotary)
        return self._logits(x, grid)

    def _check_inputs(
        self, tokens: torch.Tensor, class_labels: torch.Tensor | None
    ) -> tuple[int, int]:
        if tokens.ndim != 3 or tokens.dtype.is_floating_point:
            raise InputError(
                f"the prior takes integer token grids (b, h, w), got {tokens.dtype} "
                f"of shape {tuple(tokens.shape)}"
            )
        if self.num_classes and class_labels is None:
            raise InputError(
                f"this prior is class-conditional ({self.num_classes} classes) and "
                "needs class labels",
                hint="pass --class LABEL",
            )
        if not self.num_classes and class_labels is not None:
            raise InputError(
                "this prior is unconditional but class labels were given",
                hint="drop --class, or use a prior trained with num_classes > 0",
            )
        return tokens.shape[1], tokens.shape[2]

    def _embed(
        self, tokens: torch.Tensor, class_labels: torch.Tensor | None
    ) -> torch.Tensor:
        x = self.token_embedding(rearrange(tokens, "b h w -> b (h w)"))  # (b, n, d)
        if self.class_embedding is not None and class_labels is not None:
            x = x + self.class_embedding(class_labels)[:, None, :]
        return x

    def _logits(self, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        logits = self.to_logits(self.final_norm(x))  # (b, n, k)
        return rearrange(logits, "b (h w) k -> b h w k", h=grid[0], w=grid[1])


def _init_weights(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        nn.init.normal_(module.weight, std=INIT_STD)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Embedding):
        nn.init.normal_(module.weight, std=INIT_STD)


def build_prior(config: HourglassConfig, *, codebook_size: int) -> HourglassPrior:
    """Build the prior of `config` for a codebook of `codebook_size` codes."""
    model = HourglassPrior(config, codebook_size)
    log.debug(
        "hourglass prior: width %d, depth %s, %d heads, %d parameters",
        config.width,
        config.depth,
        config.num_heads,
        count_parameters(model),
    )
    return model


def count_parameters(module: nn.Module) -> int:
    """Number of distinct parameters of `module` (works on the meta device)."""
    return sum(parameter.numel() for parameter in module.parameters())
