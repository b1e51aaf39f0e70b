"""The figures a report shows: every policy's plan of the fleet at each snapshot, the sharing
matrix, the pages changed between snapshots, and what produced them.

A fleet at snapshot k is every VM's k-th snapshot (a VM with fewer snapshots stays at its last);
each VM's previous snapshot is its history, so pages changed since are hot (kept whole) and the
plan is no longer an upper bound for it.  The last point is the fleet the report's main charts
and tables show."""

from __future__ import annotations

import itertools
import json
import os
import platform
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from dengine_cli import __version__
from dengine_cli.engine.index import PageIndex, Progress
from dengine_cli.engine.plan.planfile import not_json_number
from dengine_cli.engine.policy import Policy
from dengine_cli.engine.sharing.model import KsmModel
from dengine_cli.errors import FormatError, UnreadableFile, UnsupportedFeature, UsageError
from dengine_cli.formats import not_a_dump_file
from dengine_cli.pages import PAGE_SIZE
from dengine_cli.report.snapshots import SnapshotChanges, Vm, dumps_to_group, group_by_guest, snapshot_changes
from dengine_cli.session import Session, Settings

#: Version of :meth:`ReportData.to_dict` (``dengine report --json``).
SCHEMA = "dengine.report/1"
#: How a plan file (``dengine plan -o``) starts; its head (everything before ``"pages"``) is read.
PLAN_MAGIC = b'{"schema": "dengine.plan/'
#: A plan file's head is never larger than this (the per-VM figures of thousands of VMs).
PLAN_HEAD_LIMIT = 64 << 20

Note = Callable[[str], None]


@dataclass(frozen=True)
class SeriesPoint:
    """The fleet at one snapshot: the dump of each VM and each policy's plan (``to_dict`` form)."""

    index: int
    dumps: tuple[str, ...]
    plans: dict[str, dict[str, Any]]

    def to_dict(self) -> dict[str, Any]:
        return {"snapshot": self.index, "dumps": list(self.dumps), "plans": self.plans}


@dataclass(frozen=True)
class ReportData:
    """Everything the report shows.  ``sharing`` (the exact cross-VM sharing of the last fleet,
    matrix included) is ``None`` for a report made from plan files, which hold no matrix."""

    vms: tuple[Vm, ...]
    points: tuple[SeriesPoint, ...]
    sharing: dict[str, Any] | None
    changes: dict[str, tuple[SnapshotChanges, ...]]
    inputs: tuple[dict[str, Any], ...]
    host_memory: int | None
    command: tuple[str, ...]
    versions: dict[str, str] = field(default_factory=dict)
    created: str = ""

    @property
    def last(self) -> SeriesPoint:
        return self.points[-1]

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": SCHEMA,
            "command": list(self.command),
            "versions": self.versions,
            "created": self.created,
            "host_memory": self.host_memory,
            "inputs": list(self.inputs),
            "vms": [
                {
                    "name": vm.name,
                    "grouped_by": vm.grouped_by,
                    "snapshots": [str(p) for p in vm.snapshots],
                    "changes": [c.to_dict() for c in self.changes.get(vm.name, ())],
                }
                for vm in self.vms
            ],
            "series": [p.to_dict() for p in self.points],
            "sharing": self.sharing,
        }


def versions() -> dict[str, str]:
    """The versions that produced the figures and drew the charts."""
    import numpy
    import xxhash

    found = {"dengine": __version__, "python": platform.python_version(), "numpy": numpy.__version__}
    found["xxhash"] = xxhash.VERSION
    try:
        import matplotlib

        found["matplotlib"] = matplotlib.__version__
    except ImportError:  # pragma: no cover - a dependency of the report
        pass
    return found


def is_plan_file(path: Path) -> bool:
    """Whether ``path`` is a plan file written by ``dengine plan -o`` (rather than a dump)."""
    try:
        if (reason := not_a_dump_file(os.stat(path).st_mode)) is not None:
            raise UnreadableFile(str(path), reason)
        with open(path, "rb") as f:
            return f.read(len(PLAN_MAGIC)) == PLAN_MAGIC
    except OSError as e:
        raise UnreadableFile(str(path), e.strerror or str(e)) from e


