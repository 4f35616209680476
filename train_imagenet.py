#!/usr/bin/env python
"""ImageNet training and fine-tuning of SPFormer (or any timm model) with Accelerate and the DeiT recipe.

    accelerate launch train_imagenet.py --model spformer_small_sp16_224 --data-dir /data/imagenet
    python train_imagenet.py --config configs/deit_in1k.yaml --data-dir /data/imagenet --batch-size 64
    accelerate launch train_imagenet.py ... --resume latest        # continue exactly where it stopped

Data: an ImageFolder directory (``--data-dir`` with ``train/`` and ``val/`` class folders) or a Hugging Face
dataset (``--hf-dataset`` name or local path, map-style or ``--streaming``, ``image``/``label`` columns).
The recipe is timm's: ``create_transform`` (RandAugment, random erasing, bicubic), Mixup/CutMix,
``create_optimizer_v2`` (AdamW, layer decay), ``create_scheduler_v2`` stepped per optimizer update,
``ModelEmaV3``, ``SoftTargetCrossEntropy``. Every default (``--help``) can be set by flag or in a YAML
file given with ``--config`` (flags win).

Everything goes under ``--output`` (default ``out/<model>``):

    train_config.yaml     the effective configuration (reusable with --config)
    metrics.jsonl         one JSON row per logged update ("train": its loss and the lr it used, the largest
                          of the parameter groups') and per epoch ("val")
    checkpoints/step_N/   the state after N optimizer updates: Accelerate's (model.safetensors, optimizer.bin,
                          scaler.pt with fp16, random_states_<process>.pkl), this script's
                          (training_state.json: position in the data and lr schedule; model_ema.safetensors)
                          and manifest.json (size and sha256 of every file, written last); the last
                          --keep-checkpoints
    final/                config.json + model.safetensors (timm save_for_hf layout), model_ema.safetensors,
                          train_config.yaml, results.json (final validation of both weights, top-5 only
                          with more than 5 classes, and which of the two validated better: selected_weights)
    training_curves.png   loss, lr and validation accuracy (needs matplotlib)
    skipped_images.txt    with --skip-bad-images: every unreadable image replaced, one line each
    .lock                 held (flock) by the run that writes here; a second run on the same --output stops

Exact resumption: the order of the samples depends only on (--seed, epoch) and the augmentation of a
sample only on (--seed, epoch, sample index), never on the process-wide RNGs, the number of loader
workers or where a run stopped; drop path and Mixup draw from the process RNGs, which checkpoints save.
A checkpoint is written to ``checkpoints/.tmp-step_N``, its manifest last, fsynced and renamed, so a crash
mid-write leaves only a temporary folder that ``--resume latest`` ignores (and the next save removes).
``--resume latest`` takes the newest checkpoint whose files match its manifest (and says which it skipped and
why); ``--resume DIR`` refuses a checkpoint that does not, naming the file. A checkpoint whose RNG state
cannot be restored for every process (damaged, or written by fewer processes) is refused unless
``--resume-without-rng``: the run would continue, but not as an uninterrupted one.

Nothing loaded on resume can run code: the script's own state is JSON and safetensors, and Accelerate's
pickled files (optimizer, scaler, RNG states) are unpickled weights-only (tensors, numbers, numpy arrays),
each checked before Accelerate loads it; a checkpoint holding anything else is refused.

Errors you can fix (a bad flag or config value, a damaged checkpoint, an unreadable image, an --output in
use) print one line ``train_imagenet.py: error: ...`` and exit with status 2; ``SPFORMER_DEBUG=1`` shows
the traceback instead.

Test-only hooks (environment variables, for tests/test_train.py; never needed in real runs):
    SPFORMER_TRAIN_TEST_KILL_AT=N   SIGKILL this process while it writes the checkpoint of update N
                                    (after the state files and the manifest are in the temporary folder,
                                    before the rename).
    SPFORMER_TRAIN_TEST_DUMP=DIR    every process writes DIR/rank<i>.json (sample indices seen per epoch, the
                                    sha256 of each one's augmented image, the targets (after Mixup), logits and
                                    loss of each batch, with --clip-grad the gradient norm of each update
                                    before and after clipping, sha256 of its final weights); the main one also
                                    DIR/final_logits.pt.
"""
import argparse
import contextlib
import fcntl
import functools
import hashlib
import json
import math
import os
import pickle
import random
import re
import shutil
import signal
import sys
import time
import zipfile
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn as nn
import yaml
from PIL import Image
from tqdm.auto import tqdm

import timm
from timm.data import Mixup, create_transform, resolve_model_data_config
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from timm.utils import ModelEmaV3

import spformer  # noqa: F401  (registers the spformer_* models with timm)
from spformer.cli import debug_enabled
from spformer.hub.card import resolve_datasets
from spformer.hub.checkpoint import ModelReferenceError, choose_weights, load_model, weights_source
from spformer.hub.publish import clean_state_dict, save_config
from spformer.images import ImageReadError, open_rgb, to_rgb
from spformer.kernels.functional import BACKENDS

IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.ppm', '.bmp', '.pgm', '.tif', '.tiff', '.webp')


class ConfigError(ValueError):
    """Bad input: the message names the argument, what it got and what it expects."""


# ----------------------------------------------------------------------------------------------------------
# Arguments: flags, optionally a YAML file of defaults (--config), then checks of the combination.
# ----------------------------------------------------------------------------------------------------------

