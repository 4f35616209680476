from .spformer import SPFormer
from . import sp_transformer  # noqa: F401  (registers the sp_transformer_* segmentation models with timm)
from . import hierarchy_pvt  # noqa: F401  (registers the hierarchy_pvt_v2_b0_* models with timm)

__all__ = ['SPFormer']
