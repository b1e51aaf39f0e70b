"""Dump formats: find a file's format by its magic and open it as a :class:`Dump`.

Compressed files (gzip, bzip2, xz, zstd, lzop) have their first decompressed bytes probed, then
are decompressed into a temporary file (bounded: see :mod:`dengine_cli.formats.container`); the
temporary file is unlinked as soon as the reader has mapped it.
Readers therefore must not reopen their file by path after ``open`` returns.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import stat
from pathlib import Path

from dengine_cli.errors import FormatError, UnreadableFile, UsageError
from dengine_cli.formats import container
from dengine_cli.formats.base import Dump, GuestFacts, OpenOptions, PageBatch, Source, read_head
from dengine_cli.formats.registry import PROBE_BYTES, FormatSpec

#: The readers in probe order: format name, module, and the bytes a file of that format starts
#: with.  A reader is imported only when a file starts with one of its magics or its format is
#: asked for by name: a command reading ELF dumps does not pay for importing the other six (and
#: the XML parser libvirt's reader needs).  Probe order matters: xc_core before the generic ELF
#: reader (both start with the ELF magic); raw images have no magic (taken by file name, see
#: :func:`dengine_cli.formats.raw.claims_name`).  tests/test_formats.py checks these magics
#: against the readers' own probes.
READERS: tuple[tuple[str, str, tuple[bytes, ...]], ...] = (
    (
        "xc-core",
        "xc_core",
        (b"\x7fELF", b"\xed\xeb\x0f\xf0", b"\xf0\x0f\xeb\xed", b"\xee\xeb\x0f\xf0", b"\xf0\x0f\xeb\xee"),
    ),
    ("elf", "elf", (b"\x7fELF",)),
    ("kdump", "kdump", (b"KDUMP   ", b"DISKDUMP", b"makedumpfile")),
    ("qemu-stream", "qemu_stream", (b"QEVM",)),
    ("libvirt-save", "libvirt_save", (b"LibvirtQemudSave", b"LibvirtQemudPart")),
    ("lime", "lime", (b"EMiL",)),
    ("raw", "raw", ()),
)
FORMAT_NAMES = tuple(name for name, _, _ in READERS)

__all__ = [
    "FORMAT_NAMES",
    "READERS",
    "Dump",
    "FormatSpec",
    "GuestFacts",
    "OpenOptions",
    "PageBatch",
    "Source",
    "all_formats",
    "detect",
    "format_named",
    "not_a_dump_file",
    "open_dump",
]


def _load(module: str) -> FormatSpec:
    spec: FormatSpec = importlib.import_module(f"dengine_cli.formats.{module}").FORMAT
    return spec


def all_formats() -> tuple[FormatSpec, ...]:
    """Every reader's :class:`FormatSpec`, in probe order (imports them all)."""
    return tuple(_load(module) for _, module, _ in READERS)


def format_named(name: str) -> FormatSpec:
    for known, module, _ in READERS:
        if known == name:
            return _load(module)
    raise UsageError(f"unknown format {name!r} (known: {', '.join(FORMAT_NAMES)})")


def detect(source: Source) -> FormatSpec:
    """The format whose probe claims the file; a FormatError naming the magic found otherwise."""
    head = read_head(source.path, source.name, PROBE_BYTES, source.start)
    return detect_head(head, _size(source), source, source.name)


def detect_head(head: bytes, size: int, source: Source, name: str) -> FormatSpec:
    """The format whose probe claims content starting with ``head`` of ``size`` bytes (raw
    images by ``name``); a FormatError naming ``source`` and the magic found otherwise."""
    for _, module, magics in READERS:
        if magics and head.startswith(magics):
            spec = _load(module)
            if spec.probe(head, size):
                return spec
    from dengine_cli.formats import raw

    if raw.claims_name(name, size):
        return raw.FORMAT
    shown = head[:16].hex(" ") if head else "an empty file"

    # A reader's magic (or the start of one: a file cut within it), then a header none of them
    # takes (cut short, another version): say so, rather than that no magic was found.
    def starts(magic: bytes) -> bool:
        return head.startswith(magic) or (4 <= len(head) < len(magic) and magic.startswith(head))

    claimed = [fmt for fmt, _, magics in READERS if any(starts(m) for m in magics)]
    if claimed:
        magic = next(m for _, _, magics in READERS for m in magics if starts(m))
        ends = f" (the file ends at {size:#x})" if size <= len(head) else ""
        raise FormatError(
            source.name,
            source.start,
            expected=f"a header {' or '.join(claimed)} reads after the magic {magic.hex(' ')}",
            found=f"{shown}{ends}: --dump-format {claimed[-1]} says what is wrong",
        )
    raise FormatError(
        source.name,
        source.start,
        expected="the magic of a known dump format (see `dengine formats`)",
        found=shown,
    )


def not_a_dump_file(mode: int) -> str | None:
    """Why a path of file mode ``mode`` (``st_mode``) cannot be a dump, or ``None``: dumps are
    mapped and read in place, which a directory, a FIFO or a socket cannot be (and opening a
    FIFO nothing writes to would wait for ever)."""
    if stat.S_ISDIR(mode):
        return "is a directory"
    if stat.S_ISFIFO(mode):
        return "is a FIFO (a pipe): dumps are read in place, from a file"
    if stat.S_ISSOCK(mode):
        return "is a socket, not a file"
    return None


def open_dump(path: Path | str, options: OpenOptions | None = None) -> Dump:
    """Open one dump, whatever its format (or the one ``options.format`` forces)."""
    options = options or OpenOptions()
    source = Source.of(path)
    with contextlib.suppress(OSError):  # a missing file: read_head names the error
        if (reason := not_a_dump_file(os.stat(source.path).st_mode)) is not None:
            raise UnreadableFile(source.name, reason)
    head = read_head(source.path, source.name, PROBE_BYTES)
    kind = container.detect(head)
    if kind is None:
        return _open_plain(source, options, head)
    # The content is probed on its first bytes, before anything is written to disk; a name like
    # guest.raw.zst says a raw image is inside.
    spec: FormatSpec | None = format_named(options.format) if options.format else None
    probed = Source(source.path, f"{source.name} (decompressed {kind})", origin=source.label)
    inner_name = container.inner_name(source.name)

    def accept(content: bytes, size: int | None) -> None:
        nonlocal spec
        if spec is None:
            # Size unknown until decompressed: a whole page, for the raw-name check.
            spec = detect_head(content, size if size is not None else 1 << 62, probed, inner_name)

    with container.decompressed(source, kind, options, accept=accept) as inner:
        if spec is None:
            raise RuntimeError("a container's content was not probed")
        dump = spec.open(inner, options)  # mapped: the copy is removed once this block ends
        dump.facts.extra["file_compression"] = kind
        if dump.facts.compression is None:
            dump.facts.compression = kind
        return dump


def _open_plain(source: Source, options: OpenOptions, head: bytes) -> Dump:
    """Open a file that is no container by its magic (``head``: its first bytes).  Content no
    reader claims in a file whose name says it is a container (``guest.raw.zst``) is refused
    as that container with the wrong magic."""
    if options.format:
        return format_named(options.format).open(source, options)
    try:
        spec = detect_head(head, _size(source), source, source.name)
    except FormatError:
        named = container.named_kind(source.name)
        if named is None:
            raise
        raise container.not_as_named(source, head, named) from None
    return spec.open(source, options)


def _size(source: Source) -> int:
    try:
        return os.path.getsize(source.path) - source.start
    except OSError as e:
        raise UnreadableFile(source.name, e.strerror or str(e)) from e
