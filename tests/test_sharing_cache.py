"""The sharing cache: a later command over the same dumps reads the exact sharing instead of
computing it again, gets the very same report, and never a stale or damaged one."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from dengine_cli.cache import sharing_store as sharing_cache
from dengine_cli.cache.prune import prune_indexes
from dengine_cli.engine.index import index_dump
from dengine_cli.engine.sharing import pipeline
from dengine_cli.engine.sharing.model import SharingReport
from dengine_cli.engine.sharing.pipeline import share
from dengine_cli.formats import open_dump
from dengine_cli.formats.base import OpenOptions
from dengine_cli.policies import POLICIES
from dengine_cli.session import analyze, share_and_plan
from dengine_cli.session.indexing import build_indexes
from tests.vms import design_vms, write_raw_images

RAW = OpenOptions(format="raw")


def computed(paths: list[Path], cross_vm: bool = True) -> SharingReport:
    """The sharing of the dumps computed directly, no cache involved."""
    dumps = [open_dump(p, RAW) for p in paths]
    try:
        return share([index_dump(d) for d in dumps], dumps, cross_vm=cross_vm)
    finally:
        for d in dumps:
            d.close()


def same(a: SharingReport, b: SharingReport) -> None:
    assert a.to_dict() == b.to_dict()
    assert len(a.content_ids) == len(b.content_ids)
    for x, y in zip(a.content_ids, b.content_ids, strict=True):
        assert np.array_equal(x, y)


@pytest.fixture
def no_sharing(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts the sharing computations made through the cache (the real share() still runs)."""
    calls: list[int] = []
    real = pipeline.share

    def counting(*args: Any, **kwargs: Any) -> SharingReport:
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(pipeline, "share", counting)
    return calls


def test_second_analyze_reads_the_stored_sharing(tmp_path: Path, no_sharing: list[int]) -> None:
    paths = write_raw_images(tmp_path, design_vms(1, [300, 200, 250]))
    first = analyze(paths, RAW, index_dir=tmp_path / "idx")
    assert no_sharing == [1]
    again = analyze(paths, RAW, index_dir=tmp_path / "idx")
    assert no_sharing == [1]  # not computed again
    same(first, again)
    same(again, computed(paths))
    assert len(list((tmp_path / "idx").glob("*.shr"))) == 1


def test_order_and_cross_vm_are_part_of_the_key(tmp_path: Path, no_sharing: list[int]) -> None:
    paths = write_raw_images(tmp_path, design_vms(2, [200, 200, 150]))
    idx = tmp_path / "idx"
    analyze(paths, RAW, index_dir=idx)
    backwards = analyze(paths[::-1], RAW, index_dir=idx)
    salted = analyze(paths, RAW, index_dir=idx, cross_vm=False)
    assert len(no_sharing) == 3
    same(backwards, computed(paths[::-1]))
    same(salted, computed(paths, cross_vm=False))
    same(analyze(paths[::-1], RAW, index_dir=idx), backwards)
    assert len(no_sharing) == 3


def test_a_rewritten_dump_is_shared_again(tmp_path: Path, no_sharing: list[int]) -> None:
    vms = design_vms(3, [200, 200])
    paths = write_raw_images(tmp_path, vms)
    idx = tmp_path / "idx"
    before = analyze(paths, RAW, index_dir=idx)
    st = os.stat(paths[1])
    time.sleep(0.05)
    changed = vms[1].copy()
    changed[:50] = vms[0][:50]  # now shares 50 more pages with vm0
    with open(paths[1], "r+b") as f:  # same inode, size and (restored) mtime
        f.write(changed.tobytes())
    os.utime(paths[1], ns=(st.st_atime_ns, st.st_mtime_ns))
    after = analyze(paths, RAW, index_dir=idx)
    assert len(no_sharing) == 2
    same(after, computed(paths))
    assert after.total.kept < before.total.kept


