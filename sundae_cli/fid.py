"""FID and KID between two folders of images, from a user-supplied feature network.

Axes: `b` batch, `d` feature width of the FID network; a set of features is (n, d),
one row per image.

Conventions:

- Features come from a TorchScript network the user supplies; nothing is ever
  downloaded. Images are resized (without cropping, in 8 bits) to a square `size`
  with the chosen PIL filter and fed as float (b, 3, size, size) in [0, 255], NCHW.
  A network taking `return_features=True` (the StyleGAN Inception
  `inception-2015-12-05.pt`) is called that way; any other is called as `net(x)`. The
  output must be (b, d); anything with more axes is flattened to (b, d).
- Statistics are float64. Reference statistics (mean, covariance, raw features for
  KID) are cached as .npz, keyed by the folder listing, the network's sha256, the
  resize filter and the size.
"""

from __future__ import annotations

import hashlib
import json
import logging
import warnings
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from sundae_cli.errors import DataError
from sundae_cli.fsutil import atomic_path, sha256_file
from sundae_cli.images import load_rgb

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

MIN_FID_SAMPLES = 2048  # below this FID is biased upwards and rank-deficient
RESIZE_MODES = ("bilinear", "bicubic", "lanczos")


def _progress(total: int, description: str):
    from sundae_cli.training import Progress

    return Progress(total, 0, description, enabled=True)


# ------------------------------------------------------------- feature network

FEATURES_HINT = (
    "pass --features PATH to a TorchScript feature network, e.g. the StyleGAN "
    "Inception inception-2015-12-05.pt (sundae never downloads one)"
)


@dataclass
class FeatureNetwork:
    """A TorchScript network mapping (b, 3, S, S) floats in [0, 255] to (b, d)."""

    path: Path
    sha256: str
    module: Any
    device: torch.device
    takes_flag: bool | None = None  # accepts return_features=True; set on 1st call

    def _forward(self, images: torch.Tensor) -> Any:
        if self.takes_flag is not False:
            try:
                out = self.module(images, return_features=True)
                self.takes_flag = True
                return out
            except RuntimeError:
                if self.takes_flag:
                    raise
                self.takes_flag = False  # a plain network: forward(x) only
        return self.module(images)

    def __call__(self, images: torch.Tensor) -> np.ndarray:
        """(b, 3, S, S) float in [0, 255] -> (b, d) float64 features."""
        import torch

        try:
            out = self._forward(images)
        except RuntimeError as exc:
            raise DataError(
                f"feature network {self.path} failed on a batch of shape "
                f"{tuple(images.shape)}: {str(exc).strip().splitlines()[0]}",
                hint="it must take float (b, 3, S, S) in [0, 255]; check --size",
            ) from exc
        if not isinstance(out, torch.Tensor) or out.dim() < 2:
            raise DataError(
                f"feature network {self.path} returned {type(out).__name__} "
                f"{tuple(getattr(out, 'shape', ()))}, not a (b, d) tensor",
                hint="export a network whose forward returns one (b, d) tensor",
            )
        return out.detach().flatten(1).double().cpu().numpy()


