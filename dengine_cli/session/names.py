"""Which names given to a command are one dump file, so that every command that computes
figures across dumps (``analyze``, ``plan``, ``report``) reads a file once whatever it is
called (``x``, ``./x``, ``d/../x``, a symlink or a hard link to it)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

#: What :func:`file_key` gives: device and inode, or a real path.
FileKey = tuple[int, int] | str


def file_key(path: Path | str) -> FileKey:
    """What makes two names one dump file: its device and inode (so ``x``, ``./x``, ``d/../x``,
    a symlink to it and a hard link are one file), or its real path when it cannot be stat'ed
    (opening it names the error later)."""
    try:
        st = os.stat(path)
    except OSError:
        return os.path.realpath(path)
    return (st.st_dev, st.st_ino)


def one_name_per_file(paths: Sequence[Path]) -> tuple[list[Path], list[tuple[Path, list[Path]]]]:
    """``paths`` with each file once, under the first name it was given by, in that order; and,
    for each file given more than once, that first name and the other names it was given by (in
    their order, a name repeated as it was)."""
    first: dict[FileKey, Path] = {}
    others: dict[FileKey, list[Path]] = {}
    for path in paths:
        key = file_key(path)
        if key in first:
            others.setdefault(key, []).append(path)
        else:
            first[key] = path
    return list(first.values()), [(first[key], names) for key, names in others.items()]
