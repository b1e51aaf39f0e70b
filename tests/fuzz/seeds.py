"""The seed dumps: small, complete and valid files of every format dengine reads.

Two kinds: files the test builders write from the specs (tests/builders/), and slices of the
real QEMU fixtures (fixtures/*.zst) cut down to a few hundred KiB of guest RAM while staying
complete, valid dumps of the same kind (the real headers, notes and record framing QEMU wrote).
Each seed carries its :class:`~tests.fuzz.layout.Layout` for the mutator.
"""

from __future__ import annotations

import functools
import random
import struct
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import zstandard

from tests.builders import elf as elfb
from tests.builders import kdump as kdumpb
from tests.builders import libvirt_save as saveb
from tests.builders import lime as limeb
from tests.builders import qemu_stream as qevmb
from tests.builders import xc_core as xcb
from tests.fuzz import maps
from tests.fuzz.layout import Layout, elf_layout, u

PAGE = 4096
FIXTURES = Path(__file__).resolve().parents[2] / "fixtures"


@dataclass(frozen=True)
class Seed:
    """One seed file.  ``wrap`` names a compressed container (``gzip``, ``zstd``...) the bytes are
    put in after mutation (the map is of the inner bytes); ``suffix`` is the file name ending."""

    name: str
    format: str
    suffix: str
    data: bytes
    layout: Layout
    wrap: str | None = None


def guest_pages(n: int, seed: int) -> list[bytes]:
    """``n`` pages of what guests hold: zeros, a page repeated (sharing), near copies of one page
    (patching), text (compression), random bytes, a fill byte."""
    r = random.Random(seed)
    base = r.randbytes(PAGE)
    words = b"page frame guest memory share patch compress kernel buffer cache ".split()
    out = []
    for i in range(n):
        kind = i % 6
        if kind == 0:
            page = bytes(PAGE)
        elif kind == 1:
            page = base
        elif kind == 2:
            near = bytearray(base)
            near[r.randrange(PAGE)] ^= r.randrange(1, 256)
            page = bytes(near)
        elif kind == 3:
            text = b" ".join(r.choice(words) for _ in range(900))
            page = text[:PAGE].ljust(PAGE, b"\n")
        elif kind == 4:
            page = r.randbytes(PAGE)
        else:
            page = bytes([r.randrange(1, 256)]) * PAGE
        out.append(page)
    return out


# -- from the builders -----------------------------------------------------------------------------


def _elf_seeds() -> list[Seed]:
    pages = guest_pages(24, 1)
    segs = [
        elfb.Segment(0, b"".join(pages[:16])),
        elfb.Segment(0x100000, b"".join(pages[16:22]), memsz=8 * PAGE),
        elfb.Segment(0xFD000000, b"".join(pages[22:24])),
    ]
    notes = [elfb.prstatus_note(), elfb.qemu_note(), elfb.vmcoreinfo_note()]
    qemu = elfb.build_elf(segs, notes=notes, qemu_layout=True).data
    be32 = elfb.build_elf(segs[:2], elf_class=32, big_endian=True, machine=elfb.EM_386, notes=notes[:1]).data
    xnum = elfb.build_elf(segs[:2], notes=notes[:1], pn_xnum=True).data
    return [
        Seed("elf-qemu", "elf", ".elf", qemu, elf_layout(qemu)),
        Seed("elf32-be", "elf", ".elf", be32, elf_layout(be32)),
        Seed("elf-pn-xnum", "elf", ".elf", xnum, elf_layout(xnum)),
    ]


