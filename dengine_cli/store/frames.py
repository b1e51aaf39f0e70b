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
Guest memory is mostly code and data of x86 programs, and LZMA's literal coding models them
better than zstd does at any speed, but not every frame: on frames of long matches zstd-9 is as
small in a third of the time.  The default, :data:`AUTO`, chooses per frame
(:func:`choose_codec`): LZMA2 (with a 1 MiB dictionary; plain, or modelling 8-byte words)
or zstd-9; every frame records its own codec.  Scan order is the best order found for frames:
sorting a VM's pages by a min-hash of their 64-bit words, so that pages with words in common
share frames, made the first bench dump's frames 13 % larger (37.0 -> 42.0 MB; by the first
non-zero word 40.7 MB): the guest's own physical layout keeps related pages near each other.

Where ``zstd -19 --long=31`` of the dumps (66.7 MB for the four bench dumps) gains on ``--pack``
(71.9 MB), measured 2026-12-07 on the store's own frames: the 80 frames of compressible pages
(329.7 MB of pages) are 54.13 MB here; zstd-19 of each frame alone makes them 51.60 MB (on the 29
frames ``auto`` gives zstd-9, 26.22 against 29.33 MB; on the LZMA2 frames 1.5-7 % larger than
ours), and zstd-19 ``--long=31`` of all 80 as one stream 48.56 MB: a further 5.9 % from context
across frames, which frames that restore alone do not have.  The 5 stored frames (17.02 MB) stay
17.02 MB under zstd-19.  So the archiver's figure is this store's content at zstd-19's strength
(48.56 + 17.02 + 0.78 MB of catalog = 66.36 MB), in 96 s of two cores where ``--pack`` takes 6.

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
from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt
import zstandard

from dengine_cli.codecs import compression_codec
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
#: The dictionary of LZMA2 fast mode under :data:`AUTO`: 1 MiB, a quarter of a frame, where the
#: fast mode's own is 256 KiB.  Measured on the bench dumps' frames (2026-12-06, CPU seconds of
#: one core, best of 3): 256 KiB 54.32 MB in 7.8 s, 1 MiB 54.04 MB in 8.8 s, 2 MiB 53.98 MB in
#: 9.7 s, a frame's 4 MiB 53.98 MB in 10.2 s: the larger hash chains miss the CPU's caches,
#: and what the last 3 MiB find is worth 0.1 % of the store.
LZMA2_DICT_SIZE = 1 << 20
LZMA2_FAST_WIDE: dict[str, Any] = {**LZMA2_FAST, "dict_size": LZMA2_DICT_SIZE}
#: What frames of LZMA2 fast mode are decoded with: a frame-sized dictionary, which decodes
#: frames encoded with any smaller one (stores written before 2026-12 used 4 MiB).
LZMA2_FAST_DECODE: dict[str, Any] = {**LZMA2_FAST, "dict_size": FRAME_PAGES * PAGE_SIZE}

#: LZMA2 fast mode modelling positions in 8-byte words (``xz-words``): no literal context
#: (``lc=0``), literal and match states by the position in a 64-bit word (``lp=3, pb=3``).
#: Pointer arrays, page tables and kernel structures are runs of aligned 64-bit values; on
#: such frames of the bench dumps it is up to 6 % smaller than the default ``lc=3, pb=2``.
WORDS: dict[str, Any] = {"lc": 0, "lp": 3, "pb": 3}

#: Frame codec names: LZMA2 fast (raw, no container), the same after the x86 BCJ filter, the
#: same modelling 8-byte words (``xz-words``), ``xz`` and ``xz-x86`` at LZMA2 preset 6 (``-6``:
#: about 12 % smaller, 6 times the time), zstd-N.
FRAME_CODECS = ("auto", "xz-x86", "xz", "xz-words", "xz-x86-6", "xz-6", "zstd-3", "zstd-9", "zstd-19")
#: Per frame, one of the LZMA2 fast codecs :data:`AUTO_LZMA2` or zstd-9, whichever the frame's
#: pages favour (:func:`choose_codec`).
AUTO = "auto"
#: The LZMA2 codecs :data:`AUTO` chooses among, with :data:`LZMA2_DICT_SIZE`.  Not ``xz-x86``:
#: the BCJ filter made the smallest LZMA2 frame of only 1 of the bench dumps' 62 and took a
#: sample compression more a frame (see :func:`choose_codec`).
AUTO_LZMA2 = ("xz", "xz-words")
DEFAULT_FRAME_CODEC = AUTO
#: Pages of a frame (evenly spread) that :func:`choose_codec` compresses with both codecs, and
#: how much smaller LZMA2 must make them than zstd-9 to be chosen (worth three times the time).
SAMPLE_PAGES = 32
LZMA2_GAIN = 0.12
#: The frame codec of incompressible pages: the pages as they are (not a user's choice).
STORED = "stored"
#: A whole page whose zstd-1 frame is at least this long is incompressible (4096 + 13 bytes of
#: frame when zstd stores the block raw).
INCOMPRESSIBLE_BYTES = 4000

#: The codec that tells incompressible pages (the codec layer's own zstd-1: per-thread contexts,
#: zero pages found in one vectorized pass and not compressed).
PROBE_CODEC = "zstd-1"


