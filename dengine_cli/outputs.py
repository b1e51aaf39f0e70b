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

``-`` (:data:`STDOUT`) is standard output, as for most Unix tools (a file of that name is
``./-``).  What goes there cannot be taken back: a command that fails half-way has written half,
and its exit code says so (``set -o pipefail``).  An image (a flat image, an ELF core) is written
with seeks and holes; where the output cannot seek (a pipe, a FIFO) a :class:`SequentialWriter`
writes it in order, its holes as zeros, so ``-o - | zstd`` works; standard output redirected to a
file (``-o - > img``) is written as that file, sparse.  An image is never written to a terminal.
"""

from __future__ import annotations

import contextlib
import errno
import io
import os
import signal
import stat
import sys
import tempfile
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO, Any, BinaryIO, TextIO, cast

from dengine_cli.errors import STOPPING_SIGNALS, OutputError

#: The output name that means standard output (``-o -``).
STDOUT = "-"
#: How errors name standard output.
STDOUT_NAME = "standard output"
#: How errors name standard error.
STDERR_NAME = "standard error"
#: Why an image is not written to a terminal.
TERMINAL = "it is a terminal: redirect it, or give a file"
#: Why an image cannot go where it cannot seek back.
OUT_OF_ORDER = "the image is written out of order, which a pipe cannot take: give a file"

_umask_lock = threading.Lock()


def is_stdout(path: Path | str | None) -> bool:
    """Whether the output ``path`` names standard output (``-``)."""
    return path is not None and str(path) == STDOUT


class SequentialWriter:
    """An output that cannot seek (a pipe, a FIFO) taken as a file written front to back: a seek
    forward writes zeros up to there (a pipe has no holes), a seek back is an ``OSError``
    (``ESPIPE``: what was written cannot be changed)."""

    ZEROS = bytes(1 << 20)

    def __init__(self, f: BinaryIO) -> None:
        self._f = f
        self._at = 0

    def write(self, data: bytes | memoryview) -> int:
        n = memoryview(data).nbytes
        self._f.write(data)
        self._at += n
        return n

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        if whence == os.SEEK_CUR:
            offset += self._at
        elif whence != os.SEEK_SET:
            raise io.UnsupportedOperation("a pipe has no end to seek from")
        if offset < self._at:
            raise OSError(errno.ESPIPE, OUT_OF_ORDER)
        self.pad_to(offset)
        return offset

    def pad_to(self, size: int) -> None:
        """Write zeros up to ``size`` bytes (nothing when that many are written already)."""
        while self._at < size:
            n = min(size - self._at, len(self.ZEROS))
            self._f.write(memoryview(self.ZEROS)[:n])
            self._at += n

    def tell(self) -> int:
        return self._at

    def fileno(self) -> int:
        return self._f.fileno()

    def flush(self) -> None:
        self._f.flush()


def _default_mode() -> int:
    with _umask_lock:  # the umask can only be read by setting it
        mask = os.umask(0o022)
        os.umask(mask)
    return 0o666 & ~mask


@contextlib.contextmanager
def _atomic(path: Path | str, text: bool, sync: bool, image: bool = False) -> Iterator[IO[Any]]:
    """A file open for writing (binary, or UTF-8 text) that becomes ``path`` when the block
    ends without an error.  An ``OSError`` (in the block or in the rename) is an
    :class:`OutputError` naming ``path``; ``sync``: fsync before the rename.  Images of guest
    memory are written without (syncing gigabytes costs seconds; the command that wrote one
    reads the same page cache): a power loss may leave such an image renamed but incomplete.
    ``image``: what is written is an image (seeks, holes; never to a terminal)."""
    if is_stdout(path):
        with _standard_output(text, image) as f:
            yield f
        return
    path, in_place = _target(Path(path))
    if in_place:
        with _in_place(path, text, image) as f:
            yield f
        return
    fd, tmp = _temporary(path)
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


def _target(path: Path) -> tuple[Path, bool]:
    """The file an output ``path`` becomes (a symbolic link's target), and whether it is written
    in place (a character device, a FIFO); ``OutputError`` for a block device or a socket."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        mode = None
    if mode is not None and (stat.S_ISCHR(mode) or stat.S_ISFIFO(mode)):
        return path, True
    if mode is not None and (stat.S_ISBLK(mode) or stat.S_ISSOCK(mode)):
        kind = "a block device" if stat.S_ISBLK(mode) else "a socket"
        raise OutputError(path, f"is {kind}, not a file")
    if os.path.islink(path):  # False, not an error, where the folder cannot be searched
        path = Path(os.path.realpath(path))
    return path, False


def _temporary(path: Path) -> tuple[int, str]:
    """The temporary file beside ``path`` that becomes it (descriptor, name); ``OutputError``
    naming ``path`` where the folder cannot take one."""
    folder = path.parent if str(path.parent) else Path(".")
    try:
        return tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=folder)
    except OSError as e:
        raise OutputError(path, e.strerror or str(e)) from e


def refuse_uncreatable(outputs: Iterable[Path | str | None]) -> None:
    """``OutputError`` for an output that :func:`atomic_output` could not create (a folder that
    takes no files: ``/proc``, read-only, no permission; a block device, a socket), checked
    before any work, with the temporary file it would write, removed at once: a command that
    writes its output only at the end (``plan -o``, ``report``) says so in a moment, not after
    reading every dump.  Standard output, character devices and FIFOs are written in place and
    checked when they are opened.  A stopping signal waits until the file is gone again."""
    for o in outputs:
        if o is None or is_stdout(o):
            continue
        path, in_place = _target(Path(o))
        if in_place:
            continue
        held = signal.pthread_sigmask(signal.SIG_BLOCK, STOPPING_SIGNALS)
        try:
            fd, tmp = _temporary(path)
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, held)


