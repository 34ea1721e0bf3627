"""Vector quantizer: nearest codebook vector, codebook and commitment losses, remedies.

The quantizer always computes in fp32, also under bf16/fp16 autocast: distances
between nearly equal vectors lose their ordering in 8-bit mantissas.

Axes: b batch, c channels (= embed_dim), h w grid height and width, n flattened
positions, k codebook size.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from einops import einsum, rearrange
from torch import nn

from sundae_vqgan.usage import CodebookUsage

if TYPE_CHECKING:
    from sundae_vqgan.config import VQGANConfig

log = logging.getLogger(__name__)

__all__ = ["CodebookUsage", "VectorQuantizer", "kmeans", "nearest_code"]

# Rows of the (n, k) distance matrix computed at once; caps memory at large batches.
DISTANCE_CHUNK = 16384


def squared_distances(z_flat: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """(n, c), (k, c) -> (n, k) fp32 squared L2 distances."""
    with torch.autocast(z_flat.device.type, enabled=False):
        z_flat, codes = z_flat.float(), codes.float()
        cross = einsum(z_flat, codes, "n c, k c -> n k")
        z_norms = z_flat.pow(2).sum(dim=-1, keepdim=True)  # (n, 1)
        code_norms = rearrange(codes.pow(2).sum(dim=-1), "k -> 1 k")
        return z_norms - 2 * cross + code_norms


@torch.no_grad()
def nearest_code(z_flat: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """(n, c), (k, c) -> (n,) int64 index of the nearest code, in row chunks."""
    chunks = z_flat.split(DISTANCE_CHUNK)
    return torch.cat([squared_distances(rows, codes).argmin(dim=-1) for rows in chunks])


@torch.no_grad()
def kmeans_plus_plus(samples: torch.Tensor, num_clusters: int) -> torch.Tensor:
    """k-means++ seeds for (n, c) fp32 samples -> (k, c) centres.

    Each new centre is drawn with probability proportional to its squared distance
    from the nearest centre so far; with fewer distinct samples than clusters the
    surplus centres repeat samples.
    """
    count = samples.shape[0]
    first = torch.randint(count, (1,), device=samples.device)
    centres = [samples[first]]  # list of (1, c)
    closest = squared_distances(samples, centres[0])[:, 0].clamp_min(0)  # (n,)
    for _ in range(num_clusters - 1):
        # The tiny floor keeps the draw valid once every sample is a centre.
        pick = torch.multinomial(closest + 1e-12, 1)
        centres.append(samples[pick])
        distance = squared_distances(samples, centres[-1])[:, 0].clamp_min(0)
        closest = torch.minimum(closest, distance)
    return torch.cat(centres)


@torch.no_grad()
def kmeans(
    samples: torch.Tensor, num_clusters: int, iters: int, normalize: bool = False
) -> torch.Tensor:
    """Lloyd's k-means on (n, c) fp32 samples -> (k, c) centroids.

    Seeded by k-means++; a cluster that loses all its samples keeps its previous
    centroid. Uses the torch RNG, so it is deterministic given its state.
    """
    centroids = kmeans_plus_plus(samples, num_clusters)
    for _ in range(iters):
        assignment = nearest_code(samples, centroids)
        sums = torch.zeros_like(centroids).index_add_(0, assignment, samples)
        sizes = torch.bincount(assignment, minlength=num_clusters)
        filled = sizes > 0
        centroids[filled] = sums[filled] / rearrange(sizes[filled], "k -> k 1")
        if normalize:
            centroids = F.normalize(centroids, dim=-1)
    return centroids


def _sync_from_rank0(tensor: torch.Tensor) -> None:
    """Under DDP, give every rank rank 0's copy of a tensor that was edited in place."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.broadcast(tensor, src=0)


