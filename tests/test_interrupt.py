"""SIGINT sent to the `dengine` process (`kill -INT`, `timeout -s INT`, a job runner: no terminal
in sight) interrupts the command as Ctrl-C does: exit 130, one line, no output file.  The
command runs in a child of a supervising process, which ignored SIGINT (Ctrl-C reaches the child
through the terminal's process group) and so made such an interrupt do nothing.

A command started with SIGINT ignored (``cmd &`` in a script, ``nohup``-like runners) keeps it
ignored, as every Unix tool does: it runs to the end.  The test sets the disposition it starts
the command with, so it does not depend on how the test run itself was started (started in the
background, pytest inherits SIGINT ignored and would pass that on)."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import REPO
from tests.processes import mapped_by

DENGINE = str(REPO / ".venv" / "bin" / "dengine")
EXIT_INTERRUPTED = 130


@pytest.mark.parametrize("inherited", [signal.SIG_DFL, signal.SIG_IGN], ids=["default", "ignored"])
def test_sigint_to_the_process_interrupts_it(
    real_dump: Callable[[str], Path], tmp_path: Path, inherited: signal.Handlers
) -> None:
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
