"""Byte-level pieces of the image containers that neither OpenCV nor Pillow covers for us.

* **PNG** (W3C, *Portable Network Graphics Specification*, third edition): the image size from
  the IHDR chunk without decoding; a walk over the chunks; metadata chunks built and inserted
  after IHDR (``iCCP``, ``eXIf``, ``iTXt`` with the keyword ``XML:com.adobe.xmp``, ``pHYs``);
  an encoder for grayscale with alpha (colour type 4), which OpenCV cannot write.
  PNG metadata is read here rather than with Pillow because Pillow's ``getexif()`` decodes the
  whole image when no ``eXIf`` chunk precedes the image data.
* **JPEG** (ITU-T T.81, annex B): the image size from the frame header (SOF\\ *n*).
* **TIFF** (TIFF 6.0): the orientation tag of the first IFD reset in a copy of the bytes (OpenCV
  5.0 refuses to decode a TIFF whose orientation is not 1; the reader then rotates the pixels
  itself); a baseline writer for 8/16-bit gray, gray+alpha, RGB and RGBA with Adobe Deflate
  strips that carries the ICC profile (tag 34675, ICC.1:2010 annex B.4), XMP (tag 700, XMP
  part 3) and EXIF (the descriptive first-IFD tags plus the Exif and GPS IFDs, CIPA DC-008
  "Exif 2.32" section 4.6). Tags are serialised with Pillow's ``ImageFileDirectory_v2``, the
  same code Pillow uses to write EXIF.
* **WebP** (Google, *WebP Container Specification*): whether a file holds lossless (``VP8L``)
  image data.

Everything here works on ``bytes`` and raises ``ValueError`` for malformed data.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Iterator

import numpy as np

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
XMP_PNG_KEYWORD = b"XML:com.adobe.xmp"
# An embedded profile or XMP packet larger than this is refused rather than inflated: a small
# compressed chunk could otherwise expand to gigabytes (the same idea as Pillow's MAX_TEXT_CHUNK).
MAX_INFLATED_METADATA = 64 * 1024 * 1024


# ---------------------------------------------------------------------------------------------
# PNG


def png_size(data: bytes) -> tuple[int, int] | None:
    """``(width, height)`` from the IHDR chunk, or None when the bytes do not start a PNG."""
    if len(data) < 24 or not data.startswith(PNG_SIGNATURE) or data[12:16] != b"IHDR":
        return None
    width, height = struct.unpack(">II", data[16:24])
    return width, height


def png_chunks(data: bytes) -> Iterator[tuple[bytes, bytes]]:
    """``(type, body)`` of every chunk up to IEND. Stops quietly at a truncated chunk (the
    decoder reports the damage); raises ValueError when the signature is missing."""
    if not data.startswith(PNG_SIGNATURE):
        raise ValueError("not a PNG file")
    position = len(PNG_SIGNATURE)
    while position + 8 <= len(data):
        length, kind = struct.unpack(">I4s", data[position : position + 8])
        end = position + 8 + length
        if end + 4 > len(data):
            return
        yield kind, data[position + 8 : end]
        if kind == b"IEND":
            return
        position = end + 4  # the CRC


def png_chunk(kind: bytes, body: bytes) -> bytes:
    """One chunk: length, type, body and the CRC-32 of type and body."""
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)


def inflate_limited(data: bytes, limit: int = MAX_INFLATED_METADATA) -> bytes:
    """zlib-decompress at most ``limit`` bytes; ValueError when the stream is larger or broken."""
    inflater = zlib.decompressobj()
    try:
        out = inflater.decompress(data, limit)
    except zlib.error as error:
        raise ValueError(f"corrupt compressed metadata ({error})") from None
    if inflater.unconsumed_tail:
        raise ValueError(f"compressed metadata inflates beyond {limit // (1024 * 1024)} MB")
    return out


def png_iccp_profile(body: bytes) -> bytes:
    """The ICC profile of an ``iCCP`` chunk: name, NUL, method 0, zlib stream."""
    name_end = body.index(b"\x00")
    if body[name_end + 1 : name_end + 2] != b"\x00":
        raise ValueError("iCCP chunk with an unknown compression method")
    return inflate_limited(body[name_end + 2 :])


def png_itxt(body: bytes) -> tuple[bytes, bytes]:
    """``(keyword, text)`` of an ``iTXt`` chunk (text inflated when compressed)."""
    keyword, rest = body.split(b"\x00", 1)
    compressed = rest[0]  # rest[1] is the method: 0, zlib, the only one defined
    _language, rest = rest[2:].split(b"\x00", 1)
    _translated, text = rest.split(b"\x00", 1)
    return keyword, inflate_limited(text) if compressed else text


def iccp_chunk(profile: bytes) -> bytes:
    return png_chunk(b"iCCP", b"ICC profile\x00\x00" + zlib.compress(profile, 9))


def exif_chunk(exif: bytes) -> bytes:
    """``eXIf`` holds the TIFF structure itself, without the JPEG APP1 ``Exif\\0\\0`` prefix."""
    if exif.startswith(b"Exif\x00\x00"):
        exif = exif[6:]
    return png_chunk(b"eXIf", exif)


def xmp_chunk(xmp: bytes) -> bytes:
    """XMP as PNG carries it (XMP specification part 3, 1.1.5): uncompressed iTXt, empty language."""
    return png_chunk(b"iTXt", XMP_PNG_KEYWORD + b"\x00\x00\x00\x00\x00" + xmp)


def phys_chunk(dpi: tuple[float, float]) -> bytes:
    """Pixels per metre (unit 1) from dots per inch."""
    x, y = (max(1, round(value / 0.0254)) for value in dpi)
    return png_chunk(b"pHYs", struct.pack(">IIB", x, y, 1))


def insert_png_chunks(png: bytes, chunks: list[bytes]) -> bytes:
    """``png`` with ``chunks`` (complete, from :func:`png_chunk`) placed right after IHDR, where
    every ancillary chunk is allowed (before PLTE and IDAT)."""
    if png_size(png) is None:
        raise ValueError("not a PNG file")
    ihdr_end = len(PNG_SIGNATURE) + 8 + 13 + 4
    return png[:ihdr_end] + b"".join(chunks) + png[ihdr_end:]


def encode_png_gray_alpha(samples: np.ndarray, compression: int = 6) -> bytes:
    """PNG colour type 4 (gray + alpha) from an H×W×2 uint8 or uint16 array: filter type 0
    on every row, one zlib stream, big-endian samples (PNG specification, 7.1 and 9.2)."""
    if samples.ndim != 3 or samples.shape[2] != 2 or samples.dtype not in (np.uint8, np.uint16):
        raise ValueError(f"expected H×W×2 uint8 or uint16 samples, got {samples.shape} {samples.dtype}")
    height, width = samples.shape[:2]
    depth = 8 if samples.dtype == np.uint8 else 16
    rows = np.ascontiguousarray(samples.astype(">u2") if depth == 16 else samples).reshape(height, -1).view(np.uint8)
    raw = np.concatenate([np.zeros((height, 1), np.uint8), rows], axis=1)
    compressor = zlib.compressobj(compression)
    idat = compressor.compress(raw.tobytes()) + compressor.flush()
    header = struct.pack(">IIBBBBB", width, height, depth, 4, 0, 0, 0)
    return PNG_SIGNATURE + png_chunk(b"IHDR", header) + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b"")


# ---------------------------------------------------------------------------------------------
# JPEG

# Start-of-frame markers: C0–CF except DHT (C4), JPG (C8) and DAC (CC).
_SOF_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}


def jpeg_size(data: bytes) -> tuple[int, int] | None:
    """``(width, height)`` from the first frame header, or None when none is found before the
    scan data (or its height is left to a DNL marker)."""
    if not data.startswith(b"\xff\xd8"):
        return None
    position = 2
    while position + 4 <= len(data):
        if data[position] != 0xFF:
            return None
        marker = data[position + 1]
        if marker == 0xFF:  # fill byte
            position += 1
            continue
        if marker == 0x01 or 0xD0 <= marker <= 0xD8:  # markers without a length
            position += 2
            continue
        length = int.from_bytes(data[position + 2 : position + 4], "big")
        if marker in _SOF_MARKERS:
            if position + 9 > len(data):
                return None
            height, width = struct.unpack(">HH", data[position + 5 : position + 9])
            return (width, height) if height else None
        if marker == 0xDA:  # start of scan before any frame header
            return None
        position += 2 + length
    return None


# ---------------------------------------------------------------------------------------------
# WebP


def webp_is_lossless(data: bytes) -> bool:
    """Whether a WebP file's image data is a ``VP8L`` (lossless) bitstream."""
    if len(data) < 16 or data[:4] != b"RIFF" or data[8:12] != b"WEBP":
        return False
    position = 12
    while position + 8 <= len(data):
        kind = data[position : position + 4]
        size = int.from_bytes(data[position + 4 : position + 8], "little")
        if kind in (b"VP8L", b"VP8 "):
            return kind == b"VP8L"
        position += 8 + size + (size & 1)
    return False


