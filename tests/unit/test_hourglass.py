"""The hourglass prior backend: config, resampling layout, rotary, model behaviour."""

from __future__ import annotations

import math

import pytest
import torch
from pydantic import ValidationError

from sundae_cli.errors import InputError
from sundae_hourglass.config import HourglassConfig
from sundae_hourglass.model import HourglassPrior, build_prior, count_parameters
from sundae_hourglass.plugin import PRESETS, backend
from sundae_hourglass.resampling import (
    Shortening,
    Upsampling,
    group_patches,
    plan_grids,
    ungroup_patches,
)
from sundae_hourglass.rotary import AxialRotary, apply_rotary


def tiny(**overrides) -> HourglassConfig:
    fields = {"width": 32, "depth": [1, 1, 1], "heads": 2} | overrides
    return HourglassConfig(**fields)


def model_of(codebook_size: int = 11, **overrides) -> HourglassPrior:
    torch.manual_seed(0)
    return build_prior(tiny(**overrides), codebook_size=codebook_size).eval()


# --- config ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("depth", "normalised", "levels"),
    [
        (12, [12], 0),
        ([12], [12], 0),
        ([2, 10, 2], [2, 10, 2], 1),
        ([2, [2, 4, 2], 2], [2, [2, 4, 2], 2], 2),
        ([2, [6], 2], [2, 6, 2], 1),
        ([0, [1, [2], 1], 3], [0, [1, 2, 1], 3], 2),
    ],
)
def test_depth_parsing(depth, normalised, levels):
    config = HourglassConfig(width=64, depth=depth)
    assert config.depth == normalised
    assert config.levels == levels
    assert config.level_shortenings == [2] * levels


@pytest.mark.parametrize(
    ("depth", "message"),
    [
        (4.5, "whole number of layers, got 4.5"),
        ([2, 4.0, 2], "depth[1] must be a whole number of layers"),
        ([2, 3], "depth has 2 entries"),
        ([2, [1, 2], 2], "depth[1] has 2 entries"),
        (True, "whole number"),
        (0, "depth must be >= 1"),
        ("4", "whole number"),
    ],
)
def test_depth_rejects_bad_specs(depth, message):
    with pytest.raises(ValidationError, match=message.replace("[", r"\[")):
        HourglassConfig(width=64, depth=depth)


def test_config_checks_heads_shortening_and_unknown_keys():
    assert HourglassConfig(width=128).num_heads == 2
    assert HourglassConfig(width=1024, heads=8).head_dim == 128
    with pytest.raises(ValidationError, match="not a multiple of 64"):
        HourglassConfig(width=100)
    with pytest.raises(ValidationError, match="multiple of 4"):
        HourglassConfig(width=24, heads=4)
    with pytest.raises(ValidationError, match="one per level"):
        HourglassConfig(width=64, depth=[1, [1, 1, 1], 1], shortening=[2])
    with pytest.raises(ValidationError, match=">= 2"):
        HourglassConfig(width=64, shortening=1)
    with pytest.raises(ValidationError, match="Extra inputs"):
        HourglassConfig(width=64, widht=3)
    per_level = HourglassConfig(width=64, depth=[1, [1, 1, 1], 1], shortening=[2, 3])
    assert per_level.level_shortenings == [2, 3]


def test_plugin_presets_validate_and_build():
    for fields in PRESETS.values():
        HourglassConfig(**fields)
    model = backend.build(HourglassConfig(**PRESETS["cpu32"]), codebook_size=16)
    assert isinstance(model, HourglassPrior)
    assert model.codebook_size == 16 and model.num_classes == 0


# --- resampling layout ----------------------------------------------------------


def _changed_rows(before: torch.Tensor, after: torch.Tensor) -> list[int]:
    return torch.nonzero((before - after).abs().amax(-1)[0] > 0).flatten().tolist()


