"""``-o -`` (and ``report --json -`` / ``--csv -``): standard output, as for most Unix tools.

Images go out in address order with their holes as zeros where stdout is a pipe, and sparse where
it is a file of its own; never to a terminal.  The plan file on stdout moves the plan's summary
to stderr.  A store is a directory, and several VMs need one: both refused.  No file named ``-``
is ever made."""

from __future__ import annotations

import errno
import io
import json
import os
import pty
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dengine_cli.errors import EXIT_OUTPUT, EXIT_USAGE
from dengine_cli.outputs import SequentialWriter, set_size
from tests.conftest import REPO

DENGINE = str(REPO / ".venv" / "bin" / "dengine")


def run(
    *args: str, cwd: Path, stdout: int | None = subprocess.PIPE, quiet: bool = True
) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [DENGINE, *(["-q"] if quiet else []), *args],
        stdout=stdout,
        stderr=subprocess.PIPE,
        cwd=cwd,
        timeout=120,
        env={**os.environ, "XDG_CACHE_HOME": str(cwd / "cache")},
    )


@pytest.fixture
def work(tmp_path: Path) -> Path:
    (tmp_path / "cache").mkdir()
    return tmp_path


def no_dash_file(work: Path) -> None:
    assert not (work / "-").exists()


def test_extract_to_a_pipe_and_to_a_redirected_file(real_dump: Callable[[str], Path], work: Path) -> None:
    """The image on a pipe is the image `-o FILE` writes, holes as zeros; redirected to a file,
    the same bytes, sparse as the file image is."""
    dump = str(real_dump("alpha.kdump"))
    assert run("extract", dump, "-o", "img", cwd=work).returncode == 0
    image = (work / "img").read_bytes()
    r = run("extract", dump, "-o", "-", cwd=work)
    assert r.returncode == 0, r.stderr
    assert r.stdout == image
    with open(work / "redirected", "wb") as f:
        r = run("extract", dump, "-o", "-", cwd=work, stdout=f.fileno(), quiet=False)
    assert r.returncode == 0, r.stderr
    assert r.stderr.decode().splitlines() == [f"standard output: {len(image)} bytes, 8160 pages present"]
    assert (work / "redirected").read_bytes() == image
    assert os.stat(work / "redirected").st_blocks <= os.stat(work / "img").st_blocks
    assert os.stat(work / "redirected").st_blocks * 512 < len(image)
    no_dash_file(work)


def test_an_image_is_not_written_to_a_terminal(real_dump: Callable[[str], Path], work: Path) -> None:
    """Neither as `-o -` nor as `-o /dev/stdout` (nor any terminal named): exit 6, one line."""
    master, slave = pty.openpty()
    try:
        dump, tty = str(real_dump("alpha.kdump")), os.ttyname(slave)
        dash = run("extract", dump, "-o", "-", cwd=work, stdout=slave)
        named = run("extract", dump, "-o", tty, cwd=work)
    finally:
        os.close(slave)
        os.close(master)
    assert dash.returncode == EXIT_OUTPUT
    assert dash.stderr.decode().splitlines() == [
        "dengine: standard output: cannot write: it is a terminal: redirect it, or give a file"
    ]
    assert named.returncode == EXIT_OUTPUT
    assert named.stderr.decode().splitlines() == [
        f"dengine: {tty}: cannot write: it is a terminal: redirect it, or give a file"
    ]
    no_dash_file(work)


def test_a_closed_pipe_ends_an_image_quietly(real_dump: Callable[[str], Path], work: Path) -> None:
    """`extract -o - | head -c 100`: exit 141 and nothing on stderr (no traceback)."""
    r = subprocess.run(
        f"'{DENGINE}' -q extract '{real_dump('alpha.elf')}' -o - | head -c 100 > /dev/null; "
        "echo ${PIPESTATUS[0]} >&2",
        shell=True,
        executable="/bin/bash",
        capture_output=True,
        cwd=work,
        timeout=120,
        env={**os.environ, "XDG_CACHE_HOME": str(work / "cache")},
    )
    assert r.stderr.decode().splitlines() == ["141"]


