"""The kdump reader: every codec, plain and flattened, excluded/shared-zero/incomplete pages,
header layouts, QEMU device memory, bad input; cross-checked with libkdumpfile and real QEMU dumps."""

from __future__ import annotations

import struct
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dengine_cli.errors import FormatError, UnsupportedFeature
from dengine_cli.formats import kdump
from dengine_cli.formats.base import Dump, OpenOptions, Source
from tests.builders import lzo
from tests.builders.kdump import (
    build_kdump,
    end_marker,
    flat_header,
    flatten,
    reassemble,
    record,
)
from tests.conftest import FIXTURES, REPO, needs_oracle, oracle_pages, page_digests, read_pages

CODECS = ["zlib", "lzo", "snappy", "zstd", "none"]
ZERO = bytes(4096)


def sample_pages(n: int = 300, seed: int = 0, base: int = 0) -> dict[int, bytes]:
    """Pages of mixed compressibility: zero, text-like, random (incompressible)."""
    rng = np.random.default_rng(seed)
    pages = {}
    for i in range(n):
        g = base + i
        kind = i % 5
        if kind == 0:
            pages[g] = ZERO
        elif kind == 4:
            pages[g] = rng.integers(0, 256, 4096, dtype=np.uint8).tobytes()
        else:
            k = int(rng.integers(1, 4096))
            p = bytearray(4096)
            p[:k] = rng.integers(0, 8, k, dtype=np.uint8).tobytes()
            pages[g] = bytes(p)
    return pages


def write(tmp_path: Path, data: bytes, name: str = "dump.kdump") -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


def open_path(path: Path, **opts: Any) -> Dump:
    return kdump.open_kdump(Source.of(path), OpenOptions(**opts))


def read_all(dump: Dump, batch: int = 97) -> dict[int, bytes]:
    return read_pages(dump, batch)


def fails(path: Path, **opts: Any) -> FormatError:
    with pytest.raises(FormatError) as e:
        d = open_path(path, **opts)
        read_all(d)
    assert e.value.exit_code == 4
    return e.value


def unsupported(path: Path, **opts: Any) -> UnsupportedFeature:
    with pytest.raises(UnsupportedFeature) as e:
        d = open_path(path, **opts)
        read_all(d)
    assert e.value.exit_code == 5
    return e.value


# --- happy paths ----------------------------------------------------------------------------------


def test_probe() -> None:
    assert kdump.probe(b"KDUMP   \x06\0\0\0", 1 << 20)
    assert kdump.probe(b"DISKDUMP", 1 << 20)
    assert kdump.probe(b"makedumpfile\0\0\0\0" + bytes(16), 1 << 20)
    assert not kdump.probe(b"makedumpfileX\0\0\0", 1 << 20)
    assert not kdump.probe(b"\x7fELF", 100)
    assert not kdump.probe(b"", 0)


@pytest.mark.parametrize("codec", CODECS)
@pytest.mark.parametrize("flat", [False, True], ids=["plain", "flattened"])
def test_codec_round_trip(tmp_path: Path, codec: str, flat: bool) -> None:
    pages = sample_pages()
    kf = build_kdump(pages, codec=codec)
    path = write(tmp_path, flatten(kf) if flat else kf.data)
    d = open_path(path)
    assert read_all(d) == pages
    assert d.facts.format == "kdump"
    assert d.facts.compression == codec
    assert d.facts.arch == "x86_64"
    assert d.facts.extra["header_version"] == 6
    assert d.facts.extra["block_size"] == 4096
    assert d.facts.extra["dump_level"] == 1
    assert d.facts.extra["release"] == "6.1.0-test"
    assert d.facts.extra["excluded_pages"] == 0
    assert d.facts.extra.get("container") == ("flattened" if flat else None)


def test_mixed_codecs_per_page(tmp_path: Path) -> None:
    pages = sample_pages(200)
    per_page = {g: ["zlib", "lzo", "snappy", "zstd", "none"][g % 5] for g in pages}
    d = open_path(write(tmp_path, build_kdump(pages, codec=per_page).data))
    assert read_all(d) == pages
    assert d.facts.compression == "mixed"


def test_excluded_pages_are_absent(tmp_path: Path) -> None:
    pages = sample_pages(100)
    excluded = {100, 101, 150, 2000}
    d = open_path(write(tmp_path, build_kdump(pages, excluded=excluded, codec="zstd").data))
    assert read_all(d) == pages
    assert d.facts.extra["excluded_pages"] == 4
    assert d.facts.memory_bytes == 104 * 4096
    for g in excluded:
        with pytest.raises(KeyError):
            d.read_page(g)
    assert d.read_page(7).tobytes() == pages[7]


def test_random_access_pages_at(tmp_path: Path) -> None:
    pages = sample_pages(300)
    d = open_path(write(tmp_path, flatten(build_kdump(pages, codec="snappy", shared_zero=True))))
    want = np.array([299, 3, 150, 0, 5, 5], dtype=np.uint64)
    got = d.pages_at(want)
    assert [got[i].tobytes() for i in range(len(want))] == [pages[int(g)] for g in want]


