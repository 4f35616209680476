"""Pictures of superpixels: a leaf that draws what it is given (numpy label maps, images, tensors).

:func:`superpixel_boundaries` draws a hard superpixel map onto an image;
:func:`save_superpixel_figure` writes one PNG with the photo and, for every stage of
``model.forward_superpixels(x)``, the superpixels of the merged heads (large) and of each
association head (small panels); :func:`save_stages_figure` draws per-stage label dicts (as
:meth:`spformer.eval.ModelSuperpixels.stages` returns them); :func:`save_comparison_figure` puts several
segmentations of one image side by side with its ground truth (``spformer-eval-superpixels`` pictures).
Class maps: :func:`class_palette` (one set of class colours for training pictures, model cards and
benchmarks), :func:`colourize`, and :func:`save_panels` (a grid of RGB panels, e.g. image, ground truth,
predictions, superpixels).

Nothing here loads models, reads datasets or parses arguments; matplotlib is imported only when a
figure is drawn. The ``spformer-visualize`` command is :mod:`spformer.visualize`.
"""
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from skimage.segmentation import mark_boundaries


__all__ = ['superpixel_boundaries', 'tensor_to_image', 'stage_labels', 'save_superpixel_figure', 'save_stages_figure',
           'save_comparison_figure', 'class_palette', 'colourize', 'save_panels', 'CITYSCAPES_COLOURS']

# The Cityscapes benchmark's colours of its 19 training ids (cityscapesscripts' labels.py).
CITYSCAPES_COLOURS = ((128, 64, 128), (244, 35, 232), (70, 70, 70), (102, 102, 156), (190, 153, 153), (153, 153, 153),
                      (250, 170, 30), (220, 220, 0), (107, 142, 35), (152, 251, 152), (70, 130, 180), (220, 20, 60),
                      (255, 0, 0), (0, 0, 142), (0, 0, 70), (0, 60, 100), (0, 80, 100), (0, 0, 230), (119, 11, 32))
IGNORE_COLOUR = (0, 0, 0)  # label 255, the ignore label


def superpixel_boundaries(
        image: np.ndarray,
        labels: np.ndarray,
        color: Tuple[float, float, float] = (1.0, 1.0, 0.0),
        mode: str = 'inner',
        scale: int = 1,
) -> np.ndarray:
    """Draw the boundaries of a label map onto an image.

    Args:
        image: (H, W, 3) uint8 RGB image.
        labels: (H, W) integer label map (e.g. ``forward_superpixels(x)[i]['labels'][b]``).
        color: RGB boundary colour in [0, 1].
        mode: boundary mode of :func:`skimage.segmentation.find_boundaries`.
        scale: draw on the image and labels enlarged this many times (nearest): the lines stay 1-2 output
            pixels wide, so small superpixels of a small image still show their insides.

    Returns:
        (H * scale, W * scale, 3) uint8 image with the boundaries drawn.
    """
    if isinstance(scale, bool) or not isinstance(scale, int) or scale < 1:
        raise ValueError(f'scale must be an int >= 1, got {scale!r}')
    image = np.asarray(image)
    labels = labels.cpu().numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f'image must be (H, W, 3) RGB, got shape {image.shape}')
    if labels.shape != image.shape[:2]:
        raise ValueError(f'labels {labels.shape} must have the image size {image.shape[:2]}')
    if scale > 1:
        image = image.repeat(scale, 0).repeat(scale, 1)
        labels = labels.repeat(scale, 0).repeat(scale, 1)
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
    """Hard superpixel maps of one ``forward_superpixels`` stage, at input resolution: the merged-heads
    labels (B, H, W) and one (B, H, W) map per association head (``head_labels``), made the same way."""
    return stage['labels'], list(stage['head_labels'].unbind(1))


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
    stages = []
    for stage in superpixel_outputs:
        merged, heads = stage_labels(stage)
        stages.append(dict(merged=merged, heads=heads, grid=tuple(int(v) for v in stage['grid'])))
    return save_stages_figure(image, stages, path, title=title, noun='superpixels', index=index, dpi=dpi, scale=scale)


