"""Reading and writing images without losing precision.

Every image enters the project through :func:`read_image` and leaves through
:func:`write_image`, so that the rules below hold everywhere (training, inference, evaluation,
the synthetic generator and the baselines).

Reading rules
-------------
* **Formats**: PNG (8 and 16 bit), TIFF (8 and 16 bit), JPEG. The container is recognised from
  the file's first bytes; a file whose content does not match its extension (a JPEG named
  ``.png``) is refused, as is any extension outside :data:`IMAGE_EXTENSIONS`.
* **Precision**: PNG and TIFF are decoded with OpenCV, which keeps 16-bit samples (Pillow
  truncates 48-bit RGB PNG to 8 bits). Pixels are returned as float32 in [0, 1]: 8-bit samples
  divided by 255, 16-bit samples divided by 65535 (the DPDD evaluation convention). The integer
  samples are exactly recoverable: ``round(pixels * 65535)`` gives back the 16-bit file.
* **EXIF orientation** is applied: OpenCV applies it for PNG and TIFF when decoding with
  ``IMREAD_COLOR | IMREAD_ANYDEPTH`` (checked by the tests); JPEG goes through Pillow and
  ``ImageOps.exif_transpose``. OpenCV 5.0 cannot decode TIFF files carrying a non-default
  orientation tag; those are decoded with Pillow when they hold 8-bit or 16-bit grayscale
  samples, and refused with a clear error when they hold 16-bit colour (Pillow would truncate).
* **Channels**: the result is always RGB, H×W×3.
  - grayscale: the single channel is replicated to three;
  - RGBA / grayscale+alpha: **the alpha channel is dropped** (no compositing: for deblurring
    pairs the colour under a transparent pixel is still the pixel's data, and compositing on an
    arbitrary background would change it);
  - palette images: converted to RGB through their palette;
  - CMYK JPEG: converted to RGB by Pillow.
* **Errors**: a missing, empty, truncated, corrupt or non-image file raises
  :class:`ImageReadError` (a ``ValueError``) whose message starts with the file's path.

Writing
-------
:func:`write_image` writes PNG only, 8 or 16 bit, atomically (temporary file in the same folder,
then ``os.replace``). PNG encoding uses a fixed compression level and no metadata chunks, so the
same pixels always give the same bytes.
"""

from __future__ import annotations

import io
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from PIL import Image, ImageOps

from swintormer.core.files import atomic_write_bytes

IMAGE_EXTENSIONS: frozenset[str] = frozenset({".png", ".jpg", ".jpeg", ".tif", ".tiff"})

# Extensions grouped by the container their bytes must hold.
_CONTAINER_OF_EXTENSION = {
    ".png": "PNG",
    ".jpg": "JPEG",
    ".jpeg": "JPEG",
    ".tif": "TIFF",
    ".tiff": "TIFF",
}

# Fixed so that the same pixels always encode to the same bytes (the synthetic generator
# promises byte-identical output for a seed).
PNG_COMPRESSION_LEVEL = 3

# Pillow refuses images above ~179 Mpx by default as a decompression-bomb guard; restoration
# datasets hold large photographs, but nothing near a gigapixel.
Image.MAX_IMAGE_PIXELS = 1_000_000_000


class ImageReadError(ValueError):
    """An image file could not be read; the message names the file."""


@dataclass(frozen=True)
class LoadedImage:
    """A decoded image: float32 H×W×3 RGB ``pixels`` in [0, 1], the file's ``bit_depth`` (8 or
    16) and the ``path`` it came from."""

    pixels: np.ndarray
    bit_depth: int
    path: Path

    @property
    def height(self) -> int:
        return int(self.pixels.shape[0])

    @property
    def width(self) -> int:
        return int(self.pixels.shape[1])


