"""A damaged store: a flipped byte, a truncated or missing pack, a missing reference, a catalog row
pointing outside a pack are each reported by `dengine verify` (which VM, which gfn; exit 7), and
`dengine restore` refuses rather than write a wrong image."""

from __future__ import annotations

import json
import shutil
import sqlite3
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from dengine_cli.cli import FRAME_CODEC_NAMES
from dengine_cli.errors import EXIT_DAMAGED, EXIT_UNREADABLE
from dengine_cli.store.catalog import decode_columns, encode_columns
from dengine_cli.store.frames import FRAME_CODECS
from dengine_cli.store.layout import OBJECT_COLUMNS, PAGE_COLUMNS, signed
from dengine_cli.store.reader import StoreReader
from tests.commands import invoke_quiet as invoke


def fixture_store(real_dump: Callable[[str], Path], tmp: Path, pack: bool) -> Path:
    """A store of the two fixture guests (beta's patches refer to alpha's pages) under ``tmp``."""
    plan = tmp / "plan.json"
    dumps = [str(real_dump("alpha.elf")), str(real_dump("beta.elf"))]
    code, _, err = invoke(
        "plan", "--baseline", "none", "--index-dir", str(tmp / "idx"), "-o", str(plan), *dumps
    )
    assert code == 0, err
    store = tmp / "store"
    code, _, err = invoke("apply", str(plan), "-o", str(store), *(["--pack"] if pack else []))
    assert code == 0, err
    return store


@pytest.fixture(scope="module", params=[False, True], ids=["store", "pack"])
def pristine(request: pytest.FixtureRequest, real_dump: Callable[[str], Path],
             tmp_path_factory: pytest.TempPathFactory) -> Path:  # fmt: skip
    return fixture_store(real_dump, tmp_path_factory.mktemp("pristine"), request.param)


@pytest.fixture
def store(pristine: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "store"
    shutil.copytree(pristine, copy)
    return copy


def verify(store: Path) -> dict:  # type: ignore[type-arg]
    code, out, err = invoke("verify", "--json", str(store))
    doc: dict = json.loads(out)  # type: ignore[type-arg]
    assert (code == 0) == doc["ok"], err
    if code:
        assert code == EXIT_DAMAGED
        assert err == f"dengine: {store}: damaged store: {len(doc['problems'])} problem(s) found\n"
    return doc


def the_pack(store: Path) -> Path:
    (pack,) = (store / "packs").iterdir()
    return pack


def where_pages(store: Path, vm: int) -> tuple[np.ndarray, np.ndarray, dict]:  # type: ignore[type-arg]
    r = StoreReader(store)
    gfns, objs = r.page_map(r.vms[vm])
    return gfns, objs, r.objects


def restore_refuses(store: Path, tmp_path: Path, vm: str, expect: str) -> None:
    out = tmp_path / "out.raw"
    code, _, err = invoke("restore", str(store), vm, "-o", str(out))
    assert code == EXIT_DAMAGED, err
    assert expect in err, err
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".out.raw")] == []


def test_pristine_store_verifies(pristine: Path) -> None:
    assert verify(pristine)["ok"]


def test_a_flipped_byte_names_the_vm_and_gfn(store: Path, tmp_path: Path) -> None:
    gfns, objs, o = where_pages(store, 1)
    # The last non-zero page of beta (its own object, not a page shared with alpha).
    k = int(np.flatnonzero(objs >= objs[objs >= 0].max())[0])
    obj = int(objs[k])
    pack = the_pack(store)
    data = bytearray(pack.read_bytes())
    at = int(o["offset"][obj]) if o["codec"][obj] < 0xF0 else len(data) - 100
    data[at + 3] ^= 0x40
    pack.write_bytes(bytes(data))
    doc = verify(store)
    assert not doc["ok"]
    assert any("checksum mismatch" in p["problem"] for p in doc["problems"])
    hurt = [p for p in doc["problems"] if p["pages"]]
    assert hurt, doc
    named = {g for p in hurt for g in p["pages"].get(str(StoreReader(store).vms[1].name), [])}
    if o["codec"][obj] < 0xF0:
        assert f"{int(gfns[k]):#x}" in named
    restore_refuses(store, tmp_path, "1", "damaged store: VM ")
    # Every VM into a directory: alpha restores whole, then beta fails; nothing this run made is
    # left (a directory it made is removed; one that was there keeps only what it held).
    code, _, err = invoke("restore", str(store), "-o", str(tmp_path / "images"))
    assert code == EXIT_DAMAGED, err
    assert not (tmp_path / "images").exists()
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("mine")
    code, _, err = invoke("restore", str(store), "-o", str(tmp_path / "mine"))
    assert code == EXIT_DAMAGED, err
    assert [p.name for p in (tmp_path / "mine").iterdir()] == ["notes.txt"]


