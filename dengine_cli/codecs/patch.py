"""Patch codecs: a page encoded as its difference from a similar reference page.

* ``bsdiff4``: the BSDIFF40 format of Colin Percival's bsdiff, as the ``bsdiff4`` package writes
  it (a 32-byte header, then bzip2-compressed control, diff and extra sections).  Decoded here,
  not by the package: its decoder (``core.c`` of ilanschnell/bsdiff4) checks control lengths
  against the ends of the buffers but not for being negative, and its reader bzip2-decodes
  sections of any size; the package's ``bsdiff4.patch`` is the tests' oracle.
* ``zstd-dict``: one zstd frame at level 1 (content size in the header, no dictionary id), with the
  reference page loaded as a raw-content dictionary, so matches can point into the reference.
  Raw-content is forced on both sides: a page that starts with the zstd dictionary magic would
  otherwise be parsed as a trained dictionary.  Level 1 (zstd's fast strategy) has one weakness:
  on a repetitive page (text made of a few words) it takes the short matches it finds earlier in
  the page before the long match into the reference, so even a one-byte change can cost hundreds
  of bytes (611 B seen on a synthetic text page; 155 B for a text page against itself).  Levels
  3-5 shrink real patches by 5-11 % for 10-70 % more time without curing it; xor-zstd does not
  have the weakness.
* ``xor-zstd``: one zstd frame at level 1 of ``page XOR reference``: the bytes that did not change
  become zeros that zstd codes almost for free.  Decodes with the ``zstd`` tool plus an XOR.

Measured on 1,163 candidate pairs (pages sharing a 64-byte block at offset 0, 1024, 2048 or 3072)
among the 12,168 distinct non-zero pages of a real QEMU dump of a Linux guest (24,544 pages),
Python 3.11, zstandard 0.25, bsdiff4 1.3.2, on a shared 2-core machine whose speed varied by half
between runs: CPU time per pair, one ``diff()`` call per pair against the batch ``patch_sizes()``,
and the average patch (all pairs; in brackets the first 300 pairs, where bsdiff4 was measured):

==========  =====================  ======================  ==========================
codec       ``diff()`` loop        ``patch_sizes()``       average patch
==========  =====================  ======================  ==========================
bsdiff4     340-510 us             320-430 us              (229 B)
zstd-dict   27-30 us               26-30 us                479 B (95 B)
xor-zstd    17-20 us               16-19 us                540 B (154 B)
==========  =====================  ======================  ==========================

``diff()`` then ``apply()``: bsdiff4 450-510 us, zstd-dict 32 us, xor-zstd 20-21 us per pair.
99.9 % (zstd-dict) and 99.6 % (xor-zstd) of these pairs patch under 2 KiB.  On the 64 pages of
fixtures/alpha.elf that differ from a reference in one byte, zstd-dict patches are at most 23
bytes, xor-zstd at most 24, bsdiff4 at most 149.

zstd-dict builds a new compressor per pair (python-zstandard cannot swap the dictionary of a
context): about 6 us of it is creating the context.  Precomputing the dictionary
(``ZstdCompressionDict.precompute_compress(level=1)``) measured slower here, 42 us per pair
against 30 us, with the same output: it builds tables for any input size, while loading the raw
dictionary into the context sizes them for one page; explicit small parameters (8 KiB window)
were no faster either.  xor-zstd reuses one context; its batch XORs the pairs in numpy, a chunk at
a time, and gives identical pairs the size of the encoded zero page without compressing.  An
XOR-then-run-length codec was tried and dropped: sized in numpy it cost about 70 us per pair and
its patches were twice xor-zstd's (median 1,315 B against 603 B).
"""

from __future__ import annotations

import bz2
import struct

import bsdiff4
import numpy as np
import numpy.typing as npt
import zstandard

from dengine_cli.codecs.base import (
    CodecError,
    PageArray,
    PageLike,
    PatchCodec,
    SizeArray,
    page_bytes,
)
from dengine_cli.codecs.compression import ZstdContexts, zstd_page, zstd_sizes
from dengine_cli.pages import PAGE_SIZE

