"""The Difference Engine plan: known content finds the patches and compressions it should (and
no more), the plan equals a brute-force computation, every patch and compressed page decodes to
its page, sampling estimates, the plan file."""

from __future__ import annotations

import dataclasses
import itertools
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dengine_cli.codecs import compression_codec, patch_codec
from dengine_cli.engine.index import index_dump
from dengine_cli.engine.plan.model import ACTIONS, COMPRESS, PATCH, SCHEMA, SHARE, WHOLE, ZERO, PlanReport
from dengine_cli.engine.plan.planfile import write_plan
from dengine_cli.engine.policy import Policy
from dengine_cli.formats import open_dump
from dengine_cli.formats.base import OpenOptions
from dengine_cli.pages import PAGE_SIZE
from dengine_cli.parallel import Workers
from dengine_cli.policies import POLICIES
from dengine_cli.session import share_and_plan
from fixtures.workload import workload_files
from tests.vms import ZERO_LEAD, Planned, mixed_vms, workload_image, write_raw_images

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"
DE = POLICIES["de"]

# --- data -----------------------------------------------------------------------------------------


def plan_of(*args: Any, **kwargs: Any) -> PlanReport:
    """The plan alone, without the sharing report beside it."""
    return share_and_plan(*args, **kwargs)[1]


@pytest.fixture
def alpha(tmp_path: Path) -> tuple[Planned, dict[str, range]]:
    image, where = workload_image("alpha")
    return Planned(write_raw_images(tmp_path, [image])), where


# --- known content ----------------------------------------------------------------------------


def test_workload_finds_exactly_the_expected_actions(alpha: tuple[Planned, dict[str, range]]) -> None:
    planned, where = alpha
    report = planned.plan()
    actions = report.pages[0].actions
    sizes = report.pages[0].sizes
    assert (actions[:ZERO_LEAD] == ZERO).all()
    ident = where["identical.bin"]
    assert actions[ident.start] == WHOLE and (actions[ident.start + 1 : ident.stop] == SHARE).all()
    # base.bin pages are the references of similar.bin's patches; they stay whole.
    assert (actions[where["base.bin"].start : where["base.bin"].stop] == WHOLE).all()
    similar = slice(where["similar.bin"].start, where["similar.bin"].stop)
    assert (actions[similar] == PATCH).all()
    # One byte changed: a patch is a few dozen bytes.
    assert sizes[similar].max() < 100
    pp = report.pages[0]
    assert (pp.patch_ref_pos == pp.patch_positions - 64).all()
    text = slice(where["text.txt"].start, where["text.txt"].stop)
    assert (actions[text] == COMPRESS).all()
    assert (sizes[text] < 2048).all()
    rand = slice(where["random.bin"].start, where["random.bin"].stop)
    assert (actions[rand] == WHOLE).all()
    vm = report.vms[0]
    assert (vm.patched, vm.compressed, vm.references, vm.zero, vm.shared_within) == (64, 64, 64, 8, 63)
    assert vm.whole == 1 + 64 + 32
    assert vm.footprint_bytes == vm.whole * PAGE_SIZE + vm.patch_bytes + vm.compressed_bytes
    assert report.upper_bound and not report.estimate


def test_policies_on_the_workload(alpha: tuple[Planned, dict[str, range]]) -> None:
    planned, _ = alpha
    by_name = {name: planned.plan(policy).vms[0] for name, policy in POLICIES.items()}
    assert by_name["de-share-patch"].patched == 64 and by_name["de-share-patch"].compressed == 0
    assert by_name["de-share-compress"].patched == 0
    # Without patching, similar.bin compresses no better than random: only text compresses.
    assert by_name["de-share-compress"].compressed == 64
    for name in ("ksm", "esx"):
        assert by_name[name].patched == by_name[name].compressed == 0
    # KSM merges the zero pages into one frame (fewer than max_page_sharing of them); ESX maps
    # them to the zero page.
    assert by_name["ksm"].footprint_bytes == by_name["esx"].footprint_bytes + PAGE_SIZE
    assert by_name["de"].footprint_bytes < by_name["de-share-patch"].footprint_bytes
    assert by_name["de"].footprint_bytes < by_name["de-share-compress"].footprint_bytes


