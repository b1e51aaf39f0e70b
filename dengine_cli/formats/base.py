"""What every dump reader gives: the present guest frames, their pages in batches, guest facts.

A reader turns one dump file into a :class:`Dump`.  Pages are addressed by guest frame number
(gfn = guest physical address >> 12).  A page the dump marks absent or excluded is *absent*: it
is not in :attr:`Dump.gfns` and is never returned as zeros.

Pages travel in :class:`PageBatch` es: a ``uint64`` array of gfns (ascending) and a
``(n, 4096) uint8`` array of their contents.  Where the file holds the pages contiguously and
uncompressed, ``pages`` is a view of the memory-mapped file (no copy).
"""

from __future__ import annotations

import contextlib
import dataclasses
import mmap
import os
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, Self

import numpy as np
import numpy.typing as npt

from dengine_cli.arrays import in_file
from dengine_cli.errors import FormatError, UnreadableFile
from dengine_cli.pages import BATCH_PAGES, PAGE_SIZE, GfnArray, OffsetArray, PageArray

#: Pages read at once by :meth:`Dump.scan` into its buffer (4 MiB: stays in the CPU cache).
SCAN_PAGES = 1024

#: A run of at least this many pages stored at a constant stride is returned as a view.
VIEW_MIN_PAGES = 64

#: In a page table, an offset that means "this page is all zeros and stored nowhere".
ZERO_PAGE = -1

#: In a page table, offsets ``SIDE_PAGE - k`` (k >= 0) name row k of the dump's side pages: pages
#: assembled in memory because the file holds them only in part (segments that start or end
#: inside a page; the missing bytes are zeros).
SIDE_PAGE = -2


class SidePages(Protocol):
    """Side pages by row: an in-memory ``(n, 4096)`` array, or an object that assembles them
    when asked (pages a flattened file splits across records)."""

    def __len__(self) -> int: ...

    def __getitem__(self, rows: OffsetArray, /) -> PageArray: ...


@dataclass(frozen=True)
class PageBatch:
    """Consecutive present pages of one dump, in ascending gfn order."""

    gfns: GfnArray
    pages: PageArray

    def __len__(self) -> int:
        return len(self.gfns)


@dataclass(frozen=True)
class Source:
    """Where a reader finds its format: a file, and the offset at which the format starts.

    ``name`` is what messages call the file: the user's path, with a note when the bytes read are
    the decompressed content of a compressed file.
    """

    path: Path
    name: str
    start: int = 0
    #: The file the user named, when ``path`` holds its decompressed content.
    origin: str | None = None

    @property
    def label(self) -> str:
        """What reports call the dump: the path the user gave."""
        return self.origin or self.name

    @classmethod
    def of(cls, path: Path | str) -> Source:
        return cls(Path(path), str(path), 0)

    def at(self, start: int) -> Source:
        """The same file, with the format starting further in."""
        return dataclasses.replace(self, start=start)

    def error(self, offset: int, *, expected: str, found: str) -> FormatError:
        return FormatError(self.name, offset, expected=expected, found=found)


@dataclass(frozen=True)
class OpenOptions:
    """How dumps are opened: a forced format, where temporary files go, what counts as RAM."""

    format: str | None = None
    tmp_dir: Path | None = None
    #: Keep pages of device memory that some dumps carry beside RAM (VGA VRAM, BIOS flash).
    device_memory: bool = False
    #: The most bytes a compressed container may decompress to (``None``: the default limit,
    #: :data:`dengine_cli.formats.container.DEFAULT_MAX_DECOMPRESSED`).
    max_decompressed: int | None = None
    #: Read a dump cut short (an xc_core whose header note claims more pages than the file
    #: holds) for the pages it has, saying so in its name, instead of refusing it.
    partial: bool = False


