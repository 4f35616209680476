"""Cell-major PyTorch backend (DESIGN.md section 1.4), with hand-written backward passes.

Pixels are viewed cell by cell, (N, h, w, cell*cell, d). Only the small superpixel grid is
gathered 3x3 (:func:`gather9`, 9x of a tensor 1/cell**2 the size of the pixels); every
(pixel, neighbour) logit is one batched matmul per cell; superpixel results return to the
grid with the adjoint :func:`fold9`. No pixel tensor is ever copied 9x, and gather-9 and
fold-9 are each other's backward, so no full-size gradient is zero-filled.

Heads: the pixel tensors may carry either all M heads or a single head shared by all of
them (M_p = 1; SPFormer's projection-free formulation does that). Internally N = B * M_p
and the G = M / M_p heads that share a pixel tensor ride along the neighbour axis, so that
one matmul serves all of them: superpixel-side tensors become (N, h, w, 9 * G, c), index
k * G + g for neighbour k of head g.

These functions hold the math; kernels/functional.py wraps them as torch.library custom
ops (autograd and torch.compile) and checks arguments.
"""
import functools
import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

_OFFSETS = tuple((k // 3 - 1, k % 3 - 1) for k in range(9))


# --- layout helpers --------------------------------------------------------------------------

def pixels_to_cells(x: torch.Tensor, cell: int) -> torch.Tensor:
    """(B, Mp, H, W, c) -> (B * Mp, h, w, cell * cell, c), one copy."""
    B, Mp, H, W, c = x.shape
    h, w = H // cell, W // cell
    return x.reshape(B * Mp, h, cell, w, cell, c).transpose(2, 3).reshape(B * Mp, h, w, cell * cell, c)


def cells_to_heads_last(y: torch.Tensor, B: int, Mp: int, G: int, cell: int) -> torch.Tensor:
    """(B * Mp, h, w, cell * cell, G, c) -> (B, H, W, Mp * G, c) contiguous, one copy."""
    _, h, w, _, _, c = y.shape
    y = y.reshape(B, Mp, h, w, cell, cell, G, c).permute(0, 2, 4, 3, 5, 1, 6, 7)
    return y.reshape(B, h * cell, w * cell, Mp * G, c)


def superpixels_grouped(s: torch.Tensor, Mp: int) -> torch.Tensor:
    """(B, M, h, w, c) -> (B * Mp, h, w, G, c) view-or-copy with G = M // Mp."""
    B, M, h, w, c = s.shape
    G = M // Mp
    return s.reshape(B, Mp, G, h, w, c).permute(0, 1, 3, 4, 2, 5).reshape(B * Mp, h, w, G, c)


def gather9(x: torch.Tensor, fill: float = 0.0) -> torch.Tensor:
    """(N, h, w, *rest) -> (N, h, w, 9, *rest): entry k of cell c is x at cell c + offset k."""
    N, h, w = x.shape[:3]
    rest = x.shape[3:]
    xp = F.pad(x.reshape(N, h, w, math.prod(rest)), (0, 0, 1, 1, 1, 1), value=fill)  # (N, h + 2, w + 2, r)
    windows = xp.unfold(1, 3, 1).unfold(2, 3, 1)  # (N, h, w, r, 3, 3)
    return windows.permute(0, 1, 2, 4, 5, 3).reshape(N, h, w, 9, *rest)


def fold9(y: torch.Tensor) -> torch.Tensor:
    """Adjoint of :func:`gather9`: (N, h, w, 9, *rest) -> (N, h, w, *rest), out[j] = sum_k y[j - offset k, k]."""
    N, h, w = y.shape[:3]
    rest = y.shape[4:]
    y = y.reshape(N, h, w, 9, math.prod(rest))
    out = y.new_zeros(N, h + 2, w + 2, y.shape[-1])
    for k, (dy, dx) in enumerate(_OFFSETS):
        out[:, 1 + dy:1 + dy + h, 1 + dx:1 + dx + w] += y[:, :, :, k]
    return out[:, 1:1 + h, 1:1 + w].reshape(N, h, w, *rest)


def fold9_max(y: torch.Tensor) -> torch.Tensor:
    """:func:`fold9` with max instead of sum; entries of -inf never win."""
    N, h, w = y.shape[:3]
    rest = y.shape[4:]
    y = y.reshape(N, h, w, 9, math.prod(rest))
    out = y.new_full((N, h + 2, w + 2, y.shape[-1]), float('-inf'))
    for k, (dy, dx) in enumerate(_OFFSETS):
        view = out[:, 1 + dy:1 + dy + h, 1 + dx:1 + dx + w]
        torch.maximum(view, y[:, :, :, k], out=view)
    return out[:, 1:1 + h, 1:1 + w].reshape(N, h, w, *rest)


@functools.lru_cache(maxsize=64)
def _valid_cpu(h: int, w: int) -> torch.Tensor:
    k = torch.arange(9)
    ny = torch.arange(h)[:, None, None] + (k // 3 - 1)
    nx = torch.arange(w)[None, :, None] + (k % 3 - 1)
    return (ny >= 0) & (ny < h) & (nx >= 0) & (nx < w)  # (h, w, 9)


def valid_neighbors(h: int, w: int, device) -> torch.Tensor:
    """(h, w, 9) bool: neighbour k of cell (i, j) lies inside the h x w grid."""
    return _valid_cpu(h, w).to(device)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


# --- pixel queries over their 9 superpixels ----------------------------------------------------

def _pixel_probs(qc, k, bias, Mp, scale):
    """Cell-major probabilities (N, h, w, n, 9 * G) and the gathered keys."""
    N, h, w, n, _ = qc.shape
    kn = gather9(superpixels_grouped(k, Mp))  # (N, h, w, 9, G, d)
    G = kn.shape[4]
    kn = kn.reshape(N, h, w, 9 * G, kn.shape[-1])
    logits = torch.matmul(qc, kn.transpose(-1, -2)).mul_(scale)  # (N, h, w, n, 9G)
    if bias is not None:
        logits += gather9(superpixels_grouped(bias.unsqueeze(-1), Mp)).reshape(N, h, w, 1, 9 * G)
    valid = valid_neighbors(h, w, qc.device)[None, :, :, None, :, None]
    logits = logits.view(N, h, w, n, 9, G).masked_fill_(~valid, float('-inf'))
    return torch.softmax(logits, dim=4).view(N, h, w, n, 9 * G), kn


def pixel_attention_fwd(q, k, v, bias: Optional[torch.Tensor], cell: int, scale: float):
    """q (B, Mp, H, W, d), k (B, M, h, w, d), v (B, M, h, w, dv), bias (B, M, h, w) or None.

    Returns the output heads-last (B, H, W, M, dv) and the probabilities, cell-major (N, h, w, n, 9G).
    """
    B, Mp = q.shape[:2]
    M, dv = v.shape[1], v.shape[-1]
    G = M // Mp
    dt = _compute_dtype(q.dtype)
    qc = pixels_to_cells(q.to(dt), cell)
    N, h, w, n, _ = qc.shape
    probs, _ = _pixel_probs(qc, k.to(dt), None if bias is None else bias.to(dt), Mp, scale)
    vn = gather9(superpixels_grouped(v.to(dt), Mp))  # (N, h, w, 9, G, dv)
    if G == 1:
        out = torch.matmul(probs, vn.view(N, h, w, 9, dv)).view(N, h, w, n, 1, dv)
    else:
        out = torch.einsum('Nhwnkg,Nhwkgd->Nhwngd', probs.view(N, h, w, n, 9, G), vn)
    return cells_to_heads_last(out, B, Mp, G, cell).to(q.dtype), probs


def pixel_attention_bwd(grad_out, q, k, v, bias, probs, cell: int, scale: float):
    """grad_out (B, H, W, M, dv) heads-last. Returns (dq, dk, dv, dbias) in the inputs' layouts."""
    B, Mp, H, W, d = q.shape
    M, h, w, dv = v.shape[1], v.shape[2], v.shape[3], v.shape[-1]
    G = M // Mp
    dt = _compute_dtype(q.dtype)
    N, n = B * Mp, cell * cell
    qc = pixels_to_cells(q.to(dt), cell)
    kn = gather9(superpixels_grouped(k.to(dt), Mp)).reshape(N, h, w, 9 * G, d)
    vn = gather9(superpixels_grouped(v.to(dt), Mp))  # (N, h, w, 9, G, dv)
    # grad_out heads-last (B, H, W, Mp * G, dv) -> cells (N, h, w, n, G, dv)
    go = grad_out.to(dt).reshape(B, h, cell, w, cell, Mp, G, dv).permute(0, 5, 1, 3, 2, 4, 6, 7)
    go = go.reshape(N, h, w, n, G, dv)
    p = probs.view(N, h, w, n, 9, G)
    if G == 1:
        go1 = go.view(N, h, w, n, dv)
        dp = torch.matmul(go1, vn.view(N, h, w, 9, dv).transpose(-1, -2)).view(N, h, w, n, 9, 1)
        dvn = torch.matmul(probs.transpose(-1, -2), go1).view(N, h, w, 9, 1, dv)
    else:
        dp = torch.einsum('Nhwngd,Nhwkgd->Nhwnkg', go, vn)
        dvn = torch.einsum('Nhwnkg,Nhwngd->Nhwkgd', p, go)
    # softmax backward over the 9 neighbours; excluded neighbours have p = 0 and get 0.
    dlogits = p * (dp - (p * dp).sum(dim=4, keepdim=True))  # (N, h, w, n, 9, G)
    dbias = None
    if bias is not None:
        dbias = _ungroup(fold9(dlogits.sum(dim=3)), B, Mp).to(bias.dtype)  # (B, M, h, w)
    dlogits = dlogits.view(N, h, w, n, 9 * G).mul_(scale)
    dq = _cells_to_pixels(torch.matmul(dlogits, kn), B, Mp, cell).to(q.dtype)
    dkn = torch.matmul(dlogits.transpose(-1, -2), qc).view(N, h, w, 9, G, d)
    dk = _ungroup(fold9(dkn), B, Mp).to(k.dtype)
    dv_ = _ungroup(fold9(dvn), B, Mp).to(v.dtype)
    return dq, dk, dv_, dbias


def _ungroup(t: torch.Tensor, B: int, Mp: int) -> torch.Tensor:
    """(B * Mp, h, w, G, *c) -> (B, Mp * G, h, w, *c)."""
    N, h, w, G = t.shape[:4]
    rest = t.shape[4:]
    return t.reshape(B, Mp, h, w, G, *rest).movedim(4, 2).reshape(B, Mp * G, h, w, *rest)


def _cells_to_pixels(t: torch.Tensor, B: int, Mp: int, cell: int) -> torch.Tensor:
    """(B * Mp, h, w, n, c) -> (B, Mp, H, W, c)."""
    _, h, w, _, c = t.shape
    return t.reshape(B, Mp, h, w, cell, cell, c).transpose(3, 4).reshape(B, Mp, h * cell, w * cell, c)


def superpixel_association(q, k, bias: Optional[torch.Tensor], cell: int, scale: float) -> torch.Tensor:
    """(B, M, H, W, 9) probabilities; differentiable through plain autograd."""
    B, Mp = q.shape[:2]
    M = k.shape[1]
    G = M // Mp
    dt = _compute_dtype(q.dtype)
    qc = pixels_to_cells(q.to(dt), cell)
    N, h, w, n, _ = qc.shape
    probs, _ = _pixel_probs(qc, k.to(dt), None if bias is None else bias.to(dt), Mp, scale)
    probs = probs.view(N, h, w, n, 9, G).transpose(4, 5)  # (N, h, w, n, G, 9)
    return cells_to_heads_last(probs, B, Mp, G, cell).permute(0, 3, 1, 2, 4).to(q.dtype)


def probs_to_weights(probs: torch.Tensor, B: int, Mp: int, G: int, cell: int) -> torch.Tensor:
    """Cell-major probabilities (N, h, w, n, 9G) -> (B, M, H, W, 9)."""
    N, h, w, n, _ = probs.shape
    p = probs.view(N, h, w, n, 9, G).transpose(4, 5)
    return cells_to_heads_last(p, B, Mp, G, cell).permute(0, 3, 1, 2, 4)


# --- superpixel queries over the pixels of their 3x3 cells ---------------------------------------

def superpixel_attention_fwd(q, k, v, cell: int, scale: float, shared_kv: bool = False):
    """q (B, M, h, w, d), k (B, Mp, H, W, d), v (B, Mp, H, W, dv); ``shared_kv``: v is k (one cell copy).

    Returns the output heads-last (B, h, w, M, dv) and the probabilities, cell-major (N, h, w, n, 9G):
    entry (c, p, k * G + g) is the weight of pixel p of cell c for superpixel c + offset k, head g.
    """
    B, M, h, w, d = q.shape
    Mp = k.shape[1]
    G = M // Mp
    dt = _compute_dtype(q.dtype)
    kc = pixels_to_cells(k.to(dt), cell)
    vc = kc if shared_kv else pixels_to_cells(v.to(dt), cell)
    N, _, _, n, _ = kc.shape
    dv = vc.shape[-1]
    qn = gather9(superpixels_grouped(q.to(dt), Mp)).reshape(N, h, w, 9 * G, d)
    logits = torch.matmul(kc, qn.transpose(-1, -2)).mul_(scale)  # (N, h, w, n, 9G)
    valid = valid_neighbors(h, w, q.device)[None, :, :, None, :, None]
    logits = logits.view(N, h, w, n, 9, G).masked_fill_(~valid, float('-inf'))
    # Softmax over all pixels of each superpixel's 3x3 cells: exact per-superpixel max (folded
    # from per-cell maxima), sums folded the same way; excluded pairs give exp(-inf) = 0.
    sp_max = fold9_max(logits.amax(dim=3))  # (N, h, w, G)
    pair_max = gather9(sp_max).masked_fill_(~valid[0, :, :, 0], 0.0)  # (N, h, w, 9, G)
    probs = logits.sub_(pair_max.unsqueeze(3)).exp_()  # unnormalized, in place
    sp_sum = fold9(probs.sum(dim=3))  # (N, h, w, G)
    pair_inv = gather9(sp_sum.reciprocal())  # (N, h, w, 9, G)
    probs.mul_(pair_inv.unsqueeze(3))
    probs = probs.view(N, h, w, n, 9 * G)
    u = torch.matmul(probs.transpose(-1, -2), vc)  # (N, h, w, 9G, dv)
    out = fold9(u.view(N, h, w, 9, G, dv))  # (N, h, w, G, dv)
    out = out.reshape(B, Mp, h, w, G, dv).permute(0, 2, 3, 1, 4, 5).reshape(B, h, w, M, dv)
    return out.to(q.dtype), probs


def superpixel_attention_bwd(grad_out, out, q, k, v, probs, cell: int, scale: float, shared_kv: bool = False):
    """grad_out and out heads-last (B, h, w, M, dv). Returns (dq, dk, dv); dv is None if ``shared_kv``
    (then dk holds the gradient of both uses)."""
    B, M, h, w, d = q.shape
    Mp = k.shape[1]
    G = M // Mp
    dt = _compute_dtype(q.dtype)
    kc = pixels_to_cells(k.to(dt), cell)
    vc = kc if shared_kv else pixels_to_cells(v.to(dt), cell)
    N, _, _, n, _ = kc.shape
    dv = vc.shape[-1]
    qn = gather9(superpixels_grouped(q.to(dt), Mp)).reshape(N, h, w, 9 * G, d)
    go = grad_out.to(dt)
    # D_j = <out_j, grad_j>, the softmax-backward row term, per superpixel and head.
    delta = (go * out.to(dt)).sum(-1)  # (B, h, w, M)
    go = go.reshape(B, h, w, Mp, G, dv).permute(0, 3, 1, 2, 4, 5).reshape(N, h, w, G, dv)
    delta = delta.reshape(B, h, w, Mp, G).permute(0, 3, 1, 2, 4).reshape(N, h, w, G)
    gon = gather9(go).view(N, h, w, 9 * G, dv)
    pair_delta = gather9(delta).view(N, h, w, 1, 9 * G)
    dvc = torch.matmul(probs, gon)  # (N, h, w, n, dv): sums over neighbours and heads
    dp = torch.matmul(vc, gon.transpose(-1, -2))  # (N, h, w, n, 9G)
    dlogits = dp.sub_(pair_delta).mul_(probs).mul_(scale)
    dkc = torch.matmul(dlogits, qn)  # (N, h, w, n, d)
    dqn = torch.matmul(dlogits.transpose(-1, -2), kc).view(N, h, w, 9, G, d)
    dq = _ungroup(fold9(dqn), B, Mp).to(q.dtype)
    if shared_kv:
        dk = _cells_to_pixels(dkc.add_(dvc), B, Mp, cell).to(k.dtype)
        return dq, dk, None
    return dq, _cells_to_pixels(dkc, B, Mp, cell).to(k.dtype), _cells_to_pixels(dvc, B, Mp, cell).to(v.dtype)
