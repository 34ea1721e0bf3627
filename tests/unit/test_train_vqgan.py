"""`train_vqgan`: learning on the real photos, exact resume, non-finite losses,
codebook collapse and failed checkpoint writes."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from PIL import Image

from sundae_cli.checkpoints import latest_checkpoint, load_state, load_weights
from sundae_cli.datasets import export_photos
from sundae_cli.errors import CheckpointError, SundaeError, TrainingError
from sundae_cli.recipes import load_recipe
from sundae_cli.train_vqgan import train_vqgan

from ..conftest import TINY

# A VQ-GAN small enough for a loaded CPU: f=2 on 16 px images (an 8x8 grid), no
# attention outside the middle blocks, a two-layer discriminator.
FAST = [
    "autoencoder.ch=16",
    "autoencoder.ch_mult=[1, 2]",
    "autoencoder.attn_resolutions=[]",
    "autoencoder.z_channels=16",
    "autoencoder.embed_dim=16",
    "autoencoder.disc_channels=16",
    "autoencoder.disc_layers=2",
    "data.image_size=16",
    "train.vqgan.batch_size=4",
    "train.vqgan.log_every=1000",
    "train.vqgan.eval_every=1000",
    "train.vqgan.checkpoint_every=1000",
]


def recipe(*overrides: str):
    return load_recipe(TINY, [*FAST, *overrides])


def metrics(run_path) -> list[dict]:
    lines = (run_path / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def all_finite(weights: dict[str, torch.Tensor]) -> bool:
    return all(
        torch.isfinite(t).all() for t in weights.values() if t.is_floating_point()
    )


@pytest.fixture
def logs(caplog, monkeypatch):
    """caplog that also sees records after a CLI test turned propagation off."""
    for name in ("sundae_cli", "sundae_vqgan"):
        monkeypatch.setattr(logging.getLogger(name), "propagate", True)
    caplog.set_level(logging.INFO)
    return caplog


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """The twelve bundled photos (RGB, greyscale, RGBA) as an image folder."""
    folder = tmp_path_factory.mktemp("photos") / "photos"
    assert export_photos(folder) == 12
    return folder


def test_real_photos_loss_falls_and_held_out_psnr_rises(photos, tmp_path):
    result = train_vqgan(
        recipe(
            'data.crop="patch"',
            "data.val_fraction=0.2",  # coins and grass are held out
            "autoencoder.codebook_size=512",
            "train.vqgan.steps=150",
            "train.vqgan.learning_rate=1e-3",
            "train.vqgan.log_every=10",
            "train.vqgan.eval_every=10",
        ),
        data=photos,
        out=tmp_path / "run",
    )

    records = metrics(result.run_path)
    evals = [r["val_psnr"] for r in records if "val_psnr" in r]
    assert len(evals) == 15 and "train_psnr" not in records[-1]
    assert evals[-1] > evals[0] + 1.0, evals
    assert records[-1]["loss"] < 0.8 * records[0]["loss"]
    assert all(0.0 < r["codebook_usage"] <= 1.0 for r in records)
    grid = Image.open(result.run_path / "samples" / "recon-00000150.png")
    assert grid.size == (38, 38)  # 2 held-out images over their 2 reconstructions
    assert result.checkpoint.name == "step-00000150"


def test_resume_after_disc_start_equals_uninterrupted_run(photos, tmp_path):
    base = ["train.vqgan.disc_start=2"]
    straight = train_vqgan(
        recipe(*base, "train.vqgan.steps=6"), data=photos, out=tmp_path / "a"
    )
    first = train_vqgan(
        recipe(*base, "train.vqgan.steps=3"), data=photos, out=tmp_path / "b"
    )
    resumed = train_vqgan(
        recipe(*base, "train.vqgan.steps=6"), data=photos, resume=str(first.run_path)
    )

    assert resumed.step == 6 and resumed.run_path == first.run_path
    a = load_state(latest_checkpoint(straight.run_path))
    b = load_state(latest_checkpoint(resumed.run_path))
    # Steps 3 to 6 run the discriminator in train mode twice each (generator and
    # discriminator passes), so its BatchNorm statistics took part.
    assert a["discriminator"]["main.3.num_batches_tracked"] == 8
    for part in ("autoencoder_full", "discriminator"):
        for name, tensor in a[part].items():
            assert torch.equal(tensor, b[part][name]), f"{part}.{name}"
    for part in ("opt_ae", "opt_disc"):
        for index, slots in a[part]["state"].items():
            for slot, tensor in slots.items():
                assert torch.equal(tensor, b[part]["state"][index][slot]), part
    assert a["data"] == b["data"]


def test_case_c11_rate_change_applies_on_resume_architecture_change_refused(
    photos, tmp_path, logs
):
    first = train_vqgan(
        recipe("train.vqgan.steps=2"), data=photos, out=tmp_path / "run"
    )
    with pytest.raises(CheckpointError) as info:
        train_vqgan(
            recipe("train.vqgan.steps=3", "autoencoder.num_res_blocks=2"),
            data=photos,
            resume=str(first.run_path),
        )
    resumed = train_vqgan(
        recipe("train.vqgan.steps=3", "train.vqgan.learning_rate=1e-3"),
        data=photos,
        resume=str(first.run_path),
    )

    assert "autoencoder.num_res_blocks: 1 -> 2" in info.value.message
    assert resumed.step == 3
    assert "train.vqgan.learning_rate: 0.0002 -> 0.001" in logs.text
    state = load_state(resumed.checkpoint)
    for part in ("opt_ae", "opt_disc"):
        assert state[part]["param_groups"][0]["lr"] == 1e-3


def test_case_c12_learning_rate_10_never_leaves_nonfinite_weights(photos, tmp_path):
    run = tmp_path / "lr10"
    overrides = [
        "train.vqgan.learning_rate=10",
        "train.vqgan.disc_start=1",
        "train.vqgan.checkpoint_every=1",
        "train.vqgan.keep_checkpoints=10",
        "train.vqgan.steps=5",
    ]

    try:
        outcome = train_vqgan(recipe(*overrides), data=photos, out=run)
    except TrainingError as error:  # stopped: the message names where and what
        assert "non-finite at step" in error.message
        assert "learning_rate" in error.hint
    else:
        assert outcome.step == 5

    checkpoints = sorted((run / "checkpoints").glob("step-*"))
    assert checkpoints, "the first step is finite and must be checkpointed"
    for ckpt in checkpoints:
        assert all_finite(load_weights(ckpt)), ckpt.name
    assert all_finite(load_state(latest_checkpoint(run))["discriminator"])


@pytest.mark.parametrize(
    ("function", "term"), [("hinge_d_loss", "d_loss"), ("hinge_g_loss", "g_loss")]
)
def test_case_c12_nonfinite_gan_term_stops_naming_step_and_term(
    photos, tmp_path, monkeypatch, function, term
):
    import sundae_vqgan.losses as losses

    real = getattr(losses, function)

    def poisoned(*args):
        return real(*args) * float("nan")

    monkeypatch.setattr(losses, function, poisoned)
    run = tmp_path / term
    with pytest.raises(TrainingError) as info:
        train_vqgan(
            recipe(
                "train.vqgan.disc_start=2",
                "train.vqgan.checkpoint_every=1",
                "train.vqgan.steps=5",
            ),
            data=photos,
            out=run,
        )

    assert f"loss term {term!r} became non-finite at step 3" in info.value.message
    assert str(run / "checkpoints" / "step-00000002") in info.value.message
    assert latest_checkpoint(run).name == "step-00000002"
    assert all_finite(load_weights(latest_checkpoint(run)))


def test_case_c12_skip_mode_skips_the_bad_step(photos, tmp_path, monkeypatch, logs):
    import sundae_vqgan.losses as losses

    real = losses.hinge_d_loss
    calls = []

    def poisoned_once(*args):
        calls.append(1)
        return real(*args) * (float("nan") if len(calls) == 1 else 1.0)

    monkeypatch.setattr(losses, "hinge_d_loss", poisoned_once)
    result = train_vqgan(
        recipe(
            "train.vqgan.disc_start=2",
            'train.vqgan.nonfinite="skip"',
            "train.vqgan.steps=5",
        ),
        data=photos,
        out=tmp_path / "skip",
    )

    assert result.step == 5 and len(calls) == 3  # steps 3 (skipped), 4 and 5
    assert "skipping step 3: non-finite d_loss" in logs.text
    assert all_finite(load_weights(result.checkpoint))


def two_colour_folder(folder):
    """32 solid 8x8 images, half red and half blue (case C13)."""
    folder.mkdir()
    for index in range(32):
        colour = (220, 30, 30) if index % 2 else (30, 60, 200)
        Image.new("RGB", (8, 8), colour).save(folder / f"{index:02d}.png")
    return folder


# f=8 on 8 px images: one token per image, so two colours can use two codes at most.
# The 1x1 level is 64 wide, so its GroupNorm groups hold two values each.
COLLAPSE = [
    "autoencoder.ch_mult=[1, 1, 4, 4]",
    "data.image_size=8",
    "autoencoder.codebook_size=1024",
    "autoencoder.usage_window=2",
    "train.vqgan.steps=4",
    "train.vqgan.log_every=2",
]


def test_case_c13_collapse_reported_over_the_window_with_warning(tmp_path, logs):
    images = two_colour_folder(tmp_path / "two-colours")

    result = train_vqgan(recipe(*COLLAPSE), data=images, out=tmp_path / "run")

    records = metrics(result.run_path)
    assert [r["step"] for r in records] == [2, 4]
    for record in records:
        assert 0 < record["codebook_usage"] <= 2 / 1024
        assert record["dead_codes"] >= 1022
    warnings = [r.getMessage() for r in logs.records if r.levelno == logging.WARNING]
    collapse = [w for w in warnings if w.startswith("codebook collapse")]
    assert len(collapse) == 2  # one per completed window of 2 batches
    assert "of 1024 codes used in the last 2 batches" in collapse[0]


def test_case_c15_failed_checkpoint_write_keeps_previous(photos, tmp_path, monkeypatch):
    import safetensors.torch

    run = tmp_path / "w"
    train_vqgan(recipe("train.vqgan.steps=2"), data=photos, out=run)

    def disk_full(tensors, filename, *args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", disk_full)
    with pytest.raises(SundaeError) as info:
        train_vqgan(recipe("train.vqgan.steps=4"), data=photos, resume=str(run))

    assert "No space left on device" in info.value.message
    assert str(run / "checkpoints" / "step-00000004") in info.value.message
    assert latest_checkpoint(run).name == "step-00000002"
    assert all_finite(load_weights(latest_checkpoint(run)))
    assert not [p for p in (run / "checkpoints").iterdir() if p.name.startswith(".")]
