"""Compression codecs: one page encoded on its own (zstd, zlib, LZ4).

Encodings, chosen so that each blob decodes with the standard tools and nothing else:

* ``zstd-N``: one zstd frame (RFC 8878) at level N, with the content size (4096) in the frame
  header, no checksum and no dictionary id.  The compressor context is reused between pages; for a
  4096-byte input zstd picks parameters sized for it (level 1: window 4 KiB, hash table 8 K).
* ``zlib-N``: one zlib stream (RFC 1950: 2-byte header, deflate, Adler-32) at level N, what
  ``zlib.compress(page, N)`` returns.
* ``lz4``: one raw LZ4 block (lz4 block format, default acceleration) without the LZ4 frame and
  without a stored size: pages are always 4096 bytes, so the decoder is told the size instead.

Measured on the 12,168 distinct non-zero pages of a real QEMU ``dump-guest-memory`` ELF of a Linux
guest (24,544 pages; the same guest as fixtures/alpha-later.elf), Python 3.11, zstandard 0.25,
cramjam 2.14, on a shared 2-core machine whose speed varied by half between runs (load 1 to 4):
CPU time per page, the range over runs, one ``compress()`` call per page against the batch
``compressed_sizes()``:

==========  =====================  ===========================  ==================
codec       ``compress()`` loop    ``compressed_sizes()``       size, % of 4096
==========  =====================  ===========================  ==================
zstd-1      18-30 us               18-30 us                     39.6 %
zstd-3      28-33 us               24-35 us                     38.6 %
zstd-19     0.7-1.9 ms             0.8-1.5 ms                   35.2 %
zlib-1      70-85 us               73-83 us                     38.9 %
zlib-6      125-133 us             116-132 us                   37.2 %
lz4         8-10 us                8-11 us                      52.7 %
==========  =====================  ===========================  ==================

Within a run the loop and the batch cost the same on non-zero pages: the codecs' own work
dominates the 1-2 us of Python per call.  The batch wins on zero pages, which cost nothing (their
size is known): on a batch that is half zero pages, zstd-1 costs 10 us and lz4 5 us per page.
zstd's batch is ``ZstdCompressor.multi_compress_to_buffer`` on the calling thread (see
:func:`zstd_sizes`): alone it measured the same as the loop, and its threads no faster on two of
these loaded cores, but with two threads measuring a plan the loop's Python between pages made
each wait for the other.  Tried and not kept: LZ4 into a preallocated buffer
(``compress_block_into``) and zlib with an 8 KiB window were no faster.
"""

from __future__ import annotations

import threading
import zlib

import cramjam
import numpy as np
import zstandard

from dengine_cli.codecs.base import CodecError, CompressionCodec, PageArray, PageLike, SizeArray, page_bytes
from dengine_cli.pages import PAGE_SIZE


class ZstdCodec(CompressionCodec):
    """``zstd-N``: one zstd frame at level N, content size in the header."""

    def __init__(self, codec_id: int, *, level: int) -> None:
        self.id = codec_id
        self.level = level
        self.name = f"zstd-{level}"
        self._contexts = ZstdContexts(level)

    @property
    def _compressor(self) -> zstandard.ZstdCompressor:
        return self._contexts.compressor

    @property
    def _decompressor(self) -> zstandard.ZstdDecompressor:
        return self._contexts.decompressor

    def compress(self, page: PageLike) -> bytes:
        return self._compressor.compress(page_bytes(page))

    def decompress(self, blob: bytes) -> bytes:
        return zstd_page(self._decompressor, self.name, blob)

    def _size(self, page: PageArray) -> int:
        return len(self._compressor.compress(page.data))

    def _sizes(self, rows: PageArray) -> SizeArray:
        return zstd_sizes(self._compressor, rows)


def zstd_sizes(compressor: zstandard.ZstdCompressor, rows: PageArray) -> SizeArray:
    """``len(compressor.compress(row))`` of each row of an ``(n, 4096)`` array, in one call
    that compresses every row in C (``multi_compress_to_buffer`` on this thread: the same
    context, parameters and frames as ``compress()``, so the same sizes; tests compare them).

    One ``compress()`` a page costs the same on one thread, but holds the GIL between pages
    (the slice, the call, ``len``): with two threads measuring a plan, each waited for the
    other's Python between its pages.  Measured over the bench dumps' 19,801 patches and 17,827
    compressed pages (2026-12-07, 2 threads): the plan's patching 150-200 -> 130-150 ms, its
    compression 125-175 -> 115-130 ms."""
    n = len(rows)
    if n == 0:
        return np.zeros(0, dtype=np.int32)
    data = np.ascontiguousarray(rows).reshape(-1)
    segments = np.empty((n, 2), dtype=np.uint64)
    segments[:, 0] = np.arange(0, n * PAGE_SIZE, PAGE_SIZE, dtype=np.uint64)
    segments[:, 1] = PAGE_SIZE
    frames = compressor.multi_compress_to_buffer(
        zstandard.BufferWithSegments(data.data, segments.data), threads=1
    )
    return np.fromiter((len(frames[i]) for i in range(n)), dtype=np.int32, count=n)


