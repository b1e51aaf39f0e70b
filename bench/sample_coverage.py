"""Does the sampled plan's 95% interval hold the exact figure 95% of the time?  Checked on real dumps.

``dengine plan --sample F --seed S`` estimates the footprint and savings from a seeded sample and
prints a 95% confidence interval.  This runs the exact plan once and the sampled plan for seeds
0 .. N-1 (default 200) over the same dumps, in one process (one session: the page indexes and the
sharing are built or read once, then every sampled plan is computed as ``dengine plan --sample``
computes it: similarity, the sample, the real patches and compressed pages, the estimate), and
reports, for the total and each VM, for the footprint and the savings:

* coverage: how many intervals held the exact figure, with its own 95% (Wilson) interval, the
  binomial uncertainty of a coverage measured over N seeds;
* mean error of the estimate (with its standard error) and how many misses were above / below;
* mean half-width of the interval against 1.96 x the standard deviation of the errors over the
  seeds (equal for an honest interval);
* pages computed per sampled plan and seconds per seed.

``--replay N`` also replays N seeds (e.g. 4000: a binomial uncertainty of +-0.7% instead of
+-2.5%) from the exact plan's decisions: each seed's sample is drawn and extrapolated by the
plan's own functions (``sample_groups``, ``extrapolate``) from the exact decisions of the groups
it draws, which are the sampled plan's own (tests/test_sampling.py checks it page by page; the
first seeds of both runs are compared here too).  A millisecond a seed instead of a plan.

Goal: total footprint and savings coverage >= 93% over >= 200 seeds.

Usage: python3 bench/sample_coverage.py [--seeds N] [--sample F] [--policy P] [--json] [DUMPS ...]
(default dumps: the four bench guests /work/bench-data/bench-{1..4}.elf and the fixture guest
fixtures/alpha.elf.zst: five real QEMU guests.)  Run it with ``PYTHONPATH=<an exported tree>`` to
measure another version of dengine on the same dumps.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from analyze_speed import DEFAULT_DIR, REPO, measured_at

GOAL = 0.93
Z95 = 1.959963984540054


def default_dumps() -> list[Path]:
    dumps = [DEFAULT_DIR / f"bench-{i}.elf" for i in range(1, 5)] + [REPO / "fixtures" / "alpha.elf.zst"]
    missing = [str(p) for p in dumps if not p.exists()]
    if missing:
        raise SystemExit(f"missing {', '.join(missing)}: run bench/make_bench_dumps.py")
    return dumps


def wilson(k: int, n: int) -> tuple[float, float]:
    """The 95% Wilson score interval of a proportion k/n."""
    if n == 0:
        return 0.0, 1.0
    p = k / n
    d = 1 + Z95**2 / n
    c = (p + Z95**2 / (2 * n)) / d
    h = Z95 * math.sqrt(p * (1 - p) / n + Z95**2 / (4 * n * n)) / d
    return max(0.0, c - h), min(1.0, c + h)


@dataclass
class Figure:
    """One figure (e.g. the total footprint) over the seeds: exact value, estimates, intervals."""

    name: str
    exact: float
    estimates: list[float]
    lows: list[float]
    highs: list[float]

    def summary(self, scale: float) -> dict[str, Any]:
        """Coverage and errors; errors and widths divided by ``scale`` (e.g. to percent)."""
        n = len(self.estimates)
        errs = [(e - self.exact) / scale for e in self.estimates]
        halves = [(h - lo) / 2 / scale for lo, h in zip(self.lows, self.highs, strict=True)]
        held = sum(lo <= self.exact <= h for lo, h in zip(self.lows, self.highs, strict=True))
        mean = sum(errs) / n
        sd = math.sqrt(sum((e - mean) ** 2 for e in errs) / (n - 1)) if n > 1 else 0.0
        lo, hi = wilson(held, n)
        return {
            "name": self.name,
            "exact": self.exact,
            "seeds": n,
            "covered": held,
            "coverage": held / n,
            "coverage_interval_95": [round(lo, 4), round(hi, 4)],
            "mean_error": mean,
            "mean_error_se": sd / math.sqrt(n),
            "misses_high": sum(lo > self.exact for lo in self.lows),
            "misses_low": sum(h < self.exact for h in self.highs),
            "mean_half_width": sum(halves) / n,
            "z_sd_of_errors": Z95 * sd,
        }


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("dumps", nargs="*", type=Path)
    ap.add_argument("--seeds", type=int, default=200, help="seeds 0..N-1 (default: %(default)s)")
    ap.add_argument("--sample", type=float, default=0.05, help="the fraction (default: %(default)s)")
    ap.add_argument("--policy", default="de", help="policy name (default: %(default)s)")
    ap.add_argument("--index-dir", type=Path, help="cache directory (default: a temporary one)")
    ap.add_argument("--replay", type=int, default=0, help="also replay N seeds from the exact decisions")
    ap.add_argument("--json", action="store_true", help="print the figures as JSON")
    return ap.parse_args(argv)


def run(args: argparse.Namespace, dumps: Sequence[Path], index_dir: Path) -> dict[str, Any]:
    from dengine_cli.policies import resolve_policy
    from dengine_cli.session import Session, Settings

    policy = resolve_policy(args.policy)
    with Session(dumps, Settings(index_dir=index_dir)) as session:
        _, exact = session.plan(policy)
        names = ["total", *(Path(vm.name).name for vm in exact.vms)]
        exact_vms = [exact.total, *exact.vms]
        fp = {n: Figure(n, vm.footprint_bytes, [], [], []) for n, vm in zip(names, exact_vms, strict=True)}
        sav = {n: Figure(n, 100 * vm.savings, [], [], []) for n, vm in zip(names, exact_vms, strict=True)}
        computed = candidates = 0
        start = time.perf_counter()
        for seed in range(args.seeds):
            _, est = session.plan(policy, sample=args.sample, seed=seed)
            assert est.sample is not None
            computed += est.sample.pages_computed
            candidates = est.sample.candidates
            for n, vm in zip(names, [est.total, *est.vms], strict=True):
                d = vm.to_dict()
                fp[n].estimates.append(vm.footprint_bytes)
                fp[n].lows.append(d["footprint_interval_bytes"][0])
                fp[n].highs.append(d["footprint_interval_bytes"][1])
                # As printed (JSON, 4 decimals): what a user compares.
                sav[n].estimates.append(d["savings_percent"])
                sav[n].lows.append(d["savings_interval_percent"][0])
                sav[n].highs.append(d["savings_interval_percent"][1])
        seconds = (time.perf_counter() - start) / args.seeds
        replayed = replay(session, policy, exact, args, names, fp) if args.replay else None
    return {
        "replay": replayed,
        "footprint": [fp[n].summary(max(1.0, fp[n].exact) / 100) for n in names],
        "savings": [sav[n].summary(1.0) for n in names],
        "pages_computed_mean": computed / args.seeds,
        "candidates": candidates,
        "seconds_per_seed": seconds,
    }


def replay(
    session: Any, policy: Any, exact: Any, args: argparse.Namespace, names: list[str], real: dict[str, Figure]
) -> dict[str, Any]:
    """Coverage over ``args.replay`` seeds from the exact plan's decisions (see the module)."""
    import inspect

    import numpy as np

    from dengine_cli.engine.plan import sampling
    from dengine_cli.engine.plan.model import COMPRESS, PATCH, total_of
    from dengine_cli.engine.plan.scope import scope_of, similarity_keys
    from dengine_cli.engine.similarity import candidate_pairs

    dumps, indexes = session.dumps(), session.indexes()
    sharing = session.sharing(policy.cross_vm)
    scope = scope_of(sharing, policy, [None] * len(dumps), True)
    keys = similarity_keys(dumps, policy, scope, 1 << 14)
    e = len(scope.e_vm)
    per_vm = None if policy.cross_vm else scope.e_vm
    pages, refs = candidate_pairs(
        keys, np.ones(e, dtype=np.bool_), scope.e_cand, policy.detector.candidates, per_vm
    )
    del keys, indexes
    at = [scope.e_pos[scope.e_vm == v] for v in range(len(dumps))]
    actions = np.concatenate([exact.pages[v].actions[at[v]] for v in range(len(dumps))])
    sizes = np.concatenate([exact.pages[v].sizes[at[v]] for v in range(len(dumps))]).astype(np.int32)
    patched, compressed = actions == PATCH, actions == COMPRESS
    bounds = np.searchsorted(scope.e_vm, np.arange(len(dumps) + 1))
    # An older dengine's extrapolate took the VMs' bounds over E.
    extrapolate: Any = sampling.extrapolate
    extra = [bounds] if "bounds" in inspect.signature(extrapolate).parameters else []
    figures = {n: Figure(n, real[n].exact, [], [], []) for n in names}
    for seed in range(args.replay):
        s = sampling.sample_groups(scope, pages, refs, args.sample, seed)
        a = s.active
        vms, half = extrapolate(
            list(exact.vms), scope, s, patched & a, sizes, compressed & a, sizes, *extra, -1, None
        )
        for n, vm in zip(names, [total_of(vms, None, half), *vms], strict=True):
            figures[n].estimates.append(vm.footprint_bytes)
            assert vm.footprint_low is not None and vm.footprint_high is not None
            figures[n].lows.append(vm.footprint_low)
            figures[n].highs.append(vm.footprint_high)
    same = min(args.seeds, args.replay)
    for n in names:
        got = (figures[n].estimates[:same], figures[n].lows[:same], figures[n].highs[:same])
        if got != (real[n].estimates[:same], real[n].lows[:same], real[n].highs[:same]):
            raise SystemExit(f"replay differs from the sampled plans for {n}: not the same code?")
    return {
        "seeds": args.replay,
        "footprint": [figures[n].summary(max(1.0, figures[n].exact) / 100) for n in names],
    }


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    dumps = list(args.dumps) or default_dumps()
    import dengine_cli

    at = measured_at()
    with tempfile.TemporaryDirectory(prefix="dengine-coverage-") as tmp:
        out = run(args, dumps, args.index_dir or Path(tmp))
    total_fp, total_sav = out["footprint"][0], out["savings"][0]
    met = total_fp["coverage"] >= GOAL and total_sav["coverage"] >= GOAL and args.seeds >= 200
    doc = {
        "goal": f"total footprint and savings coverage >= {GOAL:.0%} over >= 200 seeds",
        "measured_at": at,
        "dengine": str(Path(dengine_cli.__file__).parent),
        "dumps": [str(p) for p in dumps],
        "sample": args.sample,
        "policy": args.policy,
        **out,
        "goal_met": met,
    }
    if args.json:
        print(json.dumps(doc, indent=2))
        return 0
    print(
        f"{len(dumps)} dumps, --sample {args.sample}, seeds 0..{args.seeds - 1}, policy {args.policy}; "
        f"dengine from {doc['dengine']}; commit {at['commit']}, {at['time']}, load {at['loadavg']}"
    )
    print(
        f"pages computed per sampled plan: {out['pages_computed_mean']:.0f} of {out['candidates']} "
        f"candidates; {out['seconds_per_seed']:.2f} s per seed"
    )
    for what, unit in (("footprint", "% of exact"), ("savings", "pp")):
        print(f"{what} (errors and half-widths in {unit}):")
        print(
            f"  {'':<16} {'coverage':>9} {'95% of it':>13} {'mean error':>17} {'high':>5} {'low':>5} "
            f"{'mean half':>10} {'1.96 sd':>8}"
        )
        for r in out[what]:
            if r["exact"] == 0 and r["mean_half_width"] == 0:
                continue  # a VM with nothing to estimate (e.g. every page shared)
            lo, hi = r["coverage_interval_95"]
            print(
                f"  {r['name'][:16]:<16} {r['coverage']:>9.3f} {lo:>6.3f}-{hi:<6.3f} "
                f"{r['mean_error']:>+8.4f} +-{r['mean_error_se']:<6.4f} "
                f"{r['misses_high']:>5} {r['misses_low']:>5} "
                f"{r['mean_half_width']:>10.4f} {r['z_sd_of_errors']:>8.4f}"
            )
    if out["replay"] is not None:
        print(f"footprint, replayed over {out['replay']['seeds']} seeds from the exact decisions:")
        for r in out["replay"]["footprint"]:
            if r["exact"] == 0 and r["mean_half_width"] == 0:
                continue
            lo, hi = r["coverage_interval_95"]
            print(
                f"  {r['name'][:16]:<16} {r['coverage']:>9.4f} {lo:>6.4f}-{hi:<6.4f} "
                f"{r['mean_error']:>+8.4f} +-{r['mean_error_se']:<6.4f} "
                f"{r['misses_high']:>5} {r['misses_low']:>5} "
                f"{r['mean_half_width']:>10.4f} {r['z_sd_of_errors']:>8.4f}"
            )
    print(f"goal (total coverage >= {GOAL:.0%} over >= 200 seeds): {'met' if met else 'NOT met'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
