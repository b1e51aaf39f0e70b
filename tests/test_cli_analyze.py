"""`dengine index` and `dengine analyze` from the command line, checked against a count done the
simple way: a dict from page bytes to where they occur."""

from __future__ import annotations

import csv
import io
import json
import os
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest

from dengine_cli.engine.sharing.model import SharingReport
from dengine_cli.parallel import Workers
from dengine_cli.render import render_sharing
from tests.commands import invoke
from tests.vms import write_raw_image

GOLDEN = Path(__file__).parent / "golden"
#: Set to 1 to rewrite the golden files from this run instead of comparing with them.
UPDATE_GOLDEN = "DENGINE_UPDATE_GOLDEN"


def make_vms(tmp_path: Path) -> list[Path]:
    rng = np.random.default_rng(7)
    base = rng.integers(0, 256, (40, 4096), dtype=np.uint8)
    a = np.zeros((200, 4096), np.uint8)
    a[10:50] = base
    a[60:70] = base[:10]  # shared within a
    b = np.zeros((120, 4096), np.uint8)
    b[0:20] = base[20:40]  # shared across
    b[30:50] = rng.integers(0, 256, (20, 4096), dtype=np.uint8)
    c = np.zeros((50, 4096), np.uint8)
    c[1:5] = base[0]  # one content four times, also in a
    images = {"a.raw": a, "b.raw": b, "c.raw": c}
    return [write_raw_image(tmp_path / name, image) for name, image in images.items()]


def simple_count(paths: list[Path], cross_vm: bool) -> list[dict[str, int]]:
    """Figures per VM by the definitions in the man page, from a plain dict."""
    seen_global: set[bytes] = set()
    where: dict[bytes, int] = defaultdict(int)
    for p in paths:
        data = p.read_bytes()
        for i in range(0, len(data), 4096):
            where[data[i : i + 4096]] += 1
    out = []
    for p in paths:
        data = p.read_bytes()
        seen_here: set[bytes] = set()
        row = dict(present=0, zero=0, within=0, across=0, kept=0, unique=0)
        for i in range(0, len(data), 4096):
            page = data[i : i + 4096]
            row["present"] += 1
            if not any(page):
                row["zero"] += 1
            elif page in seen_here:
                row["within"] += 1
            elif cross_vm and page in seen_global:
                row["across"] += 1
            else:
                row["kept"] += 1
                row["unique"] += where[page] == 1
            if any(page):
                seen_here.add(page)
        seen_global |= seen_here
        out.append(row)
    return out


@pytest.mark.parametrize("cross_vm", [True, False])
def test_analyze_json_equals_simple_count(tmp_path: Path, cross_vm: bool) -> None:
    paths = make_vms(tmp_path)
    flags = [] if cross_vm else ["--no-cross-vm"]
    code, out, err = invoke(
        "analyze",
        "--format",
        "json",
        "--index-dir",
        str(tmp_path / "idx"),
        "-j",
        "1",
        *flags,
        *map(str, paths),
    )
    assert code == 0, err
    doc = json.loads(out)
    assert doc["schema"] == "dengine.analyze/1"
    assert "matrix" not in doc
    want = simple_count(paths, cross_vm)
    got = [
        dict(
            present=v["pages_present"],
            zero=v["zero_pages"],
            within=v["shared_within_vm"],
            across=v["shared_across_vms"],
            kept=v["kept_pages"],
            unique=v["unique_pages"],
        )
        for v in doc["vms"]
    ]
    assert got == want
    assert doc["total"]["kept_pages"] == sum(w["kept"] for w in want)
    assert doc["total"]["footprint_bytes"] == 4096 * sum(w["kept"] for w in want)


def test_analyze_csv_and_matrix(tmp_path: Path) -> None:
    paths = make_vms(tmp_path)
    idx = str(tmp_path / "idx")
    code, out, _ = invoke("analyze", "--format", "csv", "--index-dir", idx, *map(str, paths))
    assert code == 0
    rows = list(csv.DictReader(io.StringIO(out)))
    assert [r["vm"] for r in rows] == [*map(str, paths), "total"]
    assert int(rows[-1]["pages_present"]) == 370
    code, out, _ = invoke("analyze", "--format", "csv", "--matrix", "--index-dir", idx, *map(str, paths))
    assert code == 0
    matrix = list(csv.reader(io.StringIO(out)))
    assert matrix[0] == ["vm", *map(str, paths)]
    # a-b share base[20:40] (20 contents); a-c share base[0] (1); b-c nothing; a within: 10.
    assert [row[1:] for row in matrix[1:]] == [["10", "20", "1"], ["20", "0", "0"], ["1", "0", "3"]]


