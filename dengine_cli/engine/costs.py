"""What a plan costs to carry out: the Difference Engine paper's measured cost of each operation
applied to the operations a plan implies.

Unit costs are the paper's (Gupta et al., OSDI 2008, table 2: Xen 3.0.4 on a 2.33 GHz Core 2, in
microseconds per page); a policy file's ``[costs]`` table overrides any of them.

* build cost: what carrying out the plan costs once: ``share`` per page merged into another
  frame (zero pages included), ``patch`` per patch made, ``compress`` per page compressed,
  ``swap_out`` per page paged out.
* access cost: what touching every page once afterwards costs: ``unpatch`` per patched page,
  ``uncompress`` per compressed page, ``swap_in`` per paged-out page, and ``cow_break`` per page
  mapped to a shared frame (each is written once: every copy of a shared content, the kept one
  too, and every zero page).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

#: The largest cost of one operation, in microseconds (1000 s a page: far beyond any real cost,
#: small enough that a plan's total over any number of pages stays a finite number, which JSON
#: can hold).
MAX_COST_US = 1e9


@dataclass(frozen=True)
class CostModel:
    """Cost per operation, in microseconds (the paper's figures by default), each finite, from 0
    to :data:`MAX_COST_US`."""

    share: float = 6.2
    cow_break: float = 25.1
    compress: float = 29.7
    uncompress: float = 10.4
    patch: float = 338.1
    unpatch: float = 18.6
    swap_out: float = 48.9
    swap_in: float = 7151.6

    def __post_init__(self) -> None:
        # Policy files refuse such costs with the key named (UsageError); this guards the rest.
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if not (math.isfinite(value) and 0 <= value <= MAX_COST_US):
                raise ValueError(
                    f"cost {f.name} must be a number from 0 to {MAX_COST_US:.0f} us, not {value!r}"
                )

    def to_dict(self) -> dict[str, float]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class OperationCounts:
    """How many of each operation a plan implies (pages)."""

    shared: int = 0
    cow_mapped: int = 0
    patched: int = 0
    compressed: int = 0
    paged_out: int = 0

    def __add__(self, other: OperationCounts) -> OperationCounts:
        return OperationCounts(
            **{f.name: getattr(self, f.name) + getattr(other, f.name) for f in dataclasses.fields(self)}
        )


@dataclass(frozen=True)
class PlanCost:
    """The build and access cost of a plan, in microseconds, with the counts behind them."""

    model: CostModel
    counts: OperationCounts

    @property
    def build_us(self) -> float:
        c, m = self.counts, self.model
        return c.shared * m.share + c.patched * m.patch + c.compressed * m.compress + c.paged_out * m.swap_out

    @property
    def access_us(self) -> float:
        c, m = self.counts, self.model
        return (
            c.patched * m.unpatch
            + c.compressed * m.uncompress
            + c.paged_out * m.swap_in
            + c.cow_mapped * m.cow_break
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "unit_costs_us": self.model.to_dict(),
            "operations": dataclasses.asdict(self.counts),
            "build_seconds": round(self.build_us / 1e6, 6),
            "access_seconds": round(self.access_us / 1e6, 6),
        }
