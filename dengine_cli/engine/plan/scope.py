"""What a plan may touch: per VM the kept pages, the candidates for patching and compression,
and the similarity keys of the offered pages in scan order."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from dengine_cli.arrays import ArrayHome, consecutive_groups, pieces
from dengine_cli.engine.plan.model import I64, Bool
from dengine_cli.engine.policy import Policy
from dengine_cli.engine.sharing.model import SharingReport
from dengine_cli.formats.base import Dump
from dengine_cli.parallel.threads import map_in_threads

#: Threads for the plan's numpy work that lets go of the GIL (similarity keys, a dump each at a
#: time, and the sorts of the scope) when the caller does not say: ``plan_dumps`` gives its
#: workers' count (``-j``).
PLAN_THREADS = min(2, os.cpu_count() or 1)


@dataclass
class Scope:
    """Per VM: which pages are kept, candidates, shared frames, and how many copies (in the
    sharing's scope: all VMs, or the VM) the content of each kept page has; and the offered
    pages E in scan order (VM, position)."""

    kept: list[Bool]
    kept_copies: list[I64]
    shared_kept: list[Bool]
    candidate: list[Bool]
    within: list[int]
    across: list[int]
    e_vm: I64
    e_pos: I64
    e_cand: Bool


#: Bytes of temporaries per page while the scope goes through a chunk of a VM's pages (first
#: occurrences, owners, copies, masks).
SCOPE_BYTES_PER_PAGE = 48


@dataclass
class _Pass:
    """The state of one pass of :func:`scope_of` over the VMs, content by content: the VM that
    last held each content (-1: none yet) and, without sharing across VMs, each content's
    copies in the VM being scanned."""

    owner: npt.NDArray[np.int32]
    copies: npt.NDArray[np.int64]
    cross_vm: bool


def scope_of(
    sharing: SharingReport,
    policy: Policy,
    hot: Sequence[Bool | None],
    want: bool,
    home: ArrayHome | None = None,
    threads: int = PLAN_THREADS,
) -> Scope:
    """The :class:`Scope` of a plan over ``sharing``.  ``home``: where the per-page arrays are
    made, and in how many pages at a time they are worked out (:meth:`ArrayHome.step`): the
    result is the same for any."""
    home = home or ArrayHome()
    ids_all = sharing.content_ids
    n_contents = sharing.contents + 1
    step = home.step(SCOPE_BYTES_PER_PAGE)
    copies = _copies_all(ids_all, n_contents, home, step) if policy.cross_vm else None
    state = _Pass(
        owner=home.full(n_contents, -1, np.int32),
        copies=copies if copies is not None else home.full(n_contents, 0, np.int64),
        cross_vm=policy.cross_vm,
    )
    per_vm: list[tuple[Bool, I64, Bool, Bool, int, int]] = []
    for window in consecutive_groups([len(ids) for ids in ids_all], step):
        # The sorts (first occurrences) of a window of VMs in threads (numpy sorts without the
        # GIL); then VM after VM, chunk after chunk, in scan order.
        work = [(v, lo, hi) for v in window for lo, hi in pieces(len(ids_all[v]), step)]
        firsts = map_in_threads(
            lambda piece: _first_occurrences(ids_all[piece[0]][piece[1] : piece[2]]), work, threads
        )
        for v in window:
            mine = [(lo, hi, f) for (u, lo, hi), f in zip(work, firsts, strict=True) if u == v]
            per_vm.append(_scope_vm(v, ids_all[v], mine, state, hot[v], want, home))
    kept_l = [t[0] for t in per_vm]
    cand_l = [t[3] for t in per_vm]
    e_vm, e_pos, e_cand = _offered(kept_l, cand_l, home, step)
    return Scope(
        kept=kept_l,
        kept_copies=[t[1] for t in per_vm],
        shared_kept=[t[2] for t in per_vm],
        candidate=cand_l,
        within=[t[4] for t in per_vm],
        across=[t[5] for t in per_vm],
        e_vm=e_vm,
        e_pos=e_pos,
        e_cand=e_cand,
    )


def _scope_vm(
    v: int,
    ids: npt.NDArray[Any],
    parts: Sequence[tuple[int, int, I64]],
    state: _Pass,
    hot: Bool | None,
    want: bool,
    home: ArrayHome,
) -> tuple[Bool, I64, Bool, Bool, int, int]:
    """VM ``v``'s kept, kept copies, shared-kept and candidate arrays, and its pages shared
    within and across VMs, from its ``parts`` (``lo, hi`` and the first occurrences there)."""
    if not state.cross_vm:
        for lo, hi, _ in parts:
            np.add.at(state.copies, ids[lo:hi], 1)
    kept, shared_kept, cand = (home.full(len(ids), False, np.bool_) for _ in range(3))
    within = across = 0
    for lo, hi, first in parts:
        w, a = _scope_chunk(v, ids[lo:hi], first, state, hot, want, lo, kept, shared_kept, cand)
        within, across = within + w, across + a
    kc = home.full(int(np.count_nonzero(kept)), 0, np.int64)
    at = 0
    for lo, hi, _ in parts:
        sel = ids[lo:hi][kept[lo:hi]]
        kc[at : at + len(sel)] = state.copies[sel]
        at += len(sel)
    if not state.cross_vm:
        for lo, hi, _ in parts:
            state.copies[ids[lo:hi]] = 0
    return kept, kc, shared_kept, cand, within, across


def _copies_all(
    ids_all: Sequence[npt.NDArray[Any]], n_contents: int, home: ArrayHome, step: int | None
) -> I64:
    """How many pages of all VMs hold each content."""
    copies = home.full(n_contents, 0, np.int64)
    for ids in ids_all:
        for lo, hi in pieces(len(ids), step):
            np.add.at(copies, ids[lo:hi], 1)
    return copies


def _first_occurrences(ids: npt.NDArray[Any]) -> I64:
    """Positions of the first occurrence of each distinct value of ``ids``."""
    if not len(ids):
        return np.zeros(0, dtype=np.int64)
    order = np.argsort(ids, kind="stable")
    ordered = ids[order]
    start = np.empty(len(ids), dtype=np.bool_)
    start[0] = True
    np.not_equal(ordered[1:], ordered[:-1], out=start[1:])
    return order[start].astype(np.int64)


def _scope_chunk(
    v: int,
    ids: npt.NDArray[Any],
    first: I64,
    state: _Pass,
    hot: Bool | None,
    want: bool,
    lo: int,
    kept: Bool,
    shared_kept: Bool,
    cand: Bool,
) -> tuple[int, int]:
    """Pages ``lo:lo + len(ids)`` of VM ``v``: which are kept, shared-kept and candidates
    (written into those masks), in scan order; the pages shared within the VM and across VMs."""
    hi = lo + len(ids)
    first_in_vm = np.zeros(len(ids), dtype=np.bool_)
    first_in_vm[first] = True
    owner = state.owner[ids]
    nonzero = ids != 0
    first_in_vm &= nonzero & (owner != v)
    k = first_in_vm & (owner < 0) if state.cross_vm else first_in_vm
    state.owner[ids[first_in_vm]] = v
    copies = state.copies[ids]
    kept[lo:hi] = k
    shared_kept[lo:hi] = k & (copies > 1)
    if want:
        c = k & (copies == 1)
        if hot is not None:
            c &= ~hot[lo:hi]
        cand[lo:hi] = c
    within = int(np.count_nonzero(nonzero & ~first_in_vm))
    return within, int(np.count_nonzero(first_in_vm & ~k))


def _offered(
    kept_l: Sequence[Bool], cand_l: Sequence[Bool], home: ArrayHome, step: int | None
) -> tuple[I64, I64, Bool]:
    """The offered pages E in scan order: (VM, position, candidate) of every kept page."""
    counts = [int(np.count_nonzero(kept)) for kept in kept_l]
    n_e = sum(counts)
    e_vm = home.full(n_e, 0, np.int64)
    e_pos = home.full(n_e, 0, np.int64)
    e_cand = home.full(n_e, False, np.bool_)
    at = 0
    for v, (kept, cand) in enumerate(zip(kept_l, cand_l, strict=True)):
        e_vm[at : at + counts[v]] = v
        for lo, hi in pieces(len(kept), step):
            pos = np.flatnonzero(kept[lo:hi]) + lo
            e_pos[at : at + len(pos)] = pos
            e_cand[at : at + len(pos)] = cand[pos]
            at += len(pos)
    return e_vm, e_pos, e_cand


def similarity_keys(
    dumps: Sequence[Dump],
    policy: Policy,
    scope: Scope,
    batch_pages: int,
    home: ArrayHome | None = None,
    threads: int = PLAN_THREADS,
) -> npt.NDArray[np.uint64]:
    """Similarity keys ``(|E|, k)`` of the offered pages, one pass over each dump's batches
    (made where ``home`` keeps arrays)."""
    det = policy.detector
    keys = (home or ArrayHome()).full((len(scope.e_vm), det.indexes), 0, np.uint64)
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
    map_in_threads(dump_keys, range(len(dumps)), threads)
    return keys
