"""SIGINT sent to the `dengine` process (`kill -INT`, `timeout -s INT`, a job runner: no terminal
in sight) interrupts the command as Ctrl-C does: exit 130, one line, no output file.  The
command runs in a child of a supervising process, which ignored SIGINT (Ctrl-C reaches the child
through the terminal's process group) and so made such an interrupt do nothing.

A command started with SIGINT ignored (``cmd &`` in a script, ``nohup``-like runners) keeps it
ignored, as every Unix tool does: it runs to the end.  The test sets the disposition it starts
the command with, so it does not depend on how the test run itself was started (started in the
background, pytest inherits SIGINT ignored and would pass that on)."""

from __future__ import annotations

import contextlib
import fcntl
import os
import pty
import signal
import subprocess
import sys
import termios
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import REPO
from tests.processes import mapped_by

DENGINE = str(REPO / ".venv" / "bin" / "dengine")
EXIT_INTERRUPTED = 130


@pytest.mark.parametrize("to_group", [False, True], ids=["process", "group"])
@pytest.mark.parametrize("inherited", [signal.SIG_DFL, signal.SIG_IGN], ids=["default", "ignored"])
def test_sigint_to_the_process_interrupts_it(
    real_dump: Callable[[str], Path], tmp_path: Path, inherited: signal.Handlers, to_group: bool
) -> None:
    """``kill -INT PID`` reaches the supervisor alone, which passes it on; ``kill -INT -PGID``
    (a job runner stopping a group) reaches both, and the command takes the second in its stride."""
    alpha, beta = real_dump("alpha.elf"), real_dump("beta.elf")
    out = tmp_path / "plan.json"
    proc = subprocess.Popen(
        [
            DENGINE,
            "plan",
            "-j",
            "1",
            "--index-dir",
            str(tmp_path / "idx"),
            "-o",
            str(out),
            str(alpha),
            str(beta),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # no controlling terminal, as under a job runner
        preexec_fn=lambda: signal.signal(signal.SIGINT, inherited),
    )
    try:
        deadline = time.monotonic() + 60
        while not mapped_by(proc.pid, alpha) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.0005)
        os.killpg(proc.pid, signal.SIGSTOP)  # hold it there: the interrupt comes before the end
        assert proc.poll() is None, "the command ended before it could be interrupted"
        if to_group:
            os.killpg(proc.pid, signal.SIGINT)
        else:
            os.kill(proc.pid, signal.SIGINT)  # the supervising process only, as kill -INT PID does
        os.killpg(proc.pid, signal.SIGCONT)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    if inherited == signal.SIG_IGN:
        assert proc.returncode == 0, err
        assert out.is_file()
        return
    assert proc.returncode == EXIT_INTERRUPTED, err
    assert err.splitlines() == ["dengine: interrupted"]
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != "idx") == []


def group_members(pgid: int) -> list[int]:
    """The processes of process group ``pgid`` still there (zombies included)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid:
            found.append(int(stat.parent.name))
    return found


def _on_terminal(slave: int) -> Callable[[], None]:
    def make_controlling() -> None:  # runs in the child, after setsid
        fcntl.ioctl(slave, termios.TIOCSCTTY, 0)
        signal.signal(signal.SIGINT, signal.SIG_DFL)

    return make_controlling


@pytest.mark.parametrize("how", ["ctrl-c", "kill"])
def test_on_a_terminal_ctrl_c_and_kill_int_both_interrupt(
    real_dump: Callable[[str], Path], tmp_path: Path, how: str
) -> None:
    """dengine in the foreground of its terminal (a pseudo-terminal here): Ctrl-C (the kernel's
    SIGINT to the foreground group) and ``kill -INT PID`` from elsewhere (the supervisor's
    alone) both interrupt it once: exit 130, one line, no output file, no process left.  The
    supervisor used to ignore every SIGINT while its terminal's foreground was its group."""
    alpha, beta = real_dump("alpha.elf"), real_dump("beta.elf")
    out = tmp_path / "plan.json"
    master, slave = pty.openpty()
    argv = [DENGINE, "plan", "-j", "1", "--index-dir", str(tmp_path / "idx"), "-o", str(out)]
    proc = subprocess.Popen([*argv, str(alpha), str(beta)], stdin=slave, stdout=slave, stderr=slave,
                            start_new_session=True, preexec_fn=_on_terminal(slave))  # fmt: skip
    os.close(slave)
    seen = bytearray()

    def drain() -> None:
        with contextlib.suppress(OSError):  # EIO once the terminal's last user closes it
            while chunk := os.read(master, 65536):
                seen.extend(chunk)

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 60
        while not mapped_by(proc.pid, alpha) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.0005)
        os.killpg(proc.pid, signal.SIGSTOP)
        assert proc.poll() is None, "the command ended before it could be interrupted"
        if how == "ctrl-c":
            os.write(master, b"\x03")
        else:
            os.kill(proc.pid, signal.SIGINT)
        os.killpg(proc.pid, signal.SIGCONT)
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    reader.join(timeout=10)
    os.close(master)
    text = seen.decode(errors="replace")
    assert proc.returncode == EXIT_INTERRUPTED, text
    assert text.count("dengine: interrupted") == 1, text
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != "idx") == []
    deadline = time.monotonic() + 10
    while group_members(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert group_members(proc.pid) == []


ONCE = """
import os, signal, sys, time
from dengine_cli.cli import interrupt_once
signal.signal(signal.SIGINT, interrupt_once)
try:
    os.kill(os.getpid(), signal.SIGINT)
    time.sleep(5)
    print("not interrupted")
except KeyboardInterrupt:
    os.kill(os.getpid(), signal.SIGINT)  # a second one, while the first is handled
    time.sleep(0.2)
    print("cleanup done", flush=True)
"""


def test_a_second_sigint_does_not_interrupt_the_cleanup_of_the_first() -> None:
    r = subprocess.run([sys.executable, "-c", ONCE], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert (r.returncode, r.stdout, r.stderr) == (0, "cleanup done\n", "")
