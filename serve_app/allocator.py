"""Keep payload-sized buffers in the process heap instead of fresh mmap'd pages.

glibc serves large allocations with mmap and gives freed heap tops back to the OS, so
every request's megabytes of base64 land in pages that are new to the process: a page
fault per 4 KiB, which costs more than the encode itself (H100 host, 32 prompts of 512
tokens: 99 ms of encode with the defaults, 28 ms with the heap kept). Replicas that
handle payloads call `keep_payload_memory()` once at start.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

logger = logging.getLogger(__name__)

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_MMAP_THRESHOLD_MAX = 32 << 20
"""glibc's ceiling for the mmap threshold on 64-bit: larger requests still use mmap."""
_TRIM_THRESHOLD = 512 << 20
"""Free heap kept for the next requests before any is returned to the OS."""


def keep_payload_memory() -> bool:
    """Raise glibc's mmap and trim thresholds; False where the C library is not glibc."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    applied = bool(mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_MAX)) and bool(
        mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD))
    if not applied:
        logger.info("malloc thresholds unchanged: not glibc")
    return applied
