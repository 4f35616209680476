"""The local attention ops written out in plain, functional torch ops: what graph exporters see.

The fast backends run behind ``torch.library`` custom ops (kernels/functional.py), which
``torch.compile`` and ``torch.export`` keep as single nodes. An ONNX file cannot hold them (onnxruntime
knows no ``spformer`` domain), so while ``torch.onnx.export`` traces a model (``dynamo=True`` or the
TorchScript-based exporter) the ops run these functions instead and the graph records standard ops:
pads, one gather per neighbourhood, matmuls, softmaxes. They compute what the torch backend computes, in
its cell-major form (docs/design.md §1.4): pixels viewed cell by cell and the superpixel grid gathered 3x3
(:func:`neighbors`); in the superpixel direction every superpixel gathers the pixels of its 3x3 cells (a 9x
copy of the pixel tensors, small beside the reference backend's dense H*W x h*w matrix, which is never
built) and takes an exact softmax over them. No in-place op, no Python branch on a tensor size: one
exported graph serves every input size (dynamic height and width).

:func:`decompositions` gives the same math as a decomposition table for the custom ops, for an
``ExportedProgram`` made by ``torch.export`` (whose graph holds the custom ops):
``ep.run_decompositions(decompositions())`` leaves only standard ops, which ``torch.onnx.export(ep)``
translates.

Heads: pixel tensors carry all M heads or one head (Mp = 1) shared by the G = M / Mp heads of the
superpixel tensors, as for every backend; head m = mp * G + g.
"""
from typing import Callable, Dict, Optional, Tuple

import torch
import torch.nn.functional as F

