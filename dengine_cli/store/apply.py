"""``dengine apply``: write the store a plan describes, and measure what it really takes.

Every present page of every VM is read once, in scan order (VMs in the plan's order, ascending
gfn), in batches that worker threads check and encode (:mod:`~dengine_cli.store.encode`) while
this thread writes the results in order:

* a zero page is stored as nothing (the page map does not list it); it is checked to be zero;
* a shared page is an entry of the page map pointing at the object of its kept copy; its
  checksum must equal the kept copy's, so a plan that merged two different pages (a hash
  collision, or a plan file edited by hand) is refused instead of stored wrong;
* a whole, patched or compressed page is an object of its own, encoded with the plan's codec
  (so its size is the plan's, byte for byte); a page the plan paged out is stored whole and
  counted apart (it would be on the host's swap device, not in its memory);
* with ``pack``, whole, compressed and paged-out pages go into frames
  (:mod:`~dengine_cli.store.frames`) instead; patches stay objects of their own.

Objects are numbered in scan order, and a patch's reference and a shared page's kept copy are
always a whole page earlier in scan order, so restoring one VM decodes its own objects and only
the few objects of other VMs it refers to.
"""

from __future__ import annotations

import collections
import json
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import xxhash

from dengine_cli import __version__
from dengine_cli.arrays import ArrayHome
from dengine_cli.codecs import CompressionCodec, PatchCodec, compression_codec, patch_codec
from dengine_cli.engine.plan.model import COMPRESS, PATCH, SHARE, ZERO
from dengine_cli.errors import OutputError, StalePlan
from dengine_cli.formats import open_dump
from dengine_cli.formats.base import Dump
from dengine_cli.pages import PAGE_SIZE
from dengine_cli.parallel import Workers
from dengine_cli.store import layout
from dengine_cli.store.accounting import VmBytes, vm_bytes
from dengine_cli.store.catalog import CatalogWriter, FrameRow, VmRow
from dengine_cli.store.encode import Batch, Encoded, encode_batch, stored_mask
from dengine_cli.store.frames import (
    AUTO,
    AUTO_LZMA2,
    DEFAULT_FRAME_CODEC,
    FRAME_PAGES,
    STORED,
    FrameCodec,
    choose_codec,
    delta_codec_for,
    probes_incompressible,
)
from dengine_cli.store.layout import FRAMED, FRAMED_XOR, OBJECT_COLUMNS, PAGE_COLUMNS
from dengine_cli.store.objects import ObjectPlan
from dengine_cli.store.packs import WrittenPack
from dengine_cli.store.planread import PlanFile, check_dumps_unchanged, read_plan
from dengine_cli.store.writer import StoreWriter

#: Pages per batch handed to a worker thread.
BATCH = 2048
#: Frames being compressed at once per thread, at most (4 MiB of pages each).  Frames wait in a
#: queue of their own, not behind the batches: a frame takes a thread a quarter of a second of
#: LZMA2, a batch a few milliseconds, and waiting for a frame before handing out the next batch
#: left the other thread idle a third of the time.
FRAMES_AHEAD = 2
#: What a batch in flight holds at most: its pages, its patched pages' references and its
#: encoded blobs (each at most a page a page).
BATCH_BYTES = 3 * BATCH * PAGE_SIZE
#: What a frame in flight holds at most: its pages, its encoding and the LZMA2 encoder's state
#: (about 7.5 times the 1 MiB dictionary for hc4).
FRAME_BYTES = 2 * FRAME_PAGES * PAGE_SIZE + (8 << 20)

#: What ``apply`` holds a page while it writes, in bytes: the plan's columns as read (48) and as
#: used (33), the page's object number twice (16), its checksum (8) and the open dump's page
#: table (16-21).  Measured on the 16-guest bench fleet: 120 bytes a page beside 50 MiB of
#: batches and frames in flight.
APPLY_BYTES_PER_PAGE = 125
#: The fewest bytes of plan file text a page takes (``1,`` ``0,`` ``null,`` ``0,``): the file's
#: size over this bounds its pages before it is read.
PLAN_TEXT_BYTES_PER_PAGE = 11

