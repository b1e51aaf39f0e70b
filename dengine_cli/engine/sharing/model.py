"""Exact sharing as data: the figures of each VM, the KSM view, the pairwise matrix and the
content id of every page, and their JSON form (``dengine.analyze/1``)."""

from __future__ import annotations

import dataclasses
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


#: The kernel's default of ``/sys/kernel/mm/ksm/max_page_sharing``.
KSM_MAX_PAGE_SHARING = 256
#: The largest max_page_sharing the kernel takes (an int: kstrtoint in mm/ksm.c).
KSM_MAX_PAGE_SHARING_LIMIT = 2**31 - 1


@dataclass(frozen=True)
class KsmModel:
    """The knobs of ``/sys/kernel/mm/ksm`` that change what KSM reports, and the one thing a
    dump cannot tell: whether its zero pages were ever backed by host memory.

    * ``max_page_sharing``: mappings one KSM page may hold (the kernel's default 256, at least
      2).  A content with more copies is held by several KSM pages (stable_node_dups of one
      stable_node_chain).
    * ``use_zero_pages``: empty pages are merged with the kernel's zero page and counted as
      ``ksm_zero_pages``, not as ``pages_shared`` / ``pages_sharing`` (off by default, as in the
      kernel).
    * ``zero_pages_backed``: take every zero page of the dumps to be backed by a host page that
      KSM scans.  Off by default: a zero page in a guest's dump is almost always memory the
      guest never wrote, which the host never backed (KSM sees no page there); measured on QEMU
      guests under real KSM, 99 of some 93,000 zero pages were.  Guests that zero their free
      memory (Windows) back theirs: turn it on for them.
    """

    max_page_sharing: int = KSM_MAX_PAGE_SHARING
    use_zero_pages: bool = False
    zero_pages_backed: bool = False

    def __post_init__(self) -> None:
        if self.max_page_sharing < 2:
            raise ValueError("max_page_sharing must be at least 2, as in the kernel")


@dataclass(frozen=True, eq=False)
class CopyCounts:
    """How many non-zero contents have exactly ``copies[i]`` copies: ``contents[i]`` (only
    contents with two or more copies; ``copies`` ascending, distinct).  What the KSM view needs
    of the grouping, whatever its knobs: a few hundred numbers, never one per content."""

    copies: npt.NDArray[np.int64]
    contents: npt.NDArray[np.int64]

    @staticmethod
    def of(copies: npt.NDArray[np.int64]) -> CopyCounts:
        """The counts of ``copies``, the copies of each content."""
        values, counts = np.unique(copies[copies >= 2], return_counts=True)
        return CopyCounts(values.astype(np.int64), counts.astype(np.int64))

    @staticmethod
    def none() -> CopyCounts:
        return CopyCounts(np.zeros(0, np.int64), np.zeros(0, np.int64))

    def __add__(self, other: CopyCounts) -> CopyCounts:
        values = np.concatenate((self.copies, other.copies))
        counts = np.concatenate((self.contents, other.contents))
        merged, at = np.unique(values, return_inverse=True)
        return CopyCounts(merged.astype(np.int64), np.bincount(at, weights=counts).astype(np.int64))

    def to_dict(self) -> dict[str, list[int]]:
        return {"copies": self.copies.tolist(), "contents": self.contents.tolist()}


@dataclass(frozen=True)
class KsmView:
    """What Linux KSM would report once it has merged all the VMs on one host and its counters
    are stable (KSM has no salting: always across VMs), under ``model``.

    A content with n copies, cut by ``max_page_sharing`` M as mm/ksm.c fills its
    stable_node_dups (a new KSM page only when every one holding that content is full; a single
    page left over stays unshared): n // M full KSM pages of M mappings, and one more of
    n % M mappings when that is at least 2.

    * ``pages_shared``: KSM pages in use; ``pages_sharing``: mappings beyond the first of each.
    * ``stable_node_chains`` / ``stable_node_dups``: contents that need two or more KSM pages,
      and those pages.
    * ``ksm_zero_pages``: empty pages merged with the kernel's zero page (``use_zero_pages``
      and backed zero pages only).
    * ``rmap_items``: one per page KSM scans: every non-zero page, and the backed zero pages
      that are not KSM zero pages (after a full scan the kernel frees their rmap_items).
    * ``general_profit``: bytes, by the kernel's formula (mm/ksm.c general_profit_show,
      Linux 6.5+)::

          (pages_sharing + ksm_zero_pages) * PAGE_SIZE - rmap_items * sizeof(struct ksm_rmap_item)

    ``zero_pages``: the zero pages in the dumps, whether or not they are counted.
    """

    pages_shared: int
    pages_sharing: int
    ksm_zero_pages: int
    rmap_items: int
    stable_node_chains: int
    stable_node_dups: int
    zero_pages: int
    model: KsmModel

    @property
    def general_profit(self) -> int:
        return (self.pages_sharing + self.ksm_zero_pages) * PAGE_SIZE - self.rmap_items * KSM_RMAP_ITEM_BYTES

    def to_dict(self) -> dict[str, Any]:
        return {
            "pages_shared": self.pages_shared,
            "pages_sharing": self.pages_sharing,
            "ksm_zero_pages": self.ksm_zero_pages,
            "general_profit_bytes": self.general_profit,
            "rmap_items": self.rmap_items,
            "rmap_item_bytes": KSM_RMAP_ITEM_BYTES,
            "stable_node_chains": self.stable_node_chains,
            "stable_node_dups": self.stable_node_dups,
            "max_page_sharing": self.model.max_page_sharing,
            "use_zero_pages": self.model.use_zero_pages,
            "zero_pages_in_dumps": self.zero_pages,
            "zero_pages_assumed": "backed" if self.model.zero_pages_backed else "untouched",
        }


