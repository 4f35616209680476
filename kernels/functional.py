"""Public entry points: argument checks in one place, then dispatch to a backend.

The fast backends run behind ``torch.library`` custom ops (``torch.ops.spformer.*``) with
fake implementations and registered autograd, so ``torch.compile`` traces whole models
through them without graph breaks. The reference backend is plain autograd.
"""
import importlib
import math
import os
from typing import List, Optional, Tuple, Union

import torch
from torch import Tensor
from torch.utils.flop_counter import register_flop_formula

from . import cpu_backend, decomposed, reference, torch_backend

NEIGHBOR_OFFSETS = tuple((k // 3 - 1, k % 3 - 1) for k in range(9))
BACKENDS = ('auto', 'torch', 'cpu', 'triton', 'reference')


def check_backend(name: str, backend, choices: Tuple[str, ...] = BACKENDS):
    """``backend`` must be one of the op family's ``choices`` (this module's ``BACKENDS``, or the
    neighbourhood ops' own list): the ops check their ``backend`` argument at every call, the modules
    their ``attn_backend`` at construction (``name`` is what the message calls it)."""
    if not isinstance(backend, str) or backend not in choices:
        raise ValueError(f'{name} must be one of {choices}, got {backend!r}')


def backend_module(backend: str, device: torch.device, triton_module: str, torch_module):
    """The module implementing ``backend`` for tensors on ``device``: 'torch' and 'triton' as named;
    'auto': the fused Triton kernels (``triton_module``, a sibling module imported on first use, so
    that triton is only imported when needed) for CUDA tensors, else ``torch_module``."""
    if backend == 'triton' or (backend == 'auto' and device.type == 'cuda'):
        try:
            module = importlib.import_module(f'.{triton_module}', __package__)
        except ImportError:
            if backend == 'triton':
                raise
            return torch_module
        if device.type != 'cuda' and os.environ.get('TRITON_INTERPRET') != '1':
            raise ValueError(f"backend='triton' runs on CUDA tensors (or on CPU under TRITON_INTERPRET=1), "
                             f"got tensors on {device}")
        return module
    return torch_module


def capturing_graph() -> bool:
    """Whether the ops are being recorded into a graph rather than run: ``torch.compile``, ``torch.export``
    (and the dynamo ONNX exporter built on it), ``torch.jit.trace`` (and the TorchScript-based ONNX
    exporter). The models then take one path whatever the grad mode: no forward-only fused kernels, no
    Python ``autograd.Function`` (a traced program cannot hold one), the layout the graph reads
    (``torch.jit.trace`` checks its trace by tracing again under ``torch.no_grad()``)."""
    return torch.compiler.is_compiling() or torch.jit.is_tracing() or exporting_onnx()


def exporting_onnx() -> bool:
    """Whether ``torch.onnx.export`` is tracing: the ops then run their plain-torch form
    (kernels/decomposed.py), which ONNX can hold, instead of the custom ops."""
    return torch.onnx.is_in_onnx_export()


def records_autograd(x: torch.Tensor, *params: Optional[torch.Tensor]) -> bool:
    """Whether an op on ``x`` and ``params`` records an autograd graph (then the forward-only kernels must not run)."""
    return torch.is_grad_enabled() and (x.requires_grad or any(p is not None and p.requires_grad for p in params))


def fused_inference_kernel(backend: str, name: str, x: torch.Tensor, *params: Optional[torch.Tensor]):
    """The forward-only fused kernel ``name`` where one applies, else None: for the Triton backend
    (CUDA under 'auto'; CPU only when asked for, under the interpreter) from
    kernels/pixel_maps_triton.py, for the C kernels (CPU under 'auto' or 'cpu', outside autocast)
    from kernels/cpu_backend.py (the SPFormer layers' fused inference paths ask for them by name); never under torch.compile or with an autograd graph recorded
    through ``x`` or ``params``. The kernels return None for inputs they do not take (dtypes)."""
    if capturing_graph() or records_autograd(x, *params) or x.device.type == 'meta':
        return None
    if x.device.type == 'cpu' and backend != 'triton':
        if backend not in ('auto', 'cpu') or torch.is_autocast_enabled('cpu'):
            return None
        return getattr(cpu_backend, name, None)
    return getattr(backend_module(backend, x.device, 'pixel_maps_triton', None), name, None)


def _impl(backend: str, device: torch.device):
    if backend == 'cpu' or (backend == 'auto' and device.type == 'cpu'):
        if backend == 'cpu' and (device.type != 'cpu' or not cpu_backend.available()):
            raise ValueError(f"backend='cpu' runs the fused C kernels on CPU tensors, got tensors on {device}"
                             if device.type != 'cpu' else
                             f"backend='cpu': the fused C kernels are unavailable ({cpu_backend.unavailable_reason()})")
        return cpu_backend  # which runs the torch backend where no C compiler was found
    return backend_module(backend, device, 'triton_backend', torch_backend)


def native_pixel_layout(backend: str, device: torch.device) -> str:
    """The pixel layout, ``'image'`` or ``'cells'``, in which ``backend`` reads pixel tensors on
    ``device`` without a layout copy: the fused C and Triton kernels index image-layout pixels
    directly; the torch backend (also the C backend's fallback without a compiler) and the
    reference work cell-major."""
    if backend == 'reference':
        return 'cells'
    if device.type == 'meta':  # shape-only: the ops run their fake implementations, any layout works
        return 'cells' if backend == 'torch' else 'image'
    impl = _impl(backend, device)
    if impl is torch_backend or (impl is cpu_backend and not cpu_backend.available()):
        return 'cells'
    return 'image'


def _exact(device: torch.device):
    """The backends choose their own compute dtypes (fp32 accumulation, fp32 probabilities for
    half-precision inputs); autocast, still active inside a custom op, would turn their matmuls to
    bf16/fp16."""
    return torch.autocast(device.type, enabled=False)


@torch.library.custom_op('spformer::pixel_attention', mutates_args=())
def _pixel_attention_op(
        q: Tensor, k: Tensor, v: Tensor, bias: Optional[Tensor], cell: int, scale: float, backend: str, cells: bool,
) -> Tuple[Tensor, Tensor]:
    with _exact(q.device):
        out, probs = _impl(backend, q.device).pixel_attention_fwd(q, k, v, bias, cell, scale, cells)
    return out.contiguous(), probs.contiguous()  # the layouts the fake implementation promises


@_pixel_attention_op.register_fake
def _(q, k, v, bias, cell, scale, backend, cells):
    B, Mp = q.shape[:2]
    M, h, w, dv = v.shape[1], v.shape[2], v.shape[3], v.shape[4]
    out = q.new_empty(B, h, w, cell * cell, M, dv) if cells else q.new_empty(B, h * cell, w * cell, M, dv)
    probs = q.new_empty(B * Mp, h, w, cell * cell, 9 * (M // Mp), dtype=torch_backend.accumulate_dtype(q.dtype))
    return out, probs


@torch.library.custom_op('spformer::pixel_attention_backward', mutates_args=())
def _pixel_attention_backward_op(
        grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, bias: Optional[Tensor], probs: Tensor,
        cell: int, scale: float, backend: str, cells: bool,
) -> List[Tensor]:
    with _exact(q.device):
        dq, dk, dv, dbias = _impl(backend, q.device).pixel_attention_bwd(
            grad_out.contiguous(), q, k, v, bias, probs, cell, scale, cells)
    return [g.contiguous() for g in [dq, dk, dv] + ([] if dbias is None else [dbias])]


@_pixel_attention_backward_op.register_fake
def _(grad_out, q, k, v, bias, probs, cell, scale, backend, cells):
    grads = [torch.empty_like(q, memory_format=torch.contiguous_format), torch.empty_like(k, memory_format=torch.contiguous_format),
             torch.empty_like(v, memory_format=torch.contiguous_format)]
    return grads + ([] if bias is None else [torch.empty_like(bias, memory_format=torch.contiguous_format)])


def _pixel_setup_context(ctx, inputs, output):
    q, k, v, bias, cell, scale, backend, cells = inputs
    ctx.save_for_backward(q, k, v, bias, output[1])
    ctx.cell, ctx.scale, ctx.backend, ctx.has_bias, ctx.cells = cell, scale, backend, bias is not None, cells


def _pixel_backward(ctx, grad_out, grad_probs):
    q, k, v, bias, probs = ctx.saved_tensors
    grads = torch.ops.spformer.pixel_attention_backward(
        grad_out, q, k, v, bias, probs, ctx.cell, ctx.scale, ctx.backend, ctx.cells)
    return grads[0], grads[1], grads[2], grads[3] if ctx.has_bias else None, None, None, None, None


_pixel_attention_op.register_autograd(_pixel_backward, setup_context=_pixel_setup_context)


@torch.library.custom_op('spformer::superpixel_attention', mutates_args=())
def _superpixel_attention_op(
        q: Tensor, k: Tensor, v: Tensor, cell: int, scale: float, shared_kv: bool, backend: str, cells: bool,
) -> Tuple[Tensor, Tensor]:
    with _exact(q.device):
        out, probs = _impl(backend, q.device).superpixel_attention_fwd(q, k, v, cell, scale, shared_kv, cells)
    return out.contiguous(), probs.contiguous()


@_superpixel_attention_op.register_fake
def _(q, k, v, cell, scale, shared_kv, backend, cells):
    B, M, h, w, _ = q.shape
    Mp, dv = k.shape[1], v.shape[-1]
    out = q.new_empty(B, h, w, M, dv)
    probs = q.new_empty(B * Mp, h, w, cell * cell, 9 * (M // Mp), dtype=torch_backend.accumulate_dtype(q.dtype))
    return out, probs


@torch.library.custom_op('spformer::superpixel_attention_backward', mutates_args=())
def _superpixel_attention_backward_op(
        grad_out: Tensor, out: Tensor, q: Tensor, k: Tensor, v: Tensor, probs: Tensor,
        cell: int, scale: float, shared_kv: bool, backend: str, cells: bool,
) -> List[Tensor]:
    with _exact(q.device):
        dq, dk, dv = _impl(backend, q.device).superpixel_attention_bwd(
            grad_out.contiguous(), out, q, k, v, probs, cell, scale, shared_kv, cells)
    return [g.contiguous() for g in [dq, dk] + ([] if dv is None else [dv])]


@_superpixel_attention_backward_op.register_fake
def _(grad_out, out, q, k, v, probs, cell, scale, shared_kv, backend, cells):
    grads = [torch.empty_like(q, memory_format=torch.contiguous_format), torch.empty_like(k, memory_format=torch.contiguous_format)]
    return grads + ([] if shared_kv else [torch.empty_like(v, memory_format=torch.contiguous_format)])


def _superpixel_setup_context(ctx, inputs, output):
    q, k, v, cell, scale, shared_kv, backend, cells = inputs
    ctx.save_for_backward(q, k, v, output[0], output[1])
    ctx.cell, ctx.scale, ctx.shared_kv, ctx.backend, ctx.cells = cell, scale, shared_kv, backend, cells


def _superpixel_backward(ctx, grad_out, grad_probs):
    q, k, v, out, probs = ctx.saved_tensors
    grads = torch.ops.spformer.superpixel_attention_backward(
        grad_out, out, q, k, v, probs, ctx.cell, ctx.scale, ctx.shared_kv, ctx.backend, ctx.cells)
    # With shared k/v the gradient of both uses comes back once, for k.
    return grads[0], grads[1], None if ctx.shared_kv else grads[2], None, None, None, None, None


_superpixel_attention_op.register_autograd(_superpixel_backward, setup_context=_superpixel_setup_context)


# FLOP formulas for torch.utils.flop_counter (custom ops are invisible to it otherwise): every
# pixel meets 9 superpixels per head, once for the logit (d MACs) and once for the value (dv).
def _pairs(pixel_shape, sp_shape) -> int:
    num_pixels = math.prod(pixel_shape[2:-1])  # H * W, or h * w * cell**2 for cell-major pixels
    return pixel_shape[0] * sp_shape[1] * num_pixels * 9


@register_flop_formula(torch.ops.spformer.pixel_attention)
def _pixel_attention_flops(q, k, v, *args, out_shape=None, **kwargs) -> int:
    return 2 * _pairs(q, k) * (q[-1] + v[-1])


@register_flop_formula(torch.ops.spformer.pixel_attention_backward)
def _pixel_attention_backward_flops(grad_out, q, k, v, *args, out_shape=None, **kwargs) -> int:
    return 4 * _pairs(q, k) * (q[-1] + v[-1])


@register_flop_formula(torch.ops.spformer.superpixel_attention)
def _superpixel_attention_flops(q, k, v, *args, out_shape=None, **kwargs) -> int:
    return 2 * _pairs(k, q) * (q[-1] + v[-1])


@register_flop_formula(torch.ops.spformer.superpixel_attention_backward)
def _superpixel_attention_backward_flops(grad_out, out, q, k, v, *args, out_shape=None, **kwargs) -> int:
    return 4 * _pairs(k, q) * (q[-1] + v[-1])


def _shape(t: torch.Tensor) -> str:
    return '(' + ', '.join(str(s) for s in t.shape) + ')'


PIXEL_LAYOUTS = ('image', 'cells')


def image_to_cells(x: torch.Tensor, cell: int) -> torch.Tensor:
    """Pixel tensor (B, M, H, W, c) -> cell-major (B, M, h, w, cell * cell, c), pixel ``p`` of a cell at
    row ``p // cell`` and column ``p % cell`` inside it (one copy; differentiable)."""
    B, M, H, W, c = x.shape
    return x.reshape(B, M, H // cell, cell, W // cell, cell, c).transpose(3, 4).reshape(
        B, M, H // cell, W // cell, cell * cell, c)


def cells_to_image(x: torch.Tensor, cell: int) -> torch.Tensor:
    """Inverse of :func:`image_to_cells`: (B, M, h, w, cell * cell, ...) -> (B, M, h * cell, w * cell, ...)."""
    B, M, h, w, n = x.shape[:5]
    rest = x.shape[5:]
    return x.reshape(B, M, h, w, cell, cell, *rest).transpose(3, 4).reshape(B, M, h * cell, w * cell, *rest)


def _check_layout(fn: str, pixel_layout) -> bool:
    if pixel_layout not in PIXEL_LAYOUTS:
        raise ValueError(f"{fn}: pixel_layout must be one of {PIXEL_LAYOUTS}, got {pixel_layout!r}")
    return pixel_layout == 'cells'


def _check_common(fn: str, cell, backend: str, tensors, cells: bool = False):
    """``tensors``: (name, tensor, is_pixel_tensor); cell-major pixel tensors are 6-D."""
    if isinstance(cell, bool) or not isinstance(cell, int) or cell < 1:
        raise ValueError(f'{fn}: cell must be a positive int (pixels per superpixel cell side), got {cell!r}')
    check_backend(f'{fn}: backend', backend)
    first_name, first, _ = tensors[0]
    for name, t, is_pixel in tensors:
        if not isinstance(t, torch.Tensor):
            raise TypeError(f'{fn}: {name} must be a torch.Tensor, got {type(t).__name__}')
        if is_pixel and cells:
            if t.dim() != 6 or t.shape[4] != cell * cell:
                raise ValueError(f"{fn}: with pixel_layout='cells', {name} must be 6-D (B, heads, h, w, "
                                 f"cell*cell={cell * cell}, channels), got shape {_shape(t)}")
        elif t.dim() != 5:
            raise ValueError(f'{fn}: {name} must be 5-D (B, heads, height, width, channels), got shape {_shape(t)}')
        if not t.is_floating_point():
            raise TypeError(f'{fn}: {name} must be a floating point tensor, got {t.dtype}')
        if t.dtype != first.dtype:
            raise TypeError(f'{fn}: {name} has dtype {t.dtype} but {first_name} has {first.dtype}; they must match')
        if t.device != first.device:
            raise ValueError(f'{fn}: {name} is on {t.device} but {first_name} is on {first.device}; they must match')
        if t.shape[0] != first.shape[0]:
            raise ValueError(f'{fn}: {name} has batch size {t.shape[0]} but {first_name} has {first.shape[0]}')
        _check_head_dim(fn, name, t)


def _check_head_dim(fn: str, name: str, t: torch.Tensor):
    """Channels per head (the last dim) >= 1: a head dim of 0 (e.g. more heads than channels to split)
    has no logits to scale. Empty batches and grids are fine; an empty head is a configuration error."""
    if t.shape[-1] < 1:
        raise ValueError(f'{fn}: {name} must have a head dim (last dim, channels per head) >= 1, got shape '
                         f'{_shape(t)} (head dim 0: fewer channels than heads to split them over?)')


def _check_heads(fn: str, pixel_names, pixel_tensors, sp_name: str, sp: torch.Tensor):
    """Pixel tensors carry all M heads of the superpixel tensors, or one head shared by all."""
    M = sp.shape[1]
    mp = pixel_tensors[0].shape[1]
    for name, t in zip(pixel_names, pixel_tensors):
        if t.shape[1] != mp or mp not in (1, M):
            raise ValueError(
                f'{fn}: {name} has {t.shape[1]} heads but {sp_name} has {M}; pixel tensors must have '
                f'{M} heads or 1 head shared by all {M} (and the same number as each other)')


def _check_grids(fn: str, pix_name: str, pix: torch.Tensor, sp_name: str, sp: torch.Tensor, cell: int,
                 cells: bool = False):
    h, w = sp.shape[2:4]
    if h < 1 or w < 1:
        raise ValueError(f'{fn}: {sp_name} must have a superpixel grid of at least 1x1, got shape {_shape(sp)}')
    if cells:
        if tuple(pix.shape[2:4]) != (h, w):
            raise ValueError(f'{fn}: {pix_name} (cell-major) has a grid of {pix.shape[2]}x{pix.shape[3]} cells but '
                             f'{sp_name} has a superpixel grid of {h}x{w}; they must match')
        return
    H, W = pix.shape[2:4]
    if (H, W) != (h * cell, w * cell):
        raise ValueError(
            f'{fn}: {pix_name} has a pixel grid of {H}x{W} but {sp_name} has a superpixel grid of {h}x{w} '
            f'with cell={cell}; expected a pixel grid of {h * cell}x{w * cell}')


def _check_same(fn: str, a_name: str, a: torch.Tensor, b_name: str, b: torch.Tensor, dims: slice, what: str):
    if a.shape[dims] != b.shape[dims]:
        raise ValueError(f'{fn}: {a_name} {_shape(a)} and {b_name} {_shape(b)} must have the same {what}')


def _check_channels(fn: str, a_name: str, a: torch.Tensor, b_name: str, b: torch.Tensor):
    if a.shape[-1] != b.shape[-1]:
        raise ValueError(f'{fn}: {a_name} {_shape(a)} and {b_name} {_shape(b)} must have the same channels (last dim)')


def _check_bias(fn: str, bias: Optional[torch.Tensor], k_s: torch.Tensor):
    if bias is None:
        return
    expected = tuple(k_s.shape[:4])
    if not isinstance(bias, torch.Tensor) or tuple(bias.shape) != expected:
        got = _shape(bias) if isinstance(bias, torch.Tensor) else type(bias).__name__
        raise ValueError(f'{fn}: bias must have shape (B, M, h, w) = {expected} (one logit offset per superpixel '
                         f'and head), got {got}')
    if bias.dtype != k_s.dtype or bias.device != k_s.device:
        raise TypeError(f'{fn}: bias must have the dtype and device of k_s ({k_s.dtype}, {k_s.device}), '
                        f'got {bias.dtype}, {bias.device}')


def _scale(fn: str, scale: Optional[float], d: int) -> float:
    if scale is None:
        return 1.0 / math.sqrt(d)
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not scale > 0 or not math.isfinite(scale):
        raise ValueError(f'{fn}: scale must be a positive finite float or None (= head_dim**-0.5), got {scale!r}')
    return float(scale)


_LAYOUT_DOC = """pixel_layout: ``'image'`` (pixel tensors (B, M, H, W, c)) or ``'cells'``: pixel tensors
            cell-major, (B, M, h, w, cell * cell, c) as made by :func:`image_to_cells`. Models that keep
            their pixel features cell-major skip two layout copies per call; pixel-side outputs come back
            in the same layout."""


def superpixel_attention(
        q_s: torch.Tensor,
        k_p: torch.Tensor,
        v_p: torch.Tensor,
        cell: int,
        scale: Optional[float] = None,
        backend: str = 'auto',
        pixel_layout: str = 'image',
) -> torch.Tensor:
    """Superpixel queries attend over the pixels of the 3x3 cells around them.

    Args:
        q_s: superpixel queries (B, M, h, w, d).
        k_p: pixel keys (B, M, h*cell, w*cell, d), or (B, 1, ...) shared by all M heads.
        v_p: pixel values (B, M or 1, h*cell, w*cell, dv); may be the same tensor as ``k_p``.
        cell: side of a superpixel's own cell in pixels.
        scale: logit scale, default d**-0.5.
        backend: 'auto' (Triton on CUDA, the fused C kernels on CPU), 'torch', 'cpu', 'triton' or 'reference'.
        {layout}

    Returns:
        (B, M, h, w, dv): for superpixel j, sum over pixels p of the 3x3 cells around j of
        softmax_p(scale * <k_p, q_j>) * v_p. Cells outside the image take no part. The result
        is a view of a heads-last (B, h, w, M, dv) tensor.
    """
    fn = 'superpixel_attention'
    cells = _check_layout(fn, pixel_layout)
    _check_common(fn, cell, backend, [('q_s', q_s, False), ('k_p', k_p, True), ('v_p', v_p, True)], cells)
    _check_heads(fn, ('k_p', 'v_p'), (k_p, v_p), 'q_s', q_s)
    _check_grids(fn, 'k_p', k_p, 'q_s', q_s, cell, cells)
    _check_same(fn, 'k_p', k_p, 'v_p', v_p, slice(2, -1), 'pixel grid')
    _check_channels(fn, 'q_s', q_s, 'k_p', k_p)
    scale = _scale(fn, scale, q_s.shape[-1])
    if backend == 'reference':
        if cells:
            k_p, v_p = cells_to_image(k_p, cell), cells_to_image(v_p, cell)
        return reference.superpixel_attention(q_s, k_p, v_p, cell, scale)
    if exporting_onnx():
        return decomposed.superpixel_attention(q_s, k_p, v_p, cell, scale, cells)
    out, _ = _superpixel_attention_op(q_s, k_p, v_p, cell, scale, v_p is k_p, backend, cells)
    return out.permute(0, 3, 1, 2, 4)


def pixel_attention(
        q_p: torch.Tensor,
        k_s: torch.Tensor,
        v_s: torch.Tensor,
        cell: int,
        scale: Optional[float] = None,
        bias: Optional[torch.Tensor] = None,
        return_weights: bool = False,
        backend: str = 'auto',
        pixel_layout: str = 'image',
) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
    """Pixel queries attend over the (at most) 9 superpixels around their cell.

    Args:
        q_p: pixel queries (B, M, h*cell, w*cell, d), or (B, 1, ...) shared by all M heads.
        k_s: superpixel keys (B, M, h, w, d).
        v_s: superpixel values (B, M, h, w, dv).
        cell: side of a superpixel's own cell in pixels.
        scale: logit scale, default d**-0.5.
        bias: optional (B, M, h, w) offset added to every (scaled) logit of a superpixel.
        return_weights: also return the (B, M, H, W, 9) probabilities (detached), neighbour k being
            the cell at offset ``NEIGHBOR_OFFSETS[k]`` from the pixel's own cell (0 outside the image).
            For differentiable probabilities use :func:`superpixel_association`.
        backend: 'auto' (Triton on CUDA, the fused C kernels on CPU), 'torch', 'cpu', 'triton' or 'reference'.
        {layout}

    Returns:
        (B, M, H, W, dv) (a view of a heads-last (B, H, W, M, dv) tensor), and the weights if
        ``return_weights``; with ``pixel_layout='cells'`` (B, M, h, w, cell*cell, dv) (a view of a
        heads-last (B, h, w, cell*cell, M, dv) tensor) and (B, M, h, w, cell*cell, 9).
    """
    fn = 'pixel_attention'
    cells = _check_layout(fn, pixel_layout)
    _check_common(fn, cell, backend, [('q_p', q_p, True), ('k_s', k_s, False), ('v_s', v_s, False)], cells)
    _check_heads(fn, ('q_p',), (q_p,), 'k_s', k_s)
    _check_same(fn, 'k_s', k_s, 'v_s', v_s, slice(1, 4), 'heads and superpixel grid')
    _check_grids(fn, 'q_p', q_p, 'k_s', k_s, cell, cells)
    _check_channels(fn, 'q_p', q_p, 'k_s', k_s)
    _check_bias(fn, bias, k_s)
    scale = _scale(fn, scale, q_p.shape[-1])
    if backend == 'reference':
        out, weights = reference.pixel_attention(cells_to_image(q_p, cell) if cells else q_p, k_s, v_s, cell, scale,
                                                 bias)
        if cells:
            out, weights = image_to_cells(out, cell), image_to_cells(weights, cell)
    elif exporting_onnx():
        out, weights = decomposed.pixel_attention(q_p, k_s, v_s, bias, cell, scale, cells)
    else:
        out, probs = _pixel_attention_op(q_p, k_s, v_s, bias, cell, scale, backend, cells)
        out = out.movedim(-2, 1)
        if not return_weights:
            return out
        B, Mp = q_p.shape[:2]
        weights = torch_backend.probs_to_weights(probs, B, Mp, k_s.shape[1] // Mp, cell, cells).to(q_p.dtype)
    return (out, weights.detach()) if return_weights else out


def superpixel_association(
        q_p: torch.Tensor,
        k_s: torch.Tensor,
        cell: int,
        scale: Optional[float] = None,
        bias: Optional[torch.Tensor] = None,
        backend: str = 'auto',
        pixel_layout: str = 'image',
        logits: bool = False,
) -> torch.Tensor:
    """Soft pixel -> superpixel assignment: softmax over the 9 neighbours of scale * <q_p, k_s> + bias.

    Returns (B, M, H, W, 9) probabilities in ``NEIGHBOR_OFFSETS`` order ((B, M, h, w, cell*cell, 9)
    with ``pixel_layout='cells'``), exactly 0 for neighbours outside the image; differentiable. With
    ``logits=True``, the logits before the softmax instead (-inf for neighbours outside the image),
    e.g. for :func:`upsample_association`.
    """
    fn = 'superpixel_association'
    cells = _check_layout(fn, pixel_layout)
    _check_common(fn, cell, backend, [('q_p', q_p, True), ('k_s', k_s, False)], cells)
    _check_heads(fn, ('q_p',), (q_p,), 'k_s', k_s)
    _check_grids(fn, 'q_p', q_p, 'k_s', k_s, cell, cells)
    _check_channels(fn, 'q_p', q_p, 'k_s', k_s)
    _check_bias(fn, bias, k_s)
    scale = _scale(fn, scale, q_p.shape[-1])
    if not isinstance(logits, bool):
        raise TypeError(f'{fn}: logits must be True or False, got {logits!r}')
    if backend == 'reference':
        weights = reference.superpixel_association(
            cells_to_image(q_p, cell) if cells else q_p, k_s, cell, scale, bias, logits=logits)
        return image_to_cells(weights, cell) if cells else weights
    if exporting_onnx():
        return decomposed.superpixel_association(q_p, k_s, bias, cell, scale, cells, logits=logits)
    return torch_backend.superpixel_association(q_p, k_s, bias, cell, scale, cells, logits=logits)


def upsample_association(logits: torch.Tensor, cell: int, scale: int) -> torch.Tensor:
    """9-way association logits resampled ``scale`` times finer, in superpixel perspective.

    A 9-channel neighbour map cannot be resized as an image: channel k names a different superpixel in
    every cell. Here each superpixel's logit map is resampled on its own (bilinear, half-pixel centres,
    as ``F.interpolate(..., align_corners=False)``), and every output pixel reads the 9 superpixels
    around its own cell at the output resolution (cells of ``cell * scale`` pixels). A bilinear tap that
    falls outside a superpixel's 3x3-cell window (where that superpixel is not a candidate), or outside
    the image, takes the nearest pixel of the window inside the image (the edge clamp interpolation uses
    at an image border). This is how the SPFormer authors draw superpixels at input resolution: the
    argmax of the resampled logits (:func:`spformer.kernels.superpixel_labels`) has smooth boundaries
    where repeating a coarse argmax would step by ``scale`` pixels.

    Args:
        logits: (..., H, W, 9) logits in ``NEIGHBOR_OFFSETS`` order over an H x W map with square cells
            of ``cell`` pixels (``superpixel_association(..., logits=True)``); -inf for neighbours
            outside the image.
        cell: Cell side on the H x W map.
        scale: Integer upsampling factor (the pixel stream's stride, to reach input resolution).

    Returns:
        (..., H * scale, W * scale, 9) logits, -inf for neighbours outside the image.
    """
    fn = 'upsample_association'
    if not isinstance(logits, torch.Tensor) or logits.dim() < 3 or logits.shape[-1] != 9:
        got = _shape(logits) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise ValueError(f'{fn}: logits must be a (..., H, W, 9) tensor, got {got}')
    for name, value in (('cell', cell), ('scale', scale)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f'{fn}: {name} must be an int >= 1, got {value!r}')
    H, W = logits.shape[-3:-1]
    if H % cell or W % cell:
        raise ValueError(f'{fn}: the {H}x{W} map must be a whole number of {cell}x{cell} cells')
    if scale == 1:
        return logits
    device = logits.device
    h, w = H // cell, W // cell

    def taps(n_in: int, n_cells: int):
        """Per output row (or column), for each neighbour offset d in (-1, 0, 1): the two source taps clamped
        to the image and to the window of the superpixel at offset d, their neighbour index (0..2) as seen
        from the tap's own cell, the weight of the second tap, and whether that superpixel exists."""
        out = torch.arange(n_in * scale, device=device)
        exact = torch.float64 if device.type in ('cpu', 'cuda') else torch.float32  # (no float64 on MPS)
        src = ((out.to(exact) + 0.5) / scale - 0.5).clamp(min=0)  # F.interpolate's source coordinate
        first = src.floor().long()
        frac = (src - first).to(logits.dtype)
        own = out // (cell * scale)
        rows = []
        for d in (-1, 0, 1):
            target = own + d
            lo = ((target - 1) * cell).clamp(0, n_in - 1)
            hi = ((target + 2) * cell - 1).clamp(0, n_in - 1)
            t0 = torch.minimum(torch.maximum(first, lo), hi)
            t1 = torch.minimum(torch.maximum((first + 1).clamp(max=n_in - 1), lo), hi)
            k0 = (target - t0 // cell + 1).clamp(0, 2)
            k1 = (target - t1 // cell + 1).clamp(0, 2)
            rows.append((t0, t1, k0, k1, (target >= 0) & (target < n_cells)))
        return rows, frac

    ys, fy = taps(H, h)
    xs, fx = taps(W, w)
    fy, fx = fy[:, None], fx[None, :]
    out = []
    for k in range(9):
        y0, y1, ky0, ky1, vy = ys[k // 3]
        x0, x1, kx0, kx1, vx = xs[k % 3]
        value = 0
        for ty, ky, wy in ((y0, ky0, 1 - fy), (y1, ky1, fy)):
            for tx, kx, wx in ((x0, kx0, 1 - fx), (x1, kx1, fx)):
                tap = logits[..., ty[:, None], tx[None, :], ky[:, None] * 3 + kx[None, :]]
                value = value + wy * wx * tap.masked_fill(wy * wx == 0, 0)  # a zero weight: no -inf * 0
        valid = vy[:, None] & vx[None, :]
        out.append(value.masked_fill(~valid, float('-inf')))
    return torch.stack(out, dim=-1)


for _f in (superpixel_attention, pixel_attention, superpixel_association):
    _f.__doc__ = _f.__doc__.replace('{layout}', _LAYOUT_DOC)
