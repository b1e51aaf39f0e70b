"""`dengine plan` and analyze's Difference Engine column from the command line, on the real QEMU
fixtures."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from dengine_cli.errors import EXIT_USAGE
from dengine_cli.formats import open_dump
from tests.commands import invoke_quiet as invoke
from tests.conftest import read_pages
from tests.vms import write_raw_images

PAGE = 4096


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


def test_plan_csv_percentages_have_four_decimals(real_dump: Callable[[str], Path], tmp_path: Path) -> None:
    """Every percentage of `plan --format csv` has four decimals, as analyze's and the baseline's
    columns do, and is the JSON's figure (the ksm total of these two guests is 81.348%: it was
    printed 81.348 beside 81.3480)."""
    dumps = [str(real_dump("alpha.elf")), str(real_dump("beta.qevm"))]
    args = ["plan", "--policy", "ksm", "--index-dir", str(tmp_path), *dumps]
    code, out, err = invoke(*args, "--format", "csv")
    assert code == 0, err
    rows = list(csv.DictReader(io.StringIO(out)))
    code, js, err = invoke(*args, "--format", "json")
    assert code == 0, err
    doc = json.loads(js)
    figures = [*doc["vms"], doc["total"]]
    for row, fig in zip(rows, figures, strict=True):
        for key in (k for k in row if k.endswith("_percent")):
            assert len(row[key].partition(".")[2]) == 4, (key, row[key])
        assert float(row["savings_percent"]) == fig["savings_percent"]
    assert rows[-1]["savings_percent"] == f"{doc['total']['savings_percent']:.4f}"


def test_history_makes_the_plan_exact_and_smaller(real_dump: Callable[[str], Path], tmp_path: Path) -> None:
    later, earlier = real_dump("alpha-later.elf"), real_dump("alpha.elf")
    args = ["plan", "--format", "json", "--index-dir", str(tmp_path), str(later)]
    code, out, err = invoke(*args)
    assert code == 0, err
    cold = json.loads(out)
    assert cold["upper_bound"] is True and cold["vms"][0]["hot_pages"] == 0
    plan_file = tmp_path / "warm.json"
    code, out, err = invoke(*args[:-1], "-o", str(plan_file), "--history", f"{later}={earlier}", str(later))
    assert code == 0, err
    warm = json.loads(out)
    assert warm["upper_bound"] is False
    # Hot: the pages of the later snapshot absent from the earlier one or different there, counted
    # from the pages themselves.
    with open_dump(later) as now, open_dump(earlier) as then:
        now_pages, then_pages = read_pages(now, 4096), read_pages(then, 4096)
    hot = {g for g, page in now_pages.items() if then_pages.get(g) != page}
    assert len(hot) > 0
    assert warm["vms"][0]["hot_pages"] == len(hot)
    # Hot pages are only shared, never patched or compressed.
    doc = json.loads(plan_file.read_text())
    (pages,) = doc["pages"]
    action_of = dict(zip(pages["gfn"], (doc["actions"][a] for a in pages["action"]), strict=True))
    assert {action_of[g] for g in hot} <= {"zero", "share", "whole"}
    assert warm["vms"][0]["footprint_bytes"] > cold["vms"][0]["footprint_bytes"]


def test_small_host_pages_out(alpha: Path, tmp_path: Path) -> None:
    """With 2 MiB of host memory the plan pages out exactly what docs/SCHEMAS.md and paging.py
    say, recomputed here from the plan without a host: the coldest classes first (whole pages
    nothing refers to, then compressed, then patched pages, each in scan order), just enough to
    cover the excess; never a reference page or a shared frame."""
    host = 2 << 20
    idx = str(tmp_path / "idx")
    free_file = tmp_path / "free.json"
    code, out, err = invoke("plan", "--format", "json", "-o", str(free_file), "--index-dir", idx, str(alpha))
    assert code == 0, err
    free = json.loads(out)
    assert free["host"] is None
    before = free["vms"][0]["footprint_bytes"]
    assert before > host
    doc = json.loads(free_file.read_text())
    (pages,) = doc["pages"]
    action = [doc["actions"][a] for a in pages["action"]]
    pinned = {tuple(ref) for ref in pages["reference"] if ref is not None}  # kept copies, references
    classes = (
        [i for i, a in enumerate(action) if a == "whole" and (0, pages["gfn"][i]) not in pinned],
        [i for i, a in enumerate(action) if a == "compress"],
        [i for i, a in enumerate(action) if a == "patch"],
    )
    excess = before - host
    swapped: list[int] = []
    freed = 0
    for i in (i for cls in classes for i in cls):
        if freed >= excess:
            break
        swapped.append(i)
        freed += pages["size"][i]
    assert freed >= excess  # this fixture has enough to page out: the VM fits

    code, out, err = invoke(
        "plan",
        "--format",
        "json",
        "--host-memory",
        "2M",
        "-o",
        str(tmp_path / "host.json"),
        "--index-dir",
        idx,
        str(alpha),
    )
    assert code == 0, err
    doc = json.loads(out)
    assert doc["host"] == {
        "host_memory": host,
        "footprint_before_paging": before,
        "fits": True,
        "sets_per_host": host // before,
    }
    vm = doc["vms"][0]
    assert vm["paged_out_pages"] == len(swapped)
    assert vm["paged_out_bytes"] == freed
    assert vm["footprint_bytes"] == before - freed <= host
    assert vm["vms_per_host"] == host // vm["footprint_bytes"] == 1
    plan = json.loads((tmp_path / "host.json").read_text())
    (paged,) = plan["pages"]
    assert [i for i, a in enumerate(paged["action"]) if plan["actions"][a] == "swap"] == swapped
    assert sum(paged["size"]) == vm["footprint_bytes"]


def test_analyze_shows_de_beside_sharing(alpha: Path, tmp_path: Path) -> None:
    code, out, err = invoke("analyze", "--format", "csv", "--index-dir", str(tmp_path), str(alpha))
    assert code == 0, err
    full = list(csv.reader(io.StringIO(out)))
    de_columns = ["de_footprint_bytes", "de_savings_percent"]
    assert full[0][-2:] == de_columns
    (row, total) = list(csv.DictReader(io.StringIO(out)))
    assert float(row["de_savings_percent"]) > float(row["savings_percent"])
    # The Difference Engine column is the `dengine plan` figure of the same dump.
    code, out, err = invoke("plan", "--format", "json", "--index-dir", str(tmp_path), str(alpha))
    assert code == 0, err
    planned = json.loads(out)
    for got, want in ((row, planned["vms"][0]), (total, planned["total"])):
        assert int(got["de_footprint_bytes"]) == want["footprint_bytes"]
        assert float(got["de_savings_percent"]) == want["savings_percent"]
    # --sharing-only: the same table without the Difference Engine columns.
    code, out, err = invoke(
        "analyze", "--sharing-only", "--format", "csv", "--index-dir", str(tmp_path), str(alpha)
    )
    assert code == 0, err
    assert list(csv.reader(io.StringIO(out))) == [line[:-2] for line in full]


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
        (["--host-memory", "inf"], "'inf' is not a size"),
        (["--host-memory", "1e400"], "'1e400' is not a size"),
        (["--host-memory", "0.5"], "'0.5': a size must be positive"),
        (["--memory-limit", "inf"], "'inf' is not a size"),
        (["--memory-limit", "nan"], "'nan': a size must be positive"),
        (["--max-decompressed", "inf"], "'inf' is not a size"),
        (["--sample", "0.5", "--seed", "-1"], "-1 is not in the range x>=0"),
        (["--history", "nope"], "is not CURRENT=EARLIER"),
        (["--history", "other.elf=x.elf"], "is not one of the dumps given"),
        (["--history", "{a}={a}"], "is '{a}' itself, not an earlier snapshot of it"),
        (["--policy", "{d}/missing.toml"], "missing.toml"),
        (["--policy", "{d}/bad.toml"], "bad.toml"),
    ],
)
def test_bad_plan_options(alpha: Path, tmp_path: Path, args: list[str], message: str) -> None:
    (tmp_path / "bad.toml").write_text("[patch]\nthreshold = 'big'\n")
    d, a = str(tmp_path), str(alpha)
    code, out, err = invoke("plan", *[x.format(d=d, a=a) for x in args], a)
    assert code == EXIT_USAGE, err
    assert out == ""
    assert message.format(d=d, a=a) in err
    assert not (tmp_path / "p.json").exists()


def ksm_plan_and_view(
    tmp_path: Path, paths: list[Path], *knobs: str
) -> tuple[dict[str, Any], dict[str, Any]]:
    """`plan --policy ksm` and analyze's KSM view (zero pages taken as backed, as the ksm policy
    merges them) of the same dumps under the same knobs: the plan's JSON and the view's."""
    idx = str(tmp_path / "idx")
    code, out, err = invoke(
        "plan", "--policy", "ksm", "--baseline", "none", "--format", "json", "--index-dir", idx,
        *knobs, *map(str, paths),
    )  # fmt: skip
    assert code == 0, err
    plan = json.loads(out)
    code, out, err = invoke(
        "analyze", "--sharing-only", "--ksm-zero-pages-backed", "--format", "json", "--index-dir", idx,
        *knobs, *map(str, paths),
    )  # fmt: skip
    assert code == 0, err
    return plan, json.loads(out)


@pytest.mark.parametrize("knobs", [(), ("--ksm-max-page-sharing", "2"), ("--ksm-max-page-sharing", "7")])
def test_the_ksm_plan_holds_what_analyzes_ksm_view_says(
    real_dump: Callable[[str], Path], tmp_path: Path, knobs: tuple[str, ...]
) -> None:
    """On the real guests, the ksm plan's footprint is the host pages KSM holds by analyze's
    view of the same dumps under the same max_page_sharing: every page present less the
    mappings KSM merges (pages_sharing; the zero page is a content of thousands of copies)."""
    paths = [real_dump("alpha.elf"), real_dump("beta.elf")]
    plan, analyzed = ksm_plan_and_view(tmp_path, paths, *knobs)
    ksm = analyzed["ksm"]
    assert ksm["max_page_sharing"] == (int(knobs[1]) if knobs else 256)
    assert plan["policy"]["max_page_sharing"] == ksm["max_page_sharing"]
    present = analyzed["total"]["pages_present"]
    assert plan["total"]["footprint_bytes"] == (present - ksm["pages_sharing"]) * 4096
    # The cap costs pages: more than the one frame per content that sharing alone keeps.
    kept = analyzed["total"]["kept_pages"] + 1  # and one frame for the zero pages
    assert plan["total"]["footprint_bytes"] > kept * 4096
    assert sum(vm["footprint_bytes"] for vm in plan["vms"]) == plan["total"]["footprint_bytes"]


def test_the_ksm_plan_charges_a_content_beyond_the_cap_to_the_vm_keeping_it(tmp_path: Path) -> None:
    """Three raw guests without zero pages holding 40, 35 and 25 copies of one page and 10
    unique pages each: under max_page_sharing M the 100 copies take ceil(100 / M) KSM pages
    (M = 2: 50 pairs; M = 3: 33 triples and one page left over, unshared), all charged to the
    first VM, which keeps the content; analyze's view (its default knobs) says the same."""
    rng = np.random.default_rng(5)
    page = rng.integers(1, 256, PAGE, dtype=np.uint8)
    images = [
        np.concatenate([np.tile(page, (copies, 1)), rng.integers(1, 256, (10, PAGE), dtype=np.uint8)])
        for copies in (40, 35, 25)
    ]
    paths = write_raw_images(tmp_path, images)
    for m, ksm_pages in ((2, 50), (3, 34), (256, 1)):
        plan, analyzed = ksm_plan_and_view(tmp_path, paths, "--ksm-max-page-sharing", str(m))
        assert [vm["footprint_bytes"] // PAGE for vm in plan["vms"]] == [10 + ksm_pages, 10, 10], m
        ksm = analyzed["ksm"]
        assert ksm["pages_sharing"] == 100 - ksm_pages
        assert plan["total"]["footprint_bytes"] == (130 - ksm["pages_sharing"]) * PAGE


def test_ksm_max_page_sharing_below_two_is_a_usage_error(alpha: Path, tmp_path: Path) -> None:
    code, _, err = invoke("plan", "--ksm-max-page-sharing", "1", "--index-dir", str(tmp_path), str(alpha))
    assert code == EXIT_USAGE and "--ksm-max-page-sharing" in err


def test_the_ksm_cap_changes_ksm_policies_only(real_dump: Callable[[str], Path], tmp_path: Path) -> None:
    """`--ksm-max-page-sharing` caps the ksm baseline and a policy file based on ksm; the de
    plan beside them is the same with any cap."""
    alpha = str(real_dump("alpha.elf"))
    policy = tmp_path / "ksm-like.toml"
    policy.write_text('base = "ksm"\n')
    docs = []
    for cap in ("256", "2"):
        args = [
            "--format",
            "json",
            "--index-dir",
            str(tmp_path / "idx"),
            "--ksm-max-page-sharing",
            cap,
            alpha,
        ]
        code, out, err = invoke("plan", *args)
        assert code == 0, err
        code, out2, err = invoke("plan", "--policy", str(policy), "--baseline", "none", *args)
        assert code == 0, err
        docs.append((json.loads(out), json.loads(out2)))
    (de_256, file_256), (de_2, file_2) = docs
    assert de_2["total"]["footprint_bytes"] == de_256["total"]["footprint_bytes"]
    assert de_2["policy"]["max_page_sharing"] is None
    assert de_2["baseline"]["policy"]["max_page_sharing"] == 2
    assert de_2["baseline"]["total"]["footprint_bytes"] > de_256["baseline"]["total"]["footprint_bytes"]
    assert file_256["policy"]["max_page_sharing"] == 256
    assert file_256["total"]["footprint_bytes"] == de_256["baseline"]["total"]["footprint_bytes"]
    assert file_2["total"]["footprint_bytes"] == de_2["baseline"]["total"]["footprint_bytes"]


def test_a_policy_files_cap_yields_to_the_flag_given(
    real_dump: Callable[[str], Path], tmp_path: Path
) -> None:
    """`max_page_sharing` in a policy file based on ksm is its plan's cap when
    --ksm-max-page-sharing is not given (the built-in ksm baseline keeps its 256); the flag
    given wins, even given as the default 256; a file without the key has the default. The
    footprint is the built-in ksm's under the cap that won. `report --policy FILE` likewise."""
    dumps = [str(real_dump("alpha.elf")), str(real_dump("beta.elf"))]
    idx = str(tmp_path / "idx")
    capped, plain = tmp_path / "k7.toml", tmp_path / "k.toml"
    capped.write_text('base = "ksm"\nmax_page_sharing = 7\n')
    plain.write_text('base = "ksm"\n')

    def plan(*args: str) -> dict[str, Any]:
        code, out, err = invoke("plan", "--format", "json", "--index-dir", idx, *args, *dumps)
        assert code == 0, err
        doc: dict[str, Any] = json.loads(out)
        return doc

    ksm_footprint = {
        cap: plan("--policy", "ksm", "--ksm-max-page-sharing", str(cap))["total"]["footprint_bytes"]
        for cap in (2, 7, 256)
    }
    assert len(set(ksm_footprint.values())) == 3
    for policy, flag, cap, baseline_cap in (
        (capped, (), 7, 256),
        (capped, ("--ksm-max-page-sharing", "2"), 2, 2),
        (capped, ("--ksm-max-page-sharing", "256"), 256, 256),
        (plain, (), 256, 256),
        (plain, ("--ksm-max-page-sharing", "7"), 7, 7),
    ):
        doc = plan("--policy", str(policy), *flag)
        assert doc["policy"]["max_page_sharing"] == cap, (policy.name, flag)
        assert doc["total"]["footprint_bytes"] == ksm_footprint[cap], (policy.name, flag)
        assert doc["baseline"]["policy"]["max_page_sharing"] == baseline_cap, (policy.name, flag)
    report = tmp_path / "r.json"
    for flag, cap, ksm_cap in (((), 7, 256), (("--ksm-max-page-sharing", "256"), 256, 256)):
        code, _, err = invoke(
            "report", "--index-dir", idx, "-o", str(tmp_path / "r.html"), "--json", str(report),
            "--policy", str(capped), *flag, *dumps,
        )  # fmt: skip
        assert code == 0, err
        plans = json.loads(report.read_text())["series"][-1]["plans"]
        assert plans["k7"]["policy"]["max_page_sharing"] == cap, flag
        assert plans["k7"]["total"]["footprint_bytes"] == ksm_footprint[cap], flag
        assert plans["ksm"]["policy"]["max_page_sharing"] == ksm_cap, flag


def test_a_bad_cap_in_a_policy_file_is_one_line_naming_it(alpha: Path, tmp_path: Path) -> None:
    for text, message in (
        (
            'base = "ksm"\nmax_page_sharing = 1\n',
            "max_page_sharing: expected an integer from 2 to 2147483647, found 1",
        ),
        (
            "max_page_sharing = 7\n",
            'max_page_sharing: only a policy based on ksm has KSM pages to cap (base = "ksm"); '
            "this one is based on 'de'",
        ),
    ):
        policy = tmp_path / "bad.toml"
        policy.write_text(text)
        code, out, err = invoke("plan", "--policy", str(policy), "--index-dir", str(tmp_path), str(alpha))
        assert code == EXIT_USAGE and out == ""
        assert err == f"dengine: plan: {policy}: {message}; see 'dengine plan --help'\n", err
