"""Photographer-grade files from ``swintormer deblur``: format, bit depth, ICC profile, EXIF, XMP,
alpha and grayscale kept; ``--to-srgb``; ``--format``; HEIC; the reader's orientation and the
colour conversion checked against Pillow and LittleCMS."""

from __future__ import annotations

import io
import struct
from pathlib import Path

import cv2
import numpy as np
import pytest
from icc_profiles import display_p3_profile
from PIL import Image, ImageCms, ImageOps, JpegImagePlugin

from pipelines import deblur
from swintormer.photo import SOFTWARE
from swintormer.core import colour, image_io
from swintormer.core.image_containers import webp_is_lossless
from swintormer.core.image_io import quantize, read_image_file
from swintormer.pipeline import DeblurPipeline

TILE = 128  # the tiny preset pads to multiples of 128
XMP = (b'<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
       b'<rdf:Description xmlns:tiff="http://ns.adobe.com/tiff/1.0/" tiff:Orientation="6" '
       b'xmlns:dc="http://purl.org/dc/elements/1.1/" dc:format="image/jpeg"/></rdf:RDF></x:xmpmeta>')


@pytest.fixture(scope="module")
def pipe(model_dir: Path) -> DeblurPipeline:
    """The pipeline the command builds for ``--tile 128`` (used for the expected pixels only)."""
    return DeblurPipeline.from_pretrained(model_dir, tile=TILE, batch_size=4)


