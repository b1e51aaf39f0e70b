"""The page codecs: every encoding decodes back to its page, batch sizes are exactly the sizes of
the real blobs, and corrupt blobs raise CodecError (never another exception, never a wrong page)."""

from __future__ import annotations

import bz2
import struct
import subprocess
from collections.abc import Callable
from pathlib import Path

import bsdiff4
import numpy as np
import pytest
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dengine_cli.codecs import (
    COMPRESSION_CODECS,
    PATCH_CODECS,
    CodecError,
    CompressionCodec,
    PatchCodec,
    UnknownCodec,
    codec_by_id,
    compression_codec,
    patch_codec,
)
from dengine_cli.pages import PAGE_SIZE

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"

# zstd-19 and bsdiff4 cost 1-2 ms a page: keep example counts modest.
SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])

COMPRESSION_IDS = [c.name for c in COMPRESSION_CODECS]
PATCH_IDS = [c.name for c in PATCH_CODECS]


# --- pages -----------------------------------------------------------------------------------------


def _sparse(edits: list[tuple[int, bytes]]) -> bytes:
    page = bytearray(PAGE_SIZE)
    for offset, data in edits:
        data = data[: PAGE_SIZE - offset]
        page[offset : offset + len(data)] = data
    return bytes(page)


def _noise_page(seed: int, alphabet: int) -> bytes:
    return (
        np.random.default_rng(seed)
        .integers(0, alphabet, PAGE_SIZE, dtype=np.uint16)
        .astype(np.uint8)
        .tobytes()
    )


# Pages drawn byte by byte would be too big for hypothesis: random pages come from a seed, with an
# alphabet from 2 byte values (compresses a little) to 256 (does not compress).
random_pages = st.builds(_noise_page, st.integers(0, 2**32 - 1), st.integers(2, 256))
mostly_zero_pages = st.lists(
    st.tuples(st.integers(0, PAGE_SIZE - 1), st.binary(min_size=1, max_size=64)), max_size=8
).map(_sparse)
pattern_pages = st.binary(min_size=1, max_size=96).map(lambda unit: (unit * PAGE_SIZE)[:PAGE_SIZE])
pages = st.one_of(st.just(bytes(PAGE_SIZE)), mostly_zero_pages, pattern_pages, random_pages)


def _edit(page: bytes, edits: list[tuple[int, bytes]]) -> bytes:
    out = bytearray(page)
    for offset, data in edits:
        data = data[: PAGE_SIZE - offset]
        out[offset : offset + len(data)] = data
    return bytes(out)


edits = st.lists(st.tuples(st.integers(0, PAGE_SIZE - 1), st.binary(min_size=1, max_size=32)), max_size=6)


@st.composite
def page_pairs(draw: st.DrawFn) -> tuple[bytes, bytes]:
    """(reference, page): the page is the reference edited, the reference itself, with one byte
    changed, or an unrelated page."""
    ref = draw(pages)
    kind = draw(st.sampled_from(["edited", "same", "one-byte", "unrelated"]))
    if kind == "edited":
        return ref, _edit(ref, draw(edits))
    if kind == "same":
        return ref, ref
    if kind == "one-byte":
        return ref, _one_byte_changed(ref, draw(st.integers(0, PAGE_SIZE - 1)), draw(st.integers(1, 255)))
    return ref, draw(pages)


def _one_byte_changed(page: bytes, offset: int, flip: int) -> bytes:
    out = bytearray(page)
    out[offset] ^= flip
    return bytes(out)


def _random_page(seed: int) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, PAGE_SIZE, dtype=np.uint8).tobytes()


def _text_page(seed: int) -> bytes:
    """Something like a page of a guest's page cache: English-ish text."""
    rng = np.random.default_rng(seed)
    words = [b"memory", b"page", b"guest", b"kernel", b"the", b"of", b"hypervisor", b"share", b"\n"]
    text = b" ".join(words[i] for i in rng.integers(0, len(words), 2000))
    return text[:PAGE_SIZE]


# --- registry --------------------------------------------------------------------------------------


