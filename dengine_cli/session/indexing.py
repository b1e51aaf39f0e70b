"""Indexes for the session: loaded from the cache, or built (in forked workers where that pays)
and stored."""

from __future__ import annotations

import contextlib
import itertools
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from dengine_cli.cache.index_store import file_for, index_key, read_index, write_index
from dengine_cli.cache.keys import default_index_dir
from dengine_cli.engine.index import (
    HashArray,
    PageIndex,
    Progress,
    ZeroArray,
    facts_of,
    hash_dump,
    index_dump,
)
from dengine_cli.formats.base import Dump, OpenOptions
from dengine_cli.pages import BATCH_PAGES
from dengine_cli.parallel.threads import map_in_threads

#: With the default ``jobs``, uncompressed dumps are hashed in worker processes only when more than
#: this many bytes need indexing.  One process hashes about 3.5 GB/s, and starting the fork server
#: and its workers (each importing numpy and the readers) cost 0.7-1.3 s on a 2-core machine: below
#: ~8 GiB the pool would finish later than the calling process alone.
POOL_MIN_BYTES = 8 << 30


#: Below this many bytes of dumps to index, forked workers cost more than they save.
FORK_MIN_BYTES = 64 << 20


#: Forked workers by default, however many CPUs: this process forks them one after the other
#: (5-10 ms each), and reading page cache is bound by memory bandwidth long before 8 CPUs.
FORK_MAX_WORKERS = 8


#: Threads that index several dumps at once in this process when no worker pool is started.
INDEX_THREADS = 2


def load_or_build(
    path: Path | str,
    options: OpenOptions | None = None,
    index_dir: Path | str | None = None,
    *,
    batch_pages: int = BATCH_PAGES,
    on_progress: Progress | None = None,
    dump: Dump | None = None,
) -> PageIndex:
    """The index of the dump at ``path``: from the cache when a valid one is there, else built
    (from ``dump`` when the caller has it open, else by opening ``path``) and cached."""
    options = options or OpenOptions()
    key = index_key(path, options)
    file = file_for(key, index_dir)
    cached = read_index(file, key)
    if cached is not None:
        return cached
    if dump is not None:
        index = index_dump(dump, batch_pages=batch_pages, on_progress=on_progress)
    else:
        with _open(path, options) as opened:
            index = index_dump(opened, batch_pages=batch_pages, on_progress=on_progress)
    return _store(index, key, path, options, file)


