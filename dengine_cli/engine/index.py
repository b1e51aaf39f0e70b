"""The page index of a dump: for every present page its gfn, its 128-bit xxh3 hash (two 64-bit
halves) and whether it is all zeros, in four numpy arrays (25 bytes per page).

Two pages count as one content when their 128-bit hashes are equal (see docs/ARCHITECTURE.md,
"Why a 128-bit hash"): with n distinct non-zero contents, the chance that any two of them are
merged wrongly is below n * (n - 1) / 2 ** 129 (10 ** -21 for 10 ** 9 pages).  ``--verify``
compares the bytes of every merged page as well.

An index is what sharing groups pages by: it is built once per dump with one pass over its pages
(:func:`index_dump`, or :func:`hash_dump` over a page range, which the session spreads over
processes) and kept on disk by :mod:`dengine_cli.cache.index_store`, so that analysing the same
dumps again costs a read of 17 bytes per page instead of a read of 4096.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import xxhash

from dengine_cli.formats.base import Dump
from dengine_cli.pages import BATCH_PAGES, PAGE_SIZE, GfnArray, PageArray, _pagehash

#: The page hashers built here: ``"c"`` (``dengine_cli/_pagehash.c``), when it was built, and
#: ``"python"`` (xxhash called once a page); both give the same hashes and zero flags.
HASHERS: tuple[str, ...] = ("c", "python") if _pagehash is not None else ("python",)
#: The one that runs: the first of :data:`HASHERS`.
HASHER = HASHERS[0]

#: What the hashes are: xxh3-128 (seed 0) of the 4096 bytes of a page; ``hashes`` holds its high
#: 64 bits (what pages are sorted and partitioned by), ``check`` its low 64 bits.
HASH_NAME = "xxh3_128"

#: The hash of an all-zero page; zero pages carry it so the hash arrays need no holes.
ZERO_PAGE_HASH = xxhash.xxh3_128_intdigest(bytes(PAGE_SIZE)) >> 64
ZERO_PAGE_CHECK = xxhash.xxh3_128_intdigest(bytes(PAGE_SIZE)) & ((1 << 64) - 1)

HashArray = npt.NDArray[np.uint64]


ZeroArray = npt.NDArray[np.bool_]


#: ``on_progress(dump_name, pages_done, pages_total)``; called from the calling process only.
Progress = Callable[[str, int, int], None]


@dataclass(frozen=True, eq=False)
class PageIndex:
    """The index of one dump: per present page (ascending gfn) its gfn, the high (``hashes``) and
    low (``check``) 64 bits of its xxh3-128 hash, and its zero flag.

    ``facts`` summarizes the dump (its :class:`~dengine_cli.formats.base.GuestFacts` as a dict).
    ``loaded`` says the index was read from the cache rather than built; ``path`` is its cache
    file (``None`` when it could not be written, e.g. a read-only cache directory).
    """

    name: str
    gfns: GfnArray
    hashes: HashArray
    check: HashArray
    zero: ZeroArray
    facts: dict[str, Any] = field(default_factory=dict)
    loaded: bool = False
    path: Path | None = None
    #: The cache key it was stored or loaded under (the dump as it was): what names this exact
    #: dump content for caches built on indexes (:mod:`dengine_cli.cache.sharing_store`).
    key: dict[str, Any] | None = None

    @property
    def page_count(self) -> int:
        return len(self.gfns)

    @property
    def zero_pages(self) -> int:
        return int(np.count_nonzero(self.zero))


Hashed = tuple[HashArray, HashArray, ZeroArray]


def hash_pages(pages: PageArray, *, hasher: str = HASHER) -> Hashed:
    """``(hashes, check, zero)`` of a batch of pages (``(n, 4096) uint8``, rows at any stride):
    the high and low 64 bits of each page's xxh3-128 hash, and whether it is all zeros.

    Every page is hashed, and only the pages whose hash is the zero page's are then checked
    byte by byte: a page with any other hash cannot be zero, so the zero flag stays exact, and
    the batch is read once instead of twice (a vectorized zero test over every page, then xxh3
    over the others, cost 15-30 % more).  The hashes come from the C hasher
    (``dengine_cli/_pagehash.c``: one call a batch, without the GIL, rows at any stride)
    when it was built, else from a Python loop of xxhash calls (``hasher``: one of
    :data:`HASHERS`), the same hashes.
    """
    if hasher not in HASHERS:
        raise ValueError(f"page hasher {hasher!r} is not built here (built: {', '.join(HASHERS)})")
    n = len(pages)
    zero: ZeroArray = np.zeros(n, dtype=np.bool_)
    if not n:
        return np.empty(0, dtype=np.uint64), np.empty(0, dtype=np.uint64), zero
    if hasher == "c" and _pagehash is not None:
        if pages.strides[1:] != (1,):
            pages = np.ascontiguousarray(pages)
        hashes = np.empty(n, dtype=np.uint64)
        check = np.empty(n, dtype=np.uint64)
        _pagehash.hash_pages(pages, hashes, check, zero)
        return hashes, check, zero
    if not pages.flags.c_contiguous:
        pages = np.ascontiguousarray(pages)
    hashes, check = _hash_in_python(pages.reshape(-1), n)
    maybe = np.flatnonzero((hashes == ZERO_PAGE_HASH) & (check == ZERO_PAGE_CHECK))
    if len(maybe):
        zero[maybe] = _rows_zero(pages, maybe)
    return hashes, check, zero


def _hash_in_python(flat: npt.NDArray[np.uint8], n: int) -> tuple[HashArray, HashArray]:
    """The two hash halves of the ``n`` pages of contiguous ``flat``, one xxhash call a page."""
    views = _page_views(flat, n) or _slices(flat, n)
    # digest() is the 128-bit hash big-endian: its first 8 bytes are the high half.
    halves = np.frombuffer(b"".join(map(xxhash.xxh3_128_digest, views)), dtype=">u8").reshape(-1, 2)
    return halves[:, 0].astype(np.uint64), halves[:, 1].astype(np.uint64)


def _rows_zero(pages: PageArray, rows: npt.NDArray[np.intp]) -> npt.NDArray[np.bool_]:
    """Whether each of ``rows`` (ascending) of ``pages`` is all zeros.

    Few rows among many are gathered and reduced on their own (a copy of those rows only); rows
    close together are OR-reduced in place over the batch's 64-bit words, which reads every page
    from the first row to the last (``reduceat`` also reduces the gaps between the rows).  Three
    or more pages of span a row is where gathering is cheaper: it costs about three times as
    much per row as the in-place pass costs per page (0.7 against 0.23 us)."""
    words = pages.view(np.uint64).reshape(len(pages), -1)
    if 3 * len(rows) < int(rows[-1]) - int(rows[0]) + 1:
        gathered: npt.NDArray[np.bool_] = words[rows].max(axis=1) == 0
        return gathered
    flat = words.reshape(-1)
    per_page = PAGE_SIZE // 8
    bounds = np.stack((rows * per_page, rows * per_page + per_page), axis=1).reshape(-1)
    if bounds[-1] == len(flat):  # reduceat runs the last segment to the end by itself
        bounds = bounds[:-1]
    found: npt.NDArray[np.bool_] = np.bitwise_or.reduceat(flat, bounds)[::2] == 0
    return found


_seen = threading.local()


def _page_views(flat: npt.NDArray[np.uint8], n: int) -> list[memoryview] | None:
    """A memoryview of each page of ``flat``, kept (per thread) for the next batch in the same
    memory: :meth:`Dump.scan` reads every batch into one buffer, whose views are then made
    once, not once a batch (hashing 0.55 -> 0.33 us a page).  ``None`` the first time memory
    is seen: it may be a batch that is never seen again (a view of a mapping)."""
    key = (flat.ctypes.data, n)
    if getattr(_seen, "key", None) != key:
        _seen.key, _seen.views = key, None
        return None
    if _seen.views is None:
        data = flat.data
        _seen.views = [data[i : i + PAGE_SIZE] for i in range(0, n * PAGE_SIZE, PAGE_SIZE)]
    views: list[memoryview] = _seen.views
    return views


def _slices(flat: npt.NDArray[np.uint8], n: int) -> list[memoryview]:
    # Slicing a memoryview costs one small object per page and no copy (tobytes() copies;
    # iterating ndarray rows is 2.5x slower).
    data = flat.data
    return [data[i : i + PAGE_SIZE] for i in range(0, n * PAGE_SIZE, PAGE_SIZE)]


def hash_dump(
    dump: Dump,
    start: int = 0,
    stop: int | None = None,
    *,
    batch_pages: int = BATCH_PAGES,
    on_pages: Callable[[int], None] | None = None,
    hasher: str = HASHER,
) -> Hashed:
    """``(hashes, check, zero)`` of the pages at positions ``start:stop`` of ``dump.gfns``, read
    in batches of at most ``batch_pages``; ``on_pages(count)`` after each batch; ``hasher``: as
    for :func:`hash_pages`."""
    stop = dump.page_count if stop is None else min(stop, dump.page_count)
    n = max(stop - start, 0)
    hashes = np.empty(n, dtype=np.uint64)
    check = np.empty(n, dtype=np.uint64)
    zero = np.empty(n, dtype=np.bool_)
    at = 0
    # Read into a buffer (Dump.scan), not hashed where mapped (Dump.batches): a bare pass of the C
    # hasher over the 16-guest bench fleet's mapping beat pread (0.45 against 0.60 s), but in
    # `analyze` the mapped pass left sharing slower after it (0.10 against 0.08 s at -j 2: the
    # unmapping of what the workers touched) and the whole came out level (see ARCHITECTURE.md).
    for batch in dump.scan(batch_pages, start=start, stop=stop):
        k = len(batch)
        hashes[at : at + k], check[at : at + k], zero[at : at + k] = hash_pages(batch.pages, hasher=hasher)
        at += k
        if on_pages is not None:
            on_pages(k)
    if at != n:
        raise ValueError(f"{dump.name}: batches gave {at} pages, expected {n}")
    return hashes, check, zero


def index_dump(
    dump: Dump, *, batch_pages: int = BATCH_PAGES, on_progress: Progress | None = None
) -> PageIndex:
    """Build the index of an open dump in memory (no cache)."""
    total = dump.page_count
    done = 0

    def step(k: int) -> None:
        nonlocal done
        done += k
        if on_progress is not None:
            on_progress(dump.name, done, total)

    hashes, check, zero = hash_dump(dump, batch_pages=batch_pages, on_pages=step)
    return PageIndex(dump.name, dump.gfns, hashes, check, zero, facts_of(dump))


# --- the cache -------------------------------------------------------------------------------


def facts_of(dump: Dump) -> dict[str, Any]:
    facts: dict[str, Any] = json.loads(json.dumps(dump.facts.to_dict(), default=str))
    return facts
