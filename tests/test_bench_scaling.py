"""bench/fleet_speed.py's scaling fit: the fixed cost and the cost per GiB of a run."""

from __future__ import annotations

import json
import sys
from typing import Any

import numpy as np
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


@given(
    points=st.lists(
        st.tuples(st.integers(1, 256).map(lambda k: k / 4), st.floats(0.05, 10.0)),
        min_size=2,
        max_size=6,
        unique_by=lambda p: p[0],
    )
)
def test_the_line_is_numpys_least_squares_fit(points: list[tuple[float, float]]) -> None:
    # Any times, not only a line: the fit is numpy's, and the spread is of what the line leaves.
    fit = fleet_speed.scaling([_fleet(g, t) for g, t in points])
    assert fit is not None
    slope, fixed = np.polyfit([g for g, _ in points], [t for _, t in points], 1)
    assert fit["fixed_seconds"] == pytest.approx(fixed, abs=1e-9)
    assert fit["seconds_per_gib"] == pytest.approx(slope, abs=1e-9)
    net = [(t - fixed) / g for g, t in points]
    if min(net) > 1e-9:
        assert fit["net_spread"] == pytest.approx(max(net) / min(net), rel=1e-6)
    elif min(net) < -1e-9:
        assert fit["net_spread"] is None


def test_session_9s_fleets() -> None:
    # 0.314 s for 1 GiB, 0.69 s for 4 GiB, 2.54 s for 16 GiB: s/GiB 0.31 against 0.16 (1.97x),
    # but part of every run is paid once; without it the work per GiB spreads far less.
    times = {1: 0.314, 4: 0.69, 16: 2.54}
    fit = fleet_speed.scaling([_fleet(g, t) for g, t in times.items()])
    assert fit is not None
    whole = max(t / g for g, t in times.items()) / min(t / g for g, t in times.items())
    assert 0 < fit["fixed_seconds"] < min(times.values())
    assert fit["net_spread"] is not None and 1 <= fit["net_spread"] < whole


def test_a_line_that_leaves_a_fleet_no_time_gives_no_spread() -> None:
    # The intercept above the smallest fleet's time: that fleet's work would be negative.
    fit = fleet_speed.scaling([_fleet(1, 0.2), _fleet(2, 1.5), _fleet(16, 3.0)])
    assert fit is not None and fit["fixed_seconds"] > 0.2
    assert fit["net_spread"] is None
    assert json.loads(json.dumps(fit)) == fit


def test_one_fleet_says_nothing() -> None:
    assert fleet_speed.scaling([_fleet(4, 0.7)]) is None
    assert fleet_speed.scaling([_fleet(4, 0.7), _fleet(4, 0.8)]) is None
    assert fleet_speed.scaling([]) is None
