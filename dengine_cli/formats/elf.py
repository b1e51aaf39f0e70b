"""ELF core files whose PT_LOAD segments hold guest physical memory: QEMU ``dump-guest-memory``
(``virsh dump --memory-only``, the default ``elf`` format), ``/proc/vmcore`` copies and other
ELF vmcores.

Sources: the System V gABI (ELF header, program headers, notes, PN_XNUM); QEMU ``dump/dump.c``
and ``system/memory_mapping.c`` (one PT_LOAD per guest RAM block; ``p_vaddr = p_paddr`` in QEMU 7.2
files, 0 in other versions' simple mapping, a guest virtual address only with
``paging=true``); FORMATS.md §2.1 (quirks seen in real QEMU 7.2 files).

How pages are found: a PT_LOAD puts guest physical bytes ``[p_paddr, p_paddr + p_memsz)`` at
file offset ``p_offset``; bytes past ``p_filesz`` are zeros stored nowhere (present zero pages).
Choices made here:

* The program header table is always found by ``e_phoff`` / ``e_phentsize`` / ``e_phnum`` (with
  PN_XNUM: the real count in ``sh_info`` of section header 0), never assumed to follow the ELF
  header: QEMU 7.2 writes its section headers first and a bogus ``e_ehsize`` of 8, which is
  therefore ignored.  Word size comes from ``EI_CLASS``, never from ``e_machine`` (QEMU writes
  EM_386 into ELF64 files of guests not in long mode).
* Segments need not be page aligned.  QEMU 7.2 stores segment data at unaligned file offsets
  (p_offset 0x6f0, 0xa06f0, ... right after the notes; p_paddr is aligned) and ``/proc/vmcore``
  has segments from /proc/iomem such as 0x1000-0x9fbff.  Pages read from unaligned offsets are
  still views of the mapping.  A page a segment covers whole is read from the file; a page
  segments cover only in part is present with its uncovered bytes zero (as LiME pads them), so an
  ELF and a LiME dump of one machine hold the same pages.  In a QEMU dump (QEMU notes) segments
  are guest RAM blocks of whole pages: a p_paddr or p_memsz that is not a multiple of the page
  size is an error (a partial page there would make RAM above it look like device memory).
* The program header table must hold at least one PT_LOAD (e_phnum = 0 or no PT_LOAD: no
  guest memory, an error), in entries of exactly sizeof(Elf32_Phdr) / sizeof(Elf64_Phdr).
* Segments overlapping in physical address space are an error, except a segment lying wholly
  inside another whose ``p_vaddr`` is a virtual alias (``/proc/vmcore``'s kernel-text segment
  repeats part of a RAM segment): it is dropped and listed in ``facts.skipped``.
* A QEMU dump made with ``paging=true`` (PT_LOADs with ``p_vaddr`` other than 0 or ``p_paddr``)
  follows guest virtual mappings, so it can repeat or omit physical pages: UnsupportedFeature.
* In QEMU dumps of x86 guests the device memory (VGA VRAM, BIOS flash) is dropped unless
  ``options.device_memory`` (see :mod:`dengine_cli.formats.x86`).
* An ELF vmcore in makedumpfile's flattened stream (``makedumpfile -F -E``) is parsed through
  the stream's record index (the kdump reader finds it); its pages point into the flattened file
  (makedumpfile 1.7.2 writes 64 KiB records from offset 0xff8, so pages are stored whole).
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import numpy.typing as npt

from dengine_cli.errors import UnsupportedFeature
from dengine_cli.formats import x86
from dengine_cli.formats.base import (
    SIDE_PAGE,
    ZERO_PAGE,
    Dump,
    GuestFacts,
    OpenOptions,
    PageTableDump,
    Source,
    extent_page_table,
    gfn_runs,
    map_file,
    require,
)
from dengine_cli.formats.registry import FormatSpec
from dengine_cli.pages import PAGE_SHIFT, PAGE_SIZE, GfnArray, OffsetArray, PageArray

# gABI e_ident and header constants.
ELF_MAGIC = b"\x7fELF"
EI_CLASS = 4
EI_DATA = 5
ELFCLASS32 = 1
ELFCLASS64 = 2
ELFDATA2LSB = 1
ELFDATA2MSB = 2
ET_CORE = 4
PT_LOAD = 1
PT_NOTE = 4
#: e_phnum value meaning "the real count is in section header 0's sh_info" (gABI).
PN_XNUM = 0xFFFF
#: Core-file note types (Linux ``include/uapi/linux/elf.h``).
NT_PRSTATUS = 1
#: Note names: QEMU's CPU-state notes, Linux's VMCOREINFO (kernel/crash_core.c).
QEMU_NOTE_NAME = "QEMU"
VMCOREINFO_NOTE_NAME = "VMCOREINFO"
#: VMCOREINFO keys shown as facts (the SYMBOL/OFFSET/SIZE/NUMBER lines are for debuggers).
VMCOREINFO_KEYS = ("OSRELEASE", "BUILD-ID", "PAGESIZE", "KERNELOFFSET", "CRASHTIME")

#: e_machine -> architecture name (gABI machine numbers).
MACHINES = {
    3: "x86",
    8: "mips",
    20: "ppc",
    21: "ppc64",
    22: "s390",
    40: "arm",
    62: "x86_64",
    183: "aarch64",
    243: "riscv",
}
X86_MACHINES = (3, 62)
#: The most zero pages past p_filesz all segments together may claim (16 GiB): they are stored
#: nowhere, so the file size cannot bound them, and each costs 16 bytes of page table (16 GiB of
#: them: 230 MiB at peak; 1 TiB took 4 GiB, which a lying header must not make dengine take).
#: QEMU and the kernel's /proc/vmcore write p_filesz == p_memsz.
MAX_ZERO_TAIL = 16 << 30

#: e_ident[16], e_type, e_machine, e_version, e_entry, e_phoff, e_shoff, e_flags, e_ehsize,
#: e_phentsize, e_phnum, e_shentsize, e_shnum, e_shstrndx (after the endianness prefix).
EHDR_LAYOUT = {ELFCLASS32: "16sHHIIIIIHHHHHH", ELFCLASS64: "16sHHIQQQIHHHHHH"}
#: Program header fields per class: (name, type, offset); the entry size comes from e_phentsize.
PHDR_FIELDS = {
    ELFCLASS32: [
        ("p_type", "u4", 0),
        ("p_offset", "u4", 4),
        ("p_vaddr", "u4", 8),
        ("p_paddr", "u4", 12),
        ("p_filesz", "u4", 16),
        ("p_memsz", "u4", 20),
    ],
    ELFCLASS64: [
        ("p_type", "u4", 0),
        ("p_offset", "u8", 8),
        ("p_vaddr", "u8", 16),
        ("p_paddr", "u8", 24),
        ("p_filesz", "u8", 32),
        ("p_memsz", "u8", 40),
    ],
}
#: sizeof(Elf32_Phdr), sizeof(Elf64_Phdr): the only e_phentsize a reader of PHDR_FIELDS can trust.
PHDR_SIZE = {ELFCLASS32: 32, ELFCLASS64: 56}
#: Offsets of ELF header fields messages name, per class.
E_PHOFF_AT = {ELFCLASS32: 28, ELFCLASS64: 32}
E_PHENTSIZE_AT = {ELFCLASS32: 42, ELFCLASS64: 54}
E_PHNUM_AT = {ELFCLASS32: 44, ELFCLASS64: 56}
E_SHOFF_AT = {ELFCLASS32: 32, ELFCLASS64: 40}
SHDR_SIZE = {ELFCLASS32: 40, ELFCLASS64: 64}
#: Offset of sh_info in a section header, per class.
SH_INFO_AT = {ELFCLASS32: 28, ELFCLASS64: 44}
NOTE_HEADER = 12


@dataclass(frozen=True)
class ElfHeader:
    """The ELF header fields a core reader needs."""

    elf_class: int
    order: str  # struct/numpy byte-order prefix: "<" or ">"
    machine: int
    phoff: int
    shoff: int
    phentsize: int
    phnum: int
    shentsize: int


def _ident(head: bytes) -> tuple[int, str] | None:
    """(class, byte-order prefix) of an ELF identification, or None if it is not one."""
    if len(head) < 16 or head[:4] != ELF_MAGIC:
        return None
    elf_class, data = head[EI_CLASS], head[EI_DATA]
    if elf_class not in (ELFCLASS32, ELFCLASS64) or data not in (ELFDATA2LSB, ELFDATA2MSB):
        return None
    return elf_class, "<" if data == ELFDATA2LSB else ">"


def parse_header(head: bytes) -> ElfHeader | None:
    """The ELF header of a core file, or None when ``head`` is not an ELF ET_CORE header."""
    ident = _ident(head)
    if ident is None:
        return None
    elf_class, order = ident
    layout = struct.Struct(order + EHDR_LAYOUT[elf_class])
    if len(head) < layout.size:
        return None
    f = layout.unpack_from(head)
    if f[1] != ET_CORE:
        return None
    return ElfHeader(elf_class, order, f[2], f[5], f[6], f[9], f[10], f[11])


def probe(head: bytes, size: int) -> bool:
    """An ELF core file with program headers (xc_core files have none: see ``xc_core``)."""
    hdr = parse_header(head)
    return hdr is not None and hdr.phnum > 0


def _phdr_dtype(elf_class: int, order: str, entsize: int) -> np.dtype[np.void]:
    fields = PHDR_FIELDS[elf_class]
    return np.dtype(
        {
            "names": [n for n, _, _ in fields],
            "formats": [order + t for _, t, _ in fields],
            "offsets": [o for _, _, o in fields],
            "itemsize": entsize,
        }
    )


class ElfImage(Protocol):
    """The bytes of the ELF file as its offsets count them: the file itself from
    ``source.start``, or the file a makedumpfile flattened stream reassembles to
    (:class:`dengine_cli.formats.kdump.KdumpImage`)."""

    size: int

    def read(self, offset: int, length: int, what: str) -> bytes:
        """``length`` bytes at ``offset``; a FormatError naming ``what`` past the end."""
        ...

    def file_offset(self, offset: int) -> int:
        """The absolute offset in the file that messages name for ``offset``."""
        ...


#: ``translate(offsets, lengths)``: offsets of a flattened file holding ``lengths`` bytes at each
#: of ``offsets`` of the reassembled one (-1 where no single record holds them).
Translate = Callable[[OffsetArray, OffsetArray], OffsetArray]


class _PlainImage:
    """An ELF file stored as it is, from ``source.start`` on."""

    def __init__(self, source: Source, buf: npt.NDArray[np.uint8]) -> None:
        self.source = source
        self.buf = buf
        self.base = source.start
        self.size = len(buf) - source.start

    def read(self, offset: int, length: int, what: str) -> bytes:
        require(self.source, self.buf, self.base + offset, length, what)
        return self.buf[self.base + offset : self.base + offset + length].tobytes()

    def file_offset(self, offset: int) -> int:
        return self.base + offset


def _end_text(image: ElfImage) -> str:
    """What messages say the file ends at."""
    if isinstance(image, _PlainImage):
        return f"end of file at {len(image.buf):#x}"
    return f"the reassembled ELF file ending at {image.size:#x}"


def _program_header_count(source: Source, image: ElfImage, hdr: ElfHeader) -> int:
    if hdr.phnum != PN_XNUM:
        return hdr.phnum
    # PN_XNUM: the real count is sh_info of section header 0.
    size = SHDR_SIZE[hdr.elf_class]
    xnum = f"e_phnum = PN_XNUM ({PN_XNUM:#x})"
    if hdr.shoff == 0 or hdr.shoff + size > image.size:
        where = "no section header table" if hdr.shoff == 0 else f"past the {_end_text(image)}"
        raise source.error(
            image.file_offset(E_SHOFF_AT[hdr.elf_class]),
            expected=f"section header 0 ({size} bytes at e_shoff) holding the program header count in "
            "sh_info, as e_phnum is PN_XNUM",
            found=f"{xnum} and e_shoff = {hdr.shoff:#x}: {where}",
        )
    sh0 = image.read(hdr.shoff, size, "section header 0 (PN_XNUM count)")
    (count,) = struct.unpack_from(hdr.order + "I", sh0, SH_INFO_AT[hdr.elf_class])
    return int(count)


@dataclass
class Notes:
    """What an ELF core's notes tell."""

    prstatus: int = 0
    qemu: bool = False
    vmcoreinfo: dict[str, str] | None = None