# ---------------------------------------------------------------------------------------------
# TIFF

TIFF_ORIENTATION = 274


def _tiff_first_ifd(data: bytes) -> tuple[str, list[tuple[int, int, int, int]]] | None:
    """The byte order and the ``(offset, tag, type, count)`` of each entry of a classic
    (non-Big) TIFF's first IFD that lies inside ``data``; None for anything else."""
    if data[:2] not in (b"II", b"MM") or len(data) < 8:
        return None
    order = "<" if data[:2] == b"II" else ">"
    if struct.unpack(order + "H", data[2:4])[0] != 42:
        return None
    ifd = struct.unpack(order + "I", data[4:8])[0]
    if ifd + 2 > len(data):
        return None
    entries = []
    for index in range(struct.unpack(order + "H", data[ifd : ifd + 2])[0]):
        entry = ifd + 2 + 12 * index
        if entry + 12 > len(data):
            return None
        entries.append((entry, *struct.unpack(order + "HHI", data[entry : entry + 8])))
    return order, entries


def tiff_with_orientation_reset(data: bytes) -> bytes | None:
    """A copy of a classic (non-Big) TIFF whose first IFD's orientation tag reads 1, or None
    when the file has no such tag."""
    parsed = _tiff_first_ifd(data)
    if parsed is None:
        return None
    order, entries = parsed
    for entry, tag, kind, number in entries:
        if tag == TIFF_ORIENTATION and kind == 3 and number == 1:  # one SHORT, stored in the entry
            patched = bytearray(data)
            patched[entry + 8 : entry + 10] = struct.pack(order + "H", 1)
            return bytes(patched)
    return None


