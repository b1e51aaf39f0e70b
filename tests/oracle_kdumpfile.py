"""An independent reader: Debian's libkdumpfile, run under /usr/bin/python3 (its bindings exist only
for Debian's Python).  Prints, for every page the library says the file holds, the pfn and a
BLAKE2b-128 digest of the page, as fixed 24-byte records (u64 pfn LE + 16-byte digest) on stdout.

Usage: /usr/bin/python3 tests/oracle_kdumpfile.py DUMP [zero_excluded] [scan_kphys]

``scan_kphys`` reads every pfn below max_pfn through KDUMP_KPHYSADDR and keeps those the library
finds, instead of walking ``file.pagemap``: for Xen xc_core files, whose pagemap libkdumpfile 0.5.1
leaves empty, and whose PV guests' KPHYSADDR is the guest pfn space (MACHPHYSADDR = machine frames).
"""

import hashlib
import struct
import sys

import kdumpfile  # type: ignore[import-not-found]
import kdumpfile.exceptions  # type: ignore[import-not-found]


def main() -> None:
    k = kdumpfile.kdumpfile(sys.argv[1])
    if "zero_excluded" in sys.argv[2:]:
        k.attr["file.zero_excluded"] = 1
    out = sys.stdout.buffer
    out.write(str(k.attr["file.format"]).encode().ljust(24, b"\0"))
    if "scan_kphys" in sys.argv[2:]:
        for p in range(int(k.attr["max_pfn"])):
            try:
                data = bytes(k.read(kdumpfile.KDUMP_KPHYSADDR, p << 12, 4096))
            except kdumpfile.exceptions.NoDataException:
                continue
            out.write(struct.pack("<Q", p) + hashlib.blake2b(data, digest_size=16).digest())
        return
    bitmap = k.attr["file.pagemap"]
    max_pfn = int(k.attr["max_pfn"])
    pfn = 0
    while pfn < max_pfn:
        try:
            start = bitmap.find_set(pfn)
        except Exception:
            break
        if start >= max_pfn:
            break
        try:
            end = min(bitmap.find_clear(start), max_pfn)
        except Exception:
            end = max_pfn
        for p in range(start, end):
            data = bytes(k.read(kdumpfile.KDUMP_MACHPHYSADDR, p << 12, 4096))
            out.write(struct.pack("<Q", p) + hashlib.blake2b(data, digest_size=16).digest())
        pfn = end


if __name__ == "__main__":
    main()
