"""Exact sharing over several dumps: every figure equals an independent count made with a plain
dict of page bytes -> [(vm, gfn)], with designed duplicates, zero pages and forced hash
collisions."""

from __future__ import annotations

import hashlib
import json
import tracemalloc
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import xxhash
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dengine_cli.cache.spill import SpilledRuns
from dengine_cli.engine.index import PageIndex, index_dump
from dengine_cli.engine.sharing import confirm
from dengine_cli.engine.sharing.model import KSM_RMAP_ITEM_BYTES, SCHEMA, KsmModel, SharingReport
from dengine_cli.engine.sharing.pipeline import Shape, share
from dengine_cli.formats import open_dump
from dengine_cli.formats.base import Dump, OpenOptions, Source
from dengine_cli.formats.raw import open_raw
from dengine_cli.pages import PAGE_SIZE
from dengine_cli.parallel import Workers
from dengine_cli.session import analyze
from dengine_cli.session.indexing import load_or_build
from tests.vms import design_vms, write_raw_image, write_raw_images

# --- building VMs ------------------------------------------------------------------------------


def open_all(paths: list[Path]) -> list[Dump]:
    return [open_raw(Source.of(p), OpenOptions()) for p in paths]


# --- the independent count ---------------------------------------------------------------------


def dict_count(
    vms: list[np.ndarray], cross_vm: bool = True, hash_bits: int = 128, verified: bool = True
) -> dict:
    """Every figure, counted the simple way."""
    where: dict[bytes, list[tuple[int, int]]] = defaultdict(list)
    for v, pages in enumerate(vms):
        for g in range(len(pages)):
            where[pages[g].tobytes()].append((v, g))
    zero = bytes(PAGE_SIZE)
    n = len(vms)
    fig = {k: [0] * n for k in ("present", "zero", "within", "across", "kept", "unique")}
    matrix = [[0] * n for _ in range(n)]
    ksm_shared = ksm_sharing = 0
    for content, places in where.items():
        # KSM by default: zero pages never backed, 256 mappings a KSM page at most.
        left = len(places) if content != zero else 0
        while left >= 2:
            held = min(left, 256)
            ksm_shared += 1
            ksm_sharing += held - 1
            left -= held
        for v, _ in places:
            fig["present"][v] += 1
        if content == zero:
            for v, _ in places:
                fig["zero"][v] += 1
            continue
        seen_vms: list[int] = []
        for v, _ in sorted(places):
            if v in seen_vms:
                fig["within"][v] += 1
            elif seen_vms and cross_vm:
                fig["across"][v] += 1
                seen_vms.append(v)
            else:
                fig["kept"][v] += 1
                if len(places) == 1:
                    fig["unique"][v] += 1
                seen_vms.append(v)
        for i in seen_vms:
            for j in seen_vms:
                if i != j:
                    matrix[i][j] += 1
    for v in range(n):
        matrix[v][v] = fig["within"][v]
    # Collisions: pages whose (truncated) hash is shared with a different non-zero content.
    by_hash: dict[int, set[bytes]] = defaultdict(set)
    count_of: dict[int, int] = defaultdict(int)
    mask = (1 << hash_bits) - 1
    for content, places in where.items():
        if content == zero:
            continue
        # What the stages group by: the low hash_bits of the 128-bit hash (below 64 bits, of
        # its low half alone).
        h = xxhash.xxh3_128_intdigest(content) & mask
        by_hash[h].add(content)
        count_of[h] += len(places)
    collisions = sum(count_of[h] for h, contents in by_hash.items() if len(contents) > 1) if verified else 0
    contents = sum(1 for c in where if c != zero)
    return {
        **fig,
        "matrix": matrix,
        "ksm": (ksm_shared, ksm_sharing),
        "collisions": collisions,
        "contents": contents,
        "where": where,
    }


