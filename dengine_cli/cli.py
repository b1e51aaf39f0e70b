"""The `dengine` command line: the only module that talks to the terminal.

Results go to stdout; progress, notes and errors go to stderr.  Every error a user can cause is a
DengineError: one line ``dengine: <message>`` and its exit code (see ``dengine_cli.errors``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import signal
import sys
import threading
import traceback
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, NoReturn, TypeVar

import click

from dengine_cli import __version__
from dengine_cli.engine.sharing.model import KSM_MAX_PAGE_SHARING, KSM_MAX_PAGE_SHARING_LIMIT
from dengine_cli.errors import (
    EXIT_INTERNAL,
    EXIT_OUTPUT,
    EXIT_USAGE,
    STOPPING_SIGNALS,
    DengineError,
    UnreadableFile,
)
from dengine_cli.formats import FORMAT_NAMES, OpenOptions, all_formats, open_dump
from dengine_cli.outputs import (
    STDERR_NAME,
    STDOUT_NAME,
    is_stdout,
    refuse_inputs,
    refuse_inside,
    refuse_uncreatable,
)

# The engine and the renderers are imported by the commands that use them: every command pays
# for what it imports before it starts, and `dengine info` needs neither the planner nor rich.
if TYPE_CHECKING:
    from dengine_cli.engine.index import PageIndex
    from dengine_cli.engine.plan.model import PlanReport
    from dengine_cli.engine.policy import Policy
    from dengine_cli.formats.base import Dump
    from dengine_cli.inspect import DumpInfo
    from dengine_cli.session import Settings

F = TypeVar("F", bound=Callable[..., Any])
T = TypeVar("T")

#: Exit status when the reader of our output goes away (``| head``): 128 + SIGPIPE, as a shell says.
EXIT_PIPE = 141
EXIT_INTERRUPTED = 130


class _PipeClosed(Exception):
    """Standard output's reader went away.  Not an OSError: click's own ``main`` turns an EPIPE
    OSError into exit status 1, an internal error by our codes."""


class _Interrupted(Exception):
    """Ctrl-C or SIGINT (``signum`` SIGINT), or SIGTERM or SIGHUP (:class:`Terminated`).  Not a
    KeyboardInterrupt: click's ``main`` answers that with an empty line on stderr before ours
    (right after ``^C`` on a terminal, a stray line in a log)."""

    def __init__(self, signum: int = signal.SIGINT) -> None:
        super().__init__(signum)
        self.signum = signum


def _stopped(signum: int) -> NoReturn:
    """Leave after a signal's cleanup: one line, exit 130 for SIGINT, 128 + the signal else."""
    if signum == signal.SIGINT:
        # On a terminal the line starts after the ^C the terminal echoed.
        click.echo(("\n" if sys.stderr.isatty() else "") + "dengine: interrupted", err=True)
        sys.exit(EXIT_INTERRUPTED)
    click.echo(f"dengine: terminated ({signal.Signals(signum).name})", err=True)
    sys.exit(128 + signum)


class DengineGroup(click.Group):
    """Turns every error into one line on stderr and its documented exit code."""

    #: The subcommand a usage error dengine raised itself came from ("" before one is known), for
    #: the pointer to its help that click's own usage errors end with.
    usage_command = ""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except DengineError as e:
            if e.exit_code == EXIT_USAGE:
                self.usage_command = ctx.invoked_subcommand or ""
            raise
        except BrokenPipeError as e:
            raise _PipeClosed() from e
        except KeyboardInterrupt as e:
            raise _Interrupted(getattr(e, "signum", signal.SIGINT)) from e

    def main(self, *args: Any, **kwargs: Any) -> NoReturn:
        argv = kwargs.get("args")
        argv = list(argv) if argv is not None else sys.argv[1:]
        self.argv = argv  # the command line as given, which `dengine report` records
        debug = "--debug" in argv
        self.usage_command = ""
        kwargs["standalone_mode"] = False
        try:
            rv = super().main(*args, **kwargs)
        except click.exceptions.Exit as e:
            sys.exit(e.exit_code)
        except click.exceptions.NoArgsIsHelpError as e:
            e.show()  # `dengine` alone: the help, as asked
            sys.exit(e.exit_code)
        except click.ClickException as e:
            click.echo(usage_line(e), err=True)
            sys.exit(e.exit_code)
        except click.Abort:
            _stopped(signal.SIGINT)
        except _Interrupted as e:
            _stopped(e.signum)
        except DengineError as e:
            if debug:
                traceback.print_exc()
            usage = e.exit_code == EXIT_USAGE
            click.echo(usage_message(self.usage_command, str(e)) if usage else f"dengine: {e}", err=True)
            sys.exit(e.exit_code)
        except (BrokenPipeError, _PipeClosed):
            # Our reader stopped reading: nothing more to say, and nothing to say it to.
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            sys.exit(EXIT_PIPE)
        except KeyboardInterrupt as e:
            _stopped(getattr(e, "signum", signal.SIGINT))
        except Exception as e:
            if debug:
                traceback.print_exc()
            click.echo(
                f"dengine: internal error: {type(e).__name__}: {e} (this is a bug; --debug shows where)",
                err=True,
            )
            sys.exit(EXIT_INTERNAL)
        sys.exit(rv if isinstance(rv, int) else 0)


def usage_line(e: click.ClickException) -> str:
    """A usage error of click's as one line, as every other error (click's own form is four
    lines: usage, hint, blank, error)."""
    ctx = e.ctx if isinstance(e, click.UsageError) else None
    # The command path without the program's name (``python -m dengine_cli``, a test runner's).
    command = ctx.command_path.partition(" ")[2] if ctx is not None else ""
    return usage_message(command, e.format_message().rstrip("."))


def usage_message(command: str, what: str) -> str:
    """Every usage error (exit 2), click's and those dengine raises itself, as one line:
    ``dengine: COMMAND: what is wrong; see 'dengine COMMAND --help'`` (no COMMAND where none
    was named: ``dengine: what is wrong; see 'dengine --help'``)."""
    where, path = (f"{command}: ", f"dengine {command}") if command else ("", "dengine")
    return f"dengine: {where}{what}; see '{path} --help'"


