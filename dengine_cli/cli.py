"""The `dengine` command line: the only module that talks to the terminal.

Results go to stdout; progress, notes and errors go to stderr.  Every error a user can cause is a
DengineError: one line ``dengine: <message>`` and its exit code (see ``dengine_cli.errors``).
"""

from __future__ import annotations

import json
import os
import sys
import traceback
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import click

from dengine_cli import __version__
from dengine_cli.errors import EXIT_INTERNAL, EXIT_USAGE, DengineError, UnreadableFile
from dengine_cli.formats import FORMAT_NAMES, FORMATS, OpenOptions, open_dump
from dengine_cli.formats.base import Dump
from dengine_cli.inspect import DumpInfo, describe, extract
from dengine_cli.render import render_info

F = TypeVar("F", bound=Callable[..., Any])

#: Exit status when the reader of our output goes away (``| head``): 128 + SIGPIPE, as a shell says.
EXIT_PIPE = 141
EXIT_INTERRUPTED = 130


class DengineGroup(click.Group):
    """Turns every error into one line on stderr and its documented exit code."""

    def main(self, *args: Any, **kwargs: Any) -> NoReturn:
        argv = kwargs.get("args")
        argv = list(argv) if argv is not None else sys.argv[1:]
        debug = "--debug" in argv
        kwargs["standalone_mode"] = False
        try:
            rv = super().main(*args, **kwargs)
        except click.exceptions.Exit as e:
            sys.exit(e.exit_code)
        except click.ClickException as e:
            e.show()
            sys.exit(e.exit_code)
        except click.Abort:
            click.echo("dengine: interrupted", err=True)
            sys.exit(EXIT_INTERRUPTED)
        except DengineError as e:
            if debug:
                traceback.print_exc()
            click.echo(f"dengine: {e}", err=True)
            sys.exit(e.exit_code)
        except BrokenPipeError:
            # Our reader stopped reading: nothing more to say, and nothing to say it to.
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            sys.exit(EXIT_PIPE)
        except KeyboardInterrupt:
            click.echo("dengine: interrupted", err=True)
            sys.exit(EXIT_INTERRUPTED)
        except Exception as e:
            if debug:
                traceback.print_exc()
            click.echo(
                f"dengine: internal error: {type(e).__name__}: {e} (this is a bug; --debug shows where)",
                err=True,
            )
            sys.exit(EXIT_INTERNAL)
        sys.exit(rv if isinstance(rv, int) else 0)


@click.group(cls=DengineGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "-V", "--version", prog_name="dengine")
@click.option("--debug", is_flag=True, help="On an error, also print the traceback.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bars or notes on stderr.")
@click.pass_context
def cli(ctx: click.Context, debug: bool, quiet: bool) -> None:
    """How much memory do your VMs really need?  dengine reads the guest-memory dumps that
    hypervisors write and computes what page sharing, patching and compression would save."""
    ctx.obj = {"debug": debug, "quiet": quiet}


def dump_options(f: F, *, format_alias: bool = False) -> F:
    """The options of every command that opens dumps.  ``--dump-format`` forces a reader; commands
    without an output format choice also take it as ``--format``."""
    names = ["--dump-format", "--format"] if format_alias else ["--dump-format"]
    f = click.option(
        *names,
        "dump_format",
        type=click.Choice(FORMAT_NAMES),
        default=None,
        help="Read the dumps as this format instead of detecting it by magic.",
    )(f)
    f = click.option(
        "--device-memory",
        is_flag=True,
        help="Keep device memory QEMU dumps carry beside RAM (VGA VRAM, BIOS flash).",
    )(f)
    f = click.option(
        "--tmp-dir",
        type=click.Path(file_okay=False, path_type=Path),
        default=None,
        help="Where compressed dumps are decompressed to (default: $TMPDIR).",
    )(f)
    return f


def dump_options_with_format_alias(f: F) -> F:
    return dump_options(f, format_alias=True)


