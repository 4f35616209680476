"""Deprecated alias of :mod:`spformer.eval` (kept for one release): superpixel evaluation now lives in
the package ``spformer.eval`` (metrics, datasets, segmenters, evaluation, cli). Every public name of
the old module is importable from here; ``python -m spformer.superpixel_eval`` still runs the
spformer-eval-superpixels command."""
import sys
import warnings

from spformer.eval import (
    achievable_segmentation_accuracy, boundary_map, boundary_recall, BSDS500, compactness, DatasetError,
    EvalResult, evaluate, format_table, InputError, LabelFolder, LAYOUTS, Level, LEVELS,
    mean_iou_and_accuracy, METRICS, ModelSuperpixels, num_segments, open_dataset, oracle_confusion,
    PatchGrid, read_image, resize_image, resize_nearest, Sample, score_segmentation, Segmentation,
    SegmentationDataset, Segmenter, Slic, undersegmentation_error, VOCSegmentation, write_results,
    write_shapes_dataset,
)
from spformer.eval.cli import main

__all__ = [
    'achievable_segmentation_accuracy', 'boundary_recall', 'undersegmentation_error', 'compactness',
    'num_segments', 'oracle_confusion', 'mean_iou_and_accuracy', 'score_segmentation', 'boundary_map',
    'InputError', 'Segmenter', 'Segmentation', 'PatchGrid', 'Slic', 'ModelSuperpixels', 'Level', 'LEVELS',
    'resize_nearest', 'resize_image', 'evaluate', 'EvalResult', 'METRICS', 'format_table', 'write_results',
    'Sample', 'SegmentationDataset', 'VOCSegmentation', 'BSDS500', 'LabelFolder', 'DatasetError',
    'open_dataset', 'LAYOUTS', 'read_image', 'write_shapes_dataset', 'main',
]

warnings.warn('spformer.superpixel_eval is deprecated and will be removed in the next release: '
              'import spformer.eval instead', FutureWarning, stacklevel=2)

if __name__ == '__main__':
    sys.exit(main())