def emit(message: str, *, nl: bool = True, err: bool = False) -> None:
    """``click.echo``, with a write that fails (a full disk, ``/dev/full``, an I/O error) as the
    one-line error of an output that cannot be written (exit 6); a reader gone away stays a
    ``BrokenPipeError`` (exit 141, nothing said)."""
    try:
        click.echo(message, nl=nl, err=err)
    except BrokenPipeError:
        raise
    except OSError as e:
        from dengine_cli.errors import OutputError

        raise OutputError(STDERR_NAME if err else STDOUT_NAME, e.strerror or str(e)) from e


def _version(ctx: click.Context, _param: click.Parameter, value: bool) -> None:
    """``--version``, printed by :func:`emit` (click's own option prints with ``echo``)."""
    if value and not ctx.resilient_parsing:
        emit(f"dengine, version {__version__}")
        ctx.exit()


@click.group(cls=DengineGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "-V",
    "--version",
    is_flag=True,
    expose_value=False,
    is_eager=True,
    callback=_version,
    help="Show the version and exit.",
)
@click.option("--debug", is_flag=True, help="On an error, also print the traceback.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bars or notes on stderr.")
@click.pass_context
def cli(ctx: click.Context, debug: bool, quiet: bool) -> None:
    """How much memory do your VMs really need?  dengine reads the guest-memory dumps that
    hypervisors write and computes what page sharing, patching and compression would save."""
    ctx.obj = {"debug": debug, "quiet": quiet}


def session_option(*names: str, **attrs: Any) -> Callable[[F], F]:
    """An option of how dumps are read or pages worked on, which no command takes as an argument:
    its value is kept in the context (:func:`session_value`), where :func:`open_options` and
    :func:`command_settings` find it, so that every command that reads dumps has the same options
    without a parameter for each."""
    return click.option(*names, expose_value=False, callback=_keep_option, **attrs)


def _keep_option(ctx: click.Context, param: click.Parameter, value: Any) -> Any:
    ctx.meta[f"dengine.{param.name}"] = value
    return value


def session_value(name: str) -> Any:
    """The value of the session option ``name`` (its parameter name) on this command line
    (``None`` outside a command)."""
    ctx = click.get_current_context(silent=True)
    return (ctx.meta if ctx is not None else {}).get(f"dengine.{name}")


def dump_options(f: F, *, format_alias: bool = False) -> F:
    """The options of every command that opens dumps.  ``--dump-format`` forces a reader; commands
    without an output format choice also take it as ``--format``."""
    names = ["--dump-format", "--format"] if format_alias else ["--dump-format"]
    f = session_option(
        *names,
        "dump_format",
        type=click.Choice(FORMAT_NAMES),
        default=None,
        help="Read the dumps as this format instead of detecting it by magic.",
    )(f)
    f = session_option(
        "--device-memory",
        is_flag=True,
        help="Keep device memory QEMU dumps carry beside RAM (VGA VRAM, BIOS flash).",
    )(f)
    f = session_option(
        "--tmp-dir",
        type=TMP_DIR,
        default=None,
        help="Where compressed dumps are decompressed to (default: $TMPDIR); where a command "
        "with --memory-limit spills page arrays past it (default: the index directory).  A "
        "directory that exists.",
    )(f)
    f = session_option(
        "--max-decompressed",
        type=ByteSize(),
        default=None,
        envvar="DENGINE_MAX_DECOMPRESSED",
        help="The most a compressed dump may decompress to (default: 1T).",
    )(f)
    return session_option(
        "--partial",
        is_flag=True,
        help="Read a dump cut short for the pages it holds (its name then says which), instead "
        "of refusing it.",
    )(f)


def dump_options_with_format_alias(f: F) -> F:
    return dump_options(f, format_alias=True)


def open_options() -> OpenOptions:
    """How this command line opens dumps (:func:`dump_options`)."""
    return OpenOptions(
        format=session_value("dump_format"),
        device_memory=bool(session_value("device_memory")),
        tmp_dir=session_value("tmp_dir"),
        max_decompressed=session_value("max_decompressed"),
        partial=bool(session_value("partial")),
    )


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

    tqdm.monitor_interval = 0  # no monitor thread: see PageProgress
    with tqdm(total=total, desc=desc, unit="page", unit_scale=True, leave=False, file=sys.stderr) as bar:
        yield bar.update


#: ``--tmp-dir``: a directory that exists and can be written to, checked before any work.  A
#: scratch directory is named, not made (as ``sort -T`` and ``rsync --temp-dir`` do): a mistyped
#: one is an error at once, not a stray directory, nor a failure minutes into a run (decompression
#: and ``apply`` refused one that did not exist, spills made it).
TMP_DIR = click.Path(exists=True, file_okay=False, writable=True, path_type=Path)


class ByteSize(click.ParamType[int]):
    """A memory size: bytes, or a number with K, M, G, T (powers of 1024; ``KiB``, ``GB``... all
    read as binary units, as memory is sold).  A number without a unit under
    :attr:`BARE_MINIMUM` is refused: ``--memory-limit 8`` is far likelier a forgotten ``G`` than
    8 bytes (``8B`` says bytes)."""

    name = "size"
    UNITS: ClassVar[dict[str, int]] = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    BARE_MINIMUM = 1 << 20

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int:
        if isinstance(value, int):
            return value
        text = str(value).strip().upper().removesuffix("B").removesuffix("I")
        unit = text[-1:] if text[-1:] in self.UNITS and text[-1:] != "" else ""
        number = text[: len(text) - len(unit)].strip()
        try:
            size = float(number) * self.UNITS[unit]
        except ValueError:
            self.fail(f"{value!r} is not a size (examples: 512G, 65536M, 1.5T)", param, ctx)
        if not size >= 1:  # NaN too
            self.fail(f"{value!r}: a size must be positive", param, ctx)
        if size == float("inf"):
            self.fail(f"{value!r} is not a size (examples: 512G, 65536M, 1.5T)", param, ctx)
        said_bytes = str(value).strip().upper().endswith("B")  # 8B, 8 KiB, 8GB
        if size < self.BARE_MINIMUM and not unit and not said_bytes:
            given = str(value).strip()
            hint = f"give a unit ({given}M, {given}G; {given}B for bytes)"
            self.fail(f"{value!r} would be {int(size)} bytes: {hint}", param, ctx)
        return int(size)


