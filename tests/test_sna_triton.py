"""The fused Triton kernels of NA / SNA / H-SNA (kernels/neighborhood_triton.py) against the reference.

Runs on CPU tensors through the Triton interpreter (tests/conftest.py sets TRITON_INTERPRET=1; with
TRITON_INTERPRET=0 on a GPU machine the same checks run the compiled kernels on CUDA tensors). The
interpreter costs milliseconds per program, so shapes are small but chosen to cover: images of
1 to 3 x 3 tiles of 8 x 8 (border tiles, an interior tile whose key region and query range are
not clipped), non-square images, k in {3, 5, 7} (k = 7 with the region walked in several
chunks), cells 2, 4 and 7 (local superpixel bases of 7x7, 5x5 and 4x4), batch 2, 1-2 heads,
probabilities / labels shared by the heads or per head, lambda as a float, a learnable scalar,
one per head or a per-pixel map, non-contiguous q/k/v.

Oracle: the reference backend in float64 (values and, through autograd, the gradients of q, k,
v, probs and lambda). Every buffer the kernels fill is NaN-filled first, so an element a kernel
fails to write shows up. Tolerance (max abs error / max(1, max |expected|)): fp32 1e-5, fp64
1e-12, fp16 6e-3, bf16 3e-2 (low precision against the float64 oracle on the same rounded inputs;
for fp16 and bf16 the kernels' dots take tf32 operands, exact under the interpreter but rounded to
2**-11 on a GPU, where fp16's dprobs measured 4.3e-3 on an H100).
"""

import pytest
import torch

try:
    import triton  # noqa: F401
except ImportError as e:  # pragma: no cover - depends on the platform
    pytest.skip(f'triton is not importable ({e})', allow_module_level=True)

from conftest import TRITON_NO_DEVICE, triton_test_device  # noqa: E402

DEVICE = triton_test_device()
if DEVICE is None:  # pragma: no cover
    pytest.skip(TRITON_NO_DEVICE, allow_module_level=True)

from spformer.kernels import (
    hard_superpixel_attention,
    neighborhood_attention,
    soft_superpixel_attention,
    superpixel_labels,
)
from spformer.kernels import neighborhood
from spformer.kernels import neighborhood_triton as nt

TOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 6e-3, torch.bfloat16: 3e-2}


@pytest.fixture(autouse=True)
def _nan_filled_buffers(monkeypatch):
    def empty(like, shape, dtype=None):
        return torch.full(tuple(shape), float('nan'), dtype=like.dtype if dtype is None else dtype, device=like.device)
    monkeypatch.setattr(nt, '_empty', empty)


def _err(got, want):
    got, want = got.detach().cpu().double(), want.detach().cpu().double()
    return ((got - want).abs().max() / want.abs().max().clamp(min=1.0)).item()


def _close(got, want, tol, what):
    assert got.shape == want.shape, f'{what}: shape {tuple(got.shape)} != {tuple(want.shape)}'
    assert not got.detach().isnan().any(), f'{what}: NaN (an element was never written)'
    err = _err(got, want)
    assert err <= tol, f'{what}: normalized max error {err:.3g} > {tol:g}'


def _inputs(B, M, H, W, d, dv, Mp, skind, dtype, seed, channels_last=False):
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)
    if channels_last:  # q, k, v as views of one (B, H, W, 3, M, d) projection (needs d == dv)
        q, k, v = rnd(B, H, W, 3, M, d).permute(3, 0, 4, 1, 2, 5).to(DEVICE, dtype).unbind(0)
    else:
        q, k, v = (rnd(B, M, H, W, c).to(DEVICE, dtype) for c in (d, d, dv))
    pshape = (B, H, W, 9) if Mp == 0 else (B, Mp, H, W, 9)
    probs = (3 * rnd(*pshape)).softmax(-1).to(DEVICE, dtype)
    labels = torch.randint(0, 3, pshape[:-1], generator=g).to(DEVICE)
    scale = {'float': 0.6, 'none': None,
             'scalar': torch.tensor(0.7, dtype=torch.float64).to(DEVICE, dtype),
             'head': torch.linspace(0.4, 0.9, M, dtype=torch.float64).view(M, 1, 1).to(DEVICE, dtype),
             'map': (0.3 + torch.rand(B, M, H, W, generator=g, dtype=torch.float64)).to(DEVICE, dtype)}[skind]
    return q, k, v, probs, labels, scale


