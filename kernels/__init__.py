"""Local pixel <-> superpixel cross-attention (shipped as ``spformer.kernels``).

One functional op family, several backends (NATTEN's layout):

* :func:`superpixel_attention` -- each superpixel queries the pixels of the 3x3 cells around it;
* :func:`pixel_attention` -- each pixel queries the (at most) 9 superpixels around its cell;
* :func:`superpixel_association` -- just the pixel -> superpixel probabilities (or logits);
* :func:`upsample_association` -- association logits at a finer resolution, in superpixel perspective,
  and :func:`superpixel_labels` -- the hard superpixel map of an association (argmax, own-cell margin).

Backends: ``'reference'`` (dense and naive; the test oracle), ``'torch'`` (cell-major PyTorch),
``'cpu'`` (fused C kernels, the CPU default) and ``'triton'`` (fused kernels, the CUDA default);
``'auto'`` picks. Neighbour ``k`` in 0..8 of a cell is the cell at offset ``NEIGHBOR_OFFSETS[k] = (k // 3 - 1,
k % 3 - 1)`` (raster order, 4 = own cell); neighbours outside the image get probability 0.

Neighbourhood attention re-weighted by superpixels (kernels/neighborhood.py, docs/design.md §4):

* :func:`neighborhood_attention` -- NA over a k x k window (shifted inward at borders, as NATTEN);
* :func:`soft_superpixel_attention` -- SNA, weights times the soft superpixel agreement;
* :func:`hard_superpixel_attention` -- H-SNA, weights times 1[same superpixel label].
"""
from .functional import (
    BACKENDS,
    NEIGHBOR_OFFSETS,
    PIXEL_LAYOUTS,
    cells_to_image,
    image_to_cells,
    native_pixel_layout,
    pixel_attention,
    superpixel_association,
    superpixel_attention,
    upsample_association,
)
from .neighborhood import (
    OWN_CELL_MARGIN,
    hard_superpixel_attention,
    neighborhood_attention,
    soft_superpixel_attention,
    superpixel_labels,
)

__all__ = [
    'BACKENDS', 'NEIGHBOR_OFFSETS', 'PIXEL_LAYOUTS', 'cells_to_image', 'image_to_cells', 'native_pixel_layout',
    'pixel_attention',
    'superpixel_association', 'superpixel_attention', 'upsample_association', 'OWN_CELL_MARGIN',
    'hard_superpixel_attention', 'neighborhood_attention', 'soft_superpixel_attention', 'superpixel_labels',
]
