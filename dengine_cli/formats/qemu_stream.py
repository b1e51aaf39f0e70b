"""QEMU migration streams: ``virsh dump`` without ``--memory-only``, ``migrate "exec:cat > f"``,
the tail of libvirt save images (FORMATS.md §3.2-3.5).

Sources: QEMU ``migration/savevm.c`` (records, configuration section, footers, commands),
``migration/ram.c`` (RAM section flags, the MEM_SIZE block list, ``mapped_ram_setup_ramblock``),
``docs/devel/migration/mapped-ram.rst``, ``scripts/analyze-migration.py``; ``hw/i386/pc_q35.c``
and ``pc_piix.c`` for where RAM sits (via :mod:`dengine_cli.formats.x86`).

Reading is two passes.  The index pass walks the records once and notes, for every (RAM block,
page) record, the absolute file offset of its 4096 data bytes or :data:`ZERO_PAGE`, into flat
int64 arrays (runs of same-kind records are recognized in numpy, not record by record).  The last
record of a page wins (live saves re-send dirtied pages).  Then the main RAM blocks are placed in
guest physical space and the dump serves pages straight from the mapped file.

What counts as the guest's memory: the main RAM blocks (``pc.ram``, or the NUMA backends
``ram-node<N>`` laid out one after another), minus the pages behind the legacy VGA window on x86
(``--device-memory`` keeps those).  ``vga.vram``, ``pc.bios``, ``pc.rom``, ``/rom@etc/...`` and
other blocks are device memory whose guest address the stream does not say: they are listed in
``facts.extra["ram_blocks"]`` and ``facts.skipped``, not served.

Pages materialized from the stream (``COMPRESS_PAGE`` zlib pages, and zero-flag pages with a
non-zero fill byte from old QEMUs, which mean 4096 copies of the fill byte) are written to an
unlinked temporary file and served from there.

Not supported (a clear error, not a wrong answer): XBZRLE pages, RDMA hooks, postcopy packages,
non-RAM sections *before* the end of RAM (the stream has no lengths to skip them with), RAM
blocks with their own page size (postcopy with huge pages), target pages other than 4 KiB.
"""

from __future__ import annotations

import array
import mmap
import re
import struct
import tempfile
import uuid as uuidlib
import zlib
from typing import TYPE_CHECKING, BinaryIO

import numpy as np
import numpy.typing as npt

from dengine_cli.errors import UnsupportedFeature
from dengine_cli.formats import x86
from dengine_cli.formats.base import ZERO_PAGE, Dump, GuestFacts, OpenOptions, PageTableDump, Source, map_file
from dengine_cli.formats.registry import FormatSpec
from dengine_cli.pages import PAGE_SHIFT, PAGE_SIZE, GfnArray, OffsetArray, PageArray

if TYPE_CHECKING:
    from dengine_cli.formats.domain_xml import DomainInfo

QEVM_MAGIC = b"QEVM"
#: QEMU_VM_FILE_VERSION (savevm.c); version 2 (QEMU < 0.13) is not read.
QEMU_VM_FILE_VERSION = 3

# Record types (savevm.c).
VM_EOF = 0x00
VM_SECTION_START = 0x01
VM_SECTION_PART = 0x02
VM_SECTION_END = 0x03
VM_SECTION_FULL = 0x04
VM_SUBSECTION = 0x05
VM_VMDESCRIPTION = 0x06
VM_CONFIGURATION = 0x07
VM_COMMAND = 0x08
VM_SECTION_FOOTER = 0x7E
#: How the trailing VMDESCRIPTION's JSON starts (savevm.c ``json_writer_int64(vmdesc, "page_size", ...)``
#: first, json-writer's ": " separator).
VMDESC_JSON_START = b'{"page_size"'
#: How far from the end of the file a VMDESCRIPTION is looked for (FORMATS.md §3.2: the last
#: <= 10 MiB) when the index pass stopped at a device section it cannot skip.
VMDESC_TAIL = 10 << 20
#: MIG_CMD_PACKAGED: a postcopy package (a whole stream inside a command); never in save files.
MIG_CMD_PACKAGED = 7

