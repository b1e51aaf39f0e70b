"""Memory-saving policies: which of sharing, patching and compression a host applies, with which
codecs, thresholds and similarity detector, looked up by name or read from a TOML policy file.

Named policies (:data:`POLICIES`):

============================  ==============================================================
``ksm``                       Linux KSM: identical pages shared across all VMs; zero pages are
                              merged like any content; a frame holds at most 256 mappings
                              (``max_page_sharing``)
``esx``                       ESX with salting (its default since 2014): sharing within each VM
``de``                        the Difference Engine: share across VMs, patch, compress
``de-share-patch``            share across VMs and patch, no compression
``de-share-compress``         share across VMs and compress, no patching
============================  ==============================================================

Defaults for the Difference Engine policies: patches with ``xor-zstd`` (XOR with the reference,
then zstd level 1: 8.5 us a pair against 26 us for zstd with the reference as a dictionary, and
within 1% of its patch count and 12% of its size on real dumps, /work/shared/PERF-NOTES.md);
compression with ``zstd-1`` (15 us a page; lz4 saves 5 us a page and compresses less, zlib-1
costs 9x more); both thresholds 2048 bytes (ESX keeps a compressed page only when it fits in
half a page; the paper keeps a patch under the same bound).

A policy file (TOML) starts from a named policy (``base``, default ``de``) and changes what it
names; every key is optional::

    base = "de"            # ksm, esx, de, de-share-patch, de-share-compress
    name = "de-lz4"        # what reports call it (default: the file's stem)
    cross_vm = true        # share (and patch) across VMs
    # max_page_sharing = 256 # base = "ksm" only: mappings one KSM page holds (2 or more)

    [patch]
    enabled = true
    codec = "xor-zstd"     # or "zstd-dict", "bsdiff4"
    threshold = 2048       # keep a patch only when it is smaller than this (bytes)

    [compression]
    enabled = true
    codec = "lz4"          # or "zstd-1", "zstd-3", "zlib-1", ...
    threshold = 2048       # keep a compressed page only when it is smaller than this

    [similarity]
    indexes = 2            # k: indexes
    blocks_per_index = 1   # s: 64-byte blocks hashed per index
    candidates = 1         # c: references kept per bucket
    seed = 0               # chooses the block offsets

    [costs]                # microseconds per operation (see dengine_cli.costs)
    patch = 300.0
    swap_in = 5000.0

Any error in a file is a :class:`~dengine_cli.errors.UsageError` naming the file and the key.
A file must be UTF-8 (as TOML is); a cost is a finite number of microseconds from 0 to
:data:`~dengine_cli.engine.costs.MAX_COST_US` (``inf`` and ``nan`` are refused: a plan's cost
must stay a number JSON can hold).  Any existing path that is not a named policy is taken for a
policy file, whatever its name, and must be a regular file: a directory, a FIFO (which ``open``
would wait on for ever), a socket or a device is refused as a file that cannot be read.

``max_page_sharing`` is KSM's cap (``/sys/kernel/mm/ksm/max_page_sharing``), so only a policy
based on ``ksm`` takes it (it inherits ksm's 256 without it); a policy based on any other has no
KSM pages, and the key is refused there rather than ignored.  ``--ksm-max-page-sharing``, when
given, wins over the file.
"""

from __future__ import annotations

import dataclasses
import math
import os
import stat
from pathlib import Path
from typing import Any

from dengine_cli.engine.costs import MAX_COST_US, CostModel
from dengine_cli.engine.policy import Policy
from dengine_cli.engine.sharing.model import KSM_MAX_PAGE_SHARING, KSM_MAX_PAGE_SHARING_LIMIT
from dengine_cli.engine.similarity import HashSimilarityDetector
from dengine_cli.errors import UsageError
from dengine_cli.pages import PAGE_SIZE

POLICIES: dict[str, Policy] = {
    p.name: p
    for p in (
        Policy(
            "ksm",
            "Linux KSM: identical pages shared across VMs, zero pages merged",
            zero_frame=True,
            max_page_sharing=KSM_MAX_PAGE_SHARING,
        ),
        Policy("esx", "ESX with salting: identical pages shared within each VM", cross_vm=False),
        Policy(
            "de",
            "Difference Engine: share across VMs, patch similar pages, compress",
            patch=True,
            compress=True,
        ),
        Policy("de-share-patch", "Difference Engine without compression", patch=True),
        Policy("de-share-compress", "Difference Engine without patching", compress=True),
    )
}


