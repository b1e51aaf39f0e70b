"""The ELF core reader: builder files (QEMU-like, /proc/vmcore-like, odd headers), lying headers,
property tests, the libkdumpfile oracle, and the real QEMU fixtures."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dengine_cli.errors import FormatError, UnsupportedFeature
from dengine_cli.formats import elf, open_dump, xc_core
from dengine_cli.formats.base import Dump, OpenOptions
from tests.builders.elf import (
    EM_386,
    EM_X86_64,
    Note,
    Segment,
    build_elf,
    prstatus_note,
    qemu_note,
    vmcoreinfo_note,
)
from tests.builders.xc_core import build_xc_core
from tests.conftest import REPO, needs_oracle, oracle_pages, page_digests, read_pages

PAGE = 4096


def page(gfn: int, tag: int = 0) -> bytes:
    """A page whose content says which gfn it is (and differs per tag)."""
    return (gfn.to_bytes(8, "little") + bytes([tag & 0xFF]) * 8) * (PAGE // 16)


def pages(first: int, count: int, tag: int = 0) -> bytes:
    return b"".join(page(first + i, tag) for i in range(count))


def write(tmp_path: Path, data: bytes, name: str = "dump.elf") -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


def read_all(dump: Dump, batch: int = 7) -> dict[int, bytes]:
    return read_pages(dump, batch)


def qemu_pc_segments() -> list[Segment]:
    """A small x86 ``pc`` guest the way QEMU lays it out: RAM below the VGA window, 0xc0000-
    0x100000 in two blocks, RAM above 1 MiB with a zero tail, VRAM and BIOS flash in the PCI hole."""
    return [
        Segment(0, pages(0, 0xA0)),
        Segment(0xC0000, pages(0xC0, 0x20)),
        Segment(0xE0000, pages(0xE0, 0x20)),
        Segment(0x100000, pages(0x100, 8), memsz=16 * PAGE),
        Segment(0xFD000000, pages(0xFD000, 4, tag=1)),
        Segment(0xFFFC0000, pages(0xFFFC0, 2, tag=2)),
    ]


def qemu_notes(vcpus: int = 2) -> list[Note]:
    return [prstatus_note() for _ in range(vcpus)] + [qemu_note() for _ in range(vcpus)] + [vmcoreinfo_note()]


# -- happy paths ----------------------------------------------------------------------------------


def test_qemu_elf64_layout_drops_device_memory(tmp_path: Path) -> None:
    built = build_elf(qemu_pc_segments(), notes=qemu_notes(), qemu_layout=True)
    path = write(tmp_path, built.data)
    with open_dump(path) as dump:
        got = read_all(dump)
        facts = dump.facts
    ram = [*range(0xA0), *range(0xC0, 0x110)]
    assert sorted(got) == ram
    assert got[0x105] == page(0x105)
    assert got[0x108] == bytes(PAGE)  # the tail past p_filesz: present, zero
    assert facts.format == "elf" and facts.hypervisor == "qemu" and facts.vcpus == 2
    assert facts.arch == "x86_64" and facts.extra["elf_class"] == "ELF64"
    assert facts.extra["osrelease"] == "6.1.0-18-amd64"
    assert facts.extra["vmcoreinfo"]["CRASHTIME"] == "1700000000"
    assert "SYMBOL(init_uts_ns)" not in facts.extra["vmcoreinfo"]
    assert facts.skipped == ["device memory 0xfd000000-0xfd004000", "device memory 0xfffc0000-0xfffc2000"]
    assert facts.memory_bytes == len(ram) * PAGE


def test_qemu_elf_device_memory_kept_on_request(tmp_path: Path) -> None:
    path = write(tmp_path, build_elf(qemu_pc_segments(), notes=qemu_notes(), qemu_layout=True).data)
    with open_dump(path, OpenOptions(device_memory=True)) as dump:
        got = read_all(dump)
        assert dump.facts.skipped == []
    assert got[0xFD003] == page(0xFD003, tag=1)
    assert got[0xFFFC1] == page(0xFFFC1, tag=2)
    assert len(got) == 0xA0 + 0x50 + 4 + 2


def test_elf32_big_endian_without_qemu_notes(tmp_path: Path) -> None:
    segs = [Segment(0x2000, pages(2, 3)), Segment(0x10000, pages(0x10, 2))]
    path = write(
        tmp_path, build_elf(segs, elf_class=32, big_endian=True, machine=20, notes=[prstatus_note()]).data
    )
    with open_dump(path) as dump:
        got = read_all(dump)
        assert dump.facts.arch == "ppc" and dump.facts.hypervisor is None
        assert dump.facts.extra["elf_class"] == "ELF32" and dump.facts.extra["byte_order"] == "big"
        assert dump.facts.vcpus == 1
    assert got == {g: page(g) for g in (2, 3, 4, 0x10, 0x11)}


def test_em386_inside_elf64(tmp_path: Path) -> None:
    # QEMU writes EM_386 into ELF64 files when the CPU is not in long mode (FORMATS §2.1).
    path = write(tmp_path, build_elf([Segment(0, pages(0, 4))], machine=EM_386, notes=[qemu_note()]).data)
    with open_dump(path) as dump:
        assert dump.facts.arch == "x86" and dump.facts.extra["elf_class"] == "ELF64"
        assert read_all(dump) == {g: page(g) for g in range(4)}


def test_pn_xnum_program_header_count(tmp_path: Path) -> None:
    # 0x10002 program headers: e_phnum = 0xFFFF and the count in section header 0's sh_info.
    segs = [Segment(0, pages(0, 2)), Segment(0x100000, pages(0x100, 1))]
    built = build_elf(segs, pn_xnum=True, qemu_layout=True, extra_phdrs=0x10000 - 1)
    assert int.from_bytes(built.data[0x38:0x3A], "little") == 0xFFFF
    with open_dump(write(tmp_path, built.data)) as dump:
        assert read_all(dump) == {0: page(0), 1: page(1), 0x100: page(0x100)}
        assert dump.facts.extra["pt_load_segments"] == 2


def test_proc_vmcore_unaligned_segments_and_kernel_text_alias(tmp_path: Path) -> None:
    # /proc/vmcore: segments from /proc/iomem (0x1000-0x9fbff), a kernel-text PT_LOAD aliasing
    # part of a RAM segment, direct-map virtual addresses.
    low = pages(1, 0x9F)[: 0x9FC00 - 0x1000]
    segs = [
        Segment(0x100000, pages(0x100, 4), vaddr=0xFFFFFFFF81000000),
        Segment(0x1000, low, vaddr=0xFFFF888000001000),
        Segment(0x100000, pages(0x100, 0x100), vaddr=0xFFFF888000100000),
    ]
    with open_dump(write(tmp_path, build_elf(segs, notes=[prstatus_note()]).data)) as dump:
        got = read_all(dump)
        assert dump.facts.skipped == [
            "PT_LOAD at 0x100000-0x104000 (p_vaddr 0xffffffff81000000): a virtual alias of memory "
            "another segment holds"
        ]
    assert sorted(got) == [*range(1, 0xA0), *range(0x100, 0x200)]
    # The page the first segment covers only in part: its bytes, then zeros.
    assert got[0x9F] == page(0x9F)[:0xC00] + bytes(PAGE - 0xC00)
    assert got[0x9E] == page(0x9E)


def test_segment_inside_one_page_and_two_segments_sharing_a_page(tmp_path: Path) -> None:
    segs = [Segment(0x5100, b"\xaa" * 0x100), Segment(0x5800, b"\xbb" * 0x200)]
    with open_dump(write(tmp_path, build_elf(segs).data)) as dump:
        got = read_all(dump)
    expected = bytearray(PAGE)
    expected[0x100:0x200] = b"\xaa" * 0x100
    expected[0x800:0xA00] = b"\xbb" * 0x200
    assert got == {5: bytes(expected)}


def test_big_segment_batches_are_views_of_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, build_elf([Segment(0x400000, pages(0x400, 300))]).data)
    with open_dump(path) as dump:
        batches = list(dump.batches(128))
    assert [len(b) for b in batches] == [128, 128, 44]
    assert all(b.pages.base is not None for b in batches)  # views, not copies
    assert batches[2].pages[-1].tobytes() == page(0x400 + 299)


def test_probe() -> None:
    qemu = build_elf([Segment(0, pages(0, 1))], notes=[qemu_note()], qemu_layout=True).data
    assert elf.probe(qemu[:65536], len(qemu))
    assert not elf.probe(b"\x7fELF", 4)
    exe = build_elf([Segment(0, pages(0, 1))], e_type=2).data
    assert not elf.probe(exe, len(exe))
    xen = build_xc_core([(0, 0, bytes(PAGE))], hvm=True).data
    assert not elf.probe(xen, len(xen)) and xc_core.probe(xen, len(xen))


# -- bad input ------------------------------------------------------------------------------------


def open_error(
    tmp_path: Path, data: bytes, options: OpenOptions | None = None
) -> FormatError | UnsupportedFeature:
    path = write(tmp_path, data)
    with pytest.raises((FormatError, UnsupportedFeature)) as info:
        open_dump(path, options or OpenOptions(format="elf"))
    assert isinstance(info.value, FormatError | UnsupportedFeature)
    return info.value


def test_segment_beyond_end_of_file(tmp_path: Path) -> None:
    built = build_elf([Segment(0, pages(0, 4))], notes=[qemu_note()])
    data = built.data[: built.data_offsets[0] + 2 * PAGE]
    err = open_error(tmp_path, data)
    assert err.exit_code == 4
    assert str(err) == (
        f"{tmp_path / 'dump.elf'}: at offset {built.phdr_offsets[0]:#x}: expected PT_LOAD data at "
        f"{built.data_offsets[0]:#x} + 0x4000 within the file, found end of file at {len(data):#x}"
    )


def test_program_headers_beyond_end_of_file(tmp_path: Path) -> None:
    built = build_elf([Segment(0, pages(0, 1))])
    data = bytearray(built.data)
    data[0x38:0x3A] = (60000).to_bytes(2, "little")  # e_phnum lies
    err = open_error(tmp_path, bytes(data))
    assert err.exit_code == 4
    assert "at offset 0x40: expected 60000 program headers (3360000 bytes), found end of file" in str(err)


def test_overlapping_segments(tmp_path: Path) -> None:
    segs = [Segment(0, pages(0, 4)), Segment(0x2000, pages(2, 4))]
    built = build_elf(segs)
    err = open_error(tmp_path, built.data)
    assert err.exit_code == 4
    assert str(err).endswith(
        f"at offset {built.phdr_offsets[1]:#x}: expected PT_LOAD segments not overlapping in physical "
        "address space, found 0x2000-0x6000 overlapping 0x0-0x4000"
    )


def test_filesz_larger_than_memsz(tmp_path: Path) -> None:
    built = build_elf([Segment(0, pages(0, 2), memsz=PAGE)])
    err = open_error(tmp_path, built.data)
    assert err.exit_code == 4
    assert "expected a PT_LOAD with p_filesz <= p_memsz, found p_filesz 0x2000 > p_memsz 0x1000" in str(err)


def test_huge_zero_tail(tmp_path: Path) -> None:
    built = build_elf([Segment(0, pages(0, 1)), Segment(1 << 44, pages(0, 1), memsz=1 << 41)])
    err = open_error(tmp_path, built.data)
    assert err.exit_code == 4
    assert str(err).endswith(
        f"at offset {built.phdr_offsets[1]:#x}: expected at most 0x400000000 bytes of zero pages past "
        "p_filesz in all PT_LOADs, found p_memsz 0x20000000000 with p_filesz 0x1000"
    )


def test_qemu_paging_true_is_unsupported(tmp_path: Path) -> None:
    built = build_elf([Segment(0x1000, pages(1, 1), vaddr=0xFFFFFFFF81000000)], notes=[qemu_note()])
    err = open_error(tmp_path, built.data)
    assert isinstance(err, UnsupportedFeature) and err.exit_code == 5
    assert str(err).endswith(
        f"at offset {built.phdr_offsets[0]:#x}: unsupported QEMU dump made with paging=true (PT_LOAD "
        "p_vaddr 0xffffffff81000000 != p_paddr 0x1000); dump with paging=false"
    )


def test_segments_without_physical_addresses(tmp_path: Path) -> None:
    built = build_elf([Segment(0, pages(0, 1), vaddr=0x1000), Segment(0, pages(1, 1), vaddr=0x2000)])
    err = open_error(tmp_path, built.data)
    assert err.exit_code == 5
    assert "unsupported PT_LOAD segments without physical addresses (every p_paddr is 0)" in str(err)


def test_bad_magic_when_forced(tmp_path: Path) -> None:
    err = open_error(tmp_path, b"\x7fELG" + bytes(100))
    assert err.exit_code == 4
    assert str(err).endswith(
        "at offset 0x0: expected an ELF core file (\\x7fELF, ET_CORE), found 7f 45 4c 47 " + "00 " * 15 + "00"
    )


def test_not_a_core_file_when_forced(tmp_path: Path) -> None:
    err = open_error(tmp_path, build_elf([Segment(0, pages(0, 1))], e_type=2).data)
    assert "expected an ELF core file (\\x7fELF, ET_CORE)" in str(err)


def test_short_program_header_entries(tmp_path: Path) -> None:
    built = build_elf([Segment(0, pages(0, 1))], elf_class=32, phentsize=16)
    err = open_error(tmp_path, built.data)
    assert err.exit_code == 4
    assert str(err).endswith(
        "at offset 0x2a: expected e_phentsize = 32 for ELF32 (the size of Elf32_Phdr), found 16"
    )


@pytest.mark.parametrize(
    "elf_class,phentsize,at",
    [(64, 1000, 0x36), (64, 64, 0x36), (64, 55, 0x36), (32, 1000, 0x2A), (32, 56, 0x2A)],
)
def test_program_header_entries_of_another_size(
    tmp_path: Path, elf_class: int, phentsize: int, at: int
) -> None:
    # e_phentsize is sizeof(Elf64_Phdr) = 56 (ELF32: 32) in every ELF core; a larger one used to be
    # taken as the stride of the table, reading page data as program headers (0 pages, exit 0).
    built = build_elf(qemu_pc_segments(), elf_class=elf_class, notes=qemu_notes(), qemu_layout=True)
    data = bytearray(built.data)
    data[at : at + 2] = phentsize.to_bytes(2, "little")  # e_phentsize lies
    err = open_error(tmp_path, bytes(data))
    assert err.exit_code == 4
    size = 56 if elf_class == 64 else 32
    assert str(err) == (
        f"{tmp_path / 'dump.elf'}: at offset {at:#x}: expected e_phentsize = {size} for ELF{elf_class} "
        f"(the size of Elf{elf_class}_Phdr), found {phentsize}"
    )


def test_no_program_headers(tmp_path: Path) -> None:
    built = build_elf([Segment(0, pages(0, 1))], notes=[qemu_note()])
    data = bytearray(built.data)
    data[0x38:0x3A] = bytes(2)  # e_phnum = 0 (when forced: such a file is no ELF core to probe)
    err = open_error(tmp_path, bytes(data))
    assert err.exit_code == 4
    assert str(err) == (
        f"{tmp_path / 'dump.elf'}: at offset 0x38: expected program headers (e_phnum > 0), found e_phnum = 0"
    )


@pytest.mark.parametrize("elf_class", [64, 32])
def test_no_program_headers_pn_xnum(tmp_path: Path, elf_class: int) -> None:
    """e_phnum = PN_XNUM (0xffff) with sh_info = 0 in section header 0: the message says both,
    at sh_info's offset (exit 4, one line)."""
    built = build_elf([Segment(0, pages(0, 1))], pn_xnum=True, elf_class=elf_class)
    data = bytearray(built.data)
    shoff = 64 if elf_class == 64 else 52  # section header 0 right after the ELF header
    sh_info = shoff + (44 if elf_class == 64 else 28)
    data[sh_info : sh_info + 4] = bytes(4)
    err = open_error(tmp_path, bytes(data))
    assert err.exit_code == 4
    assert str(err) == (
        f"{tmp_path / 'dump.elf'}: at offset {sh_info:#x}: expected program headers (sh_info > 0 in "
        "section header 0, as e_phnum is PN_XNUM), found e_phnum = PN_XNUM (0xffff) and sh_info = 0 "
        f"in section header 0 (at e_shoff {shoff:#x})"
    )