@pytest.mark.parametrize("damage", ["flip", "truncate", "garbage"])
def test_a_damaged_file_is_never_trusted(tmp_path: Path, no_sharing: list[int], damage: str) -> None:
    paths = write_raw_images(tmp_path, design_vms(4, [300, 300]))
    idx = tmp_path / "idx"
    analyze(paths, RAW, index_dir=idx)
    (file,) = idx.glob("*.shr")
    data = bytearray(file.read_bytes())
    if damage == "flip":
        data[-7] ^= 0x40  # a content id
    elif damage == "truncate":
        del data[-4:]
    else:
        data[:8] = b"NOTOURS\0"
    file.write_bytes(bytes(data))
    again = analyze(paths, RAW, index_dir=idx)
    assert len(no_sharing) == 2
    same(again, computed(paths))


def test_sharing_that_cannot_be_stored_is_computed(tmp_path: Path, no_sharing: list[int]) -> None:
    paths = write_raw_images(tmp_path, design_vms(5, [100, 120]))
    idx = tmp_path / "idx"
    indexes = build_indexes(paths, RAW, idx)
    key = sharing_cache.sharing_key(indexes, True, 128)
    assert key is not None
    sharing_cache.file_for(key, idx).mkdir()  # where the result would go: the rename fails
    same(analyze(paths, RAW, index_dir=idx), computed(paths))
    same(analyze(paths, RAW, index_dir=idx), computed(paths))
    assert len(no_sharing) == 2
    assert list(idx.glob(".tmp-*")) == []  # no temporary file left behind


def test_plan_reads_what_analyze_stored(tmp_path: Path, no_sharing: list[int]) -> None:
    paths = write_raw_images(tmp_path, design_vms(6, [250, 250]))
    idx = tmp_path / "idx"
    plan_cold = share_and_plan(paths, POLICIES["de"], options=RAW, index_dir=tmp_path / "other")[1]
    analyze(paths, RAW, index_dir=idx)
    calls = len(no_sharing)
    sharing, plan = share_and_plan(paths, POLICIES["de"], options=RAW, index_dir=idx)
    assert len(no_sharing) == calls
    same(sharing, computed(paths))
    assert plan.to_dict() == plan_cold.to_dict()
    for a, b in zip(plan.pages, plan_cold.pages, strict=True):
        assert np.array_equal(a.actions, b.actions) and np.array_equal(a.sizes, b.sizes)


def test_prune_removes_sharing_of_changed_dumps(tmp_path: Path) -> None:
    paths = write_raw_images(tmp_path, design_vms(7, [100, 100, 100]))
    idx = tmp_path / "idx"
    analyze(paths[:2], RAW, index_dir=idx)
    analyze(paths[1:], RAW, index_dir=idx)
    assert len(list(idx.glob("*.shr"))) == 2
    paths[0].write_bytes(paths[0].read_bytes()[: 4096 * 50])  # vm0 changes
    kept, removed, _ = prune_indexes(idx)
    assert (kept, removed) == (3, 2)  # vm1, vm2 indexes and the (vm1, vm2) sharing stay
    assert len(list(idx.glob("*.shr"))) == 1
    assert len(list(idx.glob("*.idx"))) == 2


def test_a_changed_dump_leaves_no_stale_entry_once_indexed_again(
    tmp_path: Path, no_sharing: list[int]
) -> None:
    """Indexing a dump that changed removes its old index and the sharing results that named
    the old one; the other dumps' entries, and the results that never named it, stay and are
    used; the figures are those computed afresh."""
    paths = write_raw_images(tmp_path, design_vms(11, [100, 80, 90]))
    idx = tmp_path / "idx"
    analyze(paths[:2], RAW, index_dir=idx)
    analyze(paths[1:], RAW, index_dir=idx)
    before = {p.name for p in idx.iterdir()}
    assert len(before) == 5  # three indexes, two sharing results
    data = bytearray(paths[0].read_bytes())
    data[: 4096 * 3] = bytes(range(256)) * 48  # vm0 changes: three pages get new content
    paths[0].write_bytes(bytes(data))
    report = analyze(paths[:2], RAW, index_dir=idx)
    same(report, computed(paths[:2]))
    after = {p.name for p in idx.iterdir()}
    assert len(after) == 5  # vm0's new index and the new (vm0, vm1) result took their places
    assert len(before - after) == 2 and len(after - before) == 2
    assert {n.rsplit(".", 1)[1] for n in before - after} == {"idx", "shr"}
    kept, removed, _ = prune_indexes(idx)
    assert (kept, removed) == (5, 0)  # nothing left for prune
    calls = len(no_sharing)
    same(analyze(paths[1:], RAW, index_dir=idx), computed(paths[1:]))
    assert len(no_sharing) == calls  # (vm1, vm2) was read from the cache
    assert {p.name for p in idx.iterdir()} == after