class Fraction(click.ParamType[float]):
    """A fraction within (0, 1]."""

    name = "fraction"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> float:
        try:
            f = float(value)
        except ValueError:
            self.fail(f"{value!r} is not a number", param, ctx)
        if not 0.0 < f <= 1.0:
            self.fail(f"{value!r} is not within (0, 1]", param, ctx)
        return f


def distinct_dumps(paths: Sequence[Path]) -> list[Path]:
    """``paths`` with each file once, under the first name it was given by, as ``report`` reads
    them: the same file twice (``x`` and ``./x``, a symlink, a hard link; see
    :func:`~dengine_cli.session.names.file_key`) is one dump, not two VMs that share everything.
    A note names each file given more than once and its other names."""
    from dengine_cli.session.names import one_name_per_file

    kept, repeated = one_name_per_file(paths)
    for first, others in repeated:
        times = "twice" if len(others) == 1 else f"{len(others) + 1} times"
        spellings = list(dict.fromkeys(str(p) for p in others if p != first))
        also = f" (also as {', '.join(spellings)})" if spellings else ""
        _note(f"warning: {first} is given {times}{also}: one file, read once")
    return kept


def parse_history(pairs: Sequence[str], dumps: Sequence[Path]) -> dict[str, str]:
    """``CURRENT=EARLIER`` pairs, CURRENT being one of the dumps by any of its names (compared
    as files, as the dumps are), keyed by that dump as given in ``dumps``."""
    from dengine_cli.session.names import file_key

    history: dict[str, str] = {}
    known = {file_key(d): str(d) for d in dumps}
    for pair in pairs:
        current, sep, earlier = pair.partition("=")
        if not sep or not current or not earlier:
            raise click.BadParameter(f"{pair!r} is not CURRENT=EARLIER", param_hint="--history")
        dump = known.get(file_key(current))
        if dump is None:
            raise click.BadParameter(f"{current!r} is not one of the dumps given", param_hint="--history")
        if file_key(earlier) == file_key(dump):
            raise click.BadParameter(
                f"{pair!r}: {earlier!r} is {current!r} itself, not an earlier snapshot of it",
                param_hint="--history",
            )
        if dump in history and file_key(history[dump]) != file_key(earlier):
            same = "" if current == dump else f" (the same file as {dump})"
            raise click.BadParameter(
                f"{current!r}{same} is given two earlier snapshots, {history[dump]} and {earlier}",
                param_hint="--history",
            )
        history[dump] = earlier
    return history


output_format_option = click.option(
    "--format",
    "output_format",
    type=click.Choice(["table", "json", "csv"]),
    default="table",
    show_default=True,
    help="How to print the figures.",
)


wide_option = click.option(
    "--wide",
    is_flag=True,
    help="On a terminal, show every column however wide (a pipe always gets every column).",
)


def sample_options(f: F) -> F:
    f = click.option(
        "--seed", type=click.IntRange(min=0), default=0, show_default=True, help="Seed of --sample."
    )(f)
    f = click.option(
        "--sample",
        type=Fraction(),
        default=None,
        help="Estimate patches and compression from this fraction of the pages (seeded); "
        "prints a 95% confidence interval.",
    )(f)
    return f


@cli.command("formats")
def formats_command() -> None:
    """List the dump formats dengine reads."""
    formats = all_formats()
    width = max(len(f.name) for f in formats)
    for spec in formats:
        emit(f"{spec.name:<{width}}  {spec.description}")
    emit(f"{'':<{width}}  (any of these may also be gzip, bzip2, xz, lzop or zstd compressed)")


@cli.command("info")
@click.argument("dumps", nargs=-1, required=True)
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@dump_options_with_format_alias
def info_command(dumps: tuple[str, ...], as_json: bool) -> None:
    """Show each dump's format, guest facts, physical ranges, pages present and zero pages."""
    from dengine_cli.inspect import describe, info_document
    from dengine_cli.render import render_info

    options = open_options()
    infos: list[DumpInfo] = []
    for path in expand_dump_args(dumps):
        with _open(path, options) as dump, progress(dump.page_count, path.name) as tick:
            infos.append(describe(dump, path, tick))
    if as_json:
        doc = info_document(infos)
        emit(json.dumps(doc, indent=2))
    elif (width := terminal_width()) is not None:
        from dengine_cli.render import render_info_terminal

        emit(render_info_terminal(infos, width=width, color=terminal_color()), nl=False)
    else:
        emit(render_info(infos), nl=False)


@cli.command("extract")
@click.argument("dump")
@click.option(
    "-o",
    "--output",
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="The flat image to write (file offset = guest physical address); - for standard output.",
)
@dump_options_with_format_alias
def extract_command(dump: str, output: Path) -> None:
    """Write a dump's guest physical memory as a flat, sparse raw image."""
    from dengine_cli.inspect import extract

    options = open_options()
    path = Path(dump)
    refuse_inputs([output], [path])
    with _open(path, options) as d, progress(d.page_count, path.name) as tick:
        size = extract(d, output, tick)
        pages = d.page_count
    _note(f"{_shown(output)}: {size} bytes, {pages} pages present")


def index_options(f: F) -> F:
    """Where caches live, how many CPUs and how much memory a command that reads pages uses."""
    f = session_option(
        "-j",
        "--jobs",
        type=click.IntRange(min=1),
        default=None,
        help="Threads and processes that hash pages, group partitions and measure codecs "
        "(default: every CPU).",
    )(f)
    f = session_option(
        "--index-dir",
        type=click.Path(file_okay=False, path_type=Path),
        default=None,
        envvar="DENGINE_INDEX_DIR",
        help="Where page indexes and sharing results are cached (default: $XDG_CACHE_HOME/dengine/index).",
    )(f)
    f = session_option(
        "--memory-limit",
        type=ByteSize(),
        default=None,
        envvar="DENGINE_MEMORY_LIMIT",
        help="Memory for page arrays (e.g. 512M); past it, sorted pages, content ids, open "
        "dumps' page tables and a plan's arrays spill to files under --tmp-dir or the index "
        "directory (default: a quarter of RAM).",
    )(f)
    return f