def read_plan_head(path: Path) -> dict[str, Any]:
    """A plan file's document without its per-page ``"pages"`` (read a chunk at a time up to
    where they start: a plan file holds every page of every VM), once its end is checked."""
    marker = b', "pages": ['
    head = b""
    with open(path, "rb") as f:
        while marker not in head:
            chunk = f.read(1 << 20)
            if not chunk or len(head) > PLAN_HEAD_LIMIT:
                raise FormatError(path, 0, expected="a dengine plan file", found='no "pages" member')
            head += chunk
        # The pages are not read, but a file cut short in them is not the plan that was written:
        # it ends with the last VM's "}" (or an empty list's "[") and "]}", which a cut right
        # after one VM's "}" does not.
        end = f.seek(0, os.SEEK_END)
        f.seek(max(0, end - 64))
        if not f.read().rstrip().endswith((b"}]}", b"[]}")):
            raise FormatError(path, end, expected="the end of a plan file (']}')", found="the file cut short")
    try:
        doc: dict[str, Any] = json.loads(head[: head.index(marker)] + b"}", parse_constant=not_json_number)
    except ValueError as e:
        raise FormatError(path, 0, expected="a dengine plan file", found=f"bad JSON ({e})") from e
    schema = doc.get("schema")
    if isinstance(schema, str) and schema.startswith("dengine.plan/") and schema != "dengine.plan/1":
        raise UnsupportedFeature(
            path, 0, feature=f"plan schema {schema!r} (this dengine reads dengine.plan/1)"
        )
    if schema != "dengine.plan/1" or "vms" not in doc or "policy" not in doc:
        raise FormatError(
            path, 0, expected="a dengine.plan/1 document", found=f"schema {doc.get('schema')!r}"
        )
    if doc.get("page_size") != PAGE_SIZE:
        raise UnsupportedFeature(
            path, 0, feature=f"plan of page_size {doc.get('page_size')!r} (pages are {PAGE_SIZE} bytes)"
        )
    return doc


def _identity(path: Path, index: PageIndex) -> dict[str, Any]:
    """A dump as the report names it: file, size, time, guest and a digest of its page index
    (two dumps with the same digest hold the same pages at the same gfns)."""
    import xxhash

    st = path.stat()
    digest = xxhash.xxh3_128()
    for array in (index.gfns, index.hashes, index.check):
        digest.update(np.ascontiguousarray(array).view(np.uint8).data)
    facts = index.facts
    return {
        "path": str(path),
        "size": st.st_size,
        "mtime": datetime.fromtimestamp(st.st_mtime, UTC).isoformat(timespec="seconds"),
        "format": facts.get("format"),
        "guest_name": facts.get("guest_name"),
        "uuid": facts.get("uuid"),
        "pages_present": index.page_count,
        "index_digest": digest.hexdigest(),
    }


@dataclass(frozen=True)
class ReportRequest:
    """What ``dengine report`` was asked: the dumps (grouped into VMs by their headers), the VMs
    given with ``--vm``, the policies side by side, host memory, the command line, and the knobs
    of the sharing's KSM view (as ``analyze``'s)."""

    dumps: tuple[Path, ...]
    vms: tuple[Vm, ...]
    policies: tuple[Policy, ...]
    host_memory: int | None
    command: tuple[str, ...]
    ksm: KsmModel = field(default_factory=KsmModel)


def build_report(
    request: ReportRequest, settings: Settings, on_progress: Progress | None = None, note: Note | None = None
) -> ReportData:
    """Index every dump once, group them into VMs, plan each policy at each snapshot, and
    compare consecutive snapshots."""
    say = note or (lambda text: None)
    dumps = dumps_to_group(request.dumps, request.vms)
    plan_files = [p for p in dumps if is_plan_file(p)]
    if plan_files:
        if len(plan_files) != len(dumps) or request.vms:
            raise UsageError("give either dumps or plan files (dengine plan -o), not both")
        return _from_plan_files(request, plan_files)
    every = [*dumps, *(p for vm in request.vms for p in vm.snapshots)]
    say(f"report: indexing {len(every)} dump(s)")
    with Session(every, settings, on_progress) as session:
        indexes = dict(zip(every, session.indexes(), strict=True))
    vms = [*group_by_guest(dumps, {p: indexes[p].facts for p in dumps}), *request.vms]
    names = [vm.name for vm in vms]
    if len(set(names)) != len(names):
        raise UsageError(f"two VMs are named {next(n for n in names if names.count(n) > 1)!r}")
    changes = {
        vm.name: tuple(snapshot_changes(indexes[a], indexes[b]) for a, b in itertools.pairwise(vm.snapshots))
        for vm in vms
    }
    points, sharing = _series(vms, request, settings, on_progress, say)
    return ReportData(
        vms=tuple(vms),
        points=tuple(points),
        sharing=sharing,
        changes=changes,
        inputs=tuple(_identity(p, indexes[p]) for p in every),
        host_memory=request.host_memory,
        command=request.command,
        versions=versions(),
        created=datetime.now(UTC).isoformat(timespec="seconds"),
    )


