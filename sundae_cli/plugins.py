"""Backend plugins: what an autoencoder and a prior must offer, and how they are found.

Backends register through Python entry points, exactly as a third-party package would:

    [project.entry-points."sundae.autoencoders"]
    vqgan = "sundae_vqgan.plugin:backend"

The entry point names a *light* object (an `AutoencoderBackend` or `PriorBackend`) whose
module must not import torch: it carries the backend's pydantic config model and the
dotted path of a factory that builds the network. Discovery lists names without
importing anything; a backend is imported only when a recipe selects it, and a broken
plugin makes only its own selection fail.
"""

from __future__ import annotations

import importlib
import logging
from dataclasses import dataclass, field
from importlib import metadata
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from pydantic import BaseModel

from sundae_cli.errors import BackendError

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

AUTOENCODER_GROUP = "sundae.autoencoders"
PRIOR_GROUP = "sundae.priors"
GROUPS = (AUTOENCODER_GROUP, PRIOR_GROUP)


@runtime_checkable
class Autoencoder(Protocol):
    """A first-stage model: images to grids of codebook indices and back.

    Images are float tensors (b, 3, H, W) in [-1, 1]; token grids are int64 (b, h, w)
    with h = H / downsample_factor and w = W / downsample_factor.
    """

    codebook_size: int
    downsample_factor: int

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """(b, 3, H, W) float in [-1, 1] -> (b, h, w) int64 codebook indices."""
        ...

    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        """(b, h, w) int64 codebook indices -> (b, 3, H, W) float in [-1, 1]."""
        ...


@runtime_checkable
class Prior(Protocol):
    """A non-autoregressive prior over token grids: logits for all positions at once."""

    codebook_size: int
    num_classes: int

    def __call__(
        self, tokens: torch.Tensor, class_labels: torch.Tensor | None = None
    ) -> torch.Tensor:
        """(b, h, w) int64 tokens [, (b,) int64 labels] -> (b, h, w, k) float logits."""
        ...


@dataclass(frozen=True)
class AutoencoderBackend:
    """What an `sundae.autoencoders` entry point must name.

    `factory` is "module:function"; the function takes a validated `config_model`
    instance and returns an `nn.Module` that satisfies `Autoencoder`. `presets` maps a
    resolution preset name to default config fields, which a recipe's explicit fields
    override.
    """

    name: str
    config_model: type[BaseModel]
    factory: str
    presets: dict[str, dict[str, Any]] = field(default_factory=dict)
    description: str = ""

    def build(self, config: BaseModel) -> Any:
        """Import the factory (and torch) and build the network."""
        return _import_factory(self.name, self.factory)(config)


@dataclass(frozen=True)
class PriorBackend:
    """What an `sundae.priors` entry point must name.

    The factory takes `(config, codebook_size=int)` and returns an `nn.Module` that
    satisfies `Prior`. `presets` works as for autoencoders.
    """

    name: str
    config_model: type[BaseModel]
    factory: str
    presets: dict[str, dict[str, Any]] = field(default_factory=dict)
    description: str = ""

    def build(self, config: BaseModel, codebook_size: int) -> Any:
        """Import the factory (and torch) and build the network."""
        factory = _import_factory(self.name, self.factory)
        return factory(config, codebook_size=codebook_size)


def _import_factory(name: str, dotted: str) -> Any:
    module_name, _, attr = dotted.partition(":")
    try:
        return getattr(importlib.import_module(module_name), attr)
    except Exception as exc:  # a plugin may fail in any way; report which and why
        raise BackendError(
            f"backend {name!r}: cannot import factory {dotted!r}: {exc}",
            hint="reinstall the package that provides this backend",
        ) from exc


@dataclass(frozen=True)
class BackendEntry:
    """One discovered entry point, not yet imported."""

    group: str
    name: str
    value: str
    distribution: str
    version: str

    @property
    def provider(self) -> str:
        return f"{self.distribution} {self.version} ({self.value})"


def discover(group: str) -> dict[str, BackendEntry]:
    """List a group's entry points by name without importing any of them.

    Two distributions that register the same name are an error naming both.
    """
    found: dict[str, BackendEntry] = {}
    for entry_point in metadata.entry_points(group=group):
        dist = entry_point.dist
        entry = BackendEntry(
            group=group,
            name=entry_point.name,
            value=entry_point.value,
            distribution=dist.name if dist else "unknown",
            version=dist.version if dist else "unknown",
        )
        previous = found.get(entry.name)
        if previous is not None and previous.value != entry.value:
            raise BackendError(
                f"{group}: backend name {entry.name!r} is registered twice: by "
                f"{previous.provider} and by {entry.provider}",
                hint="uninstall one of the two distributions",
            )
        found[entry.name] = entry
    return found


def load_entry(entry: BackendEntry) -> AutoencoderBackend | PriorBackend:
    """Import one entry point and check that it names the right kind of object."""
    expected = AutoencoderBackend if entry.group == AUTOENCODER_GROUP else PriorBackend
    module_name, _, attr = entry.value.partition(":")
    try:
        obj = importlib.import_module(module_name)
        for part in attr.split(".") if attr else []:
            obj = getattr(obj, part)
    except Exception as exc:  # a broken plugin must not break anything else
        raise BackendError(
            f"{entry.group}: backend {entry.name!r} from {entry.provider} failed to "
            f"import: {type(exc).__name__}: {exc}",
            hint=f"fix or uninstall the distribution {entry.distribution!r}",
        ) from exc
    if not isinstance(obj, expected):
        raise BackendError(
            f"{entry.group}: backend {entry.name!r} from {entry.provider} is a "
            f"{type(obj).__name__}, not a {expected.__name__}",
            hint=f"the entry point must name a sundae_cli.plugins.{expected.__name__}",
        )
    return obj


def get_backend(group: str, name: str) -> AutoencoderBackend | PriorBackend:
    """Find and import the backend `name` in `group`; unknown names list the known."""
    entries = discover(group)
    if name not in entries:
        known = ", ".join(sorted(entries)) or "none installed"
        raise BackendError(
            f"{group}: unknown backend {name!r} (known: {known})",
            hint="pick a known backend, or install the plugin that provides it",
        )
    return load_entry(entries[name])


def get_autoencoder_backend(name: str) -> AutoencoderBackend:
    backend = get_backend(AUTOENCODER_GROUP, name)
    assert isinstance(backend, AutoencoderBackend)
    return backend


def get_prior_backend(name: str) -> PriorBackend:
    backend = get_backend(PRIOR_GROUP, name)
    assert isinstance(backend, PriorBackend)
    return backend