def _kdump_seeds() -> list[Seed]:
    pages = guest_pages(30, 2)
    content = {g: p for g, p in zip([*range(0, 20), *range(40, 50)], pages, strict=True)}
    vmci = b"OSRELEASE=6.1.0-test\nPAGESIZE=4096\nSYMBOL(init_uts_ns)=ffffffff82a12340\n"
    seeds = []
    for codec in ("zlib", "lzo", "snappy", "zstd", "none"):
        kf = kdumpb.build_kdump(content, excluded={25, 26}, codec=codec, vmcoreinfo=vmci)
        seeds.append(Seed(f"kdump-{codec}", "kdump", ".kdump", kf.data, maps.kdump_layout(kf.data)))
    for codec in ("zlib", "lzo"):
        kf = kdumpb.build_kdump(content, codec=codec, shared_zero=True, utsname={}, vmcoreinfo=vmci)
        flat = kdumpb.flatten(kf, chunk=8192)
        lay = maps.flat_layout(flat, maps.kdump_layout(kf.data))
        seeds.append(Seed(f"kdump-{codec}-flat", "kdump", ".kdump", flat, lay))
    kf = kdumpb.build_kdump(content, codec="snappy", layout="32", machine="i686")
    seeds.append(Seed("kdump32-snappy", "kdump", ".kdump", kf.data, maps.kdump_layout(kf.data, "32")))
    return seeds


def _xc_core_layout(built: xcb.BuiltXcCore, hvm: bool) -> Layout:
    lay = elf_layout(built.data)
    for k, name in enumerate(("magic", "nr_vcpus", "nr_pages", "page_size")):
        lay.int(built.header_desc_offset + 8 * k, 8, "<", f"xen.header.{name}")
    entry = 8 if hvm else 16
    table_len = len(built.data) - built.table_offset
    for k in range(0, min(table_len, 32 * entry), 8):
        lay.int(built.table_offset + k, 8, "<", "xen.table")
    lay.region(built.table_offset, table_len, "pfn table")
    for k in range(4):
        lay.region(built.pages_offset + k * PAGE, PAGE, "page")
    return lay


def _xc_core_seeds() -> list[Seed]:
    pages = guest_pages(16, 3)
    hvm = xcb.build_xc_core(
        [(pfn, 0, p) for pfn, p in zip([*range(8), *range(0x100, 0x108)], pages, strict=True)], hvm=True
    )
    pv = xcb.build_xc_core(
        [(pfn, 0x5000 + pfn, p) for pfn, p in enumerate(pages)], hvm=False, padding=2, shuffle_seed=7
    )
    return [
        Seed("xc-core-hvm", "xc-core", ".core", hvm.data, _xc_core_layout(hvm, True)),
        Seed("xc-core-pv", "xc-core", ".core", pv.data, _xc_core_layout(pv, False)),
    ]


def _stream_pages(n: int, seed: int) -> dict[tuple[str, int], bytes | int]:
    pages = guest_pages(n, seed)
    return {("pc.ram", i): p for i, p in enumerate(pages)}


