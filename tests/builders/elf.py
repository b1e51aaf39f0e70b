"""Build ELF core files from a small description, written from the gABI and QEMU ``dump/dump.c``
(FORMATS.md §2.1): ELF32/ELF64, either byte order, PN_XNUM, QEMU 7.2's layout (section headers
before the program headers, ``e_ehsize = 8``), notes, and PT_LOADs with ``p_filesz < p_memsz``."""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

EM_386 = 3
EM_X86_64 = 62
EM_AARCH64 = 183
PT_LOAD = 1
PT_NOTE = 4
PN_XNUM = 0xFFFF
PAGE = 4096


@dataclass(frozen=True)
class Segment:
    """One PT_LOAD: ``data`` stored in the file at guest physical ``paddr``; ``memsz`` (default
    ``len(data)``) may be larger: the rest reads as zeros."""

    paddr: int
    data: bytes
    memsz: int | None = None
    vaddr: int = 0
    #: Place the data at this file offset instead of the next aligned one (for lying headers).
    offset: int | None = None
    #: Store p_filesz as this instead of len(data) (for lying headers).
    filesz: int | None = None


@dataclass(frozen=True)
class Note:
    name: str
    type: int
    desc: bytes


@dataclass
class BuiltElf:
    data: bytes
    phoff: int
    phentsize: int
    #: File offset of each segment's program header and data, in the order given.
    phdr_offsets: list[int] = field(default_factory=list)
    data_offsets: list[int] = field(default_factory=list)


def prstatus_note() -> Note:
    """An x86-64 NT_PRSTATUS note (336-byte ``elf_prstatus``), as QEMU writes one per vCPU."""
    return Note("CORE", 1, bytes(336))


def qemu_note() -> Note:
    """QEMU's CPU-state note (``QEMUCPUState``, name "QEMU", type 0)."""
    return Note("QEMU", 0, bytes(0x1B8))


def vmcoreinfo_note(osrelease: str = "6.1.0-18-amd64") -> Note:
    text = (
        f"OSRELEASE={osrelease}\nPAGESIZE=4096\nSYMBOL(init_uts_ns)=ffffffff82a12340\nCRASHTIME=1700000000\n"
    )
    return Note("VMCOREINFO", 0, text.encode())


def _note_bytes(order: str, note: Note) -> bytes:
    name = note.name.encode() + b"\0"
    out = struct.pack(order + "III", len(name), len(note.desc), note.type)
    out += name.ljust((len(name) + 3) // 4 * 4, b"\0")
    out += note.desc.ljust((len(note.desc) + 3) // 4 * 4, b"\0")
    return out


def build_elf(
    segments: list[Segment],
    *,
    elf_class: int = 64,
    big_endian: bool = False,
    machine: int = EM_X86_64,
    notes: list[Note] | None = None,
    qemu_layout: bool = False,
    pn_xnum: bool = False,
    e_type: int = 4,
    phentsize: int | None = None,
    extra_phdrs: int = 0,
) -> BuiltElf:
    """An ELF core whose PT_NOTE holds ``notes`` and whose PT_LOADs are ``segments`` (data page
    aligned in the file, in the order given).  ``qemu_layout`` writes QEMU 7.2's section header
    table (null + ``.shstrtab``) before the program headers and ``e_ehsize = 8``; ``pn_xnum``
    stores ``e_phnum = 0xFFFF`` and the count in section header 0.  ``extra_phdrs`` adds PT_NULL
    entries (to reach large counts cheaply)."""
    order = ">" if big_endian else "<"
    is64 = elf_class == 64
    ehsize = 64 if is64 else 52
    phsize = 56 if is64 else 32
    shsize = 64 if is64 else 40
    phentsize = phentsize or phsize
    notes = notes if notes is not None else []
    note_blob = b"".join(_note_bytes(order, n) for n in notes)
    nphdr = len(segments) + (1 if notes else 0) + extra_phdrs
    with_sections = qemu_layout or pn_xnum
    shoff = ehsize if with_sections else 0
    shnum = 2 if with_sections else 0
    phoff = shoff + shnum * shsize if with_sections else ehsize
    pos = phoff + nphdr * phentsize
    note_at = pos
    pos += len(note_blob)
    data_offsets = []
    for seg in segments:
        pos = (pos + PAGE - 1) // PAGE * PAGE
        at = seg.offset if seg.offset is not None else pos
        data_offsets.append(at)
        pos = max(pos, at + len(seg.data))
    strtab_at = pos
    strtab = b"\0.shstrtab\0"
    total = strtab_at + (len(strtab) if with_sections else 0)
    out = bytearray(total)

    e_phnum = PN_XNUM if pn_xnum else nphdr
    ident = b"\x7fELF" + bytes([2 if is64 else 1, 2 if big_endian else 1, 1, 0]) + bytes(8)
    e_ehsize = 8 if qemu_layout else ehsize
    fmt = "16sHHIQQQIHHHHHH" if is64 else "16sHHIIIIIHHHHHH"
    struct.pack_into(
        order + fmt, out, 0, ident, e_type, machine, 1, 0, phoff, shoff, 0, e_ehsize,
        phentsize, e_phnum, shsize if with_sections else 0, shnum, 1 if with_sections else 0,
    )  # fmt: skip
    if with_sections:
        sh0_info = nphdr if pn_xnum else 0
        if is64:
            struct.pack_into(order + "IIQQQQIIQQ", out, shoff, 0, 0, 0, 0, 0, 0, 0, sh0_info, 0, 0)
            struct.pack_into(
                order + "IIQQQQIIQQ", out, shoff + shsize, 1, 3, 0, 0, strtab_at, len(strtab), 0, 0, 1, 0
            )
        else:
            struct.pack_into(order + "IIIIIIIIII", out, shoff, 0, 0, 0, 0, 0, 0, 0, sh0_info, 0, 0)
            struct.pack_into(
                order + "IIIIIIIIII", out, shoff + shsize, 1, 3, 0, 0, strtab_at, len(strtab), 0, 0, 1, 0
            )
        out[strtab_at : strtab_at + len(strtab)] = strtab

    def phdr(i: int, ptype: int, offset: int, vaddr: int, paddr: int, filesz: int, memsz: int) -> int:
        at = phoff + i * phentsize
        if is64:
            struct.pack_into(order + "IIQQQQQQ", out, at, ptype, 4, offset, vaddr, paddr, filesz, memsz, 0)
        else:
            struct.pack_into(order + "IIIIIIII", out, at, ptype, offset, vaddr, paddr, filesz, memsz, 4, 0)
        return at

    i = 0
    if notes:
        phdr(0, PT_NOTE, note_at, 0, 0, len(note_blob), 0)
        out[note_at : note_at + len(note_blob)] = note_blob
        i = 1
    phdr_offsets = []
    for seg, at in zip(segments, data_offsets, strict=True):
        filesz = seg.filesz if seg.filesz is not None else len(seg.data)
        memsz = seg.memsz if seg.memsz is not None else len(seg.data)
        phdr_offsets.append(phdr(i, PT_LOAD, at, seg.vaddr, seg.paddr, filesz, memsz))
        if at + len(seg.data) <= len(out):
            out[at : at + len(seg.data)] = seg.data
        i += 1
    return BuiltElf(bytes(out), phoff, phentsize, phdr_offsets, data_offsets)
