"""Counting SPFormer's multiply-accumulates with fvcore as torch.utils.flop_counter and the README table count them.

fvcore (``fvcore.nn.FlopCountAnalysis``) traces the model with ``torch.jit.trace`` and counts the ops it has
a handle for. Out of the box it skips, with a warning, what SPFormer's cost is partly made of: the local
attention ops (``spformer::superpixel_attention``, ``spformer::pixel_attention``, custom ops), ``aten::baddbmm``
(the SCA's per-head projections) and ``aten::scaled_dot_product_attention`` (every ViT block), so it undercounts
SPFormer-T by 15%. :func:`fvcore_handles` gives it handles for them, written from the same formulas as the
custom ops' ``torch.utils.flop_counter`` formulas, and, so that the two counters agree, no count for the
normalizations (fvcore counts a few operations per element of every LayerNorm and BatchNorm; torch's counter,
which ``spformer.demo.count_macs`` and ``bench/model_table.py`` use, counts none). fvcore counts one
multiply-accumulate as one "flop"::

    from fvcore.nn import FlopCountAnalysis
    from spformer.flops import fvcore_handles
    macs = FlopCountAnalysis(model, x).set_op_handle(**fvcore_handles()).total()  # = count_macs(model, x)[0]

fvcore is not a dependency of spformer: it is imported by :func:`flop_count_analysis` only, and the handles
read the traced values' shapes without it. Traced models take their graph path (no fused inference kernels,
no Python autograd Function, ``spformer.kernels.functional.capturing_graph``), whose ops the handles cover.
"""
import math
from typing import Any, Callable, Dict, List, Optional

import torch

from spformer.kernels import functional
from spformer.kernels import neighborhood

__all__ = ['fvcore_handles', 'flop_count_analysis']

# Normalizations: fvcore counts them, torch.utils.flop_counter does not.
_NOT_COUNTED = ('aten::layer_norm', 'aten::batch_norm', 'aten::group_norm', 'aten::instance_norm')


def _shape(value) -> Optional[List[int]]:
    """The sizes of a traced value (a ``torch._C.Value``), None for one that is not a tensor (None, scalars)."""
    kind = value.type()
    if not isinstance(kind, torch._C.TensorType):
        return None
    sizes = kind.sizes()
    if sizes is None:
        raise ValueError(f'fvcore handle: the traced value {value.debugName()} has no known shape')
    return list(sizes)


def _macs(flops: int) -> int:
    return flops // 2


def _superpixel_attention(inputs: List[Any], outputs: List[Any]) -> int:
    q, k, v = (_shape(t) for t in inputs[:3])
    return _macs(functional._superpixel_attention_flops(q, k, v))


def _pixel_attention(inputs: List[Any], outputs: List[Any]) -> int:
    q, k, v = (_shape(t) for t in inputs[:3])
    return _macs(functional._pixel_attention_flops(q, k, v))


def _neighborhood_attention(inputs: List[Any], outputs: List[Any]) -> int:
    q, v, probs = _shape(inputs[0]), _shape(inputs[2]), _shape(inputs[3])
    return _macs(neighborhood._flops(q, v, probs, inputs[6].toIValue()))


def _baddbmm(inputs: List[Any], outputs: List[Any]) -> int:
    """``baddbmm(input, batch1, batch2)``: (b, n, m) @ (b, m, p), b n m p multiply-accumulates."""
    b, n, m = _shape(inputs[1])
    p = _shape(inputs[2])[-1]
    return b * n * m * p


def _scaled_dot_product_attention(inputs: List[Any], outputs: List[Any]) -> int:
    """q (..., L, E), k (..., S, E), v (..., S, Ev): L S E for the logits, L S Ev for the weighted sum."""
    q, k, v = (_shape(t) for t in inputs[:3])
    batch = math.prod(q[:-2])
    return batch * q[-2] * k[-2] * (q[-1] + v[-1])


def _not_counted(inputs: List[Any], outputs: List[Any]) -> int:
    return 0


def fvcore_handles() -> Dict[str, Callable]:
    """Op handles for ``fvcore.nn.FlopCountAnalysis(...).set_op_handle(**fvcore_handles())``: SPFormer's
    custom ops, ``baddbmm`` and scaled-dot-product attention counted, the normalizations not, so that fvcore
    gives the multiply-accumulates ``torch.utils.flop_counter`` gives (``spformer.demo.count_macs``)."""
    handles: Dict[str, Callable] = {
        'spformer::superpixel_attention': _superpixel_attention,
        'spformer::pixel_attention': _pixel_attention,
        'spformer::neighborhood_attention': _neighborhood_attention,
        'aten::baddbmm': _baddbmm,
        'aten::scaled_dot_product_attention': _scaled_dot_product_attention,
    }
    handles.update({name: _not_counted for name in _NOT_COUNTED})  # (a handle of None would not replace fvcore's)
    return handles


def flop_count_analysis(model: torch.nn.Module, inputs):
    """``fvcore.nn.FlopCountAnalysis(model, inputs)`` with :func:`fvcore_handles` set (needs fvcore installed):
    ``.total()`` is the model's multiply-accumulates, ``.by_module()`` / ``.by_operator()`` break them down."""
    try:
        from fvcore.nn import FlopCountAnalysis
    except ImportError as e:
        raise ImportError('spformer.flops.flop_count_analysis needs fvcore: pip install fvcore') from e
    return FlopCountAnalysis(model, inputs).set_op_handle(**fvcore_handles())
