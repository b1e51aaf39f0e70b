"""The Xen xc_core reader: PV (.xen_p2m) and HVM (.xen_pfn) builder files, padding, lying headers,
property tests and the libkdumpfile oracle."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dengine_cli.errors import FormatError, UnsupportedFeature
from dengine_cli.formats import open_dump, xc_core
from dengine_cli.formats.base import Dump
from tests.builders.xc_core import build_xc_core, pre_elf_xc_core, xen_version_desc
from tests.conftest import needs_oracle, oracle_pages, page_digests, read_pages

PAGE = 4096


def page(pfn: int, tag: int = 0) -> bytes:
    return (pfn.to_bytes(8, "little") + bytes([tag & 0xFF]) * 8) * (PAGE // 16)


def write(tmp_path: Path, data: bytes, name: str = "guest.core") -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


def read_all(dump: Dump, batch: int = 5) -> dict[int, bytes]:
    return read_pages(dump, batch)


HVM_PFNS = [0, 1, 2, 0x9F, 0x100, 0x101, 0x102, 0x7000A, 0x7000E]


def test_hvm_dump(tmp_path: Path) -> None:
    entries = [(p, p, page(p)) for p in HVM_PFNS]
    built = build_xc_core(entries, hvm=True, shuffle_seed=7, nr_vcpus=4)
    assert built.index[".shstrtab"] != 1  # the shuffle moved sections around
    with open_dump(write(tmp_path, built.data)) as dump:
        assert read_all(dump) == {p: page(p) for p in HVM_PFNS}
        f = dump.facts
    assert (f.format, f.hypervisor, f.guest_type, f.vcpus, f.xen_version) == (
        "xc-core",
        "xen",
        "hvm",
        4,
        "4.17.2",
    )
    assert f.arch == "x86_64" and f.page_size == PAGE and f.memory_bytes == len(HVM_PFNS) * PAGE
    assert f.extra["xen_capabilities"].startswith("xen-3.0-x86_64 hvm-3.0-x86_32")
    assert f.extra["dumpcore_format_version"] == "0.1"
    assert f.skipped == []


def test_pv_dump_reads_guest_pfns_not_machine_frames(tmp_path: Path) -> None:
    # PV p2m entries pair the guest pfn with a machine frame far away and in another order.
    entries = [(p, 0x123456 - 5 * p, page(p)) for p in (0, 1, 2, 3, 10, 11, 0x800)]
    built = build_xc_core(entries, hvm=False)
    with open_dump(write(tmp_path, built.data)) as dump:
        assert read_all(dump) == {p: page(p) for p, _, _ in entries}
        assert dump.facts.guest_type == "pv"


def test_file_order_need_not_be_sorted(tmp_path: Path) -> None:
    pfns = [5, 3, 9, 0, 4]
    built = build_xc_core([(p, p, page(p)) for p in pfns], hvm=True)
    with open_dump(write(tmp_path, built.data)) as dump:
        assert dump.gfns.tolist() == [0, 3, 4, 5, 9]
        assert read_all(dump) == {p: page(p) for p in pfns}


def test_padding_entries_are_skipped_but_32bit_all_ones_is_a_pfn(tmp_path: Path) -> None:
    # ~0 (64 bits) pads a live dump; 0xFFFFFFFF is a real pfn (volatility3 confuses the two).
    entries = [(0, 7, page(0)), (0xFFFFFFFF, 8, page(0xFFFFFFFF))]
    for hvm in (True, False):
        built = build_xc_core(entries, hvm=hvm, padding=3)
        with open_dump(write(tmp_path, built.data)) as dump:
            assert read_all(dump) == {0: page(0), 0xFFFFFFFF: page(0xFFFFFFFF)}
            table = ".xen_pfn" if hvm else ".xen_p2m"
            assert dump.facts.skipped == [f"3 padding entries (pfn ~0) in {table}"]
            assert dump.facts.extra["nr_pages"] == 5


def test_big_endian_dump(tmp_path: Path) -> None:
    built = build_xc_core([(p, p, page(p)) for p in (1, 2, 3)], hvm=True, big_endian=True)
    with open_dump(write(tmp_path, built.data)) as dump:
        assert read_all(dump) == {p: page(p) for p in (1, 2, 3)}
        assert dump.facts.xen_version == "4.17.2"


def test_xen_version_extra_string(tmp_path: Path) -> None:
    desc = xen_version_desc(major=4, minor=19, extra="-unstable")
    built = build_xc_core([(0, 0, page(0))], hvm=True, version_desc=desc)
    with open_dump(write(tmp_path, built.data)) as dump:
        assert dump.facts.xen_version == "4.19-unstable"


def test_probe() -> None:
    data = build_xc_core([(0, 0, page(0))], hvm=False).data
    assert xc_core.probe(data[:65536], len(data))
    assert xc_core.probe(pre_elf_xc_core(), 8216)
    assert not xc_core.probe(b"\x7fELF" + bytes(60), 64)
    assert not xc_core.probe(b"EMiL" + bytes(60), 64)


# -- bad input ------------------------------------------------------------------------------------


def open_error(tmp_path: Path, data: bytes) -> FormatError | UnsupportedFeature:
    path = write(tmp_path, data)
    with pytest.raises((FormatError, UnsupportedFeature)) as info:
        open_dump(path)
    assert isinstance(info.value, FormatError | UnsupportedFeature)
    return info.value


def test_pre_elf_xc_core_is_unsupported(tmp_path: Path) -> None:
    for hvm in (False, True):
        err = open_error(tmp_path, pre_elf_xc_core(hvm))
        assert err.exit_code == 5
        assert (
            str(err)
            == f"{tmp_path / 'guest.core'}: at offset 0x0: unsupported pre-ELF xc_core (Xen <= 3.0.3)"
        )


def test_duplicate_pfn(tmp_path: Path) -> None:
    built = build_xc_core([(4, 4, page(4)), (5, 5, page(5)), (4, 9, page(9))], hvm=False)
    err = open_error(tmp_path, built.data)
    assert err.exit_code == 4
    assert str(err).endswith(
        f"at offset {built.table_offset + 2 * 16:#x}: expected each pfn once in .xen_p2m, "
        "found pfn 0x4 again at entry 2"
    )


def test_more_pages_claimed_than_xen_pages_holds(tmp_path: Path) -> None:
    built = build_xc_core([(0, 0, page(0)), (1, 1, page(1))], hvm=True, nr_pages=1 << 40)
    err = open_error(tmp_path, built.data)
    assert err.exit_code == 4
    assert str(err).endswith(
        f"at offset {built.pages_offset:#x}: expected {1 << 40} pages in .xen_pages (nr_pages of the header "
        "note), found 2 pages (0x2000 bytes); --partial reads the 2 pages present"
    )


def test_table_shorter_than_nr_pages(tmp_path: Path) -> None:
    built = build_xc_core([(0, 0, page(0)), (1, 1, page(1))], hvm=True, table_entries=[(0, 0)])
    err = open_error(tmp_path, built.data)
    assert str(err).endswith(
        f"at offset {built.table_offset:#x}: expected 2 entries of 8 bytes in .xen_pfn, "
        "found 1 entries (0x8 bytes); --partial reads the 1 pages present"
    )


def test_truncated_file(tmp_path: Path) -> None:
    built = build_xc_core([(p, p, page(p)) for p in range(4)], hvm=True)
    data = built.data[: built.pages_offset + PAGE]
    err = open_error(tmp_path, data)
    assert err.exit_code == 4
    # .shstrtab (at the end of the file) is the first section found missing.
    shdr = built.shoff + built.index[".shstrtab"] * 64
    assert f"at offset {shdr:#x}: expected section {built.index['.shstrtab']} at" in str(err)
    assert str(err).endswith(f"within the file, found end of file at {len(data):#x}")


def test_page_size_other_than_4096(tmp_path: Path) -> None:
    built = build_xc_core([(0, 0, page(0))], hvm=True, page_size=65536)
    err = open_error(tmp_path, built.data)
    assert err.exit_code == 5
    assert str(err).endswith(f"at offset {built.header_desc_offset + 24:#x}: unsupported page size 65536")


def test_bad_header_magic(tmp_path: Path) -> None:
    built = build_xc_core([(0, 0, page(0))], hvm=True, magic=0xDEADBEEF)
    err = open_error(tmp_path, built.data)
    assert str(err).endswith(
        f"at offset {built.header_desc_offset:#x}: expected xch_magic 0xf00febed (PV) or 0xf00febee (HVM), "
        "found 0xdeadbeef"
    )


def test_unknown_format_version(tmp_path: Path) -> None:
    built = build_xc_core([(0, 0, page(0))], hvm=True, format_version=(1 << 32) | 0)
    err = open_error(tmp_path, built.data)
    assert err.exit_code == 5 and "unsupported dump-core format version 1.0" in str(err)


def test_missing_xen_pages_section(tmp_path: Path) -> None:
    built = build_xc_core([(0, 0, page(0))], hvm=True)
    data = built.data.replace(b".xen_pages\0", b".xen_pagez\0")
    err = open_error(tmp_path, data)
    assert str(err).endswith(
        f"at offset {built.shoff:#x}: expected a .xen_pages section (xc_core), found none"
    )


# -- property: random page maps read back unchanged ------------------------------------------------


@st.composite
def xc_cases(draw: st.DrawFn) -> tuple[list[tuple[int, int, bytes]], bool, int, bool, int]:
    pfns = draw(st.lists(st.integers(0, 5000), unique=True, max_size=30))
    entries = [(p, 0x40000 + (p * 7919) % 100003, page(p, tag=p % 7)) for p in pfns]
    return (
        entries,
        draw(st.booleans()),
        draw(st.integers(0, 3)),
        draw(st.booleans()),
        draw(st.integers(0, 99)),
    )


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=xc_cases())
def test_random_page_maps_read_back(
    tmp_path: Path, case: tuple[list[tuple[int, int, bytes]], bool, int, bool, int]
) -> None:
    entries, hvm, padding, big, seed = case
    built = build_xc_core(entries, hvm=hvm, padding=padding, big_endian=big, shuffle_seed=seed)
    with open_dump(write(tmp_path, built.data)) as dump:
        assert read_all(dump, batch=4) == {p: data for p, _, data in entries}
        assert dump.facts.guest_type == ("hvm" if hvm else "pv")


# -- the libkdumpfile oracle -----------------------------------------------------------------------


@needs_oracle
@pytest.mark.parametrize("hvm", [True, False])
def test_oracle_agrees(tmp_path: Path, hvm: bool) -> None:
    # libkdumpfile 0.5.1 leaves file.pagemap empty for xc_core, so the oracle probes every pfn
    # below max_pfn through KPHYSADDR, which for PV goes through the p2m (MACHPHYSADDR would
    # read machine frames).  No padding here: libkdumpfile takes pfn ~0 into max_pfn, which wraps.
    pfns = [0, 1, 2, 3, 0x10, 0x11, 0x9F, 0x100, 0x3FF, 0x200, 0x201]
    entries = [(p, 0x80000 - 3 * p, page(p, tag=p)) for p in pfns]
    path = write(tmp_path, build_xc_core(entries, hvm=hvm, shuffle_seed=1).data)
    fmt, oracle = oracle_pages(path, scan_kphys=True)
    assert fmt == "xc_core_elf"
    with open_dump(path) as dump:
        ours: dict[int, bytes] = {}
        for b in dump.batches():
            ours.update(page_digests(b.gfns, b.pages))
    assert sorted(oracle) == sorted(pfns)
    assert ours == oracle
