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

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

_I64 = npt.NDArray[np.int64]


@dataclass(frozen=True)
class SwapClass:
    """One class of pageable pages: per VM, their positions (ascending) and what each frees.
    Either may be a sequence that works a VM's array out when it is asked for, so that one VM's
    are in memory at a time."""

    positions: Sequence[_I64]
    freed: Sequence[_I64]


@dataclass(frozen=True, eq=False)
class SwapChoice:
    """The pages chosen for swap: per VM the positions (ascending; worked out from the classes
    when asked, VM by VM) and bytes freed, and whether the VMs then fit."""

    positions: Sequence[_I64]
    freed_bytes: tuple[int, ...]
    fits: bool


class PerVm(Sequence[_I64]):
    """A sequence of per-VM arrays, each made by ``make(v)`` when asked for (one VM's in memory
    at a time)."""

    def __init__(self, n: int, make: Callable[[int], _I64]) -> None:
        self._n = n
        self._make = make

    def __len__(self) -> int:
        return self._n

    def __getitem__(self, v: int) -> _I64:  # type: ignore[override]
        if not 0 <= v < self._n:
            raise IndexError(v)
        return self._make(v)


def _chosen(classes: Sequence[SwapClass], taken: Sequence[Sequence[int]], v: int) -> _I64:
    """VM v's first ``taken[c][v]`` pages of each class c, in ascending order."""
    parts = [
        np.asarray(cls.positions[v][:k], dtype=np.int64)
        for cls, counts in zip(classes, taken, strict=True)
        if (k := counts[v])
    ]
    return np.sort(np.concatenate(parts)) if parts else np.zeros(0, dtype=np.int64)


def choose_swap(excess: int, classes: Sequence[SwapClass], n_vms: int) -> SwapChoice:
    """Page out pages of ``classes`` (in order, each in scan order) until at least ``excess``
    bytes are freed; ``fits`` is False when all of them do not free enough.  One VM's pages of
    one class are looked at a time."""
    taken = [[0] * n_vms for _ in classes]
    freed = [0] * n_vms
    remaining = excess
    for c, cls in enumerate(classes):
        for v in range(n_vms):
            if remaining <= 0:
                break
            f = np.asarray(cls.freed[v], dtype=np.int64)
            if not len(f):
                continue
            total = np.cumsum(f)
            k = int(np.searchsorted(total, remaining)) + 1 if int(total[-1]) >= remaining else len(f)
            taken[c][v] = k
            freed[v] += int(total[k - 1])
            remaining -= int(total[k - 1])
    return SwapChoice(PerVm(n_vms, lambda v: _chosen(classes, taken, v)), tuple(freed), remaining <= 0)


def vms_per_host(host_memory: int, footprint: int) -> int | None:
    """How many VMs of this footprint fit in ``host_memory`` (``None``: a zero footprint fits
    without bound)."""
    if footprint <= 0:
        return None
    return host_memory // footprint
