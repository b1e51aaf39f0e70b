"""The same paused guest, dumped by QEMU in every format it writes, must read as the same memory.

fixtures/alpha.{elf,kdump,qevm} come from one pause of a pc guest, beta.{elf,qevm} from one pause
of a q35 guest (fixtures/README.md).  `dengine extract` of each must give byte-identical images,
and the workload files the guests held must be found in them page by page.
"""

from __future__ import annotations

import hashlib
import json
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from dengine_cli.cli import cli
from tests.conftest import FIXTURES

sys.path.insert(0, str(FIXTURES))
from workload import workload_files

GROUPS = {"alpha": ["alpha.elf", "alpha.kdump", "alpha.qevm"], "beta": ["beta.elf", "beta.qevm"]}


def extract(path: Path, out: Path) -> bytes:
    r = CliRunner().invoke(cli, ["--quiet", "extract", str(path), "-o", str(out)])
    assert r.exit_code == 0, r.stderr
    return out.read_bytes()


@pytest.mark.parametrize("guest", sorted(GROUPS))
def test_every_format_extracts_to_the_same_image(
    guest: str, real_dump: Callable[[str], Path], tmp_path: Path
) -> None:
    images = {name: extract(real_dump(name), tmp_path / f"{name}.img") for name in GROUPS[guest]}
    digests = {name: hashlib.sha256(img).hexdigest() for name, img in images.items()}
    assert len(set(digests.values())) == 1, digests
    # The compressed fixture, read directly, gives the same image too.
    packed = extract(FIXTURES / f"{GROUPS[guest][0]}.zst", tmp_path / "packed.img")
    assert packed == images[GROUPS[guest][0]]


@pytest.mark.parametrize("guest", sorted(GROUPS))
def test_workload_pages_are_in_the_image(
    guest: str, real_dump: Callable[[str], Path], tmp_path: Path
) -> None:
    image = np.frombuffer(extract(real_dump(GROUPS[guest][-1]), tmp_path / "g.img"), dtype=np.uint8)
    pages = {p.tobytes() for p in image.reshape(-1, 4096)}
    files = workload_files(guest)
    assert files, "the workload generator gave no files"
    for name, data in files.items():
        missing = [i for i in range(0, len(data), 4096) if data[i : i + 4096] not in pages]
        assert missing == [], f"{name}: pages {missing[:5]} not found"


def test_info_json_of_every_fixture(real_dump: Callable[[str], Path]) -> None:
    manifest = json.loads((FIXTURES / "manifest.json").read_text())
    assert manifest
    names = [n for group in GROUPS.values() for n in group]
    r = CliRunner().invoke(cli, ["info", "--json", *(str(FIXTURES / f"{n}.zst") for n in names)])
    assert r.exit_code == 0, r.stderr
    dumps = json.loads(r.stdout)["dumps"]
    by_name = {Path(d["path"]).name.removesuffix(".zst"): d for d in dumps}
    formats = {n: by_name[n]["format"] for n in names}
    assert formats == {
        "alpha.elf": "elf",
        "alpha.kdump": "kdump",
        "alpha.qevm": "qemu-stream",
        "beta.elf": "elf",
        "beta.qevm": "qemu-stream",
    }
    for group in GROUPS.values():
        counts = {(by_name[n]["pages_present"], by_name[n]["zero_pages"]) for n in group}
        assert len(counts) == 1, counts
    assert by_name["alpha.qevm"]["machine"].startswith("pc-i440fx")
    assert by_name["beta.qevm"]["machine"].startswith("pc-q35")
    assert by_name["alpha.elf"]["pages_present"] == 32 * 1024 * 1024 // 4096 - 32  # less the VGA window


@pytest.mark.parametrize("name", ["alpha.elf", "alpha.kdump", "alpha.qevm", "beta.qevm"])
def test_a_page_table_moved_to_a_file_reads_the_same_pages(
    name: str, real_dump: Callable[[str], Path], tmp_path: Path
) -> None:
    # The session moves open dumps' page tables to mapped files past a quarter of the memory
    # limit (Session._bound_page_tables): every way of reading must give the same pages.
    from dengine_cli.formats import open_dump

    with open_dump(real_dump(name)) as kept, open_dump(real_dump(name)) as moved:
        moved.map_page_table(tmp_path)
        assert moved.page_table_bytes == kept.page_table_bytes > 0
        for attr in type(moved).PAGE_ARRAYS:
            array = getattr(moved, attr)
            assert not array.flags.writeable
            assert _mapping_of(array.ctypes.data).startswith(f"{tmp_path}/")  # an unlinked file
            assert np.array_equal(array, getattr(kept, attr))
        assert not list(tmp_path.iterdir())  # the file is unlinked from the start
        for a, b in zip(kept.batches(1000), moved.batches(1000), strict=True):
            assert np.array_equal(a.gfns, b.gfns) and np.array_equal(a.pages, b.pages)
        for a, b in zip(kept.scan(777), moved.scan(777), strict=True):
            assert np.array_equal(a.gfns, b.gfns) and np.array_equal(a.pages, b.pages)
        some = kept.gfns[:: max(1, len(kept.gfns) // 300)][::-1]
        assert np.array_equal(kept.pages_at(some), moved.pages_at(some))


def _mapping_of(address: int) -> str:
    """The path of what is mapped at ``address`` in this process (/proc/self/maps)."""
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split(maxsplit=5)
        lo, hi = (int(x, 16) for x in fields[0].split("-"))
        if lo <= address < hi:
            return fields[5] if len(fields) > 5 else ""
    return ""
