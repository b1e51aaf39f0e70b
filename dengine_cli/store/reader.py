"""Reading a store back: its catalog, packs and objects, every decoded page checked against its
checksum.

:class:`StoreReader` opens the catalog and maps every pack under the store's shared lock (an
apply replacing the store meanwhile cannot take them away).  :class:`ObjectDecoder` decodes
objects one at a time (a patch's reference first, a frame once for all its pages, kept while
recently used) and says what is wrong with one that does not decode to its checksum, without
ever returning its bytes.
"""

from __future__ import annotations

import collections
import lzma
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import xxhash
import zstandard

from dengine_cli.codecs import CodecError, CompressionCodec, PatchCodec, codec_by_id
from dengine_cli.errors import UsageError
from dengine_cli.pages import PAGE_SIZE
from dengine_cli.store.catalog import Catalog, Columns, VmRow
from dengine_cli.store.frames import FrameCodec
from dengine_cli.store.layout import FRAMED, FRAMED_XOR, OBJECT_COLUMNS, PACKS, PAGE_COLUMNS, WHOLE, unsigned
from dengine_cli.store.packs import PackReader
from dengine_cli.store.writer import store_lock

#: Frames kept decoded while reading (4 MiB each).
FRAME_CACHE = 16


class BadObject(Exception):
    """An object that cannot be decoded to the page it stores: ``reason`` says why."""

    def __init__(self, obj: int, reason: str) -> None:
        super().__init__(f"object {obj}: {reason}")
        self.obj = obj
        self.reason = reason


class StoreReader:
    """The store at ``store``, open for reading."""

    def __init__(self, store: Path | str) -> None:
        self.store = Path(store)
        with store_lock(self.store, shared=True) if os.path.isdir(self.store) else _nothing():
            self.catalog = Catalog(self.store)
            self.packs = PackReader(self.store / PACKS, [p.file for p in self.catalog.packs])
        self.objects: Columns = self.catalog.columns("objects", -1, OBJECT_COLUMNS)
        self.frames, self.frame_codecs = self.catalog.frames()
        self.vms = self.catalog.vms

    @property
    def object_count(self) -> int:
        return len(self.objects["codec"])

    def vm(self, wanted: str) -> VmRow:
        """The VM called ``wanted``: its name as stored (the dump path given to ``plan``), that
        name's last component when no other VM has it, or its number."""
        exact = [vm for vm in self.vms if vm.name == wanted]
        if exact:
            return exact[0]
        base = [vm for vm in self.vms if Path(vm.name).name == wanted]
        if len(base) == 1:
            return base[0]
        if wanted.isdigit() and int(wanted) < len(self.vms):
            return self.vms[int(wanted)]
        what = "more than one VM is called" if base else "no VM called"
        raise UsageError(f"{self.store}: {what} {wanted!r} ({self._listing()})")

    def _listing(self, shown: int = 8) -> str:
        """The VMs by number and name, the first ``shown`` of them (an error stays one line)."""
        n = len(self.vms)
        listed = ", ".join(f"{k} {vm.name}" for k, vm in enumerate(self.vms[:shown]))
        more = f", and {n - shown} more" if n > shown else ""
        return f"{n} VM{'s' if n != 1 else ''}: {listed}{more}" if n else "no VM"

    def page_map(self, vm: VmRow) -> tuple[npt.NDArray[np.uint64], npt.NDArray[np.int64]]:
        """The VM's non-zero pages: gfns (ascending) and objects."""
        cols = self.catalog.columns("pages", vm.vm, PAGE_COLUMNS)
        return cols["gfn"].astype(np.uint64), cols["object"].astype(np.int64)

    def decoder(self) -> ObjectDecoder:
        return ObjectDecoder(self)

    def close(self) -> None:
        self.catalog.close()


class _nothing:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


@dataclass
class _Frames:
    """Decoded frames, the most recently used kept."""

    cache: collections.OrderedDict[int, npt.NDArray[np.uint8]]
    codecs: dict[str, FrameCodec]


