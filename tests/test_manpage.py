"""man/dengine.1 must describe exactly the CLI that exists: every command, every option."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import click
import pytest

from dengine_cli.cli import cli
from dengine_cli.errors import (
    EXIT_BAD_DUMP,
    EXIT_INTERNAL,
    EXIT_OUTPUT,
    EXIT_UNREADABLE,
    EXIT_UNSUPPORTED,
    EXIT_USAGE,
)

MAN = Path(__file__).resolve().parent.parent / "man" / "dengine.1"


def man_text() -> str:
    return MAN.read_text()


def sections() -> dict[str, str]:
    """The COMMANDS part of the man page split at its ``.SS`` headings (one per command)."""
    commands_part = man_text().split(".SH COMMANDS")[1].split("\n.SH ")[0]
    parts = re.split(r"^\.SS\s+(.*)$", commands_part, flags=re.M)
    return {parts[i].strip().strip('"'): parts[i + 1] for i in range(1, len(parts), 2)}


def long_options(command: click.Command) -> set[str]:
    names: set[str] = set()
    for param in command.params:
        if isinstance(param, click.Option):
            names.update(o for o in param.opts + param.secondary_opts if o.startswith("--"))
    return names - {"--help"}


def documented_options(text: str) -> set[str]:
    """The long options a part of the page defines: those on the tag line after each ``.TP``."""
    tags = re.findall(r"^\.TP\n(.*)$", text, flags=re.M)
    plain = re.sub(r"\\f[BIRP]", "", "\n".join(tags)).replace("\\-", "-")
    return set(re.findall(r"--[a-z][a-z0-9-]*[a-z0-9]", plain))


def commands() -> dict[str, click.Command]:
    assert isinstance(cli, click.Group)
    return dict(cli.commands)


def test_every_command_has_its_section() -> None:
    documented = {
        name.removeprefix("dengine ").split()[0] for name in sections() if name.startswith("dengine ")
    }
    assert documented == set(commands())


#: The group's options every command takes too (``dengine analyze -q``): documented once, under
#: GLOBAL OPTIONS, not in each command's section.
EVERYWHERE = {"--debug", "--quiet"}


@pytest.mark.parametrize("name", sorted(commands()))
def test_command_options_match(name: str) -> None:
    text = next(body for title, body in sections().items() if title.split()[:2] == ["dengine", name])
    options = long_options(commands()[name])
    assert options >= EVERYWHERE
    assert documented_options(text) == options - EVERYWHERE


@pytest.mark.parametrize("name", sorted(commands()))
def test_no_option_is_documented_twice(name: str) -> None:
    """Each option has one entry in its command's section (analyze and plan had two of
    --index-dir)."""
    (text,) = [body for title, body in sections().items() if title.split()[:2] == ["dengine", name]]
    tags = re.findall(r"^\.TP\n(.*)$", text, flags=re.M)
    options = [
        re.findall(r"--[a-z][a-z0-9-]*[a-z0-9]", re.sub(r"\\f[BIRP]", "", t).replace("\\-", "-"))
        for t in tags
    ]
    flat = [o for found in options for o in found]
    assert sorted(o for o in set(flat) if flat.count(o) > 1) == []


def test_global_options_documented() -> None:
    head = man_text().split(".SH COMMANDS")[0].split(".SH GLOBAL OPTIONS")[1]
    assert documented_options(head) >= long_options(cli) - {"--version"} | EVERYWHERE
    assert long_options(cli) >= EVERYWHERE
    assert "go before the command's name or among its options" in head


def test_exit_codes_documented() -> None:
    text = man_text().split(".SH EXIT STATUS")[1].split(".SH ")[0]
    for code in (EXIT_INTERNAL, EXIT_USAGE, EXIT_UNREADABLE, EXIT_BAD_DUMP, EXIT_UNSUPPORTED, EXIT_OUTPUT):
        assert re.search(rf"^\.IP {code}\b", text, flags=re.M), code


@pytest.mark.skipif(shutil.which("groff") is None and shutil.which("man") is None, reason="no roff formatter")
def test_man_page_renders_without_warnings() -> None:
    tool = ["groff", "-man", "-Tutf8", "-ww", "-z"] if shutil.which("groff") else ["man", "-l", "-Tutf8"]
    r = subprocess.run([*tool, str(MAN)], capture_output=True, text=True)
    assert r.returncode == 0
    assert r.stderr == ""