def open_options(dump_format: str | None, device_memory: bool, tmp_dir: Path | None) -> OpenOptions:
    return OpenOptions(format=dump_format, device_memory=device_memory, tmp_dir=tmp_dir)


def expand_dump_args(args: Sequence[str]) -> list[Path]:
    """Dump paths from the command line: ``-`` reads paths from stdin, ``@FILE`` from FILE,
    one per line (blank lines and lines starting with ``#`` are ignored)."""
    paths: list[Path] = []
    for arg in args:
        if arg == "-":
            paths.extend(_path_lines(sys.stdin.read().splitlines()))
        elif arg.startswith("@") and len(arg) > 1:
            try:
                text = Path(arg[1:]).read_text()
            except OSError as e:
                raise UnreadableFile(arg[1:], e.strerror or str(e)) from e
            paths.extend(_path_lines(text.splitlines()))
        else:
            paths.append(Path(arg))
    if not paths:
        raise click.UsageError("no dumps given")
    return paths


def _path_lines(lines: Sequence[str]) -> Iterator[Path]:
    for line in lines:
        line = line.strip()
        if line and not line.startswith("#"):
            yield Path(line)


@contextmanager
def progress(total: int, desc: str) -> Iterator[Callable[[int], None]]:
    """A progress bar on stderr for long work; silent when stderr is not a terminal or --quiet."""
    ctx = click.get_current_context()
    quiet = bool(ctx.find_root().obj and ctx.find_root().obj.get("quiet"))
    if quiet or not sys.stderr.isatty():
        yield lambda n: None
        return
    from tqdm import tqdm

    with tqdm(total=total, desc=desc, unit="page", unit_scale=True, leave=False, file=sys.stderr) as bar:
        yield bar.update


@cli.command("formats")
def formats_command() -> None:
    """List the dump formats dengine reads."""
    width = max(len(f.name) for f in FORMATS)
    for spec in FORMATS:
        click.echo(f"{spec.name:<{width}}  {spec.description}")
    click.echo(f"{'':<{width}}  (any of these may also be gzip, bzip2, xz, lzop or zstd compressed)")


@cli.command("info")
@click.argument("dumps", nargs=-1, required=True)
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@dump_options_with_format_alias
def info_command(
    dumps: tuple[str, ...], as_json: bool, dump_format: str | None, device_memory: bool, tmp_dir: Path | None
) -> None:
    """Show each dump's format, guest facts, physical ranges, pages present and zero pages."""
    options = open_options(dump_format, device_memory, tmp_dir)
    infos: list[DumpInfo] = []
    for path in expand_dump_args(dumps):
        with _open(path, options) as dump, progress(dump.page_count, path.name) as tick:
            infos.append(describe(dump, path, tick))
    if as_json:
        doc = {"schema": "dengine.info/1", "dumps": [i.to_dict() for i in infos]}
        click.echo(json.dumps(doc, indent=2))
    else:
        click.echo(render_info(infos), nl=False)


@cli.command("extract")
@click.argument("dump")
@click.option(
    "-o",
    "--output",
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="The flat image to write (file offset = guest physical address).",
)
@dump_options_with_format_alias
def extract_command(
    dump: str, output: Path, dump_format: str | None, device_memory: bool, tmp_dir: Path | None
) -> None:
    """Write a dump's guest physical memory as a flat, sparse raw image."""
    options = open_options(dump_format, device_memory, tmp_dir)
    path = Path(dump)
    with _open(path, options) as d, progress(d.page_count, path.name) as tick:
        size = extract(d, output, tick)
        pages = d.page_count
    _note(f"{output}: {size} bytes, {pages} pages present")


def _open(path: Path, options: OpenOptions) -> Dump:
    return open_dump(path, options)


def _note(text: str) -> None:
    ctx = click.get_current_context()
    if not (ctx.find_root().obj or {}).get("quiet"):
        click.echo(text, err=True)


def main() -> None:
    """Entry point of the `dengine` script."""
    cli.main(prog_name="dengine")


__all__ = ["EXIT_USAGE", "cli", "main"]
