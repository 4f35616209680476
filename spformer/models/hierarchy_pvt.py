""" PVTv2-b0 with hierarchy attention as its token mixer

timm's ``PyramidVisionTransformerV2`` (PVTv2, arXiv 2106.13797), reused as it is, with every block's
spatial-reduction attention replaced by a :class:`spformer.layers.HierarchyAttention` of the same dim
and heads (pool to centres -> self-attention over them -> pixel -> centre cross-attention,
docs/hierarchy_attention.md). Everything else (overlapping patch embeddings, depth-wise conv MLPs,
stages, head, ``forward_intermediates``, ``features_only``, grad checkpointing) is timm's.

Registered with timm (``import spformer``): ``hierarchy_pvt_v2_b0_window`` (one centre per window: the
degenerate case, kept for comparison), ``hierarchy_pvt_v2_b0_local`` (each token attends the 3x3
centres around its cell) and ``hierarchy_pvt_v2_b0_global`` (each token attends all centres).
Untrained: no published weights.

Model kwargs besides PVTv2's: ``pool_sizes`` (per stage, an int S or (S_h, S_w); default 7 = the 7x7
= 49 centres that PVTv2-b0's SRA keeps as keys at 224 px in every stage), ``windows`` ('window' mode:
windows per side, default one per centre) and ``attn_backend`` ('local' mode: the backend of
:func:`spformer.kernels.pixel_attention`). The 'local' models need each stage's grid to be a whole
number of equal square cells over its centres: at the default pool size 7, inputs of 224 * k px.
"""
from typing import Optional, Sequence, Union

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.pvt_v2 import PyramidVisionTransformerV2

from spformer.layers.hierarchy_attention import MODES, HierarchyAttention

__all__ = ['HierarchyPyramidVisionTransformerV2']


def _per_stage(name: str, value, num_stages: int) -> list:
    """An int, a (rows, columns) pair or None for every stage, or a sequence of one per stage."""
    if value is None or isinstance(value, int) or (isinstance(value, tuple) and len(value) == 2
                                                     and num_stages != 2 and all(isinstance(v, int) for v in value)):
        return [value] * num_stages
    if not isinstance(value, (list, tuple)) or len(value) != num_stages:
        raise ValueError(f'{name} must be one value for all stages or a sequence of {num_stages} (one per stage), '
                         f'got {value!r}')
    return list(value)


class HierarchyPyramidVisionTransformerV2(PyramidVisionTransformerV2):
    """timm's PVTv2 with each block's ``attn`` a :class:`HierarchyAttention` of the same dim and heads
    (its q / kv biases and dropouts too); kwargs other than these three are PVTv2's."""

    def __init__(
            self,
            hierarchy_mode: str = 'local',
            pool_sizes: Union[int, Sequence] = 7,
            windows: Optional[Union[int, Sequence]] = None,
            attn_backend: str = 'auto',
            **kwargs,
    ):
        if hierarchy_mode not in MODES:
            raise ValueError(f'hierarchy_mode must be one of {MODES}, got {hierarchy_mode!r}')
        super().__init__(**kwargs)
        pools = _per_stage('pool_sizes', pool_sizes, len(self.stages))
        wins = _per_stage('windows', windows, len(self.stages))
        for stage, pool, win in zip(self.stages, pools, wins):
            for block in stage.blocks:
                old = block.attn
                block.attn = HierarchyAttention(
                    old.dim, old.num_heads, mode=hierarchy_mode, pool_size=pool, windows=win,
                    qkv_bias=old.q.bias is not None, attn_drop=old.attn_drop.p, proj_drop=old.proj_drop.p,
                    backend=attn_backend, device=old.q.weight.device, dtype=old.q.weight.dtype)
                block.attn.apply(self._init_weights)
        self.hierarchy_mode = hierarchy_mode


def _create(variant: str, pretrained: bool = False, **kwargs):
    out_indices = kwargs.pop('out_indices', (0, 1, 2, 3))
    return build_model_with_cfg(
        HierarchyPyramidVisionTransformerV2, variant, pretrained,
        feature_cfg=dict(flatten_sequential=True, out_indices=out_indices), **kwargs)


def _cfg(**kwargs):
    return {
        'url': '', 'num_classes': 1000, 'input_size': (3, 224, 224), 'pool_size': (7, 7), 'crop_pct': 0.9,
        'interpolation': 'bicubic', 'mean': IMAGENET_DEFAULT_MEAN, 'std': IMAGENET_DEFAULT_STD,
        'first_conv': 'patch_embed.proj', 'classifier': 'head', 'fixed_input_size': False, 'license': 'apache-2.0',
        **kwargs,
    }


default_cfgs = generate_default_cfgs({f'hierarchy_pvt_v2_b0_{mode}': _cfg() for mode in MODES})
_B0 = dict(depths=(2, 2, 2, 2), embed_dims=(32, 64, 160, 256), num_heads=(1, 2, 5, 8))


@register_model
def hierarchy_pvt_v2_b0_window(pretrained=False, **kwargs) -> HierarchyPyramidVisionTransformerV2:
    """PVTv2-b0, hierarchy attention with one centre per window (the degenerate softmax over one key)."""
    return _create('hierarchy_pvt_v2_b0_window', pretrained, **dict(_B0, hierarchy_mode='window', **kwargs))


@register_model
def hierarchy_pvt_v2_b0_local(pretrained=False, **kwargs) -> HierarchyPyramidVisionTransformerV2:
    """PVTv2-b0, hierarchy attention where each token attends the 3x3 centres around its cell."""
    return _create('hierarchy_pvt_v2_b0_local', pretrained, **dict(_B0, hierarchy_mode='local', **kwargs))


@register_model
def hierarchy_pvt_v2_b0_global(pretrained=False, **kwargs) -> HierarchyPyramidVisionTransformerV2:
    """PVTv2-b0, hierarchy attention where each token attends all centres."""
    return _create('hierarchy_pvt_v2_b0_global', pretrained, **dict(_B0, hierarchy_mode='global', **kwargs))
