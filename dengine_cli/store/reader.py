"""Reading a store back: its catalog, packs and objects, every decoded page checked against its
checksum.

:class:`StoreReader` opens the catalog and maps every pack under the store's shared lock (an
apply replacing the store meanwhile cannot take them away).  :class:`ObjectDecoder` decodes
objects one at a time (a patch's reference first, a frame once for all its pages, kept while
recently used) and says what is wrong with one that does not decode to its checksum, without
ever returning its bytes.  A batch of objects is decoded in the order of the frames it needs;
when a frame is not decoded yet, the next ones the batch needs are decoded beside it by other
threads (LZMA2 and zstd let go of the GIL while they decode), and the whole pages of a frame are
copied and checked in one pass.
"""

from __future__ import annotations

import collections
import itertools
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
from dengine_cli.errors import StoreDamaged, UsageError
from dengine_cli.pages import PAGE_SIZE, page_checksums
from dengine_cli.parallel import Workers
from dengine_cli.store.catalog import Catalog, Columns, VmRow
from dengine_cli.store.frames import FrameCodec
from dengine_cli.store.layout import FRAMED, FRAMED_XOR, OBJECT_COLUMNS, PACKS, PAGE_COLUMNS, WHOLE, unsigned
from dengine_cli.store.packs import PackReader
from dengine_cli.store.writer import store_lock

#: Frames kept decoded while reading (4 MiB each: 256 MiB).  Restoring a VM in address order
#: needs frames of several streams at once (its own whole pages, its XOR deltas, the kept copies
#: of the pages it shares, in other VMs' frames, their references): 16 frames made the restore
#: of a bench dump decode 103-140 frames of a store of 85, and `verify` 212; 64 frames, 47-60
#: (each frame it needs once) and 90.
FRAME_CACHE = 64


#: Frames decoded at once, at most, whatever the threads: a quarter of the cache, so that what
#: is decoded ahead does not push out what the batch still needs.
DECODE_AHEAD = FRAME_CACHE // 4


