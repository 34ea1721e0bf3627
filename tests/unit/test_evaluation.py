"""Metrics: PSNR, SSIM, codebook statistics, FID and KID maths, feature networks."""

from __future__ import annotations

import logging
import math
import os

import numpy as np
import pytest
import torch
from PIL import Image

from sundae_cli.errors import DataError
from sundae_cli.evaluation import (
    PSNR_CAP_DB,
    codebook_statistics,
    evaluate_reconstruction,
    psnr,
    ssim,
)
from sundae_cli.fid import (
    FeatureStats,
    FidSettings,
    extract_features,
    frechet_distance,
    kernel_inception_distance,
    load_feature_network,
    reference_key,
    reference_statistics,
)

# TorchScript is deprecated in torch 2.13, but it is the format of the standard
# Inception feature file, so the tests build and load TorchScript on purpose.
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit:DeprecationWarning")


def random_spd(dim: int, seed: int) -> np.ndarray:
    """A well-conditioned symmetric positive definite matrix (dim, dim)."""
    rng = np.random.default_rng(seed)
    factor = rng.normal(size=(dim, dim))
    return factor @ factor.T + 0.5 * np.eye(dim)


# ------------------------------------------------------------------ FID


def test_frechet_distance_matches_closed_form_for_diagonal_covariances():
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.normal(size=6), rng.normal(size=6)
    var1, var2 = rng.uniform(0.1, 3, 6), rng.uniform(0.1, 3, 6)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(var1) - np.sqrt(var2)) ** 2)
    got = frechet_distance(mu1, np.diag(var1), mu2, np.diag(var2))
    assert got == pytest.approx(expected, rel=1e-10)


def test_frechet_distance_full_covariances_matches_general_eigenvalues():
    sigma1, sigma2 = random_spd(5, 1), random_spd(5, 2)
    mu1, mu2 = np.arange(5.0), np.ones(5)
    # Independent route: eigenvalues of the non-symmetric product S1 S2 are real and
    # positive; Tr sqrt(S1 S2) is the sum of their square roots.
    eigvals = np.linalg.eigvals(sigma1 @ sigma2)
    trace_sqrt = np.sum(np.sqrt(eigvals.real))
    expected = (
        np.sum((mu1 - mu2) ** 2) + np.trace(sigma1) + np.trace(sigma2) - 2 * trace_sqrt
    )
    got = frechet_distance(mu1, sigma1, mu2, sigma2)
    assert got == pytest.approx(expected, rel=1e-9)
    assert got == pytest.approx(frechet_distance(mu2, sigma2, mu1, sigma1), rel=1e-9)


def test_frechet_distance_of_a_set_with_itself_is_zero():
    features = np.random.default_rng(3).normal(size=(50, 8))
    stats = FeatureStats.of(features)
    assert stats.mu.shape == (8,) and stats.sigma.shape == (8, 8)
    assert stats.sigma.dtype == np.float64
    distance = frechet_distance(stats.mu, stats.sigma, stats.mu, stats.sigma)
    assert 0.0 <= distance < 1e-8


def test_fid_of_samples_approaches_the_gaussians_distance():
    rng = np.random.default_rng(4)
    sigma1, sigma2 = random_spd(3, 5), random_spd(3, 6)
    mu1, mu2 = np.zeros(3), np.array([1.0, -0.5, 2.0])
    exact = frechet_distance(mu1, sigma1, mu2, sigma2)
    first = FeatureStats.of(rng.multivariate_normal(mu1, sigma1, 20000))
    second = FeatureStats.of(rng.multivariate_normal(mu2, sigma2, 20000))
    estimate = frechet_distance(first.mu, first.sigma, second.mu, second.sigma)
    assert estimate == pytest.approx(exact, rel=0.05)


# ------------------------------------------------------------------ KID


