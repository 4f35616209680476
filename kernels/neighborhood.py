"""Neighbourhood attention re-weighted by superpixels (docs/design.md §4): NA, SNA and H-SNA.

Public entry points (argument checks in one place, then dispatch to a backend):

* :func:`neighborhood_attention` -- plain neighbourhood attention (NA) over a k x k window;
* :func:`soft_superpixel_attention` -- SNA: the window's weights re-weighted by how likely query
  and key belong to the same superpixel, from soft 9-way superpixel probabilities;
* :func:`hard_superpixel_attention` -- H-SNA: the same with hard superpixel labels.

For query pixel i with logit scale lambda_i and window N(i) (k x k keys):

    w_ij = exp(lambda_i <q_i, k_j>) A_ij / sum_{j' in N(i)} exp(lambda_i <q_i, k_j'>) A_ij',
    out_i = sum_{j in N(i)} w_ij v_j,

with A_ij = sum_s pi_i(s) pi_j(s) (SNA), 1[s_i = s_j] (H-SNA) or 1 (NA). pi_p is pixel p's
probability over the 9 superpixels around its cell, neighbour n being the cell at offset
(n // 3 - 1, n % 3 - 1) (``NEIGHBOR_OFFSETS``, the order of ``superpixel_association``); the sum
runs over the superpixels of the grid (h = ceil(H / cell), w = ceil(W / cell)) in both pixels'
neighbourhoods, probabilities of neighbours outside the grid are ignored. A query whose window
has zero total agreement gets output 0 (and zero gradients); SNA cannot hit that when pi_i has
mass on its in-grid neighbours (A_ii > 0), H-SNA never does (A_ii = 1).

Windows follow NATTEN: centred on the query and shifted inward at the image borders, so every
query sees exactly k x k keys inside the image (no padding): the window of query row y starts at
``clamp(y - k // 2, 0, H - k)``, likewise for columns. Hence H, W >= k.

Backends: ``'reference'`` (dense pixels x pixels; the oracle), ``'torch'`` (one pass per window row,
the CPU default) and ``'triton'`` (fused kernels, the CUDA default). The fast backends run
behind the ``torch.library`` custom op ``torch.ops.spformer.neighborhood_attention`` (fake
implementation, registered autograd, FLOP formula), so ``torch.compile`` traces through them.
"""
import math
from typing import List, Optional, Tuple, Union

import torch
from torch import Tensor
from torch.utils.flop_counter import register_flop_formula

from . import neighborhood_reference as reference
from .functional import _check_head_dim, backend_module, check_backend
from . import neighborhood_torch as torch_backend
from .neighborhood_reference import neighbor_superpixels, window_start

BACKENDS = ('auto', 'torch', 'triton', 'reference')
Scale = Union[None, float, Tensor]


def _impl(backend: str, device: torch.device):
    return backend_module(backend, device, 'neighborhood_triton', torch_backend)


def _stats_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# --- the custom ops --------------------------------------------------------------------------

@torch.library.custom_op('spformer::neighborhood_attention', mutates_args=())
def _neighborhood_attention_op(
        q: Tensor, k: Tensor, v: Tensor, probs: Optional[Tensor], labels: Optional[Tensor], lam: Optional[Tensor],
        kernel_size: int, cell: int, scale: float, backend: str,
) -> Tuple[Tensor, Tensor]:
    out, stats = _impl(backend, q.device).attention_fwd(q, k, v, probs, labels, lam, kernel_size, cell, scale)
    return out.contiguous(), stats.contiguous()  # the layouts the fake implementation promises


@_neighborhood_attention_op.register_fake
def _(q, k, v, probs, labels, lam, kernel_size, cell, scale, backend):
    B, M, H, W, _ = q.shape
    return q.new_empty(B, H, W, M, v.shape[-1]), q.new_empty(B, M, H, W, 2, dtype=_stats_dtype(q.dtype))


@torch.library.custom_op('spformer::neighborhood_attention_backward', mutates_args=())
def _neighborhood_attention_backward_op(
        grad_out: Tensor, out: Tensor, stats: Tensor, q: Tensor, k: Tensor, v: Tensor, probs: Optional[Tensor],
        labels: Optional[Tensor], lam: Optional[Tensor], kernel_size: int, cell: int, scale: float, backend: str,
) -> List[Tensor]:
    grads = _impl(backend, q.device).attention_bwd(
        grad_out.contiguous(), out, stats, q, k, v, probs, labels, lam, kernel_size, cell, scale)
    return [g.contiguous() for g in grads]