class _FrameError(Exception):
    """A frame that cannot be decoded: ``reason`` says why (the object that needs it is added by
    whoever raises :class:`BadObject`)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class BadObject(Exception):
    """An object that cannot be decoded to the page it stores: ``reason`` says why."""

    def __init__(self, obj: int, reason: str) -> None:
        super().__init__(f"object {obj}: {reason}")
        self.obj = obj
        self.reason = reason


class StoreReader:
    """The store at ``store``, open for reading; ``workers``: the threads that decode its frames
    (default: one a CPU)."""

    def __init__(self, store: Path | str, workers: Workers | None = None) -> None:
        self.store = Path(store)
        self.workers = workers or Workers()
        self._decoder: ObjectDecoder | None = None
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
        if len(exact) == 1:
            return exact[0]
        if exact:  # a plan edited by hand: which one is meant, only its number says
            raise UsageError(
                f"{self.store}: more than one VM is called {wanted!r}: give its number ({self._listing()})"
            )
        base = [vm for vm in self.vms if Path(vm.name).name == wanted]
        if len(base) == 1:
            return base[0]
        if wanted.isdigit() and int(wanted) < len(self.vms):
            return self.vms[int(wanted)]
        if not base and self.catalog.row_damage:  # the VM may be the one whose row was lost
            raise StoreDamaged(self.store, self.catalog.row_damage[0])
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
        """The reader's decoder: one for all its calls, so that frames decoded for one VM serve
        the next (the kept copies of shared pages are in the same frames for every VM)."""
        if self._decoder is None:
            self._decoder = ObjectDecoder(self)
        return self._decoder

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
        self.workers = reader.workers
        o = reader.objects
        self.codec = o["codec"]
        self.where = o["where"]
        self.offset = o["offset"]
        self.length = o["length"]
        self.reference = o["reference"]
        self.checksum = o["checksum"]
        self._frames = _Frames(collections.OrderedDict(), {})
        #: The frames the batch being decoded needs, by the order it first needs them.
        self._upcoming: dict[int, int] = {}
        self._codecs: dict[int, Any] = {}

    def pages(self, objs: npt.NDArray[np.int64]) -> tuple[npt.NDArray[np.uint8], dict[int, str]]:
        """The checked pages of ``objs`` (rows of zeros where one fails) and, by index into
        ``objs``, why each failed.  Decoded in the order of the frames they need (their own, or
        their reference's), so that each frame is decoded once per call."""
        out = np.zeros((len(objs), PAGE_SIZE), dtype=np.uint8)
        bad: dict[int, str] = {}
        ref_frame, own_frame, whole, delta = self._frames_needed(objs)
        # By the first frame each needs: its reference's, else its own.
        order = np.argsort(np.where(ref_frame >= 0, ref_frame, own_frame), kind="stable")
        self._upcoming = _first_needed(ref_frame[order], own_frame[order])
        frame_of = np.where(whole, own_frame, -1)
        groups = _by_frame(frame_of)
        # Deltas by the pair of frames they need (their reference's, their own).
        pair_of = np.where(delta, ref_frame * (int(own_frame.max(initial=0)) + 1) + own_frame, -1)
        pairs = _by_frame(pair_of)
        done = np.zeros(len(objs), dtype=np.bool_)
        frames, pair_list = frame_of.tolist(), pair_of.tolist()
        for i in order.tolist():
            frame, pair = frames[i], pair_list[i]
            if frame >= 0 and frame in groups:
                self._framed_pages(objs, groups.pop(frame), frame, out, done)
            elif pair >= 0 and pair in pairs:
                self._delta_pages(objs, pairs.pop(pair), int(ref_frame[i]), int(own_frame[i]), out, done)
            if done[i]:
                continue
            obj = int(objs[i])
            try:
                out[i] = np.frombuffer(self.page(obj), dtype=np.uint8)
            except BadObject as e:
                bad[i] = f"object {obj}: {e.reason}"
        self._upcoming = {}
        return out, bad

    def _frames_needed(
        self, objs: npt.NDArray[np.int64]
    ) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64], npt.NDArray[np.bool_], npt.NDArray[np.bool_]]:
        """Per object: the frame of its reference (a patch's; -1: none, or not in a frame), its
        own frame (-1: none), whether it is a whole page in a frame, and whether it is a delta in
        a frame against a whole page in a frame."""
        n = len(self.codec)
        ref_frame = np.full(len(objs), -1, dtype=np.int64)
        own_frame = np.full(len(objs), -1, dtype=np.int64)
        valid = np.flatnonzero((objs >= 0) & (objs < n))
        o = objs[valid]
        codec = self.codec[o]
        own = np.isin(codec, (FRAMED, FRAMED_XOR))
        own_frame[valid[own]] = self.where[o[own]]
        ref = self.reference[o]
        has_ref = (ref >= 0) & (ref < n)
        at, ref = valid[has_ref], ref[has_ref]
        framed_ref = np.isin(self.codec[ref], (FRAMED, FRAMED_XOR))
        ref_frame[at[framed_ref]] = self.where[ref[framed_ref]]
        whole = np.zeros(len(objs), dtype=np.bool_)
        whole[valid[codec == FRAMED]] = True
        delta = np.zeros(len(objs), dtype=np.bool_)
        delta[at[(self.codec[ref] == FRAMED) & (codec[has_ref] == FRAMED_XOR)]] = True
        return ref_frame, own_frame, whole, delta

    def _framed_pages(
        self,
        objs: npt.NDArray[np.int64],
        at: npt.NDArray[np.int64],
        frame: int,
        out: npt.NDArray[np.uint8],
        done: npt.NDArray[np.bool_],
    ) -> None:
        """The whole pages ``objs[at]``, all in ``frame``, copied into ``out`` by slot and
        checked against their checksums in one pass (most of a restore's pages: one at a time
        they cost more than decoding their frame), and marked ``done``.  Any whose frame or
        checksum is wrong is left to :meth:`page`, which says what is wrong with it."""
        try:
            pages = self._frame(int(objs[at[0]]), frame)
        except BadObject:
            return
        slots = self.offset[objs[at]].astype(np.int64)
        inside = slots < len(pages)
        at, slots = at[inside], slots[inside]
        rows = pages[slots]
        _take_checked(out, done, at, rows, page_checksums(rows) == self.checksum[objs[at]].astype(np.uint64))

    def _delta_pages(
        self,
        objs: npt.NDArray[np.int64],
        at: npt.NDArray[np.int64],
        ref_frame: int,
        own_frame: int,
        out: npt.NDArray[np.uint8],
        done: npt.NDArray[np.bool_],
    ) -> None:
        """The patched pages ``objs[at]``, XOR deltas all in ``own_frame`` against whole pages
        all in ``ref_frame``, rebuilt and checked (the references too) in one pass: one at a
        time each cost two page decodes, copies and checksums in Python (restoring the four
        bench dumps made 504 k Python calls, now 51 k; 1.76 -> 1.60 s).  Any whose frames,
        slots or checksums are wrong is left to :meth:`page`."""
        o = objs[at]
        r = self.reference[o]
        try:
            bases = self._frame(int(r[0]), ref_frame)
            deltas = self._frame(int(o[0]), own_frame)
        except BadObject:
            return
        ref_slots = self.offset[r].astype(np.int64)
        own_slots = self.offset[o].astype(np.int64)
        inside = (ref_slots < len(bases)) & (own_slots < len(deltas))
        at, o, r = at[inside], o[inside], r[inside]
        base_rows = bases[ref_slots[inside]]
        rows = np.bitwise_xor(base_rows, deltas[own_slots[inside]])
        good = (page_checksums(base_rows) == self.checksum[r].astype(np.uint64)) & (
            page_checksums(rows) == self.checksum[o].astype(np.uint64)
        )
        _take_checked(out, done, at, rows, good)

    def _decode_ahead(self, frame: int) -> None:
        """With more than one thread, decode ``frame`` and the next frames this batch will need
        that are not cached (one a thread) at once, into the cache.  A frame that fails is left
        out, to fail again, with the object that needs it named, when it is decoded alone."""
        threads = min(self.workers.count, DECODE_AHEAD)
        at = self._upcoming.get(frame)
        if threads < 2 or at is None:
            return
        cache = self._frames.cache
        batch = [frame]
        for f in itertools.islice(self._upcoming, at + 1, None):
            if len(batch) == threads:
                break
            if f not in cache:
                batch.append(f)
        if len(batch) < 2:
            return
        decoded = self.workers.threads(self._try_frame, batch)
        for f, pages in reversed(list(zip(batch, decoded, strict=True))):
            if pages is not None:
                self._cache(f, pages)

    def _try_frame(self, frame: int) -> npt.NDArray[np.uint8] | None:
        """Frame ``frame`` decoded with codecs of its own (a zstd context is not for two threads),
        or ``None`` when it cannot be."""
        try:
            return self._decode_frame(frame, {})
        except _FrameError:
            return None

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
        if frame not in cache:
            self._decode_ahead(frame)
        if frame in cache:
            cache.move_to_end(frame)
            return cache[frame]
        try:
            pages = self._decode_frame(frame, self._frames.codecs)
        except _FrameError as e:
            raise BadObject(obj, e.reason) from None
        self._cache(frame, pages)
        return pages

    def _cache(self, frame: int, pages: npt.NDArray[np.uint8]) -> None:
        cache = self._frames.cache
        cache[frame] = pages
        cache.move_to_end(frame)
        if len(cache) > FRAME_CACHE:
            cache.popitem(last=False)

    def _decode_frame(self, frame: int, codecs: dict[str, FrameCodec]) -> npt.NDArray[np.uint8]:
        """The pages of frame ``frame``, its checksum checked, decoded with ``codecs`` (by name,
        added to as needed); :class:`_FrameError` when it cannot be had."""
        f = self.r.frames
        if frame >= len(f["frame"]):
            raise _FrameError(f"in frame {frame}, which the catalog does not list")
        pack, at, n = int(f["pack"][frame]), int(f["offset"][frame]), int(f["length"][frame])
        blob = self._frame_blob(frame, pack, at, n)
        if xxhash.xxh3_64_intdigest(blob) != unsigned(int(f["checksum"][frame])):
            raise _FrameError(f"frame {frame} (pack {pack} at {at:#x}): checksum mismatch")
        codec = _frame_codec(codecs, frame, self.r.frame_codecs[frame])
        try:
            return codec.decompress(blob, int(f["pages"][frame]))
        except (zstandard.ZstdError, lzma.LZMAError, ValueError) as e:
            raise _FrameError(f"frame {frame} does not decode: {e}") from None

    def _frame_blob(self, frame: int, pack: int, at: int, n: int) -> bytes:
        packs = self.r.packs
        if not 0 <= pack < len(packs.maps):
            raise _FrameError(f"frame {frame} is in pack {pack}, which the catalog does not list")
        name = self.r.catalog.packs[pack].file
        if pack in packs.missing:
            raise _FrameError(f"frame {frame}: its pack {name} cannot be read: {packs.missing[pack]}")
        if at + n > packs.size(pack):
            raise _FrameError(
                f"frame {frame}: bytes {at:#x}-{at + n:#x} of pack {name} lie beyond its end at "
                f"{packs.size(pack):#x}"
            )
        return packs.bytes_at(pack, at, n)


