"""The same dump file given twice to `dengine analyze` or `dengine plan` (overlapping globs, a
link) is one dump, read once under its first name, as `dengine report` reads it: its figures
are those of the file given once, not of two VMs sharing everything.  On the real QEMU fixtures."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from dengine_cli.errors import EXIT_USAGE
from tests.commands import invoke


@pytest.fixture
def alpha(real_dump: Callable[[str], Path]) -> Path:
    return real_dump("alpha.elf")


def other_names(alpha: Path, tmp_path: Path) -> dict[str, str]:
    """``alpha`` by other names: as given, through ``..``, a symlink and a hard link."""
    (tmp_path / "d").mkdir()
    (tmp_path / "link.elf").symlink_to(alpha)
    os.link(alpha, tmp_path / "hard.elf")
    return {
        "as given": str(alpha),
        "through ..": str(tmp_path / "d" / ".." / "link.elf"),
        "symlink": str(tmp_path / "link.elf"),
        "hard link": str(tmp_path / "hard.elf"),
    }


@pytest.mark.parametrize("command", [["analyze"], ["analyze", "--sharing-only"], ["plan"]])
def test_a_file_given_twice_has_the_figures_of_the_file_given_once(
    real_dump: Callable[[str], Path], alpha: Path, tmp_path: Path, command: list[str]
) -> None:
    """`analyze a X` and `plan a X`, X being a by any name, print what `analyze a` and `plan a`
    print (JSON and CSV), and one line on stderr names the file and its other name; beside
    another dump (`a b X`), the same as `a b`."""
    beta = str(real_dump("beta.elf"))
    base = [*command, "--index-dir", str(tmp_path / "idx")]
    once: dict[tuple[str, ...], str] = {}
    for fmt in ("json", "csv"):
        for dumps in ((str(alpha),), (str(alpha), beta)):
            code, out, err = invoke("-q", *base, "--format", fmt, *dumps)
            assert code == 0, err
            once[(fmt, *dumps)] = out
    assert len(json.loads(once[("json", str(alpha))])["vms"]) == 1
    for how, again in other_names(alpha, tmp_path).items():
        for fmt in ("json", "csv"):
            code, out, err = invoke(*base, "--format", fmt, str(alpha), again)
            assert code == 0, err
            assert out == once[(fmt, str(alpha))], (how, fmt)
            also = "" if again == str(alpha) else f" (also as {again})"
            assert err == f"warning: {alpha} is given twice{also}: one file, read once\n", how
            code, out, err = invoke("-q", *base, "--format", fmt, str(alpha), beta, again)
            assert code == 0 and err == "", err
            assert out == once[(fmt, str(alpha), beta)], (how, fmt)


def test_every_other_name_is_in_the_one_warning(
    alpha: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The note lists every other name once, in the order given; ./x is x (pathlib's)."""
    names = other_names(alpha, tmp_path)
    monkeypatch.chdir(tmp_path)
    args = ["analyze", "--sharing-only", "--format", "json", "--index-dir", str(tmp_path / "idx")]
    code, out, err = invoke(*args, "link.elf", "./link.elf", names["hard link"], "link.elf", str(alpha))
    assert code == 0, err
    assert [vm["name"] for vm in json.loads(out)["vms"]] == ["link.elf"]
    also = f"{names['hard link']}, {alpha}"
    assert err == f"warning: link.elf is given 5 times (also as {also}): one file, read once\n"


def test_a_copy_is_another_dump(alpha: Path, tmp_path: Path) -> None:
    """Files are compared, not contents: a copy of a dump is a second VM sharing every page."""
    copy = tmp_path / "copy.elf"
    shutil.copyfile(alpha, copy)
    args = ["-q", "analyze", "--sharing-only", "--format", "json", "--index-dir", str(tmp_path / "idx")]
    code, out, err = invoke(*args, str(alpha), str(copy))
    assert code == 0, err
    doc = json.loads(out)
    assert [vm["name"] for vm in doc["vms"]] == [str(alpha), str(copy)]
    assert doc["total"]["shared_across_vms"] == doc["vms"][0]["kept_pages"] > 0


