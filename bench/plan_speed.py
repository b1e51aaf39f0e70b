"""How fast ``dengine plan`` (Difference Engine policy) goes through real dumps, against ``zstd -1``.

Goals (issue "The engine in stages"), speeds in bytes of dump files per second, wall clock,
with nothing cached (the indexes built by the timed command):

* the exact plan (``dengine plan --policy de --baseline none``) is **at least 3.5x as fast as**
  ``zstd -1 -T1`` compressing the same files;
* the sampled plan (``--sample 0.05``) is **at least 8x as fast as** ``zstd -1 -T1``, and its
  savings are **within 0.5 percentage points** of the exact plan's.

The runs with the indexes (and the sharing) cached are reported beside them, without a goal:
they show what the fixed costs of indexing and sharing take.

In one run, with the files in the page cache (read once before timing) and dengine's bytecode
written, each timed as a subprocess, best of ``--repeat`` runs made in rounds (see
``analyze_speed.py``):

* ``zstd -1 -T1 FILES -o /dev/null`` (the same as ``-c FILES > /dev/null``): zstd compresses
  each file as its own frame, one after the other into one stream (the same bytes as dengine
  reads, one thread);
* ``dengine plan --policy de --baseline none --format json FILES``, exact and ``--sample 0.05``,
  each with a fresh, empty ``--index-dir`` (includes building the page indexes, dengine's default
  ``--jobs``), with the indexes already built (the sharing computed: its cached result is
  removed after each run), and with the indexes and the sharing cached by an earlier command
  (what a second plan over the same dumps costs).

Reported: wall seconds, GiB/s, dengine speed / zstd speed, CPU seconds (user + sys, with child
processes), peak RSS (``ru_maxrss`` from ``os.wait4``, which covers waited-for descendants too,
and counts touched pages of the mmap-ed dumps) and peak anonymous RSS (sampled, see
analyze_speed.py),
the total savings of the exact and sampled plans (with the sample's 95 % interval) and their
difference in percentage points; the git commit measured, the time and the machine load.

Usage: python3 bench/plan_speed.py [--repeat N] [--json] [DUMPS ...]
(default dumps: /work/bench-data/bench-*.elf, made by bench/make_bench_dumps.py)
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from analyze_speed import (
    CacheStates,
    Command,
    Timing,
    default_dumps,
    dengine,
    interleaved,
    measured_at,
    parse_bench_args,
    precompile,
    print_table,
    warm_cache,
)

SAMPLE = 0.05
EXACT_GOAL = 3.5  # dengine exact / zstd speed, nothing cached
SAMPLE_GOAL = 8.0  # dengine sampled / zstd speed, nothing cached
SAMPLE_PP_GOAL = 0.5  # |sampled - exact| savings, percentage points
#: The rows the speed goals apply to (the others are shown without a goal).
GOAL_ROWS = {"exact_index_built": EXACT_GOAL, "sample_index_built": SAMPLE_GOAL}
PLAN = ("plan", "--policy", "de", "--baseline", "none", "--format", "json")


def savings(t: Timing) -> dict[str, Any]:
    """Total savings (percent) and, for a sampled plan, its interval, from the JSON plan."""
    total = json.loads(t.best.stdout)["total"]
    out: dict[str, Any] = {
        "savings_percent": total["savings_percent"],
        "footprint_bytes": total["footprint_bytes"],
    }
    if "savings_interval_percent" in total:
        out["savings_interval_percent"] = total["savings_interval_percent"]
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """Time zstd and dengine plan (exact, sampled); print the table (or JSON) and the goals."""
    args = parse_bench_args(__doc__, argv)
    dumps = default_dumps(args.dumps)
    if shutil.which("zstd") is None:
        raise SystemExit("zstd not found (apt-get install zstd)")
    nbytes = sum(p.stat().st_size for p in dumps)
    files = [str(p) for p in dumps]
    warm_cache(dumps)
    at = measured_at()

    precompile()
    with tempfile.TemporaryDirectory(prefix="dengine-plan-bench-") as tmp:
        states = CacheStates(tmp, files)
        sample = ("--sample", str(SAMPLE))

        def plan(index_dir: str, *extra: str) -> list[str]:
            return dengine(*PLAN, *extra, "--index-dir", index_dir, *files)

        zstd, exact_cold, exact, exact_hot, sample_cold, sampled, sampled_hot = interleaved(
            args.repeat,
            [
                # Same as `zstd -1 -T1 -c FILES > /dev/null` (frames one after the other into one
                # output) without a shell: run_child's stdout is a temp file (disk writes).
                Command("zstd -1 -T1", lambda: ["zstd", "-q", "-1", "-T1", "-f", *files, "-o", "/dev/null"]),
                Command("dengine plan exact (index built)", lambda: plan(states.fresh()), states.drop_fresh),
                Command(
                    "dengine plan exact (index cached)", lambda: plan(states.cached), states.drop_sharing
                ),
                Command("dengine plan exact (index, sharing cached)", lambda: plan(states.shared)),
                Command(
                    f"dengine plan --sample {SAMPLE} (index built)",
                    lambda: plan(states.fresh(), *sample),
                    states.drop_fresh,
                ),
                Command(
                    f"dengine plan --sample {SAMPLE} (index cached)",
                    lambda: plan(states.cached, *sample),
                    states.drop_sharing,
                ),
                Command(
                    f"dengine plan --sample {SAMPLE} (index, sharing cached)",
                    lambda: plan(states.shared, *sample),
                ),
            ],
        )
    base = zstd.best.seconds
    rows = [zstd, exact_cold, exact, exact_hot, sample_cold, sampled, sampled_hot]
    exact_sav, sample_sav = savings(exact), savings(sampled)
    pp = sample_sav["savings_percent"] - exact_sav["savings_percent"]
    ratios = {
        "exact_index_built": base / exact_cold.best.seconds,
        "exact_index_cached": base / exact.best.seconds,
        "exact_index_and_sharing_cached": base / exact_hot.best.seconds,
        "sample_index_built": base / sample_cold.best.seconds,
        "sample_index_cached": base / sampled.best.seconds,
        "sample_index_and_sharing_cached": base / sampled_hot.best.seconds,
    }
    goals = {k: ratios[k] >= goal for k, goal in GOAL_ROWS.items()}
    goals["sample_within_pp"] = abs(pp) <= SAMPLE_PP_GOAL
    if args.json:
        out = {
            "goal": (
                f"nothing cached: exact plan >= {EXACT_GOAL:g}x zstd -1 -T1 speed; --sample {SAMPLE} "
                f">= {SAMPLE_GOAL:g}x and within {SAMPLE_PP_GOAL:g} pp of exact"
            ),
            "measured_at": at,
            "dumps": files,
            "bytes": nbytes,
            "repeat": args.repeat,
            "zstd_mode": "each file its own frame, one stream to /dev/null, one thread",
            "rows": [t.to_dict(nbytes, base) for t in rows],
            "speed_ratio": {k: round(v, 3) for k, v in ratios.items()},
            "savings": {"exact": exact_sav, "sample": sample_sav, "difference_pp": round(pp, 4)},
            "goal_met": goals,
        }
        print(json.dumps(out, indent=2))
        return 0
    print(
        f"{len(dumps)} dumps, {nbytes / 2**30:.2f} GiB, best of {args.repeat}; commit {at['commit']}, "
        f"{at['time']}, load {at['loadavg']} on {at['cpus']} CPUs"
    )
    print_table("plan speed (speed ratio = zstd seconds / command seconds)", nbytes, rows, base)
    for k, v in ratios.items():
        goal = GOAL_ROWS.get(k)
        verdict = "" if goal is None else f" (goal >= {goal:g}: {'met' if goals[k] else 'NOT met'})"
        print(f"dengine/zstd speed, {k.replace('_', ' ')}: {v:.2f}{verdict}")
    lo, hi = sample_sav["savings_interval_percent"]
    print(
        f"savings: exact {exact_sav['savings_percent']:.3f} %, sample {sample_sav['savings_percent']:.3f} % "
        f"(95 % interval {lo:.3f}..{hi:.3f}), difference {pp:+.3f} pp "
        f"(goal within {SAMPLE_PP_GOAL:g} pp: {'met' if goals['sample_within_pp'] else 'NOT met'})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