def _read_notes(source: Source, data: bytes, order: str, at: int, notes: Notes) -> None:
    """Walk the bytes of one PT_NOTE segment, which starts at absolute offset ``at``."""
    header = struct.Struct(order + "III")
    pos = 0
    while pos + NOTE_HEADER <= len(data):
        namesz, descsz, ntype = header.unpack_from(data, pos)
        name_at = pos + NOTE_HEADER
        desc_at = name_at + (namesz + 3) // 4 * 4
        end = desc_at + (descsz + 3) // 4 * 4
        if desc_at + descsz > len(data):
            raise source.error(
                at + pos,
                expected=f"an ELF note of {NOTE_HEADER + namesz + descsz} bytes within its PT_NOTE",
                found=f"{len(data) - pos} bytes left in the segment",
            )
        name = data[name_at : name_at + namesz].split(b"\0", 1)[0].decode("latin-1")
        if name == "CORE" and ntype == NT_PRSTATUS:
            notes.prstatus += 1
        elif name == QEMU_NOTE_NAME:
            notes.qemu = True
        elif name == VMCOREINFO_NOTE_NAME:
            text = data[desc_at : desc_at + descsz].decode("utf-8", "replace")
            info: dict[str, str] = {}
            for line in text.splitlines():
                key, sep, value = line.partition("=")
                if sep and key in VMCOREINFO_KEYS:
                    info[key] = value
            notes.vmcoreinfo = info
        pos = end


