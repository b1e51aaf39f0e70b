"""Build libvirt save images around a QEMU stream (FORMATS.md §3.1), compressing the tail with the
real tools libvirt runs (``gzip -c``, ``bzip2 -c``, ``xz -c -3``, ``lzop -c``, ``zstd -c``)."""

from __future__ import annotations

import struct
import subprocess

SAVE_MAGIC = b"LibvirtQemudSave"
PARTIAL_MAGIC = b"LibvirtQemudPart"
FORMATS = {"raw": 0, "gzip": 1, "bzip2": 2, "xz": 3, "lzop": 4, "zstd": 5, "sparse": 6}
TOOLS = {
    "gzip": ["gzip", "-c"],
    "bzip2": ["bzip2", "-c"],
    "xz": ["xz", "-c", "-3"],
    "lzop": ["lzop", "-c"],
    "zstd": ["zstd", "-q", "-c"],
}
HEADER_SIZE = 92


def domain_xml(
    name: str = "alpha",
    uuid: str = "6c0ffee0-0000-4000-8000-00000000a1fa",
    memory_kib: int = 262144,
    vcpus: int = 1,
    machine: str = "pc-i440fx-7.2",
    unit: str | None = None,
    numa: list[tuple[int, int]] | None = None,
    domain_type: str = "kvm",
) -> str:
    """A small domain XML like ``virsh dumpxml --security-info --migratable`` writes."""
    mem_attr = f" unit='{unit}'" if unit else ""
    cells = ""
    if numa:
        cells = (
            "<cpu><numa>"
            + "".join(f"<cell id='{i}' cpus='{i}' memory='{kib}' unit='KiB'/>" for i, kib in numa)
            + "</numa></cpu>"
        )
    return (
        f"<domain type='{domain_type}'>\n  <name>{name}</name>\n  <uuid>{uuid}</uuid>\n"
        f"  <memory{mem_attr}>{memory_kib}</memory>\n"
        f"  <currentMemory unit='KiB'>{memory_kib}</currentMemory>\n"
        f"  <vcpu placement='static'>{vcpus}</vcpu>\n"
        f"  <os><type arch='x86_64' machine='{machine}'>hvm</type></os>\n  {cells}\n</domain>\n"
    )


def compress(kind: str, data: bytes) -> bytes:
    """``data`` through the real compressor libvirt would run."""
    return subprocess.run(TOOLS[kind], input=data, capture_output=True, check=True).stdout


def header(
    data_len: int,
    fmt: int = 0,
    *,
    version: int = 2,
    was_running: int = 1,
    cookie_offset: int = 0,
    magic: bytes = SAVE_MAGIC,
    big_endian: bool = False,
) -> bytes:
    order = ">" if big_endian else "<"
    return magic + struct.pack(f"{order}5I", version, data_len, was_running, fmt, cookie_offset) + bytes(56)


def build_save(
    stream: bytes,
    xml: str | None = None,
    kind: str = "raw",
    *,
    cookie: str | None = "<qemuDomainSaveCookie>\n</qemuDomainSaveCookie>\n",
    padding: int = 1024,
    big_endian: bool = False,
    version: int = 2,
    magic: bytes = SAVE_MAGIC,
    tail: bytes | None = None,
) -> bytes:
    """A save image: header, XML + cookie + zero padding, then ``stream`` (compressed for ``kind``
    with the real tool unless ``tail`` is given)."""
    data = (xml if xml is not None else domain_xml()).encode() + b"\0"
    cookie_offset = 0
    if cookie is not None:
        cookie_offset = len(data)
        data += cookie.encode() + b"\0"
    data += bytes(padding)
    if tail is None:
        tail = stream if kind in ("raw", "sparse") else compress(kind, stream)
    return (
        header(
            len(data),
            FORMATS[kind],
            version=version,
            cookie_offset=cookie_offset,
            magic=magic,
            big_endian=big_endian,
        )
        + data
        + tail
    )


def data_area(xml: str | None = None, padding: int = 1024) -> int:
    """How long build_save's data area is with the default cookie (for mapped-ram bases)."""
    data = (xml if xml is not None else domain_xml()).encode() + b"\0"
    data += b"<qemuDomainSaveCookie>\n</qemuDomainSaveCookie>\n\0"
    return len(data) + padding
