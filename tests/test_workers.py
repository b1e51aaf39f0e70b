"""Forked index workers: the indexes they build equal the ones this process builds alone, progress
reaches every page, errors and deaths in a worker reach the caller, and no worker is left
behind.  (The generic fork_map is tested in test_parallel.py.)"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

from dengine_cli.engine.index import hash_dump, index_dump
from dengine_cli.errors import EXIT_BAD_DUMP, FormatError
from dengine_cli.formats import open_dump
from dengine_cli.formats.base import Dump
from dengine_cli.parallel import Workers, fork_usable
from dengine_cli.parallel.forked import Hashed, hash_forked
from dengine_cli.session.indexing import build_indexes

pytestmark = pytest.mark.skipif(not fork_usable(), reason="forking needs a single-threaded POSIX process")

FORKED: list[int] = []


@pytest.fixture
def forking(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Record every fork made during the test (to check that each child was reaped)."""
    FORKED.clear()
    fork = os.fork

    def recording() -> int:
        pid = fork()
        if pid:
            FORKED.append(pid)
        return pid

    monkeypatch.setattr(os, "fork", recording)
    yield


def no_children_left() -> bool:
    """Every worker forked during the test has been reaped (waiting for it again fails)."""
    for pid in FORKED:
        try:
            os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            continue
        return False
    return bool(FORKED)


@pytest.mark.parametrize("jobs", [2, 3])
def test_forked_indexes_equal_indexes_built_alone(
    real_dump: Callable[[str], Path], tmp_path: Path, forking: None, jobs: int
) -> None:
    paths = [real_dump("alpha.elf"), real_dump("beta.elf"), real_dump("alpha.kdump")]
    workers = Workers(jobs=jobs, fork_min_bytes=0, range_pages=500)
    assert workers.processes(1) == jobs
    seen: dict[str, list[int]] = {}
    built = build_indexes(
        paths, None, tmp_path / "forked", workers, lambda n, d, t: seen.setdefault(n, []).append(d)
    )
    assert len(FORKED) == jobs - 1
    for path, ix in zip(paths, built, strict=True):
        with open_dump(path) as dump:
            alone = index_dump(dump)
            # Progress reached every page, counting up, on every path.
            assert seen[dump.name][-1] == alone.page_count
            assert seen[dump.name] == sorted(seen[dump.name])
        assert np.array_equal(ix.gfns, alone.gfns)
        assert np.array_equal(ix.hashes, alone.hashes) and np.array_equal(ix.check, alone.check)
        assert np.array_equal(ix.zero, alone.zero)
        assert ix.path is not None and ix.key is not None  # cached
    assert no_children_left()


def _dumps(real_dump: Callable[[str], Path]) -> list[Dump]:
    return [open_dump(real_dump("alpha.elf")), open_dump(real_dump("beta.elf"))]


def _in_worker(tmp_path: Path, act: Callable[[Dump, int], None]) -> Callable[..., Hashed]:
    """A hash_range that runs ``act`` in forked workers; this process waits until a worker has
    begun, so that one surely takes a range whatever the load."""
    parent = os.getpid()
    marker = tmp_path / "worker-started"

    def hash_range(dump: Dump, lo: int, hi: int, on_pages: Callable[[int], None]) -> Hashed:
        if os.getpid() != parent:
            marker.touch()
            act(dump, lo)
        deadline = time.monotonic() + 30
        while not marker.exists() and time.monotonic() < deadline:
            time.sleep(0.005)
        return hash_dump(dump, lo, hi, on_pages=on_pages)

    return hash_range


def test_an_error_in_a_worker_is_raised_here(
    real_dump: Callable[[str], Path], tmp_path: Path, forking: None
) -> None:
    def fail(dump: Dump, lo: int) -> None:
        raise FormatError(dump.name, 0x1000 + lo, expected="a page", found="trouble")

    dumps = _dumps(real_dump)
    with pytest.raises(FormatError) as err:
        hash_forked(dumps, 2, _in_worker(tmp_path, fail), min_range_pages=500)
    assert "expected a page, found trouble" in str(err.value)
    assert err.value.exit_code == EXIT_BAD_DUMP
    assert no_children_left()
    for d in dumps:
        d.close()


def test_a_worker_killed_is_reported(real_dump: Callable[[str], Path], tmp_path: Path, forking: None) -> None:
    dumps = _dumps(real_dump)
    with pytest.raises(RuntimeError, match="killed by signal 9"):
        hash_forked(dumps, 2, _in_worker(tmp_path, lambda d, lo: os.kill(os.getpid(), signal.SIGKILL)))
    assert no_children_left()
    for d in dumps:
        d.close()


def test_a_worker_interrupted_interrupts_the_caller(
    real_dump: Callable[[str], Path], tmp_path: Path, forking: None
) -> None:
    """Ctrl-C reaches the whole process group; a worker that dies of it first must not turn the
    interruption into an internal error."""
    dumps = _dumps(real_dump)
    with pytest.raises(KeyboardInterrupt):
        hash_forked(dumps, 2, _in_worker(tmp_path, lambda d, lo: os.kill(os.getpid(), signal.SIGINT)))
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
