"""VQ-GAN losses: hinge, adaptive weight, generator/discriminator terms, VGG/LPIPS."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from sundae_cli.errors import DataError
from sundae_vqgan.config import VQGANConfig
from sundae_vqgan.losses import (
    NLayerDiscriminator,
    VQGANLoss,
    adaptive_gan_weight,
    build_discriminator,
    hinge_d_loss,
    hinge_g_loss,
)
from sundae_vqgan.vgg import PerceptualLoss, VGG16Features, load_perceptual

# torchvision vgg16().features: index of each 3x3 convolution and its weight shape.
VGG16_CONVS = {
    0: (64, 3, 3, 3),
    2: (64, 64, 3, 3),
    5: (128, 64, 3, 3),
    7: (128, 128, 3, 3),
    10: (256, 128, 3, 3),
    12: (256, 256, 3, 3),
    14: (256, 256, 3, 3),
    17: (512, 256, 3, 3),
    19: (512, 512, 3, 3),
    21: (512, 512, 3, 3),
    24: (512, 512, 3, 3),
    26: (512, 512, 3, 3),
    28: (512, 512, 3, 3),
}
LPIPS_WIDTHS = (64, 128, 256, 512, 512)


class ExplodingDiscriminator(nn.Module):
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        raise AssertionError("the discriminator must not run before disc_start")


def test_hinge_losses_on_known_logits() -> None:
    logits_real = torch.tensor([2.0, 0.5])
    logits_fake = torch.tensor([-2.0, 0.5])

    # relu(1 - real) = [0, 0.5], relu(1 + fake) = [0, 1.5]
    assert hinge_d_loss(logits_real, logits_fake).item() == pytest.approx(0.5)
    assert hinge_g_loss(logits_fake).item() == pytest.approx(0.75)


def test_adaptive_weight_is_ratio_of_gradient_norms() -> None:
    weight = nn.Parameter(torch.ones(3))
    rec_direction = torch.tensor([3.0, 0.0, 4.0])  # gradient norm 5
    g_direction = torch.tensor([0.0, 2.0, 0.0])  # gradient norm 2

    adaptive = adaptive_gan_weight(
        (weight * rec_direction).sum(), (weight * g_direction).sum(), weight
    )

    assert adaptive.item() == pytest.approx(5.0 / (2.0 + 1e-4))
    assert not adaptive.requires_grad


def test_adaptive_weight_clamps_and_is_zero_without_graph() -> None:
    weight = nn.Parameter(torch.ones(2))
    huge = adaptive_gan_weight((weight * 1e6).sum(), (weight * 0).sum(), weight)
    assert huge.item() == pytest.approx(1e4)

    with torch.no_grad():
        rec_loss, g_loss = (weight * 2).sum(), (weight * 3).sum()
    assert adaptive_gan_weight(rec_loss, g_loss, weight).item() == 0.0


def test_discriminator_shapes_norms_and_layout() -> None:
    images = torch.randn(2, 3, 32, 32)
    for norm in ("batch", "group", "none"):
        disc = NLayerDiscriminator(channels=8, num_layers=3, norm=norm)
        assert disc(images).shape == (2, 1, 2, 2)  # 32 -> 16 -> 8 -> 4 -> 3 -> 2
    batch_norm = NLayerDiscriminator(channels=8, num_layers=3, norm="batch")
    keys = set(batch_norm.state_dict())
    assert {"main.0.weight", "main.0.bias", "main.2.weight", "main.3.weight"} <= keys
    assert "main.2.bias" not in keys  # no conv bias in front of a norm layer
    assert batch_norm.main[-1].out_channels == 1

    config = VQGANConfig(disc_layers=2, disc_channels=16, disc_norm="group")
    built = build_discriminator(config)
    assert isinstance(built.main[3], nn.GroupNorm) and built.main[0].out_channels == 16


def test_generator_loss_before_disc_start_skips_discriminator() -> None:
    images = torch.zeros(2, 3, 8, 8)
    reconstructions = torch.full((2, 3, 8, 8), 0.5, requires_grad=True)
    codebook_loss = torch.tensor(0.25)
    loss = VQGANLoss(disc_start=100)

    total, terms = loss.generator_loss(
        images,
        reconstructions,
        codebook_loss,
        step=99,
        discriminator=ExplodingDiscriminator(),
        last_layer_weight=reconstructions,
    )

    assert not loss.discriminator_active(99) and loss.discriminator_active(100)
    assert total.item() == pytest.approx(0.75)
    assert terms == {
        "l1": 0.5,
        "perceptual": 0.0,
        "codebook": 0.25,
        "g_loss": 0.0,
        "adaptive_weight": 0.0,
    }


def test_generator_loss_after_disc_start_adds_weighted_gan_term() -> None:
    torch.manual_seed(0)
    last_layer = nn.Conv2d(3, 3, 3, padding=1)
    images = torch.rand(2, 3, 16, 16) * 2 - 1
    reconstructions = last_layer(images)
    discriminator = NLayerDiscriminator(channels=8, num_layers=2)
    loss = VQGANLoss(disc_weight=0.5, disc_start=0)

    total, terms = loss.generator_loss(
        images,
        reconstructions,
        torch.tensor(0.1),
        step=0,
        discriminator=discriminator,
        last_layer_weight=last_layer.weight,
    )
    total.backward()

    assert set(terms) == {"l1", "perceptual", "codebook", "g_loss", "adaptive_weight"}
    assert all(isinstance(value, float) for value in terms.values())
    assert terms["adaptive_weight"] > 0
    expected = terms["l1"] + 0.1 + 0.5 * terms["adaptive_weight"] * terms["g_loss"]
    assert total.item() == pytest.approx(expected, rel=1e-5)
    assert last_layer.weight.grad is not None


def test_discriminator_loss_terms() -> None:
    torch.manual_seed(0)
    discriminator = NLayerDiscriminator(channels=8, num_layers=2, norm="none")
    images = torch.rand(2, 3, 16, 16)
    reconstructions = torch.rand(2, 3, 16, 16, requires_grad=True)

    d_loss, terms = VQGANLoss().discriminator_loss(
        images, reconstructions, discriminator=discriminator
    )
    d_loss.backward()

    assert set(terms) == {"d_loss", "logits_real", "logits_fake"}
    assert terms["d_loss"] == pytest.approx(d_loss.item())
    assert reconstructions.grad is None  # reconstructions are detached
    assert discriminator.main[0].weight.grad is not None


def test_vgg16_parameter_names_and_shapes_match_torchvision() -> None:
    shapes = {
        key: tuple(value.shape) for key, value in VGG16Features().state_dict().items()
    }

    expected = {}
    for index, shape in VGG16_CONVS.items():
        expected[f"features.{index}.weight"] = shape
        expected[f"features.{index}.bias"] = (shape[0],)
    assert shapes == expected


@pytest.fixture(scope="module")
def perceptual() -> PerceptualLoss:
    torch.manual_seed(0)
    return PerceptualLoss()


def test_perceptual_distance_zero_for_identical_and_positive_otherwise(
    perceptual: PerceptualLoss,
) -> None:
    images = torch.rand(2, 3, 16, 16) * 2 - 1
    others = images.clone()
    others[1] = -others[1]

    distance = perceptual(images, others)

    assert distance.shape == (2,)
    assert distance[0].item() == 0.0
    assert distance[1].item() > 0.0


def test_perceptual_is_frozen_but_passes_gradients(perceptual: PerceptualLoss) -> None:
    images = torch.rand(1, 3, 16, 16) * 2 - 1
    others = (torch.rand(1, 3, 16, 16) * 2 - 1).requires_grad_()

    perceptual.train()
    perceptual(images, others).sum().backward()

    assert not perceptual.training
    assert all(not parameter.requires_grad for parameter in perceptual.parameters())
    assert others.grad is not None and others.grad.abs().sum() > 0


def test_load_perceptual_from_safetensors_and_lpips_files(tmp_path, perceptual) -> None:
    images = torch.rand(1, 3, 16, 16) * 2 - 1
    others = torch.rand(1, 3, 16, 16) * 2 - 1
    vgg_file = tmp_path / "vgg16.safetensors"
    save_file(perceptual.net.state_dict(), str(vgg_file))
    heads = {
        f"lin{i}.model.1.weight": torch.full((1, width, 1, 1), 2.0)
        for i, width in enumerate(LPIPS_WIDTHS)
    }
    heads_file = tmp_path / "lpips_vgg.pth"
    torch.save(heads, heads_file)
    # LPIPS spelling of the same VGG weights, with its heads, in one file.
    lpips_file = tmp_path / "lpips_full.pth"
    lpips_state = {
        f"net.slice1.{key.removeprefix('features.')}": value
        for key, value in perceptual.net.state_dict().items()
    }
    torch.save({**lpips_state, **heads}, lpips_file)

    uniform = load_perceptual(vgg_file)
    weighted = load_perceptual(vgg_file, heads_path=heads_file)
    from_lpips = load_perceptual(lpips_file)

    reference = perceptual(images, others)
    assert not uniform.has_heads and weighted.has_heads and from_lpips.has_heads
    assert torch.allclose(uniform(images, others), reference)
    assert torch.allclose(weighted(images, others), 2 * reference)
    assert torch.allclose(from_lpips(images, others), 2 * reference)


def test_load_perceptual_bad_files_name_the_path(tmp_path) -> None:
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    wrong = tmp_path / "wrong.safetensors"
    save_file({"features.0.weight": torch.zeros(2, 2)}, str(wrong))

    for path, message in [
        (tmp_path / "missing.pth", "not found"),
        (garbage, "cannot read weights"),
        (wrong, "not VGG16 weights"),
    ]:
        with pytest.raises(DataError, match=message) as caught:
            load_perceptual(path)
        assert str(path) in str(caught.value)
        assert "features.N.weight" in caught.value.hint


def test_generator_loss_with_perceptual_term(perceptual: PerceptualLoss) -> None:
    images = torch.rand(1, 3, 16, 16) * 2 - 1
    reconstructions = torch.rand(1, 3, 16, 16) * 2 - 1
    loss = VQGANLoss(perceptual, perceptual_weight=1.0, disc_start=10)

    total, terms = loss.generator_loss(
        images,
        reconstructions,
        torch.tensor(0.0),
        step=0,
        discriminator=ExplodingDiscriminator(),
        last_layer_weight=reconstructions,
    )

    assert terms["perceptual"] > 0
    assert total.item() == pytest.approx(terms["l1"] + terms["perceptual"], rel=1e-5)
