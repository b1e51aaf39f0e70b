"""Sampled plans: groups of linked candidates drawn by seed, and the extrapolation of their
savings with a 95% interval (see :mod:`dengine_cli.engine.plan`)."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from dengine_cli.engine.paging import vms_per_host
from dengine_cli.engine.plan.model import I64, Bool, SampleInfo, VmPlan, whole_bytes
from dengine_cli.engine.plan.scope import Scope
from dengine_cli.pages import PAGE_SIZE

#: Sampling: groups of more pages than this, and than 1/:data:`TAKE_ALL_SHARE` of the candidates,
#: are always computed whole (one of them could dominate the variance of an estimate).
TAKE_ALL_UNIT = 64


TAKE_ALL_SHARE = 200


#: z for a two-sided 95% normal interval.
Z95 = 1.959963984540054


def components(n: int, a: I64, b: I64) -> I64:
    """Connected-component labels (smallest member) of n nodes linked by edges a[i]-b[i]."""
    label = np.arange(n, dtype=np.int64)
    if not len(a):
        return label
    while True:
        m = np.minimum(label[a], label[b])
        new = label.copy()
        np.minimum.at(new, a, m)
        np.minimum.at(new, b, m)
        # Pointer jumping: follow labels to their root until stable.
        while True:
            jumped = new[new]
            if np.array_equal(jumped, new):
                break
            new = jumped
        if np.array_equal(new, label):
            return label
        label = new


@dataclass
class Sampling:
    active: Bool
    unit: I64
    take_all: Bool
    n_units: int
    n_sampled: int
    n_take_all: int
    info: SampleInfo


def sample_groups(scope: Scope, pages: I64, refs: I64, fraction: float, seed: int) -> Sampling:
    n = len(scope.e_vm)
    cc = scope.e_cand[refs]
    label = components(n, pages[cc], refs[cc])
    cand = np.flatnonzero(scope.e_cand)
    unit_of = label[cand]
    units, inverse, sizes = np.unique(unit_of, return_inverse=True, return_counts=True)
    big = sizes > max(TAKE_ALL_UNIT, len(cand) // TAKE_ALL_SHARE)
    small = np.flatnonzero(~big)
    n_pick = min(len(small), round(fraction * len(small)))
    rng = np.random.default_rng(seed)
    picked = np.zeros(len(units), dtype=np.bool_)
    picked[rng.choice(small, size=n_pick, replace=False)] = True
    active = np.zeros(n, dtype=np.bool_)
    active[cand] = (picked | big)[inverse]
    unit = np.full(n, -1, dtype=np.int64)
    unit[cand] = inverse
    info = SampleInfo(
        fraction=fraction,
        seed=seed,
        units=len(units),
        take_all=int(big.sum()),
        sampled=n_pick,
        candidates=len(cand),
        pages_computed=int(active.sum()),
    )
    take_all = np.zeros(n, dtype=np.bool_)
    take_all[cand] = big[inverse]
    return Sampling(active, unit, take_all, len(small), n_pick, int(big.sum()), info)


def extrapolate(
    vms: list[VmPlan],
    scope: Scope,
    s: Sampling,
    patched: Bool,
    patch_size: npt.NDArray[np.int32],
    compressed: Bool,
    comp_size: npt.NDArray[np.int32],
    bounds: I64,
    zero_frame_vm: int,
    host_memory: int | None,
) -> tuple[list[VmPlan], float]:
    """Scale the sampled groups' figures up to all groups, per VM; also the half-width of the
    total footprint's interval.

    A ratio estimator with the pages of a group as auxiliary variable (known for every group):
    ``saved = sum(y) / sum(x) * X`` over the sampled groups (y saved bytes, x pages), X the pages
    of all groups not taken whole.  Groups differ in size; saved bytes follow size closely, so
    this is far tighter than scaling by the number of groups.  Variance: the usual
    linearization, ``N^2 (1 - n/N) / n * s^2(y - R x)``.
    """
    n_vms = len(vms)
    cost = np.full(len(scope.e_vm), PAGE_SIZE, dtype=np.int64)
    cost[patched] = patch_size[patched]
    cost[compressed] = comp_size[compressed]
    saved = PAGE_SIZE - cost
    sampled = s.active & ~s.take_all
    in_stratum = scope.e_cand & ~s.take_all
    est = _RatioEstimator(s.n_units, s.n_sampled)
    out = []
    for v in range(n_vms):
        sl = slice(int(bounds[v]), int(bounds[v + 1]))
        fixed = s.take_all[sl]
        smp = sampled[sl]
        unit = s.unit[sl][smp]
        pages_all = int(np.count_nonzero(in_stratum[sl]))
        saved_est, var = est.total(unit, saved[sl][smp], pages_all)
        saved_est += float(saved[sl][fixed].sum())
        half = Z95 * math.sqrt(var)
        kept = int(scope.kept[v].sum())
        base = kept * PAGE_SIZE + (PAGE_SIZE if v == zero_frame_vm else 0)
        fp = round(base - saved_est)

        def scaled(
            values: npt.NDArray[np.int64],
            fixed: Bool = fixed,
            smp: Bool = smp,
            unit: I64 = unit,
            pages_all: int = pages_all,
        ) -> int:
            part, _ = est.total(unit, values[smp], pages_all)
            return int(values[fixed].sum()) + round(part)

        p = patched[sl].astype(np.int64)
        c = compressed[sl].astype(np.int64)
        p_cnt, c_cnt = scaled(p), scaled(c)
        out.append(
            dataclasses.replace(
                vms[v],
                whole=kept - p_cnt - c_cnt,
                patched=p_cnt,
                patch_bytes=scaled(p * patch_size[sl]),
                compressed=c_cnt,
                compressed_bytes=scaled(c * comp_size[sl]),
                footprint_bytes=fp,
                footprint_low=max(0, fp - whole_bytes(half)),
                footprint_high=fp + whole_bytes(half),
                per_host=vms_per_host(host_memory, fp) if host_memory is not None else None,
            )
        )
    # The total's interval: over whole groups (a group may span VMs).
    _, total_var = est.total(s.unit[sampled], saved[sampled], int(np.count_nonzero(in_stratum)))
    return out, Z95 * math.sqrt(total_var)


@dataclass(frozen=True)
class _RatioEstimator:
    """Ratio estimation of a total over ``big_n`` groups from a simple random sample of ``n``."""

    big_n: int
    n: int

    def total(self, unit: I64, y: npt.NDArray[np.int64], x_total: int) -> tuple[float, float]:
        """Estimated total of ``y`` (given per sampled page with its group in ``unit``) over all
        groups holding ``x_total`` pages, and its variance."""
        if not len(unit) or self.n == 0:
            return 0.0, 0.0
        _, inverse = np.unique(unit, return_inverse=True)
        y_u = np.bincount(inverse, weights=y.astype(np.float64))
        x_u = np.bincount(inverse).astype(np.float64)
        ratio = float(y_u.sum()) / float(x_u.sum())
        d = y_u - ratio * x_u
        var = 0.0
        if self.n > 1:
            fpc = 1.0 - self.n / self.big_n
            var = self.big_n**2 * fpc * float(d @ d) / (self.n - 1) / self.n
        return ratio * x_total, var
