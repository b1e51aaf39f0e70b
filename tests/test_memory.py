"""--memory-limit: past it, sorted pages and content ids wait in files, indexes are built a group
of dumps at a time, and the figures printed do not change by a byte; nothing is left behind, also
when the command is interrupted."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from dengine_cli.cli import cli
from dengine_cli.engine.sharing.pipeline import Shape
from dengine_cli.formats.base import OpenOptions
from dengine_cli.parallel import Workers
from dengine_cli.session import Session, Settings
from dengine_cli.session.memory import PARTITION_PAGES, plan_memory
from tests.commands import invoke_quiet
from tests.vms import design_vms, write_raw_images

RAW = OpenOptions(format="raw")
#: A directory that exists and that no file can be made in (procfs: every create fails).
NO_FILES_HERE = "/proc"


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Four VMs, 9,000 pages of which most are not zero: enough for several partitions."""
    folder = tmp_path_factory.mktemp("fleet")
    return write_raw_images(folder, design_vms(21, [2500, 2500, 2000, 2000], library=300))


def analyze_json(args: list[str]) -> str:
    result = CliRunner().invoke(cli, ["analyze", "--sharing-only", "--format", "json", *args])
    assert result.exit_code == 0, result.output
    return result.output


def test_spilled_json_is_the_same_byte_for_byte(tmp_path: Path, fleet: list[Path]) -> None:
    paths = [str(p) for p in fleet]
    plain = analyze_json(["--index-dir", str(tmp_path / "a"), *paths])
    limited = analyze_json(["--index-dir", str(tmp_path / "b"), "--memory-limit", "64K", *paths])
    one_job = analyze_json(["--index-dir", str(tmp_path / "c"), "--memory-limit", "64K", "-j", "1", *paths])
    assert limited == plain == one_job
    assert json.loads(plain)["total"]["pages_present"] == 9000
    for folder in ("a", "b", "c"):
        assert not list((tmp_path / folder).glob(".spill-*"))
        assert not list((tmp_path / folder).glob(".tmp-*"))


def test_a_small_limit_spills_and_cuts_partitions() -> None:
    small = plan_memory(64 << 10, total_pages=9000, nonzero_pages=8000, threads=2)
    assert small.spill_runs and small.ids_in_file and small.shape.bits >= 1
    roomy = plan_memory(1 << 30, total_pages=9000, nonzero_pages=8000, threads=2)
    assert not roomy.spill_runs and not roomy.ids_in_file and roomy.shape.bits == 0
    # Partitions stay small whatever the limit (cache-sized, and shared by the threads), also
    # for one thread.
    for threads in (1, 2):
        large = plan_memory(64 << 30, total_pages=1 << 26, nonzero_pages=1 << 25, threads=threads)
        assert (1 << 25) // large.shape.partitions <= PARTITION_PAGES


def test_runs_really_wait_in_files_while_sharing(tmp_path: Path, fleet: list[Path]) -> None:
    seen: list[int] = []
    spill = tmp_path / "spill"

    def progress(name: str, done: int, total: int) -> None:
        if name == "sharing":
            seen.append(sum(1 for _ in spill.glob(".spill-*/run-*")))

    settings = Settings(options=RAW, index_dir=tmp_path / "idx", tmp_dir=spill, memory_limit=64 << 10)
    with Session(fleet, settings, progress) as session:
        assert session.memory_plan().spill_runs
        spilled = session.sharing()
    assert seen and min(seen) >= len(fleet)
    assert not list(spill.glob(".spill-*"))
    roomy = Settings(options=RAW, index_dir=tmp_path / "idx2", workers=Workers(jobs=1))
    with Session(fleet, roomy) as session:
        assert session.sharing().to_dict() == spilled.to_dict()


def test_an_interrupt_while_sharing_leaves_nothing(tmp_path: Path, fleet: list[Path]) -> None:
    spill = tmp_path / "spill"
    index_dir = tmp_path / "idx"

    def interrupt(name: str, done: int, total: int) -> None:
        if name == "sharing":
            raise KeyboardInterrupt

    settings = Settings(options=RAW, index_dir=index_dir, tmp_dir=spill, memory_limit=64 << 10)
    with pytest.raises(KeyboardInterrupt), Session(fleet, settings, interrupt) as session:
        session.sharing()
    assert not list(spill.glob(".spill-*"))
    assert not list(index_dir.glob(".tmp-*"))
    assert not list(index_dir.glob("*.shr"))  # no sharing result was stored
    assert len(list(index_dir.glob("*.idx"))) == len(fleet)  # the indexes were complete


