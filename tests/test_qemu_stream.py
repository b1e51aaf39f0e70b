"""QEMU migration stream reader: streams from the builder (written from FORMATS.md §3.2-3.5) and
the real QEMU 7.2 fixtures compared page for page with QEMU's ELF dump of the same pause."""

from __future__ import annotations

import json
import random
import struct
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from dengine_cli.errors import EXIT_BAD_DUMP, EXIT_UNSUPPORTED, FormatError, UnsupportedFeature
from dengine_cli.formats import open_dump, qemu_stream
from dengine_cli.formats.base import Dump, OpenOptions, Source
from tests.builders.qemu_stream import (
    COMPRESS_PAGE,
    CONTINUE,
    PAGE,
    StreamWriter,
    build_mapped_ram,
    build_stream,
)
from tests.conftest import REPO, read_pages

BLOCKS = {"pc.ram": 4 << 20, "vga.vram": 1 << 20, "pc.bios": 256 << 10, "/rom@etc/acpi/tables": 128 << 10}
UUID = "6c0ffee0-0000-4000-8000-00000000a1fa"


def sample_pages(seed: int = 1, n: int = 1024, block: str = "pc.ram") -> dict[tuple[str, int], bytes]:
    r = random.Random(seed)
    return {(block, i): (r.randbytes(PAGE) if i % 3 == 0 else bytes(PAGE)) for i in range(n)}


def write(tmp_path: Path, data: bytes, name: str = "s.qevm") -> Path:
    p = tmp_path / name
    p.write_bytes(data)
    return p


def read_all(dump: Dump, batch: int = 300) -> dict[int, bytes]:
    return read_pages(dump, batch)


def opened(tmp_path: Path, data: bytes, **options: Any) -> Dump:
    return qemu_stream.open_stream(Source.of(write(tmp_path, data)), OpenOptions(**options))


# -- happy paths ---------------------------------------------------------------------------


def test_probe() -> None:
    assert qemu_stream.probe(b"QEVM\x00\x00\x00\x03\x07", 100)
    assert not qemu_stream.probe(b"QEVM\x00\x00\x00\x02", 100)
    assert not qemu_stream.probe(b"", 0)
    assert not qemu_stream.probe(b"LibvirtQemudSave", 100)


def test_pages_facts_and_vga_window(tmp_path: Path) -> None:
    pages = sample_pages()
    pages[("vga.vram", 2)] = b"v" * PAGE
    d = opened(tmp_path, build_stream(pages, BLOCKS, uuid=UUID))
    got = read_all(d)
    expected = {n: c for (b, n), c in pages.items() if b == "pc.ram" and not 0xA0 <= n < 0xC0}
    assert got == expected
    assert d.gfns.dtype == np.uint64
    f = d.facts
    assert (f.format, f.machine, f.uuid, f.memory_bytes) == ("qemu-stream", "pc-i440fx-7.2", UUID, 4 << 20)
    assert f.extra["ram_blocks"] == BLOCKS
    assert f.extra["page_records"] == len(pages)
    assert f.extra["duplicate_pages"] == 0
    assert f.extra["stream_version"] == 3
    assert f.extra["zero_pages"] == sum(1 for n, c in expected.items() if not c.strip(b"\0"))
    assert "RAM block vga.vram (1048576 bytes): device memory, not guest RAM" in f.skipped
    assert "RAM block /rom@etc/acpi/tables (131072 bytes): device memory, not guest RAM" in f.skipped
    assert any(s.startswith("32 pages of RAM behind the legacy VGA window") for s in f.skipped)
    assert f.extra["stopped_at"].startswith("section 'timer'")


def test_device_memory_keeps_the_vga_window(tmp_path: Path) -> None:
    pages = sample_pages()
    d = opened(tmp_path, build_stream(pages, BLOCKS), device_memory=True)
    assert d.page_count == len(pages)
    assert d.read_page(0xA0).tobytes() == pages[("pc.ram", 0xA0)]


