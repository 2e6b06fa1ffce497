"""Converting an image's encoded values from its embedded ICC profile to sRGB.

Relative colorimetric intent; out-of-gamut colours are clipped to [0, 1].

* **8-bit images** go through Pillow's ImageCms (LittleCMS), a few rows at a time.
* **16-bit images**: ImageCms only transforms 8-bit RGB images, so a *matrix/TRC* profile (ICC.1:2010
  section F.3: ``rXYZ``/``gXYZ``/``bXYZ`` colorants and ``rTRC``/``gTRC``/``bTRC`` curves, the
  form of Display P3, Adobe RGB, ProPhoto and Rec. 2020 profiles) is applied here in float64:
  linearise with the source curves, source colorants to PCS XYZ (D50), the inverse of the sRGB
  colorants, sRGB's curve inverted. A profile that is not matrix/TRC (lookup tables ``A2B0``/``A2B1``)
  falls back to ImageCms on the samples rounded to 8 bits; the caller is told so.

The sRGB profile written into converted files is LittleCMS's built-in sRGB
(``ImageCms.createProfile("sRGB")``); the float path uses that profile's own colorants and curve,
so both paths compute the same transform.
"""

from __future__ import annotations

import io
import struct
from functools import lru_cache

import numpy as np

_CHUNK_ROWS = 256


class ColourError(ValueError):
    """A profile could not be read or applied."""


@lru_cache(maxsize=1)
def srgb_profile_bytes() -> bytes:
    """The bytes of LittleCMS's built-in sRGB profile, as Pillow serialises it."""
    from PIL import ImageCms

    return ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()


def profile_colour_space(icc: bytes) -> str:
    """The data colour space of a profile's header (``"RGB"``, ``"GRAY"``, ``"CMYK"``...)."""
    if len(icc) < 128:
        raise ColourError("ICC profile shorter than its 128-byte header")
    return icc[16:20].decode("latin-1").strip()


def _tags(icc: bytes) -> dict[str, bytes]:
    if len(icc) < 132:
        raise ColourError("ICC profile without a tag table")
    (count,) = struct.unpack(">I", icc[128:132])
    tags = {}
    for index in range(min(count, 1000)):
        entry = 132 + 12 * index
        if entry + 12 > len(icc):
            break
        signature, offset, size = struct.unpack(">4sII", icc[entry : entry + 12])
        tags[signature.decode("latin-1")] = icc[offset : offset + size]
    return tags


def _s15(raw: bytes) -> float:
    return struct.unpack(">i", raw)[0] / 65536.0


def _xyz(tag: bytes) -> np.ndarray:
    if tag[:4] != b"XYZ " or len(tag) < 20:
        raise ColourError("colorant tag is not an XYZType")
    return np.array([_s15(tag[8 + 4 * i : 12 + 4 * i]) for i in range(3)])


def _curve(tag: bytes):
    """The tone curve of a ``curv`` or ``para`` tag as a function on float64 arrays in [0, 1]."""
    kind = tag[:4]
    if kind == b"curv":
        (count,) = struct.unpack(">I", tag[8:12])
        if count == 0:
            return lambda x: x
        if count == 1:
            gamma = struct.unpack(">H", tag[12:14])[0] / 256.0
            return lambda x: np.power(x, gamma)
        table = np.frombuffer(tag[12 : 12 + 2 * count], dtype=">u2").astype(np.float64) / 65535.0
        grid = np.linspace(0.0, 1.0, count)
        return lambda x: np.interp(x, grid, table)
    if kind == b"para":
        (function,) = struct.unpack(">H", tag[8:10])
        needed = {0: 1, 1: 3, 2: 4, 3: 5, 4: 7}.get(function)
        if needed is None:
            raise ColourError(f"unknown parametric curve type {function}")
        g, a, b, c, d, e, f = [_s15(tag[12 + 4 * i : 16 + 4 * i]) for i in range(needed)] + [0.0] * (7 - needed)
        if function == 0:
            return lambda x: np.power(x, g)
        if function == 1:
            return lambda x: np.where(x >= -b / a, np.power(np.maximum(a * x + b, 0), g), 0.0)
        if function == 2:
            return lambda x: np.where(x >= -b / a, np.power(np.maximum(a * x + b, 0), g) + c, c)
        if function == 3:
            return lambda x: np.where(x >= d, np.power(np.maximum(a * x + b, 0), g), c * x)
        return lambda x: np.where(x >= d, np.power(np.maximum(a * x + b, 0), g) + e, c * x + f)
    raise ColourError(f"unsupported curve type {kind!r}")