def test_indexes_built_a_group_at_a_time_equal_all_at_once(tmp_path: Path, fleet: list[Path]) -> None:
    small = Settings(options=RAW, index_dir=tmp_path / "a", memory_limit=64 << 10, workers=Workers(jobs=2))
    large = Settings(options=RAW, index_dir=tmp_path / "b", workers=Workers(jobs=1))
    with Session(fleet, small) as a, Session(fleet, large) as b:
        assert a._build().group_pages is not None and a._build().group_pages < 9000
        for x, y in zip(a.indexes(), b.indexes(), strict=True):
            assert np.array_equal(x.hashes, y.hashes) and np.array_equal(x.check, y.check)
            assert np.array_equal(x.zero, y.zero) and np.array_equal(x.gfns, y.gfns)
            # Read back from the cache file: mapped, not held in this process's memory.
            assert isinstance(x.hashes.base, np.memmap) or isinstance(x.hashes, np.memmap)


def test_shape_refuses_nonsense() -> None:
    with pytest.raises(ValueError):
        Shape(bits=17)
    with pytest.raises(ValueError):
        Shape(slice_pages=0)


def test_prune_removes_spills_left_by_a_killed_command_only(tmp_path: Path) -> None:
    from dengine_cli.cache.prune import prune_indexes
    from dengine_cli.cache.spill import SpilledRuns

    left = tmp_path / ".spill-left"
    left.mkdir()
    (left / "lock").touch()
    (left / "run-000000").write_bytes(b"x" * 100)
    with SpilledRuns(tmp_path) as running:
        _, removed, freed = prune_indexes(tmp_path)
        assert running.dir.exists()
    assert not left.exists()
    assert removed == 1 and freed == 100


def test_page_tables_leave_memory_past_a_quarter_of_the_limit(tmp_path: Path, fleet: list[Path]) -> None:
    from dengine_cli.policies import named_policy

    de = named_policy("de")
    plans = []
    # Indexes built in this session (groups of dumps kept open for the plan), then cached.
    for limit, index_dir in ((64 << 10, "small"), (64 << 10, "small"), (None, "roomy")):
        settings = Settings(
            options=RAW, index_dir=tmp_path / index_dir, tmp_dir=tmp_path / "tmp", memory_limit=limit
        )
        with Session(fleet, settings) as session:
            _, plan = session.plan(de)
            dumps = session.dumps()
            moved = [not d.gfns.flags.writeable and not d.offsets.flags.writeable for d in dumps]
            assert moved == [limit is not None] * len(fleet)
            plans.append(plan.to_dict())
        assert not list((tmp_path / "tmp").iterdir())  # unlinked files, gone with the session
    assert plans[0] == plans[1] == plans[2]


# --- apply ---------------------------------------------------------------------------------------


def _plan_file(tmp_path: Path, fleet: list[Path]) -> Path:
    plan_file = tmp_path / "plan.json"
    code, _, err = invoke_quiet("plan", "--baseline", "none", "--index-dir", str(tmp_path / "idx"),
                                "--dump-format", "raw", "-o", str(plan_file), *map(str, fleet))  # fmt: skip
    assert code == 0, err
    return plan_file


def _catalog_rows(store: Path) -> dict[str, list[tuple[object, ...]]]:
    """Every row of a store's catalog but what names the apply run (its id, time, plan path)
    and the pack rows (their headers hold the run id)."""
    import sqlite3

    db = sqlite3.connect(store / "catalog.sqlite")
    try:
        tables = ("vm", "frame", "chunk")
        rows = {t: db.execute(f"select * from {t} order by 1, 2").fetchall() for t in tables}
        rows["meta"] = db.execute(
            "select * from meta where key not in ('run', 'created', 'plan_file') order by key"
        ).fetchall()
    finally:
        db.close()
    return rows


def _pack_data(store: Path) -> list[bytes]:
    from dengine_cli.store.layout import PACK_HEADER

    return [p.read_bytes()[PACK_HEADER.size :] for p in sorted((store / "packs").iterdir())]