@_neighborhood_attention_backward_op.register_fake
def _(grad_out, out, stats, q, k, v, probs, labels, lam, kernel_size, cell, scale, backend):
    inputs = [q, k, v] + [t for t in (probs, lam) if t is not None]
    return [torch.empty_like(t, memory_format=torch.contiguous_format) for t in inputs]


def _setup_context(ctx, inputs, output):
    q, k, v, probs, labels, lam, kernel_size, cell, scale, backend = inputs
    ctx.save_for_backward(q, k, v, probs, labels, lam, output[0], output[1])
    ctx.args = (kernel_size, cell, scale, backend)
    ctx.has_probs, ctx.has_lam = probs is not None, lam is not None


def _backward(ctx, grad_out, grad_stats):
    q, k, v, probs, labels, lam, out, stats = ctx.saved_tensors
    grads = torch.ops.spformer.neighborhood_attention_backward(
        grad_out, out, stats, q, k, v, probs, labels, lam, *ctx.args)
    dprobs = grads[3] if ctx.has_probs else None
    dlam = grads[-1] if ctx.has_lam else None
    return grads[0], grads[1], grads[2], dprobs, None, dlam, None, None, None, None


_neighborhood_attention_op.register_autograd(_backward, setup_context=_setup_context)


# FLOP formulas for torch.utils.flop_counter: every query meets k*k keys per head, d MACs for the
# logit and dv for the value; SNA adds 9 MACs per pair for the agreement.
def _flops(q, v, probs, kernel_size: int) -> int:
    B, M, H, W, d = q
    pairs = B * M * H * W * kernel_size * kernel_size
    return 2 * pairs * (d + v[-1] + (9 if probs is not None else 0))


@register_flop_formula(torch.ops.spformer.neighborhood_attention)
def _neighborhood_attention_flops(q, k, v, probs, labels, lam, kernel_size, *args, out_shape=None, **kwargs) -> int:
    return _flops(q, v, probs, kernel_size)


@register_flop_formula(torch.ops.spformer.neighborhood_attention_backward)
def _neighborhood_attention_backward_flops(grad_out, out, stats, q, k, v, probs, labels, lam, kernel_size, *args,
                                           out_shape=None, **kwargs) -> int:
    return 2 * _flops(q, v, probs, kernel_size)


# --- argument checks -------------------------------------------------------------------------

def _shape(t) -> str:
    return '(' + ', '.join(str(s) for s in t.shape) + ')'


