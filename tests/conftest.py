"""Shared test fixtures: the real QEMU dumps under fixtures/, decompressed once per session, and the
libkdumpfile oracle."""

from __future__ import annotations

import functools
import hashlib
import os
import struct
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zstandard

REPO = Path(__file__).resolve().parent.parent
FIXTURES = REPO / "fixtures"
SYSTEM_PYTHON = "/usr/bin/python3"


@pytest.fixture(scope="session")
def real_dump(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """``real_dump("alpha.elf")``: the path of that QEMU fixture, decompressed from ``.zst``
    once per session (or as committed, when it is not compressed)."""
    cache: dict[str, Path] = {}
    out_dir = tmp_path_factory.mktemp("real-dumps")

    def get(name: str) -> Path:
        if name in cache:
            return cache[name]
        plain = FIXTURES / name
        packed = FIXTURES / (name + ".zst")
        if plain.exists():
            cache[name] = plain
        elif packed.exists():
            target = out_dir / name
            with packed.open("rb") as src, target.open("wb") as dst:
                zstandard.ZstdDecompressor().copy_stream(src, dst)
            cache[name] = target
        else:
            raise FileNotFoundError(f"fixture {name} is missing: run fixtures/make_fixtures.py")
        return cache[name]

    return get


@functools.cache
def kdumpfile_available() -> bool:
    """Whether Debian's libkdumpfile bindings (python3-libkdumpfile) import under /usr/bin/python3."""
    if not Path(SYSTEM_PYTHON).exists():
        return False
    r = subprocess.run([SYSTEM_PYTHON, "-c", "import kdumpfile"], capture_output=True)
    return r.returncode == 0


#: Set to 1 (as CI may) to make the oracle tests fail rather than skip when the oracle is missing.
REQUIRE_ORACLE = "DENGINE_REQUIRE_ORACLE"

#: Marks tests that run the libkdumpfile oracle: they skip when it is not installed (`scripts/setup`
#: installs it) unless DENGINE_REQUIRE_ORACLE=1, and run it, never a stand-in, when it is.
needs_oracle = pytest.mark.skipif(
    not kdumpfile_available() and os.environ.get(REQUIRE_ORACLE) != "1",
    reason=f"Debian python3-libkdumpfile is not installed for {SYSTEM_PYTHON}",
)


def oracle_pages(
    path: Path, zero_excluded: bool = False, scan_kphys: bool = False
) -> tuple[str, dict[int, bytes]]:
    """What libkdumpfile reads from ``path``: its format name and {pfn: blake2b-128 digest}.
    ``scan_kphys``: probe every pfn through KPHYSADDR (xc_core: guest pfns, see the script)."""
    if not kdumpfile_available():
        pytest.fail(f"the libkdumpfile oracle is required but does not import under {SYSTEM_PYTHON}")
    args = [SYSTEM_PYTHON, str(REPO / "tests" / "oracle_kdumpfile.py"), str(path)]
    if zero_excluded:
        args.append("zero_excluded")
    if scan_kphys:
        args.append("scan_kphys")
    r = subprocess.run(args, capture_output=True, check=True)
    fmt = r.stdout[:24].rstrip(b"\0").decode()
    body = r.stdout[24:]
    assert len(body) % 24 == 0, f"the oracle wrote a torn record: {r.stderr.decode()}"
    pages: dict[int, bytes] = {}
    for i in range(0, len(body), 24):
        (pfn,) = struct.unpack_from("<Q", body, i)
        pages[pfn] = body[i + 8 : i + 24]
    return fmt, pages


def page_digests(gfns: np.ndarray, pages: np.ndarray) -> dict[int, bytes]:  # type: ignore[type-arg]
    """The same digests as :func:`oracle_pages`, for pages read by dengine."""
    return {int(g): hashlib.blake2b(pages[i].tobytes(), digest_size=16).digest() for i, g in enumerate(gfns)}


def read_pages(dump: Any, batch: int) -> dict[int, bytes]:
    """Every page a dump yields, {gfn: bytes}, read in batches of ``batch`` pages (small sizes
    exercise batch boundaries); each batch must come in strictly ascending gfn order."""
    out: dict[int, bytes] = {}
    for b in dump.batches(batch):
        assert np.all(np.diff(b.gfns.astype(np.int64)) > 0)
        for g, p in zip(b.gfns.tolist(), b.pages, strict=True):
            out[g] = p.tobytes()
    return out


def tmpfs(path: Path, size: int) -> bool:
    """Mount a tmpfs of ``size`` bytes at ``path`` (made here); False where that cannot be done
    (not root). The caller unmounts it (``umount``)."""
    path.mkdir()
    r = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True
    )
    return r.returncode == 0