def _chains(
    copies: npt.NDArray[np.int64], max_page_sharing: int
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    """For contents of ``copies`` copies each, as mm/ksm.c fills their stable_node_dups under
    ``max_page_sharing`` M: the KSM pages each takes (n // M full ones, and one more of n % M
    mappings when that is at least 2) and the mappings they merge (pages_sharing: all but one
    per KSM page; a single copy left over stays unshared)."""
    m = max_page_sharing
    full, rest = copies // m, copies % m
    dups = full + (rest >= 2)
    sharing = full * (m - 1) + np.where(rest >= 2, rest - 1, 0)
    return dups, sharing


def ksm_extra_pages(counts: CopyCounts, max_page_sharing: int) -> int:
    """The host pages KSM holds for contents of ``counts`` copies beyond one per content: what
    the cap of ``max_page_sharing`` mappings a KSM page costs (its chains' further KSM pages and
    the copies left over unshared), the same count :func:`ksm_view` gives under that cap."""
    _, sharing = _chains(counts.copies, max_page_sharing)
    return int(((counts.copies - 1 - sharing) * counts.contents).sum())


def ksm_view(counts: CopyCounts, zero_pages: int, present: int, model: KsmModel) -> KsmView:
    """The :class:`KsmView` of contents with ``counts`` copies beside ``zero_pages`` zero pages,
    out of ``present`` pages in all, under ``model``."""
    copies, contents = counts.copies, counts.contents
    backed_zero = zero_pages if model.zero_pages_backed else 0
    ksm_zero = backed_zero if model.use_zero_pages else 0
    if backed_zero >= 2 and not model.use_zero_pages:
        # The zero page is then a content like any other.
        at = np.searchsorted(copies, backed_zero)
        if at < len(copies) and copies[at] == backed_zero:
            contents = contents.copy()
            contents[at] += 1
        else:
            copies = np.insert(copies, at, backed_zero)
            contents = np.insert(contents, at, 1)
    dups, sharing = _chains(copies, model.max_page_sharing)
    chained = dups >= 2
    return KsmView(
        pages_shared=int((dups * contents).sum()),
        pages_sharing=int((sharing * contents).sum()),
        ksm_zero_pages=ksm_zero,
        rmap_items=present - zero_pages + backed_zero - ksm_zero,
        stable_node_chains=int(contents[chained].sum()),
        stable_node_dups=int((dups * contents)[chained].sum()),
        zero_pages=zero_pages,
        model=model,
    )


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
    zero page, then 1..``contents`` in the order of their hashes.  ``copy_counts``: how many
    contents have how many copies, from which :attr:`ksm` is worked out under ``ksm_model``
    (:meth:`with_ksm` gives the same report under other knobs).
    """

    vms: tuple[VmSharing, ...]
    total: VmSharing
    copy_counts: CopyCounts
    matrix: npt.NDArray[np.int64]
    contents: int
    collisions: int
    cross_vm: bool
    hash_bits: int
    content_ids: tuple[ContentIds, ...]
    verified: bool = False
    ksm_model: KsmModel = KsmModel()

    @property
    def ksm(self) -> KsmView:
        return ksm_view(self.copy_counts, self.total.zero, self.total.present, self.ksm_model)

    def with_ksm(self, model: KsmModel) -> SharingReport:
        """This report with its KSM view under ``model``."""
        return dataclasses.replace(self, ksm_model=model)

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
