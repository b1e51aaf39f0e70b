"""Small array helpers shared by several modules."""

from __future__ import annotations

import mmap
import os
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

#: Arrays in one file start at multiples of this (a cache line).
_ALIGN = 64

#: The largest file small arrays of an :class:`ArrayHome` share (see :meth:`ArrayHome.full`).
SEGMENT_BYTES = 64 << 20


def unique(values: npt.NDArray[Any]) -> npt.NDArray[Any]:
    """The sorted distinct values of a 1-d array: ``np.unique(values)``, without the import of
    ``numpy.ma`` that ``np.unique``'s first plain call makes (26 ms, a few percent of a sampled
    plan)."""
    flat = np.sort(values, axis=None)
    if len(flat) < 2:
        return flat
    keep = np.empty(len(flat), dtype=np.bool_)
    keep[0] = True
    np.not_equal(flat[1:], flat[:-1], out=keep[1:])
    return flat[keep]


def pieces(n: int, step: int | None) -> list[tuple[int, int]]:
    """``[lo, hi)`` pieces of ``0:n`` of at most ``step`` items each (one piece when ``step`` is
    ``None`` or not less than ``n``)."""
    if step is None or n <= step:
        return [(0, n)]
    return [(lo, min(lo + step, n)) for lo in range(0, n, step)]


def consecutive_groups(sizes: Sequence[int], limit: int | None) -> list[list[int]]:
    """The positions of ``sizes`` cut into runs whose sizes add up to at most ``limit`` (an item
    larger than that is a run of its own; one run when ``limit`` is ``None``)."""
    if limit is None:
        return [list(range(len(sizes)))] if len(sizes) else []
    groups: list[list[int]] = []
    total = 0
    for i, n in enumerate(sizes):
        if not groups or total + n > limit:
            groups.append([])
            total = 0
        groups[-1].append(i)
        total += n
    return groups


def in_file(
    arrays: Sequence[npt.NDArray[Any]], directory: Path, *, writable: bool = False
) -> list[npt.NDArray[Any]]:
    """The ``arrays`` copied into one file under ``directory`` and given back mapped from it, of
    the same shapes and dtypes: page cache, which the kernel writes back and drops under
    pressure, instead of this process's anonymous memory.  The file is unlinked from the start
    (``O_TMPFILE`` where Linux has it), so it goes with the last mapped array, whatever ends the
    process.  ``writable``: the mapping is shared and writable (what is written goes to the
    file), else read-only.  ``OSError`` when the file cannot be written."""
    flat = [np.ascontiguousarray(a) for a in arrays]
    starts, total = [], 0
    for a in flat:
        starts.append(total)
        total += -(-a.nbytes // _ALIGN) * _ALIGN
    if total == 0:
        return [a.copy() for a in flat]
    import tempfile

    with tempfile.TemporaryFile(dir=directory) as f:
        for a, at in zip(flat, starts, strict=True):
            f.seek(at)
            a.tofile(f)
        f.truncate(total)
        f.flush()
        access = mmap.ACCESS_WRITE if writable else mmap.ACCESS_READ
        mapping = mmap.mmap(f.fileno(), total, access=access)
    return [
        np.frombuffer(mapping, dtype=a.dtype, count=a.size, offset=at).reshape(a.shape)
        for a, at in zip(flat, starts, strict=True)
    ]


class ArrayHome:
    """Where a command keeps its large per-page arrays: this process's memory, or, given a
    ``directory``, files there mapped in their place (:func:`in_file`), so that anonymous memory
    stays bounded whatever the number of pages.  The arrays are the same either way."""

    def __init__(
        self,
        directory: Path | None = None,
        error: Callable[[OSError], Exception] | None = None,
        *,
        work_bytes: int | None = None,
        least_step: int = 1 << 12,
    ) -> None:
        """``error``: what to raise for an ``OSError`` of the files (default: itself).
        ``work_bytes``: the most the temporary arrays of one step of a computation may take
        (``None``: no bound, each step works on all its items at once), and ``least_step`` the
        fewest items a step takes whatever that bound; see :meth:`step`."""
        self.directory = directory
        self.error = error
        self.work_bytes = work_bytes
        self.least_step = least_step
        self._segment: mmap.mmap | None = None
        self._used = 0
        self._lock = threading.Lock()

    def __reduce__(self) -> tuple[Any, ...]:
        # The error callback is a closure of the command line's: a copy sent to a worker
        # raises OSError itself.
        return (_home, (self.directory, self.work_bytes, self.least_step))

    def step(self, bytes_per_item: int) -> int | None:
        """Items a step may take at ``bytes_per_item`` of temporaries each (at least
        ``least_step``); ``None`` when there is no bound."""
        if self.work_bytes is None:
            return None
        return max(self.least_step, self.work_bytes // max(1, bytes_per_item))

    @property
    def in_files(self) -> bool:
        return self.directory is not None

    def hold(self, array: npt.NDArray[Any], *, writable: bool = False) -> npt.NDArray[Any]:
        """``array`` where this home keeps arrays (itself, in memory); in a file, read-only
        unless ``writable``."""
        if self.directory is None:
            return array
        held = self.full(array.shape, 0, array.dtype)
        held[...] = array
        if not writable:
            held.flags.writeable = False
        return held

    def full(self, n: int | tuple[int, ...], value: Any, dtype: Any) -> npt.NDArray[Any]:
        """A writable array of shape ``n`` filled with ``value``, made in a file, never whole in
        memory.  Arrays smaller than a quarter of :data:`SEGMENT_BYTES` share files (segments
        of 1 MiB growing to that size), so that a fleet of thousands of VMs does not map
        thousands of files (Linux allows a process 65,530 mappings by default); a segment's
        blocks are allocated when it is made, so that no store into a mapping can find the disk
        full (SIGBUS): a full disk is an error here."""
        shape = (n,) if isinstance(n, int) else tuple(n)
        count = int(np.prod(shape, dtype=np.int64))
        if self.directory is None or count == 0:
            return np.full(shape, value, dtype=dtype)
        nbytes = count * np.dtype(dtype).itemsize
        try:
            if nbytes >= SEGMENT_BYTES // 4:
                mapping, at = self._mapped(nbytes), 0
            else:
                mapping, at = self._carve(nbytes)
        except OSError as e:
            raise (self.error(e) if self.error is not None else e) from e
        a = np.frombuffer(mapping, dtype=dtype, count=count, offset=at).reshape(shape)
        if value != 0:
            a.fill(value)
        return a

    def _carve(self, nbytes: int) -> tuple[mmap.mmap, int]:
        """``nbytes`` of the current segment (a new one when it is full): its mapping, offset."""
        with self._lock:
            at = -(-self._used // _ALIGN) * _ALIGN
            if self._segment is None or at + nbytes > len(self._segment):
                size = min(SEGMENT_BYTES, 2 * len(self._segment)) if self._segment is not None else 1 << 20
                self._segment, at = self._mapped(max(size, nbytes)), 0
            self._used = at + nbytes
            return self._segment, at

    def _mapped(self, nbytes: int) -> mmap.mmap:
        """A new unlinked file of ``nbytes`` allocated blocks under the directory, mapped."""
        import tempfile

        with tempfile.TemporaryFile(dir=self.directory) as f:
            os.posix_fallocate(f.fileno(), 0, nbytes)
            return mmap.mmap(f.fileno(), nbytes, access=mmap.ACCESS_WRITE)


def _home(directory: Path | None, work_bytes: int | None, least_step: int) -> ArrayHome:
    return ArrayHome(directory, work_bytes=work_bytes, least_step=least_step)
