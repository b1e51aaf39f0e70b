"""makedumpfile's flattened stream of any file (``makedumpfile -F``; makedumpfile.h
``makedumpfile_header`` and ``makedumpfile_data_header``, FORMATS.md §2.3), written from the
format, not from the reader: a 4096-byte big-endian header, then records ``{i64 offset; i64
size}`` each followed by ``size`` bytes that belong at ``offset`` of the file, then offset -1.

``flatten_file(data, cuts)`` cuts ``data`` at the given offsets into records, optionally
shuffles them (any order is valid), rewrites some ranges in later records (makedumpfile writes
the ELF program headers first with placeholders and again at the end) and leaves holes (bytes no
record holds read as zeros, as in the sparse file ``makedumpfile -R`` writes).
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Sequence

from tests.builders.kdump import end_marker, flat_header, record


def flatten_file(
    data: bytes,
    cuts: list[int],
    *,
    shuffle_seed: int | None = None,
    rewrite: Sequence[tuple[int, int]] = (),
    holes: Sequence[tuple[int, int]] = (),
    terminate: bool = True,
) -> bytes:
    """The flattened stream of ``data`` cut into records at ``cuts`` (offsets, any order).
    ``rewrite``: ``(offset, length)`` ranges first written as 0xEE bytes, then again right at the
    end with the real bytes (a later record wins).  ``holes``: ranges held by no record (they
    must read as zeros in ``data`` for the stream to mean ``data``)."""
    bounds = sorted({0, len(data), *(c for c in cuts if 0 < c < len(data))})
    pieces = [(a, b - a) for a, b in itertools.pairwise(bounds)]
    kept: list[tuple[int, int]] = []
    for start, length in pieces:
        pos = start
        for h_start, h_len in sorted(holes):
            if h_start + h_len <= pos or h_start >= start + length:
                continue
            if h_start > pos:
                kept.append((pos, h_start - pos))
            pos = max(pos, h_start + h_len)
        if pos < start + length:
            kept.append((pos, start + length - pos))
    if shuffle_seed is not None:
        random.Random(shuffle_seed).shuffle(kept)
    out = [flat_header()]
    out += [record(off, b"\xee" * n) for off, n in rewrite]
    out += [record(off, data[off : off + n]) for off, n in kept]
    out += [record(off, data[off : off + n]) for off, n in rewrite]
    if terminate:
        out.append(end_marker())
    return b"".join(out)


def every(step: int, size: int, first: int = 0) -> list[int]:
    """Cuts every ``step`` bytes from ``first`` on (makedumpfile flushes its write cache so)."""
    return list(range(first, size, step))
