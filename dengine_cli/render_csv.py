"""How reports look as CSV: one row per VM and a ``total`` row, bytes and percent, a stable layout
for shell tools.  Imports neither rich nor click (CSV output pays for neither)."""

from __future__ import annotations

import csv
import io
from typing import TYPE_CHECKING

from dengine_cli.engine.sharing.model import SharingReport

if TYPE_CHECKING:
    from dengine_cli.engine.plan.model import PlanReport


def render_sharing_csv(report: SharingReport, de: PlanReport | None = None) -> str:
    """One CSV row per VM and a last row named ``total``; sizes in bytes, savings in percent;
    with ``de``, the Difference Engine's footprint and savings in two more columns."""
    buf = io.StringIO()
    out = csv.writer(buf, lineterminator="\n")
    out.writerow(
        [
            "vm",
            "pages_present",
            "zero_pages",
            "shared_within_vm",
            "shared_across_vms",
            "unique_pages",
            "kept_pages",
            "footprint_bytes",
            "savings_percent",
            *(["de_footprint_bytes", "de_savings_percent"] if de else []),
        ]
    )
    de_rows = [*de.vms, de.total] if de else []
    for i, vm in enumerate([*report.vms, report.total]):
        extra = [de_rows[i].footprint_bytes, f"{100.0 * de_rows[i].savings:.4f}"] if de_rows else []
        out.writerow(
            [
                vm.name,
                vm.present,
                vm.zero,
                vm.shared_within,
                vm.shared_across,
                vm.unique,
                vm.kept,
                vm.footprint_bytes,
                f"{100.0 * vm.savings:.4f}",
                *extra,
            ]
        )
    return buf.getvalue()


def render_matrix_csv(report: SharingReport) -> str:
    """The pairwise matrix as CSV: a header of VM names, then one row per VM."""
    buf = io.StringIO()
    out = csv.writer(buf, lineterminator="\n")
    names = [vm.name for vm in report.vms]
    out.writerow(["vm", *names])
    for i, name in enumerate(names):
        out.writerow([name, *(int(v) for v in report.matrix[i])])
    return buf.getvalue()


def render_plan_csv(plan: PlanReport) -> str:
    """One CSV row per VM and a ``total`` row: the plan's figures, bytes and percent."""
    buf = io.StringIO()
    out = csv.writer(buf, lineterminator="\n")
    keys = [k for k in plan.total.to_dict() if k not in ("name",) and not k.endswith("_interval_bytes")]
    keys = [k for k in keys if not k.endswith("interval_percent")]
    base = [*plan.baseline.vms, plan.baseline.total] if plan.baseline else []
    header = ["vm", *keys]
    if base:
        header += ["baseline_footprint_bytes", "baseline_savings_percent"]
    out.writerow(header)
    for i, vm in enumerate([*plan.vms, plan.total]):
        d = vm.to_dict()
        # Percentages with four decimals, as every other savings column (81.3480, not 81.348).
        row = [vm.name, *(f"{d[k]:.4f}" if k.endswith("_percent") else d.get(k, "") for k in keys)]
        if base:
            row += [base[i].footprint_bytes, f"{100.0 * base[i].savings:.4f}"]
        out.writerow(row)
    return buf.getvalue()