def load_feature_network(path: Path, device: torch.device) -> FeatureNetwork:
    """Load a user-supplied TorchScript file; `DataError` if missing or unreadable."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise DataError(f"feature network {path} does not exist", FEATURES_HINT)
    try:
        with warnings.catch_warnings():
            # TorchScript is deprecated in torch 2.13, but it is the only format the
            # standard Inception feature file ships in.
            warnings.simplefilter("ignore", DeprecationWarning)
            module = torch.jit.load(str(path), map_location=device)
    except (RuntimeError, ValueError, OSError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else "unreadable"
        raise DataError(
            f"feature network {path} is not a TorchScript file: {reason}",
            FEATURES_HINT,
        ) from exc
    module.eval()
    return FeatureNetwork(path, sha256_file(path), module, device)


def _resized_batch(files: Sequence[Path], size: int, resize_mode: str) -> torch.Tensor:
    """Images resized to (size, size), no crop, as float (b, 3, S, S) in [0, 255]."""
    import torch
    from PIL import Image

    if resize_mode not in RESIZE_MODES:
        raise DataError(
            f"unknown resize mode {resize_mode!r}",
            f"use --resize-mode {' | '.join(RESIZE_MODES)}",
        )
    resample = getattr(Image.Resampling, resize_mode.upper())
    pixels = [np.asarray(load_rgb(f).resize((size, size), resample)) for f in files]
    return torch.from_numpy(np.stack(pixels)).permute(0, 3, 1, 2).float()


def extract_features(
    network: FeatureNetwork,
    files: Sequence[Path],
    size: int,
    resize_mode: str,
    batch_size: int,
    description: str = "features",
) -> np.ndarray:
    """Features (n, d) float64 of `files` resized to (size, size) by `resize_mode`."""
    import torch

    chunks = []
    with torch.inference_mode(), _progress(len(files), description) as bar:
        for start in range(0, len(files), batch_size):
            batch = _resized_batch(files[start : start + batch_size], size, resize_mode)
            chunks.append(network(batch.to(network.device)))
            bar.update(min(start + batch_size, len(files)), "")
    return np.concatenate(chunks)


# ------------------------------------------------------------- FID and KID


@dataclass
class FeatureStats:
    """Raw features (n, d), their mean (d,) and covariance (d, d), all float64."""

    features: np.ndarray
    mu: np.ndarray
    sigma: np.ndarray

    @classmethod
    def of(cls, features: np.ndarray) -> FeatureStats:
        features = np.asarray(features, dtype=np.float64)
        sigma = np.atleast_2d(np.cov(features, rowvar=False))
        return cls(features, features.mean(axis=0), sigma)


def _sqrt_psd(matrix: np.ndarray) -> np.ndarray:
    """Square root of a symmetric positive semi-definite matrix (d, d)."""
    eigvals, eigvecs = np.linalg.eigh((matrix + matrix.T) / 2)
    return (eigvecs * np.sqrt(np.clip(eigvals, 0, None))) @ eigvecs.T


def frechet_distance(
    mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray
) -> float:
    """|mu1 - mu2|^2 + Tr(S1 + S2 - 2 sqrt(S1 S2)) between two Gaussians, float64.

    Tr sqrt(S1 S2) is computed as Tr sqrt(sqrt(S1) S2 sqrt(S1)): the same eigenvalues,
    but a symmetric matrix, so `eigh` applies and no complex parts appear.
    """
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    sigma1, sigma2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    root1 = _sqrt_psd(sigma1)
    middle = root1 @ sigma2 @ root1
    eigvals = np.linalg.eigvalsh((middle + middle.T) / 2)
    trace_sqrt = np.sqrt(np.clip(eigvals, 0, None)).sum()
    distance = float(
        np.sum((mu1 - mu2) ** 2) + np.trace(sigma1) + np.trace(sigma2) - 2 * trace_sqrt
    )
    return max(distance, 0.0)  # rounding can dip a hair below zero


def _unbiased_mmd2(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased MMD^2 with k(x, y) = (x.y / d + 1)^3 for (m, d) samples each."""
    m, d = x.shape
    k_xx = (x @ x.T / d + 1) ** 3
    k_yy = (y @ y.T / d + 1) ** 3
    k_xy = (x @ y.T / d + 1) ** 3
    within = (k_xx.sum() - np.trace(k_xx) + k_yy.sum() - np.trace(k_yy)) / (m * (m - 1))
    return float(within - 2 * k_xy.mean())


def kernel_inception_distance(
    x: np.ndarray, y: np.ndarray, subsets: int = 100, subset_size: int = 1000, seed=0
) -> tuple[float, float]:
    """KID (mean, population std) over random subsets of features (n1, d), (n2, d).

    The subset size is capped by the smaller set; each subset draws without
    replacement. The estimator is unbiased, so identical sets may give a value
    slightly below zero.
    """
    m = min(subset_size, len(x), len(y))
    if m < 2:
        raise DataError("KID needs at least 2 images per set", "add more images")
    rng = np.random.default_rng(seed)
    values = [
        _unbiased_mmd2(
            x[rng.choice(len(x), m, replace=False)],
            y[rng.choice(len(y), m, replace=False)],
        )
        for _ in range(subsets)
    ]
    return float(np.mean(values)), float(np.std(values))


# ------------------------------------------------------------- reference cache