@dataclass
class GuestFacts:
    """What a dump's headers tell about the guest and the dump; ``None`` where it does not say."""

    format: str
    compression: str | None = None
    guest_name: str | None = None
    uuid: str | None = None
    memory_bytes: int | None = None
    machine: str | None = None
    vcpus: int | None = None
    arch: str | None = None
    guest_type: str | None = None
    xen_version: str | None = None
    hypervisor: str | None = None
    page_size: int = PAGE_SIZE
    #: Other header facts worth showing (e.g. kdump dump level, RAM block names).
    extra: dict[str, Any] = field(default_factory=dict)
    #: Things the reader left out, said in words (e.g. "device memory 0xfd000000-0xfe000000").
    skipped: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class Dump(ABC):
    """One guest-memory snapshot, read page by page in batches.

    Subclasses set :attr:`source`, :attr:`facts` and :attr:`gfns` (sorted, unique ``uint64``)
    and implement :meth:`_pages`.
    """

    source: Source
    facts: GuestFacts
    gfns: GfnArray
    #: What the dump file was when it was opened (device, inode, size, mtime, ctime); ``None``
    #: for a decompressed copy, which nobody else can change.
    _identity: tuple[int, ...] | None = None

    def _remember_file(self) -> None:
        """Note what the file is now, for :meth:`check_unchanged` (readers call it at open)."""
        self._identity = None
        if self.source.origin is not None:
            return  # a decompressed copy: private, and unlinked once mapped
        try:
            self._identity = _identity(os.stat(self.source.path))
        except OSError:
            self._identity = None

    def check_unchanged(self) -> None:
        """Raise :class:`UnreadableFile` ("changed while being read") when the mapped file has
        been written to or truncated since it was opened (same inode, other size or mtime).

        Called before every batch and random read.  A mapped file that shrank kills the process
        with SIGBUS when a page past its new end is touched, so a change must be seen before the
        mapping is; and a dump that changed half-way would give figures of no one dump.  A file
        replaced by another (renamed over) or removed is no change to what is mapped: the old
        inode stays as it was, and is read."""
        if self._identity is None:
            return
        try:
            now = _identity(os.stat(self.source.path))
        except OSError:
            return  # removed: the mapping keeps the inode
        if now[:2] != self._identity[:2]:
            return  # another file in its place
        if now[2:4] != self._identity[2:4]:
            was, size = self._identity[2], now[2]
            how = f"{was} bytes then, {size} now" if size != was else "modified, same size"
            raise UnreadableFile(self.source.name, f"it changed while being read ({how})")

    @abstractmethod
    def _pages(self, lo: int, hi: int) -> PageArray:
        """The pages of ``gfns[lo:hi]``, as a ``(hi - lo, 4096)`` array."""

    def _batch_end(self, lo: int, limit: int) -> int:
        """Where a batch starting at index ``lo`` should end (at most ``limit``); readers cut
        batches at boundaries where that lets them return a view instead of a copy."""
        return limit

    @property
    def name(self) -> str:
        """The path the user gave for this dump (errors use ``source.name``, which also says
        when the bytes read are a decompressed copy)."""
        return self.source.label

    @property
    def page_count(self) -> int:
        return len(self.gfns)

    def batches(
        self, max_pages: int = BATCH_PAGES, *, start: int = 0, stop: int | None = None
    ) -> Iterator[PageBatch]:
        """Every present page once, in ascending gfn order, at most ``max_pages`` per batch;
        ``start``/``stop`` limit it to the pages at those positions of :attr:`gfns`.  The file
        is checked unchanged (:meth:`check_unchanged`) before each batch and after the last, so
        a pass that runs to its end has read one state of the file.  A batch may be a view of the
        mapping: a caller that reads it after asking for the next checks again when done."""
        n = len(self.gfns) if stop is None else min(stop, len(self.gfns))
        lo = max(start, 0)
        while lo < n:
            hi = self._batch_end(lo, min(lo + max_pages, n))
            self.check_unchanged()
            yield PageBatch(self.gfns[lo:hi], self._pages(lo, hi))
            lo = hi
        # And once the last batch was looked at: a write while it was read is a change too.
        self.check_unchanged()

    def scan(
        self, max_pages: int = BATCH_PAGES, *, start: int = 0, stop: int | None = None
    ) -> Iterator[PageBatch]:
        """:meth:`batches` for one pass that looks at each batch once: the pages of a batch may
        be a buffer that the next batch overwrites (readers that can, read the file into it
        rather than map it: cheaper than a page fault and an unmap per page)."""
        return self.batches(max_pages, start=start, stop=stop)

    def _reopen(self) -> int | None:
        """A descriptor of the mapped file, opened again by path (``None`` for a decompressed
        copy); "changed while being read" when that is not the same file any more."""
        if self._identity is None:
            return None
        self.check_unchanged()
        try:
            fd = os.open(self.source.path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        except OSError:
            return None  # removed: read the mapping, which keeps the inode
        try:
            if _identity(os.fstat(fd))[:4] == self._identity[:4]:
                return fd
        except OSError:
            pass
        os.close(fd)
        self.check_unchanged()
        return None  # another file in its place: read the mapping of the one opened

    def index_of(self, gfn: int) -> int:
        """Position of ``gfn`` in :attr:`gfns`; ``KeyError`` when the page is absent."""
        i = int(np.searchsorted(self.gfns, np.uint64(gfn)))
        if i >= len(self.gfns) or int(self.gfns[i]) != gfn:
            raise KeyError(gfn)
        return i

    def read_page(self, gfn: int) -> PageArray:
        """The 4096 bytes of one present page; ``KeyError`` when it is absent."""
        i = self.index_of(gfn)
        self.check_unchanged()
        page: PageArray = self._pages(i, i + 1)[0]
        return page

    def pages_at(self, gfns: GfnArray) -> PageArray:
        """The pages of the present ``gfns`` (any order), as a ``(len(gfns), 4096)`` copy;
        ``KeyError`` names the first absent one.  Sorted gfns read fastest."""
        idx = np.searchsorted(self.gfns, gfns).astype(np.int64)
        found = idx < len(self.gfns)
        found[found] = self.gfns[idx[found]] == gfns[found]
        if not found.all():
            raise KeyError(int(gfns[int(np.argmin(found))]))
        self.check_unchanged()
        return self._pages_at(idx)

    def _pages_at(self, idx: OffsetArray) -> PageArray:
        """The pages at positions ``idx`` of :attr:`gfns`; readers with random access override
        this, the generic way reads each run of consecutive positions with :meth:`_pages`."""
        out = np.empty((len(idx), PAGE_SIZE), dtype=np.uint8)
        if len(idx) == 0:
            return out
        breaks = np.flatnonzero(np.diff(idx) != 1) + 1
        starts = np.concatenate(([0], breaks)).tolist()
        ends = np.concatenate((breaks, [len(idx)])).tolist()
        for s, e in zip(starts, ends, strict=True):
            lo = int(idx[s])
            out[s:e] = self._pages(lo, lo + (e - s))
        return out

    def mapped_pages(self) -> tuple[npt.NDArray[np.uint8], OffsetArray] | None:
        """For dumps whose pages lie uncompressed in one mapping: the mapping (bytes) and the
        byte offset of each present page in it (negative: not stored there).  Lets callers
        compare pages in place without copying them out first; ``None`` for other dumps."""
        return None

    def ranges(self) -> list[tuple[int, int]]:
        """Runs of consecutive present gfns as ``(first_gfn, page_count)``."""
        return gfn_runs(self.gfns)

    #: The per-page arrays a reader keeps (attribute names): its page table, which
    #: :meth:`map_page_table` can move out of the process's memory.
    PAGE_ARRAYS: tuple[str, ...] = ("gfns",)

    @property
    def page_table_bytes(self) -> int:
        """Bytes of the per-page arrays (:attr:`PAGE_ARRAYS`) held now."""
        return sum(int(getattr(self, name).nbytes) for name in self.PAGE_ARRAYS)

    def map_page_table(self, directory: Path) -> None:
        """Move the page table (:attr:`PAGE_ARRAYS`) into a file under ``directory``, mapped
        read-only in its place: page cache, which the kernel writes back and drops under
        pressure, instead of this process's memory.  The file is unlinked from the start
        (``O_TMPFILE``), so it goes with the mapping, whatever ends the process.  A reader opened
        over every dump of a fleet holds 16-21 bytes a page (gfn, offset and what its format
        needs); the session moves them past a quarter of the memory limit."""
        names = self.PAGE_ARRAYS
        for name, mapped in zip(names, in_file([getattr(self, n) for n in names], directory), strict=True):
            setattr(self, name, mapped)

    def close(self) -> None:  # noqa: B027 - optional hook, most readers hold only a mapping
        """Release the file mapping (readers with more to release extend this)."""

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def gfn_runs(gfns: GfnArray) -> list[tuple[int, int]]:
    """Runs of consecutive values in a sorted gfn array, as ``(first, count)``."""
    if len(gfns) == 0:
        return []
    breaks = np.flatnonzero(np.diff(gfns.astype(np.int64)) != 1) + 1
    starts = np.concatenate(([0], breaks))
    ends = np.concatenate((breaks, [len(gfns)]))
    return [(int(gfns[s]), int(e - s)) for s, e in zip(starts, ends, strict=True)]


def map_file(source: Source) -> npt.NDArray[np.uint8]:
    """The whole file as a read-only ``uint8`` array backed by mmap (empty files give ``[]``)."""
    try:
        with open(source.path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size == 0:
                return np.zeros(0, dtype=np.uint8)
            mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    except OSError as e:
        raise UnreadableFile(source.name, e.strerror or str(e)) from e
    with contextlib.suppress(AttributeError, OSError):
        mm.madvise(mmap.MADV_SEQUENTIAL)
    return np.frombuffer(mm, dtype=np.uint8)


def read_exactly(source: Source, offset: int, length: int) -> bytes:
    """``length`` bytes at absolute ``offset`` of the file, read with pread (not through its
    mapping: a file cut meanwhile is "changed while being read", not SIGBUS).  For the tables
    readers parse at open that lie far into the file."""
    try:
        with open(source.path, "rb", buffering=0) as f:
            data = os.pread(f.fileno(), length, offset)
    except OSError as e:
        raise UnreadableFile(source.name, e.strerror or str(e)) from e
    if len(data) != length:
        raise UnreadableFile(
            source.name,
            f"it changed while being read: it ends at {offset + len(data):#x}, "
            f"where {length} bytes at {offset:#x} were expected",
        )
    return data


def read_head(path: Path, name: str, size: int = 1 << 16, start: int = 0) -> bytes:
    """The first ``size`` bytes from ``start``: what probes look at."""
    try:
        with open(path, "rb") as f:
            f.seek(start)
            return f.read(size)
    except OSError as e:
        raise UnreadableFile(name, e.strerror or str(e)) from e


def require(source: Source, buf: npt.NDArray[np.uint8], offset: int, length: int, what: str) -> None:
    """Raise a FormatError unless ``length`` bytes of ``what`` fit at ``offset`` of the file."""
    if offset < 0 or length < 0 or offset + length > len(buf):
        raise source.error(
            offset,
            expected=f"{what} ({length} bytes)",
            found=f"end of file at {len(buf):#x}" if offset >= 0 else "a negative offset",
        )


def gather_pages(buf: npt.NDArray[np.uint8], offsets: OffsetArray) -> PageArray:
    """Copy the 4096-byte pages at arbitrary (even unaligned) byte ``offsets`` of ``buf``;
    offsets equal to :data:`ZERO_PAGE` give zero pages."""
    stored = offsets != ZERO_PAGE
    if not stored.any():
        return np.zeros((len(offsets), PAGE_SIZE), dtype=np.uint8)
    if len(buf) < PAGE_SIZE:
        raise ValueError("page offset beyond the buffer")
    # Every 4096-byte window of buf, as rows; fancy indexing copies the chosen rows in C.
    windows = np.lib.stride_tricks.as_strided(
        buf, shape=(len(buf) - PAGE_SIZE + 1, PAGE_SIZE), strides=(1, 1), writeable=False
    )
    n_stored = int(stored.sum())
    # Fancy indexing, not np.take: np.take first copies its (overlapping, file-sized x 4096)
    # strided input into a contiguous array, which takes seconds per megabyte of file.
    if n_stored == len(offsets):
        return windows[offsets]
    if n_stored * 2 > len(offsets):
        # Mostly stored: copy every row once (zero pages from any stored page), then clear.
        out = windows[np.where(stored, offsets, offsets[stored][0])]
        out[~stored] = 0
        return out
    out = np.zeros((len(offsets), PAGE_SIZE), dtype=np.uint8)
    out[stored] = windows[offsets[stored]]
    return out


class PageTableDump(Dump):
    """A dump whose pages are stored uncompressed in one file: gfn -> file offset.

    Raw images, ELF cores, xc_core, LiME, uncompressed QEMU streams and mapped-ram all reduce to
    this: a sorted gfn array and a parallel array of byte offsets (:data:`ZERO_PAGE` for zero pages
    stored nowhere).  Runs of pages stored back to back come out as views of the mapping.
    """

    PAGE_ARRAYS = ("gfns", "offsets")

    def __init__(
        self,
        source: Source,
        facts: GuestFacts,
        buf: npt.NDArray[np.uint8],
        gfns: GfnArray,
        offsets: OffsetArray,
        side_pages: SidePages | None = None,
        *,
        file_offset: int = 0,
    ) -> None:
        """``buf`` is the mapped file from byte ``file_offset`` on; ``offsets`` index ``buf``."""
        if len(gfns) > 1 and not np.all(gfns[1:] > gfns[:-1]):
            # Readers mostly list pages in order already; sort only when not.
            order = np.argsort(gfns, kind="stable")
            gfns, offsets = gfns[order], offsets[order]
            if not np.all(gfns[1:] > gfns[:-1]):
                raise ValueError("duplicate gfns in a page table")
        stored = offsets[offsets >= 0]
        if len(stored) and int(stored.max()) + PAGE_SIZE > len(buf):
            raise ValueError("page offset beyond the file")
        side = offsets[offsets <= SIDE_PAGE]
        if side_pages is None:
            side_pages = np.zeros((0, PAGE_SIZE), dtype=np.uint8)
        if len(side) and SIDE_PAGE - int(side.min()) >= len(side_pages):
            raise ValueError("side page beyond the side pages")
        self.source = source
        self.facts = facts
        self.gfns = gfns.astype(np.uint64, copy=False)
        self.offsets = offsets.astype(np.int64, copy=False)
        self._buf = buf
        self._side_pages = side_pages
        self._file_offset = file_offset
        # What the mapped file is: scan() reads it again by path only if it is the same, and
        # every read first checks it has not changed (a shrunk mapping is SIGBUS).
        self._remember_file()
        # Runs of stored pages at a constant stride (4096 back to back; 4104 in a QEMU stream,
        # where each page follows its 8-byte header) can be returned as views of the mapping.
        # A run breaks where a page is not stored, or the stride changes (which may cut a run
        # one page short of what it could be: that only costs a copy).
        offs = self.offsets
        d = np.diff(offs)
        cut = (offs[1:] < 0) | (offs[:-1] < 0) | (d < PAGE_SIZE)
        cut[1:] |= d[1:] != d[:-1]
        first = [0] if len(offs) else []
        self._set_runs(np.concatenate((first, np.flatnonzero(cut) + 1)).astype(np.int64))

    def _set_runs(self, starts: OffsetArray) -> None:
        """The runs of pages at a constant stride begin at positions ``starts``."""
        self._run_starts = starts
        run_ends = np.concatenate((starts[1:], [len(self.offsets)]))
        long_run = (run_ends - starts >= VIEW_MIN_PAGES) & (self.offsets[starts] >= 0)
        self._long_starts = starts[long_run]

    @classmethod
    def flat(
        cls, source: Source, facts: GuestFacts, buf: npt.NDArray[np.uint8], *, file_offset: int = 0
    ) -> PageTableDump:
        """A dump whose every page lies at its physical address in ``buf`` (a raw image: gfn k
        at byte ``k * 4096``), made without the general constructor's checks of an arbitrary
        page table, which this layout passes by construction (they were most of the 1 ms it
        took to open a 256 MiB raw image, ten passes over its page table)."""
        n = len(buf) // PAGE_SIZE
        dump = cls.__new__(cls)
        dump.source = source
        dump.facts = facts
        dump.gfns = np.arange(n, dtype=np.uint64)
        dump.offsets = np.arange(0, n * PAGE_SIZE, PAGE_SIZE, dtype=np.int64)
        dump._buf = buf[: n * PAGE_SIZE]
        dump._side_pages = np.zeros((0, PAGE_SIZE), dtype=np.uint8)
        dump._file_offset = file_offset
        dump._remember_file()
        dump._set_runs(np.zeros(1 if n else 0, dtype=np.int64))
        return dump

    def _run_end(self, lo: int) -> int:
        k = int(np.searchsorted(self._run_starts, lo, side="right"))
        return int(self._run_starts[k]) if k < len(self._run_starts) else len(self.gfns)

    def _batch_end(self, lo: int, limit: int) -> int:
        run_end = self._run_end(lo)
        if self.offsets[lo] >= 0 and run_end - lo >= VIEW_MIN_PAGES:
            return min(run_end, limit)
        # Short runs and zero pages are gathered into one copied batch, up to the next long run.
        k = int(np.searchsorted(self._long_starts, lo, side="right"))
        next_long = int(self._long_starts[k]) if k < len(self._long_starts) else len(self.gfns)
        return max(lo + 1, min(next_long, limit))

    def _pages(self, lo: int, hi: int) -> PageArray:
        first = int(self.offsets[lo])
        n = hi - lo
        if first >= 0 and n >= 1 and self._run_end(lo) >= hi:
            stride = int(self.offsets[lo + 1] - first) if n > 1 else PAGE_SIZE
            if stride == PAGE_SIZE:
                return self._buf[first : first + n * PAGE_SIZE].reshape(n, PAGE_SIZE)
            view: PageArray = np.lib.stride_tricks.as_strided(
                self._buf[first:], shape=(n, PAGE_SIZE), strides=(stride, 1), writeable=False
            )
            return view
        return self._gather(self.offsets[lo:hi])

    def _pages_at(self, idx: OffsetArray) -> PageArray:
        return self._gather(self.offsets[idx])

    def scan(
        self, max_pages: int = BATCH_PAGES, *, start: int = 0, stop: int | None = None
    ) -> Iterator[PageBatch]:
        """Runs of pages stored back to back are read from the file with ``pread`` into one
        reused buffer of :data:`SCAN_PAGES` pages; the rest come from the mapping as in
        :meth:`batches`, after the file was checked unchanged (:meth:`check_unchanged`).

        Reading costs a copy that stays in the CPU cache, where each page touched in the
        mapping costs a page fault, a read from memory and, later, an unmap: the read pass
        over a dump in the page cache is about 20% faster.  And a file that shrinks meanwhile
        gives a short read, an error, where the mapping would give SIGBUS.  The file is opened
        again by path for this, and used only if it is still the file that was mapped (same
        device, inode, size and mtime; the same inode changed is "changed while being read"); a
        decompressed copy, already unlinked, or a file replaced or removed since, is read from
        the mapping (which keeps the inode that was opened)."""
        n = len(self.gfns) if stop is None else min(stop, len(self.gfns))
        lo = max(start, 0)
        fd = self._reopen()
        if fd is None:
            yield from self.batches(max_pages, start=start, stop=stop)
            return
        chunk = max(1, min(max_pages, SCAN_PAGES))
        buffer = aligned_pages(chunk)
        try:
            while lo < n:
                hi = self._batch_end(lo, min(lo + max_pages, n))
                self.check_unchanged()
                if not self._contiguous(lo, hi):
                    # Short or strided runs (QEMU streams) from the mapping, just checked:
                    # a pread of each measured 1.5-2x slower here for a stream.
                    yield PageBatch(self.gfns[lo:hi], self._pages(lo, hi))
                    lo = hi
                    continue
                first = self._file_offset + int(self.offsets[lo])
                for at in range(lo, hi, chunk):
                    k = min(chunk, hi - at)
                    into = buffer[:k]
                    self._pread(fd, into.reshape(-1), first + (at - lo) * PAGE_SIZE)
                    yield PageBatch(self.gfns[at : at + k], into)
                lo = hi
            self.check_unchanged()  # a write while the last batch was read
        finally:
            os.close(fd)

    def _pread(self, fd: int, into: npt.NDArray[np.uint8], offset: int) -> None:
        """Fill ``into`` from ``offset`` of the file; a short read means the file shrank."""
        got = os.preadv(fd, [into.data], offset)
        if got != len(into):
            raise UnreadableFile(
                self.source.name,
                f"it changed while being read: it ends at {offset + got:#x}, "
                f"where {len(into)} bytes at {offset:#x} were expected",
            )

    def _contiguous(self, lo: int, hi: int) -> bool:
        """Whether pages ``lo:hi`` are stored back to back (one run, stride 4096)."""
        first = int(self.offsets[lo])
        if first < 0 or self._run_end(lo) < hi:
            return False
        return hi - lo == 1 or int(self.offsets[lo + 1]) - first == PAGE_SIZE

    def mapped_pages(self) -> tuple[npt.NDArray[np.uint8], OffsetArray] | None:
        if len(self._buf) < PAGE_SIZE:
            return None
        self.check_unchanged()
        return self._buf, self.offsets

    def _gather(self, offsets: OffsetArray) -> PageArray:
        side = offsets <= SIDE_PAGE
        if not side.any():
            return gather_pages(self._buf, offsets)
        out = gather_pages(self._buf, np.where(side, ZERO_PAGE, offsets))
        out[side] = self._side_pages[SIDE_PAGE - offsets[side]]
        return out

    def close(self) -> None:
        self._buf = np.zeros(0, dtype=np.uint8)


def aligned_pages(n: int) -> PageArray:
    """An uninitialized ``(n, 4096)`` page array that starts on a page boundary.

    What numpy allocates is 16-byte aligned; reading a file into a buffer whose start is not
    cache-line aligned measured 3x slower here (the kernel's copy to user space), 0.21 s against
    0.07 s for 400 MiB from page cache."""
    raw = np.empty((n + 1) * PAGE_SIZE, dtype=np.uint8)
    skip = -raw.ctypes.data % PAGE_SIZE
    return raw[skip : skip + n * PAGE_SIZE].reshape(n, PAGE_SIZE)


def _identity(st: os.stat_result) -> tuple[int, ...]:
    """Device, inode, size, mtime (what a write or truncation changes), ctime."""
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def extent_page_table(
    buf: npt.NDArray[np.uint8] | None,
    addrs: list[int],
    lengths: list[int],
    file_offsets: list[int],
    *,
    read: Callable[[int, int, str], bytes] | None = None,
) -> tuple[GfnArray, OffsetArray, PageArray]:
    """The page table of byte extents of guest physical memory stored in ``buf``.

    Extent i holds guest bytes ``[addrs[i], addrs[i] + lengths[i])`` at ``file_offsets[i]`` of
    ``buf`` (:data:`ZERO_PAGE`: the extent is zeros stored nowhere).  Extents must not overlap.
    Pages an extent covers whole point into the file (or are :data:`ZERO_PAGE`); pages extents
    cover only in part are assembled as side pages whose uncovered bytes are zero.  Returns
    ``(gfns, offsets, side_pages)`` for :class:`PageTableDump` (gfns not yet sorted).
    ``read(offset, length, what)``, when given, reads the bytes of side pages instead of ``buf``.
    """
    gfn_parts: list[GfnArray] = []
    offset_parts: list[OffsetArray] = []
    pieces: dict[int, list[tuple[int, int, int]]] = {}
    for addr, length, offset in zip(addrs, lengths, file_offsets, strict=True):
        if length <= 0:
            continue
        end = addr + length
        first_full = -(-addr // PAGE_SIZE)
        end_full = end // PAGE_SIZE
        if first_full < end_full:
            gfns = np.arange(first_full, end_full, dtype=np.int64)
            if offset == ZERO_PAGE:
                offs = np.full(len(gfns), ZERO_PAGE, dtype=np.int64)
            else:
                # From the extent's first whole page: an address past 2**63 fits no int64.
                offs = (offset + first_full * PAGE_SIZE - addr) + (gfns - first_full) * PAGE_SIZE
            gfn_parts.append(gfns.astype(np.uint64))
            offset_parts.append(offs)
        # The pages at either end that the extent covers only in part.
        for gfn in {addr // PAGE_SIZE, (end - 1) // PAGE_SIZE}:
            if first_full <= gfn < end_full:
                continue
            lo = max(addr, gfn * PAGE_SIZE)
            hi = min(end, (gfn + 1) * PAGE_SIZE)
            src = ZERO_PAGE if offset == ZERO_PAGE else offset + (lo - addr)
            pieces.setdefault(gfn, []).append((lo - gfn * PAGE_SIZE, hi - lo, src))
    side_pages = np.zeros((len(pieces), PAGE_SIZE), dtype=np.uint8)
    side_gfns = np.array(sorted(pieces), dtype=np.uint64)
    for k, gfn in enumerate(side_gfns.tolist()):
        for at, length, src in pieces[gfn]:
            if src == ZERO_PAGE:
                continue
            if read is not None:
                side_pages[k, at : at + length] = np.frombuffer(read(src, length, "segment data"), np.uint8)
            elif buf is not None:
                side_pages[k, at : at + length] = buf[src : src + length]
    gfn_parts.append(side_gfns)
    offset_parts.append(SIDE_PAGE - np.arange(len(side_gfns), dtype=np.int64))
    return np.concatenate(gfn_parts), np.concatenate(offset_parts), side_pages
