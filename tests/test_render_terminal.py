"""The terminal layout of `analyze`, `plan` and `info`: at 80 and 120 columns every line fits and
no number is cut (columns are left out instead, names fold), checked against golden files; a real
pseudo-terminal gets it from the command line, a pipe keeps the plain layout."""

from __future__ import annotations

import fcntl
import os
import pty
import struct
import subprocess
import sys
import termios
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from rich.cells import cell_len

from dengine_cli.engine.plan.model import PlanReport
from dengine_cli.engine.sharing.model import SharingReport
from dengine_cli.formats import open_dump
from dengine_cli.formats.base import OpenOptions
from dengine_cli.inspect import DumpInfo, describe
from dengine_cli.parallel import Workers
from dengine_cli.policies import named_policy
from dengine_cli.render import (
    TableUnit,
    breakdown_bar,
    render_info_terminal,
    render_plan,
    render_plan_terminal,
    render_sharing,
    render_sharing_terminal,
)
from dengine_cli.session import analyze
from tests.vms import write_raw_images

GOLDEN = Path(__file__).parent / "golden"
UPDATE_GOLDEN = "DENGINE_UPDATE_GOLDEN"
REPO = Path(__file__).resolve().parent.parent
FIXTURES = ("alpha.elf.zst", "beta.elf.zst", "alpha-later.elf.zst")


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> tuple[SharingReport, PlanReport]:
    """The three real fixture dumps planned under `de` beside `ksm`, with a host of 64 MiB."""
    from dengine_cli.session import share_and_plan

    idx = tmp_path_factory.mktemp("idx")
    paths = [REPO / "fixtures" / name for name in FIXTURES]
    return share_and_plan(
        paths,
        named_policy("de"),
        index_dir=idx,
        host_memory=64 << 20,
        baseline=named_policy("ksm"),
        workers=Workers(jobs=1),
    )


@pytest.fixture(scope="module")
def infos() -> list[DumpInfo]:
    found = []
    for name in FIXTURES[:1]:
        path = Path("fixtures") / name
        with open_dump(REPO / path) as dump:
            info = describe(dump, REPO / path)
        found.append(DumpInfo(**{**info.__dict__, "path": str(path)}))
    return found


def check_golden(name: str, text: str) -> None:
    golden = GOLDEN / name
    if os.environ.get(UPDATE_GOLDEN) == "1":
        golden.write_text(text)
    assert golden.is_file(), f"{golden} is missing: run with {UPDATE_GOLDEN}=1 to write it, then review it"
    assert text == golden.read_text()


def assert_fits(text: str, width: int) -> None:
    """Every line within ``width`` cells, and no cell cut short with an ellipsis."""
    for line in text.splitlines():
        assert cell_len(line) <= width, line
    assert "…" not in text


@pytest.mark.parametrize("width", [80, 120])
def test_analyze_terminal_golden(fleet: tuple[SharingReport, PlanReport], width: int) -> None:
    report, plan = fleet
    text = render_sharing_terminal(report, matrix=True, de=plan, width=width)
    assert_fits(text, width)
    check_golden(f"analyze-term-{width}.txt", text)


@pytest.mark.parametrize("width", [80, 120])
def test_plan_terminal_golden(fleet: tuple[SharingReport, PlanReport], width: int) -> None:
    _, plan = fleet
    text = render_plan_terminal(plan, width=width)
    assert_fits(text, width)
    check_golden(f"plan-term-{width}.txt", text)


@pytest.mark.parametrize("width", [80, 120])
def test_info_terminal_golden(infos: list[DumpInfo], width: int) -> None:
    text = render_info_terminal(infos, width=width)
    assert_fits(text, width)
    check_golden(f"info-term-{width}.txt", text)


def test_wide_shows_every_column_uncut(fleet: tuple[SharingReport, PlanReport]) -> None:
    """--wide at 80 columns: the table is as wide as it needs; every header of the plain
    layout's figures is there, and nothing is cut."""
    _, plan = fleet
    narrow = render_plan_terminal(plan, width=80)
    wide = render_plan_terminal(plan, width=80, wide=True)
    assert "…" not in wide
    assert max(cell_len(line) for line in wide.splitlines()) > 80
    for header in ("zero", "shared", "patched", "patches", "compressed", "hot", "paged"):
        assert header in wide
    assert "patches" not in narrow and "--wide shows every column" in narrow


def test_the_narrow_table_keeps_the_figures_that_matter(fleet: tuple[SharingReport, PlanReport]) -> None:
    """At 80 columns the plan still shows every VM's savings and VMs per host, in full."""
    _, plan = fleet
    text = render_plan_terminal(plan, width=80)
    for vm in [*plan.vms, plan.total]:
        assert f"{100 * vm.savings:.1f}" in text
        assert f" {vm.per_host} " in text or text.count(str(vm.per_host))


def test_breakdown_bar_cells_add_up() -> None:
    parts = [("zero", 5116), ("shared", 765), ("patched", 115), ("compressed", 283), ("remaining", 1881)]
    for width in (20, 37, 80, 101):
        bar = breakdown_bar(parts, width)
        assert len(bar.plain) == width
    assert breakdown_bar([("zero", 1), ("remaining", 0)], 30).plain == "░" * 30


def test_table_unit_keeps_ten_units_of_the_largest_vm() -> None:
    assert TableUnit.for_bytes(32 << 20).name == "MiB"
    assert TableUnit.for_bytes(4 << 30).name == "MiB"
    assert TableUnit.for_bytes(16 << 30).name == "GiB"
    assert TableUnit.for_bytes(100 << 10).name == "KiB"
    assert TableUnit.for_bytes(0).text(0) == "0"


