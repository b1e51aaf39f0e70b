"""Pack files: page data appended by one apply, then read at the offsets the catalog gives."""

from __future__ import annotations

import contextlib
import mmap
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
import xxhash

from dengine_cli.errors import OutputError
from dengine_cli.store.layout import PACK_HEADER, PACK_LIMIT, PACK_MAGIC, PACK_SUFFIX, PACK_VERSION


@dataclass(frozen=True)
class WrittenPack:
    """A pack as its writer closed it: the file name (under ``packs/``), size and xxh3-128."""

    file: str
    size: int
    checksum: str


class PackWriter:
    """Appends blobs to ``folder/RUN-NNNNNN.pack`` files, a new one past ``limit`` bytes; each
    closed pack is fsync'ed.  Files it creates are listed in :attr:`files` as soon as they
    exist (for the caller to remove on failure)."""

    def __init__(self, folder: Path, run: bytes, limit: int = PACK_LIMIT) -> None:
        self.folder = folder
        self.run = run
        self.limit = limit
        self.written: list[WrittenPack] = []
        self.files: list[Path] = []
        self._fd: int | None = None
        self._size = 0
        self._hasher = xxhash.xxh3_128()

    @property
    def pack(self) -> int:
        """The number of the pack being written (the next blob's pack)."""
        return len(self.written)

    def _open(self) -> None:
        name = f"{self.run.hex()}-{len(self.written):06d}{PACK_SUFFIX}"
        path = self.folder / name
        try:
            self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        except OSError as e:
            raise OutputError(path, e.strerror or str(e)) from e
        self.files.append(path)
        self._size = 0
        self._hasher = xxhash.xxh3_128()
        self._write(PACK_HEADER.pack(PACK_MAGIC, PACK_VERSION, 0, self.run))

    def _write(self, data: bytes | memoryview) -> None:
        assert self._fd is not None
        view = memoryview(data)
        try:
            while view.nbytes:
                n = os.write(self._fd, view)
                view = view[n:]
        except OSError as e:
            raise OutputError(self.files[-1], e.strerror or str(e)) from e
        self._hasher.update(data)
        self._size += len(data)

    def append(self, data: bytes) -> tuple[int, int]:
        """Write ``data`` (one or more blobs back to back, never split between packs); returns
        the pack number and the offset it starts at."""
        if self._fd is not None and self._size + len(data) > self.limit and self._size > PACK_HEADER.size:
            self._close_current()
        if self._fd is None:
            self._open()
        at = self._size
        self._write(data)
        return len(self.written), at

    def _close_current(self) -> None:
        assert self._fd is not None
        try:
            os.fsync(self._fd)
        except OSError as e:
            raise OutputError(self.files[-1], e.strerror or str(e)) from e
        finally:
            os.close(self._fd)
            self._fd = None
        self.written.append(WrittenPack(self.files[-1].name, self._size, self._hasher.hexdigest()))

    def close(self) -> list[WrittenPack]:
        """Close (and fsync) the last pack; every pack written, in order."""
        if self._fd is not None:
            self._close_current()
        return self.written

    def abandon(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = None


class PackReader:
    """The packs of a store, mapped read-only (opened at once, so that an apply replacing the
    store later cannot take them away).  A pack that is missing or unreadable is recorded in
    :attr:`missing` (reason) and maps to nothing."""

    def __init__(self, folder: Path, files: list[str]) -> None:
        self.maps: list[npt.NDArray[np.uint8]] = []
        self.missing: dict[int, str] = {}
        for k, name in enumerate(files):
            try:
                with open(folder / name, "rb") as f:
                    size = os.fstat(f.fileno()).st_size
                    if size:
                        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
                        self.maps.append(np.frombuffer(mm, dtype=np.uint8))
                    else:
                        self.maps.append(np.zeros(0, dtype=np.uint8))
            except OSError as e:
                self.missing[k] = e.strerror or str(e)
                self.maps.append(np.zeros(0, dtype=np.uint8))

    def size(self, pack: int) -> int:
        return len(self.maps[pack])

    def bytes_at(self, pack: int, offset: int, length: int) -> bytes:
        """``length`` bytes at ``offset`` of ``pack`` (the caller checked they are inside)."""
        return self.maps[pack][offset : offset + length].tobytes()

    def header_ok(self, pack: int, run: bytes | None = None) -> bool:
        m = self.maps[pack]
        if len(m) < PACK_HEADER.size:
            return False
        magic, version, _, pack_run = PACK_HEADER.unpack(m[: PACK_HEADER.size].tobytes())
        return bool(magic == PACK_MAGIC and version == PACK_VERSION and (run is None or pack_run == run))
