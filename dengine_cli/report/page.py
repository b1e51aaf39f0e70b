"""The report as one self-contained HTML file: charts inlined as SVG, tables, and how it was
made.  Its Content-Security-Policy allows nothing to be fetched: it opens with no network."""

from __future__ import annotations

import html
import json
from collections.abc import Callable, Sequence
from typing import Any

from dengine_cli.render import size_text
from dengine_cli.report import charts
from dengine_cli.report.build import ReportData

CSP = "default-src 'none'; style-src 'unsafe-inline'; img-src data:"

STYLE = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222;
       padding: 0 1em; }
h1 { font-size: 1.6em; margin-bottom: 0.2em; } h2 { margin-top: 2em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; margin: 0.8em 0; font-variant-numeric: tabular-nums; }
th, td { white-space: nowrap; padding: 0.25em 0.7em; border-bottom: 1px solid #eee; text-align: right;
         vertical-align: top; }
th:first-child, td:first-child { text-align: left; } thead th { border-bottom: 2px solid #bbb; }
tr.total td { font-weight: 600; border-top: 2px solid #bbb; }
figure.chart { margin: 1em 0; } figure.chart svg { max-width: 100%; height: auto; }
figcaption { color: #555; font-size: 0.9em; } code, pre { font-size: 0.9em; background: #f5f5f5; }
div.scroll { overflow-x: auto; } .note { color: #8a5a00; }
pre { padding: 0.6em; overflow-x: auto; white-space: pre-wrap; }
"""

E = html.escape


def _table(headers: Sequence[str], rows: Sequence[Sequence[object]], total_last: bool = False) -> str:
    head = "".join(f"<th>{E(h)}</th>" for h in headers)
    body = []
    for i, row in enumerate(rows):
        cls = ' class="total"' if total_last and i == len(rows) - 1 else ""
        body.append(f"<tr{cls}>" + "".join(f"<td>{E(str(c))}</td>" for c in row) + "</tr>")
    table = f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"
    return f'<div class="scroll">{table}</div>'


def _figure(name: str, draw: Callable[[], Any], caption: str) -> str:
    svg = charts.svg_of(draw(), name)
    head = f'<figure class="chart" id="chart-{name}" data-chart="{name}">'
    return f"{head}{svg}<figcaption>{E(caption)}</figcaption></figure>"


def _summary(data: ReportData) -> str:
    plans = data.last.plans
    steps = len(data.points)
    parts = (
        [f"{len(data.vms)} VM(s)", f"up to {steps} snapshots per VM"]
        if steps > 1
        else [f"{len(data.vms)} VM(s)"]
    )
    total = next(iter(plans.values()))["total"]
    parts.append(f"{size_text(total['present_bytes'])} of guest memory")
    if data.host_memory is not None:
        parts.append(f"host memory {size_text(data.host_memory)}")
    lines = [f"<p>{E(', '.join(parts))}.</p>", "<ul>"]
    for name, plan in plans.items():
        t = plan["total"]
        fits = f"; {t['vms_per_host']} such fleet(s) per host" if "vms_per_host" in t else ""
        lines.append(
            f"<li><b>{E(name)}</b>: footprint {E(size_text(t['footprint_bytes']))}, "
            f"saves {t['savings_percent']:.1f}%{E(fits)}</li>"
        )
    lines.append("</ul>")
    return "".join(lines)


def _vm_table(data: ReportData) -> str:
    plans = data.last.plans
    headers = ["#", "vm", "dump", "present", "zero", "shared"]
    for name in plans:
        headers += [f"{name} footprint", f"{name} savings"]
    first = next(iter(plans.values()))
    rows = []
    for v, vm in enumerate([*first["vms"], first["total"]]):
        number = v if v < len(first["vms"]) else ""  # what charts of many VMs go by
        row: list[object] = [number, vm["name"], vm.get("dump", ""), size_text(vm["present_bytes"])]
        row += [size_text(vm["zero_pages"] * 4096), size_text(vm["shared_pages"] * 4096)]
        for plan in plans.values():
            p = [*plan["vms"], plan["total"]][v]
            row += [size_text(p["footprint_bytes"]), f"{p['savings_percent']:.1f}%"]
        rows.append(row)
    return _table(headers, rows, total_last=True)


def _host_table(data: ReportData) -> str:
    rows = []
    for name, plan in data.last.plans.items():
        t, host = plan["total"], plan.get("host") or {}
        rows.append(
            [
                name,
                size_text(host.get("footprint_before_paging", t["footprint_bytes"])),
                f"{t['paged_out_pages']} ({size_text(t['paged_out_bytes'])})",
                "yes" if host.get("fits", True) else "NO",
                t.get("vms_per_host", "-"),
            ]
        )
    return _table(["policy", "footprint before paging", "pages paged out", "fits", "fleets per host"], rows)


def _changes_table(data: ReportData) -> str:
    rows = []
    for vm in data.vms:
        for k, c in enumerate(data.changes.get(vm.name, ())):
            rows.append(
                [
                    vm.name,
                    f"{k + 1} → {k + 2}",
                    c.changed,
                    c.appeared,
                    c.disappeared,
                    f"{100 * c.hot_fraction:.2f}%",
                ]
            )
    return _table(["vm", "snapshots", "pages changed", "appeared", "disappeared", "hot share"], rows)


def _provenance(data: ReportData) -> str:
    out = ["<h2>How this report was made</h2>", f"<pre>{E(' '.join(data.command))}</pre>"]
    out.append(
        "<p>"
        + E(", ".join(f"{k} {v}" for k, v in data.versions.items()))
        + f"; created {E(data.created)}.</p>"
    )
    order = ["path", "format", "guest_name", "uuid", "size", "mtime", "pages_present", "index_digest"]
    keys = [k for k in order if any(k in i for i in data.inputs)]
    out.append(
        _table(keys, [[i.get(k, "") if i.get(k) is not None else "" for k in keys] for i in data.inputs])
    )
    for name, plan in data.last.plans.items():
        if plan.get("upper_bound"):
            out.append(
                f'<p class="note">{E(name)}: an upper bound: VMs without an earlier snapshot '
                "count every page cold.</p>"
            )
    policies = {name: plan["policy"] for name, plan in data.last.plans.items()}
    out.append(
        f"<details><summary>Policies</summary><pre>{E(json.dumps(policies, indent=1))}</pre></details>"
    )
    return "".join(out)


CAPTIONS = {
    "breakdown": "Guest memory by what each policy does with it; above each bar the VM's savings.",
    "breakdown-many": "Guest memory by what each policy does with it, VM by VM (by their # in the "
    "per-VM table).",
    "host": "The fleet's footprint per policy (paged out on top) and VMs per host.",
    "matrix": "Distinct non-zero contents two VMs both hold: the pages saved by placing them on one "
    "host (diagonal: within the VM).",
    "series": "Savings at each snapshot; pages changed since a VM's previous snapshot are hot (kept whole).",
    "hot": "Pages changed between consecutive snapshots of each VM (its hot set).",
}


def render_html(data: ReportData) -> str:
    """The whole report page."""
    body = [f"<h1>Memory savings of {len(data.vms)} VM(s)</h1>", _summary(data)]
    body.append("<h2>Memory of each VM under each policy</h2>")
    caption = CAPTIONS["breakdown" if len(data.vms) <= charts.MANY_VMS else "breakdown-many"]
    body.append(_figure("breakdown", lambda: charts.breakdown_chart(data), caption))
    body.append("<h2>Savings against host memory</h2>")
    body.append(_figure("host", lambda: charts.host_chart(data), CAPTIONS["host"]))
    body.append(_host_table(data))
    if data.sharing is not None:
        sharing = data.sharing
        body.append("<h2>Pairwise sharing</h2>")
        body.append(_figure("matrix", lambda: charts.matrix_chart(sharing), CAPTIONS["matrix"]))
    if len(data.points) > 1:
        body.append("<h2>Over time</h2>")
        body.append(_figure("series", lambda: charts.series_chart(data), CAPTIONS["series"]))
        if any(data.changes.values()):
            body.append(_figure("hot", lambda: charts.hot_chart(data), CAPTIONS["hot"]))
            body.append(_changes_table(data))
    body.append("<h2>Per-VM figures</h2>")
    body.append(_vm_table(data))
    body.append(_provenance(data))
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f'<meta http-equiv="Content-Security-Policy" content="{CSP}">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>dengine report</title><style>{STYLE}</style></head><body>"
        + "\n".join(body)
        + "</body></html>\n"
    )
