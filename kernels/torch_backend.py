"""Cell-major PyTorch backend (docs/design.md §1.4), with hand-written backward passes.

Pixels are viewed cell by cell, (N, h, w, cell*cell, d). Only the small superpixel grid is
gathered 3x3 (:func:`neighbors`, 9x of a tensor 1/cell**2 the size of the pixels); every
(pixel, neighbour) logit is one batched matmul per cell; superpixel results return to the
grid with the adjoint :func:`fold9`. No pixel tensor is ever copied 9x, and the gather and
the fold are each other's backward, so no full-size gradient is zero-filled.

Heads: the pixel tensors may carry either all M heads or a single head shared by all of
them (M_p = 1; SPFormer's projection-free formulation does that). Internally N = B * M_p
and the G = M / M_p heads that share a pixel tensor ride along the neighbour axis, so that
one matmul serves all of them: superpixel-side tensors become (N, h, w, G * 9, c), index
g * 9 + k for neighbour k of head g (softmaxes over neighbours run on the last axis).

Excluded neighbours (outside the grid) are handled without a masking pass: in the pixel
direction they get a -inf logit bias, in the superpixel direction a +inf subtracted max.

These functions hold the math; kernels/functional.py wraps them as torch.library custom
ops (autograd and torch.compile) and checks arguments.
"""
import math
from typing import Optional

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


def as_cells(x: torch.Tensor, cell: int, cells: bool) -> torch.Tensor:
    """A pixel tensor, image (B, Mp, H, W, c) or cell-major (B, Mp, h, w, n, c) -> (B * Mp, h, w, n, c)."""
    if cells:
        return x.reshape(x.shape[0] * x.shape[1], *x.shape[2:])
    return pixels_to_cells(x, cell)


def heads_last(y: torch.Tensor, B: int, Mp: int) -> torch.Tensor:
    """(B * Mp, *grid, G, c) -> heads-last (B, *grid, Mp * G, c), head m = mp * G + g (a view for Mp = 1):
    how the ops return results on any grid (superpixels, cells, image pixels)."""
    grid, (G, c) = y.shape[1:-2], y.shape[-2:]
    return y.reshape(B, Mp, *grid, G, c).movedim(1, -3).reshape(B, *grid, Mp * G, c)


