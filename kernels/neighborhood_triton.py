"""Fused Triton kernels for the neighbourhood attention family (NA, SNA, H-SNA).

Same arguments, layouts and contracts as kernels/neighborhood_torch.py: q, k (B, M, H, W, d), v
(B, M, H, W, dv) with any batch/head/pixel strides (rows of channels contiguous); output
heads-last (B, H, W, M, dv); ``stats`` (B, M, H, W, 2) = per query the window's max logit m
and agreement-weighted exp-sum l (float32, float64 for float64 inputs); the backward pass
recomputes every weight from them (flash-attention style), so nothing of size pixels x k*k is
ever stored, on chip or off.

Programs (one flattened launch axis):

* forward and dq: one per (image, head, 8 x 8 query tile). The keys its queries can see form a
  (8 + k - 1)^2 region (windows shift inward at the borders, so the region only shrinks
  there); it is walked in 4 x 16-key chunks, each one ``tl.dot`` for the logits, an online
  softmax (running max and sum) masked to each query's window, and one ``tl.dot`` for the values.
* dk/dv: one per (image, head, 8 x 8 key tile), walking the queries whose windows contain one
  of its keys (a range computed in closed form; larger at the borders, where several queries
  share the border window) in 4 x 16-query chunks. Every program owns its outputs: no atomics,
  deterministic.

Superpixel agreement without the (pixels x k^2 x 9) tensor: A_ij = sum_s pi_i(s) pi_j(s) is a
dot product over superpixels. A tile's pixels only have probability on the superpixels around
its cells, a few rows and columns of the superpixel grid (SY x SX, SY = (8 + cell - 2) // cell + 3);
so each program lays its tile's probabilities on that local basis, ``Pi`` (64 x BS, 9 non-zeros a
row), loads the chunk's probabilities on the same basis (entries outside the basis cannot meet
the tile's) and gets the chunk's agreement as one ``tl.dot(Pi_tile, Pi_chunk^T)``. Gradients
come back the same way: dPi = dA @ Pi_other, scattered to the 9 neighbour slots by the same
pointer tile (each slot is one basis column, so a masked store, no atomics). The query-side part
of dprobs is written by the dq kernel, the key-side part added by the dk/dv kernel (a later
launch); per head, summed over heads on the host when the heads share one probability map.

Registers (no GPU here, so untimed): ptxas -v for sm_90 with 8 warps, k = 7, cell 4, per-pixel
lambda: forward no spills, dq <= ~200 bytes, dk/dv ~0.1 KB at head dim 16 and 0.7-1 KB at 32 (with
4 warps 2-17 KB); coordinates and the 2-D window masks are int32, only pointer offsets are widened
to int64.

Arithmetic is fp32 (fp64 for fp64 inputs); tiles are upcast before ``tl.dot``. fp32/fp64 dots
use ``input_precision='ieee'``; fp16/bf16 inputs use 'tf32' (products of input values are exact,
probabilities and weights are rounded to tf32 as operands). ``scale`` travels as an fp32 pair
(hi, lo) as in kernels/triton_backend.py.
"""
from typing import Optional

import torch
import triton
import triton.language as tl

# Launch helpers shared with the local cross-attention kernels.
from .torch_backend import accumulate_dtype
from .triton_backend import _block, _device, _empty, _split

TILE = 8  # query / key tiles are TILE x TILE pixels
CHUNK_ROWS, CHUNK_COLS = 4, 16  # the other side is walked in chunks of 4 x 16 pixels
MODE_NA, MODE_SOFT, MODE_HARD = 0, 1, 2
# Backward: exp(z - m) of a key without agreement (its logit may exceed the agreeing keys' max m by
# any amount) enters only dL/dA; it saturates at exp(80) instead of overflowing (inf * 0 = nan).
GRAD_EXP_CLAMP = tl.constexpr(80.0)


# --- index helpers ---------------------------------------------------------------------------