#: ``on_progress(what, done, total)``.
Progress = Callable[[str, int, int], None]
I64 = npt.NDArray[np.int64]


class _Fill:
    """Pages waiting for a frame (of one kind), with their objects."""

    def __init__(self, codec: str, object_codec: int) -> None:
        self.codec = codec
        self.object_codec = object_codec
        self.pages: list[npt.NDArray[np.uint8]] = []
        self.ids: list[I64] = []
        self.count = 0

    def add(self, pages: npt.NDArray[np.uint8], ids: I64) -> None:
        if len(ids):
            self.pages.append(pages)
            self.ids.append(ids)
            self.count += len(ids)

    def take(self, n: int) -> tuple[npt.NDArray[np.uint8], I64]:
        pages, ids = np.concatenate(self.pages), np.concatenate(self.ids)
        k = min(n, len(ids))
        self.pages, self.ids = ([pages[k:]], [ids[k:]]) if k < len(ids) else ([], [])
        self.count = len(ids) - k
        return pages[:k].copy(), ids[:k]


@dataclass
class ApplyResult:
    """A store written: per VM what it takes, the page data and metadata in total."""

    store: Path
    packed: bool
    vms: list[VmBytes]
    data_bytes: int = 0
    metadata_bytes: int = 0
    catalog_bytes: int = 0
    pack_files: int = 0
    objects: int = 0
    frames: int = 0
    frame_codec: str | None = None
    #: Of ``frames``, those of incompressible pages stored as they are.
    stored_frames: int = 0
    #: Frames per codec used (``auto`` chooses per frame).
    frame_codecs: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    #: Whether the per-page arrays were held in mapped files (past the memory limit).
    arrays_in_files: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def total_bytes(self) -> int:
        return self.data_bytes + self.metadata_bytes

    def to_dict(self) -> dict[str, Any]:
        from dengine_cli.store.layout import FORMAT

        return {
            "schema": "dengine.apply/1",
            "store": str(self.store),
            "format": FORMAT,
            "packed": self.packed,
            "vms": [vm.to_dict() for vm in self.vms],
            "plan_bytes": sum(vm.plan_bytes for vm in self.vms),
            "data_bytes": self.data_bytes,
            "metadata_bytes": self.metadata_bytes,
            "catalog_bytes": self.catalog_bytes,
            "total_bytes": self.total_bytes,
            "pack_files": self.pack_files,
            "objects": self.objects,
            "frames": self.frames,
            "frame_codec": self.frame_codec,
            "stored_frames": self.stored_frames,
            "frame_codecs": dict(self.frame_codecs),
            "seconds": round(self.seconds, 3),
            "arrays_in_files": self.arrays_in_files,
        }


def apply_plan(
    plan_path: Path | str,
    store: Path | str,
    *,
    pack: bool = False,
    frame_codec: str | None = None,
    workers: Workers | None = None,
    on_progress: Progress | None = None,
    replace: bool = False,
    memory_limit: int | None = None,
    tmp_dir: Path | None = None,
) -> ApplyResult:
    """Write the store of the plan file at ``plan_path`` into the directory ``store``; a store
    already there is refused, or with ``replace`` replaced only once the new one is complete.
    ``frame_codec``: with ``pack``, the codec of frames (default ``auto``: per frame, LZMA2 or
    zstd-9).  ``memory_limit``: past half of it (:func:`array_home`), the per-page arrays live
    in mapped files under ``tmp_dir`` (default: the nearest existing directory above the store); the store is
    the same."""
    started = time.perf_counter()
    store = Path(store)
    home = array_home(Path(plan_path), memory_limit, tmp_dir or _existing_parent(store))
    plan = read_plan(plan_path, home)
    check_dumps_unchanged(plan)
    workers = workers or Workers()
    dumps: list[Dump] = []
    try:
        for vm in plan.vms:
            dump = open_dump(vm.path, vm.options)
            dumps.append(dump)
            if home.directory is not None:
                _map_page_table(dump, home.directory)
            if not np.array_equal(np.asarray(dump.gfns), vm.gfns):
                raise StalePlan(
                    plan.path, f"VM {vm.vm} ({vm.name}): the dump's present pages are not the plan's"
                )
        with StoreWriter(store, replace=replace) as writer:
            run = _Apply(plan, dumps, writer, pack, frame_codec, workers, on_progress, home, memory_limit)
            result = run.write()
    finally:
        for d in dumps:
            d.close()
    result.seconds = time.perf_counter() - started
    result.arrays_in_files = home.in_files
    return result


