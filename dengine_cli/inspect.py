"""What `dengine info` says of a dump, and `dengine extract`'s flat image.

Both read every present page once, in batches.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from dengine_cli.errors import OutputError
from dengine_cli.formats.base import Dump
from dengine_cli.outputs import atomic_output, set_size
from dengine_cli.pages import PAGE_SIZE, PageArray

Progress = Callable[[int], None]


def zero_mask(pages: PageArray) -> npt.NDArray[np.bool_]:
    """Which pages of a batch are all zeros (vectorized over 8-byte words)."""
    nonzero: npt.NDArray[np.bool_] = np.any(pages.view(np.uint64), axis=1)
    return ~nonzero


#: Version of :func:`info_document` (the ``--json`` output of ``dengine info``).
SCHEMA = "dengine.info/1"

#: The largest file offset (``off_t`` is signed 64-bit): an image must end at or below it.
MAX_FILE_SIZE = (1 << 63) - 1


@dataclass(frozen=True)
class DumpInfo:
    """A dump's format, guest facts and page counts."""

    path: str
    file_bytes: int
    facts: dict[str, Any]
    ranges: list[tuple[int, int]]
    pages_present: int
    zero_pages: int
    max_gfn: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def nonzero_pages(self) -> int:
        return self.pages_present - self.zero_pages

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "file_bytes": self.file_bytes,
            **self.facts,
            "pages_present": self.pages_present,
            "zero_pages": self.zero_pages,
            "bytes_present": self.pages_present * PAGE_SIZE,
            "max_gfn": self.max_gfn,
            "ranges": [
                {"start": f"{s << 12:#x}", "end": f"{(s + n) << 12:#x}", "pages": n} for s, n in self.ranges
            ],
        }


def info_document(infos: Sequence[DumpInfo]) -> dict[str, Any]:
    """The versioned JSON document of several dumps' infos."""
    return {"schema": SCHEMA, "dumps": [i.to_dict() for i in infos]}


def describe(dump: Dump, path: Path, on_progress: Progress | None = None) -> DumpInfo:
    """Read every page of ``dump`` (opened from ``path``) once and say what it holds."""
    zeros = 0
    for batch in dump.batches():
        zeros += int(zero_mask(batch.pages).sum())
        if on_progress:
            on_progress(len(batch))
    return DumpInfo(
        path=str(path),
        file_bytes=path.stat().st_size,
        facts=dump.facts.to_dict(),
        ranges=dump.ranges(),
        pages_present=dump.page_count,
        zero_pages=zeros,
        max_gfn=int(dump.gfns[-1]) if dump.page_count else None,
    )


def extract(dump: Dump, output: Path, on_progress: Progress | None = None) -> int:
    """Write the guest's physical memory to ``output`` as a flat image: file offset = guest
    physical address.  Absent pages and zero pages are holes of a sparse file (they read as
    zeros).  Written to a temporary file beside ``output`` and renamed at the end, so a failure
    never leaves a partial image.  Returns the image size in bytes."""
    size = (int(dump.gfns[-1]) + 1) * PAGE_SIZE if dump.page_count else 0
    if size > MAX_FILE_SIZE:
        # A page at an address past 2**63 (a lying or exotic header) cannot have a file offset.
        raise OutputError(output, f"the image would be {size:#x} bytes, more than a file can hold")
    with atomic_output(output, sync=False, image=True) as f:
        for batch in dump.batches():
            nonzero = ~zero_mask(batch.pages)
            idx = np.flatnonzero(nonzero)
            if len(idx):
                gfns = batch.gfns[idx].astype(np.int64)
                # Write runs of consecutive non-zero pages with one call each.
                breaks = np.flatnonzero(np.diff(gfns) != 1) + 1
                for run in np.split(np.arange(len(idx)), breaks):
                    first = int(gfns[run[0]])
                    f.seek(first * PAGE_SIZE)
                    f.write(batch.pages[idx[run[0]] : idx[run[-1]] + 1].tobytes())
            if on_progress:
                on_progress(len(batch))
        set_size(f, size)
    return size
