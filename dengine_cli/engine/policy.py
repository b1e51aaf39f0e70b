"""A memory-saving policy as the engine sees it: which of sharing, patching and compression a host
applies, with which codecs, thresholds, similarity detector and costs.  Named policies and policy
files are :mod:`dengine_cli.policies`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from dengine_cli.codecs import CompressionCodec, PatchCodec, compression_codec, patch_codec
from dengine_cli.engine.costs import CostModel
from dengine_cli.engine.similarity import HashSimilarityDetector

DEFAULT_PATCH_CODEC = "xor-zstd"
DEFAULT_COMPRESSION_CODEC = "zstd-1"
DEFAULT_THRESHOLD = 2048


@dataclass(frozen=True)
class Policy:
    """What a host does to save memory.

    ``zero_frame``: zero pages are merged into ordinary frames like any content (KSM without
    ``use_zero_pages``), charged to the first VM holding a zero page; otherwise zero pages cost
    nothing (they map the hypervisor's zero page).

    ``max_page_sharing``: one merged frame holds at most this many mappings (KSM's
    ``/sys/kernel/mm/ksm/max_page_sharing``), so a content of n copies takes ceil(n / M)
    frames, as analyze's KSM view counts them (:func:`~dengine_cli.engine.sharing.model.ksm_extra_pages`);
    the frames beyond the first are charged to the VM that keeps the content.  ``None``: no cap.
    """

    name: str
    description: str = ""
    cross_vm: bool = True
    patch: bool = False
    compress: bool = False
    patch_codec: str = DEFAULT_PATCH_CODEC
    patch_threshold: int = DEFAULT_THRESHOLD
    compression_codec: str = DEFAULT_COMPRESSION_CODEC
    compression_threshold: int = DEFAULT_THRESHOLD
    detector: HashSimilarityDetector = field(default_factory=HashSimilarityDetector)
    costs: CostModel = field(default_factory=CostModel)
    zero_frame: bool = False
    max_page_sharing: int | None = None

    def __post_init__(self) -> None:
        if self.max_page_sharing is not None and self.max_page_sharing < 2:
            raise ValueError("max_page_sharing must be at least 2, as in the kernel")
        # The codec names are looked up once, here: an unknown one is refused when the policy is
        # made (UnknownCodec; policy files turn it into a usage error naming the key).
        self.patcher  # noqa: B018
        self.compressor  # noqa: B018

    @property
    def patcher(self) -> PatchCodec:
        """The patch codec :attr:`patch_codec` names."""
        return patch_codec(self.patch_codec)

    @property
    def compressor(self) -> CompressionCodec:
        """The compression codec :attr:`compression_codec` names."""
        return compression_codec(self.compression_codec)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "description": self.description,
            "cross_vm": self.cross_vm,
            "zero_frame": self.zero_frame,
            "max_page_sharing": self.max_page_sharing,
            "patch": {
                "enabled": self.patch,
                "codec": self.patch_codec,
                "threshold": self.patch_threshold,
            },
            "compression": {
                "enabled": self.compress,
                "codec": self.compression_codec,
                "threshold": self.compression_threshold,
            },
            "similarity": self.detector.to_dict(),
            "costs_us": self.costs.to_dict(),
        }
