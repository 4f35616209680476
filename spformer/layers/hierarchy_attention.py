"""Hierarchy attention: pooled centres -> self-attention over them -> pixel-to-centre cross-attention.

A token mixer for pyramid vision transformers with the call signature of timm's PVTv2 ``Attention``
(``forward(x, feat_size)`` on (B, N, C) tokens of an ``feat_size = (H, W)`` grid), meant to replace
its spatial-reduction attention (SRA). Related public work: PVTv2's SRA and linear SRA (keys and
values from a strided conv / a 7x7 pooled grid; arXiv 2106.13797), Agent Attention (a few pooled
"agent" tokens aggregate from and broadcast to all tokens; arXiv 2312.08874) and STViT's super
tokens (tokens pooled to a grid of super tokens, self-attention over them, upsampled back; arXiv
2211.11167). One block, for tokens x (N = H * W of them):

1. **Centres**: ``F.adaptive_avg_pool2d`` of the token grid to ``pool_size`` S_h x S_w (M = S_h * S_w
   centres; for H not a multiple of S_h the pooling regions have uneven sizes and may overlap, as
   adaptive pooling defines them), then a LayerNorm (as SRA normalizes its reduced tokens).
2. **Self-attention over the centres**: c <- c + proj_c(MHSA(qkv_c(c))), ``num_heads`` heads.
3. **Cross-attention**: pixel queries q(x), centre keys and values kv(c), ``num_heads`` heads, then
   ``proj``. Which centres each pixel sees is the ``mode``:

   - ``'global'``: all M centres (dense attention, ``F.scaled_dot_product_attention``).
   - ``'local'``: the (at most) 9 centres of the 3x3 cells around the pixel's own cell, through
     :func:`spformer.kernels.pixel_attention`, with cell = H / S_h = W / S_w pixels. The grid must be
     a whole number of equal square cells (H % S_h == W % S_w == 0 and H / S_h == W / S_w): a clear
     ``ValueError`` naming ``pool_size`` otherwise.
   - ``'window'``: pixels and centres are partitioned into ``windows`` x ``windows`` windows, and each
     pixel attends the M / windows² centres of its window. Pixel row y lies in window
     ``y * windows // H`` (so any H works; windows may differ in size by one row), centre row i in
     window ``i * windows // S_h`` (``windows`` must divide S_h and S_w). The default
     ``windows = S`` is one centre per window: **the softmax runs over a single key, so it is
     identically 1**. The queries, the keys and the q / k parameters then take no part (their
     gradients are exactly 0) and the block is pool -> (LayerNorm, MHSA) -> v -> proj -> nearest
     upsample (pixel row y reads centre row ``y * S_h // H``, which is F.interpolate's 'nearest' rule
     and always a centre whose pooling region holds the pixel); with ``attn_drop > 0`` in training, that
     one weight is dropped or scaled by 1 / (1 - p), as dropout does to any attention weight. Kept for comparison (it is the
     "each region attends only its own centre" case of the hierarchy design); ``'local'`` is its
     non-degenerate local form.

Costs (:func:`hierarchy_attention_macs`; multiply-accumulates per image, what
``torch.utils.flop_counter`` counts / 2 with SDPA on its math backend): every linear projection
(bias adds not counted), the attention matmuls, the 3x3 op by its registered formula (9 neighbours
per pixel, even at the border); pooling, LayerNorm and softmax are not counted (the counter has no
formula for them; they are O(NC)). With N = H * W and K centres per pixel::

    2 N C^2 + 6 M C^2  (q, proj; qkv_c, proj_c, kv)  +  2 M^2 C  (centre MHSA)  +  2 N K C  (cross)

K = M / P² ('window', P windows per side; the default P² = M gives K = 1), M ('global'), 9 ('local').
"""
from typing import List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from spformer.kernels import pixel_attention
from spformer.kernels.functional import BACKENDS, check_backend

__all__ = ['HierarchyAttention', 'MODES', 'hierarchy_attention_macs', 'sra_macs', 'linear_sra_macs',
           'vanilla_attention_macs']

MODES = ('window', 'local', 'global')
PoolSize = Union[int, Tuple[int, int]]


