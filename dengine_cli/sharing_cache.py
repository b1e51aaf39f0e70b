"""The exact sharing of a set of dumps, cached beside their indexes.

Sharing is a pure function of the dumps' contents, their order and whether sharing crosses VMs.
Capacity planners run several commands over the same dumps (``analyze``, then ``plan`` under one
policy after another), and each would group every page by hash and compare every match byte by
byte again: on 1.5 GiB of dumps that is a third of a sampled plan.  So the result is stored in the
index directory under a key made of the cache keys of the dumps' indexes (each names a dump file
as it is now: path, device, inode, size, mtime, ctime), in the order given, plus ``cross_vm`` and
the hash width; a rewritten dump changes its key, and the stored result is never matched again.

On-disk form (little-endian), version :data:`SHARING_VERSION`::

    0   8s   magic b"DENGSHR\\0"
    8   u32  format version
    12  u32  header length H
    16  H    header: UTF-8 JSON (the key, every figure of the report, the checksum)
    ... zero padding to a multiple of 64
    D   the content id of every present page, VM after VM (u32, or u64 past 2**32 - 1 contents)

4 bytes per page.  Written to a temporary name and renamed, as indexes are; a file failing any
check (magic, version, key, sizes, xxh3 checksum) is ignored and replaced.  Only indexes that
are themselves cached (they carry a key) make a cacheable set.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import struct
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import xxhash

from dengine_cli.formats.base import BATCH_PAGES, Dump, OpenOptions
from dengine_cli.index import INDEX_ALIGN, INDEX_HEADER_MAX, PageIndex, Progress, default_index_dir, index_key
from dengine_cli.sharing import ContentIds, KsmView, SharingReport, VmSharing, share

SHARING_MAGIC = b"DENGSHR\0"
#: Bump whenever the layout or the meaning of a figure changes.
SHARING_VERSION = 1
SHARING_PREFIX = struct.Struct("<8sII")
SHARING_SUFFIX = ".shr"


def sharing_key(indexes: Sequence[PageIndex], cross_vm: bool, hash_bits: int) -> dict[str, Any] | None:
    """What a stored sharing result is valid for; ``None`` when an index has no key (built in
    memory only: its dump cannot be named)."""
    keys = [ix.key for ix in indexes]
    if any(k is None for k in keys):
        return None
    return {"sharing_version": SHARING_VERSION, "indexes": keys, "cross_vm": cross_vm, "hash_bits": hash_bits}


def file_for(key: dict[str, Any], index_dir: Path | str | None) -> Path:
    digest = xxhash.xxh3_128_hexdigest(json.dumps(key, sort_keys=True).encode())
    return Path(index_dir if index_dir is not None else default_index_dir()) / (digest + SHARING_SUFFIX)


def cached_share(
    indexes: Sequence[PageIndex],
    dumps: Sequence[Dump],
    index_dir: Path | str | None,
    *,
    cross_vm: bool = True,
    batch_pages: int = BATCH_PAGES,
    on_progress: Progress | None = None,
) -> SharingReport:
    """:func:`~dengine_cli.sharing.share`, read from the cache when it holds this very set of
    dumps, else computed and stored (when the cache directory is writable)."""
    key = sharing_key(indexes, cross_vm, 64)
    if key is not None:
        file = file_for(key, index_dir)
        names = [d.name for d in dumps]
        found = load(file, key, names, [ix.page_count for ix in indexes])
        if found is not None:
            return found
    report = share(indexes, dumps, cross_vm=cross_vm, batch_pages=batch_pages, on_progress=on_progress)
    if key is not None:
        store(report, key, file)
    return report


def load(
    file: Path, key: dict[str, Any], names: Sequence[str], counts: Sequence[int]
) -> SharingReport | None:
    """The report stored in ``file`` if it is intact and made for ``key`` (the VMs named
    ``names``, with ``counts`` pages each); ``None`` otherwise."""
    try:
        with open(file, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            prefix = f.read(SHARING_PREFIX.size)
            if len(prefix) != SHARING_PREFIX.size:
                return None
            magic, version, header_len = SHARING_PREFIX.unpack(prefix)
            if magic != SHARING_MAGIC or version != SHARING_VERSION or header_len > INDEX_HEADER_MAX:
                return None
            header = json.loads(f.read(header_len))
        if not isinstance(header, dict) or header.get("key") != key:
            return None
        itemsize = 4 if header["id_dtype"] == "uint32" else 8
        total = sum(counts)
        data = _data_offset(header_len)
        if header["counts"] != list(counts) or size != data + itemsize * total:
            return None
        dtype = np.uint32 if itemsize == 4 else np.uint64
        ids: Any = (
            np.memmap(file, dtype=dtype, mode="r", offset=data, shape=(total,))
            if total
            else np.zeros(0, dtype=dtype)
        )
        if header.get("checksum") != xxhash.xxh3_64_hexdigest(np.ascontiguousarray(ids).data.cast("B")):
            return None
        bounds = np.cumsum([0, *counts]).tolist()
        content_ids: tuple[ContentIds, ...] = tuple(ids[a:b] for a, b in itertools.pairwise(bounds))
        vms = tuple(VmSharing(name=name, **fig) for name, fig in zip(names, header["vms"], strict=True))
        return SharingReport(
            vms=vms,
            total=VmSharing(name="total", **header["total"]),
            ksm=KsmView(**header["ksm"]),
            matrix=np.array(header["matrix"], dtype=np.int64).reshape(len(counts), len(counts)),
            contents=int(header["contents"]),
            collisions=int(header["collisions"]),
            cross_vm=bool(header["cross_vm"]),
            hash_bits=int(header["hash_bits"]),
            content_ids=content_ids,
        )
    except (OSError, ValueError, KeyError, TypeError):
        return None  # unreadable or not ours: a cache miss, never a crash


def store(report: SharingReport, key: dict[str, Any], file: Path) -> bool:
    """Store ``report`` for ``key`` at ``file`` atomically; ``False`` when that is not possible
    (a read-only or full cache directory is not an error)."""
    wide = any(ids.dtype == np.uint64 for ids in report.content_ids)
    dtype = np.uint64 if wide else np.uint32
    ids = (
        np.concatenate([np.asarray(a, dtype=dtype) for a in report.content_ids])
        if report.content_ids
        else np.zeros(0, dtype=dtype)
    )

    def figures(vm: VmSharing) -> dict[str, int]:
        return {
            "present": vm.present,
            "zero": vm.zero,
            "shared_within": vm.shared_within,
            "shared_across": vm.shared_across,
            "kept": vm.kept,
            "unique": vm.unique,
        }

    header = json.dumps(
        {
            "key": key,
            "counts": [len(a) for a in report.content_ids],
            "id_dtype": "uint64" if wide else "uint32",
            "vms": [figures(vm) for vm in report.vms],
            "total": figures(report.total),
            "ksm": {
                "pages_shared": report.ksm.pages_shared,
                "pages_sharing": report.ksm.pages_sharing,
                "rmap_items": report.ksm.rmap_items,
            },
            "matrix": report.matrix.tolist(),
            "contents": report.contents,
            "collisions": report.collisions,
            "cross_vm": report.cross_vm,
            "hash_bits": report.hash_bits,
            "checksum": xxhash.xxh3_64_hexdigest(ids.data.cast("B")),
        },
        sort_keys=True,
    ).encode()
    tmp: str | None = None
    try:
        import tempfile

        file.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=SHARING_SUFFIX, dir=file.parent)
        with os.fdopen(fd, "wb") as f:
            f.write(SHARING_PREFIX.pack(SHARING_MAGIC, SHARING_VERSION, len(header)))
            f.write(header)
            f.write(bytes(_data_offset(len(header)) - SHARING_PREFIX.size - len(header)))
            f.write(ids.data.cast("B"))
        os.replace(tmp, file)
        tmp = None
        return True
    except OSError:
        return False
    finally:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)


def still_valid(file: Path) -> bool:
    """Whether ``file`` is a sharing result whose dumps are all still as they were."""
    if file.name.startswith(".tmp-"):
        return False
    try:
        with open(file, "rb") as f:
            prefix = f.read(SHARING_PREFIX.size)
            if len(prefix) != SHARING_PREFIX.size:
                return False
            magic, version, header_len = SHARING_PREFIX.unpack(prefix)
            if magic != SHARING_MAGIC or version != SHARING_VERSION or header_len > INDEX_HEADER_MAX:
                return False
            key = json.loads(f.read(header_len))["key"]
        for ix_key in key["indexes"]:
            options = OpenOptions(format=ix_key["format"], device_memory=bool(ix_key["device_memory"]))
            if index_key(ix_key["path"], options) != ix_key:
                return False
        return bool(file_for(key, file.parent) == file)
    except Exception:
        return False


def _data_offset(header_len: int) -> int:
    end = SHARING_PREFIX.size + header_len
    return -(-end // INDEX_ALIGN) * INDEX_ALIGN
