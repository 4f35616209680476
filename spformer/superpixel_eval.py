"""Zero-shot superpixel quality: score a model's superpixels against segmentation ground truth,
beside a regular patch grid and SLIC with the same number of segments (docs/design.md §3).

    spformer-eval-superpixels VOCdevkit/VOC2012 --model spformer_small_sp16_224=weights.safetensors
    spformer-eval-superpixels BSR/BSDS500/data --model hf-hub:org/repo --model spformer_tiny_sp16_224
    spformer-eval-superpixels my_folder --methods slic patch --segments 196
    python -m spformer.superpixel_eval --help

Methods (:class:`Segmenter`): :class:`PatchGrid` (the ViT's regular grid), :class:`Slic`
(scikit-image) and :class:`ModelSuperpixels` (a model's hard association of one stage, the
head-merged one by default, or one association head). Datasets: :func:`spformer.datasets.open_dataset`
(Pascal VOC 2012, BSDS500 or a plain folder of images and label PNGs); their images are read by
:mod:`spformer.images` (16-bit PNG/TIFF scaled by their full range, not clipped; an unreadable image
stops the run with its file named).

Resolution policy (explicit, ``score_at``): every image is resized (bicubic, aspect ratio not kept)
to the model's input size (224x224 for the sp16 models: 196 segments), and all methods segment that
same image. Then either

- ``score_at='gt'`` (default): the segment maps are resized back to the ground truth's resolution with
  nearest neighbour, and scored against the untouched ground truth; or
- ``score_at='input'``: the ground truth is resized to the input size with nearest neighbour, and the
  segment maps are scored as they are.

Nearest neighbour samples pixel centres: output pixel i takes input pixel floor((i + 1/2) * n_in / n_out).

Metrics, per image (per ground truth, then averaged over a BSDS500 image's humans; see each function
for the formula and its source). Notation: segments S_j, ground-truth regions G_i (the pixels of one
label value), N the number of pixels; pixels labelled ``ignore_index`` are left out of N, of every
S_j and every G_i:

- :func:`oracle_confusion` / :func:`mean_iou_and_accuracy`: oracle mIoU and mAcc;
- :func:`achievable_segmentation_accuracy` (ASA);
- :func:`boundary_recall` (BR, 2-pixel tolerance);
- :func:`undersegmentation_error` (UE, Neubert–Protzel);
- :func:`compactness` (CO, Schick et al.; ground truth not used, all pixels count);
- :func:`num_segments`: distinct labels in the method's map at the input size (a token id split in
  several pieces is one segment; shrinking to a small ground truth can drop a few more).

Dataset values: oracle mIoU and mAcc come from one confusion matrix summed over all images when labels
are classes (VOC, folder); for BSDS500, whose segment ids are per image, they are computed per ground
truth and averaged. The other metrics are means over images (images without any ground-truth
boundary have no boundary recall and are left out of its mean).
"""
import argparse
import csv
import json
import math
import os
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from spformer.cli import ArgumentError
from spformer.datasets import DatasetError, SegmentationDataset, open_dataset
from spformer.hub.checkpoint import ModelReferenceError, load_model

__all__ = [
    'achievable_segmentation_accuracy', 'boundary_recall', 'undersegmentation_error', 'compactness',
    'num_segments', 'oracle_confusion', 'mean_iou_and_accuracy', 'score_segmentation', 'boundary_map',
    'resize_nearest', 'resize_image',
    'Segmenter', 'Segmentation', 'PatchGrid', 'Slic', 'ModelSuperpixels', 'Level', 'LEVELS',
    'evaluate', 'EvalResult', 'format_table', 'main', 'InputError',
]


class InputError(ArgumentError):
    """A bad argument: names the argument, what it got and what it expects (a ValueError; the console
    scripts print it as one line, :func:`spformer.cli.run_main`)."""


# --------------------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------------------

