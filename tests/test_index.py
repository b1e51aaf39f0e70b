"""The page index: hashes and zero flags per page, the on-disk cache (keyed on the dump as it is
now, verified on load, written atomically) and building several indexes in worker processes."""

from __future__ import annotations

import gzip
import json
import os
import struct
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import xxhash
from hypothesis import given, settings
from hypothesis import strategies as st

from dengine_cli.cache.index_store import INDEX_MAGIC, INDEX_VERSION, index_key, index_path_for, write_index
from dengine_cli.cache.keys import default_index_dir
from dengine_cli.engine.index import (
    HASHER,
    HASHERS,
    ZERO_PAGE_CHECK,
    ZERO_PAGE_HASH,
    _rows_zero,
    hash_dump,
    hash_pages,
    index_dump,
)
from dengine_cli.errors import FormatError, UnreadableFile
from dengine_cli.formats import open_dump
from dengine_cli.formats.base import OpenOptions, Source
from dengine_cli.formats.raw import open_raw
from dengine_cli.pages import PAGE_SIZE
from dengine_cli.parallel import Workers
from dengine_cli.session.indexing import build_indexes, load_or_build
from tests.vms import write_raw_image


def make_pages(seed: int, n: int) -> np.ndarray:
    """Random pages, a third of them zero, some zero but for one byte at either end."""
    rng = np.random.default_rng(seed)
    pages = rng.integers(0, 256, (n, PAGE_SIZE), dtype=np.uint8)
    pages[rng.random(n) < 0.33] = 0
    if n > 4:
        pages[1] = 0
        pages[1, 0] = 1
        pages[2] = 0
        pages[2, PAGE_SIZE - 1] = 0x80
    return pages


def write_gzip(path: Path, data: bytes) -> Path:
    """A real gzip-compressed dump (a compressed container, hashed whole by one worker)."""
    path.write_bytes(gzip.compress(data, compresslevel=1))
    return path


def expected_hashes(pages: np.ndarray) -> list[int]:
    """The high halves of each page's xxh3-128."""
    return [xxhash.xxh3_128_intdigest(p.tobytes()) >> 64 for p in pages]


def expected_checks(pages: np.ndarray) -> list[int]:
    """The low halves."""
    return [xxhash.xxh3_128_intdigest(p.tobytes()) & ((1 << 64) - 1) for p in pages]


# --- hashing -----------------------------------------------------------------------------------


def test_the_c_hasher_is_built_and_runs() -> None:
    """scripts/setup installs libxxhash-dev, so the C hasher is built wherever the suite runs: a
    build that failed quietly (the extension is optional) fails here, not only in the bench."""
    assert HASHERS == ("c", "python")
    assert HASHER == "c"


def test_an_unbuilt_hasher_is_refused() -> None:
    with pytest.raises(ValueError, match="not built"):
        hash_pages(make_pages(1, 2), hasher="rust")


@pytest.mark.parametrize("hasher", HASHERS)
def test_hash_pages_equals_xxh3_of_each_page(hasher: str) -> None:
    pages = make_pages(1, 200)
    hashes, check, zero = hash_pages(pages, hasher=hasher)
    assert hashes.tolist() == expected_hashes(pages)
    assert check.tolist() == expected_checks(pages)
    assert zero.tolist() == [not p.any() for p in pages]
    assert not zero[1] and not zero[2]
    assert set(hashes[zero].tolist()) <= {ZERO_PAGE_HASH}
    assert set(check[zero].tolist()) <= {ZERO_PAGE_CHECK}
    assert xxhash.xxh3_128_intdigest(bytes(4096)) == (ZERO_PAGE_HASH << 64) | ZERO_PAGE_CHECK


