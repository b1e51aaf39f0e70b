"""`dengine plan` and analyze's Difference Engine column from the command line, on the real QEMU
fixtures."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Callable
from pathlib import Path

import pytest
from click.testing import CliRunner

from dengine_cli.cli import cli
from dengine_cli.errors import EXIT_USAGE


def invoke(*args: str) -> tuple[int, str, str]:
    r = CliRunner().invoke(cli, ["--quiet", *args])
    return r.exit_code, r.stdout, r.stderr


@pytest.fixture
def alpha(real_dump: Callable[[str], Path]) -> Path:
    return real_dump("alpha.elf")


def test_plan_json_adds_up_and_beats_its_baseline(alpha: Path, tmp_path: Path) -> None:
    code, out, err = invoke("plan", "--format", "json", "--index-dir", str(tmp_path), str(alpha))
    assert code == 0, err
    doc = json.loads(out)
    assert doc["schema"] == "dengine.plan/1"
    assert doc["upper_bound"] is True
    (vm,) = doc["vms"]
    parts = (
        "zero_pages",
        "shared_pages",
        "whole_pages",
        "patched_pages",
        "compressed_pages",
        "paged_out_pages",
    )
    assert sum(vm[k] for k in parts) == vm["pages_present"]
    assert vm["footprint_bytes"] == 4096 * vm["whole_pages"] + vm["patch_bytes"] + vm["compressed_bytes"]
    assert vm["patched_pages"] >= 64  # similar.bin against base.bin, at least
    assert vm["compressed_pages"] >= 64  # text.txt, at least
    base = doc["baseline"]["vms"][0]
    assert doc["baseline"]["policy"]["name"] == "ksm"
    assert vm["footprint_bytes"] < base["footprint_bytes"]


def test_plan_file_holds_every_page(alpha: Path, tmp_path: Path) -> None:
    out_file = tmp_path / "plan.json"
    code, out, err = invoke(
        "plan", "-o", str(out_file), "--format", "csv", "--index-dir", str(tmp_path), str(alpha)
    )
    assert code == 0, err
    rows = list(csv.DictReader(io.StringIO(out)))
    assert [r["vm"] for r in rows] == [str(alpha), "total"]
    doc = json.loads(out_file.read_text())
    (pages,) = doc["pages"]
    assert len(pages["gfn"]) == int(rows[0]["pages_present"])
    actions = doc["actions"]
    patched = [i for i, a in enumerate(pages["action"]) if actions[a] == "patch"]
    assert len(patched) == int(rows[0]["patched_pages"])
    assert all(pages["reference"][i] is not None for i in patched)
    assert sum(pages["size"]) == int(rows[0]["footprint_bytes"])


def test_history_makes_the_plan_exact_and_smaller(real_dump: Callable[[str], Path], tmp_path: Path) -> None:
    later, earlier = real_dump("alpha-later.elf"), real_dump("alpha.elf")
    args = ["plan", "--format", "json", "--index-dir", str(tmp_path), str(later)]
    code, out, _ = invoke(*args)
    cold = json.loads(out)
    code, out, err = invoke(*args[:-1], "--history", f"{later}={earlier}", str(later))
    assert code == 0, err
    warm = json.loads(out)
    assert warm["upper_bound"] is False
    assert warm["vms"][0]["hot_pages"] > 0
    assert warm["vms"][0]["footprint_bytes"] > cold["vms"][0]["footprint_bytes"]


def test_small_host_pages_out(alpha: Path, tmp_path: Path) -> None:
    code, out, err = invoke(
        "plan", "--format", "json", "--host-memory", "2M", "--index-dir", str(tmp_path), str(alpha)
    )
    assert code == 0, err
    doc = json.loads(out)
    assert doc["host"]["host_memory"] == 2 << 20
    vm = doc["vms"][0]
    assert vm["paged_out_pages"] > 0
    assert vm["footprint_bytes"] <= 2 << 20 or doc["host"]["fits"] is False


def test_analyze_shows_de_beside_sharing(alpha: Path, tmp_path: Path) -> None:
    code, out, err = invoke("analyze", "--format", "csv", "--index-dir", str(tmp_path), str(alpha))
    assert code == 0, err
    (row, _total) = list(csv.DictReader(io.StringIO(out)))
    assert float(row["de_savings_percent"]) > float(row["savings_percent"])
    code, out, _ = invoke(
        "analyze", "--sharing-only", "--format", "csv", "--index-dir", str(tmp_path), str(alpha)
    )
    assert "de_savings_percent" not in out


def test_sample_gives_an_interval(alpha: Path, tmp_path: Path) -> None:
    code, out, err = invoke(
        "plan", "--sample", "0.3", "--format", "json", "--index-dir", str(tmp_path), str(alpha)
    )
    assert code == 0, err
    doc = json.loads(out)
    assert doc["estimate"] is True
    low, high = doc["total"]["savings_interval_percent"]
    assert low <= doc["total"]["savings_percent"] <= high


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--sample", "0.1", "-o", "{d}/p.json"], "a plan file needs an exact plan"),
        (["--sample", "1.5"], "is not within (0, 1]"),
        (["--host-memory", "lots"], "is not a size"),
        (["--history", "nope"], "is not CURRENT=EARLIER"),
        (["--history", "other.elf=x.elf"], "is not one of the dumps given"),
        (["--policy", "{d}/missing.toml"], "missing.toml"),
        (["--policy", "{d}/bad.toml"], "bad.toml"),
    ],
)
def test_bad_plan_options(alpha: Path, tmp_path: Path, args: list[str], message: str) -> None:
    (tmp_path / "bad.toml").write_text("[patch]\nthreshold = 'big'\n")
    d = str(tmp_path)
    code, out, err = invoke("plan", *[a.format(d=d) for a in args], str(alpha))
    assert code == EXIT_USAGE, err
    assert out == ""
    assert message.format(d=d) in err
    assert not (tmp_path / "p.json").exists()
