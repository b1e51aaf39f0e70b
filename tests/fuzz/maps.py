"""Maps (:class:`~tests.fuzz.layout.Layout`) of the non-ELF formats, from their specs.

kdump: makedumpfile ``diskdump_mod.h`` / ``makedumpfile.h``; QEMU streams: ``migration/savevm.c``
and ``migration/ram.c``; LiME: ``src/lime.h``; libvirt save: ``qemu_saveimage.h``
(FORMATS.md has the same tables).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from tests.fuzz.layout import Layout, u

# disk_dump_header (after the 8-byte signature), 64-bit and 32-bit word sizes.
_KDUMP_HEADER = {
    "64": (("header_version", 8), ("status", 424), ("block_size", 428), ("sub_hdr_size", 432),
           ("bitmap_blocks", 436), ("max_mapnr", 440), ("nr_cpus", 460)),
    "32": (("header_version", 8), ("status", 412), ("block_size", 416), ("sub_hdr_size", 420),
           ("bitmap_blocks", 424), ("max_mapnr", 428), ("nr_cpus", 448)),
}  # fmt: skip
_KDUMP_SUB = {
    "64": (("phys_base", 0, 8), ("dump_level", 8, 4), ("split", 12, 4), ("start_pfn", 16, 8),
           ("end_pfn", 24, 8), ("offset_vmcoreinfo", 32, 8), ("size_vmcoreinfo", 40, 8),
           ("offset_note", 48, 8), ("size_note", 56, 8), ("start_pfn_64", 80, 8),
           ("end_pfn_64", 88, 8), ("max_mapnr_64", 96, 8)),
    "32": (("phys_base", 0, 4), ("dump_level", 4, 4), ("split", 8, 4), ("start_pfn", 12, 4),
           ("end_pfn", 16, 4), ("offset_vmcoreinfo", 20, 8), ("size_vmcoreinfo", 28, 4),
           ("offset_note", 32, 8), ("size_note", 40, 4), ("start_pfn_64", 56, 8),
           ("end_pfn_64", 64, 8), ("max_mapnr_64", 72, 8)),
}  # fmt: skip
PAGE = 4096


def kdump_layout(data: bytes, word: str = "64", order: str = "<") -> Layout:
    """A plain kdump file: header, sub-header, bitmaps, page descriptors and each page's data."""
    lay = Layout()
    fields = dict(_KDUMP_HEADER[word])
    for name, off in _KDUMP_HEADER[word]:
        lay.int(off, 4, order, f"header.{name}")
    lay.region(0, 8, "signature")
    block = u(data, fields["block_size"], 4, order)
    sub_blocks = u(data, fields["sub_hdr_size"], 4, order)
    bitmap_blocks = u(data, fields["bitmap_blocks"], 4, order)
    lay.region(0, fields["nr_cpus"] + 4, "header")
    for name, off, size in _KDUMP_SUB[word]:
        lay.int(block + off, size, order, f"sub.{name}")
    lay.region(block, sub_blocks * block, "sub-header")
    bitmap_at = (1 + sub_blocks) * block
    half = bitmap_blocks * block // 2
    lay.region(bitmap_at, half, "bitmap1")
    lay.region(bitmap_at + half, half, "bitmap2")
    desc_at = bitmap_at + bitmap_blocks * block
    bitmap2 = data[bitmap_at + half : bitmap_at + 2 * half]
    dumped = sum(bin(b).count("1") for b in bitmap2)
    for i in range(dumped):
        at = desc_at + 24 * i
        if at + 24 > len(data):
            break
        lay.int(at, 8, order, f"desc[{i}].offset")
        lay.int(at + 8, 4, order, f"desc[{i}].size")
        lay.int(at + 12, 4, order, f"desc[{i}].flags")
        lay.int(at + 16, 8, order, f"desc[{i}].page_flags")
        lay.record(at, 24, f"desc[{i}]")
        offset, size, flags = struct.unpack_from(order + "qII", data, at)
        lay.region(offset, size, "compressed page" if flags else "page")
    lay.region(desc_at, 24 * dumped, "descriptors")
    return lay


