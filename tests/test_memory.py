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
from tests.vms import design_vms, write_raw_images

RAW = OpenOptions(format="raw")


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
