"""Run store and checkpoints: atomic writes, complete-only resume, safe loading."""

from __future__ import annotations

import json
import os
import pickle

import pytest
import torch

from sundae_cli.checkpoints import (
    latest_checkpoint,
    load_state,
    load_weights,
    save_checkpoint,
)
from sundae_cli.errors import CheckpointError, SundaeError
from sundae_cli.fsutil import atomic_path, write_text_atomic
from sundae_cli.runs import create_run, list_runs, resolve_run, sundae_home
from sundae_cli.training import capture_rng, restore_rng


def test_store_follows_sundae_home(isolated_store):
    assert sundae_home() == isolated_store
    run = create_run("prior", "tiny", {"backend": "hourglass"})
    assert run.path.parent == isolated_store / "runs"
    assert [r.path for r in list_runs("prior")] == [run.path]
    assert resolve_run(None, "prior").path == run.path
    with pytest.raises(CheckpointError, match="is a prior run"):
        resolve_run(run.path, "autoencoder")


def test_checkpoint_round_trip_and_pruning(tmp_path):
    weights = {"w": torch.arange(6.0).reshape(2, 3)}
    state = {"step": 3, "rng": capture_rng(), "nested": {"lr": [1e-3, 2e-3]}}
    for step in (1, 2, 3, 4):
        save_checkpoint(tmp_path, step, weights, state, {"kind": "prior"}, keep=2)
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["step-00000003", "step-00000004"]
    ckpt = latest_checkpoint(tmp_path)
    assert torch.equal(load_weights(ckpt)["w"], weights["w"])
    loaded = load_state(ckpt)  # torch.load(weights_only=True) inside
    assert loaded["nested"] == {"lr": [1e-3, 2e-3]}
    restore_rng(loaded["rng"])


def test_partial_or_corrupt_checkpoints_are_never_picked(tmp_path):
    save_checkpoint(tmp_path, 1, {"w": torch.ones(2)}, None, {"kind": "prior"})
    good = latest_checkpoint(tmp_path)
    # A newer checkpoint whose weights were cut short, and a leftover temp dir.
    bad = save_checkpoint(tmp_path, 2, {"w": torch.ones(2)}, None, {"kind": "prior"})
    with open(bad / "model.safetensors", "r+b") as handle:
        handle.truncate(10)
    (tmp_path / "checkpoints" / ".step-00000003.abc.tmp").mkdir()
    assert latest_checkpoint(tmp_path) == good
    with pytest.raises(CheckpointError, match="sha256"):
        load_weights(bad)


def test_state_with_pickled_code_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    ckpt = tmp_path / "ck"
    ckpt.mkdir()
    with open(ckpt / "state.pt", "wb") as handle:
        pickle.dump({"x": Evil()}, handle, protocol=2)
    with pytest.raises(CheckpointError, match="unreadable"):
        load_state(ckpt)


def test_atomic_writes_get_the_umask_mode_not_private(tmp_path):
    # mkstemp/mkdtemp create 0600/0700 entries; outputs and checkpoints must be
    # readable like any file the user writes (0644/0755 under umask 022).
    old = os.umask(0o022)
    try:
        write_text_atomic(tmp_path / "run.json", "{}")
        ckpt = save_checkpoint(tmp_path, 1, {"w": torch.zeros(2)}, None, {})
    finally:
        os.umask(old)
    assert (tmp_path / "run.json").stat().st_mode & 0o777 == 0o644
    assert ckpt.stat().st_mode & 0o777 == 0o755
    assert (ckpt / "model.safetensors").stat().st_mode & 0o777 == 0o644


def test_atomic_write_leaves_previous_file_on_failure(tmp_path):
    target = tmp_path / "out.json"
    write_text_atomic(target, json.dumps({"v": 1}))
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed")
    assert json.loads(target.read_text()) == {"v": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.json"]


def test_write_error_names_path_and_os_error(tmp_path):
    blocked = tmp_path / "file"
    blocked.write_text("x")
    with pytest.raises(SundaeError, match=r"could not write .*file/sub/out\.txt"):
        write_text_atomic(blocked / "sub" / "out.txt", "y")
