"""Keep freed host memory in the process, so XLA:CPU does not page-fault its buffers every step.

XLA:CPU allocates the temporary buffer of each compiled call with `malloc` and frees it when
the call ends. For the Mamba training step of `benchmarks/peers.py` that buffer is 182 MB per
device. glibc's `malloc` serves an allocation that large with a fresh `mmap` and unmaps it on
`free`. It does so whatever its settings when the calling thread has its own arena, as XLA's
worker threads do. Every step then writes to new pages, about 44,000 page faults per device.

`keep_freed_host_memory` tells glibc to serve every allocation from the one main heap and never
to give freed memory back to the kernel. The heap first grows by a few buffers, until the freed
ones leave holes large enough for the next; from then on buffers are reused and the page faults
stop. The cost is host memory: the process keeps its peak heap until it exits (the default job
of `train.py` peaked at 1.2 GB resident instead of 0.85 GB). It must run before JAX starts its
backend, because threads that have already allocated keep their own arenas. Elsewhere than
Linux with glibc it does nothing.

`train.py` and the benchmarks call `apply_flag` first in `main`; `--keep_host_memory=false`
turns it off.
"""

import ctypes
import ctypes.util

from absl import flags

_KEEP_HOST_MEMORY = flags.DEFINE_bool(
    "keep_host_memory", True,
    "Keep freed host memory for reuse (glibc on Linux; see training/host_memory.py), so that "
    "XLA:CPU stops page-faulting its buffers every step. The process then holds its peak host "
    "memory until it exits.")

# mallopt parameters, from glibc's <malloc.h>.
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8
# The largest value of mallopt's int argument, so that the heap is never trimmed.
_NEVER = 2**31 - 1

_settings_applied = False


def _glibc():
    """Return the C library if it is glibc, else None."""
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        libc = ctypes.CDLL(name)
    except OSError:
        return None
    if not hasattr(libc, "gnu_get_libc_version") or not hasattr(libc, "mallopt"):
        return None
    return libc


def keep_freed_host_memory() -> bool:
    """Make glibc's malloc keep freed memory for reuse; return whether the settings took effect.

    Call it before the first JAX computation of the process (before `jax.devices()`).
    """
    global _settings_applied
    libc = _glibc()
    if libc is None:
        return False
    settings = (
        (_M_ARENA_MAX, 1),  # one arena, because other arenas' heaps hold at most 64 MB each
        (_M_MMAP_MAX, 0),  # no allocation is served by its own mmap
        (_M_TRIM_THRESHOLD, _NEVER),  # the top of the heap is never returned to the kernel
    )
    _settings_applied = all(libc.mallopt(parameter, value) == 1 for parameter, value in settings)
    return _settings_applied


def is_kept() -> bool:
    """Return whether `keep_freed_host_memory` has taken effect in this process."""
    return _settings_applied


def apply_flag() -> bool:
    """Call `keep_freed_host_memory` unless `--keep_host_memory=false`; return whether it applied."""
    return _KEEP_HOST_MEMORY.value and keep_freed_host_memory()
