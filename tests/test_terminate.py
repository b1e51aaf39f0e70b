"""SIGTERM and SIGHUP (a job runner stopping the command, a terminal closed) stop it as Ctrl-C
does: the same cleanup (temporary files removed, workers reaped, no partial output, no store
begun), one line, exit 128 + the signal.  Before, they killed the command where it stood: a
decompressed dump half-written in $TMPDIR, a restored image's ``.part``, a store begun.

Each command is held (SIGSTOP) at a point where it has something to clean up, signalled, and let
go (SIGCONT), as tests/test_interrupt.py does for SIGINT."""

from __future__ import annotations

import lzma
import os
import random
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import REPO
from tests.processes import descendants, mapped_by
from tests.vms import text_page, write_raw_image

DENGINE = str(REPO / ".venv" / "bin" / "dengine")


def _default_signals() -> None:
    """In the child: the stopping signals at their default, whatever the test run inherited (a
    run under ``nohup`` ignores SIGHUP, one started in the background SIGINT, and a command keeps
    an ignored signal ignored)."""
    for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(s, signal.SIG_DFL)


def _held(
    cmd: list[str], ready: Callable[[int], bool], env: dict[str, str] | None = None
) -> subprocess.Popen[str]:
    """``cmd`` started in a session of its own and stopped once ``ready(pid)``."""
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        env={**os.environ, **(env or {})},
        preexec_fn=_default_signals,
    )
    deadline = time.monotonic() + 60
    while not ready(proc.pid) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.0005)
    os.killpg(proc.pid, signal.SIGSTOP)
    assert proc.poll() is None, "the command ended before it could be signalled"
    return proc


def _signalled(proc: subprocess.Popen[str], signum: int, to_group: bool) -> tuple[int, list[str]]:
    try:
        if to_group:
            os.killpg(proc.pid, signum)
        else:
            os.kill(proc.pid, signum)  # the supervising process, which passes it on
        os.killpg(proc.pid, signal.SIGCONT)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    return proc.returncode, err.splitlines()


@pytest.mark.parametrize("to_group", [False, True], ids=["process", "group"])
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP], ids=["TERM", "HUP"])
def test_a_plan_stopped_by_sigterm_or_sighup_leaves_nothing(
    real_dump: Callable[[str], Path], tmp_path: Path, signum: int, to_group: bool
) -> None:
    alpha, beta = real_dump("alpha.elf"), real_dump("beta.elf")
    out = tmp_path / "plan.json"
    cmd = [DENGINE, "plan", "--index-dir", str(tmp_path / "idx"), "-o", str(out), str(alpha), str(beta)]
    proc = _held(cmd, lambda pid: mapped_by(pid, alpha) or any(mapped_by(c, alpha) for c in descendants(pid)))
    children = descendants(proc.pid)
    code, err = _signalled(proc, signum, to_group)
    assert code == 128 + signum, err
    assert err == [f"dengine: terminated ({signal.Signals(signum).name})"]
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != "idx") == []
    assert not any(Path(f"/proc/{c}").exists() and _alive(c) for c in children)


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.fixture(scope="module")
def packed_image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A raw image of 96 MiB of text pages in an xz file: LZMA decodes it slowly enough that the
    command can be caught while the decompressed copy is being written."""
    folder = tmp_path_factory.mktemp("packed")
    rng = random.Random(5)
    pages = np.stack([np.frombuffer(text_page(rng), dtype=np.uint8) for _ in range(2048)])
    raw = write_raw_image(folder / "vm.raw", np.tile(pages, (12, 1)))
    packed = folder / "vm.raw.xz"
    packed.write_bytes(lzma.compress(raw.read_bytes(), preset=0))
    raw.unlink()
    return packed


def test_sigterm_while_a_dump_is_decompressed_removes_the_copy(packed_image: Path, tmp_path: Path) -> None:
    spill = tmp_path / "spill"
    spill.mkdir()
    out = tmp_path / "vm.raw"
    cmd = [
        DENGINE,
        "extract",
        "--dump-format",
        "raw",
        "--tmp-dir",
        str(spill),
        str(packed_image),
        "-o",
        str(out),
    ]
    proc = _held(cmd, lambda _pid: any(spill.iterdir()))
    assert [p.name for p in spill.iterdir()] != [], "caught before the copy was begun"
    code, err = _signalled(proc, signal.SIGTERM, to_group=False)
    assert (code, err) == (143, ["dengine: terminated (SIGTERM)"])
    assert list(spill.iterdir()) == [] and not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["spill"]


def _store(real_dump: Callable[[str], Path], tmp_path: Path) -> tuple[Path, Path]:
    plan = tmp_path / "plan.json"
    alpha, beta = real_dump("alpha.elf"), real_dump("beta.elf")
    made = [
        DENGINE,
        "-q",
        "plan",
        "--index-dir",
        str(tmp_path / "idx"),
        "-o",
        str(plan),
        str(alpha),
        str(beta),
    ]
    subprocess.run(made, check=True)
    store = tmp_path / "store"
    subprocess.run(
        [DENGINE, "-q", "apply", "--pack", str(plan), "-o", str(store)], check=True, stdout=subprocess.DEVNULL
    )
    return plan, store


def test_sigterm_stops_apply_and_restore_with_nothing_begun_left(
    real_dump: Callable[[str], Path], tmp_path: Path
) -> None:
    plan, store = _store(real_dump, tmp_path)
    alpha = real_dump("alpha.elf")
    new_store = tmp_path / "new-store"
    proc = _held(
        [DENGINE, "apply", "--pack", str(plan), "-o", str(new_store)],
        lambda pid: mapped_by(pid, alpha) and new_store.exists(),
    )
    code, err = _signalled(proc, signal.SIGTERM, to_group=False)
    assert (code, err) == (143, ["dengine: terminated (SIGTERM)"])
    assert not new_store.exists()
    images = tmp_path / "images"
    proc = _held(
        [DENGINE, "restore", str(store), "-o", str(images)],
        lambda _pid: images.is_dir() and any(images.iterdir()),
    )
    code, err = _signalled(proc, signal.SIGTERM, to_group=False)
    assert (code, err) == (143, ["dengine: terminated (SIGTERM)"])
    assert not images.exists()
