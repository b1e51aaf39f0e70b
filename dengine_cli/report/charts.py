"""The report's charts, drawn by matplotlib as SVG (text as paths: no font needed to view them).

matplotlib, because it is the most widely kept plotting library for Python, writes SVG with no
browser or JavaScript runtime (Vega-Altair needs vl-convert's bundled V8 to make SVG), and its
object API (:class:`~matplotlib.figure.Figure`, no pyplot) keeps no global state.  It is
imported only when a report is drawn."""

from __future__ import annotations

import io
import re
from collections.abc import Sequence
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any

from dengine_cli.pages import PAGE_SIZE
from dengine_cli.render import TableUnit
from dengine_cli.report.build import ReportData

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

#: The parts of a VM's memory: plan key, label, colour (the terminal bars' order and meaning).
PARTS = (
    ("zero_pages", "zero", "#b8b8b8"),
    ("shared_pages", "shared", "#4caf50"),
    ("patched_pages", "patched", "#26a6c9"),
    ("compressed_pages", "compressed", "#3f51b5"),
    ("paged_out_pages", "paged out", "#c2185b"),
    ("whole_pages", "remaining", "#f0b400"),
)
POLICY_STYLES = ("-", "--", ":", "-.")
#: Past this many VMs a chart numbers its VMs (their order in the per-VM table, from 0) instead
#: of naming each, and writes no figure above each bar: 200 VMs made a 13 MB report that took
#: 20 s to draw, nearly all of it labels and cells drawn as vector paths.
MANY_VMS = 40
#: Past this many VMs the sharing matrix is an image (one pixel a cell, embedded PNG) in a chart
#: of bounded size, where each cell was a vector quad with an outline, 0.5 in a side.
MATRIX_VECTOR_MAX = 32
RC = {"svg.hashsalt": "dengine", "svg.fonttype": "path", "font.size": 9}


def _style() -> AbstractContextManager[None]:
    """The report's matplotlib settings, for one chart (no global change)."""
    import matplotlib

    # The stubs type rc_context's keys as literals; these are valid rc keys.
    return matplotlib.rc_context(RC)  # type: ignore[arg-type]


def _figure(width: float, height: float) -> Figure:
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def svg_of(fig: Figure, prefix: str) -> str:
    """The figure as an SVG element to inline in HTML: no XML prolog, and every id prefixed so
    that several charts in one page never share an id."""

    buf = io.StringIO()
    with _style():
        fig.savefig(buf, format="svg", metadata={"Date": None})
    text = buf.getvalue()
    text = text[text.index("<svg") :]
    text = re.sub(r"<metadata>.*?</metadata>", "", text, flags=re.S)  # RDF boilerplate
    text = re.sub(r'id="([^"]+)"', rf'id="{prefix}-\1"', text)
    text = re.sub(r"url\(#([^)]+)\)", rf"url(#{prefix}-\1)", text)
    return re.sub(r'href="#([^"]+)"', rf'href="#{prefix}-\1"', text)


def _unit(data: ReportData) -> TableUnit:
    plans = data.last.plans.values()
    largest = max((vm["present_bytes"] for plan in plans for vm in plan["vms"]), default=0)
    return TableUnit.for_bytes(largest)


def breakdown_chart(data: ReportData) -> Figure:
    """Per policy side by side, a stacked bar per VM: its memory by what the policy does."""

    plans = data.last.plans
    unit = _unit(data)
    names = [vm.name for vm in data.vms]
    many = len(names) > MANY_VMS
    with _style():
        fig = _figure(min(14.0, max(6.0, 2.0 + 0.7 * len(names) * len(plans))), 4.4)
        axes = fig.subplots(1, len(plans), sharey=True, squeeze=False)[0]
        for ax, (policy, plan) in zip(axes, plans.items(), strict=True):
            bottom = [0.0] * len(names)
            for key, label, colour in PARTS:
                values = [vm[key] * PAGE_SIZE / unit.size for vm in plan["vms"]]
                ax.bar(range(len(names)), values, bottom=bottom, color=colour, label=label, width=0.7)
                bottom = [b + v for b, v in zip(bottom, values, strict=True)]
            if not many:
                for x, vm in enumerate(plan["vms"]):
                    label = f"{vm['savings_percent']:.1f}%"
                    turn = 90 if len(names) > 2 else 0  # side by side they would overlap
                    ax.annotate(label, (x, bottom[x]), ha="center", va="bottom", fontsize=7, rotation=turn)
            ax.set_title(f"{policy}: saves {plan['total']['savings_percent']:.1f}%")
            _vm_ticks(ax, names, "x")
            ax.margins(y=0.18)
        axes[0].set_ylabel(f"guest memory ({unit.name})")
        handles, labels = axes[0].get_legend_handles_labels()
        fig.legend(handles, labels, loc="outside right upper", frameon=False)
    return fig


