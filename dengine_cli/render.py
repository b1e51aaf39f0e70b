"""How reports look in a terminal: plain text tables, the same whether stdout is a tty or a pipe."""

from __future__ import annotations

import io
import re
import shutil
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text

from dengine_cli.engine.sharing.model import KSM_RMAP_ITEM_BYTES, KsmView, SharingReport, VmSharing
from dengine_cli.pages import PAGE_SIZE

if TYPE_CHECKING:  # for annotations only: rendering sharing needs no planner
    from dengine_cli.engine.plan.model import PlanReport, VmPlan
    from dengine_cli.inspect import DumpInfo

#: Spaces at the end of a line.
TRAILING_SPACES = re.compile(r" +$", re.MULTILINE)
#: How many physical ranges `info` lists in a table before saying "and N more".
MAX_RANGES_SHOWN = 12


def console(buf: io.StringIO, width: int | None = None) -> Console:
    """A colourless console of fixed width writing to ``buf`` (golden tests pin the width)."""
    if width is None:
        # On a terminal, its width; in a pipe or file, wide enough that nothing is cut.
        width = shutil.get_terminal_size((100, 24)).columns if sys.stdout.isatty() else 240
        width = max(80, width)
    # No markup: names of dumps are text ("[bold]x.raw" is a file name, not a style).
    return Console(file=buf, width=width, color_system=None, highlight=False, emoji=False, markup=False)


def text_of(buf: io.StringIO) -> str:
    """What a console wrote to ``buf``, each line without the spaces rich pads it with to the
    width of its table: a pipe gets the text as drawn, for ``diff``, ``wc -L`` and ``column``."""
    return TRAILING_SPACES.sub("", buf.getvalue())


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
    return text_of(buf)


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
    _sharing_notes(con, report)
    if matrix:
        con.print()
        con.print("Pages saved by placing two VMs together (diagonal: saved within the VM):")
        from rich.measure import Measurement

        whole = _matrix_table(report)
        natural = Measurement.get(con, con.options.update(width=1 << 16), whole).maximum
        # Wider than the output: folded into blocks of columns, as on a terminal, where rich
        # would squeeze every name to an ellipsis and break each row.
        for part in [whole] if natural <= con.width else _matrix_tables(con, report):
            con.print(part)
    return text_of(buf)


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


def _counted(n: int, one: str, many: str | None = None) -> str:
    """``1 block``, ``2 blocks``."""
    return f"{n} {one if n == 1 else many or one + 's'}"


def _plan_notes(plan: PlanReport) -> str:
    """What a reader must know to trust a plan's figures."""
    notes = []
    p = plan.policy
    notes.append(
        f"policy {p.name}: "
        + ("share across VMs" if p.cross_vm else "share within each VM")
        + (f", patch with {p.patch_codec} under {p.patch_threshold} B" if p.patch else "")
        + (f", compress with {p.compression_codec} under {p.compression_threshold} B" if p.compress else "")
        + (
            f"; similarity: {_counted(p.detector.indexes, 'index', 'indexes')} of "
            f"{_counted(p.detector.blocks_per_index, 'block')}, "
            f"{_counted(p.detector.candidates, 'candidate')} per bucket, seed {p.detector.seed}"
            if p.patch
            else ""
        )
    )
    if plan.upper_bound:
        notes.append("upper bound: every page of a VM without --history counted cold (none in active use)")
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
    for line in _plan_tail(plan):
        con.print(line)
    return text_of(buf)


# --- the terminal layout -------------------------------------------------------------------------
#
# On a terminal, tables choose the columns that matter, put units in the headers and drop (or, for
# the matrix, fold) columns rather than cut a number; names wrap.  Pipes and files keep the plain
# layout above, byte for byte: scripts read it.

#: Binary units a table's sizes are shown in (one unit per table, named in its headers).
UNITS = (("KiB", 1 << 10), ("MiB", 1 << 20), ("GiB", 1 << 30), ("TiB", 1 << 40))
#: A name column narrower than this folds names that are longer.
NAME_MIN_WIDTH = 12
#: A breakdown bar is never narrower than this.
BAR_MIN_WIDTH = 20


@dataclass(frozen=True)
class TableUnit:
    """The unit of a table's sizes: the largest unit in which the biggest VM still counts 10 or
    more (16 GiB VMs in GiB, 4 GiB VMs in MiB: one decimal keeps 0.1% of a VM)."""

    name: str
    size: int

    @classmethod
    def for_bytes(cls, largest: int) -> TableUnit:
        chosen = UNITS[0]
        for unit in UNITS:
            if largest >= 10 * unit[1]:
                chosen = unit
        return cls(*chosen)

    def text(self, n_bytes: int) -> str:
        return "0" if n_bytes == 0 else f"{n_bytes / self.size:.1f}"


