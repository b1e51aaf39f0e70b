"""Hashing the pages of open dumps in forked worker processes.

Hashing a page is one xxh3 call made from Python, which holds the GIL: threads cannot share that
work, processes can.  Forking this process is the cheapest way to get them (about 10 ms a
worker, where a fork server and its workers importing numpy cost 0.7-1.3 s): the workers inherit
the open dumps and write their results into shared memory.  A fork is only safe when this
process runs a single thread (another thread could hold a lock the child would wait on
forever), which :func:`fork_usable` checks; callers fall back to threads or a fork-server pool.

Work is handed out as page ranges through a pipe, 4 bytes a range (reads of at most PIPE_BUF
bytes from a pipe are atomic), so a worker that finishes early takes more.  Each worker writes
the hashes and zero flags of its ranges into one shared anonymous mapping, and its page counts
into a row of counters that the calling process sums to report progress while it hashes too.
A worker that fails sends its exception (pickled) through its own pipe and exits 1; the calling
process then stops the others and raises it.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import mmap
import os
import pickle
import signal
import struct
import sys
import threading
import time
import traceback
from collections.abc import Callable, Sequence

import numpy as np
import numpy.typing as npt

from dengine_cli.formats.base import Dump
from dengine_cli.pages import BATCH_PAGES

#: ``on_progress(dump_name, pages_done, pages_total)``.
Progress = Callable[[str, int, int], None]
Hashed = tuple[npt.NDArray[np.uint64], npt.NDArray[np.bool_]]

#: A range is at least this many pages (fewer ranges: less to hand out; more: better balance).
MIN_RANGE_PAGES = 8192
#: Ranges per worker when the dumps are cut (so that early finishers can take more).
RANGES_PER_WORKER = 4
#: Tasks handed out through the pipe at most (4 bytes each: well within its 64 KiB buffer, which
#: is filled before any worker starts).
MAX_TASKS = 8192

_TASK = struct.Struct("<I")
#: An error sent back by a worker must fit in a pipe's buffer (64 KiB on Linux).
_ERROR_MAX = 60000


def fork_usable() -> bool:
    """Whether forking workers is possible and safe here: a POSIX ``fork`` and one thread."""
    return hasattr(os, "fork") and sys.platform != "darwin" and threading.active_count() == 1


def hash_forked(
    dumps: Sequence[Dump],
    workers: int,
    hash_range: Callable[[Dump, int, int, Callable[[int], None]], Hashed],
    *,
    on_progress: Progress | None = None,
    batch_pages: int = BATCH_PAGES,
) -> list[Hashed]:
    """``(hashes, zero)`` of every page of each dump, computed by this process and
    ``workers - 1`` forked ones.  ``hash_range(dump, lo, hi, on_pages)`` hashes positions
    ``lo:hi`` (calling ``on_pages(count)`` as it goes) and returns ``(uint64[], bool[])``."""
    counts = [d.page_count for d in dumps]
    total = sum(counts)
    starts = [0, *itertools.accumulate(counts)]
    size = max(1, min(workers, -(-total // MIN_RANGE_PAGES)))
    ranges = _cut(counts, size * RANGES_PER_WORKER, max(MIN_RANGE_PAGES, batch_pages // 4))
    # A task is a few consecutive ranges when there are more ranges (dumps) than the task pipe
    # holds records.
    per_task = -(-len(ranges) // MAX_TASKS)
    tasks = [ranges[k : k + per_task] for k in range(0, len(ranges), per_task)]
    # Shared with the workers: hashes (8 B/page), zero flags (1 B/page), page counters.
    counters = -(-9 * total // 8) * 8  # aligned for int64
    shared = mmap.mmap(-1, max(1, counters + 8 * size * len(dumps)))
    hashes = np.frombuffer(shared, dtype=np.uint64, count=total)
    zero = np.frombuffer(shared, dtype=np.bool_, count=total, offset=8 * total)
    done = np.frombuffer(shared, dtype=np.int64, count=size * len(dumps), offset=counters).reshape(
        size, len(dumps)
    )
    tasks_r, tasks_w = os.pipe()
    try:
        os.write(tasks_w, b"".join(_TASK.pack(k) for k in range(len(tasks))))
    finally:
        os.close(tasks_w)

    def work(row: int, between: Callable[[], None]) -> None:
        while True:
            record = os.read(tasks_r, _TASK.size)
            if not record:
                return
            for v, lo, hi in tasks[_TASK.unpack(record)[0]]:

                def step(k: int, v: int = v) -> None:
                    done[row, v] += k
                    between()

                h, z = hash_range(dumps[v], lo, hi, step)
                hashes[starts[v] + lo : starts[v] + hi] = h
                zero[starts[v] + lo : starts[v] + hi] = z

    def report() -> None:
        if on_progress is not None:
            sums = done.sum(axis=0)
            for v, dump in enumerate(dumps):
                on_progress(dump.name, int(sums[v]), counts[v])

    children: dict[int, int] = {}  # pid -> read end of its error pipe
    try:
        for row in range(1, size):
            err_r, err_w = os.pipe()
            pid = os.fork()
            if pid == 0:  # pragma: no cover - the child; what it computes is checked by tests
                _child(functools.partial(work, row, _nothing), err_w)
            os.close(err_w)
            children[pid] = err_r
        work(0, report)
        _wait(children, report)
    finally:
        os.close(tasks_r)
        _stop(children)
    report()
    # Copies: the shared mapping goes when the last view of it does.
    return [
        (hashes[starts[v] : starts[v + 1]].copy(), zero[starts[v] : starts[v + 1]].copy())
        for v in range(len(dumps))
    ]


def _nothing() -> None:
    pass


def _cut(counts: Sequence[int], parts: int, min_pages: int) -> list[tuple[int, int, int]]:
    """``(dump, lo, hi)`` ranges covering every page, about ``sum(counts) / parts`` pages each
    (at least ``min_pages``, except a dump's last)."""
    step = max(min_pages, -(-sum(counts) // max(parts, 1)))
    return [(v, lo, min(lo + step, n)) for v, n in enumerate(counts) for lo in range(0, n, step)]


def _child(work: Callable[[], None], err_w: int) -> None:  # pragma: no cover - runs in the child
    """Run ``work`` and leave: exit 0, or send the exception and exit 1.  Never returns: the
    child must not run the parent's cleanup (``finally`` blocks, atexit, buffered output)."""
    code = 0
    try:
        signal.signal(signal.SIGINT, signal.SIG_DFL)  # Ctrl-C: the parent reports it
        work()
    except BaseException as e:
        code = 1
        with contextlib.suppress(BaseException):
            if not hasattr(e, "exit_code"):  # a bug: keep the worker's traceback for --debug
                e.add_note("in an index worker process:\n" + "".join(traceback.format_exception(e)))
            try:
                payload = pickle.dumps(e)
            except Exception:
                payload = b""
            if not payload or len(payload) > _ERROR_MAX:
                # Unpicklable, or too long for the pipe (the parent reads it once we exit).
                text = "".join(traceback.format_exception(e))[-_ERROR_MAX // 2 :]
                payload = pickle.dumps(RuntimeError(text))
            os.write(err_w, payload)
    finally:
        os._exit(code)


def _wait(children: dict[int, int], report: Callable[[], None]) -> None:
    """Wait for every child, reporting progress; raise the first failure."""
    while children:
        for pid in list(children):
            got, status = os.waitpid(pid, os.WNOHANG)
            if got == 0:
                continue
            err_r = children.pop(pid)
            try:
                if os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0:
                    continue
                raise _failure(err_r, status)
            finally:
                os.close(err_r)
        if children:
            report()
            time.sleep(0.01)


def _failure(err_r: int, status: int) -> BaseException:
    chunks = []
    while chunk := os.read(err_r, 1 << 16):
        chunks.append(chunk)
    if chunks:
        with contextlib.suppress(Exception):
            error = pickle.loads(b"".join(chunks))
            if isinstance(error, BaseException):
                return error
    if os.WIFSIGNALED(status):
        if os.WTERMSIG(status) == signal.SIGINT:
            # Ctrl-C reaches the whole process group: this process is being interrupted too.
            return KeyboardInterrupt()
        return RuntimeError(f"an index worker process was killed by signal {os.WTERMSIG(status)}")
    return RuntimeError(f"an index worker process exited with status {os.waitstatus_to_exitcode(status)}")


def _stop(children: dict[int, int]) -> None:
    """Stop and reap the children still running (after a failure or an interrupt)."""
    for pid, err_r in children.items():
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(OSError):
            os.waitpid(pid, 0)
        with contextlib.suppress(OSError):
            os.close(err_r)
    children.clear()
