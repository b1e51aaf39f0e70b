"""The errors a user can cause, each with its exit code.

Every error dengine reports to a user is a DengineError: the CLI prints ``dengine: <message>`` on
one line and exits with ``exit_code``.  Anything else escaping to the CLI is a bug (exit 1).

Exit codes (documented in the README and ``man/dengine.1``):

====  ===========================================================================
0     success
1     internal error (a bug in dengine; ``--debug`` shows the traceback)
2     usage error (bad option or argument)
3     a file cannot be opened or read (missing, permission, I/O error)
4     a dump is malformed: unknown format, wrong magic, truncated, a lying header
5     a dump uses a feature dengine does not support (codec, stream flag, layout)
6     an output cannot be written (the partial output is removed)
7     a page store fails its checks (``verify``, ``restore``): a checksum, a missing,
      truncated or unreadable pack, a missing reference, a catalog row outside a pack
8     a plan file no longer matches its dumps (a dump changed since the plan was made)
====  ===========================================================================
"""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Any

EXIT_OK = 0
EXIT_INTERNAL = 1
EXIT_USAGE = 2
EXIT_UNREADABLE = 3
EXIT_BAD_DUMP = 4
EXIT_UNSUPPORTED = 5
EXIT_OUTPUT = 6
EXIT_DAMAGED = 7
EXIT_STALE = 8


class DengineError(Exception):
    """Base of every error a user can cause; ``str()`` is the whole one-line message."""

    exit_code = EXIT_INTERNAL

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message

    def __reduce__(self) -> tuple[Any, ...]:
        # Subclasses take their fields as keyword arguments, which default pickling cannot pass:
        # rebuild from the fields, so an error raised in a worker process reaches the parent.
        return (_rebuild_error, (type(self), dict(self.__dict__)))


def _rebuild_error(cls: type[DengineError], fields: dict[str, Any]) -> DengineError:
    error = cls.__new__(cls)
    Exception.__init__(error, fields.get("message", ""))
    error.__dict__.update(fields)
    return error


class UnreadableFile(DengineError):
    """A path that cannot be opened or read."""

    exit_code = EXIT_UNREADABLE

    def __init__(self, path: Path | str, reason: str) -> None:
        super().__init__(f"{path}: cannot read: {reason}")
        self.path = str(path)
        self.reason = reason


class FormatError(DengineError):
    """A dump that does not hold what its format says: names the file, the hex offset, what was
    expected there and what was found."""

    exit_code = EXIT_BAD_DUMP

    def __init__(self, path: Path | str, offset: int, *, expected: str, found: str) -> None:
        super().__init__(f"{path}: at offset {offset:#x}: expected {expected}, found {found}")
        self.path = str(path)
        self.offset = offset
        self.expected = expected
        self.found = found


class UnsupportedFeature(DengineError):
    """A well-formed dump using something dengine cannot read (a codec, a stream flag...)."""

    exit_code = EXIT_UNSUPPORTED

    def __init__(self, path: Path | str, offset: int, *, feature: str) -> None:
        super().__init__(f"{path}: at offset {offset:#x}: unsupported {feature}")
        self.path = str(path)
        self.offset = offset
        self.feature = feature


class OutputError(DengineError):
    """An output file that cannot be written."""

    exit_code = EXIT_OUTPUT

    def __init__(self, path: Path | str, reason: str) -> None:
        super().__init__(f"{path}: cannot write: {reason}")
        self.path = str(path)
        self.reason = reason


class UsageError(DengineError):
    """A request that cannot be carried out as asked (beyond what option parsing catches)."""

    exit_code = EXIT_USAGE


class StoreDamaged(DengineError):
    """A page store whose data or catalog fails a check: names the store and what failed (the
    VM and gfn where a page is concerned)."""

    exit_code = EXIT_DAMAGED

    def __init__(self, store: Path | str, problem: str) -> None:
        super().__init__(f"{store}: damaged store: {problem}")
        self.store = str(store)
        self.problem = problem


class StalePlan(DengineError):
    """A plan file whose dumps are not as they were when it was made."""

    exit_code = EXIT_STALE

    def __init__(self, plan: Path | str, problem: str) -> None:
        super().__init__(f"{plan}: {problem}")
        self.plan = str(plan)
        self.problem = problem


class BadPlanFile(DengineError):
    """A file that is not a plan file dengine can apply: not JSON, another schema, missing or
    inconsistent columns."""

    exit_code = EXIT_BAD_DUMP

    def __init__(self, plan: Path | str, problem: str, *, exit_code: int = EXIT_BAD_DUMP) -> None:
        super().__init__(f"{plan}: {problem}")
        self.plan = str(plan)
        self.problem = problem
        self.exit_code = exit_code


#: Signals that stop a command (Ctrl-C, a job runner's SIGTERM, a closed terminal's SIGHUP): held
#: while a worker is forked or a temporary copy made, so that its cleanup cannot miss it.
STOPPING_SIGNALS = frozenset({signal.SIGINT, signal.SIGTERM, signal.SIGHUP})


class Terminated(KeyboardInterrupt):
    """SIGTERM or SIGHUP (a job runner stopping the command, a terminal closed): taken as Ctrl-C
    is, so that the same cleanup runs (temporary files removed, workers reaped, no partial
    output), and reported as its own signal (exit 128 + ``signum``)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum
