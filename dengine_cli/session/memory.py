"""How the session keeps within its memory limit (``--memory-limit``).

What a command holds per page, beyond the interpreter and its libraries (about 40 MiB):

================================  ==========================================================
what                              bytes per page, and where
================================  ==========================================================
page index (gfn, hash, check,     25, in a cache file mapped read-only (page cache, which the
zero flag)                        kernel can drop: not this process's memory); while a group
                                  of dumps is hashed, 17 in memory shared with the workers and
                                  16 of the open dumps' page tables
content ids                       4, in memory, or in a mapped temporary file past a quarter
                                  of the limit
sorted runs (hash, check,         20 per non-zero page, in memory, or spilled to files past a
position)                         quarter of the limit
one partition being grouped       about 100 per non-zero page of that partition, for each
                                  partition grouped at once: partitions are cut small enough;
                                  and 24 for the one settled partition that waits to be added
a plan's arrays (scope masks,     up to :data:`PLAN_BYTES_PER_PAGE`, in memory, or in mapped
offered pages, similarity keys,   temporary files past half the limit, worked through a
choices, per-page actions and     quarter of the limit at a time (:func:`plan_array_home`)
sizes)
================================  ==========================================================

So past the limit only a few bytes a page stay in memory, and the figures do not change: the
stages are the same, only where their arrays wait differs.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from dengine_cli.arrays import ArrayHome
from dengine_cli.errors import OutputError

if TYPE_CHECKING:
    from dengine_cli.engine.sharing.pipeline import Shape

#: The default limit: this fraction of the machine's physical memory.
DEFAULT_FRACTION = 0.25
#: Bytes per non-zero page while its partition is grouped (arrays and sort temporaries).
GROUP_BYTES_PER_PAGE = 100
#: Bytes per non-zero page of a sorted run (hash, check, position) and of its sort.
RUN_BYTES_PER_PAGE = 20
SORT_BYTES_PER_PAGE = 60
#: Partitions hold at most this many non-zero pages whatever the limit: grouping and settling a
#: partition sorts and gathers its arrays, which stay in the CPU's caches at this size (about 2
#: MiB of keys).  Measured over the 16-guest bench fleet (722 k non-zero pages, 2 CPUs), sharing
#: took 0.080 s in one partition, 0.061 in 4, 0.052 in 16 (45 k pages each) and 0.066 in 128 with
#: one thread; 0.068, 0.044, 0.036 and 0.073 s with two.  On the bench dumps (192 k) the same:
#: fastest at 24-48 k pages a partition.  Smaller partitions also let threads share the work.
PARTITION_PAGES = 1 << 16
#: Bytes per present page of the content ids.
ID_BYTES_PER_PAGE = 4


def physical_memory() -> int:
    """This machine's physical memory in bytes (8 GiB when it cannot be told)."""
    try:
        return int(os.sysconf("SC_PHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return 8 << 30


def default_memory_limit() -> int:
    """:data:`DEFAULT_FRACTION` of physical memory."""
    return int(physical_memory() * DEFAULT_FRACTION)


@dataclass(frozen=True)
class MemoryPlan:
    """Where the arrays of one sharing computation live, for ``limit`` bytes."""

    limit: int
    shape: Shape
    #: Sorted runs go to files.
    spill_runs: bool
    #: Content ids go to a mapped temporary file.
    ids_in_file: bool


def plan_memory(limit: int, total_pages: int, nonzero_pages: int, threads: int) -> MemoryPlan:
    """The :class:`MemoryPlan` for dumps of ``total_pages`` pages (``nonzero_pages`` of them
    not zero), ``threads`` partitions grouped at once, within ``limit`` bytes."""
    # Imported here: a command that finds its sharing cached needs none of the stages.
    from dengine_cli.engine.sharing.partitions import MAX_BITS
    from dengine_cli.engine.sharing.pipeline import Shape

    threads = max(1, threads)
    quarter = max(1, limit // 4)
    part_pages = min(PARTITION_PAGES, limit // 2 // (GROUP_BYTES_PER_PAGE * threads))
    part_pages = max(1 << 12, part_pages)
    bits = 0
    while (nonzero_pages >> bits) > part_pages and bits < MAX_BITS:
        bits += 1
    slice_pages = max(1 << 12, quarter // (SORT_BYTES_PER_PAGE * threads))
    return MemoryPlan(
        limit=limit,
        shape=Shape(bits=bits, slice_pages=slice_pages, threads=threads),
        spill_runs=nonzero_pages * RUN_BYTES_PER_PAGE > quarter,
        ids_in_file=total_pages * ID_BYTES_PER_PAGE > quarter,
    )


#: Bytes per page of a group of dumps hashed by forked workers: hashes, checks and zero flags
#: shared with the workers (17), and the open dumps' page tables (gfn and offset, 16).
INDEX_BYTES_PER_PAGE = 33


def index_group_pages(limit: int) -> int:
    """Pages hashed at once by forked workers when indexes are built: at most half the limit at
    :data:`INDEX_BYTES_PER_PAGE`."""
    return max(1 << 12, limit // 2 // INDEX_BYTES_PER_PAGE)


#: Bytes a plan holds per page of its dumps, at most: per page its scope masks and its action
#: and size (8, twice with a baseline policy), per offered page its VM, position, copies,
#: similarity keys and choices (about 60), per content its first holder and copies (12).
PLAN_BYTES_PER_PAGE = 64


def plan_array_home(limit: int, total_pages: int, directory: Path) -> ArrayHome:
    """Where a plan over ``total_pages`` pages keeps its per-page arrays within ``limit``: in
    memory when :data:`PLAN_BYTES_PER_PAGE` of them fit half of it, else in files under
    ``directory`` (made if missing), worked through a quarter of the limit at a time."""
    if total_pages * PLAN_BYTES_PER_PAGE <= limit // 2:
        return ArrayHome()
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise _cannot_hold(directory, e) from e
    return ArrayHome(directory, lambda e: _cannot_hold(directory, e), work_bytes=max(1, limit // 4))


def _cannot_hold(directory: Path, e: OSError) -> OutputError:
    return OutputError(directory, f"page arrays past the memory limit: {e.strerror or e}")
