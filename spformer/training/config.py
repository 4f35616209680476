"""Arguments of a training script: flag groups, a YAML file of defaults (``--config``) turned into flags, the
checks of a combination of flags, and the effective configuration written next to the outputs.

A script builds its parser from the groups it needs (``build_parser`` is train_imagenet.py's: the DeiT recipe)
and parses with :func:`parse_with_config`: the YAML file stands for the flags it sets, so one parser checks
both and a flag on the command line wins. A bad value is a :class:`ConfigError` naming the flag or key.
"""
import argparse
import json
import os
import re
import sys
from pathlib import Path
from typing import Callable, List, Optional, Sequence

import timm
import yaml

from spformer.kernels.functional import BACKENDS


class ConfigError(ValueError):
    """Bad input: the message names the argument, what it got and what it expects."""


def default_workers() -> int:
    """min(8, the CPUs this process may run on): more loader processes than CPUs only compete for them."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count()
    return min(8, cpus or 1)


def add_data_arguments(parser: argparse.ArgumentParser, *, data_dir_help: Optional[str] = None,
                       label_help: str = 'integer (ClassLabel) label column of --hf-dataset',
                       streaming: bool = True, skip_bad_images: bool = True) -> argparse._ArgumentGroup:
    """Where the images come from (an ImageFolder root or a Hugging Face dataset) and how they are loaded.
    Another script words --data-dir and --label-column its way, and leaves out --streaming (with
    --train-samples, --shuffle-buffer) and --skip-bad-images where it has no such path. Returns the group."""
    g = parser.add_argument_group('data')
    g.add_argument('--data-dir', default=None,
                   help=data_dir_help or 'ImageFolder root with <train-split>/ and <val-split>/ class folders')
    g.add_argument('--hf-dataset', default=None, help='Hugging Face dataset name or local path (load_dataset)')
    g.add_argument('--hf-config', default=None, help='dataset configuration name of --hf-dataset')
    g.add_argument('--train-split', default='train', help='training split: folder of --data-dir, split of --hf-dataset')
    g.add_argument('--val-split', default=None,
                   help="validation split; None: 'val' for --data-dir, 'validation' for --hf-dataset")
    g.add_argument('--image-column', default='image', help='image column of --hf-dataset')
    g.add_argument('--label-column', default='label', help=label_help)
    if streaming:
        g.add_argument('--streaming', action='store_true', help='stream the training split of --hf-dataset')
        g.add_argument('--train-samples', type=int, default=None,
                       help='training split size, needed with --streaming when the dataset does not record it')
        g.add_argument('--shuffle-buffer', type=int, default=10000, help='shuffle buffer of --streaming')
    g.add_argument('--workers', type=int, default=default_workers(),
                   help='data loader processes per training process: min(8, CPUs available) unless set')
    if skip_bad_images:
        g.add_argument('--skip-bad-images', action='store_true',
                       help='replace an unreadable image by the next readable sample (the same one every epoch and '
                            'on resume) and list it in <output>/skipped_images.txt; without it the run stops naming it')
    return g


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """The model to train and the weights it starts from."""
    g = parser.add_argument_group('model')
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


def add_augmentation_arguments(parser: argparse.ArgumentParser) -> None:
    """The DeiT recipe's augmentation: timm's create_transform (RandAugment, random erasing), Mixup/CutMix
    and label smoothing."""
    g = parser.add_argument_group('augmentation (timm create_transform, Mixup)')
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


def add_optimizer_arguments(parser: argparse.ArgumentParser) -> None:
    """Optimizer, lr schedule (stepped per optimizer update), batch sizes, the EMA of the weights, seed."""
    g = parser.add_argument_group('optimizer and schedule (timm create_optimizer_v2, create_scheduler_v2)')
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


def add_accelerate_arguments(parser: argparse.ArgumentParser) -> None:
    """Mixed precision and torch.compile, handed to the Accelerator."""
    g = parser.add_argument_group('accelerate')
    g.add_argument('--mixed-precision', default=None, choices=['no', 'fp16', 'bf16'],
                   help='None: what `accelerate launch`/`accelerate config` says, else no')
    g.add_argument('--compile', action='store_true', help='torch.compile the model (TorchDynamoPlugin)')
    g.add_argument('--compile-mode', default=None, help='torch.compile mode, e.g. max-autotune')


def add_output_arguments(parser: argparse.ArgumentParser, *, hub: bool = True) -> argparse._ArgumentGroup:
    """The output folder: checkpoints and resumption, metrics, the final weights and (``hub``) their publication
    with spformer.hub (--push-to-hub, --hub-private). Returns the group."""
    g = parser.add_argument_group('outputs')
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
    if hub:
        add_hub_arguments(g)
    return g


def add_hub_arguments(group) -> None:
    """--push-to-hub ORG/NAME and --hub-private: publish final/ with spformer.hub at the end of the run (in
    ``group``, a parser or an argument group)."""
    group.add_argument('--push-to-hub', default=None, metavar='ORG/NAME', help='push final/ with spformer.hub')
    group.add_argument('--hub-private', action='store_true', help='create the --push-to-hub repo private')


def build_parser() -> argparse.ArgumentParser:
    """train_imagenet.py's flags, with the DeiT recipe's defaults."""
    p = argparse.ArgumentParser(
        description='Train or fine-tune SPFormer (any timm model) with Accelerate and the DeiT recipe.',
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument('--config', default=None, help='YAML file of defaults (keys are flag names); flags override it')
    add_data_arguments(p)
    add_model_arguments(p)
    add_augmentation_arguments(p)
    add_optimizer_arguments(p)
    add_accelerate_arguments(p)
    add_output_arguments(p)
    return p


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """train_imagenet.py's arguments: flags over --config, checked (check_args)."""
    args = parse_with_config(build_parser, argv)
    check_args(args)
    return args


