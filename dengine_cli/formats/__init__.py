"""Dump formats: find a file's format by its magic and open it as a :class:`Dump`.

Compressed files (gzip, bzip2, xz, zstd, lzop) are decompressed into a temporary file first and
the content is probed again; the temporary file is unlinked as soon as the reader has mapped it.
Readers therefore must not reopen their file by path after ``open`` returns.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from dengine_cli.errors import FormatError, UnreadableFile, UsageError
from dengine_cli.formats import container, elf, kdump, libvirt_save, lime, qemu_stream, raw, xc_core
from dengine_cli.formats.base import Dump, GuestFacts, OpenOptions, PageBatch, Source, read_head
from dengine_cli.formats.registry import PROBE_BYTES, FormatSpec

#: Probe order matters: xc_core before the generic ELF reader (both start with the ELF magic).
FORMATS: tuple[FormatSpec, ...] = (
    xc_core.FORMAT,
    elf.FORMAT,
    kdump.FORMAT,
    qemu_stream.FORMAT,
    libvirt_save.FORMAT,
    lime.FORMAT,
    raw.FORMAT,
)
FORMAT_NAMES = tuple(f.name for f in FORMATS)

__all__ = [
    "FORMATS",
    "FORMAT_NAMES",
    "Dump",
    "FormatSpec",
    "GuestFacts",
    "OpenOptions",
    "PageBatch",
    "Source",
    "detect",
    "open_dump",
]


def format_named(name: str) -> FormatSpec:
    for spec in FORMATS:
        if spec.name == name:
            return spec
    raise UsageError(f"unknown format {name!r} (known: {', '.join(FORMAT_NAMES)})")


def detect(source: Source) -> FormatSpec:
    """The format whose probe claims the file; a FormatError naming the magic found otherwise."""
    head = read_head(source.path, source.name, PROBE_BYTES, source.start)
    size = _size(source)
    for spec in FORMATS:
        if spec.probe(head, size):
            return spec
    if raw.claims_name(source.name, size):
        return raw.FORMAT
    shown = head[:16].hex(" ") if head else "an empty file"
    raise FormatError(
        source.name,
        source.start,
        expected="the magic of a known dump format (see `dengine formats`)",
        found=shown,
    )


def open_dump(path: Path | str, options: OpenOptions | None = None) -> Dump:
    """Open one dump, whatever its format (or the one ``options.format`` forces)."""
    options = options or OpenOptions()
    source = Source.of(path)
    if os.path.isdir(source.path):
        raise UnreadableFile(source.name, "is a directory")
    head = read_head(source.path, source.name, PROBE_BYTES)
    kind = container.detect(head)
    if kind is None:
        return _open_plain(source, options)
    inner = container.decompress(source, kind, options)
    try:
        dump = _open_plain(inner, options)
        dump.facts.extra["file_compression"] = kind
        if dump.facts.compression is None:
            dump.facts.compression = kind
        return dump
    finally:
        with contextlib.suppress(OSError):
            os.unlink(inner.path)


def _open_plain(source: Source, options: OpenOptions) -> Dump:
    spec = format_named(options.format) if options.format else detect(source)
    return spec.open(source, options)


def _size(source: Source) -> int:
    try:
        return os.path.getsize(source.path) - source.start
    except OSError as e:
        raise UnreadableFile(source.name, e.strerror or str(e)) from e
