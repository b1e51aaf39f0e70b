"""The Difference Engine plan: what a host would do with every page of a set of VMs, and what the
VMs then cost in memory and time.

For each present page (VMs in the order given, then ascending gfn: the *scan order*) the plan
chooses one action (:data:`ACTIONS`):

* ``zero``: an all-zero page; costs nothing (mapped to the hypervisor's zero page).
* ``share``: a copy of a content kept elsewhere (within the VM, or in an earlier VM when the
  policy shares across VMs), exact as in :mod:`dengine_cli.sharing`.
* ``whole``: a page kept as it is (4096 bytes).
* ``patch``: stored as a patch against a *reference* page, a page kept whole (never a patched or
  compressed one); the patch's exact size is measured with the policy's patch codec.
* ``compress``: stored compressed with the policy's codec; exact size measured.
* ``swap``: paged out to make the VMs fit host memory (:mod:`dengine_cli.paging`).

How pages are chosen (decisions recorded here, tested in tests/test_plan.py):

* Candidates for patching and compression are the *kept* pages (the stored copy of each content)
  that are cold and whose content has exactly one copy in scope (all VMs when sharing across VMs,
  else the VM): a shared content stays whole, it may serve as a reference.  Hot pages
  (:mod:`dengine_cli.temperature`) are kept whole and may be references.
* Similarity (:mod:`dengine_cli.similarity`) proposes, for each candidate, earlier kept pages as
  references (within the VM when the policy does not share across VMs).  Every (page,
  reference) pair's patch is really produced and measured (batched).  Then, in scan order, a
  candidate takes the smallest patch (ties: the earliest reference) whose reference is still
  whole and whose size is below the patch threshold.  A page used as a reference by any chosen
  patch stays whole: it is never compressed.
* Every other candidate is compressed, really, and kept compressed only when the result is below
  the compression threshold.
* Footprint of a VM = whole pages * 4096 + patch bytes + compressed bytes - paged-out bytes (+ one
  frame for the merged zero page under ``ksm``, charged to the first VM that has one).  Per-page
  metadata (the hypervisor's records of where patches and compressed pages live) is not counted,
  as in the paper.  Savings = 1 - footprint / present bytes.

Sampling (``sample=f``): sharing stays exact; patching and compression are computed for a seeded
sample only and the saved bytes extrapolated.  The units sampled are the connected groups of
candidates linked by proposed (page, reference) pairs: within a group the decisions are exactly
those of the full plan, and groups do not influence each other (a reference outside the
candidates is whole whatever happens).  Groups of more than :data:`TAKE_ALL_UNIT` pages and more
than 1/:data:`TAKE_ALL_SHARE` of the candidates are always computed (a stratum taken whole); of
the others a simple random sample of ``round(f * N)`` groups is taken.  Saved bytes are
estimated from the sampled groups (a ratio estimator, see :func:`_extrapolate`), with a 95%
interval from the normal approximation with finite-population correction.  With ``f = 1`` every
group is computed and the plan is the exact one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import numpy as np
import numpy.typing as npt

from dengine_cli import codec_pool
from dengine_cli.arrays import unique
from dengine_cli.codec_pool import CodecWorker
from dengine_cli.costs import OperationCounts, PlanCost
from dengine_cli.errors import OutputError, UsageError
from dengine_cli.formats.base import BATCH_PAGES, PAGE_SIZE, Dump, OpenOptions
from dengine_cli.index import PageIndex, Progress, build_indexes
from dengine_cli.paging import SwapClass, choose_swap, vms_per_host
from dengine_cli.policies import Policy
from dengine_cli.sharing import SharingReport
from dengine_cli.sharing_cache import cached_share
from dengine_cli.similarity import candidate_pairs
from dengine_cli.threads import map_in_threads

SCHEMA = "dengine.plan/1"

#: Action codes of the plan file, by value.
ACTIONS = ("zero", "share", "whole", "patch", "compress", "swap")
ZERO, SHARE, WHOLE, PATCH, COMPRESS, SWAP = range(len(ACTIONS))

#: Threads for the plan's numpy work that lets go of the GIL: similarity keys (a dump each at a
#: time) and the per-VM sorts of the scope.
PLAN_THREADS = min(2, os.cpu_count() or 1)

#: Sampling: groups of more pages than this, and than 1/:data:`TAKE_ALL_SHARE` of the candidates,
#: are always computed whole (one of them could dominate the variance of an estimate).
TAKE_ALL_UNIT = 64
TAKE_ALL_SHARE = 200
#: z for a two-sided 95% normal interval.
Z95 = 1.959963984540054

_I64 = npt.NDArray[np.int64]
_Bool = npt.NDArray[np.bool_]


# --- results ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class VmPlan:
    """The plan's figures for one VM (or all: ``name == "total"``), pages and bytes.

    ``present == zero + shared + whole + patched + compressed + paged_out``.  In an estimate
    (sampled plan) ``whole``, ``patched``, ``compressed`` and their bytes are extrapolated and
    ``footprint_low``/``footprint_high`` bound the footprint (95%).
    """

    name: str
    present: int
    zero: int
    shared_within: int
    shared_across: int
    whole: int
    hot: int
    references: int
    patched: int
    patch_bytes: int
    compressed: int
    compressed_bytes: int
    paged_out: int
    paged_out_bytes: int
    footprint_bytes: int
    footprint_low: int | None = None
    footprint_high: int | None = None
    #: How many VMs like this one fit in the host memory (``None``: no host memory given).
    per_host: int | None = None

    @property
    def shared(self) -> int:
        return self.shared_within + self.shared_across

    @property
    def present_bytes(self) -> int:
        return self.present * PAGE_SIZE

    def savings_of(self, footprint: int) -> float:
        return 1.0 - footprint / self.present_bytes if self.present else 0.0

    @property
    def savings(self) -> float:
        """The fraction of present memory the plan saves."""
        return self.savings_of(self.footprint_bytes)

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "name": self.name,
            "pages_present": self.present,
            "present_bytes": self.present_bytes,
            "zero_pages": self.zero,
            "shared_pages": self.shared,
            "shared_within_vm": self.shared_within,
            "shared_across_vms": self.shared_across,
            "whole_pages": self.whole,
            "hot_pages": self.hot,
            "reference_pages": self.references,
            "patched_pages": self.patched,
            "patch_bytes": self.patch_bytes,
            "compressed_pages": self.compressed,
            "compressed_bytes": self.compressed_bytes,
            "paged_out_pages": self.paged_out,
            "paged_out_bytes": self.paged_out_bytes,
            "footprint_bytes": self.footprint_bytes,
            "savings_percent": round(100.0 * self.savings, 4),
        }
        if self.footprint_low is not None and self.footprint_high is not None:
            d["footprint_interval_bytes"] = [self.footprint_low, self.footprint_high]
            d["savings_interval_percent"] = [
                round(100.0 * self.savings_of(self.footprint_high), 4),
                round(100.0 * self.savings_of(self.footprint_low), 4),
            ]
        if self.per_host is not None:
            d["vms_per_host"] = self.per_host
        return d


@dataclass(frozen=True)
class SampleInfo:
    """How a sampled plan was estimated: ``units`` groups of candidates, ``take_all`` of them
    computed whole (large groups), ``sampled`` drawn from the others; ``pages_computed`` pages
    had their patches/compression really computed, of ``candidates``."""

    fraction: float
    seed: int
    units: int
    take_all: int
    sampled: int
    candidates: int
    pages_computed: int
    confidence: float = 0.95

    def to_dict(self) -> dict[str, Any]:
        return {"estimate": True, **dataclasses.asdict(self)}


@dataclass(frozen=True)
class HostFit:
    """Host memory and what fits in it: ``fits`` after paging; ``sets_per_host`` copies of the
    whole set of VMs fit (by footprint, before paging)."""

    host_memory: int
    footprint_before_paging: int
    fits: bool
    sets_per_host: int | None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True, eq=False)
class PagePlan:
    """Per page of one VM: its action code, its stored size in bytes (patch or compressed size,
    4096 whole, 0 otherwise) and, for patched pages, the reference (VM index, position)."""

    gfns: npt.NDArray[np.uint64]
    actions: npt.NDArray[np.uint8]
    sizes: npt.NDArray[np.int32]
    patch_positions: _I64
    patch_ref_vm: _I64
    patch_ref_pos: _I64


@dataclass(frozen=True, eq=False)
class PlanReport:
    """A whole plan: the policy, per-VM figures, their total, the baseline policy's figures,
    the run-time cost, sampling and host information, and the per-page plan (for the plan
    file).  ``upper_bound``: no history was given, every page counted cold."""

    policy: Policy
    vms: tuple[VmPlan, ...]
    total: VmPlan
    cost: PlanCost
    upper_bound: bool
    sample: SampleInfo | None
    host: HostFit | None
    baseline: PlanReport | None
    pages: tuple[PagePlan, ...]
    content_ids: tuple[npt.NDArray[np.unsignedinteger[Any]], ...]
    #: ``None`` in an exact plan.
    estimate: bool = False

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "schema": SCHEMA,
            "page_size": PAGE_SIZE,
            "policy": self.policy.to_dict(),
            "upper_bound": self.upper_bound,
            "estimate": self.estimate,
            "sample": self.sample.to_dict() if self.sample else None,
            "host": self.host.to_dict() if self.host else None,
            "vms": [vm.to_dict() for vm in self.vms],
            "total": self.total.to_dict(),
            "cost": self.cost.to_dict(),
        }
        if self.baseline is not None:
            base = self.baseline.to_dict()
            d["baseline"] = {k: base[k] for k in ("policy", "vms", "total", "cost", "host", "estimate")}
        return d


# --- the engine --------------------------------------------------------------------------------


@dataclass
class _Scope:
    """Per VM: which pages are kept, candidates, shared frames; and the offered pages E in scan
    order (VM, position)."""

    kept: list[_Bool]
    shared_kept: list[_Bool]
    candidate: list[_Bool]
    within: list[int]
    across: list[int]
    e_vm: _I64
    e_pos: _I64
    e_cand: _Bool


def _scope(sharing: SharingReport, policy: Policy, hot: Sequence[_Bool | None], want: bool) -> _Scope:
    ids_all = sharing.content_ids
    n_contents = sharing.contents + 1
    seen = np.zeros(n_contents, dtype=np.bool_)
    copies_all: npt.NDArray[np.int64] | None = None
    if policy.cross_vm:
        copies_all = np.zeros(n_contents, dtype=np.int64)
        for ids in ids_all:
            copies_all += np.bincount(ids.astype(np.int64), minlength=n_contents)
    kept_l, sk_l, cand_l, within_l, across_l = [], [], [], [], []
    e_vm_parts, e_pos_parts, e_cand_parts = [], [], []
    # The per-VM sorts first, in threads (numpy sorts without the GIL); then VM after VM.
    per_vm = map_in_threads(
        lambda ids: np.unique(ids, return_index=True, return_counts=True), ids_all, PLAN_THREADS
    )
    for v, ids in enumerate(ids_all):
        n = len(ids)
        uniq, first, counts = per_vm[v]
        first_in_vm = np.zeros(n, dtype=np.bool_)
        first_in_vm[first] = True
        nonzero = ids != 0
        first_in_vm &= nonzero
        if policy.cross_vm:
            kept = first_in_vm & ~seen[ids]
            seen[ids] = True
            assert copies_all is not None
            copies = copies_all[ids]
        else:
            kept = first_in_vm
            copies = counts[np.searchsorted(uniq, ids)]
        within_l.append(int(np.count_nonzero(nonzero & ~first_in_vm)))
        across_l.append(int(np.count_nonzero(first_in_vm & ~kept)))
        shared_kept = kept & (copies > 1)
        cand = kept & (copies == 1) if want else np.zeros(n, dtype=np.bool_)
        h = hot[v]
        if h is not None:
            cand &= ~h
        kept_l.append(kept)
        sk_l.append(shared_kept)
        cand_l.append(cand)
        pos = np.flatnonzero(kept)
        e_vm_parts.append(np.full(len(pos), v, dtype=np.int64))
        e_pos_parts.append(pos.astype(np.int64))
        e_cand_parts.append(cand[pos])
    return _Scope(
        kept_l,
        sk_l,
        cand_l,
        within_l,
        across_l,
        np.concatenate(e_vm_parts) if e_vm_parts else np.zeros(0, dtype=np.int64),
        np.concatenate(e_pos_parts) if e_pos_parts else np.zeros(0, dtype=np.int64),
        np.concatenate(e_cand_parts) if e_cand_parts else np.zeros(0, dtype=np.bool_),
    )


def _keys(dumps: Sequence[Dump], policy: Policy, scope: _Scope, batch_pages: int) -> npt.NDArray[np.uint64]:
    """Similarity keys ``(|E|, k)`` of the offered pages, one pass over each dump's batches."""
    det = policy.detector
    keys = np.empty((len(scope.e_vm), det.indexes), dtype=np.uint64)
    bounds = np.searchsorted(scope.e_vm, np.arange(len(dumps) + 1))

    def dump_keys(v: int) -> None:
        lo_e, hi_e = int(bounds[v]), int(bounds[v + 1])
        if lo_e == hi_e:
            return
        pos = scope.e_pos[lo_e:hi_e]
        start = 0
        for batch in dumps[v].batches(batch_pages):
            end = start + len(batch)
            a, b = np.searchsorted(pos, [start, end])
            if b > a:
                keys[lo_e + a : lo_e + b] = det.keys(batch.pages, pos[a:b] - start)
            start = end

    # Dumps in threads: gathering the blocks (page faults) and hashing them run in numpy without
    # the GIL.  Each thread writes its own rows.
    map_in_threads(dump_keys, range(len(dumps)), PLAN_THREADS)
    return keys


