"""The session: the one place that opens dumps, loads and stores caches, and runs the engine's
stages for each command (``index``, ``analyze``, ``plan``).

Stages (:mod:`dengine_cli.engine`) take arrays and open dumps and return data; the session decides
what comes from a cache, what is computed, and in how many threads or processes
(:mod:`dengine_cli.parallel`)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from dengine_cli.cache import sharing_store
from dengine_cli.engine.index import PageIndex, Progress
from dengine_cli.engine.plan import PlanReport, plan_dumps
from dengine_cli.engine.plan import measure as codec_pool
from dengine_cli.engine.plan.measure import CodecWorker
from dengine_cli.engine.plan.model import Bool
from dengine_cli.engine.policy import Policy
from dengine_cli.engine.sharing import SharingReport, share
from dengine_cli.engine.temperature import hot_pages
from dengine_cli.errors import UsageError
from dengine_cli.formats import open_dump
from dengine_cli.formats.base import Dump, OpenOptions
from dengine_cli.pages import BATCH_PAGES
from dengine_cli.session.indexing import build_indexes


def analyze(
    paths: Sequence[Path | str],
    options: OpenOptions | None = None,
    *,
    index_dir: Path | str | None = None,
    jobs: int | None = None,
    cross_vm: bool = True,
    batch_pages: int = BATCH_PAGES,
    on_progress: Progress | None = None,
) -> SharingReport:
    """Index the dumps at ``paths`` (from the cache where possible, building the others in
    ``jobs`` processes) and compute their exact sharing (or read it from the cache, where an
    earlier command stored it for these very dumps: :mod:`dengine_cli.sharing_cache`)."""
    options = options or OpenOptions()
    opened: dict[int, Dump] = {}
    try:
        indexes = build_indexes(
            paths, options, index_dir, jobs, on_progress, batch_pages=batch_pages, keep_open=opened
        )
        for i, path in enumerate(paths):
            if i not in opened:
                opened[i] = open_dump(path, options)
        dumps = [opened[i] for i in range(len(paths))]
        return cached_share(
            indexes, dumps, index_dir, cross_vm=cross_vm, batch_pages=batch_pages, on_progress=on_progress
        )
    finally:
        for dump in opened.values():
            dump.close()


def cached_share(
    indexes: Sequence[PageIndex],
    dumps: Sequence[Dump],
    index_dir: Path | str | None,
    *,
    cross_vm: bool = True,
    batch_pages: int = BATCH_PAGES,
    on_progress: Progress | None = None,
) -> SharingReport:
    """:func:`~dengine_cli.sharing.share`, read from the cache when it holds this very set of
    dumps, else computed and stored (when the cache directory is writable)."""
    key = sharing_store.sharing_key(indexes, cross_vm, 64)
    if key is not None:
        file = sharing_store.file_for(key, index_dir)
        names = [d.name for d in dumps]
        found = sharing_store.load(file, key, names, [ix.page_count for ix in indexes])
        if found is not None:
            return found
    report = share(indexes, dumps, cross_vm=cross_vm, batch_pages=batch_pages, on_progress=on_progress)
    if key is not None:
        sharing_store.store(report, key, file)
    return report


def share_and_plan(
    paths: Sequence[Path | str],
    policy: Policy,
    *,
    options: OpenOptions | None = None,
    index_dir: Path | str | None = None,
    jobs: int | None = None,
    history: Mapping[str, Path | str] | None = None,
    host_memory: int | None = None,
    sample: float | None = None,
    seed: int = 0,
    baseline: Policy | None = None,
    batch_pages: int = BATCH_PAGES,
    on_progress: Progress | None = None,
    codec_worker: bool | None = None,
) -> tuple[SharingReport, PlanReport]:
    """Index the dumps at ``paths`` (cached), share them exactly and plan them with ``policy``.

    Returns the exact sharing (across VMs as ``policy.cross_vm`` says) beside the plan.
    ``history`` maps a dump's path (as given in ``paths``) to an earlier snapshot of the same VM:
    that VM's changed pages are hot.  VMs without history count as all cold, and the plan is
    then an upper bound.  ``baseline``: a second policy planned on the same VMs for comparison.
    ``codec_worker``: measure patches and compressed pages in two processes (``None``: when
    ``jobs`` allows it and there is enough to measure, see :mod:`dengine_cli.codec_pool`;
    ``True``: always, for any amount, waiting for the worker to start; ``False``: never).
    """
    options = options or OpenOptions()
    history = dict(history or {})
    unknown = [k for k in history if k not in {str(p) for p in paths}]
    if unknown:
        raise UsageError(f"history given for {unknown[0]}, which is not one of the dumps planned")
    earlier_paths = [history[str(p)] for p in paths if str(p) in history]
    opened: dict[int, Dump] = {}
    dumps: list[Dump] = []
    worker: CodecWorker | None = None
    try:
        indexes = build_indexes(
            [*paths, *earlier_paths],
            options,
            index_dir,
            jobs,
            on_progress,
            batch_pages=batch_pages,
            keep_open=opened,
        )
        current, earlier = indexes[: len(paths)], indexes[len(paths) :]
        # Earlier snapshots are opened again below, one at a time.
        for i in [i for i in opened if i >= len(paths)]:
            opened.pop(i).close()
        for i, path in enumerate(paths):
            dumps.append(opened.pop(i) if i in opened else open_dump(path, options))
        worker = _start_worker(paths, options, dumps, current, (policy, baseline), jobs, codec_worker, sample)
        hot: list[Bool | None] = []
        k = 0
        for v, path in enumerate(paths):
            if str(path) not in history:
                hot.append(None)
                continue
            with open_dump(history[str(path)], options) as before:
                hot.append(hot_pages(dumps[v], current[v], before, earlier[k], batch_pages=batch_pages))
            k += 1
        sharing = cached_share(
            current,
            dumps,
            index_dir,
            cross_vm=policy.cross_vm,
            batch_pages=batch_pages,
            on_progress=on_progress,
        )
        return sharing, plan_dumps(
            dumps,
            current,
            sharing,
            policy,
            hot=hot,
            host_memory=host_memory,
            sample=sample,
            seed=seed,
            baseline=baseline,
            batch_pages=batch_pages,
            on_progress=on_progress,
            codec_worker=worker,
        )
    finally:
        if worker is not None:
            worker.close()
        for dump in [*dumps, *opened.values()]:
            dump.close()


def _start_worker(
    paths: Sequence[Path | str],
    options: OpenOptions,
    dumps: Sequence[Dump],
    indexes: Sequence[PageIndex],
    policies: Sequence[Policy | None],
    jobs: int | None,
    wanted: bool | None,
    sample: float | None = None,
) -> CodecWorker | None:
    """A codec worker when one may be needed (:func:`plan_dumps` decides whether it is used): a
    fork of this process made when first used, or, where forking is not safe, a spawned one
    started now (before sharing: it takes about half a second to be ready)."""
    from dengine_cli.parallel.forked import fork_usable

    counts = [d.page_count for d in dumps]
    if wanted:
        return CodecWorker(paths, options, counts, min_pages=0, wait=True, dumps=dumps)
    if wanted is False or not any(p is not None and (p.patch or p.compress) for p in policies):
        return None
    if not codec_pool.worker_pays(dumps, jobs):
        return None
    if codec_pool.CODEC_THREADS > 1 and all(_codecs_release_gil(p) for p in policies if p is not None):
        # Threads of this process measure instead: faster than a worker process here (exact
        # plan of 1.5 GiB: 0.59-0.69 s against 0.75-0.78 s), with no fork, no pages read
        # twice, no results pickled.
        return None
    if fork_usable():
        # Forked only if plan_dumps gives it work (see CodecWorker): costs nothing meanwhile.
        return CodecWorker(paths, options, counts, dumps=dumps)
    # A spawned worker starts now.  The non-zero pages bound the pages that will be measured
    # (distinct contents only); a sampled plan measures about that fraction of them.  A worker
    # that is not needed costs twice: its start-up (0.5 s of CPU) slows the sharing that runs
    # meanwhile on both CPUs.
    nonzero = sum(ix.page_count - ix.zero_pages for ix in indexes)
    if sample is not None:
        nonzero = int(nonzero * sample)
    if nonzero < codec_pool.MIN_PAGES:
        return None
    return CodecWorker(paths, options, counts)


def _codecs_release_gil(policy: Policy) -> bool:
    """Whether the codecs ``policy`` measures with let go of the GIL (threads can share them)."""
    from dengine_cli.codecs import compression_codec, patch_codec

    return (not policy.patch or patch_codec(policy.patch_codec).releases_gil) and (
        not policy.compress or compression_codec(policy.compression_codec).releases_gil
    )


# --- the plan file -------------------------------------------------------------------------------
