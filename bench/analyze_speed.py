"""How fast ``dengine analyze --sharing-only`` goes through real dumps, against ``xxhsum -H3``.

Goal of the project: dengine's exact sharing analysis reads the dumps at **at least 50 % of the
speed** (bytes of dump files per second, wall clock) of hashing the same files with
``xxhsum -H3`` (XXH3-64, Debian's xxhash, one thread): a capacity planner's analysis should cost
little more than reading and hashing the bytes once.

In one run, with the files in the page cache (they are read once before timing) and dengine's
bytecode written (as an installed wheel has it), each timed as a subprocess, best of
``--repeat`` runs made in rounds (each round runs every command once, so that a slow spell of
a shared machine does not fall on one command only):

* ``xxhsum -H3 FILES``;
* ``dengine analyze --sharing-only FILES`` with a fresh, empty ``--index-dir`` each time (so it
  includes building the page indexes; dengine's default ``--jobs``: one process per CPU);
* the same with the indexes already built (``dengine index``), the sharing computed (its cached
  result is removed after each run);
* the same with the indexes and the sharing result cached by an earlier run (what a second
  command over the same dumps costs).

Reported per command: wall seconds, GiB/s of dump files, dengine speed / xxhsum speed, CPU
seconds (user + sys, including child processes), peak RSS (``ru_maxrss`` of the child from
``os.wait4``, which on Linux also covers the descendants it waited for, e.g. the index workers;
it counts the pages of mmap-ed dump files it touched, i.e. shared page cache) and the peak
anonymous memory (``RssAnon`` from /proc, summed over the child and its descendants, sampled
every 10 ms: the memory the process itself allocates).
Also the git commit of the measured tree, the time and the machine load (``/proc/loadavg``).

Usage: python3 bench/analyze_speed.py [--repeat N] [--json] [DUMPS ...]
(default dumps: /work/bench-data/bench-*.elf, made by bench/make_bench_dumps.py)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEFAULT_GLOB = "bench-*.elf"
DEFAULT_DIR = Path("/work/bench-data")
GOAL_RATIO = 0.5


@dataclass
class Run:
    """One timed subprocess: wall and CPU seconds, peak RSS and anonymous RSS (KiB), stdout."""

    seconds: float
    cpu_seconds: float
    maxrss_kib: int
    anon_kib: int
    stdout: str


@dataclass
class Timing:
    """Best of N runs of one command."""

    label: str
    command: str
    best: Run
    maxrss_kib: int  # the largest of all runs
    anon_kib: int  # the largest of all runs

    def to_dict(self, nbytes: int, baseline: float | None) -> dict[str, object]:
        """Figures for --json; ``baseline`` is the reference command's seconds."""
        d: dict[str, object] = {
            "label": self.label,
            "command": self.command,
            "seconds": round(self.best.seconds, 3),
            "gib_per_s": round(nbytes / self.best.seconds / 2**30, 3),
            "cpu_seconds": round(self.best.cpu_seconds, 3),
            "peak_rss_mib": round(self.maxrss_kib / 1024, 1),
            "peak_anon_mib": round(self.anon_kib / 1024, 1),
        }
        if baseline is not None:
            d["speed_ratio"] = round(baseline / self.best.seconds, 3)
        return d


class AnonSampler(threading.Thread):
    """Peak of the summed ``RssAnon`` of a process and its descendants, sampled every 10 ms."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid = pid
        self.peak_kib = 0
        self.done = threading.Event()

    @staticmethod
    def _tree(pid: int) -> list[int]:
        todo, seen = [pid], []
        while todo:
            p = todo.pop()
            seen.append(p)
            try:
                todo += [int(c) for c in Path(f"/proc/{p}/task/{p}/children").read_text().split()]
            except OSError:
                continue
        return seen

    @staticmethod
    def _anon_kib(pid: int) -> int:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("RssAnon:"):
                    return int(line.split()[1])
        except OSError:
            pass
        return 0

    def run(self) -> None:
        while not self.done.is_set():
            self.peak_kib = max(self.peak_kib, sum(map(self._anon_kib, self._tree(self.pid))))
            self.done.wait(0.01)


def run_child(cmd: Sequence[str], cwd: Path = REPO) -> Run:
    """Run ``cmd`` to completion; stdout and stderr go to temp files (no pipe can fill up)."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        t = time.perf_counter()
        proc = subprocess.Popen(list(cmd), cwd=cwd, stdin=subprocess.DEVNULL, stdout=out, stderr=err)
        sampler = AnonSampler(proc.pid)
        sampler.start()
        _pid, status, usage = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - t
        sampler.done.set()
        sampler.join()
        proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.returncode != 0:
            err.seek(0)
            tail = err.read().decode(errors="replace")[-2000:]
            raise SystemExit(f"{' '.join(cmd)} exited {proc.returncode}:\n{tail}")
        out.seek(0)
        return Run(
            seconds,
            usage.ru_utime + usage.ru_stime,
            usage.ru_maxrss,
            sampler.peak_kib,
            out.read().decode(errors="replace"),
        )


