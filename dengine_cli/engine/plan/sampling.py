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

from dengine_cli.arrays import ArrayHome, pieces, unique
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


#: Bytes of temporaries per offered page (or group) while a step of the sample's grouping runs.
SAMPLE_BYTES_PER_PAGE = 48


#: Bytes of temporaries per edge while a step of edges is worked through in
#: :func:`components` past the memory limit: both ends, which count, their labels, the minima.
EDGE_BYTES = 56


def components(n: int, a: I64, b: I64, home: ArrayHome | None = None, counts: Bool | None = None) -> I64:
    """Connected-component labels (smallest member) of n nodes linked by the edges a[i]-b[i]
    (those whose ``b`` end ``counts``, when given): an array over the n nodes made where
    ``home`` keeps arrays.  In memory the work is over the linked nodes only (the others are
    their own label); when ``home`` keeps arrays in files, by :func:`_components_in_steps`, to
    the same labels."""
    home = home or ArrayHome()
    label = home.full(n, 0, np.int64)
    for lo, hi in pieces(n, home.step(8)):
        label[lo:hi] = np.arange(lo, hi, dtype=np.int64)
    if home.in_files:
        return _components_in_steps(label, a, b, counts, home)
    if counts is not None:
        counted = counts[b]
        a, b = a[counted], b[counted]
    if not len(a):
        return label
    nodes = unique(np.concatenate((a, b)))
    linked = _linked_components(len(nodes), np.searchsorted(nodes, a), np.searchsorted(nodes, b))
    label[nodes] = nodes[linked]  # nodes ascend: the smallest compact member is the smallest
    return label


def _components_in_steps(label: I64, a: I64, b: I64, counts: Bool | None, home: ArrayHome) -> I64:
    """:func:`components` into ``label`` (each node its own label), a step of edges or nodes at
    a time: each edge lowers both ends' labels to the smaller of the two, then labels follow
    labels to their root, until a pass over the edges lowers none.  Labels only fall, and stay
    a member of the node's component; when no edge has two labels, a component has one, and its
    smallest member, whose label cannot fall below itself, gives it."""
    edge_steps = pieces(len(a), home.step(EDGE_BYTES))
    node_steps = pieces(len(label), home.step(16))
    lowered = len(a) > 0
    while lowered:
        lowered = False
        for lo, hi in edge_steps:
            pa, pb = a[lo:hi], b[lo:hi]
            if counts is not None:
                pa, pb = pa[counts[pb]], pb[counts[pb]]
            la, lb = label[pa], label[pb]
            m = np.minimum(la, lb)
            if np.any(la != lb):
                lowered = True
                np.minimum.at(label, pa, m)
                np.minimum.at(label, pb, m)
        jumped = True
        while jumped:
            jumped = False
            for lo, hi in node_steps:
                now = label[lo:hi]
                root = label[now]
                if not np.array_equal(root, now):
                    label[lo:hi] = root
                    jumped = True
    return label


def _linked_components(n: int, a: I64, b: I64) -> I64:
    """:func:`components` of n nodes every one of which is on some edge, in memory."""
    label = np.arange(n, dtype=np.int64)
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


def sample_groups(
    scope: Scope, pages: I64, refs: I64, fraction: float, seed: int, home: ArrayHome | None = None
) -> Sampling:
    """The groups a plan sampled at ``fraction`` with ``seed`` computes (see the module); the
    arrays over pages and groups made where ``home`` keeps arrays, a step at a time within
    what it allows: the sample is the same for any."""
    home = home or ArrayHome()
    step = home.step(SAMPLE_BYTES_PER_PAGE)
    n_e = len(scope.e_vm)
    label = components(n_e, pages, refs, home, counts=scope.e_cand)  # pairs whose reference may be sampled
    unit, n_units = _units(scope.e_cand, label, home, step)
    sizes = home.full(n_units, 0, np.int64)
    for lo, hi in pieces(n_e, step):
        u = unit[lo:hi]
        np.add.at(sizes, u[u >= 0], 1)
    big = home.full(n_units, False, np.bool_)
    np.greater_equal(sizes, take_all_size(fraction), out=big)
    key = _stratum_keys(scope, pages, unit, sizes, home, step)
    stratum, big_n = _strata(key, big, home, step)
    rate = min(1.0, max(fraction, MIN_SAMPLED / max(1, int(big_n.sum()))))
    n = np.maximum(np.minimum(big_n, MIN_PER_STRATUM), np.round(rate * big_n).astype(np.int64))
    picked = _draw(stratum, n, big_n, np.random.default_rng(seed), home, step)
    weight = home.full(n_units, 0.0, np.float64)
    scale = big_n / np.maximum(n, 1)
    for lo, hi in pieces(n_units, step):
        w, p = weight[lo:hi], picked[lo:hi]
        w[big[lo:hi]] = 1.0
        w[p] = scale[stratum[lo:hi][p]]
    active = home.full(n_e, False, np.bool_)
    take_all = home.full(n_e, False, np.bool_)
    for lo, hi in pieces(n_e, step):
        u = unit[lo:hi]
        m = u >= 0
        um = u[m]
        active[lo:hi][m] = picked[um] | big[um]
        take_all[lo:hi][m] = big[um]
    info = SampleInfo(
        fraction=fraction,
        seed=seed,
        units=n_units,
        take_all=int(np.count_nonzero(big)),
        sampled=int(np.count_nonzero(picked)),
        candidates=int(np.count_nonzero(scope.e_cand)),
        pages_computed=int(np.count_nonzero(active)),
    )
    return Sampling(active, take_all, unit, stratum, weight, big_n, n, info)


