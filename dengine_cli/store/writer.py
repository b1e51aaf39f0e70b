"""The store as one apply writes it: a directory locked for the apply, new packs under a run id,
and a catalog that becomes the store by one rename.

Crash safety.  An apply never changes a file another store generation uses: it writes packs
named by its own run id and its catalog under a temporary name, fsyncs them and the ``packs``
directory, and then renames the catalog over ``catalog.sqlite`` (and fsyncs the directory): that
rename is the commit.  Killed before it, the previous catalog and its packs are untouched (the new
packs are files no catalog names, removed by the next apply); killed after it, the new store is
complete.  A first apply killed before its commit leaves no catalog, which ``verify`` and
``restore`` refuse ("not a complete dengine store").  After the commit the packs no catalog names
(the previous generation's, and any left by a killed apply) are removed, under the exclusive
``lock`` that readers hold shared while they open the catalog and its packs.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import TracebackType

from dengine_cli.errors import OutputError
from dengine_cli.store.catalog import CatalogWriter
from dengine_cli.store.layout import APPLY_LOCK, CATALOG, LOCK, PACK_SUFFIX, PACKS
from dengine_cli.store.packs import PackWriter, WrittenPack

#: Names an apply may find in a store directory (anything else: not a store, not touched).
STORE_NAMES = frozenset({CATALOG, PACKS, APPLY_LOCK, LOCK})
TMP_PREFIX = ".catalog-"
#: Seconds an apply waits for another apply of the same store to let go of it.  An apply killed
#: outright lets go only once the kernel has reaped it and its workers, a moment after the shell
#: saw it die; an apply that is really running is reported after this wait.
LOCK_WAIT = 3.0


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _flock_within(fd: int, seconds: float) -> bool:
    """Take an exclusive flock on ``fd``, trying until ``seconds`` have passed."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.02)


@contextmanager
def store_lock(store: Path, shared: bool) -> Iterator[None]:
    """``STORE/lock``, shared (readers opening the store) or exclusive (an apply committing).
    A reader of a store it cannot write (read-only media) goes on without the lock."""
    try:
        fd = os.open(store / LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError:
        if not shared:
            raise
        yield
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_SH if shared else fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


class StoreWriter:
    """One apply's writing of the store at ``store``: :attr:`packs` to append page data to,
    :meth:`commit` to write the catalog and make it the store.  Leaving the ``with`` block
    without a commit removes what this apply wrote: its packs, and for a new store the
    directories it made (an error leaves no store skeleton behind; a kill may).  A complete
    store already at ``store`` is refused unless ``replace``: it may be the only copy of a
    fleet whose dumps are gone, and ``-o`` naming the wrong directory would lose it."""

    def __init__(self, store: Path, lock_wait: float = LOCK_WAIT, *, replace: bool = False) -> None:
        self.store = store
        self.lock_wait = lock_wait
        self.replace = replace
        self.run = os.urandom(16)
        self._lock_fd: int | None = None
        self._tmp: Path | None = None
        #: The directories this apply makes, the store first, then the parents it needs.
        # os.path's tests: False where pathlib's raise (a folder this user cannot search).
        self._made = [p for p in (store, *store.parents) if not os.path.exists(p)]
        self.committed = False
        try:
            self._prepare()
            self.packs = PackWriter(store / PACKS, self.run)
        except BaseException:
            # Refused, or a signal (Ctrl-C, SIGTERM) before the ``with`` block began: what
            # ``_prepare`` made goes as ``__exit__`` would take it.
            self._let_go()
            raise

    def _prepare(self) -> None:
        store = self.store
        if os.path.exists(store) and not os.path.isdir(store):
            raise OutputError(store, "exists and is not a directory (a store is a directory)")
        if os.path.isdir(store):
            foreign = sorted(p.name for p in store.iterdir() if p.name not in STORE_NAMES and
                             not p.name.startswith(TMP_PREFIX))  # fmt: skip
            if foreign:
                raise OutputError(store, f"is a directory but not a dengine store (it holds {foreign[0]!r})")
            if not self.replace and os.path.lexists(store / CATALOG):
                raise OutputError(
                    store,
                    "a dengine store is there already (--replace replaces it once the new one is complete)",
                )
        try:
            (store / PACKS).mkdir(parents=True, exist_ok=True)
            fsync_dir(store)
            fsync_dir(store.parent if str(store.parent) else Path("."))
            self._lock_fd = os.open(store / APPLY_LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as e:
            raise OutputError(store, e.strerror or str(e)) from e
        if not _flock_within(self._lock_fd, self.lock_wait):
            os.close(self._lock_fd)
            self._lock_fd = None
            raise OutputError(
                store, f"another dengine apply is writing this store (waited {self.lock_wait:g} s for it)"
            )

    def commit(self, write_catalog: Callable[[CatalogWriter, list[WrittenPack]], None]) -> None:
        """Close the packs, write the catalog (``write_catalog`` fills it), rename it into place,
        then remove the packs no catalog names any more."""
        written = self.packs.close()
        try:
            fsync_dir(self.store / PACKS)
            self._tmp = self.store / f"{TMP_PREFIX}{self.run.hex()}.sqlite.tmp"
            catalog = CatalogWriter(self._tmp)
            try:
                write_catalog(catalog, written)
            except BaseException:
                catalog.abandon()
                raise
            catalog.close()
            with store_lock(self.store, shared=False):
                os.replace(self._tmp, self.store / CATALOG)
                self._tmp = None
                self.committed = True
                fsync_dir(self.store)
                self._remove_unused({w.file for w in written})
        except OSError as e:
            raise OutputError(self.store, e.strerror or str(e)) from e

    def _remove_unused(self, keep: set[str]) -> None:
        for p in (self.store / PACKS).iterdir():
            if p.name.endswith(PACK_SUFFIX) and p.name not in keep:
                with contextlib.suppress(OSError):
                    p.unlink()
        for p in self.store.iterdir():
            if p.name.startswith(TMP_PREFIX):
                with contextlib.suppress(OSError):
                    p.unlink()

    def __enter__(self) -> StoreWriter:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if not self.committed:
            self.packs.abandon()
            for f in self.packs.files:
                with contextlib.suppress(OSError):
                    f.unlink()
            if self._tmp is not None:
                with contextlib.suppress(OSError):
                    self._tmp.unlink()
        self._let_go()

    def _let_go(self) -> None:
        """Unlock, and remove the store this apply made if it did not commit it."""
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None
        if not self.committed and self.store in self._made:
            self._remove_new_store()

    def _remove_new_store(self) -> None:
        """Remove the store this apply made and did not commit: its lock files and empty
        directories (anything else found there, say a pack a racing apply wrote, stays)."""
        for name in (APPLY_LOCK, LOCK):
            with contextlib.suppress(OSError):
                (self.store / name).unlink()
        for folder in (self.store / PACKS, *self._made):
            with contextlib.suppress(OSError):
                folder.rmdir()
