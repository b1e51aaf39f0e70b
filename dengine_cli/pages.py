"""The unit everything works in: the 4 KiB guest page, and the array types pages travel in.

Every layer (readers, codecs, engine, caches) names pages the same way, so these facts live
below all of them.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

try:
    # The C page hasher (dengine_cli/_pagehash.c): loaded here once, for the index's hashes
    # (dengine_cli.engine.index) and the store's checksums (page_checksums).
    from dengine_cli import _pagehash as _pagehash  # type: ignore[attr-defined]
except ImportError:  # not built (no compiler or no libxxhash-dev where dengine was installed)
    _pagehash = None

PAGE_SHIFT = 12
PAGE_SIZE = 1 << PAGE_SHIFT

#: Pages per batch: 16 Ki pages = 64 MiB, large enough to amortize per-batch overhead, small enough
#: to keep the resident set bounded.
BATCH_PAGES = 16384

GfnArray = npt.NDArray[np.uint64]
OffsetArray = npt.NDArray[np.int64]
PageArray = npt.NDArray[np.uint8]


#: Where page checksums are computed: ``"c"`` (``dengine_cli/_pagehash.c``) when it was built,
#: and ``"python"`` (one xxhash call a page), the same sums.
CHECKSUMMERS: tuple[str, ...] = ("c", "python") if _pagehash is not None else ("python",)


def page_checksums(pages: PageArray, *, by: str = CHECKSUMMERS[0]) -> npt.NDArray[np.uint64]:
    """The page store's checksum of each row of ``pages`` (``(n, 4096) uint8``, rows at any
    stride): its xxh3-64.  In one call of the C hasher (``dengine_cli/_pagehash.c``) that lets
    go of the GIL, so that threads checking batches run beside each other and beside decoding
    (one xxhash call a page held it, 0.3-0.5 us a page); else those calls (``by``: one of
    :data:`CHECKSUMMERS`)."""
    if by not in CHECKSUMMERS:
        raise ValueError(f"page checksums by {by!r} are not built here (built: {', '.join(CHECKSUMMERS)})")
    if pages.ndim != 2 or pages.shape[1] != PAGE_SIZE:
        raise ValueError(f"pages must be rows of {PAGE_SIZE} bytes, not an array of shape {pages.shape}")
    sums = np.empty(len(pages), dtype=np.uint64)
    if not len(pages):
        return sums
    if by == "c" and _pagehash is not None:
        _pagehash.checksum_pages(pages if pages.strides[1:] == (1,) else np.ascontiguousarray(pages), sums)
        return sums
    import xxhash

    rows = np.ascontiguousarray(pages)
    sums[:] = np.fromiter(map(xxhash.xxh3_64_intdigest, rows), dtype=np.uint64, count=len(rows))
    return sums
