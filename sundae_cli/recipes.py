"""Recipes: pydantic-validated TOML files that say what to train and how to sample.

Loading runs in a fixed order so a user can always predict the result:

1. read the TOML (`tomllib`; syntax errors keep their line and column);
2. apply `--set key.path=value` overrides to the raw tables;
3. fill defaults from the `resolution` preset and the selected backends' presets;
4. validate everything at once: the core sections with the models below, the
   `[autoencoder]` and `[prior]` tables with each backend's own config model.

Every problem is reported in one `RecipeError`, one line per key path, with a close
match for misspelt keys. Models are frozen and forbid unknown keys.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PositiveFloat,
    PositiveInt,
    ValidationError,
)

from sundae_cli.errors import BackendError, RecipeError
from sundae_cli.presets import RESOLUTION_PRESETS, deep_merge

# Finding and writing recipe files lives in recipe_files; its public names are
# re-exported here because commands, training and tests import them from recipes.
from sundae_cli.recipe_files import (  # noqa: F401
    close_match,
    find_recipe,
    list_recipes,
    recipe_dirs,
    to_toml,
)

SCHEMA_VERSION = 1


def _pair(value: Any) -> Any:
    """Accept `x` or `[start, end]` for schedules and `n` or `[h, w]` for sizes."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        return (value, value)
    if isinstance(value, list):
        return tuple(value)
    return value


FloatPair = Annotated[tuple[float, float], BeforeValidator(_pair)]
SizePair = Annotated[tuple[PositiveInt, PositiveInt], BeforeValidator(_pair)]


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class DataSection(Section):
    """The images: canvas size and how they are cropped for stage 1."""

    image_size: SizePair = (256, 256)  # (height, width) in pixels; an int is square
    # center/random: scale to cover, then crop; patch: random native-scale patches
    # (training only; encoding always uses center). See sundae_cli.images.fit_to.
    crop: Literal["center", "random", "patch"] = "center"
    flip: bool = True  # random horizontal flips while training the autoencoder
    val_fraction: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.05  # held-out share
    dir: str | None = None  # default image folder for `train vqgan` (or --data)


class LatentsSection(Section):
    """The HDF5 latent dataset written by `sundae encode` and read by `train prior`.

    Known shortcoming: `sundae encode` takes no recipe, so `flip` and `batch_size`
    only record how a recipe's latents are meant to be made; pass the matching
    `--no-flip` and `--batch-size` flags to `sundae encode` yourself.
    """

    path: str = "latents.h5"  # default --latents of `train prior` (relative to cwd)
    flip: bool = True  # intended `encode` setting: store flipped copies too
    batch_size: PositiveInt = 32  # intended `encode --batch-size`


class BackendSection(BaseModel):
    """`backend = NAME` plus that backend's own, separately validated, fields."""

    model_config = ConfigDict(frozen=True, arbitrary_types_allowed=True)

    backend: str
    config: Any  # the backend's validated config model instance


class OptimSection(Section):
    """Optimiser, schedule and bookkeeping shared by both training stages."""

    steps: PositiveInt = 10_000
    batch_size: PositiveInt = 8  # per process; see `accumulate` and torchrun
    learning_rate: PositiveFloat = 3e-5  # the paper's constant AdamW rate for priors
    weight_decay: Annotated[float, Field(ge=0.0)] = 0.0
    betas: FloatPair = (0.9, 0.99)
    schedule: Literal["constant", "cosine"] = "constant"
    warmup_steps: Annotated[int, Field(ge=0)] = 0
    grad_clip: Annotated[float, Field(ge=0.0)] = 1.0  # 0 disables clipping
    accumulate: PositiveInt = 1  # gradient accumulation micro-batches per step
    log_every: PositiveInt = 100
    eval_every: PositiveInt = 500
    sample_every: PositiveInt = 1000
    checkpoint_every: PositiveInt = 1000
    keep_checkpoints: PositiveInt = 3
    num_workers: Annotated[int, Field(ge=0)] = 0
    nonfinite: Literal["stop", "skip"] = "stop"  # on a NaN/inf loss


class VQGANTrainSection(OptimSection):
    """Stage 1 losses on top of the shared optimiser settings (taming's defaults)."""

    learning_rate: PositiveFloat = 1e-4
    betas: FloatPair = (0.5, 0.9)
    grad_clip: Annotated[float, Field(ge=0.0)] = 0.0
    l1_weight: Annotated[float, Field(ge=0.0)] = 1.0
    codebook_weight: Annotated[float, Field(ge=0.0)] = 1.0
    perceptual_weight: Annotated[float, Field(ge=0.0)] = 1.0
    perceptual_weights: str | None = None  # VGG16 / LPIPS weights file; off if unset
    disc_weight: Annotated[float, Field(ge=0.0)] = 0.5
    disc_start: Annotated[int, Field(ge=0)] = 15_000  # paper's megapixel run


