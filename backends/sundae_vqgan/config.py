"""The VQ-GAN backend's configuration: architecture, codebook health, discriminator.

This module must stay importable without torch: the plugin entry point imports it to
validate recipes and list presets before any network is built.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, PositiveInt, model_validator


class VQGANConfig(BaseModel):
    """Hyper-parameters of a taming-compatible VQ-GAN and its PatchGAN discriminator.

    Field names follow the taming-transformers `ddconfig` where one exists, so a taming
    YAML maps onto this model field by field (`n_embed` is `codebook_size`).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    # Base channel count; level i of the encoder has ch * ch_mult[i] channels.
    ch: PositiveInt = 128
    # Channel multiplier per resolution level; len(ch_mult) - 1 halvings of the image.
    ch_mult: tuple[PositiveInt, ...] = (1, 1, 2, 2, 4)
    # Residual blocks per encoder level (the decoder uses one more, as taming does).
    num_res_blocks: PositiveInt = 2
    # Feature-map sizes (in units of `resolution`) at which a level gets attention;
    # taming semantics: level i has size resolution // 2**i.
    attn_resolutions: tuple[PositiveInt, ...] = (16,)
    # Nominal training image size; used only to place attention (taming semantics).
    # The network itself accepts any size divisible by the downsampling factor.
    resolution: PositiveInt = 256
    # Image channels in and out.
    in_channels: PositiveInt = 3
    out_ch: PositiveInt = 3
    # Channels of the encoder output / decoder input (before quant_conv).
    z_channels: PositiveInt = 256
    # Width of each codebook vector.
    embed_dim: PositiveInt = 256
    # Number of codebook vectors (taming's n_embed).
    codebook_size: PositiveInt = 1024
    # Dropout inside the residual blocks.
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0)
    # Weight of the commitment term in the codebook loss.
    beta: float = Field(default=0.25, ge=0.0)

    # Codebook remedies, all off by default so that taming checkpoints keep their
    # meaning and their exact state-dict layout.
    # Compare l2-normalised encoder outputs with l2-normalised codes.
    l2_normalize_codes: bool = False
    # Initialise the codebook by k-means on the first training batch's encoder outputs.
    kmeans_init: bool = False
    # Lloyd iterations of that k-means.
    kmeans_iters: PositiveInt = 10
    # Replace codes that went unused over the usage window with recent encoder outputs.
    dead_code_restart: bool = False
    # A code hit fewer times than this over the usage window is dead.
    dead_code_threshold: int = Field(default=1, ge=0)
    # Number of training batches over which code usage is counted.
    usage_window: PositiveInt = 100
    # Log a warning when the fraction of codes used in the window falls below this.
    usage_warn_fraction: float = Field(default=0.1, ge=0.0, le=1.0)

    # PatchGAN discriminator: number of stride-2 layers and base width.
    disc_layers: PositiveInt = 3
    disc_channels: PositiveInt = 64
    # Normalisation in the discriminator; taming uses batch norm.
    disc_norm: Literal["batch", "group", "none"] = "batch"

    @property
    def downsample_factor(self) -> int:
        """Image pixels per token along each axis."""
        return 2 ** (len(self.ch_mult) - 1)

    @property
    def level_resolutions(self) -> tuple[int, ...]:
        """Nominal feature-map size at each level, as taming computes it."""
        return tuple(self.resolution // 2**i for i in range(len(self.ch_mult)))

    @model_validator(mode="after")
    def _check_shapes(self) -> VQGANConfig:
        if not self.ch_mult:
            raise ValueError("ch_mult must list at least one multiplier")
        if self.resolution % self.downsample_factor:
            raise ValueError(
                f"resolution {self.resolution} is not divisible by the downsampling "
                f"factor {self.downsample_factor} of ch_mult {list(self.ch_mult)}"
            )
        levels = self.level_resolutions
        unused = [r for r in self.attn_resolutions if r not in levels]
        if unused:
            raise ValueError(
                f"attn_resolutions {unused} match no level; the levels of resolution "
                f"{self.resolution} are {list(levels)}"
            )
        return self
