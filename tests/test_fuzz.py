"""The fuzz harness (tests/fuzz/): its seeds are valid dumps, its judge catches each kind of
failure, and a deterministic slice of the campaign passes (the CI slice of
``python -m tests.fuzz --cases 10000 --seed 0``)."""

from __future__ import annotations

import random
import signal
from pathlib import Path

import pytest

from tests.fuzz.campaign import COMMANDS, run_campaign, select_seeds
from tests.fuzz.layout import Field
from tests.fuzz.mutate import boundaries, mutate
from tests.fuzz.runner import Limits, Outcome, Task, judge, preload, prepare, run_tasks
from tests.fuzz.seeds import all_seeds, wrap

#: The CI slice: this many cases of campaign seed 0, one command each (in turn), two at a time.
CI_CASES = 240
#: Generous bounds: a case takes ~0.05 s of CPU; under load it may take 10x that and must pass.
CI_LIMITS = Limits(cpu_seconds=60, wall_seconds=300.0)


@pytest.fixture(scope="module", autouse=True)
def _preloaded() -> None:
    preload()


def test_every_format_has_seeds_and_every_seed_is_a_valid_dump(tmp_path: Path) -> None:
    seeds = all_seeds()
    formats = {s.format for s in seeds}
    assert {"elf", "kdump", "xc-core", "qemu-stream", "libvirt-save", "lime", "raw", "container"} <= formats
    assert {s.name for s in seeds} >= {"fixture-alpha.elf", "fixture-alpha.kdump", "fixture-alpha.qevm"}
    tasks = []
    for k, s in enumerate(seeds):
        root = tmp_path / s.name
        (root / "input").mkdir(parents=True)
        name = f"seed{s.suffix}"
        (root / "input" / name).write_bytes(wrap(s.wrap, s.data) if s.wrap else s.data)
        argv = ["-q", "info", "--json", str(root / "input" / name), "--tmp-dir", str(root / "tmp")]
        tasks.append(Task(k, "info", argv, root, [name], json_stdout=True))
    outcomes = list(run_tasks(iter(tasks), 2, CI_LIMITS))
    bad = [
        (o.task.root.name, o.label, o.problems, o.stderr[-200:]) for o in outcomes if o.code != 0 or not o.ok
    ]
    assert bad == []
    for s in seeds:
        assert len(s.data) <= 512 << 10 or s.name == "qevm-mapped-ram", f"{s.name} is not small"


def test_mutations_are_deterministic_and_change_the_seed() -> None:
    for s in select_seeds(None):
        a = mutate(s, random.Random("x"))
        b = mutate(s, random.Random("x"))
        assert a.data == b.data and a.steps == b.steps
        assert a.steps


def test_boundaries_fit_the_field() -> None:
    f = Field(0, 2, "<", "e_phnum")
    values = boundaries(f, 1 << 20, 5)
    assert all(0 <= v <= 0xFFFF for v in values)
    assert {0, 1, 0xFFFF, 0x7FFF, 0x8000, 6, 4} <= set(values)


def _outcome(tmp_path: Path, code: int | None, stderr: bytes, **kw: object) -> Outcome:
    task = Task(0, "info", [], tmp_path, [])
    prepare(task)
    (tmp_path / "input").mkdir(exist_ok=True)
    o = Outcome(task, code, kw.pop("sig", None), 0.1, 0.1, 0, b"", stderr)  # type: ignore[arg-type]
    judge(o, 0, Limits())
    return o


