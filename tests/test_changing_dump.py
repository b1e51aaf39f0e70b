"""A dump that changes after it was opened (truncated, rewritten): a one-line "changed while being
read" error (exit 3) on every path that reads pages, never SIGBUS or a traceback, and no index
cached for it.  On real QEMU dumps: in process (each reader, the index scan, forked workers,
a worker that dies of SIGBUS) and through the CLI in a subprocess frozen right after it mapped
the dump (state, not timing, decides when the file is cut; an attempt that froze it only after
it had read the whole dump is judged on its own and made again)."""

from __future__ import annotations

import faulthandler
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from dengine_cli.engine.index import hash_dump
from dengine_cli.errors import EXIT_BAD_DUMP, EXIT_UNREADABLE, UnreadableFile
from dengine_cli.formats import open_dump
from dengine_cli.formats.base import Dump
from dengine_cli.parallel import Workers, fork_usable
from dengine_cli.parallel.forked import hash_forked
from dengine_cli.session.indexing import build_indexes
from tests.conftest import REPO
from tests.processes import mapped_by

DENGINE = str(REPO / ".venv" / "bin" / "dengine")


def copy(real_dump: Callable[[str], Path], name: str, to: Path) -> Path:
    target = to / name
    shutil.copyfile(real_dump(name), target)
    return target


READ_PATHS = [
    (name, how)
    for name in ("alpha.elf", "alpha.kdump", "alpha.qevm")
    for how in ("scan", "batches", "pages_at", "read_page", "mapped_pages")
    if not (name == "alpha.kdump" and how == "mapped_pages")  # compressed: nothing mapped to give
]


@pytest.mark.parametrize(("name", "how"), READ_PATHS)
def test_truncated_after_open_every_read_path(
    tmp_path: Path, real_dump: Callable[[str], Path], name: str, how: str
) -> None:
    path = copy(real_dump, name, tmp_path)
    size = path.stat().st_size
    with open_dump(path) as dump:
        os.truncate(path, size // 2)
        with pytest.raises(UnreadableFile) as e:
            if how == "scan":
                hash_dump(dump)
            elif how == "batches":
                for _ in dump.batches():
                    pass
            elif how == "pages_at":
                dump.pages_at(dump.gfns[-10:])
            elif how == "read_page":
                dump.read_page(int(dump.gfns[-1]))
            else:
                dump.mapped_pages()
    assert e.value.exit_code == EXIT_UNREADABLE
    assert (
        str(e.value)
        == f"{path}: cannot read: it changed while being read ({size} bytes then, {size // 2} now)"
    )


def test_rewritten_in_place_same_size(tmp_path: Path, real_dump: Callable[[str], Path]) -> None:
    path = copy(real_dump, "alpha.elf", tmp_path)
    with open_dump(path) as dump:
        _rewrite_last_page(path)
        with pytest.raises(UnreadableFile, match=r"it changed while being read \(modified, same size\)$"):
            hash_dump(dump)


def _rewrite_last_page(path: Path) -> None:
    """Write over the file's last 4096 bytes in place (same size), its mtime a second on (the
    clock may not have ticked since the open)."""
    st = path.stat()
    with path.open("r+b") as f:
        f.seek(st.st_size - 4096)
        f.write(b"\xee" * 4096)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))


@pytest.mark.parametrize("name", ["alpha.elf", "alpha.kdump", "alpha.qevm"])
@pytest.mark.parametrize("how", ["scan", "batches"])
def test_written_while_the_last_batch_is_read(
    tmp_path: Path, real_dump: Callable[[str], Path], name: str, how: str
) -> None:
    """The check before each batch cannot see a write made while the last one is read: the
    pass checks once more after it, so it never ends as if it had read one state of the file."""
    path = copy(real_dump, name, tmp_path)
    with open_dump(path) as dump:
        batches = getattr(dump, how)(1024)
        seen = 0
        with pytest.raises(UnreadableFile, match=r"it changed while being read \(modified, same size\)$"):
            for batch in batches:
                seen += len(batch)
                if seen == dump.page_count:
                    _rewrite_last_page(path)
        assert seen == dump.page_count