def test_a_truncated_pack(store: Path, tmp_path: Path) -> None:
    pack = the_pack(store)
    size = pack.stat().st_size
    with pack.open("r+b") as f:
        f.truncate(size // 2)
    doc = verify(store)
    problems = [p["problem"] for p in doc["problems"]]
    assert any(f"truncated: {size // 2:#x} bytes, {size:#x} were written" in p for p in problems), problems
    assert any("lie beyond its end" in p for p in problems), problems
    assert any(p["pages"] for p in doc["problems"])
    restore_refuses(store, tmp_path, "alpha.elf", "beyond its end")


def test_a_missing_pack(store: Path, tmp_path: Path) -> None:
    the_pack(store).unlink()
    doc = verify(store)
    assert any("cannot be read: No such file or directory" in p["problem"] for p in doc["problems"])
    restore_refuses(store, tmp_path, "beta.elf", "cannot be read")


def rewrite_objects(store: Path, change: Callable[[dict], None]) -> None:  # type: ignore[type-arg]
    """Change the object columns in the catalog, with a correct chunk checksum (a catalog that
    lies consistently: only the data checks can catch it)."""
    db = sqlite3.connect(store / "catalog.sqlite")
    seq, count, data = db.execute(
        "SELECT seq, count, data FROM chunk WHERE tab = 'objects' ORDER BY seq"
    ).fetchone()
    cols, _ = decode_columns(data, count, OBJECT_COLUMNS)
    cols = {k: v.copy() for k, v in cols.items()}
    change(cols)
    blob, checksum = encode_columns(cols, OBJECT_COLUMNS)
    db.execute(
        "UPDATE chunk SET data = ?, checksum = ? WHERE tab = 'objects' AND seq = ?",
        (blob, signed(checksum), seq),
    )
    db.commit()
    db.close()


def test_a_row_pointing_outside_its_pack(store: Path, tmp_path: Path) -> None:
    """An object's row (a frame's, in a packed store) placing its bytes past the pack's end."""
    gfns, objs, o = where_pages(store, 0)
    obj = int(objs[objs >= 0][len(objs) // 3])
    if o["codec"][obj] >= 0xF0:
        frame = int(o["where"][obj])
        db = sqlite3.connect(store / "catalog.sqlite")
        db.execute('UPDATE frame SET "offset" = ? WHERE frame = ?', (1 << 40, frame))
        db.commit()
        db.close()
        users = np.flatnonzero(np.isin(o["where"], [frame]) & (o["codec"] >= 0xF0))
    else:

        def outside(cols: dict) -> None:  # type: ignore[type-arg]
            cols["offset"][obj] = 1 << 40

        rewrite_objects(store, outside)
        users = np.array([obj])
    doc = verify(store)
    assert any("lie beyond its end" in p["problem"] for p in doc["problems"]), doc
    named = {g for p in doc["problems"] for g in p["pages"].get(StoreReader(store).vms[0].name, [])}
    assert {f"{int(g):#x}" for g in gfns[np.isin(objs, users)]} <= named
    restore_refuses(store, tmp_path, "0", "lie beyond its end")


def test_a_missing_reference(store: Path, tmp_path: Path) -> None:
    _, _, o = where_pages(store, 1)
    patched = np.flatnonzero(o["reference"] >= 0)
    obj = int(patched[-1])

    def dangling(cols: dict) -> None:  # type: ignore[type-arg]
        cols["reference"][obj] = 10**9

    rewrite_objects(store, dangling)
    doc = verify(store)
    hurt = [p for p in doc["problems"] if f"object {obj}:" in p["problem"]]
    assert hurt and "its reference object 1000000000: no such object" in hurt[0]["problem"], doc
    assert any(hurt[0]["pages"].values())


def test_a_page_map_naming_a_missing_object(store: Path) -> None:
    db = sqlite3.connect(store / "catalog.sqlite")
    count, data = db.execute("SELECT count, data FROM chunk WHERE tab = 'pages' AND vm = 1").fetchone()
    cols, _ = decode_columns(data, count, PAGE_COLUMNS)
    cols = {k: v.copy() for k, v in cols.items()}
    cols["object"][3] = 10**7
    blob, checksum = encode_columns(cols, PAGE_COLUMNS)
    db.execute(
        "UPDATE chunk SET data = ?, checksum = ? WHERE tab = 'pages' AND vm = 1", (blob, signed(checksum))
    )
    db.commit()
    db.close()
    doc = verify(store)
    hurt = [p for p in doc["problems"] if "names objects the store does not have" in p["problem"]]
    assert hurt and list(hurt[0]["pages"].values()) == [[f"{int(cols['gfn'][3]):#x}"]]


def test_a_damaged_catalog_chunk(store: Path, tmp_path: Path) -> None:
    db = sqlite3.connect(store / "catalog.sqlite")
    db.execute("UPDATE chunk SET checksum = checksum + 1 WHERE tab = 'pages' AND vm = 0")
    db.commit()
    db.close()
    doc = verify(store)
    assert any("pages chunk 0 of VM 0: checksum mismatch" in p["problem"] for p in doc["problems"])
    restore_refuses(store, tmp_path, "0", "checksum mismatch")


def test_a_flipped_byte_in_a_vm_row(store: Path, tmp_path: Path) -> None:
    """A VM row's JSON (its dump's identity) damaged in the catalog file, which SQLite does not
    checksum: verify and restore say which row (exit 7), not an internal error."""
    catalog = store / "catalog.sqlite"
    data = bytearray(catalog.read_bytes())
    at = data.index(b'"ino": ')
    data[at + len('"ino"')] = ord(";")
    catalog.write_bytes(bytes(data))
    code, out, err = invoke("verify", str(store))
    assert code == EXIT_DAMAGED and out == ""
    assert err.startswith(f"dengine: {store}: damaged store: catalog.sqlite: vm row ")
    assert "does not decode: Expecting ':' delimiter" in err and len(err.splitlines()) == 1
    restore_refuses(store, tmp_path, "0", "does not decode")


@pytest.mark.parametrize("name", ["/etc/passwd", "../plan.json", "x.pack"])
def test_a_pack_row_naming_a_file_outside_packs_is_damage(store: Path, tmp_path: Path, name: str) -> None:
    """A catalog whose pack row names another file (an absolute path, '..'): the reader opened
    it (then refused its header); a store names only files of packs/ as the apply wrote them."""
    db = sqlite3.connect(store / "catalog.sqlite")
    db.execute("UPDATE pack SET file = ? WHERE pack = 0", (name,))
    db.commit()
    db.close()
    code, out, err = invoke("verify", str(store))
    assert code == EXIT_DAMAGED and out == ""
    assert err.splitlines() == [
        f"dengine: {store}: damaged store: catalog.sqlite: pack row 0 names {name!r}, not a file of packs/"
    ]
    restore_refuses(store, tmp_path, "0", "not a file of packs/")


def test_two_vms_of_one_name_are_restored_by_number_only(store: Path, tmp_path: Path) -> None:
    db = sqlite3.connect(store / "catalog.sqlite")
    (first,) = db.execute("SELECT name FROM vm WHERE vm = 0").fetchone()
    db.execute("UPDATE vm SET name = ? WHERE vm = 1", (first,))
    # As a plan edited by hand stores it: the plan's head (kept in meta) names both VMs alike too.
    (head,) = db.execute("SELECT value FROM meta WHERE key = 'plan'").fetchone()
    plan_head = json.loads(head)
    plan_head["vms"][1]["name"] = first
    db.execute("UPDATE meta SET value = ? WHERE key = 'plan'", (json.dumps(plan_head),))
    db.commit()
    db.close()
    code, _, err = invoke("restore", str(store), first, "-o", str(tmp_path / "x.raw"))
    assert code == 2 and f"more than one VM is called {first!r}: give its number" in err, err
    assert len(err.splitlines()) == 1 and not (tmp_path / "x.raw").exists()
    code, _, err = invoke("restore", str(store), "1", "-o", str(tmp_path / "x.raw"))
    assert code == 0, err


def edit_catalog(store: Path, sql: str) -> None:
    db = sqlite3.connect(store / "catalog.sqlite")
    db.execute(sql)
    db.commit()
    db.close()


@pytest.mark.parametrize(
    ("sql", "expected"),
    [
        ("UPDATE vm SET pages = pages + 1 WHERE vm = 1",
         ["VM {1}: its row says {p1+1} pages present, its ranges hold {p1}"]),
        ("UPDATE vm SET zero_pages = 0 WHERE vm = 0",
         ["VM {0}: its row says 0 zero pages, its ranges and page map {z0} ({p0} present, {p0-z0} listed)"]),
        ("DELETE FROM vm WHERE vm = 1",
         ["VM {1}: VM 1 of the plan the store was applied from has no row in the catalog"]),
        ("DELETE FROM vm WHERE vm = 0",
         ["VM {1}: numbered 1 in row 0 of the vm table (VMs are numbered 0..0)",
          "VM {0}: VM 0 of the plan the store was applied from has no row in the catalog"]),
        ("UPDATE vm SET name = 'gamma' WHERE vm = 1",
         ["VM gamma: VM 1 of the plan the store was applied from is {1!r}"]),
    ],
    ids=["pages", "zero-pages", "last-row-lost", "first-row-lost", "renamed"],
)  # fmt: skip
def test_a_vm_table_that_lies_about_its_vms(
    store: Path, tmp_path: Path, sql: str, expected: list[str]
) -> None:
    """The counts of the vm table are checked against the VM's ranges and page map, and its rows
    against the plan's head: each lie is a problem naming the VM (exit 7).  Restore relies on the
    rows (VM by number, every VM, the pages it says it wrote): it refuses such a store; it does
    not use the zero page count (a store whose row lies only about that restores right)."""
    vms = StoreReader(store).vms
    names = {str(k): vm.name for k, vm in enumerate(vms)}
    counts = {"p0": vms[0].pages, "p1": vms[1].pages, "z0": vms[0].zero_pages, "p1+1": vms[1].pages + 1,
              "p0-z0": vms[0].pages - vms[0].zero_pages}  # fmt: skip
    assert counts["z0"] > 0  # the fixture guests have zero pages: what the zero-pages case is about
    edit_catalog(store, sql)
    doc = verify(store)
    want = [e.format(*names.values(), **counts) for e in expected]
    assert [p["problem"] for p in doc["problems"]] == want, doc
    if "zero_pages" in sql:
        code, _, err = invoke("restore", str(store), "0", "-o", str(tmp_path / "x.raw"))
        assert code == 0, err
        return
    # By number, by the name of a VM it has, and by the name of every VM of the plan (one whose
    # row was lost is not "no VM called ...", a usage error: the store is damaged).
    for vm in ("0", StoreReader(store).vms[0].name, *names.values()):
        restore_refuses(store, tmp_path, vm, f"damaged store: {want[0]}")
    code, _, err = invoke("restore", str(store), "-o", str(tmp_path / "all"))
    assert code == EXIT_DAMAGED and err.splitlines() == [f"dengine: {store}: damaged store: {want[0]}"]
    assert not (tmp_path / "all").exists()


@pytest.mark.parametrize(
    ("damage", "code", "message"),
    [
        ("missing", EXIT_UNREADABLE,
         "{store}: cannot read: not a complete dengine store (no catalog.sqlite)"),
        ("not-sqlite", EXIT_DAMAGED, "{store}: damaged store: catalog.sqlite: file is not a database"),
        ("chunk", EXIT_DAMAGED, "{store}: damaged store: catalog.sqlite: objects chunk 0: checksum mismatch"),
    ],
)  # fmt: skip
def test_verify_json_when_the_catalog_cannot_be_read(
    store: Path, damage: str, code: int, message: str
) -> None:
    """`verify --json` prints a JSON document even when it cannot read the catalog (for a script
    piping it into jq): not ok, the one problem it stopped at; the same line on stderr and the
    same exit status as without --json."""
    catalog = store / "catalog.sqlite"
    if damage == "missing":
        catalog.unlink()
    elif damage == "not-sqlite":
        catalog.write_bytes(b"not a database at all" * 100)
    else:
        edit_catalog(store, "UPDATE chunk SET checksum = checksum + 1 WHERE tab = 'objects'")
    line = message.format(store=store)
    found, out, err = invoke("verify", "--json", str(store))
    assert (found, err.splitlines()) == (code, [f"dengine: {line}"])
    assert json.loads(out) == {
        "schema": "dengine.verify/1", "store": str(store), "ok": False, "vms": [], "objects": 0, "packs": 0,
        "frames": 0, "problems": [{"problem": line, "pages": {}}], "notes": [],
    }  # fmt: skip
    assert invoke("verify", str(store)) == (code, "", err)


def test_a_catalog_that_is_not_sqlite(store: Path) -> None:
    (store / "catalog.sqlite").write_bytes(b"not a database at all" * 100)
    code, _, err = invoke("verify", str(store))
    assert code == EXIT_DAMAGED and "damaged store: catalog.sqlite" in err


def test_cli_lists_the_frame_codecs() -> None:
    assert FRAME_CODEC_NAMES == FRAME_CODECS


@pytest.fixture(scope="module")
def packed(real_dump: Callable[[str], Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A packed store of its own (the damaged-frame test needs frames, whatever ``pristine`` is)."""
    return fixture_store(real_dump, tmp_path_factory.mktemp("packed"), pack=True)


def test_a_damaged_frame_is_one_problem_naming_every_page_it_hurts(packed: Path, tmp_path: Path) -> None:
    """A flipped byte in a frame is one problem (with the patches against its pages counted in
    it), not one per patch, and it lists every page whose content comes from that frame."""
    r = StoreReader(packed)
    store = tmp_path / "store"
    shutil.copytree(packed, store)
    o = r.objects
    in_frame = np.flatnonzero((o["codec"] == 0xF0) & (o["where"] == 0))
    patched = np.flatnonzero(np.isin(o["reference"], in_frame))
    victims = set(in_frame.tolist()) | set(patched.tolist())
    expected = 0
    for vm in r.vms:
        _, objs = r.page_map(vm)
        expected += int(np.isin(objs, list(victims)).sum())
    pack = the_pack(store)
    data = bytearray(pack.read_bytes())
    data[int(r.frames["offset"][0]) + 10] ^= 0x20
    pack.write_bytes(bytes(data))
    doc = verify(store)
    objects = [p for p in doc["problems"] if p["problem"].startswith("object ")]
    assert len(objects) == 1, doc
    (problem,) = objects
    assert "frame 0" in problem["problem"]
    assert len(patched)  # the fixture guests share and patch: what this test is about
    assert f"and {len(patched)} patched against them" in problem["problem"]
    assert sum(len(g) for g in problem["pages"].values()) == expected


def test_a_damaged_frame_is_found_alike_by_any_number_of_threads(packed: Path, tmp_path: Path) -> None:
    """Frames are decoded a few at a time by as many threads as `-j` gives: a frame that fails
    among them fails again, alone, with the object that needs it named, so `verify` and `restore`
    report the same damage whatever `-j` is."""
    store = tmp_path / "store"
    shutil.copytree(packed, store)
    r = StoreReader(packed)
    assert len(r.frames["frame"]) >= 3  # frames decoded together: what this test is about
    pack = the_pack(store)
    data = bytearray(pack.read_bytes())
    data[int(r.frames["offset"][1]) + 10] ^= 0x20
    pack.write_bytes(bytes(data))
    found = []
    for jobs in ("1", "3"):
        code, out, err = invoke("verify", "--json", "-j", jobs, str(store))
        assert code == EXIT_DAMAGED, err
        (bad,) = [p for p in json.loads(out)["problems"] if p["problem"].startswith("object ")]
        assert "frame 1 (pack 0 at " in bad["problem"] and "checksum mismatch" in bad["problem"]
        assert bad["pages"], bad
        found.append(bad)
        code, _, err = invoke("restore", "-j", jobs, str(store), "-o", str(tmp_path / "all"))
        assert code == EXIT_DAMAGED and "frame 1 (pack 0 at " in err, err
        assert not (tmp_path / "all").exists()  # the directory it made for the images, removed
    assert found[0] == found[1]


def test_a_framed_page_whose_checksum_is_wrong(packed: Path, tmp_path: Path) -> None:
    """Whole pages in frames are copied and checked a frame at a time; one whose checksum does
    not match (its frame intact) is still reported on its own, by VM and gfn, and `restore`
    refuses its VM, while the other pages of its frame pass."""
    store = tmp_path / "store"
    shutil.copytree(packed, store)
    gfns, objs, o = where_pages(store, 0)
    mine = np.flatnonzero(o["codec"][np.maximum(objs, 0)] == 0xF0)  # VM 0's pages in frames
    assert len(mine) > 2
    obj = int(objs[mine[len(mine) // 2]])

    def wrong(cols: dict) -> None:  # type: ignore[type-arg]
        cols["checksum"][obj] ^= 1

    rewrite_objects(store, wrong)
    doc = verify(store)
    hurt = [p for p in doc["problems"] if p["problem"].startswith(f"object {obj}:")]
    assert len(hurt) == 1, doc
    assert "checksum mismatch: its page does not decode to what was stored" in hurt[0]["problem"]
    name = StoreReader(store).vms[0].name
    assert f"{int(gfns[objs == obj][0]):#x}" in hurt[0]["pages"][name]
    # No other object is reported (the other pages of its frame pass).
    others = [p for p in doc["problems"] if p["problem"].startswith("object ") and p is not hurt[0]]
    assert others == [], others
    restore_refuses(store, tmp_path, "0", f"object {obj}: checksum mismatch")


@pytest.mark.parametrize("which", ["delta", "reference"])
def test_a_framed_patch_whose_page_or_reference_checksum_is_wrong(
    packed: Path, tmp_path: Path, which: str
) -> None:
    """Patched pages in frames (XOR deltas against whole pages in frames) are rebuilt and checked
    a pair of frames at a time; one whose own checksum, or its reference's, does not match is
    still reported on its own, by VM and gfn, and `restore` refuses its VM, while the other
    patches of those frames pass."""
    store = tmp_path / "store"
    shutil.copytree(packed, store)
    r = StoreReader(store)
    # A VM with framed patches against pages it does not hold itself (beta's against alpha's):
    # then only the check of the reference made while rebuilding its patches can refuse it.
    o = r.objects
    v, obj = -1, -1
    for k in range(len(r.vms)):
        mine = where_pages(store, k)[1]
        foreign = mine[(o["codec"][mine] == 0xF1) & ~np.isin(o["reference"][mine], mine)]
        if len(foreign) > 2:
            v, obj = k, int(foreign[len(foreign) // 2])
            break
    assert v >= 0, "no VM of the fixtures patches against another VM's pages"
    gfns, objs, o = where_pages(store, v)
    ref = int(o["reference"][obj])
    assert o["codec"][ref] == 0xF0  # a whole page in a frame: the path this test is about
    hurt_obj = obj if which == "delta" else ref

    def wrong(cols: dict) -> None:  # type: ignore[type-arg]
        cols["checksum"][hurt_obj] ^= 1

    rewrite_objects(store, wrong)
    doc = verify(store)
    hurt = [p for p in doc["problems"] if p["problem"].startswith("object ")]
    assert len(hurt) == 1, hurt  # the other patches of the same frames pass
    assert hurt[0]["problem"].startswith(f"object {hurt_obj}: checksum mismatch"), hurt
    # The patched page is among the pages it hurts, by VM and gfn.
    assert f"{int(gfns[objs == obj][0]):#x}" in hurt[0]["pages"][r.vms[v].name]
    restore_refuses(store, tmp_path, str(v), "checksum mismatch")