def _units(e_cand: Bool, label: I64, home: ArrayHome, step: int | None) -> tuple[I64, int]:
    """Per offered page its group's number (-1: not a candidate), groups numbered in the order
    of their smallest member, and how many groups there are.  A group's members are candidates
    (pairs link candidates), its label its smallest member: so a candidate whose label is its
    own position starts a group, and a group's number is how many start before it."""
    n_e = len(e_cand)
    rank = home.full(n_e, 0, np.int64)
    starts = 0
    for lo, hi in pieces(n_e, step):
        root = e_cand[lo:hi] & (label[lo:hi] == np.arange(lo, hi))
        counted = np.cumsum(root, dtype=np.int64)
        rank[lo:hi] = starts + counted - 1
        starts += int(counted[-1]) if len(counted) else 0
    unit = home.full(n_e, -1, np.int64)
    for lo, hi in pieces(n_e, step):
        c = e_cand[lo:hi]
        unit[lo:hi][c] = rank[label[lo:hi][c]]
    return unit, starts


def _stratum_keys(scope: Scope, pages: I64, unit: I64, sizes: I64, home: ArrayHome, step: int | None) -> I64:
    """Per group, its stratum's key: (VM, or n_vms for a group over several VMs; size class;
    whether some page of it has a proposed reference)."""
    n_units = len(sizes)
    lo_vm = home.full(n_units, np.iinfo(np.int64).max, np.int64)
    hi_vm = home.full(n_units, -1, np.int64)
    linked = home.full(n_units, False, np.bool_)
    proposed = home.full(len(scope.e_vm), False, np.bool_)
    proposed[pages] = True
    for lo, hi in pieces(len(unit), step):
        u = unit[lo:hi]
        m = u >= 0
        um, vm = u[m], scope.e_vm[lo:hi][m]
        np.minimum.at(lo_vm, um, vm)
        np.maximum.at(hi_vm, um, vm)
        np.logical_or.at(linked, um, proposed[lo:hi][m])
    n_vms = int(scope.e_vm[-1]) + 1 if len(scope.e_vm) else 0
    key = home.full(n_units, 0, np.int64)
    for lo, hi in pieces(n_units, step):
        a, b = lo_vm[lo:hi], hi_vm[lo:hi]
        where = np.where(a == b, a, n_vms)
        size_class = np.minimum(np.log2(sizes[lo:hi]).astype(np.int64), _SIZE_CLASSES - 1)
        key[lo:hi] = (where * _SIZE_CLASSES + size_class) * 2 + linked[lo:hi]
    return key


def _strata(key: I64, big: Bool, home: ArrayHome, step: int | None) -> tuple[I64, I64]:
    """Per group its stratum (-1: taken whole; strata numbered in the order of their keys), and
    per stratum how many groups it holds."""
    keys = np.zeros(0, dtype=np.int64)
    for lo, hi in pieces(len(key), step):
        keys = unique(np.concatenate((keys, key[lo:hi][~big[lo:hi]])))
    stratum = home.full(len(key), -1, np.int64)
    big_n = np.zeros(len(keys), dtype=np.int64)
    for lo, hi in pieces(len(key), step):
        small = ~big[lo:hi]
        h = np.searchsorted(keys, key[lo:hi][small])
        stratum[lo:hi][small] = h
        big_n += np.bincount(h, minlength=len(keys))
    return stratum, big_n


