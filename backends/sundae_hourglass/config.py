"""Configuration of the 2D-aware hourglass prior.

This module must not import torch: the plugin entry point imports it to validate a
recipe, and `sundae --help` and recipe checks stay fast.

The `depth` list describes the hourglass: `[2, 10, 2]` is two layers at full
resolution, a shortened level of ten layers, then two full-resolution layers;
`[2, [2, 4, 2], 2]` nests a second shortening inside the first; `[12]` (or `12`) is a
flat transformer with no shortening at all, the baseline of the paper's ablations.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictInt,
    field_validator,
    model_validator,
)

DEPTH_HINT = "write depth as [layers] or [pre, inner, post], e.g. [2, 10, 2]"


def _check_layer_count(value: Any, where: str, minimum: int) -> int:
    """Return `value` if it is a plain int >= minimum; floats and bools are errors."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(
            f"{where} must be a whole number of layers, got {value!r}; {DEPTH_HINT}"
        )
    if value < minimum:
        raise ValueError(f"{where} must be >= {minimum}, got {value}")
    return value


def parse_depth(value: Any, where: str = "depth") -> list[Any]:
    """Validate a depth spec and normalise it to `[n]` or `[pre, inner, post]`.

    A nested `inner` written as `[n]` is normalised to `n`.
    """
    if not isinstance(value, list | tuple):
        return [_check_layer_count(value, where, 1)]
    items = list(value)
    if len(items) == 1:
        return [_check_layer_count(items[0], f"{where}[0]", 1)]
    if len(items) != 3:
        raise ValueError(f"{where} has {len(items)} entries; {DEPTH_HINT}")
    pre = _check_layer_count(items[0], f"{where}[0]", 0)
    post = _check_layer_count(items[2], f"{where}[2]", 0)
    inner = parse_depth(items[1], f"{where}[1]")
    return [pre, inner[0] if len(inner) == 1 else inner, post]


def count_levels(depth: list[Any]) -> int:
    """Number of shortenings in a normalised depth spec (0 for a flat transformer)."""
    if len(depth) == 1:
        return 0
    inner = depth[1]
    return 1 + (count_levels(inner) if isinstance(inner, list) else 0)


class HourglassConfig(BaseModel):
    """Hyper-parameters of `sundae_hourglass.model.HourglassPrior`.

    Defaults are the paper's 256 px model except `heads`, which defaults to 64-wide
    heads (the resolution presets set the paper's 8 heads explicitly).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    # Model width d: features per token at every level of the hourglass.
    width: StrictInt = Field(default=1024, ge=8)
    # Layers per level: [n], or [pre, inner, post] where inner nests (see module doc).
    depth: list[Any] = Field(default_factory=lambda: [2, 10, 2])
    # Attention heads; None means width // 64 (64-wide heads). Heads are width // heads
    # wide, and that must be a multiple of 4 for the 2D rotary embedding.
    heads: StrictInt | None = Field(default=None, ge=1)
    # Shortening factor s per axis: one value for all levels or one per level.
    shortening: StrictInt | list[StrictInt] = 2
    # "2d" merges s x s patches of the grid (the paper); "1d" merges runs of s*s
    # consecutive tokens of the row-major flattened grid (the original hourglass).
    resampling: Literal["2d", "1d"] = "2d"
    # "linear": concatenate and project; "attention": also attend within each patch.
    resampling_mode: Literal["linear", "attention"] = "linear"
    # Hidden width of the MLP as a multiple of `width`.
    mlp_ratio: float = Field(default=4.0, gt=0)
    # Dropout on attention weights and residual branches while training.
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0)
    # 0 = unconditional; else a learned class embedding is added at every position.
    num_classes: StrictInt = Field(default=0, ge=0)
    # Base of the rotary frequencies (as in RoFormer).
    rotary_base: float = Field(default=10000.0, gt=1.0)

    @field_validator("depth", mode="before")
    @classmethod
    def _parse_depth(cls, value: Any) -> list[Any]:
        return parse_depth(value)

    @field_validator("shortening")
    @classmethod
    def _check_shortening(cls, value: int | list[int]) -> int | list[int]:
        for factor in value if isinstance(value, list) else [value]:
            if factor < 2:
                raise ValueError(f"shortening factors must be >= 2, got {factor}")
        return value

    @model_validator(mode="after")
    def _check_consistency(self) -> HourglassConfig:
        if self.heads is None and self.width % 64 != 0:
            raise ValueError(
                f"width {self.width} is not a multiple of 64, so the default 64-wide "
                "heads do not fit; set heads explicitly"
            )
        if self.width % self.num_heads != 0:
            raise ValueError(
                f"width {self.width} is not divisible by heads {self.num_heads}"
            )
        if self.head_dim % 4 != 0:
            raise ValueError(
                f"heads are {self.head_dim} wide (width {self.width} / heads "
                f"{self.num_heads}); the 2D rotary embedding needs a multiple of 4"
            )
        levels = self.levels
        if isinstance(self.shortening, list) and len(self.shortening) != levels:
            raise ValueError(
                f"shortening lists {len(self.shortening)} factors but depth "
                f"{self.depth} has {levels} shortened level(s); give one per level "
                "or a single number"
            )
        return self

    @property
    def num_heads(self) -> int:
        """Attention heads after applying the 64-wide default."""
        return self.heads if self.heads is not None else max(1, self.width // 64)

    @property
    def head_dim(self) -> int:
        """Width of one attention head."""
        return self.width // self.num_heads

    @property
    def levels(self) -> int:
        """Number of shortened levels (0 for a flat transformer)."""
        return count_levels(self.depth)

    @property
    def level_shortenings(self) -> list[int]:
        """Shortening factor per level, outermost first."""
        if isinstance(self.shortening, list):
            return list(self.shortening)
        return [self.shortening] * self.levels