def default_workers() -> int:
    """min(8, the CPUs this process may run on): more loader processes than CPUs only compete for them."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count()
    return min(8, cpus or 1)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description='Train or fine-tune SPFormer (any timm model) with Accelerate and the DeiT recipe.',
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument('--config', default=None, help='YAML file of defaults (keys are flag names); flags override it')

    g = p.add_argument_group('data')
    g.add_argument('--data-dir', default=None, help='ImageFolder root with <train-split>/ and <val-split>/ class folders')
    g.add_argument('--hf-dataset', default=None, help='Hugging Face dataset name or local path (load_dataset)')
    g.add_argument('--hf-config', default=None, help='dataset configuration name of --hf-dataset')
    g.add_argument('--train-split', default='train', help='training split: folder of --data-dir, split of --hf-dataset')
    g.add_argument('--val-split', default=None,
                   help="validation split; None: 'val' for --data-dir, 'validation' for --hf-dataset")
    g.add_argument('--image-column', default='image', help='image column of --hf-dataset')
    g.add_argument('--label-column', default='label', help='integer (ClassLabel) label column of --hf-dataset')
    g.add_argument('--streaming', action='store_true', help='stream the training split of --hf-dataset')
    g.add_argument('--train-samples', type=int, default=None,
                   help='training split size, needed with --streaming when the dataset does not record it')
    g.add_argument('--shuffle-buffer', type=int, default=10000, help='shuffle buffer of --streaming')
    g.add_argument('--workers', type=int, default=default_workers(),
                   help='data loader processes per training process: min(8, CPUs available) unless set')
    g.add_argument('--skip-bad-images', action='store_true',
                   help='replace an unreadable image by the next readable sample (the same one every epoch and '
                        'on resume) and list it in <output>/skipped_images.txt; without it the run stops naming it')

    g = p.add_argument_group('model')
    g.add_argument('--model', default='spformer_small_sp16_224',
                   help="timm model name, 'hf-hub:ORG/NAME' or 'local-dir:FOLDER' (a training output folder)")
    g.add_argument('--pretrained', action='store_true',
                   help="start from --model's weights: published ones, an hf-hub: repo's, or a training folder's "
                        "(its better-validating weights)")
    g.add_argument('--initial-checkpoint', default=None, metavar='PATH',
                   help="start from your own weights: a .safetensors file of --model, or a training output folder "
                        "(e.g. out/run/final: its better-validating weights); the head is kept when it has "
                        "--num-classes rows, else re-initialised")
    g.add_argument('--num-classes', type=int, default=None, help='classifier outputs; None: the classes in the data')
    g.add_argument('--img-size', type=int, default=None, help="input size; None: the model's")
    g.add_argument('--drop-path', type=float, default=0.1, help='stochastic depth rate')
    g.add_argument('--drop', type=float, default=0.0, help='dropout before the classifier')
    g.add_argument('--attn-backend', default=None, choices=BACKENDS,
                   help="local attention backend of spformer models; None: the model's, auto (Triton on CUDA, "
                        'the fused C kernels on CPU)')
    g.add_argument('--grad-checkpointing', action='store_true',
                   help='recompute activations in the backward pass (less memory, more time)')

    g = p.add_argument_group('augmentation (timm create_transform, Mixup)')
    g.add_argument('--aa', default='rand-m9-mstd0.5-inc1', help="auto-augment policy, 'none' to disable")
    g.add_argument('--color-jitter', type=float, default=0.3, help='(timm uses it only without --aa)')
    g.add_argument('--reprob', type=float, default=0.25, help='random erasing probability')
    g.add_argument('--remode', default='pixel', help='random erasing mode')
    g.add_argument('--recount', type=int, default=1, help='random erasing count')
    g.add_argument('--scale', type=float, nargs=2, default=[0.08, 1.0], help='random resized crop scale')
    g.add_argument('--ratio', type=float, nargs=2, default=[3. / 4., 4. / 3.], help='random resized crop ratio')
    g.add_argument('--hflip', type=float, default=0.5, help='horizontal flip probability')
    g.add_argument('--interpolation', default='bicubic', help='resize interpolation of training and validation')
    g.add_argument('--crop-pct', type=float, default=None, help="validation center crop fraction; None: the model's")
    g.add_argument('--mixup', type=float, default=0.8, help='mixup alpha, 0 disables')
    g.add_argument('--cutmix', type=float, default=1.0, help='cutmix alpha, 0 disables')
    g.add_argument('--mixup-prob', type=float, default=1.0, help='probability of mixing a batch')
    g.add_argument('--mixup-switch-prob', type=float, default=0.5, help='probability of CutMix instead of Mixup')
    g.add_argument('--mixup-mode', default='batch', choices=['batch', 'pair', 'elem'],
                   help='mix parameters drawn per batch, per pair or per element')
    g.add_argument('--smoothing', type=float, default=0.1, help='label smoothing')

    g = p.add_argument_group('optimizer and schedule (timm create_optimizer_v2, create_scheduler_v2)')
    g.add_argument('--opt', default='adamw', help='timm optimizer name')
    g.add_argument('--lr', type=float, default=None, help='absolute lr; None: lr-base x global batch / lr-base-size')
    g.add_argument('--lr-base', type=float, default=5e-4, help='lr of a global batch of --lr-base-size')
    g.add_argument('--lr-base-size', type=int, default=512, help='global batch size that --lr-base is given for')
    g.add_argument('--weight-decay', type=float, default=0.05, help='(timm exempts biases and norm weights)')
    g.add_argument('--opt-eps', type=float, default=1e-8, help='optimizer epsilon')
    g.add_argument('--opt-betas', type=float, nargs=2, default=[0.9, 0.999], help='(Adam-like optimizers)')
    g.add_argument('--momentum', type=float, default=0.9, help='(SGD-like optimizers)')
    g.add_argument('--layer-decay', type=float, default=None, help='layer-wise lr decay, e.g. 0.65 to fine-tune')
    g.add_argument('--clip-grad', type=float, default=None, help='clip the gradient norm to this value')
    g.add_argument('--epochs', type=int, default=300, help='length of training (and of the lr schedule)')
    g.add_argument('--sched', default='cosine', help='timm lr schedule, stepped per optimizer update')
    g.add_argument('--warmup-epochs', type=float, default=5, help='linear lr warm-up (fractions allowed)')
    g.add_argument('--warmup-lr', type=float, default=1e-6, help='lr at the start of the warm-up')
    g.add_argument('--min-lr', type=float, default=1e-5, help='lr at the end of the schedule')
    g.add_argument('--batch-size', type=int, default=128, help='per process (and per accumulation step)')
    g.add_argument('--eval-batch-size', type=int, default=None, help='per process; None: --batch-size')
    g.add_argument('--grad-accum-steps', type=int, default=1, help='batches per optimizer update')
    g.add_argument('--model-ema', action=argparse.BooleanOptionalAction, default=True,
                   help='keep an EMA of the weights (ModelEmaV3), validated and saved next to them')
    g.add_argument('--model-ema-decay', type=float, default=0.99996, help='EMA decay per optimizer update')
    # Without the warm-up the EMA of a short run (a fine-tune of a few thousand updates) barely leaves the
    # weights of its first update. With it the decay after t updates is min(decay, 1 - (1 + t) ** (-2/3)):
    # 0.999 after 31.6k updates, 0.9999 after 1M; a 300-epoch ImageNet run at global batch 1024 ends near 0.9998.
    g.add_argument('--model-ema-warmup', action=argparse.BooleanOptionalAction, default=True,
                   help='ramp the EMA decay up: min(decay, 1 - (1 + updates)^(-2/3)) (ModelEmaV3 use_warmup)')
    g.add_argument('--seed', type=int, default=42, help='data order, augmentation and initial weights')

    g = p.add_argument_group('accelerate')
    g.add_argument('--mixed-precision', default=None, choices=['no', 'fp16', 'bf16'],
                   help='None: what `accelerate launch`/`accelerate config` says, else no')
    g.add_argument('--compile', action='store_true', help='torch.compile the model (TorchDynamoPlugin)')
    g.add_argument('--compile-mode', default=None, help='torch.compile mode, e.g. max-autotune')

    g = p.add_argument_group('outputs')
    g.add_argument('--output', default=None, help='output folder; None: out/<model>')
    g.add_argument('--checkpoint-every', type=int, default=1000, help='also checkpoint every N updates (0: epochs only)')
    g.add_argument('--keep-checkpoints', type=int, default=3, help='keep the last K checkpoints (0: all)')
    g.add_argument('--resume', default=None,
                   help="checkpoint folder, or 'latest' (the newest one in <output>/checkpoints whose files match "
                        'its manifest)')
    g.add_argument('--resume-without-rng', action='store_true',
                   help='accept a checkpoint whose RNG state cannot be restored for every process (damaged, or '
                        'written by fewer processes): training continues, but not as an uninterrupted run would')
    g.add_argument('--stop-after-steps', type=int, default=None,
                   help='checkpoint and stop after this many updates in total (the schedule still spans --epochs)')
    g.add_argument('--log-interval', type=int, default=50, help='updates between metric rows')
    g.add_argument('--log-with', default=None, help="Accelerate tracker, e.g. 'tensorboard'")
    g.add_argument('--no-plot', action='store_true', help='skip training_curves.png')
    g.add_argument('--push-to-hub', default=None, metavar='ORG/NAME', help='push final/ with spformer.hub')
    g.add_argument('--hub-private', action='store_true', help='create the --push-to-hub repo private')
    return p


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    config_parser = argparse.ArgumentParser(add_help=False)
    config_parser.add_argument('--config', default=None)
    known, _ = config_parser.parse_known_args(argv)
    # The YAML file stands for the flags it sets, put before the command line's: the same parser checks
    # both (types, choices, booleans), and a flag given on the command line comes later, so it wins.
    config_argv = config_to_argv(parser, Path(known.config)) if known.config else []
    args = parser.parse_args(config_argv + argv)
    check_args(args)
    return args


def config_to_argv(parser: argparse.ArgumentParser, path: Path) -> List[str]:
    """The flags that the YAML mapping in `path` stands for, each checked on its own by the same parser (a
    second instance) so that an error names the key: ``key: value`` is ``--key=value``, a boolean
    ``--key``/``--no-key`` (for an on/off flag only ``true`` adds it), a list the several values of an nargs
    option, ``null`` the default None."""
    where = f'--config {path}'
    if not path.is_file():
        raise ConfigError(f'--config: {str(path)!r} is not a file; expected a YAML file of flag defaults')
    try:
        cfg = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f'--config: {str(path)!r} is not valid YAML ({" ".join(str(e).split())})') from e
    if not isinstance(cfg, dict):
        raise ConfigError(f'--config: {str(path)!r} holds a {type(cfg).__name__}; expected a mapping flag: value')
    actions = {a.dest: a for a in parser._actions if a.option_strings and a.dest not in ('help', 'config')}
    unknown = sorted(str(k) for k in cfg if str(k).replace('-', '_') not in actions and str(k) != 'config')
    if unknown:
        raise ConfigError(f'--config: {str(path)!r} sets unknown options {unknown}; expected flag names as in --help')
    checker = build_parser()
    argv = []
    for key, value in cfg.items():
        if str(key) == 'config':
            continue
        action = actions[str(key).replace('-', '_')]
        flag, shown = action.option_strings[0], json.dumps(value, default=str)

        def bad(expected: str):
            raise ConfigError(f'{where}: {key}: {shown} {expected}')

        if action.nargs == 0:  # an on/off flag: YAML true or false, never a string such as "false"
            if not isinstance(value, bool):
                bad('is not a boolean; expected true or false (unquoted)')
            if isinstance(action, argparse.BooleanOptionalAction):
                tokens = [flag if value else '--no-' + flag[2:]]
            else:
                tokens = [flag] if value else []
        elif value is None:
            if action.default is not None:
                bad(f'is null; expected a value (the default is {action.default})')
            continue
        elif isinstance(action.nargs, int):
            if not isinstance(value, list) or len(value) != action.nargs:
                bad(f'is not a list of {action.nargs} values; expected e.g. {json.dumps(action.default)}')
            if any(isinstance(v, (bool, list, dict)) or v is None for v in value):
                bad(f'holds a value that is not a number; expected {action.nargs} numbers')
            tokens = [flag, *map(str, value)]
        else:
            if isinstance(value, (list, dict)):
                bad(f'is a {"list" if isinstance(value, list) else "mapping"}; expected a single value')
            if isinstance(value, bool):
                bad('is a boolean; expected ' + ('a number' if action.type in (int, float) else
                                                 'a string (quote it)'))
            tokens = [f'{flag}={value}']
        # The same checks as on the command line, reported as a one-line ConfigError naming the key.
        checker.error = lambda message, bad=bad: bad(argparse_reason(message))
        checker.parse_args(tokens)
        argv += tokens
    return argv


def argparse_reason(message: str) -> str:
    """argparse's complaint about one value, as the rest of a sentence that starts with the value."""
    if re.search(r'invalid int value', message):
        return 'is not an integer'
    if re.search(r'invalid float value', message):
        return 'is not a number'
    choice = re.search(r'invalid choice: .*\(choose from (.*)\)', message)
    if choice:
        return f'is not one of {choice.group(1)}'
    return f'is refused: {message}'


