"""Soft superpixel neighbourhood attention (SNA): layers and superpixel probability models.

Paper: Soft Superpixel Neighborhood Attention, K. Gauen and S. Chan, NeurIPS 2024
(https://openreview.net/forum?id=bxH6T1w1FW). Neighbourhood attention over a k x k window whose
weights are re-weighted by how likely query and key pixels belong to the same superpixel
(docs/design.md §4); the op family lives in ``spformer.kernels`` (kernels/neighborhood.py).

* :class:`SoftSuperpixelNeighborhoodAttention2d` -- projections + one op call, channels-last
  (B, H, W, C) like timm's window attention and NATTEN's modules; ``mode`` picks SNA, H-SNA or NA.
* :class:`SlicSuperpixelProbs` -- differentiable SLIC: soft k-means over colour (features) and
  position, fixed or learned compactness and temperature, built on ``superpixel_association``.
* :class:`DeepSuperpixelProbs` -- a few convolutions -> 9-way softmax over the in-grid neighbours.
* :class:`SimpleDenoiser` -- the paper's "simple network", y = f_attn(x W0, g(x W0)) W1 + x W0 W1.

Superpixel probabilities are (B, H, W, 9): pixel p's probability of the superpixel at cell
(y // cell + n // 3 - 1, x // cell + n % 3 - 1), the neighbour order of ``superpixel_association``;
the grid has ceil(H / cell) x ceil(W / cell) superpixels (partial cells at the edges).
"""
import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .kernels import (
    hard_superpixel_attention,
    neighborhood_attention,
    soft_superpixel_attention,
    superpixel_association,
    superpixel_labels,
)
from .kernels.functional import check_backend
from .kernels.neighborhood import BACKENDS, neighbor_superpixels
from .kernels.torch_backend import fold9, pixels_to_cells

MODES = ('sna', 'hsna', 'na')
SCALES = ('fixed', 'learned', 'map')


def _inverse_softplus(y: float) -> float:
    return y + math.log(-math.expm1(-y))


