"""``dengine verify``: check every byte of a store and say which VM and which gfn a problem hurts.

Checked, in order: the catalog (SQLite's own check, every chunk's checksum, the ``vm`` rows against
each other, their ranges and the plan's head: :attr:`Catalog.row_damage`); every pack (present,
its header, its size and xxh3-128 as written); every object, decoded once (its pack and the
bounds of its bytes, its frame, its reference, its codec, its page's checksum); every VM (its page
map points at objects that exist and lies within its ranges, its zero pages are the present pages
it does not list, its image checksum).  Files in
``packs/`` that the catalog does not name (left by an apply that was killed, removed by the next
one) are reported as notes, not problems.
"""

from __future__ import annotations

import re
import sqlite3
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import xxhash

from dengine_cli.errors import DengineError, StoreDamaged
from dengine_cli.parallel import Workers
from dengine_cli.store.catalog import VmRow
from dengine_cli.store.layout import PACK_SUFFIX, PACKS, PAGE_COLUMNS, ZERO_PAGE_CHECKSUM
from dengine_cli.store.reader import StoreReader

#: gfns listed per problem in the text report (JSON lists them all).
SHOWN_GFNS = 8
#: Objects decoded at a time.
VERIFY_CHUNK = 16384


@dataclass
class Problem:
    """One thing wrong with a store: what, and the pages it hurts (per VM name, gfns)."""

    what: str
    pages: dict[str, list[int]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "problem": self.what,
            "pages": {vm: [f"{g:#x}" for g in gfns] for vm, gfns in self.pages.items()},
        }


@dataclass
class VerifyReport:
    store: Path
    vms: list[str]
    objects: int
    packs: int
    frames: int
    problems: list[Problem]
    notes: list[str]

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": "dengine.verify/1",
            "store": str(self.store),
            "ok": self.ok,
            "vms": self.vms,
            "objects": self.objects,
            "packs": self.packs,
            "frames": self.frames,
            "problems": [p.to_dict() for p in self.problems],
            "notes": self.notes,
        }


def verify_store(
    store: Path | str, on_progress: Callable[[int], None] | None = None, workers: Workers | None = None
) -> VerifyReport:
    """Every check of the store at ``store`` (frames decoded by ``workers``' threads).  A store
    with no catalog, or one that is not a dengine catalog, raises (exit 3 / 7) rather than
    reporting (:func:`unverified` is its report then)."""
    reader = StoreReader(store, workers)
    problems: list[Problem] = []
    problems += _check_catalog(reader)
    problems += _check_packs(reader)
    bad = _decode_all(reader, on_progress)
    problems += _check_vms(reader, bad)
    return VerifyReport(
        store=reader.store,
        vms=[vm.name for vm in reader.vms],
        objects=reader.object_count,
        packs=len(reader.catalog.packs),
        frames=len(reader.frames["frame"]),
        problems=problems,
        notes=_notes(reader),
    )


def unverified(store: Path | str, error: DengineError) -> VerifyReport:
    """The report of a store ``verify_store`` could not open (``error``: why, the one line the
    command prints on stderr): not ok, that one problem, nothing checked.  So that
    ``verify --json`` prints a JSON document whatever happens."""
    return VerifyReport(Path(store), [], 0, 0, 0, [Problem(str(error))], [])


def _check_catalog(reader: StoreReader) -> list[Problem]:
    try:
        found = [r[0] for r in reader.catalog._db.execute("PRAGMA quick_check")]
    except sqlite3.DatabaseError as e:
        return [Problem(f"catalog: {e}")]
    rows = [Problem(what) for what in reader.catalog.row_damage]
    return rows if found == ["ok"] else [Problem(f"catalog: {'; '.join(found[:5])}"), *rows]


def _check_packs(reader: StoreReader) -> list[Problem]:
    """Each pack: present, its header, the size and checksum it was written with."""
    out = []
    run = bytes.fromhex(reader.catalog.meta.get("run", ""))
    for k, row in enumerate(reader.catalog.packs):
        name = f"pack {PACKS}/{row.file}"
        if k in reader.packs.missing:
            out.append(Problem(f"{name}: cannot be read: {reader.packs.missing[k]}"))
            continue
        size = reader.packs.size(k)
        if size < row.size:
            out.append(Problem(f"{name}: truncated: {size:#x} bytes, {row.size:#x} were written"))
        elif size > row.size:
            out.append(Problem(f"{name}: {size - row.size} bytes more than were written ({row.size:#x})"))
        elif xxhash.xxh3_128_hexdigest(reader.packs.maps[k].data) != row.checksum:
            out.append(Problem(f"{name}: checksum mismatch: its bytes changed since they were written"))
        if size and not reader.packs.header_ok(k, run):
            out.append(Problem(f"{name}: bad header (not a pack of this store)"))
    return out


