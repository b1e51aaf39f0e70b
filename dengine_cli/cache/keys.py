"""What names a dump for every cache: the file as it is now, and where caches live."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from dengine_cli.errors import UnreadableFile
from dengine_cli.formats import not_a_dump_file


def default_index_dir() -> Path:
    """``$XDG_CACHE_HOME/dengine/index``, or ``~/.cache/dengine/index``."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "dengine" / "index"


def dump_identity(path: Path | str) -> dict[str, Any]:
    """The dump file as it is now: real path, device, inode, size, mtime and ctime (which no user
    can set back, so any rewrite of the file changes it).  Raises :class:`UnreadableFile` when
    the dump cannot be stat'ed."""
    real = os.path.realpath(path)
    try:
        st = os.stat(real)
    except OSError as e:
        raise UnreadableFile(str(path), e.strerror or str(e)) from e
    if (reason := not_a_dump_file(st.st_mode)) is not None:
        raise UnreadableFile(str(path), reason)
    return {
        "path": real,
        "dev": st.st_dev,
        "ino": st.st_ino,
        "size": st.st_size,
        "mtime_ns": st.st_mtime_ns,
        "ctime_ns": st.st_ctime_ns,
    }