class PriorTrainSection(OptimSection):
    """Stage 2: SUNDAE training of the prior."""

    unroll_steps: PositiveInt = 2  # paper: 2 (3 in some runs)
    ema_decay: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.999


class TrainSection(Section):
    vqgan: VQGANTrainSection = VQGANTrainSection()
    prior: PriorTrainSection = PriorTrainSection()


class SamplingSection(Section):
    """Defaults of `sundae sample`, `generate` and `inpaint` (flags override)."""

    steps: PositiveInt = 100
    temperature: FloatPair = (0.8, 0.8)  # start, end (linear); a number is constant
    proportion: FloatPair = (0.5, 0.5)  # share of tokens updated per step
    top_k: PositiveInt | None = None
    update: Literal["random", "confidence"] = "random"
    min_steps: Annotated[int, Field(ge=0)] = 10
    early_stop: bool = True
    batch_size: PositiveInt = 16


class Recipe(BaseModel):
    """A fully resolved recipe: what `sundae recipes show` prints."""

    model_config = ConfigDict(
        extra="forbid", frozen=True, strict=True, arbitrary_types_allowed=True
    )

    schema_version: Literal[1] = SCHEMA_VERSION
    name: str
    resolution: str
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    seed: int = 0
    data: DataSection = DataSection()
    autoencoder: BackendSection
    latents: LatentsSection = LatentsSection()
    prior: BackendSection
    train: TrainSection = TrainSection()
    sampling: SamplingSection = SamplingSection()

    @property
    def downsample_factor(self) -> int:
        return int(self.autoencoder.config.downsample_factor)

    @property
    def codebook_size(self) -> int:
        return int(self.autoencoder.config.codebook_size)

    @property
    def grid(self) -> tuple[int, int]:
        """Token grid (h, w) of the training canvas."""
        height, width = self.data.image_size
        return height // self.downsample_factor, width // self.downsample_factor

    def to_dict(self) -> dict[str, Any]:
        """Plain tables (TOML/JSON-ready), backend sections flattened back."""
        tables = self.model_dump(mode="json", exclude={"autoencoder", "prior"})
        for key in ("autoencoder", "prior"):
            section: BackendSection = getattr(self, key)
            config = section.config.model_dump(mode="json", exclude_none=True)
            tables[key] = {"backend": section.backend, **config}
        return _without_none(tables)


def _without_none(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _without_none(v) for k, v in value.items() if v is not None}
    return value


# --------------------------------------------------------------------------- loading


def read_toml(path: Path) -> dict[str, Any]:
    """Read a TOML file; a missing file or syntax error becomes a `RecipeError`."""
    if not path.is_file():
        raise RecipeError(
            f"recipe file {path} does not exist",
            hint="pass a path to a .toml file or a name from `sundae recipes list`",
        )
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:  # message carries "(at line L, column C)"
        raise RecipeError(
            f"{path}: TOML syntax error: {exc}",
            hint="fix the line and column named above",
        ) from exc
    except UnicodeDecodeError as exc:
        raise RecipeError(f"{path}: not UTF-8 text: {exc}") from exc


def parse_override(text: str) -> tuple[list[str], Any]:
    """Parse `key.path=value`; the value is read as TOML, else as a plain string."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise RecipeError(
            f"--set {text!r} is not of the form key.path=value",
            hint="for example --set train.prior.learning_rate=1e-4",
        )
    try:
        value = tomllib.loads(f"value = {raw.strip()}")["value"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()
    return key.split("."), value


def apply_overrides(tables: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Return a copy of the raw tables with every `--set` applied."""
    result = deep_merge({}, tables)
    for text in overrides:
        path, value = parse_override(text)
        node = result
        for part in path[:-1]:
            child = node.get(part)
            if not isinstance(child, dict):
                child = {}
                node[part] = child
            node = child
        node[path[-1]] = value
    return result


