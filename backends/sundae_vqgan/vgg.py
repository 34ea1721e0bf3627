"""An in-project VGG16 feature network and an LPIPS-style perceptual distance.

The convolution layers are torchvision's `vgg16().features` with the same parameter
names (`features.{index}.weight` / `.bias`), so a user-supplied VGG16 state dict loads
as is. Nothing is ever downloaded: the weights come from a file the user names.

Axes: b batch, c channels, h w feature-map height and width.
"""

from __future__ import annotations

import logging
import pickle
from pathlib import Path

import torch
from einops import einsum
from torch import nn

from sundae_cli.errors import DataError

log = logging.getLogger(__name__)

# torchvision's vgg16 `features` up to relu5_3: widths of the 3x3 convolutions, "M"
# for a 2x2 max pool. Every convolution is followed by a ReLU.
VGG16_LAYOUT = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M")
VGG16_LAYOUT += (512, 512, 512)
# Indices in `features` of relu1_2, relu2_2, relu3_3, relu4_3, relu5_3, and widths.
TAP_INDICES = (3, 8, 15, 22, 29)
TAP_CHANNELS = (64, 128, 256, 512, 512)
# ImageNet statistics; inputs arrive in [-1, 1].
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

WEIGHTS_HINT = (
    "give a VGG16 state dict with keys features.N.weight/bias (for example "
    "torchvision's vgg16-397923af.pth, or a .safetensors file with the same keys); "
    "LPIPS heads lin0..lin4.model.1.weight may sit in the same file or a second one"
)


def vgg16_layers() -> list[nn.Module]:
    """The layers of torchvision's vgg16 `features[:30]`, in its order."""
    layers: list[nn.Module] = []
    in_channels = 3
    for item in VGG16_LAYOUT:
        if item == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            continue
        layers += [nn.Conv2d(in_channels, item, 3, padding=1), nn.ReLU()]
        in_channels = item
    return layers