def test_registry_names_and_ids_are_unique() -> None:
    codecs: list[CompressionCodec | PatchCodec] = [*COMPRESSION_CODECS, *PATCH_CODECS]
    names = [c.name for c in codecs]
    ids = [c.id for c in codecs]
    assert len(set(names)) == len(names)
    assert len(set(ids)) == len(ids)
    assert all(0 < i < 256 for i in ids)  # 0 is reserved for a page stored whole
    assert COMPRESSION_IDS == ["zstd-1", "zstd-3", "zstd-19", "zlib-1", "zlib-6", "lz4"]
    assert PATCH_IDS == ["bsdiff4", "zstd-dict", "xor-zstd"]
    for codec in COMPRESSION_CODECS:
        assert compression_codec(codec.name) is codec
        assert codec_by_id(codec.id) is codec
    for patcher in PATCH_CODECS:
        assert patch_codec(patcher.name) is patcher
        assert codec_by_id(patcher.id) is patcher


def test_unknown_compression_codec_names_the_known_ones() -> None:
    with pytest.raises(UnknownCodec) as info:
        compression_codec("zstd-5")
    assert str(info.value) == (
        "unknown compression codec 'zstd-5': known codecs are zstd-1, zstd-3, zstd-19, zlib-1, zlib-6, lz4"
    )


def test_unknown_patch_codec_names_the_known_ones() -> None:
    with pytest.raises(UnknownCodec) as info:
        patch_codec("xdelta3")
    assert str(info.value) == "unknown patch codec 'xdelta3': known codecs are bsdiff4, zstd-dict, xor-zstd"


def test_unknown_id_is_a_key_error() -> None:
    with pytest.raises(KeyError):
        codec_by_id(0)


# --- compression: round trip and exact sizes -------------------------------------------------------


@pytest.mark.parametrize("codec", COMPRESSION_CODECS, ids=COMPRESSION_IDS)
@SETTINGS
@given(page=pages)
def test_compression_round_trips(codec: CompressionCodec, page: bytes) -> None:
    blob = codec.compress(page)
    assert codec.decompress(blob) == page


@pytest.mark.parametrize("codec", COMPRESSION_CODECS, ids=COMPRESSION_IDS)
@SETTINGS
@given(batch=st.lists(pages, min_size=0, max_size=6))
def test_compressed_sizes_are_the_blob_sizes(codec: CompressionCodec, batch: list[bytes]) -> None:
    array = np.frombuffer(b"".join(batch), dtype=np.uint8).reshape(len(batch), PAGE_SIZE)
    sizes = codec.compressed_sizes(array)
    assert sizes.dtype == np.int32
    assert sizes.tolist() == [len(codec.compress(p)) for p in batch]


@pytest.mark.parametrize("codec", COMPRESSION_CODECS, ids=COMPRESSION_IDS)
def test_compressed_sizes_of_strided_rows(codec: CompressionCodec) -> None:
    # Every other row of a batch (not C-contiguous), and a column-major copy (rows not contiguous).
    array = np.stack(
        [np.frombuffer(p, dtype=np.uint8) for p in (_text_page(1), bytes(PAGE_SIZE), _text_page(2))]
    )
    expected = [len(codec.compress(p.tobytes())) for p in array]
    assert codec.compressed_sizes(array[::2]).tolist() == expected[::2]
    assert codec.compressed_sizes(np.asfortranarray(array)).tolist() == expected


@pytest.mark.parametrize("codec", COMPRESSION_CODECS, ids=COMPRESSION_IDS)
def test_compress_takes_bytes_memoryview_and_rows(codec: CompressionCodec) -> None:
    page = _text_page(3)
    row = np.frombuffer(page * 2, dtype=np.uint8).reshape(2, PAGE_SIZE)[1]
    blob = codec.compress(page)
    assert codec.compress(memoryview(page)) == blob
    assert codec.compress(row) == blob
    assert codec.compress(bytearray(page)) == blob
    assert len(blob) < PAGE_SIZE // 2  # text compresses


