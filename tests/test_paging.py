"""Paging to swap: coldest classes first, never references, shared or hot pages; VMs per host."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from dengine_cli.engine.paging import SwapClass, choose_swap, vms_per_host
from dengine_cli.engine.plan.model import COMPRESS, PATCH, SWAP, WHOLE
from dengine_cli.pages import PAGE_SIZE
from tests.vms import Planned, mixed_vms, workload_image, write_raw_images


def cls(*per_vm: list[tuple[int, int]]) -> SwapClass:
    return SwapClass(
        [np.array([p for p, _ in vm], dtype=np.int64) for vm in per_vm],
        [np.array([f for _, f in vm], dtype=np.int64) for vm in per_vm],
    )


def test_classes_in_order_then_scan_order() -> None:
    whole = cls([(1, 4096), (5, 4096)], [(0, 4096)])
    compressed = cls([(2, 1000)], [(3, 500)])
    choice = choose_swap(4096 * 3 + 1, [whole, compressed], 2)
    assert [p.tolist() for p in choice.positions] == [[1, 2, 5], [0]]
    assert choice.freed_bytes == (4096 * 2 + 1000, 4096)
    assert choice.fits


def test_exact_fit_takes_no_more() -> None:
    choice = choose_swap(4096 * 2, [cls([(1, 4096), (2, 4096), (3, 4096)])], 1)
    assert choice.positions[0].tolist() == [1, 2]


def test_not_enough_pageable_memory() -> None:
    choice = choose_swap(10**9, [cls([(1, 4096)]), cls([(4, 100)])], 1)
    assert not choice.fits and choice.positions[0].tolist() == [1, 4]
    assert choice.freed_bytes == (4196,)


def test_nothing_needed() -> None:
    choice = choose_swap(0, [cls([(1, 4096)])], 1)
    assert choice.fits and choice.positions[0].tolist() == []


def test_vms_per_host() -> None:
    assert vms_per_host(10 * PAGE_SIZE, 3 * PAGE_SIZE) == 3
    assert vms_per_host(10, 0) is None


def test_plan_pages_out_coldest_first(tmp_path: Path) -> None:
    image, where = workload_image("alpha")
    planned = Planned(write_raw_images(tmp_path, [image]))
    free = planned.plan()
    need = free.total.footprint_bytes
    # 40 pages short: random.bin's 32 whole pages go first, then 8+ compressed text pages.
    report = planned.plan(host_memory=need - 40 * PAGE_SIZE)
    acts = report.pages[0].actions
    rand = where["random.bin"]
    assert (acts[rand.start : rand.stop] == SWAP).all()
    text = where["text.txt"]
    swapped_text = np.flatnonzero(acts[text.start : text.stop] == SWAP)
    assert len(swapped_text) >= 8 and swapped_text.tolist() == list(range(len(swapped_text)))
    # References (base.bin), the shared identical page and patched pages stay.
    assert (acts[where["base.bin"].start : where["base.bin"].stop] == WHOLE).all()
    assert (acts[where["similar.bin"].start : where["similar.bin"].stop] == PATCH).all()
    assert acts[where["identical.bin"].start] == WHOLE
    vm = report.vms[0]
    assert vm.paged_out == 32 + len(swapped_text)
    assert report.host is not None and report.host.fits
    assert report.total.footprint_bytes <= need - 40 * PAGE_SIZE
    assert vm.footprint_bytes == need - vm.paged_out_bytes
    assert report.host.footprint_before_paging == need
    assert report.cost.counts.paged_out == vm.paged_out
    assert int((acts == COMPRESS).sum()) == 64 - len(swapped_text)


def test_host_too_small(tmp_path: Path) -> None:
    image, where = workload_image("alpha")
    planned = Planned(write_raw_images(tmp_path, [image]))
    report = planned.plan(host_memory=PAGE_SIZE)
    assert report.host is not None and not report.host.fits
    assert report.host.sets_per_host == 0
    acts = report.pages[0].actions
    # Everything pageable went; references and the shared frame did not.
    assert (acts[where["base.bin"].start : where["base.bin"].stop] == WHOLE).all()
    assert not (
        (acts == WHOLE) & ~np.isin(np.arange(len(acts)), [*where["base.bin"], where["identical.bin"].start])
    ).any()


def test_hot_pages_are_never_paged(tmp_path: Path) -> None:
    vms = mixed_vms(4, [100])
    planned = Planned(write_raw_images(tmp_path, vms))
    hot = np.ones(100, dtype=np.bool_)
    report = planned.plan(hot=[hot], host_memory=PAGE_SIZE)
    assert report.vms[0].paged_out == 0 and not report.host.fits  # type: ignore[union-attr]


def test_vms_per_host_in_report(tmp_path: Path) -> None:
    planned = Planned(write_raw_images(tmp_path, mixed_vms(4, [100, 80])))
    free = planned.plan()
    host = 10 * free.total.footprint_bytes
    report = planned.plan(host_memory=host)
    assert report.host is not None and report.host.sets_per_host == 10
    assert [vm.per_host for vm in report.vms] == [host // vm.footprint_bytes for vm in free.vms]
    assert report.to_dict()["vms"][0]["vms_per_host"] == report.vms[0].per_host


@pytest.mark.parametrize("bad", ["0", "-5", "0.0M"])
def test_bad_host_memory(tmp_path: Path, bad: str) -> None:
    """Checked once, where users give it: the command line."""
    from click.testing import CliRunner

    from dengine_cli.cli import cli

    (path,) = write_raw_images(tmp_path, mixed_vms(4, [10]))
    result = CliRunner().invoke(
        cli, ["plan", "--index-dir", str(tmp_path / "i"), f"--host-memory={bad}", str(path)]
    )
    assert result.exit_code == 2
    assert "a size must be positive" in result.output
