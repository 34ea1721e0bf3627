"""`sundae recipes list|show|validate`."""

from __future__ import annotations

from typing import Annotated

import typer

app = typer.Typer(no_args_is_help=True, help="List, show and validate recipes.")

SetOption = Annotated[
    list[str] | None,
    typer.Option("--set", help="Override a field before validation: key.path=value."),
]


@app.command("list")
def list_() -> None:
    """List recipes in ./recipes, $SUNDAE_RECIPES and the user config dir."""
    from sundae_cli.console import err_console, result
    from sundae_cli.recipes import list_recipes, recipe_dirs

    recipes = list_recipes()
    if not recipes:
        folders = ", ".join(str(d) for d in recipe_dirs())
        err_console().print(f"no recipes found (looked in {folders})")
    for path in recipes:
        result(f"{path.stem}\t{path}")


@app.command("show")
def show(
    recipe: Annotated[str, typer.Argument(help="Recipe name or path to a .toml file.")],
    set_: SetOption = None,
) -> None:
    """Print the fully resolved recipe (presets and overrides filled in) as TOML."""
    from sundae_cli.console import result
    from sundae_cli.recipes import load_recipe, to_toml

    loaded = load_recipe(recipe, set_ or [])
    result(to_toml(loaded.to_dict()).rstrip())


@app.command("validate")
def validate(
    recipe: Annotated[str, typer.Argument(help="Recipe name or path to a .toml file.")],
    set_: SetOption = None,
) -> None:
    """Check a recipe; every problem is printed with its key path."""
    from sundae_cli.console import result
    from sundae_cli.recipes import find_recipe, load_recipe

    loaded = load_recipe(recipe, set_ or [])
    grid_h, grid_w = loaded.grid
    result(
        f"{find_recipe(recipe)}: ok ({loaded.name}, resolution {loaded.resolution}, "
        f"grid {grid_h}x{grid_w}, {loaded.codebook_size} codes)"
    )
