"""Reading a process's resident memory in tests, and making it follow the live tensors."""
from __future__ import annotations

import os
import resource


def peak_rss() -> int:
    """The process's peak resident bytes so far (Linux reports kilobytes)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def current_rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def fixed_mmap_threshold() -> bool:
    """Serve every allocation above 1 MiB by its own mmap, returned to the OS when freed.

    glibc's default raises its mmap threshold to the size of the first big block freed (a released
    layer), after which layer-sized tensors come from the heap, whose holes (a whole layer freed, a
    smaller shard placed in it) keep the resident size near the whole model even though the live
    tensors are 1/N of it. A fixed threshold makes RSS follow the live tensors.
    """
    try:
        import ctypes

        return ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 20) == 1  # M_MMAP_THRESHOLD
    except OSError:
        return False
