"""Pictures of the superpixels an SPFormer learns.

:func:`superpixel_boundaries` draws a hard superpixel map onto an image;
:func:`save_superpixel_figure` writes one PNG with the photo and, for every stage of
``model.forward_superpixels(x)``, the superpixels of the merged heads (large) and of each
association head (small panels).
"""
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from skimage.segmentation import mark_boundaries

from spformer.models.spformer import association_to_labels

__all__ = ['superpixel_boundaries', 'tensor_to_image', 'stage_labels', 'save_superpixel_figure']


def superpixel_boundaries(
        image: np.ndarray,
        labels: np.ndarray,
        color: Tuple[float, float, float] = (1.0, 1.0, 0.0),
        mode: str = 'inner',
) -> np.ndarray:
    """Draw the boundaries of a label map onto an image.

    Args:
        image: (H, W, 3) uint8 RGB image.
        labels: (H, W) integer label map (e.g. ``forward_superpixels(x)[i]['labels'][b]``).
        color: RGB boundary colour in [0, 1].
        mode: boundary mode of :func:`skimage.segmentation.find_boundaries`.

    Returns:
        (H, W, 3) uint8 image with the boundaries drawn.
    """
    image = np.asarray(image)
    labels = labels.cpu().numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f'image must be (H, W, 3) RGB, got shape {image.shape}')
    if labels.shape != image.shape[:2]:
        raise ValueError(f'labels {labels.shape} must have the image size {image.shape[:2]}')
    drawn = mark_boundaries(image, labels, color=color, mode=mode)  # float in [0, 1]
    return (drawn * 255).round().clip(0, 255).astype(np.uint8)


def tensor_to_image(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """Undo the model's input normalization: (3, H, W) float tensor -> (H, W, 3) uint8 image.

    This is exactly the crop the model saw, so it lines up with the superpixel labels.
    """
    x = x.detach().float().cpu()
    m = torch.tensor(mean).view(-1, 1, 1)
    s = torch.tensor(std).view(-1, 1, 1)
    img = (x * s + m).clamp(0, 1).permute(1, 2, 0)
    return (img * 255).round().to(torch.uint8).numpy()


def stage_labels(stage: Dict[str, torch.Tensor]) -> Tuple[torch.Tensor, List[torch.Tensor]]:
    """Hard superpixel maps of one ``forward_superpixels`` stage, at input resolution.

    Returns the merged-heads labels (B, H, W) and one (B, H, W) map per association head,
    each made from that head's association the same way (argmax, ties to the own cell).
    """
    labels = stage['labels']
    association = stage['association']  # (B, heads, 9, H/s, W/s)
    pixel_h = association.shape[-2]
    grid_h = int(stage['grid'][0])
    cell_size = pixel_h // grid_h
    upsample = labels.shape[-2] // pixel_h
    heads = [association_to_labels(association[:, m], cell_size, upsample) for m in range(association.shape[1])]
    return labels, heads


def save_superpixel_figure(
        image: np.ndarray,
        superpixel_outputs: List[Dict[str, torch.Tensor]],
        path: str,
        title: Optional[str] = None,
        index: int = 0,
        dpi: int = 100,
        scale: int = 2,
) -> str:
    """Write one PNG: the photo, then per stage the merged-heads superpixels and one small panel per head.

    Args:
        image: (H, W, 3) uint8 image at the model's input resolution (see :func:`tensor_to_image`).
        superpixel_outputs: ``model.forward_superpixels(x)``.
        path: Output PNG path.
        title: Figure title.
        index: Which image of the batch to draw.
        dpi: Resolution of the PNG.
        scale: Upsampling of the panels with boundaries (thinner lines).

    Returns:
        ``path``.
    """
    # Agg canvas on a bare Figure: no pyplot, so the caller's matplotlib backend is left alone.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.gridspec import GridSpec, GridSpecFromSubplotSpec

    num_stages = len(superpixel_outputs)
    num_heads = superpixel_outputs[0]['association'].shape[1]
    # Columns: the photo (spanning all rows), the merged heads, then the heads stacked in one column.
    fig = Figure(figsize=(7.6, 3.3 * num_stages + (0.3 if title else 0.0)))
    FigureCanvasAgg(fig)
    gs = GridSpec(num_stages, 3, figure=fig, width_ratios=[1.0, 1.0, 1.0 / num_heads], wspace=0.04, hspace=0.12)

    def show(ax, img, text, fontsize=9):
        ax.imshow(img, interpolation='nearest')
        ax.set_title(text, fontsize=fontsize, pad=3)
        ax.set_axis_off()

    def draw(labels):
        # Upsampled before drawing so the 1-px boundaries stay thin next to the photo.
        lab = labels.repeat_interleave(scale, 0).repeat_interleave(scale, 1)
        return superpixel_boundaries(big, lab)

    big = np.asarray(image).repeat(scale, 0).repeat(scale, 1)
    show(fig.add_subplot(gs[:, 0]), image, 'input', fontsize=10)
    for i, stage in enumerate(superpixel_outputs):
        merged, heads = stage_labels(stage)
        h, w = (int(v) for v in stage['grid'])
        n = int(merged[index].unique().numel())
        show(fig.add_subplot(gs[i, 1]), draw(merged[index]), f'stage {i + 1}: {n} of {h * w} superpixels', 10)
        head_gs = GridSpecFromSubplotSpec(num_heads, 1, subplot_spec=gs[i, 2], hspace=0.25)
        for m, head in enumerate(heads):
            n = int(head[index].unique().numel())
            show(fig.add_subplot(head_gs[m]), draw(head[index]), f'head {m + 1}: {n}', 8)
    if title:
        fig.suptitle(title, fontsize=11)
    fig.savefig(path, dpi=dpi, bbox_inches='tight')
    return path
