"""kdump-compressed ("diskdump") files, plain or in makedumpfile's flattened stream.

What QEMU ``dump-guest-memory -f kdump-*`` and ``virsh dump --memory-only --format kdump-*``
write (always flattened, FORMATS.md §2.2-§2.3), and what makedumpfile writes (plain, or
flattened with ``-F``).

Sources: makedumpfile ``diskdump_mod.h``, ``makedumpfile.h`` (flattened headers),
``makedumpfile.c``; QEMU ``dump/dump.c`` (``create_header32/64``, ``write_dump_bitmap``,
``write_dump_pages``) and ``include/sysemu/dump.h``; libkdumpfile ``src/kdumpfile/diskdump.c``;
crash ``diskdump.c``.

Layout (block = ``block_size`` bytes): block 0 holds ``disk_dump_header``; blocks
``1 .. 1+sub_hdr_size`` the ``kdump_sub_header`` (and notes); then ``bitmap_blocks`` blocks of
two bitmaps of equal length (1st: the page exists, 2nd: the page is dumped); then one 24-byte
``page_desc`` per dumped page in pfn order; then page data.  The page of pfn ``p`` is described by
descriptor number "set bits of the 2nd bitmap below ``p``".  The bitmaps cover ``max_mapnr`` bits
(rounded up to a block); a ``max_mapnr`` of 0, or one below a bit the bitmaps set, is an error.

A flattened file is a 4096-byte ``makedumpfile_header`` then records ``{i64 offset; i64 size}``
(big-endian) each followed by ``size`` bytes that belong at ``offset`` of the kdump file, ended by
an offset of -1.  It is read in place: the records are indexed once and every offset of the kdump
file is translated to an offset of the flattened file; data crossing records is assembled.  A
flattened stream may hold an ELF vmcore instead (``makedumpfile -F -E``): it is handed to the ELF
reader (:func:`dengine_cli.formats.elf.open_flattened_elf`) with the same record index.
"""

from __future__ import annotations

import dataclasses
import os
import re
import struct
import threading
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import zstandard

from dengine_cli.arrays import unique
from dengine_cli.errors import FormatError, UnreadableFile, UnsupportedFeature
from dengine_cli.formats import elf, x86
from dengine_cli.formats.base import Dump, GuestFacts, OpenOptions, PageBatch, Source, map_file
from dengine_cli.formats.registry import FormatSpec
from dengine_cli.pages import BATCH_PAGES, PAGE_SIZE, GfnArray, OffsetArray, PageArray

# --- makedumpfile diskdump_mod.h -------------------------------------------------------------------
KDUMP_SIGNATURE = b"KDUMP   "
DISKDUMP_SIGNATURE = b"DISKDUMP"
#: ``disk_dump_header.status`` bit: the dump stopped early (ENOSPC); descriptors with offset 0 are
#: pages that were never written.
DUMP_DH_COMPRESSED_INCOMPLETE = 0x8
#: ``page_desc.flags`` values (one codec per page; 0 = stored as is).
DUMP_DH_COMPRESSED_ZLIB = 0x1
DUMP_DH_COMPRESSED_LZO = 0x2
DUMP_DH_COMPRESSED_SNAPPY = 0x4
DUMP_DH_COMPRESSED_ZSTD = 0x20
KNOWN_PAGE_FLAGS = (
    DUMP_DH_COMPRESSED_ZLIB | DUMP_DH_COMPRESSED_LZO | DUMP_DH_COMPRESSED_SNAPPY | DUMP_DH_COMPRESSED_ZSTD
)
#: Highest ``header_version`` whose layout is known (makedumpfile and QEMU write 6).
MAX_HEADER_VERSION = 6

# --- makedumpfile makedumpfile.h: the flattened stream ----------------------------------------------
FLAT_SIGNATURE = b"makedumpfile".ljust(16, b"\0")
FLAT_HEADER_SIZE = 4096  # MAX_SIZE_MDF_HEADER
FLAT_TYPE = 1  # TYPE_FLAT_HEADER
FLAT_VERSION = 1  # VERSION_FLAT_HEADER
FLAT_RECORD = struct.Struct(">qq")  # makedumpfile_data_header: offset, buf_size
FLAT_END = -1  # END_FLAG_FLAT_HEADER

#: Codec numbers used internally, one byte per page.
RAW, ZLIB, LZO, SNAPPY, ZSTD = 0, 1, 2, 3, 4
#: A stored page shared by several descriptors that holds only zeros (QEMU's shared zero page):
#: left as the zeros of a fresh ``np.zeros`` batch, never copied.
SHARED_ZERO = 5
CODEC_NAMES = {ZLIB: "zlib", LZO: "lzo", SNAPPY: "snappy", ZSTD: "zstd"}


@dataclass(frozen=True)
class HeaderLayout:
    """Where ``disk_dump_header`` and ``kdump_sub_header`` keep their fields for one word size.

    ``sub`` maps a sub-header field name to (offset, struct code); the codes are unsigned."""

    name: str
    size: int
    status: int
    block_size: int
    sub_hdr_size: int
    bitmap_blocks: int
    max_mapnr: int
    nr_cpus: int
    sub: dict[str, tuple[int, str]]


#: 64-bit dumped architectures: ``struct timeval`` of two longs, ``unsigned long`` = 8 bytes.
LAYOUT_64 = HeaderLayout(
    "64-bit", 464, 424, 428, 432, 436, 440, 460,
    {
        "phys_base": (0, "Q"), "dump_level": (8, "i"), "split": (12, "i"),
        "start_pfn": (16, "Q"), "end_pfn": (24, "Q"),
        "offset_vmcoreinfo": (32, "Q"), "size_vmcoreinfo": (40, "Q"),
        "offset_note": (48, "Q"), "size_note": (56, "Q"),
        "offset_eraseinfo": (64, "Q"), "size_eraseinfo": (72, "Q"),
        "start_pfn_64": (80, "Q"), "end_pfn_64": (88, "Q"), "max_mapnr_64": (96, "Q"),
    },
)  # fmt: skip
#: 32-bit dumped architectures with 64-bit fields aligned to 4 (IA-32; QEMU's packed
#: ``KdumpSubHeader32``).
LAYOUT_32 = HeaderLayout(
    "32-bit", 452, 412, 416, 420, 424, 428, 448,
    {
        "phys_base": (0, "I"), "dump_level": (4, "i"), "split": (8, "i"),
        "start_pfn": (12, "I"), "end_pfn": (16, "I"),
        "offset_vmcoreinfo": (20, "Q"), "size_vmcoreinfo": (28, "I"),
        "offset_note": (32, "Q"), "size_note": (40, "I"),
        "offset_eraseinfo": (44, "Q"), "size_eraseinfo": (52, "I"),
        "start_pfn_64": (56, "Q"), "end_pfn_64": (64, "Q"), "max_mapnr_64": (72, "Q"),
    },
)  # fmt: skip
#: 32-bit architectures that align 64-bit fields to 8 (ARM EABI, PowerPC...): the sub-header gets
#: padding (libkdumpfile ``kdump_sub_header_32pad``); the main header is the same as LAYOUT_32.
SUB_32PAD = {
    "phys_base": (0, "I"), "dump_level": (4, "i"), "split": (8, "i"),
    "start_pfn": (12, "I"), "end_pfn": (16, "I"),
    "offset_vmcoreinfo": (24, "Q"), "size_vmcoreinfo": (32, "I"),
    "offset_note": (40, "Q"), "size_note": (48, "I"),
    "offset_eraseinfo": (56, "Q"), "size_eraseinfo": (64, "I"),
    "start_pfn_64": (72, "Q"), "end_pfn_64": (80, "Q"), "max_mapnr_64": (88, "Q"),
}  # fmt: skip
SUB_HEADER_BYTES = 104  # the largest sub-header layout