def assert_figures(report: SharingReport, vms: list[np.ndarray], expected: dict) -> None:
    got = {
        "present": [vm.present for vm in report.vms],
        "zero": [vm.zero for vm in report.vms],
        "within": [vm.shared_within for vm in report.vms],
        "across": [vm.shared_across for vm in report.vms],
        "kept": [vm.kept for vm in report.vms],
        "unique": [vm.unique for vm in report.vms],
    }
    for k, values in got.items():
        assert values == expected[k], k
    assert report.matrix.tolist() == expected["matrix"]
    assert (report.ksm.pages_shared, report.ksm.pages_sharing) == expected["ksm"]
    assert report.collisions == expected["collisions"]
    assert report.contents == expected["contents"]
    # Content ids: one id per content, 0 for the zero page.
    id_of: dict[bytes, int] = {}
    for v, pages in enumerate(vms):
        ids = report.content_ids[v]
        assert len(ids) == len(pages)
        for g in range(len(pages)):
            b = pages[g].tobytes()
            assert id_of.setdefault(b, int(ids[g])) == int(ids[g])
    assert len(set(id_of.values())) == len(id_of)
    if bytes(PAGE_SIZE) in id_of:
        assert id_of[bytes(PAGE_SIZE)] == 0
    assert 0 not in {i for b, i in id_of.items() if b != bytes(PAGE_SIZE)}


def run_share(tmp_path: Path, vms: list[np.ndarray], bits: int = 0, **kwargs: object) -> SharingReport:
    """Share with every match compared byte by byte (so that forced collisions are split), in
    ``2 ** bits`` partitions; without verification the figures must be the same when the hash
    is whole."""
    dumps = open_all(write_raw_images(tmp_path, vms))
    indexes = [index_dump(d, batch_pages=64) for d in dumps]
    # A truncated hash is grouped within a partition only (partitions are cut by the whole
    # hash), while dict_count counts its collisions over all pages: one partition then.
    shape = Shape(bits=bits if kwargs.get("hash_bits", 128) == 128 else 0, slice_pages=50, threads=2)
    report = share(indexes, dumps, verify=True, shape=shape, **kwargs)  # type: ignore[arg-type]
    if kwargs.get("hash_bits", 128) == 128:
        trusted = share(indexes, cross_vm=bool(kwargs.get("cross_vm", True)), shape=shape)
        assert trusted.to_dict() | {"verified": True} == report.to_dict()
    return report


# --- tests -------------------------------------------------------------------------------------


def test_figures_equal_dict_count(tmp_path: Path) -> None:
    vms = design_vms(1, [300, 500, 200])
    report = run_share(tmp_path, vms, bits=3)  # several partitions
    expected = dict_count(vms)
    assert_figures(report, vms, expected)
    assert sum(expected["across"]) > 0 and sum(expected["within"]) > 0
    assert report.collisions == 0


def test_totals_equal_figures_over_all_vms(tmp_path: Path) -> None:
    vms = design_vms(2, [250, 250, 250, 100])
    report = run_share(tmp_path, vms)
    everything = dict_count([np.concatenate(vms)])
    t = report.total
    assert t.present == sum(len(p) for p in vms)
    assert t.zero == everything["zero"][0]
    # Over all VMs: the stored pages are the distinct non-zero contents.
    assert t.kept == everything["kept"][0] == report.contents
    assert t.unique == everything["unique"][0]
    assert t.shared_within + t.shared_across == everything["within"][0]
    assert t.present == t.zero + t.shared_within + t.shared_across + t.kept
    for vm in report.vms:
        assert vm.present == vm.zero + vm.shared_within + vm.shared_across + vm.kept
    assert t.footprint_bytes == t.kept * 4096
    assert t.savings == pytest.approx(1 - t.kept / t.present)


def test_without_cross_vm_sharing(tmp_path: Path) -> None:
    vms = design_vms(3, [300, 300, 300])
    report = run_share(tmp_path, vms, cross_vm=False)
    expected = dict_count(vms, cross_vm=False)
    assert_figures(report, vms, expected)
    assert [vm.shared_across for vm in report.vms] == [0, 0, 0]
    (tmp_path / "cross").mkdir()
    with_cross = run_share(tmp_path / "cross", vms)
    assert report.total.kept > with_cross.total.kept