@pytest.mark.parametrize("elf_class", [64, 32])
@pytest.mark.parametrize("where", ["zero", "past the end", "cut"])
def test_pn_xnum_without_section_header_0(tmp_path: Path, elf_class: int, where: str) -> None:
    """e_phnum = PN_XNUM and no section header 0 to hold the count (e_shoff 0, past the end of
    the file, or the header cut by it): exit 4 on one line at e_shoff's offset, saying e_phnum is
    PN_XNUM and what e_shoff holds (it named offset 0 and e_shoff alone, or a read of "section
    header 0 (PN_XNUM count)" past the end)."""
    built = build_elf([Segment(0, pages(0, 1))], pn_xnum=True, elf_class=elf_class)
    data = bytearray(built.data)
    at, width = (40, 8) if elf_class == 64 else (32, 4)
    shoff = {"zero": 0, "past the end": len(data) + 16, "cut": len(data) - 8}[where]
    data[at : at + width] = shoff.to_bytes(width, "little")
    err = open_error(tmp_path, bytes(data))
    assert err.exit_code == 4
    size = 64 if elf_class == 64 else 40
    found = "no section header table" if shoff == 0 else f"past the end of file at {len(data):#x}"
    assert str(err) == (
        f"{tmp_path / 'dump.elf'}: at offset {at:#x}: expected section header 0 ({size} bytes at "
        "e_shoff) holding the program header count in sh_info, as e_phnum is PN_XNUM, found "
        f"e_phnum = PN_XNUM (0xffff) and e_shoff = {shoff:#x}: {found}"
    )
    assert "\n" not in str(err)