@dataclass
class ElfLayout:
    """What the headers of an ELF core say: guest memory as byte extents of the ELF file
    (offsets counted from its start; :data:`ZERO_PAGE` for zeros stored nowhere)."""

    hdr: ElfHeader
    notes: Notes
    pt_loads: int
    addrs: list[int]
    lengths: list[int]
    offsets: list[int]
    skipped: list[str]


def open_elf(source: Source, options: OpenOptions) -> Dump:
    buf = map_file(source)
    layout = parse_layout(source, _PlainImage(source, buf))
    base = source.start
    file_offsets = [o if o == ZERO_PAGE else base + o for o in layout.offsets]
    gfns, offsets, side = extent_page_table(buf, layout.addrs, layout.lengths, file_offsets)
    gfns, offsets, facts = _finish(layout, gfns, offsets, options)
    return PageTableDump(source, facts, buf, gfns, offsets, side)


def open_flattened_elf(
    source: Source, options: OpenOptions, buf: npt.NDArray[np.uint8], image: ElfImage, translate: Translate
) -> Dump:
    """An ELF core inside a makedumpfile flattened stream (``makedumpfile -F -E``), read in
    place: ``image`` reads the reassembled ELF file, ``translate`` maps its offsets to offsets
    of ``buf`` (the flattened file; -1 where the bytes cross records or lie in a hole).

    Pages a record holds whole are read from the mapping like any ELF page (runs of them are
    views); pages that cross records are assembled from the records when read, never held."""
    layout = parse_layout(source, image)
    gfns, logical, side = extent_page_table(
        None, layout.addrs, layout.lengths, layout.offsets, read=image.read
    )
    offsets = logical.copy()
    whole = np.flatnonzero(logical >= 0)
    physical = translate(logical[whole], np.full(len(whole), PAGE_SIZE, dtype=np.int64))
    offsets[whole] = physical
    crossing = whole[physical < 0]
    # Pages crossing records: side pages numbered after the ones assembled above.
    offsets[crossing] = SIDE_PAGE - len(side) - np.arange(len(crossing), dtype=np.int64)
    pages = FlattenedSidePages(side, logical[crossing], image)
    gfns, offsets, facts = _finish(layout, gfns, offsets, options)
    facts.extra["container"] = "flattened"
    return PageTableDump(source, facts, buf, gfns, offsets, pages)


