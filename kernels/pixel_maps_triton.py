"""Fused Triton forwards (inference) of SPFormer's two per-pixel maps around the local attention.

* :func:`cell_pooled_projection` -- the superpixel initialization (docs/design.md §1.2, step 2),
  ``avg_pool(GELU(LayerNorm(x W^T)), cell)`` for channels-last pixels, without the embed_dim-wide
  pixel map. Unfused on a GPU, that map (384 channels at every pixel: 616 MB in fp32 for SPFormer-S
  at batch 128) is written and read back by the LayerNorm, the GELU and the pooling, ~2.2 ms of a
  15 ms inference batch on an H100. Here each program takes one row of cells: per cell, the cell's
  pixels times W^T is one ``tl.dot``, the LayerNorm statistics and the GELU stay in registers, and
  only the cell's mean leaves the program. Numerics follow the unfused path: products with fp32
  accumulation (inputs rounded to the autocast dtype first under autocast, and the projection's
  output too, as a bf16/fp16 GEMM returns it), the LayerNorm, GELU (exact, erf) and mean in fp32.
* :func:`rescale_rows` -- each SCA's pixel features divided by the std of their projection,
  ``x (x^T G x + eps)^-1/2`` (spformer/models/spformer.py, ``rescale_to_cells``): one read of x
  and one write in the attention ops' dtype, instead of a product, a multiply, a sum, a scaling and
  a cast, each a pass over the pixels (~0.4 ms per SCA iteration on an H100 at batch 128).

Forward only: with autograd recording, the model takes its autograd paths.
"""
from typing import Optional

import torch
import triton
import triton.language as tl

from .triton_backend import _block, _device, arithmetic