def _decode_all(reader: StoreReader, on_progress: Callable[[int], None] | None) -> dict[int, str]:
    """Every object decoded and checked once: the reason for each that fails."""
    decoder = reader.decoder()
    bad: dict[int, str] = {}
    n = reader.object_count
    for lo in range(0, n, VERIFY_CHUNK):
        objs = np.arange(lo, min(lo + VERIFY_CHUNK, n), dtype=np.int64)
        _, failed = decoder.pages(objs)
        for i, reason in failed.items():
            bad[lo + i] = reason.split(": ", 1)[1]
        if on_progress is not None:
            on_progress(len(objs))
    return bad


def _check_vms(reader: StoreReader, bad: dict[int, str]) -> list[Problem]:
    """Per VM: the pages whose objects are bad (grouped by reason), page map checks, the image
    checksum."""
    out: list[Problem] = []
    bad_ids = np.array(sorted(bad), dtype=np.int64)
    by_reason: dict[str, Problem] = {}
    victims: dict[str, set[int]] = {}
    for vm in reader.vms:
        try:
            cols = reader.catalog.columns("pages", vm.vm, PAGE_COLUMNS, despite_rows=True)
        except StoreDamaged as e:
            out.append(Problem(f"VM {vm.name}: page map: {e}"))
            continue
        gfns, objs = cols["gfn"].astype(np.uint64), cols["object"].astype(np.int64)
        out += _zero_problems(vm, len(gfns))
        missing = (objs < 0) | (objs >= reader.object_count)
        if missing.any():
            out.append(Problem(f"VM {vm.name}: page map names objects the store does not have",
                               {vm.name: gfns[missing].astype(np.int64).tolist()}))  # fmt: skip
        hurt = np.isin(objs, bad_ids) if len(bad_ids) else np.zeros(len(objs), dtype=np.bool_)
        for g, o in zip(gfns[hurt].tolist(), objs[hurt].tolist(), strict=True):
            key = _cause(o, bad)
            p = by_reason.setdefault(key, Problem(f"object {o}: {key}"))
            p.pages.setdefault(vm.name, []).append(g)
            victims.setdefault(key, set()).add(o)
        out += _image_problems(reader, vm, gfns, objs, missing)
    for key, p in by_reason.items():
        patched = sum(1 for o in victims[key] if bad[o] != key)
        if patched:
            itself = len(victims[key]) - patched
            p.what += f" ({itself} object(s), and {patched} patched against them)"
    return out + list(by_reason.values())


def _zero_problems(vm: VmRow, listed: int) -> list[Problem]:
    """The VM row's zero pages: the present pages its page map (``listed`` pages) does not list."""
    zero = vm.present_count - listed
    if vm.zero_pages == zero:
        return []
    return [
        Problem(
            f"VM {vm.name}: its row says {vm.zero_pages} zero pages, its ranges and page map "
            f"{zero} ({vm.present_count} present, {listed} listed)"
        )
    ]


_REFERENCE = re.compile(r"its reference object (\d+): ")


def _cause(obj: int, bad: dict[int, str]) -> str:
    """What is wrong with object ``obj``: its own reason, or, for a patch whose reference object
    is itself bad, that object's reason (one problem for a damaged frame and every patch against
    its pages, not one for each patch)."""
    found = _REFERENCE.match(bad[obj])
    ref = int(found.group(1)) if found else -1
    return bad[ref] if ref in bad and not _REFERENCE.match(bad[ref]) else bad[obj]


def _image_problems(
    reader: StoreReader, vm: VmRow, gfns: npt.NDArray[np.uint64], objs: npt.NDArray[np.int64], missing: Any
) -> list[Problem]:
    present = vm.present_gfns
    at = np.searchsorted(present, gfns)
    if len(gfns) and (at.max() >= len(present) or not np.array_equal(present[at], gfns)):
        return [Problem(f"VM {vm.name}: its page map lists pages outside its present ranges")]
    sums = np.full(len(present), ZERO_PAGE_CHECKSUM, dtype=np.uint64)
    ok = ~missing
    sums[at[ok]] = reader.objects["checksum"][objs[ok]]
    pairs = np.stack((present, sums), axis=1).astype("<u8")
    if not missing.any() and xxhash.xxh3_128_hexdigest(pairs.tobytes()) != vm.image_checksum:
        return [
            Problem(f"VM {vm.name}: image checksum mismatch (its page map or an object's checksum changed)")
        ]
    return []


def _notes(reader: StoreReader) -> list[str]:
    named = {p.file for p in reader.catalog.packs}
    folder = reader.store / PACKS
    extra = sorted(p.name for p in folder.iterdir() if p.name.endswith(PACK_SUFFIX) and p.name not in named) \
        if folder.is_dir() else []  # fmt: skip
    return [f"{PACKS}/{name}: not part of the store (left by an apply that did not finish)" for name in extra]
