"""Run dengine commands on fuzzed inputs, each in a forked child with its own limits, and judge
what each left behind.

The parent imports every dengine module once and forks one child per command, so a command
costs a fork rather than an interpreter start.  The child runs ``dengine_cli.cli.main`` (the
real entry point, with the real mapping of DengineError to exit codes) under

* ``RLIMIT_CPU``: a CPU-time bound, so a loaded machine slows a case but never makes it a
  "hang"; the kernel ends the child with SIGXCPU;
* a generous wall-clock bound, enforced by the parent (SIGKILL to the child's process group),
  for a child that blocks without spending CPU;
* ``RLIMIT_AS``: a lying header must not make dengine allocate gigabytes; past the bound an
  allocation fails (MemoryError, exit 1) instead of swapping the machine to death.

A command passes when it exits 0 or with a documented error code of a dump or a file (3-6; a
usage error, 2, is the fuzzer's own mistake) printing exactly one
``dengine: ...`` line on stderr, prints no traceback, leaves no process behind, and leaves no file
in its output, temporary or cache directories other than complete outputs and cache files.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import pkgutil
import re
import resource
import shutil
import signal
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

#: Exit codes a user may see (dengine_cli/errors.py): 0 and 2-6.
DOCUMENTED = {0, 3, 4, 5, 6}
#: What the child exits with when something escaped dengine's own handler (a harness marker).
ESCAPED = 70
#: Cache files a command may leave in its index directory: complete indexes and sharing results.
CACHE_FILE = re.compile(r"^([0-9a-f]{16}-[0-9a-f]{32}\.idx|[0-9a-f]{32}\.shr)$")


@dataclass(frozen=True)
class Limits:
    """Per-command bounds: CPU seconds, wall seconds, address space bytes, max RSS growth."""

    cpu_seconds: int = 30
    wall_seconds: float = 180.0
    address_space: int = 1 << 30
    rss_growth: int = 1 << 30


@dataclass
class Task:
    """One command of one case.  ``dirs`` are made fresh for it: out, tmp (``--tmp-dir``), env
    (``$TMPDIR``), index (``--index-dir``), cache (``$XDG_CACHE_HOME``), input (the files read)."""

    case: int
    command: str
    argv: list[str]
    root: Path
    inputs: list[str]
    #: The output file a successful command leaves in ``out`` (extract's image).
    output: str | None = None
    #: Whether stdout must be a JSON document when the command succeeds.
    json_stdout: bool = False

    def dir(self, name: str) -> Path:
        return self.root / name


@dataclass
class Outcome:
    """What one command did: exit code (or the signal that ended it), and every reason it fails."""

    task: Task
    code: int | None
    signal: int | None
    seconds: float
    cpu: float
    max_rss: int
    stdout: bytes
    stderr: bytes
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def label(self) -> str:
        """``exit N``, or the signal's name."""
        if self.signal is not None:
            return signal.Signals(self.signal).name
        return f"exit {self.code}"


def preload() -> None:
    """Import every dengine module (and the codec libraries the readers load lazily) in the
    parent, so that no child pays for an import."""
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    import dengine_cli

    for mod in pkgutil.walk_packages(dengine_cli.__path__, "dengine_cli."):
        if mod.name.endswith("__main__"):
            continue
        importlib.import_module(mod.name)
    for name in ("lzo", "cramjam", "zstandard", "bz2", "lzma", "zlib", "rich.console", "tqdm"):
        with contextlib.suppress(ImportError):
            importlib.import_module(name)