def check_args(args: argparse.Namespace) -> None:
    """Flag combinations and ranges that can be judged before touching data or models."""
    if (args.data_dir is None) == (args.hf_dataset is None):
        raise ConfigError(f'--data-dir / --hf-dataset: got data_dir={args.data_dir!r}, hf_dataset={args.hf_dataset!r}; '
                          'expected exactly one of them (an ImageFolder root or a Hugging Face dataset)')
    if args.streaming and args.hf_dataset is None:
        raise ConfigError('--streaming: needs --hf-dataset (an ImageFolder --data-dir is read map-style)')
    if args.streaming and args.skip_bad_images:
        raise ConfigError('--skip-bad-images: not available with --streaming (a streamed sample has no index, so no '
                          'fixed next sample to replace it with); expected a map-style dataset, or no --streaming')
    if args.resume_without_rng and not args.resume:
        raise ConfigError('--resume-without-rng: got it without --resume; expected --resume latest or a checkpoint '
                          'folder')
    if args.val_split is None:
        args.val_split = 'val' if args.data_dir is not None else 'validation'
    for name in ('batch_size', 'grad_accum_steps', 'epochs', 'log_interval'):
        if getattr(args, name) < 1:
            raise ConfigError(f'--{name.replace("_", "-")}: got {getattr(args, name)}; expected an integer >= 1')
    for name in ('workers', 'checkpoint_every', 'keep_checkpoints'):
        if getattr(args, name) < 0:
            raise ConfigError(f'--{name.replace("_", "-")}: got {getattr(args, name)}; expected an integer >= 0')
    if args.stop_after_steps is not None and args.stop_after_steps < 1:
        raise ConfigError(f'--stop-after-steps: got {args.stop_after_steps}; expected an integer >= 1')
    if args.layer_decay is not None and not 0 < args.layer_decay <= 1:
        raise ConfigError(f'--layer-decay: got {args.layer_decay}; expected a value in (0, 1], e.g. 0.65')
    if not 0 <= args.model_ema_decay < 1:
        raise ConfigError(f'--model-ema-decay: got {args.model_ema_decay}; expected a value in [0, 1)')
    if args.pretrained and args.initial_checkpoint:
        raise ConfigError('--pretrained / --initial-checkpoint: got both; expected one source of initial weights')
    if args.initial_checkpoint is not None and not Path(args.initial_checkpoint).exists():
        raise ConfigError(f'--initial-checkpoint: {args.initial_checkpoint!r} does not exist; '
                          'expected a .safetensors file of model weights or a training output folder')
    if mixup_active(args) and args.batch_size % 2:
        raise ConfigError(f'--batch-size: got {args.batch_size} per process; Mixup/CutMix (--mixup {args.mixup}, '
                          f'--cutmix {args.cutmix}) pair up the samples of a batch and need an even per-process '
                          'batch size; pass an even --batch-size, or --mixup 0 --cutmix 0')
    name = args.model
    if not name.startswith(('hf-hub:', 'local-dir:')) and not timm.is_model(name):
        raise ConfigError(f'--model: {name!r} is not a registered timm model; expected one of the spformer models '
                          f'{timm.list_models("spformer*")} (or any timm model name, or hf-hub:ORG/NAME)')
    if args.output is None:
        args.output = str(Path('out') / re.sub(r'[^A-Za-z0-9_.-]+', '_', name))


def mixup_active(args: argparse.Namespace) -> bool:
    return args.mixup > 0 or args.cutmix > 0


def initial_weights(args) -> Optional[Tuple[str, str]]:
    """(model reference, the flag it comes from) of the weights to start from, or None for a random init.
    Checked before any data is read: --pretrained on a model without published weights names the flags to
    pass instead (the model's own error gives Python calls, which a user of this script cannot type)."""
    if args.initial_checkpoint:
        path = args.initial_checkpoint
        if Path(path).is_file() and timm.is_model(args.model):
            return f'{args.model}={path}', '--initial-checkpoint'
        return path, '--initial-checkpoint'
    if not args.pretrained:
        return None
    if not args.model.startswith(('hf-hub:', 'local-dir:')) and \
            weights_source(timm.models.get_pretrained_cfg(args.model)) is None:
        raise ConfigError(
            f'--pretrained: no weights are published for --model {args.model}; expected --initial-checkpoint '
            'FILE.safetensors (or a training output folder) to start from weights of your own, --model '
            'hf-hub:ORG/NAME --pretrained for weights pushed to the Hub, or no --pretrained for a random init')
    return args.model, '--model'


# ----------------------------------------------------------------------------------------------------------
# Data: a sample is drawn by (epoch, index); its augmentation is seeded by (seed, epoch, index).
# ----------------------------------------------------------------------------------------------------------

def key_seed(*key: int) -> int:
    """One 32-bit seed from a key such as (seed, epoch, index), through numpy's SeedSequence: distinct keys
    give unrelated seeds (a sum would give (seed 43, epoch 0) the stream of (seed 42, epoch 1))."""
    return int(np.random.SeedSequence([k & 0xFFFFFFFF for k in key]).generate_state(1)[0])


@contextlib.contextmanager
def seeded_rngs(*key: int):
    """Seed the python, numpy and torch CPU RNGs (timm's transforms draw from all three) from `key` inside
    the block; restore them afterwards, so that loading data never moves the training loop's RNGs."""
    seed = key_seed(*key)
    py_state, np_state, torch_state = random.getstate(), np.random.get_state(), torch.get_rng_state()
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    try:
        yield
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)
        torch.set_rng_state(torch_state)


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


def data_error_line(error: ImageReadError) -> str:
    """The message of an ImageReadError on one line. Re-raised by a DataLoader worker, its message is the
    worker's whole traceback text, whose last line is 'spformer.images.ImageReadError: <message>'."""
    lines = [line for line in str(error).splitlines() if line.strip()]
    last = lines[-1] if lines else ''
    if len(lines) > 1 and 'ImageReadError: ' in last:
        last = last.split('ImageReadError: ', 1)[1]
    return last.strip()


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