def test_flattened_equals_plain_qemu_order_and_shuffled(tmp_path: Path) -> None:
    # Gaps in the gfns make the bitmaps more than one 4 KiB piece, so they interleave.
    pages = sample_pages(400, base=0) | sample_pages(100, seed=1, base=70000)
    kf = build_kdump(pages, codec="zlib", excluded={69999}, shared_zero=True)
    plain = read_all(open_path(write(tmp_path, kf.data, "plain")))
    for seed in (None, 7):
        flat = open_path(write(tmp_path, flatten(kf, chunk=16384, shuffle_seed=seed), f"flat{seed}"))
        assert isinstance(flat, kdump.KdumpDump)
        # 16 KiB records split compressed pages: some pages are assembled from two records.
        assert len(flat._slow_rows) > 0
        assert read_all(flat) == plain == pages


def test_flattened_small_records_split_descriptors_and_bitmaps(tmp_path: Path) -> None:
    pages = sample_pages(300)
    kf = build_kdump(pages, codec="lzo")
    data = kf.data
    # Records of 1000 bytes: every structure, even the header, crosses record boundaries.
    body = b"".join(record(o, data[o : o + 1000]) for o in range(0, len(data), 1000))
    d = open_path(write(tmp_path, flat_header() + body + end_marker()))
    assert read_all(d) == pages


def test_flattened_overlapping_records_last_write_wins(tmp_path: Path) -> None:
    pages = sample_pages(50)
    kf = build_kdump(pages, codec="zlib")
    data = kf.data
    sub_at = kf.regions["sub"][0]
    garbage = b"\xff" * 200
    body = (
        record(sub_at - 100, garbage) + record(0, data) + record(sub_at + 50, data[sub_at + 50 : sub_at + 60])
    )
    d = open_path(write(tmp_path, flat_header() + body + end_marker()))
    assert read_all(d) == pages


def test_shared_zero_page_like_qemu(tmp_path: Path) -> None:
    pages = sample_pages(500)
    kf = build_kdump(pages, codec="zlib", shared_zero=True)
    zero_gfns = [g for g, p in pages.items() if p == ZERO]
    assert len({kf.data_at[g] for g in zero_gfns}) == 1
    d = open_path(write(tmp_path, kf.data))
    assert isinstance(d, kdump.KdumpDump)
    assert int(np.count_nonzero(d._codec == kdump.SHARED_ZERO)) == len(zero_gfns)
    assert read_all(d) == pages


#: Where ``disk_dump_header.status`` lies in a kdump file (diskdump_mod.h: after the signature,
#: header_version, the six 65-byte utsname fields, padding to 8 and the 16-byte timestamp).
STATUS_AT = {"64": 8 + 4 + 6 * 65 + 6 + 16, "32": 8 + 4 + 6 * 65 + 2 + 8}


@pytest.mark.parametrize("layout", ["64", "32"])
@pytest.mark.parametrize("flat", [False, True], ids=["plain", "flattened"])
def test_incomplete_dump_is_refused_naming_partial(tmp_path: Path, layout: str, flat: bool) -> None:
    """makedumpfile marks a dump it could not finish (ENOSPC) DUMP_DH_COMPRESSED_INCOMPLETE:
    refused, as an xc_core cut short is, at the status field, naming what --partial reads."""
    pages = sample_pages(60)
    missing = {3, 4, 40}
    kf = build_kdump(pages, codec="zlib", incomplete=missing, layout=layout)
    status_at = STATUS_AT[layout]
    assert struct.unpack_from("<I", kf.data, status_at)[0] & 0x8
    path = write(tmp_path, flatten(kf) if flat else kf.data)
    at = 4096 + 16 + status_at if flat else status_at  # the header is the first record
    e = fails(path)
    assert str(e) == (
        f"{path}: at offset {at:#x}: expected a complete dump (status without "
        "DUMP_DH_COMPRESSED_INCOMPLETE 0x8), found status 0x9: makedumpfile stopped early, 3 of the "
        "60 pages it lists were never written; --partial reads the 57 pages present"
    )


@pytest.mark.parametrize("flat", [False, True], ids=["plain", "flattened"])
def test_incomplete_dump_with_partial_drops_unwritten_pages_and_says_so(tmp_path: Path, flat: bool) -> None:
    pages = sample_pages(60)
    missing = {3, 4, 40}
    kf = build_kdump(pages, codec="zlib", incomplete=missing)
    path = write(tmp_path, flatten(kf) if flat else kf.data)
    d = open_path(path, partial=True)
    assert read_all(d) == {g: p for g, p in pages.items() if g not in missing}
    assert d.facts.extra["missing_pages"] == 3
    assert d.name == f"{path} (partial: 57 pages, 3 of the 60 listed never written)"
    assert d.source.name == str(path)  # errors still name the file
    assert d.facts.extra["partial"] == {
        "pages_claimed": 60,
        "pages_read": 57,
        "covers": "the 57 pages written of the 60 the bitmap lists",
    }
    assert d.facts.skipped == [
        "3 of the 60 pages the bitmap lists, which makedumpfile never wrote (status "
        "DUMP_DH_COMPRESSED_INCOMPLETE: it stopped early): the figures cover the 57 pages written "
        "only (--partial)"
    ]