def heads_grouped(g: torch.Tensor, Mp: int) -> torch.Tensor:
    """Inverse of :func:`heads_last`: (B, *grid, M, c) -> (B * Mp, *grid, G, c) (a view for Mp = 1)."""
    B, grid, (M, c) = g.shape[0], g.shape[1:-2], g.shape[-2:]
    return g.reshape(B, *grid, Mp, M // Mp, c).movedim(-3, 1).reshape(B * Mp, *grid, M // Mp, c)


def heads_last_out(y: torch.Tensor, B: int, Mp: int, G: int, cell: int, cells: bool) -> torch.Tensor:
    """Pixel-side result (B * Mp, h, w, n, G, c) -> heads-last (B, H, W, M, c), or (B, h, w, n, M, c) if ``cells``."""
    return heads_last(y, B, Mp) if cells else cells_to_heads_last(y, B, Mp, G, cell)


def heads_last_to_cells(g: torch.Tensor, Mp: int, cell: int, cells: bool) -> torch.Tensor:
    """Inverse of :func:`heads_last_out`: (B, H, W, M, c) or (B, h, w, n, M, c) -> (B * Mp, h, w, n, G, c)."""
    if cells:
        return heads_grouped(g, Mp)
    B, H, W, M, c = g.shape
    G = M // Mp
    h, w = H // cell, W // cell
    g = g.reshape(B, h, cell, w, cell, Mp, G, c).permute(0, 5, 1, 3, 2, 4, 6, 7)
    return g.reshape(B * Mp, h, w, cell * cell, G, c)


def superpixels_grouped(s: torch.Tensor, Mp: int) -> torch.Tensor:
    """(B, M, h, w, *c) -> (B * Mp, h, w, G, *c) with G = M // Mp (a view when G == 1)."""
    B, M, h, w = s.shape[:4]
    rest = s.shape[4:]
    G = M // Mp
    if G == 1:
        return s.reshape(B * Mp, h, w, 1, *rest)
    return s.reshape(B, Mp, G, h, w, *rest).movedim(2, 4).reshape(B * Mp, h, w, G, *rest)


def fold9(y: torch.Tensor, reduce: str = 'sum', axis: int = 3) -> torch.Tensor:
    """Adjoint of the neighbour gather (:func:`neighbors`): y with the 9 neighbours on ``axis``,
    (N, h, w, [G,] 9, *rest) -> the same without that axis, out[j] = sum_k y[j - offset k, k] (or
    the max with ``reduce='amax'``). Entries whose target lies outside the grid are dropped.
    Reads y in place, whatever its layout."""
    N, h, w = y.shape[:3]
    shape = y.shape[:axis] + y.shape[axis + 1:]
    padded = (N, h + 2, w + 2) + tuple(shape[3:])
    out = y.new_full(padded, float('-inf')) if reduce == 'amax' else y.new_zeros(padded)
    for k, (dy, dx) in enumerate(_OFFSETS):
        view = out[:, 1 + dy:1 + dy + h, 1 + dx:1 + dx + w]
        if reduce == 'amax':
            torch.maximum(view, y.select(axis, k), out=view)
        else:
            view += y.select(axis, k)
    return out[:, 1:1 + h, 1:1 + w]


def accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for fp16/bf16 inputs, else the inputs' dtype: what every backend accumulates in and
    stores probabilities and softmax statistics in."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def neighbors(s: torch.Tensor, Mp: int, fill: float = 0.0) -> torch.Tensor:
    """Superpixel tensor (B, M, h, w, *c) -> (B * Mp, h, w, G, 9, *c): each cell's 9 neighbours per head,
    in one copy (the channel rows stay contiguous)."""
    x = superpixels_grouped(s, Mp)  # (N, h, w, G, *c)
    N, h, w, G = x.shape[:4]
    rest = x.shape[4:]
    r = math.prod(rest)
    xp = F.pad(x.reshape(N, h, w, G, r), (0, 0, 0, 0, 1, 1, 1, 1), value=fill)  # (N, h + 2, w + 2, G, r)
    windows = xp.unfold(1, 3, 1).unfold(2, 3, 1)  # (N, h, w, G, r, 3, 3)
    return windows.permute(0, 1, 2, 3, 5, 6, 4).reshape(N, h, w, G, 9, *rest).contiguous()


def block_diagonal(vn: torch.Tensor) -> torch.Tensor:
    """(N, h, w, G, 9, c) per-head neighbour values -> (N, h, w, G * 9, G * c), head g's block on the
    diagonal (a view when G == 1). ``probs (n, G * 9) @ block_diagonal(vn)`` is every head's weighted
    sum in one matmul that writes heads-last rows (n, G * c) directly; the per-head einsum moved the
    pixel-sized operands and results between layouts (a copy each way). The zero blocks cost flops
    only on tiny matrices."""
    N, h, w, G, k, c = vn.shape
    if G == 1:
        return vn.view(N, h, w, k, c)
    bd = vn.new_zeros(N, h, w, G, k, G, c)
    bd.diagonal(dim1=3, dim2=5).copy_(vn.permute(0, 1, 2, 4, 5, 3))
    return bd.view(N, h, w, G * k, G * c)


def fold_neighbors(y: torch.Tensor, reduce: str = 'sum') -> torch.Tensor:
    """Adjoint of :func:`neighbors` up to the grouping: (N, h, w, G, 9, *c) -> (N, h, w, G, *c)."""
    return fold9(y, reduce, axis=4)


def _ungroup(t: torch.Tensor, B: int, Mp: int) -> torch.Tensor:
    """(B * Mp, h, w, G, *c) -> (B, Mp * G, h, w, *c)."""
    N, h, w, G = t.shape[:4]
    rest = t.shape[4:]
    return t.reshape(B, Mp, h, w, G, *rest).movedim(4, 2).reshape(B, Mp * G, h, w, *rest)


def _cells_to_pixels(t: torch.Tensor, B: int, Mp: int, cell: int, cells: bool = False,
                     dtype: Optional[torch.dtype] = None, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """(B * Mp, h, w, n, c) -> (B, Mp, H, W, c), or (B, Mp, h, w, n, c) if ``cells`` (a view where no
    conversion to ``dtype`` is asked for); written into ``out`` if given."""
    _, h, w, n, c = t.shape
    cell_major = t.view(B, Mp, h, w, n, c)
    if out is not None:
        if cells:
            return out.copy_(cell_major)
        out.view(B, Mp, h, cell, w, cell, c).copy_(cell_major.view(B, Mp, h, w, cell, cell, c).transpose(3, 4))
        return out
    if not cells:
        cell_major = cell_major.reshape(B, Mp, h, w, cell, cell, c).transpose(3, 4).reshape(B, Mp, h * cell, w * cell, c)
    return cell_major if dtype is None else cell_major.to(dtype)


def softmax_last(x: torch.Tensor) -> torch.Tensor:
    """Softmax over a short last axis (9 neighbours): a few vectorized passes run ~4x faster on CPU
    than torch.softmax, whose kernel is built for long rows. In place unless autograd records."""
    if torch.is_grad_enabled() and x.requires_grad:
        z = (x - x.amax(dim=-1, keepdim=True).detach()).exp()
        return z / z.sum(dim=-1, keepdim=True)
    x = x.sub_(x.amax(dim=-1, keepdim=True)).exp_()
    return x.div_(x.sum(dim=-1, keepdim=True))


# --- pixel queries over their 9 superpixels ----------------------------------------------------

def _pixel_probs(qc: torch.Tensor, k: torch.Tensor, bias: Optional[torch.Tensor], B: int, Mp: int, scale: float,
                 normalize: bool = True):
    """Cell-major probabilities (N, h, w, n, G * 9), or their logits (-inf outside the image) if not ``normalize``."""
    N, h, w, n, d = qc.shape
    G = k.shape[1] // Mp
    kn = neighbors(k, Mp).view(N, h, w, G * 9, d)
    # A transposed right-hand operand costs the matmul less than building it contiguous (the
    # gather's inner loop would then run over the 3x3 window: ~8 ms instead of ~0.6 at SPFormer-S).
    logits = torch.matmul(qc, kn.transpose(-1, -2))  # (N, h, w, n, G9)
    if bias is None:
        bias = k.new_zeros(B, k.shape[1], h, w)
    # -inf for excluded neighbours: the bias pass doubles as the mask.
    pair_bias = neighbors(bias, Mp, fill=float('-inf')).view(N, h, w, 1, G * 9)
    if torch.is_grad_enabled() and (qc.requires_grad or kn.requires_grad or pair_bias.requires_grad):
        logits = logits * scale + pair_bias  # superpixel_association under autograd
    else:
        logits = logits.mul_(scale).add_(pair_bias)
    if not normalize:
        return logits
    return softmax_last(logits.view(N, h, w, n, G, 9)).view(N, h, w, n, G * 9)


def pixel_attention_fwd(q, k, v, bias: Optional[torch.Tensor], cell: int, scale: float, cells: bool = False):
    """q (B, Mp, H, W, d) (or cell-major (B, Mp, h, w, n, d) if ``cells``), k (B, M, h, w, d),
    v (B, M, h, w, dv), bias (B, M, h, w) or None.

    Returns the output heads-last (B, H, W, M, dv) (or (B, h, w, n, M, dv)) and the probabilities,
    cell-major (N, h, w, n, G * 9).
    """
    B, Mp = q.shape[:2]
    M, dv = v.shape[1], v.shape[-1]
    G = M // Mp
    dt = accumulate_dtype(q.dtype)
    qc = as_cells(q.to(dt), cell, cells)
    N, h, w, n, _ = qc.shape
    probs = _pixel_probs(qc, k.to(dt), None if bias is None else bias.to(dt), B, Mp, scale)
    vn = neighbors(v.to(dt), Mp)  # (N, h, w, G, 9, dv)
    out = torch.matmul(probs, block_diagonal(vn)).view(N, h, w, n, G, dv)
    return heads_last_out(out, B, Mp, G, cell, cells).to(q.dtype), probs


def pixel_attention_bwd(grad_out, q, k, v, bias, probs, cell: int, scale: float, cells: bool = False):
    """grad_out heads-last, (B, H, W, M, dv) or (B, h, w, n, M, dv) if ``cells``.
    Returns (dq, dk, dv, dbias) in the inputs' layouts."""
    B, Mp, d = q.shape[0], q.shape[1], q.shape[-1]
    M, h, w, dv = v.shape[1], v.shape[2], v.shape[3], v.shape[-1]
    G = M // Mp
    dt = accumulate_dtype(q.dtype)
    N, n = B * Mp, cell * cell
    qc = as_cells(q.to(dt), cell, cells)
    kn = neighbors(k.to(dt), Mp).view(N, h, w, G * 9, d)
    vn = neighbors(v.to(dt), Mp)  # (N, h, w, G, 9, dv)
    go = heads_last_to_cells(grad_out.to(dt), Mp, cell, cells)  # (N, h, w, n, G, dv)
    p = probs.view(N, h, w, n, G, 9)
    go_rows = go.reshape(N, h, w, n, G * dv)
    dp = torch.matmul(go_rows, block_diagonal(vn).transpose(-1, -2)).view(N, h, w, n, G, 9)
    # (N, h, w, G9, G * dv) with head g's block on the diagonal -> (N, h, w, G, 9, dv), a view
    dvn = torch.matmul(probs.transpose(-1, -2), go_rows)
    dvn = dvn.view(N, h, w, G, 9, G, dv).diagonal(dim1=3, dim2=5).permute(0, 1, 2, 5, 3, 4)
    # softmax backward over the 9 neighbours; excluded neighbours have p = 0 and get 0.
    dlogits = dp.sub_((p * dp).sum(dim=-1, keepdim=True)).mul_(p)  # (N, h, w, n, G, 9)
    dbias = None
    if bias is not None:
        dbias = _ungroup(fold_neighbors(dlogits.sum(dim=3)), B, Mp).to(bias.dtype)  # (B, M, h, w)
    dlogits = dlogits.reshape(N, h, w, n, G * 9).mul_(scale)
    dq = _cells_to_pixels(torch.matmul(dlogits, kn), B, Mp, cell, cells, q.dtype)
    dkn = torch.matmul(dlogits.transpose(-1, -2), qc).view(N, h, w, G, 9, d)
    dk = _ungroup(fold_neighbors(dkn), B, Mp).to(k.dtype)
    dv_ = _ungroup(fold_neighbors(dvn), B, Mp).to(v.dtype)
    return dq, dk, dv_, dbias


def probs_to_weights(probs: torch.Tensor, B: int, Mp: int, G: int, cell: int, cells: bool = False) -> torch.Tensor:
    """Cell-major probabilities (N, h, w, n, G * 9) -> (B, M, H, W, 9), or (B, M, h, w, n, 9) if ``cells``."""
    N, h, w, n, _ = probs.shape
    y = heads_last_out(probs.view(N, h, w, n, G, 9), B, Mp, G, cell, cells)
    return y.movedim(-2, 1)


def superpixel_association(q, k, bias: Optional[torch.Tensor], cell: int, scale: float,
                           cells: bool = False, logits: bool = False) -> torch.Tensor:
    """(B, M, H, W, 9) probabilities ((B, M, h, w, n, 9) if ``cells``), or their logits; differentiable through
    plain autograd."""
    B, Mp = q.shape[:2]
    G = k.shape[1] // Mp
    dt = accumulate_dtype(q.dtype)
    probs = _pixel_probs(as_cells(q.to(dt), cell, cells), k.to(dt), None if bias is None else bias.to(dt),
                         B, Mp, scale, normalize=not logits)
    return probs_to_weights(probs, B, Mp, G, cell, cells).to(q.dtype)


# --- superpixel queries over the pixels of their 3x3 cells ---------------------------------------

def _superpixel_operands(q, k, v, cell: int, shared_kv: bool, cells: bool):
    """What both passes start from: cell-major keys and values, gathered queries (N, h, w, G * 9, d)."""
    B, M, h, w, d = q.shape
    Mp = k.shape[1]
    G = M // Mp
    dt = accumulate_dtype(q.dtype)
    kc = as_cells(k.to(dt), cell, cells)
    vc = kc if shared_kv else as_cells(v.to(dt), cell, cells)
    qn = neighbors(q.to(dt), Mp).view(B * Mp, h, w, G * 9, d)
    return Mp, G, dt, kc, vc, qn


def _is_copy(cells: torch.Tensor, x: torch.Tensor) -> bool:
    """Whether a cell-major tensor from :func:`as_cells` is a copy rather than a view of ``x``."""
    return cells.untyped_storage().data_ptr() != x.untyped_storage().data_ptr()


# The superpixel direction copies keys and values to cell-major (unless given so) in both passes.
# On CPU, above glibc's mmap threshold (at most 32 MB), every such copy is a fresh mapping that
# costs a page fault per 4 KB, as much time as the copy itself (the per-head values of SPFormer-S at
# batch 8 are 38 MB). Large batches are therefore processed in slices whose copies stay below
# CHUNK_BYTES: the heap serves each slice from the memory the previous one freed. (CUDA's caching
# allocator has no such cost, and there slices would only cut the parallelism.)
CHUNK_BYTES = 16 << 20


def batch_slices(B: int, bytes_per_item: int) -> list:
    """Slices of the batch whose per-slice temporaries of ``bytes_per_item`` each stay under CHUNK_BYTES."""
    step = max(1, CHUNK_BYTES // max(1, bytes_per_item))
    return [slice(b, min(b + step, B)) for b in range(0, B, step)] or [slice(0, 0)]


def _superpixel_slices(k, v, shared_kv: bool, cells: bool) -> list:
    """The batch slices the superpixel passes run in: one unless they copy pixel tensors on CPU."""
    dt = accumulate_dtype(k.dtype)
    copies = not cells or k.dtype != dt or (not shared_kv and v.dtype != dt)
    if k.device.type != 'cpu' or not copies:
        return [slice(0, k.shape[0])]
    item_bytes = (math.prod(k.shape[1:]) + (0 if shared_kv else math.prod(v.shape[1:]))) * dt.itemsize
    return batch_slices(k.shape[0], item_bytes)


def superpixel_attention_fwd(q, k, v, cell: int, scale: float, shared_kv: bool = False, cells: bool = False):
    """q (B, M, h, w, d), k (B, Mp, H, W, d), v (B, Mp, H, W, dv); ``shared_kv``: v is k (one cell copy);
    ``cells``: k and v are cell-major (B, Mp, h, w, n, c).

    Returns the output heads-last (B, h, w, M, dv) and the probabilities, cell-major (N, h, w, n, G * 9):
    entry (c, p, g * 9 + k) is the weight of pixel p of cell c for superpixel c + offset k, head g.
    """
    slices = _superpixel_slices(k, v, shared_kv, cells)
    if len(slices) == 1:
        return _superpixel_attention_fwd(q, k, v, cell, scale, shared_kv, cells)
    outs, probs = zip(*(_superpixel_attention_fwd(q[b], k[b], v[b], cell, scale, shared_kv, cells) for b in slices))
    return torch.cat(outs), torch.cat(probs)


def _superpixel_attention_fwd(q, k, v, cell: int, scale: float, shared_kv: bool, cells: bool):
    B, M, h, w, d = q.shape
    Mp, G, dt, kc, vc, qn = _superpixel_operands(q, k, v, cell, shared_kv, cells)
    N, _, _, n, _ = kc.shape
    dv = vc.shape[-1]
    logits = torch.matmul(kc, qn.transpose(-1, -2)).mul_(scale)  # (N, h, w, n, G9)
    # Softmax over all pixels of each superpixel's 3x3 cells: exact per-superpixel max folded
    # from per-cell maxima, sums folded the same way. Pairs whose superpixel lies outside the
    # grid fold into the padding and get a +inf max, so exp() gives exactly 0 there.
    sp_max = fold_neighbors(logits.view(N, h, w, n, G, 9).amax(dim=3), reduce='amax')  # (N, h, w, G)
    pair_max = neighbors(_ungroup(sp_max, B, Mp), Mp, fill=float('inf')).view(N, h, w, 1, G * 9)
    probs = logits.sub_(pair_max).exp_()  # unnormalized, in place
    sp_sum = fold_neighbors(probs.sum(dim=3).view(N, h, w, G, 9))  # (N, h, w, G)
    probs.mul_(neighbors(_ungroup(sp_sum.reciprocal(), B, Mp), Mp).view(N, h, w, 1, G * 9))
    u = torch.matmul(probs.transpose(-1, -2), vc)  # (N, h, w, G9, dv)
    out = fold_neighbors(u.view(N, h, w, G, 9, dv))  # (N, h, w, G, dv)
    return heads_last(out, B, Mp).to(q.dtype), probs


def superpixel_attention_bwd(grad_out, out, q, k, v, probs, cell: int, scale: float, shared_kv: bool = False,
                             cells: bool = False):
    """grad_out and out heads-last (B, h, w, M, dv). Returns (dq, dk, dv); dv is None if ``shared_kv``
    (then dk holds the gradient of both uses)."""
    slices = _superpixel_slices(k, v, shared_kv, cells)
    if len(slices) == 1:
        return _superpixel_attention_bwd(grad_out, out, q, k, v, probs, cell, scale, shared_kv, cells)
    Mp = k.shape[1]
    dk = k.new_empty(k.shape)
    dv = None if shared_kv else v.new_empty(v.shape)
    dq = [_superpixel_attention_bwd(grad_out[b], out[b], q[b], k[b], v[b], probs[b.start * Mp:b.stop * Mp], cell,
                                    scale, shared_kv, cells, dk_out=dk[b], dv_out=None if shared_kv else dv[b])[0]
          for b in slices]
    return torch.cat(dq), dk, dv


def _superpixel_attention_bwd(grad_out, out, q, k, v, probs, cell: int, scale: float, shared_kv: bool, cells: bool,
                              dk_out=None, dv_out=None):
    """One batch slice; with ``dk_out``/``dv_out``, dk and dv are written there."""
    B, M, h, w, d = q.shape
    Mp, G, dt, kc, vc, qn = _superpixel_operands(q, k, v, cell, shared_kv, cells)
    N, _, _, n, _ = kc.shape
    dv = vc.shape[-1]
    go = grad_out.to(dt)
    # D_j = <out_j, grad_j>, the softmax-backward row term, per superpixel and head.
    delta = (go * out.to(dt)).sum(-1)  # (B, h, w, M)
    gon = neighbors(go.permute(0, 3, 1, 2, 4), Mp).view(N, h, w, G * 9, dv)
    pair_delta = neighbors(delta.permute(0, 3, 1, 2), Mp).view(N, h, w, 1, G * 9)
    dp = torch.matmul(vc, gon.transpose(-1, -2))  # (N, h, w, n, G9)
    # dv (sums over neighbours and heads) goes into the cell-major value copy made above, whose
    # last use was dp: a fresh buffer would cost page faults when it is large (see CHUNK_BYTES).
    dvc = torch.matmul(probs, gon, out=vc) if _is_copy(vc, v) and not shared_kv else torch.matmul(probs, gon)
    dlogits = dp.sub_(pair_delta).mul_(probs).mul_(scale)
    dkc = torch.matmul(dlogits, qn)  # (N, h, w, n, d)
    dqn = torch.matmul(dlogits.transpose(-1, -2), kc).view(N, h, w, G, 9, d)
    dq = _ungroup(fold_neighbors(dqn), B, Mp).to(q.dtype)
    if shared_kv:
        return dq, _cells_to_pixels(dkc.add_(dvc), B, Mp, cell, cells, k.dtype, dk_out), None
    return (dq, _cells_to_pixels(dkc, B, Mp, cell, cells, k.dtype, dk_out),
            _cells_to_pixels(dvc, B, Mp, cell, cells, v.dtype, dv_out))
