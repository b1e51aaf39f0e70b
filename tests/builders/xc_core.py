"""Build Xen ``xl dump-core`` (xc_core ELF) files, written from xen-project/xen
``tools/libs/guest/xg_core.c`` / ``xg_core.h`` and FORMATS.md §1: ELF64 ET_CORE with no program
headers, section headers right after the ELF header (optionally in shuffled order), the four
``.note.Xen`` notes, ``.xen_prstatus``, ``.xen_shared_info``, page-aligned ``.xen_pages``, then
``.xen_p2m`` (PV) or ``.xen_pfn`` (HVM) and ``.shstrtab`` last."""

from __future__ import annotations

import random
import struct
from dataclasses import dataclass
from pathlib import Path

PAGE = 4096
XC_CORE_MAGIC = 0xF00FEBED
XC_CORE_MAGIC_HVM = 0xF00FEBEE
INVALID = 0xFFFF_FFFF_FFFF_FFFF
NOTE_NONE, NOTE_HEADER, NOTE_XEN_VERSION, NOTE_FORMAT_VERSION = 0x2000000, 0x2000001, 0x2000002, 0x2000003
#: sizeof(vcpu_guest_context_any_t) on x86-64 (any non-zero size does for a reader of pages).
VCPU_CONTEXT_SIZE = 5168
SHT_PROGBITS, SHT_STRTAB, SHT_NOTE = 1, 3, 7


@dataclass
class BuiltXcCore:
    data: bytes
    shoff: int
    note_offset: int
    #: Offset of the header note's descriptor (xch_magic).
    header_desc_offset: int
    pages_offset: int
    table_offset: int
    #: Section index of each name.
    index: dict[str, int]


def xen_version_desc(
    major: int = 4,
    minor: int = 17,
    extra: str = ".2",
    capabilities: str = "xen-3.0-x86_64 hvm-3.0-x86_32 hvm-3.0-x86_32p hvm-3.0-x86_64",
    changeset: str = "Tue Oct 10 15:29:00 2023 +0200 git:d530627aaa",
    pagesize: int = PAGE,
    order: str = "<",
) -> bytes:
    """The 1280-byte XEN_VERSION descriptor of a 64-bit toolstack (xg_core.h, public/version.h)."""
    compile_info = b"gcc (Debian 12.2.0-14) 12.2.0".ljust(64, b"\0") + b"pkg-xen-devel".ljust(16, b"\0")
    compile_info += b"lists.alioth.debian.org".ljust(32, b"\0") + b"Tue Oct 10 2023".ljust(32, b"\0")
    desc = struct.pack(order + "QQ", major, minor) + extra.encode().ljust(16, b"\0") + compile_info
    desc += capabilities.encode().ljust(1024, b"\0") + changeset.encode().ljust(64, b"\0")
    desc += struct.pack(order + "Q", 0xFFFF800000000000) + struct.pack(order + "Q", pagesize)
    assert len(desc) == 1280
    return desc


def _note(order: str, ntype: int, desc: bytes) -> bytes:
    # xg_core.h's struct elfnote: namesz, descsz, type, name[4] = "Xen\0".
    return struct.pack(order + "III4s", 4, len(desc), ntype, b"Xen\0") + desc


