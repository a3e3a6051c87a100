"""Keep freed host memory in the process, so XLA:CPU does not page-fault its buffers every step.

XLA:CPU allocates the temporary buffer of each compiled call with `malloc` and frees it when
the call ends. For the Mamba training step of `benchmarks/peers.py` that buffer is 182 MB per
device. glibc's `malloc` serves an allocation that large with a fresh `mmap` and unmaps it on
`free`. A thread with its own arena, as each of XLA's worker threads has, gets such a block
from `mmap` whatever the settings, because a secondary arena's heap holds at most 64 MiB
(glibc 2.36). Every step then writes to new pages, about 44,000 page faults per device.

`keep_freed_host_memory` calls glibc's `mallopt` so that every allocation comes from the one
main heap, and so that the heap is trimmed only when more than 2 GiB are free at its top. The
heap first grows by a few buffers, until the freed ones leave holes large enough for the next.
From then on buffers are reused and the page faults stop. The costs: the process keeps its
peak heap (the benchmark records give the figures), and all threads share one arena and its
lock. The settings must come before JAX starts its backend, because threads that have already
allocated keep their own arenas. With another C library (macOS, Windows, musl) it does nothing.

`train.py` and the benchmarks call `apply_flag` first in `main`, and `--keep_host_memory=false`
turns it off.
"""

import ctypes
import os

from absl import flags

_KEEP_HOST_MEMORY = flags.DEFINE_bool(
    "keep_host_memory", True,
    "Keep freed host memory for reuse (glibc on Linux; see training/host_memory.py), so that "
    "XLA:CPU stops page-faulting its buffers every step. The process then keeps its peak host "
    "memory, and all its threads share one malloc arena.")

# mallopt parameters, from glibc's <malloc.h>.
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8
# The largest value of mallopt's int argument, in bytes.
_MAX_TRIM_THRESHOLD = 2**31 - 1

_settings_applied = False


def _glibc():
    """Return the C library of this process if it is glibc, else None."""
    try:
        version = os.confstr("CS_GNU_LIBC_VERSION")
    except (AttributeError, ValueError, OSError):
        return None  # No confstr (Windows), or a C library that does not know the name.
    if not version or not version.startswith("glibc"):
        return None
    return ctypes.CDLL(None)


def keep_freed_host_memory() -> bool:
    """Set glibc's malloc to keep freed memory for reuse, and return whether glibc accepted it.

    Call it before the first JAX computation of the process (before `jax.devices()`).
    """
    global _settings_applied
    libc = _glibc()
    if libc is None:
        _settings_applied = False
        return False
    settings = (
        (_M_ARENA_MAX, 1),  # one arena, because other arenas' heaps hold at most 64 MiB each
        (_M_MMAP_MAX, 0),  # no allocation gets its own mmap
        (_M_TRIM_THRESHOLD, _MAX_TRIM_THRESHOLD),
    )
    results = [libc.mallopt(parameter, value) for parameter, value in settings]
    _settings_applied = all(result == 1 for result in results)
    return _settings_applied


def is_kept() -> bool:
    """Return whether `keep_freed_host_memory` ran in this process and glibc accepted it.

    NOTE: it cannot tell whether JAX's threads had allocated before the call, nor whether an
    allocator preloaded with LD_PRELOAD (jemalloc, tcmalloc) serves `malloc` instead of glibc.
    """
    return _settings_applied


def apply_flag() -> bool:
    """Call `keep_freed_host_memory` unless --keep_host_memory=false, and return the result."""
    # Silent either way: commands print nothing before their own messages, and the benchmarks
    # record `is_kept()` with the machine.
    return _KEEP_HOST_MEMORY.value and keep_freed_host_memory()
