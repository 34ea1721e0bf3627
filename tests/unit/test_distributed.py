"""Training under torchrun: two Gloo processes on the CPU (C14), and the stop protocol.

The slow tests launch `python -m torch.distributed.run --standalone --nproc-per-node 2`
(a free port, as torchrun picks it) with this module as the program of each rank.
Run that way, the module is a thin worker (`_worker`): it calls the real CLI
(`sundae_cli.app.main`, exactly what `-m sundae_cli` runs) and then saves its rank's
parameters, which the tests compare across ranks and against one process.

Comparing two ranks with one process needs an objective whose random draws do not
depend on the rank: the worker and the single-process run both swap the objective's
corruption for `_content_seeded_corrupt`, the real corruption drawn per item from a
generator seeded by the item's tokens, and train with one unroll step (no sampling
from the logits). With that, two ranks of 4 items x 2 accumulated micro-batches see
exactly the items of one process's batch of 16, and the weights agree to float
rounding (different reduction orders; tolerance `ONE_PROCESS_ATOL`).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sundae_cli import objective

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "recipes" / "tiny.toml"
LAUNCH_TIMEOUT_S = 600  # a loaded two-core machine; normally well under a minute
# Two ranks against one process after 4 AdamW steps at lr 1e-3: observed 1.2e-6. A
# real difference in data or random draws moves weights by about the rate (1e-3).
ONE_PROCESS_ATOL = 1e-5

_real_corrupt = objective.corrupt

PRIOR = [
    "train.prior.log_every=2",
    "train.prior.eval_every=1000",
    "train.prior.sample_every=1000",
    "train.prior.checkpoint_every=1000",
    "train.prior.unroll_steps=1",
    "sampling.steps=2",  # the sample grid drawn at the end of every run
    "sampling.min_steps=0",
]
TWO_RANKS = ["train.prior.batch_size=4", "train.prior.accumulate=2"]


def _content_seeded_corrupt(tokens, codebook_size, generator=None):
    """`objective.corrupt`, each item drawn from a generator seeded by its tokens."""
    weights = torch.arange(1, tokens[0].numel() + 1)
    corrupted, rates = [], []
    for item in tokens:
        seed = int((item.flatten().cpu() * weights).sum()) % (2**31)
        drawn = _real_corrupt(
            item[None], codebook_size, torch.Generator().manual_seed(seed)
        )
        corrupted.append(drawn[0])
        rates.append(drawn[1])
    return torch.cat(corrupted), torch.cat(rates)


# ---------------------------------------------------------------- the worker


def _worker(argv: list[str]) -> None:
    (
        """One rank: `DUMP_DIR OPTIONS sundae-args...`; saves `DUMP_DIR/rank<R>.pt`.

    OPTIONS is a comma-separated list; "content-seeded" swaps the corruption.
    """
        ""
    )
    import sundae_cli.training as training
    from sundae_cli.app import main

    dump, options, args = Path(argv[0]), argv[1].split(","), argv[2:]
    if "content-seeded" in options:
        objective.corrupt = _content_seeded_corrupt
    if os.environ["RANK"] == "1":
        _inject_failures(options)
    trainers = []
    real_run_steps = training.run_steps

    def spy(trainer, **kwargs):
        trainers.append(trainer)
        return real_run_steps(trainer, **kwargs)

    training.run_steps = spy
    try:
        main(args)
    finally:
        if trainers:
            modules = {"model": trainers[0].model}
            if hasattr(trainers[0], "discriminator"):
                modules["discriminator"] = trainers[0].discriminator
            params = {
                f"{key}.{name}": tensor.detach().clone()
                for key, module in modules.items()
                for name, tensor in module.named_parameters()
            }
            dump.mkdir(parents=True, exist_ok=True)
            torch.save(params, dump / f"rank{os.environ['RANK']}.pt")


def _inject_failures(options: list[str]) -> None:
    """On rank 1: a data error before step 3, or a crash inside step 3."""
    import sundae_cli.train_prior as train_prior
    import sundae_cli.training as training
    from sundae_cli.errors import DataError

    if "data-error" in options:
        real_iter = training.ResumableStream.__iter__

        def failing_iter(self):
            for count, batch in enumerate(real_iter(self)):
                if count == 2:
                    raise DataError("test: item 7 is unreadable")
                yield batch

        training.ResumableStream.__iter__ = failing_iter
    if "crash" in options:
        real_step = train_prior.PriorTrainer.train_step

        def crashing_step(self, batches):
            if self.step == 2:
                raise RuntimeError("test: rank 1 crashed inside step 3")
            return real_step(self, batches)

        train_prior.PriorTrainer.train_step = crashing_step


def launch(home: Path, dump: Path, options: str, *args: str) -> tuple[int, str, str]:
    """Run `sundae ARGS` on two ranks under torchrun; (exit code, stdout, stderr)."""
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "SUNDAE_HOME": str(home),
        "PYTHONPATH": str(REPO),
    }
    env.pop("WORLD_SIZE", None)
    env["SUNDAE_DIST_TIMEOUT"] = "120"  # a hang fails the test, not the suite
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "2",
        "-m",
        "tests.unit.test_distributed",
        str(dump),
        options,
        *args,
    ]
    done = subprocess.run(
        command,
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=LAUNCH_TIMEOUT_S,
    )
    return done.returncode, done.stdout, done.stderr


def ranks(dump: Path) -> tuple[dict, dict]:
    return (
        torch.load(dump / "rank0.pt", weights_only=True),
        torch.load(dump / "rank1.pt", weights_only=True),
    )


def assert_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def train_prior_two_ranks(tmp_path, name, latents, *args):
    code, out, err = launch(
        tmp_path / f"home-{name}",
        tmp_path / f"dump-{name}",
        "content-seeded",
        "train",
        "prior",
        str(TINY),
        "--latents",
        str(latents),
        *args,
    )
    assert code == 0, err[-3000:]
    return out, err


def set_flags(*overrides: str) -> list[str]:
    return [item for value in overrides for item in ("--set", value)]


# ---------------------------------------------------------------- prior


@pytest.mark.slow
def test_two_ranks_match_one_process_and_resume_exactly(
    digit_latents, tmp_path, monkeypatch
):
    from sundae_cli.checkpoints import latest_checkpoint, load_state
    from sundae_cli.recipes import load_recipe
    from sundae_cli.runs import list_runs
    from sundae_cli.train_prior import train_prior

    latents, _ = digit_latents

    # Two ranks, 4 steps, no --out: rank 0 alone creates a run in the store.
    out, err = train_prior_two_ranks(
        tmp_path, "full", latents, *set_flags(*PRIOR, *TWO_RANKS, "train.prior.steps=4")
    )
    monkeypatch.setenv("SUNDAE_HOME", str(tmp_path / "home-full"))
    (run,) = list_runs("prior")
    assert out.strip() == str(run.path)
    assert err.count("effective batch 16 (per-process 4 x 2 processes x 2") == 1
    assert run.info["effective_batch"] == 16 and run.info["world_size"] == 2
    full = load_state(latest_checkpoint(run.path))
    rank0, rank1 = ranks(tmp_path / "dump-full")
    assert_equal(rank0, rank1)

    # (b) One process with the whole batch of 16 takes the same steps.
    monkeypatch.setattr(objective, "corrupt", _content_seeded_corrupt)
    single = train_prior(
        load_recipe(TINY, [*PRIOR, "train.prior.steps=4"]),
        latents=latents,
        out=tmp_path / "single",
    )
    weights = load_state(latest_checkpoint(single.run_path))["model"]
    for name, tensor in weights.items():
        diff = (tensor - rank0[f"model.{name}"]).abs().max().item()
        assert diff < ONE_PROCESS_ATOL, (name, diff)

    # (c) Two steps, then a two-rank resume to 4: the same weights on both ranks.
    half = tmp_path / "half"
    steps = [*PRIOR, *TWO_RANKS]
    train_prior_two_ranks(
        tmp_path,
        "half",
        latents,
        "--out",
        str(half),
        *set_flags(*steps, "train.prior.steps=2"),
    )
    assert load_state(latest_checkpoint(half))["step"] == 2
    train_prior_two_ranks(
        tmp_path,
        "resumed",
        latents,
        "--resume",
        str(half),
        *set_flags(*steps, "train.prior.steps=4"),
    )
    resumed = load_state(latest_checkpoint(half))
    assert resumed["step"] == 4 and resumed["data"] == full["data"]
    assert_equal(resumed["model"], full["model"])
    rank0, rank1 = ranks(tmp_path / "dump-resumed")
    assert_equal(rank0, ranks(tmp_path / "dump-full")[0])
    assert_equal(rank0, rank1)


# ---------------------------------------------------------------- stopping


def test_ctrl_c_stops_at_the_step_boundary_and_resumes_exactly(
    digit_latents, tmp_path, monkeypatch
):
    """Ctrl-C during step 3: that step finishes, step 3 is saved, resume is exact."""
    import signal

    import sundae_cli.train_prior as module
    from sundae_cli.checkpoints import latest_checkpoint, load_state
    from sundae_cli.errors import Interrupted
    from sundae_cli.recipes import load_recipe
    from sundae_cli.train_prior import train_prior

    latents, _ = digit_latents
    handler = signal.getsignal(signal.SIGINT)
    recipe = load_recipe(TINY, [*PRIOR, "train.prior.steps=5"])
    straight = train_prior(recipe, latents=latents, out=tmp_path / "straight")

    real = module.PriorTrainer.train_step

    def ctrl_c_during_step_three(self, batches):
        metrics = real(self, batches)
        if self.step == 2:
            signal.raise_signal(signal.SIGINT)
        return metrics

    monkeypatch.setattr(module.PriorTrainer, "train_step", ctrl_c_during_step_three)
    with pytest.raises(Interrupted) as info:
        train_prior(recipe, latents=latents, out=tmp_path / "stopped")
    assert "interrupted at step 3; checkpoint written" in info.value.message
    assert signal.getsignal(signal.SIGINT) is handler

    monkeypatch.setattr(module.PriorTrainer, "train_step", real)
    train_prior(recipe, latents=latents, resume=str(tmp_path / "stopped"))
    a = load_state(latest_checkpoint(straight.run_path))
    b = load_state(latest_checkpoint(tmp_path / "stopped"))
    assert b["step"] == 5 and a["data"] == b["data"]
    assert_equal(a["model"], b["model"])


@pytest.mark.slow
def test_one_rank_failing_ends_both_ranks_promptly(digit_latents, tmp_path):
    latents, _ = digit_latents
    args = ["--latents", str(latents), *set_flags(*PRIOR, "train.prior.steps=6")]

    # A data error on rank 1 before step 3 is agreed on: rank 0 checkpoints step 2.
    run = tmp_path / "data-error"
    code, _, err = launch(
        tmp_path / "home", tmp_path / "d1", "data-error", "train", "prior",
        str(TINY), "--out", str(run), *args,
    )  # fmt: skip
    assert code != 0
    assert "error: test: item 7 is unreadable" in err
    assert (
        "another process failed while reading its data before step 3; checkpoint "
        f"written to {run / 'checkpoints' / 'step-00000002'}"
    ) in err
    assert (run / "checkpoints" / "step-00000002" / "meta.json").is_file()

    # A crash inside step 3 cannot be agreed on; rank 0 fails in its all-reduce
    # (Gloo sees the closed connection) instead of waiting.
    code, _, err = launch(
        tmp_path / "home", tmp_path / "d2", "crash", "train", "prior",
        str(TINY), "--out", str(tmp_path / "crash"), *args,
    )  # fmt: skip
    assert code != 0
    assert "test: rank 1 crashed inside step 3" in err
    assert "Connection closed by peer" in err or "Connection reset by peer" in err


def test_compile_without_a_cpu_compiler_is_a_clear_input_error(monkeypatch):
    import torch._inductor.cpp_builder as cpp_builder

    from sundae_cli.errors import InputError
    from sundae_cli.training import compile_modules

    def no_compiler():
        raise RuntimeError("no working C++ compiler found")

    monkeypatch.setattr(cpp_builder, "get_cpp_compiler", no_compiler)
    module = torch.nn.Linear(2, 2)
    with pytest.raises(InputError) as info:
        compile_modules([module], torch.device("cpu"))
    assert "--compile on the CPU needs a C++ compiler" in info.value.message
    assert "drop --compile" in info.value.hint
    assert module._compiled_call_impl is None  # left as it was


# ---------------------------------------------------------------- vqgan


@pytest.mark.slow
def test_case_c14_vqgan_two_ranks_across_disc_start(tmp_path, monkeypatch):
    from sundae_cli.datasets import export_digits
    from sundae_cli.runs import list_runs

    export_digits(tmp_path / "images", per_class=2)
    overrides = [
        "train.vqgan.steps=4",
        "train.vqgan.disc_start=2",
        "train.vqgan.batch_size=2",
        "train.vqgan.accumulate=2",
        "train.vqgan.log_every=2",
        "train.vqgan.eval_every=4",
        "train.vqgan.checkpoint_every=1000",
    ]
    code, out, err = launch(
        tmp_path / "home",
        tmp_path / "dump",
        "real-objective",
        "train",
        "vqgan",
        str(TINY),
        "--data",
        str(tmp_path / "images"),
        *set_flags(*overrides),
    )
    assert code == 0, err[-3000:]
    assert "unused" not in err.lower() and "Traceback" not in err
    assert err.count("effective batch 8 (per-process 2 x 2 processes x 2") == 1

    rank0, rank1 = ranks(tmp_path / "dump")
    assert any(name.startswith("discriminator.") for name in rank0)
    assert_equal(rank0, rank1)

    # Only rank 0 wrote: one run in the store, with the discriminator's losses
    # logged once it started (step 3 onwards, so in the record of step 4).
    monkeypatch.setenv("SUNDAE_HOME", str(tmp_path / "home"))
    (run,) = list_runs("autoencoder")
    assert out.strip() == str(run.path)
    records = [
        json.loads(line)
        for line in (run.path / "metrics.jsonl").read_text().splitlines()
    ]
    assert [r["step"] for r in records] == [2, 4]
    assert "d_loss" not in records[0] and "d_loss" in records[1]
    meta = json.loads(
        next((run.path / "checkpoints").iterdir()).joinpath("meta.json").read_text()
    )
    assert meta["effective_batch"] == 8 and meta["world_size"] == 2


if __name__ == "__main__":
    _worker(sys.argv[1:])
