"""The VQ-GAN network: shapes, taming key layout, presets and config validation."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from pydantic import ValidationError

from sundae_cli.errors import DataError
from sundae_cli.plugins import Autoencoder, AutoencoderBackend
from sundae_vqgan.blocks import group_norm
from sundae_vqgan.config import VQGANConfig
from sundae_vqgan.model import VQGAN, build_autoencoder
from sundae_vqgan.plugin import PRESETS, backend

TINY = dict(
    ch=32,
    ch_mult=(1, 1, 2),
    num_res_blocks=1,
    attn_resolutions=(4,),
    resolution=16,
    z_channels=8,
    embed_dim=8,
    codebook_size=32,
)


@pytest.fixture(scope="module")
def tiny_model() -> VQGAN:
    torch.manual_seed(0)
    return build_autoencoder(VQGANConfig(**TINY)).eval()


def test_non_square_encode_decode_shapes(tiny_model: VQGAN) -> None:
    images = torch.rand(2, 3, 16, 24) * 2 - 1

    with torch.no_grad():
        tokens = tiny_model.encode(images)
        decoded = tiny_model.decode(tokens)
        reconstruction, codebook_loss, indices = tiny_model(images)

    assert tiny_model.downsample_factor == 4
    assert tokens.shape == (2, 4, 6) and tokens.dtype == torch.int64
    assert 0 <= int(tokens.min()) and int(tokens.max()) < tiny_model.codebook_size
    assert decoded.shape == (2, 3, 16, 24) and decoded.dtype == torch.float32
    assert reconstruction.shape == (2, 3, 16, 24)
    assert codebook_loss.ndim == 0 and codebook_loss.item() >= 0
    assert torch.equal(indices, tokens)
    assert torch.allclose(reconstruction, decoded, atol=1e-5)


def test_model_satisfies_autoencoder_protocol(tiny_model: VQGAN) -> None:
    assert isinstance(tiny_model, Autoencoder)
    assert tiny_model.codebook_size == 32
    assert tiny_model.last_layer_weight is tiny_model.decoder.conv_out.weight


def test_image_size_not_multiple_of_factor_is_data_error(tiny_model: VQGAN) -> None:
    with pytest.raises(DataError, match="not a multiple of the VQ-GAN downsampling"):
        tiny_model.encode(torch.zeros(1, 3, 16, 18))


def _weights_and_biases(*modules: str) -> set[str]:
    return {f"{module}.{kind}" for module in modules for kind in ("weight", "bias")}


def _resnet(prefix: str, shortcut: bool = False) -> list[str]:
    parts = ["norm1", "conv1", "norm2", "conv2"] + (
        ["nin_shortcut"] if shortcut else []
    )
    return [f"{prefix}.{part}" for part in parts]


def _attn(prefix: str) -> list[str]:
    return [f"{prefix}.{part}" for part in ("norm", "q", "k", "v", "proj_out")]


def _mid(prefix: str) -> list[str]:
    return (
        _resnet(f"{prefix}.block_1")
        + _attn(f"{prefix}.attn_1")
        + _resnet(f"{prefix}.block_2")
    )


def test_state_dict_keys_match_taming_layout() -> None:
    # ch 32, ch_mult (1, 2), one res block, attention at the 8x8 level of 16 px.
    config = VQGANConfig(
        ch=32,
        ch_mult=(1, 2),
        num_res_blocks=1,
        attn_resolutions=(8,),
        resolution=16,
        z_channels=4,
        embed_dim=4,
        codebook_size=16,
    )
    expected = _weights_and_biases(
        "encoder.conv_in",
        *_resnet("encoder.down.0.block.0"),
        "encoder.down.0.downsample.conv",
        *_resnet("encoder.down.1.block.0", shortcut=True),
        *_attn("encoder.down.1.attn.0"),
        *_mid("encoder.mid"),
        "encoder.norm_out",
        "encoder.conv_out",
        "decoder.conv_in",
        *_mid("decoder.mid"),
        *_resnet("decoder.up.1.block.0"),
        *_resnet("decoder.up.1.block.1"),
        *_attn("decoder.up.1.attn.0"),
        *_attn("decoder.up.1.attn.1"),
        "decoder.up.1.upsample.conv",
        *_resnet("decoder.up.0.block.0", shortcut=True),
        *_resnet("decoder.up.0.block.1"),
        "decoder.norm_out",
        "decoder.conv_out",
        "quant_conv",
        "post_quant_conv",
    ) | {"quantize.embedding.weight"}

    state = VQGAN(config).state_dict()

    assert set(state) == expected
    assert state["encoder.down.1.block.0.nin_shortcut.weight"].shape == (64, 32, 1, 1)
    assert state["decoder.up.0.block.0.nin_shortcut.weight"].shape == (32, 64, 1, 1)
    assert state["encoder.conv_out.weight"].shape == (4, 64, 3, 3)
    assert state["quantize.embedding.weight"].shape == (16, 4)
    assert state["decoder.conv_out.weight"].shape == (3, 32, 3, 3)


def test_state_dict_round_trip_is_strict_and_exact(tiny_model: VQGAN) -> None:
    torch.manual_seed(1)
    other = build_autoencoder(VQGANConfig(**TINY)).eval()
    images = torch.rand(1, 3, 16, 16) * 2 - 1

    other.load_state_dict(tiny_model.state_dict(), strict=True)

    with torch.no_grad():
        assert torch.equal(other.encode(images), tiny_model.encode(images))
        assert torch.allclose(other(images)[0], tiny_model(images)[0])


def test_group_norm_uses_32_groups_when_possible() -> None:
    assert group_norm(64).num_groups == 32
    assert group_norm(48).num_groups == 16
    assert group_norm(64).eps == 1e-6


@pytest.mark.parametrize(
    ("preset", "factor", "grid", "codebook"),
    [
        ("256", 16, 16, 1024),
        ("512", 16, 32, 1024),
        ("1024", 32, 32, 8192),
        ("cpu32", 4, 8, 512),
        ("cpu64", 8, 8, 512),
    ],
)
def test_presets_validate(preset: str, factor: int, grid: int, codebook: int) -> None:
    config = VQGANConfig(**PRESETS[preset])

    assert config.downsample_factor == factor
    assert config.resolution // factor == grid
    assert config.codebook_size == codebook
    assert set(config.attn_resolutions) <= set(config.level_resolutions)


def test_backend_entry_object() -> None:
    assert isinstance(backend, AutoencoderBackend)
    assert backend.name == "vqgan"
    assert backend.config_model is VQGANConfig
    model = backend.build(VQGANConfig(**{**TINY, "codebook_size": 8}))
    assert isinstance(model, VQGAN) and model.codebook_size == 8


def test_plugin_and_config_do_not_import_torch() -> None:
    code = (
        "import sys, sundae_vqgan.plugin, sundae_vqgan.config; "
        "sys.exit('torch' in sys.modules)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True)
    assert result.returncode == 0, result.stderr.decode()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"attn_resolutions": (24,)}, "match no level"),
        ({"ch_mult": ()}, "at least one"),
        ({"resolution": 18}, "not divisible"),
        ({"codebook_size": 0}, "greater than 0"),
        ({"chanels": 3}, "Extra inputs are not permitted"),
        ({"disc_norm": "layer"}, "disc_norm"),
    ],
)
def test_config_rejects_bad_values(change: dict, message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        VQGANConfig(**{**TINY, **change})


def test_config_is_frozen() -> None:
    config = VQGANConfig(**TINY)
    with pytest.raises(ValidationError):
        config.ch = 64
