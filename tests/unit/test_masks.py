"""Inpainting masks: cases C03 and C18-C20, token policies, padding, pasting."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image, ImageFilter

from sundae_cli.errors import DataError
from sundae_cli.masks import (
    feather_alpha,
    load_mask,
    masked_fraction,
    pad_to_multiple,
    paste_known,
    token_mask,
    unpad,
)

SIZE = 64
DRAWN = 32 * 32 / SIZE**2  # fraction covered by the drawn square


def square_mask(background: int = 0) -> np.ndarray:
    """A white 32x32 square on a 64x64 background, uint8 (H, W)."""
    pixels = np.full((SIZE, SIZE), background, np.uint8)
    pixels[16:48, 16:48] = 255
    return pixels


def test_c18_white_square_on_black_and_invert(tmp_path):
    Image.fromarray(square_mask()).save(tmp_path / "mask.png")

    mask = load_mask(tmp_path / "mask.png", image_size=(SIZE, SIZE))
    inverted = load_mask(tmp_path / "mask.png", invert=True)

    assert mask.dtype == bool and mask.shape == (SIZE, SIZE)
    assert mask[20, 20] and not mask[0, 0]
    assert masked_fraction(mask) == pytest.approx(DRAWN)
    assert masked_fraction(inverted) == pytest.approx(1 - DRAWN)


@pytest.mark.parametrize("variant", ["blurred", "jpeg_q30", "near_black", "rgb"])
def test_c19_soft_and_noisy_masks_match_the_drawn_shape(tmp_path, variant):
    pixels = square_mask(background=1 if variant == "near_black" else 0)
    img = Image.fromarray(pixels)
    path = tmp_path / "mask.png"
    if variant == "blurred":
        img = img.filter(ImageFilter.GaussianBlur(3))
    if variant == "rgb":
        img = Image.merge("RGB", [img, img, img])
    if variant == "jpeg_q30":
        path = tmp_path / "mask.jpg"
        img.convert("RGB").save(path, quality=30)
    else:
        img.save(path)

    fraction = masked_fraction(load_mask(path))

    assert abs(fraction - DRAWN) <= 0.02


def test_alpha_stroke_layer_uses_alpha_whatever_the_colour(tmp_path):
    for colour in (255, 0):
        rgba = np.zeros((SIZE, SIZE, 4), np.uint8)
        rgba[..., :3] = np.random.default_rng(0).integers(0, 256, (SIZE, SIZE, 3))
        rgba[16:48, 16:48] = (colour, colour, colour, 255)
        Image.fromarray(rgba, "RGBA").save(tmp_path / f"stroke{colour}.png")

        mask = load_mask(tmp_path / f"stroke{colour}.png")

        assert masked_fraction(mask) == pytest.approx(DRAWN)
        assert mask[20, 20] and not mask[0, 0]


def test_alpha_with_mixed_colours_is_composited_over_black(tmp_path):
    rgba = np.zeros((SIZE, SIZE, 4), np.uint8)
    rgba[..., 3] = 255
    rgba[16:48, 16:48, :3] = 255  # white square on opaque black...
    rgba[:8, :8] = (255, 255, 255, 0)  # ...with a transparent white corner
    Image.fromarray(rgba, "RGBA").save(tmp_path / "mixed.png")
    palette = Image.fromarray(square_mask()).convert("P")
    palette.save(tmp_path / "palette.png", transparency=0)

    mask = load_mask(tmp_path / "mixed.png")

    assert masked_fraction(mask) == pytest.approx(DRAWN)
    assert masked_fraction(load_mask(tmp_path / "palette.png")) == pytest.approx(DRAWN)


def test_c03_mask_exif_orientation_applied(tmp_path):
    stored = np.zeros((20, 40), np.uint8)
    stored[:10, :10] = 255
    img = Image.fromarray(stored).convert("RGB")
    exif = img.getexif()
    exif[0x0112] = 6
    img.save(tmp_path / "mask.jpg", exif=exif, quality=95)

    mask = load_mask(tmp_path / "mask.jpg", image_size=(40, 20))

    assert mask.shape == (40, 20)
    assert mask[:10, -10:].all() and not mask[-10:, :10].any()


def test_c20_mask_of_another_size_needs_resize(tmp_path):
    Image.fromarray(square_mask()).save(tmp_path / "mask.png")

    with pytest.raises(DataError) as error:
        load_mask(tmp_path / "mask.png", image_size=(48, 96))
    resized = load_mask(tmp_path / "mask.png", image_size=(48, 96), resize=True)

    assert "is 64x64 but image is 96x48" in error.value.message
    assert "mask.png" in error.value.message
    assert "--resize-mask" in error.value.hint
    assert resized.shape == (48, 96)
    assert abs(masked_fraction(resized) - DRAWN) <= 0.02


def test_unreadable_and_missing_masks(tmp_path):
    (tmp_path / "mask.png").write_text("no image here")

    with pytest.raises(DataError, match="cannot read mask"):
        load_mask(tmp_path / "mask.png")
    with pytest.raises(DataError, match="does not exist"):
        load_mask(tmp_path / "nothing.png")


def test_token_mask_policies():
    pixels = np.zeros((8, 8), bool)
    pixels[0, 0] = True  # one pixel of token (0, 0)
    pixels[0:2, 4:8] = True  # half of token (0, 1)
    pixels[4:8, 4:8] = True  # all of token (1, 1)

    def marked(policy, threshold=0.5):
        grid = token_mask(pixels, 4, policy, threshold)
        assert grid.shape == (2, 2) and grid.dtype == bool
        return {tuple(index) for index in np.argwhere(grid).tolist()}

    assert marked("any") == {(0, 0), (0, 1), (1, 1)}
    assert marked("all") == {(1, 1)}
    assert marked("threshold") == {(1, 1)}
    assert marked("threshold", 0.25) == {(0, 1), (1, 1)}
    with pytest.raises(ValueError, match="pad it first"):
        token_mask(np.zeros((6, 8), bool), 4)
    with pytest.raises(ValueError, match="policy"):
        token_mask(pixels, 4, "most")


@pytest.mark.parametrize("size", [(283, 530), (37, 53), (7, 7)])
def test_c20_pad_and_unpad_keep_the_exact_size(size):
    width, height = size
    original = Image.fromarray(
        np.random.default_rng(0).integers(0, 256, (height, width, 3), np.uint8)
    )

    padded, pads = pad_to_multiple(original, 16)
    restored = unpad(padded, pads)
    mask, mask_pads = pad_to_multiple(np.ones((height, width), bool), 16)

    assert padded.width % 16 == 0 and padded.height % 16 == 0
    assert pads == (padded.width - width, padded.height - height)
    assert mask_pads == pads and mask.all() and mask.shape == padded.size[::-1]
    assert restored.size == original.size
    assert np.array_equal(np.asarray(restored), np.asarray(original))
    edge = np.asarray(padded)[:height, -1]
    assert np.array_equal(edge, np.asarray(original)[:, -1])  # edge replication


def test_feather_alpha_fades_outside_the_mask():
    mask = np.zeros((40, 40), bool)
    mask[10:30, 10:30] = True

    alpha = feather_alpha(mask, 8)
    profile = alpha[20, 30:40]

    assert alpha.dtype == np.float32 and alpha.min() >= 0 and alpha.max() <= 1
    assert (alpha[mask] == 1).all()
    assert (np.diff(profile) <= 0).all() and profile[-1] == 0
    assert 0 < profile[3] < 1
    assert np.array_equal(feather_alpha(mask, 0), mask.astype(np.float32))


def test_c20_paste_known_preserves_unmasked_pixels():
    rng = np.random.default_rng(1)
    original = Image.fromarray(rng.integers(0, 256, (37, 53, 3), np.uint8))
    mask = np.zeros((37, 53), bool)
    mask[10:20, 10:30] = True

    padded, pads = pad_to_multiple(original, 16)
    generated = unpad(Image.fromarray(255 - np.asarray(padded)), pads)
    alpha = feather_alpha(mask, 4)
    result = np.asarray(paste_known(original, generated, alpha))

    assert result.shape == (37, 53, 3)
    assert np.array_equal(result[alpha == 0], np.asarray(original)[alpha == 0])
    assert np.array_equal(result[mask], np.asarray(generated)[mask])
