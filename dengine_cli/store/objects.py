"""The objects of a store and every page's object, numbered from a plan before a page is read.

Each page the plan stores (whole, patched, compressed, paged out) is one object, numbered in
scan order; a shared page maps to its kept copy's object, a patch refers to its reference page's
object.  The columns (codec, where, offset, length, reference, checksum) are filled as the pages
are written.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt

from dengine_cli.arrays import ArrayHome
from dengine_cli.engine.plan.model import PATCH, SHARE, ZERO
from dengine_cli.store.encode import stored_mask
from dengine_cli.store.planread import PlanFile

I64 = npt.NDArray[np.int64]


class ObjectPlan:
    """Object numbers of a plan's pages and the object columns."""

    def __init__(self, plan: PlanFile, home: ArrayHome | None = None) -> None:
        home = home or ArrayHome()
        self.plan = plan
        self.at_position: list[I64] = []
        self.owner: list[tuple[int, int]] = []
        first = 0
        for vm in plan.vms:
            stored = stored_mask(vm.actions)
            ids = home.full(len(vm.gfns), -1, np.int64)
            count = int(stored.sum())
            ids[stored] = first + np.arange(count, dtype=np.int64)
            self.at_position.append(ids)
            self.owner.append((first, first + count))
            first += count
        self.count = first
        self.codec = home.full(first, 0, np.uint8)
        self.where = home.full(first, 0, np.uint32)
        self.offset = home.full(first, 0, np.uint64)
        self.length = home.full(first, 0, np.uint32)
        self.reference = home.full(first, -1, np.int64)
        self.checksum = home.full(first, 0, np.uint64)
        self.page_object = [home.hold(self._page_objects(v)) for v in range(len(plan.vms))]

    def objects_of(self, ref_vm: I64, ref_gfn: I64) -> I64:
        """The objects of the pages at ``(ref_vm, ref_gfn)`` (read_plan checked they are pages
        the plan keeps whole)."""
        out = np.empty(len(ref_vm), dtype=np.int64)
        for r in np.unique(ref_vm).tolist():
            sel = ref_vm == r
            pos = np.searchsorted(self.plan.vms[r].gfns, ref_gfn[sel].astype(np.uint64))
            out[sel] = self.at_position[r][pos]
        return out

    def _page_objects(self, v: int) -> I64:
        vm = self.plan.vms[v]
        objs = self.at_position[v].copy()
        share = vm.actions == SHARE
        objs[share] = self.objects_of(vm.ref_vm[share], vm.ref_gfn[share])
        patched = vm.actions == PATCH
        self.reference[objs[patched]] = self.objects_of(vm.ref_vm[patched], vm.ref_gfn[patched])
        return objs

    def page_map(self, v: int) -> dict[str, npt.NDArray[Any]]:
        """VM ``v``'s page map: its non-zero pages' gfns and objects."""
        vm = self.plan.vms[v]
        nonzero = vm.actions != ZERO
        return {"gfn": vm.gfns[nonzero], "object": self.page_object[v][nonzero]}

    def columns(self) -> dict[str, npt.NDArray[Any]]:
        return {
            "codec": self.codec,
            "where": self.where,
            "offset": self.offset,
            "length": self.length,
            "reference": self.reference,
            "checksum": self.checksum,
        }
