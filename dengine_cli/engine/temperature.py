"""Page temperature from history: which pages of a VM changed since an earlier snapshot of it.

The Difference Engine patches and compresses only pages that have not been used recently (it
reads the NRU bits of the page tables).  A dump holds no access bits, but two snapshots of the same
VM tell which pages were *written* in between: a page present now is **hot** when it was absent
from the earlier snapshot or its content differs.  Hot pages are only shared, never patched or
compressed.  Reads leave no trace in memory, so pages only read in between count as cold: with
history a plan is closer to the truth, not a guarantee; without history every page is cold and the
plan's savings are an upper bound.

Pages whose 128-bit hashes differ are hot; pages at the same gfn with equal hashes are cold (the
bound of docs/ARCHITECTURE.md, "Why a 128-bit hash"), or with ``verify`` compared byte by byte
(both dumps read in batches of gfns), so that not even a collision makes a changed page cold.
Zero pages known zero in both indexes are equal without reading.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from dengine_cli.engine.index import PageIndex
from dengine_cli.formats.base import Dump
from dengine_cli.pages import BATCH_PAGES

HotMask = npt.NDArray[np.bool_]


def hot_pages(
    current: Dump,
    current_index: PageIndex,
    earlier: Dump,
    earlier_index: PageIndex,
    *,
    verify: bool = False,
    batch_pages: int = BATCH_PAGES,
) -> HotMask:
    """For each present page of ``current`` (ascending gfn): whether it is hot, i.e. absent from
    ``earlier`` or with different content there: a different 128-bit hash, or with ``verify``
    different bytes (pages are then compared, ``batch_pages`` at a time)."""
    gfns = current_index.gfns
    n = len(gfns)
    hot = np.ones(n, dtype=np.bool_)
    if n == 0 or earlier_index.page_count == 0:
        return hot
    at = np.searchsorted(earlier_index.gfns, gfns)
    inside = at < earlier_index.page_count
    before = np.zeros(n, dtype=np.bool_)
    before[inside] = earlier_index.gfns[at[inside]] == gfns[inside]
    same_hash = np.zeros(n, dtype=np.bool_)
    same_hash[before] = (earlier_index.hashes[at[before]] == current_index.hashes[before]) & (
        earlier_index.check[at[before]] == current_index.check[before]
    )
    hot[same_hash] = False
    if not verify:
        return hot
    both_zero = np.zeros(n, dtype=np.bool_)
    both_zero[same_hash] = (
        np.asarray(current_index.zero)[same_hash] & np.asarray(earlier_index.zero)[at[same_hash]]
    )
    confirm = np.flatnonzero(same_hash & ~both_zero)
    step = max(batch_pages // 2, 1)
    for lo in range(0, len(confirm), step):
        pos = confirm[lo : lo + step]
        picked = np.asarray(gfns[pos], dtype=np.uint64)
        now = current.pages_at(picked).view(np.uint64)
        then = earlier.pages_at(picked).view(np.uint64)
        hot[pos] = (now != then).any(axis=1)
    return hot
