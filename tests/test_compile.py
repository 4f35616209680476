"""torch.compile support: the local attention ops are torch.library custom ops with fake kernels
and registered autograd, so a whole SPFormer compiles as one graph (fullgraph=True fails on any
graph break) and matches eager mode."""
import pytest
import torch
import timm

import spformer  # noqa: F401
from spformer.kernels import functional


def _pixels(B, Mp, h, w, cell, c, cells, dtype):
    """A pixel tensor, image (B, Mp, H, W, c) or cell-major (B, Mp, h, w, cell*cell, c) layout."""
    shape = (B, Mp, h, w, cell * cell, c) if cells else (B, Mp, h * cell, w * cell, c)
    return torch.randn(shape, dtype=dtype)


def _pixel_args(Mp=1, M=2, bias=True, cells=False, dtype=torch.float32):
    B, h, w, cell, d, dv = 2, 2, 3, 4, 8, 5
    args = [_pixels(B, Mp, h, w, cell, d, cells, dtype), torch.randn(B, M, h, w, d, dtype=dtype),
            torch.randn(B, M, h, w, dv, dtype=dtype), torch.randn(B, M, h, w, dtype=dtype) if bias else None]
    return [a.requires_grad_() if a is not None else None for a in args] + [cell, 0.3, 'torch', cells]


def _superpixel_args(Mp=1, M=2, shared=True, cells=False, dtype=torch.float32):
    B, h, w, cell, d = 2, 3, 2, 4, 6
    q = torch.randn(B, M, h, w, d, dtype=dtype, requires_grad=True)
    k = _pixels(B, Mp, h, w, cell, d, cells, dtype).requires_grad_()
    v = k if shared else _pixels(B, Mp, h, w, cell, 7, cells, dtype).requires_grad_()
    return [q, k, v, cell, 0.4, shared, 'torch', cells]


@pytest.mark.parametrize('Mp, M, bias, cells', [(1, 2, True, False), (2, 2, False, False), (1, 1, True, False),
                                                (3, 3, True, False), (1, 2, True, True), (2, 2, True, True)])
def test_opcheck_pixel_attention(Mp, M, bias, cells):
    """torch.library.opcheck: schema, fake kernel (shapes and strides), autograd registration."""
    torch.library.opcheck(functional._pixel_attention_op, _pixel_args(Mp, M, bias, cells))


@pytest.mark.parametrize('Mp, M, shared, cells', [(1, 2, True, False), (2, 2, False, False), (1, 3, False, False),
                                                  (1, 2, True, True), (2, 2, False, True)])
def test_opcheck_superpixel_attention(Mp, M, shared, cells):
    torch.library.opcheck(functional._superpixel_attention_op, _superpixel_args(Mp, M, shared, cells))


def test_compiled_model_matches_eager():
    """Forward and backward of a compiled SPFormer-T equal eager (fullgraph: no graph break).
    A small input keeps compilation to a minute or two on 2 cores (SPFormer-S at 224 takes 3-9)."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = timm.create_model('spformer_tiny_sp16_224', img_size=64, num_classes=10)
    x = torch.randn(2, 3, 64, 64)
    out = torch.compile(model, fullgraph=True)(x)
    out.square().sum().backward()
    compiled_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    ref = model(x)
    ref.square().sum().backward()
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    for n, p in model.named_parameters():
        torch.testing.assert_close(compiled_grads[n], p.grad, rtol=1e-3, atol=1e-5, msg=n)


def test_compiled_model_matches_eager_on_cuda(triton_device):
    """The same on CUDA, where 'auto' runs the fused Triton kernels inside the compiled graph: needs
    TRITON_INTERPRET=0 and a GPU, see .ci/gpu. In fp32 with TF32 off (the fixture), so that eager
    and compiled differ only by the order of fp32 operations, as on CPU."""
    if triton_device.type != 'cuda':
        pytest.skip('needs a CUDA device with TRITON_INTERPRET=0 (.ci/gpu); on CPU, '
                    'test_compiled_model_matches_eager covers compilation')
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = timm.create_model('spformer_tiny_sp16_224', img_size=64, num_classes=10).cuda()
    x = torch.randn(2, 3, 64, 64, device='cuda')
    outs, grads = [], []
    for run in (torch.compile(model, fullgraph=True), model):
        out = run(x)
        out.square().sum().backward()
        outs.append(out.detach())
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
        model.zero_grad()
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-4, atol=1e-5)
    for n in grads[1]:
        scale = float(grads[1][n].abs().max())
        torch.testing.assert_close(grads[0][n], grads[1][n], rtol=1e-3, atol=1e-5 * max(scale, 1.0), msg=n)


def test_flop_counter_sees_the_custom_ops():
    """torch.utils.flop_counter counts the custom ops: 2 flops per MAC, every pixel meets 9
    superpixels per head, d MACs for the logit and dv for the value (by hand: B=2, M=3, 8x12 pixels)."""
    from torch.utils.flop_counter import FlopCounterMode
    from spformer.kernels import pixel_attention, superpixel_attention
    B, M, h, w, cell, d, dv = 2, 3, 2, 3, 4, 5, 7
    pairs = B * M * (h * cell) * (w * cell) * 9
    q_p, k_s, v_s = torch.randn(B, 1, h * cell, w * cell, d), torch.randn(B, M, h, w, d), torch.randn(B, M, h, w, dv)
    counter = FlopCounterMode(display=False)
    with counter:
        pixel_attention(q_p, k_s, v_s, cell)
    assert counter.get_total_flops() == 2 * pairs * (d + dv)
    q_s, k_p, v_p = torch.randn(B, M, h, w, d), torch.randn(B, M, h * cell, w * cell, d), torch.randn(B, M, h * cell, w * cell, dv)
    with counter:
        superpixel_attention(q_s, k_p, v_p, cell)
    assert counter.get_total_flops() == 2 * pairs * (d + dv)
