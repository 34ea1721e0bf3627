"""The SUNDAE training objective (Savinov et al. 2022), independent of the network.

Axes: `b` batch, `h w` grid height and width, `k` codebook size, `t` unroll step.

For a batch of clean token grids: draw a corruption rate r ~ U(0, 1) per item and
replace each token by a uniformly random one with probability r; run the model, draw
a sample from its logits at temperature 1 without gradient and feed it back as the
next input, `unroll_steps` times. The loss is the cross-entropy against the clean
tokens, averaged over every unrolled step and position.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Protocol

import torch
import torch.nn.functional as F
from einops import rearrange

from sundae_cli.errors import InputError

log = logging.getLogger(__name__)


class LogitsModel(Protocol):
    """A prior: (b, h, w) int64 tokens [, (b,) labels] -> (b, h, w, k) logits."""

    def __call__(
        self, tokens: torch.Tensor, class_labels: torch.Tensor | None = None
    ) -> torch.Tensor: ...


@dataclass
class UnrolledLoss:
    """Result of `unrolled_loss`: the loss to back-propagate and per-step metrics."""

    loss: torch.Tensor  # scalar, mean cross-entropy over steps and positions
    step_losses: list[float] = field(default_factory=list)  # one per unroll step
    step_accuracies: list[float] = field(default_factory=list)  # argmax == clean


def corrupt(
    tokens: torch.Tensor,
    codebook_size: int,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Corrupt clean tokens (b, h, w) int64 -> (corrupted (b, h, w), rates (b,)).

    Each item draws r ~ U(0, 1); each of its tokens is replaced, with probability r,
    by a token drawn uniformly from the codebook (which may equal the original, so
    the expected changed fraction is r (1 - 1/k)). Random numbers come from
    `generator` on its own device; the results are on the device of `tokens`.
    """
    where = generator.device if generator is not None else tokens.device
    shape = tuple(tokens.shape)
    rates = torch.rand(shape[0], generator=generator, device=where)  # (b,)
    replace = torch.rand(shape, generator=generator, device=where)
    replace = replace < rates[:, None, None]
    noise = torch.randint(codebook_size, shape, generator=generator, device=where)
    replace, noise = replace.to(tokens.device), noise.to(tokens.device)
    return torch.where(replace, noise, tokens), rates.to(tokens.device)


@torch.no_grad()
def _sample_logits(
    logits: torch.Tensor, generator: torch.Generator | None
) -> torch.Tensor:
    """Draw tokens (b, h, w) from logits (b, h, w, k) at temperature 1, no gradient."""
    b, h, w, _ = logits.shape
    probs = rearrange(logits.detach().float(), "b h w k -> (b h w) k").softmax(-1)
    if generator is not None and generator.device != probs.device:
        probs = probs.to(generator.device)
    drawn = torch.multinomial(probs, 1, generator=generator)  # ((b h w), 1)
    drawn = drawn.to(logits.device)
    return rearrange(drawn, "(b h w) 1 -> b h w", b=b, h=h, w=w)


def unrolled_loss(
    model: LogitsModel,
    tokens: torch.Tensor,
    *,
    codebook_size: int,
    unroll_steps: int = 2,
    class_labels: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> UnrolledLoss:
    """SUNDAE loss of `model` on clean tokens (b, h, w) int64.

    `class_labels` (b,) int64 is passed to the model at every step. Cross-entropy and
    accuracy are computed in fp32 whatever the model's precision. Samples fed back
    between steps are detached: gradients flow only through each step's logits.
    """
    if unroll_steps < 1:
        raise InputError(
            f"unroll steps must be >= 1, got {unroll_steps}",
            hint="set train.prior.unroll_steps to 1 or more",
        )
    inputs, _ = corrupt(tokens, codebook_size, generator)
    targets = rearrange(tokens, "b h w -> (b h w)")
    losses, accuracies = [], []
    for step in range(unroll_steps):
        logits = model(inputs, class_labels)  # (b, h, w, k)
        flat = rearrange(logits, "b h w k -> (b h w) k").float()
        losses.append(F.cross_entropy(flat, targets))
        accuracies.append((flat.detach().argmax(-1) == targets).float().mean())
        if step + 1 < unroll_steps:
            inputs = _sample_logits(logits, generator)

    loss = torch.stack(losses).mean()
    metrics = torch.stack(
        [torch.stack([x.detach() for x in losses]), torch.stack(accuracies)]
    ).tolist()  # one device sync for all metrics
    return UnrolledLoss(loss=loss, step_losses=metrics[0], step_accuracies=metrics[1])
