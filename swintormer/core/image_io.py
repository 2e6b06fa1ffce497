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

Photo files (the deblur command and the app)
--------------------------------------------
:func:`read_image_file` and :func:`encode_image_file` keep what a photographer expects to keep;
:class:`ImageFile` carries it between them:

* **Formats** (:data:`PHOTO_EXTENSIONS`): PNG, JPEG, TIFF, WebP, and HEIC/HEIF when
  ``pillow-heif`` is installed. The size is read from the header before anything is decoded
  (:func:`read_header`; PNG's IHDR and JPEG's frame header are parsed directly) and an image
  above ``max_megapixels`` is refused unread.
* **Pixels** stay in the file's own encoded values (no colour conversion unless
  :func:`convert_to_srgb` is asked for), 8 or 16 bit: PNG and 16-bit TIFF samples are
  decoded by OpenCV with ``IMREAD_UNCHANGED`` (16 bits kept); JPEG, WebP, HEIF and 8-bit TIFF by
  Pillow (OpenCV reads 8-bit TIFF through libtiff's RGBA interface, which premultiplies
  unassociated alpha); 16-bit gray+alpha TIFF, which neither holds, by tifffile. EXIF
  orientation is applied to the pixels here, unless the decoder did (pillow-heif always; Pillow's
  TIFF loader in recent versions, which then drops the tag). Colour stays RGB H×W×3 float32 in [0, 1]; **grayscale** is replicated to three
  channels for processing and averaged back to one when written; **alpha** is kept aside as the
  file's exact samples and written back unchanged. CMYK JPEG/TIFF is converted to sRGB (through
  its profile when it has one).
* **Metadata**: the ICC profile bytes, EXIF, XMP and resolution are read with Pillow (with the
  chunk reader of :mod:`swintormer.core.image_containers` for PNG) and written back as they were,
  except that the EXIF orientation becomes 1 (the pixels are upright), a ``Software`` tag names
  this program, XMP's ``tiff:Orientation`` follows, and the EXIF thumbnail (IFD1, a picture of the
  unrotated original) is not copied. PNG to PNG also keeps the other ancillary chunks (text,
  ``gAMA``/``cHRM``/``sRGB``/``cICP``, ``pHYs``).
* **Writing**: PNG (OpenCV, plus metadata chunks), JPEG and WebP (Pillow), TIFF (Adobe Deflate,
  :func:`swintormer.core.image_containers.encode_tiff`). By default an image is written in its
  own format and bit depth (HEIF as JPEG); JPEG and WebP are 8-bit.
"""

from __future__ import annotations

import io
import os
import re
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path

# OpenCV's own decode guard (read once, when the library loads): at most as many pixels as
# Pillow accepts below. The deblur command and the app set it to their --max-megapixels before
# OpenCV is first imported; they also check every header before decoding.
os.environ.setdefault("OPENCV_IO_MAX_IMAGE_PIXELS", str(1_000_000_000))

import cv2  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image, ImageOps  # noqa: E402

from swintormer.core.files import atomic_write_bytes  # noqa: E402

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


class _ImageSize:
    """``height`` and ``width`` of an image class's H×W×C ``pixels``."""

    pixels: np.ndarray

    @property
    def height(self) -> int:
        return int(self.pixels.shape[0])

    @property
    def width(self) -> int:
        return int(self.pixels.shape[1])


@dataclass(frozen=True)
class LoadedImage(_ImageSize):
    """A decoded image: float32 H×W×3 RGB ``pixels`` in [0, 1], the file's ``bit_depth`` (8 or
    16) and the ``path`` it came from."""

    pixels: np.ndarray
    bit_depth: int
    path: Path


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