def _series(
    vms: Sequence[Vm], request: ReportRequest, settings: Settings, on_progress: Progress | None, say: Note
) -> tuple[list[SeriesPoint], dict[str, Any] | None]:
    """Every policy's plan of the fleet at each snapshot; the sharing of the last fleet."""
    steps = max(len(vm.snapshots) for vm in vms)
    points = []
    sharing: dict[str, Any] | None = None
    for k in range(steps):
        dumps = [vm.snapshots[min(k, len(vm.snapshots) - 1)] for vm in vms]
        history = {
            str(vm.snapshots[j]): vm.snapshots[j - 1]
            for vm in vms
            if (j := min(k, len(vm.snapshots) - 1)) >= 1
        }
        plans: dict[str, dict[str, Any]] = {}
        with Session(dumps, settings, on_progress) as session:
            for policy in request.policies:
                say(f"report: snapshot {k + 1} of {steps}: policy {policy.name}")
                shared, plan = session.plan(policy, history=history, host_memory=request.host_memory)
                plans[policy.name] = _named(plan.to_dict(), vms)
                if policy.cross_vm and k == steps - 1 and sharing is None:
                    sharing = _named(shared.with_ksm(request.ksm).to_dict(), vms)
        points.append(SeriesPoint(k + 1, tuple(str(d) for d in dumps), plans))
    return points, sharing


def _named(doc: dict[str, Any], vms: Sequence[Vm]) -> dict[str, Any]:
    """A plan or sharing document with each VM's dump name replaced by the VM's name (the dump
    stays under ``"dump"``)."""
    for vm_doc, vm in zip(doc["vms"], vms, strict=True):
        vm_doc["dump"] = vm_doc["name"]
        vm_doc["name"] = vm.name
    if "matrix" in doc:
        doc["matrix"]["names"] = [vm.name for vm in vms]
    return doc


def _from_plan_files(request: ReportRequest, paths: Sequence[Path]) -> ReportData:
    """A report of plan files: each file's policy (and its baseline) side by side; the files
    must plan the same VMs.  No matrix (a plan file holds none) and one snapshot."""
    plans: dict[str, dict[str, Any]] = {}
    names: list[str] | None = None
    inputs = []
    for path in paths:
        doc = read_plan_head(path)
        vm_names = [vm["name"] for vm in doc["vms"]]
        if names is not None and vm_names != names:
            raise UsageError(f"{path}: plans other VMs than {paths[0]}: a report compares plans of one fleet")
        names = vm_names
        for d in (doc, doc.get("baseline")):
            if d is not None:
                plans.setdefault(d["policy"]["name"], {**d, "host": d.get("host")})
        st = path.stat()
        mtime = datetime.fromtimestamp(st.st_mtime, UTC).isoformat(timespec="seconds")
        inputs.append({"path": str(path), "size": st.st_size, "mtime": mtime, "plan_of": vm_names})
    assert names is not None
    vms = tuple(Vm(n, (Path(n),), "plan file") for n in names)
    host = next((d["host"]["host_memory"] for d in plans.values() if d.get("host")), None)
    return ReportData(
        vms=vms,
        points=(SeriesPoint(1, tuple(names), plans),),
        sharing=None,
        changes={},
        inputs=tuple(inputs),
        host_memory=host,
        command=request.command,
        versions=versions(),
        created=datetime.now(UTC).isoformat(timespec="seconds"),
    )


def write_atomically(path: Path, data: bytes) -> None:
    """Write ``data`` as ``path``: never a half-written report."""
    from dengine_cli.outputs import atomic_output

    with atomic_output(path) as f:
        f.write(data)


#: Columns of ``dengine report --csv``: one row per VM, snapshot and policy.
SERIES_COLUMNS = (
    "vm",
    "snapshot",
    "dump",
    "policy",
    "present_bytes",
    "footprint_bytes",
    "savings_percent",
    "hot_pages",
    "pages_changed",
    "pages_appeared",
    "pages_disappeared",
)


def series_csv(data: ReportData) -> str:
    """The time series as CSV: per VM, snapshot and policy, its footprint and savings, and the
    pages changed since the VM's previous snapshot (empty at its first, and at points where
    it has no new snapshot)."""
    import csv
    import io

    buf = io.StringIO()
    out = csv.writer(buf, lineterminator="\n")
    out.writerow(SERIES_COLUMNS)
    for point in data.points:
        for v, vm in enumerate(data.vms):
            changes = data.changes.get(vm.name, ())
            new = 2 <= point.index <= len(vm.snapshots)
            c = changes[point.index - 2] if new and len(changes) >= point.index - 1 else None
            moved = [c.changed, c.appeared, c.disappeared] if c is not None else ["", "", ""]
            for policy, plan in point.plans.items():
                p = plan["vms"][v]
                out.writerow(
                    [
                        vm.name,
                        point.index,
                        p.get("dump", point.dumps[v]),
                        policy,
                        p["present_bytes"],
                        p["footprint_bytes"],
                        p["savings_percent"],
                        p["hot_pages"],
                        *moved,
                    ]
                )
    return buf.getvalue()
