"""Fused CPU backend: kernels/cpu_kernels.c, compiled on first use with the machine's C compiler.

The PyTorch backend (torch_backend.py) spends its time between kernels: each logit, softmax and
weighted sum is a separate pass over per-cell tensors, and the per-cell products are thousands of
tiny matrix products. Here each direction is one pass that keeps its rows in the L1 cache
(on CPU, SPFormer-S needs fused kernels on the pixel side to come near DeiT-S's throughput).

The C kernels take N = B * M_p images of G = M / M_p heads each (pixel tensors shared by all heads,
what SPFormer runs, or one per head), float32 and float64 (fp16/bf16 inputs are computed in fp32, as
every backend accumulates). Without a C compiler every call goes to the PyTorch backend (a one-time
warning says why); ``$CC`` may be a command with arguments (``ccache gcc``). The compiled library is
cached under ``$SPFORMER_CACHE_DIR`` (default ``~/.cache/spformer``), keyed by the source, the compiler,
its flags and the CPU, written atomically with a record of its size and sha256 that is checked before
every load: a cached file that is truncated or not the one built is never loaded (a truncated library
would kill the process with SIGBUS) but replaced, with a warning. Where the cache directory cannot be
written, each process compiles into a temporary directory (a warning says so). Set
``SPFORMER_CPU_KERNELS=0`` to turn the kernels off. They run on torch's OpenMP threads (the
library binds to the libgomp torch has loaded), ``torch.set_num_threads()`` of them.

Besides the attention, two forward-only kernels for SPFormer's per-pixel maps, registered as custom
ops (FLOP counting and fake tensors see them): :func:`conv_rescale` (an SCA iteration's pixel
features) and :func:`cell_pooled_projection` (the superpixel init); the model calls them where no
autograd graph is recorded (``spformer.kernels.functional.fused_inference_kernel``).
"""
import contextlib
import ctypes
import errno
import hashlib
import json
import math
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path
from typing import Optional

import torch
from torch.utils.flop_counter import register_flop_formula

from . import torch_backend
from .torch_backend import _ungroup, accumulate_dtype, heads_grouped, heads_last, superpixels_grouped

SOURCE = Path(__file__).with_name('cpu_kernels.c')
FLAGS = ('-O3', '-march=native', '-funroll-loops', '-ffp-contract=fast', '-fopenmp', '-std=c99', '-fPIC', '-shared')
# each missing feature still leaves a working build: portable code, then no threads
_FALLBACK_FLAGS = (FLAGS, tuple(f for f in FLAGS if f != '-march=native'),
                   tuple(f if f != '-fopenmp' else '-fopenmp-simd' for f in FLAGS if f != '-march=native'))
_DTYPES = {torch.float32: ('f32', ctypes.c_float, ()), torch.float64: ('f64', ctypes.c_double, ('-DREAL=double', '-DREAL_IS_DOUBLE'))}

# every function the library exports, as NAME_f32 / NAME_f64: a library without them is not used
_SYMBOLS = ('superpixel_fwd', 'superpixel_bwd', 'pixel_fwd', 'pixel_bwd', 'conv_rescale_fwd',
            'cell_pooled_projection_fwd')
_CACHE_LAYOUT = '2'  # part of the key: libraries cached without a size/hash record (layout 1) are never read
_TMP_PREFIX = '.spformer-tmp-'  # + pid + '-' + the entry's name: a build's temporary files in the cache directory
_STALE_AFTER_S = 300  # a temporary file this old whose process is gone is left over from a killed build
_LOCK_WAIT_S = 300  # how long a process waits for another one that is building in the same cache directory
_COMPILE_TIMEOUT_S = 600

_lock = threading.Lock()
_libraries = {}
_unavailable: Optional[str] = None  # why the kernels cannot be used, once known
_compile_announced = False
_cache_warned = False


class _Unusable(Exception):
    """A cached library that is there but must not be loaded; the message says why."""


class _CacheNotWritable(OSError):
    """The cache directory cannot take a new library (permissions, read-only, not a directory, disk full)."""


def _cache_dir() -> Path:
    root = os.environ.get('SPFORMER_CACHE_DIR') or os.path.join(
        os.environ.get('XDG_CACHE_HOME') or os.path.join(os.path.expanduser('~'), '.cache'), 'spformer')
    return Path(root) / 'cpu_kernels'


