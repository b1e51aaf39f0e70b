"""The plan's choices: patches against references, compression, paging, and the per-page plan
of every VM."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import numpy.typing as npt

from dengine_cli.engine.costs import OperationCounts, PlanCost
from dengine_cli.engine.index import PageIndex, Progress
from dengine_cli.engine.paging import SwapClass, choose_swap, vms_per_host
from dengine_cli.engine.plan import measure as codec_pool
from dengine_cli.engine.plan.measure import CodecWorker
from dengine_cli.engine.plan.model import (
    ACTIONS,
    COMPRESS,
    I64,
    PATCH,
    SHARE,
    SWAP,
    WHOLE,
    ZERO,
    Bool,
    HostFit,
    PagePlan,
    PlanReport,
    VmPlan,
    count_of,
    total_of,
)
from dengine_cli.engine.plan.sampling import extrapolate, sample_groups
from dengine_cli.engine.plan.scope import Scope, scope_of, similarity_keys
from dengine_cli.engine.policy import Policy
from dengine_cli.engine.sharing import SharingReport
from dengine_cli.engine.similarity import candidate_pairs
from dengine_cli.errors import UsageError
from dengine_cli.formats.base import Dump
from dengine_cli.pages import BATCH_PAGES, PAGE_SIZE


def _patch(
    dumps: Sequence[Dump],
    indexes: Sequence[PageIndex],
    policy: Policy,
    scope: Scope,
    pages: I64,
    refs: I64,
    worker: CodecWorker | None,
    on_progress: Progress | None,
) -> tuple[I64, npt.NDArray[np.int32], Bool]:
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
        progress_of(on_progress, "patching", len(pages)),
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
    scope: Scope,
    todo: Bool,
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
        progress_of(on_progress, "compressing", len(where)),
    )
    return sizes


def progress_of(on_progress: Progress | None, what: str, total: int) -> Callable[[int], None] | None:
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
    hot: Sequence[Bool | None] | None = None,
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
    hot_of: list[Bool | None] = list(hot) if hot is not None else [None] * n_vms
    if len(hot_of) != n_vms:
        raise ValueError("one hot mask (or None) per VM is needed")
    want = policy.patch or policy.compress
    scope = scope_of(sharing, policy, hot_of, want)
    n_e = len(scope.e_vm)

    pages = refs = np.zeros(0, dtype=np.int64)
    if policy.patch and scope.e_cand.any():
        keys = similarity_keys(dumps, policy, scope, batch_pages)
        pages, refs = candidate_pairs(
            keys,
            np.ones(n_e, dtype=np.bool_),
            scope.e_cand,
            policy.detector.candidates,
            None if policy.cross_vm else scope.e_vm,
        )
        del keys
    sampling = sample_groups(scope, pages, refs, sample, seed) if sample is not None and want else None
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
            hot=count_of(hot_of[v]),
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
        vms, total_half = extrapolate(
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
    total = total_of(vms, host_memory, total_half)
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
    scope: Scope, page_plans: Sequence[PagePlan], is_ref: Bool, hot: Sequence[Bool | None], bounds: I64
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
