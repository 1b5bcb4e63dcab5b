"""A wide-gamut ICC profile built in the test (Adobe RGB (1998) primaries, D50-adapted, gamma 2.2),
so colour-management tests need no profile file from the system."""

from __future__ import annotations

import struct


def _s15(x: float) -> bytes:
    return struct.pack(">i", round(x * 65536))


def _xyz(x: float, y: float, z: float) -> bytes:
    return b"XYZ " + b"\0" * 4 + _s15(x) + _s15(y) + _s15(z)


def _desc(text: str) -> bytes:
    ascii_ = text.encode("ascii") + b"\0"
    body = b"desc" + b"\0" * 4 + struct.pack(">I", len(ascii_)) + ascii_
    return body + b"\0" * 8 + b"\0" * 3 + b"\0" * 67  # no Unicode, no ScriptCode


def _pad(b: bytes) -> bytes:
    return b + b"\0" * (-len(b) % 4)


def wide_gamut_profile(description: str = "Wide gamut test RGB") -> bytes:
    """ICC v2 display profile (matrix + gamma curves) with Adobe RGB primaries."""
    curve = b"curv" + b"\0" * 4 + struct.pack(">I", 1) + struct.pack(">H", 563) + b"\0\0"  # gamma 563/256
    tags = [
        (b"desc", _desc(description)),
        (b"cprt", b"text" + b"\0" * 4 + b"public domain test profile\0"),
        (b"wtpt", _xyz(0.9642, 1.0, 0.8249)),
        (b"rXYZ", _xyz(0.6097, 0.3111, 0.0195)),
        (b"gXYZ", _xyz(0.2053, 0.6257, 0.0609)),
        (b"bXYZ", _xyz(0.1492, 0.0632, 0.7446)),
        (b"rTRC", curve),
        (b"gTRC", curve),
        (b"bTRC", curve),
    ]
    offset = 128 + 4 + 12 * len(tags)
    table, data = b"", b""
    for sig, body in tags:
        table += sig + struct.pack(">II", offset + len(data), len(body))
        data += _pad(body)
    size = offset + len(data)
    header = (struct.pack(">I", size) + b"\0" * 4 + bytes([2, 0x10, 0, 0]) + b"mntr" + b"RGB " + b"XYZ "
              + b"\0" * 12 + b"acsp" + b"\0" * 24 + struct.pack(">I", 0) + _s15(0.9642) + _s15(1.0) + _s15(0.8249)
              + b"\0" * 48)
    assert len(header) == 128
    return header + struct.pack(">I", len(tags)) + table + data
