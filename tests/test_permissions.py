"""Files and folders a user may not read or search: as root every check passes, so the commands
run here as ``nobody`` (setpriv).  A dump it may not read is exit 3, an output or store in a
folder it may not search is exit 6 (or 3 to read), each one line: pathlib's exists() and
is_file() raise PermissionError there, which was an internal error."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from dengine_cli.errors import EXIT_OUTPUT, EXIT_UNREADABLE, EXIT_USAGE
from tests.conftest import REPO
from tests.vms import write_raw_image

DENGINE = str(REPO / ".venv" / "bin" / "dengine")
SETPRIV = shutil.which("setpriv")

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or SETPRIV is None, reason="needs root and setpriv to run as nobody"
)


@pytest.fixture
def shared() -> Iterator[Path]:
    """A folder everyone may read (pytest's own are root's alone): a dump, a plan and a store of
    it made by root, a folder only root may search, and a cache folder for nobody."""
    folder = Path(tempfile.mkdtemp(prefix="dengine-perm-"))
    try:
        folder.chmod(0o755)
        pages = np.zeros((8, 4096), dtype=np.uint8)
        pages[1::2] = np.arange(4, dtype=np.uint8)[:, None] + 1
        write_raw_image(folder / "vm.raw", pages).chmod(0o644)
        write_raw_image(folder / "secret.raw", pages).chmod(0o000)
        (folder / "locked").mkdir(mode=0o700)
        (folder / "cache").mkdir()
        (folder / "cache").chmod(0o777)  # mkdir's mode is under the umask
        as_root("plan", "-o", str(folder / "plan.json"), str(folder / "vm.raw"), cache=folder / "root-cache")
        as_root("apply", str(folder / "plan.json"), "-o", str(folder / "store"), cache=folder / "root-cache")
        as_root(
            "apply", str(folder / "plan.json"), "-o", str(folder / "locked" / "store"), cache=folder / "c"
        )
        for p in [folder / "plan.json", *(folder / "store").rglob("*")]:
            p.chmod(0o755 if p.is_dir() else 0o644)
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def as_root(*args: str, cache: Path) -> None:
    env = {**os.environ, "XDG_CACHE_HOME": str(cache)}
    r = subprocess.run([DENGINE, "-q", *args], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr


def as_nobody(*args: str, shared: Path) -> subprocess.CompletedProcess[str]:
    assert SETPRIV is not None
    env = {**os.environ, "HOME": str(shared / "cache"), "XDG_CACHE_HOME": str(shared / "cache")}
    command = [SETPRIV, "--reuid=nobody", "--regid=nogroup", "--clear-groups", DENGINE, "-q", *args]
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=120)


@pytest.mark.parametrize(
    ("args", "code", "line"),
    [
        (["info", "{d}/secret.raw"], EXIT_UNREADABLE, "{d}/secret.raw: cannot read: Permission denied"),
        (["analyze", "{d}/secret.raw"], EXIT_UNREADABLE, "{d}/secret.raw: cannot read: Permission denied"),
        (
            ["extract", "{d}/vm.raw", "-o", "{d}/locked/x.raw"],
            EXIT_OUTPUT,
            "{d}/locked/x.raw: cannot write: Permission denied",
        ),
        (
            ["plan", "{d}/vm.raw", "-o", "{d}/locked/p.json"],
            EXIT_OUTPUT,
            "{d}/locked/p.json: cannot write: Permission denied",
        ),
        (
            ["report", "{d}/vm.raw", "-o", "{d}/cache/r.html", "--json", "{d}/locked/r.json"],
            EXIT_OUTPUT,
            "{d}/locked/r.json: cannot write: Permission denied",
        ),
        (
            ["apply", "{d}/plan.json", "-o", "{d}/locked/s"],
            EXIT_OUTPUT,
            "{d}/locked/s: cannot write: Permission denied",
        ),
        (
            ["restore", "{d}/store", "0", "-o", "{d}/locked/x.raw"],
            EXIT_OUTPUT,
            "{d}/locked/x.raw: cannot write: Permission denied",
        ),
        (
            ["restore", "{d}/store", "-o", "{d}/locked/images"],
            EXIT_OUTPUT,
            "{d}/locked/images: cannot write: Permission denied",
        ),
        (
            ["plan", "{d}/vm.raw", "--tmp-dir", "{d}/locked"],
            EXIT_USAGE,
            "plan: Invalid value for '--tmp-dir': Directory '{d}/locked' is not readable; "
            "see 'dengine plan --help'",
        ),
        (
            ["apply", "{d}/plan.json", "-o", "{d}/s", "--tmp-dir", "{d}/locked"],
            EXIT_USAGE,
            "apply: Invalid value for '--tmp-dir': Directory '{d}/locked' is not readable; "
            "see 'dengine apply --help'",
        ),
        (["verify", "{d}/locked/store"], EXIT_UNREADABLE, "{d}/locked/store: cannot read: Permission denied"),
        (
            ["restore", "{d}/locked/store", "-o", "{d}/x.raw"],
            EXIT_UNREADABLE,
            "{d}/locked/store: cannot read: Permission denied",
        ),
    ],
    ids=lambda v: v[0] if isinstance(v, list) else None,
)
def test_what_this_user_may_not_touch_is_one_line(
    shared: Path, args: list[str], code: int, line: str
) -> None:
    before = sorted(p.relative_to(shared) for p in shared.rglob("*") if "cache" not in p.parts)
    r = as_nobody(*[a.format(d=shared) for a in args], shared=shared)
    assert r.returncode == code, r.stderr
    assert r.stderr.splitlines() == ["dengine: " + line.format(d=shared)]
    assert sorted(p.relative_to(shared) for p in shared.rglob("*") if "cache" not in p.parts) == before