def _draw(
    stratum: I64, n: I64, big_n: I64, rng: np.random.Generator, home: ArrayHome, step: int | None
) -> Bool:
    """A simple random sample of ``n[h]`` groups in each stratum h (``stratum`` -1: none): the
    ``n[h]`` groups of h with the smallest random keys (ties: the earlier group), the keys
    drawn by ``rng``, one per group in order."""
    picked = home.full(len(stratum), False, np.bool_)
    if not len(n):
        return picked
    if step is None:
        order = np.lexsort((rng.random(len(stratum)), stratum))
        s = stratum[order]
        starts = np.flatnonzero(np.r_[True, s[1:] != s[:-1]])
        first = np.repeat(starts, np.diff(np.r_[starts, len(s)]))
        rank = np.arange(len(s)) - first
        picked[order] = (s >= 0) & (rank < n[np.maximum(s, 0)])
        return picked
    # The same keys a step at a time, as the integers they are: numpy's random() is a multiple
    # of 2**-53, so the order of the integers is the order of the keys, and cutting their range
    # into bins is exact.
    keys = home.full(len(stratum), 0, np.int64)
    for lo, hi in pieces(len(stratum), step):
        keys[lo:hi] = (rng.random(hi - lo) * _KEY_SPAN).astype(np.int64)
    below, bits = _thresholds(stratum, keys, n, big_n, step)
    for lo, hi in pieces(len(stratum), step):
        h = stratum[lo:hi]
        ok = h >= 0
        picked[lo:hi][ok] = keys[lo:hi][ok] < below[h[ok]]
    _pick_at_thresholds(stratum, keys, n, (below, bits), picked, step)
    return picked


#: Random keys are integers below this (numpy's random() times it).
_KEY_BITS = 53
_KEY_SPAN = 1 << _KEY_BITS


def _thresholds(stratum: I64, keys: I64, n: I64, big_n: I64, step: int) -> tuple[I64, int]:
    """Per stratum h a key t_h with fewer than ``n[h]`` of its groups' keys below it and the
    rest of its sample in ``[t_h, t_h + 2**bits)``, a range holding few keys (``_KEY_SPAN`` + 1
    when the stratum is taken whole), and ``bits``: histograms of the keys in a shrinking range
    per stratum, one pass over the groups each."""
    strata = len(n)
    every = np.arange(strata)
    low = np.zeros(strata, dtype=np.int64)
    need = n.copy()
    bits = _KEY_BITS
    per_pass = int(min(12, max(1, (step // max(1, strata)).bit_length() - 1)))
    while bits > 0:
        b = min(per_pass, bits)
        shift = bits - b
        counts = np.zeros((strata, 1 << b), dtype=np.int64)
        for lo, hi in pieces(len(stratum), step):
            h = stratum[lo:hi]
            ok = h >= 0
            h = h[ok]
            q = keys[lo:hi][ok] - low[h]
            inside = (q >= 0) & (q < (1 << bits))
            np.add.at(counts, (h[inside], q[inside] >> shift), 1)
        before = np.cumsum(counts, axis=1) - counts
        k = np.minimum((before + counts < need[:, None]).sum(axis=1), (1 << b) - 1)
        need = need - before[every, k]
        low = low + (k << shift)
        bits = shift
        if (counts[every, k][n < big_n] <= max(1, step // 4)).all():
            break
    low[n >= big_n] = _KEY_SPAN + 1
    return low, bits


def _pick_at_thresholds(
    stratum: I64, keys: I64, n: I64, threshold: tuple[I64, int], picked: Bool, step: int
) -> None:
    """Complete each stratum's sample from its groups with keys in its threshold's range, the
    smallest first (ties: the earlier group)."""
    below, bits = threshold
    strata = len(n)
    have = np.zeros(strata, dtype=np.int64)
    near_pos, near_h, near_q = [], [], []
    for lo, hi in pieces(len(stratum), step):
        h = stratum[lo:hi]
        ok = h >= 0
        have += np.bincount(h[ok][picked[lo:hi][ok]], minlength=strata)
        q = keys[lo:hi]
        t = below[np.maximum(h, 0)]
        close = ok & (q >= t) & (q - t < (1 << bits))
        near_pos.append(np.flatnonzero(close) + lo)
        near_h.append(h[close])
        near_q.append(q[close])
    pos, h, q = (np.concatenate(x) for x in (near_pos, near_h, near_q))
    order = np.lexsort((pos, q, h))
    pos, h = pos[order], h[order]
    starts = np.flatnonzero(np.r_[True, h[1:] != h[:-1]]) if len(h) else np.zeros(0, dtype=np.int64)
    first = np.repeat(starts, np.diff(np.r_[starts, len(h)]))
    rank = np.arange(len(h)) - first
    picked[pos[rank < (n - have)[h]]] = True


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
