"""Slot-row-major PyTorch backend of the neighbourhood attention family, with a hand-written backward.

A k x k window has k*k *slots*; slot (a, b) of query (y, x) is the key (start(y) + a, start(x) + b),
start() being the inward-shifted window origin (centred, clamped at the borders). Every slot of
every query lies inside the image, so the computation is k passes over the image, one per slot
row a, each handling the k slots (a, 0..k-1) at once on tensors k times the size of the inputs:

* along one axis, "the key of slot a for every query" is a *shift* of the key tensor: queries
  r..L-r-1 (r = k // 2) read the keys a..a+L-2r-1, the first r queries all read key a, the last r
  key L-k+a. :func:`shift` builds it for the rows with one contiguous copy (a concatenation of three
  slices), :func:`colstack` for all k column slots at once (an ``unfold`` view of the interior and
  the two border columns); their adjoints add the gradients back slice by slice (the border
  queries' gradients summed), so no scatter over pixels is needed;
* tensors are channels-first per pixel, (B, heads, C, H, W), so per-pixel dot products run over
  whole image planes (``torch.linalg.vecdot`` over the channel axis);
* forward: an online softmax over the slot rows (running max ``m`` and agreement-weighted sum
  ``l``, as a flash-attention kernel keeps them); backward: every weight recomputed from (m, l).

Nothing of size pixels x k*k (let alone pixels x k*k x 9) is ever held: the largest temporaries
are k times the size of the inputs (one slot row), for SNA, H-SNA and NA alike.

Superpixel agreement of query i and key j: A_ij = sum_s pi_i(s) pi_j(s) over superpixels s in both
3x3 neighbourhoods. A pixel's 9 neighbours lie in 9 distinct *classes* c = (sy mod 3, sx mod 3)
(three consecutive rows and columns), so with Phi_c(p) = pi_p(its class-c neighbour), re-indexed
once per call (a per-pixel permutation of the 9 channels),

    A_ij = sum_c Phi_c(i) Phi_c(j) 1[i's and j's class-c neighbours are the same superpixel],

and that indicator is a product of a row table (query row, slot row a) and a column table (query
column, slot column b): per slot row, one shifted copy of Phi and a 9-channel dot product, no
gathers. Probabilities of neighbours outside the superpixel grid are zeroed first (they name no
superpixel).

kernels/neighborhood.py wraps these functions as torch.library custom ops and checks arguments.
"""
import functools
from typing import NamedTuple, Optional

import torch

from .neighborhood_reference import neighbor_superpixels, window_start
from .torch_backend import accumulate_dtype


class Geometry(NamedTuple):
    perm_y: torch.Tensor  # (3, H): neighbour row ny (0..2) holding row class u, per pixel row
    perm_x: torch.Tensor  # (3, W): likewise for columns
    inv_y: torch.Tensor  # (3, H): row class u of neighbour row ny, per pixel row
    inv_x: torch.Tensor  # (3, W)
    same_y: torch.Tensor  # (k, 3, H): 1 where query row y and its slot-row-a key share their class-u superpixel row
    same_x: torch.Tensor  # (3, k, W): likewise for class v, slot column b, query column x
    valid: torch.Tensor  # (9, H, W): neighbour n of the pixel lies in the superpixel grid