def _error_lines(
    exc: ValidationError, prefix: tuple[str, ...], model: type[BaseModel]
) -> list[str]:
    """One line per pydantic error: `key.path: message`, with typo suggestions."""
    lines = []
    for err in exc.errors():
        loc = [str(part) for part in prefix + tuple(err["loc"])]
        path = ".".join(loc) or "(top level)"
        message = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            siblings = _field_names(model, [str(p) for p in err["loc"][:-1]])
            message = "unknown key" + close_match(loc[-1], siblings)
        lines.append(f"{path}: {message}")
    return lines


def _field_names(model: type[BaseModel], loc: list[str]) -> list[str]:
    """Field names of the (nested) model at `loc`, for close-match suggestions."""
    current: Any = model
    for part in loc:
        field = getattr(current, "model_fields", {}).get(part)
        if field is None:
            return []
        current = field.annotation
    return list(getattr(current, "model_fields", {}))


def resolve_tables(raw: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """Fill preset defaults into raw tables; return them and the problems found."""
    from sundae_cli.plugins import get_autoencoder_backend, get_prior_backend

    problems: list[str] = []
    resolution = raw.get("resolution")
    if resolution is None:
        problems.append("resolution: missing (one of " + _preset_names() + ")")
        return raw, problems
    preset = RESOLUTION_PRESETS.get(str(resolution))
    if preset is None:
        problems.append(
            f"resolution: unknown preset {resolution!r} (one of {_preset_names()})"
            + close_match(str(resolution), list(RESOLUTION_PRESETS))
        )
        return raw, problems

    tables = deep_merge(preset, raw)
    for key, getter, default in (
        ("autoencoder", get_autoencoder_backend, "vqgan"),
        ("prior", get_prior_backend, "hourglass"),
    ):
        section = dict(tables.get(key) or {})
        name = section.setdefault("backend", default)
        try:
            backend = getter(str(name))
        except BackendError as exc:
            problems.append(f"{key}.backend: {exc.message}")
            continue
        defaults = backend.presets.get(str(resolution), {})
        tables[key] = deep_merge(defaults, section)
    return tables, problems


def _preset_names() -> str:
    return ", ".join(repr(name) for name in RESOLUTION_PRESETS)


def validate_tables(tables: dict[str, Any], source: str) -> Recipe:
    """Validate resolved tables into a `Recipe`, collecting every problem at once."""
    from sundae_cli.plugins import get_autoencoder_backend, get_prior_backend

    tables, problems = resolve_tables(tables)
    backend_sections: dict[str, BackendSection] = {}
    for key, getter in (
        ("autoencoder", get_autoencoder_backend),
        ("prior", get_prior_backend),
    ):
        section = dict(tables.get(key) or {})
        name = str(section.pop("backend", ""))
        try:
            backend = getter(name)
            config = backend.config_model.model_validate(section)
            backend_sections[key] = BackendSection(backend=name, config=config)
        except BackendError:
            continue  # already reported by resolve_tables
        except ValidationError as exc:
            problems += _error_lines(exc, (key,), backend.config_model)

    core = {k: v for k, v in tables.items() if k not in ("autoencoder", "prior")}
    core.setdefault("name", Path(source).stem)
    placeholder = BackendSection(backend="", config=None)
    try:
        recipe = Recipe.model_validate(
            {
                **core,
                "autoencoder": backend_sections.get("autoencoder", placeholder),
                "prior": backend_sections.get("prior", placeholder),
            }
        )
    except ValidationError as exc:
        problems += _error_lines(exc, (), Recipe)
        recipe = None
    if problems or recipe is None:
        count = len(problems)
        raise RecipeError(
            f"{source}: {count} problem{'s' if count != 1 else ''} in the recipe",
            hint="fix the keys named above (`sundae recipes show` prints every field)",
            problems=problems,
        )
    _check_geometry(recipe, source)
    return recipe


def _check_geometry(recipe: Recipe, source: str) -> None:
    height, width = recipe.data.image_size
    factor = recipe.downsample_factor
    if height % factor or width % factor:
        raise RecipeError(
            f"{source}: data.image_size {height}x{width} is not divisible by the "
            f"autoencoder's downsampling factor {factor}",
            hint=f"use a size that is a multiple of {factor}",
        )


def load_recipe(name_or_path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Find, read, override, fill and validate a recipe."""
    path = find_recipe(str(name_or_path))
    raw = read_toml(path)
    tables = apply_overrides(raw, overrides or [])
    return validate_tables(tables, str(path))


def recipe_from_dict(tables: dict[str, Any], source: str = "recipe") -> Recipe:
    """Validate tables that were saved earlier (for example in a run directory)."""
    return validate_tables(deep_merge({}, tables), source)
