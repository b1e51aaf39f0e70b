"""Raw flat images: file offset = guest physical address (QEMU ``pmemsave`` from address 0,
VMware ``.vmem`` of guests up to ~3 GiB, LiME ``format=padded``, ``dengine extract`` output).

A raw image has no magic: it is recognized by its name (see :data:`RAW_SUFFIXES`) or forced with
``--format raw``.  Every page of the file is present; holes of a sparse file read as zeros and
count as present zero pages (a flat image cannot say a page is absent).
"""

from __future__ import annotations

from dengine_cli.formats.base import Dump, GuestFacts, OpenOptions, PageTableDump, Source, map_file
from dengine_cli.formats.registry import FormatSpec
from dengine_cli.pages import PAGE_SIZE

#: File name endings taken as raw images when no magic matches.
RAW_SUFFIXES = (".raw", ".vmem", ".mem", ".pmem", ".img", ".bin")


def probe(head: bytes, size: int) -> bool:
    """Raw images have no magic: never claimed by probing (see :func:`claims_name`)."""
    return False


def claims_name(name: str, size: int) -> bool:
    """Whether an unrecognized file is taken as raw: a raw-image name and a whole number of pages."""
    return name.lower().endswith(RAW_SUFFIXES) and size % PAGE_SIZE == 0 and size > 0


def open_raw(source: Source, options: OpenOptions) -> Dump:
    buf = map_file(source)[source.start :]
    usable = len(buf) - len(buf) % PAGE_SIZE
    if usable == 0:
        raise source.error(source.start, expected="at least one 4096-byte page", found=f"{len(buf)} bytes")
    facts = GuestFacts(format="raw", memory_bytes=usable)
    if len(buf) != usable:
        extra, at = len(buf) - usable, source.start + usable
        last = "byte" if extra == 1 else f"{extra} bytes"
        are = "is" if extra == 1 else "are"
        facts.skipped.append(f"the last {last} (at offset {at:#x}) {are} not a whole page and {are} not read")
    return PageTableDump.flat(source, facts, buf[:usable], file_offset=source.start)


FORMAT = FormatSpec(
    name="raw",
    description="flat image, file offset = guest physical address (pmemsave, .vmem, LiME padded)",
    probe=probe,
    open=open_raw,
)