def _components(n: int, a: _I64, b: _I64) -> _I64:
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
class _Sampling:
    active: _Bool
    unit: _I64
    take_all: _Bool
    n_units: int
    n_sampled: int
    n_take_all: int
    info: SampleInfo


def _sample(scope: _Scope, pages: _I64, refs: _I64, fraction: float, seed: int) -> _Sampling:
    n = len(scope.e_vm)
    cc = scope.e_cand[refs]
    label = _components(n, pages[cc], refs[cc])
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
    return _Sampling(active, unit, take_all, len(small), n_pick, int(big.sum()), info)


def _patch(
    dumps: Sequence[Dump],
    indexes: Sequence[PageIndex],
    policy: Policy,
    scope: _Scope,
    pages: _I64,
    refs: _I64,
    worker: CodecWorker | None,
    on_progress: Progress | None,
) -> tuple[_I64, npt.NDArray[np.int32], _Bool]:
    """Measure every pair's patch (sharing the work with ``worker`` if given), then choose in
    scan order.  Returns, over E: the chosen reference (-1: not patched), the patch size, and
    whether the page is a reference."""
    n = len(scope.e_vm)
    sizes = codec_pool.patch_sizes(
        dumps,
        indexes,
        policy.patch_codec,
        policy.patch_threshold,
        scope.e_vm[pages],
        scope.e_pos[pages],
        scope.e_vm[refs],
        scope.e_pos[refs],
        worker,
        _progress(on_progress, "patching", len(pages)),
    )
    good = sizes < policy.patch_threshold
    ref_of = np.full(n, -1, dtype=np.int64)
    patch_size = np.zeros(n, dtype=np.int32)
    is_ref = np.zeros(n, dtype=np.bool_)
    gp, gr, gs = pages[good].tolist(), refs[good].tolist(), sizes[good].tolist()
    # The only per-pair Python: pairs whose patch pays, in scan order.  A reference's fate is
    # settled before any page that could use it (references come earlier in scan order).
    patched = bytearray(n)
    m = len(gp)
    i = 0
    while i < m:
        p0 = gp[i]
        best, best_size = -1, policy.patch_threshold
        while i < m and gp[i] == p0:
            r = gr[i]
            if not patched[r] and gs[i] < best_size:
                best, best_size = r, gs[i]
            i += 1
        if best >= 0:
            patched[p0] = 1
            ref_of[p0] = best
            patch_size[p0] = best_size
            is_ref[best] = True
    return ref_of, patch_size, is_ref


