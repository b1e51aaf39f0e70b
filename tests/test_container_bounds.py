"""What a compressed container may cost: its content is probed on its first bytes before anything
is written, it may not decompress past a limit or past the free space of the temporary folder,
names say what is inside (guest.raw.zst), and a container that shrinks while read is an error.

The 2 GiB zstd file is built here from RFC 8878 (one frame of RLE blocks: 4 bytes per 128 KiB,
as ``zstd`` itself writes runs), checked against the zstandard library on a smaller copy."""

from __future__ import annotations

import contextlib
import os
import resource
import subprocess
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import zstandard

from dengine_cli.errors import (
    EXIT_BAD_DUMP,
    EXIT_OUTPUT,
    EXIT_UNREADABLE,
    FormatError,
    OutputError,
    UnreadableFile,
)
from dengine_cli.formats import container, open_dump
from dengine_cli.formats.base import OpenOptions, Source
from tests.builders.libvirt_save import build_save, compress, data_area
from tests.conftest import REPO, tmpfs

PAGE = 4096
BLOCK = 128 << 10  # zstd's largest block (Block_Maximum_Size)
DENGINE = str(REPO / ".venv" / "bin" / "dengine")


def zstd_rle(byte: int, size: int, *, content_size: bool = True) -> bytes:
    """One zstd frame whose content is ``size`` copies of ``byte``, as RLE blocks of 128 KiB
    (RFC 8878 §3.1.1; block header = Last_Block | Block_Type << 1 | Block_Size << 3, an RLE block
    carries one byte), with an 8-byte Frame_Content_Size when ``content_size`` (as zstd writes
    for a file, not for a pipe)."""
    # Frame_Header_Descriptor: FCS_Field_Size 8 bytes (0xC0) or none; then a Window_Descriptor of
    # 0x58 (2 MiB, what zstd -3 uses); then the content size.
    fcs = size.to_bytes(8, "little") if content_size else b""
    out = bytearray(b"\x28\xb5\x2f\xfd" + bytes([0xC0 if content_size else 0x00, 0x58]) + fcs)
    left = size
    while left:
        n = min(BLOCK, left)
        left -= n
        word = (1 if left == 0 else 0) | 1 << 1 | n << 3
        out += word.to_bytes(3, "little") + bytes([byte])
    return bytes(out)


@pytest.mark.parametrize("content_size", [True, False])
def test_rle_builder_is_zstd(content_size: bool) -> None:
    frame = zstd_rle(1, 3 * BLOCK + 17, content_size=content_size)
    assert zstandard.ZstdDecompressor().decompressobj().decompress(frame) == b"\x01" * (3 * BLOCK + 17)
    if content_size:
        assert zstandard.frame_content_size(frame) == 3 * BLOCK + 17


@contextlib.contextmanager
def file_size_limit(nbytes: int) -> Iterator[None]:
    """No file this process (or its children) writes may grow past ``nbytes`` (SIGXFSZ kills)."""
    old = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, old[1]))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, old)


@pytest.mark.parametrize("content_size", [True, False])
def test_2gib_of_ones_in_66kb_fails_on_its_first_bytes(tmp_path: Path, content_size: bool) -> None:
    bomb = tmp_path / "bomb.zst"
    bomb.write_bytes(zstd_rle(1, 2 << 30, content_size=content_size))
    assert bomb.stat().st_size < 70_000
    spill = tmp_path / "spill"
    spill.mkdir()
    # In a child with a 1 MiB limit on any file it writes: decompressing the 2 GiB would kill it.
    r = subprocess.run(
        [DENGINE, "info", "--tmp-dir", str(spill), str(bomb)],
        capture_output=True,
        text=True,
        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20)),
    )
    assert r.returncode == EXIT_BAD_DUMP, r.stderr
    assert r.stderr == (
        f"dengine: {bomb} (decompressed zstd): at offset 0x0: expected the magic of a known dump "
        f"format (see `dengine formats`), found {' '.join(['01'] * 16)}\n"
    )
    assert list(spill.iterdir()) == []


def test_2gib_raw_over_the_limit_is_refused_by_its_header(tmp_path: Path) -> None:
    bomb = tmp_path / "guest.raw.zst"
    bomb.write_bytes(zstd_rle(1, 2 << 30))
    spill = tmp_path / "spill"
    spill.mkdir()
    with pytest.raises(OutputError) as e, file_size_limit(1 << 20):
        open_dump(bomb, OpenOptions(tmp_dir=spill, max_decompressed=1 << 30))
    assert e.value.exit_code == EXIT_OUTPUT
    assert str(e.value) == (
        f"{bomb}: cannot write: its zstd header says it holds {2 << 30} bytes, more than the limit of "
        f"{1 << 30} bytes for decompressed content (--max-decompressed, $DENGINE_MAX_DECOMPRESSED)"
    )
    assert list(spill.iterdir()) == []


