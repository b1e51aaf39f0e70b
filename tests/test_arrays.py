"""arrays.unique is np.unique for the 1-d integer arrays dengine gives it."""

from __future__ import annotations

import numpy as np
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from dengine_cli.arrays import unique


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
