"""Cell-major PyTorch backend (DESIGN.md section 1.4).

Pixels are viewed cell by cell, (B, M, h, w, cell*cell, d). Only the small superpixel grid
is gathered 3x3 ("gather-9", 9x of a tensor 1/cell**2 the size of the pixels), every
(pixel, neighbour) logit is one batched matmul per cell, and superpixel results go back to
the grid with the adjoint "fold-9". No pixel tensor is ever copied 9x or 144x.
"""
import functools
from typing import Tuple

import torch
import torch.nn.functional as F

_OFFSETS = tuple((k // 3 - 1, k % 3 - 1) for k in range(9))


def to_cells(x: torch.Tensor, cell: int) -> torch.Tensor:
    """(B, M, h*cell, w*cell, d) -> (B, M, h, w, cell*cell, d)."""
    B, M, H, W, d = x.shape
    h, w = H // cell, W // cell
    return x.reshape(B, M, h, cell, w, cell, d).transpose(3, 4).reshape(B, M, h, w, cell * cell, d)


def from_cells(x: torch.Tensor, cell: int) -> torch.Tensor:
    """(B, M, h, w, cell*cell, d) -> (B, M, h*cell, w*cell, d)."""
    B, M, h, w, _, d = x.shape
    return x.reshape(B, M, h, w, cell, cell, d).transpose(3, 4).reshape(B, M, h * cell, w * cell, d)


def gather9(x: torch.Tensor, fill: float = 0.0) -> torch.Tensor:
    """(B, M, h, w, d) -> (B, M, h, w, 9, d): entry k of cell c is x at cell c + offset k (``fill`` outside)."""
    h, w = x.shape[2:4]
    xp = F.pad(x, (0, 0, 1, 1, 1, 1), value=fill)
    return torch.stack([xp[:, :, 1 + dy:1 + dy + h, 1 + dx:1 + dx + w] for dy, dx in _OFFSETS], dim=4)


def fold9(y: torch.Tensor) -> torch.Tensor:
    """Adjoint of :func:`gather9`: (B, M, h, w, 9, d) -> (B, M, h, w, d), out[j] = sum_k y[j - offset k, k]."""
    B, M, h, w, _, d = y.shape
    out = y.new_zeros(B, M, h + 2, w + 2, d)
    for k, (dy, dx) in enumerate(_OFFSETS):
        out[:, :, 1 + dy:1 + dy + h, 1 + dx:1 + dx + w] += y[:, :, :, :, k]
    return out[:, :, 1:1 + h, 1:1 + w]


def fold9_max(y: torch.Tensor) -> torch.Tensor:
    """Like :func:`fold9` with max instead of sum (y: (B, M, h, w, 9))."""
    B, M, h, w, _ = y.shape
    out = y.new_full((B, M, h + 2, w + 2), float('-inf'))
    for k, (dy, dx) in enumerate(_OFFSETS):
        view = out[:, :, 1 + dy:1 + dy + h, 1 + dx:1 + dx + w]
        torch.maximum(view, y[..., k], out=view)
    return out[:, :, 1:1 + h, 1:1 + w]


@functools.lru_cache(maxsize=64)
def _valid_cpu(h: int, w: int) -> torch.Tensor:
    k = torch.arange(9)
    ny = torch.arange(h)[:, None, None] + (k // 3 - 1)
    nx = torch.arange(w)[None, :, None] + (k % 3 - 1)
    return ((ny >= 0) & (ny < h) & (nx >= 0) & (nx < w))  # (h, w, 9)


def valid_neighbors(h: int, w: int, device) -> torch.Tensor:
    """(h, w, 9) bool: neighbour k of cell (i, j) lies inside the h x w grid."""
    return _valid_cpu(h, w).to(device)


def _cell_logits(q: torch.Tensor, kn: torch.Tensor, valid: torch.Tensor, scale: float) -> torch.Tensor:
    """q (B, M, h, w, n, d) x kn (B, M, h, w, 9, d) -> (B, M, h, w, n, 9) scaled logits, -inf outside."""
    logits = torch.matmul(q, kn.transpose(-1, -2)) * scale
    return logits.masked_fill(~valid[:, :, None, :], float('-inf'))


def _pixel_probs(q_p, k_s, cell, scale):
    h, w = k_s.shape[2:4]
    valid = valid_neighbors(h, w, q_p.device)
    return _cell_logits(to_cells(q_p, cell), gather9(k_s), valid, scale).softmax(dim=-1)


def pixel_attention(q_p, k_s, v_s, cell, scale) -> Tuple[torch.Tensor, torch.Tensor]:
    probs = _pixel_probs(q_p, k_s, cell, scale)  # (B, M, h, w, cell*cell, 9)
    out = torch.matmul(probs, gather9(v_s))  # (B, M, h, w, cell*cell, dv)
    return from_cells(out, cell), from_cells(probs, cell)


def superpixel_association(q_p, k_s, cell, scale) -> torch.Tensor:
    return from_cells(_pixel_probs(q_p, k_s, cell, scale), cell)


def superpixel_attention(q_s, k_p, v_p, cell, scale) -> torch.Tensor:
    h, w = q_s.shape[2:4]
    valid = valid_neighbors(h, w, q_s.device)
    # logits[c, p, k]: pixel p of cell c against superpixel c + offset k.
    logits = _cell_logits(to_cells(k_p, cell), gather9(q_s), valid, scale)  # (B, M, h, w, n, 9)
    with torch.no_grad():
        # Exact per-superpixel max (it cancels in the softmax, so no gradient): max over each
        # cell's pixels, fold to superpixels, gather back to the (cell, neighbour) pairs.
        sp_max = fold9_max(logits.amax(dim=-2))  # (B, M, h, w)
        pair_max = gather9(sp_max.unsqueeze(-1)).squeeze(-1).masked_fill(~valid, 0.0)
    e = torch.exp(logits - pair_max.unsqueeze(-2))  # 0 for pairs outside the image
    num = torch.matmul(e.transpose(-1, -2), to_cells(v_p, cell))  # (B, M, h, w, 9, dv)
    den = e.sum(dim=-2)  # (B, M, h, w, 9)
    return fold9(num) / fold9(den.unsqueeze(-1))
