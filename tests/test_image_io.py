"""Image I/O: exact 8/16-bit round trips, EXIF orientation, channel rules, clear errors, atomic
and deterministic writes."""

from __future__ import annotations

import os

import cv2
import numpy as np
import pytest
from PIL import Image

from swintormer.core.image_io import (
    IMAGE_EXTENSIONS,
    ImageReadError,
    encode_png,
    list_images,
    read_image,
    write_image,
)


def _random_u16(shape, seed=0):
    return np.random.default_rng(seed).integers(0, 65536, size=shape, dtype=np.uint16)


def test_16bit_png_round_trip_is_exact(tmp_path):
    samples = _random_u16((17, 23, 3))
    path = write_image(tmp_path / "a.png", samples / 65535.0, bit_depth=16)
    loaded = read_image(path)
    assert loaded.bit_depth == 16
    assert loaded.pixels.dtype == np.float32 and loaded.pixels.shape == (17, 23, 3)
    np.testing.assert_array_equal(np.rint(loaded.pixels.astype(np.float64) * 65535).astype(np.uint16), samples)
    # the file really is 16-bit RGB in RGB order (checked with an independent decoder)
    raw = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    assert raw.dtype == np.uint16
    np.testing.assert_array_equal(raw[:, :, ::-1], samples)


def test_16bit_file_from_another_writer_keeps_all_bits(tmp_path):
    samples = _random_u16((9, 11, 3), seed=1)
    cv2.imwrite(str(tmp_path / "b.png"), samples[:, :, ::-1].copy())
    cv2.imwrite(str(tmp_path / "b.tif"), samples[:, :, ::-1].copy())
    for name in ("b.png", "b.tif"):
        loaded = read_image(tmp_path / name)
        assert loaded.bit_depth == 16
        np.testing.assert_array_equal(np.rint(loaded.pixels * 65535.0).astype(np.uint16), samples)
    # Pillow (which we do not use for PNG) would have lost the low byte:
    with Image.open(tmp_path / "b.png") as pil:
        assert np.asarray(pil.convert("RGB")).dtype == np.uint8


def test_8bit_round_trip_is_exact(tmp_path):
    samples = np.random.default_rng(2).integers(0, 256, size=(8, 5, 3), dtype=np.uint8)
    loaded = read_image(write_image(tmp_path / "c.png", samples / 255.0, bit_depth=8))
    assert loaded.bit_depth == 8
    np.testing.assert_array_equal(np.rint(loaded.pixels * 255.0).astype(np.uint8), samples)


def _oriented_source():
    image = np.zeros((4, 6, 3), dtype=np.uint8)
    image[0, 0] = (255, 0, 0)  # a red marker in the top-left corner
    image[3, 5] = (0, 0, 255)
    return image


@pytest.mark.parametrize("suffix", [".png", ".jpg"])
def test_exif_orientation_is_applied(tmp_path, suffix):
    source = _oriented_source()
    pil = Image.fromarray(source)
    exif = pil.getexif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display"
    path = tmp_path / f"o{suffix}"
    pil.save(path, exif=exif, **({"quality": 100, "subsampling": 0} if suffix == ".jpg" else {}))
    loaded = read_image(path)
    expected = np.rot90(source, k=-1)  # clockwise quarter turn
    assert loaded.pixels.shape == expected.shape == (6, 4, 3)
    got = np.rint(loaded.pixels * 255).astype(int)
    if suffix == ".png":
        np.testing.assert_array_equal(got, expected)
    else:  # JPEG is lossy: the markers must be where the rotation puts them
        assert got[0, 3, 0] > 150 and got[0, 3, 2] < 100
        assert got[5, 0, 2] > 150 and got[5, 0, 0] < 100


def test_exif_orientation_of_tiff(tmp_path):
    # OpenCV 5.0 cannot decode an oriented TIFF; the reader falls back to Pillow for 8-bit ones
    source = _oriented_source()
    pil = Image.fromarray(source)
    exif = pil.getexif()
    exif[0x0112] = 8  # "rotate 90° counter-clockwise to display"
    pil.save(tmp_path / "o.tif", exif=exif)
    loaded = read_image(tmp_path / "o.tif")
    assert loaded.bit_depth == 8
    np.testing.assert_array_equal(np.rint(loaded.pixels * 255).astype(np.uint8), np.rot90(source, k=1))


