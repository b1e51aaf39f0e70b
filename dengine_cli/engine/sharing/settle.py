"""The last stages of sharing: count each partition, then add the partitions up.

:func:`settle` turns one partition's grouping into its sums (per VM: shared within, shared
across, kept, unique; the KSM counts; the pairwise matrix) and the content id of each of its
pages, numbered 0.. within the partition.  :class:`SharingTotals` adds the sums of every
partition (in hash order, so that content ids are numbered the same whatever the number of
partitions) and gives the :class:`~dengine_cli.engine.sharing.model.SharingReport`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from dengine_cli.engine.sharing.model import ContentIds, CopyCounts, SharingReport, VmSharing
from dengine_cli.engine.sharing.partitions import I64, Grouping

#: Rows of the (content, VM) incidence matrix built at once when the matrix is summed.
MATRIX_ROWS = 1 << 16


@dataclass(frozen=True, eq=False)
class PartitionSums:
    """What one partition adds to the report.  ``ids[i]`` is the content (0.. within the
    partition, in hash order) of the page at position ``pos[i]`` of VM ``vm[i]``; the pages are
    in VM order, VM ``v``'s at ``vm_starts[v]:vm_starts[v + 1]`` (sorted here, in the worker
    that settles the partition, so that adding it up is only the writing of its ids)."""

    within: I64
    across: I64
    kept: I64
    unique: I64
    copy_counts: CopyCounts
    matrix: npt.NDArray[np.int64]
    contents: int
    collisions: int
    ids: I64
    vm: I64
    pos: I64
    vm_starts: I64


def settle(grouping: Grouping, n_vms: int, cross_vm: bool, collisions: int = 0) -> PartitionSums:
    """Stage 4: the :class:`PartitionSums` of a grouping (after :func:`~.confirm.confirm_groups` when
    matches are verified: ``collisions`` is what it found)."""
    cls, vm, pos = grouping.cls, grouping.vm, grouping.pos
    empty = np.zeros(n_vms, dtype=np.int64)
    if not len(cls):
        nothing = np.zeros(0, dtype=np.int64)
        return PartitionSums(
            empty,
            empty,
            empty,
            empty,
            CopyCounts.none(),
            np.zeros((n_vms, n_vms), np.int64),
            0,
            0,
            nothing,
            nothing,
            nothing,
            np.zeros(n_vms + 1, dtype=np.int64),
        )
    # Members of one content together, in (VM, position) order.  Without a split group they
    # already are (each member's class is the first member of its hash group).
    if len(cls) < 2 or bool(np.all(cls[1:] >= cls[:-1])):
        c, v, p = cls, vm.astype(np.int64), pos
    else:
        by_content = np.argsort(cls, kind="stable")
        c, v, p = cls[by_content], vm[by_content].astype(np.int64), pos[by_content]
    first_in_content = np.ones(len(c), dtype=np.bool_)
    first_in_content[1:] = c[1:] != c[:-1]
    first_in_vm = first_in_content.copy()
    first_in_vm[1:] |= v[1:] != v[:-1]
    content = np.cumsum(first_in_content) - 1
    n_contents = int(content[-1]) + 1
    copies = np.bincount(content, minlength=n_contents)
    kept = first_in_content if cross_vm else first_in_vm
    by_vm = np.argsort(v.astype(np.uint16) if n_vms <= 1 << 16 else v, kind="stable")
    return PartitionSums(
        within=np.bincount(v[~first_in_vm], minlength=n_vms),
        across=np.bincount(v[first_in_vm & ~first_in_content], minlength=n_vms) if cross_vm else empty,
        kept=np.bincount(v[kept], minlength=n_vms),
        unique=np.bincount(v[kept & (copies[content] == 1)], minlength=n_vms),
        copy_counts=CopyCounts.of(copies),
        matrix=_matrix(content[first_in_vm], v[first_in_vm], n_contents, n_vms),
        contents=n_contents,
        collisions=collisions,
        ids=content[by_vm],
        vm=v[by_vm],
        pos=p[by_vm],
        vm_starts=np.searchsorted(v[by_vm], np.arange(n_vms + 1)),
    )


def _matrix(content: I64, v: I64, n_contents: int, n_vms: int) -> npt.NDArray[np.int64]:
    """B^T B, B the (content, VM) incidence of the contents present in two or more VMs, built a
    chunk of contents at a time (float32: exact, as a chunk has fewer than 2**24 rows)."""
    matrix = np.zeros((n_vms, n_vms), dtype=np.int64)
    vms_per_content = np.bincount(content, minlength=n_contents)
    multi = vms_per_content[content] >= 2
    content, v = content[multi], v[multi]
    if not len(content):
        return matrix
    # Renumber the contents that remain 0..k-1 (they are sorted).
    row = np.cumsum(np.concatenate(([True], content[1:] != content[:-1]))) - 1
    n_rows = int(row[-1]) + 1
    rows_per_chunk = max(1, min(MATRIX_ROWS, (1 << 26) // (4 * n_vms)))
    cuts = np.append(np.searchsorted(row, np.arange(0, n_rows, rows_per_chunk)), len(row))
    for lo, hi in zip(cuts[:-1].tolist(), cuts[1:].tolist(), strict=True):
        first_row = int(row[lo])
        incidence = np.zeros((int(row[hi - 1]) - first_row + 1, n_vms), dtype=np.float32)
        incidence[row[lo:hi] - first_row, v[lo:hi]] = 1.0
        matrix += (incidence.T @ incidence).astype(np.int64)
    return matrix


class SharingTotals:
    """The sums of every partition, added in hash order; content ids are written into
    ``content_ids`` (one array per VM, zeros to start with: 0 is the zero page), which may be
    mapped files."""

    def __init__(
        self,
        names: Sequence[str],
        present: Sequence[int],
        zero: Sequence[int],
        content_ids: Sequence[ContentIds],
        *,
        cross_vm: bool,
        hash_bits: int = 128,
        verified: bool = False,
    ) -> None:
        n_vms = len(names)
        self.names = list(names)
        self.present = np.array(present, dtype=np.int64)
        self.zero = np.array(zero, dtype=np.int64)
        self.content_ids = list(content_ids)
        self.cross_vm = cross_vm
        self.hash_bits = hash_bits
        self.verified = verified
        self.within = np.zeros(n_vms, dtype=np.int64)
        self.across = np.zeros(n_vms, dtype=np.int64)
        self.kept = np.zeros(n_vms, dtype=np.int64)
        self.unique = np.zeros(n_vms, dtype=np.int64)
        self.matrix = np.zeros((n_vms, n_vms), dtype=np.int64)
        self.copy_counts = CopyCounts.none()
        self.collisions = 0
        self.next_id = 1

    def add(self, sums: PartitionSums) -> None:
        """Add the next partition (in hash order)."""
        self.within += sums.within
        self.across += sums.across
        self.kept += sums.kept
        self.unique += sums.unique
        self.copy_counts += sums.copy_counts
        self.matrix += sums.matrix
        self.collisions += sums.collisions
        starts = sums.vm_starts
        for v in np.flatnonzero(np.diff(starts)).tolist():
            lo, hi = int(starts[v]), int(starts[v + 1])
            ids = self.content_ids[v]
            ids[sums.pos[lo:hi]] = sums.ids[lo:hi] + self.next_id
        self.next_id += sums.contents

    def report(self) -> SharingReport:
        vms = tuple(
            VmSharing(
                name=name,
                present=int(self.present[k]),
                zero=int(self.zero[k]),
                shared_within=int(self.within[k]),
                shared_across=int(self.across[k]),
                kept=int(self.kept[k]),
                unique=int(self.unique[k]),
            )
            for k, name in enumerate(self.names)
        )
        fields = [f.name for f in dataclasses.fields(VmSharing) if f.name != "name"]
        total = VmSharing("total", **{f: sum(getattr(vm, f) for vm in vms) for f in fields})
        matrix = self.matrix.copy()
        np.fill_diagonal(matrix, self.within)
        return SharingReport(
            vms=vms,
            total=total,
            copy_counts=self.copy_counts,
            matrix=matrix,
            contents=self.next_id - 1,
            collisions=self.collisions,
            cross_vm=self.cross_vm,
            hash_bits=self.hash_bits,
            content_ids=tuple(self.content_ids),
            verified=self.verified,
        )
