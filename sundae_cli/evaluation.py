"""Evaluation: reconstruction quality of an autoencoder (PSNR, SSIM, codebook use).

Axes: `b` batch, `c` channels, `h w` grid height and width, `k` codebook size.

Conventions:

- `psnr` and `ssim` take float tensors (b, c, H, W) in [-1, 1] and return one value
  per image. Identical images give `PSNR_CAP_DB` rather than infinity, so averages
  and JSON reports stay finite.
- `ssim` follows Wang et al. (2004): Gaussian window 11 (sigma 1.5), K1 = 0.01,
  K2 = 0.03, "valid" filtering (no padding), computed per RGB channel and averaged.

FID and KID between folders of images live in `sundae_cli.fid`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sundae_cli.images import fit_to, load_rgb, to_tensor

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

PSNR_CAP_DB = 100.0  # PSNR reported for identical images (MSE 0)
SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
SSIM_K1, SSIM_K2 = 0.01, 0.03

# ------------------------------------------------------------- image metrics


def psnr(a: torch.Tensor, b: torch.Tensor, data_range: float = 2.0) -> torch.Tensor:
    """Peak signal-to-noise ratio in dB per image of (b, c, H, W) images -> (b,).

    Identical images give `PSNR_CAP_DB` (the MSE is floored accordingly).
    """
    mse = (a.float() - b.float()).pow(2).flatten(1).mean(dim=1)  # (b,)
    floor = data_range**2 * 10 ** (-PSNR_CAP_DB / 10)
    return 10 * (data_range**2 / mse.clamp_min(floor)).log10()


def _gaussian_window(size: int, channels: int, like: torch.Tensor) -> torch.Tensor:
    """A normalised 2-D Gaussian, one copy per channel: (c, 1, size, size)."""
    import torch

    offsets = torch.arange(size, dtype=like.dtype, device=like.device) - size // 2
    line = torch.exp(-(offsets**2) / (2 * SSIM_SIGMA**2))
    line = line / line.sum()
    return torch.outer(line, line).expand(channels, 1, size, size).contiguous()


def ssim(a: torch.Tensor, b: torch.Tensor, data_range: float = 2.0) -> torch.Tensor:
    """Mean structural similarity per image of (b, c, H, W) images -> (b,).

    Computed per channel and averaged over channels and positions. Images smaller
    than the 11-pixel window use the largest odd window that fits.
    """
    import torch.nn.functional as F

    a, b = a.float(), b.float()
    channels = a.shape[1]
    size = min(SSIM_WINDOW, a.shape[-2], a.shape[-1])
    size -= 1 - size % 2  # keep it odd
    window = _gaussian_window(size, channels, a)

    def blur(x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, window, groups=channels)  # "valid": no padding

    mu_a, mu_b = blur(a), blur(b)
    var_a = blur(a * a) - mu_a**2
    var_b = blur(b * b) - mu_b**2
    cov = blur(a * b) - mu_a * mu_b
    c1, c2 = (SSIM_K1 * data_range) ** 2, (SSIM_K2 * data_range) ** 2
    similarity = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / (
        (mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2)
    )
    return similarity.mean(dim=(1, 2, 3))


def codebook_statistics(counts: torch.Tensor) -> dict[str, Any]:
    """Usage fraction and perplexity of code counts (k,) int64."""
    total = int(counts.sum().item())
    probs = counts.double() / max(total, 1)
    used = probs[probs > 0]
    entropy = float(-(used * used.log()).sum().item())
    return {
        "codes_used": int((counts > 0).sum().item()),
        "codebook_size": int(counts.numel()),
        "codebook_usage": float((counts > 0).double().mean().item()),
        "perplexity": math.exp(entropy),
    }


# ------------------------------------------------------------- reconstruction


def _progress(total: int, description: str):
    from sundae_cli.training import Progress

    return Progress(total, 0, description, enabled=True)


def _load_fitted(files: Sequence[Path], image_size: tuple[int, int]) -> torch.Tensor:
    """Images centre-fitted to (H, W) as float (b, 3, H, W) in [-1, 1]."""
    import torch

    fitted = [fit_to(load_rgb(f), image_size, crop="center") for f in files]
    return torch.stack([to_tensor(img) for img in fitted])


def evaluate_reconstruction(
    model: Any,
    files: Sequence[Path],
    image_size: tuple[int, int],
    batch_size: int,
    device: torch.device,
) -> dict[str, Any]:
    """Encode and decode `files` in batches; mean PSNR/SSIM and codebook statistics.

    Images are fitted to `image_size` = (H, W) with the centre crop policy of
    `sundae_cli.images.fit_to`. Decoded images are clamped to [-1, 1] first, so the
    metrics describe the picture that would be saved. Only one batch is in memory.
    """
    import torch

    counts = torch.zeros(model.codebook_size, dtype=torch.int64, device=device)
    psnr_sum = ssim_sum = 0.0
    with torch.inference_mode(), _progress(len(files), "reconstruct") as bar:
        for start in range(0, len(files), batch_size):
            images = _load_fitted(files[start : start + batch_size], image_size)
            images = images.to(device)
            tokens = model.encode(images)  # (b, h, w)
            recon = model.decode(tokens).clamp(-1, 1)
            psnr_sum += float(psnr(recon, images).sum().item())
            ssim_sum += float(ssim(recon, images).sum().item())
            counts += torch.bincount(tokens.reshape(-1), minlength=counts.numel())
            bar.update(min(start + batch_size, len(files)), "")
    count = len(files)
    return {
        "images": count,
        "psnr": psnr_sum / count,
        "ssim": ssim_sum / count,
        **codebook_statistics(counts.cpu()),
    }
