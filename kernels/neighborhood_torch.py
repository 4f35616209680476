"""Slot-major PyTorch backend of the neighbourhood attention family, with a hand-written backward.

A k x k window has k*k *slots*; slot (a, b) of query (y, x) is the key (start(y) + a, start(x) + b),
start() being the inward-shifted window origin (centred, clamped at the borders). Every slot of
every query lies inside the image, so the computation is k*k passes over the image, each on
tensors the size of the inputs:

* along one axis, "the key of slot a for every query" is a *shift* of the key tensor: queries
  r..L-r-1 (r = k // 2) read the keys a..a+L-2r-1, the first r queries all read key a, the last r
  key L-k+a. :func:`shift` builds it with one contiguous copy (a concatenation of three slices),
  :func:`shift_adjoint_` scatters gradients back with three slice additions (the border queries'
  gradients summed). Rows are shifted once per slot row a, columns once per slot;
* tensors are channels-first per pixel, (B, heads, C, H, W), so per-pixel dot products run over
  whole image planes (``torch.linalg.vecdot`` over the channel axis);
* forward: an online softmax over the slots (running max ``m`` and agreement-weighted sum ``l``,
  as a flash-attention kernel keeps them); backward: every slot's weight recomputed from (m, l).

Nothing of size pixels x k*k (let alone pixels x k*k x 9) is ever held: peak memory is a few
input-sized tensors, for SNA, H-SNA and NA alike.

Superpixel agreement of query i and key j: A_ij = sum_s pi_i(s) pi_j(s) over superpixels s in both
3x3 neighbourhoods. With D = cell(i) - cell(j), neighbour n = (ny, nx) of i is neighbour
(ny + Dy, nx + Dx) of j, so A_ij = sum_n pi_i(n) pi_j(n + D): one gather of the key's probabilities
(a zero channel 9 where n + D leaves j's 3x3 block). Dy depends only on the query row and the slot
row a, Dx only on the column and b, so the gather index is a sum of a row and a column table.
Probabilities of neighbours outside the superpixel grid are zeroed first (they name no superpixel).

kernels/neighborhood.py wraps these functions as torch.library custom ops and checks arguments.
"""
import functools
from typing import NamedTuple, Optional

import torch

from .neighborhood_reference import neighbor_superpixels, window_start


class Geometry(NamedTuple):
    rows: torch.Tensor  # (k, 3, H): 3 * (ny + Dy) for slot row a, query row y and query neighbour row ny; 100 if outside
    cols: torch.Tensor  # (k, 3, W): nx + Dx likewise; 100 if outside (row + col >= 9 -> the zero channel)
    valid: torch.Tensor  # (9, H, W): neighbour n of the pixel lies in the superpixel grid


