"""Recipes: presets, overrides, strict validation, one line per problem."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from sundae_cli.errors import RecipeError
from sundae_cli.recipes import (
    apply_overrides,
    load_recipe,
    parse_override,
    recipe_from_dict,
    to_toml,
)

REPO = Path(__file__).resolve().parents[2]
RECIPES = sorted((REPO / "recipes").glob("*.toml"))


def write(tmp_path: Path, text: str, name: str = "r.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


@pytest.mark.parametrize("path", RECIPES, ids=[p.stem for p in RECIPES])
def test_every_shipped_recipe_validates(path):
    recipe = load_recipe(path)
    height, width = recipe.data.image_size
    assert recipe.grid == (
        height // recipe.downsample_factor,
        width // recipe.downsample_factor,
    )
    # A resolved recipe survives a round trip through TOML.
    again = recipe_from_dict(recipe.to_dict())
    assert again.to_dict() == recipe.to_dict()


def test_paper_presets_fill_the_paper_settings():
    r256 = load_recipe(REPO / "recipes" / "ffhq256.toml")
    assert (r256.downsample_factor, r256.codebook_size, r256.grid) == (
        16,
        1024,
        (16, 16),
    )
    assert r256.prior.config.depth == [2, 10, 2]
    r1024 = load_recipe(REPO / "recipes" / "ffhq1024.toml")
    assert (r1024.downsample_factor, r1024.codebook_size) == (32, 8192)
    assert r1024.grid == (32, 32)
    assert r1024.autoencoder.config.ch_mult == (1, 1, 2, 2, 4, 4)
    assert r1024.autoencoder.config.num_res_blocks == 1
    assert r1024.prior.config.depth == [3, 10, 3]
    assert r1024.sampling.temperature == (0.7, 0.7)


def test_preset_defaults_are_overridden_by_explicit_fields(tmp_path):
    path = write(
        tmp_path,
        'name = "x"\nresolution = "256"\n[autoencoder]\ncodebook_size = 512\n',
    )
    recipe = load_recipe(path)
    assert recipe.codebook_size == 512  # explicit beats the preset's 1024
    assert recipe.autoencoder.config.ch_mult == (1, 1, 2, 2, 4)  # preset kept


def test_set_overrides_apply_before_validation(tmp_path):
    path = write(tmp_path, 'name = "x"\nresolution = "cpu32"\n')
    recipe = load_recipe(
        path,
        ["train.prior.learning_rate=1e-2", "prior.depth=[1, 2, 1]", "device=cpu"],
    )
    assert recipe.train.prior.learning_rate == 1e-2
    assert recipe.prior.config.depth == [1, 2, 1]
    assert recipe.device == "cpu"  # not TOML: kept as a plain string
    with pytest.raises(RecipeError) as info:
        load_recipe(path, ["train.prior.steps=4.5"])
    assert "train.prior.steps" in info.value.problems[0]


def test_parse_override_rejects_malformed_text():
    assert parse_override("a.b=3") == (["a", "b"], 3)
    for bad in ("novalue", "=3", "a..b=1"):
        with pytest.raises(RecipeError, match="key.path=value"):
            parse_override(bad)
    assert apply_overrides({"a": {"b": 1}}, ["a.c=2"]) == {"a": {"b": 1, "c": 2}}


def test_case_c21_typos_and_wrong_types_reported_together(tmp_path):
    path = write(
        tmp_path,
        'name = "x"\nresolution = "cpu32"\n[prior]\ndepht = 4\ndepth = 4.5\n'
        "[train.prior]\nlearning_rat = 3e-4\n",
    )
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    problems = info.value.problems
    assert len(problems) == 3
    joined = "\n".join(problems)
    assert "prior.depht: unknown key (did you mean 'depth'?)" in joined
    assert "train.prior.learning_rat: unknown key (did you mean 'learning_rate'?)" in (
        joined
    )
    assert any(p.startswith("prior.depth:") and "4.5" in p for p in problems)


def test_toml_syntax_error_keeps_line_and_column(tmp_path):
    path = write(tmp_path, 'name = "x"\nresolution = \n')
    with pytest.raises(RecipeError, match=r"line 2, column \d+"):
        load_recipe(path)


def test_missing_file_and_unknown_name(tmp_path):
    with pytest.raises(RecipeError, match="does not exist"):
        load_recipe(tmp_path / "nothere.toml")
    with pytest.raises(RecipeError, match="no recipe named"):
        load_recipe("no-such-recipe-name")


def test_name_shadowed_by_a_data_folder_is_still_a_recipe_name(tmp_path, monkeypatch):
    # The README tour runs `sundae data digits digits/` and then `train vqgan digits`
    # in the same folder: the `digits/` image folder must not hide the recipe name.
    (tmp_path / "recipes").mkdir()
    text = 'name = "digits"\nresolution = "cpu32"\n'
    write(tmp_path / "recipes", text, "digits.toml")
    (tmp_path / "digits" / "0").mkdir(parents=True)
    (tmp_path / "images").mkdir()
    monkeypatch.chdir(tmp_path)
    assert load_recipe("digits").name == "digits"
    for folder in ("images", "digits/"):
        with pytest.raises(RecipeError, match="is a folder, not a .toml file"):
            load_recipe(folder)


def test_unknown_backend_lists_known_ones(tmp_path):
    path = write(
        tmp_path, 'name = "x"\nresolution = "cpu32"\n[prior]\nbackend = "nope"\n'
    )
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    assert "unknown backend 'nope' (known: hourglass)" in info.value.problems[0]


def test_unknown_resolution_and_indivisible_size(tmp_path):
    path = write(tmp_path, 'name = "x"\nresolution = "cpu33"\n')
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    assert "did you mean 'cpu32'" in info.value.problems[0]
    path = write(
        tmp_path, 'name = "x"\nresolution = "cpu32"\n[data]\nimage_size = 30\n'
    )
    with pytest.raises(RecipeError, match="not divisible"):
        load_recipe(path)


def test_recipe_is_frozen_and_toml_writer_round_trips(tmp_path):
    recipe = load_recipe(REPO / "recipes" / "tiny.toml")
    with pytest.raises(ValidationError, match="frozen"):
        recipe.seed = 3  # type: ignore[misc]
    text = to_toml(recipe.to_dict())
    again = load_recipe(write(tmp_path, text, "again.toml"))
    assert again.to_dict() == recipe.to_dict()