class VectorQuantizer(nn.Module):
    """Maps encoder outputs to their nearest codebook vectors (taming layout).

    The codebook is `embedding` (an nn.Embedding), so its key is
    `quantize.embedding.weight` inside a VQ-GAN. Loss: ||sg[z] - e||^2 (moves the
    codes) + beta * ||z - sg[e]||^2 (commits the encoder); the decoder gets
    z + sg[e - z], the straight-through estimator.

    Deviation: taming's VectorQuantizer (legacy mode) puts beta on the codebook term
    instead of the commitment term; we follow the VQ-VAE paper. Taming checkpoints
    load unchanged; only fine-tuning sees the difference.

    Remedies (all off by default, which keeps the state dict exactly taming's):
    `l2_normalize` compares unit vectors; `kmeans_init` sets the codebook by k-means on
    the first training batch (a persistent `kmeans_done` buffer, registered only
    when on, stops a resumed run from redoing it); `dead_code_restart` replaces codes
    unused over the usage window with random encoder outputs of the next batch.
    Remedies and usage tracking run only in training mode.
    """

    def __init__(
        self,
        codebook_size: int,
        embed_dim: int,
        beta: float = 0.25,
        *,
        l2_normalize: bool = False,
        kmeans_init: bool = False,
        kmeans_iters: int = 10,
        dead_code_restart: bool = False,
        usage: CodebookUsage | None = None,
    ) -> None:
        super().__init__()
        self.codebook_size = codebook_size
        self.embed_dim = embed_dim
        self.beta = beta
        self.l2_normalize = l2_normalize
        self.kmeans_init = kmeans_init
        self.kmeans_iters = kmeans_iters
        self.dead_code_restart = dead_code_restart
        self.usage = CodebookUsage(codebook_size) if usage is None else usage

        self.embedding = nn.Embedding(codebook_size, embed_dim)
        nn.init.uniform_(self.embedding.weight, -1 / codebook_size, 1 / codebook_size)
        if kmeans_init:
            self.register_buffer("kmeans_done", torch.tensor(False))
        self.register_load_state_dict_pre_hook(_adapt_kmeans_flag)
        self._kmeans_known_done = False
        self._restart_due = False

    @classmethod
    def from_config(cls, config: VQGANConfig) -> VectorQuantizer:
        """Build the quantizer a `VQGANConfig` describes, with its usage tracker."""
        usage = CodebookUsage(
            config.codebook_size,
            window=config.usage_window,
            warn_fraction=config.usage_warn_fraction,
            dead_threshold=config.dead_code_threshold,
        )
        return cls(
            config.codebook_size,
            config.embed_dim,
            config.beta,
            l2_normalize=config.l2_normalize_codes,
            kmeans_init=config.kmeans_init,
            kmeans_iters=config.kmeans_iters,
            dead_code_restart=config.dead_code_restart,
            usage=usage,
        )

    def codes(self) -> torch.Tensor:
        """(k, c) fp32 codebook, unit length when `l2_normalize` is on."""
        codes = self.embedding.weight.float()
        return F.normalize(codes, dim=-1) if self.l2_normalize else codes

    def squared_distances(self, z_flat: torch.Tensor) -> torch.Tensor:
        """(n, c) -> (n, k) fp32 squared distances to every code."""
        with torch.autocast(z_flat.device.type, enabled=False):
            return squared_distances(self._prepare(z_flat), self.codes())

    def lookup(self, indices: torch.Tensor) -> torch.Tensor:
        """(b, h, w) int64 -> (b, c, h, w) fp32 code vectors."""
        with torch.autocast(indices.device.type, enabled=False):
            vectors = F.embedding(indices, self.codes())  # (b, h, w, c)
        return rearrange(vectors, "b h w c -> b c h w")

    def quantize_indices(self, z: torch.Tensor) -> torch.Tensor:
        """(b, c, h, w) latents -> (b, h, w) int64 nearest codes; no remedies."""
        b, _, h, w = z.shape
        with torch.autocast(z.device.type, enabled=False):
            z_flat = self._prepare(rearrange(z, "b c h w -> (b h w) c"))
            indices = nearest_code(z_flat, self.codes())
        return rearrange(indices, "(b h w) -> b h w", b=b, h=h, w=w)

    def forward(
        self, z: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(b, c, h, w) -> z_q (b, c, h, w) fp32, fp32 scalar loss, (b, h, w) int64."""
        b, _, h, w = z.shape
        with torch.autocast(z.device.type, enabled=False):
            z_flat = self._prepare(rearrange(z, "b c h w -> (b h w) c"))
            if self.training:
                self._apply_remedies(z_flat.detach())

            codes = self.codes()
            indices = nearest_code(z_flat, codes)
            quantized = codes[indices]  # (n, c)
            codebook_loss = F.mse_loss(quantized, z_flat.detach())
            commitment_loss = F.mse_loss(z_flat, quantized.detach())
            loss = codebook_loss + self.beta * commitment_loss
            quantized = z_flat + (quantized - z_flat).detach()  # straight through

        if self.training:
            window_complete = self.usage.update(indices)
            self._restart_due |= window_complete and self.dead_code_restart
        z_q = rearrange(quantized, "(b h w) c -> b c h w", b=b, h=h, w=w)
        return z_q, loss, rearrange(indices, "(b h w) -> b h w", b=b, h=h, w=w)

    def _prepare(self, z_flat: torch.Tensor) -> torch.Tensor:
        z_flat = z_flat.float()
        return F.normalize(z_flat, dim=-1) if self.l2_normalize else z_flat

    @torch.no_grad()
    def _apply_remedies(self, z_flat: torch.Tensor) -> None:
        """Run k-means initialisation once, and a pending dead-code restart."""
        if self.kmeans_init and not self._kmeans_known_done:
            if not bool(self.kmeans_done):
                self._initialise_by_kmeans(z_flat)
            self._kmeans_known_done = True
        if self._restart_due:
            self._restart_due = False
            self._restart_dead_codes(z_flat)

    def _initialise_by_kmeans(self, z_flat: torch.Tensor) -> None:
        centroids = kmeans(
            z_flat, self.codebook_size, self.kmeans_iters, normalize=self.l2_normalize
        )
        self.embedding.weight.copy_(centroids)
        self.kmeans_done.fill_(True)
        _sync_from_rank0(self.embedding.weight)
        log.info(
            "initialised %d codes by k-means on %d encoder outputs",
            self.codebook_size,
            z_flat.shape[0],
        )

    def _restart_dead_codes(self, z_flat: torch.Tensor) -> None:
        # Done at the start of a step, before the codebook enters the autograd graph.
        dead = self.usage.dead_codes.to(z_flat.device)
        if dead.numel() > 0:
            picks = torch.randint(z_flat.shape[0], (dead.numel(),), device=dead.device)
            self.embedding.weight.index_copy_(0, dead, z_flat[picks])
            log.info("restarted %d dead codes from encoder outputs", dead.numel())
        _sync_from_rank0(self.embedding.weight)


def _adapt_kmeans_flag(
    module: VectorQuantizer, state_dict: dict[str, Any], prefix: str, *_: Any
) -> None:
    """Let checkpoints load with and without the k-means flag.

    A codebook loaded without the flag (a taming checkpoint) counts as initialised;
    a flag in a checkpoint loaded with k-means off is dropped.
    """
    key = prefix + "kmeans_done"
    if module.kmeans_init and key not in state_dict:
        if prefix + "embedding.weight" in state_dict:
            state_dict[key] = torch.tensor(True)
    elif not module.kmeans_init:
        state_dict.pop(key, None)
