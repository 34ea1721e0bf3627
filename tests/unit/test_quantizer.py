"""Vector quantizer: losses, straight-through gradients, fp32, usage, remedies."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F
from einops import rearrange

from sundae_vqgan.config import VQGANConfig
from sundae_vqgan.model import build_autoencoder
from sundae_vqgan.quantizer import CodebookUsage, VectorQuantizer, kmeans


def _grid(points: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """(b*h*w, c) points -> (b, c, h, w) latents."""
    return rearrange(points, "(b h w) c -> b c h w", h=h, w=w)


def test_nearest_code_and_loss_value() -> None:
    quantizer = VectorQuantizer(4, 2, beta=0.25)
    codes = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    quantizer.embedding.weight.data.copy_(codes)
    points = torch.tensor([[0.9, 0.1], [0.1, 0.8], [0.2, 0.1], [0.7, 0.9]])

    z_q, loss, indices = quantizer(_grid(points, 2, 2))

    assert indices.tolist() == [[[1, 2], [0, 3]]]
    assert torch.allclose(_grid(codes[[1, 2, 0, 3]], 2, 2), z_q)
    expected = 1.25 * F.mse_loss(points, codes[[1, 2, 0, 3]])
    assert torch.allclose(loss, expected)


def test_straight_through_gradient_reaches_input_and_codebook() -> None:
    torch.manual_seed(0)
    quantizer = VectorQuantizer(8, 3)
    z = torch.randn(2, 3, 2, 2, requires_grad=True)
    upstream = torch.randn(2, 3, 2, 2)

    z_q, loss, _ = quantizer(z)
    (z_q * upstream).sum().backward()
    assert torch.allclose(z.grad, upstream)  # identity through the quantizer

    z.grad = None
    loss.backward()
    assert quantizer.embedding.weight.grad.abs().sum() > 0
    assert z.grad.abs().sum() > 0  # commitment term


def test_reconstruction_gradient_reaches_the_encoder() -> None:
    config = VQGANConfig(
        ch=32,
        ch_mult=(1, 2),
        num_res_blocks=1,
        attn_resolutions=(),
        resolution=16,
        z_channels=4,
        embed_dim=4,
        codebook_size=16,
    )
    torch.manual_seed(0)
    model = build_autoencoder(config)
    images = torch.rand(1, 3, 8, 8) * 2 - 1

    reconstruction, _, _ = model(images)
    (reconstruction - images).abs().mean().backward()

    assert model.encoder.conv_in.weight.grad.abs().sum() > 0
    assert model.quant_conv.weight.grad.abs().sum() > 0


def test_quantizer_stays_fp32_under_bf16_autocast() -> None:
    torch.manual_seed(0)
    quantizer = VectorQuantizer(8, 4)
    z = torch.randn(1, 4, 2, 2)

    with torch.autocast("cpu", dtype=torch.bfloat16):
        z_low = z.to(torch.bfloat16)
        distances = quantizer.squared_distances(
            rearrange(z_low, "b c h w -> (b h w) c")
        )
        z_q, loss, indices = quantizer(z_low)
        vectors = quantizer.lookup(indices)

    assert distances.dtype == torch.float32 and distances.shape == (4, 8)
    assert z_q.dtype == torch.float32 and loss.dtype == torch.float32
    assert vectors.dtype == torch.float32
    assert torch.equal(indices, quantizer(z_low.float())[2])


def test_l2_normalised_codes_are_unit_vectors() -> None:
    torch.manual_seed(0)
    quantizer = VectorQuantizer(8, 4, l2_normalize=True)

    z_q, _, indices = quantizer(torch.randn(2, 4, 3, 3))

    assert torch.allclose(quantizer.codes().norm(dim=-1), torch.ones(8))
    assert torch.allclose(z_q.norm(dim=1), torch.ones(2, 3, 3), atol=1e-5)
    assert torch.allclose(quantizer.lookup(indices), z_q, atol=1e-6)


def test_usage_window_fraction_and_warning(caplog: pytest.LogCaptureFixture) -> None:
    usage = CodebookUsage(1024, window=3, warn_fraction=0.1)
    batch = torch.tensor([[0, 5], [5, 5]])

    with caplog.at_level(logging.WARNING, logger="sundae_vqgan.usage"):
        assert usage.update(batch) is False
        assert usage.update(batch) is False
        assert not caplog.records  # no verdict before the window is full
        assert usage.update(batch) is True

    assert usage.usage_fraction == 2 / 1024
    assert usage.counts[0] == 3 and usage.counts[5] == 9
    assert usage.dead_codes.numel() == 1022
    assert len(caplog.records) == 1
    assert "only 0.2% of 1024 codes" in caplog.records[0].getMessage()


def test_usage_window_slides_and_perplexity() -> None:
    usage = CodebookUsage(8, window=2, warn_fraction=0.0)
    for code in range(4):
        usage.update(torch.tensor([code, code]))

    assert torch.nonzero(usage.counts).flatten().tolist() == [2, 3]  # 0, 1 slid out
    assert usage.usage_fraction == 2 / 8
    assert usage.perplexity == pytest.approx(2.0)
    assert usage.stats() == {
        "codebook_usage": 0.25,
        "codebook_perplexity": pytest.approx(2.0),
        "dead_codes": 6.0,
    }


def test_usage_is_tracked_only_in_training() -> None:
    quantizer = VectorQuantizer(8, 2)
    quantizer.eval()
    quantizer(torch.randn(1, 2, 2, 2))
    assert quantizer.usage.batches_seen == 0

    quantizer.train()
    quantizer(torch.randn(1, 2, 2, 2))
    assert quantizer.usage.batches_seen == 1 and int(quantizer.usage.counts.sum()) == 4


def _clustered(seed: int, clusters: int = 8, per_cluster: int = 32) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    centres = torch.randn(clusters, 4, generator=generator) * 3
    noise = torch.randn(clusters, per_cluster, 4, generator=generator) * 0.05
    points = rearrange(centres, "k c -> k 1 c") + noise
    return rearrange(points, "k m c -> (k m) c")


def test_kmeans_init_reduces_quantisation_error() -> None:
    points = _clustered(seed=0)
    z = _grid(points, 16, 16)  # one item on a 16x16 grid
    torch.manual_seed(0)
    plain = VectorQuantizer(8, 4).train()
    torch.manual_seed(0)
    seeded = VectorQuantizer(8, 4, kmeans_init=True, kmeans_iters=10).train()

    error_plain = F.mse_loss(plain(z)[0], z)
    error_kmeans = F.mse_loss(seeded(z)[0], z)

    assert error_kmeans < 0.01 * error_plain
    assert bool(seeded.kmeans_done)
    before = seeded.embedding.weight.detach().clone()
    seeded(z)
    assert torch.equal(seeded.embedding.weight, before)  # done once


def test_kmeans_is_deterministic_given_rng_state() -> None:
    points = _clustered(seed=1)
    torch.manual_seed(3)
    first = kmeans(points, 8, iters=3)
    torch.manual_seed(3)
    second = kmeans(points, 8, iters=3)
    assert torch.equal(first, second)


def test_remedy_state_keys_keep_taming_layout() -> None:
    plain = VectorQuantizer(8, 4)
    seeded = VectorQuantizer(8, 4, kmeans_init=True)
    assert list(plain.state_dict()) == ["embedding.weight"]
    assert set(seeded.state_dict()) == {"embedding.weight", "kmeans_done"}

    # A taming codebook counts as initialised; a k-means flag loads into a plain one.
    seeded.load_state_dict(plain.state_dict(), strict=True)
    assert bool(seeded.kmeans_done)
    plain.load_state_dict(seeded.state_dict(), strict=True)


def test_dead_code_restart_changes_only_dead_codes() -> None:
    torch.manual_seed(0)
    usage = CodebookUsage(8, window=2, warn_fraction=0.0)
    quantizer = VectorQuantizer(8, 2, dead_code_restart=True, usage=usage).train()
    codes = torch.arange(16.0).reshape(8, 2)
    quantizer.embedding.weight.data.copy_(codes)
    near_live = torch.tensor([[0.1, 1.0], [2.0, 3.1], [0.0, 1.1], [2.1, 3.0]])

    quantizer(_grid(near_live, 2, 2))
    quantizer(_grid(near_live, 2, 2))
    assert torch.equal(quantizer.embedding.weight, codes)  # restart waits a step

    fresh = torch.randn(4, 2) + 100
    quantizer(_grid(fresh, 2, 2))
    weight = quantizer.embedding.weight.detach()

    assert torch.equal(weight[:2], codes[:2])
    for row in weight[2:]:
        assert any(torch.equal(row, point) for point in fresh)
