"""Deprecated alias of :mod:`spformer.eval.datasets` (kept for one release): the segmentation dataset
readers moved into the evaluation package."""
import warnings

from spformer.eval.datasets import (
    BSDS500, DatasetError, ImageReadError, LabelFolder, LAYOUTS, open_dataset, read_image, Sample,
    SegmentationDataset, VOCSegmentation, write_shapes_dataset,
)

__all__ = [
    'Sample', 'SegmentationDataset', 'VOCSegmentation', 'BSDS500', 'LabelFolder', 'DatasetError',
    'open_dataset', 'LAYOUTS', 'read_image', 'write_shapes_dataset', 'ImageReadError',
]

warnings.warn('spformer.datasets is deprecated and will be removed in the next release: '
              'import spformer.eval.datasets instead', FutureWarning, stacklevel=2)
