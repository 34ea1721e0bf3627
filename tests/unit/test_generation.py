"""Generation library: settings, outputs, canvases, memory, inpainting, megapixel."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from sundae_cli.canvas import (
    GenerateOptions,
    MemoryEstimate,
    SampleOptions,
    canvas_grid,
    canvas_logits_fn,
    check_memory,
    estimate_memory,
    generate,
    parse_size,
    perturb_tokens,
    requested_size,
    sample,
)
from sundae_cli.errors import CheckpointError, InputError
from sundae_cli.generation import (
    check_pair,
    choose_prior,
    load_models,
    parse_schedule,
    planned_outputs,
    refuse_existing,
    sampler_settings,
)
from sundae_cli.images import fit_to, to_tensor
from sundae_cli.inpaint import InpaintOptions, canvas_mask, inpaint, plan_mask
from sundae_cli.recipes import SamplingSection
from sundae_cli.sampler import SamplerSettings, sample_tokens
from tests.helpers import REPO, make_runs

FAST = {"steps": 3, "min_steps": 1}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return make_runs(tmp_path_factory.mktemp("runs"))


@pytest.fixture(scope="module")
def peaked(tmp_path_factory):
    """A prior that strongly prefers code 3, so samples settle and stop early."""
    return make_runs(tmp_path_factory.mktemp("peaked"), peak=3)


def photo(size: tuple[int, int], seed: int = 0) -> Image.Image:
    """A smooth RGB test image of (height, width) pixels."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
    return Image.fromarray(small).resize((size[1], size[0]), Image.Resampling.BILINEAR)