def run_in_terminal(args: list[str], columns: int, env: dict[str, str]) -> str:
    """Run dengine with stdout on a pseudo-terminal of ``columns`` columns; its output."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 50, columns, 0, 0))
    proc = subprocess.Popen(
        [sys.executable, "-m", "dengine_cli", *args],
        stdout=slave,
        stderr=subprocess.DEVNULL,
        stdin=subprocess.DEVNULL,
        env=env,
        cwd=REPO,
    )
    os.close(slave)
    chunks = []
    while True:
        try:
            data = os.read(master, 1 << 16)
        except OSError:  # EIO: the child closed its side
            break
        if not data:
            break
        chunks.append(data)
    os.close(master)
    assert proc.wait(timeout=300) == 0
    return b"".join(chunks).decode().replace("\r\n", "\n")


@pytest.fixture()
def dengine_env(tmp_path: Path) -> Callable[[], dict[str, str]]:
    def make() -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES", "NO_COLOR")}
        env["DENGINE_INDEX_DIR"] = str(tmp_path / "idx")
        return env

    return make


def test_a_terminal_gets_the_terminal_layout(dengine_env: Callable[[], dict[str, str]]) -> None:
    """`dengine plan` on a real 80-column pseudo-terminal: lines fit, colour codes appear
    (NO_COLOR unset), and NO_COLOR turns them off."""
    args = ["plan", "fixtures/alpha.elf.zst", "fixtures/beta.elf.zst", "--jobs", "1"]
    env = dengine_env()
    coloured = run_in_terminal(args, 80, env)
    assert "\x1b[" in coloured
    env["NO_COLOR"] = "1"
    plain = run_in_terminal(args, 80, env)
    assert "\x1b[" not in plain
    assert_fits(plain, 80)
    assert "Memory of each VM under policy de" in plain


def test_a_pipe_keeps_the_plain_layout(fleet: tuple[SharingReport, PlanReport], tmp_path: Path) -> None:
    """Piped, `dengine plan` prints exactly render_plan's plain layout (240 wide, every column)."""
    args = ["plan", *(f"fixtures/{n}" for n in FIXTURES), "--host-memory", "64M", "--jobs", "1"]
    env = {**os.environ, "DENGINE_INDEX_DIR": str(tmp_path / "idx")}
    out = subprocess.run(
        [sys.executable, "-m", "dengine_cli", *args], cwd=REPO, env=env, capture_output=True, check=True
    ).stdout.decode()
    _, plan = fleet
    expected = render_plan(plan, width=240).replace(str(REPO / "fixtures") + "/", "fixtures/")
    assert "Memory of each VM" not in out
    # Only the run-time line may differ (it is the same model, so it should not).
    assert out == expected


def test_names_are_text_not_markup(tmp_path: Path) -> None:
    """A dump named like rich markup keeps its name in every table."""
    import numpy as np

    from dengine_cli.formats.base import OpenOptions
    from dengine_cli.render import render_sharing
    from dengine_cli.session import analyze

    paths = [tmp_path / "[bold]web.raw", tmp_path / "db[1].raw"]
    for p in paths:
        p.write_bytes(np.ones((4, 4096), np.uint8).tobytes())
    report = analyze(paths, OpenOptions(format="raw"), index_dir=tmp_path / "i", workers=Workers(jobs=1))
    for text in (render_sharing(report, width=120), render_sharing_terminal(report, width=120)):
        assert "[bold]web.raw" in text and "db[1].raw" in text


def _matrix_back(text: str, n: int) -> np.ndarray:
    """The matrix read back from the blocks printed after the matrix heading."""
    back = np.full((n, n), -1, dtype=np.int64)
    lines = text[text.index("Pages saved by placing") :].splitlines()[1:]
    cols: list[int] = []
    for line in lines:
        cells = line.split()
        if cells[:1] == ["vm"]:
            cols = [int(c.strip("[]")) for c in cells[1:]]
        elif cells[:1] and cells[0].startswith("[") and cols:
            values = cells[-len(cols) :]
            back[int(cells[0].strip("[]")), cols] = [int(v) for v in values]
    return back


@pytest.mark.parametrize("terminal", [False, True])
def test_a_wide_matrix_is_folded_into_blocks_that_fit(tmp_path: Path, terminal: bool) -> None:
    """60 VMs: the matrix is printed in blocks of columns no wider than the output (a pipe's 240
    columns, a terminal's 100), every header and number whole, and reads back to the matrix."""
    rng = np.random.default_rng(9)
    library = rng.integers(0, 256, (10, 4096), dtype=np.uint8)
    paths = write_raw_images(tmp_path, [library[rng.integers(0, 10, 3)] for _ in range(60)])
    report = analyze(paths, OpenOptions(format="raw"), index_dir=tmp_path / "idx")
    if terminal:
        text, width = render_sharing_terminal(report, matrix=True, width=100), 100
    else:
        text, width = render_sharing(report, matrix=True, width=240), 240
    matrix_part = text[text.index("Pages saved by placing") :]
    assert "…" not in matrix_part
    assert max(cell_len(line) for line in matrix_part.splitlines()) <= width
    assert matrix_part.count("\n vm ") + matrix_part.count("\n  vm ") >= 2  # folded
    assert np.array_equal(_matrix_back(text, 60), report.matrix)