def build_indexes(
    paths: Sequence[Path | str],
    options: OpenOptions | None = None,
    index_dir: Path | str | None = None,
    jobs: int | None = None,
    on_progress: Progress | None = None,
    *,
    batch_pages: int = BATCH_PAGES,
    keep_open: dict[int, Dump] | None = None,
) -> list[PageIndex]:
    """The indexes of several dumps (in the order given), building the missing ones in up to
    ``jobs`` worker processes (default: one per CPU when there is enough to do, see
    :data:`POOL_MIN_BYTES`, else none: the calling process builds them).

    ``keep_open``: dumps this process opens to build their index are left open there (position
    in ``paths`` -> dump) for the caller to read again and close, instead of being closed: the
    caller then neither parses nor maps them a second time (nor decompresses a container
    again).  Dumps already in it are used as they are.

    When fewer dumps need building than there are workers, each is cut into page ranges hashed
    by different workers (a dump is opened once per range, so compressed containers, which
    would be decompressed once per open, are never cut).  Workers are started by a fork server
    (``multiprocessing`` "forkserver"): a script calling this must guard its entry point with
    ``if __name__ == "__main__"`` (``python -m dengine_cli`` and the ``dengine`` script do).
    """
    options = options or OpenOptions()
    # Resolved here: workers of a fork server may not see the caller's environment as it is now.
    index_dir = Path(index_dir) if index_dir is not None else default_index_dir()
    keys = [index_key(p, options) for p in paths]
    files = [file_for(k, index_dir) for k in keys]
    result: list[PageIndex | None] = [read_index(f, k) for f, k in zip(files, keys, strict=True)]
    todo = [i for i, r in enumerate(result) if r is None]
    if not todo:
        return _all_built(result)
    workers = _fork_workers(paths, todo, jobs)
    if workers > 1:
        forked = _build_forked(
            paths, todo, options, keys, files, workers, batch_pages, on_progress, keep_open
        )
        for i, index in zip(todo, forked, strict=True):
            result[i] = index
        return _all_built(result)
    threads = 1 if jobs is not None else min(len(todo), os.cpu_count() or 1, INDEX_THREADS)
    jobs = max(1, jobs if jobs is not None else _default_jobs([paths[i] for i in todo]))
    # What each worker task does: hash a page range of a dump, or (-1, -1) index a whole dump.
    # Compressed containers are indexed whole by one worker, which decompresses them once.
    tasks: list[tuple[int, int, int]] = []
    plans: dict[int, int] = {}
    for i in todo:
        if jobs == 1 or _is_container(paths[i]):
            tasks.append((i, -1, -1))
            continue
        with _open(paths[i], options) as dump:
            ranges = _cut(dump.page_count, -(-jobs // len(todo)), batch_pages)
        plans[i] = len(ranges)
        tasks.extend((i, lo, hi) for lo, hi in ranges)
    if jobs == 1 or len(tasks) == 1:
        # In this process: a pool would cost more to start than it saves.  Several dumps are
        # indexed by threads: the zero check and the page faults of reading the mapping run
        # without the GIL and overlap (0.63 -> 0.34 s for four 400 MiB dumps on 2 cores).
        def build(i: int) -> PageIndex:
            if keep_open is None:
                return load_or_build(
                    paths[i], options, index_dir, batch_pages=batch_pages, on_progress=on_progress
                )
            dump = keep_open.get(i)
            if dump is None:
                dump = keep_open[i] = _open(paths[i], options)
            return load_or_build(
                paths[i], options, index_dir, batch_pages=batch_pages, on_progress=on_progress, dump=dump
            )

        if any(_is_container(paths[i]) for i in todo):
            threads = 1
        for i, index in zip(todo, map_in_threads(build, todo, threads), strict=True):
            result[i] = index
        return _all_built(result)

    import concurrent.futures
    import multiprocessing

    # Workers come from a fork server: forking the caller itself could deadlock on a lock held
    # by one of its threads (a progress bar's, the pool's own).  Progress travels from workers
    # over a queue as (position in paths, pages hashed, total).
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["dengine_cli.index", "dengine_cli.formats"])
    progress_queue: Any = ctx.Queue()
    with concurrent.futures.ProcessPoolExecutor(
        max_workers=min(jobs, len(tasks)),
        mp_context=ctx,
        initializer=_worker_init,
        initargs=(progress_queue,),
    ) as pool:
        futures: dict[concurrent.futures.Future[Any], tuple[int, int]] = {}
        parts = dict.fromkeys(todo, 0)
        for i, lo, hi in tasks:
            if lo < 0:
                whole = pool.submit(_worker_build, str(paths[i]), options, index_dir, i, batch_pages)
                futures[whole] = (i, -1)
            else:
                piece = pool.submit(_worker_hash, str(paths[i]), options, i, lo, hi, batch_pages)
                futures[piece] = (i, parts[i])
                parts[i] += 1
        progress = _ProgressSum(paths, on_progress)
        pieces: dict[int, dict[int, tuple[HashArray, ZeroArray]]] = {i: {} for i in plans}
        pending = set(futures)
        while pending:
            finished, pending = concurrent.futures.wait(pending, timeout=0.2)
            progress.drain(progress_queue)
            for fut in finished:
                i, part = futures[fut]
                if part < 0:
                    built: PageIndex | Path = fut.result()
                    if isinstance(built, Path):
                        # None only if the dump changed meanwhile: then index it as it is now.
                        built = read_index(built, index_key(paths[i], options)) or load_or_build(
                            paths[i], options, index_dir, batch_pages=batch_pages
                        )
                    result[i] = built
                    continue
                pieces[i][part] = fut.result()
                if len(pieces[i]) == plans[i]:
                    result[i] = _assemble(paths[i], options, keys[i], files[i], pieces.pop(i))
        progress.drain(progress_queue)
    return _all_built(result)


# --- internals -----------------------------------------------------------------------------------


def _open(path: Path | str, options: OpenOptions) -> Dump:
    # Imported here: the registry imports every reader, which index users need only to build.
    from dengine_cli.formats import open_dump

    return open_dump(path, options)


def _fork_workers(paths: Sequence[Path | str], todo: Sequence[int], jobs: int | None) -> int:
    """How many processes (this one and forked ones) should hash the dumps at ``todo``: ``jobs``
    (default: one per CPU, at most :data:`FORK_MAX_WORKERS`) when forking is safe here and pays,
    else 0.  Compressed containers
    are left to the other ways (each is decompressed by the process that opens it)."""
    from dengine_cli.parallel.forked import fork_usable

    workers = jobs if jobs is not None else min(os.cpu_count() or 1, FORK_MAX_WORKERS)
    if workers < 2 or not fork_usable() or any(_is_container(paths[i]) for i in todo):
        return 0
    size = 0
    for i in todo:
        with contextlib.suppress(OSError):
            size += os.stat(paths[i]).st_size
    return workers if size >= FORK_MIN_BYTES else 0


def _build_forked(
    paths: Sequence[Path | str],
    todo: Sequence[int],
    options: OpenOptions,
    keys: Sequence[dict[str, Any]],
    files: Sequence[Path],
    workers: int,
    batch_pages: int,
    on_progress: Progress | None,
    keep_open: dict[int, Dump] | None,
) -> list[PageIndex]:
    """Index the dumps at ``todo`` with ``workers`` processes (:mod:`dengine_cli.workers`) and
    cache the indexes; dumps opened here go to ``keep_open`` when given."""
    from dengine_cli.parallel.forked import hash_forked

    opened: dict[int, Dump] = {}
    dumps: list[Dump] = []
    try:
        for i in todo:
            dump = keep_open.get(i) if keep_open is not None else None
            if dump is None:
                dump = opened[i] = _open(paths[i], options)
            dumps.append(dump)

        def hash_range(
            dump: Dump, lo: int, hi: int, on_pages: Callable[[int], None]
        ) -> tuple[HashArray, ZeroArray]:
            return hash_dump(dump, lo, hi, batch_pages=batch_pages, on_pages=on_pages)

        hashed = hash_forked(dumps, workers, hash_range, on_progress=on_progress, batch_pages=batch_pages)
        built = []
        for i, dump, (hashes, zero) in zip(todo, dumps, hashed, strict=True):
            index = PageIndex(dump.name, dump.gfns, hashes, zero, facts_of(dump))
            built.append(_store(index, keys[i], paths[i], options, files[i]))
        return built
    finally:
        for i, dump in opened.items():
            if keep_open is not None:
                keep_open[i] = dump
            else:
                dump.close()


def _default_jobs(paths: Sequence[Path | str]) -> int:
    """One worker per CPU when the pool pays for its start-up: several compressed containers
    (each decompressed by one worker, far slower than hashing) or more than
    :data:`POOL_MIN_BYTES` of dumps; else 1 (no pool)."""
    cpus = os.cpu_count() or 1
    if cpus == 1:
        return 1
    containers = sum(1 for p in paths if _is_container(p))
    size = 0
    for p in paths:
        with contextlib.suppress(OSError):
            size += os.stat(p).st_size
    return cpus if containers >= 2 or size > POOL_MIN_BYTES else 1


def _is_container(path: Path | str) -> bool:
    from dengine_cli.formats import container
    from dengine_cli.formats.base import read_head
    from dengine_cli.formats.registry import PROBE_BYTES

    return container.detect(read_head(Path(path), str(path), PROBE_BYTES)) is not None


def _all_built(result: list[PageIndex | None]) -> list[PageIndex]:
    done = [r for r in result if r is not None]
    if len(done) != len(result):
        raise RuntimeError("an index was neither loaded nor built")
    return done


def _cut(n: int, parts: int, batch_pages: int) -> list[tuple[int, int]]:
    """``parts`` page ranges covering ``0:n``, none shorter than a few batches (below that the
    cost of opening the dump again in a worker is not repaid)."""
    parts = max(1, min(parts, n // (4 * batch_pages)))
    bounds = [n * k // parts for k in range(parts + 1)]
    return list(itertools.pairwise(bounds))


def _store(
    index: PageIndex, key: dict[str, Any], path: Path | str, options: OpenOptions, file: Path
) -> PageIndex:
    # A dump rewritten while it was being read must not be cached under the old key.
    if index_key(path, options) != key or not write_index(index, key, file):
        return index
    return PageIndex(index.name, index.gfns, index.hashes, index.zero, index.facts, path=file, key=key)


def _assemble(
    path: Path | str,
    options: OpenOptions,
    key: dict[str, Any],
    file: Path,
    pieces: dict[int, tuple[HashArray, ZeroArray]],
) -> PageIndex:
    with _open(path, options) as dump:
        hashes = np.concatenate([pieces[k][0] for k in sorted(pieces)])
        zero = np.concatenate([pieces[k][1] for k in sorted(pieces)])
        if len(hashes) != dump.page_count:
            raise ValueError(f"{dump.name}: hashed {len(hashes)} pages, dump has {dump.page_count}")
        index = PageIndex(dump.name, dump.gfns, hashes, zero, facts_of(dump))
    return _store(index, key, path, options, file)


class _ProgressSum:
    """Adds up the page counts workers report and passes the running totals on."""

    def __init__(self, paths: Sequence[Path | str], on_progress: Progress | None) -> None:
        self.paths = paths
        self.on_progress = on_progress
        self.done: dict[int, int] = {}

    def drain(self, progress_queue: Any) -> None:
        import queue

        while True:
            try:
                i, k, total = progress_queue.get_nowait()
            except queue.Empty:
                return
            self.done[i] = self.done.get(i, 0) + k
            if self.on_progress is not None:
                self.on_progress(str(self.paths[i]), self.done[i], total)


_worker_queue: Any = None


def _worker_init(progress_queue: Any) -> None:
    global _worker_queue
    _worker_queue = progress_queue


def _worker_hash(
    path: str, options: OpenOptions, position: int, lo: int, hi: int, batch_pages: int
) -> tuple[HashArray, ZeroArray]:
    with _open(path, options) as dump:
        total = dump.page_count

        def step(k: int) -> None:
            if _worker_queue is not None:
                _worker_queue.put((position, k, total))

        return hash_dump(dump, lo, hi, batch_pages=batch_pages, on_pages=step)


def _worker_build(
    path: str, options: OpenOptions, index_dir: Path | str | None, position: int, batch_pages: int
) -> PageIndex | Path:
    """Build and cache one whole index; its cache file when written (the parent maps it rather
    than receiving the arrays through a pipe), else the index itself."""

    reported = 0

    def step(name: str, done: int, total: int) -> None:
        nonlocal reported
        if _worker_queue is not None:
            _worker_queue.put((position, done - reported, total))
        reported = done

    index = load_or_build(path, options, index_dir, batch_pages=batch_pages, on_progress=step)
    return index.path if index.path is not None else index