def _pair(name: str, value, what: str) -> Tuple[int, int]:
    """An int >= 1, or a pair of them, as (rows, columns)."""
    pair = (value, value) if not isinstance(value, (tuple, list)) else tuple(value)
    if len(pair) != 2 or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in pair):
        raise ValueError(f'{name} must be a positive int or a pair (rows, columns) of them ({what}), got {value!r}')
    return pair


class HierarchyAttention(nn.Module):
    """Pool to centres, self-attention over the centres, pixel -> centre cross-attention (module docstring).

    Args:
        dim: channels C of the tokens.
        num_heads: heads of both attentions (C must divide into them).
        mode: ``'window'``, ``'local'`` or ``'global'``: which centres each pixel attends.
        pool_size: S, or (S_h, S_w): the centre grid (M = S_h * S_w centres) the tokens are pooled to.
        windows: ``'window'`` mode only: P windows per side (P must divide S_h and S_w); default
            None = one centre per window (P = S, the degenerate case).
        qkv_bias: biases on the q, kv and centre qkv projections (as PVTv2's ``qkv_bias``).
        attn_drop: dropout on the attention probabilities (not with ``'local'``: the 3x3 op has none).
        proj_drop: dropout after the output projection.
        backend: ``'local'`` mode: the backend of :func:`spformer.kernels.pixel_attention`.
    """

    def __init__(
            self,
            dim: int,
            num_heads: int = 8,
            mode: str = 'local',
            pool_size: PoolSize = 7,
            windows: Optional[PoolSize] = None,
            qkv_bias: bool = True,
            attn_drop: float = 0.,
            proj_drop: float = 0.,
            backend: str = 'auto',
            device=None,
            dtype=None,
    ):
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        if mode not in MODES:
            raise ValueError(f'mode must be one of {MODES}, got {mode!r}')
        for name, value in (('dim', dim), ('num_heads', num_heads)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f'{name} must be a positive int, got {value!r}')
        if dim % num_heads:
            raise ValueError(f'num_heads={num_heads} must divide dim={dim} (channels per head)')
        self.pool_size = _pair('pool_size', pool_size, 'the centre grid')
        if windows is not None and mode != 'window':
            raise ValueError(f"windows is only for mode='window' (got windows={windows!r} with mode={mode!r})")
        if mode == 'window':
            self.windows = self.pool_size if windows is None else _pair('windows', windows, 'windows per side')
            if any(s % p for s, p in zip(self.pool_size, self.windows)):
                raise ValueError(f'windows={windows!r} must divide pool_size={pool_size!r} (whole centre windows)')
        else:
            self.windows = None
        for name, p in (('attn_drop', attn_drop), ('proj_drop', proj_drop)):
            if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 <= p < 1:
                raise ValueError(f'{name} must be a probability in [0, 1), got {p!r}')
        if mode == 'local' and attn_drop:
            raise ValueError(f"attn_drop={attn_drop!r}: mode='local' runs spformer.kernels.pixel_attention, which "
                             f"has no attention dropout; use attn_drop=0")
        check_backend('backend', backend, BACKENDS)
        self.dim, self.num_heads, self.mode, self.backend = dim, num_heads, mode, backend
        self.head_dim = dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.norm = nn.LayerNorm(dim, **dd)
        self.centre_qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias, **dd)
        self.centre_proj = nn.Linear(dim, dim, **dd)
        self.q = nn.Linear(dim, dim, bias=qkv_bias, **dd)
        self.kv = nn.Linear(dim, 2 * dim, bias=qkv_bias, **dd)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim, **dd)
        self.proj_drop = nn.Dropout(proj_drop)

    def extra_repr(self) -> str:
        windows = f', windows={self.windows}' if self.mode == 'window' else ''
        return f'mode={self.mode!r}, pool_size={self.pool_size}{windows}, num_heads={self.num_heads}'

    def _split(self, t: torch.Tensor) -> torch.Tensor:
        """(B, L, C) -> (B, heads, L, head_dim)."""
        return t.unflatten(-1, (self.num_heads, self.head_dim)).transpose(1, 2)

    def centres(self, x: torch.Tensor, feat_size: Sequence[int]) -> torch.Tensor:
        """Steps 1-2: the (B, M, C) centres after pooling, LayerNorm and their self-attention (residual)."""
        B, N, C = x.shape
        H, W = feat_size
        c = F.adaptive_avg_pool2d(x.transpose(1, 2).reshape(B, C, H, W), self.pool_size)
        c = self.norm(c.flatten(2).transpose(1, 2))
        q, k, v = self.centre_qkv(c).unflatten(-1, (3, self.num_heads, self.head_dim)).permute(2, 0, 3, 1, 4).unbind(0)
        a = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop.p if self.training else 0.)
        return c + self.centre_proj(a.transpose(1, 2).flatten(2))

    def forward(self, x: torch.Tensor, feat_size: List[int]) -> torch.Tensor:
        B, N, C = x.shape
        H, W = int(feat_size[0]), int(feat_size[1])
        if H * W != N or C != self.dim:
            raise ValueError(f'HierarchyAttention: x of shape {tuple(x.shape)} must be (B, H*W, dim={self.dim}) for '
                             f'feat_size=({H}, {W})')
        Sh, Sw = self.pool_size
        if self.mode == 'local' and (H % Sh or W % Sw or H // Sh != W // Sw):
            raise ValueError(f"HierarchyAttention(mode='local'): a {H}x{W} token grid is not a whole number of equal "
                             f"square cells over pool_size={self.pool_size} centres; choose a pool_size that divides "
                             f"it with H / S_h == W / S_w (e.g. S = H / cell)")
        c = self.centres(x, (H, W))
        k, v = self.kv(c).unflatten(-1, (2, self.num_heads, self.head_dim)).permute(2, 0, 3, 1, 4).unbind(0)
        q = self._split(self.q(x))  # (B, heads, N, d)
        drop = self.attn_drop.p if self.training else 0.
        if self.mode == 'global':
            out = F.scaled_dot_product_attention(q, k, v, dropout_p=drop)
        elif self.mode == 'local':
            grid = lambda t, h, w: t.unflatten(2, (h, w))  # noqa: E731  (B, heads, h, w, d)
            out = pixel_attention(grid(q, H, W), grid(k, Sh, Sw), grid(v, Sh, Sw), cell=H // Sh, scale=self.scale,
                                  backend=self.backend).flatten(2, 3)
        else:
            out = self._window_attention(q, k, v, H, W)
        out = self.proj(out.transpose(1, 2).reshape(B, N, C))
        return self.proj_drop(out)

    def _window_attention(self, q, k, v, H: int, W: int) -> torch.Tensor:
        """Each pixel over the centres of its window: the window's keys and values gathered per pixel
        (K = M / P² of them; K = 1 by default, where this is a nearest upsample of v)."""
        B, heads, M, d = k.shape
        (Sh, Sw), (Ph, Pw) = self.pool_size, self.windows

        def windowed(t):  # (B, heads, M, d) -> (B, heads, Ph, Pw, K, d)
            t = t.reshape(B, heads, Ph, Sh // Ph, Pw, Sw // Pw, d).permute(0, 1, 2, 4, 3, 5, 6)
            return t.reshape(B, heads, Ph, Pw, (Sh // Ph) * (Sw // Pw), d)

        wy = torch.arange(H, device=q.device) * Ph // H  # each pixel row's window
        wx = torch.arange(W, device=q.device) * Pw // W
        kw, vw = (windowed(t)[:, :, wy[:, None], wx[None, :]].flatten(2, 3) for t in (k, v))  # (B, heads, N, K, d)
        attn = (q.unsqueeze(-2) * self.scale) @ kw.transpose(-1, -2)  # (B, heads, N, 1, K)
        attn = self.attn_drop(attn.softmax(dim=-1))
        return (attn @ vw).squeeze(-2)


# ------------------------------------------------------------------------------------------ cost model

def _check_ints(**values):
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f'{name} must be a positive int, got {value!r}')


def _check_heads(C: int, heads: int):
    _check_ints(heads=heads)
    if C % heads:
        raise ValueError(f'heads={heads} must divide C={C}')


def hierarchy_attention_macs(mode: str, h: int, w: int, C: int, M: int, P: Optional[int] = None,
                             heads: int = 1) -> int:
    """Multiply-accumulates of one :class:`HierarchyAttention` forward on one h x w image of C channels
    with M centres (what ``torch.utils.flop_counter`` counts / 2, SDPA on its math backend)::

        2 N C^2 + 6 M C^2 + 2 M^2 C + 2 N K C,   N = h w,

    K = M / P² for ``'window'`` (P windows per side; default P² = M, K = 1), M for ``'global'`` (P
    must be None or 1) and 9 for ``'local'`` (P must be None; the 3x3 op's registered formula counts
    9 neighbours for every pixel, border pixels included, where it computes fewer). ``heads`` does not
    change the count (heads * head_dim = C) and is only checked to divide C.
    """
    if mode not in MODES:
        raise ValueError(f'mode must be one of {MODES}, got {mode!r}')
    _check_ints(h=h, w=w, C=C, M=M)
    _check_heads(C, heads)
    N = h * w
    if mode == 'window':
        if P is None:
            K = 1
        else:
            _check_ints(P=P)
            if M % (P * P):
                raise ValueError(f'P={P}: M={M} centres do not split into P x P = {P * P} equal windows')
            K = M // (P * P)
    elif mode == 'global':
        if P not in (None, 1):
            raise ValueError(f"P={P!r}: mode='global' is one window (P=1 or None)")
        K = M
    else:
        if P is not None:
            raise ValueError(f"P={P!r}: mode='local' has no windows (each pixel sees the 3x3 cells around it)")
        K = 9
    return 2 * N * C * C + 6 * M * C * C + 2 * M * M * C + 2 * N * K * C


def vanilla_attention_macs(h: int, w: int, C: int, heads: int = 1) -> int:
    """Multi-head self-attention over all N = h w tokens with q, k, v and output projections (timm's
    PVTv2 ``Attention`` with ``sr_ratio=1``): 4 N C^2 + 2 N^2 C."""
    _check_ints(h=h, w=w, C=C)
    _check_heads(C, heads)
    N = h * w
    return 4 * N * C * C + 2 * N * N * C


def sra_macs(h: int, w: int, C: int, sr_ratio: int, heads: int = 1) -> int:
    """PVTv2's spatial-reduction attention (timm ``pvt_v2.Attention(sr_ratio=r)``): keys and values from
    an r x r stride-r conv of the grid (M' = (h // r) (w // r) tokens, r² C² MACs each), then a LayerNorm::

        2 N C^2 (q, proj) + M' r^2 C^2 (conv) + 2 M' C^2 (kv) + 2 N M' C (attention);

    ``sr_ratio=1`` is :func:`vanilla_attention_macs`."""
    _check_ints(h=h, w=w, C=C, sr_ratio=sr_ratio)
    _check_heads(C, heads)
    if sr_ratio == 1:
        return vanilla_attention_macs(h, w, C, heads)
    if sr_ratio > min(h, w):
        raise ValueError(f'sr_ratio={sr_ratio} is larger than the {h}x{w} grid')
    N, Mr = h * w, (h // sr_ratio) * (w // sr_ratio)
    return 2 * N * C * C + Mr * sr_ratio * sr_ratio * C * C + 2 * Mr * C * C + 2 * N * Mr * C


def linear_sra_macs(h: int, w: int, C: int, pool: int = 7, heads: int = 1) -> int:
    """PVTv2's linear SRA (``linear_attn=True``: adaptive average pool to pool x pool, a 1x1 conv,
    LayerNorm, GELU, then keys and values): with P = pool²,
    2 N C^2 (q, proj) + 3 P C^2 (conv, kv) + 2 N P C (attention) = 2 N C^2 + 147 C^2 + 98 N C at pool 7."""
    _check_ints(h=h, w=w, C=C, pool=pool)
    _check_heads(C, heads)
    N, P = h * w, pool * pool
    return 2 * N * C * C + 3 * P * C * C + 2 * N * P * C
