"""Where the parts of a seed dump are: integer fields, regions, records and cut points.

The mutator is format-aware through this map alone: each seed builder (or fixture slicer) walks
its own bytes with the formats' published layouts (the same sources the readers cite) and notes
where each header field, descriptor, page table entry and compressed page lies.  Nothing here
imports the readers: a map drawn from a reader would share its mistakes.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Field:
    """An integer of ``size`` bytes at ``offset``, in byte order ``order`` (``"<"``/``">"``)."""

    offset: int
    size: int
    order: str
    name: str


@dataclass(frozen=True)
class Region:
    """``length`` bytes at ``offset``: a header, a table, a page, a compressed page, a record."""

    offset: int
    length: int
    name: str


@dataclass
class Layout:
    """The map of one seed file."""

    fields: list[Field] = field(default_factory=list)
    regions: list[Region] = field(default_factory=list)
    #: Units that may be duplicated or dropped whole (program headers, LiME ranges, stream
    #: records, flattened records).
    records: list[Region] = field(default_factory=list)
    #: Offsets worth truncating at (ends of headers, tables, records).
    cuts: set[int] = field(default_factory=set)

    def int(self, offset: int, size: int, order: str, name: str) -> None:
        self.fields.append(Field(offset, size, order, name))

    def region(self, offset: int, length: int, name: str) -> None:
        if length > 0:
            self.regions.append(Region(offset, length, name))
            self.cuts.update((offset, offset + length, offset + length // 2))

    def record(self, offset: int, length: int, name: str) -> None:
        if length > 0:
            self.records.append(Region(offset, length, name))
            self.cuts.update((offset, offset + length))

    def shifted(self, by: int) -> Layout:
        """The same map for the same bytes placed ``by`` bytes further into a file."""
        return Layout(
            [Field(f.offset + by, f.size, f.order, f.name) for f in self.fields],
            [Region(r.offset + by, r.length, r.name) for r in self.regions],
            [Region(r.offset + by, r.length, r.name) for r in self.records],
            {c + by for c in self.cuts},
        )

    def extend(self, other: Layout) -> None:
        self.fields += other.fields
        self.regions += other.regions
        self.records += other.records
        self.cuts |= other.cuts


def u(data: bytes, offset: int, size: int, order: str) -> int:
    code = {1: "B", 2: "H", 4: "I", 8: "Q"}[size]
    value: int = struct.unpack_from(order + code, data, offset)[0]
    return value


# -- ELF (gABI): used for QEMU cores and xc_core ----------------------------------------------------

_EHDR64 = (
    ("e_type", 16, 2), ("e_machine", 18, 2), ("e_version", 20, 4), ("e_phoff", 32, 8),
    ("e_shoff", 40, 8), ("e_ehsize", 52, 2), ("e_phentsize", 54, 2), ("e_phnum", 56, 2),
    ("e_shentsize", 58, 2), ("e_shnum", 60, 2), ("e_shstrndx", 62, 2),
)  # fmt: skip
_EHDR32 = (
    ("e_type", 16, 2), ("e_machine", 18, 2), ("e_version", 20, 4), ("e_phoff", 28, 4),
    ("e_shoff", 32, 4), ("e_ehsize", 40, 2), ("e_phentsize", 42, 2), ("e_phnum", 44, 2),
    ("e_shentsize", 46, 2), ("e_shnum", 48, 2), ("e_shstrndx", 50, 2),
)  # fmt: skip
_PHDR64 = (
    ("p_type", 0, 4), ("p_flags", 4, 4), ("p_offset", 8, 8), ("p_vaddr", 16, 8), ("p_paddr", 24, 8),
    ("p_filesz", 32, 8), ("p_memsz", 40, 8), ("p_align", 48, 8),
)  # fmt: skip
_PHDR32 = (
    ("p_type", 0, 4), ("p_offset", 4, 4), ("p_vaddr", 8, 4), ("p_paddr", 12, 4), ("p_filesz", 16, 4),
    ("p_memsz", 20, 4), ("p_flags", 24, 4), ("p_align", 28, 4),
)  # fmt: skip
_SHDR64 = (
    ("sh_name", 0, 4), ("sh_type", 4, 4), ("sh_offset", 24, 8), ("sh_size", 32, 8), ("sh_info", 44, 4),
    ("sh_entsize", 56, 8),
)  # fmt: skip
_SHDR32 = (
    ("sh_name", 0, 4), ("sh_type", 4, 4), ("sh_offset", 16, 4), ("sh_size", 20, 4), ("sh_info", 28, 4),
    ("sh_entsize", 36, 4),
)  # fmt: skip
PT_LOAD, PT_NOTE, SHT_NOTE = 1, 4, 7


def elf_layout(data: bytes) -> Layout:
    """Header, program headers, section headers, notes and segment data of an ELF file."""
    lay = Layout()
    is64 = data[4] == 2
    order = ">" if data[5] == 2 else "<"
    lay.int(4, 1, order, "ei_class")
    lay.int(5, 1, order, "ei_data")
    for name, off, size in _EHDR64 if is64 else _EHDR32:
        lay.int(off, size, order, name)
    ehdr = {name: u(data, off, size, order) for name, off, size in (_EHDR64 if is64 else _EHDR32)}
    lay.region(0, 64 if is64 else 52, "ehdr")
    phdr_fields = _PHDR64 if is64 else _PHDR32
    phsize = 56 if is64 else 32
    phoff, phnum = ehdr["e_phoff"], ehdr["e_phnum"]
    if phnum == 0xFFFF and ehdr["e_shoff"]:
        phnum = u(data, ehdr["e_shoff"] + (44 if is64 else 28), 4, order)
    lay.region(phoff, phnum * phsize, "phdrs")
    for i in range(phnum):
        at = phoff + i * phsize
        for name, off, size in phdr_fields:
            lay.int(at + off, size, order, f"phdr[{i}].{name}")
        lay.record(at, phsize, f"phdr[{i}]")
        p = {name: u(data, at + off, size, order) for name, off, size in phdr_fields}
        if p["p_type"] == PT_LOAD:
            lay.region(p["p_offset"], p["p_filesz"], f"segment[{i}]")
            for k in range(0, min(p["p_filesz"], 4 * 4096), 4096):
                lay.region(p["p_offset"] + k, min(4096, p["p_filesz"] - k), f"segment[{i}].page")
        elif p["p_type"] == PT_NOTE:
            lay.extend(_notes(data, p["p_offset"], p["p_filesz"], order))
    shsize = 64 if is64 else 40
    shoff, shnum = ehdr["e_shoff"], ehdr["e_shnum"]
    if shoff:
        lay.region(shoff, shnum * shsize, "shdrs")
        for i in range(shnum):
            at = shoff + i * shsize
            for name, off, size in _SHDR64 if is64 else _SHDR32:
                lay.int(at + off, size, order, f"shdr[{i}].{name}")
            lay.record(at, shsize, f"shdr[{i}]")
            s_type = u(data, at + 4, 4, order)
            s_off = u(data, at + (24 if is64 else 16), 8 if is64 else 4, order)
            s_size = u(data, at + (32 if is64 else 20), 8 if is64 else 4, order)
            lay.region(s_off, s_size, f"section[{i}]")
            if s_type == SHT_NOTE:
                lay.extend(_notes(data, s_off, s_size, order))
    return lay


def _notes(data: bytes, offset: int, length: int, order: str) -> Layout:
    lay = Layout()
    pos, end = offset, offset + length
    k = 0
    while pos + 12 <= end:
        namesz, descsz = u(data, pos, 4, order), u(data, pos + 4, 4, order)
        lay.int(pos, 4, order, f"note[{k}].namesz")
        lay.int(pos + 4, 4, order, f"note[{k}].descsz")
        lay.int(pos + 8, 4, order, f"note[{k}].type")
        desc_at = pos + 12 + (namesz + 3) // 4 * 4
        lay.region(desc_at, descsz, f"note[{k}].desc")
        size = desc_at + (descsz + 3) // 4 * 4 - pos
        lay.record(pos, size, f"note[{k}]")
        pos += size
        k += 1
    return lay