@functools.lru_cache(maxsize=32)
def geometry(H: int, W: int, kernel_size: int, cell: int, device: torch.device) -> Geometry:
    """Index tables of the superpixel alignment, shared by every call on the same image size."""
    def axis(L):
        key = window_start(L, kernel_size, device)[None, :] + torch.arange(kernel_size, device=device)[:, None]
        delta = (torch.arange(L, device=device) // cell)[None, :] - key // cell  # (k, L)
        shifted = torch.arange(3, device=device)[None, :, None] + delta[:, None, :]  # (k, 3, L)
        return shifted, (shifted >= 0) & (shifted <= 2)
    ry, vy = axis(H)
    cx, vx = axis(W)
    rows = torch.where(vy, 3 * ry, torch.full_like(ry, 100))
    cols = torch.where(vx, cx, torch.full_like(cx, 100))
    valid = neighbor_superpixels(H, W, cell, device)[1].T.reshape(9, H, W)
    return Geometry(rows, cols, valid)


def shift(x: torch.Tensor, a: int, kernel_size: int, dim: int) -> torch.Tensor:
    """Along ``dim``: the element that slot ``a`` of every query's window reads (one copy)."""
    L, r = x.shape[dim], kernel_size // 2
    mid = x.narrow(dim, a, L - 2 * r)
    if r == 0:
        return mid
    size = list(x.shape)
    size[dim] = r
    return torch.cat([x.narrow(dim, a, 1).expand(size), mid, x.narrow(dim, L - kernel_size + a, 1).expand(size)], dim)


def shift_adjoint_(dst: torch.Tensor, g: torch.Tensor, a: int, kernel_size: int, dim: int) -> torch.Tensor:
    """dst += the adjoint of :func:`shift` applied to g (the border queries' entries summed)."""
    L, r = g.shape[dim], kernel_size // 2
    dst.narrow(dim, a, L - 2 * r).add_(g.narrow(dim, r, L - 2 * r))
    if r:
        dst.narrow(dim, a, 1).add_(g.narrow(dim, 0, r).sum(dim, keepdim=True))
        dst.narrow(dim, L - kernel_size + a, 1).add_(g.narrow(dim, L - r, r).sum(dim, keepdim=True))
    return dst


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _channels_first(x: torch.Tensor, dt) -> torch.Tensor:
    """(B, M, H, W, c) -> contiguous (B, M, c, H, W) in the compute dtype."""
    return x.to(dt).permute(0, 1, 4, 2, 3).contiguous()


class _Superpixels:
    """The agreement A (B, Hp, H, W) of every query with slot (a, b) of its window."""

    def __init__(self, probs, labels, kernel_size: int, cell: int, dt):
        self.ks, self.soft = kernel_size, probs is not None
        if self.soft:
            B, Hp, H, W, _ = probs.shape
            self.geo = geometry(H, W, kernel_size, cell, probs.device)
            self.pq = probs.to(dt).permute(0, 1, 4, 2, 3) * self.geo.valid  # (B, Hp, 9, H, W)
            self.keys = torch.cat([self.pq, self.pq.new_zeros(B, Hp, 1, H, W)], dim=2)  # + the zero channel
        else:
            self.keys = labels  # (B, Hp, H, W)

    def row(self, a: int) -> torch.Tensor:
        return shift(self.keys, a, self.ks, -2)

    def index(self, a: int, b: int) -> torch.Tensor:
        """(B, Hp, 9, H, W) channel of the key's probabilities aligned with the query's neighbour n."""
        rows, cols = self.geo.rows[a], self.geo.cols[b]
        idx = (rows[:, None, :, None] + cols[None, :, None, :]).clamp_(max=9)  # (3, 3, H, W)
        B, Hp, _, H, W = self.pq.shape
        return idx.view(1, 1, 9, H, W).expand(B, Hp, 9, H, W)

    def __call__(self, key_row: torch.Tensor, a: int, b: int):
        """A for slot (a, b) from the slot row's keys; soft: also the aligned key probabilities and the index."""
        keys = shift(key_row, b, self.ks, -1)
        if not self.soft:
            return self.keys == keys, None, None
        idx = self.index(a, b)
        aligned = torch.gather(keys, 2, idx)
        return torch.linalg.vecdot(self.pq, aligned, dim=2), aligned, idx


def attention_fwd(q, k, v, probs: Optional[torch.Tensor], labels: Optional[torch.Tensor],
                  lam: Optional[torch.Tensor], kernel_size: int, cell: int, scale: float):
    """q, k (B, M, H, W, d), v (B, M, H, W, dv); probs (B, Hp, H, W, 9) or labels (B, Hp, H, W) or
    neither; lam (B, M, H, W) or None (then the float ``scale``).

    Returns the output heads-last (B, H, W, M, dv) and stats (B, M, H, W, 2): per query the
    window's max logit and its agreement-weighted exp-sum (what the backward pass recomputes from).
    """
    B, M, H, W, _ = q.shape
    ks = kernel_size
    dt = _compute_dtype(q.dtype)
    Q, K, V = _channels_first(q, dt), _channels_first(k, dt), _channels_first(v, dt)
    lamf = None if lam is None else lam.to(dt)
    sp = None if probs is None and labels is None else _Superpixels(probs, labels, ks, cell, dt)
    m = l = None
    acc = torch.zeros_like(V)
    for a in range(ks):
        Ka, Va = shift(K, a, ks, -2), shift(V, a, ks, -2)
        sa = None if sp is None else sp.row(a)
        for b in range(ks):
            z = torch.linalg.vecdot(Q, shift(Ka, b, ks, -1), dim=2)  # (B, M, H, W)
            z = z.mul_(scale) if lamf is None else z.mul_(lamf)
            if m is None:
                m = z.clone()
            else:  # rescale what the earlier slots summed to the new running max
                m_new = torch.maximum(m, z)
                alpha = m.sub_(m_new).exp_()
                l.mul_(alpha)
                acc.mul_(alpha[:, :, None])
                m = m_new
            e = z.sub_(m).exp_()
            if sp is not None:
                e.mul_(sp(sa, a, b)[0])  # Hp = 1 broadcasts over the M heads
            l = e.clone() if l is None else l.add_(e)
            acc.addcmul_(e[:, :, None], shift(Va, b, ks, -1))
    # A query whose window has zero agreement gets output 0.
    linv = torch.where(l > 0, l.reciprocal(), torch.zeros_like(l))
    out = acc.mul_(linv[:, :, None]).permute(0, 3, 4, 1, 2).contiguous()
    return out.to(q.dtype), torch.stack([m, l], dim=-1)


def attention_bwd(grad_out, out, stats, q, k, v, probs, labels, lam, kernel_size: int, cell: int, scale: float):
    """grad_out and out heads-last (B, H, W, M, dv). Returns [dq, dk, dv] + [dprobs if probs] +
    [dlam if lam], in the inputs' shapes."""
    B, M, H, W, _ = q.shape
    ks = kernel_size
    dt = _compute_dtype(q.dtype)
    Q, K, V = _channels_first(q, dt), _channels_first(k, dt), _channels_first(v, dt)
    G = grad_out.to(dt).permute(0, 3, 4, 1, 2).contiguous()  # (B, M, dv, H, W)
    delta = torch.linalg.vecdot(G, out.to(dt).permute(0, 3, 4, 1, 2), dim=2)  # <g_i, out_i>, (B, M, H, W)
    m, l = stats[..., 0].to(dt), stats[..., 1].to(dt)
    linv = torch.where(l > 0, l.reciprocal(), torch.zeros_like(l))
    lamf = None if lam is None else lam.to(dt)
    sp = None if probs is None and labels is None else _Superpixels(probs, labels, ks, cell, dt)
    soft = probs is not None
    dQ, dK, dV = torch.zeros_like(Q), torch.zeros_like(K), torch.zeros_like(V)
    dlam = None if lam is None else torch.zeros_like(m)
    if soft:
        Hp = probs.shape[1]
        dpq = torch.zeros_like(sp.pq)  # query side, (B, Hp, 9, H, W)
        dkeys = torch.zeros_like(sp.keys)  # key side, (B, Hp, 10, H, W)
    for a in range(ks):
        Ka, Va = shift(K, a, ks, -2), shift(V, a, ks, -2)
        dKa, dVa = torch.zeros_like(Ka), torch.zeros_like(Va)
        if sp is not None:
            sa = sp.row(a)
            dsa = torch.zeros_like(sa) if soft else None
        for b in range(ks):
            Kab = shift(Ka, b, ks, -1)
            raw = torch.linalg.vecdot(Q, Kab, dim=2)
            p = (raw * scale if lamf is None else raw * lamf).sub_(m).exp_().mul_(linv)  # e_ij / Z_i
            if sp is not None:
                agree, aligned, idx = sp(sa, a, b)
                w = p * agree
            else:
                w = p
            t = torch.linalg.vecdot(G, shift(Va, b, ks, -1), dim=2).sub_(delta)  # dL/dw_ij - delta_i
            dz = w * t  # dL/dlogit_ij
            if dlam is not None:
                dlam.addcmul_(dz, raw)
            ds = dz.mul_(scale) if lamf is None else dz.mul_(lamf)
            dQ.addcmul_(ds[:, :, None], Kab)
            shift_adjoint_(dKa, ds[:, :, None] * Q, b, ks, -1)
            shift_adjoint_(dVa, w[:, :, None] * G, b, ks, -1)
            if soft:
                da = t.mul_(p)  # dL/dA_ij
                if Hp != M:
                    da = da.sum(dim=1, keepdim=True)
                dpq.addcmul_(da[:, :, None], aligned)
                dkey = torch.zeros_like(sa).scatter_add_(2, idx, da[:, :, None] * sp.pq)
                shift_adjoint_(dsa, dkey, b, ks, -1)
        shift_adjoint_(dK, dKa, a, ks, -2)
        shift_adjoint_(dV, dVa, a, ks, -2)
        if soft:
            shift_adjoint_(dkeys, dsa, a, ks, -2)

    def back(x, like):  # (B, M, c, H, W) -> the input's (B, M, H, W, c) shape and dtype
        return x.permute(0, 1, 3, 4, 2).to(like.dtype)
    grads = [back(dQ, q), back(dK, k), back(dV, v)]
    if soft:
        dprobs = (dpq + dkeys[:, :, :9]) * sp.geo.valid
        grads.append(back(dprobs, probs))
    if lam is not None:
        grads.append(dlam.to(lam.dtype))
    return grads
