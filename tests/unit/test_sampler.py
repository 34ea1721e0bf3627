"""The SUNDAE sampler: seeding, early stopping, fixed positions, updates."""

from __future__ import annotations

import pytest
import torch

from sundae_cli.errors import InputError
from sundae_cli.sampler import (
    SamplerSettings,
    confidence_mask,
    derive_seed,
    propose,
    sample_tokens,
)

K = 6


def table_logits(tokens: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
    """Deterministic per-sample logits pulled toward the sample's majority token."""
    table = torch.linspace(-2, 2, K * K).reshape(K, K).sin()
    histogram = torch.nn.functional.one_hot(tokens, K).float().mean((1, 2))  # (b, k)
    return table[tokens] + 8 * histogram[:, None, None, :]


def climb(tokens: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Target one above each token, capped at the sample's label: label + 1 steps."""
    return torch.minimum(tokens + 1, labels[:, None, None].expand_as(tokens))


def toward(target: torch.Tensor):
    """Logits that put nearly all mass on `target(tokens, labels)` (b, h, w)."""

    def logits_fn(tokens, labels):
        wanted = target(tokens, labels)
        return torch.nn.functional.one_hot(wanted, K).float() * 40.0

    return logits_fn


def run(logits_fn, seeds, grid=(4, 5), **kwargs):
    settings = kwargs.pop("settings", SamplerSettings(steps=20, min_steps=2))
    return sample_tokens(
        logits_fn,
        batch_size=len(seeds),
        grid=grid,
        codebook_size=K,
        seeds=seeds,
        settings=settings,
        **kwargs,
    )


# --- seeds and settings ---------------------------------------------------------


def test_derive_seed_is_stable_and_spread():
    assert derive_seed(0, 0) == derive_seed(0, 0)
    seeds = {derive_seed(seed, index) for seed in range(3) for index in range(50)}
    assert len(seeds) == 150
    assert all(0 <= seed < 2**63 for seed in seeds)
    assert derive_seed(-1, 3) != derive_seed(1, 3)
    assert derive_seed(7, 2) == 2545488658212934290  # pinned: must never change


def test_settings_validate_with_flag_names_and_schedule():
    for fields, flag in [
        ({"steps": 0}, "--steps must be >= 1"),
        ({"temperature": 0.0}, "--temperature must be > 0"),
        ({"proportion": (0.5, 1.5)}, "--proportion must be in"),
        ({"top_k": 0}, "--top-k must be >= 1"),
        ({"update": "best"}, "--update must be"),
        ({"min_steps": -1}, "--min-steps must be >= 0"),
        ({"temperature": (1, 2, 3)}, "--temperature takes one value"),
    ]:
        with pytest.raises(InputError, match=flag):
            SamplerSettings(**fields)
    # Messages show the value as the flag takes it, with a hint.
    with pytest.raises(InputError, match=r"got 1:0$") as info:
        SamplerSettings(temperature=(1.0, 0.0))
    assert "--temperature 1.0:0.7" in info.value.hint
    with pytest.raises(InputError, match=r"got 2$") as info:
        SamplerSettings(proportion=2.0)
    assert "--proportion 0.5" in info.value.hint
    settings = SamplerSettings(steps=5, temperature=(1.0, 0.6), proportion=0.3)
    assert settings.proportion == (0.3, 0.3)
    assert settings.temperature_at(0) == 1.0
    assert settings.temperature_at(2) == pytest.approx(0.8)
    assert settings.temperature_at(4) == pytest.approx(0.6)
    assert SamplerSettings(steps=1, temperature=(1.0, 0.5)).temperature_at(0) == 1.0


# --- determinism and early stopping ---------------------------------------------


def test_sample_is_identical_whatever_the_batch():
    seeds = [derive_seed(7, index) for index in range(8)]
    full = run(table_logits, seeds)
    assert len(set(full.steps_used)) > 1  # samples stop at different steps
    for size in (1, 3):
        for start in range(0, 8, size):
            part = run(table_logits, seeds[start : start + size])
            assert torch.equal(part.tokens, full.tokens[start : start + size])
            assert part.steps_used == full.steps_used[start : start + size]
    reordered = run(table_logits, [seeds[5], seeds[2]])
    assert torch.equal(reordered.tokens, full.tokens[[5, 2]])


def test_early_stopping_shrinks_the_batch():
    sizes = []

    def logits_fn(tokens, labels):
        sizes.append(tokens.shape[0])
        return toward(climb)(tokens, labels)

    labels = torch.tensor([4, 0, 2, 5, 1, 3])
    settings = SamplerSettings(steps=50, proportion=1.0, top_k=1, min_steps=1)
    result = run(logits_fn, list(range(6)), class_labels=labels, settings=settings)
    assert sizes[0] == 6 and sizes == sorted(sizes, reverse=True) and sizes[-1] == 1
    assert sum(sizes) == sum(result.steps_used)
    # Reaching label L from random starts takes at most L steps, plus one still step.
    assert all(
        used <= int(label) + 2
        for used, label in zip(result.steps_used, labels, strict=True)
    )
    assert result.steps_used[3] > result.steps_used[1]
    assert torch.equal(result.tokens, labels[:, None, None].expand(6, 4, 5))

    sizes.clear()
    settings = SamplerSettings(steps=12, proportion=0.3, early_stop=False)
    result = run(logits_fn, list(range(6)), class_labels=labels, settings=settings)
    assert result.steps_used == [12] * 6 and sizes == [6] * 12


def test_fixed_positions_and_labels_stay_aligned_as_the_batch_shrinks():
    generator = torch.Generator().manual_seed(0)
    b, grid = 5, (4, 4)
    init = torch.randint(0, K, (b, *grid), generator=generator)
    fixed = torch.rand(b, *grid, generator=generator) < 0.5
    labels = torch.tensor([3, 0, 5, 1, 4])
    sizes = []

    def logits_fn(tokens, batch_labels):
        sizes.append(tokens.shape[0])
        return toward(climb)(tokens, batch_labels)

    settings = SamplerSettings(steps=40, proportion=1.0, top_k=1, min_steps=1)
    result = run(
        logits_fn,
        list(range(b)),
        grid=grid,
        init_tokens=init,
        fixed_mask=fixed,
        class_labels=labels,
        settings=settings,
    )
    assert sizes[0] == b and sizes[-1] < b and len(set(result.steps_used)) > 1
    assert torch.equal(result.tokens[fixed], init[fixed])
    wanted = labels[:, None, None].expand_as(init)
    assert torch.equal(result.tokens[~fixed], wanted[~fixed])


def test_history_keeps_the_start_and_every_kth_step():
    settings = SamplerSettings(steps=6, early_stop=False, history_every=2)
    result = run(table_logits, [1, 2], settings=settings)
    assert len(result.history) == 4
    assert torch.equal(result.history[-1], result.tokens)
    assert all(snapshot.shape == (2, 4, 5) for snapshot in result.history)
    start = run(table_logits, [1, 2], settings=SamplerSettings(steps=1, proportion=0))
    assert torch.equal(result.history[0], start.tokens)


# --- updates --------------------------------------------------------------------


def test_proportion_zero_changes_nothing_and_one_changes_everything():
    init = torch.randint(1, K, (2, 4, 5), generator=torch.Generator().manual_seed(0))
    zeros = toward(lambda t, _: torch.zeros_like(t))
    never = SamplerSettings(steps=3, proportion=0.0, early_stop=False)
    always = SamplerSettings(steps=1, proportion=1.0, top_k=1)
    assert torch.equal(
        run(zeros, [1, 2], init_tokens=init, settings=never).tokens, init
    )
    assert (run(zeros, [1, 2], init_tokens=init, settings=always).tokens == 0).all()


def test_propose_draws_by_inverse_cdf_with_probabilities():
    probs = torch.tensor([0.2, 0.5, 0.3])
    logits = probs.log().expand(1, 4, 3)
    uniforms = torch.tensor([[0.1, 0.25, 0.69, 0.99]])
    proposals, confidence = propose(logits.clone(), 1.0, None, uniforms)
    assert proposals.tolist() == [[0, 1, 1, 2]]
    assert torch.allclose(confidence, probs[proposals])
    top, top_confidence = propose(logits.clone(), 1.0, 2, uniforms)
    assert top.tolist() == [[1, 1, 2, 2]]  # 0.5 and 0.3 renormalised
    assert torch.allclose(top_confidence, torch.tensor([[0.625, 0.625, 0.375, 0.375]]))
    cold, _ = propose(logits.clone(), 1e-3, None, uniforms)
    assert (cold == 1).all()
    owned = probs.log().repeat(1, 4, 1)
    propose(owned, 1.0, None, uniforms)
    assert not torch.equal(owned, probs.log().repeat(1, 4, 1))  # overwritten in place


def test_confidence_mask_updates_the_most_confident_free_positions():
    confidence = torch.tensor([[0.9, 0.1, 0.8, 0.7, 0.95, 0.2], [0.5] * 6])
    free = torch.tensor([[True, True, True, True, False, True], [True] * 6])
    mask = confidence_mask(confidence, 0.4, free)  # 2 of 5 free, 2 of 6 (2.4 -> 2)
    assert mask.tolist() == [
        [True, False, True, False, False, False],
        [True, True, False, False, False, False],  # ties: earlier positions first
    ]
    assert not confidence_mask(confidence, 0.0, free).any()
    assert torch.equal(confidence_mask(confidence, 1.0, free), free)


def test_confidence_update_in_the_sampler():
    def logits_fn(tokens, labels):
        logits = torch.zeros(*tokens.shape, K)
        ramp = torch.arange(tokens[0].numel()).reshape(tokens.shape[1:]) * 0.2
        logits[..., 0] = 3.0 + ramp  # token 0, more likely at later positions
        return logits

    init = torch.ones(1, 4, 5, dtype=torch.int64)
    settings = SamplerSettings(steps=1, proportion=0.25, update="confidence")
    result = run(logits_fn, [3], init_tokens=init, settings=settings)
    changed = torch.nonzero(result.tokens.flatten() == 0).flatten().tolist()
    assert changed == [15, 16, 17, 18, 19]


def test_bad_requests_are_input_errors():
    with pytest.raises(InputError, match="got 1 seeds for 2 samples"):
        sample_tokens(
            table_logits,
            batch_size=2,
            grid=(2, 2),
            codebook_size=K,
            seeds=[1],
            settings=SamplerSettings(),
        )
    with pytest.raises(InputError, match="fixed positions need init tokens"):
        run(table_logits, [1], fixed_mask=torch.ones(1, 4, 5, dtype=torch.bool))
    with pytest.raises(InputError, match="outside the codebook"):
        run(table_logits, [1], init_tokens=torch.full((1, 4, 5), K))
