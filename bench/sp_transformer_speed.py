"""SP-Transformer's speed and memory: inference FPS and a training step, beside the paper's 15.3 FPS.

    python bench/sp_transformer_speed.py            # CUDA: sp_transformer_r50_cityscapes at 1024x2048, bf16
    python bench/sp_transformer_speed.py --doc      # also write the table into docs/segmentation.md (DOC_PAGE)
    python bench/sp_transformer_speed.py --device cpu --model sp_transformer_r18_cityscapes --size 128 256 \\
        --dtype float32 --runs 2                    # a smoke run on CPU (what tests/test_sp_transformer.py does)

Per local-attention backend (``auto``: Triton on CUDA, the C kernels on CPU; ``torch``), the registered model
with random weights (the time does not depend on them), batch ``--batch-size``, input ``--size``:

- inference: eval, ``torch.inference_mode``, autocast to ``--dtype``; images per second = batch / median time;
- training step: train mode, autocast, forward, the top-20 % cross-entropy on random labels, backward (no
  optimizer step: AdamW adds a few ms of element-wise work);
- peak memory: ``torch.cuda.max_memory_allocated`` above what was allocated before the call (weights and
  inputs not counted), per kind; on CPU not measured.

Times: CUDA events around each call (synchronised), ``--warmup`` untimed calls, the median of ``--runs``. The
paper (Zhu, Mei et al., IROS 2023) reports 15.3 FPS for its ResNet-50 model at 1024x2048 on a V100 (TensorFlow,
its naive 9x-copy tokenizer) and a latency split of 28.0 ms backbone, 7.1 hypercolumn, 25.4 tokenization, 4.0
MHSA, 1.0 association: copied, not measured.
"""
import argparse
import datetime
import os
import statistics
import sys
import time
from typing import Dict, List, Optional

import torch
import timm

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from model_table import git_revision, machine_info, write_between_markers  # noqa: E402
import spformer  # noqa: E402,F401  (registers the models)
from spformer.models.sp_transformer import topk_cross_entropy  # noqa: E402

START = '<!-- sp-transformer-speed:start -->'
END = '<!-- sp-transformer-speed:end -->'
DOC_PAGE = 'docs/segmentation.md'  # where the table lives, relative to the repository root (--doc writes there)
PAPER_FPS = 15.3  # ResNet-50, 1024x2048, V100 (the paper's Table I)
DTYPES = {'bfloat16': torch.bfloat16, 'float16': torch.float16, 'float32': torch.float32}


def timed(fn, device: torch.device, warmup: int, runs: int) -> Dict[str, float]:
    """Median milliseconds of ``fn()`` and its peak memory (MB above the memory allocated before it; CUDA only)."""
    for _ in range(warmup):
        fn()
    cuda = device.type == 'cuda'
    times = []
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    for _ in range(runs):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize(device)
            times.append(start.elapsed_time(end))
        else:
            t = time.perf_counter()
            fn()
            times.append(1e3 * (time.perf_counter() - t))
    peak = (torch.cuda.max_memory_allocated(device) - base) / 2 ** 20 if cuda else float('nan')
    return dict(ms=statistics.median(times), peak_mb=peak)


def measure(args, backend: str) -> Dict[str, Dict[str, float]]:
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype]
    torch.manual_seed(0)
    model = timm.create_model(args.model, attn_backend=backend, img_size=tuple(args.size)).to(device)
    x = torch.randn(args.batch_size, 3, *args.size, device=device)
    target = torch.randint(0, model.num_classes, (args.batch_size, *args.size), device=device)
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)

    def infer():
        with torch.inference_mode(), autocast:
            model(x)

    def train_step():
        with autocast:
            loss = topk_cross_entropy(model(x), target)
        loss.backward()
        model.zero_grad(set_to_none=True)

    model.eval()
    result = {'inference': timed(infer, device, args.warmup, args.runs)}
    model.train()
    result['training step'] = timed(train_step, device, args.warmup, args.runs)
    result['params'] = sum(p.numel() for p in model.parameters())
    return result  # (the model goes with the closures: the next backend starts from freed memory)


