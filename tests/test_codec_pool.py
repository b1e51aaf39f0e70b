"""The codec worker: a plan measured in two processes equals the plan measured in one, errors in
the worker reach the caller as they are, a dead worker's chunks are measured by the caller, and
no worker is started where it cannot pay."""

from __future__ import annotations

import concurrent.futures
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zstandard

import dengine_cli.session as plan_module
from dengine_cli.codecs import compression_codec, patch_codec
from dengine_cli.engine.plan import measure as codec_pool
from dengine_cli.engine.plan.measure import CodecWorker, compressed_sizes, patch_sizes
from dengine_cli.engine.policy import Policy
from dengine_cli.errors import EXIT_BAD_DUMP, EXIT_UNREADABLE, FormatError, UnreadableFile
from dengine_cli.formats import open_dump
from dengine_cli.formats.base import OpenOptions
from dengine_cli.parallel import forked as workers
from dengine_cli.policies import POLICIES
from dengine_cli.session import share_and_plan
from tests.test_plan import mixed_vms, write_images

RAW = OpenOptions(format="raw")


@pytest.fixture
def small_chunks(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, int]]:
    """Chunks of 16 pages (so that small dumps make many), and the chunks handed to the worker,
    recorded: (function, pages)."""
    monkeypatch.setattr(codec_pool, "CHUNK", 16)
    handed: list[tuple[str, int]] = []
    submit = CodecWorker.submit

    def counting(self: CodecWorker, fn: Any, *args: Any) -> Any:
        fut = submit(self, fn, *args)
        handed.append((fn.__name__, len(args[-1]) if isinstance(args[-1], np.ndarray) else 0))
        return fut

    monkeypatch.setattr(CodecWorker, "submit", counting)
    return handed


@pytest.mark.parametrize("forked", [True, False], ids=["forked", "spawned"])
@pytest.mark.parametrize(
    ("policy", "sample"),
    [
        (POLICIES["de"], None),
        (Policy("esx-de", cross_vm=False, patch=True, compress=True), None),
        (POLICIES["de"], 0.5),
    ],
    ids=["de", "within-vm", "sampled"],
)
def test_plan_with_worker_equals_plan_without(
    tmp_path: Path,
    small_chunks: list[tuple[str, int]],
    monkeypatch: pytest.MonkeyPatch,
    policy: Policy,
    sample: float | None,
    forked: bool,
) -> None:
    started: list[bool] = []
    init = CodecWorker.__init__

    def recording(self: CodecWorker, *args: Any, **kwargs: Any) -> None:
        init(self, *args, **kwargs)
        started.append(self.forks)

    monkeypatch.setattr(CodecWorker, "__init__", recording)
    if not forked:
        monkeypatch.setattr(workers, "fork_usable", lambda: False)
    paths = write_images(tmp_path, mixed_vms(11, [300, 250, 200]))
    kwargs: dict[str, Any] = {"options": RAW, "index_dir": tmp_path / "idx", "sample": sample}
    _, alone = share_and_plan(paths, policy, codec_worker=False, **kwargs)
    assert small_chunks == []
    _, shared = share_and_plan(paths, policy, codec_worker=True, **kwargs)
    # The worker really measured patches and compressed pages, forked or spawned as asked.
    assert started == [forked]
    assert {name for name, _ in small_chunks} == {"_worker_patches", "_worker_compression"}
    assert alone.total.patched > 0 and alone.total.compressed > 0
    assert shared.to_dict() == alone.to_dict()
    for a, b in zip(alone.pages, shared.pages, strict=True):
        assert np.array_equal(a.actions, b.actions)
        assert np.array_equal(a.sizes, b.sizes)
        assert np.array_equal(a.patch_ref_pos, b.patch_ref_pos)


def _pages_and_pairs(tmp_path: Path) -> tuple[list[Path], list[Any], np.ndarray, np.ndarray]:
    paths = write_images(tmp_path, mixed_vms(5, [200, 150]))
    dumps = [open_dump(p, RAW) for p in paths]
    vm = np.repeat(np.arange(2, dtype=np.int64), [200, 150])
    pos = np.concatenate((np.arange(200), np.arange(150))).astype(np.int64)
    return paths, dumps, vm, pos


