"""The plan's codec work (patch and compressed sizes), shared by threads or with one worker
process.

Measuring every patch and compressed page is most of an exact plan's time (about 30 us of zstd
per page).  zstd, zlib and lz4 let go of the GIL while they encode, so threads of the plan's
process share that work (:func:`share_out` with ``threads``; measured faster than a worker
process: nothing forked, no page read twice, nothing pickled).  bsdiff4 keeps the GIL; a plan
using it shares the work with a second process instead.

The plan's process and one :class:`CodecWorker` share each list of pages from both ends: the
plan's process measures chunks from the front, the worker from the back (at most
:data:`IN_FLIGHT` chunks queued for it), until they meet.  A slow worker (a loaded machine, a
late start) just takes fewer chunks: nobody waits for it except for its last chunks.  The sizes
are the codec's exact sizes either way (the same codec, the same library, the same pages).

The worker receives only the dump paths, the open options and, per chunk, the VM and positions
of the pages it must read; it opens the dumps itself (once) and reads the pages with
:meth:`~dengine_cli.formats.base.Dump.pages_at`.  So it is never used for compressed containers
(a second open would decompress the whole file again).  Errors in the worker (a
:class:`~dengine_cli.errors.DengineError` pickles) are raised in the caller as they are.

The worker is a fork of the plan's process when that process runs a single thread (as the CLI
does): made when the plan first has work for it, it inherits the open dumps and the imported
codecs and is ready in about 10 ms.  Elsewhere (a caller running other threads, where a fork
could copy a lock another thread holds) it is spawned.  Start-up of a spawned worker, measured
on the 2-core test machine (1.5 GiB of dumps, load 1-2): the "spawn" method returns at once and
the worker is ready (numpy, the codecs and the readers imported, four dumps opened) 0.5 s later;
"forkserver" first blocks the caller 0.4-0.56 s to start its server.  So a spawned worker is
started as early as possible (before sharing), and the plan decides later, when it knows how
many pages it will measure, whether to give it any work (:data:`MIN_PAGES`).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import numpy.typing as npt

from dengine_cli.arrays import unique
from dengine_cli.errors import UnreadableFile
from dengine_cli.formats.base import Dump, OpenOptions
from dengine_cli.pages import PAGE_SIZE, GfnArray, PageArray

if TYPE_CHECKING:
    # Imported at run time only where a worker is made or used: with multiprocessing they cost
    # 16 ms, which a plan that measures everything itself need not pay.
    import concurrent.futures

#: Below this many pages to measure (about 0.5 s of zstd-1), the worker is not given any: the
#: chunks it would take do not repay its start-up (about 0.5 s of CPU) and the slow-down of the
#: plan's process while it starts (the two CPUs of the test machine slow each other by 10-30 %).
MIN_PAGES = 16384
#: The same for a forked worker, ready in about 10 ms: enough for it to take a few chunks.
FORK_MIN_PAGES = 4096
#: Threads that measure pages when no worker process does (codecs that let go of the GIL:
#: 1.4-1.8x on 2 CPUs), and the pages each takes at a time.
CODEC_THREADS = min(2, os.cpu_count() or 1)
THREAD_CHUNK = 256
#: Pages (or page pairs) measured per chunk, by either process.
CHUNK = 1024
#: Chunks queued for the worker at a time: one being measured and one waiting, so that it never
#: idles between chunks and the plan's process waits for at most two chunks at the end.
IN_FLIGHT = 2

SizeArray = npt.NDArray[np.int32]
_I64 = npt.NDArray[np.int64]
Progress = Callable[[str, int, int], None]


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
    as (vm, position)."""
    from dengine_cli.codecs import patch_codec

    n = len(page_vm)
    both, row = read_pages(
        dumps, tables, np.concatenate((page_vm, ref_vm)), np.concatenate((page_pos, ref_pos))
    )
    return patch_codec(codec_name).patch_sizes(both[row[n:]], both[row[:n]], limit=limit)


def measure_compression(
    dumps: Sequence[Dump], tables: Sequence[HasGfns], codec_name: str, vm: _I64, pos: _I64
) -> SizeArray:
    """Compressed sizes of the pages at (vm, position)."""
    from dengine_cli.codecs import compression_codec

    pages, row = read_pages(dumps, tables, vm, pos)
    sizes: SizeArray = compression_codec(codec_name).compressed_sizes(pages)[row]
    return sizes


