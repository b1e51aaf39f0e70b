"""`dengine apply`, `restore` and `verify` on real QEMU dumps of every format (and dumps the
builders make of formats no tool here writes): the store's page data is the plan's, byte for
byte; every VM restores to exactly what `dengine extract` gives of its dump, as a raw image and
as an ELF core that dengine and libkdumpfile read back to the same pages."""

from __future__ import annotations

import collections
import json
import lzma
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import xxhash
import zstandard
from hypothesis import given, settings
from hypothesis import strategies as st

from dengine_cli.errors import (
    EXIT_BAD_DUMP,
    EXIT_DAMAGED,
    EXIT_OUTPUT,
    EXIT_STALE,
    EXIT_UNREADABLE,
    EXIT_UNSUPPORTED,
    EXIT_USAGE,
    BadPlanFile,
    OutputError,
)
from dengine_cli.formats import open_dump
from dengine_cli.pages import CHECKSUMMERS, PAGE_SIZE, page_checksums
from dengine_cli.store.frames import (
    AUTO_LZMA2,
    FRAME_PAGES,
    LZMA2_FAST,
    LZMA2_GAIN,
    SAMPLE_PAGES,
    FrameCodec,
    choose_codec,
    incompressible,
)
from dengine_cli.store.layout import APPLY_LOCK, CATALOG
from dengine_cli.store.planread import FIXED_SIZES, _check_sizes
from dengine_cli.store.reader import StoreReader
from dengine_cli.store.writer import StoreWriter
from tests.builders.lime import build_lime
from tests.builders.xc_core import build_xc_core
from tests.commands import invoke_quiet as invoke
from tests.conftest import FIXTURES, needs_oracle, oracle_pages, page_digests, read_pages, tmpfs
from tests.vms import design_vms, write_raw_images


def extract(dump: Path, out: Path) -> bytes:
    code, _, err = invoke("extract", str(dump), "-o", str(out))
    assert code == 0, err
    return out.read_bytes()


def plan(dumps: list[Path], tmp: Path, *extra: str) -> Path:
    tmp.mkdir(parents=True, exist_ok=True)
    out = tmp / "plan.json"
    code, _, err = invoke("plan", "--baseline", "none", "--index-dir", str(tmp / "idx"), "-o", str(out),
                          *extra, *map(str, dumps))  # fmt: skip
    assert code == 0, err
    return out


def apply(plan_file: Path, store: Path, *extra: str) -> dict:  # type: ignore[type-arg]
    code, out, err = invoke("apply", "--format", "json", str(plan_file), "-o", str(store), *extra)
    assert code == 0, err
    doc: dict = json.loads(out)  # type: ignore[type-arg]
    return doc


