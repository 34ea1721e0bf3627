"""`sundae import taming`: safe import of taming checkpoints as autoencoder runs."""

from __future__ import annotations

import builtins
import hashlib
import json
import os
import pickle
from pathlib import Path

import torch

from sundae_cli.checkpoints import latest_checkpoint, read_meta
from sundae_cli.images import fit_to, load_rgb, to_tensor
from sundae_cli.latents import open_latents
from sundae_cli.models import load_autoencoder
from sundae_cli.runs import runs_root
from sundae_vqgan.config import VQGANConfig
from sundae_vqgan.model import build_autoencoder

# The same small taming VQModel (f=2, 16 px, 8x8 grid, 16 codes) as the unit tests.
from ..unit.test_taming_import import CONFIG, taming_state
from ..unit.test_taming_import import TAMING_YAML as YAML

DATA = Path(__file__).resolve().parents[1] / "data"

EXTRA_KEYS = {
    "transformer.tok_emb.weight": torch.zeros(16, 8),
    "cond_stage_model.encoder.conv_in.weight": torch.zeros(1),
    "first_stage_model.loss.discriminator.main.0.weight": torch.randn(8, 3, 4, 4),
    "first_stage_model.loss.perceptual_loss.lin0.model.1.weight": torch.ones(1, 64),
}


class SystemPayload:
    """Unpickled normally, this runs `touch MARKER` through os.system."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class OpenPayload:
    """Unpickled normally, this creates MARKER through builtins.open."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (builtins.open, (str(self.marker), "w"))


def save_gpt_checkpoint(path: Path, state: dict, hyper_parameters) -> Path:
    """A cond-transformer checkpoint: the VQ-GAN under `first_stage_model.`."""
    weights = {f"first_stage_model.{key}": value for key, value in state.items()}
    torch.save(
        {
            "state_dict": {**weights, **EXTRA_KEYS},
            "hyper_parameters": hyper_parameters,
            "global_step": 1234,
        },
        path,
    )
    return path


def imported_run(result) -> Path:
    assert result.exit_code == 0, result.stderr
    return Path(result.stdout.strip().splitlines()[-1])


def original_model(state: dict):
    model = build_autoencoder(VQGANConfig(**CONFIG))
    model.load_state_dict(state, strict=True)
    return model.eval()


def test_payloads_are_live_under_plain_pickle(tmp_path):
    for payload in (SystemPayload(tmp_path / "a"), OpenPayload(tmp_path / "b")):
        opened = pickle.loads(pickle.dumps(payload))
        if hasattr(opened, "close"):
            opened.close()
    assert (tmp_path / "a").exists() and (tmp_path / "b").exists()


def test_gpt_checkpoint_imports_without_running_pickled_code(cli, tmp_path):
    state = taming_state(CONFIG)
    markers = [tmp_path / "pwned-system", tmp_path / "pwned-open"]
    hyper = {
        "learning_rate": 4.5e-6,
        "payload": SystemPayload(markers[0]),
        "callback": OpenPayload(markers[1]),
    }
    ckpt = save_gpt_checkpoint(tmp_path / "last.ckpt", state, hyper)

    run = imported_run(cli("import", "taming", ckpt, "--resolution", "16"))

    assert not any(marker.exists() for marker in markers)
    assert run.parent == runs_root()
    info = json.loads((run / "run.json").read_text())
    assert info["kind"] == "autoencoder"
    meta = read_meta(latest_checkpoint(run))
    assert meta["kind"] == "autoencoder"
    assert meta["imported_from"] == str(ckpt.resolve())
    assert meta["source_sha256"] == hashlib.sha256(ckpt.read_bytes()).hexdigest()
    recipe = meta["recipe"]
    assert recipe["resolution"] == "cpu32"
    assert recipe["data"]["image_size"] == [16, 16]
    assert {key: recipe["autoencoder"][key] for key in CONFIG} == CONFIG
    assert (run / "recipe.toml").read_text().startswith("schema_version = 1")