@functools.lru_cache(maxsize=32)
def geometry(H: int, W: int, kernel_size: int, cell: int, device: torch.device, dtype: torch.dtype) -> Geometry:
    """Index tables of the superpixel classes, shared by every call on the same image size."""
    def axis(L):
        c = (torch.arange(L, device=device) // cell)[None, :]
        u = torch.arange(3, device=device)[:, None]
        perm, inv = (u - c + 1) % 3, (c + u - 1) % 3
        s = c - 1 + (u - c + 1) % 3  # (3, L): the class-u superpixel row of each pixel row
        key = window_start(L, kernel_size, device)[None, :] + torch.arange(kernel_size, device=device)[:, None]
        same = (s[None, :, :] == s[:, key].transpose(0, 1)).to(dtype)  # (k, 3, L)
        return perm, inv, same
    py, iy, sy = axis(H)
    px, ix, sx = axis(W)
    valid = neighbor_superpixels(H, W, cell, device)[1].T.reshape(9, H, W)
    return Geometry(py, px, iy, ix, sy, sx.transpose(0, 1).contiguous(), valid)


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


def colstack(x: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """(..., W) -> (..., k, W): entry [..., b, x] is the column slot b of query column x reads (one copy)."""
    W, r = x.shape[-1], kernel_size // 2
    mid = x.unfold(-1, W - 2 * r, 1)  # (..., k, W - 2r): the interior queries, a view
    if r == 0:
        return mid
    size = x.shape[:-1] + (kernel_size, r)
    return torch.cat([x[..., :kernel_size, None].expand(size), mid, x[..., W - kernel_size:, None].expand(size)], -1)


def colstack_adjoint(g: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """Adjoint of :func:`colstack`: (..., k, W) -> (..., W)."""
    W, r = g.shape[-1], kernel_size // 2
    out = g.new_zeros(g.shape[:-2] + (W,))
    for b in range(kernel_size):
        out[..., b:b + W - 2 * r] += g[..., b, r:W - r]
    if r:
        out[..., :kernel_size] += g[..., :r].sum(-1)
        out[..., W - kernel_size:] += g[..., W - r:].sum(-1)
    return out


def window(x: torch.Tensor, a: int, kernel_size: int) -> torch.Tensor:
    """(..., H, W) -> (..., H, k, W): what the slots (a, 0..k-1) of every query read."""
    return colstack(shift(x, a, kernel_size, -2), kernel_size)


def window_adjoint_(dst: torch.Tensor, g: torch.Tensor, a: int, kernel_size: int) -> torch.Tensor:
    """dst (..., H, W) += the adjoint of :func:`window` applied to g (..., H, k, W)."""
    return shift_adjoint_(dst, colstack_adjoint(g, kernel_size), a, kernel_size, -2)


def _channels_first(x: torch.Tensor, dt) -> torch.Tensor:
    """(B, M, H, W, c) -> contiguous (B, M, c, H, W) in the compute dtype."""
    return x.to(dt).permute(0, 1, 4, 2, 3).contiguous()


def _permute9(x: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """(B, Hp, 3, 3, H, W) -> the same with entry [u, v, y, x] = x[rows[u, y], cols[v, x], y, x]."""
    B, Hp, _, _, H, W = x.shape
    x = torch.gather(x, 2, rows.view(1, 1, 3, 1, H, 1).expand(B, Hp, 3, 3, H, W))
    return torch.gather(x, 3, cols.view(1, 1, 1, 3, 1, W).expand(B, Hp, 3, 3, H, W))


class _Superpixels:
    """The agreement A (B, Hp, H, k, W) of every query with the slots of one slot row."""

    def __init__(self, probs, labels, kernel_size: int, cell: int, dt):
        self.ks, self.soft = kernel_size, probs is not None
        if self.soft:
            B, Hp, H, W, _ = probs.shape
            self.geo = geometry(H, W, kernel_size, cell, probs.device, dt)
            pq = (probs.to(dt).permute(0, 1, 4, 2, 3) * self.geo.valid).view(B, Hp, 3, 3, H, W)
            self.phi = _permute9(pq, self.geo.perm_y, self.geo.perm_x)  # by class, (B, Hp, 3, 3, H, W)
        else:
            self.labels = labels  # (B, Hp, H, W)

    def _factors(self, a: int):
        """Query side (B, Hp, 9, H, 1, W) and key side (B, Hp, 9, H, k, W) of A's class sum."""
        geo = self.geo
        B, Hp, _, _, H, W = self.phi.shape
        q = (self.phi * geo.same_y[a].view(1, 1, 3, 1, H, 1)).view(B, Hp, 9, H, 1, W)
        k = (window(self.phi, a, self.ks) * geo.same_x.view(1, 1, 1, 3, 1, self.ks, W)).view(B, Hp, 9, H, self.ks, W)
        return q, k

    def __call__(self, a: int) -> torch.Tensor:
        if not self.soft:
            return self.labels.unsqueeze(-2) == window(self.labels, a, self.ks)
        q, k = self._factors(a)
        return torch.linalg.vecdot(q, k, dim=2)

    def backward_(self, dphi: torch.Tensor, da: torch.Tensor, a: int):
        """dphi (B, Hp, 3, 3, H, W) += the gradient of slot row a's agreement, given dL/dA (B, Hp, H, k, W)."""
        geo = self.geo
        B, Hp, _, _, H, W = self.phi.shape
        q, k = self._factors(a)
        dq = torch.linalg.vecdot(da.unsqueeze(2), k, dim=-2).view(B, Hp, 3, 3, H, W)
        dphi.add_(dq * geo.same_y[a].view(1, 1, 3, 1, H, 1))
        dk = (da.unsqueeze(2) * q).view(B, Hp, 3, 3, H, self.ks, W) * geo.same_x.view(1, 1, 1, 3, 1, self.ks, W)
        window_adjoint_(dphi, dk, a, self.ks)

    def probs_grad(self, dphi: torch.Tensor) -> torch.Tensor:
        """Gradient by class (B, Hp, 3, 3, H, W) -> by neighbour (B, Hp, 9, H, W), 0 outside the grid."""
        B, Hp, _, _, H, W = dphi.shape
        return _permute9(dphi, self.geo.inv_y, self.geo.inv_x).reshape(B, Hp, 9, H, W) * self.geo.valid


def attention_fwd(q, k, v, probs: Optional[torch.Tensor], labels: Optional[torch.Tensor],
                  lam: Optional[torch.Tensor], kernel_size: int, cell: int, scale: float):
    """q, k (B, M, H, W, d), v (B, M, H, W, dv); probs (B, Hp, H, W, 9) or labels (B, Hp, H, W) or
    neither; lam (B, M, H, W) or None (then the float ``scale``).

    Returns the output heads-last (B, H, W, M, dv) and stats (B, M, H, W, 2): per query the
    window's max logit and its agreement-weighted exp-sum (what the backward pass recomputes from).
    """
    ks = kernel_size
    dt = accumulate_dtype(q.dtype)
    Q, K, V = _channels_first(q, dt), _channels_first(k, dt), _channels_first(v, dt)
    Qs = Q.unsqueeze(-2)  # (B, M, d, H, 1, W) against (B, M, d, H, k, W)
    lams = None if lam is None else lam.to(dt).unsqueeze(-2)
    sp = None if probs is None and labels is None else _Superpixels(probs, labels, ks, cell, dt)
    m = l = None
    acc = torch.zeros_like(V)
    for a in range(ks):
        z = torch.linalg.vecdot(Qs, window(K, a, ks), dim=2)  # (B, M, H, k, W)
        z = z.mul_(scale) if lams is None else z.mul_(lams)
        agree = None if sp is None else sp(a)  # (B, Hp, H, k, W); Hp = 1 broadcasts over the M heads
        # The running max runs over agreeing keys only: the weights are the same, but the sum l of
        # the agreeing terms never underflows (keys without agreement may have far larger logits).
        zmax = (z if agree is None else z.masked_fill(agree <= 0, float('-inf'))).amax(dim=-2)
        if m is None:
            m = zmax
        else:  # rescale what the earlier slot rows summed to the new running max
            m_new = torch.maximum(m, zmax)
            alpha = torch.where(torch.isinf(m), 0.0, (m - m_new).exp())  # m = -inf: nothing summed yet
            l.mul_(alpha)
            acc.mul_(alpha[:, :, None])
            m = m_new
        # exp(z - m) <= 1 for agreeing keys; the others are multiplied by 0, clamp keeps them finite
        e = z.sub_(_finite(m).unsqueeze(-2)).clamp_(max=0).exp_()
        if agree is not None:
            e.mul_(agree)
        l = e.sum(dim=-2) if l is None else l.add_(e.sum(dim=-2))
        acc.add_(torch.linalg.vecdot(e.unsqueeze(2), window(V, a, ks), dim=-2))
    # A query whose window has zero agreement (l = 0) gets output 0.
    out = (acc / _positive(l)[:, :, None]).mul_((l > 0)[:, :, None]).permute(0, 3, 4, 1, 2).contiguous()
    return out.to(q.dtype), torch.stack([_finite(m), l], dim=-1)


def _finite(m: torch.Tensor) -> torch.Tensor:
    """The running max with -inf (no agreeing key) replaced by 0."""
    return torch.where(torch.isinf(m), 0.0, m)


def _positive(l: torch.Tensor) -> torch.Tensor:
    """The sum with 0 (no agreeing key) replaced by 1, to divide by."""
    return torch.where(l > 0, l, 1.0)


# Backward: exp(z - m) of a key without agreement (which can exceed the agreeing keys' max by any
# amount) enters only dL/dA; it saturates at exp(80) instead of overflowing to inf (inf * 0 = nan).
GRAD_EXP_CLAMP = 80.0


def attention_bwd(grad_out, out, stats, q, k, v, probs, labels, lam, kernel_size: int, cell: int, scale: float):
    """grad_out and out heads-last (B, H, W, M, dv). Returns [dq, dk, dv] + [dprobs if probs] +
    [dlam if lam], in the inputs' shapes."""
    M = q.shape[1]
    ks = kernel_size
    dt = accumulate_dtype(q.dtype)
    Q, K, V = _channels_first(q, dt), _channels_first(k, dt), _channels_first(v, dt)
    Qs = Q.unsqueeze(-2)
    G = grad_out.to(dt).permute(0, 3, 4, 1, 2).contiguous()  # (B, M, dv, H, W)
    delta = torch.linalg.vecdot(G, out.to(dt).permute(0, 3, 4, 1, 2), dim=2).unsqueeze(-2)  # <g_i, out_i>
    m, l = stats[..., 0].to(dt).unsqueeze(-2), stats[..., 1].to(dt)
    lpos, l_safe = (l > 0).unsqueeze(-2), _positive(l).unsqueeze(-2)
    lams = None if lam is None else lam.to(dt).unsqueeze(-2)
    sp = None if probs is None and labels is None else _Superpixels(probs, labels, ks, cell, dt)
    soft = probs is not None
    dQ, dK, dV = torch.zeros_like(Q), torch.zeros_like(K), torch.zeros_like(V)
    dlam = None if lam is None else torch.zeros_like(l)
    if soft:
        Hp = probs.shape[1]
        dphi = torch.zeros_like(sp.phi)
    for a in range(ks):
        Ka = window(K, a, ks)  # (B, M, d, H, k, W)
        raw = torch.linalg.vecdot(Qs, Ka, dim=2)  # (B, M, H, k, W)
        p = (raw * scale if lams is None else raw * lams).sub_(m).clamp_(max=GRAD_EXP_CLAMP).exp_()
        p = p.div_(l_safe).mul_(lpos)  # e_ij / Z_i (0 where Z_i = 0)
        if sp is not None:
            w = p * sp(a)
        else:
            w = p
        t = torch.linalg.vecdot(G.unsqueeze(-2), window(V, a, ks), dim=2).sub_(delta)  # dL/dw_ij - delta_i
        dz = w * t  # dL/dlogit_ij
        if dlam is not None:
            dlam.add_((dz * raw).sum(dim=-2))
        ds = dz.mul_(scale) if lams is None else dz.mul_(lams)
        dQ.add_(torch.linalg.vecdot(ds.unsqueeze(2), Ka, dim=-2))
        window_adjoint_(dK, ds.unsqueeze(2) * Qs, a, ks)
        window_adjoint_(dV, w.unsqueeze(2) * G.unsqueeze(-2), a, ks)
        if soft:
            da = t.mul_(p)  # dL/dA_ij
            if Hp != M:
                da = da.sum(dim=1, keepdim=True)
            sp.backward_(dphi, da, a)

    def back(x, like):  # (B, M, c, H, W) -> the input's (B, M, H, W, c) shape and dtype
        return x.permute(0, 1, 3, 4, 2).to(like.dtype)
    grads = [back(dQ, q), back(dK, k), back(dV, v)]
    if soft:
        grads.append(back(sp.probs_grad(dphi), probs))
    if lam is not None:
        grads.append(dlam.to(lam.dtype))
    return grads
