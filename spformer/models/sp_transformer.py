""" SP-Transformer: superpixel transformers for semantic segmentation

A backbone's pixel features are tokenized into a coarse grid of soft superpixels by local
cross-attention; the superpixels are mixed by a few global self-attention blocks and classified; each
pixel's prediction is the association-weighted sum of the class logits of its 9 neighbouring
superpixels.

Paper:
    `Superpixel Transformers for Efficient Semantic Segmentation` (Zhu, Mei et al., IROS 2023)
        - https://arxiv.org/abs/2309.16889
    Published: ResNet-50 80.4 mIoU on Cityscapes val (29M parameters, 253 GFLOPs at 1024x2048);
    ConvNeXt-L 202M / 1557G.

The model, top to bottom (B images of H x W, pixel features at ``pixel_stride`` s, superpixel cells of
``cell_size`` c feature pixels, so one superpixel token per T = s * c input pixels, an h x w = H/T x W/T
grid):

1. **Backbone**: any timm model, ``features_only``, at the levels of strides 2 (4 where it has no
   stride-2 level), 8 and 32 (read from its ``feature_info``).
2. **Hypercolumn neck**: every level to ``neck_dim`` channels at stride s, summed.
3. **Superpixel tokenizer**: learned superpixel queries, one per grid cell, refined by
   ``tokenizer_layers`` dual-path local cross-attention layers: superpixels attend to the pixels of the
   3x3 cells around them (:func:`spformer.kernels.superpixel_attention`), pixels to their 9 neighbouring
   superpixels (:func:`spformer.kernels.pixel_attention`).
4. **Classification**: ``num_blocks`` timm ViT blocks over all superpixels, a LayerNorm and a linear
   classifier per superpixel.
5. **Association and unfolding**: Q_pi = softmax over the 9 neighbours of <pixel, superpixel> of the
   tokenizer's outputs, upsampled to the input in superpixel perspective
   (:func:`spformer.kernels.upsample_association`); Y_p = sum_i Q_pi C_i (:func:`unfold_superpixel_logits`).

Model names: ``sp_transformer_{backbone}_{dataset}`` (:data:`SEGMENTATION_CONFIGS`), registered with timm:
``timm.create_model('sp_transformer_r50_cityscapes', num_classes=19)``. The loss of the paper is
:func:`topk_cross_entropy`; mIoU is in :mod:`spformer.eval.segmentation_metrics`.
"""
import os
from functools import partial
from typing import Any, Dict, List, NamedTuple, Optional, Sequence, Set, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

import timm
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import DropPath, LayerNorm2d, Mlp, resample_abs_pos_embed, trunc_normal_
from timm.layers import register_notrace_module
from timm.models import generate_default_cfgs, register_model
from timm.models._manipulate import checkpoint
from timm.models.vision_transformer import Block, init_weights_vit_timm

from spformer.kernels import NEIGHBOR_OFFSETS, OWN_CELL_MARGIN, cells_to_image, image_to_cells, native_pixel_layout, \
    pixel_attention, superpixel_association, superpixel_attention, superpixel_labels, upsample_association
from spformer.kernels.functional import check_backend
from spformer.models.pretrained import build_model_with_weights, unwrapped_key
from spformer.models.spformer import autocast_disabled, check_image_input

__all__ = [
    'SPTransformer', 'SPTransformerParts', 'SEGMENTATION_CONFIGS', 'DECODERS', 'create_segmentation_model',
    'list_segmentation_models', 'topk_cross_entropy', 'unfold_superpixel_logits', 'backbone_levels',
]

DECODERS = ('superpixel', 'bilinear')
# Pickle-based checkpoint files: never loaded (a pickle runs code when it is read).
_PICKLE_SUFFIXES = ('.pth', '.pt', '.bin', '.ckpt', '.pkl', '.pickle')


# --- the backbone -------------------------------------------------------------------------------

def _check_backbone_name(backbone) -> str:
    if not isinstance(backbone, str) or not timm.is_model(timm.models.split_model_name_tag(backbone)[0]):
        raise ValueError(
            f'backbone must be the name of a timm model (e.g. resnet50, convnext_large, optionally with a '
            f"pretrained tag such as 'resnet50.a1_in1k'), got {backbone!r}")
    return backbone


def _backbone_features(backbone: str, **kwargs) -> Tuple[List[int], Dict[str, Any]]:
    """The strides of the feature levels of ``timm.create_model(backbone, features_only=True, **kwargs)`` (what
    the segmenter builds), read from a build on the meta device (no memory, no init); and the kwargs that keep
    those levels when ``out_indices`` is given too: SPFormer's feature pyramid (strides 4, 8, 16, 32) is its
    ``features_only`` default only without ``out_indices``, so it is asked for by name (``feature_pyramid``)."""
    try:
        with torch.device('meta'):
            features = timm.create_model(backbone, pretrained=False, features_only=True, **kwargs)
    except Exception:  # a model that cannot be built on meta
        features = timm.create_model(backbone, pretrained=False, features_only=True, **kwargs)
    pyramid = getattr(getattr(features, 'model', None), 'feature_pyramid', False) is True
    return list(features.feature_info.reduction()), (dict(feature_pyramid=True) if pyramid else {})


def backbone_levels(backbone: str, reductions: Optional[Sequence[int]] = None) -> Tuple[int, int, int]:
    """The ``feature_info`` indices SPTransformer reads from ``backbone``: the levels of strides 2 (or 4
    where there is no stride-2 level), 8 and 32 (the deepest level of each stride when several share it).

    Raises a ValueError naming ``backbone`` and its strides where one is missing (e.g. the /32 SPFormers,
    whose feature pyramid is at strides 8, 16, 32 and 64).
    """
    _check_backbone_name(backbone)
    if reductions is None:
        reductions = _backbone_features(backbone)[0]
    last = {r: i for i, r in enumerate(reductions)}  # the deepest level of each stride
    fine = last.get(2, last.get(4))
    if fine is None or 8 not in last or 32 not in last:
        raise ValueError(
            f'backbone={backbone!r} has feature levels at strides {list(reductions)} (timm feature_info); '
            f'SPTransformer needs levels at strides 2 (or 4), 8 and 32')
    return fine, last[8], last[32]


