"""Forked worker processes: work where Python holds the GIL (hashing pages, bsdiff4 patches,
opening and decompressing containers).

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
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar, cast

import numpy as np
import numpy.typing as npt

from dengine_cli.errors import STOPPING_SIGNALS, Terminated, UnreadableFile
from dengine_cli.formats.base import Dump
from dengine_cli.pages import BATCH_PAGES

#: ``on_progress(dump_name, pages_done, pages_total)``.
Progress = Callable[[str, int, int], None]
Hashed = tuple[npt.NDArray[np.uint64], npt.NDArray[np.uint64], npt.NDArray[np.bool_]]

#: A range is at least this many pages (fewer ranges: less to hand out; more: better balance).
MIN_RANGE_PAGES = 8192
#: Ranges per worker when the dumps are cut (so that early finishers can take more).
RANGES_PER_WORKER = 4
#: Tasks handed out through the pipe at most (4 bytes each: well within its 64 KiB buffer, which
#: is filled before any worker starts).
MAX_TASKS = 8192

_TASK = struct.Struct("<I")
#: prctl(2) option: the signal a child gets when its parent dies.
_PR_SET_PDEATHSIG = 1
_LENGTH = struct.Struct("<Q")
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
    min_range_pages: int = MIN_RANGE_PAGES,
) -> list[Hashed]:
    """``(hashes, check, zero)`` of every page of each dump, computed by this process and
    ``workers - 1`` forked ones.  ``hash_range(dump, lo, hi, on_pages)`` hashes positions
    ``lo:hi`` (calling ``on_pages(count)`` as it goes) and returns
    ``(uint64[], uint64[], bool[])``; dumps are cut into ranges of at least ``min_range_pages``.
    The arrays returned are views of one shared mapping, which goes when the last of them does."""
    counts = [d.page_count for d in dumps]
    total = sum(counts)
    starts = [0, *itertools.accumulate(counts)]
    size = max(1, min(workers, -(-total // min_range_pages)))
    ranges = _cut(counts, size * RANGES_PER_WORKER, max(min_range_pages, batch_pages // 4))
    # Several consecutive ranges a task when there are more ranges than the task pipe holds.
    per_task = -(-len(ranges) // MAX_TASKS)
    tasks = [ranges[k : k + per_task] for k in range(0, len(ranges), per_task)]
    # Shared with the workers: hashes and checks (8 B/page each), zero flags (1 B/page), page
    # counters.
    counters = -(-17 * total // 8) * 8  # aligned for int64
    shared = mmap.mmap(-1, max(1, counters + 8 * size * len(dumps)))
    hashes = np.frombuffer(shared, dtype=np.uint64, count=total)
    check = np.frombuffer(shared, dtype=np.uint64, count=total, offset=8 * total)
    zero = np.frombuffer(shared, dtype=np.bool_, count=total, offset=16 * total)
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

                h, c, z = hash_range(dumps[v], lo, hi, step)
                hashes[starts[v] + lo : starts[v] + hi] = h
                check[starts[v] + lo : starts[v] + hi] = c
                zero[starts[v] + lo : starts[v] + hi] = z

    def report() -> None:
        if on_progress is not None:
            sums = done.sum(axis=0)
            for v, dump in enumerate(dumps):
                on_progress(dump.name, int(sums[v]), counts[v])

    try:
        _hash_in_workers(size, work, report)
    except WorkerKilled as e:
        if e.signal == signal.SIGBUS:
            raise changed_dump(dumps) from None
        raise
    finally:
        os.close(tasks_r)
    report()
    return [
        (hashes[starts[v] : starts[v + 1]], check[starts[v] : starts[v + 1]], zero[starts[v] : starts[v + 1]])
        for v in range(len(dumps))
    ]


def _hash_in_workers(
    size: int, work: Callable[[int, Callable[[], None]], None], report: Callable[[], None]
) -> None:
    """``work(row, between)`` by ``size - 1`` forked workers (rows 1..) and this process (row 0,
    reporting progress between batches); raises the first failure."""
    me = os.getpid()
    children: dict[int, int] = {}  # pid -> read end of its error pipe
    try:
        for row in range(1, size):
            err_r, err_w = os.pipe()
            with _stopping_signals_held() as mask:
                pid = os.fork()
                if pid == 0:  # pragma: no cover - the child; what it computes is checked by tests
                    _child(functools.partial(work, row, _nothing), err_w, me, mask)
                os.close(err_w)
                children[pid] = err_r
        work(0, report)
        _wait(children, report)
    finally:
        _stop(children)


T = TypeVar("T")
R = TypeVar("R")


def fork_map(
    work: Callable[[T], R],
    items: Sequence[T],
    workers: int,
    *,
    on_result: Callable[[int, R], None] | None = None,
) -> list[R]:
    """``[work(item) for item in items]`` by this process and ``workers - 1`` forked ones, which
    inherit everything this process has open (dumps, codecs) and take items through a pipe as
    they finish the last.  Results come back pickled through one pipe per worker, so they
    should be small (sizes of a chunk, a file name).  ``on_result(k, result)`` is called in this
    process, in the order results arrive.  Errors and deaths are raised as by
    :func:`hash_forked`; the caller must be single-threaded (:func:`fork_usable`)."""
    n = len(items)
    if n > MAX_TASKS:
        raise ValueError(f"fork_map takes at most {MAX_TASKS} items, not {n}: hand out chunks")
    results: list[R | None] = [None] * n
    size = max(1, min(workers, n))
    if size == 1:
        for k, item in enumerate(items):
            results[k] = work(item)
            if on_result is not None:
                on_result(k, cast(R, results[k]))
        return cast(list[R], results)
    tasks_r, tasks_w = os.pipe()
    try:
        os.write(tasks_w, b"".join(_TASK.pack(k) for k in range(n)))
    finally:
        os.close(tasks_w)
    outputs: dict[int, _Output] = {}

    def take(k: int, result: R) -> None:
        results[k] = result
        if on_result is not None:
            on_result(k, result)

    def drain() -> None:
        for out in outputs.values():
            for k, result in out.read():
                take(k, result)

    me = os.getpid()
    children: dict[int, int] = {}
    try:
        for _ in range(1, size):
            err_r, err_w = os.pipe()
            out_r, out_w = os.pipe()
            with _stopping_signals_held() as mask:
                pid = os.fork()
                if pid == 0:  # pragma: no cover - the child; its results are checked by tests
                    os.close(out_r)
                    _child(functools.partial(_serve, work, items, tasks_r, out_w), err_w, me, mask)
                os.close(err_w)
                os.close(out_w)
                children[pid] = err_r
                outputs[pid] = _Output(out_r)
        while record := os.read(tasks_r, _TASK.size):
            k = _TASK.unpack(record)[0]
            take(k, work(items[k]))
            drain()
        _wait(children, drain)
        drain()
    except WorkerKilled as e:
        if e.signal == signal.SIGBUS:
            raise changed_dump(()) from None
        raise
    finally:
        os.close(tasks_r)
        _stop(children)
        for out in outputs.values():
            out.close()
    return cast(list[R], results)


def _serve(
    work: Callable[[T], R], items: Sequence[T], tasks_r: int, out_w: int
) -> None:  # pragma: no cover - runs in the child
    while record := os.read(tasks_r, _TASK.size):
        k = _TASK.unpack(record)[0]
        payload = pickle.dumps((k, work(items[k])))
        _write_all(out_w, _LENGTH.pack(len(payload)) + payload)


def _write_all(fd: int, data: bytes) -> None:  # pragma: no cover - runs in the child
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


class _Output:
    """The result pipe of one worker, read without blocking: length-prefixed pickles."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        os.set_blocking(fd, False)
        self.buf = bytearray()

    def read(self) -> list[tuple[int, Any]]:
        while True:
            try:
                chunk = os.read(self.fd, 1 << 16)
            except BlockingIOError:
                break
            if not chunk:
                break
            self.buf += chunk
        got = []
        while len(self.buf) >= _LENGTH.size:
            (length,) = _LENGTH.unpack_from(self.buf)
            if len(self.buf) < _LENGTH.size + length:
                break
            got.append(pickle.loads(bytes(self.buf[_LENGTH.size : _LENGTH.size + length])))
            del self.buf[: _LENGTH.size + length]
        return got

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self.fd)


