"""Fused CPU backend: kernels/cpu_kernels.c, compiled on first use with the machine's C compiler.

The PyTorch backend (torch_backend.py) spends its time between kernels: each logit, softmax and
weighted sum is a separate pass over per-cell tensors, and the per-cell products are thousands of
tiny matrix products. Here each direction is one pass that keeps its rows in the L1 cache
(on CPU, SPFormer-S needs fused kernels on the pixel side to come near DeiT-S's throughput).

The C kernels take N = B * M_p images of G = M / M_p heads each (pixel tensors shared by all heads,
what SPFormer runs, or one per head), float32 and float64 (fp16/bf16 inputs are computed in fp32, as
every backend accumulates). Without a C compiler every call goes to the PyTorch backend (a one-time
warning says why). The compiled library is cached under ``$SPFORMER_CACHE_DIR`` (default
``~/.cache/spformer``), keyed by the source, the compiler, its flags and the CPU; set
``SPFORMER_CPU_KERNELS=0`` to turn the kernels off. They run on torch's OpenMP threads (the
library binds to the libgomp torch has loaded), ``torch.set_num_threads()`` of them.

Besides the attention, two forward-only kernels for SPFormer's per-pixel maps, registered as custom
ops (FLOP counting and fake tensors see them): :func:`conv_rescale` (an SCA iteration's pixel
features) and :func:`cell_pooled_projection` (the superpixel init); the model calls them where no
autograd graph is recorded (spformer/models/spformer.py, ``fused_inference_kernel``).
"""
import ctypes
import hashlib
import math
import os
import platform
import subprocess
import sys
import tempfile
import threading
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

_lock = threading.Lock()
_libraries = {}
_unavailable: Optional[str] = None  # why the kernels cannot be used, once known
_compile_announced = False


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


def _compile(compiler: str, flags, out: Path):
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix='.so', dir=out.parent)
    os.close(fd)
    try:
        subprocess.run([compiler, *flags, str(SOURCE), '-o', tmp, '-lm'], check=True, capture_output=True, text=True)
        os.replace(tmp, out)  # atomic: concurrent processes compiling the same library do not clash
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _announce_compile(folder: Path) -> None:
    """One line on stderr, once per process, before the first compilation: a first call that takes seconds
    should say why. Information, not a warning: nothing is wrong and nothing needs doing."""
    global _compile_announced
    if not _compile_announced:
        _compile_announced = True
        print('spformer: compiling the fused CPU kernels (once per machine and version, a few seconds; '
              f'cached in {folder})', file=sys.stderr, flush=True)


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
        compiler = os.environ.get('CC', 'cc')
        try:
            version = subprocess.run([compiler, '--version'], capture_output=True, text=True, check=True).stdout
            errors = []
            for flags in _FALLBACK_FLAGS:
                flags = flags + defines
                key = hashlib.sha256('\0'.join([SOURCE.read_text(), version, *flags, _cpu_fingerprint()]).encode())
                path = _cache_dir() / f'spformer_cpu_{suffix}_{key.hexdigest()[:16]}.so'
                try:
                    if not path.exists():
                        _announce_compile(path.parent)
                        _compile(compiler, flags, path)
                    lib = ctypes.CDLL(str(path))
                    break
                except (subprocess.CalledProcessError, OSError) as e:
                    errors.append(getattr(e, 'stderr', None) or str(e))
            else:
                raise RuntimeError(errors[-1].strip().splitlines()[-1] if errors[-1].strip() else 'compilation failed')
        except (OSError, RuntimeError, subprocess.CalledProcessError) as e:
            _unavailable = f'{compiler}: {e}'
            warnings.warn(f'spformer: the fused CPU attention kernels are unavailable ({_unavailable}); using the '
                          f'PyTorch backend, which is slower. Set CC to a C compiler to use them.', RuntimeWarning)
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