def _cpu_fingerprint() -> str:
    """-march=native code runs only on CPUs with the same instruction sets: part of the cache key."""
    try:
        with open('/proc/cpuinfo') as f:
            lines = [line for line in f if line.startswith(('model name', 'flags', 'Features'))]
        return ''.join(sorted(set(lines)))
    except OSError:
        return platform.processor() + platform.machine()


def _compiler_name() -> str:
    """The compiler as the user named it, for messages."""
    return f"CC={os.environ['CC']!r}" if os.environ.get('CC') else 'cc'


def _compiler() -> list:
    """The compiler command: ``$CC`` split as a shell splits it (``ccache gcc``, ``gcc -m64``), or ``cc``."""
    return shlex.split(os.environ.get('CC') or 'cc') or ['cc']


def _library_path(folder: Path, suffix: str, compiler, version: str, flags) -> Path:
    """The cache key, in the library's name: a hash of the source, the compiler command and its ``--version``
    output, the flags and the CPU. Any change makes a new entry; an entry's content never changes."""
    key = hashlib.sha256('\0'.join([_CACHE_LAYOUT, SOURCE.read_text(), shlex.join(compiler), version, *flags,
                                    _cpu_fingerprint()]).encode())
    return folder / f'spformer_cpu_{suffix}_{key.hexdigest()[:16]}.so'


def _record_path(library: Path) -> Path:
    """``NAME.so.json``: the library's size and sha256, written after the library is complete on disk."""
    return library.with_name(library.name + '.json')


def _digest(path: Path):
    """(size, sha256) of the bytes in ``path``."""
    h, size = hashlib.sha256(), 0
    with open(path, 'rb') as f:
        for chunk in iter(lambda: f.read(1 << 20), b''):
            h.update(chunk)
            size += len(chunk)
    return size, h.hexdigest()


def _dlclose(lib) -> None:
    """Unloads a library that will not be used: dlopen() hands out the library already loaded from a path,
    so a library rebuilt at the same path would not be read otherwise."""
    try:
        import _ctypes
        _ctypes.dlclose(lib._handle)
    except (ImportError, AttributeError, OSError):
        pass


def _open(path: Path, suffix: str):
    """The library at ``path``, verified and loaded, or None where there is none; raises :class:`_Unusable`
    for one that is there but must not be used. It is mapped only if its size and sha256 are the ones
    recorded when it was built: a truncated library (a full disk, a power loss) maps without an error, and
    the first call into a page past its end kills the process with SIGBUS."""
    try:
        size, sha = _digest(path)
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as e:
        raise _Unusable(f'it cannot be read: {e}') from None
    record = _record_path(path)
    try:
        meta = json.loads(record.read_text())
        want_size, want_sha = meta['size'], meta['sha256']
    except FileNotFoundError:
        raise _Unusable(f'it has no size and hash record, {record.name}: an interrupted build') from None
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise _Unusable(f'its record {record.name} is unreadable: {e!r}') from None
    if size != want_size:
        raise _Unusable(f'{size} bytes where {want_size} were written: truncated or overwritten')
    if sha != want_sha:
        raise _Unusable('its sha256 is not the one recorded when it was built')
    try:
        lib = ctypes.CDLL(str(path))
    except OSError as e:
        raise _Unusable(f'it does not load: {e}') from None
    missing = [f'{name}_{suffix}' for name in _SYMBOLS if not hasattr(lib, f'{name}_{suffix}')]
    if missing:
        _dlclose(lib)
        raise _Unusable(f'it lacks the functions {", ".join(missing)}')
    return lib


def _remove(path: Path) -> bool:
    """Removes a cache entry, the library and its record; whether the library is gone."""
    for p in (_record_path(path), path):
        try:
            p.unlink()
        except FileNotFoundError:
            pass
        except OSError:
            return False
    return True


def _fsync(path, directory: bool = False) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        if directory:  # not every platform opens directories: their entries are then not flushed
            return
        raise
    try:
        os.fsync(fd)
    except OSError:
        if not directory:
            raise
    finally:
        os.close(fd)


