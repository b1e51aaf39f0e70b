"""How the page store's commands report in a terminal: what ``apply`` wrote beside the plan, what
``verify`` found."""

from __future__ import annotations

import io
from typing import TYPE_CHECKING

from rich import box
from rich.table import Table

from dengine_cli.render import console, short_names, size_text, text_of

if TYPE_CHECKING:
    from dengine_cli.store.apply import ApplyResult
    from dengine_cli.store.verify import VerifyReport


def render_apply(result: ApplyResult, width: int | None = None) -> str:
    """Per VM: pages, the plan's bytes, the bytes the store's page data really takes, their
    difference, pages paged out (stored apart); then the totals, metadata apart."""
    buf = io.StringIO()
    con = console(buf, width)
    kind = "packed store (--pack)" if result.packed else "store"
    table = Table(title=f"Applied: {kind} {result.store}", box=box.SIMPLE, title_justify="left")
    for name, justify in (("vm", "left"), ("pages", "right"), ("zero", "right"), ("plan", "right"),
                          ("stored", "right"), ("difference", "right"), ("paged out", "right")):  # fmt: skip
        table.add_column(name, justify=justify)  # type: ignore[arg-type]
    # Named as the plan's and analyze's tables name them: base names when those are unique.
    for vm, name in zip(result.vms, short_names([vm.name for vm in result.vms]), strict=True):
        table.add_row(
            *_row(name, vm.pages, vm.zero_pages, vm.plan_bytes, vm.stored_bytes, vm.paged_out_bytes)
        )
    table.add_section()
    vms = result.vms
    table.add_row(*_row("total", sum(v.pages for v in vms), sum(v.zero_pages for v in vms),
                        sum(v.plan_bytes for v in vms), sum(v.stored_bytes for v in vms),
                        sum(v.paged_out_bytes for v in vms)))  # fmt: skip
    con.print(table)
    lines = [
        f"page data {result.data_bytes} B in {result.pack_files} pack file(s), {result.objects} objects"
        + (_frames(result) if result.packed else ""),
        f"metadata {result.metadata_bytes} B (catalog {result.catalog_bytes} B); store total "
        f"{result.total_bytes} B ({size_text(result.total_bytes)}) in {result.seconds:.2f} s",
    ]
    mismatched = sum(vm.size_mismatches for vm in result.vms)
    if mismatched:
        lines.append(f"note: {mismatched} pages encoded to another size than the plan measured")
    return text_of(buf) + "\n".join(lines) + "\n"


def _row(name: str, pages: int, zero: int, plan: int, stored: int, paged_out: int) -> list[str]:
    diff = (stored - plan) / plan if plan else 0.0
    return [name, str(pages), str(zero), size_text(plan), size_text(stored), f"{100 * diff:+.2f}%",
            size_text(paged_out)]  # fmt: skip


def render_verify(report: VerifyReport, shown: int = 8) -> str:
    """One line per problem with the pages it hurts (VM, first gfns), notes, and a summary."""
    lines = []
    for p in report.problems:
        where = []
        for vm, gfns in p.pages.items():
            listed = ", ".join(f"{g:#x}" for g in gfns[:shown])
            more = f" and {len(gfns) - shown} more" if len(gfns) > shown else ""
            where.append(f"VM {vm} gfn {listed}{more}")
        lines.append(f"damaged: {p.what}" + (f" [{'; '.join(where)}]" if where else ""))
    lines += [f"note: {n}" for n in report.notes]
    state = "ok" if report.ok else f"{len(report.problems)} problem(s)"
    lines.append(
        f"{report.store}: {state}: {len(report.vms)} VMs, {report.objects} objects, {report.packs} packs, "
        f"{report.frames} frames checked"
    )
    return "\n".join(lines) + "\n"


def _frames(result: ApplyResult) -> str:
    used = ", ".join(f"{n} {codec}" for codec, n in result.frame_codecs.items() if codec != "stored")
    stored = result.stored_frames
    also = f"; {stored} of incompressible pages, stored as they are" if stored else ""
    return f", {result.frames} frames ({result.frame_codec}: {used}{also})"
