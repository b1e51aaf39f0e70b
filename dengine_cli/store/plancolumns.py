"""The page columns of a plan file, read straight into numpy arrays.

A plan file lists, per VM, four columns of one entry a page (``gfn``, ``action``, ``reference``,
``size``).  Read with ``json.loads`` they become Python lists, a Python object a number: 225 MiB
and 2.7 s for the million pages of a 4 GiB fleet, so that ``apply`` of a large fleet ran out of
memory before it wrote anything.  Here each column as ``dengine plan -o`` writes it (no
whitespace inside; ``null`` or ``[vm,gfn]`` in the reference column) is found in the file's bytes,
checked character by character, and parsed by numpy; in the text handed to ``json.loads`` it is
replaced by a marker (an object holding a token drawn for this read, which no file can guess).
A column written any other way (a file pretty-printed by another tool) is left in the text and
read by ``json.loads``, as before, with the same checks after it.
"""

from __future__ import annotations

import mmap
import re
import secrets
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import numpy.typing as npt

#: A page column as the plan file writer starts it.
_COLUMN = re.compile(rb'"(gfn|action|reference|size)": \[')
#: The end of a reference column: its closing bracket after a ``null`` or after a pair's.
_REFERENCE_END = re.compile(rb"[l\]]\]")
_DIGITS = b"0123456789"
_LIST = ord(","), ord("["), ord("]"), ord("n")

Column = npt.NDArray[Any]


def split_columns(
    text: bytes | mmap.mmap, keep: Callable[[Column], Column] | None = None
) -> tuple[bytes, str, list[Column]]:
    """``(rest, token, columns)``: ``text`` with every page column it could read replaced by
    ``{"$column": "TOKEN-K"}``, and column K as an array (uint64 gfns, int64 actions and sizes;
    a reference column as an ``(n, 3)`` int64 array of has-reference, VM and gfn).  ``keep``:
    where each column goes as soon as it is read (see :class:`~dengine_cli.arrays.ArrayHome`)."""
    token = secrets.token_hex(8)
    parts: list[bytes] = []
    columns: list[Column] = []
    at = 0
    for m in _COLUMN.finditer(text):
        if m.start() < at:
            continue
        start = m.end() - 1  # the column's "["
        name = m.group(1)
        found = _reference(text, start) if name == b"reference" else _numbers(text, start, name == b"gfn")
        if found is None:
            continue  # left to json.loads
        end, column = found
        parts += [text[at:start], b'{"$column": "%s-%d"}' % (token.encode(), len(columns))]
        columns.append(keep(column) if keep is not None else column)
        at = end
    parts.append(text[at:])
    return b"".join(parts), token, columns


def column_of(value: Any, token: str, columns: list[Column]) -> Column | None:
    """The array a marker of this read stands for (``None``: ``value`` is no marker)."""
    if not isinstance(value, dict) or set(value) != {"$column"} or not isinstance(value["$column"], str):
        return None
    tok, _, k = value["$column"].partition("-")
    return columns[int(k)] if tok == token and k.isdigit() and int(k) < len(columns) else None


def _numbers(text: bytes | mmap.mmap, start: int, unsigned: bool) -> tuple[int, Column] | None:
    """A column of integers ``[1,2,3]`` from ``start``: (its end, its values)."""
    close = text.find(b"]", start)
    if close < 0:
        return None
    body = text[start + 1 : close]
    if body.translate(None, _DIGITS + (b"," if unsigned else b",-")):
        return None
    values = _parse(body, np.uint64 if unsigned else np.int64, body.count(b",") + 1 if body else 0)
    return None if values is None else (close + 1, values)


def _reference(text: bytes | mmap.mmap, start: int) -> tuple[int, Column] | None:
    """A reference column ``[null,[0,5],null]`` from ``start``: (its end, ``(n, 3)`` rows of
    has-reference, VM, gfn)."""
    if text[start + 1 : start + 2] == b"]":
        return start + 2, np.zeros((0, 3), dtype=np.int64)
    m = _REFERENCE_END.search(text, start)
    if m is None:
        return None
    body = text[start + 1 : m.end() - 1].replace(b"null", b"n")
    if body.translate(None, _DIGITS + b",-[]n"):
        return None
    has = _element_kinds(np.frombuffer(body, dtype=np.uint8))
    if has is None:
        return None
    pairs = _parse(body.replace(b"n", b"-1,-1").translate(None, b"[]"), np.int64, 2 * len(has))
    if pairs is None:
        return None
    rows = np.empty((len(has), 3), dtype=np.int64)
    rows[:, 0] = has
    rows[:, 1:] = pairs.reshape(-1, 2)
    del pairs
    return m.end(), rows


def _element_kinds(s: npt.NDArray[np.uint8]) -> npt.NDArray[np.bool_] | None:
    """Per element of a reference column's body (``null`` written ``n``): whether it is a pair;
    ``None`` unless every element is ``n`` or ``[a,b]``, one comma inside and none nested."""
    comma, opening, closing, null = _LIST
    depth = np.cumsum((s == opening).astype(np.int64) - (s == closing))
    if len(s) == 0 or depth.min() < 0 or depth.max() > 1 or depth[-1] != 0:
        return None
    outside = s[depth == 0]  # between pairs: only separators, closing brackets and nulls
    if not np.all((outside == comma) | (outside == closing) | (outside == null)):
        return None
    between = (s == comma) & (depth == 0)
    starts = np.concatenate(([0], np.flatnonzero(between) + 1))
    if starts[-1] >= len(s):
        return None
    first = s[starts]
    has = first == opening
    if not np.all(has | (first == null)) or np.count_nonzero(s == null) != np.count_nonzero(~has):
        return None
    opens, closes = np.flatnonzero(s == opening), np.flatnonzero(s == closing)
    if len(opens) != np.count_nonzero(has):
        return None  # a bracket that starts no element
    inside = np.cumsum((s == comma) & (depth == 1))
    return has if np.all(inside[closes] - inside[opens] == 1) else None


def _parse(body: bytes, dtype: type[np.integer[Any]], count: int) -> Column | None:
    """``count`` comma-separated integers of ``body`` (``None`` if they are not exactly that,
    as JSON writes them)."""
    if count == 0:
        return np.zeros(0, dtype=dtype)
    if not _json_numbers(np.frombuffer(body, dtype=np.uint8)):
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        try:
            values = np.fromstring(body, dtype=dtype, sep=",")
        except (ValueError, DeprecationWarning):
            return None
    if len(values) != count:
        return None
    # numpy saturates a number too large for the type: a column holding an extreme value is
    # left to json.loads, which says exactly what it is.
    bounds = np.iinfo(dtype)
    extreme = int(values.max()) == bounds.max or (bounds.min < 0 and int(values.min()) == bounds.min)
    return None if extreme else values


def _json_numbers(s: npt.NDArray[np.uint8]) -> bool:
    """Whether the digits, minus signs and commas of ``s`` are integers as JSON writes them:
    numpy would also read a leading zero (``01``), a minus sign without digits (as 0) or a minus
    sign after a digit."""
    digit = (s >= ord("0")) & (s <= ord("9"))
    minus = s == ord("-")
    before = np.concatenate(([False], digit[:-1]))  # a digit just before
    after = np.concatenate((digit[1:], [False]))  # a digit just after
    starts_number = digit & ~before
    return not (np.any(starts_number & (s == ord("0")) & after) or np.any(minus & (before | ~after)))