@dataclass
class Command:
    """A command to time: ``make()`` gives its argv (anew each run, e.g. a fresh index dir);
    ``after()`` runs after each run, untimed."""

    label: str
    make: Callable[[], list[str]]
    after: Callable[[], None] | None = None


def interleaved(repeat: int, commands: Sequence[Command]) -> list[Timing]:
    """Best of ``repeat`` runs of each command, run in rounds (one run of each command per
    round) so that a slow spell of a shared machine hits every command alike, not one."""
    runs: list[list[Run]] = [[] for _ in commands]
    argv: list[list[str]] = [[] for _ in commands]
    for _ in range(repeat):
        for k, c in enumerate(commands):
            argv[k] = c.make()
            runs[k].append(run_child(argv[k]))
            if c.after is not None:
                c.after()
    return [
        Timing(
            c.label,
            " ".join(argv[k]),
            min(runs[k], key=lambda r: r.seconds),
            max(r.maxrss_kib for r in runs[k]),
            max(r.anon_kib for r in runs[k]),
        )
        for k, c in enumerate(commands)
    ]


def precompile() -> None:
    """Write dengine's bytecode, as installing a wheel does: in an editable install with
    PYTHONDONTWRITEBYTECODE set (as on these machines) every run would otherwise compile the
    modules again, 0.1 s that no installed dengine spends."""
    subprocess.run(
        [sys.executable, "-m", "compileall", "-q", str(REPO / "dengine_cli")],
        check=True,
        stdout=subprocess.DEVNULL,
    )


class CacheStates:
    """The three index directories the benchmarks time dengine with, under ``tmp``:

    * :meth:`fresh` gives a new, empty one per run (nothing cached; :meth:`drop_fresh`, run
      after each, keeps the disk use to one index set);
    * :attr:`cached` holds the indexes (``dengine index``); :meth:`drop_sharing`, run after each
      run, removes the sharing result the run stored, so that the next one computes it again;
    * :attr:`shared` holds the indexes and the sharing result (an earlier ``dengine analyze``).
    """

    def __init__(self, tmp: str, files: Sequence[str]) -> None:
        self.tmp = Path(tmp)
        self._counter = 0
        self.cached = str(self.tmp / "cached")
        self.shared = str(self.tmp / "shared")
        run_child(dengine("index", "--index-dir", self.cached, *files))
        run_child(dengine("analyze", "--sharing-only", "--index-dir", self.shared, *files))

    def fresh(self) -> str:
        self._counter += 1
        return str(self.tmp / f"cold-{self._counter}")

    def drop_fresh(self) -> None:
        for d in self.tmp.glob("cold-*"):
            shutil.rmtree(d)

    def drop_sharing(self) -> None:
        for f in Path(self.cached).glob("*.shr"):
            f.unlink()


def dengine(*args: str) -> list[str]:
    """The dengine CLI of this interpreter's environment, quiet (no progress bars)."""
    return [sys.executable, "-m", "dengine_cli", "-q", *args]


def warm_cache(paths: Sequence[Path]) -> None:
    """Read every file once so that every timed run reads from the page cache."""
    for p in paths:
        with p.open("rb") as f:
            while f.read(1 << 24):
                pass


