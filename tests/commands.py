"""dengine's commands run in this process (click's ``CliRunner``), for the test modules that
check what a command prints and how it exits."""

from __future__ import annotations

from click.testing import CliRunner

from dengine_cli.cli import cli


def invoke(*args: str) -> tuple[int, str, str]:
    """``dengine ARGS``: the exit code, standard output and standard error."""
    r = CliRunner().invoke(cli, list(args))
    return r.exit_code, r.stdout, r.stderr


def invoke_quiet(*args: str) -> tuple[int, str, str]:
    """``dengine --quiet ARGS`` (no progress bars or notes on standard error)."""
    return invoke("--quiet", *args)