@triton.jit
def _cell_pooled_projection_kernel(
        x_ptr, w_ptr, gamma_ptr, beta_ptr, out_ptr, h, w, CP, C, eps,
        CELL: tl.constexpr, BP: tl.constexpr, BCP: tl.constexpr, BC: tl.constexpr, ROUND: tl.constexpr,
        ROUND_DTYPE: tl.constexpr, PREC: tl.constexpr):
    """One program per (image, row of cells): out[b, i, j] = mean over cell (i, j) of GELU(LN(x W^T))."""
    pid = tl.program_id(0).to(tl.int64)
    h = tl.cast(h, tl.int64)
    w = tl.cast(w, tl.int64)
    CP = tl.cast(CP, tl.int64)
    C = tl.cast(C, tl.int64)
    b = pid // h
    i = pid % h
    p = tl.arange(0, BP)
    pin = p < CELL * CELL
    cp = tl.arange(0, BCP)
    cc = tl.arange(0, BC)
    cmask = cc < C
    wt = tl.load(w_ptr + cc[None, :] * CP + cp[:, None], mask=(cp < CP)[:, None] & cmask[None, :], other=0.0)
    wt = wt.to(tl.float32)  # (BCP, BC) = W^T; fp32 before tl.dot (the interpreter mis-computes bf16 dots)
    if ROUND:
        wt = wt.to(ROUND_DTYPE).to(tl.float32)
    gamma = tl.load(gamma_ptr + cc, mask=cmask, other=0.0).to(tl.float32)
    beta = tl.load(beta_ptr + cc, mask=cmask, other=0.0).to(tl.float32)
    width = w * CELL
    # pixel p of cell (i, j) in the channels-last (B, H, W, CP) image: cell j is CELL pixels further
    rows = b * (h * CELL * width) + (i * CELL + p // CELL) * width + p % CELL
    xmask = pin[:, None] & (cp < CP)[None, :]
    for j in range(w):
        x = tl.load(x_ptr + (rows + j * CELL)[:, None] * CP + cp[None, :], mask=xmask, other=0.0).to(tl.float32)
        if ROUND:
            x = x.to(ROUND_DTYPE).to(tl.float32)
        z = tl.dot(x, wt, input_precision=PREC, out_dtype=tl.float32)  # (BP, BC)
        if ROUND:
            z = z.to(ROUND_DTYPE).to(tl.float32)
        mean = tl.sum(z, axis=1) / C  # padded channels are 0
        zc = tl.where(cmask[None, :], z - mean[:, None], 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(zc * zc, axis=1) / C + eps)
        a = zc * rstd[:, None] * gamma[None, :] + beta[None, :]
        g = 0.5 * a * (1.0 + tl.erf(a * 0.7071067811865476))
        pooled = tl.sum(tl.where(pin[:, None], g, 0.0), axis=0) / (CELL * CELL)
        tl.store(out_ptr + (pid * w + j) * C + cc, pooled.to(out_ptr.dtype.element_ty), mask=cmask)


def _pooled_projection_config(cell: int, CP: int, C: int, round_to: Optional[torch.dtype]) -> dict:
    """The launch configuration of :func:`cell_pooled_projection` (bench/triton_launch_sweep.py varies it)."""
    return dict(CELL=cell, BP=_block(cell * cell), BCP=_block(CP), BC=_block(C), ROUND=round_to is not None,
                ROUND_DTYPE=tl.bfloat16 if round_to == torch.bfloat16 else tl.float16,
                PREC=arithmetic(round_to or torch.float32)[1],
                # the (BCP, BC) weight tile stays in registers: 0.78 ms on 8 warps, 1.07 on 4 at
                # SPFormer-S shapes, batch 128 (H100, bench/triton_launch_sweep.py)
                num_warps=8)


def cell_pooled_projection(x: torch.Tensor, weight: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor,
                           eps: float, cell: int, round_to: Optional[torch.dtype] = None) -> Optional[torch.Tensor]:
    """x (B, H, W, C_p) channels-last pixels, weight (C, C_p), gamma and beta (C,) -> (B, H / cell,
    W / cell, C) in fp32: the cell means of GELU(LayerNorm(x W^T)). ``round_to``: the autocast dtype
    (bf16/fp16) the unfused path would run the projection in, or None for fp32 throughout. None
    for pixels in other dtypes (the unfused path takes them)."""
    if x.dtype not in (torch.float32, round_to):
        return None
    B, H, W, CP = x.shape
    C = weight.shape[0]
    h, w = H // cell, W // cell
    out = torch.empty(B, h, w, C, dtype=torch.float32, device=x.device)
    if out.numel() == 0:
        return out
    with _device(x):
        _cell_pooled_projection_kernel[(B * h,)](
            x.contiguous(), weight.contiguous(), gamma.contiguous(), beta.contiguous(), out, h, w, CP, C, eps,
            **_pooled_projection_config(cell, CP, C, round_to))
    return out


@triton.jit
def _rescale_rows_kernel(x_ptr, gram_ptr, out_ptr, R, C, eps, BR: tl.constexpr, BC: tl.constexpr, PREC: tl.constexpr):
    """One program per BR rows: out = x (x^T G x + eps)^-1/2, in fp32."""
    r = tl.program_id(0).to(tl.int64) * BR + tl.arange(0, BR)
    c = tl.arange(0, BC)
    C = tl.cast(C, tl.int64)
    cmask = c < C
    mask = (r < R)[:, None] & cmask[None, :]
    x = tl.load(x_ptr + r[:, None] * C + c[None, :], mask=mask, other=0.0).to(tl.float32)
    gram = tl.load(gram_ptr + c[:, None] * C + c[None, :], mask=cmask[:, None] & cmask[None, :], other=0.0)
    var = tl.sum(tl.dot(x, gram.to(tl.float32), input_precision=PREC, out_dtype=tl.float32) * x, axis=1)
    out = x * (1.0 / tl.sqrt(var + eps))[:, None]
    tl.store(out_ptr + r[:, None] * C + c[None, :], out.to(out_ptr.dtype.element_ty), mask=mask)


def rescale_rows(x: torch.Tensor, gram: torch.Tensor, eps: float, out_dtype: torch.dtype) -> torch.Tensor:
    """x (..., C), gram (C, C) symmetric -> ``x * (x^T G x + eps)^-1/2`` per row, in ``out_dtype``
    (fp32 arithmetic; fp32 or bf16/fp16 inputs)."""
    C = x.shape[-1]
    out = torch.empty(x.shape, dtype=out_dtype, device=x.device)
    R = x.numel() // max(C, 1)
    if out.numel() == 0:
        return out
    BR = 64
    with _device(x):
        _rescale_rows_kernel[(triton.cdiv(R, BR),)](
            x.contiguous(), gram.contiguous(), out, R, C, eps, BR=BR, BC=_block(C),
            PREC=arithmetic(torch.float32)[1], num_warps=4)
    return out
