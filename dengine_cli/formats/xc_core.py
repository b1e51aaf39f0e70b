"""Xen ``xl dump-core`` files (xc_core ELF), also what libvirt's libxl driver writes for
``virsh dump``.

Sources: xen-project/xen ``tools/libs/guest/xg_core.c`` (the writer and its layout comment),
``tools/libs/guest/xg_core.h`` (note descriptors, ``xen_dumpcore_p2m``, XC_CORE_INVALID_PFN),
``xen/include/public/elfnote.h`` (note types), ``xen/include/public/version.h`` (field sizes of
the XEN_VERSION note); FORMATS.md §1.

An xc_core file is an ELF64 ET_CORE file with no program headers: everything is in sections found
by name through ``e_shstrndx`` (their order is not to be relied on).  ``.xen_pages`` holds
``nr_pages`` pages back to back; entry j of ``.xen_pfn`` (HVM, PVH, Arm: one u64 pfn) or
``.xen_p2m`` (PV: ``{u64 pfn; u64 gmfn}``) says which guest frame page j is.  For PV guests the
gfn is the guest pseudo-physical ``pfn``: the machine frame ``gmfn`` only matters to follow PV
page tables.  Entries equal to ~0 (all 64 bits; not 0xFFFFFFFF) pad live dumps whose guest shrank
and are skipped; pfn 0 is a real page.  Pages not listed are absent.

The pre-ELF format of Xen <= 3.0.3 (magic 0xF00FEBED/0xF00FEBEE at offset 0) is recognized and
refused as unsupported.
"""

from __future__ import annotations

import dataclasses
import struct

import numpy as np
import numpy.typing as npt

from dengine_cli.errors import UnsupportedFeature
from dengine_cli.formats import elf
from dengine_cli.formats.base import (
    Dump,
    GuestFacts,
    OpenOptions,
    PageTableDump,
    Source,
    map_file,
    read_exactly,
    require,
)
from dengine_cli.formats.registry import FormatSpec
from dengine_cli.pages import PAGE_SHIFT, PAGE_SIZE

#: xch_magic of the dump-core header note (xg_core.h / xc_private.h): PV and HVM guests.
XC_CORE_MAGIC = 0xF00FEBED
XC_CORE_MAGIC_HVM = 0xF00FEBEE
#: Pre-ELF xc_core (Xen <= 3.0.3) starts with the magic as a host-order u32 (crash xendump.h).
PRE_ELF_MAGICS = tuple(
    struct.pack(order + "I", m) for m in (XC_CORE_MAGIC, XC_CORE_MAGIC_HVM) for order in "<>"
)
#: Section names (xg_core.h).
SEC_NOTE = ".note.Xen"
SEC_PAGES = ".xen_pages"
SEC_P2M = ".xen_p2m"
SEC_PFN = ".xen_pfn"
#: Note name and types (xen/include/public/elfnote.h).
XEN_NOTE_NAME = "Xen"
XEN_ELFNOTE_DUMPCORE_NONE = 0x2000000
XEN_ELFNOTE_DUMPCORE_HEADER = 0x2000001
XEN_ELFNOTE_DUMPCORE_XEN_VERSION = 0x2000002
XEN_ELFNOTE_DUMPCORE_FORMAT_VERSION = 0x2000003
#: Table entries padding a live dump whose guest gave back pages (XC_CORE_INVALID_PFN).
XC_CORE_INVALID_PFN = 0xFFFF_FFFF_FFFF_FFFF
#: Every other pfn is below this: its page's physical address (pfn << 12) fits in 64 bits.
PFN_LIMIT = 1 << (64 - PAGE_SHIFT)
#: XEN_VERSION descriptor: u64 major, u64 minor, char extra[16], compile info (64+16+32+32),
#: char capabilities[1024], char changeset[64], platform parameters, u64 pagesize.
XEN_VERSION_EXTRA_AT = 16
XEN_VERSION_CAPABILITIES_AT = 16 + 16 + 144
XEN_VERSION_CHANGESET_AT = XEN_VERSION_CAPABILITIES_AT + 1024
XEN_VERSION_MIN_SIZE = XEN_VERSION_CHANGESET_AT + 64
#: Only dump-core format major version 0 exists (0.1, XEN_DUMPCORE_FORMAT_VERSION_CURRENT).
FORMAT_MAJOR = 0