def run(argv: list[str], model_dir: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    code = deblur.main([*argv, "--model", str(model_dir), "--tile", str(TILE), "--no-progress"])
    return code, capsys.readouterr().err


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


def random_u8(shape: tuple[int, ...], seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=shape, dtype=np.uint8)


def smooth_u8(height: int, width: int, seed: int) -> np.ndarray:
    """A smooth colour image (JPEG and lossy WebP keep it close; random noise would not be)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width] / max(height, width)
    channels = [np.sin(2 * np.pi * (rng.random() * x + rng.random() * y) + rng.random() * 6) for _ in range(3)]
    return np.rint((np.stack(channels, axis=2) * 0.4 + 0.5) * 255).astype(np.uint8)


def jpeg_round_trip(samples: np.ndarray, subsampling: int) -> np.ndarray:
    """What Pillow's decoder shows of ``samples`` saved at quality 95 with ``subsampling``."""
    buffer = io.BytesIO()
    Image.fromarray(samples).save(buffer, "JPEG", quality=95, subsampling=subsampling)
    return np.asarray(Image.open(buffer))


def exif_of(path: Path) -> tuple[dict, dict]:
    with Image.open(path) as image:
        exif = image.getexif()
        return dict(exif), dict(exif.get_ifd(0x8769))


# ---------------------------------------------------------------------------------------------
# JPEG with a Display P3 profile, EXIF orientation 6, camera model, date, XMP


def test_jpeg_keeps_profile_exif_and_xmp_and_comes_back_upright(
    model_dir: Path, pipe: DeblurPipeline, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    stored = smooth_u8(48, 64, 1)  # as stored: 64 wide, 48 high; orientation 6 shows it 48×64
    profile = display_p3_profile()
    source = tmp_path / "in" / "photo.jpg"
    source.parent.mkdir()
    exif = Image.Exif()
    exif[0x0112] = 6
    exif[0x010F] = "Canon"
    exif[0x0110] = "Canon EOS R5"
    exif[0x0132] = "2024:05:06 07:08:09"
    exif.get_ifd(0x8769)[0x9003] = "2024:05:06 07:08:09"  # DateTimeOriginal
    Image.fromarray(stored).save(source, "JPEG", quality=92, subsampling=1, icc_profile=profile,
                                 exif=exif.tobytes(), xmp=XMP)

    code, err = run([str(source), "--output", str(tmp_path / "out")], model_dir, capsys)

    assert code == 0, err
    output = tmp_path / "out" / "photo.jpg"
    assert sorted(p.name for p in output.parent.iterdir()) == ["photo.jpg"]
    with Image.open(output) as written:
        assert written.format == "JPEG" and written.mode == "RGB"
        assert written.size == (48, 64)  # upright
        assert written.info["icc_profile"] == profile
        assert JpegImagePlugin.get_sampling(written) == 1  # the input's 4:2:2
        assert written.info["xmp"] == XMP.replace(b'tiff:Orientation="6"', b'tiff:Orientation="1"')
        pixels = np.asarray(written)
    ifd0_in, exif_in = exif_of(source)
    ifd0_out, exif_out = exif_of(output)
    assert ifd0_out.pop(0x0112) == 1 and ifd0_in.pop(0x0112) == 6
    assert ifd0_out.pop(0x0131) == SOFTWARE
    ifd0_in.pop(0x8769), ifd0_out.pop(0x8769)  # the Exif IFD's offset moves; its content is compared below
    assert ifd0_out == ifd0_in and ifd0_out[0x0110] == "Canon EOS R5"
    assert exif_out == exif_in == {0x9003: "2024:05:06 07:08:09"}
    # The pixels: Pillow's decode of the input turned a quarter clockwise (what orientation 6
    # asks), deblurred, quantised and encoded at quality 95 with the same subsampling.
    upright = np.rot90(np.asarray(Image.open(source)), k=-1)
    expected = quantize(pipe(upright.astype(np.float32) / 255.0), 8)
    np.testing.assert_array_equal(pixels, jpeg_round_trip(expected, subsampling=1))


def test_to_srgb_converts_the_colour_and_embeds_srgb(
    model_dir: Path, pipe: DeblurPipeline, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    profile = display_p3_profile()
    samples = smooth_u8(40, 56, 2)
    source = tmp_path / "in" / "p3.png"
    source.parent.mkdir()
    Image.fromarray(samples).save(source, icc_profile=profile)

    code, err = run([str(source), "--output", str(tmp_path / "kept")], model_dir, capsys)
    assert code == 0, err
    code, err = run([str(source), "--output", str(tmp_path / "srgb"), "--to-srgb"], model_dir, capsys)
    assert code == 0, err

    with Image.open(tmp_path / "kept" / "p3.png") as kept:
        assert kept.info["icc_profile"] == profile
        np.testing.assert_array_equal(np.asarray(kept), quantize(pipe(samples / np.float32(255)), 8))
    with Image.open(tmp_path / "srgb" / "p3.png") as converted:
        srgb = converted.info["icc_profile"]
        result = np.asarray(converted)
    assert srgb == colour.srgb_profile_bytes() != profile
    assert "sRGB" in ImageCms.getProfileDescription(ImageCms.ImageCmsProfile(io.BytesIO(srgb)))
    # Converted by LittleCMS before deblurring: what ImageCms makes of the input, deblurred.
    transform = ImageCms.buildTransform(ImageCms.ImageCmsProfile(io.BytesIO(profile)),
                                        ImageCms.createProfile("sRGB"), "RGB", "RGB",
                                        renderingIntent=ImageCms.Intent.RELATIVE_COLORIMETRIC)
    in_srgb = np.asarray(ImageCms.applyTransform(Image.fromarray(samples), transform))
    assert np.abs(in_srgb.astype(int) - samples).max() > 10  # P3 → sRGB really moves colours
    np.testing.assert_array_equal(result, quantize(pipe(in_srgb / np.float32(255)), 8))


def test_16bit_matrix_profile_conversion_agrees_with_littlecms() -> None:
    """The float path used for 16-bit images computes LittleCMS's transform (within its 8-bit
    rounding) and keeps more than 8 bits."""
    profile = display_p3_profile()
    rng = np.random.default_rng(3)
    pixels = (rng.integers(0, 256, (32, 32, 3)) / 255.0).astype(np.float32)
    lcms, note = colour.rgb_to_srgb(pixels, profile, bit_depth=8)
    exact, note16 = colour.rgb_to_srgb(pixels, profile, bit_depth=16)
    assert note is None and note16 is None
    assert np.abs(lcms - exact).max() * 255 <= 0.75
    levels = np.unique(np.rint(exact * 65535) % 257)
    assert levels.size > 100  # not 8-bit values scaled up


# ---------------------------------------------------------------------------------------------
# Alpha, grayscale, bit depth


@pytest.mark.parametrize("depth", [8, 16])
def test_rgba_png_keeps_its_alpha_exactly(
    depth: int, model_dir: Path, pipe: DeblurPipeline, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rng = np.random.default_rng(4 + depth)
    high = 256 if depth == 8 else 65536
    rgba = rng.integers(0, high, size=(36, 50, 4), dtype=np.uint8 if depth == 8 else np.uint16)
    rgba[:5, :, 3] = 0  # fully transparent rows keep their colour too
    source = tmp_path / "in" / "cut.png"
    source.parent.mkdir()
    cv2.imwrite(str(source), rgba[:, :, [2, 1, 0, 3]])

    code, err = run([str(source), "--output", str(tmp_path / "out")], model_dir, capsys)

    assert code == 0, err
    written = cv2.imread(str(tmp_path / "out" / "cut.png"), cv2.IMREAD_UNCHANGED)
    assert written.shape == (36, 50, 4) and written.dtype == rgba.dtype
    np.testing.assert_array_equal(written[:, :, 3], rgba[:, :, 3])
    expected = quantize(pipe(rgba[:, :, :3] / np.float32(high - 1)), depth)
    np.testing.assert_array_equal(written[:, :, 2::-1], expected)


def test_16bit_grayscale_png_comes_back_16bit_grayscale(
    model_dir: Path, pipe: DeblurPipeline, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    gray = np.random.default_rng(6).integers(0, 65536, size=(40, 30), dtype=np.uint16)
    source = tmp_path / "in" / "scan.png"
    source.parent.mkdir()
    cv2.imwrite(str(source), gray)

    code, err = run([str(source), "--output", str(tmp_path / "out")], model_dir, capsys)

    assert code == 0, err
    written = cv2.imread(str(tmp_path / "out" / "scan.png"), cv2.IMREAD_UNCHANGED)
    assert written.dtype == np.uint16 and written.shape == (40, 30)
    with Image.open(tmp_path / "out" / "scan.png") as image:
        assert image.mode == "I;16"  # one channel in the file, not three equal ones
    # Through the model as R=G=B, the three outputs averaged back into one channel.
    restored = pipe(np.repeat((gray / np.float32(65535))[:, :, None], 3, axis=2))
    np.testing.assert_array_equal(written, quantize(restored.astype(np.float64).mean(axis=2), 16))


def test_webp_in_and_out_lossy_and_lossless(
    model_dir: Path, pipe: DeblurPipeline, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    exif = Image.Exif()
    exif[0x0110] = "Pixel 8"
    profile = display_p3_profile()
    Image.fromarray(smooth_u8(40, 48, 7)).save(folder / "lossy.webp", quality=80, exif=exif.tobytes(),
                                              icc_profile=profile)
    lossless = random_u8((30, 34, 3), 8)
    Image.fromarray(lossless).save(folder / "exact.webp", lossless=True)

    code, err = run([str(folder), "--output", str(tmp_path / "out")], model_dir, capsys)

    assert code == 0, err
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["exact.webp", "lossy.webp"]
    with Image.open(tmp_path / "out" / "lossy.webp") as written:
        assert written.format == "WEBP" and written.size == (48, 40)
        assert written.info["icc_profile"] == profile
        assert written.getexif()[0x0110] == "Pixel 8" and written.getexif()[0x0131] == SOFTWARE
    assert not webp_is_lossless((tmp_path / "out" / "lossy.webp").read_bytes())
    exact = (tmp_path / "out" / "exact.webp").read_bytes()
    assert webp_is_lossless(exact)  # lossless in, lossless out: the pixels are the result exactly
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(exact)).convert("RGB")),
                                  quantize(pipe(lossless / np.float32(255)), 8))


def test_16bit_tiff_with_orientation_and_profile(
    model_dir: Path, pipe: DeblurPipeline, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    tifffile = pytest.importorskip("tifffile")
    stored = np.random.default_rng(9).integers(0, 65536, size=(30, 44, 3), dtype=np.uint16)
    profile = display_p3_profile()
    source = tmp_path / "in" / "scan.tif"
    source.parent.mkdir()
    tifffile.imwrite(source, stored, photometric="rgb", metadata=None,
                     extratags=[(274, "H", 1, 8, True), (34675, "B", len(profile), profile, True),
                                (272, "s", 0, "Scanner X", True)])

    code, err = run([str(source), "--output", str(tmp_path / "out")], model_dir, capsys)

    assert code == 0, err
    output = tmp_path / "out" / "scan.tif"
    written = tifffile.imread(output)
    upright = np.rot90(stored, k=1)  # orientation 8: a quarter turn counter-clockwise
    assert written.dtype == np.uint16 and written.shape == upright.shape
    np.testing.assert_array_equal(written, quantize(pipe(upright / np.float32(65535)), 16))
    with Image.open(output) as image:
        assert image.info["icc_profile"] == profile
        exif = image.getexif()
        assert exif[0x0110] == "Scanner X" and exif[0x0112] == 1 and exif[0x0131] == SOFTWARE


def test_format_and_quality_override(
    model_dir: Path, pipe: DeblurPipeline, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    samples = smooth_u8(40, 40, 10)
    source = tmp_path / "in" / "art.png"
    source.parent.mkdir()
    Image.fromarray(samples).save(source)

    code, err = run([str(source), "--output", str(tmp_path / "out"), "--format", "jpeg", "--quality", "70"],
                    model_dir, capsys)

    assert code == 0, err
    with Image.open(tmp_path / "out" / "art.jpg") as written:
        assert written.format == "JPEG"
        assert JpegImagePlugin.get_sampling(written) == 0  # 4:4:4 for a non-JPEG source
        pixels = np.asarray(written)
    buffer = io.BytesIO()
    Image.fromarray(quantize(pipe(samples / np.float32(255)), 8)).save(buffer, "JPEG", quality=70, subsampling=0)
    np.testing.assert_array_equal(pixels, np.asarray(Image.open(buffer)))


def test_alpha_to_jpeg_is_refused_for_that_image(
    model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    Image.fromarray(random_u8((20, 20, 4), 11), "RGBA").save(folder / "cut.png")
    Image.fromarray(random_u8((20, 20, 3), 12)).save(folder / "plain.png")
    code, err = run([str(folder), "--output", str(tmp_path / "out"), "--format", "jpeg"], model_dir, capsys)
    assert code == 1
    [line] = error_lines(err)
    assert str(folder / "cut.png") in line and "JPEG cannot hold the alpha channel" in line
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["plain.jpg"]


# ---------------------------------------------------------------------------------------------
# HEIC, unsupported formats and name clashes


def test_heic_is_read_and_written_as_jpeg(
    model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pillow_heif = pytest.importorskip("pillow_heif")
    pillow_heif.register_heif_opener()
    source = tmp_path / "in" / "IMG_0001.HEIC"
    source.parent.mkdir()
    exif = Image.Exif()
    exif[0x0110] = "iPhone 15"
    profile = display_p3_profile()
    Image.fromarray(smooth_u8(32, 40, 13)).save(source, "HEIF", quality=90, exif=exif.tobytes(), icc_profile=profile)

    code, err = run([str(source), "--output", str(tmp_path / "out")], model_dir, capsys)

    assert code == 0, err
    with Image.open(tmp_path / "out" / "IMG_0001.jpg") as written:
        assert written.format == "JPEG" and written.size == (40, 32)
        assert written.getexif()[0x0110] == "iPhone 15"
        assert written.info.get("icc_profile") == profile


def test_heic_without_pillow_heif_is_one_clear_line(
    model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(image_io, "heif_available", lambda: False)
    source = tmp_path / "in" / "x.heic"
    source.parent.mkdir()
    source.write_bytes(struct.pack(">I", 24) + b"ftypheic" + b"\x00" * 4 + b"mif1heic")
    code, err = run([str(source), "--output", str(tmp_path / "out")], model_dir, capsys)
    assert code == 1
    [line] = error_lines(err)
    assert line == f"error: {source}: HEIC/HEIF is not supported: install pillow-heif (pip install pillow-heif, " \
                   "or the 'heif' extra of swintormer)"


def test_unsupported_format_is_reported_as_such_not_as_a_clash(
    model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    Image.fromarray(random_u8((20, 24, 3), 14)).save(tmp_path / "a.webp", lossless=True)
    Image.fromarray(random_u8((20, 24, 3), 15)).save(tmp_path / "a.gif")
    code, err = run([str(tmp_path / "a.webp"), str(tmp_path / "a.gif"), "--output", str(tmp_path / "out")],
                    model_dir, capsys)
    assert code == 1
    [line] = error_lines(err)
    assert str(tmp_path / "a.gif") in line and "unsupported format '.gif'" in line
    assert "already the output" not in err
    assert (tmp_path / "out" / "a.webp").is_file()


def test_two_inputs_with_one_output_name_are_refused_with_the_reason(
    model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    Image.fromarray(random_u8((20, 24, 3), 16)).save(tmp_path / "a.jpg")
    Image.fromarray(random_u8((20, 24, 3), 17)).save(tmp_path / "a.webp")
    # Each keeps its own format by default: a.jpg and a.webp do not clash ...
    code, err = run([str(tmp_path / "a.jpg"), str(tmp_path / "a.webp"), "--output", str(tmp_path / "own")],
                    model_dir, capsys)
    assert code == 0, err
    assert sorted(p.name for p in (tmp_path / "own").iterdir()) == ["a.jpg", "a.webp"]
    # ... but both become a.png with --format png: the second is refused, the first written.
    code, err = run([str(tmp_path / "a.jpg"), str(tmp_path / "a.webp"), "--output", str(tmp_path / "png"),
                     "--format", "png"], model_dir, capsys)
    assert code == 1
    [line] = error_lines(err)
    assert line == (f"error: {tmp_path / 'a.webp'}: its output {tmp_path / 'png' / 'a.png'} is already the output "
                    f"of {tmp_path / 'a.jpg'} (same stem and output format)")
    assert sorted(p.name for p in (tmp_path / "png").iterdir()) == ["a.png"]


# ---------------------------------------------------------------------------------------------
# The reader on its own


# What each EXIF orientation asks for, as PIL.ImageOps.exif_transpose maps it.
ORIENTATION_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


@pytest.mark.parametrize("suffix", [".png", ".tif", ".jpg", ".webp"])
def test_orientation_matches_pillows_exif_transpose(tmp_path: Path, suffix: str) -> None:
    stored = random_u8((5, 7, 3), 18)
    for orientation in range(1, 9):
        image = Image.fromarray(stored)
        exif = image.getexif()
        exif[0x0112] = orientation
        path = tmp_path / f"o{orientation}{suffix}"
        image.save(path, exif=exif, **({"lossless": True} if suffix == ".webp" else {}))
        loaded = read_image_file(path)
        assert loaded.orientation == orientation
        if suffix == ".jpg":  # lossy: the same decoder's samples, turned by Pillow
            expected = np.asarray(ImageOps.exif_transpose(Image.open(path)))
        else:  # lossless: the stored samples turned by Pillow
            expected = stored if orientation == 1 else \
                np.asarray(Image.fromarray(stored).transpose(ORIENTATION_TRANSPOSE[orientation]))
        np.testing.assert_array_equal(np.rint(loaded.pixels * 255).astype(np.uint8), expected)


def test_tiff_alpha_is_read_exactly(tmp_path: Path) -> None:
    """8-bit RGBA TIFF is read with Pillow (OpenCV's libtiff RGBA path premultiplies the colour
    by unassociated alpha); 16-bit gray+alpha TIFF, which Pillow cannot open, with tifffile."""
    tifffile = pytest.importorskip("tifffile")
    rgba = random_u8((6, 9, 4), 20)
    rgba[0, :, 3] = 0
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.tif")
    loaded = read_image_file(tmp_path / "rgba.tif")
    assert loaded.mode == "RGBA"
    np.testing.assert_array_equal(loaded.alpha, rgba[:, :, 3])
    np.testing.assert_array_equal(np.rint(loaded.pixels * 255).astype(np.uint8), rgba[:, :, :3])
    gray_alpha = np.random.default_rng(21).integers(0, 65536, size=(6, 9, 2), dtype=np.uint16)
    tifffile.imwrite(tmp_path / "la16.tif", gray_alpha, photometric="minisblack", extrasamples=["unassalpha"])
    loaded = read_image_file(tmp_path / "la16.tif")
    assert (loaded.mode, loaded.bit_depth) == ("LA", 16)
    np.testing.assert_array_equal(loaded.alpha, gray_alpha[:, :, 1])
    np.testing.assert_array_equal(np.rint(loaded.pixels[:, :, 0] * 65535).astype(np.uint16), gray_alpha[:, :, 0])
    encoded = image_io.encode_image_file(loaded, loaded.pixels)  # and written back the same
    np.testing.assert_array_equal(tifffile.imread(io.BytesIO(encoded.data)), gray_alpha)


def test_png_metadata_round_trips_through_the_writer(tmp_path: Path) -> None:
    from PIL import PngImagePlugin

    profile = display_p3_profile()
    text = PngImagePlugin.PngInfo()
    text.add_text("Description", "harbour at dusk")
    exif = Image.Exif()
    exif[0x0112] = 3
    exif[0x0110] = "X100"
    Image.fromarray(random_u8((6, 8, 3), 19)).save(tmp_path / "m.png", icc_profile=profile, exif=exif.tobytes(),
                                                   pnginfo=text, dpi=(300, 300))
    loaded = read_image_file(tmp_path / "m.png")
    encoded = image_io.encode_image_file(loaded, loaded.pixels, software="test")
    with Image.open(io.BytesIO(encoded.data)) as written:
        written.load()
        assert written.info["icc_profile"] == profile
        assert written.info["Description"] == "harbour at dusk"
        assert tuple(round(v) for v in written.info["dpi"]) == (300, 300)
        assert dict(written.getexif()) == {0x0112: 1, 0x0110: "X100", 0x0131: "test"}
        np.testing.assert_array_equal(np.asarray(written), np.rint(loaded.pixels * 255).astype(np.uint8))
