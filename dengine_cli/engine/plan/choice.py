"""The plan's choices: patches against references, compression, paging, and the per-page plan
of every VM."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from dengine_cli.arrays import ArrayHome, pieces
from dengine_cli.engine.costs import OperationCounts, PlanCost
from dengine_cli.engine.index import PageIndex, Progress
from dengine_cli.engine.paging import PerVm, SwapClass, choose_swap, vms_per_host
from dengine_cli.engine.plan.measure import compressed_sizes, patch_sizes
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
from dengine_cli.engine.plan.sampling import Sampling, extrapolate, sample_groups
from dengine_cli.engine.plan.scope import Scope, scope_of, similarity_keys
from dengine_cli.engine.policy import Policy
from dengine_cli.engine.sharing.model import CopyCounts, SharingReport, ksm_extra_pages
from dengine_cli.engine.similarity import PAIR_BYTES_PER_PAGE, candidate_pairs
from dengine_cli.formats.base import Dump
from dengine_cli.pages import BATCH_PAGES, PAGE_SIZE
from dengine_cli.parallel import Workers

#: Bytes of temporaries per pair while a range of pairs is measured and chosen: their VMs and
#: positions gathered, sizes, and the pairs that pay as Python integers.
PATCH_BYTES_PER_PAIR = 200


def _patch(
    dumps: Sequence[Dump],
    indexes: Sequence[PageIndex],
    policy: Policy,
    scope: Scope,
    pages: I64,
    refs: I64,
    workers: Workers,
    on_progress: Progress | None,
    home: ArrayHome,
) -> tuple[I64, npt.NDArray[np.int32], Bool]:
    """Measure every pair's patch (spread over ``workers``), then choose in scan order, a range
    of pages' pairs at a time (as many as ``home`` lets temporaries take).  Returns, over E: the
    chosen reference (-1: not patched), the patch size, and whether the page is a reference."""
    n = len(scope.e_vm)
    choice = _Patches(
        ref_of=home.full(n, -1, np.int64),
        size=home.full(n, 0, np.int32),
        is_ref=home.full(n, False, np.bool_),
        patched=home.full(n, 0, np.uint8).data,
        threshold=policy.patch_threshold,
    )
    report = progress_of(on_progress, "patching", len(pages))
    for lo, hi in _pair_ranges(pages, home.step(PATCH_BYTES_PER_PAIR)):
        p, r = pages[lo:hi], refs[lo:hi]
        sizes = patch_sizes(
            dumps,
            indexes,
            policy.patch_codec,
            policy.patch_threshold,
            scope.e_vm[p],
            scope.e_pos[p],
            scope.e_vm[r],
            scope.e_pos[r],
            workers,
            _offset(report, lo),
        )
        choice.take(p, r, sizes)
    return choice.ref_of, choice.size, choice.is_ref


@dataclass(frozen=True, eq=False)
class _Patches:
    """The patches chosen so far, over E, and which pages are patched (a byte each)."""

    ref_of: I64
    size: npt.NDArray[np.int32]
    is_ref: Bool
    patched: memoryview
    threshold: int

    def take(self, pages: I64, refs: I64, sizes: npt.NDArray[np.int32]) -> None:
        """Choose among the pairs of some pages (all of each page's pairs, in scan order)."""
        good = sizes < self.threshold
        gp, gr, gs = pages[good].tolist(), refs[good].tolist(), sizes[good].tolist()
        # The only per-pair Python: pairs whose patch pays, in scan order.  A reference's fate is
        # settled before any page that could use it (references come earlier in scan order).
        patched = self.patched
        m = len(gp)
        i = 0
        while i < m:
            p0 = gp[i]
            best, best_size = -1, self.threshold
            while i < m and gp[i] == p0:
                r = gr[i]
                if not patched[r] and gs[i] < best_size:
                    best, best_size = r, gs[i]
                i += 1
            if best >= 0:
                patched[p0] = 1
                self.ref_of[p0] = best
                self.size[p0] = best_size
                self.is_ref[best] = True


def _pair_ranges(pages: I64, step: int | None) -> list[tuple[int, int]]:
    """Ranges of the pairs (sorted by page) of about ``step`` pairs, never cutting a page's."""
    if step is None or len(pages) <= step:
        return [(0, len(pages))]
    cuts = [0]
    while cuts[-1] < len(pages):
        at = cuts[-1] + step
        cuts.append(
            len(pages) if at >= len(pages) else int(np.searchsorted(pages, pages[at - 1], side="right"))
        )
    return list(itertools.pairwise(cuts))


def _compress(
    dumps: Sequence[Dump],
    indexes: Sequence[PageIndex],
    policy: Policy,
    scope: Scope,
    todo: Bool,
    workers: Workers,
    on_progress: Progress | None,
    home: ArrayHome,
) -> npt.NDArray[np.int32]:
    """Compressed sizes of the E pages marked ``todo`` (0 elsewhere), spread over ``workers``,
    as many at a time as ``home`` lets temporaries take."""
    sizes = home.full(len(scope.e_vm), 0, np.int32)
    total = int(np.count_nonzero(todo))
    report = progress_of(on_progress, "compressing", total)
    step = home.step(COMPRESS_BYTES_PER_PAGE) or max(1, len(todo))
    done = 0
    for lo in range(0, len(todo), step):
        where = np.flatnonzero(todo[lo : lo + step]) + lo
        sizes[where] = compressed_sizes(
            dumps,
            indexes,
            policy.compression_codec,
            scope.e_vm[where],
            scope.e_pos[where],
            workers,
            _offset(report, done),
        )
        done += len(where)
    return sizes


#: Bytes of temporaries per offered page while the pages to compress are picked and measured.
COMPRESS_BYTES_PER_PAGE = 40


def pair_partitions(n_e: int, home: ArrayHome, threads: int = 2) -> int:
    """Key ranges (a power of two) each similarity index is worked through in, so that
    ``threads`` at a time keep their temporaries within what ``home`` allows."""
    step = home.step(max(1, threads) * PAIR_BYTES_PER_PAGE)
    parts = 1
    while step is not None and n_e > parts * step and parts < 1 << 12:
        parts *= 2
    return parts


def _offset(report: Callable[[int], None] | None, before: int) -> Callable[[int], None] | None:
    """``report`` of counts that start at ``before``."""
    if report is None:
        return None
    return lambda done: report(before + done)


def progress_of(on_progress: Progress | None, what: str, total: int) -> Callable[[int], None] | None:
    if on_progress is None:
        return None
    report = on_progress
    return lambda done: report(what, done, total)


@dataclass(frozen=True, eq=False)
class Choices:
    """Over the offered pages E (scan order): the chosen reference (-1: not patched), patch and
    compressed sizes, which pages are references, patched, compressed; and the sample."""

    ref_of: I64
    patch_size: npt.NDArray[np.int32]
    is_ref: Bool
    comp_size: npt.NDArray[np.int32]
    compressed: Bool
    sampling: Sampling | None

    @property
    def patched(self) -> Bool:
        return self.ref_of >= 0


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
    workers: Workers | None = None,
    home: ArrayHome | None = None,
) -> PlanReport:
    """The plan of VMs given open dumps, their indexes and their exact sharing (any
    ``cross_vm``: the plan uses only the content ids).  ``hot[v]``: per page of VM v, whether it
    changed since an earlier snapshot (``None``: no history for that VM, or for any when ``hot``
    is ``None``: every page cold, and the plan is an upper bound).  ``workers``: the threads or
    processes that measure patches and compressed pages.  ``home``: where the per-page arrays
    are made and how much their temporaries may take at a time (default: in memory, all at
    once); the plan is the same for any."""
    if len(dumps) != len(indexes) or len(sharing.content_ids) != len(dumps):
        raise ValueError("one dump, index and content id array per VM is needed")
    workers = workers or Workers()
    home = home or ArrayHome()
    n_vms = len(dumps)
    hot_of: list[Bool | None] = list(hot) if hot is not None else [None] * n_vms
    if len(hot_of) != n_vms:
        raise ValueError("one hot mask (or None) per VM is needed")
    scope = scope_of(sharing, policy, hot_of, policy.patch or policy.compress, home, workers.count)
    choices = _choose(dumps, indexes, policy, scope, sample, seed, workers, on_progress, batch_pages, home)
    bounds = np.searchsorted(scope.e_vm, np.arange(n_vms + 1))
    page_plans = _page_plans(sharing, indexes, scope, choices, bounds, home)
    frames = merged_frames(indexes, policy, scope)
    footprints = [
        int(pp.sizes.sum(dtype=np.int64)) + f * PAGE_SIZE for pp, f in zip(page_plans, frames, strict=True)
    ]
    host, swapped = _page_out(host_memory, footprints, page_plans, scope, choices, hot_of, bounds)
    vms = _vm_plans(dumps, page_plans, scope, choices, hot_of, bounds, footprints, swapped, host_memory)
    total_half: float | None = None
    if choices.sampling is not None:
        vms, total_half = extrapolate(
            vms, scope, choices.sampling, choices.patched, choices.patch_size, choices.compressed,
            choices.comp_size, frames, host_memory,
        )  # fmt: skip
    total = total_of(vms, host_memory, total_half)
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
            workers=workers,
            home=home,
        )
    return PlanReport(
        policy=policy,
        vms=tuple(vms),
        total=total,
        cost=PlanCost(policy.costs, _operations(vms, scope, total)),
        upper_bound=any(h is None for h in hot_of),
        sample=choices.sampling.info if choices.sampling is not None else None,
        host=host,
        baseline=base_report,
        pages=tuple(page_plans),
        content_ids=sharing.content_ids,
        estimate=choices.sampling is not None,
    )


