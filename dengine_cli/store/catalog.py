"""The catalog: writing a new one (once, whole, by an apply) and reading one back, checked.

A catalog is written into a temporary file beside ``catalog.sqlite`` with SQLite's journal off
(nothing else sees the file until it is complete), closed, fsync'ed and renamed into place: the
rename is the commit of the whole apply.  It is read with ``immutable=1``: a catalog never changes
once it has its name, so readers take no SQLite locks and see one consistent store.
"""

from __future__ import annotations

import json
import os
import re
import sqlite3
import stat
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import numpy as np
import numpy.typing as npt
import xxhash
import zstandard

from dengine_cli.errors import StoreDamaged, UnreadableFile
from dengine_cli.store.layout import (
    APPLICATION_ID,
    CATALOG,
    CHUNK_ROWS,
    DELTA_COLUMNS,
    FORMAT,
    PACK_SUFFIX,
    PACKS,
    RANGES,
    SCHEMA_SQL,
    USER_VERSION,
    signed,
    unsigned,
)

Columns = dict[str, npt.NDArray[Any]]
#: A frame: number, pack, offset, length, pages, codec name, xxh3-64 of its bytes.
FrameRow = tuple[int, int, int, int, int, str, int]
#: The name of a pack (PackWriter's: the run id in hex, a dash, a six-digit number, ``.pack``).
_PACK_NAME = re.compile(r"[0-9a-f]{32}-[0-9]{6}" + re.escape(PACK_SUFFIX))
#: zstd level of catalog chunks (metadata: small, read whole).
CHUNK_LEVEL = 9


def _json_object(text: Any) -> dict[str, Any]:
    """A catalog field holding a JSON object; ``ValueError`` when it does not (a damaged row)."""
    if not isinstance(text, str):
        raise ValueError(f"expected JSON text, found {type(text).__name__}")
    value = json.loads(text)
    if not isinstance(value, dict):
        raise ValueError(f"expected a JSON object, found {type(value).__name__}")
    return value


def _integer(value: Any) -> int:
    """A catalog field holding an integer; ``ValueError`` when it does not."""
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValueError(f"expected an integer, found {value!r}")
    return value


def encode_columns(
    columns: Mapping[str, npt.NDArray[Any]], layout: Sequence[tuple[str, str]]
) -> tuple[bytes, int]:
    """One chunk's blob (a zstd frame) and the xxh3-64 of its plain columns."""
    plain = [np.ascontiguousarray(columns[name], dtype=dtype) for name, dtype in layout]
    hasher = xxhash.xxh3_64()
    parts = []
    for (name, _), col in zip(layout, plain, strict=True):
        hasher.update(col.tobytes())
        if name in DELTA_COLUMNS and len(col):
            col = np.diff(col, prepend=col.dtype.type(0))
        parts.append(col.tobytes())
    return zstandard.ZstdCompressor(level=CHUNK_LEVEL).compress(b"".join(parts)), hasher.intdigest()


def decode_columns(data: bytes, count: int, layout: Sequence[tuple[str, str]]) -> tuple[Columns, int]:
    """The plain columns of a chunk blob and the xxh3-64 they hash to; ``ValueError`` when the
    blob does not decode to ``count`` rows."""
    width = sum(np.dtype(dtype).itemsize for _, dtype in layout)
    raw = zstandard.ZstdDecompressor().decompress(data, max_output_size=width * count)
    if len(raw) != width * count:
        raise ValueError(f"decodes to {len(raw)} bytes, expected {width * count}")
    out: Columns = {}
    hasher = xxhash.xxh3_64()
    at = 0
    for name, dtype in layout:
        size = np.dtype(dtype).itemsize * count
        col = np.frombuffer(raw, dtype=dtype, count=count, offset=at)
        if name in DELTA_COLUMNS:
            col = np.cumsum(col, dtype=col.dtype)
        out[name] = col
        hasher.update(col.tobytes())
        at += size
    return out, hasher.intdigest()