def rng_isolated(loader):
    """Iterate `loader` without disturbing the torch CPU RNG of the training loop: starting a DataLoader
    iterator draws a worker seed from it, which would make a resumed run diverge from an uninterrupted one."""
    iterator = iter(loader)
    try:
        while True:
            with torch.random.fork_rng(devices=[]):
                try:
                    batch = next(iterator)
                except StopIteration:
                    return
            yield batch
    finally:
        getattr(iterator, 'close', lambda: None)()


# ----------------------------------------------------------------------------------------------------------
# Checkpoints: Accelerate's state (model, optimizer, scaler, RNG) + this script's (JSON, safetensors) + a
# manifest written last, in a temporary folder that is fsynced and renamed. Nothing read back can run code.
# ----------------------------------------------------------------------------------------------------------

class TrainState:
    """Position in training: epoch, batches consumed in it (per process) and optimizer updates so far, and
    the settings that give those numbers their meaning (`layout`)."""

    def __init__(self, layout: Dict[str, Any]):
        self.epoch = 0
        self.batch_in_epoch = 0
        self.update = 0
        self.layout = dict(layout)
        self.saved_layout = dict(layout)

    def state_dict(self) -> Dict[str, Any]:
        return dict(epoch=self.epoch, batch_in_epoch=self.batch_in_epoch, update=self.update, layout=self.layout)

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        position = [state['epoch'], state['batch_in_epoch'], state['update']]
        if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in position):
            raise ValueError(f'epoch, batch_in_epoch and update are {position}; expected integers >= 0')
        self.epoch, self.batch_in_epoch, self.update = position
        self.saved_layout = dict(state.get('layout', {}))

    def layout_changes(self) -> List[str]:
        return [f'{k} {self.saved_layout.get(k)} -> {v}' for k, v in self.layout.items() if self.saved_layout.get(k) != v]


CHECKPOINT_RE = re.compile(r'^step_(\d+)$')
MANIFEST = 'manifest.json'  # {"files": {name: {"size": bytes, "sha256": hex}}}, written last
TRAINING_STATE = 'training_state.json'  # TrainState and the lr scheduler
EMA_WEIGHTS = 'model_ema.safetensors'
RNG_STATE_RE = re.compile(r'^random_states_(\d+)\.pkl$')  # Accelerate's, one per process
PICKLED_SUFFIXES = ('.pkl', '.bin', '.pt', '.pth')  # what Accelerate writes with torch.save


def list_checkpoints(root: Path) -> List[Path]:
    """Checkpoint folders under root, oldest first (temporary folders of unfinished writes are not listed;
    whether a listed one is intact is checkpoint_problems')."""
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := CHECKPOINT_RE.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def fsync_tree(path: Path) -> None:
    for folder, _, files in os.walk(path):
        for name in files:
            fd = os.open(os.path.join(folder, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, 'rb') as f:
        for block in iter(lambda: f.read(1 << 20), b''):
            h.update(block)
    return h.hexdigest()


def checkpoint_files(folder: Path) -> List[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob('*') if p.is_file() or p.is_symlink())


def write_training_state(folder: Path, state: TrainState, scheduler, model_ema: Optional[ModelEmaV3]) -> None:
    """What this script adds to Accelerate's state, in formats that load without running code: the position
    in the data and the lr schedule as JSON (floats round-trip exactly), the EMA weights as safetensors.
    (Objects registered with Accelerate would be pickled, and Accelerate unpickles them unrestricted.)"""
    import safetensors.torch
    (folder / TRAINING_STATE).write_text(json.dumps(
        dict(train_state=state.state_dict(), lr_scheduler=scheduler.state_dict()), indent=1) + '\n')
    if model_ema is not None:
        safetensors.torch.save_model(model_ema.module, str(folder / EMA_WEIGHTS), metadata={'format': 'pt'})


def load_training_state(folder: Path, state: TrainState, scheduler, model_ema: Optional[ModelEmaV3],
                        device) -> None:
    import safetensors.torch
    where = f'--resume: {str(folder)!r}'
    try:
        saved = json.loads((folder / TRAINING_STATE).read_text())
        state.load_state_dict(saved['train_state'])
        schedule = dict(saved['lr_scheduler'])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ConfigError(f'{where}: {TRAINING_STATE} is unreadable ({type(e).__name__}: {e}); expected the one '
                          'this script writes') from e
    if set(schedule) != set(scheduler.state_dict()):
        raise ConfigError(f'{where}: the lr schedule in {TRAINING_STATE} is not a {type(scheduler).__name__}\'s; '
                          'expected the flags of the run that wrote it (the same --sched)')
    scheduler.load_state_dict(schedule)
    has_ema = (folder / EMA_WEIGHTS).is_file()
    if has_ema != (model_ema is not None):
        raise ConfigError(f'{where} was written {"with" if has_ema else "without"} an EMA of the weights; expected '
                          f'the flags of the run that wrote it ({"--model-ema" if has_ema else "--no-model-ema"})')
    if model_ema is not None:
        try:
            safetensors.torch.load_model(model_ema.module, str(folder / EMA_WEIGHTS), strict=True, device=str(device))
        except RuntimeError as e:
            raise ConfigError(f'{where}: {EMA_WEIGHTS} does not fit this model ({" ".join(str(e).split())[:300]}); '
                              'expected the flags of the run that wrote it') from e


def save_checkpoint(accelerator, root: Path, update: int, keep: int, config_text: str, state: TrainState,
                    scheduler, model_ema: Optional[ModelEmaV3]) -> Path:
    """Atomically write checkpoints/step_<update>; keep the newest `keep` (0: all). Called by every process."""
    final = root / f'step_{update:08d}'
    tmp = root / f'.tmp-step_{update:08d}'
    if accelerator.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob('.tmp-*'):  # left by a run that died while writing
            shutil.rmtree(stale, ignore_errors=True)
        tmp.mkdir()
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))  # every process writes its RNG state here (a shared filesystem)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        write_training_state(tmp, state, scheduler, model_ema)
        (tmp / 'train_config.yaml').write_text(config_text)
        # Last: size and sha256 of every file. A folder whose files match it was written completely, and a
        # file damaged or replaced later is named on resume instead of failing inside a loader (or, for an
        # RNG state, being skipped by Accelerate without a word).
        files = {name: dict(size=(tmp / name).stat().st_size, sha256=file_sha256(tmp / name))
                 for name in checkpoint_files(tmp)}
        (tmp / MANIFEST).write_text(json.dumps(dict(files=files), indent=1) + '\n')
        if os.environ.get('SPFORMER_TRAIN_TEST_KILL_AT') == str(update):  # test hook: die mid-write
            os.kill(os.getpid(), signal.SIGKILL)
        fsync_tree(tmp)
        if final.exists():  # a run resumed from an older checkpoint reached this update again
            old = root / f'.tmp-old-step_{update:08d}'
            os.rename(final, old)
            os.rename(tmp, final)
            shutil.rmtree(old)
        else:
            os.rename(tmp, final)
        fsync_tree_dir = os.open(root, os.O_RDONLY)
        try:
            os.fsync(fsync_tree_dir)
        finally:
            os.close(fsync_tree_dir)
        if keep:
            for old in list_checkpoints(root)[:-keep]:
                shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final


def checkpoint_problems(folder: Path) -> List[Tuple[str, str]]:
    """What is wrong with a checkpoint folder, as (file, why) pairs, worst first; [] when every file matches
    the manifest and every pickled file is plain data that Accelerate will restore. Pickled files are read
    weights-only (tensors, numbers, numpy arrays): one that holds anything else is reported, never run."""
    planted = sorted(p.name for p in folder.glob('custom_checkpoint_*.pkl'))
    if planted:
        return [(planted[0], 'a pickled custom state, which this script neither writes nor loads (unpickling it '
                             'could run code): the checkpoint was written by an older train_imagenet.py, or the '
                             'file was planted')]
    try:
        files = json.loads((folder / MANIFEST).read_text())['files']
        if not all(isinstance(e, dict) and isinstance(e.get('size'), int) and isinstance(e.get('sha256'), str)
                   for e in files.values()):
            raise ValueError('an entry without size and sha256')
    except FileNotFoundError:
        return [(MANIFEST, 'missing: not a checkpoint of this script, or one whose writing did not finish')]
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        return [(MANIFEST, f'unreadable ({type(e).__name__}: {e})')]
    problems = []
    for name, entry in files.items():
        path = folder / name
        if Path(name).is_absolute() or '..' in Path(name).parts:
            problems.append((name, 'names a file outside the checkpoint folder'))
        elif not path.is_file():
            problems.append((name, 'missing (listed in the manifest)'))
        elif path.stat().st_size != entry['size']:
            problems.append((name, f'{path.stat().st_size} bytes where the manifest says {entry["size"]} '
                                   '(truncated or overwritten)'))
        elif file_sha256(path) != entry['sha256']:
            problems.append((name, 'its sha256 differs from the manifest (damaged or replaced)'))
        elif name.endswith(PICKLED_SUFFIXES):
            problem = pickled_file_problem(path)
            if problem:
                problems.append((name, problem))
    problems += [(name, 'not in the manifest (added after the checkpoint was written)')
                 for name in checkpoint_files(folder) if name != MANIFEST and name not in files]
    return problems


