"""Slot-major PyTorch backend of the neighbourhood attention family, with a hand-written backward.

A k x k window has K = k*k *slots*; slot s = a * k + b of query (y, x) is the key
(start_y(y) + a, start_x(x) + b), start_* being the inward-shifted window origin. Every slot
of every query lies inside the image, so the whole computation is K passes over the image,
each on tensors the size of the inputs:

* forward: gather the slot's keys and values (one ``index_select`` each), a per-pixel dot
  product, and an online softmax over the slots (running max ``m`` and sum ``l``, as a flash
  attention kernel keeps them) re-weighted by the slot's superpixel agreement;
* backward: recompute each slot's weight from the saved (m, l) and scatter the key-side
  gradients back with ``index_add_`` (the slot map is many-to-one at the borders).

Nothing of size pixels x K (let alone pixels x K x 9) is ever held: peak memory is a few
input-sized tensors, the same for SNA, H-SNA and NA.

Superpixel agreement of query i and key j: A_ij = sum_s pi_i(s) pi_j(s) over superpixels s in
both 3x3 neighbourhoods. With D = cell(i) - cell(j), neighbour n of i is neighbour n + D of j
(in 3x3 coordinates), so A_ij = sum_n pi_i(n) pi_j(n + D): one gather of the key's 9
probabilities through a small (7*7, 9) table indexed by D (index 9 -> a zero column when n + D
falls outside j's 3x3 block). Probabilities of neighbours outside the superpixel grid are
zeroed first (they name no superpixel).

kernels/neighborhood.py wraps these functions as torch.library custom ops and checks arguments.
"""
import functools
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F

from .neighborhood_reference import neighbor_superpixels, window_start


class Geometry(NamedTuple):
    kidx: torch.Tensor  # (K, P) flat key index of slot s of each query
    code: Optional[torch.Tensor]  # (K, P) index into ``table`` of the query/key cell difference
    table: Optional[torch.Tensor]  # (49, 9): neighbour n of the query -> neighbour of the key (9: none)
    valid: Optional[torch.Tensor]  # (P, 9) neighbour n of the pixel lies in the superpixel grid


