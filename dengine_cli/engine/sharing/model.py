"""Exact page sharing over several dumps: what identical-page sharing (ESX transparent page
sharing, KSM, the Difference Engine's first stage) saves when the VMs run on one host.

Pages are grouped by their xxh3-64 hash (from each dump's :class:`~dengine_cli.index.PageIndex`)
and every match is confirmed byte by byte against the page it would share, as ESX and the
Difference Engine do: two pages count as one content only when their 4096 bytes are equal.  A hash
group that turns out to hold several contents is split, and its pages are counted as collisions.
Zero pages are known zero from the index (a vectorized check of every byte) and are not compared
again.

Every present page gets a content id: 0 for the zero page, 1.. for the distinct non-zero contents.

Memory: grouping works on hash buckets (the low bits of the hash) of at most ``group_pages`` pages
at a time, so beyond the indexes it holds 8 bytes per page (a bucket order and the content ids)
plus a constant set by ``group_pages`` and ``batch_pages``; page contents are only read back, a
batch at a time, to confirm matches.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from dengine_cli.arrays import unique
from dengine_cli.engine.index import PageIndex, Progress
from dengine_cli.formats.base import Dump, gather_pages
from dengine_cli.pages import BATCH_PAGES, PAGE_SIZE
from dengine_cli.parallel.threads import map_in_threads

#: Version of the ``to_dict()`` form (the ``--json`` output of ``dengine analyze``).
SCHEMA = "dengine.analyze/1"


#: Threads that compare pages in place (numpy releases the GIL while it copies and compares).
CONFIRM_THREADS = min(4, os.cpu_count() or 1)


#: Runs of at least this many pages (consecutive in both dumps) are compared as two blocks;
#: runs are compared this many pages at a time (the temporary stays in the CPU cache).
RUN_MIN_PAGES = 4


RUN_STEP = 256


#: Other pairs are gathered (copied) this many at a time.
GATHER_STEP = 128


#: Pairs of pages compared in place at once (they are put in file order first).
IN_PLACE_PAIRS = 1 << 20


#: Pages grouped at once.  A bucket costs about 60 bytes per page while it is grouped.
GROUP_PAGES = 1 << 22


#: sizeof(struct ksm_rmap_item) on x86-64: rmap_list, anon_vma/nid, mm, address (4 x 8), oldchecksum
#: (+ age, remaining_skips in newer kernels; padded to 8) and a union of rb_node / {head, hlist}
#: (24): 64 bytes.  torvalds/linux mm/ksm.c.
KSM_RMAP_ITEM_BYTES = 64


ContentIds = npt.NDArray[np.unsignedinteger[Any]]


_I64 = npt.NDArray[np.int64]


_Bool = npt.NDArray[np.bool_]


@dataclass(frozen=True)
class VmSharing:
    """The sharing figures of one VM (or of all of them: ``name == "total"``), in pages.

    Each present page falls in exactly one of these classes, so
    ``present == zero + shared_within + shared_across + kept``:

    * ``zero``: all-zero pages.  They cost nothing: the hypervisor maps them to its zero page.
    * ``shared_within``: a non-zero page whose content already appears at a lower gfn of the
      same VM.
    * ``shared_across``: the first copy in this VM of a content that an earlier VM (in the order
      the dumps are given) also holds; the stored copy is charged to that earlier VM.  Always 0
      when sharing across VMs is off.
    * ``kept``: the rest, the copies that are stored: the first copy of each content in the first
      VM that holds it (without sharing across VMs: the first copy in each VM).
    * ``unique`` (a part of ``kept``): pages whose content appears exactly once in all the VMs.

    The footprint after sharing is ``kept`` pages; savings = 1 - footprint / present.
    """

    name: str
    present: int
    zero: int
    shared_within: int
    shared_across: int
    kept: int
    unique: int

    @property
    def footprint_bytes(self) -> int:
        return self.kept * PAGE_SIZE

    @property
    def savings(self) -> float:
        """The fraction of present memory sharing saves (0 for an empty dump)."""
        return 1.0 - self.kept / self.present if self.present else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "pages_present": self.present,
            "zero_pages": self.zero,
            "shared_within_vm": self.shared_within,
            "shared_across_vms": self.shared_across,
            "kept_pages": self.kept,
            "unique_pages": self.unique,
            "present_bytes": self.present * PAGE_SIZE,
            "footprint_bytes": self.footprint_bytes,
            "savings_percent": round(100.0 * self.savings, 4),
        }


@dataclass(frozen=True)
class KsmView:
    """What Linux KSM would report after merging every present page of all the VMs on one host
    (KSM has no salting: always across VMs).

    * ``pages_shared``: distinct contents with at least two copies (KSM pages).  The zero page
      counts like any other content: that is KSM's default (``use_zero_pages=0``).
    * ``pages_sharing``: copies beyond the first of those contents (page table entries that point
      to a KSM page instead of their own page).
    * ``rmap_items``: every present page.  An approximation: KSM allocates one rmap_item per page
      it scans, and we take it to scan every page of guest RAM.
    * ``general_profit``: bytes, as ``/sys/kernel/mm/ksm/general_profit`` computes it
      (mm/ksm.c, general_profit_show, Linux 6.1+)::

          pages_sharing * PAGE_SIZE - rmap_items * sizeof(struct ksm_rmap_item)

    ``ksm_max_page_sharing`` (default 256 mappings per KSM page) is not modelled: a content with
    n > 256 copies is one KSM page here, ceil(n / 256) in the kernel.
    """

    pages_shared: int
    pages_sharing: int
    rmap_items: int

    @property
    def general_profit(self) -> int:
        return self.pages_sharing * PAGE_SIZE - self.rmap_items * KSM_RMAP_ITEM_BYTES

    def to_dict(self) -> dict[str, Any]:
        return {
            "pages_shared": self.pages_shared,
            "pages_sharing": self.pages_sharing,
            "rmap_items": self.rmap_items,
            "rmap_item_bytes": KSM_RMAP_ITEM_BYTES,
            "general_profit_bytes": self.general_profit,
        }


@dataclass(frozen=True, eq=False)
class SharingReport:
    """Exact sharing over several VMs.

    ``matrix[i, j]`` (i != j) is the number of distinct non-zero contents present in both VM i
    and VM j: the pages saved by placing the two together.  ``matrix[i, i]`` is the pages VM i
    saves by sharing within itself (its ``shared_within``).

    ``collisions`` counts pages whose hash equals the hash of a page with different content
    (all pages of a hash group that holds more than one content); they are split by content, so
    they change no figure.  ``content_ids[v]`` is the content id of every present page of VM v
    (ascending gfn): 0 = zero page, then 1..``contents``.
    """

    vms: tuple[VmSharing, ...]
    total: VmSharing
    ksm: KsmView
    matrix: npt.NDArray[np.int64]
    contents: int
    collisions: int
    cross_vm: bool
    hash_bits: int
    content_ids: tuple[ContentIds, ...]

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": SCHEMA,
            "cross_vm": self.cross_vm,
            "page_size": PAGE_SIZE,
            "vms": [vm.to_dict() for vm in self.vms],
            "total": self.total.to_dict(),
            "distinct_contents": self.contents,
            "hash_collisions": self.collisions,
            "ksm": self.ksm.to_dict(),
            "matrix": {"names": [vm.name for vm in self.vms], "shared_pages": self.matrix.tolist()},
        }


def share(
    indexes: Sequence[PageIndex],
    dumps: Sequence[Dump],
    *,
    cross_vm: bool = True,
    batch_pages: int = BATCH_PAGES,
    group_pages: int = GROUP_PAGES,
    hash_bits: int = 64,
    on_progress: Progress | None = None,
) -> SharingReport:
    """The exact sharing of the VMs whose indexes and open dumps are given (same order).

    ``dumps`` are read only to confirm matches, ``batch_pages`` pages at a time.  ``hash_bits``
    keeps only the low bits of each hash: below 64 it forces collisions (for tests; the figures
    do not change, only ``collisions`` and the work of confirming).
    """
    if len(indexes) != len(dumps):
        raise ValueError("one open dump per index is needed")
    for index, dump in zip(indexes, dumps, strict=True):
        if index.page_count != dump.page_count:
            raise ValueError(
                f"{dump.name}: the index has {index.page_count} pages, the dump {dump.page_count}"
            )
    if not 1 <= hash_bits <= 64:
        raise ValueError("hash_bits must be within 1..64")
    grouper = _Grouper(indexes, dumps, cross_vm, batch_pages, max(group_pages, 1), hash_bits)
    grouper.run(on_progress)
    return grouper.report()


class _Grouper:
    """The state of one sharing analysis: per-VM counters, the matrix and the content ids,
    filled bucket by bucket."""

    def __init__(
        self,
        indexes: Sequence[PageIndex],
        dumps: Sequence[Dump],
        cross_vm: bool,
        batch_pages: int,
        group_pages: int,
        hash_bits: int,
    ) -> None:
        self.indexes = indexes
        self.dumps = dumps
        self._mapped = [d.mapped_pages() for d in dumps]
        self.cross_vm = cross_vm
        self.batch_pages = max(batch_pages, 2)
        self.group_pages = group_pages
        self.mask = np.uint64((1 << hash_bits) - 1)
        n_vms = len(indexes)
        self.n_vms = n_vms
        nonzero = sum(ix.page_count - ix.zero_pages for ix in indexes)
        # Enough buckets that each holds about group_pages pages; a power of two, so the bucket
        # of a hash is its low bits.
        buckets = 1
        while nonzero > buckets * group_pages and buckets < 1 << 15:
            buckets *= 2
        self.buckets = buckets
        total = sum(ix.page_count for ix in indexes)
        id_type = np.uint32 if nonzero < (1 << 32) - 1 else np.uint64
        self.content_ids: list[ContentIds] = [np.zeros(ix.page_count, dtype=id_type) for ix in indexes]
        self.next_id = 1
        self.zero = np.array([ix.zero_pages for ix in indexes], dtype=np.int64)
        self.present = np.array([ix.page_count for ix in indexes], dtype=np.int64)
        self.within = np.zeros(n_vms, dtype=np.int64)
        self.across = np.zeros(n_vms, dtype=np.int64)
        self.kept = np.zeros(n_vms, dtype=np.int64)
        self.unique = np.zeros(n_vms, dtype=np.int64)
        self.matrix = np.zeros((n_vms, n_vms), dtype=np.int64)
        self.ksm_shared = 0
        self.ksm_sharing = 0
        self.collisions = 0
        self.total_pages = total
        # Per VM: its non-zero pages ordered by bucket, and where each bucket starts.
        self.order: list[npt.NDArray[np.integer[Any]]] = []
        self.starts: list[_I64] = []

    # --- bucketing ---------------------------------------------------------------------------

    def _bucket_order(self) -> None:
        """Order every VM's non-zero pages by bucket, ascending positions within a bucket
        (4 bytes per page), with a counting sort done in chunks so that no temporary of a whole
        VM's size is made."""
        chunk = self.group_pages
        low_bits = np.uint64(self.buckets - 1)
        for ix in self.indexes:
            n = ix.page_count
            if self.buckets == 1:
                # One bucket (up to group_pages non-zero pages): the non-zero pages in order.
                whole: npt.NDArray[np.integer[Any]] = np.flatnonzero(~np.asarray(ix.zero))
                self.order.append(whole.astype(np.uint32) if n < 1 << 32 else whole)
                self.starts.append(np.array([0, len(whole)], dtype=np.int64))
                continue
            counts = np.zeros(self.buckets, dtype=np.int64)
            for lo in range(0, n, chunk):
                hashes = ix.hashes[lo : lo + chunk][~np.asarray(ix.zero[lo : lo + chunk])]
                counts += np.bincount(
                    (hashes & self.mask & low_bits).astype(np.int64), minlength=self.buckets
                )
            starts = np.concatenate(([0], np.cumsum(counts)))
            order: npt.NDArray[np.integer[Any]] = np.empty(
                int(starts[-1]), dtype=np.uint32 if n < 1 << 32 else np.int64
            )
            fill = starts[:-1].copy()
            for lo in range(0, n, chunk):
                keep = np.flatnonzero(~np.asarray(ix.zero[lo : lo + chunk]))
                bucket = (ix.hashes[lo : lo + chunk][keep] & self.mask & low_bits).astype(np.int64)
                by_bucket = np.argsort(bucket, kind="stable")
                bucket = bucket[by_bucket]
                c = np.bincount(bucket, minlength=self.buckets)
                run_start = np.concatenate(([0], np.cumsum(c)[:-1]))
                # Each page goes to its bucket's fill point plus its rank within the chunk's run.
                dest = fill[bucket] + np.arange(len(bucket)) - run_start[bucket]
                order[dest] = keep[by_bucket] + lo
                fill += c
            self.order.append(order)
            self.starts.append(starts.astype(np.int64))

    def run(self, on_progress: Progress | None) -> None:
        self._bucket_order()
        zero_total = int(self.zero.sum())
        if zero_total >= 2:
            self.ksm_shared += 1
            self.ksm_sharing += zero_total - 1
        for b in range(self.buckets):
            self._bucket(b)
            if on_progress is not None:
                on_progress("sharing", b + 1, self.buckets)
        self.order.clear()

    def _bucket(self, b: int) -> None:
        pos_parts: list[_I64] = []
        vm_parts: list[npt.NDArray[np.uint32]] = []
        hash_parts: list[npt.NDArray[np.uint64]] = []
        for v, ix in enumerate(self.indexes):
            lo, hi = int(self.starts[v][b]), int(self.starts[v][b + 1])
            if lo == hi:
                continue
            # Ascending positions: within a VM, members come in gfn order.
            pos = self.order[v][lo:hi].astype(np.int64)
            pos_parts.append(pos)
            vm_parts.append(np.full(len(pos), v, dtype=np.uint32))
            hash_parts.append(ix.hashes[pos] & self.mask)
        if not pos_parts:
            return
        hashes = np.concatenate(hash_parts)
        del hash_parts
        # Stable: equal hashes keep (vm, gfn) order, so each group's first member is its
        # lowest (vm, gfn).
        by_hash = np.argsort(hashes, kind="stable")
        hashes = hashes[by_hash]
        pos = np.concatenate(pos_parts)[by_hash]
        vm = np.concatenate(vm_parts)[by_hash]
        del pos_parts, vm_parts, by_hash
        m = len(hashes)
        group_start = np.empty(m, dtype=np.bool_)
        group_start[0] = True
        np.not_equal(hashes[1:], hashes[:-1], out=group_start[1:])
        del hashes
        group = np.cumsum(group_start) - 1
        starts = np.flatnonzero(group_start)
        del group_start
        sizes = np.diff(np.append(starts, m))
        # cls[i]: the member that represents i's content (the lowest (vm, gfn) holding it).
        cls = starts[group]
        self._confirm(cls, group, starts, sizes, vm, pos)
        self._count(cls, vm, pos)

    # --- confirmation --------------------------------------------------------------------------

    def _confirm(
        self, cls: _I64, group: _I64, starts: _I64, sizes: _I64, vm: npt.NDArray[np.uint32], pos: _I64
    ) -> None:
        """Compare every member of a group with two or more members to its representative,
        splitting groups that hold several contents (hash collisions)."""
        todo = np.flatnonzero(sizes[group] >= 2)
        todo = todo[cls[todo] != todo]
        colliding = np.zeros(len(starts), dtype=np.bool_)
        while len(todo):
            differ_parts: list[_I64] = []
            # In place, many pairs at once (their order is chosen for the memory's sake, and
            # each pair costs ~50 bytes meanwhile); else copies of a batch of pages at a time.
            step = IN_PLACE_PAIRS
            lo = 0
            while lo < len(todo):
                members = todo[lo : lo + step]
                differs = None
                if step == IN_PLACE_PAIRS:
                    differs = self._differs_in_place(members, cls[members], vm, pos)
                if differs is None:
                    step = self.batch_pages // 2
                    members = todo[lo : lo + step]
                    differs = self._differs(members, cls[members], vm, pos)
                differ_parts.append(members[differs])
                lo += len(members)
            differ = np.concatenate(differ_parts)
            if not len(differ):
                break
            colliding[group[differ]] = True
            # Members that differ from their representative form a new class in their group,
            # represented by the first of them (still the lowest (vm, gfn), as order is kept).
            first = np.empty(len(differ), dtype=np.bool_)
            first[0] = True
            np.not_equal(group[differ[1:]], group[differ[:-1]], out=first[1:])
            rep = differ[first][np.cumsum(first) - 1]
            cls[differ] = rep
            todo = differ[~first]
        self.collisions += int(sizes[colliding].sum())

    def _differs(self, members: _I64, reps: _I64, vm: npt.NDArray[np.uint32], pos: _I64) -> _Bool:
        """Whether each member's page differs from its representative's, reading both (a copy
        of each page, gathered dump by dump in gfn order)."""
        needed = unique(np.concatenate((members, reps)))
        # Read VM by VM in gfn order, the dumps' fastest way; row k of ``pages`` holds the page
        # of member ``needed[by_place[k]]``.
        by_place = np.lexsort((pos[needed], vm[needed]))
        place_vm = vm[needed][by_place]
        cuts = np.flatnonzero(place_vm[1:] != place_vm[:-1]) + 1
        blocks = []
        for seg in np.split(by_place, cuts):
            v = int(vm[needed[seg[0]]])
            gfns = self.indexes[v].gfns[pos[needed[seg]]]
            blocks.append(self.dumps[v].pages_at(np.asarray(gfns, dtype=np.uint64)))
        pages = blocks[0] if len(blocks) == 1 else np.concatenate(blocks)
        del blocks
        row = np.empty(len(needed), dtype=np.int64)
        row[by_place] = np.arange(len(needed))
        words = pages.view(np.uint64)
        a = row[np.searchsorted(needed, members)]
        r = row[np.searchsorted(needed, reps)]
        differs = np.empty(len(members), dtype=np.bool_)
        # Compared a few hundred rows at a time: the row copies fancy indexing makes then stay in
        # the CPU cache (2.4x faster than one compare of the whole chunk).
        step = 128
        for lo in range(0, len(members), step):
            hi = lo + step
            differs[lo:hi] = (words[a[lo:hi]] != words[r[lo:hi]]).any(axis=1)
        return differs

    def _differs_in_place(
        self, members: _I64, reps: _I64, vm: npt.NDArray[np.uint32], pos: _I64
    ) -> _Bool | None:
        """:meth:`_differs` for pages that all lie uncompressed in the dumps' mappings: compared
        where they are, with no copy of the pages gathered first (``None``: not the case)."""
        vm_m, vm_r = vm[members].astype(np.int64), vm[reps].astype(np.int64)
        off_m = np.empty(len(members), dtype=np.int64)
        off_r = np.empty(len(members), dtype=np.int64)
        bufs: dict[int, npt.NDArray[np.uint8]] = {}
        # (Not np.unique: its first call imports numpy.ma, 12 ms.)
        for v in np.flatnonzero(np.bincount(np.concatenate((vm_m, vm_r)))).tolist():
            found = self._mapped[v]
            if found is None:
                return None
            bufs[v], offsets = found
            sel = vm_m == v
            off_m[sel] = offsets[pos[members[sel]]]
            sel = vm_r == v
            off_r[sel] = offsets[pos[reps[sel]]]
        if len(members) and (int(off_m.min()) < 0 or int(off_r.min()) < 0):
            return None  # a page assembled in memory or stored nowhere: compare copies instead
        differs = np.empty(len(members), dtype=np.bool_)
        if not len(members):
            return differs
        # Pairs of the same two dumps together, in the members' file order.
        pair = vm_m * self.n_vms + vm_r
        if int(off_m.max()) < 1 << 40 and self.n_vms**2 < 1 << 22:
            order = np.argsort((pair << 40) | off_m)  # one key: 3x faster than lexsort
        else:
            order = np.lexsort((off_m, pair))
        pair, om, orr = pair[order], off_m[order], off_r[order]
        # Runs: consecutive pages of one dump matching consecutive pages of another (identical
        # guests lay out their kernel and page cache alike: 92% of the pairs of four Debian
        # guests).  A run is compared as two contiguous blocks, read front to back, with no
        # copy; the other pairs are gathered a few hundred at a time.
        new_run = np.ones(len(order), dtype=np.bool_)
        new_run[1:] = (
            (pair[1:] != pair[:-1]) | (om[1:] - om[:-1] != PAGE_SIZE) | (orr[1:] - orr[:-1] != PAGE_SIZE)
        )
        starts = np.flatnonzero(new_run)
        lengths = np.diff(np.append(starts, len(order)))
        # Tasks: rows of ``order`` compared together, and whether they form a run.
        tasks: list[tuple[_I64, bool]] = []
        long_run = lengths >= RUN_MIN_PAGES
        for s, k in zip(starts[long_run].tolist(), lengths[long_run].tolist(), strict=True):
            tasks.extend((np.arange(a, min(a + RUN_STEP, s + k)), True) for a in range(s, s + k, RUN_STEP))
        # The rest: rows of short runs, still grouped by pair in file order.
        rest = np.flatnonzero(np.repeat(~long_run, lengths))
        for seg in np.split(rest, np.flatnonzero(np.diff(pair[rest])) + 1) if len(rest) else []:
            tasks.extend((seg[lo : lo + GATHER_STEP], False) for lo in range(0, len(seg), GATHER_STEP))

        def compare(part: Sequence[tuple[_I64, bool]]) -> None:
            for rows, as_run in part:
                first = int(rows[0])
                bm, br = bufs[int(vm_m[order[first]])], bufs[int(vm_r[order[first]])]
                if as_run:
                    k = len(rows)
                    a = bm[int(om[first]) : int(om[first]) + k * PAGE_SIZE].view(np.uint64)
                    b = br[int(orr[first]) : int(orr[first]) + k * PAGE_SIZE].view(np.uint64)
                    ne = np.not_equal(a, b)
                    differs[order[rows]] = ne.reshape(k, -1).any(axis=1) if ne.any() else False
                else:
                    a = gather_pages(bm, om[rows]).view(np.uint64)
                    b = gather_pages(br, orr[rows]).view(np.uint64)
                    differs[order[rows]] = (a != b).any(axis=1)

        # numpy lets go of the GIL while it copies and compares, so threads share the work
        # across cores; each writes its own rows of ``differs``.
        threads = min(CONFIRM_THREADS, max(1, len(tasks) // 8))
        map_in_threads(compare, [tasks[t::threads] for t in range(threads)], threads)
        return differs

    # --- counting ------------------------------------------------------------------------------

    def _count(self, cls: _I64, vm: npt.NDArray[np.uint32], pos: _I64) -> None:
        n_vms = self.n_vms
        # Members of one content together, in (vm, gfn) order.  Without collisions they already
        # are (each member's class is the first member of its hash group).
        if len(cls) < 2 or bool(np.all(cls[1:] >= cls[:-1])):
            c, v, p = cls, vm.astype(np.int64), pos
        else:
            by_content = np.argsort(cls, kind="stable")
            c = cls[by_content]
            v = vm[by_content].astype(np.int64)
            p = pos[by_content]
            del by_content
        m = len(c)
        first_in_content = np.empty(m, dtype=np.bool_)
        first_in_content[0] = True
        np.not_equal(c[1:], c[:-1], out=first_in_content[1:])
        first_in_vm = first_in_content.copy()
        first_in_vm[1:] |= v[1:] != v[:-1]
        content = np.cumsum(first_in_content) - 1
        n_contents = int(content[-1]) + 1
        copies = np.bincount(content, minlength=n_contents)

        self.within += np.bincount(v[~first_in_vm], minlength=n_vms)
        if self.cross_vm:
            kept = first_in_content
            self.across += np.bincount(v[first_in_vm & ~first_in_content], minlength=n_vms)
        else:
            kept = first_in_vm
        self.kept += np.bincount(v[kept], minlength=n_vms)
        self.unique += np.bincount(v[kept & (copies[content] == 1)], minlength=n_vms)
        shared = copies >= 2
        self.ksm_shared += int(np.count_nonzero(shared))
        self.ksm_sharing += int((copies[shared] - 1).sum())

        self._assign_ids(content + self.next_id, v, p)
        self.next_id += n_contents
        self._accumulate_matrix(content[first_in_vm], v[first_in_vm], n_contents)

    def _assign_ids(self, ids: _I64, v: _I64, p: _I64) -> None:
        # Small unsigned keys make numpy's stable sort a radix sort.
        key = v.astype(np.uint16) if self.n_vms <= 1 << 16 else v
        by_vm = np.argsort(key, kind="stable")
        v_sorted = v[by_vm]
        bounds = np.searchsorted(v_sorted, np.arange(self.n_vms + 1))
        for k in np.flatnonzero(np.diff(bounds)).tolist():
            seg = by_vm[bounds[k] : bounds[k + 1]]
            self.content_ids[k][p[seg]] = ids[seg]

    def _accumulate_matrix(self, content: _I64, v: _I64, n_contents: int) -> None:
        """Add B^T B to the matrix, B the (content, vm) incidence of the contents present in two
        or more VMs, built a chunk of contents at a time (a batch-sized float32 array: exact, as
        a chunk has fewer than 2**24 rows)."""
        vms_per_content = np.bincount(content, minlength=n_contents)
        multi = vms_per_content[content] >= 2
        content, v = content[multi], v[multi]
        if not len(content):
            return
        # Renumber the contents that remain 0..k-1 (they are sorted).
        row = np.cumsum(np.concatenate(([True], content[1:] != content[:-1]))) - 1
        n_rows = int(row[-1]) + 1
        rows_per_chunk = max(1, min(1 << 23, self.batch_pages * PAGE_SIZE // (4 * self.n_vms)))
        cuts = np.searchsorted(row, np.arange(0, n_rows, rows_per_chunk))
        cuts = np.append(cuts, len(row))
        for lo, hi in zip(cuts[:-1].tolist(), cuts[1:].tolist(), strict=True):
            first_row = int(row[lo])
            incidence = np.zeros((int(row[hi - 1]) - first_row + 1, self.n_vms), dtype=np.float32)
            incidence[row[lo:hi] - first_row, v[lo:hi]] = 1.0
            self.matrix += (incidence.T @ incidence).astype(np.int64)

    # --- result --------------------------------------------------------------------------------

    def report(self) -> SharingReport:
        vms = tuple(
            VmSharing(
                name=self.dumps[k].name,
                present=int(self.present[k]),
                zero=int(self.zero[k]),
                shared_within=int(self.within[k]),
                shared_across=int(self.across[k]),
                kept=int(self.kept[k]),
                unique=int(self.unique[k]),
            )
            for k, ix in enumerate(self.indexes)
        )
        total = VmSharing(
            name="total",
            **{
                f.name: sum(getattr(vm, f.name) for vm in vms)
                for f in dataclasses.fields(VmSharing)
                if f.name != "name"
            },
        )
        matrix = self.matrix.copy()
        np.fill_diagonal(matrix, self.within)
        return SharingReport(
            vms=vms,
            total=total,
            ksm=KsmView(self.ksm_shared, self.ksm_sharing, self.total_pages),
            matrix=matrix,
            contents=self.next_id - 1,
            collisions=self.collisions,
            cross_vm=self.cross_vm,
            hash_bits=int(self.mask).bit_length(),
            content_ids=tuple(self.content_ids),
        )