def test_shared_content_stays_whole_across_vms(tmp_path: Path) -> None:
    images = [workload_image(g)[0] for g in ("alpha", "beta")]
    planned = Planned(write_raw_images(tmp_path, images))
    report = planned.plan()
    _, where = workload_image("alpha")
    similar = slice(where["similar.bin"].start, where["similar.bin"].stop)
    # similar.bin is in both guests: a shared content, kept whole in alpha, shared in beta.
    assert (report.pages[0].actions[similar] == WHOLE).all()
    assert (report.pages[1].actions[similar] == SHARE).all()
    assert report.vms[1].compressed == 64  # beta's own text
    # Without sharing across VMs each guest patches its own similar.bin against its base.bin.
    esx_de = Policy("esx-de", cross_vm=False, patch=True, compress=True)
    alone = planned.plan(esx_de)
    assert [vm.patched for vm in alone.vms] == [64, 64]
    pp = alone.pages[1]
    assert (pp.patch_ref_vm == 1).all()


def test_history_makes_changed_pages_hot(tmp_path: Path) -> None:
    image, where = workload_image("alpha")
    later = bytearray(image)
    text = where["text.txt"]
    # The first 8 text pages are rewritten, one similar.bin page too.
    for page in range(text.start, text.start + 8):
        later[page * PAGE_SIZE] ^= 0xFF
    later[where["similar.bin"].start * PAGE_SIZE + 5] ^= 0x01
    earlier_path, later_path = write_raw_images(tmp_path, [image, bytes(later)])
    options = OpenOptions(format="raw")
    report = plan_of(
        [later_path],
        DE,
        options=options,
        index_dir=tmp_path / "idx",
        workers=Workers(jobs=1),
        history={str(later_path): earlier_path},
    )
    assert not report.upper_bound
    vm = report.vms[0]
    assert vm.hot == 9
    assert vm.compressed == 64 - 8 and vm.patched == 63
    actions = report.pages[0].actions
    assert (actions[text.start : text.start + 8] == WHOLE).all()
    no_history = plan_of(
        [later_path], DE, options=options, index_dir=tmp_path / "idx", workers=Workers(jobs=1)
    )
    assert no_history.upper_bound and no_history.vms[0].hot == 0
    assert no_history.vms[0].footprint_bytes < vm.footprint_bytes


