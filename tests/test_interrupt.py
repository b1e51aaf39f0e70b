"""SIGINT sent to the `dengine` process (`kill -INT`, `timeout -s INT`, a job runner: no terminal
in sight) interrupts the command as Ctrl-C does: exit 130, one line, no output file.  The
command runs in a child of a supervising process, which ignored SIGINT (Ctrl-C reaches the child
through the terminal's process group) and so made such an interrupt do nothing."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from tests.conftest import REPO
from tests.processes import mapped_by

DENGINE = str(REPO / ".venv" / "bin" / "dengine")
EXIT_INTERRUPTED = 130


def test_sigint_to_the_process_interrupts_it(real_dump: Callable[[str], Path], tmp_path: Path) -> None:
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
    assert proc.returncode == EXIT_INTERRUPTED, err
    assert err.splitlines() == ["dengine: interrupted"]
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != "idx") == []
