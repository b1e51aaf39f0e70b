"""Indexes for the session: loaded from the cache, or built and stored.

Dumps are indexed a group at a time, a group being as many dumps as fit in the memory the session
may use (25 bytes a page while they are hashed); each index is written to the cache as soon as it
is built and then read back mapped, so that what stays in this process's memory is bounded by one
group, whatever the fleet.  Within a group, pages are hashed by this process and forked workers
(:func:`~dengine_cli.parallel.forked.hash_forked`) when forking is safe and pays, else by threads
of this process, one dump each.  Compressed containers are opened (decompressed) by forked workers
too, one container each, which store their index for this process to read.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from dengine_cli.arrays import consecutive_groups
from dengine_cli.cache.index_store import BYTES_PER_PAGE, file_for, index_key, read_index, write_index
from dengine_cli.cache.keys import default_index_dir
from dengine_cli.cache.prune import drop_superseded
from dengine_cli.engine.index import Hashed, PageIndex, Progress, facts_of, hash_dump, index_dump
from dengine_cli.formats.base import Dump, OpenOptions
from dengine_cli.pages import BATCH_PAGES
from dengine_cli.parallel import Workers
from dengine_cli.parallel.forked import hash_forked

#: Threads that index several dumps at once in this process when no worker is forked: the zero
#: check and the reads run without the GIL and overlap (0.63 -> 0.34 s for four 400 MiB dumps).
INDEX_THREADS = 2


class IndexBuild:
    """What building indexes needs to know: where the cache is, how dumps are opened, who works,
    and how many pages may be hashed at once (``group_pages``)."""

    def __init__(
        self,
        options: OpenOptions | None = None,
        index_dir: Path | str | None = None,
        workers: Workers | None = None,
        *,
        batch_pages: int = BATCH_PAGES,
        group_pages: int | None = None,
        on_progress: Progress | None = None,
        on_kept: Callable[[dict[int, Dump]], None] | None = None,
    ) -> None:
        self.options = options or OpenOptions()
        self.index_dir = Path(index_dir) if index_dir is not None else default_index_dir()
        self.workers = workers or Workers()
        self.batch_pages = batch_pages
        self.group_pages = group_pages
        self.on_progress = on_progress
        #: Called with the dumps kept open so far before each group but the first: their page
        #: tables were half of the last group's memory (``INDEX_BYTES_PER_PAGE`` of session.memory), which the
        #: next group needs (the session moves them to mapped files).
        self.on_kept = on_kept

    def indexes(
        self, paths: Sequence[Path | str], keep_open: dict[int, Dump] | None = None
    ) -> list[PageIndex]:
        """The indexes of the dumps at ``paths``, in order: cached ones read, the others built.

        ``keep_open``: dumps this process opens to build their index are left open there
        (position in ``paths`` -> dump) for the caller to read and close; dumps already in it
        are used as they are."""
        keys = [index_key(p, self.options) for p in paths]
        files = [file_for(k, self.index_dir) for k in keys]
        result: list[PageIndex | None] = [
            read_index(f, k, str(p)) for f, k, p in zip(files, keys, paths, strict=True)
        ]
        todo = [i for i, r in enumerate(result) if r is None]
        containers = [
            i for i in todo if (keep_open is None or i not in keep_open) and _is_container(paths[i])
        ]
        if containers:
            for i, index in zip(containers, self._containers(paths, containers, keep_open), strict=True):
                result[i] = index
        plain = [i for i in todo if i not in containers]
        for k, group in enumerate(self._groups(paths, plain, keep_open)):
            if k and keep_open is not None and self.on_kept is not None:
                self.on_kept(keep_open)
            for i, index in zip(group, self._group(paths, group, keys, files, keep_open), strict=True):
                result[i] = index
        done = [r for r in result if r is not None]
        if len(done) != len(result):
            raise RuntimeError("an index was neither loaded nor built")
        return done

    def _groups(
        self, paths: Sequence[Path | str], todo: Sequence[int], keep_open: dict[int, Dump] | None
    ) -> list[list[int]]:
        """``todo`` cut into runs of dumps whose pages fit ``group_pages`` together (estimated
        from the file sizes; a dump larger than that is a group of its own)."""
        if self.group_pages is None:
            return [list(todo)] if todo else []
        sizes = []
        for i in todo:
            dump = keep_open.get(i) if keep_open is not None else None
            sizes.append(dump.page_count if dump is not None else _file_size(paths[i]) // 4096)
        return [[todo[k] for k in run] for run in consecutive_groups(sizes, self.group_pages)]

    def _group(
        self,
        paths: Sequence[Path | str],
        group: Sequence[int],
        keys: Sequence[dict[str, Any]],
        files: Sequence[Path],
        keep_open: dict[int, Dump] | None,
    ) -> list[PageIndex]:
        processes = self.workers.processes(sum(_file_size(paths[i]) for i in group))
        if processes == 1:
            # Dump by dump (two threads): each is stored, read back mapped and closed before the
            # next is opened, so that at most two page tables and hash arrays are in memory.
            return self.workers.threads(
                lambda i: self._one(paths[i], keys[i], files[i], i, keep_open), group, limit=INDEX_THREADS
            )
        opened: dict[int, Dump] = {}
        try:
            dumps = []
            for i in group:
                dump = keep_open.get(i) if keep_open is not None else None
                if dump is None:
                    dump = opened[i] = _open(paths[i], self.options)
                dumps.append(dump)
            hashed = self._hash_forked(dumps, processes)
            built = []
            for i, dump, (hashes, check, zero) in zip(group, dumps, hashed, strict=True):
                index = PageIndex(dump.name, dump.gfns, hashes, check, zero, facts_of(dump))
                built.append(_store(index, keys[i], paths[i], self.options, files[i]))
            return built
        finally:
            for i, dump in opened.items():
                if keep_open is not None:
                    keep_open[i] = dump
                else:
                    dump.close()

    def _one(
        self, path: Path | str, key: dict[str, Any], file: Path, i: int, keep_open: dict[int, Dump] | None
    ) -> PageIndex:
        """Index one dump in this thread, store it and close the dump (unless kept open)."""
        dump = keep_open.get(i) if keep_open is not None else None
        mine = dump is None
        if dump is None:
            dump = _open(path, self.options)
        try:
            report, total, done = self.on_progress, dump.page_count, 0

            def step(k: int) -> None:
                nonlocal done
                done += k
                if report is not None:
                    report(dump.name, done, total)

            hashes, check, zero = hash_dump(dump, batch_pages=self.batch_pages, on_pages=step)
            index = PageIndex(dump.name, dump.gfns, hashes, check, zero, facts_of(dump))
            return _store(index, key, path, self.options, file)
        finally:
            if mine and keep_open is not None:
                keep_open[i] = dump
            elif mine:
                dump.close()

    def _hash_forked(self, dumps: Sequence[Dump], processes: int) -> list[Hashed]:
        """``(hashes, check, zero)`` of every page of ``dumps``, by ``processes`` processes."""
        batch = self.batch_pages

        def hash_range(dump: Dump, lo: int, hi: int, on_pages: Callable[[int], None]) -> Hashed:
            return hash_dump(dump, lo, hi, batch_pages=batch, on_pages=on_pages)

        return hash_forked(
            dumps,
            processes,
            hash_range,
            on_progress=self.on_progress,
            batch_pages=batch,
            min_range_pages=self.workers.range_pages,
        )

    def _containers(
        self, paths: Sequence[Path | str], todo: Sequence[int], keep_open: dict[int, Dump] | None
    ) -> list[PageIndex]:
        """Indexes of compressed containers: each decompressed once, by a forked worker when there
        are several (the worker stores the index, this process reads it back), else here."""
        processes = min(self.workers.processes(), len(todo))
        if processes > 1:
            stored = self.workers.forked(
                lambda i: self.load_or_build(paths[i]).path is not None, todo, processes
            )
            indexes: list[PageIndex] = []
            for i, was_stored in zip(todo, stored, strict=True):
                key = index_key(paths[i], self.options)
                found = read_index(file_for(key, self.index_dir), key, str(paths[i])) if was_stored else None
                indexes.append(found or self.load_or_build(paths[i]))
            for i, index in zip(todo, indexes, strict=True):
                if self.on_progress is not None:
                    self.on_progress(str(paths[i]), index.page_count, index.page_count)
            return indexes
        built = []
        for i in todo:
            dump = _open(paths[i], self.options)
            if keep_open is not None:
                keep_open[i] = dump
            try:
                built.append(self.load_or_build(paths[i], dump))
            finally:
                if keep_open is None:
                    dump.close()
        return built

    def load_or_build(self, path: Path | str, dump: Dump | None = None) -> PageIndex:
        """The index of the dump at ``path``: from the cache when a valid one is there, else
        built in this process (from ``dump`` when the caller has it open) and cached."""
        key = index_key(path, self.options)
        file = file_for(key, self.index_dir)
        cached = read_index(file, key, str(path))
        if cached is not None:
            return cached
        if dump is not None:
            index = index_dump(dump, batch_pages=self.batch_pages, on_progress=self.on_progress)
        else:
            with _open(path, self.options) as opened:
                index = index_dump(opened, batch_pages=self.batch_pages, on_progress=self.on_progress)
        return _store(index, key, path, self.options, file)


def build_indexes(
    paths: Sequence[Path | str],
    options: OpenOptions | None = None,
    index_dir: Path | str | None = None,
    workers: Workers | None = None,
    on_progress: Progress | None = None,
    *,
    batch_pages: int = BATCH_PAGES,
    group_pages: int | None = None,
    keep_open: dict[int, Dump] | None = None,
) -> list[PageIndex]:
    """The indexes of several dumps (in the order given): :meth:`IndexBuild.indexes`."""
    build = IndexBuild(
        options, index_dir, workers, batch_pages=batch_pages, group_pages=group_pages, on_progress=on_progress
    )
    return build.indexes(paths, keep_open)


def load_or_build(
    path: Path | str,
    options: OpenOptions | None = None,
    index_dir: Path | str | None = None,
    *,
    batch_pages: int = BATCH_PAGES,
    on_progress: Progress | None = None,
    dump: Dump | None = None,
) -> PageIndex:
    """The index of one dump: :meth:`IndexBuild.load_or_build`."""
    build = IndexBuild(options, index_dir, batch_pages=batch_pages, on_progress=on_progress)
    return build.load_or_build(path, dump)


def group_pages_for(memory_bytes: int) -> int:
    """How many pages may be hashed at once within ``memory_bytes``: half of it at 25 bytes a
    page (the other half is the sharing's)."""
    return max(1 << 16, memory_bytes // 2 // BYTES_PER_PAGE)


# --- internals -----------------------------------------------------------------------------------


def _open(path: Path | str, options: OpenOptions) -> Dump:
    # Imported here: the registry imports every reader, which index users need only to build.
    from dengine_cli.formats import open_dump

    return open_dump(path, options)


def _file_size(path: Path | str) -> int:
    with contextlib.suppress(OSError):
        return os.stat(path).st_size
    return 0


def _is_container(path: Path | str) -> bool:
    from dengine_cli.formats import container
    from dengine_cli.formats.base import read_head
    from dengine_cli.formats.registry import PROBE_BYTES

    return container.detect(read_head(Path(path), str(path), PROBE_BYTES)) is not None


def _store(
    index: PageIndex, key: dict[str, Any], path: Path | str, options: OpenOptions, file: Path
) -> PageIndex:
    """Cache ``index`` and give it back mapped from the cache file (page cache, not this
    process's memory); as it is when the dump changed meanwhile or the cache cannot be written."""
    # A dump rewritten while it was being read must not be cached under the old key.
    if index_key(path, options) != key or not write_index(index, key, file, str(path)):
        return index
    drop_superseded(key, file)
    stored = read_index(file, key, str(path))
    return dataclasses.replace(stored, loaded=False) if stored is not None else index
