"""Xen xc_core dumps cut short (a full disk, a crash): the header note claims more pages than the
file holds.  Refused by default, with a message naming --partial; read with --partial for the
pages present, and then every output names exactly what the figures cover (the dump's name in
tables, JSON and CSV carries it; info lists it).  Checked against libkdumpfile, which reads the
pages present."""

from __future__ import annotations

import csv
import io
import json
import subprocess
from pathlib import Path

import numpy as np
import pytest

from dengine_cli.errors import EXIT_BAD_DUMP, FormatError
from dengine_cli.formats import open_dump
from dengine_cli.formats.base import OpenOptions
from tests.builders.xc_core import CUT_PFNS, build_xc_core, cut_page, cut_short
from tests.conftest import REPO, needs_oracle, oracle_pages, page_digests, read_pages

PAGE = 4096
DENGINE = str(REPO / ".venv" / "bin" / "dengine")
PFNS = CUT_PFNS
page = cut_page


def test_refused_by_default_naming_the_flag(tmp_path: Path) -> None:
    path, built, keep = cut_short(tmp_path)
    with pytest.raises(FormatError) as e:
        open_dump(path)
    assert e.value.exit_code == EXIT_BAD_DUMP
    shdr = built.shoff + built.index[".xen_pages"] * 64
    assert str(e.value) == (
        f"{path}: at offset {shdr:#x}: expected section {built.index['.xen_pages']} at "
        f"{built.pages_offset:#x} + 0x8000 within the file, found end of file at {keep:#x}"
    )
    r = subprocess.run([DENGINE, "info", str(path)], capture_output=True, text=True)
    assert r.returncode == EXIT_BAD_DUMP
    assert r.stderr.startswith(f"dengine: {path}: at offset")


@pytest.mark.parametrize("hvm", [True, False])
def test_partial_reads_the_pages_present_and_says_which(tmp_path: Path, hvm: bool) -> None:
    path, _, _ = cut_short(tmp_path, hvm=hvm)
    with open_dump(path, OpenOptions(partial=True)) as d:
        assert read_pages(d, 2) == {p: page(p) for p in PFNS[:5]}
        assert d.name == f"{path} (partial: 5 pages, .xen_pages entries 0-4 of the 8 claimed)"
        assert d.source.name == str(path)  # errors still name the file
        assert d.facts.extra["partial"] == {
            "pages_claimed": 8,
            "entries_read": 5,
            "pages_read": 5,
            "covers": ".xen_pages entries 0-4 of 8",
        }
        table = ".xen_pfn" if hvm else ".xen_p2m"
        assert d.facts.skipped == [
            "3 of the 8 pages the header note claims, which the file does not hold (cut short): the "
            f"figures cover .xen_pages/{table} entries 0-4 only (--partial)"
        ]


def test_note_claiming_more_than_the_section_holds(tmp_path: Path) -> None:
    # The headers disagree: .xen_pages and the table hold 3 pages, the note claims 8.
    entries = [(p, p, page(p)) for p in PFNS[:3]]
    built = build_xc_core(entries, hvm=True, nr_pages=8)
    path = tmp_path / "short.core"
    path.write_bytes(built.data)
    with pytest.raises(
        FormatError, match=r"found 3 pages \(0x3000 bytes\); --partial reads the 3 pages present"
    ):
        open_dump(path)
    with open_dump(path, OpenOptions(partial=True)) as d:
        assert read_pages(d, 4) == {p: page(p) for p in PFNS[:3]}
        assert "(partial: 3 pages, .xen_pages entries 0-2 of the 8 claimed)" in d.name


def test_complete_dump_is_the_same_with_partial(tmp_path: Path) -> None:
    built = build_xc_core([(p, p, page(p)) for p in PFNS], hvm=True, padding=2)
    path = tmp_path / "whole.core"
    path.write_bytes(built.data)
    with open_dump(path) as a, open_dump(path, OpenOptions(partial=True)) as b:
        assert read_pages(a, 3) == read_pages(b, 3)
        assert a.name == b.name == str(path)
        assert "partial" not in b.facts.extra


