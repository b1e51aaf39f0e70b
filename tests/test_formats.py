"""The format table: the magics it prefilters files by agree with what each reader's probe
claims, and a command reading one format imports only that reader."""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from dengine_cli.formats import (
    FORMAT_NAMES,
    READERS,
    all_formats,
    detect,
    elf,
    kdump,
    libvirt_save,
    lime,
    open_dump,
    qemu_stream,
    xc_core,
)
from dengine_cli.formats.base import OpenOptions, Source
from tests.builders.xc_core import pre_elf_xc_core
from tests.conftest import REPO

# What the readers themselves know their files start with (not taken from the table, so that a
# magic missing from the table is caught).
READER_MAGICS = [
    elf.ELF_MAGIC,
    kdump.KDUMP_SIGNATURE,
    kdump.DISKDUMP_SIGNATURE,
    kdump.FLAT_SIGNATURE,
    qemu_stream.QEVM_MAGIC + qemu_stream.QEMU_VM_FILE_VERSION.to_bytes(4, "big"),
    libvirt_save.SAVE_MAGIC,
    libvirt_save.PARTIAL_MAGIC,
    lime.LIME_MAGIC_BYTES,
    *xc_core.PRE_ELF_MAGICS,
]


def test_table_names_match_the_readers() -> None:
    assert [spec.name for spec in all_formats()] == list(FORMAT_NAMES)
    for name, module, _ in READERS:
        assert importlib.import_module(f"dengine_cli.formats.{module}").FORMAT.name == name


@settings(max_examples=400)
@given(
    prefix=st.sampled_from([b"", *READER_MAGICS]),
    # ELF headers: class, data, version bytes that make a valid ident, then anything.
    ident=st.sampled_from([b"", b"\x02\x01\x01", b"\x01\x01\x01", b"\x02\x02\x01"]),
    tail=st.binary(min_size=0, max_size=200),
)
def test_no_probe_claims_a_file_without_its_magic(prefix: bytes, ident: bytes, tail: bytes) -> None:
    head = prefix + ident + tail
    for spec, (_, _, magics) in zip(all_formats(), READERS, strict=True):
        if spec.probe(head, 1 << 30):
            assert magics and head.startswith(magics), spec.name


def test_real_and_built_files_are_found_through_the_table(
    real_dump: Callable[[str], Path], tmp_path: Path
) -> None:
    for name, expected in [("alpha.elf", "elf"), ("alpha.kdump", "kdump"), ("alpha.qevm", "qemu-stream")]:
        path = real_dump(name)
        assert detect(Source.of(path)).name == expected
    for hvm in (False, True):
        path = tmp_path / f"pre-elf-{hvm}.core"
        path.write_bytes(pre_elf_xc_core(hvm))
        assert detect(Source.of(path)).name == "xc-core"


def test_reading_an_elf_dump_imports_no_other_reader(real_dump: Callable[[str], Path]) -> None:
    code = (
        "import sys\n"
        "from dengine_cli.formats import open_dump\n"
        f"with open_dump({str(real_dump('alpha.elf'))!r}) as d:\n"
        "    assert d.page_count > 0\n"
        "print(' '.join(sorted(m for m in sys.modules if m.startswith('dengine_cli.formats.'))))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    loaded = set(out.split())
    assert "dengine_cli.formats.elf" in loaded and "dengine_cli.formats.xc_core" in loaded
    for other in ("kdump", "qemu_stream", "libvirt_save", "lime", "domain_xml"):
        assert f"dengine_cli.formats.{other}" not in loaded


def test_a_raw_image_says_what_it_left_past_its_last_page(tmp_path: Path) -> None:
    """Bytes past the last whole page of an image read as raw (``--dump-format raw``: the name
    alone claims only whole pages) are a note with their count and offset (in the singular for
    one), which `dengine info` shows in its table and its JSON, exit 0."""
    for extra, words in (
        (1, "the last byte (at offset 0x2000) is"),
        (3, "the last 3 bytes (at offset 0x2000) are"),
    ):
        path = tmp_path / f"x{extra}.raw"
        path.write_bytes(b"\x01" * (2 * 4096 + extra))
        dump = open_dump(path, OpenOptions(format="raw"))
        try:
            assert dump.page_count == 2
            assert dump.facts.skipped == [f"{words} not a whole page and {words.split()[-1]} not read"]
        finally:
            dump.close()
    dengine = str(REPO / ".venv" / "bin" / "dengine")
    path = tmp_path / "x100.raw"
    path.write_bytes(b"\x01" * (2 * 4096 + 100))
    note = "the last 100 bytes (at offset 0x2000) are not a whole page and are not read"
    r = subprocess.run([dengine, "info", "--dump-format", "raw", str(path)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert note in " ".join(r.stdout.split())
    r = subprocess.run(
        [dengine, "info", "--json", "--dump-format", "raw", str(path)], capture_output=True, text=True
    )
    assert r.returncode == 0, r.stderr
    (info,) = json.loads(r.stdout)["dumps"]
    assert info["skipped"] == [note] and info["pages_present"] == 2
