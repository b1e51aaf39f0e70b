"""``Dump.scan``: the one-pass read of every page (into a reused buffer where the pages lie back to
back in the file) gives exactly what ``Dump.batches`` gives, and never reads a file that is not
the one mapped; and the small thread helper it is used with."""

from __future__ import annotations

import os
import random
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dengine_cli.errors import UnreadableFile
from dengine_cli.formats import open_dump
from dengine_cli.formats.base import SCAN_PAGES, Dump, OpenOptions, PageBatch, PageTableDump, Source, map_file
from dengine_cli.formats.raw import open_raw
from dengine_cli.pages import PAGE_SIZE
from dengine_cli.parallel.threads import map_in_threads, stream_in_threads
from tests.vms import write_raw_image


def collect(batches: Iterator[PageBatch]) -> tuple[np.ndarray, np.ndarray]:
    """(gfns, pages) of every batch, copied as they come (scan reuses its buffer)."""
    gfns, pages = [], []
    for b in batches:
        gfns.append(np.array(b.gfns))
        pages.append(np.array(b.pages))
    return np.concatenate(gfns), np.concatenate(pages)


def same_as_batches(dump: Dump, max_pages: int, start: int = 0, stop: int | None = None) -> None:
    g1, p1 = collect(dump.scan(max_pages, start=start, stop=stop))
    g2, p2 = collect(dump.batches(max_pages, start=start, stop=stop))
    assert g1.tolist() == g2.tolist()
    assert np.array_equal(p1, p2)