# RAM section flags (ram.c RAM_SAVE_FLAG_*), in the low bits of each be64 item.
RAM_FLAG_FULL = 0x01
RAM_FLAG_ZERO = 0x02
RAM_FLAG_MEM_SIZE = 0x04
RAM_FLAG_PAGE = 0x08
RAM_FLAG_EOS = 0x10
RAM_FLAG_CONTINUE = 0x20
RAM_FLAG_XBZRLE = 0x40
RAM_FLAG_HOOK = 0x80
RAM_FLAG_COMPRESS_PAGE = 0x100
RAM_FLAG_MULTIFD_FLUSH = 0x200
#: Flags live below TARGET_PAGE_SIZE (4 KiB on x86).
RAM_FLAG_MASK = PAGE_SIZE - 1
#: The "ram" section's version_id (ram.c ``register_savevm_live(..., 4, ...)``).
RAM_SECTION_VERSION = 4
#: zlib's compressBound(4096): the largest COMPRESS_PAGE payload QEMU can write.
COMPRESS_PAGE_MAX = 4110

#: MappedRamHeader (ram.c): be32 version, be64 page_size, be64 bitmap_offset, be64 pages_offset.
MAPPED_RAM_HEADER = struct.Struct(">IQQQ")
MAPPED_RAM_VERSION = 1

CAP_MAPPED_RAM = "mapped-ram"
CAP_IGNORE_SHARED = "x-ignore-shared"

#: Main RAM blocks: the machine's RAM, or NUMA/memory backends named by libvirt ``ram-node<N>``.
MAIN_RAM_BLOCK = re.compile(r"^(pc\.ram|ram-node(\d+))$")

#: A key in the index packs (block number, page number in the block).
_BLOCK_SHIFT = 40

#: A CONTINUE zero record and a CONTINUE page record, as numpy sees them in the mapping.
_ZERO_RECORD = np.dtype([("item", ">u8"), ("fill", "u1")])
_PAGE_RECORD = np.dtype([("item", ">u8"), ("data", "V4096")])

_BE64 = struct.Struct(">Q").unpack_from
_BE32 = struct.Struct(">I").unpack_from
_BE16 = struct.Struct(">H").unpack_from


def probe(head: bytes, size: int) -> bool:
    """A QEMU stream starts with ``"QEVM"`` and the file version 3."""
    return head[:4] == QEVM_MAGIC and head[4:8] == QEMU_VM_FILE_VERSION.to_bytes(4, "big")


class _Truncated(Exception):
    """Raised inside the index pass when a read runs past the end of the file."""


class QemuStreamDump(PageTableDump):
    """A page table over the stream file, plus pages materialized into a side file."""

    def __init__(
        self,
        source: Source,
        facts: GuestFacts,
        buf: npt.NDArray[np.uint8],
        gfns: GfnArray,
        offsets: OffsetArray,
        side: npt.NDArray[np.uint8],
    ) -> None:
        # Materialized pages are encoded as offsets <= -2 (-(2 + row)); the base table sees them
        # as zero pages and they are filled in from the side file.
        order = np.argsort(gfns, kind="stable")
        gfns, offsets = gfns[order], offsets[order]
        side_mask = offsets <= -2
        self._side_pos = np.flatnonzero(side_mask)
        self._side_rows = -2 - offsets[side_mask]
        self._side = side.reshape(-1, PAGE_SIZE) if len(side) else side.reshape(0, PAGE_SIZE)
        base_offsets = np.where(side_mask, ZERO_PAGE, offsets)
        super().__init__(source, facts, buf, gfns, base_offsets)

    def _pages(self, lo: int, hi: int) -> PageArray:
        pages = super()._pages(lo, hi)
        a = int(np.searchsorted(self._side_pos, lo))
        b = int(np.searchsorted(self._side_pos, hi))
        if a == b:
            return pages
        if not pages.flags.writeable:
            pages = pages.copy()
        pages[self._side_pos[a:b] - lo] = self._side[self._side_rows[a:b]]
        return pages

    def close(self) -> None:
        super().close()
        self._side = np.zeros((0, PAGE_SIZE), dtype=np.uint8)


class _Block:
    __slots__ = ("index", "length", "name", "pages")

    def __init__(self, index: int, name: str, length: int) -> None:
        self.index = index
        self.name = name
        self.length = length
        self.pages = length >> PAGE_SHIFT