def flat_layout(flat: bytes, plain: Layout) -> Layout:
    """A makedumpfile flattened stream: its header, each record's header, and the plain file's
    map carried to where each piece landed (fields that cross a record are left out)."""
    lay = Layout()
    lay.region(0, 16, "flat.signature")
    lay.int(16, 8, ">", "flat.type")
    lay.int(24, 8, ">", "flat.version")
    pieces: list[tuple[int, int, int]] = []  # (plain offset, length, flat offset)
    pos = 4096
    k = 0
    while pos + 16 <= len(flat):
        offset, size = struct.unpack_from(">qq", flat, pos)
        lay.int(pos, 8, ">", f"record[{k}].offset")
        lay.int(pos + 8, 8, ">", f"record[{k}].size")
        if offset < 0:
            lay.cuts.add(pos)
            break
        lay.record(pos, 16 + size, f"record[{k}]")
        pieces.append((offset, size, pos + 16))
        pos += 16 + size
        k += 1

    def where(offset: int, length: int) -> int | None:
        for start, size, at in pieces:
            if start <= offset and offset + length <= start + size:
                return at + offset - start
        return None

    for f in plain.fields:
        at = where(f.offset, f.size)
        if at is not None:
            lay.int(at, f.size, f.order, f.name)
    for r in plain.regions:
        at = where(r.offset, min(r.length, 16))
        if at is not None:
            lay.region(at, min(r.length, len(flat) - at), r.name)
    return lay


def lime_layout(data: bytes) -> Layout:
    lay = Layout()
    pos = 0
    k = 0
    while pos + 32 <= len(data):
        start, end = struct.unpack_from("<QQ", data, pos + 8)
        lay.int(pos, 4, "<", f"range[{k}].magic")
        lay.int(pos + 4, 4, "<", f"range[{k}].version")
        lay.int(pos + 8, 8, "<", f"range[{k}].s_addr")
        lay.int(pos + 16, 8, "<", f"range[{k}].e_addr")
        length = end - start + 1
        lay.region(pos, 32, "range header")
        lay.region(pos + 32, length, "range data")
        lay.record(pos, 32 + length, f"range[{k}]")
        pos += 32 + length
        k += 1
    return lay


def libvirt_layout(data: bytes, order: str = "<") -> tuple[Layout, int]:
    """The save header and XML area; returns the map and where the QEMU stream starts."""
    lay = Layout()
    lay.region(0, 16, "magic")
    for name, off in (("version", 16), ("data_len", 20), ("was_running", 24), ("compressed", 28)):
        lay.int(off, 4, order, f"save.{name}")
    lay.int(32, 4, order, "save.cookie_offset")
    data_len = u(data, 20, 4, order)
    lay.region(92, data_len, "domain xml")
    return lay, 92 + data_len


# -- QEMU migration stream ---------------------------------------------------------------------------

ZERO, MEM_SIZE, PAGE_FLAG, EOS, CONTINUE, COMPRESS, MULTIFD_FLUSH = 0x2, 0x4, 0x8, 0x10, 0x20, 0x100, 0x200


@dataclass
class StreamRecord:
    """One RAM page record of a stream: where it is and what it holds."""

    at: int
    end: int
    block: bytes
    page: int
    flags: int


@dataclass
class StreamMap:
    layout: Layout
    #: (name, length, offset of the be64 length) of each MEM_SIZE block.
    blocks: list[tuple[bytes, int, int]]
    records: list[StreamRecord]
    #: Offset of the MEM_SIZE item, and of the first byte after the RAM section's END data.
    mem_size_at: int
    ram_end: int


class _Stop(Exception):
    pass


