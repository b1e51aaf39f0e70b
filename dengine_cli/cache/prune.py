"""Removing the cache files that can never be used again."""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path
from typing import Any

from dengine_cli.cache import files, index_store, sharing_store
from dengine_cli.cache.keys import default_index_dir
from dengine_cli.cache.spill import stale_spills
from dengine_cli.errors import OutputError


def prune_indexes(index_dir: Path | str | None = None) -> tuple[int, int, int]:
    """Remove the cache files that can never be used again: indexes of dumps that are gone or
    have changed since, files of another index version, unreadable files, and temporary files
    left by an interrupted write.  Returns ``(kept, removed, bytes_freed)``.

    Sharing results stored beside the indexes (:mod:`dengine_cli.cache.sharing_store`) go when any
    of their dumps is gone or has changed, and spill directories no running command holds
    (:func:`~dengine_cli.cache.spill.stale_spills`).  Only files named like ours (``*.idx``,
    ``*.shr``, their ``.tmp-*`` forms, ``.spill-*``) in ``index_dir`` are looked at."""
    folder = Path(index_dir if index_dir is not None else default_index_dir())
    kept = removed = freed = 0
    if not os.path.isdir(folder):
        return 0, 0, 0
    checks = (
        (index_store.INDEX_SUFFIX, index_store.still_valid),
        (sharing_store.SHARING_SUFFIX, sharing_store.still_valid),
    )
    for file, valid in (
        (file, valid)
        for suffix, valid in checks
        for file in sorted(folder.glob("*" + suffix)) + sorted(folder.glob(".tmp-*" + suffix))
    ):
        if valid(file):
            kept += 1
            continue
        try:
            size = file.stat().st_size
            file.unlink()
        except FileNotFoundError:
            continue
        except OSError as e:
            raise OutputError(file, e.strerror or str(e)) from e
        removed += 1
        freed += size
    for spill in stale_spills(folder):
        size = sum(f.stat().st_size for f in spill.iterdir() if f.is_file())
        shutil.rmtree(spill, ignore_errors=True)
        removed += 1
        freed += size
    return kept, removed, freed


#: What tells one state of a dump file from another in an index key.
_IDENTITY = ("dev", "ino", "size", "mtime_ns", "ctime_ns")


def drop_superseded(key: dict[str, Any], file: Path) -> tuple[int, int]:
    """Remove what the index just stored at ``file`` for ``key`` leaves useless: the indexes of
    the same dump file (same real path) as it was before it changed or was replaced, and the
    sharing results that named one of them.  An index of the same file as it is now, under
    other reader options, stays.  Returns ``(removed, bytes_freed)``; a file that cannot be
    removed stays (the cache is an optimization, its upkeep never an error), and files being
    written (``.tmp-*``) are never touched.

    A changed dump's old entries can never be matched again (their key holds the old inode,
    size, mtime and ctime, and no one can set a ctime back), so removing them at once keeps a
    cache of dumps that are taken again and again (a fleet snapshotted every night) the size of
    one set of dumps, where they piled up until ``index --prune``."""
    gone: list[dict[str, Any]] = []
    removed = freed = 0
    for other in index_store.same_dump_files(key, file.parent):
        old = index_store.key_of(other) if other != file else None
        if old is None or old.get("path") != key["path"] or _same_state(old, key):
            continue
        size = _unlink(other)
        if size is not None:
            gone.append(old)
            removed, freed = removed + 1, freed + size
    if not gone:
        return removed, freed
    for shr in sorted(file.parent.glob("*" + sharing_store.SHARING_SUFFIX)):
        found = files.read_header(shr, sharing_store.SHARING_MAGIC, sharing_store.SHARING_VERSION)
        shr_key = found[0].get("key") if found is not None else None
        named = shr_key.get("indexes") if isinstance(shr_key, dict) else None
        if isinstance(named, list) and any(k in gone for k in named):
            size = _unlink(shr)
            if size is not None:
                removed, freed = removed + 1, freed + size
    return removed, freed


def _same_state(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return all(a.get(f) == b.get(f) for f in _IDENTITY)


def _unlink(file: Path) -> int | None:
    """Remove ``file``; its size, or ``None`` when it could not be removed."""
    with contextlib.suppress(OSError):
        size = file.stat().st_size
        file.unlink()
        return size
    return None
