"""`dengine report`: snapshots grouped into VMs, the hot set between snapshots against a plain
count and against the planner's own hot pages, the JSON and CSV beside the HTML, plan files as
input, and the errors (nothing half-written)."""

from __future__ import annotations

import csv
import io
import json
import os
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dengine_cli.engine.index import PageIndex
from dengine_cli.errors import UsageError
from dengine_cli.parallel import Workers
from dengine_cli.policies import named_policy
from dengine_cli.report.build import ReportData, ReportRequest, build_report, series_csv
from dengine_cli.report.snapshots import dumps_to_group, group_by_guest, parse_vm_option, snapshot_changes
from dengine_cli.session import Settings
from tests.commands import invoke
from tests.vms import write_raw_images

REPO = Path(__file__).resolve().parent.parent
ALPHA, LATER, BETA = (REPO / "fixtures" / n for n in ("alpha.elf.zst", "alpha-later.elf.zst", "beta.elf.zst"))


def index_of(name: str, pages: dict[int, int]) -> PageIndex:
    """An index of pages given as gfn -> content number (0: the zero page)."""
    gfns = np.array(sorted(pages), dtype=np.uint64)
    content = np.array([pages[int(g)] for g in gfns], dtype=np.uint64)
    return PageIndex(name, gfns, content * 0x9E3779B97F4A7C15, content ^ 0x5555, content == 0)


@settings(max_examples=60, deadline=None)
@given(
    st.dictionaries(st.integers(0, 200), st.integers(0, 5), max_size=80),
    st.dictionaries(st.integers(0, 200), st.integers(0, 5), max_size=80),
)
def test_snapshot_changes_match_a_plain_count(before: dict[int, int], after: dict[int, int]) -> None:
    c = snapshot_changes(index_of("a", before), index_of("b", after))
    assert c.changed == sum(1 for g in after if g in before and before[g] != after[g])
    assert c.appeared == sum(1 for g in after if g not in before)
    assert c.disappeared == sum(1 for g in before if g not in after)
    assert c.hot == c.changed + c.appeared


def test_group_by_guest_uuid_then_name_then_dump() -> None:
    paths = [Path(f"/d/{n}") for n in ("a1", "b1", "a2", "x", "c1", "c2")]
    facts = {
        paths[0]: {"uuid": "u-a", "guest_name": "web"},
        paths[1]: {"guest_name": "db"},
        paths[2]: {"uuid": "u-a", "guest_name": "web"},
        paths[3]: {},
        paths[4]: {"uuid": "u-c", "guest_name": "web"},  # another guest of the same name
        paths[5]: {"guest_name": "db"},
    }
    vms = group_by_guest(paths, facts)
    assert [(vm.name, [p.name for p in vm.snapshots], vm.grouped_by) for vm in vms] == [
        ("web (a1)", ["a1", "a2"], "uuid"),
        ("db", ["b1", "c2"], "guest name"),
        ("x", ["x"], "dump"),
        ("web (c1)", ["c1"], "uuid"),
    ]


@pytest.mark.parametrize("spec", ["alpha", "=a,b", "alpha=", "alpha=,"])
def test_vm_option_refuses_what_is_not_name_equals_dumps(spec: str) -> None:
    with pytest.raises(UsageError, match="NAME=DUMP"):
        parse_vm_option([spec])


def test_vm_option_refuses_a_name_twice() -> None:
    with pytest.raises(UsageError, match="twice"):
        parse_vm_option(["a=x", "a=y"])


@pytest.fixture(scope="module")
def report_data(tmp_path_factory: pytest.TempPathFactory) -> ReportData:
    idx = tmp_path_factory.mktemp("idx")
    request = ReportRequest(
        dumps=(BETA,),
        vms=tuple(parse_vm_option([f"alpha={ALPHA},{LATER}"])),
        policies=tuple(named_policy(n) for n in ("ksm", "esx", "de")),
        host_memory=64 << 20,
        command=("dengine", "report"),
    )
    return build_report(request, Settings(index_dir=idx, workers=Workers(jobs=1)))


