"""The plan's codec work spread over workers: a plan measured by forked processes (bsdiff4 keeps
the GIL) or by threads (zstd lets go of it) equals the plan measured alone, page for page."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from dengine_cli.engine.plan import measure
from dengine_cli.engine.plan.model import PlanReport
from dengine_cli.engine.policy import Policy
from dengine_cli.formats.base import OpenOptions
from dengine_cli.parallel import Workers, fork_usable
from dengine_cli.policies import POLICIES
from dengine_cli.session import share_and_plan
from tests.vms import mixed_vms, write_raw_images

RAW = OpenOptions(format="raw")
BSDIFF = Policy("de-bsdiff", patch=True, compress=True, patch_codec="bsdiff4")


class Measurers:
    """The threads of this process that measured patches (the real function still runs).  After
    :meth:`expect`, each thread's first call waits until ``n`` threads have made theirs: under
    load the calling thread could otherwise take every chunk before a helper starts, and whether
    the work was spread would depend on the scheduler."""

    def __init__(self) -> None:
        self.seen: set[int] = set()
        self.meet: threading.Barrier | None = None
        self.lock = threading.Lock()

    def expect(self, n: int) -> None:
        self.seen.clear()
        self.meet = threading.Barrier(n, timeout=300)

    def record(self) -> None:
        with self.lock:
            first = threading.get_ident() not in self.seen
            self.seen.add(threading.get_ident())
        if first and self.meet is not None:
            self.meet.wait()


@pytest.fixture
def who_measured(monkeypatch: pytest.MonkeyPatch) -> Measurers:
    measurers = Measurers()
    real = measure.measure_patches

    def recording(*args: Any) -> Any:
        measurers.record()
        return real(*args)

    monkeypatch.setattr(measure, "measure_patches", recording)
    return measurers


def same_plan(a: PlanReport, b: PlanReport) -> None:
    assert a.to_dict() == b.to_dict()
    for x, y in zip(a.pages, b.pages, strict=True):
        assert np.array_equal(x.actions, y.actions) and np.array_equal(x.sizes, y.sizes)
        assert np.array_equal(x.patch_ref_vm, y.patch_ref_vm)
        assert np.array_equal(x.patch_ref_pos, y.patch_ref_pos)


@pytest.mark.skipif(not fork_usable(), reason="forking needs a single-threaded POSIX process")
@pytest.mark.parametrize("sample", [None, 0.5])
def test_plan_by_forked_processes_equals_plan_alone(tmp_path: Path, sample: float | None) -> None:
    paths = write_raw_images(tmp_path, mixed_vms(11, [300, 250, 200]))
    _, alone = share_and_plan(paths, BSDIFF, options=RAW, index_dir=tmp_path / "a", sample=sample,
                              workers=Workers(jobs=1))  # fmt: skip
    assert alone.total.patched > 0 and alone.total.compressed > 0
    spread = Workers(jobs=2, fork_min_pages=0)
    _, forked = share_and_plan(
        paths, BSDIFF, options=RAW, index_dir=tmp_path / "b", sample=sample, workers=spread
    )
    same_plan(alone, forked)


@pytest.mark.parametrize(
    "policy", [POLICIES["de"], Policy("esx-de", cross_vm=False, patch=True, compress=True)]
)
def test_plan_by_threads_equals_plan_alone(tmp_path: Path, policy: Policy, who_measured: Measurers) -> None:
    paths = write_raw_images(tmp_path, mixed_vms(13, [600, 500]))
    _, alone = share_and_plan(paths, policy, options=RAW, index_dir=tmp_path / "a", workers=Workers(jobs=1))
    assert len(who_measured.seen) == 1
    # Two threads must each take a chunk (else the barrier times out: the work was not cut).
    who_measured.expect(2)
    _, threaded = share_and_plan(
        paths, policy, options=RAW, index_dir=tmp_path / "b", workers=Workers(jobs=2)
    )
    assert len(who_measured.seen) == 2
    same_plan(alone, threaded)
