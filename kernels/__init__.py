"""Local pixel <-> superpixel cross-attention (shipped as ``spformer.kernels``).

One functional op family, several backends (NATTEN's layout):

* :func:`superpixel_attention` -- each superpixel queries the pixels of the 3x3 cells around it;
* :func:`pixel_attention` -- each pixel queries the (at most) 9 superpixels around its cell;
* :func:`superpixel_association` -- just the pixel -> superpixel probabilities.

Backends: ``'reference'`` (dense and naive; the test oracle), ``'torch'`` (cell-major
PyTorch, the CPU default) and ``'triton'`` (fused kernels, the CUDA default, once built).
Neighbour ``k`` in 0..8 of a cell is the cell at offset ``NEIGHBOR_OFFSETS[k] = (k // 3 - 1,
k % 3 - 1)`` (raster order, 4 = own cell); neighbours outside the image get probability 0.
"""
from .functional import (
    BACKENDS,
    NEIGHBOR_OFFSETS,
    PIXEL_LAYOUTS,
    cells_to_image,
    image_to_cells,
    pixel_attention,
    superpixel_association,
    superpixel_attention,
)

__all__ = [
    'BACKENDS', 'NEIGHBOR_OFFSETS', 'PIXEL_LAYOUTS', 'cells_to_image', 'image_to_cells', 'pixel_attention',
    'superpixel_association', 'superpixel_attention',
]