def save_stages_figure(
        image: np.ndarray,
        stages: List[Dict[str, Any]],
        path: str,
        title: Optional[str] = None,
        noun: str = 'superpixels',
        index: int = 0,
        dpi: int = 100,
        scale: int = 2,
) -> str:
    """:func:`save_superpixel_figure` for any level of hard labels (superpixels, groups).

    Args:
        image: (H, W, 3) uint8 image at the model's input resolution.
        stages: One dict per stage: ``merged`` (B, H, W) labels, ``heads`` (list of (B, H, W) labels)
            and ``grid`` (h, w), optionally ``stage`` (the model's 1-based stage, default the position
            + 1), as :data:`spformer.eval.LEVELS` produce them.
        noun: What the segments are called in the panel titles.
        Others: as :func:`save_superpixel_figure`.
    """
    num_stages = len(stages)
    num_heads = len(stages[0]['heads'])
    # Columns: the photo (spanning all rows), the merged heads, then the heads stacked in one column.
    fig, _ = _figure((7.6, 3.3 * num_stages + (0.3 if title else 0.0)))
    from matplotlib.gridspec import GridSpec, GridSpecFromSubplotSpec
    gs = GridSpec(num_stages, 3, figure=fig, width_ratios=[1.0, 1.0, 1.0 / num_heads], wspace=0.04, hspace=0.12)

    def draw(labels):
        # Upsampled before drawing so the 1-px boundaries stay thin next to the photo.
        lab = labels.repeat_interleave(scale, 0).repeat_interleave(scale, 1)
        return superpixel_boundaries(big, lab)

    big = np.asarray(image).repeat(scale, 0).repeat(scale, 1)
    _show(fig.add_subplot(gs[:, 0]), image, 'input', fontsize=10)
    for i, stage in enumerate(stages):
        merged, heads = stage['merged'], stage['heads']
        h, w = stage['grid']
        n = int(merged[index].unique().numel())
        number = stage.get('stage', i + 1)
        _show(fig.add_subplot(gs[i, 1]), draw(merged[index]), f'stage {number}: {n} of {h * w} {noun}', 10)
        head_gs = GridSpecFromSubplotSpec(num_heads, 1, subplot_spec=gs[i, 2], hspace=0.25)
        for m, head in enumerate(heads):
            n = int(head[index].unique().numel())
            _show(fig.add_subplot(head_gs[m]), draw(head[index]), f'head {m + 1}: {n}', 8)
    if title:
        fig.suptitle(title, fontsize=11)
    fig.savefig(path, dpi=dpi, bbox_inches='tight')
    return path


