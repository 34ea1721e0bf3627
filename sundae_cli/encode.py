"""`sundae encode`: stream an image folder through the autoencoder into HDF5.

Every image is fitted to the autoencoder's training canvas with the one centre-crop
policy of `sundae_cli.images`, encoded as is and (unless `flip=False`) flipped
horizontally, and appended to the latent file with its source index, flip flag and
optional class label (the first sub-folder). Each image passes through the encoder
on its own (`encode_each`), so its tokens never depend on `--batch-size`. Memory
stays bounded: images are decoded a batch at a time by a background loader, and the
writer flushes after each batch. A folder is scanned (every file decoded once) only
once: the command hands its scan to `encode_folder`.
The file is written under a temporary name, renamed at the end, and an interrupted
encode resumes where it stopped (see `sundae_cli.latent_writer.LatentWriter`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sundae_cli.errors import DataError, SundaeError
from sundae_cli.images import FolderScan, fit_to, load_rgb, scan_folder, to_tensor
from sundae_cli.latent_writer import LatentWriter

log = logging.getLogger(__name__)


@dataclass
class EncodeResult:
    path: Path
    sources: int
    items: int
    skipped: int
    resumed_from: int


class _FittedImages(torch.utils.data.Dataset):
    """(position, (3, H, W) tensor) per file; a file that fails yields its error."""

    def __init__(self, files: list[Path], size: tuple[int, int]) -> None:
        self.files = files
        self.size = size

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, position: int) -> tuple[int, Any, str]:
        try:
            image = fit_to(load_rgb(self.files[position]), self.size, crop="center")
        except (DataError, OSError, ValueError) as exc:
            return position, None, str(getattr(exc, "message", exc))
        return position, to_tensor(image), ""


def _collate(items: list[tuple[int, Any, str]]) -> list[tuple[int, Any, str]]:
    return items  # images of one batch are stacked after failures are dropped


def class_labels(files: list[Path], root: Path) -> tuple[list[int], list[str]]:
    """Label of each file from its first sub-folder under `root`, and the names."""
    parts = [path.relative_to(root).parts for path in files]
    if any(len(p) < 2 for p in parts):
        loose = next(files[i] for i, p in enumerate(parts) if len(p) < 2)
        raise DataError(
            f"--labels-from-subfolders: {loose} is not inside a class sub-folder",
            hint="put every image in ROOT/<class>/..., or drop the flag",
        )
    names = sorted({p[0] for p in parts})
    index = {name: i for i, name in enumerate(names)}
    return [index[p[0]] for p in parts], names


@dataclass
class _Job:
    """What an encode needs besides the writer: the model, the files, the policy."""

    model: Any
    files: list[Path]
    labels: list[int]
    size: tuple[int, int]
    flip: bool
    batch_size: int
    num_workers: int
    device: torch.device


def encode_folder(
    folder: Path,
    out: Path,
    loaded: Any,
    *,
    flip: bool = True,
    labels_from_subfolders: bool = False,
    batch_size: int = 32,
    overwrite: bool = False,
    strict: bool = False,
    num_workers: int = 1,
    device: torch.device | None = None,
    scan: FolderScan | None = None,
) -> EncodeResult:
    """Encode every image under `folder` into the HDF5 file `out`.

    `loaded` is a `sundae_cli.models.LoadedModel` of kind "autoencoder". `scan` is
    the folder's `scan_folder` result when the caller already has it (scanning
    decodes every file once, so it is not repeated). A failed write raises
    `SundaeError` naming the file and the OS error; the partial file stays resumable.
    """
    if scan is None:
        scan = scan_folder(folder, strict=strict)
    log.info("%s: %s", folder, scan.summary())
    files = [Path(f) for f in scan.files]
    labels, names = (
        class_labels(files, Path(folder)) if labels_from_subfolders else ([], [])
    )
    model = loaded.model
    size = tuple(loaded.recipe.data.image_size)
    factor = model.downsample_factor
    writer = LatentWriter(
        out,
        codebook_size=model.codebook_size,
        grid=(size[0] // factor, size[1] // factor),
        image_size=size,
        autoencoder_backend=loaded.recipe.autoencoder.backend,
        autoencoder_sha256=loaded.sha256,
        # Absolute, so that `train prior` and the samplers find it from any folder.
        autoencoder_run=str(loaded.run_path.resolve()),
        with_labels=labels_from_subfolders,
        class_names=names or None,
        overwrite=overwrite,
    )
    device = device or next(model.parameters()).device
    job = _Job(model, files, labels, size, flip, batch_size, num_workers, device)
    try:
        return _fill(writer, scan, job)
    except OSError as err:
        raise SundaeError(
            f"could not write {writer.partial_path}: {err.strerror or err}",
            hint="free disk space (or fix permissions) and run the same command "
            "again: it resumes from the last complete batch",
        ) from err


def _fill(writer: LatentWriter, scan: FolderScan, job: _Job) -> EncodeResult:
    """Skip what the writer already holds, encode the rest, finish the file."""
    with writer:
        for path, reason in scan.skipped:
            writer.record_skipped(str(path), reason)
        resumed = writer.sources_done
        done = writer.done_paths()
        todo = [i for i, f in enumerate(job.files) if str(f) not in done]
        if resumed:
            log.info(
                "resuming: %d of %d images already encoded", resumed, len(job.files)
            )
        _stream(writer, job, todo)
        sources, items = writer.sources_done, writer.items_done
        skipped = len(writer.skipped_files)
        return EncodeResult(writer.finish(), sources, items, skipped, resumed)


def _stream(writer: LatentWriter, job: _Job, todo: list[int]) -> None:
    """Decode, encode and append `todo` (indices into `job.files`) batch by batch."""
    from sundae_cli.training import Progress

    files = job.files
    loader = torch.utils.data.DataLoader(
        _FittedImages([files[i] for i in todo], job.size),
        batch_size=job.batch_size,
        num_workers=job.num_workers,
        collate_fn=_collate,
        pin_memory=job.device.type == "cuda",
    )
    done = len(files) - len(todo)
    with Progress(len(files), done, "encode", True) as progress:
        for batch in loader:
            good = [(todo[pos], image) for pos, image, _ in batch if image is not None]
            for pos, image, reason in batch:
                if image is None:
                    log.warning("skipping %s: %s", files[todo[pos]], reason)
                    writer.record_skipped(str(files[todo[pos]]), reason)
            if good:
                _append(writer, job, good)
            done += len(batch)
            progress.update(done, f"{writer.items_done} grids")


@torch.no_grad()
def encode_each(model: Any, images: torch.Tensor) -> torch.Tensor:
    """(b, 3, H, W) float in [-1, 1] -> (b, h, w) int64 tokens, one image per forward.

    Convolution libraries choose their kernels, and so their summation order, by
    batch size: a batched forward moves latents by about 1e-6, enough to flip a
    nearest-code tie. A forward per image keeps every token independent of
    `--batch-size`, of the neighbouring images and of where a resumed run restarts;
    on the CPU it costs little at realistic sizes, on a GPU it under-uses the device.
    """
    return torch.cat([model.encode(image[None]) for image in images])


@torch.no_grad()
def _append(
    writer: LatentWriter, job: _Job, good: list[tuple[int, torch.Tensor]]
) -> None:
    """Encode one batch (and its mirror image) and append it to the writer."""
    images = torch.stack([image for _, image in good]).to(job.device)  # (b, 3, H, W)
    tokens = [encode_each(job.model, images).cpu().numpy()]
    flags = [np.zeros(len(good), dtype=bool)]
    if job.flip:
        mirrored = torch.flip(images, dims=[3])
        tokens.append(encode_each(job.model, mirrored).cpu().numpy())
        flags.append(np.ones(len(good), dtype=bool))
    first = writer.sources_done
    source_index = np.arange(first, first + len(good), dtype=np.int64)
    copies = len(tokens)
    batch_labels = None
    if writer.with_labels:
        batch_labels = np.tile([job.labels[i] for i, _ in good], copies)
    writer.append(
        np.concatenate(tokens),
        np.tile(source_index, copies),
        np.concatenate(flags),
        batch_labels,
        source_paths=[str(job.files[i]) for i, _ in good],
    )
