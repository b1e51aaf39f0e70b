"""Findings of a bad-input review of the command line: every usage error ends with the pointer to
its command's help, an output `report` cannot create is found before any work, and `restore`
names the images of VMs that share a name by the VMs' own numbers."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import pytest

from dengine_cli.errors import EXIT_BAD_DUMP, EXIT_OUTPUT, EXIT_USAGE
from tests.commands import invoke_quiet as invoke
from tests.vms import design_vms, write_raw_image

NO_FILES = Path("/proc/dengine-cannot-be-here")  # /proc takes no new files, even from root
needs_proc = pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs /proc")


@pytest.fixture
def plan_file(real_dump: Callable[[str], Path], tmp_path: Path) -> Path:
    out = tmp_path / "alpha.plan.json"
    code, _, err = invoke("plan", "--baseline", "none", "--index-dir", str(tmp_path / "idx"), "-o", str(out),
                          str(real_dump("alpha.elf")))  # fmt: skip
    assert code == 0, err
    return out


@pytest.mark.parametrize(
    ("args", "line"),
    [
        (
            ["plan", "--policy", "nosuch", "{alpha}"],
            "dengine: plan: unknown policy 'nosuch'; known: ksm, esx, de, de-share-patch, de-share-compress; "
            "see 'dengine plan --help'",
        ),
        (
            ["plan", "--policy", "{d}", "{alpha}"],
            "dengine: plan: {d}: cannot read policy file: is a directory; see 'dengine plan --help'",
        ),
        (
            ["report", "-o", "{d}/r.html", "--vm", "bad", "{alpha}"],
            "dengine: report: --vm: 'bad' is not NAME=DUMP,DUMP,...; see 'dengine report --help'",
        ),
        (
            ["report", "-o", "{d}/r.html", "--vm", "a={alpha}", "--vm", "a={beta}"],
            "dengine: report: --vm: VM 'a' is given twice; see 'dengine report --help'",
        ),
        (
            ["report", "-o", "{d}/r.html", "{alpha}", "{plan}"],
            "dengine: report: give either dumps or plan files (dengine plan -o), not both; "
            "see 'dengine report --help'",
        ),
        (
            ["info", "--dump-format", "nosuch", "{alpha}"],
            "dengine: info: Invalid value for '--dump-format' / '--format': 'nosuch' is not one of",
        ),
        # click's own, raised in a command's body: the same form (as before).
        (["report", "-o", "{d}/r.html"], "dengine: report: no dumps given; see 'dengine report --help'"),
    ],
    ids=[
        "unknown-policy",
        "policy-dir",
        "vm-spec",
        "vm-twice",
        "dumps-and-plans",
        "click-choice",
        "click-body",
    ],
)
def test_every_usage_error_ends_with_its_commands_help(
    real_dump: Callable[[str], Path], plan_file: Path, tmp_path: Path, args: list[str], line: str
) -> None:
    """A usage error dengine raises itself (a policy, --vm, dumps and plans mixed) is one line
    naming the command and pointing to its help, as click's own are: exit 2, nothing on stdout,
    nothing written."""
    names = {"d": str(tmp_path), "alpha": str(real_dump("alpha.elf")), "beta": str(real_dump("beta.elf"))}
    code, out, err = invoke(*[a.format(plan=plan_file, **names) for a in args])
    assert (code, out) == (EXIT_USAGE, ""), err
    (got,) = err.splitlines()
    assert got.startswith(line.format(**names)), got
    cmd = args[0]
    assert got.endswith(f"; see 'dengine {cmd} --help'"), got
    assert not (tmp_path / "r.html").exists()


def test_a_usage_error_of_a_store_points_to_restore(real_dump: Callable[[str], Path], plan_file: Path,
                                                    tmp_path: Path) -> None:  # fmt: skip
    """A VM the store does not have (raised where the store is read) points to `restore --help`."""
    store = tmp_path / "store"
    code, _, err = invoke("apply", str(plan_file), "-o", str(store))
    assert code == 0, err
    code, _, err = invoke("restore", str(store), "gamma", "-o", str(tmp_path / "x"))
    assert code == EXIT_USAGE
    assert err.splitlines() == [
        f"dengine: restore: {store}: no VM called 'gamma' (1 VM: 0 {real_dump('alpha.elf')}); "
        "see 'dengine restore --help'"
    ]
    assert not (tmp_path / "x").exists()


@needs_proc
@pytest.mark.parametrize(
    ("flag", "command"),
    [("-o", "report"), ("--json", "report"), ("--csv", "report"), ("-o", "plan")],
    ids=["report-o", "report-json", "report-csv", "plan-o"],
)
def test_an_output_that_cannot_be_created_is_found_before_any_work(
    real_dump: Callable[[str], Path], tmp_path: Path, flag: str, command: str
) -> None:
    """An output in a folder that exists but takes no files (/proc): exit 6, one line naming it,
    before any dump is read; a malformed dump among the inputs (which the work would find, exit
    4) is not reached, no index is built, nothing is left behind."""
    bad = tmp_path / "bad.elf"
    bad.write_bytes(b"\x7fELF" + b"garbage" * 100)
    index = tmp_path / "idx"
    out = ["-o", str(tmp_path / "r.html")] if flag != "-o" and command == "report" else []
    dumps = [str(real_dump("alpha.elf")), str(bad)]
    args = [command, "--index-dir", str(index), *out, flag, str(NO_FILES), *dumps]
    code, stdout, err = invoke(*args)
    assert (code, stdout) == (EXIT_OUTPUT, ""), err
    assert err.splitlines() == [f"dengine: {NO_FILES}: cannot write: No such file or directory"]
    assert not index.exists() or not any(index.rglob("*"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.elf"]
    # The same command with a writable output reaches the malformed dump: the check is not the work.
    args[args.index(str(NO_FILES))] = str(tmp_path / "fine")
    code, _, err = invoke(*args)
    assert code == EXIT_BAD_DUMP, err


def test_restore_numbers_images_of_one_name_by_their_vms_numbers(tmp_path: Path) -> None:
    """Three VMs whose dumps have one file name (vm.raw, in a/, b/ and c/): restoring VMs 1 and
    2 writes 1-vm.raw.raw and 2-vm.raw.raw, named by the numbers `restore` takes (not 0- and 1-,
    which name other VMs), each the image of its own dump; all of them, 0- to 2-."""
    images = design_vms(7, [16, 16, 16])
    dumps = []
    for name, image in zip("abc", images, strict=True):
        (tmp_path / name).mkdir()
        dumps.append(write_raw_image(tmp_path / name / "vm.raw", image))
    plan = tmp_path / "plan.json"
    code, _, err = invoke("plan", "--dump-format", "raw", "--baseline", "none", "--index-dir",
                          str(tmp_path / "idx"), "-o", str(plan), *map(str, dumps))  # fmt: skip
    assert code == 0, err
    store = tmp_path / "store"
    code, out, err = invoke("apply", "--format", "json", str(plan), "-o", str(store))
    assert code == 0, err
    assert [vm["name"] for vm in json.loads(out)["vms"]] == [str(d) for d in dumps]
    code, _, err = invoke("restore", str(store), "1", "2", "-o", str(tmp_path / "some"))
    assert code == 0, err
    assert sorted(os.listdir(tmp_path / "some")) == ["1-vm.raw.raw", "2-vm.raw.raw"]
    for k in (1, 2):
        assert (tmp_path / "some" / f"{k}-vm.raw.raw").read_bytes() == dumps[k].read_bytes()
    code, _, err = invoke("restore", str(store), "-o", str(tmp_path / "all"))
    assert code == 0, err
    assert sorted(os.listdir(tmp_path / "all")) == ["0-vm.raw.raw", "1-vm.raw.raw", "2-vm.raw.raw"]
    for k in range(3):
        assert (tmp_path / "all" / f"{k}-vm.raw.raw").read_bytes() == dumps[k].read_bytes()
