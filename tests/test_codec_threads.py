"""Codecs and readers used by several threads at once give what one thread gives (plans
measured by threads: test_codec_pool.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from dengine_cli.codecs import COMPRESSION_CODECS, PATCH_CODECS
from dengine_cli.formats import open_dump
from dengine_cli.pages import PAGE_SIZE
from dengine_cli.parallel.threads import map_in_threads
from tests.builders.kdump import build_kdump


def _pages(seed: int, n: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    pages = rng.integers(0, 8, (n, PAGE_SIZE), dtype=np.uint8)  # compressible
    pages[::5] = rng.integers(0, 256, (len(pages[::5]), PAGE_SIZE), dtype=np.uint8)
    pages[::7] = 0
    return pages


@pytest.mark.parametrize("codec", COMPRESSION_CODECS, ids=lambda c: c.name)
def test_compression_codec_in_threads(codec: Any) -> None:
    pages = _pages(1, 400)
    alone = codec.compressed_sizes(pages)
    parts = map_in_threads(lambda k: codec.compressed_sizes(pages[k::4]), range(4), 4)
    together = np.empty_like(alone)
    for k in range(4):
        together[k::4] = parts[k]
    assert together.tolist() == alone.tolist()
    blobs = map_in_threads(lambda i: codec.compress(pages[i]), range(len(pages)), 4)
    back = map_in_threads(lambda b: codec.decompress(b), blobs, 4)
    assert all(bytes(p) == b for p, b in zip(pages, back, strict=True))


@pytest.mark.parametrize("codec", [c for c in PATCH_CODECS if c.releases_gil], ids=lambda c: c.name)
def test_patch_codec_in_threads(codec: Any) -> None:
    refs = _pages(2, 200)
    pages = refs.copy()
    pages[:, ::301] ^= 0x5A
    alone = codec.patch_sizes(refs, pages)
    parts = map_in_threads(lambda k: codec.patch_sizes(refs[k::4], pages[k::4]), range(4), 4)
    together = np.empty_like(alone)
    for k in range(4):
        together[k::4] = parts[k]
    assert together.tolist() == alone.tolist()
    patches = map_in_threads(lambda i: codec.diff(refs[i], pages[i]), range(len(pages)), 4)
    back = map_in_threads(lambda i: codec.apply(refs[i], patches[i]), range(len(pages)), 4)
    assert all(bytes(p) == b for p, b in zip(pages, back, strict=True))


def test_zstd_kdump_read_by_threads(tmp_path: Path) -> None:
    pages = {g: bytes(_pages(3 + g, 1)[0]) for g in range(300)}
    path = tmp_path / "vm.kdump"
    path.write_bytes(build_kdump(pages, codec="zstd").data)
    with open_dump(path) as dump:
        order = np.arange(dump.page_count, dtype=np.int64)
        chunks = map_in_threads(lambda k: dump.pages_at(dump.gfns[order[k::3]]), range(3), 3)
        for k, chunk in enumerate(chunks):
            for row, g in zip(chunk, dump.gfns[order[k::3]].tolist(), strict=True):
                assert bytes(row) == pages[g]