def _backbone_weights(backbone_pretrained) -> Dict[str, Any]:
    """timm.create_model kwargs for ``backbone_pretrained``: False, True (timm's published weights), a local
    ``.safetensors`` file or an ``'hf-hub:org/name'`` id. Pickle-based files are refused, never loaded."""
    if backbone_pretrained is None or backbone_pretrained is False:
        return dict(pretrained=False)
    if backbone_pretrained is True:
        return dict(pretrained=True)
    if isinstance(backbone_pretrained, (str, os.PathLike)):
        path = os.fspath(backbone_pretrained)
        if path.startswith('hf-hub:'):
            return dict(pretrained=True, pretrained_cfg_overlay=dict(source='hf-hub', hf_hub_id=path[len('hf-hub:'):]))
        suffix = os.path.splitext(path)[1].lower()
        if suffix in _PICKLE_SUFFIXES:
            raise ValueError(
                f'backbone_pretrained={path!r} is a pickle-based checkpoint ({suffix}), which is never loaded (reading '
                f'a pickle can run code): convert it to .safetensors (safetensors.torch.save_file(state_dict, ...)) '
                f'and pass that file')
        if suffix != '.safetensors':
            raise ValueError(
                f"backbone_pretrained must be False, True, a local .safetensors file or an 'hf-hub:org/name' id, "
                f'got {path!r}')
        if not os.path.isfile(path):
            raise ValueError(f'backbone_pretrained={path!r}: no such file')
        return dict(pretrained=True, pretrained_cfg_overlay=dict(file=path))
    raise ValueError(
        f"backbone_pretrained must be False, True, a local .safetensors file or an 'hf-hub:org/name' id, "
        f'got {backbone_pretrained!r}')


# --- layers ----------------------------------------------------------------------------------------

