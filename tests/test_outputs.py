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


@pytest.mark.parametrize(
    "args",
    [["--version"], ["formats"], ["info", "{a}"], ["plan", "--format", "json", "{a}"], ["verify", "{s}"]],
    ids=lambda a: a[0],
)
def test_a_full_standard_output_is_an_output_that_cannot_be_written(
    real_dump: Callable[[str], Path], tmp_path: Path, args: list[str]
) -> None:
    """Standard output on a full disk (a device like /dev/full): exit 6 and one line, as for any
    output; it was an internal error (exit 1) that blamed dengine."""
    alpha = real_dump("alpha.elf")
    store = tmp_path / "store"
    if "{s}" in args:
        assert run("plan", "-o", str(tmp_path / "p.json"), str(alpha), cache=tmp_path).returncode == 0
        assert run("apply", str(tmp_path / "p.json"), "-o", str(store), cache=tmp_path).returncode == 0
    full = char_device(tmp_path / "full", 7)
    with open(full, "w") as out:
        r = subprocess.run(
            [DENGINE, "-q", *[a.format(a=alpha, s=store) for a in args]],
            stdout=out,
            stderr=subprocess.PIPE,
            text=True,
            timeout=120,
            env={**os.environ, "XDG_CACHE_HOME": str(tmp_path)},
        )
    assert r.returncode == EXIT_OUTPUT, r.stderr
    assert r.stderr.splitlines() == ["dengine: standard output: cannot write: No space left on device"]


def test_an_output_that_is_an_input_is_refused_and_the_input_kept(
    real_dump: Callable[[str], Path], tmp_path: Path
) -> None:
    """An output named as an input (the same name, a symbolic or a hard link) was renamed over
    it: the dump, the plan file gone.  Refused before any work, exit 6, the input unchanged."""
    dump = tmp_path / "vm.elf"
    dump.write_bytes(real_dump("alpha.elf").read_bytes())
    (tmp_path / "link.elf").symlink_to(dump)
    os.link(dump, tmp_path / "hard.elf")
    plan = tmp_path / "plan.json"
    assert run("plan", "-o", str(plan), str(dump), cache=tmp_path / "c").returncode == 0
    before = {p.name: p.read_bytes() for p in (dump, plan)}
    listing = sorted(p.name for p in tmp_path.iterdir())
    for args, named in [
        (["extract", str(dump), "-o", str(dump)], dump),
        (["plan", "-o", str(tmp_path / "link.elf"), str(dump)], tmp_path / "link.elf"),
        (["report", "-o", str(tmp_path / "hard.elf"), str(dump)], tmp_path / "hard.elf"),
        (["report", "--json", str(plan), "-o", str(tmp_path / "r.html"), str(plan)], plan),
    ]:
        r = run(*args, cache=tmp_path / "c")
        assert r.returncode == EXIT_OUTPUT, (args, r.stderr)
        assert r.stderr.splitlines() == [
            f"dengine: {named}: cannot write: it is one of this command's inputs"
        ]
    assert {p.name: p.read_bytes() for p in (dump, plan)} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == listing


def test_restore_into_the_store_it_reads_is_refused(real_dump: Callable[[str], Path], tmp_path: Path) -> None:
    plan, store = tmp_path / "plan.json", tmp_path / "store"
    assert run("plan", "-o", str(plan), str(real_dump("alpha.elf")), cache=tmp_path).returncode == 0
    assert run("apply", str(plan), "-o", str(store), cache=tmp_path).returncode == 0
    files = sorted(p.relative_to(store) for p in store.rglob("*"))
    for target, why in [
        (store / "catalog.sqlite", "it is inside the store this command reads"),
        (store / "images", "it is inside the store this command reads"),
        (store, "it is the store this command reads"),
    ]:
        r = run(
            "restore",
            str(store),
            *(["0"] if target.name == "catalog.sqlite" else []),
            "-o",
            str(target),
            cache=tmp_path,
        )
        assert r.returncode == EXIT_OUTPUT, r.stderr
        assert r.stderr.splitlines() == [f"dengine: {target}: cannot write: {why}"]
    assert sorted(p.relative_to(store) for p in store.rglob("*")) == files
    assert run("verify", str(store), cache=tmp_path).returncode == 0