@pytest.mark.parametrize("elf_class", [64, 32])
def test_program_header_table_pointing_into_page_data(tmp_path: Path, elf_class: int) -> None:
    # e_phoff lies: the "program headers" at the first page of RAM hold no PT_LOAD.  This used to
    # read as a dump of 0 pages (exit 0), while e_phnum = 0 was refused.
    built = build_elf(qemu_pc_segments(), elf_class=elf_class, notes=qemu_notes(), qemu_layout=True)
    data = bytearray(built.data)
    e_phoff_at, size = (32, 8) if elf_class == 64 else (28, 4)
    data[e_phoff_at : e_phoff_at + size] = built.data_offsets[0].to_bytes(size, "little")
    err = open_error(tmp_path, bytes(data))
    assert err.exit_code == 4
    assert str(err) == (
        f"{tmp_path / 'dump.elf'}: at offset {e_phoff_at:#x}: expected program headers with a PT_LOAD "
        f"segment (guest memory) at e_phoff {built.data_offsets[0]:#x}, found 7 program headers there, "
        "none of type PT_LOAD"
    )


def test_core_without_pt_load(tmp_path: Path) -> None:
    # Notes and no memory at all: refused like e_phnum = 0, also when probed (not forced).
    path = write(tmp_path, build_elf([], notes=[prstatus_note(), vmcoreinfo_note()]).data)
    with pytest.raises(FormatError) as info:
        open_dump(path)
    assert info.value.exit_code == 4
    assert str(info.value) == (
        f"{path}: at offset 0x20: expected program headers with a PT_LOAD segment (guest memory) at "
        "e_phoff 0x40, found 1 program header there, none of type PT_LOAD"
    )


