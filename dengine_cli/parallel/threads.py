"""Work shared by a few threads of this process, for numpy and xxhash code that lets go of the GIL
(page compares, zero checks, the page faults of reading a mapping).

Plain :mod:`threading`, not :mod:`concurrent.futures`: importing that (with :mod:`logging`) costs
about 10 ms, a few percent of a whole ``dengine analyze``.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Generic, TypeVar, cast

if TYPE_CHECKING:
    from concurrent.futures import ThreadPoolExecutor

T = TypeVar("T")
R = TypeVar("R")


def map_in_threads(work: Callable[[T], R], items: Sequence[T], threads: int) -> list[R]:
    """``[work(item) for item in items]``, the items taken in order by up to ``threads`` threads
    (the calling thread is one of them).

    The first exception ``work`` raises is raised here once every thread has stopped; items not
    started by then are skipped.  When the calling thread is interrupted (KeyboardInterrupt), the
    other threads finish the item they are on and stop.
    """
    threads = max(1, min(threads, len(items)))
    if threads == 1:
        return [work(item) for item in items]
    results: list[R | None] = [None] * len(items)
    errors: list[BaseException] = []
    lock = threading.Lock()
    taken = 0

    def run() -> None:
        nonlocal taken
        while True:
            with lock:
                if errors or taken >= len(items):
                    return
                k = taken
                taken += 1
            try:
                results[k] = work(items[k])
            except BaseException as e:
                with lock:
                    errors.append(e)
                return

    helpers = [threading.Thread(target=run, name=f"dengine-{t}") for t in range(1, threads)]
    for helper in helpers:
        helper.start()
    try:
        run()
    except BaseException:
        with lock:
            taken = len(items)
        raise
    finally:
        for helper in helpers:
            helper.join()
    if errors:
        raise errors[0]
    return cast(list[R], results)


def stream_in_threads(
    work: Callable[[T], R], items: Sequence[T], threads: int, *, ahead: int = 1
) -> Iterator[R]:
    """``work(item)`` for each item, handed out in item order as they are done, by ``threads``
    helper threads while the caller consumes what they hand out: the caller's part (adding up,
    writing) overlaps the next items' work instead of waiting for a whole wave.  At most
    ``threads + ahead`` items are started and not yet done with (the one the caller holds
    included: it is done with when the caller asks for the next), which bounds the memory their
    results hold.  One thread: the items are worked in the caller, one at a time.

    The first exception ``work`` raises is raised here, in order, once the helpers have stopped.
    When the caller stops early (an exception, ``close()``, KeyboardInterrupt), the helpers finish
    the item they are on and stop before this returns."""
    threads = max(1, min(threads, len(items)))
    if threads == 1:
        for item in items:
            yield work(item)
        return
    window = threads + max(0, ahead)
    done: dict[int, tuple[bool, R | BaseException]] = {}
    cond = threading.Condition()
    state = {"taken": 0, "consumed": 0, "stop": False}

    def run() -> None:
        while True:
            with cond:
                while not state["stop"] and state["taken"] - state["consumed"] >= window:
                    cond.wait()
                if state["stop"] or state["taken"] >= len(items):
                    return
                k = state["taken"]
                state["taken"] = k + 1
            try:
                outcome: tuple[bool, R | BaseException] = (True, work(items[k]))
            except BaseException as e:
                outcome = (False, e)
            with cond:
                done[k] = outcome
                if not outcome[0]:
                    state["stop"] = True
                cond.notify_all()
            if not outcome[0]:
                return

    helpers = [threading.Thread(target=run, name=f"dengine-{t}") for t in range(threads)]
    for helper in helpers:
        helper.start()
    try:
        for k in range(len(items)):
            with cond:
                while k not in done:
                    cond.wait()
                ok, value = done.pop(k)
            if not ok:
                raise cast(BaseException, value)
            yield cast(R, value)
            with cond:  # the caller is done with it
                state["consumed"] = k + 1
                cond.notify_all()
    finally:
        with cond:
            state["stop"] = True
            cond.notify_all()
        for helper in helpers:
            helper.join()


def task_pool(threads: int) -> ThreadPoolExecutor:
    """A pool of ``threads`` threads that take tasks one at a time (``submit``), whose results
    the caller takes in an order of its own: for a pass that hands out work of several kinds as
    it goes (apply's encoded batches and compressed frames).  :mod:`concurrent.futures` is
    imported here, by the commands that use it only."""
    from concurrent.futures import ThreadPoolExecutor

    return ThreadPoolExecutor(max_workers=max(1, threads), thread_name_prefix="dengine-task")


class Behind(Generic[T]):
    """``work(item)`` for each item :meth:`put`, in order, on one thread of its own while the
    caller goes on (writing what the caller decodes): at most ``ahead`` items wait.

    Leaving the ``with`` block waits until every item put is done, or, when the block raised,
    only until the item being worked on is.  The first exception ``work`` raises is raised in the
    caller, at the next :meth:`put` or on leaving the block; later items are not worked on."""

    def __init__(self, work: Callable[[T], object], ahead: int = 2) -> None:
        self._work = work
        self._items: queue.Queue[tuple[T] | None] = queue.Queue(maxsize=max(1, ahead))
        self._error: BaseException | None = None
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="dengine-behind", daemon=True)

    def __enter__(self) -> Behind[T]:
        self._thread.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, *rest: object) -> None:
        self._stop = kind is not None
        self._items.put(None)
        self._thread.join()
        if kind is None and self._error is not None:
            raise self._error

    def put(self, item: T) -> None:
        if self._error is not None:
            raise self._error
        self._items.put((item,))

    def _run(self) -> None:
        while (held := self._items.get()) is not None:
            if self._error is None and not self._stop:
                try:
                    self._work(held[0])
                except BaseException as e:  # raised in the caller
                    self._error = e
