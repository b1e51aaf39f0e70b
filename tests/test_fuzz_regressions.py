"""Every crash the fuzzer found (``python -m tests.fuzz``), as a minimal input built here, with
the one-line error and exit code a user must get instead."""

from __future__ import annotations

import json
import random
import struct
from pathlib import Path

import pytest
from click.testing import CliRunner

from dengine_cli.cli import cli
from dengine_cli.errors import EXIT_BAD_DUMP, EXIT_OUTPUT
from tests.builders import elf as elfb
from tests.builders import kdump as kdumpb
from tests.builders import qemu_stream as qevmb
from tests.builders import xc_core as xcb
from tests.fuzz.campaign import make_case, select_seeds
from tests.fuzz.runner import Limits, preload, run_tasks

PAGE = 4096


def run(*args: str) -> tuple[int, str, str]:
    r = CliRunner().invoke(cli, ["--quiet", *args])
    return r.exit_code, r.stdout, r.stderr


def one_error_line(err: str) -> str:
    """The only line of stderr, which must be ``dengine: ...``."""
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("dengine: "), err
    return lines[0]


def every_command(path: Path, tmp_path: Path, code: int) -> list[str]:
    """info, extract and analyze on ``path`` all fail with ``code``; their error lines."""
    out = tmp_path / "out" / "flat.raw"
    out.parent.mkdir(exist_ok=True)
    lines = []
    for args in (
        ["info", str(path)],
        ["extract", str(path), "-o", str(out)],
        ["analyze", str(path), "--index-dir", str(tmp_path / "index"), "-j", "1"],
    ):
        got, _, err = run(*args)
        assert got == code, (args, err)
        lines.append(one_error_line(err))
    assert not out.exists()
    return lines


@pytest.mark.parametrize("flattened", [False, True])
def test_kdump_descriptor_offset_near_2_63_is_a_lie_not_an_index_error(
    tmp_path: Path, flattened: bool
) -> None:
    # Fuzz case 368 (seed 0): desc.offset = 0x7fffffffffffffff; offset + size wrapped in int64 and
    # passed the "inside the file" check, then indexing the mapping failed (IndexError, exit 1).
    pages = {g: random.Random(g).randbytes(PAGE) for g in range(4)}
    kf = kdumpb.build_kdump(pages, codec="zlib", desc_override={2: (0x7FFF_FFFF_FFFF_FFFF, 100, 1)})
    path = tmp_path / "lying.kdump"
    path.write_bytes(kdumpb.flatten(kf) if flattened else kf.data)
    for line in every_command(path, tmp_path, EXIT_BAD_DUMP):
        assert "expected a page descriptor pointing inside the kdump file" in line
        assert "found data at offset 0x7fffffffffffffff, size 100 (pfn 0x2)" in line


def test_qemu_stream_block_name_in_an_error_stays_on_one_line(tmp_path: Path) -> None:
    # Fuzz case 138 (seed 0): a MEM_SIZE name length too long swallowed the next bytes, newlines
    # included, and the error printed them raw: a message of four lines.
    w = qevmb.StreamWriter()
    w.config("pc-i440fx-7.2")
    w.start(2)
    w.mem_size([("pc.ram\n\x07\x00bios", 0x1234)], total=0x2000)
    w.eos()
    path = tmp_path / "bad-name.qevm"
    path.write_bytes(w.bytes())
    for line in every_command(path, tmp_path, EXIT_BAD_DUMP):
        assert "found 'pc.ram\\n\\x07\\x00bios' of 0x1234 bytes" in line


def test_xc_core_pfn_past_64_bit_addresses_is_malformed(tmp_path: Path) -> None:
    # Fuzz cases 403, 795, 1439 (seed 0): a .xen_pfn entry of 2**63 (not ~0, which means padding)
    # made extract seek past the largest file offset (ValueError / OverflowError, exit 1).
    entries = [(pfn, 0, random.Random(pfn).randbytes(PAGE)) for pfn in range(3)]
    built = xcb.build_xc_core(entries, hvm=True)
    data = bytearray(built.data)
    struct.pack_into("<Q", data, built.table_offset + 8, 1 << 63)
    path = tmp_path / "lying.core"
    path.write_bytes(bytes(data))
    for line in every_command(path, tmp_path, EXIT_BAD_DUMP):
        assert f"at offset {built.table_offset + 8:#x}: expected a pfn below 0x10000000000000" in line
        assert "found pfn 0x8000000000000000 at entry 1" in line