def test_empty_pt_load_is_an_empty_dump(tmp_path: Path) -> None:
    # A PT_LOAD of p_memsz 0 is a segment: the dump of no pages, not an error.
    with open_dump(write(tmp_path, build_elf([Segment(0, b"")], notes=[prstatus_note()]).data)) as dump:
        assert dump.page_count == 0 and dump.facts.extra["pt_load_segments"] == 0


@pytest.mark.parametrize("elf_class", [64, 32])
def test_qemu_segment_at_an_unaligned_address(tmp_path: Path, elf_class: int) -> None:
    # QEMU dumps whole guest pages.  A first PT_LOAD at p_paddr 0x10 made gfn 0xa0 present (in
    # part), so RAM no longer ended at the VGA window and everything above it was dropped as
    # device memory (exit 0, the RAM only in facts.skipped).
    built = build_elf(qemu_pc_segments(), elf_class=elf_class, notes=qemu_notes(), qemu_layout=True)
    data = bytearray(built.data)
    at, size = (built.phdr_offsets[0] + 24, 8) if elf_class == 64 else (built.phdr_offsets[0] + 12, 4)
    data[at : at + size] = (0x10).to_bytes(size, "little")
    err = open_error(tmp_path, bytes(data), OpenOptions())
    assert err.exit_code == 4
    assert str(err) == (
        f"{tmp_path / 'dump.elf'}: at offset {at:#x}: expected a QEMU PT_LOAD of whole pages (p_paddr a "
        "multiple of 0x1000), found p_paddr 0x10"
    )


