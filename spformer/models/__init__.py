from .spformer import SPFormer

__all__ = ['SPFormer']
