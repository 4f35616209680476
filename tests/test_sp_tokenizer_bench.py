"""bench/sp_tokenizer.py compares equal computations: its naive 9x-copy tokenizer (neighbourhoods copied
out, then plain attention) gives what SP-Transformer's TokenizerLayer and the local attention ops give,
values and gradients, in float64 on a tiny shape with border cells on every side."""
import importlib.util
from pathlib import Path

import pytest
import torch

from spformer.kernels import superpixel_attention, pixel_attention

ROOT = Path(__file__).resolve().parents[1]


def _bench():
    spec = importlib.util.spec_from_file_location('sp_tokenizer_bench', ROOT / 'bench' / 'sp_tokenizer.py')
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


bench = _bench()
SHAPE = dict(batch=2, height=12, width=20, channels=16, cell=4, heads=2)  # a 3x5 superpixel grid


@pytest.mark.parametrize('backend', ['auto', 'torch', 'reference'])
def test_naive_layer_and_ops_equal_ours_float64(backend):
    diffs = bench.check_equal(torch.float64, SHAPE, backends=(backend,))  # asserts allclose (rtol 1e-9)
    assert len(diffs) == 4 and max(diffs.values()) < 1e-12, diffs


def test_naive_ops_gradients_equal_ours_float64():
    B, H, W, C, cell, M = 1, 8, 12, 8, 4, 2
    h, w = H // cell, W // cell
    g = torch.Generator().manual_seed(0)
    tensors = dict(q_s=(B, h, w, C), k_p=(B, H, W, C), v_p=(B, H, W, C), q_p=(B, H, W, C), k_s=(B, h, w, C),
                   v_s=(B, h, w, C))
    leaves = {k: torch.randn(s, generator=g, dtype=torch.float64, requires_grad=True) for k, s in tensors.items()}
    sp_naive = bench.naive_superpixel_attention(leaves['q_s'], leaves['k_p'], leaves['v_p'], cell, M)
    px_naive = bench.naive_pixel_attention(leaves['q_p'], leaves['k_s'], leaves['v_s'], cell, M)
    split = {k: bench._heads_first(v, M) for k, v in leaves.items()}
    sp = superpixel_attention(split['q_s'], split['k_p'], split['v_p'], cell, backend='torch').movedim(1, -2)
    px = pixel_attention(split['q_p'], split['k_s'], split['v_s'], cell, backend='torch').movedim(1, -2)
    sp, px = sp.reshape(B, h, w, C), px.reshape(B, H, W, C)
    torch.testing.assert_close(sp_naive, sp, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(px_naive, px, rtol=1e-10, atol=1e-12)
    weights = (torch.randn(sp.shape, generator=g, dtype=torch.float64),
               torch.randn(px.shape, generator=g, dtype=torch.float64))
    ours = torch.autograd.grad((sp, px), list(leaves.values()), weights)
    naive = torch.autograd.grad((sp_naive, px_naive), list(leaves.values()), weights)
    for name, a, b in zip(leaves, naive, ours):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=lambda m: f'd{name}: {m}')


def test_naive_attention_masks_cells_outside_the_image():
    """A corner superpixel sees 4 of its 9 cells, a corner pixel 4 of its 9 superpixels: with keys that make the
    padded (zero) neighbours the most attractive, an unmasked implementation would give them weight."""
    B, H, W, C, cell, M = 1, 8, 8, 4, 4, 1
    q = torch.full((B, 2, 2, C), -1.0, dtype=torch.float64)
    k = torch.ones(B, H, W, C, dtype=torch.float64)  # logits -4 inside, 0 on a zero pad
    v = torch.ones(B, H, W, C, dtype=torch.float64)
    out = bench.naive_superpixel_attention(q, k, v, cell, M)
    torch.testing.assert_close(out, torch.ones_like(out))  # a convex mix of ones only: no pad in it
    qp = torch.full((B, H, W, C), -1.0, dtype=torch.float64)
    ks = torch.ones(B, 2, 2, C, dtype=torch.float64)
    out = bench.naive_pixel_attention(qp, ks, torch.ones_like(ks), cell, M)
    torch.testing.assert_close(out, torch.ones_like(out))


def test_peak_counts_a_temporary():
    def call():
        x = torch.empty(4 << 20, dtype=torch.uint8)  # 4 MB, freed on return
        del x
    assert 3.9 < bench.peak_mb(call) < 4.5