#: BSDIFF40 header: magic, length of the bzip2 control section, length of the bzip2 diff section,
#: size of the new file; the bzip2 extra section runs to the end.  Integers are 64-bit
#: sign-magnitude little-endian ("offtin" in bsdiff's bspatch.c).  Colin Percival, bsdiff 4.3.
BSDIFF_MAGIC = b"BSDIFF40"
BSDIFF_HEADER = struct.Struct("<8sQQQ")
#: One control entry: x bytes of diff (added to the reference), y bytes of extra (copied), then
#: the reference position moves by z; three offtin integers.
BSDIFF_CONTROL_ENTRY = 24
_SIGN = 1 << 63

#: Pairs XORed at once by the xor-zstd batch: bounds its scratch memory to 4 MiB.
XOR_CHUNK_PAGES = 1024


def _offtin(value: int) -> int:
    return -(value & ~_SIGN) if value & _SIGN else value


class Bsdiff4Patch(PatchCodec):
    """``bsdiff4``: a BSDIFF40 patch made by the ``bsdiff4`` package."""

    #: bsdiff4.diff keeps the GIL (measured: two threads no faster than one).
    releases_gil = False

    def __init__(self, codec_id: int) -> None:
        self.id = codec_id
        self.name = "bsdiff4"

    def diff(self, ref: PageLike, page: PageLike) -> bytes:
        patch: bytes = bsdiff4.diff(bytes(page_bytes(ref, "ref")), bytes(page_bytes(page)))
        return patch

    def apply(self, ref: PageLike, patch: bytes) -> bytes:
        old = np.frombuffer(page_bytes(ref, "ref"), dtype=np.uint8)
        control, diff, extra = self._sections(patch)
        new = np.empty(PAGE_SIZE, dtype=np.uint8)
        new_pos = old_pos = diff_pos = extra_pos = 0
        for x, y, z in control:
            if x < 0 or y < 0 or new_pos + x + y > PAGE_SIZE:
                raise CodecError(self.name, f"control entry ({x}, {y}, {z}) runs outside the page")
            if diff_pos + x > len(diff) or extra_pos + y > len(extra):
                raise CodecError(self.name, f"control entry ({x}, {y}, {z}) runs past its section")
            # The diff bytes are added to the reference bytes at old_pos..; where that window
            # leaves the reference, bspatch adds nothing.
            new[new_pos : new_pos + x] = diff[diff_pos : diff_pos + x]
            lo, hi = max(old_pos, 0), min(old_pos + x, PAGE_SIZE)
            if lo < hi:
                into = new[new_pos + lo - old_pos : new_pos + hi - old_pos]
                np.add(into, old[lo:hi], out=into)
            new_pos += x
            diff_pos += x
            new[new_pos : new_pos + y] = extra[extra_pos : extra_pos + y]
            new_pos += y
            extra_pos += y
            old_pos += x + z
        if new_pos != PAGE_SIZE or diff_pos != len(diff) or extra_pos != len(extra):
            raise CodecError(
                self.name,
                f"control entries make {new_pos} bytes and use {diff_pos} of {len(diff)} diff and "
                f"{extra_pos} of {len(extra)} extra bytes, expected {PAGE_SIZE} and all",
            )
        return new.tobytes()

    def _sections(self, patch: bytes) -> tuple[list[tuple[int, int, int]], PageArray, PageArray]:
        """The control entries, diff bytes and extra bytes of a BSDIFF40 patch, each section
        checked and decoded to at most the size a page allows."""
        if len(patch) < BSDIFF_HEADER.size:
            raise CodecError(self.name, f"patch of {len(patch)} bytes is shorter than its header")
        magic, raw_control_len, raw_diff_len, raw_new_size = BSDIFF_HEADER.unpack_from(patch)
        if magic != BSDIFF_MAGIC:
            raise CodecError(self.name, f"bad magic {magic!r}, expected {BSDIFF_MAGIC!r}")
        control_len, diff_len = _offtin(raw_control_len), _offtin(raw_diff_len)
        new_size = _offtin(raw_new_size)
        if new_size != PAGE_SIZE:
            raise CodecError(self.name, f"patch makes {new_size} bytes, expected {PAGE_SIZE}")
        body = len(patch) - BSDIFF_HEADER.size
        if control_len < 0 or diff_len < 0 or control_len + diff_len > body:
            raise CodecError(
                self.name, f"sections of {control_len} and {diff_len} bytes overrun a {body}-byte body"
            )
        start = BSDIFF_HEADER.size
        # Every entry but the last moves at least one byte in practice; allow one empty entry per
        # byte plus one, which still bounds a hostile section to 100 KiB.
        control_bytes = self._bunzip(patch[start : start + control_len], "control", 24 * (PAGE_SIZE + 1))
        start += control_len
        diff = self._bunzip(patch[start : start + diff_len], "diff", PAGE_SIZE)
        extra = self._bunzip(patch[start + diff_len :], "extra", PAGE_SIZE)
        if len(control_bytes) % BSDIFF_CONTROL_ENTRY:
            raise CodecError(self.name, f"control section of {len(control_bytes)} bytes is not whole entries")
        words = [_offtin(v) for v in np.frombuffer(control_bytes, dtype="<u8").tolist()]
        control = list(zip(words[0::3], words[1::3], words[2::3], strict=True))
        return (
            control,
            np.frombuffer(diff, dtype=np.uint8),
            np.frombuffer(extra, dtype=np.uint8),
        )

    def _bunzip(self, data: bytes, section: str, most: int) -> bytes:
        decoder = bz2.BZ2Decompressor()
        try:
            out = decoder.decompress(data, most + 1)
        except (OSError, EOFError, ValueError) as e:
            raise CodecError(self.name, f"{section} section: {e}") from None
        if len(out) > most:
            raise CodecError(self.name, f"{section} section decodes to more than {most} bytes")
        if not decoder.eof:
            raise CodecError(self.name, f"{section} section: bzip2 stream is truncated")
        if decoder.unused_data:
            raise CodecError(self.name, f"{section} section: {len(decoder.unused_data)} bytes after bzip2")
        return out