class CodecWorker:
    """One worker process measuring chunks of the plan's patches and compressed pages.  Close it
    (or use it as a context manager).

    Given the caller's open ``dumps`` while the caller runs a single thread, the worker is a
    fork of the caller made when first needed (:meth:`usable`): it inherits the open dumps and
    the imported codecs and is ready in about 10 ms, so it pays for little work
    (:data:`FORK_MIN_PAGES`).  Otherwise it is spawned at once and ready about half a second
    later, having opened the dumps itself; a fork could copy a lock held by another thread."""

    def __init__(
        self,
        paths: Sequence[Path | str],
        options: OpenOptions,
        page_counts: Sequence[int],
        *,
        min_pages: int | None = None,
        wait: bool = False,
        dumps: Sequence[Dump] | None = None,
    ) -> None:
        from dengine_cli.parallel.forked import fork_usable

        self._fork_dumps = list(dumps) if dumps is not None and fork_usable() else None
        #: Fewer pages to measure than this: the worker is not used (:meth:`takes`).
        if min_pages is None:
            min_pages = FORK_MIN_PAGES if self._fork_dumps is not None else MIN_PAGES
        self.min_pages = min_pages
        #: Measurements wait for the worker to be ready rather than start without it (tests).
        self.wait = wait
        self._lost = False
        self._pool: concurrent.futures.ProcessPoolExecutor | None = None
        self._opened: concurrent.futures.Future[None] | None = None
        if self._fork_dumps is None:
            import concurrent.futures
            import multiprocessing

            # "spawn": starting returns at once (see the module docstring).
            ctx = multiprocessing.get_context("spawn")
            self._pool = concurrent.futures.ProcessPoolExecutor(max_workers=1, mp_context=ctx)
            self._opened = self._pool.submit(
                _worker_open, [str(p) for p in paths], options, list(page_counts)
            )

    @property
    def forks(self) -> bool:
        """Whether this worker is (or will be) a fork of the caller."""
        return self._fork_dumps is not None

    def _fork(self) -> bool:
        """Fork the worker now, if this process still runs a single thread."""
        from dengine_cli.parallel.forked import fork_usable

        if self._fork_dumps is None or not fork_usable():
            return False
        import concurrent.futures
        import multiprocessing

        _dumps[:] = self._fork_dumps  # what the child inherits
        ctx = multiprocessing.get_context("fork")
        self._pool = concurrent.futures.ProcessPoolExecutor(max_workers=1, mp_context=ctx)
        self._opened = self._pool.submit(_worker_forked)
        return True

    def usable(self) -> bool:
        """Whether chunks can be handed to the worker now: it has opened the dumps (with
        :attr:`wait`, this waits for it).  Raises the error the worker met opening them; a worker
        that died is never usable again (its chunks are measured by the caller)."""
        if self._lost:
            return False
        if self._opened is None and not self._fork():
            self._lost = True
            return False
        assert self._opened is not None
        if not (self.wait or self.forks or self._opened.done()):
            return False
        import concurrent.futures

        try:
            self._opened.result()
        except concurrent.futures.BrokenExecutor:
            self._lost = True
        return not self._lost

    def lost(self) -> None:
        """Record that the worker died: nothing more is handed to it."""
        self._lost = True

    def takes(self, pages: int) -> bool:
        """Whether measuring ``pages`` pages is enough work to share with the worker."""
        return pages >= self.min_pages

    def close(self) -> None:
        """Stop the worker without waiting for it to exit (it has nothing left to do)."""
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
        if self._fork_dumps is not None:
            _dumps.clear()

    def __enter__(self) -> CodecWorker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def submit(self, fn: Callable[..., SizeArray], *args: Any) -> concurrent.futures.Future[SizeArray]:
        """Run ``fn(*args)`` in the worker (a function of this module's worker side); only once
        :meth:`usable` said so."""
        if self._pool is None:
            raise RuntimeError("the codec worker is not started: ask usable() first")
        return self._pool.submit(fn, *args)


def share_out(
    n: int,
    local: Callable[[int, int], SizeArray],
    remote: Callable[[int, int], concurrent.futures.Future[SizeArray]] | None,
    worker: CodecWorker | None,
    on_done: Callable[[int], None] | None = None,
    threads: int = 1,
) -> SizeArray:
    """Sizes of items ``0:n``: ``local(lo, hi)`` measures ``lo:hi`` here, from the front;
    ``remote(lo, hi)`` hands ``lo:hi`` to ``worker``, from the back, once it is ready.  Without a
    worker, ``threads`` threads of this process measure (for codecs that let go of the GIL).
    ``on_done(k)``: k items were measured so far (called from the calling thread only)."""
    if worker is None and threads > 1 and n > THREAD_CHUNK:
        return _threaded(n, local, threads, on_done)
    if worker is not None:
        import concurrent.futures
    sizes = np.empty(n, dtype=np.int32)
    lo, hi = 0, n
    queued: dict[concurrent.futures.Future[SizeArray], tuple[int, int]] = {}
    done = 0

    def collect(block: bool) -> None:
        nonlocal done
        finished = list(queued) if block else [f for f in queued if f.done()]
        for fut in finished:
            a, b = queued.pop(fut)
            try:
                sizes[a:b] = fut.result()
            except concurrent.futures.BrokenExecutor:
                # The worker died (killed, out of memory): its chunks are measured here.
                assert worker is not None
                worker.lost()
                sizes[a:b] = local(a, b)
            done += b - a
            if on_done is not None:
                on_done(done)

    while lo < hi:
        if remote is not None and worker is not None and worker.usable():
            while len(queued) < IN_FLIGHT and hi - lo > CHUNK:
                a = hi - CHUNK
                try:
                    queued[remote(a, hi)] = (a, hi)
                except concurrent.futures.BrokenExecutor:
                    worker.lost()
                    break
                hi = a
        b = min(lo + CHUNK, hi)
        sizes[lo:b] = local(lo, b)
        done += b - lo
        lo = b
        if on_done is not None:
            on_done(done)
        collect(block=False)
    collect(block=True)
    return sizes


