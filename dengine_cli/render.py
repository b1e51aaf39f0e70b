"""How reports look in a terminal: plain text tables, the same whether stdout is a tty or a pipe."""

from __future__ import annotations

import csv
import io
import shutil
from collections.abc import Sequence
from pathlib import Path

from rich import box
from rich.console import Console
from rich.table import Table

from dengine_cli.formats.base import PAGE_SIZE
from dengine_cli.inspect import DumpInfo
from dengine_cli.sharing import KSM_RMAP_ITEM_BYTES, SharingReport

#: How many physical ranges `info` lists in a table before saying "and N more".
MAX_RANGES_SHOWN = 12


def console(buf: io.StringIO, width: int | None = None) -> Console:
    """A colourless console of fixed width writing to ``buf`` (golden tests pin the width)."""
    if width is None:
        width = max(80, min(shutil.get_terminal_size((100, 24)).columns, 160))
    return Console(file=buf, width=width, color_system=None, highlight=False, emoji=False)


def size_text(n_bytes: int) -> str:
    """Bytes in binary units with one decimal: ``1.5 GiB``."""
    value = float(n_bytes)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{int(value)} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def render_info(infos: Sequence[DumpInfo], width: int | None = None) -> str:
    """One key/value table per dump."""
    buf = io.StringIO()
    con = console(buf, width)
    for info in infos:
        facts = info.facts
        table = Table(title=info.path, box=box.SIMPLE, show_header=False, title_justify="left")
        table.add_column("field", style="bold")
        table.add_column("value")
        compression = f" ({facts['compression']})" if facts["compression"] else ""
        table.add_row("format", facts["format"] + compression)
        for key, label in (
            ("guest_name", "guest"),
            ("uuid", "uuid"),
            ("hypervisor", "hypervisor"),
            ("machine", "machine"),
            ("arch", "arch"),
            ("guest_type", "guest type"),
            ("xen_version", "xen version"),
            ("vcpus", "vcpus"),
        ):
            if facts.get(key) is not None:
                table.add_row(label, str(facts[key]))
        if facts.get("memory_bytes") is not None:
            table.add_row("memory", size_text(int(facts["memory_bytes"])))
        table.add_row("page size", str(facts["page_size"]))
        table.add_row("file size", size_text(info.file_bytes))
        table.add_row("pages present", f"{info.pages_present} ({size_text(info.pages_present * PAGE_SIZE)})")
        share = 100.0 * info.zero_pages / info.pages_present if info.pages_present else 0.0
        table.add_row("zero pages", f"{info.zero_pages} ({share:.1f}%)")
        ranges = [
            f"{s << 12:#014x}-{(s + n) << 12:#014x}  {size_text(n * PAGE_SIZE)}"
            for s, n in info.ranges[:MAX_RANGES_SHOWN]
        ]
        if len(info.ranges) > MAX_RANGES_SHOWN:
            ranges.append(f"... and {len(info.ranges) - MAX_RANGES_SHOWN} more (--json lists all)")
        table.add_row("physical ranges", "\n".join(ranges) or "none")
        for key, value in sorted(facts.get("extra", {}).items()):
            if value in ("", [], {}, None):
                continue
            table.add_row(key.replace("_", " "), _fact_text(value))
        for note in facts.get("skipped", []):
            table.add_row("left out", note)
        con.print(table)
    return buf.getvalue()


def _fact_text(value: object) -> str:
    if isinstance(value, dict):
        return ", ".join(f"{k}={v}" for k, v in value.items())
    if isinstance(value, list | tuple):
        return ", ".join(str(v) for v in value)
    return str(value)


def _pct(x: float) -> str:
    return f"{100.0 * x:.1f}%"


def render_sharing(report: SharingReport, *, matrix: bool = False, width: int | None = None) -> str:
    """Per-VM and total sharing figures, the KSM view, and optionally the pairwise matrix."""
    buf = io.StringIO()
    con = console(buf, width)
    title = "Whole-page sharing" + ("" if report.cross_vm else " within each VM only (no cross-VM sharing)")
    table = Table(title=title, box=box.SIMPLE_HEAD, title_justify="left")
    for header in ("vm", "present", "zero", "shared in vm", "shared across", "unique", "kept"):
        table.add_column(header, justify="left" if header == "vm" else "right", no_wrap=True)
    table.add_column("footprint", justify="right", no_wrap=True)
    table.add_column("savings", justify="right", no_wrap=True)
    rows = [*report.vms, report.total]
    names = [*short_names([vm.name for vm in report.vms]), report.total.name]
    for i, vm in enumerate(rows):
        table.add_row(
            names[i],
            str(vm.present),
            str(vm.zero),
            str(vm.shared_within),
            str(vm.shared_across),
            str(vm.unique),
            str(vm.kept),
            size_text(vm.footprint_bytes),
            _pct(vm.savings),
            end_section=i == len(rows) - 2,
        )
    con.print(table)
    ksm = report.ksm
    profit = ksm.general_profit
    con.print(
        f"KSM view (all VMs on one host): pages_shared {ksm.pages_shared}, pages_sharing "
        f"{ksm.pages_sharing}, general_profit {'-' if profit < 0 else ''}{size_text(abs(profit))} "
        f"(after {size_text(ksm.rmap_items * KSM_RMAP_ITEM_BYTES)} of rmap_items)"
    )
    con.print(
        f"{report.contents} distinct non-zero contents; {report.collisions} pages in hash collisions "
        "(split by a byte-by-byte compare)"
    )
    if matrix:
        con.print()
        con.print("Pages saved by placing two VMs together (diagonal: saved within the VM):")
        con.print(_matrix_table(report))
    return buf.getvalue()


def short_names(names: Sequence[str]) -> list[str]:
    """Dump names as tables show them: base names when those are unique, else the names given."""
    bases = [Path(n).name for n in names]
    return bases if len(set(bases)) == len(bases) else list(names)


def _matrix_table(report: SharingReport) -> Table:
    names = short_names([vm.name for vm in report.vms])
    table = Table(box=box.SIMPLE_HEAD)
    table.add_column("vm")
    for i in range(len(names)):
        table.add_column(f"[{i}]", justify="right")
    for i, name in enumerate(names):
        table.add_row(f"[{i}] {name}", *(str(int(v)) for v in report.matrix[i]))
    return table


def render_sharing_csv(report: SharingReport) -> str:
    """One CSV row per VM and a last row named ``total``; sizes in bytes, savings in percent."""
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
        ]
    )
    for vm in [*report.vms, report.total]:
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