def list_images(folder: str | os.PathLike[str], extensions: frozenset[str] = IMAGE_EXTENSIONS) -> list[Path]:
    """The image files (by extension, case-insensitive) directly inside ``folder``, sorted by
    name; hidden files (temporary files of atomic writes) are skipped."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: not a folder")
    return sorted(
        entry
        for entry in folder.iterdir()
        if entry.is_file() and not entry.name.startswith(".") and entry.suffix.lower() in extensions
    )


# =============================================================================================
# Photo files: pixels plus the metadata and channels a photographer expects to keep
# (module docstring, "Photo files").

from swintormer.core import image_containers as containers  # noqa: E402

PHOTO_EXTENSIONS: frozenset[str] = IMAGE_EXTENSIONS | {".webp", ".heic", ".heif"}
_PHOTO_FORMAT_OF_EXTENSION = {**_CONTAINER_OF_EXTENSION, ".webp": "WEBP", ".heic": "HEIF", ".heif": "HEIF"}
# Output formats by the name the command line uses, and the extensions each is written under
# (the first is used when the format changes).
OUTPUT_FORMATS: dict[str, str] = {"png": "PNG", "jpeg": "JPEG", "tiff": "TIFF", "webp": "WEBP"}
EXTENSIONS_OF_FORMAT: dict[str, tuple[str, ...]] = {
    "PNG": (".png",), "JPEG": (".jpg", ".jpeg"), "TIFF": (".tif", ".tiff"), "WEBP": (".webp",),
}
DEFAULT_MAX_MEGAPIXELS = 200.0
DEFAULT_QUALITY = 95  # JPEG and lossy WebP
# ISO-BMFF major brands of HEIF images with HEVC coding (ISO/IEC 23008-12 annex B).
_HEIF_BRANDS = frozenset({b"heic", b"heix", b"hevc", b"hevx", b"heim", b"heis", b"hevm", b"hevs", b"mif1", b"msf1"})
# PNG chunks kept from a PNG input in a PNG output (besides those written anew). Colour chunks
# go when the pixels are converted to sRGB.
_PNG_COLOUR_CHUNKS = frozenset({b"gAMA", b"cHRM", b"sRGB", b"cICP", b"mDCV", b"cLLI"})
_PNG_CARRIED_CHUNKS = _PNG_COLOUR_CHUNKS | {b"pHYs", b"tEXt", b"zTXt", b"iTXt"}
_ROWS = 256  # rows per step when quantising and averaging, to bound temporary memory

EXIF_ORIENTATION, EXIF_SOFTWARE = 0x0112, 0x0131


class ImageTooLargeError(ImageReadError):
    """The image's header declares more pixels than allowed; nothing was decoded."""


class UnsupportedImageError(ImageReadError):
    """A format, variant or feature this reader does not handle (the message says which)."""


@dataclass(frozen=True)
class ImageHeader:
    """What the header says, before any pixel is decoded."""

    format: str  # "PNG", "JPEG", "TIFF", "WEBP" or "HEIF"
    width: int
    height: int

    @property
    def pixels(self) -> int:
        return self.width * self.height


@dataclass
class ImageFile(_ImageSize):
    """A photo decoded for processing, with what is needed to write it back faithfully.

    ``pixels`` are float32 H×W×3 RGB in [0, 1], upright, in the file's encoded values (grayscale
    replicated to three channels); ``alpha`` the file's alpha samples (H×W uint8/uint16, upright)
    or None; ``mode`` the channels written back (``"L"``, ``"LA"``, ``"RGB"``, ``"RGBA"``).
    """

    pixels: np.ndarray
    bit_depth: int  # 8 or 16
    format: str  # the container read: "PNG", "JPEG", "TIFF", "WEBP" or "HEIF"
    mode: str
    alpha: np.ndarray | None = None
    icc_profile: bytes | None = None
    exif: bytes | None = None  # EXIF as Pillow serialises it ("Exif\0\0" + TIFF structure)
    xmp: bytes | None = None
    dpi: tuple[float, float] | None = None
    orientation: int = 1  # the EXIF orientation applied to the pixels
    jpeg_subsampling: int | None = None  # Pillow's code: 0 = 4:4:4, 1 = 4:2:2, 2 = 4:2:0
    webp_lossless: bool = False
    png_chunks: tuple[tuple[bytes, bytes], ...] = ()  # (type, body) carried PNG → PNG
    notes: list[str] = field(default_factory=list)  # what was changed on reading, for the user
    path: Path | None = None

    @property
    def grayscale(self) -> bool:
        return self.mode in ("L", "LA")


@dataclass(frozen=True)
class EncodedImage:
    """The bytes of an output file and the format they hold."""

    data: bytes
    format: str
    notes: tuple[str, ...] = ()


def heif_available() -> bool:
    """Whether HEIC/HEIF can be read (``pillow-heif`` installed); registers its Pillow opener."""
    try:
        import pillow_heif
    except ImportError:
        return False
    pillow_heif.register_heif_opener()
    return True


def _sniff_photo(head: bytes) -> str | None:
    container = _sniff_container(head[:8])
    if container:
        return container
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WEBP"
    if head[4:8] == b"ftyp":
        return "HEIF" if head[8:12] in _HEIF_BRANDS else "ISOBMFF"
    return None


def _label(source: str | os.PathLike[str] | bytes, name: str | None) -> str:
    return name if name else ("<image>" if isinstance(source, (bytes, bytearray, memoryview)) else str(source))


def photo_format_of(name: str | os.PathLike[str]) -> str | None:
    """The container a file name announces (``"JPEG"`` for ``x.jpg``), or None if unsupported."""
    return _PHOTO_FORMAT_OF_EXTENSION.get(Path(name).suffix.lower())


def unsupported_format_message(name: str | os.PathLike[str]) -> str:
    suffix = Path(name).suffix or "(none)"
    return (f"{name}: unsupported format {suffix!r} (supported: PNG, JPEG, TIFF, WebP, HEIC; "
            f"extensions {', '.join(sorted(PHOTO_EXTENSIONS))})")