def tiff_size(data: bytes) -> tuple[int, int] | None:
    """``(width, height)`` from the first IFD of a classic TIFF (tags 256 and 257), or None when
    the IFD lies beyond ``data`` or the file is a BigTIFF."""
    parsed = _tiff_first_ifd(data)
    if parsed is None:
        return None
    order, entries = parsed
    found: dict[int, int] = {}
    for entry, tag, kind, number in entries:
        if tag in (256, 257) and number == 1 and kind in (3, 4):
            found[tag] = struct.unpack(order + ("H" if kind == 3 else "I"), data[entry + 8 : entry + (10 if kind == 3 else 12)])[0]
    return (found[256], found[257]) if len(found) == 2 else None


# TIFF tags that describe the stored image rather than the photograph; they are written anew by
# the TIFF writer and never copied from one file's EXIF to another file.
TIFF_STRUCTURE_TAGS = frozenset({
    254, 255, 256, 257, 258, 259, 262, 263, 264, 265, 266, 269, 273, 277, 278, 279, 280, 281, 284,
    290, 291, 292, 293, 317, 318, 319, 320, 321, 322, 323, 324, 325, 330, 332, 338, 339, 340, 341,
    347, 351, 512, 513, 514, 515, 517, 518, 519, 520, 521, 529, 530, 531, 532, 700, 33723, 34377,
    34675, 37724, 50341,
})
_EXIF_IFD, _GPS_IFD = 0x8769, 0x8825
_ROWS_PER_STRIP_BYTES = 256 * 1024  # strips of about this many uncompressed bytes


