"""Plugin discovery: lazy, isolated failures, duplicate names, real entry points."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import pytest

from sundae_cli.errors import BackendError
from sundae_cli.plugins import (
    AUTOENCODER_GROUP,
    PRIOR_GROUP,
    AutoencoderBackend,
    PriorBackend,
    discover,
    get_autoencoder_backend,
    get_prior_backend,
)


def install_fake_distribution(root: Path, name: str, entry_points: str, modules):
    """Write a minimal installed distribution (dist-info + modules) under root."""
    info = root / f"{name}-1.2.3.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(
        f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.2.3\n"
    )
    (info / "entry_points.txt").write_text(textwrap.dedent(entry_points))
    for module, source in modules.items():
        (root / f"{module}.py").write_text(textwrap.dedent(source))


@pytest.fixture
def plugin_root(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path
    for module in [m for m in sys.modules if m.startswith("fake_")]:
        del sys.modules[module]


def test_builtin_backends_are_registered_through_entry_points():
    autoencoders, priors = discover(AUTOENCODER_GROUP), discover(PRIOR_GROUP)
    assert autoencoders["vqgan"].distribution == "sundae"
    assert priors["hourglass"].value == "sundae_hourglass.plugin:backend"
    assert isinstance(get_autoencoder_backend("vqgan"), AutoencoderBackend)
    assert isinstance(get_prior_backend("hourglass"), PriorBackend)


def test_discovery_does_not_import_plugins(plugin_root):
    install_fake_distribution(
        plugin_root,
        "fake_lazy",
        "[sundae.priors]\nlazy = fake_lazy_mod:backend\n",
        {"fake_lazy_mod": "raise RuntimeError('imported!')\n"},
    )
    entries = discover(PRIOR_GROUP)
    assert entries["lazy"].distribution == "fake_lazy"
    assert "fake_lazy_mod" not in sys.modules


def test_broken_plugin_fails_only_its_own_selection(plugin_root):
    install_fake_distribution(
        plugin_root,
        "fake_broken",
        "[sundae.priors]\nbroken = fake_broken_mod:backend\n",
        {"fake_broken_mod": "import not_a_real_module_xyz\n"},
    )
    with pytest.raises(BackendError) as info:
        get_prior_backend("broken")
    message = info.value.message
    assert "'broken'" in message and "fake_broken 1.2.3" in message
    assert "not_a_real_module_xyz" in message
    assert isinstance(get_prior_backend("hourglass"), PriorBackend)  # others fine


def test_duplicate_names_name_both_providers(plugin_root):
    install_fake_distribution(
        plugin_root,
        "fake_dup",
        "[sundae.autoencoders]\nvqgan = fake_dup_mod:backend\n",
        {"fake_dup_mod": "backend = None\n"},
    )
    with pytest.raises(BackendError) as info:
        discover(AUTOENCODER_GROUP)
    assert "registered twice" in info.value.message
    assert (
        "sundae 0.1.0" in info.value.message and "fake_dup 1.2.3" in info.value.message
    )


def test_entry_point_of_the_wrong_kind_is_rejected(plugin_root):
    install_fake_distribution(
        plugin_root,
        "fake_wrong",
        "[sundae.priors]\nwrong = fake_wrong_mod:backend\n",
        {"fake_wrong_mod": "backend = object()\n"},
    )
    with pytest.raises(BackendError, match="not a PriorBackend"):
        get_prior_backend("wrong")


def test_unknown_backend_lists_known_names():
    with pytest.raises(BackendError, match=r"unknown backend 'nope' \(known: vqgan\)"):
        get_autoencoder_backend("nope")
