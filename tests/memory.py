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


def fixed_mmap_threshold(threshold: int = 1 << 20) -> bool:
    """Serve every allocation of `threshold` bytes or more (1 MiB by default) by its own mmap, returned to
    the OS when freed.

    glibc's default raises its mmap threshold to the size of the first big block freed (a released
    layer), after which layer-sized tensors come from the heap, whose holes (a whole layer freed, a
    smaller shard placed in it) keep the resident size near the whole model even though the live
    tensors are 1/N of it. A fixed threshold makes RSS follow the live tensors.
    """
    try:
        import ctypes

        return ctypes.CDLL("libc.so.6").mallopt(-3, threshold) == 1  # M_MMAP_THRESHOLD
    except OSError:
        return False


def one_malloc_arena() -> bool:
    """Make glibc serve every thread from one heap (M_ARENA_MAX = 1) from now on.

    By default each thread that allocates (gloo's workers, torch's pools) gets an arena of its own,
    and pages freed in one arena are not reused by another, so resident size grows with how the
    work happened to be spread over threads, by ranks differently. Call it first thing in a process.
    """
    try:
        import ctypes

        return ctypes.CDLL("libc.so.6").mallopt(-8, 1) == 1  # M_ARENA_MAX
    except OSError:
        return False


def reset_peak_rss() -> None:
    """Start the peak (VmHWM) over from the current resident size (Linux: /proc/self/clear_refs)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def peak_rss_since_reset() -> int:
    """The peak resident bytes since `reset_peak_rss()` (or since the process started)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("/proc/self/status has no VmHWM line")


def release_free_memory() -> None:
    """Collect garbage and hand freed heap pages back to the OS (glibc), so a baseline reads what is live."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
