"""Hierarchy attention against PVTv2's spatial-reduction attention: the mixers, and a short training run.

1. **Mixers** at the four stage shapes of PVTv2-b0 at 224 px (56x56 C=32 1 head, 28x28 C=64 2 heads,
   14x14 C=160 5 heads, 7x7 C=256 8 heads): timm's PVTv2 ``Attention`` as PVTv2-b0 builds it (SRA,
   sr_ratio 8 / 4 / 2 / 1), the same with ``linear_attn=True`` (linear SRA, pool 7), and
   :class:`spformer.layers.HierarchyAttention` in its three modes with 7x7 centres. Per mixer and
   stage: parameters, MACs (the cost model of spformer.layers, checked here against
   ``torch.utils.flop_counter`` / 2 on the module, math SDPA), inference forward time (eval,
   no_grad), training forward + backward time (medians of interleaved rounds, so load from other
   processes hits every mixer alike) and the peak live tensor memory of one training forward +
   backward (torch's MemTracker: every tensor alive at once, input, parameters and gradients included;
   exact and allocator independent, unlike RSS; tracemalloc does not see torch's allocations).
2. **Training**: ``pvt_v2_b0`` and the three ``hierarchy_pvt_v2_b0_*`` models from scratch on a
   generated classification task (8 classes = 4 shapes (disc, square, triangle, ring) x 2 fill
   textures (stripes, dots) in two contrasting colours, random size, rotation, position, colours and
   texture scale, on a noisy background of a random colour), all with the same budget: per seed of
   ``--seeds``, the same initialization seed, images in the same order, steps, batch and AdamW schedule.
   At 96 px every stage of PVTv2-b0's SRA keeps 3x3 = 9 keys, so the hierarchy models get 3x3 centres
   per stage (the same M). Reported: parameters, MACs, seconds per step, train loss over the last 10%
   of steps and accuracy on 1000 held-out images, per seed.

    python bench/hierarchy_attention.py                 # ~40 min on 2 shared CPU cores
    python bench/hierarchy_attention.py --steps 50 --rounds 2      # a quick look
    python bench/hierarchy_attention.py --doc           # also write the tables into docs/hierarchy_attention.md
"""
import argparse
import math
import os
import statistics
import sys
import time

import numpy as np
import timm
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode
from timm.models.pvt_v2 import Attention as PvtAttention

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from model_table import machine_info, write_between_markers  # noqa: E402
import spformer  # noqa: E402,F401  (registers the hierarchy_pvt_v2_b0_* models)
from spformer.layers import HierarchyAttention, hierarchy_attention_macs, linear_sra_macs, sra_macs  # noqa: E402

DOC_PAGE = 'docs/hierarchy_attention.md'  # where the tables live, relative to the repository root (--doc)
STAGES = [(56, 32, 1, 8), (28, 64, 2, 4), (14, 160, 5, 2), (7, 256, 8, 1)]  # side, C, heads, sr_ratio at 224 px
MIXERS = ['sra', 'linear-sra', 'window', 'local', 'global']
MIXER_LABELS = {'sra': 'PVTv2 SRA', 'linear-sra': 'PVTv2 linear SRA (pool 7)', 'window': 'hierarchy window',
                'local': 'hierarchy local', 'global': 'hierarchy global'}
MODELS = ['pvt_v2_b0', 'hierarchy_pvt_v2_b0_window', 'hierarchy_pvt_v2_b0_local', 'hierarchy_pvt_v2_b0_global']
SHAPES = ('disc', 'square', 'triangle', 'ring')
TEXTURES = ('stripes', 'dots')


# ------------------------------------------------------------------------------ 1. the mixers

def build_mixer(kind: str, C: int, heads: int, sr_ratio: int, pool: int):
    if kind == 'sra':
        return PvtAttention(C, heads, sr_ratio=sr_ratio)
    if kind == 'linear-sra':
        return PvtAttention(C, heads, linear_attn=True)
    return HierarchyAttention(C, heads, mode=kind, pool_size=pool)


def predicted_macs(kind: str, side: int, C: int, heads: int, sr_ratio: int, pool: int) -> int:
    if kind == 'sra':
        return sra_macs(side, side, C, sr_ratio, heads)
    if kind == 'linear-sra':
        return linear_sra_macs(side, side, C, heads=heads)
    return hierarchy_attention_macs(kind, side, side, C, pool * pool, heads=heads)


