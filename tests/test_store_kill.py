"""`dengine apply` killed with SIGKILL at any point leaves the previous store intact, or (with no
previous store) nothing `verify` takes as complete; the next apply cleans up after it.

The kill points are seeded delays over the length of a whole apply measured first; the test
asserts on the state found, never on when the kill landed, so a loaded machine only moves the
points."""

from __future__ import annotations

import json
import random
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from dengine_cli.errors import UnreadableFile
from dengine_cli.store.verify import verify_store
from tests.commands import invoke_quiet as invoke

KILL_POINTS = 20
SEED = 20240601


def make_plan(dumps: list[Path], out: Path, idx: Path) -> Path:
    code, _, err = invoke(
        "plan", "--baseline", "none", "--index-dir", str(idx), "-o", str(out), *map(str, dumps)
    )
    assert code == 0, err
    return out


def apply_argv(plan: Path, store: Path, pack: bool) -> list[str]:
    return [sys.executable, "-m", "dengine_cli", "-q", "apply", "--replace", str(plan), "-o", str(store),
            *(["--pack"] if pack else [])]  # fmt: skip


def vm_names(store: Path) -> list[str]:
    report = verify_store(store)
    assert report.ok, [p.what for p in report.problems]
    return [Path(v).name for v in report.vms]


@pytest.fixture(scope="module")
def plans(real_dump: Callable[[str], Path], tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    tmp = tmp_path_factory.mktemp("plans")
    old = make_plan([real_dump("beta.elf")], tmp / "old.json", tmp / "idx")
    new = make_plan([real_dump("alpha.elf"), real_dump("beta.elf")], tmp / "new.json", tmp / "idx")
    return old, new


def test_sigkill_at_random_points(plans: tuple[Path, Path], tmp_path: Path) -> None:
    old_plan, new_plan = plans
    previous = tmp_path / "previous"
    code, _, err = invoke("apply", str(old_plan), "-o", str(previous))
    assert code == 0, err
    assert vm_names(previous) == ["beta.elf"]
    # How long a whole apply takes here and now (the slower, packed one).
    started = time.monotonic()
    subprocess.run(apply_argv(new_plan, tmp_path / "timing", True), check=True, capture_output=True)
    whole = time.monotonic() - started
    rng = random.Random(SEED)
    seen = {"old": 0, "new": 0, "none": 0}
    for k in range(KILL_POINTS):
        store = tmp_path / f"s{k}"
        from_nothing = k % 2 == 1
        if not from_nothing:
            shutil.copytree(previous, store)
        proc = subprocess.Popen(apply_argv(new_plan, store, pack=k % 4 < 2),
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
        time.sleep(rng.uniform(0.0, whole * 1.1))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        if (store / "catalog.sqlite").exists():
            names = vm_names(store)
            assert names in (["beta.elf"], ["alpha.elf", "beta.elf"])
            assert not (from_nothing and names == ["beta.elf"])
            seen["new" if len(names) == 2 else "old"] += 1
        else:
            assert from_nothing, "the previous store was lost"
            with pytest.raises(UnreadableFile, match=r"not a complete dengine store|no such store"):
                verify_store(store)
            seen["none"] += 1
        # The next apply completes over whatever was left, and leaves nothing stray.
        code, _, err = invoke("apply", "--replace", str(new_plan), "-o", str(store))
        assert code == 0, err
        report = verify_store(store)
        assert report.ok and report.notes == [], report.notes
        assert len(list((store / "packs").iterdir())) == 1
        assert [p.name for p in store.iterdir() if p.name.startswith(".")] == []
        shutil.rmtree(store)
    print(json.dumps(seen))
