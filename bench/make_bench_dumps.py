"""Make the benchmark dumps: four 384 MiB Linux guests under QEMU (TCG) with a fuller workload.

What it makes (in ``--out``, default ``/work/bench-data``, outside the repo, never committed):

* ``bench-1.elf`` ... ``bench-4.elf``: ``dump-guest-memory`` ELF (paging=false) of each guest,
  paused at its READY1 marker;
* ``bench-1.qevm`` (migration stream, ``migrate exec:cat > FILE``) and ``bench-1.kdump``
  (``dump-guest-memory`` kdump-zlib, makedumpfile's flattened stream) from the same pause as
  ``bench-1.elf``, for ``bench/read_speed.py``;
* ``bench-manifest.json``: kernel, command line, workload per guest, console lines, and per dump
  its size, pages and non-zero pages.

The QEMU, QMP, kernel and initramfs code is ``fixtures/make_fixtures.py``'s (imported, one copy).
The kernel is Debian's packaged ``linux-image-amd64`` (``--kernel debian``; nokaslr, so its
~26 MB of text and data are the same pages in every guest, as a capacity planner sees them).

Workload (the guest's ``/work`` in its tmpfs rootfs, so every file page is one guest frame),
deterministic for a given host (the real files are read from this machine and the cached
Debian packages; the synthetic files come from fixed seeds):

* common to all guests: the Python 3.11 standard library sources (``/usr/lib/python3.11``,
  without ``__pycache__`` and site/dist-packages) and the kernel package's ``fs`` modules;
* four overlapping chunks (about ``--chunk-mib`` each) cut from, in order, the kernel
  package's ``net`` and ``sound`` modules and the ``kernel``, ``mm``, ``net`` directories of
  the cached kernel source tree: guest *i* gets chunks *i* and *i+1* (mod 4), so each chunk
  is in two guests;
* per guest, seeded: ``similar.bin`` (pages of the guest's real files with 1-8 bytes
  changed), ``logs.txt`` (log-like text), ``records.bin`` (half-filled pages of small
  binary records) and ``random.bin`` (random, similar to nothing).

That makes roughly half of each guest's RAM non-zero (the summary prints the figure). The
workload is bounded by the guest's rootfs: a tmpfs limited to half the RAM the kernel has while
it still holds the initrd (about 147 MB at 384 MiB), beyond which unpacking fails with
"Initramfs unpacking failed: write error" (the script checks for it and, in the dump, that
every workload page is there).

Run::

    python3 bench/make_bench_dumps.py [--out /work/bench-data] [--parallel 2]

Needs what ``make_fixtures.py --kernel debian`` needs (qemu-system-x86, busybox-static,
apt-get) and the kernel source tree that ``make_fixtures.py`` (tiny kernel) unpacked into its
work dir (``~/.cache/dengine-fixtures/kernel/src-*``).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "fixtures"))

import make_fixtures as mf  # noqa: E402

PAGE_SIZE = 4096
GUESTS = 4
BENCH_SEED = 0xBE7C_0000
# Guest RAM below this is RAM in QEMU's ELF dumps of a pc guest < 3 GiB; above it the VGA VRAM
# (0xFD000000) and the BIOS flash (0xFFFC0000).
DEVICE_BASE = 0xC000_0000
PYTHON_LIB = Path("/usr/lib/python3.11")
SIMILAR_PAGES = 1024
LOG_BYTES = 6 << 20
RECORD_BYTES = 4 << 20
RANDOM_BYTES = 4 << 20
_WORDS = (
    "GET",
    "POST",
    "user",
    "session",
    "cache",
    "miss",
    "hit",
    "request",
    "served",
    "backend",
    "timeout",
    "retry",
    "commit",
    "rollback",
    "query",
    "index",
    "worker",
    "queue",
    "shard",
    "page",
)


def log(msg: str) -> None:
    """Progress on stderr, with the same prefix style as make_fixtures."""
    print(f"[make_bench_dumps] {msg}", file=sys.stderr, flush=True)


def tree_files(root: Path, prefix: str) -> Iterator[tuple[str, Path]]:
    """(guest name, host path) of the regular files under ``root``, sorted, caches skipped."""
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root)
        if any(p in ("__pycache__", "site-packages", "dist-packages") for p in rel.parts):
            continue
        if path.is_file() and not path.is_symlink() and path.stat().st_size > 0:
            yield f"{prefix}/{rel}", path


def cut_chunks(
    files: Iterator[tuple[str, Path]], chunk_bytes: int, count: int
) -> list[list[tuple[str, Path]]]:
    """Cut a file stream into ``count`` chunks of about ``chunk_bytes`` (whole files)."""
    chunks: list[list[tuple[str, Path]]] = [[]]
    size = 0
    for item in files:
        if size >= chunk_bytes:
            if len(chunks) == count:
                break
            chunks.append([])
            size = 0
        chunks[-1].append(item)
        size += item[1].stat().st_size
    if len(chunks) < count or size < chunk_bytes // 2:
        raise mf.FixtureError(f"not enough source files for {count} chunks of {chunk_bytes} bytes")
    return chunks


def log_text(rng: random.Random, size: int) -> bytes:
    """Log-like lines (timestamps, words, numbers): compressible text."""
    lines: list[str] = []
    total = 0
    t = 1_700_000_000 + rng.randrange(10**6)
    while total < size:
        t += rng.randrange(3)
        words = " ".join(rng.choice(_WORDS) for _ in range(rng.randrange(3, 9)))
        line = (
            f"{t} host{rng.randrange(16):02d} [{rng.randrange(4096)}] {words} id={rng.getrandbits(32):08x}\n"
        )
        lines.append(line)
        total += len(line)
    return "".join(lines).encode()[:size]


def records(rng: random.Random, size: int) -> bytes:
    """Pages of 64-byte records (small counters, flags, ids), each page filled to a random level."""
    out = bytearray(size)
    for page in range(0, size, PAGE_SIZE):
        for off in range(page, page + rng.randrange(8, 64) * 64, 64):
            out[off : off + 24] = (
                rng.randrange(1 << 16).to_bytes(8, "little")
                + rng.randrange(64).to_bytes(8, "little")
                + rng.getrandbits(64).to_bytes(8, "little")
            )
    return bytes(out)


def similar_pages(rng: random.Random, files: dict[str, bytes], count: int) -> bytes:
    """``count`` full non-zero pages of the guest's real files, each with 1-8 bytes changed."""
    names = sorted(n for n, b in files.items() if len(b) >= PAGE_SIZE)
    out = bytearray()
    while len(out) < count * PAGE_SIZE:
        data = files[rng.choice(names)]
        start = rng.randrange(len(data) // PAGE_SIZE) * PAGE_SIZE
        page = bytearray(data[start : start + PAGE_SIZE])
        if not any(page):
            continue
        for _ in range(rng.randrange(1, 9)):
            page[rng.randrange(PAGE_SIZE)] ^= rng.randrange(1, 256)
        out += page
    return bytes(out)


@dataclass
class Sources:
    """Real file sets: what every guest has, and the chunks guests share pairwise."""

    common: list[tuple[str, Path]]
    chunks: list[list[tuple[str, Path]]]


def find_sources(kernel: mf.Kernel, work: Path, chunk_mib: int) -> Sources:
    """The common files and the overlapping chunks (see the module docstring)."""
    modules = kernel.vmlinuz.parent.parent / "lib" / "modules" / kernel.release / "kernel"
    srcs = sorted((work / "kernel").glob("src-*/Makefile"))
    if not srcs:
        raise mf.FixtureError(
            f"no kernel source tree in {work / 'kernel'}: run fixtures/make_fixtures.py once"
        )
    src = srcs[-1].parent
    common = [*tree_files(PYTHON_LIB, "python3.11"), *tree_files(modules / "fs", "modules/fs")]

    def pool() -> Iterator[tuple[str, Path]]:
        yield from tree_files(modules / "net", "modules/net")
        yield from tree_files(modules / "sound", "modules/sound")
        for sub in ("kernel", "mm", "net"):
            yield from tree_files(src / sub, f"linux/{sub}")

    return Sources(common, cut_chunks(pool(), chunk_mib << 20, GUESTS))


def guest_files(index: int, sources: Sources) -> dict[str, bytes]:
    """The workload of guest ``index`` (0-based): real files plus seeded synthetic ones."""
    files: dict[str, bytes] = {}
    for name, path in [*sources.common, *sources.chunks[index], *sources.chunks[(index + 1) % GUESTS]]:
        files[name] = path.read_bytes()
    rng = random.Random(BENCH_SEED + index)
    files["synthetic/similar.bin"] = similar_pages(rng, files, SIMILAR_PAGES)
    files["synthetic/logs.txt"] = log_text(rng, LOG_BYTES)
    files["synthetic/records.bin"] = records(rng, RECORD_BYTES)
    files["synthetic/random.bin"] = rng.randbytes(RANDOM_BYTES)
    return files


def count_pages(path: Path, ram_below: int, files: dict[str, bytes]) -> dict[str, int]:
    """Pages of an ELF dump: all PT_LOAD pages, RAM pages, non-zero RAM pages, and workload pages.

    ``workload_pages`` / ``workload_found``: distinct non-zero file pages (the last one of a file
    padded with zeros, as tmpfs holds it) and how many of them some RAM page equals.
    """
    wanted: set[bytes] = set()
    for data in files.values():
        for off in range(0, len(data), PAGE_SIZE):
            page = data[off : off + PAGE_SIZE].ljust(PAGE_SIZE, b"\0")
            if any(page):
                wanted.add(page)
    found: set[bytes] = set()
    out = {"pages": 0, "ram_pages": 0, "nonzero_ram_pages": 0}
    step = 16384
    with path.open("rb") as f:
        for seg in mf.elf_segments(path):
            n = seg["filesz"] // PAGE_SIZE
            out["pages"] += n
            if seg["paddr"] >= ram_below:
                continue
            out["ram_pages"] += n
            f.seek(seg["offset"])
            for first in range(0, n, step):
                k = min(step, n - first)
                buf = f.read(k * PAGE_SIZE)
                nonzero = np.frombuffer(buf, np.uint64).reshape(k, -1).any(axis=1)
                out["nonzero_ram_pages"] += int(np.count_nonzero(nonzero))
                for i in np.flatnonzero(nonzero).tolist():
                    page = buf[i * PAGE_SIZE : (i + 1) * PAGE_SIZE]
                    if page in wanted:
                        found.add(page)
    out["workload_pages"] = len(wanted)
    out["workload_found"] = len(found)
    return out


def run_bench_guest(
    index: int, args: argparse.Namespace, kernel: mf.Kernel, cmdline: str, sources: Sources
) -> dict[str, Any]:
    """Boot guest ``bench-<index+1>``, wait for READY1, pause, dump, quit; return its record."""
    name = f"bench-{index + 1}"
    t0 = time.monotonic()
    files = guest_files(index, sources)
    initrd = args.work / f"initramfs-{name}.cpio.gz"
    fw = kernel.fw_cfg.read_bytes() if kernel.fw_cfg else None
    mf.build_initramfs(initrd, name, files, fw, level=args.gzip_level)
    prep = time.monotonic() - t0
    log(
        f"{name}: {len(files)} files, {sum(map(len, files.values())) >> 20} MiB, initramfs "
        f"{initrd.stat().st_size >> 20} MiB in {prep:.1f} s"
    )
    vm = mf.Vm(name, "pc", args.mem, args.work / f"run-{name}")
    rec: dict[str, Any] = {"machine": "pc", "ram_bytes": args.mem << 20, "dumps": {}}
    try:
        t1 = time.monotonic()
        vm.start(kernel.vmlinuz, initrd, cmdline, args.boot_timeout)
        vm.wait_for("BOOTED", args.boot_timeout)
        text = vm.wait_for("READY1", args.boot_timeout)
        vm.cmd("stop")
        boot = time.monotonic() - t1
        if "Initramfs unpacking failed" in text:
            # rootfs is a tmpfs limited to half the RAM there is while the initrd is still held
            raise mf.FixtureError(f"{name}: the initramfs did not fit: {text.splitlines()[-8:]}")
        log(f"{name}: READY1 after {boot:.1f} s; paused")
        rec["console_ready1"] = [ln.strip() for ln in text.splitlines() if ln.startswith(mf.MARK)]
        rec["workload"] = {
            "files": len(files),
            "bytes": sum(map(len, files.values())),
            "file_pages": sum(-(-len(b) // PAGE_SIZE) for b in files.values()),
            "chunks": [index, (index + 1) % GUESTS],
        }
        rec["seconds"] = {"prepare": round(prep, 1), "boot_to_ready": round(boot, 1)}
        outs = [(f"{name}.elf", "elf")]
        if index == 0:
            outs += [(f"{name}.kdump", "kdump-zlib"), (f"{name}.qevm", "qevm")]
        for fname, fmt in outs:
            path = args.out / fname
            secs = (
                vm.migrate_to_file(path, args.dump_timeout)
                if fmt == "qevm"
                else vm.dump(path, fmt, args.dump_timeout)
            )
            path.chmod(0o644)  # QEMU creates dumps 0400
            rec["dumps"][fname] = {"format": mf.FORMAT_NAMES[fmt], "size": path.stat().st_size}
            rec["seconds"][fname] = round(secs, 1)
            log(f"{name}: wrote {fname} ({path.stat().st_size >> 20} MiB, {secs:.1f} s)")
    finally:
        vm.quit()
    rec["dumps"][f"{name}.elf"].update(count_pages(args.out / f"{name}.elf", DEVICE_BASE, files))
    return rec


def main(argv: Sequence[str] | None = None) -> int:
    """Build the four guests' initramfs, boot them (``--parallel`` at a time), dump, summarize."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--out", type=Path, default=Path("/work/bench-data"), help="default: %(default)s")
    ap.add_argument(
        "--work",
        type=Path,
        default=Path.home() / ".cache" / "dengine-fixtures",
        help="make_fixtures' work/cache dir (kernel, source tree); default: %(default)s",
    )
    ap.add_argument("--mem", type=int, default=384, help="guest RAM in MiB (default: %(default)s)")
    ap.add_argument("--chunk-mib", type=int, default=18, help="size of each overlapping chunk")
    ap.add_argument("--parallel", type=int, default=2, help="guests booted at once (one TCG thread each)")
    ap.add_argument("--gzip-level", type=int, default=6)
    ap.add_argument("--boot-timeout", type=float, default=600.0)
    ap.add_argument("--dump-timeout", type=float, default=600.0)
    args = ap.parse_args(argv)
    args.out = args.out.resolve()
    args.work = args.work.resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    kernel = mf.get_kernel(args.work, None)
    cmdline = " ".join(mf.CMDLINE_PARTS)
    log(f"kernel {kernel.package} {kernel.version} ({kernel.release})")
    sources = find_sources(kernel, args.work, args.chunk_mib)
    t0 = time.monotonic()
    results: dict[int, dict[str, Any]] = {}
    errors: list[BaseException] = []

    def worker(queue: list[int]) -> None:
        while queue:
            i = queue.pop(0)
            try:
                results[i] = run_bench_guest(i, args, kernel, cmdline, sources)
            except BaseException as exc:  # reported after the other guests finished
                errors.append(exc)

    queues: list[list[int]] = [list(range(GUESTS))[k :: args.parallel] for k in range(args.parallel)]
    threads = [threading.Thread(target=worker, args=(q,)) for q in queues]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    total_s = time.monotonic() - t0
    guests = {f"bench-{i + 1}": results[i] for i in sorted(results)}
    manifest = {
        "generator": "bench/make_bench_dumps.py",
        "kernel": {
            "package": kernel.package,
            "version": kernel.version,
            "release": kernel.release,
            "cmdline": cmdline,
        },
        "chunks": [
            {
                "files": len(c),
                "bytes": sum(p.stat().st_size for _n, p in c),
                "first": c[0][0],
                "last": c[-1][0],
            }
            for c in sources.chunks
        ],
        "common": {"files": len(sources.common), "bytes": sum(p.stat().st_size for _n, p in sources.common)},
        "guests": guests,
        "seconds_total": round(total_s, 1),
    }
    (args.out / "bench-manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    print(
        f"{'dump':<14} {'format':<22} {'MiB':>7} {'pages':>8} {'RAM pages':>9} {'non-zero':>8} {'%':>6} "
        f"{'workload found':>15}"
    )
    total = 0
    for g in guests.values():
        for fname, d in g["dumps"].items():
            total += d["size"]
            if "pages" in d:
                pct = 100 * d["nonzero_ram_pages"] / d["ram_pages"]
                print(
                    f"{fname:<14} {d['format']:<22} {d['size'] / 2**20:>7.1f} {d['pages']:>8} "
                    f"{d['ram_pages']:>9} {d['nonzero_ram_pages']:>8} {pct:>6.1f} "
                    f"{d['workload_found']:>7}/{d['workload_pages']:<7}"
                )
            else:
                print(f"{fname:<14} {d['format']:<22} {d['size'] / 2**20:>7.1f}")
    print(f"total {total / 2**30:.2f} GiB in {args.out}; {total_s:.0f} s for {GUESTS} guests")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except mf.FixtureError as exc:
        print(f"make_bench_dumps: error: {exc}", file=sys.stderr)
        sys.exit(1)