@contextlib.contextmanager
def _directory_lock(folder: Path):
    """Holds ``folder/.lock`` while this process checks, removes or builds entries there; yields whether the
    lock is held. A process that finds a library missing while another builds it waits for that build, and
    none takes an entry being installed (library renamed, record not yet) for a broken one. Best effort:
    without ``fcntl``, a lock file or within ``_LOCK_WAIT_S``, it goes on unlocked (renames stay atomic)."""
    try:
        import fcntl
        fd = os.open(folder / '.lock', os.O_RDWR | os.O_CREAT, 0o644)
    except (ImportError, OSError):
        fd = None
    if fd is None:
        yield False
        return
    try:
        deadline, held = time.monotonic() + _LOCK_WAIT_S, False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                held = True
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    break
                time.sleep(0.05)
            except OSError:
                break
        yield held
    finally:
        os.close(fd)  # releases the lock, as the end of the process does


def _alive(pid: int) -> bool:
    if os.name != 'posix':  # elsewhere os.kill() ends the process
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # someone else's process
        return True
    return True


def _remove_stale_temporaries(folder: Path, locked: bool) -> None:
    """Removes the temporary files of builds that were killed. With the directory lock held no other process
    is building here, so every other process's temporary file is left over; without it, only those older
    than ``_STALE_AFTER_S`` whose process is gone (another process may be compiling into one right now)."""
    try:
        names = os.listdir(folder)
    except OSError:
        return
    for name in names:
        pid = name[len(_TMP_PREFIX):].partition('-')[0]
        if not name.startswith(_TMP_PREFIX) or not pid.isdigit() or int(pid) == os.getpid():
            continue
        path = folder / name
        try:
            if locked or (time.time() - path.stat().st_mtime > _STALE_AFTER_S and not _alive(int(pid))):
                path.unlink()
        except OSError:
            pass


def _build(compiler, flags, path: Path, version: str, announce: bool = True) -> None:
    """Compiles into a temporary file beside ``path``, flushes it to disk and renames it into place, then
    writes its size and sha256 record the same way: a library is never seen half-written, and a record
    means that its library was complete on disk. Raises :class:`_CacheNotWritable` where the directory
    cannot take the files, CalledProcessError etc. where the compiler fails."""
    tmp = path.with_name(f'{_TMP_PREFIX}{os.getpid()}-{path.name}')
    tmp_record = _record_path(tmp)
    try:
        try:  # created here: a directory that cannot be written is told apart from a compiler that fails
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o755))
        except OSError as e:
            raise _CacheNotWritable(e.errno, f'{e.strerror}: {tmp.parent}') from e
        if announce:
            _announce_compile(path.parent)
        try:
            subprocess.run([*compiler, *flags, str(SOURCE), '-o', str(tmp), '-lm'], check=True, capture_output=True,
                           text=True, timeout=_COMPILE_TIMEOUT_S)
        except subprocess.CalledProcessError as e:
            if os.strerror(errno.ENOSPC) in (e.stderr or ''):
                raise _CacheNotWritable(errno.ENOSPC, f'{os.strerror(errno.ENOSPC)}: {tmp.parent}') from e
            raise
        try:
            _fsync(tmp)
            size, sha = _digest(tmp)
            os.replace(tmp, path)
            _fsync(path.parent, directory=True)
            with open(tmp_record, 'w') as f:
                json.dump(dict(size=size, sha256=sha, compiler=shlex.join(compiler),
                               version=version.strip().splitlines()[0] if version.strip() else '', flags=list(flags)),
                          f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp_record, _record_path(path))
            _fsync(path.parent, directory=True)
        except OSError as e:
            raise _CacheNotWritable(e.errno, f'{e.strerror}: {tmp.parent}') from e
    finally:
        for p in (tmp, tmp_record):
            try:
                p.unlink()
            except OSError:
                pass


def _announce_compile(folder: Path) -> None:
    """One line on stderr, once per process, before the first compilation: a first call that takes seconds
    should say why. Information, not a warning: nothing is wrong and nothing needs doing."""
    global _compile_announced
    if not _compile_announced:
        _compile_announced = True
        print('spformer: compiling the fused CPU kernels (once per machine and version, a few seconds; '
              f'cached in {folder})', file=sys.stderr, flush=True)


