"""The stages of :mod:`dengine_cli.engine.sharing` run one after the other: :func:`share`."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from dengine_cli.engine.index import PageIndex, Progress
from dengine_cli.engine.sharing.confirm import DumpComparer, PageCompare, confirm_groups
from dengine_cli.engine.sharing.model import (
    KSM_RMAP_ITEM_BYTES,
    SCHEMA,
    ContentIds,
    KsmView,
    SharingReport,
    VmSharing,
)
from dengine_cli.engine.sharing.partitions import (
    MAX_BITS,
    RunPiece,
    SortedRun,
    gather,
    group_partition,
    sort_run,
)
from dengine_cli.engine.sharing.settle import PartitionSums, SharingTotals, settle
from dengine_cli.formats.base import Dump
from dengine_cli.parallel import Workers


class RunStore(Protocol):
    """Where sorted runs wait until their partitions are grouped."""

    def add(self, run: SortedRun) -> None: ...

    def pieces(self, p: int) -> list[RunPiece]:
        """Partition ``p``'s pieces, in the order the runs were added."""
        ...


class MemoryRuns:
    """A :class:`RunStore` in this process's memory (20 bytes a non-zero page)."""

    def __init__(self) -> None:
        self.runs: list[SortedRun] = []

    def add(self, run: SortedRun) -> None:
        self.runs.append(run)

    def pieces(self, p: int) -> list[RunPiece]:
        return [run.piece(p) for run in self.runs]


@dataclass(frozen=True)
class Shape:
    """How sharing is cut: ``2 ** bits`` partitions, index slices of ``slice_pages`` pages, and
    ``threads`` partitions (or slices) worked on at once."""

    bits: int = 0
    slice_pages: int = 1 << 22
    threads: int = 1

    def __post_init__(self) -> None:
        if not 0 <= self.bits <= MAX_BITS:
            raise ValueError(f"partition bits must be within 0..{MAX_BITS}")
        if self.slice_pages < 1 or self.threads < 1:
            raise ValueError("slice_pages and threads must be positive")

    @property
    def partitions(self) -> int:
        return 1 << self.bits


def share(
    indexes: Sequence[PageIndex],
    dumps: Sequence[Dump] | None = None,
    *,
    cross_vm: bool = True,
    verify: bool = False,
    shape: Shape | None = None,
    runs: RunStore | None = None,
    content_ids: Sequence[ContentIds] | None = None,
    compare: PageCompare | None = None,
    hash_bits: int = 128,
    on_progress: Progress | None = None,
) -> SharingReport:
    """The exact sharing of the VMs whose indexes are given, run stage by stage.

    ``verify``: compare the bytes of every page merged, through ``compare`` (default: a
    :class:`DumpComparer` over ``dumps``, same order as ``indexes``).  ``content_ids``: where
    to write each VM's content ids (default: new arrays).  ``hash_bits`` < 128 keeps only part
    of each hash (tests force collisions with it; only meaningful with ``verify``)."""
    shape = shape or Shape()
    if not 1 <= hash_bits <= 128:
        raise ValueError("hash_bits must be within 1..128")
    if verify and compare is None:
        if dumps is None or len(dumps) != len(indexes):
            raise ValueError("verifying needs one open dump per index")
        for index, dump in zip(indexes, dumps, strict=True):
            if index.page_count != dump.page_count:
                raise ValueError(
                    f"{dump.name}: the index has {index.page_count} pages, the dump {dump.page_count}"
                )
        compare = DumpComparer(dumps, threads=shape.threads)
    runs = runs if runs is not None else MemoryRuns()
    workers = Workers(jobs=shape.threads)
    slices = [
        (v, lo, min(lo + shape.slice_pages, ix.page_count))
        for v, ix in enumerate(indexes)
        for lo in range(0, ix.page_count, shape.slice_pages)
    ]

    def sorted_slice(s: tuple[int, int, int]) -> SortedRun:
        ix = indexes[s[0]]
        return sort_run(s[0], ix.hashes, ix.check, ix.zero, s[1], s[2], shape.bits)

    # Sorted by the threads (numpy sorts without the GIL) and stored in order by this one, while
    # they sort the next slices.
    for run in workers.stream(sorted_slice, slices):
        runs.add(run)
    totals = SharingTotals(
        [ix.name for ix in indexes],
        [ix.page_count for ix in indexes],
        [ix.zero_pages for ix in indexes],
        content_ids if content_ids is not None else _new_ids(indexes),
        cross_vm=cross_vm,
        hash_bits=hash_bits,
        verified=verify,
    )

    def one(p: int) -> PartitionSums:
        grouping = group_partition(gather(runs.pieces(p)), hash_bits)
        collisions = 0
        if compare is not None and verify:
            grouping, collisions = confirm_groups(grouping, compare)
        return settle(grouping, len(indexes), cross_vm, collisions)

    # Grouped and settled by the threads, added up in hash order by this one meanwhile.
    for p, sums in enumerate(workers.stream(one, range(shape.partitions))):
        totals.add(sums)
        if on_progress is not None:
            on_progress("sharing", p + 1, shape.partitions)
    return totals.report()


def _new_ids(indexes: Sequence[PageIndex]) -> list[ContentIds]:
    nonzero = sum(ix.page_count - ix.zero_pages for ix in indexes)
    id_type = np.uint32 if nonzero < (1 << 32) - 1 else np.uint64
    return [np.zeros(ix.page_count, dtype=id_type) for ix in indexes]


__all__ = [
    "KSM_RMAP_ITEM_BYTES",
    "SCHEMA",
    "ContentIds",
    "DumpComparer",
    "KsmView",
    "MemoryRuns",
    "PageCompare",
    "RunStore",
    "Shape",
    "SharingReport",
    "VmSharing",
    "share",
]
