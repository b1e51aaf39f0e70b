"""Reading a plan file (``dengine plan -o``, schema ``dengine.plan/1``) for ``dengine apply``: its
policy, and per VM the dump it was made from and the columnar page plan as numpy arrays.

Everything ``apply`` relies on is checked here, before a dump is opened: the schema, the page size
(4096 bytes, the pages the plan sizes and the store holds: another is unsupported), an exact plan
(not an estimate), one dump identity per VM (plan files of dengine 0.1.0 before ``apply`` existed
record none and are refused, with the advice to make the plan again), columns of one length,
ascending gfns, known action codes, sizes a page of its action can take, a reference for every
shared and patched page pointing at a page the plan keeps whole.
"""

from __future__ import annotations

import contextlib
import json
import mmap
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from dengine_cli.arrays import ArrayHome
from dengine_cli.cache.keys import dump_identity
from dengine_cli.codecs import UnknownCodec, compression_codec, patch_codec
from dengine_cli.engine.plan.model import ACTIONS, PATCH, SCHEMA, SHARE, SWAP, WHOLE, ZERO
from dengine_cli.engine.plan.planfile import not_json_number
from dengine_cli.errors import EXIT_BAD_DUMP, EXIT_UNSUPPORTED, BadPlanFile, StalePlan, UnreadableFile
from dengine_cli.formats.base import OpenOptions
from dengine_cli.pages import PAGE_SIZE
from dengine_cli.store.plancolumns import Column, column_of, split_columns

I64 = npt.NDArray[np.int64]

#: The identity fields a dump must still have for its plan to apply (see
#: :func:`dengine_cli.cache.keys.dump_identity`: ctime cannot be set back by any user).
IDENTITY_FIELDS = ("path", "dev", "ino", "size", "mtime_ns", "ctime_ns")

#: The size a page of each action has in a plan file (``-1``: any of 0..PAGE_SIZE bytes, a patch
#: or a compressed page): nothing for a zero, shared or paged-out page, a page for a whole one.
FIXED_SIZES = np.full(len(ACTIONS), -1, dtype=np.int64)
FIXED_SIZES[[ZERO, SHARE, SWAP]] = 0
FIXED_SIZES[WHOLE] = PAGE_SIZE


@dataclass(frozen=True, eq=False)
class PlannedVm:
    """One VM of a plan file: its name (the dump path as given to ``plan``), the dump's identity
    as it was when its pages were read, and per present page (ascending gfn) the action code, the
    reference ``(vm, gfn)`` (-1 where none) and the planned size."""

    vm: int
    name: str
    dump: dict[str, Any]
    gfns: npt.NDArray[np.uint64]
    actions: npt.NDArray[np.uint8]
    ref_vm: I64
    ref_gfn: I64
    sizes: npt.NDArray[np.int64]

    @property
    def path(self) -> str:
        """The dump's real path, as the plan recorded it."""
        return str(self.dump["path"])

    @property
    def options(self) -> OpenOptions:
        """How the plan opened the dump (the reader options that change its page set)."""
        return OpenOptions(format=self.dump.get("format"), device_memory=bool(self.dump.get("device_memory")))


@dataclass(frozen=True, eq=False)
class PlanFile:
    """A plan file as ``apply`` needs it: the document's head (policy, figures) and its VMs."""

    path: Path
    head: dict[str, Any]
    vms: tuple[PlannedVm, ...]

    @property
    def policy(self) -> dict[str, Any]:
        policy: dict[str, Any] = self.head["policy"]
        return policy

    @property
    def patch_codec(self) -> str:
        return str(self.policy["patch"]["codec"])

    @property
    def compression_codec(self) -> str:
        return str(self.policy["compression"]["codec"])

    def figures(self, v: int) -> dict[str, Any]:
        """The plan's per-VM figures of VM ``v`` (``footprint_bytes``...)."""
        vm: dict[str, Any] = self.head["vms"][v]
        return vm


