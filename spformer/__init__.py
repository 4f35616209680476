"""spformer: superpixel vision transformers for timm.

``import spformer`` registers the ``spformer_*`` models with timm, so that
``timm.create_model('spformer_small_sp16_224')`` works.
"""
from . import kernels
from .models import SPFormer

__version__ = '0.1.0'
__all__ = ['SPFormer', 'kernels', '__version__']