def test_index_then_analyze_reuses_the_cache(tmp_path: Path) -> None:
    paths = make_vms(tmp_path)
    idx = str(tmp_path / "idx")
    code, out, _ = invoke("index", "--index-dir", idx, *map(str, paths))
    assert code == 0
    lines = [line.split("\t") for line in out.splitlines()]
    assert [(f[0], f[1], f[3]) for f in lines] == [
        (str(paths[0]), "200", "built"),
        (str(paths[1]), "120", "built"),
        (str(paths[2]), "50", "built"),
    ]
    assert all(Path(f[4]).exists() for f in lines)
    code, out, _ = invoke("index", "--index-dir", idx, *map(str, paths))
    assert [line.split("\t")[3] for line in out.splitlines()] == ["cached"] * 3


def test_analyze_bad_dump_names_it(tmp_path: Path) -> None:
    paths = make_vms(tmp_path)
    bad = tmp_path / "bad.elf"
    bad.write_bytes(b"\x7fELF" + b"\x00" * 10)
    code, out, err = invoke("analyze", "--index-dir", str(tmp_path / "idx"), str(paths[0]), str(bad))
    assert code == 4
    assert out == ""
    assert err.startswith(f"dengine: {bad}: at offset 0x")
    # The caches write to ".tmp-*" names and rename (cache/files.py): none may stay behind, and
    # an index that is there is whole: indexing the good dump again reads it rather than builds it.
    idx = tmp_path / "idx"
    left = sorted(p.name for p in idx.iterdir()) if idx.exists() else []
    assert [name for name in left if name.startswith(".tmp-")] == []
    code, out, err = invoke("index", "--index-dir", str(idx), str(paths[0]))
    assert code == 0, err
    (fields,) = [line.split("\t") for line in out.splitlines()]
    assert fields[3] == ("cached" if left else "built")
    assert left in ([], [Path(fields[4]).name])


def test_sharing_table_golden(tmp_path: Path) -> None:
    """The table equals the committed tests/golden/analyze-table.txt.  A missing golden fails;
    DENGINE_UPDATE_GOLDEN=1 rewrites it from this run (review the diff before committing)."""
    from dengine_cli.session import analyze

    paths = make_vms(tmp_path)
    report: SharingReport = analyze(paths, index_dir=tmp_path / "idx", workers=Workers(jobs=1))
    text = render_sharing(report, matrix=True, width=100).replace(str(tmp_path) + "/", "")
    golden = GOLDEN / "analyze-table.txt"
    if os.environ.get(UPDATE_GOLDEN) == "1":
        golden.write_text(text)
    assert golden.is_file(), f"{golden} is missing: run with {UPDATE_GOLDEN}=1 to write it, then review it"
    assert text == golden.read_text()


def test_index_prune_removes_only_stale_indexes(tmp_path: Path) -> None:
    paths = make_vms(tmp_path)
    idx = tmp_path / "idx"
    code, out, _ = invoke("index", "--index-dir", str(idx), *map(str, paths))
    assert code == 0
    files = {Path(line.split("\t")[0]).name: Path(line.split("\t")[4]) for line in out.splitlines()}
    paths[1].write_bytes(paths[1].read_bytes())  # rewritten: same bytes, new ctime
    paths[2].unlink()
    (idx / ".tmp-interrupted.idx").write_bytes(b"half")
    (idx / "notes.txt").write_text("not ours")
    code, out, err = invoke("index", "--prune", "--index-dir", str(idx))
    assert code == 0
    assert out == ""
    assert "removed 3 stale cache files" in err and "kept 1" in err
    assert sorted(p.name for p in idx.iterdir()) == sorted([files["a.raw"].name, "notes.txt"])
    # The kept index is still used.
    code, out, _ = invoke("index", "--index-dir", str(idx), str(paths[0]))
    assert out.split("\t")[3] == "cached"


def test_index_needs_dumps_unless_pruning(tmp_path: Path) -> None:
    code, _, err = invoke("index", "--index-dir", str(tmp_path))
    assert code == 2
    assert "no dumps given" in err