@pytest.mark.parametrize("guest", ["alpha", "beta"])
def test_real_qemu_fixture(real_dump: Callable[[str], Path], guest: str, tmp_path: Path) -> None:
    """On a QEMU dump of a guest holding the workload in its page cache: similar.bin's pages are
    patched against base.bin's, text.txt's compressed, random.bin's neither, identical.bin's
    shared."""
    try:
        path = real_dump(f"{guest}.elf")
    except FileNotFoundError:
        pytest.skip("QEMU fixtures not generated")
    report = plan_of([path], DE, index_dir=tmp_path / "idx", workers=Workers(jobs=1))
    dump = open_dump(path)
    index = index_dump(dump)
    files = workload_files(guest)
    pp = report.pages[0]

    def positions(name: str) -> list[int]:
        """Where each page of the file is in the dump: the copies of its content in gfn order
        (identical.bin is one content 64 times)."""
        data = files[name]
        wanted: dict[bytes, list[int]] = {}
        for i in range(len(data) // PAGE_SIZE):
            wanted.setdefault(data[i * PAGE_SIZE : (i + 1) * PAGE_SIZE], []).append(i)
        found: dict[int, int] = {}
        for lo in range(0, index.page_count, 4096):
            pages = dump.pages_at(index.gfns[lo : lo + 4096])
            for k in range(len(pages)):
                todo = wanted.get(pages[k].tobytes())
                if todo:
                    found[todo.pop(0)] = lo + k
        n = len(data) // PAGE_SIZE
        assert len(found) == n, f"{name}: {len(found)} of {n} pages in the dump"
        return [found[i] for i in range(n)]

    base, similar = positions("base.bin"), positions("similar.bin")
    assert (pp.actions[similar] == PATCH).all()
    refs = dict(zip(pp.patch_positions.tolist(), pp.patch_ref_pos.tolist(), strict=True))
    assert [refs[p] for p in similar] == base
    assert (pp.sizes[similar] < 100).all()
    assert (pp.actions[positions("text.txt")] == COMPRESS).all()
    assert (pp.actions[positions("random.bin")] == WHOLE).all()
    ident = positions("identical.bin")
    assert pp.actions[ident[0]] == WHOLE and (pp.actions[ident[1:]] == SHARE).all()


# --- exactness --------------------------------------------------------------------------------


def brute_force(vms: Sequence[np.ndarray], policy: Policy) -> list[tuple[list[int], list[int]]]:
    """The plan computed page by page with dicts, from its definition in dengine_cli.plan."""
    det = policy.detector
    pcodec = patch_codec(policy.patch_codec)
    ccodec = compression_codec(policy.compression_codec)
    scan = [(v, i, vms[v][i].tobytes()) for v in range(len(vms)) for i in range(len(vms[v]))]
    zero = bytes(PAGE_SIZE)
    copies: dict[tuple[int, bytes], int] = {}
    first: dict[tuple[int, bytes], tuple[int, int]] = {}
    for v, i, page in scan:
        key = (0 if policy.cross_vm else v, page)
        copies[key] = copies.get(key, 0) + 1
        first.setdefault(key, (v, i))
    action = {}
    kept, cand = [], []
    for v, i, page in scan:
        key = (0 if policy.cross_vm else v, page)
        if page == zero:
            action[v, i] = (ZERO, 0)
        elif first[key] != (v, i):
            action[v, i] = (SHARE, 0)
        else:
            action[v, i] = (WHOLE, PAGE_SIZE)
            kept.append((v, i))
            if copies[key] == 1:
                cand.append((v, i))
    cands = set(cand)
    buckets: dict[tuple[int, int, int], list[tuple[int, int]]] = {}
    refs_of: dict[tuple[int, int], list[tuple[int, int]]] = {}
    for v, i in kept:
        keys = det.keys(vms[v][i : i + 1])[0]
        for j in range(det.indexes):
            b = buckets.setdefault((0 if policy.cross_vm else v, j, int(keys[j])), [])
            if (v, i) in cands:
                for r in b:
                    if r not in refs_of.setdefault((v, i), []):
                        refs_of[v, i].append(r)
            if len(b) < det.candidates:
                b.append((v, i))
    patched, used = set(), set()
    for p in cand:
        if not policy.patch:
            break
        best, best_size = None, policy.patch_threshold
        for r in sorted(refs_of.get(p, [])):
            if r in patched:
                continue
            size = len(pcodec.diff(vms[r[0]][r[1]].tobytes(), vms[p[0]][p[1]].tobytes()))
            if size < best_size:
                best, best_size = r, size
        if best is not None:
            patched.add(p)
            used.add(best)
            action[p] = (PATCH, best_size)
    for p in cand:
        if policy.compress and p not in patched and p not in used:
            size = len(ccodec.compress(vms[p[0]][p[1]].tobytes()))
            if size < policy.compression_threshold:
                action[p] = (COMPRESS, size)
    return [
        ([action[v, i][0] for i in range(len(vms[v]))], [action[v, i][1] for i in range(len(vms[v]))])
        for v in range(len(vms))
    ]


@pytest.mark.parametrize(
    "policy",
    [
        DE,
        Policy("esx-de", cross_vm=False, patch=True, compress=True),
        Policy(
            "c2",
            patch=True,
            compress=True,
            detector=type(DE.detector)(indexes=3, blocks_per_index=2, candidates=2),
        ),
        POLICIES["de-share-patch"],
        POLICIES["de-share-compress"],
    ],
    ids=lambda p: p.name,
)
def test_plan_equals_brute_force(tmp_path: Path, policy: Policy) -> None:
    vms = mixed_vms(7, [150, 120, 90])
    planned = Planned(write_raw_images(tmp_path, vms))
    report = planned.plan(policy)
    expected = brute_force(vms, policy)
    assert report.total.patched > 0 or not policy.patch
    assert report.total.compressed > 0 or not policy.compress
    for v, (acts, sizes) in enumerate(expected):
        assert report.pages[v].actions.tolist() == acts
        assert report.pages[v].sizes.tolist() == sizes


def test_patch_references_are_whole_and_earlier(tmp_path: Path) -> None:
    vms = mixed_vms(3, [200, 200])
    planned = Planned(write_raw_images(tmp_path, vms))
    report = planned.plan()
    for v, pp in enumerate(report.pages):
        for p, rv, rp in zip(
            pp.patch_positions.tolist(), pp.patch_ref_vm.tolist(), pp.patch_ref_pos.tolist(), strict=True
        ):
            assert report.pages[rv].actions[rp] == WHOLE
            assert (rv, rp) < (v, p)
    assert sum(vm.references for vm in report.vms) == len(
        {
            (v, r)
            for pp in report.pages
            for v, r in zip(pp.patch_ref_vm.tolist(), pp.patch_ref_pos.tolist(), strict=True)
        }
    )


@st.composite
def page_sets(draw: st.DrawFn) -> list[np.ndarray]:
    seed = draw(st.integers(0, 2**32 - 1))
    sizes = draw(st.lists(st.integers(1, 40), min_size=1, max_size=3))
    return mixed_vms(seed, sizes)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(vms=page_sets())
def test_every_patch_and_compressed_page_decodes(
    tmp_path_factory: pytest.TempPathFactory, vms: list[np.ndarray]
) -> None:
    planned = Planned(write_raw_images(tmp_path_factory.mktemp("dec"), vms))
    report = planned.plan()
    pcodec = patch_codec(DE.patch_codec)
    ccodec = compression_codec(DE.compression_codec)
    for v, pp in enumerate(report.pages):
        refs = dict(
            zip(
                pp.patch_positions.tolist(),
                zip(pp.patch_ref_vm.tolist(), pp.patch_ref_pos.tolist(), strict=True),
                strict=True,
            )
        )
        for pos in np.flatnonzero(pp.actions == PATCH).tolist():
            page = planned.page(v, pos)
            ref = planned.page(*refs[pos])
            patch = pcodec.diff(ref, page)
            assert len(patch) == pp.sizes[pos] < DE.patch_threshold
            assert bytes(pcodec.apply(ref, patch)) == page
        for pos in np.flatnonzero(pp.actions == COMPRESS).tolist():
            page = planned.page(v, pos)
            data = ccodec.compress(page)
            assert len(data) == pp.sizes[pos] < DE.compression_threshold
            assert bytes(ccodec.decompress(data)) == page


def test_accounting_adds_up(tmp_path: Path) -> None:
    planned = Planned(write_raw_images(tmp_path, mixed_vms(11, [300, 250])))
    report = planned.plan(baseline=POLICIES["ksm"])
    for vm, pp in zip(report.vms, report.pages, strict=True):
        assert vm.present == vm.zero + vm.shared + vm.whole + vm.patched + vm.compressed + vm.paged_out
        assert vm.footprint_bytes == int(pp.sizes.sum())
    assert report.total.footprint_bytes == sum(vm.footprint_bytes for vm in report.vms)
    assert report.baseline is not None and report.baseline.policy.name == "ksm"
    assert report.baseline.total.footprint_bytes > report.total.footprint_bytes
    d = report.to_dict()
    assert d["schema"] == SCHEMA and d["baseline"]["policy"]["name"] == "ksm"
    assert d["policy"]["similarity"]["offsets"] == list(DE.detector.offsets)
    json.dumps(d)
    ops = report.cost.counts
    assert ops.patched == report.total.patched and ops.compressed == report.total.compressed
    assert ops.shared == report.total.zero + report.total.shared
    m = DE.costs
    assert report.cost.build_us == pytest.approx(
        ops.shared * m.share + ops.patched * m.patch + ops.compressed * m.compress
    )
    assert report.cost.access_us == pytest.approx(
        ops.patched * m.unpatch + ops.compressed * m.uncompress + ops.cow_mapped * m.cow_break
    )


# --- sampling ---------------------------------------------------------------------------------


def test_sample_of_everything_is_the_exact_plan(tmp_path: Path) -> None:
    planned = Planned(write_raw_images(tmp_path, mixed_vms(5, [300, 200])))
    exact = planned.plan()
    full = planned.plan(sample=1.0, seed=9)
    assert full.estimate and full.sample is not None
    for a, b in zip(exact.vms, full.vms, strict=True):
        assert b.footprint_bytes == a.footprint_bytes == b.footprint_low == b.footprint_high
        assert (a.patched, a.compressed, a.patch_bytes, a.compressed_bytes) == (
            b.patched,
            b.compressed,
            b.patch_bytes,
            b.compressed_bytes,
        )
    assert full.total.footprint_bytes == exact.total.footprint_bytes


def test_sample_interval_covers_the_exact_figure(tmp_path: Path) -> None:
    planned = Planned(write_raw_images(tmp_path, mixed_vms(21, [600, 500])))
    exact = planned.plan()
    covered = 0
    seeds = range(20)
    for seed in seeds:
        est = planned.plan(sample=0.3, seed=seed)
        assert est.sample is not None and 0 < est.sample.pages_computed < est.sample.candidates
        t = est.total
        assert t.footprint_low is not None and t.footprint_high is not None
        covered += t.footprint_low <= exact.total.footprint_bytes <= t.footprint_high
        assert abs(t.savings - exact.total.savings) < 0.05
        d = est.to_dict()
        assert d["estimate"] and d["sample"]["estimate"]
        assert len(d["total"]["savings_interval_percent"]) == 2
    assert covered >= 16


def test_plan_file_refuses_an_estimate(tmp_path: Path) -> None:
    planned = Planned(write_raw_images(tmp_path, mixed_vms(1, [20])))
    out = tmp_path / "p.json"
    with pytest.raises(ValueError, match="exact plan"):
        write_plan(planned.plan(sample=0.5), out)
    assert not out.exists()


# --- the plan file ----------------------------------------------------------------------------


def test_plan_file_accounts_for_every_page(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import dengine_cli.engine.plan.planfile as plan_module

    monkeypatch.setattr(plan_module, "_WRITE_CHUNK", 7)  # several chunks per column
    vms = mixed_vms(2, [60, 50])
    planned = Planned(write_raw_images(tmp_path, vms))
    report = planned.plan(host_memory=60 * PAGE_SIZE)
    out = tmp_path / "plan.json"
    write_plan(report, out)
    doc = json.loads(out.read_text())
    assert doc["schema"] == SCHEMA and doc["actions"] == list(ACTIONS)
    assert [p["name"] for p in doc["pages"]] == [vm.name for vm in report.vms]
    for v, (vm_doc, vm) in enumerate(zip(doc["pages"], doc["vms"], strict=True)):
        gfns = vm_doc["gfn"]
        assert gfns == list(range(len(vms[v])))
        n = len(gfns)
        assert len(vm_doc["action"]) == len(vm_doc["reference"]) == len(vm_doc["size"]) == n
        counts = [vm_doc["action"].count(a) for a in range(len(ACTIONS))]
        assert counts == [
            vm["zero_pages"],
            vm["shared_pages"],
            vm["whole_pages"],
            vm["patched_pages"],
            vm["compressed_pages"],
            vm["paged_out_pages"],
        ]
        assert sum(vm_doc["size"]) == vm["footprint_bytes"]
        for g, a, ref in zip(gfns, vm_doc["action"], vm_doc["reference"], strict=True):
            if ACTIONS[a] in ("share", "patch"):
                rv, rg = ref
                assert doc["pages"][rv]["action"][rg] == ACTIONS.index("whole")
                if ACTIONS[a] == "share":
                    assert vms[rv][rg].tobytes() == vms[v][g].tobytes()
            else:
                assert ref is None
    assert doc["host"]["host_memory"] == 60 * PAGE_SIZE


def test_plan_file_is_never_half_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import dengine_cli.engine.plan.planfile as plan_module

    planned = Planned(write_raw_images(tmp_path, mixed_vms(2, [30])))
    report = planned.plan()
    out = tmp_path / "plan.json"
    out.write_text("old")

    def broken(*args: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(plan_module, "_write_vm", broken)
    from dengine_cli.errors import OutputError

    with pytest.raises(OutputError, match="No space left") as e:
        write_plan(report, out)
    assert e.value.exit_code == 6
    assert out.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".tmp-")] == []


def test_plan_file_has_the_mode_open_would_give(tmp_path: Path) -> None:
    import os
    import stat

    planned = Planned(write_raw_images(tmp_path, mixed_vms(4, [20])))
    out = tmp_path / "plan.json"
    old = os.umask(0o027)
    try:
        write_plan(planned.plan(), out)
    finally:
        os.umask(old)
    assert stat.S_IMODE(out.stat().st_mode) == 0o640


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(0, 30), max_size=80), st.one_of(st.none(), st.integers(1, 10)))
def test_pair_ranges_cover_the_pairs_and_never_cut_a_page(pages: list[int], step: int | None) -> None:
    from dengine_cli.engine.plan.choice import _pair_ranges

    sorted_pages = np.array(sorted(pages), dtype=np.int64)
    ranges = _pair_ranges(sorted_pages, step)
    assert ranges[0][0] == 0 and ranges[-1][1] == len(pages)
    assert all(a[1] == b[0] for a, b in itertools.pairwise(ranges))
    for lo, hi in ranges:
        assert hi > lo or len(pages) == 0
        if hi < len(pages):
            assert sorted_pages[hi - 1] != sorted_pages[hi]  # a page's pairs stay together
        if step is not None:
            # no longer than a step, but for the rest of the last page it took
            assert hi - lo <= step or sorted_pages[lo + step - 1] == sorted_pages[hi - 1]


