"""The execution layer: how work spreads over the cores of this machine.

Two ways, each where it pays: threads of this process for numpy and codec work that lets go of
the GIL (:func:`~dengine_cli.parallel.threads.map_in_threads`), and forked processes for work
where Python holds it (hashing pages from Python, bsdiff4, decompressing containers:
:mod:`~dengine_cli.parallel.forked`).  Stages never start either themselves: the session hands
them work through a :class:`Workers`, whose tuning values are its fields, so that the same stage
runs in a thread, a forked worker or (later) a cluster worker."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar

from dengine_cli.parallel.forked import fork_map, fork_usable
from dengine_cli.parallel.threads import Behind, map_in_threads, stream_in_threads, task_pool

if TYPE_CHECKING:
    from concurrent.futures import ThreadPoolExecutor

T = TypeVar("T")
R = TypeVar("R")


def cpu_count() -> int:
    """The CPUs this process may run on (its affinity mask), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


@dataclass(frozen=True)
class Workers:
    """How much of the machine a command uses: ``jobs`` threads or processes at most (default:
    every CPU), and the sizes below which starting them does not pay.

    ``fork``: whether forked processes may be used at all (they are only where this process runs
    a single thread, :func:`fork_usable`, whatever this says)."""

    jobs: int = 0
    fork: bool = True
    #: Below this many bytes of dumps to index, one process hashes alone: a fork costs ~10 ms.
    fork_min_bytes: int = 64 << 20
    #: Forked hashing processes at most, however many CPUs: reading page cache is bound by
    #: memory bandwidth long before 8 CPUs.
    fork_max: int = 8
    #: Below this many pages to measure with a codec that holds the GIL, no process is forked.
    fork_min_pages: int = 4096
    #: Forked hashing hands out page ranges of at least this many pages.
    range_pages: int = 8192

    @property
    def count(self) -> int:
        """``jobs``, or every CPU when it is 0."""
        return self.jobs if self.jobs > 0 else cpu_count()

    def processes(self, size_bytes: int | None = None) -> int:
        """How many processes (this one included) should share work of ``size_bytes`` bytes of
        dumps where Python holds the GIL: 1 when forking is not possible, not safe or does not
        pay."""
        n = min(self.count, self.fork_max)
        if n < 2 or not self.fork or not fork_usable():
            return 1
        if size_bytes is not None and size_bytes < self.fork_min_bytes:
            return 1
        return n

    def threads(self, work: Callable[[T], R], items: Sequence[T], limit: int | None = None) -> list[R]:
        """``[work(item) for item in items]`` by up to ``count`` threads (or ``limit``)."""
        n = self.count if limit is None else min(self.count, limit)
        return map_in_threads(work, items, n)

    def stream(self, work: Callable[[T], R], items: Sequence[T], ahead: int = 1) -> Iterator[R]:
        """``work(item)`` for each item in order, by ``count`` threads while the caller consumes
        (:func:`~dengine_cli.parallel.threads.stream_in_threads`)."""
        return stream_in_threads(work, items, self.count, ahead=ahead)

    def tasks(self) -> ThreadPoolExecutor:
        """A pool of ``count`` threads taking tasks one at a time
        (:func:`~dengine_cli.parallel.threads.task_pool`); use it as a context manager."""
        return task_pool(self.count)

    def forked(self, work: Callable[[T], R], items: Sequence[T], processes: int) -> list[R]:
        """``[work(item) for item in items]`` by ``processes`` processes, this one included."""
        return fork_map(work, items, processes)


__all__ = [
    "Behind",
    "Workers",
    "cpu_count",
    "fork_map",
    "fork_usable",
    "map_in_threads",
    "stream_in_threads",
    "task_pool",
]