def array_home(plan_path: Path, memory_limit: int | None, directory: Path) -> ArrayHome:
    """Where apply keeps its per-page arrays: in files under ``directory`` when the most pages
    the plan file can hold (its size over :data:`PLAN_TEXT_BYTES_PER_PAGE`) at
    :data:`APPLY_BYTES_PER_PAGE` pass half of ``memory_limit`` (the other half is for the
    batches and frames in flight); in memory without a limit."""
    if memory_limit is None:
        return ArrayHome()
    try:
        size = plan_path.stat().st_size
    except OSError:
        return ArrayHome()  # read_plan says why
    pages = size // PLAN_TEXT_BYTES_PER_PAGE
    if pages * APPLY_BYTES_PER_PAGE <= memory_limit // 2:
        return ArrayHome()
    return ArrayHome(directory, lambda e: _cannot_hold(directory, e))


def _existing_parent(store: Path) -> Path:
    """The nearest directory above ``store`` that exists now (apply makes the missing ones)."""
    here = store.absolute().parent
    while not here.is_dir() and here != here.parent:
        here = here.parent
    return here


def _cannot_hold(directory: Path, e: OSError) -> OutputError:
    return OutputError(directory, f"page arrays past the memory limit: {e.strerror or e}")


def _map_page_table(dump: Dump, directory: Path) -> None:
    try:
        dump.map_page_table(directory)
    except OSError as e:
        raise _cannot_hold(directory, e) from e


