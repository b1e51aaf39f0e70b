"""Make a fleet of guest dumps from a few real QEMU dumps: N flat images with shared and changed pages.

Input: real ``dump-guest-memory`` ELF dumps (ELF64 little-endian; default
``/work/bench-data/bench-1.elf`` .. ``bench-4.elf``, made by ``bench/make_bench_dumps.py``).
Output (``--out``, default ``/work/bench-data/fleet-N``): ``fleet-00.raw`` .. ``fleet-<N-1>.raw``,
each a raw flat image (offset = guest physical address; dengine reads them by the ``.raw``
suffix) of ``--guest-mib`` MiB, and ``fleet-manifest.json`` (sources, seed, per-guest counts).

Fleet guest *i* is a copy of the first ``--guest-mib`` MiB of RAM of source ``i mod len(sources)``
(RAM: the PT_LOAD segments below 3 GiB; what no segment covers, such as the legacy VGA window
0xa0000-0xbffff, is zero). Of that copy's non-zero pages, a seeded ``--random-share`` (default
10 %) is replaced by fresh random content (unique to the guest) and another, disjoint, seeded
``--small-share`` (default 5 %) gets 1-8 bytes changed (XOR with a non-zero byte at 1-8 seeded
offsets), so that exact sharing, patching (similar pages) and compression all have work.

Deterministic: guest *i*'s content depends only on the sources, ``--guest-mib``, the shares,
``--seed`` and *i* (not on ``--guests``), so the first 4 guests of a 16-guest fleet are the
4 guests of a 4-guest fleet made with the same options. Pages are changed in numpy batches; each
image is written under a temporary name in ``--out`` and renamed into place.

Usage::

    python3 bench/make_fleet.py --guests 16 [--guest-mib 256] [--out DIR] [--seed N] [SOURCES ...]
"""

from __future__ import annotations

import argparse
import json
import os
import struct
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

PAGE_SIZE = 4096
DATA_DIR = Path("/work/bench-data")
DEFAULT_SOURCES = tuple(DATA_DIR / f"bench-{i}.elf" for i in range(1, 5))
# Guest RAM is below this in QEMU's ELF dumps of a pc guest < 3 GiB; above it VGA VRAM and BIOS flash.
DEVICE_BASE = 0xC000_0000
DEFAULT_SEED = 0xF1EE7
PT_LOAD = 1

Pages = npt.NDArray[np.uint8]  # shape (pages, PAGE_SIZE)


class FleetError(RuntimeError):
    """A source dump that cannot be used (not ELF64 LE, too little RAM, unaligned segment)."""


@dataclass(frozen=True)
class Segment:
    """One PT_LOAD: guest physical address, file offset, bytes in the file."""

    paddr: int
    offset: int
    filesz: int


def pt_loads(path: Path) -> list[Segment]:
    """The PT_LOAD segments of an ELF64 little-endian file (``e_phnum`` PN_XNUM handled)."""
    with path.open("rb") as f:
        ehdr = f.read(64)
        if len(ehdr) < 64 or ehdr[:4] != b"\x7fELF" or ehdr[4] != 2 or ehdr[5] != 1:
            raise FleetError(f"{path}: not an ELF64 little-endian file")
        (phoff, shoff) = struct.unpack_from("<QQ", ehdr, 32)
        phentsize, phnum = struct.unpack_from("<HH", ehdr, 54)
        if phnum == 0xFFFF:  # PN_XNUM: the real count is section header 0's sh_info
            f.seek(shoff + 44)
            (phnum,) = struct.unpack("<I", f.read(4))
        if phentsize < 56:
            raise FleetError(f"{path}: program header entries of {phentsize} bytes")
        f.seek(phoff)
        table = f.read(phentsize * phnum)
    if len(table) < phentsize * phnum:
        raise FleetError(f"{path}: program header table truncated")
    segs: list[Segment] = []
    for i in range(phnum):
        p_type, _flags, offset, _vaddr, paddr, filesz = struct.unpack_from("<IIQQQQ", table, i * phentsize)
        if p_type == PT_LOAD and filesz:
            segs.append(Segment(paddr, offset, filesz))
    return segs


def read_ram(path: Path, nbytes: int) -> Pages:
    """The first ``nbytes`` of guest physical memory (RAM segments only; gaps are zero)."""
    out = np.zeros(nbytes, np.uint8)
    ram_end = 0
    size = path.stat().st_size
    with path.open("rb") as f:
        for s in pt_loads(path):
            if s.paddr >= DEVICE_BASE:
                continue
            if s.paddr % PAGE_SIZE or s.filesz % PAGE_SIZE:
                raise FleetError(f"{path}: segment at {s.paddr:#x} is not page-aligned")
            if s.offset + s.filesz > size:
                raise FleetError(f"{path}: segment at {s.paddr:#x} runs past the end of the file")
            ram_end = max(ram_end, s.paddr + s.filesz)
            n = min(s.filesz, nbytes - s.paddr)
            if n <= 0:
                continue
            f.seek(s.offset)
            if f.readinto(out.data[s.paddr : s.paddr + n]) != n:
                raise FleetError(f"{path}: short read of the segment at {s.paddr:#x}")
    if ram_end < nbytes:
        raise FleetError(f"{path}: RAM ends at {ram_end >> 20} MiB, below the {nbytes >> 20} MiB asked for")
    return out.reshape(-1, PAGE_SIZE)


def nonzero_pages(pages: Pages) -> npt.NDArray[np.intp]:
    """Indexes of the pages that are not all zero."""
    return np.flatnonzero(pages.view(np.uint64).any(axis=1))


