"""What train_segmentation.py adds to the training machinery: its flags, segmentation data (folders in the
layouts of :mod:`spformer.eval.datasets`, or a Hugging Face dataset of image/label pictures), paired
augmentation under per-sample seeds, the optimizer's parameter groups, whole-image and sliding-window
inference, validation over the whole set (one confusion matrix, summed over the processes) and the
prediction pictures.

A sample is read as ``(image (H, W, 3) uint8, label (H, W) int64)``, labels being class ids with 255 for
pixels that are not evaluated; a label value outside the classes stops the run naming the file and the
values (:class:`LabelError`). Training samples are augmented (:class:`PairedAugment`: random scale, colour
jitter, pad, random crop, flip) by a numpy generator seeded by (seed, epoch, index), never by the
process-wide RNGs, so a resumed run repeats an uninterrupted one exactly, as train_imagenet.py's does.
"""
import argparse
import ast
import math
import re
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F

from spformer.errors import UserError
from spformer.eval.datasets import ADE20K_CLASSES, CITYSCAPES_CLASSES, VOC_CLASSES, DatasetError, open_dataset
from spformer.eval.segmentation_metrics import ConfusionMatrix, iou_per_class, mean_iou, pixel_accuracy
from spformer.kernels.functional import BACKENDS
from spformer.models.sp_transformer import list_segmentation_models
from spformer.pictures import class_palette, colourize, superpixel_boundaries
from spformer.training.config import (ConfigError, add_accelerate_arguments, add_data_arguments,
                                      add_output_arguments)
from spformer.training.rng import key_seed, rng_isolated

IGNORE_INDEX = 255
LAYOUT_CLASSES = {'cityscapes': CITYSCAPES_CLASSES, 'ade20k': ADE20K_CLASSES, 'voc': VOC_CLASSES}
DEFAULT_VAL_SPLITS = {'cityscapes': 'val', 'ade20k': 'validation', 'voc': 'val', 'folder': 'val'}
DEFAULT_UPDATES = 60000


class LabelError(UserError):
    """A label map that does not fit the classes (values outside them, another size than its image): the
    message names the file or row and the values. Constructible from its message alone (a DataLoader
    worker re-raises it so)."""


