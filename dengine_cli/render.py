"""How reports look in a terminal: plain text tables, the same whether stdout is a tty or a pipe."""

from __future__ import annotations

import io
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from rich import box
from rich.console import Console
from rich.table import Table

from dengine_cli.engine.sharing.model import KSM_RMAP_ITEM_BYTES, KsmView, SharingReport
from dengine_cli.pages import PAGE_SIZE

if TYPE_CHECKING:  # for annotations only: rendering sharing needs no planner
    from dengine_cli.engine.plan.model import PlanReport, VmPlan
    from dengine_cli.inspect import DumpInfo

#: How many physical ranges `info` lists in a table before saying "and N more".
MAX_RANGES_SHOWN = 12


def console(buf: io.StringIO, width: int | None = None) -> Console:
    """A colourless console of fixed width writing to ``buf`` (golden tests pin the width)."""
    if width is None:
        # On a terminal, its width; in a pipe or file, wide enough that nothing is cut.
        width = shutil.get_terminal_size((100, 24)).columns if sys.stdout.isatty() else 240
        width = max(80, width)
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


def ksm_text(ksm: KsmView) -> str:
    """The KSM view as the kernel's counters, and what it assumed of the zero pages."""
    profit = ksm.general_profit
    model = ksm.model
    knobs = f"max_page_sharing {model.max_page_sharing}, use_zero_pages {int(model.use_zero_pages)}"
    if model.zero_pages_backed:
        zero = f"zero pages: {ksm.zero_pages} in the dumps, all taken as backed by the host (an upper bound)"
    else:
        zero = (
            f"zero pages: {ksm.zero_pages} in the dumps, taken as never backed and not counted "
            "(a dump cannot tell; --ksm-zero-pages-backed counts them)"
        )
    return (
        f"KSM view (all VMs on one host; {knobs}): pages_shared {ksm.pages_shared}, pages_sharing "
        f"{ksm.pages_sharing}, ksm_zero_pages {ksm.ksm_zero_pages}, general_profit "
        f"{'-' if profit < 0 else ''}{size_text(abs(profit))} (after "
        f"{size_text(ksm.rmap_items * KSM_RMAP_ITEM_BYTES)} of rmap_items)\n  {zero}"
    )


def _pct(x: float) -> str:
    return f"{100.0 * x:.1f}%"


