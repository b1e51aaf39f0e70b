"""Sampled plans: groups of linked candidates drawn by seed in strata, and the extrapolation of
their savings with a 95% interval (see :mod:`dengine_cli.engine.plan`).

The design, and why (measured on the real bench dumps, ``bench/sample_coverage.py``):

* **Units** are the connected groups of candidates linked by proposed (page, reference) pairs:
  within a group the decisions are exactly those of the full plan, so the sample does not change
  what is estimated (no design bias; tests/test_sampling.py checks it page by page).
* **Groups of at least 1/f pages are computed whole** (the take-all stratum).  Sampling a group
  of x pages at rate f costs f x pages and adds about (1 - f) / f x^2 s^2 to the variance (s^2
  the per-page spread of saved bytes); computing it whole costs x pages more and removes that.
  Removing it is the cheaper way to a given variance when x s_u^2 > s^2 / f, that is (for a
  group of typical spread) when x > 1/f.  Left in the sample, such groups are the skew that
  broke the interval: on four bench guests, 13 groups of 17-105 pages (of 23,738) carried 31% of
  the variance, a 5% sample held none of them most of the time, and the interval missed, always
  on the same side, one time in sixteen.
* **Strata** among the other groups: the VM the group lies in (or "several VMs"), its size
  class (1, 2-3, 4-7, ... pages) and, for a single page, whether a reference was proposed for it
  (it will likely be patched, saving ~4 KiB, where an unlinked page is only compressed).  Each
  stratum gets a simple random sample of ``round(f' N_h)`` groups, at least 2 (or all), with
  ``f' = max(f, MIN_SAMPLED / N)``: at least :data:`MIN_SAMPLED` groups in all.
* **Estimator**: the stratified expansion estimator, each sampled group weighing N_h / n_h.  It
  is unbiased (no ratio bias), linear (the VMs' figures add up to the total, and a group spread
  over several VMs is one unit of the total's variance) and has an unbiased variance estimator,
  ``sum_h N_h^2 (1 - n_h / N_h) s_h^2 / n_h``, per VM and for the total alike.  The interval is
  the normal one, ``+- 1.96 sd``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from dengine_cli.engine.paging import vms_per_host
from dengine_cli.engine.plan.model import I64, Bool, SampleInfo, VmPlan, whole_bytes
from dengine_cli.engine.plan.scope import Scope
from dengine_cli.pages import PAGE_SIZE

#: At least this many groups are sampled (all when there are fewer).  The normal interval needs
#: the sample mean to be near-normal: Cochran's rule asks for n > 25 G1^2 sampled units, G1 the
#: skewness of their values; per-page savings are skewed by the pages that save nothing (G1 of
#: -2.8 in the fixture guests, the most skewed population measured: n > 196).
MIN_SAMPLED = 200

#: Fewest groups drawn from a stratum (unless it has fewer): its variance needs two.
MIN_PER_STRATUM = 2

#: z for a two-sided 95% normal interval.
Z95 = 1.959963984540054

#: Size classes (log2 of a group's pages) are kept apart up to this one.
_SIZE_CLASSES = 62


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
    """Which groups a sampled plan computes.  Over the offered pages E: ``active`` (computed),
    ``take_all`` (in a group computed whole), ``unit`` (the page's group, -1: not a candidate).
    Per group: ``stratum`` (-1: taken whole) and ``weight`` (how many groups of the population
    it stands for: 1 if taken whole, N_h / n_h if drawn, 0 if not drawn).  Per stratum: the
    groups ``big_n`` it holds and ``n`` drawn."""

    active: Bool
    take_all: Bool
    unit: I64
    stratum: I64
    weight: npt.NDArray[np.float64]
    big_n: I64
    n: I64
    info: SampleInfo


def take_all_size(fraction: float) -> int:
    """Groups of at least this many pages are computed whole: the sampling interval 1/f."""
    return max(1, math.ceil(1.0 / fraction - 1e-9))


def sample_groups(scope: Scope, pages: I64, refs: I64, fraction: float, seed: int) -> Sampling:
    """The groups a plan sampled at ``fraction`` with ``seed`` computes (see the module)."""
    n_e = len(scope.e_vm)
    cc = scope.e_cand[refs]
    label = components(n_e, pages[cc], refs[cc])
    cand = np.flatnonzero(scope.e_cand)
    units, inverse, sizes = np.unique(label[cand], return_inverse=True, return_counts=True)
    n_units = len(units)
    big = sizes >= take_all_size(fraction)
    stratum = np.full(n_units, -1, dtype=np.int64)
    key = _stratum_keys(scope, pages, cand, inverse, sizes)
    keys, stratum_small = np.unique(key[~big], return_inverse=True)
    stratum[~big] = stratum_small
    big_n = np.bincount(stratum_small, minlength=len(keys)).astype(np.int64)
    rate = min(1.0, max(fraction, MIN_SAMPLED / max(1, int(big_n.sum()))))
    n = np.maximum(np.minimum(big_n, MIN_PER_STRATUM), np.round(rate * big_n).astype(np.int64))
    picked = _draw(stratum, n, np.random.default_rng(seed))
    weight = np.zeros(n_units, dtype=np.float64)
    weight[big] = 1.0
    weight[picked] = (big_n / np.maximum(n, 1))[stratum[picked]]
    active = np.zeros(n_e, dtype=np.bool_)
    active[cand] = (picked | big)[inverse]
    unit = np.full(n_e, -1, dtype=np.int64)
    unit[cand] = inverse
    take_all = np.zeros(n_e, dtype=np.bool_)
    take_all[cand] = big[inverse]
    info = SampleInfo(
        fraction=fraction,
        seed=seed,
        units=n_units,
        take_all=int(big.sum()),
        sampled=int(picked.sum()),
        candidates=len(cand),
        pages_computed=int(active.sum()),
    )
    return Sampling(active, take_all, unit, stratum, weight, big_n, n, info)


def _stratum_keys(scope: Scope, pages: I64, cand: I64, inverse: I64, sizes: I64) -> I64:
    """Per group, its stratum's key: (VM, or n_vms for a group over several VMs; size class;
    whether some page of it has a proposed reference)."""
    n_units = len(sizes)
    vm = scope.e_vm[cand]
    lo = np.full(n_units, np.iinfo(np.int64).max, dtype=np.int64)
    hi = np.full(n_units, -1, dtype=np.int64)
    np.minimum.at(lo, inverse, vm)
    np.maximum.at(hi, inverse, vm)
    n_vms = int(scope.e_vm[-1]) + 1 if len(scope.e_vm) else 0
    where = np.where(lo == hi, lo, n_vms)
    size_class = np.minimum(np.log2(sizes).astype(np.int64), _SIZE_CLASSES - 1)
    proposed = np.zeros(len(scope.e_vm), dtype=np.bool_)
    proposed[pages] = True
    linked = np.bincount(inverse, weights=proposed[cand], minlength=n_units) > 0
    return (where * _SIZE_CLASSES + size_class) * 2 + linked


def _draw(stratum: I64, n: I64, rng: np.random.Generator) -> Bool:
    """A simple random sample of ``n[h]`` groups in each stratum h (``stratum`` -1: none)."""
    picked = np.zeros(len(stratum), dtype=np.bool_)
    if not len(n):
        return picked
    order = np.lexsort((rng.random(len(stratum)), stratum))
    s = stratum[order]
    starts = np.flatnonzero(np.r_[True, s[1:] != s[:-1]])
    first = np.repeat(starts, np.diff(np.r_[starts, len(s)]))
    rank = np.arange(len(s)) - first
    picked[order] = (s >= 0) & (rank < n[np.maximum(s, 0)])
    return picked


def extrapolate(
    vms: list[VmPlan],
    scope: Scope,
    s: Sampling,
    patched: Bool,
    patch_size: npt.NDArray[np.int32],
    compressed: Bool,
    comp_size: npt.NDArray[np.int32],
    frames: Sequence[int],
    host_memory: int | None,
) -> tuple[list[VmPlan], float]:
    """Scale the sampled groups' figures up to all groups, per VM (each computed page weighs
    its group's weight); also the half-width of the total footprint's interval."""
    on = np.flatnonzero(s.active)
    a_vm, a_unit = scope.e_vm[on], s.unit[on]
    a_patched, a_compressed = patched[on], compressed[on]
    a_patch_size, a_comp_size = patch_size[on].astype(np.int64), comp_size[on].astype(np.int64)
    cost = np.full(len(on), PAGE_SIZE, dtype=np.int64)
    cost[a_patched] = a_patch_size[a_patched]
    cost[a_compressed] = a_comp_size[a_compressed]
    saved = PAGE_SIZE - cost
    w = s.weight[a_unit]
    a_bounds = np.searchsorted(a_vm, np.arange(len(vms) + 1))
    out = []
    for v, vm in enumerate(vms):
        sl = slice(int(a_bounds[v]), int(a_bounds[v + 1]))
        ws = w[sl]

        def scaled(values: npt.NDArray[np.int64], ws: npt.NDArray[np.float64] = ws) -> int:
            return round(float(ws @ values.astype(np.float64)))

        half = Z95 * math.sqrt(_variance(s, a_unit[sl], saved[sl]))
        kept = int(scope.kept[v].sum())
        base = (kept + frames[v]) * PAGE_SIZE
        fp = base - scaled(saved[sl])
        p = a_patched[sl].astype(np.int64)
        c = a_compressed[sl].astype(np.int64)
        p_cnt, c_cnt = scaled(p), scaled(c)
        out.append(
            dataclasses.replace(
                vm,
                whole=kept - p_cnt - c_cnt,
                patched=p_cnt,
                patch_bytes=scaled(p * a_patch_size[sl]),
                compressed=c_cnt,
                compressed_bytes=scaled(c * a_comp_size[sl]),
                footprint_bytes=fp,
                footprint_low=max(0, fp - whole_bytes(half)),
                footprint_high=fp + whole_bytes(half),
                per_host=vms_per_host(host_memory, fp) if host_memory is not None else None,
            )
        )
    # The total's interval: a group over several VMs is one unit of the sample.
    return out, Z95 * math.sqrt(_variance(s, a_unit, saved))


def _variance(s: Sampling, unit: I64, y: npt.NDArray[np.int64]) -> float:
    """The unbiased variance estimate of the stratified expansion estimate of ``sum(y)``, y given
    per computed page with its group in ``unit`` (pages of groups taken whole count nothing):
    ``sum_h N_h^2 (1 - n_h / N_h) s_h^2 / n_h``, s_h^2 over the n_h groups drawn in stratum h,
    those with no page here counting 0."""
    drawn = s.stratum[unit] >= 0
    groups, inverse = np.unique(unit[drawn], return_inverse=True)
    t = np.bincount(inverse, weights=y[drawn].astype(np.float64), minlength=len(groups))
    h = s.stratum[groups]
    n_h = s.n.astype(np.float64)
    mean = np.bincount(h, weights=t, minlength=len(n_h)) / np.maximum(n_h, 1.0)
    dev = t - mean[h]
    absent = n_h - np.bincount(h, minlength=len(n_h))
    squares = np.bincount(h, weights=dev * dev, minlength=len(n_h)) + absent * mean * mean
    ok = n_h > 1
    big_n = s.big_n.astype(np.float64)[ok]
    return float(np.sum(big_n**2 * (1.0 - n_h[ok] / big_n) * squares[ok] / (n_h[ok] - 1) / n_h[ok]))