def _nothing() -> None:
    pass


def _cut(counts: Sequence[int], parts: int, min_pages: int) -> list[tuple[int, int, int]]:
    """``(dump, lo, hi)`` ranges covering every page, about ``sum(counts) / parts`` pages each
    (at least ``min_pages``, except a dump's last)."""
    step = max(min_pages, -(-sum(counts) // max(parts, 1)))
    return [(v, lo, min(lo + step, n)) for v, n in enumerate(counts) for lo in range(0, n, step)]


def _die_with(parent: int) -> None:  # pragma: no cover - runs in the child
    """Be killed when ``parent`` dies, even by SIGKILL (Linux: PR_SET_PDEATHSIG), so that a
    killed command leaves no worker hashing on; if it is already gone, leave now."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            import ctypes

            ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:
        os._exit(1)


STOPPING = STOPPING_SIGNALS


@contextlib.contextmanager
def _stopping_signals_held() -> Iterator[set[int | signal.Signals]]:
    """:data:`STOPPING` blocked while a worker is forked and recorded, so that the exception a
    signal raises in this process comes once the worker is among those stopped on it (raised
    right after ``fork`` returned, it left the new worker unknown: running, or stopped for ever
    when the group had been stopped).  Yields the mask to restore, which the child restores
    itself once its handlers are the default ones."""
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, STOPPING)
    try:
        yield mask
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)


def _child(
    work: Callable[[], None], err_w: int, parent: int, mask: set[int | signal.Signals] | None = None
) -> None:  # pragma: no cover - in the child
    """Run ``work`` and leave: exit 0, or send the exception and exit 1.  Never returns: the
    child must not run the parent's cleanup (``finally`` blocks, atexit, buffered output).
    ``mask``: the signal mask to restore once the stopping signals have their default action."""
    code = 0
    try:
        for s in STOPPING:  # the parent reports them
            signal.signal(s, signal.SIG_DFL)
        if mask is not None:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        _die_with(parent)
        work()
    except BaseException as e:
        code = 1
        with contextlib.suppress(BaseException):
            if not hasattr(e, "exit_code"):  # a bug: keep the worker's traceback for --debug
                e.add_note("in a worker process:\n" + "".join(traceback.format_exception(e)))
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


#: Seconds between progress reports while this process waits for its workers.
REPORT_SECONDS = 0.01


def _wait(children: dict[int, int], report: Callable[[], None]) -> None:
    """Wait for every child, reporting progress every :data:`REPORT_SECONDS`; raise the first
    failure.  The wait between reports ends as soon as a child exits (a pidfd of each, polled):
    sleeping the whole interval lost 5 ms on average after the last worker was done."""
    with _ExitWatch(children) as watch:
        while children:
            for pid in list(children):
                got, status = os.waitpid(pid, os.WNOHANG)
                if got == 0:
                    continue
                err_r = children.pop(pid)
                watch.forget(pid)
                try:
                    if os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0:
                        continue
                    raise _failure(err_r, status)
                finally:
                    os.close(err_r)
            if children:
                report()
                watch.wait(REPORT_SECONDS)


class _ExitWatch:
    """A poll over pidfds of the children (Linux 5.3 and later; a pidfd is readable once its
    process has exited).  Where pidfds cannot be had, :meth:`wait` sleeps the whole timeout."""

    def __init__(self, children: dict[int, int]) -> None:
        self.fds: dict[int, int] = {}
        self.poll: Any = None
        if not hasattr(os, "pidfd_open"):
            return
        import select

        poll = select.poll()
        for pid in children:
            try:
                fd = os.pidfd_open(pid)
            except OSError:  # no pidfds here, or the child is already reaped
                self.close()
                return
            self.fds[pid] = fd
            poll.register(fd, select.POLLIN)
        self.poll = poll

    def __enter__(self) -> _ExitWatch:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def wait(self, seconds: float) -> None:
        """Until a child exits or ``seconds`` have passed."""
        if self.poll is None:
            time.sleep(seconds)
        else:
            self.poll.poll(seconds * 1000)

    def forget(self, pid: int) -> None:
        fd = self.fds.pop(pid, None)
        if fd is not None and self.poll is not None:
            self.poll.unregister(fd)
            os.close(fd)

    def close(self) -> None:
        for fd in self.fds.values():
            with contextlib.suppress(OSError):
                os.close(fd)
        self.fds.clear()
        self.poll = None


class WorkerKilled(RuntimeError):
    """A worker process killed by a signal (not by an error it could report)."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"a worker process was killed by signal {signum}")
        self.signal = signum


def changed_dump(dumps: Sequence[Dump]) -> UnreadableFile:
    """The error for a worker killed by SIGBUS: it touched a page of a mapped dump past the end
    the file has now, i.e. a dump shrank while being read.  Names the dump that changed (the
    first whose file is not what was opened), or all of them when none can be told."""
    for dump in dumps:
        try:
            dump.check_unchanged()
        except UnreadableFile as e:
            return UnreadableFile(e.path, f"{e.reason}; a worker reading it died of SIGBUS")
    names = ", ".join(d.source.name for d in dumps) or "a dump"
    return UnreadableFile(names, "a dump changed while being read (a worker reading it died of SIGBUS)")


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
        if os.WTERMSIG(status) in (signal.SIGTERM, signal.SIGHUP):
            return Terminated(os.WTERMSIG(status))  # so is a signal sent to the group
        return WorkerKilled(os.WTERMSIG(status))
    return RuntimeError(f"a worker process exited with status {os.waitstatus_to_exitcode(status)}")


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