def format_table(args, results: Dict[str, Dict]) -> str:
    lines = ['| model | input | backend | kind | ms | images / s | peak MB above inputs and weights | paper |',
             '|---|---|---|---|---:|---:|---:|---|']
    for backend, r in results.items():
        for kind in ('inference', 'training step'):
            t = r[kind]
            fps = 1e3 * args.batch_size / t['ms']
            peak = '—' if t['peak_mb'] != t['peak_mb'] else f"{t['peak_mb']:.0f}"
            paper = (f'{PAPER_FPS} images / s (V100, TensorFlow)' if kind == 'inference' and
                     args.model == 'sp_transformer_r50_cityscapes' and tuple(args.size) == (1024, 2048) else '—')
            lines.append(f'| `{args.model}` | {args.batch_size}x{args.size[0]}x{args.size[1]}, {args.dtype} | '
                         f'`{backend}` | {kind} | {t["ms"]:.1f} | {fps:.1f} | {peak} | {paper} |')
    return '\n'.join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--model', default='sp_transformer_r50_cityscapes')
    p.add_argument('--size', type=int, nargs=2, default=[1024, 2048], metavar=('H', 'W'))
    p.add_argument('--batch-size', type=int, default=1)
    p.add_argument('--dtype', choices=list(DTYPES), default='bfloat16', help='autocast dtype (float32: none)')
    p.add_argument('--device', default='cuda')
    p.add_argument('--backends', nargs='+', default=['auto', 'torch'])
    p.add_argument('--warmup', type=int, default=3)
    p.add_argument('--runs', type=int, default=10)
    p.add_argument('--doc', nargs='?', const=os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                   DOC_PAGE), default=None, metavar='PATH',
                   help=f'rewrite the table between the markers of PATH (default: {DOC_PAGE}, where it lives)')
    args = p.parse_args(argv)
    if args.device.startswith('cuda') and not torch.cuda.is_available():
        p.error('--device cuda: no CUDA device here (use --device cpu for a smoke run)')
    device_name = (f'{torch.cuda.get_device_name(args.device)}; torch {torch.__version__}, timm {timm.__version__}'
                   if args.device.startswith('cuda') else machine_info(torch.get_num_threads()))
    start = time.perf_counter()
    results = {}
    for backend in args.backends:
        results[backend] = measure(args, backend)
        if args.device.startswith('cuda'):
            torch.cuda.empty_cache()
        print(f'  {backend}: ' + ', '.join(f"{k} {results[backend][k]['ms']:.1f} ms"
                                          for k in ('inference', 'training step')), file=sys.stderr)
    elapsed = time.perf_counter() - start
    command = 'python bench/sp_transformer_speed.py' + ''.join(f' {a}' for a in (argv if argv is not None
                                                                                 else sys.argv[1:]))
    block = '\n'.join([
        format_table(args, results),
        '',
        f'- Command: `{command}` ({datetime.date.today().isoformat()}, {git_revision()}; {elapsed:.0f} s).',
        f'- Device: {device_name}. Random weights, '
        f'{next(iter(results.values()))["params"] / 1e6:.1f}M parameters; median of {args.runs} runs after '
        f'{args.warmup} warm-up calls.',
        '- Inference: eval, `torch.inference_mode`, autocast. Training step: forward, top-20 % cross-entropy, '
        'backward, no optimizer step. The paper\'s figure is copied, not measured (another framework, GPU and '
        'tokenizer implementation).',
    ])
    print(block)
    if args.doc:
        write_between_markers(args.doc, block, START, END)
        print(f'updated {args.doc}', file=sys.stderr)
    return 0


if __name__ == '__main__':
    sys.exit(main())
