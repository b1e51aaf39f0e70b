"""How small and how fast ``dengine apply`` stores a fleet, against general archivers, in one run.

For each set of dumps (default: ``/work/bench-data/bench-*.elf`` and the raw guests of
``/work/bench-data/fleet-16``, 4 GiB: larger than zstd's 2 GiB window), with the files in the page
cache, each command timed as a subprocess (wall seconds, one run each: the archivers at level 19
take many minutes):

* ``dengine plan -o PLAN`` (timed apart: a plan is made once, applied any number of times);
* ``dengine apply PLAN -o STORE``, ``apply --pack`` (frame codec ``auto``), ``apply --pack
  --frame-codec xz-x86`` (LZMA2 every frame) and ``--frame-codec xz-x86-6``: the store's size
  (every file in it: packs and catalog) and the time;
* ``cat DUMPS | zstd -3 --long=31 -T2`` and ``cat DUMPS | zstd -19 --long=31 -T2`` (the dumps
  concatenated, one stream), their size and time;
* ``borg create --compression zstd,19`` into a fresh repository (``borg init -e none``), the
  repository's size and the time, when borg is installed.

Needs ``zstd`` and, for the borg column, Debian's ``borgbackup`` (``apt-get install zstd
borgbackup``); neither is needed by the tests.  ``--skip-slow`` leaves out zstd -19 and borg.

Usage: python3 bench/store_size.py [--set DIR_OR_GLOB ...] [--skip-slow] [--json FILE]
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
DENGINE = REPO / ".venv" / "bin" / "dengine"
DEFAULT_SETS = ("/work/bench-data/bench-*.elf", "/work/bench-data/fleet-16/fleet-*.raw")


def files_of(spec: str) -> list[str]:
    """The dumps a glob names, or a directory's dumps (leaving out its manifests and notes)."""
    if any(c in spec for c in "*?["):
        return sorted(glob.glob(spec))
    notes = (".json", ".md", ".txt")
    return sorted(f for f in glob.glob(f"{spec}/*") if os.path.isfile(f) and not f.endswith(notes))


def tree_bytes(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def timed(cmd: str | list[str], shell: bool = False, env: dict[str, str] | None = None) -> float:
    started = time.perf_counter()
    done = subprocess.run(cmd, shell=shell, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    if done.returncode != 0:
        shown = cmd if isinstance(cmd, str) else " ".join(cmd)
        sys.exit(f"{shown}\nexit {done.returncode}: {done.stderr.decode(errors='replace').strip()}")
    return time.perf_counter() - started


def warm(files: list[str]) -> None:
    for f in files:
        with open(f, "rb") as fh:
            while fh.read(1 << 24):
                pass


def measure_set(files: list[str], tmp: Path, skip_slow: bool) -> dict[str, Any]:
    warm(files)
    total = sum(os.path.getsize(f) for f in files)
    rows: dict[str, Any] = {"files": len(files), "bytes": total}
    plan = tmp / "plan.json"
    rows["dengine plan"] = {"seconds": timed([str(DENGINE), "-q", "plan", "--baseline", "none", "--index-dir",
                                              str(tmp / "idx"), "-o", str(plan), *files])}  # fmt: skip
    lzma_everywhere = ["--pack", "--frame-codec", "xz-x86"]
    for extra in ([], ["--pack"], lzma_everywhere, ["--pack", "--frame-codec", "xz-x86-6"]):
        name = " ".join(["dengine apply", *extra])
        store = tmp / "store"
        seconds = timed([str(DENGINE), "-q", "apply", str(plan), "-o", str(store), *extra])
        rows[name] = {"seconds": seconds, "size": tree_bytes(store)}
        shutil.rmtree(store)
    quoted = " ".join(f"'{f}'" for f in files)
    levels = (3,) if skip_slow else (3, 19)
    for level in levels:
        out = tmp / "z.zst"
        seconds = timed(f"cat {quoted} | zstd -q -{level} --long=31 -T2 -c > '{out}'", shell=True)
        rows[f"zstd -{level} --long=31 -T2"] = {"seconds": seconds, "size": out.stat().st_size}
        out.unlink()
    if not skip_slow and shutil.which("borg"):
        repo = tmp / "borg"
        env = {**os.environ, "BORG_UNKNOWN_UNENCRYPTED_REPO_ACCESS_IS_OK": "yes"}
        subprocess.run(["borg", "init", "-e", "none", str(repo)], check=True, capture_output=True, env=env)
        seconds = timed(["borg", "create", "--compression", "zstd,19", f"{repo}::a", *files], env=env)
        rows["borg create --compression zstd,19"] = {"seconds": seconds, "size": tree_bytes(repo)}
        shutil.rmtree(repo)
    return rows


def print_rows(name: str, rows: dict[str, Any]) -> None:
    print(f"{name}: {rows['files']} files, {rows['bytes'] / 2**30:.2f} GiB")
    for key, value in rows.items():
        if isinstance(value, dict):
            size = f"{value['size'] / 1e6:9.1f} MB" if "size" in value else " " * 12
            print(f"  {key:<48} {size}  {value['seconds']:8.1f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--set", action="append", dest="sets", help="a glob or directory of dumps (repeatable)"
    )
    parser.add_argument("--skip-slow", action="store_true", help="leave out zstd -19 and borg")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True)
    doc: dict[str, Any] = {"commit": commit.stdout.strip(), "time": time.strftime("%Y-%m-%d %H:%M"),
                           "load": os.getloadavg(), "sets": {}}  # fmt: skip
    for spec in args.sets or DEFAULT_SETS:
        files = files_of(spec)
        if not files:
            print(f"{spec}: no files", file=sys.stderr)
            continue
        with tempfile.TemporaryDirectory(prefix="dengine-store-bench-") as tmp:
            rows = measure_set(files, Path(tmp), args.skip_slow)
        doc["sets"][spec] = rows
        print_rows(spec, rows)
    print(f"commit {doc['commit']}, {doc['time']}, load {doc['load'][0]:.1f}")
    if args.json:
        args.json.write_text(json.dumps(doc, indent=2))


if __name__ == "__main__":
    main()