def verify_option(f: F) -> F:
    return session_option(
        "--verify",
        is_flag=True,
        help="Also compare the bytes of every page merged (default: equal 128-bit hashes, see the man page).",
    )(f)


def command_settings(options: OpenOptions | None = None) -> Settings:
    """The session settings this command line gives (:func:`index_options`, :func:`verify_option`
    and ``options``, default :func:`open_options`)."""
    from dengine_cli.parallel import Workers
    from dengine_cli.session import Settings

    options = options or open_options()
    return Settings(
        options=options,
        index_dir=session_value("index_dir"),
        tmp_dir=options.tmp_dir,
        workers=Workers(jobs=session_value("jobs") or 0),
        memory_limit=session_value("memory_limit"),
        verify=bool(session_value("verify")),
    )


class PageProgress:
    """One progress bar over the pages of several dumps, fed ``(name, done, total)``."""

    def __init__(self, desc: str) -> None:
        ctx = click.get_current_context()
        quiet = bool((ctx.find_root().obj or {}).get("quiet"))
        self._bar: Any = None
        self._done: dict[str, int] = {}
        self._total: dict[str, int] = {}
        if not quiet and sys.stderr.isatty():
            from tqdm import tqdm

            # No monitor thread: index building forks workers only from a single-threaded process.
            tqdm.monitor_interval = 0
            self._bar = tqdm(total=0, desc=desc, unit="page", unit_scale=True, leave=False, file=sys.stderr)

    def __call__(self, name: str, done: int, total: int) -> None:
        if self._bar is None:
            return
        if self._total.get(name) != total:
            self._total[name] = total
            self._bar.total = sum(self._total.values())
        step = done - self._done.get(name, 0)
        self._done[name] = done
        self._bar.update(step)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


@cli.command("index")
@click.argument("dumps", nargs=-1)
@click.option(
    "--prune",
    is_flag=True,
    help="First remove cached indexes of dumps that are gone or have changed (DUMPS may be omitted).",
)
@index_options
@dump_options
def index_command(
    dumps: tuple[str, ...],
    prune: bool,
) -> None:
    """Build the page index of each dump ahead of time (later commands reuse it).

    Prints one line per dump: path, pages present, zero pages, whether the index was built or
    found in the cache, and the index file."""
    from dengine_cli.cache.keys import default_index_dir
    from dengine_cli.cache.prune import prune_indexes
    from dengine_cli.session import Session

    if prune:
        index_dir = session_value("index_dir")
        kept, removed, freed = prune_indexes(index_dir)
        _note(
            f"{index_dir or default_index_dir()}: removed {removed} stale cache files "
            f"({freed} bytes), kept {kept}"
        )
        if not dumps:
            return
    options = open_options()
    paths = distinct_dumps(expand_dump_args(dumps))
    bar = PageProgress("indexing")
    try:
        with Session(paths, command_settings(options), bar) as session:
            indexes = session.indexes()
    finally:
        bar.close()
    for path, index in zip(paths, indexes, strict=True):
        state = "cached" if index.loaded else "built"
        emit(f"{path}\t{index.page_count}\t{index.zero_pages}\t{state}\t{index.path or '-'}")


def ksm_view_options(f: F) -> F:
    """The knobs of the KSM view (:class:`~dengine_cli.engine.sharing.model.KsmModel`), the same
    on ``analyze`` and ``report``."""
    f = click.option(
        "--ksm-zero-pages-backed",
        is_flag=True,
        help="KSM view: take the dumps' zero pages as backed by host memory (default: never touched).",
    )(f)
    f = click.option(
        "--ksm-use-zero-pages",
        is_flag=True,
        help="KSM view: empty pages merge with the kernel's zero page (ksm_zero_pages), as use_zero_pages=1.",
    )(f)
    return ksm_cap_option("KSM view: mappings one KSM page holds (/sys/kernel/mm/ksm/max_page_sharing).")(f)


def ksm_cap_option(text: str) -> Callable[[F], F]:
    """``--ksm-max-page-sharing``: KSM's cap, the kernel's default and range (help ``text``)."""
    return click.option(
        "--ksm-max-page-sharing",
        type=click.IntRange(min=2, max=KSM_MAX_PAGE_SHARING_LIMIT),
        default=KSM_MAX_PAGE_SHARING,
        show_default=True,
        help=text,
    )


@cli.command("analyze")
@click.argument("dumps", nargs=-1, required=True)
@output_format_option
@click.option(
    "--no-cross-vm",
    is_flag=True,
    help="Share pages only within each VM (ESX with salting), not across VMs.",
)
@click.option(
    "--matrix",
    is_flag=True,
    help="Also print pairwise sharing between VMs (with csv: only the matrix).",
)
@click.option(
    "--sharing-only",
    is_flag=True,
    help="Leave out the Difference Engine figures (share + patch + compress) shown beside sharing.",
)
@wide_option
@sample_options
@ksm_view_options
@verify_option
@index_options
@dump_options
def analyze_command(
    dumps: tuple[str, ...],
    output_format: str,
    wide: bool,
    no_cross_vm: bool,
    matrix: bool,
    sharing_only: bool,
    sample: float | None,
    seed: int,
    ksm_max_page_sharing: int,
    ksm_use_zero_pages: bool,
    ksm_zero_pages_backed: bool,
) -> None:
    """Exact whole-page sharing within and across VMs: zero, shared, unique pages, footprint and
    savings per VM and in total, and what KSM would report."""
    options = open_options()
    paths = distinct_dumps(expand_dump_args(dumps))
    settings = command_settings(options)
    bar = PageProgress("analyzing")
    de: PlanReport | None = None
    try:
        from dengine_cli.session import Session

        with Session(paths, settings, bar) as session:
            if sharing_only:
                report = session.sharing(cross_vm=not no_cross_vm)
            else:
                from dengine_cli.policies import named_policy

                policy = dataclasses.replace(named_policy("de"), cross_vm=not no_cross_vm)
                report, de = session.plan(policy, sample=sample, seed=seed)
    finally:
        bar.close()
    from dengine_cli.engine.sharing.model import KsmModel

    report = report.with_ksm(KsmModel(ksm_max_page_sharing, ksm_use_zero_pages, ksm_zero_pages_backed))
    if output_format == "json":
        doc = report.to_dict()
        if not matrix:
            doc.pop("matrix", None)
        if de is not None:
            doc["de"] = de.to_dict()
        emit(json.dumps(doc, indent=2))
    elif output_format == "csv":
        from dengine_cli.render_csv import render_matrix_csv, render_sharing_csv

        emit(render_matrix_csv(report) if matrix else render_sharing_csv(report, de), nl=False)
    else:
        # Imported only here: the renderer imports rich (40 ms), which JSON does not need.
        from dengine_cli.render import render_sharing, render_sharing_terminal

        if (width := terminal_width()) is not None:
            text = render_sharing_terminal(
                report, matrix=matrix, de=de, width=width, wide=wide, color=terminal_color()
            )
        else:
            text = render_sharing(report, matrix=matrix, de=de)
        emit(text, nl=False)