def test_encode_with_imported_run_matches_the_original_weights(cli, tmp_path):
    state = taming_state(CONFIG)
    ckpt = save_gpt_checkpoint(tmp_path / "gpt.ckpt", state, {"lr": 1e-4})
    run = imported_run(cli("import", "taming", ckpt, "--config", _yaml(tmp_path)))
    latents = tmp_path / "latents.h5"

    encoded = cli("encode", DATA, "--out", latents, "--model", run, "--workers", "0")

    assert encoded.exit_code == 0, encoded.stderr
    original = original_model(state)
    imported = load_autoencoder(run, torch.device("cpu")).model
    with open_latents(latents, expect_codebook_size=16, expect_grid=(8, 8)) as file:
        paths = file.source_paths()
        tokens = torch.from_numpy(file.tokens(slice(None)).astype("int64"))
        sources, flipped = file.source_index, file.flipped
    assert sorted(Path(p).name for p in paths) == sorted(
        p.name for p in DATA.glob("*.png")
    )
    images = torch.stack([to_tensor(fit_to(load_rgb(p), (16, 16))) for p in paths])
    with torch.no_grad():
        expected = original.encode(images)  # (b, 8, 8)
        expected_flipped = original.encode(torch.flip(images, dims=[3]))
        assert torch.equal(tokens[~flipped], expected[sources[~flipped]])
        assert torch.equal(tokens[flipped], expected_flipped[sources[flipped]])
        assert torch.equal(imported.decode(tokens), original.decode(tokens))


def _yaml(tmp_path: Path, text: str = YAML) -> Path:
    path = tmp_path / f"model-{hashlib.sha1(text.encode()).hexdigest()[:8]}.yaml"
    path.write_text(text)
    return path


def test_yaml_gives_resolution_and_must_agree(cli, tmp_path):
    state = taming_state(CONFIG)
    ckpt = tmp_path / "vqgan.ckpt"
    torch.save({"state_dict": state, "hyper_parameters": {"embed_dim": 4}}, ckpt)

    wrong_yaml = _yaml(tmp_path, YAML.replace("n_embed: 16", "n_embed: 32"))
    wrong = cli("import", "taming", ckpt, "--config", wrong_yaml)
    clash = cli(
        "import", "taming", ckpt, "--config", _yaml(tmp_path), "--resolution", 8
    )
    out = tmp_path / "ae"
    run = imported_run(
        cli("import", "taming", ckpt, "--config", _yaml(tmp_path), "--out", out)
    )

    assert wrong.exit_code == 2
    assert "codebook_size: yaml 32, weights 16" in wrong.stderr
    assert clash.exit_code == 2 and "--resolution 8 disagrees" in clash.stderr
    assert run == out
    assert read_meta(latest_checkpoint(run))["recipe"]["data"]["image_size"] == [16, 16]


def test_unusable_checkpoints_exit_2_and_leave_no_run(cli, tmp_path):
    garbage = tmp_path / "notes.ckpt"
    garbage.write_bytes(b"not a checkpoint at all")
    foreign = tmp_path / "resnet.ckpt"
    torch.save({"state_dict": {"fc.weight": torch.zeros(2, 2)}}, foreign)
    state = taming_state(CONFIG)
    state["post_quant_conv.weight"] = torch.zeros(8, 5, 1, 1)  # embed_dim is 4
    misshapen = tmp_path / "misshapen.ckpt"
    torch.save({"state_dict": state}, misshapen)

    results = {
        "not a zip-format torch checkpoint": cli("import", "taming", garbage),
        "no quantize.embedding.weight": cli("import", "taming", foreign),
        "do not fit the inferred architecture": cli(
            "import", "taming", misshapen, "--resolution", "16"
        ),
        "checkpoint not found": cli("import", "taming", tmp_path / "absent.ckpt"),
    }

    for expected, result in results.items():
        assert result.exit_code == 2, expected
        assert expected in result.stderr and "hint:" in result.stderr
    assert (
        "post_quant_conv.weight"
        in results["do not fit the inferred architecture"].stderr
    )
    assert not runs_root().exists() or not any(runs_root().iterdir())


def test_failed_write_names_the_path_and_leaves_no_run(cli, tmp_path, monkeypatch):
    import safetensors.torch

    ckpt = tmp_path / "vqgan.ckpt"
    torch.save({"state_dict": taming_state(CONFIG)}, ckpt)

    def disk_full(tensors, filename, *args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", disk_full)
    result = cli("import", "taming", ckpt, "--resolution", "16")

    assert result.exit_code == 1
    assert "No space left on device" in result.stderr
    assert "checkpoints/step-00000000" in result.stderr
    assert not runs_root().exists() or not any(runs_root().iterdir())