def _take_checked(
    out: npt.NDArray[np.uint8],
    done: npt.NDArray[np.bool_],
    at: npt.NDArray[np.int64],
    rows: npt.NDArray[np.uint8],
    good: npt.NDArray[np.bool_],
) -> None:
    """The ``rows`` whose checks passed (``good``) into their slots ``at`` of ``out``, marked
    ``done``; when all passed, copied once more rather than twice (a restore copies every
    page)."""
    if good.all():
        out[at] = rows
        done[at] = True
    else:
        out[at[good]] = rows[good]
        done[at[good]] = True


def _first_needed(ref_frame: npt.NDArray[np.int64], own_frame: npt.NDArray[np.int64]) -> dict[int, int]:
    """The frames objects in this order need (each its reference's, then its own; -1: none),
    each by its place in the order they are first needed."""
    flat = np.stack((ref_frame, own_frame), axis=1).reshape(-1)
    frames, first = np.unique(flat[flat >= 0], return_index=True)
    return {f: k for k, f in enumerate(frames[np.argsort(first)].tolist())}


def _by_frame(frame_of: npt.NDArray[np.int64]) -> dict[int, npt.NDArray[np.int64]]:
    """The indexes into ``frame_of`` of each frame named there (-1: none), in order."""
    framed = np.flatnonzero(frame_of >= 0)
    if not len(framed):
        return {}
    cut = framed[np.argsort(frame_of[framed], kind="stable")]
    keys, starts = np.unique(frame_of[cut], return_index=True)
    return dict(zip(keys.tolist(), np.split(cut, starts[1:]), strict=True))


def _frame_codec(codecs: dict[str, FrameCodec], frame: int, name: str) -> FrameCodec:
    codec = codecs.get(name)
    if codec is None:
        try:
            codec = codecs[name] = FrameCodec(name)
        except ValueError:
            raise _FrameError(f"frame {frame}: unknown frame codec {name!r}") from None
    return codec