def _check_pair(segments: np.ndarray, gt: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    segments, gt = np.asarray(segments), np.asarray(gt)
    if segments.ndim != 2 or segments.shape != gt.shape:
        raise InputError(f'segments {segments.shape} and ground truth {gt.shape} must be 2-D maps of the same size')
    return segments, gt


def _contingency(segments: np.ndarray, gt: np.ndarray, ignore_index: Optional[int]):
    """Overlap counts n[j, i] = |S_j ∩ G_i| over the non-ignored pixels, and the label values of i."""
    segments, gt = _check_pair(segments, gt)
    keep = np.ones(gt.shape, bool) if ignore_index is None else gt != ignore_index
    _, seg = np.unique(segments[keep], return_inverse=True)
    regions, reg = np.unique(gt[keep], return_inverse=True)
    n_seg = int(seg.max()) + 1 if seg.size else 0
    table = np.bincount(seg * len(regions) + reg, minlength=n_seg * len(regions)).reshape(n_seg, len(regions))
    return table, regions


def achievable_segmentation_accuracy(segments: np.ndarray, gt: np.ndarray, ignore_index: Optional[int] = 255) -> float:
    """ASA = (1/N) Σ_j max_i |S_j ∩ G_i|: the pixel accuracy of the best labelling that is constant
    on every segment (each segment takes the region it overlaps most).

    Liu, Tuzel, Ramalingam, Chellappa, "Entropy rate superpixel segmentation", CVPR 2011. Perfect
    (or finer) segmentations score 1. NaN when no pixel is labelled.
    """
    table, _ = _contingency(segments, gt, ignore_index)
    total = table.sum()
    return float(table.max(axis=1).sum() / total) if total else math.nan


def undersegmentation_error(segments: np.ndarray, gt: np.ndarray, ignore_index: Optional[int] = 255) -> float:
    """UE = (1/N) Σ_i Σ_{j: S_j ∩ G_i ≠ ∅} min(|S_j ∩ G_i|, |S_j \\ G_i|).

    Neubert and Protzel, "Superpixel benchmark and comparison", Forum Bildverarbeitung 2012: every
    segment that leaks out of a region is charged the smaller of its part inside and its part
    outside. 0 for a perfect (or finer) segmentation; one segment covering two regions of a and b
    pixels gives 2·min(a, b) / N. NaN when no pixel is labelled.
    """
    table, _ = _contingency(segments, gt, ignore_index)
    total = table.sum()
    if not total:
        return math.nan
    size = table.sum(axis=1, keepdims=True)
    return float(np.minimum(table, size - table)[table > 0].sum() / total)


def boundary_map(labels: np.ndarray) -> np.ndarray:
    """Pixels with a 4-neighbour of another label (both sides of every boundary), as a bool map."""
    labels = np.asarray(labels)
    b = np.zeros(labels.shape, bool)
    dy = labels[1:, :] != labels[:-1, :]
    dx = labels[:, 1:] != labels[:, :-1]
    b[1:, :] |= dy
    b[:-1, :] |= dy
    b[:, 1:] |= dx
    b[:, :-1] |= dx
    return b


def boundary_recall(segments: np.ndarray, gt: np.ndarray, tolerance: int = 2,
                    ignore_index: Optional[int] = 255) -> float:
    """BR = TP / (TP + FN): the fraction of ground-truth boundary pixels with a segment boundary pixel
    within ``tolerance`` pixels (in the (2r+1)x(2r+1) window around them, r = tolerance).

    Martin, Fowlkes, Malik, "Learning to detect natural image boundaries using local brightness,
    color, and texture cues", TPAMI 2004; window tolerance as in Stutz, Hermans, Leibe, "Superpixels:
    an evaluation of the state-of-the-art", CVIU 2018. Boundary pixels are those with a 4-neighbour
    of another label (:func:`boundary_map`, both sides); the ignore label counts as a region of its
    own, but ignored pixels are never ground-truth boundary pixels (in VOC the pixels on both sides of
    a void band are). NaN when the ground truth has no boundary.
    """
    segments, gt = _check_pair(segments, gt)
    if tolerance < 0:
        raise InputError(f'tolerance must be >= 0 pixels, got {tolerance}')
    gt_b = boundary_map(gt)
    if ignore_index is not None:
        gt_b &= gt != ignore_index
    total = int(gt_b.sum())
    if not total:
        return math.nan
    near = boundary_map(segments)
    if tolerance:
        from scipy.ndimage import maximum_filter
        near = maximum_filter(near, size=2 * tolerance + 1, mode='constant', cval=False)
    return float((gt_b & near).sum() / total)


def compactness(segments: np.ndarray) -> float:
    """CO = Σ_j (|S_j| / N) · Q(S_j), with the isoperimetric quotient Q(S) = 4π|S| / P(S)².

    Schick, Fischer, Stiefelhagen, "Measuring and evaluating the compactness of superpixels", ICPR
    2012. P(S) is the length of the segment's outline in pixel edges, the image border included, so a
    k x k square segment has Q = π/4 wherever it lies and a regular grid of square cells scores π/4.
    A label split into several pieces is one segment (its perimeters add up). Uses all pixels.
    """
    segments = np.asarray(segments)
    if segments.ndim != 2:
        raise InputError(f'segments must be a 2-D map, got shape {segments.shape}')
    _, ids = np.unique(segments, return_inverse=True)
    ids = ids.reshape(segments.shape)
    n = int(ids.max()) + 1
    area = np.bincount(ids.ravel(), minlength=n).astype(np.float64)
    perimeter = np.zeros(n)
    for a, b in ((ids[1:, :], ids[:-1, :]), (ids[:, 1:], ids[:, :-1])):
        edge = a != b
        perimeter += np.bincount(a[edge], minlength=n) + np.bincount(b[edge], minlength=n)
    for border in (ids[0, :], ids[-1, :], ids[:, 0], ids[:, -1]):
        perimeter += np.bincount(border, minlength=n)
    quotient = 4 * math.pi * area / perimeter ** 2
    return float((area / area.sum() * quotient).sum())


def num_segments(segments: np.ndarray) -> int:
    """The number of distinct labels in a segment map."""
    return int(np.unique(np.asarray(segments)).size)


def oracle_confusion(segments: np.ndarray, gt: np.ndarray, ignore_index: Optional[int] = 255) -> Counter:
    """Pixel counts {(true label, oracle label): n} of the oracle labelling: every segment takes the
    majority ground-truth label of its non-ignored pixels (ties to the smallest label value).

    The "oracle" of the SPFormer paper's zero-shot evaluation (Mei et al., "SPFormer: Enhancing Vision
    Transformer with Superpixel Representation", arXiv 2401.02931; docs/design.md §3): the best semantic
    segmentation the superpixels allow. Sum these counters over a dataset and pass the total to
    :func:`mean_iou_and_accuracy`.
    """
    table, regions = _contingency(segments, gt, ignore_index)
    if not table.size:
        return Counter()
    majority = regions[table.argmax(axis=1)]
    j, i = np.nonzero(table)
    out = Counter()
    for true, pred, n in zip(regions[i].tolist(), majority[j].tolist(), table[j, i].tolist()):
        out[true, pred] += n
    return out


def mean_iou_and_accuracy(confusion: Mapping[Tuple[int, int], int]) -> Tuple[float, float]:
    """(mIoU, mAcc) of a confusion {(true, predicted): pixels}.

    IoU_c = TP_c / (TP_c + FP_c + FN_c), averaged over the classes that occur (as truth or
    prediction); Acc_c = TP_c / (TP_c + FN_c), averaged over the classes present in the truth
    (Everingham et al., "The PASCAL Visual Object Classes (VOC) challenge", IJCV 2010). NaN if empty.
    """
    tp, truth, pred = Counter(), Counter(), Counter()
    for (t, p), n in confusion.items():
        truth[t] += n
        pred[p] += n
        if t == p:
            tp[t] += n
    classes = set(truth) | set(pred)
    if not classes:
        return math.nan, math.nan
    iou = [tp[c] / (truth[c] + pred[c] - tp[c]) for c in classes]
    acc = [tp[c] / truth[c] for c in classes if truth[c]]
    return float(np.mean(iou)), float(np.mean(acc))


def score_segmentation(segments: np.ndarray, gt: np.ndarray, ignore_index: Optional[int] = 255,
                       tolerance: int = 2) -> Dict[str, object]:
    """All ground-truth metrics of one segment map against one ground truth.

    Returns a dict with ``asa``, ``boundary_recall``, ``undersegmentation_error`` (floats) and
    ``confusion`` (:func:`oracle_confusion`).
    """
    return dict(
        asa=achievable_segmentation_accuracy(segments, gt, ignore_index),
        boundary_recall=boundary_recall(segments, gt, tolerance, ignore_index),
        undersegmentation_error=undersegmentation_error(segments, gt, ignore_index),
        confusion=oracle_confusion(segments, gt, ignore_index),
    )


# --------------------------------------------------------------------------------------------------
# Resizing (the resolution policy of the module docstring)
# --------------------------------------------------------------------------------------------------

def resize_nearest(labels: np.ndarray, size: Tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize of a (..., H, W) label map to (..., *size), sampling pixel centres."""
    labels = np.asarray(labels)
    H, W = labels.shape[-2:]
    h, w = size
    if (H, W) == (h, w):
        return labels
    ys = ((np.arange(h) + 0.5) * H / h).astype(np.int64)
    xs = ((np.arange(w) + 0.5) * W / w).astype(np.int64)
    return labels[..., ys[:, None], xs[None, :]]


def resize_image(image: np.ndarray, size: Tuple[int, int]) -> np.ndarray:
    """(H, W, 3) uint8 image -> (*size, 3), bicubic (PIL, antialiased when shrinking)."""
    from PIL import Image
    if tuple(image.shape[:2]) == tuple(size):
        return np.asarray(image)
    return np.asarray(Image.fromarray(np.asarray(image)).resize((size[1], size[0]), Image.BICUBIC))


# --------------------------------------------------------------------------------------------------
# Methods
# --------------------------------------------------------------------------------------------------

@dataclass
class Segmentation:
    """What a :class:`Segmenter` returns for a batch.

    Attributes:
        labels: (B, H, W) int64 segment maps that are scored.
        panels: Extra (title, (B, H, W) maps) drawn in the pictures (a model's association heads).
    """
    labels: np.ndarray
    panels: List[Tuple[str, np.ndarray]] = field(default_factory=list)


class Segmenter:
    """A segmentation method: (B, H, W, 3) uint8 images at the input size -> :class:`Segmentation`."""
    name: str = ''
    weights: str = ''  # what the weights are (models), shown in the table header

    def __call__(self, images: np.ndarray) -> Segmentation:
        raise NotImplementedError


class PatchGrid(Segmenter):
    """The regular grid of a ViT: ``rows`` x ``cols`` cells (16x16 px at 224 px for 196 segments)."""

    def __init__(self, segments: int = 196, name: str = 'patch'):
        side = math.isqrt(segments) if segments > 0 else 0
        if side * side != segments:
            raise InputError(f'segments={segments}: the patch grid needs a square number of cells '
                             f'(e.g. 196 = 14x14, 49 = 7x7)')
        self.rows = self.cols = side
        self.name = name

    def __call__(self, images: np.ndarray) -> Segmentation:
        B, H, W = images.shape[:3]
        ys = np.arange(H) * self.rows // H
        xs = np.arange(W) * self.cols // W
        grid = ys[:, None] * self.cols + xs[None, :]
        return Segmentation(np.broadcast_to(grid, (B, H, W)).astype(np.int64))


class Slic(Segmenter):
    """SLIC superpixels (Achanta et al., TPAMI 2012) from :func:`skimage.segmentation.slic`.

    scikit-image's ``n_segments`` only places seeds: connectivity enforcement then merges small
    fragments, which often leaves 20-40% fewer segments than asked for (196 -> 129 on the astronaut
    at 224 px). With ``match_count`` (default) ``n_segments`` is rescaled per image by the ratio
    asked / got, up to ``max_runs`` runs, and the run whose count is closest to ``segments`` is kept.
    """

    def __init__(self, segments: int = 196, compactness: float = 10.0, match_count: bool = True,
                 max_runs: int = 4, name: str = 'slic'):
        if segments < 1:
            raise InputError(f'segments must be >= 1, got {segments}')
        self.segments = segments
        self.compactness = compactness
        self.max_runs = max_runs if match_count else 1
        self.name = name

    def segment(self, image: np.ndarray) -> np.ndarray:
        """(H, W) labels of one (H, W, 3) image, the count closest to ``segments`` of the runs."""
        from skimage.segmentation import slic
        target = self.segments
        asked, runs, best = target, {}, None  # runs: n_segments asked -> segments got
        for _ in range(self.max_runs):
            labels = slic(image, n_segments=asked, compactness=self.compactness, start_label=0, channel_axis=-1)
            got = runs[asked] = int(labels.max()) + 1  # start_label=0 gives consecutive labels
            if best is None or abs(got - target) < abs(best[1] - target):
                best = labels, got
            if got == target:
                break
            below = [(a, g) for a, g in runs.items() if g < target]
            above = [(a, g) for a, g in runs.items() if g > target]
            if below and above:  # bracketed: interpolate between the closest runs on each side
                (a0, g0), (a1, g1) = max(below, key=lambda r: r[1]), min(above, key=lambda r: r[1])
                asked = round(a0 + (a1 - a0) * (target - g0) / (g1 - g0))
            else:  # scale by what is missing
                asked = max(1, round(asked * target / got))
            if asked in runs:
                break
        return best[0]

    def __call__(self, images: np.ndarray) -> Segmentation:
        return Segmentation(np.stack([self.segment(img) for img in images]).astype(np.int64))


def _superpixel_stages(model: torch.nn.Module, x: torch.Tensor, label_upsampling: str) -> List[Dict[str, object]]:
    return [dict(merged=s['labels'], heads=list(s['head_labels'].unbind(1)), grid=tuple(int(v) for v in s['grid']))
            for s in model.forward_superpixels(x, label_upsampling=label_upsampling)]


def _group_stages(model: torch.nn.Module, x: torch.Tensor, label_upsampling: str) -> List[Dict[str, object]]:
    return [dict(merged=g['labels'], heads=list(g['head_labels'].unbind(1)), grid=tuple(int(v) for v in g['grid']),
                 stage=g['stage']) for g in model.forward_groups(x, label_upsampling=label_upsampling)]


def _has_groups(model: torch.nn.Module) -> bool:
    return getattr(model, 'grouping', None) is not None


@dataclass(frozen=True)
class Level:
    """A level of a model's pixel grouping that can be scored.

    Attributes:
        method: The model method it needs (a model without it has nothing to score at this level).
        stages: (model, normalized input (B, 3, H, W), label upsampling: ``'bilinear'`` or ``'repeat'``, see
            ``SPFormer.forward_superpixels``) -> one dict per stage with ``merged`` (B, H, W)
            int64 labels of the merged heads, ``heads`` (a list of (B, H, W) labels, one per head)
            and ``grid`` (h, w), the token grid (h * w segments at most); optionally ``stage``, the
            model's 1-based stage the entry comes from (default: its position in the list + 1).
        noun: What its segments are called in titles.
        available: Whether a model with the method has this level (default: any model has).
        missing: What to say when it has not.
    """
    method: str
    stages: Callable[[torch.nn.Module, torch.Tensor, str], List[Dict[str, object]]]
    noun: str
    available: Callable[[torch.nn.Module], bool] = lambda model: True
    missing: str = ''


# Levels of a model that can be scored: superpixels (every SPFormer), and the pixel -> group labels of
# the hierarchical models (every pixel takes the group of its superpixel; docs/design.md §2).
LEVELS: Dict[str, Level] = {
    'superpixel': Level('forward_superpixels', _superpixel_stages, 'superpixels'),
    'group': Level('forward_groups', _group_stages, 'groups', _has_groups,
                   "it is not a hierarchical model (grouping=None); --level group needs one of "
                   "timm.list_models('spformer_hier*')"),
}


class ModelSuperpixels(Segmenter):
    """A model's hard segments at one level and stage: the merged heads, or one association head.

    Args:
        model: The model (eval mode); it must have the level's method (``forward_superpixels``).
        name: Name in tables and pictures (the model spec).
        stage: 1-based stage, or -1 for the last (default, docs/design.md §3).
        head: 'merged' (default: argmax of the head-merged association) or a 1-based head number.
        level: A key of :data:`LEVELS`.
        weights: Where the weights come from (shown in the table header).
        device: Where the model runs.
        trained: False for a random init: its picture panels are marked UNTRAINED.
        label_upsampling: How the hard maps reach input resolution: ``'bilinear'`` (the association
            logits resampled in superpixel perspective, as the SPFormer authors do; default) or
            ``'repeat'`` (the pixel stream's argmax repeated); see ``SPFormer.forward_superpixels``.
    """

    def __init__(self, model: torch.nn.Module, name: str, stage: int = -1, head: Union[str, int] = 'merged',
                 level: str = 'superpixel', weights: str = '', device: Union[str, torch.device] = 'cpu',
                 trained: bool = True, label_upsampling: str = 'bilinear'):
        from timm.data import resolve_data_config
        if level not in LEVELS:
            raise InputError(f'level must be one of {", ".join(LEVELS)}; got {level!r}')
        self.level = LEVELS[level]
        if not callable(getattr(model, self.level.method, None)):
            raise InputError(
                f'--model {name!r}: {type(model).__name__} has no {self.level.method}(), so it makes no '
                f'{self.level.noun} to score; use an SPFormer (timm.list_models("spformer*")) or only '
                f'the patch / slic methods')
        if not self.level.available(model):
            raise InputError(f'--model {name!r}: it makes no {self.level.noun} to score: {self.level.missing}')
        if label_upsampling not in ('bilinear', 'repeat'):
            raise InputError(f"--label-upsampling {label_upsampling!r}: expected 'bilinear' or 'repeat'")
        self.model, self.weights, self.device, self.trained = model, weights, device, trained
        self.label_upsampling = label_upsampling
        cfg = resolve_data_config({}, model=model)
        self.input_size = tuple(cfg['input_size'][1:])
        self.mean = torch.tensor(cfg['mean']).view(1, 3, 1, 1)
        self.std = torch.tensor(cfg['std']).view(1, 3, 1, 1)

        # A probe at the input size: how many stages and heads, and the token grid.
        probe = self.stages(np.zeros((1, *self.input_size, 3), np.uint8))
        n_stages = len(probe)
        numbers = [int(entry.get('stage', i + 1)) for i, entry in enumerate(probe)]  # the model's stage numbers
        if numbers == list(range(1, n_stages + 1)):
            if stage == 0 or not -n_stages <= stage <= n_stages:
                raise InputError(f'--stage {stage}: {name} has {n_stages} stages; expected 1..{n_stages} or -1 (last)')
            self.stage = stage - 1 if stage > 0 else n_stages + stage
        elif stage in numbers or -n_stages <= stage < 0:
            self.stage = numbers.index(stage) if stage > 0 else n_stages + stage
        else:
            raise InputError(f'--stage {stage}: {name} has {self.level.noun} at stage '
                             f'{", ".join(map(str, numbers))} only; expected that or -1 (last)')
        self.stage_number = numbers[self.stage]
        self.num_heads = len(probe[self.stage]['heads'])
        if head != 'merged':
            if isinstance(head, str) and not head.isdigit():
                raise InputError(f"--head {head!r}: expected 'merged' or a head number 1..{self.num_heads}")
            head = int(head)
            if not 1 <= head <= self.num_heads:
                raise InputError(f'--head {head}: {name} has {self.num_heads} association heads; '
                                 f"expected 'merged' or 1..{self.num_heads}")
        self.head = head
        self.grid = probe[self.stage]['grid']
        self.tokens = self.grid[0] * self.grid[1]
        details = [] if stage == -1 or self.stage == n_stages - 1 else [f'stage {self.stage_number}']
        details += [] if head == 'merged' else [f'head {head}']
        details += [] if level == 'superpixel' else [level]
        self.name = f'{name} ({", ".join(details)})' if details else name

    def stages(self, images: np.ndarray) -> List[Dict[str, object]]:
        """The level's per-stage label dicts (see :class:`Level`) of (B, H, W, 3) uint8 images at the input size."""
        x = torch.tensor(np.asarray(images, np.uint8))  # a copy: the images may be read-only
        x = x.permute(0, 3, 1, 2).float().div(255)
        x = ((x - self.mean) / self.std).to(self.device)
        with torch.inference_mode():
            return self.level.stages(self.model, x, self.label_upsampling)

    def __call__(self, images: np.ndarray) -> Segmentation:
        stage = self.stages(images)[self.stage]
        heads = [h.cpu().numpy() for h in stage['heads']]
        merged = stage['merged'].cpu().numpy()
        labels = merged if self.head == 'merged' else heads[self.head - 1]
        panels = [(f'{self.name}\nhead {m + 1}', h) for m, h in enumerate(heads)]
        if self.head != 'merged':
            panels.insert(0, (f'{self.name}\nmerged heads', merged))
        return Segmentation(labels.astype(np.int64), panels)


# --------------------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------------------

METRICS = ('segments', 'miou', 'macc', 'asa', 'boundary_recall', 'undersegmentation_error', 'compactness')


@dataclass
class EvalResult:
    """What :func:`evaluate` measured.

    Attributes:
        summary: One dict per method: ``method``, ``weights``, the dataset values of :data:`METRICS`
            (fractions in [0, 1]; ``segments`` is the mean count per image), ``seconds_per_image``
            (segmentation only) and ``images``.
        per_image: One dict per (image, method): ``image``, ``method`` and the per-image metrics
            (``miou``/``macc`` only where labels are per-image segments).
        config: How it was run (dataset, sizes, policy).
        pictures: Paths of the PNGs written.
    """
    summary: List[Dict[str, object]]
    per_image: List[Dict[str, object]]
    config: Dict[str, object]
    pictures: List[str]


class _Accumulator:
    """Per-method running scores over a dataset."""

    def __init__(self, label_kind: str):
        self.label_kind = label_kind
        self.confusion = Counter()
        self.rows: List[Dict[str, object]] = []
        self.seconds = 0.0

    def add(self, name: str, segments: np.ndarray, ground_truths: Sequence[np.ndarray],
            ignore_index: Optional[int], tolerance: int, used: int) -> Dict[str, object]:
        scores = [score_segmentation(segments, gt, ignore_index, tolerance) for gt in ground_truths]
        row = dict(image=name, segments=used, compactness=compactness(segments))
        for key in ('asa', 'boundary_recall', 'undersegmentation_error'):
            row[key] = _nanmean([s[key] for s in scores])
        if self.label_kind == 'class':
            for s in scores:
                self.confusion.update(s['confusion'])
        else:  # per-image segment ids: mIoU per ground truth, averaged over the humans
            per_gt = [mean_iou_and_accuracy(s['confusion']) for s in scores]
            row['miou'] = _nanmean([m for m, _ in per_gt])
            row['macc'] = _nanmean([a for _, a in per_gt])
        self.rows.append(row)
        return row

    def summary(self) -> Dict[str, object]:
        out = {key: _nanmean([r[key] for r in self.rows]) for key in METRICS if key not in ('miou', 'macc')}
        if self.label_kind == 'class':
            out['miou'], out['macc'] = mean_iou_and_accuracy(self.confusion)
        else:
            out['miou'] = _nanmean([r['miou'] for r in self.rows])
            out['macc'] = _nanmean([r['macc'] for r in self.rows])
        out = {key: out[key] for key in METRICS}
        out['seconds_per_image'] = self.seconds / max(1, len(self.rows))
        out['images'] = len(self.rows)
        return out


def _nanmean(values: Sequence[float]) -> float:
    values = [v for v in values if not (isinstance(v, float) and math.isnan(v))]
    return float(np.mean(values)) if values else math.nan


def evaluate(
        dataset: SegmentationDataset,
        methods: Sequence[Segmenter],
        input_size: Tuple[int, int] = (224, 224),
        score_at: str = 'gt',
        tolerance: int = 2,
        limit: Optional[int] = None,
        batch_size: int = 8,
        pictures: int = 0,
        picture_dir: Optional[str] = None,
        progress: bool = True,
) -> EvalResult:
    """Segment every image with every method and score the segments against the ground truth.

    Args:
        dataset: From :func:`spformer.datasets.open_dataset`.
        methods: The segmenters; all see the same image resized to ``input_size``.
        input_size: (H, W) the images are resized to (the models' input size).
        score_at: 'gt' (segment maps resized to the ground truth, nearest) or 'input' (ground truth
            resized to ``input_size``, nearest); see the module docstring.
        tolerance: Boundary recall tolerance in pixels (at the scoring resolution).
        limit: Evaluate only the first ``limit`` images.
        batch_size: Images segmented at once (the models run them as one batch).
        pictures: Write a comparison PNG for each of the first ``pictures`` images into ``picture_dir``.
        progress: Show a progress bar (stderr).
    """
    from tqdm import tqdm

    if score_at not in ('gt', 'input'):
        raise InputError(f"score_at must be 'gt' (segments resized to the ground truth) or 'input' "
                         f"(ground truth resized to the input size); got {score_at!r}")
    if not methods:
        raise InputError('no methods to evaluate: give at least one model or baseline (patch, slic)')
    names = [m.name for m in methods]
    if len(set(names)) != len(names):
        raise InputError(f'methods must have distinct names; got {names}')
    if limit is not None and limit < 1:
        raise InputError(f'limit must be >= 1 image, got {limit}')
    if batch_size < 1:
        raise InputError(f'batch_size must be >= 1, got {batch_size}')
    if pictures and picture_dir is None:
        raise InputError('pictures > 0 needs a picture_dir to write them into')
    for m in methods:
        if getattr(m, 'input_size', tuple(input_size)) != tuple(input_size):
            raise InputError(f'{m.name} takes {m.input_size[0]}x{m.input_size[1]} inputs, but input_size is '
                             f'{input_size[0]}x{input_size[1]}; evaluate models of other input sizes separately')
    count = len(dataset) if limit is None else min(limit, len(dataset))
    if count == 0:
        raise InputError(f'dataset {dataset.describe()} holds no images')
    if pictures:
        os.makedirs(picture_dir, exist_ok=True)

    accumulators = {m.name: _Accumulator(dataset.label_kind) for m in methods}
    per_image, written = [], []
    bar = tqdm(total=count, desc='images', unit='img', disable=not progress, file=sys.stderr)
    for start in range(0, count, batch_size):
        samples = [dataset[i] for i in range(start, min(start + batch_size, count))]
        batch = np.stack([resize_image(s.image, input_size) for s in samples])
        outputs = {}
        for m in methods:
            t = time.perf_counter()
            outputs[m.name] = m(batch)
            accumulators[m.name].seconds += time.perf_counter() - t
        for b, sample in enumerate(samples):
            index = start + b
            if score_at == 'gt':
                size = sample.image.shape[:2]
                image, gts = sample.image, sample.ground_truths
            else:
                size = tuple(input_size)
                image, gts = batch[b], [resize_nearest(gt, size) for gt in sample.ground_truths]
            scored, panels = [], []
            for m in methods:
                out = outputs[m.name]
                labels = resize_nearest(out.labels[b], size)
                row = accumulators[m.name].add(sample.name, labels, gts, dataset.ignore_index, tolerance,
                                               used=num_segments(out.labels[b]))
                per_image.append(dict(image=sample.name, method=m.name,
                                      **{k: v for k, v in row.items() if k != 'image'}))
                if index < pictures:
                    scored.append((f'{m.name}{_UNTRAINED_MARK if not getattr(m, "trained", True) else ""}\n'
                                   f'{row["segments"]} segments, ASA {row["asa"]:.1%}, '
                                   f'BR {row["boundary_recall"]:.1%}', labels))
                    panels += [(title, resize_nearest(p[b], size)) for title, p in out.panels]
            if index < pictures:
                from spformer.visualize import save_comparison_figure
                path = os.path.join(picture_dir, f'{index:03d}_{_safe(sample.name)}.png')
                save_comparison_figure(image, gts[0], scored + panels, path,
                                       title=f'{sample.name} ({dataset.layout}; scored at '
                                             f'{size[1]}x{size[0]})', ignore_index=dataset.ignore_index)
                written.append(path)
            bar.update(1)
    bar.close()

    summary = []
    for m in methods:
        row = dict(method=m.name, weights=m.weights or '-', **accumulators[m.name].summary())
        summary.append(row)
    config = dict(
        dataset=dataset.root, layout=dataset.layout, split=dataset.split, images=count,
        label_kind=dataset.label_kind, ignore_index=dataset.ignore_index,
        input_size=list(input_size), score_at=score_at, boundary_tolerance=tolerance,
        methods=[m.name for m in methods],
    )
    return EvalResult(summary, per_image, config, written)


# Picture panels of a model with random weights say so (its table row's weights column does too).
_UNTRAINED_MARK = ' (UNTRAINED)'


def _safe(name: str) -> str:
    return ''.join(c if c.isalnum() or c in '-_.' else '_' for c in name)


# --------------------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------------------

_COLUMNS = (  # key, header, format
    ('segments', 'segments', '{:.1f}'),
    ('miou', 'mIoU %', '{:.1%}'),
    ('macc', 'mAcc %', '{:.1%}'),
    ('asa', 'ASA %', '{:.1%}'),
    ('boundary_recall', 'BR %', '{:.1%}'),
    ('undersegmentation_error', 'UE %', '{:.1%}'),
    ('compactness', 'CO', '{:.3f}'),
    ('seconds_per_image', 's/img', '{:.3f}'),
)


def format_table(summary: Sequence[Mapping[str, object]]) -> str:
    """The summary as a Markdown table (percentages without the % sign, as in the paper)."""
    lines = ['| method | ' + ' | '.join(h for _, h, _ in _COLUMNS) + ' |',
             '|---|' + '---:|' * len(_COLUMNS)]
    for row in summary:
        cells = []
        for key, _, fmt in _COLUMNS:
            v = row[key]
            cells.append('n/a' if isinstance(v, float) and math.isnan(v) else fmt.format(v).rstrip('%'))
        lines.append(f'| {row["method"]} | ' + ' | '.join(cells) + ' |')
    return '\n'.join(lines)


def write_results(result: EvalResult, out_dir: str) -> List[str]:
    """results.csv, results.json (config, summary, per image) and per_image.csv in ``out_dir``."""
    os.makedirs(out_dir, exist_ok=True)
    paths = [os.path.join(out_dir, f) for f in ('results.csv', 'results.json', 'per_image.csv')]
    with open(paths[0], 'w', newline='') as f:
        writer = csv.DictWriter(f, fieldnames=list(result.summary[0]))
        writer.writeheader()
        writer.writerows(result.summary)
    with open(paths[1], 'w') as f:
        json.dump(_json_safe(dict(config=result.config, summary=result.summary, per_image=result.per_image,
                                  pictures=result.pictures)), f, indent=1)
    fields = list(dict.fromkeys(k for row in result.per_image for k in row))
    with open(paths[2], 'w', newline='') as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(result.per_image)
    return paths


def _json_safe(obj):
    """NaN -> None (JSON has no NaN)."""
    if isinstance(obj, float) and math.isnan(obj):
        return None
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj


# --------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------

def _parser() -> argparse.ArgumentParser:
    from spformer.cli import DEBUG_HELP
    p = argparse.ArgumentParser(
        prog='spformer-eval-superpixels',
        description='Score superpixels against segmentation ground truth: models beside the patch grid and SLIC '
                    'at the same number of segments (oracle mIoU/mAcc, ASA, boundary recall, '
                    'undersegmentation error, compactness). Images are read by spformer.images (16-bit PNG/TIFF '
                    'scaled by their full range, not clipped).',
        epilog=DEBUG_HELP)
    p.add_argument('dataset', help='dataset folder: Pascal VOC 2012, BSDS500, or images/ + labels/')
    p.add_argument('--layout', default='auto', choices=['auto', 'voc', 'bsds', 'folder'],
                   help='dataset layout (default: detect)')
    p.add_argument('--split', default=None, help="split: VOC 'val' (default), 'train'; BSDS500 'test' (default), 'val'")
    p.add_argument('--model', action='append', default=[], metavar='SPEC',
                   help="a model to score (repeatable): registered name, 'hf-hub:ORG/REPO', a training folder "
                        "('local-dir:FOLDER' or FOLDER), 'NAME=FILE.safetensors', or FILE.safetensors beside its "
                        "config.json")
    p.add_argument('--methods', nargs='*', default=['patch', 'slic'], choices=['patch', 'slic'],
                   help='baselines (default: patch slic; give the flag alone for none)')
    p.add_argument('--stage', type=int, default=-1, help='model stage, 1-based (default: -1, the last)')
    p.add_argument('--head', default='merged', help="'merged' (default) or an association head number, 1-based")
    p.add_argument('--level', default='superpixel', choices=list(LEVELS), help='what to score (default: %(default)s)')
    p.add_argument('--label-upsampling', default='bilinear', choices=['bilinear', 'repeat'],
                   help="how a model's hard maps reach the input resolution: 'bilinear' resamples the association "
                        "logits in superpixel perspective, as the SPFormer authors do; 'repeat' repeats the pixel "
                        "stream's argmax (boundaries step by its stride) (default: %(default)s)")
    p.add_argument('--segments', type=int, default=None,
                   help="segments of the baselines (default: the models' token count, else 196)")
    p.add_argument('--input-size', type=int, default=None,
                   help="side of the square input the images are resized to "
                        "(default: the models' input size, else 224)")
    p.add_argument('--score-at', default='gt', choices=['gt', 'input'],
                   help="'gt': resize segment maps to the ground truth (nearest; default); "
                        "'input': resize the ground truth to the input size (nearest)")
    p.add_argument('--tolerance', type=int, default=2, help='boundary recall tolerance in pixels (default: 2)')
    p.add_argument('--ignore-index', default='255',
                   help="label of pixels to skip for voc/folder, or 'none' (default: 255)")
    p.add_argument('--slic-compactness', type=float, default=10.0, help='SLIC compactness (default: 10)')
    p.add_argument('--slic-runs', type=int, default=4,
                   help="SLIC runs per image to match the segment count (default: 4; 1: scikit-image's n_segments "
                        "as is, which often leaves 20-40%% fewer segments)")
    p.add_argument('--limit', type=int, default=None, help='evaluate only the first N images')
    p.add_argument('--batch-size', type=int, default=8, help='images per model batch (default: 8)')
    p.add_argument('--pictures', type=int, default=4, help='comparison PNGs for the first N images (default: 4)')
    p.add_argument('--out-dir', default='superpixel_eval',
                   help='where results.csv, results.json, per_image.csv and pictures/ go (default: %(default)s)')
    p.add_argument('--device', default='cpu', help='torch device (default: cpu)')
    p.add_argument('--seed', type=int, default=0, help='seed of the random init of untrained models')
    p.add_argument('--no-progress', action='store_true', help='no progress bar')
    return p


def main(argv: Optional[List[str]] = None) -> int:
    """spformer-eval-superpixels: errors the user can fix (a bad argument, dataset folder or image, a model
    that cannot be loaded, an --out-dir that cannot be written) end it with one line naming the file or
    argument (:func:`spformer.cli.run_main`; ``SPFORMER_DEBUG=1`` for the traceback)."""
    from spformer.cli import run_main
    args = _parser().parse_args(argv)
    return run_main('spformer-eval-superpixels', _run, args)


def _run(args: argparse.Namespace) -> int:
    if args.ignore_index.lower() == 'none':
        ignore_index = None
    elif args.ignore_index.isdigit():
        ignore_index = int(args.ignore_index)
    else:
        raise InputError(f"--ignore-index {args.ignore_index!r}: expected a label value (e.g. 255) or 'none'")
    for flag, value, low in (('--tolerance', args.tolerance, 0), ('--pictures', args.pictures, 0),
                             ('--batch-size', args.batch_size, 1), ('--segments', args.segments, 1),
                             ('--slic-runs', args.slic_runs, 1),
                             ('--input-size', args.input_size, 1), ('--limit', args.limit, 1)):
        if value is not None and value < low:
            raise InputError(f'{flag} {value}: expected an integer >= {low}')
    if not args.model and not args.methods:
        raise InputError('nothing to evaluate: give --model SPEC and/or --methods patch slic')
    from spformer.cli import check_output_dir
    check_output_dir(args.out_dir, '--out-dir')  # before the models are loaded and the images scored
    dataset = open_dataset(args.dataset, args.layout, args.split, ignore_index)

    models: List[ModelSuperpixels] = []
    for spec in args.model:
        loaded = load_model(spec, argument='--model', seed=args.seed, device=args.device)
        models.append(ModelSuperpixels(loaded.model.eval(), spec, args.stage, args.head, args.level, loaded.weights,
                                       args.device, trained=loaded.trained, label_upsampling=args.label_upsampling))
    if models:
        sizes = {m.input_size for m in models}
        if len(sizes) > 1:
            listed = ', '.join(f'{m.name}: {m.input_size}' for m in models)
            raise InputError(f'--model: the models take different input sizes ({listed}); '
                             f'evaluate them in separate runs so the baselines match each')
        input_size = sizes.pop()
        if args.input_size is not None and (args.input_size, args.input_size) != input_size:
            raise InputError(f'--input-size {args.input_size}: the models take {input_size[0]}x{input_size[1]}; '
                             f'leave --input-size out or make it match')
        tokens = {m.tokens for m in models}
        if args.segments is None and len(tokens) > 1:
            listed = ', '.join(f'{m.name}: {m.tokens}' for m in models)
            raise InputError(f'--model: the models use different token counts ({listed}); '
                             f'give --segments N for the baselines or evaluate them separately')
        segments = args.segments if args.segments is not None else tokens.pop()
    else:
        input_size = (args.input_size or 224,) * 2
        segments = args.segments or 196

    baselines: List[Segmenter] = []
    for method in dict.fromkeys(args.methods):
        baselines.append(PatchGrid(segments) if method == 'patch' else
                         Slic(segments, args.slic_compactness, max_runs=args.slic_runs))

    print(f'dataset   : {dataset.describe()}')
    print(f'input     : every image resized to {input_size[1]}x{input_size[0]} (bicubic); ' + (
        'segment maps resized to the ground truth with nearest neighbour (--score-at gt)' if args.score_at == 'gt'
        else 'ground truth resized to the input with nearest neighbour (--score-at input)'))
    if baselines:
        print(f'baselines : {", ".join(m.name for m in baselines)} with {segments} segments')
    untrained = False
    for m in models:
        print(f'model     : {m.name}: {m.weights}; {m.level.noun} of stage {m.stage_number}, '
              f'{"merged heads" if m.head == "merged" else f"head {m.head}"}, {m.tokens} tokens, hard maps '
              f'{"resampled in superpixel perspective" if m.label_upsampling == "bilinear" else "repeated"} to the '
              f'input (--label-upsampling {m.label_upsampling})')
        untrained |= not m.trained
    if untrained:
        print('!!  UNTRAINED weights: their superpixels come from a random init and say nothing about the method.')

    picture_dir = os.path.join(args.out_dir, 'pictures')
    result = evaluate(dataset, baselines + models, input_size, args.score_at, args.tolerance, args.limit,
                      args.batch_size, args.pictures, picture_dir, progress=not args.no_progress)
    result.config.update(segments=segments, weights={m.name: m.weights for m in models},
                         label_upsampling=args.label_upsampling if models else None,
                         slic=dict(compactness=args.slic_compactness, runs=args.slic_runs)
                         if 'slic' in args.methods else None)
    paths = write_results(result, args.out_dir)
    print()
    print(format_table(result.summary))
    print()
    pooled = 'one confusion matrix over the dataset' if dataset.label_kind == 'class' else 'per ground truth, averaged'
    print(f'mIoU/mAcc: oracle (majority label per segment), {pooled}; '
          f'BR: tolerance {args.tolerance} px; UE: Neubert-Protzel; CO: Schick et al.; '
          f'segments: mean used per image.')
    pictures = f' and {len(result.pictures)} pictures in {picture_dir}' if result.pictures else ''
    print(f'wrote     : {", ".join(paths)}{pictures}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