def merged_frames(indexes: Sequence[PageIndex], policy: Policy, scope: Scope) -> list[int]:
    """Per VM, the frames the host holds beyond its pages' own sizes: under ``zero_frame`` the
    merged zero pages' (charged to the first VM holding one), and under a ``max_page_sharing``
    cap the further KSM pages of the contents a VM keeps, as analyze's KSM view counts them
    (the zero page being a content of every zero page's copies)."""
    cap = policy.max_page_sharing
    frames = [ksm_extra_pages(CopyCounts.of(copies), cap) if cap else 0 for copies in scope.kept_copies]
    first = next((v for v, index in enumerate(indexes) if index.zero_pages), None)
    if policy.zero_frame and first is not None:
        zeros = CopyCounts.of(np.array([sum(index.zero_pages for index in indexes)], dtype=np.int64))
        frames[first] += 1 + (ksm_extra_pages(zeros, cap) if cap else 0)
    return frames


def _operations(vms: Sequence[VmPlan], scope: Scope, total: VmPlan) -> OperationCounts:
    """What the host does to build the plan and touch its pages again, for the cost model."""
    return OperationCounts(
        shared=sum(vm.zero + vm.shared for vm in vms),
        cow_mapped=sum(vm.zero + vm.shared + int(scope.shared_kept[v].sum()) for v, vm in enumerate(vms)),
        patched=total.patched,
        compressed=total.compressed,
        paged_out=total.paged_out,
    )


