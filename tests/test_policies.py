"""Named policies and TOML policy files."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import dengine_cli.policies as policies
from dengine_cli.engine.costs import CostModel
from dengine_cli.errors import UsageError
from dengine_cli.policies import POLICIES, load_policy_file, named_policy, resolve_policy


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
        ("[costs]\npatch = -1\n", "costs.patch: expected a number of microseconds >= 0, found -1"),
        ('[costs]\npatch = "fast"\n', "costs.patch: expected a number of microseconds >= 0, found 'fast'"),
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