def test_qemu_segment_of_a_partial_page(tmp_path: Path) -> None:
    built = build_elf(qemu_pc_segments(), notes=qemu_notes(), qemu_layout=True)
    data = bytearray(built.data)
    at = built.phdr_offsets[0] + 40  # p_memsz 0xa0000 -> 0xa0010: a zero tail ending in gfn 0xa0
    data[at : at + 8] = (0xA0010).to_bytes(8, "little")
    err = open_error(tmp_path, bytes(data), OpenOptions(device_memory=True))
    assert err.exit_code == 4
    assert str(err) == (
        f"{tmp_path / 'dump.elf'}: at offset {at:#x}: expected a QEMU PT_LOAD of whole pages (p_memsz a "
        "multiple of 0x1000), found p_memsz 0xa0010"
    )


def test_unaligned_segments_without_qemu_notes_still_read(tmp_path: Path) -> None:
    # Not QEMU's (a /proc/vmcore copy): segments from /proc/iomem need not be page aligned.
    segs = [Segment(0x10, pages(0, 0xA0)[: 0xA0000 - 0x10]), *qemu_pc_segments()[1:4]]
    with open_dump(write(tmp_path, build_elf(segs, notes=[prstatus_note()]).data)) as dump:
        assert dump.page_count == 0xA0 + 0x50 and dump.facts.skipped == []


