"""The plan file: every page's action, reference and size as JSON (schema ``dengine.plan/1``),
streamed through a temporary file."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, TextIO

import numpy as np
import numpy.typing as npt

from dengine_cli.arrays import ArrayHome, unique
from dengine_cli.engine.plan.model import ACTIONS, I64, PATCH, SHARE, PagePlan, PlanReport
from dengine_cli.outputs import atomic_text_output

#: Pages written per JSON chunk.
_WRITE_CHUNK = 1 << 16


def write_plan(
    plan: PlanReport,
    path: Path | str,
    dumps: Sequence[Mapping[str, Any]] | None = None,
    home: ArrayHome | None = None,
) -> None:
    """Write the plan file: a JSON document, schema :data:`SCHEMA`.

    It is :meth:`PlanReport.to_dict` (policy with every parameter, the detector's seed and
    offsets, per-VM and total figures, costs) plus ``"actions"`` (the action names, indexed by
    code) and ``"pages"``: per VM, in the order planned, columnar arrays over its present pages in
    ascending gfn order::

        {"vm": 0, "name": "...", "gfn": [...], "action": [codes], "reference": [...], "size": [...]}

    ``reference`` is ``[vm, gfn]`` for shared pages (the kept copy) and patched pages (the
    reference page), ``null`` otherwise; ``size`` is the bytes the page then occupies (4096 whole,
    the patch or compressed size, 0 for zero, shared and swapped pages).

    ``dumps``: per VM, what names the dump file the plan was made from, as it was when its pages
    were read (the index key: real path, device, inode, size, mtime, ctime, and the reader
    options that change its page set); written as ``"dump"`` beside each VM's pages, so that
    ``dengine apply`` opens the same file the same way and refuses one that changed since.

    Written as it is produced, a chunk of pages at a time, to a temporary file in the same
    directory renamed over ``path`` at the end: never half-written.  Refuses an estimate (a
    sampled plan has no size for the pages it did not compute).  ``home``: where the arrays
    over every content (the first holder of each) are made.
    """
    if plan.estimate:
        raise ValueError("a plan file needs an exact plan, not an estimate")
    if dumps is not None and len(dumps) != len(plan.pages):
        raise ValueError(f"{len(dumps)} dump identities for {len(plan.pages)} VMs")
    with atomic_text_output(path) as f:
        head = plan.to_dict()
        head["actions"] = list(ACTIONS)
        text = json.dumps(head, sort_keys=False)
        f.write(text[:-1] + ', "pages": [')
        share_refs = _share_references(plan, home or ArrayHome())
        for v, (pp, refs) in enumerate(zip(plan.pages, share_refs, strict=True)):
            if v:
                f.write(", ")
            _write_vm(f, plan, v, pp, refs, dumps[v] if dumps is not None else None)
        f.write("]}\n")


def _share_references(plan: PlanReport, home: ArrayHome) -> Iterator[tuple[I64, I64]]:
    """Per VM, per page: the (vm, gfn) of the kept copy of its content (-1 where none); VM
    after VM (the kept copies of VM v's contents are in VMs 0..v), so that one VM's are in
    memory at a time."""
    ids_all = plan.content_ids
    n_contents = max((int(ids.max()) for ids in ids_all if len(ids)), default=0) + 1
    first_vm = home.full(n_contents, -1, np.int64)
    first_gfn = home.full(n_contents, 0, np.int64)
    for v, ids in enumerate(ids_all):
        uniq, first = np.unique(ids, return_index=True)
        gfns = plan.pages[v].gfns
        if plan.policy.cross_vm:
            new = first_vm[uniq] < 0
            first_vm[uniq[new]] = v
            first_gfn[uniq[new]] = gfns[first[new]].astype(np.int64)
            yield first_vm[ids], first_gfn[ids]
        else:
            at = np.searchsorted(uniq, ids)
            yield np.full(len(ids), v, dtype=np.int64), gfns[first[at]].astype(np.int64)


def _write_vm(
    f: TextIO,
    plan: PlanReport,
    v: int,
    pp: PagePlan,
    share_refs: tuple[I64, I64],
    dump: Mapping[str, Any] | None,
) -> None:
    n = len(pp.actions)
    ref_vm = np.full(n, -1, dtype=np.int64)
    ref_gfn = np.zeros(n, dtype=np.int64)
    shared = pp.actions == SHARE
    ref_vm[shared] = share_refs[0][shared]
    ref_gfn[shared] = share_refs[1][shared]
    # A patched page that was then swapped out no longer needs its reference.
    still = pp.actions[pp.patch_positions] == PATCH
    at = pp.patch_positions[still]
    if len(at):
        ref_vm[at] = pp.patch_ref_vm[still]
        ref_gfn[at] = _gfns_of(plan, pp.patch_ref_vm[still], pp.patch_ref_pos[still])
    head: dict[str, Any] = {"vm": v, "name": plan.vms[v].name}
    if dump is not None:
        head["dump"] = dict(dump)
    f.write(json.dumps(head)[:-1])
    f.write(', "gfn": ')
    _write_column(f, pp.gfns, lambda c: ",".join(map(str, c.tolist())))
    f.write(', "action": ')
    _write_column(f, pp.actions, lambda c: ",".join(map(str, c.tolist())))
    f.write(', "reference": ')
    both = np.stack((ref_vm, ref_gfn), axis=1)
    _write_column(
        f,
        both,
        lambda c: ",".join("null" if a < 0 else f"[{a},{b}]" for a, b in c.tolist()),
    )
    f.write(', "size": ')
    _write_column(f, pp.sizes, lambda c: ",".join(map(str, c.tolist())))
    f.write("}")


def _gfns_of(plan: PlanReport, vm: I64, pos: I64) -> I64:
    out = np.empty(len(vm), dtype=np.int64)
    for v in unique(vm).tolist():
        sel = vm == v
        out[sel] = plan.pages[v].gfns[pos[sel]].astype(np.int64)
    return out


def _write_column(f: TextIO, values: npt.NDArray[Any], render: Callable[[npt.NDArray[Any]], str]) -> None:
    f.write("[")
    for lo in range(0, len(values), _WRITE_CHUNK):
        if lo:
            f.write(",")
        f.write(render(values[lo : lo + _WRITE_CHUNK]))
    f.write("]")


def not_json_number(name: str) -> Any:
    """``json.loads``' ``parse_constant`` for plan files: ``Infinity``, ``-Infinity`` and ``NaN``,
    which Python reads and no JSON has, are refused (a plan of such figures is not one dengine
    wrote)."""
    raise ValueError(f"{name} is not a JSON number")