def test_every_command_refuses_or_names_an_incomplete_dump(tmp_path: Path) -> None:
    """Through the command line: `info` without --partial is exit 4 on one line; with it, `info`
    lists what was left out (text and JSON) and `analyze` names what its figures cover; an
    index built with --partial serves no run without it."""
    import json
    import subprocess

    dengine = str(REPO / ".venv" / "bin" / "dengine")
    path = write(tmp_path, build_kdump(sample_pages(60), codec="zlib", incomplete={3, 4, 40}).data)
    cache = str(tmp_path / "cache")

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([dengine, *args], capture_output=True, text=True)

    refused = f"dengine: {path}: at offset {STATUS_AT['64']:#x}: expected a complete dump"
    r = run("info", str(path))
    assert r.returncode == 4 and r.stderr.startswith(refused) and r.stderr.count("\n") == 1
    assert r.stderr.endswith("; --partial reads the 57 pages present\n") and r.stdout == ""
    r = run("info", "--partial", "--json", str(path))
    assert r.returncode == 0, r.stderr
    (dump,) = json.loads(r.stdout)["dumps"]
    assert dump["pages_present"] == 57 and dump["extra"]["partial"]["pages_claimed"] == 60
    r = run("info", "--partial", str(path))
    assert "which makedumpfile never wrote" in r.stdout and "(--partial)" in " ".join(r.stdout.split())
    r = run("index", "--partial", "--index-dir", cache, str(path))
    assert r.returncode == 0, r.stderr
    r = run("analyze", "--partial", "--index-dir", cache, "--format", "json", str(path))
    assert r.returncode == 0, r.stderr
    (vm,) = json.loads(r.stdout)["vms"]
    assert vm["name"] == f"{path} (partial: 57 pages, 3 of the 60 listed never written)"
    assert vm["pages_present"] == 57
    r = run("analyze", "--index-dir", cache, str(path))
    assert r.returncode == 4 and r.stderr.startswith(refused)


def test_complete_kdump_is_the_same_with_partial(tmp_path: Path) -> None:
    path = write(tmp_path, build_kdump(sample_pages(60), codec="zlib").data)
    a, b = open_path(path), open_path(path, partial=True)
    assert read_all(a) == read_all(b)
    assert a.name == b.name == str(path)
    assert "partial" not in b.facts.extra and b.facts.skipped == []


def test_offset_zero_without_incomplete_is_an_error(tmp_path: Path) -> None:
    pages = sample_pages(10)
    kf = build_kdump(pages, codec="none", desc_override={3: (0, 4096, 0)})
    # Offset 0 points at the header: a valid place in the file, read as is (as libkdumpfile does).
    d = open_path(write(tmp_path, kf.data))
    assert read_all(d)[3] == kf.data[:4096]


def test_32bit_layout(tmp_path: Path) -> None:
    pages = sample_pages(100)
    vmci = b"OSRELEASE=5.10.0-686\nPAGESIZE=4096\n"
    d = open_path(write(tmp_path, build_kdump(pages, layout="32", machine="i686", vmcoreinfo=vmci).data))
    assert read_all(d) == pages
    assert d.facts.arch == "i686"
    assert d.facts.extra["OSRELEASE"] == "5.10.0-686"


def test_qemu_32bit_header_named_x86_64(tmp_path: Path) -> None:
    # QEMU writes its 32-bit header for a guest not in long mode but names the target "x86_64".
    pages = sample_pages(100)
    d = open_path(write(tmp_path, build_kdump(pages, layout="32", machine="x86_64", utsname={}).data))
    assert read_all(d) == pages


def test_big_endian_dump(tmp_path: Path) -> None:
    pages = sample_pages(40)
    d = open_path(write(tmp_path, build_kdump(pages, machine="s390x", big_endian=True, codec="zlib").data))
    assert read_all(d) == pages
    assert d.facts.arch == "s390x"


@pytest.mark.parametrize("version", [1, 2, 3, 4, 5])
def test_older_header_versions(tmp_path: Path, version: int) -> None:
    pages = sample_pages(30)
    d = open_path(write(tmp_path, build_kdump(pages, header_version=version).data))
    assert read_all(d) == pages
    assert d.facts.extra["header_version"] == version


def test_split_dump_honours_pfn_range(tmp_path: Path) -> None:
    pages = sample_pages(100)
    kf = build_kdump(pages, split=(40, 80))
    d = open_path(write(tmp_path, kf.data))
    assert read_all(d) == {g: p for g, p in pages.items() if 40 <= g < 80}


def test_old_diskdump_single_bitmap(tmp_path: Path) -> None:
    pages = sample_pages(50)
    kf = build_kdump(pages, signature=b"DISKDUMP", header_version=0, bitmap_blocks=1, max_mapnr=50)
    d = open_path(write(tmp_path, kf.data))
    assert read_all(d) == pages


def test_vmcoreinfo_facts(tmp_path: Path) -> None:
    vmci = b"OSRELEASE=6.1.0-13-amd64\nPAGESIZE=4096\nSYMBOL(init_uts_ns)=ffffffff\n"
    d = open_path(write(tmp_path, build_kdump(sample_pages(10), vmcoreinfo=vmci).data))
    assert d.facts.extra["OSRELEASE"] == "6.1.0-13-amd64"
    assert d.facts.extra["PAGESIZE"] == "4096"


