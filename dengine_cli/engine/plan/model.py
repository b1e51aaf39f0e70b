"""The plan as data: per-VM figures, per-page actions, the report and its JSON form."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from dengine_cli.engine.costs import PlanCost
from dengine_cli.engine.paging import vms_per_host
from dengine_cli.engine.policy import Policy
from dengine_cli.pages import PAGE_SIZE

SCHEMA = "dengine.plan/1"


#: Action codes of the plan file, by value.
ACTIONS = ("zero", "share", "whole", "patch", "compress", "swap")
ZERO, SHARE, WHOLE, PATCH, COMPRESS, SWAP = range(len(ACTIONS))


I64 = npt.NDArray[np.int64]


Bool = npt.NDArray[np.bool_]


# --- results ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class VmPlan:
    """The plan's figures for one VM (or all: ``name == "total"``), pages and bytes.

    ``present == zero + shared + whole + patched + compressed + paged_out``.  In an estimate
    (sampled plan) ``whole``, ``patched``, ``compressed`` and their bytes are extrapolated and
    ``footprint_low``/``footprint_high`` bound the footprint (95%).
    """

    name: str
    present: int
    zero: int
    shared_within: int
    shared_across: int
    whole: int
    hot: int
    references: int
    patched: int
    patch_bytes: int
    compressed: int
    compressed_bytes: int
    paged_out: int
    paged_out_bytes: int
    footprint_bytes: int
    footprint_low: int | None = None
    footprint_high: int | None = None
    #: How many VMs like this one fit in the host memory (``None``: no host memory given).
    per_host: int | None = None

    @property
    def shared(self) -> int:
        return self.shared_within + self.shared_across

    @property
    def present_bytes(self) -> int:
        return self.present * PAGE_SIZE

    def savings_of(self, footprint: int) -> float:
        return 1.0 - footprint / self.present_bytes if self.present else 0.0

    @property
    def savings(self) -> float:
        """The fraction of present memory the plan saves."""
        return self.savings_of(self.footprint_bytes)

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "name": self.name,
            "pages_present": self.present,
            "present_bytes": self.present_bytes,
            "zero_pages": self.zero,
            "shared_pages": self.shared,
            "shared_within_vm": self.shared_within,
            "shared_across_vms": self.shared_across,
            "whole_pages": self.whole,
            "hot_pages": self.hot,
            "reference_pages": self.references,
            "patched_pages": self.patched,
            "patch_bytes": self.patch_bytes,
            "compressed_pages": self.compressed,
            "compressed_bytes": self.compressed_bytes,
            "paged_out_pages": self.paged_out,
            "paged_out_bytes": self.paged_out_bytes,
            "footprint_bytes": self.footprint_bytes,
            "savings_percent": round(100.0 * self.savings, 4),
        }
        if self.footprint_low is not None and self.footprint_high is not None:
            d["footprint_interval_bytes"] = [self.footprint_low, self.footprint_high]
            d["savings_interval_percent"] = [
                round(100.0 * self.savings_of(self.footprint_high), 4),
                round(100.0 * self.savings_of(self.footprint_low), 4),
            ]
        if self.per_host is not None:
            d["vms_per_host"] = self.per_host
        return d


@dataclass(frozen=True)
class SampleInfo:
    """How a sampled plan was estimated: ``units`` groups of candidates, ``take_all`` of them
    computed whole (large groups), ``sampled`` drawn from the others; ``pages_computed`` pages
    had their patches/compression really computed, of ``candidates``."""

    fraction: float
    seed: int
    units: int
    take_all: int
    sampled: int
    candidates: int
    pages_computed: int
    confidence: float = 0.95

    def to_dict(self) -> dict[str, Any]:
        return {"estimate": True, **dataclasses.asdict(self)}


@dataclass(frozen=True)
class HostFit:
    """Host memory and what fits in it: ``fits`` after paging; ``sets_per_host`` copies of the
    whole set of VMs fit (by footprint, before paging)."""

    host_memory: int
    footprint_before_paging: int
    fits: bool
    sets_per_host: int | None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True, eq=False)
class PagePlan:
    """Per page of one VM: its action code, its stored size in bytes (patch or compressed size,
    4096 whole, 0 otherwise) and, for patched pages, the reference (VM index, position)."""

    gfns: npt.NDArray[np.uint64]
    actions: npt.NDArray[np.uint8]
    sizes: npt.NDArray[np.int32]
    patch_positions: I64
    patch_ref_vm: I64
    patch_ref_pos: I64


@dataclass(frozen=True, eq=False)
class PlanReport:
    """A whole plan: the policy, per-VM figures, their total, the baseline policy's figures,
    the run-time cost, sampling and host information, and the per-page plan (for the plan
    file).  ``upper_bound``: some VM has no history, all its pages counted cold."""

    policy: Policy
    vms: tuple[VmPlan, ...]
    total: VmPlan
    cost: PlanCost
    upper_bound: bool
    sample: SampleInfo | None
    host: HostFit | None
    baseline: PlanReport | None
    pages: tuple[PagePlan, ...]
    content_ids: tuple[npt.NDArray[np.unsignedinteger[Any]], ...]
    #: ``None`` in an exact plan.
    estimate: bool = False

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "schema": SCHEMA,
            "page_size": PAGE_SIZE,
            "policy": self.policy.to_dict(),
            "upper_bound": self.upper_bound,
            "estimate": self.estimate,
            "sample": self.sample.to_dict() if self.sample else None,
            "host": self.host.to_dict() if self.host else None,
            "vms": [vm.to_dict() for vm in self.vms],
            "total": self.total.to_dict(),
            "cost": self.cost.to_dict(),
        }
        if self.baseline is not None:
            base = self.baseline.to_dict()
            d["baseline"] = {k: base[k] for k in ("policy", "vms", "total", "cost", "host", "estimate")}
        return d


# --- the engine --------------------------------------------------------------------------------


def count_of(mask: Bool | None) -> int:
    return int(np.count_nonzero(mask)) if mask is not None else 0


def total_of(vms: Sequence[VmPlan], host_memory: int | None, half: float | None) -> VmPlan:
    sums = {
        f.name: sum(getattr(vm, f.name) for vm in vms)
        for f in dataclasses.fields(VmPlan)
        if f.name not in ("name", "footprint_low", "footprint_high", "per_host")
    }
    fp = sums["footprint_bytes"]
    low = high = None
    if half is not None:
        low, high = max(0, fp - whole_bytes(half)), fp + whole_bytes(half)
    return VmPlan(
        name="total",
        **sums,
        footprint_low=low,
        footprint_high=high,
        per_host=vms_per_host(host_memory, fp) if host_memory is not None else None,
    )


# --- from paths ----------------------------------------------------------------------------------


def whole_bytes(half: float) -> int:
    """A half-width in whole bytes (float noise of an exact, f = 1, estimate is no width)."""
    return math.ceil(half) if half > 1e-6 else 0
