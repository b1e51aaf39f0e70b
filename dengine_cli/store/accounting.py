"""What each VM takes in a store (pages paged out counted apart, as the plan does), charged as
the plan charges it: an object to the VM whose page
it stores (the kept copy's VM for shared contents), frames to the VMs of their pages in
proportion to their page count (``--pack``); beside the plan's own bytes for the VM."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from dengine_cli.engine.plan.model import COMPRESS, PATCH, SWAP, WHOLE, ZERO
from dengine_cli.store.catalog import FrameRow
from dengine_cli.store.encode import stored_mask
from dengine_cli.store.layout import FRAMED, FRAMED_XOR
from dengine_cli.store.objects import ObjectPlan
from dengine_cli.store.planread import PlanFile


@dataclass
class VmBytes:
    """What one VM takes in the store, beside what its plan said."""

    name: str
    pages: int
    zero_pages: int
    plan_bytes: int
    footprint_bytes: int
    stored_bytes: int = 0
    whole_bytes: int = 0
    patch_bytes: int = 0
    compressed_bytes: int = 0
    paged_out_bytes: int = 0
    framed_pages: int = 0
    #: Pages whose encoded size differs from the plan's (a codec library of another version).
    size_mismatches: int = 0

    @property
    def difference(self) -> float:
        """(stored - plan) / plan, 0 when the plan stores nothing."""
        return (self.stored_bytes - self.plan_bytes) / self.plan_bytes if self.plan_bytes else 0.0

    def to_dict(self) -> dict[str, Any]:
        d = dict(vars(self))
        d["difference_percent"] = round(100.0 * self.difference, 4)
        return d


def vm_bytes(plan: PlanFile, objects: ObjectPlan, frame_rows: Sequence[FrameRow]) -> list[VmBytes]:
    # Bytes of each frame per page slot, for charging frames to the VMs of their pages.
    per_slot = np.array([r[3] / r[4] for r in frame_rows], dtype=np.float64)
    out = []
    for v, vm in enumerate(plan.vms):
        lo, hi = objects.owner[v]
        acts = vm.actions[stored_mask(vm.actions)]
        length = objects.length[lo:hi].astype(np.int64)
        framed = np.isin(objects.codec[lo:hi], (FRAMED, FRAMED_XOR))
        charged = length.astype(np.float64)
        if framed.any():
            charged[framed] = per_slot[objects.where[lo:hi][framed]]
        plan_sizes = vm.sizes[stored_mask(vm.actions)]
        exact = ~framed & (acts != SWAP)
        b = VmBytes(
            name=vm.name,
            pages=len(vm.gfns),
            zero_pages=int(np.count_nonzero(vm.actions == ZERO)),
            plan_bytes=int(vm.sizes.sum()),
            footprint_bytes=int(plan.figures(v).get("footprint_bytes", int(vm.sizes.sum()))),
            stored_bytes=round(charged[acts != SWAP].sum()),
            whole_bytes=round(charged[acts == WHOLE].sum()),
            patch_bytes=round(charged[acts == PATCH].sum()),
            compressed_bytes=round(charged[acts == COMPRESS].sum()),
            paged_out_bytes=round(charged[acts == SWAP].sum()),
            framed_pages=int(framed.sum()),
            size_mismatches=int(np.count_nonzero(length[exact] != plan_sizes[exact])),
        )
        out.append(b)
    return out