def test_truncated_note(tmp_path: Path) -> None:
    built = build_elf([Segment(0, pages(0, 1))], notes=[Note("CORE", 1, bytes(336))])
    data = bytearray(built.data)
    note_at = built.phoff + 2 * 56
    data[note_at + 4 : note_at + 8] = (100000).to_bytes(4, "little")  # descsz lies
    err = open_error(tmp_path, bytes(data))
    assert err.exit_code == 4
    assert f"at offset {note_at:#x}: expected an ELF note of 100017 bytes within its PT_NOTE" in str(err)


# -- property: random page maps read back unchanged ------------------------------------------------


@st.composite
def page_maps(draw: st.DrawFn) -> tuple[list[Segment], dict[int, bytes], int, bool]:
    runs = draw(st.lists(st.tuples(st.integers(0, 40), st.integers(1, 6), st.integers(0, 3)), max_size=6))
    segs: list[Segment] = []
    expected: dict[int, bytes] = {}
    gfn = 0
    for gap, count, zero_tail in runs:
        gfn += gap
        stored = pages(gfn, count, tag=gap)
        segs.append(Segment(gfn * PAGE, stored, memsz=(count + zero_tail) * PAGE))
        expected.update({gfn + i: page(gfn + i, tag=gap) for i in range(count)})
        expected.update({gfn + count + i: bytes(PAGE) for i in range(zero_tail)})
        gfn += count + zero_tail
    order = draw(st.permutations(range(len(segs))))
    return [segs[i] for i in order], expected, draw(st.sampled_from([32, 64])), draw(st.booleans())


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=page_maps())
def test_random_page_maps_read_back(
    tmp_path: Path, case: tuple[list[Segment], dict[int, bytes], int, bool]
) -> None:
    segs, expected, elf_class, big = case
    built = build_elf(segs or [Segment(0, b"")], elf_class=elf_class, big_endian=big, notes=[prstatus_note()])
    with open_dump(write(tmp_path, built.data)) as dump:
        assert read_all(dump, batch=5) == expected
        assert dump.gfns.tolist() == sorted(expected)


