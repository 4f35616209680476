"""spformer.allocator: one freed 30 MB block raises glibc's adaptive mmap threshold, observed through
glibc's own accounting (mallinfo2: bytes in mmapped blocks) in fresh processes, against a control
process that does not prime."""
import os
import platform
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(sys.platform != 'linux' or platform.libc_ver()[0] != 'glibc',
                                reason='glibc only: other C libraries have no adaptive mmap threshold to prime')

SCRIPT = r'''
import ctypes, importlib.util, sys

class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in
                ('arena', 'ordblks', 'smblks', 'hblks', 'hblkhd', 'usmblks', 'fsmblks', 'uordblks', 'fordblks', 'keepcost')]

libc = ctypes.CDLL(None)
libc.mallinfo2.restype = MallInfo2
libc.malloc.restype = ctypes.c_void_p
libc.malloc.argtypes = [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]

def mmapped_while_holding(n):
    p = libc.malloc(n)
    held = libc.mallinfo2().hblkhd
    libc.free(p)
    return held

# load the module alone: importing the spformer package would allocate (and adapt glibc) first
spec = importlib.util.spec_from_file_location('allocator', sys.argv[1])
allocator = importlib.util.module_from_spec(spec)
spec.loader.exec_module(allocator)
mmapped_while_holding(20 << 20)  # adapts the threshold to ~20 MB, as glibc does by itself
primed = allocator.prime_glibc_heap() if sys.argv[2] == 'prime' else False
print(primed, mmapped_while_holding(25 << 20) >= 25 << 20)  # a 25 MB block: mmapped, or from the heap?
'''


def _run(mode, **env):
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'spformer', 'allocator.py')
    out = subprocess.run([sys.executable, '-c', SCRIPT, path, mode], capture_output=True, text=True, check=True,
                         env={**os.environ, **env})
    return out.stdout.split()


def test_prime_raises_glibcs_mmap_threshold():
    assert _run('control') == ['False', 'True']  # without priming a 25 MB block is mmapped (fresh pages)
    assert _run('prime') == ['True', 'False']  # after it, the heap serves it: no fresh pages
    assert _run('prime', SPFORMER_PRIME_MALLOC='0') == ['False', 'True']  # the opt-out
