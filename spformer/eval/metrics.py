"""Superpixel quality metrics: pure functions of a segment map and a ground-truth label map.

Notation: segments S_j, ground-truth regions G_i (the pixels of one label value), N the number of
pixels; pixels labelled ``ignore_index`` are left out of N, of every S_j and every G_i (see each
function for the formula and its source):

- :func:`oracle_confusion` / :func:`mean_iou_and_accuracy`: oracle mIoU and mAcc;
- :func:`achievable_segmentation_accuracy` (ASA);
- :func:`boundary_recall` (BR, 2-pixel tolerance);
- :func:`undersegmentation_error` (UE, Neubert–Protzel);
- :func:`compactness` (CO, Schick et al.; ground truth not used, all pixels count);
- :func:`num_segments`: distinct labels in a map.

Inputs are numpy arrays; nothing here reads files, builds models or draws.
"""
import math
from collections import Counter
from typing import Dict, Mapping, Optional, Tuple

import numpy as np

from spformer.cli import ArgumentError

__all__ = [
    'achievable_segmentation_accuracy', 'boundary_recall', 'undersegmentation_error', 'compactness',
    'num_segments', 'oracle_confusion', 'mean_iou_and_accuracy', 'score_segmentation', 'boundary_map',
    'InputError',
]


class InputError(ArgumentError):
    """A bad argument: names the argument, what it got and what it expects (a ValueError; the console
    scripts print it as one line, :func:`spformer.cli.run_main`)."""


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
