"""Removing the cache files that can never be used again."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from dengine_cli.cache import index_store, sharing_store
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
