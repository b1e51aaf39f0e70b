"""Write kdump-compressed files (and makedumpfile's flattened stream of them) from a small
description, following FORMATS.md §2.2-§2.3 (makedumpfile ``diskdump_mod.h``, QEMU
``dump/dump.c``), not the reader.

``build_kdump({gfn: page}, excluded={...}, codec="lzo")`` gives a :class:`KdumpFile` whose
``data`` is a plain kdump file; ``flatten(kf)`` turns it into the flattened stream QEMU writes:
the header, then the two bitmaps in interleaved 4 KiB pieces, then page descriptors and page data
in 16 KiB records (so compressed pages cross record boundaries).
"""

from __future__ import annotations

import random
import struct
import zlib
from dataclasses import dataclass, field

import cramjam
import zstandard

from tests.builders import lzo

PAGE = 4096
FLAG = {"none": 0, "zlib": 0x1, "lzo": 0x2, "snappy": 0x4, "zstd": 0x20}
INCOMPLETE = 0x8


def compress(codec: str, page: bytes) -> bytes:
    """One page as the kdump writers compress it (raw blocks for lzo and snappy)."""
    if codec == "zlib":
        return zlib.compress(page, 1)
    if codec == "lzo":
        return lzo.compress(page)
    if codec == "snappy":
        return bytes(cramjam.snappy.compress_raw(page))
    if codec == "zstd":
        return zstandard.ZstdCompressor(level=1).compress(page)
    raise ValueError(codec)


@dataclass
class KdumpFile:
    """A built kdump file and where its parts are (offset, length), in QEMU's write order."""

    data: bytes
    regions: dict[str, tuple[int, int]] = field(default_factory=dict)
    #: Absolute offset of each present gfn's descriptor.
    desc_at: dict[int, int] = field(default_factory=dict)
    #: Data offset of each present gfn's page.
    data_at: dict[int, int] = field(default_factory=dict)


def _utsname(fields: dict[str, str]) -> bytes:
    names = ("sysname", "nodename", "release", "version", "machine", "domainname")
    return b"".join(fields.get(n, "").encode().ljust(65, b"\0")[:65] for n in names)


