"""Windowed generation: run a prior trained on one grid over a larger canvas.

Axes: `b` batch, `h w` window height and width, `H W` canvas height and width,
`k` codebook size, `p` windows.

A prior is trained on grids of one size (h, w). To sample a larger or differently
shaped canvas (H, W), every refinement step runs the network on overlapping windows
that cover the canvas (`window_positions`: stride window - overlap per axis, the
last window flush with the edge) and averages, per position, the log-probabilities
of the windows that cover it (`windowed_logits_fn`). The sampler then updates every
position of the canvas in parallel, exactly as on the native grid.

`ShiftedTilings` is the cheaper alternative (`--tiling shifted`): windows that do
not overlap, with the whole tiling moved by half a window on every other step
(`shifted_tilings`; the shifted tiling uses half-size windows along the canvas
edges). Each step costs about the canvas area, as with `--overlap 0`, but no window
boundary stays put, so the seams that a fixed tiling leaves are refined away.

`estimate_sampling_memory` gives a rough upper bound of the memory this needs,
computed without a model.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Literal

import torch
from einops import rearrange

from sundae_cli.errors import InputError
from sundae_cli.sampler import LogitsFn


def _axis_starts(size: int, window: int, overlap: int) -> list[int]:
    """Window starts along one axis, stride window - overlap, the last flush."""
    starts = list(range(0, size - window, window - overlap))
    return [*starts, size - window]


def _fit_window(
    canvas: tuple[int, int], window: tuple[int, int], overlap: int | None
) -> tuple[tuple[int, int], tuple[int, int]]:
    """Window clipped to the canvas, and the overlap per axis (default: half)."""
    fitted = (min(window[0], canvas[0]), min(window[1], canvas[1]))
    if min(fitted) < 1:
        raise InputError(f"empty canvas {canvas} or window {window}")
    if overlap is None:
        return fitted, (fitted[0] // 2, fitted[1] // 2)
    if not 0 <= overlap < min(fitted):
        raise InputError(
            f"--overlap must be in [0, {min(fitted) - 1}] for the window "
            f"{fitted[0]}x{fitted[1]}, got {overlap}"
        )
    return fitted, (overlap, overlap)


def window_positions(
    canvas: tuple[int, int], window: tuple[int, int], overlap: int | None = None
) -> list[tuple[int, int]]:
    """Top-left corners (row, col) of windows covering every position of `canvas`.

    The window is clipped to the canvas; the stride is window - overlap per axis
    (overlap defaults to half the window) and the last window is flush with the edge.
    """
    fitted, overlaps = _fit_window(canvas, window, overlap)
    rows = _axis_starts(canvas[0], fitted[0], overlaps[0])
    cols = _axis_starts(canvas[1], fitted[1], overlaps[1])
    return [(top, left) for top in rows for left in cols]


def _window_weights(window: tuple[int, int], weighting: str) -> torch.Tensor:
    """Weights (h, w): ones, or a tent that peaks mid-window and is 1 at the rim."""
    if weighting == "uniform":
        return torch.ones(window)
    if weighting != "tapered":
        raise InputError(f"--weighting must be 'uniform' or 'tapered': {weighting!r}")
    tents = [
        torch.minimum(torch.arange(size) + 1, size - torch.arange(size))
        for size in window
    ]
    return (tents[0][:, None] * tents[1][None, :]).float()


def windowed_logits_fn(
    logits_fn: LogitsFn,
    *,
    canvas: tuple[int, int],
    window: tuple[int, int],
    overlap: int | None = None,
    weighting: Literal["uniform", "tapered"] = "uniform",
    max_batch: int = 16,
) -> LogitsFn:
    """A logits function for a (H, W) `canvas` from a network trained on `window`.

    The network runs on overlapping windows (see `window_positions`), at most
    `max_batch` windows per call. Each position's result is the weighted average of
    the log-probabilities (log-softmax, fp32) of the windows that cover it: with
    "uniform" weights every window counts the same; "tapered" weights a position by
    its distance from the window's rim, trusting the positions with most context.
    When one window covers the canvas, `logits_fn` itself is returned.
    """
    fitted, _ = _fit_window(canvas, window, overlap)
    positions = window_positions(canvas, window, overlap)
    if len(positions) == 1:
        return logits_fn
    (h, w), weights = fitted, _window_weights(fitted, weighting)
    coverage = torch.zeros(canvas)
    for top, left in positions:
        coverage[top : top + h, left : left + w] += weights

    def windowed(tokens: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        total = _accumulate_windows(
            logits_fn, tokens, labels, positions, weights, canvas, max_batch
        )
        return total.div_(coverage.to(total.device)[None, :, :, None])

    return windowed


def _accumulate_windows(
    logits_fn: LogitsFn,
    tokens: torch.Tensor,
    labels: torch.Tensor | None,
    positions: list[tuple[int, int]],
    weights: torch.Tensor,
    canvas: tuple[int, int],
    max_batch: int,
    total: torch.Tensor | None = None,
) -> torch.Tensor:
    """Weighted sum (b, H, W, k) fp32 of the windows' log-probabilities.

    Added into `total` in place when given (several window sizes, one buffer).
    """
    b, (h, w) = tokens.shape[0], weights.shape
    crops = torch.stack([tokens[:, t : t + h, c : c + w] for t, c in positions])
    crops = rearrange(crops, "p b h w -> (p b) h w")  # window-major
    crop_labels = None if labels is None else labels.repeat(len(positions))
    weights = weights.to(tokens.device)[None, :, :, None]  # (1, h, w, 1)
    for start in range(0, crops.shape[0], max_batch):
        stop = min(start + max_batch, crops.shape[0])
        chunk_labels = None if crop_labels is None else crop_labels[start:stop]
        logp = logits_fn(crops[start:stop], chunk_labels).float().log_softmax(-1)
        if total is None:
            total = logp.new_zeros(b, *canvas, logp.shape[-1])  # (b, H, W, k)
        # The items of one window are a contiguous run of the batch.
        for window in range(start // b, (stop - 1) // b + 1):
            low, high = max(start, window * b), min(stop, (window + 1) * b)
            (t, c), rows = positions[window], slice(low - window * b, high - window * b)
            total[rows, t : t + h, c : c + w] += (
                logp[low - start : high - start] * weights
            )
    return total


Rect = tuple[int, int, int, int]  # top, left, height, width (tokens)


def _plain_segments(size: int, window: int) -> list[tuple[int, int]]:
    """(start, length) along one axis: whole windows side by side, the last flush.

    The flush last window overlaps its neighbour when `size` is not a multiple of
    `window`; positions covered twice are averaged.
    """
    if size <= window:
        return [(0, size)]
    starts = list(range(0, size - window + 1, window))
    if starts[-1] + window < size:
        starts.append(size - window)
    return [(start, window) for start in starts]


def _shifted_segments(size: int, window: int) -> list[tuple[int, int]]:
    """(start, length) along one axis, cut half a window later than `_plain_segments`.

    A half window starts the axis; whole windows follow; the end is a half window
    when that fits exactly, else a whole window flush with the edge. Only half and
    whole windows are used, so any window size the prior accepts at half size works.
    """
    half = window // 2
    if size <= window or half == 0:
        return _plain_segments(size, window)
    segments, start = [(0, half)], half
    while start + window <= size:
        segments.append((start, window))
        start += window
    if start == size - half:
        segments.append((start, half))
    elif start < size:
        segments.append((size - window, window))
    return segments


def shifted_tilings(
    canvas: tuple[int, int], window: tuple[int, int]
) -> tuple[list[Rect], list[Rect]]:
    """Two tilings of `canvas` by windows at most `window`: plain and half-shifted.

    Every position lies inside a window of each tiling; a boundary between windows
    of one tiling runs through the middle of a window of the other.
    """
    tilings = []
    for segments in (_plain_segments, _shifted_segments):
        rows = segments(canvas[0], window[0])
        cols = segments(canvas[1], window[1])
        tilings.append([(t, c, h, w) for t, h in rows for c, w in cols])
    return tilings[0], tilings[1]


class ShiftedTilings:
    """A canvas logits function that alternates two tilings step by step.

    The sampler calls `set_step(step)` before every network call (see
    `sampler.StepAware`): even steps use the plain tiling, odd steps the shifted
    one, so the result depends only on the step, never on earlier batches. Windows
    of one size are batched together, at most `max_batch` per network call.
    """

    def __init__(
        self,
        logits_fn: LogitsFn,
        canvas: tuple[int, int],
        window: tuple[int, int],
        max_batch: int = 16,
    ) -> None:
        self.logits_fn, self.canvas, self.max_batch = logits_fn, canvas, max_batch
        self.step = 0
        self.tilings = []  # per tiling: ({(h, w): [(top, left)]}, coverage (H, W))
        for rects in shifted_tilings(canvas, window):
            by_size: dict[tuple[int, int], list[tuple[int, int]]] = defaultdict(list)
            coverage = torch.zeros(canvas)
            for top, left, h, w in rects:
                by_size[(h, w)].append((top, left))
                coverage[top : top + h, left : left + w] += 1
            self.tilings.append((dict(by_size), coverage))

    @property
    def windows_per_step(self) -> float:
        """Mean number of network windows per step (half windows count as one)."""
        counts = [sum(map(len, by_size.values())) for by_size, _ in self.tilings]
        return sum(counts) / len(counts)

    def set_step(self, step: int) -> None:
        self.step = step

    def __call__(self, tokens: torch.Tensor, labels: torch.Tensor | None):
        by_size, coverage = self.tilings[self.step % 2]
        total = None
        for size, positions in by_size.items():
            total = _accumulate_windows(
                self.logits_fn,
                tokens,
                labels,
                positions,
                torch.ones(size),
                self.canvas,
                self.max_batch,
                total,
            )
        return total.div_(coverage.to(total.device)[None, :, :, None])


def _window_count(length: int, window: int) -> int:
    """Windows along one axis with the default half overlap, without listing them."""
    if length <= window:
        return 1
    stride = max(1, window - window // 2)
    return -(-(length - window) // stride) + 1


def estimate_sampling_memory(
    batch: int,
    canvas: tuple[int, int],
    window: tuple[int, int],
    codebook_size: int,
    width: int,
    bytes_per_el: int = 4,
    max_batch: int = 16,
) -> int:
    """Rough upper bound in bytes of sampling `batch` canvases (H, W) of tokens.

    Counts the canvas logits and the sampler's fp32 copies (logits, unnormalised
    probabilities, CDF), plus one network call of up to `max_batch` windows: its
    logits, their log-softmax, and about 16 activations of `width` per token.
    """
    canvas_positions = batch * canvas[0] * canvas[1]
    sampler = 4 * canvas_positions * codebook_size * 4  # fp32 whatever the network
    windows = _window_count(canvas[0], window[0]) * _window_count(canvas[1], window[1])
    items = min(batch * windows, max_batch) if windows > 1 else batch
    window_tokens = items * min(window[0], canvas[0]) * min(window[1], canvas[1])
    network = window_tokens * (2 * codebook_size + 16 * width) * bytes_per_el
    return sampler + network