def test_history_names_the_dump_by_any_of_its_names(real_dump: Callable[[str], Path], tmp_path: Path) -> None:
    """`plan later link --history link=alpha` is `plan later --history later=alpha`: the
    history of a name the dump was also given by is the dump's; two different earlier
    snapshots for one file, under any names, are a usage error."""
    later, earlier = str(real_dump("alpha-later.elf")), str(real_dump("alpha.elf"))
    link = tmp_path / "link.elf"
    link.symlink_to(later)
    args = ["-q", "plan", "--format", "json", "--index-dir", str(tmp_path / "idx")]
    code, want, err = invoke(*args, "--history", f"{later}={earlier}", later)
    assert code == 0, err
    assert json.loads(want)["upper_bound"] is False
    code, out, err = invoke(*args, "--history", f"{link}={earlier}", later, str(link))
    assert code == 0, err
    assert out == want
    other = str(real_dump("beta.elf"))
    code, out, err = invoke(
        *args, "--history", f"{later}={earlier}", "--history", f"{link}={other}", later, str(link)
    )
    assert code == EXIT_USAGE and out == ""
    assert f"'{link}' (the same file as {later}) is given two earlier snapshots, {earlier} and {other}" in err
    # The dump as its own earlier snapshot, under another of its names.
    code, out, err = invoke(*args, "--history", f"{link}={later}", later, str(link))
    assert code == EXIT_USAGE and out == ""
    assert f"'{later}' is '{link}' itself, not an earlier snapshot of it" in err


def test_index_lists_a_file_given_twice_once(alpha: Path, tmp_path: Path) -> None:
    """`dengine index a X`, X being a by any name, indexes and lists a once, under its first
    name, with the note analyze and plan print."""
    names = other_names(alpha, tmp_path)  # first: a hard link changes the file's ctime, its key
    base = ["index", "--index-dir", str(tmp_path / "idx")]
    code, once, err = invoke(*base, str(alpha))
    assert code == 0, err
    for how, again in names.items():
        code, out, err = invoke(*base, str(alpha), again)
        assert code == 0, err
        assert out == once.replace("\tbuilt\t", "\tcached\t"), how
        assert len(out.splitlines()) == 1, how
        also = "" if again == str(alpha) else f" (also as {again})"
        assert err == f"warning: {alpha} is given twice{also}: one file, read once\n", how
        code, out, err = invoke("-q", *base, str(alpha), again)
        assert code == 0 and err == "", err
        assert len(out.splitlines()) == 1, how


def test_a_cached_index_names_the_dump_as_given_now(
    real_dump: Callable[[str], Path], alpha: Path, tmp_path: Path
) -> None:
    """The index cache is keyed by the file, not by the name it was given by: a dump indexed as
    ``x`` and analyzed as ``./d/../x``, a link or an absolute path is named as given now in
    every output, whichever name built the cached index."""
    names = other_names(alpha, tmp_path)
    beta = str(real_dump("beta.elf"))
    base = ["-q", "--index-dir", str(tmp_path / "idx")]
    code, out, err = invoke("index", *base[1:], names["symlink"], beta)
    assert code == 0 and "\tbuilt\t" in out, err
    for how, name in names.items():
        commands = [["analyze", "--sharing-only"]] + ([["plan"]] if how == "as given" else [])
        for command in commands:
            code, out, err = invoke(base[0], *command, *base[1:], "--format", "json", name, beta)
            assert code == 0, err
            assert [vm["name"] for vm in json.loads(out)["vms"]] == [name, beta], (how, command)
        code, out, err = invoke("index", *base[1:], name)
        assert code == 0 and out.startswith(f"{name}\t") and "\tcached\t" in out, (how, out)


def test_a_cached_partial_index_keeps_what_it_covers_under_the_name_given_now(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A dump read with --partial is named ``PATH (partial: ...)``: indexed as ``guest.core``,
    analyzed as its absolute path, the name is the absolute path with the same note."""
    from tests.builders.xc_core import cut_short

    path, _, _ = cut_short(tmp_path)
    monkeypatch.chdir(tmp_path)
    base = ["--index-dir", str(tmp_path / "idx"), "--partial"]
    code, out, err = invoke("analyze", "--sharing-only", "--format", "json", *base, "guest.core")
    assert code == 0, err
    (relative,) = [vm["name"] for vm in json.loads(out)["vms"]]
    assert relative.startswith("guest.core (partial: ")
    code, out, err = invoke("analyze", "--sharing-only", "--format", "json", *base, str(path))
    assert code == 0, err
    assert [vm["name"] for vm in json.loads(out)["vms"]] == [str(path) + relative[len("guest.core") :]]
