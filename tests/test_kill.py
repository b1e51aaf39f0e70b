"""kill -9 of `index`, `analyze` and `plan` at several points of a run on real QEMU dumps: every
cache file a killed run leaves is either whole and valid or a temporary one no run reads, the
next normal run gives the figures of a clean run, and `index --prune` clears what is left.

Kill points are states of the run, seen from outside, not times: as soon as the command has
mapped the first dump; as soon as anything appears in its cache directory (a temporary file, a
spill directory, a first index); and, to spread the rest, at 70% of a clean run's measured
length.  A point the command outruns is a completed run, checked the same way."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from dengine_cli.cache import files, index_store, sharing_store
from tests.conftest import REPO
from tests.processes import mapped_by

DENGINE = str(REPO / ".venv" / "bin" / "dengine")
COMMANDS = {
    "index": ["index"],
    "analyze": ["analyze", "--format", "json", "--memory-limit", "256K"],  # small: it spills
    "plan": ["plan", "--format", "json"],
}
POINTS = ["mapped", "cache-entry", "70%"]


@pytest.fixture(scope="module")
def dumps(real_dump: Callable[[str], Path], tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    folder = tmp_path_factory.mktemp("kill-dumps")
    out = []
    for name in ("alpha.kdump", "beta.qevm"):
        shutil.copyfile(real_dump(name), folder / name)
        out.append(folder / name)
    return out


def run(command: str, dumps: list[Path], cache: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [DENGINE, *COMMANDS[command], "--index-dir", str(cache), *map(str, dumps)],
        capture_output=True,
        text=True,
    )


def figures(command: str, stdout: str) -> object:
    if command == "index":
        # path, pages, zero pages (built/cached and the file name differ from run to run)
        return [line.split("\t")[:3] for line in stdout.splitlines()]
    return json.loads(stdout)


def kill_at(point: str, command: str, dumps: list[Path], cache: Path, clean_seconds: float) -> int | None:
    """Start ``command``, SIGKILL it at ``point``; its exit status (``None`` when killed)."""
    cache.mkdir()
    proc = subprocess.Popen(
        [DENGINE, *COMMANDS[command], "--index-dir", str(cache), *map(str, dumps)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    start = time.monotonic()
    deadline = start + 120
    try:
        while proc.poll() is None and time.monotonic() < deadline:
            if point == "mapped" and mapped_by(proc.pid, dumps[0]):
                break
            if point == "cache-entry" and any(os.scandir(cache)):
                break
            if point == "70%" and time.monotonic() - start >= 0.7 * clean_seconds:
                break
            time.sleep(0.0005)
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    return None if proc.returncode == -signal.SIGKILL else proc.returncode


def check_left_files(cache: Path) -> None:
    """Every cache entry left is whole and made for its key, or a temporary name no run reads."""
    for entry in cache.iterdir():
        name = entry.name
        if name.startswith((".tmp-", ".spill-")):
            continue  # never opened by a run: files are found by the digest of their key
        assert name.endswith((".idx", ".shr")), name
        if name.endswith(".idx"):
            found = files.read_header(entry, index_store.INDEX_MAGIC, index_store.INDEX_VERSION)
            assert found is not None, name
            assert index_store.read_index(entry, found[0]["key"]) is not None, f"{name} is torn"
            assert index_store.still_valid(entry)
        else:
            found = files.read_header(entry, sharing_store.SHARING_MAGIC, sharing_store.SHARING_VERSION)
            assert found is not None, name
            header, data, size = found
            dtype = np.uint32 if header["id_dtype"] == "uint32" else np.uint64
            total = sum(header["counts"])
            n = len(header["counts"])
            id_bytes = -(-np.dtype(dtype).itemsize * total // 8) * 8  # then the matrix, aligned
            assert size == data + id_bytes + 8 * n * n, f"{name} is torn"
            ids = np.memmap(entry, dtype=dtype, mode="r", offset=data, shape=(total,))
            matrix = np.fromfile(entry, dtype="<i8", count=n * n, offset=data + id_bytes)
            assert header["checksum"] == files.checksum((ids, matrix)), f"{name} is torn"
            assert sharing_store.load(entry, header["key"], [""] * n, header["counts"]) is not None
            assert sharing_store.still_valid(entry)


@pytest.mark.parametrize("command", list(COMMANDS))
def test_kill_9_leaves_nothing_a_later_run_would_misuse(
    tmp_path: Path, dumps: list[Path], command: str
) -> None:
    t0 = time.monotonic()
    clean = run(command, dumps, tmp_path / "clean")
    clean_seconds = time.monotonic() - t0
    assert clean.returncode == 0, clean.stderr
    expected = figures(command, clean.stdout)
    killed = 0
    for point in POINTS:
        cache = tmp_path / f"cache-{point.rstrip('%')}"
        status = kill_at(point, command, dumps, cache, clean_seconds)
        assert status in (None, 0), (point, status)  # killed, or it finished first
        killed += status is None
        check_left_files(cache)
        again = run(command, dumps, cache)
        assert again.returncode == 0, (point, again.stderr)
        assert figures(command, again.stdout) == expected, point
        check_left_files(cache)
        pruned = subprocess.run([DENGINE, "index", "--prune", "--index-dir", str(cache)], capture_output=True)
        assert pruned.returncode == 0
        assert [e.name for e in cache.iterdir() if e.name.startswith((".tmp-", ".spill-"))] == []
        if point == "cache-entry":  # (where a temporary file is usually caught half-written)
            # What prune keeps is what a normal run would use: figures again, from the cache.
            third = run(command, dumps, cache)
            assert figures(command, third.stdout) == expected, point
    assert killed >= 1  # the 'mapped' point comes before any result can be
