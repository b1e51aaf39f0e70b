"""A dump argument that is not a file: a directory, a FIFO.  Every command that reads dumps
refuses it with the same one line and exit 3 before opening it: a FIFO that nothing writes to
made every command wait for ever in open()."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from dengine_cli.errors import EXIT_UNREADABLE
from tests.conftest import REPO

DENGINE = str(REPO / ".venv" / "bin" / "dengine")

COMMANDS = {
    "info": ["info"],
    "extract": ["extract", "-o", "{out}/x.raw"],
    "index": ["index"],
    "analyze": ["analyze"],
    "plan": ["plan"],
    "report": ["report", "-o", "{out}/r.html"],
}

REASONS = {
    "directory": "is a directory",
    "fifo": "is a FIFO (a pipe): dumps are read in place, from a file",
}


def special(kind: str, tmp_path: Path) -> Path:
    path = tmp_path / f"vm-{kind}.elf"
    if kind == "directory":
        path.mkdir()
    else:
        os.mkfifo(path)
    return path


def dengine(*args: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache")}
    return subprocess.run([DENGINE, *args], capture_output=True, text=True, timeout=60, env=env)


@pytest.mark.parametrize("kind", sorted(REASONS))
@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_a_dump_that_is_no_file_is_refused_by_every_command(command: str, kind: str, tmp_path: Path) -> None:
    path = special(kind, tmp_path)
    (tmp_path / "out").mkdir()
    args = [a.format(out=tmp_path / "out") for a in COMMANDS[command]]
    r = dengine("-q", *args, str(path), tmp_path=tmp_path)
    assert r.returncode == EXIT_UNREADABLE, r.stderr
    assert r.stderr.splitlines() == [f"dengine: {path}: cannot read: {REASONS[kind]}"]
    assert list((tmp_path / "out").iterdir()) == []


def test_an_earlier_snapshot_that_is_a_fifo_is_refused(
    real_dump: Callable[[str], Path], tmp_path: Path
) -> None:
    alpha = str(real_dump("alpha.elf"))
    fifo = special("fifo", tmp_path)
    r = dengine("-q", "plan", "--history", f"{alpha}={fifo}", alpha, tmp_path=tmp_path)
    assert r.returncode == EXIT_UNREADABLE, r.stderr
    assert r.stderr.splitlines() == [f"dengine: {fifo}: cannot read: {REASONS['fifo']}"]


@pytest.mark.parametrize("kind", ["fifo", "device"])
def test_a_plan_file_that_is_no_file_is_refused_at_once(kind: str, tmp_path: Path) -> None:
    """``apply FIFO`` waited for ever in ``open`` (a Ctrl-C unheard), and a device was read as
    a plan: both refused before they are opened."""
    plan = Path("/dev/zero") if kind == "device" else tmp_path / "plan.json"
    if kind == "fifo":
        os.mkfifo(plan)
    r = dengine("-q", "apply", str(plan), "-o", str(tmp_path / "store"), tmp_path=tmp_path)
    assert r.returncode == EXIT_UNREADABLE, r.stderr
    what = "a FIFO (a pipe)" if kind == "fifo" else "not a regular file"
    assert r.stderr.splitlines() == [
        f"dengine: {plan}: cannot read: is {what}: a plan file is read in place, from a file"
    ]
    assert not (tmp_path / "store").exists()