OFFSETS = tuple((k // 3 - 1, k % 3 - 1) for k in range(9))


def accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _to(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return t if t.dtype == dtype else t.to(dtype)  # (an exported graph records even a no-op conversion)


def neighbor_index(h, w, device) -> torch.Tensor:
    """(h * w * 9,) positions, in an (h + 2) x (w + 2) grid padded by a cell, of the 9 neighbours of every cell
    of an h x w grid, in ``OFFSETS`` order; computed in the graph from the grid's size (no constant that would
    fix it), once per op for all its gathers."""
    pitch = w + 2
    offsets = torch.arange(3, device=device)
    offsets = (offsets[:, None] * pitch + offsets[None, :]).reshape(9)  # (dy + 1) * pitch + dx + 1
    cells = torch.arange(h, device=device)[:, None] * pitch + torch.arange(w, device=device)[None, :]
    return (cells[:, :, None] + offsets).reshape(-1)


def neighbors(s: torch.Tensor, fill: float = 0.0, index: Optional[torch.Tensor] = None) -> torch.Tensor:
    """(N, h, w, *c) -> (N, h, w, 9, *c): entry k of cell (i, j) is cell (i, j) + ``OFFSETS[k]``, ``fill``
    outside the grid. One gather (``index``: :func:`neighbor_index`) from the grid padded by a cell."""
    N, h, w = s.shape[:3]
    rest = s.shape[3:]
    if index is None:
        index = neighbor_index(h, w, s.device)
    padded = F.pad(s.reshape(N, h, w, -1), (0, 0, 1, 1, 1, 1), value=fill)
    padded = padded.reshape(N, (h + 2) * (w + 2), padded.shape[-1])
    return padded.index_select(1, index).reshape(N, h, w, 9, *rest)


def pixels_to_cells(x: torch.Tensor, cell: int, cells: bool) -> torch.Tensor:
    """Pixel tensor (B, Mp, H, W, c), or cell-major (B, Mp, h, w, n, c) if ``cells`` -> (B * Mp, h, w, n, c)."""
    B, Mp = x.shape[:2]
    c = x.shape[-1]
    if cells:
        return x.reshape(B * Mp, x.shape[2], x.shape[3], x.shape[4], c)
    h, w = x.shape[2] // cell, x.shape[3] // cell
    return x.reshape(B * Mp, h, cell, w, cell, c).transpose(2, 3).reshape(B * Mp, h, w, cell * cell, c)


def cells_to_pixels(y: torch.Tensor, B: int, M: int, cell: int, cells: bool) -> torch.Tensor:
    """(B, M, h, w, n, c) cell-major -> (B, M, H, W, c), or itself if ``cells``."""
    if cells:
        return y
    h, w, c = y.shape[2], y.shape[3], y.shape[-1]
    return y.reshape(B, M, h, w, cell, cell, c).transpose(3, 4).reshape(B, M, h * cell, w * cell, c)


def _grouped(s: torch.Tensor, Mp: int) -> torch.Tensor:
    """Superpixel tensor (B, M, h, w, *c) -> (B * Mp, h, w, G, *c)."""
    B, M, h, w = s.shape[:4]
    rest = s.shape[4:]
    return s.reshape(B, Mp, M // Mp, h, w, *rest).movedim(2, 4).reshape(B * Mp, h, w, M // Mp, *rest)


def _pixel_rows(y: torch.Tensor, B: int, Mp: int) -> torch.Tensor:
    """Pixel-side result per cell (B * Mp, h, w, G, n, c) -> cell-major (B, M, h, w, n, c)."""
    h, w, G, n, c = y.shape[1:]
    return y.reshape(B, Mp, h, w, G, n, c).movedim(4, 2).reshape(B, Mp * G, h, w, n, c)


def pixel_probs(q: torch.Tensor, k: torch.Tensor, bias: Optional[torch.Tensor], cell: int, scale: float,
                cells: bool, normalize: bool = True, index: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Cell-major probabilities (N, h, w, n, G * 9) of the pixels over the 9 superpixels around their cell,
    entry g * 9 + k for neighbour k of head g (the torch backend's layout); their logits (-inf for
    neighbours outside the grid) if not ``normalize``. In the inputs' accumulation dtype."""
    B, Mp = q.shape[:2]
    M, h, w, d = k.shape[1:]
    G = M // Mp
    dt = accumulate_dtype(q.dtype)
    index = neighbor_index(h, w, k.device) if index is None else index
    qc = pixels_to_cells(_to(q, dt), cell, cells)  # (N, h, w, n, d)
    kn = neighbors(_grouped(_to(k, dt), Mp), index=index).transpose(3, 4).reshape(B * Mp, h, w, G * 9, d)
    logits = torch.matmul(qc, kn.transpose(-1, -2)) * scale  # (N, h, w, n, G9)
    if bias is None:
        bias = k.new_zeros(B, M, h, w, dtype=dt)
    # -inf for neighbours outside the grid: the bias term doubles as the mask
    pair_bias = neighbors(_grouped(_to(bias, dt), Mp), fill=float('-inf'), index=index).transpose(3, 4)
    logits = logits + pair_bias.reshape(B * Mp, h, w, 1, G * 9)
    if not normalize:
        return logits
    N, n = logits.shape[0], logits.shape[3]
    return logits.reshape(N, h, w, n, G, 9).softmax(dim=-1).reshape(N, h, w, n, G * 9)


def pixel_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: Optional[torch.Tensor], cell: int,
                    scale: float, cells: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """Pixel queries over their 9 superpixels (``spformer.kernels.pixel_attention``): the output (B, M, H, W, dv)
    ((B, M, h, w, n, dv) if ``cells``) and the probabilities (B, M, H, W, 9) (or (B, M, h, w, n, 9))."""
    B, Mp = q.shape[:2]
    M, h, w, dv = v.shape[1:]
    G = M // Mp
    index = neighbor_index(h, w, v.device)
    probs = pixel_probs(q, k, bias, cell, scale, cells, index=index)  # (N, h, w, n, G9)
    N, n = probs.shape[0], probs.shape[3]
    p = probs.reshape(N, h, w, n, G, 9).transpose(3, 4)  # (N, h, w, G, n, 9)
    vn = neighbors(_grouped(_to(v, probs.dtype), Mp), index=index).transpose(3, 4)  # (N, h, w, G, 9, dv)
    out = torch.matmul(p, vn)  # (N, h, w, G, n, dv)
    out = _to(cells_to_pixels(_pixel_rows(out, B, Mp), B, M, cell, cells), q.dtype)
    weights = _to(cells_to_pixels(_pixel_rows(p, B, Mp), B, M, cell, cells), q.dtype)
    return out, weights


def superpixel_association(q: torch.Tensor, k: torch.Tensor, bias: Optional[torch.Tensor], cell: int,
                           scale: float, cells: bool, logits: bool = False) -> torch.Tensor:
    """``spformer.kernels.superpixel_association``: (B, M, H, W, 9) probabilities (or logits)."""
    B, Mp = q.shape[:2]
    M, h, w = k.shape[1:4]
    G = M // Mp
    probs = pixel_probs(q, k, bias, cell, scale, cells, normalize=not logits)
    N, n = probs.shape[0], probs.shape[3]
    p = probs.reshape(N, h, w, n, G, 9).transpose(3, 4)
    return _to(cells_to_pixels(_pixel_rows(p, B, Mp), B, M, cell, cells), q.dtype)


def _superpixel_weights(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cell: int, scale: float, cells: bool):
    """Every superpixel over the pixels of its 3x3 cells, gathered (a 9x copy of the pixel tensors, small
    beside the dense matrix): the weights (N, h, w, G, 9 * n), entry k * n + p for pixel p of the cell at
    ``OFFSETS[k]`` (0 outside the grid), and the weighted sums, heads-last (B, h, w, M, dv)."""
    B, M, h, w, d = q.shape
    Mp = k.shape[1]
    G = M // Mp
    dt = accumulate_dtype(q.dtype)
    index = neighbor_index(h, w, q.device)
    kc = pixels_to_cells(_to(k, dt), cell, cells)  # (N, h, w, n, d)
    N, n = kc.shape[0], kc.shape[3]
    kw = neighbors(kc, index=index).reshape(N, h, w, 9 * n, d)
    vw = kw if v is k else neighbors(pixels_to_cells(_to(v, dt), cell, cells), index=index).reshape(
        N, h, w, 9 * n, v.shape[-1])
    outside = neighbors(kc.new_zeros(1, h, w, 1), fill=float('-inf'), index=index)  # (1, h, w, 9, 1)
    mask = outside.expand(1, h, w, 9, n).reshape(1, h, w, 1, 9 * n)  # -inf for pixels outside the grid
    logits = torch.matmul(_grouped(_to(q, dt), Mp), kw.transpose(-1, -2)) * scale + mask  # (N, h, w, G, 9n)
    weights = logits.softmax(dim=-1)
    out = torch.matmul(weights, vw)  # (N, h, w, G, dv)
    out = out.reshape(B, Mp, h, w, G, out.shape[-1]).movedim(1, 3).reshape(B, h, w, M, out.shape[-1])
    return weights, _to(out, q.dtype)


def superpixel_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cell: int, scale: float,
                         cells: bool) -> torch.Tensor:
    """Superpixel queries over the pixels of their 3x3 cells (``spformer.kernels.superpixel_attention``):
    (B, M, h, w, dv)."""
    return _superpixel_weights(q, k, v, cell, scale, cells)[1].movedim(3, 1)


# --- the custom ops' decompositions ------------------------------------------------------------

def _superpixel_attention_op(q, k, v, cell, scale, shared_kv, backend, cells):
    weights, out = _superpixel_weights(q, k, k if shared_kv else v, cell, scale, cells)
    # the op's probabilities are cell-major: entry (c, p, g * 9 + k) is the weight of pixel p of cell c for the
    # superpixel at c + OFFSETS[k], which sees that cell as its neighbour 8 - k
    N, h, w, G = weights.shape[:4]
    n = weights.shape[-1] // 9
    seen = neighbors(weights.reshape(N, h, w, G, 9, n))  # (N, h, w, 9 [k], G, 9 [k'], n)
    probs = seen.flip(5).diagonal(dim1=3, dim2=5)  # k' = 8 - k: (N, h, w, G, n, 9)
    return out, probs.permute(0, 1, 2, 4, 3, 5).reshape(N, h, w, n, G * 9)


def _pixel_attention_op(q, k, v, bias, cell, scale, backend, cells):
    B, Mp = q.shape[:2]
    M, h, w, dv = v.shape[1:]
    G = M // Mp
    index = neighbor_index(h, w, v.device)
    probs = pixel_probs(q, k, bias, cell, scale, cells, index=index)
    N, n = probs.shape[0], probs.shape[3]
    p = probs.reshape(N, h, w, n, G, 9)
    vn = neighbors(_grouped(_to(v, probs.dtype), Mp), index=index).transpose(3, 4)  # (N, h, w, G, 9, dv)
    out = torch.matmul(p.transpose(3, 4), vn)  # (N, h, w, G, n, dv)
    out = out.reshape(B, Mp, h, w, G, n, dv).permute(0, 2, 3, 5, 1, 4, 6).reshape(B, h, w, n, M, dv)
    if not cells:  # heads-last image layout (B, H, W, M, dv)
        out = out.reshape(B, h, w, cell, cell, M, dv).transpose(2, 3).reshape(B, h * cell, w * cell, M, dv)
    return _to(out, q.dtype), probs


def decompositions() -> Dict[torch._ops.OpOverload, Callable]:
    """Decompositions of the forward ops ``torch.ops.spformer.{superpixel,pixel}_attention`` into standard
    ops, with the custom ops' outputs (heads-last results and the cell-major probabilities), for
    ``ExportedProgram.run_decompositions``::

        ep = torch.export.export(model, (x,))
        onnx_program = torch.onnx.export(ep.run_decompositions(spformer.kernels.decomposed.decompositions()))
    """
    return {  # (the ops are registered: importing this module imports spformer.kernels, which defines them)
        torch.ops.spformer.superpixel_attention.default: _superpixel_attention_op,
        torch.ops.spformer.pixel_attention.default: _pixel_attention_op,
    }
