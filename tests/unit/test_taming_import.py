"""Safe import of taming-transformers checkpoints: no pickled code ever runs."""

from __future__ import annotations

import argparse
import os
import pickle
import zipfile
from collections import OrderedDict
from pathlib import Path

import pytest
import torch

from sundae_cli.errors import CheckpointError
from sundae_vqgan.config import VQGANConfig
from sundae_vqgan.model import build_autoencoder
from sundae_vqgan.taming import (
    InertObject,
    extract_vqgan_state,
    import_taming_checkpoint,
    infer_config_from_state,
    load_taming_vqgan,
    read_torch_checkpoint,
)
from sundae_vqgan.taming_yaml import config_from_taming_yaml, parse_yaml_subset

CONFIG = dict(
    ch=32,
    ch_mult=[1, 2],
    num_res_blocks=2,
    attn_resolutions=[8],
    resolution=16,
    in_channels=3,
    out_ch=3,
    z_channels=8,
    embed_dim=4,
    codebook_size=16,
)

TAMING_YAML = """\
model:
  base_learning_rate: 4.5e-6
  target: taming.models.vqgan.VQModel
  params:
    embed_dim: 4
    n_embed: 16
    ddconfig:
      double_z: False
      z_channels: 8
      resolution: 16
      in_channels: 3
      out_ch: 3
      ch: 32
      ch_mult: [ 1,2 ]  # num_down = len(ch_mult)-1
      num_res_blocks: 2
      attn_resolutions: [8]
      dropout: 0.0

    lossconfig:
      target: taming.modules.losses.vqperceptual.VQLPIPSWithDiscriminator
      params:
        disc_start: 250001
        disc_weight: 0.8
        codebook_weight: 1.0
"""


class SideEffect:
    """Unpickling this with a normal unpickler creates a directory."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def taming_layout_shapes(cfg: dict) -> dict[str, tuple[int, ...]]:
    """Key -> shape of a taming VQModel, written from taming's construction rules."""
    shapes: dict[str, tuple[int, ...]] = {}

    def conv(name: str, c_in: int, c_out: int, size: int) -> None:
        shapes[f"{name}.weight"] = (c_out, c_in, size, size)
        shapes[f"{name}.bias"] = (c_out,)

    def norm(name: str, channels: int) -> None:
        shapes[f"{name}.weight"] = shapes[f"{name}.bias"] = (channels,)

    def resnet(name: str, c_in: int, c_out: int) -> None:
        norm(f"{name}.norm1", c_in)
        conv(f"{name}.conv1", c_in, c_out, 3)
        norm(f"{name}.norm2", c_out)
        conv(f"{name}.conv2", c_out, c_out, 3)
        if c_in != c_out:
            conv(f"{name}.nin_shortcut", c_in, c_out, 1)

    def attn(name: str, channels: int) -> None:
        norm(f"{name}.norm", channels)
        for part in ("q", "k", "v", "proj_out"):
            conv(f"{name}.{part}", channels, channels, 1)

    def mid(name: str, channels: int) -> None:
        resnet(f"{name}.block_1", channels, channels)
        attn(f"{name}.attn_1", channels)
        resnet(f"{name}.block_2", channels, channels)

    ch, mult, levels = cfg["ch"], cfg["ch_mult"], len(cfg["ch_mult"])
    conv("encoder.conv_in", cfg["in_channels"], ch, 3)
    size, c_in = cfg["resolution"], ch
    for i in range(levels):
        for j in range(cfg["num_res_blocks"]):
            resnet(f"encoder.down.{i}.block.{j}", c_in, ch * mult[i])
            c_in = ch * mult[i]
            if size in cfg["attn_resolutions"]:
                attn(f"encoder.down.{i}.attn.{j}", c_in)
        if i != levels - 1:
            conv(f"encoder.down.{i}.downsample.conv", c_in, c_in, 3)
            size //= 2
    mid("encoder.mid", c_in)
    norm("encoder.norm_out", c_in)
    conv("encoder.conv_out", c_in, cfg["z_channels"], 3)

    conv("decoder.conv_in", cfg["z_channels"], c_in, 3)
    mid("decoder.mid", c_in)
    for i in reversed(range(levels)):
        for j in range(cfg["num_res_blocks"] + 1):
            resnet(f"decoder.up.{i}.block.{j}", c_in, ch * mult[i])
            c_in = ch * mult[i]
            if size in cfg["attn_resolutions"]:
                attn(f"decoder.up.{i}.attn.{j}", c_in)
        if i != 0:
            conv(f"decoder.up.{i}.upsample.conv", c_in, c_in, 3)
            size *= 2
    norm("decoder.norm_out", c_in)
    conv("decoder.conv_out", c_in, cfg["out_ch"], 3)

    shapes["quantize.embedding.weight"] = (cfg["codebook_size"], cfg["embed_dim"])
    conv("quant_conv", cfg["z_channels"], cfg["embed_dim"], 1)
    conv("post_quant_conv", cfg["embed_dim"], cfg["z_channels"], 1)
    return shapes


