"""Windowed generation: overlapping windows and alternating shifted tilings."""

from __future__ import annotations

import pytest
import torch

from sundae_cli.errors import InputError
from sundae_cli.sampler import SamplerSettings, sample_tokens
from sundae_cli.windows import (
    ShiftedTilings,
    estimate_sampling_memory,
    shifted_tilings,
    window_positions,
    windowed_logits_fn,
)

from .test_sampler import K, run, table_logits


def positional(tokens, labels):
    """Log-probabilities that depend on the window-local position: windows differ."""
    b, h, w = tokens.shape
    rows = torch.arange(h)[:, None, None].float()
    cols = torch.arange(w)[None, :, None].float()
    codes = torch.arange(K).float()
    base = (rows * 0.3 + cols * 0.7 + 1) * codes / K
    logits = base + tokens[..., None].float() * 0.1 + labels[:, None, None, None]
    return logits.log_softmax(-1)


def test_window_positions_cover_the_canvas_flush():
    positions = window_positions((13, 20), (8, 8))
    assert sorted({top for top, _ in positions}) == [0, 4, 5]
    assert sorted({left for _, left in positions}) == [0, 4, 8, 12]
    covered = torch.zeros(13, 20)
    for top, left in positions:
        covered[top : top + 8, left : left + 8] += 1
    assert (covered > 0).all()
    assert window_positions((8, 8), (8, 8)) == [(0, 0)]
    assert window_positions((6, 20), (8, 8), overlap=0) == [(0, 0), (0, 8), (0, 12)]
    with pytest.raises(InputError, match="--overlap must be in"):
        window_positions((13, 20), (8, 8), overlap=8)


def test_windowed_equals_plain_when_one_window_covers_the_canvas():
    assert windowed_logits_fn(table_logits, canvas=(4, 5), window=(4, 5)) is (
        table_logits
    )


@pytest.mark.parametrize("weighting", ["uniform", "tapered"])
def test_windowed_logits_average_log_probabilities(weighting):
    canvas, window = (7, 10), (4, 4)
    tokens = torch.randint(
        0, K, (2, *canvas), generator=torch.Generator().manual_seed(0)
    )
    labels = torch.tensor([0.0, 1.0])
    combined = windowed_logits_fn(
        positional, canvas=canvas, window=window, weighting=weighting, max_batch=3
    )(tokens, labels)

    total = torch.zeros(2, *canvas, K)
    weight = torch.zeros(*canvas, 1)
    tent = torch.tensor([1.0, 2.0, 2.0, 1.0])
    cell = torch.outer(tent, tent) if weighting == "tapered" else torch.ones(4, 4)
    for top, left in window_positions(canvas, window):
        crop = tokens[:, top : top + 4, left : left + 4]
        total[:, top : top + 4, left : left + 4] += (
            positional(crop, labels) * cell[:, :, None]
        )
        weight[top : top + 4, left : left + 4] += cell[:, :, None]
    assert torch.allclose(combined, total / weight, atol=1e-6)


def test_sampling_on_a_larger_canvas_and_memory_estimate():
    logits_fn = windowed_logits_fn(table_logits, canvas=(6, 9), window=(4, 4))
    result = run(logits_fn, [0, 1], grid=(6, 9))
    assert result.tokens.shape == (2, 6, 9)
    small = estimate_sampling_memory(4, (32, 32), (32, 32), 8192, 1024)
    large = estimate_sampling_memory(4, (64, 64), (32, 32), 8192, 1024)
    assert 4 * 32 * 32 * 8192 * 4 < small < large


# --- shifted tilings --------------------------------------------------------------


@pytest.mark.parametrize("canvas", [(8, 16), (16, 16), (13, 20), (8, 10), (24, 8)])
def test_shifted_tilings_cover_the_canvas_and_move_every_seam(canvas):
    window = (8, 8)
    plain, shifted = shifted_tilings(canvas, window)
    for tiling in (plain, shifted):
        covered = torch.zeros(canvas)
        for top, left, h, w in tiling:
            assert 1 <= h <= 8 and 1 <= w <= 8
            assert h in (4, 8, canvas[0]) and w in (4, 8, canvas[1])
            covered[top : top + h, left : left + w] += 1
        assert (covered > 0).all()
    # A seam is a pair of neighbours (p - 1, p) that no window holds together;
    # no seam of one tiling is a seam of the other.
    for axis in (0, 1):
        assert not seams(plain, axis, canvas) & seams(shifted, axis, canvas)


def seams(rects, axis, canvas):
    return {
        p
        for p in range(1, canvas[axis])
        if not any(r[axis] < p < r[axis] + r[axis + 2] for r in rects)
    }


def test_shifted_tilings_cost_about_the_canvas_area():
    plain, shifted = shifted_tilings((8, 16), (8, 8))
    assert plain == [(0, 0, 8, 8), (0, 8, 8, 8)]
    assert shifted == [(0, 0, 8, 4), (0, 4, 8, 8), (0, 12, 8, 4)]
    tokens = [sum(h * w for *_, h, w in tiling) for tiling in (plain, shifted)]
    assert tokens == [128, 128]  # no position is computed twice
    assert seams(plain, 1, (8, 16)) == {8} and seams(shifted, 1, (8, 16)) == {4, 12}
    assert shifted_tilings((8, 8), (8, 8)) == ([(0, 0, 8, 8)], [(0, 0, 8, 8)])


def manual_average(rects, tokens, labels, canvas):
    total = torch.zeros(tokens.shape[0], *canvas, K)
    count = torch.zeros(*canvas, 1)
    for top, left, h, w in rects:
        crop = tokens[:, top : top + h, left : left + w]
        total[:, top : top + h, left : left + w] += positional(crop, labels)
        count[top : top + h, left : left + w] += 1
    return total / count


def test_shifted_logits_alternate_between_the_two_tilings():
    canvas, window = (13, 20), (8, 8)
    tokens = torch.randint(
        0, K, (3, *canvas), generator=torch.Generator().manual_seed(1)
    )
    labels = torch.tensor([0.0, 1.0, 2.0])
    logits_fn = ShiftedTilings(positional, canvas, window, max_batch=4)
    plain, shifted = shifted_tilings(canvas, window)
    for step, rects in [(0, plain), (1, shifted), (2, plain), (7, shifted)]:
        logits_fn.set_step(step)
        expected = manual_average(rects, tokens, labels, canvas)
        assert torch.allclose(logits_fn(tokens, labels), expected, atol=1e-6)


def test_sampler_tells_a_step_aware_logits_fn_the_step():
    class Recording:
        def __init__(self):
            self.steps = []

        def set_step(self, step):
            self.steps.append(step)

        def __call__(self, tokens, labels):
            return table_logits(tokens, labels)

    recording = Recording()
    settings = SamplerSettings(steps=5, early_stop=False)
    run(recording, [0, 1], settings=settings)
    assert recording.steps == [0, 1, 2, 3, 4]


def test_shifted_sampling_does_not_depend_on_the_batch():
    canvas = (6, 9)

    def sample(seeds):
        return sample_tokens(
            ShiftedTilings(table_logits, canvas, (4, 4)),
            batch_size=len(seeds),
            grid=canvas,
            codebook_size=K,
            seeds=seeds,
            settings=SamplerSettings(steps=12, min_steps=2),
        )

    together = sample([5, 6, 7])
    alone = sample([6])
    assert together.tokens.shape == (3, 6, 9)
    assert torch.equal(together.tokens[1], alone.tokens[0])
    assert together.steps_used[1] == alone.steps_used[0]
