"""Builders of test VMs shared by the test modules: page arrays of designed content, the fixture
guests' workload as a raw image, the one writer of raw images, and ``Planned`` (raw images opened,
indexed and shared, ready to plan).

Test modules import these from here, never from each other; fixtures and the libkdumpfile oracle
stay in ``tests/conftest.py``."""

from __future__ import annotations

import random
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from dengine_cli.engine.index import PageIndex, index_dump
from dengine_cli.engine.plan.choice import plan_dumps
from dengine_cli.engine.plan.model import PlanReport
from dengine_cli.engine.policy import Policy
from dengine_cli.engine.sharing.pipeline import share
from dengine_cli.formats import open_dump
from dengine_cli.formats.base import Dump, OpenOptions
from dengine_cli.pages import PAGE_SIZE
from dengine_cli.policies import POLICIES
from fixtures.workload import workload_files

#: Workload files in the order :func:`workload_image` lays them out (after ZERO_LEAD zero pages).
LAYOUT = ("identical.bin", "base.bin", "similar.bin", "text.txt", "random.bin")
ZERO_LEAD = 8

# --- writing raw images ---------------------------------------------------------------------------


def write_raw_image(path: Path, image: bytes | np.ndarray) -> Path:
    """Write ``image`` (bytes, or an array of pages) to ``path`` as a raw guest image: page i at
    offset i * 4096, nothing else.  Returns ``path``."""
    path.write_bytes(image if isinstance(image, bytes) else np.ascontiguousarray(image).tobytes())
    return path


def write_raw_images(directory: Path, images: Sequence[bytes | np.ndarray], stem: str = "vm") -> list[Path]:
    """:func:`write_raw_image` for each of ``images``, as ``directory/{stem}{i}.raw``."""
    return [write_raw_image(directory / f"{stem}{i}.raw", image) for i, image in enumerate(images)]


# --- designed VMs ---------------------------------------------------------------------------------


def design_vms(seed: int, sizes: list[int], library: int = 40) -> list[np.ndarray]:
    """Page arrays of VMs with zero pages, contents shared within and across VMs (drawn from a
    small library), contents differing in one byte only, and unique random pages."""
    rng = np.random.default_rng(seed)
    lib = rng.integers(0, 256, (library, PAGE_SIZE), dtype=np.uint8)
    lib[0] = 0
    lib[0, 4095] = 1  # differs from the zero page in its last byte only
    lib[1] = lib[2]
    lib[1, 0] ^= 0xFF  # lib[1] and lib[2] differ in their first byte only
    vms = []
    for n in sizes:
        pages = rng.integers(0, 256, (n, PAGE_SIZE), dtype=np.uint8)
        kind = rng.integers(0, 4, n)
        pages[kind == 0] = 0
        pick = kind == 1
        pages[pick] = lib[rng.integers(0, library, int(pick.sum()))]
        vms.append(pages)
    return vms


def text_page(rng: random.Random) -> bytes:
    """A page of words and numbers: compressible, unlike random bytes."""
    words = ["page", "frame", "memory", "guest", "kernel", "buffer", "cache", "host"]
    out = ""
    while len(out) < PAGE_SIZE:
        out += " ".join(rng.choice(words) for _ in range(8)) + f" {rng.randrange(10**6)}\n"
    return out[:PAGE_SIZE].encode()


def mixed_vms(seed: int, sizes: Sequence[int]) -> list[np.ndarray]:
    """VMs of zero, duplicate, similar (a few bytes changed), text and random pages."""
    rng = random.Random(seed)
    library = [rng.randbytes(PAGE_SIZE) for _ in range(12)] + [text_page(rng) for _ in range(6)]
    vms = []
    for n in sizes:
        pages = []
        for _ in range(n):
            kind = rng.random()
            if kind < 0.15:
                page = bytes(PAGE_SIZE)
            elif kind < 0.35:
                page = rng.choice(library)
            elif kind < 0.65:
                base = bytearray(rng.choice(library))
                for _ in range(rng.randint(1, 40)):
                    base[rng.randrange(PAGE_SIZE)] = rng.randrange(256)
                page = bytes(base)
            elif kind < 0.85:
                page = text_page(rng)
            else:
                page = rng.randbytes(PAGE_SIZE)
            pages.append(np.frombuffer(page, dtype=np.uint8))
        vms.append(np.stack(pages))
    return vms


def workload_image(guest: str) -> tuple[bytes, dict[str, range]]:
    """A raw image holding the fixture guests' workload files page-aligned, and where each is
    (page ranges)."""
    files = workload_files(guest)
    parts = [bytes(ZERO_LEAD * PAGE_SIZE)]
    where: dict[str, range] = {}
    at = ZERO_LEAD
    for name in LAYOUT:
        n = len(files[name]) // PAGE_SIZE
        where[name] = range(at, at + n)
        parts.append(files[name])
        at += n
    return b"".join(parts), where


# --- ready to plan --------------------------------------------------------------------------------


class Planned:
    """Dumps, indexes and sharing of raw images, ready to plan."""

    def __init__(self, paths: Sequence[Path]) -> None:
        self.paths = list(paths)
        self.dumps: list[Dump] = [open_dump(p, OpenOptions(format="raw")) for p in paths]
        self.indexes: list[PageIndex] = [index_dump(d) for d in self.dumps]
        self.sharing = share(self.indexes, self.dumps)

    def plan(self, policy: Policy = POLICIES["de"], **kwargs: object) -> PlanReport:
        return plan_dumps(self.dumps, self.indexes, self.sharing, policy, **kwargs)  # type: ignore[arg-type]

    def page(self, v: int, pos: int) -> bytes:
        return self.dumps[v].read_page(int(self.indexes[v].gfns[pos])).tobytes()
