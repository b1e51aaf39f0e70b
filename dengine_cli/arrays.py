"""Small array helpers shared by several modules."""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt


def unique(values: npt.NDArray[Any]) -> npt.NDArray[Any]:
    """The sorted distinct values of a 1-d array: ``np.unique(values)``, without the import of
    ``numpy.ma`` that ``np.unique``'s first plain call makes (26 ms, a few percent of a sampled
    plan)."""
    flat = np.sort(values, axis=None)
    if len(flat) < 2:
        return flat
    keep = np.empty(len(flat), dtype=np.bool_)
    keep[0] = True
    np.not_equal(flat[1:], flat[:-1], out=keep[1:])
    return flat[keep]