def own_rss() -> int:
    """This process's resident set, bytes (children start with it: fork shares the pages)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _child(task: Task, limits: Limits) -> None:
    """In the forked child: limits, fresh stdio and environment, then the real CLI."""
    code = ESCAPED
    try:
        os.setpgid(0, 0)
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        resource.setrlimit(resource.RLIMIT_CPU, (limits.cpu_seconds, limits.cpu_seconds + 5))
        resource.setrlimit(resource.RLIMIT_AS, (limits.address_space, limits.address_space))
        for fd, name, mode in ((0, os.devnull, os.O_RDONLY), (1, "stdout", 0), (2, "stderr", 0)):
            path = name if fd == 0 else str(task.root / name)
            new = os.open(path, mode or os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            os.dup2(new, fd)
            os.close(new)
        # Python's own streams on those descriptors, as in a fresh process (a test runner may
        # have replaced sys.stdout/sys.stderr by capturing objects).
        sys.stdin = open(0, encoding="utf-8", closefd=False)  # noqa: SIM115
        sys.stdout = open(1, "w", encoding="utf-8", closefd=False)  # noqa: SIM115
        sys.stderr = open(2, "w", encoding="utf-8", errors="backslashreplace", closefd=False)  # noqa: SIM115
        os.environ["TMPDIR"] = str(task.dir("env"))
        os.environ["XDG_CACHE_HOME"] = str(task.dir("cache"))
        os.environ.pop("DENGINE_INDEX_DIR", None)
        os.environ.pop("DENGINE_MEMORY_LIMIT", None)
        import tempfile

        tempfile.tempdir = None
        os.chdir(task.dir("input"))
        sys.argv = ["dengine", *task.argv]
        from dengine_cli import cli

        try:
            cli.main()
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else ESCAPED
    except BaseException:
        import traceback

        traceback.print_exc()
        code = ESCAPED
    finally:
        with contextlib.suppress(BaseException):
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(code)


def prepare(task: Task) -> None:
    for name in ("out", "tmp", "env", "index", "cache"):
        task.dir(name).mkdir(parents=True, exist_ok=True)


def _files(folder: Path) -> list[str]:
    if not folder.exists():
        return []
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def judge(outcome: Outcome, baseline_rss: int, limits: Limits) -> None:
    """Every reason the command's outcome is a failure, into ``outcome.problems``."""
    t = outcome.task
    p = outcome.problems
    err = outcome.stderr.decode("utf-8", "replace")
    if outcome.signal is not None:
        name = signal.Signals(outcome.signal).name
        if outcome.signal == signal.SIGXCPU:
            p.append(f"hang: over {limits.cpu_seconds} s of CPU time")
        elif outcome.signal == signal.SIGKILL and outcome.seconds >= limits.wall_seconds:
            p.append(f"hang: over {limits.wall_seconds:.0f} s of wall time")
        else:
            p.append(f"crash: killed by {name}")
    elif outcome.code == ESCAPED:
        p.append("crash: an exception escaped the CLI")
    elif outcome.code == 1:
        p.append("internal error (exit 1)")
    elif outcome.code == 2:
        # One line like any error, but never what a dump causes: the fuzzer built a command
        # line dengine refuses.
        p.append("usage error (exit 2): the command line was refused, not the dump")
    elif outcome.code not in DOCUMENTED:
        p.append(f"undocumented exit code {outcome.code}")
    if "Traceback (most recent call last)" in err:
        p.append("traceback on stderr")
    if "MemoryError" in err:
        p.append("MemoryError")
    if outcome.code not in (None, 0):
        lines = err.splitlines()
        if len(lines) != 1 or not lines[0].startswith("dengine: "):
            p.append(f"stderr is not one 'dengine: ...' line ({len(lines)} lines)")
    if outcome.code == 0 and t.json_stdout:
        try:
            json.loads(outcome.stdout)
        except ValueError:
            p.append("stdout is not a JSON document")
    if outcome.max_rss > baseline_rss + limits.rss_growth:
        p.append(f"memory: resident set reached {outcome.max_rss >> 20} MiB")
    expected_out = [t.output] if (t.output and outcome.code == 0) else []
    if (found := _files(t.dir("out"))) != expected_out:
        p.append(f"output dir holds {found}, expected {expected_out}")
    for name in ("tmp", "env", "cache"):
        if found := _files(t.dir(name)):
            p.append(f"left files in the {name} dir: {found[:5]}")
    if stray := [f for f in _files(t.dir("index")) if not CACHE_FILE.match(f)]:
        p.append(f"left non-cache files in the index dir: {stray[:5]}")
    if (found := _files(t.dir("input"))) != sorted(t.inputs):
        p.append(f"input dir holds {found}, expected {sorted(t.inputs)}")


