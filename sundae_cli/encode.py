"""`sundae encode`: stream an image folder through the autoencoder into HDF5.

Every image is fitted to the autoencoder's training canvas with the one centre-crop
policy of `sundae_cli.images`, encoded as is and (unless `flip=False`) flipped
horizontally, and appended to the latent file with its source index, flip flag and
optional class label (the first sub-folder). Memory stays bounded: images are decoded
a batch at a time by a background loader, and the writer flushes after each batch.
The file is written under a temporary name, renamed at the end, and an interrupted
encode resumes where it stopped (see `sundae_cli.latents.LatentWriter`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sundae_cli.errors import DataError
from sundae_cli.images import fit_to, load_rgb, scan_folder, to_tensor
from sundae_cli.latents import LatentWriter

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
) -> EncodeResult:
    """Encode every image under `folder` into the HDF5 file `out`.

    `loaded` is a `sundae_cli.models.LoadedModel` of kind "autoencoder".
    """
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
        autoencoder_run=str(loaded.run_path),
        with_labels=labels_from_subfolders,
        class_names=names or None,
        overwrite=overwrite,
    )
    with writer:
        for path, reason in scan.skipped:
            writer.record_skipped(str(path), reason)
        resumed = writer.sources_done
        done = writer.done_paths()
        todo = [i for i, f in enumerate(files) if str(f) not in done]
        if resumed:
            log.info("resuming: %d of %d images already encoded", resumed, len(files))
        _stream(
            writer,
            model,
            files,
            todo,
            labels,
            size,
            flip,
            batch_size,
            num_workers,
            device or next(model.parameters()).device,
        )
        sources, items = writer.sources_done, writer.items_done
        skipped = len(writer.skipped_files)
        return EncodeResult(writer.finish(), sources, items, skipped, resumed)


def _stream(
    writer: LatentWriter,
    model: Any,
    files: list[Path],
    todo: list[int],
    labels: list[int],
    size: tuple[int, int],
    flip: bool,
    batch_size: int,
    num_workers: int,
    device: torch.device,
) -> None:
    """Decode, encode and append `todo` (indices into `files`) batch by batch."""
    from sundae_cli.training import Progress

    dataset = _FittedImages([files[i] for i in todo], size)
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=batch_size,
        num_workers=num_workers,
        collate_fn=_collate,
        pin_memory=device.type == "cuda",
    )
    with Progress(len(files), len(files) - len(todo), "encode", True) as progress:
        done = len(files) - len(todo)
        for batch in loader:
            good = [(todo[pos], image) for pos, image, _ in batch if image is not None]
            for pos, image, reason in batch:
                if image is None:
                    log.warning("skipping %s: %s", files[todo[pos]], reason)
                    writer.record_skipped(str(files[todo[pos]]), reason)
            if good:
                _append(writer, model, files, good, labels, flip, device)
            done += len(batch)
            progress.update(done, f"{writer.items_done} grids")


@torch.no_grad()
def _append(
    writer: LatentWriter,
    model: Any,
    files: list[Path],
    good: list[tuple[int, torch.Tensor]],
    labels: list[int],
    flip: bool,
    device: torch.device,
) -> None:
    """Encode one batch (and its mirror image) and append it to the writer."""
    images = torch.stack([image for _, image in good]).to(device)  # (b, 3, H, W)
    tokens = [model.encode(images).cpu().numpy()]
    flags = [np.zeros(len(good), dtype=bool)]
    if flip:
        tokens.append(model.encode(torch.flip(images, dims=[3])).cpu().numpy())
        flags.append(np.ones(len(good), dtype=bool))
    first = writer.sources_done
    source_index = np.arange(first, first + len(good), dtype=np.int64)
    copies = len(tokens)
    batch_labels = None
    if writer.with_labels:
        batch_labels = np.tile([labels[i] for i, _ in good], copies)
    writer.append(
        np.concatenate(tokens),
        np.tile(source_index, copies),
        np.concatenate(flags),
        batch_labels,
        source_paths=[str(files[i]) for i, _ in good],
    )
