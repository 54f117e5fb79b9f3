"""glibc's malloc set to keep freed memory for reuse, in the processes that run torch on batches of images: the
fine-tune's training processes and the advisor's similarity measurement.

Every batch allocates and frees the same large activation (and, training, gradient) buffers. By default glibc gives
each large block its own mmap and hands it back with munmap when freed, so the kernel maps and zeroes those pages
again on every batch: on 2 CPU cores a MobileNetV2 fine-tune spent as much time in the kernel as in torch. Served
from the heap instead (no mmap) and kept there (the heap is trimmed only when more than TRIM_THRESHOLD of it is
free), a training step takes less than half the time for up to a quarter more peak memory, and the advisor's
measurement a third less (benchmarks/allocator.py, benchmarks/README.md). Only where memory comes from
changes: the weights, losses and outputs are the same. Processes forked afterwards (a DataLoader's workers) keep it.
"""
from __future__ import annotations

import ctypes
import logging
import os

log = logging.getLogger(__name__)
# mallopt's parameter numbers, from glibc's <malloc.h>
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
TRIM_THRESHOLD = 1 << 30


def glibc_version() -> str | None:
    try:
        found = os.confstr("CS_GNU_LIBC_VERSION")  # "glibc 2.36"; None or an error on other C libraries
    except (ValueError, OSError):
        return None
    return found if found and found.startswith("glibc") else None


def keep_freed_memory() -> bool:
    """Sets glibc's malloc so for this process and the processes it forks from now on. False, with a log line saying
    why, where the C library is not glibc or refuses the setting: the work then runs at malloc's defaults."""
    version = glibc_version()
    if version is None:
        log.info("malloc left at its defaults: the C library is not glibc, whose settings this sets")
        return False
    libc = ctypes.CDLL(None)  # the C library this process already runs on
    if libc.mallopt(M_MMAP_MAX, 0) != 1 or libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) != 1:
        log.warning("malloc left at its defaults: %s refused mallopt (M_MMAP_MAX 0, M_TRIM_THRESHOLD %d)", version,
                    TRIM_THRESHOLD)
        return False
    log.info("malloc (%s) keeps freed memory for the next batch: no mmap per large block, the heap trimmed above "
             "%d MiB free", version, TRIM_THRESHOLD >> 20)
    return True
