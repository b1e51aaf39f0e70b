"""Sharing as stages over hash partitions: any cut of the work (partition count, slices, threads,
runs in memory or spilled to files, content ids in memory or in a mapped file) gives the very
same report, and that report equals an independent count of the pages' bytes."""

from __future__ import annotations

import multiprocessing
import tempfile
from collections import defaultdict
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from dengine_cli.cache.spill import SpilledRuns
from dengine_cli.engine.index import PageIndex, index_dump
from dengine_cli.engine.sharing.model import KsmModel, SharingReport
from dengine_cli.engine.sharing.partitions import (
    RunPiece,
    SortedRun,
    argsort_stable,
    gather,
    group_partition,
    partition_starts,
    sort_run,
)
from dengine_cli.engine.sharing.pipeline import MemoryRuns, Shape, share
from dengine_cli.engine.sharing.settle import PartitionSums, SharingTotals, settle
from dengine_cli.formats import open_dump
from dengine_cli.formats.base import Dump, OpenOptions
from tests.vms import design_vms, write_raw_images

RAW = OpenOptions(format="raw")


def indexed(tmp_path: Path, vms: list[np.ndarray]) -> tuple[list[PageIndex], list[Dump]]:
    dumps = [open_dump(p, RAW) for p in write_raw_images(tmp_path, vms)]
    return [index_dump(d) for d in dumps], dumps


def counted(vms: list[np.ndarray], cross_vm: bool = True) -> dict[str, list[int]]:
    """Per VM (zero, within, across, kept, unique) counted from the bytes with dicts."""
    first_vm: dict[bytes, int] = {}
    copies: dict[bytes, int] = defaultdict(int)
    for pages in vms:
        for row in pages:
            copies[row.tobytes()] += 1
    out: dict[str, list[int]] = {}
    zero = bytes(4096)
    for v, pages in enumerate(vms):
        seen: set[bytes] = set()
        z = within = across = kept = unique = 0
        for row in pages:
            b = row.tobytes()
            if b == zero:
                z += 1
            elif b in seen:
                within += 1
            else:
                seen.add(b)
                if cross_vm and b in first_vm:
                    across += 1
                else:
                    first_vm.setdefault(b, v)
                    kept += 1
                    unique += copies[b] == 1
        out[f"vm{v}"] = [z, within, across, kept, unique]
    return out


def figures(report: SharingReport) -> dict[str, list[int]]:
    return {
        f"vm{k}": [vm.zero, vm.shared_within, vm.shared_across, vm.kept, vm.unique]
        for k, vm in enumerate(report.vms)
    }


def same(a: SharingReport, b: SharingReport) -> None:
    assert a.to_dict() == b.to_dict()
    for x, y in zip(a.content_ids, b.content_ids, strict=True):
        assert np.array_equal(x, y)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    seed=st.integers(0, 2**16),
    sizes=st.lists(st.integers(1, 120), min_size=1, max_size=5),
    bits=st.integers(0, 5),
    slice_pages=st.sampled_from([1, 7, 64, 1 << 22]),
    threads=st.integers(1, 3),
    cross_vm=st.booleans(),
)
def test_any_cut_of_the_work_gives_the_same_report(
    tmp_path: Path, seed: int, sizes: list[int], bits: int, slice_pages: int, threads: int, cross_vm: bool
) -> None:
    vms = design_vms(seed, sizes)
    folder = Path(tempfile.mkdtemp(dir=tmp_path))
    indexes, dumps = indexed(folder, vms)
    try:
        whole = share(indexes, cross_vm=cross_vm)
        assert figures(whole) == counted(vms, cross_vm)
        shape = Shape(bits=bits, slice_pages=slice_pages, threads=threads)
        same(whole, share(indexes, cross_vm=cross_vm, shape=shape))
        with SpilledRuns(folder / "spill") as spilled:
            ids = [
                np.memmap(spilled.dir / f"ids{v}", np.uint32, "w+", shape=(ix.page_count,))
                for v, ix in enumerate(indexes)
            ]
            same(whole, share(indexes, cross_vm=cross_vm, shape=shape, runs=spilled, content_ids=ids))
            spill_dir = spilled.dir
        assert not spill_dir.exists()
        verified = share(indexes, dumps, cross_vm=cross_vm, verify=True, shape=shape)
        assert verified.verified and verified.collisions == 0
        assert figures(verified) == figures(whole)
    finally:
        for d in dumps:
            d.close()


def test_content_ids_are_numbered_in_hash_order(tmp_path: Path) -> None:
    vms = design_vms(3, [200, 150])
    indexes, dumps = indexed(tmp_path, vms)
    report = share(indexes, shape=Shape(bits=3))
    # Content c's hash is the hash of any page carrying id c; ids grow with the hash.
    by_id: dict[int, int] = {}
    for ix, ids in zip(indexes, report.content_ids, strict=True):
        for h, c in zip(ix.hashes.tolist(), ids.tolist(), strict=True):
            if c:
                assert by_id.setdefault(c, h) == h
    hashes = [by_id[c] for c in sorted(by_id)]
    assert hashes == sorted(hashes)
    assert len(by_id) == report.contents
    for d in dumps:
        d.close()


