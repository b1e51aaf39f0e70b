"""The table of dump formats: name, cheap probe, opener.

Adding a format is one module that defines a :class:`FormatSpec` and one line in
:data:`dengine_cli.formats.FORMATS`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from dengine_cli.formats.base import Dump, OpenOptions, Source

#: How many bytes of a file probes are shown.
PROBE_BYTES = 1 << 16


@dataclass(frozen=True)
class FormatSpec:
    """One dump format.

    ``probe(head, size)`` looks only at the first bytes of the file (``head``, at most
    :data:`PROBE_BYTES`) and its size; it is pure and never raises.  ``open`` parses the file and
    raises FormatError / UnsupportedFeature naming the offset of what is wrong.
    """

    name: str
    description: str
    probe: Callable[[bytes, int], bool]
    open: Callable[[Source, OpenOptions], Dump]