UTSNAME_OFFSET = 12
UTSNAME_FIELD = 65
UTSNAME_FIELDS = ("sysname", "nodename", "release", "version", "machine", "domainname")

#: ``utsname.machine`` values of 64-bit architectures (QEMU writes ``ELF_MACHINE_UNAME``, e.g.
#: "x86_64", "S390X"); anything ending in "64" counts too.
MACHINES_64 = frozenset({"x86_64", "amd64", "s390x", "alpha", "ia64", "sparc64", "arm64"})
#: Big-endian machines: their headers are tried big-endian first.
MACHINES_BE = frozenset({"s390x", "s390", "ppc64", "ppc", "sparc64", "sparc", "aarch64_be", "armeb"})
X86_MACHINES = re.compile(r"^(x86_64|amd64|i[3-6]86)$")

#: ``page_desc``: i64 offset, u32 size, u32 flags, u64 page_flags.
PAGE_DESC_SIZE = 24


def _desc_dtype(order: str) -> np.dtype[np.void]:
    return np.dtype(
        [
            ("offset", order + "i8"),
            ("size", order + "u4"),
            ("flags", order + "u4"),
            ("page_flags", order + "u8"),
        ]
    )


def probe(head: bytes, size: int) -> bool:
    """A kdump file starts with "KDUMP   " (or the older "DISKDUMP"); a flattened one with
    "makedumpfile" padded with NULs to 16 bytes."""
    return head[:8] in (KDUMP_SIGNATURE, DISKDUMP_SIGNATURE) or head[:16] == FLAT_SIGNATURE


# --- the kdump file as the format sees it: plain bytes or flattened records ------------------------


class KdumpImage:
    """The bytes of the (reassembled) kdump file, read in place.

    A plain file is one segment.  A flattened file is many: ``dst`` (offset in the kdump file),
    ``length`` and ``src`` (absolute offset in the flattened file), sorted by ``dst`` and not
    overlapping.  Bytes of the kdump file no segment covers read as zeros, as in the sparse file
    ``makedumpfile -R`` would write.
    """

    def __init__(
        self,
        source: Source,
        buf: npt.NDArray[np.uint8],
        dst: OffsetArray,
        length: OffsetArray,
        src: OffsetArray,
        flattened: bool,
        content: str = "kdump",
    ) -> None:
        self.source = source
        #: What the reassembled file is, for messages: "kdump" or "ELF".
        self.content = content
        #: While the file is being opened: its descriptor, so that headers, bitmaps and
        #: descriptors are read with pread (a file cut meanwhile is an error, not SIGBUS).
        self.fd: int | None = None
        self.buf = buf
        self.dst = dst
        self.length = length
        self.end = dst + length
        self.src = src
        self.flattened = flattened
        self.size = int(self.end.max()) if len(dst) else 0

    def file_offset(self, offset: int) -> int:
        """The absolute file offset holding byte ``offset`` of the kdump file (for messages); for a
        byte no record holds, the end of the file."""
        k = int(np.searchsorted(self.dst, offset, side="right")) - 1
        if k >= 0 and offset < int(self.end[k]):
            return int(self.src[k]) + offset - int(self.dst[k])
        return len(self.buf)

    def translate(self, offsets: OffsetArray, lengths: npt.NDArray[np.int64]) -> OffsetArray:
        """File offsets of ``lengths`` bytes at each of ``offsets``; -1 where they are not held by a
        single segment (they cross records, or lie in a hole)."""
        k = np.searchsorted(self.dst, offsets, side="right") - 1
        kc = np.maximum(k, 0)
        inside = (k >= 0) & (offsets + lengths <= self.end[kc])
        return np.where(inside, self.src[kc] + (offsets - self.dst[kc]), -1)

    def read(self, offset: int, length: int, what: str, fd: int | None = None) -> bytes:
        """``length`` bytes at ``offset`` of the kdump file; a FormatError naming ``what`` when they
        reach past its end.  With ``fd`` (the file, opened again) they are read with pread, not
        from the mapping."""
        if offset < 0 or length < 0 or offset + length > self.size:
            raise self.source.error(
                self.file_offset(min(max(offset, 0), self.size)),
                expected=f"{what} ({length} bytes at offset {offset:#x} of the {self.content} file)",
                found=f"the {self.content} file ending at {self.size:#x}"
                + (" (flattened: no record holds those bytes)" if self.flattened else ""),
            )
        k = int(np.searchsorted(self.dst, offset, side="right")) - 1
        if k >= 0 and offset + length <= int(self.end[k]):
            s = int(self.src[k]) + offset - int(self.dst[k])
            return self._bytes(s, length, fd)
        out = bytearray(length)
        k = max(k, 0)
        while k < len(self.dst) and int(self.dst[k]) < offset + length:
            lo = max(offset, int(self.dst[k]))
            hi = min(offset + length, int(self.end[k]))
            if lo < hi:
                s = int(self.src[k]) + lo - int(self.dst[k])
                out[lo - offset : hi - offset] = self._bytes(s, hi - lo, fd)
            k += 1
        return bytes(out)

    def _bytes(self, at: int, length: int, fd: int | None) -> bytes:
        fd = fd if fd is not None else self.fd
        if fd is None:
            return self.buf[at : at + length].tobytes()
        return pread_exactly(fd, length, at, self.source.name)