def test_grayscale_is_replicated_to_three_channels(tmp_path):
    gray8 = np.arange(20, dtype=np.uint8).reshape(4, 5) * 12
    gray16 = _random_u16((4, 5), seed=3)
    Image.fromarray(gray8, mode="L").save(tmp_path / "g8.png")
    cv2.imwrite(str(tmp_path / "g16.png"), gray16)
    g8 = read_image(tmp_path / "g8.png")
    g16 = read_image(tmp_path / "g16.png")
    assert g8.bit_depth == 8 and g16.bit_depth == 16
    for loaded, samples, scale in ((g8, gray8, 255.0), (g16, gray16, 65535.0)):
        assert loaded.pixels.shape == samples.shape + (3,)
        for channel in range(3):
            np.testing.assert_array_equal(np.rint(loaded.pixels[:, :, channel] * scale), samples)


def test_rgba_alpha_is_dropped_not_composited(tmp_path):
    rgba = np.random.default_rng(4).integers(0, 256, size=(5, 6, 4), dtype=np.uint8)
    rgba[:, :, 3] = 0  # fully transparent: compositing would change every pixel
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "rgba.png")
    rgba16 = _random_u16((5, 6, 4), seed=5)
    cv2.imwrite(str(tmp_path / "rgba16.png"), rgba16[:, :, [2, 1, 0, 3]].copy())
    np.testing.assert_array_equal(np.rint(read_image(tmp_path / "rgba.png").pixels * 255), rgba[:, :, :3])
    loaded16 = read_image(tmp_path / "rgba16.png")
    assert loaded16.bit_depth == 16
    np.testing.assert_array_equal(np.rint(loaded16.pixels * 65535), rgba16[:, :, :3])


def test_palette_image_is_converted_through_its_palette(tmp_path):
    rgb = np.random.default_rng(6).integers(0, 256, size=(6, 7, 3), dtype=np.uint8)
    palette_image = Image.fromarray(rgb).convert("P")
    palette_image.save(tmp_path / "p.png")
    expected = np.asarray(palette_image.convert("RGB"))
    np.testing.assert_array_equal(np.rint(read_image(tmp_path / "p.png").pixels * 255), expected)


def _assert_error(path, *words):
    with pytest.raises(ImageReadError) as info:
        read_image(path)
    message = str(info.value)
    assert str(path) in message
    for word in words:
        assert word in message
    return message


def test_broken_inputs_raise_clear_errors_naming_the_file(tmp_path):
    good = tmp_path / "good.png"
    write_image(good, np.full((32, 32, 3), 0.5), bit_depth=16)
    data = good.read_bytes()

    _assert_error(tmp_path / "missing.png", "not found")

    (tmp_path / "empty.png").write_bytes(b"")
    _assert_error(tmp_path / "empty.png", "empty")

    (tmp_path / "truncated.png").write_bytes(data[: len(data) // 2])
    _assert_error(tmp_path / "truncated.png", "truncated")

    (tmp_path / "garbage.png").write_bytes(os.urandom(300))
    _assert_error(tmp_path / "garbage.png", "not an image")

    (tmp_path / "corrupt.png").write_bytes(data[:16] + b"\x00" * (len(data) - 16))
    _assert_error(tmp_path / "corrupt.png", "corrupt")

    (tmp_path / "wrong.jpg").write_bytes(data)
    _assert_error(tmp_path / "wrong.jpg", "wrong extension", "PNG")

    (tmp_path / "notes.txt").write_text("hello")
    _assert_error(tmp_path / "notes.txt", "unsupported extension")

    jpeg = tmp_path / "photo.jpg"
    Image.fromarray(np.random.default_rng(7).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(jpeg, quality=90)
    jpeg_bytes = jpeg.read_bytes()
    (tmp_path / "truncated.jpg").write_bytes(jpeg_bytes[: len(jpeg_bytes) // 2])
    _assert_error(tmp_path / "truncated.jpg", "truncated")


def test_write_is_atomic_and_deterministic(tmp_path):
    pixels = np.random.default_rng(8).random((10, 12, 3))
    path = write_image(tmp_path / "out.png", pixels, bit_depth=16)
    first = path.read_bytes()
    assert encode_png(pixels, 16) == first  # same pixels, same bytes
    # a failed write leaves the previous file untouched and no temporary file behind
    bad = pixels.copy()
    bad[0, 0, 0] = np.nan
    with pytest.raises(ValueError):
        write_image(path, bad, bit_depth=16)
    assert path.read_bytes() == first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.png"]
    with pytest.raises(ValueError):
        write_image(tmp_path / "out.jpg", pixels)


def test_list_images_sorted_and_filtered(tmp_path):
    for name in ("b.png", "a.JPG", "c.tif", ".hidden.png", "notes.txt"):
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "sub.png").mkdir()
    assert [p.name for p in list_images(tmp_path)] == ["a.JPG", "b.png", "c.tif"]
    assert {".png", ".jpg", ".jpeg", ".tif", ".tiff"} == set(IMAGE_EXTENSIONS)