@pytest.mark.parametrize("codec", COMPRESSION_CODECS, ids=COMPRESSION_IDS)
def test_compress_rejects_a_wrong_length_page(codec: CompressionCodec) -> None:
    # A caller's bug, not bad input: a plain ValueError, not a CodecError.
    with pytest.raises(ValueError, match="page must be 4096 contiguous bytes, got 4095") as info:
        codec.compress(bytes(PAGE_SIZE - 1))
    assert not isinstance(info.value, CodecError)
    with pytest.raises(ValueError, match=r"pages must be an \(n, 4096\) uint8 array"):
        codec.compressed_sizes(np.zeros((2, 4000), dtype=np.uint8))


def test_zstd_and_zlib_blobs_are_standard_streams() -> None:
    page = _text_page(4)
    for name in ("zstd-1", "zstd-3", "zstd-19"):
        blob = compression_codec(name).compress(page)
        assert zstandard.frame_content_size(blob) == PAGE_SIZE
        run = subprocess.run(["zstd", "-d", "-c"], input=blob, capture_output=True, check=True)
        assert run.stdout == page
    import zlib

    for name in ("zlib-1", "zlib-6"):
        assert zlib.decompress(compression_codec(name).compress(page)) == page


# --- compression: corrupt blobs --------------------------------------------------------------------


def _zstd_frame(content: bytes) -> bytes:
    return zstandard.ZstdCompressor(level=1).compress(content)


@pytest.mark.parametrize(
    ("name", "blob", "message"),
    [
        ("zstd-1", b"", "zstd-1: cannot decode: bad zstd frame header"),
        ("zstd-1", b"not a zstd frame", "zstd-1: cannot decode: bad zstd frame header"),
        (
            "zstd-1",
            _zstd_frame(bytes(PAGE_SIZE - 1)),
            "zstd-1: cannot decode: zstd frame holds content size 4095, expected 4096",
        ),
        (
            "zstd-3",
            zstandard.ZstdCompressor(write_content_size=False).compress(bytes(PAGE_SIZE)),
            "zstd-3: cannot decode: zstd frame holds no content size, expected 4096",
        ),
        (
            "zstd-1",
            _zstd_frame(bytes(PAGE_SIZE)) + b"\0",
            "zstd-1: cannot decode: compressed input contains 1 bytes of unused data",
        ),
        ("zstd-19", _zstd_frame(bytes(PAGE_SIZE))[:-1], "zstd-19: cannot decode: "),
        ("zlib-1", b"", "zlib-1: cannot decode: decoded 0+ bytes, expected 4096"),
        ("zlib-1", b"\x78\x01garbage", "zlib-1: cannot decode: Error -3 while decompressing data"),
        ("zlib-6", __import__("zlib").compress(bytes(4095)), "zlib-6: cannot decode: decoded 4095+ bytes"),
        ("zlib-6", __import__("zlib").compress(bytes(4097)), "zlib-6: cannot decode: decoded 4097+ bytes"),
        (
            "zlib-1",
            __import__("zlib").compress(bytes(PAGE_SIZE))[:-1],
            "zlib-1: cannot decode: zlib stream is truncated",
        ),
        (
            "zlib-1",
            __import__("zlib").compress(bytes(PAGE_SIZE)) + b"xy",
            "zlib-1: cannot decode: 2 bytes after the zlib stream",
        ),
        ("lz4", b"", "lz4: cannot decode: "),
        ("lz4", b"\xff\xff\xff", "lz4: cannot decode: "),
    ],
    ids=lambda v: v if isinstance(v, str) and len(v) < 10 else "",
)
def test_corrupt_blob_raises_codec_error(name: str, blob: bytes, message: str) -> None:
    codec = compression_codec(name)
    with pytest.raises(CodecError) as info:
        codec.decompress(blob)
    assert str(info.value).startswith(message)
    assert isinstance(info.value, ValueError)
    assert info.value.codec == name


