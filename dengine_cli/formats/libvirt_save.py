"""libvirt save images: ``virsh save``, managedsave, the memory file of ``virsh snapshot``
(FORMATS.md §3.1).

Source: libvirt ``src/qemu/qemu_saveimage.h`` (``virQEMUSaveHeader``, QEMU_SAVE_MAGIC/PARTIAL,
QEMU_SAVE_VERSION 2) and ``qemu_saveimage.c`` (``virQEMUSaveDataWrite``: domain XML, optional
cookie, zero padding; ``qemuSaveImageOpen``: a version above 2 means a byte-swapped header),
``qemu_saveimage_format.h`` (format numbers).

Layout: a 92-byte header in host byte order, ``data_len`` bytes of domain XML (NUL terminated),
cookie XML and padding, then the QEMU migration stream, raw or as the output of an external
compressor.  The stream is read by :func:`dengine_cli.formats.qemu_stream.open_stream`, with the
domain XML as a hint (name, uuid, memory, vCPUs, machine type, NUMA cells).
"""

from __future__ import annotations

import struct

from dengine_cli.errors import UnsupportedFeature
from dengine_cli.formats import container, qemu_stream
from dengine_cli.formats.base import Dump, OpenOptions, Source, map_file, read_head, require
from dengine_cli.formats.domain_xml import DomainInfo, parse_domain_xml
from dengine_cli.formats.registry import FormatSpec

SAVE_MAGIC = b"LibvirtQemudSave"
#: Written first and replaced by SAVE_MAGIC once the save completed.
PARTIAL_MAGIC = b"LibvirtQemudPart"
#: magic[16], version, data_len, was_running, format, cookieOffset, unused[14].
HEADER = struct.Struct("<16s5I56x")
HEADER_SIZE = HEADER.size  # 92
SAVE_VERSIONS = (1, 2)

#: virQEMUSaveFormat: the compressor the tail went through (None = the bare stream).
SAVE_FORMATS: dict[int, str | None] = {
    0: None,  # raw
    1: "gzip",
    2: "bzip2",
    3: "xz",
    4: "lzop",
    5: "zstd",
    6: None,  # sparse: QEMU's mapped-ram stream written in place
}
SAVE_FORMAT_NAMES = ("raw", "gzip", "bzip2", "xz", "lzop", "zstd", "sparse")
#: libvirt reads the whole data area into memory; anything near this is a lying header.
MAX_DATA_LEN = 64 << 20


def probe(head: bytes, size: int) -> bool:
    """A save image starts with libvirt's magic (the partial one too, so it is reported)."""
    return head[:16] in (SAVE_MAGIC, PARTIAL_MAGIC)