def _expected(dumps: list[Any], vm: np.ndarray, pos: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    pages = np.stack([dumps[v].read_page(int(dumps[v].gfns[p])) for v, p in zip(vm, pos, strict=True)])
    comp = compression_codec("zstd-1").compressed_sizes(pages)
    patches = patch_codec("xor-zstd").patch_sizes(pages[::-1].copy(), pages, limit=2048)
    return comp, patches


def test_dead_worker_chunks_are_measured_here(tmp_path: Path, small_chunks: list[tuple[str, int]]) -> None:
    paths, dumps, vm, pos = _pages_and_pairs(tmp_path)
    comp, patches = _expected(dumps, vm, pos)
    with CodecWorker(paths, RAW, [d.page_count for d in dumps], min_pages=0, wait=True) as worker:
        assert worker.usable()
        assert np.array_equal(compressed_sizes(dumps, dumps, "zstd-1", vm, pos, worker), comp)
        handed = len(small_chunks)
        assert handed > 0
        died = worker.submit(os._exit, 3)
        with pytest.raises(concurrent.futures.BrokenExecutor):
            died.result(timeout=60)
        got = patch_sizes(dumps, dumps, "xor-zstd", 2048, vm, pos, vm[::-1], pos[::-1], worker)
        assert np.array_equal(got, patches)
        assert not worker.usable()
        assert len(small_chunks) == handed + 1  # only os._exit: nothing more handed to it
    for d in dumps:
        d.close()


def test_worker_open_error_reaches_the_caller(tmp_path: Path, small_chunks: list[tuple[str, int]]) -> None:
    _, dumps, vm, pos = _pages_and_pairs(tmp_path)
    bad = tmp_path / "bad.elf"
    bad.write_bytes(b"\x7fELG" + bytes(4092))
    elf = OpenOptions(format="elf")
    with pytest.raises(FormatError) as here:
        open_dump(bad, elf)
    with (
        CodecWorker([bad], elf, [0], wait=True) as worker,
        pytest.raises(FormatError) as there,
    ):
        compressed_sizes(dumps, dumps, "zstd-1", vm, pos, worker)
    assert type(there.value) is type(here.value)
    assert str(there.value) == str(here.value)
    assert there.value.exit_code == EXIT_BAD_DUMP
    for d in dumps:
        d.close()


def test_dump_changed_under_the_worker(tmp_path: Path, small_chunks: list[tuple[str, int]]) -> None:
    paths, dumps, vm, pos = _pages_and_pairs(tmp_path)
    counts = [d.page_count for d in dumps]
    counts[1] += 1
    with CodecWorker(paths, RAW, counts, wait=True) as worker, pytest.raises(UnreadableFile) as err:
        patch_sizes(dumps, dumps, "xor-zstd", 2048, vm, pos, vm, pos, worker)
    assert str(err.value) == f"{paths[1]}: cannot read: changed while being planned (151 pages, now 150)"
    assert err.value.exit_code == EXIT_UNREADABLE
    for d in dumps:
        d.close()


def _no_worker_allowed(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("a codec worker was started")

    monkeypatch.setattr(plan_module, "CodecWorker", refuse)


def test_no_worker_for_little_work_or_one_job(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    paths = write_images(tmp_path, mixed_vms(2, [100, 100]))
    _no_worker_allowed(monkeypatch)
    share_and_plan(paths, POLICIES["de"], options=RAW, index_dir=tmp_path / "idx")
    monkeypatch.setattr(codec_pool, "MIN_PAGES", 0)
    share_and_plan(paths, POLICIES["de"], options=RAW, index_dir=tmp_path / "idx", jobs=1)
    # Sharing only: nothing to measure.
    share_and_plan(paths, POLICIES["esx"], options=RAW, index_dir=tmp_path / "idx")


def test_no_worker_for_compressed_containers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    plain, other = write_images(tmp_path, mixed_vms(3, [100, 100]))
    packed = tmp_path / "vm.raw.zst"
    packed.write_bytes(zstandard.ZstdCompressor().compress(other.read_bytes()))
    _no_worker_allowed(monkeypatch)
    monkeypatch.setattr(codec_pool, "MIN_PAGES", 0)
    _, report = share_and_plan([plain, packed], POLICIES["de"], options=RAW, index_dir=tmp_path / "idx")
    assert report.total.compressed > 0


def test_worker_only_for_codecs_that_keep_the_gil(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """zstd, zlib, lz4 are measured by threads of the plan's process; bsdiff4, which keeps the
    GIL, gets the worker process."""
    paths = write_images(tmp_path, mixed_vms(4, [150, 150]))
    monkeypatch.setattr(codec_pool, "MIN_PAGES", 0)
    monkeypatch.setattr(codec_pool, "FORK_MIN_PAGES", 0)
    monkeypatch.setattr(codec_pool, "CODEC_THREADS", 2)
    made: list[CodecWorker] = []
    init = CodecWorker.__init__

    def recording(self: CodecWorker, *args: Any, **kwargs: Any) -> None:
        init(self, *args, **kwargs)
        made.append(self)

    monkeypatch.setattr(CodecWorker, "__init__", recording)
    share_and_plan(paths, POLICIES["de"], options=RAW, index_dir=tmp_path / "idx")
    assert made == []
    bsdiff = Policy("de-bsdiff", cross_vm=True, patch=True, compress=True, patch_codec="bsdiff4")
    _, report = share_and_plan(paths, bsdiff, options=RAW, index_dir=tmp_path / "idx")
    assert len(made) == 1 and report.total.patched > 0
