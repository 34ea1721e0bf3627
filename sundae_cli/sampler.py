"""The SUNDAE sampler: refine random token grids in parallel, independent of the net.

Axes: `b` batch, `h w` grid height and width, `n` flattened tokens (row-major),
`k` codebook size.

Start from uniform random tokens. Each step computes logits for every position of the
samples still running, draws a proposal per position at temperature tau (optionally
among the top-k codes) and replaces tokens by their proposals: with probability p
each ("random" update, the paper's), or the share p of free positions whose proposal
is most probable ("confidence" update). tau and p move linearly from their start to
their end value over the steps. A sample whose tokens did not change in a whole step,
after `min_steps` steps, has stopped and leaves the batch.

Every sample owns a CPU `torch.Generator` seeded with its seed, and draws the same
numbers in the same order whatever the batch: n initial tokens, then 2n uniforms per
step (proposals by inverse CDF, then the random-update mask). So sample i depends on
its seed only, not on the batch size, its neighbours or N, and a seed gives the same
draws on every device (up to the network's own numerics). Commands give sample i of
a run seeded with S the seed `derive_seed(S, i)` and record it with the image.
Drawing per sample costs O(n) uniforms per sample and step; proposals use inverse
CDF sampling (softmax, cumsum, searchsorted), not Gumbel-max, which would need n * k
uniforms per sample and step.

Deviation: the "confidence" update is ours, in the spirit of the argmax-unrolled
decoding of the text SUNDAE paper; the megapixel paper uses the random update only.
Proposals are still drawn at temperature tau, but instead of a random subset, the
share p of the free positions whose drawn proposals are most probable is accepted
(see `confidence_mask`).

Canvases larger than the prior's grid are sampled through `sundae_cli.windows`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol, runtime_checkable

import torch
from einops import rearrange

from sundae_cli.errors import InputError

log = logging.getLogger(__name__)

LogitsFn = Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor]
MASK64 = (1 << 64) - 1


@runtime_checkable
class StepAware(Protocol):
    """A logits function that varies with the step (such as `ShiftedTilings`).

    The sampler calls `set_step(step)` right before each step's network call.
    """

    def set_step(self, step: int) -> None: ...


def _splitmix64(value: int) -> int:
    """One step of the SplitMix64 generator (Steele, Lea and Flood 2014)."""
    value = (value + 0x9E3779B97F4A7C15) & MASK64
    value = ((value ^ (value >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    value = ((value ^ (value >> 27)) * 0x94D049BB133111EB) & MASK64
    return value ^ (value >> 31)


def derive_seed(seed: int, index: int) -> int:
    """Seed of sample `index` of a run seeded with `seed`: a stable 63-bit hash.

    SplitMix64 of SplitMix64(seed) xor index, shifted to 63 bits so it fits an int64.
    Stable across Python versions and platforms (no `hash()`).
    """
    return _splitmix64(_splitmix64(seed & MASK64) ^ (index & MASK64)) >> 1


def _pair(value: float | Sequence[float], flag: str) -> tuple[float, float]:
    if isinstance(value, int | float):
        return float(value), float(value)
    values = tuple(float(v) for v in value)
    if len(values) != 2:
        raise InputError(f"{flag} takes one value or a start and end value")
    return values[0], values[1]


def _show(pair: tuple[float, float]) -> str:
    """A (start, end) pair as the flag takes it: `0.8`, or `1.0:0.7`."""
    return f"{pair[0]:g}" if pair[0] == pair[1] else f"{pair[0]:g}:{pair[1]:g}"


_HINTS = {
    "--temperature": "for example --temperature 0.8, or --temperature 1.0:0.7",
    "--proportion": "for example --proportion 0.5, or --proportion 0.8:0.2",
}


@dataclass(frozen=True)
class SamplerSettings:
    """How `sample_tokens` refines tokens; errors name the CLI flag to fix."""

    steps: int = 100  # most refinement steps per sample
    temperature: tuple[float, float] = (0.8, 0.8)  # start, end; a number is constant
    proportion: tuple[float, float] = (0.5, 0.5)  # share of tokens updated per step
    top_k: int | None = None  # draw proposals among the k most likely codes only
    update: Literal["random", "confidence"] = "random"
    min_steps: int = 10  # steps before a sample may stop early
    early_stop: bool = True  # stop a sample once a step changes none of its tokens
    history_every: int = 0  # keep the start and every k-th step; 0 keeps none

    def __post_init__(self) -> None:
        temperature = _pair(self.temperature, "--temperature")
        proportion = _pair(self.proportion, "--proportion")
        object.__setattr__(self, "temperature", temperature)
        object.__setattr__(self, "proportion", proportion)
        t_low, p_low, p_high = min(temperature), min(proportion), max(proportion)
        problems = [
            (self.steps < 1, f"--steps must be >= 1, got {self.steps}"),
            (t_low <= 0, f"--temperature must be > 0, got {_show(temperature)}"),
            (
                p_low < 0 or p_high > 1,
                f"--proportion must be in [0, 1], got {_show(proportion)}",
            ),
            (
                self.top_k is not None and self.top_k < 1,
                f"--top-k must be >= 1, got {self.top_k}",
            ),
            (
                self.update not in ("random", "confidence"),
                f"--update must be 'random' or 'confidence', got {self.update!r}",
            ),
            (self.min_steps < 0, f"--min-steps must be >= 0, got {self.min_steps}"),
            (
                self.history_every < 0,
                f"--history-every must be >= 0, got {self.history_every}",
            ),
        ]
        for failed, message in problems:
            if failed:
                flag = message.split()[0]
                raise InputError(message, hint=_HINTS.get(flag))

    def _linear(self, pair: tuple[float, float], step: int) -> float:
        fraction = step / (self.steps - 1) if self.steps > 1 else 0.0
        return pair[0] + (pair[1] - pair[0]) * fraction

    def temperature_at(self, step: int) -> float:
        """Temperature of 0-based `step`: start at step 0, end at the last step."""
        return self._linear(self.temperature, step)

    def proportion_at(self, step: int) -> float:
        """Update proportion of 0-based `step`, linear like the temperature."""
        return self._linear(self.proportion, step)


@dataclass
class SampleResult:
    """Tokens (b, h, w) int64, steps run per sample, and kept snapshots (CPU)."""

    tokens: torch.Tensor
    steps_used: list[int]
    history: list[torch.Tensor] = field(default_factory=list)


def propose(
    logits: torch.Tensor, temperature: float, top_k: int | None, uniforms: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw proposals by inverse CDF: logits (b, n, k), uniforms (b, n) in [0, 1).

    Returns proposals (b, n) int64 and their probabilities (b, n) float32 under the
    tempered (and top-k truncated) distribution. fp32 `logits` are overwritten in
    place (the sampler owns the network's output): at batch 16 and a 32x32 grid of
    1024 codes every full-size temporary costs 64 MiB of fresh pages per step.
    """
    weights = logits.float().contiguous()  # the same tensor for fp32 network output
    indices = None
    if top_k is not None and top_k < weights.shape[-1]:
        weights, indices = weights.topk(top_k, dim=-1)  # (b, n, top_k)
    weights.div_(temperature)
    weights.sub_(weights.amax(-1, keepdim=True)).exp_()  # unnormalised probabilities
    cdf = torch.cumsum(weights, -1, out=weights)  # (b, n, k), in place
    total = cdf[..., -1:]
    choice = torch.searchsorted(cdf, uniforms[..., None] * total, right=True)
    choice = choice.clamp_(max=cdf.shape[-1] - 1)  # rounding guard
    upper = cdf.gather(-1, choice)
    lower = cdf.gather(-1, (choice - 1).clamp_(min=0)).masked_fill_(choice == 0, 0.0)
    confidence = (upper - lower) / total
    if indices is not None:
        choice = indices.gather(-1, choice)
    return choice[..., 0], confidence[..., 0]


