"""The plan's scope (kept pages, candidates, offered pages) against a page-by-page scan, for any
chunking and in mapped files alike."""

from __future__ import annotations

import tempfile
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from dengine_cli.arrays import ArrayHome
from dengine_cli.engine.plan.scope import scope_of


def scan(ids_all: list[np.ndarray], cross_vm: bool, hot: list[Any], want: bool) -> dict[str, Any]:
    """The scope by its definition, one page after the other in scan order."""
    everywhere: dict[int, int] = {}
    for ids in ids_all:
        for c in ids.tolist():
            everywhere[c] = everywhere.get(c, 0) + 1
    seen: set[int] = set()
    out: dict[str, Any] = {
        k: [] for k in ("kept", "kept_copies", "shared_kept", "candidate", "within", "across")
    }
    e: list[tuple[int, int, bool]] = []
    for v, ids in enumerate(ids_all):
        in_vm: dict[int, int] = {}
        for c in ids.tolist():
            in_vm[c] = in_vm.get(c, 0) + 1
        mine: set[int] = set()
        n = len(ids)
        kept, sk, cand = np.zeros(n, bool), np.zeros(n, bool), np.zeros(n, bool)
        copies_kept, within, across = [], 0, 0
        for i, c in enumerate(ids.tolist()):
            if c == 0:
                continue
            if c in mine:
                within += 1
                continue
            mine.add(c)
            if cross_vm and c in seen:
                across += 1
                continue
            seen.add(c)
            copies = everywhere[c] if cross_vm else in_vm[c]
            kept[i], sk[i] = True, copies > 1
            cand[i] = want and copies == 1 and not (hot[v] is not None and hot[v][i])
            copies_kept.append(copies)
            e.append((v, i, bool(cand[i])))
        for key, value in zip(out, (kept, copies_kept, sk, cand, within, across), strict=True):
            out[key].append(value)
    out["e_vm"], out["e_pos"], out["e_cand"] = ([t[j] for t in e] for j in range(3))
    return out


@settings(max_examples=80, deadline=None)
@given(
    sizes=st.lists(st.integers(0, 120), min_size=1, max_size=5),
    contents=st.integers(1, 40),
    cross_vm=st.booleans(),
    want=st.booleans(),
    seed=st.integers(0, 2**32 - 1),
    step=st.integers(1, 50),
)
def test_scope_is_a_scan_in_scan_order_for_any_chunks_and_in_files(
    sizes: list[int], contents: int, cross_vm: bool, want: bool, seed: int, step: int
) -> None:
    rng = np.random.default_rng(seed)
    ids_all = [rng.integers(0, contents + 1, n).astype(np.uint32) for n in sizes]
    hot = [None if rng.random() < 0.5 else rng.random(n) < 0.3 for n in sizes]
    expected = scan(ids_all, cross_vm, hot, want)
    sharing = SimpleNamespace(content_ids=tuple(ids_all), contents=contents)
    policy = SimpleNamespace(cross_vm=cross_vm)
    with tempfile.TemporaryDirectory() as folder:
        homes = [
            None,
            ArrayHome(work_bytes=step * 48, least_step=1),
            ArrayHome(Path(folder), work_bytes=step * 48, least_step=1),
        ]
        for home in homes:
            got = scope_of(sharing, policy, hot, want, home)  # type: ignore[arg-type]
            for key in ("kept", "shared_kept", "candidate", "kept_copies"):
                assert [a.tolist() for a in getattr(got, key)] == [
                    np.asarray(b).tolist() for b in expected[key]
                ], key
            assert got.within == expected["within"] and got.across == expected["across"]
            for key in ("e_vm", "e_pos", "e_cand"):
                assert getattr(got, key).tolist() == expected[key], key
            assert got.e_vm.dtype == got.e_pos.dtype == np.int64
        assert not list(Path(folder).iterdir())  # unlinked files only
