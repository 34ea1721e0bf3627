"""Image folders and loading: cases C01-C07 of CASES.md, tensors, grids, atomic PNGs."""

from __future__ import annotations

import logging
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

from sundae_cli import images
from sundae_cli.errors import DataError, SundaeError
from sundae_cli.images import (
    BACKGROUND,
    ImageFolderDataset,
    fit_to,
    load_rgb,
    make_grid,
    save_png_atomic,
    scan_folder,
    to_image,
    to_tensor,
)

DATA = Path(__file__).parents[1] / "data"


def noise(height: int, width: int, seed: int = 0) -> np.ndarray:
    """Random RGB pixels (H, W, 3) uint8."""
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), np.uint8)


def save_truncated(path: Path, fmt: str) -> None:
    """A noisy image of the given format cut to half its bytes."""
    Image.fromarray(noise(48, 64)).save(path, format=fmt)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def test_c01_mixed_modes_become_rgb_and_are_counted(tmp_path):
    Image.new("RGB", (8, 6), (10, 20, 30)).save(tmp_path / "rgb.png")
    Image.new("L", (8, 6), 100).save(tmp_path / "grey.png")
    Image.new("LA", (8, 6), (200, 255)).save(tmp_path / "grey_alpha.png")
    palette = Image.new("P", (8, 6), 1)
    palette.putpalette([0, 0, 0, 0, 0, 255] + [0] * 762)
    palette.save(tmp_path / "palette.png")

    scan = scan_folder(tmp_path)

    assert scan.modes == Counter({"RGB": 1, "L": 1, "LA": 1, "P": 1})
    assert "4 images" in scan.summary()
    pixels = {path.name: np.asarray(load_rgb(path))[0, 0] for path in scan.files}
    assert {load_rgb(path).mode for path in scan.files} == {"RGB"}
    assert pixels["rgb.png"].tolist() == [10, 20, 30]
    assert pixels["grey.png"].tolist() == [100, 100, 100]
    assert pixels["grey_alpha.png"].tolist() == [200, 200, 200]
    assert pixels["palette.png"].tolist() == [0, 0, 255]


def test_sixteen_bit_and_cmyk_become_rgb(tmp_path):
    deep = np.array([[0, 257 * 100, 65535]], np.uint16)  # 16-bit grey levels
    Image.fromarray(deep).save(tmp_path / "deep.png")
    Image.new("CMYK", (4, 4), (0, 255, 255, 0)).save(tmp_path / "print.jpg")

    grey = np.asarray(load_rgb(tmp_path / "deep.png"))
    red = np.asarray(load_rgb(tmp_path / "print.jpg"))

    with Image.open(tmp_path / "deep.png") as stored:
        assert stored.mode.startswith("I")
    assert grey[0, :, 0].tolist() == [0, 100, 255] and grey.shape == (1, 3, 3)
    assert red[0, 0].tolist() == [255, 0, 0]


def test_c01_bundled_photos_of_three_modes(tmp_path):
    for name in ("horse.png", "camera.png", "chelsea.png"):
        shutil.copy(DATA / name, tmp_path / name)

    scan = scan_folder(tmp_path)
    horse = load_rgb(tmp_path / "horse.png")

    assert scan.modes == Counter({"RGBA": 1, "L": 1, "RGB": 1})
    assert [path.name for path in scan.files] == sorted(
        ["camera.png", "chelsea.png", "horse.png"]
    )
    with Image.open(DATA / "horse.png") as original:
        assert horse.mode == "RGB" and horse.size == original.size
    assert np.asarray(load_rgb(tmp_path / "camera.png")).shape == (64, 64, 3)


def test_c02_hidden_colour_under_alpha_never_shows(tmp_path):
    rgba = np.zeros((10, 10, 4), np.uint8)
    rgba[..., 0] = 255  # red everywhere, hidden at alpha 0
    rgba[:, 5:] = (0, 255, 0, 255)
    Image.fromarray(rgba, "RGBA").save(tmp_path / "hidden.png")
    palette = Image.new("P", (10, 10), 1)
    palette.putpalette([0, 255, 0, 255, 0, 0] + [0] * 762)
    palette.paste(0, (0, 0, 5, 10))
    palette.save(tmp_path / "palette.png", transparency=1)

    loaded = np.asarray(load_rgb(tmp_path / "hidden.png"))
    from_palette = np.asarray(load_rgb(tmp_path / "palette.png"))

    assert BACKGROUND == (0, 0, 0)
    assert (loaded[:, :5] == BACKGROUND).all()
    assert (loaded[:, 5:] == (0, 255, 0)).all()
    assert (from_palette[:, 5:] == BACKGROUND).all()
    assert (from_palette[:, :5] == (0, 255, 0)).all()