def test_apply_refuses_a_dump_written_during_its_pass(
    tmp_path: Path, real_dump: Callable[[str], Path]
) -> None:
    """apply's worker threads read mapped pages after its pass asked for the next batch: a dump
    written while the last batches are encoded is found before the store is committed, and no
    store is left (exit 3 through the CLI's error)."""
    from click.testing import CliRunner

    from dengine_cli.cli import cli
    from dengine_cli.store.apply import apply_plan

    path = copy(real_dump, "alpha.elf", tmp_path)
    plan_file, store = tmp_path / "plan.json", tmp_path / "store"
    made = CliRunner().invoke(
        cli,
        [
            "-q",
            "plan",
            "--baseline",
            "none",
            "--index-dir",
            str(tmp_path / "i"),
            "-o",
            str(plan_file),
            str(path),
        ],
    )
    assert made.exit_code == 0, made.output

    def on_progress(what: str, done: int, total: int) -> None:
        if done == total:
            _rewrite_last_page(path)

    with pytest.raises(UnreadableFile, match=r"changed while being read \(modified, same size\)") as e:
        apply_plan(plan_file, store, pack=True, on_progress=on_progress)
    assert e.value.exit_code == EXIT_UNREADABLE
    assert not store.exists()


def test_replaced_or_removed_file_is_read_from_the_mapping(
    tmp_path: Path, real_dump: Callable[[str], Path]
) -> None:
    # Renaming another file over it, or removing it, leaves the mapped inode as it was.
    path = copy(real_dump, "alpha.elf", tmp_path)
    with open_dump(path) as ref:
        expected = hash_dump(ref)
    with open_dump(path) as dump:
        other = tmp_path / "other"
        other.write_bytes(b"\0" * 4096)
        os.replace(other, path)
        got = hash_dump(dump)
    assert all(np.array_equal(a, b) for a, b in zip(got, expected, strict=True))


needs_fork = pytest.mark.skipif(not fork_usable(), reason="needs fork and a single thread")


@needs_fork
@pytest.mark.parametrize("name", ["alpha.elf", "alpha.kdump"])
def test_index_build_with_forked_workers(tmp_path: Path, real_dump: Callable[[str], Path], name: str) -> None:
    path = copy(real_dump, name, tmp_path)
    cache = tmp_path / "cache"
    workers = Workers(jobs=2, fork_min_bytes=0, range_pages=512)
    opened: dict[int, Dump] = {0: open_dump(path)}
    try:
        os.truncate(path, path.stat().st_size // 3)
        with pytest.raises(UnreadableFile, match="it changed while being read"):
            build_indexes([path], index_dir=cache, workers=workers, keep_open=opened, batch_pages=256)
    finally:
        opened[0].close()
    assert not cache.exists() or list(cache.iterdir()) == []


@needs_fork
def test_worker_killed_by_sigbus_is_reported_as_a_change(
    tmp_path: Path, real_dump: Callable[[str], Path]
) -> None:
    # A worker that touches the mapping past the new end of the file dies of SIGBUS: the real
    # kernel behaviour, provoked here by reading the mapping directly after cutting the file.
    path = copy(real_dump, "alpha.elf", tmp_path)
    parent = os.getpid()
    with open_dump(path) as dump:
        mapped = dump.mapped_pages()
        assert mapped is not None
        buf = mapped[0]

        def hash_range(d: Dump, lo: int, hi: int, on_pages: Callable[[int], None]) -> tuple:  # type: ignore[type-arg]
            if os.getpid() != parent:
                faulthandler.disable()  # pytest's: its dump of this expected death is noise
                os.truncate(path, 4096)
                int(buf[-1])  # SIGBUS: the page is gone
            # This process reads nothing: it waits for the cut, so that the worker's death is
            # what is reported.
            deadline = time.monotonic() + 60
            while path.stat().st_size != 4096 and time.monotonic() < deadline:
                time.sleep(0.001)
            n = hi - lo
            return np.zeros(n, np.uint64), np.zeros(n, np.uint64), np.zeros(n, np.bool_)

        with pytest.raises(UnreadableFile) as e:
            hash_forked([dump], 2, hash_range, min_range_pages=256)
    assert e.value.exit_code == EXIT_UNREADABLE
    assert str(e.value) == (
        f"{path}: cannot read: it changed while being read ({len(buf)} bytes then, 4096 now); a worker "
        "reading it died of SIGBUS"
    )


ATTEMPTS = 10


def cut_once(command: list[str], dump: Path, size: int) -> tuple[int, str] | None:
    """Run ``command``; as soon as one of its processes maps ``dump``, freeze them all (SIGSTOP),
    cut ``dump`` to ``size`` bytes and let them go on.  The exit status and stderr, or None when
    the command ended before it was seen mapping the dump."""
    proc = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        deadline = time.monotonic() + 60
        while not mapped_by(proc.pid, dump) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.0005)
        try:
            os.killpg(proc.pid, signal.SIGSTOP)
        except ProcessLookupError:
            proc.wait()
            return None
        os.truncate(dump, size)
        os.killpg(proc.pid, signal.SIGCONT)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    return proc.returncode, err