def _cached_or_built(folder: Path, suffix: str, compiler, version: str, flags, broken: list):
    """The library from the cache, built there first if it is missing. A cached library that must not be
    used (:func:`_open`) is removed and rebuilt once; ``broken`` gets its path and why."""
    path = _library_path(folder, suffix, compiler, version, flags)
    try:
        lib = _open(path, suffix)  # the common case: no lock, no build
        if lib is not None:
            return lib
    except _Unusable:
        pass  # looked at again under the lock: another process may be installing it right now
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise _CacheNotWritable(e.errno, f'{e.strerror}: {folder}') from e
    with _directory_lock(folder) as locked:
        try:
            lib = _open(path, suffix)  # built by another process while this one waited
            if lib is not None:
                return lib
        except _Unusable as e:
            broken.append((path, str(e), _remove(path)))
        _remove_stale_temporaries(folder, locked)
        _build(compiler, flags, path, version)
        try:
            lib = _open(path, suffix)
        except _Unusable:
            _remove(path)  # a fresh build that does not load: the next process builds again
            raise
        if lib is None:
            raise _Unusable(f'{path} was removed as soon as it was built')
        return lib


def _built_privately(suffix: str, compiler, version: str, flags):
    """The library compiled into a temporary directory of this process (the cache directory is not
    writable), loaded, and the directory removed (the loaded library stays mapped)."""
    try:
        folder = Path(tempfile.mkdtemp(prefix=f'spformer-kernels-{os.getpid()}-'))
    except OSError as e:
        raise _CacheNotWritable(e.errno, f'{e.strerror}: {tempfile.gettempdir()}') from e
    try:
        path = _library_path(folder, suffix, compiler, version, flags)
        _build(compiler, flags, path, version, announce=False)  # the warning said so
        lib = _open(path, suffix)
        if lib is None:
            raise _Unusable(f'{path} was removed as soon as it was built')
        return lib
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _warn_cache_not_writable(folder: Path, error: OSError) -> None:
    global _cache_warned
    if not _cache_warned:
        _cache_warned = True
        warnings.warn(f'spformer: the kernel cache directory {folder} is not writable ({error}); the fused CPU '
                      'kernels are compiled into a temporary directory instead, again in every process (a few '
                      'seconds). Set SPFORMER_CACHE_DIR to a writable directory to keep them.', RuntimeWarning)


def _why(error: BaseException) -> str:
    """A build or load failure in one line (a compiler's: the last line it printed)."""
    text = (getattr(error, 'stderr', None) or '').strip() or str(error)
    return text.splitlines()[-1] if text.strip() else type(error).__name__


def _load(dtype: torch.dtype):
    """The compiled library for ``dtype``, or None (and the reason in ``_unavailable``)."""
    global _unavailable
    if dtype in _libraries:
        return _libraries[dtype]
    with _lock:
        if dtype in _libraries:
            return _libraries[dtype]
        if os.environ.get('SPFORMER_CPU_KERNELS', '1') == '0':
            _unavailable = 'SPFORMER_CPU_KERNELS=0'
            return None
        suffix, _, defines = _DTYPES[dtype]
        lib, errors, broken = None, [], []
        try:
            compiler = _compiler()
            version = subprocess.run([*compiler, '--version'], capture_output=True, text=True, check=True,
                                     timeout=60).stdout
        except (OSError, ValueError, subprocess.SubprocessError) as e:
            errors.append((f'{_compiler_name()}: {_why(e)}', True))
        else:
            folder = _cache_dir()
            for flags in _FALLBACK_FLAGS:
                try:
                    try:
                        lib = _cached_or_built(folder, suffix, compiler, version, flags + defines, broken)
                    except _CacheNotWritable as e:
                        _warn_cache_not_writable(folder, e)
                        lib = _built_privately(suffix, compiler, version, flags + defines)
                    break
                except _CacheNotWritable as e:  # the temporary directory too
                    errors.append((f'the library cannot be written: {e}', False))
                except (OSError, subprocess.SubprocessError) as e:
                    errors.append((f'{_compiler_name()}: {_why(e)}', True))
                except _Unusable as e:
                    errors.append((f'the library built does not work: {e}', False))
        if broken:
            path, why, removed = broken[0]
            if lib is not None:
                outcome = 'removed it and rebuilt the kernels.' if removed else \
                    'rebuilt the kernels without it (it cannot be removed).'
            else:
                outcome = ('removed it; ' if removed else '') + (
                    f'the rebuild failed ({errors[-1][0]}), so this process runs the PyTorch backend, which is slower.')
            warnings.warn(f'spformer: the cached CPU kernel library {path} is unusable ({why}) and was not loaded; '
                          f'{outcome}', RuntimeWarning)
        if lib is None:
            _unavailable, compiler_failed = errors[-1]
            if not broken:
                warnings.warn(f'spformer: the fused CPU attention kernels are unavailable ({_unavailable}); using '
                              'the PyTorch backend, which is slower.'
                              + (' Set CC to a C compiler to use them.' if compiler_failed else ''), RuntimeWarning)
            _libraries[dtype] = None
            return None
        _libraries[dtype] = lib
        return lib