@pytest.mark.parametrize("attention_heads", [None, 2])
def test_2d_shortening_merges_exactly_each_patch(attention_heads):
    torch.manual_seed(0)
    grid, s, width = (4, 6), 2, 8
    shorten = Shortening(width, s, "2d", attention_heads=attention_heads)
    x = torch.randn(1, 24, width)
    base = shorten(x, grid)
    for position in range(24):
        row, col = divmod(position, grid[1])
        bumped = x.clone()
        bumped[0, position] += 1.0
        expected = (row // s) * (grid[1] // s) + col // s
        assert _changed_rows(base, shorten(bumped, grid)) == [expected]


def test_1d_shortening_merges_runs_of_flattened_tokens():
    torch.manual_seed(0)
    shorten = Shortening(8, 2, "1d", attention_heads=None)
    x = torch.randn(1, 24, 8)
    base = shorten(x, (4, 6))
    for position in range(24):
        bumped = x.clone()
        bumped[0, position] += 1.0
        assert _changed_rows(base, shorten(bumped, (4, 6))) == [position // 4]


@pytest.mark.parametrize(
    ("mode", "attention_heads"), [("2d", None), ("1d", None), ("2d", 1)]
)
def test_upsampling_scatters_each_token_back_to_its_patch(mode, attention_heads):
    torch.manual_seed(0)
    grid, s = (4, 8), 2
    x = torch.randn(2, 32, 4)
    assert torch.equal(
        ungroup_patches(group_patches(x, grid, s, mode), grid, s, mode), x
    )

    upsample = Upsampling(4, s, mode, attention_heads=attention_heads)
    short, residual = torch.randn(1, 8, 4), torch.randn(1, 32, 4)
    base = upsample(short, residual, grid)
    positions = torch.arange(32)
    for token in range(8):
        bumped = short.clone()
        bumped[0, token] += 1.0
        changed = _changed_rows(base, upsample(bumped, residual, grid))
        if mode == "2d":
            rows, cols = positions // grid[1], positions % grid[1]
            patch = (rows // s) * (grid[1] // s) + cols // s
        else:
            patch = positions // (s * s)
        assert changed == torch.nonzero(patch == token).flatten().tolist()


def test_plan_grids_and_divisibility_errors():
    assert plan_grids((32, 32), [2], "2d") == [(32, 32), (16, 16)]
    assert plan_grids((6, 4), [2], "2d") == [(6, 4), (3, 2)]
    assert plan_grids((4, 8), [2], "1d") == [(4, 8), (4, 2)]
    assert plan_grids((4, 6), [2], "1d") == [(4, 6), (6, 1)]
    with pytest.raises(InputError) as error:
        plan_grids((9, 8), [2], "2d")
    assert str(error.value) == (
        "grid 9x8 is not divisible by the shortening 2 at level 1; use a grid whose "
        "height and width are multiples of 2"
    )
    with pytest.raises(InputError, match=r"shortened to 3x2 before level 2.*of 4"):
        plan_grids((6, 4), [2, 2], "2d")
    with pytest.raises(InputError, match="token count is a multiple of 4"):
        plan_grids((3, 5), [2], "1d")


def test_model_runs_on_rectangular_grids_and_rejects_misfits():
    model = model_of(depth=[1, [1, 1, 1], 1])
    for grid in [(4, 8), (8, 4), (12, 4)]:
        tokens = torch.randint(0, 11, (2, *grid))
        logits = model(tokens)
        assert logits.shape == (2, *grid, 11) and logits.dtype == torch.float32
        assert torch.isfinite(logits).all()
    with pytest.raises(InputError, match="grid 6x4"):
        model(torch.randint(0, 11, (1, 6, 4)))
    assert model_of()(torch.randint(0, 11, (1, 6, 4))).shape == (1, 6, 4, 11)


@pytest.mark.parametrize(
    "overrides",
    [
        {"resampling": "1d"},
        {"resampling_mode": "attention"},
        {"resampling": "1d", "resampling_mode": "attention"},
        {"depth": [3]},
    ],
)
def test_model_variants_train(overrides):
    model = model_of(**overrides).train()
    tokens = torch.randint(0, 11, (2, 4, 6))
    logits = model(tokens)
    assert logits.shape == (2, 4, 6, 11)
    logits.logsumexp(-1).mean().backward()
    assert all(p.grad is not None for p in model.parameters())


# --- rotary ---------------------------------------------------------------------


def _scores(grid: tuple[int, int]) -> torch.Tensor:
    """Scores (g, n, n) of fixed per-head q and k vectors placed at every position."""
    torch.manual_seed(0)
    heads, head_dim, n = 2, 16, grid[0] * grid[1]
    cos, sin = AxialRotary(head_dim)(grid, torch.device("cpu"), torch.float64)
    q = torch.randn(heads, 1, head_dim, dtype=torch.float64).expand(heads, n, head_dim)
    k = torch.randn(heads, 1, head_dim, dtype=torch.float64).expand(heads, n, head_dim)
    q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
    return q @ k.transpose(-1, -2)


def test_rotary_scores_depend_only_on_the_2d_offset():
    grid = (5, 7)
    scores = _scores(grid)

    def index(row: int, col: int) -> int:
        return row * grid[1] + col

    for head in range(2):
        reference = scores[head, index(1, 2), index(3, 5)]
        for shift_row, shift_col in [(1, 1), (-1, 0), (0, 1), (1, -2)]:
            shifted = scores[
                head,
                index(1 + shift_row, 2 + shift_col),
                index(3 + shift_row, 5 + shift_col),
            ]
            assert torch.allclose(shifted, reference)
        along_rows = scores[head, index(0, 0), index(2, 0)]
        along_cols = scores[head, index(0, 0), index(0, 2)]
        assert not torch.allclose(along_rows, along_cols)
    assert not torch.allclose(scores[0], scores[1])


def test_rotary_preserves_norms_and_caches_tables():
    rotary = AxialRotary(8)
    with torch.inference_mode():
        first = rotary((3, 4), torch.device("cpu"), torch.float32)
    assert rotary((3, 4), torch.device("cpu"), torch.float32) is first
    assert first[0].shape == (12, 8)
    x = torch.randn(12, 8, requires_grad=True)
    rotated = apply_rotary(x, *first)  # tables made in inference mode still train
    rotated.sum().backward()
    assert torch.allclose(rotated.norm(dim=-1), x.norm(dim=-1), atol=1e-5)


# --- model behaviour ------------------------------------------------------------


@pytest.mark.parametrize("depth", [[2], [1, [1, 1, 1], 1]])
def test_every_output_depends_on_every_input(depth):
    model = model_of(depth=depth)
    grid = (4, 4)
    embedded = {}

    def keep(_module, _inputs, output):
        output.retain_grad()
        embedded["x"] = output

    model.token_embedding.register_forward_hook(keep)
    for position in (0, 15):
        model.zero_grad()
        logits = model(torch.randint(0, 11, (1, *grid)))
        logits.flatten(1, 2)[0, position].sum().backward()
        influence = embedded["x"].grad.abs().sum(-1)[0]  # (n,)
        assert (influence > 0).all()


def test_class_conditioning():
    model = model_of(num_classes=3)
    tokens = torch.randint(0, 11, (2, 4, 4))
    first = model(tokens, torch.tensor([0, 0]))
    second = model(tokens, torch.tensor([1, 2]))
    assert not torch.allclose(first, second)
    with pytest.raises(InputError, match="needs class labels"):
        model(tokens)
    with pytest.raises(InputError, match="unconditional"):
        model_of()(tokens, torch.tensor([0, 1]))
    with pytest.raises(InputError, match="integer token grids"):
        model_of()(tokens.float())


def test_parameter_counts():
    config = HourglassConfig(width=64, depth=[1, 2, 1], heads=2)
    model = build_prior(config, codebook_size=10)
    d = 64
    per_layer = 12 * d * d + 13 * d
    resampling = (4 * d * d + d) + (d * 4 * d + 4 * d)
    expected = 4 * per_layer + resampling + 10 * d + (2 * d) + (d * 10 + 10)
    assert count_parameters(model) == expected

    with torch.device("meta"):
        paper_256 = build_prior(HourglassConfig(**PRESETS["256"]), codebook_size=1024)
        paper_1024 = build_prior(HourglassConfig(**PRESETS["1024"]), codebook_size=8192)
    assert count_parameters(paper_256) == 186_841_088  # paper: about 178M
    assert count_parameters(paper_1024) == 226_720_768  # paper: about 214M
    assert math.isclose(count_parameters(paper_256) / 1e6, 178, rel_tol=0.06)