def test_a_plan_at_one_job_starts_no_thread_and_plans_the_same(tmp_path: Path) -> None:
    # -j 1 does everything in one thread: the scope's sorts, the similarity keys and pairs
    # took two threads whatever -j said.
    import threading

    from dengine_cli.formats.base import OpenOptions
    from dengine_cli.parallel import Workers
    from dengine_cli.policies import resolve_policy
    from dengine_cli.session import Session, Settings

    paths = write_raw_images(tmp_path, mixed_vms(9, [600, 500]))
    started: list[str] = []
    start = threading.Thread.start

    def record(self: threading.Thread) -> None:
        started.append(self.name)
        start(self)

    reports = []
    for jobs in (1, 2):
        settings = Settings(options=OpenOptions(format="raw"), index_dir=tmp_path / f"idx{jobs}")
        with Session(paths, dataclasses.replace(settings, workers=Workers(jobs=jobs))) as session:
            session.indexes(keep_open=True)
            session.sharing()
            threading.Thread.start = record  # type: ignore[method-assign]
            try:
                reports.append(session.plan(resolve_policy("de"), baseline=None)[1])
            finally:
                threading.Thread.start = start  # type: ignore[method-assign]
        if jobs == 1:
            assert started == []
    assert started  # two jobs do start threads
    assert reports[0].total == reports[1].total
    for a, b in zip(reports[0].pages, reports[1].pages, strict=True):
        assert np.array_equal(a.actions, b.actions) and np.array_equal(a.sizes, b.sizes)
