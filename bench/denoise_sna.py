"""Denoising benchmark of soft superpixel neighbourhood attention (SNA) against H-SNA and NA.

The SNA paper's "simple network" (spformer.sna.SimpleDenoiser): y = f_attn(x W0, g(x W0)) W1 + x W0 W1,
one attention layer between two bias-free linear maps (``--input-skip`` adds x, as the authors' code
does: the same functions, since W0 W1 can absorb the identity, but a start from identity + a random
W0 W1, which trained worse in short runs), with four choices of f_attn / g:

* ``sna-deep``: SNA, probabilities g from a few convolutions (DeepSuperpixelProbs);
* ``sna-slic``: SNA, probabilities from differentiable SLIC with learned compactness / temperature;
* ``hsna``: H-SNA, hard labels = the argmax of the same SLIC probabilities;
* ``na``: plain neighbourhood attention.

All use a learned per-pixel logit scale and the -||q - k||^2 distance, as the paper's denoising
runs do. Data: Gaussian noise on crops of photographs that ship with scikit-image; trained on
astronaut, rocket, hubble_deep_field, immunohistochemistry, retina and stereo_motorcycle (left),
tested on the held-out chelsea and coffee (a centre crop, fixed noise). By default one model per
method is trained on all noise levels at once (blind denoising: sigma drawn per crop) and tested
at each; ``--per-sigma`` trains one model per (method, sigma) as the paper does.

Speed and memory are measured at 128 x 128 (batch 1) with the configured kernel size: forward and
backward time of the whole model (median of interleaved rounds, so load from other processes
hits every method alike), and peak live tensor memory (torch's MemTracker: exact, allocator
independent) of one forward + backward of the attention op alone and of the whole model.

    python bench/denoise_sna.py                      # ~10 min on 2 CPU cores
    python bench/denoise_sna.py --steps 3000 --per-sigma --crop 96   # longer, closer to the paper
    python bench/denoise_sna.py --doc                # also write the table into docs/sna.md (DOC_PAGE)
"""
import argparse
import os
import statistics
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from model_table import machine_info, write_between_markers  # noqa: E402
from spformer.kernels import superpixel_labels  # noqa: E402
from spformer.sna import SimpleDenoiser  # noqa: E402

DOC_PAGE = 'docs/sna.md'  # where the tables live, relative to the repository root (--doc writes there)
TRAIN_IMAGES = ('astronaut', 'rocket', 'hubble_deep_field', 'immunohistochemistry', 'retina', 'stereo_motorcycle')
TEST_IMAGES = ('chelsea', 'coffee')
LABELS = {'sna-deep': 'SNA (deep probabilities)', 'sna-slic': 'SNA (SLIC probabilities)', 'hsna': 'H-SNA (SLIC labels)',
          'na': 'NA'}


def load_image(name: str) -> torch.Tensor:
    """(3, H, W) float in [0, 1] from skimage.data (no download)."""
    import skimage.data
    img = getattr(skimage.data, name)()
    img = img[0] if isinstance(img, tuple) else img  # stereo_motorcycle: (left, right, disparity)
    return torch.from_numpy(np.ascontiguousarray(img[..., :3])).permute(2, 0, 1).float() / 255


def random_crops(images, n: int, size: int, gen: torch.Generator) -> torch.Tensor:
    out = []
    for _ in range(n):
        img = images[int(torch.randint(len(images), (1,), generator=gen))]
        y = int(torch.randint(img.shape[1] - size + 1, (1,), generator=gen))
        x = int(torch.randint(img.shape[2] - size + 1, (1,), generator=gen))
        crop = img[:, y:y + size, x:x + size]
        if torch.rand((), generator=gen) < 0.5:
            crop = crop.flip(-1)
        out.append(crop)
    return torch.stack(out)


def centre_crop(img: torch.Tensor, size: int) -> torch.Tensor:
    H, W = img.shape[1:]
    s = min(size, H, W)
    y, x = (H - s) // 2, (W - s) // 2
    return img[:, y:y + s, x:x + s]


def train(model, images, sigmas, args, seed: int):
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=args.steps, pct_start=0.1)
    model.train()
    for step in range(args.steps):
        clean = random_crops(images, args.batch, args.crop, gen)
        sigma = torch.tensor(sigmas, dtype=torch.float32)[torch.randint(len(sigmas), (args.batch,), generator=gen)]
        noisy = clean + sigma.view(-1, 1, 1, 1) / 255 * torch.randn(clean.shape, generator=gen)
        loss = (model(noisy) - clean).square().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    return loss.item()


@torch.no_grad()
def evaluate(model, tests, sigma: float):
    """Mean PSNR (dB) and SSIM over the test images at one noise level (fixed noise per image)."""
    from skimage.metrics import structural_similarity
    model.eval()
    psnrs, ssims = [], []
    for i, clean in enumerate(tests):
        gen = torch.Generator().manual_seed(1000 + i)
        noisy = clean + sigma / 255 * torch.randn(clean.shape, generator=gen)
        out = model(noisy[None])[0].clamp(0, 1)
        psnrs.append(10 * torch.log10(1 / (out - clean).square().mean()).item())
        ssims.append(structural_similarity(out.permute(1, 2, 0).numpy(), clean.permute(1, 2, 0).numpy(),
                                           channel_axis=-1, data_range=1.0))
    return statistics.mean(psnrs), statistics.mean(ssims)


