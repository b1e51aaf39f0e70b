"""``dengine restore``: a VM of a store as a flat raw image (what ``dengine extract`` writes of the
original dump, byte for byte) or as an ELF core whose PT_LOADs are the dump's present ranges.

Both are sparse: a zero page is a hole.  Every page is checked against its checksum as it is
decoded and the VM's image checksum at the end; the image is written under a temporary name in
the output's directory and renamed only when every check passed, so a damaged store never leaves
a wrong image behind (:class:`~dengine_cli.errors.StoreDamaged`, exit 7, names the VM and gfn).
Chunks of pages are written by a thread of their own while the next chunk is decoded
(:class:`~dengine_cli.parallel.Behind`; writing the four bench dumps' images took a third of
their restore).
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

import numpy as np
import numpy.typing as npt
import xxhash

from dengine_cli.errors import OutputError, StoreDamaged
from dengine_cli.outputs import atomic_output, set_size
from dengine_cli.pages import PAGE_SIZE
from dengine_cli.parallel import Behind
from dengine_cli.store.catalog import VmRow
from dengine_cli.store.layout import ZERO_PAGE_CHECKSUM
from dengine_cli.store.reader import StoreReader

#: Pages decoded before they are written.
CHUNK = 4096
#: Decoded chunks waiting to be written, at most.
CHUNKS_AHEAD = 2

# ELF64 little-endian core file (System V gABI): header, program headers.
ELF_HEADER = struct.Struct("<16sHHIQQQIHHHHHH")
PROGRAM_HEADER = struct.Struct("<IIQQQQQQ")
ET_CORE, PT_LOAD, PF_RWX = 4, 1, 7
#: e_phnum at or past which the count moves to section header 0 (not written here).
PN_XNUM = 0xFFFF
EV_CURRENT = 1
#: e_machine by the architecture names readers report (gABI machine numbers).
MACHINES = {"x86": 3, "mips": 8, "ppc": 20, "ppc64": 21, "s390": 22, "arm": 40, "x86_64": 62,
            "aarch64": 183, "riscv": 243}  # fmt: skip

Progress = Callable[[int], None]


def restore_vm(
    reader: StoreReader, vm: VmRow, output: Path, fmt: str = "raw", on_progress: Progress | None = None
) -> int:
    """Write VM ``vm`` to ``output`` as ``raw`` or ``elf``; returns the image size."""
    ranges = vm.ranges.reshape(-1, 2).astype(np.int64)
    if fmt == "elf":
        if len(ranges) >= PN_XNUM:
            raise OutputError(
                output, f"VM {vm.name} has {len(ranges)} ranges, more than an ELF header counts"
            )
        header, place = _elf_layout(vm, ranges)
    else:
        header, place = b"", None
    size = _image_size(ranges, place)
    with atomic_output(output, sync=False, image=True) as f:
        f.write(header)
        _write_pages(reader, vm, f, place, on_progress)
        set_size(f, size)
    return size


def _image_size(ranges: npt.NDArray[np.int64], place: npt.NDArray[np.int64] | None) -> int:
    if not len(ranges):
        return 0 if place is None else ELF_HEADER.size
    if place is None:
        return int(ranges[-1, 0] + ranges[-1, 1]) * PAGE_SIZE
    return int(place[-1] + ranges[-1, 1] * PAGE_SIZE)


def _write_pages(
    reader: StoreReader,
    vm: VmRow,
    f: BinaryIO,
    place: npt.NDArray[np.int64] | None,
    on_progress: Progress | None,
) -> None:
    """Decode, check and write every non-zero page; then check the image checksum."""
    gfns, objs = reader.page_map(vm)
    present = vm.present_gfns
    sums = np.full(len(present), ZERO_PAGE_CHECKSUM, dtype=np.uint64)
    at = np.searchsorted(present, gfns)
    if len(gfns) and (at.max() >= len(present) or not np.array_equal(present[at], gfns)):
        raise StoreDamaged(reader.store, f"VM {vm.name}: its page map lists pages outside its ranges")
    decoder = reader.decoder()
    offsets = _file_offsets(vm, gfns, place)

    def write(chunk: tuple[npt.NDArray[np.uint8], npt.NDArray[np.int64]]) -> None:
        _write_runs(f, *chunk)

    with Behind(write, CHUNKS_AHEAD) as writer:
        for lo in range(0, len(gfns), CHUNK):
            hi = min(lo + CHUNK, len(gfns))
            pages, bad = decoder.pages(objs[lo:hi])
            if bad:
                i = min(bad)
                raise StoreDamaged(reader.store, f"VM {vm.name} gfn {int(gfns[lo + i]):#x}: {bad[i]}")
            sums[at[lo:hi]] = decoder.checksum[objs[lo:hi]]
            writer.put((pages, offsets[lo:hi]))
            if on_progress is not None:
                on_progress(hi - lo)
    pairs = np.stack((present, sums), axis=1).astype("<u8")
    if xxhash.xxh3_128_hexdigest(pairs.tobytes()) != vm.image_checksum:
        raise StoreDamaged(reader.store, f"VM {vm.name}: image checksum mismatch (its page map is damaged)")


def _file_offsets(
    vm: VmRow, gfns: npt.NDArray[np.uint64], place: npt.NDArray[np.int64] | None
) -> npt.NDArray[np.int64]:
    """Where each page goes in the output: its physical address, or its place in its PT_LOAD."""
    g = gfns.astype(np.int64)
    if place is None:
        return g * PAGE_SIZE
    ranges = vm.ranges.reshape(-1, 2).astype(np.int64)
    k = np.searchsorted(ranges[:, 0], g, side="right") - 1
    out: npt.NDArray[np.int64] = place[k] + (g - ranges[k, 0]) * PAGE_SIZE
    return out


def _write_runs(f: BinaryIO, pages: npt.NDArray[np.uint8], offsets: npt.NDArray[np.int64]) -> None:
    """Write pages whose file offsets follow each other with one call per run."""
    if not len(pages):
        return
    breaks = np.flatnonzero(np.diff(offsets) != PAGE_SIZE) + 1
    starts = np.concatenate(([0], breaks)).tolist()
    ends = np.concatenate((breaks, [len(pages)])).tolist()
    for s, e in zip(starts, ends, strict=True):
        f.seek(int(offsets[s]))
        f.write(pages[s:e].data)


def _elf_layout(vm: VmRow, ranges: npt.NDArray[np.int64]) -> tuple[bytes, npt.NDArray[np.int64]]:
    """The ELF header and program headers of the VM's core file, and the file offset of each
    range's data (page aligned, in range order)."""
    n = len(ranges)
    headers = ELF_HEADER.size + n * PROGRAM_HEADER.size
    first = -(-headers // PAGE_SIZE) * PAGE_SIZE
    sizes = ranges[:, 1] * PAGE_SIZE
    place = first + np.concatenate(([0], np.cumsum(sizes)[:-1])).astype(np.int64)
    machine = MACHINES.get(str(vm.facts.get("arch") or "x86_64"), 0)
    ident = b"\x7fELF" + bytes([2, 1, EV_CURRENT, 0]) + bytes(8)
    head = ELF_HEADER.pack(ident, ET_CORE, machine, EV_CURRENT, 0, ELF_HEADER.size, 0, 0,
                           ELF_HEADER.size, PROGRAM_HEADER.size, n, 0, 0, 0)  # fmt: skip
    phdrs = b"".join(
        PROGRAM_HEADER.pack(PT_LOAD, PF_RWX, int(place[i]), int(ranges[i, 0]) * PAGE_SIZE,
                            int(ranges[i, 0]) * PAGE_SIZE, int(sizes[i]), int(sizes[i]), PAGE_SIZE)
        for i in range(n)
    )  # fmt: skip
    return head + phdrs, place
