"""The C allocator's policy for loops that allocate and free the same tensors over and over.

PyTorch's CPU tensors come from malloc. glibc serves a block at or above its mmap threshold
(adjusted as the program runs, from 128 KiB up to 32 MiB) with a fresh mapping, unmapped again
when the block is freed, and gives memory freed at the top of its heap back to the system beyond
a trim threshold. The importance sampler's decoder passes allocate and free a few megabytes each,
thousands of times: with the default policy every pass pays page faults for fresh memory and, with
more than one thread, a TLB shootdown across cores for every unmap (dear in a virtual machine). On
a 2-core VM that made a pass of the 784-400-20 VAE's decoder 1.5x slower with 2 threads
(benchmarks/likelihood_throughput.py). Fixed thresholds keep freed blocks in the process for the
next pass; the cost is that up to TRIM_THRESHOLD of freed memory stays with the process.
"""

from __future__ import annotations

import ctypes
import os
import platform

MMAP_THRESHOLD = 32 * 2 ** 20  # glibc's largest: bigger blocks still get a mapping of their own
TRIM_THRESHOLD = 128 * 2 ** 20  # freed memory the heap keeps for reuse at most
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt's parameter numbers (malloc.h)

_kept: bool | None = None


def keep_freed_memory() -> bool:
    """Fix glibc's malloc thresholds (above) for this process, once; whether they are now set.

    Nothing is changed where malloc is not glibc's, or where the user chose the thresholds
    (GLIBC_TUNABLES naming glibc.malloc, or the MALLOC_MMAP_THRESHOLD_ / MALLOC_TRIM_THRESHOLD_
    variables): their choice stands.
    """
    global _kept
    if _kept is None:
        _kept = False
        chosen = ("glibc.malloc" in os.environ.get("GLIBC_TUNABLES", "")
                  or "MALLOC_MMAP_THRESHOLD_" in os.environ
                  or "MALLOC_TRIM_THRESHOLD_" in os.environ)
        if platform.system() == "Linux" and platform.libc_ver()[0] == "glibc" and not chosen:
            try:
                mallopt = ctypes.CDLL(None).mallopt
            except (OSError, AttributeError):
                return False
            mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
            _kept = bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and \
                bool(mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    return _kept
