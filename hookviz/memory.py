"""Keep freed memory in the process for long runs (glibc only).

With glibc's default malloc, blocks above the mmap threshold (which adapts up to
32 MiB) are returned to the OS when freed; a CNN's activations are that big, so
every forward pass page-faults its memory in again. Measured here on resnet50,
Grad-CAM at batch 16: 1.45 s per batch by default, 0.89 s with freed memory kept
(see benchmarks/RESULTS.md). The CLI owns its process, so it sets this at start;
the library never does (it would change its host program's allocator).
"""

from __future__ import annotations

import ctypes
import os
import platform

KEEP_BYTES = 1 << 30  # up to 1 GiB of freed memory stays in the process for reuse
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameter numbers
_ENVIRONMENT = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_")


def keep_freed_memory(limit: int = KEEP_BYTES) -> bool:
    """Raise glibc's mmap and trim thresholds; False where that does not apply or the user tuned malloc already."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    if any(name in os.environ for name in _ENVIRONMENT):  # the user's own setting wins
        return False
    try:
        libc = ctypes.CDLL(None)
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, limit)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, limit))
    except (OSError, AttributeError):
        return False
