"""Named policies and TOML policy files."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest

import dengine_cli.policies as policies
from dengine_cli.engine.costs import MAX_COST_US, CostModel
from dengine_cli.errors import EXIT_USAGE, UsageError
from dengine_cli.policies import POLICIES, load_policy_file, named_policy, resolve_policy
from tests.commands import invoke_quiet
from tests.vms import design_vms, write_raw_images

#: The tail of every usage error of ``plan``.
SEE_PLAN_HELP = "; see 'dengine plan --help'"


def test_named_policies() -> None:
    assert list(POLICIES) == ["ksm", "esx", "de", "de-share-patch", "de-share-compress"]
    ksm, esx, de = POLICIES["ksm"], POLICIES["esx"], POLICIES["de"]
    assert ksm.cross_vm and ksm.zero_frame and not (ksm.patch or ksm.compress)
    assert not esx.cross_vm and not (esx.patch or esx.compress)
    assert de.cross_vm and de.patch and de.compress
    assert (de.patch_threshold, de.compression_threshold) == (2048, 2048)
    assert (de.detector.indexes, de.detector.blocks_per_index, de.detector.candidates) == (2, 1, 1)
    assert POLICIES["de-share-patch"].patch and not POLICIES["de-share-patch"].compress
    assert POLICIES["de-share-compress"].compress and not POLICIES["de-share-compress"].patch
    assert de.costs == CostModel()
    assert CostModel().patch == 338.1 and CostModel().swap_in == 7151.6
    d = de.to_dict()
    assert d["patch"]["codec"] == "xor-zstd" and d["compression"]["codec"] == "zstd-1"
    assert d["similarity"]["offsets"] == list(de.detector.offsets)


def test_unknown_name() -> None:
    with pytest.raises(UsageError, match="unknown policy 'zfs'; known: ksm, esx, de") as e:
        named_policy("zfs")
    assert e.value.exit_code == 2


def docstring_example() -> str:
    doc = policies.__doc__ or ""
    block = doc.split("names; every key is optional::", 1)[1].split("Any error in a file", 1)[0]
    return "\n".join(line[4:] for line in block.splitlines())


def test_docstring_example_loads(tmp_path: Path) -> None:
    path = tmp_path / "de-lz4.toml"
    path.write_text(docstring_example())
    p = load_policy_file(path)
    assert p.name == "de-lz4"
    assert p.compression_codec == "lz4" and p.patch_codec == "xor-zstd"
    assert p.patch and p.compress and p.cross_vm
    assert p.costs.patch == 300.0 and p.costs.swap_in == 5000.0 and p.costs.share == 6.2
    assert resolve_policy(str(path)) == p


def test_file_starts_from_its_base(tmp_path: Path) -> None:
    path = tmp_path / "x.toml"
    path.write_text(
        'base = "esx"\n[similarity]\nindexes = 3\nblocks_per_index = 2\ncandidates = 4\nseed = 9\n'
    )
    p = load_policy_file(path)
    assert p.name == "x" and not p.cross_vm and not p.patch
    d = p.detector
    assert (d.indexes, d.blocks_per_index, d.candidates, d.seed) == (3, 2, 4, 9)
    assert len(d.offsets) == 6
    assert resolve_policy("de") is POLICIES["de"]


COST = "a number of microseconds within 0..1000000000"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "colour = 1\n",
            "colour: expected one of base, compression, costs, cross_vm, description, "
            "max_page_sharing, name, patch, similarity, found 'colour'",
        ),
        (
            'base = "zfs"\n',
            "base: expected one of ksm, esx, de, de-share-patch, de-share-compress, found 'zfs'",
        ),
        ("cross_vm = 1\n", "cross_vm: expected true or false, found 1"),
        ("[patch]\nthreshold = 5000\n", "patch.threshold: expected an integer within 1..4096, found 5000"),
        ("[patch]\nthreshold = true\n", "patch.threshold: expected an integer within 1..4096, found True"),
        ("[patch]\nlevel = 3\n", "patch.level: expected one of codec, enabled, threshold, found 'level'"),
        ('[patch]\ncodec = "rsync"\n', "patch.codec: expected a known codec, found 'rsync'"),
        (
            '[compression]\ncodec = "xor-zstd"\n',
            "compression.codec: expected a known codec, found 'xor-zstd'",
        ),
        ("[costs]\npatch = -1\n", f"costs.patch: expected {COST}, found -1"),
        ('[costs]\npatch = "fast"\n', f"costs.patch: expected {COST}, found 'fast'"),
        ("[costs]\npatch = nan\n", f"costs.patch: expected {COST}, found nan"),
        ("[costs]\npatch = inf\n", f"costs.patch: expected {COST}, found inf"),
        ("[costs]\nswap_in = +inf\n", f"costs.swap_in: expected {COST}, found inf"),
        ("[costs]\nshare = -inf\n", f"costs.share: expected {COST}, found -inf"),
        ("[costs]\ncow_break = -0.5\n", f"costs.cow_break: expected {COST}, found -0.5"),
        # Finite, but a plan's total over a few pages would overflow to inf.
        ("[costs]\nunpatch = 1e308\n", f"costs.unpatch: expected {COST}, found 1e+308"),
        ("[costs]\ncompress = 1000000001\n", f"costs.compress: expected {COST}, found 1000000001"),
        ("[costs]\nuncompress = true\n", f"costs.uncompress: expected {COST}, found True"),
        ("[similarity]\nindexes = 0\n", "similarity.indexes: expected an integer within 1..64, found 0"),
        (
            "[similarity]\nindexes = 9\nblocks_per_index = 8\n",
            "similarity.indexes: expected indexes * blocks_per_index <= 64",
        ),
        ("patch = 3\n", "patch: expected a table, found 3"),
        (
            'base = "ksm"\nmax_page_sharing = 1\n',
            "max_page_sharing: expected an integer from 2 to 2147483647, found 1",
        ),
        (
            'base = "ksm"\nmax_page_sharing = 0\n',
            "max_page_sharing: expected an integer from 2 to 2147483647, found 0",
        ),
        (
            'base = "ksm"\nmax_page_sharing = -4\n',
            "max_page_sharing: expected an integer from 2 to 2147483647, found -4",
        ),
        (
            'base = "ksm"\nmax_page_sharing = 2.5\n',
            "max_page_sharing: expected an integer from 2 to 2147483647, found 2.5",
        ),
        (
            'base = "ksm"\nmax_page_sharing = "16"\n',
            "max_page_sharing: expected an integer from 2 to 2147483647, found '16'",
        ),
        (
            'base = "ksm"\nmax_page_sharing = true\n',
            "max_page_sharing: expected an integer from 2 to 2147483647, found True",
        ),
        (
            'base = "ksm"\nmax_page_sharing = 9223372036854775808\n',
            "max_page_sharing: expected an integer from 2 to 2147483647, found 9223372036854775808",
        ),
        (
            'base = "ksm"\nmax_page_sharing = 2147483648\n',
            "max_page_sharing: expected an integer from 2 to 2147483647, found 2147483648",
        ),
        (
            "max_page_sharing = 16\n",
            'max_page_sharing: only a policy based on ksm has KSM pages to cap (base = "ksm"); '
            "this one is based on 'de'",
        ),
        (
            'base = "esx"\nmax_page_sharing = 16\n',
            'max_page_sharing: only a policy based on ksm has KSM pages to cap (base = "ksm"); '
            "this one is based on 'esx'",
        ),
    ],
)
def test_bad_files_name_the_file_and_key(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(UsageError, match=re.escape(f"{path}: {message}")) as e:
        load_policy_file(path)
    assert e.value.exit_code == 2


def test_max_page_sharing_caps_a_policy_based_on_ksm(tmp_path: Path) -> None:
    """A file based on ksm takes the file's cap, else ksm's 256; other bases have none."""
    path = tmp_path / "k.toml"
    for text, cap in (
        ('base = "ksm"\nmax_page_sharing = 2\n', 2),
        ('base = "ksm"\nmax_page_sharing = 2147483647\n', 2**31 - 1),
        ('base = "ksm"\ncross_vm = false\nmax_page_sharing = 16\n', 16),
        ('base = "ksm"\n', 256),
        ('base = "de"\n', None),
    ):
        path.write_text(text)
        policy = load_policy_file(path)
        assert policy.max_page_sharing == cap, text
        assert policy.to_dict()["max_page_sharing"] == cap
        assert policy.zero_frame == (cap is not None)


def test_not_toml_and_missing(tmp_path: Path) -> None:
    path = tmp_path / "broken.toml"
    path.write_text("base = \n")
    with pytest.raises(UsageError, match=re.escape(f"{path}: not a valid TOML policy file")):
        load_policy_file(path)
    with pytest.raises(UsageError, match="cannot read policy file"):
        resolve_policy(str(tmp_path / "missing.toml"))


def test_costs_at_the_bounds_are_taken(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text(f"[costs]\npatch = 0\nswap_in = {MAX_COST_US}\nshare = 1e9\n")
    costs = load_policy_file(path).costs
    assert (costs.patch, costs.swap_in, costs.share) == (0.0, 1e9, 1e9)
    for bad in (float("inf"), float("-inf"), float("nan"), -1.0, 2e9):
        with pytest.raises(ValueError, match="cost patch must be a number from 0 to 1000000000 us"):
            CostModel(patch=bad)


@pytest.mark.parametrize(
    ("data", "where"),
    [
        (b"\xff\xfe\x00\x01", "byte 0xff (at line 1, column 1)"),
        ('base = "de"\nname = "d\u00e9t\u00e9"\n'.encode("latin-1"), "byte 0xe9 (at line 2, column 10)"),
        ('name = "\u00e9t\u00e9"\n# \u00e9\n'.encode() + b"\x80", "byte 0x80 (at line 3, column 1)"),
        ('name = "\u00e9\u00e9" # \u00e9'.encode() + b"\xc3", "byte 0xc3 (at line 1, column 16)"),
    ],
)
def test_a_file_that_is_not_utf8_is_malformed_toml(tmp_path: Path, data: bytes, where: str) -> None:
    """Not UTF-8 (TOML is): refused as malformed TOML is, placed as tomllib places its errors (in
    characters, not bytes)."""
    path = tmp_path / "binary.toml"
    path.write_bytes(data)
    with pytest.raises(UsageError) as e:
        resolve_policy(str(path))
    assert str(e.value) == f"{path}: not a valid TOML policy file: Invalid UTF-8 {where}"
    assert e.value.exit_code == EXIT_USAGE


def test_a_directory_or_a_fifo_is_no_policy_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An existing path not named .toml is taken for a policy file (it used to be taken for an
    unknown policy's name) and refused for what it is when it is not a regular file (a FIFO is
    not opened: that would wait for ever for a writer); a policy's name wins over a path."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "pol").mkdir()
    os.mkfifo(tmp_path / "fifo")
    os.mkfifo(tmp_path / "fifo.toml")
    for spec, what in (
        ("pol", "is a directory"),
        ("fifo", "is a FIFO (a pipe), not a regular file"),
        ("fifo.toml", "is a FIFO (a pipe), not a regular file"),
        (os.devnull, "is not a regular file"),
    ):
        with pytest.raises(UsageError) as e:
            resolve_policy(spec)
        assert str(e.value) == f"{spec}: cannot read policy file: {what}"
        assert e.value.exit_code == EXIT_USAGE
    (tmp_path / "de").mkdir()
    assert resolve_policy("de") is POLICIES["de"]


def test_plan_refuses_bad_policy_files_on_one_line(tmp_path: Path) -> None:
    """Through the command: exit 2 and one line naming the file, no traceback; before the fix a
    file not UTF-8 was an internal error (exit 1), and a cost of inf gave a plan's JSON a bare
    Infinity."""
    (dump,) = write_raw_images(tmp_path, design_vms(5, [8]))

    def plan_json(policy: Path) -> tuple[int, str, str]:
        index = str(tmp_path / "idx")
        return invoke_quiet("plan", "--dump-format", "raw", "--baseline", "none", "--index-dir", index,
                            "--format", "json", "--policy", str(policy), str(dump))  # fmt: skip

    cases = {
        "binary.toml": (
            b"\xff\xfe\x00\x01",
            "not a valid TOML policy file: Invalid UTF-8 byte 0xff (at line 1, column 1)",
        ),
        "inf.toml": (b"[costs]\npatch = inf\n", f"costs.patch: expected {COST}, found inf"),
        "huge.toml": (b"[costs]\nswap_in = 1e300\n", f"costs.swap_in: expected {COST}, found 1e+300"),
    }
    for name, (data, message) in cases.items():
        path = tmp_path / name
        path.write_bytes(data)
        code, out, err = plan_json(path)
        assert code == EXIT_USAGE, err
        assert err.splitlines() == [f"dengine: plan: {path}: {message}{SEE_PLAN_HELP}"] and out == ""
    (tmp_path / "pol").mkdir()
    code, _, err = invoke_quiet("plan", "--dump-format", "raw", "--policy", str(tmp_path / "pol"), str(dump))
    assert code == EXIT_USAGE
    assert err.splitlines() == [
        f"dengine: plan: {tmp_path / 'pol'}: cannot read policy file: is a directory{SEE_PLAN_HELP}"
    ]
    os.mkfifo(tmp_path / "fifo")
    code, _, err = plan_json(tmp_path / "fifo")
    assert code == EXIT_USAGE
    assert err.splitlines() == [
        f"dengine: plan: {tmp_path / 'fifo'}: cannot read policy file: is a FIFO (a pipe), not a regular file"
        + SEE_PLAN_HELP
    ]
    # The largest cost is taken, and its plan is JSON (no Infinity).
    path = tmp_path / "slow.toml"
    path.write_text(f"[costs]\n{chr(10).join(f'{k} = {MAX_COST_US}' for k in CostModel().to_dict())}\n")
    code, out, err = plan_json(path)
    assert code == 0, err
    doc = json.loads(out, parse_constant=lambda c: pytest.fail(f"{c} in a plan's JSON"))
    assert doc["cost"]["build_seconds"] > 0