def _compress(
    dumps: Sequence[Dump],
    indexes: Sequence[PageIndex],
    policy: Policy,
    scope: _Scope,
    todo: _Bool,
    worker: CodecWorker | None,
    on_progress: Progress | None,
) -> npt.NDArray[np.int32]:
    """Compressed sizes of the E pages marked ``todo`` (0 elsewhere), sharing the work with
    ``worker`` if given."""
    sizes = np.zeros(len(scope.e_vm), dtype=np.int32)
    where = np.flatnonzero(todo)
    sizes[where] = codec_pool.compressed_sizes(
        dumps,
        indexes,
        policy.compression_codec,
        scope.e_vm[where],
        scope.e_pos[where],
        worker,
        _progress(on_progress, "compressing", len(where)),
    )
    return sizes


def _progress(on_progress: Progress | None, what: str, total: int) -> Callable[[int], None] | None:
    if on_progress is None:
        return None
    report = on_progress
    return lambda done: report(what, done, total)


def plan_dumps(
    dumps: Sequence[Dump],
    indexes: Sequence[PageIndex],
    sharing: SharingReport,
    policy: Policy,
    *,
    hot: Sequence[_Bool | None] | None = None,
    host_memory: int | None = None,
    sample: float | None = None,
    seed: int = 0,
    baseline: Policy | None = None,
    batch_pages: int = BATCH_PAGES,
    on_progress: Progress | None = None,
    codec_worker: CodecWorker | None = None,
) -> PlanReport:
    """The plan of VMs given open dumps, their indexes and their exact sharing (any
    ``cross_vm``: the plan uses only the content ids).  ``hot[v]``: per page of VM v, whether it
    changed since an earlier snapshot (``None``: no history for that VM, or for any when ``hot``
    is ``None``: every page cold, and the plan is an upper bound).  ``codec_worker``: a worker
    process over the same dumps that measures part of the patches and compressed pages when
    there are enough of them (:mod:`dengine_cli.codec_pool`)."""
    if len(dumps) != len(indexes) or len(sharing.content_ids) != len(dumps):
        raise ValueError("one dump, index and content id array per VM is needed")
    if sample is not None and not 0.0 < sample <= 1.0:
        raise UsageError(f"the sample fraction must be within (0, 1], not {sample}")
    if host_memory is not None and host_memory <= 0:
        raise UsageError(f"host memory must be positive, not {host_memory}")
    n_vms = len(dumps)
    hot_of: list[_Bool | None] = list(hot) if hot is not None else [None] * n_vms
    if len(hot_of) != n_vms:
        raise ValueError("one hot mask (or None) per VM is needed")
    want = policy.patch or policy.compress
    scope = _scope(sharing, policy, hot_of, want)
    n_e = len(scope.e_vm)

    pages = refs = np.zeros(0, dtype=np.int64)
    if policy.patch and scope.e_cand.any():
        keys = _keys(dumps, policy, scope, batch_pages)
        pages, refs = candidate_pairs(
            keys,
            np.ones(n_e, dtype=np.bool_),
            scope.e_cand,
            policy.detector.candidates,
            None if policy.cross_vm else scope.e_vm,
        )
        del keys
    sampling = _sample(scope, pages, refs, sample, seed) if sample is not None and want else None
    active = sampling.active if sampling is not None else scope.e_cand
    if sampling is not None:
        keep = active[pages]
        pages, refs = pages[keep], refs[keep]
    # Every active candidate is measured at least once (patched, compressed or both).
    worker = codec_worker if codec_worker is not None and codec_worker.takes(int(active.sum())) else None

    ref_of = np.full(n_e, -1, dtype=np.int64)
    patch_size = np.zeros(n_e, dtype=np.int32)
    is_ref = np.zeros(n_e, dtype=np.bool_)
    if len(pages):
        ref_of, patch_size, is_ref = _patch(dumps, indexes, policy, scope, pages, refs, worker, on_progress)
    patched = ref_of >= 0
    comp_size = np.zeros(n_e, dtype=np.int32)
    compressed = np.zeros(n_e, dtype=np.bool_)
    if policy.compress:
        todo = active & ~patched & ~is_ref
        comp_size = _compress(dumps, indexes, policy, scope, todo, worker, on_progress)
        compressed = todo & (comp_size < policy.compression_threshold)

    # Per-page plan.
    bounds = np.searchsorted(scope.e_vm, np.arange(n_vms + 1))
    page_plans: list[PagePlan] = []
    for v in range(n_vms):
        ids = sharing.content_ids[v]
        actions = np.full(len(ids), SHARE, dtype=np.uint8)
        actions[ids == 0] = ZERO
        actions[scope.kept[v]] = WHOLE
        sizes = np.zeros(len(ids), dtype=np.int32)
        sizes[scope.kept[v]] = PAGE_SIZE
        lo, hi = int(bounds[v]), int(bounds[v + 1])
        pos = scope.e_pos[lo:hi]
        p = patched[lo:hi]
        c = compressed[lo:hi]
        actions[pos[p]] = PATCH
        sizes[pos[p]] = patch_size[lo:hi][p]
        actions[pos[c]] = COMPRESS
        sizes[pos[c]] = comp_size[lo:hi][c]
        refs_e = ref_of[lo:hi][p]
        page_plans.append(
            PagePlan(
                gfns=indexes[v].gfns,
                actions=actions,
                sizes=sizes,
                patch_positions=pos[p],
                patch_ref_vm=scope.e_vm[refs_e],
                patch_ref_pos=scope.e_pos[refs_e],
            )
        )

    # Paging (exact plans only: it needs every page's size).
    zero_frame_vm = -1
    if policy.zero_frame:
        for v in range(n_vms):
            if indexes[v].zero_pages:
                zero_frame_vm = v
                break
    footprints = [
        int(pp.sizes.sum(dtype=np.int64)) + (PAGE_SIZE if v == zero_frame_vm else 0)
        for v, pp in enumerate(page_plans)
    ]
    host: HostFit | None = None
    swapped_bytes = [0] * n_vms
    if host_memory is not None:
        before = sum(footprints)
        fits = before <= host_memory
        if not fits and sampling is None:
            choice = choose_swap(
                before - host_memory, _swap_classes(scope, page_plans, is_ref, hot_of, bounds), n_vms
            )
            for v, pp in enumerate(page_plans):
                pp.actions[choice.positions[v]] = SWAP
                pp.sizes[choice.positions[v]] = 0
            swapped_bytes = list(choice.freed_bytes)
            fits = choice.fits
        host = HostFit(host_memory, before, fits, vms_per_host(host_memory, before))

    vms = []
    for v in range(n_vms):
        pp = page_plans[v]
        counts = np.bincount(pp.actions, minlength=len(ACTIONS))
        at = pp.actions
        lo, hi = int(bounds[v]), int(bounds[v + 1])
        fp = footprints[v] - swapped_bytes[v]
        vm = VmPlan(
            name=dumps[v].name,
            present=len(at),
            zero=int(counts[ZERO]),
            shared_within=scope.within[v],
            shared_across=scope.across[v],
            whole=int(counts[WHOLE]),
            hot=_count(hot_of[v]),
            references=int(is_ref[lo:hi].sum()),
            patched=int(counts[PATCH]),
            patch_bytes=int(pp.sizes[at == PATCH].sum(dtype=np.int64)),
            compressed=int(counts[COMPRESS]),
            compressed_bytes=int(pp.sizes[at == COMPRESS].sum(dtype=np.int64)),
            paged_out=int(counts[SWAP]),
            paged_out_bytes=swapped_bytes[v],
            footprint_bytes=fp,
            per_host=vms_per_host(host_memory, fp) if host_memory is not None else None,
        )
        vms.append(vm)
    total_half: float | None = None
    if sampling is not None:
        vms, total_half = _extrapolate(
            vms,
            scope,
            sampling,
            patched,
            patch_size,
            compressed,
            comp_size,
            bounds,
            zero_frame_vm,
            host_memory,
        )
    total = _total(vms, host_memory, total_half)
    operations = OperationCounts(
        shared=sum(vm.zero + vm.shared for vm in vms),
        cow_mapped=sum(vm.zero + vm.shared + int(scope.shared_kept[v].sum()) for v, vm in enumerate(vms)),
        patched=total.patched,
        compressed=total.compressed,
        paged_out=total.paged_out,
    )
    base_report = None
    if baseline is not None:
        base_report = plan_dumps(
            dumps,
            indexes,
            sharing,
            baseline,
            hot=hot_of,
            host_memory=host_memory,
            sample=sample,
            seed=seed,
            batch_pages=batch_pages,
            on_progress=on_progress,
            codec_worker=codec_worker,
        )
    return PlanReport(
        policy=policy,
        vms=tuple(vms),
        total=total,
        cost=PlanCost(policy.costs, operations),
        upper_bound=any(h is None for h in hot_of),
        sample=sampling.info if sampling is not None else None,
        host=host,
        baseline=base_report,
        pages=tuple(page_plans),
        content_ids=sharing.content_ids,
        estimate=sampling is not None,
    )


