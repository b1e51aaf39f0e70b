"""The entry point sets the process up before numpy is imported: OpenBLAS on one thread."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from dengine_cli.parallel import cpu_count

COUNT_THREADS = "import numpy, os; print(len(os.listdir('/proc/self/task')))"


def threads_after_numpy(prepare: bool, openblas_threads: str | None) -> int:
    """Threads of a fresh interpreter once numpy is imported (after ``prepare_process`` or not)."""
    env = {k: v for k, v in os.environ.items() if k not in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS")}
    if openblas_threads is not None:
        env["OPENBLAS_NUM_THREADS"] = openblas_threads
    code = (
        "from dengine_cli.entry import prepare_process; prepare_process(); " if prepare else ""
    ) + COUNT_THREADS
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    return int(out.stdout)


needs_two_cpus = pytest.mark.skipif(cpu_count() < 2, reason="OpenBLAS starts one thread on one CPU anyway")


@needs_two_cpus
def test_numpy_starts_blas_threads_without_it() -> None:
    """The control: on this machine numpy alone starts OpenBLAS threads (else the tests below
    would prove nothing)."""
    assert threads_after_numpy(prepare=False, openblas_threads=None) > 1


def test_entry_gives_openblas_one_thread() -> None:
    assert threads_after_numpy(prepare=True, openblas_threads=None) == 1


@needs_two_cpus
def test_entry_keeps_a_thread_count_the_user_set() -> None:
    assert threads_after_numpy(prepare=True, openblas_threads="2") == 2


def test_ctrl_c_while_python_loads_the_modules_is_the_one_line() -> None:
    """SIGINT while Python loads dengine's modules (numpy's core mapped: the imports have begun),
    before the command takes signals its own way: it printed the traceback of the import it
    stopped; now the one line and exit 130, as later."""
    import signal
    import time
    from pathlib import Path

    from tests.conftest import REPO

    dengine = str(REPO / ".venv" / "bin" / "dengine")
    codes = []
    for _ in range(3):
        p = subprocess.Popen(
            [dengine, "formats"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        )
        maps = Path(f"/proc/{p.pid}/maps")
        deadline = time.monotonic() + 30
        while p.poll() is None and time.monotonic() < deadline:
            try:
                if "_multiarray_umath" in maps.read_text():
                    break
            except OSError:
                pass
            time.sleep(0.0002)
        p.send_signal(signal.SIGINT)
        _, err = p.communicate(timeout=60)
        assert "Traceback" not in err, err
        assert p.returncode in (130, 0), (p.returncode, err)  # 0: done before the signal came
        if p.returncode == 130:
            assert err.splitlines() == ["dengine: interrupted"]
        codes.append(p.returncode)
    assert 130 in codes
