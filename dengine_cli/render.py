"""How reports look in a terminal: plain text tables, the same whether stdout is a tty or a pipe."""

from __future__ import annotations

import io
import shutil
from collections.abc import Sequence

from rich import box
from rich.console import Console
from rich.table import Table

from dengine_cli.formats.base import PAGE_SIZE
from dengine_cli.inspect import DumpInfo

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