def test_the_same_dump_under_other_options_keeps_its_index(tmp_path: Path) -> None:
    """Two indexes of one dump file as it is now (reader options that change the key) are both
    good: storing one removes neither; files by an index's name that are not indexes, and
    files being written, are left alone."""
    paths = write_raw_images(tmp_path, design_vms(12, [60]))
    idx = tmp_path / "idx"
    analyze(paths, RAW, index_dir=idx)
    (first,) = idx.glob("*.idx")
    prefix = first.name.split("-")[0]
    stray = idx / f"{prefix}-notanindex.idx"
    stray.write_bytes(b"not ours")
    writing = idx / f".tmp-{prefix}-x.idx"
    writing.write_bytes(b"half")
    analyze(paths, OpenOptions(format="raw", device_memory=True), index_dir=idx)
    indexes = sorted(idx.glob(f"{prefix}-*.idx"))
    assert first in indexes and stray in indexes and len(indexes) == 3
    assert writing.exists()
    paths[0].write_bytes(paths[0].read_bytes())  # rewritten: the same bytes, a new ctime
    analyze(paths, RAW, index_dir=idx)
    left = sorted(idx.glob(f"{prefix}-*.idx"))
    assert first not in left and stray in left and len(left) == 2  # both old indexes went
    assert writing.exists()


def test_the_sharing_of_hundreds_of_vms_is_read_back(tmp_path: Path, no_sharing: list[int]) -> None:
    """700 VMs: the stored result (its pairwise matrix 490,000 cells) is read back, not computed
    again, and gives the same report; with the matrix in the JSON header the header passed the
    size a header may have, and the result was stored on every run and never loaded."""
    rng = np.random.default_rng(7)
    library = rng.integers(0, 256, (8, 4096), dtype=np.uint8)
    images = [library[rng.integers(0, 8, 2)] for _ in range(700)]
    paths = write_raw_images(tmp_path, images)
    idx = tmp_path / "idx"
    first = analyze(paths, RAW, index_dir=idx)
    calls = len(no_sharing)
    second = analyze(paths, RAW, index_dir=idx)
    assert len(no_sharing) == calls  # read back
    same(first, second)
    assert int(second.matrix.sum()) > 0 and second.matrix.shape == (700, 700)
    assert np.array_equal(second.matrix, second.matrix.T)


def test_the_upkeep_passes_over_sharing_files_it_cannot_read(tmp_path: Path) -> None:
    """Files by a sharing result's name with our magic but a header of another shape (a key that
    is no mapping, no key) are passed over when a changed dump's entries are removed: the command
    gives its figures, and the files stay for prune to judge."""
    from dengine_cli.cache import files

    paths = write_raw_images(tmp_path, design_vms(13, [50, 40]))
    idx = tmp_path / "idx"
    analyze(paths, RAW, index_dir=idx)
    odd = [idx / ("a" * 32 + ".shr"), idx / ("b" * 32 + ".shr")]
    for file, header in zip(odd, ({"key": "not a mapping"}, {"counts": []}), strict=True):
        assert files.write(file, sharing_cache.SHARING_MAGIC, sharing_cache.SHARING_VERSION, header, [])
    paths[0].write_bytes(paths[0].read_bytes())  # rewritten: a new ctime
    same(analyze(paths, RAW, index_dir=idx), computed(paths))
    assert all(f.exists() for f in odd)
    assert len(list(idx.glob("*.idx"))) == 2