@contextlib.contextmanager
def _in_place(path: Path, text: bool, image: bool) -> Iterator[IO[Any]]:
    """``path``, a character device or a FIFO, open for writing: what is written goes where it
    leads (nothing to remove on an error); an image in order where it cannot seek."""
    try:
        with _opened(path, text) as f:
            if image and os.isatty(f.fileno()):
                raise OutputError(path, TERMINAL)
            yield f if text or not image or f.seekable() else _in_order(f)
    except OSError as e:
        raise OutputError(path, _reason(e)) from e


@contextlib.contextmanager
def _standard_output(text: bool, image: bool) -> Iterator[IO[Any]]:
    """Standard output open for writing, once what this process printed before is out: an image
    goes to an empty file it was redirected to as to any file (sparse), anywhere else in order.
    A pipe its reader closed raises ``BrokenPipeError``, as printing there does.  A stdout with
    no descriptor (a program that runs dengine's CLI in its own process) is written through."""
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, ValueError, io.UnsupportedOperation):
        sys.stdout.flush()
        stream = sys.stdout if text else sys.stdout.buffer
        yield stream if text or not image else _in_order(stream)
        return
    if image and os.isatty(fd):
        raise OutputError(STDOUT_NAME, TERMINAL)
    sys.stdout.flush()
    try:
        with _opened(fd, text) as f:
            yield f if text or not image or _seekable_from_start(fd) else _in_order(f)
    except BrokenPipeError:
        raise
    except OSError as e:
        raise OutputError(STDOUT_NAME, _reason(e)) from e


def _opened(target: Path | int, text: bool) -> IO[Any]:
    """``target`` (a path, or a descriptor left open after) open for writing."""
    closefd = not isinstance(target, int)
    if text:
        return open(target, "w", encoding="utf-8", closefd=closefd)
    return open(target, "wb", closefd=closefd)


def _in_order(f: IO[Any]) -> IO[Any]:
    return cast(IO[Any], SequentialWriter(cast(BinaryIO, f)))


def _seekable_from_start(fd: int) -> bool:
    """Whether an image can be written to ``fd`` with seeks as to a file of its own: an empty
    regular file, not appended to (``-o - > img``; anything else is written in order)."""
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode) or info.st_size:
        return False
    import fcntl

    if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_APPEND:
        return False
    return os.lseek(fd, 0, os.SEEK_CUR) == 0


def _reason(e: OSError) -> str:
    if e.errno == errno.ESPIPE or isinstance(e, io.UnsupportedOperation):
        return OUT_OF_ORDER
    return e.strerror or str(e)


def set_size(f: BinaryIO, size: int) -> None:
    """End the output ``f`` at ``size`` bytes (a sparse file's trailing hole; zeros where it is
    written in order); a device has no size to set."""
    if isinstance(f, SequentialWriter):
        f.pad_to(size)
    elif stat.S_ISREG(os.fstat(f.fileno()).st_mode):
        f.truncate(size)


@contextlib.contextmanager
def atomic_output(path: Path | str, *, sync: bool = True, image: bool = False) -> Iterator[BinaryIO]:
    """:func:`_atomic` for bytes; ``image``: a memory image (see :func:`_atomic`)."""
    with _atomic(path, False, sync, image) as f:
        yield cast(BinaryIO, f)


@contextlib.contextmanager
def atomic_text_output(path: Path | str, *, sync: bool = True) -> Iterator[TextIO]:
    """:func:`_atomic` for UTF-8 text."""
    with _atomic(path, True, sync) as f:
        yield cast(TextIO, f)


#: Why an output that is one of the command's inputs is refused.
AN_INPUT = "it is one of this command's inputs"
#: Why an output that is, or is inside, a store the command reads is refused.
THE_STORE = "it is the store this command reads"
IN_THE_STORE = "it is inside the store this command reads"


def refuse_inputs(outputs: Iterable[Path | str | None], inputs: Iterable[Path | str]) -> None:
    """``OutputError`` for an output that is the same file as an input (by device and inode: a
    second name, a symbolic or a hard link), checked before any work: renamed over, the input
    would be gone; written in place, read while it is overwritten.  Outputs that do not exist
    yet and standard output cannot be."""
    named = [Path(o) for o in outputs if o is not None and not is_stdout(o)]
    existing = [o for o in named if os.path.exists(o)]
    if not existing:
        return
    read = [i for i in map(Path, inputs) if os.path.isfile(i)]
    for o in existing:
        if any(os.path.samefile(o, i) for i in read):
            raise OutputError(o, AN_INPUT)


def refuse_inside(outputs: Iterable[Path | str | None], store: Path) -> None:
    """``OutputError`` for an output that is the directory ``store`` or lies in it (its catalog,
    its packs): written there, it would replace or mix into the store being read."""
    root = os.path.realpath(store)
    for o in outputs:
        if o is None or is_stdout(o):
            continue
        where = os.path.realpath(o)
        if where == root:
            raise OutputError(Path(o), THE_STORE)
        if where.startswith(root.rstrip(os.sep) + os.sep):
            raise OutputError(Path(o), IN_THE_STORE)
