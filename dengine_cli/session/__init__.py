"""The session: the one place that opens dumps, loads and stores caches, and runs the engine's
stages for each command (``index``, ``analyze``, ``plan``).

Stages (:mod:`dengine_cli.engine`) take arrays and open dumps and return data; the session decides
what comes from a cache, what is computed, where arrays wait when they do not fit in memory
(:mod:`~dengine_cli.session.memory`), and how many threads or processes work
(:class:`~dengine_cli.parallel.Workers`).  A dump is opened at most once per session, and only
when its pages must be read: building its index, verifying matches, planning.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

import numpy as np

from dengine_cli.arrays import ArrayHome
from dengine_cli.cache import sharing_store
from dengine_cli.cache.keys import default_index_dir
from dengine_cli.engine.index import PageIndex, Progress
from dengine_cli.engine.sharing.model import ContentIds, SharingReport
from dengine_cli.errors import OutputError
from dengine_cli.formats.base import Dump, OpenOptions
from dengine_cli.pages import BATCH_PAGES
from dengine_cli.parallel import Workers
from dengine_cli.session.indexing import IndexBuild

if TYPE_CHECKING:
    # Imported where a plan is made: analyze pays for none of the planner (25 ms).
    from dengine_cli.engine.plan.model import Bool, PlanReport
    from dengine_cli.engine.policy import Policy
    from dengine_cli.engine.sharing.pipeline import RunStore

from dengine_cli.session.memory import (
    MemoryPlan,
    default_memory_limit,
    index_group_pages,
    plan_array_home,
    plan_memory,
)


@dataclass(frozen=True)
class Settings:
    """What every command that reads pages is given: how dumps are opened, where caches and
    temporary files go, how much memory and how many CPUs it may use, whether matches are
    compared byte by byte."""

    options: OpenOptions = dataclasses.field(default_factory=OpenOptions)
    index_dir: Path | None = None
    tmp_dir: Path | None = None
    workers: Workers = dataclasses.field(default_factory=Workers)
    memory_limit: int | None = None
    verify: bool = False
    batch_pages: int = BATCH_PAGES

    @property
    def limit(self) -> int:
        return self.memory_limit if self.memory_limit is not None else default_memory_limit()

    @property
    def cache_dir(self) -> Path:
        return self.index_dir if self.index_dir is not None else default_index_dir()


class Session:
    """The dumps at ``paths`` under ``settings``: their indexes, their sharing, their plans.
    Close it (or use it as a context manager) to close the dumps it opened."""

    def __init__(
        self,
        paths: Sequence[Path | str],
        settings: Settings | None = None,
        on_progress: Progress | None = None,
    ) -> None:
        self.paths = list(paths)
        self.settings = settings or Settings()
        self.on_progress = on_progress
        self._opened: dict[int, Dump] = {}
        #: Of ``_opened``, the dumps whose page tables are mapped from a file.
        self._mapped_tables: set[int] = set()
        self._indexes: list[PageIndex] | None = None
        self._extra: dict[str, PageIndex] = {}
        self._plan_home: ArrayHome | None = None

    # --- dumps and indexes ---------------------------------------------------------------------

    def _build(self, group_pages: int | None = None) -> IndexBuild:
        s = self.settings
        return IndexBuild(
            s.options,
            s.index_dir,
            s.workers,
            batch_pages=s.batch_pages,
            group_pages=group_pages if group_pages is not None else index_group_pages(s.limit),
            on_progress=self.on_progress,
            on_kept=self._map_page_tables,
        )

    def indexes(self, also: Sequence[Path | str] = (), *, keep_open: bool = False) -> list[PageIndex]:
        """The index of every dump (cached or built), in order; ``also``: more dumps indexed in
        the same pass (earlier snapshots), kept for :meth:`index_of`.  ``keep_open``: the dumps
        opened to build indexes stay open for :meth:`dumps` (a plan reads them again); else
        they are closed as soon as their group is indexed (an open dump holds 16 bytes a page of
        page table)."""
        if self._indexes is None or any(str(p) not in self._extra for p in also):
            everything = [*self.paths, *also]
            keep: dict[int, Dump] | None = dict(self._opened) if keep_open else None
            built = self._build().indexes(everything, keep)
            for i, dump in (keep or {}).items():
                if i < len(self.paths):
                    self._opened[i] = dump
                else:
                    dump.close()
            self._bound_page_tables(self._opened)
            self._indexes = built[: len(self.paths)]
            for p, index in zip(also, built[len(self.paths) :], strict=True):
                self._extra[str(p)] = index
        return self._indexes

    def index_of(self, path: Path | str) -> PageIndex:
        """The index of a dump given in ``also`` to :meth:`indexes`."""
        return self._extra[str(path)]

    def dumps(self) -> list[Dump]:
        """Every dump, open (each opened once per session)."""
        from dengine_cli.formats import open_dump

        for i, path in enumerate(self.paths):
            if i not in self._opened:
                self._opened[i] = open_dump(path, self.settings.options)
                self._bound_page_tables(self._opened)
        return [self._opened[i] for i in range(len(self.paths))]

    def _bound_page_tables(self, opened: dict[int, Dump]) -> None:
        """Past a quarter of the memory limit, the page tables of the ``opened`` dumps (16-21
        bytes a page: 64 MiB for a fleet of 16 GiB) are moved to mapped files
        (:meth:`Dump.map_page_table`), and those of dumps opened later as they open; the figures
        are the same."""
        if sum(d.page_table_bytes for d in opened.values()) > self.settings.limit // 4:
            self._map_page_tables(opened)

    def _map_page_tables(self, opened: dict[int, Dump]) -> None:
        """The page tables of the ``opened`` dumps moved to mapped files (those not already)."""
        held = [i for i in opened if i not in self._mapped_tables]
        folder = self.settings.tmp_dir or self.settings.cache_dir
        try:
            folder.mkdir(parents=True, exist_ok=True)
            for i in held:
                opened[i].map_page_table(folder)
                self._mapped_tables.add(i)
        except OSError as e:
            raise OutputError(folder, f"cannot map page tables: {e.strerror or e}") from e

    def close(self) -> None:
        for dump in self._opened.values():
            dump.close()
        self._opened.clear()
        self._mapped_tables.clear()

    def __enter__(self) -> Session:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    # --- sharing -------------------------------------------------------------------------------

    def memory_plan(self) -> MemoryPlan:
        indexes = self.indexes()
        total = sum(ix.page_count for ix in indexes)
        nonzero = total - sum(ix.zero_pages for ix in indexes)
        return plan_memory(self.settings.limit, total, nonzero, self.settings.workers.count)

    def sharing(self, cross_vm: bool = True) -> SharingReport:
        """The exact sharing of the dumps: read from the cache when an earlier command stored it
        for these very dumps, else computed stage by stage and stored."""
        verify = self.settings.verify
        indexes = self.indexes(keep_open=verify)
        key = sharing_store.sharing_key(indexes, cross_vm, 128, verify)
        file = None
        if key is not None:
            file = sharing_store.file_for(key, self.settings.index_dir)
            names = [ix.name for ix in indexes]
            found = sharing_store.load(file, key, names, [ix.page_count for ix in indexes])
            if found is not None:
                return found
        report = self._share(indexes, cross_vm, verify)
        if key is not None and file is not None and sharing_store.store(report, key, file):
            # Read back mapped: the content ids then live in the page cache, not in memory.
            names = [ix.name for ix in indexes]
            report = sharing_store.load(file, key, names, [ix.page_count for ix in indexes]) or report
        return report

    def _share(self, indexes: Sequence[PageIndex], cross_vm: bool, verify: bool) -> SharingReport:
        # Imported here: a command that finds the result cached needs none of the stages.
        from dengine_cli.cache.spill import SpilledRuns
        from dengine_cli.engine.sharing.pipeline import MemoryRuns, share

        plan = self.memory_plan()
        dumps = self.dumps() if verify else None
        with contextlib.ExitStack() as stack:
            runs: RunStore = MemoryRuns()
            ids: list[ContentIds] | None = None
            if plan.spill_runs or plan.ids_in_file:
                spill = stack.enter_context(SpilledRuns(self.settings.tmp_dir or self.settings.cache_dir))
                if plan.spill_runs:
                    runs = spill
                if plan.ids_in_file:
                    ids = _mapped_ids(spill.dir, indexes)
            return share(
                indexes,
                dumps,
                cross_vm=cross_vm,
                verify=verify,
                shape=plan.shape,
                runs=runs,
                content_ids=ids,
                on_progress=self.on_progress,
            )

    # --- plans ---------------------------------------------------------------------------------

    def plan_home(self) -> ArrayHome:
        """Where this session's plans keep their per-page arrays (and the plan file its arrays
        over contents): memory, or past half the memory limit files under ``--tmp-dir`` or the
        index directory (:func:`~dengine_cli.session.memory.plan_array_home`)."""
        if self._plan_home is None:
            total = sum(ix.page_count for ix in self.indexes())
            s = self.settings
            self._plan_home = plan_array_home(s.limit, total, s.tmp_dir or s.cache_dir)
        return self._plan_home

    def plan(
        self,
        policy: Policy,
        *,
        history: Mapping[str, Path | str] | None = None,
        host_memory: int | None = None,
        sample: float | None = None,
        seed: int = 0,
        baseline: Policy | None = None,
    ) -> tuple[SharingReport, PlanReport]:
        """The exact sharing (across VMs as ``policy.cross_vm`` says) and the plan under
        ``policy`` (beside ``baseline``).  ``history`` maps a dump's path, as given, to an
        earlier snapshot of the same VM: that VM's changed pages are hot; VMs without history
        count as all cold, and the plan is then an upper bound.  Keys of ``history`` that name
        no dump are not used (the command line refuses them)."""
        from dengine_cli.engine.plan import plan_dumps

        history = dict(history or {})
        indexes = self.indexes(also=list(history.values()), keep_open=True)
        dumps = self.dumps()
        hot = [self._hot(v, history.get(str(path))) for v, path in enumerate(self.paths)]
        sharing = self.sharing(policy.cross_vm)
        return sharing, plan_dumps(
            dumps,
            indexes,
            sharing,
            policy,
            hot=hot,
            host_memory=host_memory,
            sample=sample,
            seed=seed,
            baseline=baseline,
            batch_pages=self.settings.batch_pages,
            on_progress=self.on_progress,
            workers=self.settings.workers,
            home=self.plan_home(),
        )

    def _hot(self, v: int, earlier: Path | str | None) -> Bool | None:
        if earlier is None:
            return None
        from dengine_cli.engine.temperature import hot_pages
        from dengine_cli.formats import open_dump

        with open_dump(earlier, self.settings.options) as before:
            return hot_pages(
                self.dumps()[v],
                self.indexes()[v],
                before,
                self.index_of(earlier),
                verify=self.settings.verify,
                batch_pages=self.settings.batch_pages,
            )


def _mapped_ids(folder: Path, indexes: Sequence[PageIndex]) -> list[ContentIds]:
    """Zeroed content id arrays in a file under ``folder`` (mapped; the file goes with it)."""
    nonzero = sum(ix.page_count - ix.zero_pages for ix in indexes)
    dtype = np.uint32 if nonzero < (1 << 32) - 1 else np.uint64
    ids: list[ContentIds] = []
    for v, ix in enumerate(indexes):
        if ix.page_count == 0:
            ids.append(np.zeros(0, dtype=dtype))
            continue
        ids.append(np.memmap(folder / f"ids-{v:06d}", dtype=dtype, mode="w+", shape=(ix.page_count,)))
    return ids


def analyze(
    paths: Sequence[Path | str],
    options: OpenOptions | None = None,
    *,
    settings: Settings | None = None,
    index_dir: Path | str | None = None,
    cross_vm: bool = True,
    on_progress: Progress | None = None,
    **given: Any,
) -> SharingReport:
    """The exact sharing of the dumps at ``paths``: :meth:`Session.sharing`.  Keywords beyond
    these are :class:`Settings` fields."""
    settings = _settings(settings, options, index_dir, given)
    with Session(paths, settings, on_progress) as session:
        return session.sharing(cross_vm)


def share_and_plan(
    paths: Sequence[Path | str],
    policy: Policy,
    *,
    settings: Settings | None = None,
    options: OpenOptions | None = None,
    index_dir: Path | str | None = None,
    history: Mapping[str, Path | str] | None = None,
    host_memory: int | None = None,
    sample: float | None = None,
    seed: int = 0,
    baseline: Policy | None = None,
    on_progress: Progress | None = None,
    **given: Any,
) -> tuple[SharingReport, PlanReport]:
    """Index, share and plan the dumps at ``paths``: :meth:`Session.plan`.  Keywords beyond
    these are :class:`Settings` fields."""
    settings = _settings(settings, options, index_dir, given)
    with Session(paths, settings, on_progress) as session:
        return session.plan(
            policy, history=history, host_memory=host_memory, sample=sample, seed=seed, baseline=baseline
        )


def _settings(
    settings: Settings | None,
    options: OpenOptions | None,
    index_dir: Path | str | None,
    given: dict[str, Any],
) -> Settings:
    settings = settings or Settings()
    if options is not None:
        given["options"] = options
    if index_dir is not None:
        given["index_dir"] = Path(index_dir)
    return dataclasses.replace(settings, **given) if given else settings


__all__ = ["Session", "Settings", "analyze", "share_and_plan"]
