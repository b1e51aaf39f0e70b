"""Page indexes on disk, keyed by the dump file as it is now.

On disk (the framing of :mod:`dengine_cli.cache.files`): magic b"DENGIDX\\0", version
:data:`INDEX_VERSION`, a JSON header (the cache key, page count, checksum, guest facts, the dump's name and
the path it was given by), then
u64[n] gfns, u64[n] hashes (high half of xxh3-128), u64[n] check (low half), u8[n] zero flags.

The cache key names the dump as it is now: real path, device, inode, size, mtime and ctime (which
no user can set back, so any rewrite of the file changes it), plus the index version and the
reader options that change the page set.  The file is named by a digest of the key, and the key is
stored in the header and compared on load; the arrays carry an xxh3-64 checksum.  A file that
fails any check is ignored and rebuilt, never trusted; files are written atomically.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from dengine_cli.cache import files
from dengine_cli.cache.keys import default_index_dir, dump_identity
from dengine_cli.engine.index import HASH_NAME, HashArray, PageIndex, ZeroArray
from dengine_cli.errors import UnreadableFile
from dengine_cli.formats.base import OpenOptions
from dengine_cli.pages import GfnArray

INDEX_MAGIC = b"DENGIDX\0"


#: Bump whenever the layout, the hash function or what a page set means changes.
INDEX_VERSION = 2


INDEX_SUFFIX = ".idx"
#: gfn, hash, check (8 bytes each) and the zero flag.
BYTES_PER_PAGE = 25


def index_key(path: Path | str, options: OpenOptions) -> dict[str, Any]:
    """What an index is valid for: the dump file as it is now (:func:`dump_identity`) and the
    options that change its page set.  Raises :class:`UnreadableFile` when the dump cannot be
    stat'ed."""
    key = {
        **dump_identity(path),
        "index_version": INDEX_VERSION,
        "hash": HASH_NAME,
        "format": options.format,
        "device_memory": options.device_memory,
    }
    if options.partial:
        # A dump read with --partial may hold fewer pages than one read without (which refuses
        # it): its index must never stand in for the other.  Absent otherwise, so that keys of
        # complete dumps stay what they were.
        key["partial"] = True
    return key


def index_path_for(
    path: Path | str, options: OpenOptions | None = None, index_dir: Path | str | None = None
) -> Path:
    """Where the index of the dump at ``path`` (as the file is now) is cached."""
    return file_for(index_key(path, options or OpenOptions()), index_dir)


def file_for(key: dict[str, Any], index_dir: Path | str | None) -> Path:
    """Where the index for ``key`` is cached: named after its dump's real path, then the key, so
    that the indexes of one dump file, as it is now and as it was, are found by name
    (:func:`same_dump_files`)."""
    folder = index_dir if index_dir is not None else default_index_dir()
    return files.name_for(key, folder, INDEX_SUFFIX, group=str(key["path"]))


def same_dump_files(key: dict[str, Any], folder: Path) -> list[Path]:
    """The index files in ``folder`` named for the dump file that ``key`` names (its real path),
    whatever the file was then, the one for ``key`` among them if it is there."""
    prefix = files.group_prefix(str(key["path"]))
    try:
        with os.scandir(folder) as entries:
            return sorted(
                Path(e.path) for e in entries if e.name.startswith(prefix) and e.name.endswith(INDEX_SUFFIX)
            )
    except OSError:
        return []


def key_of(file: Path) -> dict[str, Any] | None:
    """The key an index file was made for (``None``: not an index of this version)."""
    found = files.read_header(file, INDEX_MAGIC, INDEX_VERSION)
    key = found[0].get("key") if found is not None else None
    return key if isinstance(key, dict) else None