class _Indexer:
    """The index pass over one stream."""

    def __init__(self, source: Source, buf: npt.NDArray[np.uint8], options: OpenOptions) -> None:
        self.source = source
        self.buf = buf
        self.mv = buf.data
        self.end = len(buf)
        self.options = options
        self.machine: str | None = None
        self.uuid: str | None = None
        self.capabilities: list[str] = []
        self.blocks: list[_Block] = []
        self.by_name: dict[bytes, _Block] = {}
        self.keys = array.array("q")
        self.offs = array.array("q")
        self.records = 0
        self.zero_fill_pages = 0
        self.compressed_pages = 0
        self.current: _Block | None = None
        self.ram_section: int | None = None
        self.ram_done = False
        self.stopped_at: str = "end of file"
        #: Where the index pass stopped reading (after RAM; nothing before it is searched for the
        #: trailing device description).
        self.stopped_offset = 0
        #: Said when the stream ends inside its trailing VMDESCRIPTION (RAM is complete then).
        self.cut_note: str | None = None
        self._side_file: BinaryIO | None = None
        self._side_count = 0
        self._fill_rows: dict[int, int] = {}
        #: How many records a vectorized run tries at once; grows while runs are long.
        self._run_cap = 1024

    # -- small readers -------------------------------------------------------------------

    def _need(self, p: int, n: int) -> None:
        if p + n > self.end:
            raise _Truncated(p)

    def _str(self, p: int) -> tuple[bytes, int]:
        self._need(p, 1)
        n = self.mv[p]
        self._need(p + 1, n)
        return bytes(self.mv[p + 1 : p + 1 + n]), p + 1 + n

    def _u32(self, p: int) -> int:
        self._need(p, 4)
        return int(_BE32(self.mv, p)[0])

    def _u64(self, p: int) -> int:
        self._need(p, 8)
        return int(_BE64(self.mv, p)[0])

    def _unsupported(self, p: int, feature: str) -> UnsupportedFeature:
        return UnsupportedFeature(self.source.name, p, feature=feature)

    # -- the record level ------------------------------------------------------------------

    def run(self) -> None:
        start = self.source.start
        try:
            self._records(start)
        except _Truncated as t:
            (p,) = t.args
            where = "the RAM section's EOS" if not self.ram_done else "the next record"
            raise self.source.error(
                int(p), expected=f"more stream data before {where}", found=f"end of file at {self.end:#x}"
            ) from None
        self.cut_note = self._cut_description()

    def _cut_description(self) -> str | None:
        """A note when the file ends inside the VMDESCRIPTION after QEMU_VM_EOF (u8 0x06, be32
        length, that many bytes of JSON): RAM was read whole, the device description is cut.

        Right after QEMU_VM_EOF the record is read where it is.  After a device section the
        index pass cannot skip, the record is looked for in the file's last :data:`VMDESC_TAIL`
        bytes past that section: QEMU_VM_EOF, 0x06 and a be32 length just before the last
        :data:`VMDESC_JSON_START`."""
        p, end = self.stopped_offset, self.end
        if self.stopped_at == "QEMU_VM_EOF":
            if p >= end or self.mv[p] != VM_VMDESCRIPTION:
                return None  # no device description (suppress-vmdesc), or something else
            at = p
            length = int(_BE32(self.mv, p + 1)[0]) if p + 5 <= end else None
        elif self.stopped_at.startswith("section"):
            lo = max(p, end - VMDESC_TAIL)
            tail = bytes(self.mv[lo:end])
            found = tail.rfind(VMDESC_JSON_START)
            if found < 0:  # cut inside those first bytes of the JSON?
                found = next(
                    (len(tail) - k for k in range(len(VMDESC_JSON_START) - 1, 0, -1)
                     if tail.endswith(VMDESC_JSON_START[:k])),
                    -1,
                )  # fmt: skip
            if found < 6 or tail[found - 6 : found - 4] != b"\x00\x06":
                return None
            at, length = lo + found - 5, int(_BE32(tail, found - 4)[0])
            if length < len(VMDESC_JSON_START):
                return None
        else:
            return None
        if length is not None and at + 5 + length <= end:
            return None  # complete
        size = "its be32 length cut" if length is None else f"{end - at - 5} of its {length} bytes of JSON"
        return (
            f"the stream ends inside its trailing device description at offset {at:#x} "
            f"(QEMU_VM_VMDESCRIPTION, {size}; the file ends at {end:#x}); RAM is complete"
        )

    def _records(self, start: int) -> None:
        src = self.source
        self._need(start, 8)
        if bytes(self.mv[start : start + 4]) != QEVM_MAGIC:
            raise src.error(
                start,
                expected='the QEMU stream magic "QEVM"',
                found=bytes(self.mv[start : start + 4]).hex(" "),
            )
        version = self._u32(start + 4)
        if version != QEMU_VM_FILE_VERSION:
            raise src.error(start + 4, expected=f"stream version {QEMU_VM_FILE_VERSION}", found=str(version))
        p = start + 8
        while True:
            if p >= self.end:
                if self.ram_done:
                    self.stopped_at = "end of file"
                    return
                raise _Truncated(p)
            rec = p
            kind = self.mv[p]
            p += 1
            if kind == VM_CONFIGURATION:
                p = self._configuration(p)
            elif kind in (VM_SECTION_START, VM_SECTION_FULL):
                section_id = self._u32(p)
                idstr, p = self._str(p + 4)
                self._need(p, 8)
                version = self._u32(p + 4)
                p += 8
                if idstr == b"ram" and kind == VM_SECTION_START:
                    if version != RAM_SECTION_VERSION:
                        raise self._unsupported(p - 4, f"RAM section version {version}")
                    self.ram_section = section_id
                    p = self._footer(self._ram_data(p), section_id)
                else:
                    name = idstr.decode("ascii", "replace")
                    if self.ram_done:
                        self.stopped_at = f"section {name!r} at {rec:#x}"
                        self.stopped_offset = rec
                        return
                    raise self._unsupported(
                        rec, f"section {name!r} before the end of RAM (cannot be skipped without its layout)"
                    )
            elif kind in (VM_SECTION_PART, VM_SECTION_END):
                section_id = self._u32(p)
                p += 4
                if self.ram_section is None or section_id != self.ram_section:
                    if self.ram_done:
                        self.stopped_at = f"section part {section_id} at {rec:#x}"
                        self.stopped_offset = rec
                        return
                    raise self._unsupported(
                        rec, f"iterable section {section_id} other than RAM (cannot be skipped)"
                    )
                p = self._footer(self._ram_data(p), section_id)
                if kind == VM_SECTION_END:
                    self.ram_done = True
            elif kind == VM_SECTION_FOOTER:
                self._u32(p)
                p += 4
            elif kind == VM_COMMAND:
                self._need(p, 4)
                cmd, length = _BE16(self.mv, p)[0], _BE16(self.mv, p + 2)[0]
                if cmd == MIG_CMD_PACKAGED:
                    raise self._unsupported(rec, "postcopy package (QEMU_VM_COMMAND 7)")
                self._need(p + 4, length)
                p += 4 + length
            elif kind == VM_EOF:
                if not self.ram_done:
                    raise src.error(
                        rec, expected="the RAM SECTION_END before QEMU_VM_EOF", found="QEMU_VM_EOF"
                    )
                self.stopped_at = "QEMU_VM_EOF"
                self.stopped_offset = p
                return
            else:
                raise src.error(
                    rec,
                    expected="a stream record type (0x00-0x08 or 0x7e)",
                    found=f"{kind:#04x}",
                )

    def _footer(self, p: int, section_id: int) -> int:
        if p < self.end and self.mv[p] == VM_SECTION_FOOTER:
            found = self._u32(p + 1)
            if found != section_id:
                raise self.source.error(
                    p + 1, expected=f"a footer for section {section_id}", found=f"section {found}"
                )
            return p + 5
        return p

    def _configuration(self, p: int) -> int:
        length = self._u32(p)
        if length > 256:
            raise self.source.error(
                p, expected="a machine type name of at most 256 bytes", found=f"{length} bytes"
            )
        self._need(p + 4, length)
        self.machine = bytes(self.mv[p + 4 : p + 4 + length]).decode("ascii", "replace")
        p += 4 + length
        while p < self.end and self.mv[p] == VM_SUBSECTION:
            at = p
            name, p = self._str(p + 1)
            p += 4  # subsection version_id
            if name == b"configuration/target-page-bits":
                bits = self._u32(p)
                p += 4
                if bits != PAGE_SHIFT:
                    raise self._unsupported(at, f"target page size {1 << bits if bits < 64 else bits}")
            elif name == b"configuration/capabilities":
                count = self._u32(p)
                p += 4
                if count > 256:
                    raise self.source.error(p - 4, expected="at most 256 capabilities", found=str(count))
                for _ in range(count):
                    cap, p = self._str(p)
                    self.capabilities.append(cap.decode("ascii", "replace"))
            elif name == b"configuration/uuid":
                self._need(p, 16)
                raw = bytes(self.mv[p : p + 16])
                p += 16
                if raw.strip(b"\0"):
                    self.uuid = str(uuidlib.UUID(bytes=raw))
            else:
                raise self._unsupported(at, f"configuration subsection {name.decode('ascii', 'replace')!r}")
        return p

    # -- RAM section data ------------------------------------------------------------------

    def _ram_data(self, p: int) -> int:
        """Walk RAM items up to and including EOS; the offset after it."""
        mv = self.mv
        end = self.end
        keys = self.keys
        offs = self.offs
        by_name = self.by_name
        block = self.current
        prev_flags = -1
        cooldown = 0
        records = 0
        try:
            while True:
                rec = p
                v = _BE64(mv, p)[0]
                p += 8
                flags = v & RAM_FLAG_MASK
                kind = flags & ~RAM_FLAG_CONTINUE
                if kind in (RAM_FLAG_ZERO, RAM_FLAG_PAGE, RAM_FLAG_COMPRESS_PAGE, RAM_FLAG_XBZRLE):
                    if flags & RAM_FLAG_CONTINUE:
                        if block is None:
                            raise self.source.error(
                                rec,
                                expected="a RAM block name (CONTINUE with no previous block)",
                                found=f"flags {flags:#x}",
                            )
                    else:
                        n = mv[p]
                        name = bytes(mv[p + 1 : p + 1 + n])
                        if p + 1 + n > end:
                            raise _Truncated(p)
                        p += 1 + n
                        found = by_name.get(name)
                        if found is None:
                            raise self.source.error(
                                rec + 9,
                                expected="a RAM block named in the MEM_SIZE list",
                                found=repr(name.decode("ascii", "replace")),
                            )
                        block = found
                    page = v >> PAGE_SHIFT
                    if page >= block.pages:
                        raise self.source.error(
                            rec,
                            expected=f"a page offset below {block.name}'s used_length {block.length:#x}",
                            found=f"{page << PAGE_SHIFT:#x}",
                        )
                    if kind == RAM_FLAG_ZERO:
                        fill = mv[p]
                        p += 1
                        off = ZERO_PAGE if fill == 0 else self._fill_page(fill)
                    elif kind == RAM_FLAG_PAGE:
                        off = p
                        p += PAGE_SIZE
                        if p > end:
                            raise _Truncated(off)
                    elif kind == RAM_FLAG_COMPRESS_PAGE:
                        off, p = self._compressed_page(rec, p)
                    else:
                        raise self._unsupported(rec, "XBZRLE-encoded page (RAM flag 0x40)")
                    keys.append(block.index << _BLOCK_SHIFT | page)
                    offs.append(off)
                    records += 1
                    # Long runs of CONTINUE zero pages / raw pages are recognized in numpy.
                    if flags == prev_flags and (flags in (0x22, 0x28)) and off >= ZERO_PAGE:
                        if cooldown:
                            cooldown -= 1
                        else:
                            p, got = self._run(p, flags, block)
                            records += got
                            if got < 8:
                                cooldown = 64
                    prev_flags = flags
                elif kind == RAM_FLAG_EOS:
                    break
                elif kind == RAM_FLAG_MEM_SIZE:
                    p = self._mem_size(rec, v & ~RAM_FLAG_MASK, p)
                    prev_flags = -1
                elif kind == RAM_FLAG_MULTIFD_FLUSH:
                    prev_flags = -1
                elif kind & RAM_FLAG_HOOK:
                    raise self._unsupported(rec, "RDMA RAM hook (RAM flag 0x80)")
                else:
                    raise self.source.error(
                        rec,
                        expected="a RAM item flag (ZERO 0x2, MEM_SIZE 0x4, PAGE 0x8, EOS 0x10, ...)",
                        found=f"flags {flags:#x}",
                    )
        except struct.error:
            raise _Truncated(rec) from None
        except IndexError:
            raise _Truncated(rec) from None
        finally:
            self.current = block
            self.records += records
        return p

    def _run(self, p: int, flags: int, block: _Block) -> tuple[int, int]:
        """Take as many further records ``flags`` (ZERO or PAGE, with CONTINUE) as follow ``p``
        back to back; the new position and how many were taken."""
        zero = flags == RAM_FLAG_ZERO | RAM_FLAG_CONTINUE
        dtype = _ZERO_RECORD if zero else _PAGE_RECORD
        stride = dtype.itemsize
        k = min(self._run_cap, (self.end - p) // stride)
        if k < 8:
            return p, 0
        # The records seen as one structured array over the mapping: no copy.
        rows = np.ndarray((k,), dtype=dtype, buffer=self.mv, offset=p)
        items = rows["item"]
        ok = (items & np.uint64(RAM_FLAG_MASK)) == np.uint64(flags)
        if zero:
            ok &= rows["fill"] == 0
        first_bad = int(ok.argmin())
        m = k if ok[first_bad] else first_bad
        if m == 0:
            return p, 0
        pages = (items[:m] >> np.uint64(PAGE_SHIFT)).astype(np.int64)
        if int(pages.max()) >= block.pages:
            m = int(np.argmax(pages >= block.pages))  # the scalar loop reports the bad record
            pages = pages[:m]
            if m == 0:
                return p, 0
        pages |= block.index << _BLOCK_SHIFT
        self.keys.frombytes(pages.tobytes())
        if zero:
            self.offs.frombytes(np.full(m, ZERO_PAGE, dtype=np.int64).tobytes())
        else:
            self.offs.frombytes((p + 8 + np.arange(m, dtype=np.int64) * stride).tobytes())
        self._run_cap = min(self._run_cap * 4, 1 << 20) if m == k else max(64, 2 * m)
        return p + m * stride, m

    def _mem_size(self, rec: int, total: int, p: int) -> int:
        """The RAM block list: ``str idstr, be64 used_length`` (+ extras per capability) until
        the lengths add up to ``total``."""
        mapped = CAP_MAPPED_RAM in self.capabilities
        ignore_shared = CAP_IGNORE_SHARED in self.capabilities
        left = total
        while left > 0:
            at = p
            name, p = self._str(p)
            length = self._u64(p)
            p += 8
            # Keys pack the page number in 40 bits: a block over 4 PiB is a lie, not a guest.
            if length > left or length % PAGE_SIZE or length == 0 or length >> (_BLOCK_SHIFT + PAGE_SHIFT):
                raise self.source.error(
                    p - 8,
                    expected=f"a page-multiple block length of at most the {left:#x} bytes the MEM_SIZE "
                    f"total {total:#x} leaves",
                    found=f"{_shown(name)} of {length:#x} bytes",
                )
            if name in self.by_name:
                raise self.source.error(at, expected="a RAM block listed once", found=f"{name!r} again")
            block = _Block(len(self.blocks), name.decode("ascii", "replace"), length)
            self.blocks.append(block)
            self.by_name[name] = block
            if ignore_shared:
                self._u64(p)  # mr->addr of the block
                p += 8
            if mapped:
                p = self._mapped_ram(block, p)
            left -= length
        return p

    def _mapped_ram(self, block: _Block, p: int) -> int:
        """A mapped-ram block (FORMATS.md §3.4): header, then pages by bitmap at absolute
        offsets; the stream goes on after the block's page area."""
        self._need(p, MAPPED_RAM_HEADER.size)
        version, page_size, bitmap_off, pages_off = MAPPED_RAM_HEADER.unpack_from(self.mv, p)
        if version != MAPPED_RAM_VERSION:
            raise self._unsupported(p, f"mapped-ram header version {version}")
        if page_size != PAGE_SIZE:
            raise self._unsupported(p + 4, f"mapped-ram page size {page_size}")
        if bitmap_off == 0 and pages_off == 0 and CAP_IGNORE_SHARED in self.capabilities:
            return p + MAPPED_RAM_HEADER.size  # a shared block left out of the file
        bitmap_bytes = (block.pages + 63) // 64 * 8
        if bitmap_off + bitmap_bytes > self.end:
            raise self.source.error(
                p + 12,
                expected=f"a {bitmap_bytes}-byte page bitmap inside the file",
                found=f"offset {bitmap_off:#x}",
            )
        if pages_off % PAGE_SIZE or pages_off + block.length > self.end:
            raise self.source.error(
                p + 20,
                expected=f"a page-aligned area of {block.length:#x} bytes inside the file",
                found=f"offset {pages_off:#x} (file ends at {self.end:#x})",
            )
        bits = np.unpackbits(self.buf[bitmap_off : bitmap_off + bitmap_bytes], bitorder="little")[
            : block.pages
        ]
        index = np.arange(block.pages, dtype=np.int64)
        self.keys.frombytes((index | (block.index << _BLOCK_SHIFT)).tobytes())
        self.offs.frombytes(np.where(bits.astype(bool), pages_off + index * PAGE_SIZE, ZERO_PAGE).tobytes())
        self.records += block.pages
        return int(pages_off + block.length)

    # -- materialized pages ------------------------------------------------------------------

    def _side(self, page: bytes) -> int:
        if self._side_file is None:
            tmp_dir = str(self.options.tmp_dir) if self.options.tmp_dir else None
            # Lives until side_pages() maps it or discard(): not a with-block.
            self._side_file = tempfile.TemporaryFile(prefix="dengine-pages-", dir=tmp_dir)  # noqa: SIM115
        self._side_file.write(page)
        self._side_count += 1
        return -2 - (self._side_count - 1)

    def _fill_page(self, fill: int) -> int:
        self.zero_fill_pages += 1
        if fill not in self._fill_rows:
            self._fill_rows[fill] = self._side(bytes([fill]) * PAGE_SIZE)
        return self._fill_rows[fill]

    def _compressed_page(self, rec: int, p: int) -> tuple[int, int]:
        length = self._u32(p)
        if length > COMPRESS_PAGE_MAX:
            raise self.source.error(
                p, expected=f"a compressed page of at most {COMPRESS_PAGE_MAX} bytes", found=f"{length} bytes"
            )
        self._need(p + 4, length)
        try:
            page = zlib.decompress(bytes(self.mv[p + 4 : p + 4 + length]))
        except zlib.error as e:
            raise self.source.error(
                p + 4, expected="a zlib-compressed page", found=f"zlib error: {e}"
            ) from None
        if len(page) != PAGE_SIZE:
            raise self.source.error(
                p + 4, expected="a page that decompresses to 4096 bytes", found=f"{len(page)} bytes"
            )
        self.compressed_pages += 1
        off = ZERO_PAGE if not page.strip(b"\0") else self._side(page)
        return off, p + 4 + length

    def side_pages(self) -> npt.NDArray[np.uint8]:
        """The materialized pages, mapped from their unlinked temporary file."""
        if self._side_file is None:
            return np.zeros(0, dtype=np.uint8)
        self._side_file.flush()
        mm = mmap.mmap(self._side_file.fileno(), 0, access=mmap.ACCESS_READ)
        self._side_file.close()
        return np.frombuffer(mm, dtype=np.uint8)

    def discard(self) -> None:
        if self._side_file is not None:
            self._side_file.close()


def _shown(name: bytes) -> str:
    """A block name for a message: as is when it is printable ASCII, else quoted with escapes
    (a lying length can take in newlines and binary bytes, and a message is one line)."""
    text = name.decode("ascii", "replace")
    return text if text.isascii() and text.isprintable() else repr(text)


def _is_x86(machine: str | None) -> bool:
    m = (machine or "pc").lower()
    return m.startswith(("pc", "q35", "isapc", "microvm", "xenfv", "xenpv")) or "q35" in m or "i440fx" in m


def _main_order(name: str) -> tuple[int, int]:
    m = MAIN_RAM_BLOCK.match(name)
    assert m is not None
    return (0, 0) if m.group(2) is None else (1, int(m.group(2)))


def open_stream(source: Source, options: OpenOptions, domain: DomainInfo | None = None) -> Dump:
    """Open a QEMU migration stream starting at ``source.start``; ``domain`` (from a libvirt
    save image's XML) fills in what the stream does not say."""
    buf = map_file(source)
    idx = _Indexer(source, buf, options)
    try:
        idx.run()
        if not idx.blocks:
            raise source.error(source.start, expected="a RAM MEM_SIZE block list", found="none in the stream")
        dump = _build(source, options, idx, buf, domain)
    except BaseException:
        idx.discard()
        raise
    return dump


def _build(
    source: Source, options: OpenOptions, idx: _Indexer, buf: npt.NDArray[np.uint8], domain: DomainInfo | None
) -> Dump:
    keys = np.frombuffer(idx.keys, dtype=np.int64)
    offs = np.frombuffer(idx.offs, dtype=np.int64)
    records = len(keys)
    if records > 1 and not bool(np.all(keys[1:] > keys[:-1])):
        # Last record of a page wins: unique over the reversed records keeps each key's last one.
        rev_keys, first = np.unique(keys[::-1], return_index=True)
        keys, offs = rev_keys, offs[::-1][first]
    duplicates = records - len(keys)
    block_of = keys >> _BLOCK_SHIFT
    page_of = keys & ((1 << _BLOCK_SHIFT) - 1)

    machine = idx.machine or (domain.machine if domain else None)
    main = sorted((b for b in idx.blocks if MAIN_RAM_BLOCK.match(b.name)), key=lambda b: _main_order(b.name))
    facts = GuestFacts(format="qemu-stream", hypervisor="qemu", machine=machine, uuid=idx.uuid)
    ram_bytes = sum(b.length for b in main)
    facts.memory_bytes = ram_bytes
    facts.extra.update(
        stream_version=QEMU_VM_FILE_VERSION,
        ram_blocks={b.name: b.length for b in idx.blocks},
        main_ram_blocks=[b.name for b in main],
        capabilities=list(idx.capabilities),
        page_records=idx.records,
        duplicate_pages=duplicates,
        stopped_at=idx.stopped_at,
    )
    if idx.compressed_pages:
        facts.extra["compressed_pages"] = idx.compressed_pages
    if idx.zero_fill_pages:
        facts.extra["filled_zero_pages"] = idx.zero_fill_pages
    if domain is not None:
        facts.guest_name = domain.name
        facts.uuid = facts.uuid or domain.uuid
        facts.vcpus = domain.vcpus
        facts.arch = domain.arch
        if domain.memory_bytes is not None:
            facts.memory_bytes = domain.memory_bytes
        if domain.domain_type:
            facts.hypervisor = f"qemu/{domain.domain_type}"
    if not main:
        raise UnsupportedFeature(
            source.name,
            source.start,
            feature="stream without a known main RAM block (pc.ram or ram-node<N>; blocks: "
            + ", ".join(b.name for b in idx.blocks)
            + ")",
        )
    if not _is_x86(machine):
        raise UnsupportedFeature(
            source.name, source.start, feature=f"guest physical layout of machine type {machine}"
        )
    for b in idx.blocks:
        if b not in main:
            facts.skipped.append(f"RAM block {b.name} ({b.length} bytes): device memory, not guest RAM")

    base = np.full(len(idx.blocks), -1, dtype=np.int64)
    at = 0
    for b in main:
        base[b.index] = at
        at += b.length
    ram_off = base[block_of] + (page_of << PAGE_SHIFT)
    in_main = base[block_of] >= 0
    ram_off, offs = ram_off[in_main], offs[in_main]
    lowmem = x86.lowmem_bytes(machine, ram_bytes)
    gfns = x86.ram_offset_to_gpa(ram_off, lowmem) >> np.uint64(PAGE_SHIFT)
    m = (machine or "pc").lower()
    if not options.device_memory and not m.startswith("microvm"):
        vga = (gfns >= np.uint64(x86.VGA_WINDOW[0])) & (gfns < np.uint64(x86.VGA_WINDOW[1]))
        dropped = int(vga.sum())
        if dropped:
            gfns, offs = gfns[~vga], offs[~vga]
            facts.skipped.append(
                f"{dropped} pages of RAM behind the legacy VGA window 0xa0000-0xbffff"
                " (--device-memory keeps them)"
            )
    if idx.cut_note is not None:
        facts.skipped.append(idx.cut_note)
    facts.extra["zero_pages"] = int(np.count_nonzero(offs == ZERO_PAGE))
    return QemuStreamDump(source, facts, buf, gfns.astype(np.uint64), offs, idx.side_pages())


def open_qemu_stream(source: Source, options: OpenOptions) -> Dump:
    """The registry's opener: a bare stream (``virsh dump``, ``migrate exec:``)."""
    return open_stream(source, options)


FORMAT = FormatSpec(
    name="qemu-stream",
    description="QEMU migration stream (virsh dump without --memory-only, migrate to file)",
    probe=probe,
    open=open_qemu_stream,
)
