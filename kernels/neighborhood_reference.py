"""Reference backend of the neighbourhood attention family: dense (pixels x pixels) matrices.

Deliberately naive and obviously correct; it is the oracle the fast backends are tested
against. It builds the full H*W x H*W logit matrix, masks it to each query's k x k window,
takes the softmax over the window, re-weights it by the dense superpixel agreement
A = Pi Pi^T (Pi: each pixel's probabilities scattered onto the whole superpixel grid) or by
1[label_i == label_j], and renormalizes. Plain autograd gives every gradient. Half-precision
inputs are computed in fp32.
"""
import torch


def window_start(L: int, kernel_size: int, device=None) -> torch.Tensor:
    """(L,) first row (or column) of each query's window: centred, shifted inward at the borders
    (NATTEN's rule), so every window holds exactly ``kernel_size`` keys inside the image."""
    return (torch.arange(L, device=device) - kernel_size // 2).clamp(0, L - kernel_size)


def window_mask(H: int, W: int, kernel_size: int, device=None) -> torch.Tensor:
    """(H*W, H*W) bool: mask[i, j] is True iff key pixel j lies in the window of query pixel i."""
    def axis(L):
        start = window_start(L, kernel_size, device)[:, None]
        pos = torch.arange(L, device=device)[None, :]
        return (pos >= start) & (pos < start + kernel_size)  # (L queries, L keys)
    y, x = axis(H), axis(W)
    return (y[:, None, :, None] & x[None, :, None, :]).reshape(H * W, H * W)


def grid_size(H: int, W: int, cell: int):
    """The superpixel grid: one superpixel per cell of ``cell`` x ``cell`` pixels (partial cells at the
    bottom and right edges count)."""
    return -(-H // cell), -(-W // cell)


def neighbor_superpixels(H: int, W: int, cell: int, device=None):
    """(H*W, 9) flat index (on the superpixel grid) of each pixel's neighbour n, the cell at offset
    (n // 3 - 1, n % 3 - 1) from its own cell, and (H*W, 9) bool: that superpixel lies in the grid."""
    h, w = grid_size(H, W, cell)
    cy = (torch.arange(H, device=device) // cell)[:, None].expand(H, W).reshape(-1, 1)
    cx = (torch.arange(W, device=device) // cell)[None, :].expand(H, W).reshape(-1, 1)
    n = torch.arange(9, device=device)
    sy, sx = cy + n // 3 - 1, cx + n % 3 - 1
    valid = (sy >= 0) & (sy < h) & (sx >= 0) & (sx < w)
    return sy.clamp(0, h - 1) * w + sx.clamp(0, w - 1), valid


def dense_probs(probs: torch.Tensor, cell: int) -> torch.Tensor:
    """(B, Hp, H, W, 9) neighbour probabilities -> (B, Hp, H*W, h*w) probabilities over the whole
    superpixel grid; neighbours outside the grid are dropped."""
    B, Hp, H, W, _ = probs.shape
    h, w = grid_size(H, W, cell)
    idx, valid = neighbor_superpixels(H, W, cell, probs.device)
    dense = probs.new_zeros(B, Hp, H * W, h * w)
    return dense.scatter_add(3, idx.expand(B, Hp, -1, -1), probs.reshape(B, Hp, H * W, 9) * valid)


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float32 if t.dtype in (torch.float16, torch.bfloat16) else t.dtype


def attention(q, k, v, probs, labels, lam, kernel_size: int, cell: int, scale: float) -> torch.Tensor:
    """q, k (B, M, H, W, d), v (B, M, H, W, dv); probs (B, Hp, H, W, 9) or labels (B, Hp, H, W) or
    neither (plain neighbourhood attention); lam (B, M, H, W) or None (then ``scale``).
    Returns (B, M, H, W, dv)."""
    B, M, H, W, d = q.shape
    dv = v.shape[-1]
    P = H * W
    dt = _compute_dtype(q)
    logits = torch.einsum('bmid,bmjd->bmij', q.reshape(B, M, P, d).to(dt), k.reshape(B, M, P, d).to(dt))
    logits = logits * (scale if lam is None else lam.reshape(B, M, P, 1).to(dt))
    mask = window_mask(H, W, kernel_size, q.device)
    attn = logits.masked_fill(~mask, float('-inf')).softmax(dim=-1)  # plain neighbourhood attention
    if probs is not None or labels is not None:
        if probs is not None:
            pi = dense_probs(probs.to(dt), cell)
            agree = pi @ pi.transpose(-1, -2)  # (B, Hp, P, P): sum_s pi_i(s) pi_j(s)
        else:
            lab = labels.reshape(B, labels.shape[1], P)
            agree = (lab[..., :, None] == lab[..., None, :]).to(dt)
        u = attn * agree  # Hp = 1 broadcasts over the M heads
        z = u.sum(dim=-1, keepdim=True)
        pos = z > 0
        # A query whose window has zero agreement gets output 0 (and gradient 0).
        attn = torch.where(pos, u / torch.where(pos, z, torch.ones_like(z)), torch.zeros_like(u))
    out = attn @ v.reshape(B, M, P, dv).to(dt)
    return out.reshape(B, M, H, W, dv).to(q.dtype)
