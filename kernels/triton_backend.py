"""Fused Triton backend (docs/design.md §1.4): the four functions of kernels/torch_backend.py.

Same arguments, layouts and contracts as the torch backend (N = B * Mp, G = M // Mp heads share
one pixel tensor, n = cell * cell pixels per cell):

* outputs heads-last, ``(B, H, W, M, dv)`` (pixel direction) / ``(B, h, w, M, dv)`` (superpixel);
* ``probs`` cell-major ``(N, h, w, n, 9 * G)``, entry ``[c, p, g * 9 + k]`` linking pixel ``p`` of
  cell ``c`` to superpixel ``c + offset k`` for head ``g``; exactly 0 outside the grid; float32
  (float64 for float64 inputs).

Programs (one flattened launch axis, so no grid-dimension limit):

* *per cell* ``(nn, i, j)``: the cell's ``n`` pixels form a ``(BP, BD)`` tile (``BP`` = ``n``
  padded to a power of two, at least 16), loaded once; for each head ``g`` the 9 neighbouring
  superpixel vectors are gathered by index arithmetic into a ``(16, BD)`` tile (rows 9..15 and
  neighbours outside the grid masked), so every (pixel, neighbour) product is one ``tl.dot``.
* *per superpixel* ``(nn, i, j)``: walks the 3x3 cells around it (a loop of 9; unrolled it
  spills) with all ``G`` heads side by side in a ``(BG, BD)`` query tile, so the superpixel
  softmax over the ``<= 9 n`` pixels is exact (pass 1: running max and sum, own cell first;
  pass 2: normalized probabilities, stored, and the output).

Forward, pixel direction: one per-cell kernel (exact softmax over the 9 neighbours).
Forward, superpixel direction: one per-superpixel kernel (one pass over its 9 cells with an
online softmax, storing the logits, then a pass over its 9 probability rows normalizing them); it
also zero-fills the probabilities of its own cell that point outside the grid.
Backward, pixel direction: per cell -> dq and ``delta[p, g] = sum_k P dP`` (a small fp32 scratch
(N, h, w, G, n)); per (superpixel, head) -> dk, dv, dbias by walking its 9 cells.
Backward, superpixel direction: per superpixel -> dq; per cell -> dk, dv (summed when k is v).
Every program owns its outputs: no atomics, deterministic.

Arithmetic is fp32 (fp64 for fp64 inputs); tiles are cast before ``tl.dot`` (the interpreter
mis-computes bf16 dots). fp64 dots use ``input_precision='ieee'``; fp32 dots 'tf32x3' (three
tf32 tensor-core products per dot, fp32-level accuracy: 'ieee' runs on the FMA units and made
the superpixel forward 6x slower on an H100, 4.7 vs 0.8 ms at SPFormer-S shapes, batch 128);
fp16/bf16 inputs 'tf32': exact for products of input values, probabilities and logit gradients
are rounded to tf32 (2**-11) as operands. ``scale`` travels as an fp32 pair (hi, lo): kernel
float arguments are fp32, and fp64 inputs keep its full precision.
"""
import contextlib
from typing import Optional

import torch
import triton
import triton.language as tl

from .torch_backend import accumulate_dtype

_BK = 16  # the 9 neighbours padded to a tl.dot-legal width

# Triton compiles a separate kernel for integer arguments equal to 1 (and for multiples of 16), with
# the value folded in. On an H100 (Triton 3.6) the pixel-direction dk/dv kernel came out wrong for
# grids one cell wide (w = 1), while the same source with these sizes passed at run time was exact
# (.ci/gpu; under the interpreter both are exact): the grid and head sizes are plain run-time
# integers. D and DV stay specialized: their multiple-of-16 alignment let the compiler vectorize
# the row loads (1.2-1.8x faster kernels at SPFormer-S shapes, measured); a head dimension of 1
# has not been run on a GPU.
_SIZE_ARGS = ('h', 'w', 'Mp', 'G')


# --- index helpers ---------------------------------------------------------------------------
# Images are indexed nn = b * Mp + mp (pixel tensors) and superpixel heads nn * G + g = b * M + m.
# Pixel p of cell (i, j) (row-major within the cell) lies at in-image pixel index
# i * CELL * W + j * CELL + poff[p], poff = (p // CELL) * W + p % CELL, W = w * CELL; the cell at
# offset (dy, dx) is a scalar shift dy * CELL * W + dx * CELL away: loops over the 3x3 cells only
# move base pointers.

@triton.jit
def _int64(h, w, Mp, G, D, DV):
    """The size arguments as int64: all index arithmetic is 64-bit (no overflow on large tensors)."""
    return (tl.cast(h, tl.int64), tl.cast(w, tl.int64), tl.cast(Mp, tl.int64), tl.cast(G, tl.int64),
            tl.cast(D, tl.int64), tl.cast(DV, tl.int64))