def _sniff_container(head: bytes) -> str | None:
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if head.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if head[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
        return "TIFF"
    return None


def _to_float_rgb(array: np.ndarray, path: Path) -> tuple[np.ndarray, int]:
    """Integer H×W×3 RGB samples to float32 in [0, 1] plus the bit depth."""
    if array.dtype == np.uint8:
        return array.astype(np.float32) / np.float32(255.0), 8
    if array.dtype == np.uint16:
        return array.astype(np.float32) / np.float32(65535.0), 16
    raise ImageReadError(
        f"{path}: unsupported sample type {array.dtype} (only 8-bit and 16-bit images are supported)"
    )


def _decode_with_pillow(data: bytes, path: Path, container: str) -> np.ndarray:
    """JPEG (and the TIFF fallback) through Pillow: full decode, EXIF transpose, RGB."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Pillow's warnings about odd EXIF: we raise or succeed
            image = Image.open(io.BytesIO(data))
            image.load()  # raises on truncated data instead of returning grey rows
            image = ImageOps.exif_transpose(image)
            if image.mode in ("I;16", "I;16B", "I;16L", "I"):
                gray = np.asarray(image)
                if gray.dtype != np.uint16:
                    if gray.min() < 0 or gray.max() > 65535:
                        raise ImageReadError(f"{path}: 32-bit integer samples are not supported")
                    gray = gray.astype(np.uint16)
                return np.repeat(gray[:, :, None], 3, axis=2)
            if image.mode not in ("RGB", "L", "P", "RGBA", "LA", "CMYK", "YCbCr", "1", "PA", "La"):
                raise ImageReadError(f"{path}: unsupported image mode {image.mode}")
            # convert("RGB") discards alpha without compositing (the module rule) and expands
            # palettes.
            return np.asarray(image.convert("RGB")).copy()
    except ImageReadError:
        raise
    except Exception as exc:  # Pillow raises OSError, SyntaxError, ValueError... for bad data
        detail = "" if "BytesIO" in str(exc) else f" ({exc})"
        raise ImageReadError(f"{path}: corrupt or truncated {container} file{detail}") from None


def _tiff_has_16bit_colour(data: bytes) -> bool:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(io.BytesIO(data)) as image:
                bits = image.tag_v2.get(258)  # BitsPerSample
                samples = image.tag_v2.get(277, 1)  # SamplesPerPixel
    except Exception:
        return False
    if isinstance(bits, tuple):
        bits = max(bits)
    return bool(bits and bits > 8 and samples and samples >= 3)


def _quiet_imdecode(buffer: np.ndarray) -> np.ndarray | None:
    """``cv2.imdecode`` without OpenCV's own log lines: a failure becomes our one-line error."""
    cv_log = getattr(getattr(cv2, "utils", None), "logging", None)
    previous = cv_log.getLogLevel() if cv_log else None
    if cv_log:
        cv_log.setLogLevel(cv_log.LOG_LEVEL_SILENT)
    try:
        # IMREAD_COLOR applies EXIF orientation, replicates grayscale, drops alpha and expands
        # palettes; IMREAD_ANYDEPTH keeps 16-bit samples.
        return cv2.imdecode(buffer, cv2.IMREAD_COLOR | cv2.IMREAD_ANYDEPTH)
    finally:
        if cv_log:
            cv_log.setLogLevel(previous)


def read_image(path: str | os.PathLike[str]) -> LoadedImage:
    """Read an image file as float32 H×W×3 RGB in [0, 1] (see the module docstring for the rules).

    Raises :class:`ImageReadError` naming the file for a missing, empty, truncated, corrupt,
    non-image or wrongly-named file.
    """
    path = Path(path)
    extension = path.suffix.lower()
    if extension not in IMAGE_EXTENSIONS:
        raise ImageReadError(
            f"{path}: unsupported extension {path.suffix!r} (expected one of {', '.join(sorted(IMAGE_EXTENSIONS))})"
        )
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ImageReadError(f"{path}: file not found") from None
    except OSError as exc:
        raise ImageReadError(f"{path}: cannot read file ({exc.strerror or exc})") from None
    if not data:
        raise ImageReadError(f"{path}: file is empty")
    container = _sniff_container(data[:8])
    if container is None:
        raise ImageReadError(f"{path}: not an image file (unrecognised content)")
    expected = _CONTAINER_OF_EXTENSION[extension]
    if container != expected:
        raise ImageReadError(f"{path}: wrong extension: the file holds {container} data, not {expected}")

    if container == "JPEG":
        array = _decode_with_pillow(data, path, container)
    else:
        buffer = np.frombuffer(data, dtype=np.uint8)
        decoded = _quiet_imdecode(buffer)
        if decoded is None:
            if container == "TIFF":
                if _tiff_has_16bit_colour(data):
                    raise ImageReadError(
                        f"{path}: OpenCV cannot decode this 16-bit colour TIFF (an orientation tag "
                        "it does not support?) and Pillow would truncate it to 8 bits; re-save it as PNG"
                    )
                array = _decode_with_pillow(data, path, container)
            else:
                raise ImageReadError(f"{path}: corrupt or truncated {container} file")
        else:
            if decoded.ndim != 3 or decoded.shape[2] != 3:
                raise ImageReadError(f"{path}: unexpected decoded shape {decoded.shape}")
            array = cv2.cvtColor(decoded, cv2.COLOR_BGR2RGB)
    if array.shape[0] == 0 or array.shape[1] == 0:
        raise ImageReadError(f"{path}: image has zero size")
    pixels, bit_depth = _to_float_rgb(array, path)
    return LoadedImage(pixels=np.ascontiguousarray(pixels), bit_depth=bit_depth, path=path)


def quantize(pixels: np.ndarray, bit_depth: int = 8) -> np.ndarray:
    """Float pixels in [0, 1] (clipped) to uint8 or uint16 samples, rounding to nearest."""
    if bit_depth not in (8, 16):
        raise ValueError(f"bit_depth must be 8 or 16, got {bit_depth}")
    scale = 255.0 if bit_depth == 8 else 65535.0
    dtype = np.uint8 if bit_depth == 8 else np.uint16
    clipped = np.clip(np.asarray(pixels, dtype=np.float64), 0.0, 1.0)
    return np.rint(clipped * scale).astype(dtype)


def encode_png(pixels: np.ndarray, bit_depth: int = 8) -> bytes:
    """PNG bytes of float H×W×3 RGB (or H×W gray) pixels in [0, 1]; deterministic."""
    array = np.asarray(pixels)
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if not (array.ndim == 2 or (array.ndim == 3 and array.shape[2] == 3)):
        raise ValueError(f"expected H×W×3 or H×W pixels, got shape {array.shape}")
    if not np.all(np.isfinite(array)):
        raise ValueError("pixels contain NaN or infinity")
    samples = quantize(array, bit_depth)
    if samples.ndim == 3:
        samples = cv2.cvtColor(samples, cv2.COLOR_RGB2BGR)
    ok, encoded = cv2.imencode(".png", samples, [cv2.IMWRITE_PNG_COMPRESSION, PNG_COMPRESSION_LEVEL])
    if not ok:
        raise ValueError("PNG encoding failed")
    return encoded.tobytes()


def write_image(path: str | os.PathLike[str], pixels: np.ndarray, bit_depth: int = 8) -> Path:
    """Write float RGB pixels in [0, 1] (values outside are clipped) as an 8- or 16-bit PNG,
    atomically. The path must end in ``.png``. Returns the path."""
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise ValueError(f"{path}: write_image writes PNG only; use a .png file name")
    atomic_write_bytes(path, encode_png(pixels, bit_depth))
    return path


def list_images(folder: str | os.PathLike[str]) -> list[Path]:
    """The image files (by extension, case-insensitive) directly inside ``folder``, sorted by
    name; hidden files (temporary files of atomic writes) are skipped."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: not a folder")
    return sorted(
        entry
        for entry in folder.iterdir()
        if entry.is_file() and not entry.name.startswith(".") and entry.suffix.lower() in IMAGE_EXTENSIONS
    )
