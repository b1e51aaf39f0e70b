"""libvirt save images: header, domain XML, every compression format made with the real tools,
foreign-endian headers, mapped-ram ("sparse") images, and lying headers."""

from __future__ import annotations

import random
import struct
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from dengine_cli.errors import EXIT_BAD_DUMP, EXIT_UNSUPPORTED, FormatError, UnsupportedFeature
from dengine_cli.formats import libvirt_save, open_dump
from dengine_cli.formats.base import Dump, OpenOptions
from dengine_cli.formats.domain_xml import NumaCell, parse_domain_xml
from tests.builders.libvirt_save import HEADER_SIZE, build_save, compress, data_area, domain_xml, header
from tests.builders.qemu_stream import PAGE, build_mapped_ram, build_stream

KINDS = ["raw", "gzip", "bzip2", "xz", "lzop", "zstd"]
UUID = "6c0ffee0-0000-4000-8000-00000000a1fa"


def pages() -> dict[tuple[str, int], bytes]:
    r = random.Random(11)
    return {("pc.ram", n): (r.randbytes(PAGE) if n % 4 == 0 else bytes(PAGE)) for n in range(600)}


@pytest.fixture(scope="module")
def stream() -> bytes:
    return build_stream(pages(), {"pc.ram": 4 << 20, "vga.vram": 1 << 20}, uuid=UUID)


def write(tmp_path: Path, data: bytes, name: str = "guest.save") -> Path:
    p = tmp_path / name
    p.write_bytes(data)
    return p


def content(d: Dump) -> tuple[list[int], list[bytes]]:
    gfns: list[int] = []
    out: list[bytes] = []
    for b in d.batches():
        gfns += b.gfns.tolist()
        out += [p.tobytes() for p in b.pages]
    return gfns, out


def test_probe() -> None:
    assert libvirt_save.probe(b"LibvirtQemudSave" + bytes(76), 92)
    assert libvirt_save.probe(b"LibvirtQemudPart" + bytes(76), 92)
    assert not libvirt_save.probe(b"QEVM\0\0\0\3", 92)


@pytest.mark.parametrize("kind", KINDS)
def test_every_format_reads_like_the_bare_stream(tmp_path: Path, stream: bytes, kind: str) -> None:
    bare = write(tmp_path, stream, "bare.qevm")
    saved = write(tmp_path, build_save(stream, kind=kind))
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    with open_dump(bare) as ref, open_dump(saved, OpenOptions(tmp_dir=tmp)) as d:
        assert list(tmp.iterdir()) == []  # decompressed tail unlinked once mapped
        assert content(d) == content(ref)
        f = d.facts
        assert f.format == "libvirt-save"
        assert f.compression == (None if kind == "raw" else kind)
        assert (f.guest_name, f.uuid, f.memory_bytes, f.vcpus) == ("alpha", UUID, 256 << 20, 1)
        assert (f.machine, f.hypervisor) == ("pc-i440fx-7.2", "qemu/kvm")
        assert f.extra["was_running"] is True
        assert f.extra["save_format"] == kind
        assert f.extra["ram_blocks"] == {"pc.ram": 4 << 20, "vga.vram": 1 << 20}


def test_foreign_endian_header_and_version_1(tmp_path: Path, stream: bytes) -> None:
    ref = content(open_dump(write(tmp_path, stream, "bare.qevm")))
    d = open_dump(write(tmp_path, build_save(stream, big_endian=True), "be.save"))
    assert content(d) == ref
    assert d.facts.extra["header_byte_order"] == "big-endian"
    d1 = open_dump(write(tmp_path, build_save(stream, version=1, cookie=None), "v1.save"))
    assert content(d1) == ref
    assert d1.facts.extra["save_version"] == 1


def test_sparse_mapped_ram_image(tmp_path: Path) -> None:
    base = HEADER_SIZE + data_area()
    ps = pages()
    image = build_save(build_mapped_ram(ps, {"pc.ram": 4 << 20}, base=base), kind="sparse")
    d = open_dump(write(tmp_path, image))
    gfns, got = content(d)
    # mapped-ram has every page of the block: a clear bitmap bit is a zero page.
    expected = {n: ps.get(("pc.ram", n), bytes(PAGE)) for n in range(1024) if not 0xA0 <= n < 0xC0}
    assert dict(zip(gfns, got, strict=True)) == expected
    assert d.facts.extra["save_format"] == "sparse"


def test_domain_xml_units_and_numa() -> None:
    xml = domain_xml(memory_kib=2, unit="GiB", numa=[(1, 1024), (0, 2048)], domain_type="qemu")
    info = parse_domain_xml(xml)
    assert info.memory_bytes == 2 << 30
    assert info.numa_cells == (NumaCell(0, 2 << 20), NumaCell(1, 1 << 20))
    assert info.domain_type == "qemu"
    assert parse_domain_xml(domain_xml(memory_kib=3, unit="GB")).memory_bytes == 3 * 10**9
    assert parse_domain_xml(domain_xml(memory_kib=1024)).memory_bytes == 1 << 20  # default KiB
    with pytest.raises(ValueError, match="unknown memory unit 'parsecs'"):
        parse_domain_xml(domain_xml(unit="parsecs"))


# -- bad input -------------------------------------------------------------------------------