@pytest.mark.parametrize("name", ["alpha.elf", "beta.elf"])
def test_scan_reads_what_batches_read_on_real_dumps(real_dump: Callable[[str], Path], name: str) -> None:
    with open_dump(real_dump(name)) as dump:
        # Whole, in small batches (more than one buffer per run), and a range cut mid-run.
        same_as_batches(dump, 16384)
        same_as_batches(dump, SCAN_PAGES + 7)
        n = dump.page_count
        same_as_batches(dump, 300, start=n // 3 + 5, stop=n - 17)
        # It really reads the file: consecutive batches of a long run are one reused buffer,
        # not views of the mapping at different addresses.
        addresses = [b.pages.ctypes.data for b in dump.scan(64)][:2]
        assert len(addresses) == 2 and addresses[0] == addresses[1]
        views = [b.pages.ctypes.data for b in dump.batches(64)][:2]
        assert views[0] != views[1]


def test_scan_of_raw_image_starting_inside_the_file(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    pages = rng.integers(0, 256, (40, PAGE_SIZE), dtype=np.uint8)
    path = tmp_path / "vm.raw"
    path.write_bytes(b"\xaa" * 3 * PAGE_SIZE + pages.tobytes())
    with open_raw(Source(path, str(path), 3 * PAGE_SIZE), OpenOptions()) as dump:
        _, got = collect(dump.scan(16))
        assert np.array_equal(got, pages)


def test_scan_never_reads_a_file_put_in_place_of_the_mapped_one(tmp_path: Path) -> None:
    old = np.full((20, PAGE_SIZE), 1, dtype=np.uint8)
    new = np.full((20, PAGE_SIZE), 2, dtype=np.uint8)
    path = tmp_path / "vm.raw"
    write_raw_image(path, old)
    with open_dump(path) as dump:
        replacement = tmp_path / "other.raw"
        write_raw_image(replacement, new)
        os.replace(replacement, path)  # same path and size, another file
        _, got = collect(dump.scan(8))
        assert np.array_equal(got, old)  # what the mapping holds, as batches() reads it


def test_scan_after_the_file_is_gone_reads_the_mapping(tmp_path: Path) -> None:
    old = np.arange(20 * PAGE_SIZE, dtype=np.uint64).astype(np.uint8).reshape(20, PAGE_SIZE)
    path = tmp_path / "vm.raw"
    write_raw_image(path, old)
    with open_dump(path) as dump:
        path.unlink()
        _, got = collect(dump.scan(8))
        assert np.array_equal(got, old)


# --- threads -------------------------------------------------------------------------------------


def test_map_in_threads_keeps_order_and_uses_several_threads() -> None:
    seen: set[str] = set()
    barrier = threading.Barrier(2, timeout=10)

    def work(x: int) -> int:
        seen.add(threading.current_thread().name)
        if x < 2:
            barrier.wait()  # both first items run at once, or this times out
        return x * x

    assert map_in_threads(work, list(range(50)), 2) == [x * x for x in range(50)]
    assert len(seen) == 2
    assert map_in_threads(work, [], 4) == []


def test_map_in_threads_raises_the_error_and_stops_taking_items() -> None:
    started: list[int] = []

    def work(x: int) -> int:
        started.append(x)
        if x == 3:
            raise ValueError("bad item 3")
        return x

    with pytest.raises(ValueError, match="bad item 3"):
        map_in_threads(work, list(range(1000)), 2)
    assert 3 in started and len(started) < 1000


def test_stream_in_threads_hands_out_in_order_while_the_caller_works() -> None:
    """Results come in item order whatever order the threads finish in, two threads work at
    once, and the caller's work on one result overlaps the threads' work on the next."""
    barrier = threading.Barrier(2, timeout=10)
    seen: set[str] = set()
    finished: list[int] = []
    rng = random.Random(5)
    delays = [rng.random() * 0.003 for _ in range(60)]

    def work(x: int) -> int:
        seen.add(threading.current_thread().name)
        if x < 2:
            barrier.wait()  # both first items run at once, or this times out
        time.sleep(delays[x])
        finished.append(x)
        return x * x

    got = []
    for x in stream_in_threads(work, list(range(60)), 2):
        if x == 0:
            # While the caller holds the first result, the threads finish the next two.
            deadline = time.monotonic() + 10
            while len(finished) < 3 and time.monotonic() < deadline:
                time.sleep(0.001)
            assert {1, 2} <= set(finished)
        got.append(x)
    assert got == [x * x for x in range(60)]
    assert len(seen) == 2 and threading.current_thread().name not in seen
    assert list(stream_in_threads(work, [], 3)) == []
    assert list(stream_in_threads(lambda x: x + 1, [1, 2, 3], 1)) == [2, 3, 4]


@pytest.mark.parametrize("threads, ahead", [(2, 0), (2, 1), (3, 2)])
def test_stream_in_threads_starts_no_more_than_its_window(threads: int, ahead: int) -> None:
    """At most ``threads + ahead`` items are started and not yet consumed: the memory their
    results hold is bounded however slow the caller is."""
    lock = threading.Lock()
    started = 0
    most = 0
    consumed = 0

    def work(x: int) -> int:
        nonlocal started, most
        with lock:
            started += 1
            most = max(most, started - consumed)
        return x

    for x in stream_in_threads(work, list(range(40)), threads, ahead=ahead):
        time.sleep(0.002)  # a slow caller: the threads would run ahead if they could
        with lock:
            consumed = x + 1
    assert most <= threads + ahead
    assert most >= 2  # and the threads did work ahead of the caller


def test_stream_in_threads_raises_in_order_and_stops_its_threads() -> None:
    """An error is raised where its item's result would have come, after the results before it;
    a caller that stops early leaves no thread running."""
    started: list[int] = []

    def work(x: int) -> int:
        started.append(x)
        if x == 7:
            raise ValueError("bad item 7")
        return x

    before = threading.active_count()
    got: list[int] = []
    with pytest.raises(ValueError, match="bad item 7"):
        for x in stream_in_threads(work, list(range(1000)), 2):
            got.append(x)
    assert got == list(range(7))
    assert len(started) < 1000
    assert threading.active_count() == before
    stream = stream_in_threads(lambda x: x, list(range(1000)), 2)
    assert next(stream) == 0
    stream.close()
    assert threading.active_count() == before


def test_a_dump_that_shrinks_while_scanned_is_an_error_not_a_crash(tmp_path: Path) -> None:
    pages = np.full((40, PAGE_SIZE), 3, dtype=np.uint8)
    path = write_raw_image(tmp_path / "vm.raw", pages)
    with open_dump(path) as dump:
        batches = dump.scan(8)
        next(batches)
        os.truncate(path, 20 * PAGE_SIZE)  # while the scan holds the file open
        with pytest.raises(UnreadableFile) as err:
            for _ in batches:
                pass
    # Seen before the next batch is read (a stat per batch), as the mapping would be touched.
    assert str(err.value) == (
        f"{path}: cannot read: it changed while being read (163840 bytes then, 81920 now)"
    )
    assert err.value.exit_code == 3


@given(st.integers(1, 300), st.integers(0, 3), st.integers(0, 2**32 - 1))
@settings(max_examples=25, deadline=None)
def test_a_raw_image_reads_as_the_general_page_table_reads_it(
    pages: int, start_pages: int, seed: int
) -> None:
    """Raw images are opened without the general page table's checks (``PageTableDump.flat``):
    the same gfns, offsets, runs and pages as a page table built the general way."""
    import tempfile

    rng = np.random.default_rng(seed)
    data = rng.integers(0, 256, (start_pages + pages) * PAGE_SIZE, dtype=np.uint8)
    data[PAGE_SIZE * int(rng.integers(0, pages + start_pages)) :][:PAGE_SIZE] = 0
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "x.raw"
        path.write_bytes(data.tobytes())
        start = start_pages * PAGE_SIZE
        source = Source(path, "x.raw", start=start)
        flat = open_raw(source, OpenOptions())
        n = pages
        general = PageTableDump(
            source,
            flat.facts,
            map_file(source)[start:],
            np.arange(n, dtype=np.uint64),
            np.arange(n, dtype=np.int64) * PAGE_SIZE,
            file_offset=start,
        )
        assert isinstance(flat, PageTableDump)
        assert np.array_equal(flat.gfns, general.gfns) and np.array_equal(flat.offsets, general.offsets)
        assert np.array_equal(flat._run_starts, general._run_starts)
        assert np.array_equal(flat._long_starts, general._long_starts)
        got = [(b.gfns.copy(), b.pages.copy()) for b in flat.batches(97)]
        want = [(b.gfns.copy(), b.pages.copy()) for b in general.batches(97)]
        assert all(np.array_equal(g, w) for (g, _), (w, _) in zip(got, want, strict=True))
        assert all(np.array_equal(g, w) for (_, g), (_, w) in zip(got, want, strict=True))
        pick = rng.integers(0, n, 20).astype(np.int64)
        assert np.array_equal(flat.pages_at(flat.gfns[pick]), general.pages_at(general.gfns[pick]))
        assert np.array_equal(flat.pages_at(flat.gfns[pick]), data[start:].reshape(-1, PAGE_SIZE)[pick])
        flat.close()
        general.close()
