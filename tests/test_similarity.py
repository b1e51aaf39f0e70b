"""The paper's hash similarity detector: seeded aligned offsets, keys, bucket candidates."""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dengine_cli.arrays import ArrayHome
from dengine_cli.engine.similarity import (
    BLOCK_SIZE,
    DRAWN,
    MERGE_BYTES_PER_PAIR,
    HashSimilarityDetector,
    candidate_pairs,
    draw_blocks,
)
from dengine_cli.pages import PAGE_SIZE


def test_offsets_are_seeded_aligned_and_distinct() -> None:
    det = HashSimilarityDetector()
    assert (det.indexes, det.blocks_per_index, det.candidates) == (2, 1, 1)
    assert det.offsets == HashSimilarityDetector(seed=0).offsets
    assert len(det.offsets) == 2
    big = HashSimilarityDetector(indexes=8, blocks_per_index=8, seed=3)
    assert sorted(big.offsets) == list(range(0, PAGE_SIZE, BLOCK_SIZE))
    assert all(o % BLOCK_SIZE == 0 for o in det.offsets)
    others = {HashSimilarityDetector(seed=s).offsets for s in range(20)}
    assert len(others) > 10
    d = det.to_dict()
    assert d["offsets"] == list(det.offsets) and d["seed"] == 0 and d["block_size"] == 64


@pytest.mark.parametrize(("seed", "blocks"), sorted(DRAWN))
def test_the_written_out_draws_are_numpys(seed: int, blocks: int) -> None:
    # The table spares commands numpy.random's import; the offsets must be what it would draw.
    assert list(DRAWN[(seed, blocks)]) == draw_blocks(seed, blocks)
    det = HashSimilarityDetector(indexes=blocks, seed=seed)
    assert det.offsets == tuple(b * BLOCK_SIZE for b in draw_blocks(seed, blocks))


def test_the_default_plan_does_not_import_numpy_random(tmp_path: Path) -> None:
    # In a fresh interpreter: loading the default policies and drawing their detector.
    code = (
        "import sys; import dengine_cli.policies as p; p.named_policy('de').detector.offsets; "
        "print('numpy.random' in sys.modules)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=tmp_path
    )
    assert out.stdout.strip() == "False"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"indexes": 0}, "at least 1"),
        ({"candidates": 0}, "at least 1"),
        ({"indexes": 9, "blocks_per_index": 8}, "at most 64 blocks"),
        ({"seed": -1}, "negative"),
    ],
)
def test_bad_parameters(kwargs: dict[str, int], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        HashSimilarityDetector(**kwargs)


def test_keys_follow_the_hashed_blocks_only() -> None:
    det = HashSimilarityDetector(indexes=2, blocks_per_index=1, seed=1)
    rng = np.random.default_rng(0)
    page = rng.integers(0, 256, PAGE_SIZE, dtype=np.uint8)
    pages = np.stack([page] * 4)
    hashed = set()
    for o in det.offsets:
        hashed.update(range(o, o + BLOCK_SIZE))
    untouched = next(i for i in range(PAGE_SIZE) if i not in hashed)
    pages[1, untouched] ^= 1  # outside every hashed block: same keys
    pages[2, det.offsets[0] + 5] ^= 1  # inside index 0's block: key 0 differs, key 1 the same
    pages[3, det.offsets[1]] ^= 0x80
    keys = det.keys(pages)
    assert keys.shape == (4, 2)
    assert (keys[1] == keys[0]).all()
    assert keys[2, 0] != keys[0, 0] and keys[2, 1] == keys[0, 1]
    assert keys[3, 1] != keys[0, 1] and keys[3, 0] == keys[0, 0]
    # Rows of a batch give the same keys as the rows alone.
    assert (det.keys(pages, np.array([3, 1])) == keys[[3, 1]]).all()


def test_blocks_per_index_combine() -> None:
    det = HashSimilarityDetector(indexes=1, blocks_per_index=2, seed=4)
    rng = np.random.default_rng(1)
    pages = np.stack([rng.integers(0, 256, PAGE_SIZE, dtype=np.uint8)] * 3)
    pages[1, det.offsets[1] + 63] ^= 1
    keys = det.keys(pages)
    assert keys[0, 0] == keys[2, 0] != keys[1, 0]
    # Swapping the two blocks changes the key: the blocks are ordered.
    swapped = pages[0].copy()
    a, b = det.offsets
    swapped[a : a + 64], swapped[b : b + 64] = pages[0, b : b + 64], pages[0, a : a + 64].copy()
    assert det.keys(swapped[None])[0, 0] != keys[0, 0] or (pages[0, a : a + 64] == pages[0, b : b + 64]).all()


def brute_pairs(
    keys: np.ndarray, offered: np.ndarray, wants: np.ndarray, c: int, scope: np.ndarray | None
) -> set[tuple[int, int]]:
    buckets: dict[tuple[int, int, int], list[int]] = {}
    pairs = set()
    for i in range(len(keys)):
        if not offered[i]:
            continue
        for j in range(keys.shape[1]):
            b = buckets.setdefault((j, int(keys[i, j]), 0 if scope is None else int(scope[i])), [])
            if wants[i]:
                pairs.update((i, r) for r in b)
            if len(b) < c:
                b.append(i)
    return pairs


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(0, 60),
    k=st.integers(1, 3),
    c=st.integers(1, 3),
    distinct=st.integers(1, 6),
    seed=st.integers(0, 1000),
    scoped=st.booleans(),
    partitions=st.sampled_from([1, 2, 4, 16]),
    merged_by=st.sampled_from([None, 1, 3, 1000]),
)
def test_candidate_pairs_equal_a_sequential_scan(
    n: int, k: int, c: int, distinct: int, seed: int, scoped: bool, partitions: int, merged_by: int | None
) -> None:
    """``merged_by``: the pairs kept in files and merged that many codes at a time (None: in
    memory)."""
    # Keys spread over all 64 bits (a multiply by an odd constant is a bijection), so that
    # key ranges by top bits split the buckets between partitions.
    rng = np.random.default_rng(seed)
    with np.errstate(over="ignore"):
        keys = rng.integers(0, distinct, (n, k)).astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)
    offered = rng.random(n) < 0.8
    wants = offered & (rng.random(n) < 0.6)
    scope = rng.integers(0, 2, n) if scoped else None
    with tempfile.TemporaryDirectory() as folder:
        home = None
        if merged_by is not None:
            home = ArrayHome(Path(folder), work_bytes=merged_by * MERGE_BYTES_PER_PAIR, least_step=1)
        pages, refs = candidate_pairs(keys, offered, wants, c, scope, partitions=partitions, home=home)
        got = list(zip(pages.tolist(), refs.tolist(), strict=True))
        assert pages.dtype == refs.dtype == np.int64
        del pages, refs
    assert got == sorted(set(got))
    assert set(got) == brute_pairs(keys, offered, wants, c, scope)
    assert all(r < p for p, r in got)