def test_limit_without_a_claimed_size_stops_while_decompressing(tmp_path: Path) -> None:
    # gzip claims nothing up front: the limit stops it while it decompresses; nothing is left.
    rng = np.random.default_rng(3)
    image = rng.integers(0, 256, 4 << 20, dtype=np.uint8).tobytes()
    packed = tmp_path / "guest.raw.gz"
    packed.write_bytes(compress("gzip", image))
    spill = tmp_path / "spill"
    spill.mkdir()
    r = subprocess.run(
        [DENGINE, "info", "--tmp-dir", str(spill), str(packed)],
        capture_output=True,
        text=True,
        env={**os.environ, "DENGINE_MAX_DECOMPRESSED": "1M"},
    )
    assert r.returncode == EXIT_OUTPUT, r.stderr
    assert r.stderr == (
        f"dengine: {packed}: cannot write: its content decompresses to more than the limit of "
        f"{1 << 20} bytes for decompressed content (--max-decompressed, $DENGINE_MAX_DECOMPRESSED)\n"
    )
    assert list(spill.iterdir()) == []
    # Within the limit it reads.
    with open_dump(packed, OpenOptions(tmp_dir=spill, max_decompressed=4 << 20)) as d:
        assert d.page_count == 1024
    assert list(spill.iterdir()) == []


@pytest.mark.parametrize("suffix", [".zst", ".gz", ".xz", ".bz2", ".lzo"])
def test_raw_image_named_inside_a_container(tmp_path: Path, suffix: str) -> None:
    kind = {".zst": "zstd", ".gz": "gzip", ".xz": "xz", ".bz2": "bzip2", ".lzo": "lzop"}[suffix]
    rng = np.random.default_rng(5)
    image = bytearray(64 * PAGE)
    image[5 * PAGE : 9 * PAGE] = rng.integers(1, 256, 4 * PAGE, dtype=np.uint8).tobytes()
    plain = tmp_path / "guest.raw"
    plain.write_bytes(bytes(image))
    packed = tmp_path / f"guest.raw{suffix}"
    packed.write_bytes(compress(kind, bytes(image)))  # the real tool
    with open_dump(packed, OpenOptions(tmp_dir=tmp_path)) as d, open_dump(plain) as ref:
        assert d.facts.format == "raw"
        assert d.facts.extra["file_compression"] == kind
        assert np.array_equal(d.gfns, ref.gfns)
        assert np.array_equal(
            np.concatenate([b.pages for b in d.batches()]),
            np.frombuffer(bytes(image), np.uint8).reshape(-1, PAGE),
        )
    # Without the name saying so, the same content has no magic: refused on its first bytes.
    other = tmp_path / f"guest{suffix}"
    other.write_bytes(packed.read_bytes())
    with pytest.raises(FormatError, match="expected the magic of a known dump format"):
        open_dump(other, OpenOptions(tmp_dir=tmp_path))


def test_free_space_of_the_temporary_folder_is_kept(tmp_path: Path) -> None:
    small = tmp_path / "small"
    if not tmpfs(small, 16 << 20):
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        rng = np.random.default_rng(9)
        image = rng.integers(0, 256, 32 << 20, dtype=np.uint8).tobytes()  # does not fit in 16 MiB
        packed = tmp_path / "big.raw.zst"
        packed.write_bytes(compress("zstd", image))
        with pytest.raises(OutputError) as e:
            open_dump(packed, OpenOptions(tmp_dir=small))
        assert e.value.exit_code == EXIT_OUTPUT
        assert str(e.value).startswith(f"{small}: cannot write: decompressing {packed} needs more than the ")
        assert str(e.value).endswith(" free; --tmp-dir chooses another folder)")
        assert list(small.iterdir()) == []
        # A sparse image far larger than the folder is fine: its zero pages take no space.
        sparse = bytearray(64 << 20)
        sparse[:PAGE] = image[:PAGE]
        packed.write_bytes(compress("zstd", bytes(sparse)))
        with open_dump(packed, OpenOptions(tmp_dir=small)) as d:
            assert d.page_count == (64 << 20) // PAGE
    finally:
        subprocess.run(["umount", str(small)], check=False)


def test_container_shrinking_while_decompressed(tmp_path: Path) -> None:
    # The compressed file is cut short after its first bytes were probed, while the rest is
    # decompressed: a one-line "changed" error (it is read with pread, not mapped: no SIGBUS).
    rng = np.random.default_rng(4)
    image = rng.integers(0, 256, 8 << 20, dtype=np.uint8).tobytes()
    packed = tmp_path / "guest.raw.gz"
    data = compress("gzip", image)
    packed.write_bytes(data)

    def cut(content: bytes, size: int | None) -> None:
        os.truncate(packed, len(data) // 2)

    with pytest.raises(UnreadableFile) as e:
        container.decompress(Source.of(packed), "gzip", OpenOptions(tmp_dir=tmp_path), accept=cut)
    assert e.value.exit_code == EXIT_UNREADABLE
    assert str(e.value).startswith(f"{packed}: cannot read: it changed while being read: it ends at ")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["guest.raw.gz"]


def test_libvirt_save_tail_is_probed_before_it_is_written(tmp_path: Path) -> None:
    # A zstd save image whose tail is 2 GiB of 0x01, not a QEMU stream: refused on its first
    # bytes, nothing written.
    image = tmp_path / "vm.save"
    image.write_bytes(build_save(b"", kind="zstd", tail=zstd_rle(1, 2 << 30)))
    at = 92 + data_area()
    spill = tmp_path / "spill"
    spill.mkdir()
    with pytest.raises(FormatError) as e, file_size_limit(1 << 20):
        open_dump(image, OpenOptions(tmp_dir=spill))
    assert str(e.value) == (
        f'{image}: at offset {at:#x}: expected zstd data holding a QEMU stream ("QEVM") as save format 5 '
        "says, found zstd data starting 01 01 01 01 01 01 01 01"
    )
    assert list(spill.iterdir()) == []