#: Elf64_Shdr: name, type, flags, addr, offset, size, link, info, addralign, entsize.
SHDR = [
    ("sh_name", "u4", 0),
    ("sh_type", "u4", 4),
    ("sh_offset", "u8", 24),
    ("sh_size", "u8", 32),
    ("sh_link", "u4", 40),
]
SHDR_SIZE = 64
#: e_shstrndx value meaning "the index is in section header 0's sh_link" (gABI SHN_XINDEX).
SHN_XINDEX = 0xFFFF


def probe(head: bytes, size: int) -> bool:
    """ELF64 ET_CORE with no program headers and some sections, or the pre-ELF magic."""
    if head[:4] in PRE_ELF_MAGICS:
        return True
    hdr = elf.parse_header(head)
    return hdr is not None and hdr.elf_class == elf.ELFCLASS64 and hdr.phnum == 0 and hdr.shoff != 0


def _cstr(data: bytes) -> str:
    return data.split(b"\0", 1)[0].decode("latin-1")


def open_xc_core(source: Source, options: OpenOptions) -> Dump:
    buf = map_file(source)
    base = source.start
    if buf[base : base + 4].tobytes() in PRE_ELF_MAGICS:
        raise UnsupportedFeature(source.name, base, feature="pre-ELF xc_core (Xen <= 3.0.3)")
    hdr = elf.parse_header(buf[base : base + 64].tobytes())
    if hdr is None or hdr.elf_class != elf.ELFCLASS64:
        found = buf[base : base + 20].tobytes().hex(" ") if len(buf) > base else "an empty file"
        raise source.error(base, expected="an ELF64 core file (xc_core)", found=found)
    order = hdr.order
    if hdr.shentsize < SHDR_SIZE:
        raise source.error(base, expected=f"e_shentsize >= {SHDR_SIZE}", found=str(hdr.shentsize))
    shnum, shstrndx = struct.unpack_from(order + "HH", buf[base + 60 : base + 64].tobytes())
    table_at = base + hdr.shoff
    require(source, buf, table_at, SHDR_SIZE, "section header 0")
    dtype = np.dtype(
        {
            "names": [n for n, _, _ in SHDR],
            "formats": [order + t for _, t, _ in SHDR],
            "offsets": [o for _, _, o in SHDR],
            "itemsize": hdr.shentsize,
        }
    )
    first = np.frombuffer(buf, dtype=dtype, count=1, offset=table_at)[0]
    if shnum == 0:  # more than 0xff00 sections: the count is in section header 0 (gABI)
        shnum = int(first["sh_size"])
    if shstrndx == SHN_XINDEX:
        shstrndx = int(first["sh_link"])
    if shnum > (len(buf) - table_at) // hdr.shentsize:
        raise source.error(
            table_at,
            expected=f"{shnum} section headers ({shnum * hdr.shentsize} bytes)",
            found=f"end of file at {len(buf):#x}",
        )
    shdrs = np.frombuffer(buf, dtype=dtype, count=shnum, offset=table_at)
    if not 0 < shstrndx < shnum:
        raise source.error(base + 62, expected=f"e_shstrndx below e_shnum {shnum}", found=str(shstrndx))
    file_size = len(buf) - base

    def section_at(i: int) -> tuple[int, int]:
        """Absolute offset and size of section i, checked to lie within the file."""
        off, size = int(shdrs[i]["sh_offset"]), int(shdrs[i]["sh_size"])
        if size > file_size or off > file_size - size:
            raise source.error(
                table_at + i * hdr.shentsize,
                expected=f"section {i} at {base + off:#x} + {size:#x} within the file",
                found=f"end of file at {len(buf):#x}",
            )
        return base + off, size

    str_at, str_size = section_at(shstrndx)
    strtab = buf[str_at : str_at + str_size].tobytes()
    sections: dict[str, int] = {}
    for i in range(1, shnum):
        name_at = int(shdrs[i]["sh_name"])
        if name_at >= len(strtab):
            raise source.error(
                table_at + i * hdr.shentsize,
                expected=f"a section name within .shstrtab ({len(strtab)} bytes)",
                found=f"sh_name {name_at}",
            )
        name = _cstr(strtab[name_at:])
        if name in sections and name in (SEC_NOTE, SEC_PAGES, SEC_P2M, SEC_PFN):
            raise source.error(
                table_at + i * hdr.shentsize, expected=f"one {name} section", found="a second one"
            )
        sections.setdefault(name, i)
    if SEC_PAGES not in sections:
        raise source.error(table_at, expected=f"a {SEC_PAGES} section (xc_core)", found="none")
    if SEC_NOTE not in sections:
        raise source.error(table_at, expected=f"a {SEC_NOTE} section", found="none")
    if (SEC_P2M in sections) == (SEC_PFN in sections):
        found = "both" if SEC_P2M in sections else "neither"
        raise source.error(table_at, expected=f"one of {SEC_P2M} and {SEC_PFN}", found=found)

    facts = GuestFacts(format="xc-core", hypervisor="xen", arch=elf.MACHINES.get(hdr.machine))
    note_at, note_size = section_at(sections[SEC_NOTE])
    nr_pages = _read_notes(source, buf, order, note_at, note_size, facts)

    is_p2m = SEC_P2M in sections
    entry_size = 16 if is_p2m else 8
    table_name = SEC_P2M if is_p2m else SEC_PFN
    index_at, index_size = section_at(sections[table_name])
    pages_index = sections[SEC_PAGES]
    if options.partial:
        # A dump cut short may end inside .xen_pages: the pages the file holds are present.
        pages_at = base + int(shdrs[pages_index]["sh_offset"])
        pages_size = max(0, min(int(shdrs[pages_index]["sh_size"]), len(buf) - pages_at))
    else:
        pages_at, pages_size = section_at(pages_index)
    held = pages_size // PAGE_SIZE
    entries = index_size // entry_size
    present = min(nr_pages, held, entries)
    if present < nr_pages and not options.partial:
        hint = f"; --partial reads the {present} pages present"
        if held < nr_pages:
            raise source.error(
                pages_at,
                expected=f"{nr_pages} pages in {SEC_PAGES} (nr_pages of the header note)",
                found=f"{held} pages ({pages_size:#x} bytes){hint}",
            )
        raise source.error(
            index_at,
            expected=f"{nr_pages} entries of {entry_size} bytes in {table_name}",
            found=f"{entries} entries ({index_size:#x} bytes){hint}",
        )
    # Read, not mapped: the table usually lies at the end of the file, and parsing it through
    # a mapping of a file cut meanwhile would be SIGBUS.
    table = np.frombuffer(read_exactly(source, index_at, present * entry_size), dtype=order + "u8")
    pfns = table[0::2] if is_p2m else table
    listed = np.flatnonzero(pfns != np.uint64(XC_CORE_INVALID_PFN))
    gfns = pfns[listed]
    beyond = np.flatnonzero(gfns >= np.uint64(PFN_LIMIT))
    if len(beyond):
        j = int(listed[beyond[0]])
        raise source.error(
            index_at + j * entry_size,
            expected=f"a pfn below {PFN_LIMIT:#x} (a 64-bit physical address) or ~0 in {table_name}",
            found=f"pfn {int(gfns[beyond[0]]):#x} at entry {j}",
        )
    offsets = pages_at + listed.astype(np.int64) * PAGE_SIZE
    by_gfn = np.argsort(gfns, kind="stable")
    gfns, offsets, listed = gfns[by_gfn], offsets[by_gfn], listed[by_gfn]
    dup = np.flatnonzero(gfns[1:] == gfns[:-1])
    if len(dup):
        j = int(listed[dup[0] + 1])
        raise source.error(
            index_at + j * entry_size,
            expected=f"each pfn once in {table_name}",
            found=f"pfn {int(gfns[dup[0]]):#x} again at entry {j}",
        )
    if present > len(listed):
        facts.skipped.append(f"{present - len(listed)} padding entries (pfn ~0) in {table_name}")
    facts.memory_bytes = len(gfns) * PAGE_SIZE
    facts.extra["nr_pages"] = nr_pages
    if present < nr_pages:
        source = _partial(source, facts, nr_pages, present, len(listed), table_name)
    return PageTableDump(source, facts, buf, gfns, offsets)


