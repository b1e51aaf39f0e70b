"""Compressed dump files: recognize gzip, bzip2, xz, zstd and lzop, and decompress to a sparse
temporary file that a reader then maps like any other dump.

Where these come from: ``virsh dump`` without ``--memory-only`` pipes the QEMU stream through the
``dump_image_format`` of qemu.conf, libvirt save images compress their tail the same way
(FORMATS.md §0, §3.1, §3.3), and people compress raw images before copying them around.

Magics: gzip RFC 1952 (``1F 8B``), bzip2 (``BZh``), xz file format 1.0.4 (``FD 37 7A 58 5A 00``),
zstd RFC 8878 (``28 B5 2F FD``; skippable frames ``5x 2A 4D 18``), lzop (``89 4C 5A 4F 00 0D 0A
1A 0A``; container layout from lzop 1.04 ``src/lzop.c`` ``p_header``/``x_header``/``x_decompress``).

Decompression streams in bounded memory (a few MiB) and writes the output *sparse*: 4 KiB-aligned
chunks that are all zero are seeked over, so a mostly-zero raw image takes little disk.

What a container may cost is bounded before and while it is written:

* its first :data:`PROBE_BYTES` of content are decompressed into memory and shown to the caller
  (``accept``), which refuses content no reader claims before anything is written to disk;
* the content may not exceed a limit (``OpenOptions.max_decompressed``, default
  :data:`DEFAULT_MAX_DECOMPRESSED`), checked against the size a zstd frame header claims before
  decompressing, and against the bytes produced while decompressing;
* each write first checks the free space of the temporary folder and stops, removing the file,
  rather than leave less than :func:`reserve` free;
* the compressed file is read with ``pread``, never mapped: a file that shrinks while it is
  decompressed gives an error, not SIGBUS.
"""

from __future__ import annotations

import contextlib
import os
import signal
import struct
import threading
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from dengine_cli.errors import STOPPING_SIGNALS, FormatError, OutputError, UnreadableFile, UnsupportedFeature
from dengine_cli.formats.base import OpenOptions, Source
from dengine_cli.pages import PAGE_SIZE

#: Content bytes decompressed into memory and probed before any is written to disk (as many as
#: the readers' probes look at: ``registry.PROBE_BYTES``).
PROBE_BYTES = 1 << 16
#: The most content a container may decompress to unless ``--max-decompressed`` says otherwise:
#: 1 TiB, far beyond a guest's memory, and well short of what fills a disk by accident.
DEFAULT_MAX_DECOMPRESSED = 1 << 40
#: Free space a decompression leaves in the temporary folder: 256 MiB, or a twentieth of a
#: smaller file system.
RESERVE_MAX = 256 << 20
#: Compressed bytes read ahead at a time.
READ_AHEAD = 1 << 20
#: File name endings that say which container a file is (taken off to see what is inside:
#: ``guest.raw.zst`` holds a raw image).
SUFFIXES = {
    "gzip": (".gz", ".gzip"),
    "bzip2": (".bz2", ".bzip2"),
    "xz": (".xz",),
    "zstd": (".zst", ".zstd"),
    "lzop": (".lzo", ".lzop"),
}

GZIP_MAGIC = b"\x1f\x8b"
BZIP2_MAGIC = b"BZh"
XZ_MAGIC = b"\xfd7zXZ\x00"
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
LZOP_MAGIC = b"\x89LZO\x00\r\n\x1a\n"
#: zstd skippable frames: magic 0x184D2A50..0x184D2A5F (LE), RFC 8878 §3.1.2.
ZSTD_SKIPPABLE_LO, ZSTD_SKIPPABLE_HI = 0x184D2A50, 0x184D2A5F

KINDS = ("gzip", "bzip2", "xz", "zstd", "lzop")
#: Each container's magic as an error shows it (bzip2's fourth byte is its level, "1"-"9").
MAGICS_SHOWN = {
    "gzip": GZIP_MAGIC.hex(" "),
    "bzip2": BZIP2_MAGIC.hex(" ") + " 31-39",
    "xz": XZ_MAGIC.hex(" "),
    "zstd": ZSTD_MAGIC.hex(" "),
    "lzop": LZOP_MAGIC.hex(" "),
}

