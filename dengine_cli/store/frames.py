"""Frames (``apply --pack``): many pages compressed together, so the store is also a compact
archive.

One compressed blob per page pays for losing the context between pages: every page starts with
an empty history and its own entropy tables.  A frame of :data:`FRAME_PAGES` pages in scan order
keeps the context of neighbouring guest pages (the same file in the page cache, the same kernel
structures); a frame is also the unit of reading: restoring a page decodes its frame (4 MiB),
never the frames of pages not needed.  Patched pages go into frames of their own as the XOR
with their reference (mostly zero bytes), whatever the plan's patch codec.

Measured on the bench dumps (66 k whole and compressed pages, 270 MB; CPU seconds of one core
on a loaded machine, so only their ratios mean much): zstd-3, one blob per page 91.7 MB; frames
of 64 pages 80.0 MB, 256 pages 77.9 MB, 1024 pages 77.1 MB; zstd-9 frames of 1024 pages 70.8 MB
(15 s); a 4 GiB zstd window over all of them gains only 2 % more.  A 110 KB zstd dictionary
trained on 2048 of the store's own pages gained nothing on frames (77.4 MB at 1024 pages, 80.1 at
64, 82.5 against 83.6 at 16), so none is used.  On a 32 MB sample: zstd-19 10.40 MB (17 s),
zstd-9 12.12 MB (0.8 s), LZMA2 preset 0 10.89 MB (1.8 s), with the x86 BCJ filter first 10.51 MB,
with hc4 match finding, nice length 32, depth 4: 10.34 MB (2.0 s), in 256-page frames 10.54 MB;
LZMA2 preset 6 with BCJ 9.16 MB (19 s), in 256-page frames 9.39 MB.  On all 270 MB in 256-page
frames: LZMA2 fast with BCJ 69.4 MB in 12 CPU seconds, preset 1 68.2 MB in 21 s.
Guest memory is mostly code and data of x86 programs, and LZMA's literal coding and the BCJ
filter model them better than zstd does at any speed: ``xz-x86`` is the default for x86 guests.

Incompressible pages (compressed or encrypted data, random content) go into frames of their own,
stored as they are (:data:`STORED`), when the frame codec is LZMA2: LZMA2's match finder is at
its slowest on them (4.4 MB/s a core here, against 9-16 on the other pages) and gains nothing
(the 4155 pages of the bench dumps whose zstd-1 is 4000 bytes or more: 17,018,880 bytes in,
17,019,727 out).  Which pages those are is measured, not guessed: zstd-1 of each whole page (22
us a page, in the worker threads), incompressible when it comes to :data:`INCOMPRESSIBLE_BYTES`
or more.  A byte-entropy test found the same pages but cost more (36 us a page in numpy); zstd's
negative levels are faster but took 300-500 compressible pages for incompressible.
"""

from __future__ import annotations

import lzma
import threading
from typing import Any

import numpy as np
import numpy.typing as npt
import zstandard

from dengine_cli.pages import PAGE_SIZE, PageArray

#: Pages per frame (4 MiB: 2-3 % smaller than 1 MiB frames, see above).
FRAME_PAGES = 1024

#: LZMA2 in its fast mode with hc4 match finding (see the module docstring).
LZMA2_FAST: dict[str, Any] = {
    "id": lzma.FILTER_LZMA2,
    "preset": 0,
    "mf": lzma.MF_HC4,
    "nice_len": 32,
    "depth": 4,
}

#: Frame codec names: LZMA2 fast (raw, no container), the same after the x86 BCJ filter, both at
#: LZMA2 preset 6 (``-6``: about 12 % smaller, 6 times the time), zstd-N.
FRAME_CODECS = ("xz-x86", "xz", "xz-x86-6", "xz-6", "zstd-3", "zstd-9", "zstd-19")
DEFAULT_FRAME_CODEC = "xz-x86"
#: The frame codec of incompressible pages: the pages as they are (not a user's choice).
STORED = "stored"
#: A whole page whose zstd-1 frame is at least this long is incompressible (4096 + 13 bytes of
#: frame when zstd stores the block raw).
INCOMPRESSIBLE_BYTES = 4000

