"""CPU benchmark: the local attention op's backends, and SPFormer-S against DeiT-S.

Everything is compared side by side in one run (ratios, since shared machines are noisy).
Peak memory is the growth of the process's peak RSS during the measured step, each
measurement in a fresh subprocess so that one cannot inherit another's high-water mark.

    python bench/bench_cpu.py                 # everything (~3-5 min on 2 cores)
    python bench/bench_cpu.py --only op       # just the op
    python bench/bench_cpu.py --only models   # just SPFormer-S vs DeiT-S
"""
import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

import torch


def _rss_peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _median_time(fn, repeats: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


# --- measurements (each run inside its own subprocess) ---------------------------------------

def measure_op(backend: str, direction: str, batch: int, repeats: int) -> dict:
    from spformer.kernels import pixel_attention, superpixel_attention
    torch.manual_seed(0)
    # SPFormer-S layer at 224 px: 56x56 pixels, 14x14 superpixels, 2 heads of 32 channels;
    # superpixel values are 384 / 2 = 192 channels per head.
    B, M, h, w, cell, d = batch, 2, 14, 14, 4, 32
    if direction == 'superpixel':
        dv = 192
        args = [torch.randn(B, M, h, w, d), torch.randn(B, M, h * cell, w * cell, d),
                torch.randn(B, M, h * cell, w * cell, dv)]
        op = superpixel_attention
    else:
        dv = 32
        args = [torch.randn(B, M, h * cell, w * cell, d), torch.randn(B, M, h, w, d), torch.randn(B, M, h, w, dv)]
        op = pixel_attention
    args = [a.requires_grad_() for a in args]

    def step():
        out = op(*args, cell, backend=backend)
        out.backward(torch.ones_like(out))
        for a in args:
            a.grad = None

    base = _rss_peak_mb()
    seconds = _median_time(step, repeats)
    return dict(seconds=seconds, peak_mb=_rss_peak_mb() - base)


def measure_model(name: str, mode: str, batch: int, repeats: int) -> dict:
    import timm
    import spformer  # noqa: F401
    torch.manual_seed(0)
    model = timm.create_model(name)
    x = torch.randn(batch, 3, 224, 224)
    if mode == 'infer':
        model.eval()

        def step():
            with torch.inference_mode():
                model(x)
    else:
        model.train()
        target = torch.randint(0, 1000, (batch,))
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

        def step():
            loss = torch.nn.functional.cross_entropy(model(x), target)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        step()  # allocate optimizer state before the memory baseline
    base = _rss_peak_mb()
    seconds = _median_time(step, repeats)
    return dict(seconds=seconds, peak_mb=_rss_peak_mb() - base)


def _run_child(kind: str, *args) -> dict:
    cmd = [sys.executable, __file__, '--child', json.dumps([kind, *args])]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=os.environ.copy())
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--only', choices=['op', 'models'], default=None)
    parser.add_argument('--batch-size', type=int, default=8)
    parser.add_argument('--repeats', type=int, default=5)
    parser.add_argument('--child', default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.child:
        kind, *rest = json.loads(args.child)
        result = measure_op(*rest) if kind == 'op' else measure_model(*rest)
        print(json.dumps(result))
        return

    print(f'# {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, '
          f'{torch.get_num_threads()} threads, batch {args.batch_size}')
    if args.only in (None, 'op'):
        print('\n## Local attention op, SPFormer-S layer shapes (forward + backward)\n')
        print('| direction | backend | time (ms) | peak memory (MB) | speed-up vs reference | memory vs reference |')
        print('|---|---|---|---|---|---|')
        for direction in ('superpixel', 'pixel'):
            ref = _run_child('op', 'reference', direction, args.batch_size, args.repeats)
            for backend in ('reference', 'torch'):
                r = ref if backend == 'reference' else _run_child('op', backend, direction, args.batch_size,
                                                                  args.repeats)
                print(f"| {direction} | {backend} | {r['seconds'] * 1e3:.1f} | {r['peak_mb']:.0f} | "
                      f"{ref['seconds'] / r['seconds']:.2f}x | {ref['peak_mb'] / max(r['peak_mb'], 1e-9):.1f}x less |")
    if args.only in (None, 'models'):
        print('\n## SPFormer-S vs DeiT-S (224 px)\n')
        print('| model | inference img/s | train step (s) | train img/s | train peak memory (MB) |')
        print('|---|---|---|---|---|')
        rows = {}
        for name in ('deit_small_patch16_224', 'spformer_small_sp16_224'):
            inf = _run_child('model', name, 'infer', args.batch_size, args.repeats)
            train = _run_child('model', name, 'train', args.batch_size, max(2, args.repeats - 2))
            rows[name] = (inf, train)
            print(f"| {name} | {args.batch_size / inf['seconds']:.1f} | {train['seconds']:.2f} | "
                  f"{args.batch_size / train['seconds']:.1f} | {train['peak_mb']:.0f} |")
        (di, dt), (si, st) = rows['deit_small_patch16_224'], rows['spformer_small_sp16_224']
        print(f"\nSPFormer-S / DeiT-S: inference throughput {di['seconds'] / si['seconds']:.2f}x, "
              f"train-step throughput {dt['seconds'] / st['seconds']:.2f}x, "
              f"train peak memory {st['peak_mb'] / dt['peak_mb']:.2f}x")


if __name__ == '__main__':
    main()