def _periodic(table: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """A (P, Q, C) table tiled over a rows x cols map: entry (y, x) is table[y % P, x % Q]."""
    P, Q = table.shape[:2]
    ys = torch.arange(rows, device=table.device) % P
    xs = torch.arange(cols, device=table.device) % Q
    return table[ys[:, None], xs[None, :]]


def _to_layout(x: torch.Tensor, cell: int, layout: str) -> torch.Tensor:
    """Channels-last pixels (B, H, W, C) in ``layout``: as they are ('image'), or cell-major (B, h, w, cell^2, C)."""
    return image_to_cells(x[:, None], cell)[:, 0] if layout == 'cells' else x


def _split_heads(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """(B, *grid, C) channels-last -> (B, M, *grid, C / M), a view."""
    return x.reshape(*x.shape[:-1], num_heads, x.shape[-1] // num_heads).movedim(-2, 1)


def _merge_heads(x: torch.Tensor) -> torch.Tensor:
    """(B, M, *grid, d) -> (B, *grid, M * d) (the ops return views of heads-last tensors: no copy)."""
    x = x.movedim(1, -2)
    return x.reshape(*x.shape[:-2], x.shape[-2] * x.shape[-1])


class HypercolumnNeck(nn.Module):
    """Backbone levels -> one ``dim``-channel map at stride ``pixel_stride``.

    Each level: 1x1 convolution (no bias) + LayerNorm over channels + GELU. A level finer than the
    target is first area-averaged down to it (``adaptive_avg_pool2d``: exact box averaging of every
    pixel, where bilinear sampling would skip pixels; and the convolution then runs at the target
    resolution), a coarser one is projected at its own resolution and then resized bilinearly
    (``align_corners=False``). The levels are summed. LayerNorm rather than BatchNorm: no dependence on
    the batch size (a few high-resolution crops per GPU) and no train/eval switch.
    """

    def __init__(self, in_channels: Sequence[int], reductions: Sequence[int], dim: int, pixel_stride: int,
                 device=None, dtype=None):
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        self.reductions = tuple(reductions)
        self.pixel_stride = pixel_stride
        self.proj = nn.ModuleList([nn.Conv2d(c, dim, 1, bias=False, **dd) for c in in_channels])
        self.norm = nn.ModuleList([LayerNorm2d(dim, eps=1e-6, **dd) for _ in in_channels])
        self.act = nn.GELU()

    def forward(self, features: List[torch.Tensor], size: Tuple[int, int]) -> torch.Tensor:
        """NCHW features -> (B, dim, *size) NCHW."""
        out = None
        for x, r, proj, norm in zip(features, self.reductions, self.proj, self.norm):
            finer = r < self.pixel_stride
            if finer and tuple(x.shape[-2:]) != tuple(size):
                x = F.adaptive_avg_pool2d(x, size)
            x = self.act(norm(proj(x)))
            if tuple(x.shape[-2:]) != tuple(size):
                x = F.interpolate(x, size=size, mode='bilinear', align_corners=False)
            out = x if out is None else out + x
        return out


class TokenizerLayer(nn.Module):
    """One dual-path local cross-attention layer of the superpixel tokenizer.

    Both paths read the layer's input state (they run side by side, not one after the other):

    - superpixel path: S += proj(attn(q = Wq(LN(S) + e_s), k = Wk(LN(P) + e_p), v = Wv(LN(P)))) over the
      pixels of the 3x3 cells around each superpixel, then S += MLP(LN(S));
    - pixel path: P += proj(attn(q = Wq(LN(P) + e_p), k = Wk(LN(S) + e_s), v = Wv(LN(S)))) over the 9
      superpixels around each pixel's cell, then P += MLP(LN(P)).

    e_s, e_p are the position embeddings (added to queries and keys, not values, as in DETR). Pixels
    are channels-last, image (B, H, W, C) or cell-major (B, h, w, cell^2, C) layout (``layout``); every
    projection is pointwise, so both work the same, and the ops read the layout as given.
    """

    def __init__(self, dim: int, num_heads: int, cell_size: int, mlp_ratio: float, drop_path: float,
                 attn_backend: str, device=None, dtype=None):
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        if dim % num_heads:
            raise ValueError(f'tokenizer_heads={num_heads} must divide neck_dim={dim}')
        self.num_heads = num_heads
        self.cell_size = cell_size
        self.attn_backend = attn_backend
        self.sp_norm = nn.LayerNorm(dim, eps=1e-6, **dd)
        self.px_norm = nn.LayerNorm(dim, eps=1e-6, **dd)
        # q|k from features + position (the superpixel path's query, the pixel path's key and the other
        # way round), v from the features alone.
        self.sp_qk = nn.Linear(dim, 2 * dim, **dd)
        self.sp_v = nn.Linear(dim, dim, **dd)
        self.px_qk = nn.Linear(dim, 2 * dim, **dd)
        self.px_v = nn.Linear(dim, dim, **dd)
        self.sp_proj = nn.Linear(dim, dim, **dd)
        self.px_proj = nn.Linear(dim, dim, **dd)
        hidden = int(dim * mlp_ratio)
        self.has_mlp = hidden > 0
        if self.has_mlp:  # tokenizer_mlp_ratio=0: attention only
            self.sp_mlp_norm = nn.LayerNorm(dim, eps=1e-6, **dd)
            self.sp_mlp = Mlp(dim, hidden, **dd)
            self.px_mlp_norm = nn.LayerNorm(dim, eps=1e-6, **dd)
            self.px_mlp = Mlp(dim, hidden, **dd)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, pixels: torch.Tensor, superpixels: torch.Tensor, pixel_pos: torch.Tensor,
                sp_pos: torch.Tensor, layout: str) -> Tuple[torch.Tensor, torch.Tensor]:
        M, cell = self.num_heads, self.cell_size
        p, s = self.px_norm(pixels), self.sp_norm(superpixels)
        q_s, k_s = self.sp_qk(s + sp_pos).chunk(2, dim=-1)
        q_p, k_p = self.px_qk(p + pixel_pos).chunk(2, dim=-1)
        v_s, v_p = self.sp_v(s), self.px_v(p)
        dt = q_p.dtype  # the ops take one dtype (under autocast the sums with parameters may promote)
        q_s, k_s, v_s, q_p, k_p, v_p = (_split_heads(t.to(dt), M) for t in (q_s, k_s, v_s, q_p, k_p, v_p))
        sp_out = superpixel_attention(q_s, k_p, v_p, cell, backend=self.attn_backend, pixel_layout=layout)
        px_out = pixel_attention(q_p, k_s, v_s, cell, backend=self.attn_backend, pixel_layout=layout)
        superpixels = superpixels + self.drop_path(self.sp_proj(_merge_heads(sp_out)))
        pixels = pixels + self.drop_path(self.px_proj(_merge_heads(px_out)))
        if self.has_mlp:
            superpixels = superpixels + self.drop_path(self.sp_mlp(self.sp_mlp_norm(superpixels)))
            pixels = pixels + self.drop_path(self.px_mlp(self.px_mlp_norm(pixels)))
        return pixels, superpixels


class SPTransformerParts(NamedTuple):
    """What the superpixel decoder computes before it unfolds to the input resolution
    (:meth:`SPTransformer.forward_parts`)."""
    pixels: torch.Tensor  # (B, H/s, W/s, C) the tokenizer's output pixel features, image layout
    superpixels: torch.Tensor  # (B, h, w, C) the tokenizer's output superpixels
    association_logits: torch.Tensor  # (B, H/s, W/s, 9) pixel -> neighbour logits, -inf outside the image (>= fp32)
    superpixel_logits: torch.Tensor  # (B, h*w, num_classes), raster order on the grid
    grid: Tuple[int, int]  # (h, w)


def unfold_superpixel_logits(association: torch.Tensor, superpixel_logits: torch.Tensor,
                             grid: Tuple[int, int]) -> torch.Tensor:
    """Y_p = sum over the 9 neighbouring superpixels i of pixel p's cell of Q_pi C_i.

    Args:
        association: (B, H, W, 9) Q, neighbour k the cell at ``NEIGHBOR_OFFSETS[k]`` from the pixel's own cell
            (cells of H/h x W/w pixels); neighbours outside the grid must have Q = 0.
        superpixel_logits: (B, h*w, K) C, raster order on the h x w grid.
        grid: (h, w).

    Returns:
        (B, K, H, W). One batched matmul per cell, (cell pixels x 9) @ (9 x K): nothing of size
        (B, H, W, 9, K) is built, and autograd keeps only Q (one copy, cell-major) and the (B, h, w, 9, K)
        neighbour logits.
    """
    B, H, W, n = association.shape
    h, w = grid
    K = superpixel_logits.shape[-1]
    if n != 9 or H % h or W % w or H // h != W // w or tuple(superpixel_logits.shape[:2]) != (B, h * w):
        raise ValueError(
            f'unfold_superpixel_logits: association (B, H, W, 9) = {tuple(association.shape)} and superpixel_logits '
            f'(B, h*w, K) = {tuple(superpixel_logits.shape)} do not fit a {h}x{w} grid of square cells')
    T = H // h
    padded = F.pad(superpixel_logits.reshape(B, h, w, K), (0, 0, 1, 1, 1, 1))  # (B, h+2, w+2, K), zeros outside
    neighbours = torch.stack(
        [padded[:, 1 + dy:1 + dy + h, 1 + dx:1 + dx + w] for dy, dx in NEIGHBOR_OFFSETS], dim=3)  # (B, h, w, 9, K)
    q = association.reshape(B, h, T, w, T, 9).permute(0, 1, 3, 2, 4, 5).reshape(B * h * w, T * T, 9)
    y = torch.bmm(q, neighbours.to(q.dtype).reshape(B * h * w, 9, K))  # (B*h*w, T*T, K)
    return y.reshape(B, h, w, T, T, K).permute(0, 5, 1, 3, 2, 4).reshape(B, K, H, W)


# --- the model -------------------------------------------------------------------------------------

class SPTransformer(nn.Module):
    """SP-Transformer: backbone -> hypercolumn neck -> superpixel tokenizer -> ViT blocks over superpixels ->
    per-superpixel classes, unfolded to pixels through the soft association (see the module docstring).

    Design choices the paper leaves open (and the defaults here):

    - Neck: 1x1 conv (no bias) + LayerNorm + GELU per level, finer levels area-averaged to the pixel
      stride before it, coarser ones bilinearly upsampled after it, summed (:class:`HypercolumnNeck`).
    - Superpixel state: initialised from learned queries ``sp_queries`` (one per cell of the reference
      grid, ``img_size // token_stride``), resized bilinearly (antialiased, timm's
      ``resample_abs_pos_embed``) for other grids.
    - Position embeddings, added to queries and keys of every tokenizer layer, to the association's two
      sides, and once to the tokens before the ViT blocks: superpixels get a learned absolute embedding
      at the reference grid (resized like the queries) plus a learned 3x3-periodic one (indexed by
      (row % 3, col % 3)); pixels get a learned embedding periodic over 3x3 cells (3c x 3c feature pixels).
      Together the two periodic tables can express any function of a pixel's offset to each of its 9
      candidate superpixels at every input size (the absolute table alone would only at the reference
      grid: resizing blurs any period-3 pattern), for 9 + 9c^2 vectors of parameters. Pixels get no
      absolute embedding: a per-pixel table at 1024x2048 would cost 8M parameters, and CNN features
      carry position already.
    - Tokenizer layers: pre-norm (LayerNorm eps 1e-6), ``tokenizer_heads`` heads, both paths from the
      previous state, an MLP of ratio ``tokenizer_mlp_ratio`` on each path, stochastic depth shared with the
      blocks (:class:`TokenizerLayer`). The paper does not give the MLPs' width; its sizes bound it. With
      everything else counted, the ResNet-50 Cityscapes model at 1024x2048 has 31.7M parameters and 250 GMACs
      with MLPs of ratio 4 on both paths (the paper: 29M, 253G: +9 % parameters), 29.6M / 213 GMACs without
      MLPs (-16 % MACs), and 30.1M / 222 GMACs at ratio 1, the default (``torch.utils.flop_counter``, FLOPs / 2).
      Ratios from about 0.2 to 1.6 keep both within 5 % / 15 % of the paper's; 1 is the plain one among them.
      ConvNeXt-L at ratio 1: 202.7M / 1488 GMACs against the paper's 202M / 1557G. The ADE20K ResNet-50 model
      (640x640) agrees: 30.0M / 69 GMACs against 29M / 78G at ratio 1, where ratio 4 is 16 % over the MACs
      and no MLP 20 % under.
      ``bench/sp_transformer_figures.py`` prints all three ratios.
    - Association: single head, q = Linear(LN(P) + e_p), k = Linear(LN(S) + e_s) of the tokenizer's outputs,
      logits scaled by neck_dim^-0.5; computed in (at least) float32 from there on.
    - Blocks: timm ViT ``Block`` (qkv bias, GELU MLP, no LayerScale), ``block_heads`` = 4 as in the paper (head
      dim 64 at 256 channels), stochastic depth rising linearly over tokenizer layers and blocks to ``drop_path_rate``.
    - Hard superpixels: argmax of the upsampled association logits, the own cell's raised by
      ``spformer.kernels.OWN_CELL_MARGIN`` (near-ties go to the own cell), as SPFormer draws them.

    Inputs: any (B, in_chans, H, W) float batch with H and W multiples of the token stride, for both decoders
    (so that they are compared on the same inputs).

    Backbones: any timm model with feature levels at strides 2 or 4, 8 and 32 (``backbone_levels``):
    ResNets, ConvNeXts, ..., and the /16 SPFormers through their feature pyramid (strides 4, 8, 16, 32: the
    pixel stream, the superpixel tokens and two levels made from them; pass ``backbone_kwargs=
    dict(dynamic_img_size=True)`` or the ``img_size`` for inputs other than 224x224). The /32 and /56
    SPFormers have no level finer than stride 8 and are refused.
    """

    def __init__(
            self,
            backbone: str = 'resnet50',
            num_classes: int = 19,
            img_size: Union[int, Tuple[int, int]] = (1024, 2048),
            in_chans: int = 3,
            backbone_pretrained: Union[bool, str, os.PathLike] = False,
            backbone_kwargs: Optional[Dict[str, Any]] = None,
            decoder: str = 'superpixel',
            pixel_stride: int = 8,
            neck_dim: int = 256,
            cell_size: int = 4,
            tokenizer_layers: int = 2,
            tokenizer_heads: int = 2,
            num_blocks: int = 4,
            block_heads: int = 4,
            mlp_ratio: float = 4.,
            tokenizer_mlp_ratio: float = 1.,
            drop_rate: float = 0.,
            drop_path_rate: float = 0.,
            attn_backend: str = 'auto',
            device=None,
            dtype=None,
    ):
        """
        Args:
            backbone: A timm model name (``resnet50``, ``convnext_large``, ... optionally with a pretrained tag).
            num_classes: Semantic classes (>= 1).
            img_size: The reference input size: the learned superpixel queries and absolute position
                embeddings are stored for its grid (``img_size // token_stride``) and resized for others.
                Any input whose sides are multiples of the token stride is accepted.
            in_chans: Input channels (the backbone's).
            backbone_pretrained: False (random init), True (timm's published weights for ``backbone``,
                downloaded by timm), a local ``.safetensors`` file, or an ``'hf-hub:org/name'`` repo id;
                pickle-based files (.pth, .pt, .bin, .ckpt, .pkl) are refused.
            backbone_kwargs: Extra timm.create_model kwargs for the backbone (e.g. ``drop_path_rate``).
            decoder: ``'superpixel'`` (the paper) or ``'bilinear'`` (the baseline: the same backbone and neck,
                a 1x1-conv classifier on the pixel features, bilinear upsampling to the input size).
            pixel_stride: Stride s of the pixel features (8 for the Cityscapes configs, 4 for ADE20K).
            neck_dim: Channels of the pixel features, superpixels and blocks.
            cell_size: Pixel features per superpixel cell side; token stride = pixel_stride * cell_size.
            tokenizer_layers: Dual-path local cross-attention layers.
            tokenizer_heads: Their heads.
            num_blocks: ViT blocks over the superpixels.
            block_heads: Their heads.
            mlp_ratio: MLP hidden ratio of the blocks (> 0).
            tokenizer_mlp_ratio: MLP hidden ratio of the tokenizer's two paths (0: no MLP, attention only). The
                default 1 fits the paper's parameter and MAC counts (see above); 4 is the blocks' ratio.
            drop_rate: Dropout on the classifier's input.
            drop_path_rate: Stochastic depth of the last tokenizer layer / block (linear from 0).
            attn_backend: Backend of the local attention ops, one of ``spformer.kernels.BACKENDS``;
                checked here, at construction.
        """
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f'num_classes must be an int >= 1, got {num_classes!r}')
        if decoder not in DECODERS:
            raise ValueError(f'decoder must be one of {DECODERS}, got {decoder!r}')
        check_backend('attn_backend', attn_backend)
        for arg, value, low in (('pixel_stride', pixel_stride, 1), ('neck_dim', neck_dim, 1), ('cell_size', cell_size, 1),
                                ('tokenizer_layers', tokenizer_layers, 0), ('tokenizer_heads', tokenizer_heads, 1),
                                ('num_blocks', num_blocks, 0), ('block_heads', block_heads, 1), ('in_chans', in_chans, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f'{arg} must be an int >= {low}, got {value!r}')
        for arg, value, positive in (('mlp_ratio', mlp_ratio, True), ('tokenizer_mlp_ratio', tokenizer_mlp_ratio, False)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0 or (positive and value == 0):
                raise ValueError(f'{arg} must be a number {">" if positive else ">="} 0, got {value!r}')
        if neck_dim % block_heads:
            raise ValueError(f'block_heads={block_heads} must divide neck_dim={neck_dim}')
        img_size = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
        token_stride = pixel_stride * cell_size
        if len(img_size) != 2 or any(s < token_stride or s % token_stride for s in img_size):
            raise ValueError(f'img_size={img_size} must be positive multiples of the token stride {token_stride} '
                             f'(pixel_stride={pixel_stride} x cell_size={cell_size})')
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.img_size = img_size
        self.decoder = decoder
        self.pixel_stride = pixel_stride
        self.cell_size = cell_size
        self.token_stride = token_stride
        self.grid_size = (img_size[0] // token_stride, img_size[1] // token_stride)
        self.neck_dim = self.embed_dim = self.num_features = neck_dim
        self.attn_backend = attn_backend
        self.grad_checkpointing = False

        # Backbone: the levels of strides 2 (or 4), 8 and 32, from timm's feature_info.
        _check_backbone_name(backbone)
        weights = _backbone_weights(backbone_pretrained)
        backbone_kwargs = dict(backbone_kwargs or {})
        reductions, keep_levels = _backbone_features(backbone, in_chans=in_chans, **backbone_kwargs)
        out_indices = backbone_levels(backbone, reductions)
        self.backbone_name = backbone
        self.backbone = timm.create_model(backbone, features_only=True, out_indices=out_indices, in_chans=in_chans,
                                          **weights, **{k: v for k, v in dd.items() if v is not None},
                                          **dict(keep_levels, **backbone_kwargs))
        reductions = list(self.backbone.feature_info.reduction())
        self.neck = HypercolumnNeck(self.backbone.feature_info.channels(), reductions, neck_dim, pixel_stride, **dd)

        C = neck_dim
        if decoder == 'bilinear':
            self.head_drop = nn.Dropout(drop_rate)
            self.head = nn.Linear(C, num_classes, **dd)  # a 1x1 conv on channels-last pixel features
        else:
            h0, w0 = self.grid_size
            self.sp_queries = nn.Parameter(torch.zeros(1, h0, w0, C, **dd))
            self.sp_pos_embed = nn.Parameter(torch.zeros(1, h0, w0, C, **dd))
            self.sp_pos_periodic = nn.Parameter(torch.zeros(3, 3, C, **dd))
            self.pixel_pos_periodic = nn.Parameter(torch.zeros(3 * cell_size, 3 * cell_size, C, **dd))
            n = tokenizer_layers + num_blocks
            dpr = [drop_path_rate * i / (n - 1) if n > 1 else 0. for i in range(n)]
            self.tokenizer = nn.ModuleList([
                TokenizerLayer(C, tokenizer_heads, cell_size, tokenizer_mlp_ratio, dpr[i], attn_backend, **dd)
                for i in range(tokenizer_layers)])
            self.assoc_px_norm = nn.LayerNorm(C, eps=1e-6, **dd)
            self.assoc_sp_norm = nn.LayerNorm(C, eps=1e-6, **dd)
            self.assoc_px_proj = nn.Linear(C, C, **dd)
            self.assoc_sp_proj = nn.Linear(C, C, **dd)
            self.blocks = nn.Sequential(*[
                Block(C, block_heads, mlp_ratio=mlp_ratio, qkv_bias=True, drop_path=dpr[tokenizer_layers + i],
                      norm_layer=nn.LayerNorm, **dd)
                for i in range(num_blocks)])
            self.norm = nn.LayerNorm(C, eps=1e-6, **dd)
            self.head_drop = nn.Dropout(drop_rate)
            self.head = nn.Linear(C, num_classes, **dd)
            for p in (self.sp_queries, self.sp_pos_embed, self.sp_pos_periodic, self.pixel_pos_periodic):
                trunc_normal_(p, std=.02)
        # Only the decoder's layers: the backbone keeps its own init (or its pretrained weights). timm's ViT init
        # (Linear: truncated normal 0.02, zero bias); the other layers keep PyTorch's (needs_reset=False).
        for name, module in self.named_children():
            if name != 'backbone':
                module.apply(partial(init_weights_vit_timm, needs_reset=False))

    # --- timm / training interface -----------------------------------------------------------------

    @torch.jit.ignore
    def no_weight_decay(self) -> Set[str]:
        # 1-D parameters (norms, biases) are excluded by timm's optimizer factory.
        return {n for n in ('sp_queries', 'sp_pos_embed', 'sp_pos_periodic', 'pixel_pos_periodic') if hasattr(self, n)}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        """Parameter groups from input to output, for layer decay: the backbone, the neck and the superpixel
        tables, each tokenizer layer, each block, then the output side (norm, classifier, association: all three
        read the last features). Coarse: the tokenizer layers as one group, the blocks as one. Each key is its
        own ordinal (timm sorts by key order, then by layer index), so no block lands between two tokenizer
        layers. The bilinear decoder: backbone, neck, classifier."""
        index = '' if coarse else r'(\d+)'
        return dict(
            stem=r'^backbone\.',
            neck=r'^(?:neck\.|sp_|pixel_pos)',
            tokenizer=rf'^tokenizer\.{index}',
            blocks=rf'^blocks\.{index}',
            head=r'^(?:norm|head|assoc_)',
        )

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True):
        """Recompute the tokenizer layers and blocks (and the backbone's stages, where timm can) in the backward."""
        self.grad_checkpointing = enable
        if hasattr(self.backbone, 'set_grad_checkpointing'):
            self.backbone.set_grad_checkpointing(enable)

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def _run(self, module: nn.Module, *args):
        if self.grad_checkpointing and self.training and not torch.jit.is_scripting():
            return checkpoint(module, *args)
        return module(*args)

    # --- forward -----------------------------------------------------------------------------------

    def _check_input(self, x: torch.Tensor):
        check_image_input(
            x, self.in_chans, self.token_stride, self.img_size, True,
            f'the superpixel token stride (pixel_stride={self.pixel_stride} x cell_size={self.cell_size}) =',
            self.neck.proj[0].weight.dtype)

    def forward_pixels(self, x: torch.Tensor) -> torch.Tensor:
        """The neck's pixel features: (B, neck_dim, H/s, W/s) NCHW."""
        self._check_input(x)
        H, W = x.shape[-2:]
        return self.neck(self.backbone(x), (H // self.pixel_stride, W // self.pixel_stride))

    def _resized(self, table: torch.Tensor, grid: Tuple[int, int]) -> torch.Tensor:
        """A (1, h0, w0, C) table at the reference grid -> (1, h, w, C) at ``grid``."""
        if tuple(grid) == tuple(self.grid_size):
            return table
        C = table.shape[-1]
        out = resample_abs_pos_embed(table.reshape(1, -1, C), new_size=list(grid), old_size=list(self.grid_size),
                                     num_prefix_tokens=0, interpolation='bilinear', antialias=True)
        return out.reshape(1, grid[0], grid[1], C)

    def forward_parts(self, x: torch.Tensor) -> SPTransformerParts:
        """The superpixel decoder up to the unfolding: tokenizer outputs, coarse association logits (at the
        pixel-feature resolution) and per-superpixel class logits (:class:`SPTransformerParts`)."""
        if self.decoder != 'superpixel':
            raise ValueError(f"forward_parts: this model has decoder={self.decoder!r}: no superpixels "
                             f"(decoder='superpixel' has them)")
        features = self.forward_pixels(x)  # (B, C, H/s, W/s)
        B, C, Hs, Ws = features.shape
        cell = self.cell_size
        h, w = Hs // cell, Ws // cell
        layout = 'cells' if torch.compiler.is_compiling() else native_pixel_layout(self.attn_backend, x.device)
        pixels = _to_layout(features.permute(0, 2, 3, 1), cell, layout)
        pixel_pos = _to_layout(_periodic(self.pixel_pos_periodic, Hs, Ws)[None], cell, layout)[0]
        sp_pos = (self._resized(self.sp_pos_embed, (h, w)) + _periodic(self.sp_pos_periodic, h, w)[None])[0]
        # repeat, not expand: a view of the parameter handed to a module as its input trips module hooks
        # under inference_mode (FlopCounterMode's), and the copy is small (B x h x w x C)
        superpixels = self._resized(self.sp_queries, (h, w)).repeat(B, 1, 1, 1).to(pixels.dtype)
        for layer in self.tokenizer:
            pixels, superpixels = self._run(layer, pixels, superpixels, pixel_pos, sp_pos, layout)

        # Association: one head over the tokenizer's outputs.
        q = self.assoc_px_proj(self.assoc_px_norm(pixels) + pixel_pos)
        k = self.assoc_sp_proj(self.assoc_sp_norm(superpixels) + sp_pos)
        # in (at least) fp32, autocast off (its matmuls would round the logits to bf16, ~1e-2 of their size)
        dt = torch.promote_types(q.dtype, torch.float32)
        with autocast_disabled(q.device.type):
            logits = superpixel_association(q[:, None].to(dt), k[:, None].to(dt), cell, backend=self.attn_backend,
                                            pixel_layout=layout, logits=True)
        logits = (cells_to_image(logits, cell) if layout == 'cells' else logits)[:, 0]

        tokens = (superpixels + sp_pos).reshape(B, h * w, C)
        for block in self.blocks:
            tokens = self._run(block, tokens)
        class_logits = self.head(self.head_drop(self.norm(tokens)))
        pixels = cells_to_image(pixels[:, None], cell)[:, 0] if layout == 'cells' else pixels
        return SPTransformerParts(pixels, superpixels, logits, class_logits, (h, w))

    def _association(self, parts: SPTransformerParts) -> Tuple[torch.Tensor, torch.Tensor]:
        """(upsampled logits, probabilities), both (B, H, W, 9) at input resolution."""
        logits = upsample_association(parts.association_logits, self.cell_size, self.pixel_stride)
        return logits, logits.softmax(dim=-1)

    def _unfold(self, parts: SPTransformerParts, association: torch.Tensor) -> torch.Tensor:
        dt = association.dtype
        with autocast_disabled(association.device.type):  # Q and the sum in (at least) fp32
            return unfold_superpixel_logits(association, parts.superpixel_logits.to(dt), parts.grid)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, in_chans, H, W) -> (B, num_classes, H, W) logits (float32 or wider with the superpixel decoder)."""
        if self.decoder == 'bilinear':
            features = self.forward_pixels(x)
            logits = self.head(self.head_drop(features.permute(0, 2, 3, 1))).permute(0, 3, 1, 2)
            return F.interpolate(logits, size=x.shape[-2:], mode='bilinear', align_corners=False)
        parts = self.forward_parts(x)
        _, association = self._association(parts)
        return self._unfold(parts, association)

    @torch.jit.ignore
    def forward_superpixels(self, x: torch.Tensor) -> Dict[str, Any]:
        """Everything the superpixel decoder predicts, at input resolution:

        - ``logits``: (B, num_classes, H, W), what :meth:`forward` returns;
        - ``labels``: (B, H, W) int64 hard superpixel ids (raster index on the h x w grid): the argmax of the
          upsampled association logits, the own cell's raised by ``spformer.kernels.OWN_CELL_MARGIN``;
        - ``association``: (B, H, W, 9) probabilities over the 9 superpixels around each pixel's cell
          (neighbour k at ``NEIGHBOR_OFFSETS[k]``; exactly 0 outside the image);
        - ``superpixel_logits``: (B, h*w, num_classes);
        - ``grid``: (h, w).
        """
        parts = self.forward_parts(x)
        logits, association = self._association(parts)
        return dict(
            logits=self._unfold(parts, association),
            labels=superpixel_labels(logits, self.token_stride, OWN_CELL_MARGIN),
            association=association,
            superpixel_logits=parts.superpixel_logits,
            grid=parts.grid,
        )


register_notrace_module(TokenizerLayer)


# --- loss --------------------------------------------------------------------------------------------

def _check_labels(name: str, labels: torch.Tensor, num_classes: int, ignore_index: Optional[int]):
    """Integer labels in [0, num_classes) or ``ignore_index``, else a ValueError naming ``name`` and the bad
    values (one host sync)."""
    valid = labels != ignore_index if ignore_index is not None else torch.ones_like(labels, dtype=torch.bool)
    bad = valid & ((labels < 0) | (labels >= num_classes))
    if bool(bad.any()):
        values = torch.unique(labels[bad]).tolist()
        shown = ', '.join(str(v) for v in values[:10]) + (', ...' if len(values) > 10 else '')
        raise ValueError(
            f'{name} holds values outside [0, {num_classes}) for {num_classes} classes: {shown} '
            f'(ignore_index={ignore_index} marks pixels to leave out)')
    return valid


def topk_cross_entropy(logits: torch.Tensor, target: torch.Tensor, top_k_percent: float = 0.2,
                       ignore_index: Optional[int] = 255) -> torch.Tensor:
    """Softmax cross-entropy over the hardest ``top_k_percent`` of the pixels of each image (hard pixel mining,
    deeplab2's ``top_k_percent_pixels``), averaged over the images.

    The rule, per image of N = H * W pixels (deeplab2's ``compute_average_top_k_loss``): k = round(top_k_percent
    * N) (Python/TF round half to even; at least 1) counted over *all* pixels, ignored ones included; the loss
    is the mean of the k largest per-pixel losses among the valid pixels (all of them when there are fewer than
    k); an image without valid pixels contributes 0. The batch loss is the mean over images. It differs from
    deeplab2 only where a valid pixel's loss is exactly 0: deeplab2 divides by the number of non-zero losses
    among the top k, this counts every valid pixel taken.

    Args:
        logits: (B, K, H, W) floating point.
        target: (B, H, W) integer class ids in [0, K), or ``ignore_index``.
        top_k_percent: Fraction of the pixels in (0, 1]; 1.0 gives the mean over each image's valid pixels.
        ignore_index: The label of pixels to leave out (None: none).

    Returns:
        A scalar (the dtype of the per-pixel losses: float32 under autocast).
    """
    fn = 'topk_cross_entropy'
    if not isinstance(logits, torch.Tensor) or logits.dim() != 4 or not logits.is_floating_point():
        got = f'{tuple(logits.shape)} {logits.dtype}' if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise ValueError(f'{fn}: logits must be a floating point (B, K, H, W) tensor, got {got}')
    if not isinstance(target, torch.Tensor) or target.dim() != 3 or target.is_floating_point() or \
            target.dtype == torch.bool or tuple(target.shape) != (logits.shape[0], *logits.shape[2:]):
        got = f'{tuple(target.shape)} {target.dtype}' if isinstance(target, torch.Tensor) else type(target).__name__
        raise ValueError(f'{fn}: target must be an integer (B, H, W) = {(logits.shape[0], *logits.shape[2:])} '
                         f'tensor of class ids, got {got}')
    if isinstance(top_k_percent, bool) or not isinstance(top_k_percent, (int, float)) or not 0 < top_k_percent <= 1:
        raise ValueError(f'{fn}: top_k_percent must be a fraction in (0, 1], got {top_k_percent!r}')
    valid = _check_labels('target', target, logits.shape[1], ignore_index)
    loss = F.cross_entropy(logits, torch.where(valid, target, torch.zeros_like(target)).long(), reduction='none')
    loss = loss.masked_fill(~valid, -1.0).flatten(1)  # ignored pixels sort below every valid one (CE >= 0)
    N = loss.shape[1]
    k = min(N, max(1, round(top_k_percent * N)))
    top = loss.topk(k, dim=1, sorted=False).values if k < N else loss
    taken = top >= 0
    per_image = torch.where(taken, top, torch.zeros_like(top)).sum(1) / taken.sum(1).clamp(min=1)
    return per_image.mean()


# --- checkpoints, configs, registration ------------------------------------------------------------

def checkpoint_filter_fn(state_dict: Dict[str, torch.Tensor], model: SPTransformer) -> Dict[str, torch.Tensor]:
    """Unwrap training checkpoints, strip DDP / torch.compile prefixes, and resize the superpixel queries and
    absolute position embeddings to the model's reference grid."""
    for key in ('state_dict_ema', 'model_ema', 'state_dict', 'model'):
        if key in state_dict and isinstance(state_dict[key], dict):
            state_dict = state_dict[key]
            break
    out = {unwrapped_key(k): v for k, v in state_dict.items()}
    for key in ('sp_queries', 'sp_pos_embed'):
        v = out.get(key)
        if v is not None and v.dim() == 4 and tuple(v.shape[1:3]) != tuple(model.grid_size):
            out[key] = resample_abs_pos_embed(
                v.reshape(1, -1, v.shape[-1]), new_size=list(model.grid_size), old_size=list(v.shape[1:3]),
                num_prefix_tokens=0, interpolation='bilinear', antialias=True).reshape(1, *model.grid_size, -1)
    return out


_CITYSCAPES = dict(num_classes=19, img_size=(1024, 2048), pixel_stride=8)
_ADE20K = dict(num_classes=150, img_size=(640, 640), pixel_stride=4)

# Named configurations: SPTransformer kwargs. The Cityscapes ones have a 32x64 grid at 1024x2048 (token stride
# 8 * 4 = 32), the ADE20K ones 40x40 at 640x640 (4 * 4 = 16).
SEGMENTATION_CONFIGS: Dict[str, Dict[str, Any]] = {
    'sp_transformer_r50_cityscapes': dict(backbone='resnet50', **_CITYSCAPES),
    'sp_transformer_convnext_large_cityscapes': dict(backbone='convnext_large', **_CITYSCAPES),
    'sp_transformer_r50_ade20k': dict(backbone='resnet50', **_ADE20K),
    'sp_transformer_convnext_large_ade20k': dict(backbone='convnext_large', **_ADE20K),
    # small backbones, for CPU runs and tests
    'sp_transformer_r18_cityscapes': dict(backbone='resnet18', **_CITYSCAPES),
    'sp_transformer_convnext_atto_cityscapes': dict(backbone='convnext_atto', **_CITYSCAPES),
}


def list_segmentation_models() -> List[str]:
    """The names of :data:`SEGMENTATION_CONFIGS` (each also a timm model name)."""
    return sorted(SEGMENTATION_CONFIGS)


def create_segmentation_model(name: str, pretrained: bool = False, **kwargs) -> SPTransformer:
    """``timm.create_model(name, pretrained=pretrained, **kwargs)`` for a name of :data:`SEGMENTATION_CONFIGS`;
    kwargs override the config (e.g. ``num_classes``, ``backbone_pretrained=True``, ``decoder='bilinear'``)."""
    if name not in SEGMENTATION_CONFIGS:
        raise ValueError(f'name must be one of {list_segmentation_models()}, got {name!r}')
    return timm.create_model(name, pretrained=pretrained, **kwargs)


def _create(variant: str, pretrained: bool = False, **kwargs) -> SPTransformer:
    # num_classes comes from the pretrained cfg (the config's, or a weights file's head size) unless given
    # (a local weights file's own num_classes, img_size and config.json arguments override the config's)
    config = {k: v for k, v in SEGMENTATION_CONFIGS[variant].items() if k != 'num_classes'}
    return build_model_with_weights(SPTransformer, variant, pretrained, pretrained_filter_fn=checkpoint_filter_fn,
                                    feature_cfg=dict(), defaults=config, **kwargs)


def _cfg(backbone: str, num_classes: int, img_size: Tuple[int, int], **kwargs) -> Dict[str, Any]:
    ref = timm.models.get_pretrained_cfg(backbone)
    first_conv = getattr(ref, 'first_conv', None)
    return {
        'url': '',
        'num_classes': num_classes,
        'input_size': (3, *img_size),
        'pool_size': None,
        'crop_pct': 1.0,
        'interpolation': 'bilinear',
        'fixed_input_size': False,
        'mean': tuple(getattr(ref, 'mean', None) or IMAGENET_DEFAULT_MEAN),
        'std': tuple(getattr(ref, 'std', None) or IMAGENET_DEFAULT_STD),
        # the backbone's first conv inside the features_only wrapper (top-level Sequentials are flattened)
        'first_conv': f"backbone.{first_conv.replace('.', '_', 1)}" if first_conv else None,
        'classifier': 'head',
        'license': 'apache-2.0',
    }


default_cfgs = generate_default_cfgs({
    name: _cfg(cfg['backbone'], cfg['num_classes'], cfg['img_size']) for name, cfg in SEGMENTATION_CONFIGS.items()})


@register_model
def sp_transformer_r50_cityscapes(pretrained: bool = False, **kwargs) -> SPTransformer:
    """SP-Transformer, ResNet-50, Cityscapes: pixel stride 8, 32x64 superpixels at 1024x2048, 19 classes."""
    return _create('sp_transformer_r50_cityscapes', pretrained, **kwargs)


@register_model
def sp_transformer_convnext_large_cityscapes(pretrained: bool = False, **kwargs) -> SPTransformer:
    """SP-Transformer, ConvNeXt-L, Cityscapes: pixel stride 8, 32x64 superpixels at 1024x2048, 19 classes."""
    return _create('sp_transformer_convnext_large_cityscapes', pretrained, **kwargs)


@register_model
def sp_transformer_r50_ade20k(pretrained: bool = False, **kwargs) -> SPTransformer:
    """SP-Transformer, ResNet-50, ADE20K: pixel stride 4, 40x40 superpixels at 640x640, 150 classes."""
    return _create('sp_transformer_r50_ade20k', pretrained, **kwargs)


@register_model
def sp_transformer_convnext_large_ade20k(pretrained: bool = False, **kwargs) -> SPTransformer:
    """SP-Transformer, ConvNeXt-L, ADE20K: pixel stride 4, 40x40 superpixels at 640x640, 150 classes."""
    return _create('sp_transformer_convnext_large_ade20k', pretrained, **kwargs)


@register_model
def sp_transformer_r18_cityscapes(pretrained: bool = False, **kwargs) -> SPTransformer:
    """SP-Transformer, ResNet-18 (small, for CPU): the Cityscapes layout of sp_transformer_r50_cityscapes."""
    return _create('sp_transformer_r18_cityscapes', pretrained, **kwargs)


@register_model
def sp_transformer_convnext_atto_cityscapes(pretrained: bool = False, **kwargs) -> SPTransformer:
    """SP-Transformer, ConvNeXt-Atto (small, for CPU): the Cityscapes layout of sp_transformer_r50_cityscapes."""
    return _create('sp_transformer_convnext_atto_cityscapes', pretrained, **kwargs)