@pytest.mark.parametrize("codec", COMPRESSION_CODECS, ids=COMPRESSION_IDS)
def test_truncated_or_extended_blob_raises_codec_error(codec: CompressionCodec) -> None:
    for page in (_text_page(5), _random_page(5), bytes(PAGE_SIZE)):
        blob = codec.compress(page)
        for bad in (blob[:-1], blob[: len(blob) // 2], blob + b"\x00", blob + blob):
            with pytest.raises(CodecError):
                codec.decompress(bad)


def test_lz4_block_of_another_size_raises_codec_error() -> None:
    import cramjam

    short = bytes(cramjam.lz4.compress_block(_text_page(6)[:4000], store_size=False))
    with pytest.raises(CodecError, match=r"^lz4: cannot decode: decoded 4000 bytes, expected 4096$"):
        compression_codec("lz4").decompress(short)


@pytest.mark.parametrize("codec", COMPRESSION_CODECS, ids=COMPRESSION_IDS)
@SETTINGS
@given(page=pages, data=st.data())
def test_damaged_blob_gives_a_page_or_codec_error(
    codec: CompressionCodec, page: bytes, data: st.DataObject
) -> None:
    # Without a checksum a damaged literal can decode to another page; what must never happen is
    # another exception, or a result that is not exactly one page.
    blob = bytearray(codec.compress(page))
    for _ in range(data.draw(st.integers(1, 3))):
        blob[data.draw(st.integers(0, len(blob) - 1))] ^= data.draw(st.integers(1, 255))
    try:
        out = codec.decompress(bytes(blob))
    except CodecError:
        return
    assert len(out) == PAGE_SIZE


# --- patches ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("codec", PATCH_CODECS, ids=PATCH_IDS)
@SETTINGS
@given(pair=page_pairs())
def test_patch_reproduces_the_page(codec: PatchCodec, pair: tuple[bytes, bytes]) -> None:
    ref, page = pair
    patch = codec.diff(ref, page)
    assert codec.apply(ref, patch) == page


@SETTINGS
@given(pair=page_pairs())
def test_bsdiff4_patch_agrees_with_the_bsdiff4_package(pair: tuple[bytes, bytes]) -> None:
    # The decoder here is written from the format; the package's own bspatch is the oracle.
    ref, page = pair
    codec = patch_codec("bsdiff4")
    patch = codec.diff(ref, page)
    assert bsdiff4.patch(ref, patch) == page == codec.apply(ref, patch)


@pytest.mark.parametrize("codec", PATCH_CODECS, ids=PATCH_IDS)
@SETTINGS
@given(batch=st.lists(page_pairs(), min_size=0, max_size=5), limit=st.none() | st.integers(1, 5000))
def test_patch_sizes_are_the_patch_sizes(
    codec: PatchCodec, batch: list[tuple[bytes, bytes]], limit: int | None
) -> None:
    refs = np.frombuffer(b"".join(r for r, _ in batch), dtype=np.uint8).reshape(len(batch), PAGE_SIZE)
    news = np.frombuffer(b"".join(p for _, p in batch), dtype=np.uint8).reshape(len(batch), PAGE_SIZE)
    exact = [len(codec.diff(r, p)) for r, p in batch]
    sizes = codec.patch_sizes(refs, news, limit=limit)
    assert sizes.dtype == np.int32
    if limit is None:
        assert sizes.tolist() == exact
    else:
        assert sizes.tolist() == [min(s, limit) for s in exact]


@pytest.mark.parametrize("codec", PATCH_CODECS, ids=PATCH_IDS)
def test_patch_sizes_reject_mismatched_shapes(codec: PatchCodec) -> None:
    with pytest.raises(ValueError, match=r"refs \(2, 4096\) and pages \(1, 4096\) differ in shape"):
        codec.patch_sizes(np.zeros((2, PAGE_SIZE), np.uint8), np.zeros((1, PAGE_SIZE), np.uint8))


# zstd-dict at level 1 (fast strategy) takes the short matches a repetitive page finds within itself
# before the one 4096-byte match into the dictionary: 155 bytes for the text page, 19 for the others.
@pytest.mark.parametrize(("name", "most"), [("bsdiff4", 160), ("zstd-dict", 160), ("xor-zstd", 19)])
@pytest.mark.parametrize(
    "page", [_text_page(7), _random_page(7), bytes(PAGE_SIZE)], ids=["text", "random", "zero"]
)
def test_patch_of_a_page_against_itself_is_tiny(name: str, most: int, page: bytes) -> None:
    patch = patch_codec(name).diff(page, page)
    assert len(patch) <= most
    assert patch_codec(name).apply(page, patch) == page


# A one-byte change is one non-zero XOR byte: xor-zstd is always tiny.  zstd-dict at level 1 is
# tiny on pages that do not repeat themselves, but on a repetitive page (text made of a few words)
# zstd's fast strategy takes the short matches it finds earlier in the page before the long match
# into the reference, and the patch grows to hundreds of bytes (up to 611 B seen; levels 3-5 help
# without curing it).  The bound says so instead of hiding it.
@pytest.mark.parametrize(
    ("name", "kind", "under"),
    [
        ("xor-zstd", "text", 64),
        ("xor-zstd", "random", 64),
        ("zstd-dict", "random", 64),
        ("zstd-dict", "text", 1024),
    ],
)
@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), offset=st.integers(0, PAGE_SIZE - 1), flip=st.integers(1, 255))
def test_one_byte_changed_patches_small(
    name: str, kind: str, under: int, seed: int, offset: int, flip: int
) -> None:
    ref = _text_page(seed) if kind == "text" else _random_page(seed)
    page = _one_byte_changed(ref, offset, flip)
    patch = patch_codec(name).diff(ref, page)
    assert len(patch) < under
    assert patch_codec(name).apply(ref, patch) == page