def test_forced_collisions_give_the_same_figures(tmp_path: Path) -> None:
    vms = design_vms(4, [200, 300])
    exact = run_share(tmp_path, vms)
    forced = run_share(tmp_path, vms, hash_bits=3)
    expected = dict_count(vms, hash_bits=3)
    assert_figures(forced, vms, expected)
    assert forced.collisions == expected["collisions"] > 100
    same = {"hash_collisions": 0, "hash_bits": 128}
    assert exact.to_dict() | same == forced.to_dict() | same


def test_one_bit_hash_collides_everything(tmp_path: Path) -> None:
    vms = design_vms(5, [80, 80, 80])
    report = run_share(tmp_path, vms, hash_bits=1)
    assert_figures(report, vms, dict_count(vms, hash_bits=1))


def test_ksm_view(tmp_path: Path) -> None:
    vms = design_vms(6, [200, 200])
    report = run_share(tmp_path, vms)
    expected = dict_count(vms)
    zero = sum(expected["zero"])
    nonzero = sum(len(p) for p in vms) - zero
    assert zero >= 2 and report.contents < nonzero
    # By default the zero pages were never backed: KSM never saw them.
    ksm = report.ksm
    assert ksm.pages_sharing == nonzero - report.contents
    assert ksm.rmap_items == nonzero and ksm.ksm_zero_pages == 0 and ksm.zero_pages == zero
    assert ksm.general_profit == ksm.pages_sharing * 4096 - nonzero * KSM_RMAP_ITEM_BYTES
    # Backed, they are one more content (use_zero_pages=0) ...
    backed = report.with_ksm(KsmModel(zero_pages_backed=True)).ksm
    assert backed.pages_shared == ksm.pages_shared + 1
    assert backed.pages_sharing == (zero - 1) + (nonzero - report.contents)
    assert backed.rmap_items == 400
    assert backed.general_profit == backed.pages_sharing * 4096 - 400 * KSM_RMAP_ITEM_BYTES
    # ... or KSM zero pages, without rmap_items once merged (use_zero_pages=1).
    zero_merged = report.with_ksm(KsmModel(use_zero_pages=True, zero_pages_backed=True)).ksm
    assert (zero_merged.pages_shared, zero_merged.pages_sharing) == (ksm.pages_shared, ksm.pages_sharing)
    assert zero_merged.ksm_zero_pages == zero and zero_merged.rmap_items == nonzero
    assert zero_merged.general_profit == (ksm.pages_sharing + zero) * 4096 - nonzero * KSM_RMAP_ITEM_BYTES
    assert KSM_RMAP_ITEM_BYTES == 64


def test_to_dict_is_versioned_json(tmp_path: Path) -> None:
    vms = design_vms(7, [100, 120])
    d = json.loads(json.dumps(run_share(tmp_path, vms).to_dict()))
    assert d["schema"] == SCHEMA == "dengine.analyze/1"
    assert [vm["name"] for vm in d["vms"]] == [str(tmp_path / "vm0.raw"), str(tmp_path / "vm1.raw")]
    assert d["total"]["pages_present"] == 220
    assert d["total"]["footprint_bytes"] == d["total"]["kept_pages"] * 4096
    assert len(d["matrix"]["shared_pages"]) == 2
    assert set(d["ksm"]) >= {"pages_shared", "pages_sharing", "general_profit_bytes"}


def test_identical_vms_share_everything_across(tmp_path: Path) -> None:
    vms = design_vms(8, [200])
    report = run_share(tmp_path, [vms[0], vms[0].copy()])
    a, b = report.vms
    assert b.kept == 0 and b.shared_across == a.kept
    assert report.matrix[0, 1] == report.matrix[1, 0] == a.kept
    assert b.unique == 0 and a.unique == 0


