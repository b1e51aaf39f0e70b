"""What apply does to a batch of one VM's pages: check them against the plan, checksum them, and
encode the pages the plan stores (whole, patched, compressed), with the plan's own codecs.

A pure function of arrays (:func:`encode_batch`), run by worker threads: the codecs let go of
the GIL while they encode, and each thread uses its own codec contexts.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from dengine_cli.codecs import CompressionCodec, PatchCodec
from dengine_cli.codecs.base import zero_rows
from dengine_cli.engine.plan.model import COMPRESS, PATCH, SWAP, WHOLE, ZERO
from dengine_cli.pages import PageArray, page_checksums
from dengine_cli.store.frames import incompressible
from dengine_cli.store.layout import ZERO_PAGE_CHECKSUM

U64 = npt.NDArray[np.uint64]


@dataclass(frozen=True, eq=False)
class Batch:
    """Positions ``lo:hi`` of VM ``vm``: their pages, planned actions, and the reference pages
    of the patched ones (in order)."""

    vm: int
    lo: int
    pages: PageArray
    actions: npt.NDArray[np.uint8]
    refs: PageArray


@dataclass(frozen=True, eq=False)
class Encoded:
    """A batch encoded: every page's xxh3-64 (the zero page's for zero pages), the positions
    (within the batch) of zero-planned pages that are not zero, and per stored page (whole,
    patched, compressed, paged out, in order) its blob, or ``None`` for a page left raw for a
    frame (``raw_for_frames``): then ``raw`` holds those pages (whole, compressed, paged out),
    ``xor`` the patched pages XOR their references, each in order, and ``incompressible`` which
    of ``raw`` are (whole and paged-out pages only, when asked to probe; else all ``False``)."""

    vm: int
    lo: int
    checksums: U64
    not_zero: npt.NDArray[np.int64]
    blobs: list[bytes | None]
    raw: PageArray
    xor: PageArray
    incompressible: npt.NDArray[np.bool_]


def stored_mask(actions: npt.NDArray[np.uint8]) -> npt.NDArray[np.bool_]:
    """The pages the plan stores as an object of their own."""
    return np.isin(actions, (WHOLE, COMPRESS, PATCH, SWAP))


def encode_batch(
    batch: Batch,
    compression: CompressionCodec | None,
    patch: PatchCodec | None,
    raw_for_frames: bool,
    probe: bool = False,
) -> Encoded:
    """Checksum and encode one batch.  With ``raw_for_frames`` no page is encoded here: whole,
    compressed and paged-out pages are returned in ``raw``, patched pages XOR their reference in
    ``xor``, for frames; with ``probe`` too, whole and paged-out pages are tested for
    :func:`~dengine_cli.store.frames.incompressible` (compressed ones compress, by the plan)."""
    pages, actions = batch.pages, batch.actions
    # Every row's checksum in one pass (a zero page's costs less than copying out the others);
    # a page planned as zero has the zero page's, and is checked to be zero just below.
    sums = page_checksums(pages)
    zero_planned = actions == ZERO
    sums[zero_planned] = ZERO_PAGE_CHECKSUM
    zp = np.flatnonzero(zero_planned)
    not_zero = zp[~zero_rows(pages[zp])] if len(zp) else zp
    stored = np.flatnonzero(stored_mask(actions))
    blobs: list[bytes | None] = []
    raw_rows: list[int] = []
    ref_at = 0
    patched = np.flatnonzero(actions == PATCH)
    xor = np.bitwise_xor(pages[patched], batch.refs) if raw_for_frames else pages[:0]
    for i in stored.tolist():
        act = int(actions[i])
        if act == PATCH and raw_for_frames:
            blobs.append(None)
        elif act == PATCH:
            assert patch is not None
            blobs.append(patch.diff(batch.refs[ref_at], pages[i]))
            ref_at += 1
        elif raw_for_frames:
            blobs.append(None)
            raw_rows.append(i)
        elif act == COMPRESS:
            assert compression is not None
            blobs.append(compression.compress(pages[i]))
        else:
            blobs.append(pages[i].tobytes())
    raw = pages[raw_rows] if raw_rows else np.zeros((0, pages.shape[1]), dtype=np.uint8)
    flagged = np.zeros(len(raw), dtype=np.bool_)
    if probe and len(raw):
        whole = actions[raw_rows] != COMPRESS
        flagged[whole] = incompressible(raw[whole])
    return Encoded(batch.vm, batch.lo, sums, not_zero, blobs, raw, xor, flagged)