@pytest.mark.parametrize("codec", PATCH_CODECS, ids=PATCH_IDS)
def test_unrelated_random_pages_do_not_patch_under_2048(codec: PatchCodec) -> None:
    refs = np.stack([np.frombuffer(_random_page(s), np.uint8) for s in (10, 11, 12)])
    news = np.stack([np.frombuffer(_random_page(s), np.uint8) for s in (20, 21, 22)])
    assert (codec.patch_sizes(refs, news) > 2048).all()


def test_zstd_dict_reference_starting_with_dictionary_magic() -> None:
    # A page that starts like a trained zstd dictionary must still be used as raw content.
    ref = struct.pack("<I", 0xEC30A437) + _random_page(13)[4:]
    page = _one_byte_changed(ref, 100, 0x55)
    codec = patch_codec("zstd-dict")
    patch = codec.diff(ref, page)
    assert codec.apply(ref, patch) == page
    assert len(patch) < 64


def test_zstd_dict_patch_decodes_with_the_zstd_tool(tmp_path: Path) -> None:
    ref = _text_page(14)
    page = _edit(ref, [(300, b"changed"), (2000, b"also changed")])
    (tmp_path / "ref").write_bytes(ref)
    patch = patch_codec("zstd-dict").diff(ref, page)
    run = subprocess.run(
        ["zstd", "-d", "-c", "-D", str(tmp_path / "ref")], input=patch, capture_output=True, check=True
    )
    assert run.stdout == page
    xor = subprocess.run(
        ["zstd", "-d", "-c"], input=patch_codec("xor-zstd").diff(ref, page), capture_output=True
    )
    assert bytes(a ^ b for a, b in zip(xor.stdout, ref, strict=True)) == page


def test_zstd_dict_patch_applied_to_another_reference_does_not_give_the_page() -> None:
    ref, other = _text_page(15), _text_page(16)
    page = _edit(ref, [(10, b"x")])
    codec = patch_codec("zstd-dict")
    try:
        out = codec.apply(other, codec.diff(ref, page))
    except CodecError:
        return
    assert out != page and len(out) == PAGE_SIZE


# --- patches: corrupt input ------------------------------------------------------------------------


def _bsdiff_patch(
    control: list[tuple[int, int, int]], diff: bytes, extra: bytes, new_size: int = PAGE_SIZE
) -> bytes:
    def offtin(v: int) -> bytes:
        return struct.pack("<Q", (-v | 1 << 63) if v < 0 else v)

    bcontrol = bz2.compress(b"".join(offtin(x) + offtin(y) + offtin(z) for x, y, z in control))
    bdiff, bextra = bz2.compress(diff), bz2.compress(extra)
    return (
        b"BSDIFF40"
        + offtin(len(bcontrol))
        + offtin(len(bdiff))
        + offtin(new_size)
        + bcontrol
        + bdiff
        + bextra
    )


