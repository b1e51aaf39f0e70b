"""``python -m tests.fuzz --cases 10000 --seed 0 --jobs 2``: run a fuzzing campaign over every
format's seeds and print what happened; failures are saved under ``--results`` to reproduce."""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from tests.fuzz.campaign import run_campaign
from tests.fuzz.runner import Limits, Outcome, preload


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tests.fuzz", description=__doc__)
    ap.add_argument("--cases", type=int, default=1000, help="how many cases (default 1000)")
    ap.add_argument("--seed", type=int, default=0, help="campaign seed (default 0)")
    ap.add_argument("--start", type=int, default=0, help="first case number (default 0)")
    ap.add_argument("--case", type=int, action="append", help="run only this case (repeatable)")
    ap.add_argument("--jobs", type=int, default=2, help="commands run at once (default 2)")
    ap.add_argument("--formats", help="comma-separated formats or seed names to fuzz (default all)")
    ap.add_argument("--results", type=Path, default=Path("fuzz-results"), help="where failures go")
    ap.add_argument("--cpu-seconds", type=int, default=Limits.cpu_seconds, help="CPU bound per command")
    ap.add_argument("--wall-seconds", type=float, default=Limits.wall_seconds, help="wall bound per command")
    ap.add_argument("--quiet", action="store_true", help="no progress line")
    args = ap.parse_args(argv)
    preload()
    limits = Limits(cpu_seconds=args.cpu_seconds, wall_seconds=args.wall_seconds)
    numbers = args.case or range(args.start, args.start + args.cases)
    formats = set(args.formats.split(",")) if args.formats else None
    total = len(numbers) * 3
    last = [0.0]

    def progress(outcome: Outcome, report: object) -> None:
        if not outcome.ok:
            print(f"FAIL case {outcome.task.case} {outcome.task.command}: {outcome.problems}", flush=True)
        now = time.monotonic()
        if not args.quiet and now - last[0] > 10:
            last[0] = now
            done = getattr(report, "commands", 0)
            print(f"... {done}/{total} commands", file=sys.stderr, flush=True)

    with tempfile.TemporaryDirectory(prefix="dengine-fuzz-") as work:
        report = run_campaign(
            numbers, args.seed, args.jobs, Path(work), args.results, formats=formats, limits=limits,
            on_outcome=progress,
        )  # fmt: skip
    for line in report.lines():
        print(line)
    if report.failures:
        print(f"reproducers in {args.results}/ (each has command.sh and about.json)")
    return 1 if report.failures else 0


if __name__ == "__main__":
    sys.exit(main())