def taming_state(cfg: dict) -> OrderedDict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return OrderedDict(
        (key, torch.randn(shape, generator=generator) * 0.1)
        for key, shape in taming_layout_shapes(cfg).items()
    )


LOSS_KEYS = {
    "loss.logvar": torch.zeros(()),
    "loss.discriminator.main.0.weight": torch.randn(64, 3, 4, 4),
    "loss.perceptual_loss.lin0.model.1.weight": torch.randn(1, 64, 1, 1),
}


def test_side_effect_payload_is_live_with_plain_pickle(tmp_path: Path) -> None:
    marker = tmp_path / "plain"
    pickle.loads(pickle.dumps(SideEffect(marker)))
    assert marker.is_dir()  # so the next test's payload is a real one


def test_checkpoint_loads_without_running_pickled_code(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    state = taming_state(CONFIG)
    path = tmp_path / "last.ckpt"
    torch.save(
        {
            "state_dict": OrderedDict({**state, **LOSS_KEYS}),
            "hyper_parameters": argparse.Namespace(lr=4.5e-6, ddconfig={"ch": 32}),
            "callbacks": {"payload": SideEffect(marker)},
            "global_step": 7,
        },
        path,
    )

    checkpoint = read_torch_checkpoint(path)

    assert not marker.exists()
    assert isinstance(checkpoint["callbacks"]["payload"], InertObject)
    hparams = checkpoint["hyper_parameters"]
    assert isinstance(hparams, InertObject)
    assert hparams.inert_name == "argparse.Namespace"
    assert hparams.inert_state == {"lr": 4.5e-6, "ddconfig": {"ch": 32}}
    assert checkpoint["global_step"] == 7
    for key, value in state.items():
        assert torch.equal(checkpoint["state_dict"][key], value), key
    assert set(extract_vqgan_state(checkpoint)) == set(state)


def test_views_dtypes_and_parameters_round_trip(tmp_path: Path) -> None:
    base = torch.arange(12, dtype=torch.int64)
    original = {
        "view": base[3:9].view(2, 3),
        "base": base,
        "transposed": torch.randn(3, 4).t(),
        "bf16": torch.randn(5).to(torch.bfloat16),
        "half": torch.randn(2, 2).half(),
        "flags": torch.tensor([True, False]),
        "param": torch.nn.Parameter(torch.randn(3)),
        "empty": torch.zeros(0, 4),
    }
    uint16 = torch.arange(5, dtype=torch.int32).to(torch.uint16)[1:]
    path = tmp_path / "tensors.pt"
    torch.save({**original, "uint16": uint16}, path)

    loaded = read_torch_checkpoint(path)

    for key, value in original.items():
        assert loaded[key].dtype == value.dtype, key
        assert torch.equal(loaded[key], value.detach()), key
    # uint16 goes through torch's newer _rebuild_tensor_v3 with untyped storage.
    assert loaded["uint16"].dtype == torch.uint16
    assert torch.equal(loaded["uint16"].view(torch.uint8), uint16.view(torch.uint8))


def test_cond_transformer_prefix_is_stripped() -> None:
    state = taming_state(CONFIG)
    checkpoint = {
        "state_dict": {
            **{f"first_stage_model.{key}": value for key, value in state.items()},
            "transformer.tok_emb.weight": torch.zeros(16, 8),
            "cond_stage_model.encoder.conv_in.weight": torch.zeros(1),
            "first_stage_model.quantize.used": torch.arange(16),
        }
    }

    extracted = extract_vqgan_state(checkpoint)

    assert set(extracted) == set(state)
    assert torch.equal(
        extracted["encoder.conv_in.weight"], state["encoder.conv_in.weight"]
    )


def test_config_inference_round_trip_and_strict_load() -> None:
    state = taming_state(CONFIG)

    inferred = infer_config_from_state(state, resolution=16)
    model = build_autoencoder(VQGANConfig(**inferred))
    model.load_state_dict(state, strict=True)

    assert inferred == CONFIG
    own = build_autoencoder(VQGANConfig(**{**CONFIG, "ch_mult": [1, 2, 2]}))
    own_config = infer_config_from_state(own.state_dict(), resolution=16)
    assert own_config["ch_mult"] == [1, 2, 2] and own_config["attn_resolutions"] == [8]


def test_import_with_yaml_confirmation(tmp_path: Path) -> None:
    state = taming_state(CONFIG)
    path = tmp_path / "model.ckpt"
    torch.save({"state_dict": {**state, **LOSS_KEYS}}, path)

    _, fields = import_taming_checkpoint(path, yaml_text=TAMING_YAML)
    model = load_taming_vqgan(path, yaml_text=TAMING_YAML).eval()
    wrong_yaml = TAMING_YAML.replace("n_embed: 16", "n_embed: 1024")

    assert fields == {**CONFIG, "dropout": 0.0}
    assert torch.equal(
        model.quantize.embedding.weight, state["quantize.embedding.weight"]
    )
    with torch.no_grad():
        assert model.decode(torch.zeros(1, 2, 3, dtype=torch.long)).shape == (
            1,
            3,
            4,
            6,
        )
    with pytest.raises(CheckpointError, match="codebook_size: yaml 1024, weights 16"):
        import_taming_checkpoint(path, yaml_text=wrong_yaml)


def test_yaml_subset_parser() -> None:
    text = "a:\n  b: [1, 2.5, x]\n  c:\n  - 3\n  - 'q'\n  d: true # note\ne: ~\n"

    assert parse_yaml_subset(text) == {
        "a": {"b": [1, 2.5, "x"], "c": [3, "q"], "d": True},
        "e": None,
    }
    with pytest.raises(CheckpointError, match="cannot read the taming YAML"):
        config_from_taming_yaml("model:\n  params: {a: 1}\n")


def test_cond_transformer_yaml_reads_first_stage_config() -> None:
    text = (
        "model:\n"
        "  target: taming.models.cond_transformer.Net2NetTransformer\n"
        "  params:\n"
        "    transformer_config:\n"
        "      params:\n"
        "        vocab_size: 16\n"
        "    first_stage_config:\n"
        "      target: taming.models.vqgan.VQModel\n"
        "      params:\n"
        "        embed_dim: 4\n"
        "        n_embed: 16\n"
        "        ddconfig:\n"
        "          ch: 32\n"
        "          ch_mult:\n"
        "          - 1\n"
        "          - 2\n"
    )

    assert config_from_taming_yaml(text) == {
        "ch": 32,
        "ch_mult": [1, 2],
        "embed_dim": 4,
        "codebook_size": 16,
    }


def test_unreadable_checkpoints_are_checkpoint_errors(tmp_path: Path) -> None:
    not_zip = tmp_path / "legacy.ckpt"
    not_zip.write_bytes(b"\x80\x02}q\x00.")
    broken = tmp_path / "broken.ckpt"
    with zipfile.ZipFile(broken, "w") as archive:
        archive.writestr("archive/data.pkl", b"\x80\x02garbage")
    no_vqgan = tmp_path / "other.ckpt"
    torch.save({"state_dict": {"model.weight": torch.zeros(1)}}, no_vqgan)

    with pytest.raises(CheckpointError, match="not a zip-format"):
        read_torch_checkpoint(not_zip)
    with pytest.raises(CheckpointError, match="cannot read checkpoint"):
        read_torch_checkpoint(broken)
    with pytest.raises(CheckpointError, match="not found"):
        read_torch_checkpoint(tmp_path / "absent.ckpt")
    with pytest.raises(CheckpointError, match="no quantize.embedding.weight"):
        import_taming_checkpoint(no_vqgan)