class _Apply:
    """One apply's state: the object plan, the writer, the frames being filled."""

    def __init__(
        self,
        plan: PlanFile,
        dumps: Sequence[Dump],
        writer: StoreWriter,
        pack: bool,
        frame_codec: str | None,
        workers: Workers,
        on_progress: Progress | None,
        home: ArrayHome,
        memory_limit: int | None = None,
    ) -> None:
        self.plan = plan
        self.memory_limit = memory_limit
        self.dumps = dumps
        self.writer = writer
        self.pack = pack
        self.workers = workers
        self.on_progress = on_progress
        self.objects = ObjectPlan(plan, home)
        self.sums = [home.full(len(vm.gfns), 0, np.uint64) for vm in plan.vms]
        pol = plan.policy
        self.compression: CompressionCodec | None = (
            compression_codec(plan.compression_codec) if pol["compression"]["enabled"] else None
        )
        self.patch: PatchCodec | None = patch_codec(plan.patch_codec) if pol["patch"]["enabled"] else None
        self.frame_codec = frame_codec or DEFAULT_FRAME_CODEC
        self.frame_rows: list[FrameRow] = []
        # Whole pages (by the frame codec), XOR deltas (LZMA2 alone, or the same zstd), and
        # incompressible whole pages as they are (LZMA2 frame codecs only).
        self.probe = pack and probes_incompressible(self.frame_codec)
        self._fills = (
            _Fill(self.frame_codec, FRAMED),
            _Fill(delta_codec_for(self.frame_codec), FRAMED_XOR),
            _Fill(STORED, FRAMED),
        )
        self._codec_local = threading.local()
        self._frames_submitted = 0
        self._frame_jobs: collections.deque[Future[tuple[int, str, bytes, int]]] = collections.deque()

    # --- the pass over the pages -----------------------------------------------------------

    def write(self) -> ApplyResult:
        batches_ahead, frames_ahead = self._ahead()
        batches: collections.deque[Future[Encoded]] = collections.deque()
        with self.workers.tasks() as pool:
            self._pool = pool
            for batch in self._batches():
                job = pool.submit(encode_batch, batch, self.compression, self.patch, self.pack, self.probe)
                batches.append(job)
                while len(batches) > batches_ahead:
                    self._take(batches.popleft().result())
                self._write_frames(limit=frames_ahead)
            while batches:
                self._take(batches.popleft().result())
            self._flush_frames(final=True)
            self._write_frames(limit=0)
        # The worker threads read mapped pages after the pass asked for the next batch: a dump
        # written to meanwhile would leave an image of no one state of it in the store.
        for dump in self.dumps:
            dump.check_unchanged()
        self._check_shared()
        return self._commit()

    def _ahead(self) -> tuple[int, int]:
        """Batches and frames in flight at most: two batches and :data:`FRAMES_AHEAD` frames a
        thread, fewer when they would not fit half the memory limit (at :data:`BATCH_BYTES`
        and :data:`FRAME_BYTES` each)."""
        threads = max(1, self.workers.count)
        batches, frames = 2 * threads, FRAMES_AHEAD * threads
        if self.memory_limit is not None:
            half = self.memory_limit // 2
            batches = max(1, min(batches, half // BATCH_BYTES))
            frames = max(1, min(frames, half // FRAME_BYTES))
        return batches, frames

    def _batches(self) -> Iterator[Batch]:
        total = sum(len(vm.gfns) for vm in self.plan.vms)
        done = 0
        for v, (vm, dump) in enumerate(zip(self.plan.vms, self.dumps, strict=True)):
            at = 0
            for b in dump.batches(BATCH):
                n = len(b)
                acts = vm.actions[at : at + n]
                patched = np.flatnonzero(acts == PATCH) + at
                refs = self._reference_pages(v, patched)
                yield Batch(v, at, b.pages, acts, refs)
                at += n
                done += n
                if self.on_progress is not None:
                    self.on_progress("applying", done, total)

    def _reference_pages(self, v: int, positions: npt.NDArray[np.int64]) -> npt.NDArray[np.uint8]:
        vm = self.plan.vms[v]
        out = np.empty((len(positions), PAGE_SIZE), dtype=np.uint8)
        rv, rg = vm.ref_vm[positions], vm.ref_gfn[positions]
        for r in np.unique(rv).tolist():
            sel = rv == r
            out[sel] = self.dumps[r].pages_at(rg[sel].astype(np.uint64))
        return out

    def _take(self, result: Encoded) -> None:
        """Write one encoded batch: its blobs and checksums; its pages for frames to the fills."""
        v, lo = result.vm, result.lo
        vm = self.plan.vms[v]
        n = len(result.checksums)
        if len(result.not_zero):
            gfn = int(vm.gfns[lo + int(result.not_zero[0])])
            raise StalePlan(
                self.plan.path, f"VM {v} ({vm.name}) gfn {gfn:#x}: planned as a zero page, it is not"
            )
        self.sums[v][lo : lo + n] = result.checksums
        acts = vm.actions[lo : lo + n]
        stored = np.flatnonzero(stored_mask(acts))
        ids = self.objects.at_position[v][lo : lo + n][stored]
        self.objects.checksum[ids] = result.checksums[stored]
        self._write_blobs(ids, acts[stored], result.blobs)
        if self.pack:
            self._add_to_frames(result, ids, acts[stored])

    def _write_blobs(
        self, ids: npt.NDArray[np.int64], acts: npt.NDArray[np.uint8], blobs: list[bytes | None]
    ) -> None:
        keep = [i for i, b in enumerate(blobs) if b is not None]
        if not keep:
            return
        chunk = [blobs[i] for i in keep]
        data = b"".join(b for b in chunk if b is not None)
        lengths = np.fromiter((len(b) for b in chunk if b is not None), dtype=np.int64, count=len(chunk))
        pack, at = self.writer.packs.append(data)
        objs = ids[keep]
        o = self.objects
        o.where[objs] = pack
        o.offset[objs] = at + np.concatenate(([0], np.cumsum(lengths)[:-1]))
        o.length[objs] = lengths
        a = acts[keep]
        codec = np.zeros(len(keep), dtype=np.uint8)
        if self.compression is not None:
            codec[a == COMPRESS] = self.compression.id
        if self.patch is not None:
            codec[a == PATCH] = self.patch.id
        o.codec[objs] = codec

    # --- frames --------------------------------------------------------------------------------

    def _add_to_frames(self, result: Encoded, ids: I64, acts: npt.NDArray[np.uint8]) -> None:
        framed = np.array([b is None for b in result.blobs], dtype=np.bool_)
        if not framed.any():
            return
        kinds = acts[framed] == PATCH
        raw_ids, stored = ids[framed][~kinds], result.incompressible
        self._fills[0].add(result.raw[~stored], raw_ids[~stored])
        self._fills[1].add(result.xor, ids[framed][kinds])
        self._fills[2].add(result.raw[stored], raw_ids[stored])
        self._flush_frames(final=False)

    def _flush_frames(self, final: bool) -> None:
        """Submit the frames the fills hold (every page left, when ``final``)."""
        for fill in self._fills:
            while fill.count >= FRAME_PAGES or (final and fill.count):
                pages, ids = fill.take(FRAME_PAGES)
                frame = self._frames_submitted
                self._frames_submitted += 1
                o = self.objects
                o.codec[ids] = fill.object_codec
                o.where[ids] = frame
                o.offset[ids] = np.arange(len(ids), dtype=np.uint64)
                o.length[ids] = PAGE_SIZE
                self._frame_jobs.append(self._pool.submit(self._compress_frame, frame, fill.codec, pages))

    def _compress_frame(
        self, frame: int, codec_name: str, pages: npt.NDArray[np.uint8]
    ) -> tuple[int, str, bytes, int]:
        codecs: dict[str, FrameCodec] | None = getattr(self._codec_local, "codecs", None)
        if codecs is None:
            codecs = self._codec_local.codecs = {}
        if codec_name == AUTO:
            lzma2 = [_codec(codecs, name, True) for name in AUTO_LZMA2]
            codec = choose_codec(pages, lzma2, _codec(codecs, "zstd-9"))
        else:
            codec = _codec(codecs, codec_name)
        return frame, codec.name, codec.compress(pages), len(pages)

    def _write_frames(self, limit: int) -> None:
        """Write the compressed frames, in order: those finished, and then, while more than
        ``limit`` are in flight, the oldest once it is finished (``limit=0``: all of them)."""
        jobs = self._frame_jobs
        while jobs and (jobs[0].done() or len(jobs) > limit):
            self._write_frame(*jobs.popleft().result())

    def _write_frame(self, frame: int, codec: str, blob: bytes, pages: int) -> None:
        pack, at = self.writer.packs.append(blob)
        assert frame == len(self.frame_rows)
        self.frame_rows.append((frame, pack, at, len(blob), pages, codec, xxhash.xxh3_64_intdigest(blob)))

    # --- after the pass ----------------------------------------------------------------------

    def _check_shared(self) -> None:
        """Every shared page has its kept copy's checksum."""
        for v, vm in enumerate(self.plan.vms):
            share = np.flatnonzero(vm.actions == SHARE)
            if not len(share):
                continue
            kept = self.objects.page_object[v][share]
            bad = self.sums[v][share] != self.objects.checksum[kept]
            if bad.any():
                k = int(share[int(np.argmax(bad))])
                raise StalePlan(
                    self.plan.path,
                    f"VM {v} ({vm.name}) gfn {int(vm.gfns[k]):#x}: planned as a copy of VM "
                    f"{int(vm.ref_vm[k])} gfn {int(vm.ref_gfn[k]):#x}, but their contents differ "
                    "(make the plan again, with --verify)",
                )

    def _commit(self) -> ApplyResult:
        vm_bytes = self._vm_bytes()
        rows = [self._vm_row(v, b) for v, b in enumerate(vm_bytes)]
        written: list[WrittenPack] = []

        def fill(catalog: CatalogWriter, packs: list[WrittenPack]) -> None:
            written.extend(packs)
            catalog.meta(self._meta())
            for row in rows:
                catalog.vm(row)
            for k, p in enumerate(packs):
                catalog.pack(k, p.file, p.size, p.checksum)
            catalog.frames(self.frame_rows)
            catalog.columns("objects", -1, self.objects.columns(), OBJECT_COLUMNS)
            for v in range(len(self.plan.vms)):
                catalog.columns("pages", v, self.objects.page_map(v), PAGE_COLUMNS)

        self.writer.commit(fill)
        return self._result(vm_bytes, written)

    def _meta(self) -> dict[str, Any]:
        return {
            "format": layout.FORMAT,
            "run": self.writer.run.hex(),
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "dengine": __version__,
            "plan": json.dumps(self.plan.head),
            "plan_file": str(self.plan.path.resolve()),
            "packed": "1" if self.pack else "0",
            "frame_codec": self.frame_codec if self.pack else "",
            "page_checksum": layout.PAGE_CHECKSUM,
            "image_checksum": layout.IMAGE_CHECKSUM,
        }

    def _vm_row(self, v: int, b: VmBytes) -> VmRow:
        vm, dump = self.plan.vms[v], self.dumps[v]
        pairs = np.stack((vm.gfns, self.sums[v]), axis=1).astype("<u8")
        return VmRow(
            vm=v,
            name=vm.name,
            dump=vm.dump,
            facts=dump.facts.to_dict(),
            pages=len(vm.gfns),
            zero_pages=int(np.count_nonzero(vm.actions == ZERO)),
            ranges=np.asarray(dump.ranges(), dtype=np.uint64).reshape(-1),
            image_checksum=xxhash.xxh3_128_hexdigest(pairs.tobytes()),
            bytes=b.to_dict(),
        )

    def _vm_bytes(self) -> list[VmBytes]:
        return vm_bytes(self.plan, self.objects, self.frame_rows)

    def _result(self, vms: list[VmBytes], packs: list[WrittenPack]) -> ApplyResult:
        from dengine_cli.store.layout import CATALOG, PACK_HEADER

        catalog = (self.writer.store / CATALOG).stat().st_size
        used = collections.Counter(row[5] for row in self.frame_rows)
        data = sum(p.size for p in packs) - PACK_HEADER.size * len(packs)
        return ApplyResult(
            store=self.writer.store,
            packed=self.pack,
            vms=vms,
            data_bytes=data,
            metadata_bytes=catalog + PACK_HEADER.size * len(packs),
            catalog_bytes=catalog,
            pack_files=len(packs),
            objects=self.objects.count,
            frames=len(self.frame_rows),
            frame_codec=self.frame_codec if self.pack else None,
            stored_frames=used.get(STORED, 0),
            frame_codecs=dict(sorted(used.items())),
        )


def _codec(codecs: dict[str, FrameCodec], name: str, wide_dictionary: bool = False) -> FrameCodec:
    """The frame codec ``name`` from a thread's ``codecs`` (LZMA2 with the wider
    dictionary: ``wide_dictionary``), made the first time."""
    key = f"{name}:{wide_dictionary}"
    found = codecs.get(key)
    if found is None:
        found = codecs[key] = FrameCodec(name, wide_dictionary=wide_dictionary)
    return found
