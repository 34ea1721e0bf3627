"""Prior training on the CPU: the 2D hourglass against a flat transformer.

Prints one table:

(a) train-step time (SUNDAE loss with two unroll steps, backward, AdamW; fp32) of
    the hourglass [2, 10, 2] with 2x2 shortening against a flat 14-layer transformer
    of the same width, on 16x16 and 32x32 grids (target at 32x32: 1.8x or more);
(b) the paper's released size, hourglass [2, 4, 2] with 4 heads, against a flat
    8-layer transformer at 32x32 (the hourglass must be clearly faster);
(c) achieved FLOP/s of the hourglass steps, FLOPs counted analytically
    (`train_step_flops`), as a fraction of the fp32 `torch.mm` rate measured in the
    same run;
(d) the paper's ablation at CPU scale: 1D against 2D resampling with the same recipe,
    steps, seed and digit latents; validation loss and accuracy side by side.

The width defaults to 256 rather than the paper's 1024 (too slow for a CPU); what
matters is that the compared models have the same width. Timings interleave the
compared models round by round and report medians, so load that changes during
the run biases neither side.

    python benchmarks/prior_train.py            # full run: tens of minutes
    python benchmarks/prior_train.py --rounds 2 --grids 16 --ablation-steps 20 \\
        --digits-per-class 20                   # smoke run
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from common import matmul_rate, print_table

REPO = Path(__file__).resolve().parent.parent


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--width", type=int, default=256, help="model width d")
    parser.add_argument("--batch", type=int, default=8, help="token grids per step")
    parser.add_argument("--codebook", type=int, default=1024, help="codebook size k")
    parser.add_argument("--grids", default="16,32", help="grid sides for (a)")
    parser.add_argument("--rounds", type=int, default=5, help="timed steps per model")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--skip-throughput", action="store_true")
    parser.add_argument("--skip-ablation", action="store_true")
    parser.add_argument(
        "--ablation-steps", type=int, default=300, help="steps per ablation run"
    )
    parser.add_argument(
        "--recipe", default=str(REPO / "recipes" / "tiny.toml"), help="for (d)"
    )
    parser.add_argument(
        "--latents", type=Path, help="HDF5 latents for (d) (default: digits, encoded)"
    )
    parser.add_argument(
        "--digits-per-class", type=int, default=200, help="digits to encode for (d)"
    )
    return parser.parse_args(argv)


# ---------------------------------------------------------------- models and FLOPs


def build(width: int, depth: list[Any], heads: int, codebook: int, **extra: Any):
    """A randomly initialised hourglass (or flat, for depth [n]) prior."""
    from sundae_hourglass.config import HourglassConfig
    from sundae_hourglass.model import build_prior

    config = HourglassConfig(
        width=width, depth=depth, heads=heads, shortening=2, **extra
    )
    torch.manual_seed(0)
    return build_prior(config, codebook_size=codebook), config


def forward_flops(config: Any, grid: tuple[int, int], codebook: int) -> float:
    """FLOPs (a multiply-add counts 2) of one forward pass over one token grid.

    Per level with n tokens: 2 * matmul parameters * n for its layers, plus
    4 * n^2 * d for attention scores and their weighted sum; 2 * 2 * d^2 * n for the
    shortening and upsampling projections into the next level (linear mode); and
    2 * d * k * n for the logits. Norms, rotary, softmax and sampling are left out.
    """
    from sundae_hourglass.resampling import plan_grids

    d = config.width
    layer_params = (4 + 2 * config.mlp_ratio) * d * d  # qkv, out, MLP
    grids = plan_grids(grid, config.level_shortenings, config.resampling)
    depth, flops = list(config.depth), 2.0 * d * codebook * grid[0] * grid[1]
    for level_grid in grids:
        n = level_grid[0] * level_grid[1]
        layers = depth[0] + (depth[2] if len(depth) == 3 else 0)
        flops += layers * (2 * layer_params * n + 4 * n * n * d)
        if len(depth) == 1:
            break
        flops += 2 * 2 * d * d * n
        depth = depth[1] if isinstance(depth[1], list) else [depth[1]]
    return flops


def train_step_flops(
    config: Any, grid: tuple[int, int], codebook: int, batch: int, unroll: int = 2
) -> float:
    """FLOPs of a SUNDAE train step: `unroll` passes, each forward + backward (3x)."""
    return 3 * unroll * batch * forward_flops(config, grid, codebook)


def make_step(model: torch.nn.Module, grid: tuple[int, int], args) -> Callable:
    """One SUNDAE train step (unroll 2, backward, AdamW) on fixed random tokens."""
    from sundae_cli.objective import unrolled_loss

    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(args.codebook, (args.batch, *grid), generator=generator)
    model.train()

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        result = unrolled_loss(
            model,
            tokens,
            codebook_size=args.codebook,
            unroll_steps=2,
            generator=generator,
        )
        result.loss.backward()
        optimizer.step()

    return step


def interleaved_times(steps: list[Callable], rounds: int, warmup: int) -> list[float]:
    """Median seconds per call of each step, timed alternately round by round."""
    for step in steps:
        for _ in range(warmup):
            step()
    times: list[list[float]] = [[] for _ in steps]
    for _ in range(rounds):
        for index, step in enumerate(steps):
            started = time.perf_counter()
            step()
            times[index].append(time.perf_counter() - started)
    return [statistics.median(series) for series in times]


# ---------------------------------------------------------------- (a) to (c)


def throughput_rows(args) -> list[tuple[str, ...]]:
    """Rows of (a), (b) and (c)."""
    heads = max(1, args.width // 64)
    rows, flop_rates = [], []
    cases = [
        ([2, 10, 2], [14], int(side), "1.8x at 32x32" if int(side) == 32 else "")
        for side in args.grids.split(",")
    ]
    cases.append(([2, 4, 2], [8], 32, "> 1x"))
    for hourglass_depth, flat_depth, side, target in cases:
        grid = (side, side)
        hourglass, config = build(args.width, hourglass_depth, heads, args.codebook)
        flat, _ = build(args.width, flat_depth, heads, args.codebook)
        steps = [make_step(hourglass, grid, args), make_step(flat, grid, args)]
        fast, slow = interleaved_times(steps, args.rounds, args.warmup)
        ratio = slow / fast
        verdict = _verdict(target, ratio)
        rows.append(
            (
                "train step ms (fp32)",
                f"{hourglass_depth} vs flat {flat_depth[0]}, {side}x{side}",
                f"{1000 * fast:.0f}",
                f"{1000 * slow:.0f}",
                f"{ratio:.2f}x",
                f"{target} {verdict}".strip(),
            )
        )
        flops = train_step_flops(config, grid, args.codebook, args.batch)
        flop_rates.append((f"{hourglass_depth}, {side}x{side}", flops / fast))
        del hourglass, flat, steps
    peak = matmul_rate()
    for setting, rate in flop_rates:
        rows.append(
            (
                "achieved GFLOP/s",
                f"{setting} vs torch.mm 2048",
                f"{rate / 1e9:.1f}",
                f"{peak / 1e9:.1f}",
                f"{rate / peak:.2f}",
                "fraction of mm",
            )
        )
    return rows


def _verdict(target: str, ratio: float) -> str:
    if target.startswith("1.8x"):
        return "ok" if ratio >= 1.8 else "MISSED"
    if target.startswith(">"):
        return "ok" if ratio > 1.0 else "MISSED"
    return ""


# ---------------------------------------------------------------- (d)


def digit_latents(folder: Path, per_class: int) -> Path:
    """Real digits encoded by a random-initialised tiny VQ-GAN (as the tests do)."""
    from sundae_cli.checkpoints import save_checkpoint
    from sundae_cli.datasets import export_digits
    from sundae_cli.encode import encode_folder
    from sundae_cli.models import load_autoencoder
    from sundae_cli.plugins import get_autoencoder_backend
    from sundae_cli.recipes import load_recipe
    from sundae_cli.runs import create_run

    export_digits(folder / "images", per_class=per_class)
    recipe = load_recipe(REPO / "recipes" / "tiny.toml")
    torch.manual_seed(0)
    model = get_autoencoder_backend("vqgan").build(recipe.autoencoder.config)
    run = create_run("autoencoder", "tiny", {}, out=folder / "ae")
    meta = {"kind": "autoencoder", "recipe": recipe.to_dict()}
    save_checkpoint(run.path, 1, model.state_dict(), None, meta)
    loaded = load_autoencoder(run.path, torch.device("cpu"))
    out = folder / "latents.h5"
    encode_folder(
        folder / "images", out, loaded, labels_from_subfolders=True, num_workers=0
    )
    return out


def ablation_rows(args, workdir: Path) -> list[tuple[str, ...]]:
    """Rows of (d): the same budget with 2D and 1D resampling."""
    from sundae_cli.recipes import load_recipe
    from sundae_cli.train_prior import train_prior

    latents = args.latents or digit_latents(workdir / "digits", args.digits_per_class)
    steps = args.ablation_steps
    scores = {}
    for mode in ("2d", "1d"):
        recipe = load_recipe(
            args.recipe,
            [
                f"prior.resampling={mode!r}",
                'device="cpu"',
                'precision="fp32"',
                f"train.prior.steps={steps}",
                f"train.prior.log_every={steps}",
                f"train.prior.eval_every={steps}",
                f"train.prior.sample_every={10 * steps}",
                f"train.prior.checkpoint_every={10 * steps}",
                "sampling.steps=2",  # the sample grid at the end is not measured
                "sampling.min_steps=0",
            ],
        )
        result = train_prior(recipe, latents=latents, out=workdir / f"prior-{mode}")
        scores[mode] = result.metrics
    rows = []
    for key, label in (("val_loss", "val loss"), ("val_acc_1", "val accuracy")):
        two, one = scores["2d"].get(key), scores["1d"].get(key)
        if two is None or one is None:
            rows.append((f"ablation {label}", "no validation items", "", "", "", ""))
            continue
        better = (two < one) if key == "val_loss" else (two > one)
        rows.append(
            (
                f"ablation {label}",
                f"2D vs 1D resampling, {steps} steps",
                f"{two:.4f}",
                f"{one:.4f}",
                f"{two - one:+.4f}",
                "2D better" if better else "1D better or equal",
            )
        )
    return rows


# ---------------------------------------------------------------- table


HEADER = ("measure", "setting", "hourglass/2D", "baseline", "ratio", "target")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    from sundae_cli.console import setup_logging

    setup_logging(-1)  # warnings only: no progress bars or log lines in the table
    rows = []
    with tempfile.TemporaryDirectory(prefix="sundae-bench-") as tmp:
        os.environ["SUNDAE_HOME"] = tmp  # keep the ablation's runs out of the store
        if not args.skip_throughput:
            rows += throughput_rows(args)
        if not args.skip_ablation:
            try:
                rows += ablation_rows(args, Path(tmp))
            except Exception as exc:  # keep the throughput rows already measured
                message = f"{type(exc).__name__}: {exc}"[:60]
                rows.append(("ablation", "failed", message, "", "", ""))
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, width "
        f"{args.width}, batch {args.batch}, codebook {args.codebook}, "
        f"{args.rounds} timed rounds"
    )
    print_table(HEADER, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
