"""Paging to swap when the VMs do not fit in host memory, the Difference Engine's last resort.

When the footprint of all the VMs after sharing, patching and compression still exceeds the host
memory, the coldest remaining pages go to swap until the rest fits.  A dump holds no
not-recently-used bits, so "coldest" is an order of classes, each in scan order (VMs in the order
given, ascending gfn):

1. cold whole pages that nothing refers to (each frees 4096 bytes);
2. compressed pages (each frees its compressed size);
3. patched pages (each frees its patch size).

Never paged: reference pages (a patch needs them), shared frames (several mappings), hot pages
and zero pages.  A host that cannot fit the VMs even with every such page paged out is reported
as not fitting.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

_I64 = npt.NDArray[np.int64]


@dataclass(frozen=True)
class SwapClass:
    """One class of pageable pages: per VM, their positions (ascending) and what each frees."""

    positions: Sequence[_I64]
    freed: Sequence[_I64]


@dataclass(frozen=True, eq=False)
class SwapChoice:
    """The pages chosen for swap: per VM the positions (ascending) and bytes freed, and whether
    the VMs then fit."""

    positions: tuple[_I64, ...]
    freed_bytes: tuple[int, ...]
    fits: bool


def choose_swap(excess: int, classes: Sequence[SwapClass], n_vms: int) -> SwapChoice:
    """Page out pages of ``classes`` (in order, each in scan order) until at least ``excess``
    bytes are freed; ``fits`` is False when all of them do not free enough."""
    chosen: list[list[_I64]] = [[] for _ in range(n_vms)]
    freed = [0] * n_vms
    remaining = excess
    for cls in classes:
        if remaining <= 0:
            break
        lengths = [len(p) for p in cls.positions]
        if not sum(lengths):
            continue
        all_freed = np.concatenate([np.asarray(f, dtype=np.int64) for f in cls.freed])
        total = np.cumsum(all_freed)
        take = int(np.searchsorted(total, remaining)) + 1 if int(total[-1]) >= remaining else len(total)
        at = 0
        for v, length in enumerate(lengths):
            k = min(max(take - at, 0), length)
            if k:
                chosen[v].append(np.asarray(cls.positions[v][:k], dtype=np.int64))
                freed[v] += int(np.asarray(cls.freed[v][:k]).sum())
            at += length
        remaining -= int(total[take - 1])
    positions = tuple(
        np.sort(np.concatenate(parts)) if parts else np.zeros(0, dtype=np.int64) for parts in chosen
    )
    return SwapChoice(positions, tuple(freed), remaining <= 0)


def vms_per_host(host_memory: int, footprint: int) -> int | None:
    """How many VMs of this footprint fit in ``host_memory`` (``None``: a zero footprint fits
    without bound)."""
    if footprint <= 0:
        return None
    return host_memory // footprint
