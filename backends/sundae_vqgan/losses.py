"""VQ-GAN training losses: PatchGAN discriminator, hinge loss, adaptive GAN weight.

The discriminator is a network of its own (the trainer gives it its own optimizer
and, under DDP, its own wrapper); the losses take it as an argument rather than own
it. Before `disc_start` the generator loss never calls the discriminator and the
trainer does not call `discriminator_loss`, so DDP never sees a discriminator
parameter go unused.

Axes: b batch, c channels, h w patch-logit grid.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Literal

import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:
    from sundae_vqgan.config import VQGANConfig
    from sundae_vqgan.vgg import PerceptualLoss

NormKind = Literal["batch", "group", "none"]

# Bounds of the adaptive weight, and the epsilon in its denominator (taming's values).
ADAPTIVE_WEIGHT_MAX = 1e4
ADAPTIVE_WEIGHT_EPS = 1e-4


def _norm_layer(kind: NormKind, channels: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "group":
        return nn.GroupNorm(math.gcd(32, channels), channels)
    return nn.Identity()


class NLayerDiscriminator(nn.Module):
    """PatchGAN discriminator: (b, 3, H, W) -> (b, 1, h, w) real/fake logits per patch.

    4x4 convolutions, stride 2 for the first `num_layers` and stride 1 for the last
    two, LeakyReLU 0.2, widths doubling up to 8x `channels`. Parameters sit in a
    Sequential `main` as in taming. `norm` "batch" follows taming; "group" or "none"
    avoid BatchNorm's cross-replica statistics under DDP.
    """

    def __init__(
        self,
        in_channels: int = 3,
        channels: int = 64,
        num_layers: int = 3,
        norm: NormKind = "batch",
    ) -> None:
        super().__init__()
        use_bias = norm == "none"  # a norm layer brings its own shift
        layers: list[nn.Module] = [
            nn.Conv2d(in_channels, channels, 4, stride=2, padding=1),
            nn.LeakyReLU(0.2),
        ]
        width = channels
        for index in range(1, num_layers + 1):
            next_width = channels * min(2**index, 8)
            stride = 2 if index < num_layers else 1
            layers += [
                nn.Conv2d(width, next_width, 4, stride, padding=1, bias=use_bias),
                _norm_layer(norm, next_width),
                nn.LeakyReLU(0.2),
            ]
            width = next_width
        layers.append(nn.Conv2d(width, 1, 4, stride=1, padding=1))
        self.main = nn.Sequential(*layers)
        self.apply(_init_weights)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(b, 3, H, W) -> (b, 1, h, w) logits."""
        return self.main(images)


def _init_weights(module: nn.Module) -> None:
    """DCGAN-style initialisation, as taming's discriminator uses."""
    if isinstance(module, nn.Conv2d):
        nn.init.normal_(module.weight, 0.0, 0.02)
    elif isinstance(module, nn.BatchNorm2d | nn.GroupNorm):
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)


def build_discriminator(config: VQGANConfig) -> NLayerDiscriminator:
    """The discriminator a `VQGANConfig` describes."""
    return NLayerDiscriminator(
        in_channels=config.out_ch,
        channels=config.disc_channels,
        num_layers=config.disc_layers,
        norm=config.disc_norm,
    )


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """Discriminator hinge loss: 0.5 * (E[relu(1 - real)] + E[relu(1 + fake)])."""
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def hinge_g_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    """Generator side of the hinge GAN: -E[fake logits]."""
    return -logits_fake.mean()


def adaptive_gan_weight(
    rec_loss: torch.Tensor, g_loss: torch.Tensor, last_layer_weight: torch.Tensor
) -> torch.Tensor:
    """||grad rec_loss|| / (||grad g_loss|| + 1e-4) at the decoder's last layer.

    Clamped to [0, 1e4] and detached. Returns 0 when either loss has no graph
    reaching `last_layer_weight` (evaluation, no_grad), as taming does in eval mode.
    """
    differentiable = rec_loss.requires_grad and g_loss.requires_grad
    if not (torch.is_grad_enabled() and differentiable):
        return torch.zeros((), device=last_layer_weight.device)
    rec_grad, g_grad = (
        torch.autograd.grad(loss, last_layer_weight, retain_graph=True)[0]
        for loss in (rec_loss, g_loss)
    )
    weight = rec_grad.norm() / (g_grad.norm() + ADAPTIVE_WEIGHT_EPS)
    return weight.clamp(0.0, ADAPTIVE_WEIGHT_MAX).detach()


