"""The plan's codec work: the exact patch and compressed size of every page it may store so.

Measuring every patch and compressed page is most of an exact plan's time (about 30 us of zstd
per page).  zstd, zlib and lz4 let go of the GIL while they encode, so threads of the plan's
process share that work (measured faster than worker processes: nothing forked, no page read
twice, nothing pickled).  bsdiff4 keeps the GIL: a plan using it forks workers, which inherit
the open dumps and return the sizes of each chunk (:func:`~dengine_cli.parallel.fork_map`).
The sizes are the codec's exact sizes either way (the same codec, the same library, the same
pages).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

import numpy as np
import numpy.typing as npt

from dengine_cli.arrays import unique
from dengine_cli.codecs import compression_codec, patch_codec
from dengine_cli.formats.base import Dump
from dengine_cli.pages import PAGE_SIZE, GfnArray, PageArray
from dengine_cli.parallel import Workers, fork_map
from dengine_cli.parallel.forked import MAX_TASKS

#: Pages (or page pairs) measured per chunk by a forked worker, and by a thread.
CHUNK = 1024
THREAD_CHUNK = 256
#: Page pairs read at a time to measure their patches: the pages read (up to 2 a pair), the
#: references and pages in pair order and the codec's work (an XOR) come to 2.5 MiB for 128
#: pairs.  glibc gives memory freed back to the kernel once the free memory at the top of the
#: heap passes twice the largest block it has freed (here 2-4 MiB), so 256 pairs at a time
#: (5 MiB) had every chunk's pages fresh from the kernel, zeroed and faulted in again: 30 k
#: page faults and 60-90 ms of system time over the bench dumps' 19,801 pairs, against 700
#: faults and 20-40 ms at 128 (2026-12-07).
READ_PAIRS = 128
#: Pages read at a time to measure their compression (1 MiB), for the same reason.
READ_PAGES = 256

SizeArray = npt.NDArray[np.int32]
_I64 = npt.NDArray[np.int64]


class HasGfns(Protocol):
    """Anything listing a dump's present gfns in order: the dump itself or its index."""

    @property
    def gfns(self) -> GfnArray: ...


def read_pages(
    dumps: Sequence[Dump], tables: Sequence[HasGfns], vm: _I64, pos: _I64
) -> tuple[PageArray, _I64]:
    """The pages at (vm, position) pairs (positions in ``tables[vm].gfns``): ``(pages, row)``
    with ``pages[row[i]]`` the page of pair i; each distinct page is read once, into one array
    (no second copy)."""
    key = vm * (1 << 40) + pos
    uniq, row = np.unique(key, return_inverse=True)
    out = np.empty((len(uniq), PAGE_SIZE), dtype=np.uint8)
    u_vm = uniq >> 40
    cuts = np.searchsorted(u_vm, np.arange(len(dumps) + 1))
    for v in unique(u_vm).tolist():
        a, b = int(cuts[v]), int(cuts[v + 1])
        out[a:b] = dumps[v].pages_at(np.asarray(tables[v].gfns[uniq[a:b] & ((1 << 40) - 1)], dtype=np.uint64))
    return out, row.astype(np.int64)


def measure_patches(
    dumps: Sequence[Dump],
    tables: Sequence[HasGfns],
    codec_name: str,
    limit: int,
    page_vm: _I64,
    page_pos: _I64,
    ref_vm: _I64,
    ref_pos: _I64,
) -> SizeArray:
    """Patch sizes (``limit`` for any at or above it) of page i against reference i, both given
    as (vm, position); :data:`READ_PAIRS` pairs read at a time."""
    codec = patch_codec(codec_name)
    sizes = np.empty(len(page_vm), dtype=np.int32)
    for lo in range(0, len(page_vm), READ_PAIRS):
        hi = min(lo + READ_PAIRS, len(page_vm))
        n = hi - lo
        both, row = read_pages(
            dumps,
            tables,
            np.concatenate((page_vm[lo:hi], ref_vm[lo:hi])),
            np.concatenate((page_pos[lo:hi], ref_pos[lo:hi])),
        )
        sizes[lo:hi] = codec.patch_sizes(both[row[n:]], both[row[:n]], limit=limit)
    return sizes


