"""dengine's KSM view beside the real kernel's counters, on the same guests at the same moment.

Boots ``--guests`` small Linux guests under QEMU (TCG, ``mem-merge=on``: QEMU marks guest RAM
MADV_MERGEABLE) with the bench workload of ``bench/make_bench_dumps.py`` (real files every guest
shares, chunks two guests share, per-guest synthetic pages), waits until each is at its READY1
marker, pauses them all, and runs KSM over them until its counters are stable (unchanged over
``--stable-scans`` full scans). Then it reads ``/sys/kernel/mm/ksm``, dumps every guest with
``dump-guest-memory`` (ELF), and prints ``dengine analyze``'s KSM view of the dumps beside the
kernel's counters.

The guests are paused before KSM starts, so that the memory KSM merges is the memory dumped.
Every knob of ``/sys/kernel/mm/ksm`` the script writes is saved first and restored after
(unmerging first, ``run`` last), and read back; a knob that did not come back is an error.

Not in CI: it needs root, a kernel with KSM and a few minutes. Run as root::

    apt-get install qemu-system-x86 busybox-static
    python3 bench/ksm_check.py [--guests 3] [--use-zero-pages 1] [--max-page-sharing 256]

It needs the kernel and sources that ``fixtures/make_fixtures.py`` caches (as
``make_bench_dumps.py`` does). Dumps go to ``--out`` (default ``/work/bench-data/ksm``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "fixtures"))
sys.path.insert(0, str(REPO / "bench"))

import make_bench_dumps as bench  # noqa: E402
import make_fixtures as mf  # noqa: E402

KSM = Path("/sys/kernel/mm/ksm")
#: Knobs this script writes, restored in this order after unmerging (``run`` last).
KNOBS = (
    "max_page_sharing",
    "use_zero_pages",
    "merge_across_nodes",
    "smart_scan",
    "advisor_mode",
    "pages_to_scan",
    "sleep_millisecs",
    "stable_node_chains_prune_millisecs",
)
COUNTERS = (
    "pages_shared",
    "pages_sharing",
    "ksm_zero_pages",
    "general_profit",
    "stable_node_chains",
    "stable_node_dups",
    "pages_unshared",
    "pages_volatile",
    "full_scans",
)


def log(msg: str) -> None:
    print(f"[ksm_check] {msg}", file=sys.stderr, flush=True)


def read_knob(name: str) -> str:
    text = (KSM / name).read_text().strip()
    # advisor_mode reads "[none] scan-time": the choice in brackets.
    if "[" in text:
        return text[text.index("[") + 1 : text.index("]")]
    return text


def write_knob(name: str, value: str) -> None:
    (KSM / name).write_text(f"{value}\n")


def counters() -> dict[str, int]:
    return {c: int(read_knob(c)) for c in COUNTERS if (KSM / c).exists()}


def unmerge(timeout: float) -> None:
    """``run`` = 2: break every KSM page (needed before max_page_sharing or merge_across_nodes
    may change)."""
    write_knob("run", "2")
    deadline = time.monotonic() + timeout
    while int(read_knob("pages_shared")) or int(read_knob("pages_sharing")):
        if time.monotonic() > deadline:
            raise RuntimeError("KSM did not unmerge in time")
        time.sleep(0.2)


@contextlib.contextmanager
def ksm_knobs(settings: dict[str, str], timeout: float) -> Iterator[None]:
    """Run KSM with ``settings``; put every knob back as it was afterwards, ``run`` last."""
    saved = {k: read_knob(k) for k in (*KNOBS, "run") if (KSM / k).exists()}
    log(f"saved KSM knobs: {saved}")
    try:
        unmerge(timeout)
        for k, v in settings.items():
            if (KSM / k).exists():
                write_knob(k, v)
        write_knob("run", "1")
        yield
    finally:
        unmerge(timeout)
        for k in KNOBS:
            if k in saved:
                write_knob(k, saved[k])
        write_knob("run", saved["run"])
        back = {k: read_knob(k) for k in saved}
        if back != saved:
            raise RuntimeError(f"KSM knobs not restored: saved {saved}, now {back}")
        log("KSM knobs restored and verified")


def wait_stable(scans: int, timeout: float) -> dict[str, int]:
    """The counters once they are unchanged over ``scans`` full scans (after at least two)."""
    deadline = time.monotonic() + timeout
    history: list[dict[str, int]] = []
    last_scan = -1
    while time.monotonic() < deadline:
        now = counters()
        if now["full_scans"] != last_scan:
            last_scan = now["full_scans"]
            history.append(now)
            figures = [{k: v for k, v in h.items() if k != "full_scans"} for h in history[-(scans + 1) :]]
            log(
                f"full scan {last_scan}: pages_shared {now['pages_shared']}, pages_sharing "
                f"{now['pages_sharing']}, ksm_zero_pages {now.get('ksm_zero_pages', 0)}"
            )
            if last_scan >= 2 and len(figures) == scans + 1 and all(f == figures[0] for f in figures):
                return now
        time.sleep(0.2)
    raise RuntimeError(f"KSM counters not stable within {timeout:.0f} s")


def boot(args: argparse.Namespace) -> list[mf.Vm]:
    """The guests, booted to READY1 and paused."""
    kernel = mf.get_kernel(args.work, None)
    sources = bench.find_sources(kernel, args.work, args.chunk_mib)
    cmdline = " ".join(mf.CMDLINE_PARTS)
    fw = kernel.fw_cfg.read_bytes() if kernel.fw_cfg else None
    vms: list[mf.Vm] = []
    for i in range(args.guests):
        name = f"ksm-{i + 1}"
        initrd = args.out / f"initramfs-{name}.cpio.gz"
        mf.build_initramfs(initrd, name, bench.guest_files(i % bench.GUESTS, sources), fw, level=6)
        vms.append(mf.Vm(name, "pc,mem-merge=on", args.mem, args.out / f"run-{name}"))
    errors: list[BaseException] = []

    def start(vm: mf.Vm) -> None:
        try:
            vm.start(kernel.vmlinuz, args.out / f"initramfs-{vm.name}.cpio.gz", cmdline, args.timeout)
            vm.wait_for("READY1", args.timeout)
            vm.cmd("stop")
            log(f"{vm.name}: at READY1, paused")
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=start, args=(vm,)) for vm in vms]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        for vm in vms:
            vm.quit()
        raise errors[0]
    return vms


def dengine_view(args: argparse.Namespace, dumps: Sequence[Path]) -> dict[str, Any]:
    cmd = [
        str(args.dengine),
        "analyze",
        "--sharing-only",
        "--format",
        "json",
        "--device-memory",
        "--index-dir",
        str(args.out / "index"),
        "--ksm-max-page-sharing",
        str(args.max_page_sharing),
        *(["--ksm-use-zero-pages"] if args.use_zero_pages else []),
        *map(str, dumps),
    ]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    view: dict[str, Any] = json.loads(out)["ksm"]
    return view


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--guests", type=int, default=3)
    ap.add_argument("--mem", type=int, default=384, help="guest RAM in MiB (default: %(default)s)")
    ap.add_argument("--chunk-mib", type=int, default=18)
    ap.add_argument("--use-zero-pages", type=int, choices=(0, 1), default=1)
    ap.add_argument("--max-page-sharing", type=int, default=256)
    ap.add_argument("--stable-scans", type=int, default=3)
    ap.add_argument("--out", type=Path, default=Path("/work/bench-data/ksm"))
    ap.add_argument("--work", type=Path, default=Path.home() / ".cache" / "dengine-fixtures")
    ap.add_argument("--dengine", type=Path, default=REPO / ".venv" / "bin" / "dengine")
    ap.add_argument("--timeout", type=float, default=900.0)
    args = ap.parse_args(argv)
    if not KSM.is_dir():
        raise SystemExit("ksm_check: this kernel has no /sys/kernel/mm/ksm")
    args.out.mkdir(parents=True, exist_ok=True)
    vms = boot(args)
    dumps = [args.out / f"{vm.name}.elf" for vm in vms]
    settings = {
        "max_page_sharing": str(args.max_page_sharing),
        "use_zero_pages": str(args.use_zero_pages),
        "merge_across_nodes": "1",
        "smart_scan": "0",
        "advisor_mode": "none",
        "pages_to_scan": "20000",
        "sleep_millisecs": "10",
    }
    try:
        with ksm_knobs(settings, args.timeout):
            t0 = time.monotonic()
            kernel = wait_stable(args.stable_scans, args.timeout)
            log(f"stable after {time.monotonic() - t0:.0f} s")
            for vm, dump in zip(vms, dumps, strict=True):
                vm.dump(dump, "elf", args.timeout)
                dump.chmod(0o644)
            after = counters()
    finally:
        for vm in vms:
            vm.quit()
    moved = {k: (kernel[k], after[k]) for k in kernel if k != "full_scans" and kernel[k] != after[k]}
    ours = dengine_view(args, dumps)
    rows = [
        ("pages_shared", kernel["pages_shared"], ours["pages_shared"]),
        ("pages_sharing", kernel["pages_sharing"], ours["pages_sharing"]),
        ("ksm_zero_pages", kernel.get("ksm_zero_pages", 0), ours["ksm_zero_pages"]),
        ("stable_node_chains", kernel.get("stable_node_chains", 0), ours["stable_node_chains"]),
        ("stable_node_dups", kernel.get("stable_node_dups", 0), ours["stable_node_dups"]),
        ("general_profit", kernel["general_profit"], ours["general_profit_bytes"]),
    ]
    print(
        f"{args.guests} guests x {args.mem} MiB under QEMU (TCG), max_page_sharing "
        f"{args.max_page_sharing}, use_zero_pages {args.use_zero_pages}; "
        f"zero pages in the dumps: {ours['zero_pages_in_dumps']}"
    )
    print(f"{'counter':<20} {'kernel':>12} {'dengine':>12} {'difference':>11}")
    for name, k, d in rows:
        diff = f"{100.0 * (d - k) / k:+.2f}%" if k else ("0" if d == 0 else "n/a")
        print(f"{name:<20} {k:>12} {d:>12} {diff:>11}")
    if moved:
        print(f"counters that moved while dumping (kernel before, after): {moved}")
    result = {"kernel": kernel, "kernel_after_dump": after, "dengine": ours, "args": vars(args)}
    (args.out / "ksm-check.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