def pread_exactly(fd: int, length: int, at: int, name: str) -> bytes:
    """``length`` bytes at ``at`` of ``fd``; a short read means the file shrank."""
    data = os.pread(fd, length, at)
    if len(data) != length:
        raise UnreadableFile(
            name,
            f"it changed while being read: it ends at {at + len(data):#x}, "
            f"where {length} bytes at {at:#x} were expected",
        )
    return data


def plain_image(source: Source, buf: npt.NDArray[np.uint8]) -> KdumpImage:
    """A kdump file stored as is, from ``source.start`` to the end of the file."""
    length = len(buf) - source.start
    one = np.array([0], dtype=np.int64)
    return KdumpImage(
        source, buf, one, np.array([length], dtype=np.int64), one + source.start, flattened=False
    )


class _Window:
    """Bytes of a file read with pread a window at a time (record headers lie every 16 KiB or
    more apart): the flattened walk touches no mapping, so a file cut meanwhile is an error,
    not SIGBUS.  Without a descriptor it reads ``buf``."""

    SIZE = 4 << 20

    def __init__(self, fd: int | None, buf: npt.NDArray[np.uint8], name: str) -> None:
        self.fd = fd
        self.buf = buf
        self.name = name
        self.at = 0
        self.data = b""

    def get(self, pos: int, n: int) -> bytes:
        if self.fd is None:
            return self.buf[pos : pos + n].tobytes()
        if not (self.at <= pos and pos + n <= self.at + len(self.data)):
            want = min(max(n, self.SIZE), len(self.buf) - pos)
            self.data = pread_exactly(self.fd, want, pos, self.name)
            self.at = pos
        return self.data[pos - self.at : pos - self.at + n]


def flattened_image(source: Source, buf: npt.NDArray[np.uint8], fd: int | None = None) -> KdumpImage:
    """Index the records of a flattened stream (one pass over the record headers)."""
    start = source.start
    if len(buf) < start + FLAT_HEADER_SIZE:
        raise source.error(
            start,
            expected=f"a {FLAT_HEADER_SIZE}-byte makedumpfile flattened header",
            found=f"end of file at {len(buf):#x}",
        )
    window = _Window(fd, buf, source.name)
    ftype, fversion = struct.unpack(">qq", window.get(start + 16, 16))
    if ftype != FLAT_TYPE or fversion != FLAT_VERSION:
        raise UnsupportedFeature(
            source.name, start + 16, feature=f"makedumpfile flattened type {ftype} version {fversion}"
        )
    unpack = FLAT_RECORD.unpack
    rsize = FLAT_RECORD.size
    file_end = len(buf)
    dsts: list[int] = []
    sizes: list[int] = []
    pos = start + FLAT_HEADER_SIZE
    # One Python step per record: each header's position depends on the previous size.  QEMU
    # writes a record per 16 KiB, so this is ~65k steps per GiB of guest RAM.
    while True:
        if pos + rsize > file_end:
            raise source.error(
                pos,
                expected="a flattened record header or the end marker (offset -1)",
                found=f"end of file at {file_end:#x} (the stream is truncated)",
            )
        dst, size = unpack(window.get(pos, rsize))
        if dst == FLAT_END:
            break
        if dst < 0 or size <= 0 or size > file_end - pos - rsize or dst > (1 << 62):
            what = "beyond the end of file" if size > 0 and dst >= 0 and dst <= (1 << 62) else ""
            raise source.error(
                pos,
                expected="a flattened record: offset >= 0 and 0 < size <= the bytes left in the file",
                found=f"offset {dst}, size {size}" + (f" ({what} at {file_end:#x})" if what else ""),
            )
        dsts.append(dst)
        sizes.append(size)
        pos += rsize + size
    if not dsts:
        raise source.error(pos, expected="at least one flattened record", found="the end marker")
    dst_a = np.array(dsts, dtype=np.int64)
    len_a = np.array(sizes, dtype=np.int64)
    # Where each record's data sits: after its header, after all earlier records.
    src_a = np.cumsum(len_a + rsize) - len_a + (start + FLAT_HEADER_SIZE)
    order = np.argsort(dst_a, kind="stable")
    d, n, s = dst_a[order], len_a[order], src_a[order]
    if len(d) > 1 and np.any(d[1:] < (d + n)[:-1]):
        d, n, s = _resolve_overlaps(dst_a, len_a, src_a)
    image = KdumpImage(source, buf, d, n, s, flattened=True)
    image.fd = fd
    return image


def _resolve_overlaps(
    dst: OffsetArray, length: OffsetArray, src: OffsetArray
) -> tuple[OffsetArray, OffsetArray, OffsetArray]:
    """Segments of the reassembled file when records overlap: a later record overwrites an earlier
    one, as replaying the stream into a file does (makedumpfile rewrites its sub-header at the end)."""
    bounds = unique(np.concatenate((dst, dst + length)))
    winner = np.full(len(bounds) - 1, -1, dtype=np.int64)
    first = np.searchsorted(bounds, dst)
    last = np.searchsorted(bounds, dst + length)
    for i, (a, b) in enumerate(zip(first.tolist(), last.tolist(), strict=True)):
        winner[a:b] = i  # in stream order: the last write wins
    held = winner >= 0
    w = winner[held]
    seg_dst = bounds[:-1][held]
    seg_len = (bounds[1:] - bounds[:-1])[held]
    seg_src = src[w] + (seg_dst - dst[w])
    return seg_dst.astype(np.int64), seg_len.astype(np.int64), seg_src.astype(np.int64)


# --- header parsing ----------------------------------------------------------------------------------


@dataclass
class Header:
    """The fields of ``disk_dump_header`` and ``kdump_sub_header`` dengine uses."""

    signature: bytes
    order: str  # "<" or ">"
    layout: HeaderLayout
    sub: dict[str, tuple[int, str]]
    header_version: int
    utsname: dict[str, str]
    status: int
    block_size: int
    sub_hdr_size: int
    bitmap_blocks: int
    max_mapnr: int
    nr_cpus: int
    dump_level: int | None = None
    split: bool = False
    start_pfn: int = 0
    end_pfn: int | None = None
    offset_vmcoreinfo: int = 0
    size_vmcoreinfo: int = 0


def _u32(order: str, head: bytes, off: int) -> int:
    return int(struct.unpack_from(order + "I", head, off)[0])


def _plausible(head: bytes, order: str, layout: HeaderLayout) -> bool:
    """Whether the header read with this layout and byte order makes sense: a power-of-two block
    size in [1 KiB, 1 MiB], a bitmap, and (with a sub-header) at least one sub-header block."""
    return _implausible(head, order, layout) is None


