"""Outputs a user asked for (an image, a plan file, a report): never half-written.

:func:`atomic_output` is the one way every command writes such a file: to a temporary file beside
it, given the mode ``open()`` would give (``mkstemp`` makes files 0600), synced and renamed over
the path when the block ends; on any error the temporary file is removed and the path is left as
it was.  Caches have their own writer (:mod:`dengine_cli.cache.files`): a cache that cannot be
written is not an error.

A path that is not a file is not renamed over: a character device or a FIFO (``-o /dev/null``,
``-o /dev/stdout``, ``-o >(gzip > x.gz)``) is written to in place (renaming over /dev/null, as root,
would put a file where the device was), a block device or a socket is refused, and a symbolic
link keeps naming the file it names, which is replaced.
"""

from __future__ import annotations

import contextlib
import errno
import io
import os
import stat
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any, BinaryIO, TextIO, cast

from dengine_cli.errors import OutputError

_umask_lock = threading.Lock()


def _default_mode() -> int:
    with _umask_lock:  # the umask can only be read by setting it
        mask = os.umask(0o022)
        os.umask(mask)
    return 0o666 & ~mask


@contextlib.contextmanager
def _atomic(path: Path | str, text: bool, sync: bool) -> Iterator[IO[Any]]:
    """A file open for writing (binary, or UTF-8 text) that becomes ``path`` when the block
    ends without an error.  An ``OSError`` (in the block or in the rename) is an
    :class:`OutputError` naming ``path``; ``sync``: fsync before the rename.  Images of guest
    memory are written without (syncing gigabytes costs seconds; the command that wrote one
    reads the same page cache): a power loss may leave such an image renamed but incomplete."""
    path = Path(path)
    try:
        mode = os.stat(path).st_mode
    except OSError:
        mode = None
    if mode is not None and (stat.S_ISCHR(mode) or stat.S_ISFIFO(mode)):
        with _in_place(path, text) as f:
            yield f
        return
    if mode is not None and (stat.S_ISBLK(mode) or stat.S_ISSOCK(mode)):
        kind = "a block device" if stat.S_ISBLK(mode) else "a socket"
        raise OutputError(path, f"is {kind}, not a file")
    if os.path.islink(path):  # False, not an error, where the folder cannot be searched
        path = Path(os.path.realpath(path))
    folder = path.parent if str(path.parent) else Path(".")
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=folder)
    except OSError as e:
        raise OutputError(path, e.strerror or str(e)) from e
    try:
        with os.fdopen(fd, "w", encoding="utf-8") if text else os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), _default_mode())
            yield f
            f.flush()
            if sync:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise OutputError(path, e.strerror or str(e)) from e
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def _in_place(path: Path, text: bool) -> Iterator[IO[Any]]:
    """``path``, a character device or a FIFO, open for writing: what is written goes where it
    leads (nothing to remove on an error)."""
    try:
        with open(path, "w", encoding="utf-8") if text else open(path, "wb") as f:
            yield f
    except OSError as e:
        reason = e.strerror or str(e)
        if e.errno == errno.ESPIPE or isinstance(e, io.UnsupportedOperation):
            reason = "a pipe cannot take it (it is written out of order, with holes): give a file"
        raise OutputError(path, reason) from e


def set_size(f: BinaryIO, size: int) -> None:
    """End the output ``f`` at ``size`` bytes (a sparse file's trailing hole); a device or a FIFO
    has no size to set."""
    if stat.S_ISREG(os.fstat(f.fileno()).st_mode):
        f.truncate(size)


@contextlib.contextmanager
def atomic_output(path: Path | str, *, sync: bool = True) -> Iterator[BinaryIO]:
    """:func:`_atomic` for bytes."""
    with _atomic(path, False, sync) as f:
        yield cast(BinaryIO, f)


@contextlib.contextmanager
def atomic_text_output(path: Path | str, *, sync: bool = True) -> Iterator[TextIO]:
    """:func:`_atomic` for UTF-8 text."""
    with _atomic(path, True, sync) as f:
        yield cast(TextIO, f)