def _check_qkv(fn: str, q, k, v, kernel_size, backend: str):
    for name, t in (('q', q), ('k', k), ('v', v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f'{fn}: {name} must be a torch.Tensor, got {type(t).__name__}')
        if t.dim() != 5:
            raise ValueError(f'{fn}: {name} must be 5-D (B, heads, H, W, channels), got shape {_shape(t)}')
        if not t.is_floating_point():
            raise TypeError(f'{fn}: {name} must be a floating point tensor, got {t.dtype}')
        if t.dtype != q.dtype:
            raise TypeError(f'{fn}: {name} has dtype {t.dtype} but q has {q.dtype}; they must match')
        if t.device != q.device:
            raise ValueError(f'{fn}: {name} is on {t.device} but q is on {q.device}; they must match')
        _check_head_dim(fn, name, t)
    if k.shape != q.shape:
        raise ValueError(f'{fn}: k {_shape(k)} must have the shape of q {_shape(q)} (B, heads, H, W, d)')
    if v.shape[:4] != q.shape[:4]:
        raise ValueError(f'{fn}: v {_shape(v)} must have the batch, heads and pixel grid of q {_shape(q)}')
    if isinstance(kernel_size, bool) or not isinstance(kernel_size, int) or kernel_size < 1 or kernel_size % 2 == 0:
        raise ValueError(f'{fn}: kernel_size must be a positive odd int (the window side), got {kernel_size!r}')
    H, W = q.shape[2:4]
    if H < kernel_size or W < kernel_size:
        raise ValueError(f'{fn}: kernel_size {kernel_size} does not fit the {H}x{W} pixel grid of q: windows are '
                         f'shifted inward at the borders, never padded, so H and W must be >= kernel_size')
    check_backend(f'{fn}: backend', backend, BACKENDS)


def _check_cell(fn: str, cell):
    if isinstance(cell, bool) or not isinstance(cell, int) or cell < 1:
        raise ValueError(f'{fn}: cell must be a positive int (pixels per superpixel cell side), got {cell!r}')


def _heads_tensor(fn: str, name: str, t, q: Tensor, trailing: Tuple[int, ...], what: str) -> Tensor:
    """``t`` with shape (B, H, W, *trailing) or (B, 1 or heads, H, W, *trailing) -> the 5/4-D form."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f'{fn}: {name} must be a torch.Tensor, got {type(t).__name__}')
    B, M, H, W = q.shape[:4]
    if t.device != q.device:
        raise ValueError(f'{fn}: {name} is on {t.device} but q is on {q.device}; they must match')
    shared = (B, H, W) + trailing
    if tuple(t.shape) == shared:
        return t.unsqueeze(1)
    if t.dim() == len(shared) + 1 and t.shape[1] in (1, M) and tuple(t.shape[:1] + t.shape[2:]) == shared:
        return t
    tail = ''.join(f', {s}' for s in trailing)
    raise ValueError(f'{fn}: {name} must have shape (B, H, W{tail}) = {shared} or (B, heads, H, W{tail}) with heads '
                     f'1 or {M} ({what}), got {_shape(t)}')


def _check_probs(fn: str, probs, q: Tensor) -> Tensor:
    probs = _heads_tensor(fn, 'probs', probs, q, (9,), 'each pixel\'s probabilities over the 9 superpixels around '
                          'its cell')
    if not probs.is_floating_point():
        raise TypeError(f'{fn}: probs must be a floating point tensor, got {probs.dtype}')
    return probs.to(q.dtype)


def _check_labels(fn: str, labels, q: Tensor) -> Tensor:
    labels = _heads_tensor(fn, 'labels', labels, q, (), 'one superpixel id per pixel')
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise TypeError(f'{fn}: labels must be an integer tensor (superpixel ids), got {labels.dtype}')
    return labels


def _scale(fn: str, scale: Scale, q: Tensor) -> Tuple[float, Optional[Tensor]]:
    """(float scale, None) or (1.0, lambda expanded to (B, heads, H, W))."""
    B, M, H, W, d = q.shape
    if scale is None:
        return 1.0 / math.sqrt(d), None
    if isinstance(scale, torch.Tensor):
        if not scale.is_floating_point():
            raise TypeError(f'{fn}: scale must be a float, a floating point tensor or None, got a {scale.dtype} tensor')
        if scale.device != q.device:
            raise ValueError(f'{fn}: scale is on {scale.device} but q is on {q.device}; they must match')
        try:
            ok = torch.broadcast_shapes(scale.shape, (B, M, H, W)) == (B, M, H, W)
        except RuntimeError:
            ok = False
        if not ok:
            raise ValueError(f'{fn}: a scale tensor must broadcast to (B, heads, H, W) = {(B, M, H, W)} (a scalar, '
                             f'one per head (heads, 1, 1) or a per-pixel map), got shape {_shape(scale)}')
        return 1.0, scale.to(q.dtype).expand(B, M, H, W)
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not scale > 0 or not math.isfinite(scale):
        raise ValueError(f'{fn}: scale must be a positive finite float, a tensor broadcasting to (B, heads, H, W), '
                         f'or None (= head_dim**-0.5), got {scale!r}')
    return float(scale), None


def _run(q, k, v, probs, labels, kernel_size: int, cell: int, scale: float, lam, backend: str) -> Tensor:
    if backend == 'reference':
        return reference.attention(q, k, v, probs, labels, lam, kernel_size, cell, scale)
    out, _ = _neighborhood_attention_op(q, k, v, probs, labels, lam, kernel_size, cell, scale, backend)
    return out.permute(0, 3, 1, 2, 4)


# --- public entry points ---------------------------------------------------------------------

def neighborhood_attention(q: Tensor, k: Tensor, v: Tensor, kernel_size: int, scale: Scale = None,
                           backend: str = 'auto') -> Tensor:
    """Neighbourhood attention (NA): each pixel attends over the k x k window around it.

    Args:
        q, k: queries and keys (B, heads, H, W, d); v: values (B, heads, H, W, dv).
        kernel_size: odd window side k; windows are shifted inward at the borders (NATTEN), H, W >= k.
        scale: the logit scale lambda: None (d**-0.5), a positive float, or a tensor broadcasting to
            (B, heads, H, W) (a learnable scalar, one per head, or a per-pixel map; differentiable).
        backend: 'auto' (Triton on CUDA, else torch), 'torch', 'triton' or 'reference'.

    Returns:
        (B, heads, H, W, dv), a view of a heads-last (B, H, W, heads, dv) tensor.
    """
    fn = 'neighborhood_attention'
    _check_qkv(fn, q, k, v, kernel_size, backend)
    scale, lam = _scale(fn, scale, q)
    return _run(q, k, v, None, None, kernel_size, 1, scale, lam, backend)


def soft_superpixel_attention(q: Tensor, k: Tensor, v: Tensor, probs: Tensor, kernel_size: int, cell: int,
                              scale: Scale = None, backend: str = 'auto') -> Tensor:
    """Soft superpixel neighbourhood attention (SNA).

    Args:
        q, k, v, kernel_size, scale, backend: as :func:`neighborhood_attention`.
        probs: (B, H, W, 9), or (B, heads, H, W, 9) with heads 1 or as q: each pixel's probabilities
            over the 9 superpixels around its cell, in ``NEIGHBOR_OFFSETS`` order (what
            ``superpixel_association`` returns); differentiable. Cast to q's dtype.
        cell: side of a superpixel's cell in pixels (superpixel grid ceil(H / cell) x ceil(W / cell)).

    Returns:
        (B, heads, H, W, dv): window weights exp(lambda_i <q_i, k_j>) * sum_s pi_i(s) pi_j(s),
        normalized over the window.
    """
    fn = 'soft_superpixel_attention'
    _check_qkv(fn, q, k, v, kernel_size, backend)
    _check_cell(fn, cell)
    probs = _check_probs(fn, probs, q)
    scale, lam = _scale(fn, scale, q)
    return _run(q, k, v, probs, None, kernel_size, cell, scale, lam, backend)


def hard_superpixel_attention(q: Tensor, k: Tensor, v: Tensor, labels: Tensor, kernel_size: int,
                              scale: Scale = None, backend: str = 'auto') -> Tensor:
    """Hard superpixel neighbourhood attention (H-SNA): the window restricted to the query's superpixel.

    Args:
        q, k, v, kernel_size, scale, backend: as :func:`neighborhood_attention`.
        labels: (B, H, W), or (B, heads, H, W) with heads 1 or as q: integer superpixel id per pixel
            (any ids; e.g. :func:`superpixel_labels` of soft probabilities).

    Returns:
        (B, heads, H, W, dv): window weights exp(lambda_i <q_i, k_j>) * 1[label_i == label_j],
        normalized over the window.
    """
    fn = 'hard_superpixel_attention'
    _check_qkv(fn, q, k, v, kernel_size, backend)
    labels = _check_labels(fn, labels, q)
    scale, lam = _scale(fn, scale, q)
    return _run(q, k, v, None, labels, kernel_size, 1, scale, lam, backend)


# The SPFormer authors' margin for the own cell before the argmax of association logits: a near-tie
# goes to the cell the pixel lies in (their code adds it to the own-cell logit).
OWN_CELL_MARGIN = 1e-5


def superpixel_labels(probs: Tensor, cell: int, own_cell_margin: float = 0.0) -> Tensor:
    """Hard superpixel ids from 9-way scores: (..., H, W, 9) -> (..., H, W) int64, the flat index
    (row * w + column on the ceil(H / cell) x ceil(W / cell) grid) of each pixel's highest-scoring
    in-grid neighbour; ties go to the own cell. The scores are probabilities or logits (monotone in
    each other per pixel); ``own_cell_margin`` is added to the own cell's score first
    (:data:`OWN_CELL_MARGIN` on logits, as the SPFormer authors do). With these labels H-SNA equals
    SNA on the one-hot probabilities of the same argmax."""
    fn = 'superpixel_labels'
    if not isinstance(probs, torch.Tensor) or probs.dim() < 3 or probs.shape[-1] != 9:
        got = _shape(probs) if isinstance(probs, torch.Tensor) else type(probs).__name__
        raise ValueError(f'{fn}: probs must be a (..., H, W, 9) tensor, got {got}')
    _check_cell(fn, cell)
    H, W = probs.shape[-3:-1]
    idx, valid = neighbor_superpixels(H, W, cell, probs.device)
    p = probs.detach().reshape(-1, H * W, 9).masked_fill(~valid, float('-inf'))
    if own_cell_margin:
        p = p.clone()
        p[..., 4] += own_cell_margin
    best = p.argmax(dim=-1)
    best = torch.where(p[..., 4] >= p.amax(dim=-1), torch.full_like(best, 4), best)
    return idx.expand(p.shape).gather(2, best[..., None]).reshape(probs.shape[:-1])


__all__ = ['BACKENDS', 'OWN_CELL_MARGIN', 'hard_superpixel_attention', 'neighborhood_attention',
           'soft_superpixel_attention', 'superpixel_labels', 'window_start']
