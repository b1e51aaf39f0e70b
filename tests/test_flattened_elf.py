"""Flattened ELF vmcores (``makedumpfile -F -E``): read in place through the record index, as
flattened kdump files are.  Checked against real makedumpfile output (and its ``-R``
reassembly, and libkdumpfile on that), against the real QEMU ELF fixture flattened by the
builder with records cut anywhere, and on bad input."""

from __future__ import annotations

import shutil
import struct
import subprocess
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dengine_cli.errors import EXIT_BAD_DUMP, FormatError
from dengine_cli.formats import open_dump
from dengine_cli.formats.base import Dump
from tests.builders.elf import Note, Segment, build_elf, qemu_note, vmcoreinfo_note
from tests.builders.flattened import every, flatten_file
from tests.conftest import REPO, needs_oracle, oracle_pages, page_digests, read_pages

PAGE = 4096
MAKEDUMPFILE = shutil.which("makedumpfile")
needs_makedumpfile = pytest.mark.skipif(MAKEDUMPFILE is None, reason="makedumpfile is not installed")


def digests(dump: Dump) -> dict[int, bytes]:
    out: dict[int, bytes] = {}
    for b in dump.scan():
        out.update(page_digests(b.gfns, b.pages))
    return out


def same_pages(a: Dump, b: Dump) -> None:
    assert np.array_equal(a.gfns, b.gfns)
    assert digests(a) == digests(b)
    # Random access too: every 97th page, and a run crossing the records.
    sample = a.gfns[::97]
    assert np.array_equal(a.pages_at(sample), b.pages_at(sample))


def standard_elf(qemu_elf: bytes) -> bytes:
    """The segments and notes of a QEMU ELF dump in the plain layout makedumpfile accepts
    (makedumpfile 1.7.2 refuses QEMU 7.2's own layout: "Can't get the number of PT_LOAD")."""
    phoff = struct.unpack_from("<Q", qemu_elf, 32)[0]
    phentsize, phnum = struct.unpack_from("<HH", qemu_elf, 54)
    segments, notes = [], []
    for i in range(phnum):
        p_type, _, off, vaddr, paddr, filesz, memsz, _ = struct.unpack_from(
            "<IIQQQQQQ", qemu_elf, phoff + i * phentsize
        )
        if p_type == 1:
            segments.append(Segment(paddr, qemu_elf[off : off + filesz], memsz=memsz, vaddr=vaddr))
        elif p_type == 4:
            blob, pos = qemu_elf[off : off + filesz], 0
            while pos + 12 <= len(blob):
                namesz, descsz, ntype = struct.unpack_from("<III", blob, pos)
                name = blob[pos + 12 : pos + 12 + namesz].split(b"\0")[0].decode()
                desc_at = pos + 12 + (namesz + 3) // 4 * 4
                notes.append(Note(name, ntype, blob[desc_at : desc_at + descsz]))
                pos = desc_at + (descsz + 3) // 4 * 4
    return build_elf(segments, notes=notes).data


# --- real makedumpfile output ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def makedumpfile_flat(real_dump: Callable[[str], Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``makedumpfile -F -E -d 0`` of the real QEMU fixture's pages, in the plain ELF layout."""
    if MAKEDUMPFILE is None:
        pytest.skip("makedumpfile is not installed")
    out = tmp_path_factory.mktemp("makedumpfile")
    source = out / "std.elf"
    source.write_bytes(standard_elf(real_dump("alpha.elf").read_bytes()))
    flat = out / "std.flat"
    with flat.open("wb") as f:
        r = subprocess.run([MAKEDUMPFILE, "-F", "-E", "-d", "0", str(source)], stdout=f, capture_output=False,
                           stderr=subprocess.PIPE)  # fmt: skip
    assert r.returncode == 0, r.stderr.decode()
    return flat


def reassembled(flat: Path) -> Path:
    """``makedumpfile -R``: the real tool turns the stream back into an ELF file."""
    out = flat.with_suffix(".reassembled.elf")
    if out.exists():
        return out
    with flat.open("rb") as f:
        r = subprocess.run([MAKEDUMPFILE or "makedumpfile", "-R", str(out)], stdin=f, capture_output=True)
    assert r.returncode == 0, r.stderr.decode()
    return out


@needs_makedumpfile
def test_makedumpfile_flattened_elf_reads_as_its_reassembly(
    makedumpfile_flat: Path, real_dump: Callable[[str], Path]
) -> None:
    data = makedumpfile_flat.read_bytes()
    assert data[:12] == b"makedumpfile"
    with open_dump(makedumpfile_flat) as flat, open_dump(reassembled(makedumpfile_flat)) as plain:
        assert flat.facts.format == "elf"
        assert flat.facts.extra["container"] == "flattened"
        assert flat.facts.extra["osrelease"] == plain.facts.extra["osrelease"]
        assert flat.facts.skipped == plain.facts.skipped
        same_pages(flat, plain)
        # And the guest RAM is the QEMU dump's, page for page (makedumpfile -d 0 keeps it all).
        with open_dump(real_dump("alpha.elf")) as qemu:
            same_pages(flat, qemu)


@needs_makedumpfile
@needs_oracle
def test_makedumpfile_flattened_elf_against_libkdumpfile(makedumpfile_flat: Path) -> None:
    # Debian's libkdumpfile 0.5.1 cannot read flattened files: it reads makedumpfile -R's output.
    fmt, oracle = oracle_pages(reassembled(makedumpfile_flat))
    assert fmt == "elf"
    with open_dump(
        makedumpfile_flat,
    ) as flat:
        mine = digests(flat)
    # libkdumpfile keeps the device memory dengine leaves out; on RAM the two agree.
    assert mine == {g: d for g, d in oracle.items() if g in mine}
    assert len(mine) == 8160


