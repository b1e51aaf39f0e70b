"""Hot pages from an earlier snapshot of the same VM."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from dengine_cli.engine.index import index_dump
from dengine_cli.engine.temperature import hot_pages
from dengine_cli.formats import open_dump
from dengine_cli.formats.base import OpenOptions
from dengine_cli.pages import PAGE_SIZE
from tests.vms import write_raw_image

RAW = OpenOptions(format="raw")


def test_changed_and_new_pages_are_hot(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    before = rng.integers(0, 256, (20, PAGE_SIZE), dtype=np.uint8)
    before[3] = 0
    before[4] = 0
    after = np.concatenate([before, rng.integers(0, 256, (5, PAGE_SIZE), dtype=np.uint8)])
    after[1, 100] ^= 1
    after[3, 7] = 9  # zero before, not now
    after[5] = 0  # zeroed
    a = open_dump(write_raw_image(tmp_path / "a.raw", after), RAW)
    b = open_dump(write_raw_image(tmp_path / "b.raw", before), RAW)
    hot = hot_pages(a, index_dump(a), b, index_dump(b), batch_pages=4)
    assert np.flatnonzero(hot).tolist() == [1, 3, 5, 20, 21, 22, 23, 24]


def test_equal_hashes_are_confirmed_byte_by_byte(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    before = rng.integers(0, 256, (6, PAGE_SIZE), dtype=np.uint8)
    after = before.copy()
    after[2, 0] ^= 0xFF
    a = open_dump(write_raw_image(tmp_path / "a.raw", after), RAW)
    b = open_dump(write_raw_image(tmp_path / "b.raw", before), RAW)
    ia, ib = index_dump(a), index_dump(b)
    # A forged collision: the index says page 2 is unchanged, its bytes say otherwise.
    forged = dataclasses.replace(ia, hashes=ib.hashes.copy())
    assert np.flatnonzero(hot_pages(a, forged, b, ib)).tolist() == [2]


def test_no_earlier_pages_means_all_hot(tmp_path: Path) -> None:
    pages = np.ones((3, PAGE_SIZE), dtype=np.uint8)
    a = open_dump(write_raw_image(tmp_path / "a.raw", pages), RAW)
    ia = index_dump(a)
    empty = dataclasses.replace(ia, gfns=ia.gfns[:0], hashes=ia.hashes[:0], zero=ia.zero[:0])
    assert hot_pages(a, ia, a, empty).all()
    assert not hot_pages(a, ia, a, ia).any()


def test_real_later_snapshot(real_dump, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """alpha-later.elf against alpha.elf: the rewritten text.txt pages and the new later.bin
    are hot, the untouched workload pages cold."""
    import pytest

    from fixtures.workload import later_files, workload_files

    try:
        now_path, then_path = real_dump("alpha-later.elf"), real_dump("alpha.elf")
    except FileNotFoundError:
        pytest.skip("QEMU fixtures not generated")
    now, then = open_dump(now_path), open_dump(then_path)
    inow = index_dump(now)
    hot = hot_pages(now, inow, then, index_dump(then))
    text = later_files()["text.txt"]
    later = later_files()["later.bin"]
    rand = workload_files("alpha")["random.bin"]
    where: dict[bytes, int] = {}
    for lo in range(0, inow.page_count, 4096):
        pages = now.pages_at(inow.gfns[lo : lo + 4096])
        for k in range(len(pages)):
            where.setdefault(pages[k].tobytes(), lo + k)

    def pos(data: bytes, i: int) -> int:
        return where[data[i * PAGE_SIZE : (i + 1) * PAGE_SIZE]]

    assert all(hot[pos(text, i)] for i in range(16))
    assert not any(hot[pos(text, i)] for i in range(16, 64))
    assert all(hot[pos(later, i)] for i in range(16))
    assert not any(hot[pos(rand, i)] for i in range(32))
    assert 32 <= int(hot.sum()) < inow.page_count // 2