def test_handmade_bsdiff_patch_applies() -> None:
    # 100 bytes from the reference at 50 (+1 each), then 3996 bytes of extra.
    ref = bytes(range(256)) * 16
    patch = _bsdiff_patch([(100, PAGE_SIZE - 100, 0)], bytes([1]) * 100, b"E" * (PAGE_SIZE - 100))
    expected = bytes((b + 1) % 256 for b in ref[:100]) + b"E" * (PAGE_SIZE - 100)
    assert patch_codec("bsdiff4").apply(ref, patch) == expected == bsdiff4.patch(ref, patch)


@pytest.mark.parametrize(
    ("patch", "message"),
    [
        (b"BSDIFF40", "bsdiff4: cannot decode: patch of 8 bytes is shorter than its header"),
        (
            b"BSDIFF39" + bytes(24),
            "bsdiff4: cannot decode: bad magic b'BSDIFF39', expected b'BSDIFF40'",
        ),
        (
            _bsdiff_patch([(0, PAGE_SIZE, 0)], b"", bytes(PAGE_SIZE), new_size=1 << 40),
            "bsdiff4: cannot decode: patch makes 1099511627776 bytes, expected 4096",
        ),
        (
            _bsdiff_patch([(-5, PAGE_SIZE, 0)], b"", bytes(PAGE_SIZE)),
            f"bsdiff4: cannot decode: control entry (-5, {PAGE_SIZE}, 0) runs outside the page",
        ),
        (
            _bsdiff_patch([(0, PAGE_SIZE + 1, 0)], b"", bytes(PAGE_SIZE)),
            f"bsdiff4: cannot decode: control entry (0, {PAGE_SIZE + 1}, 0) runs outside the page",
        ),
        (
            _bsdiff_patch([(10, 0, 0)], b"\0" * 5, b""),
            "bsdiff4: cannot decode: control entry (10, 0, 0) runs past its section",
        ),
        (
            _bsdiff_patch([(0, 100, 0)], b"", b"\0" * 100),
            "bsdiff4: cannot decode: control entries make 100 bytes and use 0 of 0 diff and 100 of 100 "
            "extra bytes, expected 4096 and all",
        ),
        (
            _bsdiff_patch([(0, PAGE_SIZE, 0)], b"", bytes(PAGE_SIZE + 1)),
            "bsdiff4: cannot decode: extra section decodes to more than 4096 bytes",
        ),
        (
            _bsdiff_patch([(0, PAGE_SIZE, 0)], b"", bytes(PAGE_SIZE))[:-3],
            "bsdiff4: cannot decode: extra section: bzip2 stream is truncated",
        ),
        (
            b"BSDIFF40" + struct.pack("<QQQ", 1000, 10, PAGE_SIZE) + bytes(20),
            "bsdiff4: cannot decode: sections of 1000 and 10 bytes overrun a 20-byte body",
        ),
        (
            b"BSDIFF40" + struct.pack("<QQQ", 4, 0, PAGE_SIZE) + b"junk",
            "bsdiff4: cannot decode: control section: Invalid data stream",
        ),
    ],
    ids=[
        "short",
        "magic",
        "huge-size",
        "negative-length",
        "past-page",
        "past-diff",
        "short-page",
        "bomb",
        "truncated",
        "overrun",
        "not-bzip2",
    ],
)
def test_corrupt_bsdiff_patch_raises_codec_error(patch: bytes, message: str) -> None:
    with pytest.raises(CodecError) as info:
        patch_codec("bsdiff4").apply(bytes(PAGE_SIZE), patch)
    assert str(info.value) == message