def pickled_file_problem(path: Path) -> Optional[str]:
    """Why one of Accelerate's torch.save files cannot be restored, or None. Accelerate loads them weights-only
    too, but a refused file then fails with advice to unpickle it unrestricted, and an RNG state that cannot
    be restored is passed over with a note at info level: so each is loaded here first, weights-only."""
    from accelerate.utils import load
    try:  # memory-mapped when it can be: the optimizer state is twice the model
        loaded = load(path, map_location='cpu', weights_only=True, mmap=zipfile.is_zipfile(path))
    except pickle.UnpicklingError as e:  # (its text advises unrestricted unpickling: never here)
        named = re.search(r'GLOBAL ([\w.]+)', str(e))
        if named:
            return (f'holds a pickled reference to {named.group(1)}, not only tensors, numbers and arrays: refused, '
                    'since unpickling it could run code')
        detail = re.search(r'WeightsUnpickler error:\s*([^\n]+)', str(e))
        return (f'cannot be unpickled weights-only ({detail.group(1).strip() if detail else "refused"}): damaged, '
                'or holding objects other than tensors, numbers and arrays, which are refused since unpickling '
                'them could run code')
    except Exception as e:
        return f'cannot be read ({type(e).__name__}: {" ".join(str(e).split())[:200]})'
    if RNG_STATE_RE.match(path.name):
        try:  # into private generators: the process-wide ones are restored by Accelerate
            random.Random().setstate(loaded['random_state'])
            np.random.RandomState().set_state(loaded['numpy_random_seed'])
            torch.Generator().set_state(loaded['torch_manual_seed'])
        except Exception as e:
            return f'is not a restorable RNG state ({type(e).__name__}: {" ".join(str(e).split())[:200]})'
    return None


def is_rng_problem(problem: Tuple[str, str]) -> bool:
    return RNG_STATE_RE.match(problem[0]) is not None


def resolve_resume(args, output: Path) -> Tuple[Optional[Path], List[str]]:
    """The checkpoint to resume from (None: --resume latest found none) and notes to print: for 'latest', the
    newer checkpoints passed over and why; with --resume-without-rng, the RNG states it will not restore."""
    def blocking(problems):
        return [p for p in problems if not (args.resume_without_rng and is_rng_problem(p))]

    def rng_notes(path, problems):
        return [f'warning: {path / name}: {why}; its RNG state is not restored (--resume-without-rng), so this '
                'run will not repeat an uninterrupted one exactly' for name, why in problems if RNG_STATE_RE.match(name)]

    if args.resume == 'latest':
        root, skipped = output / 'checkpoints', []
        for path in reversed(list_checkpoints(root)):
            problems = checkpoint_problems(path)
            if not blocking(problems):
                return path, skipped + rng_notes(path, problems)
            name, why = blocking(problems)[0]
            skipped.append(f'--resume latest: skipping {path.name}: {name}: {why}')
        if skipped:
            raise ConfigError(f'--resume latest: no checkpoint under {str(root)!r} is intact ('
                              + '; '.join(s.split(': ', 1)[1] for s in skipped) + '); expected at least one whose '
                              'files match its manifest, or a new --output to start over')
        return None, []
    path = Path(args.resume)
    if not path.is_dir():
        raise ConfigError(f'--resume: {args.resume!r} is not a checkpoint folder; expected a checkpoints/step_N '
                          "folder written by this script, or 'latest'")
    problems = checkpoint_problems(path)
    if blocking(problems):
        name, why = blocking(problems)[0]
        hint = ('pass --resume-without-rng to continue without it (not as an uninterrupted run would)'
                if is_rng_problem((name, why)) else
                "expected an intact checkpoint ('--resume latest' takes the newest one that is)")
        raise ConfigError(f'--resume: {str(path / name)!r} {why}; {hint}')
    return path, rng_notes(path, problems)


def check_rng_states(folder: Path, num_processes: int, without_rng: bool, accelerator) -> None:
    """Every process of this run needs the RNG state of its own process in the checkpoint (Accelerate restarts
    the RNG of one that has none, with only a warning about "fewer processes")."""
    writers = {int(m.group(1)) for p in folder.iterdir() if (m := RNG_STATE_RE.match(p.name))}
    missing = [i for i in range(num_processes) if i not in writers]
    if not missing:
        return
    what = (f'{str(folder)!r} was written by {len(writers)} process(es) and this run has {num_processes}: '
            f'process(es) {", ".join(map(str, missing))} have no RNG state (random_states_<process>.pkl) to restore '
            'for drop path and Mixup')
    if not without_rng:
        raise ConfigError(f'--resume: {what}, so this run would not repeat an uninterrupted one; expected '
                          f'{len(writers)} process(es), or --resume-without-rng to continue anyway')
    accelerator.print(f'warning: {what}; they start from --seed instead (--resume-without-rng)')


def lock_output(output: Path, resources: contextlib.ExitStack) -> Optional[str]:
    """Hold <output>/.lock (flock) until the run ends, so that a second run on the same --output stops at once
    instead of interleaving its checkpoints and metrics with this one's. The kernel drops the lock when the
    process dies, so a run killed without cleanup never blocks the next one. Returns None, or the pid that
    the holder wrote into the file."""
    output.mkdir(parents=True, exist_ok=True)
    lock = resources.enter_context(open(output / '.lock', 'a+'))
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        # The holder writes its pid just after taking the lock, over the pid of the run before (dead): poll
        # for a second until the file names a live process (one on another machine is never seen alive).
        holder = ''
        for _ in range(100):
            lock.seek(0)
            holder = lock.read().strip()
            if holder.isdigit() and process_alive(int(holder)):
                break
            time.sleep(0.01)
        return holder or 'unknown'
    lock.truncate(0)
    lock.write(f'{os.getpid()}\n')
    lock.flush()
    return None


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


# ----------------------------------------------------------------------------------------------------------
# Evaluation, logging, final export.
# ----------------------------------------------------------------------------------------------------------

@torch.no_grad()
def evaluate(model: nn.Module, loader, accelerator, num_classes: int) -> Dict[str, float]:
    """Top-1 (percent), loss and, with more than 5 classes, top-5 over the whole validation set, gathered
    across processes. With 5 classes or fewer top-5 would count every prediction as a hit: it is left out."""
    model.eval()
    k = min(5, num_classes)
    correct1 = correct5 = loss_sum = count = 0.
    for batch in rng_isolated(loader):
        with accelerator.autocast():
            logits = model(batch['image'])
        losses = nn.functional.cross_entropy(logits.float(), batch['label'], reduction='none')
        topk = logits.topk(k, dim=1).indices
        topk, labels, losses = accelerator.gather_for_metrics((topk, batch['label'], losses))
        hits = topk == labels[:, None]
        correct1 += hits[:, 0].sum().item()
        correct5 += hits.any(dim=1).sum().item()
        loss_sum += losses.sum().item()
        count += labels.numel()
    results = dict(top1=100. * correct1 / count)
    if num_classes > 5:
        results['top5'] = 100. * correct5 / count
    return dict(results, loss=loss_sum / count, samples=int(count))