@dataclass(frozen=True)
class Column:
    """One column of a terminal table: ``rank`` 0 is always shown, higher ranks go first when
    the terminal is too narrow; ``wide`` columns only with ``--wide``."""

    header: str
    cells: list[str]
    rank: int
    wide: bool = False
    name: bool = False

    @property
    def label(self) -> str:
        """The header without its unit line."""
        lines = self.header.split("\n")
        return " ".join(lines[:-1] if len(lines) > 1 else lines)


@dataclass(frozen=True)
class Segment:
    """One part of a breakdown bar: what it is, its glyph (readable without colour) and colour."""

    label: str
    glyph: str
    style: str


#: The parts of a VM's memory, in the order bars draw them.
SEGMENTS = {
    "zero": Segment("zero", "░", "bright_black"),
    "shared": Segment("shared", "▒", "green"),
    "patched": Segment("patched", "▓", "cyan"),
    "compressed": Segment("compressed", "≡", "blue"),
    "paged out": Segment("paged out", "·", "magenta"),
    "remaining": Segment("remaining", "█", "yellow"),
}


def term_console(buf: io.StringIO, width: int, color: bool = False) -> Console:
    """A console of ``width`` columns writing to ``buf``; ANSI colours only when ``color``."""
    return Console(
        file=buf,
        width=width,
        force_terminal=color,
        color_system="standard" if color else None,
        highlight=False,
        emoji=False,
        markup=False,
        soft_wrap=False,
    )


def _build_table(title: str, columns: Sequence[Column], sections: int) -> Table:
    table = Table(title=title, box=box.SIMPLE_HEAD, title_justify="left", pad_edge=False)
    depth = max(col.header.count("\n") for col in columns)
    for col in columns:
        # Headers of fewer lines are pushed down, so the units stand on one line.
        header = "\n" * (depth - col.header.count("\n")) + col.header
        if col.name:
            table.add_column(header, overflow="fold", min_width=_name_width(col))
        else:
            table.add_column(header, justify="right", no_wrap=True)
    rows = len(columns[0].cells)
    for i in range(rows):
        table.add_row(*(col.cells[i] for col in columns), end_section=i == rows - 1 - sections)
    return table


def _longest(col: Column) -> int:
    return max(len(c) for c in [col.header, *col.cells])


def _name_width(col: Column) -> int:
    return min(_longest(col), NAME_MIN_WIDTH)


def fit_table(
    con: Console, title: str, columns: Sequence[Column], *, wide: bool, sections: int = 1
) -> tuple[Table, list[str]]:
    """The table of the columns that fit ``con``'s width without cutting a number, and the
    headers left out.  With ``wide`` every column is shown, however wide."""
    from rich.measure import Measurement

    shown = [c for c in columns if wide or not c.wide]
    left_out: list[str] = []
    while True:
        table = _build_table(title, shown, sections)
        # Its natural width, less what folding the names may take off.
        natural = Measurement.get(con, con.options.update(width=1 << 16), table).maximum
        fold = sum(_longest(col) - _name_width(col) for col in shown if col.name)
        ranks = [c.rank for c in shown]
        if wide or natural - fold <= con.width or max(ranks) == 0:
            return table, left_out
        drop = max(range(len(shown)), key=lambda k: (ranks[k], k))
        left_out.insert(0, shown[drop].label)
        shown = [c for k, c in enumerate(shown) if k != drop]


def print_table(con: Console, table: Table, wide: bool) -> None:
    """Print ``table``; with ``wide`` at its natural width when that is more than the console's
    (the terminal then wraps or scrolls the lines, but no number is cut)."""
    from rich.measure import Measurement

    natural = Measurement.get(con, con.options.update(width=1 << 16), table).maximum
    if not wide or natural <= con.width:
        con.print(table)
        return
    wider = term_console(io.StringIO(), natural, con.is_terminal)
    wider.print(table)
    assert isinstance(wider.file, io.StringIO)
    con.file.write(wider.file.getvalue())


def print_left_out(con: Console, left_out: Sequence[str], columns: Sequence[Column], wide: bool) -> None:
    """Say which columns the width left out, and what ``--wide`` adds."""
    if wide:
        return
    more = [c.label for c in columns if c.wide]
    if left_out:
        con.print("Left out at this width: " + ", ".join(left_out) + "; --wide shows every column")
    elif more:
        con.print("--wide adds: " + ", ".join(more))