def square_mask(size: tuple[int, int]) -> np.ndarray:
    """True in a centred box covering half of each side."""
    mask = np.zeros(size, dtype=bool)
    mask[size[0] // 4 : size[0] * 3 // 4, size[1] // 4 : size[1] * 3 // 4] = True
    return mask


# --- settings ----------------------------------------------------------------


def test_parse_schedule_accepts_constant_and_ramp():
    assert parse_schedule("0.8", "--temperature") == (0.8, 0.8)
    assert parse_schedule("1.0:0.7", "--temperature") == (1.0, 0.7)


@pytest.mark.parametrize("text", ["hot", "1:2:3", "", "nan", "0.5:"])
def test_parse_schedule_rejects_naming_the_flag(text):
    with pytest.raises(InputError, match="--proportion") as caught:
        parse_schedule(text, "--proportion")
    assert "--proportion" in caught.value.hint


def test_sampler_settings_override_only_given_flags():
    section = SamplingSection(steps=40, temperature=(0.9, 0.7), min_steps=3)
    settings = sampler_settings(section, steps=None, top_k=5, early_stop=False)
    assert settings.steps == 40 and settings.temperature == (0.9, 0.7)
    assert settings.top_k == 5 and settings.early_stop is False
    assert settings.min_steps == 3
    with pytest.raises(InputError, match="--steps"):
        sampler_settings(section, steps=0)
    # A constant proportion of 0 would only ever return the random start tokens.
    with pytest.raises(InputError, match="--proportion 0 updates no token"):
        sampler_settings(section, proportion=(0.0, 0.0))
    assert sampler_settings(section, proportion=(0.5, 0.0)).proportion == (0.5, 0.0)


# --- outputs -----------------------------------------------------------------


def test_planned_outputs_and_refusal(tmp_path):
    paths = planned_outputs(tmp_path, "sample", 2, gif=True, grid=True)
    names = [path.name for path in paths]
    assert names == [
        "sample-00000.png",
        "sample-00000.json",
        "sample-00000.gif",
        "sample-00001.png",
        "sample-00001.json",
        "sample-00001.gif",
        "grid.png",
    ]
    refuse_existing(paths, overwrite=False)  # nothing there yet
    paths[4].write_text("{}")
    with pytest.raises(InputError, match="sample-00001.json") as caught:
        refuse_existing(paths, overwrite=False)
    assert "--overwrite" in caught.value.hint
    refuse_existing(paths, overwrite=True)


def test_check_pair_refuses_another_codebook():
    recipe = SimpleNamespace(codebook_size=128, downsample_factor=4)
    prior = SimpleNamespace(recipe=recipe, checkpoint=Path("p"))
    other = SimpleNamespace(
        model=SimpleNamespace(codebook_size=256, downsample_factor=4),
        checkpoint=Path("a"),
    )
    with pytest.raises(CheckpointError, match="codebook size 256.*codebook size 128"):
        check_pair(prior, other)


# --- canvases and memory --------------------------------------------------------


def test_parse_size_and_divisibility_hint():
    assert parse_size("1024x768") == (768, 1024)
    with pytest.raises(InputError, match="WIDTHxHEIGHT"):
        parse_size("1024")
    assert canvas_grid((768, 1024), 32) == (24, 32)
    with pytest.raises(InputError, match="factor 32") as caught:
        canvas_grid((1000, 1000), 32)
    assert "--size 992x992" in caught.value.hint
    assert "--size 1024x1024" in caught.value.hint


def test_requested_size_resolution_and_native(runs):
    recipe = runs.recipe
    assert requested_size(recipe, None, None) == (32, 32)
    assert requested_size(recipe, None, "512") == (512, 512)
    with pytest.raises(InputError, match="--size and --resolution"):
        requested_size(recipe, (32, 32), "256")


def test_memory_check_fails_fast_in_gib(runs):
    choice = choose_prior(str(runs.prior))
    huge = estimate_memory(choice, 64, (4096, 4096))
    assert huge.total > 2**40  # 2 TiB of logits alone
    with pytest.raises(InputError, match="GiB") as caught:
        check_memory(huge, "cpu", "choose a smaller --size")
    assert "--size" in caught.value.hint
    check_memory(MemoryEstimate(1, 1, 1), "cpu", "unused")


def test_estimate_grows_with_canvas_area(runs):
    choice = choose_prior(str(runs.prior))
    native = estimate_memory(choice, 1, (8, 8))
    double = estimate_memory(choice, 1, (8, 16))
    assert double.decoding == 2 * native.decoding
    assert native.sampling < double.sampling


def test_perturb_tokens_rerandomises_the_share_strength():
    tokens = torch.arange(64).reshape(8, 8) % 50
    same, chosen = perturb_tokens(tokens, 0.0, 50, seed=1)
    assert torch.equal(same, tokens) and not chosen.any()
    _, chosen = perturb_tokens(tokens, 1.0, 50, seed=1)
    assert chosen.all()
    new, chosen = perturb_tokens(tokens, 0.25, 50, seed=7)
    assert int(chosen.sum()) == 16
    assert torch.equal(new[~chosen], tokens[~chosen])
    again, chosen_again = perturb_tokens(tokens, 0.25, 50, seed=7)
    assert torch.equal(again, new) and torch.equal(chosen_again, chosen)


def test_windowed_canvas_updates_every_position():
    """An 8x16 canvas over an 8x8 prior: each position leaves its random start."""
    k = 5

    def shift(tokens, labels):  # deterministic: propose token + 1 everywhere
        return torch.nn.functional.one_hot((tokens + 1) % k, k).float() * 30.0

    calls = []

    def counted(tokens, labels):
        calls.append(tuple(tokens.shape))
        return shift(tokens, labels)

    logits_fn = canvas_logits_fn(counted, (8, 16), (8, 8), overlap=None)
    settings = SamplerSettings(
        steps=3, proportion=1.0, early_stop=False, history_every=1
    )
    result = sample_tokens(
        logits_fn,
        batch_size=2,
        grid=(8, 16),
        codebook_size=k,
        seeds=[1, 2],
        settings=settings,
    )
    start = result.history[0]
    changed = torch.zeros_like(start, dtype=torch.bool)
    for snapshot in result.history[1:]:
        changed |= snapshot != start
    assert changed.all()
    assert all(shape[1:] == (8, 8) for shape in calls)  # windows of the prior's grid


# --- sampling at library level ---------------------------------------------------


def test_image_is_independent_of_batch_size(runs, tmp_path):
    for batch in (1, 3):
        options = SampleOptions(
            count=3,
            model=str(runs.prior),
            out=tmp_path / f"b{batch}",
            batch_size=batch,
            sampler=dict(FAST),
            device="cpu",
        )
        sample(options)
    for index in range(3):
        name = f"sample-{index:05d}"
        for suffix in (".png", ".json"):
            one = (tmp_path / "b1" / (name + suffix)).read_bytes()
            assert one == (tmp_path / "b3" / (name + suffix)).read_bytes()


def test_early_stop_reports_steps_used(peaked, tmp_path):
    options = SampleOptions(
        count=2,
        model=str(peaked.prior),
        out=tmp_path,
        sampler={"steps": 30, "min_steps": 2},
        device="cpu",
    )
    result = sample(options)
    assert all(2 <= steps < 30 for steps in result.steps_used)
    sidecar = json.loads((tmp_path / "sample-00001.json").read_text())
    assert sidecar["steps_used"] == result.steps_used[1]
    assert sidecar["sampler"]["steps"] == 30
    assert (result.tokens == 3).float().mean() > 0.9


def test_init_start_encodes_then_perturbs(runs, tmp_path):
    from sundae_cli.canvas import _init_start

    image_path = tmp_path / "init.png"
    photo((48, 40)).save(image_path)
    models = load_models(choose_prior(str(runs.prior)), None, "cpu")
    fitted = fit_to(photo((48, 40)), (32, 32))
    with torch.inference_mode():
        encoded = models.autoencoder.model.encode(to_tensor(fitted)[None])[0]
    untouched, _ = _init_start(models, image_path, (8, 8), 0.0)([0, 1], [5, 6])
    assert torch.equal(untouched, encoded.expand(2, -1, -1))
    moved, _ = _init_start(models, image_path, (8, 8), 0.5)([0, 1], [5, 6])
    assert not torch.equal(moved[0], moved[1])  # each sample its own positions
    assert 0.3 < (moved != encoded).float().mean() <= 0.5


def test_generate_init_with_all_positions_free(runs, tmp_path):
    image_path = tmp_path / "init.png"
    photo((20, 30)).save(image_path)
    options = GenerateOptions(
        model=str(runs.prior),
        out=tmp_path / "out",
        size=(32, 64),
        init=image_path,
        strength=0.5,
        sampler=dict(FAST),
        device="cpu",
    )
    result = generate(options)
    assert Image.open(result.paths[0]).size == (64, 32)
    sidecar = json.loads((tmp_path / "out" / "generate-00000.json").read_text())
    assert sidecar["init"] == "init.png" and sidecar["strength"] == 0.5
    assert sidecar["grid"] == [8, 16] and sidecar["windows"] > 1


# --- inpainting -------------------------------------------------------------------


def test_canvas_mask_any_is_conservative():
    mask = np.zeros((7, 7), dtype=bool)
    mask[3, 3] = True
    on_canvas = canvas_mask(mask, (32, 32), "any")
    assert on_canvas.any() and on_canvas.mean() < 0.1
    plan = plan_mask(mask, (32, 32), 4, "any")
    assert plan.tokens.shape == (8, 8) and plan.tokens.any()
    assert not plan_mask(mask, (32, 32), 4, "all").canvas[0, 0]
    with pytest.raises(InputError, match="--mask-policy"):
        plan_mask(mask, (32, 32), 4, "most")


def _inpaint(runs, tmp_path, size, mask, **kwargs):
    image_path, mask_path = tmp_path / "in.png", tmp_path / "mask.png"
    photo(size).save(image_path)
    Image.fromarray(mask.astype(np.uint8) * 255).save(mask_path)
    options = InpaintOptions(
        image=image_path,
        mask=mask_path,
        count=2,
        model=str(runs.prior),
        out=tmp_path / "out",
        sampler=dict(FAST),
        device="cpu",
        **kwargs,
    )
    return inpaint(options), image_path


def test_inpaint_keeps_unmasked_tokens_fixed(runs, tmp_path):
    size = (40, 24)
    mask = square_mask(size)
    result, image_path = _inpaint(runs, tmp_path, size, mask)
    models = load_models(choose_prior(str(runs.prior)), None, "cpu")
    resized = Image.open(image_path).convert("RGB").resize((32, 32), Image.LANCZOS)
    with torch.inference_mode():
        encoded = models.autoencoder.model.encode(to_tensor(resized)[None])[0]
    regenerate = torch.from_numpy(plan_mask(mask, (32, 32), 4, "any").tokens)
    assert result.tokens.shape == (2, 8, 8)
    for tokens in result.tokens:
        assert torch.equal(tokens[~regenerate], encoded[~regenerate])
    assert not torch.equal(result.tokens[0][regenerate], encoded[regenerate])


@pytest.mark.parametrize("size", [(530, 283), (53, 37), (7, 7)])
def test_inpaint_output_has_input_size_and_pixels(runs, tmp_path, size):
    mask = square_mask(size)
    result, image_path = _inpaint(runs, tmp_path, size, mask)
    original = np.asarray(Image.open(image_path).convert("RGB"))
    for path in result.paths:
        output = np.asarray(Image.open(path))
        assert output.shape == original.shape
        assert np.array_equal(output[~mask], original[~mask])


def test_inpaint_feather_blends_only_near_the_mask(runs, tmp_path):
    size = (64, 64)
    mask = square_mask(size)
    result, image_path = _inpaint(runs, tmp_path, size, mask, feather=6)
    original = np.asarray(Image.open(image_path).convert("RGB")).astype(int)
    output = np.asarray(Image.open(result.paths[0])).astype(int)
    assert np.array_equal(output[:8], original[:8])  # far from the mask: exact
    ring = output[13:16, 16:48] != original[13:16, 16:48]  # just outside: blended
    assert ring.any()


def test_inpaint_empty_mask_writes_copies(runs, tmp_path):
    size = (20, 30)
    result, image_path = _inpaint(runs, tmp_path, size, np.zeros(size, bool))
    original = Image.open(image_path).convert("RGB")
    assert len(result.paths) == 2
    for path in result.paths:
        assert np.array_equal(np.asarray(Image.open(path)), np.asarray(original))
        assert json.loads(path.with_suffix(".json").read_text())["copy_of_input"]


# --- megapixel geometry -------------------------------------------------------------

MEGAPIXEL_SCRIPT = textwrap.dedent(
    """
    import json, os, resource, sys
    from pathlib import Path
    import torch
    torch.set_num_threads(1)
    from sundae_cli.canvas import (
        GenerateOptions, SampleOptions, estimate_memory, generate, sample,
    )
    from sundae_cli.generation import choose_prior

    def reset_peak():  # Linux: VmHWM restarts from the current RSS
        try:
            open("/proc/self/clear_refs", "w").write("5")
        except OSError:
            pass  # then the peak covers start-up too: an overestimate
        pages = int(open("/proc/self/statm").read().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE")

    def peak():
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    prior, out = sys.argv[1], Path(sys.argv[2])
    choice = choose_prior(prior)
    estimate = estimate_memory(choice, 1, choice.recipe.grid).total
    common = dict(model=prior, batch_size=1, sampler={"steps": 2}, device="cpu")
    before = reset_peak()
    first = sample(SampleOptions(count=1, out=out / "a", **common)).paths
    delta = peak() - before
    size = (1024, 1024)
    third = generate(GenerateOptions(count=1, out=out / "c", size=size, **common))
    paths = [str(p) for p in first + third.paths]
    print(json.dumps({"paths": paths, "estimate": estimate, "delta": delta}))
    """
)


def test_megapixel_geometry_narrow_models(tmp_path):
    """The 1024 preset's geometry (f=32, 8192 codes, 32x32 grid, 16x16 valley) with
    narrow random models: 1024x1024 outputs from `sample` and `generate --size
    1024x1024`, the same bytes from both runs, and a peak resident-memory growth
    within a factor 2 of the estimate (either way)."""
    overrides = [
        "prior.width=64",
        "prior.heads=1",
        "prior.depth=[1, 1, 1]",
        "autoencoder.ch=8",
        "autoencoder.z_channels=8",
        "autoencoder.embed_dim=8",
    ]
    runs = make_runs(tmp_path / "runs", overrides, REPO / "recipes" / "ffhq1024.toml")
    recipe = runs.recipe
    assert recipe.downsample_factor == 32 and recipe.codebook_size == 8192
    assert recipe.grid == (32, 32) and recipe.prior.config.level_shortenings == [2]

    proc = subprocess.run(
        [sys.executable, "-c", MEGAPIXEL_SCRIPT, str(runs.prior), str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    images = [Path(path) for path in report["paths"]]
    assert len(images) == 2
    assert all(Image.open(path).size == (1024, 1024) for path in images)
    # generate at 1024x1024 is a second, independent run of the native canvas
    assert images[0].read_bytes() == images[1].read_bytes()
    ratio = report["delta"] / report["estimate"]  # peak RSS growth over estimate
    assert 0.5 <= ratio <= 2.0, report