class MetricsLog:
    """metrics.jsonl on the main process, plus the Accelerate trackers (if any)."""

    def __init__(self, accelerator, path: Path, resume_update: Optional[int]):
        self.accelerator, self.path = accelerator, path
        if accelerator.is_main_process and resume_update is not None and path.exists():
            # Rows logged after the checkpoint we resume from belong to a run that did not survive (and so
            # may a torn last line). Replaced atomically: a kill now must not lose the rows before it.
            rows = [r for r in self.read(path) if r['update'] <= resume_update]
            tmp = path.with_name(path.name + '.tmp')
            with tmp.open('w') as f:
                f.write(''.join(json.dumps(r) + '\n' for r in rows))
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)

    def log(self, row: Dict[str, Any]) -> None:
        if self.accelerator.is_main_process:
            with self.path.open('a') as f:
                f.write(json.dumps(row) + '\n')
        values = {f'{row["kind"]}/{k}': v for k, v in row.items() if isinstance(v, (int, float)) and k != 'update'}
        self.accelerator.log(values, step=row['update'])

    @staticmethod
    def read(path: Path) -> List[Dict[str, Any]]:
        """The rows of a metrics.jsonl. A last line that does not parse is a row torn by a kill mid-write: it is
        dropped. A bad line before it is damage that dropping would hide: a ConfigError names it."""
        lines = path.read_text(errors='replace').splitlines()
        while lines and not lines[-1].strip():
            lines.pop()
        rows = []
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                if not isinstance(row, dict) or not isinstance(row.get('update'), int) or 'kind' not in row:
                    raise ValueError('not a row with "kind" and "update"')
            except ValueError as e:
                if number == len(lines):
                    break
                raise ConfigError(f'{str(path)!r}: line {number} of {len(lines)} is not a metrics row ({e}): '
                                  f'{line[:80]!r}; expected one JSON row per line (repair or remove that line)') from e
            rows.append(row)
        return rows


def accuracy_text(results: Dict[str, Any], suffix: str = '') -> str:
    """'top-1 T1  top-5 T5' of validation results (top-5 only where evaluate reports it)."""
    return '  '.join(f'top-{k} {results[f"top{k}{suffix}"]:.2f}' for k in (1, 5) if f'top{k}{suffix}' in results)


def plot_curves(metrics: Path, out: Path) -> None:
    try:
        from matplotlib.figure import Figure
    except ImportError:
        print(f'note: matplotlib is not installed (pip install matplotlib), so {out.name} was not drawn')
        return
    rows = MetricsLog.read(metrics)
    train = [r for r in rows if r['kind'] == 'train']
    val = [r for r in rows if r['kind'] == 'val']
    fig = Figure(figsize=(13, 3.6), layout='constrained')
    ax_loss, ax_lr, ax_acc = fig.subplots(1, 3)
    ax_loss.plot([r['update'] for r in train], [r['loss'] for r in train])
    ax_loss.set(xlabel='update', ylabel='train loss', title='training loss')
    ax_lr.plot([r['update'] for r in train], [r['lr'] for r in train])
    ax_lr.set(xlabel='update', ylabel='lr', title='learning rate')
    for key, label in (('top1', 'top-1'), ('top5', 'top-5'), ('top1_ema', 'top-1 EMA')):
        if any(key in r for r in val):
            ax_acc.plot([r['epoch'] for r in val if key in r], [r[key] for r in val if key in r], 'o-', label=label)
    ax_acc.set(xlabel='epoch', ylabel='accuracy (%)', title='validation')
    ax_acc.legend()
    fig.savefig(out, dpi=110)


def export_final(accelerator, model: nn.Module, model_ema: Optional[ModelEmaV3], folder: Path,
                 class_names: List[str], data_config: Dict[str, Any], config_text: str,
                 results: Dict[str, Any]) -> None:
    """final/: config.json + model.safetensors (timm's save_for_hf layout), model_ema.safetensors, config, results.
    The config is spformer.hub's (save_config): no run-time arguments, and no pretrained tag that the data does
    not earn (``in1k`` only for 1000 classes of ImageNet-1k)."""
    import safetensors.torch
    if not accelerator.is_main_process:
        return
    tmp = folder.with_name(folder.name + '.tmp')
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    unwrapped = accelerator.unwrap_model(model, keep_torch_compile=False)
    label_names = list(class_names) if len(class_names) == unwrapped.num_classes else None
    export_data_config = {k: data_config[k] for k in ('input_size', 'interpolation', 'mean', 'std', 'crop_pct')}
    datasets = resolve_datasets(None, yaml.safe_load(config_text), unwrapped.num_classes)
    for name, module in (('model.safetensors', unwrapped), ('model_ema.safetensors', model_ema and model_ema.module)):
        if module is not None:
            safetensors.torch.save_file(clean_state_dict(module.state_dict()), str(tmp / name), metadata={'format': 'pt'})
    save_config(unwrapped, tmp / 'config.json', label_names=label_names, datasets=datasets,
                data_config=export_data_config)
    (tmp / 'train_config.yaml').write_text(config_text)
    (tmp / 'results.json').write_text(json.dumps(results, indent=2) + '\n')
    fsync_tree(tmp)
    if folder.exists():
        shutil.rmtree(folder)
    os.rename(tmp, folder)


def tensor_digest(tensor: torch.Tensor) -> str:
    """sha256 of a tensor's dtype, shape and bytes (the test dump's record of an augmented image)."""
    tensor = tensor.detach().cpu().contiguous()
    h = hashlib.sha256(f'{tensor.dtype} {tuple(tensor.shape)} '.encode())
    h.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def state_digest(module: nn.Module) -> str:
    h = hashlib.sha256()
    for k, v in module.state_dict().items():
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


# ----------------------------------------------------------------------------------------------------------
# The training script.
# ----------------------------------------------------------------------------------------------------------

def main(argv: Optional[Sequence[str]] = None) -> int:
    """Errors the user can fix end in one line (exit status 2); SPFORMER_DEBUG=1 shows their traceback."""
    try:
        with contextlib.ExitStack() as resources:  # the --output lock, held until the run ends
            return train(parse_args(argv), resources)
    except (ConfigError, ImageReadError) as e:
        if debug_enabled():
            raise
        message = str(e)
        if isinstance(e, ImageReadError):
            message = data_error_line(e)
            if '--skip-bad-images' not in message:
                message += ('; expected a readable image (fix or remove the file), or --skip-bad-images to replace '
                            'unreadable images by the next readable sample and list them in skipped_images.txt')
        print(f'train_imagenet.py: error: {message}', file=sys.stderr)
        return 2


