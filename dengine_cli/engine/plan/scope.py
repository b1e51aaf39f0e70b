"""What a plan may touch: per VM the kept pages, the candidates for patching and compression,
and the similarity keys of the offered pages in scan order."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from dengine_cli.engine.plan.model import I64, Bool
from dengine_cli.engine.policy import Policy
from dengine_cli.engine.sharing.model import SharingReport
from dengine_cli.formats.base import Dump
from dengine_cli.parallel.threads import map_in_threads

#: Threads for the plan's numpy work that lets go of the GIL: similarity keys (a dump each at a
#: time) and the per-VM sorts of the scope.
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


def scope_of(sharing: SharingReport, policy: Policy, hot: Sequence[Bool | None], want: bool) -> Scope:
    ids_all = sharing.content_ids
    n_contents = sharing.contents + 1
    seen = np.zeros(n_contents, dtype=np.bool_)
    copies_all: npt.NDArray[np.int64] | None = None
    if policy.cross_vm:
        copies_all = np.zeros(n_contents, dtype=np.int64)
        for ids in ids_all:
            copies_all += np.bincount(ids.astype(np.int64), minlength=n_contents)
    kept_l, kc_l, sk_l, cand_l, within_l, across_l = [], [], [], [], [], []
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
        kc_l.append(copies[kept].astype(np.int64))
        sk_l.append(shared_kept)
        cand_l.append(cand)
        pos = np.flatnonzero(kept)
        e_vm_parts.append(np.full(len(pos), v, dtype=np.int64))
        e_pos_parts.append(pos.astype(np.int64))
        e_cand_parts.append(cand[pos])
    return Scope(
        kept_l,
        kc_l,
        sk_l,
        cand_l,
        within_l,
        across_l,
        np.concatenate(e_vm_parts) if e_vm_parts else np.zeros(0, dtype=np.int64),
        np.concatenate(e_pos_parts) if e_pos_parts else np.zeros(0, dtype=np.int64),
        np.concatenate(e_cand_parts) if e_cand_parts else np.zeros(0, dtype=np.bool_),
    )


def similarity_keys(
    dumps: Sequence[Dump], policy: Policy, scope: Scope, batch_pages: int
) -> npt.NDArray[np.uint64]:
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
