"""Sweep of the Triton kernels' launch configuration (warps per program, pipeline stages) at
SPFormer-S shapes, against the configuration the backends pick. Needs a CUDA GPU.

    python bench/triton_launch_sweep.py                   # cell 4 (SPFormer-S), batch 128, bf16 and fp32
    python bench/triton_launch_sweep.py --cell 7 --grid 4 --dtype bfloat16

How the warp rule in kernels/triton_backend.py (``_config``) and the superpixel-init kernel's warps
in kernels/pixel_maps_triton.py were chosen (H100, see docs/performance.md, "Triton kernels").
"""
import argparse
import itertools

import torch
import triton

from spformer.kernels import pixel_maps_triton, triton_backend

WARPS, STAGES = (1, 2, 4, 8, 16), (1, 2, 3)


def _time(fn) -> float:
    """Median microseconds, or nan where the configuration does not compile or run."""
    try:
        return triton.testing.do_bench(fn, warmup=10, rep=50) * 1e3
    except Exception:  # e.g. out of shared memory or registers for this configuration
        return float('nan')


def _report(name: str, current: float, results: dict):
    best = min((t, cfg) for cfg, t in results.items() if t == t)
    print(f'{name}: picked {current:.0f} us; ' + ' '.join(f'w{w}s{s}:{t:.0f}' for (w, s), t in results.items())
          + f' | best w{best[1][0]}s{best[1][1]} {best[0]:.0f} us', flush=True)


def sweep_attention(B: int, grid: int, cell: int, dtype: torch.dtype):
    """The four local-attention passes of the model's shared-pixel case (image layout)."""
    tb = triton_backend
    h = w = grid
    x = torch.randn(B, 1, h * cell, w * cell, 64, device='cuda', dtype=dtype)  # rescaled pixels, k = v
    qs, ks = (torch.randn(B, 2, h, w, 64, device='cuda', dtype=dtype) for _ in range(2))
    vs = torch.randn(B, 2, h, w, 32, device='cuda', dtype=dtype)
    bias = torch.randn(B, 2, h, w, device='cuda', dtype=dtype)
    out_s, probs_s = tb.superpixel_attention_fwd(qs, x, x, cell, 0.125, True)
    out_p, probs_p = tb.pixel_attention_fwd(x, ks, vs, bias, cell, 0.125)
    go_s, go_p = torch.randn_like(out_s), torch.randn_like(out_p)
    passes = {
        'superpixel fwd': lambda: tb.superpixel_attention_fwd(qs, x, x, cell, 0.125, True),
        'superpixel bwd': lambda: tb.superpixel_attention_bwd(go_s, out_s, qs, x, x, probs_s, cell, 0.125, True),
        'pixel fwd': lambda: tb.pixel_attention_fwd(x, ks, vs, bias, cell, 0.125),
        'pixel bwd': lambda: tb.pixel_attention_bwd(go_p, x, ks, vs, bias, probs_p, cell, 0.125),
    }
    picked = tb._config
    try:
        for name, fn in passes.items():
            results = {}
            for warps, stages in itertools.product(WARPS, STAGES):
                tb._config = lambda *a, **k: dict(picked(*a, **k), num_warps=warps, num_stages=stages)
                results[warps, stages] = _time(fn)
            tb._config = picked
            _report(f'{dtype} {name}', _time(fn), results)
    finally:
        tb._config = picked


def sweep_init(B: int, grid: int, cell: int):
    """The fused superpixel-init kernel (64 -> 384 channels, bf16 autocast rounding)."""
    pm = pixel_maps_triton
    x = torch.randn(B, grid * cell, grid * cell, 64, device='cuda')
    weight = torch.randn(384, 64, device='cuda')
    gamma, beta = torch.randn(384, device='cuda'), torch.randn(384, device='cuda')

    def fn():
        return pm.cell_pooled_projection(x, weight, gamma, beta, 1e-6, cell, torch.bfloat16)

    picked = pm._pooled_projection_config
    results = {}
    try:
        for warps, stages in itertools.product(WARPS, STAGES):
            pm._pooled_projection_config = lambda *a, **k: dict(picked(*a, **k), num_warps=warps, num_stages=stages)
            results[warps, stages] = _time(fn)
    finally:
        pm._pooled_projection_config = picked
    _report('superpixel init', _time(fn), results)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--batch-size', type=int, default=128)
    parser.add_argument('--grid', type=int, default=14, help='superpixels per side')
    parser.add_argument('--cell', type=int, default=4)
    parser.add_argument('--dtype', choices=['bfloat16', 'float32'], default=None, help='default: both')
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit('needs a CUDA GPU')
    for dtype in [getattr(torch, args.dtype)] if args.dtype else [torch.bfloat16, torch.float32]:
        sweep_attention(args.batch_size, args.grid, args.cell, dtype)
    sweep_init(args.batch_size, args.grid, args.cell)


if __name__ == '__main__':
    main()