def train(args: argparse.Namespace, resources: contextlib.ExitStack) -> int:
    from accelerate import Accelerator
    from accelerate.utils import DistributedType, TorchDynamoPlugin, broadcast, set_seed

    output = Path(args.output)
    push_to_hub = None
    if args.push_to_hub:  # fail now rather than after training
        try:
            from spformer.hub import push_to_hub
        except ImportError as e:
            raise ConfigError(f'--push-to-hub: got {args.push_to_hub!r} but spformer.hub.push_to_hub cannot be '
                              f'imported ({e}); expected a complete install of spformer (pip install spformer)') from e
    start = initial_weights(args)  # before reading any data: a bad --pretrained fails at once
    if args.log_with == 'tensorboard':
        from accelerate.utils import is_tensorboard_available
        if not is_tensorboard_available():
            raise ConfigError("--log-with: got 'tensorboard' but neither tensorboard nor tensorboardX is installed; "
                              'expected `pip install tensorboard` first')

    # Accelerator: processes, devices, mixed precision, gradient accumulation, trackers, torch.compile.
    accelerator = Accelerator(
        mixed_precision=args.mixed_precision,
        gradient_accumulation_steps=args.grad_accum_steps,
        log_with=args.log_with,
        project_dir=str(output),
        dynamo_plugin=TorchDynamoPlugin(backend='inductor', mode=args.compile_mode) if args.compile else None,
        step_scheduler_with_optimizer=False,
    )
    if accelerator.distributed_type == DistributedType.FSDP and args.model_ema:
        raise ConfigError('--model-ema: ModelEmaV3 keeps a full copy of the weights and cannot follow FSDP shards; '
                          'expected --no-model-ema with FSDP')
    global_batch = args.batch_size * accelerator.num_processes * args.grad_accum_steps
    if args.lr is None:
        args.lr = args.lr_base * global_batch / args.lr_base_size

    # The output folder is this run's until it ends (the main process holds its lock, every process stops if
    # another run holds it); then the checkpoint to resume from, checked before anything is loaded from it.
    holder = lock_output(output, resources) if accelerator.is_main_process else None
    if accelerator.num_processes > 1:
        code = -1 if holder is None else int(holder) if holder.isdigit() else 0
        code = int(broadcast(torch.tensor([code], device=accelerator.device)).item())
        holder = None if code == -1 else str(code or 'unknown')
    if holder is not None:
        raise ConfigError(f'--output: {str(output)!r} is in use by another training run (process {holder} holds '
                          f'{str(output / ".lock")!r}); expected a different --output, or that run to end first')
    resume_from, resume_notes = resolve_resume(args, output) if args.resume else (None, [])
    for note in resume_notes:
        accelerator.print(note)
    if resume_from is not None:
        check_rng_states(resume_from, accelerator.num_processes, args.resume_without_rng, accelerator)
    elif list_checkpoints(output / 'checkpoints'):
        raise ConfigError(f'--output: {str(output)!r} already holds checkpoints of an earlier run; expected '
                          '--resume latest to continue it, or a new --output')
    skipped = SkippedImages(output / 'skipped_images.txt') if args.skip_bad_images else None
    if accelerator.is_main_process and resume_from is None and (output / 'skipped_images.txt').exists():
        (output / 'skipped_images.txt').unlink()  # a fresh run reports its own

    # Data sources and class names (cheap: no image is decoded yet).
    if args.data_dir is not None:
        train_source, val_source, class_names = load_image_folder(args)
    else:
        train_source, val_source, class_names = load_hf_dataset(args)
    num_classes = args.num_classes or len(class_names)
    if class_names and num_classes < len(class_names):
        raise ConfigError(f'--num-classes: got {num_classes} but the data has {len(class_names)} classes; '
                          f'expected at least {len(class_names)}')

    # Model: the same initial weights on every process (DDP would broadcast them anyway).
    set_seed(args.seed)
    model_kwargs = dict(num_classes=num_classes, drop_path_rate=args.drop_path, drop_rate=args.drop)
    if args.img_size is not None:
        model_kwargs['img_size'] = args.img_size
    if args.attn_backend is not None:
        model_kwargs['attn_backend'] = args.attn_backend
    # Initial weights through the loader every spformer tool uses (spformer.hub.load_model): a file keeps its
    # head when it has num_classes rows (else the head is re-initialised), and its position embeddings are
    # resampled to --img-size.
    try:
        if start is None:
            model = timm.create_model(args.model, **model_kwargs)
        else:
            loaded = load_model(start[0], argument=start[1], require_weights=True, seed=None,
                                model_name=None if args.model.startswith(('hf-hub:', 'local-dir:')) else args.model,
                                **model_kwargs)
            model = loaded.model
            accelerator.print(f'initial weights: {loaded.weights}')
    except ModelReferenceError as e:
        raise ConfigError(str(e)) from e
    except ValueError as e:
        if 'img_size' in str(e):
            raise ConfigError(f'--img-size: got {args.img_size}; {e}') from e
        raise
    if args.grad_checkpointing:
        model.set_grad_checkpointing()
    data_config, train_transform, eval_transform = build_transforms(args, model)

    # Loaders. Accelerate shards these plain loaders over the processes.
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
    # drop_last: every process gets the same number of full batches; the few images left over (fewer than
    # one global batch) are a different random few every epoch.
    batches_per_epoch = train_samples // (args.batch_size * accelerator.num_processes)
    if batches_per_epoch < 1:
        raise ConfigError(f'--batch-size: got {args.batch_size} per process x {accelerator.num_processes} processes, '
                          f'more than the {train_samples} training images; expected a smaller batch')
    updates_per_epoch = math.ceil(batches_per_epoch / args.grad_accum_steps)

    # Optimizer (weight-decay groups, layer decay), Mixup/CutMix and the loss.
    optimizer = create_optimizer_v2(
        model, args.opt, lr=args.lr, weight_decay=args.weight_decay, momentum=args.momentum,
        layer_decay=args.layer_decay, eps=args.opt_eps, **({'betas': tuple(args.opt_betas)} if 'adam' in args.opt else {}))
    mixup_fn = None
    if mixup_active(args):
        mixup_fn = Mixup(mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, prob=args.mixup_prob,
                         switch_prob=args.mixup_switch_prob, mode=args.mixup_mode,
                         label_smoothing=args.smoothing, num_classes=num_classes)
        criterion = SoftTargetCrossEntropy()
    elif args.smoothing > 0:
        criterion = LabelSmoothingCrossEntropy(smoothing=args.smoothing)
    else:
        criterion = nn.CrossEntropyLoss()

    model, optimizer, train_loader, val_loader = accelerator.prepare(model, optimizer, train_loader, val_loader)
    if not args.streaming:
        assert len(train_loader) == batches_per_epoch, (len(train_loader), batches_per_epoch)

    # The lr schedule is timm's, stepped by hand once per optimizer update (Accelerate does not drive it).
    scheduler, num_epochs = create_scheduler_v2(
        optimizer, sched=args.sched, num_epochs=args.epochs, warmup_epochs=args.warmup_epochs,
        warmup_lr=args.warmup_lr, min_lr=args.min_lr, step_on_epochs=False, updates_per_epoch=updates_per_epoch)
    # EMA of the weights as DDP holds them after prepare (identical on every process).
    model_ema = None
    if args.model_ema:
        model_ema = ModelEmaV3(accelerator.unwrap_model(model, keep_torch_compile=False),
                               decay=args.model_ema_decay, use_warmup=args.model_ema_warmup)
    state = TrainState(dict(
        num_processes=accelerator.num_processes, batch_size=args.batch_size, grad_accum_steps=args.grad_accum_steps,
        epochs=args.epochs, seed=args.seed, train_samples=train_samples, model=args.model, lr=args.lr))
    # state, scheduler and model_ema are saved by save_checkpoint as JSON and safetensors, not registered
    # with Accelerate (which would pickle them, and unpickle them unrestricted on resume).

    config_text = (
        f'# effective configuration of train_imagenet.py (reusable with --config)\n'
        f'# {accelerator.num_processes} process(es) x batch {args.batch_size} x {args.grad_accum_steps} accumulation '
        f'= global batch {global_batch}; lr {args.lr:.4g}; {updates_per_epoch} updates/epoch x {num_epochs} epochs; '
        f'{num_classes} classes; input {tuple(data_config["input_size"])}; mixed precision '
        f'{accelerator.mixed_precision}; timm {timm.__version__}, torch {torch.__version__}\n'
        + yaml.safe_dump(vars(args), sort_keys=False))
    if accelerator.is_main_process:
        output.mkdir(parents=True, exist_ok=True)
        (output / 'train_config.yaml').write_text(config_text)
    accelerator.print(config_text.split('\n')[1][2:])

    # Resume: weights, optimizer, scaler, RNG states (Accelerate's files, all checked by resolve_resume and
    # unpickled weights-only), then the scheduler, EMA and the position in the data (JSON, safetensors).
    set_seed(args.seed, device_specific=True)  # per-process drop path / Mixup draws
    if args.resume and resume_from is None:
        accelerator.print(f'--resume latest: no checkpoint under {output / "checkpoints"}, starting from scratch')
    if resume_from is not None:
        try:
            accelerator.load_state(str(resume_from))
        except RuntimeError as e:
            raise ConfigError(f'--resume: {str(resume_from)!r} does not match this configuration '
                              f'({" ".join(str(e).split())[:300]}); expected the flags of the run that wrote it') from e
        load_training_state(resume_from, state, scheduler, model_ema, accelerator.device)
        accelerator.print(f'resumed from {resume_from}: epoch {state.epoch}, batch {state.batch_in_epoch}, '
                          f'update {state.update}')
        if state.layout_changes():
            accelerator.print(f'warning: resuming with changed settings ({", ".join(state.layout_changes())}): '
                              'training continues from the saved state but will not repeat an uninterrupted run')
    if args.log_with:
        accelerator.init_trackers('spformer', config={k: v for k, v in vars(args).items()
                                                      if isinstance(v, (int, float, str, bool))})
    metrics = MetricsLog(accelerator, output / 'metrics.jsonl', state.update if resume_from else None)
    if accelerator.is_main_process and resume_from is None and metrics.path.exists():
        metrics.path.unlink()
    checkpoint_root = output / 'checkpoints'
    test_dump = os.environ.get('SPFORMER_TRAIN_TEST_DUMP')
    samples_seen: Dict[int, List[int]] = {}
    images_seen: Dict[int, List[str]] = {}
    batches_seen: List[Dict[str, Any]] = []
    grads_seen: List[Dict[str, Any]] = []
    unwrapped = accelerator.unwrap_model(model, keep_torch_compile=False)
    broadcast_buffers = accelerator.distributed_type in (DistributedType.MULTI_GPU, DistributedType.MULTI_CPU,
                                                         DistributedType.MULTI_XPU, DistributedType.MULTI_NPU) \
        and any(True for _ in unwrapped.buffers())
    val_results: Dict[str, Any] = {}
    stopped = False

    # The loop: one epoch = one pass over this process's shard; one update = grad_accum_steps batches.
    for epoch in range(state.epoch, num_epochs):
        model.train()
        epoch_ref['epoch'] = epoch
        if train_sampler is not None:
            train_sampler.set_epoch(epoch)
        train_loader.set_epoch(epoch)
        loader = train_loader
        if state.batch_in_epoch:
            loader = accelerator.skip_first_batches(train_loader, state.batch_in_epoch)
        progress = tqdm(total=updates_per_epoch, initial=state.batch_in_epoch // args.grad_accum_steps,
                        desc=f'epoch {epoch + 1}/{num_epochs}', disable=not accelerator.is_local_main_process,
                        dynamic_ncols=True)
        resources.callback(progress.close)  # an error message then starts on a line of its own
        loss_sum, loss_count, interval_start, interval_batches = torch.zeros((), device=accelerator.device), 0, \
            time.perf_counter(), 0
        for batch in rng_isolated(loader):
            if state.batch_in_epoch >= batches_per_epoch:  # a stream longer than its recorded size
                break
            images, targets = batch['image'], batch['label']
            if test_dump:  # (before Mixup, which mixes the images in place)
                samples_seen.setdefault(epoch, []).extend(batch['index'].tolist())
                images_seen.setdefault(epoch, []).extend(tensor_digest(image) for image in images)
            if mixup_fn is not None:
                images, targets = mixup_fn(images, targets)
            with accelerator.accumulate(model):
                logits = model(images)
                loss = criterion(logits, targets)
                if test_dump:
                    batches_seen.append(dict(targets=targets.float().cpu().tolist(), loss=loss.item(),
                                             logits=logits.detach().float().cpu().tolist()))
                accelerator.backward(loss)
                if accelerator.sync_gradients and args.clip_grad is not None:
                    norm = accelerator.clip_grad_norm_(model.parameters(), args.clip_grad)
                    if test_dump:  # the norm before clipping and after
                        grads_seen.append(dict(update=state.update + 1, norm=float(norm), clipped=float(
                            torch.linalg.vector_norm(torch.stack([p.grad.detach().float().norm()
                                                                  for p in model.parameters() if p.grad is not None])))))
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            state.batch_in_epoch += 1
            loss_sum += loss.detach()
            loss_count += 1
            interval_batches += 1
            if not accelerator.sync_gradients:
                continue

            state.update += 1
            update_lr = max(group['lr'] for group in optimizer.param_groups)  # the lr this update used
            scheduler.step_update(num_updates=state.update)
            if broadcast_buffers:  # BatchNorm statistics of the last forward are per process; take rank 0's, as
                for buffer in unwrapped.buffers():  # DDP does before each forward, so all ranks hold equal models
                    torch.distributed.broadcast(buffer, src=0)
            if model_ema is not None:
                model_ema.update(unwrapped, step=state.update)
            progress.update(1)
            end_of_epoch = state.batch_in_epoch >= batches_per_epoch
            if state.update % args.log_interval == 0 or end_of_epoch:
                mean_loss = accelerator.reduce(loss_sum / loss_count, reduction='mean').item()
                elapsed = time.perf_counter() - interval_start
                row = dict(kind='train', epoch=epoch, update=state.update, loss=mean_loss,
                           lr=update_lr,
                           img_per_s=interval_batches * args.batch_size * accelerator.num_processes / elapsed)
                metrics.log(row)
                progress.set_postfix(loss=f'{mean_loss:.4f}', lr=f'{row["lr"]:.3g}', img_s=f'{row["img_per_s"]:.1f}')
                loss_sum.zero_()
                loss_count, interval_start, interval_batches = 0, time.perf_counter(), 0
            stop = args.stop_after_steps is not None and state.update >= args.stop_after_steps
            if not end_of_epoch and ((args.checkpoint_every and state.update % args.checkpoint_every == 0) or stop):
                save_checkpoint(accelerator, checkpoint_root, state.update, args.keep_checkpoints, config_text,
                                state, scheduler, model_ema)
            if stop and not end_of_epoch:
                stopped = True
                break
        progress.close()
        if stopped:
            break

        # End of epoch: validate the weights and their EMA, then checkpoint at the new position.
        state.epoch, state.batch_in_epoch = epoch + 1, 0
        val_results = evaluate(model, val_loader, accelerator, num_classes)
        if model_ema is not None:
            ema_results = evaluate(model_ema.module, val_loader, accelerator, num_classes)
            val_results.update({f'{k}_ema': v for k, v in ema_results.items() if k != 'samples'})
        metrics.log(dict(kind='val', epoch=epoch + 1, update=state.update, **val_results))
        accelerator.print(f'epoch {epoch + 1}/{num_epochs}: val {accuracy_text(val_results)}' + (
            f'  (EMA {accuracy_text(val_results, "_ema")})' if model_ema is not None else ''))
        save_checkpoint(accelerator, checkpoint_root, state.update, args.keep_checkpoints, config_text, state,
                        scheduler, model_ema)
        if args.stop_after_steps is not None and state.update >= args.stop_after_steps and epoch + 1 < num_epochs:
            stopped = True
            break

    if test_dump:
        Path(test_dump).mkdir(parents=True, exist_ok=True)
        record = dict(process_index=accelerator.process_index, num_processes=accelerator.num_processes,
                      samples={str(k): v for k, v in samples_seen.items()},
                      images={str(k): v for k, v in images_seen.items()}, batches=batches_seen, grads=grads_seen,
                      weights_sha256=state_digest(unwrapped),
                      ema_sha256=state_digest(model_ema.module) if model_ema is not None else None)
        (Path(test_dump) / f'rank{accelerator.process_index}.json').write_text(json.dumps(record))
    if stopped:
        accelerator.print(f'stopped after {state.update} updates (--stop-after-steps); continue with --resume latest')
        accelerator.end_training()
        return 0

    # Final weights (timm layout), results, curves, and optionally the Hub.
    if not val_results:  # resumed a finished run: validate again for results.json
        val_results = evaluate(model, val_loader, accelerator, num_classes)
        if model_ema is not None:
            ema_results = evaluate(model_ema.module, val_loader, accelerator, num_classes)
            val_results.update({f'{k}_ema': v for k, v in ema_results.items() if k != 'samples'})
    results = {k: v for k, v in val_results.items() if not k.startswith('samples')}
    # final/ keeps both weight files; results.json says which validated better, for whoever loads them.
    choice = choose_weights(val_results)
    if choice is not None:
        results.update(selected_weights='ema' if choice.ema else 'model', selection_reason=choice.reason)
    final = output / 'final'
    export_final(accelerator, model, model_ema, final, class_names, data_config, config_text, results)
    if test_dump and accelerator.is_main_process:
        x = torch.randn(2, *data_config['input_size'], generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            logits = dict(model=unwrapped.eval()(x.to(accelerator.device)).float().cpu())
            if model_ema is not None:
                logits['model_ema'] = model_ema.module.eval()(x.to(accelerator.device)).float().cpu()
        torch.save(dict(input=x, **logits), Path(test_dump) / 'final_logits.pt')
    if accelerator.is_main_process:
        if not args.no_plot:
            plot_curves(metrics.path, output / 'training_curves.png')
        accelerator.print(f'final weights and results in {final}: ' + json.dumps(
            {k: round(v, 3) for k, v in results.items() if isinstance(v, float)}))
        if choice is not None:
            accelerator.print(f'final weights to use: {final / choice.file_name} ({choice.label}): {choice.reason}')
        if push_to_hub is not None:
            push_to_hub(str(final), args.push_to_hub, private=args.hub_private)
            accelerator.print(f'pushed {final} to https://huggingface.co/{args.push_to_hub}')
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return 0


if __name__ == '__main__':
    sys.exit(main())
