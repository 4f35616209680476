"""Data of a training run: ImageFolder and Hugging Face datasets, their samples augmented under per-sample
seeds, the epoch's order, unreadable images, timm's transforms, and the loaders.

A sample is drawn by (epoch, index) (:class:`EpochShuffleSampler`: a permutation that depends only on
(seed, epoch)) and augmented under seeds keyed by (seed, epoch, index) (:class:`TransformedDataset`), so the
data a run sees depends on nothing else. A source of samples is ``(get_sample, length)``: ``get_sample(i)``
gives (RGB PIL image, label) or raises ImageReadError naming the file; with ``--streaming`` the training
source is ``(datasets.IterableDataset, length)``.
"""
import argparse
import contextlib
import fcntl
import functools
import hashlib
import sys
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
import torch.nn as nn
from PIL import Image
from timm.data import create_transform, resolve_model_data_config

from spformer.images import ImageReadError, open_rgb, to_rgb
from spformer.training.config import ConfigError
from spformer.training.rng import key_seed, seeded_rngs

IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.ppm', '.bmp', '.pgm', '.tif', '.tiff', '.webp')


class EpochShuffleSampler(torch.utils.data.Sampler):
    """A permutation of range(n) that depends only on (seed, epoch); yields (epoch, index) keys."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed, self.epoch = n, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        order = torch.randperm(self.n, generator=torch.Generator().manual_seed(key_seed(self.seed, self.epoch)))
        return iter([(self.epoch, i) for i in order.tolist()])

    def __len__(self) -> int:
        return self.n


class TransformedDataset(torch.utils.data.Dataset):
    """Map-style samples -> {'image': tensor, 'label': int, 'index': int}, augmented with a per-sample seed.

    `get_sample(i)` gives (RGB PIL image, label) or raises ImageReadError naming the file. With `skipped`
    (--skip-bad-images) an unreadable sample is replaced by the next readable one (index + 1, + 2, ...,
    wrapping around): always the same one, so the data a run sees still depends only on (seed, epoch) and a
    resumed run repeats an uninterrupted one; its augmentation stays keyed by the index it replaces."""

    def __init__(self, get_sample: Callable[[int], Tuple[Any, int]], length: int, transform, seed: int,
                 skipped: Optional['SkippedImages'] = None):
        self.get_sample, self.length, self.transform, self.seed = get_sample, length, transform, seed
        self.skipped = skipped

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, key):
        epoch, index = key if isinstance(key, tuple) else (0, key)
        image, label = self.read(index)
        with seeded_rngs(self.seed, epoch, index):
            image = self.transform(image)
        return {'image': image, 'label': int(label), 'index': index}

    def read(self, index: int) -> Tuple[Any, int]:
        for offset in range(self.length):
            try:
                return self.get_sample((index + offset) % self.length)
            except ImageReadError as e:
                if self.skipped is None:
                    raise
                self.skipped.record(e)
        raise ImageReadError(f'--skip-bad-images: none of the {self.length} images of this split can be read; '
                             f'expected readable images (see {self.skipped.path})')


class SkippedImages:
    """--skip-bad-images: every unreadable image once per output folder, on stderr and as a line of
    <output>/skipped_images.txt. Loader workers are processes (new ones every epoch), so the file, read
    and appended under an flock, is the record of what has been reported."""

    def __init__(self, path: Path):
        self.path = path
        self.reported = set()

    def record(self, error: ImageReadError) -> None:
        line = ' '.join(str(error).split())
        if line in self.reported:
            return
        self.reported.add(line)
        with open(self.path, 'a+') as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            f.seek(0)
            if line not in f.read().splitlines():
                f.write(line + '\n')
                # One write: loader workers and the progress bar share stderr.
                sys.stderr.write(f'--skip-bad-images: replaced by the next readable sample: {line}\n')
                sys.stderr.flush()


def data_error_line(error: Exception) -> str:
    """The message of an error raised while loading data (an ImageReadError, or another error whose class
    takes its message alone) on one line. Re-raised by a DataLoader worker, its message is the worker's
    whole traceback text, whose last line is e.g. 'spformer.images.ImageReadError: <message>'."""
    lines = [line for line in str(error).splitlines() if line.strip()]
    last = lines[-1] if lines else ''
    marker = f'{type(error).__name__}: '
    if len(lines) > 1 and marker in last:
        last = last.split(marker, 1)[1]
    return last.strip()


def image_error_message(error: ImageReadError) -> str:
    """The one line that an ImageReadError stopping a run prints, with what to do about it."""
    message = data_error_line(error)
    if '--skip-bad-images' not in message:
        message += ('; expected a readable image (fix or remove the file), or --skip-bad-images to replace '
                    'unreadable images by the next readable sample and list them in skipped_images.txt')
    return message


def scan_image_folder(root: Path, split: str, flag: str) -> List[str]:
    """Class folder names of root/split, with clear errors for a missing or empty split."""
    path = root / split
    if not path.is_dir():
        raise ConfigError(f'{flag}: {str(path)!r} does not exist; expected an ImageFolder split folder with one '
                          f'sub-folder of images per class under --data-dir {str(root)!r}')
    classes = sorted(d.name for d in path.iterdir() if d.is_dir())
    if not classes:
        raise ConfigError(f'{flag}: {str(path)!r} has no class folders; expected one sub-folder of images per class')
    if not any(f.suffix.lower() in IMAGE_EXTENSIONS for c in classes for f in (path / c).rglob('*')):
        raise ConfigError(f'{flag}: the class folders of {str(path)!r} hold no images; expected files ending in '
                          f'{", ".join(IMAGE_EXTENSIONS)}')
    return classes


def load_image_folder(args) -> Tuple[Any, Any, List[str]]:
    """(train, val, class names) of an ImageFolder root; train and val must have the same classes."""
    import torchvision
    root = Path(args.data_dir)
    if not root.is_dir():
        raise ConfigError(f'--data-dir: {str(root)!r} does not exist; expected a folder with '
                          f'{args.train_split}/ and {args.val_split}/ holding one sub-folder of images per class')
    train_classes = scan_image_folder(root, args.train_split, '--data-dir/--train-split')
    val_classes = scan_image_folder(root, args.val_split, '--data-dir/--val-split')
    if train_classes != val_classes:
        only_train = sorted(set(train_classes) - set(val_classes))
        only_val = sorted(set(val_classes) - set(train_classes))
        raise ConfigError(f'--data-dir: the class folders of {args.train_split}/ and {args.val_split}/ differ '
                          f'(only in {args.train_split}/: {only_train[:10]}, only in {args.val_split}/: {only_val[:10]}); '
                          'expected the same class folders in both')
    try:  # open_rgb: decoded at once (a damaged file is named), 16-bit scaled, alpha, palette and EXIF handled
        train = torchvision.datasets.ImageFolder(str(root / args.train_split), loader=open_rgb)
        val = torchvision.datasets.ImageFolder(str(root / args.val_split), loader=open_rgb)
    except FileNotFoundError as e:  # e.g. a class folder without images
        raise ConfigError(f'--data-dir: {e}; expected every class folder to hold images') from e
    return (train.__getitem__, len(train)), (val.__getitem__, len(val)), train_classes


def load_hf_dataset(args) -> Tuple[Any, Any, List[str]]:
    """(train, val, class names) of a Hugging Face dataset; train is a datasets.IterableDataset with --streaming."""
    import datasets

    def load(split: str, flag: str, streaming: bool):
        try:
            return datasets.load_dataset(args.hf_dataset, args.hf_config, split=split, streaming=streaming)
        except ValueError as e:  # an unknown split
            if 'split' in str(e).lower():
                raise ConfigError(f'{flag}: {split!r} is not a split of --hf-dataset {args.hf_dataset!r} ({e})') from e
            raise
        except (FileNotFoundError, datasets.exceptions.DatasetNotFoundError) as e:
            raise ConfigError(f'--hf-dataset: could not load {args.hf_dataset!r} ({e}); expected a dataset name on '
                              'the Hub or a local dataset folder') from e

    train = load(args.train_split, '--train-split', args.streaming)
    val = load(args.val_split, '--val-split', False)
    for ds, split in ((train, args.train_split), (val, args.val_split)):
        if ds.features is None:  # a stream that does not declare its columns: checked when read
            continue
        columns = list(ds.features)
        for col, flag in ((args.image_column, '--image-column'), (args.label_column, '--label-column')):
            if col not in columns:
                raise ConfigError(f'{flag}: split {split!r} of {args.hf_dataset!r} has no column {col!r}; '
                                  f'its columns are {columns}')
    label_feature = train.features[args.label_column]
    names = list(getattr(label_feature, 'names', None) or [])
    val_names = list(getattr(val.features[args.label_column], 'names', None) or [])
    if names != val_names:
        raise ConfigError(f'--hf-dataset: the {args.label_column!r} classes of {args.train_split!r} and '
                          f'{args.val_split!r} differ ({names[:10]} vs {val_names[:10]}); expected the same ClassLabel')
    if not names and args.num_classes is None:
        raise ConfigError(f'--num-classes: not given and column {args.label_column!r} of {args.hf_dataset!r} is not a '
                          'ClassLabel with names; expected --num-classes N')

    def getter(ds, split: str):
        return functools.partial(hf_sample, ds, args.image_column, args.label_column,
                                 f'--hf-dataset {args.hf_dataset!r} split {split!r}')

    if args.streaming:
        n = args.train_samples
        if n is None and train.info.splits and args.train_split in train.info.splits:
            n = train.info.splits[args.train_split].num_examples or None
        if n is None:
            raise ConfigError(f'--train-samples: --streaming {args.hf_dataset!r} does not record the size of split '
                              f'{args.train_split!r}; expected --train-samples N (the number of training images)')
        train_data = (train, n)
    else:
        train_data = (getter(train, args.train_split), len(train))
    return train_data, (getter(val, args.val_split), len(val)), names


# What decoding a damaged image can raise inside datasets (PIL) or to_rgb.
DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError)


def hf_sample(ds, image_column: str, label_column: str, where: str, index: int) -> Tuple[Any, int]:
    """Row `index` of a Hugging Face dataset as (RGB image, label). datasets decodes the image when the row is
    read: a damaged one becomes an ImageReadError naming the row (and its file, where the dataset has one)."""
    try:
        row = ds[index]
        return to_rgb(row[image_column]), row[label_column]
    except DECODE_ERRORS as e:
        raise ImageReadError(f'cannot read image of row {index} of {where}{hf_image_path(ds, image_column, index)}: '
                             f'{type(e).__name__}: {" ".join(str(e).split())}') from e


def hf_image_path(ds, image_column: str, index: int) -> str:
    """" (file 'PATH')" for a row whose image the dataset holds as a file path, else ''."""
    with contextlib.suppress(Exception):
        path = ds.with_format('arrow')[index][image_column][0].as_py().get('path')
        if path:
            return f' (file {path!r})'
    return ''


def stream_with_transform(stream, length: int, image_column: str, label_column: str, transform, seed: int,
                          buffer: int, epoch_ref: Dict[str, int]):
    """A streaming split, shuffled per epoch, mapped to augmented {'image', 'label', 'index'} samples.

    A streamed sample has no stable index: its augmentation is seeded by (seed, epoch, hash of its pixels).
    """
    def augment(row):
        try:
            image = to_rgb(row[image_column])
        except DECODE_ERRORS as e:
            raise ImageReadError(f'cannot read the image of a streamed row: {type(e).__name__}: {e}') from e
        key = int.from_bytes(hashlib.blake2b(image.tobytes(), digest_size=4).digest(), 'little')
        with seeded_rngs(seed, epoch_ref['epoch'], key):
            tensor = transform(image)
        return {'image': tensor, 'label': int(row[label_column]), 'index': -1}

    stream = stream.shuffle(seed=seed, buffer_size=buffer)
    columns = list(stream.features or [])
    return stream.map(augment, remove_columns=columns)


def posterize_zero_bits_as_black() -> None:
    """timm's RandAugment asks PIL to keep 0 bits when a noisy magnitude reaches its maximum (the DeiT policy
    'rand-m9-mstd0.5-inc1': about 1 image in 700), which recent Pillow (13 here) refuses with a ValueError: a
    run on the default recipe would stop within its first batches. 0 bits always meant a black image
    (TensorFlow's posterize, older Pillow, timm's own comments), so give that; every other draw is unchanged."""
    from timm.data import auto_augment

    def posterize(img, bits_to_keep, **kwargs):
        if bits_to_keep <= 0:
            return Image.new(img.mode, img.size)
        return auto_augment.posterize(img, bits_to_keep, **kwargs)

    for name, op in auto_augment.NAME_TO_OP.items():
        if op is auto_augment.posterize:
            auto_augment.NAME_TO_OP[name] = posterize


def build_transforms(args: argparse.Namespace, model: nn.Module) -> Tuple[Dict[str, Any], Callable, Callable]:
    """(data config, training transform, evaluation transform) of `model` under the flags: timm's
    create_transform, the DeiT recipe (RandAugment, random erasing, bicubic). The training transform draws
    from the process-wide RNGs: TransformedDataset runs it inside seeded_rngs(seed, epoch, index)."""
    data_config = resolve_model_data_config(model, args=dict(
        img_size=args.img_size, interpolation=args.interpolation, crop_pct=args.crop_pct))
    posterize_zero_bits_as_black()
    train_transform = create_transform(
        data_config['input_size'], is_training=True, scale=tuple(args.scale), ratio=tuple(args.ratio),
        hflip=args.hflip, color_jitter=args.color_jitter,
        auto_augment=None if args.aa in (None, 'none', '') else args.aa,
        interpolation=args.interpolation, mean=data_config['mean'], std=data_config['std'],
        re_prob=args.reprob, re_mode=args.remode, re_count=args.recount)
    eval_transform = create_transform(
        data_config['input_size'], is_training=False, interpolation=data_config['interpolation'],
        mean=data_config['mean'], std=data_config['std'], crop_pct=data_config['crop_pct'])
    return data_config, train_transform, eval_transform


def load_sources(args: argparse.Namespace) -> Tuple[Any, Any, List[str], int]:
    """(training source, validation source, class names, number of classes) of --data-dir or --hf-dataset.
    Cheap: no image is decoded yet."""
    if args.data_dir is not None:
        train_source, val_source, class_names = load_image_folder(args)
    else:
        train_source, val_source, class_names = load_hf_dataset(args)
    num_classes = args.num_classes or len(class_names)
    if class_names and num_classes < len(class_names):
        raise ConfigError(f'--num-classes: got {num_classes} but the data has {len(class_names)} classes; '
                          f'expected at least {len(class_names)}')
    return train_source, val_source, class_names, num_classes


def build_loaders(args: argparse.Namespace, train_source, val_source, train_transform: Callable,
                  eval_transform: Callable, skipped: Optional[SkippedImages]):
    """(training loader, validation loader, training samples, set_epoch): plain loaders, which Accelerate
    shards over the processes. The training loader drops the last incomplete batch; set_epoch(epoch) keys its
    order and augmentation by the epoch (the sampler's, or the stream's with --streaming)."""
    loader_kwargs = dict(num_workers=args.workers, pin_memory=torch.cuda.is_available())
    epoch_ref = {'epoch': 0}
    if args.streaming:
        stream, train_samples = train_source
        train_set = stream_with_transform(stream, train_samples, args.image_column, args.label_column,
                                          train_transform, args.seed, args.shuffle_buffer, epoch_ref)
        train_loader = torch.utils.data.DataLoader(train_set, batch_size=args.batch_size, drop_last=True,
                                                   **loader_kwargs)
        train_sampler = None
    else:
        get_sample, train_samples = train_source
        train_set = TransformedDataset(get_sample, train_samples, train_transform, args.seed, skipped)
        train_sampler = EpochShuffleSampler(train_samples, args.seed)
        train_loader = torch.utils.data.DataLoader(train_set, batch_size=args.batch_size, sampler=train_sampler,
                                                   drop_last=True, **loader_kwargs)
    val_set = TransformedDataset(val_source[0], val_source[1], eval_transform, args.seed, skipped)
    val_loader = torch.utils.data.DataLoader(val_set, batch_size=args.eval_batch_size or args.batch_size,
                                             **loader_kwargs)

    def set_epoch(epoch: int) -> None:
        epoch_ref['epoch'] = epoch
        if train_sampler is not None:
            train_sampler.set_epoch(epoch)

    return train_loader, val_loader, train_samples, set_epoch