def _read_file(path: Path, label: str, limit: int = -1) -> bytes:
    """The file's bytes (the first ``limit`` when given), every failure one ``ImageReadError``."""
    try:
        with open(path, "rb") as handle:
            return handle.read(limit)
    except FileNotFoundError:
        raise ImageReadError(f"{label}: file not found") from None
    except IsADirectoryError:
        raise ImageReadError(f"{label}: is a folder, not an image") from None
    except OSError as exc:
        raise ImageReadError(f"{label}: cannot read file ({exc.strerror or exc})") from None


def _read_source(source: str | os.PathLike[str] | bytes, label: str) -> bytes:
    if isinstance(source, (bytes, bytearray, memoryview)):
        return bytes(source)
    return _read_file(Path(source), label)


def _heif_missing(label: str) -> UnsupportedImageError:
    return UnsupportedImageError(f"{label}: HEIC/HEIF is not supported: install pillow-heif "
                                 "(pip install pillow-heif, or the 'heif' extra of swintormer)")


def read_header(source: str | os.PathLike[str] | bytes, *, name: str | None = None,
                max_megapixels: float | None = DEFAULT_MAX_MEGAPIXELS) -> ImageHeader:
    """The format and size of an image file from its header, nothing decoded; raises
    :class:`ImageTooLargeError` above ``max_megapixels`` (None: no limit) and
    :class:`ImageReadError` for anything that is not a supported, well-named image."""
    label = _label(source, name)
    if isinstance(source, (bytes, bytearray, memoryview)):
        return _header_of(bytes(source), label, Path(name).suffix.lower() if name else None, max_megapixels)
    path = Path(source)
    head = _read_file(path, label, _HEADER_PREFIX)
    return _header_of(head, label, Path(name or path).suffix.lower(), max_megapixels, path=path)


# read_header reads this much of a file; PNG's IHDR is in its first 33 bytes and a JPEG frame
# header follows the APP segments (EXIF, ICC), which rarely exceed it; other formats, and a
# JPEG whose frame header lies further, are opened lazily by Pillow from the file.
_HEADER_PREFIX = 1024 * 1024


def _header_of(data: bytes, label: str, extension: str | None, max_megapixels: float | None,
               path: Path | None = None) -> ImageHeader:
    """The header of ``data`` (a whole file, or the first bytes of the file at ``path``)."""
    if extension is not None and extension not in PHOTO_EXTENSIONS:
        raise UnsupportedImageError(unsupported_format_message(label))
    if not data:
        raise ImageReadError(f"{label}: file is empty")
    container = _sniff_photo(data[:16])
    if container is None:
        raise ImageReadError(f"{label}: not an image file (unrecognised content)")
    if container == "ISOBMFF":
        brand = data[8:12].decode("latin-1", "replace")
        raise UnsupportedImageError(f"{label}: unsupported ISO media file (brand {brand!r}; AVIF is not supported)")
    expected = _PHOTO_FORMAT_OF_EXTENSION.get(extension) if extension else container
    if container != expected:
        raise ImageReadError(f"{label}: wrong extension: the file holds {container} data, not {expected}")
    if container == "HEIF" and not heif_available():
        raise _heif_missing(label)
    sizer = {"PNG": containers.png_size, "JPEG": containers.jpeg_size, "TIFF": containers.tiff_size}.get(container)
    size = sizer(data) if sizer else None
    if size is None and container == "TIFF" and path is not None:
        size = containers.tiff_size(path.read_bytes())  # its first IFD lies beyond the prefix read
    if size is None:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                with Image.open(path if path is not None else io.BytesIO(data)) as image:
                    size = image.size
        except Image.DecompressionBombError:
            raise ImageTooLargeError(f"{label}: image is above Pillow's decompression-bomb limit "
                                     f"of {2 * (Image.MAX_IMAGE_PIXELS or 0) / 1e6:.0f} Mpx") from None
        except Exception as exc:
            detail = "" if "BytesIO" in str(exc) else f" ({exc})"
            raise ImageReadError(f"{label}: corrupt or truncated {container} file{detail}") from None
    width, height = size
    if width == 0 or height == 0:
        raise ImageReadError(f"{label}: image has zero size")
    header = ImageHeader(container, int(width), int(height))
    if max_megapixels is not None and header.pixels > max_megapixels * 1e6:
        raise ImageTooLargeError(f"{label}: image is {width}×{height} ({header.pixels / 1e6:.0f} Mpx), "
                                 f"above the limit of {max_megapixels:g} Mpx")
    return header


# ---- orientation


