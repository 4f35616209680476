"""Reference backend: dense pixel x superpixel logits with a neighbourhood mask.

Deliberately naive (it builds the full H*W x h*w matrix) and obviously correct; it is the
oracle the fast backends are tested against. Half-precision inputs are computed in fp32.
"""
import torch


def neighborhood(H: int, W: int, h: int, w: int, cell: int, device) -> torch.Tensor:
    """(H*W, h*w) bool: pixel (y, x) may join superpixel (i, j) iff |y//cell - i| <= 1 and |x//cell - j| <= 1."""
    py = torch.arange(H, device=device) // cell
    px = torch.arange(W, device=device) // cell
    si = torch.arange(h, device=device)
    sj = torch.arange(w, device=device)
    near_y = (py[:, None] - si[None, :]).abs() <= 1  # (H, h)
    near_x = (px[:, None] - sj[None, :]).abs() <= 1  # (W, w)
    return (near_y[:, None, :, None] & near_x[None, :, None, :]).reshape(H * W, h * w)


def neighbor_index(H: int, W: int, h: int, w: int, cell: int, device):
    """(H*W, 9) superpixel index of each pixel's k-th neighbour (k = 3*(dy+1) + (dx+1)), and its validity."""
    cy = (torch.arange(H, device=device) // cell)[:, None].expand(H, W).reshape(-1, 1)
    cx = (torch.arange(W, device=device) // cell)[None, :].expand(H, W).reshape(-1, 1)
    k = torch.arange(9, device=device)
    ny, nx = cy + k // 3 - 1, cx + k % 3 - 1
    valid = (ny >= 0) & (ny < h) & (nx >= 0) & (nx < w)
    return (ny.clamp(0, h - 1) * w + nx.clamp(0, w - 1)), valid


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float32 if t.dtype in (torch.float16, torch.bfloat16) else t.dtype


def _pixel_logits(q_p, k_s, cell, scale, bias=None):
    B, _, H, W, d = q_p.shape
    M, h, w = k_s.shape[1:4]
    q_p = q_p.expand(B, M, H, W, d)  # a pixel tensor may be shared by all heads
    dt = _compute_dtype(q_p)
    logits = torch.einsum('bmpd,bmsd->bmps', q_p.reshape(B, M, H * W, d).to(dt), k_s.reshape(B, M, h * w, d).to(dt))
    mask = neighborhood(H, W, h, w, cell, q_p.device)
    logits = logits * scale
    if bias is not None:
        logits = logits + bias.reshape(B, M, 1, h * w).to(dt)
    return logits.masked_fill(~mask, float('-inf'))


def _to_neighbor_order(attn, H, W, h, w, cell):
    """Pick the (B, M, H*W, h*w) dense weights at each pixel's 9 neighbours -> (B, M, H, W, 9)."""
    B, M = attn.shape[:2]
    idx, valid = neighbor_index(H, W, h, w, cell, attn.device)
    picked = torch.gather(attn, 3, idx.expand(B, M, -1, -1))
    return (picked * valid).reshape(B, M, H, W, 9)


def pixel_attention(q_p, k_s, v_s, cell, scale, bias=None):
    B, _, H, W, _ = q_p.shape
    M, h, w, dv = v_s.shape[1:]
    attn = _pixel_logits(q_p, k_s, cell, scale, bias).softmax(dim=-1)
    out = attn @ v_s.reshape(B, M, h * w, dv).to(attn.dtype)
    weights = _to_neighbor_order(attn, H, W, h, w, cell)
    return out.reshape(B, M, H, W, dv).to(q_p.dtype), weights.to(q_p.dtype)


def superpixel_association(q_p, k_s, cell, scale, bias=None, logits=False):
    B, _, H, W, _ = q_p.shape
    h, w = k_s.shape[2:4]
    dense = _pixel_logits(q_p, k_s, cell, scale, bias)
    if logits:  # picked at each pixel's 9 neighbours; -inf for those outside the image
        idx, valid = neighbor_index(H, W, h, w, cell, dense.device)
        picked = torch.gather(dense, 3, idx.expand(B, dense.shape[1], -1, -1)).masked_fill(~valid, float('-inf'))
        return picked.reshape(B, -1, H, W, 9).to(q_p.dtype)
    return _to_neighbor_order(dense.softmax(dim=-1), H, W, h, w, cell).to(q_p.dtype)


def superpixel_attention(q_s, k_p, v_p, cell, scale):
    B, M, h, w, d = q_s.shape
    H, W, dv = v_p.shape[2:]
    k_p, v_p = k_p.expand(B, M, H, W, d), v_p.expand(B, M, H, W, dv)  # pixels may be shared by all heads
    dt = _compute_dtype(q_s)
    logits = torch.einsum('bmsd,bmpd->bmsp', q_s.reshape(B, M, h * w, d).to(dt), k_p.reshape(B, M, H * W, d).to(dt))
    mask = neighborhood(H, W, h, w, cell, q_s.device).T
    attn = (logits * scale).masked_fill(~mask, float('-inf')).softmax(dim=-1)
    out = attn @ v_p.reshape(B, M, H * W, dv).to(dt)
    return out.reshape(B, M, h, w, dv).to(q_s.dtype)
