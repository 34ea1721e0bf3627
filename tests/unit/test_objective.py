"""The SUNDAE objective: corruption statistics, unrolling and learning."""

from __future__ import annotations

import math

import pytest
import torch

from sundae_cli.errors import InputError
from sundae_cli.objective import UnrolledLoss, corrupt, unrolled_loss
from sundae_hourglass.config import HourglassConfig
from sundae_hourglass.model import build_prior


def test_corruption_rate_matches_its_target():
    k = 4
    tokens = torch.zeros(600, 16, 16, dtype=torch.int64)
    generator = torch.Generator().manual_seed(0)
    corrupted, rates = corrupt(tokens, k, generator)
    assert corrupted.shape == tokens.shape and corrupted.dtype == torch.int64
    assert rates.shape == (600,) and 0 <= rates.min() and rates.max() < 1
    assert 0 <= corrupted.min() and corrupted.max() < k

    changed = (corrupted != tokens).float().mean((1, 2))  # per item
    expected = rates * (1 - 1 / k)
    # Per item: a binomial fraction over 256 tokens, std <= 0.5 / 16.
    assert (changed - expected).abs().max() < 0.15
    assert (changed - expected).abs().mean() < 0.03
    # Over items: E[r] (1 - 1/k) = 0.375.
    assert abs(changed.mean().item() - 0.375) < 0.03
    # Replacement tokens are uniform over the codebook (0 also drawn by chance).
    replaced = corrupted[corrupted != 0]
    counts = torch.bincount(replaced, minlength=k)[1:].float()
    assert (counts / counts.mean() - 1).abs().max() < 0.05


def test_corruption_is_seeded():
    tokens = torch.randint(0, 9, (4, 3, 5))
    first = corrupt(tokens, 9, torch.Generator().manual_seed(3))
    second = corrupt(tokens, 9, torch.Generator().manual_seed(3))
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])


class Recorder(torch.nn.Module):
    """A model that predicts token 3 everywhere with certainty, and records inputs."""

    codebook_size = 5
    num_classes = 0

    def __init__(self) -> None:
        super().__init__()
        self.bias = torch.nn.Parameter(torch.zeros(5))
        self.inputs: list[torch.Tensor] = []

    def forward(self, tokens, class_labels=None):
        self.inputs.append(tokens)
        logits = torch.full((*tokens.shape, 5), -30.0)
        logits[..., 3] = 30.0
        return logits + self.bias


def test_unrolled_loss_feeds_detached_samples_back():
    model = Recorder()
    tokens = torch.randint(0, 5, (3, 4, 4))
    result = unrolled_loss(
        model,
        tokens,
        codebook_size=5,
        unroll_steps=3,
        generator=torch.Generator().manual_seed(0),
    )
    assert isinstance(result, UnrolledLoss)
    assert len(model.inputs) == 3
    for fed_back in model.inputs[1:]:
        assert fed_back.grad_fn is None and not fed_back.requires_grad
        assert torch.equal(fed_back, torch.full_like(tokens, 3))  # drawn from logits
    assert len(result.step_losses) == len(result.step_accuracies) == 3
    expected_accuracy = (tokens == 3).float().mean().item()
    assert result.step_accuracies == pytest.approx([expected_accuracy] * 3)
    assert result.loss.ndim == 0 and result.loss.dtype == torch.float32
    assert result.loss.item() == pytest.approx(sum(result.step_losses) / 3)
    result.loss.backward()
    assert model.bias.grad is not None and model.bias.grad.abs().sum() > 0


def test_unroll_step_count_and_bf16_logits():
    class Half(Recorder):
        def forward(self, tokens, class_labels=None):
            return super().forward(tokens).to(torch.bfloat16)

    tokens = torch.randint(0, 5, (2, 2, 2))
    one = unrolled_loss(Half(), tokens, codebook_size=5, unroll_steps=1)
    two = unrolled_loss(Half(), tokens, codebook_size=5, unroll_steps=2)
    assert len(one.step_losses) == 1 and len(two.step_losses) == 2
    assert one.loss.dtype == torch.float32
    with pytest.raises(InputError, match="unroll steps must be >= 1"):
        unrolled_loss(Half(), tokens, codebook_size=5, unroll_steps=0)


def test_tiny_prior_learns_a_toy_distribution():
    torch.manual_seed(0)
    k = 8
    config = HourglassConfig(width=32, depth=[1, 1, 1], heads=2)
    model = build_prior(config, codebook_size=k)
    optimiser = torch.optim.AdamW(model.parameters(), lr=3e-3)
    patterns = torch.stack(
        [torch.arange(16).reshape(4, 4) % k, (torch.arange(16).reshape(4, 4) // 2) % k]
    )
    generator = torch.Generator().manual_seed(1)
    losses = []
    for _ in range(40):
        tokens = patterns[torch.randint(0, 2, (16,), generator=generator)]
        result = unrolled_loss(model, tokens, codebook_size=k, generator=generator)
        optimiser.zero_grad()
        result.loss.backward()
        optimiser.step()
        losses.append(result.loss.item())
    assert losses[0] > 0.9 * math.log(k)
    assert sum(losses[-5:]) / 5 < 0.6 * math.log(k)
