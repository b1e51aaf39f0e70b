"""What every page codec is: the base classes, the error a bad blob raises, the array types."""

from __future__ import annotations

from abc import ABC, abstractmethod
from functools import cached_property

import numpy as np
import numpy.typing as npt

from dengine_cli.pages import PAGE_SIZE

#: Anything holding one page: a bytes-like object or a row of a page array.
PageLike = bytes | bytearray | memoryview | npt.NDArray[np.uint8]
PageArray = npt.NDArray[np.uint8]
SizeArray = npt.NDArray[np.int32]


class CodecError(ValueError):
    """A blob or patch that does not decode to a 4096-byte page: corrupt, truncated, or made by
    another codec.  Names the codec and what went wrong."""

    def __init__(self, codec: str, problem: str) -> None:
        super().__init__(f"{codec}: cannot decode: {problem}")
        self.codec = codec
        self.problem = problem


def page_bytes(page: PageLike, what: str = "page") -> memoryview:
    """``page`` as a flat byte view, checked to be exactly one page (a caller's bug otherwise)."""
    view = page.data if isinstance(page, np.ndarray) else memoryview(page)
    if view.nbytes != PAGE_SIZE or view.ndim != 1 or view.itemsize != 1 or not view.c_contiguous:
        raise ValueError(
            f"{what} must be {PAGE_SIZE} contiguous bytes, got {view.nbytes} in shape {view.shape}"
        )
    return view


def page_rows(pages: npt.NDArray[np.uint8], what: str = "pages") -> PageArray:
    """``pages`` checked to be an ``(n, 4096)`` uint8 array with contiguous rows."""
    if pages.dtype != np.uint8 or pages.ndim != 2 or pages.shape[1] != PAGE_SIZE:
        raise ValueError(f"{what} must be an (n, {PAGE_SIZE}) uint8 array, got {pages.dtype} {pages.shape}")
    if pages.strides[1] != 1:
        pages = np.ascontiguousarray(pages)
    return pages


def zero_rows(pages: PageArray) -> npt.NDArray[np.bool_]:
    """Which rows of ``pages`` are all zero (a vectorized check: the largest word of each row is
    zero; ``max`` runs 21 GB/s here where ``any``, which makes booleans first, runs 14)."""
    words = pages.view(np.uint64) if pages.flags.c_contiguous else pages
    found: npt.NDArray[np.bool_] = np.asarray(words.max(axis=1)) == 0
    return found


class CompressionCodec(ABC):
    """A codec that stores one page on its own.  Every codec may be used by several threads at
    once (codecs with state keep it per thread)."""

    #: The name users give, with the parameters in it (``zstd-3``).
    name: str
    #: The one-byte id a store records with each page.
    id: int
    #: Whether encoding a page lets go of the GIL (so that threads measure pages in parallel).
    releases_gil: bool = True

    @abstractmethod
    def compress(self, page: PageLike) -> bytes:
        """The encoded page."""

    @abstractmethod
    def decompress(self, blob: bytes) -> bytes:
        """The 4096-byte page ``blob`` encodes; :class:`CodecError` when it does not decode to
        exactly one page."""

    def compressed_sizes(self, pages: npt.NDArray[np.uint8]) -> SizeArray:
        """``len(compress(page))`` for each row of an ``(n, 4096)`` page array, exactly.

        Zero pages (most of a guest's memory) are found in one vectorized pass and get the size of
        the encoded zero page without being compressed again."""
        pages = page_rows(pages)
        sizes = np.empty(len(pages), dtype=np.int32)
        zero = zero_rows(pages)
        if not zero.any():  # the plan's pages, which are never zero: no copy of the rows
            sizes[:] = self._sizes(pages)
            return sizes
        sizes[zero] = self._zero_size
        sizes[~zero] = self._sizes(pages[~zero])
        return sizes

    def _sizes(self, rows: PageArray) -> SizeArray:
        """``len(compress(row))`` of each row (none of them zero); codecs override it when they
        can encode a batch with less Python around each page."""
        return np.fromiter(map(self._size, rows), dtype=np.int32, count=len(rows))

    def _size(self, page: PageArray) -> int:
        """``len(compress(page))`` for one row; codecs override it when they can skip building the
        bytes object."""
        return len(self.compress(page))

    @cached_property
    def _zero_size(self) -> int:
        return self._size(np.zeros(PAGE_SIZE, dtype=np.uint8))

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name} id={self.id:#04x}>"


class PatchCodec(ABC):
    """A codec that stores a page as a patch against a reference page (usable by several
    threads at once, as compression codecs are)."""

    name: str
    id: int
    #: Whether making a patch lets go of the GIL (so that threads measure pages in parallel).
    releases_gil: bool = True

    @abstractmethod
    def diff(self, ref: PageLike, page: PageLike) -> bytes:
        """The patch that turns ``ref`` into ``page``."""

    @abstractmethod
    def apply(self, ref: PageLike, patch: bytes) -> bytes:
        """The 4096-byte page ``patch`` makes from ``ref``; :class:`CodecError` when it does not
        make exactly one page."""

    def patch_sizes(
        self, refs: npt.NDArray[np.uint8], pages: npt.NDArray[np.uint8], limit: int | None = None
    ) -> SizeArray:
        """``len(diff(refs[i], pages[i]))`` for each row pair, exactly.

        ``limit``: the caller only needs to know which patches are under ``limit`` bytes.  Sizes
        under it are still exact; the others are reported as ``limit``.  None of the codecs here
        has a sound cheap lower bound on its output (an LZ77 or bzip2 coder can shrink any input
        that repeats), so every pair is still encoded: the limit saves no work today and only makes
        the contract explicit for codecs that can skip.
        """
        refs = page_rows(refs, "refs")
        pages = page_rows(pages)
        if refs.shape != pages.shape:
            raise ValueError(f"refs {refs.shape} and pages {pages.shape} differ in shape")
        sizes = self._patch_sizes(refs, pages)
        if limit is not None:
            np.minimum(sizes, limit, out=sizes)
        return sizes

    def _patch_sizes(self, refs: PageArray, pages: PageArray) -> SizeArray:
        return np.fromiter(map(len, map(self.diff, refs, pages)), dtype=np.int32, count=len(refs))

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name} id={self.id:#04x}>"
