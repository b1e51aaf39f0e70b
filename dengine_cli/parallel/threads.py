"""Work shared by a few threads of this process, for numpy and xxhash code that lets go of the GIL
(page compares, zero checks, the page faults of reading a mapping).

Plain :mod:`threading`, not :mod:`concurrent.futures`: importing that (with :mod:`logging`) costs
about 10 ms, a few percent of a whole ``dengine analyze``.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import TypeVar, cast

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