def orient(array: np.ndarray, orientation: int) -> np.ndarray:
    """Pixels stored with EXIF ``orientation`` (1–8, TIFF 6.0 tag 274) turned upright, as
    ``PIL.ImageOps.exif_transpose`` does; works on H×W and H×W×C arrays."""
    if orientation == 2:
        return array[:, ::-1]
    if orientation == 3:
        return array[::-1, ::-1]
    if orientation == 4:
        return array[::-1]
    if orientation == 5:
        return array.swapaxes(0, 1)
    if orientation == 6:
        return np.rot90(array, k=-1)
    if orientation == 7:
        return array[::-1, ::-1].swapaxes(0, 1)
    if orientation == 8:
        return np.rot90(array, k=1)
    return array


# ---- metadata


def _exif_object(exif: bytes | None) -> Image.Exif | None:
    if not exif:
        return None
    parsed = Image.Exif()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            parsed.load(exif)
    except Exception:
        return None
    return parsed


def _orientation_of(exif: Image.Exif | None) -> int:
    value = exif.get(EXIF_ORIENTATION, 1) if exif is not None else 1
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


def _as_bytes(value) -> bytes | None:
    if value is None or value == b"" or value == "":
        return None
    if isinstance(value, str):
        return value.encode("utf-8")
    if isinstance(value, tuple) and len(value) == 1:
        return _as_bytes(value[0])
    return bytes(value)


def _png_metadata(data: bytes, label: str) -> dict:
    meta: dict = {"chunks": []}
    try:
        for kind, body in containers.png_chunks(data):
            if kind == b"IHDR":
                meta["colour_type"] = body[9] if len(body) >= 13 else None
            elif kind == b"iCCP":
                meta["icc_profile"] = containers.png_iccp_profile(body)
            elif kind == b"eXIf":
                meta["exif"] = b"Exif\x00\x00" + body
            elif kind == b"iTXt" and body.startswith(containers.XMP_PNG_KEYWORD + b"\x00"):
                meta["xmp"] = containers.png_itxt(body)[1]
            elif kind in (b"acTL",):
                raise UnsupportedImageError(f"{label}: animated PNG is not supported")
            else:
                if kind == b"pHYs" and len(body) == 9 and body[8] == 1:
                    x, y = (int.from_bytes(body[i : i + 4], "big") for i in (0, 4))
                    meta["dpi"] = (x * 0.0254, y * 0.0254)
                if kind in _PNG_CARRIED_CHUNKS:
                    meta["chunks"].append((kind, body))
    except (ValueError, IndexError) as exc:
        if isinstance(exc, UnsupportedImageError):
            raise
        raise ImageReadError(f"{label}: corrupt PNG metadata ({exc})") from None
    return meta


def _pillow_metadata(image: Image.Image) -> dict:
    """ICC, EXIF (for TIFF: the descriptive tags of the first IFD), XMP and resolution."""
    info = image.info
    meta: dict = {"icc_profile": _as_bytes(info.get("icc_profile")), "xmp": _as_bytes(info.get("xmp"))}
    dpi = info.get("dpi")
    if isinstance(dpi, tuple) and len(dpi) == 2 and all(float(v) > 0 for v in dpi):
        meta["dpi"] = (float(dpi[0]), float(dpi[1]))
    exif = image.getexif()
    if image.format == "TIFF":
        for tag in list(exif):
            if tag in containers.TIFF_STRUCTURE_TAGS:
                del exif[tag]
    if len(exif) or exif.get_ifd(0x8769):
        meta["exif"] = exif.tobytes()
    return meta


# ---- decoding


def _quiet_imdecode_unchanged(data: bytes) -> np.ndarray | None:
    cv_log = getattr(getattr(cv2, "utils", None), "logging", None)
    previous = cv_log.getLogLevel() if cv_log else None
    if cv_log:
        cv_log.setLogLevel(cv_log.LOG_LEVEL_SILENT)
    try:
        return cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_UNCHANGED)
    except cv2.error as exc:
        if "validateInputImageSize" in str(exc) or "pixels <=" in str(exc):
            raise ImageTooLargeError(
                f"image is above OpenCV's decode limit (OPENCV_IO_MAX_IMAGE_PIXELS="
                f"{os.environ.get('OPENCV_IO_MAX_IMAGE_PIXELS')})") from None
        return None
    finally:
        if cv_log:
            cv_log.setLogLevel(previous)


def _split_opencv(decoded: np.ndarray, gray: bool, label: str) -> tuple[np.ndarray, np.ndarray | None]:
    """OpenCV's BGR(A)/gray samples as (RGB or gray colour, alpha or None)."""
    if decoded.dtype not in (np.uint8, np.uint16):
        raise UnsupportedImageError(f"{label}: unsupported sample type {decoded.dtype} "
                                    "(only 8-bit and 16-bit images are supported)")
    if decoded.ndim == 2:
        return decoded, None
    channels = decoded.shape[2]
    if channels == 1:
        return decoded[:, :, 0], None
    if channels == 2:
        return decoded[:, :, 0], decoded[:, :, 1]
    if channels == 3:
        return (decoded[:, :, 0] if gray else decoded[:, :, ::-1]), None
    if channels == 4:
        return (decoded[:, :, 0] if gray else decoded[:, :, 2::-1]), decoded[:, :, 3]
    raise UnsupportedImageError(f"{label}: {channels} channels are not supported")


