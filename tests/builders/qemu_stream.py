"""Build QEMU migration streams from a small description (FORMATS.md §3.2-3.4).

:class:`StreamWriter` writes records one by one (for crafting bad streams); :func:`build_stream`
writes a whole precopy stream the way QEMU 7.2 does: configuration, RAM START with the MEM_SIZE
list, pages spread over SECTION_PARTs (CONTINUE carried across section boundaries), RAM END, a
device section, EOF and a VMDESCRIPTION.  :func:`build_mapped_ram` writes a mapped-ram stream
(QEMU >= 9.0 ``mapped-ram`` capability), which QEMU 7.2 cannot produce.
"""

from __future__ import annotations

import json
import struct
import uuid as uuidlib
import zlib
from collections.abc import Iterable, Mapping

PAGE = 4096
ZERO = 0x02
MEM_SIZE = 0x04
PAGE_FLAG = 0x08
EOS = 0x10
CONTINUE = 0x20
XBZRLE = 0x40
COMPRESS_PAGE = 0x100
MULTIFD_FLUSH = 0x200

#: A page's content: 4096 bytes, or an int = a zero-flag record with that fill byte.
PageContent = bytes | int


def _str(s: str | bytes) -> bytes:
    b = s.encode() if isinstance(s, str) else s
    return bytes([len(b)]) + b


class StreamWriter:
    """Low-level record writer."""

    def __init__(self, magic: bytes = b"QEVM", version: int = 3) -> None:
        self.out = bytearray(magic + struct.pack(">I", version))

    def bytes(self) -> bytes:
        return bytes(self.out)

    def config(
        self,
        machine: str,
        capabilities: Iterable[str] = (),
        uuid: str | None = None,
        page_bits: int | None = None,
    ) -> None:
        m = machine.encode()
        self.out += b"\x07" + struct.pack(">I", len(m)) + m
        if page_bits is not None:
            self.out += b"\x05" + _str("configuration/target-page-bits") + struct.pack(">II", 1, page_bits)
        caps = list(capabilities)
        if caps:
            self.out += b"\x05" + _str("configuration/capabilities") + struct.pack(">II", 1, len(caps))
            for c in caps:
                self.out += _str(c)
        if uuid is not None:
            self.out += b"\x05" + _str("configuration/uuid") + struct.pack(">I", 1) + uuidlib.UUID(uuid).bytes

    def start(
        self, section_id: int, name: str = "ram", instance: int = 0, version: int = 4, full: bool = False
    ) -> None:
        self.out += bytes([4 if full else 1]) + struct.pack(">I", section_id) + _str(name)
        self.out += struct.pack(">II", instance, version)

    def part(self, section_id: int, end: bool = False) -> None:
        self.out += bytes([3 if end else 2]) + struct.pack(">I", section_id)

    def footer(self, section_id: int) -> None:
        self.out += b"\x7e" + struct.pack(">I", section_id)

    def command(self, cmd: int, data: bytes = b"") -> None:
        self.out += b"\x08" + struct.pack(">HH", cmd, len(data)) + data

    def item(self, value: int) -> None:
        self.out += struct.pack(">Q", value)

    def mem_size(
        self, blocks: Iterable[tuple[str, int]], total: int | None = None, extra: bytes = b""
    ) -> None:
        blocks = list(blocks)
        self.item((sum(n for _, n in blocks) if total is None else total) | MEM_SIZE)
        for name, size in blocks:
            self.out += _str(name) + struct.pack(">Q", size) + extra

    def zero(self, block: str | None, offset: int, fill: int = 0) -> None:
        self.item(offset | ZERO | (CONTINUE if block is None else 0))
        if block is not None:
            self.out += _str(block)
        self.out.append(fill)

    def page(self, block: str | None, offset: int, data: bytes) -> None:
        assert len(data) == PAGE
        self.item(offset | PAGE_FLAG | (CONTINUE if block is None else 0))
        if block is not None:
            self.out += _str(block)
        self.out += data

    def compressed(self, block: str | None, offset: int, data: bytes) -> None:
        z = zlib.compress(data)
        self.item(offset | COMPRESS_PAGE | (CONTINUE if block is None else 0))
        if block is not None:
            self.out += _str(block)
        self.out += struct.pack(">I", len(z)) + z

    def eos(self) -> None:
        self.item(EOS)

    def device(self, section_id: int, name: str, payload: bytes) -> None:
        self.start(section_id, name, 0, 1, full=True)
        self.out += payload

    def eof(self) -> None:
        self.out.append(0)

    def vmdescription(self) -> None:
        j = json.dumps({"page_size": PAGE, "devices": []}).encode()
        self.out += b"\x06" + struct.pack(">I", len(j)) + j