def test_c03_exif_rotation_gives_upright_image(tmp_path):
    stored = np.zeros((20, 40, 3), np.uint8)
    stored[:10, :10] = 255  # marker at the stored top-left
    img = Image.fromarray(stored)
    exif = img.getexif()
    exif[0x0112] = 6  # orientation: rotate 90 clockwise to display
    img.save(tmp_path / "phone.jpg", exif=exif, quality=95)

    upright = load_rgb(tmp_path / "phone.jpg")
    pixels = np.asarray(upright).mean(axis=2)

    assert upright.size == (20, 40)
    assert pixels[:10, -10:].mean() > 200  # marker now top-right
    assert pixels[-10:, :10].mean() < 50


def test_c04_truncated_files_skipped_with_one_warning_each(tmp_path, caplog):
    Image.fromarray(noise(48, 64)).save(tmp_path / "good.png")
    save_truncated(tmp_path / "cut.jpg", "JPEG")
    save_truncated(tmp_path / "cut.png", "PNG")

    with caplog.at_level(logging.WARNING, logger="sundae_cli.images"):
        scan = scan_folder(tmp_path)

    assert [path.name for path in scan.files] == ["good.png"]
    assert sorted(path.name for path, _ in scan.skipped) == ["cut.jpg", "cut.png"]
    assert all("truncated" in reason for _, reason in scan.skipped)
    warnings = [record.getMessage() for record in caplog.records]
    assert len(warnings) == 2
    assert any("cut.jpg" in text for text in warnings)
    assert any("cut.png" in text for text in warnings)


def test_c04_strict_raises_and_truncated_never_grey_filled(tmp_path, monkeypatch):
    save_truncated(tmp_path / "cut.jpg", "JPEG")
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)

    with pytest.raises(DataError, match="cut.jpg") as strict:
        scan_folder(tmp_path, strict=True)
    with pytest.raises(DataError, match="cut.jpg"):
        load_rgb(tmp_path / "cut.jpg")

    assert "--strict" in strict.value.hint
    assert ImageFile.LOAD_TRUNCATED_IMAGES is True  # restored after decoding