@pytest.mark.parametrize("hasher", HASHERS)
def test_hash_pages_of_a_strided_batch(hasher: str) -> None:
    pages = make_pages(2, 40)
    every_other = pages[::2]
    assert not every_other.flags.c_contiguous
    hashes, check, zero = hash_pages(every_other, hasher=hasher)
    assert hashes.tolist() == expected_hashes(every_other)
    assert check.tolist() == expected_checks(every_other)
    assert zero.tolist() == [not p.any() for p in every_other]


@settings(max_examples=100, deadline=None)
@given(
    st.integers(0, 40),
    st.integers(0, 24),
    st.booleans(),
    st.sampled_from(HASHERS),
    st.integers(0, 2**32 - 1),
)
def test_hashers_agree_on_any_layout(n: int, gap: int, reverse: bool, hasher: str, seed: int) -> None:
    """Rows at any stride (pages 4096 + ``gap`` bytes apart, as in a QEMU stream, from any byte
    offset, in either direction) hash as their bytes do, by either hasher."""
    rng = np.random.default_rng(seed)
    stride = PAGE_SIZE + gap
    raw = rng.integers(0, 256, n * stride + 7, dtype=np.uint8)
    start = int(rng.integers(0, 8))
    rows = np.lib.stride_tricks.as_strided(raw[start:], shape=(n, PAGE_SIZE), strides=(stride, 1))
    if n:
        rows[rng.random(n) < 0.4] = 0
    view = rows[::-1] if reverse else rows
    hashes, check, zero = hash_pages(view, hasher=hasher)
    assert hashes.tolist() == expected_hashes(view)
    assert check.tolist() == expected_checks(view)
    assert zero.tolist() == [not p.any() for p in view]


@pytest.mark.skipif("c" not in HASHERS, reason="the C hasher is not built")
def test_the_c_hasher_refuses_arrays_of_the_wrong_shape() -> None:
    from dengine_cli import _pagehash  # type: ignore[attr-defined]

    pages = make_pages(4, 3)
    out = [np.empty(3, dtype=np.uint64), np.empty(3, dtype=np.uint64), np.empty(3, dtype=np.bool_)]
    for bad in (pages.reshape(-1), pages[:, :4000], pages.T, pages.view(np.uint64)):
        with pytest.raises(ValueError, match="rows of 4096 bytes"):
            _pagehash.hash_pages(bad, *out)
    with pytest.raises(ValueError, match="high holds 16 bytes, 3 pages need 24"):
        _pagehash.hash_pages(pages, np.empty(2, dtype=np.uint64), *out[1:])
    with pytest.raises(ValueError, match="zero holds 6 bytes"):
        _pagehash.hash_pages(pages, *out[:2], np.empty(6, dtype=np.bool_))
    frozen = np.empty(3, dtype=np.uint64)
    frozen.flags.writeable = False
    with pytest.raises((BufferError, TypeError, ValueError)):
        _pagehash.hash_pages(pages, frozen, *out[1:])
    assert _pagehash.hash_pages(pages, *out) is None
    assert out[0].tolist() == expected_hashes(pages)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.one_of(st.none(), st.tuples(st.integers(0, PAGE_SIZE - 1), st.integers(1, 255))),
        min_size=1,
        max_size=24,
    ),
    st.sampled_from(HASHERS),
)
def test_zero_flags_are_exact_whatever_byte_is_set(layout: list[tuple[int, int] | None], hasher: str) -> None:
    """Zero pages are told from pages zero but for one byte anywhere (the last byte of the last
    page of the batch too), on a fresh batch and on the same buffer hashed again."""
    pages = np.zeros((len(layout), PAGE_SIZE), dtype=np.uint8)
    for row, spec in enumerate(layout):
        if spec is not None:
            pages[row, spec[0]] = spec[1]
    for _ in range(2):
        hashes, check, zero = hash_pages(pages, hasher=hasher)
        assert zero.tolist() == [spec is None for spec in layout]
        assert hashes.tolist() == expected_hashes(pages)
        assert check.tolist() == expected_checks(pages)


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_byte_check_of_zero_hash_candidates(data: st.DataObject) -> None:
    """The byte check that guards the zero flag against a page colliding with the zero page's
    hash (never seen: 2**-128 a page) tells zero rows from others, any rows of a batch: rows
    close together (reduced in place) and rows few and far apart (gathered)."""
    n = data.draw(st.integers(1, 64))
    pages = np.zeros((n, PAGE_SIZE), dtype=np.uint8)
    for row in data.draw(st.sets(st.integers(0, n - 1))):
        pages[row, data.draw(st.integers(0, PAGE_SIZE - 1))] = data.draw(st.integers(1, 255))
    rows = np.array(sorted(data.draw(st.sets(st.integers(0, n - 1), min_size=1))), dtype=np.intp)
    assert _rows_zero(pages, rows).tolist() == [not pages[r].any() for r in rows]