@pytest.mark.parametrize("pack", [False, True])
def test_apply_past_the_limit_holds_its_arrays_in_files_and_writes_the_same_store(
    tmp_path: Path, fleet: list[Path], pack: bool
) -> None:
    plan_file = _plan_file(tmp_path, fleet)
    (tmp_path / "tmp").mkdir()
    docs = {}
    small = ["--memory-limit", "1M", "--tmp-dir", str(tmp_path / "tmp")]
    limits = {"roomy": ["--memory-limit", "4G"], "small": small}
    for name, extra in limits.items():
        args = ["apply", "--format", "json", str(plan_file), "-o", str(tmp_path / name), *extra]
        code, out, err = invoke_quiet(*args, *(["--pack"] if pack else []))
        assert code == 0, err
        docs[name] = json.loads(out)
        assert not list((tmp_path / "tmp").iterdir())  # unlinked files, gone with the command
    assert (docs["roomy"]["arrays_in_files"], docs["small"]["arrays_in_files"]) == (False, True)
    for key in ("vms", "data_bytes", "objects", "frames", "frame_codecs"):
        assert docs["roomy"][key] == docs["small"][key], key
    assert _catalog_rows(tmp_path / "roomy") == _catalog_rows(tmp_path / "small")
    assert _pack_data(tmp_path / "roomy") == _pack_data(tmp_path / "small")
    code, out, err = invoke_quiet("verify", str(tmp_path / "small"))
    assert code == 0, err + out


def test_a_plan_read_past_the_limit_lives_in_mapped_files(tmp_path: Path, fleet: list[Path]) -> None:
    import mmap

    from dengine_cli.arrays import ArrayHome
    from dengine_cli.store.objects import ObjectPlan
    from dengine_cli.store.planread import read_plan

    plan_file = _plan_file(tmp_path, fleet)

    def mapped(a: np.ndarray) -> bool:  # type: ignore[type-arg]
        base = a
        while isinstance(base, np.ndarray) and base.base is not None:
            base = base.base
        return isinstance(base, memoryview) and isinstance(base.obj, mmap.mmap)

    in_memory = read_plan(plan_file)
    in_files = read_plan(plan_file, ArrayHome(tmp_path))
    for a, b in zip(in_memory.vms, in_files.vms, strict=True):
        for column in ("gfns", "actions", "ref_vm", "ref_gfn", "sizes"):
            x, y = getattr(a, column), getattr(b, column)
            assert x.dtype == y.dtype and np.array_equal(x, y), column
            assert not mapped(x) and mapped(y), column
    objects = ObjectPlan(in_files, ArrayHome(tmp_path))
    assert all(mapped(a) for a in [*objects.at_position, *objects.page_object, *objects.columns().values()])
    assert not list(tmp_path.glob("tmp*"))  # nothing named left in the directory


def test_apply_with_nowhere_to_hold_its_arrays_says_so_and_writes_nothing(
    tmp_path: Path, fleet: list[Path]
) -> None:
    from dengine_cli.errors import EXIT_OUTPUT

    plan_file = _plan_file(tmp_path, fleet)
    # A directory that exists but takes no file (procfs): found only when the arrays go there.
    limit = ["--memory-limit", "1M", "--tmp-dir", NO_FILES_HERE]
    code, _, err = invoke_quiet("apply", str(plan_file), "-o", str(tmp_path / "store"), *limit)
    assert code == EXIT_OUTPUT
    assert err.startswith(f"dengine: {NO_FILES_HERE}: cannot write: page arrays past the memory limit: ")
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "store").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["idx", "plan.json"]