class ZstdContexts:
    """A zstd compressor (at ``level``) and decompressor for each thread that asks: a zstd
    context is not for two threads at once, and codecs are shared by the threads measuring a
    plan."""

    def __init__(self, level: int) -> None:
        self.level = level
        self._local = threading.local()

    @property
    def compressor(self) -> zstandard.ZstdCompressor:
        compressor: zstandard.ZstdCompressor | None = getattr(self._local, "compressor", None)
        if compressor is None:
            compressor = self._local.compressor = zstandard.ZstdCompressor(level=self.level)
        return compressor

    @property
    def decompressor(self) -> zstandard.ZstdDecompressor:
        decompressor: zstandard.ZstdDecompressor | None = getattr(self._local, "decompressor", None)
        if decompressor is None:
            decompressor = self._local.decompressor = zstandard.ZstdDecompressor()
        return decompressor


def zstd_page(decompressor: zstandard.ZstdDecompressor, codec: str, blob: bytes) -> bytes:
    """The page in the single zstd frame ``blob``, checked to be exactly 4096 bytes.  The size in
    the frame header is checked before decoding, so a corrupt header cannot make it allocate."""
    try:
        content_size = zstandard.frame_content_size(blob)
    except zstandard.ZstdError as e:
        raise CodecError(codec, f"bad zstd frame header ({e})") from None
    if content_size != PAGE_SIZE:
        found = "no content size" if content_size == -1 else f"content size {content_size}"
        raise CodecError(codec, f"zstd frame holds {found}, expected {PAGE_SIZE}")
    try:
        page = decompressor.decompress(blob, allow_extra_data=False)
    except zstandard.ZstdError as e:
        raise CodecError(codec, str(e)) from None
    if len(page) != PAGE_SIZE:  # zstd checks the content size itself; this is belt and braces
        raise CodecError(codec, f"decoded {len(page)} bytes, expected {PAGE_SIZE}")
    return page


class ZlibCodec(CompressionCodec):
    """``zlib-N``: one zlib stream at level N."""

    def __init__(self, codec_id: int, *, level: int) -> None:
        self.id = codec_id
        self.level = level
        self.name = f"zlib-{level}"

    def compress(self, page: PageLike) -> bytes:
        return zlib.compress(page_bytes(page), self.level)

    def decompress(self, blob: bytes) -> bytes:
        inflater = zlib.decompressobj()
        try:
            # One byte more than a page, so that a stream holding more than a page is caught.
            page = inflater.decompress(blob, PAGE_SIZE + 1)
        except zlib.error as e:
            raise CodecError(self.name, str(e)) from None
        if len(page) != PAGE_SIZE:
            raise CodecError(self.name, f"decoded {len(page)}+ bytes, expected {PAGE_SIZE}")
        if not inflater.eof:
            raise CodecError(self.name, "zlib stream is truncated")
        if inflater.unused_data:
            raise CodecError(self.name, f"{len(inflater.unused_data)} bytes after the zlib stream")
        return page

    def _size(self, page: PageArray) -> int:
        return len(zlib.compress(page.data, self.level))


class Lz4Codec(CompressionCodec):
    """``lz4``: one raw LZ4 block, no frame, no stored size (pages are always 4096 bytes)."""

    def __init__(self, codec_id: int) -> None:
        self.id = codec_id
        self.name = "lz4"

    def compress(self, page: PageLike) -> bytes:
        return bytes(cramjam.lz4.compress_block(page_bytes(page), store_size=False))

    def decompress(self, blob: bytes) -> bytes:
        # Into a buffer of exactly one page: decompress_block(output_len=) pads a short result with
        # zeros to output_len, which would hide a block that decodes to less than a page.
        page = bytearray(PAGE_SIZE)
        try:
            size = cramjam.lz4.decompress_block_into(blob, page)
        except cramjam.DecompressionError as e:
            raise CodecError(self.name, str(e)) from None
        if size != PAGE_SIZE:
            raise CodecError(self.name, f"decoded {size} bytes, expected {PAGE_SIZE}")
        return bytes(page)
