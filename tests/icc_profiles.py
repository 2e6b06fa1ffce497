"""ICC profiles built byte by byte for the tests (no profile files ship with the system).

:func:`display_p3_profile` is a version 4 matrix/TRC display profile (ICC.1:2010 sections 7.2
and F.3) with Display P3's primaries, adapted to D50 with the Bradford transform (the colorants
of Apple's Display P3 profile), and the sRGB tone curve as a parametric curve of type 3.
"""

from __future__ import annotations

import struct


def _s15(value: float) -> bytes:
    return struct.pack(">i", round(value * 65536))


def _xyz(x: float, y: float, z: float) -> bytes:
    return b"XYZ \x00\x00\x00\x00" + _s15(x) + _s15(y) + _s15(z)


def _srgb_curve() -> bytes:
    parameters = (2.4, 1 / 1.055, 0.055 / 1.055, 1 / 12.92, 0.04045)
    return b"para\x00\x00\x00\x00" + struct.pack(">HH", 3, 0) + b"".join(_s15(v) for v in parameters)


def _text(text: str) -> bytes:
    """multiLocalizedUnicodeType with one en-US record."""
    utf16 = text.encode("utf-16-be")
    return b"mluc\x00\x00\x00\x00" + struct.pack(">II", 1, 12) + b"enUS" + struct.pack(">II", len(utf16), 28) + utf16


def display_p3_profile(description: str = "Display P3 (test)") -> bytes:
    tags = [
        (b"desc", _text(description)),
        (b"cprt", _text("No copyright, test data")),
        (b"wtpt", _xyz(0.9642, 1.0, 0.8249)),
        (b"rXYZ", _xyz(0.515121, 0.241196, -0.001053)),
        (b"gXYZ", _xyz(0.291977, 0.692245, 0.041885)),
        (b"bXYZ", _xyz(0.157104, 0.066574, 0.784073)),
        (b"rTRC", _srgb_curve()),
        (b"gTRC", _srgb_curve()),
        (b"bTRC", _srgb_curve()),
    ]
    table_size = 4 + 12 * len(tags)
    entries, blobs = b"", b""
    for signature, data in tags:
        data += b"\x00" * (-len(data) % 4)
        entries += signature + struct.pack(">II", 128 + table_size + len(blobs), len(data))
        blobs += data
    size = 128 + table_size + len(blobs)
    header = (
        struct.pack(">I", size) + b"lcms" + struct.pack(">I", 0x04300000) + b"mntr" + b"RGB " + b"XYZ "
        + struct.pack(">6H", 2024, 1, 1, 0, 0, 0) + b"acsp" + b"APPL" + b"\x00" * 4 + b"\x00" * 4 + b"\x00" * 4
        + b"\x00" * 8 + struct.pack(">I", 0) + _s15(0.9642) + _s15(1.0) + _s15(0.8249) + b"lcms" + b"\x00" * 16
        + b"\x00" * 28
    )
    assert len(header) == 128
    return header + struct.pack(">I", len(tags)) + entries + blobs
