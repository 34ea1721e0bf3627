"""GPU benchmark of the paper-size models, randomly initialised: one table.

For the "256" (16x16 grid, 1024 codes) and "1024" (32x32 grid, 8192 codes) presets of
recipes/ffhq256.toml and recipes/ffhq1024.toml:

- sampling seconds per image at batch 1 and batch 16, 100 steps, early stop off,
  bf16 autocast where the card supports it (as `sundae sample` runs);
- decoding seconds per image with the preset's VQ-GAN decoder (fp32, as
  `sundae_cli.generation.decode_images` runs it);
- prior train-step time and tokens per second (SUNDAE loss with the recipe's unroll
  steps and batch size, bf16 autocast, AdamW), peak memory, and the achieved FLOP/s
  (FLOPs counted as in benchmarks/prior_train.py) against the bf16 `torch.mm` rate
  measured on this card in the same run;
- `--compile` runs the prior through `torch.compile` (compilation time is excluded
  from the timings but can take minutes).

Sized to finish in about five minutes on one recent GPU without `--compile`. Without
a CUDA device it prints why on stderr and exits with status 2 (nothing measured).

    python benchmarks/gpu.py [--presets 256,1024] [--compile] [--train-steps 10]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from common import print_table

REPO = Path(__file__).resolve().parent.parent
RECIPES = {"256": "ffhq256.toml", "1024": "ffhq1024.toml"}
DEVICE = "cuda"  # every measurement runs here
EXIT_NOT_RUN = 2  # no CUDA device or an unknown preset: nothing measured


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--presets", default="256,1024", help="from: 256, 1024")
    parser.add_argument("--sample-steps", type=int, default=100)
    parser.add_argument("--train-steps", type=int, default=10, help="timed steps")
    parser.add_argument("--compile", action="store_true", help="torch.compile prior")
    return parser.parse_args(argv)


def timed(fn: Callable[[], Any], repeats: int = 1) -> float:
    """Median seconds of `fn` over `repeats` calls, synchronised with the GPU."""
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        started = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def bf16_matmul_rate(size: int = 8192, repeats: int = 20) -> float:
    """bf16 FLOP/s of `torch.mm` on size x size matrices (median of 3 bursts)."""
    a = torch.randn(size, size, device=DEVICE, dtype=torch.bfloat16)
    b = torch.randn(size, size, device=DEVICE, dtype=torch.bfloat16)
    torch.mm(a, b)

    def burst() -> None:
        for _ in range(repeats):
            torch.mm(a, b)

    return 2 * size**3 * repeats / timed(burst, repeats=3)


def build_models(preset: str, compile_prior: bool) -> tuple[Any, Any, Any]:
    """(recipe, prior, autoencoder) of a preset, random weights, on the GPU."""
    from sundae_cli.plugins import get_autoencoder_backend, get_prior_backend
    from sundae_cli.recipes import load_recipe

    recipe = load_recipe(REPO / "recipes" / RECIPES[preset])
    torch.manual_seed(0)
    with torch.device(DEVICE):
        prior = get_prior_backend(recipe.prior.backend).build(
            recipe.prior.config, codebook_size=recipe.codebook_size
        )
        autoencoder = get_autoencoder_backend(recipe.autoencoder.backend).build(
            recipe.autoencoder.config
        )
    if compile_prior:
        prior.compile()
    return recipe, prior, autoencoder.eval()


def dtype_for_card() -> torch.dtype:
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32


def sample_seconds(recipe: Any, prior: Any, batch: int, steps: int) -> float:
    """Seconds per image to sample `batch` token grids for `steps` steps."""
    from sundae_cli.sampler import SamplerSettings, derive_seed, sample_tokens

    dtype = dtype_for_card()

    def logits_fn(tokens: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        with torch.autocast(DEVICE, dtype=dtype, enabled=dtype != torch.float32):
            return prior(tokens, labels)

    def run(count: int, run_steps: int) -> None:
        with torch.inference_mode():
            sample_tokens(
                logits_fn,
                batch_size=count,
                grid=recipe.grid,
                codebook_size=recipe.codebook_size,
                seeds=[derive_seed(0, i) for i in range(count)],
                settings=SamplerSettings(steps=run_steps, early_stop=False),
                device=DEVICE,
            )

    prior.eval()
    run(batch, 3)  # warm-up (and compilation with --compile)
    return timed(lambda: run(batch, steps)) / batch


def decode_seconds(recipe: Any, autoencoder: Any, batch: int) -> float:
    """Seconds per image to decode `batch` token grids with the VQ-GAN decoder."""
    tokens = torch.randint(recipe.codebook_size, (batch, *recipe.grid), device=DEVICE)

    def run() -> None:
        with torch.inference_mode():
            autoencoder.decode(tokens)

    run()
    return timed(run, repeats=3) / batch


def train_step_seconds(recipe: Any, prior: Any, steps: int) -> float:
    """Seconds per SUNDAE train step (recipe batch and unroll, bf16, AdamW)."""
    from sundae_cli.objective import unrolled_loss

    section = recipe.train.prior
    optimizer = torch.optim.AdamW(prior.parameters(), lr=section.learning_rate)
    generator = torch.Generator(device=DEVICE).manual_seed(0)
    tokens = torch.randint(
        recipe.codebook_size, (section.batch_size, *recipe.grid), device=DEVICE
    )
    dtype = dtype_for_card()
    prior.train()

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(DEVICE, dtype=dtype, enabled=dtype != torch.float32):
            result = unrolled_loss(
                prior,
                tokens,
                codebook_size=recipe.codebook_size,
                unroll_steps=section.unroll_steps,
                generator=generator,
            )
        result.loss.backward()
        optimizer.step()

    for _ in range(3):  # warm-up: allocator, kernels, compilation with --compile
        step()
    return timed(lambda: [step() for _ in range(steps)]) / steps


def measured(fn: Callable[[], float]) -> tuple[float | None, float]:
    """(fn(), or None when it ran out of memory; peak GiB allocated meanwhile)."""
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    try:
        value = fn()
    except torch.cuda.OutOfMemoryError:
        value = None
    peak = torch.cuda.max_memory_allocated() / 2**30
    torch.cuda.empty_cache()
    return value, peak


def preset_rows(preset: str, args, peak_rate: float) -> list[tuple[str, str, str]]:
    """Table rows of one preset; a measurement that runs out of memory says so."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))  # one FLOP formula
    from prior_train import train_step_flops

    recipe, prior, autoencoder = build_models(preset, args.compile)
    name = f"{preset} ({recipe.grid[0]}x{recipe.grid[1]})"
    section = recipe.train.prior
    rows = []

    def row(measure: str, value: float | None, peak: float, scale: float = 1.0):
        text = "out of memory" if value is None else f"{value * scale:.3f}"
        rows.append((name, measure, f"{text}  [peak {peak:.1f} GiB]"))

    for batch in (1, 16):
        value, peak = measured(
            lambda b=batch: sample_seconds(recipe, prior, b, args.sample_steps)
        )
        row(f"sample s/image, batch {batch}, {args.sample_steps} steps", value, peak)
    for batch in (1, 4):
        value, peak = measured(lambda b=batch: decode_seconds(recipe, autoencoder, b))
        row(f"decode s/image, batch {batch} (fp32)", value, peak)

    seconds, peak = measured(
        lambda: train_step_seconds(recipe, prior, args.train_steps)
    )
    batch, unroll = section.batch_size, section.unroll_steps
    row(f"train step ms, batch {batch}, unroll {unroll}", seconds, peak, 1000)
    if seconds is not None:
        tokens = batch * recipe.grid[0] * recipe.grid[1]
        config, codes = recipe.prior.config, recipe.codebook_size
        rate = train_step_flops(config, recipe.grid, codes, batch, unroll) / seconds
        rows.append((name, "train tokens/s", f"{tokens / seconds:,.0f}"))
        rows.append(
            (
                name,
                "train achieved TFLOP/s (fraction of bf16 mm)",
                f"{rate / 1e12:.1f} ({rate / peak_rate:.2f})",
            )
        )
    return rows  # the models are freed here, before the next preset


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print(
            "error: no CUDA device: benchmarks/gpu.py measures GPU sampling, decoding "
            "and training, and nothing was measured\n"
            "hint: run it on a machine with an NVIDIA GPU; for the CPU see "
            "benchmarks/prior_train.py",
            file=sys.stderr,
        )
        return EXIT_NOT_RUN
    presets = [p.strip() for p in args.presets.split(",") if p.strip()]
    unknown = [p for p in presets if p not in RECIPES]
    if unknown:
        print(
            f"error: unknown preset(s) {unknown}; choose from 256, 1024",
            file=sys.stderr,
        )
        return EXIT_NOT_RUN
    peak_rate = bf16_matmul_rate()
    rows = [
        (
            "card",
            torch.cuda.get_device_name(),
            f"bf16 mm {peak_rate / 1e12:.0f} TFLOP/s",
        )
    ]
    for preset in presets:
        rows += preset_rows(preset, args, peak_rate)
    print(f"torch {torch.__version__}, compile={args.compile}")
    print_table(("preset", "measure", "value"), rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
