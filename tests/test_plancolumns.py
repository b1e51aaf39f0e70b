"""The plan file's page columns read by numpy (store/plancolumns.py) say what json.loads says:
the same values where the text is a column as the writer writes it, the text left to json.loads
wherever it is anything else."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dengine_cli.store.plancolumns import column_of, split_columns

ints = st.integers(-(2**63), 2**63 - 1)
gfns = st.lists(st.integers(0, 2**64 - 1), max_size=40)
refs = st.lists(st.none() | st.tuples(ints, ints).map(list), max_size=40)


def resolved(text: bytes) -> Any:
    """The document as read through split_columns, the arrays turned back into JSON values."""
    rest, token, columns = split_columns(text)
    doc = json.loads(rest)

    def back(value: Any) -> Any:
        column = column_of(value, token, columns)
        if column is not None:
            if column.ndim == 2:
                return [[int(v), int(g)] if has else None for has, v, g in column.tolist()]
            return column.tolist()
        if isinstance(value, dict):
            return {k: back(v) for k, v in value.items()}
        if isinstance(value, list):
            return [back(v) for v in value]
        return value

    return back(doc)


def writer_style(doc: Any) -> bytes:
    """``doc`` as the plan writer lays out its columns: ``"key": [1,2]``, nothing inside."""
    return json.dumps(doc, separators=(",", ": ")).encode()


@settings(max_examples=200, deadline=None)
@given(
    g=gfns, a=st.lists(ints, max_size=40), r=refs, s=st.lists(ints, max_size=40), name=st.text(max_size=12)
)
def test_columns_read_by_numpy_equal_json(
    g: list[int], a: list[int], r: list[list[int] | None], s: list[int], name: str
) -> None:
    doc = {
        "pages": [
            {"vm": 0, "name": name, "dump": {"size": 5}, "gfn": g, "action": a, "reference": r, "size": s}
        ]
    }
    text = writer_style(doc)
    assert resolved(text) == json.loads(text) == doc


@settings(max_examples=300, deadline=None)
@given(
    r=refs,
    g=gfns,
    at=st.integers(0, 10**6),
    junk=st.sampled_from(
        [" ", "1", "-", ",", "[", "]", "null", "n", "l", "]]", "[[", ".5", "e3", '"', "true"]
    ),
)
def test_any_other_text_is_left_to_json(r: list[list[int] | None], g: list[int], at: int, junk: str) -> None:
    text = writer_style({"pages": [{"gfn": g, "reference": r}]}).decode()
    cut = at % (len(text) + 1)
    odd = (text[:cut] + junk + text[cut:]).encode()
    try:
        expected = json.loads(odd)
    except ValueError:
        with pytest.raises(ValueError):
            resolved(odd)
        return
    assert resolved(odd) == expected


def test_a_marker_of_another_read_is_no_column() -> None:
    rest, token, columns = split_columns(b'{"gfn": [1,2,3]}')
    forged = {"$column": "0000000000000000-0"}
    assert column_of(json.loads(rest)["gfn"], token, columns) is not None
    assert column_of(forged, token, columns) is None
    assert column_of({"$column": f"{token}-9"}, token, columns) is None
    assert np.array_equal(columns[0], [1, 2, 3]) and columns[0].dtype == np.uint64


def test_the_writers_columns_are_all_read_by_numpy() -> None:
    page = {
        "gfn": [0, 5, 2**64 - 2],
        "action": [0, 3, 4],
        "reference": [None, [1, 7], [0, 0]],
        "size": [0, 9, -3],
    }
    doc = {"pages": [{"vm": v, **page} for v in range(2)]}
    rest, _, columns = split_columns(writer_style(doc))
    assert len(columns) == 8 and rest.count(b"[") == 1  # only the list of VMs is left
    assert resolved(writer_style(doc)) == doc