def matrix_shaper(icc: bytes):
    """``(matrix, curves)`` of an RGB matrix/TRC profile, or None when the profile is another kind
    (or uses lookup tables, which colour management prefers over the matrix)."""
    if profile_colour_space(icc) != "RGB":
        return None
    tags = _tags(icc)
    if any(name in tags for name in ("A2B0", "A2B1", "A2B2")):
        return None
    try:
        matrix = np.stack([_xyz(tags[name]) for name in ("rXYZ", "gXYZ", "bXYZ")], axis=1)
        curves = [_curve(tags[name]) for name in ("rTRC", "gTRC", "bTRC")]
    except (KeyError, ColourError, struct.error, IndexError):
        return None
    return matrix, curves


@lru_cache(maxsize=1)
def _srgb_inverse():
    matrix, curves = matrix_shaper(srgb_profile_bytes())
    grid = np.linspace(0.0, 1.0, 65536 * 4 + 1)
    encoded_of_linear = (curves[0](grid), grid)  # the curve is monotonic: invert by interpolation
    return np.linalg.inv(matrix), encoded_of_linear


def _float_to_srgb(rows: np.ndarray, matrix: np.ndarray, curves) -> np.ndarray:
    inverse, (linear_grid, encoded_grid) = _srgb_inverse()
    linear = np.stack([curves[i](np.clip(rows[..., i].astype(np.float64), 0, 1)) for i in range(3)], axis=-1)
    srgb_linear = np.clip(linear @ (inverse @ matrix).T, 0.0, 1.0)
    return np.interp(srgb_linear, linear_grid, encoded_grid).astype(np.float32)


def _lcms_transform(icc: bytes):
    from PIL import ImageCms

    try:
        source = ImageCms.ImageCmsProfile(io.BytesIO(icc))
        target = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB"))
        return ImageCms.buildTransform(source, target, "RGB", "RGB",
                                       renderingIntent=ImageCms.Intent.RELATIVE_COLORIMETRIC)
    except (ImageCms.PyCMSError, OSError, ValueError) as error:
        raise ColourError(f"cannot use the embedded ICC profile ({error})") from None


def _lcms_to_srgb(pixels: np.ndarray, icc: bytes) -> np.ndarray:
    from PIL import Image, ImageCms

    transform = _lcms_transform(icc)
    output = np.empty_like(pixels, dtype=np.float32)
    for top in range(0, pixels.shape[0], _CHUNK_ROWS):
        block = np.rint(np.clip(pixels[top : top + _CHUNK_ROWS], 0, 1) * 255.0).astype(np.uint8)
        converted = ImageCms.applyTransform(Image.fromarray(block, "RGB"), transform)
        output[top : top + _CHUNK_ROWS] = np.asarray(converted, dtype=np.float32) / np.float32(255.0)
    return output


def rgb_to_srgb(pixels: np.ndarray, icc: bytes, bit_depth: int) -> tuple[np.ndarray, str | None]:
    """Float H×W×3 encoded values under ``icc`` → float32 sRGB values, and a note when precision
    was lost (a 16-bit image whose profile is not matrix/TRC)."""
    if profile_colour_space(icc) != "RGB":
        raise ColourError(f"the embedded profile describes {profile_colour_space(icc)} data, not RGB")
    if bit_depth <= 8:
        return _lcms_to_srgb(pixels, icc), None
    shaper = matrix_shaper(icc)
    if shaper is None:
        return (_lcms_to_srgb(pixels, icc),
                "its profile is not matrix/TRC: converted to sRGB through LittleCMS at 8-bit precision")
    output = np.empty(pixels.shape, dtype=np.float32)
    for top in range(0, pixels.shape[0], _CHUNK_ROWS):
        output[top : top + _CHUNK_ROWS] = _float_to_srgb(pixels[top : top + _CHUNK_ROWS], *shaper)
    return output, None


def cmyk_to_srgb(image, icc: bytes | None):
    """A Pillow CMYK image as an RGB image: through its profile to sRGB when it has one
    (returns the sRGB profile bytes), else Pillow's plain conversion (returns None)."""
    from PIL import ImageCms

    if icc:
        try:
            source = ImageCms.ImageCmsProfile(io.BytesIO(icc))
            target = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB"))
            converted = ImageCms.profileToProfile(image, source, target, outputMode="RGB",
                                                  renderingIntent=ImageCms.Intent.RELATIVE_COLORIMETRIC)
            return converted, srgb_profile_bytes()
        except (ImageCms.PyCMSError, OSError, ValueError):
            pass
    return image.convert("RGB"), None
