"""`train_prior`: learning on real digit latents, exact resume, refusals, stops."""

from __future__ import annotations

import json
import math

import pytest
import torch

from sundae_cli.checkpoints import latest_checkpoint, load_state, load_weights
from sundae_cli.errors import CheckpointError, DataError, Interrupted, TrainingError
from sundae_cli.recipes import load_recipe
from sundae_cli.train_prior import train_prior

from ..conftest import TINY

QUIET = [
    "train.prior.log_every=10",
    "train.prior.eval_every=1000",
    "train.prior.sample_every=1000",
    "train.prior.checkpoint_every=1000",
]


def recipe(*overrides: str):
    return load_recipe(TINY, [*QUIET, *overrides])


def test_loss_falls_well_below_uniform_on_real_digits(digit_latents, tmp_path):
    latents, _ = digit_latents
    result = train_prior(
        recipe("train.prior.steps=60", "train.prior.learning_rate=2e-3"),
        latents=latents,
        out=tmp_path / "run",
    )
    uniform = math.log(128)
    records = [
        json.loads(line)
        for line in (result.run_path / "metrics.jsonl").read_text().splitlines()
    ]
    assert records[0]["loss"] > records[-1]["loss"]
    assert records[-1]["loss"] < 0.75 * uniform
    meta = json.loads((result.checkpoint / "meta.json").read_text())
    assert meta["autoencoder"]["sha256"] and meta["effective_batch"] == 16


def test_resume_equals_uninterrupted_run(digit_latents, tmp_path):
    latents, _ = digit_latents
    straight = train_prior(
        recipe("train.prior.steps=12"), latents=latents, out=tmp_path / "a"
    )
    first = train_prior(
        recipe("train.prior.steps=5"), latents=latents, out=tmp_path / "b"
    )
    resumed = train_prior(
        recipe("train.prior.steps=12"), latents=latents, resume=str(first.run_path)
    )
    assert resumed.step == 12
    a = load_state(latest_checkpoint(straight.run_path))
    b = load_state(latest_checkpoint(resumed.run_path))
    for name, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][name]), name
    assert a["data"] == b["data"]


def test_case_c11_architecture_change_refused_lr_change_warns(
    digit_latents, tmp_path, caplog
):
    latents, _ = digit_latents
    first = train_prior(
        recipe("train.prior.steps=3"), latents=latents, out=tmp_path / "r"
    )
    with pytest.raises(CheckpointError) as info:
        train_prior(
            recipe("train.prior.steps=4", "prior.depth=[1, 3, 1]"),
            latents=latents,
            resume=str(first.run_path),
        )
    assert "prior.depth: [1, 2, 1] -> [1, 3, 1]" in info.value.message
    result = train_prior(
        recipe("train.prior.steps=4", "train.prior.learning_rate=5e-4"),
        latents=latents,
        resume=str(first.run_path),
    )
    assert result.step == 4
    assert "train.prior.learning_rate: 0.001 -> 0.0005" in caplog.text
    assert result.metrics["lr"] == pytest.approx(5e-4)  # the new rate is used


def test_case_c10_codebook_mismatch_refused_before_training(digit_latents, tmp_path):
    latents, _ = digit_latents
    with pytest.raises(DataError) as info:
        train_prior(
            recipe("autoencoder.codebook_size=512"), latents=latents, out=tmp_path / "x"
        )
    assert "codebook_size" in info.value.message and "512" in info.value.message
    assert not (tmp_path / "x").exists()


def test_batch_larger_than_the_data_refused_before_the_run_exists(
    digit_latents, tmp_path
):
    latents, _ = digit_latents
    with pytest.raises(DataError) as info:
        train_prior(
            recipe("train.prior.batch_size=5000"), latents=latents, out=tmp_path / "x"
        )
    assert "fewer than train.prior.batch_size = 5000" in info.value.message
    assert "--set train.prior.batch_size=N" in info.value.hint
    assert not (tmp_path / "x").exists()


def test_class_conditioning_needs_labels_in_range(digit_latents, tmp_path):
    latents, _ = digit_latents
    with pytest.raises(DataError, match="label 9 but prior.num_classes = 5"):
        train_prior(recipe("prior.num_classes=5"), latents=latents, out=tmp_path / "c")
    result = train_prior(
        recipe("prior.num_classes=10", "train.prior.steps=3"),
        latents=latents,
        out=tmp_path / "d",
    )
    assert result.step == 3


def test_case_c12_nonfinite_loss_stops_without_bad_checkpoint(
    digit_latents, tmp_path, monkeypatch
):
    import sundae_cli.train_prior as module

    latents, _ = digit_latents
    real = module.unrolled_loss
    calls = {"n": 0}

    def poisoned(*args, **kwargs):
        calls["n"] += 1
        result = real(*args, **kwargs)
        if calls["n"] == 5:
            result.loss = result.loss * float("nan")
        return result

    monkeypatch.setattr(module, "unrolled_loss", poisoned)
    with pytest.raises(TrainingError) as info:
        train_prior(
            recipe("train.prior.steps=10", "train.prior.checkpoint_every=2"),
            latents=latents,
            out=tmp_path / "n",
        )
    assert "'sundae_loss'" in info.value.message and "step 5" in info.value.message
    ckpt = latest_checkpoint(tmp_path / "n")
    assert ckpt.name == "step-00000004"
    weights = load_weights(ckpt)
    assert all(torch.isfinite(t).all() for t in weights.values())


def test_ctrl_c_writes_a_checkpoint_and_resumes(digit_latents, tmp_path, monkeypatch):
    import sundae_cli.train_prior as module

    latents, _ = digit_latents
    real = module.PriorTrainer.train_step

    def interrupt_at_four(self, batches):
        if self.step == 4:
            raise KeyboardInterrupt
        return real(self, batches)

    monkeypatch.setattr(module.PriorTrainer, "train_step", interrupt_at_four)
    with pytest.raises(Interrupted) as info:
        train_prior(recipe("train.prior.steps=8"), latents=latents, out=tmp_path / "i")
    assert info.value.exit_code == 130 and "step 4" in info.value.message
    assert latest_checkpoint(tmp_path / "i").name == "step-00000004"
    monkeypatch.setattr(module.PriorTrainer, "train_step", real)
    # Without --latents a resumed run reads the file it was trained on.
    result = train_prior(recipe("train.prior.steps=8"), resume=str(tmp_path / "i"))
    assert result.step == 8


def test_case_c15_failed_checkpoint_write_keeps_previous(
    digit_latents, tmp_path, monkeypatch
):
    import safetensors.torch

    latents, _ = digit_latents
    run = tmp_path / "w"
    train_prior(recipe("train.prior.steps=2"), latents=latents, out=run)

    def disk_full(tensors, filename, *args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", disk_full)
    with pytest.raises(Exception) as info:
        train_prior(recipe("train.prior.steps=4"), latents=latents, resume=str(run))
    assert "No space left on device" in str(info.value)
    assert "checkpoints/step-00000004" in str(info.value)
    assert latest_checkpoint(run).name == "step-00000002"
    assert not [p for p in (run / "checkpoints").iterdir() if p.name.startswith(".")]