def reference_key(
    files: Sequence[Path], network_sha256: str, resize_mode: str, size: int
) -> str:
    """Hash of the sorted file list (path, bytes, mtime), network and resize."""
    listing = []
    for path in sorted(Path(f).resolve() for f in files):
        stat = path.stat()
        listing.append([str(path), stat.st_size, stat.st_mtime_ns])
    blob = json.dumps([listing, network_sha256, resize_mode, size])
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def _read_cache(path: Path) -> FeatureStats | None:
    try:
        with np.load(path, allow_pickle=False) as data:
            features = data["features"].astype(np.float64)
            return FeatureStats(features, data["mu"], data["sigma"])
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as exc:
        log.warning("ignoring unreadable FID cache %s (%s)", path, exc)
        return None


def _write_cache(path: Path, stats: FeatureStats) -> None:
    # Features are stored as float32, which is what networks compute in (lossless
    # for them) and halves the file; mean and covariance stay float64.
    features = stats.features.astype(np.float32)
    with atomic_path(path) as temp, open(temp, "wb") as handle:
        np.savez(handle, features=features, mu=stats.mu, sigma=stats.sigma)


@dataclass
class FidSettings:
    """How images become features, and how KID subsamples them."""

    size: int = 299
    resize_mode: str = "bicubic"
    batch_size: int = 50
    kid_subsets: int = 100
    kid_subset_size: int = 1000
    cache_dir: Path | None = None  # default: sundae_home()/fid-cache


def reference_statistics(
    network: FeatureNetwork, files: Sequence[Path], settings: FidSettings
) -> tuple[FeatureStats, Path, bool]:
    """Reference statistics, the cache file, and whether they came from the cache."""
    from sundae_cli.runs import sundae_home

    cache_dir = settings.cache_dir or sundae_home() / "fid-cache"
    key = reference_key(files, network.sha256, settings.resize_mode, settings.size)
    path = Path(cache_dir) / f"{key}.npz"
    if path.is_file():
        cached = _read_cache(path)
        if cached is not None:
            log.info("using cached reference statistics %s", path)
            return cached, path, True
    stats = _folder_stats(network, files, settings, "real")
    _write_cache(path, stats)
    log.info("cached reference statistics in %s", path)
    return stats, path, False


def _folder_stats(
    network: FeatureNetwork, files: Sequence[Path], settings: FidSettings, name: str
) -> FeatureStats:
    if len(files) < 2:
        raise DataError(
            f"FID needs at least 2 images per folder, got {len(files)}",
            "add images to the folder (2048 or more for comparable numbers)",
        )
    features = extract_features(
        network,
        files,
        settings.size,
        settings.resize_mode,
        settings.batch_size,
        description=f"features ({name})",
    )
    return FeatureStats.of(features)


def _warn_if_few(count: int, name: str, width: int) -> None:
    """Warn that FID is biased (and the covariance singular) for small sets."""
    if count >= MIN_FID_SAMPLES:
        return
    singular = ""
    if count <= width:
        singular = f", and the covariance is singular at <= {width} (feature width)"
    log.warning(
        "only %d %s images: FID is biased upwards below %d per set%s; compare "
        "scores only at equal sample counts",
        count,
        name,
        MIN_FID_SAMPLES,
        singular,
    )


def evaluate_fid(
    real_files: Sequence[Path],
    fake_files: Sequence[Path],
    network: FeatureNetwork,
    settings: FidSettings,
) -> dict[str, Any]:
    """FID and KID of `fake_files` against `real_files`; a JSON-ready report."""
    real, cache_path, from_cache = reference_statistics(network, real_files, settings)
    fake = _folder_stats(network, fake_files, settings, "fake")
    width = real.features.shape[1]
    _warn_if_few(len(real_files), "real", width)
    _warn_if_few(len(fake_files), "fake", width)
    fid = frechet_distance(real.mu, real.sigma, fake.mu, fake.sigma)
    kid_mean, kid_std = kernel_inception_distance(
        real.features, fake.features, settings.kid_subsets, settings.kid_subset_size
    )
    return {
        "fid": fid,
        "kid_mean": kid_mean,
        "kid_std": kid_std,
        "kid_subsets": settings.kid_subsets,
        "kid_subset_size": min(
            settings.kid_subset_size, len(real_files), len(fake_files)
        ),
        "real_images": len(real_files),
        "fake_images": len(fake_files),
        "resize_mode": settings.resize_mode,
        "size": settings.size,
        "features": str(network.path),
        "features_sha256": network.sha256,
        "feature_width": width,
        "reference_cache": str(cache_path),
        "reference_from_cache": from_cache,
    }