@pytest.mark.parametrize("command", ["info", "analyze", "plan", "report", "apply"])
@pytest.mark.parametrize("where", ["missing", "under-a-file", "a-file"])
def test_a_tmp_dir_that_is_not_a_directory_is_refused_before_any_work(
    tmp_path: Path, fleet: list[Path], command: str, where: str
) -> None:
    from dengine_cli.errors import EXIT_USAGE

    a_file = tmp_path / "file"
    a_file.write_text("x")
    tmp_dir = {"missing": tmp_path / "no" / "such", "under-a-file": a_file / "tmp", "a-file": a_file}[where]
    out, raw = tmp_path / "out", ["--dump-format", "raw"]
    args = {
        "info": ["info", *raw, str(fleet[0])],
        "analyze": ["analyze", *raw, "--index-dir", str(tmp_path / "idx"), str(fleet[0])],
        "plan": ["plan", *raw, "--index-dir", str(tmp_path / "idx"), "-o", str(out), str(fleet[0])],
        "report": ["report", *raw, "--index-dir", str(tmp_path / "idx"), "-o", str(out), str(fleet[0])],
        "apply": ["apply", str(tmp_path / "plan.json"), "-o", str(out)],  # refused before it is read
    }[command]
    code, stdout, err = invoke_quiet(*args, "--tmp-dir", str(tmp_dir))
    assert code == EXIT_USAGE, err
    what = "is a file" if where == "a-file" else "does not exist"
    assert f"Invalid value for '--tmp-dir': Directory '{tmp_dir}' {what}" in err
    assert len(err.strip().splitlines()) == 1 and stdout == ""
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]  # no index, no output, no directory


def test_apply_past_the_limit_into_a_store_whose_parents_it_makes(tmp_path: Path, fleet: list[Path]) -> None:
    # The arrays go beside the store by default: the nearest directory that exists, as the
    # store's own parents are made by apply.
    plan_file = _plan_file(tmp_path, fleet)
    store = tmp_path / "new" / "deeper" / "store"
    code, out, err = invoke_quiet(
        "apply", "--format", "json", str(plan_file), "-o", str(store), "--memory-limit", "1M"
    )
    assert code == 0, err
    assert json.loads(out)["arrays_in_files"] is True
    assert sorted(p.name for p in (tmp_path / "new" / "deeper").iterdir()) == ["store"]


def test_a_plan_file_on_a_pipe_is_read_whole(tmp_path: Path, fleet: list[Path]) -> None:
    # The plan file is mapped when it can be; a pipe (`apply <(zstdcat plan.json.zst)`) cannot.
    import os
    import threading

    from dengine_cli.store.planread import read_plan

    plan_file = _plan_file(tmp_path, fleet[:1])
    fifo = tmp_path / "plan.fifo"
    os.mkfifo(fifo)
    writer = threading.Thread(target=lambda: fifo.write_bytes(plan_file.read_bytes()))
    writer.start()
    try:
        piped = read_plan(fifo)
    finally:
        writer.join()
    mapped = read_plan(plan_file)
    assert [vm.gfns.tolist() for vm in piped.vms] == [vm.gfns.tolist() for vm in mapped.vms]
    assert [vm.actions.tolist() for vm in piped.vms] == [vm.actions.tolist() for vm in mapped.vms]


