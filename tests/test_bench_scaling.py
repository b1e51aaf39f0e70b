"""bench/fleet_speed.py's scaling fit: the fixed cost and the cost per GiB of a run."""

from __future__ import annotations

import sys
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.conftest import REPO

sys.path.insert(0, str(REPO / "bench"))
import fleet_speed


def _fleet(gib: float, seconds: float) -> dict[str, Any]:
    other = {"label": fleet_speed.J1, "seconds": 99.0}
    return {"gib": gib, "rows": [other, {"label": fleet_speed.J2, "seconds": seconds}]}


@given(
    fixed=st.floats(0.0, 1.0),
    per_gib=st.floats(0.01, 1.0),
    sizes=st.lists(st.integers(1, 256).map(lambda k: k / 4), min_size=2, max_size=5, unique=True),
)
def test_a_straight_line_is_recovered(fixed: float, per_gib: float, sizes: list[float]) -> None:
    fleets = [_fleet(g, fixed + per_gib * g) for g in sizes]
    fit = fleet_speed.scaling(fleets)
    assert fit is not None
    assert fit["fixed_seconds"] == pytest.approx(fixed, abs=1e-6)
    assert fit["seconds_per_gib"] == pytest.approx(per_gib, rel=1e-6)
    assert fit["net_spread"] == pytest.approx(1.0, rel=1e-5)


def test_the_session_9_figures() -> None:
    # 0.314 s for 1 GiB, 0.69 s for 4 GiB, 2.54 s for 16 GiB: s/GiB 0.31 against 0.16 (1.97x),
    # but 0.13 s of it is paid once; without it the work per GiB spreads by 1.31x.
    fit = fleet_speed.scaling([_fleet(1, 0.314), _fleet(4, 0.69), _fleet(16, 2.54)])
    assert fit is not None
    assert fit["fixed_seconds"] == pytest.approx(0.131, abs=0.001)
    assert fit["seconds_per_gib"] == pytest.approx(0.150, abs=0.001)
    assert fit["net_spread"] == pytest.approx(1.31, abs=0.01)


def test_one_fleet_says_nothing() -> None:
    assert fleet_speed.scaling([_fleet(4, 0.7)]) is None
    assert fleet_speed.scaling([_fleet(4, 0.7), _fleet(4, 0.8)]) is None
    assert fleet_speed.scaling([]) is None
