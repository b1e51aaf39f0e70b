"""Exact sharing as data: the figures of each VM, the KSM view, the pairwise matrix and the
content id of every page, and their JSON form (``dengine.analyze/1``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from dengine_cli.pages import PAGE_SIZE

#: Version of the ``to_dict()`` form (the ``--json`` output of ``dengine analyze``).
SCHEMA = "dengine.analyze/1"


#: sizeof(struct ksm_rmap_item) on x86-64: rmap_list, anon_vma/nid, mm, address (4 x 8), oldchecksum
#: (+ age, remaining_skips in newer kernels; padded to 8) and a union of rb_node / {head, hlist}
#: (24): 64 bytes.  torvalds/linux mm/ksm.c.
KSM_RMAP_ITEM_BYTES = 64


ContentIds = npt.NDArray[np.unsignedinteger[Any]]


@dataclass(frozen=True)
class VmSharing:
    """The sharing figures of one VM (or of all of them: ``name == "total"``), in pages.

    Each present page falls in exactly one of these classes, so
    ``present == zero + shared_within + shared_across + kept``:

    * ``zero``: all-zero pages.  They cost nothing: the hypervisor maps them to its zero page.
    * ``shared_within``: a non-zero page whose content already appears at a lower gfn of the
      same VM.
    * ``shared_across``: the first copy in this VM of a content that an earlier VM (in the order
      the dumps are given) also holds; the stored copy is charged to that earlier VM.  Always 0
      when sharing across VMs is off.
    * ``kept``: the rest, the copies that are stored: the first copy of each content in the first
      VM that holds it (without sharing across VMs: the first copy in each VM).
    * ``unique`` (a part of ``kept``): pages whose content appears exactly once in all the VMs.

    The footprint after sharing is ``kept`` pages; savings = 1 - footprint / present.
    """

    name: str
    present: int
    zero: int
    shared_within: int
    shared_across: int
    kept: int
    unique: int

    @property
    def footprint_bytes(self) -> int:
        return self.kept * PAGE_SIZE

    @property
    def savings(self) -> float:
        """The fraction of present memory sharing saves (0 for an empty dump)."""
        return 1.0 - self.kept / self.present if self.present else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "pages_present": self.present,
            "zero_pages": self.zero,
            "shared_within_vm": self.shared_within,
            "shared_across_vms": self.shared_across,
            "kept_pages": self.kept,
            "unique_pages": self.unique,
            "present_bytes": self.present * PAGE_SIZE,
            "footprint_bytes": self.footprint_bytes,
            "savings_percent": round(100.0 * self.savings, 4),
        }


@dataclass(frozen=True)
class KsmView:
    """What Linux KSM would report after merging every present page of all the VMs on one host
    (KSM has no salting: always across VMs).

    * ``pages_shared``: distinct contents with at least two copies (KSM pages).  The zero page
      counts like any other content: that is KSM's default (``use_zero_pages=0``).
    * ``pages_sharing``: copies beyond the first of those contents (page table entries that point
      to a KSM page instead of their own page).
    * ``rmap_items``: every present page.  An approximation: KSM allocates one rmap_item per page
      it scans, and we take it to scan every page of guest RAM.
    * ``general_profit``: bytes, as ``/sys/kernel/mm/ksm/general_profit`` computes it
      (mm/ksm.c, general_profit_show, Linux 6.1+)::

          pages_sharing * PAGE_SIZE - rmap_items * sizeof(struct ksm_rmap_item)

    ``ksm_max_page_sharing`` (default 256 mappings per KSM page) is not modelled: a content with
    n > 256 copies is one KSM page here, ceil(n / 256) in the kernel.
    """

    pages_shared: int
    pages_sharing: int
    rmap_items: int

    @property
    def general_profit(self) -> int:
        return self.pages_sharing * PAGE_SIZE - self.rmap_items * KSM_RMAP_ITEM_BYTES

    def to_dict(self) -> dict[str, Any]:
        return {
            "pages_shared": self.pages_shared,
            "pages_sharing": self.pages_sharing,
            "rmap_items": self.rmap_items,
            "rmap_item_bytes": KSM_RMAP_ITEM_BYTES,
            "general_profit_bytes": self.general_profit,
        }


@dataclass(frozen=True, eq=False)
class SharingReport:
    """Exact sharing over several VMs.

    ``matrix[i, j]`` (i != j) is the number of distinct non-zero contents present in both VM i
    and VM j: the pages saved by placing the two together.  ``matrix[i, i]`` is the pages VM i
    saves by sharing within itself (its ``shared_within``).

    Pages are one content when their 128-bit hashes are equal (``hash_bits`` of them: fewer
    only in tests that force collisions).  ``verified``: every page merged was also compared
    byte by byte with the page it is merged with; then ``collisions`` counts the pages whose
    hash equals the hash of a page with different content (all pages of such a hash group),
    which were split by content and so change no figure (without verification it is 0).
    ``content_ids[v]`` is the content id of every present page of VM v (ascending gfn): 0 =
    zero page, then 1..``contents`` in the order of their hashes.
    """

    vms: tuple[VmSharing, ...]
    total: VmSharing
    ksm: KsmView
    matrix: npt.NDArray[np.int64]
    contents: int
    collisions: int
    cross_vm: bool
    hash_bits: int
    content_ids: tuple[ContentIds, ...]
    verified: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": SCHEMA,
            "cross_vm": self.cross_vm,
            "page_size": PAGE_SIZE,
            "vms": [vm.to_dict() for vm in self.vms],
            "total": self.total.to_dict(),
            "distinct_contents": self.contents,
            "hash_bits": self.hash_bits,
            "verified": self.verified,
            "hash_collisions": self.collisions,
            "ksm": self.ksm.to_dict(),
            "matrix": {"names": [vm.name for vm in self.vms], "shared_pages": self.matrix.tolist()},
        }