def open_libvirt_save(source: Source, options: OpenOptions) -> Dump:
    """Open a libvirt save image: header and domain XML, then the QEMU stream behind them."""
    buf = map_file(source)
    start = source.start
    require(source, buf, start, HEADER_SIZE, "the libvirt save header")
    magic, version, data_len, was_running, fmt, cookie_offset = HEADER.unpack_from(buf.data, start)
    if magic == PARTIAL_MAGIC:
        raise source.error(
            start,
            expected=f"{SAVE_MAGIC.decode()!r}",
            found=f"{PARTIAL_MAGIC.decode()!r}: the save did not complete (an incomplete image)",
        )
    if magic != SAVE_MAGIC:
        raise source.error(start, expected=f"{SAVE_MAGIC.decode()!r}", found=magic.hex(" "))
    byte_order = "little-endian"
    if version > max(SAVE_VERSIONS):
        # libvirt's own test: a version it does not know is a header of the other byte order.
        version, data_len, was_running, fmt, cookie_offset = struct.unpack_from(">5I", buf.data, start + 16)
        byte_order = "big-endian"
    if version not in SAVE_VERSIONS:
        raise source.error(start + 16, expected="save image version 1 or 2", found=str(version))
    if data_len > MAX_DATA_LEN:
        raise source.error(
            start + 20,
            expected=f"an XML data length of at most {MAX_DATA_LEN} bytes",
            found=f"{data_len} bytes",
        )
    data_start = start + HEADER_SIZE
    require(source, buf, data_start, data_len, "the domain XML and cookie (data_len)")
    stream_start = data_start + data_len
    if fmt not in SAVE_FORMATS:
        raise UnsupportedFeature(source.name, start + 28, feature=f"save image format {fmt}")
    if cookie_offset and cookie_offset >= data_len:
        raise source.error(
            start + 32,
            expected=f"a cookie offset inside the {data_len}-byte data area",
            found=str(cookie_offset),
        )
    data = bytes(buf[data_start:stream_start])
    xml_end = data.find(b"\0")
    xml_bytes = data if xml_end < 0 else data[:xml_end]
    if cookie_offset and (xml_end < 0 or cookie_offset < xml_end):
        raise source.error(
            start + 32, expected="a cookie offset after the domain XML", found=str(cookie_offset)
        )
    try:
        domain = parse_domain_xml(xml_bytes.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise source.error(data_start, expected="a libvirt domain XML", found=str(e)) from None
    if stream_start >= len(buf):
        raise source.error(stream_start, expected="the QEMU stream after the domain XML", found="end of file")

    kind = SAVE_FORMATS[fmt]
    tail = source.at(stream_start)
    if kind is None:
        if buf[stream_start : stream_start + 4].tobytes() != qemu_stream.QEVM_MAGIC:
            raise source.error(
                stream_start,
                expected=f'a QEMU stream ("QEVM") as save format {SAVE_FORMAT_NAMES[fmt]} says',
                found=buf[stream_start : stream_start + 8].tobytes().hex(" "),
            )
        dump = qemu_stream.open_stream(tail, options, domain)
    else:
        head = read_head(source.path, source.name, 64, stream_start)
        found = container.detect(head)
        if found != kind:
            raise source.error(
                stream_start,
                expected=f"{kind} data as save format {fmt} says",
                found=found or head[:8].hex(" "),
            )

        def accept(content: bytes, size: int | None) -> None:
            if content[:4] != qemu_stream.QEVM_MAGIC:
                raise source.error(
                    stream_start,
                    expected=f'{kind} data holding a QEMU stream ("QEVM") as save format {fmt} says',
                    found=f"{kind} data starting {content[:8].hex(' ') or 'with nothing'}",
                )

        with container.decompressed(tail, kind, options, accept=accept) as inner:
            dump = qemu_stream.open_stream(inner, options, domain)
    _add_facts(dump, domain, fmt, was_running, version, byte_order, data_len)
    return dump


def _add_facts(
    dump: Dump, domain: DomainInfo, fmt: int, was_running: int, version: int, byte_order: str, data_len: int
) -> None:
    facts = dump.facts
    facts.format = "libvirt-save"
    facts.compression = SAVE_FORMATS[fmt]
    facts.guest_name = domain.name
    facts.uuid = domain.uuid or facts.uuid
    facts.vcpus = domain.vcpus
    if domain.memory_bytes is not None:
        facts.memory_bytes = domain.memory_bytes
    facts.machine = facts.machine or domain.machine
    facts.hypervisor = "qemu/kvm" if domain.domain_type in (None, "kvm") else f"qemu/{domain.domain_type}"
    facts.extra.update(
        was_running=bool(was_running),
        save_version=version,
        save_format=SAVE_FORMAT_NAMES[fmt],
        header_byte_order=byte_order,
        xml_data_len=data_len,
    )
    if domain.numa_cells:
        facts.extra["numa_cells"] = {c.id: c.memory_bytes for c in domain.numa_cells}


FORMAT = FormatSpec(
    name="libvirt-save",
    description="libvirt save image (virsh save, managedsave, snapshot memory), any compression",
    probe=probe,
    open=open_libvirt_save,
)