def counted_macs(module, x, feat_size) -> int:
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), counter:
        module(x, feat_size)
    return counter.get_total_flops() // 2


def peak_mb(step) -> float:
    """Peak live tensor memory (MB) of one call of ``step`` (after a warm-up call)."""
    from torch.distributed._tools.mem_tracker import MemTracker
    tracker = MemTracker()
    with tracker:
        step()
        tracker.reset_mod_stats()
        step()
    return tracker.get_tracker_snapshot('peak')[torch.device('cpu')]['Total'] / 2 ** 20


def bench_mixers(batch: int, rounds: int, pool: int):
    rows = []
    for side, C, heads, sr in STAGES:
        torch.manual_seed(0)
        x = torch.randn(batch, side * side, C)
        mixers = {k: build_mixer(k, C, heads, sr, pool) for k in MIXERS}
        times = {k: ([], []) for k in MIXERS}

        def train_step(m, x=x):
            xg = x.clone().requires_grad_()
            m(xg, (side, side)).square().mean().backward()

        for r in range(rounds + 1):  # the first round warms up
            for k, m in mixers.items():
                m.eval()
                with torch.no_grad():
                    t0 = time.perf_counter()
                    m(x, (side, side))
                    t1 = time.perf_counter()
                m.train()
                train_step(m)
                t2 = time.perf_counter()
                if r:
                    times[k][0].append(t1 - t0)
                    times[k][1].append(t2 - t1)
        for k, m in mixers.items():
            predicted = predicted_macs(k, side, C, heads, sr, pool)
            counted = counted_macs(m.eval(), x[:1], (side, side))
            assert abs(predicted - counted) <= 0.01 * counted, (k, side, predicted, counted)
            m.train()
            rows.append(dict(stage=f'{side}×{side}, C={C}, {heads} head{"s" * (heads > 1)}', mixer=k,
                             params=sum(p.numel() for p in m.parameters()), macs=predicted,
                             fwd_ms=statistics.median(times[k][0]) * 1e3, step_ms=statistics.median(times[k][1]) * 1e3,
                             peak=peak_mb(lambda m=m: train_step(m))))
            print(f"{rows[-1]['stage']:28s} {k:11s} {rows[-1]['macs'] / 1e6:8.2f} MMACs "
                  f"{rows[-1]['fwd_ms']:7.2f} / {rows[-1]['step_ms']:7.2f} ms {rows[-1]['peak']:7.1f} MB", flush=True)
    return rows


def mixer_table(rows, batch: int) -> str:
    lines = [f'| stage (224 px) | mixer | params | MMACs / image | fwd (ms, batch {batch}) | fwd + bwd (ms) '
             f'| train peak (MB) |', '|---|---|---|---|---|---|---|']
    for r in rows:
        lines.append(f"| {r['stage']} | {MIXER_LABELS[r['mixer']]} | {r['params']:,} | {r['macs'] / 1e6:.2f} "
                     f"| {r['fwd_ms']:.2f} | {r['step_ms']:.2f} | {r['peak']:.1f} |")
    return '\n'.join(lines)


# ------------------------------------------------------------------------------ 2. training