# --- the real QEMU ELF flattened by the builder ----------------------------------------------------


@pytest.mark.parametrize(
    ("name", "cuts"),
    [
        ("64k-records-unaligned", lambda n: every(65536, n, first=0x6F0)),
        ("1000-byte-records", lambda n: every(1000, n)),
        ("page-aligned", lambda n: every(4096 * 7, n)),
    ],
)
def test_real_qemu_elf_flattened_anyhow(
    tmp_path: Path, real_dump: Callable[[str], Path], name: str, cuts: Callable[[int], list[int]]
) -> None:
    qemu = real_dump("alpha.elf")
    data = qemu.read_bytes()
    flat = tmp_path / f"{name}.flat"
    flat.write_bytes(flatten_file(data, cuts(len(data)), shuffle_seed=7, rewrite=[(0, 64), (64, 400)]))
    with open_dump(flat) as d, open_dump(qemu) as ref:
        assert d.facts.extra["container"] == "flattened"
        same_pages(d, ref)


# --- property: any ELF, any cuts ---------------------------------------------------------------------


@st.composite
def elf_and_cuts(draw: st.DrawFn) -> tuple[bytes, list[int], int]:
    n = draw(st.integers(1, 4))
    segments, addr = [], 0
    for k in range(n):
        addr += draw(st.integers(0, 3)) * PAGE + draw(st.sampled_from([0, 0, 0x10, 0x800]))
        size = draw(st.integers(1, 5)) * PAGE + draw(st.sampled_from([0, 0, 0x100]))
        payload = bytes([k + 1]) * 16 + bytes(range(256)) * (size // 256) + b"\x5a" * (size % 256)
        segments.append(Segment(addr, payload[:size]))
        addr += size
    data = build_elf(segments, notes=[vmcoreinfo_note()]).data
    cuts = draw(st.lists(st.integers(1, len(data) - 1), max_size=40))
    return data, cuts, draw(st.integers(0, 1000))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=elf_and_cuts())
def test_any_record_cut_reads_as_the_plain_file(tmp_path: Path, case: tuple[bytes, list[int], int]) -> None:
    data, cuts, seed = case
    plain = tmp_path / "plain.elf"
    plain.write_bytes(data)
    flat = tmp_path / "any.flat"
    flat.write_bytes(flatten_file(data, cuts, shuffle_seed=seed))
    with open_dump(flat) as d, open_dump(plain) as ref:
        assert read_pages(d, 3) == read_pages(ref, 5)


def test_hole_reads_as_zeros_like_the_reassembled_file(tmp_path: Path) -> None:
    # A range no record holds is zeros in the file makedumpfile -R writes; so here.
    data = bytearray(build_elf([Segment(0, bytes(range(256)) * 64)], notes=[qemu_note()]).data)
    at = len(data) - 3 * PAGE
    data[at : at + PAGE] = bytes(PAGE)
    flat = tmp_path / "hole.flat"
    flat.write_bytes(flatten_file(bytes(data), every(PAGE, len(data)), holes=[(at, PAGE)]))
    plain = tmp_path / "hole.elf"
    plain.write_bytes(bytes(data))
    with open_dump(flat) as d, open_dump(plain) as ref:
        assert read_pages(d, 4) == read_pages(ref, 4)


# --- bad input -----------------------------------------------------------------------------------------


def test_segment_beyond_the_reassembled_file(tmp_path: Path) -> None:
    built = build_elf([Segment(0, bytes(4 * PAGE))])
    data = built.data
    cut = len(data) - 2 * PAGE  # the last two pages are in no record: the file ends before them
    flat = tmp_path / "short.flat"
    flat.write_bytes(flatten_file(data[:cut], every(PAGE, cut)))
    with pytest.raises(FormatError) as e:
        open_dump(flat)
    assert e.value.exit_code == EXIT_BAD_DUMP
    assert str(e.value) == (
        f"{flat}: at offset {4096 + 16 + built.phdr_offsets[0]:#x}: expected PT_LOAD data at "
        f"{4096 + 16 * 2 + 0x1000:#x} + 0x4000 within the file, found the reassembled ELF file "
        f"ending at {cut:#x}"
    )


def test_truncated_stream(tmp_path: Path) -> None:
    data = build_elf([Segment(0, bytes(4 * PAGE))]).data
    stream = flatten_file(data, every(PAGE, len(data)))
    flat = tmp_path / "cut.flat"
    flat.write_bytes(stream[: len(stream) - 16 - 100])  # the end marker and 100 bytes of a page gone
    last = 4096 + 4 * (16 + PAGE)
    with pytest.raises(FormatError) as e:
        open_dump(flat)
    assert str(e.value) == (
        f"{flat}: at offset {last:#x}: expected a flattened record: offset >= 0 and 0 < size <= the "
        f"bytes left in the file, found offset 16384, size 4096 (beyond the end of file at "
        f"{len(stream) - 116:#x})"
    )


def test_cli_info_on_flattened_elf(tmp_path: Path) -> None:
    data = build_elf([Segment(0, bytes(range(256)) * 16 * 8)], notes=[qemu_note(), vmcoreinfo_note()]).data
    flat = tmp_path / "vm.flat"
    flat.write_bytes(flatten_file(data, every(5000, len(data))))
    r = subprocess.run(
        [str(REPO / ".venv" / "bin" / "dengine"), "info", "--json", str(flat)], capture_output=True, text=True
    )
    assert r.returncode == 0, r.stderr
    assert '"container": "flattened"' in r.stdout
    assert '"format": "elf"' in r.stdout