# -- the libkdumpfile oracle -----------------------------------------------------------------------


def assert_agrees_with_oracle(path: Path, options: OpenOptions, not_in_file: set[int] | None = None) -> int:
    """Every page libkdumpfile lists reads the same; we list more only where ``not_in_file``
    says (libkdumpfile 0.5.1's file.pagemap leaves out the zero tail past p_filesz and a last
    page the file holds only in part)."""
    fmt, oracle = oracle_pages(path)
    assert fmt == "elf"
    with open_dump(path, options) as dump:
        ours: dict[int, bytes] = {}
        for b in dump.batches():
            ours.update(page_digests(b.gfns, b.pages))
    assert set(ours) - set(oracle) == (not_in_file or set())
    assert set(oracle) - set(ours) == set()
    differ = [g for g in oracle if ours[g] != oracle[g]]
    assert differ == []
    return len(oracle)


@needs_oracle
@pytest.mark.parametrize("elf_class,big", [(64, False), (32, False), (64, True)])
def test_oracle_agrees_on_builder_files(tmp_path: Path, elf_class: int, big: bool) -> None:
    segs = [*qemu_pc_segments()[:4], Segment(0x200000, pages(0x200, 3)[: 2 * PAGE + 0x300])]
    built = build_elf(segs, elf_class=elf_class, big_endian=big, machine=EM_X86_64, notes=[prstatus_note()])
    zero_tail = set(range(0x108, 0x110))
    n = assert_agrees_with_oracle(write(tmp_path, built.data), OpenOptions(), zero_tail | {0x202})
    assert n == 0xA0 + 0x40 + 8 + 2


# -- real QEMU dumps -------------------------------------------------------------------------------

REAL_ELF = ["alpha.elf", "beta.elf", "alpha-later.elf"]


def real_fixture(real_dump: Callable[[str], Path], name: str) -> Path:
    return real_dump(name)


@needs_oracle
@pytest.mark.parametrize("name", REAL_ELF)
def test_real_qemu_elf_agrees_with_oracle(real_dump: Callable[[str], Path], name: str) -> None:
    path = real_fixture(real_dump, name)
    n = assert_agrees_with_oracle(path, OpenOptions(device_memory=True))
    assert n > 1000


@pytest.mark.parametrize("name", REAL_ELF)
def test_real_qemu_elf_facts_and_device_memory(real_dump: Callable[[str], Path], name: str) -> None:
    path = real_fixture(real_dump, name)
    with open_dump(path) as dump, open_dump(path, OpenOptions(device_memory=True)) as everything:
        facts = dump.facts
        assert facts.format == "elf" and facts.hypervisor == "qemu"
        assert facts.vcpus is not None and facts.vcpus >= 1
        assert facts.arch in ("x86", "x86_64")
        dropped = np.setdiff1d(everything.gfns, dump.gfns)
        assert all(s.startswith("device memory 0x") for s in facts.skipped)
        # Whatever was dropped lies in the 32-bit PCI hole, above all low RAM.
        low_ram_end = int(dump.gfns[dump.gfns < (1 << 20)].max()) + 1
        assert len(dropped) == 0 or int(dropped.min()) >= low_ram_end
        assert int(dump.gfns[0]) == 0


def test_real_qemu_elf_with_an_unaligned_segment(tmp_path: Path, real_dump: Callable[[str], Path]) -> None:
    # The tester's file: alpha.elf with the first PT_LOAD's p_paddr set to 0x10 read as 161 pages
    # instead of 8160 (the 31 MiB RAM segment dropped as device memory), exit 0.
    data = bytearray(real_dump("alpha.elf").read_bytes())
    phoff = int.from_bytes(data[32:40], "little")
    at = phoff + 56 + 24  # program header 1 (0 is the PT_NOTE): p_paddr
    assert int.from_bytes(data[at - 24 : at - 20], "little") == 1 and data[at : at + 8] == bytes(8)
    data[at : at + 8] = (0x10).to_bytes(8, "little")
    path = write(tmp_path, bytes(data))
    r = subprocess.run(
        [str(REPO / ".venv" / "bin" / "dengine"), "info", str(path)],
        capture_output=True,
        text=True,
    )
    assert (r.returncode, r.stdout) == (4, "")
    assert r.stderr == (
        f"dengine: {path}: at offset {at:#x}: expected a QEMU PT_LOAD of whole pages (p_paddr a multiple "
        "of 0x1000), found p_paddr 0x10\n"
    )