class VQGANLoss(nn.Module):
    """Generator and discriminator objectives of VQ-GAN training.

    Generator: l1_weight * L1 + perceptual_weight * perceptual (when a network is
    given) + codebook_weight * codebook loss + disc_weight * adaptive weight * g_loss,
    the last term only once `step >= disc_start`. Discriminator: hinge loss, to be
    called only once `discriminator_active(step)`.

    Deviation: taming multiplies the adaptive weight into the GAN term only; so do we.
    Taming's learned log-variance (fixed at 0 in its released configs) is left out.
    """

    def __init__(
        self,
        perceptual: PerceptualLoss | None = None,
        *,
        l1_weight: float = 1.0,
        perceptual_weight: float = 1.0,
        codebook_weight: float = 1.0,
        disc_weight: float = 0.5,
        disc_start: int = 0,
    ) -> None:
        super().__init__()
        self.perceptual = perceptual
        self.l1_weight = l1_weight
        self.perceptual_weight = perceptual_weight
        self.codebook_weight = codebook_weight
        self.disc_weight = disc_weight
        self.disc_start = disc_start

    def discriminator_active(self, step: int) -> bool:
        """Whether the GAN terms are on at this optimizer step."""
        return step >= self.disc_start

    def generator_loss(
        self,
        images: torch.Tensor,
        reconstructions: torch.Tensor,
        codebook_loss: torch.Tensor,
        *,
        step: int,
        discriminator: nn.Module,
        last_layer_weight: torch.Tensor,
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """Total autoencoder loss and its terms as floats.

        images, reconstructions: (b, 3, H, W) in [-1, 1]. Terms: `l1`, `perceptual`,
        `codebook`, `g_loss`, `adaptive_weight` (the last two 0 before disc_start).
        """
        l1 = (images - reconstructions).abs().mean()
        perceptual = torch.zeros((), device=images.device)
        if self.perceptual is not None:
            perceptual = self.perceptual(images, reconstructions).mean()
        rec_loss = self.l1_weight * l1 + self.perceptual_weight * perceptual

        g_loss = torch.zeros((), device=images.device)
        adaptive = torch.zeros((), device=images.device)
        if self.discriminator_active(step):
            g_loss = hinge_g_loss(discriminator(reconstructions))
            adaptive = adaptive_gan_weight(rec_loss, g_loss, last_layer_weight)

        total = (
            rec_loss
            + self.codebook_weight * codebook_loss
            + self.disc_weight * adaptive * g_loss
        )
        terms = {
            "l1": l1,
            "perceptual": perceptual,
            "codebook": codebook_loss,
            "g_loss": g_loss,
            "adaptive_weight": adaptive,
        }
        return total, _as_floats(terms)

    def discriminator_loss(
        self,
        images: torch.Tensor,
        reconstructions: torch.Tensor,
        *,
        discriminator: nn.Module,
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """Hinge loss of the discriminator; reconstructions are detached here.

        Terms: `d_loss`, `logits_real`, `logits_fake` (mean logits).
        """
        logits_real = discriminator(images.detach())
        logits_fake = discriminator(reconstructions.detach())
        d_loss = hinge_d_loss(logits_real, logits_fake)
        terms = {
            "d_loss": d_loss,
            "logits_real": logits_real.mean(),
            "logits_fake": logits_fake.mean(),
        }
        return d_loss, _as_floats(terms)


def _as_floats(terms: dict[str, torch.Tensor]) -> dict[str, float]:
    """Detached scalars to floats with a single device synchronisation."""
    values = torch.stack(
        [value.detach().float().reshape(()) for value in terms.values()]
    )
    return dict(zip(terms, values.tolist(), strict=True))