def noisy_baseline(tests, sigma: float):
    from skimage.metrics import structural_similarity
    psnrs, ssims = [], []
    for i, clean in enumerate(tests):
        gen = torch.Generator().manual_seed(1000 + i)
        noisy = (clean + sigma / 255 * torch.randn(clean.shape, generator=gen)).clamp(0, 1)
        psnrs.append(10 * torch.log10(1 / (noisy - clean).square().mean()).item())
        ssims.append(structural_similarity(noisy.permute(1, 2, 0).numpy(), clean.permute(1, 2, 0).numpy(),
                                           channel_axis=-1, data_range=1.0))
    return statistics.mean(psnrs), statistics.mean(ssims)


def peak_mb(step) -> float:
    """Peak live tensor memory (MB) of one call of ``step`` (after a warm-up call)."""
    from torch.distributed._tools.mem_tracker import MemTracker
    tracker = MemTracker()
    with tracker:
        step()
        tracker.reset_mod_stats()
        step()
    return tracker.get_tracker_snapshot('peak')[torch.device('cpu')]['Total'] / 2 ** 20


def op_call(model, x):
    """The attention op alone as a closure, on the model's projected features of x (leaves that
    require grad; H-SNA: on the labels, already taken from the SLIC probabilities)."""
    with torch.no_grad():
        f = model.lin0(x.permute(0, 2, 3, 1))
        probs = None if model.superpixels is None else model.superpixels(f.permute(0, 3, 1, 2))
        q, k, v, scale = model.attn.project(f)
    labels = superpixel_labels(probs, model.attn.cell) if model.kind == 'hsna' else None
    probs = probs.detach().requires_grad_() if model.kind.startswith('sna') else None
    q, k, v, scale = (t.detach().contiguous().requires_grad_() for t in (q, k, v, scale))
    return lambda: model.attn.attend(q, k, v, scale, probs, labels)