def matrix_chart(sharing: dict[str, Any]) -> Figure:
    """The pairwise sharing matrix as a heat map (pages both VMs hold; diagonal: within one)."""
    import numpy as np

    names = sharing["matrix"]["names"]
    n = len(names)
    values = np.array(sharing["matrix"]["shared_pages"], dtype=np.float64).reshape(n, n)
    with _style():
        if n > MATRIX_VECTOR_MAX:
            fig = _figure(9.0, 7.5)
            ax = fig.subplots()
            image = ax.imshow(values, cmap="viridis", interpolation="nearest")  # cell k centred on k
            _vm_ticks(ax, names, "x")
            _vm_ticks(ax, names, "y")
            fig.colorbar(image, ax=ax, label="pages saved together")
            return fig
        side = max(3.5, 1.5 + 0.5 * n)
        fig = _figure(side + 1.5, side)
        ax = fig.subplots()
        mesh = ax.pcolormesh(values, cmap="viridis", edgecolors="white", linewidth=0.5)
        ax.set_xticks(np.arange(n) + 0.5, names, rotation=30 if n > 3 else 0)
        ax.set_yticks(np.arange(n) + 0.5, names)
        ax.invert_yaxis()
        ax.set_aspect("equal")
        if len(names) <= 16:
            top = values.max() if values.size else 0
            for (i, j), v in np.ndenumerate(values):
                colour = "black" if top and v > 0.6 * top else "white"
                ax.text(j + 0.5, i + 0.5, f"{int(v)}", ha="center", va="center", color=colour, fontsize=8)
        fig.colorbar(mesh, ax=ax, label="pages saved together")
    return fig


def host_chart(data: ReportData) -> Figure:
    """Per policy: the fleet's footprint in host memory, what is paged out, and how many VMs of
    each kind fit on one host."""

    plans = data.last.plans
    unit = TableUnit.for_bytes(max(p["total"]["present_bytes"] for p in plans.values()))
    with _style():
        fig = _figure(8.0, 3.6)
        left, right = fig.subplots(1, 2, width_ratios=[1, 1.4])
        policies = list(plans)
        kept = [(p["total"]["footprint_bytes"]) / unit.size for p in plans.values()]
        paged = [p["total"]["paged_out_bytes"] / unit.size for p in plans.values()]
        left.bar(policies, kept, color="#f0b400", label="in host memory")
        left.bar(policies, paged, bottom=kept, color="#c2185b", label="paged out")
        present = next(iter(plans.values()))["total"]["present_bytes"] / unit.size
        left.axhline(present, color="black", linewidth=1, linestyle=":", label="guest memory")
        if data.host_memory is not None:
            left.axhline(data.host_memory / unit.size, color="#c2185b", linewidth=1, label="host memory")
        left.set_ylabel(f"fleet footprint ({unit.name})")
        left.legend(frameon=False, fontsize=7)
        _per_host_bars(right, data)
    return fig


def _per_host_bars(ax: Axes, data: ReportData) -> None:
    plans = data.last.plans
    names = [vm.name for vm in data.vms]
    if data.host_memory is None:
        savings = {p: [vm["savings_percent"] for vm in plan["vms"]] for p, plan in plans.items()}
        _grouped(ax, names, savings)
        ax.set_ylabel("savings (%)")
        ax.set_title("no --host-memory: savings per VM", fontsize=9)
        return
    per_host = {p: [vm.get("vms_per_host", 0) for vm in plan["vms"]] for p, plan in plans.items()}
    _grouped(ax, names, per_host)
    ax.set_ylabel("VMs like it per host")
    ax.set_title("VMs per host", fontsize=9)