def render_sharing(
    report: SharingReport, *, matrix: bool = False, de: PlanReport | None = None, width: int | None = None
) -> str:
    """Per-VM and total sharing figures (with the Difference Engine's footprint and savings
    beside them when ``de`` is given), the KSM view, and optionally the pairwise matrix."""
    buf = io.StringIO()
    con = console(buf, width)
    title = "Whole-page sharing" + ("" if report.cross_vm else " within each VM only (no cross-VM sharing)")
    table = Table(title=title, box=box.SIMPLE_HEAD, title_justify="left")
    for header in ("vm", "present", "zero", "shared in vm", "shared across", "unique", "kept"):
        table.add_column(header, justify="left" if header == "vm" else "right", no_wrap=True)
    table.add_column("footprint", justify="right", no_wrap=True)
    table.add_column("savings", justify="right", no_wrap=True)
    de_rows: list[VmPlan] = []
    if de is not None:
        table.add_column("de footprint", justify="right", no_wrap=True)
        table.add_column("de savings", justify="right", no_wrap=True)
        de_rows = [*de.vms, de.total]
    rows = [*report.vms, report.total]
    names = [*short_names([vm.name for vm in report.vms]), report.total.name]
    for i, vm in enumerate(rows):
        extra = [size_text(de_rows[i].footprint_bytes), _savings_text(de_rows[i])] if de_rows else []
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
            *extra,
            end_section=i == len(rows) - 2,
        )
    con.print(table)
    if de is not None:
        con.print(_plan_notes(de))
    con.print(ksm_text(report.ksm))
    if report.verified:
        con.print(
            f"{report.contents} distinct non-zero contents; every match compared byte by byte, "
            f"{report.collisions} pages in hash collisions (split)"
        )
    else:
        con.print(
            f"{report.contents} distinct non-zero contents (equal {report.hash_bits}-bit hashes; "
            "--verify compares bytes)"
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


def _savings_text(vm: VmPlan) -> str:
    """Savings, with the 95% interval of an estimate."""
    text = _pct(vm.savings)
    if vm.footprint_low is not None and vm.footprint_high is not None:
        low, high = vm.savings_of(vm.footprint_high), vm.savings_of(vm.footprint_low)
        text += f" [{100 * low:.1f}-{100 * high:.1f}]"
    return text


def _plan_notes(plan: PlanReport) -> str:
    """What a reader must know to trust a plan's figures."""
    notes = []
    p = plan.policy
    det = p.detector.to_dict()
    notes.append(
        f"policy {p.name}: "
        + ("share across VMs" if p.cross_vm else "share within each VM")
        + (f", patch with {p.patch_codec} under {p.patch_threshold} B" if p.patch else "")
        + (f", compress with {p.compression_codec} under {p.compression_threshold} B" if p.compress else "")
        + (
            f"; similarity: {det.get('indexes')} indexes of {det.get('blocks_per_index')} blocks, "
            f"{det.get('candidates_per_bucket')} candidate(s) per bucket, seed {det.get('seed')}"
            if p.patch
            else ""
        )
    )
    if plan.upper_bound:
        notes.append("upper bound: no --history, so every page counted cold (none in active use)")
    if plan.sample is not None:
        s = plan.sample
        notes.append(
            f"estimate: patches and compression computed for {s.pages_computed} of {s.candidates} "
            f"candidate pages (--sample {s.fraction:g}, seed {s.seed}); [low-high] = "
            f"{100 * s.confidence:.0f}% confidence interval of the savings"
        )
    return "\n".join(notes)


def render_plan(plan: PlanReport, width: int | None = None) -> str:
    """The plan per VM and in total, beside the baseline's footprint and savings."""
    buf = io.StringIO()
    con = console(buf, width)
    table = Table(title=f"Plan: policy {plan.policy.name}", box=box.SIMPLE_HEAD, title_justify="left")
    headers = [
        "vm",
        "present",
        "zero",
        "shared",
        "patched",
        "compressed",
        "paged out",
        "footprint",
        "savings",
    ]
    base_rows: list[VmPlan] = []
    if plan.baseline is not None:
        name = plan.baseline.policy.name
        headers += [f"{name} footprint", f"{name} savings"]
        base_rows = [*plan.baseline.vms, plan.baseline.total]
    if plan.host is not None:
        headers.append("per host")
    for header in headers:
        table.add_column(header, justify="left" if header == "vm" else "right", no_wrap=True)
    rows = [*plan.vms, plan.total]
    names = [*short_names([vm.name for vm in plan.vms]), "total"]
    for i, vm in enumerate(rows):
        cells = [
            names[i],
            str(vm.present),
            str(vm.zero),
            str(vm.shared),
            f"{vm.patched} ({size_text(vm.patch_bytes)})",
            f"{vm.compressed} ({size_text(vm.compressed_bytes)})",
            str(vm.paged_out),
            size_text(vm.footprint_bytes),
            _savings_text(vm),
        ]
        if base_rows:
            cells += [size_text(base_rows[i].footprint_bytes), _savings_text(base_rows[i])]
        if plan.host is not None:
            cells.append("" if vm.per_host is None else str(vm.per_host))
        table.add_row(*cells, end_section=i == len(rows) - 2)
    con.print(table)
    con.print(_plan_notes(plan))
    host = plan.host
    if host is not None:
        paged = (
            f"paged out {plan.total.paged_out} pages ({size_text(plan.total.paged_out_bytes)})"
            if plan.total.paged_out
            else "nothing paged out"
        )
        sets = f"; {host.sets_per_host} such set(s) of VMs fit" if host.sets_per_host is not None else ""
        con.print(
            f"host memory {size_text(host.host_memory)}: footprint before paging "
            f"{size_text(host.footprint_before_paging)}; {paged}"
            + ("" if host.fits else "; STILL DOES NOT FIT")
            + sets
        )
    cost = plan.cost
    con.print(
        f"run-time cost: building the plan {cost.build_us / 1e6:.3f} s of CPU; touching every page "
        f"once afterwards {cost.access_us / 1e6:.3f} s (unit costs in us: {_fact_text(cost.model.to_dict())})"
    )
    return buf.getvalue()