def _run(op, backend, q, k, v, probs, labels, ks, cell, scale, go):
    """Output and gradients (q, k, v[, probs][, scale]) of one op call on fresh leaves."""
    leaves = [q, k, v] + ([probs] if op == 'sna' else []) + ([scale] if isinstance(scale, torch.Tensor) else [])
    leaves = [t.detach().clone().requires_grad_() for t in leaves]
    s = leaves[-1] if isinstance(scale, torch.Tensor) else scale
    if op == 'na':
        out = neighborhood_attention(*leaves[:3], ks, scale=s, backend=backend)
    elif op == 'sna':
        out = soft_superpixel_attention(*leaves[:3], leaves[3], ks, cell, scale=s, backend=backend)
    else:
        out = hard_superpixel_attention(*leaves[:3], labels, ks, scale=s, backend=backend)
    return out, torch.autograd.grad(out, leaves, go)


def _check(op, case, dtype, seed=0, channels_last=False):
    B, M, H, W, d, dv, ks, cell, Mp, skind = case
    q, k, v, probs, labels, scale = _inputs(B, M, H, W, d, dv, Mp, skind, dtype, seed, channels_last)
    go = torch.randn(B, M, H, W, dv, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64)
    out, grads = _run(op, 'triton', q, k, v, probs, labels, ks, cell, scale, go.to(DEVICE, dtype))
    assert out.dtype == dtype and out.permute(0, 2, 3, 1, 4).is_contiguous()
    to64 = (lambda t: t if t is None or not t.is_floating_point() else t.detach().cpu().double())
    want, want_grads = _run(op, 'reference', to64(q), to64(k), to64(v), to64(probs), labels.cpu(), ks, cell,
                            to64(scale) if isinstance(scale, torch.Tensor) else scale, go)
    tol = TOL[dtype]
    _close(out, want, tol, 'out')
    names = ['dq', 'dk', 'dv'] + (['dprobs'] if op == 'sna' else []) + (['dscale'] if isinstance(scale, torch.Tensor) else [])
    for name, g, wg in zip(names, grads, want_grads):
        assert g.dtype == dtype
        _close(g, wg, tol, name)


# B, M, H, W, d, dv, kernel_size, cell, Mp (0: 4-D probs/labels shared by the heads), scale kind
CASES = [
    ('sna', (1, 2, 11, 13, 4, 3, 3, 4, 1, 'map')),     # 2 x 2 tiles, borders, 2 heads on one map, per-pixel lambda
    ('sna', (2, 1, 9, 10, 5, 6, 5, 7, 0, 'float')),    # batch 2, cell 7 (4 x 4 basis), d != dv
    ('sna', (1, 2, 16, 9, 3, 4, 7, 2, 2, 'head')),     # k = 7 (region in chunks), cell 2 (7 x 7 basis), per-head probs
    ('sna', (1, 1, 20, 9, 4, 4, 5, 4, 0, 'scalar')),   # 3 tiles down: an interior tile row, learnable scalar lambda
    ('hsna', (1, 2, 7, 20, 4, 4, 7, 0, 2, 'none')),    # k = H, 3 tiles across, per-head labels
    ('hsna', (2, 1, 12, 12, 3, 5, 3, 0, 0, 'map')),    # batch 2, shared labels
    ('na', (1, 1, 20, 20, 3, 3, 3, 0, 0, 'map')),      # 3 x 3 tiles: an interior tile (key region, query range unclipped)
    ('na', (1, 2, 10, 9, 6, 2, 7, 0, 0, 'head')),      # k = 7 on a small image: everybody at a border
]


@pytest.mark.parametrize('op, case', CASES, ids=['{}-B{}M{}_{}x{}_d{}dv{}_k{}_cell{}_Mp{}_{}'.format(o, *c) for o, c in CASES])
def test_fp32_values_and_grads_match_reference(op, case):
    _check(op, case, torch.float32)


@pytest.mark.parametrize('dtype', [torch.float16, torch.bfloat16, torch.float64], ids=str)
def test_dtypes(dtype):
    _check('sna', (1, 1, 9, 8, 8, 8, 5, 4, 0, 'map'), dtype, seed=3)


def test_noncontiguous_qkv():
    """q, k, v as strided views of one projection (the module's layout): no copies needed, same result."""
    _check('sna', (1, 2, 9, 10, 4, 4, 3, 4, 1, 'float'), torch.float32, seed=4, channels_last=True)


