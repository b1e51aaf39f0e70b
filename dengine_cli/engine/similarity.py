"""Finding similar pages, as the Difference Engine does (Gupta et al., OSDI 2008, section 4.2).

A page is summarized by the hashes of ``k * s`` 64-byte blocks taken at fixed pseudo-random
offsets of the page.  The blocks form ``k`` indexes of ``s`` blocks each: a page's key in index j
is a hash of its ``s`` block hashes of that index.  Two pages with the same key in some index are
*similar*: the later one (in scan order) may be stored as a patch against the earlier.  Each
bucket of an index keeps ``c`` candidate reference pages.  The paper's choice, and our default,
is ``(k, s) = (2, 1)``, ``c = 1``: two indexes of one block each, one candidate per bucket.

Semantics (deterministic and vectorized):

* Pages are taken in scan order: the VMs in the order given, then ascending gfn.
* The pages of a bucket are the pages offered to the index (reference-able pages: kept whole or
  patch candidates) that have that key; the bucket's candidates are the first ``c`` of them in
  scan order, as if the index were filled by one scan in which a full bucket keeps what it has.
* The candidates of a page are, over the ``k`` indexes, the candidates of its buckets that come
  before it in scan order (a page is never its own reference, and a reference is always seen
  before the page patched against it, so its fate is known when the page comes).

Offsets are 64-byte *aligned* blocks (block numbers 0..63 of a 4 KiB page) chosen without
repetition by a seeded :class:`numpy.random.Generator` (:func:`draw_blocks`).  The paper uses
random offsets; aligned ones lose nothing for similarity (a change of a few bytes touches a
given block with the same probability wherever the blocks lie) and let the block words be read
as aligned ``uint64`` columns of the page array, which is what makes the hashing run at millions
of pages a second.
The seed and the offsets are part of every plan's report.

Block hash: multiply-xor over the 8 little-endian 64-bit words of a block (``h = (h ^ w) * P``
with an odd 64-bit multiplier, then a final avalanche), computed as numpy column operations over
a whole batch.  It is not a cryptographic hash; a false match only costs a patch attempt, which
is measured and rejected when it does not pay.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from dengine_cli.arrays import ArrayHome, unique
from dengine_cli.pages import PAGE_SIZE, PageArray
from dengine_cli.parallel.threads import map_in_threads

#: Bytes per hashed block (the paper's choice).
BLOCK_SIZE = 64
BLOCKS_PER_PAGE = PAGE_SIZE // BLOCK_SIZE
WORDS_PER_BLOCK = BLOCK_SIZE // 8

# Odd 64-bit multipliers (from xxh64's primes) and the murmur3 finalizer constants.
_MUL = np.uint64(0x9E3779B185EBCA87)
_MUL2 = np.uint64(0xC2B2AE3D27D4EB4F)
_FMIX1 = np.uint64(0xFF51AFD7ED558CCD)
_FMIX2 = np.uint64(0xC4CEB9FE1A85EC53)
_S33 = np.uint64(33)

KeyArray = npt.NDArray[np.uint64]


def draw_blocks(seed: int, blocks: int) -> list[int]:
    """The block numbers of a detector: ``blocks`` of the page's 64, without repetition, drawn by
    ``numpy.random.default_rng(seed)``."""
    rng = np.random.default_rng(seed)
    return [int(b) for b in rng.choice(BLOCKS_PER_PAGE, size=blocks, replace=False)]


#: :func:`draw_blocks` of the default detectors (seed 0; k * s of 1 to 4), written out:
#: ``numpy.random`` took 10-14 ms to import, at every start of a command that loads a policy
#: (tests/test_similarity.py checks the table against the draw).
DRAWN: dict[tuple[int, int], tuple[int, ...]] = {
    (0, 1): (54,),
    (0, 2): (53, 40),
    (0, 3): (40, 32, 52),
    (0, 4): (17, 32, 51, 39),
}


def _avalanche(h: KeyArray) -> KeyArray:
    h ^= h >> _S33
    h *= _FMIX1
    h ^= h >> _S33
    h *= _FMIX2
    h ^= h >> _S33
    return h


@dataclass(frozen=True)
class HashSimilarityDetector:
    """The paper's hash-based similarity detector: ``indexes`` (k) indexes of
    ``blocks_per_index`` (s) 64-byte block hashes each, ``candidates`` (c) references kept per
    bucket, block offsets drawn from ``seed``."""

    indexes: int = 2
    blocks_per_index: int = 1
    candidates: int = 1
    seed: int = 0
    #: Byte offsets of the k * s blocks, index by index (derived from the seed).
    offsets: tuple[int, ...] = field(init=False)

    def __post_init__(self) -> None:
        if self.indexes < 1 or self.blocks_per_index < 1 or self.candidates < 1:
            raise ValueError("indexes, blocks_per_index and candidates must be at least 1")
        blocks = self.indexes * self.blocks_per_index
        if blocks > BLOCKS_PER_PAGE:
            raise ValueError(f"at most {BLOCKS_PER_PAGE} blocks per page (k * s = {blocks})")
        if self.seed < 0:
            raise ValueError("the seed must not be negative")
        chosen = DRAWN.get((self.seed, blocks))
        if chosen is None:
            chosen = tuple(draw_blocks(self.seed, blocks))
        object.__setattr__(self, "offsets", tuple(b * BLOCK_SIZE for b in chosen))

    @property
    def block_count(self) -> int:
        return self.indexes * self.blocks_per_index

    def keys(self, pages: PageArray, rows: npt.NDArray[np.integer[Any]] | None = None) -> KeyArray:
        """The ``(n, k)`` keys of a batch of pages (``(m, 4096) uint8``), or of its ``rows``:
        column j is the page's key in index j."""
        words = np.ascontiguousarray(pages).reshape(len(pages), PAGE_SIZE).view(np.uint64)
        cols = np.concatenate([np.arange(o // 8, o // 8 + WORDS_PER_BLOCK) for o in self.offsets]).astype(
            np.intp
        )
        # Only the hashed words are copied (k * s * 64 bytes per page), not the pages.
        sampled = words[:, cols] if rows is None else words[np.asarray(rows, dtype=np.intp)[:, None], cols]
        n = len(sampled)
        keys = np.empty((n, self.indexes), dtype=np.uint64)
        with np.errstate(over="ignore"):
            for j in range(self.indexes):
                key = np.full(n, np.uint64(j + 1) * _MUL2, dtype=np.uint64)
                for b in range(self.blocks_per_index):
                    first = (j * self.blocks_per_index + b) * WORDS_PER_BLOCK
                    h = np.full(n, np.uint64(b + 1), dtype=np.uint64)
                    for w in range(WORDS_PER_BLOCK):
                        h ^= sampled[:, first + w]
                        h *= _MUL
                    key ^= _avalanche(h)
                    key *= _MUL2
                keys[:, j] = _avalanche(key)
        return keys

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": "hash",
            "indexes": self.indexes,
            "blocks_per_index": self.blocks_per_index,
            "candidates_per_bucket": self.candidates,
            "block_size": BLOCK_SIZE,
            "seed": self.seed,
            "offsets": list(self.offsets),
        }


#: Bytes of temporaries per offered page while the pairs of one index (or one key partition of
#: it) are found: its keys gathered and sorted, the order, group starts, ranks and members.
PAIR_BYTES_PER_PAGE = 64


def candidate_pairs(
    keys: KeyArray,
    offered: npt.NDArray[np.bool_],
    wants: npt.NDArray[np.bool_],
    candidates: int,
    scope: npt.NDArray[np.integer[Any]] | None = None,
    *,
    partitions: int = 1,
    threads: int = 2,
    home: ArrayHome | None = None,
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    """The (page, reference) pairs of a scan, as two arrays of positions in scan order.

    ``keys`` is ``(n, k)`` for the n pages in scan order; ``offered[i]``: page i goes into the
    indexes (it may be a reference); ``wants[i]``: page i looks for references (a subset of the
    offered pages).  ``scope`` (one integer per page, e.g. its VM) keeps references within pages
    of the same value.  Pairs come sorted by page then reference, without repetition.

    ``partitions`` (a power of two): each index is worked through in that many ranges of its
    keys (by their top bits), so that the temporaries are those of one range at a time.  A
    bucket lies in one range, so the pairs are the same for any count.  ``threads``: how many
    indexes or ranges are worked through at once.  ``home``: where the pairs are kept; when it
    keeps arrays in files, so are the pairs of each range, and they are merged a range of
    pages at a time (:func:`_merged`), never all in memory (16 bytes a pair).
    """
    n, k = keys.shape
    if np.count_nonzero(offered) < 2:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty.copy()
    bits = max(0, int(partitions).bit_length() - 1)
    tasks = [(j, p) for j in range(k) for p in range(1 << bits)]
    in_files = home is not None and home.in_files

    def codes_of(task: tuple[int, int]) -> npt.NDArray[np.int64]:
        """The pairs of one index's key range, each as the code ``page * n + reference``
        (sorted and in ``home``'s files when it keeps arrays there)."""
        j, p = task
        members = _members(keys[:, j], offered, bits, p)
        page, ref = _bucket_pairs(keys[members, j], members, wants, candidates, scope)
        codes: npt.NDArray[np.int64] = page * n + ref
        if home is not None and in_files:
            codes = home.hold(np.sort(codes))
        return codes

    # The sorts in threads (numpy sorts without the GIL).
    found = map_in_threads(codes_of, tasks, max(1, min(len(tasks), threads)))
    if home is not None and in_files:
        return _merged(found, n, home)
    # Dedupe (a reference may be found through several indexes) and sort by page, then ref.
    combined = unique(np.concatenate(found))
    return combined // n, combined % n


#: Bytes of temporaries per pair code while sorted runs are merged: the slices of the runs
#: gathered, sorted, the mask of distinct codes and the distinct codes.
MERGE_BYTES_PER_PAIR = 32


def _merged(
    runs: list[npt.NDArray[np.int64]], n: int, home: ArrayHome
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    """The distinct codes of sorted ``runs`` (``page * n + reference``), in order, as pages and
    references made by ``home``: a range of codes at a time, each range the codes below a bound
    in every run (:func:`_merge_bounds`), so that equal codes meet in one range."""
    total = sum(len(r) for r in runs)
    step = home.step(MERGE_BYTES_PER_PAIR) or max(1, total)
    bounds = _merge_bounds(runs, -(-total // step))
    at = [0] * len(runs)
    merged: list[npt.NDArray[np.int64]] = []
    for bound in bounds:
        ends = [int(np.searchsorted(r, bound)) for r in runs]
        piece = unique(np.concatenate([r[a:e] for r, a, e in zip(runs, at, ends, strict=True)]))
        merged.append(home.hold(piece))
        at = ends
    pages = home.full(sum(len(m) for m in merged), 0, np.int64)
    refs = home.full(len(pages), 0, np.int64)
    lo = 0
    for m in merged:
        np.floor_divide(m, n, out=pages[lo : lo + len(m)])
        np.remainder(m, n, out=refs[lo : lo + len(m)])
        lo += len(m)
    return pages, refs


def _merge_bounds(runs: list[npt.NDArray[np.int64]], ranges: int) -> list[int]:
    """Codes that cut sorted ``runs`` into about ``ranges`` ranges of equal size (the last bound
    above every code): quantiles of a sample of every run's codes, 64 a range."""
    total = sum(len(r) for r in runs)
    every = max(1, total // (64 * max(1, ranges)))
    sample = np.sort(np.concatenate([r[::every] for r in runs] or [np.zeros(0, dtype=np.int64)]))
    cuts = [int(sample[len(sample) * j // ranges]) for j in range(1, ranges) if len(sample)]
    last = max((int(r[-1]) for r in runs if len(r)), default=-1) + 1
    return [*sorted(set(cuts)), last]


#: Pages looked at a time when the members of a key range are picked.
_MEMBER_STEP = 1 << 20


def _members(column: KeyArray, offered: npt.NDArray[np.bool_], bits: int, p: int) -> npt.NDArray[np.int64]:
    """Positions (ascending) of the offered pages whose key in ``column`` has top ``bits`` bits
    ``p`` (every offered page when ``bits`` is 0)."""
    if bits == 0:
        return np.flatnonzero(offered).astype(np.int64)
    shift = np.uint64(64 - bits)
    parts = []
    for lo in range(0, len(column), _MEMBER_STEP):
        hi = min(lo + _MEMBER_STEP, len(column))
        mine = offered[lo:hi] & ((column[lo:hi] >> shift) == np.uint64(p))
        parts.append(np.flatnonzero(mine) + lo)
    return np.concatenate(parts).astype(np.int64)


def _bucket_pairs(
    key: KeyArray,
    members: npt.NDArray[np.int64],
    wants: npt.NDArray[np.bool_],
    candidates: int,
    scope: npt.NDArray[np.integer[Any]] | None,
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    """The pairs one index gives among ``members`` (ascending positions, their keys ``key``):
    each wanting page with each of the first ``candidates`` earlier pages of its bucket."""
    if len(members) < 2:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty.copy()
    order = np.argsort(key, kind="stable") if scope is None else np.lexsort((key, scope[members]))
    sk = key[order]
    start = np.empty(len(order), dtype=np.bool_)
    start[0] = True
    np.not_equal(sk[1:], sk[:-1], out=start[1:])
    del sk
    if scope is not None:
        ss = scope[members][order]
        start[1:] |= ss[1:] != ss[:-1]
    group_start = np.flatnonzero(start)
    first = group_start[np.cumsum(start) - 1]
    rank = np.arange(len(order)) - first
    ordered = members[order]
    looking = wants[ordered]
    pages, refs = [], []
    for t in range(candidates):
        sel = looking & (rank > t)
        pages.append(ordered[sel])
        refs.append(ordered[first[sel] + t])
    return np.concatenate(pages), np.concatenate(refs)