def shape_images(n: int, size: int, seed: int):
    """n images (n, 3, size, size) in [0, 1] and labels shape * 2 + texture, from a seeded generator."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    images = np.empty((n, 3, size, size), np.float32)
    labels = rng.integers(0, len(SHAPES) * len(TEXTURES), n)
    for i in range(n):
        shape, texture = SHAPES[labels[i] // 2], TEXTURES[labels[i] % 2]
        # background: a random colour and noise
        bg = rng.uniform(0.2, 0.8, 3).astype(np.float32)
        img = bg[:, None, None] + rng.normal(0, 0.05, (3, size, size)).astype(np.float32)
        # the shape: radius, centre (inside the image), rotation
        r = rng.uniform(0.25, 0.4) * size
        cy, cx = rng.uniform(r, size - r, 2)
        t = rng.uniform(0, 2 * math.pi)
        u = np.cos(t) * (xx - cx) + np.sin(t) * (yy - cy)
        v = -np.sin(t) * (xx - cx) + np.cos(t) * (yy - cy)
        dist = np.hypot(u, v)
        if shape == 'disc':
            mask = dist < r
        elif shape == 'square':
            mask = np.maximum(np.abs(u), np.abs(v)) < 0.8 * r
        elif shape == 'triangle':
            mask = (v > -0.5 * r) & (math.sqrt(3) * u + v < r) & (-math.sqrt(3) * u + v < r)
        else:
            mask = (dist < r) & (dist > 0.55 * r)
        # the fill: two colours in stripes or dots of a random period and orientation
        period = rng.uniform(4, 7) * size / 64
        b = rng.uniform(0, math.pi)
        s = np.cos(b) * xx + np.sin(b) * yy
        o = -np.sin(b) * xx + np.cos(b) * yy
        if texture == 'stripes':
            ink = np.sin(2 * math.pi * s / period) > 0
        else:
            ink = np.hypot((s / period) % 1 - 0.5, (o / period) % 1 - 0.5) < 0.25
        c0 = rng.uniform(0, 1, 3).astype(np.float32)
        c1 = 1 - c0  # the two fill colours contrast in every channel
        fill = np.where(ink[None], c1[:, None, None], c0[:, None, None])
        img = np.where(mask[None], fill, img)
        images[i] = np.clip(img, 0, 1)
    return torch.from_numpy(images), torch.from_numpy(labels)


def model_macs(model, size: int) -> int:
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), counter:
        model.eval()(torch.randn(1, 3, size, size))
    return counter.get_total_flops() // 2


def build_model(name: str, size: int, seed: int):
    torch.manual_seed(seed)
    kwargs = dict(num_classes=len(SHAPES) * len(TEXTURES))
    if name.startswith('hierarchy'):
        kwargs['pool_sizes'] = size // 32  # the same number of keys as PVTv2-b0's SRA in every stage
    return timm.create_model(name, **kwargs)


def train_and_eval(name, train_x, train_y, test_x, test_y, args, seed: int):
    """Train ``name`` from the initialization of ``seed``, on the images in the order of ``seed``."""
    model = build_model(name, args.size, seed)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.05)
    warmup = max(1, args.steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (
        1 + math.cos(math.pi * min(1.0, s / args.steps))))
    order = torch.randperm(len(train_x), generator=torch.Generator().manual_seed(seed))
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    losses = []
    model.train()
    t0 = time.perf_counter()
    for step in range(args.steps):
        idx = order[(torch.arange(args.train_batch) + step * args.train_batch) % len(order)]
        loss = F.cross_entropy(model((train_x[idx] - mean) / std), train_y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
        if (step + 1) % max(1, args.steps // 5) == 0:
            print(f'  {name} seed {seed} step {step + 1}: loss {statistics.mean(losses[-20:]):.3f}', flush=True)
    seconds = time.perf_counter() - t0
    model.eval()
    correct = 0
    with torch.no_grad():
        for i in range(0, len(test_x), 250):
            correct += (model((test_x[i:i + 250] - mean) / std).argmax(-1) == test_y[i:i + 250]).sum().item()
    tail = losses[-max(1, args.steps // 10):]
    return dict(name=name, params=sum(p.numel() for p in model.parameters()), macs=model_macs(model, args.size),
                s_per_step=seconds / args.steps, loss=statistics.mean(tail), acc=correct / len(test_x))


def training_table(results, seeds) -> str:
    """One row per model: results[name] holds one result per seed."""
    per_seed = ' / '.join(f'seed {s}' for s in seeds)
    lines = [f'| model | params | GMACs / image | s / step | train loss (last 10%), {per_seed} '
             f'| test accuracy, {per_seed} | mean test accuracy |', '|---|---|---|---|---|---|---|']
    for name, runs in results.items():
        losses = ' / '.join(f"{x['loss']:.3f}" for x in runs)
        accs = ' / '.join(f"{100 * x['acc']:.1f}%" for x in runs)
        lines.append(f"| `{name}` | {runs[0]['params'] / 1e6:.2f}M | {runs[0]['macs'] / 1e9:.3f} "
                     f"| {statistics.mean(x['s_per_step'] for x in runs):.2f} | {losses} | {accs} "
                     f"| {100 * statistics.mean(x['acc'] for x in runs):.1f}% |")
    return '\n'.join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--batch', type=int, default=8, help='mixer benchmark batch')
    p.add_argument('--rounds', type=int, default=5, help='mixer timing rounds')
    p.add_argument('--pool', type=int, default=7, help='centre grid side of the hierarchy mixers (benchmark)')
    p.add_argument('--size', type=int, default=96, help='training image side (a multiple of 32)')
    p.add_argument('--steps', type=int, default=400)
    p.add_argument('--train-batch', dest='train_batch', type=int, default=32)
    p.add_argument('--train-images', type=int, default=4800)
    p.add_argument('--test-images', type=int, default=1000)
    p.add_argument('--lr', type=float, default=1e-3)
    p.add_argument('--models', nargs='+', default=MODELS, choices=MODELS)
    p.add_argument('--no-train', action='store_true', help='the mixer benchmark only')
    p.add_argument('--threads', type=int, default=1,
                   help='intra-op threads (default 1: with other jobs on the cores, more threads spin and stall)')
    p.add_argument('--seeds', type=int, nargs='+', default=[0, 1], help='one training run per model and seed')
    p.add_argument('--doc', nargs='?', default=None, metavar='PATH',
                   const=os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), DOC_PAGE),
                   help=f'write the tables between the <!-- MARKER:start/end --> lines of PATH (default: {DOC_PAGE})')
    p.add_argument('--marker', default='hierarchy-attention', help='marker name in the page')
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    command = 'python bench/hierarchy_attention.py' + ''.join(f' {a}' for a in (argv if argv is not None else sys.argv[1:]))
    t_start = time.time()

    rows = bench_mixers(args.batch, args.rounds, args.pool)
    parts = ['### The mixers at PVTv2-b0\'s stage shapes', '', mixer_table(rows, args.batch)]
    notes = [f'Mixers: batch {args.batch}, {args.threads} thread(s), medians of {args.rounds} interleaved rounds '
             f'after one warm-up round; fwd = eval, no_grad; fwd + bwd = train mode, loss = mean square of the '
             f'output; peak = live tensor bytes of one fwd + bwd (MemTracker). Hierarchy mixers: '
             f'{args.pool}×{args.pool} centres; MMACs from the cost model, checked equal to the flop counter.']
    if not args.no_train:
        train_x, train_y = shape_images(args.train_images, args.size, seed=0)
        test_x, test_y = shape_images(args.test_images, args.size, seed=10_000)
        results = {name: [] for name in args.models}
        for seed in args.seeds:  # seed-major: a burst of load from other jobs spreads over the models
            for name in args.models:
                results[name].append(train_and_eval(name, train_x, train_y, test_x, test_y, args, seed))
                r = results[name][-1]
                print(f"{name} seed {seed}: loss {r['loss']:.3f}, test accuracy {100 * r['acc']:.1f}%, "
                      f"{r['s_per_step']:.2f} s/step", flush=True)
        parts += ['', '### Training on generated shapes', '', training_table(results, args.seeds)]
        notes.append(f'Training: {args.size} px, {len(SHAPES) * len(TEXTURES)} classes (4 shapes × 2 fill textures), '
                     f'{args.train_images} generated training images ({args.steps} steps of {args.train_batch} = '
                     f'{args.steps * args.train_batch / args.train_images:.1f} epochs), {args.test_images} held-out '
                     f'images; AdamW lr {args.lr:g}, weight decay 0.05, {max(1, args.steps // 10)} warm-up steps then '
                     f'cosine; no augmentation; per seed, every model gets the same initialization seed and the same '
                     f'image order; hierarchy models with {args.size // 32}×{args.size // 32} centres per stage (= the '
                     f'keys of PVTv2-b0\'s SRA at this size). s / step: wall time with other jobs on the cores, '
                     f'only roughly comparable.')
    elapsed = time.time() - t_start
    notes = [f'Command: `{command}` ({elapsed / 60:.0f} min).',
             f'Machine: {machine_info(args.threads)}; load average {os.getloadavg()[0]:.1f} at the end '
             f'(other jobs shared the cores: compare within a table, not with other runs).'] + notes
    table = '\n'.join(parts) + '\n\n' + '\n'.join(f'- {n}' for n in notes)
    print()
    print(table)
    if args.doc:
        write_between_markers(args.doc, table, f'<!-- {args.marker}:start -->',
                                            f'<!-- {args.marker}:end -->')
        print(f'\nwrote the tables into {args.doc}')


if __name__ == '__main__':
    main()