def breakdown_bar(parts: Sequence[tuple[str, int]], width: int) -> Text:
    """A bar of ``width`` cells split in proportion to ``parts`` (label, pages); each part gets
    its share by largest remainder, so the cells always add up to ``width``."""
    total = sum(n for _, n in parts)
    bar = Text()
    if total <= 0:
        return bar
    exact = [n * width / total for _, n in parts]
    cells = [int(x) for x in exact]
    order = sorted(range(len(parts)), key=lambda k: (-(exact[k] - cells[k]), k))
    for k in order[: width - sum(cells)]:
        cells[k] += 1
    for (label, _), n in zip(parts, cells, strict=True):
        seg = SEGMENTS[label]
        bar.append(seg.glyph * n, style=seg.style)
    return bar


def render_bars(
    con: Console,
    title: str,
    names: Sequence[str],
    parts: Sequence[Sequence[tuple[str, int]]],
    savings: Sequence[str],
) -> None:
    """One breakdown bar per VM (names fold, never cut) with its savings at the end, and a
    legend of the parts that occur."""
    name_width = min(max(len(n) for n in names), max(NAME_MIN_WIDTH, con.width // 4))
    bar_width = max(BAR_MIN_WIDTH, con.width - name_width - 10)
    grid = Table.grid(padding=(0, 1))
    grid.add_column(overflow="fold", width=name_width)
    grid.add_column(no_wrap=True)
    grid.add_column(justify="right", no_wrap=True)
    for name, vm_parts, saved in zip(names, parts, savings, strict=True):
        grid.add_row(name, breakdown_bar(vm_parts, bar_width), saved)
    con.print(title)
    con.print(grid)
    used = [label for label in SEGMENTS if any(n for vm in parts for lab, n in vm if lab == label)]
    legend = Text("  ")
    for label in used:
        seg = SEGMENTS[label]
        legend.append(seg.glyph, style=seg.style)
        legend.append(f" {label}  ")
    con.print(legend)


def plan_parts(vm: VmPlan) -> list[tuple[str, int]]:
    """A planned VM's pages by what the plan does with them (they add up to ``present``)."""
    return [
        ("zero", vm.zero),
        ("shared", vm.shared),
        ("patched", vm.patched),
        ("compressed", vm.compressed),
        ("paged out", vm.paged_out),
        ("remaining", vm.whole),
    ]


def sharing_parts(vm: VmSharing) -> list[tuple[str, int]]:
    """A VM's pages under whole-page sharing alone."""
    return [("zero", vm.zero), ("shared", vm.shared_within + vm.shared_across), ("remaining", vm.kept)]


def _pct_cell(x: float) -> str:
    return f"{100.0 * x:.1f}"


def _interval_cell(vm: VmPlan) -> str:
    """Savings in percent, ``±`` the half-width of an estimate's 95% interval."""
    text = _pct_cell(vm.savings)
    if vm.footprint_low is not None and vm.footprint_high is not None:
        low, high = vm.savings_of(vm.footprint_high), vm.savings_of(vm.footprint_low)
        text += f"±{100.0 * max(vm.savings - low, high - vm.savings):.1f}"
    return text


def _sharing_columns(report: SharingReport, de: PlanReport | None, names: list[str]) -> list[Column]:
    rows = [*report.vms, report.total]
    unit = TableUnit.for_bytes(max((vm.present for vm in report.vms), default=0) * PAGE_SIZE)
    u = unit.name

    def size(pages: Sequence[int]) -> list[str]:
        return [unit.text(n * PAGE_SIZE) for n in pages]

    cols = [
        Column("vm", names, 0, name=True),
        Column(f"present\n{u}", size([vm.present for vm in rows]), 3),
        Column(f"zero\n{u}", size([vm.zero for vm in rows]), 6),
        Column(f"shared\n{u}", size([vm.shared_within + vm.shared_across for vm in rows]), 5),
        Column(f"shared\nin vm\n{u}", size([vm.shared_within for vm in rows]), 7, wide=True),
        Column(f"shared\nacross\n{u}", size([vm.shared_across for vm in rows]), 7, wide=True),
        Column(f"unique\n{u}", size([vm.unique for vm in rows]), 7, wide=True),
        Column(f"footprint\n{u}", size([vm.kept for vm in rows]), 4),
        Column("savings\n%", [_pct_cell(vm.savings) for vm in rows], 1),
    ]
    if de is not None:
        de_rows = [*de.vms, de.total]
        cols.append(Column(f"de\nfootprint\n{u}", [unit.text(vm.footprint_bytes) for vm in de_rows], 2))
        cols.append(Column("de\nsavings\n%", [_interval_cell(vm) for vm in de_rows], 0))
    return cols


def render_sharing_terminal(
    report: SharingReport,
    *,
    matrix: bool = False,
    de: PlanReport | None = None,
    width: int = 80,
    wide: bool = False,
    color: bool = False,
) -> str:
    """:func:`render_sharing` for a terminal of ``width`` columns: the columns that fit, sizes
    in one unit named in the headers, a breakdown bar per VM, the matrix folded to the width."""
    buf = io.StringIO()
    con = term_console(buf, width, color)
    names = [*short_names([vm.name for vm in report.vms]), "total"]
    title = "Whole-page sharing" + ("" if report.cross_vm else " within each VM only (no cross-VM sharing)")
    columns = _sharing_columns(report, de, names)
    table, left_out = fit_table(con, title, columns, wide=wide)
    print_table(con, table, wide)
    print_left_out(con, left_out, columns, wide)
    con.print()
    if de is not None:
        parts = [plan_parts(vm) for vm in [*de.vms, de.total]]
        savings = [f"{_pct_cell(vm.savings)}%" for vm in [*de.vms, de.total]]
        render_bars(con, f"Memory of each VM under policy {de.policy.name} (pages):", names, parts, savings)
    else:
        parts = [sharing_parts(vm) for vm in [*report.vms, report.total]]
        savings = [f"{_pct_cell(vm.savings)}%" for vm in [*report.vms, report.total]]
        render_bars(con, "Memory of each VM under whole-page sharing (pages):", names, parts, savings)
    con.print()
    if de is not None:
        con.print(_plan_notes(de))
    _sharing_notes(con, report)
    if matrix:
        con.print()
        con.print("Pages saved by placing two VMs together (diagonal: saved within the VM):")
        for part in _matrix_tables(con, report):
            con.print(part)
    return text_of(buf)


def _sharing_notes(con: Console, report: SharingReport) -> None:
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


def _matrix_tables(con: Console, report: SharingReport) -> list[Table]:
    """The pairwise matrix, its columns folded into as many tables as the width needs."""
    names = short_names([vm.name for vm in report.vms])
    labels = [f"[{i}] {name}" for i, name in enumerate(names)]
    cell = max([len(str(int(v))) for v in report.matrix.flat] + [len(f"[{len(names) - 1}]")]) + 2
    label_width = min(max(len(s) for s in labels), max(NAME_MIN_WIDTH, con.width // 3))
    # A column takes its cell, its padding and one separator; the table two edges.
    per_table = max(1, (con.width - label_width - 4) // (cell + 1))

    def block(cols: range) -> Table:
        table = Table(box=box.SIMPLE_HEAD, pad_edge=False)
        table.add_column("vm", overflow="fold", width=label_width)
        for j in cols:
            table.add_column(f"[{j}]", justify="right", no_wrap=True)
        for i, label in enumerate(labels):
            table.add_row(label, *(str(int(report.matrix[i, j])) for j in cols))
        return table

    from rich.measure import Measurement

    def fits(table: Table) -> bool:
        return Measurement.get(con, con.options.update(width=1 << 16), table).maximum <= con.width

    while per_table > 1 and not fits(block(range(min(per_table, len(names))))):
        per_table -= 1  # never cut a header or a number: narrower blocks, not squeezed columns
    return [block(range(s, min(s + per_table, len(names)))) for s in range(0, len(names), per_table)]


def _plan_columns(plan: PlanReport, names: list[str]) -> list[Column]:
    rows = [*plan.vms, plan.total]
    unit = TableUnit.for_bytes(max((vm.present_bytes for vm in plan.vms), default=0))
    u = unit.name

    def pages(values: Sequence[int]) -> list[str]:
        return [unit.text(n * PAGE_SIZE) for n in values]

    def sizes(values: Sequence[int]) -> list[str]:
        return [unit.text(n) for n in values]

    cols = [
        Column("vm", names, 0, name=True),
        Column(f"present\n{u}", pages([vm.present for vm in rows]), 3),
        Column(f"zero\n{u}", pages([vm.zero for vm in rows]), 8),
        Column(f"shared\n{u}", pages([vm.shared for vm in rows]), 5),
        Column(f"patched\n{u}", pages([vm.patched for vm in rows]), 4),
        Column(f"patches\nstored\n{u}", sizes([vm.patch_bytes for vm in rows]), 9, wide=True),
        Column(f"compressed\n{u}", pages([vm.compressed for vm in rows]), 4),
        Column(f"compressed\nto\n{u}", sizes([vm.compressed_bytes for vm in rows]), 9, wide=True),
        Column(f"hot\n{u}", pages([vm.hot for vm in rows]), 9, wide=True),
        Column(f"paged\nout\n{u}", pages([vm.paged_out for vm in rows]), 5, wide=plan.host is None),
        Column(f"footprint\n{u}", sizes([vm.footprint_bytes for vm in rows]), 2),
        Column("savings\n%", [_interval_cell(vm) for vm in rows], 0),
    ]
    if plan.baseline is not None:
        name = plan.baseline.policy.name
        base = [*plan.baseline.vms, plan.baseline.total]
        cols.append(Column(f"{name}\nfootprint\n{u}", sizes([vm.footprint_bytes for vm in base]), 6))
        cols.append(Column(f"{name}\nsavings\n%", [_interval_cell(vm) for vm in base], 1))
    if plan.host is not None:
        per_host = ["" if vm.per_host is None else str(vm.per_host) for vm in rows]
        cols.append(Column("VMs\nper\nhost", per_host, 1))
    return cols


def render_plan_terminal(
    plan: PlanReport, *, width: int = 80, wide: bool = False, color: bool = False
) -> str:
    """:func:`render_plan` for a terminal of ``width`` columns: the columns that fit, sizes in
    one unit named in the headers, and a breakdown bar per VM."""
    buf = io.StringIO()
    con = term_console(buf, width, color)
    names = [*short_names([vm.name for vm in plan.vms]), "total"]
    columns = _plan_columns(plan, names)
    table, left_out = fit_table(con, f"Plan: policy {plan.policy.name}", columns, wide=wide)
    print_table(con, table, wide)
    print_left_out(con, left_out, columns, wide)
    con.print()
    rows = [*plan.vms, plan.total]
    savings = [f"{_pct_cell(vm.savings)}%" for vm in rows]
    title = f"Memory of each VM under policy {plan.policy.name} (pages):"
    render_bars(con, title, names, [plan_parts(vm) for vm in rows], savings)
    con.print()
    con.print(_plan_notes(plan))
    for line in _plan_tail(plan):
        con.print(line)
    return text_of(buf)


def _plan_tail(plan: PlanReport) -> list[str]:
    """The host fit and the run-time cost, in words."""
    lines = []
    host = plan.host
    if host is not None:
        paged = (
            f"paged out {plan.total.paged_out} pages ({size_text(plan.total.paged_out_bytes)})"
            if plan.total.paged_out
            else "nothing paged out"
        )
        sets = f"; {host.sets_per_host} such set(s) of VMs fit" if host.sets_per_host is not None else ""
        lines.append(
            f"host memory {size_text(host.host_memory)}: footprint before paging "
            f"{size_text(host.footprint_before_paging)}; {paged}"
            + ("" if host.fits else "; STILL DOES NOT FIT")
            + sets
        )
    cost = plan.cost
    lines.append(
        f"run-time cost: building the plan {cost.build_us / 1e6:.3f} s of CPU; touching every page "
        f"once afterwards {cost.access_us / 1e6:.3f} s (unit costs in us: {_fact_text(cost.model.to_dict())})"
    )
    return lines


def render_info_terminal(infos: Sequence[DumpInfo], *, width: int = 80, color: bool = False) -> str:
    """:func:`render_info` for a terminal of ``width`` columns (long values wrap), with a bar of
    zero and non-zero pages under each dump."""
    buf = io.StringIO()
    con = term_console(buf, width, color)
    for info in infos:
        con.print(render_info([info], width=width), end="")
        parts = [("zero", info.zero_pages), ("remaining", info.nonzero_pages)]
        bar_width = max(BAR_MIN_WIDTH, width - 4)
        if info.pages_present:
            con.print(Text("  ").append_text(breakdown_bar(parts, bar_width)))
            legend = Text("  ")
            legend.append(SEGMENTS["zero"].glyph, style=SEGMENTS["zero"].style)
            legend.append(" zero pages  ")
            legend.append(SEGMENTS["remaining"].glyph, style=SEGMENTS["remaining"].style)
            legend.append(" non-zero pages")
            con.print(legend)
        con.print()
    return text_of(buf)