def confidence_mask(
    confidence: torch.Tensor, proportion: float, free: torch.Tensor
) -> torch.Tensor:
    """Update mask (b, n) bool of the confidence update.

    Of each sample's free positions (`free` (b, n) bool), the m = floor(p * free + 1/2)
    whose proposals are most probable are updated; ties go to the earlier position.
    """
    count = torch.floor(proportion * free.sum(-1) + 0.5)  # (b,)
    score = confidence.masked_fill(~free, -1.0)  # fixed positions rank last
    order = score.argsort(dim=-1, descending=True, stable=True)
    positions = torch.arange(score.shape[-1], device=score.device).expand_as(order)
    ranks = torch.empty_like(order).scatter_(-1, order, positions)
    return ranks < count[:, None]


@dataclass
class _Active:
    """The samples still running, compacted: batch indices and their rows."""

    index: list[int]
    tokens: torch.Tensor  # (b', n) int64
    free: torch.Tensor  # (b', n) bool, False where fixed
    labels: torch.Tensor | None  # (b',)

    def keep(self, rows: torch.Tensor) -> None:
        """Keep only the rows where `rows` (b',) bool is True."""
        self.index = [
            i for i, kept in zip(self.index, rows.tolist(), strict=True) if kept
        ]
        self.tokens, self.free = self.tokens[rows], self.free[rows]
        self.labels = None if self.labels is None else self.labels[rows]