@cli.command("plan")
@click.argument("dumps", nargs=-1, required=True)
@click.option(
    "--policy",
    "policy_name",
    default="de",
    show_default=True,
    help="ksm, esx, de, de-share-patch, de-share-compress, or a TOML policy file.",
)
@click.option(
    "--baseline",
    "baseline_name",
    default="ksm",
    show_default=True,
    help="The policy shown beside it (a name or a TOML file; 'none' for no baseline).",
)
@click.option(
    "--history",
    "history_pairs",
    multiple=True,
    metavar="CURRENT=EARLIER",
    help="An earlier snapshot of the VM in dump CURRENT: pages changed since are hot (repeatable).",
)
@click.option(
    "--host-memory",
    type=ByteSize(),
    default=None,
    help="Host memory (e.g. 512G): page out the coldest pages beyond it; how many VMs fit.",
)
@sample_options
@ksm_cap_option(
    "ksm policies: mappings one KSM page holds (/sys/kernel/mm/ksm/max_page_sharing), as analyze's; "
    "given, it wins over a policy file's max_page_sharing."
)
@click.option(
    "-o",
    "--output",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Also write the whole plan, page by page, as JSON (schema dengine.plan/1); - for standard "
    "output (the summary then goes to stderr).",
)
@output_format_option
@wide_option
@verify_option
@index_options
@dump_options
def plan_command(
    dumps: tuple[str, ...],
    policy_name: str,
    baseline_name: str,
    history_pairs: tuple[str, ...],
    host_memory: int | None,
    sample: float | None,
    seed: int,
    ksm_max_page_sharing: int,
    output: Path | None,
    output_format: str,
    wide: bool,
) -> None:
    """The Difference Engine plan: per VM, what sharing, patching, compression and paging save
    under a policy, beside a baseline policy."""
    from dengine_cli.engine.plan.planfile import write_plan
    from dengine_cli.policies import resolve_policy
    from dengine_cli.session import Session

    options = open_options()
    paths = distinct_dumps(expand_dump_args(dumps))
    refuse_inputs([output], paths)
    cap = _given("ksm_max_page_sharing", ksm_max_page_sharing)
    policy = _with_ksm_cap(resolve_policy(policy_name), cap)
    baseline = None
    if baseline_name != "none":
        baseline = _with_ksm_cap(resolve_policy(baseline_name), cap)
    history = parse_history(history_pairs, paths)
    if output is not None and sample is not None:
        raise click.BadParameter("a plan file needs an exact plan: drop --sample", param_hint="-o")
    refuse_uncreatable([output])
    settings = command_settings(options)
    bar = PageProgress("planning")
    try:
        with Session(paths, settings, bar) as session:
            _, report = session.plan(
                policy, history=history, host_memory=host_memory, sample=sample, seed=seed, baseline=baseline
            )
            identities = _dump_identities(paths, session.indexes(), options)
            home = session.plan_home()
    finally:
        bar.close()
    if output is not None:
        write_plan(report, output, identities, home)
    if not is_stdout(output):
        _print_plan(report, output_format, wide)
    elif not _quiet():
        _print_plan(report, output_format, wide, err=True)


def _with_ksm_cap(policy: Policy, max_page_sharing: int | None) -> Policy:
    """``policy`` with KSM's cap set to ``max_page_sharing`` when it models KSM (it has a cap);
    ``None``: the policy's own (a policy file's ``max_page_sharing``, else ksm's 256)."""
    if policy.max_page_sharing is None or max_page_sharing is None:
        return policy
    return dataclasses.replace(policy, max_page_sharing=max_page_sharing)


def _given(name: str, value: T) -> T | None:
    """``value`` when the option ``name`` was given on the command line, else ``None`` (its
    default then yields to what a policy file says)."""
    from click.core import ParameterSource

    source = click.get_current_context().get_parameter_source(name)
    return None if source in (None, ParameterSource.DEFAULT) else value


