"""Recipe files: where recipes are found by name, and writing tables back as TOML.

A name (not a path) is looked up in ./recipes, then each folder of $SUNDAE_RECIPES,
then the user config dir; earlier folders shadow later ones. `to_toml` writes the
plain tables of a resolved recipe (`Recipe.to_dict`) for run folders and `sundae
recipes show`. Loading and validation live in `sundae_cli.recipes`, which imports
this module (never the other way round).
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any

from sundae_cli.errors import RecipeError


def close_match(name: str, candidates: list[str]) -> str:
    """A " (did you mean ...?)" suffix naming the closest candidate, or "" if none."""
    matches = difflib.get_close_matches(name, candidates, n=1, cutoff=0.6)
    return f" (did you mean {matches[0]!r}?)" if matches else ""


def recipe_dirs() -> list[Path]:
    """Where `sundae recipes list` looks: ./recipes, $SUNDAE_RECIPES, the config dir."""
    import os

    import platformdirs

    dirs = [Path.cwd() / "recipes"]
    for entry in os.environ.get("SUNDAE_RECIPES", "").split(os.pathsep):
        if entry:
            dirs.append(Path(entry))
    dirs.append(Path(platformdirs.user_config_dir("sundae")) / "recipes")
    return dirs


def list_recipes() -> list[Path]:
    """Every `*.toml` in the recipe folders; earlier folders shadow later ones."""
    seen: dict[str, Path] = {}
    for folder in recipe_dirs():
        if folder.is_dir():
            for path in sorted(folder.glob("*.toml")):
                seen.setdefault(path.stem, path)
    return list(seen.values())


def find_recipe(name_or_path: str) -> Path:
    """A path that exists, else a recipe name looked up in the recipe folders."""
    path = Path(name_or_path)
    # A bare name that happens to be a folder here (`sundae data digits digits/` makes
    # one) is still a recipe name; only a file, a `.toml` or a slash makes it a path.
    looks_like_path = path.suffix == ".toml" or path.is_file() or "/" in name_or_path
    if looks_like_path or (path.is_dir() and not _known_name(name_or_path)):
        if path.is_dir():
            raise RecipeError(
                f"recipe file {path} is a folder, not a .toml file",
                hint="pass a recipe .toml file or a name from `sundae recipes list`",
            )
        if not path.is_file():
            raise RecipeError(
                f"recipe file {path} does not exist",
                hint="check the path, or see `sundae recipes list` for known names",
            )
        return path
    for candidate in list_recipes():
        if candidate.stem == name_or_path:
            return candidate
    known = [p.stem for p in list_recipes()]
    raise RecipeError(
        f"no recipe named {name_or_path!r}" + close_match(name_or_path, known),
        hint="see `sundae recipes list`, or pass a path to a .toml file",
    )


def _known_name(name: str) -> bool:
    return any(candidate.stem == name for candidate in list_recipes())


def to_toml(tables: dict[str, Any]) -> str:
    """Write plain tables as TOML (scalars first, then sub-tables, recursively)."""
    lines: list[str] = []
    _emit_table(lines, [], tables)
    return "\n".join(lines).strip() + "\n"


def _emit_table(lines: list[str], path: list[str], table: dict[str, Any]) -> None:
    scalars = {k: v for k, v in table.items() if not isinstance(v, dict)}
    tables = {k: v for k, v in table.items() if isinstance(v, dict)}
    if path and scalars:
        lines.append(f"\n[{'.'.join(path)}]")
    for key, value in scalars.items():
        lines.append(f"{key} = {_toml_value(value)}")
    for key, value in tables.items():
        _emit_table(lines, path + [key], value)


def _toml_value(value: Any) -> str:
    import json

    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {type(value).__name__} as TOML")