def incompressible(pages: PageArray) -> npt.NDArray[np.bool_]:
    """Which of ``pages`` are incompressible (zstd-1 to :data:`INCOMPRESSIBLE_BYTES` or more).
    Thread-safe, as every compression codec is."""
    sizes = compression_codec(PROBE_CODEC).compressed_sizes(np.ascontiguousarray(pages))
    found: npt.NDArray[np.bool_] = sizes >= INCOMPRESSIBLE_BYTES
    return found


def choose_codec(pages: PageArray, lzma2: Sequence[FrameCodec], zstd: FrameCodec) -> FrameCodec:
    """The codec of one frame under :data:`AUTO`: of the LZMA2 fast codecs ``lzma2`` (a
    dictionary of :data:`LZMA2_DICT_SIZE` each), the one that makes :data:`SAMPLE_PAGES` pages spread evenly
    over the frame smallest, when it comes out :data:`LZMA2_GAIN` smaller than ``zstd``
    (zstd-9) or more; else ``zstd``, which takes a third of the time.

    LZMA2 codes literals and repeated offsets better (x86 code, slab objects: 8-49 % smaller
    than zstd-9 on such frames of the bench dumps); on frames of long matches zstd-9 is as
    small or up to 14 % smaller.  Measured on the bench dumps' 61 frames (253 MB, incompressible
    pages aside; CPU seconds of one core): LZMA2 everywhere 51.28 MB in 22.6 s, zstd-9
    everywhere 53.82 MB in 6.9 s, the choice 51.25 MB in 11.9 s (samples included), the best of
    both for every frame 50.09 MB.  Guessing from zstd-3 against zstd-9 alone cost less but
    chose zstd-9 for a frame of slab-like records that LZMA2 makes 19 % smaller.

    The x86 BCJ filter helps frames of code and costs all others (it rewrites the four bytes
    after every ``E8`` byte, in data too), and the frames of guest memory are mostly data: of
    the 62, LZMA2 was smallest after BCJ on 5, without it on 34 (and on the same data 2.5 %
    smaller in all), modelling 8-byte words (``xz-words``) on 11.  The choice among ``xz``,
    ``xz-words`` and zstd-9 makes the frames 49.80 MB where BCJ-LZMA2 or zstd-9 made 51.30 MB
    (the best of those four codecs for every frame: 48.43 MB); adding ``xz-x86`` to the choice
    gained 0.03 MB for a third more sample work."""
    step = max(1, len(pages) // SAMPLE_PAGES)
    sample = np.ascontiguousarray(pages[::step][:SAMPLE_PAGES])
    sizes = [len(c.compress(sample)) for c in lzma2]
    best = int(np.argmin(sizes))
    return lzma2[best] if sizes[best] < (1 - LZMA2_GAIN) * len(zstd.compress(sample)) else zstd


def probes_incompressible(codec: str) -> bool:
    """Whether frames of ``codec`` leave incompressible pages to :data:`STORED` frames: LZMA2
    frames do (and :data:`AUTO`, which may choose it); zstd stores an incompressible block raw
    by itself, at no cost."""
    return codec.startswith("xz") or codec == AUTO


class FrameCodec:
    """Compresses and decompresses frames of pages with codec ``name`` (one of
    :data:`FRAME_CODECS`, or :data:`STORED`).  zstd contexts are not for two threads: one object
    per thread."""

    def __init__(self, name: str, *, wide_dictionary: bool = False) -> None:
        """``wide_dictionary``: LZMA2 fast mode encodes with :data:`LZMA2_FAST_WIDE` (a dictionary
        of :data:`LZMA2_DICT_SIZE`, not the fast mode's 256 KiB)."""
        if (name not in FRAME_CODECS and name != STORED) or name == AUTO:
            raise ValueError(f"unknown frame codec {name!r}")
        self.name = name
        six: dict[str, Any] | None = {"id": lzma.FILTER_LZMA2, "preset": 6} if name.endswith("-6") else None
        self._filters = self._chain(name, six or (LZMA2_FAST_WIDE if wide_dictionary else LZMA2_FAST))
        self._decoding = self._chain(name, six or LZMA2_FAST_DECODE)
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

    @staticmethod
    def _chain(name: str, lzma2: dict[str, Any]) -> list[dict[str, Any]]:
        if name == "xz-words":
            return [{**lzma2, **WORDS}]
        return [{"id": lzma.FILTER_X86}, lzma2] if name.startswith("xz-x86") else [lzma2]

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
            d = lzma.LZMADecompressor(format=lzma.FORMAT_RAW, filters=self._decoding)
            raw = d.decompress(blob, max_length=size + 1)
            if len(raw) == size and not d.eof:
                raise ValueError("frame is truncated")
        if len(raw) != size:
            raise ValueError(f"frame decodes to {len(raw)} bytes, expected {size}")
        return np.frombuffer(raw, dtype=np.uint8).reshape(pages, PAGE_SIZE)


def delta_codec_for(codec: str) -> str:
    """The codec of the frames of XOR deltas beside frames of ``codec``: no BCJ filter (a delta
    is not code), LZMA2 under :data:`AUTO` (deltas are mostly zero bytes: 4.02 MB in 1.4 s on the
    bench dumps, zstd-9 4.36 MB in 0.6 s), else the same."""
    return "xz" if codec == AUTO else codec.replace("xz-x86", "xz")