def build_xc_core(
    entries: list[tuple[int, int, bytes]],
    *,
    hvm: bool,
    padding: int = 0,
    nr_vcpus: int = 2,
    big_endian: bool = False,
    shuffle_seed: int | None = None,
    nr_pages: int | None = None,
    table_entries: list[tuple[int, int]] | None = None,
    page_size: int = PAGE,
    format_version: int = 1,
    magic: int | None = None,
    version_desc: bytes | None = None,
    pages_last: bool = False,
) -> BuiltXcCore:
    """An xc_core file holding ``entries`` = ``(pfn, gmfn, page)`` in file order (HVM ignores
    gmfn), then ``padding`` zero pages listed as ~0 (a live dump whose guest shrank).
    ``nr_pages`` / ``table_entries`` / ``magic`` override what the headers say (lying headers);
    ``shuffle_seed`` shuffles the section header order (readers must find sections by name);
    ``pages_last`` puts ``.xen_pages`` at the end of the file, after the table and names (the
    writer's comment lets readers rely on no order), so that a cut leaves the table whole."""
    order = ">" if big_endian else "<"
    pages = [p for _, _, p in entries] + [bytes(PAGE)] * padding
    table = table_entries if table_entries is not None else [(pfn, gmfn) for pfn, gmfn, _ in entries]
    if table_entries is None:
        table += [(INVALID, INVALID)] * padding
    count = nr_pages if nr_pages is not None else len(pages)
    if magic is None:
        magic = XC_CORE_MAGIC_HVM if hvm else XC_CORE_MAGIC
    notes = _note(order, NOTE_NONE, b"")
    header_desc_in_notes = len(notes) + 16
    notes += _note(order, NOTE_HEADER, struct.pack(order + "QQQQ", magic, nr_vcpus, count, page_size))
    notes += _note(order, NOTE_XEN_VERSION, version_desc or xen_version_desc(order=order))
    notes += _note(order, NOTE_FORMAT_VERSION, struct.pack(order + "Q", format_version))

    names = [".shstrtab", ".note.Xen", ".xen_prstatus", ".xen_shared_info", ".xen_pages"]
    names.append(".xen_pfn" if hvm else ".xen_p2m")
    strtab = b"\0"
    name_at = {}
    for n in names:
        name_at[n] = len(strtab)
        strtab += n.encode() + b"\0"
    slots = list(names)
    if shuffle_seed is not None:
        random.Random(shuffle_seed).shuffle(slots)
    index = {n: i + 1 for i, n in enumerate(slots)}
    shnum = len(names) + 1

    shoff = 64
    pos = shoff + shnum * 64
    note_at = pos
    pos += len(notes)
    prstatus_at = pos
    pos += VCPU_CONTEXT_SIZE * nr_vcpus
    shared_at = pos
    pos += PAGE
    if hvm:
        table_blob = b"".join(struct.pack(order + "Q", pfn) for pfn, _ in table)
    else:
        table_blob = b"".join(struct.pack(order + "QQ", pfn, gmfn) for pfn, gmfn in table)
    if pages_last:
        table_at = pos
        pos += len(table_blob)
        strtab_at = pos
        pos += len(strtab)
        pos = (pos + PAGE - 1) // PAGE * PAGE
        pages_at = pos
        pos += len(pages) * PAGE
    else:
        pos = (pos + PAGE - 1) // PAGE * PAGE
        pages_at = pos
        pos += len(pages) * PAGE
        table_at = pos
        pos += len(table_blob)
        strtab_at = pos
        pos += len(strtab)

    out = bytearray(pos)
    ident = b"\x7fELF" + bytes([2, 2 if big_endian else 1, 1, 0, 1]) + bytes(7)
    struct.pack_into(
        order + "16sHHIQQQIHHHHHH", out, 0, ident, 4, 62, 1, 0, 0, shoff, 0, 64, 56, 0, 64, shnum,
        index[".shstrtab"],
    )  # fmt: skip
    layout = {
        ".shstrtab": (SHT_STRTAB, strtab_at, len(strtab), 0, 0),
        ".note.Xen": (SHT_NOTE, note_at, len(notes), 0, 0),
        ".xen_prstatus": (SHT_PROGBITS, prstatus_at, VCPU_CONTEXT_SIZE * nr_vcpus, 8, VCPU_CONTEXT_SIZE),
        ".xen_shared_info": (SHT_PROGBITS, shared_at, PAGE, 8, PAGE),
        ".xen_pages": (SHT_PROGBITS, pages_at, len(pages) * PAGE, PAGE, PAGE),
        ".xen_pfn": (SHT_PROGBITS, table_at, len(table_blob), 8, 8),
        ".xen_p2m": (SHT_PROGBITS, table_at, len(table_blob), 8, 16),
    }
    for n in names:
        stype, off, size, align, entsize = layout[n]
        struct.pack_into(
            order + "IIQQQQIIQQ", out, shoff + index[n] * 64, name_at[n], stype, 0, 0, off, size, 0, 0,
            align, entsize,
        )  # fmt: skip
    out[note_at : note_at + len(notes)] = notes
    for j, page in enumerate(pages):
        out[pages_at + j * PAGE : pages_at + (j + 1) * PAGE] = page
    out[table_at : table_at + len(table_blob)] = table_blob
    out[strtab_at : strtab_at + len(strtab)] = strtab
    return BuiltXcCore(bytes(out), shoff, note_at, note_at + header_desc_in_notes, pages_at, table_at, index)


def pre_elf_xc_core(hvm: bool = False) -> bytes:
    """The header of a pre-ELF (Xen <= 3.0.3) core file (crash ``xendump.h``)."""
    magic = XC_CORE_MAGIC_HVM if hvm else XC_CORE_MAGIC
    return struct.pack("<IIIIII", magic, 1, 1, 24, 4096, 8192) + bytes(8192)


#: The pfns of :func:`cut_short`'s dump.
CUT_PFNS = [0, 1, 2, 3, 0x10, 0x11, 0x9F, 0x100]


def cut_page(pfn: int) -> bytes:
    """The content :func:`cut_short` gives the page of ``pfn`` (its pfn, repeated)."""
    return (pfn.to_bytes(8, "little") + b"\x5a" * 8) * (PAGE // 16)


def cut_short(folder: Path, *, hvm: bool = True, name: str = "guest.core") -> tuple[Path, BuiltXcCore, int]:
    """``folder/name``: an xc_core dump of the 8 pages of :data:`CUT_PFNS` whose table and
    headers were written whole, cut after 5 of its pages and 100 bytes of the 6th
    (``.xen_pages`` last in the file, so that the cut leaves the table); with what was built and
    the length kept."""
    built = build_xc_core([(p, 0x8000 + p, cut_page(p)) for p in CUT_PFNS], hvm=hvm, pages_last=True)
    keep = built.pages_offset + 5 * PAGE + 100
    path = folder / name
    path.write_bytes(built.data[:keep])
    return path, built, keep
