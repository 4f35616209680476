"""Token mixers built on the local attention ops of ``spformer.kernels``, for other models than the SPFormer family."""
from .hierarchy_attention import HierarchyAttention, hierarchy_attention_macs, linear_sra_macs, sra_macs, \
    vanilla_attention_macs

__all__ = ['HierarchyAttention', 'hierarchy_attention_macs', 'sra_macs', 'linear_sra_macs', 'vanilla_attention_macs']