def encode_tiff(
    samples: np.ndarray,
    *,
    alpha: bool = False,
    icc_profile: bytes | None = None,
    xmp: bytes | None = None,
    exif: object | None = None,
    dpi: tuple[float, float] | None = None,
    compression: int = 6,
) -> bytes:
    """A little-endian baseline TIFF of ``samples`` (H×W gray, H×W×2 gray+alpha, H×W×3 RGB or
    H×W×4 RGBA; uint8 or uint16), Adobe Deflate strips (compression 8), unassociated alpha
    (ExtraSamples 2). ``exif`` is a ``PIL.Image.Exif``: its first-IFD tags other than the image
    structure tags are written in the image's IFD, its Exif and GPS IFDs as sub-IFDs."""
    from PIL import TiffImagePlugin, TiffTags

    if samples.dtype not in (np.uint8, np.uint16):
        raise ValueError(f"TIFF samples must be uint8 or uint16, got {samples.dtype}")
    array = samples if samples.ndim == 3 else samples[:, :, None]
    height, width, channels = array.shape
    if channels not in (1, 2, 3, 4):
        raise ValueError(f"cannot write {channels} channels as TIFF")
    bits = 8 if array.dtype == np.uint8 else 16
    row_bytes = width * channels * bits // 8
    rows_per_strip = max(1, min(height, _ROWS_PER_STRIP_BYTES // max(1, row_bytes)))
    raw = np.ascontiguousarray(array.astype("<u2") if bits == 16 else array).reshape(height, -1).view(np.uint8)
    strips = []
    for top in range(0, height, rows_per_strip):
        compressor = zlib.compressobj(compression)
        strips.append(compressor.compress(raw[top : top + rows_per_strip].tobytes()) + compressor.flush())

    ifd = TiffImagePlugin.ImageFileDirectory_v2(prefix=b"II")

    def put(tag: int, value, kind: int) -> None:
        ifd.tagtype[tag] = kind
        ifd[tag] = value

    if exif is not None:
        for tag, value in exif.items():  # type: ignore[attr-defined]
            if tag in TIFF_STRUCTURE_TAGS or tag in (_EXIF_IFD, _GPS_IFD):
                continue
            ifd[tag] = value
        for sub in (_EXIF_IFD, _GPS_IFD):
            if sub in exif:  # type: ignore[operator]
                values = {k: v for k, v in exif.get_ifd(sub).items() if k != 0xA005}  # type: ignore[attr-defined]
                if values:
                    put(sub, values, TiffTags.LONG)
    put(256, width, TiffTags.LONG)
    put(257, height, TiffTags.LONG)
    put(258, (bits,) * channels, TiffTags.SHORT)
    put(259, 8, TiffTags.SHORT)  # Adobe Deflate
    put(262, 2 if channels >= 3 else 1, TiffTags.SHORT)  # RGB or BlackIsZero
    put(277, channels, TiffTags.SHORT)
    put(278, rows_per_strip, TiffTags.LONG)
    put(279, tuple(len(strip) for strip in strips), TiffTags.LONG)
    put(284, 1, TiffTags.SHORT)  # chunky
    if alpha:
        put(338, (2,), TiffTags.SHORT)  # unassociated alpha
    if dpi is not None:
        put(282, (float(dpi[0]),), TiffTags.RATIONAL)
        put(283, (float(dpi[1]),), TiffTags.RATIONAL)
        put(296, 2, TiffTags.SHORT)  # inches
    if icc_profile:
        put(34675, icc_profile, TiffTags.UNDEFINED)
    if xmp:
        put(700, xmp, TiffTags.BYTE)
    # Strip offsets relative to the end of the IFD and its values: ImageFileDirectory_v2.tobytes
    # adds that end to them (the way Pillow's own TIFF writer places strips after the IFD).
    offsets, position = [], 0
    for strip in strips:
        offsets.append(position)
        position += len(strip)
    put(273, tuple(offsets), TiffTags.LONG)
    header = b"II*\x00" + struct.pack("<I", 8)
    return header + ifd.tobytes(len(header)) + b"".join(strips)
