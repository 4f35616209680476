#!/usr/bin/env python
"""Semantic segmentation training of SP-Transformer with Accelerate and the paper's recipe.

    accelerate launch train_segmentation.py --model sp_transformer_r50_cityscapes --data-dir /data/cityscapes
    python train_segmentation.py --model sp_transformer_r50_ade20k --data-dir /data/ADEChallengeData2016 \\
        --crop-size 640 640 --updates 160000
    accelerate launch train_segmentation.py ... --resume latest        # continue exactly where it stopped

Data: a dataset folder (``--data-dir``) in one of the layouts of spformer.eval.datasets (``--layout auto``:
Cityscapes leftImg8bit/gtFine train ids, ADE20K ADEChallengeData2016, Pascal VOC, or <split>/images +
<split>/labels folders), or a Hugging Face dataset (``--hf-dataset`` name, local dataset or save_to_disk
folder) with an image column and a label column of class-id pictures. Labels are class ids, 255 is not
evaluated; a value outside the classes stops the run naming the file and the values.

The recipe (the paper's; every default in ``--help``, settable by flag or in a ``--config`` YAML file):
AdamW, lr 1e-3 and 0.1x on the backbone, weight decay 0.05, a linear warm-up of 5000 updates then poly
decay (power 0.9) stepped per update, the top-k (20 %) pixel cross-entropy ignoring 255, random scale
0.5-2.0 + colour jitter + pad + random crop (``--crop-size``) + flip, mixed precision by Accelerate.
Validation: mIoU from one confusion matrix of the whole set, summed over the processes; whole images
(padded to the token stride) or ``--sliding-window``.

Everything goes under ``--output`` (default ``out/<model>``):

    train_config.yaml     the effective configuration (reusable with --config)
    metrics.jsonl         a row per logged update ("train": loss, lr of the decoder and of the backbone) and per
                          validation ("val": miou, pixel_accuracy, iou per class by name)
    predictions.png       the latest validation's first --picture-images images: image, ground truth, prediction,
                          the model's superpixels
    checkpoints/step_N/   as train_imagenet.py's: Accelerate's state, training_state.json, manifest.json (written
                          last); --resume latest takes the newest intact one
    final/                config.json + model.safetensors (timm.create_model('local-dir:final', pretrained=True)),
                          train_config.yaml, results.json (mIoU, per-class IoU, pixel accuracy); with
                          --push-to-hub ORG/NAME [--hub-private] pushed at the end with spformer.hub (model card,
                          picture), loadable as timm.create_model('hf-hub:ORG/NAME', pretrained=True)
    training_curves.png   loss, lr and validation mIoU (needs matplotlib)
    .lock                 held by the run that writes here

Exact resumption, atomic checkpoints, weights-only loading and one-line errors (``train_segmentation.py:
error: ...``, exit status 2; ``SPFORMER_DEBUG=1`` for the traceback) work as in train_imagenet.py: the
order of the crops depends only on (--seed, epoch), the augmentation of a sample only on (--seed, epoch,
index). The test hooks SPFORMER_TRAIN_TEST_KILL_AT=N and SPFORMER_TRAIN_TEST_DUMP=DIR (sample indices and
augmented crops per epoch, final weights' sha256, final_logits.pt) are train_imagenet.py's.
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
from tqdm.auto import tqdm

import timm
from timm.optim import create_optimizer_v2
from timm.scheduler import PolyLRScheduler

from spformer.cli import debug_enabled  # (importing spformer registers the models with timm)
from spformer.errors import UserError
from spformer.models.sp_transformer import topk_cross_entropy
from spformer.pictures import save_panels
from spformer.training.checkpoints import TrainState, checkpoint_to_resume, claim_output, resume_run, save_checkpoint
from spformer.training.config import ConfigError, build_accelerator, check_log_with, effective_config, parse_with_config
from spformer.training.data import EpochShuffleSampler, data_error_line
from spformer.training.dump import RunDump
from spformer.training.export import export_final, import_push_to_hub
from spformer.training.metrics import open_metrics_log, plot_curves
from spformer.training.model import broadcast_buffers
from spformer.training.rng import rng_isolated
from spformer.training.segmentation import (DEFAULT_UPDATES, IGNORE_INDEX, PairedAugment, SegmentationSamples,
                                            build_model, build_parser, check_args, evaluate_folder, iou_table,
                                            load_sources, one_line, param_groups, picture_rows, prediction_panels,
                                            validate)

PROG = 'train_segmentation.py'


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Errors the user can fix end in one line (exit status 2); SPFORMER_DEBUG=1 shows their traceback."""
    try:
        with contextlib.ExitStack() as resources:  # the --output lock, held until the run ends
            return train(parse_args(argv), resources)
    except (ConfigError, UserError) as e:
        if debug_enabled():
            raise
        worker = 'Original Traceback' in str(e)  # re-raised from a DataLoader worker: the message is its last line
        print(f'{PROG}: error: {one_line(data_error_line(e) if worker else str(e))}', file=sys.stderr)
        return 2


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    args = parse_with_config(build_parser, argv)
    check_args(args)
    return args


