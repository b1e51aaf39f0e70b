"""The command line as a user meets it: exit codes, one-line errors, clean stdout, no partial files."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import click
import numpy as np
import pytest
from click.testing import CliRunner

from dengine_cli.cli import cli
from dengine_cli.errors import EXIT_BAD_DUMP, EXIT_OUTPUT, EXIT_UNREADABLE, EXIT_USAGE
from tests.vms import write_raw_image

PAGE = 4096


def filled_image(pages: int, nonzero: dict[int, int]) -> bytes:
    """A raw image of ``pages`` pages, page g filled with byte ``nonzero[g]``, the rest zero."""
    image = np.zeros((pages, PAGE), dtype=np.uint8)
    for g, byte in nonzero.items():
        image[g] = byte
    return image.tobytes()


def run(*args: str, input: str | None = None) -> tuple[int, str, str]:
    r = CliRunner().invoke(cli, list(args), input=input)
    return r.exit_code, r.stdout, r.stderr


def test_info_json_counts_pages_and_zero_pages(tmp_path: Path) -> None:
    write_raw_image(tmp_path / "a.raw", filled_image(40, {3: 1, 4: 2, 39: 9}))
    code, out, err = run("info", "--json", str(tmp_path / "a.raw"))
    assert code == 0, err
    doc = json.loads(out)
    assert doc["schema"] == "dengine.info/1"
    (d,) = doc["dumps"]
    assert (d["format"], d["pages_present"], d["zero_pages"], d["max_gfn"]) == ("raw", 40, 37, 39)
    assert d["ranges"] == [{"start": "0x0", "end": "0x28000", "pages": 40}]


def test_info_table_names_the_dump_and_counts(tmp_path: Path) -> None:
    write_raw_image(tmp_path / "a.raw", filled_image(8, {1: 5}))
    code, out, _ = run("info", str(tmp_path / "a.raw"))
    assert code == 0
    assert "a.raw" in out
    assert "pages present     8 (32.0 KiB)" in out
    assert "zero pages        7 (87.5%)" in out


def test_dump_lists_from_stdin_and_file(tmp_path: Path) -> None:
    for name in ("a.raw", "b.raw"):
        write_raw_image(tmp_path / name, filled_image(4, {0: 1}))
    listing = tmp_path / "list.txt"
    listing.write_text(f"# two dumps\n{tmp_path / 'a.raw'}\n\n{tmp_path / 'b.raw'}\n")
    code, out, _ = run("info", "--json", f"@{listing}")
    assert code == 0
    assert [d["path"] for d in json.loads(out)["dumps"]] == [str(tmp_path / n) for n in ("a.raw", "b.raw")]
    code, out, _ = run("info", "--json", "-", input=f"{tmp_path / 'b.raw'}\n")
    assert code == 0
    assert [d["path"] for d in json.loads(out)["dumps"]] == [str(tmp_path / "b.raw")]


def test_extract_writes_a_sparse_image_equal_to_the_input(tmp_path: Path) -> None:
    data = filled_image(64, {0: 1, 10: 2, 11: 3, 63: 4})
    write_raw_image(tmp_path / "a.raw", data)
    out = tmp_path / "out.img"
    code, stdout, err = run("extract", str(tmp_path / "a.raw"), "-o", str(out))
    assert code == 0, err
    assert stdout == ""
    assert out.read_bytes() == data
    # Zero pages are holes: the image occupies far less than its length.
    assert out.stat().st_blocks * 512 < len(data) // 2


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (
            ["info", "{d}/missing.raw"],
            EXIT_UNREADABLE,
            "dengine: {d}/missing.raw: cannot read: No such file or directory",
        ),
        (["info", "{d}"], EXIT_UNREADABLE, "dengine: {d}: cannot read: is a directory"),
        (
            ["info", "{d}/hello.txt"],
            EXIT_BAD_DUMP,
            "dengine: {d}/hello.txt: at offset 0x0: expected the magic of a known dump format "
            "(see `dengine formats`), found 68 65 6c 6c 6f 0a",
        ),
        (
            ["info", "{d}/empty.raw"],
            EXIT_BAD_DUMP,
            "dengine: {d}/empty.raw: at offset 0x0: expected the magic",
        ),
        (
            ["info", "@{d}/no-list"],
            EXIT_UNREADABLE,
            "dengine: {d}/no-list: cannot read: No such file or directory",
        ),
        (
            ["info", "--format", "nonsense", "{d}/hello.txt"],
            EXIT_USAGE,
            "Invalid value for '--dump-format' / '--format'",
        ),
    ],
)
def test_bad_input_gives_one_line_and_exit_code(
    tmp_path: Path, args: list[str], code: int, message: str
) -> None:
    (tmp_path / "hello.txt").write_text("hello\n")
    (tmp_path / "empty.raw").write_bytes(b"")
    d = str(tmp_path)
    got, out, err = run(*[a.format(d=d) for a in args])
    assert got == code
    assert out == ""
    assert message.format(d=d) in err
    assert "Traceback" not in err
    if code != EXIT_USAGE:
        assert err.count("\n") == 1


def test_unreadable_path_is_exit_3(tmp_path: Path) -> None:
    (tmp_path / "hello.txt").write_text("hello\n")
    code, _, err = run("info", str(tmp_path / "hello.txt" / "x.raw"))
    assert code == EXIT_UNREADABLE
    assert err == f"dengine: {tmp_path}/hello.txt/x.raw: cannot read: Not a directory\n"


def test_debug_shows_the_traceback(tmp_path: Path) -> None:
    (tmp_path / "hello.txt").write_text("hello\n")
    code, _, err = run("--debug", "info", str(tmp_path / "hello.txt"))
    assert code == EXIT_BAD_DUMP
    assert "Traceback" in err
    assert err.rstrip().endswith("found 68 65 6c 6c 6f 0a")


@pytest.mark.parametrize("where", ["before", "after"])
def test_debug_and_quiet_before_or_after_the_command(tmp_path: Path, where: str) -> None:
    """``dengine --debug info X`` and ``dengine info X --debug`` are the same, and so for ``-q``
    (click would refuse a group's option after the command's name)."""
    (tmp_path / "hello.txt").write_text("hello\n")
    hello = str(tmp_path / "hello.txt")
    debug = ["--debug", "info", hello] if where == "before" else ["info", hello, "--debug"]
    code, _, err = run(*debug)
    assert code == EXIT_BAD_DUMP
    assert "Traceback" in err and err.rstrip().endswith("found 68 65 6c 6c 6f 0a")
    image = str(write_raw_image(tmp_path / "a.raw", filled_image(8, {1: 1})))
    args = ["analyze", "--sharing-only", "--format", "json", "--index-dir", str(tmp_path / "i"), image, image]
    code, out, err = run(*args)
    assert code == 0 and "is given twice" in err  # a note on stderr, which -q silences
    quiet = ["-q", *args] if where == "before" else [*args[:1], "-q", *args[1:]]
    code, quiet_out, err = run(*quiet)
    assert (code, err) == (0, "")
    assert json.loads(quiet_out) == json.loads(out)


def test_extract_into_a_missing_directory_fails_cleanly(tmp_path: Path) -> None:
    write_raw_image(tmp_path / "a.raw", filled_image(2, {0: 1}))
    code, _, err = run("extract", str(tmp_path / "a.raw"), "-o", str(tmp_path / "no" / "out.img"))
    assert code == EXIT_OUTPUT
    assert err.startswith(f"dengine: {tmp_path}/no/out.img: cannot write:")


def test_failed_extract_leaves_no_file(tmp_path: Path) -> None:
    # A dump that fails while pages are read: a raw image forced as another format fails at open;
    # a truncated ELF is the reader's business.  Here the output directory holds nothing after.
    (tmp_path / "hello.txt").write_text("hello\n")
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    code, _, _ = run("extract", str(tmp_path / "hello.txt"), "-o", str(out_dir / "x.img"))
    assert code == EXIT_BAD_DUMP
    assert list(out_dir.iterdir()) == []


def test_formats_lists_every_reader() -> None:
    code, out, _ = run("formats")
    assert code == 0
    names = {line.split()[0] for line in out.splitlines() if line and not line.startswith(" ")}
    assert {"elf", "kdump", "raw", "lime", "xc-core", "qemu-stream", "libvirt-save"} <= names


@pytest.mark.parametrize("command", [["formats"], ["info", "--json"]])
def test_a_reader_that_went_away_is_exit_141_not_an_internal_error(
    tmp_path: Path, command: list[str]
) -> None:
    """`dengine ... | head -1`: click turns EPIPE into exit 1, our code for a bug; it must be the
    shell's 141 (128 + SIGPIPE), with nothing on stderr."""
    import os
    import subprocess
    import sys

    args = [*command, str(write_raw_image(tmp_path / "vm.raw", np.ones((8, 4096), np.uint8)))]
    if command == ["formats"]:
        args = command
    read, write = os.pipe()
    os.close(read)  # every write to stdout fails with EPIPE, whatever the scheduler does
    try:
        done = subprocess.run(
            [sys.executable, "-m", "dengine_cli", *args],
            stdout=write,
            stderr=subprocess.PIPE,
            timeout=120,
            env={**os.environ, "DENGINE_INDEX_DIR": str(tmp_path / "idx")},
        )
    finally:
        os.close(write)
    assert done.returncode == 141, done.stderr
    assert done.stderr == b""