@pytest.mark.parametrize("hasher", HASHERS)
def test_hash_dump_over_a_page_range(tmp_path: Path, hasher: str) -> None:
    pages = make_pages(3, 300)
    dump = open_raw(Source.of(write_raw_image(tmp_path / "a.raw", pages)), OpenOptions())
    hashes, check, zero = hash_dump(dump, 50, 250, batch_pages=16, hasher=hasher)
    assert hashes.tolist() == expected_hashes(pages[50:250])
    assert check.tolist() == expected_checks(pages[50:250])
    assert zero.tolist() == [not p.any() for p in pages[50:250]]


@pytest.mark.parametrize("name", ["alpha.elf", "alpha.kdump", "alpha.qevm"])
def test_both_hashers_index_real_qemu_dumps_alike(real_dump: Callable[[str], Path], name: str) -> None:
    """On dumps QEMU wrote (an ELF core read into the scan buffer, a compressed kdump decoded
    batch by batch, a migration stream whose pages come as 4104-byte-strided views of its
    mapping), each hasher gives every page's xxh3-128 and the exact zero flags."""
    with open_dump(real_dump(name)) as dump:
        pages = np.concatenate([b.pages for b in dump.batches(4096)])
        results = [hash_dump(dump, batch_pages=4096, hasher=h) for h in HASHERS]
    assert len(pages) == dump.page_count > 0
    for hashes, check, zero in results:
        assert hashes.tolist() == expected_hashes(pages)
        assert check.tolist() == expected_checks(pages)
        assert zero.tolist() == (~pages.any(axis=1)).tolist()
    assert 0 < int(results[0][2].sum()) < len(pages)


# --- the cache ---------------------------------------------------------------------------------


def test_build_then_load_from_cache(tmp_path: Path) -> None:
    pages = make_pages(4, 500)
    dump_path = write_raw_image(tmp_path / "vm.raw", pages)
    cache = tmp_path / "cache"
    built = load_or_build(dump_path, index_dir=cache, batch_pages=64)
    assert not built.loaded
    assert built.path == index_path_for(dump_path, OpenOptions(), cache)
    assert built.path is not None and built.path.exists()
    mtime = built.path.stat().st_mtime_ns
    loaded = load_or_build(dump_path, index_dir=cache)
    assert loaded.loaded
    assert built.path.stat().st_mtime_ns == mtime  # not rewritten
    assert loaded.gfns.tolist() == list(range(500))
    assert loaded.hashes.tolist() == expected_hashes(pages)
    assert loaded.zero.tolist() == built.zero.tolist()
    assert loaded.zero_pages == sum(1 for p in pages if not p.any())
    assert loaded.name == str(dump_path)
    assert loaded.facts["format"] == "raw"