def test_consecutive_data_pages_across_the_vga_window(tmp_path: Path) -> None:
    r = random.Random(2)
    pages = {("pc.ram", n): r.randbytes(PAGE) for n in range(200)}
    d = opened(tmp_path, build_stream(pages, {"pc.ram": 1 << 20}, parts=1, footers=False))
    # Stream records are 4104 bytes apart, so batches are gathered copies of the data bytes.
    assert read_all(d) == {n: c for (_, n), c in pages.items() if not 0xA0 <= n < 0xC0}


def test_q35_high_ram_above_4g(tmp_path: Path) -> None:
    size = 3 << 30  # >= 2.75 GiB: q35 puts 2 GiB low and the rest at 4 GiB
    pages = {
        ("pc.ram", 0): b"a" * PAGE,
        ("pc.ram", (2 << 30) // PAGE - 1): b"b" * PAGE,
        ("pc.ram", (2 << 30) // PAGE): b"c" * PAGE,
        ("pc.ram", size // PAGE - 1): b"d" * PAGE,
    }
    d = opened(tmp_path, build_stream(pages, {"pc.ram": size}, machine="pc-q35-7.2"))
    assert d.gfns.tolist() == [0, 0x7FFFF, 0x100000, 0x100000 + (1 << 18) - 1]
    assert d.read_page(0x100000).tobytes() == b"c" * PAGE
    # The same size on i440fx: below 0xE0000000 everything stays low.
    d2 = opened(tmp_path, build_stream(pages, {"pc.ram": size}, machine="pc-i440fx-7.2"))
    assert d2.gfns.tolist() == [0, 0x7FFFF, 0x80000, size // PAGE - 1]


def test_last_occurrence_wins(tmp_path: Path) -> None:
    pages = sample_pages(n=256)
    resend = {("pc.ram", 3): b"N" * PAGE, ("pc.ram", 6): bytes(PAGE), ("pc.ram", 1): b"Z" * PAGE}
    d = opened(tmp_path, build_stream(pages, {"pc.ram": 1 << 20}, resend=resend))
    assert d.read_page(3).tobytes() == b"N" * PAGE
    assert d.read_page(6).tobytes() == bytes(PAGE)
    assert d.read_page(1).tobytes() == b"Z" * PAGE
    assert d.read_page(9).tobytes() == pages[("pc.ram", 9)]
    assert d.facts.extra["duplicate_pages"] == 3


def test_continue_crosses_section_boundaries(tmp_path: Path) -> None:
    # Second PART starts with a CONTINUE record: the block must carry over from the first PART.
    w = StreamWriter()
    w.config("pc-i440fx-7.2")
    w.start(2)
    w.mem_size([("pc.ram", 1 << 20)])
    w.eos()
    w.part(2)
    w.page("pc.ram", 0, b"1" * PAGE)
    w.eos()
    w.footer(2)
    w.part(2, end=True)
    w.page(None, PAGE, b"2" * PAGE)
    w.zero(None, 2 * PAGE)
    w.eos()
    w.footer(2)
    w.eof()
    d = opened(tmp_path, w.bytes())
    assert read_all(d) == {0: b"1" * PAGE, 1: b"2" * PAGE, 2: bytes(PAGE)}
    assert d.facts.extra["stopped_at"] == "QEMU_VM_EOF"


def test_numa_blocks_are_consecutive(tmp_path: Path) -> None:
    blocks = {"ram-node1": 1 << 20, "ram-node0": 2 << 20}  # listed out of order on purpose
    pages = {("ram-node0", 5): b"0" * PAGE, ("ram-node1", 0): b"1" * PAGE, ("ram-node1", 7): b"7" * PAGE}
    d = opened(tmp_path, build_stream(pages, blocks, machine="pc-q35-7.2"))
    assert read_all(d) == {5: b"0" * PAGE, 512: b"1" * PAGE, 519: b"7" * PAGE}
    assert d.facts.memory_bytes == 3 << 20
    assert d.facts.extra["main_ram_blocks"] == ["ram-node0", "ram-node1"]


def test_nonzero_fill_and_compressed_pages_are_materialized(tmp_path: Path) -> None:
    pages: dict[tuple[str, int], bytes | int] = dict(sample_pages(n=300))
    pages[("pc.ram", 4)] = 0xAB  # old QEMU: zero flag with fill byte 0xab
    pages[("pc.ram", 5)] = 0xAB
    d = opened(tmp_path, build_stream(pages, {"pc.ram": 2 << 20}, compress=True), tmp_dir=tmp_path)
    got = read_all(d)
    assert got[4] == b"\xab" * PAGE and got[5] == b"\xab" * PAGE
    for (_, n), c in pages.items():
        if isinstance(c, bytes) and not 0xA0 <= n < 0xC0:
            assert got[n] == c
    assert d.facts.extra["filled_zero_pages"] == 2
    assert d.facts.extra["compressed_pages"] == sum(
        1 for c in pages.values() if isinstance(c, bytes) and c.strip(b"\0")
    )
    # read_page of a materialized page inside a long batch and alone agree
    assert d.read_page(4).tobytes() == b"\xab" * PAGE


def test_mapped_ram(tmp_path: Path) -> None:
    pages = sample_pages(n=512)
    stale = {("pc.ram", 1): b"S" * PAGE}  # written once, then the page became zero: bit clear
    data = build_mapped_ram(pages, {"pc.ram": 2 << 20}, stale=stale)
    d = opened(tmp_path, data)
    got = read_all(d)
    assert got == {n: c for (_, n), c in pages.items() if not 0xA0 <= n < 0xC0}
    assert got[1] == bytes(PAGE)
    assert d.facts.extra["capabilities"] == ["mapped-ram"]
    assert d.facts.machine == "pc-q35-9.0"


def test_open_dump_detects_the_stream(tmp_path: Path) -> None:
    p = write(tmp_path, build_stream(sample_pages(n=64), {"pc.ram": 1 << 20}))
    with open_dump(p) as d:
        assert d.facts.format == "qemu-stream"
        assert d.page_count == 64


def test_vectorized_runs_match_record_by_record(tmp_path: Path) -> None:
    # Long runs of zero and data records (the vectorized path), broken by a named record and a
    # resend, must index exactly like the definition.
    r = random.Random(5)
    pages: dict[tuple[str, int], bytes] = {}
    for n in range(6000):
        pages[("pc.ram", n)] = r.randbytes(PAGE) if (n // 700) % 2 else bytes(PAGE)
    d = opened(tmp_path, build_stream(pages, {"pc.ram": 6000 * PAGE}, parts=4), device_memory=True)
    assert read_all(d) == {n: c for (_, n), c in pages.items()}


# -- bad input -------------------------------------------------------------------------------


def good_stream() -> bytes:
    return build_stream(sample_pages(n=64), {"pc.ram": 1 << 20, "vga.vram": 1 << 20})


def prologue(w: StreamWriter, blocks: list[tuple[str, int]] | None = None) -> None:
    w.config("pc-i440fx-7.2")
    w.start(2)
    w.mem_size(blocks or [("pc.ram", 1 << 20)])
    w.eos()
    w.footer(2)
    w.part(2, end=True)


def bad(tmp_path: Path, data: bytes) -> FormatError | UnsupportedFeature:
    with pytest.raises((FormatError, UnsupportedFeature)) as e:
        opened(tmp_path, data)
    assert isinstance(e.value, FormatError | UnsupportedFeature)
    return e.value


def test_truncated_stream(tmp_path: Path) -> None:
    data = good_stream()
    for cut in (5, 40, 3000, len(data) // 2):
        e = bad(tmp_path, data[:cut])
        assert e.exit_code == EXIT_BAD_DUMP
        assert "found end of file at" in str(e) and "expected " in str(e)
    e = bad(tmp_path, data[: len(data) // 2])
    assert "expected more stream data before the RAM section's EOS" in str(e)


@pytest.mark.parametrize("device_sections", [True, False], ids=["device-sections", "eof-after-ram"])
def test_stream_cut_inside_its_trailing_device_description(tmp_path: Path, device_sections: bool) -> None:
    """A stream cut inside the VMDESCRIPTION after QEMU_VM_EOF (u8 0x06, be32 length, JSON) has
    all of RAM: it reads the same pages as the whole stream, and says where it was cut (it used
    to say nothing).  After device sections the record is found from the end of the file (its
    JSON's first bytes); right after QEMU_VM_EOF even a cut length is seen.  The whole stream has
    no such note."""
    full = build_stream(sample_pages(n=64), {"pc.ram": 1 << 20}, device_sections=device_sections)
    json_len = len(b'{"page_size": 4096, "devices": []}')
    at = len(full) - json_len - 5  # the 0x06 byte
    assert full[at - 1 : at + 1] == b"\x00\x06"
    whole = opened(tmp_path, full)
    pages = read_all(whole)
    assert not [s for s in whole.facts.skipped if "device description" in s]
    whole.close()
    cuts = [1, json_len // 2, json_len - 1] + ([json_len, json_len + 2] if not device_sections else [])
    for cut in cuts:
        end = len(full) - cut
        d = opened(tmp_path, full[:end])
        assert read_all(d) == pages
        have = end - at - 5
        size = f"{have} of its {json_len} bytes of JSON" if have >= 0 else "its be32 length cut"
        assert [s for s in d.facts.skipped if "device description" in s] == [
            f"the stream ends inside its trailing device description at offset {at:#x} "
            f"(QEMU_VM_VMDESCRIPTION, {size}; the file ends at {end:#x}); RAM is complete"
        ], cut
        d.close()


def test_info_shows_a_cut_device_description_and_exits_0(tmp_path: Path) -> None:
    full = build_stream(sample_pages(n=64), {"pc.ram": 1 << 20})
    path = write(tmp_path, full[:-5])
    dengine = str(REPO / ".venv" / "bin" / "dengine")
    r = subprocess.run([dengine, "info", str(path)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "ends inside its trailing device description at offset" in " ".join(r.stdout.split())
    assert "RAM is complete" in " ".join(r.stdout.split())
    r = subprocess.run([dengine, "info", "--json", str(path)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    (info,) = json.loads(r.stdout)["dumps"]
    assert info["pages_present"] == 64
    assert any(s.endswith("; RAM is complete") for s in info["skipped"])


def test_eof_record_before_ram_end(tmp_path: Path) -> None:
    w = StreamWriter()
    w.config("pc")
    w.start(2)
    w.mem_size([("pc.ram", 1 << 20)])
    w.eos()
    w.eof()
    e = bad(tmp_path, w.bytes())
    assert str(e).endswith("expected the RAM SECTION_END before QEMU_VM_EOF, found QEMU_VM_EOF")


def test_wrong_magic_and_version(tmp_path: Path) -> None:
    e = bad(tmp_path, b"QEVX" + good_stream()[4:])
    assert str(e).endswith('at offset 0x0: expected the QEMU stream magic "QEVM", found 51 45 56 58')
    e = bad(tmp_path, StreamWriter(version=2).bytes() + good_stream()[8:])
    assert str(e).endswith("at offset 0x4: expected stream version 3, found 2")


def test_unknown_record_type(tmp_path: Path) -> None:
    w = StreamWriter()
    w.config("pc")
    w.out += b"\x42"
    e = bad(tmp_path, w.bytes())
    assert str(e).endswith(
        f"at offset {len(w.out) - 1:#x}: expected a stream record type (0x00-0x08 or 0x7e), found 0x42"
    )


def test_unknown_ram_flag(tmp_path: Path) -> None:
    w = StreamWriter()
    prologue(w)
    at = len(w.out)
    w.item(0x400)
    e = bad(tmp_path, w.bytes() + bytes(16))
    assert e.exit_code == EXIT_BAD_DUMP
    assert str(e).endswith(
        f"at offset {at:#x}: expected a RAM item flag (ZERO 0x2, MEM_SIZE 0x4, PAGE 0x8, EOS 0x10, ...),"
        " found flags 0x400"
    )


def test_xbzrle_is_unsupported(tmp_path: Path) -> None:
    w = StreamWriter()
    prologue(w)
    at = len(w.out)
    w.item(0x40)
    w.out += b"\x06pc.ram" + bytes(8)
    e = bad(tmp_path, w.bytes())
    assert e.exit_code == EXIT_UNSUPPORTED
    assert str(e).endswith(f"at offset {at:#x}: unsupported XBZRLE-encoded page (RAM flag 0x40)")


def test_continue_without_previous_block(tmp_path: Path) -> None:
    w = StreamWriter()
    prologue(w)
    at = len(w.out)
    w.zero(None, 0)
    e = bad(tmp_path, w.bytes())
    assert str(e).endswith(
        f"at offset {at:#x}: expected a RAM block name (CONTINUE with no previous block), found flags 0x22"
    )


def test_block_not_in_mem_size_list(tmp_path: Path) -> None:
    w = StreamWriter()
    prologue(w)
    at = len(w.out)
    w.page("pc.rom", 0, b"x" * PAGE)
    e = bad(tmp_path, w.bytes())
    assert str(e).endswith(
        f"at offset {at + 9:#x}: expected a RAM block named in the MEM_SIZE list, found 'pc.rom'"
    )


def test_page_beyond_used_length(tmp_path: Path) -> None:
    w = StreamWriter()
    prologue(w)
    at = len(w.out)
    w.zero("pc.ram", 1 << 20)
    e = bad(tmp_path, w.bytes())
    assert str(e).endswith(
        f"at offset {at:#x}: expected a page offset below pc.ram's used_length 0x100000, found 0x100000"
    )


def test_page_beyond_used_length_inside_a_run(tmp_path: Path) -> None:
    w = StreamWriter()
    prologue(w)
    w.zero("pc.ram", 0)
    for n in range(1, 300):
        w.zero(None, n * PAGE)
    at = len(w.out)
    w.zero(None, 256 * PAGE)  # block is 256 pages
    for n in range(5):
        w.zero(None, n * PAGE)
    w.eos()
    e = bad(tmp_path, w.bytes())
    assert "expected a page offset below pc.ram's used_length 0x100000, found 0x100000" in str(e)
    # The first bad record is page 256 of the first run (records 256..299), not the later one.
    assert e.offset < at


def test_mem_size_list_that_does_not_add_up(tmp_path: Path) -> None:
    w = StreamWriter()
    w.config("pc")
    w.start(2)
    w.mem_size([("pc.ram", 1 << 20), ("vga.vram", 1 << 20)], total=(1 << 20) + 4096)
    e = bad(tmp_path, w.bytes())
    assert "MEM_SIZE total 0x101000" in str(e)
    assert str(e).endswith("found vga.vram of 0x100000 bytes")


def test_non_ram_section_before_ram_end(tmp_path: Path) -> None:
    w = StreamWriter()
    w.config("pc")
    at = len(w.out)
    w.device(9, "virtio-mem-early", b"\x01\x02")
    e = bad(tmp_path, w.bytes())
    assert e.exit_code == EXIT_UNSUPPORTED
    assert str(e).endswith(
        f"at offset {at:#x}: unsupported section 'virtio-mem-early' before the end of RAM"
        " (cannot be skipped without its layout)"
    )


def test_footer_for_wrong_section(tmp_path: Path) -> None:
    w = StreamWriter()
    w.config("pc")
    w.start(2)
    w.mem_size([("pc.ram", 1 << 20)])
    w.eos()
    w.footer(5)
    e = bad(tmp_path, w.bytes())
    assert str(e).endswith("expected a footer for section 2, found section 5")


def test_corrupt_compressed_page(tmp_path: Path) -> None:
    w = StreamWriter()
    prologue(w)
    w.item(COMPRESS_PAGE)
    w.out += b"\x06pc.ram" + struct.pack(">I", 10) + b"not zlib!!"
    e = bad(tmp_path, w.bytes())
    assert "expected a zlib-compressed page, found zlib error: " in str(e)


def test_mapped_ram_bitmap_beyond_file(tmp_path: Path) -> None:
    data = bytearray(build_mapped_ram(sample_pages(n=16), {"pc.ram": 1 << 20}))
    # Point the bitmap past the end of the file.
    hdr = data.index(b"\x06pc.ram") + 7 + 8
    struct.pack_into(">Q", data, hdr + 12, len(data) + 10)
    e = bad(tmp_path, bytes(data))
    assert str(e).endswith(f"found offset {len(data) + 10:#x}")
    assert "expected a 32-byte page bitmap inside the file" in str(e)


def test_unknown_configuration_subsection(tmp_path: Path) -> None:
    w = StreamWriter()
    w.config("pc")
    w.out += b"\x05" + bytes([len(b"configuration/new-thing")]) + b"configuration/new-thing" + bytes(8)
    e = bad(tmp_path, w.bytes())
    assert e.exit_code == EXIT_UNSUPPORTED
    assert "unsupported configuration subsection 'configuration/new-thing'" in str(e)


def test_continue_flag_value() -> None:
    assert CONTINUE == qemu_stream.RAM_FLAG_CONTINUE


# -- real QEMU 7.2 streams -------------------------------------------------------------------


def elf_pages(path: Path) -> dict[int, int]:
    """gfn -> file offset from an ELF core's PT_LOADs (p_paddr..+p_filesz at p_offset)."""
    data = path.read_bytes()
    assert data[:4] == b"\x7fELF"
    cls = data[4]
    out: dict[int, int] = {}
    if cls == 2:
        (phoff,) = struct.unpack_from("<Q", data, 0x20)
        phentsize, phnum = struct.unpack_from("<HH", data, 0x36)
        fmt = "<IIQQQQQQ"
    else:
        (phoff,) = struct.unpack_from("<I", data, 0x1C)
        phentsize, phnum = struct.unpack_from("<HH", data, 0x2A)
        fmt = "<IIIIIIII"
    for i in range(phnum):
        f = struct.unpack_from(fmt, data, phoff + i * phentsize)
        if cls == 2:
            p_type, _, p_offset, _, p_paddr, p_filesz = f[0], f[1], f[2], f[3], f[4], f[5]
        else:
            p_type, p_offset, _, p_paddr, p_filesz = f[0], f[1], f[2], f[3], f[4]
        if p_type != 1:
            continue
        for k in range(p_filesz // PAGE):
            out[(p_paddr >> 12) + k] = p_offset + k * PAGE
    return out


@pytest.mark.parametrize("guest", ["alpha", "beta"])
def test_real_stream_matches_elf_of_same_pause(real_dump: Any, guest: str) -> None:
    stream = real_dump(f"{guest}.qevm")
    elf = real_dump(f"{guest}.elf")
    pages = elf_pages(elf)
    elf_data = np.memmap(elf, dtype=np.uint8, mode="r")
    # The ELF also holds device memory in the PCI hole (VRAM, BIOS flash): not RAM.
    low_end = 0
    while low_end in pages or 0xA0 <= low_end < 0xC0:
        low_end += 1
    ram = {g: o for g, o in pages.items() if g < low_end or g >= 0x100000}
    with open_dump(stream) as d:
        assert d.facts.format == "qemu-stream"
        assert d.gfns.tolist() == sorted(ram)
        for b in d.batches():
            offs = np.array([ram[g] for g in b.gfns.tolist()], dtype=np.int64)
            expect = elf_data[offs[:, None] + np.arange(PAGE)]
            assert np.array_equal(b.pages, expect)
        assert d.facts.extra["duplicate_pages"] == 0
        assert d.facts.machine and ("q35" in d.facts.machine) == (guest == "beta")


def test_runs_of_stream_pages_are_strided_views(real_dump: Any) -> None:
    """Consecutive pages of a stream sit 4104 bytes apart (8-byte header + page): long runs come
    out as views of the mapping, not copies, and read the same as one page at a time."""
    with open_dump(real_dump("alpha.qevm")) as dump:
        views = 0
        for batch in dump.batches():
            if not batch.pages.flags.owndata and batch.pages.strides == (4104, 1):
                views += len(batch)
                for i in (0, len(batch) // 2, len(batch) - 1):
                    assert np.array_equal(batch.pages[i], dump.read_page(int(batch.gfns[i])))
        assert views > 1000