class VGG16Features(nn.Module):
    """VGG16 convolutions returning the five LPIPS taps for a (b, 3, H, W) input."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(*vgg16_layers())

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """(b, 3, H, W) ImageNet-normalised -> five (b, c_i, H/2^i, W/2^i) maps."""
        taps = []
        for index, layer in enumerate(self.features):
            x = layer(x)
            if index in TAP_INDICES:
                taps.append(x)
        return taps


class PerceptualLoss(nn.Module):
    """LPIPS-style distance between two image batches, frozen.

    Features at the five taps are normalised to unit length over channels; their
    squared differences are weighted per channel by the learned LPIPS heads when
    given, averaged over positions and summed over taps.

    Deviation: without LPIPS heads every channel weighs 1 (LPIPS's "baseline" variant,
    not its calibrated one); values are then larger and less aligned with human
    judgement. Supply the heads (lin0..lin4) to get LPIPS proper.
    """

    def __init__(self, heads: list[torch.Tensor] | None = None) -> None:
        super().__init__()
        self.net = VGG16Features()
        mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
        # [-1, 1] -> ImageNet-normalised: ((x + 1) / 2 - mean) / std.
        self.register_buffer("shift", 2 * mean - 1, persistent=False)
        self.register_buffer("scale", 2 * std, persistent=False)
        self.has_heads = heads is not None
        for index, width in enumerate(TAP_CHANNELS):
            head = heads[index] if heads is not None else torch.ones(width)
            self.register_buffer(f"lin{index}", head.float().clone(), persistent=False)
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> PerceptualLoss:
        """Stays in eval mode: the network is frozen."""
        return super().train(False)

    def forward(self, images: torch.Tensor, others: torch.Tensor) -> torch.Tensor:
        """Two (b, 3, H, W) batches in [-1, 1] -> (b,) distances (0 when equal)."""
        taps_a = self.net((images - self.shift) / self.scale)
        taps_b = self.net((others - self.shift) / self.scale)
        distance = torch.zeros(images.shape[0], device=images.device)
        for index, (feat_a, feat_b) in enumerate(zip(taps_a, taps_b, strict=True)):
            diff = (_unit_channels(feat_a) - _unit_channels(feat_b)).pow(2)
            weighted = einsum(diff, getattr(self, f"lin{index}"), "b c h w, c -> b h w")
            distance = distance + weighted.mean(dim=(-2, -1))
        return distance


def _unit_channels(features: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    """Normalise (b, c, h, w) features to unit length along c."""
    return features / (features.pow(2).sum(dim=1, keepdim=True).sqrt() + eps)


def load_perceptual(path: Path, heads_path: Path | None = None) -> PerceptualLoss:
    """Build a frozen `PerceptualLoss` from VGG16 weights in a local file.

    Accepts torchvision's `features.N.*` keys, LPIPS's `net.sliceK.N.*` keys (also
    under a taming checkpoint's `loss.perceptual_loss.` prefix), `.pth`/`.pt`/`.ckpt`
    (never unpickling code) or `.safetensors`. LPIPS heads are read from `heads_path`,
    else from `path`, else uniform weights are used. Raises DataError on a bad file.
    """
    state = _normalise_keys(_read_state(Path(path)))
    heads = _heads(state, Path(path))
    if heads_path is not None:
        heads = _heads(_normalise_keys(_read_state(Path(heads_path))), Path(heads_path))
        if heads is None:
            raise DataError(f"{heads_path}: no LPIPS heads lin0..lin4", WEIGHTS_HINT)

    loss = PerceptualLoss(heads)
    features = {k: v for k, v in state.items() if k.startswith("features.")}
    try:
        loss.net.load_state_dict(features, strict=True)
    except RuntimeError as exc:
        first_line = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise DataError(
            f"{path}: not VGG16 weights ({first_line})", WEIGHTS_HINT
        ) from exc
    if heads is None:
        log.warning("%s has no LPIPS heads; perceptual loss uses uniform weights", path)
    return loss


def _read_state(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of a safetensors or torch file, without executing pickled code."""
    if not path.is_file():
        raise DataError(f"{path}: perceptual weights file not found", WEIGHTS_HINT)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        try:
            loaded = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError:
            # e.g. a Lightning checkpoint with hyper-parameter objects
            from sundae_vqgan.taming import read_torch_checkpoint

            loaded = read_torch_checkpoint(path)
    except DataError:
        raise
    except Exception as exc:  # any reader failure means the file is unusable
        raise DataError(f"{path}: cannot read weights: {exc}", WEIGHTS_HINT) from exc
    if isinstance(loaded, dict) and isinstance(loaded.get("state_dict"), dict):
        loaded = loaded["state_dict"]
    if not isinstance(loaded, dict):
        raise DataError(f"{path}: holds no state dict", WEIGHTS_HINT)
    return {k: v for k, v in loaded.items() if isinstance(v, torch.Tensor)}


def _normalise_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map LPIPS / taming key spellings onto `features.N.*` and `linK.model.1.*`."""
    renamed = {}
    for key, value in state.items():
        for prefix in ("loss.perceptual_loss.", "perceptual_loss.", "module."):
            key = key.removeprefix(prefix)
        parts = key.split(".")
        if len(parts) == 4 and parts[0] == "net" and parts[1].startswith("slice"):
            key = f"features.{parts[2]}.{parts[3]}"  # LPIPS keeps global indices
        renamed[key] = value
    return renamed


def _heads(state: dict[str, torch.Tensor], path: Path) -> list[torch.Tensor] | None:
    """The five LPIPS heads as (c,) vectors, None when the file has none."""
    keys = [f"lin{index}.model.1.weight" for index in range(len(TAP_CHANNELS))]
    present = [key in state for key in keys]
    if not any(present):
        return None
    heads = []
    for key, width in zip(keys, TAP_CHANNELS, strict=True):
        weight = state.get(key)
        if weight is None or weight.numel() != width:
            raise DataError(
                f"{path}: LPIPS head {key} missing or not {width} wide", WEIGHTS_HINT
            )
        heads.append(weight.reshape(width).float())
    return heads
