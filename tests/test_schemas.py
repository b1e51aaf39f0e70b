"""The JSON documents have exactly the keys docs/SCHEMAS.md lists."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path

import pytest
from click.testing import CliRunner

from dengine_cli.cli import cli

DOC = Path(__file__).resolve().parent.parent / "docs" / "SCHEMAS.md"


def documented(schema: str) -> list[set[str]]:
    """The key columns of the tables in the section of ``schema``, in order."""
    section = DOC.read_text().split(f"## `{schema}`")[1].split("\n## ")[0]
    tables = re.split(r"\n\s*\n", section)
    keys = []
    for block in tables:
        rows = re.findall(r"^\| `([a-z_]+)` \|", block, flags=re.M)
        if rows:
            keys.append(set(rows))
    return keys


def run(*args: str) -> dict[str, object]:
    r = CliRunner().invoke(cli, ["--quiet", *args])
    assert r.exit_code == 0, r.stderr
    doc: dict[str, object] = json.loads(r.stdout)
    return doc


@pytest.fixture
def alpha(real_dump: Callable[[str], Path]) -> str:
    return str(real_dump("alpha.elf"))


def test_info(alpha: str) -> None:
    top, dump = documented("dengine.info/1")
    doc = run("info", "--json", alpha)
    assert set(doc) == top
    assert set(doc["dumps"][0]) == dump  # type: ignore[index]


def test_analyze(alpha: str, tmp_path: Path) -> None:
    top, vm = documented("dengine.analyze/1")
    doc = run("analyze", "--format", "json", "--matrix", "--index-dir", str(tmp_path), alpha)
    assert set(doc) == top
    assert set(doc["vms"][0]) == vm  # type: ignore[index]
    assert set(doc["total"]) == vm  # type: ignore[arg-type]
    assert doc["de"]["schema"] == "dengine.plan/1"  # type: ignore[index]
    plain = run("analyze", "--format", "json", "--sharing-only", "--index-dir", str(tmp_path), alpha)
    assert set(plain) == top - {"matrix", "de"}


def test_plan(alpha: str, tmp_path: Path) -> None:
    top, vm = documented("dengine.plan/1")
    estimate_only = {"footprint_interval_bytes", "savings_interval_percent"}
    doc = run("plan", "--format", "json", "--host-memory", "1G", "--index-dir", str(tmp_path), alpha)
    assert set(doc) == top
    assert set(doc["vms"][0]) == vm - estimate_only  # type: ignore[index]
    sampled = run(
        "plan",
        "--format",
        "json",
        "--sample",
        "0.5",
        "--baseline",
        "none",
        "--index-dir",
        str(tmp_path),
        alpha,
    )
    assert set(sampled) == top - {"baseline"}
    assert set(sampled["vms"][0]) == vm - {"vms_per_host"}  # type: ignore[index]
