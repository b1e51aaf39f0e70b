"""The store's layout, version 1 (``dengine.store/1``): the files, the pack format, the catalog
tables and the encoding of the columnar arrays in it.  Every fact of the format is here.

A store is a directory::

    STORE/catalog.sqlite        the catalog: what the store holds; the store is what it says
    STORE/packs/RUN-NNNNNN.pack page data: append-only while one apply writes it, never changed after
    STORE/apply.lock            held (flock, exclusive) by the apply writing the store
    STORE/lock                  exclusive while an apply commits and removes old packs; shared
                                while a reader opens the catalog and its packs

Pack file: a 32-byte header (``PACK_HEADER``: magic ``DENGPACK``, format version, the apply's
run id) and then blobs back to back, each located by the catalog alone (no per-blob framing:
every blob's bytes are page data, and the plan's sizes are exactly the blobs').

Catalog (SQLite, ``application_id`` = :data:`APPLICATION_ID`, ``user_version`` = 1):

* ``meta(key, value)``: ``format`` = ``dengine.store/1``, ``run``, ``created``, ``dengine``
  (version), ``plan`` (the plan file's head as JSON: policy, figures), ``packed`` (0/1),
  ``page_checksum``, ``image_checksum``;
* ``vm``: one row per VM: number, name, dump identity, guest facts (JSON), pages present, zero
  pages, present ranges (a ``RANGES`` blob), image checksum, and the bytes it takes (JSON);
* ``pack``: file name (under ``packs/``), size and xxh3-128 of each pack as written;
* ``frame`` (packed stores): pack, offset, length, pages, codec (:mod:`~dengine_cli.store.frames`;
  ``stored``: the pages as they are)
  and xxh3-64 of each frame;
* ``chunk(tab, vm, seq, first, count, data, checksum)``: the columnar arrays, a chunk of
  :data:`CHUNK_ROWS` rows at a time: ``tab = 'objects'`` (``vm`` = -1) and ``tab = 'pages'``
  (one VM's page map).  ``data`` is one zstd frame of the columns (:data:`OBJECT_COLUMNS`,
  :data:`PAGE_COLUMNS`) one after the other, integer columns stored as differences from the row
  before (``DELTA_COLUMNS``: gfns and object numbers mostly step by one, so they compress to
  almost nothing); ``checksum`` is the xxh3-64 of the decoded columns.

An *object* is one stored page content: its codec (:data:`WHOLE`, a compression or patch codec
id of :mod:`dengine_cli.codecs`, :data:`FRAMED` or :data:`FRAMED_XOR`), where it is (a pack, or
a frame), its offset
(bytes in the pack, or the page slot in the frame), its length, its reference object (patches),
and the xxh3-64 of the page it decodes to.  A VM's page map lists its non-zero pages: gfn and
object.  Zero pages are the present ranges' pages that the map does not list.

Checksums: every object's page (xxh3-64), every frame's stored bytes (xxh3-64), every pack as
written (xxh3-128), every catalog chunk (xxh3-64), and per VM the *image checksum*: xxh3-128 of
the little-endian ``(gfn, page checksum)`` u64 pairs of every present page in gfn order (zero
pages with the checksum of the zero page).  A restore recomputes each page's checksum from the
bytes it decoded and the image checksum from those: a page decoded wrong, a page map pointing at
the wrong object, a page lost or added all change it.
"""

from __future__ import annotations

import struct

import numpy as np
import xxhash

from dengine_cli.pages import PAGE_SIZE

FORMAT = "dengine.store/1"
CATALOG = "catalog.sqlite"
PACKS = "packs"
APPLY_LOCK = "apply.lock"
LOCK = "lock"
PACK_SUFFIX = ".pack"
#: SQLite ``PRAGMA application_id`` of a catalog: "dEnG".
APPLICATION_ID = 0x64456E47
USER_VERSION = 1

#: magic, format version, reserved, run id (16 bytes).
PACK_HEADER = struct.Struct("<8sII16s")
PACK_MAGIC = b"DENGPACK"
PACK_VERSION = 1
#: A pack is closed and the next one started past this size.
PACK_LIMIT = 1 << 30

#: Object codec ids besides the codecs' own (:mod:`dengine_cli.codecs`): 0x00 the page stored
#: whole (4096 bytes in a pack), 0xF0 the page is a slot of a frame, 0xF1 the page XOR its
#: reference object's page is a slot of a frame.
WHOLE = 0x00
FRAMED = 0xF0
FRAMED_XOR = 0xF1

#: Rows per catalog chunk.
CHUNK_ROWS = 1 << 16

OBJECT_COLUMNS: tuple[tuple[str, str], ...] = (
    ("codec", "<u1"),
    ("where", "<u4"),
    ("offset", "<u8"),
    ("length", "<u4"),
    ("reference", "<i8"),
    ("checksum", "<u8"),
)
PAGE_COLUMNS: tuple[tuple[str, str], ...] = (("gfn", "<u8"), ("object", "<i8"))
DELTA_COLUMNS = frozenset({"gfn", "object", "offset", "reference"})

#: The present ranges of a VM: (first gfn, page count) u64 pairs.
RANGES = np.dtype("<u8")

PAGE_CHECKSUM = "xxh3_64"
IMAGE_CHECKSUM = "xxh3_128 of (gfn, page xxh3_64) u64 LE pairs"
ZERO_PAGE_CHECKSUM = xxhash.xxh3_64_intdigest(bytes(PAGE_SIZE))

SCHEMA_SQL = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE vm (
    vm INTEGER PRIMARY KEY, name TEXT NOT NULL, dump TEXT NOT NULL, facts TEXT NOT NULL,
    pages INTEGER NOT NULL, zero_pages INTEGER NOT NULL, ranges BLOB NOT NULL,
    image_checksum TEXT NOT NULL, bytes TEXT NOT NULL
);
CREATE TABLE pack (pack INTEGER PRIMARY KEY, file TEXT NOT NULL UNIQUE, size INTEGER NOT NULL,
                   checksum TEXT NOT NULL);
CREATE TABLE frame (
    frame INTEGER PRIMARY KEY, pack INTEGER NOT NULL REFERENCES pack, "offset" INTEGER NOT NULL,
    length INTEGER NOT NULL, pages INTEGER NOT NULL, codec TEXT NOT NULL, checksum INTEGER NOT NULL
);
CREATE TABLE chunk (
    tab TEXT NOT NULL, vm INTEGER NOT NULL, seq INTEGER NOT NULL, first INTEGER NOT NULL,
    count INTEGER NOT NULL, data BLOB NOT NULL, checksum INTEGER NOT NULL,
    PRIMARY KEY (tab, vm, seq)
);
"""


def signed(value: int) -> int:
    """A u64 checksum as the signed 64-bit integer SQLite stores."""
    return value - (1 << 64) if value >= 1 << 63 else value


def unsigned(value: int) -> int:
    """The u64 checksum of a signed 64-bit integer SQLite gave back."""
    return value + (1 << 64) if value < 0 else value