class FlattenedSidePages:
    """Side pages of a flattened ELF: the few assembled at open time (pages segments cover in
    part), then pages that cross records, read through the reassembled image when asked for."""

    def __init__(self, eager: PageArray, crossing: OffsetArray, image: ElfImage) -> None:
        self.eager = eager
        self.crossing = crossing
        self.image = image

    def __len__(self) -> int:
        return len(self.eager) + len(self.crossing)

    def __getitem__(self, rows: npt.NDArray[np.int64]) -> PageArray:
        out = np.empty((len(rows), PAGE_SIZE), dtype=np.uint8)
        for k, row in enumerate(rows.tolist()):
            if row < len(self.eager):
                out[k] = self.eager[row]
            else:
                at = int(self.crossing[row - len(self.eager)])
                out[k] = np.frombuffer(self.image.read(at, PAGE_SIZE, "page data"), dtype=np.uint8)
        return out


def parse_layout(source: Source, image: ElfImage) -> ElfLayout:
    """Read and check the ELF header, program headers and notes of an ELF core."""
    hdr = parse_header(image.read(0, min(image.size, 64), "an ELF header"))
    if hdr is None:
        first = image.read(0, min(image.size, 20), "an ELF header")
        found = first.hex(" ") if first else "an empty file"
        raise source.error(image.file_offset(0), expected="an ELF core file (\\x7fELF, ET_CORE)", found=found)
    cls_name = "ELF64" if hdr.elf_class == ELFCLASS64 else "ELF32"
    phnum = _program_header_count(source, image, hdr)
    if phnum == 0:
        if hdr.phnum == PN_XNUM:
            raise source.error(
                image.file_offset(hdr.shoff + SH_INFO_AT[hdr.elf_class]),
                expected="program headers (sh_info > 0 in section header 0, as e_phnum is PN_XNUM)",
                found=f"e_phnum = PN_XNUM ({PN_XNUM:#x}) and sh_info = 0 in section header 0 "
                f"(at e_shoff {hdr.shoff:#x})",
            )
        raise source.error(
            image.file_offset(E_PHNUM_AT[hdr.elf_class]),
            expected="program headers (e_phnum > 0)",
            found="e_phnum = 0",
        )
    # Entries of another size are no Elf32/Elf64_Phdr: a larger e_phentsize would walk the table
    # at the wrong stride and read page data as program headers.
    if hdr.phentsize != PHDR_SIZE[hdr.elf_class]:
        raise source.error(
            image.file_offset(E_PHENTSIZE_AT[hdr.elf_class]),
            expected=f"e_phentsize = {PHDR_SIZE[hdr.elf_class]} for {cls_name} "
            f"(the size of Elf{cls_name[3:]}_Phdr)",
            found=str(hdr.phentsize),
        )
    table = image.read(hdr.phoff, phnum * hdr.phentsize, f"{phnum} program headers")
    phdrs = np.frombuffer(table, dtype=_phdr_dtype(hdr.elf_class, hdr.order, hdr.phentsize), count=phnum)
    file_size = image.size
    table_at = image.file_offset(hdr.phoff)
    ptype = phdrs["p_type"]
    # No PT_LOAD at all: no guest memory, as with e_phnum = 0 (an e_phoff pointing elsewhere
    # reads anything as program headers).  A PT_LOAD with p_memsz 0 is a segment: an empty dump.
    if not (ptype == PT_LOAD).any():
        raise source.error(
            image.file_offset(E_PHOFF_AT[hdr.elf_class]),
            expected=f"program headers with a PT_LOAD segment (guest memory) at e_phoff {hdr.phoff:#x}",
            found=f"{phnum} program header{'s' if phnum > 1 else ''} there, none of type PT_LOAD",
        )
    notes = Notes()
    for i in np.flatnonzero(ptype == PT_NOTE).tolist():
        p = phdrs[i]
        off, note_size = int(p["p_offset"]), int(p["p_filesz"])
        if off + note_size > file_size:
            raise source.error(
                table_at + i * hdr.phentsize,
                expected=f"PT_NOTE at {image.file_offset(off):#x} + {note_size:#x} within the file",
                found=_end_text(image),
            )
        _read_notes(source, image.read(off, note_size, "PT_NOTE"), hdr.order, image.file_offset(off), notes)

    idx = np.flatnonzero((ptype == PT_LOAD) & (phdrs["p_memsz"] > 0))
    loads = phdrs[idx]
    offset = loads["p_offset"].astype(np.uint64)
    filesz = loads["p_filesz"].astype(np.uint64)
    memsz = loads["p_memsz"].astype(np.uint64)
    paddr = loads["p_paddr"].astype(np.uint64)
    vaddr = loads["p_vaddr"].astype(np.uint64)
    header_at = table_at + idx.astype(np.int64) * hdr.phentsize

    # Lying headers, vectorized; the first offending program header is named.
    beyond = (filesz > np.uint64(file_size)) | (offset > np.uint64(file_size) - filesz)
    if beyond.any():
        i = int(np.flatnonzero(beyond)[0])
        raise source.error(
            int(header_at[i]),
            expected=f"PT_LOAD data at {image.file_offset(int(offset[i])):#x} + {int(filesz[i]):#x} "
            "within the file",
            found=_end_text(image),
        )
    too_big = filesz > memsz
    if too_big.any():
        i = int(np.flatnonzero(too_big)[0])
        raise source.error(
            int(header_at[i]),
            expected="a PT_LOAD with p_filesz <= p_memsz",
            found=f"p_filesz {int(filesz[i]):#x} > p_memsz {int(memsz[i]):#x}",
        )
    wraps = paddr > np.uint64(2**64 - 1) - memsz
    if wraps.any():
        i = int(np.flatnonzero(wraps)[0])
        raise source.error(
            int(header_at[i]),
            expected="a PT_LOAD within the 64-bit physical address space",
            found=f"p_paddr {int(paddr[i]):#x} + p_memsz {int(memsz[i]):#x}",
        )
    tails = np.cumsum((memsz - filesz) // np.uint64(PAGE_SIZE), dtype=np.uint64)
    if len(tails) and int(tails[-1]) * PAGE_SIZE > MAX_ZERO_TAIL:
        i = int(np.searchsorted(tails, np.uint64(MAX_ZERO_TAIL // PAGE_SIZE), side="right"))
        raise source.error(
            int(header_at[i]),
            expected=f"at most {MAX_ZERO_TAIL:#x} bytes of zero pages past p_filesz in all PT_LOADs",
            found=f"p_memsz {int(memsz[i]):#x} with p_filesz {int(filesz[i]):#x}",
        )
    if notes.qemu:
        paging = (vaddr != 0) & (vaddr != paddr)
        if paging.any():
            i = int(np.flatnonzero(paging)[0])
            raise UnsupportedFeature(
                source.name,
                int(header_at[i]),
                feature="QEMU dump made with paging=true (PT_LOAD p_vaddr "
                f"{int(vaddr[i]):#x} != p_paddr {int(paddr[i]):#x}); dump with paging=false",
            )
        # QEMU writes one PT_LOAD per guest RAM block, whole pages (FORMATS.md §2.1; only p_offset
        # may be unaligned).  A segment starting or ending inside a page is a lying header: its
        # partial page would also break the RAM map that tells device memory from RAM
        # (x86.device_memory_mask), which would drop the RAM above it.
        field_at = {name: at for name, _, at in PHDR_FIELDS[hdr.elf_class]}
        page_mask = np.uint64(PAGE_SIZE - 1)
        for name, values in (("p_paddr", paddr), ("p_memsz", memsz)):
            partial = (values & page_mask) != 0
            if partial.any():
                i = int(np.flatnonzero(partial)[0])
                raise source.error(
                    int(header_at[i]) + field_at[name],
                    expected=f"a QEMU PT_LOAD of whole pages ({name} a multiple of {PAGE_SIZE:#x})",
                    found=f"{name} {int(values[i]):#x}",
                )
    if len(loads) > 1 and not paddr.any():
        raise UnsupportedFeature(
            source.name, table_at, feature="PT_LOAD segments without physical addresses (every p_paddr is 0)"
        )

    skipped: list[str] = []
    keep = _drop_aliases(source, paddr, memsz, vaddr, header_at, skipped)
    addrs: list[int] = []
    lengths: list[int] = []
    file_offsets: list[int] = []
    for i in keep.tolist():
        a, f, m = int(paddr[i]), int(filesz[i]), int(memsz[i])
        addrs.append(a)
        lengths.append(f)
        file_offsets.append(int(offset[i]))
        if m > f:
            addrs.append(a + f)
            lengths.append(m - f)
            file_offsets.append(ZERO_PAGE)
    return ElfLayout(hdr, notes, len(loads), addrs, lengths, file_offsets, skipped)


def _finish(
    layout: ElfLayout, gfns: GfnArray, offsets: OffsetArray, options: OpenOptions
) -> tuple[GfnArray, OffsetArray, GuestFacts]:
    """The page table sorted, device memory dropped, and the guest facts."""
    hdr, notes, skipped = layout.hdr, layout.notes, list(layout.skipped)
    order = np.argsort(gfns, kind="stable")
    gfns, offsets = gfns[order], offsets[order]
    if notes.qemu and hdr.machine in X86_MACHINES and not options.device_memory:
        device = x86.device_memory_mask(gfns)
        if device.any():
            for first, count in gfn_runs(gfns[device]):
                skipped.append(f"device memory {first << PAGE_SHIFT:#x}-{(first + count) << PAGE_SHIFT:#x}")
            gfns, offsets = gfns[~device], offsets[~device]

    extra: dict[str, object] = {
        "elf_class": "ELF64" if hdr.elf_class == ELFCLASS64 else "ELF32",
        "byte_order": "little" if hdr.order == "<" else "big",
        "e_machine": hdr.machine,
        "pt_load_segments": layout.pt_loads,
    }
    if notes.vmcoreinfo is not None:
        extra["vmcoreinfo"] = notes.vmcoreinfo
        if "OSRELEASE" in notes.vmcoreinfo:
            extra["osrelease"] = notes.vmcoreinfo["OSRELEASE"]
    facts = GuestFacts(
        format="elf",
        memory_bytes=len(gfns) * PAGE_SIZE,
        vcpus=notes.prstatus or None,
        arch=MACHINES.get(hdr.machine, f"e_machine {hdr.machine}"),
        hypervisor="qemu" if notes.qemu else None,
        extra=extra,
        skipped=skipped,
    )
    return gfns, offsets, facts


def _drop_aliases(
    source: Source,
    paddr: npt.NDArray[np.uint64],
    memsz: npt.NDArray[np.uint64],
    vaddr: npt.NDArray[np.uint64],
    header_at: npt.NDArray[np.int64],
    skipped: list[str],
) -> npt.NDArray[np.intp]:
    """Indices of the PT_LOADs to read: overlaps are errors, except virtual aliases that lie
    wholly inside another segment (``/proc/vmcore``'s kernel text), which are dropped."""
    by_addr = np.lexsort((np.uint64(2**64 - 1) - memsz, paddr))
    keep: list[int] = []
    reach = 0  # end of the physical range covered by the segments kept so far
    holder = -1
    for i in by_addr.tolist():
        start, end = int(paddr[i]), int(paddr[i]) + int(memsz[i])
        if start < reach:
            alias = int(vaddr[i]) not in (0, start)
            if alias and end <= int(paddr[holder]) + int(memsz[holder]):
                skipped.append(
                    f"PT_LOAD at {start:#x}-{end:#x} (p_vaddr {int(vaddr[i]):#x}): a virtual alias "
                    "of memory another segment holds"
                )
                continue
            raise source.error(
                int(header_at[i]),
                expected="PT_LOAD segments not overlapping in physical address space",
                found=f"{start:#x}-{end:#x} overlapping "
                f"{int(paddr[holder]):#x}-{int(paddr[holder]) + int(memsz[holder]):#x}",
            )
        keep.append(i)
        reach, holder = end, i
    return np.array(sorted(keep), dtype=np.intp)


FORMAT = FormatSpec(
    name="elf",
    description="ELF core with PT_LOAD segments (QEMU dump-guest-memory, /proc/vmcore)",
    probe=probe,
    open=open_elf,
)
