"""Sorted runs on disk, for sharing past the memory limit.

Each run is one file in a private temporary directory: its hashes, checks and positions one array
after the other, in hash order, so that a partition is a contiguous slice of every file.  Files
are mapped read-only when a partition is gathered: what is read stays in the page cache, not in
this process's memory.  The directory goes when the store is closed, whatever happened.  While
it is in use its ``lock`` file is locked (``flock``); a directory left by a killed process
(``.spill-*`` in the cache directory) is unlocked, and ``dengine index --prune`` removes it.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import tempfile
from pathlib import Path
from types import TracebackType

import numpy as np
import numpy.typing as npt

from dengine_cli.engine.sharing.partitions import I64, RunPiece, SortedRun
from dengine_cli.errors import OutputError

SPILL_PREFIX = ".spill-"


class SpilledRuns:
    """A :class:`~dengine_cli.engine.sharing.RunStore` in files under ``folder``."""

    def __init__(self, folder: Path) -> None:
        try:
            folder.mkdir(parents=True, exist_ok=True)
            self.dir = Path(tempfile.mkdtemp(prefix=SPILL_PREFIX, dir=folder))
            self._lock = os.open(self.dir / "lock", os.O_CREAT | os.O_RDWR, 0o600)
            fcntl.flock(self._lock, fcntl.LOCK_EX)
        except OSError as e:
            raise OutputError(folder, f"cannot make a spill directory: {e.strerror or e}") from e
        self._runs: list[tuple[Path, int, int, np.dtype[np.unsignedinteger], I64]] = []
        self._maps: list[npt.NDArray[np.uint8] | None] = []

    def add(self, run: SortedRun) -> None:
        file = self.dir / f"run-{len(self._runs):06d}"
        try:
            with open(file, "wb") as f:
                for array in (run.hashes, run.check, run.positions):
                    f.write(np.ascontiguousarray(array).data.cast("B"))
        except OSError as e:
            raise OutputError(file, f"cannot spill sorted pages: {e.strerror or e}") from e
        self._runs.append((file, run.vm, len(run.hashes), run.positions.dtype, run.bounds))
        self._maps.append(None)

    def pieces(self, p: int) -> list[RunPiece]:
        pieces = []
        for k, (file, vm, n, pos_type, bounds) in enumerate(self._runs):
            lo, hi = int(bounds[p]), int(bounds[p + 1])
            if lo == hi:
                continue
            data = self._mapped(k, file)
            hashes = data[: 8 * n].view(np.uint64)[lo:hi]
            check = data[8 * n : 16 * n].view(np.uint64)[lo:hi]
            positions = data[16 * n :].view(pos_type)[lo:hi]
            pieces.append(RunPiece(vm, hashes, check, positions))
        return pieces

    def _mapped(self, k: int, file: Path) -> npt.NDArray[np.uint8]:
        """Run ``k``'s file, mapped once: every partition reads a slice of every run, and a new
        mapping for each piece cost 20-30 us (64 runs x 64 partitions for 64 guests).  Threads
        that map the same run at once each get a valid mapping; one of them is kept."""
        data = self._maps[k]
        if data is None:
            data = self._maps[k] = np.memmap(file, dtype=np.uint8, mode="r")
        return data

    def close(self) -> None:
        self._maps.clear()
        shutil.rmtree(self.dir, ignore_errors=True)
        with contextlib.suppress(OSError):
            os.close(self._lock)

    def __enter__(self) -> SpilledRuns:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def stale_spills(folder: Path) -> list[Path]:
    """The spill directories in ``folder`` that no running process holds (left by a killed one)."""
    stale = []
    for spill in sorted(folder.glob(SPILL_PREFIX + "*")):
        if not spill.is_dir():
            continue
        try:
            fd = os.open(spill / "lock", os.O_RDWR)
        except FileNotFoundError:
            stale.append(spill)  # killed before it locked, or while it was removed
            continue
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            stale.append(spill)
        except OSError:
            pass  # in use
        finally:
            os.close(fd)
    return stale