def measure_compression(
    dumps: Sequence[Dump], tables: Sequence[HasGfns], codec_name: str, vm: _I64, pos: _I64
) -> SizeArray:
    """Compressed sizes of the pages at (vm, position); :data:`READ_PAGES` pages read at a time."""
    codec = compression_codec(codec_name)
    sizes = np.empty(len(vm), dtype=np.int32)
    for lo in range(0, len(vm), READ_PAGES):
        hi = min(lo + READ_PAGES, len(vm))
        pages, row = read_pages(dumps, tables, vm[lo:hi], pos[lo:hi])
        sizes[lo:hi] = codec.compressed_sizes(pages)[row]
    return sizes


def spread(
    n: int,
    measure: Callable[[int, int], SizeArray],
    releases_gil: bool,
    workers: Workers,
    on_done: Callable[[int], None] | None = None,
    *,
    chunk: int = CHUNK,
    thread_chunk: int = THREAD_CHUNK,
) -> SizeArray:
    """Sizes of items ``0:n``, ``measure(lo, hi)`` measuring ``lo:hi``: by threads of this
    process for a codec that lets go of the GIL (``thread_chunk`` items at a time), else by
    forked processes (``chunk`` items at a time) when there are at least
    ``workers.fork_min_pages`` items, else here.  ``on_done(k)``: k items measured so far
    (called from the calling thread only).  The sizes are the codec's either way."""
    sizes = np.empty(n, dtype=np.int32)
    if releases_gil and workers.count > 1 and n > thread_chunk:
        return _threaded(n, measure, workers, on_done, thread_chunk)
    processes = workers.processes() if n >= workers.fork_min_pages else 1
    if processes > 1:
        step = max(chunk, -(-n // MAX_TASKS))
        starts = list(range(0, n, step))
        done = 0

        def take(k: int, part: SizeArray) -> None:
            nonlocal done
            lo = starts[k]
            sizes[lo : lo + len(part)] = part
            done += len(part)
            if on_done is not None:
                on_done(done)

        fork_map(lambda lo: measure(lo, min(lo + step, n)), starts, processes, on_result=take)
        return sizes
    for lo in range(0, n, chunk):
        hi = min(lo + chunk, n)
        sizes[lo:hi] = measure(lo, hi)
        if on_done is not None:
            on_done(hi)
    return sizes


def _threaded(
    n: int,
    measure: Callable[[int, int], SizeArray],
    workers: Workers,
    on_done: Callable[[int], None] | None,
    step: int,
) -> SizeArray:
    """:func:`spread` by threads of this process, ``step`` items at a time."""
    import threading

    sizes = np.empty(n, dtype=np.int32)
    caller = threading.get_ident()
    lock = threading.Lock()
    done = 0

    def one(lo: int) -> None:
        nonlocal done
        hi = min(lo + step, n)
        sizes[lo:hi] = measure(lo, hi)
        with lock:
            done += hi - lo
            count = done
        if on_done is not None and threading.get_ident() == caller:
            on_done(count)

    workers.threads(one, range(0, n, step))
    if on_done is not None:
        on_done(n)
    return sizes


def patch_sizes(
    dumps: Sequence[Dump],
    tables: Sequence[HasGfns],
    codec_name: str,
    limit: int,
    page_vm: _I64,
    page_pos: _I64,
    ref_vm: _I64,
    ref_pos: _I64,
    workers: Workers,
    on_done: Callable[[int], None] | None = None,
) -> SizeArray:
    """:func:`measure_patches` of every pair, spread over ``workers``."""

    def measure(a: int, b: int) -> SizeArray:
        return measure_patches(
            dumps, tables, codec_name, limit, page_vm[a:b], page_pos[a:b], ref_vm[a:b], ref_pos[a:b]
        )

    return spread(len(page_vm), measure, patch_codec(codec_name).releases_gil, workers, on_done)


def compressed_sizes(
    dumps: Sequence[Dump],
    tables: Sequence[HasGfns],
    codec_name: str,
    vm: _I64,
    pos: _I64,
    workers: Workers,
    on_done: Callable[[int], None] | None = None,
) -> SizeArray:
    """:func:`measure_compression` of every page, spread over ``workers``."""

    def measure(a: int, b: int) -> SizeArray:
        return measure_compression(dumps, tables, codec_name, vm[a:b], pos[a:b])

    return spread(len(vm), measure, compression_codec(codec_name).releases_gil, workers, on_done)