@cli.command("report")
@click.argument("inputs", nargs=-1)
@click.option(
    "-o",
    "--output",
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="The HTML report to write (one self-contained file); - for standard output.",
)
@click.option(
    "--policy",
    "extra_policies",
    multiple=True,
    help="A policy shown beside ksm, esx and de (a name or a TOML file; repeatable).",
)
@click.option(
    "--vm",
    "vm_specs",
    multiple=True,
    metavar="NAME=DUMP,DUMP,...",
    help="The snapshots of one VM, oldest first (repeatable); other dumps are grouped by guest uuid or name.",
)
@click.option(
    "--host-memory",
    type=ByteSize(),
    default=None,
    help="Host memory (e.g. 512G): pages paged out and VMs per host under each policy.",
)
@click.option(
    "--json",
    "json_output",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Also write the report's figures as JSON (schema dengine.report/1); - for standard output.",
)
@click.option(
    "--csv",
    "csv_output",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Also write the time series (savings and pages changed per VM and snapshot) as CSV; - for stdout.",
)
@ksm_view_options
@verify_option
@index_options
@dump_options
def report_command(
    inputs: tuple[str, ...],
    output: Path,
    extra_policies: tuple[str, ...],
    vm_specs: tuple[str, ...],
    host_memory: int | None,
    json_output: Path | None,
    csv_output: Path | None,
    ksm_max_page_sharing: int,
    ksm_use_zero_pages: bool,
    ksm_zero_pages_backed: bool,
) -> None:
    """One self-contained HTML report of DUMPS (or plan files from `plan -o`): each VM's memory
    under ksm, esx, de and any --policy side by side, the sharing matrix, savings against host
    memory, and, for VMs with several snapshots, savings over time and the pages changed."""
    from dengine_cli.engine.sharing.model import KsmModel
    from dengine_cli.errors import OutputError
    from dengine_cli.policies import resolve_policy
    from dengine_cli.report.build import ReportRequest, build_report, series_csv, write_atomically
    from dengine_cli.report.snapshots import parse_vm_option

    outputs = [p for p in (output, json_output, csv_output) if p is not None]
    if sum(map(is_stdout, outputs)) > 1:
        raise click.UsageError("only one of -o, --json and --csv can be - (standard output)")
    for path in outputs:
        if not os.path.isdir(path.parent if str(path.parent) else Path(".")):
            raise OutputError(path, "no such directory")
    if not inputs and not vm_specs:
        raise click.UsageError("no dumps given")
    names = dict.fromkeys(["ksm", "esx", "de", *extra_policies])
    cap = _given("ksm_max_page_sharing", ksm_max_page_sharing)
    policies = tuple(_with_ksm_cap(resolve_policy(name), cap) for name in names)
    request = ReportRequest(
        dumps=tuple(distinct_dumps(expand_dump_args(inputs))) if inputs else (),
        vms=tuple(parse_vm_option(vm_specs)),
        policies=policies,
        host_memory=host_memory,
        command=("dengine", *getattr(click.get_current_context().find_root().command, "argv", sys.argv[1:])),
        ksm=KsmModel(ksm_max_page_sharing, ksm_use_zero_pages, ksm_zero_pages_backed),
    )
    refuse_inputs(outputs, [*request.dumps, *(p for vm in request.vms for p in vm.snapshots)])
    refuse_uncreatable(outputs)
    settings = command_settings()
    bar = PageProgress("report")
    try:
        data = build_report(request, settings, bar, _note)
    finally:
        bar.close()
    from dengine_cli.report.page import render_html

    _note("report: drawing the charts")
    page = render_html(data)
    if json_output is not None:
        write_atomically(json_output, (json.dumps(data.to_dict(), indent=1) + "\n").encode())
    if csv_output is not None:
        write_atomically(csv_output, series_csv(data).encode())
    write_atomically(output, page.encode())
    shown = _shown(output)
    _note(f"{shown}: {len(data.vms)} VM(s), {len(data.points)} snapshot(s), policies {', '.join(names)}")


def _dump_identities(
    paths: Sequence[Path], indexes: Sequence[PageIndex], options: OpenOptions
) -> list[dict[str, Any]]:
    """What names each planned dump for `dengine apply`: the key its index was read or built
    under (the file as it was when its pages were read), or, where the index could not be
    cached, the file as it is now."""
    from dengine_cli.cache.index_store import index_key

    return [ix.key or index_key(p, options) for p, ix in zip(paths, indexes, strict=True)]


def _print_plan(report: PlanReport, output_format: str, wide: bool = False, err: bool = False) -> None:
    """Print the plan's summary on stdout (``err``: on stderr, when the plan file takes stdout)."""
    if output_format == "json":
        emit(json.dumps(report.to_dict(), indent=2), err=err)
    elif output_format == "csv":
        from dengine_cli.render_csv import render_plan_csv

        emit(render_plan_csv(report), nl=False, err=err)
    else:
        # Imported only here: the renderer imports rich (40 ms), which JSON does not need.
        from dengine_cli.render import render_plan, render_plan_terminal

        if (width := terminal_width(sys.stderr if err else sys.stdout)) is not None:
            text = render_plan_terminal(report, width=width, wide=wide, color=terminal_color())
        else:
            text = render_plan(report)
        emit(text, nl=False, err=err)


def terminal_width(stream: Any = None) -> int | None:
    """The width of the terminal ``stream`` (default stdout) is, or ``None`` when it is a pipe or
    a file (which get the plain layout: every column, 240 wide, no colour, stable for scripts)."""
    if not (stream or sys.stdout).isatty():
        return None
    import shutil

    return max(40, shutil.get_terminal_size((80, 24)).columns)


def terminal_color() -> bool:
    """Colour on a terminal unless NO_COLOR is set (https://no-color.org) or TERM is dumb."""
    return not os.environ.get("NO_COLOR") and os.environ.get("TERM", "") != "dumb"


# --- the page store: apply, restore, verify ------------------------------------------------------

#: The codecs of ``apply --pack`` frames (dengine_cli.store.frames.FRAME_CODECS; listed here so
#: that `dengine --help` imports no store module).
FRAME_CODEC_NAMES = ("auto", "xz-x86", "xz", "xz-words", "xz-x86-6", "xz-6", "zstd-3", "zstd-9", "zstd-19")