def test_qemu_device_memory_dropped_unless_asked(tmp_path: Path) -> None:
    ram = sample_pages(200)
    vram = {0xFD000 + i: bytes([i + 1]) * 4096 for i in range(16)}
    flash = {0xFFFC0 + i: bytes([0xAA]) * 4096 for i in range(4)}
    kf = build_kdump(ram | vram | flash, utsname={}, codec="zlib", shared_zero=True)
    path = write(tmp_path, flatten(kf))
    d = open_path(path)
    assert read_all(d) == ram
    assert d.facts.hypervisor == "qemu"
    assert d.facts.skipped == ["device memory 0xfd000000-0xfd010000", "device memory 0xfffc0000-0xfffc4000"]
    assert d.facts.memory_bytes == 200 * 4096
    kept = open_path(path, device_memory=True)
    assert read_all(kept) == ram | vram | flash
    assert kept.facts.skipped == []
    # A makedumpfile dump (utsname filled in) is not QEMU's: nothing dropped.
    assert read_all(open_path(write(tmp_path, build_kdump(ram | vram).data, "md"))) == ram | vram


# --- cross-checks: libkdumpfile and real pages ----------------------------------------------------


@needs_oracle
@pytest.mark.parametrize("codec", ["zlib", "lzo", "snappy", "zstd"])
def test_oracle_agrees_page_for_page(tmp_path: Path, codec: str) -> None:
    pages = sample_pages(300) | sample_pages(50, seed=3, base=5000)
    kf = build_kdump(pages, codec=codec, excluded={300, 301, 4999}, shared_zero=True)
    path = write(tmp_path, kf.data)
    fmt, oracle = oracle_pages(path)
    assert fmt == "diskdump"
    d = open_path(path)
    mine: dict[int, bytes] = {}
    for b in d.batches():
        mine.update(page_digests(b.gfns, b.pages))
    assert len(mine) == len(pages)
    assert mine == oracle


