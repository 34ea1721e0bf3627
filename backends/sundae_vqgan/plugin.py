"""Entry point of the VQ-GAN autoencoder backend (light: no torch import here)."""

from __future__ import annotations

from typing import Any

from sundae_cli.plugins import AutoencoderBackend
from sundae_vqgan.config import VQGANConfig

PRESETS: dict[str, dict[str, Any]] = {
    # Paper, 256 px: f=16, 1024 codes, 16x16 grid, attention at 16.
    "256": {
        "ch": 128,
        "ch_mult": [1, 1, 2, 2, 4],
        "num_res_blocks": 2,
        "attn_resolutions": [16],
        "resolution": 256,
        "z_channels": 256,
        "embed_dim": 256,
        "codebook_size": 1024,
    },
    # Our choice (the paper trains no 512 px model): the 256 px architecture at 512 px,
    # so f=16 gives a 32x32 grid, with attention at the 32x32 level.
    "512": {
        "ch": 128,
        "ch_mult": [1, 1, 2, 2, 4],
        "num_res_blocks": 2,
        "attn_resolutions": [32],
        "resolution": 512,
        "z_channels": 256,
        "embed_dim": 256,
        "codebook_size": 1024,
    },
    # Paper, megapixel: f=32, 8192 codes, 32x32 grid, one residual block per level,
    # attention at 64 (and in the middle blocks, as always).
    "1024": {
        "ch": 128,
        "ch_mult": [1, 1, 2, 2, 4, 4],
        "num_res_blocks": 1,
        "attn_resolutions": [64],
        "resolution": 1024,
        "z_channels": 256,
        "embed_dim": 256,
        "codebook_size": 8192,
    },
    # CPU-sized: 32 px, f=4, 8x8 grid; for the bundled digits data.
    "cpu32": {
        "ch": 32,
        "ch_mult": [1, 2, 2],
        "num_res_blocks": 1,
        "attn_resolutions": [8],
        "resolution": 32,
        "z_channels": 64,
        "embed_dim": 64,
        "codebook_size": 512,
        "disc_channels": 32,
    },
    # CPU-sized: 64 px, f=8, 8x8 grid.
    "cpu64": {
        "ch": 32,
        "ch_mult": [1, 1, 2, 2],
        "num_res_blocks": 1,
        "attn_resolutions": [8],
        "resolution": 64,
        "z_channels": 64,
        "embed_dim": 64,
        "codebook_size": 512,
        "disc_channels": 32,
    },
}

backend = AutoencoderBackend(
    name="vqgan",
    config_model=VQGANConfig,
    factory="sundae_vqgan.model:build_autoencoder",
    presets=PRESETS,
    description=(
        "taming-compatible VQ-GAN (residual encoder/decoder with attention, "
        "vector quantizer, PatchGAN + LPIPS-style losses)"
    ),
)