@pytest.fixture(scope="module")
def fleet(real_dump: Callable[[str], Path], tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Dumps of every format: the real QEMU ELF, kdump and migration stream fixtures, the zstd
    compressed ELF as committed, and a LiME, an xc_core (HVM) and a raw image holding real
    pages (alpha's, shifted and mixed, so that they share and patch against the others)."""
    tmp = tmp_path_factory.mktemp("fleet")
    with open_dump(real_dump("alpha.elf")) as d:
        pages = read_pages(d, 4096)
    gfns = sorted(pages)
    chosen = gfns[:3000:3]
    lime = tmp / "guest.lime"
    lime.write_bytes(build_lime([(0x100000, b"".join(pages[g] for g in chosen[:600])),
                                 (0x4000000, b"".join(pages[g] for g in chosen[600:]))]))  # fmt: skip
    xc = tmp / "guest.xc"
    xc.write_bytes(build_xc_core([(k * 2, 0, pages[g]) for k, g in enumerate(chosen[::-1])], hvm=True).data)
    raw = tmp / "guest.raw"
    image = bytearray(b"".join(pages[g] for g in gfns[:2048]))
    image[4096 * 5 + 17] ^= 0xFF  # one page that differs from alpha's in one byte: a patch
    raw.write_bytes(bytes(image))
    return [real_dump("alpha.elf"), real_dump("alpha.kdump"), real_dump("beta.qevm"),
            FIXTURES / "beta.elf.zst", lime, xc, raw]  # fmt: skip


@pytest.fixture(scope="module")
def planned(fleet: list[Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    return plan(fleet, tmp_path_factory.mktemp("plan"))


@pytest.mark.parametrize("packed", [False, True], ids=["store", "pack"])
def test_every_format_round_trips_byte_for_byte(
    fleet: list[Path], planned: Path, tmp_path: Path, packed: bool
) -> None:
    doc = apply(planned, tmp_path / "store", *(["--pack"] if packed else []))
    plan_doc = json.loads(planned.read_text())
    assert [vm["name"] for vm in doc["vms"]] == [str(p) for p in fleet]
    for vm, planned_vm in zip(doc["vms"], plan_doc["vms"], strict=True):
        assert vm["plan_bytes"] == planned_vm["footprint_bytes"]
        if not packed:
            # The plan's codecs, the plan's pages: the page data is the plan's, exactly.
            assert vm["stored_bytes"] == vm["plan_bytes"]
            assert vm["size_mismatches"] == 0
    total_plan = sum(vm["plan_bytes"] for vm in doc["vms"])
    if packed:
        assert doc["data_bytes"] < 0.8 * total_plan
    else:
        assert doc["data_bytes"] == total_plan
    assert doc["metadata_bytes"] > 0
    code, out, err = invoke("verify", str(tmp_path / "store"))
    assert code == 0, out + err
    code, _, err = invoke("restore", str(tmp_path / "store"), "-o", str(tmp_path / "out"))
    assert code == 0, err
    names = [p.name for p in fleet]
    for dump, name in zip(fleet, names, strict=True):
        want = extract(dump, tmp_path / f"{name}.want")
        assert (tmp_path / "out" / f"{name}.raw").read_bytes() == want, name


def test_one_vm_restores_alone_as_elf_read_back_by_dengine(
    fleet: list[Path], planned: Path, tmp_path: Path
) -> None:
    store = tmp_path / "store"
    apply(planned, store)
    out = tmp_path / "beta.elf"
    code, _, err = invoke("restore", str(store), "beta.qevm", "--format", "elf", "-o", str(out))
    assert code == 0, err
    with open_dump(out) as back, open_dump(fleet[2]) as original:
        assert back.facts.format == "elf"
        assert np.array_equal(back.gfns, original.gfns)
        assert read_pages(back, 1000) == read_pages(original, 1000)
    # By number, and the raw image equals extract's.
    code, _, err = invoke("restore", str(store), "2", "-o", str(tmp_path / "two.raw"))
    assert code == 0, err
    assert (tmp_path / "two.raw").read_bytes() == extract(fleet[2], tmp_path / "want.raw")


@needs_oracle
def test_elf_restore_reads_back_in_libkdumpfile(real_dump: Callable[[str], Path], tmp_path: Path) -> None:
    alpha = real_dump("alpha.kdump")
    store = tmp_path / "store"
    apply(plan([alpha], tmp_path), store, "--pack")
    out = tmp_path / "alpha.elf"
    code, _, err = invoke("restore", str(store), "--format", "elf", "-o", str(out))
    assert code == 0, err
    fmt, pages = oracle_pages(out)
    assert fmt == "elf"
    with open_dump(alpha) as d:
        want = {g: p for b in d.batches() for g, p in page_digests(b.gfns, b.pages).items()}
    assert pages == want


def test_a_changed_dump_is_refused(real_dump: Callable[[str], Path], tmp_path: Path) -> None:
    dump = tmp_path / "vm.elf"
    dump.write_bytes(real_dump("beta.elf").read_bytes())
    plan_file = plan([dump], tmp_path)
    os.utime(dump, ns=(0, 0))  # same bytes, another mtime (and ctime): not the file the plan saw
    code, _, err = invoke("apply", str(plan_file), "-o", str(tmp_path / "store"))
    assert code == EXIT_STALE
    assert err.startswith(f"dengine: {plan_file}: VM 0 ({dump}): its dump {dump.resolve()} changed since")
    assert "mtime_ns" in err and "make the plan again" in err
    assert not (tmp_path / "store" / "catalog.sqlite").exists()
    dump.unlink()
    code, _, err = invoke("apply", str(plan_file), "-o", str(tmp_path / "store"))
    assert code == EXIT_STALE and "is gone" in err


def test_a_plan_that_lies_about_a_page_is_refused(real_dump: Callable[[str], Path], tmp_path: Path) -> None:
    """A plan edited to call a non-zero page zero, or to share two pages that differ: refused,
    never stored wrong; a new store is not left behind (not even its empty directories), an
    existing one is left as it was."""
    alpha = real_dump("alpha.elf")
    plan_file = plan([alpha], tmp_path)
    doc = json.loads(plan_file.read_text())
    pages = doc["pages"][0]
    whole = [i for i, a in enumerate(pages["action"]) if a == 2]
    zero_lie = json.loads(json.dumps(doc))
    zero_lie["pages"][0]["action"][whole[1]] = 0
    zero_lie["pages"][0]["size"][whole[1]] = 0
    lie = tmp_path / "lie.json"
    lie.write_text(json.dumps(zero_lie))
    code, _, err = invoke("apply", str(lie), "-o", str(tmp_path / "s1"))
    assert code == EXIT_STALE, err
    assert f"gfn {pages['gfn'][whole[1]]:#x}: planned as a zero page, it is not" in err
    share_lie = json.loads(json.dumps(doc))
    p = share_lie["pages"][0]
    p["action"][whole[1]], p["size"][whole[1]], p["reference"][whole[1]] = 1, 0, [0, pages["gfn"][whole[0]]]
    lie.write_text(json.dumps(share_lie))
    code, _, err = invoke("apply", str(lie), "-o", str(tmp_path / "s2"))
    assert code == EXIT_STALE, err
    assert "their contents differ" in err
    for store in ("s1", "s2"):
        assert not (tmp_path / store).exists()
    code, _, err = invoke("apply", str(lie), "-o", str(tmp_path / "new" / "dir" / "s3"))
    assert code == EXIT_STALE, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["idx", "lie.json", "plan.json"]
    store = tmp_path / "store"
    apply(plan_file, store)
    before = {p.relative_to(store): p.read_bytes() for p in store.rglob("*") if p.is_file()}
    code, _, err = invoke("apply", "--replace", str(lie), "-o", str(store))
    assert code == EXIT_STALE, err
    assert {p.relative_to(store): p.read_bytes() for p in store.rglob("*") if p.is_file()} == before


def test_bad_plan_files(real_dump: Callable[[str], Path], tmp_path: Path) -> None:
    alpha = real_dump("alpha.elf")
    plan_file = plan([alpha], tmp_path)
    doc = json.loads(plan_file.read_text())
    bad = tmp_path / "bad.json"
    cases = []
    bad.write_text('{"schema": "dengine.plan/1", ')
    cases.append((EXIT_BAD_DUMP, "not a JSON document at offset 0x1d"))
    old = json.loads(json.dumps(doc))
    del old["pages"][0]["dump"]
    cases.append((EXIT_BAD_DUMP, "the plan records no dump identity (made by an older dengine)", old))
    other = dict(doc, schema="dengine.plan/2")
    cases.append((EXIT_UNSUPPORTED, "schema 'dengine.plan/2' is not 'dengine.plan/1'", other))
    foreign = dict(doc, schema="dengine.report/1")
    cases.append((EXIT_BAD_DUMP, "schema 'dengine.report/1' is not 'dengine.plan/1'", foreign))
    cases.append((EXIT_BAD_DUMP, "not a dengine plan file (a JSON object with no schema)", {"vms": []}))
    cases.append((EXIT_BAD_DUMP, "not a dengine plan file (a JSON object with a schema)", [doc]))
    sampled = dict(doc, estimate=True)
    cases.append((EXIT_BAD_DUMP, "an estimate (--sample) cannot be applied", sampled))
    short = json.loads(json.dumps(doc))
    short["pages"][0]["size"].pop()
    cases.append((EXIT_BAD_DUMP, "columns differ in length", short))
    dangling = json.loads(json.dumps(doc))
    d = dangling["pages"][0]
    k = d["action"].index(3)
    d["reference"][k] = [0, 10**9]
    cases.append((EXIT_BAD_DUMP, "is not a page the plan keeps whole", dangling))
    for column, at, value, message in (
        ("action", 0, 9, "an action code outside 0..5"),
        ("gfn", 0, -1, "bad page columns"),
        ("reference", k, [0, 1, 2], "bad page columns"),
        ("reference", k, None, "page with reference None"),
        ("size", 0, 1.5, "bad page columns"),
        ("reference", k, [0, 2.5], "bad page columns"),
    ):
        odd = json.loads(json.dumps(doc))
        odd["pages"][0][column][at] = value
        cases.append((EXIT_BAD_DUMP, message, odd))
    codec = json.loads(json.dumps(doc))
    codec["policy"]["patch"]["codec"] = "nope"
    cases.append((EXIT_BAD_DUMP, "policy.patch.codec: unknown patch codec 'nope': known codecs are", codec))
    no_compression = json.loads(json.dumps(doc))
    del no_compression["policy"]["compression"]
    cases.append(
        (EXIT_BAD_DUMP, "policy.compression: expected an object with enabled and codec", no_compression)
    )
    # Each document written as json.dumps writes it (its columns are then read by json.loads) and
    # with the columns as the plan writer writes them (read by numpy: store/plancolumns.py).
    for case in [*cases, *((*c[:2], c[2], (",", ": ")) for c in cases if len(c) == 3)]:
        if len(case) >= 3:
            bad.write_text(json.dumps(case[2], separators=case[3] if len(case) == 4 else None))
        code, _, err = invoke("apply", str(bad), "-o", str(tmp_path / "store"))
        assert code == case[0], err
        assert err.startswith(f"dengine: {bad}: ") and case[1] in err, err
        assert "Traceback" not in err
        assert not (tmp_path / "store").exists()
    code, _, err = invoke("apply", str(tmp_path / "missing.json"), "-o", str(tmp_path / "store"))
    assert code == EXIT_UNREADABLE


@settings(max_examples=200, deadline=None)
@given(
    actions=st.lists(st.integers(0, 5), min_size=1, max_size=40),
    bad_at=st.lists(st.integers(0, 39), max_size=3),
    step=st.integers(1, 50),
)
def test_page_sizes_are_checked_a_step_at_a_time(actions: list[int], bad_at: list[int], step: int) -> None:
    """The size check, a step of pages at a time (its temporaries bounded), names the first page
    whose size its action cannot take, whatever the step: the same line as in one step."""
    acts = np.array(actions, dtype=np.int64)
    fixed = FIXED_SIZES[acts]
    sizes = np.where(fixed >= 0, fixed, 100).astype(np.int64)
    for k in bad_at:
        if k < len(sizes):
            sizes[k] = PAGE_SIZE + 1
    gfns = np.arange(len(acts), dtype=np.uint64) * 3
    path = Path("plan.json")

    def message(at: int) -> str | None:
        try:
            _check_sizes(path, 1, gfns, acts, sizes, step=at)
        except BadPlanFile as e:
            return str(e)
        return None

    first = min((k for k in bad_at if k < len(sizes)), default=None)
    found = message(step)
    assert found == message(len(acts))
    if first is None:
        assert found is None
    else:
        assert found is not None and f"gfn {first * 3:#x} (page {first}): size {PAGE_SIZE + 1} " in found


def test_impossible_page_sizes_are_refused(real_dump: Callable[[str], Path], tmp_path: Path) -> None:
    """A plan file's per-page sizes are the figures `apply` reports: one a page of its action
    cannot take (negative, more than a page, a whole page not of 4096 bytes, a zero, shared or
    paged-out page of any) is a malformed plan (exit 4, one line naming the VM, gfn and page),
    read by numpy or by json.loads alike; before, a size of 10**15 showed 909.5 TiB.  So is a VM
    named otherwise in the plan's figures than in its page plan (the store keeps both names)."""
    plan_file = plan([real_dump("alpha.elf"), real_dump("beta.elf")], tmp_path)
    doc = json.loads(plan_file.read_text())
    pages = doc["pages"][1]
    first = {a: pages["action"].index(a) for a in (0, 1, 2, 3, 4)}
    bad = tmp_path / "bad.json"
    for action, size, expected in (
        (4, 10**15, "0..4096"), (3, -1, "0..4096"), (4, 4097, "0..4096"), (2, 4095, "4096"),
        (2, 0, "4096"), (0, 1, "0"), (1, 4096, "0"),
    ):  # fmt: skip
        k = first[action]
        odd = json.loads(json.dumps(doc))
        odd["pages"][1]["size"][k] = size
        name = ("zero", "share", "whole", "patch", "compress")[action]
        want = f"VM 1 gfn {pages['gfn'][k]:#x} (page {k}): size {size} for a {name} page, expected {expected}"
        for separators in ((", ", ": "), (",", ": ")):  # read by json.loads, by numpy
            bad.write_text(json.dumps(odd, separators=separators))
            code, _, err = invoke("apply", str(bad), "-o", str(tmp_path / "store"))
            assert code == EXIT_BAD_DUMP, err
            assert err.splitlines() == [f"dengine: {bad}: {want} bytes"]
            assert not (tmp_path / "store").exists()
    renamed = json.loads(json.dumps(doc))
    renamed["vms"][1]["name"] = "gamma"
    bad.write_text(json.dumps(renamed))
    code, _, err = invoke("apply", str(bad), "-o", str(tmp_path / "store"))
    assert code == EXIT_BAD_DUMP, err
    assert err.splitlines() == [
        f"dengine: {bad}: VM 1: named {pages['name']!r} in its page plan, 'gamma' in vms"
    ]
    assert apply(plan_file, tmp_path / "store")["vms"][1]["plan_bytes"] == sum(pages["size"])


def test_store_arguments(real_dump: Callable[[str], Path], tmp_path: Path) -> None:
    plan_file = plan([real_dump("alpha.elf")], tmp_path)
    not_store = tmp_path / "not-a-store"
    not_store.mkdir()
    (not_store / "notes.txt").write_text("mine")
    code, _, err = invoke("apply", str(plan_file), "-o", str(not_store))
    assert code == 6 and "is a directory but not a dengine store" in err
    assert (not_store / "notes.txt").read_text() == "mine"
    code, _, err = invoke("apply", "--frame-codec", "xz", str(plan_file), "-o", str(tmp_path / "s"))
    assert code == EXIT_USAGE
    code, _, err = invoke("verify", str(tmp_path / "nowhere"))
    assert code == EXIT_UNREADABLE and "no such store" in err
    code, _, err = invoke("restore", str(not_store), "-o", str(tmp_path / "x"))
    assert code == EXIT_UNREADABLE and "not a complete dengine store" in err
    # A file where the store should be (the plan file, say) is named as such, as a store that
    # cannot be read (exit 3), like a missing one: not click's "Directory ... is a file".
    why = "is a file, not a store (the directory 'dengine apply' writes)"
    for command in (["verify"], ["verify", "--json"], ["restore", "-o", str(tmp_path / "x")]):
        code, out, err = invoke(*command, str(plan_file))
        expected = f"dengine: {plan_file}: cannot read: {why}"
        assert code == EXIT_UNREADABLE and err.splitlines() == [expected], err
        assert ("--json" in command) == bool(out) and not (tmp_path / "x").exists()
    store = tmp_path / "store"
    apply(plan_file, store)
    for wanted in ("gamma", "1"):
        code, _, err = invoke("restore", str(store), wanted, "-o", str(tmp_path / "x"))
        assert code == EXIT_USAGE
        assert err.splitlines() == [
            f"dengine: restore: {store}: no VM called '{wanted}' (1 VM: 0 {real_dump('alpha.elf')})"
            "; see 'dengine restore --help'"
        ]
        assert not (tmp_path / "x").exists()


def test_restore_output_of_the_wrong_kind(tmp_path: Path) -> None:
    """One VM is restored to a file, several to a directory: an -o of the other kind already
    there is refused before anything is written (exit 6, one line saying which kind is needed),
    and left as it was."""
    paths = write_raw_images(tmp_path, design_vms(3, [12] * 2))
    store = tmp_path / "store"
    apply(plan(paths, tmp_path, "--dump-format", "raw"), store)
    folder, file = tmp_path / "images", tmp_path / "image.raw"
    folder.mkdir()
    file.write_bytes(b"mine")
    code, _, err = invoke("restore", str(store), "0", "-o", str(folder))
    assert code == EXIT_OUTPUT, err
    assert err.splitlines() == [
        f"dengine: {folder}: cannot write: is a directory: one VM is restored to a file (-o FILE)"
    ]
    for vms in (["0", "1"], []):
        code, _, err = invoke("restore", str(store), *vms, "-o", str(file))
        assert code == EXIT_OUTPUT, err
        why = "is not a directory: 2 VMs are restored to a directory, an image each"
        assert err.splitlines() == [f"dengine: {file}: cannot write: {why}"]
    assert list(folder.iterdir()) == [] and file.read_bytes() == b"mine"
    code, _, err = invoke("restore", str(store), "-o", str(folder))  # into the directory there
    assert code == 0 and sorted(f.name for f in folder.iterdir()) == sorted(f"{p.name}.raw" for p in paths), (
        err
    )


def test_an_unknown_vm_lists_a_few_by_number(tmp_path: Path) -> None:
    """A store of many VMs (ten small raw guests here): the error names the first eight by
    number, then how many more, on one line; a number names its VM."""
    paths = write_raw_images(tmp_path, design_vms(3, [12] * 10))
    store = tmp_path / "store"
    apply(plan(paths, tmp_path, "--dump-format", "raw"), store)
    code, _, err = invoke("restore", str(store), "vm10.raw", "-o", str(tmp_path / "x"))
    assert code == EXIT_USAGE
    listed = ", ".join(f"{k} {paths[k]}" for k in range(8))
    assert err.splitlines() == [
        f"dengine: restore: {store}: no VM called 'vm10.raw' (10 VMs: {listed}, and 2 more)"
        "; see 'dengine restore --help'"
    ]
    assert not (tmp_path / "x").exists()
    code, _, err = invoke("restore", str(store), "9", "-o", str(tmp_path / "nine.raw"))
    assert code == 0, err
    assert (tmp_path / "nine.raw").read_bytes() == extract(paths[9], tmp_path / "nine-extracted.raw")


def test_a_store_is_replaced_only_when_asked(real_dump: Callable[[str], Path], tmp_path: Path) -> None:
    """A store may be the only copy of a fleet whose dumps are gone: `apply -o` onto it is
    refused (exit 6, the store untouched); with --replace the new store replaces it, once it is
    complete, and the old packs go."""
    store = tmp_path / "store"
    first = plan([real_dump("alpha.elf")], tmp_path / "a")
    apply(first, store)
    old_packs = set(os.listdir(store / "packs"))
    before = {p.name: p.read_bytes() for p in store.rglob("*") if p.is_file()}
    second = plan([real_dump("beta.elf"), real_dump("alpha.elf")], tmp_path / "b")
    code, _, err = invoke("apply", str(second), "-o", str(store), "--pack")
    assert code == EXIT_OUTPUT, err
    assert err == (
        f"dengine: {store}: cannot write: a dengine store is there already (--replace replaces it "
        "once the new one is complete)\n"
    )
    assert {p.name: p.read_bytes() for p in store.rglob("*") if p.is_file()} == before
    doc = apply(second, store, "--pack", "--replace")
    assert [Path(vm["name"]).name for vm in doc["vms"]] == ["beta.elf", "alpha.elf"]
    assert not old_packs & set(os.listdir(store / "packs"))
    code, out, err = invoke("verify", "--json", str(store))
    assert code == 0, err
    report = json.loads(out)
    assert report["ok"] and report["notes"] == [] and len(report["vms"]) == 2


HOLD_LOCK = """
import fcntl, os, sys, time
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o644)
fcntl.flock(fd, fcntl.LOCK_EX)
print("held", flush=True)
time.sleep(float(sys.argv[2]))
"""


def hold_apply_lock(store: Path, seconds: float) -> subprocess.Popen[str]:
    """Another process holding the store's apply lock for ``seconds``, as a running apply (or
    one killed outright that the kernel has not reaped yet) does."""
    proc = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(store / APPLY_LOCK), str(seconds)],
                            stdout=subprocess.PIPE, text=True)  # fmt: skip
    assert proc.stdout is not None and proc.stdout.readline() == "held\n"
    return proc


def test_a_store_another_apply_holds_is_waited_for_then_refused(
    real_dump: Callable[[str], Path], tmp_path: Path
) -> None:
    store = tmp_path / "store"
    first = plan([real_dump("alpha.elf")], tmp_path / "a")
    apply(first, store)
    catalog = (store / CATALOG).read_bytes()
    holder = hold_apply_lock(store, 30)
    try:
        with pytest.raises(OutputError, match=r"another dengine apply is writing this store \(waited 0.2 s"):
            StoreWriter(store, lock_wait=0.2, replace=True)
    finally:
        holder.kill()
        holder.wait()
    assert (store / CATALOG).read_bytes() == catalog
    # A holder that lets go within the wait (an apply that ends, a killed one being reaped).
    second = plan([real_dump("beta.elf")], tmp_path / "b")
    holder = hold_apply_lock(store, 0.5)
    try:
        doc = apply(second, store, "--replace")
    finally:
        holder.wait()
    assert [Path(vm["name"]).name for vm in doc["vms"]] == ["beta.elf"]


def test_incompressible_pages_are_framed_as_they_are(
    real_dump: Callable[[str], Path], tmp_path: Path
) -> None:
    """Random pages (incompressible: LZMA2 would only spend time on them) go into frames stored
    as they are; the rest into LZMA2 frames; the VM restores byte for byte, and a flipped byte in
    a stored frame is found by verify.  With a zstd frame codec nothing is probed."""
    with open_dump(real_dump("alpha.elf")) as d:
        pages = read_pages(d, 4096)
    real = [pages[g] for g in sorted(pages)[:1500]]
    noise = np.random.default_rng(7).integers(0, 256, (1200, 4096), dtype=np.uint8)
    raw = tmp_path / "mixed.raw"
    raw.write_bytes(b"".join(real[:700]) + noise.tobytes() + b"".join(real[700:]))
    plan_file = plan([raw], tmp_path)
    store = tmp_path / "store"
    doc = apply(plan_file, store, "--pack")
    assert doc["frame_codec"] == "auto" and doc["stored_frames"] >= 2
    reader = StoreReader(store)
    stored = [i for i, codec in enumerate(reader.frame_codecs) if codec == "stored"]
    assert len(stored) == doc["stored_frames"]
    frames = reader.frames
    stored_pages = int(sum(int(frames["pages"][i]) for i in stored))
    # Every page kept whole that zstd-1 cannot shrink below 4000 bytes: the random ones and
    # those of the real guest (counted here with zstd itself, from the plan's actions).
    plan_doc = json.loads(plan_file.read_text())
    whole = plan_doc["actions"].index("whole")
    (vm,) = plan_doc["pages"]
    image = raw.read_bytes()
    zstd1 = zstandard.ZstdCompressor(level=1)
    expected = sum(
        1
        for gfn, action in zip(vm["gfn"], vm["action"], strict=True)
        if action == whole and len(zstd1.compress(image[gfn * 4096 : (gfn + 1) * 4096])) >= 4000
    )
    assert expected >= 1200
    assert stored_pages == expected
    assert all(int(frames["length"][i]) == int(frames["pages"][i]) * 4096 for i in stored)
    code, out, err = invoke("verify", str(store))
    assert code == 0, out + err
    code, _, err = invoke("restore", str(store), "-o", str(tmp_path / "out.raw"))
    assert code == 0, err
    assert (tmp_path / "out.raw").read_bytes() == raw.read_bytes()
    (pack,) = (store / "packs").iterdir()
    data = bytearray(pack.read_bytes())
    data[int(frames["offset"][stored[0]]) + 4096 * 3 + 5] ^= 0x01
    pack.write_bytes(bytes(data))
    code, out, err = invoke("verify", str(store))
    assert code == EXIT_DAMAGED, out + err
    zstd = apply(plan_file, tmp_path / "zstd-store", "--pack", "--frame-codec", "zstd-3")
    assert zstd["stored_frames"] == 0


def test_incompressible_probe() -> None:
    rng = np.random.default_rng(3)
    random_pages = rng.integers(0, 256, (4, 4096), dtype=np.uint8)
    text = np.frombuffer((b"guest memory page " * 300)[:4096], dtype=np.uint8)
    half = random_pages[0].copy()
    half[2048:] = 0
    pages = np.stack([random_pages[1], np.zeros(4096, np.uint8), text, half, random_pages[2]])
    assert incompressible(pages).tolist() == [True, False, False, False, True]
    assert incompressible(pages[:0]).tolist() == []


def test_frames_round_trip_whatever_the_dictionary() -> None:
    """LZMA2 frames made with the fast mode's own dictionary (explicit --frame-codec), with the
    wider one (auto), or with a frame-sized one (the stores written before 2026-12) decode with
    the same decoder, byte for byte; the wider dictionary finds repeats the fast mode's misses."""
    rng = np.random.default_rng(11)
    words = rng.integers(97, 123, (1024, 4096), dtype=np.uint8)
    words[:, ::7] = 32
    pages = np.concatenate([words[:128], words[:128]])  # repeats 512 KiB apart
    for name in ("xz", "xz-x86", "xz-words", "xz-6", "zstd-9", "stored"):
        for wide in (False, True):
            blob = FrameCodec(name, wide_dictionary=wide).compress(pages)
            assert np.array_equal(FrameCodec(name).decompress(blob, len(pages)), pages), (name, wide)
    wide_size = len(FrameCodec("xz", wide_dictionary=True).compress(pages))
    assert wide_size < 0.6 * len(FrameCodec("xz").compress(pages))  # the repeats are found
    far = np.concatenate([words[:512], words[:512]])  # repeats 2 MiB apart
    older = {**LZMA2_FAST, "dict_size": FRAME_PAGES * 4096}
    blob = lzma.compress(far.tobytes(), format=lzma.FORMAT_RAW, filters=[older])
    assert len(blob) < 0.6 * len(FrameCodec("xz", wide_dictionary=True).compress(far))
    assert np.array_equal(FrameCodec("xz").decompress(blob, len(far)), far)


def test_auto_chooses_the_codec_that_suits_the_frame() -> None:
    """Slab-like records (LZMA2's repeated offsets and literal contexts: much smaller) get LZMA2;
    i.i.d. bytes of a skewed distribution (zstd's Huffman literals do as well) get zstd-9; the
    choice is the smaller codec, or within LZMA2_GAIN of it."""
    rng = np.random.default_rng(5)
    values = rng.integers(0, 2**40, 50).astype(np.uint64) | np.uint64(0xFFFF888000000000)
    n = 1024 * 64
    rec = np.zeros((n, 8), np.uint64)
    rec[:, 0] = values[rng.integers(0, 50, n)]
    rec[:, 1] = values[rng.integers(0, 50, n)]
    rec[:, 2] = rng.integers(0, 1000, n).astype(np.uint64)
    rec[:, 3] = rng.integers(0, 4, n).astype(np.uint64) * 0x1000
    records = rec.view(np.uint8).reshape(1024, 4096)
    weights = np.r_[np.full(16, 0.05), np.full(240, 0.2 / 240)]
    skewed = rng.choice(256, size=(1024, 4096), p=weights).astype(np.uint8)
    lzma2 = [FrameCodec(name, wide_dictionary=True) for name in AUTO_LZMA2]
    zstd = FrameCodec("zstd-9")
    for pages, expect in ((records, set(AUTO_LZMA2)), (skewed, {"zstd-9"})):
        chosen = choose_codec(pages, lzma2, zstd)
        assert chosen.name in expect
        sizes = {c.name: len(c.compress(pages)) for c in (*lzma2, zstd)}
        assert sizes[chosen.name] <= min(sizes.values()) / (1 - LZMA2_GAIN)


def test_auto_takes_the_lzma2_codec_its_sample_makes_smallest() -> None:
    """Among the LZMA2 codecs, the one that compresses the sample smallest is chosen, whatever
    their order: here slab-like records, which LZMA2 preset 6 makes smaller than the fast mode,
    and both far smaller than zstd-9."""
    rng = np.random.default_rng(9)
    values = rng.integers(0, 2**40, 64).astype(np.uint64) | np.uint64(0xFFFF888000000000)
    rec = values[rng.integers(0, 64, (1024 * 128, 4))]
    rec[:, 2] = rng.integers(0, 1 << 20, len(rec)).astype(np.uint64)
    pages = np.ascontiguousarray(rec).view(np.uint8).reshape(1024, 4096)
    lzma2 = [FrameCodec("xz", wide_dictionary=True), FrameCodec("xz-6")]
    step = len(pages) // SAMPLE_PAGES
    sample = np.ascontiguousarray(pages[::step][:SAMPLE_PAGES])
    sizes = {c.name: len(c.compress(sample)) for c in lzma2}
    assert sizes["xz-6"] < sizes["xz"] < (1 - LZMA2_GAIN) * len(FrameCodec("zstd-9").compress(sample))
    for order in (lzma2, lzma2[::-1]):
        assert choose_codec(pages, order, FrameCodec("zstd-9")).name == "xz-6"


def test_auto_store_reports_the_codec_of_every_frame(
    real_dump: Callable[[str], Path], tmp_path: Path
) -> None:
    plan_file = plan([real_dump("alpha.elf"), real_dump("beta.elf")], tmp_path)
    doc = apply(plan_file, tmp_path / "store", "--pack")
    assert doc["frame_codec"] == "auto"
    used = collections.Counter(StoreReader(tmp_path / "store").frame_codecs)
    assert dict(used) == doc["frame_codecs"]
    assert sum(used.values()) == doc["frames"]
    assert set(used) <= {*AUTO_LZMA2, "zstd-9", "stored"}


def test_apply_names_vms_in_its_table_as_the_plan_does(tmp_path: Path) -> None:
    """The table names each VM by its file name, as `plan` and `analyze` do, and by the name
    given where two dumps share a file name; the total row adds up the VMs' rows."""
    vms = design_vms(21, [40, 30, 30])
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    paths = write_raw_images(tmp_path / "a", vms[:2]) + write_raw_images(tmp_path / "b", vms[2:])
    for dirs, expect_full in (([paths[0], paths[1]], False), ([paths[0], paths[2]], True)):
        store = tmp_path / f"store-{expect_full}"
        plan_file = plan(dirs, tmp_path)
        code, out, err = invoke("apply", str(plan_file), "-o", str(store))
        assert code == 0, err
        rows = {cells[0]: cells for cells in map(str.split, out.splitlines()) if len(cells) >= 7}
        for path in dirs:
            name = str(path) if expect_full else path.name
            assert name in rows, out
        if not expect_full:
            assert not any("/" in name for name in rows), out
        pages = sum(int(rows[str(p) if expect_full else p.name][1]) for p in dirs)
        assert int(rows["total"][1]) == pages


@pytest.mark.parametrize("jobs", [1, 3])
def test_restoring_every_vm_decodes_each_frame_once(
    fleet: list[Path], planned: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, jobs: int
) -> None:
    """One reader restores every VM of a packed store decoding each frame once: the frames of the
    pages VMs share (kept in the first VM's frames) serve every VM, and frames decoded ahead by
    several threads are the ones the restore goes on to use.  The images are still the dumps'."""
    from dengine_cli.parallel import Workers
    from dengine_cli.store.restore import restore_vm

    store = tmp_path / "store"
    apply(planned, store, "--pack")
    decoded: list[int] = []
    real = FrameCodec.decompress

    def counted(self: FrameCodec, blob: bytes, pages: int) -> np.ndarray:  # type: ignore[type-arg]
        decoded.append(len(blob))
        return real(self, blob, pages)

    monkeypatch.setattr(FrameCodec, "decompress", counted)
    reader = StoreReader(store, Workers(jobs=jobs))
    frames = len(reader.frames["frame"])
    assert frames >= 3
    try:
        for k, (vm, dump) in enumerate(zip(reader.vms, fleet, strict=True)):
            restore_vm(reader, vm, tmp_path / f"{k}.raw")
            assert (tmp_path / f"{k}.raw").read_bytes() == extract(dump, tmp_path / f"{k}.want")
    finally:
        reader.close()
    assert len(decoded) <= frames, (len(decoded), frames)


def test_a_restore_that_runs_out_of_space_leaves_nothing(
    fleet: list[Path], planned: Path, tmp_path: Path
) -> None:
    """The images are written by a thread of their own while the next pages are decoded: a write
    that fails (a full disk) is still one line naming the output, exit 6, and no image, partial
    or temporary, is left; the store's files are untouched."""
    store = tmp_path / "store"
    apply(planned, store, "--pack")
    small = tmp_path / "small"
    if not tmpfs(small, 1 << 20):
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        out = small / "vm.raw"
        code, _, err = invoke("restore", str(store), "0", "-o", str(out))
        assert code == EXIT_OUTPUT, err
        assert err.startswith(f"dengine: {out}: cannot write: ") and err.count("\n") == 1, err
        assert list(small.iterdir()) == []
    finally:
        subprocess.run(["umount", str(small)], check=False)
    code, _, err = invoke("verify", str(store))
    assert code == 0, err


@given(
    st.integers(0, 40),
    st.integers(0, 64),
    st.sampled_from(CHECKSUMMERS),
    st.integers(0, 2**32 - 1),
)
@settings(max_examples=60, deadline=None)
def test_page_checksums_are_each_rows_xxh3_64(n: int, gap: int, by: str, seed: int) -> None:
    """The store's page checksums, from C or Python, are xxhash's xxh3-64 of each row, for rows
    at any stride (a QEMU stream's pages are 4104 bytes apart) and for zero rows."""
    rng = np.random.default_rng(seed)
    flat = rng.integers(0, 256, n * (PAGE_SIZE + gap), dtype=np.uint8)
    rows = np.lib.stride_tricks.as_strided(flat, shape=(n, PAGE_SIZE), strides=(PAGE_SIZE + gap, 1))
    if n:
        rows[rng.integers(0, n)] = 0
    sums = page_checksums(rows, by=by)
    assert sums.dtype == np.uint64 and len(sums) == n
    assert [int(s) for s in sums] == [xxhash.xxh3_64_intdigest(rows[i].tobytes()) for i in range(n)]


def test_page_checksums_refuse_what_is_not_rows_of_pages() -> None:
    with pytest.raises(ValueError, match="not built here"):
        page_checksums(np.zeros((1, PAGE_SIZE), dtype=np.uint8), by="rust")
    for by in CHECKSUMMERS:
        with pytest.raises(ValueError, match="rows of 4096 bytes"):
            page_checksums(np.zeros((2, 100), dtype=np.uint8), by=by)
        with pytest.raises(ValueError, match="rows of 4096 bytes"):
            page_checksums(np.zeros(PAGE_SIZE, dtype=np.uint8), by=by)


def test_a_plan_file_rewritten_by_another_tool_applies_the_same(
    real_dump: Callable[[str], Path], tmp_path: Path
) -> None:
    # The writer's columns are read by numpy (store/plancolumns.py); a file pretty-printed by
    # another tool goes through json.loads: the same store either way.
    alpha = real_dump("alpha.elf")
    plan_file = plan([alpha], tmp_path)
    pretty = tmp_path / "pretty.json"
    pretty.write_text(json.dumps(json.loads(plan_file.read_text()), indent=1))
    a = apply(plan_file, tmp_path / "a")
    b = apply(pretty, tmp_path / "b")
    assert a["total_bytes"] == b["total_bytes"] and a["objects"] == b["objects"]
    for store in ("a", "b"):
        code, _, err = invoke("restore", str(tmp_path / store), "-o", str(tmp_path / f"{store}.raw"))
        assert code == 0, err
    assert (
        (tmp_path / "a.raw").read_bytes()
        == (tmp_path / "b.raw").read_bytes()
        == extract(alpha, tmp_path / "x.raw")
    )


def test_a_plan_of_another_page_size_or_none_is_refused(tmp_path: Path) -> None:
    """A plan file's page_size and schema are checked before a dump is opened: no page_size, or
    one that is not an integer, is a malformed plan (exit 4); another page size is unsupported
    (exit 5): the plan's sizes and the store's pages are 4 KiB pages.  Before the check a plan of
    8 KiB pages, or of none said, was applied as one of 4 KiB pages."""
    (dump,) = write_raw_images(tmp_path, design_vms(4, [16]))
    plan_file = plan([dump], tmp_path, "--dump-format", "raw")
    doc = json.loads(plan_file.read_text())
    assert doc["page_size"] == PAGE_SIZE
    bad = tmp_path / "bad.json"
    no_page_size = {k: v for k, v in doc.items() if k != "page_size"}
    other = "is not 4096: not a plan file this dengine applies"
    cases = [
        (EXIT_UNSUPPORTED, f"page_size 8192 {other}", dict(doc, page_size=8192)),
        (EXIT_UNSUPPORTED, f"page_size 0 {other}", dict(doc, page_size=0)),
        (EXIT_BAD_DUMP, "no page_size: a plan file records the size of its pages (4096)", no_page_size),
        (EXIT_BAD_DUMP, "page_size: expected an integer, found '4096'", dict(doc, page_size="4096")),
        (EXIT_BAD_DUMP, "page_size: expected an integer, found 4096.0", dict(doc, page_size=4096.0)),
        (EXIT_BAD_DUMP, "page_size: expected an integer, found None", dict(doc, page_size=None)),
        (EXIT_BAD_DUMP, "page_size: expected an integer, found True", dict(doc, page_size=True)),
        (EXIT_BAD_DUMP, "schema 1 is not 'dengine.plan/1': not a plan file this dengine applies",
         dict(doc, schema=1)),
        (EXIT_BAD_DUMP, "not a dengine plan file (a JSON object with no schema)", dict(doc, schema=None)),
    ]  # fmt: skip
    # As json.dumps writes it (columns read by json.loads) and as the plan writer does (by numpy).
    for exit_code, message, edited in cases:
        for separators in (None, (",", ": ")):
            bad.write_text(json.dumps(edited, separators=separators))
            code, _, err = invoke("apply", str(bad), "-o", str(tmp_path / "store"))
            assert code == exit_code, err
            assert err.splitlines() == [f"dengine: {bad}: {message}"]
            assert not (tmp_path / "store").exists()
    bad.write_text(json.dumps(doc, separators=(",", ": ")))
    assert apply(bad, tmp_path / "store")["vms"][0]["pages"] == 16


def test_a_plan_with_figures_no_json_has_is_refused_by_apply_and_report(tmp_path: Path) -> None:
    """Python's json reads ``Infinity`` and ``NaN``, which no JSON has and no dengine writes;
    ``report`` also took a plan of another page size as one of 4 KiB pages."""
    (dump,) = write_raw_images(tmp_path, design_vms(4, [16]))
    plan_file = plan([dump], tmp_path, "--dump-format", "raw")
    text = plan_file.read_text()
    doc = json.loads(text)
    bad = tmp_path / "bad.json"
    bad.write_text(text.replace('"savings_percent": ', '"savings_percent": Infinity, "was": ', 1))
    code, _, err = invoke("apply", str(bad), "-o", str(tmp_path / "store"))
    assert code == EXIT_BAD_DUMP, err
    assert err.splitlines() == [f"dengine: {bad}: not a JSON document: Infinity is not a JSON number"]
    code, _, err = invoke("report", "-o", str(tmp_path / "r.html"), str(bad))
    assert code == EXIT_BAD_DUMP, err
    assert err.splitlines()[-1] == (
        f"dengine: {bad}: at offset 0x0: expected a dengine plan file, "
        "found bad JSON (Infinity is not a JSON number)"
    )
    bad.write_text(json.dumps(dict(doc, page_size=8192)))
    code, _, err = invoke("report", "-o", str(tmp_path / "r.html"), str(bad))
    assert code == EXIT_UNSUPPORTED, err
    assert err.splitlines()[-1] == (
        f"dengine: {bad}: at offset 0x0: unsupported plan of page_size 8192 (pages are 4096 bytes)"
    )
    assert not (tmp_path / "store").exists() and not (tmp_path / "r.html").exists()
