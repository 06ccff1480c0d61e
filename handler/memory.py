"""Process-wide allocator settings for a serving worker (Linux, glibc)."""

from __future__ import annotations

import ctypes
import logging

log = logging.getLogger(__name__)

# mallopt parameters (malloc.h).
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3

# glibc's largest mmap threshold on 64-bit systems: blocks up to this size come from the heap.
MMAP_THRESHOLD = 32 << 20
# Free memory the heap may keep at its top instead of handing it back to the kernel.
TRIM_THRESHOLD = 256 << 20


def keep_freed_memory() -> bool:
    """Serve allocations up to 32 MB from glibc's heap and keep freed memory there for reuse.

    By default glibc maps large blocks (a batch of pixels, a layer's activations) fresh from the
    kernel and unmaps them when freed, adapting its threshold to what it has seen: depending on
    that history a worker may page-fault every batch's tensors in again, so normalization and
    inference times changed from one server start to the next; with these settings they stay at
    their best. Call before the loader workers fork: they inherit the setting. Returns whether
    it took (False off glibc).
    """
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the C library the interpreter already uses
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    done = mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1 and mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
    if not done:
        log.info("mallopt is not available here; large tensors are mapped fresh for every batch")
    return done
