"""LiME (Linux Memory Extractor) dumps in ``format=lime``.

Sources: 504ensicsLabs/LiME ``src/lime.h`` and ``src/main.c`` (the writer), volatility3
``framework/layers/lime.py`` (a reader); FORMATS.md §4.2.

The file is a sequence of ranges, each a 32-byte header (host byte order, little endian on every
platform LiME runs on: ``u32 magic 0x4C694D45 ("EMiL"), u32 version 1, u64 s_addr, u64 e_addr``
(inclusive), ``u8 reserved[8]``) followed by the ``e_addr - s_addr + 1`` bytes of that physical
range.  Ranges come from /proc/iomem "System RAM" and need not be page aligned (a typical x86
first range is 0x1000-0x9fbff).  A page that ranges cover only in part is present and its
uncovered bytes are zero (LiME itself writes zeros for what it cannot read); pages no range
touches are absent.  ``format=padded`` output is a raw image (see ``raw``); ``format=raw`` has no
headers and cannot be mapped without the machine's /proc/iomem.
"""

from __future__ import annotations

import itertools
import struct

from dengine_cli.errors import UnsupportedFeature
from dengine_cli.formats.base import (
    Dump,
    GuestFacts,
    OpenOptions,
    PageTableDump,
    Source,
    extent_page_table,
    map_file,
)
from dengine_cli.formats.registry import FormatSpec
from dengine_cli.pages import PAGE_SIZE

#: lime_mem_range_header (lime.h): magic, version, s_addr, e_addr (inclusive), reserved[8].
RANGE_HEADER = struct.Struct("<IIQQ8s")
LIME_MAGIC = 0x4C694D45
LIME_MAGIC_BYTES = struct.pack("<I", LIME_MAGIC)
LIME_VERSION = 1


def probe(head: bytes, size: int) -> bool:
    """A LiME file starts with the magic of its first range header."""
    return head[:4] == LIME_MAGIC_BYTES and size >= RANGE_HEADER.size


def open_lime(source: Source, options: OpenOptions) -> Dump:
    buf = map_file(source)
    pos = source.start
    ranges: list[tuple[int, int, int, int]] = []  # (s_addr, length, data offset, header offset)
    while pos < len(buf):
        if len(buf) - pos < RANGE_HEADER.size:
            raise source.error(
                pos,
                expected=f"a {RANGE_HEADER.size}-byte LiME range header",
                found=f"{len(buf) - pos} bytes before the end of file",
            )
        magic, version, s_addr, e_addr, _ = RANGE_HEADER.unpack(buf[pos : pos + RANGE_HEADER.size].tobytes())
        if magic != LIME_MAGIC:
            raise source.error(pos, expected=f"LiME magic {LIME_MAGIC:#x} (EMiL)", found=f"{magic:#x}")
        if version != LIME_VERSION:
            raise UnsupportedFeature(source.name, pos + 4, feature=f"LiME version {version}")
        if e_addr < s_addr:
            raise source.error(
                pos + 16,
                expected=f"e_addr >= s_addr {s_addr:#x}",
                found=f"e_addr {e_addr:#x}",
            )
        length = e_addr - s_addr + 1
        data_at = pos + RANGE_HEADER.size
        if length > len(buf) - data_at:
            raise source.error(
                pos,
                expected=f"range {s_addr:#x}-{e_addr:#x} ({length:#x} bytes) after its header",
                found=f"end of file at {len(buf):#x}",
            )
        ranges.append((s_addr, length, data_at, pos))
        pos = data_at + length
    if not ranges:
        raise source.error(source.start, expected="a LiME range header", found="an empty file")

    by_addr = sorted(ranges)
    for (a, n, _, _), (b, _, _, header_at) in itertools.pairwise(by_addr):
        if b < a + n:
            raise source.error(
                header_at,
                expected="LiME ranges not overlapping",
                found=f"range at {b:#x} inside range {a:#x}-{a + n - 1:#x}",
            )
    gfns, offsets, side = extent_page_table(
        buf, [r[0] for r in ranges], [r[1] for r in ranges], [r[2] for r in ranges]
    )
    facts = GuestFacts(format="lime", memory_bytes=len(gfns) * PAGE_SIZE)
    facts.extra["ranges"] = len(ranges)
    if len(side):
        facts.extra["partial_pages"] = len(side)
    return PageTableDump(source, facts, buf, gfns, offsets, side)


FORMAT = FormatSpec(
    name="lime",
    description="LiME memory dump (format=lime: ranges with 32-byte EMiL headers)",
    probe=probe,
    open=open_lime,
)
