"""The framing every dengine cache file shares (page indexes, sharing results).

Little-endian::

    0   8s   magic
    8   u32  format version
    12  u32  header length H
    16  H    header: UTF-8 JSON (among others the cache key the file was made for)
    ... zero padding to a multiple of 64
    D   arrays, one after the other (D = 16 + H rounded up to 64, so that they map aligned)

A file is named by the xxh3-128 of its key (a name, not a security check: the key itself is
stored and compared on load; hashlib's import would cost 12 ms of every command), after the
xxh3-64 of its group where it has one (an index: its dump's real path).  It is
written to a temporary name in its directory and renamed, so a reader never sees half a file;
not fsync'ed, as a file torn by a crash fails its owner's size and checksum checks and is made
again.  Anything unreadable is a cache miss, never an error.
"""

from __future__ import annotations

import contextlib
import json
import os
import stat
import struct
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import xxhash

PREFIX = struct.Struct("<8sII")
#: Arrays start at a multiple of this.
ALIGN = 64
#: A header longer than this (or than the file) is not ours.  Headers grow with the VMs a sharing
#: result names (their index keys and figures, about 400 bytes a VM).
HEADER_MAX = 64 << 20


def name_for(key: dict[str, Any], folder: Path | str, suffix: str, group: str | None = None) -> Path:
    """The file a cache entry for ``key`` has in ``folder``: named ``<group>-<key>`` when the entry
    belongs to a ``group`` (:func:`group_prefix`), so that the entries of a group are found by
    name, without reading every header."""
    name = xxhash.xxh3_128_hexdigest(json.dumps(key, sort_keys=True).encode()) + suffix
    return Path(folder) / (name if group is None else group_prefix(group) + name)


def group_prefix(group: str) -> str:
    """What the names of a group's entries start with (an xxh3-64 of the group, and a dash)."""
    return xxhash.xxh3_64_hexdigest(group.encode("utf-8", "surrogateescape")) + "-"


def data_offset(header_len: int) -> int:
    """Where the arrays start after a header of ``header_len`` bytes."""
    return -(-(PREFIX.size + header_len) // ALIGN) * ALIGN


def read_header(file: Path, magic: bytes, version: int) -> tuple[dict[str, Any], int, int] | None:
    """``(header, data offset, file size)`` of a cache file of this magic and version; ``None``
    for a missing, short or foreign file, one of another version, or no regular file (opened
    without blocking: a FIFO by a cache file's name made open() wait for ever)."""
    try:
        fd = os.open(file, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        with os.fdopen(fd, "rb") as f:
            st = os.fstat(f.fileno())
            if not stat.S_ISREG(st.st_mode):
                return None
            size = st.st_size
            prefix = f.read(PREFIX.size)
            if len(prefix) != PREFIX.size:
                return None
            found, found_version, header_len = PREFIX.unpack(prefix)
            if found != magic or found_version != version or header_len > min(HEADER_MAX, size - PREFIX.size):
                return None
            header = json.loads(f.read(header_len))
    except (OSError, ValueError):  # json errors are ValueErrors
        return None
    if not isinstance(header, dict):
        return None
    return header, data_offset(header_len), size


def write(
    file: Path, magic: bytes, version: int, header: dict[str, Any], arrays: Sequence[npt.NDArray[Any]]
) -> bool:
    """Write a cache file atomically; ``False`` when that is not possible (a read-only or full
    cache directory is not an error: the cache is an optimization)."""
    raw = json.dumps(header, sort_keys=True, default=str).encode()
    tmp: str | None = None
    try:
        import tempfile

        file.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=file.suffix, dir=file.parent)
        with os.fdopen(fd, "wb") as f:
            f.write(PREFIX.pack(magic, version, len(raw)))
            f.write(raw)
            f.write(bytes(data_offset(len(raw)) - PREFIX.size - len(raw)))
            for array in arrays:
                f.write(np.ascontiguousarray(array).data.cast("B"))
        # No fsync: the rename makes the file appear whole or not at all (fsync cost 40 ms a
        # file here, a sixth of a whole `dengine analyze` of 1.5 GiB).
        os.replace(tmp, file)
        tmp = None
        return True
    except OSError:
        return False
    finally:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)


def checksum(arrays: Sequence[npt.NDArray[Any]]) -> str:
    """xxh3-64 of the arrays' bytes, one after the other."""
    h = xxhash.xxh3_64()
    for array in arrays:
        h.update(np.ascontiguousarray(array).data.cast("B"))
    return h.hexdigest()