#: Compressed bytes handed to a codec at a time; an error is located within this much.
INPUT_CHUNK = 1 << 16
#: Decompressed bytes asked of a codec at a time (bounds memory whatever the ratio).
OUTPUT_CHUNK = 4 << 20
#: Decompressed bytes gathered before zero chunks are sought over and the rest written.
FLUSH_BYTES = 8 << 20

# lzop header flags (lzop src/conf.h).
LZOP_F_ADLER32_D = 0x1
LZOP_F_ADLER32_C = 0x2
LZOP_F_H_EXTRA_FIELD = 0x40
LZOP_F_CRC32_D = 0x100
LZOP_F_CRC32_C = 0x200
LZOP_F_MULTIPART = 0x400
LZOP_F_H_FILTER = 0x800
LZOP_F_H_CRC32 = 0x1000
#: lzop methods: LZO1X-1, LZO1X-1(15), LZO1X-999 all decompress with lzo1x_decompress.
LZOP_LZO1X_METHODS = (1, 2, 3)
#: lzop refuses blocks larger than 64 MiB (MAX_BLOCK_SIZE), so a larger claim is a lie.
LZOP_MAX_BLOCK = 64 << 20
#: lzop header fields that changed with lzop 0.94 (version_needed_to_extract, level, mtime_high).
LZOP_VERSION_0940 = 0x0940


def detect(head: bytes) -> str | None:
    """The compression of a file from its first bytes (FORMATS.md §0), or ``None``."""
    # gzip: the magic, CM 8 (deflate, the only method RFC 1952 defines) and FLG's reserved bits
    # clear: two bytes alone also begin one raw guest image in 65,536 (a page of random data).
    if head.startswith(GZIP_MAGIC) and len(head) > 3 and head[2] == 8 and not head[3] & 0xE0:
        return "gzip"
    if head.startswith(BZIP2_MAGIC) and len(head) > 3 and head[3] in b"123456789":
        return "bzip2"
    if head.startswith(XZ_MAGIC):
        return "xz"
    if head.startswith(ZSTD_MAGIC):
        return "zstd"
    if len(head) >= 4 and ZSTD_SKIPPABLE_LO <= struct.unpack_from("<I", head)[0] <= ZSTD_SKIPPABLE_HI:
        return "zstd"
    if head.startswith(LZOP_MAGIC):
        return "lzop"
    return None


def named_kind(name: str) -> tuple[str, str] | None:
    """The container a file name's ending says the file is, and that ending as the name spells
    it (``guest.raw.zst`` -> ``("zstd", ".zst")``), or ``None``."""
    lower = name.lower()
    for kind, suffixes in SUFFIXES.items():
        for suffix in suffixes:
            if lower.endswith(suffix) and len(name) > len(suffix):
                return kind, name[-len(suffix) :]
    return None


def inner_name(name: str) -> str:
    """``name`` without an ending that names a container (``guest.raw.zst`` -> ``guest.raw``),
    or as it is.  Whichever container the file really is: the name says what is inside."""
    named = named_kind(name)
    return name[: -len(named[1])] if named else name


def not_as_named(source: Source, head: bytes, named: tuple[str, str]) -> FormatError:
    """The error for a file whose name says it is a ``named`` container but whose first bytes
    ``head`` are no container's and no reader's: the container promised, its magic, and what
    the file starts with instead."""
    kind, ending = named
    magic = MAGICS_SHOWN[kind]
    shown = head[: max(4, len(magic.split()))].hex(" ") if head else "an empty file"
    return source.error(
        0, expected=f"{kind} compressed data (the name ends in {ending}; magic {magic})", found=shown
    )