def test_the_hot_set_is_what_the_planner_keeps_hot(report_data: ReportData) -> None:
    """The report's pages changed (from the indexes) equal the hot pages the planner finds by
    reading both snapshots (engine.temperature), and the manifest's workload: 16 pages of
    text.txt upper-cased in place and 16 pages of a new file, plus what the kernel wrote."""
    (change,) = report_data.changes["alpha"]
    last = report_data.last.plans["de"]["vms"][1]
    assert last["name"] == "alpha" and last["dump"] == str(LATER)
    assert change.hot == last["hot_pages"]
    assert change.changed >= 32 and change.appeared == 0 and change.disappeared == 0
    assert report_data.changes["beta.elf.zst"] == ()


def test_the_series_has_every_policy_at_every_snapshot(report_data: ReportData) -> None:
    assert [p.index for p in report_data.points] == [1, 2]
    assert [list(p.plans) for p in report_data.points] == [["ksm", "esx", "de"]] * 2
    first, second = report_data.points
    assert first.dumps == (str(BETA), str(ALPHA)) and second.dumps == (str(BETA), str(LATER))
    # At the first snapshot no VM has history: an upper bound; at the second alpha has one.
    assert first.plans["de"]["vms"][1]["hot_pages"] == 0
    # ESX shares within each VM only: its savings are never above KSM's on the same fleet.
    for point in report_data.points:
        assert (
            point.plans["esx"]["total"]["savings_percent"] <= point.plans["ksm"]["total"]["savings_percent"]
        )
    assert report_data.sharing is not None
    assert report_data.sharing["matrix"]["names"] == ["beta.elf.zst", "alpha"]


def test_the_csv_has_a_row_per_vm_snapshot_and_policy(report_data: ReportData) -> None:
    rows = list(csv.DictReader(io.StringIO(series_csv(report_data))))
    assert len(rows) == 2 * 2 * 3
    later = [r for r in rows if r["vm"] == "alpha" and r["snapshot"] == "2"]
    (change,) = report_data.changes["alpha"]
    assert {r["pages_changed"] for r in later} == {str(change.changed)}
    assert {r["pages_changed"] for r in rows if r["snapshot"] == "1"} == {""}
    de = next(r for r in later if r["policy"] == "de")
    assert float(de["savings_percent"]) == report_data.last.plans["de"]["vms"][1]["savings_percent"]


def test_the_json_names_its_inputs_and_versions(report_data: ReportData) -> None:
    doc = json.loads(json.dumps(report_data.to_dict()))
    assert doc["schema"] == "dengine.report/1"
    assert {"dengine", "python", "numpy", "matplotlib"} <= set(doc["versions"])
    inputs = {i["path"]: i for i in doc["inputs"]}
    assert set(inputs) == {str(BETA), str(ALPHA), str(LATER)}
    assert inputs[str(ALPHA)]["index_digest"] != inputs[str(LATER)]["index_digest"]
    assert inputs[str(ALPHA)]["size"] == ALPHA.stat().st_size
    assert [vm["name"] for vm in doc["vms"]] == ["beta.elf.zst", "alpha"]