def _decode_with_pillow_modes(image: Image.Image, label: str, meta: dict, notes: list[str]
                              ) -> tuple[np.ndarray, np.ndarray | None, bool]:
    """(colour samples, alpha samples or None, grayscale) from a loaded Pillow image."""
    mode = image.mode
    if mode == "1":
        image, mode = image.convert("L"), "L"
    if mode in ("P", "PA"):
        has_alpha = mode == "PA" or "transparency" in image.info
        image = image.convert("RGBA" if has_alpha else "RGB")
        mode = image.mode
    if mode in ("RGBa", "La"):
        image = image.convert("RGBA" if mode == "RGBa" else "LA")
        mode = image.mode
    if mode in ("RGBX", "YCbCr"):
        image, mode = image.convert("RGB"), "RGB"
    if mode == "CMYK":
        from swintormer.core.colour import cmyk_to_srgb

        image, icc = cmyk_to_srgb(image, meta.get("icc_profile"))
        meta["icc_profile"] = icc
        notes.append("CMYK converted to sRGB" + (" through its profile" if icc else ""))
        mode = "RGB"
    if mode in ("I;16", "I;16L", "I;16B", "I;16N"):
        return np.asarray(image).astype(np.uint16), None, True
    if mode == "I":
        gray = np.asarray(image)
        if gray.min() < 0 or gray.max() > 65535:
            raise UnsupportedImageError(f"{label}: 32-bit integer samples are not supported")
        return gray.astype(np.uint16), None, True
    if mode == "L":
        return np.asarray(image), None, True
    if mode == "LA":
        array = np.asarray(image)
        return array[:, :, 0], array[:, :, 1], True
    if mode == "RGB":
        return np.asarray(image), None, False
    if mode == "RGBA":
        array = np.asarray(image)
        return array[:, :, :3], array[:, :, 3], False
    raise UnsupportedImageError(f"{label}: unsupported image mode {mode}")


def _pillow_cannot_open(data: bytes) -> bool:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            Image.open(io.BytesIO(data)).close()
    except Exception:
        return True
    return False


def _decode_tiff_with_tifffile(data: bytes, label: str, notes: list[str]):
    """A TIFF that Pillow cannot hold (16-bit gray with alpha) through tifffile (a dependency
    of scikit-image): (colour, alpha, grayscale, orientation, metadata). Its ICC profile and XMP
    are kept; its EXIF is not (noted)."""
    try:
        import tifffile
    except ImportError:
        raise UnsupportedImageError(f"{label}: this TIFF variant needs the tifffile package") from None
    with tifffile.TiffFile(io.BytesIO(data)) as tiff:
        page = tiff.pages[0]
        if len(tiff.pages) > 1:
            raise UnsupportedImageError(f"{label}: multi-page TIFF files are not supported")
        array = page.asarray()
        tags = {tag.code: tag.value for tag in page.tags.values()}
    if array.dtype not in (np.uint8, np.uint16) or array.ndim not in (2, 3):
        raise UnsupportedImageError(f"{label}: unsupported TIFF samples ({array.dtype}, shape {array.shape})")
    if array.ndim == 3 and array.shape[0] in (2, 3, 4) and array.shape[2] not in (2, 3, 4):
        array = np.moveaxis(array, 0, 2)  # planar configuration 2
    meta = {"icc_profile": _as_bytes(tags.get(34675)), "xmp": _as_bytes(tags.get(700))}
    orientation = tags.get(274, 1)
    orientation = int(orientation) if isinstance(orientation, int) and 1 <= int(orientation) <= 8 else 1
    if any(code in tags for code in (271, 272, 306, 34665)):
        notes.append("its EXIF was not copied (a TIFF variant read with tifffile)")
    if array.ndim == 2:
        return array, None, True, orientation, meta
    channels = array.shape[2]
    gray = channels <= 2
    colour = array[:, :, 0] if gray else array[:, :, :3]
    alpha = array[:, :, channels - 1] if channels in (2, 4) else None
    return colour, alpha, gray, orientation, meta


def _to_float_colour(colour: np.ndarray) -> np.ndarray:
    """Integer gray or RGB samples as float32 H×W×3 in [0, 1], a few rows at a time."""
    height, width = colour.shape[:2]
    scale = np.float32(255.0 if colour.dtype == np.uint8 else 65535.0)
    out = np.empty((height, width, 3), dtype=np.float32)
    for top in range(0, height, _ROWS):
        block = colour[top : top + _ROWS].astype(np.float32) / scale
        out[top : top + _ROWS] = block[:, :, None] if block.ndim == 2 else block
    return out


