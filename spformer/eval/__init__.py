"""Evaluating superpixels: score a model's superpixels (or groups) against segmentation ground truth,
beside a regular patch grid and SLIC with the same number of segments (docs/superpixels.md).

The modules, in the order data flows through them:

    spformer.eval.metrics      pure metric functions of a segment map and a ground truth (ASA, BR, UE, CO, oracle mIoU)
    spformer.eval.datasets     ground truth on disk: Pascal VOC, BSDS500, a folder of label PNGs
    spformer.eval.segmenters   the methods: PatchGrid, Slic, ModelSuperpixels (a loaded model's hard maps)
    spformer.eval.evaluation   evaluate(): every method on every image, scored; tables and result files
    spformer.eval.cli          the spformer-eval-superpixels command (python -m spformer.eval)

Importing this package loads neither matplotlib (pictures are drawn by :mod:`spformer.pictures`, imported
only when a picture is written) nor the command line or training code.
"""
from .datasets import (
    BSDS500, LAYOUTS, DatasetError, LabelFolder, Sample, SegmentationDataset, VOCSegmentation, open_dataset, read_image,
    write_shapes_dataset,
)
from .evaluation import METRICS, EvalResult, evaluate, format_table, write_results
from .metrics import (
    InputError, achievable_segmentation_accuracy, boundary_map, boundary_recall, compactness, mean_iou_and_accuracy,
    num_segments, oracle_confusion, score_segmentation, undersegmentation_error,
)
from .segmentation_metrics import ConfusionMatrix, confusion_matrix, iou_per_class, mean_iou, pixel_accuracy
from .segmenters import LEVELS, Level, ModelSuperpixels, PatchGrid, Segmentation, Segmenter, Slic, resize_image, \
    resize_nearest

__all__ = [
    'achievable_segmentation_accuracy', 'boundary_recall', 'undersegmentation_error', 'compactness',
    'num_segments', 'oracle_confusion', 'mean_iou_and_accuracy', 'score_segmentation', 'boundary_map', 'InputError',
    'Segmenter', 'Segmentation', 'PatchGrid', 'Slic', 'ModelSuperpixels', 'Level', 'LEVELS', 'resize_nearest',
    'resize_image', 'evaluate', 'EvalResult', 'METRICS', 'format_table', 'write_results',
    'Sample', 'SegmentationDataset', 'VOCSegmentation', 'BSDS500', 'LabelFolder', 'DatasetError', 'open_dataset',
    'LAYOUTS', 'read_image', 'write_shapes_dataset',
    'confusion_matrix', 'iou_per_class', 'mean_iou', 'pixel_accuracy', 'ConfusionMatrix',
]