@dataclass
class _Running:
    task: Task
    started: float
    pid: int


def run_tasks(tasks: Iterator[Task], jobs: int, limits: Limits) -> Iterator[Outcome]:
    """Run tasks ``jobs`` at a time, each in a forked child; yield outcomes as they finish.

    The parent stays single-threaded (forking from a threaded process is unsafe) and polls its
    children; on the wall bound it kills the child's process group (the child and any workers
    it forked).  A child that exits but leaves processes in its group fails, and they are
    killed."""
    baseline = own_rss()
    running: dict[int, _Running] = {}
    _subreaper(True)
    try:
        pending = iter(tasks)
        exhausted = False
        while running or not exhausted:
            while not exhausted and len(running) < jobs:
                task = next(pending, None)
                if task is None:
                    exhausted = True
                    break
                prepare(task)
                sys.stdout.flush()
                sys.stderr.flush()
                pid = os.fork()
                if pid == 0:
                    _child(task, limits)
                with contextlib.suppress(OSError):
                    os.setpgid(pid, pid)
                running[pid] = _Running(task, time.monotonic(), pid)
            if not running:
                break
            pid, status, usage = os.wait4(-1, os.WNOHANG)
            if pid == 0:
                now = time.monotonic()
                for r in running.values():
                    if now - r.started > limits.wall_seconds:
                        with contextlib.suppress(OSError):
                            os.killpg(r.pid, signal.SIGKILL)
                time.sleep(0.002)
                continue
            r = running.pop(pid, None)
            if r is None:
                continue  # an orphaned worker of an earlier child, reaped
            seconds = time.monotonic() - r.started
            outcome = Outcome(
                r.task,
                os.WEXITSTATUS(status) if os.WIFEXITED(status) else None,
                os.WTERMSIG(status) if os.WIFSIGNALED(status) else None,
                seconds,
                usage.ru_utime + usage.ru_stime,
                usage.ru_maxrss * 1024,
                (r.task.root / "stdout").read_bytes(),
                (r.task.root / "stderr").read_bytes(),
            )
            if _group_lingers(pid):
                outcome.problems.append("left processes running after it exited")
                with contextlib.suppress(OSError):
                    os.killpg(pid, signal.SIGKILL)
            judge(outcome, baseline, limits)
            yield outcome
    finally:
        for r in running.values():  # the harness was stopped: its children go with it
            with contextlib.suppress(OSError):
                os.killpg(r.pid, signal.SIGKILL)
                os.waitpid(r.pid, 0)
        _subreaper(False)


def _subreaper(on: bool) -> None:
    """While tasks run, orphaned workers of a child become this process's children (Linux
    PR_SET_CHILD_SUBREAPER), so that they can be reaped and counted, whatever init does; off
    again after (a test runner must not stay the reaper of other tests' orphans)."""
    import ctypes

    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(36, int(on), 0, 0, 0)


def _group_lingers(pgid: int, patience: float = 30.0) -> bool:
    """Whether processes of the exited child's group are still there after ``patience`` seconds
    (workers die with their parent, but the kernel takes a moment to say so)."""
    deadline = time.monotonic() + patience
    while True:
        with contextlib.suppress(ChildProcessError):
            while os.waitpid(-pgid, os.WNOHANG)[0]:
                pass  # reap the group's zombies (this process is their subreaper)
        try:
            os.killpg(pgid, 0)
        except OSError:
            return False
        if time.monotonic() > deadline:
            return True
        time.sleep(0.01)


def remove(folder: Path) -> None:
    shutil.rmtree(folder, ignore_errors=True)


def command_line(task: Task) -> str:
    """The shell command that reproduces a task from its saved directory."""
    import shlex

    return "dengine " + " ".join(shlex.quote(a) for a in task.argv)


def relative_argv(argv: Sequence[str], root: Path) -> list[str]:
    """``argv`` with the task's directories named relative to its input directory."""
    out = []
    for a in argv:
        if a.startswith(str(root)):
            a = os.path.relpath(a, root / "input")
        out.append(a)
    return out
