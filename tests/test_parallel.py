"""The execution layer: forked workers and threads give what one process gives, report errors
and deaths, and leave no child behind; the plan's codec work is the same spread any way."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from dengine_cli.codecs import patch_codec
from dengine_cli.engine.plan.measure import compressed_sizes, patch_sizes, spread
from dengine_cli.errors import FormatError
from dengine_cli.formats import open_dump
from dengine_cli.formats.base import OpenOptions
from dengine_cli.parallel import Behind, Workers, fork_map, fork_usable
from tests.vms import design_vms, write_raw_images

RAW = OpenOptions(format="raw")


def children() -> set[int]:
    """Live children of this process (from /proc)."""
    me = str(os.getpid())
    found = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[1] == me and fields[0] != "Z":
            found.add(int(entry))
    return found


pytestmark = pytest.mark.skipif(not fork_usable(), reason="forking needs a single-threaded POSIX process")


def test_fork_map_equals_a_loop_and_keeps_order(tmp_path: Path) -> None:
    before = children()
    items = list(range(200))

    def work(k: int) -> tuple[int, int, int]:
        # Every process waits until two have started, so that the work is surely shared.
        (tmp_path / str(os.getpid())).touch()
        deadline = time.monotonic() + 30
        while len(list(tmp_path.iterdir())) < 2 and time.monotonic() < deadline:
            time.sleep(0.002)
        return k, os.getpid(), k * k

    got = fork_map(work, items, 3)
    assert [g[0] for g in got] == items and [g[2] for g in got] == [k * k for k in items]
    # The work really was shared: more than one process answered.
    assert len({g[1] for g in got}) > 1
    assert children() == before


def test_fork_map_results_arrive_once_each() -> None:
    seen: list[int] = []
    fork_map(
        lambda k: np.full(1000, k, dtype=np.int32), list(range(50)), 2, on_result=lambda k, r: seen.append(k)
    )
    assert sorted(seen) == list(range(50))


def test_an_error_in_a_worker_is_raised_here() -> None:
    before = children()

    def work(k: int) -> int:
        if k == 7 and os.getpid() != parent:
            raise FormatError("vm.raw", 0x1000, expected="a page", found="nothing")
        if k == 7:
            raise FormatError("vm.raw", 0x1000, expected="a page", found="nothing")
        return k

    parent = os.getpid()
    with pytest.raises(FormatError) as info:
        fork_map(work, list(range(40)), 2)
    assert info.value.exit_code == 4
    assert "at offset 0x1000" in str(info.value)
    assert children() == before


def dying(tmp_path: Path, sig: int) -> Callable[[int], int]:
    """Work whose forked workers send themselves ``sig`` on their first item; this process waits
    for that before its own first item ends, so that a worker surely takes one."""
    parent = os.getpid()
    marker = tmp_path / "worker-started"

    def work(k: int) -> int:
        if os.getpid() != parent:
            marker.touch()
            os.kill(os.getpid(), sig)
        deadline = time.monotonic() + 30
        while not marker.exists() and time.monotonic() < deadline:
            time.sleep(0.005)
        return k

    return work


def test_a_worker_killed_is_reported_and_reaped(tmp_path: Path) -> None:
    before = children()
    with pytest.raises(RuntimeError, match="killed by signal 9"):
        fork_map(dying(tmp_path, signal.SIGKILL), list(range(100)), 2)
    assert children() == before


def test_a_worker_interrupted_interrupts_the_caller(tmp_path: Path) -> None:
    before = children()
    with pytest.raises(KeyboardInterrupt):
        fork_map(dying(tmp_path, signal.SIGINT), list(range(100)), 2)
    assert children() == before


def test_an_error_here_stops_the_workers(tmp_path: Path) -> None:
    before = children()
    parent = os.getpid()
    marker = tmp_path / "failed"

    def work(k: int) -> int:
        if os.getpid() == parent:
            marker.touch()
            raise ValueError("here")
        # Workers wait until this process has failed: they are still running then.
        deadline = time.monotonic() + 30
        while not marker.exists() and time.monotonic() < deadline:
            time.sleep(0.002)
        return k

    with pytest.raises(ValueError, match="here"):
        fork_map(work, list(range(100)), 3)
    assert children() == before


def test_the_wait_for_workers_wakes_when_one_exits() -> None:
    """The poll :func:`fork_map` waits on between progress reports has an event for a worker
    once it exits (it does not sleep out the interval), none while it runs."""
    from dengine_cli.parallel.forked import _ExitWatch

    if not hasattr(os, "pidfd_open"):
        pytest.skip("no pidfds on this platform")
    go_r, go_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        os.read(go_r, 1)
        os._exit(0)
    os.close(go_r)
    try:
        with _ExitWatch({pid: -1}) as watch:
            assert watch.poll is not None
            assert watch.poll.poll(0) == []  # still running
            os.write(go_w, b"x")
            os.waitid(os.P_PID, pid, os.WEXITED | os.WNOWAIT)  # exited, not yet reaped
            assert [fd for fd, _ in watch.poll.poll(0)] == [watch.fds[pid]]
            watch.forget(pid)
            assert not watch.fds
    finally:
        os.close(go_w)
        os.waitpid(pid, 0)


def test_no_fork_while_another_thread_runs() -> None:
    stop = threading.Event()
    t = threading.Thread(target=stop.wait)
    t.start()
    try:
        assert not fork_usable()
        assert Workers(jobs=4).processes() == 1
    finally:
        stop.set()
        t.join()
    assert Workers(jobs=4, fork_min_bytes=0).processes(10) == 4
    assert Workers(jobs=4).processes(1000) == 1  # too little to pay for a fork
    assert Workers(jobs=1).processes() == 1
    assert Workers(jobs=4, fork=False).processes() == 1


@pytest.mark.parametrize("codec", ["bsdiff4", "xor-zstd"])
def test_codec_sizes_are_the_same_spread_any_way(tmp_path: Path, codec: str) -> None:
    vms = design_vms(8, [400, 300])
    paths = write_raw_images(tmp_path, vms)
    dumps = [open_dump(p, RAW) for p in paths]
    try:
        rng = np.random.default_rng(1)
        n = 600
        page_vm = rng.integers(0, 2, n)
        ref_vm = rng.integers(0, 2, n)
        page_pos = rng.integers(0, 300, n)
        ref_pos = rng.integers(0, 300, n)
        alone = patch_sizes(dumps, dumps, codec, 4096, page_vm, page_pos, ref_vm, ref_pos, Workers(jobs=1))
        spread_out = patch_sizes(
            dumps, dumps, codec, 4096, page_vm, page_pos, ref_vm, ref_pos, Workers(jobs=2, fork_min_pages=0)
        )
        assert np.array_equal(alone, spread_out)
        # Each size is the codec's own for that pair.
        c = patch_codec(codec)
        for i in range(0, n, 97):
            ref = vms[ref_vm[i]][ref_pos[i]]
            page = vms[page_vm[i]][page_pos[i]]
            assert alone[i] == min(len(c.diff(ref, page)), 4096)
        one = compressed_sizes(dumps, dumps, "zstd-1", page_vm, page_pos, Workers(jobs=1))
        two = compressed_sizes(dumps, dumps, "zstd-1", page_vm, page_pos, Workers(jobs=2))
        assert np.array_equal(one, two)
    finally:
        for d in dumps:
            d.close()


def test_spread_reports_progress_to_the_end() -> None:
    for releases_gil in (True, False):
        done: list[int] = []
        sizes = spread(
            1000,
            lambda a, b: np.arange(a, b, dtype=np.int32),
            releases_gil,
            Workers(jobs=2, fork_min_pages=0),
            done.append,
            chunk=64,
            thread_chunk=32,
        )
        assert np.array_equal(sizes, np.arange(1000, dtype=np.int32))
        assert done[-1] == 1000 and done == sorted(done)


def test_spread_forks_for_codecs_that_hold_the_gil(tmp_path: Path) -> None:
    """Chunks measured by two processes (each waits until both have begun, so that the work is
    surely shared), every item measured once, in place."""

    def measure(a: int, b: int) -> np.ndarray:
        (tmp_path / str(os.getpid())).touch()
        deadline = time.monotonic() + 30
        while len(list(tmp_path.iterdir())) < 2 and time.monotonic() < deadline:
            time.sleep(0.002)
        return np.full(b - a, os.getpid(), dtype=np.int32)

    sizes = spread(1000, measure, False, Workers(jobs=2, fork_min_pages=0), chunk=50)
    assert len(set(sizes.tolist())) == 2 and os.getpid() in set(sizes.tolist())
    # Runs of one pid are whole chunks: each chunk went to one process, once.
    assert all(len(set(sizes[k : k + 50].tolist())) == 1 for k in range(0, 1000, 50))


def test_workers_die_with_a_killed_command(tmp_path: Path) -> None:
    """SIGKILL of the command (nothing it can catch) takes its forked workers with it."""
    import subprocess
    import sys

    script = (
        "import os, time, pathlib\n"
        "from dengine_cli.parallel import fork_map\n"
        f"d = pathlib.Path({str(tmp_path)!r})\n"
        "def work(k):\n"
        "    (d / f'pid-{os.getpid()}').touch()\n"
        "    time.sleep(60)\n"
        "fork_map(work, list(range(3)), 3)\n"
    )
    command = subprocess.Popen([sys.executable, "-c", script])
    deadline = time.monotonic() + 30
    while len(list(tmp_path.glob("pid-*"))) < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    workers = {int(p.name[4:]) for p in tmp_path.glob("pid-*")} - {command.pid}
    assert len(workers) == 2
    command.kill()
    command.wait()
    deadline = time.monotonic() + 10
    while any(alive(pid) for pid in workers) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not any(alive(pid) for pid in workers)


def alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie waiting for init to reap it does not)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_behind_works_every_item_in_order_on_its_own_thread() -> None:
    seen: list[tuple[int, str]] = []

    def work(k: int) -> None:
        time.sleep(0.001 * (k % 3))
        seen.append((k, threading.current_thread().name))

    with Behind(work, ahead=2) as behind:
        for k in range(50):
            behind.put(k)
    assert [k for k, _ in seen] == list(range(50))  # all done on leaving, in order
    assert {name for _, name in seen} == {"dengine-behind"}
    assert "dengine-behind" not in {t.name for t in threading.enumerate()}


def test_behind_raises_a_failed_item_in_the_caller_and_works_no_later_one() -> None:
    done: list[int] = []

    def work(k: int) -> None:
        if k == 3:
            raise OSError(28, "No space left on device")
        done.append(k)

    with pytest.raises(OSError, match="No space left"), Behind(work, ahead=1) as behind:
        for k in range(1000):
            behind.put(k)
    assert done == [0, 1, 2]
    assert "dengine-behind" not in {t.name for t in threading.enumerate()}


def test_behind_finishes_the_item_it_is_on_when_the_caller_fails() -> None:
    """The caller's exception goes through once the item being worked on is done (the image it
    writes is still open then); which of the waiting items are skipped depends on timing."""
    done: list[int] = []
    started = threading.Event()

    def work(k: int) -> None:
        started.set()
        time.sleep(0.05)
        done.append(k)

    with pytest.raises(KeyError), Behind(work, ahead=3) as behind:
        for k in range(3):
            behind.put(k)
        started.wait(5)
        raise KeyError("the caller failed")
    assert done[:1] == [0] and done == list(range(len(done)))
    assert "dengine-behind" not in {t.name for t in threading.enumerate()}