def read_image_file(source: str | os.PathLike[str] | bytes, *, name: str | None = None,
                    max_megapixels: float | None = DEFAULT_MAX_MEGAPIXELS) -> ImageFile:
    """Read a photo with its metadata (module docstring, "Photo files"). ``source`` is a path,
    or the file's bytes with ``name`` giving its file name. Raises :class:`ImageReadError`
    (one line naming the file) for anything unreadable, unsupported or too large."""
    label = _label(source, name)
    data = _read_source(source, label)
    is_bytes = isinstance(source, (bytes, bytearray, memoryview))
    extension = Path(name).suffix.lower() if name else (None if is_bytes else Path(source).suffix.lower())
    header = _header_of(data, label, extension, max_megapixels)
    container = header.format
    notes: list[str] = []
    meta: dict = {}
    subsampling = None
    upright = False  # whether the decoder already applied the orientation
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if container == "PNG":
                meta = _png_metadata(data, label)
                gray = meta.get("colour_type") in (0, 4)
                decoded = _quiet_imdecode_unchanged(data)
                if decoded is None:
                    raise ImageReadError(f"{label}: corrupt or truncated PNG file")
                colour, alpha = _split_opencv(decoded, gray, label)
                orientation = _orientation_of(_exif_object(meta.get("exif")))
            elif container == "TIFF" and _pillow_cannot_open(data):
                colour, alpha, gray, orientation, meta = _decode_tiff_with_tifffile(data, label, notes)
            else:
                image = Image.open(io.BytesIO(data))
                if getattr(image, "n_frames", 1) > 1 and container != "HEIF":
                    kind = "multi-page TIFF" if container == "TIFF" else f"animated {container}"
                    raise UnsupportedImageError(f"{label}: {kind} files are not supported")
                meta = _pillow_metadata(image)
                orientation = 1 if container == "HEIF" else _orientation_of(image.getexif())
                if container == "JPEG":
                    from PIL import JpegImagePlugin

                    subsampling = JpegImagePlugin.get_sampling(image)
                bits = image.tag_v2.get(258) if container == "TIFF" else None
                bits = max(bits) if isinstance(bits, tuple) else (bits or 8)
                if container == "TIFF" and bits > 8:
                    # 16-bit samples through OpenCV (Pillow keeps 8 of them); 8-bit TIFF goes
                    # through Pillow, since OpenCV reads it with libtiff's RGBA interface, which
                    # premultiplies unassociated alpha and drops a gray image's alpha.
                    if image.tag_v2.get(277, 1) == 2:
                        colour, alpha, gray, _, _ = _decode_tiff_with_tifffile(data, label, notes)
                    else:
                        patched = containers.tiff_with_orientation_reset(data) if orientation != 1 else data
                        decoded = _quiet_imdecode_unchanged(patched or data)
                        if decoded is None:
                            raise ImageReadError(f"{label}: corrupt or truncated 16-bit TIFF file")
                        gray = image.mode in ("L", "LA", "I;16", "I;16B", "I;16L", "I;16N")
                        colour, alpha = _split_opencv(decoded, gray, label)
                else:
                    image.load()  # raises on truncated data instead of returning grey rows
                    # Recent Pillow (13 here) turns a TIFF upright itself while loading it and then
                    # drops the orientation tag (TiffImageFile.load_end); the tag says which.
                    upright = container == "TIFF" and EXIF_ORIENTATION not in image.tag_v2
                    colour, alpha, gray = _decode_with_pillow_modes(image, label, meta, notes)
    except ImageReadError:
        raise
    except MemoryError:
        raise
    except Exception as exc:  # Pillow raises OSError, SyntaxError, ValueError... for bad data
        detail = "" if "BytesIO" in str(exc) else f" ({' '.join(str(exc).split())})"
        raise ImageReadError(f"{label}: corrupt or truncated {container} file{detail}") from None
    lossless = container == "WEBP" and containers.webp_is_lossless(data)
    del data
    if colour.shape[0] == 0 or colour.shape[1] == 0:
        raise ImageReadError(f"{label}: image has zero size")
    if not upright:
        colour = orient(colour, orientation)
        if alpha is not None:
            alpha = orient(alpha, orientation)
    if alpha is not None:
        alpha = np.ascontiguousarray(alpha)
    bit_depth = 8 if colour.dtype == np.uint8 else 16
    pixels = _to_float_colour(colour)
    del colour
    mode = ("L" if gray else "RGB") + ("A" if alpha is not None else "")
    return ImageFile(
        pixels=pixels, bit_depth=bit_depth, format=container, mode=mode, alpha=alpha,
        icc_profile=meta.get("icc_profile") or None, exif=meta.get("exif"), xmp=meta.get("xmp"),
        dpi=meta.get("dpi"), orientation=orientation, jpeg_subsampling=subsampling,
        webp_lossless=lossless,
        png_chunks=tuple(meta.get("chunks", ())), notes=notes,
        path=None if is_bytes else Path(source),
    )