def test_empty_and_all_zero_vms(tmp_path: Path) -> None:
    zero = np.zeros((50, PAGE_SIZE), dtype=np.uint8)
    report = run_share(tmp_path, [zero])
    assert report.vms[0].zero == 50 and report.vms[0].kept == 0
    assert report.vms[0].savings == 1.0
    assert report.contents == 0 and report.matrix.tolist() == [[0]]
    assert (report.ksm.pages_shared, report.ksm.pages_sharing, report.ksm.rmap_items) == (0, 0, 0)
    backed = report.with_ksm(KsmModel(zero_pages_backed=True)).ksm
    assert (backed.pages_shared, backed.pages_sharing, backed.rmap_items) == (1, 49, 50)
    capped = report.with_ksm(KsmModel(max_page_sharing=16, zero_pages_backed=True)).ksm
    # 50 = 3 full KSM pages of 16 and one of 2.
    assert (capped.pages_shared, capped.pages_sharing) == (4, 3 * 15 + 1)
    assert (capped.stable_node_chains, capped.stable_node_dups) == (1, 4)


def test_index_and_dump_must_agree(tmp_path: Path) -> None:
    a, b = open_all(write_raw_images(tmp_path, design_vms(9, [10, 20])))
    with pytest.raises(ValueError, match="the index has 10 pages, the dump 20"):
        share([index_dump(a)], [b], verify=True)


def test_analyze_end_to_end_with_workers(tmp_path: Path) -> None:
    vms = design_vms(10, [600, 300, 400])
    paths = write_raw_images(tmp_path, vms)
    seen: list[tuple[str, int, int]] = []
    report = analyze(
        paths,
        index_dir=tmp_path / "cache",
        workers=Workers(jobs=2, fork_min_bytes=0),
        batch_pages=32,
        on_progress=lambda *a: seen.append(a),
    )
    assert_figures(report, vms, dict_count(vms, verified=False))
    assert ("sharing", 1, 1) in seen
    again = analyze(paths, index_dir=tmp_path / "cache", workers=Workers(jobs=1))
    assert again.to_dict() == report.to_dict()


def test_confirmation_reads_the_dump(tmp_path: Path) -> None:
    # An index that lies (two different pages given the same hash) is caught by the byte compare.
    vms = design_vms(11, [64])
    (dump,) = open_all(write_raw_images(tmp_path, vms))
    honest = index_dump(dump)
    nonzero = np.flatnonzero(~honest.zero)
    hashes, check = honest.hashes.copy(), honest.check.copy()
    hashes[nonzero] = check[nonzero] = 7
    liar = PageIndex(honest.name, honest.gfns, hashes, check, honest.zero)
    report = share([liar], [dump], verify=True)
    # Every non-zero page now shares its hash with a different content.
    assert_figures(report, vms, dict_count(vms) | {"collisions": len(nonzero)})


def peaks(tmp_path: Path, n: int, batch: int, group: int) -> tuple[int, int]:
    """Peak traced bytes of indexing three n-page dumps (open already) and of analysing them
    from their cached indexes (memory-mapped, as analyze gets them)."""
    vms = design_vms(12, [n, n, n], library=500)
    tmp_path.mkdir()
    paths = write_raw_images(tmp_path, vms)
    del vms
    dumps = open_all(paths)
    cache = tmp_path / "cache"
    tracemalloc.start()
    try:
        for p, d in zip(paths, dumps, strict=True):
            load_or_build(p, index_dir=cache, batch_pages=batch, dump=d)
        _, build_peak = tracemalloc.get_traced_memory()
        indexes = [load_or_build(p, index_dir=cache) for p in paths]
        assert all(ix.loaded for ix in indexes)
        tracemalloc.reset_peak()
        base, _ = tracemalloc.get_traced_memory()
        with SpilledRuns(tmp_path / "spill") as runs:
            report = share(indexes, dumps, shape=Shape(bits=group, slice_pages=4096), runs=runs)
        share_peak = tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()
    assert report.total.present == 3 * n
    return build_peak, share_peak