def map_arrays(file: Path, data: int, n: int) -> tuple[GfnArray, HashArray, HashArray, ZeroArray]:
    """The four arrays of an index file of ``n`` pages whose data starts at ``data``, mapped
    read-only (page cache, not this process's memory)."""
    if n == 0:
        empty = np.zeros(0, dtype=np.uint64)
        return empty, empty, empty, np.zeros(0, dtype=np.bool_)
    arrays = np.memmap(file, dtype=np.uint8, mode="r", offset=data, shape=(BYTES_PER_PAGE * n,))
    gfns = arrays[: 8 * n].view(np.uint64)
    hashes = arrays[8 * n : 16 * n].view(np.uint64)
    check = arrays[16 * n : 24 * n].view(np.uint64)
    zero = arrays[24 * n :].view(np.bool_)
    return gfns, hashes, check, zero


def read_index(file: Path, key: dict[str, Any], given: str | None = None) -> PageIndex | None:
    """The index stored in ``file`` if it is intact and made for ``key``; ``None`` otherwise
    (missing, truncated, corrupt, another version, another dump).  ``given``: the path the dump
    is given by now, which names it (see :func:`_name_now`)."""
    found = files.read_header(file, INDEX_MAGIC, INDEX_VERSION)
    if found is None:
        return None
    header, data, size = found
    if header.get("key") != key:
        return None
    try:
        n = header["page_count"]
        if not isinstance(n, int) or isinstance(n, bool) or n < 0:
            return None
        if size != data + BYTES_PER_PAGE * n:
            return None
        gfns, hashes, check, zero = map_arrays(file, data, n)
        if header.get("checksum") != files.checksum((gfns, hashes, check, zero)):
            return None
        facts = header.get("facts")
        return PageIndex(
            _name_now(header, key, given),
            gfns,
            hashes,
            check,
            zero,
            facts if isinstance(facts, dict) else {},
            loaded=True,
            path=file,
            key=key,
        )
    except (OSError, ValueError, KeyError, TypeError):
        # json errors are ValueErrors; anything unreadable is a cache miss, never a crash.
        return None


def _name_now(header: dict[str, Any], key: dict[str, Any], given: str | None) -> str:
    """The dump's name in every output: the path it is given by now (``given``), not the one the
    index was built under (``x``, ``./x``, an absolute path or a link are one file, one key),
    followed by what the reader added to it (``(partial: ...)``)."""
    stored = str(header.get("name", key["path"]))
    if given is None:
        return stored
    was = header.get("given")
    if isinstance(was, str) and stored.startswith(was):
        return given + stored[len(was) :]
    # Written before "given" was stored: a complete dump's name is the path it was given by.
    return stored if key.get("partial") else given


def still_valid(file: Path) -> bool:
    """Whether ``file`` is an index whose dump is still as it was when it was built."""
    if file.name.startswith(".tmp-"):
        return False
    found = files.read_header(file, INDEX_MAGIC, INDEX_VERSION)
    if found is None:
        return False
    try:
        key = found[0]["key"]
        return still_current(key) and file_for(key, file.parent) == file
    except (OSError, ValueError, KeyError, TypeError):
        return False


def still_current(key: dict[str, Any]) -> bool:
    """Whether the dump an index key names is still the file it was (``False`` when it is gone,
    changed, or the key is not one of ours)."""
    try:
        options = OpenOptions(
            format=key["format"], device_memory=bool(key["device_memory"]), partial=bool(key.get("partial"))
        )
        return bool(index_key(key["path"], options) == key)
    except (OSError, ValueError, KeyError, TypeError, UnreadableFile):
        return False


def write_index(index: PageIndex, key: dict[str, Any], file: Path, given: str | None = None) -> bool:
    """Store ``index`` for ``key`` at ``file`` atomically; ``False`` when that is not possible
    (the cache is an optimization: a read-only or full cache directory is not an error).
    ``given``: the path the dump was given by, which its name starts with."""
    header = {
        "key": key,
        "name": index.name,
        **({"given": given} if given is not None else {}),
        "page_count": index.page_count,
        "zero_pages": index.zero_pages,
        "checksum": files.checksum((index.gfns, index.hashes, index.check, index.zero)),
        "facts": index.facts,
    }
    return files.write(
        file, INDEX_MAGIC, INDEX_VERSION, header, (index.gfns, index.hashes, index.check, index.zero)
    )
