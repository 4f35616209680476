""" SPFormer: superpixel vision transformers

A pixel stream (stride 4, narrow) and a superpixel token stream (one token per cell of
cell x cell pixels, wide) run side by side. Superpixel cross-attention (SCA) lets every
token gather the pixels of the 3x3 cells around it and every pixel soft-assign itself to
the (at most) 9 tokens around it; ordinary ViT blocks then mix the tokens. Stage 2
regenerates the superpixels against pixel features updated from stage 1's tokens.

Papers:
    `SPFormer: Enhancing Vision Transformer with Superpixel Representation`
        - https://arxiv.org/abs/2401.02931
    `Superpixel Transformers for Efficient Semantic Segmentation` (the SCA predecessor)
        - https://arxiv.org/abs/2309.16889

Hierarchical variants (docs/design.md §2) add a third level inside the last stage: a group
block pools the superpixel tokens into group tokens (2x2 cells: 14x14 -> 7x7), lets the groups
gather their superpixels, runs ViT blocks over the groups and gives the result back to the
superpixels ("ungroup"). Groups are global (multi-head cross-attention between all superpixels and
all groups) or local (the SCA layer one level up: superpixel tokens as its pixels, groups as its
superpixels, 9 candidate groups per superpixel). The pixel -> group assignment composes the pixel
-> superpixel and superpixel -> group associations (``SPFormer.forward_groups``).

Architecture and the figures this implementation must reproduce: docs/design.md §1.
Model names: ``spformer_{size}_sp{token stride}_{image size}``, e.g. ``spformer_small_sp16_224``
has one superpixel token per 16x16 pixels (14x14 tokens) at 224 px; ``spformer_hier_{size}[_local]_...``
are the hierarchical variants (global groups, or ``_local`` ones).
"""
import contextlib
import math
from functools import partial
from typing import Any, Dict, List, NamedTuple, Optional, Set, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import LayerScale, create_conv2d, resample_abs_pos_embed, trunc_normal_
from timm.layers import register_notrace_function, register_notrace_module
from timm.models import generate_default_cfgs, register_model
from timm.models._features import feature_take_indices
from timm.models._features_fx import FeatureGraphNet
from timm.models._manipulate import checkpoint
from timm.models.vision_transformer import Block

from spformer.allocator import prime_glibc_heap
from spformer.kernels import OWN_CELL_MARGIN, cells_to_image, image_to_cells, native_pixel_layout, pixel_attention, \
    superpixel_association, superpixel_attention, superpixel_labels, upsample_association
from spformer.kernels import cpu_backend
from spformer.kernels.functional import capturing_graph, check_backend, exporting_onnx, fused_inference_kernel, \
    records_autograd
from spformer.models.pretrained import build_model_with_weights, published_source, unwrapped_key

__all__ = ['SPFormer']


