"""Page codecs: how a guest page can be stored smaller, and exactly how many bytes that takes.

The Difference Engine stores a page that is not shared either as a **patch** against a similar
reference page, **compressed** on its own, or whole.  To choose, the engine needs the exact size each
codec produces for each page, and proof that each encoding decodes back; this package gives both.

Codecs are looked up by name in two tables (as borg's compressors are), each with a unique one-byte
id that a store can keep with a page to say how it is encoded; the name carries the parameters:

====  ============  =====================================================================
id    name          encoding
====  ============  =====================================================================
0x00                (reserved: the page stored whole, 4096 bytes)
0x01  zstd-1        one zstd frame, level 1
0x02  zstd-3        one zstd frame, level 3
0x03  zstd-19       one zstd frame, level 19
0x04  zlib-1        one zlib stream (RFC 1950), level 1
0x05  zlib-6        one zlib stream, level 6
0x06  lz4           one raw LZ4 block, no frame and no stored size
0x41  bsdiff4       a BSDIFF40 patch (Colin Percival's bsdiff, bzip2 sections)
0x42  zstd-dict     one zstd frame, level 1, with the reference page as a raw-content dictionary
0x43  xor-zstd      one zstd frame, level 1, of the page XOR the reference page
====  ============  =====================================================================

Sizes are ``len()`` of the real encoded blob, including the framing the codec needs to decode it
(zstd frame header with the content size, zlib header and Adler-32), and not the id byte: the
store decides how it records which codec encoded a page.  Every page is 4096 bytes, so an encoding
never needs to store the page size (LZ4 raw blocks do not).

Codec objects keep compressor contexts between calls (that is most of their speed), so one
object must not be used by two threads at once; processes each get their own.

Measured costs are in :mod:`dengine_cli.codecs.compression` and :mod:`dengine_cli.codecs.patch`.
"""

from __future__ import annotations

from dengine_cli.codecs.base import CodecError, CompressionCodec, PatchCodec
from dengine_cli.codecs.compression import Lz4Codec, ZlibCodec, ZstdCodec
from dengine_cli.codecs.patch import Bsdiff4Patch, XorZstdPatch, ZstdDictPatch

#: Every compression codec, in the order they are listed to users.
COMPRESSION_CODECS: tuple[CompressionCodec, ...] = (
    ZstdCodec(0x01, level=1),
    ZstdCodec(0x02, level=3),
    ZstdCodec(0x03, level=19),
    ZlibCodec(0x04, level=1),
    ZlibCodec(0x05, level=6),
    Lz4Codec(0x06),
)

#: Every patch codec, in the order they are listed to users.
PATCH_CODECS: tuple[PatchCodec, ...] = (
    Bsdiff4Patch(0x41),
    ZstdDictPatch(0x42),
    XorZstdPatch(0x43),
)

_BY_NAME_COMPRESSION = {codec.name: codec for codec in COMPRESSION_CODECS}
_BY_NAME_PATCH = {codec.name: codec for codec in PATCH_CODECS}
_ALL: tuple[CompressionCodec | PatchCodec, ...] = (*COMPRESSION_CODECS, *PATCH_CODECS)
_BY_ID = {codec.id: codec for codec in _ALL}


class UnknownCodec(LookupError):
    """A codec name neither table knows; the message lists the known names."""


def compression_codec(name: str) -> CompressionCodec:
    """The compression codec called ``name``; :class:`UnknownCodec` listing the known names."""
    try:
        return _BY_NAME_COMPRESSION[name]
    except KeyError:
        known = ", ".join(_BY_NAME_COMPRESSION)
        raise UnknownCodec(f"unknown compression codec {name!r}: known codecs are {known}") from None


def patch_codec(name: str) -> PatchCodec:
    """The patch codec called ``name``; :class:`UnknownCodec` listing the known names."""
    try:
        return _BY_NAME_PATCH[name]
    except KeyError:
        known = ", ".join(_BY_NAME_PATCH)
        raise UnknownCodec(f"unknown patch codec {name!r}: known codecs are {known}") from None


def codec_by_id(codec_id: int) -> CompressionCodec | PatchCodec:
    """The codec a store recorded as ``codec_id``; :class:`KeyError` when there is none."""
    return _BY_ID[codec_id]


__all__ = [
    "COMPRESSION_CODECS",
    "PATCH_CODECS",
    "CodecError",
    "CompressionCodec",
    "PatchCodec",
    "UnknownCodec",
    "codec_by_id",
    "compression_codec",
    "patch_codec",
]