def _mapped_ram_layout(data: bytes, blocks: dict[str, int]) -> Layout:
    """A mapped-ram stream: each block's MappedRamHeader (be32 version, be64 page_size,
    bitmap_offset, pages_offset), its bitmap and first pages (QEMU ``ram.c``)."""
    lay = maps.stream_map(data).layout
    for name, length in blocks.items():
        at = data.index(bytes([len(name)]) + name.encode() + struct.pack(">Q", length))
        lay.int(at, 1, ">", "mem_size.name_length")
        lay.int(at + 1 + len(name), 8, ">", "mem_size.block_length")
        hdr = at + 1 + len(name) + 8
        lay.int(hdr, 4, ">", "mapped_ram.version")
        for k, field_name in enumerate(("page_size", "bitmap_offset", "pages_offset")):
            lay.int(hdr + 4 + 8 * k, 8, ">", f"mapped_ram.{field_name}")
        bitmap_at, pages_at = u(data, hdr + 12, 8, ">"), u(data, hdr + 20, 8, ">")
        lay.region(bitmap_at, (length // PAGE + 63) // 64 * 8, "mapped_ram.bitmap")
        for k in range(min(4, length // PAGE)):
            lay.region(pages_at + k * PAGE, PAGE, "page")
        lay.cuts.update((hdr, bitmap_at, pages_at, pages_at + length))
    return lay


def _qevm_seeds() -> list[Seed]:
    blocks = {"pc.ram": 24 * PAGE, "pc.bios": 2 * PAGE}
    pages = _stream_pages(24, 4)
    pages[("pc.bios", 1)] = b"\xaa" * PAGE
    plain = qevmb.build_stream(pages, blocks, uuid="6c0ffee0-0000-4000-8000-00000000a1fa")
    packed = qevmb.build_stream(pages, blocks, compress=True, resend={("pc.ram", 3): b"\x55" * PAGE})
    mapped = qevmb.build_mapped_ram({k: v for k, v in pages.items() if isinstance(v, bytes)}, blocks)
    mapped_lay = _mapped_ram_layout(mapped, blocks)
    return [
        Seed("qevm", "qemu-stream", ".qevm", plain, maps.stream_map(plain).layout),
        Seed("qevm-compressed", "qemu-stream", ".qevm", packed, maps.stream_map(packed).layout),
        Seed("qevm-mapped-ram", "qemu-stream", ".qevm", mapped, mapped_lay),
    ]


def _libvirt_seeds() -> list[Seed]:
    stream = qevmb.build_stream(_stream_pages(12, 5), {"pc.ram": 12 * PAGE})
    raw = saveb.build_save(stream, saveb.domain_xml(memory_kib=48))
    lay, at = maps.libvirt_layout(raw)
    lay.extend(maps.stream_map(raw, at).layout)
    gz = saveb.build_save(stream, saveb.domain_xml(memory_kib=48), "gzip")
    gz_lay, at = maps.libvirt_layout(gz)
    gz_lay.region(at, len(gz) - at, "compressed stream")
    return [
        Seed("libvirt-save", "libvirt-save", ".save", raw, lay),
        Seed("libvirt-save-gzip", "libvirt-save", ".save", gz, gz_lay),
    ]


def _lime_seeds() -> list[Seed]:
    pages = guest_pages(12, 6)
    data = limeb.build_lime([(0, b"".join(pages[:8])), (0x100800, b"".join(pages[8:]) + b"tail")])
    return [Seed("lime", "lime", ".lime", data, maps.lime_layout(data))]


def _raw_seeds() -> list[Seed]:
    data = b"".join(guest_pages(16, 7))
    lay = Layout()
    for k in range(16):
        lay.region(k * PAGE, PAGE, "page")
    return [Seed("raw", "raw", ".raw", data, lay)]


def _container_seeds(inner: dict[str, Seed]) -> list[Seed]:
    """Compressed containers around other seeds: the mutator changes the inner file, then the
    bytes are compressed (and sometimes the compressed bytes mutated too)."""
    pairs = [
        ("gzip", "lime", ".lime.gz"),
        ("zstd", "elf-qemu", ".elf.zst"),
        ("bzip2", "kdump-zlib", ".kdump.bz2"),
        ("xz", "qevm", ".qevm.xz"),
        ("lzop", "xc-core-hvm", ".core.lzo"),
    ]
    out = []
    for kind, name, suffix in pairs:
        s = inner[name]
        out.append(Seed(f"{name}.{kind}", "container", suffix, s.data, s.layout, wrap=kind))
    return out


_TOOLS = {
    "gzip": ["gzip", "-c", "-1"],
    "bzip2": ["bzip2", "-c", "-1"],
    "xz": ["xz", "-c", "-0"],
    "lzop": ["lzop", "-c", "-1"],
}


def wrap(kind: str, data: bytes) -> bytes:
    """``data`` compressed as the container ``kind`` (the real tools; zstd through its library)."""
    if kind == "zstd":
        return zstandard.ZstdCompressor(level=1).compress(data)
    if kind == "gzip":
        import gzip

        return gzip.compress(data, compresslevel=1, mtime=0)
    return subprocess.run(_TOOLS[kind], input=data, capture_output=True, check=True).stdout


# -- slices of the real fixtures -------------------------------------------------------------------


def _fixture(name: str) -> bytes | None:
    path = FIXTURES / f"{name}.zst"
    if not path.exists():
        return None
    with path.open("rb") as f:
        return zstandard.ZstdDecompressor().stream_reader(f).read()


#: Guest pages kept per PT_LOAD of a sliced ELF (RAM below 640K, RAM above 1 MiB, VRAM, BIOS).
ELF_SLICE_PAGES = (48, 32, 2, 2)


def slice_elf(data: bytes) -> bytes:
    """A QEMU ELF core cut to the first pages of each PT_LOAD: the same ELF header, section
    header table, notes and program headers (with p_filesz/p_memsz/p_offset rewritten), the
    segments' first pages packed after the notes, and ``.shstrtab`` moved to the end."""
    ehdr = elf_layout(data)
    phoff, phnum = u(data, 32, 8, "<"), u(data, 56, 2, "<")
    shoff, shnum = u(data, 40, 8, "<"), u(data, 60, 2, "<")
    loads = [i for i in range(phnum) if u(data, phoff + 56 * i, 4, "<") == 1]
    first = min(u(data, phoff + 56 * i + 8, 8, "<") for i in loads)
    out = bytearray(data[:first])
    for k, i in enumerate(loads):
        at = phoff + 56 * i
        offset, filesz = u(data, at + 8, 8, "<"), u(data, at + 32, 8, "<")
        keep = min(filesz, ELF_SLICE_PAGES[min(k, len(ELF_SLICE_PAGES) - 1)] * PAGE)
        struct.pack_into("<Q", out, at + 8, len(out))
        struct.pack_into("<QQ", out, at + 32, keep, keep)
        out += data[offset : offset + keep]
    for j in range(shnum):
        at = shoff + 64 * j
        s_off, s_size = u(data, at + 24, 8, "<"), u(data, at + 32, 8, "<")
        if s_size and s_off >= first:
            struct.pack_into("<Q", out, at + 24, len(out))
            out += data[s_off : s_off + s_size]
    del ehdr
    return bytes(out)


#: Guest frames kept of the kdump fixture (all of RAM below 512 KiB).
KDUMP_SLICE_PAGES = 128


def slice_kdump(flat: bytes) -> tuple[bytes, bytes]:
    """QEMU's flattened kdump fixture cut to its first :data:`KDUMP_SLICE_PAGES` frames: the
    real header and sub-header (VMCOREINFO, notes) with max_mapnr and the bitmaps cut down, the
    descriptors of those frames and their zlib pages (QEMU's shared zero page kept shared).
    Returns (plain kdump, flattened as QEMU writes it)."""
    plain = kdumpb.reassemble(flat)
    block = u(plain, 428, 4, "<")
    sub_blocks = u(plain, 432, 4, "<")
    bitmap_blocks = u(plain, 436, 4, "<")
    n = KDUMP_SLICE_PAGES
    half = bitmap_blocks * block // 2
    bitmap_at = (1 + sub_blocks) * block
    b1 = plain[bitmap_at : bitmap_at + n // 8]
    b2 = plain[bitmap_at + half : bitmap_at + half + n // 8]
    dumped = sum(bin(b).count("1") for b in b2)
    desc_at = bitmap_at + bitmap_blocks * block
    new_desc_at = bitmap_at + 2 * block
    data_at = new_desc_at + 24 * dumped
    descs = bytearray()
    data = bytearray()
    placed: dict[int, int] = {}
    for i in range(dumped):
        offset, size, flags, page_flags = struct.unpack_from("<qIIQ", plain, desc_at + 24 * i)
        if offset not in placed:
            placed[offset] = data_at + len(data)
            data += plain[offset : offset + size]
        descs += struct.pack("<qIIQ", placed[offset], size, flags, page_flags)
    out = bytearray(plain[:bitmap_at])
    struct.pack_into("<II", out, 436, 2, n)
    struct.pack_into("<Q", out, block + 96, n)
    out += b1.ljust(block, b"\0") + b2.ljust(block, b"\0") + descs + data
    kf = kdumpb.KdumpFile(bytes(out))
    kf.regions = {
        "header": (0, 464),
        "sub": (block, sub_blocks * block),
        "bitmap1": (bitmap_at, block),
        "bitmap2": (bitmap_at + block, block),
        "desc": (new_desc_at, len(descs)),
        "data": (data_at, len(data)),
    }
    return kf.data, kdumpb.flatten(kf)


#: Pages kept of each RAM block of the stream fixture (pc.ram, then every other block).
QEVM_SLICE_PAGES = (96, 4)


def slice_qevm(data: bytes) -> bytes:
    """QEMU's migration stream fixture with every RAM block cut to its first pages: the real
    configuration and section framing, a MEM_SIZE list with the shorter lengths, the page
    records of the kept pages (block names re-sent where the record that named the block was
    dropped), then the rest of the stream (device sections) as QEMU wrote it."""
    sm = maps.stream_map(data)
    keep = {
        name: min(length, QEVM_SLICE_PAGES[0 if k == 0 else 1] * PAGE)
        for k, (name, length, _) in enumerate(sm.blocks)
    }
    out = bytearray()
    pos = 0
    last: bytes | None = None
    for rec in sm.records:
        out += data[pos : rec.at]
        pos = rec.end
        if rec.page * PAGE >= keep[rec.block]:
            continue
        named = not rec.flags & maps.CONTINUE
        body_at = rec.at + 8 + (1 + len(rec.block) if named else 0)
        flags = rec.flags if last == rec.block else rec.flags & ~maps.CONTINUE
        out += struct.pack(">Q", rec.page << 12 | flags)
        if not flags & maps.CONTINUE:
            out += bytes([len(rec.block)]) + rec.block
        out += data[body_at : rec.end]
        last = rec.block
    out += data[pos:]
    # The MEM_SIZE list comes before any page record: rewrite it in place.
    struct.pack_into(">Q", out, sm.mem_size_at, sum(keep.values()) | maps.MEM_SIZE)
    for name, _, at in sm.blocks:
        struct.pack_into(">Q", out, at, keep[name])
    return bytes(out)


def _fixture_seeds() -> list[Seed]:
    seeds = []
    elf = _fixture("alpha.elf")
    if elf is not None:
        s = slice_elf(elf)
        seeds.append(Seed("fixture-alpha.elf", "elf", ".elf", s, elf_layout(s)))
    kd = _fixture("alpha.kdump")
    if kd is not None:
        plain, flat = slice_kdump(kd)
        lay = maps.flat_layout(flat, maps.kdump_layout(plain))
        seeds.append(Seed("fixture-alpha.kdump", "kdump", ".kdump", flat, lay))
    qe = _fixture("alpha.qevm")
    if qe is not None:
        s = slice_qevm(qe)
        seeds.append(Seed("fixture-alpha.qevm", "qemu-stream", ".qevm", s, maps.stream_map(s).layout))
    return seeds


BUILDERS: tuple[Callable[[], list[Seed]], ...] = (
    _elf_seeds,
    _kdump_seeds,
    _xc_core_seeds,
    _qevm_seeds,
    _libvirt_seeds,
    _lime_seeds,
    _raw_seeds,
    _fixture_seeds,
)


@functools.cache
def all_seeds() -> tuple[Seed, ...]:
    """Every seed, in a fixed order (case numbers pick seeds by position)."""
    seeds = [s for build in BUILDERS for s in build()]
    seeds += _container_seeds({s.name: s for s in seeds})
    return tuple(seeds)