def parse_with_config(make_parser: Callable[[], argparse.ArgumentParser],
                      argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """`argv` (default: the command line) parsed by `make_parser()`'s parser, after the flags that the YAML
    file of its --config stands for."""
    parser = make_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    config_parser = argparse.ArgumentParser(add_help=False)
    config_parser.add_argument('--config', default=None)
    known, _ = config_parser.parse_known_args(argv)
    # The YAML file stands for the flags it sets, put before the command line's: the same parser checks
    # both (types, choices, booleans), and a flag given on the command line comes later, so it wins.
    config_argv = config_to_argv(parser, Path(known.config), make_parser()) if known.config else []
    return parser.parse_args(config_argv + argv)


def config_to_argv(parser: argparse.ArgumentParser, path: Path, checker: argparse.ArgumentParser) -> List[str]:
    """The flags that the YAML mapping in `path` stands for, each checked on its own by `checker` (a second
    instance of `parser`, whose error handler this replaces) so that an error names the key: ``key: value``
    is ``--key=value``, a boolean ``--key``/``--no-key`` (for an on/off flag only ``true`` adds it), a list
    the several values of an nargs option, ``null`` the default None."""
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


def effective_config(args: argparse.Namespace, prog: str, summary: str) -> str:
    """The arguments as YAML (reusable with --config) under two comment lines: whose they are, and `summary`
    (what they came to in this run: processes, batch, lr, ...)."""
    return (f'# effective configuration of {prog} (reusable with --config)\n# {summary}\n'
            + yaml.safe_dump(vars(args), sort_keys=False))


def check_log_with(args: argparse.Namespace) -> None:
    """--log-with: a tracker that is not installed stops the run now, not when Accelerate starts it."""
    if args.log_with == 'tensorboard':
        from accelerate.utils import is_tensorboard_available
        if not is_tensorboard_available():
            raise ConfigError("--log-with: got 'tensorboard' but neither tensorboard nor tensorboardX is installed; "
                              'expected `pip install tensorboard` first')


def build_accelerator(args: argparse.Namespace, output):
    """The Accelerator of a training script: processes, devices, mixed precision, gradient accumulation,
    trackers and torch.compile from the shared flags; the schedulers are stepped by hand, once per update."""
    from accelerate import Accelerator
    from accelerate.utils import TorchDynamoPlugin
    return Accelerator(
        mixed_precision=args.mixed_precision,
        gradient_accumulation_steps=args.grad_accum_steps,
        log_with=args.log_with,
        project_dir=str(output),
        dynamo_plugin=TorchDynamoPlugin(backend='inductor', mode=args.compile_mode) if args.compile else None,
        step_scheduler_with_optimizer=False,
    )
