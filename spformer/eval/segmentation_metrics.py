"""Semantic segmentation metrics: a confusion matrix and what it gives (IoU per class, mIoU, pixel accuracy).

Pure functions of label maps (torch tensors or numpy arrays, on any device); nothing here builds a model
or reads a file. Rows of a confusion matrix are the ground truth, columns the prediction: ``confusion[i, j]``
counts the pixels of class i predicted as j; pixels whose ground truth is ``ignore_index`` are left out.

- :func:`confusion_matrix`: one batch (or one image);
- :class:`ConfusionMatrix`: accumulated over batches, for whole-set scores (the mIoU of a dataset is
  computed from the summed confusion, not averaged over images);
- :func:`iou_per_class` (NaN for a class absent from both ground truth and prediction), :func:`mean_iou`
  (the mean over the classes that are not NaN), :func:`pixel_accuracy`.
"""
import math
from typing import Optional, Union

import numpy as np
import torch

from .metrics import InputError

__all__ = ['confusion_matrix', 'iou_per_class', 'mean_iou', 'pixel_accuracy', 'ConfusionMatrix']

Labels = Union[torch.Tensor, np.ndarray]


def _labels(name: str, x: Labels, device=None) -> torch.Tensor:
    x = torch.as_tensor(x, device=device)
    if x.is_floating_point() or x.is_complex() or x.dtype == torch.bool:
        hint = ' (for logits, pass logits.argmax(1))' if name == 'pred' else ''
        raise InputError(f'{name} must hold integer class ids, got dtype {x.dtype}{hint}')
    return x


def _check_num_classes(num_classes) -> int:
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise InputError(f'num_classes must be an int >= 1, got {num_classes!r}')
    return num_classes


def _outside(name: str, values: torch.Tensor, num_classes: int, extra: str = '') -> InputError:
    bad = torch.unique(values).tolist()
    shown = ', '.join(str(v) for v in bad[:10]) + (', ...' if len(bad) > 10 else '')
    return InputError(f'{name} holds values outside [0, {num_classes}) for {num_classes} classes: {shown}{extra}')


def confusion_matrix(pred: Labels, target: Labels, num_classes: int, ignore_index: Optional[int] = 255) -> torch.Tensor:
    """(num_classes, num_classes) int64 counts, rows = ground truth (``target``), columns = prediction (``pred``).

    Args:
        pred: Predicted class ids, any shape (e.g. (B, H, W) = ``logits.argmax(1)``).
        target: Ground truth of the same shape: class ids in [0, num_classes) or ``ignore_index``.
        num_classes: Number of classes.
        ignore_index: Ground-truth label of pixels to leave out (None: none). Predictions are never ignored:
            a predicted value outside [0, num_classes) at a counted pixel is an error.

    Returns:
        An int64 tensor on ``pred``'s device.
    """
    num_classes = _check_num_classes(num_classes)
    pred = _labels('pred', pred)
    target = _labels('target', target, device=pred.device)
    if pred.shape != target.shape:
        raise InputError(f'pred {tuple(pred.shape)} and target {tuple(target.shape)} must have the same shape')
    keep = target != ignore_index if ignore_index is not None else torch.ones_like(target, dtype=torch.bool)
    target, pred = target[keep].long(), pred[keep].long()
    bad = (target < 0) | (target >= num_classes)
    if bool(bad.any()):
        raise _outside('target', target[bad], num_classes, f' (ignore_index={ignore_index} marks pixels to leave out)')
    bad = (pred < 0) | (pred >= num_classes)
    if bool(bad.any()):
        raise _outside('pred', pred[bad], num_classes)
    return torch.bincount(target * num_classes + pred, minlength=num_classes * num_classes).reshape(
        num_classes, num_classes)


def _confusion(confusion: Labels) -> torch.Tensor:
    c = torch.as_tensor(confusion)
    if c.dim() != 2 or c.shape[0] != c.shape[1]:
        raise InputError(f'confusion must be a square (num_classes, num_classes) matrix, got shape {tuple(c.shape)}')
    return c.to(torch.float64)


def iou_per_class(confusion: Labels) -> torch.Tensor:
    """IoU_c = TP / (TP + FP + FN) per class, float64; NaN for a class absent from both ground truth and
    prediction (0 / 0)."""
    c = _confusion(confusion)
    tp = c.diagonal()
    return tp / (c.sum(0) + c.sum(1) - tp)


def mean_iou(confusion: Labels) -> float:
    """The mean of :func:`iou_per_class` over the classes that are not NaN (NaN if all are)."""
    iou = iou_per_class(confusion)
    present = ~iou.isnan()
    return float(iou[present].mean()) if bool(present.any()) else math.nan


def pixel_accuracy(confusion: Labels) -> float:
    """Correct pixels / counted pixels (NaN when none was counted)."""
    c = _confusion(confusion)
    total = float(c.sum())
    return float(c.diagonal().sum()) / total if total else math.nan


class ConfusionMatrix:
    """A confusion matrix summed over batches: ``update(pred, target)`` per batch, then :meth:`mean_iou`,
    :meth:`iou_per_class`, :meth:`pixel_accuracy` of everything seen. ``confusion`` is the (num_classes,
    num_classes) int64 sum (on the device of the first batch; all-reduce it across processes before scoring)."""

    def __init__(self, num_classes: int, ignore_index: Optional[int] = 255):
        self.num_classes = _check_num_classes(num_classes)
        self.ignore_index = ignore_index
        self.confusion = torch.zeros(num_classes, num_classes, dtype=torch.int64)

    def update(self, pred: Labels, target: Labels) -> torch.Tensor:
        """Add one batch; returns its own confusion matrix."""
        batch = confusion_matrix(pred, target, self.num_classes, self.ignore_index)
        if self.confusion.device != batch.device:
            self.confusion = self.confusion.to(batch.device)
        self.confusion += batch
        return batch

    def reset(self):
        self.confusion = torch.zeros_like(self.confusion)

    def iou_per_class(self) -> torch.Tensor:
        return iou_per_class(self.confusion)

    def mean_iou(self) -> float:
        return mean_iou(self.confusion)

    def pixel_accuracy(self) -> float:
        return pixel_accuracy(self.confusion)