@dataclass
class GuestStats:
    """What one fleet guest got."""

    name: str
    source: str
    pages: int
    nonzero_pages: int
    random_pages: int
    small_change_pages: int


def make_guest(
    source: Pages, index: int, seed: int, random_share: float, small_share: float
) -> tuple[Pages, int, int]:
    """Fleet guest ``index``: a copy of ``source`` with its seeded page changes.

    Returns (pages, random pages, small-change pages). The chosen pages are disjoint; each
    small-change page gets k in 1..8 seeded offsets XORed with non-zero bytes (offsets may
    repeat, so 1-k bytes differ).
    """
    rng = np.random.default_rng([seed, index])
    pages = source.copy()
    nz = nonzero_pages(pages)
    order = rng.permutation(nz)
    n_random = round(random_share * len(nz))
    n_small = min(round(small_share * len(nz)), len(nz) - n_random)
    rand_idx = np.sort(order[:n_random])
    small_idx = np.sort(order[n_random : n_random + n_small])
    if n_random:
        fresh = np.frombuffer(rng.bytes(n_random * PAGE_SIZE), np.uint8).reshape(n_random, PAGE_SIZE)
        pages[rand_idx] = fresh
    if n_small:
        counts = rng.integers(1, 9, n_small)
        offsets = rng.integers(0, PAGE_SIZE, (n_small, 8))
        values = rng.integers(1, 256, (n_small, 8), dtype=np.uint8)
        used = np.arange(8) < counts[:, None]
        rows = np.broadcast_to(small_idx[:, None], (n_small, 8))[used]
        cols, vals = offsets[used], values[used]
        pages[rows, cols] = pages[rows, cols] ^ vals
    return pages, n_random, n_small


def write_atomically(path: Path, pages: Pages) -> None:
    """Write ``pages`` to ``path`` via a temporary name in the same directory and a rename."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with tmp.open("wb") as f:
            f.write(pages.data)
        tmp.chmod(0o644)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Command-line arguments."""
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0] if __doc__ else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument(
        "sources", nargs="*", type=Path, help="ELF dumps (default: /work/bench-data/bench-{1..4}.elf)"
    )
    ap.add_argument("--guests", type=int, required=True, help="fleet size N")
    ap.add_argument("--guest-mib", type=int, default=256, help="MiB per guest (default: %(default)s)")
    ap.add_argument("--out", type=Path, help="output directory (default: /work/bench-data/fleet-N)")
    ap.add_argument("--seed", type=int, default=DEFAULT_SEED, help="default: %(default)s")
    ap.add_argument(
        "--random-share",
        type=float,
        default=0.10,
        help="share of non-zero pages given fresh random content (default: %(default)s)",
    )
    ap.add_argument(
        "--small-share",
        type=float,
        default=0.05,
        help="share of non-zero pages given 1-8 changed bytes (default: %(default)s)",
    )
    args = ap.parse_args(argv)
    if args.guests < 1 or args.guest_mib < 1:
        ap.error("--guests and --guest-mib must be at least 1")
    if min(args.random_share, args.small_share) < 0 or args.random_share + args.small_share > 1:
        ap.error("--random-share and --small-share must be >= 0 and add up to at most 1")
    args.sources = args.sources or list(DEFAULT_SOURCES)
    args.out = args.out or DATA_DIR / f"fleet-{args.guests}"
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Read the sources, write the fleet and its manifest, print a summary."""
    args = parse_args(argv)
    t0 = time.monotonic()
    nbytes = args.guest_mib << 20
    sources = [read_ram(p, nbytes) for p in args.sources]
    args.out.mkdir(parents=True, exist_ok=True)
    width = max(2, len(str(args.guests - 1)))
    stats: list[GuestStats] = []
    for i in range(args.guests):
        k = i % len(sources)
        pages, n_random, n_small = make_guest(sources[k], i, args.seed, args.random_share, args.small_share)
        name = f"fleet-{i:0{width}d}.raw"
        write_atomically(args.out / name, pages)
        stats.append(
            GuestStats(name, str(args.sources[k]), len(pages), len(nonzero_pages(pages)), n_random, n_small)
        )
    manifest = {
        "generator": "bench/make_fleet.py",
        "sources": [str(p) for p in args.sources],
        "guest_mib": args.guest_mib,
        "seed": args.seed,
        "random_share": args.random_share,
        "small_share": args.small_share,
        "guests": [vars(s) for s in stats],
    }
    mtmp = args.out / ".fleet-manifest.json.tmp"
    mtmp.write_text(json.dumps(manifest, indent=2) + "\n")
    os.replace(mtmp, args.out / "fleet-manifest.json")
    pages_total = sum(s.pages for s in stats)
    nonzero_total = sum(s.nonzero_pages for s in stats)
    print(
        f"{args.out}: {args.guests} guests x {args.guest_mib} MiB = {args.guests * nbytes / 2**30:.2f} GiB, "
        f"{pages_total} pages, {nonzero_total} non-zero ({100 * nonzero_total / pages_total:.1f} %), "
        f"{sum(s.random_pages for s in stats)} random, {sum(s.small_change_pages for s in stats)} "
        f"with small changes; from {len(sources)} sources, seed {args.seed}, "
        f"{time.monotonic() - t0:.1f} s"
    )
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except FleetError as exc:
        print(f"make_fleet: error: {exc}", file=sys.stderr)
        sys.exit(1)