@pytest.fixture(scope="module")
def mixed_fleet(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Three VMs of similar, text, duplicate, zero and random pages: patches and compression."""
    from tests.vms import mixed_vms

    return write_raw_images(tmp_path_factory.mktemp("mixed"), mixed_vms(5, [700, 600, 500]))


def _is_mapped(a: np.ndarray) -> bool:  # type: ignore[type-arg]
    import mmap

    base = a
    while isinstance(base, np.ndarray) and base.base is not None:
        base = base.base
    return isinstance(base, memoryview) and isinstance(base.obj, mmap.mmap)


@pytest.mark.parametrize(
    "extra", [[], ["--host-memory", "1M"], ["--baseline", "none", "--policy", "esx"], ["--sample", "0.2"]]
)
def test_a_plan_past_the_limit_prints_and_writes_the_same(
    tmp_path: Path, mixed_fleet: list[Path], extra: list[str]
) -> None:
    paths = [str(p) for p in mixed_fleet]
    (tmp_path / "tmp").mkdir()
    runs = {}
    for name, limit in {
        "roomy": [],
        "small": ["--memory-limit", "64K", "--tmp-dir", str(tmp_path / "tmp")],
    }.items():
        out_file = tmp_path / f"{name}.json"
        args = ["plan", "--format", "json", "--dump-format", "raw", "--index-dir", str(tmp_path / name)]
        written = [] if "--sample" in extra else ["-o", str(out_file)]  # a plan file is exact
        code, out, err = invoke_quiet(*args, *limit, *extra, *written, *paths)
        assert code == 0, err
        runs[name] = (out, out_file.read_bytes() if written else b"")
        assert not list((tmp_path / "tmp").iterdir())  # unlinked files, gone with the command
    assert runs["roomy"] == runs["small"]
    doc = json.loads(runs["small"][0])
    if not extra:
        assert doc["total"]["patched_pages"] > 0 and doc["total"]["compressed_pages"] > 0
    if "--host-memory" in extra:
        assert doc["total"]["paged_out_pages"] > 0
    if "--sample" in extra:
        assert "savings_interval_percent" in doc["total"]


def test_a_plan_past_the_limit_keeps_its_page_arrays_in_mapped_files(
    tmp_path: Path, mixed_fleet: list[Path]
) -> None:
    from dengine_cli.policies import resolve_policy

    de = resolve_policy("de")
    reports = {}
    for name, limit in {"roomy": None, "small": 64 << 10}.items():
        settings = Settings(
            options=RAW, index_dir=tmp_path / name, memory_limit=limit, tmp_dir=tmp_path / "t"
        )
        with Session(mixed_fleet, settings) as session:
            _, reports[name] = session.plan(de, baseline=resolve_policy("ksm"))
            assert session.plan_home().in_files is (name == "small")
    for roomy, small in zip(reports["roomy"].pages, reports["small"].pages, strict=True):
        for column in ("actions", "sizes", "patch_positions", "patch_ref_vm", "patch_ref_pos"):
            x, y = getattr(roomy, column), getattr(small, column)
            assert x.dtype == y.dtype and np.array_equal(x, y), column
        assert _is_mapped(small.actions) and _is_mapped(small.sizes)
        assert not _is_mapped(roomy.actions)
    assert reports["roomy"].total == reports["small"].total
    assert reports["roomy"].baseline is not None and reports["small"].baseline is not None
    assert reports["roomy"].baseline.total == reports["small"].baseline.total
    assert not list((tmp_path / "t").iterdir())


def test_a_plan_with_nowhere_to_hold_its_arrays_says_so_and_writes_nothing(
    tmp_path: Path, mixed_fleet: list[Path]
) -> None:
    from dengine_cli.errors import EXIT_OUTPUT

    out_file = tmp_path / "plan.json"
    limit = ["--memory-limit", "64K", "--tmp-dir", NO_FILES_HERE]
    code, out, err = invoke_quiet(
        "plan", "--dump-format", "raw", "--index-dir", str(tmp_path / "idx"), *limit, "-o", str(out_file),
        *map(str, mixed_fleet),
    )  # fmt: skip
    assert code == EXIT_OUTPUT, err
    assert err.startswith(f"dengine: {NO_FILES_HERE}: cannot write: ") and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
    assert not out_file.exists() and out == ""


def test_a_plan_worked_through_in_small_steps_is_the_same(tmp_path: Path, mixed_fleet: list[Path]) -> None:
    # Steps of a few pages: scope chunks, several key ranges per similarity index, compression
    # measured a few pages at a time, actions marked in pieces.
    from dengine_cli.arrays import ArrayHome
    from dengine_cli.engine.plan import plan_dumps
    from dengine_cli.engine.plan.choice import pair_partitions
    from dengine_cli.policies import resolve_policy

    de, ksm = resolve_policy("de"), resolve_policy("ksm")
    small = ArrayHome(tmp_path, work_bytes=3000, least_step=1)
    assert pair_partitions(1500, small) >= 64
    with Session(mixed_fleet, Settings(options=RAW, index_dir=tmp_path / "idx")) as session:
        indexes = session.indexes(keep_open=True)
        dumps, sharing = session.dumps(), session.sharing()
        plans = [
            plan_dumps(dumps, indexes, sharing, de, baseline=ksm, host_memory=1 << 20, home=home)
            for home in (None, small)
        ]
    roomy, stepped = plans
    assert roomy.total == stepped.total and roomy.host == stepped.host
    assert roomy.total.patched > 0 and roomy.total.compressed > 0 and roomy.total.paged_out > 0
    for a, b in zip(roomy.pages, stepped.pages, strict=True):
        assert np.array_equal(a.actions, b.actions) and np.array_equal(a.sizes, b.sizes)
        assert np.array_equal(a.patch_ref_pos, b.patch_ref_pos)
