"""`-o` targets that are not plain files: a character device (``-o /dev/null``), a FIFO
(``-o >(gzip > x.gz)``), a symbolic link.  Written through, never renamed over: renaming the
temporary file over /dev/null, as root, put a file where the device was.  The devices here are
made in the test's directory (``mknod`` needs root: skipped otherwise), never the system's."""

from __future__ import annotations

import os
import stat
import subprocess
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from dengine_cli.errors import EXIT_OUTPUT
from tests.conftest import REPO

DENGINE = str(REPO / ".venv" / "bin" / "dengine")


def run(*args: str, cache: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [DENGINE, "-q", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "XDG_CACHE_HOME": str(cache)},
    )


def char_device(path: Path, minor: int) -> Path:
    """A character device of the memory driver at ``path``: minor 3 is null, 7 is full."""
    try:
        os.mknod(path, stat.S_IFCHR | 0o666, os.makedev(1, minor))
    except PermissionError:
        pytest.skip("mknod needs root")
    return path


@contextmanager
def reading(fifo: Path) -> Iterator[Callable[[], bytes]]:
    """A process reading ``fifo`` to its end into a file (a pipe would fill and stop the writer);
    yields what gives what it read (once the writer is done).  Killed if nothing ever opens the
    FIFO for writing."""
    got = fifo.with_name(fifo.name + ".read")
    with open(got, "wb") as out:
        reader = subprocess.Popen(["cat", str(fifo)], stdout=out)

    def read() -> bytes:
        reader.wait(timeout=30)
        return got.read_bytes()

    try:
        yield read
    finally:
        if reader.poll() is None:
            reader.kill()
            reader.wait()
        got.unlink()


@pytest.mark.parametrize("command", ["extract", "plan", "report"])
def test_a_character_device_is_written_through(
    command: str, real_dump: Callable[[str], Path], tmp_path: Path
) -> None:
    """`-o NULL`, NULL a null device: exit 0 and NULL is still the device; to a full device: exit
    6, one line saying so, and the device is still there."""
    alpha = str(real_dump("alpha.elf"))
    null, full = char_device(tmp_path / "null", 3), char_device(tmp_path / "full", 7)
    args = {"extract": ["extract", alpha], "plan": ["plan", alpha], "report": ["report", alpha]}[command]
    r = run(*args, "-o", str(null), cache=tmp_path / "cache")
    assert r.returncode == 0, r.stderr
    assert stat.S_ISCHR(null.lstat().st_mode)
    r = run(*args, "-o", str(full), cache=tmp_path / "cache")
    assert r.returncode == EXIT_OUTPUT
    assert r.stderr.splitlines() == [f"dengine: {full}: cannot write: No space left on device"]
    assert stat.S_ISCHR(full.lstat().st_mode)
    assert {p.name for p in tmp_path.iterdir()} <= {"cache", "full", "null"}


def test_a_fifo_gets_the_plan_file(real_dump: Callable[[str], Path], tmp_path: Path) -> None:
    """`plan -o FIFO` writes the plan file into the FIFO (what `-o file` would hold), and
    `extract -o FIFO` the flat image, its holes as zeros; the FIFO stays a FIFO."""
    alpha = str(real_dump("alpha.elf"))
    cache = tmp_path / "cache"
    r = run("plan", alpha, "-o", str(tmp_path / "plan.json"), cache=cache)
    assert r.returncode == 0, r.stderr
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with reading(fifo) as got:
        r = run("plan", alpha, "-o", str(fifo), cache=cache)
        assert r.returncode == 0, r.stderr
        assert got() == (tmp_path / "plan.json").read_bytes()
    assert stat.S_ISFIFO(fifo.lstat().st_mode)
    r = run("extract", alpha, "-o", str(tmp_path / "alpha.raw"), cache=cache)
    assert r.returncode == 0, r.stderr
    with reading(fifo) as got:
        r = run("extract", alpha, "-o", str(fifo), cache=cache)
        assert r.returncode == 0, r.stderr
        assert got() == (tmp_path / "alpha.raw").read_bytes()
    assert stat.S_ISFIFO(fifo.lstat().st_mode)


def test_a_symbolic_link_keeps_naming_the_file_it_names(
    real_dump: Callable[[str], Path], tmp_path: Path
) -> None:
    """`extract -o LINK` replaces the file LINK names (atomically, as any output) and leaves
    the link a link."""
    alpha = str(real_dump("alpha.elf"))
    (tmp_path / "images").mkdir()
    target = tmp_path / "images" / "alpha.raw"
    target.write_bytes(b"old")
    link = tmp_path / "alpha.raw"
    link.symlink_to(target)
    r = run("extract", alpha, "-o", str(link), cache=tmp_path / "cache")
    assert r.returncode == 0, r.stderr
    assert link.is_symlink() and link.resolve() == target
    r = run("extract", alpha, "-o", str(tmp_path / "direct.raw"), cache=tmp_path / "cache")
    assert r.returncode == 0, r.stderr
    assert target.read_bytes() == (tmp_path / "direct.raw").read_bytes()
    assert sorted(p.name for p in (tmp_path / "images").iterdir()) == ["alpha.raw"]