def _choose(
    dumps: Sequence[Dump],
    indexes: Sequence[PageIndex],
    policy: Policy,
    scope: Scope,
    sample: float | None,
    seed: int,
    workers: Workers,
    on_progress: Progress | None,
    batch_pages: int,
    home: ArrayHome,
) -> Choices:
    """Similarity, sampling, patches and compression: what becomes of each offered page."""
    n_e = len(scope.e_vm)
    want = policy.patch or policy.compress
    pages = refs = np.zeros(0, dtype=np.int64)
    if policy.patch and scope.e_cand.any():
        threads = workers.count
        keys = similarity_keys(dumps, policy, scope, batch_pages, home, threads)
        pages, refs = candidate_pairs(
            keys,
            home.full(n_e, True, np.bool_),
            scope.e_cand,
            policy.detector.candidates,
            None if policy.cross_vm else scope.e_vm,
            partitions=pair_partitions(n_e, home, threads),
            threads=threads,
            home=home,
        )
        del keys
    sampling = sample_groups(scope, pages, refs, sample, seed, home) if sample is not None and want else None
    active = sampling.active if sampling is not None else scope.e_cand
    if sampling is not None:
        keep = active[pages]
        pages, refs = pages[keep], refs[keep]
    if len(pages):
        ref_of, patch_size, is_ref = _patch(
            dumps, indexes, policy, scope, pages, refs, workers, on_progress, home
        )
    else:
        ref_of, patch_size, is_ref = (
            home.full(n_e, -1, np.int64),
            home.full(n_e, 0, np.int32),
            home.full(n_e, False, np.bool_),
        )
    compressed = home.full(n_e, False, np.bool_)
    if policy.compress:
        todo = home.full(n_e, False, np.bool_)
        np.logical_and(active, ref_of < 0, out=todo)
        todo &= ~is_ref
        comp_size = _compress(dumps, indexes, policy, scope, todo, workers, on_progress, home)
        np.logical_and(todo, comp_size < policy.compression_threshold, out=compressed)
    else:
        comp_size = home.full(n_e, 0, np.int32)
    return Choices(ref_of, patch_size, is_ref, comp_size, compressed, sampling)


def _page_plans(
    sharing: SharingReport,
    indexes: Sequence[PageIndex],
    scope: Scope,
    choices: Choices,
    bounds: I64,
    home: ArrayHome,
) -> list[PagePlan]:
    """Every page's action and size, VM by VM."""
    page_plans: list[PagePlan] = []
    patched = choices.patched
    for v, ids in enumerate(sharing.content_ids):
        actions = home.full(len(ids), SHARE, np.uint8)
        for lo, hi in pieces(len(ids), home.step(1)):
            actions[lo:hi][np.asarray(ids[lo:hi]) == 0] = ZERO
        actions[scope.kept[v]] = WHOLE
        sizes = home.full(len(ids), 0, np.int32)
        sizes[scope.kept[v]] = PAGE_SIZE
        lo, hi = int(bounds[v]), int(bounds[v + 1])
        pos = scope.e_pos[lo:hi]
        p = patched[lo:hi]
        c = choices.compressed[lo:hi]
        actions[pos[p]] = PATCH
        sizes[pos[p]] = choices.patch_size[lo:hi][p]
        actions[pos[c]] = COMPRESS
        sizes[pos[c]] = choices.comp_size[lo:hi][c]
        refs_e = choices.ref_of[lo:hi][p]
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
    return page_plans


