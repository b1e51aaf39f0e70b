"""The entry point of the ``dengine`` script and of ``python -m dengine_cli``: it sets up the
process before numpy is imported, then runs the command (:func:`dengine_cli.cli.main`).

numpy's OpenBLAS starts a pool of threads when it is imported, one per CPU, which spin waiting
for work before they sleep; and again in every forked worker.  dengine multiplies no matrix
large enough for them to pay (the sharing matrix is one small product per partition), but on
2 CPUs their spinning took 0.12 CPU-s from each start of numpy and 0.2-0.3 CPU-s from a whole
``analyze`` or ``plan``, time the hashing workers wanted (wall 1.60 -> 1.34 s median over the
16-guest bench fleet).  So OpenBLAS gets one thread, unless ``OPENBLAS_NUM_THREADS`` is set.
"""

from __future__ import annotations

import contextlib
import os


def prepare_process() -> None:
    """What the process needs before numpy is imported: OpenBLAS on one thread (unless the
    environment already says how many)."""
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")


def main() -> None:
    """Run the ``dengine`` command line.  A Ctrl-C (or a SIGINT) that comes while Python still
    loads the modules, before the command takes signals its own way, ends it with the same
    line and status as later, not a traceback of the import it stopped."""
    prepare_process()
    try:
        from dengine_cli.cli import main as run

        run()
    except KeyboardInterrupt as e:  # a SIGTERM's Terminated too, past the command's own handling
        import signal
        import sys

        signum = getattr(e, "signum", signal.SIGINT)
        line = "interrupted" if signum == signal.SIGINT else f"terminated ({signal.Signals(signum).name})"
        with contextlib.suppress(OSError):
            sys.stderr.write(f"dengine: {line}\n")
        sys.exit(130 if signum == signal.SIGINT else 128 + signum)