@cli.command("apply")
@click.argument("plan_file", metavar="PLAN", type=click.Path(dir_okay=False, path_type=Path))
@click.option(
    "-o",
    "--output",
    "store",
    required=True,
    type=click.Path(path_type=Path),
    help="The store directory to write (a store already there is refused unless --replace).",
)
@click.option(
    "--pack",
    is_flag=True,
    help="Archive: pages in compressed frames of 1024 pages (any VM still restores alone).",
)
@click.option(
    "--frame-codec",
    type=click.Choice(FRAME_CODEC_NAMES),
    default=None,
    help="Codec of --pack frames (default: auto, per frame LZMA2 or zstd-9, whichever suits its pages).",
)
@click.option(
    "--format",
    "output_format",
    type=click.Choice(["table", "json"]),
    default="table",
    show_default=True,
    help="How to print what the store takes.",
)
@click.option(
    "-j",
    "--jobs",
    type=click.IntRange(min=1),
    default=None,
    help="Threads that encode pages (default: every CPU).",
)
@click.option(
    "--replace",
    is_flag=True,
    help="Replace the store already at STORE, once the new one is complete (without it, refused).",
)
@click.option(
    "--memory-limit",
    type=ByteSize(),
    default=None,
    envvar="DENGINE_MEMORY_LIMIT",
    help="Memory for page arrays (e.g. 512M); past half of it, the plan's columns, page "
    "objects and open dumps' page tables live in files under --tmp-dir (default: a quarter of RAM).",
)
@click.option(
    "--tmp-dir",
    type=TMP_DIR,
    default=None,
    help="Where page arrays past --memory-limit go (default: the directory STORE is in, or the "
    "nearest existing one above it).  A directory that exists.",
)
def apply_command(
    plan_file: Path,
    store: Path,
    pack: bool,
    frame_codec: str | None,
    output_format: str,
    jobs: int | None,
    replace: bool,
    memory_limit: int | None,
    tmp_dir: Path | None,
) -> None:
    """Write the page store a plan file describes (`dengine plan -o PLAN`) and print, per VM, the
    bytes it really takes beside the plan's estimate."""
    from dengine_cli.parallel import Workers
    from dengine_cli.session.memory import default_memory_limit
    from dengine_cli.store.apply import apply_plan

    if frame_codec is not None and not pack:
        raise click.BadParameter("only --pack stores frames", param_hint="--frame-codec")
    _refuse_special_plan(plan_file)
    if is_stdout(store):
        raise click.BadParameter("a store is a directory, not standard output", param_hint="-o")
    bar = PageProgress("applying")
    try:
        result = apply_plan(
            plan_file,
            store,
            pack=pack,
            frame_codec=frame_codec,
            workers=Workers(jobs=jobs or 0),
            on_progress=bar,
            replace=replace,
            memory_limit=memory_limit if memory_limit is not None else default_memory_limit(),
            tmp_dir=tmp_dir,
        )
    finally:
        bar.close()
    if output_format == "json":
        emit(json.dumps(result.to_dict(), indent=2))
    else:
        from dengine_cli.render_store import render_apply

        emit(render_apply(result), nl=False)


decode_jobs_option = click.option(
    "-j",
    "--jobs",
    type=click.IntRange(min=1),
    default=None,
    help="Threads that decode frames of a packed store (default: every CPU).",
)


@cli.command("restore")
@click.argument("store", type=click.Path(path_type=Path))
@click.argument("vms", nargs=-1)
@click.option(
    "-o",
    "--output",
    required=True,
    type=click.Path(path_type=Path),
    help="The image to write (- for standard output); a directory (made if needed) when several VMs "
    "are restored.",
)
@click.option(
    "--format",
    "image_format",
    type=click.Choice(["raw", "elf"]),
    default="raw",
    show_default=True,
    help="raw: a flat image as `dengine extract` writes; elf: an ELF core, one PT_LOAD per present range.",
)
@decode_jobs_option
def restore_command(
    store: Path, vms: tuple[str, ...], output: Path, image_format: str, jobs: int | None
) -> None:
    """Write VMs of a store back as memory images, byte for byte as they were; every page checked.
    VM: a name as `dengine apply` printed it, its file name, or its number (0 for the first;
    default: every VM)."""
    from dengine_cli.parallel import Workers
    from dengine_cli.store.reader import StoreReader
    from dengine_cli.store.restore import restore_vm

    refuse_inside([output], store)
    reader = StoreReader(store, Workers(jobs=jobs or 0))
    made: list[Path] = []  # what this run made, removed if a VM fails: nothing partial at OUT
    try:
        chosen = [reader.vm(v) for v in vms] if vms else list(reader.vms)
        several = len(chosen) != 1
        if several and is_stdout(output):
            raise click.BadParameter(
                f"{len(chosen)} VMs go to a directory, not standard output: name one VM", param_hint="-o"
            )
        # os.path's tests: False where pathlib's raise (a folder this user cannot search).
        if several and not os.path.exists(output):
            made.append(output)
        names, numbers = [vm.name for vm in chosen], [vm.vm for vm in chosen]
        targets = _restore_targets(names, numbers, output, image_format, several=several)
        for vm, target in zip(chosen, targets, strict=True):
            if not is_stdout(target) and not os.path.lexists(target):
                made.insert(0, target)
            with progress(vm.pages, Path(vm.name).name) as tick:
                size = restore_vm(reader, vm, target, image_format, tick)
            _note(f"{_shown(target)}: VM {vm.name}: {size} bytes, {vm.pages} pages present")
    except BaseException:
        for path in made:  # images first, then the directory
            with contextlib.suppress(OSError):
                if os.path.isdir(path):
                    path.rmdir()
                else:
                    path.unlink()
        raise
    finally:
        reader.close()


def _refuse_special_plan(plan_file: Path) -> None:
    """A plan file is mapped and read in place: a FIFO (which ``open`` would wait on for ever, a
    Ctrl-C unheard), a socket or a device is refused before it is opened (exit 3)."""
    import stat

    from dengine_cli.errors import UnreadableFile

    try:
        mode = os.stat(plan_file).st_mode
    except OSError:
        return  # missing or unreadable: the reader names the error
    if not stat.S_ISREG(mode) and not stat.S_ISDIR(mode):
        kind = "a FIFO (a pipe)" if stat.S_ISFIFO(mode) else "not a regular file"
        raise UnreadableFile(str(plan_file), f"is {kind}: a plan file is read in place, from a file")


def _restore_targets(
    names: Sequence[str], numbers: Sequence[int], output: Path, image_format: str, several: bool
) -> list[Path]:
    """One file per VM: ``output`` itself for one VM, else ``output/NAME.FORMAT`` (NAME the file
    name of the VM's dump), ``output/N-NAME.FORMAT`` where two VMs restored share a NAME (N the
    VM's number in the store, as ``restore`` takes it: the file says which VM it holds).  An
    ``output`` of the other kind already there is refused, saying which kind is needed."""
    from dengine_cli.errors import OutputError

    # os.path's tests: False where pathlib's raise (a folder this user cannot search), which
    # the write or the mkdir then names.
    if not several:
        if os.path.isdir(output):
            raise OutputError(output, "is a directory: one VM is restored to a file (-o FILE)")
        return [output]
    if os.path.lexists(output) and not os.path.isdir(output):
        why = f"is not a directory: {len(names)} VMs are restored to a directory, an image each"
        raise OutputError(output, why)
    try:
        output.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(output, e.strerror or str(e)) from e
    bases = [Path(n).name for n in names]
    return [
        output / (f"{base}.{image_format}" if bases.count(base) == 1 else f"{k}-{base}.{image_format}")
        for k, base in zip(numbers, bases, strict=True)
    ]