def test_judge_passes_a_documented_error_and_fails_everything_else(tmp_path: Path) -> None:
    assert _outcome(tmp_path / "a", 4, b"dengine: x: at offset 0x0: expected y, found z\n").ok
    assert _outcome(tmp_path / "b", 0, b"").ok
    assert "internal error (exit 1)" in _outcome(tmp_path / "c", 1, b"dengine: internal error: X\n").problems
    two = _outcome(tmp_path / "d", 4, b"dengine: x\nmore\n").problems
    assert two == ["stderr is not one 'dengine: ...' line (2 lines)"]
    tb = _outcome(tmp_path / "e", 4, b"Traceback (most recent call last):\ndengine: x\n").problems
    assert "traceback on stderr" in tb
    assert _outcome(tmp_path / "f", 9, b"dengine: x\n").problems == ["undocumented exit code 9"]
    hang = _outcome(tmp_path / "g", None, b"", sig=signal.SIGXCPU).problems
    assert hang == ["hang: over 30 s of CPU time"]
    assert _outcome(tmp_path / "h", None, b"", sig=signal.SIGSEGV).problems == ["crash: killed by SIGSEGV"]


def test_judge_finds_files_left_behind(tmp_path: Path) -> None:
    task = Task(0, "analyze", [], tmp_path, ["a.elf"])
    prepare(task)
    (tmp_path / "input").mkdir()
    (tmp_path / "input" / "a.elf").write_bytes(b"")
    (tmp_path / "tmp" / "dengine-x.gzip.raw").write_bytes(b"")
    (tmp_path / "index" / ("0" * 16 + "-" + "0" * 32 + ".idx")).write_bytes(b"")
    (tmp_path / "index" / ("0" * 32 + ".shr")).write_bytes(b"")
    (tmp_path / "index" / ".tmp-abc.idx").write_bytes(b"")
    (tmp_path / "out" / ".flat.raw.x.part").write_bytes(b"")
    o = Outcome(task, 4, None, 0.1, 0.1, 0, b"", b"dengine: x\n")
    judge(o, 0, Limits())
    assert o.problems == [
        "output dir holds ['.flat.raw.x.part'], expected []",
        "left files in the tmp dir: ['dengine-x.gzip.raw']",
        "left non-cache files in the index dir: ['.tmp-abc.idx']",
    ]


def test_run_tasks_reports_a_usage_error_as_a_failure(tmp_path: Path) -> None:
    task = Task(0, "info", ["info", "--no-such-option"], tmp_path, [])
    prepare(task)
    (tmp_path / "input").mkdir()
    (o,) = run_tasks(iter([task]), 1, Limits(wall_seconds=60))
    assert o.code == 2
    assert o.problems == ["usage error (exit 2): the command line was refused, not the dump"]


def test_a_command_that_blocks_is_killed_and_reported_as_a_hang(tmp_path: Path) -> None:
    # Reading the dump list from a FIFO nobody writes to (`@FIFO`) blocks without spending CPU:
    # only the wall bound ends it.  (A dump that is a FIFO is refused at once.)
    import os

    task = Task(0, "info", [], tmp_path, ["stuck.list"])
    prepare(task)
    (tmp_path / "input").mkdir()
    os.mkfifo(tmp_path / "input" / "stuck.list")
    task.argv = ["info", "@" + str(tmp_path / "input" / "stuck.list")]
    (o,) = run_tasks(iter([task]), 1, Limits(wall_seconds=1.0))
    assert o.signal == signal.SIGKILL
    assert o.problems == ["hang: over 1 s of wall time"]


def test_the_ci_slice_of_the_campaign_passes(tmp_path: Path) -> None:
    report = run_campaign(
        range(CI_CASES), 0, 2, tmp_path / "work", tmp_path / "results", limits=CI_LIMITS, one_command=True
    )
    assert report.cases == CI_CASES and report.commands == CI_CASES
    assert not report.failures, "\n".join(report.lines())
    assert set(report.by_format) >= {"elf", "kdump", "xc-core", "qemu-stream", "libvirt-save", "lime", "raw"}
    for command in COMMANDS:
        labels = report.outcomes[command]
        # The mutants reach both sides: some still read, most are refused with exit 4 or 5.
        assert labels["exit 0"] > 0 and labels["exit 4"] > 0, (command, labels)
    assert not list((tmp_path / "work").iterdir())
