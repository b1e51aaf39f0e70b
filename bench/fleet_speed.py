"""How ``dengine analyze --sharing-only`` scales over fleets of guests, against ``xxhsum -H3``.

For each fleet directory (``--fleet DIR``, repeatable; default ``/work/bench-data/fleet-4``,
``fleet-16`` and ``fleet-64``, made by ``bench/make_fleet.py``), over its ``fleet-*.raw`` files,
with the files in the page cache (read once before the fleet is timed) and dengine's bytecode
written, each command timed as a subprocess, best of ``--rounds`` runs made in rounds (each round
runs every command once; see ``analyze_speed.py``):

* ``xxhsum -H3 FILES > /dev/null``;
* the same split in two halves hashed at once by two ``xxhsum`` processes (``sh -c``): what a
  second process gains on this machine for the same work, the ceiling of ``-j 2`` over ``-j 1``;
* ``zstd -1 -T1 -c FILES > /dev/null`` (only with ``--zstd``: slow);
* ``dengine -q analyze --sharing-only --format json --index-dir FRESH -j 1 FILES``, with a fresh,
  empty ``--index-dir`` each run (nothing cached; removed after the run, untimed);
* the same with ``-j 2``;
* the same with ``-j 2 --memory-limit LIMIT`` (``--limit``, default 128M). If the CLI rejects
  the option (usage error, exit 2), that cell is reported as n/a;
* with ``--plan`` (which implies ``--zstd``): ``dengine -q plan --policy de --baseline none
  --format json --index-dir FRESH -j 2 FILES`` (the exact plan, nothing cached), and the same with
  ``--memory-limit LIMIT``; their speed against ``zstd -1 -T1`` (the plan's baseline in
  ``plan_speed.py``), their peak anonymous memory and whether the two print the same JSON.

Per command: wall seconds (best run), seconds per GiB of dump files, GiB/s, speed ratio
(xxhsum seconds / command seconds), CPU seconds (user + sys, with waited-for descendants) and the
peak anonymous memory: ``RssAnon`` from /proc summed over the process and all its descendants,
sampled every ~5 ms (the largest of all runs). Per fleet: the -j 2 / -j 1 speedup, and whether
the JSON output with and without ``--memory-limit`` is identical (every limited run against the
-j 2 runs; also -j 1 against -j 2). Also the git commit measured, the time and the machine load.
Beside the goals, the scaling: a least-squares line through the fleets' ``-j 2`` times against
their sizes, whose intercept is the fixed cost of a run (start-up: Python, numpy and click imports,
forks) and whose slope is the cost of a GiB; with the fixed cost taken off, s/GiB largest /
smallest says whether the work itself scales flat, which the flatness goal (on the whole times)
cannot tell apart from the fixed cost.

Output: a plain text table on stdout; ``--json FILE`` also writes the figures as JSON.

Usage: python3 bench/fleet_speed.py [--fleet DIR ...] [--rounds N] [--zstd] [--plan]
                                    [--dengine PATH] [--limit SIZE] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from analyze_speed import REPO, AnonSampler, Command, Run, measured_at, precompile, warm_cache

DATA_DIR = Path("/work/bench-data")
DEFAULT_FLEETS = tuple(DATA_DIR / f"fleet-{n}" for n in (4, 16, 64))
DEFAULT_DENGINE = REPO / ".venv" / "bin" / "dengine"
SAMPLE_SECONDS = 0.005
J1, J2, LIMITED = "dengine -j 1", "dengine -j 2", "dengine -j 2 --memory-limit"
XXH, XXH2 = "xxhsum -H3", "xxhsum -H3, 2 processes"
ZSTD = "zstd -1 -T1"
PLAN, PLAN_LIMITED = "dengine plan -j 2", "dengine plan -j 2 --memory-limit"
#: Goals of the issue "The engine in stages": on the 16-guest fleet, -j 2 at this ratio to xxhsum
#: and this speedup over -j 1; on the largest fleet, --memory-limit 128M within this peak anonymous
#: memory (and the same JSON); seconds per GiB within this spread from the smallest fleet to the
#: largest.
RATIO_GOAL, SPEEDUP_GOAL, LIMITED_ANON_GOAL_MIB, FLAT_GOAL = 0.7, 1.7, 160, 1.2


class FastAnonSampler(AnonSampler):
    """:class:`analyze_speed.AnonSampler` (summed ``RssAnon`` of a process tree), every ~5 ms."""

    def run(self) -> None:
        while not self.done.is_set():
            self.peak_kib = max(self.peak_kib, sum(map(self._anon_kib, self._tree(self.pid))))
            self.done.wait(SAMPLE_SECONDS)


class Unsupported(Exception):
    """The command was rejected as a usage error (exit 2): an option this dengine lacks."""


def run_child(cmd: Sequence[str], capture: bool) -> Run:
    """Run ``cmd``; stdout to a temp file (``capture``) or /dev/null; stderr to a temp file.

    Raises :class:`Unsupported` on a usage error naming an unknown option, SystemExit on any
    other failure.
    """
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        sink = out if capture else subprocess.DEVNULL
        t = time.perf_counter()
        proc = subprocess.Popen(list(cmd), cwd=REPO, stdin=subprocess.DEVNULL, stdout=sink, stderr=err)
        sampler = FastAnonSampler(proc.pid)
        sampler.start()
        _pid, status, usage = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - t
        sampler.done.set()
        sampler.join()
        code = os.waitstatus_to_exitcode(status)
        if code != 0:
            err.seek(0)
            tail = err.read().decode(errors="replace")[-2000:]
            if code == 2 and "no such option" in tail.lower():
                raise Unsupported(tail.strip().splitlines()[-1])
            raise SystemExit(f"{' '.join(cmd)} exited {code}:\n{tail}")
        out.seek(0)
        return Run(
            seconds,
            usage.ru_utime + usage.ru_stime,
            usage.ru_maxrss,
            sampler.peak_kib,
            out.read().decode(errors="replace") if capture else "",
        )


@dataclass
class Cell:
    """All runs of one command over one fleet, or why it could not run."""

    command: Command
    capture: bool
    runs: list[Run] = field(default_factory=list)
    argv: list[str] = field(default_factory=list)
    unsupported: str | None = None

    @property
    def best(self) -> Run | None:
        return min(self.runs, key=lambda r: r.seconds) if self.runs else None

    def to_dict(self, nbytes: int, baseline: float) -> dict[str, Any]:
        """Figures for the JSON report (``baseline``: xxhsum's best seconds)."""
        d: dict[str, Any] = {"label": self.command.label, "command": " ".join(self.argv)}
        best = self.best
        if best is None:
            d["n/a"] = self.unsupported
            return d
        d.update(
            seconds=round(best.seconds, 3),
            seconds_per_gib=round(best.seconds / (nbytes / 2**30), 3),
            gib_per_s=round(nbytes / best.seconds / 2**30, 3),
            speed_ratio=round(baseline / best.seconds, 3),
            cpu_seconds=round(best.cpu_seconds, 3),
            peak_anon_mib=round(max(r.anon_kib for r in self.runs) / 1024, 1),
            runs_seconds=[round(r.seconds, 3) for r in self.runs],
        )
        return d


def fleet_files(fleet: Path) -> list[Path]:
    """The fleet's images, sorted."""
    files = sorted(fleet.glob("fleet-*.raw"))
    if not files:
        raise SystemExit(f"no fleet-*.raw in {fleet}: run bench/make_fleet.py --guests N --out {fleet}")
    return files


def time_fleet(files: Sequence[Path], args: argparse.Namespace) -> dict[str, Cell]:
    """Run every command ``args.rounds`` times in rounds; the cells by label."""
    names = [str(p) for p in files]
    with tempfile.TemporaryDirectory(prefix="dengine-fleet-bench-") as tmp:
        counter = iter(range(1 << 30))

        def fresh() -> str:
            return os.path.join(tmp, f"cold-{next(counter)}")

        def drop() -> None:
            for d in Path(tmp).glob("cold-*"):
                shutil.rmtree(d)

        def analyze(*extra: str) -> list[str]:
            base = [str(args.dengine), "-q", "analyze", "--sharing-only", "--format", "json"]
            return [*base, "--index-dir", fresh(), *extra, *names]

        cells = [
            Cell(Command(XXH, lambda: ["xxhsum", "-H3", *names]), capture=False),
            Cell(Command(XXH2, lambda: xxhsum_in_two(names)), capture=False),
        ]
        if args.zstd:
            cells.append(Cell(Command(ZSTD, lambda: ["zstd", "-q", "-1", "-T1", "-c", *names]), False))
        cells += [
            Cell(Command(J1, lambda: analyze("-j", "1"), drop), capture=True),
            Cell(Command(J2, lambda: analyze("-j", "2"), drop), capture=True),
            Cell(Command(LIMITED, lambda: analyze("-j", "2", "--memory-limit", args.limit), drop), True),
        ]
        if args.plan:

            def plan(*extra: str) -> list[str]:
                base = [str(args.dengine), "-q", "plan", "--policy", "de", "--baseline", "none"]
                return [*base, "--format", "json", "--index-dir", fresh(), "-j", "2", *extra, *names]

            cells += [
                Cell(Command(PLAN, lambda: plan(), drop), capture=True),
                Cell(Command(PLAN_LIMITED, lambda: plan("--memory-limit", args.limit), drop), capture=True),
            ]
        for _ in range(args.rounds):
            for c in cells:
                if c.unsupported is not None:
                    continue
                c.argv = c.command.make()
                try:
                    c.runs.append(run_child(c.argv, c.capture))
                except Unsupported as exc:
                    c.unsupported = str(exc)
                finally:
                    if c.command.after is not None:
                        c.command.after()
    return {c.command.label: c for c in cells}


def xxhsum_in_two(names: Sequence[str]) -> list[str]:
    """``xxhsum -H3`` over the first half of the files and over the second, at once: what two
    processes gain over one on this machine for the very same work (the ceiling of ``-j 2`` over
    ``-j 1`` for hashing; two vCPUs that share a physical core gain far less than 2x)."""
    half = len(names) // 2
    quoted = [" ".join(shlex.quote(n) for n in part) for part in (names[:half], names[half:])]
    script = f"xxhsum -H3 {quoted[0]} > /dev/null & xxhsum -H3 {quoted[1]} > /dev/null; wait"
    return ["sh", "-c", script]


def identical(a: Cell, b: Cell) -> bool | None:
    """Whether every run of ``b`` printed what the first run of ``a`` did (None: one is n/a)."""
    if not a.runs or not b.runs:
        return None
    return all(r.stdout == a.runs[0].stdout for r in [*a.runs, *b.runs])


def fleet_report(fleet: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Warm the page cache, time the fleet, and gather its figures."""
    files = fleet_files(fleet)
    nbytes = sum(p.stat().st_size for p in files)
    print(f"[fleet_speed] {fleet}: {len(files)} files, {nbytes / 2**30:.2f} GiB", file=sys.stderr, flush=True)
    warm_cache(files)
    cells = time_fleet(files, args)
    xxh, xxh2 = cells[XXH].best, cells[XXH2].best
    assert xxh is not None
    j1, j2, lim = cells[J1].best, cells[J2].best, cells[LIMITED].best

    def anon(label: str) -> float | None:
        runs = cells[label].runs
        return round(max(r.anon_kib for r in runs) / 1024, 1) if runs else None

    return {
        "fleet": str(fleet),
        "guests": len(files),
        "bytes": nbytes,
        "gib": round(nbytes / 2**30, 3),
        "rows": [c.to_dict(nbytes, xxh.seconds) for c in cells.values()],
        "speed_ratio_j1": round(xxh.seconds / j1.seconds, 3) if j1 else None,
        "speed_ratio_j2": round(xxh.seconds / j2.seconds, 3) if j2 else None,
        "speed_ratio_limited": round(xxh.seconds / lim.seconds, 3) if lim else None,
        "speedup_j2_vs_j1": round(j1.seconds / j2.seconds, 3) if j1 and j2 else None,
        "speedup_xxhsum_2_vs_1": round(xxh.seconds / xxh2.seconds, 3) if xxh2 else None,
        "peak_anon_mib_j1": anon(J1),
        "peak_anon_mib_j2": anon(J2),
        "peak_anon_mib_limited": anon(LIMITED),
        "json_identical_limited_vs_j2": identical(cells[J2], cells[LIMITED]),
        "json_identical_j1_vs_j2": identical(cells[J2], cells[J1]),
        "limited_n/a": cells[LIMITED].unsupported,
        **(_plan_figures(cells, anon) if args.plan else {}),
    }


def _plan_figures(cells: dict[str, Cell], anon: Any) -> dict[str, Any]:
    """The plan's figures over a fleet: speed against zstd -1 -T1, memory, the same JSON."""
    zstd, plan, limited = cells[ZSTD].best, cells[PLAN].best, cells[PLAN_LIMITED].best
    return {
        "plan_speed_ratio_zstd": round(zstd.seconds / plan.seconds, 3) if zstd and plan else None,
        "plan_limited_speed_ratio_zstd": round(zstd.seconds / limited.seconds, 3)
        if zstd and limited
        else None,
        "peak_anon_mib_plan": anon(PLAN),
        "peak_anon_mib_plan_limited": anon(PLAN_LIMITED),
        "plan_json_identical_limited": identical(cells[PLAN], cells[PLAN_LIMITED]),
    }


def fmt(v: float | None, spec: str) -> str:
    """A figure, or n/a."""
    return "n/a" if v is None else format(v, spec)


def yes_no(v: bool | None) -> str:
    return "n/a" if v is None else ("yes" if v else "no")


def print_report(report: dict[str, Any]) -> None:
    """Per fleet a table of the commands, then one summary table over the fleets."""
    at = report["measured_at"]
    print(
        f"fleet speed, best of {report['rounds']} rounds; commit {at['commit']}, {at['time']}, "
        f"load {at['loadavg']} on {at['cpus']} CPUs; dengine {report['dengine']}; "
        f"--memory-limit {report['limit']}"
    )
    for f in report["fleets"]:
        print(
            f"\n{f['fleet']}: {f['guests']} guests, {f['gib']:.2f} GiB (speed ratio = xxhsum s / command s)"
        )
        w = max(len(r["label"]) for r in f["rows"])
        print(
            f"  {'command':<{w}} {'seconds':>8} {'s/GiB':>7} {'GiB/s':>7} {'speed ratio':>11} {'CPU s':>7} "
            f"{'peak anon MiB':>13}"
        )
        for r in f["rows"]:
            if "n/a" in r:
                print(f"  {r['label']:<{w}} {'n/a':>8}  ({r['n/a']})")
                continue
            print(
                f"  {r['label']:<{w}} {r['seconds']:>8.2f} {r['seconds_per_gib']:>7.2f} "
                f"{r['gib_per_s']:>7.2f} {r['speed_ratio']:>11.2f} {r['cpu_seconds']:>7.2f} "
                f"{r['peak_anon_mib']:>13.1f}"
            )
    print("\nsummary (s/GiB of dengine -j 2; ratio = xxhsum s / dengine s; anon = peak RssAnon MiB)")
    head = (
        f"  {'fleet':<10} {'guests':>6} {'GiB':>6} {'xxh s/GiB':>9} {'dengine s/GiB':>13} {'ratio -j1':>9} "
        f"{'ratio -j2':>9} {'ratio lim':>9} {'-j2/-j1':>7} {'xxh 2p/1p':>9} {'anon -j2':>8} {'anon lim':>8} "
        f"{'same JSON':>9}"
    )
    print(head)
    for f in report["fleets"]:
        rows = {r["label"]: r for r in f["rows"]}
        j2 = rows[J2]
        print(
            f"  {Path(f['fleet']).name:<10} {f['guests']:>6} {f['gib']:>6.2f} "
            f"{rows['xxhsum -H3']['seconds_per_gib']:>9.3f} {fmt(j2.get('seconds_per_gib'), '.3f'):>13} "
            f"{fmt(f['speed_ratio_j1'], '.2f'):>9} {fmt(f['speed_ratio_j2'], '.2f'):>9} "
            f"{fmt(f['speed_ratio_limited'], '.2f'):>9} {fmt(f['speedup_j2_vs_j1'], '.2f'):>7} "
            f"{fmt(f.get('speedup_xxhsum_2_vs_1'), '.2f'):>9} "
            f"{fmt(f['peak_anon_mib_j2'], '.0f'):>8} {fmt(f['peak_anon_mib_limited'], '.0f'):>8} "
            f"{yes_no(f['json_identical_limited_vs_j2']):>9}"
        )
    print("  same JSON: dengine JSON with --memory-limit identical to without (-j 2); n/a: option rejected")
    print("  xxh 2p/1p: xxhsum -H3 over all files / over each half at once (two processes): this machine's")
    print("  own gain from a second process on the same hashing, the ceiling -j2/-j1 is measured against")
    if any("plan_speed_ratio_zstd" in f for f in report["fleets"]):
        _print_plan_summary(report["fleets"])
    print("\ngoals")
    for what, figure, met in goals(report["fleets"]):
        verdict = "n/a" if met is None else ("met" if met else "NOT met")
        print(f"  {what}: {fmt(figure, '.2f')} ({verdict})")
    fit = report.get("scaling")
    if fit is not None:
        print(
            f"\nscaling (a line through the -j 2 times): fixed cost {fit['fixed_seconds']:.3f} s a run, "
            f"{fit['seconds_per_gib']:.3f} s per GiB; s/GiB without the fixed cost, largest / smallest: "
            f"{fmt(fit['net_spread'], '.2f')}"
        )


def _print_plan_summary(fleets: Sequence[dict[str, Any]]) -> None:
    """The exact plan over each fleet: s/GiB, speed against zstd -1 -T1, memory, the same JSON."""
    print("\nplan --policy de, nothing cached (ratio = zstd -1 -T1 s / plan s; anon = peak RssAnon MiB)")
    print(
        f"  {'fleet':<10} {'GiB':>6} {'zstd s/GiB':>10} {'plan s/GiB':>10} {'ratio':>6} {'ratio lim':>9} "
        f"{'anon':>6} {'anon lim':>8} {'same JSON':>9}"
    )
    for f in fleets:
        rows = {r["label"]: r for r in f["rows"]}
        zstd, plan = rows[ZSTD].get("seconds_per_gib"), rows[PLAN].get("seconds_per_gib")
        print(
            f"  {Path(f['fleet']).name:<10} {f['gib']:>6.2f} {fmt(zstd, '.3f'):>10} "
            f"{fmt(plan, '.3f'):>10} {fmt(f['plan_speed_ratio_zstd'], '.2f'):>6} "
            f"{fmt(f['plan_limited_speed_ratio_zstd'], '.2f'):>9} {fmt(f['peak_anon_mib_plan'], '.0f'):>6} "
            f"{fmt(f['peak_anon_mib_plan_limited'], '.0f'):>8} {yes_no(f['plan_json_identical_limited']):>9}"
        )


def goals(fleets: Sequence[dict[str, Any]]) -> list[tuple[str, float | None, bool | None]]:
    """The issue's goals: (what, figure, met), met ``None`` where the fleets measured cannot tell."""
    out: list[tuple[str, float | None, bool | None]] = []
    sixteen = [f for f in fleets if f["guests"] == 16]
    for f in sixteen[:1]:
        ratio, speedup = f["speed_ratio_j2"], f["speedup_j2_vs_j1"]
        out.append(
            (f"16 guests: -j 2 ratio to xxhsum >= {RATIO_GOAL:g}", ratio, _at_least(ratio, RATIO_GOAL))
        )
        ceiling = f.get("speedup_xxhsum_2_vs_1")
        what = f"16 guests: -j 2 / -j 1 >= {SPEEDUP_GOAL:g}"
        if ceiling is not None:
            what += f" (xxhsum in 2 processes / in 1 here: {ceiling:.2f})"
        out.append((what, speedup, _at_least(speedup, SPEEDUP_GOAL)))
    if fleets:
        big = max(fleets, key=lambda f: f["bytes"])
        anon, same = big["peak_anon_mib_limited"], big["json_identical_limited_vs_j2"]
        met = None if anon is None or same is None else anon <= LIMITED_ANON_GOAL_MIB and same
        out.append(
            (
                f"{big['guests']} guests: --memory-limit peak anon <= {LIMITED_ANON_GOAL_MIB} MiB, same JSON",
                anon,
                met,
            )
        )
    per_gib = [
        r["seconds_per_gib"] for f in fleets for r in f["rows"] if r["label"] == J2 and "seconds_per_gib" in r
    ]
    if len(per_gib) > 1:
        spread = max(per_gib) / min(per_gib)
        out.append(
            (f"s/GiB largest / smallest over the fleets <= {FLAT_GOAL:g}", spread, spread <= FLAT_GOAL)
        )
    return out


def scaling(fleets: Sequence[dict[str, Any]]) -> dict[str, float | None] | None:
    """What the -j 2 times say about scaling, beside the flatness goal (which they decide): the
    least-squares line through (GiB, seconds) over the fleets, its intercept (the fixed cost of a
    run: start-up, imports, forks) and slope (seconds per GiB), and the s/GiB of each fleet once
    the fixed cost is taken off, largest / smallest (``None`` when the line leaves a fleet no
    time of its own: the fit says nothing then).  ``None`` without two fleets of different
    sizes."""
    points = [
        (f["gib"], r["seconds"]) for f in fleets for r in f["rows"] if r["label"] == J2 and "seconds" in r
    ]
    if len(points) < 2 or len({g for g, _ in points}) < 2:
        return None
    n = len(points)
    mean_g = sum(g for g, _ in points) / n
    mean_t = sum(t for _, t in points) / n
    slope = sum((g - mean_g) * (t - mean_t) for g, t in points) / sum((g - mean_g) ** 2 for g, _ in points)
    fixed = mean_t - slope * mean_g
    net = [(t - fixed) / g for g, t in points]
    return {
        "fixed_seconds": fixed,
        "seconds_per_gib": slope,
        "net_spread": max(net) / min(net) if min(net) > 0 else None,
    }


def _at_least(v: float | None, goal: float) -> bool | None:
    return None if v is None else v >= goal


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Command-line arguments."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--fleet",
        action="append",
        type=Path,
        help="a fleet directory (repeatable; default: /work/bench-data/fleet-{4,16,64})",
    )
    ap.add_argument("--rounds", type=int, default=3, help="best of N rounds (default: %(default)s)")
    ap.add_argument("--zstd", action="store_true", help="also time zstd -1 -T1 (slow)")
    ap.add_argument(
        "--plan",
        action="store_true",
        help="also time the exact plan, with and without the limit (implies --zstd)",
    )
    ap.add_argument(
        "--dengine", type=Path, default=DEFAULT_DENGINE, help="dengine executable (default: %(default)s)"
    )
    ap.add_argument("--limit", default="128M", help="the --memory-limit value timed (default: %(default)s)")
    ap.add_argument("--json", type=Path, metavar="FILE", help="also write the figures as JSON to FILE")
    args = ap.parse_args(argv)
    args.fleet = args.fleet or list(DEFAULT_FLEETS)
    args.zstd = args.zstd or args.plan
    if args.rounds < 1:
        ap.error("--rounds must be at least 1")
    for tool in ("xxhsum", *(("zstd",) if args.zstd else ())):
        if shutil.which(tool) is None:
            ap.error(f"{tool} not found (apt-get install xxhash zstd)")
    if not os.access(args.dengine, os.X_OK):
        ap.error(f"{args.dengine} is not an executable (scripts/setup makes .venv)")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Time every fleet; print the tables; write --json."""
    args = parse_args(argv)
    for fleet in args.fleet:
        fleet_files(fleet)  # fail before timing anything
    os.environ["GIT_OPTIONAL_LOCKS"] = "0"  # measured_at's git status must not touch the index
    at = measured_at()
    try:
        precompile()
    except subprocess.CalledProcessError as exc:
        print(f"[fleet_speed] note: compiling dengine_cli failed ({exc}); timing anyway", file=sys.stderr)
    report: dict[str, Any] = {
        "benchmark": "bench/fleet_speed.py",
        "measured_at": at,
        "dengine": str(args.dengine),
        "rounds": args.rounds,
        "limit": args.limit,
        "sample_seconds": SAMPLE_SECONDS,
        "fleets": [fleet_report(f, args) for f in args.fleet],
    }
    report["goals"] = [
        {"goal": what, "figure": figure, "met": met} for what, figure, met in goals(report["fleets"])
    ]
    report["scaling"] = scaling(report["fleets"])
    print_report(report)
    if args.json:
        tmp = args.json.with_name(f".{args.json.name}.tmp")
        tmp.write_text(json.dumps(report, indent=2) + "\n")
        os.replace(tmp, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
