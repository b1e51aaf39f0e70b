"""arrays.unique is np.unique for the 1-d integer arrays dengine gives it; arrays held in files
are the arrays."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from dengine_cli.arrays import ArrayHome, in_file, unique


@given(
    hnp.arrays(
        dtype=st.sampled_from([np.int64, np.uint64, np.uint32, np.uint8]),
        shape=st.integers(0, 300),
        elements=st.integers(0, 40),
    )
)
def test_unique_is_np_unique(values: np.ndarray) -> None:
    got = unique(values)
    want = np.unique(values)
    assert got.dtype == want.dtype
    assert got.tolist() == want.tolist()


@settings(max_examples=40, deadline=None)
@given(
    st.lists(
        hnp.arrays(
            dtype=st.sampled_from([np.int64, np.uint64, np.uint32, np.uint8, np.bool_]),
            shape=hnp.array_shapes(min_dims=1, max_dims=2, min_side=0, max_side=70),
        ),
        min_size=1,
        max_size=4,
    ),
    st.booleans(),
)
def test_arrays_in_a_file_are_the_arrays(arrays: list[np.ndarray], writable: bool) -> None:  # type: ignore[type-arg]
    with tempfile.TemporaryDirectory() as d:
        got = in_file(arrays, Path(d), writable=writable)
        assert not os.listdir(d)  # unlinked from the start
        for a, b in zip(arrays, got, strict=True):
            assert b.dtype == a.dtype and b.shape == a.shape
            assert np.array_equal(a, b)
            assert b.flags.writeable == writable or b.size == 0


def test_a_writable_home_array_takes_writes_and_a_read_only_one_refuses_them(tmp_path: Path) -> None:
    home = ArrayHome(tmp_path)
    filled = home.full(10_000, -1, np.int64)
    assert filled.tolist() == [-1] * 10_000
    filled[5] = 7
    assert int(filled.sum()) == -9_999 + 7
    zeros = home.full(3, 0, np.uint32)
    assert zeros.tolist() == [0, 0, 0]
    held = home.hold(np.arange(5))
    with pytest.raises(ValueError, match="read-only"):
        held[0] = 1
    assert ArrayHome().hold(arr := np.arange(3)) is arr  # no directory: memory, the same array


def test_a_home_that_cannot_write_raises_its_own_error(tmp_path: Path) -> None:
    class Nowhere(Exception):
        pass

    home = ArrayHome(tmp_path / "missing", lambda e: Nowhere(str(e.strerror)))
    with pytest.raises(Nowhere, match="No such file"):
        home.hold(np.arange(3))
    with pytest.raises(Nowhere):
        home.full(3, 0, np.uint8)


def test_a_full_disk_is_an_error_when_the_array_is_made_not_a_sigbus_later(tmp_path: Path) -> None:
    # A writable mapping of a sparse file dies of SIGBUS at the first store the disk has no
    # block for; full() reserves the blocks first, so a full disk is an OSError there and then.
    import subprocess

    from tests.conftest import tmpfs

    disk = tmp_path / "small"
    if not tmpfs(disk, 64 << 10):
        pytest.skip("mounting a tmpfs needs root")
    try:
        with pytest.raises(OSError, match="No space left"):
            ArrayHome(disk).full(1 << 20, -1, np.int64)
        assert not os.listdir(disk)
    finally:
        subprocess.run(["umount", str(disk)], check=True)


@pytest.mark.parametrize("in_files", [False, True])
def test_full_arrays_of_any_shape_are_filled_and_writable(tmp_path: Path, in_files: bool) -> None:
    home = ArrayHome(tmp_path if in_files else None)
    a = home.full((5, 3), 7, np.uint64)
    assert a.shape == (5, 3) and a.dtype == np.uint64 and (a == 7).all()
    a[2, 1] = 9
    assert int(a.sum()) == 7 * 15 + 2
    assert home.full(0, 1, np.int32).shape == (0,)
    assert not list(tmp_path.iterdir())  # unlinked from the start


def test_a_home_steps_within_its_work_bytes_and_travels_without_its_error(tmp_path: Path) -> None:
    import pickle

    assert ArrayHome().step(48) is None
    home = ArrayHome(tmp_path, lambda e: RuntimeError(str(e)), work_bytes=48_000, least_step=100)
    assert home.step(48) == 1000 and home.step(10**6) == 100
    copy = pickle.loads(pickle.dumps(home))
    assert (copy.directory, copy.work_bytes, copy.least_step, copy.error) == (tmp_path, 48_000, 100, None)


def test_small_arrays_share_a_few_files_and_never_overlap(tmp_path: Path) -> None:
    # Thousands of VMs make thousands of small per-VM arrays: one file (and mapping) each would
    # run into Linux's 65,530 mappings a process.
    def mappings() -> int:
        with open("/proc/self/maps") as f:
            return sum(1 for _ in f)

    home = ArrayHome(tmp_path)
    before = mappings()
    arrays = [home.full(n % 997 + 1, n, np.int32) for n in range(3000)]  # about 6 MB in all
    assert mappings() - before <= 8
    assert all((a == n).all() and len(a) == n % 997 + 1 for n, a in enumerate(arrays))
    big = home.full(20 << 20, 7, np.uint8)  # a quarter of a segment or more: a file of its own
    assert int(big[-1]) == 7 and all((a == n).all() for n, a in enumerate(arrays[:50]))
    held = home.hold(np.arange(10, dtype=np.int64))
    assert held.tolist() == list(range(10)) and not held.flags.writeable
    assert not list(tmp_path.iterdir())