def measured_at() -> dict[str, str]:
    """Which tree and when: git commit (and whether dengine_cli/ has local changes), time, load."""
    commit = subprocess.run(
        ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    dirty = subprocess.run(
        ["git", "-C", str(REPO), "status", "--porcelain", "--", "dengine_cli"], capture_output=True, text=True
    ).stdout.strip()
    return {
        "commit": commit + (" + uncommitted changes in dengine_cli/" if dirty else ""),
        "time": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "loadavg": " ".join(Path("/proc/loadavg").read_text().split()[:3]),
        "cpus": str(os.cpu_count()),
    }


def default_dumps(args_dumps: Sequence[Path]) -> list[Path]:
    """The dumps given, or /work/bench-data/bench-*.elf."""
    dumps = list(args_dumps) or sorted(DEFAULT_DIR.glob(DEFAULT_GLOB))
    if not dumps:
        raise SystemExit(
            f"no dumps given and none in {DEFAULT_DIR / DEFAULT_GLOB}: run bench/make_bench_dumps.py"
        )
    return dumps


def print_table(title: str, nbytes: int, rows: Sequence[Timing], baseline: float) -> None:
    """A small fixed-width table: seconds, GiB/s, speed vs the baseline, CPU, peak RSS, anon."""
    print(title)
    w = max(len(t.label) for t in rows)
    print(
        f"  {'command':<{w}} {'seconds':>8} {'GiB/s':>7} {'speed ratio':>11} {'CPU s':>7} "
        f"{'peak RSS MiB':>12} {'anon MiB':>8}"
    )
    for t in rows:
        d = t.to_dict(nbytes, baseline)
        print(
            f"  {t.label:<{w}} {d['seconds']:>8.2f} {d['gib_per_s']:>7.2f} {d['speed_ratio']:>11.2f} "
            f"{d['cpu_seconds']:>7.2f} {d['peak_rss_mib']:>12.1f} {d['peak_anon_mib']:>8.1f}"
        )


def parse_bench_args(doc: str | None, argv: Sequence[str] | None) -> argparse.Namespace:
    """The arguments every benchmark here takes: dumps, --repeat, --json."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("dumps", nargs="*", type=Path)
    ap.add_argument("--repeat", type=int, default=3, help="best of N runs (default: %(default)s)")
    ap.add_argument("--json", action="store_true", help="print the figures as JSON")
    return ap.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Time xxhsum and dengine analyze; print the table (or JSON) and whether the goal is met."""
    args = parse_bench_args(__doc__, argv)
    dumps = default_dumps(args.dumps)
    if shutil.which("xxhsum") is None:
        raise SystemExit("xxhsum not found (apt-get install xxhash)")
    nbytes = sum(p.stat().st_size for p in dumps)
    files = [str(p) for p in dumps]
    warm_cache(dumps)
    at = measured_at()

    precompile()
    with tempfile.TemporaryDirectory(prefix="dengine-analyze-bench-") as tmp:
        states = CacheStates(tmp, files)

        def analyze(index_dir: str) -> list[str]:
            return dengine("analyze", "--sharing-only", "--index-dir", index_dir, *files)

        xxh, cold, warm, hot = interleaved(
            args.repeat,
            [
                Command("xxhsum -H3", lambda: ["xxhsum", "-H3", *files]),
                Command("dengine analyze (index built)", lambda: analyze(states.fresh()), states.drop_fresh),
                Command(
                    "dengine analyze (index cached)", lambda: analyze(states.cached), states.drop_sharing
                ),
                Command("dengine analyze (index, sharing cached)", lambda: analyze(states.shared)),
            ],
        )
        report = run_child(
            dengine("analyze", "--sharing-only", "--format", "json", "--index-dir", states.shared, *files)
        )
    base = xxh.best.seconds
    rows = [xxh, cold, warm, hot]
    ratios = {
        "index_built": base / cold.best.seconds,
        "index_cached": base / warm.best.seconds,
        "index_and_sharing_cached": base / hot.best.seconds,
    }
    if args.json:
        out = {
            "goal": f"dengine analyze --sharing-only >= {GOAL_RATIO:.0%} of xxhsum -H3's bytes/s",
            "measured_at": at,
            "dumps": files,
            "bytes": nbytes,
            "repeat": args.repeat,
            "rows": [t.to_dict(nbytes, base) for t in rows],
            "speed_ratio": {k: round(v, 3) for k, v in ratios.items()},
            "goal_met": {k: v >= GOAL_RATIO for k, v in ratios.items()},
            "analysis": json.loads(report.stdout),
        }
        print(json.dumps(out, indent=2))
        return 0
    print(
        f"{len(dumps)} dumps, {nbytes / 2**30:.2f} GiB, best of {args.repeat}; commit {at['commit']}, "
        f"{at['time']}, load {at['loadavg']} on {at['cpus']} CPUs"
    )
    print_table("analyze speed (speed ratio = xxhsum seconds / command seconds)", nbytes, rows, base)
    for k, v in ratios.items():
        verdict = "met" if v >= GOAL_RATIO else "NOT met"
        print(f"dengine/xxhsum speed, {k.replace('_', ' ')}: {v:.2f} (goal >= {GOAL_RATIO}: {verdict})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
