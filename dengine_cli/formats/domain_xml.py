"""The few facts dengine takes from a libvirt domain XML (the one in a libvirt save image).

Source: libvirt ``docs/formatdomain.rst`` (``<memory unit=...>``, ``<vcpu>``, ``<os><type
machine=...>``, ``<cpu><numa><cell id= memory= unit=>``) and ``src/util/virutil.c``
``virScaleInteger`` (the unit table; the default unit of ``<memory>`` is KiB).

The XML comes from the dump file, so it is untrusted: documents with a DOCTYPE or entity
declarations are refused before parsing (``xml.etree`` would expand internal entities).
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass

#: libvirt's memory units (virScaleInteger): binary for the bare letters and ``*iB``, decimal
#: for ``KB``/``MB``/... .
_UNITS: dict[str, int] = {
    "b": 1,
    "bytes": 1,
    "k": 1 << 10,
    "kib": 1 << 10,
    "kb": 10**3,
    "m": 1 << 20,
    "mib": 1 << 20,
    "mb": 10**6,
    "g": 1 << 30,
    "gib": 1 << 30,
    "gb": 10**9,
    "t": 1 << 40,
    "tib": 1 << 40,
    "tb": 10**12,
    "p": 1 << 50,
    "pib": 1 << 50,
    "pb": 10**15,
    "e": 1 << 60,
    "eib": 1 << 60,
    "eb": 10**18,
}

_DECLARATION = re.compile(r"<!\s*(DOCTYPE|ENTITY)", re.IGNORECASE)


@dataclass(frozen=True)
class NumaCell:
    """One guest NUMA node: its id and memory in bytes."""

    id: int
    memory_bytes: int


@dataclass(frozen=True)
class DomainInfo:
    """What a domain XML says about the guest; ``None`` where it does not say."""

    name: str | None = None
    uuid: str | None = None
    #: ``<memory>``: the guest's RAM at boot (what QEMU's RAM blocks add up to without DIMMs).
    memory_bytes: int | None = None
    current_memory_bytes: int | None = None
    vcpus: int | None = None
    machine: str | None = None
    arch: str | None = None
    #: ``<domain type=...>``: ``kvm`` or ``qemu`` (TCG).
    domain_type: str | None = None
    numa_cells: tuple[NumaCell, ...] = ()


def _memory(element: ET.Element | None, what: str) -> int | None:
    if element is None or element.text is None:
        return None
    unit = element.get("unit", "KiB").strip().lower()
    if unit not in _UNITS:
        raise ValueError(f"unknown memory unit {unit!r} in <{what}>")
    try:
        value = int(element.text.strip())
    except ValueError:
        raise ValueError(f"<{what}> is not an integer: {element.text.strip()[:40]!r}") from None
    if value < 0:
        raise ValueError(f"<{what}> is negative")
    return value * _UNITS[unit]


def parse_domain_xml(text: str) -> DomainInfo:
    """Parse a libvirt ``<domain>`` document; ``ValueError`` saying why when it is not one."""
    if _DECLARATION.search(text):
        raise ValueError("a DOCTYPE or ENTITY declaration (refused: entity expansion)")
    try:
        root = ET.fromstring(text)
    except ET.ParseError as e:
        raise ValueError(f"malformed XML ({e})") from None
    if root.tag != "domain":
        raise ValueError(f"root element <{root.tag}> instead of <domain>")
    name = root.findtext("name")
    uuid = root.findtext("uuid")
    vcpu_text = root.findtext("vcpu")
    vcpus: int | None = None
    if vcpu_text is not None:
        try:
            vcpus = int(vcpu_text.strip())
        except ValueError:
            raise ValueError(f"<vcpu> is not an integer: {vcpu_text.strip()[:40]!r}") from None
    os_type = root.find("os/type")
    cells: list[NumaCell] = []
    for index, cell in enumerate(root.iterfind("cpu/numa/cell")):
        unit = cell.get("unit", "KiB").strip().lower()
        if unit not in _UNITS:
            raise ValueError(f"unknown memory unit {unit!r} in <cell>")
        try:
            size = int(cell.get("memory", "0")) * _UNITS[unit]
            cell_id = int(cell.get("id", str(index)))
        except ValueError:
            raise ValueError("<cell> with a non-integer id or memory") from None
        cells.append(NumaCell(cell_id, size))
    cells.sort(key=lambda c: c.id)
    return DomainInfo(
        name=name.strip() if name else None,
        uuid=uuid.strip().lower() if uuid else None,
        memory_bytes=_memory(root.find("memory"), "memory"),
        current_memory_bytes=_memory(root.find("currentMemory"), "currentMemory"),
        vcpus=vcpus,
        machine=os_type.get("machine") if os_type is not None else None,
        arch=os_type.get("arch") if os_type is not None else None,
        domain_type=root.get("type"),
        numa_cells=tuple(cells),
    )