def _grouped(ax: Axes, names: Sequence[str], values: dict[str, list[float]]) -> None:
    import numpy as np

    x = np.arange(len(names))
    width = 0.8 / max(1, len(values))
    for k, (label, vals) in enumerate(values.items()):
        bars = ax.bar(x + k * width - 0.4 + width / 2, vals, width, label=label)
        if len(names) <= MANY_VMS:
            ax.bar_label(bars, fmt="%g", fontsize=7)
    _vm_ticks(ax, names, "x")
    ax.legend(frameon=False, fontsize=7)


def _vm_ticks(ax: Axes, names: Sequence[str], axis: str) -> None:
    """Ticks of an axis with VM k at k: each VM's name, or past :data:`MANY_VMS` a few VM
    numbers (their ``#`` in the per-VM table)."""
    from matplotlib.ticker import FuncFormatter, MaxNLocator

    target = ax.xaxis if axis == "x" else ax.yaxis
    if len(names) <= MANY_VMS:
        ticks = list(range(len(names)))
        if axis == "x":
            ax.set_xticks(ticks, names, rotation=30 if len(names) > 3 else 0)
        else:
            ax.set_yticks(ticks, names)
        return
    target.set_major_locator(MaxNLocator(nbins=10, integer=True))
    target.set_major_formatter(FuncFormatter(lambda v, _: f"{int(v)}"))
    target.set_label_text("VM (number in the per-VM table)")


def series_chart(data: ReportData) -> Figure:
    """Savings of each VM (and the fleet) at each snapshot, a line style per policy."""
    import matplotlib

    with _style():
        fig = _figure(8.0, 3.8)
        ax = fig.subplots()
        steps = [p.index for p in data.points]
        colours = matplotlib.colormaps["tab10"]
        for k, policy in enumerate(data.last.plans):
            style = POLICY_STYLES[k % len(POLICY_STYLES)]
            many = len(data.vms) > MANY_VMS  # then thin lines, and only the fleet in the legend
            for v, vm in enumerate(data.vms):
                ys = [p.plans[policy]["vms"][v]["savings_percent"] for p in data.points]
                if many:
                    ax.plot(steps, ys, style, color=colours(v % 10), linewidth=0.5, alpha=0.5)
                    continue
                ax.plot(steps, ys, style, marker="o", color=colours(v % 10), label=f"{vm.name} ({policy})")
            total = [p.plans[policy]["total"]["savings_percent"] for p in data.points]
            ax.plot(steps, total, style, marker="s", color="black", label=f"fleet ({policy})")
        ax.set_xticks(steps, [f"snapshot {s}" for s in steps])
        ax.set_ylabel("savings (%)")
        fig.legend(loc="outside right upper", frameon=False, fontsize=7)
    return fig


def hot_chart(data: ReportData) -> Figure:
    """Pages changed and appeared between consecutive snapshots of each VM (its hot set)."""

    with _style():
        fig = _figure(8.0, 3.4)
        ax = fig.subplots()
        labels, changed, appeared = [], [], []
        for vm in data.vms:
            for k, c in enumerate(data.changes.get(vm.name, ())):
                labels.append(f"{vm.name}\n{k + 1}→{k + 2}")
                changed.append(c.changed)
                appeared.append(c.appeared)
        x = list(range(len(labels)))
        ax.bar(x, changed, color="#e65100", label="changed", width=0.6)
        ax.bar(x, appeared, bottom=changed, color="#ffb74d", label="appeared", width=0.6)
        if len(data.vms) <= MANY_VMS:
            ax.set_xticks(x, labels)
        else:
            ax.set_xlabel("VMs in the per-VM table's order, each snapshot after its first")
        ax.set_xlim(-0.5 - max(0, 3 - len(labels)) / 2, len(labels) - 0.5 + max(0, 3 - len(labels)) / 2)
        ax.set_ylabel("pages (4 KiB)")
        ax.legend(frameon=False)
    return fig