def save_comparison_figure(
        image: np.ndarray,
        ground_truth: np.ndarray,
        panels: Sequence[Tuple[str, np.ndarray]],
        path: str,
        title: Optional[str] = None,
        ignore_index: Optional[int] = 255,
        columns: int = 4,
        panel_inches: float = 3.2,
        dpi: Optional[float] = None,
        min_width: int = 320,
) -> str:
    """Write one PNG comparing segmentations of one image side by side.

    Panels, row by row: the image, its ground truth (region boundaries in red, ignored pixels
    greyed), then every (title, (H, W) labels) of ``panels`` as yellow boundaries on the image.

    Args:
        image: (H, W, 3) uint8 image.
        ground_truth: (H, W) label map of the image.
        panels: (title, labels) pairs, labels of the image's size.
        path: Output PNG path.
        title: Figure title.
        ignore_index: Ground-truth label drawn greyed (None: none).
        columns: Panels per row.
        panel_inches: Width of one panel.
        dpi: Resolution of the PNG (default: one figure pixel per image pixel, at least 100).
        min_width: Smaller images are upsampled (nearest, by an integer factor) to at least this
            width before the 1-pixel boundaries are drawn, so the lines stay thin.

    Returns:
        ``path``.
    """
    scale = max(1, -(-min_width // np.asarray(image).shape[1]))

    def up(a):
        return np.asarray(a).repeat(scale, 0).repeat(scale, 1)

    image, gt = up(image), up(ground_truth)
    shown = image.copy()
    if ignore_index is not None:
        void = gt == ignore_index
        shown[void] = (shown[void] * 0.4 + 128 * 0.6).astype(np.uint8)
    items = [('input', image), ('ground truth', superpixel_boundaries(shown, gt, color=(1.0, 0.0, 0.0)))]
    items += [(text, superpixel_boundaries(image, up(labels))) for text, labels in panels]
    cols = min(columns, len(items))
    rows = -(-len(items) // cols)
    aspect = image.shape[0] / image.shape[1]
    fig, _ = _figure((panel_inches * cols, (panel_inches * aspect + 0.45) * rows + (0.35 if title else 0.0)))
    for k, (text, img) in enumerate(items):
        _show(fig.add_subplot(rows, cols, k + 1), img, text, fontsize=8)
    fig.subplots_adjust(left=0.01, right=0.99, bottom=0.01, top=0.99, wspace=0.03, hspace=0.12)
    if title:
        fig.suptitle(title, fontsize=9, y=1.0, va='bottom')  # above the panels' titles (tight bbox keeps it)
    fig.savefig(path, dpi=dpi or max(100.0, image.shape[1] / panel_inches), bbox_inches='tight')
    return path


def _figure(size: Tuple[float, float]):
    # Agg canvas on a bare Figure: no pyplot, so the caller's matplotlib backend is left alone.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    fig = Figure(figsize=size)
    return fig, FigureCanvasAgg(fig)


def _show(ax, img, text, fontsize=9):
    ax.imshow(img, interpolation='nearest')
    ax.set_title(text, fontsize=fontsize, pad=3)
    ax.set_axis_off()


def class_palette(num_classes: int) -> np.ndarray:
    """(max(256, num_classes), 3) uint8 colours of class ids: Cityscapes' for 19 classes, matplotlib's tab20 for up
    to 20 others, fixed random ones (seeded, the same every call) beyond; id 255 (the ignore label) black when it
    is not a class."""
    colours = np.random.default_rng(0).integers(40, 256, (max(256, num_classes), 3)).astype(np.uint8)
    if num_classes == len(CITYSCAPES_COLOURS):
        colours[:num_classes] = CITYSCAPES_COLOURS
    elif num_classes <= 20:
        from matplotlib import colormaps
        colours[:num_classes] = (np.asarray(colormaps['tab20'].colors[:num_classes]) * 255).round()
    if num_classes <= 255:
        colours[255] = IGNORE_COLOUR
    return colours


def colourize(labels: np.ndarray, colours: np.ndarray) -> np.ndarray:
    """(H, W) class ids -> (H, W, 3) uint8 colours (:func:`class_palette`); ids outside the palette clipped to it."""
    return colours[np.clip(labels, 0, len(colours) - 1)]


def save_panels(path, rows: List[Dict[str, np.ndarray]], title: Optional[str] = None) -> None:
    """One PNG of RGB panels: a row per entry, a column per key (its title), e.g. image, ground truth,
    prediction, superpixels. Panels of one row share its first panel's size."""
    columns = list(dict.fromkeys(k for row in rows for k in row))
    H, W = next(iter(rows[0].values())).shape[:2]
    scale = 3.2 / W
    fig, _ = _figure((max(4, len(columns) * W * scale), len(rows) * H * scale + 0.6))
    fig.set_layout_engine('constrained')
    axes = np.atleast_2d(fig.subplots(len(rows), len(columns), squeeze=False))
    for r, row in enumerate(rows):
        for c, column in enumerate(columns):
            ax = axes[r, c]
            ax.axis('off')
            if column in row:
                ax.imshow(row[column], interpolation='nearest')
            if r == 0:
                ax.set_title(column, fontsize=9)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.savefig(path, dpi=110)