def _threaded(
    n: int, local: Callable[[int, int], SizeArray], threads: int, on_done: Callable[[int], None] | None
) -> SizeArray:
    """:func:`share_out` by ``threads`` threads of this process, chunk by chunk."""
    import threading

    from dengine_cli.parallel.threads import map_in_threads

    sizes = np.empty(n, dtype=np.int32)
    caller = threading.get_ident()
    lock = threading.Lock()
    done = 0

    def measure(lo: int) -> None:
        nonlocal done
        hi = min(lo + THREAD_CHUNK, n)
        sizes[lo:hi] = local(lo, hi)
        with lock:
            done += hi - lo
            count = done
        if on_done is not None and threading.get_ident() == caller:
            on_done(count)

    map_in_threads(measure, range(0, n, THREAD_CHUNK), threads)
    if on_done is not None:
        on_done(n)
    return sizes


def _threads_for(codec: Any) -> int:
    """Threads that measure with ``codec`` when there is no worker process."""
    return CODEC_THREADS if codec.releases_gil else 1


def patch_sizes(
    dumps: Sequence[Dump],
    tables: Sequence[HasGfns],
    codec_name: str,
    limit: int,
    page_vm: _I64,
    page_pos: _I64,
    ref_vm: _I64,
    ref_pos: _I64,
    worker: CodecWorker | None = None,
    on_done: Callable[[int], None] | None = None,
) -> SizeArray:
    """:func:`measure_patches` of every pair, shared with ``worker`` when there is one."""

    def local(a: int, b: int) -> SizeArray:
        return measure_patches(
            dumps, tables, codec_name, limit, page_vm[a:b], page_pos[a:b], ref_vm[a:b], ref_pos[a:b]
        )

    def remote(a: int, b: int) -> concurrent.futures.Future[SizeArray]:
        assert worker is not None
        return worker.submit(
            _worker_patches, codec_name, limit, page_vm[a:b], page_pos[a:b], ref_vm[a:b], ref_pos[a:b]
        )

    from dengine_cli.codecs import patch_codec

    return share_out(len(page_vm), local, remote, worker, on_done, _threads_for(patch_codec(codec_name)))


def compressed_sizes(
    dumps: Sequence[Dump],
    tables: Sequence[HasGfns],
    codec_name: str,
    vm: _I64,
    pos: _I64,
    worker: CodecWorker | None = None,
    on_done: Callable[[int], None] | None = None,
) -> SizeArray:
    """:func:`measure_compression` of every page, shared with ``worker`` when there is one."""

    def local(a: int, b: int) -> SizeArray:
        return measure_compression(dumps, tables, codec_name, vm[a:b], pos[a:b])

    def remote(a: int, b: int) -> concurrent.futures.Future[SizeArray]:
        assert worker is not None
        return worker.submit(_worker_compression, codec_name, vm[a:b], pos[a:b])

    from dengine_cli.codecs import compression_codec

    return share_out(len(vm), local, remote, worker, on_done, _threads_for(compression_codec(codec_name)))


def worker_pays(dumps: Sequence[Dump], jobs: int | None) -> bool:
    """Whether a worker may be started for these dumps: more than one CPU, ``jobs`` not 1, and
    no compressed container among them."""
    if jobs == 1 or (os.cpu_count() or 1) < 2:
        return False
    return all(dump.source.origin is None for dump in dumps)


# --- in the worker ------------------------------------------------------------------------------

_dumps: list[Dump] = []


def _worker_open(paths: list[str], options: OpenOptions, page_counts: list[int]) -> None:
    # The codecs are imported now, while the plan's process is still sharing, not by the first
    # chunk.
    import dengine_cli.codecs  # noqa: F401
    from dengine_cli.formats import open_dump

    for path, count in zip(paths, page_counts, strict=True):
        dump = open_dump(path, options)
        _dumps.append(dump)
        if dump.page_count != count:
            raise UnreadableFile(path, f"changed while being planned ({count} pages, now {dump.page_count})")


def _worker_forked() -> None:
    """Nothing to do: a forked worker has the caller's open dumps in ``_dumps`` already."""


def _worker_patches(
    codec_name: str, limit: int, page_vm: _I64, page_pos: _I64, ref_vm: _I64, ref_pos: _I64
) -> SizeArray:
    return measure_patches(_dumps, _dumps, codec_name, limit, page_vm, page_pos, ref_vm, ref_pos)


def _worker_compression(codec_name: str, vm: _I64, pos: _I64) -> SizeArray:
    return measure_compression(_dumps, _dumps, codec_name, vm, pos)