def available(dtype: torch.dtype = torch.float32) -> bool:
    """Whether the fused kernels run for inputs of ``dtype`` (compiling them on first use)."""
    return _load(accumulate_dtype(dtype)) is not None


def unavailable_reason() -> Optional[str]:
    return _unavailable


def _supported(x: torch.Tensor) -> bool:
    return x.device.type == 'cpu' and available(x.dtype)


def _pixels(x: torch.Tensor, dt: torch.dtype) -> torch.Tensor:
    """A pixel tensor as the kernels read it: (B, Mp, ...) -> contiguous (B * Mp, ...), in its own layout
    (image or cell-major: the kernels index both, so no layout copy)."""
    return x.to(dt).reshape(x.shape[0] * x.shape[1], *x.shape[2:]).contiguous()


def _grouped(s: torch.Tensor, Mp: int) -> torch.Tensor:
    """Superpixel tensor (B, M, h, w, *c) -> contiguous (B * Mp, h, w, G, *c), the kernels' layout
    (:func:`torch_backend.superpixels_grouped`; no copy for heads-last memory and Mp = 1)."""
    return superpixels_grouped(s, Mp).contiguous()


def _ptr(t: Optional[torch.Tensor]):
    return None if t is None else ctypes.c_void_p(t.data_ptr())


def _kernel(fn_name: str, dtype: torch.dtype):
    """The compiled C function ``fn_name`` for ``dtype``, and its scalar type."""
    suffix, c_real, _ = _DTYPES[dtype]
    return getattr(_load(dtype), f'{fn_name}_{suffix}'), c_real


def _run(fn_name: str, dtype: torch.dtype, pointers, sizes, scale: float, layout):
    fn, c_real = _kernel(fn_name, dtype)
    fn(*pointers, *sizes, c_real(scale), *layout)


def _c(*ints):
    return [ctypes.c_ssize_t(int(i)) for i in ints]


def _geometry(N, h, w, cell, G, d, dv, cells):
    """The kernels' size arguments (before the scale) and layout arguments (after it)."""
    return _c(N, h, w, cell * cell, G, d, dv), [ctypes.c_ssize_t(cell), ctypes.c_int(0 if cells else 1)]


def superpixel_attention_fwd(q, k, v, cell: int, scale: float, shared_kv: bool = False, cells: bool = False):
    """As :func:`torch_backend.superpixel_attention_fwd`."""
    if not _supported(q):
        return torch_backend.superpixel_attention_fwd(q, k, v, cell, scale, shared_kv, cells)
    B, M, h, w, d = q.shape
    Mp = k.shape[1]
    dt = accumulate_dtype(q.dtype)
    kc = _pixels(k, dt)  # (N, ..., d), N = B * Mp
    vc = kc if shared_kv else _pixels(v, dt)
    qg = _grouped(q.to(dt), Mp)  # (N, h, w, G, d); free for the model's heads-last queries
    N, G, dv = kc.shape[0], M // Mp, vc.shape[-1]
    out = q.new_empty(N, h, w, G, dv, dtype=dt)
    probs = q.new_empty(N, h, w, cell * cell, G * 9, dtype=dt)
    sizes, layout = _geometry(N, h, w, cell, G, d, dv, cells)
    _run('superpixel_fwd', dt, [_ptr(qg), _ptr(kc), _ptr(vc), _ptr(out), _ptr(probs)], sizes, scale, layout)
    return heads_last(out, B, Mp).to(q.dtype), probs