def test_c05_stray_files_and_content_recognition(tmp_path, caplog):
    (tmp_path / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1" * 10)
    (tmp_path / "notes.txt").write_text("shot on a sunny day")
    (tmp_path / "fake.png").write_text("not really a png")
    (tmp_path / ".thumbs").mkdir()
    Image.new("RGB", (4, 4)).save(tmp_path / ".thumbs" / "t.png")
    Image.fromarray(noise(12, 16)).save(tmp_path / "photo.jpg", format="WEBP")

    with caplog.at_level(logging.WARNING, logger="sundae_cli.images"):
        scan = scan_folder(tmp_path)

    assert [path.name for path in scan.files] == ["photo.jpg"]
    assert sorted(path.name for path, _ in scan.skipped) == ["fake.png", "notes.txt"]
    assert any("fake.png" in record.getMessage() for record in caplog.records)
    assert load_rgb(tmp_path / "photo.jpg").size == (16, 12)


def test_c06_empty_folder_names_path_and_formats(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()

    with pytest.raises(DataError) as error:
        scan_folder(empty)

    assert str(empty) in error.value.message
    assert "PNG, JPEG, WebP, BMP, GIF, TIFF" in error.value.message
    assert error.value.hint


def test_c06_upper_case_extensions_and_bad_paths(tmp_path):
    Image.new("RGB", (5, 5)).save(tmp_path / "IMG_0001.JPG", format="JPEG")
    Image.new("RGB", (5, 5)).save(tmp_path / "b.Jpeg", format="JPEG")

    scan = scan_folder(tmp_path)

    assert [path.name for path in scan.files] == ["IMG_0001.JPG", "b.Jpeg"]
    with pytest.raises(DataError, match="does not exist"):
        scan_folder(tmp_path / "missing")
    with pytest.raises(DataError, match="is a file, not a folder"):
        scan_folder(tmp_path / "b.Jpeg")


def test_scan_order_is_relative_posix_path(tmp_path):
    for relative in ("b/z.png", "a.png", "b/a/y.png", "a/x.png"):
        (tmp_path / relative).parent.mkdir(parents=True, exist_ok=True)
        Image.new("L", (3, 3)).save(tmp_path / relative)

    scan = scan_folder(tmp_path)

    relative = [path.relative_to(tmp_path).as_posix() for path in scan.files]
    assert relative == ["a.png", "a/x.png", "b/a/y.png", "b/z.png"]


@pytest.mark.parametrize("size", [(37, 53), (8, 300), (229, 1024), (1, 1)])
def test_c07_every_size_fits_the_target(size):
    img = Image.new("RGB", size, (10, 200, 30))

    out = fit_to(img, (32, 48))

    assert out.size == (48, 32) and out.mode == "RGB"
    assert (np.asarray(out) == (10, 200, 30)).all()


def test_fit_to_center_crop_keeps_the_middle():
    rows = (np.arange(300) // 2).astype(np.uint8)  # grey level = half the row index
    strip = np.repeat(rows[:, None], 8, axis=1)  # 8 wide, 300 tall

    out = np.asarray(fit_to(Image.fromarray(strip, "L").convert("RGB"), (16, 16)))

    assert out.shape == (16, 16, 3)
    assert abs(out.mean() - 75) < 1.5  # rows 146..154 of 300: the middle


def test_fit_to_random_crop_is_seeded():
    img = Image.fromarray(noise(64, 96))

    def crop(seed):
        return np.asarray(
            fit_to(img, (32, 32), crop="random", rng=np.random.default_rng(seed))
        )

    assert np.array_equal(crop(1), crop(1))
    assert not np.array_equal(crop(1), crop(2))
    with pytest.raises(ValueError, match="rng"):
        fit_to(img, (32, 32), crop="random")


def test_tensor_round_trip_is_exact():
    img = Image.fromarray(noise(7, 9))

    tensor = to_tensor(img)

    assert tuple(tensor.shape) == (3, 7, 9) and str(tensor.dtype) == "torch.float32"
    assert tensor.min() >= -1 and tensor.max() <= 1
    assert np.array_equal(np.asarray(to_image(tensor)), np.asarray(img))
    assert np.asarray(to_image(tensor * 5)).max() == 255  # clamped


def test_save_png_atomic_writes_and_reports_errors(tmp_path):
    img = Image.fromarray(noise(5, 6))

    written = save_png_atomic(img, tmp_path / "out" / "a.png")
    (tmp_path / "taken.png").mkdir()
    with pytest.raises(SundaeError, match="taken.png"):
        save_png_atomic(img, tmp_path / "taken.png")

    with Image.open(written) as reread:
        assert np.array_equal(np.asarray(reread), np.asarray(img))
    assert sorted(path.name for path in tmp_path.rglob("*")) == [
        "a.png",
        "out",
        "taken.png",
    ]


def test_dataset_randomness_depends_on_seed_epoch_index(tmp_path):
    Image.fromarray(noise(40, 60)).save(tmp_path / "a.png")
    files = [tmp_path / "a.png"] * 8
    dataset = ImageFolderDataset(files, (16, 16), crop="random", seed=3)
    mirrored = ImageFolderDataset(files, (16, 16), flip_p=1.0, seed=3)
    plain = ImageFolderDataset(files, (16, 16), flip_p=0.0, seed=3)

    first = [dataset[index] for index in range(8)]
    again = ImageFolderDataset(files, (16, 16), crop="random", seed=3)[5]
    dataset.set_epoch(1)
    later = [dataset[index] for index in range(8)]

    assert len(dataset) == 8 and tuple(first[0].shape) == (3, 16, 16)
    assert bool((again == first[5]).all())
    assert any(not bool((a == b).all()) for a, b in zip(first, later, strict=True))
    assert bool((mirrored[0] == plain[0].flip(-1)).all())


def test_make_grid_from_list_and_tensor():
    tiles = [Image.new("RGB", (4, 3), (255, 0, 0))] * 5

    grid = make_grid(tiles, padding=1)
    from_tensor = make_grid(to_tensor(tiles[0]).unsqueeze(0).repeat(4, 1, 1, 1))

    assert grid.size == (3 * 4 + 4, 2 * 3 + 3)
    assert np.asarray(grid)[1, 1].tolist() == [255, 0, 0]
    assert np.asarray(grid)[0, 0].tolist() == list(images.BACKGROUND)
    assert from_tensor.size == (2 * 4 + 3 * 2, 2 * 3 + 3 * 2)