def test_on_disk_layout(tmp_path: Path) -> None:
    dump_path = write_raw_image(tmp_path / "vm.raw", make_pages(5, 100))
    index = load_or_build(dump_path, index_dir=tmp_path)
    assert index.path is not None
    data = index.path.read_bytes()
    magic, version, header_len = struct.unpack_from("<8sII", data)
    assert (magic, version) == (INDEX_MAGIC, INDEX_VERSION) == (b"DENGIDX\0", 2)
    header = json.loads(data[16 : 16 + header_len])
    assert header["page_count"] == 100
    st = os.stat(dump_path)
    assert header["key"]["ino"] == st.st_ino and header["key"]["ctime_ns"] == st.st_ctime_ns
    start = -(-(16 + header_len) // 64) * 64
    assert len(data) == start + 25 * 100
    assert np.frombuffer(data, np.uint64, 100, start).tolist() == list(range(100))
    assert np.frombuffer(data, np.uint64, 100, start + 800).tolist() == index.hashes.tolist()
    assert np.frombuffer(data, np.uint64, 100, start + 1600).tolist() == index.check.tolist()
    assert np.frombuffer(data, np.bool_, 100, start + 2400).tolist() == index.zero.tolist()
    # Named by the xxh3-64 of the dump's real path, then the xxh3-128 of the key it stores.
    digest = xxhash.xxh3_128_hexdigest(json.dumps(header["key"], sort_keys=True).encode())
    of_path = xxhash.xxh3_64_hexdigest(os.path.realpath(dump_path).encode())
    assert index.path.name == f"{of_path}-{digest}.idx"


def test_a_loaded_index_is_named_as_the_dump_is_given_now(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Built as ``vm.raw``, loaded as its absolute path: the name is the path given now; so
    too for an index written before the header said which name it was built under."""
    dump_path = write_raw_image(tmp_path / "vm.raw", make_pages(6, 50))
    monkeypatch.chdir(tmp_path)
    built = load_or_build("vm.raw", index_dir=tmp_path / "cache")
    assert built.name == "vm.raw" and built.path is not None
    assert load_or_build(dump_path, index_dir=tmp_path / "cache").name == str(dump_path)
    key = index_key("vm.raw", OpenOptions())
    assert write_index(built, key, built.path)  # as before: no "given" in the header
    data = built.path.read_bytes()
    (header_len,) = struct.unpack_from("<I", data, 12)
    assert "given" not in json.loads(data[16 : 16 + header_len])
    assert load_or_build(dump_path, index_dir=tmp_path / "cache").name == str(dump_path)


def test_rewritten_dump_with_same_size_and_mtime_is_reindexed(tmp_path: Path) -> None:
    dump_path = write_raw_image(tmp_path / "vm.raw", make_pages(6, 64))
    first = load_or_build(dump_path, index_dir=tmp_path / "cache")
    st = os.stat(dump_path)
    time.sleep(0.05)  # past the coarse timestamp granularity of the kernel
    changed = make_pages(7, 64)
    with open(dump_path, "r+b") as f:  # same inode, same size
        f.write(changed.tobytes())
    os.utime(dump_path, ns=(st.st_atime_ns, st.st_mtime_ns))
    st2 = os.stat(dump_path)
    assert (st2.st_size, st2.st_mtime_ns, st2.st_ino) == (st.st_size, st.st_mtime_ns, st.st_ino)
    again = load_or_build(dump_path, index_dir=tmp_path / "cache")
    assert not again.loaded
    assert again.path != first.path
    assert again.hashes.tolist() == expected_hashes(changed)


def test_options_that_change_the_page_set_are_part_of_the_key(tmp_path: Path) -> None:
    dump_path = write_raw_image(tmp_path / "vm.raw", make_pages(8, 16))
    plain = index_path_for(dump_path, OpenOptions(), tmp_path)
    assert index_path_for(dump_path, OpenOptions(format="raw"), tmp_path) != plain
    assert index_path_for(dump_path, OpenOptions(device_memory=True), tmp_path) != plain
    assert index_path_for(dump_path, OpenOptions(tmp_dir=tmp_path), tmp_path) == plain


def corrupt_truncate(data: bytes) -> bytes:
    return data[:-5]


def corrupt_array_byte(data: bytes) -> bytes:
    b = bytearray(data)
    b[-30] ^= 0x01
    return bytes(b)


def corrupt_magic(data: bytes) -> bytes:
    return b"DENGIDY\0" + data[8:]


def corrupt_version(data: bytes) -> bytes:
    return data[:8] + struct.pack("<I", INDEX_VERSION + 1) + data[12:]


def corrupt_header(data: bytes) -> bytes:
    return data[:16] + b"{not json" + data[25:]


def corrupt_huge_header(data: bytes) -> bytes:
    return data[:12] + struct.pack("<I", 0xFFFFFFFF) + data[16:]


def corrupt_empty(data: bytes) -> bytes:
    return b""


@pytest.mark.parametrize(
    "corrupt",
    [
        corrupt_truncate,
        corrupt_array_byte,
        corrupt_magic,
        corrupt_version,
        corrupt_header,
        corrupt_huge_header,
        corrupt_empty,
    ],
)
def test_corrupt_index_is_ignored_and_rebuilt(tmp_path: Path, corrupt: object) -> None:
    pages = make_pages(9, 80)
    dump_path = write_raw_image(tmp_path / "vm.raw", pages)
    index = load_or_build(dump_path, index_dir=tmp_path / "cache")
    assert index.path is not None
    index.path.write_bytes(corrupt(index.path.read_bytes()))  # type: ignore[operator]
    again = load_or_build(dump_path, index_dir=tmp_path / "cache")
    assert not again.loaded
    assert again.hashes.tolist() == expected_hashes(pages)
    assert load_or_build(dump_path, index_dir=tmp_path / "cache").loaded  # repaired


def test_a_fifo_by_a_cache_file_name_is_a_cache_miss(tmp_path: Path) -> None:
    """A FIFO where the dump's index would be, or named like a cache file: the index is built
    (and replaces it), prune removes it; neither waits for a writer that never comes."""
    dump_path = write_raw_image(tmp_path / "vm.raw", make_pages(14, 20))
    cache = tmp_path / "cache"
    cache.mkdir()
    os.mkfifo(index_path_for(dump_path, OpenOptions(), cache))
    os.mkfifo(cache / "0123.shr")
    dengine = [str(Path(__file__).resolve().parent.parent / ".venv" / "bin" / "dengine"), "-q", "index"]
    r = subprocess.run(
        [*dengine, "--index-dir", str(cache), str(dump_path)], capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 0, r.stderr
    assert "\tbuilt\t" in r.stdout
    assert os.path.isfile(index_path_for(dump_path, OpenOptions(), cache))
    r = subprocess.run(
        [*dengine, "--prune", "--index-dir", str(cache)], capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in cache.iterdir()) == [index_path_for(dump_path, OpenOptions(), cache).name]


def test_index_of_another_dump_under_this_name_is_not_trusted(tmp_path: Path) -> None:
    a = write_raw_image(tmp_path / "a.raw", make_pages(10, 32))
    b = write_raw_image(tmp_path / "b.raw", make_pages(11, 32))
    index_a = load_or_build(a, index_dir=tmp_path)
    assert index_a.path is not None
    os.replace(index_a.path, index_path_for(b, OpenOptions(), tmp_path))
    index_b = load_or_build(b, index_dir=tmp_path)
    assert not index_b.loaded
    assert index_b.hashes.tolist() == expected_hashes(make_pages(11, 32))


def test_atomic_write_leaves_no_temp_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    dump_path = write_raw_image(tmp_path / "vm.raw", make_pages(12, 40))
    cache = tmp_path / "cache"
    load_or_build(dump_path, index_dir=cache)
    assert [p.suffix for p in cache.iterdir()] == [".idx"]

    # A failure at the rename: nothing half-written stays behind, and the index still comes back.
    other = write_raw_image(tmp_path / "other.raw", make_pages(13, 40))

    def fail(src: str, dst: str) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", fail)
    index = load_or_build(other, index_dir=cache)
    assert index.path is None and not index.loaded
    assert index.hashes.tolist() == expected_hashes(make_pages(13, 40))
    assert len(list(cache.iterdir())) == 1


def test_unwritable_cache_directory_is_not_an_error(tmp_path: Path) -> None:
    dump_path = write_raw_image(tmp_path / "vm.raw", make_pages(14, 24))
    blocker = tmp_path / "not-a-dir"
    blocker.write_bytes(b"")
    index = load_or_build(dump_path, index_dir=blocker / "index")
    assert index.path is None and index.page_count == 24


def test_default_cache_directory(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_index_dir() == tmp_path / "xdg" / "dengine" / "index"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_index_dir() == tmp_path / "home" / ".cache" / "dengine" / "index"
    dump_path = write_raw_image(tmp_path / "vm.raw", make_pages(15, 8))
    assert index_path_for(dump_path).parent == default_index_dir()


def test_missing_dump_is_unreadable(tmp_path: Path) -> None:
    with pytest.raises(UnreadableFile) as e:
        load_or_build(tmp_path / "nope.raw", index_dir=tmp_path)
    assert e.value.exit_code == 3
    assert str(e.value) == f"{tmp_path / 'nope.raw'}: cannot read: No such file or directory"


def test_index_dump_without_cache(tmp_path: Path) -> None:
    pages = make_pages(16, 70)
    dump = open_raw(Source.of(write_raw_image(tmp_path / "a.raw", pages)), OpenOptions())
    seen: list[tuple[str, int, int]] = []
    index = index_dump(dump, batch_pages=32, on_progress=lambda *a: seen.append(a))
    assert index.hashes.tolist() == expected_hashes(pages)
    assert [s[1] for s in seen] == [32, 64, 70] and seen[-1][2] == 70


# --- several dumps, several processes ----------------------------------------------------------


def test_build_indexes_in_worker_processes(tmp_path: Path) -> None:
    sizes = [700, 90, 300]
    all_pages = [make_pages(20 + k, n) for k, n in enumerate(sizes)]
    paths = [write_raw_image(tmp_path / f"vm{k}.raw", p) for k, p in enumerate(all_pages)]
    cache = tmp_path / "cache"
    load_or_build(paths[1], index_dir=cache)  # one already cached
    seen: dict[str, int] = {}

    def progress(name: str, done: int, total: int) -> None:
        assert done <= total
        seen[name] = done

    # Batches of 16 pages with 4 jobs: the 700-page dump is cut between workers.
    four = Workers(jobs=4, fork_min_bytes=0, range_pages=64)
    indexes = build_indexes(paths, None, cache, four, on_progress=progress, batch_pages=16)
    assert [ix.loaded for ix in indexes] == [False, True, False]
    for ix, pages, path in zip(indexes, all_pages, paths, strict=True):
        assert ix.name == str(path)
        assert ix.hashes.tolist() == expected_hashes(pages)
        assert ix.zero.tolist() == [not p.any() for p in pages]
    assert seen == {str(paths[0]): 700, str(paths[2]): 300}
    assert [ix.loaded for ix in build_indexes(paths, None, cache, four)] == [True] * 3
    assert len(list(cache.iterdir())) == 3


def test_build_indexes_in_one_process(tmp_path: Path) -> None:
    pages = make_pages(30, 100)
    path = write_raw_image(tmp_path / "vm.raw", pages)
    (index,) = build_indexes([path], index_dir=tmp_path / "c", workers=Workers(jobs=1))
    assert not index.loaded and index.hashes.tolist() == expected_hashes(pages)


def test_little_work_is_not_forked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A fork pays only past ``fork_min_bytes`` of dumps to index: small dumps are built here."""
    all_pages = [make_pages(35 + k, 40) for k in range(2)]
    paths = [write_raw_image(tmp_path / f"vm{k}.raw", p) for k, p in enumerate(all_pages)]
    forks: list[int] = []
    fork = os.fork
    monkeypatch.setattr(os, "fork", lambda: forks.append(1) or fork())
    indexes = build_indexes(paths, None, tmp_path / "c", Workers(jobs=2))
    assert forks == []
    for ix, pages in zip(indexes, all_pages, strict=True):
        assert not ix.loaded and ix.hashes.tolist() == expected_hashes(pages)
    build_indexes(paths, None, tmp_path / "d", Workers(jobs=2, fork_min_bytes=0, range_pages=16))
    assert forks == [1]


def test_whole_dumps_built_by_workers(tmp_path: Path) -> None:
    # Compressed containers are hashed whole by one worker, which writes the index itself.
    all_pages = [make_pages(40 + k, 150) for k in range(3)]
    paths = [write_gzip(tmp_path / f"vm{k}.raw.gz", p.tobytes()) for k, p in enumerate(all_pages)]
    seen: dict[str, int] = {}
    indexes = build_indexes(
        paths,
        OpenOptions(format="raw"),
        tmp_path / "c",
        Workers(jobs=2),
        batch_pages=32,
        on_progress=lambda n, d, t: seen.update({n: d}),
    )
    assert [ix.loaded for ix in indexes] == [True] * 3  # mapped from the files workers wrote
    for ix, pages in zip(indexes, all_pages, strict=True):
        assert ix.hashes.tolist() == expected_hashes(pages)
    assert seen == {str(p): 150 for p in paths}


def test_error_in_a_worker_reaches_the_caller(tmp_path: Path) -> None:
    good = write_gzip(tmp_path / "good.raw.gz", make_pages(50, 20).tobytes())
    bad = write_gzip(tmp_path / "bad.raw.gz", b"\1" * 100)
    with pytest.raises(FormatError) as e:
        build_indexes([good, bad], OpenOptions(format="raw"), tmp_path / "c", Workers(jobs=2))
    assert e.value.exit_code == 4
    assert str(e.value) == (
        f"{bad} (decompressed gzip): at offset 0x0: expected at least one 4096-byte page, found 100 bytes"
    )


def test_compressed_dump_is_indexed_whole_by_one_worker(tmp_path: Path) -> None:
    pages = make_pages(60, 200)
    packed = write_gzip(tmp_path / "vm.raw.gz", pages.tobytes())
    plain = write_raw_image(tmp_path / "plain.raw", pages)
    options = OpenOptions(format="raw")
    indexes = build_indexes([packed, plain], options, tmp_path / "c", Workers(jobs=2), batch_pages=16)
    assert not indexes[0].loaded  # built now (by this process: one container is not forked)
    assert indexes[0].name == str(packed)
    assert indexes[0].hashes.tolist() == indexes[1].hashes.tolist() == expected_hashes(pages)


def test_several_dumps_indexed_by_threads_equal_one_at_a_time(tmp_path: Path) -> None:
    """Where no worker is forked, several dumps are indexed by threads of this process: the same
    indexes as building them one by one."""
    rng = np.random.default_rng(11)
    paths = []
    for k in range(3):
        image = np.zeros((300, PAGE_SIZE), dtype=np.uint8)
        image[:: k + 2] = rng.integers(0, 256, (len(image[:: k + 2]), PAGE_SIZE), dtype=np.uint8)
        paths.append(tmp_path / f"t{k}.raw")
        paths[-1].write_bytes(image.tobytes())
    threaded = build_indexes(paths, index_dir=tmp_path / "a", workers=Workers(jobs=2))
    single = build_indexes(paths, index_dir=tmp_path / "b", workers=Workers(jobs=1))
    for x, y in zip(threaded, single, strict=True):
        assert np.array_equal(x.hashes, y.hashes) and np.array_equal(x.zero, y.zero)
        assert np.array_equal(x.gfns, y.gfns)
