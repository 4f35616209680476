"""SP-Transformer's superpixel head against the bilinear head, trained on generated street scenes on CPU.

Both are sp_transformer_r18_cityscapes (ResNet-18, here from a random init: nothing is downloaded) with the
same neck and the same pixel stride, trained by train_segmentation.py with the same flags, seed, data
order and augmentation, for the same number of updates; only --decoder differs (superpixel: the
superpixel tokenizer, ViT blocks over superpixels and the association unfolding; bilinear: a 1x1
classifier on the neck's pixel features, upsampled bilinearly). Data: spformer.eval.street_scenes
(Cityscapes layout, 19 classes), a training split and a held-out validation split of other seeds' scenes.

Scored on the validation split (whole images): mIoU and pixel accuracy from one confusion matrix; the
boundary F-score of the predicted class maps (precision and recall of their boundary pixels within 2 px
of the ground truth's, pooled over the images); and, for the superpixel model, its hard superpixels'
boundary recall and achievable segmentation accuracy (spformer.eval.metrics) beside the fixed grid of the
same cells (the superpixels' initial grid: the token stride's squares).

    python bench/segmentation_scenes.py              # about 20 min on 2 CPU cores
    python bench/segmentation_scenes.py --doc        # also write the table into docs/segmentation.md (DOC_PAGE)
                                                     # and the picture docs/segmentation_scenes.png
"""
import argparse
import json
import shlex
import shutil
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from model_table import machine_info, write_between_markers  # noqa: E402
import timm  # noqa: E402
from spformer.eval.datasets import CITYSCAPES_CLASSES, open_dataset  # noqa: E402
from spformer.eval.metrics import achievable_segmentation_accuracy, boundary_map, boundary_recall  # noqa: E402
from spformer.eval.segmentation_metrics import ConfusionMatrix  # noqa: E402
from spformer.eval.street_scenes import write_street_scenes  # noqa: E402
from spformer.pictures import class_palette, colourize, save_panels, superpixel_boundaries  # noqa: E402
from spformer.training.segmentation import padded_size, predict_whole  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DOC_PAGE = 'docs/segmentation.md'  # where the table lives, relative to the repository root (--doc writes there)
PICTURE = 'docs/segmentation_scenes.png'
HEADS = {'superpixel': 'superpixel head (SP-Transformer)', 'bilinear': 'bilinear head (baseline)'}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--train-images', type=int, default=400)
    p.add_argument('--val-images', type=int, default=40)
    p.add_argument('--size', type=int, nargs=2, default=[128, 256], help='H W of the scenes')
    p.add_argument('--crop-size', type=int, nargs=2, default=[96, 192], help='training crops')
    p.add_argument('--updates', type=int, default=1200)
    p.add_argument('--warmup-updates', type=int, default=120)
    p.add_argument('--batch-size', type=int, default=4)
    p.add_argument('--lr', type=float, default=1e-3)
    p.add_argument('--backbone-lr-scale', type=float, default=1.0,
                   help="the backbone's lr factor (1: it starts from a random init here, not from ImageNet weights)")
    p.add_argument('--model-kwargs', default='pixel_stride=4 cell_size=2 neck_dim=128 num_blocks=2 block_heads=4 '
                                             'img_size=(96,192)')
    p.add_argument('--threads', type=int, default=1,
                   help='intra-op threads (default 1: with other jobs on the cores, more threads spin and stall)')
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--out', default='out/segmentation_scenes', help='scenes, runs and the picture')
    p.add_argument('--heads', nargs='+', default=list(HEADS), choices=list(HEADS))
    p.add_argument('--doc', '--readme', nargs='?', default=None, metavar='PATH', const=str(ROOT / DOC_PAGE),
                   help=f'write the table between the <!-- MARKER:start/end --> lines of PATH (default: {DOC_PAGE}, '
                        f'where it lives) and the picture to {PICTURE}')
    p.add_argument('--marker', default='segmentation-scenes', help='marker name in the page')
    args = p.parse_args(argv)
    command = shlex.join(['python', 'bench/segmentation_scenes.py', *(argv if argv is not None else sys.argv[1:])])
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    scenes = out / f'scenes_{args.size[0]}x{args.size[1]}_seed{args.seed}'
    for split, n in (('train', args.train_images), ('val', args.val_images)):
        if len(list((scenes / 'leftImg8bit' / split).rglob('*.png'))) != n:
            write_street_scenes(str(scenes), n, args.size, seed=args.seed, split=split)

    t_start = time.time()
    seconds, fresh = {}, set()  # fresh: trained by this invocation (a finished run is reused)
    for head in args.heads:
        run = out / f'run_{head}'
        t0 = time.time()
        flags = training_flags(args, head)
        cmd = [sys.executable, str(ROOT / 'train_segmentation.py'), '--data-dir', str(scenes), *flags,
               '--output', str(run)]
        timing = run / 'bench_training_seconds.json'
        recorded = json.loads(timing.read_text()) if timing.is_file() else None
        # A finished run is reused only when it was trained with these flags; otherwise it is trained again.
        if not (isinstance(recorded, dict) and recorded.get('flags') == flags):
            shutil.rmtree(run, ignore_errors=True)
            env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), HF_HUB_OFFLINE='1')
            proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
            if proc.returncode:
                sys.exit(f'{" ".join(cmd)}\nexited {proc.returncode}\n{proc.stderr[-4000:]}')
            timing.write_text(json.dumps(dict(seconds=time.time() - t0, flags=flags)))
            fresh.add(head)
        seconds[head] = json.loads(timing.read_text())['seconds']
        print(f'{head}: trained in {seconds[head] / 60:.1f} min', flush=True)

    dataset = open_dataset(str(scenes), 'cityscapes', 'val')
    scores, rows = {}, [dict() for _ in range(3)]
    for head in args.heads:
        model = timm.create_model(f'local-dir:{out / f"run_{head}" / "final"}', pretrained=True).eval()
        scores[head] = evaluate(model, dataset, rows)
        scores[head]['params'] = sum(p.numel() for p in model.parameters())
        scores[head]['train_min'] = seconds[head] / 60
        grid = model.token_stride
    evaluation = time.time() - t_start - sum(s for h, s in seconds.items() if h in fresh)

    lines = ['| head | params | mIoU | pixel acc. | boundary F (2 px) | boundary P / R | training (min) |',
             '|---|---:|---:|---:|---:|---:|---:|']
    for head in args.heads:
        s = scores[head]
        lines.append(f'| {HEADS[head]} | {s["params"] / 1e6:.1f}M | {s["miou"]:.1f} | {s["pixel_accuracy"]:.1f} | '
                     f'{s["boundary_f"]:.1f} | {s["boundary_p"]:.1f} / {s["boundary_r"]:.1f} | {s["train_min"]:.1f} |')
    if 'superpixel' in scores:
        s = scores['superpixel']
        lines += ['', '| superpixels (val images) | segments per image | boundary recall (2 px) | ASA |',
                  '|---|---:|---:|---:|',
                  f'| learned (SP-Transformer, after training) | {s["segments"]:.1f} | {s["sp_br"]:.1f} | '
                  f'{s["sp_asa"]:.1f} |',
                  f'| fixed grid of the same cells ({grid}x{grid} px) | {s["grid_segments"]:.1f} | {s["grid_br"]:.1f} | '
                  f'{s["grid_asa"]:.1f} |']
    ious = {h: scores[h]['iou'] for h in args.heads}
    lines += ['', '<details><summary>IoU per class</summary>', '',
              '| class | ' + ' | '.join(args.heads) + ' |', '|---|' + '---:|' * len(args.heads)]
    for i, name in enumerate(CITYSCAPES_CLASSES):
        lines.append(f'| {name} | ' + ' | '.join('–' if np.isnan(ious[h][i]) else f'{ious[h][i]:.1f}'
                                                 for h in args.heads) + ' |')
    lines += ['', '</details>']
    notes = [
        f'Command: `{command}` ({(sum(seconds.values()) + evaluation) / 60:.0f} min: training '
        + ' + '.join(f'{seconds[h] / 60:.1f}' for h in args.heads) + f', evaluation {evaluation / 60:.1f}).',
        f'Machine: {machine_info(args.threads)}; 1-min load average {os.getloadavg()[0]:.1f} at the end (a load above '
        'the core count means other jobs shared the cores and the training minutes are rough).',
        f'Data: {args.train_images} training and {args.val_images} held-out validation scenes of '
        f'{args.size[0]}x{args.size[1]} (spformer.eval.street_scenes, seed {args.seed}).',
        f'Training (train_segmentation.py, both heads alike): sp_transformer_r18_cityscapes from a random init, '
        f'`{args.model_kwargs}`; {args.updates} updates of {args.batch_size} crops of '
        f'{args.crop_size[0]}x{args.crop_size[1]}, AdamW lr {args.lr:g} (backbone x{args.backbone_lr_scale:g}), '
        f'{args.warmup_updates} warm-up updates then poly 0.9, top-20 % cross-entropy, random scale 0.5-2, '
        'colour jitter 0.2, flips; fp32 on CPU.',
        'Scores: whole images; mIoU and pixel accuracy from one confusion matrix of the split; boundary F of the '
        'predicted class maps: precision and recall of boundary pixels within 2 px, pooled over the images; '
        'superpixels: means over the images.',
    ]
    table = '\n'.join(lines) + '\n\n' + '\n'.join(f'- {n}' for n in notes)
    print()
    print(table)
    colours = class_palette(19)
    panels = []
    for row in rows:
        panel = {'image': row['image'], 'ground truth': colourize(row['label'], colours)}
        for head in args.heads:
            panel[HEADS[head].split(' (')[0]] = colourize(row[head], colours)
        if 'superpixels' in row:
            panel['learned superpixels'] = superpixel_boundaries(row['image'], row['superpixels'], scale=4)
        panels.append(panel)
    save_panels(out / 'segmentation_scenes.png', panels)
    if args.doc:
        write_between_markers(args.doc, table, f'<!-- {args.marker}:start -->', f'<!-- {args.marker}:end -->')
        save_panels(ROOT / PICTURE, panels)
        print(f'\nwrote the table into {args.doc} and the picture {PICTURE}')