@pytest.mark.parametrize("name", ["zstd-dict", "xor-zstd"])
def test_corrupt_zstd_patch_raises_codec_error(name: str) -> None:
    codec = patch_codec(name)
    ref = _text_page(17)
    patch = codec.diff(ref, _edit(ref, [(5, b"abc")]))
    for bad, message in [
        (b"", f"{name}: cannot decode: bad zstd frame header"),
        (patch[:-1], f"{name}: cannot decode: "),
        (patch + b"\0", f"{name}: cannot decode: compressed input contains 1 bytes of unused data"),
        (_zstd_frame(bytes(100)), f"{name}: cannot decode: zstd frame holds content size 100, expected 4096"),
    ]:
        with pytest.raises(CodecError) as info:
            codec.apply(ref, bad)
        assert str(info.value).startswith(message)


@pytest.mark.parametrize("codec", PATCH_CODECS, ids=PATCH_IDS)
@SETTINGS
@given(pair=page_pairs(), data=st.data())
def test_damaged_patch_gives_a_page_or_codec_error(
    codec: PatchCodec, pair: tuple[bytes, bytes], data: st.DataObject
) -> None:
    ref, page = pair
    patch = bytearray(codec.diff(ref, page))
    for _ in range(data.draw(st.integers(1, 3))):
        patch[data.draw(st.integers(0, len(patch) - 1))] ^= data.draw(st.integers(1, 255))
    try:
        out = codec.apply(ref, bytes(patch))
    except CodecError:
        return
    assert len(out) == PAGE_SIZE


# --- real pages ------------------------------------------------------------------------------------


def _real_fixture() -> str | None:
    for name in ("alpha.elf", "beta.elf", "alpha-later.elf"):
        if (FIXTURES / name).exists() or (FIXTURES / (name + ".zst")).exists():
            return name
    return None


@pytest.mark.skipif(_real_fixture() is None, reason="no real QEMU ELF fixture under fixtures/")
def test_codecs_on_real_guest_pages(real_dump: Callable[[str], Path]) -> None:
    from dengine_cli.formats import open_dump

    dump = open_dump(real_dump(str(_real_fixture())))
    seen: set[bytes] = set()
    rows: list[np.ndarray] = []  # type: ignore[type-arg]
    for batch in dump.batches():
        for row in batch.pages[batch.pages.view(np.uint64).any(axis=1)]:
            key = row.tobytes()
            if key not in seen:
                seen.add(key)
                rows.append(row.copy())
    real = np.stack(rows)  # the distinct non-zero pages
    assert len(real) >= 1000

    sample = real[::8]
    for codec in COMPRESSION_CODECS:
        some = sample if codec.name != "zstd-19" else sample[:100]
        sizes = codec.compressed_sizes(some)
        for row, size in zip(some, sizes.tolist(), strict=True):
            blob = codec.compress(row)
            assert len(blob) == size
            assert codec.decompress(blob) == row.tobytes()

    # Pairs of pages with the same first 64 bytes: a crude stand-in for the engine's detector.
    # The workload writes similar.bin, base.bin with one byte changed per page (manifest.json), so
    # some pairs differ in exactly one byte.
    first: dict[bytes, int] = {}
    pairs: list[tuple[int, int]] = []
    for i, row in enumerate(real):
        j = first.setdefault(row[:64].tobytes(), i)
        if j != i:
            pairs.append((j, i))
    refs, news = real[[r for r, _ in pairs]], real[[n for _, n in pairs]]
    one_byte = np.count_nonzero(refs != news, axis=1) == 1
    assert one_byte.sum() >= 32
    for name in ("zstd-dict", "xor-zstd"):
        sizes = patch_codec(name).patch_sizes(refs[one_byte], news[one_byte])
        assert (sizes < 64).all()
    some = np.r_[np.flatnonzero(one_byte)[:20], np.flatnonzero(~one_byte)[:40]]
    for patcher in PATCH_CODECS:
        sizes = patcher.patch_sizes(refs[some], news[some])
        for ref, page, size in zip(refs[some], news[some], sizes.tolist(), strict=True):
            patch = patcher.diff(ref, page)
            assert len(patch) == size
            assert patcher.apply(ref, patch) == page.tobytes()