@triton.jit
def _cell_tile(i, j, w, CELL: tl.constexpr, CELLS: tl.constexpr, BP: tl.constexpr):
    """(p, pixel index of pixel p of cell (i, j), p < n) for the BP rows of a cell tile. The index
    is the pixel's row in an image-layout (H, W) or, if CELLS, a cell-major (h, w, n) pixel tensor."""
    p = tl.arange(0, BP)
    if CELLS:
        return p, (i * w + j) * (CELL * CELL) + p, p < CELL * CELL
    return p, i * CELL * (w * CELL) + j * CELL + (p // CELL) * (w * CELL) + p % CELL, p < CELL * CELL


@triton.jit
def _cell_shift(DY, DX, w, CELL: tl.constexpr, CELLS: tl.constexpr):
    """Pixel-row distance between a pixel and the same pixel of the cell at offset (DY, DX)."""
    if CELLS:
        return (DY * w + DX) * (CELL * CELL)
    return DY * CELL * (w * CELL) + DX * CELL


@triton.jit
def _neighbours(i, j, h, w, BK: tl.constexpr):
    """Neighbour k of cell (i, j): (k, flat superpixel index i' * w + j', inside the grid)."""
    kk = tl.arange(0, BK)
    ni = i + kk // 3 - 1
    nj = j + kk % 3 - 1
    valid = (kk < 9) & (ni >= 0) & (ni < h) & (nj >= 0) & (nj < w)
    return kk, ni * w + nj, valid


@triton.jit
def _heads_last_rows(nn, pix, h, w, Mp, G, CELL: tl.constexpr):
    """Row (in units of DV) of pixels ``pix`` of image nn, head (nn % Mp) * G, in a heads-last
    (B, H, W, Mp * G, DV) tensor; head g of the group is ``+ g``."""
    return ((nn // Mp) * (h * w * CELL * CELL) + pix) * (Mp * G) + (nn % Mp) * G


@triton.jit
def _neighbour_kv(k_ptr, v_ptr, nn, G, h, w, nbr, kvalid, dc, ec, D, DV):
    """Flat superpixel index of the 9 neighbours (head 0 of the group), pointers to their key and
    value rows, and the load masks; head g is ``+ g * h * w`` rows away."""
    sp = nn * G * (h * w) + nbr
    return (sp, k_ptr + sp[:, None] * D + dc[None, :], v_ptr + sp[:, None] * DV + ec[None, :],
            kvalid[:, None] & (dc < D)[None, :], kvalid[:, None] & (ec < DV)[None, :])


@triton.jit
def _own_cell_pixels(k_ptr, v_ptr, probs_ptr, nn, pid, p, pix, pin, gg, gmask, dc, ec, h, w, G, D, DV,
                     CELL: tl.constexpr):
    """For the superpixel whose own cell is ``pid``: pointers to that cell's pixel keys, values and
    (per head gg) probability rows, and their load masks; the cell at offset t is a scalar shift away."""
    rows = nn * (h * w * CELL * CELL) + pix
    return (k_ptr + rows[:, None] * D + dc[None, :], v_ptr + rows[:, None] * DV + ec[None, :],
            probs_ptr + (pid * (CELL * CELL) + p)[:, None] * (9 * G) + gg[None, :] * 9,
            pin[:, None] & (dc < D)[None, :], pin[:, None] & (ec < DV)[None, :], pin[:, None] & gmask[None, :])


# --- pixel queries over their 9 superpixels --------------------------------------------------

@triton.jit(do_not_specialize=_SIZE_ARGS)
def _pixel_fwd_kernel(
        q_ptr, k_ptr, v_ptr, bias_ptr, out_ptr, probs_ptr,
        h, w, Mp, G, D, DV, scale, scale_lo,
        CELL: tl.constexpr, CELLS: tl.constexpr, HAS_BIAS: tl.constexpr, BP: tl.constexpr, BD: tl.constexpr,
        BDV: tl.constexpr, BK: tl.constexpr, ACC: tl.constexpr, PREC: tl.constexpr):
    """One program per (image nn, cell (i, j)): the cell's pixels against its 9 superpixels."""
    h, w, Mp, G, D, DV = _int64(h, w, Mp, G, D, DV)
    pid = tl.program_id(0).to(tl.int64)  # = flat cell index nn * h * w + i * w + j
    nn = pid // (h * w)
    i = pid % (h * w) // w
    j = pid % w
    p, pix, pin = _cell_tile(i, j, w, CELL, CELLS, BP)
    dc = tl.arange(0, BD)
    ec = tl.arange(0, BDV)
    kk, nbr, kvalid = _neighbours(i, j, h, w, BK)
    qt = tl.load(q_ptr + (nn * (h * w * CELL * CELL) + pix)[:, None] * D + dc[None, :],
                 mask=pin[:, None] & (dc < D)[None, :], other=0.0).to(ACC)
    # per head g: + g * (h * w * channels) on the superpixel side, + g * DV on the output side
    sp, k_ptrs, v_ptrs, kmask, vmask = _neighbour_kv(k_ptr, v_ptr, nn, G, h, w, nbr, kvalid, dc, ec, D, DV)
    out_ptrs = out_ptr + _heads_last_rows(nn, pix, h, w, Mp, G, CELL)[:, None] * DV \
        + ec[None, :]
    omask = pin[:, None] & (ec < DV)[None, :]
    prob_ptrs = probs_ptr + (pid * (CELL * CELL) + p)[:, None] * (9 * G) + kk[None, :]
    pmask = pin[:, None] & (kk < 9)[None, :]
    for g in range(G):
        kn = tl.load(k_ptrs + g * (h * w * D), mask=kmask, other=0.0).to(ACC)
        s = tl.dot(qt, tl.trans(kn), input_precision=PREC, out_dtype=ACC)  # (BP, BK)
        s = s * scale + s * scale_lo
        if HAS_BIAS:
            s += tl.load(bias_ptr + sp + g * (h * w), mask=kvalid, other=0.0).to(ACC)[None, :]
        s = tl.where(kvalid[None, :], s, float('-inf'))
        e = tl.exp(s - tl.max(s, axis=1)[:, None])  # the own cell is always valid
        pr = e / tl.sum(e, axis=1)[:, None]
        tl.store(prob_ptrs + g * 9, pr.to(probs_ptr.dtype.element_ty), mask=pmask)
        vn = tl.load(v_ptrs + g * (h * w * DV), mask=vmask, other=0.0).to(ACC)
        o = tl.dot(pr, vn, input_precision=PREC, out_dtype=ACC)
        tl.store(out_ptrs + g * DV, o.to(out_ptr.dtype.element_ty), mask=omask)


@triton.jit(do_not_specialize=_SIZE_ARGS)
def _pixel_bwd_dq_kernel(
        go_ptr, k_ptr, v_ptr, probs_ptr, dq_ptr, delta_ptr,
        h, w, Mp, G, D, DV, scale, scale_lo,
        CELL: tl.constexpr, CELLS: tl.constexpr, BP: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr, BK: tl.constexpr,
        ACC: tl.constexpr, PREC: tl.constexpr):
    """Per cell: dq of its pixels, and delta[p, g] = sum_k P dP (the softmax-backward row term)."""
    h, w, Mp, G, D, DV = _int64(h, w, Mp, G, D, DV)
    pid = tl.program_id(0).to(tl.int64)
    nn = pid // (h * w)
    i = pid % (h * w) // w
    j = pid % w
    p, pix, pin = _cell_tile(i, j, w, CELL, CELLS, BP)
    dc = tl.arange(0, BD)
    ec = tl.arange(0, BDV)
    kk, nbr, kvalid = _neighbours(i, j, h, w, BK)
    sp, k_ptrs, v_ptrs, kmask, vmask = _neighbour_kv(k_ptr, v_ptr, nn, G, h, w, nbr, kvalid, dc, ec, D, DV)
    go_ptrs = go_ptr + _heads_last_rows(nn, pix, h, w, Mp, G, CELL)[:, None] * DV \
        + ec[None, :]
    omask = pin[:, None] & (ec < DV)[None, :]
    prob_ptrs = probs_ptr + (pid * (CELL * CELL) + p)[:, None] * (9 * G) + kk[None, :]
    pmask = pin[:, None] & kvalid[None, :]
    delta_ptrs = delta_ptr + pid * G * (CELL * CELL) + p
    dq = tl.zeros((BP, BD), dtype=ACC)
    for g in range(G):
        kn = tl.load(k_ptrs + g * (h * w * D), mask=kmask, other=0.0).to(ACC)
        vn = tl.load(v_ptrs + g * (h * w * DV), mask=vmask, other=0.0).to(ACC)
        pr = tl.load(prob_ptrs + g * 9, mask=pmask, other=0.0).to(ACC)
        go = tl.load(go_ptrs + g * DV, mask=omask, other=0.0).to(ACC)
        dp = tl.dot(go, tl.trans(vn), input_precision=PREC, out_dtype=ACC)  # (BP, BK)
        delta = tl.sum(pr * dp, axis=1)
        dq += tl.dot(pr * (dp - delta[:, None]), kn, input_precision=PREC, out_dtype=ACC)
        tl.store(delta_ptrs + g * (CELL * CELL), delta, mask=pin)
    tl.store(dq_ptr + (nn * (h * w * CELL * CELL) + pix)[:, None] * D + dc[None, :],
             (dq * scale + dq * scale_lo).to(dq_ptr.dtype.element_ty), mask=pin[:, None] & (dc < D)[None, :])


@triton.jit(do_not_specialize=_SIZE_ARGS)
def _pixel_bwd_dkv_kernel(
        go_ptr, q_ptr, v_ptr, probs_ptr, delta_ptr, dk_ptr, dv_ptr, dbias_ptr,
        h, w, Mp, G, D, DV, scale, scale_lo,
        CELL: tl.constexpr, CELLS: tl.constexpr, HAS_BIAS: tl.constexpr, BP: tl.constexpr, BD: tl.constexpr,
        BDV: tl.constexpr, ACC: tl.constexpr):
    """One program per (superpixel, head): sums over the pixels of the <= 9 cells that see it."""
    h, w, Mp, G, D, DV = _int64(h, w, Mp, G, D, DV)
    pid = tl.program_id(0).to(tl.int64)  # = flat superpixel index (b * M + m) * h * w + i * w + j
    hg = pid // (h * w)  # = nn * G + g = b * M + m
    nn = hg // G
    g = hg % G
    i = pid % (h * w) // w
    j = pid % w
    p, pix, pin = _cell_tile(i, j, w, CELL, CELLS, BP)
    dc = tl.arange(0, BD)
    ec = tl.arange(0, BDV)
    # pointers for the superpixel's own cell; cell (i, j) - offset t is a scalar shift away
    cell = nn * (h * w) + i * w + j
    q_ptrs = q_ptr + (nn * (h * w * CELL * CELL) + pix)[:, None] * D + dc[None, :]
    go_ptrs = go_ptr + (_heads_last_rows(nn, pix, h, w, Mp, G, CELL) + g)[:, None] * DV \
        + ec[None, :]
    prob_ptrs = probs_ptr + (cell * (CELL * CELL) + p) * (9 * G) + g * 9
    delta_ptrs = delta_ptr + (cell * G + g) * (CELL * CELL) + p
    qmask = pin[:, None] & (dc < D)[None, :]
    omask = pin[:, None] & (ec < DV)[None, :]
    vs = tl.load(v_ptr + pid * DV + ec, mask=ec < DV, other=0.0).to(ACC)
    # per-pixel-slot partial sums, reduced over the slots once at the end
    acc_k = tl.zeros((BP, BD), dtype=ACC)
    acc_v = tl.zeros((BP, BDV), dtype=ACC)
    acc_b = tl.zeros((BP,), dtype=ACC)
    for t in range(9):
        # cell c = (i, j) - offset t sees this superpixel as its neighbour t
        DY = t // 3 - 1
        DX = t % 3 - 1
        inside = (i - DY >= 0) & (i - DY < h) & (j - DX >= 0) & (j - DX < w)
        shift = _cell_shift(DY, DX, w, CELL, CELLS)
        qt = tl.load(q_ptrs - shift * D, mask=qmask & inside, other=0.0).to(ACC)
        go = tl.load(go_ptrs - shift * (Mp * G * DV), mask=omask & inside, other=0.0).to(ACC)
        pr = tl.load(prob_ptrs - (DY * w + DX) * (CELL * CELL * 9 * G) + t, mask=pin & inside, other=0.0).to(ACC)
        delta = tl.load(delta_ptrs - (DY * w + DX) * (G * CELL * CELL), mask=pin & inside, other=0.0).to(ACC)
        dl = pr * (tl.sum(go * vs[None, :], axis=1) - delta)
        acc_k += dl[:, None] * qt
        acc_v += pr[:, None] * go
        acc_b += dl
    dk = tl.sum(acc_k, axis=0)
    tl.store(dk_ptr + pid * D + dc, (dk * scale + dk * scale_lo).to(dk_ptr.dtype.element_ty), mask=dc < D)
    tl.store(dv_ptr + pid * DV + ec, tl.sum(acc_v, axis=0).to(dv_ptr.dtype.element_ty), mask=ec < DV)
    if HAS_BIAS:
        tl.store(dbias_ptr + pid, tl.sum(acc_b, axis=0).to(dbias_ptr.dtype.element_ty))


# --- superpixel queries over the pixels of their 3x3 cells -----------------------------------

@triton.jit(do_not_specialize=_SIZE_ARGS)
def _superpixel_fwd_kernel(
        q_ptr, k_ptr, v_ptr, out_ptr, probs_ptr,
        h, w, Mp, G, D, DV, scale, scale_lo,
        CELL: tl.constexpr, CELLS: tl.constexpr, SHARED_KV: tl.constexpr, BP: tl.constexpr, BD: tl.constexpr,
        BDV: tl.constexpr, BG: tl.constexpr, BK: tl.constexpr, ACC: tl.constexpr, PREC: tl.constexpr):
    """One program per (image nn, superpixel (i, j)), its G heads side by side: exact softmax
    over the pixels of the <= 9 cells around it, in one pass over them (online softmax, the own
    cell first so that the running max is finite from the first step on). The logits are stored
    where the probabilities go and normalized in place at the end: a pass over 9 small rows
    instead of a second pass over the cells' keys."""
    h, w, Mp, G, D, DV = _int64(h, w, Mp, G, D, DV)
    pid = tl.program_id(0).to(tl.int64)  # = flat cell index of the superpixel's own cell
    nn = pid // (h * w)
    s = pid % (h * w)
    i = s // w
    j = pid % w
    p, pix, pin = _cell_tile(i, j, w, CELL, CELLS, BP)
    dc = tl.arange(0, BD)
    ec = tl.arange(0, BDV)
    gg = tl.arange(0, BG)
    gmask = gg < G
    qt = tl.load(q_ptr + ((nn * G + gg) * (h * w) + s)[:, None] * D + dc[None, :],
                 mask=gmask[:, None] & (dc < D)[None, :], other=0.0).to(ACC)  # (BG, BD)
    k_ptrs, v_ptrs, prob_ptrs, kmask, vmask, pmask = _own_cell_pixels(
        k_ptr, v_ptr, probs_ptr, nn, pid, p, pix, pin, gg, gmask, dc, ec, h, w, G, D, DV, CELL)
    m_i = tl.full((BG,), float('-inf'), dtype=ACC)
    l_i = tl.zeros((BG,), dtype=ACC)
    acc = tl.zeros((BG, BDV), dtype=ACC)
    for t in range(9):
        tt = (t + 4) % 9
        DY = tt // 3 - 1
        DX = tt % 3 - 1
        inside = (i + DY >= 0) & (i + DY < h) & (j + DX >= 0) & (j + DX < w)
        shift = _cell_shift(DY, DX, w, CELL, CELLS)
        kt = tl.load(k_ptrs + shift * D, mask=kmask & inside, other=0.0).to(ACC)
        sc = tl.dot(kt, tl.trans(qt), input_precision=PREC, out_dtype=ACC)  # (BP, BG)
        sc = sc * scale + sc * scale_lo
        sc = tl.where(pin[:, None] & inside, sc, float('-inf'))
        # seen from cell (i, j) + offset tt, this superpixel is neighbour 8 - tt
        tl.store(prob_ptrs + (DY * w + DX) * (CELL * CELL * 9 * G) + (8 - tt), sc.to(probs_ptr.dtype.element_ty),
                 mask=pmask & inside)
        m_new = tl.maximum(m_i, tl.max(sc, axis=0))
        alpha = tl.exp(m_i - m_new)
        e = tl.exp(sc - m_new[None, :])
        l_i = l_i * alpha + tl.sum(e, axis=0)
        if SHARED_KV:
            vt = kt
        else:
            vt = tl.load(v_ptrs + shift * DV, mask=vmask & inside, other=0.0).to(ACC)
        acc = acc * alpha[:, None] + tl.dot(tl.trans(e), vt, input_precision=PREC, out_dtype=ACC)
        m_i = m_new
    inv_l = 1.0 / l_i
    out_row = ((nn // Mp) * (h * w) + s) * (Mp * G) + (nn % Mp) * G + gg
    tl.store(out_ptr + out_row[:, None] * DV + ec[None, :], (acc * inv_l[:, None]).to(out_ptr.dtype.element_ty),
             mask=gmask[:, None] & (ec < DV)[None, :])
    # The stored logits -> probabilities. Other threads of this program may have stored them.
    tl.debug_barrier()
    for t in range(9):
        DY = t // 3 - 1
        DX = t % 3 - 1
        inside = (i + DY >= 0) & (i + DY < h) & (j + DX >= 0) & (j + DX < w)
        ptrs = prob_ptrs + (DY * w + DX) * (CELL * CELL * 9 * G) + (8 - t)
        sc = tl.load(ptrs, mask=pmask & inside, other=float('-inf')).to(ACC)
        tl.store(ptrs, (tl.exp(sc - m_i[None, :]) * inv_l[None, :]).to(probs_ptr.dtype.element_ty),
                 mask=pmask & inside)
    # Entries of the own cell pointing outside the grid belong to no superpixel: zero them here.
    if (i == 0) | (i == h - 1) | (j == 0) | (j == w - 1):
        kk, _, kvalid = _neighbours(i, j, h, w, BK)
        zmask = pin[:, None] & ((kk < 9) & ~kvalid)[None, :]
        zero_ptrs = probs_ptr + (pid * (CELL * CELL) + p)[:, None] * (9 * G) + kk[None, :]
        for g in range(G):
            tl.store(zero_ptrs + g * 9, tl.zeros((BP, BK), dtype=probs_ptr.dtype.element_ty), mask=zmask)


@triton.jit(do_not_specialize=_SIZE_ARGS)
def _superpixel_bwd_dq_kernel(
        go_ptr, out_ptr, k_ptr, v_ptr, probs_ptr, dq_ptr,
        h, w, Mp, G, D, DV, scale, scale_lo,
        CELL: tl.constexpr, CELLS: tl.constexpr, SHARED_KV: tl.constexpr, BP: tl.constexpr, BD: tl.constexpr,
        BDV: tl.constexpr, BG: tl.constexpr, ACC: tl.constexpr, PREC: tl.constexpr):
    """Per (image nn, superpixel), G heads side by side: dq over the pixels of its 9 cells."""
    h, w, Mp, G, D, DV = _int64(h, w, Mp, G, D, DV)
    pid = tl.program_id(0).to(tl.int64)
    nn = pid // (h * w)
    s = pid % (h * w)
    i = s // w
    j = pid % w
    p, pix, pin = _cell_tile(i, j, w, CELL, CELLS, BP)
    dc = tl.arange(0, BD)
    ec = tl.arange(0, BDV)
    gg = tl.arange(0, BG)
    gmask = gg < G
    out_row = ((nn // Mp) * (h * w) + s) * (Mp * G) + (nn % Mp) * G + gg
    omask = gmask[:, None] & (ec < DV)[None, :]
    go = tl.load(go_ptr + out_row[:, None] * DV + ec[None, :], mask=omask, other=0.0).to(ACC)  # (BG, BDV)
    o = tl.load(out_ptr + out_row[:, None] * DV + ec[None, :], mask=omask, other=0.0).to(ACC)
    delta = tl.sum(go * o, axis=1)  # (BG,) the softmax-backward row term <out, grad_out>
    k_ptrs, v_ptrs, prob_ptrs, kmask, vmask, pmask = _own_cell_pixels(
        k_ptr, v_ptr, probs_ptr, nn, pid, p, pix, pin, gg, gmask, dc, ec, h, w, G, D, DV, CELL)
    acc = tl.zeros((BG, BD), dtype=ACC)
    for t in range(9):
        DY = t // 3 - 1
        DX = t % 3 - 1
        inside = (i + DY >= 0) & (i + DY < h) & (j + DX >= 0) & (j + DX < w)
        shift = _cell_shift(DY, DX, w, CELL, CELLS)
        kt = tl.load(k_ptrs + shift * D, mask=kmask & inside, other=0.0).to(ACC)
        if SHARED_KV:
            vt = kt
        else:
            vt = tl.load(v_ptrs + shift * DV, mask=vmask & inside, other=0.0).to(ACC)
        pr = tl.load(prob_ptrs + (DY * w + DX) * (CELL * CELL * 9 * G) + (8 - t), mask=pmask & inside,
                     other=0.0).to(ACC)  # (BP, BG)
        dp = tl.dot(vt, tl.trans(go), input_precision=PREC, out_dtype=ACC)
        acc += tl.dot(tl.trans(pr * (dp - delta[None, :])), kt, input_precision=PREC, out_dtype=ACC)
    tl.store(dq_ptr + ((nn * G + gg) * (h * w) + s)[:, None] * D + dc[None, :],
             (acc * scale + acc * scale_lo).to(dq_ptr.dtype.element_ty), mask=gmask[:, None] & (dc < D)[None, :])


@triton.jit(do_not_specialize=_SIZE_ARGS)
def _superpixel_bwd_dkv_kernel(
        go_ptr, out_ptr, q_ptr, v_ptr, probs_ptr, dk_ptr, dv_ptr,
        h, w, Mp, G, D, DV, scale, scale_lo,
        CELL: tl.constexpr, CELLS: tl.constexpr, SHARED_KV: tl.constexpr, BP: tl.constexpr, BD: tl.constexpr,
        BDV: tl.constexpr, BK: tl.constexpr, ACC: tl.constexpr, PREC: tl.constexpr):
    """Per (image nn, cell): dk, dv of its pixels from the 9 superpixels around it, all heads."""
    h, w, Mp, G, D, DV = _int64(h, w, Mp, G, D, DV)
    pid = tl.program_id(0).to(tl.int64)
    nn = pid // (h * w)
    i = pid % (h * w) // w
    j = pid % w
    p, pix, pin = _cell_tile(i, j, w, CELL, CELLS, BP)
    row = nn * (h * w * CELL * CELL) + pix
    dc = tl.arange(0, BD)
    ec = tl.arange(0, BDV)
    kk, nbr, kvalid = _neighbours(i, j, h, w, BK)
    vt = tl.load(v_ptr + row[:, None] * DV + ec[None, :], mask=pin[:, None] & (ec < DV)[None, :],
                 other=0.0).to(ACC)
    q_ptrs = q_ptr + (nn * G * (h * w) + nbr)[:, None] * D + dc[None, :]
    o_off = (((nn // Mp) * (h * w) + nbr) * (Mp * G) + (nn % Mp) * G)[:, None] * DV + ec[None, :]
    prob_ptrs = probs_ptr + (pid * (CELL * CELL) + p)[:, None] * (9 * G) + kk[None, :]
    qmask = kvalid[:, None] & (dc < D)[None, :]
    nmask = kvalid[:, None] & (ec < DV)[None, :]
    pmask = pin[:, None] & kvalid[None, :]
    dk = tl.zeros((BP, BD), dtype=ACC)
    dv = tl.zeros((BP, BDV), dtype=ACC)
    for g in range(G):
        qn = tl.load(q_ptrs + g * (h * w * D), mask=qmask, other=0.0).to(ACC)  # (BK, BD)
        gon = tl.load(go_ptr + o_off + g * DV, mask=nmask, other=0.0).to(ACC)
        on = tl.load(out_ptr + o_off + g * DV, mask=nmask, other=0.0).to(ACC)
        delta = tl.sum(gon * on, axis=1)  # (BK,)
        pr = tl.load(prob_ptrs + g * 9, mask=pmask, other=0.0).to(ACC)  # (BP, BK)
        dp = tl.dot(vt, tl.trans(gon), input_precision=PREC, out_dtype=ACC)
        dk += tl.dot(pr * (dp - delta[None, :]), qn, input_precision=PREC, out_dtype=ACC)
        dv += tl.dot(pr, gon, input_precision=PREC, out_dtype=ACC)
    dk = dk * scale + dk * scale_lo
    if SHARED_KV:
        dk += dv
    else:
        tl.store(dv_ptr + row[:, None] * DV + ec[None, :], dv.to(dv_ptr.dtype.element_ty),
                 mask=pin[:, None] & (ec < DV)[None, :])
    tl.store(dk_ptr + row[:, None] * D + dc[None, :], dk.to(dk_ptr.dtype.element_ty),
             mask=pin[:, None] & (dc < D)[None, :])


# --- launch configuration --------------------------------------------------------------------

def _block(x: int) -> int:
    """Power of two >= max(x, 16): tl.dot needs every dimension >= 16."""
    return max(16, triton.next_power_of_2(max(int(x), 1)))


def arithmetic(dtype: torch.dtype):
    """(accumulator dtype, tl.dot input precision) for inputs of ``dtype`` (module docstring)."""
    if dtype == torch.float64:
        return tl.float64, 'ieee'
    return tl.float32, 'tf32x3' if dtype == torch.float32 else 'tf32'


def _config(dtype: torch.dtype, cell: int, d: int, dv: int, G: int, cells: bool = False) -> dict:
    """The one configuration: blocks from the shapes, warps from the largest tile."""
    BP, BD, BDV = _block(cell * cell), _block(d), _block(dv)
    acc, prec = arithmetic(dtype)
    # One warp per 2048 tile elements: the tiles are small and each program walks 9 cells one after
    # another, so many small resident programs hide the load latency best. Swept on an H100 at
    # SPFormer-S shapes, batch 128 (bench/triton_launch_sweep.py): 16 x 64 tiles (cell 4) ran
    # 1.4-2.1x faster on 1 warp than on 4, 64 x 64 tiles (cell 7) 1.6-3.4x faster on 2 than on 8
    # (1 warp spills there).
    num_warps = max(1, min(8, BP * max(BD, BDV) // 2048))
    return dict(CELL=cell, CELLS=cells, BP=BP, BD=BD, BDV=BDV, ACC=acc, PREC=prec, num_warps=num_warps)


def _split(scale: float):
    """``scale`` as an fp32 pair (hi, lo) with hi + lo = scale to ~2**-48: Triton passes Python floats
    as fp32, and fp64 inputs need the full value (kernels scale as x * hi + x * lo)."""
    hi = float(torch.tensor(scale, dtype=torch.float32))
    return hi, float(torch.tensor(scale - hi, dtype=torch.float32))


def _empty(like: torch.Tensor, shape, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """Every buffer the kernels fill (outputs, probabilities, scratch): each element is written."""
    return torch.empty(tuple(shape), dtype=like.dtype if dtype is None else dtype, device=like.device)


def _device(t: torch.Tensor):
    """Launch on the tensors' GPU, not the current one."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


# --- the four backend functions --------------------------------------------------------------

def pixel_attention_fwd(q, k, v, bias: Optional[torch.Tensor], cell: int, scale: float, cells: bool = False):
    """q (B, Mp, H, W, d) (cell-major (B, Mp, h, w, n, d) if ``cells``), k (B, M, h, w, d),
    v (B, M, h, w, dv), bias (B, M, h, w) or None.

    Returns the output heads-last (B, H, W, M, dv) (or (B, h, w, n, M, dv)) and the probabilities
    (N, h, w, n, 9G).
    """
    B, Mp, d = q.shape[0], q.shape[1], q.shape[-1]
    M, h, w, dv = v.shape[1:]
    G = M // Mp
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    out = _empty(q, (B, h, w, cell * cell, M, dv) if cells else (B, h * cell, w * cell, M, dv))
    probs = _empty(q, (B * Mp, h, w, cell * cell, 9 * G), accumulate_dtype(q.dtype))
    if probs.numel() == 0:
        return out.zero_(), probs
    has_bias = bias is not None
    bias = bias.contiguous() if has_bias else q  # placeholder pointer, never read
    with _device(q):
        _pixel_fwd_kernel[(B * Mp * h * w,)](
            q, k, v, bias, out, probs, h, w, Mp, G, d, dv, *_split(scale),
            HAS_BIAS=has_bias, BK=_BK, **_config(q.dtype, cell, d, dv, G, cells))
    return out, probs


def pixel_attention_bwd(grad_out, q, k, v, bias, probs, cell: int, scale: float, cells: bool = False):
    """grad_out heads-last, (B, H, W, M, dv) or (B, h, w, n, M, dv) if ``cells``.
    Returns (dq, dk, dv, dbias) in the inputs' shapes."""
    B, Mp, d = q.shape[0], q.shape[1], q.shape[-1]
    M, h, w, dv = v.shape[1:]
    G = M // Mp
    go, q, k, v, probs = grad_out.contiguous(), q.contiguous(), k.contiguous(), v.contiguous(), probs.contiguous()
    dq, dk, dv_ = _empty(q, q.shape), _empty(k, k.shape), _empty(v, v.shape)
    dbias = None if bias is None else _empty(bias, bias.shape)
    if probs.numel() == 0:
        return dq.zero_(), dk.zero_(), dv_.zero_(), None if dbias is None else dbias.zero_()
    cfg = _config(q.dtype, cell, d, dv, G, cells)
    delta = _empty(probs, (B * Mp, h, w, G, cell * cell))
    with _device(q):
        _pixel_bwd_dq_kernel[(B * Mp * h * w,)](
            go, k, v, probs, dq, delta, h, w, Mp, G, d, dv, *_split(scale), BK=_BK, **cfg)
        cfg.pop('PREC')
        _pixel_bwd_dkv_kernel[(B * M * h * w,)](
            go, q, v, probs, delta, dk, dv_, dq if dbias is None else dbias, h, w, Mp, G, d, dv, *_split(scale),
            HAS_BIAS=dbias is not None, **cfg)
    return dq, dk, dv_, dbias


def superpixel_attention_fwd(q, k, v, cell: int, scale: float, shared_kv: bool = False, cells: bool = False):
    """q (B, M, h, w, d), k (B, Mp, H, W, d), v (B, Mp, H, W, dv); ``shared_kv``: v is k; ``cells``:
    k and v are cell-major (B, Mp, h, w, n, c).

    Returns the output heads-last (B, h, w, M, dv) and the probabilities (N, h, w, n, 9G),
    entry (c, p, g * 9 + k) normalized over the pixels of superpixel c + offset k.
    """
    B, M, h, w, d = q.shape
    Mp = k.shape[1]
    dv = v.shape[-1]
    G = M // Mp
    q, k = q.contiguous(), k.contiguous()
    v = k if shared_kv else v.contiguous()
    out = _empty(q, (B, h, w, M, dv))
    probs = _empty(q, (B * Mp, h, w, cell * cell, 9 * G), accumulate_dtype(q.dtype))
    if probs.numel() == 0:
        return out.zero_(), probs
    with _device(q):
        _superpixel_fwd_kernel[(B * Mp * h * w,)](
            q, k, v, out, probs, h, w, Mp, G, d, dv, *_split(scale), SHARED_KV=shared_kv, BG=_block(G), BK=_BK,
            **_config(q.dtype, cell, d, dv, G, cells))
    return out, probs


def superpixel_attention_bwd(grad_out, out, q, k, v, probs, cell: int, scale: float, shared_kv: bool = False,
                             cells: bool = False):
    """grad_out and out heads-last (B, h, w, M, dv). Returns (dq, dk, dv); dv is None if ``shared_kv``
    (then dk holds the gradient of both uses)."""
    B, M, h, w, d = q.shape
    Mp = k.shape[1]
    dv = v.shape[-1]
    G = M // Mp
    go, out, q, k, probs = grad_out.contiguous(), out.contiguous(), q.contiguous(), k.contiguous(), probs.contiguous()
    v = k if shared_kv else v.contiguous()
    dq, dk = _empty(q, q.shape), _empty(k, k.shape)
    dv_ = None if shared_kv else _empty(v, v.shape)
    if probs.numel() == 0:
        return dq.zero_(), dk.zero_(), None if dv_ is None else dv_.zero_()
    cfg = _config(q.dtype, cell, d, dv, G, cells)
    grid = (B * Mp * h * w,)
    with _device(q):
        _superpixel_bwd_dq_kernel[grid](
            go, out, k, v, probs, dq, h, w, Mp, G, d, dv, *_split(scale), SHARED_KV=shared_kv, BG=_block(G), **cfg)
        _superpixel_bwd_dkv_kernel[grid](
            go, out, q, v, probs, dk, dk if shared_kv else dv_, h, w, Mp, G, d, dv, *_split(scale),
            SHARED_KV=shared_kv, BK=_BK, **cfg)
    return dq, dk, dv_