def convert_to_srgb(image: ImageFile) -> ImageFile:
    """The image with its colour converted from its embedded profile to sRGB and the sRGB profile
    embedded (:mod:`swintormer.core.colour`). Untagged images are taken as sRGB already and
    returned as they are; grayscale images keep their gray profile (sRGB is an RGB space)."""
    from swintormer.core.colour import ColourError, rgb_to_srgb, srgb_profile_bytes

    if not image.icc_profile or image.grayscale or image.icc_profile == srgb_profile_bytes():
        return image
    label = str(image.path) if image.path else "<image>"
    try:
        pixels, note = rgb_to_srgb(image.pixels, image.icc_profile, image.bit_depth)
    except ColourError as error:
        raise ImageReadError(f"{label}: {error}") from None
    chunks = tuple((kind, body) for kind, body in image.png_chunks if kind not in _PNG_COLOUR_CHUNKS)
    notes = [*image.notes, *([note] if note else [])]
    return replace(image, pixels=pixels, icc_profile=srgb_profile_bytes(), png_chunks=chunks, notes=notes)


# ---- encoding


def default_output_format(input_format: str) -> str:
    """The format an image is written in when none is asked for: its own; HEIF as JPEG (HEIC
    encoders are not part of every installation, and every viewer opens JPEG)."""
    return "JPEG" if input_format == "HEIF" else input_format


def output_file_name(source_name: str, input_format: str, output_format: str | None = None) -> str:
    """The output's file name: the input's stem; its own extension when the format is unchanged,
    else the format's usual one (``photo.JPEG`` stays ``photo.JPEG``; ``IMG.heic`` → ``IMG.jpg``)."""
    target = output_format or default_output_format(input_format)
    source = Path(source_name)
    if source.suffix.lower() in EXTENSIONS_OF_FORMAT[target]:
        return source.name
    return source.stem + EXTENSIONS_OF_FORMAT[target][0]


def upright_exif(exif: bytes | None, software: str | None) -> Image.Exif | None:
    """The EXIF to write: as read, orientation 1, ``software`` in the Software tag, without
    the image-structure tags of a TIFF's first IFD; None when the file had no EXIF."""
    parsed = _exif_object(exif)
    if parsed is None:
        return None
    for tag in list(parsed):
        if tag in containers.TIFF_STRUCTURE_TAGS:
            del parsed[tag]
    parsed[EXIF_ORIENTATION] = 1
    if software:
        parsed[EXIF_SOFTWARE] = software
    return parsed


_XMP_ORIENTATION = (
    re.compile(rb"""(tiff:Orientation\s*=\s*["'])\s*\d\s*(["'])"""),
    re.compile(rb"(<tiff:Orientation>)\s*\d\s*(</tiff:Orientation>)"),
)


def upright_xmp(xmp: bytes | None) -> bytes | None:
    """XMP with ``tiff:Orientation`` set to 1 (XMP mirrors the EXIF tag; the pixels are upright)."""
    if not xmp:
        return None
    for pattern in _XMP_ORIENTATION:
        xmp = pattern.sub(rb"\g<1>1\g<2>", xmp)
    return xmp


def _quantized(pixels: np.ndarray, bit_depth: int, gray: bool) -> np.ndarray:
    """:func:`quantize` a few rows at a time (bounded temporaries); grayscale is the mean of
    the three channels, taken in float64."""
    height, width = pixels.shape[:2]
    dtype = np.uint8 if bit_depth == 8 else np.uint16
    out = np.empty((height, width) if gray else (height, width, 3), dtype=dtype)
    for top in range(0, height, _ROWS):
        block = pixels[top : top + _ROWS]
        if not np.all(np.isfinite(block)):
            raise ValueError("pixels contain NaN or infinity")
        if gray:
            block = block.astype(np.float64).mean(axis=2)
        out[top : top + _ROWS] = quantize(block, bit_depth)
    return out


