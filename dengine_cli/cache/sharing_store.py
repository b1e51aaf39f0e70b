"""The exact sharing of a set of dumps, cached beside their indexes.

Sharing is a pure function of the dumps' contents, their order and whether sharing crosses VMs.
Capacity planners run several commands over the same dumps (``analyze``, then ``plan`` under one
policy after another), and each would group every page by hash and compare every match byte by
byte again: on 1.5 GiB of dumps that is a third of a sampled plan.  So the result is stored in the
index directory under a key made of the cache keys of the dumps' indexes (each names a dump file
as it is now: path, device, inode, size, mtime, ctime), in the order given, plus ``cross_vm`` and
the hash width; a rewritten dump changes its key, and the stored result is never matched again.

On disk (the framing of :mod:`dengine_cli.cache.files`): magic b"DENGSHR\\0", version
:data:`SHARING_VERSION`, a JSON header (the key, every per-VM figure of the report, the
checksum), then the content id of every present page, VM after VM (u32, or u64 past 2**32 - 1
contents), zero padding to a multiple of 8 bytes, and the pairwise matrix (i64, VMs x VMs, row
by row).  The checksum covers the ids and the matrix.

4 bytes per page, written atomically; a file failing any check (magic, version, key, sizes, xxh3
checksum) is ignored and replaced.  Only indexes that
are themselves cached (they carry a key) make a cacheable set.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from dengine_cli.cache import files
from dengine_cli.cache.index_store import still_current
from dengine_cli.cache.keys import default_index_dir
from dengine_cli.engine.index import PageIndex
from dengine_cli.engine.sharing.model import ContentIds, CopyCounts, SharingReport, VmSharing
from dengine_cli.errors import UnreadableFile

SHARING_MAGIC = b"DENGSHR\0"


#: Bump whenever the layout or the meaning of a figure changes.
SHARING_VERSION = 4


SHARING_SUFFIX = ".shr"


def sharing_key(
    indexes: Sequence[PageIndex], cross_vm: bool, hash_bits: int, verified: bool = False
) -> dict[str, Any] | None:
    """What a stored sharing result is valid for; ``None`` when an index has no key (built in
    memory only: its dump cannot be named)."""
    keys = [ix.key for ix in indexes]
    if any(k is None for k in keys):
        return None
    return {
        "sharing_version": SHARING_VERSION,
        "indexes": keys,
        "cross_vm": cross_vm,
        "hash_bits": hash_bits,
        "verified": verified,
    }


def file_for(key: dict[str, Any], index_dir: Path | str | None) -> Path:
    return files.name_for(key, index_dir if index_dir is not None else default_index_dir(), SHARING_SUFFIX)


def load(
    file: Path, key: dict[str, Any], names: Sequence[str], counts: Sequence[int]
) -> SharingReport | None:
    """The report stored in ``file`` if it is intact and made for ``key`` (the VMs named
    ``names``, with ``counts`` pages each); ``None`` otherwise."""
    found = files.read_header(file, SHARING_MAGIC, SHARING_VERSION)
    if found is None:
        return None
    header, data, size = found
    if header.get("key") != key:
        return None
    try:
        dtype = np.uint32 if header["id_dtype"] == "uint32" else np.uint64
        total, n = sum(counts), len(counts)
        at = data + _matrix_offset(np.dtype(dtype).itemsize * total)
        if header["counts"] != list(counts) or size != at + 8 * n * n:
            return None
        ids: Any = (
            np.memmap(file, dtype=dtype, mode="r", offset=data, shape=(total,))
            if total
            else np.zeros(0, dtype=dtype)
        )
        matrix = np.fromfile(file, dtype="<i8", count=n * n, offset=at).astype(np.int64).reshape(n, n)
        if header.get("checksum") != files.checksum((ids, matrix)):
            return None
        bounds = np.cumsum([0, *counts]).tolist()
        content_ids: tuple[ContentIds, ...] = tuple(ids[a:b] for a, b in itertools.pairwise(bounds))
        vms = tuple(VmSharing(name=name, **fig) for name, fig in zip(names, header["vms"], strict=True))
        return SharingReport(
            vms=vms,
            total=VmSharing(name="total", **header["total"]),
            copy_counts=CopyCounts(
                np.array(header["copy_counts"]["copies"], dtype=np.int64),
                np.array(header["copy_counts"]["contents"], dtype=np.int64),
            ),
            matrix=matrix,
            contents=int(header["contents"]),
            collisions=int(header["collisions"]),
            cross_vm=bool(header["cross_vm"]),
            hash_bits=int(header["hash_bits"]),
            content_ids=content_ids,
            verified=bool(header["verified"]),
        )
    except (OSError, ValueError, KeyError, TypeError):
        return None  # unreadable or not ours: a cache miss, never a crash


def store(report: SharingReport, key: dict[str, Any], file: Path) -> bool:
    """Store ``report`` for ``key`` at ``file`` atomically; ``False`` when that is not possible
    (a read-only or full cache directory is not an error)."""
    wide = any(ids.dtype == np.uint64 for ids in report.content_ids)
    dtype = np.uint64 if wide else np.uint32
    # VM by VM, never one copy of them all: they may be larger than memory (mapped files).
    ids = [np.asarray(a, dtype=dtype) for a in report.content_ids]
    # In the data, not the JSON header: a VM pair a cell, it is most of a header of hundreds of
    # VMs (1,100 VMs made a 4 MB header, past what a header may be, and the result never loaded).
    matrix = np.ascontiguousarray(report.matrix, dtype="<i8")

    def figures(vm: VmSharing) -> dict[str, int]:
        return {k: v for k, v in dataclasses.asdict(vm).items() if k != "name"}

    header = {
        "key": key,
        "counts": [len(a) for a in report.content_ids],
        "id_dtype": "uint64" if wide else "uint32",
        "vms": [figures(vm) for vm in report.vms],
        "total": figures(report.total),
        "copy_counts": report.copy_counts.to_dict(),
        "contents": report.contents,
        "collisions": report.collisions,
        "cross_vm": report.cross_vm,
        "hash_bits": report.hash_bits,
        "verified": report.verified,
        "checksum": files.checksum([*ids, matrix]),
    }
    id_bytes = sum(a.nbytes for a in ids)
    pad = np.zeros(_matrix_offset(id_bytes) - id_bytes, dtype=np.uint8)
    return files.write(file, SHARING_MAGIC, SHARING_VERSION, header, [*ids, pad, matrix])


def _matrix_offset(id_bytes: int) -> int:
    """Where the matrix starts after the content ids (8-byte aligned)."""
    return -(-id_bytes // 8) * 8


def still_valid(file: Path) -> bool:
    """Whether ``file`` is a sharing result whose dumps are all still as they were."""
    if file.name.startswith(".tmp-"):
        return False
    found = files.read_header(file, SHARING_MAGIC, SHARING_VERSION)
    if found is None:
        return False
    try:
        key = found[0]["key"]
        if not all(still_current(ix_key) for ix_key in key["indexes"]):
            return False
        return bool(file_for(key, file.parent) == file)
    except (OSError, ValueError, KeyError, TypeError, UnreadableFile):
        return False