def elf_pages(path: Path) -> dict[int, bytes]:
    """Pages of a QEMU ELF dump from its PT_LOADs (a few lines, independent of dengine's reader)."""
    data = path.read_bytes()
    assert data[:4] == b"\x7fELF"
    is64 = data[4] == 2
    pages: dict[int, bytes] = {}
    if is64:
        phoff, phentsize, phnum = struct.unpack_from("<Q", data, 32)[0], *struct.unpack_from("<HH", data, 54)
    else:
        phoff, phentsize, phnum = struct.unpack_from("<I", data, 28)[0], *struct.unpack_from("<HH", data, 42)
    for i in range(phnum):
        at = phoff + i * phentsize
        if is64:
            p_type, _, p_offset, _, p_paddr, p_filesz, p_memsz = struct.unpack_from("<IIQQQQQ", data, at)
        else:
            p_type, p_offset, _, p_paddr, p_filesz, p_memsz = struct.unpack_from("<IIIIII", data, at)
        if p_type != 1:
            continue
        for k in range(p_memsz // 4096):
            page = (
                data[p_offset + k * 4096 : p_offset + (k + 1) * 4096] if (k + 1) * 4096 <= p_filesz else ZERO
            )
            pages[(p_paddr >> 12) + k] = page
    return pages


def fixture_exists(name: str) -> bool:
    return (FIXTURES / name).exists() or (FIXTURES / (name + ".zst")).exists()


@pytest.mark.parametrize("codec", ["lzo", "snappy", "zstd"])
def test_real_qemu_pages_in_builder_kdumps(
    tmp_path: Path, real_dump: Callable[[str], Path], codec: str
) -> None:
    pages = elf_pages(real_dump("alpha.elf"))
    kf = build_kdump(pages, codec=codec, utsname={}, shared_zero=True)
    d = open_path(write(tmp_path, flatten(kf)), device_memory=True)
    got = read_all(d, 16384)
    assert got == pages


@needs_oracle
def test_real_qemu_kdump_against_oracle(tmp_path: Path, real_dump: Callable[[str], Path]) -> None:
    flat_path = real_dump("alpha.kdump")
    flat = flat_path.read_bytes()
    assert flat[:12] == b"makedumpfile"
    plain = write(tmp_path, reassemble(flat), "alpha-reassembled.kdump")
    fmt, oracle = oracle_pages(plain)
    assert fmt == "diskdump"
    d = open_path(flat_path, device_memory=True)
    mine: dict[int, bytes] = {}
    for b in d.batches():
        mine.update(page_digests(b.gfns, b.pages))
    assert mine == oracle
    assert d.facts.extra["container"] == "flattened"
    assert d.facts.hypervisor == "qemu"
    assert d.facts.compression == "zlib"
    ram_only = open_path(flat_path)
    assert 0 < ram_only.page_count < d.page_count
    assert ram_only.facts.skipped == [
        "device memory 0xfd000000-0xfe000000",
        "device memory 0xfffc0000-0x100000000",
    ]


# --- bad input -----------------------------------------------------------------------------------


def patch(data: bytes, offset: int, new: bytes) -> bytes:
    return data[:offset] + new + data[offset + len(new) :]


def test_truncated_header(tmp_path: Path) -> None:
    data = build_kdump(sample_pages(5)).data[:300]
    e = fails(write(tmp_path, data))
    assert "expected disk_dump_header (464 bytes at offset 0x0 of the kdump file)" in str(e)
    assert "found the kdump file ending at 0x12c" in str(e)


def test_wrong_signature(tmp_path: Path) -> None:
    data = patch(build_kdump(sample_pages(5)).data, 0, b"KDUMPXXX")
    e = fails(write(tmp_path, data))
    assert str(e).endswith(
        """at offset 0x0: expected the kdump signature "KDUMP   " or "DISKDUMP", found b'KDUMPXXX'"""
    )


def test_block_size_not_4096_is_unsupported(tmp_path: Path) -> None:
    data = patch(build_kdump(sample_pages(5)).data, 428, struct.pack("<i", 8192))
    e = unsupported(write(tmp_path, data))
    assert str(e).endswith("at offset 0x1ac: unsupported kdump block size 8192")


def test_nonsense_header(tmp_path: Path) -> None:
    data = patch(build_kdump(sample_pages(5)).data, 400, bytes(64))
    e = fails(write(tmp_path, data))
    assert "expected a 64-bit disk_dump_header with a power-of-two block_size" in str(e)


#: Where disk_dump_header keeps sub_hdr_size, per layout.
SUB_HDR_SIZE_AT = {"64": 432, "32": 420}


@pytest.mark.parametrize("layout", list(SUB_HDR_SIZE_AT))
@pytest.mark.parametrize(
    "value,words",
    [
        (0, "expected a {bits}-bit disk_dump_header with a sub_hdr_size of at least 1 block "
            "(header_version 6 has a kdump_sub_header), found sub_hdr_size 0"),
        (-1, "expected a {bits}-bit disk_dump_header with a sub_hdr_size of 0 or more blocks, "
             "found sub_hdr_size -1"),
        (1 << 30, "expected the bitmaps inside the kdump file, at offset 0x40000001000 ((1 + "
                  "sub_hdr_size 1073741824) blocks of 4096 bytes), found the kdump file ending at {end:#x}"),
    ],
)  # fmt: skip
def test_bad_sub_hdr_size_is_named_at_its_offset(tmp_path: Path, layout: str, value: int, words: str) -> None:
    """A sub_hdr_size of 0 (with a header version that has a sub-header), negative, or putting
    the bitmaps past the end: the message names sub_hdr_size at its own offset (it named
    block_size and bitmap_blocks at block_size's offset, or only the bitmaps at the end of file)."""
    kf = build_kdump(sample_pages(20), layout=layout, machine="i686" if layout == "32" else "x86_64")
    at = SUB_HDR_SIZE_AT[layout]
    path = write(tmp_path, patch(kf.data, at, struct.pack("<i", value)))
    e = fails(path)
    bits = layout
    assert str(e) == f"{path}: at offset {at:#x}: " + words.format(bits=bits, end=len(kf.data))


def test_bitmap_beyond_eof(tmp_path: Path) -> None:
    data = patch(build_kdump(sample_pages(5)).data, 436, struct.pack("<I", 1 << 30))
    e = fails(write(tmp_path, data))
    assert "expected 1073741824 bitmap blocks at offset 0x2000 of the kdump file" in str(e)


def test_short_bitmap_for_max_mapnr(tmp_path: Path) -> None:
    kf = build_kdump(sample_pages(5))
    # max_mapnr_64 claims 2^40 pages: one bitmap block each cannot cover them; nothing that size
    # is allocated before the check.
    data = patch(kf.data, 4096 + 96, struct.pack("<Q", 1 << 40))
    e = fails(write(tmp_path, data))
    assert "expected two bitmaps of at least 1099511627776 bits each (max_mapnr)" in str(e)
    assert "found 2 bitmap blocks = 32768 bits each" in str(e)


#: Where the max_mapnr the reader uses lies: the sub-header's max_mapnr_64 (header version 6; the
#: sub-header is block 1) or, before version 6, the main header's 32-bit max_mapnr.
MAX_MAPNR_AT = {("64", 6): (4096 + 96, 8, "max_mapnr_64"), ("32", 6): (4096 + 72, 8, "max_mapnr_64"),
                ("64", 5): (440, 4, "max_mapnr"), ("32", 5): (428, 4, "max_mapnr")}  # fmt: skip


@pytest.mark.parametrize("layout,version", list(MAX_MAPNR_AT))
def test_max_mapnr_zero(tmp_path: Path, layout: str, version: int) -> None:
    # max_mapnr_64 = 0 used to read as a dump of 0 pages (exit 0).
    kf = build_kdump(
        sample_pages(50),
        layout=layout,
        header_version=version,
        machine="i686" if layout == "32" else "x86_64",
    )
    at, size, name = MAX_MAPNR_AT[(layout, version)]
    path = write(tmp_path, patch(kf.data, at, bytes(size)))
    e = fails(path)
    assert (
        str(e)
        == f"{path}: at offset {at:#x}: expected page frames in the dump ({name} > 0), found {name} = 0"
    )


@pytest.mark.parametrize("flat", [False, True], ids=["plain", "flattened"])
def test_max_mapnr_below_the_pages_the_bitmaps_mark(tmp_path: Path, flat: bool) -> None:
    # max_mapnr_64 = 100 while the bitmaps and descriptors hold 300 pages: it used to read as a
    # dump of the first 100 pages (exit 0).
    kf = build_kdump(sample_pages(300), codec="zlib")
    kf.data = patch(kf.data, 4096 + 96, struct.pack("<Q", 100))
    path = write(tmp_path, flatten(kf) if flat else kf.data)
    at = 4096 + 16 + 464 + 16 + 96 if flat else 4096 + 96  # flattened: the sub-header is record 2
    e = fails(path)
    assert str(e) == (
        f"{path}: at offset {at:#x}: expected max_mapnr_64 of at least 300 (the 1st bitmap marks pfn "
        "0x12b), found max_mapnr_64 = 100"
    )


def test_max_mapnr_below_an_excluded_page(tmp_path: Path) -> None:
    # The pages dumped all lie below max_mapnr, but the 1st bitmap says RAM exists above it.
    kf = build_kdump(sample_pages(300), excluded={4000})
    path = write(tmp_path, patch(kf.data, 4096 + 96, struct.pack("<Q", 300)))
    e = fails(path)
    assert str(e) == (
        f"{path}: at offset 0x1060: expected max_mapnr_64 of at least 4001 (the 1st bitmap marks pfn "
        "0xfa0), found max_mapnr_64 = 300"
    )


def test_max_mapnr_below_a_dumped_page_of_the_2nd_bitmap(tmp_path: Path) -> None:
    kf = build_kdump(sample_pages(300), max_mapnr=400)
    b2 = kf.regions["bitmap2"][0]
    data = patch(kf.data, b2 + 350 // 8, bytes([1 << (350 % 8)]))  # pfn 350 marked dumped only
    path = write(tmp_path, patch(data, 4096 + 96, struct.pack("<Q", 301)))
    e = fails(path)
    assert str(e) == (
        f"{path}: at offset 0x1060: expected max_mapnr_64 of at least 351 (the 2nd bitmap marks pfn "
        "0x15e), found max_mapnr_64 = 301"
    )


def test_max_mapnr_below_the_pages_of_an_old_diskdump(tmp_path: Path) -> None:
    kf = build_kdump(sample_pages(50), signature=b"DISKDUMP", header_version=0, bitmap_blocks=1, max_mapnr=50)
    path = write(tmp_path, patch(kf.data, 440, struct.pack("<I", 40)))
    e = fails(path)
    assert str(e) == (
        f"{path}: at offset 0x1b8: expected max_mapnr of at least 50 (the bitmap marks pfn 0x31), found "
        "max_mapnr = 40"
    )


def test_bitmaps_longer_than_max_mapnr_needs_still_read(tmp_path: Path) -> None:
    # The bitmaps cover max_mapnr bits rounded up to a block (32768 bits here, for 300 or 301
    # frames); bitmap blocks beyond what max_mapnr needs are read as before: the bits past
    # max_mapnr are clear.
    pages = sample_pages(300)
    assert read_all(open_path(write(tmp_path, build_kdump(pages, max_mapnr=301).data, "a"))) == pages
    kf = build_kdump(pages, max_mapnr=40000)  # two blocks per bitmap
    assert struct.unpack_from("<I", kf.data, 436)[0] == 4
    d = open_path(write(tmp_path, patch(kf.data, 4096 + 96, struct.pack("<Q", 300)), "b"))
    assert read_all(d) == pages and d.facts.memory_bytes == 300 * 4096


@pytest.mark.parametrize("max_mapnr", [0, 100])
def test_real_qemu_kdump_with_a_lying_max_mapnr(
    tmp_path: Path, real_dump: Callable[[str], Path], max_mapnr: int
) -> None:
    # The tester's files: QEMU's kdump (reassembled, plain) with max_mapnr_64 = 0 read as 0 pages
    # and with 100 as 100 pages, exit 0; through the command line now: exit 4, one line.
    import subprocess

    plain = reassemble(real_dump("alpha.kdump").read_bytes())
    assert struct.unpack_from("<Q", plain, 0x1060)[0] == 0x100000
    path = write(tmp_path, patch(plain, 0x1060, struct.pack("<Q", max_mapnr)))
    r = subprocess.run(
        [str(REPO / ".venv" / "bin" / "dengine"), "info", str(path)], capture_output=True, text=True
    )
    assert (r.returncode, r.stdout) == (4, "")
    expected = (
        "page frames in the dump (max_mapnr_64 > 0)"
        if max_mapnr == 0
        else "max_mapnr_64 of at least 1048576 (the 1st bitmap marks pfn 0xfffff)"
    )
    assert (
        r.stderr
        == f"dengine: {path}: at offset 0x1060: expected {expected}, found max_mapnr_64 = {max_mapnr}\n"
    )


def test_descriptor_table_beyond_eof(tmp_path: Path) -> None:
    kf = build_kdump(sample_pages(50))
    data = kf.data[: kf.regions["desc"][0] + 100]
    e = fails(write(tmp_path, data))
    assert "expected 50 page descriptors (1200 bytes) at offset 0x4000 of the kdump file" in str(e)


def test_descriptor_pointing_beyond_eof(tmp_path: Path) -> None:
    kf = build_kdump(sample_pages(10), desc_override={4: (1 << 30, 100, 1)})
    e = fails(write(tmp_path, kf.data))
    assert f"at offset {kf.desc_at[4]:#x}: expected a page descriptor pointing inside the kdump file" in str(
        e
    )
    assert "found data at offset 0x40000000, size 100 (pfn 0x4)" in str(e)


def test_uncompressed_descriptor_with_wrong_size(tmp_path: Path) -> None:
    kf = build_kdump(sample_pages(10), codec="none", desc_override={2: (8192, 100, 0)})
    e = fails(write(tmp_path, kf.data))
    assert f"at offset {kf.desc_at[2]:#x}: expected a page descriptor size of 4096" in str(e)


def test_unknown_page_flag(tmp_path: Path) -> None:
    kf = build_kdump(sample_pages(10), desc_override={6: (8192, 100, 0x40)})
    e = unsupported(write(tmp_path, kf.data))
    assert str(e).endswith(
        f"at offset {kf.desc_at[6]:#x}: unsupported page flags 0x40 in the page descriptor of pfn 0x6"
    )


def test_corrupt_zlib_data(tmp_path: Path) -> None:
    pages = sample_pages(10)
    kf = build_kdump(pages, codec="zlib")
    at = kf.data_at[1]
    data = patch(kf.data, at, b"\x00\x01\x02\x03")
    e = fails(write(tmp_path, data))
    assert f"at offset {at:#x}: expected zlib page data, found corrupt data (Error -3" in str(e)


def test_page_decompressing_to_wrong_length(tmp_path: Path) -> None:
    kf = build_kdump(sample_pages(10), codec="zlib")
    short = zlib.compress(bytes(100))
    kf2 = build_kdump(sample_pages(10), codec="zlib", desc_override={2: (kf.data_at[9], 0, 1)})
    at = kf2.data_at[9]
    data = patch(kf2.data, at, short)
    data = patch(data, kf2.desc_at[2], struct.pack("<qII", at, len(short), 1))
    e = fails(write(tmp_path, data))
    assert f"at offset {at:#x}: expected zlib page data decompressing to 4096 bytes, found 100 bytes" in str(
        e
    )


def test_lzo_page_decompressing_to_wrong_length(tmp_path: Path) -> None:
    # An LZO block of 100 bytes where a page is expected: the decoder must say so, not pad it.
    kf = build_kdump(sample_pages(10), codec="lzo")
    short = lzo.compress(bytes(range(100)))
    at = kf.data_at[9]
    data = patch(kf.data, at, short)
    data = patch(data, kf.desc_at[3], struct.pack("<qII", at, len(short), 0x2))
    e = fails(write(tmp_path, data))
    assert f"at offset {at:#x}: expected lzo page data decompressing to 4096 bytes, found 100 bytes" in str(e)


def test_corrupt_lzo_data(tmp_path: Path) -> None:
    kf = build_kdump(sample_pages(10), codec="lzo")
    at = kf.data_at[1]
    e = fails(write(tmp_path, patch(kf.data, at, b"\xff\xff\xff\xff\xff\xff")))
    assert f"at offset {at:#x}: expected lzo page data, found corrupt data (" in str(e)


def lzo_test_page(pattern: bytes, seed: int, density: float) -> bytes:
    """A page mixing a repeated pattern (long matches, overlapping copies) with random bytes at
    ``density`` (literal runs): the shapes LZO1X encodes differently."""
    rng = np.random.default_rng(seed)
    base = np.frombuffer((pattern * (4096 // max(1, len(pattern)) + 1))[:4096], dtype=np.uint8)
    if not pattern:
        base = np.zeros(4096, dtype=np.uint8)
    noise = rng.integers(0, 256, 4096, dtype=np.uint8)
    return np.where(rng.random(4096) < density, noise, base).astype(np.uint8).tobytes()


@settings(max_examples=60, deadline=None)
@given(
    pages=st.lists(
        st.builds(lzo_test_page, st.binary(max_size=200), st.integers(0, 2**32 - 1), st.floats(0, 1)),
        min_size=1,
        max_size=8,
    ),
    level=st.sampled_from([1, 9]),
)
def test_lzo_pages_from_liblzo2_read_back(pages: list[bytes], level: int) -> None:
    # Pages compressed by liblzo2 itself (lzo1x_1 as makedumpfile and QEMU use it, lzo1x_999 as
    # lzop -9 does), decoded by dengine's LZO codec: the same bytes come back.
    decode = kdump._lzo_decoder()
    for page in pages:
        assert decode(memoryview(lzo.compress(page, level))) == page


def test_flattened_negative_size(tmp_path: Path) -> None:
    data = flat_header() + struct.pack(">qq", 0, -5) + end_marker()
    e = fails(write(tmp_path, data))
    assert str(e).endswith(
        "at offset 0x1000: expected a flattened record: offset >= 0 and 0 < size <= the bytes left "
        "in the file, found offset 0, size -5"
    )


def test_flattened_negative_offset(tmp_path: Path) -> None:
    data = flat_header() + struct.pack(">qq", -7, 16) + bytes(16) + end_marker()
    e = fails(write(tmp_path, data))
    assert "found offset -7, size 16" in str(e)


def test_flattened_huge_size_beyond_eof(tmp_path: Path) -> None:
    kf = build_kdump(sample_pages(5))
    data = flat_header() + struct.pack(">qq", 0, 1 << 50) + kf.data + end_marker()
    e = fails(write(tmp_path, data))
    assert f"found offset 0, size {1 << 50} (beyond the end of file at {len(data):#x})" in str(e)


def test_flattened_missing_terminator(tmp_path: Path) -> None:
    # Decision: a flattened stream without its end marker is truncated, and is refused.
    kf = build_kdump(sample_pages(20))
    data = flatten(kf, terminate=False)
    e = fails(write(tmp_path, data))
    assert str(e).endswith(
        f"at offset {len(data):#x}: expected a flattened record header or the end marker (offset -1), "
        f"found end of file at {len(data):#x} (the stream is truncated)"
    )


def test_flattened_truncated_mid_record(tmp_path: Path) -> None:
    data = flatten(build_kdump(sample_pages(20)))[:-3000]
    e = fails(write(tmp_path, data))
    assert "expected a flattened record: offset >= 0 and 0 < size <= the bytes left in the file" in str(e)


def test_flattened_unknown_type(tmp_path: Path) -> None:
    data = patch(flatten(build_kdump(sample_pages(5))), 16, struct.pack(">qq", 2, 1))
    e = unsupported(write(tmp_path, data))
    assert str(e).endswith("at offset 0x10: unsupported makedumpfile flattened type 2 version 1")


def test_flattened_header_truncated(tmp_path: Path) -> None:
    e = fails(write(tmp_path, flat_header()[:100]))
    assert "expected a 4096-byte makedumpfile flattened header, found end of file at 0x64" in str(e)


def test_flattened_missing_data_region(tmp_path: Path) -> None:
    # The page data records never arrived: descriptors point past the reassembled file.
    kf = build_kdump(sample_pages(20), codec="zlib")
    dd, dl = kf.regions["desc"]
    data = flat_header() + record(0, kf.data[: dd + dl]) + end_marker()
    e = fails(write(tmp_path, data))
    assert "expected a page descriptor pointing inside the kdump file" in str(e)


def test_flattened_elf_goes_to_the_elf_reader(tmp_path: Path) -> None:
    # A flattened stream holding an ELF file is read by the ELF reader (tests/test_flattened_elf.py);
    # a broken one is its error, at the offset of the flattened file where the bytes are.
    data = flat_header() + record(0, b"\x7fELF" + bytes(600)) + end_marker()
    e = fails(write(tmp_path, data))
    assert str(e).endswith(
        "at offset 0x1010: expected an ELF core file (\\x7fELF, ET_CORE), found 7f 45 4c 46 00 00 00 00 "
        "00 00 00 00 00 00 00 00 00 00 00 00"
    )


def test_open_dump_detects_plain_and_flattened(tmp_path: Path) -> None:
    from dengine_cli.formats import open_dump

    kf = build_kdump(sample_pages(20), codec="snappy")
    for name, data in (("a.kdump", kf.data), ("b.flat", flatten(kf))):
        d = open_dump(write(tmp_path, data, name))
        assert d.facts.format == "kdump"
        assert read_all(d) == sample_pages(20)


def test_source_start_offsets_are_absolute(tmp_path: Path) -> None:
    kf = build_kdump(sample_pages(20), codec="zlib")
    path = write(tmp_path, bytes(512) + kf.data)
    d = kdump.open_kdump(Source.of(path).at(512), OpenOptions())
    assert read_all(d) == sample_pages(20)
    bad = patch(bytes(512) + kf.data, 512 + kf.data_at[1], b"\0\1\2\3")
    with pytest.raises(FormatError) as e:
        read_all(kdump.open_kdump(Source.of(write(tmp_path, bad, "bad")).at(512), OpenOptions()))
    assert f"at offset {512 + kf.data_at[1]:#x}:" in str(e.value)


@pytest.mark.parametrize("flat", [False, True])
@pytest.mark.parametrize("codec", CODECS)
def test_scan_reads_with_pread_what_batches_read(tmp_path: Path, codec: str, flat: bool) -> None:
    # scan() reads each batch's data with pread (no mapping touched): the same pages.
    kf = build_kdump(sample_pages(300) | sample_pages(40, seed=2, base=4000), codec=codec, shared_zero=True)
    d = open_path(write(tmp_path, flatten(kf) if flat else kf.data))
    scanned = {g: p.tobytes() for b in d.scan(37) for g, p in zip(b.gfns.tolist(), b.pages, strict=True)}
    assert scanned == read_all(d, 53)


def test_scan_of_the_real_qemu_kdump_matches_batches(real_dump: Callable[[str], Path]) -> None:
    d = open_path(real_dump("alpha.kdump"))
    scanned: dict[int, bytes] = {}
    for b in d.scan(1000):
        scanned.update(page_digests(b.gfns, b.pages))
    batched: dict[int, bytes] = {}
    for b in d.batches(777):
        batched.update(page_digests(b.gfns, b.pages))
    assert scanned == batched and len(scanned) == d.page_count


def test_scan_names_the_same_offset_for_corrupt_data(tmp_path: Path) -> None:
    kf = build_kdump(sample_pages(10), codec="zlib")
    at = kf.data_at[6]
    path = write(tmp_path, patch(kf.data, at, b"\x00\x01\x02\x03"))
    with pytest.raises(FormatError) as by_scan:
        for _ in open_path(path).scan(4):
            pass
    assert f"at offset {at:#x}: expected zlib page data, found corrupt data (Error -3" in str(by_scan.value)