def test_one_hot_sna_equals_hsna():
    H, W, cell = 9, 11, 4
    q, k, v, _, _, lam = _inputs(1, 1, H, W, 4, 3, 0, 'map', torch.float32, seed=5)
    valid = neighborhood.neighbor_superpixels(H, W, cell)[1].view(H, W, 9)
    scores = torch.rand(1, H, W, 9, generator=torch.Generator().manual_seed(6)).masked_fill(~valid, -1)
    probs = torch.nn.functional.one_hot(scores.argmax(-1), 9).float().to(DEVICE)
    labels = superpixel_labels(probs, cell)
    sna = soft_superpixel_attention(q, k, v, probs, 5, cell, scale=lam, backend='triton')
    hsna = hard_superpixel_attention(q, k, v, labels, 5, scale=lam, backend='triton')
    _close(sna, hsna, 1e-6, 'SNA(one-hot) vs H-SNA')


def test_far_logits():
    """Agreeing keys 120 nats below the window's max: fp32 still matches the float64 reference."""
    from test_sna_ops import check_far_logits
    check_far_logits('triton', device=DEVICE)


def test_empty_batch_and_determinism():
    e = torch.zeros(0, 1, 8, 8, 4, device=DEVICE, requires_grad=True)
    out = soft_superpixel_attention(e, e, e, torch.zeros(0, 8, 8, 9, device=DEVICE), 3, 4, backend='triton')
    assert out.shape == (0, 1, 8, 8, 4)
    out.sum().backward()
    assert e.grad.shape == e.shape
    q, k, v, probs, _, lam = _inputs(1, 1, 8, 8, 4, 4, 0, 'map', torch.float32, seed=7)
    first = _run('sna', 'triton', q, k, v, probs, None, 3, 4, lam, torch.ones(1, 1, 8, 8, 4, device=DEVICE))
    again = _run('sna', 'triton', q, k, v, probs, None, 3, 4, lam, torch.ones(1, 1, 8, 8, 4, device=DEVICE))
    assert torch.equal(first[0], again[0]) and all(torch.equal(a, b) for a, b in zip(first[1], again[1]))


# --- GPU legality without a GPU ----------------------------------------------------------------

_COMPILE = r'''
import os, sys
os.environ.pop('TRITON_INTERPRET', None)
import torch, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from spformer.kernels import neighborhood_triton as nt

TY = {torch.float32: 'fp32', torch.bfloat16: 'bf16'}
SIZES = ('H', 'W', 'M', 'D', 'DV', 'h', 'w')


def compile_one(kernel, dtype, d, kernel_size, cell, mode, has_lam):
    cfg = nt._config(dtype, d, d, kernel_size, cell, mode)
    num_warps = cfg.pop('num_warps')
    cfg['HAS_LAM'] = has_lam
    sig, constexprs = {}, {}
    for name in kernel.arg_names:
        if name == 'labels_ptr':
            sig[name] = '*i64'
        elif name in ('stats_ptr', 'delta_ptr', 'dprobs_ptr', 'dlam_ptr'):
            sig[name] = '*fp32'
        elif name.endswith('_ptr'):
            sig[name] = '*' + TY[dtype]
        elif name in ('scale', 'scale_lo'):
            sig[name] = 'fp32'
        elif name in SIZES or name.startswith('s'):
            sig[name] = 'i32'
        else:
            sig[name] = 'constexpr'
            constexprs[name] = cfg[name]
    triton.compile(ASTSource(kernel, sig, constexprs), target=GPUTarget('cuda', 90, 32),
                   options=dict(num_warps=num_warps))


F32, BF16 = torch.float32, torch.bfloat16
# every kernel once with the superpixel basis (the most code), the others cover NA, labels and bf16
JOBS = [(nt._fwd_kernel, BF16, 16, 7, 7, nt.MODE_SOFT, False),
        (nt._bwd_dq_kernel, F32, 32, 7, 4, nt.MODE_SOFT, True),
        (nt._bwd_dkv_kernel, F32, 16, 5, 4, nt.MODE_SOFT, True),
        (nt._fwd_kernel, F32, 32, 3, 1, nt.MODE_HARD, True)]
part, parts = int(sys.argv[1]), int(sys.argv[2])
for job in JOBS[part::parts]:
    compile_one(*job)
print('compiled')
'''


def test_kernels_compile_for_sm90(compile_for_sm90):
    """The interpreter accepts code a GPU compile rejects (dot shapes, dtype mixes, constexpr use):
    compile the kernels for sm_90 (front end, LLVM and ptxas; no GPU needed)."""
    compile_for_sm90(_COMPILE, timeout=900)