def build_kdump(
    pages: dict[int, bytes],
    *,
    excluded: set[int] | frozenset[int] = frozenset(),
    codec: str | dict[int, str] = "zlib",
    fallback: bool = True,
    layout: str = "64",
    machine: str = "x86_64",
    utsname: dict[str, str] | None = None,
    header_version: int = 6,
    block_size: int = PAGE,
    max_mapnr: int | None = None,
    shared_zero: bool = False,
    incomplete: set[int] | frozenset[int] | None = None,
    signature: bytes = b"KDUMP   ",
    split: tuple[int, int] | None = None,
    vmcoreinfo: bytes | None = None,
    nr_cpus: int = 1,
    dump_level: int = 1,
    desc_override: dict[int, tuple[int, int, int]] | None = None,
    big_endian: bool = False,
    bitmap_blocks: int | None = None,
) -> KdumpFile:
    """A kdump file holding ``pages`` (gfn -> 4096 bytes); ``excluded`` gfns exist in the 1st
    bitmap only.  ``codec``: "zlib"/"lzo"/"snappy"/"zstd"/"none", or one per gfn; with
    ``fallback`` a page that does not shrink is stored as is (as the writers do).
    ``shared_zero``: every zero page points at one stored zero page, as QEMU does.
    ``incomplete``: set the INCOMPLETE status and give these present gfns offset 0.
    ``utsname``: fields besides the machine (default: a Linux kernel's; ``{}`` = QEMU's empty
    ones).  ``layout``: "64" or "32" (packed IA-32 sub-header).  ``split``: (start_pfn, end_pfn) of a
    split dump: only those pfns get descriptors.  ``desc_override``: gfn -> (offset, size, flags)
    written instead of the real descriptor."""
    e = ">" if big_endian else "<"
    present = sorted(pages)
    all_gfns = sorted(set(present) | set(excluded))
    if max_mapnr is None:
        max_mapnr = (all_gfns[-1] + 1) if all_gfns else 1
    bitmap_bytes = -(-max(max_mapnr, 1) // 8)
    half_blocks = -(-bitmap_bytes // block_size)
    if bitmap_blocks is None:
        bitmap_blocks = 2 * half_blocks
    half = half_blocks * block_size
    bitmap1 = bytearray(half)
    bitmap2 = bytearray(half)
    for g in all_gfns:
        bitmap1[g >> 3] |= 1 << (g & 7)
    for g in present:
        bitmap2[g >> 3] |= 1 << (g & 7)

    # Sub-header (and VMCOREINFO after it, as QEMU places notes).
    sub_fmt = e + "QiiQQQQQQQQQQQ" if layout == "64" else e + "IiiIIQIQIQIQQQ"  # phys_base .. max_mapnr_64
    sub_len = struct.calcsize(sub_fmt)
    vmci_off = block_size + sub_len if vmcoreinfo else 0
    sub_total = sub_len + (len(vmcoreinfo) if vmcoreinfo else 0)
    sub_hdr_size = -(-sub_total // block_size)
    start_pfn, end_pfn = split if split else (0, max_mapnr)
    sub = struct.pack(
        sub_fmt,
        0x1000000,  # phys_base: readers must not use it
        dump_level,
        1 if split else 0,
        start_pfn & 0xFFFFFFFF,
        end_pfn & 0xFFFFFFFF,
        vmci_off,
        len(vmcoreinfo) if vmcoreinfo else 0,
        0,
        0,
        0,
        0,
        start_pfn,
        end_pfn,
        max_mapnr,
    )

    bitmap_off = (1 + sub_hdr_size) * block_size
    desc_off = bitmap_off + bitmap_blocks * block_size
    described = [g for g in present if start_pfn <= g < end_pfn]
    data_off = desc_off + 24 * len(described)
    data = bytearray()
    descs = bytearray()
    out = KdumpFile(b"")
    zero_at = None
    if shared_zero:
        zero_at = data_off
        data += bytes(PAGE)
    used_flags = 0
    for i, g in enumerate(described):
        page = pages[g]
        assert len(page) == PAGE
        c = codec if isinstance(codec, str) else codec.get(g, "none")
        if shared_zero and page == bytes(PAGE):
            off, size, flags = zero_at, PAGE, 0
        else:
            blob = page if c == "none" else compress(c, page)
            flags = FLAG[c]
            if fallback and len(blob) >= PAGE:
                blob, flags = page, 0
            off, size = data_off + len(data), len(blob)
            data += blob
        used_flags |= flags
        if incomplete and g in incomplete:
            off = 0
        if desc_override and g in desc_override:
            off, size, flags = desc_override[g]
        out.desc_at[g] = desc_off + 24 * i
        out.data_at[g] = off
        descs += struct.pack(e + "qIIQ", off, size, flags, 0)

    status = (FLAG[codec] if isinstance(codec, str) else used_flags) & 0x27
    if incomplete is not None:
        status |= INCOMPLETE
    # makedumpfile copies the crashed kernel's utsname; QEMU fills in only the machine.
    linux = {"sysname": "Linux", "nodename": "guest", "release": "6.1.0-test", "version": "#1 SMP"}
    uts = _utsname({"machine": machine, **(linux if utsname is None else utsname)})
    if layout == "64":
        header = (
            signature
            + struct.pack(e + "i", header_version)
            + uts
            + bytes(6)
            + bytes(16)
            + struct.pack(
                e + "IiiIIIIIIi",
                status,
                block_size,
                sub_hdr_size,
                bitmap_blocks,
                min(max_mapnr, 0xFFFFFFFF),
                0,
                0,
                0,
                0,
                nr_cpus,
            )
        )
        assert len(header) == 464
    else:
        header = (
            signature
            + struct.pack(e + "i", header_version)
            + uts
            + bytes(2)
            + bytes(8)
            + struct.pack(
                e + "IiiIIIIIIi",
                status,
                block_size,
                sub_hdr_size,
                bitmap_blocks,
                min(max_mapnr, 0xFFFFFFFF),
                0,
                0,
                0,
                0,
                nr_cpus,
            )
        )
        assert len(header) == 452

    f = bytearray(block_size)
    f[: len(header)] = header
    f += bytes(sub_hdr_size * block_size)
    f[block_size : block_size + sub_len] = sub
    if vmcoreinfo:
        f[vmci_off : vmci_off + len(vmcoreinfo)] = vmcoreinfo
    if bitmap_blocks * block_size >= 2 * half:
        f += bitmap1
        f += bitmap2
    else:  # old diskdump: one bitmap, of the dumped pages
        f += bitmap2
    f += bytes(bitmap_off + bitmap_blocks * block_size - len(f))
    del f[desc_off:]
    f += descs
    f += data
    out.data = bytes(f)
    out.regions = {
        "header": (0, len(header)),
        "sub": (block_size, sub_total),
        "bitmap1": (bitmap_off, half),
        "bitmap2": (bitmap_off + half, half),
        "desc": (desc_off, len(descs)),
        "data": (data_off, len(data)),
    }
    return out


def flat_header() -> bytes:
    """makedumpfile_header: signature, type 1, version 1 (big-endian), padded to 4096 bytes."""
    return (b"makedumpfile".ljust(16, b"\0") + struct.pack(">qq", 1, 1)).ljust(4096, b"\0")


def record(offset: int, payload: bytes) -> bytes:
    return struct.pack(">qq", offset, len(payload)) + payload


def end_marker() -> bytes:
    return struct.pack(">qq", -1, -1)


def flatten(
    kf: KdumpFile, *, chunk: int = 16384, shuffle_seed: int | None = None, terminate: bool = True
) -> bytes:
    """The flattened stream of ``kf`` in QEMU's write order: header and sub-header records, the
    two bitmaps in alternating 4 KiB pieces, then descriptors and page data in ``chunk``-byte
    records, interleaved.  ``shuffle_seed`` shuffles all records (any order is valid)."""
    d = kf.data
    recs: list[tuple[int, int]] = []
    h_off, h_len = kf.regions["header"]
    recs.append((h_off, h_len))
    s_off, s_len = kf.regions["sub"]
    recs.append((s_off, s_len))
    b1, half = kf.regions["bitmap1"]
    b2, _ = kf.regions["bitmap2"]
    for k in range(0, half, PAGE):
        recs.append((b1 + k, min(PAGE, half - k)))
        recs.append((b2 + k, min(PAGE, half - k)))
    dd, dl = kf.regions["desc"]
    pd, pl = kf.regions["data"]
    desc_chunks = [(dd + k, min(chunk, dl - k)) for k in range(0, dl, chunk)]
    data_chunks = [(pd + k, min(chunk, pl - k)) for k in range(0, pl, chunk)]
    for i in range(max(len(desc_chunks), len(data_chunks))):
        if i < len(data_chunks):
            recs.append(data_chunks[i])
        if i < len(desc_chunks):
            recs.append(desc_chunks[i])
    recs = [r for r in recs if r[1] > 0]
    if shuffle_seed is not None:
        random.Random(shuffle_seed).shuffle(recs)
    out = bytearray(flat_header())
    for off, length in recs:
        out += record(off, d[off : off + length])
    if terminate:
        out += end_marker()
    return bytes(out)


def reassemble(flat: bytes) -> bytes:
    """What ``makedumpfile -R`` makes of a flattened stream (for the oracle, which cannot read
    flattened files): apply every record in order to a zero-filled file."""
    pos = 4096
    out = bytearray()
    while True:
        off, size = struct.unpack_from(">qq", flat, pos)
        pos += 16
        if off == -1:
            return bytes(out)
        if len(out) < off + size:
            out += bytes(off + size - len(out))
        out[off : off + size] = flat[pos : pos + size]
        pos += size
