"""Helpers for tests that watch dengine's processes from outside (through /proc)."""

from __future__ import annotations

from pathlib import Path


def descendants(pid: int) -> list[int]:
    """``pid`` and every process below it (the command runs in a child of its supervisor)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            for task in Path(f"/proc/{p}/task").iterdir():
                todo += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            pass
    return out


def mapped_by(pid: int, path: Path) -> bool:
    """Whether ``pid`` or a process below it maps ``path``."""
    for p in descendants(pid):
        try:
            if str(path) in Path(f"/proc/{p}/maps").read_text():
                return True
        except OSError:
            pass
    return False