def named_policy(name: str) -> Policy:
    """The named policy; :class:`UsageError` listing the names when there is none."""
    try:
        return POLICIES[name]
    except KeyError:
        raise UsageError(f"unknown policy {name!r}; known: {', '.join(POLICIES)}") from None


def resolve_policy(spec: str | Path) -> Policy:
    """A policy from a name, or from a TOML file when ``spec`` names an existing path (a
    directory or a FIFO is refused as one) or ends in ``.toml``."""
    text = str(spec)
    if text in POLICIES:
        return POLICIES[text]
    if isinstance(spec, Path) or text.endswith(".toml") or os.path.exists(text):
        return load_policy_file(Path(text))
    return named_policy(text)


_TABLES: dict[str, set[str]] = {
    "patch": {"enabled", "codec", "threshold"},
    "compression": {"enabled", "codec", "threshold"},
    "similarity": {"indexes", "blocks_per_index", "candidates", "seed"},
    "costs": {f.name for f in dataclasses.fields(CostModel)},
}
_TOP = {"base", "name", "description", "cross_vm", "max_page_sharing", *_TABLES}


class _File:
    """Typed reads of a parsed policy file, each failing with the file and key named."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def fail(self, key: str, expected: str, found: object) -> UsageError:
        return UsageError(f"{self.path}: {key}: expected {expected}, found {found!r}")

    def check_keys(self, table: dict[str, Any], allowed: set[str], prefix: str) -> None:
        for key in table:
            if key not in allowed:
                raise self.fail(prefix + key, "one of " + ", ".join(sorted(allowed)), key)

    def boolean(self, table: dict[str, Any], key: str, default: bool, prefix: str = "") -> bool:
        value = table.get(key, default)
        if not isinstance(value, bool):
            raise self.fail(prefix + key, "true or false", value)
        return value

    def integer(
        self, table: dict[str, Any], key: str, default: int, lo: int, hi: int, prefix: str = ""
    ) -> int:
        value = table.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
            raise self.fail(prefix + key, f"an integer within {lo}..{hi}", value)
        return value

    def number(self, table: dict[str, Any], key: str, default: float, prefix: str = "") -> float:
        value = table.get(key, default)
        # inf (and a cost so large that a plan's total overflows to inf) would reach the plan's
        # JSON as Infinity, which is no JSON; nan fails every comparison.
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not (math.isfinite(value) and 0 <= value <= MAX_COST_US)
        ):
            raise self.fail(prefix + key, f"a number of microseconds within 0..{MAX_COST_US:.0f}", value)
        return float(value)

    def string(self, table: dict[str, Any], key: str, default: str, prefix: str = "") -> str:
        value = table.get(key, default)
        if not isinstance(value, str) or not value:
            raise self.fail(prefix + key, "a non-empty string", value)
        return value

    def table(self, data: dict[str, Any], key: str) -> dict[str, Any]:
        value = data.get(key, {})
        if not isinstance(value, dict):
            raise self.fail(key, "a table", value)
        self.check_keys(value, _TABLES[key], key + ".")
        return value


def load_policy_file(path: Path) -> Policy:
    """Read a TOML policy file (format in the module docstring); every problem is a
    :class:`UsageError` naming the file and the key."""
    import tomllib  # here: only policy files need it

    try:
        mode = os.stat(path).st_mode
        if not stat.S_ISREG(mode):
            raise UsageError(f"{path}: cannot read policy file: {_not_regular(mode)}")
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise UsageError(f"{path}: cannot read policy file: {e.strerror or e}") from e
    try:
        data = tomllib.loads(raw.decode())
    except UnicodeDecodeError as e:
        raise UsageError(f"{path}: not a valid TOML policy file: {_not_utf8(raw, e)}") from None
    except tomllib.TOMLDecodeError as e:
        raise UsageError(f"{path}: not a valid TOML policy file: {e}") from e
    return policy_from_dict(data, path)


def _not_regular(mode: int) -> str:
    """What a path of file mode ``mode`` is, when it is not a regular file."""
    if stat.S_ISDIR(mode):
        return "is a directory"
    if stat.S_ISFIFO(mode):
        return "is a FIFO (a pipe), not a regular file"
    return "is not a regular file"


def _not_utf8(raw: bytes, error: UnicodeDecodeError) -> str:
    """Where a file stops being UTF-8, as tomllib places its errors (line and column, counted
    in characters: every byte before ``error.start`` decodes)."""
    line_start = raw.rfind(b"\n", 0, error.start) + 1
    line = raw.count(b"\n", 0, error.start) + 1
    column = len(raw[line_start : error.start].decode()) + 1
    return f"Invalid UTF-8 byte {raw[error.start]:#04x} (at line {line}, column {column})"


def policy_from_dict(data: dict[str, Any], path: Path) -> Policy:
    """Build a policy from a parsed policy file (``path`` is only used in messages)."""
    f = _File(path)
    f.check_keys(data, _TOP, "")
    base_name = f.string(data, "base", "de")
    if base_name not in POLICIES:
        raise f.fail("base", "one of " + ", ".join(POLICIES), base_name)
    base = POLICIES[base_name]
    patch = f.table(data, "patch")
    compression = f.table(data, "compression")
    similarity = f.table(data, "similarity")
    costs = f.table(data, "costs")
    _check_blocks(f, similarity, base)
    detector = HashSimilarityDetector(
        indexes=f.integer(similarity, "indexes", base.detector.indexes, 1, 64, "similarity."),
        blocks_per_index=f.integer(
            similarity, "blocks_per_index", base.detector.blocks_per_index, 1, 64, "similarity."
        ),
        candidates=f.integer(similarity, "candidates", base.detector.candidates, 1, 64, "similarity."),
        seed=f.integer(similarity, "seed", base.detector.seed, 0, 2**63 - 1, "similarity."),
    )
    codec_names = _check_codecs(
        f,
        f.string(patch, "codec", base.patch_codec, "patch."),
        f.string(compression, "codec", base.compression_codec, "compression."),
    )
    policy = Policy(
        name=f.string(data, "name", path.stem),
        description=f.string(data, "description", f"from {path}"),
        cross_vm=f.boolean(data, "cross_vm", base.cross_vm),
        patch=f.boolean(patch, "enabled", base.patch, "patch."),
        compress=f.boolean(compression, "enabled", base.compress, "compression."),
        patch_codec=codec_names[0],
        patch_threshold=f.integer(patch, "threshold", base.patch_threshold, 1, PAGE_SIZE, "patch."),
        compression_codec=codec_names[1],
        compression_threshold=f.integer(
            compression, "threshold", base.compression_threshold, 1, PAGE_SIZE, "compression."
        ),
        detector=detector,
        costs=CostModel(
            **{name: f.number(costs, name, getattr(base.costs, name), "costs.") for name in _TABLES["costs"]}
        ),
        zero_frame=base.zero_frame,
        max_page_sharing=_max_page_sharing(f, data, base_name, base),
    )
    return policy


def _max_page_sharing(f: _File, data: dict[str, Any], base_name: str, base: Policy) -> int | None:
    """The file's ``max_page_sharing``, else its base's: only a policy based on one that merges
    pages into KSM pages (``ksm``) has a cap to set."""
    if "max_page_sharing" not in data:
        return base.max_page_sharing
    if base.max_page_sharing is None:
        raise UsageError(
            f"{f.path}: max_page_sharing: only a policy based on ksm has KSM pages to cap "
            f'(base = "ksm"); this one is based on {base_name!r}'
        )
    value = data["max_page_sharing"]
    if isinstance(value, bool) or not isinstance(value, int) or not 2 <= value <= KSM_MAX_PAGE_SHARING_LIMIT:
        raise f.fail("max_page_sharing", f"an integer from 2 to {KSM_MAX_PAGE_SHARING_LIMIT}", value)
    return value


def _check_blocks(f: _File, similarity: dict[str, Any], base: Policy) -> None:
    k = similarity.get("indexes", base.detector.indexes)
    s = similarity.get("blocks_per_index", base.detector.blocks_per_index)
    if isinstance(k, int) and isinstance(s, int) and k * s > 64:
        raise f.fail(
            "similarity.indexes", "indexes * blocks_per_index <= 64 (64-byte blocks in a page)", k * s
        )


def _check_codecs(f: _File, patcher: str, compressor: str) -> tuple[str, str]:
    """Refuse codec names the codec registry does not know; the names when it knows them."""
    from dengine_cli import codecs

    checks = [
        ("patch.codec", patcher, codecs.patch_codec),
        ("compression.codec", compressor, codecs.compression_codec),
    ]
    for key, name, lookup in checks:
        try:
            lookup(name)
        except codecs.UnknownCodec as e:
            raise f.fail(key, "a known codec", name) from e
    return patcher, compressor