def test_memory_stays_bounded(tmp_path: Path) -> None:
    """Indexing and analysing dumps many batches long, sorted runs spilled to files: the traced
    peak grows by less than 24 bytes per page with the pages (content ids and one partition of
    the 16 at a time), and stays under 24 bytes per page plus batch-sized constants."""
    batch, group = 64, 4
    peaks(tmp_path / "warm", 100, batch, group)  # first calls allocate numpy's lazy imports
    small, large = 3 * 3000, 3 * 9000
    build_small, share_small = peaks(tmp_path / "small", small // 3, batch, group)
    build_large, share_large = peaks(tmp_path / "large", large // 3, batch, group)
    constant = 4 * batch * PAGE_SIZE + (1 << 20)
    for low, high in ((build_small, build_large), (share_small, share_large)):
        assert (high - low) / (large - small) < 24, (low, high)
        assert high < 24 * large + constant, high


@st.composite
def page_sets(draw: st.DrawFn) -> tuple[list[np.ndarray], int]:
    """A few small VMs whose pages come from a tiny pool of contents (many duplicates), some of
    them one byte apart, and a hash truncated to a few bits (many collisions)."""
    n_contents = draw(st.integers(1, 12))
    seeds = draw(st.lists(st.integers(0, 3), min_size=n_contents, max_size=n_contents))
    pool = np.zeros((n_contents, PAGE_SIZE), dtype=np.uint8)
    for k, s in enumerate(seeds):
        if s:  # content 0 with seed 0 stays the zero page
            pool[k, k % PAGE_SIZE] = s
            pool[k, (k * 37) % PAGE_SIZE] ^= k
    vms = []
    for _ in range(draw(st.integers(1, 4))):
        picks = draw(st.lists(st.integers(0, n_contents - 1), min_size=1, max_size=30))
        vms.append(pool[picks])
    return vms, draw(st.sampled_from([1, 2, 3, 64, 128]))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=page_sets(), cross_vm=st.booleans())
def test_property_grouping_equals_dict_count(
    tmp_path_factory: pytest.TempPathFactory, case: tuple[list[np.ndarray], int], cross_vm: bool
) -> None:
    vms, bits = case
    tmp = tmp_path_factory.mktemp("prop")
    report = run_share(tmp, vms, bits=2, cross_vm=cross_vm, hash_bits=bits)
    assert_figures(report, vms, dict_count(vms, cross_vm=cross_vm, hash_bits=bits))


def test_pages_at_reads_any_gfns(tmp_path: Path) -> None:
    (vm,) = design_vms(13, [100])
    (dump,) = open_all(write_raw_images(tmp_path, [vm]))
    gfns = np.array([99, 3, 4, 5, 50], dtype=np.uint64)
    assert (dump.pages_at(gfns) == vm[[99, 3, 4, 5, 50]]).all()
    # The generic way (runs read with _pages) agrees with the page-table override.
    assert (Dump._pages_at(dump, np.array([99, 3, 4, 5, 50])) == vm[[99, 3, 4, 5, 50]]).all()
    with pytest.raises(KeyError, match="100"):
        dump.pages_at(np.array([1, 100], dtype=np.uint64))


@pytest.mark.parametrize("names", [("alpha.elf", "beta.elf"), ("alpha.elf", "alpha-later.elf")])
def test_real_dumps_equal_dict_count(
    real_dump: Callable[[str], Path], tmp_path: Path, names: tuple[str, str]
) -> None:
    """QEMU dumps of two guests (or one guest twice): figures equal a dict count of the pages
    the reader yields."""
    paths = [real_dump(n) for n in names]
    report = analyze(paths, index_dir=tmp_path, workers=Workers(jobs=2), verify=True)
    where: dict[bytes, list[tuple[int, int]]] = defaultdict(list)
    for v, path in enumerate(paths):
        with open_dump(path) as dump:
            for batch in dump.batches():
                for g, page in zip(batch.gfns.tolist(), batch.pages, strict=True):
                    where[hashlib.blake2b(page, digest_size=16).digest()].append((v, g))
    zero = hashlib.blake2b(bytes(PAGE_SIZE), digest_size=16).digest()
    kept = [0, 0]
    for digest, places in where.items():
        if digest != zero:
            kept[min(places)[0]] += 1
    assert [vm.kept for vm in report.vms] == kept
    assert report.contents == sum(1 for d in where if d != zero)
    assert [vm.zero for vm in report.vms] == [
        sum(1 for v, _ in where.get(zero, []) if v == k) for k in range(2)
    ]
    assert report.collisions == 0


def test_forced_collisions_with_compressed_pages_and_a_raw_image(tmp_path: Path) -> None:
    """Pages that do not lie uncompressed in a mapping (a kdump's zlib pages) are compared from
    copies, pages of a raw image in place: both ways must split every collision."""
    from dengine_cli.formats import open_dump
    from tests.builders.kdump import build_kdump

    vms = design_vms(8, [150, 150])
    (tmp_path / "vm0.kdump").write_bytes(build_kdump({g: p.tobytes() for g, p in enumerate(vms[0])}).data)
    write_raw_image(tmp_path / "vm1.raw", vms[1])
    dumps = [open_dump(tmp_path / "vm0.kdump"), open_dump(tmp_path / "vm1.raw")]
    assert dumps[0].mapped_pages() is None and dumps[1].mapped_pages() is not None
    indexes = [index_dump(d, batch_pages=64) for d in dumps]
    report = share(indexes, dumps, verify=True, hash_bits=2)
    expected = dict_count(vms, hash_bits=2)
    assert_figures(report, vms, expected)
    assert report.collisions == expected["collisions"] > 50


@pytest.mark.parametrize("hash_bits", [128, 6])
def test_runs_of_matching_pages_compared_as_blocks(tmp_path: Path, hash_bits: int) -> None:
    """VMs that hold the same long runs of pages (as identical guests do) are compared run by
    run; pages inside a run that differ (one byte), and forced hash collisions inside and
    between runs, must still be found."""
    rng = np.random.default_rng(21)
    base = rng.integers(0, 256, (600, PAGE_SIZE), dtype=np.uint8)
    base[::9] = 0
    second = base.copy()
    second[100:110, 7] ^= 1  # ten pages inside a run differ by one byte
    second[300] = rng.integers(0, 256, PAGE_SIZE, dtype=np.uint8)  # a run broken by a new page
    third = np.concatenate((base[200:500], rng.integers(0, 256, (100, PAGE_SIZE), dtype=np.uint8)))
    third[50, 4095] ^= 0x80  # last byte of a page in a run
    vms = [base, second, third]
    assert confirm.RUN_MIN_PAGES <= 50
    report = run_share(tmp_path, vms, hash_bits=hash_bits)
    expected = dict_count(vms, hash_bits=hash_bits)
    assert_figures(report, vms, expected)
    if hash_bits < 64:
        assert report.collisions == expected["collisions"] > 0


def test_a_collision_inside_a_run_is_split(tmp_path: Path) -> None:
    """A run of pages matching a run of references, one pair of which only collides (same low
    hash bits, different bytes): the block compare of the run must still find that page."""
    bits = 6
    rng = np.random.default_rng(5)

    def low(page: np.ndarray) -> int:
        return xxhash.xxh3_128_intdigest(page.tobytes()) & ((1 << bits) - 1)

    refs: list[np.ndarray] = []
    seen: set[int] = set()
    while len(refs) < 16:  # references with distinct low bits: each is its group's first page
        page = rng.integers(0, 256, PAGE_SIZE, dtype=np.uint8)
        if low(page) not in seen:
            seen.add(low(page))
            refs.append(page)
    vm0 = np.stack(refs)
    vm1 = vm0.copy()
    while True:  # page 5 of vm1: other bytes, the same low bits as vm0's page 5
        other = rng.integers(0, 256, PAGE_SIZE, dtype=np.uint8)
        if low(other) == low(vm0[5]):
            vm1[5] = other
            break
    vms = [vm0, vm1]
    report = run_share(tmp_path, vms, hash_bits=bits)
    expected = dict_count(vms, hash_bits=bits)
    assert_figures(report, vms, expected)
    assert report.vms[1].shared_across == 15 and report.collisions == expected["collisions"] >= 2