# ----------------------------------------------------------------------------------------------------------
# Flags
# ----------------------------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    """train_segmentation.py's flags: the shared data, accelerate and output groups, and its own."""
    p = argparse.ArgumentParser(
        description='Train SP-Transformer (semantic segmentation) with Accelerate: the paper\'s recipe.',
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument('--config', default=None, help='YAML file of defaults (keys are flag names); flags override it')
    g = add_data_arguments(
        p, data_dir_help='dataset folder in --layout (Cityscapes, ADE20K, VOC, or <split>/images + <split>/labels)',
        label_help='label column of --hf-dataset: one picture of class ids per image (255: not evaluated)',
        streaming=False, skip_bad_images=False)
    g.add_argument('--layout', default='auto', choices=['auto', *DEFAULT_VAL_SPLITS],
                   help='layout of --data-dir (auto: detect); with --hf-dataset, cityscapes/ade20k/voc names the '
                        'classes (and ade20k maps 0 to 255, v to v-1)')
    g = p.add_argument_group('model (SP-Transformer, timm-registered)')
    g.add_argument('--model', default='sp_transformer_r50_cityscapes', help=f'one of {list_segmentation_models()}')
    g.add_argument('--num-classes', type=int, default=None, help="None: the dataset's classes")
    g.add_argument('--backbone-pretrained', default='timm', metavar='timm|none|FILE.safetensors|hf-hub:ORG/NAME',
                   help="the backbone's initial weights: timm's published ImageNet weights (downloaded), none, or yours")
    g.add_argument('--decoder', default=None, choices=['superpixel', 'bilinear'],
                   help="None: the model's (superpixel); bilinear: the baseline head (1x1 conv + upsampling)")
    g.add_argument('--model-kwargs', default='', metavar='"KEY=VALUE ..."',
                   help='more SPTransformer arguments, e.g. "neck_dim=128 num_blocks=2 pixel_stride=4 '
                        'img_size=(512,1024)" (values are Python literals)')
    g.add_argument('--drop-path', type=float, default=None, help="stochastic depth; None: the model's (0)")
    g.add_argument('--attn-backend', default=None, choices=BACKENDS, help="None: the model's (auto)")
    g.add_argument('--grad-checkpointing', action='store_true', help='recompute activations in the backward pass')
    g = p.add_argument_group('augmentation (training crops)')
    g.add_argument('--crop-size', type=int, nargs=2, default=[1024, 2048], metavar=('H', 'W'),
                   help='training crop (multiples of the token stride) and the sliding window')
    g.add_argument('--scale-range', type=float, nargs=2, default=[0.5, 2.0], help='random rescaling factors')
    g.add_argument('--hflip', type=float, default=0.5, help='horizontal flip probability')
    g.add_argument('--color-jitter', type=float, default=0.2,
                   help='brightness, contrast and saturation factors drawn from [1 - j, 1 + j] (0: off)')
    g = p.add_argument_group('optimizer and schedule (stepped per optimizer update)')
    g.add_argument('--opt', default='adamw', help='timm optimizer name')
    g.add_argument('--lr', type=float, default=1e-3, help='peak lr of the decoder')
    g.add_argument('--backbone-lr-scale', type=float, default=0.1, help="the backbone's lr, a fraction of --lr")
    g.add_argument('--weight-decay', type=float, default=0.05, help='(not on norms, biases, position embeddings)')
    g.add_argument('--opt-eps', type=float, default=1e-8, help='optimizer epsilon')
    g.add_argument('--opt-betas', type=float, nargs=2, default=[0.9, 0.999], help='(Adam-like optimizers)')
    g.add_argument('--updates', type=int, default=None, help=f'length of training; None: {DEFAULT_UPDATES} unless --epochs')
    g.add_argument('--epochs', type=int, default=None, help='length of training in epochs instead of --updates')
    g.add_argument('--warmup-updates', type=int, default=5000, help='linear warm-up from --warmup-lr')
    g.add_argument('--warmup-lr', type=float, default=0.0, help='lr at the start of the warm-up')
    g.add_argument('--poly-power', type=float, default=0.9, help='lr = min + (peak - min) (1 - update/updates)^power')
    g.add_argument('--min-lr', type=float, default=0.0, help='lr at the end of the schedule')
    g.add_argument('--clip-grad', type=float, default=None, help='clip the gradient norm to this value')
    g.add_argument('--top-k-percent', type=float, default=0.2, help='top-k cross-entropy: the hardest pixels kept')
    g.add_argument('--batch-size', type=int, default=8, help='crops per process (and per accumulation step)')
    g.add_argument('--grad-accum-steps', type=int, default=1, help='batches per optimizer update')
    g.add_argument('--seed', type=int, default=42, help='data order, augmentation and initial weights')
    g = p.add_argument_group('validation')
    g.add_argument('--sliding-window', action='store_true',
                   help='infer in --crop-size windows (logits averaged where they overlap) instead of whole images')
    g.add_argument('--window-overlap', type=float, default=1 / 3, help='overlap of neighbouring windows')
    g.add_argument('--eval-every', type=int, default=5000, help='validate every N updates, and at the end (0: end only)')
    g.add_argument('--picture-images', type=int, default=2, help='validation images in predictions.png (0: none)')
    g.add_argument('--evaluate', default=None, metavar='FOLDER',
                   help="no training: score the weights of a final/ folder on the validation split (written to "
                        "FOLDER/eval_<whole_image|sliding_window>.json)")
    add_accelerate_arguments(p)
    add_output_arguments(p)  # --output ... and --push-to-hub / --hub-private, as train_imagenet.py's
    return p


def parse_model_kwargs(text: str) -> Dict[str, Any]:
    """'neck_dim=64 img_size=(64,128)' -> {'neck_dim': 64, 'img_size': (64, 128)} (values: Python literals,
    else strings)."""
    kwargs = {}
    for item in text.split():
        key, sep, value = item.partition('=')
        if not sep or not re.fullmatch(r'[A-Za-z_]\w*', key):
            raise ConfigError(f'--model-kwargs: {item!r} is not KEY=VALUE; expected e.g. "neck_dim=128 num_blocks=2"')
        try:
            kwargs[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            kwargs[key] = value
    return kwargs


def check_args(args: argparse.Namespace) -> None:
    """The checks that need neither data nor model."""
    if (args.data_dir is None) == (args.hf_dataset is None):
        raise ConfigError(f'--data-dir / --hf-dataset: got data_dir={args.data_dir!r}, hf_dataset={args.hf_dataset!r}; '
                          'expected exactly one of them (a dataset folder or a Hugging Face dataset)')
    if args.resume_without_rng and not args.resume:
        raise ConfigError('--resume-without-rng: got it without --resume; expected --resume latest or a checkpoint folder')
    if args.model not in list_segmentation_models():
        raise ConfigError(f'--model: {args.model!r} is not a segmentation model; expected one of '
                          f'{list_segmentation_models()}')
    if args.updates is not None and args.epochs is not None:
        raise ConfigError(f'--updates / --epochs: got both ({args.updates}, {args.epochs}); expected one length')
    for name in ('batch_size', 'grad_accum_steps', 'log_interval', 'updates', 'epochs'):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise ConfigError(f'--{name.replace("_", "-")}: got {getattr(args, name)}; expected an integer >= 1')
    for name in ('workers', 'checkpoint_every', 'keep_checkpoints', 'warmup_updates', 'eval_every', 'picture_images'):
        if getattr(args, name) < 0:
            raise ConfigError(f'--{name.replace("_", "-")}: got {getattr(args, name)}; expected an integer >= 0')
    if args.stop_after_steps is not None and args.stop_after_steps < 1:
        raise ConfigError(f'--stop-after-steps: got {args.stop_after_steps}; expected an integer >= 1')
    if min(args.crop_size) < 1:
        raise ConfigError(f'--crop-size: got {args.crop_size}; expected positive H W')
    lo, hi = args.scale_range
    if not 0 < lo <= hi:
        raise ConfigError(f'--scale-range: got {lo} {hi}; expected 0 < low <= high, e.g. 0.5 2.0')
    for name, value, ok, expected in (
            ('hflip', args.hflip, 0 <= args.hflip <= 1, 'a probability in [0, 1]'),
            ('color-jitter', args.color_jitter, 0 <= args.color_jitter < 1, 'a value in [0, 1)'),
            ('top-k-percent', args.top_k_percent, 0 < args.top_k_percent <= 1, 'a fraction in (0, 1]'),
            ('window-overlap', args.window_overlap, 0 <= args.window_overlap < 1, 'a fraction in [0, 1)'),
            ('backbone-lr-scale', args.backbone_lr_scale, args.backbone_lr_scale >= 0, 'a value >= 0'),
            ('poly-power', args.poly_power, args.poly_power > 0, 'a value > 0')):
        if not ok:
            raise ConfigError(f'--{name}: got {value}; expected {expected}')
    repo = args.push_to_hub
    if repo is not None and (repo.count('/') != 1 or not all(repo.split('/'))):
        raise ConfigError(f"--push-to-hub: got {repo!r}; expected a Hub repo id 'ORG/NAME'")
    parse_model_kwargs(args.model_kwargs)
    if args.output is None:
        args.output = str(Path('out') / args.model)


# ----------------------------------------------------------------------------------------------------------
# Data: sources, labels, paired augmentation
# ----------------------------------------------------------------------------------------------------------

def one_line(message: str) -> str:
    return ' '.join(part.strip() for part in str(message).splitlines() if part.strip())


class FolderSource:
    """One split of a dataset folder (spformer.eval.datasets): read(i) -> (image, label)."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def where(self, i: int) -> str:
        return self.dataset.label_path(self.dataset.names[i])

    def read(self, i: int) -> Tuple[np.ndarray, np.ndarray]:
        sample = self.dataset[i]
        return sample.image, sample.ground_truths[0]


class HFSource:
    """One split of a Hugging Face dataset whose label column holds a picture of class ids per image."""

    def __init__(self, ds, name: str, split: str, image_column: str, label_column: str, reduce_zero: bool):
        self.ds, self.name, self.split = ds, name, split
        self.image_column, self.label_column, self.reduce_zero = image_column, label_column, reduce_zero

    def __len__(self) -> int:
        return len(self.ds)

    def where(self, i: int) -> str:
        return f'row {i} of --hf-dataset {self.name!r} split {self.split!r}'

    def read(self, i: int) -> Tuple[np.ndarray, np.ndarray]:
        from spformer.images import to_rgb
        row = self.ds[i]
        image = np.asarray(to_rgb(row[self.image_column]))
        label = row[self.label_column]
        if getattr(label, 'mode', None) not in (None, '1', 'P', 'L', 'I', 'I;16', 'I;16B', 'I;16L'):
            raise LabelError(f'{self.where(i)}: column {self.label_column!r} holds a {label.mode} picture; expected '
                             'one channel of class ids (palette, 8- or 16-bit grey)')
        label = np.asarray(label).astype(np.int64)
        if self.reduce_zero:  # ADE20K: 0 = other (not evaluated), v = class v - 1
            label = np.where(label == 0, IGNORE_INDEX, label - 1)
        return image, label


def open_split(root: str, layout: str, split: str, flag: str):
    try:
        if layout == 'folder':
            return open_dataset(str(Path(root) / split), 'folder')
        return open_dataset(root, layout, split)
    except DatasetError as e:
        raise ConfigError(f'{flag}: {one_line(e)}') from e


def detect_layout(args: argparse.Namespace) -> str:
    root = Path(args.data_dir)
    if not root.is_dir():
        raise ConfigError(f'--data-dir: {str(root)!r} does not exist; expected a dataset folder')
    if all((root / args.train_split / d).is_dir() for d in ('images', 'labels')):
        return 'folder'
    try:
        layout = open_dataset(str(root), 'auto', args.val_split).layout
    except DatasetError as e:
        raise ConfigError(f'--data-dir: {one_line(e)} (or <train-split>/ and <val-split>/ folders holding images/ and '
                          'labels/ for --layout folder)') from e
    if layout not in DEFAULT_VAL_SPLITS:
        raise ConfigError(f'--data-dir: {str(root)!r} is in the {layout} layout, whose labels are per-image segments, '
                          f'not classes; expected one of {list(DEFAULT_VAL_SPLITS)}')
    return layout


def load_hf_split(args: argparse.Namespace, split: str, flag: str):
    """A split of --hf-dataset: a folder written by save_to_disk (load_from_disk), else load_dataset."""
    import datasets
    path = Path(args.hf_dataset)
    try:
        if path.is_dir() and ((path / 'dataset_dict.json').is_file() or (path / 'state.json').is_file()):
            loaded = datasets.load_from_disk(str(path))
            if isinstance(loaded, datasets.DatasetDict):
                if split not in loaded:
                    raise ConfigError(f'{flag}: {split!r} is not a split of --hf-dataset {args.hf_dataset!r} '
                                      f'(it has {list(loaded)})')
                return loaded[split]
            return loaded
        return datasets.load_dataset(args.hf_dataset, args.hf_config, split=split)
    except ValueError as e:
        if isinstance(e, ConfigError) or 'split' not in str(e).lower():
            raise
        raise ConfigError(f'{flag}: {split!r} is not a split of --hf-dataset {args.hf_dataset!r} ({one_line(e)})') from e
    except (FileNotFoundError, datasets.exceptions.DatasetNotFoundError) as e:
        raise ConfigError(f'--hf-dataset: could not load {args.hf_dataset!r} ({one_line(e)}); expected a dataset name '
                          'on the Hub, a local dataset folder or a save_to_disk folder') from e


def load_sources(args: argparse.Namespace):
    """(train source, val source, class names, number of classes) of --data-dir or --hf-dataset; fills in
    args.layout and args.val_split. Cheap: no image is decoded yet."""
    if args.data_dir is not None:
        if args.layout == 'auto':
            args.layout = detect_layout(args)
        args.val_split = args.val_split or DEFAULT_VAL_SPLITS[args.layout]
        train = open_split(args.data_dir, args.layout, args.train_split, '--data-dir/--train-split')
        val = open_split(args.data_dir, args.layout, args.val_split, '--data-dir/--val-split')
        train, val = FolderSource(train), FolderSource(val)
    else:
        args.val_split = args.val_split or 'validation'
        splits = []
        for split, flag in ((args.train_split, '--train-split'), (args.val_split, '--val-split')):
            ds = load_hf_split(args, split, flag)
            for column, col_flag in ((args.image_column, '--image-column'), (args.label_column, '--label-column')):
                if column not in ds.column_names:
                    raise ConfigError(f'{col_flag}: split {split!r} of {args.hf_dataset!r} has no column {column!r}; '
                                      f'its columns are {ds.column_names}')
            splits.append(HFSource(ds, args.hf_dataset, split, args.image_column, args.label_column,
                                   reduce_zero=args.layout == 'ade20k'))
        train, val = splits
    names = list(LAYOUT_CLASSES.get(args.layout, ()))
    if not names and args.num_classes is None:
        raise ConfigError(f'--num-classes: not given, and --layout {args.layout} does not name the classes; expected '
                          '--num-classes N (labels 0..N-1, 255 not evaluated)')
    num_classes = args.num_classes or len(names)
    if names and num_classes != len(names):
        raise ConfigError(f'--num-classes: got {num_classes} but --layout {args.layout} has {len(names)} classes; '
                          'expected that number (or leave it out)')
    for source, flag in ((train, '--train-split'), (val, '--val-split')):
        if len(source) == 0:
            raise ConfigError(f'{flag}: the split holds no images')
    return train, val, names or [f'class {i}' for i in range(num_classes)], num_classes


def check_labels(label: np.ndarray, num_classes: int, where: str) -> None:
    bad = (label != IGNORE_INDEX) & ((label < 0) | (label >= num_classes))
    if bad.any():
        values = np.unique(label[bad]).tolist()
        shown = ', '.join(map(str, values[:10])) + (', ...' if len(values) > 10 else '')
        raise LabelError(f'{where}: label values {shown} are outside the {num_classes} classes (0..{num_classes - 1}) '
                         f'and the ignore label {IGNORE_INDEX}; expected class ids of this dataset (or --num-classes, '
                         '--layout to match its labels)')


def nearest_rows(size: int, new: int) -> np.ndarray:
    """Source index of each of `new` output pixels resampled nearest-neighbour from `size` (pixel centres)."""
    return np.minimum(((np.arange(new) + 0.5) * size / new).astype(np.int64), size - 1)


class PairedAugment:
    """Image and label augmented together: random scale (bilinear image, nearest label), colour jitter, pad to
    the crop (image with `fill`, the mean colour, label with 255), random crop, horizontal flip. The random
    draws come from the generator passed in, in a fixed order."""

    def __init__(self, crop_size: Sequence[int], scale_range: Sequence[float] = (0.5, 2.0), hflip: float = 0.5,
                 color_jitter: float = 0.2, fill: Sequence[int] = (124, 116, 104), ignore_index: int = IGNORE_INDEX):
        self.crop = tuple(int(c) for c in crop_size)
        self.scale_range, self.hflip, self.color_jitter = tuple(scale_range), hflip, color_jitter
        self.fill, self.ignore_index = np.asarray(fill, np.uint8), ignore_index

    def __call__(self, image: np.ndarray, label: np.ndarray, rng: np.random.Generator):
        from PIL import Image
        H, W = label.shape
        scale = rng.uniform(*self.scale_range)
        h, w = max(1, round(H * scale)), max(1, round(W * scale))
        if (h, w) != (H, W):
            image = np.asarray(Image.fromarray(image).resize((w, h), Image.BILINEAR))
            label = label[nearest_rows(H, h)][:, nearest_rows(W, w)]
        if self.color_jitter:
            image = self.jitter(image, rng)
        ch, cw = self.crop
        ph, pw = max(ch - h, 0), max(cw - w, 0)
        if ph or pw:
            padded = np.empty((h + ph, w + pw, 3), np.uint8)
            padded[:] = self.fill
            padded[:h, :w] = image
            image = padded
            label = np.pad(label, ((0, ph), (0, pw)), constant_values=self.ignore_index)
        y0 = int(rng.integers(0, label.shape[0] - ch + 1))
        x0 = int(rng.integers(0, label.shape[1] - cw + 1))
        image, label = image[y0:y0 + ch, x0:x0 + cw], label[y0:y0 + ch, x0:x0 + cw]
        if rng.random() < self.hflip:
            image, label = image[:, ::-1], label[:, ::-1]
        return np.ascontiguousarray(image), np.ascontiguousarray(label)

    def jitter(self, image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        j = self.color_jitter
        brightness, contrast, saturation = rng.uniform(1 - j, 1 + j, 3)
        x = image.astype(np.float32) * brightness
        grey = x @ np.array([0.299, 0.587, 0.114], np.float32)
        x = (x - grey.mean()) * contrast + grey.mean()
        grey = (x @ np.array([0.299, 0.587, 0.114], np.float32))[..., None]
        x = grey + (x - grey) * saturation
        return np.clip(x, 0, 255).round().astype(np.uint8)


class SegmentationSamples(torch.utils.data.Dataset):
    """A source's samples -> {'image': normalized (3, H, W) float, 'label': (H, W) int64, 'index': int}, keyed by
    (epoch, index) (EpochShuffleSampler) or index; with `augment`, augmented under the seed (seed, epoch, index)."""

    def __init__(self, source, num_classes: int, mean: Sequence[float], std: Sequence[float],
                 augment: Optional[PairedAugment] = None, seed: int = 0):
        self.source, self.num_classes, self.augment, self.seed = source, num_classes, augment, seed
        self.mean = torch.tensor(mean, dtype=torch.float32)[:, None, None]
        self.std = torch.tensor(std, dtype=torch.float32)[:, None, None]

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, key) -> Dict[str, Any]:
        epoch, index = key if isinstance(key, tuple) else (0, key)
        image, label = self.source.read(index)
        if label.shape != image.shape[:2]:
            raise LabelError(f'{self.source.where(index)}: the label map is {label.shape[1]}x{label.shape[0]} (WxH) but '
                             f'its image is {image.shape[1]}x{image.shape[0]}; expected the same size')
        check_labels(label, self.num_classes, self.source.where(index))
        if self.augment is not None:
            image, label = self.augment(image, label, np.random.default_rng(key_seed(self.seed, epoch, index)))
        sample = {'image': self.normalize(image), 'label': torch.from_numpy(np.ascontiguousarray(label)), 'index': index}
        if self.augment is None:  # validation: the picture shows the image as it is
            sample['raw'] = torch.from_numpy(np.ascontiguousarray(image))
        return sample

    def normalize(self, image: np.ndarray) -> torch.Tensor:
        return (torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float() / 255 - self.mean) / self.std


# ----------------------------------------------------------------------------------------------------------
# Model, optimizer groups
# ----------------------------------------------------------------------------------------------------------

def backbone_weights(value: str):
    return {'timm': True, 'none': False}.get(value.lower(), value)


def build_model(args: argparse.Namespace, num_classes: int) -> nn.Module:
    """--model with the flags' arguments; the crop must be a multiple of its token stride."""
    kwargs = dict(parse_model_kwargs(args.model_kwargs), num_classes=num_classes,
                  backbone_pretrained=backbone_weights(args.backbone_pretrained))
    for name, key in (('decoder', 'decoder'), ('drop_path', 'drop_path_rate'), ('attn_backend', 'attn_backend')):
        if getattr(args, name) is not None:
            kwargs[key] = getattr(args, name)
    try:
        model = timm.create_model(args.model, **kwargs)
    except (TypeError, ValueError) as e:
        raise ConfigError(f'--model {args.model} / --model-kwargs / --backbone-pretrained: {one_line(e)}') from e
    except (OSError, RuntimeError) as e:  # a download that failed, a weights file that does not fit
        raise ConfigError(f'--backbone-pretrained {args.backbone_pretrained}: the backbone weights could not be '
                          f'loaded ({one_line(e)[:300]}); expected a network connection for timm, a local '
                          '.safetensors file of the backbone, or none') from e
    stride = model.token_stride
    if any(c % stride for c in args.crop_size):
        fit = ' '.join(str(max(stride, round(c / stride) * stride)) for c in args.crop_size)
        raise ConfigError(f'--crop-size: got {args.crop_size[0]} {args.crop_size[1]}, not multiples of the token stride '
                          f'{stride} of {args.model} (pixel_stride {model.pixel_stride} x cell_size {model.cell_size}); '
                          f'expected e.g. {fit}')
    if args.grad_checkpointing:
        model.set_grad_checkpointing()
    return model


def param_groups(model: nn.Module, weight_decay: float, backbone_lr_scale: float) -> List[Dict[str, Any]]:
    """The backbone's parameters and the rest, each with and without weight decay (none on 1-D parameters and
    the model's no_weight_decay(): norms, biases, position embeddings); the backbone's groups carry
    lr_scale = backbone_lr_scale, which timm's schedulers apply to every lr they set."""
    skip = model.no_weight_decay() if hasattr(model, 'no_weight_decay') else set()
    groups: Dict[str, Dict[str, Any]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        part = 'backbone' if name.startswith('backbone.') else 'decoder'
        no_decay = p.ndim <= 1 or name in skip
        key = part + ('_no_decay' if no_decay else '')
        group = groups.setdefault(key, dict(name=key, params=[], weight_decay=0. if no_decay else weight_decay,
                                            lr_scale=backbone_lr_scale if part == 'backbone' else 1.0))
        group['params'].append(p)
    return list(groups.values())


# ----------------------------------------------------------------------------------------------------------
# Inference and validation
# ----------------------------------------------------------------------------------------------------------

def padded_size(size: int, stride: int) -> int:
    return -(-size // stride) * stride


def predict_whole(model: nn.Module, x: torch.Tensor, stride: int) -> torch.Tensor:
    """Logits (B, K, H, W) of whole images: padded (bottom, right, with 0 = the mean colour once normalized) to
    multiples of the token stride, cropped back."""
    H, W = x.shape[-2:]
    padded = F.pad(x, (0, padded_size(W, stride) - W, 0, padded_size(H, stride) - H))
    return model(padded)[..., :H, :W].float()


def window_starts(size: int, window: int, overlap: float) -> List[int]:
    """Top (or left) offsets of windows of `window` pixels over `size` (>= window), overlapping by about
    `overlap` of a window; the last one ends at the border."""
    if size <= window:
        return [0]
    step = max(1, math.ceil(window * (1 - overlap)))
    return list(range(0, size - window, step)) + [size - window]


def predict_sliding(model: nn.Module, x: torch.Tensor, window: Sequence[int], overlap: float, stride: int,
                    batch_size: int = 1) -> torch.Tensor:
    """Logits (B, K, H, W) averaged over windows of `window` (H, W) that overlap by `overlap`. The image is first
    padded to multiples of the token stride; a window larger than that is shrunk to it, so a window covering
    the image gives exactly predict_whole."""
    B, _, H, W = x.shape
    Hp, Wp = padded_size(H, stride), padded_size(W, stride)
    x = F.pad(x, (0, Wp - W, 0, Hp - H))
    wh, ww = min(window[0], Hp), min(window[1], Wp)
    boxes = [(y, x0) for y in window_starts(Hp, wh, overlap) for x0 in window_starts(Wp, ww, overlap)]
    total = count = None
    for i in range(0, len(boxes), batch_size):
        chunk = boxes[i:i + batch_size]
        crops = torch.cat([x[..., y:y + wh, x0:x0 + ww] for y, x0 in chunk])
        logits = model(crops).float()
        if total is None:
            total = logits.new_zeros(B, logits.shape[1], Hp, Wp)
            count = logits.new_zeros(1, 1, Hp, Wp)
        for j, (y, x0) in enumerate(chunk):
            total[..., y:y + wh, x0:x0 + ww] += logits[j * B:(j + 1) * B]
            count[..., y:y + wh, x0:x0 + ww] += 1
    return (total / count)[..., :H, :W]


@torch.no_grad()
def validate(model: nn.Module, val_set: SegmentationSamples, accelerator, num_classes: int, class_names: Sequence[str],
             args: argparse.Namespace, stride: int) -> Dict[str, Any]:
    """mIoU, per-class IoU and pixel accuracy (percent) of the whole validation set: every process infers its
    share (images i, i + P, ...), and their confusion matrices are summed before scoring."""
    model.eval()
    confusion = ConfusionMatrix(num_classes, IGNORE_INDEX)
    confusion.confusion = confusion.confusion.to(accelerator.device)
    indices = list(range(accelerator.process_index, len(val_set), accelerator.num_processes))
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(val_set, indices), batch_size=1,
                                         num_workers=args.workers)
    for batch in rng_isolated(loader):
        with accelerator.autocast():
            logits = predict(model, batch['image'].to(accelerator.device), args, stride)
        confusion.update(logits.argmax(1), batch['label'].to(accelerator.device))
    total = accelerator.reduce(confusion.confusion, reduction='sum')
    iou = iou_per_class(total).tolist()
    return dict(miou=100 * mean_iou(total), pixel_accuracy=100 * pixel_accuracy(total), samples=len(val_set),
                inference='sliding window' if args.sliding_window else 'whole image',
                iou={name: None if math.isnan(v) else 100 * v for name, v in zip(class_names, iou)})


def evaluate_folder(args: argparse.Namespace, accelerator, val_source, class_names: Sequence[str],
                    num_classes: int) -> Dict[str, Any]:
    """--evaluate FOLDER: the weights of a final/ folder (loaded by timm, as anyone would) on the validation
    split, whole images or --sliding-window; the results also go to FOLDER/eval_<mode>.json."""
    import json
    folder = Path(args.evaluate)
    if not (folder / 'config.json').is_file() or not (folder / 'model.safetensors').is_file():
        raise ConfigError(f'--evaluate: {str(folder)!r} holds no config.json and model.safetensors; expected a final/ '
                          'folder written by train_segmentation.py')
    kwargs = {'attn_backend': args.attn_backend} if args.attn_backend else {}
    model = timm.create_model(f'local-dir:{folder}', pretrained=True, **kwargs)
    if model.num_classes != num_classes:
        raise ConfigError(f'--evaluate: {str(folder)!r} holds a model of {model.num_classes} classes and the data has '
                          f'{num_classes}; expected the dataset it was trained for')
    stride = model.token_stride
    if args.sliding_window and any(c % stride for c in args.crop_size):
        raise ConfigError(f'--crop-size: got {args.crop_size[0]} {args.crop_size[1]} as the sliding window, not '
                          f'multiples of the token stride {stride} of {str(folder)!r}')
    val_set = SegmentationSamples(val_source, num_classes, model.pretrained_cfg['mean'], model.pretrained_cfg['std'])
    results = validate(accelerator.prepare(model), val_set, accelerator, num_classes, class_names, args, stride)
    if accelerator.is_main_process:
        name = 'eval_' + results['inference'].replace(' ', '_') + '.json'
        (folder / name).write_text(json.dumps(dict(results, data=args.data_dir or args.hf_dataset,
                                                   split=args.val_split), indent=2) + '\n')
    return results


def predict(model: nn.Module, x: torch.Tensor, args: argparse.Namespace, stride: int) -> torch.Tensor:
    if args.sliding_window:
        return predict_sliding(model, x, args.crop_size, args.window_overlap, stride, args.batch_size)
    return predict_whole(model, x, stride)


@torch.no_grad()
def picture_rows(model: nn.Module, val_set: SegmentationSamples, count: int, args: argparse.Namespace, stride: int,
                 device) -> List[Dict[str, np.ndarray]]:
    """The first `count` validation images, each as {'image', 'label', 'prediction', 'superpixels' (the model's
    hard superpixels, whole image; None without a superpixel decoder)}."""
    model.eval()
    rows = []
    for i in range(min(count, len(val_set))):
        sample = val_set[i]
        x = sample['image'][None].to(device)
        H, W = x.shape[-2:]
        superpixels = None
        if getattr(model, 'decoder', None) == 'superpixel':
            padded = F.pad(x, (0, padded_size(W, stride) - W, 0, padded_size(H, stride) - H))
            superpixels = model.forward_superpixels(padded)['labels'][0, :H, :W].cpu().numpy()
        rows.append(dict(image=sample['raw'].numpy(), label=sample['label'].numpy(), superpixels=superpixels,
                         prediction=predict(model, x, args, stride).argmax(1)[0].cpu().numpy()))
    return rows


def iou_table(results: Dict[str, Any]) -> str:
    """The per-class IoU of validate's results as a Markdown table, then mIoU and pixel accuracy."""
    lines = ['| class | IoU |', '|---|---:|']
    lines += [f'| {name} | {"-" if v is None else f"{v:.1f}"} |' for name, v in results['iou'].items()]
    lines.append(f'| **mIoU** | **{results["miou"]:.1f}** |')
    lines.append(f'| pixel accuracy | {results["pixel_accuracy"]:.1f} |')
    return '\n'.join(lines)


def prediction_panels(rows: List[Dict[str, np.ndarray]], num_classes: int) -> List[Dict[str, np.ndarray]]:
    """picture_rows as spformer.pictures.save_panels rows: image, ground truth, prediction (class colours) and the
    superpixels drawn on the image."""
    colours = class_palette(num_classes)
    out = []
    for row in rows:
        panel = {'image': row['image'], 'ground truth': colourize(row['label'], colours),
                 'prediction': colourize(row['prediction'], colours)}
        if row['superpixels'] is not None:
            # drawn enlarged so that the lines stay thin beside the insides of small superpixels
            scale = max(1, -(-512 // row['image'].shape[1]))
            panel['superpixels'] = superpixel_boundaries(row['image'], row['superpixels'], scale=scale)
        out.append(panel)
    return out