@pytest.mark.parametrize(("hash_bits", "collide"), [(1, True), (8, True), (64, False), (70, False)])
def test_forced_collisions_are_split_by_the_byte_compare(
    tmp_path: Path, hash_bits: int, collide: bool
) -> None:
    """1 and 8 bits: many contents share a hash, the byte compare splits them.  64 and 70: the
    high halves collide (0 and 6 bits of them left) and the groups are told apart by the low
    half alone, which sorting by the high half interleaves."""
    vms = design_vms(11, [300, 200, 100])
    indexes, dumps = indexed(tmp_path, vms)
    try:
        report = share(indexes, dumps, verify=True, hash_bits=hash_bits, shape=Shape(bits=2, threads=2))
        assert figures(report) == counted(vms)
        assert (report.collisions > 0) == collide
        exact = share(indexes)
        assert report.contents == exact.contents
        # The same partition of pages into contents (ids may be numbered otherwise).
        for a, b in zip(report.content_ids, exact.content_ids, strict=True):
            pairs = set(zip(a.tolist(), b.tolist(), strict=True))
            assert len({x for x, _ in pairs}) == len(pairs) == len({y for _, y in pairs})
    finally:
        for d in dumps:
            d.close()


def test_unverified_truncated_hashes_merge_wrongly(tmp_path: Path) -> None:
    """The bound is the hash's: with 1 bit of it, pages that differ are merged (this is what
    --verify is for), so the test of the byte compare above can fail."""
    vms = design_vms(11, [300, 200])
    indexes, dumps = indexed(tmp_path, vms)
    report = share(indexes, hash_bits=1)
    assert figures(report) != counted(vms)
    for d in dumps:
        d.close()


def test_runs_cut_by_hash_range() -> None:
    rng = np.random.default_rng(5)
    hashes = rng.integers(0, 2**64, 1000, dtype=np.uint64)
    check = rng.integers(0, 2**64, 1000, dtype=np.uint64)
    zero = rng.random(1000) < 0.3
    run = sort_run(0, hashes, check, zero, 100, 900, bits=3)
    starts = partition_starts(3)
    assert len(run.hashes) == int((~zero[100:900]).sum())
    assert np.all(run.hashes[1:] >= run.hashes[:-1])
    for p in range(8):
        piece = run.piece(p)
        assert np.all(piece.hashes >= starts[p])
        if p < 7:
            assert np.all(piece.hashes < starts[p + 1])
        assert np.array_equal(hashes[piece.positions.astype(np.int64)], piece.hashes)
    grouping = group_partition(gather([run.piece(p) for p in range(8)]))
    assert len(grouping) == len(run.hashes)


def test_empty_fleets_and_all_zero_vms(tmp_path: Path) -> None:
    vms = [np.zeros((1, 4096), np.uint8), np.zeros((5, 4096), np.uint8)]
    indexes, dumps = indexed(tmp_path, vms)
    runs = MemoryRuns()
    report = share(indexes, shape=Shape(bits=4), runs=runs)
    assert figures(report) == counted(vms)
    backed = report.with_ksm(KsmModel(zero_pages_backed=True)).ksm
    assert backed.pages_shared == 1 and backed.pages_sharing == 5
    assert report.contents == 0 and report.total.kept == 0
    for d in dumps:
        d.close()


@settings(max_examples=300, deadline=None)
@given(
    hnp.arrays(
        np.uint64,
        st.integers(0, 400),
        elements=st.one_of(st.integers(0, 6), st.integers(0, 2**64 - 1)).map(np.uint64),
    )
)
def test_argsort_stable_is_numpys_stable_argsort(keys: np.ndarray) -> None:
    """Quicksort with ties put back in row order gives exactly the stable order, whether ties
    are none, a few or most of the rows (then timsort is used)."""
    assert argsort_stable(keys).tolist() == np.argsort(keys, kind="stable").tolist()


def _sorted_run_apart(args: tuple[int, np.ndarray, np.ndarray, np.ndarray, int, int, int]) -> SortedRun:
    return sort_run(*args)


def _partition_apart(args: tuple[list[RunPiece], int, bool]) -> PartitionSums:
    pieces, n_vms, cross_vm = args
    return settle(group_partition(gather(pieces)), n_vms, cross_vm)


def test_stages_run_apart_in_fresh_processes(tmp_path: Path) -> None:
    """The stages as a cluster would run them: each in a fresh interpreter (spawned: no module
    state, no mapping, no open dump inherited), every input and output pickled across; the
    report is the one :func:`share` makes in this process."""
    vms = design_vms(7, [90, 60, 120])
    indexes, dumps = indexed(tmp_path, vms)
    for d in dumps:
        d.close()  # the stages need none
    whole = share(indexes)
    bits = 3
    arrays = [(np.array(ix.hashes), np.array(ix.check), np.array(ix.zero)) for ix in indexes]
    jobs = [(v, h, c, z, lo, min(lo + 50, len(h)), bits) for v, (h, c, z) in enumerate(arrays)
            for lo in range(0, len(h), 50)]  # fmt: skip
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(2, mp_context=context) as pool:
        runs = list(pool.map(_sorted_run_apart, jobs))
        partitions = [([run.piece(p) for run in runs], len(vms), True) for p in range(1 << bits)]
        sums = list(pool.map(_partition_apart, partitions))
    totals = SharingTotals(
        [ix.name for ix in indexes],
        [ix.page_count for ix in indexes],
        [ix.zero_pages for ix in indexes],
        [np.zeros(ix.page_count, dtype=np.uint32) for ix in indexes],
        cross_vm=True,
    )
    for s in sums:
        totals.add(s)
    same(whole, totals.report())
    assert figures(whole) == counted(vms)