class ZstdDictPatch(PatchCodec):
    """``zstd-dict``: zstd level 1 with the reference page as a raw-content dictionary."""

    LEVEL = 1

    def __init__(self, codec_id: int) -> None:
        self.id = codec_id
        self.name = "zstd-dict"

    def diff(self, ref: PageLike, page: PageLike) -> bytes:
        compressor = zstandard.ZstdCompressor(
            level=self.LEVEL, dict_data=_raw_dictionary(ref), write_dict_id=False
        )
        return compressor.compress(page_bytes(page))

    def apply(self, ref: PageLike, patch: bytes) -> bytes:
        decompressor = zstandard.ZstdDecompressor(dict_data=_raw_dictionary(ref))
        return zstd_page(decompressor, self.name, patch)


def _raw_dictionary(ref: PageLike) -> zstandard.ZstdCompressionDict:
    return zstandard.ZstdCompressionDict(page_bytes(ref, "ref"), dict_type=zstandard.DICT_TYPE_RAWCONTENT)


class XorZstdPatch(PatchCodec):
    """``xor-zstd``: zstd level 1 of the page XOR the reference page."""

    LEVEL = 1

    def __init__(self, codec_id: int) -> None:
        self.id = codec_id
        self.name = "xor-zstd"
        self._contexts = ZstdContexts(self.LEVEL)

    @property
    def _compressor(self) -> zstandard.ZstdCompressor:
        return self._contexts.compressor

    @property
    def _decompressor(self) -> zstandard.ZstdDecompressor:
        return self._contexts.decompressor

    def diff(self, ref: PageLike, page: PageLike) -> bytes:
        xor = np.bitwise_xor(_page_array(ref, "ref"), _page_array(page, "page"))
        return self._compressor.compress(xor.data)

    def apply(self, ref: PageLike, patch: bytes) -> bytes:
        xor = np.frombuffer(zstd_page(self._decompressor, self.name, patch), dtype=np.uint8)
        return np.bitwise_xor(_page_array(ref, "ref"), xor).tobytes()

    def _patch_sizes(self, refs: PageArray, pages: PageArray) -> SizeArray:
        # The XORs of a chunk compressed in one call (:func:`zstd_sizes`).  Two equal pages need
        # no special case: their XOR compresses to the encoded zero page like any other, and
        # pairs of the plan are never equal (equal pages are shared).
        sizes = np.empty(len(refs), dtype=np.int32)
        compressor = self._compressor
        for lo in range(0, len(refs), XOR_CHUNK_PAGES):
            hi = min(lo + XOR_CHUNK_PAGES, len(refs))
            sizes[lo:hi] = zstd_sizes(compressor, np.bitwise_xor(refs[lo:hi], pages[lo:hi]))
        return sizes


def _page_array(page: PageLike, what: str) -> npt.NDArray[np.uint8]:
    return np.frombuffer(page_bytes(page, what), dtype=np.uint8)
