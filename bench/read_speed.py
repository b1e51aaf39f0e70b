"""How fast dengine's readers deliver every page of a real dump, against named baselines.

For each dump given (default: the QEMU fixtures, decompressed into a work directory), in one run
and from the page cache:

* ``cat FILE > /dev/null``: the speed of just reading the file's bytes;
* dengine: open the dump and pass every present page through a zero check (so every byte is
  touched) in batches;
* libkdumpfile (Debian's python3-libkdumpfile under /usr/bin/python3): read every page it says
  the file holds, one ``read()`` per page.  It cannot read QEMU migration streams or flattened
  kdump files: for those it reads the ELF dump of the same pause (same pages) and a reassembled
  copy of the kdump, and the table says so.

Ratios, not seconds, are the result: ``dengine/cat`` (bytes of file per second) and
``dengine/libkdumpfile`` (pages per second).  Each timing is the best of ``--repeat`` runs.

Usage: python3 bench/read_speed.py [--repeat N] [--work DIR] [DUMP ...]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import zstandard

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from dengine_cli.formats import open_dump  # noqa: E402

SYSTEM_PYTHON = "/usr/bin/python3"
ORACLE = r"""
import sys, time, kdumpfile
k = kdumpfile.kdumpfile(sys.argv[1])
bm = k.attr["file.pagemap"]; max_pfn = int(k.attr["max_pfn"])
t = time.perf_counter(); n = 0; pfn = 0
while pfn < max_pfn:
    try: s = bm.find_set(pfn)
    except Exception: break
    if s >= max_pfn: break
    try: e = min(bm.find_clear(s), max_pfn)
    except Exception: e = max_pfn
    for p in range(s, e):
        k.read(kdumpfile.KDUMP_MACHPHYSADDR, p << 12, 4096); n += 1
    pfn = e
print(n, time.perf_counter() - t)
"""


@dataclass
class Row:
    dump: str
    fmt: str
    file_bytes: int
    pages: int
    cat_s: float
    dengine_s: float
    oracle_s: float | None
    oracle_pages: int | None
    oracle_file: str

    def to_dict(self) -> dict[str, object]:
        d: dict[str, object] = dict(self.__dict__)
        d["dengine_vs_cat"] = round(self.cat_s / self.dengine_s, 3)
        d["dengine_pages_per_s"] = round(self.pages / self.dengine_s)
        if self.oracle_s and self.oracle_pages:
            d["oracle_pages_per_s"] = round(self.oracle_pages / self.oracle_s)
            ours = self.pages / self.dengine_s
            d["dengine_vs_libkdumpfile"] = round(ours / (self.oracle_pages / self.oracle_s), 2)
        return d


def best(repeat: int, fn: object) -> float:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()  # type: ignore[operator]
        times.append(time.perf_counter() - t)
    return min(times)


def time_cat(path: Path, repeat: int) -> float:
    return best(repeat, lambda: subprocess.run(["cat", str(path)], stdout=subprocess.DEVNULL, check=True))


def time_dengine(path: Path, repeat: int) -> tuple[float, int, str]:
    pages = 0
    fmt = ""

    def read_all() -> None:
        nonlocal pages, fmt
        with open_dump(path) as dump:
            fmt = dump.facts.format
            n = 0
            for batch in dump.batches():
                np.any(batch.pages.view(np.uint64), axis=1)
                n += len(batch)
            pages = n

    return best(repeat, read_all), pages, fmt


def time_oracle(path: Path) -> tuple[float, int] | None:
    r = subprocess.run([SYSTEM_PYTHON, "-c", ORACLE, str(path)], capture_output=True, text=True)
    if r.returncode != 0:
        return None
    n, s = r.stdout.split()
    return float(s), int(n)


def reassemble_flattened(src: Path, dst: Path) -> None:
    """makedumpfile -R: apply the flattened records to a plain file (libkdumpfile 0.5.1 needs it)."""
    data = src.read_bytes()
    pos = 4096
    with dst.open("wb") as out:
        while pos + 16 <= len(data):
            offset, size = struct.unpack_from(">qq", data, pos)
            pos += 16
            if offset < 0:
                break
            out.seek(offset)
            out.write(data[pos : pos + size])
            pos += size


def fixture_dumps(work: Path) -> list[Path]:
    out = []
    for packed in sorted((REPO / "fixtures").glob("*.zst")):
        target = work / packed.name.removesuffix(".zst")
        if not target.exists():
            with packed.open("rb") as s, target.open("wb") as d:
                zstandard.ZstdDecompressor().copy_stream(s, d)
        out.append(target)
    for plain in sorted((REPO / "fixtures").glob("*.kdump")):
        out.append(plain)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("dumps", nargs="*", type=Path)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--work", type=Path, default=None)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="dengine-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    dumps = args.dumps or fixture_dumps(work)
    have_oracle = shutil.which(SYSTEM_PYTHON) is not None
    rows = []
    for path in dumps:
        subprocess.run(["cat", str(path)], stdout=subprocess.DEVNULL, check=True)  # warm the cache
        cat_s = time_cat(path, args.repeat)
        dengine_s, pages, fmt = time_dengine(path, args.repeat)
        oracle_file = path
        if fmt == "kdump" and path.read_bytes()[:12] == b"makedumpfile":
            oracle_file = work / (path.name + ".reassembled")
            reassemble_flattened(path, oracle_file)
        elif fmt == "qemu-stream":
            twin = path.with_name(path.name.replace(".qevm", ".elf"))
            oracle_file = twin if twin.exists() else path
        oracle = time_oracle(oracle_file) if have_oracle else None
        rows.append(
            Row(
                dump=path.name,
                fmt=fmt,
                file_bytes=os.path.getsize(path),
                pages=pages,
                cat_s=cat_s,
                dengine_s=dengine_s,
                oracle_s=oracle[0] if oracle else None,
                oracle_pages=oracle[1] if oracle else None,
                oracle_file=oracle_file.name,
            )
        )
    if args.json:
        print(json.dumps([r.to_dict() for r in rows], indent=2))
        return
    print(
        f"{'dump':<22} {'format':<12} {'MiB':>7} {'pages':>8} {'vs cat':>7} {'pages/s':>10} "
        f"{'libkdumpfile':>12} {'vs libkdf':>9}  (libkdumpfile read)"
    )
    for r in rows:
        d = r.to_dict()
        print(
            f"{r.dump:<22} {r.fmt:<12} {r.file_bytes / 2**20:>7.1f} {r.pages:>8} "
            f"{d['dengine_vs_cat']:>7.2f} {d['dengine_pages_per_s']:>10} "
            f"{d.get('oracle_pages_per_s', '-'):>12} {d.get('dengine_vs_libkdumpfile', '-'):>9}"
            f"  ({r.oracle_file})"
        )


if __name__ == "__main__":
    main()
