"""Build LiME dumps from (start address, bytes) ranges, written from LiME ``src/lime.h``
(FORMATS.md §4.2): each range is a 32-byte little-endian header (magic "EMiL", version 1,
s_addr, inclusive e_addr, 8 reserved bytes) followed by its bytes; ranges need not be aligned."""

from __future__ import annotations

import struct

LIME_MAGIC = 0x4C694D45
HEADER_SIZE = 32


def lime_range(
    s_addr: int,
    data: bytes,
    *,
    e_addr: int | None = None,
    version: int = 1,
    magic: int = LIME_MAGIC,
) -> bytes:
    """One range: header + data; ``e_addr`` overrides the inclusive end (lying headers)."""
    end = e_addr if e_addr is not None else s_addr + len(data) - 1
    return struct.pack("<IIQQ8s", magic, version, s_addr, end, bytes(8)) + data


def build_lime(ranges: list[tuple[int, bytes]]) -> bytes:
    """A LiME file of the given ranges, in the order given."""
    return b"".join(lime_range(s, d) for s, d in ranges)