def test_extract_of_a_page_past_2_63_cannot_be_written(tmp_path: Path) -> None:
    # Fuzz case 28 (seed 0): an ELF PT_LOAD at p_paddr 2**63 - 1 is inside the 64-bit physical
    # address space, but its flat image would end past the largest file offset: f.seek raised
    # ValueError (exit 1).  Now: exit 6, nothing written.
    seg = elfb.Segment(0x7FFF_FFFF_FFFF_F000, random.Random(1).randbytes(2 * PAGE))
    path = tmp_path / "high.elf"
    path.write_bytes(elfb.build_elf([seg]).data)
    out = tmp_path / "out" / "flat.raw"
    out.parent.mkdir()
    code, _, err = run("extract", str(path), "-o", str(out))
    assert code == EXIT_OUTPUT
    assert one_error_line(err) == (
        f"dengine: {out}: cannot write: the image would be 0x8000000000001000 bytes, "
        "more than a file can hold"
    )
    assert list(out.parent.iterdir()) == []
    code, _, err = run("info", str(path))
    assert code == 0, err


def test_elf_segment_at_2_63_is_read_not_an_overflow(tmp_path: Path) -> None:
    # Fuzz case 6048 (seed 0): a PT_LOAD at p_paddr 2**63 made the page table's offsets
    # (gfn * 4096 - p_paddr, in int64) overflow (OverflowError, exit 1) in every command.
    pages = [random.Random(k).randbytes(PAGE) for k in range(3)]
    segs = [elfb.Segment(0, pages[0]), elfb.Segment(1 << 63, pages[1] + pages[2])]
    path = tmp_path / "high.elf"
    path.write_bytes(elfb.build_elf(segs).data)
    code, out, err = run("info", "--json", str(path))
    assert code == 0, err
    (d,) = json.loads(out)["dumps"]
    assert d["ranges"] == [
        {"start": "0x0", "end": "0x1000", "pages": 1},
        {"start": "0x8000000000000000", "end": "0x8000000000002000", "pages": 2},
    ]
    assert d["zero_pages"] == 0  # the pages at 2**63 are read from their data, not zeros
    code, _, err = run("extract", str(path), "-o", str(tmp_path / "flat.raw"))
    assert code == EXIT_OUTPUT
    assert "more than a file can hold" in one_error_line(err)


def test_elf_zero_tail_of_a_terabyte_is_refused_before_allocating(tmp_path: Path) -> None:
    # Fuzz cases 6664, 8514 (seed 0): p_memsz 1 TiB past a one-page p_filesz, within the old
    # 1 TiB budget, made a 4 GiB page table of zero pages stored nowhere (MemoryError under the
    # fuzzer's 1 GiB address-space bound).  The budget is 16 GiB now.
    seg = elfb.Segment(0, random.Random(2).randbytes(PAGE), memsz=1 << 40)
    path = tmp_path / "tail.elf"
    built = elfb.build_elf([seg])
    path.write_bytes(built.data)
    for line in every_command(path, tmp_path, EXIT_BAD_DUMP):
        assert line.endswith(
            f"at offset {built.phdr_offsets[0]:#x}: expected at most 0x400000000 bytes of zero pages "
            "past p_filesz in all PT_LOADs, found p_memsz 0x10000000000 with p_filesz 0x1000"
        )


#: The failing cases of the 10,000-case campaign of seed 0, replayed through the harness itself
#: (same mutant, same three command lines): each must now pass.
FOUND = (28, 138, 368, 403, 795, 984, 990, 1035, 1076, 1159, 1439, 6048, 6664, 8514)


def test_the_cases_the_campaign_found_now_pass(tmp_path: Path) -> None:
    preload()
    seeds = select_seeds(None)
    tasks = [t for n in FOUND for t in make_case(n, 0, seeds, tmp_path).tasks]
    outcomes = list(run_tasks(iter(tasks), 2, Limits()))
    assert len(outcomes) == 3 * len(FOUND)
    failed = [(o.task.case, o.task.command, o.problems, o.stderr[-300:]) for o in outcomes if not o.ok]
    assert failed == []
