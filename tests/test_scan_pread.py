"""PageTableDump.scan reads every stored page with pread (runs back to back, at QEMU's 4104-byte
stride, far apart) and must give exactly what the mapping holds, for any layout, batch size and
range: a property test against batches(), which reads the mapping."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dengine_cli.formats.base import SIDE_PAGE, ZERO_PAGE, GuestFacts, PageTableDump, Source, map_file

PAGE = 4096


@st.composite
def layouts(draw: st.DrawFn) -> tuple[list[tuple[str, int]], int, int, int]:
    """Pieces of a page table: ("run", n) back to back, ("stream", n) at stride 4104,
    ("far", n) 3 pages apart, ("zero", n) stored nowhere, ("side", n) side pages."""
    kinds = st.sampled_from(["run", "stream", "far", "zero", "side"])
    pieces = draw(st.lists(st.tuples(kinds, st.integers(1, 40)), min_size=1, max_size=12))
    total = sum(n for _, n in pieces)
    start = draw(st.integers(0, total))
    stop = draw(st.integers(start, total))
    return pieces, draw(st.integers(1, 300)), start, stop


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=layouts())
def test_scan_reads_what_the_mapping_holds(
    tmp_path: Path, case: tuple[list[tuple[str, int]], int, int, int]
) -> None:
    pieces, max_pages, start, stop = case
    rng = np.random.default_rng(len(pieces) * 1000 + max_pages)
    blob = bytearray()
    offsets: list[int] = []
    side_rows: list[bytes] = []
    for kind, n in pieces:
        for _ in range(n):
            page = rng.integers(0, 256, PAGE, dtype=np.uint8).tobytes()
            if kind == "zero":
                offsets.append(ZERO_PAGE)
            elif kind == "side":
                offsets.append(SIDE_PAGE - len(side_rows))
                side_rows.append(page)
            else:
                gap = {"run": 0, "stream": 8, "far": 2 * PAGE + 1}[kind]
                blob += bytes(gap)
                offsets.append(len(blob))
                blob += page
    blob += bytes(PAGE)
    path = tmp_path / "table.bin"
    path.write_bytes(bytes(blob))
    source = Source.of(path)
    side = np.frombuffer(b"".join(side_rows), dtype=np.uint8).reshape(-1, PAGE) if side_rows else None
    gfns = np.arange(len(offsets), dtype=np.uint64) * np.uint64(3)
    dump = PageTableDump(
        source, GuestFacts(format="test"), map_file(source), gfns, np.array(offsets, np.int64), side
    )
    scanned = [(b.gfns.copy(), b.pages.copy()) for b in dump.scan(max_pages, start=start, stop=stop)]
    mapped = [(b.gfns, b.pages) for b in dump.batches(max_pages, start=start, stop=stop)]
    got_g = np.concatenate([g for g, _ in scanned]) if scanned else np.zeros(0, np.uint64)
    want_g = np.concatenate([g for g, _ in mapped]) if mapped else np.zeros(0, np.uint64)
    assert np.array_equal(got_g, want_g)
    if scanned:
        assert np.array_equal(np.concatenate([p for _, p in scanned]), np.concatenate([p for _, p in mapped]))