def split_heads(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """(B, H, W, heads * d) channels-last -> (B, heads, H, W, d) view."""
    B, H, W, C = x.shape
    return x.view(B, H, W, num_heads, C // num_heads).permute(0, 3, 1, 2, 4)


def add_cell_update(pixels: torch.Tensor, update: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
    """``pixels + gamma * update`` for channels-last pixels (B, H, W, C) and a per-head update as
    :func:`pixel_attention` returns it: (B, heads, H, W, C / heads) (image layout), or cell-major
    (B, heads, h, w, cell*cell, C / heads) with ``pixel_layout='cells'``, where the one pass also
    undoes the cell-major layout (the result follows the layout of ``pixels``). Both are views of a
    heads-last tensor."""
    B, H, W, C = pixels.shape
    if update.dim() == 5:
        return torch.addcmul(pixels, update.movedim(1, -2).reshape(B, H, W, C), gamma)
    _, M, h, w, n, d = update.shape
    cell = H // h
    update = update.movedim(1, -2).reshape(B, h, w, cell, cell, C)  # a view of the heads-last result
    out = torch.addcmul(pixels.view(B, h, cell, w, cell, C).transpose(2, 3), update, gamma)
    return out.transpose(2, 3).reshape(B, H, W, C)


def identity_folded_weight(conv: nn.Conv2d) -> torch.Tensor:
    """The weight of a 'same' depthwise conv with the identity added to its centre tap: one conv
    computes ``x + conv(x)`` (saves a pass over the pixel map)."""
    w = conv.weight
    ky, kx = w.shape[2] // 2, w.shape[3] // 2
    return w + F.pad(w.new_ones(w.shape[0], 1, 1, 1), (kx, w.shape[3] - 1 - kx, ky, w.shape[2] - 1 - ky))


def conv_plus_identity(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """``x + conv(x)`` for a 'same' depthwise conv on channels-last (B, H, W, C) ``x``, as one conv (two
    ops while ``torch.onnx.export`` traces: the TorchScript-based exporter needs a convolution's weight
    to be a parameter of known shape, not one computed in the graph)."""
    if exporting_onnx():
        return x + conv(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
    y = F.conv2d(x.permute(0, 3, 1, 2), identity_folded_weight(conv), conv.bias, conv.stride, conv.padding,
                 conv.dilation, conv.groups)
    return y.permute(0, 2, 3, 1)


def project_heads(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Per-head linear map: x (B, h, w, M, d), weight (M, d, c) -> (B, M, h, w, c) as a view of a
    heads-last (B, h, w, M, c) tensor. The ops gather superpixel tensors per cell, all heads at once:
    heads-last memory makes that gather copy contiguous rows (the einsum alone puts the heads
    outermost, and the gather from it costs several times more than this small copy)."""
    return torch.einsum('bhwmd,mdc->bhwmc', x, weight).contiguous().permute(0, 3, 1, 2, 4)


def project_heads_bias(x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """``<x, bias>`` per head: x (B, h, w, M, d), bias (M, d) -> (B, M, h, w), heads-last in memory."""
    return torch.einsum('bhwmd,md->bhwm', x, bias).contiguous().permute(0, 3, 1, 2)


def add_head_projections(
        x: torch.Tensor, heads: torch.Tensor, weight: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor,
        layer_scale: torch.Tensor) -> torch.Tensor:
    """``x + layer_scale * concat_m(gamma_m * (weight_m heads_m) + beta_m)``: x (B, h, w, C), heads
    (B, M, h, w, c), weight (M, C / M, c), gamma and beta (M, C / M), layer_scale (C,). The scales
    fold into the small weights and the residual joins the per-head GEMM (``baddbmm``): one product
    and one layout pass instead of a layout copy and four elementwise passes."""
    B, M, h, w, c = heads.shape
    ls = layer_scale.view(M, -1)
    C = x.shape[-1]  # explicit sizes throughout: an empty batch (B = 0) leaves no -1 to infer
    residual = (x + (beta * ls).reshape(-1)).view(B * h * w, M, C // M).transpose(0, 1)  # (M, BHW, C / M)
    scaled = weight * (gamma * ls).unsqueeze(-1)  # (M, C / M, c)
    heads = heads.permute(1, 0, 2, 3, 4).reshape(M, B * h * w, c)
    # Outside autocast: the residual stream keeps its dtype (baddbmm would come out in bf16/fp16).
    with autocast_disabled(x.device.type):
        out = torch.baddbmm(residual, heads.to(residual.dtype), scaled.transpose(1, 2).to(residual.dtype))
    return out.transpose(0, 1).reshape(B, h, w, C)


def autocast_enabled(device_type: str) -> bool:
    """``torch.is_autocast_enabled(device_type)``, False on the meta device, which has no autocast
    state (torch raises there): shape-only forwards of a model built with ``device='meta'``."""
    return device_type != 'meta' and torch.is_autocast_enabled(device_type)


def autocast_disabled(device_type: str):
    """A context that leaves autocast on ``device_type``; nothing to leave on the meta device."""
    return torch.autocast(device_type, enabled=False) if device_type != 'meta' else contextlib.nullcontext()


def softmax_fp32(x: torch.Tensor, dim: int) -> torch.Tensor:
    """Softmax in at least fp32 (bf16/fp16 logits under autocast), keeping fp64 as fp64."""
    return x.softmax(dim=dim, dtype=torch.promote_types(x.dtype, torch.float32))


def centred_projection(weight: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """For a bias-free projection W followed by a LayerNorm over its outputs: (Wc, G) with Wc = W minus
    its mean row and G = Wc^T Wc / rows, so that ``LayerNorm(W x) = gamma * (Wc x) * r + beta`` with
    ``r = (x^T G x + eps)^-1/2`` (the mean of W x is the mean row times x; its variance is x^T G x).
    The normalization then costs a pass over the narrow x instead of passes over the wide W x."""
    wc = weight - weight.mean(dim=0, keepdim=True)
    return wc, wc.t() @ wc / weight.shape[0]


def gram_factor(wc: torch.Tensor, gram: torch.Tensor) -> torch.Tensor:
    """Upper-triangular R with R^T R = G = Wc^T Wc / rows, not differentiated: it only evaluates
    x^T G x = |R x|^2, the gradient flows through G. The Cholesky factor of G (a 64 x 64 matrix for
    SPFormer, ~10x cheaper than a QR of the 512 x 64 Wc); where G is numerically singular, from a QR
    of Wc (which exists for any G)."""
    with torch.no_grad():
        dt = wc.dtype if wc.dtype in (torch.float32, torch.float64) else torch.float32
        factor, info = torch.linalg.cholesky_ex(gram.to(dt), upper=True)
        if info.item() != 0:  # a host tensor: no device sync
            factor = torch.linalg.qr(wc.to(dt), mode='r').R / math.sqrt(wc.shape[0])
        return factor.to(wc.dtype)


def _projection_rstd(x: torch.Tensor, gram: torch.Tensor, factor: Optional[torch.Tensor], eps: float) -> torch.Tensor:
    """``(x^T G x + eps)^-1/2`` per row, on its own temporaries (not for autograd to record). With
    the factor R of :func:`gram_factor` it is one product and one norm pass (``x G`` then a
    multiply and a sum make two passes over a pixel-sized product)."""
    if factor is not None:
        return torch.linalg.vector_norm(torch.matmul(x, factor.t()), dim=-1, keepdim=True).square_().add_(eps).rsqrt_()
    return torch.matmul(x, gram).mul_(x).sum(dim=-1, keepdim=True).add_(eps).rsqrt_()


def _cell_views(x: torch.Tensor, cell: int) -> torch.Tensor:
    """Channels-last (B, H, W, c) as (B, h, cell, w, cell, c): a view indexed like the image whose
    memory order may be the image's or, transposed, the cell-major one."""
    B, H, W, c = x.shape
    return x.reshape(B, H // cell, cell, W // cell, cell, c)


def _scaled_cells(x: torch.Tensor, r: torch.Tensor, cell: int) -> torch.Tensor:
    """``image_to_cells(x * r)`` in one pass: (B, H, W, C) and (B, H, W, 1) -> (B, 1, h, w, cell * cell, C)."""
    B, H, W, C = x.shape
    out = x.new_empty(B, 1, H // cell, W // cell, cell * cell, C)
    torch.mul(_cell_views(x, cell), _cell_views(r, cell), out=out.view(B, H // cell, W // cell, cell, cell, C).transpose(2, 3))
    return out


class _RescaleByProjectionStd(torch.autograd.Function):
    """``image_to_cells(x * (x^T G x + eps)^-1/2)`` per pixel row (G symmetric): channels-last pixels
    (B, H, W, C) in, cell-major (B, 1, h, w, cell * cell, C) out, the rescaling and the layout copy
    in one pass. The hand-written backward saves only x and the per-row scale (autograd would
    keep x G too, a pixel-sized tensor per SCA iteration) and makes fewer passes over the pixels:
    dx = r g - (g.x) r^3 G x,  dG = -1/2 sum_p (g_p.x_p) r_p^3 x_p x_p^T."""

    @staticmethod
    def forward(ctx, x, gram, factor, eps: float, cell: int):
        r = _projection_rstd(x, gram, factor, eps)
        ctx.save_for_backward(x, gram, r)
        ctx.cell = cell
        return _scaled_cells(x, r, cell)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        x, gram, r = ctx.saved_tensors
        cell = ctx.cell
        B, H, W, C = x.shape
        # the cell-major gradient read in image order (a view): no layout copy
        g = grad.reshape(B, H // cell, W // cell, cell, cell, C).transpose(2, 3)
        xv, rv = _cell_views(x, cell), _cell_views(r, cell)
        coef = (g * xv).sum(dim=-1, keepdim=True).mul_(rv.pow(3))  # (g.x) r^3
        d_x = d_gram = None
        if ctx.needs_input_grad[0]:
            d_x = torch.empty_like(x, memory_format=torch.contiguous_format)
            dv = _cell_views(d_x, cell)
            torch.mul(g, rv, out=dv)
            dv.sub_(_cell_views(torch.matmul(x, gram), cell).mul_(coef))
        if ctx.needs_input_grad[1]:
            flat = x.reshape(-1, C)
            d_gram = (flat * coef.reshape(-1, 1)).t().matmul(flat).mul_(-0.5)
        return d_x, d_gram, None, None, None


def rescale_to_cells(x: torch.Tensor, wc: torch.Tensor, gram: torch.Tensor, eps: float, cell: int,
                     cells: bool = True, backend: str = 'auto') -> torch.Tensor:
    """``image_to_cells(x * r)`` with r of :func:`centred_projection`: channels-last pixels (B, H, W, C)
    divided by the std of their projection, returned cell-major (B, 1, h, w, cell * cell, C) as the
    attention ops read them, or with ``cells=False`` in image layout (B, 1, H, W, C), which the
    fused kernels read as they are. Each fresh pixel-sized buffer costs on CPU (first-touch page
    faults when the allocator has returned the memory to the OS), hence one pass and one output.
    Inference on the Triton ``backend`` (image layout) runs it as one fused kernel."""
    # Under CUDA autocast the ops run on the autocast dtype, as autocast runs attention; the GPU
    # kernels read it natively (fp32 accumulation and probabilities), ~2x faster than fp32 on an H100.
    cuda_autocast = x.is_cuda and torch.is_autocast_enabled('cuda')
    out_dtype = torch.get_autocast_dtype('cuda') if cuda_autocast else x.dtype
    rescale_rows = None if cells else fused_inference_kernel(backend, 'rescale_rows', x, gram)
    if rescale_rows is not None:
        return rescale_rows(x, gram, eps, out_dtype).unsqueeze(1)
    if autocast_enabled(x.device.type) or capturing_graph():
        var = (torch.matmul(x, gram) * x).sum(dim=-1, keepdim=True)
        out = (x * torch.rsqrt(var + eps)).unsqueeze(1).to(out_dtype)
        return image_to_cells(out, cell) if cells else out
    # R costs a small Cholesky factorization per call; on the CPU it saves a pass over the pixels
    # (elsewhere x G is cheap)
    factor = gram_factor(wc, gram) if x.device.type == 'cpu' else None
    # image layout is the cell-major one of cells of one pixel
    group = cell if cells else 1
    if records_autograd(x, gram):
        out = _RescaleByProjectionStd.apply(x, gram, factor, eps, group)
    else:
        out = _scaled_cells(x, _projection_rstd(x, gram, factor, eps), group)
    return out if cells else out.view(x.shape[0], 1, *x.shape[1:])


def pixel_features(conv: nn.Conv2d, pixels: torch.Tensor, wc: torch.Tensor, gram: torch.Tensor, eps: float,
                   cell: int, cells: bool = True, backend: str = 'auto') -> torch.Tensor:
    """An SCA iteration's rescaled pixel features, ``rescale_to_cells(conv_plus_identity(conv, pixels),
    ...)``. Inference on the CPU's C kernels (image layout) computes both in one pass over the
    pixels, ~2x faster than the convolution, product, norm and scaling passes
    (``cpu_backend.conv_rescale``)."""
    C = pixels.shape[-1]
    same_3x3 = (conv.kernel_size, conv.stride, conv.padding, conv.dilation, conv.groups) == (
        (3, 3), (1, 1), (1, 1), (1, 1), C)  # what the C kernel computes
    conv_rescale = None if cells or not same_3x3 else fused_inference_kernel(
        backend, 'conv_rescale', pixels, conv.weight, conv.bias, wc)
    if conv_rescale is not None:
        taps = identity_folded_weight(conv).reshape(C, 9).t()  # (9, C), raster order of the 3x3 window
        out = conv_rescale(pixels, taps, conv.bias, gram_factor(wc, gram), eps)
        if out is not None:
            return out.unsqueeze(1)
    return rescale_to_cells(conv_plus_identity(conv, pixels), wc, gram, eps, cell, cells=cells, backend=backend)


class Association(NamedTuple):
    """The superpixel-update logits of an SCA iteration, in projection-free form.

    Head m's logit between pixel p and superpixel j is ``<pixels[p], queries[m, j]> + bias[m, j]``
    (already divided by sqrt(head_dim)); it equals ``<k_p, q_s>_m / sqrt(d)`` of docs/design.md §1.3.
    """
    # shared by all heads: cell-major (B, 1, h, w, cell*cell, pixel_dim), or (B, 1, H, W, pixel_dim)
    # in image layout for the backends that read it directly (pixel_layout)
    pixels: torch.Tensor
    queries: torch.Tensor  # (B, M, h, w, pixel_dim)
    bias: torch.Tensor  # (B, M, h, w)

    @property
    def pixel_layout(self) -> str:
        return 'cells' if self.pixels.dim() == 6 else 'image'


class SuperpixelCrossAttention(nn.Module):
    """One SCA iteration (docs/design.md §1.3): tokens gather pixels, pixels gather tokens.

    Pixels are channels-last (B, H, W, pixel_dim), superpixels (B, h, w, embed_dim). Each of the
    ``num_heads`` heads has its own 9-way association (multi-head association).

    The parameters are those of docs/design.md §1.3 (a bias-free 1x1 projection of the pixels to
    2 * pixel_dim + embed_dim channels and one LayerNorm over all of them), but the pixel q|k|v is
    never built (docs/design.md §1.5): with Wc the projection minus its mean row, the normalized output is
    ``gamma * (Wc x) * r + beta`` with ``r = (x^T G x + eps)^-1/2`` and ``G = Wc^T Wc / channels``. So
    logits against pixel keys become ``<r x, Wc_k^T (gamma_k * q)> + <beta_k, q>`` and a weighted sum
    of pixel values becomes ``gamma_v * Wc_v (sum a r x) + beta_v``: the attention runs on the narrow
    pixel features ``r x`` (one tensor for all heads) and the wide projection happens once per
    superpixel. The result equals the direct computation (tests/test_models.py checks it against a
    naive one).
    """

    def __init__(
            self,
            pixel_dim: int,
            embed_dim: int,
            num_heads: int,
            cell_size: int,
            update_pixels: bool = True,
            init_values: float = 1e-5,
            norm_layer=partial(nn.LayerNorm, eps=1e-6),
            attn_backend: str = 'auto',
            device=None,
            dtype=None,
    ):
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        if pixel_dim % num_heads or embed_dim % num_heads:
            raise ValueError(
                f'sca_heads={num_heads} must divide pixel_dim={pixel_dim} and embed_dim={embed_dim}')
        self.pixel_dim = pixel_dim
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.cell_size = cell_size
        self.attn_backend = attn_backend
        # Conditional position encodings: they feed the projections only.
        self.pixel_pos = nn.Conv2d(pixel_dim, pixel_dim, 3, padding=1, groups=pixel_dim, **dd)
        self.sp_pos = nn.Conv2d(embed_dim, embed_dim, 3, padding=1, groups=embed_dim, **dd)
        # 1x1 convs as Linear on channels-last; one LayerNorm over all q|k|v channels at once.
        self.sp_qkv = nn.Linear(embed_dim, 3 * pixel_dim, bias=False, **dd)
        self.sp_norm = norm_layer(3 * pixel_dim, **dd)
        self.pixel_qkv = nn.Linear(pixel_dim, 2 * pixel_dim + embed_dim, bias=False, **dd)
        self.pixel_norm = norm_layer(2 * pixel_dim + embed_dim, **dd)
        self.sp_ls = LayerScale(embed_dim, init_values, **dd)
        # The last iteration of a stage skips the pixel update, so it has no pixel LayerScale.
        self.pixel_ls = LayerScale(pixel_dim, init_values, **dd) if update_pixels else None

    def _pixel_projection(self):
        """Per-head pieces of the centred pixel projection: (Wc_q, Wc_k, Wc_v) as (M, rows, C_p),
        the LayerNorm affine split the same way, and G = Wc^T Wc / channels."""
        C_p, C, M = self.pixel_dim, self.embed_dim, self.num_heads
        wc, gram = centred_projection(self.pixel_qkv.weight)
        wq, wk, wv = wc.split([C_p, C_p, C])
        gamma = self.pixel_norm.weight.split([C_p, C_p, C])
        beta = self.pixel_norm.bias.split([C_p, C_p, C])
        heads = lambda t: t.reshape(M, t.shape[0] // M, *t.shape[1:])  # noqa: E731
        return [heads(t) for t in (wq, wk, wv)], [heads(t) for t in gamma], [heads(t) for t in beta], wc, gram

    def forward(
            self, pixels: torch.Tensor, superpixels: torch.Tensor,
    ) -> Tuple[torch.Tensor, torch.Tensor, Association]:
        """Returns (pixels, superpixels, association of the superpixel update)."""
        C_p, M, cell = self.pixel_dim, self.num_heads, self.cell_size
        B, H, W, _ = pixels.shape
        _, h, w, C = superpixels.shape
        scale = (C_p // M) ** -0.5
        (wq, wk, wv), (gq, gk, gv), (bq, bk, bv), wc, gram = self._pixel_projection()

        # r x, shared by both ops, in the layout the backend reads without a copy: image layout for
        # the fused C and Triton kernels, else cell-major (B, 1, h, w, n, C_p), the layout copy made
        # here, in the same pass as the rescaling.
        layout = 'cells' if capturing_graph() else native_pixel_layout(self.attn_backend, pixels.device)
        x_hat = pixel_features(self.pixel_pos, pixels, wc, gram, self.pixel_norm.eps, cell, cells=layout == 'cells',
                               backend=self.attn_backend)

        s = conv_plus_identity(self.sp_pos, superpixels)
        q_s, k_s, v_s = self.sp_norm(self.sp_qkv(s)).split([C_p, C_p, C_p], dim=-1)
        q_s, k_s = q_s.reshape(B, h, w, M, C_p // M), k_s.reshape(B, h, w, M, C_p // M)

        # Superpixel update: logits <k_p, q_s>; the bias <beta_k, q_s> is constant over a
        # superpixel's pixels and cancels in its softmax.
        # Under autocast the projections may come out in another dtype than x_hat (LayerNorm runs
        # in fp32 on CUDA): the ops take one dtype, x_hat's.
        dt = x_hat.dtype
        queries = project_heads(q_s * gk * scale, wk).to(dt)
        gathered = superpixel_attention(
            queries, x_hat, x_hat, cell, scale=1.0, backend=self.attn_backend, pixel_layout=layout)
        superpixels = add_head_projections(superpixels, gathered, wv, gv, bv, self.sp_ls.gamma)

        if self.pixel_ls is not None:  # both updates read the old pixels and superpixels
            keys = project_heads(k_s * gq * scale, wq).to(dt)
            key_bias = (project_heads_bias(k_s, bq) * scale).to(dt)
            values = v_s.reshape(B, h, w, M, C_p // M).permute(0, 3, 1, 2, 4).to(dt)
            out = pixel_attention(
                x_hat, keys, values, cell, scale=1.0, bias=key_bias, backend=self.attn_backend, pixel_layout=layout)
            pixels = add_cell_update(pixels, out, self.pixel_ls.gamma)
        association = Association(x_hat, queries, (project_heads_bias(q_s, bk) * scale).to(dt))
        return pixels, superpixels, association


class DenseAssociation(NamedTuple):
    """The logits of a global group cross-attention (:class:`GroupCrossAttention`): head m's logit
    between superpixel token s and group g, already divided by sqrt(head_dim)."""
    logits: torch.Tensor  # (B, M, h*w, number of groups)


class PixelUpdate(nn.Module):
    """Stage-end pixel update ("unfolding"): each pixel takes back its superpixels' tokens.

    P <- P + gamma * sum_j softmax_j(k_p . q_s) proj(S)_j per head, with the logits of the
    stage's last SCA iteration (docs/design.md §1.2, step 3.4).

    One level up it is the ungroup step of a :class:`GroupBlock`: the "pixels" are superpixel tokens
    and the "superpixels" groups. With a :class:`DenseAssociation` (global groups) the softmax runs
    over all groups instead of the 9 around the token's cell.
    """

    def __init__(
            self,
            pixel_dim: int,
            embed_dim: int,
            num_heads: int,
            cell_size: int,
            init_values: float = 1e-5,
            norm_layer=partial(nn.LayerNorm, eps=1e-6),
            attn_backend: str = 'auto',
            device=None,
            dtype=None,
    ):
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        self.num_heads = num_heads
        self.cell_size = cell_size
        self.attn_backend = attn_backend
        self.proj = nn.Linear(embed_dim, pixel_dim, bias=False, **dd)
        self.norm = norm_layer(pixel_dim, **dd)
        self.ls = LayerScale(pixel_dim, init_values, **dd)

    def forward(
            self, pixels: torch.Tensor, superpixels: torch.Tensor, association: Union[Association, DenseAssociation],
    ) -> torch.Tensor:
        if isinstance(association, DenseAssociation):
            B, h, w, C = pixels.shape
            v = self.norm(self.proj(superpixels)).flatten(1, 2)  # (B, G, C)
            v = v.view(B, v.shape[1], self.num_heads, C // self.num_heads).transpose(1, 2)  # (B, M, G, C / M)
            weights = softmax_fp32(association.logits, dim=-1).to(v.dtype)  # over the groups
            update = (weights @ v).transpose(1, 2).reshape(B, h, w, C)
            return pixels + self.ls(update)
        v = split_heads(self.norm(self.proj(superpixels)), self.num_heads).to(association.pixels.dtype)
        update = pixel_attention(
            association.pixels, association.queries, v, self.cell_size, scale=1.0, bias=association.bias,
            backend=self.attn_backend, pixel_layout=association.pixel_layout)
        return add_cell_update(pixels, update, self.ls.gamma)


class CellPooledProjection(torch.autograd.Function):
    """``avg_pool(GELU(LayerNorm(x W^T)), cell)`` for channels-last pixel rows: the forward is the
    one-pass C kernel where it runs, else a few cell rows at a time, as the backward (which
    recomputes the wide map chunk by chunk).

    On CPU the embed_dim-wide map is memory-bound: each pass over it costs about as much as the
    projection, so keeping the chunk in cache is ~3x faster than whole-tensor ops, and the backward
    never materializes the wide map (a checkpointed autograd graph recomputes it whole, 38 MB per
    tensor for SPFormer-S at batch 8, and was ~2x slower). Only the input is saved.
    rows: (B * h, cell, W, C_p) -> (B * h, W / cell, C).
    """

    @staticmethod
    def forward(ctx, rows, weight, gamma, beta, eps: float, cell: int, chunk: int, c_kernel: bool):
        ctx.save_for_backward(rows, weight, gamma, beta)
        ctx.eps, ctx.cell, ctx.chunk = eps, cell, chunk
        R, c, W, _ = rows.shape
        C = weight.shape[0]
        # The backward recomputes from the input alone, so the forward may be the one-pass C kernel.
        fused = cpu_backend.cell_pooled_projection(rows, weight, gamma, beta, eps, c) if c_kernel else None
        if fused is not None:
            return fused.view(R, W // c, C)  # from (R, 1, W / c, C)
        out = rows.new_empty(R, W // c, C)
        for start in range(0, R, chunk):
            part = rows[start:start + chunk]
            y = F.gelu(F.layer_norm(F.linear(part, weight), (C,), gamma, beta, eps))
            # two single-axis sums: ~10x faster than one over both axes of the strided view
            torch.sum(y.sum(1).view(part.shape[0], W // c, c, C), dim=2, out=out[start:start + chunk])
        return out.div_(c * c)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        rows, weight, gamma, beta = ctx.saved_tensors
        c, chunk = ctx.cell, ctx.chunk
        R, _, W, C_p = rows.shape
        C = weight.shape[0]
        grad = grad / (c * c)
        d_rows = torch.empty_like(rows)
        d_weight = torch.zeros_like(weight)
        d_gamma, d_beta = torch.zeros_like(gamma), torch.zeros_like(beta)
        for start in range(0, R, chunk):
            part = rows[start:start + chunk]
            n = part.shape[0]
            z = F.linear(part, weight)
            a, mean, rstd = torch.native_layer_norm(z, (C,), gamma, beta, ctx.eps)
            # every pixel of a cell gets its cell's gradient (made contiguous: gelu_backward runs
            # ~2x slower on the broadcast view)
            g = grad[start:start + chunk].view(n, 1, W // c, 1, C).expand(n, c, W // c, c, C).contiguous()
            da = torch.ops.aten.gelu_backward(g, a.view(n, c, W // c, c, C)).view(n, c, W, C)
            dz, dg, db = torch.ops.aten.native_layer_norm_backward(
                da, z, (C,), mean, rstd, gamma, beta, [True, True, True])
            d_weight.addmm_(dz.reshape(-1, C).t(), part.reshape(-1, C_p))
            torch.matmul(dz, weight, out=d_rows[start:start + chunk])
            d_gamma += dg
            d_beta += db
        return d_rows, d_weight, d_gamma, d_beta, None, None, None, None


class SuperpixelInit(nn.Module):
    """Initial superpixel tokens: 1x1 conv + LayerNorm2d + GELU on the pixels, then the mean over
    every cell (docs/design.md §1.2, step 2).

    Its three embed_dim-wide pixel maps would be the largest tensors kept for backward (3 x 38 MB
    for SPFormer-S at batch 8): on CPU :class:`CellPooledProjection` computes it in cache-sized
    chunks and saves only its input; elsewhere (CUDA, torch.compile, autocast) it is plain autograd
    with the wide maps recomputed in the backward (activation checkpointing). Inference runs one
    fused kernel that never builds the wide map: on the Triton backend (CUDA,
    kernels/pixel_maps_triton.py) and on the CPU's C kernels (kernels/cpu_kernels.c).
    """

    _chunk_bytes = 1 << 20  # the wide map of one chunk: fits in a core's L2 cache with its temporaries

    def __init__(self, pixel_dim: int, embed_dim: int, cell_size: int, norm_layer=partial(nn.LayerNorm, eps=1e-6),
                 attn_backend: str = 'auto', device=None, dtype=None):
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        self.cell_size = cell_size
        self.attn_backend = attn_backend
        self.proj = nn.Linear(pixel_dim, embed_dim, bias=False, **dd)
        self.norm = norm_layer(embed_dim, **dd)
        self.act = nn.GELU()

    def _chunked(self, pixels: torch.Tensor) -> bool:
        return not (pixels.is_cuda or capturing_graph() or autocast_enabled(pixels.device.type)
                    or not self._plain_norm_and_act())

    def _fused_forward(self, pixels: torch.Tensor) -> Optional[torch.Tensor]:
        """The fused forward's result where it applies (:func:`fused_inference_kernel`: the Triton
        kernel, or the C kernel on CPU; the default LayerNorm and GELU); else None."""
        params = self.proj.weight, self.norm.weight, self.norm.bias
        kernel = fused_inference_kernel(self.attn_backend, 'cell_pooled_projection', pixels, *params)
        if kernel is None or not self._plain_norm_and_act():
            return None
        autocast = autocast_enabled(pixels.device.type)
        round_to = torch.get_autocast_dtype(pixels.device.type) if autocast else None
        return kernel(pixels, *params, self.norm.eps, self.cell_size, round_to)

    def _plain_norm_and_act(self) -> bool:
        return type(self.norm) is nn.LayerNorm and self.norm.elementwise_affine and self.act.approximate == 'none'

    def _pooled(self, pixels: torch.Tensor) -> torch.Tensor:
        x = self.act(self.norm(self.proj(pixels)))
        return F.avg_pool2d(x.permute(0, 3, 1, 2), self.cell_size).permute(0, 2, 3, 1)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        B, H, W, _ = pixels.shape
        c = self.cell_size
        fused = self._fused_forward(pixels)
        if fused is not None:
            return fused
        if self._chunked(pixels):
            chunk = max(1, self._chunk_bytes // (c * W * self.proj.out_features * pixels.element_size()))
            pooled = CellPooledProjection.apply(
                pixels.reshape(B * H // c, c, W, pixels.shape[-1]), self.proj.weight, self.norm.weight, self.norm.bias,
                self.norm.eps, c, chunk, self.attn_backend in ('auto', 'cpu'))
            return pooled.view(B, H // c, W // c, self.proj.out_features)
        if torch.is_grad_enabled() and pixels.requires_grad and not torch.jit.is_tracing():
            return torch.utils.checkpoint.checkpoint(self._pooled, pixels, use_reentrant=False)
        return self._pooled(pixels)


class GroupCrossAttention(nn.Module):
    """Global grouping: every group token gathers all superpixel tokens (multi-head cross-attention).

    Group queries from the (pre-normed) groups, keys and values from the (pre-normed) superpixel
    tokens; groups <- groups + gamma * proj(softmax over superpixels(logits) @ v). The logits are
    returned as the superpixel -> group association (softmax over the groups), which the ungroup
    step (:class:`PixelUpdate`) reuses as the SCA family does with its pixel update. Same
    signature as :class:`SuperpixelCrossAttention` with ``update_pixels=False``: the first
    stream (here the superpixel tokens) comes back unchanged.
    """

    def __init__(
            self,
            dim: int,
            num_heads: int,
            qkv_bias: bool = True,
            init_values: float = 1e-5,
            norm_layer=partial(nn.LayerNorm, eps=1e-6),
            device=None,
            dtype=None,
    ):
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        if dim % num_heads:
            raise ValueError(f'group_heads={num_heads} must divide embed_dim={dim}')
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.group_norm = norm_layer(dim, **dd)
        self.sp_norm = norm_layer(dim, **dd)
        self.q = nn.Linear(dim, dim, bias=qkv_bias, **dd)
        self.kv = nn.Linear(dim, 2 * dim, bias=qkv_bias, **dd)
        self.proj = nn.Linear(dim, dim, **dd)
        self.ls = LayerScale(dim, init_values, **dd)

    def forward(
            self, superpixels: torch.Tensor, groups: torch.Tensor,
    ) -> Tuple[torch.Tensor, torch.Tensor, DenseAssociation]:
        """superpixels (B, h, w, C), groups (B, gh, gw, C) -> (superpixels, groups, association)."""
        B, gh, gw, C = groups.shape
        M = self.num_heads
        q = self.q(self.group_norm(groups)).reshape(B, gh * gw, M, C // M).transpose(1, 2)  # (B, M, G, d)
        S = superpixels.shape[1] * superpixels.shape[2]
        k, v = self.kv(self.sp_norm(superpixels)).reshape(B, S, 2, M, C // M).permute(2, 0, 3, 1, 4)  # (B, M, S, d)
        logits = (k * self.scale) @ q.transpose(-1, -2)  # (B, M, S, G)
        attn = softmax_fp32(logits, dim=-2).to(v.dtype)  # each group over all superpixels
        update = (attn.transpose(-1, -2) @ v).transpose(1, 2).reshape(B, gh, gw, C)
        return superpixels, groups + self.ls(self.proj(update)), DenseAssociation(logits)


class GroupBlock(nn.Module):
    """The third level (docs/design.md §2): superpixel tokens -> groups -> ViT blocks over the groups -> ungroup.

    1. Group tokens: the mean of every ``group_size`` x ``group_size`` block of superpixel tokens.
    2. Grouping (groups <- superpixels), which also gives the superpixel -> group association:
       ``'global'``: :class:`GroupCrossAttention`, every group sees every superpixel;
       ``'local'``: :class:`SuperpixelCrossAttention` on the token grid with cells of ``group_size``
       tokens (superpixel tokens as its pixels, groups as its superpixels; each token chooses among
       the 9 groups around its cell, each group gathers the tokens of the 3x3 cells around it).
    3. ``depth`` ViT blocks over the group tokens.
    4. Ungroup (superpixels <- groups): :class:`PixelUpdate` one level up, with the grouping's
       association, LayerScale init ``init_values``.
    """

    def __init__(
            self,
            embed_dim: int,
            num_heads: int,
            group_heads: int,
            group_size: int,
            grouping: str = 'global',
            depth: int = 1,
            mlp_ratio: float = 4.,
            qkv_bias: bool = True,
            proj_drop_rate: float = 0.,
            attn_drop_rate: float = 0.,
            drop_path_rates: Tuple[float, ...] = (),
            init_values: float = 1e-5,
            norm_layer=partial(nn.LayerNorm, eps=1e-6),
            attn_backend: str = 'auto',
            device=None,
            dtype=None,
    ):
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        self.grouping = grouping
        self.group_size = group_size
        self.grad_checkpointing = False
        if grouping == 'local':
            self.group_attn = SuperpixelCrossAttention(
                embed_dim, embed_dim, group_heads, group_size, update_pixels=False, init_values=init_values,
                norm_layer=norm_layer, attn_backend=attn_backend, **dd)
        elif grouping == 'global':
            self.group_attn = GroupCrossAttention(embed_dim, group_heads, qkv_bias, init_values, norm_layer, **dd)
        else:
            raise ValueError(f"grouping must be 'global' or 'local', got {grouping!r}")
        self.blocks = nn.Sequential(*[
            Block(
                dim=embed_dim,
                num_heads=num_heads,
                mlp_ratio=mlp_ratio,
                qkv_bias=qkv_bias,
                proj_drop=proj_drop_rate,
                attn_drop=attn_drop_rate,
                drop_path=drop_path_rates[i] if drop_path_rates else 0.,
                norm_layer=norm_layer,
                **dd,
            )
            for i in range(depth)
        ])
        self.ungroup = PixelUpdate(
            embed_dim, embed_dim, group_heads, group_size, init_values, norm_layer, attn_backend, **dd)

    def _run(self, module: nn.Module, *args):
        if self.grad_checkpointing and not torch.jit.is_scripting():
            return checkpoint(module, *args)
        return module(*args)

    def init_groups(self, superpixels: torch.Tensor) -> torch.Tensor:
        """(B, h, w, C) superpixel tokens -> (B, h / group_size, w / group_size, C) block means."""
        B, h, w, C = superpixels.shape
        g = self.group_size
        return superpixels.reshape(B, h // g, g, w // g, g, C).mean(dim=(2, 4))

    def forward(
            self, superpixels: torch.Tensor,
    ) -> Tuple[torch.Tensor, torch.Tensor, Union[Association, DenseAssociation]]:
        """(B, h, w, C) superpixel tokens -> (updated superpixel tokens, groups (B, gh, gw, C) after the
        ViT blocks, superpixel -> group association)."""
        groups = self.init_groups(superpixels)
        B, gh, gw, C = groups.shape
        _, groups, association = self._run(self.group_attn, superpixels, groups)
        tokens = groups.reshape(B, gh * gw, C)
        for blk in self.blocks:
            tokens = self._run(blk, tokens)
        groups = tokens.reshape(B, gh, gw, C)
        return self._run(self.ungroup, superpixels, groups, association), groups, association


class GroupOutput(NamedTuple):
    stage: int  # 0-based stage of the group block
    groups: torch.Tensor  # (B, gh, gw, C) group tokens after the group block's ViT blocks
    association: Union[Association, DenseAssociation]  # superpixel -> group


class StagesOutput(NamedTuple):
    tokens: torch.Tensor  # (B, h*w, C) after the last block (and self.norm)
    grid: Tuple[int, int]  # (h, w) token grid
    pixels: torch.Tensor  # (B, H/s, W/s, C_p) channels-last, as the last stage reads it
    features: List[Tuple[int, torch.Tensor, Tuple[int, int]]]  # requested (feature index, (B, n, C), grid)
    associations: List[Association]  # per stage, its last SCA iteration's
    groups: List[GroupOutput]


class SPFormerStage(nn.Module):
    """SCA iterations -> absolute position embedding -> ViT blocks -> (pixel update).

    A hierarchical model's last stage also holds a :class:`GroupBlock`, run after the first
    ``group_index`` ViT blocks (:meth:`units` gives the execution order).
    """

    def __init__(
            self,
            pixel_dim: int,
            embed_dim: int,
            grid_size: Tuple[int, int],
            depth: int,
            num_heads: int,
            sca_heads: int,
            sca_iters: int,
            cell_size: int,
            update_pixels: bool,
            mlp_ratio: float = 4.,
            qkv_bias: bool = True,
            proj_drop_rate: float = 0.,
            attn_drop_rate: float = 0.,
            drop_path_rates: Tuple[float, ...] = (),
            init_values: float = 1e-5,
            norm_layer=partial(nn.LayerNorm, eps=1e-6),
            attn_backend: str = 'auto',
            group_block: Optional[GroupBlock] = None,
            group_index: int = 0,
            device=None,
            dtype=None,
    ):
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        self.sca = nn.ModuleList([
            SuperpixelCrossAttention(
                pixel_dim, embed_dim, sca_heads, cell_size,
                update_pixels=i < sca_iters - 1,
                init_values=init_values,
                norm_layer=norm_layer,
                attn_backend=attn_backend,
                **dd,
            )
            for i in range(sca_iters)
        ])
        self.pos_embed = nn.Parameter(torch.zeros(1, grid_size[0] * grid_size[1], embed_dim, **dd))
        self.blocks = nn.Sequential(*[
            Block(
                dim=embed_dim,
                num_heads=num_heads,
                mlp_ratio=mlp_ratio,
                qkv_bias=qkv_bias,
                proj_drop=proj_drop_rate,
                attn_drop=attn_drop_rate,
                drop_path=drop_path_rates[i],
                norm_layer=norm_layer,
                **dd,
            )
            for i in range(depth)
        ])
        self.unfold = PixelUpdate(
            pixel_dim, embed_dim, sca_heads, cell_size, init_values, norm_layer, attn_backend, **dd,
        ) if update_pixels else None
        self.group_block = group_block
        self.group_index = group_index

    def units(self) -> List[nn.Module]:
        """The ViT blocks and the group block (if any) in execution order: one feature each."""
        if self.group_block is None:
            return list(self.blocks)
        return list(self.blocks[:self.group_index]) + [self.group_block] + list(self.blocks[self.group_index:])


# The dtypes autocast casts (to its lower precision dtype) on the way into a convolution; float64 it leaves.
_AUTOCAST_CASTS = (torch.float32, torch.float16, torch.bfloat16)


@register_notrace_function
def check_image_input(
        x: torch.Tensor, in_chans: int, token_stride: int, img_size: Tuple[int, int], dynamic: bool,
        stride_name: str = 'the superpixel token stride', dtype: Optional[torch.dtype] = None,
):
    """Fail early, naming the argument, instead of deep inside a reshape or a convolution. The sides must
    be multiples of ``token_stride`` (``stride_name`` says what it is: the group stride for hierarchical
    models). An empty batch (B = 0) is fine. ``dtype``: the model's parameter dtype, which ``x`` must
    have, but under autocast on ``x``'s device, which takes any of float32/float16/bfloat16 for a model
    in one of them (it casts both to its own dtype), as torch's layers do."""
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f'x must be a 4-D image batch (B, {in_chans}, H, W), got {got}')
    if not x.is_floating_point():
        hint = '' if x.is_complex() else (
            ': normalize it first, e.g. with timm.data.create_transform(**timm.data.resolve_data_config({}, '
            'model=model))')
        want = "the model's dtype" + ('' if dtype is None else f' {dtype}')
        raise TypeError(f'x must be a floating-point image tensor (B, {in_chans}, H, W) in {want} (or under '
                        f'autocast); got {x.dtype}{hint}')
    if dtype is not None and x.dtype != dtype and not (
            autocast_enabled(x.device.type) and x.dtype in _AUTOCAST_CASTS and dtype in _AUTOCAST_CASTS):
        raise TypeError(f"x has dtype {x.dtype} but the model's parameters are {dtype}: pass x.to({dtype}), "
                        f'convert the model (model.to({x.dtype})), or run under torch.autocast')
    if x.shape[1] != in_chans:
        raise ValueError(f'x has {x.shape[1]} channels, expected in_chans={in_chans} (shape (B, {in_chans}, H, W))')
    H, W = x.shape[2], x.shape[3]
    if H % token_stride or W % token_stride or H == 0 or W == 0:
        raise ValueError(
            f'x has spatial size {H}x{W}; both sides must be positive multiples of {stride_name} {token_stride}')
    if not dynamic and (H, W) != tuple(img_size):
        raise ValueError(
            f'x has spatial size {H}x{W} but the model was built for img_size={tuple(img_size)}; '
            f'pass img_size=... or dynamic_img_size=True to timm.create_model for other sizes')


StemLayers = Tuple[Tuple[int, int, int], ...]


class Stem(nn.Sequential):
    """The pixel stem: convolutions without bias, each followed by BatchNorm and ReLU, given as
    ``layers``, one (out_channels, kernel, stride) per convolution. Its stride is the product of the
    strides.

    Padding is TensorFlow's 'same', as the authors' models have it: a 3x3 stride-2 convolution pads
    0 before and 1 after an even side, 1 and 1 an odd one (timm's ``Conv2dSame`` pads each input as TF
    computes it). A patchify layer (kernel = stride, or smaller) pads nothing on the sides the model
    takes (multiples of the stem's stride, ``check_image_input``, so of every layer's): it is a plain
    convolution, without ``Conv2dSame``'s copy of its input.

    One layer (the patchify stems: kernel = stride = 4 for sp16, 8 for sp32 and 448 px) is named
    ``conv``, ``bn``, ``act``; several (the S/56 stem, three 3x3 stride-2 convolutions 3 -> 16 -> 32 ->
    64) ``conv1``, ``bn1``, ``act1``, ``conv2``, ... ``first_conv`` names the first convolution. BatchNorm
    eps is torch's 1e-5 in every layer, as in the patchify stems that match the authors' code.
    """

    def __init__(self, in_chans: int, layers: StemLayers, device=None, dtype=None):
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        self.layers = layers = self.check_layers(layers)
        self.stride = math.prod(stride for _, _, stride in layers)
        suffix = [''] if len(layers) == 1 else [str(i + 1) for i in range(len(layers))]
        self.first_conv = f'conv{suffix[0]}'
        for i, (out_chans, kernel, stride) in enumerate(layers):
            padding = 'valid' if kernel <= stride else 'same'
            self.add_module(f'conv{suffix[i]}', create_conv2d(
                in_chans, out_chans, kernel, stride=stride, padding=padding, bias=False, **dd))
            self.add_module(f'bn{suffix[i]}', nn.BatchNorm2d(out_chans, **dd))
            self.add_module(f'act{suffix[i]}', nn.ReLU(inplace=True))
            in_chans = out_chans

    @staticmethod
    def check_layers(layers) -> StemLayers:
        """``layers`` as a tuple of (out_channels, kernel, stride) int triples (lists, e.g. from a JSON
        config, are fine), or a ValueError naming what is wrong."""
        try:
            out = tuple(tuple(layer) for layer in layers)
        except TypeError:
            out = None
        if not out or any(len(layer) != 3 or any(isinstance(v, bool) or not isinstance(v, int) or v < 1
                                                 for v in layer) for layer in out):
            raise ValueError(
                f'stem_layers must be a non-empty sequence of (out_channels, kernel, stride) triples of ints >= 1, '
                f'got {layers!r}')
        return out


def _check_grouping(grouping, group_size, group_depth, group_index, group_heads, sca_heads, depths, embed_dim,
                    img_size, token_stride) -> Tuple[int, int, int, int]:
    """The hierarchical level's arguments checked, defaults filled in: (group_stride, group_depth,
    group_index, group_heads); a plain SPFormer (``grouping=None``) has none: (token_stride, 0, 0, 0)."""
    if grouping not in (None, 'global', 'local'):
        raise ValueError(f"grouping must be None, 'global' or 'local', got {grouping!r}")
    if grouping is None:
        return token_stride, 0, 0, 0
    group_heads = sca_heads if group_heads is None else group_heads
    group_index = depths[-1] - depths[-1] // 2 if group_index is None else group_index
    for arg, value, low in (('group_size', group_size, 1), ('group_depth', group_depth, 1),
                            ('group_heads', group_heads, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f'{arg} must be an int >= {low}, got {value!r}')
    if isinstance(group_index, bool) or not isinstance(group_index, int) or not 0 <= group_index <= depths[-1]:
        raise ValueError(
            f'group_index must be an int in 0..{depths[-1]} (ViT blocks of the last stage before the '
            f'group block), got {group_index!r}')
    if embed_dim % group_heads:
        raise ValueError(f'group_heads={group_heads} must divide embed_dim={embed_dim}')
    group_stride = token_stride * group_size
    if img_size[0] % group_stride or img_size[1] % group_stride:
        raise ValueError(
            f'img_size={img_size} must be a multiple of the group stride {group_stride} '
            f'(token stride {token_stride} x group_size={group_size})')
    return group_stride, group_depth, group_index, group_heads


class SPFormer(nn.Module):
    """ SPFormer: pixel stem -> superpixel tokens -> stages of (SCA, ViT blocks) -> mean-pool head.

    With ``grouping`` set (hierarchical variants), the last stage runs a :class:`GroupBlock` after its
    first ``group_index`` ViT blocks.
    """

    def __init__(
            self,
            img_size: Union[int, Tuple[int, int]] = 224,
            in_chans: int = 3,
            num_classes: int = 1000,
            global_pool: str = 'avg',
            pixel_dim: int = 64,
            embed_dim: int = 384,
            depths: Tuple[int, ...] = (2, 10),
            num_heads: int = 6,
            sca_heads: int = 2,
            sca_iters: int = 2,
            stem_stride: int = 4,
            stem_layers: Optional[StemLayers] = None,
            cell_size: int = 4,
            mlp_ratio: float = 4.,
            qkv_bias: bool = True,
            init_values: float = 1e-5,
            dynamic_img_size: bool = False,
            drop_rate: float = 0.,
            proj_drop_rate: float = 0.,
            attn_drop_rate: float = 0.,
            drop_path_rate: float = 0.,
            attn_backend: str = 'auto',
            grouping: Optional[str] = None,
            group_size: int = 2,
            group_depth: int = 1,
            group_index: Optional[int] = None,
            group_heads: Optional[int] = None,
            feature_pyramid: Optional[bool] = False,
            device=None,
            dtype=None,
    ):
        """
        Args:
            img_size: Input image size the position embeddings are built for.
            in_chans: Number of input image channels.
            num_classes: Number of classifier classes (0 for no classifier).
            global_pool: 'avg' (mean over superpixel tokens) or '' (no pooling).
            pixel_dim: Channels C_p of the pixel stream.
            embed_dim: Channels C of the superpixel tokens.
            depths: ViT blocks per stage.
            num_heads: ViT attention heads.
            sca_heads: Superpixel cross-attention heads M (one association each).
            sca_iters: SCA iterations at the start of every stage.
            stem_stride: Stride of the pixel stream (4, or 8 for the coarse /32, /56 and 448-px models).
            stem_layers: The stem's convolutions (each + BatchNorm + ReLU, TF 'same' padding, see
                :class:`Stem`) as (out_channels, kernel, stride) triples; their strides must multiply to
                ``stem_stride`` and the last must give ``pixel_dim`` channels. Default: one patchify
                convolution, ``((pixel_dim, stem_stride, stem_stride),)``; S/56 has three 3x3 stride-2 ones.
            cell_size: Pixels per superpixel cell side; token stride = stem_stride * cell_size.
            init_values: LayerScale init of the SCA and pixel updates.
            dynamic_img_size: Accept any input whose sides are multiples of the token stride
                (position embeddings resampled on the fly).
            attn_backend: Backend of the local cross-attention ops, one of ``spformer.kernels.BACKENDS``
                ('auto', 'torch', 'cpu', 'triton', 'reference'); checked here, at construction.
            grouping: None (plain SPFormer), or the group level of the hierarchical variants:
                'global' (group tokens attend to all superpixel tokens) or 'local' (SCA on the token grid).
            group_size: Superpixel tokens per group side (2: a 14x14 token grid gives 7x7 groups).
            group_depth: ViT blocks over the group tokens.
            group_index: ViT blocks of the last stage that run before the group block (default: the
                larger half of them).
            group_heads: Heads of the grouping and ungroup attention, one superpixel -> group association
                each (default: sca_heads).
            feature_pyramid: The feature indices of ``forward_intermediates`` and ``features_only`` are the
                dense-prediction pyramid (strides 4, 8, 16, 32 at sp16, :meth:`forward_pyramid`) instead of
                one per ViT block. ``features_only=True`` without ``out_indices`` turns it on (needs an even
                ``cell_size``).
            device: Device the parameters and buffers are created on (timm's factory kwarg; 'meta' builds
                no storage). Default: torch's current default device.
            dtype: Floating point dtype of the parameters and buffers. Default: torch's default dtype.
        """
        super().__init__()
        if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise ValueError(f'dtype must be a floating point torch.dtype (or None), got {dtype!r}')
        check_backend('attn_backend', attn_backend)  # here, not at the first forward
        for arg, value in (('num_heads', num_heads), ('sca_heads', sca_heads)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f'{arg} must be an int >= 1, got {value!r}')
        dd = {'device': device, 'dtype': dtype}
        # On CPU, glibc would otherwise trim and re-fault SPFormer's heap every forward (spformer/allocator.py).
        prime_glibc_heap()
        assert global_pool in ('', 'avg'), f"global_pool must be 'avg' or '', got {global_pool!r}"
        img_size = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
        if stem_layers is None:  # one patchify conv
            stem_layers = ((pixel_dim, stem_stride, stem_stride),)
        stem_layers = Stem.check_layers(stem_layers)
        if math.prod(stride for _, _, stride in stem_layers) != stem_stride or stem_layers[-1][0] != pixel_dim:
            raise ValueError(
                f'stem_layers={stem_layers} must have strides that multiply to stem_stride={stem_stride} and end '
                f'with pixel_dim={pixel_dim} channels')
        token_stride = stem_stride * cell_size
        if img_size[0] % token_stride or img_size[1] % token_stride:
            raise ValueError(f'img_size={img_size} must be a multiple of the token stride {token_stride}')
        group_stride, group_depth, group_index, group_heads = _check_grouping(
            grouping, group_size, group_depth, group_index, group_heads, sca_heads, depths, embed_dim, img_size,
            token_stride)
        norm_layer = partial(nn.LayerNorm, eps=1e-6)
        self.num_classes = num_classes
        self.global_pool = global_pool
        self.in_chans = in_chans
        self.img_size = img_size
        self.num_features = self.head_hidden_size = self.embed_dim = embed_dim
        self.pixel_dim = pixel_dim
        self.sca_heads = sca_heads
        self.stem_stride = stem_stride
        self.stem_layers = stem_layers
        self.cell_size = cell_size
        self.token_stride = token_stride
        self.grid_size = (img_size[0] // token_stride, img_size[1] // token_stride)
        self.grouping = grouping
        self.group_size = group_size if grouping else None
        self.group_depth = group_depth
        self.group_index = group_index
        self.group_heads = group_heads if grouping else None
        self.group_stride = group_stride  # input sides must be multiples of it
        self.group_grid_size = (img_size[0] // group_stride, img_size[1] // group_stride) if grouping else None
        self.dynamic_img_size = dynamic_img_size
        self.num_prefix_tokens = 0
        self.grad_checkpointing = False

        self.stem = Stem(in_chans, stem_layers, **dd)
        # timm reads the conv it adapts to in_chans != 3 (pretrained weights) from the model's traits before its
        # cfg's first_conv: the first conv of the stem built here, whatever stem_layers it was given.
        self._traits = {'first_conv': f'stem.{self.stem.first_conv}'}
        self.sp_init = SuperpixelInit(pixel_dim, embed_dim, cell_size, norm_layer, attn_backend, **dd)

        # Stochastic depth rises over all ViT blocks in execution order, the group blocks included:
        # linspace(0, drop_path_rate, n) in Python, not from a tensor (a build on the meta device, or
        # under `with torch.device('meta')`, cannot read a tensor's value back).
        n_blocks = sum(depths) + group_depth
        dpr = [drop_path_rate * i / (n_blocks - 1) if n_blocks > 1 else 0. for i in range(n_blocks)]
        last_first = sum(depths[:-1])  # execution index of the last stage's first block
        group_dpr = dpr[last_first + group_index:last_first + group_index + group_depth]
        dpr = dpr[:last_first + group_index] + dpr[last_first + group_index + group_depth:]
        self.stages = nn.ModuleList()
        # Feature 0, the pixel stream as the last stage reads it, is the output of the last pixel
        # update (channels-last there; forward_intermediates returns it NCHW).
        pixel_source = f'stages.{len(depths) - 2}.unfold' if len(depths) > 1 else 'stem'
        self.feature_info = [dict(num_chs=pixel_dim, reduction=stem_stride, module=pixel_source)]
        for i, depth in enumerate(depths):
            first = sum(depths[:i])
            group_block = GroupBlock(
                embed_dim, num_heads, group_heads, group_size, grouping, group_depth, mlp_ratio, qkv_bias,
                proj_drop_rate, attn_drop_rate, group_dpr, init_values, norm_layer, attn_backend, **dd,
            ) if grouping is not None and i == len(depths) - 1 else None
            self.stages.append(SPFormerStage(
                pixel_dim=pixel_dim,
                embed_dim=embed_dim,
                grid_size=self.grid_size,
                depth=depth,
                num_heads=num_heads,
                sca_heads=sca_heads,
                sca_iters=sca_iters,
                cell_size=cell_size,
                update_pixels=i < len(depths) - 1,
                mlp_ratio=mlp_ratio,
                qkv_bias=qkv_bias,
                proj_drop_rate=proj_drop_rate,
                attn_drop_rate=attn_drop_rate,
                drop_path_rates=dpr[first:first + depth],
                init_values=init_values,
                norm_layer=norm_layer,
                attn_backend=attn_backend,
                group_block=group_block,
                group_index=group_index,
                **dd,
            ))
            self.feature_info += [
                dict(num_chs=embed_dim, reduction=token_stride, module=f'stages.{i}.blocks.{j}')
                for j in range(depth)]
        # The group tokens (after the group block's ViT blocks) are the last feature although they are
        # computed inside the last stage: timm's feature wrappers need reductions that never decrease
        # along the indices, and the result is a pyramid (pixels 4, tokens 16, groups 32 at sp16).
        # _unit_features maps every unit (ViT block, group block) in execution order to its feature index.
        self._unit_features = list(range(1, sum(depths) + 1))
        if grouping is not None:
            self.feature_info.append(dict(
                num_chs=embed_dim, reduction=group_stride,
                module=f'stages.{len(depths) - 1}.group_block.blocks.{group_depth - 1}'))
            self._unit_features.insert(last_first + group_index, len(self.feature_info) - 1)
        self.depths = tuple(depths)
        # With feature_pyramid the feature indices are the pyramid's four levels; the per-block indices
        # above still say which units each level needs (pruning).
        self._block_feature_info = self.feature_info
        self.feature_pyramid = bool(feature_pyramid)
        if self.feature_pyramid:
            if cell_size % 2:
                raise ValueError(
                    f'feature_pyramid=True needs an even cell_size (its stride-{token_stride // 2} level averages the '
                    f'association over 2x2 pixel blocks of a cell), got cell_size={cell_size}')
            last_block = self._block_feature_info[sum(depths)]['module']
            self.feature_info = [
                self._block_feature_info[0],
                dict(num_chs=embed_dim, reduction=token_stride // 2, module=last_block),
                dict(num_chs=embed_dim, reduction=token_stride, module=last_block),
                dict(num_chs=embed_dim, reduction=group_stride if grouping else 2 * token_stride,
                     module=self._block_feature_info[-1]['module']),
            ]

        self.norm = nn.Identity()  # the head normalizes after pooling (fc_norm), as in docs/design.md
        self.fc_norm = norm_layer(embed_dim, **dd)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(embed_dim, num_classes, **dd) if num_classes > 0 else nn.Identity()

        self.apply(self._init_weights)
        for stage in self.stages:
            trunc_normal_(stage.pos_embed, std=.02)

    @staticmethod
    def _init_weights(m: nn.Module):
        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    # --- timm interface -------------------------------------------------------------------

    @torch.jit.ignore
    def no_weight_decay(self) -> Set[str]:
        # 1-D parameters (norms, biases, LayerScales) are excluded by timm's optimizer factory.
        return {f'stages.{i}.pos_embed' for i in range(len(self.stages))}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        """Layer-decay groups: stem, superpixel init and stage-1 SCA first, then blocks in order. A group
        block (grouping, its ViT blocks, ungroup) is one layer between the ViT blocks it runs between."""
        return dict(
            stem=r'^stem|^sp_init|^stages\.0\.(?:sca|pos_embed)',
            blocks=r'^stages\.(\d+)' if coarse else [
                (r'^stages\.(\d+)\.(?:sca|pos_embed)', (-1,)),
                (r'^stages\.(\d+)\.blocks\.(\d+)', None),
                (r'^stages\.(\d+)\.group_block\.', (self.group_index - 0.5,)),
                (r'^stages\.(\d+)\.unfold', (99999,)),
                (r'^fc_norm', (99999,)),
            ],
        )

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True):
        self.grad_checkpointing = enable
        for stage in self.stages:
            if stage.group_block is not None:
                stage.group_block.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None):
        self.num_classes = num_classes
        if global_pool is not None:
            assert global_pool in ('', 'avg'), f"global_pool must be 'avg' or '', got {global_pool!r}"
            self.global_pool = global_pool
        # The new head joins the model where it is (device, dtype, train/eval), as timm's heads do.
        ref = next(self.parameters(), None)
        dd = {'device': ref.device, 'dtype': ref.dtype} if ref is not None else {}
        self.head = nn.Linear(self.embed_dim, num_classes, **dd) if num_classes > 0 else nn.Identity()
        self.head.train(self.training)

    # --- forward --------------------------------------------------------------------------

    def _run(self, module: nn.Module, *args):
        if self.grad_checkpointing and not torch.jit.is_scripting():
            return checkpoint(module, *args)
        return module(*args)

    def _stem(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Image -> channels-last pixels (B, H/s, W/s, C_p) and superpixels (B, h, w, C)."""
        check_image_input(
            x, self.in_chans, self.group_stride, self.img_size, self.dynamic_img_size,
            f'the group stride (superpixel token stride {self.token_stride} x group_size={self.group_size}):'
            if self.grouping else 'the superpixel token stride', self.stem[0].weight.dtype)
        # Channels-last from here on: a strided view would make every later pixel op slower (the
        # depthwise convs fall back to their NCHW kernels, ~7x slower on CPU). The stem runs in
        # channels_last memory already, so that its output needs no layout copy and the backward's
        # gradients match the saved activations' layout (mixed layouts made the stem's ReLU and
        # BatchNorm backward ~10x slower on CPU: stem forward+backward 51 -> 26 ms at batch 8). The
        # 'same' padding of S/56's stride-2 convs (F.pad) keeps channels_last too.
        pixels = self.stem(x.contiguous(memory_format=torch.channels_last)).permute(0, 2, 3, 1).contiguous()
        return pixels, self.sp_init(pixels)

    def _pos_embed(self, stage: SPFormerStage, tokens: torch.Tensor, grid: Tuple[int, int]) -> torch.Tensor:
        # No Python branch on the grid here: timm's resampling returns the embedding as it is at the built
        # size, except under torch.export, where it always resamples (the identity at the built size), so
        # that the exported graph serves every input size.
        if self.dynamic_img_size:
            pos = resample_abs_pos_embed(stage.pos_embed, new_size=grid, old_size=self.grid_size, num_prefix_tokens=0)
        else:
            pos = stage.pos_embed
        return tokens + pos

    def _stage_sca(self, stage: SPFormerStage, pixels: torch.Tensor, superpixels: torch.Tensor):
        association = None
        for sca in stage.sca:
            pixels, superpixels, association = self._run(sca, pixels, superpixels)
        return pixels, superpixels, association

    def _forward_stages(
            self,
            x: torch.Tensor,
            feature_indices: Optional[Set[int]] = None,
            stop_after_unit: Optional[int] = None,
            need_pixels: bool = False,
    ) -> 'StagesOutput':
        """Shared body of every forward: the stages, collecting the outputs of the units (ViT blocks, group
        block; ``units`` in execution order) whose feature indices are in ``feature_indices``; stages after
        the one holding unit ``stop_after_unit`` are skipped unless the final pixel stream is needed."""
        pixels, superpixels = self._stem(x)
        B, h, w, C = superpixels.shape
        features: List[Tuple[int, torch.Tensor, Tuple[int, int]]] = []
        associations: List[Association] = []
        groups: List[GroupOutput] = []
        tokens = superpixels.reshape(B, h * w, C)
        unit_idx = 0
        for i, stage in enumerate(self.stages):
            pixels_final = all(later.unfold is None for later in self.stages[i:])
            if stop_after_unit is not None and unit_idx > stop_after_unit and (pixels_final or not need_pixels):
                break
            stage_pixels = pixels
            _, superpixels, association = self._stage_sca(stage, pixels, superpixels)
            associations.append(association)
            tokens = self._pos_embed(stage, superpixels.reshape(B, h * w, C), (h, w))
            for unit in stage.units():
                if isinstance(unit, GroupBlock):
                    superpixels, group_tokens, group_association = unit(tokens.reshape(B, h, w, C))
                    tokens = superpixels.reshape(B, h * w, C)
                    groups.append(GroupOutput(i, group_tokens, group_association))
                    output = (group_tokens.flatten(1, 2), (group_tokens.shape[1], group_tokens.shape[2]))
                else:
                    tokens = self._run(unit, tokens)
                    output = (tokens, (h, w))
                if feature_indices is not None and self._unit_features[unit_idx] in feature_indices:
                    features.append((self._unit_features[unit_idx],) + output)
                unit_idx += 1
            superpixels = tokens.reshape(B, h, w, C)
            # The pixel update is needed by feature 0 or by the later stages: none are when every wanted
            # unit has run and the pixels are not wanted.
            done = stop_after_unit is not None and unit_idx > stop_after_unit and not need_pixels
            if stage.unfold is not None and not done:
                pixels = self._run(stage.unfold, stage_pixels, superpixels, association)
        features.sort(key=lambda f: f[0])  # feature index order (the group feature is last)
        return StagesOutput(self.norm(tokens), (h, w), pixels, features, associations, groups)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Superpixel tokens after the last block, (B, h*w, embed_dim) in raster order of the token grid."""
        return self._forward_stages(x).tokens

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        if self.global_pool == 'avg':
            x = x.mean(dim=1)
        x = self.fc_norm(x)
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def forward_intermediates(
            self,
            x: torch.Tensor,
            indices: Optional[Union[int, List[int]]] = None,
            norm: bool = False,
            stop_early: bool = False,
            output_fmt: str = 'NCHW',
            intermediates_only: bool = False,
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        """Features of every ViT block (and of the pixel stream, and the groups) on the way to forward_features.

        Index 0 is the stride-``stem_stride`` pixel stream as the last stage reads it (after every
        stage's pixel update), (B, pixel_dim, H/stem_stride, W/stem_stride); the following indices are
        the outputs of the ViT blocks in execution order (blocks numbered across stages), (B, embed_dim,
        h, w) on the token grid. A hierarchical model has one more, the last index: the group tokens
        after the group block's ViT blocks, (B, embed_dim, H/group_stride, W/group_stride) (computed in
        the middle of the last stage, listed last so that reductions never decrease along the indices:
        pixels, superpixels, groups). Features come in index order.

        Args:
            x: Input image tensor.
            indices: Take last n features if int, all if None, select matching indices if sequence.
            norm: Apply the head's LayerNorm (fc_norm) to block and group outputs.
            stop_early: Stop iterating over stages once the last wanted feature is reached.
            output_fmt: 'NCHW' or 'NLC'.
            intermediates_only: Only return the intermediate features.
        """
        assert output_fmt in ('NCHW', 'NLC'), 'Output format must be one of NCHW or NLC.'
        take_indices, max_index = feature_take_indices(len(self.feature_info), indices)
        if self.feature_pyramid:
            return self._pyramid_intermediates(x, take_indices, norm, output_fmt, intermediates_only)
        want_pixels = 0 in take_indices
        stop = self._last_unit(take_indices) if stop_early or intermediates_only else None
        out = self._forward_stages(x, set(take_indices), stop_after_unit=stop, need_pixels=want_pixels)

        B = x.shape[0]
        intermediates = []
        if want_pixels:
            pixels = out.pixels
            intermediates.append(
                pixels.permute(0, 3, 1, 2).contiguous() if output_fmt == 'NCHW' else pixels.flatten(1, 2))
        for _, y, (h, w) in out.features:
            y = self.fc_norm(y) if norm else y
            intermediates.append(
                y.reshape(B, h, w, y.shape[-1]).permute(0, 3, 1, 2).contiguous() if output_fmt == 'NCHW' else y)
        if intermediates_only:
            return intermediates
        return out.tokens, intermediates

    def forward_pyramid(self, x: torch.Tensor, norm: bool = False) -> List[torch.Tensor]:
        """The dense-prediction pyramid, four NCHW maps (strides 4, 8, 16, 32 for the sp16 models), in the
        superpixel way (docs/models.md, "A feature pyramid"):

        0. the pixel stream as the last stage reads it, (B, pixel_dim, H/s, W/s), s = stem_stride;
        1. the final tokens unfolded to stride token_stride / 2 through the last stage's association: each
           position takes the association-weighted sum of its 9 candidate tokens (the softmax of the
           head-merged logits, ``forward_superpixels``' ``association_merged``, averaged over the 2x2 pixels
           of the stream it covers), (B, embed_dim, 2h, 2w); not an interpolation of the token grid;
        2. the final tokens, (B, embed_dim, h, w);
        3. the groups (hierarchical models, (B, embed_dim, h / group_size, w / group_size)), else the final
           tokens averaged over 2x2 blocks (ceil mode: an odd grid keeps its last row and column).

        ``norm``: the head's LayerNorm (fc_norm) on the tokens and groups before levels 1-3 are made.
        What ``feature_pyramid=True`` (and ``features_only=True`` without ``out_indices``) gives.
        """
        return self._pyramid_intermediates(x, [0, 1, 2, 3], norm, 'NCHW', True)

    def _pyramid_intermediates(self, x: torch.Tensor, take_indices: List[int], norm: bool, output_fmt: str,
                               intermediates_only: bool):
        tokens_wanted = any(i > 0 for i in take_indices)
        out = self._forward_stages(
            x, set(), stop_after_unit=None if tokens_wanted else -1, need_pixels=0 in take_indices)
        B = x.shape[0]
        h, w = out.grid
        levels: Dict[int, torch.Tensor] = {}  # channels-last (B, rows, cols, C)
        if 0 in take_indices:
            levels[0] = out.pixels
        if tokens_wanted:
            tokens = self.fc_norm(out.tokens) if norm else out.tokens
            grid = tokens.reshape(B, h, w, tokens.shape[-1])
            levels[2] = grid
            if 1 in take_indices:
                # on the backend of the SCA layer that made the association
                backend = self.stages[len(out.associations) - 1].sca[-1].attn_backend
                levels[1] = unfold_tokens(out.associations[-1], grid, self.cell_size, backend)
            if 3 in take_indices:
                if out.groups:
                    groups = out.groups[-1].groups
                    levels[3] = self.fc_norm(groups) if norm else groups
                else:
                    levels[3] = F.avg_pool2d(grid.permute(0, 3, 1, 2), 2, ceil_mode=True).permute(0, 2, 3, 1)
        intermediates = [
            levels[i].permute(0, 3, 1, 2).contiguous() if output_fmt == 'NCHW' else levels[i].flatten(1, 2)
            for i in take_indices]
        if intermediates_only:
            return intermediates
        return out.tokens, intermediates

    def _block_indices(self, take_indices: List[int]) -> List[int]:
        """The per-block feature indices a set of feature indices needs: themselves, or for the pyramid the
        pixel stream (level 0) and the last index, which keeps every unit (levels 1-3: the final tokens)."""
        if not self.feature_pyramid:
            return list(take_indices)
        return [0] * (0 in take_indices) + [len(self._block_feature_info) - 1] * any(i > 0 for i in take_indices)

    def _last_unit(self, take_indices: List[int]) -> int:
        """Execution position of the last unit (ViT or group block) a set of feature indices needs (-1: none)."""
        units = [u for u, f in enumerate(self._unit_features) if f in take_indices]
        return max(units, default=-1)

    def prune_intermediate_layers(
            self,
            indices: Union[int, List[int]] = 1,
            prune_norm: bool = False,
            prune_head: bool = True,
    ) -> List[int]:
        """Drop every module the requested intermediates do not read: the units (ViT blocks, group block)
        after the last wanted one, the stages after it, and the pixel updates whose output nothing kept
        reads: ``forward_intermediates(x, indices=take_indices)`` then uses every parameter left but the
        head and ``fc_norm``, with one exception below.

        Feature 0, the pixel stream as the last stage reads it, needs every stage but the last whole,
        pixel updates included. Otherwise a stage's pixel update (``unfold``) stays only if a later stage
        is kept (its SCA reads the pixels).

        The last index keeps every unit (timm's contract: pruned to the last index, ``forward`` keeps its
        output). In a hierarchical model it is the group tokens, computed before the last ViT blocks:
        those blocks (and the group block's ungroup step) stay, and only ``forward_features`` reads them.
        """
        take_indices, _ = feature_take_indices(len(self.feature_info), indices)
        block_indices = self._block_indices(take_indices)
        num_units = self._last_unit(block_indices) + 1  # units, in execution order, up to the last wanted one
        if len(self._block_feature_info) - 1 in block_indices:
            num_units = len(self._unit_features)
        # feature 0 reads the pixel updates of every stage but the last (of the model as built: depths)
        pixel_stages = len(self.depths) - 1 if 0 in block_indices else 0
        needed, first = [], 0
        for i, stage in enumerate(self.stages):
            if i >= pixel_stages and first >= num_units:
                break  # no wanted feature from here on
            needed.append((stage, first))
            first += len(stage.units())
        for i, (stage, first) in enumerate(needed):
            # Whole, when a later kept stage reads its pixels and tokens or feature 0 its pixel update.
            whole = i + 1 < len(needed) or i < pixel_stages
            take = len(stage.units()) if whole else min(len(stage.units()), num_units - first)
            if stage.group_block is not None and take <= stage.group_index:
                stage.group_block = None  # its output comes after every wanted feature
            stage.blocks = stage.blocks[:take - (stage.group_block is not None)]
            if not whole:
                stage.unfold = None
        self.stages = nn.ModuleList([stage for stage, _ in needed])
        if not needed:  # a one-stage model pruned to its pixel stream (the stem's output): no superpixels
            self.sp_init = nn.Identity()
        if prune_norm:
            self.fc_norm = nn.Identity()
        if prune_head:
            self.reset_classifier(0, '')
        return take_indices

    @torch.jit.ignore
    def forward_superpixels(self, x: torch.Tensor, label_upsampling: str = 'bilinear') -> List[Dict[str, torch.Tensor]]:
        """The learned superpixels of every stage (from its last SCA iteration).

        Args:
            x: Input image tensor.
            label_upsampling: How the hard maps reach input resolution. ``'bilinear'`` (default, as the
                SPFormer authors draw them): the association logits are resampled to the input in
                superpixel perspective (:func:`spformer.kernels.upsample_association`), then the argmax
                with the own-cell margin; boundaries follow the image to the pixel. ``'repeat'``: the
                argmax on the pixel stream, each label repeated over its s x s input pixels (faster;
                boundaries step by s pixels).

        Returns one dict per stage:
            ``association``: (B, sca_heads, 9, H/s, W/s) soft assignment of every pixel of the pixel
                stream (stride s = stem_stride) to its 9 neighbouring superpixels, per head;
            ``association_merged``: (B, 9, H/s, W/s), the softmax of the head-merged logits
                sum_m a_m / sqrt(M) (docs/design.md §1.3);
            ``labels``: (B, H, W) int64 hard superpixel map at input resolution: the token index
                (raster order on the h x w grid) of the argmax of the head-merged logits, the own cell's
                raised by ``spformer.kernels.OWN_CELL_MARGIN`` (1e-5; near-ties go to the pixel's own
                cell); neighbours outside the image are never chosen;
            ``head_labels``: (B, sca_heads, H, W) the same per association head;
            ``grid``: (h, w) of the token grid as a tensor.
        Neighbour k is the cell at offset (k // 3 - 1, k % 3 - 1) from the pixel's own cell.
        """
        _check_label_upsampling(label_upsampling)
        out = self._forward_stages(x)
        h, w = out.grid
        return [self._superpixels(assoc, (h, w), label_upsampling) for assoc in out.associations]

    def _superpixels(self, assoc: Association, grid: Tuple[int, int],
                     label_upsampling: str = 'bilinear') -> Dict[str, torch.Tensor]:
        # One logit computation for the probabilities and the hard maps; the merged heads' logits are
        # linear in the queries (association_logits).
        logits = association_logits(assoc, self.cell_size)  # (B, M, H/s, W/s, 9)
        merged = association_logits(assoc, self.cell_size, merge_heads=True)[:, 0]
        labels = self._hard_labels(torch.cat([merged[:, None], logits], dim=1), label_upsampling)
        return dict(
            association=softmax_fp32(logits, -1).permute(0, 1, 4, 2, 3),
            association_merged=softmax_fp32(merged, -1).permute(0, 3, 1, 2),
            labels=labels[:, 0],
            head_labels=labels[:, 1:],
            grid=torch.tensor(grid),
        )

    def _hard_labels(self, logits: torch.Tensor, label_upsampling: str) -> torch.Tensor:
        """(..., H/s, W/s, 9) association logits on the pixel stream -> (..., H, W) token ids at input resolution."""
        s = self.stem_stride
        if label_upsampling == 'bilinear':
            return superpixel_labels(upsample_association(logits, self.cell_size, s), self.cell_size * s,
                                     OWN_CELL_MARGIN)
        labels = superpixel_labels(logits, self.cell_size, OWN_CELL_MARGIN)
        return labels.repeat_interleave(s, dim=-2).repeat_interleave(s, dim=-1)

    @torch.jit.ignore
    def forward_groups(self, x: torch.Tensor, label_upsampling: str = 'bilinear') -> List[Dict[str, Any]]:
        """The learned groups of a hierarchical model: pixel -> superpixel -> group (docs/design.md §2).

        Returns one dict per group block (the hierarchical variants have one, in their last stage),
        with P(pixel -> s) the merged association of that stage's superpixels (``forward_superpixels``)
        and P(s -> g) the grouping's association (softmax over the groups of its logits; the 9 groups
        around the token's cell for local grouping, all groups for global grouping):
            ``association``: (B, group_heads, G, H/s, W/s) soft assignment of every pixel of the pixel
                stream to the G groups, sum_s P(pixel -> s) P_m(s -> g) per grouping head m;
            ``association_merged``: (B, G, H/s, W/s), the same with the head-merged P(s -> g)
                (softmax of sum_m logits_m / sqrt(group_heads));
            ``superpixel_association``: (B, group_heads, h*w, G) P_m(s -> g) (0 for groups a local
                grouping does not consider); ``superpixel_association_merged``: (B, h*w, G);
            ``superpixel_groups``: (B, h, w) int64 hard group of every superpixel token: argmax of the
                merged P(s -> g), ties to the group the token was pooled into;
            ``superpixel_labels``: (B, H, W) the stage's hard superpixel map (``forward_superpixels``'s
                ``labels``, made with ``label_upsampling`` as there);
            ``labels``: (B, H, W) int64 hard group map: every pixel takes the group of its hard
                superpixel (the composition of the two hard assignments; not the argmax of
                ``association_merged``, which may differ);
            ``head_labels``: (B, group_heads, H, W) the same per grouping head;
            ``grid``: (gh, gw) of the group grid as a tensor; ``stage``: the 1-based stage of the groups.
        Group ids are raster order on the group grid. ``association`` holds G x (H/s) x (W/s) values
        per head and image: 49 x 56 x 56 at 224 px.
        """
        if self.grouping is None:
            name = _architecture(self)
            raise ValueError(
                f'forward_groups: {name or "this SPFormer"} has no group level (grouping=None); use a hierarchical '
                "model (timm.list_models('spformer_hier*')) or forward_superpixels")
        _check_label_upsampling(label_upsampling)
        out = self._forward_stages(x)
        results = []
        for group in out.groups:
            superpixels = self._superpixels(out.associations[group.stage], out.grid, label_upsampling)
            gh, gw = group.groups.shape[1:3]
            per_head = self._superpixel_to_group(group.association, out.grid, (gh, gw))
            merged = self._superpixel_to_group(group.association, out.grid, (gh, gw), merge_heads=True)
            sp_labels = superpixels['labels']
            groups_of_superpixels = hard_groups(merged, out.grid, self.group_size)  # (B, 1, h, w)
            head_groups = hard_groups(per_head, out.grid, self.group_size)  # (B, M, h, w)
            results.append(dict(
                association=compose_group_association(superpixels['association_merged'], per_head, self.cell_size),
                association_merged=compose_group_association(
                    superpixels['association_merged'], merged, self.cell_size)[:, 0],
                superpixel_association=per_head,
                superpixel_association_merged=merged[:, 0],
                superpixel_groups=groups_of_superpixels[:, 0],
                superpixel_labels=sp_labels,
                labels=compose_labels(sp_labels, groups_of_superpixels)[:, 0],
                head_labels=compose_labels(sp_labels, head_groups),
                grid=torch.tensor([gh, gw]),
                stage=group.stage + 1,
            ))
        return results

    def _superpixel_to_group(
            self, association: Union[Association, DenseAssociation], grid: Tuple[int, int],
            group_grid: Tuple[int, int], merge_heads: bool = False,
    ) -> torch.Tensor:
        """(B, M or 1, h*w, G) superpixel -> group probabilities, dense over the groups."""
        probs = association_probabilities(association, self.group_size, merge_heads)
        if isinstance(association, DenseAssociation):
            return probs
        # Local grouping: (B, K, h, w, 9) over the groups around each token's cell -> dense over all.
        B, K, h, w, _ = probs.shape
        ids = neighbour_ids(h, w, self.group_size, group_grid, probs.device).flatten(1).t()  # (h*w, 9)
        dense = probs.new_zeros(B, K, h * w, group_grid[0] * group_grid[1])
        # Neighbours outside the grid carry probability exactly 0, so their clamped ids add nothing.
        return dense.scatter_add_(-1, ids.expand(B, K, h * w, 9), probs.reshape(B, K, h * w, 9))


def unfold_tokens(association: Association, tokens: torch.Tensor, cell_size: int, backend: str = 'auto') -> torch.Tensor:
    """Tokens (B, h, w, C) unfolded onto a grid twice as fine through an SCA association: at every pixel of
    the stream the association-weighted sum of its 9 candidate tokens (softmax of the head-merged logits
    sum_m a_m / sqrt(M), as ``association_merged``), averaged over each 2x2 block of pixels (their 9
    candidates are the same: ``cell_size`` is even) -> (B, 2h, 2w, C) channels-last."""
    queries, bias = association.queries, association.bias
    merge = queries.shape[1] ** -0.5
    queries, bias = queries.sum(1, keepdim=True) * merge, bias.sum(1, keepdim=True) * merge
    values = tokens.unsqueeze(1).to(association.pixels.dtype)  # (B, 1, h, w, C): one head, whole tokens
    out = pixel_attention(association.pixels, queries, values, cell_size, scale=1.0, bias=bias, backend=backend,
                          pixel_layout=association.pixel_layout)
    if association.pixel_layout == 'cells':
        out = cells_to_image(out, cell_size)
    B, _, H, W, C = out.shape
    return out.reshape(B, H // 2, 2, W // 2, 2, C).mean(dim=(2, 4))


LABEL_UPSAMPLING = ('bilinear', 'repeat')


def _check_label_upsampling(label_upsampling) -> None:
    if label_upsampling not in LABEL_UPSAMPLING:
        raise ValueError(f'label_upsampling must be one of {LABEL_UPSAMPLING}, got {label_upsampling!r}')


def association_logits(association: Association, cell_size: int, merge_heads: bool = False) -> torch.Tensor:
    """(B, M or 1, H, W, 9) logits of an SCA association over the 9 neighbouring cells, image layout (-inf for
    neighbours outside the image); ``merge_heads``: of the head-merged logits sum_m a_m / sqrt(M) as one head."""
    queries, bias = association.queries, association.bias
    if merge_heads:  # the logits are linear in the queries and biases: one head with their sums
        norm = queries.shape[1] ** -0.5
        queries, bias = queries.sum(1, keepdim=True) * norm, bias.sum(1, keepdim=True) * norm
    logits = superpixel_association(association.pixels, queries, cell_size, scale=1.0, bias=bias,
                                    pixel_layout=association.pixel_layout, logits=True)
    return cells_to_image(logits, cell_size) if association.pixel_layout == 'cells' else logits


def association_probabilities(
        association: Union[Association, DenseAssociation], cell_size: int, merge_heads: bool = False,
) -> torch.Tensor:
    """Probabilities of an association, per head or (``merge_heads``) of the head-merged logits
    sum_m a_m / sqrt(M) as one head.

    :class:`Association` (SCA): (B, M or 1, H, W, 9) over the 9 neighbouring cells, image layout.
    :class:`DenseAssociation` (global groups): (B, M or 1, h*w, G) over all groups.
    """
    if isinstance(association, DenseAssociation):
        logits = association.logits.to(torch.promote_types(association.logits.dtype, torch.float32))
        if merge_heads:
            logits = logits.sum(1, keepdim=True) * logits.shape[1] ** -0.5
        return logits.softmax(dim=-1)
    return softmax_fp32(association_logits(association, cell_size, merge_heads), -1)


def neighbour_ids(H: int, W: int, cell_size: int, grid: Tuple[int, int], device=None) -> torch.Tensor:
    """(9, H, W) int64 raster id on the ``grid`` of neighbour k of every position of an H x W map with
    cells of ``cell_size`` (offset (k // 3 - 1, k % 3 - 1) from the own cell), clamped into the grid:
    callers give neighbours outside it probability 0."""
    h, w = grid
    k = torch.arange(9, device=device)[:, None, None]
    cy = torch.arange(H, device=device)[None, :, None] // cell_size
    cx = torch.arange(W, device=device)[None, None, :] // cell_size
    ny = (cy + k // 3 - 1).clamp(0, h - 1)
    nx = (cx + k % 3 - 1).clamp(0, w - 1)
    return ny * w + nx


def compose_group_association(pixel_to_superpixel: torch.Tensor, superpixel_to_group: torch.Tensor,
                              cell_size: int) -> torch.Tensor:
    """P(pixel -> g) = sum over the pixel's 9 neighbouring superpixels s of P(pixel -> s) P(s -> g).

    Args:
        pixel_to_superpixel: (B, 9, H, W) neighbour probabilities (``association_merged`` of a stage).
        superpixel_to_group: (B, K, h*w, G) per superpixel token (raster order), K heads.
        cell_size: pixels per superpixel cell side (H = h * cell_size).

    Returns:
        (B, K, G, H, W).
    """
    B, _, H, W = pixel_to_superpixel.shape
    K, G = superpixel_to_group.shape[1], superpixel_to_group.shape[3]
    ids = neighbour_ids(H, W, cell_size, (H // cell_size, W // cell_size), pixel_to_superpixel.device)
    out = superpixel_to_group.new_zeros(B, K, H * W, G)
    for k in range(9):  # one neighbour at a time: no (9, H*W, G) temporary
        out += pixel_to_superpixel[:, k].reshape(B, 1, H * W, 1) * superpixel_to_group[:, :, ids[k].flatten()]
    return out.transpose(2, 3).reshape(B, K, G, H, W)


def hard_groups(superpixel_to_group: torch.Tensor, grid: Tuple[int, int], group_size: int) -> torch.Tensor:
    """(B, K, h*w, G) probabilities -> (B, K, h, w) int64 group ids: the argmax, ties going to the group
    the token was pooled into (so that a uniform association gives the regular group grid)."""
    B, K, S, G = superpixel_to_group.shape
    h, w = grid
    gw = w // group_size
    own = ((torch.arange(h, device=superpixel_to_group.device) // group_size)[:, None] * gw
           + torch.arange(w, device=superpixel_to_group.device)[None, :] // group_size).reshape(1, 1, S)
    own_p = superpixel_to_group.gather(-1, own.expand(B, K, S).unsqueeze(-1))[..., 0]
    best = superpixel_to_group.argmax(dim=-1)
    return torch.where(own_p >= superpixel_to_group.amax(dim=-1), own, best).reshape(B, K, h, w)


def compose_labels(superpixel_labels: torch.Tensor, superpixel_groups: torch.Tensor) -> torch.Tensor:
    """Every pixel takes the group of its superpixel: (B, H, W) token ids, (B, K, h, w) group per token ->
    (B, K, H, W) group ids."""
    B, K = superpixel_groups.shape[:2]
    n, S = math.prod(superpixel_labels.shape[1:]), math.prod(superpixel_groups.shape[2:])  # explicit: B may be 0
    ids = superpixel_labels.reshape(B, 1, n).expand(B, K, n)
    return superpixel_groups.reshape(B, K, S).gather(-1, ids).reshape(B, K, *superpixel_labels.shape[1:])


# SCA layers, pixel updates and the superpixel init index tensors by runtime shapes: FX feature extraction keeps
# them as leaves (the ViT blocks around them trace normally).
register_notrace_module(SuperpixelCrossAttention)
register_notrace_module(PixelUpdate)
register_notrace_module(SuperpixelInit)
# The group block traces (its SCA layer and ungroup step are leaves): the group tokens, the output of its ViT
# blocks, are a feature (FX feature extraction returns them as a graph node).


def checkpoint_filter_fn(state_dict: Dict[str, torch.Tensor], model: SPFormer) -> Dict[str, torch.Tensor]:
    """Unwrap training checkpoints, strip DDP / torch.compile prefixes, resample position embeddings,
    and refuse (naming both) a state dict made for another SPFormer variant."""
    for key in ('state_dict_ema', 'model_ema', 'state_dict', 'model'):
        if key in state_dict and isinstance(state_dict[key], dict):
            state_dict = state_dict[key]
            break
    out = {unwrapped_key(k): v for k, v in state_dict.items()}

    expected = model.state_dict()
    for k, v in out.items():
        if k.endswith('pos_embed') and k in expected and v.shape != expected[k].shape:
            n = v.shape[1]
            side = int(math.sqrt(n))
            if side * side == n and v.shape[-1] == expected[k].shape[-1]:  # another image size: resample
                out[k] = resample_abs_pos_embed(v, new_size=model.grid_size, old_size=(side, side), num_prefix_tokens=0)
    # The first conv's input channels may differ (in_chans=1 from RGB weights): timm adapts it after this filter.
    first_conv = f'stem.{model.stem.first_conv}.weight'
    mismatched = [  # in model order, so the first named tensor is the first that differs
        f'{k}: checkpoint {tuple(out[k].shape)} vs model {tuple(t.shape)}'
        for k, t in expected.items()
        if k in out and out[k].shape != t.shape and not k.startswith('head.') and not (
            k == first_conv and out[k].dim() == 4 and out[k].shape[:1] + out[k].shape[2:] == t.shape[:1] + t.shape[2:])]
    missing = [k for k in expected if k not in out and not k.startswith('head.')]
    unexpected = [k for k in out if k not in expected and not k.startswith('head.')]
    if mismatched or missing or unexpected:
        name = _architecture(model)
        problems = mismatched[:4] + [f'{k}: missing from the checkpoint' for k in missing[:2]] + [
            f'{k}: not in the model' for k in unexpected[:2]]
        raise ValueError(
            f'the checkpoint does not fit {name or "this SPFormer"} (pixel_dim={model.pixel_dim}, '
            f'embed_dim={model.embed_dim}, depths={model.depths}, stem_stride={model.stem_stride}, '
            f'cell_size={model.cell_size}{_describe_grouping(model)}): it was made for another variant, its tensors '
            f'are those of '
            f'{_describe_checkpoint(out)}. '
            f'{len(mismatched)} tensors differ in shape, {len(missing)} are missing, {len(unexpected)} unexpected: '
            + '; '.join(problems) + _describe_stem_change(out, model))
    return out


def _describe_stem_change(state_dict: Dict[str, torch.Tensor], model: SPFormer) -> str:
    """A hint when a checkpoint's stem is one patchify conv and the model's is not (or the other way round):
    S/56 checkpoints made before its stem became the authors' three 3x3 convs hold one 8x8 conv."""
    ours = getattr(model, 'stem_layers', None)
    weight = state_dict.get('stem.conv.weight')
    if ours is None or (weight is not None) == (len(ours) == 1) or (weight is not None and weight.dim() != 4) or (
            weight is None and 'stem.conv1.weight' not in state_dict):
        return ''
    theirs = (
        f'one patchify conv, stem_layers={((weight.shape[0], weight.shape[-1], weight.shape[-1]),)}'
        if weight is not None else 'several convs (stem.conv1, stem.conv2, ...)')
    return (f'. Its stem is {theirs}; the model\'s is stem_layers={ours}: pass stem_layers=... to '
            f'timm.create_model to build the stem the checkpoint was made with')


def _architecture(model: nn.Module) -> Optional[str]:
    """The registered name a model was built as (timm sets pretrained_cfg), or None."""
    cfg = getattr(model, 'pretrained_cfg', None)
    return cfg.get('architecture') if isinstance(cfg, dict) else None


def _describe_grouping(model: SPFormer) -> str:
    if getattr(model, 'grouping', None) is None:
        return ''
    return (f', grouping={model.grouping!r}, group_size={model.group_size}, group_depth={model.group_depth}, '
            f'group_index={model.group_index}')


def _variant_shapes(name: str) -> Dict[str, Tuple[int, ...]]:
    """Tensor shapes (but the head) of a registered variant, built on the meta device: no memory, no init."""
    from timm import create_model

    if name not in _VARIANT_SHAPES:
        model = create_model(name, device='meta')
        _VARIANT_SHAPES[name] = {k: tuple(v.shape) for k, v in model.state_dict().items() if not k.startswith('head.')}
    return _VARIANT_SHAPES[name]


_VARIANT_SHAPES: Dict[str, Dict[str, Tuple[int, ...]]] = {}


def _describe_checkpoint(state_dict: Dict[str, torch.Tensor]) -> str:
    """The registered SPFormer variants a state dict fits, at its image size or (pos_embed resampled) another."""
    from timm import list_models
    shapes = {k: tuple(v.shape) for k, v in state_dict.items() if not k.startswith('head.')}
    exact, resized = [], []
    for name in list_models('spformer_*'):
        ref = _variant_shapes(name)
        if ref == shapes:
            exact.append(name)
        elif ref.keys() == shapes.keys() and all(
                ref[k] == s or (k.endswith('pos_embed') and ref[k][-1] == s[-1]) for k, s in shapes.items()):
            resized.append(name)
    return ' or '.join(exact or resized) or 'no registered SPFormer variant'


def _create_spformer(variant: str, pretrained: bool = False, **kwargs) -> SPFormer:
    explicit_indices = 'out_indices' in kwargs
    out_indices = kwargs.pop('out_indices', 3)
    if kwargs.get('features_only'):
        getter = _is_getter(kwargs.get('feature_cls', 'getter'))
        if kwargs.get('feature_pyramid') is None:
            # features_only=True alone gives the dense-prediction pyramid (strides 4, 8, 16, 32 at sp16), what
            # segmentation frameworks probe for; with out_indices, the per-block indices as before.
            kwargs['feature_pyramid'] = not explicit_indices and getter and kwargs.get('cell_size', 4) % 2 == 0
        if isinstance(kwargs.get('feature_cls'), str) and kwargs['feature_cls'].lower() == 'fx':
            kwargs['feature_cls'] = IndexOrderFeatureGraphNet
        if kwargs['feature_pyramid'] and not getter:
            raise ValueError(
                f"feature_pyramid=True: the pyramid's levels come from forward_intermediates, not from module "
                f"outputs; use feature_cls='getter' (the default), got feature_cls={kwargs['feature_cls']!r}")
    if kwargs.get('feature_pyramid') and not explicit_indices:
        out_indices = 4  # all four levels
    return build_model_with_weights(
        SPFormer, variant, pretrained, pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(out_indices=out_indices, feature_cls='getter'), **kwargs)


class IndexOrderFeatureGraphNet(FeatureGraphNet):
    """``features_only=True, feature_cls='fx'``: timm's FX feature extractor with the features in feature-index
    order, as ``feature_info`` lists them. timm's returns them in execution order, and SPFormer computes
    feature 0 (the pixel stream, made by the first stage's pixel update) after the first stage's ViT blocks
    and a hierarchical model's groups (its last index) before the last blocks."""

    def __init__(self, model: nn.Module, out_indices, out_map=None, **kwargs):
        super().__init__(model, out_indices, out_map=out_map, **kwargs)
        indices = self.feature_info.out_indices
        self._keys = [out_map[i] for i in range(len(indices))] if out_map is not None else list(indices)

    def forward(self, x):
        out = self.graph_module(x)
        if self.return_dict:
            return out
        return [out[str(k)] for k in self._keys]  # (torchvision names the outputs with strings)


def _is_getter(feature_cls) -> bool:
    """Whether a ``feature_cls`` builds timm's FeatureGetterNet (over ``forward_intermediates``)."""
    from timm.models._features import FeatureGetterNet
    if isinstance(feature_cls, str):
        return feature_cls.lower() == 'getter'
    return isinstance(feature_cls, type) and issubclass(feature_cls, FeatureGetterNet)


def _cfg(url: str = '', **kwargs) -> Dict[str, Any]:
    return {
        'url': url,
        'num_classes': 1000,
        'input_size': (3, 224, 224),
        'pool_size': None,
        'crop_pct': 0.875,
        'interpolation': 'bicubic',
        'fixed_input_size': True,
        'mean': IMAGENET_DEFAULT_MEAN,
        'std': IMAGENET_DEFAULT_STD,
        'first_conv': 'stem.conv',
        'classifier': 'head',
        'license': 'apache-2.0',
        **kwargs,
    }


# Where a tag's weights are published (spformer.models.pretrained.PUBLISHED_WEIGHTS: none yet; pretrained=True
# then says how to load your own).
default_cfgs = generate_default_cfgs({
    name: _cfg(**cfg, **published_source(name)) for name, cfg in {
        'spformer_tiny_sp16_224.in1k': {},
        'spformer_small_sp16_224.in1k': {},
        'spformer_base_sp16_224.in1k': {},
        'spformer_small_sp32_224.in1k': {},
        'spformer_small_sp56_224.in1k': dict(first_conv='stem.conv1'),  # its stem has 3 convs (_sp56_stem)
        'spformer_small_sp32_448.in1k': dict(input_size=(3, 448, 448), crop_pct=1.0),
        'spformer_hier_tiny_sp16_224.in1k': {},
        'spformer_hier_small_sp16_224.in1k': {},
        'spformer_hier_small_local_sp16_224.in1k': {},
    }.items()
})

_TINY = dict(pixel_dim=32, embed_dim=192, depths=(2, 10), num_heads=3, sca_heads=2)
_SMALL = dict(pixel_dim=64, embed_dim=384, depths=(2, 10), num_heads=6, sca_heads=2)
_BASE = dict(pixel_dim=96, embed_dim=768, depths=(2, 10), num_heads=12, sca_heads=3)
# Hierarchical: the group block takes the place of one of stage 2's ViT blocks (2 + 9 over superpixels,
# 1 over the 7x7 groups), after the 5th: 7 blocks shape the superpixel tokens before they are grouped,
# 4 use what the groups gave back.
_HIER = dict(depths=(2, 9), group_size=2, group_depth=1, group_index=5)


def _sp56_stem(pixel_dim: int) -> StemLayers:
    """S/56 is the authors' one model whose stem is not a patchify conv: three 3x3 stride-2 convs, 3 -> 16 -> 32
    -> pixel_dim (64) channels, each + BatchNorm + ReLU, TF 'same' padding; stride 8 as the 8x8 conv of S/32."""
    return (16, 3, 2), (32, 3, 2), (pixel_dim, 3, 2)


@register_model
def spformer_tiny_sp16_224(pretrained: bool = False, **kwargs) -> SPFormer:
    """SPFormer-T: 14x14 superpixel tokens (stride-4 pixels, 4x4 cells) at 224 px."""
    model_args = dict(stem_stride=4, cell_size=4, **_TINY)
    return _create_spformer('spformer_tiny_sp16_224', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def spformer_small_sp16_224(pretrained: bool = False, **kwargs) -> SPFormer:
    """SPFormer-S: 14x14 superpixel tokens (stride-4 pixels, 4x4 cells) at 224 px."""
    model_args = dict(stem_stride=4, cell_size=4, **_SMALL)
    return _create_spformer('spformer_small_sp16_224', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def spformer_base_sp16_224(pretrained: bool = False, **kwargs) -> SPFormer:
    """SPFormer-B: 14x14 superpixel tokens (stride-4 pixels, 4x4 cells) at 224 px."""
    model_args = dict(stem_stride=4, cell_size=4, **_BASE)
    return _create_spformer('spformer_base_sp16_224', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def spformer_small_sp32_224(pretrained: bool = False, **kwargs) -> SPFormer:
    """SPFormer-S/32: 7x7 tokens (stride-8 pixels, 4x4 cells) at 224 px."""
    model_args = dict(stem_stride=8, cell_size=4, **_SMALL)
    return _create_spformer('spformer_small_sp32_224', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def spformer_small_sp56_224(pretrained: bool = False, **kwargs) -> SPFormer:
    """SPFormer-S/56: 4x4 tokens (stride-8 pixels, 7x7 cells) at 224 px; a stem of three 3x3 stride-2 convs."""
    stem_layers = _sp56_stem(kwargs.get('pixel_dim', _SMALL['pixel_dim']))  # a narrower pixel_dim: its last conv's
    model_args = dict(stem_stride=8, stem_layers=stem_layers, cell_size=7, **_SMALL)
    return _create_spformer('spformer_small_sp56_224', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def spformer_small_sp32_448(pretrained: bool = False, **kwargs) -> SPFormer:
    """SPFormer-S at 448 px: 14x14 tokens (stride-8 pixels, 4x4 cells)."""
    model_args = dict(stem_stride=8, cell_size=4, img_size=448, **_SMALL)
    return _create_spformer('spformer_small_sp32_448', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def spformer_hier_tiny_sp16_224(pretrained: bool = False, **kwargs) -> SPFormer:
    """Hierarchical SPFormer-T: 14x14 superpixel tokens, 7x7 global groups in stage 2, at 224 px."""
    model_args = dict(stem_stride=4, cell_size=4, grouping='global', **dict(_TINY, **_HIER))
    return _create_spformer('spformer_hier_tiny_sp16_224', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def spformer_hier_small_sp16_224(pretrained: bool = False, **kwargs) -> SPFormer:
    """Hierarchical SPFormer-S: 14x14 superpixel tokens, 7x7 global groups in stage 2, at 224 px."""
    model_args = dict(stem_stride=4, cell_size=4, grouping='global', **dict(_SMALL, **_HIER))
    return _create_spformer('spformer_hier_small_sp16_224', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def spformer_hier_small_local_sp16_224(pretrained: bool = False, **kwargs) -> SPFormer:
    """Hierarchical SPFormer-S with local groups (SCA on the token grid, 2x2-token cells): 7x7 groups at 224 px."""
    model_args = dict(stem_stride=4, cell_size=4, grouping='local', **dict(_SMALL, **_HIER))
    return _create_spformer('spformer_hier_small_local_sp16_224', pretrained=pretrained, **dict(model_args, **kwargs))