def train(args: argparse.Namespace, resources: contextlib.ExitStack) -> int:
    from accelerate.utils import set_seed

    output = Path(args.output)
    push_to_hub = import_push_to_hub(args)  # fail now rather than after training
    check_log_with(args)
    accelerator = build_accelerator(args, output)
    if args.evaluate:  # no training: score a final/ folder on the validation split
        _, val_source, class_names, num_classes = load_sources(args)
        results = evaluate_folder(args, accelerator, val_source, class_names, num_classes)
        accelerator.print(f'{args.evaluate} ({results["inference"]}, {results["samples"]} images):\n{iou_table(results)}')
        return 0
    # The output folder is this run's until it ends; the checkpoint to resume from is checked before any load.
    claim_output(accelerator, output, resources)
    resume_from = checkpoint_to_resume(args, output, accelerator)

    # Data sources and class names (cheap: no image is decoded yet).
    train_source, val_source, class_names, num_classes = load_sources(args)

    # Model: the same initial weights on every process; its token stride fixes what sizes it takes.
    set_seed(args.seed)
    model = build_model(args, num_classes)
    stride = model.token_stride
    mean, std = model.pretrained_cfg['mean'], model.pretrained_cfg['std']
    data_config = dict(input_size=(3, *args.crop_size), interpolation='bilinear', mean=mean, std=std, crop_pct=1.0)

    # Samples: training crops augmented under per-sample seeds (padding in the mean colour), whole val images.
    augment = PairedAugment(args.crop_size, args.scale_range, args.hflip, args.color_jitter,
                            fill=tuple(round(255 * m) for m in mean))
    train_set = SegmentationSamples(train_source, num_classes, mean, std, augment, args.seed)
    val_set = SegmentationSamples(val_source, num_classes, mean, std)
    sampler = EpochShuffleSampler(len(train_set), args.seed)
    train_loader = torch.utils.data.DataLoader(train_set, batch_size=args.batch_size, sampler=sampler, drop_last=True,
                                               num_workers=args.workers, pin_memory=torch.cuda.is_available())
    batches_per_epoch = len(train_set) // (args.batch_size * accelerator.num_processes)
    if batches_per_epoch < 1:
        raise ConfigError(f'--batch-size: got {args.batch_size} per process x {accelerator.num_processes} processes, '
                          f'more than the {len(train_set)} training images; expected a smaller batch')
    updates_per_epoch = math.ceil(batches_per_epoch / args.grad_accum_steps)
    total_updates = args.updates or (args.epochs * updates_per_epoch if args.epochs else DEFAULT_UPDATES)
    if args.warmup_updates >= total_updates:
        raise ConfigError(f'--warmup-updates: got {args.warmup_updates}, not fewer than the {total_updates} updates of '
                          'the run; expected a shorter warm-up (or a longer run)')

    # Optimizer (backbone at --backbone-lr-scale, no weight decay on norms and biases), the poly schedule.
    optimizer = create_optimizer_v2(
        param_groups(model, args.weight_decay, args.backbone_lr_scale), args.opt, lr=args.lr,
        weight_decay=args.weight_decay, eps=args.opt_eps, **({'betas': tuple(args.opt_betas)} if 'adam' in args.opt else {}))
    model, optimizer, train_loader = accelerator.prepare(model, optimizer, train_loader)
    # timm's poly schedule, stepped by hand once per update: lr_t = warmup_lr + t (lr - warmup_lr) / warmup below
    # --warmup-updates, then min_lr + (lr - min_lr) (1 - t / updates)^power; each group x its lr_scale.
    scheduler = PolyLRScheduler(optimizer, t_initial=total_updates, power=args.poly_power, lr_min=args.min_lr,
                                warmup_t=args.warmup_updates, warmup_lr_init=args.warmup_lr, t_in_epochs=False)
    state = TrainState(dict(
        num_processes=accelerator.num_processes, batch_size=args.batch_size, grad_accum_steps=args.grad_accum_steps,
        updates=total_updates, seed=args.seed, train_samples=len(train_set), model=args.model, lr=args.lr,
        crop_size=list(args.crop_size)))

    # The effective configuration: train_config.yaml here, in every checkpoint and in final/.
    global_batch = args.batch_size * accelerator.num_processes * args.grad_accum_steps
    summary = (f'{accelerator.num_processes} process(es) x batch {args.batch_size} x {args.grad_accum_steps} '
               f'accumulation = global batch {global_batch}; {total_updates} updates ({updates_per_epoch}/epoch), '
               f'lr {args.lr:.4g} (backbone x{args.backbone_lr_scale}); {num_classes} classes, {args.layout} layout; '
               f'crop {args.crop_size[0]}x{args.crop_size[1]}, token stride {stride}; mixed precision '
               f'{accelerator.mixed_precision}; timm {timm.__version__}, torch {torch.__version__}')
    config_text = effective_config(args, PROG, summary)
    if accelerator.is_main_process:
        output.mkdir(parents=True, exist_ok=True)
        (output / 'train_config.yaml').write_text(config_text)
    accelerator.print(summary)

    # Resume: Accelerate's files (checked, unpickled weights-only), then the schedule and the position in the data.
    resume_run(accelerator, args, output, resume_from, state, scheduler)
    metrics = open_metrics_log(accelerator, args, output, state.update if resume_from else None)
    dump = RunDump.from_environment()  # test-only (SPFORMER_TRAIN_TEST_DUMP)
    unwrapped = accelerator.unwrap_model(model, keep_torch_compile=False)

    def run_validation() -> Dict[str, Any]:
        """Validate, log the row, draw predictions.png, and go back to training mode."""
        results = validate(model, val_set, accelerator, num_classes, class_names, args, stride)
        metrics.log(dict(kind='val', epoch=state.epoch, update=state.update, **results))
        accelerator.print(f'update {state.update}/{total_updates}: val mIoU {results["miou"]:.2f}  pixel accuracy '
                          f'{results["pixel_accuracy"]:.2f}  ({results["inference"]}, {len(val_set)} images)')
        if accelerator.is_main_process and args.picture_images:
            rows = picture_rows(unwrapped, val_set, args.picture_images, args, stride, accelerator.device)
            save_panels(output / 'predictions.png', prediction_panels(rows, num_classes),
                        title=f'{args.model}, update {state.update}: val mIoU {results["miou"]:.1f}')
        model.train()
        return results

    # The loop: an epoch is a pass over this process's shard; an update, --grad-accum-steps batches.
    val_results: Dict[str, Any] = {}
    stop = False
    model.train()
    while state.update < total_updates and not stop:
        epoch = state.epoch
        sampler.set_epoch(epoch)
        train_loader.set_epoch(epoch)
        loader = train_loader
        if state.batch_in_epoch:
            loader = accelerator.skip_first_batches(train_loader, state.batch_in_epoch)
        progress = tqdm(total=updates_per_epoch, initial=state.batch_in_epoch // args.grad_accum_steps,
                        desc=f'epoch {epoch + 1}', disable=not accelerator.is_local_main_process, dynamic_ncols=True)
        resources.callback(progress.close)  # an error message then starts on a line of its own
        loss_sum, loss_count, interval_start, interval_batches = torch.zeros((), device=accelerator.device), 0, \
            time.perf_counter(), 0
        for batch in rng_isolated(loader):
            if dump:
                dump.inputs(epoch, batch)
            with accelerator.accumulate(model):
                logits = model(batch['image'])
                loss = topk_cross_entropy(logits.float(), batch['label'], args.top_k_percent, IGNORE_INDEX)
                accelerator.backward(loss)
                if accelerator.sync_gradients and args.clip_grad is not None:
                    accelerator.clip_grad_norm_(model.parameters(), args.clip_grad)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            state.batch_in_epoch += 1
            if state.batch_in_epoch >= batches_per_epoch:  # the position a checkpoint saved now resumes from
                state.epoch, state.batch_in_epoch = epoch + 1, 0
            loss_sum += loss.detach()
            loss_count += 1
            interval_batches += 1
            if not accelerator.sync_gradients:
                continue

            state.update += 1
            lrs = {group['name']: group['lr'] for group in optimizer.param_groups}  # what this update used
            scheduler.step_update(num_updates=state.update)
            broadcast_buffers(accelerator, unwrapped)  # rank 0's BatchNorm statistics on every rank
            progress.update(1)
            done = state.update >= total_updates
            if state.update % args.log_interval == 0 or done:
                mean_loss = accelerator.reduce(loss_sum / loss_count, reduction='mean').item()
                elapsed = time.perf_counter() - interval_start
                row = dict(kind='train', epoch=epoch, update=state.update, loss=mean_loss, lr=lrs['decoder'],
                           lr_backbone=lrs.get('backbone', lrs.get('backbone_no_decay')),
                           img_per_s=interval_batches * args.batch_size * accelerator.num_processes / elapsed)
                metrics.log(row)
                progress.set_postfix(loss=f'{mean_loss:.4f}', lr=f'{row["lr"]:.3g}', img_s=f'{row["img_per_s"]:.1f}')
                loss_sum.zero_()
                loss_count, interval_start, interval_batches = 0, time.perf_counter(), 0
            if done or (args.eval_every and state.update % args.eval_every == 0):
                val_results = run_validation()
            stop = not done and args.stop_after_steps is not None and state.update >= args.stop_after_steps
            if done or stop or (args.checkpoint_every and state.update % args.checkpoint_every == 0):
                save_checkpoint(accelerator, output / 'checkpoints', state.update, args.keep_checkpoints, config_text,
                                state, scheduler, None)
            if done or stop:
                break
        progress.close()

    if dump:
        dump.write(accelerator, unwrapped, None)
    if stop:
        accelerator.print(f'stopped after {state.update} updates (--stop-after-steps); continue with --resume latest')
        accelerator.end_training()
        return 0

    # Final weights (timm layout, loadable without this script), results, curves.
    if not val_results:  # resumed a finished run: validate again for results.json
        val_results = run_validation()
    final = output / 'final'
    results = dict(val_results, updates=state.update)
    export_final(accelerator, model, None, final, class_names, data_config, config_text, results,
                 model_args=dict(backbone_pretrained=False))  # (final/ holds the trained backbone)
    if dump and accelerator.is_main_process:
        dump.write_final_logits(unwrapped, None, data_config['input_size'], accelerator.device)
    if accelerator.is_main_process:
        accelerator.print(iou_table(results))
        if not args.no_plot:
            plot_curves(metrics.path, output / 'training_curves.png', val_curves=(
                ('miou', 'mIoU'), ('pixel_accuracy', 'pixel accuracy')), val_x='update', val_label='val (%)')
        accelerator.print(f'final weights and results in {final}: ' + json.dumps(
            {k: round(v, 3) for k, v in results.items() if isinstance(v, float)}))
        if push_to_hub is not None:
            push_to_hub(str(final), args.push_to_hub, private=args.hub_private)
            accelerator.print(f'pushed {final} to https://huggingface.co/{args.push_to_hub}')
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return 0


if __name__ == '__main__':
    sys.exit(main())
