"""The optional stage of sharing: compare the bytes of every page merged (``--verify``).

Without it, pages with equal 128-bit hashes are one content (the bound is in
docs/ARCHITECTURE.md).  With it, every member of a group is compared with its representative; a
group that holds several contents is split, and its pages are counted as collisions.  The stage
reads pages through a :class:`PageCompare`, which the session makes over its open dumps
(:class:`DumpComparer`): the stage itself holds no dump.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Protocol

import numpy as np
import numpy.typing as npt

from dengine_cli.arrays import unique
from dengine_cli.engine.sharing.partitions import I64, Grouping
from dengine_cli.formats.base import Dump, gather_pages
from dengine_cli.pages import BATCH_PAGES, PAGE_SIZE
from dengine_cli.parallel.threads import map_in_threads

Bool = npt.NDArray[np.bool_]

#: Runs of at least this many pages (consecutive in both dumps) are compared as two blocks;
#: runs are compared this many pages at a time (the temporary stays in the CPU cache).
RUN_MIN_PAGES = 4
RUN_STEP = 256
#: Other pairs are gathered (copied) this many at a time.
GATHER_STEP = 128


class PageCompare(Protocol):
    """``compare(vm_a, pos_a, vm_b, pos_b)``: whether page ``pos_a`` of VM ``vm_a`` differs from
    page ``pos_b`` of VM ``vm_b``, pair by pair (positions in each VM's index)."""

    def __call__(self, vm_a: I64, pos_a: I64, vm_b: I64, pos_b: I64) -> Bool: ...


def confirm_groups(
    grouping: Grouping, compare: PageCompare, pairs_at_once: int = 1 << 20
) -> tuple[Grouping, int]:
    """The grouping with every group split by content, and how many pages were in groups that
    held more than one content (collisions).  ``pairs_at_once`` bounds the pairs compared in one
    call (each costs about 50 bytes meanwhile)."""
    cls = grouping.cls.copy()
    group, sizes = grouping.group, grouping.sizes
    vm, pos = grouping.vm.astype(np.int64), grouping.pos
    todo = np.flatnonzero(sizes[group] >= 2)
    todo = todo[cls[todo] != todo]
    colliding = np.zeros(len(sizes), dtype=np.bool_)
    while len(todo):
        parts = []
        for lo in range(0, len(todo), pairs_at_once):
            members = todo[lo : lo + pairs_at_once]
            reps = cls[members]
            parts.append(members[compare(vm[members], pos[members], vm[reps], pos[reps])])
        differ = np.concatenate(parts)
        if not len(differ):
            break
        colliding[group[differ]] = True
        # Members that differ from their representative form a new class in their group,
        # represented by the first of them (still the lowest (VM, position): order is kept).
        first = np.ones(len(differ), dtype=np.bool_)
        first[1:] = group[differ[1:]] != group[differ[:-1]]
        cls[differ] = differ[first][np.cumsum(first) - 1]
        todo = differ[~first]
    return dataclasses.replace(grouping, cls=cls), int(sizes[colliding].sum())


class DumpComparer:
    """A :class:`PageCompare` over open dumps (same order as the VMs).  Pages that lie
    uncompressed in the dumps' mappings are compared in place, in file order (``threads``
    threads: numpy lets go of the GIL); the others are read a batch at a time."""

    def __init__(self, dumps: Sequence[Dump], *, threads: int = 2, batch_pages: int = BATCH_PAGES) -> None:
        self.dumps = dumps
        self.threads = max(1, threads)
        self.batch_pages = max(batch_pages, 2)
        self._mapped = [d.mapped_pages() for d in dumps]

    def __call__(self, vm_a: I64, pos_a: I64, vm_b: I64, pos_b: I64) -> Bool:
        differs = self._in_place(vm_a, pos_a, vm_b, pos_b)
        if differs is not None:
            return differs
        out = np.empty(len(vm_a), dtype=np.bool_)
        step = self.batch_pages // 2
        for lo in range(0, len(vm_a), step):
            s = slice(lo, lo + step)
            out[s] = self._copied(vm_a[s], pos_a[s], vm_b[s], pos_b[s])
        return out

    def _read(self, vm: I64, pos: I64) -> tuple[npt.NDArray[np.uint64], I64]:
        """The distinct pages at (vm, pos), read VM by VM in position order: ``(words, row)``
        with ``words[row[i]]`` pair i's page as uint64 words."""
        key = vm * (1 << 40) + pos
        uniq = unique(key)
        row = np.searchsorted(uniq, key)
        u_vm = uniq >> 40
        blocks = []
        for v in unique(u_vm).tolist():
            sel = uniq[u_vm == v] & ((1 << 40) - 1)
            gfns = np.asarray(self.dumps[v].gfns[sel], dtype=np.uint64)
            blocks.append(self.dumps[v].pages_at(gfns))
        pages = blocks[0] if len(blocks) == 1 else np.concatenate(blocks)
        return pages.view(np.uint64), row

    def _copied(self, vm_a: I64, pos_a: I64, vm_b: I64, pos_b: I64) -> Bool:
        words, row = self._read(np.concatenate((vm_a, vm_b)), np.concatenate((pos_a, pos_b)))
        n = len(vm_a)
        a, b = row[:n], row[n:]
        differs = np.empty(n, dtype=np.bool_)
        # A few hundred rows at a time: the row copies then stay in the CPU cache.
        for lo in range(0, n, GATHER_STEP):
            hi = lo + GATHER_STEP
            differs[lo:hi] = (words[a[lo:hi]] != words[b[lo:hi]]).any(axis=1)
        return differs

    def _offsets(self, vm: I64, pos: I64) -> tuple[I64, dict[int, npt.NDArray[np.uint8]]] | None:
        off = np.empty(len(vm), dtype=np.int64)
        bufs: dict[int, npt.NDArray[np.uint8]] = {}
        for v in unique(vm).tolist():
            found = self._mapped[v]
            if found is None:
                return None
            bufs[v], offsets = found
            sel = vm == v
            off[sel] = offsets[pos[sel]]
        if len(off) and int(off.min()) < 0:
            return None  # a page assembled in memory or stored nowhere: compare copies
        return off, bufs

    def _in_place(self, vm_a: I64, pos_a: I64, vm_b: I64, pos_b: I64) -> Bool | None:
        """Pairs compared where they lie in the mappings (``None``: some page does not)."""
        found_a, found_b = self._offsets(vm_a, pos_a), self._offsets(vm_b, pos_b)
        if found_a is None or found_b is None:
            return None
        (off_a, bufs), (off_b, bufs_b) = found_a, found_b
        bufs.update(bufs_b)
        differs = np.empty(len(vm_a), dtype=np.bool_)
        if not len(vm_a):
            return differs
        n_vms = len(self.dumps)
        pair = vm_a * n_vms + vm_b
        order = np.lexsort((off_a, pair))
        pair, oa, ob = pair[order], off_a[order], off_b[order]
        tasks = _tasks(pair, oa, ob)

        def run(part: Sequence[tuple[I64, bool]]) -> None:
            for rows, as_run in part:
                first = int(rows[0])
                ba, bb = bufs[int(vm_a[order[first]])], bufs[int(vm_b[order[first]])]
                if as_run:
                    k = len(rows)
                    a = ba[int(oa[first]) : int(oa[first]) + k * PAGE_SIZE].view(np.uint64)
                    b = bb[int(ob[first]) : int(ob[first]) + k * PAGE_SIZE].view(np.uint64)
                    ne = np.not_equal(a, b)
                    differs[order[rows]] = ne.reshape(k, -1).any(axis=1) if ne.any() else False
                else:
                    a = gather_pages(ba, oa[rows]).view(np.uint64)
                    b = gather_pages(bb, ob[rows]).view(np.uint64)
                    differs[order[rows]] = (a != b).any(axis=1)

        threads = min(self.threads, max(1, len(tasks) // 8))
        map_in_threads(run, [tasks[t::threads] for t in range(threads)], threads)
        return differs


def _tasks(pair: I64, oa: I64, ob: I64) -> list[tuple[I64, bool]]:
    """Rows (in pair and file order) compared together, and whether they form a run: consecutive
    pages of one dump matching consecutive pages of another (identical guests lay out their
    kernel and page cache alike), compared as two contiguous blocks with no copy."""
    n = len(pair)
    new_run = np.ones(n, dtype=np.bool_)
    new_run[1:] = (pair[1:] != pair[:-1]) | (oa[1:] - oa[:-1] != PAGE_SIZE) | (ob[1:] - ob[:-1] != PAGE_SIZE)
    starts = np.flatnonzero(new_run)
    lengths = np.diff(np.append(starts, n))
    tasks: list[tuple[I64, bool]] = []
    long_run = lengths >= RUN_MIN_PAGES
    for s, k in zip(starts[long_run].tolist(), lengths[long_run].tolist(), strict=True):
        tasks.extend((np.arange(a, min(a + RUN_STEP, s + k)), True) for a in range(s, s + k, RUN_STEP))
    rest = np.flatnonzero(np.repeat(~long_run, lengths))
    for seg in np.split(rest, np.flatnonzero(np.diff(pair[rest])) + 1) if len(rest) else []:
        tasks.extend((seg[lo : lo + GATHER_STEP], False) for lo in range(0, len(seg), GATHER_STEP))
    return tasks


__all__ = ["DumpComparer", "PageCompare", "confirm_groups"]
