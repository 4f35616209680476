"""Score segmentation methods on a dataset: :func:`evaluate`, its :class:`EvalResult`, and the tables and
files it is written to (:func:`format_table`, :func:`write_results`).

Resolution policy (explicit, ``score_at``): every image is resized (bicubic, aspect ratio not kept)
to the model's input size (224x224 for the sp16 models: 196 segments), and all methods segment that
same image. Then either

- ``score_at='gt'`` (default): the segment maps are resized back to the ground truth's resolution with
  nearest neighbour, and scored against the untouched ground truth; or
- ``score_at='input'``: the ground truth is resized to the input size with nearest neighbour, and the
  segment maps are scored as they are.

Nearest neighbour samples pixel centres: output pixel i takes input pixel floor((i + 1/2) * n_in / n_out).

Metrics (:mod:`spformer.eval.metrics`) are computed per image (per ground truth, then averaged over a
BSDS500 image's humans). ``segments`` counts the distinct labels in the method's map at the input size
(a token id split in several pieces is one segment; shrinking to a small ground truth can drop a few
more).

Dataset values: oracle mIoU and mAcc come from one confusion matrix summed over all images when labels
are classes (VOC, folder); for BSDS500, whose segment ids are per image, they are computed per ground
truth and averaged. The other metrics are means over images (images without any ground-truth
boundary have no boundary recall and are left out of its mean).
"""
import csv
import json
import math
import os
import sys
import time
from collections import Counter
from dataclasses import dataclass
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from spformer.eval.datasets import SegmentationDataset
from spformer.eval.metrics import InputError, compactness, mean_iou_and_accuracy, num_segments, score_segmentation
from spformer.eval.segmenters import Segmenter, resize_image, resize_nearest

__all__ = ['evaluate', 'EvalResult', 'METRICS', 'format_table', 'write_results']


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
        dataset: From :func:`spformer.eval.datasets.open_dataset`.
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
                from spformer.pictures import save_comparison_figure
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
