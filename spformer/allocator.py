"""glibc's adaptive heap thresholds, primed once for SPFormer's CPU allocation pattern.

glibc serves allocations above its mmap threshold with fresh ``mmap`` pages, and returns free memory
at the top of the heap to the OS once more than its trim threshold (twice the mmap threshold) sits
there; both start low and adapt upward to the largest mmapped block the program has freed, up to
32 MB. SPFormer's forward on CPU alternates pixel-sized SCA temporaries (6.4 MB each for SPFormer-S
at batch 8) with the ViT blocks' 9.6 MB MLP buffers in a way that keeps the adapted thresholds
below what it frees at once: the heap is trimmed and faulted back in every forward, ~15-26k page
faults per SPFormer-S forward at batch 8, most of them in the ViT blocks, ~8% of its CPU time.

:func:`prime_glibc_heap` frees one 30 MB block once, so the thresholds adapt as they would in any
program that had once freed a 30 MB temporary (mmap threshold 30 MB, trim threshold 60 MB). Nothing
is pinned: ``mallopt`` would fix the thresholds for the whole process and switch the adaptation off.
SPFormer models call it when they are built; ``SPFORMER_PRIME_MALLOC=0`` turns it off. It does
nothing on other C libraries.
"""
import ctypes
import os
import platform
import sys

PRIME_BYTES = 30 << 20  # below glibc's 32 MB ceiling for the adaptive threshold (DEFAULT_MMAP_THRESHOLD_MAX)

_primed = False


def prime_glibc_heap() -> bool:
    """Raise glibc's adaptive mmap/trim thresholds once per process; returns whether it did."""
    global _primed
    if _primed or os.environ.get('SPFORMER_PRIME_MALLOC', '1') == '0':
        return False
    if sys.platform != 'linux' or platform.libc_ver()[0] != 'glibc':
        return False
    libc = ctypes.CDLL(None)
    libc.malloc.restype = ctypes.c_void_p
    libc.malloc.argtypes = [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    block = libc.malloc(PRIME_BYTES)  # above the initial threshold: mmapped; freeing it raises the threshold
    libc.free(block)
    _primed = True
    return True