def reserve(fs_bytes: int) -> int:
    """Free space a decompression must leave on a file system of ``fs_bytes``."""
    return min(RESERVE_MAX, fs_bytes // 20)


class TooLarge(OutputError):
    """A container whose content is larger than the limit (exit 6: its copy is not written)."""

    def __init__(self, source: Source, limit: int, what: str) -> None:
        super().__init__(
            source.label,
            f"{what} more than the limit of {limit} bytes for decompressed content "
            "(--max-decompressed, $DENGINE_MAX_DECOMPRESSED)",
        )


class _SparseWriter:
    """Writes a byte stream to ``fd``, seeking over 4 KiB-aligned all-zero chunks; refuses to go
    past ``limit`` bytes of content or to leave less than :func:`reserve` free on the disk."""

    def __init__(self, fd: int, source: Source, limit: int, folder: str) -> None:
        self.fd = fd
        self.size = 0
        self._pending = bytearray()
        self._source = source
        self._limit = limit
        self._folder = folder

    def write(self, data: bytes) -> None:
        if self.size + len(self._pending) + len(data) > self._limit:
            raise TooLarge(self._source, self._limit, "its content decompresses to")
        self._pending += data
        if len(self._pending) >= FLUSH_BYTES:
            self._flush(final=False)

    def _room(self, nbytes: int) -> None:
        """Check the file system can take ``nbytes`` more and keep its reserve."""
        st = os.fstatvfs(self.fd)
        free = st.f_bavail * st.f_frsize
        keep = reserve(st.f_blocks * st.f_frsize)
        if nbytes > free - keep:
            raise OutputError(
                self._folder,
                f"decompressing {self._source.label} needs more than the {free} bytes free there "
                f"(keeping {keep} free; --tmp-dir chooses another folder)",
            )

    def finish(self) -> int:
        self._flush(final=True)
        os.ftruncate(self.fd, self.size)
        return self.size

    def _flush(self, final: bool) -> None:
        n = len(self._pending) if final else len(self._pending) - len(self._pending) % PAGE_SIZE
        if n == 0:
            return
        chunk = bytes(self._pending[:n])
        del self._pending[:n]
        whole = n - n % PAGE_SIZE
        if whole:
            rows = np.frombuffer(chunk, dtype=np.uint64, count=whole // 8).reshape(-1, PAGE_SIZE // 8)
            nonzero = np.flatnonzero(rows.any(axis=1))
            if len(nonzero):
                breaks = np.flatnonzero(np.diff(nonzero) != 1) + 1
                starts = nonzero[np.concatenate(([0], breaks))]
                ends = nonzero[np.concatenate((breaks - 1, [len(nonzero) - 1]))] + 1
                self._room(int((ends - starts).sum()) * PAGE_SIZE)
                for s, e in zip(starts.tolist(), ends.tolist(), strict=True):
                    os.pwrite(self.fd, chunk[s * PAGE_SIZE : e * PAGE_SIZE], self.size + s * PAGE_SIZE)
        tail = chunk[whole:]
        if tail.strip(b"\0"):
            self._room(len(tail))
            os.pwrite(self.fd, tail, self.size + whole)
        self.size += n


class _Decompressor(Protocol):
    """What the stdlib codecs (bz2, lzma) have in common."""

    @property
    def eof(self) -> bool: ...
    @property
    def unused_data(self) -> bytes: ...
    @property
    def needs_input(self) -> bool: ...

    def decompress(self, data: bytes, max_length: int = -1) -> bytes: ...


class FileBytes:
    """The bytes of a file read with ``pread`` through a read-ahead window, indexed like
    ``bytes`` (an int gives a byte, a slice gives bytes).  ``len`` is the size when opened; a
    read that finds the file shorter raises :class:`UnreadableFile` ("changed while being
    read"), where a mapping would have killed the process with SIGBUS."""

    def __init__(self, fd: int, size: int, name: str) -> None:
        self.fd = fd
        self.size = size
        self.name = name
        self._at = 0
        self._window = b""

    def __len__(self) -> int:
        return self.size

    def _read(self, start: int, stop: int) -> bytes:
        stop = min(stop, self.size)
        if start >= stop:
            return b""
        if not (self._at <= start and stop <= self._at + len(self._window)):
            want = max(stop - start, READ_AHEAD)
            try:
                self._window = os.pread(self.fd, min(want, self.size - start), start)
            except OSError as e:
                raise UnreadableFile(self.name, e.strerror or str(e)) from e
            self._at = start
            if len(self._window) < stop - start:
                raise UnreadableFile(
                    self.name,
                    f"it changed while being read: it ends at {start + len(self._window):#x}, "
                    f"not {self.size:#x} as when it was opened",
                )
        return self._window[start - self._at : stop - self._at]

    def __getitem__(self, key: int | slice) -> Any:
        if isinstance(key, slice):
            return self._read(key.start or 0, self.size if key.stop is None else key.stop)
        return self._read(key, key + 1)[0]


Accept = Callable[[bytes, int | None], None]


@contextlib.contextmanager
def decompressed(
    source: Source, kind: str, options: OpenOptions, *, accept: Accept | None = None
) -> Iterator[Source]:
    """:func:`decompress`, its copy removed when the block ends, however it ends: the copy's
    name is recorded the moment it is made, so that a signal (Ctrl-C, SIGTERM) landing anywhere
    from there to the end of the block leaves nothing in ``--tmp-dir``."""
    spilled: list[str] = []
    try:
        yield decompress(source, kind, options, accept=accept, spilled=spilled)
    finally:
        for path in spilled:
            with contextlib.suppress(OSError):
                os.unlink(path)


def decompress(
    source: Source,
    kind: str,
    options: OpenOptions,
    *,
    accept: Accept | None = None,
    spilled: list[str] | None = None,
) -> Source:
    """Decompress ``source`` (from ``source.start``) into a new sparse temporary file.

    ``accept(head, size)`` is shown the first :data:`PROBE_BYTES` of the content (all of it when
    shorter; ``size`` is then its length, else the size the container claims or ``None``) before
    anything is written; it raises to refuse the content.  The caller unlinks the returned file
    once it has been mapped.  A corrupt or truncated input raises a FormatError naming the offset
    in the compressed file where decompression failed; content beyond the limit or the free space
    raises an OutputError; the temporary file is removed on any error.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown compression {kind!r}")
    limit = options.max_decompressed or DEFAULT_MAX_DECOMPRESSED
    try:
        src_fd = os.open(source.path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    except OSError as e:
        raise UnreadableFile(source.name, e.strerror or str(e)) from e
    try:
        size = os.fstat(src_fd).st_size
        if source.start >= size:
            raise source.error(source.start, expected=f"{kind} compressed data", found="end of file")
        data = FileBytes(src_fd, size, source.name)
        claimed = _claimed_size(kind, data, source.start)
        if claimed is not None and claimed > limit:
            raise TooLarge(source, limit, f"its {kind} header says it holds {claimed} bytes,")
        stream = _STREAMS[kind](source, data)
        head = bytearray()
        ended = True
        for piece in stream:
            head += piece
            if len(head) >= PROBE_BYTES:
                ended = False
                break
        if len(head) > limit:
            raise TooLarge(source, limit, "its content decompresses to")
        if accept is not None:
            accept(bytes(head[:PROBE_BYTES]), len(head) if ended else claimed)
        return _spill(source, kind, options, stream, bytes(head), limit, spilled)
    finally:
        os.close(src_fd)


def _spill(
    source: Source,
    kind: str,
    options: OpenOptions,
    stream: Iterator[bytes],
    head: bytes,
    limit: int,
    spilled: list[str] | None = None,
) -> Source:
    """Write ``head`` and the rest of ``stream`` to a new sparse temporary file (its name
    appended to ``spilled`` as it is made)."""
    # tempfile is imported only here: every dump is checked for compression, few are compressed.
    import tempfile

    folder = str(options.tmp_dir) if options.tmp_dir else tempfile.gettempdir()
    # Signals are taken by the main thread: there, one that came between the file's creation
    # and its name's record would leave the file behind.
    main = threading.current_thread() is threading.main_thread()
    held = signal.pthread_sigmask(signal.SIG_BLOCK, STOPPING_SIGNALS) if main else None
    try:
        fd, tmp = tempfile.mkstemp(prefix="dengine-", suffix=f".{kind}.raw", dir=folder)
        if spilled is not None:
            spilled.append(tmp)
    except OSError as e:
        raise OutputError(folder, e.strerror or str(e)) from e
    finally:
        if held is not None:
            signal.pthread_sigmask(signal.SIG_SETMASK, held)
    try:
        writer = _SparseWriter(fd, source, limit, folder)
        writer.write(head)
        for piece in stream:
            writer.write(piece)
        writer.finish()
    except OSError as e:
        _discard(fd, tmp)
        raise OutputError(tmp, e.strerror or str(e)) from e
    except BaseException:
        _discard(fd, tmp)
        raise
    os.close(fd)
    return Source(path=Path(tmp), name=f"{source.name} (decompressed {kind})", origin=source.label)


def _claimed_size(kind: str, data: FileBytes, start: int) -> int | None:
    """The content size a container's header states up front, where it has one: the frame content
    size of a zstd file's first frame (RFC 8878 §3.1.1.1.4; absent when zstd wrote to a pipe).
    gzip's ISIZE is the size mod 2^32 and sits at the end: zlib checks it, it bounds nothing."""
    if kind != "zstd" or len(data) - start < 6:
        return None
    if struct.unpack("<I", data[start : start + 4])[0] != 0xFD2FB528:
        return None
    fhd = data[start + 4]
    single_segment = bool(fhd & 0x20)
    fcs_size = (0, 2, 4, 8)[fhd >> 6] or (1 if single_segment else 0)
    if fcs_size == 0:
        return None
    at = start + 5 + (0 if single_segment else 1) + (0, 1, 2, 4)[fhd & 3]
    raw = data[at : at + fcs_size]
    if len(raw) < fcs_size:
        return None
    value = int.from_bytes(raw, "little")
    return value + 256 if fcs_size == 2 else value


def _discard(fd: int, tmp: str) -> None:
    with contextlib.suppress(OSError):
        os.close(fd)
    with contextlib.suppress(OSError):
        os.unlink(tmp)


def _codec_error(source: Source, kind: str, offset: int, message: str) -> FormatError:
    return source.error(offset, expected=f"{kind} compressed data", found=f"{kind} error: {message}")


def _truncated(source: Source, kind: str, offset: int) -> FormatError:
    return source.error(offset, expected=f"more {kind} compressed data", found="end of file (truncated)")


def _gzip_stream(source: Source, data: FileBytes) -> Iterator[bytes]:
    """gzip members one after another (``gzip -c`` of several inputs concatenates members)."""
    pos = source.start
    end = len(data)
    while pos < end:
        d = zlib.decompressobj(wbits=31)
        member_start = pos
        while not d.eof:
            if pos >= end:
                raise _truncated(source, "gzip", end)
            chunk = bytes(data[pos : min(pos + INPUT_CHUNK, end)])
            fed = pos
            pos += len(chunk)
            try:
                out = d.decompress(chunk, OUTPUT_CHUNK)
                while True:
                    if out:
                        yield out
                    if not d.unconsumed_tail or d.eof:
                        break
                    out = d.decompress(d.unconsumed_tail, OUTPUT_CHUNK)
            except zlib.error as e:
                raise _codec_error(source, "gzip", fed, str(e)) from None
        pos -= len(d.unused_data)
        if pos == member_start:
            break
        # Trailing zero padding (tape-style) after the last member is ignored like gzip -d does.
        if not bytes(data[pos : min(pos + INPUT_CHUNK, end)]).strip(b"\0") and pos + INPUT_CHUNK >= end:
            break
        if bytes(data[pos : pos + 2]) != GZIP_MAGIC:
            raise source.error(pos, expected="another gzip member or end of file", found="trailing garbage")


def _stdlib_stream(
    kind: str, make: Callable[[], _Decompressor], magic: bytes, allow_zero_padding: bool
) -> Callable[[Source, FileBytes], Iterator[bytes]]:
    """bzip2 and xz: streams one after another, as ``bzip2 -c``/``xz -c`` of several inputs."""

    def stream(source: Source, data: FileBytes) -> Iterator[bytes]:
        import lzma

        pos = source.start
        end = len(data)
        while pos < end:
            d = make()
            fed = pos
            while not d.eof:
                if d.needs_input:
                    if pos >= end:
                        raise _truncated(source, kind, end)
                    chunk = bytes(data[pos : min(pos + INPUT_CHUNK, end)])
                    fed = pos
                    pos += len(chunk)
                else:
                    chunk = b""
                try:
                    out = d.decompress(chunk, OUTPUT_CHUNK)
                except (OSError, EOFError, lzma.LZMAError, ValueError) as e:
                    raise _codec_error(source, kind, fed, str(e)) from None
                if out:
                    yield out
            pos -= len(d.unused_data)
            rest = bytes(data[pos : min(pos + len(magic), end)])
            if rest == magic:
                continue
            if allow_zero_padding and not bytes(data[pos:end]).strip(b"\0"):
                break  # xz stream padding (multiples of 4 zero bytes) after the last stream
            if pos < end:
                raise source.error(
                    pos, expected=f"another {kind} stream or end of file", found="trailing garbage"
                )

    return stream


def _zstd_stream(source: Source, data: FileBytes) -> Iterator[bytes]:
    """zstd frames one after another, fed to the codec one block at a time.

    Walking the frame and block headers (RFC 8878 §3.1.1) bounds the output of each call to one
    block (at most 128 KiB) and locates truncation exactly; ``zstandard``'s stream reader would
    end silently on a truncated frame.
    """
    import zstandard

    dctx = zstandard.ZstdDecompressor()
    pos = source.start
    end = len(data)

    def need(at: int, n: int) -> None:
        if at + n > end:
            raise _truncated(source, "zstd", end)

    while pos < end:
        need(pos, 4)
        (magic,) = struct.unpack("<I", data[pos : pos + 4])
        if ZSTD_SKIPPABLE_LO <= magic <= ZSTD_SKIPPABLE_HI:
            need(pos, 8)
            (skip,) = struct.unpack("<I", data[pos + 4 : pos + 8])
            need(pos + 8, skip)
            pos += 8 + skip
            continue
        if magic != 0xFD2FB528:
            raise source.error(
                pos, expected="a zstd frame magic 28 b5 2f fd", found=bytes(data[pos : pos + 4]).hex(" ")
            )
        need(pos, 5)
        fhd = data[pos + 4]
        if fhd & 0x08:
            raise _codec_error(source, "zstd", pos + 4, "reserved bit set in the frame header descriptor")
        single_segment = bool(fhd & 0x20)
        fcs_size = (0, 2, 4, 8)[fhd >> 6] or (1 if single_segment else 0)
        header_len = 5 + (0 if single_segment else 1) + (0, 1, 2, 4)[fhd & 3] + fcs_size
        has_checksum = bool(fhd & 0x04)
        need(pos, header_len)
        d = dctx.decompressobj()
        frame_start = pos
        cut = pos + header_len
        last = False
        while not last:
            need(cut, 3)
            b0, b1, b2 = data[cut], data[cut + 1], data[cut + 2]
            word = b0 | b1 << 8 | b2 << 16
            last = bool(word & 1)
            block_type = (word >> 1) & 3
            block_size = word >> 3
            if block_type == 3:
                raise _codec_error(source, "zstd", cut, "reserved block type")
            body = 1 if block_type == 1 else block_size
            need(cut + 3, body)
            block_end = cut + 3 + body + (4 if last and has_checksum else 0)
            need(block_end, 0)
            try:
                out = d.decompress(bytes(data[pos:block_end]))
            except zstandard.ZstdError as e:
                raise _codec_error(
                    source, "zstd", cut if cut > frame_start else frame_start, str(e)
                ) from None
            if out:
                yield out
            pos = block_end
            cut = block_end
        if not d.eof:
            raise _codec_error(source, "zstd", frame_start, "frame did not end after its last block")


def _lzop_stream(source: Source, data: FileBytes) -> Iterator[bytes]:
    """lzop files (lzop 1.04 ``x_header``/``x_decompress``): a header, then blocks of
    ``be32 uncompressed length, be32 compressed length, checksums, data`` up to a zero length."""
    from lzallright import LZOCompressor, LZOError

    pos = source.start
    end = len(data)

    def take(n: int) -> bytes:
        nonlocal pos
        if pos + n > end:
            raise _truncated(source, "lzop", end)
        out = bytes(data[pos : pos + n])
        pos += n
        return out

    def be16() -> int:
        return int.from_bytes(take(2), "big")

    def be32() -> int:
        return int.from_bytes(take(4), "big")

    while pos < end:
        member = pos
        if take(len(LZOP_MAGIC)) != LZOP_MAGIC:
            raise source.error(
                member, expected="the lzop magic", found=bytes(data[member : member + 9]).hex(" ")
            )
        header_start = pos
        version = be16()
        be16()  # lib_version
        if version >= LZOP_VERSION_0940:
            be16()  # version_needed_to_extract
        method = take(1)[0]
        if version >= LZOP_VERSION_0940:
            take(1)  # level
        flags = be32()
        if flags & LZOP_F_H_FILTER:
            raise UnsupportedFeature(source.name, pos, feature="lzop filter (lzop -F)")
        if flags & LZOP_F_MULTIPART:
            raise UnsupportedFeature(source.name, pos, feature="lzop multipart archive")
        if method not in LZOP_LZO1X_METHODS:
            raise UnsupportedFeature(source.name, header_start, feature=f"lzop method {method}")
        be32()  # mode
        be32()  # mtime_low
        if version >= LZOP_VERSION_0940:
            be32()  # mtime_high
        name_len = take(1)[0]
        take(name_len)
        header_sum = _lzop_sum(flags & LZOP_F_H_CRC32, bytes(data[header_start:pos]))
        where = pos
        if be32() != header_sum:
            raise _codec_error(source, "lzop", where, "header checksum mismatch")
        if flags & LZOP_F_H_EXTRA_FIELD:
            extra = be32()
            take(extra)
            be32()  # extra field checksum
        while True:
            block = pos
            dst_len = be32()
            if dst_len == 0:
                break
            if dst_len > LZOP_MAX_BLOCK:
                raise source.error(
                    block,
                    expected=f"an lzop block of at most {LZOP_MAX_BLOCK} bytes",
                    found=f"{dst_len} bytes",
                )
            src_len = be32()
            if src_len > dst_len:
                raise source.error(
                    block + 4, expected=f"a compressed size of at most {dst_len}", found=f"{src_len}"
                )
            d_adler = be32() if flags & LZOP_F_ADLER32_D else None
            d_crc = be32() if flags & LZOP_F_CRC32_D else None
            c_adler = c_crc = None
            if src_len < dst_len:
                c_adler = be32() if flags & LZOP_F_ADLER32_C else None
                c_crc = be32() if flags & LZOP_F_CRC32_C else None
            payload_at = pos
            payload = take(src_len)
            if src_len == dst_len:
                out = payload  # lzop stores incompressible blocks as they are
            else:
                if (c_adler is not None and zlib.adler32(payload) != c_adler) or (
                    c_crc is not None and zlib.crc32(payload) != c_crc
                ):
                    raise _codec_error(source, "lzop", payload_at, "compressed block checksum mismatch")
                try:
                    out = LZOCompressor.decompress(payload, dst_len)
                except LZOError as e:
                    raise _codec_error(source, "lzop", payload_at, str(e)) from None
                if len(out) != dst_len:
                    raise _codec_error(
                        source, "lzop", payload_at, f"block decompressed to {len(out)} bytes, not {dst_len}"
                    )
            if (d_adler is not None and zlib.adler32(out) != d_adler) or (
                d_crc is not None and zlib.crc32(out) != d_crc
            ):
                raise _codec_error(source, "lzop", payload_at, "block checksum mismatch")
            yield out


def _lzop_sum(crc: int, data: bytes) -> int:
    return zlib.crc32(data) if crc else zlib.adler32(data)


def _bzip2_decompressor() -> _Decompressor:
    import bz2

    return bz2.BZ2Decompressor()


def _xz_decompressor() -> _Decompressor:
    import lzma

    return lzma.LZMADecompressor(lzma.FORMAT_XZ)


_STREAMS: dict[str, Callable[[Source, FileBytes], Iterator[bytes]]] = {
    "gzip": _gzip_stream,
    "bzip2": _stdlib_stream("bzip2", _bzip2_decompressor, BZIP2_MAGIC, allow_zero_padding=False),
    "xz": _stdlib_stream("xz", _xz_decompressor, XZ_MAGIC, allow_zero_padding=True),
    "zstd": _zstd_stream,
    "lzop": _lzop_stream,
}
