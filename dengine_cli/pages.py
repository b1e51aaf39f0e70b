"""The unit everything works in: the 4 KiB guest page, and the array types pages travel in.

Every layer (readers, codecs, engine, caches) names pages the same way, so these facts live
below all of them.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

PAGE_SHIFT = 12
PAGE_SIZE = 1 << PAGE_SHIFT

#: Pages per batch: 16 Ki pages = 64 MiB, large enough to amortize per-batch overhead, small enough
#: to keep the resident set bounded.
BATCH_PAGES = 16384

GfnArray = npt.NDArray[np.uint64]
OffsetArray = npt.NDArray[np.int64]
PageArray = npt.NDArray[np.uint8]