def measure(models, size: int, rounds: int):
    """Forward / backward ms (median over interleaved rounds) of the whole model and of the attention
    op alone, and their peak MB, per model at size x size."""
    x = torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(0))
    ops = {kind: op_call(model, x) for kind, model in models.items()}
    times = {k: ([], [], [], []) for k in models}

    def timed(fn, fwd, bwd):
        t0 = time.perf_counter()
        y = fn()
        t1 = time.perf_counter()
        y.square().mean().backward()
        fwd.append(t1 - t0)
        bwd.append(time.perf_counter() - t1)
    for _ in range(rounds + 1):  # the first round warms up
        for kind, model in models.items():
            timed(lambda: model(x), *times[kind][:2])
            timed(ops[kind], *times[kind][2:])
    out = {}
    for kind, model in models.items():
        fwd, bwd, op_fwd, op_bwd = (statistics.median(t[1:]) * 1e3 for t in times[kind])
        out[kind] = dict(fwd_ms=fwd, bwd_ms=bwd, op_fwd_ms=op_fwd, op_bwd_ms=op_bwd,
                         op_peak=peak_mb(lambda: ops[kind]().sum().backward()),
                         model_peak=peak_mb(lambda: model(x).square().mean().backward()))
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--steps', type=int, default=400, help='training steps per model')
    p.add_argument('--batch', type=int, default=4)
    p.add_argument('--crop', type=int, default=48, help='training crop side')
    p.add_argument('--lr', type=float, default=5e-3)
    p.add_argument('--sigmas', type=float, nargs='+', default=[10.0, 20.0, 30.0])
    p.add_argument('--per-sigma', action='store_true', help='one model per (method, sigma) instead of one blind model')
    p.add_argument('--dim', type=int, default=6, help='feature channels (the paper: 6)')
    p.add_argument('--heads', type=int, default=1)
    p.add_argument('--kernel-size', type=int, default=7)
    p.add_argument('--cell', type=int, default=8, help='superpixel cell side (SLIC stride)')
    p.add_argument('--slic-iters', type=int, default=5)
    p.add_argument('--input-skip', action='store_true', help="add x to the output, as the authors' code does")
    p.add_argument('--eval-size', type=int, default=192, help='side of the centre crop of each test image')
    p.add_argument('--timing-size', type=int, default=128)
    p.add_argument('--rounds', type=int, default=5, help='timing rounds')
    p.add_argument('--methods', nargs='+', default=list(SimpleDenoiser.KINDS), choices=SimpleDenoiser.KINDS)
    p.add_argument('--threads', type=int, default=1,
                   help='intra-op threads (default 1: with other jobs on the cores, more threads spin and stall)')
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--doc', '--readme', nargs='?', default=None, metavar='PATH',
                   const=os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), DOC_PAGE),
                   help=f'write the table between the <!-- MARKER:start/end --> lines of PATH (default: {DOC_PAGE}, '
                        f'where it lives)')
    p.add_argument('--marker', default='denoise-sna', help='marker name in the page (a second table: another name)')
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    command = 'python bench/denoise_sna.py' + ''.join(f' {a}' for a in (argv if argv is not None else sys.argv[1:]))

    train_images = [load_image(n) for n in TRAIN_IMAGES]
    tests = [centre_crop(load_image(n), args.eval_size) for n in TEST_IMAGES]

    def build(kind):
        torch.manual_seed(args.seed)
        return SimpleDenoiser(kind, dim=args.dim, num_heads=args.heads, kernel_size=args.kernel_size, cell=args.cell,
                              slic_iters=args.slic_iters, input_skip=args.input_skip)

    t_start = time.time()
    results = {kind: {} for kind in args.methods}
    final = {}
    for kind in args.methods:
        groups = [[s] for s in args.sigmas] if args.per_sigma else [args.sigmas]
        for sigmas in groups:
            model = build(kind)
            t0 = time.time()
            loss = train(model, train_images, sigmas, args, seed=args.seed)
            for s in sigmas:
                results[kind][s] = evaluate(model, tests, s)
            print(f'{kind:9s} sigma {sigmas}: final train loss {loss:.5f}, '
                  + ', '.join(f'{s:g}: {results[kind][s][0]:.2f} dB / {results[kind][s][1]:.3f}' for s in sigmas)
                  + f' ({time.time() - t0:.0f} s)', flush=True)
            final[kind] = model
    speed = measure({k: final[k].train() for k in args.methods}, args.timing_size, args.rounds)
    elapsed = time.time() - t_start

    sig = ' | '.join(f'σ={s:g} PSNR / SSIM' for s in args.sigmas)
    lines = [f'| method | params | {sig} | model fwd / bwd (ms) | op fwd / bwd (ms) | op peak (MB) | vs NA '
             f'| model step peak (MB) |', '|---|---|' + '---|' * len(args.sigmas) + '---|---|---|---|---|']
    lines.append('| noisy input | – | ' + ' | '.join('{:.2f} / {:.3f}'.format(*noisy_baseline(tests, s))
                                                   for s in args.sigmas) + ' | – | – | – | – | – |')
    na_peak = speed['na']['op_peak'] if 'na' in speed else None
    for kind in args.methods:
        r, sp = results[kind], speed[kind]
        params = sum(p.numel() for p in final[kind].parameters())
        ratio = f"{sp['op_peak'] / na_peak:.2f}x" if na_peak else '–'
        lines.append(f'| {LABELS[kind]} | {params:,} | '
                     + ' | '.join(f'{r[s][0]:.2f} / {r[s][1]:.3f}' for s in args.sigmas)
                     + f" | {sp['fwd_ms']:.0f} / {sp['bwd_ms']:.0f} | {sp['op_fwd_ms']:.0f} / {sp['op_bwd_ms']:.0f}"
                     + f" | {sp['op_peak']:.1f} | {ratio} | {sp['model_peak']:.1f} |")
    train_desc = ('one model per (method, σ)' if args.per_sigma else 'one blind model per method (σ drawn per crop)')
    notes = [
        f'Command: `{command}` ({elapsed / 60:.0f} min).',
        f'Machine: {machine_info(args.threads)}; load average {os.getloadavg()[0]:.1f} at the end '
        f'(other jobs shared the cores: compare within a column, not with other runs).',
        f'Training: {train_desc}, {args.steps} Adam steps of {args.batch} crops of {args.crop}², lr {args.lr:g} '
        f'(one-cycle); {"y = x + ..., " if args.input_skip else ""}dim {args.dim}, {args.heads} head(s), '
        f'k = {args.kernel_size}, cell {args.cell}, '
        f'{args.slic_iters} SLIC iterations, learned per-pixel λ, -‖q-k‖² logits. '
        f'Test: centre {args.eval_size}² crops of {", ".join(TEST_IMAGES)} (held out), fixed noise.',
        f'Timing and memory: {args.timing_size}² input, batch 1, train mode, {args.threads} thread(s); forward and '
        f'backward of the whole model (probability model included) and of the attention op alone, medians of '
        f'{args.rounds} interleaved rounds; peaks are live tensor bytes (MemTracker) of one forward + backward of the '
        f'op alone (its inputs q, k, v, λ, probabilities and their gradients included) and of the whole model.',
    ]
    table = '\n'.join(lines) + '\n\n' + '\n'.join(f'- {n}' for n in notes)
    print()
    print(table)
    if args.doc:
        write_between_markers(args.doc, table, f'<!-- {args.marker}:start -->',
                                            f'<!-- {args.marker}:end -->')
        print(f'\nwrote the table into {args.doc}')


if __name__ == '__main__':
    main()