def test_report_command_writes_html_json_and_csv(tmp_path: Path) -> None:
    out = tmp_path / "r.html"
    code, _, err = invoke(
        "report",
        "--index-dir",
        str(tmp_path / "idx"),
        "-o",
        str(out),
        "--json",
        str(tmp_path / "r.json"),
        "--csv",
        str(tmp_path / "r.csv"),
        "--policy",
        "de-share-patch",
        str(ALPHA),
        str(BETA),
        "-j",
        "1",
    )
    assert code == 0, err
    page = out.read_text()
    assert page.startswith("<!DOCTYPE html>") and page.rstrip().endswith("</html>")
    assert "default-src 'none'" in page
    # Nothing the page would fetch: every link is within the page or a data: URL.
    assert re.findall(r'(?:src|href)="(?!#|data:)[^"]*"', page) == []
    for chart in ("breakdown", "host", "matrix"):
        assert f'data-chart="{chart}"' in page
    assert 'data-chart="series"' not in page  # one snapshot per VM: no time series
    doc = json.loads((tmp_path / "r.json").read_text())
    assert list(doc["series"][0]["plans"]) == ["ksm", "esx", "de", "de-share-patch"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["idx", "r.csv", "r.html", "r.json"]


def test_report_of_plan_files(tmp_path: Path) -> None:
    """A plan file (`plan -o`) is read without its pages: its policy and baseline side by side."""
    plan = tmp_path / "p.json"
    code, _, err = invoke(
        "plan", "--index-dir", str(tmp_path / "idx"), "-o", str(plan), str(ALPHA), str(BETA)
    )
    assert code == 0, err
    code, _, err = invoke(
        "report", "-o", str(tmp_path / "r.html"), "--json", str(tmp_path / "r.json"), str(plan)
    )
    assert code == 0, err
    doc = json.loads((tmp_path / "r.json").read_text())
    assert list(doc["series"][0]["plans"]) == ["de", "ksm"]
    assert doc["sharing"] is None
    expected = json.loads(plan.read_text())
    assert doc["series"][0]["plans"]["de"]["total"] == expected["total"]
    # Mixed with a dump: refused.
    code, _, err = invoke("report", "-o", str(tmp_path / "r2.html"), str(plan), str(ALPHA))
    assert code == 2 and "not both" in err


def test_report_errors_leave_nothing_behind(tmp_path: Path) -> None:
    out = tmp_path / "r.html"
    code, _, err = invoke("-q", "report", "-o", str(tmp_path / "no" / "r.html"), str(ALPHA))
    assert code == 6 and err.startswith(f"dengine: {tmp_path / 'no' / 'r.html'}: cannot write")
    bad = tmp_path / "bad.elf"
    bad.write_bytes(b"\x7fELF" + b"\x00" * 10)
    code, _, err = invoke(
        "-q", "report", "--index-dir", str(tmp_path / "idx"), "-o", str(out), str(ALPHA), str(bad)
    )
    assert code == 4 and err.startswith(f"dengine: {bad}: at offset 0x")
    cut = tmp_path / "cut.json"
    cut.write_bytes(b'{"schema": "dengine.plan/1", "vms": [')
    code, _, err = invoke("-q", "report", "-o", str(out), str(cut))
    assert code == 4 and err.startswith(f"dengine: {cut}: at offset 0x0: expected a dengine plan file")
    whole = tmp_path / "whole.json"
    code, _, err = invoke("-q", "plan", "--index-dir", str(tmp_path / "idx"), "-o", str(whole), str(ALPHA))
    assert code == 0, err
    cut.write_bytes(whole.read_bytes()[:-100])
    code, _, err = invoke("-q", "report", "-o", str(out), str(cut))
    assert code == 4, err
    assert err.startswith(
        f"dengine: {cut}: at offset {cut.stat().st_size:#x}: expected the end of a plan file"
    )
    # Cut right after the first VM's object: it ends in "]}" too, and is still refused.
    two = tmp_path / "two.json"
    idx = str(tmp_path / "idx")
    code, _, err = invoke("-q", "plan", "--index-dir", idx, "-o", str(two), str(ALPHA), str(BETA))
    assert code == 0, err
    data = two.read_bytes()
    cut.write_bytes(data[: data.index(b"]}, {", data.index(b'"pages": [')) + 2])
    code, _, err = invoke("-q", "report", "-o", str(out), str(cut))
    assert code == 4 and "expected the end of a plan file" in err, err
    whole.unlink()
    two.unlink()
    newer = tmp_path / "newer.json"
    newer.write_bytes(b'{"schema": "dengine.plan/2", "vms": [], "policy": {}, "pages": []}')
    code, _, err = invoke("-q", "report", "-o", str(out), str(newer))
    assert code == 5 and err.startswith(
        f"dengine: {newer}: at offset 0x0: unsupported plan schema 'dengine.plan/2'"
    )
    code, _, err = invoke("-q", "report", "-o", str(out), "--vm", "alpha")
    assert code == 2 and "NAME=DUMP" in err
    code, _, err = invoke("-q", "report", "-o", str(out))
    assert code == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.elf", "cut.json", "idx", "newer.json"]


def test_analyze_imports_no_chart_library(tmp_path: Path) -> None:
    """matplotlib is the report's alone: `dengine analyze` (any format) never imports it."""
    code = (
        "import sys\n"
        "from click.testing import CliRunner\n"
        "from dengine_cli.cli import cli\n"
        f"r = CliRunner().invoke(cli, ['analyze', '--index-dir', {str(tmp_path)!r}, {str(ALPHA)!r}])\n"
        "assert r.exit_code == 0, r.output\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('matplotlib', 'dengine_cli.report')))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def documented_keys(schema: str) -> list[set[str]]:
    """The key columns of the tables in docs/SCHEMAS.md's section of ``schema``, in order."""
    doc = (REPO / "docs" / "SCHEMAS.md").read_text()
    section = doc.split(f"## `{schema}`")[1].split("\n## ")[0]
    found = []
    for block in re.split(r"\n\s*\n", section):
        rows = re.findall(r"^\| `([a-z_]+)` \|", block, flags=re.M)
        if rows:
            found.append(set(rows))
    return found


def test_the_json_has_the_documented_keys(report_data: ReportData) -> None:
    top, inputs, vm, change, point = documented_keys("dengine.report/1")
    doc = report_data.to_dict()
    assert set(doc) == top
    assert all(set(i) == inputs for i in doc["inputs"])
    assert all(set(v) == vm for v in doc["vms"])
    assert all(set(c) == change for v in doc["vms"] for c in v["changes"]) and doc["vms"][1]["changes"]
    assert all(set(p) == point for p in doc["series"])


def test_snapshots_are_grouped_by_the_guest_their_headers_name(
    tmp_path: Path, real_dump: Callable[[str], Path]
) -> None:
    """libvirt save images (real QEMU streams in a save header) name their guest: two of guest
    uuid U are one VM's snapshots, a third of another uuid is another VM."""
    from tests.builders.libvirt_save import build_save, domain_xml

    alpha, beta = real_dump("alpha.qevm").read_bytes(), real_dump("beta.qevm").read_bytes()
    web = "6c0ffee0-0000-4000-8000-0000000000a1"
    saves = {
        "web-mon.save": build_save(alpha, domain_xml("web", web)),
        "db-mon.save": build_save(beta, domain_xml("db", "6c0ffee0-0000-4000-8000-0000000000d2")),
        "web-tue.save": build_save(beta, domain_xml("web", web)),
    }
    for name, image in saves.items():
        (tmp_path / name).write_bytes(image)
    code, _, err = invoke(
        "-q", "report", "--index-dir", str(tmp_path / "idx"), "-o", str(tmp_path / "r.html"),
        "--json", str(tmp_path / "r.json"), *(str(tmp_path / n) for n in saves),
    )  # fmt: skip
    assert code == 0, err
    doc = json.loads((tmp_path / "r.json").read_text())
    assert [(vm["name"], vm["grouped_by"], [Path(s).name for s in vm["snapshots"]]) for vm in doc["vms"]] == [
        ("web", "uuid", ["web-mon.save", "web-tue.save"]),
        ("db", "uuid", ["db-mon.save"]),
    ]
    (change,) = doc["vms"][0]["changes"]
    # alpha and beta are different guests: most non-zero pages differ, none appear or vanish.
    assert change["pages_changed"] > 1000 and change["pages_appeared"] == change["pages_disappeared"] == 0
    assert [Path(d).name for d in doc["series"][1]["dumps"]] == ["web-tue.save", "db-mon.save"]
    assert 'data-chart="series"' in (tmp_path / "r.html").read_text()


@pytest.fixture(scope="module")
def shared_idx(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One index directory for the tests below (each fixture dump is indexed once)."""
    return tmp_path_factory.mktemp("shared-idx")


def report_json(tmp_path: Path, idx: Path, *args: str) -> tuple[int, dict[str, Any], str]:
    """Run ``dengine report ARGS`` (JSON beside the HTML): exit code, the JSON (``{}`` if none)
    and stderr."""
    out = tmp_path / "r.json"
    out.unlink(missing_ok=True)
    code, _, err = invoke(
        "-q", "report", "--index-dir", str(idx), "-j", "1", "-o", str(tmp_path / "r.html"),
        "--json", str(out), *args,
    )  # fmt: skip
    return code, json.loads(out.read_text()) if out.exists() else {}, err


def vms_of(doc: dict[str, Any]) -> list[tuple[str, str, list[str]]]:
    return [(vm["name"], vm["grouped_by"], vm["snapshots"]) for vm in doc["vms"]]


def test_a_dump_given_to_vm_and_as_an_argument_is_the_vms(tmp_path: Path, shared_idx: Path) -> None:
    """`--vm alpha=A,L A B` (a glob that also matches the --vm dumps): A is alpha's first
    snapshot and nothing else, whether the argument spells it as --vm does, another way, or by
    a symlink; every dump is indexed and listed once."""
    link = tmp_path / "link.elf.zst"
    link.symlink_to(ALPHA)
    other_spelling = str(ALPHA.parent / ".." / ALPHA.parent.name / ALPHA.name)
    for again in (str(ALPHA), other_spelling, str(link)):
        code, doc, err = report_json(tmp_path, shared_idx, "--vm", f"alpha={ALPHA},{LATER}", again, str(BETA))
        assert code == 0, err
        assert vms_of(doc) == [
            ("beta.elf.zst", "dump", [str(BETA)]),
            ("alpha", "--vm", [str(ALPHA), str(LATER)]),
        ], again
        assert [i["path"] for i in doc["inputs"]] == [str(BETA), str(ALPHA), str(LATER)]
        assert [len(p["dumps"]) for p in doc["series"]] == [2, 2]


def test_a_dump_given_twice_as_an_argument_is_read_once(tmp_path: Path, shared_idx: Path) -> None:
    """The same file under three names (as given, by another path, by a symlink) is one dump of
    one VM, named as first given; a hard link is the same file too."""
    link = tmp_path / "link.elf.zst"
    link.symlink_to(ALPHA)
    other_spelling = str(ALPHA.parent / ".." / ALPHA.parent.name / ALPHA.name)
    code, doc, err = report_json(tmp_path, shared_idx, str(ALPHA), other_spelling, str(link), str(BETA))
    assert code == 0, err
    assert vms_of(doc) == [("alpha.elf.zst", "dump", [str(ALPHA)]), ("beta.elf.zst", "dump", [str(BETA)])]
    assert [i["path"] for i in doc["inputs"]] == [str(ALPHA), str(BETA)]


@pytest.mark.parametrize(
    ("specs", "where"),
    [
        (["a={0},{1}"], "in VM 'a'"),
        (["a={0}", "b={1}"], "in VMs 'a' and 'b'"),
    ],
)
def test_a_dump_given_to_vm_twice_is_refused(tmp_path: Path, specs: list[str], where: str) -> None:
    """Under --vm a file belongs to the VM it is given to: the same file twice, by any name, in
    one VM or two, is a usage error naming it (and nothing is read or written)."""
    link = tmp_path / "link.elf.zst"
    link.symlink_to(ALPHA)
    for second in (ALPHA, link):
        args = [a for spec in specs for a in ("--vm", spec.format(ALPHA, second))]
        code, _, err = invoke(
            "-q", "report", "--index-dir", str(tmp_path / "idx"), "-o", str(tmp_path / "r.html"), *args
        )
        assert code == 2, err
        named = str(ALPHA) if second == ALPHA else f"{ALPHA} (as {link})"
        assert f"--vm: {named} is given twice, {where}" in err, err
        assert err.count("\n") == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link.elf.zst"]


def test_dumps_to_group_compares_files_not_names(tmp_path: Path) -> None:
    """Device and inode decide: a hard link is the file; a copy is another file; a missing file
    is compared by its real path (opening it names the error)."""
    a = tmp_path / "a.raw"
    a.write_bytes(b"\0" * 4096)
    os.link(a, tmp_path / "hard.raw")
    (tmp_path / "copy.raw").write_bytes(a.read_bytes())
    names = [
        a,
        tmp_path / "hard.raw",
        tmp_path / "copy.raw",
        tmp_path / "gone",
        tmp_path / "sub" / ".." / "gone",
    ]
    assert dumps_to_group(names, []) == [a, tmp_path / "copy.raw", tmp_path / "gone"]
    assert dumps_to_group(names, parse_vm_option([f"v={tmp_path / 'hard.raw'}"])) == [
        tmp_path / "copy.raw",
        tmp_path / "gone",
    ]


def analyze_ksm(idx: Path, *args: str) -> dict[str, Any]:
    """analyze's JSON KSM view (`analyze --sharing-only --format json ARGS`)."""
    code, out, err = invoke(
        "-q", "analyze", "--sharing-only", "--format", "json", "--index-dir", str(idx), *args
    )
    assert code == 0, err
    ksm: dict[str, Any] = json.loads(out)["ksm"]
    return ksm


@pytest.mark.parametrize(
    "knobs",
    [
        (),
        ("--ksm-max-page-sharing", "2"),
        ("--ksm-max-page-sharing", "2", "--ksm-use-zero-pages", "--ksm-zero-pages-backed"),
    ],
)
def test_the_reports_ksm_figures_are_analyzes(
    tmp_path: Path, shared_idx: Path, knobs: tuple[str, ...]
) -> None:
    """`report --ksm-...` takes analyze's KSM options: the KSM view of the report's sharing is
    analyze's JSON KSM view of the same dumps under the same knobs, and the footprint of its ksm
    policy, and of a --policy file based on ksm, is the pages present less that view's
    pages_sharing with zero pages backed (the ksm policy merges them) under the same cap."""
    policy = tmp_path / "ksm-like.toml"
    policy.write_text('base = "ksm"\n')
    dumps = (str(ALPHA), str(BETA))
    code, doc, err = report_json(tmp_path, shared_idx, *knobs, "--policy", str(policy), *dumps)
    assert code == 0, err
    cap = int(knobs[1]) if knobs else 256
    want = analyze_ksm(shared_idx, *knobs, *dumps)
    assert want["max_page_sharing"] == cap
    assert doc["sharing"]["ksm"] == want
    backed = analyze_ksm(shared_idx, "--ksm-max-page-sharing", str(cap), "--ksm-zero-pages-backed", *dumps)
    present = doc["sharing"]["total"]["pages_present"]
    for name in ("ksm", "ksm-like"):
        plan = doc["series"][-1]["plans"][name]
        assert plan["policy"]["max_page_sharing"] == cap, name
        assert plan["total"]["footprint_bytes"] == (present - backed["pages_sharing"]) * 4096, name


def test_report_refuses_a_ksm_cap_below_two(tmp_path: Path) -> None:
    code, _, err = invoke(
        "-q", "report", "-o", str(tmp_path / "r.html"), "--ksm-max-page-sharing", "1", str(ALPHA)
    )
    assert code == 2 and "--ksm-max-page-sharing" in err, err
    assert list(tmp_path.iterdir()) == []


def test_a_dump_given_twice_is_named_in_a_warning(tmp_path: Path, shared_idx: Path) -> None:
    """As analyze and plan do: the file given twice is read once, and stderr says so (not with -q)."""
    link = tmp_path / "link.elf.zst"
    link.symlink_to(ALPHA)
    out = tmp_path / "r.json"
    code, _, err = invoke("report", "--index-dir", str(shared_idx), "-j", "1", "-o", str(tmp_path / "r.html"),
                          "--json", str(out), str(ALPHA), str(link), str(BETA))  # fmt: skip
    assert code == 0, err
    assert f"warning: {ALPHA} is given twice (also as {link}): one file, read once\n" in err
    assert len(json.loads(out.read_text())["vms"]) == 2


def _matrix_figure(page: str) -> str:
    start = page.index('data-chart="matrix"')
    return page[start : page.index("</figure>", start)]


def test_a_report_of_many_vms_stays_small_and_numbers_them(tmp_path: Path) -> None:
    """60 VMs: the sharing matrix is an embedded image (its colour bar is another), not 3,600
    outlined cells; charts number the VMs where they named each (the per-VM table gives the
    numbers), and the page stays small; a report of two VMs keeps its cells as vector paths."""
    rng = np.random.default_rng(3)
    library = rng.integers(0, 256, (12, 4096), dtype=np.uint8)
    paths = write_raw_images(tmp_path, [library[rng.integers(0, 12, 3)] for _ in range(60)])
    out = tmp_path / "many.html"
    code, _, err = invoke("report", "--index-dir", str(tmp_path / "idx"), "-o", str(out), *map(str, paths))
    assert code == 0, err
    page = out.read_text()
    matrix = _matrix_figure(page)
    assert matrix.count("<image") == 2 and 'href="data:image/png;base64,' in matrix
    assert len(matrix) < 100_000
    assert len(page) < 600_000  # 1.7 MB with a label a VM and a vector cell a pair
    assert "by their # in the per-VM table" in page
    numbers = re.findall(r"<tr><td>(\d+)</td><td>vm\d+\.raw</td>", page)
    assert numbers == [str(k) for k in range(60)]
    small = tmp_path / "two.html"
    idx = str(tmp_path / "idx")
    code, _, err = invoke("report", "--index-dir", idx, "-o", str(small), *map(str, paths[:2]))
    assert code == 0, err
    assert _matrix_figure(small.read_text()).count("<image") == 1  # the colour bar only