def read_plan(path: Path | str, home: ArrayHome | None = None) -> PlanFile:
    """The plan file at ``path``, checked (:class:`BadPlanFile`, exit 4, or exit 5 for another
    schema or page size; :class:`UnreadableFile` when it cannot be read).  ``home``: where the
    page columns are kept (default: in memory).  The file is read through a mapping: a plan of a
    large fleet (18 bytes a page) is not also copied into this process's memory."""
    path = Path(path)
    home = home or ArrayHome()
    with _mapped(path) as text:
        rest, token, columns = split_columns(text, home.hold if home.in_files else None)
        try:
            doc = json.loads(rest, parse_constant=not_json_number)
        except (ValueError, UnicodeDecodeError):
            doc, columns = _whole_document(path, bytes(text)), []  # the error as the file has it
    if not isinstance(doc, dict):
        raise BadPlanFile(path, "not a dengine plan file (a JSON object with a schema)")
    schema = doc.get("schema")
    if schema is None:
        raise BadPlanFile(path, "not a dengine plan file (a JSON object with no schema)")
    if schema != SCHEMA:
        # Another version of the plan schema is unsupported (exit 5); anything else is no plan.
        newer = isinstance(schema, str) and schema.startswith(SCHEMA.rsplit("/", 1)[0] + "/")
        raise BadPlanFile(
            path, f"schema {schema!r} is not {SCHEMA!r}: not a plan file this dengine applies",
            exit_code=EXIT_UNSUPPORTED if newer else EXIT_BAD_DUMP,
        )  # fmt: skip
    _check_page_size(path, doc)
    if doc.get("estimate"):
        raise BadPlanFile(path, "an estimate (--sample) cannot be applied: make an exact plan")
    if "pages" not in doc:
        raise BadPlanFile(path, "no per-page plan: write it with `dengine plan -o FILE`")
    _check_policy(path, doc.get("policy"))
    if list(doc.get("actions", [])) != list(ACTIONS):
        raise BadPlanFile(path, f"actions {doc.get('actions')!r} are not {list(ACTIONS)!r}")
    pages = doc.pop("pages")
    if not isinstance(pages, list) or not isinstance(doc.get("vms"), list) or len(pages) != len(doc["vms"]):
        raise BadPlanFile(path, "the per-page plan does not list one entry per VM")
    vms = tuple(_vm(path, v, entry, token, columns, home) for v, entry in enumerate(pages))
    for vm, figures in zip(vms, doc["vms"], strict=True):
        named = figures.get("name") if isinstance(figures, dict) else None
        if named != vm.name:  # the store keeps both: its VM rows and the plan's head
            raise BadPlanFile(path, f"VM {vm.vm}: named {vm.name!r} in its page plan, {named!r} in vms")
    _check_references(path, vms)
    return PlanFile(path, doc, vms)


@contextlib.contextmanager
def _mapped(path: Path) -> Iterator[bytes | mmap.mmap]:
    """The file's bytes, mapped; read whole when it cannot be mapped (a pipe such as
    ``<(zstdcat plan.json.zst)``, an empty file)."""
    try:
        with open(path, "rb") as f:
            st = os.fstat(f.fileno())
            regular = stat.S_ISREG(st.st_mode) and st.st_size > 0
            mapping = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if regular else None
            text = f.read() if mapping is None else b""
    except (OSError, ValueError) as e:
        raise UnreadableFile(path, getattr(e, "strerror", None) or str(e)) from e
    if mapping is None:
        yield text
        return
    try:
        yield mapping
    finally:
        mapping.close()


def _whole_document(path: Path, text: bytes) -> Any:
    """The file parsed by ``json.loads`` alone, or its JSON error with the file's offset."""
    try:
        return json.loads(text, parse_constant=not_json_number)
    except (ValueError, UnicodeDecodeError) as e:
        where = f" at offset {e.pos:#x}" if isinstance(e, json.JSONDecodeError) else ""
        raise BadPlanFile(path, f"not a JSON document{where}: {e}") from None


