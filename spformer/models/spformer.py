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

Architecture and the figures this implementation must reproduce: DESIGN.md section 1.
Model names: ``spformer_{size}_sp{token stride}_{image size}``, e.g. ``spformer_small_sp16_224``
has one superpixel token per 16x16 pixels (14x14 tokens) at 224 px.
"""
import math
from functools import partial
from typing import Any, Dict, List, NamedTuple, Optional, Set, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import LayerScale, resample_abs_pos_embed, trunc_normal_
from timm.layers import register_notrace_function, register_notrace_module
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models._features import feature_take_indices
from timm.models._manipulate import checkpoint
from timm.models.vision_transformer import Block

from spformer.kernels import cells_to_image, image_to_cells, pixel_attention, superpixel_association, \
    superpixel_attention

__all__ = ['SPFormer']


def split_heads(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """(B, H, W, heads * d) channels-last -> (B, heads, H, W, d) view."""
    B, H, W, C = x.shape
    return x.view(B, H, W, num_heads, C // num_heads).permute(0, 3, 1, 2, 4)


def add_cell_update(pixels: torch.Tensor, update: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
    """``pixels + gamma * update`` for channels-last pixels (B, H, W, C) and a cell-major per-head
    update (B, heads, h, w, cell*cell, C / heads) as :func:`pixel_attention` returns it with
    ``pixel_layout='cells'``: one pass that also undoes the cell-major layout (the result follows
    the layout of ``pixels``)."""
    B, H, W, C = pixels.shape
    _, M, h, w, n, d = update.shape
    cell = H // h
    update = update.movedim(1, -2).reshape(B, h, w, cell, cell, C)  # a view of the heads-last result
    out = torch.addcmul(pixels.view(B, h, cell, w, cell, C).transpose(2, 3), update, gamma)
    return out.transpose(2, 3).reshape(B, H, W, C)


def conv_plus_identity(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """``x + conv(x)`` for a 'same' depthwise conv on channels-last (B, H, W, C) ``x``, as one conv:
    the identity joins the centre tap of the kernel (saves a pass over the pixel map)."""
    w = conv.weight
    ky, kx = w.shape[2] // 2, w.shape[3] // 2
    identity = F.pad(w.new_ones(w.shape[0], 1, 1, 1), (kx, w.shape[3] - 1 - kx, ky, w.shape[2] - 1 - ky))
    y = F.conv2d(x.permute(0, 3, 1, 2), w + identity, conv.bias, conv.stride, conv.padding, conv.dilation, conv.groups)
    return y.permute(0, 2, 3, 1)


class Association(NamedTuple):
    """The superpixel-update logits of an SCA iteration, in projection-free form.

    Head m's logit between pixel p and superpixel j is ``<pixels[p], queries[m, j]> + bias[m, j]``
    (already divided by sqrt(head_dim)); it equals ``<k_p, q_s>_m / sqrt(d)`` of DESIGN.md 1.3.
    """
    pixels: torch.Tensor  # (B, 1, h, w, cell*cell, pixel_dim) cell-major, shared by all heads
    queries: torch.Tensor  # (B, M, h, w, pixel_dim)
    bias: torch.Tensor  # (B, M, h, w)


class SuperpixelCrossAttention(nn.Module):
    """One SCA iteration (DESIGN.md 1.3): tokens gather pixels, pixels gather tokens.

    Pixels are channels-last (B, H, W, pixel_dim), superpixels (B, h, w, embed_dim). Each of the
    ``num_heads`` heads has its own 9-way association (multi-head association).

    The parameters are those of DESIGN.md (a bias-free 1x1 projection of the pixels to
    2 * pixel_dim + embed_dim channels and one LayerNorm over all of them), but the pixel q|k|v is
    never built (DESIGN.md 1.5): with Wc the projection minus its mean row, the normalized output is
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
    ):
        super().__init__()
        if pixel_dim % num_heads or embed_dim % num_heads:
            raise ValueError(
                f'sca_heads={num_heads} must divide pixel_dim={pixel_dim} and embed_dim={embed_dim}')
        self.pixel_dim = pixel_dim
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.cell_size = cell_size
        self.attn_backend = attn_backend
        # Conditional position encodings: they feed the projections only.
        self.pixel_pos = nn.Conv2d(pixel_dim, pixel_dim, 3, padding=1, groups=pixel_dim)
        self.sp_pos = nn.Conv2d(embed_dim, embed_dim, 3, padding=1, groups=embed_dim)
        # 1x1 convs as Linear on channels-last; one LayerNorm over all q|k|v channels at once.
        self.sp_qkv = nn.Linear(embed_dim, 3 * pixel_dim, bias=False)
        self.sp_norm = norm_layer(3 * pixel_dim)
        self.pixel_qkv = nn.Linear(pixel_dim, 2 * pixel_dim + embed_dim, bias=False)
        self.pixel_norm = norm_layer(2 * pixel_dim + embed_dim)
        self.sp_ls = LayerScale(embed_dim, init_values)
        # The last iteration of a stage skips the pixel update, so it has no pixel LayerScale.
        self.pixel_ls = LayerScale(pixel_dim, init_values) if update_pixels else None

    def _pixel_projection(self):
        """Per-head pieces of the centred pixel projection: (Wc_q, Wc_k, Wc_v) as (M, rows, C_p),
        the LayerNorm affine split the same way, and G = Wc^T Wc / channels."""
        C_p, C, M = self.pixel_dim, self.embed_dim, self.num_heads
        w = self.pixel_qkv.weight
        wc = w - w.mean(dim=0, keepdim=True)
        gram = wc.t() @ wc / w.shape[0]
        wq, wk, wv = wc.split([C_p, C_p, C])
        gamma = self.pixel_norm.weight.split([C_p, C_p, C])
        beta = self.pixel_norm.bias.split([C_p, C_p, C])
        heads = lambda t: t.reshape(M, t.shape[0] // M, *t.shape[1:])  # noqa: E731
        return [heads(t) for t in (wq, wk, wv)], [heads(t) for t in gamma], [heads(t) for t in beta], gram

    def forward(
            self, pixels: torch.Tensor, superpixels: torch.Tensor,
    ) -> Tuple[torch.Tensor, torch.Tensor, Association]:
        """Returns (pixels, superpixels, association of the superpixel update)."""
        C_p, M, cell = self.pixel_dim, self.num_heads, self.cell_size
        B, H, W, _ = pixels.shape
        _, h, w, C = superpixels.shape
        scale = (C_p // M) ** -0.5
        (wq, wk, wv), (gq, gk, gv), (bq, bk, bv), gram = self._pixel_projection()

        # Both ops read the pixels cell-major: one layout copy here instead of one per op call.
        x = image_to_cells(conv_plus_identity(self.pixel_pos, pixels).unsqueeze(1), cell)  # (B, 1, h, w, n, C_p)
        # r x: the pixels divided by the LayerNorm's standard deviation of their projection.
        var = (torch.matmul(x, gram) * x).sum(dim=-1, keepdim=True)
        x_hat = x * torch.rsqrt(var + self.pixel_norm.eps)

        s = conv_plus_identity(self.sp_pos, superpixels)
        q_s, k_s, v_s = self.sp_norm(self.sp_qkv(s)).split([C_p, C_p, C_p], dim=-1)
        q_s, k_s = q_s.reshape(B, h, w, M, -1), k_s.reshape(B, h, w, M, -1)

        # Superpixel update: logits <k_p, q_s>; the bias <beta_k, q_s> is constant over a
        # superpixel's pixels and cancels in its softmax.
        # Under autocast the projections may come out in another dtype than x_hat (LayerNorm runs
        # in fp32 on CUDA): the ops take one dtype, x_hat's.
        dt = x_hat.dtype
        queries = torch.einsum('bhwmd,mdc->bmhwc', q_s * gk * scale, wk).to(dt)
        gathered = superpixel_attention(
            queries, x_hat, x_hat, cell, scale=1.0, backend=self.attn_backend, pixel_layout='cells')
        sp_update = torch.einsum('bmhwc,moc->bhwmo', gathered, wv) * gv + bv  # (B, h, w, M, C / M)
        superpixels = superpixels + self.sp_ls(sp_update.reshape(B, h, w, C))

        if self.pixel_ls is not None:  # both updates read the old pixels and superpixels
            keys = torch.einsum('bhwmd,mdc->bmhwc', k_s * gq * scale, wq).to(dt)
            key_bias = (torch.einsum('bhwmd,md->bmhw', k_s, bq) * scale).to(dt)
            values = v_s.reshape(B, h, w, M, -1).permute(0, 3, 1, 2, 4).to(dt)
            out = pixel_attention(
                x_hat, keys, values, cell, scale=1.0, bias=key_bias, backend=self.attn_backend, pixel_layout='cells')
            pixels = add_cell_update(pixels, out, self.pixel_ls.gamma)
        association = Association(x_hat, queries, (torch.einsum('bhwmd,md->bmhw', q_s, bk) * scale).to(dt))
        return pixels, superpixels, association


class PixelUpdate(nn.Module):
    """Stage-end pixel update ("unfolding"): each pixel takes back its superpixels' tokens.

    P <- P + gamma * sum_j softmax_j(k_p . q_s) proj(S)_j per head, with the logits of the
    stage's last SCA iteration (DESIGN.md 1.2, step 3.4).
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
    ):
        super().__init__()
        self.num_heads = num_heads
        self.cell_size = cell_size
        self.attn_backend = attn_backend
        self.proj = nn.Linear(embed_dim, pixel_dim, bias=False)
        self.norm = norm_layer(pixel_dim)
        self.ls = LayerScale(pixel_dim, init_values)

    def forward(self, pixels: torch.Tensor, superpixels: torch.Tensor, association: Association) -> torch.Tensor:
        v = split_heads(self.norm(self.proj(superpixels)), self.num_heads).to(association.pixels.dtype)
        update = pixel_attention(
            association.pixels, association.queries, v, self.cell_size, scale=1.0, bias=association.bias,
            backend=self.attn_backend, pixel_layout='cells')
        return add_cell_update(pixels, update, self.ls.gamma)


class SuperpixelInit(nn.Module):
    """Initial superpixel tokens: 1x1 conv + LayerNorm2d + GELU on the pixels, then the mean over
    every cell (DESIGN.md 1.2, step 2).

    Its three embed_dim-wide pixel maps would be the largest tensors kept for backward (3 x 38 MB
    for SPFormer-S at batch 8), so in training it keeps only its input and recomputes them.
    """

    def __init__(self, pixel_dim: int, embed_dim: int, cell_size: int, norm_layer=partial(nn.LayerNorm, eps=1e-6)):
        super().__init__()
        self.cell_size = cell_size
        self.proj = nn.Linear(pixel_dim, embed_dim, bias=False)
        self.norm = norm_layer(embed_dim)
        self.act = nn.GELU()

    def _pooled(self, pixels: torch.Tensor) -> torch.Tensor:
        B, H, W, _ = pixels.shape
        c = self.cell_size
        if pixels.is_cuda or torch.compiler.is_compiling():
            x = self.act(self.norm(self.proj(pixels)))
            return F.avg_pool2d(x.permute(0, 3, 1, 2), c).permute(0, 2, 3, 1)
        # On CPU the wide map is memory-bound (each pass over it costs as much as the projection):
        # a few cell rows at a time keep it in cache, ~3x faster for SPFormer-S. Same result.
        rows = pixels.reshape(B * H // c, c, W, -1)
        chunk = max(1, (1 << 20) // (c * W * self.proj.out_features * pixels.element_size()))
        pooled = [self.act(self.norm(self.proj(part))).sum(1).reshape(part.shape[0], W // c, c, -1).sum(2)
                  for part in rows.split(chunk)]
        return torch.cat(pooled).reshape(B, H // c, W // c, -1) / (c * c)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and pixels.requires_grad:
            return torch.utils.checkpoint.checkpoint(self._pooled, pixels, use_reentrant=False)
        return self._pooled(pixels)


class SPFormerStage(nn.Module):
    """SCA iterations -> absolute position embedding -> ViT blocks -> (pixel update)."""

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
    ):
        super().__init__()
        self.sca = nn.ModuleList([
            SuperpixelCrossAttention(
                pixel_dim, embed_dim, sca_heads, cell_size,
                update_pixels=i < sca_iters - 1,
                init_values=init_values,
                norm_layer=norm_layer,
                attn_backend=attn_backend,
            )
            for i in range(sca_iters)
        ])
        self.pos_embed = nn.Parameter(torch.zeros(1, grid_size[0] * grid_size[1], embed_dim))
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
            )
            for i in range(depth)
        ])
        self.unfold = PixelUpdate(
            pixel_dim, embed_dim, sca_heads, cell_size, init_values, norm_layer, attn_backend,
        ) if update_pixels else None


@register_notrace_function
def check_image_input(x: torch.Tensor, in_chans: int, token_stride: int, img_size: Tuple[int, int], dynamic: bool):
    """Fail early, naming the argument, instead of deep inside a reshape."""
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f'x must be a 4-D image batch (B, {in_chans}, H, W), got {got}')
    if x.shape[1] != in_chans:
        raise ValueError(f'x has {x.shape[1]} channels, expected in_chans={in_chans} (shape (B, {in_chans}, H, W))')
    H, W = x.shape[2], x.shape[3]
    if H % token_stride or W % token_stride or H == 0 or W == 0:
        raise ValueError(
            f'x has spatial size {H}x{W}; both sides must be positive multiples of the superpixel '
            f'token stride {token_stride}')
    if not dynamic and (H, W) != tuple(img_size):
        raise ValueError(
            f'x has spatial size {H}x{W} but the model was built for img_size={tuple(img_size)}; '
            f'pass img_size=... or dynamic_img_size=True to timm.create_model for other sizes')


class SPFormer(nn.Module):
    """ SPFormer: pixel stem -> superpixel tokens -> stages of (SCA, ViT blocks) -> mean-pool head. """

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
            cell_size: Pixels per superpixel cell side; token stride = stem_stride * cell_size.
            init_values: LayerScale init of the SCA and pixel updates.
            dynamic_img_size: Accept any input whose sides are multiples of the token stride
                (position embeddings resampled on the fly).
            attn_backend: Backend of the local cross-attention op ('auto', 'torch', 'reference').
        """
        super().__init__()
        assert global_pool in ('', 'avg'), f"global_pool must be 'avg' or '', got {global_pool!r}"
        img_size = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
        token_stride = stem_stride * cell_size
        if img_size[0] % token_stride or img_size[1] % token_stride:
            raise ValueError(f'img_size={img_size} must be a multiple of the token stride {token_stride}')
        norm_layer = partial(nn.LayerNorm, eps=1e-6)
        self.num_classes = num_classes
        self.global_pool = global_pool
        self.in_chans = in_chans
        self.img_size = img_size
        self.num_features = self.head_hidden_size = self.embed_dim = embed_dim
        self.pixel_dim = pixel_dim
        self.sca_heads = sca_heads
        self.stem_stride = stem_stride
        self.cell_size = cell_size
        self.token_stride = token_stride
        self.grid_size = (img_size[0] // token_stride, img_size[1] // token_stride)
        self.dynamic_img_size = dynamic_img_size
        self.num_prefix_tokens = 0
        self.grad_checkpointing = False

        self.stem = nn.Sequential()
        self.stem.add_module('conv', nn.Conv2d(in_chans, pixel_dim, stem_stride, stride=stem_stride, bias=False))
        self.stem.add_module('bn', nn.BatchNorm2d(pixel_dim))
        self.stem.add_module('act', nn.ReLU(inplace=True))
        self.sp_init = SuperpixelInit(pixel_dim, embed_dim, cell_size, norm_layer)

        dpr = [x.item() for x in torch.linspace(0, drop_path_rate, sum(depths))]
        self.stages = nn.ModuleList()
        # Feature 0, the pixel stream as the last stage reads it, is the output of the last pixel
        # update (channels-last there; forward_intermediates returns it NCHW).
        pixel_source = f'stages.{len(depths) - 2}.unfold' if len(depths) > 1 else 'stem'
        self.feature_info = [dict(num_chs=pixel_dim, reduction=stem_stride, module=pixel_source)]
        for i, depth in enumerate(depths):
            first = sum(depths[:i])
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
            ))
            self.feature_info += [
                dict(num_chs=embed_dim, reduction=token_stride, module=f'stages.{i}.blocks.{j}')
                for j in range(depth)]
        self.depths = tuple(depths)

        self.norm = nn.Identity()  # the head normalizes after pooling (fc_norm), as in DESIGN.md
        self.fc_norm = norm_layer(embed_dim)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()

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
        """Layer-decay groups: stem, superpixel init and stage-1 SCA first, then blocks in order."""
        return dict(
            stem=r'^stem|^sp_init|^stages\.0\.(?:sca|pos_embed)',
            blocks=r'^stages\.(\d+)' if coarse else [
                (r'^stages\.(\d+)\.(?:sca|pos_embed)', (-1,)),
                (r'^stages\.(\d+)\.blocks\.(\d+)', None),
                (r'^stages\.(\d+)\.unfold', (99999,)),
                (r'^fc_norm', (99999,)),
            ],
        )

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True):
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None):
        self.num_classes = num_classes
        if global_pool is not None:
            assert global_pool in ('', 'avg'), f"global_pool must be 'avg' or '', got {global_pool!r}"
            self.global_pool = global_pool
        self.head = nn.Linear(self.embed_dim, num_classes) if num_classes > 0 else nn.Identity()

    # --- forward --------------------------------------------------------------------------

    def _run(self, module: nn.Module, *args):
        if self.grad_checkpointing and not torch.jit.is_scripting():
            return checkpoint(module, *args)
        return module(*args)

    def _stem(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Image -> channels-last pixels (B, H/s, W/s, C_p) and superpixels (B, h, w, C)."""
        check_image_input(x, self.in_chans, self.token_stride, self.img_size, self.dynamic_img_size)
        pixels = self.stem(x).permute(0, 2, 3, 1)
        return pixels, self.sp_init(pixels)

    def _pos_embed(self, stage: SPFormerStage, tokens: torch.Tensor, grid: Tuple[int, int]) -> torch.Tensor:
        if self.dynamic_img_size and tuple(grid) != self.grid_size:
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
            block_indices: Optional[Set[int]] = None,
            stop_after_block: Optional[int] = None,
            need_pixels: bool = False,
    ):
        """Shared body of every forward. Returns (tokens, grid, final pixels, block outputs, per-stage Association)."""
        pixels, superpixels = self._stem(x)
        B, h, w, C = superpixels.shape
        block_outputs: List[torch.Tensor] = []
        associations: List[Association] = []
        tokens = superpixels.reshape(B, h * w, C)
        block_idx = 0
        for i, stage in enumerate(self.stages):
            pixels_final = all(later.unfold is None for later in self.stages[i:])
            if stop_after_block is not None and block_idx > stop_after_block and (pixels_final or not need_pixels):
                break
            stage_pixels = pixels
            _, superpixels, association = self._stage_sca(stage, pixels, superpixels)
            associations.append(association)
            tokens = self._pos_embed(stage, superpixels.reshape(B, h * w, C), (h, w))
            for blk in stage.blocks:
                tokens = self._run(blk, tokens)
                if block_indices is not None and block_idx in block_indices:
                    block_outputs.append(tokens)
                block_idx += 1
            superpixels = tokens.reshape(B, h, w, C)
            if stage.unfold is not None:
                pixels = self._run(stage.unfold, stage_pixels, superpixels, association)
        return self.norm(tokens), (h, w), pixels, block_outputs, associations

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Superpixel tokens after the last block, (B, h*w, embed_dim) in raster order of the token grid."""
        return self._forward_stages(x)[0]

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
        """Features of every ViT block (and of the pixel stream) on the way to forward_features.

        Index 0 is the stride-``stem_stride`` pixel stream as the last stage reads it (after every
        stage's pixel update), (B, pixel_dim, H/stem_stride, W/stem_stride); index 1 + i is the output
        of ViT block i (blocks numbered across stages), (B, embed_dim, h, w) on the token grid.

        Args:
            x: Input image tensor.
            indices: Take last n features if int, all if None, select matching indices if sequence.
            norm: Apply the head's LayerNorm (fc_norm) to block outputs.
            stop_early: Stop iterating over blocks when the last wanted feature is reached.
            output_fmt: 'NCHW' or 'NLC'.
            intermediates_only: Only return the intermediate features.
        """
        assert output_fmt in ('NCHW', 'NLC'), 'Output format must be one of NCHW or NLC.'
        take_indices, max_index = feature_take_indices(len(self.feature_info), indices)
        block_indices = {i - 1 for i in take_indices if i > 0}
        want_pixels = 0 in take_indices
        stop = max_index - 1 if stop_early or intermediates_only else None
        tokens, (h, w), pixels, block_outputs, _ = self._forward_stages(
            x, block_indices, stop_after_block=stop, need_pixels=want_pixels)

        B = x.shape[0]
        intermediates = []
        if want_pixels:
            intermediates.append(
                pixels.permute(0, 3, 1, 2).contiguous() if output_fmt == 'NCHW' else pixels.flatten(1, 2))
        for y in block_outputs:
            y = self.fc_norm(y) if norm else y
            intermediates.append(y.reshape(B, h, w, -1).permute(0, 3, 1, 2).contiguous() if output_fmt == 'NCHW' else y)
        if intermediates_only:
            return intermediates
        return tokens, intermediates

    def prune_intermediate_layers(
            self,
            indices: Union[int, List[int]] = 1,
            prune_norm: bool = False,
            prune_head: bool = True,
    ) -> List[int]:
        """Drop the blocks (and stages) not needed for the requested intermediates."""
        take_indices, max_index = feature_take_indices(len(self.feature_info), indices)
        num_blocks = max_index  # feature 1 + i is block i, so blocks 0 .. max_index - 1 are needed
        if 0 in take_indices:  # the pixel stream is final after every stage but the last
            num_blocks = max(num_blocks, sum(self.depths[:-1]))
        kept, first = nn.ModuleList(), 0
        for stage in self.stages:
            if first >= num_blocks and first > 0:
                break
            stage.blocks = stage.blocks[:num_blocks - first]
            first += self.depths[len(kept)]
            kept.append(stage)
        self.stages = kept
        if prune_norm:
            self.fc_norm = nn.Identity()
        if prune_head:
            self.reset_classifier(0, '')
        return take_indices

    @torch.jit.ignore
    def forward_superpixels(self, x: torch.Tensor) -> List[Dict[str, torch.Tensor]]:
        """The learned superpixels of every stage (from its last SCA iteration).

        Returns one dict per stage:
            ``association``: (B, sca_heads, 9, H/s, W/s) soft assignment of every pixel of the pixel
                stream (stride s = stem_stride) to its 9 neighbouring superpixels, per head;
            ``association_merged``: (B, 9, H/s, W/s), the softmax of the head-merged logits
                sum_m a_m / sqrt(M) (DESIGN.md 1.3);
            ``labels``: (B, H, W) int64 hard superpixel map at input resolution: the token index
                (raster order on the h x w grid) of the argmax of ``association_merged`` (ties go to
                the pixel's own cell; neighbours outside the image are never chosen);
            ``grid``: (h, w) of the token grid as a tensor.
        Neighbour k is the cell at offset (k // 3 - 1, k % 3 - 1) from the pixel's own cell.
        """
        _, (h, w), _, _, associations = self._forward_stages(x)
        B = x.shape[0]
        out = []
        for assoc in associations:
            cell = self.cell_size
            per_head = cells_to_image(superpixel_association(
                assoc.pixels, assoc.queries, cell, scale=1.0, bias=assoc.bias, pixel_layout='cells'), cell)
            # Head-merged logits sum_m a_m / sqrt(M): one head with summed queries and biases.
            norm = self.sca_heads ** -0.5
            merged = cells_to_image(superpixel_association(
                assoc.pixels, assoc.queries.sum(1, keepdim=True) * norm, cell, scale=1.0,
                bias=assoc.bias.sum(1, keepdim=True) * norm, pixel_layout='cells'), cell)
            per_head, merged = per_head.permute(0, 1, 4, 2, 3), merged[:, 0].permute(0, 3, 1, 2)
            out.append(dict(
                association=per_head,
                association_merged=merged,
                labels=association_to_labels(merged, self.cell_size, self.stem_stride),
                grid=torch.tensor([h, w]),
            ))
        return out


def association_to_labels(association: torch.Tensor, cell_size: int, upsample: int = 1) -> torch.Tensor:
    """(B, 9, H, W) neighbour probabilities -> (B, H*upsample, W*upsample) int64 token ids.

    Ties go to the own cell (neighbour 4); a neighbour with probability 0 (outside the image)
    is never chosen because every pixel's own cell has positive probability.
    """
    B, _, H, W = association.shape
    h, w = H // cell_size, W // cell_size
    # Put the own cell first so argmax (which returns the first maximum) prefers it on ties.
    order = torch.tensor([4, 0, 1, 2, 3, 5, 6, 7, 8], device=association.device)
    k = order[association.index_select(1, order).argmax(dim=1)]  # (B, H, W)
    cy = torch.arange(H, device=k.device)[:, None] // cell_size
    cx = torch.arange(W, device=k.device)[None, :] // cell_size
    ny = (cy + k // 3 - 1).clamp(0, h - 1)
    nx = (cx + k % 3 - 1).clamp(0, w - 1)
    labels = ny * w + nx
    if upsample > 1:
        labels = labels.repeat_interleave(upsample, dim=1).repeat_interleave(upsample, dim=2)
    return labels


# SCA layers, pixel updates and the superpixel init index tensors by runtime shapes: FX feature extraction keeps
# them as leaves (the ViT blocks around them trace normally).
register_notrace_module(SuperpixelCrossAttention)
register_notrace_module(PixelUpdate)
register_notrace_module(SuperpixelInit)


def checkpoint_filter_fn(state_dict: Dict[str, torch.Tensor], model: SPFormer) -> Dict[str, torch.Tensor]:
    """Unwrap training checkpoints, strip DDP / torch.compile prefixes, resample position embeddings,
    and refuse (naming both) a state dict made for another SPFormer variant."""
    for key in ('state_dict_ema', 'model_ema', 'state_dict', 'model'):
        if key in state_dict and isinstance(state_dict[key], dict):
            state_dict = state_dict[key]
            break
    out = {}
    for k, v in state_dict.items():
        for prefix in ('module.', '_orig_mod.'):
            while k.startswith(prefix):
                k = k[len(prefix):]
        out[k.replace('._orig_mod.', '.')] = v  # torch.compile'd submodules

    expected = model.state_dict()
    for k, v in out.items():
        if k.endswith('pos_embed') and k in expected and v.shape != expected[k].shape:
            n = v.shape[1]
            side = int(math.sqrt(n))
            if side * side == n and v.shape[-1] == expected[k].shape[-1]:  # another image size: resample
                out[k] = resample_abs_pos_embed(v, new_size=model.grid_size, old_size=(side, side), num_prefix_tokens=0)
    mismatched = [  # in model order, so the first named tensor is the first that differs
        f'{k}: checkpoint {tuple(out[k].shape)} vs model {tuple(t.shape)}'
        for k, t in expected.items()
        if k in out and out[k].shape != t.shape and not k.startswith('head.')]
    missing = [k for k in expected if k not in out and not k.startswith('head.')]
    unexpected = [k for k in out if k not in expected and not k.startswith('head.')]
    if mismatched or missing or unexpected:
        name = model.pretrained_cfg.get('architecture') if isinstance(getattr(model, 'pretrained_cfg', None), dict) else None
        problems = mismatched[:4] + [f'{k}: missing from the checkpoint' for k in missing[:2]] + [
            f'{k}: not in the model' for k in unexpected[:2]]
        raise ValueError(
            f'the checkpoint does not fit {name or "this SPFormer"} (pixel_dim={model.pixel_dim}, '
            f'embed_dim={model.embed_dim}, depths={model.depths}, stem_stride={model.stem_stride}, '
            f'cell_size={model.cell_size}): it was made for another variant, its tensors are those of '
            f'{_describe_checkpoint(out)}. '
            f'{len(mismatched)} tensors differ in shape, {len(missing)} are missing, {len(unexpected)} unexpected: '
            + '; '.join(problems))
    return out


def _variant_shapes(name: str) -> Dict[str, Tuple[int, ...]]:
    """Tensor shapes (but the head) of a registered variant, built with meta parameters: no memory, no init."""
    from torch.overrides import TorchFunctionMode
    from timm import create_model

    class MetaParameters(TorchFunctionMode):  # not torch.device('meta'): __init__ calls .item() on a linspace
        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if func in (torch.empty, torch.zeros, torch.ones, torch.full) and kwargs.get('device') is None:
                kwargs['device'] = 'meta'
            return func(*args, **kwargs)

    if name not in _VARIANT_SHAPES:
        with MetaParameters():
            model = create_model(name)
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


class PretrainedWeightsUnavailable(RuntimeError):
    """``pretrained=True`` could not fetch the weights (not published, offline and not cached, missing file)."""


def _weights_unavailable(variant: str, kwargs: Dict[str, Any], error: BaseException) -> PretrainedWeightsUnavailable:
    from timm.models._builder import _resolve_pretrained_source, resolve_pretrained_cfg
    cfg = resolve_pretrained_cfg(variant, kwargs.get('pretrained_cfg'), kwargs.get('pretrained_cfg_overlay')).to_dict()
    name = f"{variant}.{cfg['tag']}" if cfg.get('tag') else variant
    load_from, location = _resolve_pretrained_source(cfg)
    where = f'the Hugging Face Hub repo {location}' if load_from == 'hf-hub' else f'{load_from} {location}'
    cause = type(error).__name__ + (f': {str(error).splitlines()[0]}' if str(error).strip() else '')
    unpublished = load_from == 'hf-hub' and location == f'{HF_HUB_ORG}/{name}' and name not in PUBLISHED_WEIGHTS
    return PretrainedWeightsUnavailable(
        f'pretrained=True: could not load the weights of {name} from {where} ({cause}). '
        + ('No weights are published for it yet (see the README model table). ' if unpublished else '')
        + "To load your own: timm.create_model('hf-hub:ORG/NAME', pretrained=True) for weights pushed with "
        f"spformer-hub, or timm.create_model('{variant}', pretrained=True, "
        "pretrained_cfg_overlay=dict(file='model.safetensors')) for a local file; or pretrained=False for a "
        'random init.')


def _unpublished_and_not_cached(variant: str, kwargs: Dict[str, Any]) -> bool:
    """True when pretrained=True would ask the Hub for weights that are not published (PUBLISHED_WEIGHTS)
    and are not in the local Hub cache either: fail at once instead of retrying the network for a
    minute. An override (hf-hub: id, pretrained_cfg_overlay file/url) is always tried."""
    from huggingface_hub import try_to_load_from_cache
    from timm.models._builder import _resolve_pretrained_source, resolve_pretrained_cfg
    cfg = resolve_pretrained_cfg(variant, kwargs.get('pretrained_cfg'), kwargs.get('pretrained_cfg_overlay')).to_dict()
    name = f"{variant}.{cfg['tag']}" if cfg.get('tag') else variant
    load_from, location = _resolve_pretrained_source(cfg)
    if load_from != 'hf-hub' or location != f'{HF_HUB_ORG}/{name}' or name in PUBLISHED_WEIGHTS:
        return False
    # what timm fetches first for an hf-hub source; we publish safetensors only
    return not isinstance(try_to_load_from_cache(location, 'model.safetensors'), str)


def _create_spformer(variant: str, pretrained: bool = False, **kwargs) -> SPFormer:
    out_indices = kwargs.pop('out_indices', 3)
    import httpx2  # huggingface_hub's HTTP client
    from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError, OfflineModeIsEnabled
    if pretrained and _unpublished_and_not_cached(variant, kwargs):
        missing = FileNotFoundError('not published and not in the local Hub cache')
        raise _weights_unavailable(variant, kwargs, missing) from missing
    try:
        return build_model_with_cfg(
            SPFormer,
            variant,
            pretrained,
            pretrained_filter_fn=checkpoint_filter_fn,
            feature_cfg=dict(out_indices=out_indices, feature_cls='getter'),
            **kwargs,
        )
    except (HfHubHTTPError, EntryNotFoundError, OfflineModeIsEnabled, ConnectionError, FileNotFoundError,
            httpx2.TransportError) as e:
        if not pretrained:
            raise
        raise _weights_unavailable(variant, kwargs, e) from e


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


# Every tag names the Hub repo its weights go to (`spformer-hub push`): hf_hub_id='spformer/<model>.<tag>'.
# None is published yet (ImageNet training is issue 4), so pretrained=True loads only what a user pushed
# there or has in the local Hub cache; PUBLISHED_WEIGHTS lists the tags whose repos exist.
HF_HUB_ORG = 'spformer'
PUBLISHED_WEIGHTS: Tuple[str, ...] = ()

default_cfgs = generate_default_cfgs({
    name: _cfg(hf_hub_id=f'{HF_HUB_ORG}/{name}', **cfg) for name, cfg in {
        'spformer_tiny_sp16_224.in1k': {},
        'spformer_small_sp16_224.in1k': {},
        'spformer_base_sp16_224.in1k': {},
        'spformer_small_sp32_224.in1k': {},
        'spformer_small_sp56_224.in1k': {},
        'spformer_small_sp32_448.in1k': dict(input_size=(3, 448, 448), crop_pct=1.0),
    }.items()
})

_TINY = dict(pixel_dim=32, embed_dim=192, depths=(2, 10), num_heads=3, sca_heads=2)
_SMALL = dict(pixel_dim=64, embed_dim=384, depths=(2, 10), num_heads=6, sca_heads=2)
_BASE = dict(pixel_dim=96, embed_dim=768, depths=(2, 10), num_heads=12, sca_heads=3)


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
    """SPFormer-S/56: 4x4 tokens (stride-8 pixels, 7x7 cells) at 224 px."""
    model_args = dict(stem_stride=8, cell_size=7, **_SMALL)
    return _create_spformer('spformer_small_sp56_224', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def spformer_small_sp32_448(pretrained: bool = False, **kwargs) -> SPFormer:
    """SPFormer-S at 448 px: 14x14 tokens (stride-8 pixels, 4x4 cells)."""
    model_args = dict(stem_stride=8, cell_size=4, img_size=448, **_SMALL)
    return _create_spformer('spformer_small_sp32_448', pretrained=pretrained, **dict(model_args, **kwargs))
