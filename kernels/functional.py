"""Public entry points: argument checks in one place, then dispatch to a backend."""
import math
from typing import Optional, Tuple, Union

import torch

from . import reference, torch_backend

NEIGHBOR_OFFSETS = tuple((k // 3 - 1, k % 3 - 1) for k in range(9))
BACKENDS = ('auto', 'torch', 'reference')


def _shape(t: torch.Tensor) -> str:
    return '(' + ', '.join(str(s) for s in t.shape) + ')'


def _check_common(fn: str, cell, backend: str, tensors):
    if isinstance(cell, bool) or not isinstance(cell, int) or cell < 1:
        raise ValueError(f'{fn}: cell must be a positive int (pixels per superpixel cell side), got {cell!r}')
    if backend not in BACKENDS:
        raise ValueError(f'{fn}: backend must be one of {BACKENDS}, got {backend!r}')
    first_name, first = tensors[0]
    for name, t in tensors:
        if not isinstance(t, torch.Tensor):
            raise TypeError(f'{fn}: {name} must be a torch.Tensor, got {type(t).__name__}')
        if t.dim() != 5:
            raise ValueError(f'{fn}: {name} must be 5-D (B, heads, height, width, channels), got shape {_shape(t)}')
        if not t.is_floating_point():
            raise TypeError(f'{fn}: {name} must be a floating point tensor, got {t.dtype}')
        if t.dtype != first.dtype:
            raise TypeError(f'{fn}: {name} has dtype {t.dtype} but {first_name} has {first.dtype}; they must match')
        if t.device != first.device:
            raise ValueError(f'{fn}: {name} is on {t.device} but {first_name} is on {first.device}; they must match')
        if t.shape[:2] != first.shape[:2]:
            raise ValueError(
                f'{fn}: {name} has batch/heads {tuple(t.shape[:2])} but {first_name} has {tuple(first.shape[:2])}')


def _check_grids(fn: str, pix_name: str, pix: torch.Tensor, sp_name: str, sp: torch.Tensor, cell: int):
    H, W = pix.shape[2:4]
    h, w = sp.shape[2:4]
    if h < 1 or w < 1:
        raise ValueError(f'{fn}: {sp_name} must have a superpixel grid of at least 1x1, got shape {_shape(sp)}')
    if (H, W) != (h * cell, w * cell):
        raise ValueError(
            f'{fn}: {pix_name} has a pixel grid of {H}x{W} but {sp_name} has a superpixel grid of {h}x{w} '
            f'with cell={cell}; expected a pixel grid of {h * cell}x{w * cell}')


def _check_pair(fn: str, a_name: str, a: torch.Tensor, b_name: str, b: torch.Tensor, what: str):
    if a.shape[:4] != b.shape[:4]:
        raise ValueError(f'{fn}: {a_name} {_shape(a)} and {b_name} {_shape(b)} must have the same {what}')


def _scale(fn: str, scale: Optional[float], d: int) -> float:
    if scale is None:
        return 1.0 / math.sqrt(d)
    if not isinstance(scale, (int, float)) or not scale > 0 or not math.isfinite(scale):
        raise ValueError(f'{fn}: scale must be a positive finite float or None (= head_dim**-0.5), got {scale!r}')
    return float(scale)


def _backend(backend: str, device: torch.device):
    if backend == 'reference':
        return reference
    # 'auto' picks the fused Triton kernels on CUDA once they exist; until then the torch path.
    return torch_backend


def superpixel_attention(
        q_s: torch.Tensor,
        k_p: torch.Tensor,
        v_p: torch.Tensor,
        cell: int,
        scale: Optional[float] = None,
        backend: str = 'auto',
) -> torch.Tensor:
    """Superpixel queries attend over the pixels of the 3x3 cells around them.

    Args:
        q_s: superpixel queries (B, M, h, w, d).
        k_p: pixel keys (B, M, h*cell, w*cell, d).
        v_p: pixel values (B, M, h*cell, w*cell, dv).
        cell: side of a superpixel's own cell in pixels.
        scale: logit scale, default d**-0.5.
        backend: 'auto', 'torch' or 'reference'.

    Returns:
        (B, M, h, w, dv): for superpixel j, sum over pixels p of the 3x3 cells around j of
        softmax_p(scale * <k_p, q_j>) * v_p. Cells outside the image take no part.
    """
    fn = 'superpixel_attention'
    _check_common(fn, cell, backend, [('q_s', q_s), ('k_p', k_p), ('v_p', v_p)])
    _check_grids(fn, 'k_p', k_p, 'q_s', q_s, cell)
    _check_pair(fn, 'k_p', k_p, 'v_p', v_p, 'pixel grid')
    if q_s.shape[-1] != k_p.shape[-1]:
        raise ValueError(f'{fn}: q_s {_shape(q_s)} and k_p {_shape(k_p)} must have the same channels (last dim)')
    return _backend(backend, q_s.device).superpixel_attention(q_s, k_p, v_p, cell, _scale(fn, scale, q_s.shape[-1]))


def pixel_attention(
        q_p: torch.Tensor,
        k_s: torch.Tensor,
        v_s: torch.Tensor,
        cell: int,
        scale: Optional[float] = None,
        return_weights: bool = False,
        backend: str = 'auto',
) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
    """Pixel queries attend over the (at most) 9 superpixels around their cell.

    Args:
        q_p: pixel queries (B, M, h*cell, w*cell, d).
        k_s: superpixel keys (B, M, h, w, d).
        v_s: superpixel values (B, M, h, w, dv).
        cell: side of a superpixel's own cell in pixels.
        scale: logit scale, default d**-0.5.
        return_weights: also return the (B, M, H, W, 9) probabilities, neighbour k being the
            cell at offset ``NEIGHBOR_OFFSETS[k]`` from the pixel's own cell (0 outside the image).
        backend: 'auto', 'torch' or 'reference'.

    Returns:
        (B, M, H, W, dv), and the weights if ``return_weights``.
    """
    fn = 'pixel_attention'
    _check_common(fn, cell, backend, [('q_p', q_p), ('k_s', k_s), ('v_s', v_s)])
    _check_grids(fn, 'q_p', q_p, 'k_s', k_s, cell)
    _check_pair(fn, 'k_s', k_s, 'v_s', v_s, 'superpixel grid')
    if q_p.shape[-1] != k_s.shape[-1]:
        raise ValueError(f'{fn}: q_p {_shape(q_p)} and k_s {_shape(k_s)} must have the same channels (last dim)')
    out, weights = _backend(backend, q_p.device).pixel_attention(
        q_p, k_s, v_s, cell, _scale(fn, scale, q_p.shape[-1]))
    return (out, weights) if return_weights else out


def superpixel_association(
        q_p: torch.Tensor,
        k_s: torch.Tensor,
        cell: int,
        scale: Optional[float] = None,
        backend: str = 'auto',
) -> torch.Tensor:
    """Soft pixel -> superpixel assignment: softmax over the 9 neighbours of scale * <q_p, k_s>.

    Returns (B, M, H, W, 9) probabilities in ``NEIGHBOR_OFFSETS`` order, exactly 0 for
    neighbours outside the image.
    """
    fn = 'superpixel_association'
    _check_common(fn, cell, backend, [('q_p', q_p), ('k_s', k_s)])
    _check_grids(fn, 'q_p', q_p, 'k_s', k_s, cell)
    if q_p.shape[-1] != k_s.shape[-1]:
        raise ValueError(f'{fn}: q_p {_shape(q_p)} and k_s {_shape(k_s)} must have the same channels (last dim)')
    return _backend(backend, q_p.device).superpixel_association(q_p, k_s, cell, _scale(fn, scale, q_p.shape[-1]))