def _page_out(
    host_memory: int | None,
    footprints: Sequence[int],
    page_plans: Sequence[PagePlan],
    scope: Scope,
    choices: Choices,
    hot: Sequence[Bool | None],
    bounds: I64,
) -> tuple[HostFit | None, list[int]]:
    """Page out the coldest pages beyond ``host_memory`` (exact plans only: it needs every
    page's size); the host's fit and the bytes paged out per VM."""
    swapped = [0] * len(page_plans)
    if host_memory is None:
        return None, swapped
    before = sum(footprints)
    fits = before <= host_memory
    if not fits and choices.sampling is None:
        classes = _swap_classes(scope, page_plans, choices.is_ref, hot, bounds)
        choice = choose_swap(before - host_memory, classes, len(page_plans))
        for v, pp in enumerate(page_plans):
            # Worked out from VM v's actions, so before they change.
            pos = choice.positions[v]
            pp.actions[pos] = SWAP
            pp.sizes[pos] = 0
        swapped = list(choice.freed_bytes)
        fits = choice.fits
    return HostFit(host_memory, before, fits, vms_per_host(host_memory, before)), swapped


def _vm_plans(
    dumps: Sequence[Dump],
    page_plans: Sequence[PagePlan],
    scope: Scope,
    choices: Choices,
    hot: Sequence[Bool | None],
    bounds: I64,
    footprints: Sequence[int],
    swapped: Sequence[int],
    host_memory: int | None,
) -> list[VmPlan]:
    """The per-VM figures of the per-page plans."""
    vms = []
    for v, pp in enumerate(page_plans):
        at = pp.actions
        counts = np.bincount(at, minlength=len(ACTIONS))
        lo, hi = int(bounds[v]), int(bounds[v + 1])
        fp = footprints[v] - swapped[v]
        vms.append(
            VmPlan(
                name=dumps[v].name,
                present=len(at),
                zero=int(counts[ZERO]),
                shared_within=scope.within[v],
                shared_across=scope.across[v],
                whole=int(counts[WHOLE]),
                hot=count_of(hot[v]),
                references=int(choices.is_ref[lo:hi].sum()),
                patched=int(counts[PATCH]),
                patch_bytes=int(pp.sizes[at == PATCH].sum(dtype=np.int64)),
                compressed=int(counts[COMPRESS]),
                compressed_bytes=int(pp.sizes[at == COMPRESS].sum(dtype=np.int64)),
                paged_out=int(counts[SWAP]),
                paged_out_bytes=swapped[v],
                footprint_bytes=fp,
                per_host=vms_per_host(host_memory, fp) if host_memory is not None else None,
            )
        )
    return vms


def _swap_classes(
    scope: Scope, page_plans: Sequence[PagePlan], is_ref: Bool, hot: Sequence[Bool | None], bounds: I64
) -> list[SwapClass]:
    """The classes of pages to page out, coldest first, each VM's worked out when asked (one VM
    in memory at a time)."""

    def pageable(v: int) -> tuple[I64, I64, I64]:
        pp = page_plans[v]
        ref = np.zeros(len(pp.actions), dtype=np.bool_)
        lo, hi = int(bounds[v]), int(bounds[v + 1])
        ref[scope.e_pos[lo:hi][is_ref[lo:hi]]] = True
        movable = ~ref & ~scope.shared_kept[v]
        h = hot[v]
        if h is not None:
            movable &= ~h
        whole = np.flatnonzero((pp.actions == WHOLE) & movable)
        return whole, np.flatnonzero(pp.actions == COMPRESS), np.flatnonzero(pp.actions == PATCH)

    def positions(k: int) -> PerVm:
        return PerVm(len(page_plans), lambda v: pageable(v)[k])

    def freed(k: int) -> PerVm:
        if k == 0:
            return PerVm(len(page_plans), lambda v: np.full(len(pageable(v)[0]), PAGE_SIZE, dtype=np.int64))
        return PerVm(len(page_plans), lambda v: page_plans[v].sizes[pageable(v)[k]].astype(np.int64))

    return [SwapClass(positions(k), freed(k)) for k in range(3)]