@triton.jit
def _start(i, L, KS: tl.constexpr):
    """Window origin of coordinate i: centred, shifted inward at the borders (NATTEN)."""
    return tl.minimum(tl.maximum(i - KS // 2, 0), L - KS)


@triton.jit
def _tile(pid, H, W, TY: tl.constexpr, TX: tl.constexpr):
    """Program ``pid`` -> (image-head index bm, tile origin y0, x0, pixel rows y, x, inside the image).
    Coordinates are int32 (the 2-D masks built from them stay cheap); offsets are widened to int64."""
    ntx = tl.cdiv(W, TX)
    per_image = tl.cdiv(H, TY) * ntx
    bm = pid // per_image
    t = pid % per_image
    y0 = (t // ntx) * TY
    x0 = (t % ntx) * TX
    r = tl.arange(0, TY * TX)
    y = y0 + r // TX
    x = x0 + r % TX
    return bm, y0, x0, y, x, (y < H) & (x < W)


@triton.jit
def _chunk(cy0, cx0, ylim, xlim, CR: tl.constexpr, CC: tl.constexpr):
    """A CR x CC chunk of pixels from (cy0, cx0): rows y, x and the mask y < ylim, x < xlim."""
    c = tl.arange(0, CR * CC)
    y = cy0 + c // CC
    x = cx0 + c % CC
    return y, x, (y < ylim) & (x < xlim)


@triton.jit
def _basis(probs_ptr, pix, py, px, pvalid, sy0, sx0, h, w,
           CELL: tl.constexpr, SY: tl.constexpr, SX: tl.constexpr, BS: tl.constexpr):
    """Pointers to, and mask of, the (rows, BS) probabilities of pixels ``pix`` on the local basis:
    column b is superpixel (sy0 + b // SX, sx0 + b % SX); a pixel's entry is its probability of that
    superpixel if it is one of its 9 neighbours and inside the grid, else masked (0)."""
    b = tl.arange(0, BS)
    sy = sy0 + b // SX
    sx = sx0 + b % SX
    bvalid = (b < SY * SX) & (sy >= 0) & (sy < h) & (sx >= 0) & (sx < w)
    ddy = sy[None, :] - (py // CELL)[:, None]
    ddx = sx[None, :] - (px // CELL)[:, None]
    ok = pvalid[:, None] & bvalid[None, :] & (ddy >= -1) & (ddy <= 1) & (ddx >= -1) & (ddx <= 1)
    return probs_ptr + pix.to(tl.int64)[:, None] * 9 + ((ddy + 1) * 3 + (ddx + 1)), ok


@triton.jit
def _rows(ptr, pix, valid, stride, cols, n):
    """(rows, BC) tile of a pixel-major tensor: row pix at ``ptr + pix * stride``, channels ``cols < n``."""
    return tl.load((ptr + pix.to(tl.int64) * stride)[:, None] + cols[None, :], mask=valid[:, None] & (cols < n)[None, :],
                   other=0.0)


# --- forward ---------------------------------------------------------------------------------

@triton.jit
def _fwd_kernel(
        q_ptr, k_ptr, v_ptr, probs_ptr, labels_ptr, lam_ptr, out_ptr, stats_ptr,
        H, W, M, D, DV, h, w,
        sqb, sqm, sqp, skb, skm, skp, svb, svm, svp, spb, sph, slb, slh,
        scale, scale_lo,
        KS: tl.constexpr, CELL: tl.constexpr, MODE: tl.constexpr, HAS_LAM: tl.constexpr,
        TY: tl.constexpr, TX: tl.constexpr, CR: tl.constexpr, CC: tl.constexpr,
        SY: tl.constexpr, SX: tl.constexpr, BS: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr,
        ACC: tl.constexpr, PREC: tl.constexpr):
    """One program per (image, head, query tile): online softmax over the tile's key region."""
    bm, y0, x0, yq, xq, qvalid = _tile(tl.program_id(0), H, W, TY, TX)
    b = (bm // M).to(tl.int64)
    m = (bm % M).to(tl.int64)
    bm = bm.to(tl.int64)
    P = H.to(tl.int64) * W
    pq = yq * W + xq  # int32 pixel index; 64-bit once scaled into an offset
    dc = tl.arange(0, BD)
    ec = tl.arange(0, BDV)
    qt = _rows(q_ptr + b * sqb + m * sqm, pq, qvalid, sqp, dc, D).to(ACC)
    k_base = k_ptr + b * skb + m * skm
    v_base = v_ptr + b * svb + m * svm
    if HAS_LAM:
        lam = tl.load(lam_ptr + bm * P + pq, mask=qvalid, other=0.0).to(ACC)
    p_base = probs_ptr + b * spb + m * sph
    l_base = labels_ptr + b * slb + m * slh
    if MODE == 1:
        ptrs, ok = _basis(p_base, pq, yq, xq, qvalid, y0 // CELL - 1, x0 // CELL - 1, h, w, CELL, SY, SX, BS)
        pi_q = tl.load(ptrs, mask=ok, other=0.0).to(ACC)
    if MODE == 2:
        lab_q = tl.load(l_base + pq, mask=qvalid, other=-1)
    syq = _start(yq, H, KS)
    sxq = _start(xq, W, KS)
    ry1 = _start(tl.minimum(y0 + TY, H) - 1, H, KS) + KS
    rx1 = _start(tl.minimum(x0 + TX, W) - 1, W, KS) + KS
    m_i = tl.full((TY * TX,), float('-inf'), dtype=ACC)
    l_i = tl.zeros((TY * TX,), dtype=ACC)
    acc = tl.zeros((TY * TX, BDV), dtype=ACC)
    for cy0 in range(_start(y0, H, KS), ry1, CR):
        for cx0 in range(_start(x0, W, KS), rx1, CC):
            yk, xk, kvalid = _chunk(cy0, cx0, ry1, rx1, CR, CC)
            pk = yk * W + xk
            kt = _rows(k_base, pk, kvalid, skp, dc, D).to(ACC)
            s = tl.dot(qt, tl.trans(kt), input_precision=PREC, out_dtype=ACC)  # (TY*TX, CR*CC)
            if HAS_LAM:
                z = s * lam[:, None]
            else:
                z = s * scale + s * scale_lo
            inwin = (qvalid[:, None] & kvalid[None, :] & (yk[None, :] >= syq[:, None]) & (yk[None, :] < syq[:, None] + KS)
                     & (xk[None, :] >= sxq[:, None]) & (xk[None, :] < sxq[:, None] + KS))
            # the running max runs over agreeing keys only (the sum of the agreeing terms then never
            # underflows, however far above them the logits of keys without agreement lie)
            if MODE == 1:
                ptrs, ok = _basis(p_base, pk, yk, xk, kvalid, y0 // CELL - 1, x0 // CELL - 1, h, w, CELL, SY, SX, BS)
                pi_k = tl.load(ptrs, mask=ok, other=0.0).to(ACC)
                agree = tl.dot(pi_q, tl.trans(pi_k), input_precision=PREC, out_dtype=ACC)
                inwin = inwin & (agree > 0)
            if MODE == 2:
                lab_k = tl.load(l_base + pk, mask=kvalid, other=-2)
                inwin = inwin & (lab_q[:, None] == lab_k[None, :])
            m_new = tl.maximum(m_i, tl.max(tl.where(inwin, z, float('-inf')), axis=1))
            m_safe = tl.where(m_new == float('-inf'), 0.0, m_new)
            alpha = tl.where(m_i == float('-inf'), 0.0, tl.exp(m_i - m_safe))  # -inf: nothing summed yet
            e = tl.where(inwin, tl.exp(tl.minimum(z - m_safe[:, None], 0.0)), 0.0)  # <= 1 where it counts
            if MODE == 1:
                e = e * agree
            l_i = l_i * alpha + tl.sum(e, axis=1)
            vt = _rows(v_base, pk, kvalid, svp, ec, DV).to(ACC)
            acc = acc * alpha[:, None] + tl.dot(e, vt, input_precision=PREC, out_dtype=ACC)
            m_i = m_new
    # A query whose window has zero agreement gets output 0 (and m = 0, l = 0).
    out = tl.where(l_i[:, None] > 0, acc / tl.where(l_i > 0, l_i, 1.0)[:, None], 0.0)
    tl.store(out_ptr + ((b * P + pq) * M + m)[:, None] * DV + ec[None, :], out.to(out_ptr.dtype.element_ty),
             mask=qvalid[:, None] & (ec < DV)[None, :])
    tl.store(stats_ptr + (bm * P + pq) * 2, tl.where(m_i == float('-inf'), 0.0, m_i), mask=qvalid)
    tl.store(stats_ptr + (bm * P + pq) * 2 + 1, l_i, mask=qvalid)


# --- backward --------------------------------------------------------------------------------

@triton.jit
def _bwd_dq_kernel(
        q_ptr, k_ptr, v_ptr, probs_ptr, labels_ptr, lam_ptr, go_ptr, delta_ptr, stats_ptr,
        dq_ptr, dprobs_ptr, dlam_ptr,
        H, W, M, D, DV, h, w,
        sqb, sqm, sqp, skb, skm, skp, svb, svm, svp, spb, sph, slb, slh,
        scale, scale_lo,
        KS: tl.constexpr, CELL: tl.constexpr, MODE: tl.constexpr, HAS_LAM: tl.constexpr,
        TY: tl.constexpr, TX: tl.constexpr, CR: tl.constexpr, CC: tl.constexpr,
        SY: tl.constexpr, SX: tl.constexpr, BS: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr,
        ACC: tl.constexpr, PREC: tl.constexpr):
    """Per (image, head, query tile): dq, dlambda and the query-side dprobs, over the same key chunks
    as the forward pass."""
    bm, y0, x0, yq, xq, qvalid = _tile(tl.program_id(0), H, W, TY, TX)
    b = (bm // M).to(tl.int64)
    m = (bm % M).to(tl.int64)
    bm = bm.to(tl.int64)
    P = H.to(tl.int64) * W
    pq = yq * W + xq  # int32 pixel index; 64-bit once scaled into an offset
    dc = tl.arange(0, BD)
    ec = tl.arange(0, BDV)
    qt = _rows(q_ptr + b * sqb + m * sqm, pq, qvalid, sqp, dc, D).to(ACC)
    go = _rows(go_ptr, (b * P + pq) * M + m, qvalid, DV, ec, DV).to(ACC)
    delta = tl.load(delta_ptr + bm * P + pq, mask=qvalid, other=0.0)
    m_q = tl.load(stats_ptr + (bm * P + pq) * 2, mask=qvalid, other=0.0)
    l_q = tl.load(stats_ptr + (bm * P + pq) * 2 + 1, mask=qvalid, other=0.0)
    l_safe = tl.where(l_q > 0, l_q, 1.0)
    k_base = k_ptr + b * skb + m * skm
    v_base = v_ptr + b * svb + m * svm
    if HAS_LAM:
        lam = tl.load(lam_ptr + bm * P + pq, mask=qvalid, other=0.0).to(ACC)
        dlam = tl.zeros((TY * TX,), dtype=ACC)
    p_base = probs_ptr + b * spb + m * sph
    l_base = labels_ptr + b * slb + m * slh
    if MODE == 1:
        ptrs_q, ok_q = _basis(p_base, pq, yq, xq, qvalid, y0 // CELL - 1, x0 // CELL - 1, h, w, CELL, SY, SX, BS)
        pi_q = tl.load(ptrs_q, mask=ok_q, other=0.0).to(ACC)
        dpi = tl.zeros((TY * TX, BS), dtype=ACC)
    if MODE == 2:
        lab_q = tl.load(l_base + pq, mask=qvalid, other=-1)
    syq = _start(yq, H, KS)
    sxq = _start(xq, W, KS)
    ry1 = _start(tl.minimum(y0 + TY, H) - 1, H, KS) + KS
    rx1 = _start(tl.minimum(x0 + TX, W) - 1, W, KS) + KS
    dq = tl.zeros((TY * TX, BD), dtype=ACC)
    for cy0 in range(_start(y0, H, KS), ry1, CR):
        for cx0 in range(_start(x0, W, KS), rx1, CC):
            yk, xk, kvalid = _chunk(cy0, cx0, ry1, rx1, CR, CC)
            pk = yk * W + xk
            kt = _rows(k_base, pk, kvalid, skp, dc, D).to(ACC)
            s = tl.dot(qt, tl.trans(kt), input_precision=PREC, out_dtype=ACC)
            if HAS_LAM:
                z = s * lam[:, None]
            else:
                z = s * scale + s * scale_lo
            inwin = (qvalid[:, None] & kvalid[None, :] & (yk[None, :] >= syq[:, None]) & (yk[None, :] < syq[:, None] + KS)
                     & (xk[None, :] >= sxq[:, None]) & (xk[None, :] < sxq[:, None] + KS))
            # e_ij / Z_i; exp() of a key without agreement only enters dL/dA: saturate, never inf
            e = tl.exp(tl.minimum(z - m_q[:, None], GRAD_EXP_CLAMP))
            p = tl.where(inwin & (l_q[:, None] > 0), e / l_safe[:, None], 0.0)
            if MODE == 1:
                ptrs, ok = _basis(p_base, pk, yk, xk, kvalid, y0 // CELL - 1, x0 // CELL - 1, h, w, CELL, SY, SX, BS)
                pi_k = tl.load(ptrs, mask=ok, other=0.0).to(ACC)
                wt = p * tl.dot(pi_q, tl.trans(pi_k), input_precision=PREC, out_dtype=ACC)
            elif MODE == 2:
                lab_k = tl.load(l_base + pk, mask=kvalid, other=-2)
                wt = tl.where(lab_q[:, None] == lab_k[None, :], p, 0.0)
            else:
                wt = p
            vt = _rows(v_base, pk, kvalid, svp, ec, DV).to(ACC)
            t = tl.dot(go, tl.trans(vt), input_precision=PREC, out_dtype=ACC) - delta[:, None]  # dL/dw - delta
            dz = wt * t  # dL/dlogit
            if HAS_LAM:
                dlam += tl.sum(dz * s, axis=1)
                dz = dz * lam[:, None]
            dq += tl.dot(dz, kt, input_precision=PREC, out_dtype=ACC)
            if MODE == 1:
                dpi += tl.dot(t * p, pi_k, input_precision=PREC, out_dtype=ACC)  # dA @ Pi_k
    if not HAS_LAM:
        dq = dq * scale + dq * scale_lo
    tl.store(dq_ptr + (bm * P + pq)[:, None] * D + dc[None, :], dq.to(dq_ptr.dtype.element_ty),
             mask=qvalid[:, None] & (dc < D)[None, :])
    if HAS_LAM:
        tl.store(dlam_ptr + bm * P + pq, dlam, mask=qvalid)
    if MODE == 1:
        ptrs, ok = _basis(dprobs_ptr + bm * P * 9, pq, yq, xq, qvalid, y0 // CELL - 1, x0 // CELL - 1, h, w,
                          CELL, SY, SX, BS)
        tl.store(ptrs, dpi, mask=ok)


@triton.jit
def _bwd_dkv_kernel(
        q_ptr, k_ptr, v_ptr, probs_ptr, labels_ptr, lam_ptr, go_ptr, delta_ptr, stats_ptr,
        dk_ptr, dv_ptr, dprobs_ptr,
        H, W, M, D, DV, h, w,
        sqb, sqm, sqp, skb, skm, skp, svb, svm, svp, spb, sph, slb, slh,
        scale, scale_lo,
        KS: tl.constexpr, CELL: tl.constexpr, MODE: tl.constexpr, HAS_LAM: tl.constexpr,
        TY: tl.constexpr, TX: tl.constexpr, CR: tl.constexpr, CC: tl.constexpr,
        SY: tl.constexpr, SX: tl.constexpr, BS: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr,
        ACC: tl.constexpr, PREC: tl.constexpr):
    """Per (image, head, key tile): dk, dv and the key-side dprobs (added to the query side) from
    every query whose window holds one of the tile's keys."""
    bm, y0, x0, yk, xk, kvalid = _tile(tl.program_id(0), H, W, TY, TX)
    b = (bm // M).to(tl.int64)
    m = (bm % M).to(tl.int64)
    bm = bm.to(tl.int64)
    P = H.to(tl.int64) * W
    pk = yk * W + xk
    dc = tl.arange(0, BD)
    ec = tl.arange(0, BDV)
    kt = _rows(k_ptr + b * skb + m * skm, pk, kvalid, skp, dc, D).to(ACC)
    vt = _rows(v_ptr + b * svb + m * svm, pk, kvalid, svp, ec, DV).to(ACC)
    q_base = q_ptr + b * sqb + m * sqm
    p_base = probs_ptr + b * spb + m * sph
    l_base = labels_ptr + b * slb + m * slh
    if MODE == 1:
        ptrs_k, ok_k = _basis(p_base, pk, yk, xk, kvalid, y0 // CELL - 1, x0 // CELL - 1, h, w, CELL, SY, SX, BS)
        pi_k = tl.load(ptrs_k, mask=ok_k, other=0.0).to(ACC)
        dpi = tl.zeros((TY * TX, BS), dtype=ACC)
    if MODE == 2:
        lab_k = tl.load(l_base + pk, mask=kvalid, other=-2)
    # Queries whose window [start(i), start(i) + KS) meets the tile's rows [y0, y1): start() is
    # monotone, so they form a range; near a border all the queries that share the border window.
    y1 = tl.minimum(y0 + TY, H)
    x1 = tl.minimum(x0 + TX, W)
    qy_lo = tl.where(y0 <= KS - 1, 0, y0 - KS // 2)
    qx_lo = tl.where(x0 <= KS - 1, 0, x0 - KS // 2)
    qy_end = tl.where(y1 - 1 >= H - KS, H, y1 + KS // 2)
    qx_end = tl.where(x1 - 1 >= W - KS, W, x1 + KS // 2)
    dk = tl.zeros((TY * TX, BD), dtype=ACC)
    dv = tl.zeros((TY * TX, BDV), dtype=ACC)
    for cy0 in range(qy_lo, qy_end, CR):
        for cx0 in range(qx_lo, qx_end, CC):
            yq, xq, qvalid = _chunk(cy0, cx0, qy_end, qx_end, CR, CC)
            pq = yq * W + xq
            qt = _rows(q_base, pq, qvalid, sqp, dc, D).to(ACC)
            go = _rows(go_ptr, (b * P + pq) * M + m, qvalid, DV, ec, DV).to(ACC)
            delta = tl.load(delta_ptr + bm * P + pq, mask=qvalid, other=0.0)
            m_q = tl.load(stats_ptr + (bm * P + pq) * 2, mask=qvalid, other=0.0)
            l_q = tl.load(stats_ptr + (bm * P + pq) * 2 + 1, mask=qvalid, other=0.0)
            l_safe = tl.where(l_q > 0, l_q, 1.0)
            s = tl.dot(kt, tl.trans(qt), input_precision=PREC, out_dtype=ACC)  # (keys, queries)
            if HAS_LAM:
                lam = tl.load(lam_ptr + bm * P + pq, mask=qvalid, other=0.0).to(ACC)
                z = s * lam[None, :]
            else:
                z = s * scale + s * scale_lo
            syq = _start(yq, H, KS)
            sxq = _start(xq, W, KS)
            inwin = (kvalid[:, None] & qvalid[None, :] & (yk[:, None] >= syq[None, :]) & (yk[:, None] < syq[None, :] + KS)
                     & (xk[:, None] >= sxq[None, :]) & (xk[:, None] < sxq[None, :] + KS))
            e = tl.exp(tl.minimum(z - m_q[None, :], GRAD_EXP_CLAMP))
            p = tl.where(inwin & (l_q[None, :] > 0), e / l_safe[None, :], 0.0)
            if MODE == 1:
                ptrs, ok = _basis(p_base, pq, yq, xq, qvalid, y0 // CELL - 1, x0 // CELL - 1, h, w, CELL, SY, SX, BS)
                pi_q = tl.load(ptrs, mask=ok, other=0.0).to(ACC)
                wt = p * tl.dot(pi_k, tl.trans(pi_q), input_precision=PREC, out_dtype=ACC)
            elif MODE == 2:
                lab_q = tl.load(l_base + pq, mask=qvalid, other=-1)
                wt = tl.where(lab_k[:, None] == lab_q[None, :], p, 0.0)
            else:
                wt = p
            dv += tl.dot(wt, go, input_precision=PREC, out_dtype=ACC)
            t = tl.dot(vt, tl.trans(go), input_precision=PREC, out_dtype=ACC) - delta[None, :]
            dz = wt * t
            if HAS_LAM:
                dz = dz * lam[None, :]
            dk += tl.dot(dz, qt, input_precision=PREC, out_dtype=ACC)
            if MODE == 1:
                dpi += tl.dot(t * p, pi_q, input_precision=PREC, out_dtype=ACC)
    if not HAS_LAM:
        dk = dk * scale + dk * scale_lo
    tl.store(dk_ptr + (bm * P + pk)[:, None] * D + dc[None, :], dk.to(dk_ptr.dtype.element_ty),
             mask=kvalid[:, None] & (dc < D)[None, :])
    tl.store(dv_ptr + (bm * P + pk)[:, None] * DV + ec[None, :], dv.to(dv_ptr.dtype.element_ty),
             mask=kvalid[:, None] & (ec < DV)[None, :])
    if MODE == 1:
        ptrs, ok = _basis(dprobs_ptr + bm * P * 9, pk, yk, xk, kvalid, y0 // CELL - 1, x0 // CELL - 1, h, w,
                          CELL, SY, SX, BS)
        tl.store(ptrs, tl.load(ptrs, mask=ok, other=0.0) + dpi, mask=ok)


# --- launch configuration --------------------------------------------------------------------

def basis_side(cell: int) -> int:
    """Rows (= columns) of the local superpixel basis of a TILE x TILE tile: its cells and one around."""
    return (TILE + cell - 2) // cell + 3


def _config(dtype: torch.dtype, d: int, dv: int, kernel_size: int, cell: int, mode: int) -> dict:
    side = basis_side(cell) if mode == MODE_SOFT else 1
    # fp32 stays 'ieee' here: with the 'tf32x3' of the local cross-attention kernels these kernels
    # faulted (illegal memory access) and lost the far-logit accuracy test on an H100 (Triton 3.6).
    acc, prec = (tl.float64, 'ieee') if dtype == torch.float64 else (
        (tl.float32, 'ieee') if dtype == torch.float32 else (tl.float32, 'tf32'))
    return dict(KS=kernel_size, CELL=cell if mode == MODE_SOFT else 1, MODE=mode, TY=TILE, TX=TILE,
                CR=CHUNK_ROWS, CC=CHUNK_COLS, SY=side, SX=side, BS=_block(side * side), BD=_block(d),
                BDV=_block(dv), ACC=acc, PREC=prec, num_warps=8)


def _pixels(x: torch.Tensor) -> torch.Tensor:
    """(B, M, H, W, c) -> a (B, M, H * W, c) view with unit channel stride (a copy only if needed)."""
    x = x.flatten(2, 3)
    return x if x.stride(-1) == 1 or x.shape[-1] == 1 else x.contiguous()


def _launch_args(q, k, v, probs, labels, lam, kernel_size: int, cell: int):
    """Tensors (placeholders for absent ones, never read) and the size / stride arguments."""
    B, M, H, W, d = q.shape
    qf, kf, vf = _pixels(q), _pixels(k), _pixels(v)
    mode = MODE_SOFT if probs is not None else (MODE_HARD if labels is not None else MODE_NA)
    P = H * W
    spb = sph = slb = slh = 0
    if probs is not None:
        probs = probs.contiguous()
        spb, sph = probs.shape[1] * P * 9, (P * 9 if probs.shape[1] == M else 0)
    if labels is not None:
        labels = labels.contiguous()
        slb, slh = labels.shape[1] * P, (P if labels.shape[1] == M else 0)
    lam = None if lam is None else lam.contiguous()
    h, w = -(-H // cell), -(-W // cell)
    tensors = (qf, kf, vf, qf if probs is None else probs, qf if labels is None else labels, qf if lam is None else lam)
    sizes = (H, W, M, d, v.shape[-1], h, w, qf.stride(0), qf.stride(1), qf.stride(2), kf.stride(0), kf.stride(1),
             kf.stride(2), vf.stride(0), vf.stride(1), vf.stride(2), spb, sph, slb, slh)
    return mode, tensors, sizes


def _grid(B: int, M: int, H: int, W: int):
    return (B * M * triton.cdiv(H, TILE) * triton.cdiv(W, TILE),)


# --- the two backend functions ---------------------------------------------------------------

def attention_fwd(q, k, v, probs: Optional[torch.Tensor], labels: Optional[torch.Tensor],
                  lam: Optional[torch.Tensor], kernel_size: int, cell: int, scale: float):
    """Returns the output heads-last (B, H, W, M, dv) and stats (B, M, H, W, 2) (max logit, exp-sum)."""
    B, M, H, W, d = q.shape
    dv = v.shape[-1]
    out = _empty(q, (B, H, W, M, dv))
    stats = _empty(q, (B, M, H, W, 2), accumulate_dtype(q.dtype))
    if out.numel() == 0:
        return out.zero_(), stats.zero_()
    mode, tensors, sizes = _launch_args(q, k, v, probs, labels, lam, kernel_size, cell)
    with _device(q):
        _fwd_kernel[_grid(B, M, H, W)](*tensors, out, stats, *sizes, *_split(scale), HAS_LAM=lam is not None,
                                       **_config(q.dtype, d, dv, kernel_size, cell, mode))
    return out, stats


def attention_bwd(grad_out, out, stats, q, k, v, probs, labels, lam, kernel_size: int, cell: int, scale: float):
    """grad_out and out heads-last (B, H, W, M, dv). Returns [dq, dk, dv] + [dprobs if probs] +
    [dlam if lam], in the inputs' shapes."""
    B, M, H, W, d = q.shape
    dv = v.shape[-1]
    acc = accumulate_dtype(q.dtype)
    dq, dk, dv_ = _empty(q, q.shape), _empty(k, k.shape), _empty(v, v.shape)
    dprobs = None if probs is None else torch.zeros(B, M, H, W, 9, dtype=acc, device=q.device)  # scattered into
    dlam = None if lam is None else _empty(q, (B, M, H, W), acc)
    if dq.numel() or dv_.numel():
        go = grad_out.contiguous()
        # delta_i = <g_i, out_i>, the softmax-backward row term, (B, M, H, W)
        delta = (go.to(acc) * out.to(acc)).sum(-1).permute(0, 3, 1, 2).contiguous()
        mode, tensors, sizes = _launch_args(q, k, v, probs, labels, lam, kernel_size, cell)
        cfg = dict(HAS_LAM=lam is not None, **_config(q.dtype, d, dv, kernel_size, cell, mode))
        stats = stats.contiguous()
        with _device(q):
            _bwd_dq_kernel[_grid(B, M, H, W)](
                *tensors, go, delta, stats, dq, dq if dprobs is None else dprobs, dq if dlam is None else dlam,
                *sizes, *_split(scale), **cfg)
            _bwd_dkv_kernel[_grid(B, M, H, W)](
                *tensors, go, delta, stats, dk, dv_, dq if dprobs is None else dprobs, *sizes, *_split(scale), **cfg)
    else:  # empty batch
        for t in (dq, dk, dv_) + (() if dlam is None else (dlam,)):
            t.zero_()
    grads = [dq, dk, dv_]
    if probs is not None:
        if probs.shape[1] != M:  # one probability map shared by all heads
            dprobs = dprobs.sum(dim=1, keepdim=True)
        grads.append(dprobs.to(probs.dtype))
    if lam is not None:
        grads.append(dlam.to(lam.dtype))
    return grads