def _check_page_size(path: Path, doc: dict[str, Any]) -> None:
    """The plan's ``page_size``: an integer (exit 4 otherwise, or when there is none), 4096, the
    page size of every dump dengine reads (exit 5 for another)."""
    if "page_size" not in doc:
        raise BadPlanFile(path, f"no page_size: a plan file records the size of its pages ({PAGE_SIZE})")
    size = doc["page_size"]
    if type(size) is not int:
        raise BadPlanFile(path, f"page_size: expected an integer, found {size!r}")
    if size != PAGE_SIZE:
        raise BadPlanFile(
            path, f"page_size {size} is not {PAGE_SIZE}: not a plan file this dengine applies",
            exit_code=EXIT_UNSUPPORTED,
        )  # fmt: skip


def _check_policy(path: Path, policy: Any) -> None:
    """The policy's patch and compression sections, as ``apply`` encodes with them: whether each
    is enabled and, if so, a codec this dengine has."""
    if not isinstance(policy, dict):
        raise BadPlanFile(path, f"policy: expected an object, found {policy!r}")
    for part, codec_named in (("patch", patch_codec), ("compression", compression_codec)):
        section = policy.get(part)
        if not isinstance(section, dict) or not isinstance(section.get("enabled"), bool):
            raise BadPlanFile(
                path, f"policy.{part}: expected an object with enabled and codec, found {section!r}"
            )
        if section["enabled"]:
            try:
                codec_named(str(section.get("codec")))
            except UnknownCodec as e:
                raise BadPlanFile(path, f"policy.{part}.codec: {e}") from None


def _vm(path: Path, v: int, entry: Any, token: str, columns: list[Column], home: ArrayHome) -> PlannedVm:
    if not isinstance(entry, dict) or entry.get("vm") != v:
        raise BadPlanFile(path, f"pages[{v}] is not the page plan of VM {v}")
    dump = entry.get("dump")
    if not isinstance(dump, dict) or any(k not in dump for k in IDENTITY_FIELDS):
        raise BadPlanFile(
            path,
            f"VM {v} ({entry.get('name')}): the plan records no dump identity (made by an older "
            "dengine): make the plan again",
        )
    try:
        gfns = _column(entry["gfn"], np.uint64, token, columns)
        actions = _column(entry["action"], np.int64, token, columns)
        sizes = _column(entry["size"], np.int64, token, columns)
        refs = column_of(entry["reference"], token, columns)
        if refs is not None and refs.ndim == 2:
            has, pairs = refs[:, 0] == 1, refs[refs[:, 0] == 1, 1:]
        else:
            refs = entry["reference"]
            given = [r for r in refs if r is not None]
            if not all(type(r) is list and len(r) == 2 and all(type(x) is int for x in r) for r in given):
                raise ValueError("a reference is null or [vm, gfn]")
            has = np.fromiter((r is not None for r in refs), dtype=np.bool_, count=len(refs))
            pairs = np.asarray(given, dtype=np.int64).reshape(-1, 2)
    except (KeyError, TypeError, ValueError, OverflowError) as e:
        raise BadPlanFile(path, f"VM {v}: bad page columns: {e}") from None
    n = len(gfns)
    if gfns.ndim != 1 or not (len(actions) == len(sizes) == len(has) == n):
        raise BadPlanFile(path, f"VM {v}: the gfn, action, reference and size columns differ in length")
    if n > 1 and not np.all(gfns[1:] > gfns[:-1]):
        raise BadPlanFile(path, f"VM {v}: gfns are not in ascending order")
    if n and (actions.min() < 0 or actions.max() >= len(ACTIONS)):
        raise BadPlanFile(path, f"VM {v}: an action code outside 0..{len(ACTIONS) - 1}")
    _check_sizes(path, v, gfns, actions, sizes)
    ref_vm = home.full(n, -1, np.int64)
    ref_gfn = home.full(n, -1, np.int64)
    ref_vm[has] = pairs[:, 0]
    ref_gfn[has] = pairs[:, 1]
    need = (actions == SHARE) | (actions == PATCH)
    if not np.array_equal(need, has):
        k = int(np.argmax(need != has))
        ref = pairs[int(np.count_nonzero(has[:k]))].tolist() if has[k] else None
        raise BadPlanFile(
            path, f"VM {v} gfn {int(gfns[k]):#x}: a {ACTIONS[actions[k]]} page with reference {ref!r}"
        )
    return PlannedVm(v, str(entry.get("name", dump["path"])), dump, gfns, home.hold(actions.astype(np.uint8)),
                     ref_vm, ref_gfn, sizes)  # fmt: skip