def superpixel_attention_bwd(grad_out, out, q, k, v, probs, cell: int, scale: float, shared_kv: bool = False,
                             cells: bool = False):
    """As :func:`torch_backend.superpixel_attention_bwd`."""
    if not _supported(q):
        return torch_backend.superpixel_attention_bwd(grad_out, out, q, k, v, probs, cell, scale, shared_kv, cells)
    B, M, h, w, d = q.shape
    Mp = k.shape[1]
    dt = accumulate_dtype(q.dtype)
    kc = _pixels(k, dt)
    vc = kc if shared_kv else _pixels(v, dt)
    qg = _grouped(q.to(dt), Mp)
    # heads-last (B, h, w, M, dv) -> (N, h, w, G, dv)
    go, o = (heads_grouped(t.to(dt), Mp).contiguous() for t in (grad_out, out))
    N, G, dv = kc.shape[0], M // Mp, vc.shape[-1]
    probs = probs.contiguous()
    dq = q.new_empty(N, h, w, G, d, dtype=dt)
    dkc = torch.empty_like(kc)
    dvc = dkc if shared_kv else torch.empty_like(vc)  # one buffer: both uses add up
    sizes, layout = _geometry(N, h, w, cell, G, d, dv, cells)
    _run('superpixel_bwd', dt, [_ptr(go), _ptr(o), _ptr(qg), _ptr(kc), _ptr(vc), _ptr(probs), _ptr(dq), _ptr(dkc),
                                _ptr(dvc)], sizes, scale, layout)
    dk = dkc.view(k.shape).to(k.dtype)
    dv_ = None if shared_kv else dvc.view(v.shape).to(v.dtype)
    return _ungroup(dq, B, Mp).to(q.dtype), dk, dv_


def pixel_attention_fwd(q, k, v, bias: Optional[torch.Tensor], cell: int, scale: float, cells: bool = False):
    """As :func:`torch_backend.pixel_attention_fwd`."""
    if not _supported(q):
        return torch_backend.pixel_attention_fwd(q, k, v, bias, cell, scale, cells)
    B, Mp = q.shape[:2]
    M, h, w, d = k.shape[1:]
    dt = accumulate_dtype(q.dtype)
    qc = _pixels(q, dt)  # (N, ..., d)
    kg, vg = _grouped(k.to(dt), Mp), _grouped(v.to(dt), Mp)  # (N, h, w, G, c)
    bg = None if bias is None else _grouped(bias.to(dt), Mp)  # (N, h, w, G)
    N, G, dv = qc.shape[0], M // Mp, vg.shape[-1]
    out = q.new_empty(*qc.shape[:-1], G, dv, dtype=dt)  # heads-last per pixel tensor
    probs = q.new_empty(N, h, w, cell * cell, G * 9, dtype=dt)
    sizes, layout = _geometry(N, h, w, cell, G, d, dv, cells)
    _run('pixel_fwd', dt, [_ptr(qc), _ptr(kg), _ptr(vg), _ptr(bg), _ptr(out), _ptr(probs)], sizes, scale, layout)
    return heads_last(out, B, Mp).to(q.dtype), probs


def pixel_attention_bwd(grad_out, q, k, v, bias, probs, cell: int, scale: float, cells: bool = False):
    """As :func:`torch_backend.pixel_attention_bwd`."""
    if not _supported(q):
        return torch_backend.pixel_attention_bwd(grad_out, q, k, v, bias, probs, cell, scale, cells)
    B, Mp = q.shape[:2]
    M, h, w, d = k.shape[1:]
    dt = accumulate_dtype(q.dtype)
    qc = _pixels(q, dt)
    kg, vg = _grouped(k.to(dt), Mp), _grouped(v.to(dt), Mp)
    go = heads_grouped(grad_out.to(dt), Mp).contiguous()  # (N, ..., G, dv)
    N, G, dv = qc.shape[0], M // Mp, vg.shape[-1]
    probs = probs.contiguous()
    dqc = torch.empty_like(qc)
    dk = q.new_empty(N, h, w, G, d, dtype=dt)
    dv_ = q.new_empty(N, h, w, G, dv, dtype=dt)
    dbias = None if bias is None else q.new_empty(N, h, w, G, dtype=dt)
    sizes, layout = _geometry(N, h, w, cell, G, d, dv, cells)
    _run('pixel_bwd', dt, [_ptr(go), _ptr(qc), _ptr(kg), _ptr(vg), _ptr(probs), _ptr(dqc), _ptr(dk), _ptr(dv_),
                           _ptr(dbias)], sizes, scale, layout)
    return (dqc.view(q.shape).to(q.dtype), _ungroup(dk, B, Mp).to(k.dtype), _ungroup(dv_, B, Mp).to(v.dtype),
            None if dbias is None else _ungroup(dbias, B, Mp).to(bias.dtype))



