"""LZO1X compression by liblzo2 itself (Debian's ``liblzo2-2``, which ``lzop`` depends on),
called through ctypes: what makedumpfile and QEMU link against to write kdump-lzo pages
(``lzo1x_1_compress``; makedumpfile ``write_kdump_pages``, QEMU ``dump/dump.c``).  Tests make
their LZO data with the real library, so that dengine's decoder (``lzallright``, a separate
implementation) is checked against it rather than against itself.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools

#: Work memory of lzo1x_1_compress (LZO1X_1_MEM_COMPRESS = 16384 pointers) and of
#: lzo1x_999_compress (LZO1X_999_MEM_COMPRESS = 14 * 16384 shorts; four times that here).
MEM_1 = 16384 * 8
MEM_999 = 14 * 16384 * 8


@functools.cache
def _lib() -> ctypes.CDLL:
    name = ctypes.util.find_library("lzo2")
    if name is None:
        raise RuntimeError("liblzo2 is not installed (Debian: apt-get install liblzo2-2)")
    return ctypes.CDLL(name)


def compress(data: bytes, level: int = 1) -> bytes:
    """``data`` compressed as one LZO1X block: ``lzo1x_1_compress`` (level 1, what the dump
    writers use) or ``lzo1x_999_compress`` (level 9, ``lzop -9``)."""
    lib = _lib()
    work = ctypes.create_string_buffer(MEM_999 if level == 9 else MEM_1)
    out = ctypes.create_string_buffer(len(data) + len(data) // 16 + 64 + 3)
    size = ctypes.c_size_t(len(out))
    function = lib.lzo1x_999_compress if level == 9 else lib.lzo1x_1_compress
    rc = function(data, ctypes.c_size_t(len(data)), out, ctypes.byref(size), work)
    if rc != 0:
        raise RuntimeError(f"liblzo2 returned {rc}")
    return out.raw[: size.value]