@cli.command("verify")
@click.argument("store", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print JSON (every damaged gfn) instead of text.")
@decode_jobs_option
def verify_command(store: Path, as_json: bool, jobs: int | None) -> None:
    """Check every object, pack and VM image of a store against its checksums; report what is
    damaged (which VM, which gfn) and exit 7 if anything is."""
    from dengine_cli.errors import StoreDamaged
    from dengine_cli.parallel import Workers
    from dengine_cli.store.verify import unverified, verify_store

    try:
        with progress(0, "verifying") as tick:
            report = verify_store(store, tick, Workers(jobs=jobs or 0))
    except DengineError as e:  # no catalog, not one: still a JSON document for a script
        if as_json:
            emit(json.dumps(unverified(store, e).to_dict(), indent=2))
        raise
    if as_json:
        emit(json.dumps(report.to_dict(), indent=2))
    else:
        from dengine_cli.render_store import render_verify

        emit(render_verify(report), nl=False)
    if not report.ok:
        raise StoreDamaged(store, f"{len(report.problems)} problem(s) found")


def _open(path: Path, options: OpenOptions) -> Dump:
    return open_dump(path, options)


def _quiet() -> bool:
    return bool((click.get_current_context().find_root().obj or {}).get("quiet"))


def _note(text: str) -> None:
    if not _quiet():
        click.echo(text, err=True)


def _shown(path: Path | str) -> str:
    """How a note names the output ``path``."""
    return STDOUT_NAME if is_stdout(path) else str(path)


def _root_flag(ctx: click.Context, param: click.Parameter, value: bool) -> bool:
    """A command's ``-q`` or ``--debug``: the same as the group's (``dengine -q analyze``)."""
    if value and param.name is not None:
        root = ctx.find_root()
        root.obj = {**(root.obj or {}), param.name: True}
    return value


def _root_flags_on_every_command(group: click.Group) -> None:
    """``-q`` and ``--debug`` after the command's name too (``dengine analyze -q ...``): users put
    them there, and click would refuse them as options the command does not have."""
    for command in group.commands.values():
        command.params += [
            click.Option(["--debug"], is_flag=True, expose_value=False, callback=_root_flag,
                         help="On an error, also print the traceback (as `dengine --debug`)."),
            click.Option(["-q", "--quiet"], is_flag=True, expose_value=False, callback=_root_flag,
                         help="No progress bars or notes on stderr (as `dengine -q`)."),
        ]  # fmt: skip


_root_flags_on_every_command(cli)


#: Signals that stop the command as Ctrl-C does, cleanup included (:func:`terminate_once`).
TERMINATING = (signal.SIGTERM, signal.SIGHUP)


def terminate_once(signum: int, frame: object) -> None:
    """SIGTERM or SIGHUP: :class:`~dengine_cli.errors.Terminated` (a KeyboardInterrupt), once;
    later signals of either kind, and Ctrl-C, are ignored while the cleanup it starts runs."""
    from dengine_cli.errors import Terminated

    for s in STOPPING_SIGNALS:
        signal.signal(s, signal.SIG_IGN)
    raise Terminated(signum)


def interrupt_once(signum: int, frame: object) -> None:
    """SIGINT: a KeyboardInterrupt, once.  Later ones are ignored, so that the cleanup the first
    one starts (temporary files removed, workers reaped) runs to its end: a job runner that
    signals the whole process group reaches the command twice, directly and through its
    supervisor, and Ctrl-C may be pressed twice; SIGTERM and SIGHUP too, meanwhile."""
    for s in STOPPING_SIGNALS:
        signal.signal(s, signal.SIG_IGN)
    raise KeyboardInterrupt


def main() -> None:
    """Entry point of the `dengine` script (and of ``python -m dengine_cli``): the command runs
    in a child of a supervising process that turns a SIGBUS (a mapped dump cut while read) into
    a one-line error (:mod:`dengine_cli.parallel.supervisor`)."""
    from dengine_cli.parallel.supervisor import supervised

    if sys.stdout is None:
        # Descriptor 1 was closed (`>&-`): Python gives no stdout, and the next file opened
        # would take its number.  Refused before anything is opened.
        reason = "cannot write: it is closed (give a file, or /dev/null)"
        print(f"dengine: {STDOUT_NAME}: {reason}", file=sys.stderr)
        sys.exit(EXIT_OUTPUT)
    supervised(_main, sys.argv[1:])


def _main() -> None:
    """The command itself.

    Once the command is done and its output flushed, the process leaves with ``os._exit``:
    tearing down the interpreter (every module, every array) measured 20-30 ms, up to 5% of a
    whole ``dengine analyze``, and nothing is left to do then (files are closed, temporary
    files removed, worker processes reaped).  Not when another thread still runs, which a
    normal exit would wait for."""
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:  # not inherited ignored
        signal.signal(signal.SIGINT, interrupt_once)
    for s in TERMINATING:
        if signal.getsignal(s) == signal.SIG_DFL:  # nohup's SIGHUP stays ignored
            signal.signal(s, terminate_once)
    try:
        cli.main(prog_name="dengine")
    except SystemExit as e:
        if e.code is not None and not isinstance(e.code, int):
            raise
        code = e.code or 0
    try:
        sys.stdout.flush()
    except BrokenPipeError:
        code = code or EXIT_PIPE
    except OSError as e:  # what was left in the buffer met a full disk or an I/O error
        with contextlib.suppress(OSError):
            print(f"dengine: {STDOUT_NAME}: cannot write: {e.strerror or e}", file=sys.stderr)
        code = code or EXIT_OUTPUT
    with contextlib.suppress(OSError):
        sys.stderr.flush()
    if threading.active_count() > 1:
        sys.exit(code)
    os._exit(code)


__all__ = ["EXIT_USAGE", "cli", "main"]