#: Pages whose sizes :func:`_check_sizes` checks at a time.
CHECK_PAGES = 1 << 18


def _check_sizes(
    path: Path, v: int, gfns: npt.NDArray[np.uint64], actions: I64, sizes: I64, step: int = CHECK_PAGES
) -> None:
    """Every page's size is one a page of its action takes: 0..4096 bytes, exactly 0 for a zero,
    shared or paged-out page and 4096 for a whole one (a size the figures add up, so a size
    edited to 10**15 showed a store of 909.5 TiB).  ``step`` pages at a time, so that the
    temporaries (11 bytes a page) stay a few MiB whatever the VM's size and memory limit."""
    for lo in range(0, len(actions), step):
        fixed = FIXED_SIZES[actions[lo : lo + step]]
        part = sizes[lo : lo + step]
        bad = (part < 0) | (part > PAGE_SIZE) | ((fixed >= 0) & (part != fixed))
        if bad.any():
            k = int(np.argmax(bad))
            expected = f"{fixed[k]}" if fixed[k] >= 0 else f"0..{PAGE_SIZE}"
            raise BadPlanFile(
                path,
                f"VM {v} gfn {int(gfns[lo + k]):#x} (page {lo + k}): size {int(part[k])} for a "
                f"{ACTIONS[actions[lo + k]]} page, expected {expected} bytes",
            )


def _column(value: Any, dtype: type[np.integer[Any]], token: str, columns: list[Column]) -> npt.NDArray[Any]:
    """A page column: read by :func:`split_columns` already, or a list ``json.loads`` made."""
    found = column_of(value, token, columns)
    if found is not None and found.ndim == 1:
        return found.astype(dtype, copy=False)
    if not isinstance(value, list) or not all(type(x) is int for x in value):
        raise ValueError("a column of integers expected")  # numpy would make 1.5 a 1
    return np.asarray(value, dtype=dtype)


def _check_references(path: Path, vms: tuple[PlannedVm, ...]) -> None:
    """Every reference names a present page of a VM of the plan, which the plan keeps whole."""
    for vm in vms:
        at = np.flatnonzero(vm.ref_vm >= 0)
        if not len(at):
            continue
        bad = vm.ref_vm[at] >= len(vms)
        found = np.zeros(len(at), dtype=np.bool_)
        for r in np.unique(vm.ref_vm[at][~bad]).tolist():
            sel = np.flatnonzero(vm.ref_vm[at] == r)
            target = vms[r]
            pos = np.searchsorted(target.gfns, vm.ref_gfn[at][sel].astype(np.uint64))
            pos = np.minimum(pos, max(len(target.gfns) - 1, 0))
            if len(target.gfns):
                found[sel] = (target.gfns[pos] == vm.ref_gfn[at][sel].astype(np.uint64)) & (
                    target.actions[pos] == WHOLE
                )
        if not found.all():
            k = int(at[int(np.argmin(found))])
            raise BadPlanFile(
                path,
                f"VM {vm.vm} gfn {int(vm.gfns[k]):#x}: its reference [{vm.ref_vm[k]}, {vm.ref_gfn[k]:#x}] "
                "is not a page the plan keeps whole",
            )


def check_dumps_unchanged(plan: PlanFile) -> None:
    """:class:`StalePlan` (exit 8) naming the first dump that is gone or not the file the plan
    was made from (another device, inode, size, mtime or ctime)."""
    for vm in plan.vms:
        try:
            now = dump_identity(vm.path)
        except UnreadableFile as e:
            raise StalePlan(
                plan.path, f"VM {vm.vm} ({vm.name}): its dump {vm.path} is gone: {e.reason}"
            ) from None
        changed = [k for k in IDENTITY_FIELDS if now[k] != vm.dump[k]]
        if changed:
            raise StalePlan(
                plan.path,
                f"VM {vm.vm} ({vm.name}): its dump {vm.path} changed since the plan was made "
                f"({', '.join(changed)} differ): make the plan again",
            )