class SoftSuperpixelNeighborhoodAttention2d(nn.Module):
    """Multi-head neighbourhood attention re-weighted by superpixels, on channels-last maps.

    Args:
        dim: channels C (split over ``num_heads``).
        num_heads: heads; the superpixel probabilities may be shared by all or given per head.
        kernel_size: odd window side k (windows shift inward at the borders; inputs need H, W >= k).
        cell: superpixel cell side in pixels (the grid the 9-way probabilities refer to).
        mode: 'sna' (soft probabilities), 'hsna' (hard labels; or probabilities, turned into labels
            with ``superpixel_labels``) or 'na' (plain neighbourhood attention, no superpixels).
        scale: the logit scale lambda: 'fixed' (head_dim**-0.5), 'learned' (one per head) or
            'map' (per pixel and head, predicted by a small conv from the input).
        dist: 'dot' (lambda <q, k>) or 'l2' (-lambda ||q - k||^2, the paper's denoising setting;
            computed as the dot product of [2q, -1] and [k, ||k||^2], equal up to a per-query
            constant that the normalization removes).
        qkv_bias, proj_bias: biases of the projections.
        attn_backend: 'auto', 'torch', 'triton' or 'reference' (see ``spformer.kernels``).
    """

    def __init__(self, dim: int, num_heads: int = 1, kernel_size: int = 7, cell: int = 8, mode: str = 'sna',
                 scale: str = 'fixed', dist: str = 'dot', qkv_bias: bool = True, proj_bias: bool = True,
                 attn_backend: str = 'auto'):
        super().__init__()
        for arg, value in (('dim', dim), ('num_heads', num_heads)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f'{arg} must be an int >= 1, got {value!r}')
        if dim % num_heads:
            raise ValueError(f'dim {dim} must be divisible by num_heads {num_heads}')
        check_backend('attn_backend', attn_backend, BACKENDS)  # the neighbourhood ops' list
        if mode not in MODES:
            raise ValueError(f'mode must be one of {MODES}, got {mode!r}')
        if scale not in SCALES:
            raise ValueError(f'scale must be one of {SCALES}, got {scale!r}')
        if dist not in ('dot', 'l2'):
            raise ValueError(f"dist must be 'dot' or 'l2', got {dist!r}")
        self.dim, self.num_heads, self.head_dim = dim, num_heads, dim // num_heads
        self.kernel_size, self.cell, self.mode, self.dist = kernel_size, cell, mode, dist
        self.attn_backend = attn_backend
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim, bias=proj_bias)
        init = self.head_dim ** -0.5
        self.scale_mode = scale
        self.log_scale = nn.Parameter(torch.full((num_heads, 1, 1), math.log(init))) if scale == 'learned' else None
        self.scale_net = None
        if scale == 'map':
            hidden = max(8, dim)
            self.scale_net = nn.Sequential(nn.Conv2d(dim, hidden, 3, padding=1, padding_mode='replicate'), nn.GELU(),
                                           nn.Conv2d(hidden, num_heads, 3, padding=1, padding_mode='replicate'))
            nn.init.zeros_(self.scale_net[2].weight)
            nn.init.constant_(self.scale_net[2].bias, _inverse_softplus(init))  # starts at head_dim**-0.5

    def _scale(self, x: torch.Tensor):
        if self.log_scale is not None:
            return self.log_scale.exp()  # (heads, 1, 1), broadcasts to (B, heads, H, W)
        if self.scale_net is not None:
            return F.softplus(self.scale_net(x.permute(0, 3, 1, 2)))  # (B, heads, H, W)
        return self.head_dim ** -0.5  # of the projections, also when dist='l2' adds a channel

    def project(self, x: torch.Tensor):
        """x (B, H, W, C) -> q, k, v (B, heads, H, W, head_dim; one more channel for q, k with dist='l2') and
        the logit scale (a float or a tensor broadcasting to (B, heads, H, W))."""
        B, H, W, C = x.shape
        q, k, v = self.qkv(x).view(B, H, W, 3, self.num_heads, self.head_dim).permute(3, 0, 4, 1, 2, 5).unbind(0)
        if self.dist == 'l2':
            q = torch.cat([2 * q, -torch.ones_like(q[..., :1])], dim=-1)
            k = torch.cat([k, k.square().sum(-1, keepdim=True)], dim=-1)
        return q, k, v, self._scale(x)

    def attend(self, q, k, v, scale, probs: Optional[torch.Tensor] = None,
               labels: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The op of ``mode`` on projected q, k, v: (B, heads, H, W, head_dim)."""
        ks, be = self.kernel_size, self.attn_backend
        if self.mode == 'sna':
            if probs is None:
                raise ValueError("mode 'sna' needs probs (B, [heads,] H, W, 9)")
            return soft_superpixel_attention(q, k, v, probs, ks, self.cell, scale=scale, backend=be)
        if self.mode == 'hsna':
            if labels is None:
                if probs is None:
                    raise ValueError("mode 'hsna' needs labels (B, [heads,] H, W) or probs to take them from")
                labels = superpixel_labels(probs, self.cell)
            return hard_superpixel_attention(q, k, v, labels, ks, scale=scale, backend=be)
        return neighborhood_attention(q, k, v, ks, scale=scale, backend=be)

    def forward(self, x: torch.Tensor, probs: Optional[torch.Tensor] = None,
                labels: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x (B, H, W, C); probs (B, [heads,] H, W, 9) for 'sna' (or 'hsna'); labels (B, [heads,] H, W)
        for 'hsna'. Returns (B, H, W, C)."""
        B, H, W, C = x.shape
        out = self.attend(*self.project(x), probs=probs, labels=labels)
        return self.proj(out.permute(0, 2, 3, 1, 4).reshape(B, H, W, C))

    def extra_repr(self) -> str:
        return (f'dim={self.dim}, num_heads={self.num_heads}, kernel_size={self.kernel_size}, cell={self.cell}, '
                f'mode={self.mode}, scale={self.scale_mode}, dist={self.dist}')


def _valid_neighbours(H: int, W: int, cell: int, device) -> torch.Tensor:
    """(H, W, 9) bool: neighbour n of the pixel's cell lies in the superpixel grid."""
    return neighbor_superpixels(H, W, cell, device)[1].view(H, W, 9)


class SlicSuperpixelProbs(nn.Module):
    """Differentiable SLIC: soft k-means over [features, compactness * position / cell].

    Centroids start as the mean of each cell; every iteration assigns each pixel softly to the 9
    superpixels around its cell, p(s) = softmax_s(-temperature * ||f_p - c_s||^2) (through
    ``superpixel_association``), then moves each centroid to the probability-weighted mean of the
    pixels of its 3x3 cells. ``iters`` assignments, ``iters - 1`` centroid updates; the last
    assignment is returned. Gradients flow through all iterations.

    Args:
        cell: superpixel cell side in pixels (grid ceil(H / cell) x ceil(W / cell); the image is
            replicate-padded to whole cells internally).
        iters: number of assignment steps (>= 1).
        compactness: weight m of the position term (0: colour only).
        temperature: softmax temperature on squared distances.
        learn: learn compactness and temperature (log-parametrized, so they stay positive) or keep them fixed.
    """

    def __init__(self, cell: int, iters: int = 5, compactness: float = 0.5, temperature: float = 10.0,
                 learn: bool = False):
        super().__init__()
        if iters < 1:
            raise ValueError(f'iters must be >= 1, got {iters}')
        if temperature <= 0 or compactness < 0:
            raise ValueError(f'temperature must be > 0 and compactness >= 0, got {temperature}, {compactness}')
        self.cell, self.iters, self.learn = cell, iters, learn
        self.use_position = compactness > 0
        if learn:  # log-parametrized: they stay positive
            self.log_compactness = nn.Parameter(torch.tensor(math.log(compactness))) if self.use_position else None
            self.log_temperature = nn.Parameter(torch.tensor(math.log(temperature)))
        else:
            self.fixed = (compactness, temperature)

    def params(self):
        """(compactness, temperature): tensors when learned, floats when fixed."""
        if not self.learn:
            return self.fixed
        m = self.log_compactness.exp() if self.use_position else 0.0
        return m, self.log_temperature.exp()

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> channels-last (B, H', W', C + 2) on the padded image (H', W' whole cells)."""
        B, C, H, W = x.shape
        cell = self.cell
        Hp, Wp = -(-H // cell) * cell, -(-W // cell) * cell
        if (Hp, Wp) != (H, W):
            x = F.pad(x, (0, Wp - W, 0, Hp - H), mode='replicate')
        f = x.permute(0, 2, 3, 1)
        if self.use_position:
            m = self.params()[0]
            yy = torch.arange(Hp, device=x.device, dtype=x.dtype) / cell
            xx = torch.arange(Wp, device=x.device, dtype=x.dtype) / cell
            pos = torch.stack(torch.meshgrid(yy, xx, indexing='ij'), dim=-1)
            f = torch.cat([f, (m * pos).expand(B, Hp, Wp, 2)], dim=-1)
        return f

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, C, H, W) -> probabilities (B, H, W, 9)."""
        B, C, H, W = x.shape
        cell = self.cell
        f = self.features(x)  # (B, Hp, Wp, c)
        Hp, Wp, c = f.shape[1:]
        temperature = self.params()[1]
        fc = pixels_to_cells(f[:, None], cell)  # (B, h, w, n, c)
        cents = fc.mean(dim=3)  # (B, h, w, c)
        q = (2 * temperature * f)[:, None]  # logits 2T <f, c> - T ||c||^2 (-T ||f||^2 cancels)
        for it in range(self.iters):
            bias = -temperature * cents.square().sum(-1)
            probs = superpixel_association(q, cents[:, None], cell, scale=1.0, bias=bias[:, None])  # (B, 1, Hp, Wp, 9)
            if it == self.iters - 1:
                break
            pc = pixels_to_cells(probs, cell)  # (B, h, w, n, 9)
            num = fold9(torch.matmul(pc.transpose(-1, -2), fc))  # (B, h, w, c): sum_p p(s) f_p
            den = fold9(pc.sum(dim=3))  # (B, h, w): sum_p p(s)
            cents = num / den.clamp_min(1e-12)[..., None]  # den > 0: every superpixel sees its own cell
        return probs[:, 0, :H, :W]

    def extra_repr(self) -> str:
        m, t = (float(v) for v in self.params())
        return f'cell={self.cell}, iters={self.iters}, compactness={m:.3g}, temperature={t:.3g}, learn={self.learn}'


class DeepSuperpixelProbs(nn.Module):
    """A few 3x3 convolutions -> 9 logits per pixel -> softmax over the in-grid neighbours.

    Args:
        in_chans: input channels. cell: superpixel cell side in pixels.
        hidden: channels of the hidden convolutions. depth: number of hidden convolutions.
    """

    def __init__(self, in_chans: int, cell: int, hidden: int = 16, depth: int = 2):
        super().__init__()
        self.cell = cell
        layers, c = [], in_chans
        for _ in range(depth):
            layers += [nn.Conv2d(c, hidden, 3, padding=1, padding_mode='replicate'), nn.GELU()]
            c = hidden
        layers.append(nn.Conv2d(c, 9, 1))
        self.net = nn.Sequential(*layers)
        nn.init.zeros_(self.net[-1].weight)  # uniform over the valid neighbours at init
        nn.init.zeros_(self.net[-1].bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, C, H, W) -> probabilities (B, H, W, 9), exactly 0 outside the grid."""
        H, W = x.shape[-2:]
        logits = self.net(x).permute(0, 2, 3, 1)
        return logits.masked_fill(~_valid_neighbours(H, W, self.cell, x.device), float('-inf')).softmax(-1)


class SimpleDenoiser(nn.Module):
    """The SNA paper's "simple network": y = f_attn(x W0, g(x W0)) W1 + x W0 W1 (+ x).

    x W0 lifts the noisy RGB image to ``dim`` channels, g predicts superpixel probabilities from
    those features, one attention layer mixes them, W1 projects back to RGB (W0, W1 without bias).
    ``input_skip`` adds x to the output, as the authors' code does: the same set of functions (W0 W1
    can absorb the identity when dim >= 3), a different starting point (identity + a random W0 W1),
    which trained worse in our short CPU runs.

    Args:
        kind: 'sna-deep' (SNA, :class:`DeepSuperpixelProbs`), 'sna-slic' (SNA, :class:`SlicSuperpixelProbs`
            with learned compactness and temperature), 'hsna' (H-SNA on the argmax of the SLIC
            probabilities) or 'na' (no superpixels).
        dim, num_heads, kernel_size, cell, scale, dist: of the attention layer (see
            :class:`SoftSuperpixelNeighborhoodAttention2d`).
        slic_iters: SLIC iterations. input_skip: add x to the output. attn_backend: op backend.
    """
    KINDS = ('sna-deep', 'sna-slic', 'hsna', 'na')

    def __init__(self, kind: str = 'sna-deep', dim: int = 6, num_heads: int = 1, kernel_size: int = 7, cell: int = 8,
                 scale: str = 'map', dist: str = 'l2', slic_iters: int = 5, input_skip: bool = False,
                 attn_backend: str = 'auto'):
        super().__init__()
        if kind not in self.KINDS:
            raise ValueError(f'kind must be one of {self.KINDS}, got {kind!r}')
        self.kind, self.input_skip = kind, input_skip
        self.lin0 = nn.Linear(3, dim, bias=False)
        self.lin1 = nn.Linear(dim, 3, bias=False)
        mode = {'sna-deep': 'sna', 'sna-slic': 'sna', 'hsna': 'hsna', 'na': 'na'}[kind]
        self.attn = SoftSuperpixelNeighborhoodAttention2d(dim, num_heads, kernel_size, cell, mode, scale, dist,
                                                          attn_backend=attn_backend)
        if kind == 'sna-deep':
            self.superpixels = DeepSuperpixelProbs(dim, cell)
        elif kind in ('sna-slic', 'hsna'):
            self.superpixels = SlicSuperpixelProbs(cell, slic_iters, learn=kind == 'sna-slic')
        else:
            self.superpixels = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, 3, H, W) noisy -> (B, 3, H, W) denoised."""
        f = self.lin0(x.permute(0, 2, 3, 1))  # (B, H, W, dim)
        probs = None
        if self.superpixels is not None:
            g = f.detach() if self.kind == 'hsna' else f  # H-SNA only takes the argmax: no graph to keep
            probs = self.superpixels(g.permute(0, 3, 1, 2))
        y = self.lin1(self.attn(f, probs) + f).permute(0, 3, 1, 2)
        return x + y if self.input_skip else y