@pytest.mark.parametrize(
    ("args", "line"),
    [
        (["nosuch"], "dengine: No such command 'nosuch'; see 'dengine --help'"),
        (["analyze"], "dengine: analyze: Missing argument 'DUMPS...'; see 'dengine analyze --help'"),
        (
            ["analyze", "--memory-limit", "1x", "a.raw"],
            "dengine: analyze: Invalid value for '--memory-limit': '1x' is not a size (examples: 512G, "
            "65536M, 1.5T); see 'dengine analyze --help'",
        ),
        (
            ["analyze", "--memory-limit", "8", "a.raw"],
            "dengine: analyze: Invalid value for '--memory-limit': '8' would be 8 bytes: give a unit "
            "(8M, 8G; 8B for bytes); see 'dengine analyze --help'",
        ),
        (
            ["index", "-j", "0", "a.raw"],
            "dengine: index: Invalid value for '-j' / '--jobs': 0 is not in the range x>=1; "
            "see 'dengine index --help'",
        ),
        (
            ["info", "--nosuch", "a.raw"],
            "dengine: info: No such option '--nosuch'; see 'dengine info --help'",
        ),
        (
            ["plan", "--history", "nope", "a.raw"],
            "dengine: plan: Invalid value for --history: 'nope' is not CURRENT=EARLIER; "
            "see 'dengine plan --help'",
        ),
    ],
)
def test_a_usage_error_is_one_line_as_every_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, args: list[str], line: str
) -> None:
    """Option and argument errors (click's) are one `dengine:` line naming the command, exit 2,
    like the errors dengine raises itself; `dengine` alone still prints the help."""
    monkeypatch.chdir(tmp_path)
    write_raw_image(tmp_path / "a.raw", filled_image(4, {1: 1}))
    code, out, err = run(*args)
    assert (code, out) == (EXIT_USAGE, "")
    assert err.splitlines() == [line]


