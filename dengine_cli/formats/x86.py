"""Where a QEMU x86 guest's RAM sits in guest physical address space.

Sources: QEMU ``hw/i386/pc_q35.c`` and ``hw/i386/pc_piix.c`` (the split of RAM below and above
4 GiB), FORMATS.md §3.5 and §9 (what QEMU's dumps hold beside RAM).

What dengine counts as the guest's memory is its RAM.  QEMU's ELF and kdump dumps also carry
device memory mapped in the 32-bit PCI hole (VGA VRAM at 0xfd000000, the BIOS flash at
0xfffc0000), and its migration stream carries the RAM behind the legacy VGA window
(0xa0000-0xbffff), which the guest cannot see as RAM.  Neither is guest memory: readers of QEMU
dumps drop both (``--device-memory`` keeps the device memory), so every QEMU format of one guest
holds exactly the same pages.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt

from dengine_cli.pages import PAGE_SHIFT, GfnArray

FOUR_GIB = 1 << 32
#: The legacy VGA window: MMIO, never RAM as the guest sees it.
VGA_WINDOW = (0xA0000 >> PAGE_SHIFT, 0xC0000 >> PAGE_SHIFT)
FOUR_GIB_GFN = FOUR_GIB >> PAGE_SHIFT


def lowmem_bytes(machine: str | None, ram_bytes: int) -> int:
    """How much of ``pc.ram`` QEMU maps below 4 GiB for this machine type (default
    ``max-ram-below-4g``).  Unknown machine types are taken as i440fx, the QEMU default."""
    m = (machine or "").lower()
    if "q35" in m:
        return 0x80000000 if ram_bytes >= 0xB0000000 else ram_bytes
    if m.startswith("microvm"):
        return min(ram_bytes, 0xC0000000)
    old_piix = any(m == f"pc-i440fx-1.{v}" or m == f"pc-1.{v}" for v in range(0, 7)) or m.startswith("pc-0.")
    limit = 0xE0000000 if old_piix else 0xC0000000
    return limit if ram_bytes >= 0xE0000000 else ram_bytes


def ram_offset_to_gpa(offsets: npt.NDArray[np.integer[Any]], lowmem: int) -> npt.NDArray[np.uint64]:
    """Guest physical addresses of byte offsets into ``pc.ram``."""
    offs = offsets.astype(np.uint64, copy=False)
    gpa: npt.NDArray[np.uint64] = np.where(
        offs < np.uint64(lowmem), offs, offs - np.uint64(lowmem) + np.uint64(FOUR_GIB)
    )
    return gpa


def device_memory_mask(gfns: GfnArray) -> npt.NDArray[np.bool_]:
    """Which of a QEMU x86 dump's sorted gfns are device memory rather than RAM.

    RAM below 4 GiB is one run from gfn 0 whose only gap is the VGA window; any page below 4 GiB
    past the end of that run lies in the PCI hole (VRAM, flash, ROM BARs).  Pages at or above
    4 GiB are RAM.
    """
    g = gfns.astype(np.int64)
    low = g < FOUR_GIB_GFN
    if not low.any():
        return np.zeros(len(g), dtype=bool)
    lows = g[low]
    # Gaps between consecutive present low pages, ignoring the one across the VGA window.
    gap_after = np.flatnonzero(np.diff(lows) != 1)
    end = len(lows)
    for i in gap_after:
        a, b = int(lows[i]), int(lows[i + 1])
        if a < VGA_WINDOW[0] <= b and b <= VGA_WINDOW[1]:
            continue
        end = int(i) + 1
        break
    if lows[0] != 0:
        end = 0  # no RAM run from gfn 0: leave the guest's layout alone
        return np.zeros(len(g), dtype=bool)
    mask = np.zeros(len(g), dtype=bool)
    low_idx = np.flatnonzero(low)
    mask[low_idx[end:]] = True
    return mask