def _alpha_at(alpha: np.ndarray, bit_depth: int) -> np.ndarray:
    """Alpha samples at another bit depth (exact both ways for 8-bit values: v·257 / 257)."""
    if bit_depth == 16 and alpha.dtype == np.uint8:
        return alpha.astype(np.uint16) * 257
    if bit_depth == 8 and alpha.dtype == np.uint16:
        return ((alpha.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)
    return alpha


def encode_image_file(image: ImageFile, pixels: np.ndarray, *, format: str | None = None,
                      quality: int | None = None, software: str | None = None) -> EncodedImage:
    """The bytes of ``pixels`` (float H×W×3 in [0, 1], the image's size) written like ``image``:
    its mode, alpha, bit depth (JPEG and WebP are 8-bit), ICC profile, EXIF (upright, with
    ``software``), XMP and resolution, in ``format`` (default: :func:`default_output_format`).
    ``quality`` (1–100) is for JPEG and lossy WebP (default 95; a lossless WebP input stays
    lossless unless a quality is given). Raises ValueError for what the format cannot hold."""
    target = format or default_output_format(image.format)
    if target not in EXTENSIONS_OF_FORMAT:
        raise ValueError(f"unknown output format {target!r}")
    pixels = np.asarray(pixels)
    if pixels.shape != (image.height, image.width, 3):
        raise ValueError(f"expected {image.height}×{image.width}×3 pixels, got {pixels.shape}")
    if image.alpha is not None and target == "JPEG":
        raise ValueError("JPEG cannot hold the alpha channel; choose --format png, tiff or webp")
    notes: list[str] = []
    bit_depth = image.bit_depth if target in ("PNG", "TIFF") else 8
    gray = image.grayscale
    samples = _quantized(pixels, bit_depth, gray)
    alpha = _alpha_at(image.alpha, bit_depth) if image.alpha is not None else None
    exif = upright_exif(image.exif, software)
    xmp = upright_xmp(image.xmp)
    icc = image.icc_profile
    if target == "PNG":
        data = _encode_png_file(image, samples, alpha, icc, exif, xmp)
    elif target == "TIFF":
        stacked = samples if alpha is None else np.dstack([samples, alpha])
        data = containers.encode_tiff(stacked, alpha=alpha is not None, icc_profile=icc, xmp=xmp, exif=exif,
                                      dpi=image.dpi)
    else:
        if gray and target == "WEBP":  # WebP has no grayscale: the same value in R, G and B
            samples = np.repeat(samples[:, :, None], 3, axis=2)
        channels = samples if alpha is None else np.dstack([samples if samples.ndim == 3 else samples[:, :, None], alpha])
        mode = {2: "L", 3: "RGB", 4: "RGBA"}[channels.ndim if channels.ndim == 2 else channels.shape[2]]
        if channels.ndim == 3 and channels.shape[2] == 2:
            mode = "LA"
        pil = Image.fromarray(np.ascontiguousarray(channels), mode)
        options: dict = {}
        if icc:
            options["icc_profile"] = icc
        if exif is not None:
            options["exif"] = exif.tobytes()
        if xmp:
            if target == "JPEG" and len(xmp) > 65502:
                notes.append("its XMP is larger than one JPEG segment holds and was not copied")
            else:
                options["xmp"] = xmp
        if target == "JPEG":
            options["quality"] = quality or DEFAULT_QUALITY
            if not gray:
                keep = image.format == "JPEG" and image.jpeg_subsampling in (0, 1, 2)
                options["subsampling"] = image.jpeg_subsampling if keep else 0
            if image.dpi:
                options["dpi"] = tuple(round(v) for v in image.dpi)
        else:
            if image.webp_lossless and quality is None:
                options["lossless"] = True
            else:
                options["quality"] = quality or DEFAULT_QUALITY
            options["exact"] = True  # keep the colour under fully transparent pixels
        buffer = io.BytesIO()
        pil.save(buffer, target, **options)
        data = buffer.getvalue()
    return EncodedImage(data=data, format=target, notes=tuple(notes))


def _encode_png_file(image: ImageFile, samples: np.ndarray, alpha: np.ndarray | None, icc: bytes | None,
                     exif: Image.Exif | None, xmp: bytes | None) -> bytes:
    if samples.ndim == 2 and alpha is not None:
        png = containers.encode_png_gray_alpha(np.dstack([samples, alpha]))
    else:
        if samples.ndim == 3:
            samples = samples[:, :, ::-1]  # RGB → OpenCV's BGR
            if alpha is not None:
                samples = np.dstack([samples, alpha])
        ok, encoded = cv2.imencode(".png", np.ascontiguousarray(samples),
                                   [cv2.IMWRITE_PNG_COMPRESSION, PNG_COMPRESSION_LEVEL])
        if not ok:
            raise ValueError("PNG encoding failed")
        png = encoded.tobytes()
    carried = [(kind, body) for kind, body in image.png_chunks if not (icc and kind == b"sRGB")]
    chunks = []
    if icc:
        chunks.append(containers.iccp_chunk(icc))
    chunks += [containers.png_chunk(kind, body) for kind, body in carried]
    if image.dpi and not any(kind == b"pHYs" for kind, _ in carried):
        chunks.append(containers.phys_chunk(image.dpi))
    if exif is not None:
        chunks.append(containers.exif_chunk(exif.tobytes()))
    if xmp:
        chunks.append(containers.xmp_chunk(xmp))
    return containers.insert_png_chunks(png, chunks) if chunks else png


def list_photos(folder: str | os.PathLike[str]) -> list[Path]:
    """:func:`list_images` for :data:`PHOTO_EXTENSIONS` (WebP and HEIC/HEIF too)."""
    return list_images(folder, PHOTO_EXTENSIONS)