def test_plan_file_on_stdout_summary_on_stderr(real_dump: Callable[[str], Path], work: Path) -> None:
    dump = str(real_dump("alpha.elf"))
    assert run("plan", dump, "-o", "plan.json", cwd=work).returncode == 0
    r = run("plan", dump, "-o", "-", "--format", "json", cwd=work, quiet=False)
    assert r.returncode == 0, r.stderr
    assert r.stdout == (work / "plan.json").read_bytes()
    summary = json.loads(r.stderr)
    assert summary["vms"][0]["name"] == dump
    quiet = run("plan", dump, "-o", "-", cwd=work)
    assert quiet.returncode == 0 and quiet.stdout == r.stdout and quiet.stderr == b""
    no_dash_file(work)


def test_report_parts_on_stdout(real_dump: Callable[[str], Path], work: Path) -> None:
    dump = str(real_dump("alpha.elf"))
    r = run("report", dump, "-o", "-", cwd=work)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(b"<!DOCTYPE html>") and r.stdout.rstrip().endswith(b"</html>")
    r = run("report", dump, "-o", "r.html", "--json", "-", cwd=work)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["schema"] == "dengine.report/1"
    assert (work / "r.html").read_bytes().startswith(b"<!DOCTYPE html>")
    r = run("report", dump, "-o", "-", "--csv", "-", cwd=work)
    assert r.returncode == EXIT_USAGE and r.stdout == b""
    assert b"only one of -o, --json and --csv can be -" in r.stderr
    no_dash_file(work)


def test_restore_one_vm_to_stdout(real_dump: Callable[[str], Path], work: Path) -> None:
    """One VM restores to a pipe, raw and ELF, as to a file; several VMs, or a store, on
    standard output are usage errors that write nothing."""
    dumps = [str(real_dump("alpha.elf")), str(real_dump("beta.qevm"))]
    assert run("plan", *dumps, "-o", "plan.json", cwd=work).returncode == 0
    r = run("apply", "plan.json", "-o", "-", cwd=work)
    assert r.returncode == EXIT_USAGE and b"a store is a directory" in r.stderr
    assert run("apply", "plan.json", "-o", "store", cwd=work).returncode == 0
    for fmt in ("raw", "elf"):
        assert run("restore", "store", "1", "--format", fmt, "-o", f"beta.{fmt}", cwd=work).returncode == 0
        r = run("restore", "store", "1", "--format", fmt, "-o", "-", cwd=work)
        assert r.returncode == 0, r.stderr
        assert r.stdout == (work / f"beta.{fmt}").read_bytes()
    r = run("restore", "store", "-o", "-", cwd=work)
    assert r.returncode == EXIT_USAGE and r.stdout == b""
    assert b"2 VMs go to a directory, not standard output" in r.stderr
    no_dash_file(work)


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.tuples(st.integers(0, 9000), st.binary(min_size=1, max_size=700)), max_size=12),
    st.integers(0, 20000),
)
def test_sequential_writer_writes_what_a_file_would_hold(writes: list[tuple[int, bytes]], tail: int) -> None:
    """Writes at ascending offsets (gaps between them), then the size set: the bytes a pipe gets
    are those of a regular file written with seeks and truncated to the same size."""
    pipe, file = io.BytesIO(), io.BytesIO()
    seq = SequentialWriter(pipe)  # type: ignore[arg-type]
    at = 0
    for gap, data in writes:
        at += gap
        seq.seek(at)
        file.seek(at)
        seq.write(data)
        file.write(data)
        at += len(data)
    size = at + tail
    seq.pad_to(size)
    file.truncate(size)
    if size > len(file.getvalue()):
        file.seek(size - 1)
        file.write(b"\0")
    assert seq.tell() == size
    assert pipe.getvalue() == file.getvalue()