def stream_map(data: bytes, start: int = 0) -> StreamMap:
    """Walk a (precopy, not mapped-ram) QEMU stream from ``start`` up to its RAM END section."""
    lay = Layout()
    lay.region(start, 4, "QEVM")
    lay.int(start + 4, 4, ">", "stream.version")
    blocks: list[tuple[bytes, int, int]] = []
    records: list[StreamRecord] = []
    mem_size_at = -1
    p = start + 8
    current = b""
    ram_end = len(data)

    def name_at(q: int) -> tuple[bytes, int]:
        n = data[q]
        return data[q + 1 : q + 1 + n], q + 1 + n

    try:
        while p < len(data):
            kind = data[p]
            rec = p
            if kind == 0x07:
                length = u(data, p + 1, 4, ">")
                lay.int(p + 1, 4, ">", "config.length")
                p += 5 + length
                while data[p] == 0x05:  # configuration subsections (capabilities, uuid, page bits)
                    sub, q = name_at(p + 1)
                    lay.int(q, 4, ">", "config.subsection.version")
                    if sub == b"configuration/capabilities":
                        count = u(data, q + 4, 4, ">")
                        lay.int(q + 4, 4, ">", "config.capabilities.count")
                        q += 8
                        for _ in range(count):
                            _, q = name_at(q)
                    elif sub == b"configuration/uuid":
                        q += 4 + 16
                    elif sub == b"configuration/target-page-bits":
                        lay.int(q + 4, 4, ">", "config.page_bits")
                        q += 8
                    else:
                        raise _Stop
                    lay.record(p, q - p, "config subsection")
                    p = q
            elif kind in (0x01, 0x04):
                lay.int(p + 1, 4, ">", "section.id")
                idstr, q = name_at(p + 5)
                lay.int(q, 4, ">", "section.instance")
                lay.int(q + 4, 4, ">", "section.version")
                if idstr != b"ram":
                    ram_end = p
                    break
                p, current, mem_size_at = _ram(data, q + 8, lay, blocks, records, current, mem_size_at)
            elif kind in (0x02, 0x03):
                lay.int(p + 1, 4, ">", "section.id")
                p, current, mem_size_at = _ram(data, p + 5, lay, blocks, records, current, mem_size_at)
                if kind == 0x03:
                    ram_end = p
                    if p < len(data) and data[p] == 0x7E:
                        ram_end = p + 5
                    break
            elif kind == 0x7E:
                lay.int(p + 1, 4, ">", "footer.section_id")
                p += 5
            elif kind == 0x08:
                p += 5 + u(data, p + 3, 2, ">")
            else:
                ram_end = p
                break
            lay.cuts.add(rec)
    except (_Stop, IndexError, struct.error):
        pass
    lay.cuts.add(ram_end)
    return StreamMap(lay, blocks, records, mem_size_at, ram_end)


def _ram(
    data: bytes,
    p: int,
    lay: Layout,
    blocks: list[tuple[bytes, int, int]],
    records: list[StreamRecord],
    current: bytes,
    mem_size_at: int,
) -> tuple[int, bytes, int]:
    """RAM items up to EOS (and a footer after it)."""
    while True:
        rec = p
        item = u(data, p, 8, ">")
        flags = item & 0xFFF
        kind = flags & ~CONTINUE
        if len(records) < 64 or len(records) % 17 == 0:
            lay.int(p, 8, ">", "ram.item")
        p += 8
        if kind == EOS:
            lay.cuts.add(rec)
            break
        if kind == MEM_SIZE:
            mem_size_at = rec
            lay.int(rec, 8, ">", "ram.mem_size")
            left = item & ~0xFFF
            while left > 0:
                name_len = data[p]
                lay.int(p, 1, ">", "mem_size.name_length")
                name = data[p + 1 : p + 1 + name_len]
                p += 1 + name_len
                length = u(data, p, 8, ">")
                lay.int(p, 8, ">", "mem_size.block_length")
                blocks.append((name, length, p))
                p += 8
                left -= length
            continue
        if kind == MULTIFD_FLUSH:
            continue
        if not flags & CONTINUE:
            n = data[p]
            lay.int(p, 1, ">", "ram.block_name_length")
            current = data[p + 1 : p + 1 + n]
            p += 1 + n
        if kind == ZERO:
            lay.int(p, 1, ">", "ram.zero_fill")
            p += 1
        elif kind == PAGE_FLAG:
            lay.region(p, PAGE, "page")
            p += PAGE
        elif kind == COMPRESS:
            length = u(data, p, 4, ">")
            lay.int(p, 4, ">", "ram.compressed_length")
            lay.region(p + 4, length, "compressed page")
            p += 4 + length
        else:
            raise _Stop
        records.append(StreamRecord(rec, p, current, item >> 12, flags))
        lay.record(rec, p - rec, "page record")
    if p < len(data) and data[p] == 0x7E:
        lay.int(p + 1, 4, ">", "footer.section_id")
        p += 5
    return p, current, mem_size_at