@needs_oracle
@pytest.mark.parametrize("hvm", [True, False])
def test_partial_agrees_with_libkdumpfile(tmp_path: Path, hvm: bool) -> None:
    # libkdumpfile reads the pages the file holds alike; past the end of the file it makes up
    # pages: the cut one padded with zeros, the missing ones all zeros.  dengine does not count
    # those as present: the dump does not hold them.
    path, _, _ = cut_short(tmp_path, hvm=hvm)
    fmt, oracle = oracle_pages(path, scan_kphys=True)
    assert fmt == "xc_core_elf"
    with open_dump(path, OpenOptions(partial=True)) as d:
        ours: dict[int, bytes] = {}
        for b in d.batches():
            ours.update(page_digests(b.gfns, b.pages))
    assert ours == {p: oracle[p] for p in PFNS[:5]}
    cut = np.zeros((1, PAGE), dtype=np.uint8)
    cut[0, :100] = np.frombuffer(page(PFNS[5])[:100], dtype=np.uint8)
    zero = np.zeros((1, PAGE), dtype=np.uint8)
    assert {p: oracle[p] for p in PFNS[5:]} == {
        PFNS[5]: page_digests(np.array([0]), cut)[0],
        PFNS[6]: page_digests(np.array([0]), zero)[0],
        PFNS[7]: page_digests(np.array([0]), zero)[0],
    }
    assert len(oracle) == len(PFNS)


def run(*args: str, index_dir: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([DENGINE, *args, "--index-dir", str(index_dir)], capture_output=True, text=True)


def test_every_output_names_what_the_figures_cover(tmp_path: Path) -> None:
    path, _, _ = cut_short(tmp_path)
    whole = tmp_path / "whole.core"
    whole.write_bytes(build_xc_core([(p, p, page(p)) for p in PFNS], hvm=True).data)
    label = f"{path} (partial: 5 pages, .xen_pages entries 0-4 of the 8 claimed)"
    cache = tmp_path / "cache"

    r = subprocess.run([DENGINE, "info", "--partial", "--json", str(path)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    (dump,) = doc["dumps"]
    assert dump["extra"]["partial"]["covers"] == ".xen_pages entries 0-4 of 8"
    assert dump["pages_present"] == 5
    r = subprocess.run([DENGINE, "info", "--partial", str(path)], capture_output=True, text=True)
    assert "the figures cover .xen_pages/.xen_pfn entries 0-4 only (--partial)" in " ".join(r.stdout.split())

    for command in ("analyze", "plan"):
        r = run(command, "--partial", "--format", "json", str(path), str(whole), index_dir=cache)
        assert r.returncode == 0, r.stderr
        assert label in r.stdout, command
        r = run(command, "--partial", "--format", "csv", str(path), str(whole), index_dir=cache)
        assert r.returncode == 0, r.stderr
        rows = list(csv.reader(io.StringIO(r.stdout)))
        assert any(label in row for row in rows), (command, rows[:3])
        r = run(command, "--partial", "--format", "table", str(path), str(whole), index_dir=cache)
        assert r.returncode == 0, r.stderr
        assert "(partial: 5 pages" in r.stdout, command


def test_an_index_built_with_partial_is_not_used_without(tmp_path: Path) -> None:
    path, _, _ = cut_short(tmp_path)
    cache = tmp_path / "cache"
    r = run("index", "--partial", str(path), index_dir=cache)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split("\t")[1:4] == ["5", "0", "built"]
    r = run("analyze", str(path), index_dir=cache)
    assert r.returncode == EXIT_BAD_DUMP, r.stdout
    assert r.stderr.startswith(f"dengine: {path}: at offset ")
    r = run("index", "--partial", str(path), index_dir=cache)
    assert r.stdout.split("\t")[3] == "cached"