def _draw(
    generators: list[torch.Generator], shape: tuple[int, ...], device: torch.device
) -> torch.Tensor:
    """Uniforms (b', *shape) from each sample's own generator, moved to `device`."""
    drawn = torch.stack([torch.rand(shape, generator=g) for g in generators])
    return drawn.to(device, non_blocking=True)


def _refine_step(
    logits_fn: LogitsFn,
    active: _Active,
    generators: list[torch.Generator],
    settings: SamplerSettings,
    step: int,
    grid: tuple[int, int],
) -> torch.Tensor:
    """Run one step on the active samples in place; return changed counts (b',)."""
    tokens = rearrange(active.tokens, "b (h w) -> b h w", h=grid[0], w=grid[1])
    if isinstance(logits_fn, StepAware):
        logits_fn.set_step(step)
    logits = rearrange(logits_fn(tokens, active.labels), "b h w k -> b (h w) k")
    uniforms = _draw(
        [generators[i] for i in active.index],
        (2, grid[0] * grid[1]),
        active.tokens.device,
    )  # (b', 2, n)
    proposals, confidence = propose(
        logits, settings.temperature_at(step), settings.top_k, uniforms[:, 0]
    )
    proportion = settings.proportion_at(step)
    if settings.update == "confidence":
        update = confidence_mask(confidence, proportion, active.free)
    else:
        update = (uniforms[:, 1] < proportion) & active.free
    new_tokens = torch.where(update, proposals, active.tokens)
    changed = (new_tokens != active.tokens).sum(-1)
    active.tokens = new_tokens
    return changed