def direct_kid(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased MMD^2 with the cubic kernel, written as plain loops."""
    m, d = x.shape

    def kernel(u, v):
        return (float(np.dot(u, v)) / d + 1) ** 3

    xx = sum(kernel(x[i], x[j]) for i in range(m) for j in range(m) if i != j)
    yy = sum(kernel(y[i], y[j]) for i in range(m) for j in range(m) if i != j)
    xy = sum(kernel(x[i], y[j]) for i in range(m) for j in range(m))
    return xx / (m * (m - 1)) + yy / (m * (m - 1)) - 2 * xy / (m * m)


def test_kid_matches_the_direct_formula_on_a_tiny_example():
    rng = np.random.default_rng(7)
    x, y = rng.normal(size=(5, 3)), rng.normal(1.0, 1.0, size=(5, 3))
    # One subset of all rows: a permutation, which MMD does not see.
    mean, std = kernel_inception_distance(x, y, subsets=1, subset_size=5)
    assert mean == pytest.approx(direct_kid(x, y), rel=1e-12)
    assert std == 0.0


def test_kid_is_near_zero_for_one_distribution_and_positive_when_shifted():
    rng = np.random.default_rng(8)
    x, y = rng.normal(size=(400, 16)), rng.normal(size=(400, 16))
    same, _ = kernel_inception_distance(x, y, subsets=20, subset_size=200)
    itself, _ = kernel_inception_distance(x, x, subsets=20, subset_size=200)
    shifted, shifted_std = kernel_inception_distance(
        x, x + 1.0, subsets=20, subset_size=200
    )
    assert abs(same) < 0.05
    # A set against itself shares samples, so the cross term counts k(x, x) on the
    # diagonal: slightly negative, by about 2 (k(x, x) - k(x, y)) / m.
    assert -0.1 < itself <= 0.0
    assert shifted > 5.0 and 0.0 < shifted_std < shifted


def test_kid_subset_size_is_capped_and_seeded():
    rng = np.random.default_rng(9)
    x, y = rng.normal(size=(30, 4)), rng.normal(size=(12, 4))
    first = kernel_inception_distance(x, y, subsets=4, subset_size=1000)
    assert first == kernel_inception_distance(x, y, subsets=4, subset_size=1000)
    with pytest.raises(DataError, match="at least 2 images"):
        kernel_inception_distance(x, y[:1], subsets=2)


# ------------------------------------------------------------------ PSNR / SSIM


def test_psnr_of_identical_images_is_capped():
    images = torch.rand(3, 3, 16, 16) * 2 - 1
    assert torch.equal(psnr(images, images), torch.full((3,), PSNR_CAP_DB))


def test_psnr_of_known_noise_matches_the_formula():
    clean = torch.zeros(2, 3, 8, 8)
    signs = torch.randint(0, 2, (2, 3, 8, 8)).float() * 2 - 1
    levels = torch.tensor([0.1, 0.4]).view(2, 1, 1, 1)
    noisy = clean + levels * signs  # squared error exactly level^2 everywhere
    expected = [10 * math.log10(4 / 0.1**2), 10 * math.log10(4 / 0.4**2)]
    assert psnr(noisy, clean).tolist() == pytest.approx(expected, rel=1e-5)


def test_ssim_is_one_for_identical_images_and_falls_with_noise():
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(2, 3, 32, 32, generator=generator) * 2 - 1
    noise = torch.randn(2, 3, 32, 32, generator=generator)
    same = ssim(images, images)
    slight = ssim(images, (images + 0.05 * noise).clamp(-1, 1))
    strong = ssim(images, (images + 0.5 * noise).clamp(-1, 1))
    assert same.shape == (2,)
    assert torch.allclose(same, torch.ones(2), atol=1e-6)
    assert torch.all(slight < same) and torch.all(strong < slight)
    assert torch.all(strong > -1)


def test_ssim_of_flat_images_matches_the_luminance_term():
    first, second = torch.full((1, 3, 16, 16), 0.5), torch.full((1, 3, 16, 16), -0.2)
    c1 = (0.01 * 2) ** 2
    expected = (2 * 0.5 * -0.2 + c1) / (0.5**2 + 0.2**2 + c1)  # no variance: cs = 1
    assert ssim(first, second).item() == pytest.approx(expected, rel=1e-4)


def test_ssim_small_images_use_a_smaller_window():
    images = torch.rand(1, 3, 6, 9) * 2 - 1
    assert ssim(images, images).item() == pytest.approx(1.0, abs=1e-6)


def test_codebook_statistics_usage_and_perplexity():
    counts = torch.tensor([5, 5, 0, 5, 0, 5, 0, 0])
    stats = codebook_statistics(counts)
    assert stats["codes_used"] == 4 and stats["codebook_size"] == 8
    assert stats["codebook_usage"] == 0.5
    assert stats["perplexity"] == pytest.approx(4.0)


class ZeroAutoencoder:
    """Every image becomes code 0; code 0 decodes to mid-grey (zeros)."""

    codebook_size = 16
    downsample_factor = 4

    def encode(self, images):
        b, _, height, width = images.shape
        return torch.zeros(b, height // 4, width // 4, dtype=torch.int64)

    def decode(self, tokens):
        b, h, w = tokens.shape
        return torch.zeros(b, 3, h * 4, w * 4)


def test_evaluate_reconstruction_averages_over_batches(tmp_path):
    files = []
    for level in range(5):  # flat images at distinct grey levels
        path = tmp_path / f"{level}.png"
        Image.new("RGB", (20, 12), (level * 60,) * 3).save(path)
        files.append(path)
    metrics = evaluate_reconstruction(
        ZeroAutoencoder(), files, (8, 12), batch_size=2, device=torch.device("cpu")
    )
    values = [level * 60 / 127.5 - 1 for level in range(5)]
    expected = [10 * math.log10(4 / max(v * v, 4e-10)) for v in values]
    assert metrics["images"] == 5
    assert metrics["psnr"] == pytest.approx(np.mean(expected), rel=1e-4)
    assert metrics["codes_used"] == 1 and metrics["perplexity"] == pytest.approx(1.0)
    assert metrics["codebook_usage"] == pytest.approx(1 / 16)


# ------------------------------------------------------------------ networks


class Flagged(torch.nn.Module):
    """Returns (b, 6) features only when asked with return_features=True."""

    def forward(self, x: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        if return_features:
            return x.mean(dim=(2, 3)).repeat(1, 2) / 255.0
        return torch.zeros(x.shape[0], 1000)


class Plain(torch.nn.Module):
    """forward(x) only; returns (b, 3, 2, 2), which is flattened to (b, 12)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.adaptive_avg_pool2d(x, 2)


def test_feature_network_conventions(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    for index in range(3):
        Image.new("RGB", (10, 14), (index * 50, 0, 255)).save(images / f"{index}.png")
    files = sorted(images.iterdir())
    for module, width in ((Flagged(), 6), (Plain(), 12)):
        path = tmp_path / f"{type(module).__name__}.pt"
        torch.jit.script(module).save(str(path))
        network = load_feature_network(path, torch.device("cpu"))
        features = extract_features(network, files, 8, "bilinear", batch_size=2)
        assert features.shape == (3, width) and features.dtype == np.float64
        assert network.takes_flag is isinstance(module, Flagged)
    assert features[1, 0] == pytest.approx(50.0)  # [0, 255] input, plain pooling


def test_feature_network_file_errors_name_the_path(tmp_path):
    missing = tmp_path / "nope.pt"
    with pytest.raises(DataError, match="nope.pt does not exist") as caught:
        load_feature_network(missing, torch.device("cpu"))
    assert "--features" in caught.value.hint
    broken = tmp_path / "broken.pt"
    broken.write_text("not a model")
    with pytest.raises(DataError, match="broken.pt is not a TorchScript file"):
        load_feature_network(broken, torch.device("cpu"))


def test_reference_key_follows_files_network_and_resize(tmp_path):
    files = []
    for index in range(2):
        path = tmp_path / f"{index}.png"
        Image.new("RGB", (4, 4)).save(path)
        files.append(path)
    key = reference_key(files, "abc", "bicubic", 299)
    assert key == reference_key(list(reversed(files)), "abc", "bicubic", 299)
    assert key != reference_key(files, "abd", "bicubic", 299)
    assert key != reference_key(files, "abc", "lanczos", 299)
    assert key != reference_key(files, "abc", "bicubic", 64)
    assert key != reference_key(files[:1], "abc", "bicubic", 299)
    stat = files[0].stat()
    os.utime(files[0], ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    assert key != reference_key(files, "abc", "bicubic", 299)


def test_unreadable_cache_is_recomputed_and_replaced(tmp_path, caplog, monkeypatch):
    # The CLI's log setup stops `sundae_cli` records at its own handler; let them
    # reach caplog's root handler whatever ran before.
    monkeypatch.setattr(logging.getLogger("sundae_cli"), "propagate", True)
    images = tmp_path / "images"
    images.mkdir()
    for index in range(4):
        Image.new("RGB", (6, 6), (index * 40, 10, 20)).save(images / f"{index}.png")
    files = sorted(images.iterdir())
    path = tmp_path / "plain.pt"
    torch.jit.script(Plain()).save(str(path))
    network = load_feature_network(path, torch.device("cpu"))
    settings = FidSettings(size=4, batch_size=3, cache_dir=tmp_path / "cache")

    fresh, cache_file, from_cache = reference_statistics(network, files, settings)
    assert not from_cache and cache_file.parent == tmp_path / "cache"
    cache_file.write_bytes(b"garbage")
    again, same_file, from_cache = reference_statistics(network, files, settings)
    assert same_file == cache_file and not from_cache
    assert "ignoring unreadable FID cache" in caplog.text
    cached, _, from_cache = reference_statistics(network, files, settings)
    assert from_cache
    np.testing.assert_array_equal(cached.features, fresh.features)
    np.testing.assert_allclose(cached.sigma, fresh.sigma)