def _swap_classes(
    scope: _Scope, page_plans: Sequence[PagePlan], is_ref: _Bool, hot: Sequence[_Bool | None], bounds: _I64
) -> list[SwapClass]:
    whole_pos, whole_freed, comp_pos, comp_freed, patch_pos, patch_freed = [], [], [], [], [], []
    for v, pp in enumerate(page_plans):
        ref = np.zeros(len(pp.actions), dtype=np.bool_)
        lo, hi = int(bounds[v]), int(bounds[v + 1])
        ref[scope.e_pos[lo:hi][is_ref[lo:hi]]] = True
        movable = ~ref & ~scope.shared_kept[v]
        h = hot[v]
        if h is not None:
            movable &= ~h
        w = np.flatnonzero((pp.actions == WHOLE) & movable)
        c = np.flatnonzero(pp.actions == COMPRESS)
        p = np.flatnonzero(pp.actions == PATCH)
        whole_pos.append(w)
        whole_freed.append(np.full(len(w), PAGE_SIZE, dtype=np.int64))
        comp_pos.append(c)
        comp_freed.append(pp.sizes[c].astype(np.int64))
        patch_pos.append(p)
        patch_freed.append(pp.sizes[p].astype(np.int64))
    return [
        SwapClass(whole_pos, whole_freed),
        SwapClass(comp_pos, comp_freed),
        SwapClass(patch_pos, patch_freed),
    ]


