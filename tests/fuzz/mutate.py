"""Mutations of a seed: format-aware (fields, regions, records, cut points from the seed's map)
and generic (bytes).  Every mutation is drawn from one ``random.Random``, so a case number and
the campaign seed give the same bytes on any machine.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from tests.fuzz.layout import Field, Layout
from tests.fuzz.seeds import Seed, wrap


@dataclass
class Mutant:
    """The bytes of one case and what was done to the seed, in words (for the reproducer)."""

    data: bytes
    steps: list[str] = field(default_factory=list)


def boundaries(f: Field, file_size: int, current: int) -> list[int]:
    """Values worth storing in an integer field of ``f.size`` bytes."""
    top = (1 << (8 * f.size)) - 1
    values = [0, 1, 2, top, top >> 1, (top >> 1) + 1, 0x7F, 0x80, 0xFF, 0xFFFF, 0x7FFFFFFF]
    values += [0x80000000, 0xFFFFFFFF, (1 << 63) - 1, 1 << 63, 4095, 4096, 4097, 1 << 20, 1 << 40]
    values += [file_size - 1, file_size, file_size + 1, file_size * 2, current + 1, current - 1]
    values += [current + 4096, current - 4096, current * 2, current // 2, current ^ (1 << 31)]
    return [v & top for v in values]


def _set(buf: bytearray, f: Field, value: int) -> None:
    if f.offset + f.size <= len(buf):
        buf[f.offset : f.offset + f.size] = value.to_bytes(f.size, "big" if f.order == ">" else "little")


def _get(buf: bytes, f: Field) -> int:
    return int.from_bytes(buf[f.offset : f.offset + f.size], "big" if f.order == ">" else "little")


def _pick_region(r: random.Random, lay: Layout, size: int) -> tuple[int, int, str]:
    if lay.regions and r.random() < 0.85:
        reg = r.choice(lay.regions)
        if reg.offset < size:
            return reg.offset, min(reg.length, size - reg.offset), reg.name
    return 0, size, "file"


# -- in-place mutations ------------------------------------------------------------------------------


def field_boundary(r: random.Random, buf: bytearray, lay: Layout) -> str:
    f = r.choice(lay.fields)
    value = r.choice(boundaries(f, len(buf), _get(buf, f)))
    _set(buf, f, value)
    return f"set {f.name} at {f.offset:#x} to {value:#x}"


def field_bitflip(r: random.Random, buf: bytearray, lay: Layout) -> str:
    f = r.choice(lay.fields)
    bit = r.randrange(8 * f.size)
    _set(buf, f, _get(buf, f) ^ (1 << bit))
    return f"flip bit {bit} of {f.name} at {f.offset:#x}"


def field_delta(r: random.Random, buf: bytearray, lay: Layout) -> str:
    f = r.choice(lay.fields)
    delta = r.choice((-1, 1, -8, 8, -16, 16, 24, -24, 4096, -4096))
    _set(buf, f, (_get(buf, f) + delta) & ((1 << (8 * f.size)) - 1))
    return f"add {delta} to {f.name} at {f.offset:#x}"


def region_flip(r: random.Random, buf: bytearray, lay: Layout) -> str:
    start, length, name = _pick_region(r, lay, len(buf))
    n = r.choice((1, 1, 2, 4, 16))
    for _ in range(n):
        at = start + r.randrange(length)
        buf[at] ^= 1 << r.randrange(8)
    return f"flip {n} bits in {name} at {start:#x}"


def region_fill(r: random.Random, buf: bytearray, lay: Layout) -> str:
    start, length, name = _pick_region(r, lay, len(buf))
    at = start + r.randrange(length)
    n = min(r.choice((1, 4, 8, 64, 4096)), start + length - at)
    byte = r.choice((0x00, 0xFF, 0x41, r.randrange(256)))
    buf[at : at + n] = bytes([byte]) * n
    return f"fill {n} bytes at {at:#x} (in {name}) with {byte:#04x}"


def splice(r: random.Random, buf: bytearray, lay: Layout) -> str:
    """Copy a region over another one (a descriptor over another, a header over a page)."""
    src, length, name = _pick_region(r, lay, len(buf))
    dst, dlen, dname = _pick_region(r, lay, len(buf))
    n = min(length, dlen, 4096)
    buf[dst : dst + n] = buf[src : src + n]
    return f"copy {n} bytes of {name} at {src:#x} over {dname} at {dst:#x}"


def byte_random(r: random.Random, buf: bytearray, lay: Layout) -> str:
    k = r.choice((1, 2, 8, 32))
    for _ in range(k):
        buf[r.randrange(len(buf))] = r.randrange(256)
    return f"set {k} random bytes"


IN_PLACE = (
    (field_boundary, 30),
    (field_bitflip, 10),
    (field_delta, 10),
    (region_flip, 15),
    (region_fill, 8),
    (splice, 5),
    (byte_random, 7),
)

# -- mutations that change the length (done last: offsets in the map hold until then) ---------------


def truncate(r: random.Random, buf: bytearray, lay: Layout) -> str:
    cuts = sorted(c for c in lay.cuts if 0 < c < len(buf))
    if cuts and r.random() < 0.8:
        at = max(0, r.choice(cuts) + r.choice((0, 0, 0, -1, 1, -8, 8, -4096)))
    else:
        at = r.randrange(len(buf))
    del buf[at:]
    return f"truncate at {at:#x}"


def record_dup(r: random.Random, buf: bytearray, lay: Layout) -> str:
    if not lay.records:
        return extend(r, buf, lay)
    rec = r.choice(lay.records)
    piece = bytes(buf[rec.offset : rec.offset + rec.length])
    at = rec.offset + rec.length if r.random() < 0.7 else r.choice(lay.records).offset
    buf[at:at] = piece
    return f"duplicate {rec.name} at {rec.offset:#x} ({rec.length} bytes) to {at:#x}"


def record_drop(r: random.Random, buf: bytearray, lay: Layout) -> str:
    if not lay.records:
        return truncate(r, buf, lay)
    rec = r.choice(lay.records)
    del buf[rec.offset : rec.offset + rec.length]
    return f"drop {rec.name} at {rec.offset:#x} ({rec.length} bytes)"


def insert_bytes(r: random.Random, buf: bytearray, lay: Layout) -> str:
    at = r.choice(sorted(lay.cuts)) if lay.cuts and r.random() < 0.5 else r.randrange(len(buf) + 1)
    n = r.choice((1, 3, 8, 24, 4096))
    buf[at:at] = r.randbytes(n) if r.random() < 0.5 else bytes(n)
    return f"insert {n} bytes at {at:#x}"


def delete_bytes(r: random.Random, buf: bytearray, lay: Layout) -> str:
    at = r.randrange(len(buf))
    n = r.choice((1, 4, 8, 24, 4096))
    del buf[at : at + n]
    return f"delete {n} bytes at {at:#x}"


def extend(r: random.Random, buf: bytearray, lay: Layout) -> str:
    n = r.choice((1, 16, 4096, 4097))
    buf += r.randbytes(n) if r.random() < 0.5 else bytes(n)
    return f"append {n} bytes"


RESIZING = (
    (truncate, 30),
    (record_dup, 15),
    (record_drop, 15),
    (insert_bytes, 10),
    (delete_bytes, 10),
    (extend, 5),
)


def _choose(r: random.Random, table: tuple[tuple[object, int], ...]) -> object:
    ops, weights = zip(*table, strict=True)
    return r.choices(ops, weights)[0]


def mutate(seed: Seed, r: random.Random) -> Mutant:
    """One case: 1-4 in-place mutations, then (in a third of cases) one that changes the length;
    a container seed is then compressed, and in a quarter of those cases the compressed bytes
    get a generic mutation too."""
    buf = bytearray(seed.data)
    lay = seed.layout
    steps: list[str] = []
    resize = r.random() < 0.35
    for _ in range(r.choice((0, 1, 1, 1, 2, 2, 3, 4)) if resize else r.choice((1, 1, 1, 2, 2, 3, 4))):
        op = _choose(r, IN_PLACE)
        if not lay.fields and op in (field_boundary, field_bitflip, field_delta):
            op = region_flip
        steps.append(op(r, buf, lay))  # type: ignore[operator]
    if resize and buf:
        steps.append(_choose(r, RESIZING)(r, buf, lay))  # type: ignore[operator]
    data = bytes(buf)
    if seed.wrap:
        data = wrap(seed.wrap, data)
        steps.append(f"compress as {seed.wrap}")
        if r.random() < 0.25 and data:
            outer = bytearray(data)
            empty = Layout()
            empty.cuts.update((10, len(outer) // 2, len(outer) - 4))
            op = r.choice((byte_random, truncate, region_flip, delete_bytes))
            steps.append(f"then, of the compressed file: {op(r, outer, empty)}")
            data = bytes(outer)
    return Mutant(data, steps)
