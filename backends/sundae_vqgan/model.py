"""The VQ-GAN autoencoder: encoder, vector quantizer, decoder (taming layout).

Submodule names reproduce taming-transformers' `VQModel` (`encoder.*`, `decoder.*`,
`quantize.embedding.weight`, `quant_conv.*`, `post_quant_conv.*`), so the autoencoder
part of a taming checkpoint loads with `load_state_dict(strict=True)`.

Axes: b batch, c channels, h w token-grid height and width, k codebook size.
Images are (b, 3, H, W) with H = h * f and W = w * f, f the downsampling factor.
"""

from __future__ import annotations

import torch
from torch import nn

from sundae_cli.errors import DataError
from sundae_vqgan.blocks import (
    Downsample,
    Level,
    MidBlock,
    Upsample,
    group_norm,
    swish,
)
from sundae_vqgan.config import VQGANConfig
from sundae_vqgan.quantizer import VectorQuantizer


class Encoder(nn.Module):
    """Images -> z_channels feature map at 1/f resolution (taming's `Encoder`)."""

    def __init__(self, config: VQGANConfig) -> None:
        super().__init__()
        widths = [config.ch * mult for mult in (1, *config.ch_mult)]
        last = len(config.ch_mult) - 1
        self.conv_in = nn.Conv2d(config.in_channels, config.ch, 3, padding=1)

        self.down = nn.ModuleList()
        for i, size in enumerate(config.level_resolutions):
            level = Level(
                widths[i],
                widths[i + 1],
                config.num_res_blocks,
                use_attention=size in config.attn_resolutions,
                dropout=config.dropout,
            )
            if i != last:
                level.downsample = Downsample(widths[i + 1])
            self.down.append(level)

        self.mid = MidBlock(widths[-1], config.dropout)
        self.norm_out = group_norm(widths[-1])
        self.conv_out = nn.Conv2d(widths[-1], config.z_channels, 3, padding=1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(b, 3, H, W) -> (b, z_channels, h, w)."""
        hidden = self.conv_in(images)
        for level in self.down:
            hidden = level.run_blocks(hidden)
            if hasattr(level, "downsample"):
                hidden = level.downsample(hidden)
        hidden = self.mid(hidden)
        return self.conv_out(swish(self.norm_out(hidden)))


class Decoder(nn.Module):
    """z_channels feature map -> images (taming's `Decoder`).

    `up[i]` is level i, up[0] the full-resolution one; the levels run from the
    deepest to up[0], each with num_res_blocks + 1 residual blocks.
    """

    def __init__(self, config: VQGANConfig) -> None:
        super().__init__()
        widths = [config.ch * mult for mult in config.ch_mult]
        self.conv_in = nn.Conv2d(config.z_channels, widths[-1], 3, padding=1)
        self.mid = MidBlock(widths[-1], config.dropout)

        self.up = nn.ModuleList()
        for i, size in enumerate(config.level_resolutions):
            level = Level(
                widths[min(i + 1, len(widths) - 1)],  # the width coming from below
                widths[i],
                config.num_res_blocks + 1,
                use_attention=size in config.attn_resolutions,
                dropout=config.dropout,
            )
            if i != 0:
                level.upsample = Upsample(widths[i])
            self.up.append(level)

        self.norm_out = group_norm(widths[0])
        self.conv_out = nn.Conv2d(widths[0], config.out_ch, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """(b, z_channels, h, w) -> (b, out_ch, H, W)."""
        hidden = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            hidden = level.run_blocks(hidden)
            if hasattr(level, "upsample"):
                hidden = level.upsample(hidden)
        return self.conv_out(swish(self.norm_out(hidden)))


class VQGAN(nn.Module):
    """Taming-compatible VQ-GAN; satisfies `sundae_cli.plugins.Autoencoder`.

    Images are float (b, 3, H, W) in [-1, 1] with H and W multiples of
    `downsample_factor`; they need not be square.
    """

    def __init__(self, config: VQGANConfig) -> None:
        super().__init__()
        self.config = config
        self.codebook_size = config.codebook_size
        self.downsample_factor = config.downsample_factor

        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        self.quantize = VectorQuantizer.from_config(config)
        self.quant_conv = nn.Conv2d(config.z_channels, config.embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(config.embed_dim, config.z_channels, 1)

    @property
    def last_layer_weight(self) -> torch.Tensor:
        """The decoder's output convolution weight, for the adaptive GAN weight."""
        return self.decoder.conv_out.weight

    def encode_latents(self, images: torch.Tensor) -> torch.Tensor:
        """(b, 3, H, W) -> (b, embed_dim, h, w) continuous pre-quantization latents."""
        self._check_size(images)
        return self.quant_conv(self.encoder(images))

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """(b, 3, H, W) float in [-1, 1] -> (b, h, w) int64 codebook indices."""
        return self.quantize.quantize_indices(self.encode_latents(images))

    def decode_latents(self, z_q: torch.Tensor) -> torch.Tensor:
        """(b, embed_dim, h, w) quantized latents -> (b, 3, H, W)."""
        return self.decoder(self.post_quant_conv(z_q))

    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        """(b, h, w) int64 codebook indices -> (b, 3, H, W), nominally in [-1, 1]."""
        return self.decode_latents(self.quantize.lookup(tokens))

    def forward(
        self, images: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(b, 3, H, W) -> (reconstruction (b, 3, H, W), codebook loss, (b, h, w))."""
        z_q, codebook_loss, indices = self.quantize(self.encode_latents(images))
        return self.decode_latents(z_q), codebook_loss, indices

    def _check_size(self, images: torch.Tensor) -> None:
        height, width = images.shape[-2:]
        factor = self.downsample_factor
        if height % factor or width % factor:
            raise DataError(
                f"image size {height}x{width} is not a multiple of the VQ-GAN "
                f"downsampling factor {factor}",
                hint=f"resize or crop images to multiples of {factor} pixels",
            )


def build_autoencoder(config: VQGANConfig) -> VQGAN:
    """The backend factory named by `sundae_vqgan.plugin:backend`."""
    return VQGAN(config)
