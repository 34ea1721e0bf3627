"""Codebook health: how many codes a sliding window of training batches used.

Axes: k codebook size.
"""

from __future__ import annotations

import logging
import math
from collections import deque

import torch

log = logging.getLogger(__name__)


class CodebookUsage:
    """Code hits over the last `window` batches: a sliding window, not per batch.

    `update` adds one batch's indices; when a full window of new batches has gone by
    it checks the usage fraction and logs a warning below `warn_fraction`. Counts stay
    on the device of the indices, so updating never synchronises with an accelerator;
    reading a statistic does.

    Under DDP each rank counts its own batches; the statistics are per rank.
    """

    def __init__(
        self,
        codebook_size: int,
        window: int = 100,
        warn_fraction: float = 0.1,
        dead_threshold: int = 1,
    ) -> None:
        self.codebook_size = codebook_size
        self.window = window
        self.warn_fraction = warn_fraction
        self.dead_threshold = dead_threshold
        self.reset()

    def reset(self) -> None:
        """Forget all counts."""
        self._history: deque[torch.Tensor] = deque()
        self._total: torch.Tensor | None = None
        self.batches_seen = 0

    def update(self, indices: torch.Tensor) -> bool:
        """Count one batch of int64 codes (any shape); True when a window completes."""
        # scatter_add rather than bincount: bincount on CUDA waits for the device.
        flat = indices.reshape(-1)
        counts = torch.zeros(self.codebook_size, dtype=torch.long, device=flat.device)
        counts.scatter_add_(0, flat, torch.ones_like(flat))
        self._history.append(counts)
        self._total = counts.clone() if self._total is None else self._total + counts
        if len(self._history) > self.window:
            self._total -= self._history.popleft()
        self.batches_seen += 1

        window_complete = self.batches_seen % self.window == 0
        if window_complete:
            self._warn_if_collapsed()
        return window_complete

    @property
    def counts(self) -> torch.Tensor:
        """(k,) int64 hits per code over the window (zeros before any update)."""
        if self._total is None:
            return torch.zeros(self.codebook_size, dtype=torch.long)
        return self._total

    @property
    def usage_fraction(self) -> float:
        """Fraction of the codebook hit at least once in the window."""
        return float((self.counts > 0).sum()) / self.codebook_size

    @property
    def perplexity(self) -> float:
        """exp(entropy) of the window's code histogram: 1 (collapse) to k (uniform)."""
        counts = self.counts.double()
        total = counts.sum()
        if total == 0:
            return 0.0
        probs = counts[counts > 0] / total
        return math.exp(float(-(probs * probs.log()).sum()))

    @property
    def dead_codes(self) -> torch.Tensor:
        """int64 indices of codes hit under `dead_threshold` times in the window."""
        return torch.nonzero(self.counts < self.dead_threshold).flatten()

    def stats(self) -> dict[str, float]:
        """The numbers a trainer logs: usage fraction, perplexity, dead-code count."""
        return {
            "codebook_usage": self.usage_fraction,
            "codebook_perplexity": self.perplexity,
            "dead_codes": float(self.dead_codes.numel()),
        }

    def _warn_if_collapsed(self) -> None:
        fraction = self.usage_fraction
        if fraction < self.warn_fraction:
            log.warning(
                "codebook collapse: only %.1f%% of %d codes used in the last %d "
                "batches (warning below %.1f%%); consider the remedies "
                "l2_normalize_codes, kmeans_init or dead_code_restart",
                100 * fraction,
                self.codebook_size,
                self.window,
                100 * self.warn_fraction,
            )