def build_stream(
    pages: Mapping[tuple[str, int], PageContent],
    blocks: Mapping[str, int],
    machine: str = "pc-i440fx-7.2",
    *,
    uuid: str | None = None,
    capabilities: Iterable[str] = (),
    parts: int = 3,
    footers: bool = True,
    resend: Mapping[tuple[str, int], PageContent] | None = None,
    compress: bool = False,
    device_sections: bool = True,
) -> bytes:
    """A complete stream.  ``pages`` maps (block, page number) to content; pages are written in
    block/page order split over ``parts`` SECTION_PARTs, all-zero content as ZERO records;
    ``resend`` pages are written again in the END section (the last one wins)."""
    w = StreamWriter()
    w.config(machine, capabilities, uuid)
    w.start(2)
    w.mem_size(blocks.items())
    w.eos()
    if footers:
        w.footer(2)
    items = sorted(pages.items(), key=lambda kv: (list(blocks).index(kv[0][0]), kv[0][1]))
    chunk = max(1, -(-len(items) // max(parts, 1)))
    prev: str | None = None
    groups = [items[i : i + chunk] for i in range(0, len(items), chunk)] or [[]]
    for gi, group in enumerate(groups):
        last_group = gi == len(groups) - 1 and not resend
        w.part(2, end=last_group)
        for (block, n), content in group:
            name = None if block == prev else block
            prev = block
            _write_page(w, name, n * PAGE, content, compress)
        w.eos()
        if footers:
            w.footer(2)
    if resend:
        w.part(2, end=True)
        prev = None
        for (block, n), content in resend.items():
            _write_page(w, None if block == prev else block, n * PAGE, content, compress)
            prev = block
        w.eos()
        if footers:
            w.footer(2)
    if device_sections:
        w.device(3, "timer", b"\x00" * 16)
        if footers:
            w.footer(3)
    w.eof()
    w.vmdescription()
    return w.bytes()


def _write_page(w: StreamWriter, name: str | None, offset: int, content: PageContent, compress: bool) -> None:
    if isinstance(content, int):
        w.zero(name, offset, content)
    elif not content.strip(b"\0"):
        w.zero(name, offset)
    elif compress:
        w.compressed(name, offset, content)
    else:
        w.page(name, offset, content)


MAPPED_RAM_ALIGN = 1 << 20


def build_mapped_ram(
    pages: Mapping[tuple[str, int], bytes],
    blocks: Mapping[str, int],
    machine: str = "pc-q35-9.0",
    *,
    base: int = 0,
    stale: Mapping[tuple[str, int], bytes] | None = None,
) -> bytes:
    """A mapped-ram stream whose first byte will sit at absolute file offset ``base``.

    Non-zero pages get their bitmap bit and are written at ``pages_offset + n*4096``; zero pages
    are not written.  ``stale`` pages are written into the page area with their bit clear (a
    page that became zero after being sent: the clear bit must win)."""
    w = StreamWriter()
    w.config(machine, ["mapped-ram"])
    w.start(2)
    w.item(sum(blocks.values()) | MEM_SIZE)
    areas: list[tuple[int, bytes]] = []
    for name, size in blocks.items():
        w.out += _str(name) + struct.pack(">Q", size)
        header_at = base + len(w.out)
        npages = size // PAGE
        bitmap = bytearray((npages + 63) // 64 * 8)
        bitmap_off = header_at + 28
        pages_off = -(-(bitmap_off + len(bitmap)) // MAPPED_RAM_ALIGN) * MAPPED_RAM_ALIGN
        area = bytearray(size)
        for (b, n), data in (stale or {}).items():
            if b == name:
                area[n * PAGE : (n + 1) * PAGE] = data
        for (b, n), data in pages.items():
            if b == name and data.strip(b"\0"):
                bitmap[n // 8] |= 1 << (n % 8)
                area[n * PAGE : (n + 1) * PAGE] = data
        w.out += struct.pack(">IQQQ", 1, PAGE, bitmap_off, pages_off) + bitmap
        w.out += bytes(pages_off - base - len(w.out))
        areas.append((pages_off, bytes(area)))
        w.out += area
    w.item(MULTIFD_FLUSH)
    w.eos()
    w.footer(2)
    w.part(2, end=True)
    w.eos()
    w.footer(2)
    w.device(3, "timer", b"\x00" * 16)
    w.footer(3)
    w.eof()
    return w.bytes()