def _extrapolate(
    vms: list[VmPlan],
    scope: _Scope,
    s: _Sampling,
    patched: _Bool,
    patch_size: npt.NDArray[np.int32],
    compressed: _Bool,
    comp_size: npt.NDArray[np.int32],
    bounds: _I64,
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
            fixed: _Bool = fixed,
            smp: _Bool = smp,
            unit: _I64 = unit,
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
                footprint_low=max(0, fp - _whole_bytes(half)),
                footprint_high=fp + _whole_bytes(half),
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

    def total(self, unit: _I64, y: npt.NDArray[np.int64], x_total: int) -> tuple[float, float]:
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


def _whole_bytes(half: float) -> int:
    """A half-width in whole bytes (float noise of an exact, f = 1, estimate is no width)."""
    return math.ceil(half) if half > 1e-6 else 0


def _count(mask: _Bool | None) -> int:
    return int(np.count_nonzero(mask)) if mask is not None else 0


def _total(vms: Sequence[VmPlan], host_memory: int | None, half: float | None) -> VmPlan:
    sums = {
        f.name: sum(getattr(vm, f.name) for vm in vms)
        for f in dataclasses.fields(VmPlan)
        if f.name not in ("name", "footprint_low", "footprint_high", "per_host")
    }
    fp = sums["footprint_bytes"]
    low = high = None
    if half is not None:
        low, high = max(0, fp - _whole_bytes(half)), fp + _whole_bytes(half)
    return VmPlan(
        name="total",
        **sums,
        footprint_low=low,
        footprint_high=high,
        per_host=vms_per_host(host_memory, fp) if host_memory is not None else None,
    )


# --- from paths ----------------------------------------------------------------------------------


def share_and_plan(
    paths: Sequence[Path | str],
    policy: Policy,
    *,
    options: OpenOptions | None = None,
    index_dir: Path | str | None = None,
    jobs: int | None = None,
    history: Mapping[str, Path | str] | None = None,
    host_memory: int | None = None,
    sample: float | None = None,
    seed: int = 0,
    baseline: Policy | None = None,
    batch_pages: int = BATCH_PAGES,
    on_progress: Progress | None = None,
    codec_worker: bool | None = None,
) -> tuple[SharingReport, PlanReport]:
    """Index the dumps at ``paths`` (cached), share them exactly and plan them with ``policy``.

    Returns the exact sharing (across VMs as ``policy.cross_vm`` says) beside the plan.
    ``history`` maps a dump's path (as given in ``paths``) to an earlier snapshot of the same VM:
    that VM's changed pages are hot.  VMs without history count as all cold, and the plan is
    then an upper bound.  ``baseline``: a second policy planned on the same VMs for comparison.
    ``codec_worker``: measure patches and compressed pages in two processes (``None``: when
    ``jobs`` allows it and there is enough to measure, see :mod:`dengine_cli.codec_pool`;
    ``True``: always, for any amount, waiting for the worker to start; ``False``: never).
    """
    from dengine_cli.formats import open_dump
    from dengine_cli.temperature import hot_pages

    options = options or OpenOptions()
    history = dict(history or {})
    unknown = [k for k in history if k not in {str(p) for p in paths}]
    if unknown:
        raise UsageError(f"history given for {unknown[0]}, which is not one of the dumps planned")
    earlier_paths = [history[str(p)] for p in paths if str(p) in history]
    opened: dict[int, Dump] = {}
    dumps: list[Dump] = []
    worker: CodecWorker | None = None
    try:
        indexes = build_indexes(
            [*paths, *earlier_paths],
            options,
            index_dir,
            jobs,
            on_progress,
            batch_pages=batch_pages,
            keep_open=opened,
        )
        current, earlier = indexes[: len(paths)], indexes[len(paths) :]
        # Earlier snapshots are opened again below, one at a time.
        for i in [i for i in opened if i >= len(paths)]:
            opened.pop(i).close()
        for i, path in enumerate(paths):
            dumps.append(opened.pop(i) if i in opened else open_dump(path, options))
        worker = _start_worker(paths, options, dumps, current, (policy, baseline), jobs, codec_worker, sample)
        hot: list[_Bool | None] = []
        k = 0
        for v, path in enumerate(paths):
            if str(path) not in history:
                hot.append(None)
                continue
            with open_dump(history[str(path)], options) as before:
                hot.append(hot_pages(dumps[v], current[v], before, earlier[k], batch_pages=batch_pages))
            k += 1
        sharing = cached_share(
            current,
            dumps,
            index_dir,
            cross_vm=policy.cross_vm,
            batch_pages=batch_pages,
            on_progress=on_progress,
        )
        return sharing, plan_dumps(
            dumps,
            current,
            sharing,
            policy,
            hot=hot,
            host_memory=host_memory,
            sample=sample,
            seed=seed,
            baseline=baseline,
            batch_pages=batch_pages,
            on_progress=on_progress,
            codec_worker=worker,
        )
    finally:
        if worker is not None:
            worker.close()
        for dump in [*dumps, *opened.values()]:
            dump.close()


def _start_worker(
    paths: Sequence[Path | str],
    options: OpenOptions,
    dumps: Sequence[Dump],
    indexes: Sequence[PageIndex],
    policies: Sequence[Policy | None],
    jobs: int | None,
    wanted: bool | None,
    sample: float | None = None,
) -> CodecWorker | None:
    """A codec worker when one may be needed (:func:`plan_dumps` decides whether it is used): a
    fork of this process made when first used, or, where forking is not safe, a spawned one
    started now (before sharing: it takes about half a second to be ready)."""
    from dengine_cli.workers import fork_usable

    counts = [d.page_count for d in dumps]
    if wanted:
        return CodecWorker(paths, options, counts, min_pages=0, wait=True, dumps=dumps)
    if wanted is False or not any(p is not None and (p.patch or p.compress) for p in policies):
        return None
    if not codec_pool.worker_pays(dumps, jobs):
        return None
    if codec_pool.CODEC_THREADS > 1 and all(_codecs_release_gil(p) for p in policies if p is not None):
        # Threads of this process measure instead: faster than a worker process here (exact
        # plan of 1.5 GiB: 0.59-0.69 s against 0.75-0.78 s), with no fork, no pages read
        # twice, no results pickled.
        return None
    if fork_usable():
        # Forked only if plan_dumps gives it work (see CodecWorker): costs nothing meanwhile.
        return CodecWorker(paths, options, counts, dumps=dumps)
    # A spawned worker starts now.  The non-zero pages bound the pages that will be measured
    # (distinct contents only); a sampled plan measures about that fraction of them.  A worker
    # that is not needed costs twice: its start-up (0.5 s of CPU) slows the sharing that runs
    # meanwhile on both CPUs.
    nonzero = sum(ix.page_count - ix.zero_pages for ix in indexes)
    if sample is not None:
        nonzero = int(nonzero * sample)
    if nonzero < codec_pool.MIN_PAGES:
        return None
    return CodecWorker(paths, options, counts)


def _codecs_release_gil(policy: Policy) -> bool:
    """Whether the codecs ``policy`` measures with let go of the GIL (threads can share them)."""
    from dengine_cli.codecs import compression_codec, patch_codec

    return (not policy.patch or patch_codec(policy.patch_codec).releases_gil) and (
        not policy.compress or compression_codec(policy.compression_codec).releases_gil
    )


# --- the plan file -------------------------------------------------------------------------------

#: Pages written per JSON chunk.
_WRITE_CHUNK = 1 << 16


def write_plan(plan: PlanReport, path: Path | str) -> None:
    """Write the plan file: a JSON document, schema :data:`SCHEMA`.

    It is :meth:`PlanReport.to_dict` (policy with every parameter, the detector's seed and
    offsets, per-VM and total figures, costs) plus ``"actions"`` (the action names, indexed by
    code) and ``"pages"``: per VM, in the order planned, columnar arrays over its present pages in
    ascending gfn order::

        {"vm": 0, "name": "...", "gfn": [...], "action": [codes], "reference": [...], "size": [...]}

    ``reference`` is ``[vm, gfn]`` for shared pages (the kept copy) and patched pages (the
    reference page), ``null`` otherwise; ``size`` is the bytes the page then occupies (4096 whole,
    the patch or compressed size, 0 for zero, shared and swapped pages).

    Written as it is produced, a chunk of pages at a time, to a temporary file in the same
    directory renamed over ``path`` at the end: never half-written.  Refuses an estimate (a
    sampled plan has no size for the pages it did not compute).
    """
    if plan.estimate:
        raise UsageError("a plan file needs an exact plan: run without --sample")
    path = Path(path)
    tmp: str | None = None
    try:
        import tempfile

        fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".plan.json", dir=path.parent or Path("."))
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            head = plan.to_dict()
            head["actions"] = list(ACTIONS)
            text = json.dumps(head, sort_keys=False)
            f.write(text[:-1] + ', "pages": [')
            share_refs = _share_references(plan)
            for v, pp in enumerate(plan.pages):
                if v:
                    f.write(", ")
                _write_vm(f, plan, v, pp, share_refs[v])
            f.write("]}\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        tmp = None
    except OSError as e:
        raise OutputError(path, e.strerror or str(e)) from e
    finally:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)