def test_dengine_alone_prints_the_help() -> None:
    code, out, err = run()
    assert code == EXIT_USAGE
    assert "Commands:" in out + err and "analyze" in out + err


@pytest.mark.parametrize(
    ("fixture", "keep", "readers", "magic"),
    [
        ("alpha.elf", 4, "xc-core or elf", "7f 45 4c 46"),
        ("alpha.elf", 32, "xc-core or elf", "7f 45 4c 46"),
        ("alpha.kdump", -6, "kdump", "4b 44 55 4d 50 20 20 20"),  # b"KDUMP " of the magic "KDUMP   "
        ("alpha.qevm", 0, "qemu-stream", "51 45 56 4d"),  # 4 KiB of it, stream version 2
    ],
    ids=["elf-cut-after-magic", "elf-cut-in-header", "kdump-cut-in-magic", "qevm-version-2"],
)
def test_a_known_magic_with_a_header_no_reader_takes_says_so(
    real_dump: Callable[[str], Path], tmp_path: Path, fixture: str, keep: int, readers: str, magic: str
) -> None:
    """A file that starts with a reader's magic (or is cut within it) but whose header no
    reader of that magic takes is not "no known magic": the message names the readers, and the
    --dump-format it names gives that reader's own error."""
    if keep > 0:
        data = real_dump(fixture).read_bytes()[:keep]
    elif keep < 0:
        data = b"KDUMP   "[:-keep]
    else:
        data = bytearray(real_dump(fixture).read_bytes()[:4096])
        data[4:8] = (2).to_bytes(4, "big")
    path = tmp_path / f"vm{Path(fixture).suffix}"
    path.write_bytes(bytes(data))
    reader = readers.split()[-1]
    code, out, err = run("info", str(path))
    assert (code, out) == (EXIT_BAD_DUMP, "")
    ends = f" (the file ends at {len(data):#x})"  # all of it within the 64 KiB probed
    assert err.splitlines() == [
        f"dengine: {path}: at offset 0x0: expected a header {readers} reads after the magic {magic}, "
        f"found {bytes(data[:16]).hex(' ')}{ends}: --dump-format {reader} says what is wrong"
    ]
    code, _, err = run("info", "--dump-format", reader, str(path))
    assert code == EXIT_BAD_DUMP and len(err.splitlines()) == 1
    assert err.startswith(f"dengine: {path}: at offset") and "says what is wrong" not in err


@pytest.mark.parametrize(
    ("text", "size"),
    [("8B", 8), ("64K", 64 << 10), ("1048576", 1 << 20), ("1.5G", 3 << 29), ("2 MiB", 2 << 20)],
)
def test_sizes_with_a_unit_or_of_a_mebibyte_and_more(text: str, size: int) -> None:
    """A unit says what a number is (``8B``: bytes, as the tests' tiny memory limits are
    given); a bare number is taken as bytes from 1 MiB on, and refused below (a forgotten unit)."""
    from dengine_cli.cli import ByteSize

    assert ByteSize().convert(text, None, None) == size
    for bare in (str((1 << 20) - 1), "1e3", "8.5"):
        with pytest.raises(click.BadParameter, match="give a unit"):
            ByteSize().convert(bare, None, None)
