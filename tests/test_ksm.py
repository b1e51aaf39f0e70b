"""The KSM view: the cap of max_page_sharing, zero pages, general_profit, against hand-computed
cases and against a page-by-page simulation of how mm/ksm.c merges."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st

from dengine_cli.cli import cli
from dengine_cli.engine.sharing.model import (
    KSM_RMAP_ITEM_BYTES,
    CopyCounts,
    KsmModel,
    KsmView,
    ksm_extra_pages,
    ksm_view,
)
from dengine_cli.pages import PAGE_SIZE
from tests.vms import design_vms, write_raw_images


def view_of(copies: list[int], zero: int = 0, present: int | None = None, **knobs: object) -> KsmView:
    present = present if present is not None else sum(copies) + zero
    counts = CopyCounts.of(np.array(copies, dtype=np.int64))
    return ksm_view(counts, zero, present, KsmModel(**knobs))  # type: ignore[arg-type]


# --- by hand -----------------------------------------------------------------------------------


def test_a_content_within_the_cap_is_one_ksm_page() -> None:
    v = view_of([256, 2, 1])
    assert (v.pages_shared, v.pages_sharing) == (2, 255 + 1)
    assert (v.stable_node_chains, v.stable_node_dups) == (0, 0)
    assert v.rmap_items == 259


def test_copies_beyond_the_cap_need_more_ksm_pages() -> None:
    # 600 = 256 + 256 + 88: three KSM pages, one chain of three dups.
    v = view_of([600])
    assert (v.pages_shared, v.pages_sharing) == (3, 255 + 255 + 87)
    assert (v.stable_node_chains, v.stable_node_dups) == (1, 3)
    # 513 = 256 + 256 + 1: the last page finds every KSM page full and no partner: unshared.
    v = view_of([513])
    assert (v.pages_shared, v.pages_sharing) == (2, 510)
    assert (v.stable_node_chains, v.stable_node_dups) == (1, 2)


def test_the_smallest_cap() -> None:
    # max_page_sharing 2: pairs; an odd copy out stays unshared.
    v = view_of([5, 4, 3], max_page_sharing=2)
    assert (v.pages_shared, v.pages_sharing) == (2 + 2 + 1, 2 + 2 + 1)
    with pytest.raises(ValueError, match="at least 2"):
        KsmModel(max_page_sharing=1)


def test_zero_pages_untouched_backed_and_merged_with_the_zero_page() -> None:
    untouched = view_of([3], zero=300)
    assert (untouched.pages_shared, untouched.pages_sharing, untouched.ksm_zero_pages) == (1, 2, 0)
    assert untouched.rmap_items == 3 and untouched.zero_pages == 300
    backed = view_of([3], zero=300, zero_pages_backed=True)
    # 300 zero pages = one full KSM page of 256 and one of 44.
    assert (backed.pages_shared, backed.pages_sharing, backed.ksm_zero_pages) == (1 + 2, 2 + 255 + 43, 0)
    assert backed.rmap_items == 303
    merged = view_of([3], zero=300, zero_pages_backed=True, use_zero_pages=True)
    assert (merged.pages_shared, merged.pages_sharing, merged.ksm_zero_pages) == (1, 2, 300)
    assert merged.rmap_items == 3
    # use_zero_pages alone changes nothing when no zero page was backed.
    assert view_of([3], zero=300, use_zero_pages=True).ksm_zero_pages == 0


def test_a_backed_zero_content_adds_to_a_count_already_there() -> None:
    v = view_of([7, 7], zero=7, zero_pages_backed=True)
    assert (v.pages_shared, v.pages_sharing) == (3, 18)


def test_general_profit_is_the_kernels_formula() -> None:
    v = view_of([10, 1, 1], zero=5, zero_pages_backed=True, use_zero_pages=True)
    # (pages_sharing + ksm_zero_pages) * PAGE_SIZE - rmap_items * sizeof(struct ksm_rmap_item)
    assert v.general_profit == (9 + 5) * 4096 - 12 * 64
    assert view_of([1] * 10).general_profit == -10 * 64
    d = v.to_dict()
    assert d["general_profit_bytes"] == v.general_profit and d["ksm_zero_pages"] == 5
    assert d["zero_pages_assumed"] == "backed" and d["use_zero_pages"] is True


def test_copy_counts_add_up() -> None:
    a = CopyCounts.of(np.array([2, 2, 5, 1], dtype=np.int64))
    b = CopyCounts.of(np.array([5, 9], dtype=np.int64))
    total = a + b
    assert total.copies.tolist() == [2, 5, 9] and total.contents.tolist() == [2, 2, 1]
    assert (CopyCounts.none() + a).to_dict() == a.to_dict()


# --- against a simulation of ksmd --------------------------------------------------------------


def simulate_ksmd(
    pages: list[int], order: list[int], m: int, use_zero: bool, zero_backed: bool
) -> dict[str, int]:
    """Scan ``pages`` (contents; 0 is the zero page) in ``order`` as ksmd does, pass after pass
    until nothing changes: a page joins a KSM page of its content with room (fewer than ``m``
    mappings), else pairs with an unmerged page of its content waiting in the unstable tree
    (rebuilt every pass) into a new KSM page, else waits there."""
    scanned = [i for i in order if pages[i] != 0 or zero_backed]
    dups: dict[int, list[int]] = {}
    merged: set[int] = set()
    zero_pages = 0
    changed = True
    while changed:
        changed = False
        unstable: dict[int, int] = {}
        for i in scanned:
            if i in merged:
                continue
            c = pages[i]
            if c == 0 and use_zero:
                merged.add(i)
                zero_pages += 1
                changed = True
                continue
            room = [k for k, n in enumerate(dups.get(c, [])) if n < m]
            if room:
                dups[c][room[0]] += 1
            elif c in unstable:
                dups.setdefault(c, []).append(2)
                merged.add(unstable.pop(c))
            else:
                unstable[c] = i
                continue
            merged.add(i)
            changed = True
    return {
        "pages_shared": sum(len(d) for d in dups.values()),
        "pages_sharing": sum(n - 1 for d in dups.values() for n in d),
        "ksm_zero_pages": zero_pages,
        "rmap_items": len(scanned) - zero_pages,
        "stable_node_chains": sum(1 for d in dups.values() if len(d) >= 2),
        "stable_node_dups": sum(len(d) for d in dups.values() if len(d) >= 2),
    }


@settings(max_examples=150, deadline=None)
@given(
    pages=st.lists(st.integers(0, 6), min_size=0, max_size=120),
    m=st.integers(2, 7),
    use_zero=st.booleans(),
    zero_backed=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_the_view_equals_ksmd_page_by_page(
    pages: list[int], m: int, use_zero: bool, zero_backed: bool, seed: int
) -> None:
    order = np.random.default_rng(seed).permutation(len(pages)).tolist()
    expected = simulate_ksmd(pages, order, m, use_zero, zero_backed)
    counts = Counter(c for c in pages if c != 0)
    copies = np.array(list(counts.values()), dtype=np.int64)
    zero = pages.count(0)
    model = KsmModel(max_page_sharing=m, use_zero_pages=use_zero, zero_pages_backed=zero_backed)
    view = ksm_view(CopyCounts.of(copies), zero, len(pages), model)
    got = {k: getattr(view, k) for k in expected}
    assert got == expected


# --- the command line --------------------------------------------------------------------------


def test_analyze_json_has_the_kernels_counters(tmp_path: Path) -> None:
    vms = design_vms(11, [300, 300])
    paths = write_raw_images(tmp_path, vms)
    zero = sum(int((~vm.any(axis=1)).sum()) for vm in vms)
    base = ["analyze", "--sharing-only", "--format", "json", "--index-dir", str(tmp_path / "idx")]

    def ksm(*extra: str) -> dict[str, object]:
        result = CliRunner().invoke(cli, [*base, *extra, *map(str, paths)])
        assert result.exit_code == 0, result.output
        out: dict[str, object] = json.loads(result.stdout)["ksm"]
        return out

    default = ksm()
    assert {"pages_shared", "pages_sharing", "ksm_zero_pages", "general_profit_bytes"} <= set(default)
    assert default["zero_pages_in_dumps"] == zero and default["ksm_zero_pages"] == 0
    assert default["max_page_sharing"] == 256 and default["zero_pages_assumed"] == "untouched"
    merged = ksm("--ksm-use-zero-pages", "--ksm-zero-pages-backed")
    assert merged["ksm_zero_pages"] == zero and merged["pages_sharing"] == default["pages_sharing"]
    assert merged["general_profit_bytes"] == default["general_profit_bytes"] + zero * PAGE_SIZE
    backed = ksm("--ksm-zero-pages-backed", "--ksm-max-page-sharing", "2")
    assert backed["rmap_items"] == 600 and backed["max_page_sharing"] == 2
    assert backed["rmap_item_bytes"] == KSM_RMAP_ITEM_BYTES
    bad = CliRunner().invoke(cli, [*base, "--ksm-max-page-sharing", "1", str(paths[0])])
    assert bad.exit_code == 2 and "--ksm-max-page-sharing" in bad.output


@pytest.mark.parametrize(
    ("copies", "cap", "pages"),
    [([600], 256, 3), ([513], 256, 3), ([256, 2], 256, 2), ([5, 4, 3], 2, 3 + 2 + 2), ([100], 3, 34)],
)
def test_extra_ksm_pages_are_the_pages_beyond_one_per_content(
    copies: list[int], cap: int, pages: int
) -> None:
    """ceil(n / cap) host pages per content of n copies (its KSM pages and a copy left over),
    less one each: what the plan charges beyond sharing, and what the view's pages_sharing
    leaves of the copies."""
    counts = CopyCounts.of(np.array(copies, dtype=np.int64))
    assert ksm_extra_pages(counts, cap) == pages - len(copies)
    view = view_of(copies, max_page_sharing=cap)
    assert sum(copies) - view.pages_sharing == pages