class ObjectDecoder:
    """Decodes a reader's objects into pages, each checked against its checksum."""

    def __init__(self, reader: StoreReader) -> None:
        self.r = reader
        o = reader.objects
        self.codec = o["codec"]
        self.where = o["where"]
        self.offset = o["offset"]
        self.length = o["length"]
        self.reference = o["reference"]
        self.checksum = o["checksum"]
        self._frames = _Frames(collections.OrderedDict(), {})
        self._codecs: dict[int, Any] = {}

    def pages(self, objs: npt.NDArray[np.int64]) -> tuple[npt.NDArray[np.uint8], dict[int, str]]:
        """The checked pages of ``objs`` (rows of zeros where one fails) and, by index into
        ``objs``, why each failed.  Decoded in the order of the frames they need (their own, or
        their reference's), so that each frame is decoded once per call."""
        out = np.zeros((len(objs), PAGE_SIZE), dtype=np.uint8)
        bad: dict[int, str] = {}
        for i in np.argsort(self._frame_key(objs), kind="stable").tolist():
            obj = int(objs[i])
            try:
                out[i] = np.frombuffer(self.page(obj), dtype=np.uint8)
            except BadObject as e:
                bad[i] = f"object {obj}: {e.reason}"
        return out, bad

    def _frame_key(self, objs: npt.NDArray[np.int64]) -> npt.NDArray[np.int64]:
        """The frame each object's decoding needs (-1: none)."""
        n = len(self.codec)
        valid = (objs >= 0) & (objs < n)
        key = np.full(len(objs), -1, dtype=np.int64)
        o = objs[valid]
        ref = self.reference[o]
        target = np.where((ref >= 0) & (ref < n), ref, o)
        framed = np.isin(self.codec[target], (FRAMED, FRAMED_XOR))
        key[np.flatnonzero(valid)[framed]] = self.where[target[framed]].astype(np.int64)
        return key

    def page(self, obj: int, depth: int = 0) -> bytes:
        """The checked page of object ``obj``; :class:`BadObject` when it cannot be had."""
        if not 0 <= obj < len(self.codec):
            raise BadObject(obj, f"no such object (the store has {len(self.codec)})")
        page = self._decode(obj, depth)
        if len(page) != PAGE_SIZE:
            raise BadObject(obj, f"decodes to {len(page)} bytes, not a page")
        if xxhash.xxh3_64_intdigest(page) != int(self.checksum[obj]):
            raise BadObject(obj, "checksum mismatch: its page does not decode to what was stored")
        return page

    def _decode(self, obj: int, depth: int) -> bytes:
        codec = int(self.codec[obj])
        if codec == FRAMED:
            return self._framed(obj)
        if codec == FRAMED_XOR:
            base = self._reference(obj, depth)
            xor = np.frombuffer(self._framed(obj), dtype=np.uint8)
            return np.bitwise_xor(np.frombuffer(base, dtype=np.uint8), xor).tobytes()
        blob = self._blob(obj)
        if codec == WHOLE:
            return blob
        try:
            c = self._codec(codec)
        except KeyError:
            raise BadObject(obj, f"unknown codec id {codec:#04x}") from None
        try:
            if isinstance(c, CompressionCodec):
                return c.decompress(blob)
            return c.apply(self._reference(obj, depth), blob)
        except CodecError as e:
            raise BadObject(obj, str(e)) from None

    def _reference(self, obj: int, depth: int) -> bytes:
        """The checked page of a patch's reference object (a whole page, never a patch)."""
        ref = int(self.reference[obj])
        if depth > 0:
            raise BadObject(obj, "a patch against a patch (references are whole pages)")
        try:
            return self.page(ref, depth + 1)
        except BadObject as e:
            raise BadObject(obj, f"its reference object {ref}: {e.reason}") from None

    def _codec(self, codec: int) -> CompressionCodec | PatchCodec:
        found = self._codecs.get(codec)
        if found is None:
            found = self._codecs[codec] = codec_by_id(codec)
        c: CompressionCodec | PatchCodec = found
        return c

    def _blob(self, obj: int) -> bytes:
        pack, at, n = int(self.where[obj]), int(self.offset[obj]), int(self.length[obj])
        packs = self.r.packs
        if pack >= len(packs.maps):
            raise BadObject(obj, f"in pack {pack}, which the catalog does not list")
        name = self.r.catalog.packs[pack].file
        if pack in packs.missing:
            raise BadObject(obj, f"its pack {name} cannot be read: {packs.missing[pack]}")
        if at + n > packs.size(pack):
            raise BadObject(
                obj, f"bytes {at:#x}-{at + n:#x} of pack {name} lie beyond its end at {packs.size(pack):#x}"
            )
        return packs.bytes_at(pack, at, n)

    def _framed(self, obj: int) -> bytes:
        frame, slot = int(self.where[obj]), int(self.offset[obj])
        pages = self._frame(obj, frame)
        if slot >= len(pages):
            raise BadObject(obj, f"slot {slot} of frame {frame}, which holds {len(pages)} pages")
        page: bytes = pages[slot].tobytes()
        return page

    def _frame(self, obj: int, frame: int) -> npt.NDArray[np.uint8]:
        cache = self._frames.cache
        if frame in cache:
            cache.move_to_end(frame)
            return cache[frame]
        f = self.r.frames
        if frame >= len(f["frame"]):
            raise BadObject(obj, f"in frame {frame}, which the catalog does not list")
        pack, at, n = int(f["pack"][frame]), int(f["offset"][frame]), int(f["length"][frame])
        blob = self._frame_blob(obj, frame, pack, at, n)
        if xxhash.xxh3_64_intdigest(blob) != unsigned(int(f["checksum"][frame])):
            raise BadObject(obj, f"frame {frame} (pack {pack} at {at:#x}): checksum mismatch")
        codec = self._frame_codec(obj, frame)
        try:
            pages = codec.decompress(blob, int(f["pages"][frame]))
        except (zstandard.ZstdError, lzma.LZMAError, ValueError) as e:
            raise BadObject(obj, f"frame {frame} does not decode: {e}") from None
        cache[frame] = pages
        if len(cache) > FRAME_CACHE:
            cache.popitem(last=False)
        return pages

    def _frame_blob(self, obj: int, frame: int, pack: int, at: int, n: int) -> bytes:
        packs = self.r.packs
        if not 0 <= pack < len(packs.maps):
            raise BadObject(obj, f"frame {frame} is in pack {pack}, which the catalog does not list")
        name = self.r.catalog.packs[pack].file
        if pack in packs.missing:
            raise BadObject(obj, f"frame {frame}: its pack {name} cannot be read: {packs.missing[pack]}")
        if at + n > packs.size(pack):
            raise BadObject(
                obj, f"frame {frame}: bytes {at:#x}-{at + n:#x} of pack {name} lie beyond its end at "
                f"{packs.size(pack):#x}",
            )  # fmt: skip
        return packs.bytes_at(pack, at, n)

    def _frame_codec(self, obj: int, frame: int) -> FrameCodec:
        name = self.r.frame_codecs[frame]
        codec = self._frames.codecs.get(name)
        if codec is None:
            try:
                codec = self._frames.codecs[name] = FrameCodec(name)
            except ValueError:
                raise BadObject(obj, f"frame {frame}: unknown frame codec {name!r}") from None
        return codec