@torch.library.custom_op('spformer::conv_rescale', mutates_args=(), device_types='cpu')
def _conv_rescale_op(x: torch.Tensor, taps: torch.Tensor, bias: Optional[torch.Tensor], factor: torch.Tensor,
                     eps: float) -> torch.Tensor:
    B, H, W, C = x.shape
    dt = x.dtype
    out = torch.empty_like(x, memory_format=torch.contiguous_format)
    if out.numel() == 0:
        return out
    # every tensor the kernel reads bound to a name: a temporary would be freed before the call
    x, taps, factor_t = x.contiguous(), taps.to(dt).contiguous(), torch.triu(factor.to(dt)).t().contiguous()
    bias = None if bias is None else bias.to(dt).contiguous()
    fn, c_real = _kernel('conv_rescale_fwd', dt)
    fn(_ptr(x), _ptr(taps), _ptr(bias), _ptr(factor_t), c_real(eps), _ptr(out), *_c(B, H, W, C))
    return out


@_conv_rescale_op.register_fake
def _(x, taps, bias, factor, eps):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@register_flop_formula(torch.ops.spformer.conv_rescale)
def _conv_rescale_flops(x, *args, out_shape=None, **kwargs) -> int:
    """What the unfused computation counts: the depthwise 3x3 convolution and x^T G x as |R x|^2."""
    pixels, C = math.prod(x[:-1]), x[-1]
    return 2 * pixels * (9 * C + C * C)


def conv_rescale(x: torch.Tensor, taps: torch.Tensor, bias: Optional[torch.Tensor], factor: torch.Tensor,
                 eps: float) -> Optional[torch.Tensor]:
    """Inference pixel features of an SCA iteration in one pass (cpu_kernels.c, ``conv_rescale_fwd``,
    as the custom op ``torch.ops.spformer.conv_rescale``, which FLOP counting and fake tensors see):
    z = 'same' depthwise 3x3 convolution of channels-last x (B, H, W, C) with ``taps`` (9, C) (the
    identity in the centre tap) plus ``bias``, then ``z (|U z|^2 + eps)^-1/2`` with U = ``factor``
    (C, C, upper triangular). Forward only. None where the kernels do not run (no C compiler, dtypes
    other than float32/float64)."""
    if x.dtype not in _DTYPES or not _supported(x):
        return None
    return torch.ops.spformer.conv_rescale(x, taps, bias, factor, eps)


@torch.library.custom_op('spformer::cell_pooled_projection', mutates_args=(), device_types='cpu')
def _cell_pooled_projection_op(x: torch.Tensor, weight: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor,
                               eps: float, cell: int) -> torch.Tensor:
    B, H, W, Cp = x.shape
    C, dt = weight.shape[0], x.dtype
    out = x.new_empty(B, H // cell, W // cell, C)
    if out.numel() == 0:
        return out
    x, wt, gamma, beta = (t.to(dt).contiguous() for t in (x, weight.t(), gamma, beta))  # named: see above
    fn, c_real = _kernel('cell_pooled_projection_fwd', dt)
    fn(_ptr(x), _ptr(wt), _ptr(gamma), _ptr(beta), c_real(eps), _ptr(out), *_c(B, H, W, Cp, C, cell))
    return out


@_cell_pooled_projection_op.register_fake
def _(x, weight, gamma, beta, eps, cell):
    B, H, W, _ = x.shape
    return x.new_empty(B, H // cell, W // cell, weight.shape[0])


@register_flop_formula(torch.ops.spformer.cell_pooled_projection)
def _cell_pooled_projection_flops(x, weight, *args, out_shape=None, **kwargs) -> int:
    """What the unfused computation counts: the projection (LayerNorm, GELU and mean are not counted)."""
    return 2 * math.prod(x[:-1]) * x[-1] * weight[0]


def cell_pooled_projection(x: torch.Tensor, weight: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor,
                           eps: float, cell: int, round_to: Optional[torch.dtype] = None) -> Optional[torch.Tensor]:
    """The superpixel initialization for inference in one pass (cpu_kernels.c,
    ``cell_pooled_projection_fwd``, as the custom op ``torch.ops.spformer.cell_pooled_projection``):
    ``avg_pool(GELU(LayerNorm(x W^T)), cell)`` for channels-last x (B, H, W, Cp), without the wide
    map at every pixel, as :func:`pixel_maps_triton.cell_pooled_projection` does on a GPU. Forward
    only; None where the kernels do not run (no C compiler, dtypes other than float32/float64,
    ``round_to``: autocast)."""
    if round_to is not None or x.dtype not in _DTYPES or not _supported(x):
        return None
    return torch.ops.spformer.cell_pooled_projection(x, weight, gamma, beta, eps, cell)
