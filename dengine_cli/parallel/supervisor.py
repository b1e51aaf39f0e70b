"""The `dengine` command runs in a forked child of a small supervising process, so that a SIGBUS
is a one-line error and not a crash.

Dumps are read through memory mappings.  When a mapped file shrinks, the next touch of a page
past its new end raises SIGBUS, which no Python code can catch: the process dies.  The readers
check a dump is unchanged before every batch and read with ``pread`` where that is cheap
(:meth:`dengine_cli.formats.base.Dump.check_unchanged`), but a file cut within the few
milliseconds between a check and the reads it guards can still kill the process that reads.
The supervisor, which maps nothing, outlives it and reports: ``dengine: FILE: cannot read: it
changed while being read (dengine died of SIGBUS reading it)``, exit 3, naming the dump files
of the command line whose size or mtime changed.

The child does all the work with the terminal, standard input and output it inherits; the
supervisor only waits, with the signals it watches blocked and taken by ``sigwaitinfo``, which
says who sent each.  Ctrl-C comes from the kernel (``SI_KERNEL``) to the terminal's foreground
process group, the child included: the supervisor lets it be and leaves with the child's
status.  A SIGINT a process sent (``kill -INT``, ``timeout -s INT``, a job runner; in the
foreground of a terminal or not) reached the supervisor alone, and is passed on, as SIGTERM,
SIGHUP and SIGQUIT are.  A supervisor killed outright takes the child with it
(PR_SET_PDEATHSIG), as forked workers are taken with the command.  Any other death of the child
is the supervisor's own: it dies of the same signal.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
from collections.abc import Callable, Sequence

#: prctl(2) option: the signal a child gets when its parent dies.
_PR_SET_PDEATHSIG = 1
#: The exit status of an unreadable dump (dengine_cli.errors.EXIT_UNREADABLE).
_EXIT_UNREADABLE = 3
_PASSED_ON = (signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT)
#: What the supervisor waits for: its child's end and the signals it may pass on.
_WATCHED = frozenset({signal.SIGCHLD, signal.SIGINT, *_PASSED_ON})
#: siginfo's si_code of a signal the kernel sent (the terminal's Ctrl-C), not a process.
_SI_KERNEL = 0x80


def supervised(run: Callable[[], None], argv: Sequence[str]) -> None:
    """``run()`` in a forked child; this process waits and leaves with its status.  Without
    ``fork`` (or with ``DENGINE_NO_SUPERVISOR`` set) ``run()`` runs here."""
    if not hasattr(os, "fork") or sys.platform == "darwin" or os.environ.get("DENGINE_NO_SUPERVISOR"):
        run()
        return
    files = {arg: _identity(arg) for arg in argv if not arg.startswith("-") and os.path.isfile(arg)}
    parent = os.getpid()
    # Blocked before the fork, so that none is missed: pending, sigwaitinfo takes it.
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, _WATCHED)
    pid = os.fork()
    if pid == 0:
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        _die_with(parent)
        run()
        return
    os._exit(_wait(pid, files))


def _die_with(parent: int) -> None:  # pragma: no cover - runs in the child
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            import ctypes

            ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:
        os._exit(1)


def _wait(pid: int, files: dict[str, tuple[int, int] | None]) -> int:
    """Wait for the child (its SIGCHLD), passing on what a process sent meanwhile; the status
    this process leaves with."""
    while True:
        info = signal.sigwaitinfo(_WATCHED)
        if info.si_signo == signal.SIGCHLD:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done == pid:
                break
        elif not (info.si_signo == signal.SIGINT and info.si_code == _SI_KERNEL):
            _pass_on(pid, info.si_signo)
    if os.WIFEXITED(status):
        return os.WEXITSTATUS(status)
    sig = os.WTERMSIG(status)
    if sig == signal.SIGBUS:
        changed = [name for name, before in files.items() if _identity(name) != before]
        for name in changed or ["a dump"]:
            with contextlib.suppress(OSError):
                os.write(
                    2,
                    f"dengine: {name}: cannot read: it changed while being read (dengine died of "
                    "SIGBUS reading it)\n".encode(),
                )
            break  # one line
        return _EXIT_UNREADABLE
    signal.signal(sig, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {sig})
    os.kill(os.getpid(), sig)
    return 128 + sig


def _pass_on(pid: int, signum: int) -> None:
    with contextlib.suppress(OSError):
        os.kill(pid, signum)


def _identity(path: str) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_size, st.st_mtime_ns