def test_read_speed_on_biggest_real_elf(real_dump: Callable[[str], Path]) -> None:
    path = max((real_dump(n) for n in REAL_ELF), key=lambda p: p.stat().st_size)
    with open_dump(path) as dump:
        t = time.perf_counter()
        n = 0
        nonzero = 0
        for b in dump.batches():
            n += len(b)
            nonzero += int(b.pages.reshape(len(b), -1).view(np.uint64).any(axis=1).sum())
        elapsed = time.perf_counter() - t
    assert n == dump.page_count and nonzero > 0
    print(f"\n{path.name}: {n} pages in {elapsed:.3f} s = {n / max(elapsed, 1e-9):,.0f} pages/s")


def qemu_dump_elf(out: Path, machine: str) -> None:
    """A real ``dump-guest-memory`` (paging=false) ELF of a stopped QEMU guest with no kernel."""
    sock = out.parent / f"{machine}.qmp"
    proc = subprocess.Popen(
        ["qemu-system-x86_64", "-S", "-accel", "tcg", "-M", machine, "-m", "64", "-smp", "2",
         "-display", "none", "-monitor", "none", "-serial", "none", "-qmp", f"unix:{sock},server=on,wait=on"],
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        # The socket file appears at bind(), before QEMU listens: connecting then is refused.
        # Retry until it listens; generous bounds, as QEMU starts slowly on a loaded machine.
        deadline = time.monotonic() + 120
        s = socket.socket(socket.AF_UNIX)
        while True:
            try:
                s.connect(str(sock))
                break
            except (FileNotFoundError, ConnectionRefusedError):
                assert proc.poll() is None, "QEMU exited"
                assert time.monotonic() < deadline, "QEMU did not start"
                time.sleep(0.05)
        with s:
            f = s.makefile("rwb")

            def command(name: str, **args: object) -> None:
                f.write(json.dumps({"execute": name, "arguments": args}).encode() + b"\n")
                f.flush()
                while "event" in (reply := json.loads(f.readline())):
                    pass
                assert "return" in reply, reply

            json.loads(f.readline())  # greeting
            command("qmp_capabilities")
            command("dump-guest-memory", paging=False, protocol=f"file:{out}")
            command("quit")
        proc.wait(120)
    finally:
        if proc.poll() is None:
            proc.kill()


@needs_oracle
@pytest.mark.skipif(shutil.which("qemu-system-x86_64") is None, reason="QEMU not installed")
@pytest.mark.parametrize("machine", ["pc", "q35"])
def test_live_qemu_dump(tmp_path: Path, machine: str) -> None:
    # QEMU 7.2: section headers first, e_ehsize 8, EM_386 in ELF64, p_offset not page aligned.
    path = tmp_path / f"{machine}.elf"
    qemu_dump_elf(path, machine)
    n = assert_agrees_with_oracle(path, OpenOptions(device_memory=True))
    with open_dump(path) as dump:
        assert dump.facts.hypervisor == "qemu" and dump.facts.vcpus == 2
        assert dump.facts.extra["elf_class"] == "ELF64" and dump.facts.arch == "x86"
        assert dump.ranges()[0] == (0, 0xA0)
        assert dump.page_count == 64 * 256 - 0x20  # all RAM but the VGA window
        assert dump.facts.skipped and all(s.startswith("device memory 0x") for s in dump.facts.skipped)
        assert n - dump.page_count == sum(int(s.split("-")[1], 16) - int(s.split()[2].split("-")[0], 16)
                                          for s in dump.facts.skipped) // PAGE  # fmt: skip