@functools.lru_cache(maxsize=32)
def geometry(H: int, W: int, kernel_size: int, cell: int, device: torch.device) -> Geometry:
    """Index tensors shared by every call on the same image size (``cell`` 0: no superpixels)."""
    a = torch.arange(kernel_size, device=device)
    ky = window_start(H, kernel_size, device)[None, :] + a[:, None]  # (k, H): row of slot row a
    kx = window_start(W, kernel_size, device)[None, :] + a[:, None]  # (k, W)
    K, P = kernel_size * kernel_size, H * W
    kidx = (ky[:, None, :, None] * W + kx[None, :, None, :]).reshape(K, P)
    if not cell:
        return Geometry(kidx, None, None, None)
    dy = ((torch.arange(H, device=device) // cell)[None, :] - ky // cell).clamp(-3, 3) + 3  # (k, H)
    dx = ((torch.arange(W, device=device) // cell)[None, :] - kx // cell).clamp(-3, 3) + 3
    code = (dy[:, None, :, None] * 7 + dx[None, :, None, :]).reshape(K, P)
    d = torch.arange(49, device=device)
    n = torch.arange(9, device=device)
    my = n[None, :] // 3 + d[:, None] // 7 - 3
    mx = n[None, :] % 3 + d[:, None] % 7 - 3
    inside = (my >= 0) & (my <= 2) & (mx >= 0) & (mx <= 2)
    table = torch.where(inside, my * 3 + mx, torch.full_like(my, 9))
    return Geometry(kidx, code, table, neighbor_superpixels(H, W, cell, device)[1])


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


class _Agreement:
    """Per-slot superpixel agreement A (B, Hp, P) from soft probabilities or hard labels."""

    def __init__(self, probs, labels, geo: Geometry, dt):
        self.geo = geo
        self.soft = probs is not None
        if self.soft:
            B, Hp, H, W, _ = probs.shape
            self.pq = probs.reshape(B, Hp, H * W, 9).to(dt) * geo.valid  # (B, Hp, P, 9)
            self.flat = F.pad(self.pq, (0, 1)).view(B, Hp, H * W * 10)  # + a zero column per pixel
        else:
            self.lab = labels.reshape(labels.shape[0], labels.shape[1], -1)

    def key_index(self, s: int) -> torch.Tensor:
        """(B, Hp, P * 9) index into ``flat``: the key's probability of the query's neighbour n."""
        geo = self.geo
        idx = geo.kidx[s][:, None] * 10 + geo.table[geo.code[s]]  # (P, 9)
        B, Hp = self.pq.shape[:2]
        return idx.view(1, 1, -1).expand(B, Hp, -1)

    def __call__(self, s: int):
        """A for slot s, and (soft) the key probabilities aligned with the query's neighbours and their index."""
        if not self.soft:
            return (self.lab == self.lab.index_select(2, self.geo.kidx[s])), None, None
        idx = self.key_index(s)
        pk = torch.gather(self.flat, 2, idx).view(self.pq.shape)
        return torch.linalg.vecdot(self.pq, pk), pk, idx


def _flat(x: torch.Tensor, dt) -> torch.Tensor:
    B, M, H, W, c = x.shape
    return x.reshape(B, M, H * W, c).to(dt)


def attention_fwd(q, k, v, probs: Optional[torch.Tensor], labels: Optional[torch.Tensor],
                  lam: Optional[torch.Tensor], kernel_size: int, cell: int, scale: float):
    """q, k (B, M, H, W, d), v (B, M, H, W, dv); probs (B, Hp, H, W, 9) or labels (B, Hp, H, W) or
    neither; lam (B, M, H, W) or None (then the float ``scale``).

    Returns the output heads-last (B, H, W, M, dv) and stats (B, M, H, W, 2): per query the
    window's max logit and its agreement-weighted exp-sum (what the backward pass recomputes from).
    """
    B, M, H, W, d = q.shape
    dv = v.shape[-1]
    dt = _compute_dtype(q.dtype)
    qf, kf, vf = _flat(q, dt), _flat(k, dt), _flat(v, dt)
    lamf = None if lam is None else lam.reshape(B, M, H * W).to(dt)
    geo = geometry(H, W, kernel_size, cell if probs is not None else 0, q.device)
    agree = None if probs is None and labels is None else _Agreement(probs, labels, geo, dt)
    m = l = None
    acc = qf.new_zeros(B, M, H * W, dv)
    for s in range(kernel_size * kernel_size):
        idx = geo.kidx[s]
        z = torch.linalg.vecdot(qf, kf.index_select(2, idx))
        z = z.mul_(scale) if lamf is None else z.mul_(lamf)
        if m is None:
            m = z.clone()
        else:  # rescale what the earlier slots summed to the new running max
            m_new = torch.maximum(m, z)
            alpha = m.sub_(m_new).exp_()
            l.mul_(alpha)
            acc.mul_(alpha[..., None])
            m = m_new
        e = z.sub_(m).exp_()
        if agree is not None:
            e.mul_(agree(s)[0])  # Hp = 1 broadcasts over the M heads
        l = e.clone() if l is None else l.add_(e)
        acc.addcmul_(e[..., None], vf.index_select(2, idx))
    # A query whose window has zero agreement gets output 0.
    linv = torch.where(l > 0, l.reciprocal(), torch.zeros_like(l))
    out = acc.mul_(linv[..., None]).view(B, M, H, W, dv).permute(0, 2, 3, 1, 4).contiguous()
    return out.to(q.dtype), torch.stack([m, l], dim=-1).view(B, M, H, W, 2)


def attention_bwd(grad_out, out, stats, q, k, v, probs, labels, lam, kernel_size: int, cell: int, scale: float):
    """grad_out and out heads-last (B, H, W, M, dv). Returns [dq, dk, dv] + [dprobs if probs] +
    [dlam if lam], in the inputs' shapes."""
    B, M, H, W, d = q.shape
    dv = v.shape[-1]
    P = H * W
    dt = _compute_dtype(q.dtype)
    qf, kf, vf = _flat(q, dt), _flat(k, dt), _flat(v, dt)
    g = grad_out.to(dt).permute(0, 3, 1, 2, 4).reshape(B, M, P, dv)
    delta = torch.linalg.vecdot(g, out.to(dt).permute(0, 3, 1, 2, 4).reshape(B, M, P, dv))  # <g_i, out_i>
    m = stats[..., 0].reshape(B, M, P).to(dt)
    l = stats[..., 1].reshape(B, M, P).to(dt)
    linv = torch.where(l > 0, l.reciprocal(), torch.zeros_like(l))
    lamf = None if lam is None else lam.reshape(B, M, P).to(dt)
    geo = geometry(H, W, kernel_size, cell if probs is not None else 0, q.device)
    agree = None if probs is None and labels is None else _Agreement(probs, labels, geo, dt)
    dq, dk, dvv = torch.zeros_like(qf), torch.zeros_like(kf), torch.zeros_like(vf)
    dlam = None if lam is None else torch.zeros_like(lamf)
    if probs is not None:
        Hp = probs.shape[1]
        dpq = torch.zeros_like(agree.pq)  # query-side gradient, (B, Hp, P, 9)
        dpk = torch.zeros_like(agree.flat)  # key-side gradient, (B, Hp, P * 10)
    for s in range(kernel_size * kernel_size):
        idx = geo.kidx[s]
        kj, vj = kf.index_select(2, idx), vf.index_select(2, idx)
        raw = torch.linalg.vecdot(qf, kj)
        p = (raw * scale if lamf is None else raw * lamf).sub_(m).exp_().mul_(linv)  # e_ij / Z_i
        if agree is not None:
            a, pk, pidx = agree(s)
            w = p * a
        else:
            w = p
        t = torch.linalg.vecdot(g, vj).sub_(delta)  # dL/dw_ij - delta_i
        dz = w * t  # dL/dlogit_ij
        if dlam is not None:
            dlam.addcmul_(dz, raw)
        ds = dz.mul_(scale) if lamf is None else dz.mul_(lamf)
        dq.addcmul_(ds[..., None], kj)
        dk.index_add_(2, idx, ds[..., None] * qf)
        dvv.index_add_(2, idx, w[..., None] * g)
        if probs is not None:
            da = t.mul_(p)  # dL/dA_ij
            if Hp != M:
                da = da.sum(dim=1, keepdim=True)
            dpq.addcmul_(da[..., None], pk)
            dpk.scatter_add_(2, pidx, (da[..., None] * agree.pq).view(pidx.shape))
    grads = [dq.view(q.shape).to(q.dtype), dk.view(k.shape).to(k.dtype), dvv.view(v.shape).to(v.dtype)]
    if probs is not None:
        dprobs = (dpq + dpk.view(B, Hp, P, 10)[..., :9]) * geo.valid
        grads.append(dprobs.view(probs.shape).to(probs.dtype))
    if lam is not None:
        grads.append(dlam.view(lam.shape).to(lam.dtype))
    return grads