def cut_while_running(
    command: Callable[[Path], list[str]], fresh_dump: Callable[[Path], Path], size: Callable[[int], int]
) -> tuple[Path, Path, int, str]:
    """``command(cache)`` over a fresh copy of a dump, cut to ``size(its size)`` while the command
    runs (:func:`cut_once`), until the cut lands before the command has read the whole dump.

    The command may be frozen only after it has read all of a small dump (the freeze comes a
    few milliseconds after the mapping is seen, which a loaded machine stretches).  Such an
    attempt must still be sound (exit 0, and the index it cached is not served for the cut
    dump: indexing it again reads it and finds it malformed), and the next one begins.  The
    cut, exit status and stderr of the first attempt the cut landed in; none in ATTEMPTS fails."""
    outcomes = []
    for k in range(ATTEMPTS):
        dump = fresh_dump(Path(f"try-{k}"))
        cache = dump.parent / "cache"
        got = cut_once(command(cache), dump, size(dump.stat().st_size))
        if got is None:
            outcomes.append("ended before it was seen mapping the dump")
            continue
        returncode, err = got
        if returncode != 0:
            return dump, cache, returncode, err
        assert err == "", err
        again = subprocess.run(command(cache), capture_output=True, text=True)
        assert again.returncode == EXIT_BAD_DUMP, again.stderr
        outcomes.append("read the whole dump before the cut")
    raise AssertionError(f"the cut never landed while the command read the dump: {outcomes}")


@pytest.mark.parametrize(("first", "jobs"), [("alpha.elf", "1"), ("alpha.elf", "2"), ("alpha.kdump", "1")])
def test_cli_dump_truncated_between_open_and_scan(
    tmp_path: Path, real_dump: Callable[[str], Path], first: str, jobs: str
) -> None:
    # A dump, then an ELF dump (100 MB of ELF: enough for -j 2 to fork).  The command is frozen
    # (SIGSTOP, with its workers) as soon as it has mapped the first dump, the dump is cut, the
    # command goes on.
    b = tmp_path / "beta.elf"
    shutil.copyfile(real_dump("beta.elf"), b)

    def fresh(sub: Path) -> Path:
        (tmp_path / sub).mkdir()
        return copy(real_dump, first, tmp_path / sub)

    a, cache, returncode, err = cut_while_running(
        lambda cache: [
            DENGINE,
            "index",
            "-j",
            jobs,
            "--index-dir",
            str(cache),
            str(cache.parent / first),
            str(b),
        ],
        fresh,
        lambda size: size // 2,
    )
    assert returncode == EXIT_UNREADABLE, err
    assert err.count("\n") == 1 and "Traceback" not in err
    # Seen by the stat before a batch, or by a short read within one: both say so.
    assert err.startswith(f"dengine: {a}: cannot read: it changed while being read")
    # Nothing cached for the cut dump.
    for idx in cache.glob("*.idx") if cache.exists() else []:
        assert str(a) not in idx.read_bytes()[:4096].decode("utf-8", "replace")


def test_cli_sigbus_is_reported_by_the_supervisor(tmp_path: Path, real_dump: Callable[[str], Path]) -> None:
    # The QEMU stream reader walks its mapping once at open: a stream cut while that pass runs
    # kills the process that reads it with SIGBUS.  The supervising dengine process reports it.
    def fresh(sub: Path) -> Path:
        (tmp_path / sub).mkdir()
        return copy(real_dump, "alpha.qevm", tmp_path / sub)

    qevm, _, returncode, err = cut_while_running(
        lambda cache: [
            DENGINE,
            "index",
            "-j",
            "1",
            "--index-dir",
            str(cache),
            str(cache.parent / "alpha.qevm"),
        ],
        fresh,
        lambda size: 4096,
    )
    assert returncode == EXIT_UNREADABLE, err
    assert err.count("\n") == 1 and "Traceback" not in err
    # Either the supervisor's line (SIGBUS in the open pass) or the reader's own check.
    assert err.startswith(f"dengine: {qevm}: cannot read: it changed while being read"), err