def _implausible(head: bytes, order: str, layout: HeaderLayout) -> tuple[int, str, str] | None:
    """What makes the header read with this layout and byte order no ``disk_dump_header``: the
    offset of the first field that does not make sense, what it should hold and what it holds
    (``None`` when all do)."""
    bs = _u32(order, head, layout.block_size)
    version = struct.unpack_from(order + "i", head, 8)[0]
    bitmap_blocks = _u32(order, head, layout.bitmap_blocks)
    sub_blocks = struct.unpack_from(order + "i", head, layout.sub_hdr_size)[0]
    if not (1024 <= bs <= 1 << 20 and bs & (bs - 1) == 0):
        return (
            layout.block_size,
            "a power-of-two block_size and a non-empty bitmap",
            f"block_size {bs}, bitmap_blocks {bitmap_blocks}",
        )
    if not 0 <= version < 1 << 16:
        return 8, "a header_version of 0-65535", f"header_version {version}"
    if bitmap_blocks == 0:
        return layout.bitmap_blocks, "a non-empty bitmap (bitmap_blocks > 0)", "bitmap_blocks 0"
    if sub_blocks < 0:
        return layout.sub_hdr_size, "a sub_hdr_size of 0 or more blocks", f"sub_hdr_size {sub_blocks}"
    if version >= 1 and sub_blocks == 0:
        return (
            layout.sub_hdr_size,
            f"a sub_hdr_size of at least 1 block (header_version {version} has a kdump_sub_header)",
            "sub_hdr_size 0",
        )
    return None


def _utsname(head: bytes) -> dict[str, str]:
    out = {}
    for i, name in enumerate(UTSNAME_FIELDS):
        raw = head[UTSNAME_OFFSET + i * UTSNAME_FIELD : UTSNAME_OFFSET + (i + 1) * UTSNAME_FIELD]
        out[name] = raw.split(b"\0", 1)[0].decode("ascii", "replace")
    return out


def parse_header(image: KdumpImage) -> Header:
    """Read and check ``disk_dump_header`` and the sub-header."""
    source = image.source
    if image.size < LAYOUT_32.size:
        image.read(0, LAYOUT_64.size, "disk_dump_header")  # raises: names the short file
    head = image.read(0, min(image.size, LAYOUT_64.size), "disk_dump_header")
    signature = head[:8]
    if signature not in (KDUMP_SIGNATURE, DISKDUMP_SIGNATURE):
        raise source.error(
            image.file_offset(0),
            expected='the kdump signature "KDUMP   " or "DISKDUMP"',
            found=repr(signature),
        )
    uts = _utsname(head)
    machine = uts["machine"].lower()
    wide = machine in MACHINES_64 or machine.endswith("64")
    layouts = [LAYOUT_64, LAYOUT_32] if wide or not machine else [LAYOUT_32, LAYOUT_64]
    orders = [">", "<"] if machine in MACHINES_BE else ["<", ">"]
    # The machine names the layout, but QEMU writes its 32-bit header with the target's name
    # ("x86_64" for a guest not in long mode): fall back to the other layout when the first does
    # not make sense.
    chosen: tuple[str, HeaderLayout] | None = None
    for layout in layouts:
        if len(head) < layout.size:
            continue
        for order in orders:
            if _plausible(head, order, layout):
                chosen = (order, layout)
                break
        if chosen:
            break
    if chosen is None:
        lay = layouts[0]
        if len(head) < lay.size:
            image.read(0, lay.size, "disk_dump_header")
        wrong = _implausible(head, orders[0], lay)
        assert wrong is not None
        at, expected, found = wrong
        raise source.error(
            image.file_offset(at), expected=f"a {lay.name} disk_dump_header with {expected}", found=found
        )
    order, layout = chosen
    version = struct.unpack_from(order + "i", head, 8)[0]
    hdr = Header(
        signature=signature,
        order=order,
        layout=layout,
        sub=layout.sub,
        header_version=version,
        utsname=uts,
        status=_u32(order, head, layout.status),
        block_size=_u32(order, head, layout.block_size),
        sub_hdr_size=_u32(order, head, layout.sub_hdr_size),
        bitmap_blocks=_u32(order, head, layout.bitmap_blocks),
        max_mapnr=_u32(order, head, layout.max_mapnr),
        nr_cpus=struct.unpack_from(order + "i", head, layout.nr_cpus)[0],
    )
    if hdr.block_size != PAGE_SIZE:
        raise UnsupportedFeature(
            source.name, image.file_offset(layout.block_size), feature=f"kdump block size {hdr.block_size}"
        )
    if version >= 1 and signature == KDUMP_SIGNATURE:
        _parse_sub_header(image, hdr)
    return hdr


def _parse_sub_header(image: KdumpImage, hdr: Header) -> None:
    bs = hdr.block_size
    size = min(SUB_HEADER_BYTES, hdr.sub_hdr_size * bs)
    sub = image.read(bs, size, "kdump_sub_header").ljust(SUB_HEADER_BYTES, b"\0")

    def field(fields: dict[str, tuple[int, str]], name: str) -> int:
        off, code = fields[name]
        return int(struct.unpack_from(hdr.order + code, sub, off)[0])

    fields = hdr.layout.sub
    if hdr.layout is LAYOUT_32 and hdr.header_version >= 3:
        # Packed (IA-32) or padded (ARM...) sub-header: the packed reading of the VMCOREINFO
        # offset must point inside the sub-header blocks (libkdumpfile's test).
        off_v, size_v = field(fields, "offset_vmcoreinfo"), field(fields, "size_vmcoreinfo")
        payload = bs * (1 + hdr.sub_hdr_size)
        if not ((off_v == 0 and size_v == 0) or (bs < off_v and off_v + size_v <= payload)):
            fields = SUB_32PAD
    hdr.sub = fields
    hdr.dump_level = field(fields, "dump_level")
    version = hdr.header_version
    if version >= 2:
        hdr.split = field(fields, "split") != 0
        if hdr.split:
            hdr.start_pfn, hdr.end_pfn = field(fields, "start_pfn"), field(fields, "end_pfn")
    if version >= 3:
        hdr.offset_vmcoreinfo = field(fields, "offset_vmcoreinfo")
        hdr.size_vmcoreinfo = field(fields, "size_vmcoreinfo")
    if version >= 6:
        if hdr.split:
            hdr.start_pfn, hdr.end_pfn = field(fields, "start_pfn_64"), field(fields, "end_pfn_64")
        hdr.max_mapnr = field(fields, "max_mapnr_64")