def _partial(
    source: Source, facts: GuestFacts, nr_pages: int, present: int, listed: int, table_name: str
) -> Source:
    """Say what a dump cut short covers, in its facts and in its name (which every report of
    its figures shows): entries 0..present-1 of the table, of the nr_pages the header claims."""
    entries = f"entries 0-{present - 1}" if present else "no entries"
    facts.extra["partial"] = {
        "pages_claimed": nr_pages,
        "entries_read": present,
        "pages_read": listed,
        "covers": f"{SEC_PAGES} {entries} of {nr_pages}",
    }
    facts.skipped.append(
        f"{nr_pages - present} of the {nr_pages} pages the header note claims, which the file does "
        f"not hold (cut short): the figures cover {SEC_PAGES}/{table_name} {entries} only (--partial)"
    )
    note = f"partial: {listed} pages, {SEC_PAGES} {entries} of the {nr_pages} claimed"
    # Parentheses, not brackets: tables render names as rich markup.
    return dataclasses.replace(source, origin=f"{source.label} ({note})")


def _read_notes(
    source: Source, buf: npt.NDArray[np.uint8], order: str, at: int, size: int, facts: GuestFacts
) -> int:
    """Read the ``.note.Xen`` notes into ``facts``; returns nr_pages of the header note."""
    data = buf[at : at + size].tobytes()
    nr_pages: int | None = None
    pos = 0
    while pos + 12 <= len(data):
        namesz, descsz, ntype = struct.unpack_from(order + "III", data, pos)
        desc_at = pos + 12 + (namesz + 3) // 4 * 4
        if desc_at + descsz > len(data):
            raise source.error(
                at + pos,
                expected=f"a note of {12 + namesz + descsz} bytes within {SEC_NOTE}",
                found=f"{len(data) - pos} bytes left in the section",
            )
        name = _cstr(data[pos + 12 : pos + 12 + namesz])
        desc = data[desc_at : desc_at + descsz]
        where = at + desc_at
        pos = desc_at + (descsz + 3) // 4 * 4
        if name != XEN_NOTE_NAME:
            continue
        if ntype == XEN_ELFNOTE_DUMPCORE_HEADER:
            if descsz < 32:
                raise source.error(where, expected="a 32-byte dump-core header note", found=f"{descsz} bytes")
            magic, vcpus, pages, page_size = struct.unpack_from(order + "QQQQ", desc)
            if magic == XC_CORE_MAGIC:
                facts.guest_type = "pv"
            elif magic == XC_CORE_MAGIC_HVM:
                facts.guest_type = "hvm"
            else:
                raise source.error(
                    where, expected="xch_magic 0xf00febed (PV) or 0xf00febee (HVM)", found=f"{magic:#x}"
                )
            if page_size != PAGE_SIZE:
                raise UnsupportedFeature(source.name, where + 24, feature=f"page size {page_size}")
            facts.vcpus = vcpus
            facts.page_size = page_size
            nr_pages = pages
        elif ntype == XEN_ELFNOTE_DUMPCORE_XEN_VERSION and descsz >= XEN_VERSION_MIN_SIZE:
            major, minor = struct.unpack_from(order + "QQ", desc)
            extra = _cstr(desc[XEN_VERSION_EXTRA_AT : XEN_VERSION_EXTRA_AT + 16])
            facts.xen_version = f"{major}.{minor}{extra}"
            facts.extra["xen_capabilities"] = _cstr(
                desc[XEN_VERSION_CAPABILITIES_AT : XEN_VERSION_CAPABILITIES_AT + 1024]
            )
            facts.extra["xen_changeset"] = _cstr(
                desc[XEN_VERSION_CHANGESET_AT : XEN_VERSION_CHANGESET_AT + 64]
            )
        elif ntype == XEN_ELFNOTE_DUMPCORE_FORMAT_VERSION and descsz >= 8:
            (version,) = struct.unpack_from(order + "Q", desc)
            major, minor = version >> 32, version & 0xFFFF_FFFF
            if major != FORMAT_MAJOR:
                raise UnsupportedFeature(
                    source.name, where, feature=f"dump-core format version {major}.{minor}"
                )
            facts.extra["dumpcore_format_version"] = f"{major}.{minor}"
    if nr_pages is None:
        raise source.error(
            at, expected=f"a dump-core header note (type {XEN_ELFNOTE_DUMPCORE_HEADER:#x})", found="none"
        )
    return nr_pages


FORMAT = FormatSpec(
    name="xc-core",
    description="Xen xl dump-core (xc_core ELF: .xen_pages with .xen_pfn or .xen_p2m)",
    probe=probe,
    open=open_xc_core,
)