def bad(tmp_path: Path, data: bytes, **options: Any) -> FormatError | UnsupportedFeature:
    p = write(tmp_path, data, "bad.save")
    with pytest.raises((FormatError, UnsupportedFeature)) as e:
        open_dump(p, OpenOptions(**options))
    assert isinstance(e.value, FormatError | UnsupportedFeature)
    return e.value


def test_partial_image(tmp_path: Path, stream: bytes) -> None:
    e = bad(tmp_path, build_save(stream, magic=b"LibvirtQemudPart"))
    assert e.exit_code == EXIT_BAD_DUMP
    assert str(e).endswith(
        "at offset 0x0: expected 'LibvirtQemudSave', found 'LibvirtQemudPart': the save did not complete "
        "(an incomplete image)"
    )


def test_wrong_magic_when_forced(tmp_path: Path, stream: bytes) -> None:
    e = bad(tmp_path, b"LibvirtQemudSavX" + build_save(stream)[16:], format="libvirt-save")
    assert "at offset 0x0: expected 'LibvirtQemudSave', found 4c 69" in str(e)


def test_unknown_version(tmp_path: Path, stream: bytes) -> None:
    e = bad(tmp_path, build_save(stream, version=3 << 24 | 7))  # neither order gives 1 or 2
    assert "at offset 0x10: expected save image version 1 or 2, found " in str(e)


def test_data_len_beyond_eof(tmp_path: Path) -> None:
    e = bad(tmp_path, header(5000) + b"<domain/>\0")
    assert str(e).endswith(
        "at offset 0x5c: expected the domain XML and cookie (data_len) (5000 bytes),"
        " found end of file at 0x66"
    )


def test_huge_data_len(tmp_path: Path) -> None:
    e = bad(tmp_path, header(0xFFFFFFF0) + b"<domain/>\0")
    assert str(e).endswith(
        "at offset 0x14: expected an XML data length of at most 67108864 bytes, found 4294967280 bytes"
    )


def test_unsupported_format_number(tmp_path: Path, stream: bytes) -> None:
    image = bytearray(build_save(stream))
    struct.pack_into("<I", image, 28, 9)
    e = bad(tmp_path, bytes(image))
    assert e.exit_code == EXIT_UNSUPPORTED
    assert str(e).endswith("at offset 0x1c: unsupported save image format 9")


@pytest.mark.parametrize("kind", ["gzip", "xz", "zstd", "lzop", "bzip2"])
def test_corrupt_compressed_tail(tmp_path: Path, stream: bytes, kind: str) -> None:
    tail = bytearray(compress(kind, stream))
    at = len(tail) // 2
    for i in range(at, at + 32):
        tail[i] ^= 0xA5
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    e = bad(tmp_path, build_save(stream, kind=kind, tail=bytes(tail)), tmp_dir=tmp)
    assert e.exit_code == EXIT_BAD_DUMP
    assert f"expected {kind} compressed data, found {kind} error: " in str(e)
    assert list(tmp.iterdir()) == []


def test_truncated_compressed_tail(tmp_path: Path, stream: bytes) -> None:
    image = build_save(stream, kind="zstd")
    e = bad(tmp_path, image[: len(image) - 100])
    assert "expected more zstd compressed data, found end of file (truncated)" in str(e)


def test_tail_not_matching_header_format(tmp_path: Path, stream: bytes) -> None:
    image = build_save(stream, kind="gzip", tail=compress("zstd", stream))
    stream_start = HEADER_SIZE + data_area()
    e = bad(tmp_path, image)
    assert str(e).endswith(
        f"at offset {stream_start:#x}: expected gzip data as save format 1 says, found zstd"
    )
    e = bad(tmp_path, build_save(stream, kind="raw", tail=compress("xz", stream)))
    assert f'at offset {stream_start:#x}: expected a QEMU stream ("QEVM") as save format raw says' in str(e)


def test_truncated_raw_stream(tmp_path: Path, stream: bytes) -> None:
    image = build_save(stream)
    e = bad(tmp_path, image[: len(image) // 2])
    assert "expected more stream data before the RAM section's EOS" in str(e)


def test_xml_with_entities_is_refused(tmp_path: Path, stream: bytes) -> None:
    xml = '<!DOCTYPE d [<!ENTITY x "xxxxxxxx">]><domain><name>&x;</name></domain>'
    e = bad(tmp_path, build_save(stream, xml=xml))
    assert str(e).endswith(
        "at offset 0x5c: expected a libvirt domain XML,"
        " found a DOCTYPE or ENTITY declaration (refused: entity expansion)"
    )


def test_malformed_xml(tmp_path: Path, stream: bytes) -> None:
    e = bad(tmp_path, build_save(stream, xml="<domain><name>x</domain>"))
    assert "expected a libvirt domain XML, found malformed XML (mismatched tag" in str(e)


# -- around the real QEMU 7.2 streams --------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_real_stream_in_save_images(real_dump: Any, tmp_path: Path, kind: str) -> None:
    bare = real_dump("beta.qevm")
    real = bare.read_bytes()
    xml = domain_xml(name="beta", machine="pc-q35-7.2", memory_kib=0)
    saved = write(tmp_path, build_save(real, xml=xml, kind=kind, big_endian=kind == "xz"))
    with open_dump(bare) as ref, open_dump(saved, OpenOptions(tmp_dir=tmp_path)) as d:
        assert np.array_equal(d.gfns, ref.gfns)
        for a, b in zip(d.batches(), ref.batches(), strict=True):
            assert np.array_equal(a.pages, b.pages)
        assert d.facts.guest_name == "beta"
