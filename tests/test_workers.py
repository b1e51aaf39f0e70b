"""Forked index workers: the indexes they build equal the ones this process builds alone, errors
and deaths in a worker reach the caller, and no worker is left behind."""

from __future__ import annotations

import os
import signal
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from dengine_cli.engine.index import hash_dump, index_dump
from dengine_cli.errors import FormatError
from dengine_cli.formats import open_dump
from dengine_cli.formats.base import Dump
from dengine_cli.parallel import forked as workers
from dengine_cli.parallel.forked import Hashed, hash_forked
from dengine_cli.session import indexing as index
from dengine_cli.session.indexing import build_indexes

FORKED: list[int] = []


def no_children_left() -> bool:
    """Every worker forked during the test has been reaped (waiting for it again fails)."""
    for pid in FORKED:
        try:
            os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            continue
        return False
    return bool(FORKED)


@pytest.fixture
def forking(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fork for any amount of work, in small ranges (several per dump); record the forks."""
    monkeypatch.setattr(index, "FORK_MIN_BYTES", 0)
    monkeypatch.setattr(workers, "MIN_RANGE_PAGES", 500)
    FORKED.clear()
    fork = os.fork

    def recording() -> int:
        pid = fork()
        if pid:
            FORKED.append(pid)
        return pid

    monkeypatch.setattr(os, "fork", recording)


@pytest.mark.parametrize("jobs", [2, 3])
def test_forked_indexes_equal_indexes_built_alone(
    real_dump: Callable[[str], Path], tmp_path: Path, forking: None, jobs: int
) -> None:
    paths = [real_dump("alpha.elf"), real_dump("beta.elf"), real_dump("alpha.kdump")]
    assert index._fork_workers(paths, [0, 1, 2], jobs) == jobs
    seen: dict[str, int] = {}
    built = build_indexes(paths, None, tmp_path / "forked", jobs, lambda n, d, t: seen.__setitem__(n, d))
    for path, ix in zip(paths, built, strict=True):
        with open_dump(path) as dump:
            alone = index_dump(dump)
        assert np.array_equal(ix.gfns, alone.gfns)
        assert np.array_equal(ix.hashes, alone.hashes)
        assert np.array_equal(ix.zero, alone.zero)
        assert seen[str(path)] == alone.page_count  # progress reached every page
        assert ix.path is not None and ix.key is not None  # cached
    assert no_children_left()


def _dumps(real_dump: Callable[[str], Path]) -> list[Dump]:
    return [open_dump(real_dump("alpha.elf")), open_dump(real_dump("beta.elf"))]


def test_an_error_in_a_worker_is_raised_here(real_dump: Callable[[str], Path], forking: None) -> None:
    parent = os.getpid()
    dumps = _dumps(real_dump)

    def failing(dump: Dump, lo: int, hi: int, on_pages: Callable[[int], None]) -> Hashed:
        if os.getpid() != parent:
            raise FormatError(dump.name, 0x1000 + lo, expected="a page", found="trouble")
        return hash_dump(dump, lo, hi, on_pages=on_pages)

    with pytest.raises(FormatError) as err:
        hash_forked(dumps, 2, failing)
    assert "expected a page, found trouble" in str(err.value)
    assert err.value.exit_code == FormatError(".", 0, expected="", found="").exit_code
    assert no_children_left()
    for d in dumps:
        d.close()


def test_a_worker_killed_is_reported(real_dump: Callable[[str], Path], forking: None) -> None:
    parent = os.getpid()
    dumps = _dumps(real_dump)

    def dying(dump: Dump, lo: int, hi: int, on_pages: Callable[[int], None]) -> Hashed:
        if os.getpid() != parent:
            os.kill(os.getpid(), signal.SIGKILL)
        return hash_dump(dump, lo, hi, on_pages=on_pages)

    with pytest.raises(RuntimeError, match="killed by signal 9"):
        hash_forked(dumps, 2, dying)
    assert no_children_left()
    for d in dumps:
        d.close()


def test_a_worker_interrupted_interrupts_the_caller(real_dump: Callable[[str], Path], forking: None) -> None:
    """Ctrl-C reaches the whole process group; a worker that dies of it first must not turn the
    interruption into an internal error."""
    parent = os.getpid()
    dumps = _dumps(real_dump)

    def interrupted(dump: Dump, lo: int, hi: int, on_pages: Callable[[int], None]) -> Hashed:
        if os.getpid() != parent:
            os.kill(os.getpid(), signal.SIGINT)  # the worker runs SIGINT's default action
        return hash_dump(dump, lo, hi, on_pages=on_pages)

    with pytest.raises(KeyboardInterrupt):
        hash_forked(dumps, 2, interrupted)
    assert no_children_left()
    for d in dumps:
        d.close()


def test_an_error_here_stops_the_workers(real_dump: Callable[[str], Path], forking: None) -> None:
    parent = os.getpid()
    dumps = _dumps(real_dump)

    def failing_here(dump: Dump, lo: int, hi: int, on_pages: Callable[[int], None]) -> Hashed:
        if os.getpid() == parent:
            raise ValueError("the caller failed")
        return hash_dump(dump, lo, hi, on_pages=on_pages)

    with pytest.raises(ValueError, match="the caller failed"):
        hash_forked(dumps, 3, failing_here)
    assert no_children_left()
    for d in dumps:
        d.close()


def test_no_fork_when_another_thread_runs(real_dump: Callable[[str], Path], forking: None) -> None:
    import threading

    stop = threading.Event()
    other = threading.Thread(target=stop.wait)
    other.start()
    try:
        assert not workers.fork_usable()
        assert index._fork_workers([real_dump("alpha.elf")], [0], 2) == 0
    finally:
        stop.set()
        other.join()
    assert workers.fork_usable()