@torch.no_grad()
def sample_tokens(
    logits_fn: LogitsFn,
    *,
    batch_size: int,
    grid: tuple[int, int],
    codebook_size: int,
    seeds: list[int],
    settings: SamplerSettings,
    init_tokens: torch.Tensor | None = None,
    fixed_mask: torch.Tensor | None = None,
    class_labels: torch.Tensor | None = None,
    device: str | torch.device = "cpu",
) -> SampleResult:
    """Sample `batch_size` token grids (h, w) = `grid`; sample i uses `seeds[i]`.

    `logits_fn(tokens (b', h, w), labels (b',) | None) -> (b', h, w, k)` is called
    on the active samples only; its logits may be any float dtype (the sampling
    maths runs in fp32). Without `fixed_mask`, `init_tokens` (b, h, w) int64
    replaces the random start everywhere (upscaling an image). With `fixed_mask`
    (b, h, w) bool, True positions take `init_tokens` and never change while the
    other positions start random (inpainting). `class_labels` (b,) int64 follow
    their samples as the batch shrinks. `history` holds the start and the tokens
    after every `history_every`-th step, on the CPU.
    """
    device = torch.device(device)
    _check_request(
        batch_size, grid, codebook_size, seeds, init_tokens, fixed_mask, class_labels
    )
    generators = [torch.Generator().manual_seed(seed & MASK64) for seed in seeds]
    active = _start(
        generators, grid, codebook_size, init_tokens, fixed_mask, class_labels, device
    )
    final = active.tokens.clone()
    steps_used = [settings.steps] * batch_size
    history = [final.to("cpu", copy=True)] if settings.history_every else []

    for step in range(settings.steps):
        changed = _refine_step(logits_fn, active, generators, settings, step, grid)
        final[active.index] = active.tokens
        if settings.history_every and (step + 1) % settings.history_every == 0:
            history.append(final.to("cpu", copy=True))
        if settings.early_stop and step + 1 >= settings.min_steps:
            stopped = changed == 0
            for i in torch.nonzero(stopped).flatten().tolist():
                steps_used[active.index[i]] = step + 1
            active.keep(~stopped)
        if not active.index:
            break

    unflat = "b (h w) -> b h w"
    return SampleResult(
        tokens=rearrange(final, unflat, h=grid[0]),
        steps_used=steps_used,
        history=[rearrange(x, unflat, h=grid[0]) for x in history],
    )


def _start(
    generators: list[torch.Generator],
    grid: tuple[int, int],
    codebook_size: int,
    init_tokens: torch.Tensor | None,
    fixed_mask: torch.Tensor | None,
    class_labels: torch.Tensor | None,
    device: torch.device,
) -> _Active:
    """Start tokens (b, n): random, `init_tokens`, or init where fixed, else random.

    The random tokens are always drawn, so every sample's stream stays aligned.
    """
    n = grid[0] * grid[1]
    tokens = torch.stack(
        [torch.randint(codebook_size, (n,), generator=g) for g in generators]
    ).to(device)  # (b, n)
    free = torch.ones_like(tokens, dtype=torch.bool)
    if init_tokens is not None:
        init = rearrange(init_tokens, "b h w -> b (h w)").to(device, torch.int64)
        if fixed_mask is None:
            tokens = init
        else:
            free = ~rearrange(fixed_mask, "b h w -> b (h w)").to(device, torch.bool)
            tokens = torch.where(free, tokens, init)
    labels = None if class_labels is None else class_labels.to(device)
    return _Active(list(range(len(generators))), tokens, free, labels)


def _check_request(
    batch_size: int,
    grid: tuple[int, int],
    codebook_size: int,
    seeds: list[int],
    init_tokens: torch.Tensor | None,
    fixed_mask: torch.Tensor | None,
    class_labels: torch.Tensor | None,
) -> None:
    """Raise `InputError` for inconsistent sampler arguments."""
    shape = (batch_size, *grid)
    if batch_size < 1 or min(grid) < 1:
        raise InputError(f"nothing to sample: batch {batch_size}, grid {grid}")
    if len(seeds) != batch_size:
        raise InputError(f"got {len(seeds)} seeds for {batch_size} samples")
    if fixed_mask is not None and init_tokens is None:
        raise InputError("fixed positions need init tokens to keep")
    for name, tensor in (("init tokens", init_tokens), ("fixed mask", fixed_mask)):
        if tensor is not None and tuple(tensor.shape) != shape:
            raise InputError(f"{name} have shape {tuple(tensor.shape)}, not {shape}")
    if init_tokens is not None and init_tokens.numel():
        low, high = int(init_tokens.min()), int(init_tokens.max())
        if low < 0 or high >= codebook_size:
            raise InputError(
                f"init tokens range over {low}..{high}, outside the codebook "
                f"0..{codebook_size - 1}",
                hint="encode the image with the autoencoder that the prior was "
                "trained on",
            )
    if class_labels is not None and tuple(class_labels.shape) != (batch_size,):
        raise InputError(
            f"class labels have shape {tuple(class_labels.shape)}, not ({batch_size},)"
        )
