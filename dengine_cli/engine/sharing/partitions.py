"""The first stages of sharing: cut each index by hash range, then group each partition.

1. :func:`sort_run`: the non-zero pages of a slice of one VM's index, sorted by hash and cut
   into ``2 ** bits`` partitions by the top ``bits`` bits of the hash (a :class:`SortedRun`).
2. :func:`gather`: the pieces of one partition from every run, in (VM, slice) order, as one
   :class:`Partition`.
3. :func:`group_partition`: the pages of a partition sorted by (hash, check, VM, position) and
   grouped by equal 128-bit hash; each page's *class* is the first member of its group (the
   lowest (VM, position) holding that content).

Partitions are ranges of the hash space in ascending order, so concatenating the groups of all
partitions gives the same sequence whatever their number: content ids (numbered in that order,
:mod:`~dengine_cli.engine.sharing.settle`) do not depend on how the work was cut.

Every input and output is a few numpy arrays: nothing here opens a file or holds a dump.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from dengine_cli.arrays import unique

U64 = npt.NDArray[np.uint64]
I64 = npt.NDArray[np.int64]
U32 = npt.NDArray[np.uint32]
Positions = npt.NDArray[np.unsignedinteger[Any]]

#: Partitions at most (2 ** MAX_BITS): more would only add per-partition overhead.
MAX_BITS = 16


def partition_starts(bits: int) -> U64:
    """The first hash of each of the ``2 ** bits`` partitions."""
    if not 0 <= bits <= MAX_BITS:
        raise ValueError(f"partition bits must be within 0..{MAX_BITS}, not {bits}")
    return np.arange(1 << bits, dtype=np.uint64) << np.uint64(64 - bits) if bits else np.zeros(1, np.uint64)


@dataclass(frozen=True, eq=False)
class RunPiece:
    """The pages of one partition from one run: VM ``vm``, sorted by hash (positions ascending
    among equal hashes)."""

    vm: int
    hashes: U64
    check: U64
    positions: Positions

    def __len__(self) -> int:
        return len(self.hashes)


@dataclass(frozen=True, eq=False)
class SortedRun:
    """The non-zero pages of positions ``start:stop`` of VM ``vm``'s index, sorted by hash;
    partition ``p`` is rows ``bounds[p]:bounds[p + 1]``."""

    vm: int
    hashes: U64
    check: U64
    positions: Positions
    bounds: I64

    @property
    def partitions(self) -> int:
        return len(self.bounds) - 1

    def piece(self, p: int) -> RunPiece:
        lo, hi = int(self.bounds[p]), int(self.bounds[p + 1])
        return RunPiece(self.vm, self.hashes[lo:hi], self.check[lo:hi], self.positions[lo:hi])


def sort_run(
    vm: int,
    hashes: npt.ArrayLike,
    check: npt.ArrayLike,
    zero: npt.ArrayLike,
    start: int,
    stop: int,
    bits: int,
) -> SortedRun:
    """Stage 1: the :class:`SortedRun` of positions ``start:stop`` of one VM's index arrays
    (``hashes``, ``check``, ``zero``: the whole VM's, only the slice is read)."""
    keep = np.flatnonzero(~np.asarray(np.asarray(zero)[start:stop], dtype=np.bool_))
    h = np.asarray(hashes)[start:stop][keep]
    order = argsort_stable(h)
    h = h[order]
    c = np.asarray(check)[start:stop][keep][order]
    wide = stop > (1 << 32) - 1
    positions: Positions = (keep[order] + start).astype(np.uint64 if wide else np.uint32)
    bounds = np.empty((1 << bits) + 1, dtype=np.int64)
    bounds[:-1] = np.searchsorted(h, partition_starts(bits), side="left")
    bounds[-1] = len(h)
    return SortedRun(vm, h, c, positions, bounds)


def argsort_stable(keys: U64) -> I64:
    """``np.argsort(keys, kind="stable")``, faster on keys in no order: numpy's quicksort
    (vectorized for 64-bit keys: 32 ms for 722 k random hashes here, timsort 108 ms), then the
    rows of each run of equal keys put back in ascending order (those runs are the pages a VM
    holds more than once, sorted by a lexsort of their own).  Where more than a quarter of the
    rows are in such runs, timsort alone is faster (a guest full of copies of a few pages)."""
    order: I64 = np.argsort(keys, kind="quicksort").astype(np.int64, copy=False)
    if len(order) < 2:
        return order
    ordered = keys[order]
    tie = ordered[1:] == ordered[:-1]
    if not tie.any():
        return order
    tied = np.zeros(len(order), dtype=np.bool_)
    tied[1:] |= tie
    tied[:-1] |= tie
    rows = np.flatnonzero(tied)
    if len(rows) > len(order) // 4:
        stable: I64 = np.argsort(keys, kind="stable").astype(np.int64, copy=False)
        return stable
    sub = order[rows]
    order[rows] = sub[np.lexsort((sub, ordered[rows]))]
    return order


@dataclass(frozen=True, eq=False)
class Partition:
    """Every non-zero page of one hash range, from every VM: hash, check, VM and position, in
    (VM, position) order within each equal hash."""

    hashes: U64
    check: U64
    vm: U32
    pos: I64

    def __len__(self) -> int:
        return len(self.hashes)


def gather(pieces: Sequence[RunPiece]) -> Partition:
    """Stage 2: one partition from its pieces, given in (VM, slice) order."""
    if not pieces:
        empty = np.zeros(0, dtype=np.uint64)
        return Partition(empty, empty, np.zeros(0, dtype=np.uint32), np.zeros(0, dtype=np.int64))
    lengths = [len(p) for p in pieces]
    return Partition(
        np.concatenate([p.hashes for p in pieces]),
        np.concatenate([p.check for p in pieces]),
        np.repeat(np.array([p.vm for p in pieces], dtype=np.uint32), lengths),
        np.concatenate([p.positions for p in pieces]).astype(np.int64),
    )


@dataclass(frozen=True, eq=False)
class Grouping:
    """A partition's pages in (hash, check, VM, position) order: ``group[i]`` numbers their
    hash groups 0.. in that order, ``starts[g]`` is group g's first row, and ``cls[i]`` the row
    of the member that represents row i's content (its group's first row, until a byte compare
    splits the group)."""

    vm: U32
    pos: I64
    group: I64
    starts: I64
    cls: I64

    def __len__(self) -> int:
        return len(self.vm)

    @property
    def sizes(self) -> I64:
        return np.diff(np.append(self.starts, len(self.vm)))


def group_partition(part: Partition, hash_bits: int = 128) -> Grouping:
    """Stage 3: the :class:`Grouping` of a partition.  ``hash_bits`` < 128 keeps only the low
    bits of each half of the hash, to force collisions in tests of the byte compare."""
    hashes, check = part.hashes, part.check
    if hash_bits < 128:
        hashes, check = _truncated(hashes, check, hash_bits)
    # Stable, and timsort merges the pieces' sorted runs: equal hashes stay in (VM, position)
    # order, so each group's first row is its lowest (VM, position).
    order = np.argsort(hashes, kind="stable")
    h, c = hashes[order], check[order]
    order = _sort_checks(order, h, c)
    h, c = hashes[order], check[order]
    m = len(order)
    first = np.ones(m, dtype=np.bool_)
    if m > 1:
        first[1:] = (h[1:] != h[:-1]) | (c[1:] != c[:-1])
    del h, c
    group = np.cumsum(first) - 1
    starts = np.flatnonzero(first)
    return Grouping(part.vm[order], part.pos[order], group, starts, starts[group])


def _truncated(hashes: U64, check: U64, bits: int) -> tuple[U64, U64]:
    high = max(0, bits - 64)
    low_mask = np.uint64((1 << min(bits, 64)) - 1)
    high_mask = np.uint64((1 << high) - 1)
    return hashes & high_mask if high < 64 else hashes, check & low_mask


def _sort_checks(order: I64, h: U64, c: U64) -> I64:
    """``order`` with rows of equal ``h`` sorted by ``c`` too (stable), where some run of equal
    ``h`` holds several ``c``: two contents whose high 64 bits agree (forced in tests; about
    n**2 / 2**65 such pairs among n real pages)."""
    if len(h) < 2:
        return order
    same_h = h[1:] == h[:-1]
    mixed = np.flatnonzero(same_h & (c[1:] != c[:-1]))
    if not len(mixed):
        return order
    # The runs of equal h that hold a change of c, each sorted by (c, row).
    run_start = np.flatnonzero(np.concatenate(([True], ~same_h)))
    run_end = np.append(run_start[1:], len(h))
    runs = unique(np.searchsorted(run_start, mixed, side="right") - 1)
    order = order.copy()
    for r in runs.tolist():
        lo, hi = int(run_start[r]), int(run_end[r])
        rows = np.arange(lo, hi)
        order[lo:hi] = order[lo:hi][np.lexsort((rows, c[lo:hi]))]
    return order
