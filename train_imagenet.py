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
import json
import math
import sys
import time
from pathlib import Path
from typing import Any, Dict, Optional, Sequence

import torch
import torch.nn as nn
from tqdm.auto import tqdm

import timm
from timm.data import Mixup
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from timm.utils import ModelEmaV3

from spformer.cli import debug_enabled  # (importing spformer registers the spformer_* models with timm)
from spformer.images import ImageReadError
from spformer.training.checkpoints import TrainState, checkpoint_to_resume, claim_output, resume_run, save_checkpoint
from spformer.training.config import (ConfigError, build_accelerator, build_parser, check_log_with, effective_config,
                                      mixup_active, parse_args)
from spformer.training.data import (EpochShuffleSampler, SkippedImages, TransformedDataset, build_loaders,
                                    build_transforms, hf_sample, image_error_message, load_image_folder,
                                    load_sources, posterize_zero_bits_as_black)
from spformer.training.dump import RunDump, tensor_digest
from spformer.training.export import export_final, final_results, import_push_to_hub
from spformer.training.metrics import MetricsLog, accuracy_text, evaluate, open_metrics_log, plot_curves, validate
from spformer.training.model import broadcast_buffers, build_model, initial_weights
from spformer.training.rng import rng_isolated

PROG = 'train_imagenet.py'
# The script's own names and the package's pieces that the tests reach as train_imagenet.<name>.
__all__ = ['main', 'parse_args', 'build_parser', 'ConfigError', 'ImageReadError', 'TransformedDataset',
           'EpochShuffleSampler', 'SkippedImages', 'MetricsLog', 'evaluate', 'hf_sample', 'load_image_folder',
           'build_transforms', 'posterize_zero_bits_as_black', 'tensor_digest']


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Errors the user can fix end in one line (exit status 2); SPFORMER_DEBUG=1 shows their traceback."""
    try:
        with contextlib.ExitStack() as resources:  # the --output lock, held until the run ends
            return train(parse_args(argv), resources)
    except (ConfigError, ImageReadError) as e:
        if debug_enabled():
            raise
        message = image_error_message(e) if isinstance(e, ImageReadError) else str(e)
        print(f'{PROG}: error: {message}', file=sys.stderr)
        return 2


def train(args: argparse.Namespace, resources: contextlib.ExitStack) -> int:
    from accelerate.utils import DistributedType, set_seed

    output = Path(args.output)
    push_to_hub = import_push_to_hub(args)  # fail now rather than after training
    start = initial_weights(args)  # before reading any data: a bad --pretrained fails at once
    check_log_with(args)

    # Accelerator: processes, devices, mixed precision, gradient accumulation, trackers, torch.compile.
    accelerator = build_accelerator(args, output)
    if accelerator.distributed_type == DistributedType.FSDP and args.model_ema:
        raise ConfigError('--model-ema: ModelEmaV3 keeps a full copy of the weights and cannot follow FSDP shards; '
                          'expected --no-model-ema with FSDP')
    global_batch = args.batch_size * accelerator.num_processes * args.grad_accum_steps
    if args.lr is None:
        args.lr = args.lr_base * global_batch / args.lr_base_size

    # The output folder is this run's until it ends (the main process holds its lock, every process stops if
    # another run holds it); then the checkpoint to resume from, checked before anything is loaded from it.
    claim_output(accelerator, output, resources)
    resume_from = checkpoint_to_resume(args, output, accelerator)
    skipped = SkippedImages(output / 'skipped_images.txt') if args.skip_bad_images else None
    if accelerator.is_main_process and resume_from is None and (output / 'skipped_images.txt').exists():
        (output / 'skipped_images.txt').unlink()  # a fresh run reports its own

    # Data sources and class names (cheap: no image is decoded yet).
    train_source, val_source, class_names, num_classes = load_sources(args)

    # Model: the same initial weights on every process (DDP would broadcast them anyway).
    set_seed(args.seed)
    model = build_model(args, num_classes, start, accelerator)
    data_config, train_transform, eval_transform = build_transforms(args, model)

    # Loaders. Accelerate shards these plain loaders over the processes.
    train_loader, val_loader, train_samples, set_train_epoch = build_loaders(
        args, train_source, val_source, train_transform, eval_transform, skipped)
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

    # The effective configuration: train_config.yaml here, in every checkpoint and in final/.
    summary = (f'{accelerator.num_processes} process(es) x batch {args.batch_size} x {args.grad_accum_steps} '
               f'accumulation = global batch {global_batch}; lr {args.lr:.4g}; {updates_per_epoch} updates/epoch x '
               f'{num_epochs} epochs; {num_classes} classes; input {tuple(data_config["input_size"])}; mixed '
               f'precision {accelerator.mixed_precision}; timm {timm.__version__}, torch {torch.__version__}')
    config_text = effective_config(args, PROG, summary)
    if accelerator.is_main_process:
        output.mkdir(parents=True, exist_ok=True)
        (output / 'train_config.yaml').write_text(config_text)
    accelerator.print(summary)

    # Resume: weights, optimizer, scaler, RNG states (Accelerate's files, all checked by checkpoint_to_resume
    # and unpickled weights-only), then the scheduler, EMA and the position in the data (JSON, safetensors).
    resume_run(accelerator, args, output, resume_from, state, scheduler, model_ema)
    metrics = open_metrics_log(accelerator, args, output, state.update if resume_from else None)
    checkpoint_root = output / 'checkpoints'
    dump = RunDump.from_environment()  # test-only (SPFORMER_TRAIN_TEST_DUMP)
    unwrapped = accelerator.unwrap_model(model, keep_torch_compile=False)
    val_results: Dict[str, Any] = {}
    stopped = False

    # The loop: one epoch = one pass over this process's shard; one update = grad_accum_steps batches.
    for epoch in range(state.epoch, num_epochs):
        model.train()
        set_train_epoch(epoch)
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
            if dump:  # (before Mixup, which mixes the images in place)
                dump.inputs(epoch, batch)
            if mixup_fn is not None:
                images, targets = mixup_fn(images, targets)
            with accelerator.accumulate(model):
                logits = model(images)
                loss = criterion(logits, targets)
                if dump:
                    dump.outputs(targets, logits, loss)
                accelerator.backward(loss)
                if accelerator.sync_gradients and args.clip_grad is not None:
                    norm = accelerator.clip_grad_norm_(model.parameters(), args.clip_grad)
                    if dump:  # the norm before clipping and after
                        dump.gradient_norm(state.update + 1, norm, model)
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
            broadcast_buffers(accelerator, unwrapped)  # rank 0's BatchNorm statistics, so all ranks hold equal models
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
        val_results = validate(model, model_ema, val_loader, accelerator, num_classes)
        metrics.log(dict(kind='val', epoch=epoch + 1, update=state.update, **val_results))
        accelerator.print(f'epoch {epoch + 1}/{num_epochs}: val {accuracy_text(val_results)}' + (
            f'  (EMA {accuracy_text(val_results, "_ema")})' if model_ema is not None else ''))
        save_checkpoint(accelerator, checkpoint_root, state.update, args.keep_checkpoints, config_text, state,
                        scheduler, model_ema)
        if args.stop_after_steps is not None and state.update >= args.stop_after_steps and epoch + 1 < num_epochs:
            stopped = True
            break

    if dump:
        dump.write(accelerator, unwrapped, model_ema)
    if stopped:
        accelerator.print(f'stopped after {state.update} updates (--stop-after-steps); continue with --resume latest')
        accelerator.end_training()
        return 0

    # Final weights (timm layout), results, curves, and optionally the Hub.
    if not val_results:  # resumed a finished run: validate again for results.json
        val_results = validate(model, model_ema, val_loader, accelerator, num_classes)
    results, choice = final_results(val_results)
    final = output / 'final'
    export_final(accelerator, model, model_ema, final, class_names, data_config, config_text, results)
    if dump and accelerator.is_main_process:
        dump.write_final_logits(unwrapped, model_ema, data_config['input_size'], accelerator.device)
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

