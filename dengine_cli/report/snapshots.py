"""VMs and their snapshots: dumps grouped by the guest their headers name, and the pages that
changed between two snapshots of one guest (its hot set), computed over the page indexes."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dengine_cli.engine.index import PageIndex
from dengine_cli.errors import UsageError
from dengine_cli.session.names import FileKey, file_key


@dataclass(frozen=True)
class Vm:
    """One guest and its snapshots, oldest first (the order given on the command line).
    ``grouped_by``: ``"uuid"``, ``"guest name"``, ``"--vm"`` or ``"dump"`` (a VM of one dump
    whose headers name no guest)."""

    name: str
    snapshots: tuple[Path, ...]
    grouped_by: str


def parse_vm_option(specs: Sequence[str]) -> list[Vm]:
    """``NAME=DUMP,DUMP,...`` as given to ``--vm``: one VM per spec, snapshots in that order."""
    vms: list[Vm] = []
    for spec in specs:
        name, sep, dumps = spec.partition("=")
        paths = [d for d in dumps.split(",") if d]
        if not sep or not name or not paths:
            raise UsageError(f"--vm: {spec!r} is not NAME=DUMP,DUMP,...")
        if any(vm.name == name for vm in vms):
            raise UsageError(f"--vm: VM {name!r} is given twice")
        vms.append(Vm(name, tuple(Path(p) for p in paths), "--vm"))
    return vms


def dumps_to_group(dumps: Sequence[Path], vms: Sequence[Vm]) -> list[Path]:
    """The dumps given as arguments that are left to group by their headers beside the ``--vm``
    VMs ``vms``, so that each dump file is in exactly one VM.

    A file given to ``--vm`` twice (in one VM or two, under any name) is a usage error naming it:
    no grouping says which VM it belongs to.  A dump given as an argument that a ``--vm`` also
    names is that VM's (the explicit grouping wins: ``--vm web=mon.core,tue.core *.core``), and a
    file given as an argument twice is read once, under its first name."""
    named: dict[FileKey, tuple[str, Path]] = {}
    for vm in vms:
        for path in vm.snapshots:
            key = file_key(path)
            if key in named:
                first_vm, first = named[key]
                same = f"{first}" if first == path else f"{first} (as {path})"
                where = f"VM {vm.name!r}" if first_vm == vm.name else f"VMs {first_vm!r} and {vm.name!r}"
                raise UsageError(f"--vm: {same} is given twice, in {where}: a dump is one VM's snapshot")
            named[key] = (vm.name, path)
    kept: dict[FileKey, Path] = {}
    for path in dumps:
        key = file_key(path)
        if key not in named:
            kept.setdefault(key, path)
    return list(kept.values())


def group_by_guest(paths: Sequence[Path], facts: Mapping[Path, Mapping[str, Any]]) -> list[Vm]:
    """Dumps grouped into VMs by the guest uuid their headers give, else the guest name; a dump
    whose headers name neither is a VM of its own, named by its file.  VMs come in the order of
    their first dump; a VM's snapshots in the order given."""
    groups: dict[tuple[str, str], list[Path]] = {}
    for path in paths:
        f = facts[path]
        if f.get("uuid"):
            key = ("uuid", str(f["uuid"]))
        elif f.get("guest_name"):
            key = ("guest name", str(f["guest_name"]))
        else:
            key = ("dump", str(path))
        groups.setdefault(key, []).append(path)
    vms = []
    for (how, value), snaps in groups.items():
        name = Path(value).name if how == "dump" else str(facts[snaps[0]].get("guest_name") or value)
        vms.append(Vm(name, tuple(snaps), how))
    names = [vm.name for vm in vms]
    # Two guests of one name (different uuids): tell them apart by their first dump.
    return [
        Vm(f"{vm.name} ({vm.snapshots[0].name})", vm.snapshots, vm.grouped_by)
        if names.count(vm.name) > 1
        else vm
        for vm in vms
    ]


@dataclass(frozen=True)
class SnapshotChanges:
    """What changed from one snapshot of a VM to the next, in pages: ``changed`` (present in
    both, different content), ``appeared`` (present only in the later one) and ``disappeared``
    (only in the earlier one).  The hot set is ``changed + appeared``: pages written between."""

    before: str
    after: str
    pages_before: int
    pages_after: int
    changed: int
    appeared: int
    disappeared: int

    @property
    def hot(self) -> int:
        return self.changed + self.appeared

    @property
    def hot_fraction(self) -> float:
        return self.hot / self.pages_after if self.pages_after else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "from": self.before,
            "to": self.after,
            "pages_before": self.pages_before,
            "pages_after": self.pages_after,
            "pages_changed": self.changed,
            "pages_appeared": self.appeared,
            "pages_disappeared": self.disappeared,
            "hot_pages": self.hot,
            "hot_percent": round(100.0 * self.hot_fraction, 4),
        }


def snapshot_changes(before: PageIndex, after: PageIndex) -> SnapshotChanges:
    """Compare two indexes of one guest gfn by gfn (both sorted by gfn): a page changed when its
    128-bit hash or zero flag differs.  Vectorized: a binary search of one gfn array in the
    other, a few bytes a page."""
    pos = np.searchsorted(before.gfns, after.gfns)
    inside = pos < len(before.gfns)
    both = np.zeros(len(after.gfns), dtype=np.bool_)
    both[inside] = before.gfns[pos[inside]] == after.gfns[inside]
    b = pos[both]
    differs = (
        (before.hashes[b] != after.hashes[both])
        | (before.check[b] != after.check[both])
        | (before.zero[b] != after.zero[both])
    )
    common = int(np.count_nonzero(both))
    return SnapshotChanges(
        before=before.name,
        after=after.name,
        pages_before=before.page_count,
        pages_after=after.page_count,
        changed=int(np.count_nonzero(differs)),
        appeared=after.page_count - common,
        disappeared=before.page_count - common,
    )