def training_flags(args, head: str) -> list:
    """train_segmentation.py's flags for one head, but for where the data and the run are: what a run depends on
    (a finished run whose recorded flags differ is trained again)."""
    return ['--layout', 'cityscapes', '--model', 'sp_transformer_r18_cityscapes', '--backbone-pretrained', 'none',
            '--decoder', head, '--model-kwargs', args.model_kwargs, '--crop-size', *map(str, args.crop_size),
            '--batch-size', str(args.batch_size), '--updates', str(args.updates),
            '--warmup-updates', str(args.warmup_updates), '--lr', str(args.lr),
            '--backbone-lr-scale', str(args.backbone_lr_scale), '--seed', str(args.seed), '--workers', '1',
            '--eval-every', '0', '--checkpoint-every', '0', '--picture-images', '2', '--log-interval', '25']


@torch.no_grad()
def evaluate(model, dataset, rows, tolerance: int = 2) -> dict:
    """Scores of one model on the dataset (see the module docstring); fills `rows` (the picture's first images)."""
    from scipy.ndimage import maximum_filter
    mean = torch.tensor(model.pretrained_cfg['mean'])[:, None, None]
    std = torch.tensor(model.pretrained_cfg['std'])[:, None, None]
    confusion = ConfusionMatrix(19)
    hits_p = total_p = hits_r = total_r = 0
    sp = dict(sp_br=[], sp_asa=[], grid_br=[], grid_asa=[], segments=[], grid_segments=[])
    head = model.decoder
    T = model.token_stride
    for i in range(len(dataset)):
        sample = dataset[i]
        gt = sample.ground_truths[0]
        x = ((torch.from_numpy(sample.image).permute(2, 0, 1).float() / 255 - mean) / std)[None]
        pred = predict_whole(model, x, T).argmax(1)[0].numpy()
        confusion.update(pred, gt)
        valid = gt != 255
        pred_b, gt_b = boundary_map(pred) & valid, boundary_map(gt) & valid
        near_gt = maximum_filter(boundary_map(gt), size=2 * tolerance + 1)
        near_pred = maximum_filter(boundary_map(pred), size=2 * tolerance + 1)
        hits_p, total_p = hits_p + int((pred_b & near_gt).sum()), total_p + int(pred_b.sum())
        hits_r, total_r = hits_r + int((gt_b & near_pred).sum()), total_r + int(gt_b.sum())
        if head == 'superpixel':
            H, W = gt.shape
            padded = torch.nn.functional.pad(x, (0, padded_size(W, T) - W, 0, padded_size(H, T) - H))
            labels = model.forward_superpixels(padded)['labels'][0, :H, :W].numpy()
            cols = padded_size(W, T) // T
            grid = (np.arange(H)[:, None] // T) * cols + np.arange(W)[None, :] // T
            for name, seg in (('sp', labels), ('grid', grid)):
                sp[f'{name}_br'].append(100 * boundary_recall(seg, gt, tolerance))
                sp[f'{name}_asa'].append(100 * achievable_segmentation_accuracy(seg, gt))
            sp['segments'].append(len(np.unique(labels)))
            sp['grid_segments'].append(len(np.unique(grid)))
        if i < len(rows):
            rows[i].update(image=sample.image, label=gt, **{head: pred})
            if head == 'superpixel':
                rows[i]['superpixels'] = labels
    precision, recall = 100 * hits_p / max(total_p, 1), 100 * hits_r / max(total_r, 1)
    scores = dict(miou=100 * confusion.mean_iou(), pixel_accuracy=100 * confusion.pixel_accuracy(),
                  iou=(100 * confusion.iou_per_class()).tolist(), boundary_p=precision, boundary_r=recall,
                  boundary_f=2 * precision * recall / max(precision + recall, 1e-9))
    if head == 'superpixel':
        scores.update({k: float(np.nanmean(v)) for k, v in sp.items()})
    return scores


if __name__ == '__main__':
    main()