def test_sequential_writer_refuses_to_go_back(tmp_path: Path) -> None:
    with open(tmp_path / "f", "wb") as f:
        seq = SequentialWriter(f)
        seq.seek(4096)
        seq.write(b"x" * 10)
        with pytest.raises(OSError) as e:
            seq.seek(0)
        assert e.value.errno == errno.ESPIPE
        set_size(seq, 8192)  # type: ignore[arg-type]
        assert seq.tell() == 8192


def test_in_process_stdout_without_a_descriptor(real_dump: Callable[[str], Path], work: Path) -> None:
    """The CLI run inside another program, whose stdout has no descriptor (click's runner): `-o -`
    writes through it, the image in order."""
    from click.testing import CliRunner

    from dengine_cli.cli import cli

    dump = str(real_dump("alpha.kdump"))
    assert run("extract", dump, "-o", "img", cwd=work).returncode == 0
    assert run("plan", dump, "-o", "plan.json", cwd=work).returncode == 0
    runner = CliRunner()
    env = {"XDG_CACHE_HOME": str(work / "cache")}
    image = runner.invoke(cli, ["-q", "extract", dump, "-o", "-"], env=env)
    assert image.exit_code == 0, image.output
    assert image.stdout_bytes == (work / "img").read_bytes()
    plan = runner.invoke(cli, ["-q", "plan", dump, "-o", "-"], env=env)
    assert plan.exit_code == 0, plan.output
    assert plan.stdout_bytes == (work / "plan.json").read_bytes()


@pytest.mark.parametrize(
    "args", [["info", "DUMP"], ["extract", "DUMP", "-o", "-"], ["plan", "DUMP", "-o", "-"]]
)
def test_a_closed_stdout_is_refused_in_one_line(
    args: list[str], real_dump: Callable[[str], Path], work: Path
) -> None:
    """`dengine ... >&-`: exit 6 and one line, no traceback, nothing written (was an internal
    error, a traceback, for every command)."""
    argv = " ".join(str(real_dump("alpha.elf")) if a == "DUMP" else a for a in args)
    r = subprocess.run(
        f"'{DENGINE}' {argv} >&-",
        shell=True,
        executable="/bin/bash",
        capture_output=True,
        cwd=work,
        timeout=120,
        env={**os.environ, "XDG_CACHE_HOME": str(work / "cache")},
    )
    assert r.returncode == EXIT_OUTPUT
    assert r.stderr.decode().splitlines() == [
        "dengine: standard output: cannot write: it is closed (give a file, or /dev/null)"
    ]
    assert sorted(p.name for p in work.iterdir()) == ["cache"]


def test_tables_in_a_pipe_end_their_lines_with_text(real_dump: Callable[[str], Path], work: Path) -> None:
    """Tables on a pipe carry no padding after their last column: every line of `info`,
    `analyze` (and `--matrix`), `plan`, `apply` and `verify` ends in what it prints, so `diff`,
    `wc -L` and `column` see the text as drawn; the rows are all there."""
    dumps = [str(real_dump("alpha.elf")), str(real_dump("beta.elf"))]
    assert run("plan", "-o", "plan.json", *dumps, cwd=work).returncode == 0
    commands = (
        ["info", *dumps],
        ["analyze", *dumps],
        ["analyze", "--matrix", *dumps],
        ["plan", *dumps],
        ["apply", "plan.json", "-o", "store"],
        ["verify", "store"],
    )
    for args in commands:
        r = run(*args, cwd=work)
        assert r.returncode == 0, (args, r.stderr)
        text = r.stdout.decode()
        lines = text.splitlines()
        padded = [line for line in lines if line != line.rstrip()]
        assert not padded, (args, padded[:3])
        if args[0] == "verify":  # one summary line
            assert lines[-1].startswith("store: ok: 2 VMs"), lines
        else:
            assert len(lines) > 3, args
            assert "alpha.elf" in text and "beta.elf" in text, args