def _max_mapnr_field(hdr: Header) -> tuple[int, str]:
    """Where the max_mapnr the reader uses lies in the kdump file, and its name: the sub-header's
    ``max_mapnr_64`` from header version 6 on, else the main header's 32-bit ``max_mapnr``."""
    if hdr.signature == KDUMP_SIGNATURE and hdr.header_version >= 6:
        return hdr.block_size + hdr.sub["max_mapnr_64"][0], "max_mapnr_64"
    return hdr.layout.max_mapnr, "max_mapnr"


# --- bitmaps -----------------------------------------------------------------------------------------


def _last_set_bit(bitmap: npt.NDArray[np.uint8], start: int) -> int | None:
    """The highest set bit (LSB first in each byte) at or above ``start``, or None; reads only the
    bytes from ``start`` on, one byte of memory per byte."""
    tail = bitmap[start // 8 :]
    nonzero = tail[::-1] != 0
    if not nonzero.any():
        return None
    k = len(tail) - 1 - int(np.argmax(nonzero))
    last = (start // 8 + k) * 8 + int(tail[k]).bit_length() - 1
    return last if last >= start else None


def set_bits(bitmap: npt.NDArray[np.uint8], limit: int) -> GfnArray:
    """The indices of the set bits (LSB first in each byte) below ``limit``, ascending; memory in
    proportion to the set bits, not to the bitmap."""
    nz = np.flatnonzero(bitmap)
    if len(nz) == 0:
        return np.zeros(0, dtype=np.uint64)
    bits = np.unpackbits(bitmap[nz][:, None], axis=1, bitorder="little").astype(bool)
    pfns: GfnArray = (nz.astype(np.uint64)[:, None] * np.uint64(8) + np.arange(8, dtype=np.uint64))[bits]
    return pfns[pfns < np.uint64(limit)]


# --- page codecs -------------------------------------------------------------------------------------


def _lzo_decoder() -> Callable[[memoryview], bytes]:
    """LZO1X pages (what makedumpfile and QEMU write with ``lzo1x_1_compress``), decoded by
    ``lzallright`` (a wheel on PyPI: no liblzo2 and no compiler needed).  It returns the bytes
    the data really decompresses to, so a page of another length is caught below."""
    from lzallright import LZOCompressor

    decompress = LZOCompressor.decompress

    def decode(data: memoryview) -> bytes:
        return decompress(data, PAGE_SIZE)

    return decode


def _codec_errors() -> tuple[type[BaseException], ...]:
    import cramjam

    errors: list[type[BaseException]] = [
        zlib.error,
        zstandard.ZstdError,
        cramjam.DecompressionError,
        ValueError,
    ]
    from lzallright import LZOError

    errors.append(LZOError)
    return tuple(errors)


def _decoders() -> dict[int, Callable[[memoryview], bytes]]:
    """Page decoders by codec number; each returns the decompressed bytes."""
    import cramjam

    zdec = zlib.decompress
    snappy_dec = cramjam.snappy.decompress_raw
    # A zstd context per thread: pages may be read by several threads at once (a plan measuring
    # its codecs), and a context is not for two at a time.
    local = threading.local()

    def zstd_dec(d: memoryview) -> bytes:
        dctx: zstandard.ZstdDecompressor | None = getattr(local, "dctx", None)
        if dctx is None:
            dctx = local.dctx = zstandard.ZstdDecompressor()
        return dctx.decompress(d, max_output_size=PAGE_SIZE)

    out: dict[int, Callable[[memoryview], bytes]] = {
        ZLIB: lambda d: zdec(d, 15, PAGE_SIZE),
        SNAPPY: lambda d: bytes(snappy_dec(d)),
        ZSTD: zstd_dec,
        LZO: _lzo_decoder(),
    }
    return out


# --- the dump ----------------------------------------------------------------------------------------


class KdumpDump(Dump):
    """Pages of a kdump file: stored ones gathered from the mapping in one numpy step, compressed
    ones decompressed one by one (identical descriptors, e.g. QEMU's shared zero page, once)."""

    PAGE_ARRAYS = ("gfns", "_codec", "_size", "_file_off")

    def __init__(
        self,
        source: Source,
        facts: GuestFacts,
        image: KdumpImage,
        gfns: GfnArray,
        codec: npt.NDArray[np.uint8],
        size: npt.NDArray[np.uint32],
        file_off: OffsetArray,
        slow_rows: OffsetArray,
        slow_offsets: OffsetArray,
    ) -> None:
        self.source = source
        self.facts = facts
        self.gfns = gfns
        self._image = image
        self._buf = image.buf
        self._codec = codec
        self._size = size
        #: Absolute file offset of each page's data; -1 where it crosses flattened records.
        self._file_off = file_off
        #: Pages whose data crosses records, and where that data is in the kdump file.
        self._slow_rows = slow_rows
        self._slow_offsets = slow_offsets
        self._decoders = _decoders()
        self._errors = _codec_errors()
        self._remember_file()

    def _pages(self, lo: int, hi: int) -> PageArray:
        return self._read(np.arange(lo, hi, dtype=np.int64))

    def _pages_at(self, idx: OffsetArray) -> PageArray:
        return self._read(idx.astype(np.int64, copy=False))

    def scan(
        self, max_pages: int = BATCH_PAGES, *, start: int = 0, stop: int | None = None
    ) -> Iterator[PageBatch]:
        """:meth:`batches`, but the bytes of each batch are read with ``pread`` (one read of the
        span its page data covers, when that span is not mostly other pages' data), never
        touched through the mapping: a file that shrinks meanwhile is a short read, an error,
        not SIGBUS.  Compressed data is a fraction of the pages: the copy costs little beside
        decompressing them."""
        fd = self._reopen()
        if fd is None:
            yield from self.batches(max_pages, start=start, stop=stop)
            return
        try:
            n = len(self.gfns) if stop is None else min(stop, len(self.gfns))
            for lo in range(max(start, 0), n, max(1, max_pages)):
                hi = min(lo + max_pages, n)
                self.check_unchanged()
                yield PageBatch(self.gfns[lo:hi], self._read(np.arange(lo, hi, dtype=np.int64), fd))
            self.check_unchanged()  # a write while the last batch was read
        finally:
            os.close(fd)

    def _read(self, idx: OffsetArray, fd: int | None = None) -> PageArray:
        """The pages at positions ``idx`` of :attr:`gfns`; with ``fd``, read with pread."""
        # np.zeros maps fresh pages lazily: shared zero pages cost nothing until read.
        out = np.zeros((len(idx), PAGE_SIZE), dtype=np.uint8)
        codec = self._codec[idx]
        foff = self._file_off[idx]
        buf, base = self._buf, 0
        if fd is not None:
            need = (codec != SHARED_ZERO) & (foff >= 0)
            if need.any():
                ends = foff[need] + self._size[idx[need]].astype(np.int64)
                base = int(foff[need].min())
                span = int(ends.max()) - base
                if span > 2 * int(ends.sum() - foff[need].sum()) + (1 << 20):
                    base = 0  # scattered: from the mapping, just checked unchanged
                else:
                    data = pread_exactly(fd, span, base, self.source.name)
                    buf = np.frombuffer(data, dtype=np.uint8)
                    foff = np.where(foff >= 0, foff - base, foff)
        stored = (codec == RAW) & (foff >= 0)
        if stored.any():
            windows = np.lib.stride_tricks.as_strided(
                buf, shape=(len(buf) - PAGE_SIZE + 1, PAGE_SIZE), strides=(1, 1), writeable=False
            )
            if stored.all():
                out[:] = windows[foff]
                return out
            out[stored] = windows[foff[stored]]
        rest = np.flatnonzero(~stored & (codec != SHARED_ZERO))
        fast = rest[foff[rest] >= 0]
        if len(fast):
            self._decode_fast(out, fast, codec[fast], foff[fast], self._size[idx[fast]], buf, base)
        if len(fast) < len(rest):
            slow = rest[foff[rest] < 0]
            where = np.searchsorted(self._slow_rows, idx[slow])
            for r, offset in zip(slow.tolist(), self._slow_offsets[where].tolist(), strict=True):
                length = int(self._size[idx[r]])
                data = self._image.read(offset, length, "page data", fd)
                c = int(codec[r])
                page = data if c == RAW else self._decode_one(c, memoryview(data), offset)
                out[r] = np.frombuffer(page, dtype=np.uint8)
        return out

    def _decode_fast(
        self,
        out: PageArray,
        rows: npt.NDArray[np.intp],
        codec: npt.NDArray[np.uint8],
        foff: OffsetArray,
        size: npt.NDArray[np.uint32],
        buf: npt.NDArray[np.uint8],
        base: int,
    ) -> None:
        """Decode pages whose data is at ``foff`` of ``buf`` (file offset ``base + foff``)."""
        # Pages sharing one descriptor (same data offset) are decoded once.
        uniq, first, inverse = np.unique(foff, return_index=True, return_inverse=True)
        dedup = len(uniq) < len(foff) and bool(
            np.all(size == size[first][inverse]) and np.all(codec == codec[first][inverse])
        )
        todo = first if dedup else np.arange(len(rows))
        flat = out.reshape(-1).data
        mv = buf.data
        for c in unique(codec[todo]).tolist():
            sel = todo[codec[todo] == c]
            decode = self._decoder(int(c), int(foff[sel[0]]))
            try:
                for row, o, s in zip(rows[sel].tolist(), foff[sel].tolist(), size[sel].tolist(), strict=True):
                    page = decode(mv[o : o + s])
                    if len(page) != PAGE_SIZE:
                        raise _WrongLength(o, len(page))
                    flat[row * PAGE_SIZE : (row + 1) * PAGE_SIZE] = page
            except _WrongLength as e:
                raise self.source.error(
                    base + e.offset,
                    expected=f"{CODEC_NAMES[c]} page data decompressing to {PAGE_SIZE} bytes",
                    found=f"{e.length} bytes",
                ) from None
            except self._errors as e:
                raise self.source.error(
                    base + o, expected=f"{CODEC_NAMES[c]} page data", found=f"corrupt data ({e})"
                ) from None
        if dedup:
            out[rows] = out[rows[first]][inverse]

    def _decoder(self, c: int, offset: int) -> Callable[[memoryview], bytes]:
        return self._decoders[c]

    def _decode_one(self, c: int, data: memoryview, offset: int) -> bytes:
        decode = self._decoder(c, offset)
        try:
            page = decode(data)
        except self._errors as e:
            raise self.source.error(
                self._image.file_offset(offset),
                expected=f"{CODEC_NAMES[c]} page data",
                found=f"corrupt data ({e})",
            ) from None
        if len(page) != PAGE_SIZE:
            raise self.source.error(
                self._image.file_offset(offset),
                expected=f"{CODEC_NAMES[c]} page data decompressing to {PAGE_SIZE} bytes",
                found=f"{len(page)} bytes",
            )
        return page

    def close(self) -> None:
        self._buf = np.zeros(0, dtype=np.uint8)
        self._image.buf = self._buf


class _WrongLength(Exception):
    def __init__(self, offset: int, length: int) -> None:
        self.offset = offset
        self.length = length


def _codec_of(flags: npt.NDArray[np.uint32]) -> npt.NDArray[np.uint8]:
    """Internal codec numbers; where several bits are set, the first of zlib, lzo, snappy, zstd
    wins, as in libkdumpfile and crash."""
    codec = np.zeros(len(flags), dtype=np.uint8)
    for bit, num in (
        (DUMP_DH_COMPRESSED_ZSTD, ZSTD),
        (DUMP_DH_COMPRESSED_SNAPPY, SNAPPY),
        (DUMP_DH_COMPRESSED_LZO, LZO),
        (DUMP_DH_COMPRESSED_ZLIB, ZLIB),
    ):
        codec[(flags & bit) != 0] = num
    return codec


def _mark_shared_zero(image: KdumpImage, codec: npt.NDArray[np.uint8], file_off: OffsetArray) -> None:
    """Give stored pages that several descriptors share and that hold only zeros the codec
    :data:`SHARED_ZERO`."""
    stored = (codec == RAW) & (file_off >= 0)
    uniq, counts = np.unique(file_off[stored], return_counts=True)
    zero = [o for o in uniq[counts > 1].tolist() if not image._bytes(o, PAGE_SIZE, None).strip(b"\0")]
    if zero:
        codec[stored & np.isin(file_off, zero)] = SHARED_ZERO


def _hex_ranges(gfns: GfnArray) -> list[str]:
    if len(gfns) == 0:
        return []
    g = gfns.astype(np.int64)
    breaks = np.flatnonzero(np.diff(g) != 1) + 1
    starts = np.concatenate(([0], breaks))
    ends = np.concatenate((breaks, [len(g)]))
    return [f"{int(g[s]) << 12:#x}-{(int(g[e - 1]) + 1) << 12:#x}" for s, e in zip(starts, ends, strict=True)]


def _vmcoreinfo(image: KdumpImage, hdr: Header) -> dict[str, str]:
    """OSRELEASE and PAGESIZE from the VMCOREINFO text, when the sub-header points at one."""
    if not hdr.offset_vmcoreinfo or not hdr.size_vmcoreinfo:
        return {}
    if hdr.size_vmcoreinfo > 1 << 20:
        return {}
    try:
        text = image.read(hdr.offset_vmcoreinfo, hdr.size_vmcoreinfo, "VMCOREINFO")
    except FormatError:
        return {}  # a broken VMCOREINFO costs the facts it would give, not the pages
    out = {}
    for line in text.decode("ascii", "replace").splitlines():
        key, sep, value = line.partition("=")
        if sep and key in ("OSRELEASE", "PAGESIZE"):
            out[key] = value.strip("\0 ")
    return out


def open_kdump(source: Source, options: OpenOptions) -> Dump:
    """Open a plain or flattened kdump-compressed file.  What opening reads (record headers,
    headers, bitmaps, descriptors) is read with pread, not through the mapping."""
    buf = map_file(source)
    try:
        fd: int | None = os.open(source.path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    except OSError:
        fd = None
    try:
        return _open_kdump(source, options, buf, fd)
    finally:
        if fd is not None:
            os.close(fd)


def _open_kdump(source: Source, options: OpenOptions, buf: npt.NDArray[np.uint8], fd: int | None) -> Dump:
    head = _Window(fd, buf, source.name).get(source.start, 16) if len(buf) > source.start else b""
    if head == FLAT_SIGNATURE:
        image = flattened_image(source, buf, fd)
    else:
        image = plain_image(source, buf)
        image.fd = fd
    try:
        return _open_image(source, options, buf, image)
    finally:
        image.fd = None


def _open_image(source: Source, options: OpenOptions, buf: npt.NDArray[np.uint8], image: KdumpImage) -> Dump:
    if image.flattened and image.size >= 4 and image.read(0, 4, "the file signature") == elf.ELF_MAGIC:
        # makedumpfile -F -E: an ELF vmcore in the flattened stream, read by the ELF reader
        # through the same record index.
        image.content = "ELF"
        return elf.open_flattened_elf(source, options, buf, image, image.translate)
    hdr = parse_header(image)
    bs = hdr.block_size
    mapnr_at, mapnr_name = _max_mapnr_field(hdr)
    if hdr.max_mapnr == 0:
        raise source.error(
            image.file_offset(mapnr_at),
            expected=f"page frames in the dump ({mapnr_name} > 0)",
            found=f"{mapnr_name} = 0",
        )

    # Bitmaps: check the file holds them before reading anything sized by max_mapnr.
    bitmap_off = (1 + hdr.sub_hdr_size) * bs
    bitmap_len = hdr.bitmap_blocks * bs
    if bitmap_off >= image.size:
        # The bitmaps would start at or past the end: sub_hdr_size places them (or the file is cut).
        raise source.error(
            image.file_offset(hdr.layout.sub_hdr_size),
            expected=f"the bitmaps inside the kdump file, at offset {bitmap_off:#x} "
            f"((1 + sub_hdr_size {hdr.sub_hdr_size}) blocks of {bs} bytes)",
            found=f"the kdump file ending at {image.size:#x}",
        )
    if bitmap_off + bitmap_len > image.size:
        raise source.error(
            image.file_offset(min(bitmap_off, image.size)),
            expected=f"{hdr.bitmap_blocks} bitmap blocks at offset {bitmap_off:#x} of the kdump file",
            found=f"the kdump file ending at {image.size:#x}",
        )
    # Two bitmaps when the blocks hold two of the size max_mapnr needs (crash's dump_is_partial).
    bitmap_bytes = (hdr.max_mapnr + 7) // 8
    need_blocks = (bitmap_bytes + bs - 1) // bs
    if hdr.bitmap_blocks >= 2 * need_blocks:
        half = hdr.bitmap_blocks // 2 * bs
        bitmap1 = np.frombuffer(image.read(bitmap_off, half, "1st bitmap"), dtype=np.uint8)
        bitmap2 = np.frombuffer(image.read(bitmap_off + half, half, "2nd bitmap"), dtype=np.uint8)
    elif hdr.signature == DISKDUMP_SIGNATURE and hdr.bitmap_blocks >= need_blocks:
        # Old diskdump: one bitmap, of the dumped pages.
        bitmap1 = bitmap2 = np.frombuffer(image.read(bitmap_off, bitmap_len, "bitmap"), dtype=np.uint8)
    else:
        raise source.error(
            image.file_offset(bitmap_off),
            expected=f"two bitmaps of at least {hdr.max_mapnr} bits each (max_mapnr)",
            found=f"{hdr.bitmap_blocks} bitmap blocks = {hdr.bitmap_blocks // 2 * bs * 8} bits each",
        )
    # The bitmaps cover max_mapnr bits rounded up to a block (makedumpfile's
    # prepare_bitmap_buffer, QEMU's write_dump_bitmap): a bit set past max_mapnr is a page the
    # header does not count, so the header lies.
    bitmaps = (
        [(bitmap1, "bitmap")] if bitmap1 is bitmap2 else [(bitmap1, "1st bitmap"), (bitmap2, "2nd bitmap")]
    )
    for bitmap, which in bitmaps:
        last = _last_set_bit(bitmap, hdr.max_mapnr)
        if last is not None:
            raise source.error(
                image.file_offset(mapnr_at),
                expected=f"{mapnr_name} of at least {last + 1} (the {which} marks pfn {last:#x})",
                found=f"{mapnr_name} = {hdr.max_mapnr}",
            )
    nbits = len(bitmap2) * 8
    start_pfn = min(hdr.start_pfn, nbits)
    end_pfn = nbits if hdr.end_pfn is None else min(hdr.end_pfn, nbits)
    if start_pfn > end_pfn:
        raise source.error(
            image.file_offset(bs),
            expected="start_pfn <= end_pfn in the split dump's sub-header",
            found=f"{hdr.start_pfn}..{hdr.end_pfn}",
        )
    # Descriptors are numbered over the set bits of the 2nd bitmap within this file's pfn range.
    indexed = set_bits(bitmap2, end_pfn)
    indexed = indexed[indexed >= np.uint64(start_pfn)]
    ndesc = len(indexed)
    desc_off = bitmap_off + bitmap_len
    if desc_off + ndesc * PAGE_DESC_SIZE > image.size:
        raise source.error(
            image.file_offset(min(desc_off, image.size)),
            expected=f"{ndesc} page descriptors ({ndesc * PAGE_DESC_SIZE} bytes) at offset "
            f"{desc_off:#x} of the kdump file",
            found=f"the kdump file ending at {image.size:#x}",
        )
    descs = np.frombuffer(
        image.read(desc_off, ndesc * PAGE_DESC_SIZE, "page descriptors"), _desc_dtype(hdr.order)
    )
    keep = indexed < np.uint64(hdr.max_mapnr)
    desc_index = np.flatnonzero(keep)
    gfns = indexed[keep]

    facts = GuestFacts(format="kdump", vcpus=hdr.nr_cpus if hdr.nr_cpus > 0 else None)
    extra = facts.extra
    if image.flattened:
        extra["container"] = "flattened"
    extra["header_version"] = hdr.header_version
    if hdr.dump_level is not None:
        extra["dump_level"] = hdr.dump_level
    extra["block_size"] = bs
    extra["nr_cpus"] = hdr.nr_cpus
    if hdr.utsname["release"]:
        extra["release"] = hdr.utsname["release"]
    machine = hdr.utsname["machine"]
    facts.arch = machine or None
    if hdr.split:
        extra["split_pfns"] = f"{start_pfn:#x}-{end_pfn:#x}"
    extra.update(_vmcoreinfo(image, hdr))

    # RAM the dump says exists (1st bitmap), and the pages it excluded from it.
    ram = set_bits(bitmap1, hdr.max_mapnr)
    qemu_made = bool(machine) and not any(hdr.utsname[f] for f in UTSNAME_FIELDS if f != "machine")
    if qemu_made:
        facts.hypervisor = "qemu"
    if qemu_made and X86_MACHINES.match(machine.lower()) and len(ram):
        device = ram[x86.device_memory_mask(ram)]
        if len(device):
            ram = np.setdiff1d(ram, device, assume_unique=True)
            if not options.device_memory:
                drop = np.isin(gfns, device, assume_unique=True)
                gfns, desc_index = gfns[~drop], desc_index[~drop]
                facts.skipped.extend(f"device memory {r}" for r in _hex_ranges(device))
    excluded = np.setdiff1d(ram, gfns, assume_unique=True)
    extra["excluded_pages"] = len(excluded)
    facts.memory_bytes = len(ram) * PAGE_SIZE

    d = descs[desc_index]
    offsets = d["offset"].astype(np.int64)
    if hdr.status & DUMP_DH_COMPRESSED_INCOMPLETE:
        written = offsets != 0
        source = _incomplete(source, image, hdr, options, facts, len(gfns), int(np.count_nonzero(written)))
        gfns, desc_index, d, offsets = gfns[written], desc_index[written], d[written], offsets[written]
    sizes = d["size"].astype(np.uint32)
    flags = d["flags"].astype(np.uint32)
    desc_file = desc_off + desc_index.astype(np.int64) * PAGE_DESC_SIZE

    unknown = np.flatnonzero((flags & ~np.uint32(KNOWN_PAGE_FLAGS)) != 0)
    if len(unknown):
        i = int(unknown[0])
        raise UnsupportedFeature(
            source.name,
            image.file_offset(int(desc_file[i])),
            feature=f"page flags {int(flags[i]):#x} in the page descriptor of pfn {int(gfns[i]):#x}",
        )
    codec = _codec_of(flags)
    sizes64 = sizes.astype(np.int64)
    bad = np.flatnonzero(((codec == RAW) & (sizes64 != bs)) | (sizes64 == 0))
    if len(bad):
        i = int(bad[0])
        raise source.error(
            image.file_offset(int(desc_file[i])),
            expected=f"a page descriptor size of {bs} for an uncompressed page (or > 0 compressed)",
            found=f"size {int(sizes[i])}, flags {int(flags[i]):#x} (pfn {int(gfns[i]):#x})",
        )
    # offsets > size - length, not offsets + length > size: an offset near 2**63 would wrap.
    beyond = np.flatnonzero((offsets < 0) | (offsets > image.size - sizes64))
    if len(beyond):
        i = int(beyond[0])
        raise source.error(
            image.file_offset(int(desc_file[i])),
            expected=f"a page descriptor pointing inside the kdump file (size {image.size:#x})",
            found=f"data at offset {int(offsets[i]):#x}, size {int(sizes[i])} (pfn {int(gfns[i]):#x})",
        )
    used = sorted({CODEC_NAMES[int(c)] for c in unique(codec) if c != RAW})
    facts.compression = "none" if not used else used[0] if len(used) == 1 else "mixed"

    file_off = image.translate(offsets, sizes64)
    _mark_shared_zero(image, codec, file_off)
    slow_rows = np.flatnonzero(file_off < 0).astype(np.int64)
    return KdumpDump(
        source,
        facts,
        image,
        gfns.astype(np.uint64),
        codec,
        sizes,
        file_off.astype(np.int64),
        slow_rows,
        offsets[slow_rows],
    )


def _incomplete(
    source: Source,
    image: KdumpImage,
    hdr: Header,
    options: OpenOptions,
    facts: GuestFacts,
    listed: int,
    written: int,
) -> Source:
    """A dump makedumpfile could not finish (ENOSPC; DUMP_DH_COMPRESSED_INCOMPLETE): the
    descriptors of the pages it never wrote have offset 0.  Refused, naming the status field,
    unless ``options.partial``; then read for the ``written`` of the ``listed`` pages, and its
    facts and name say so, as an xc_core cut short does."""
    missing = listed - written
    if not options.partial:
        raise source.error(
            image.file_offset(hdr.layout.status),
            expected="a complete dump (status without DUMP_DH_COMPRESSED_INCOMPLETE "
            f"{DUMP_DH_COMPRESSED_INCOMPLETE:#x})",
            found=f"status {hdr.status:#x}: makedumpfile stopped early, {missing} of the {listed} pages it "
            f"lists were never written; --partial reads the {written} pages present",
        )
    facts.extra["incomplete"] = True
    facts.extra["missing_pages"] = missing
    facts.extra["partial"] = {
        "pages_claimed": listed,
        "pages_read": written,
        "covers": f"the {written} pages written of the {listed} the bitmap lists",
    }
    facts.skipped.append(
        f"{missing} of the {listed} pages the bitmap lists, which makedumpfile never wrote (status "
        f"DUMP_DH_COMPRESSED_INCOMPLETE: it stopped early): the figures cover the {written} pages "
        "written only (--partial)"
    )
    note = f"partial: {written} pages, {missing} of the {listed} listed never written"
    # Parentheses, not brackets: tables render names as rich markup.
    return dataclasses.replace(source, origin=f"{source.label} ({note})")


FORMAT = FormatSpec(
    name="kdump",
    description="kdump-compressed / diskdump, plain or flattened (QEMU/libvirt kdump-*, makedumpfile)",
    probe=probe,
    open=open_kdump,
)
