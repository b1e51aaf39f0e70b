"""Compressed dumps: detection by magic and sparse, bounded-memory decompression, with files made by
the real gzip, bzip2, xz, lzop and zstd tools."""

from __future__ import annotations

import os
import random
import subprocess
from pathlib import Path

import numpy as np
import pytest

from dengine_cli.errors import EXIT_BAD_DUMP, FormatError
from dengine_cli.formats import container, open_dump
from dengine_cli.formats.base import OpenOptions, Source
from tests.builders.libvirt_save import TOOLS, compress
from tests.builders.qemu_stream import build_stream

KINDS = ["gzip", "bzip2", "xz", "lzop", "zstd"]
PAGE = 4096


def raw_image() -> bytes:
    """8 MiB: mostly zero pages, a random page every 64 KiB, and a ragged non-zero tail."""
    r = random.Random(7)
    img = bytearray(8 << 20)
    for off in range(0, len(img), 16 * PAGE):
        img[off : off + PAGE] = r.randbytes(PAGE)
    return bytes(img) + b"tail"


def small_stream() -> bytes:
    r = random.Random(8)
    pages = {("pc.ram", n): (r.randbytes(PAGE) if n % 5 == 0 else bytes(PAGE)) for n in range(512)}
    return build_stream(pages, {"pc.ram": 2 << 20, "vga.vram": 1 << 20})


@pytest.fixture(scope="module")
def originals() -> dict[str, bytes]:
    return {"raw": raw_image(), "stream": small_stream()}


def write(tmp_path: Path, name: str, data: bytes) -> Path:
    p = tmp_path / name
    p.write_bytes(data)
    return p


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("what", ["raw", "stream"])
def test_real_tool_output_decompresses_exactly_and_sparse(
    tmp_path: Path, originals: dict[str, bytes], kind: str, what: str
) -> None:
    data = originals[what]
    packed = write(tmp_path, f"{what}.{kind}", compress(kind, data))
    assert container.detect(packed.read_bytes()[:64]) == kind
    out_dir = tmp_path / "tmp"
    out_dir.mkdir()
    inner = container.decompress(Source.of(packed), kind, OpenOptions(tmp_dir=out_dir))
    try:
        assert inner.name == f"{packed} (decompressed {kind})"
        assert inner.path.parent == out_dir
        assert inner.path.read_bytes() == data
        if what == "raw":
            # 1 page in 16 is data: the zero pages must not take disk blocks.
            assert os.stat(inner.path).st_blocks * 512 < len(data) // 4
    finally:
        os.unlink(inner.path)


def test_detect_plain_files_is_none(originals: dict[str, bytes]) -> None:
    assert container.detect(originals["stream"][:64]) is None
    assert container.detect(b"ELF\x7f") is None
    assert container.detect(b"") is None
    assert container.detect(b"BZx") is None