_probe = threading.local()


def incompressible(pages: PageArray) -> npt.NDArray[np.bool_]:
    """Which of ``pages`` are incompressible (zstd-1 to :data:`INCOMPRESSIBLE_BYTES` or more).
    Thread-safe: each thread uses its own zstd context."""
    compressor: zstandard.ZstdCompressor | None = getattr(_probe, "compressor", None)
    if compressor is None:
        compressor = _probe.compressor = zstandard.ZstdCompressor(level=1)
    rows = np.ascontiguousarray(pages)
    data = rows.reshape(-1).data
    starts = range(0, len(rows) * PAGE_SIZE, PAGE_SIZE)
    sizes = np.fromiter(
        (len(compressor.compress(data[i : i + PAGE_SIZE])) for i in starts),
        dtype=np.int32,
        count=len(rows),
    )
    found: npt.NDArray[np.bool_] = sizes >= INCOMPRESSIBLE_BYTES
    return found


def probes_incompressible(codec: str) -> bool:
    """Whether frames of ``codec`` leave incompressible pages to :data:`STORED` frames: LZMA2
    frames do; zstd stores an incompressible block raw by itself, at no cost."""
    return codec.startswith("xz")


class FrameCodec:
    """Compresses and decompresses frames of pages with codec ``name`` (one of
    :data:`FRAME_CODECS`, or :data:`STORED`).  zstd contexts are not for two threads: one object
    per thread."""

    def __init__(self, name: str) -> None:
        if name not in FRAME_CODECS and name != STORED:
            raise ValueError(f"unknown frame codec {name!r}")
        self.name = name
        lzma2 = {"id": lzma.FILTER_LZMA2, "preset": 6} if name.endswith("-6") else LZMA2_FAST
        self._filters = [{"id": lzma.FILTER_X86}, lzma2] if name.startswith("xz-x86") else [lzma2]
        self._level = int(name.split("-")[1]) if name.startswith("zstd-") else 0
        self._compressor: zstandard.ZstdCompressor | None = None
        self._decompressor: zstandard.ZstdDecompressor | None = None

    def compress(self, pages: PageArray) -> bytes:
        data = np.ascontiguousarray(pages).data
        if self.name == STORED:
            return bytes(data)
        if self._level:
            if self._compressor is None:
                self._compressor = zstandard.ZstdCompressor(level=self._level, write_content_size=True)
            return self._compressor.compress(data)
        return lzma.compress(data, format=lzma.FORMAT_RAW, filters=self._filters)

    def decompress(self, blob: bytes, pages: int) -> PageArray:
        """The ``pages`` pages of a frame; ``ValueError`` (or a zstd or LZMA error, both
        subclasses of ``Exception`` the caller catches) when the blob is not such a frame."""
        size = pages * PAGE_SIZE
        if self.name == STORED:
            raw = blob
        elif self._level:
            if self._decompressor is None:
                self._decompressor = zstandard.ZstdDecompressor()
            raw = self._decompressor.decompress(blob, max_output_size=size)
        else:
            d = lzma.LZMADecompressor(format=lzma.FORMAT_RAW, filters=self._filters)
            raw = d.decompress(blob, max_length=size + 1)
            if len(raw) == size and not d.eof:
                raise ValueError("frame is truncated")
        if len(raw) != size:
            raise ValueError(f"frame decodes to {len(raw)} bytes, expected {size}")
        return np.frombuffer(raw, dtype=np.uint8).reshape(pages, PAGE_SIZE)


def delta_codec_for(codec: str) -> str:
    """The codec of the frames of XOR deltas beside frames of ``codec``: no BCJ filter (a delta
    is not code), else the same."""
    return codec.replace("xz-x86", "xz")


def frame_codec_for(arches: list[str | None]) -> str:
    """The default frame codec of a fleet: ``xz-x86`` when every guest is x86, else ``xz``."""
    return DEFAULT_FRAME_CODEC if all(a in ("x86_64", "x86", None) for a in arches) else "xz"
