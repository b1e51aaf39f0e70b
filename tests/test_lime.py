"""The LiME reader: aligned and unaligned ranges, lying headers, property tests against a
byte-level model of guest memory."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dengine_cli.errors import FormatError, UnsupportedFeature
from dengine_cli.formats import lime, open_dump
from dengine_cli.formats.base import Dump, OpenOptions
from tests.builders.lime import HEADER_SIZE, build_lime, lime_range
from tests.conftest import read_pages

PAGE = 4096


def pattern(addr: int, length: int) -> bytes:
    """Bytes that say their own address (a u32 per 4 bytes), so misplacement shows."""
    first = addr // 4 * 4
    words = np.arange(first, addr + length + 4, 4, dtype=np.uint64).astype("<u4").tobytes()
    return words[addr - first : addr - first + length]


def write(tmp_path: Path, data: bytes) -> Path:
    path = tmp_path / "mem.lime"
    path.write_bytes(data)
    return path


def read_all(dump: Dump, batch: int = 7) -> dict[int, bytes]:
    return read_pages(dump, batch)


def model(ranges: list[tuple[int, bytes]]) -> dict[int, bytes]:
    """Guest pages as LiME means them: touched pages present, untouched bytes zero."""
    mem: dict[int, bytearray] = {}
    for start, data in ranges:
        pos = 0
        while pos < len(data):
            a = start + pos
            n = min(PAGE - a % PAGE, len(data) - pos)
            mem.setdefault(a // PAGE, bytearray(PAGE))[a % PAGE : a % PAGE + n] = data[pos : pos + n]
            pos += n
    return {g: bytes(p) for g, p in mem.items()}


def test_aligned_ranges_are_views(tmp_path: Path) -> None:
    ranges = [(0, pattern(0, 0xA0000)), (0x100000, pattern(0x100000, 0x300000))]
    with open_dump(write(tmp_path, build_lime(ranges))) as dump:
        assert dump.facts.format == "lime" and dump.facts.extra == {"ranges": 2}
        assert dump.page_count == 0xA0 + 0x300
        batches = list(dump.batches(0x100))
        assert all(b.pages.base is not None for b in batches)
        assert read_all(dump, 0x100) == model(ranges)


def test_typical_x86_unaligned_first_range(tmp_path: Path) -> None:
    # /proc/iomem "System RAM" 0x1000-0x9fbff, then 1 MiB up: the partial page 0x9f is present
    # with zeros after 0xc00.
    ranges = [(0x1000, pattern(0x1000, 0x9EC00)), (0x100000, pattern(0x100000, 0x10000))]
    with open_dump(write(tmp_path, build_lime(ranges))) as dump:
        got = read_all(dump)
        assert dump.facts.extra == {"ranges": 2, "partial_pages": 1}
    assert sorted(got) == [*range(1, 0xA0), *range(0x100, 0x110)]
    assert got[0x9F] == pattern(0x9F000, 0xC00) + bytes(PAGE - 0xC00)
    assert got == model(ranges)


def test_ranges_sharing_pages_and_inside_one_page(tmp_path: Path) -> None:
    ranges = [
        (0x2800, pattern(0x2800, 0x1000)),  # 0x2800-0x37ff: two partial pages
        (0x3900, pattern(0x3900, 0x100)),  # inside page 3, beside the previous range
        (0x7FFF, b"\x01\x02"),  # across a page boundary
    ]
    with open_dump(write(tmp_path, build_lime(ranges))) as dump:
        got = read_all(dump)
    assert sorted(got) == [2, 3, 7, 8]
    assert got == model(ranges)


def test_probe() -> None:
    data = build_lime([(0, bytes(PAGE))])
    assert lime.probe(data, len(data))
    assert not lime.probe(b"EMiL", 4)
    assert not lime.probe(b"\x7fELF" + bytes(60), 64)


# -- bad input ------------------------------------------------------------------------------------


def open_error(tmp_path: Path, data: bytes, forced: bool = False) -> FormatError | UnsupportedFeature:
    with pytest.raises((FormatError, UnsupportedFeature)) as info:
        open_dump(write(tmp_path, data), OpenOptions(format="lime") if forced else None)
    assert isinstance(info.value, FormatError | UnsupportedFeature)
    return info.value


def test_range_beyond_end_of_file(tmp_path: Path) -> None:
    data = build_lime([(0, bytes(PAGE)), (0x10000, bytes(2 * PAGE))])[:-100]
    err = open_error(tmp_path, data)
    assert err.exit_code == 4
    at = HEADER_SIZE + PAGE
    assert str(err) == (
        f"{tmp_path / 'mem.lime'}: at offset {at:#x}: expected range 0x10000-0x11fff (0x2000 bytes) after "
        f"its header, found end of file at {len(data):#x}"
    )


def test_truncated_header(tmp_path: Path) -> None:
    data = build_lime([(0, bytes(PAGE))]) + lime_range(0x10000, bytes(PAGE))[:20]
    err = open_error(tmp_path, data)
    assert str(err).endswith(
        f"at offset {HEADER_SIZE + PAGE:#x}: expected a 32-byte LiME range header, "
        "found 20 bytes before the end of file"
    )


def test_bad_magic_of_a_later_range(tmp_path: Path) -> None:
    data = build_lime([(0, bytes(PAGE))]) + lime_range(0x10000, bytes(PAGE), magic=0x12345678)
    err = open_error(tmp_path, data)
    assert err.exit_code == 4
    assert str(err).endswith(
        f"at offset {HEADER_SIZE + PAGE:#x}: expected LiME magic 0x4c694d45 (EMiL), found 0x12345678"
    )


def test_bad_magic_when_forced(tmp_path: Path) -> None:
    err = open_error(tmp_path, b"\x00" * 64, forced=True)
    assert str(err).endswith("at offset 0x0: expected LiME magic 0x4c694d45 (EMiL), found 0x0")


def test_unsupported_version(tmp_path: Path) -> None:
    err = open_error(tmp_path, lime_range(0, bytes(PAGE), version=2))
    assert err.exit_code == 5
    assert str(err).endswith("at offset 0x4: unsupported LiME version 2")


def test_end_before_start(tmp_path: Path) -> None:
    err = open_error(tmp_path, lime_range(0x5000, b"", e_addr=0x4000))
    assert err.exit_code == 4
    assert str(err).endswith("at offset 0x10: expected e_addr >= s_addr 0x5000, found e_addr 0x4000")


def test_overlapping_ranges(tmp_path: Path) -> None:
    data = build_lime([(0x10000, bytes(2 * PAGE)), (0x11800, bytes(PAGE))])
    err = open_error(tmp_path, data)
    assert err.exit_code == 4
    assert str(err).endswith(
        f"at offset {HEADER_SIZE + 2 * PAGE:#x}: expected LiME ranges not overlapping, "
        "found range at 0x11800 inside range 0x10000-0x11fff"
    )


def test_huge_claimed_range(tmp_path: Path) -> None:
    err = open_error(tmp_path, lime_range(0, bytes(PAGE), e_addr=(1 << 63)))
    assert "expected range 0x0-0x8000000000000000 (0x8000000000000001 bytes) after its header" in str(err)


# -- property: random ranges read back as the byte model says --------------------------------------


@st.composite
def lime_cases(draw: st.DrawFn) -> list[tuple[int, bytes]]:
    pieces = draw(st.lists(st.tuples(st.integers(0, 3 * PAGE), st.integers(1, 3 * PAGE)), max_size=6))
    ranges = []
    addr = 0
    for gap, length in pieces:
        addr += gap
        ranges.append((addr, pattern(addr, length)))
        addr += length
    order = draw(st.permutations(range(len(ranges))))
    return [ranges[i] for i in order]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ranges=lime_cases())
def test_random_ranges_read_back(tmp_path: Path, ranges: list[tuple[int, bytes]]) -> None:
    if not ranges:
        err = open_error(tmp_path, b"", forced=True)
        assert "expected a LiME range header, found an empty file" in str(err)
        return
    with open_dump(write(tmp_path, build_lime(ranges))) as dump:
        got = read_all(dump, batch=3)
        assert dump.gfns.tolist() == sorted(got)
    assert got == model(ranges)