@pytest.mark.parametrize("kind", KINDS)
def test_truncated_file_names_offset_and_leaves_no_temp(
    tmp_path: Path, originals: dict[str, bytes], kind: str
) -> None:
    packed = compress(kind, originals["raw"])
    cut = write(tmp_path, f"cut.{kind}", packed[: len(packed) // 2])
    out_dir = tmp_path / "tmp"
    out_dir.mkdir()
    with pytest.raises(FormatError) as e:
        container.decompress(Source.of(cut), kind, OpenOptions(tmp_dir=out_dir))
    assert e.value.exit_code == EXIT_BAD_DUMP
    assert f"expected more {kind} compressed data, found end of file (truncated)" in str(e.value)
    assert str(e.value).startswith(f"{cut}: at offset 0x")
    assert e.value.offset <= len(packed) // 2
    assert list(out_dir.iterdir()) == []


@pytest.mark.parametrize("kind", KINDS)
def test_corrupt_file_reports_codec_message(tmp_path: Path, originals: dict[str, bytes], kind: str) -> None:
    packed = bytearray(compress(kind, originals["raw"]))
    at = len(packed) // 3
    for i in range(at, at + 64):
        packed[i] ^= 0x55
    bad = write(tmp_path, f"bad.{kind}", bytes(packed))
    out_dir = tmp_path / "tmp"
    out_dir.mkdir()
    with pytest.raises(FormatError) as e:
        container.decompress(Source.of(bad), kind, OpenOptions(tmp_dir=out_dir))
    assert f"expected {kind} compressed data, found {kind} error: " in str(e.value)
    # The reported offset is where the codec noticed: at the damage, or later when only a checksum
    # (gzip's trailer CRC) can tell; never before the damaged input chunk.
    assert at - container.INPUT_CHUNK - (1 << 18) <= e.value.offset < len(packed)
    assert list(out_dir.iterdir()) == []


def test_concatenated_members_and_frames(tmp_path: Path) -> None:
    a, b = b"A" * 10000, bytes(PAGE * 3) + b"B" * 5000
    for kind in KINDS:
        p = write(tmp_path, f"two.{kind}", compress(kind, a) + compress(kind, b))
        inner = container.decompress(Source.of(p), kind, OpenOptions(tmp_dir=tmp_path))
        try:
            assert inner.path.read_bytes() == a + b, kind
        finally:
            os.unlink(inner.path)


def test_start_offset_is_respected(tmp_path: Path, originals: dict[str, bytes]) -> None:
    p = write(tmp_path, "prefixed", b"x" * 92 + compress("zstd", originals["stream"]))
    inner = container.decompress(Source.of(p).at(92), "zstd", OpenOptions(tmp_dir=tmp_path))
    try:
        assert inner.path.read_bytes() == originals["stream"]
    finally:
        os.unlink(inner.path)


def test_lzop_header_checksum_is_checked(tmp_path: Path, originals: dict[str, bytes]) -> None:
    packed = bytearray(compress("lzop", originals["stream"]))
    packed[30] ^= 0x01  # inside the header (mode/mtime), covered by its checksum
    p = write(tmp_path, "h.lzo", bytes(packed))
    with pytest.raises(FormatError, match="lzop error: header checksum mismatch"):
        container.decompress(Source.of(p), "lzop", OpenOptions(tmp_dir=tmp_path))


def test_empty_input_after_start(tmp_path: Path) -> None:
    p = write(tmp_path, "e.gz", b"")
    with pytest.raises(FormatError) as e:
        container.decompress(Source.of(p), "gzip", OpenOptions(tmp_dir=tmp_path))
    assert str(e.value) == f"{p}: at offset 0x0: expected gzip compressed data, found end of file"


@pytest.mark.parametrize("kind", KINDS)
def test_open_dump_reads_compressed_stream_and_unlinks_temp(
    tmp_path: Path, originals: dict[str, bytes], kind: str
) -> None:
    plain = write(tmp_path, "plain.qevm", originals["stream"])
    packed = write(tmp_path, f"s.qevm.{kind}", compress(kind, originals["stream"]))
    out_dir = tmp_path / "tmp"
    out_dir.mkdir()
    with open_dump(plain) as ref, open_dump(packed, OpenOptions(tmp_dir=out_dir)) as d:
        assert list(out_dir.iterdir()) == []  # unlinked once mapped
        assert d.name == str(packed)
        assert d.source.name == f"{packed} (decompressed {kind})"
        assert d.facts.extra["file_compression"] == kind
        assert d.facts.format == "qemu-stream"
        assert np.array_equal(d.gfns, ref.gfns)
        for a, b in zip(d.batches(), ref.batches(), strict=True):
            assert np.array_equal(a.pages, b.pages)


def test_tools_table_matches_libvirt() -> None:
    # libvirt runs "xz -c -3" and the others with -c (FORMATS.md §3.1); the builder must too.
    assert TOOLS["xz"][:3] == ["xz", "-c", "-3"]
    assert subprocess.run(["lzop", "--version"], capture_output=True).returncode == 0


#: The name endings of each container, as a user names such files, and the magic it starts with.
ENDINGS = [
    ("zstd", ".zst", "28 b5 2f fd"),
    ("zstd", ".zstd", "28 b5 2f fd"),
    ("gzip", ".gz", "1f 8b"),
    ("xz", ".xz", "fd 37 7a 58 5a 00"),
    ("bzip2", ".bz2", "42 5a 68 31-39"),
    ("lzop", ".lzo", "89 4c 5a 4f 00 0d 0a 1a 0a"),
    ("lzop", ".LZOP", "89 4c 5a 4f 00 0d 0a 1a 0a"),
]


def dengine(*args: str) -> subprocess.CompletedProcess[str]:
    import sys

    return subprocess.run(
        [sys.executable, "-m", "dengine_cli", *args], capture_output=True, text=True, env={**os.environ}
    )


@pytest.mark.parametrize(("kind", "ending", "magic"), ENDINGS)
def test_a_name_promising_a_container_its_content_is_not_names_the_container(
    tmp_path: Path, originals: dict[str, bytes], kind: str, ending: str, magic: str
) -> None:
    """`guest.raw.zst` that is a plain raw image (never compressed, or renamed by mistake):
    the error names the container the name promised and what the file starts with instead
    (exit 4, a wrong magic), not "expected the magic of a known dump format"."""
    plain = write(tmp_path, f"guest.raw{ending}", originals["raw"])
    r = dengine("info", str(plain))
    assert r.returncode == EXIT_BAD_DUMP, r.stderr
    first = originals["raw"][: max(4, len(magic.split()))].hex(" ")
    assert r.stderr == (
        f"dengine: {plain}: at offset 0x0: expected {kind} compressed data (the name ends in "
        f"{ending}; magic {magic}), found {first}\n"
    )


def test_an_empty_file_named_as_a_container_names_the_container(tmp_path: Path) -> None:
    empty = write(tmp_path, "guest.raw.gz", b"")
    r = dengine("info", str(empty))
    assert r.returncode == EXIT_BAD_DUMP
    assert r.stderr == (
        f"dengine: {empty}: at offset 0x0: expected gzip compressed data (the name ends in .gz; "
        "magic 1f 8b), found an empty file\n"
    )


def test_the_content_decides_when_a_reader_or_another_container_claims_it(
    tmp_path: Path, originals: dict[str, bytes]
) -> None:
    """Formats are found by magic: a QEMU stream named `.zst` is read as the stream it is, and a
    raw image in zstd named `guest.raw.gz` as a raw image (the name's container ending is taken
    off whichever container it really is)."""
    stream = write(tmp_path, "vm.qevm.zst", originals["stream"])
    with open_dump(stream) as d:
        assert d.facts.format == "qemu-stream" and "file_compression" not in d.facts.extra
    misnamed = write(tmp_path, "guest.raw.gz", compress("zstd", originals["raw"][: 64 * PAGE]))
    with open_dump(misnamed, OpenOptions(tmp_dir=tmp_path)) as d:
        assert d.facts.format == "raw" and d.facts.extra["file_compression"] == "zstd"
        assert d.page_count == 64  # every page of the 64 compressed is present (zero or not)


def test_a_raw_image_that_merely_starts_with_the_gzip_magic_is_read_raw(tmp_path: Path) -> None:
    # Found by the plan's property test: a random first page began 1f 8b b3, and the image was
    # refused as corrupt gzip ("unknown compression method") instead of being read raw.
    from dengine_cli.formats import open_dump
    from dengine_cli.formats.base import OpenOptions

    assert container.detect(b"\x1f\x8b\xb3\x00") is None
    assert container.detect(b"\x1f\x8b\x08\x20") is None  # a reserved flag bit set
    assert container.detect(b"\x1f\x8b\x08\x00") == "gzip"
    page = bytes([0x1F, 0x8B, 0xB3]) + bytes(range(256)) * 15 + bytes(4096 - 3 - 256 * 15)
    image = tmp_path / "vm.raw"
    image.write_bytes(page + bytes(4096))
    with open_dump(image, OpenOptions(format="raw")) as dump:
        assert dump.page_count == 2
        assert bytes(dump.pages_at(np.array([0], dtype=np.uint64))[0]) == page
