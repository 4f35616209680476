"""The model a run trains: timm's, from the weights it starts from (--pretrained, --initial-checkpoint), loaded
through spformer.hub.load_model as every spformer tool loads them."""
import argparse
from pathlib import Path
from typing import Optional, Tuple

import timm
import torch
import torch.nn as nn

from spformer.hub.checkpoint import ModelReferenceError, load_model, weights_source
from spformer.training.config import ConfigError


def initial_weights(args: argparse.Namespace) -> Optional[Tuple[str, str]]:
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


def build_model(args: argparse.Namespace, num_classes: int, start: Optional[Tuple[str, str]],
                accelerator) -> nn.Module:
    """--model with `num_classes` outputs, --drop-path, --drop, --img-size and --attn-backend, randomly
    initialised (from the RNGs as they are) or from the weights `start` (initial_weights) names."""
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
    return model


def broadcast_buffers(accelerator, model: nn.Module) -> None:
    """In a multi-process run, give every process rank 0's buffers of `model` (unwrapped), as DDP does before
    each forward: the BatchNorm statistics of the last forward are per process, and after an update every
    rank must hold an equal model (and EMA). Nothing to do in a single process."""
    from accelerate.utils import DistributedType
    if accelerator.distributed_type in (DistributedType.MULTI_GPU, DistributedType.MULTI_CPU,
                                        DistributedType.MULTI_XPU, DistributedType.MULTI_NPU):
        for buffer in model.buffers():
            torch.distributed.broadcast(buffer, src=0)