class CatalogWriter:
    """A new catalog at ``path`` (a temporary name; :meth:`close` makes it durable)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._db = sqlite3.connect(path, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=OFF")
        self._db.execute("PRAGMA synchronous=OFF")
        self._db.execute(f"PRAGMA application_id={APPLICATION_ID}")
        self._db.execute(f"PRAGMA user_version={USER_VERSION}")
        self._db.executescript(SCHEMA_SQL)
        self._db.execute("BEGIN")

    def meta(self, items: Mapping[str, Any]) -> None:
        rows = [(k, v if isinstance(v, str) else json.dumps(v)) for k, v in items.items()]
        self._db.executemany("INSERT OR REPLACE INTO meta VALUES (?, ?)", rows)

    def vm(self, row: VmRow) -> None:
        self._db.execute(
            "INSERT INTO vm VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                row.vm, row.name, json.dumps(row.dump), json.dumps(row.facts), row.pages, row.zero_pages,
                np.asarray(row.ranges, dtype=RANGES).tobytes(), row.image_checksum, json.dumps(row.bytes),
            ),
        )  # fmt: skip

    def pack(self, pack: int, file: str, size: int, checksum: str) -> None:
        self._db.execute("INSERT INTO pack VALUES (?, ?, ?, ?)", (pack, file, size, checksum))

    def frames(self, rows: Sequence[FrameRow]) -> None:
        """``(frame, pack, offset, length, pages, codec, checksum)`` rows."""
        fixed = [(*r[:6], signed(r[6])) for r in rows]
        self._db.executemany("INSERT INTO frame VALUES (?, ?, ?, ?, ?, ?, ?)", fixed)

    def columns(
        self, tab: str, vm: int, columns: Mapping[str, npt.NDArray[Any]], layout: Sequence[tuple[str, str]]
    ) -> None:
        """Columnar rows, :data:`CHUNK_ROWS` per chunk."""
        n = len(next(iter(columns.values()))) if columns else 0
        for seq, lo in enumerate(range(0, n, CHUNK_ROWS)):
            hi = min(lo + CHUNK_ROWS, n)
            blob, checksum = encode_columns({k: c[lo:hi] for k, c in columns.items()}, layout)
            self._db.execute(
                "INSERT INTO chunk VALUES (?, ?, ?, ?, ?, ?, ?)",
                (tab, vm, seq, lo, hi - lo, blob, signed(checksum)),
            )

    def close(self) -> None:
        """Commit, close and fsync the file."""
        self._db.execute("COMMIT")
        self._db.close()
        fd = os.open(self.path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def abandon(self) -> None:
        self._db.close()


@dataclass(frozen=True)
class VmRow:
    """One VM of a store: what the ``vm`` table says of it."""

    vm: int
    name: str
    dump: dict[str, Any]
    facts: dict[str, Any]
    pages: int
    zero_pages: int
    ranges: npt.NDArray[np.uint64]
    image_checksum: str
    bytes: dict[str, Any]

    @property
    def present_count(self) -> int:
        """The pages its present ranges hold."""
        return int(self.ranges[1::2].sum())

    @property
    def present_gfns(self) -> npt.NDArray[np.uint64]:
        """Every present gfn, ascending (from the ranges)."""
        r = self.ranges.reshape(-1, 2)
        if not len(r):
            return np.zeros(0, dtype=np.uint64)
        counts = r[:, 1].astype(np.int64)
        starts = np.repeat(r[:, 0].astype(np.int64) - np.concatenate(([0], np.cumsum(counts)[:-1])), counts)
        return (starts + np.arange(int(counts.sum()), dtype=np.int64)).astype(np.uint64)


@dataclass(frozen=True)
class PackRow:
    pack: int
    file: str
    size: int
    checksum: str


class Catalog:
    """The catalog of the store at ``store``, opened read-only.  :class:`UnreadableFile` (exit 3)
    when there is no catalog (no store, or an apply that never completed); :class:`StoreDamaged`
    when it is not a dengine catalog or a part of it fails its checksum."""

    def __init__(self, store: Path) -> None:
        self.store = store
        path = store / CATALOG
        try:
            regular = stat.S_ISREG(os.stat(path).st_mode)
        except PermissionError as e:  # a store in a folder this user cannot search
            raise UnreadableFile(store, e.strerror or str(e)) from None
        except OSError:
            regular = False
        if not regular:
            if not os.path.exists(store):
                raise UnreadableFile(store, "no such store")
            if not os.path.isdir(store):
                raise UnreadableFile(store, "is a file, not a store (the directory 'dengine apply' writes)")
            raise UnreadableFile(store, f"not a complete dengine store (no {CATALOG})")
        try:
            self._db = sqlite3.connect(f"file:{quote(str(path.resolve()))}?mode=ro&immutable=1", uri=True)
            self._check_header()
            self.meta = dict(self._db.execute("SELECT key, value FROM meta").fetchall())
            if self.meta.get("format") != FORMAT:
                raise StoreDamaged(store, f"{CATALOG}: format {self.meta.get('format')!r} is not {FORMAT!r}")
            self.vms = self._vms()
            self.row_damage = self._row_damage()
            self.packs = [self._pack(r) for r in self._db.execute("SELECT * FROM pack ORDER BY pack")]
        except sqlite3.DatabaseError as e:
            raise StoreDamaged(store, f"{CATALOG}: {e}") from None

    def _check_header(self) -> None:
        app = self._db.execute("PRAGMA application_id").fetchone()[0]
        version = self._db.execute("PRAGMA user_version").fetchone()[0]
        if app != APPLICATION_ID:
            raise StoreDamaged(self.store, f"{CATALOG} is not a dengine catalog (application id {app:#x})")
        if version != USER_VERSION:
            raise StoreDamaged(
                self.store, f"{CATALOG}: catalog version {version}, this dengine reads {USER_VERSION}"
            )

    def _vms(self) -> list[VmRow]:
        """The ``vm`` rows; :class:`StoreDamaged` naming the row whose fields do not decode (its
        JSON and ranges carry no checksum of their own: a flipped byte there is found here)."""
        rows = []
        for i, r in enumerate(self._db.execute("SELECT * FROM vm ORDER BY vm")):
            try:
                dump, facts, sizes = (_json_object(r[k]) for k in (2, 3, 8))
                rows.append(
                    VmRow(_integer(r[0]), str(r[1]), dump, facts, _integer(r[4]), _integer(r[5]),
                          np.frombuffer(r[6], dtype=RANGES).copy(), str(r[7]), sizes)
                )  # fmt: skip
            except (ValueError, TypeError, IndexError) as e:
                raise StoreDamaged(self.store, f"{CATALOG}: vm row {i} does not decode: {e}") from None
        return rows

    def _row_damage(self) -> list[str]:
        """What the ``vm`` rows say that they cannot (each naming a VM): a page count that is not
        their ranges', numbers that are not 0..n-1, a VM of the plan the store was applied from
        (its head, in ``meta``) with no row or another name.  Reported by ``verify``; a reader of
        a VM's page map refuses the store (:meth:`columns`): by number, or every VM, ``restore``
        would write another VM's image, or leave one out, without a word."""
        out = []
        for k, vm in enumerate(self.vms):
            if len(vm.ranges) % 2:
                out.append(f"VM {vm.name}: its present ranges do not decode ({len(vm.ranges)} numbers)")
            elif vm.pages != vm.present_count:
                out.append(
                    f"VM {vm.name}: its row says {vm.pages} pages present, its ranges hold {vm.present_count}"
                )
            if vm.vm != k:
                out.append(
                    f"VM {vm.name}: numbered {vm.vm} in row {k} of the vm table "
                    f"(VMs are numbered 0..{len(self.vms) - 1})"
                )
        try:
            planned = self.plan_head().get("vms")
        except StoreDamaged as e:
            return [*out, e.problem]
        if not isinstance(planned, list):
            return [*out, f"{CATALOG}: the plan's head lists no VMs"]
        names = [p.get("name") if isinstance(p, dict) else None for p in planned]
        rows = {vm.vm: vm for vm in self.vms}
        out += [f"VM {name}: VM {v} of the plan the store was applied from has no row in the catalog"
                for v, name in enumerate(names) if v not in rows]  # fmt: skip
        for v, vm in sorted(rows.items()):
            if not 0 <= v < len(names):
                out.append(f"VM {vm.name}: VM {v} is not a VM of the plan the store was applied from "
                           f"({len(names)} VMs)")  # fmt: skip
            elif names[v] != vm.name:
                out.append(f"VM {vm.name}: VM {v} of the plan the store was applied from is {names[v]!r}")
        return out

    def _pack(self, row: Sequence[Any]) -> PackRow:
        try:
            pack = PackRow(_integer(row[0]), str(row[1]), _integer(row[2]), str(row[3]))
        except (ValueError, TypeError, IndexError) as e:
            raise StoreDamaged(self.store, f"{CATALOG}: pack row {row[:1]} does not decode: {e}") from None
        # A pack is a file of packs/ named by the apply that wrote it: a name with a directory
        # in it (an absolute path, '..') would have a reader open a file outside the store.
        if not _PACK_NAME.fullmatch(pack.file):
            raise StoreDamaged(
                self.store, f"{CATALOG}: pack row {pack.pack} names {pack.file!r}, not a file of {PACKS}/"
            )
        return pack

    @property
    def packed(self) -> bool:
        return self.meta.get("packed") == "1"

    def plan_head(self) -> dict[str, Any]:
        try:
            return _json_object(self.meta.get("plan", "{}"))
        except (ValueError, TypeError) as e:
            raise StoreDamaged(self.store, f"{CATALOG}: the plan's head does not decode: {e}") from None

    def columns(
        self, tab: str, vm: int, layout: Sequence[tuple[str, str]], *, despite_rows: bool = False
    ) -> Columns:
        """Every chunk of ``tab`` (for ``vm``) decoded, checked and joined.  A VM's page map is
        refused (:class:`StoreDamaged`) while :attr:`row_damage` lists anything, unless
        ``despite_rows`` (``verify``, which reports it)."""
        if tab == "pages" and self.row_damage and not despite_rows:
            raise StoreDamaged(self.store, self.row_damage[0])
        parts: list[Columns] = []
        expect = 0
        try:
            rows = self._db.execute(
                "SELECT seq, first, count, data, checksum FROM chunk WHERE tab = ? AND vm = ? ORDER BY seq",
                (tab, vm),
            ).fetchall()
        except sqlite3.DatabaseError as e:
            raise StoreDamaged(self.store, f"{CATALOG}: {e}") from None
        for seq, first, count, data, checksum in rows:
            where = f"{CATALOG}: {tab} chunk {seq}" + (f" of VM {vm}" if vm >= 0 else "")
            if first != expect:
                raise StoreDamaged(self.store, f"{where}: starts at row {first}, expected {expect}")
            try:
                cols, digest = decode_columns(data, count, layout)
            except (ValueError, zstandard.ZstdError) as e:
                raise StoreDamaged(self.store, f"{where}: does not decode: {e}") from None
            if digest != unsigned(checksum):
                raise StoreDamaged(self.store, f"{where}: checksum mismatch")
            parts.append(cols)
            expect += count
        return {name: np.concatenate([p[name] for p in parts]) if parts else np.zeros(0, dtype=dtype)
                for name, dtype in layout}  # fmt: skip

    def frames(self) -> tuple[dict[str, npt.NDArray[np.int64]], list[str]]:
        """The frame table as integer columns and the codec of each frame (empty in a store
        without ``--pack``)."""
        names = ("frame", "pack", "offset", "length", "pages", "checksum")
        try:
            rows = self._db.execute(
                'SELECT frame, pack, "offset", length, pages, checksum, codec FROM frame ORDER BY frame'
            ).fetchall()
            arr = np.array([r[:6] for r in rows], dtype=np.int64).reshape(-1, len(names))
        except (sqlite3.DatabaseError, ValueError, TypeError, OverflowError) as e:
            raise StoreDamaged(self.store, f"{CATALOG}: the frame table does not decode: {e}") from None
        return {name: arr[:, i] for i, name in enumerate(names)}, [str(r[6]) for r in rows]

    def close(self) -> None:
        self._db.close()