def _share_references(plan: PlanReport) -> list[tuple[_I64, _I64]]:
    """Per VM, per page: the (vm, gfn) of the kept copy of its content (-1 where none)."""
    ids_all = plan.content_ids
    n_contents = max((int(ids.max()) for ids in ids_all if len(ids)), default=0) + 1
    first_vm = np.full(n_contents, -1, dtype=np.int64)
    first_gfn = np.zeros(n_contents, dtype=np.int64)
    out = []
    for v, ids in enumerate(ids_all):
        uniq, first = np.unique(ids, return_index=True)
        gfns = plan.pages[v].gfns
        if plan.policy.cross_vm:
            new = first_vm[uniq] < 0
            first_vm[uniq[new]] = v
            first_gfn[uniq[new]] = gfns[first[new]].astype(np.int64)
            out.append((first_vm[ids], first_gfn[ids]))
        else:
            at = np.searchsorted(uniq, ids)
            out.append((np.full(len(ids), v, dtype=np.int64), gfns[first[at]].astype(np.int64)))
    return out


def _write_vm(f: TextIO, plan: PlanReport, v: int, pp: PagePlan, share_refs: tuple[_I64, _I64]) -> None:
    n = len(pp.actions)
    ref_vm = np.full(n, -1, dtype=np.int64)
    ref_gfn = np.zeros(n, dtype=np.int64)
    shared = pp.actions == SHARE
    ref_vm[shared] = share_refs[0][shared]
    ref_gfn[shared] = share_refs[1][shared]
    # A patched page that was then swapped out no longer needs its reference.
    still = pp.actions[pp.patch_positions] == PATCH
    at = pp.patch_positions[still]
    if len(at):
        ref_vm[at] = pp.patch_ref_vm[still]
        ref_gfn[at] = _gfns_of(plan, pp.patch_ref_vm[still], pp.patch_ref_pos[still])
    f.write(json.dumps({"vm": v, "name": plan.vms[v].name})[:-1])
    f.write(', "gfn": ')
    _write_column(f, pp.gfns, lambda c: ",".join(map(str, c.tolist())))
    f.write(', "action": ')
    _write_column(f, pp.actions, lambda c: ",".join(map(str, c.tolist())))
    f.write(', "reference": ')
    both = np.stack((ref_vm, ref_gfn), axis=1)
    _write_column(
        f,
        both,
        lambda c: ",".join("null" if a < 0 else f"[{a},{b}]" for a, b in c.tolist()),
    )
    f.write(', "size": ')
    _write_column(f, pp.sizes, lambda c: ",".join(map(str, c.tolist())))
    f.write("}")


def _gfns_of(plan: PlanReport, vm: _I64, pos: _I64) -> _I64:
    out = np.empty(len(vm), dtype=np.int64)
    for v in unique(vm).tolist():
        sel = vm == v
        out[sel] = plan.pages[v].gfns[pos[sel]].astype(np.int64)
    return out


def _write_column(f: TextIO, values: npt.NDArray[Any], render: Callable[[npt.NDArray[Any]], str]) -> None:
    f.write("[")
    for lo in range(0, len(values), _WRITE_CHUNK):
        if lo:
            f.write(",")
        f.write(render(values[lo : lo + _WRITE_CHUNK]))
    f.write("]")
