"""The fused Triton backend (kernels/triton_backend.py) against the torch backend and the reference.

Runs on CPU tensors through the Triton interpreter (tests/conftest.py sets TRITON_INTERPRET=1
before anything imports triton; with TRITON_INTERPRET=0 on a GPU machine the same tests run the
compiled kernels on CUDA tensors); the interpreter costs milliseconds per program and per op, so
the shapes are small, chosen to cover: 1x1, 1xN, Nx1 and non-square grids (every border case
and interior cells), cells of 2, 4 and 7 pixels (n = 49 padded to 64), pixel tensors with all M
heads or one head shared by all, d != dv, batch 2, bias on/off, shared k/v on/off.

Oracles: the reference backend in float64 (values, probabilities, gradients through autograd)
and the torch backend on the same inputs (its hand-written backward is tested against autograd
in test_attention_ops.py). Every buffer the kernels allocate is NaN-filled first, so an element
a kernel fails to write shows up as a NaN.

Tolerances (max abs error / max(1, max |expected|)): fp32 1e-5, fp64 1e-12, fp16 4e-3 and
bf16 3e-2 (outputs rounded to the input dtype; fp16/bf16 grads against a float64 oracle on the
same rounded inputs).
"""

import pytest
import torch

try:
    import triton  # noqa: F401
except ImportError as e:  # pragma: no cover - depends on the platform
    pytest.skip(f'triton is not importable ({e}): the Triton backend cannot run here', allow_module_level=True)

# CPU tensors through the interpreter (the default here), or CUDA tensors when the interpreter is
# switched off on a machine with a GPU: the same checks then run the compiled kernels.
from conftest import TRITON_NO_DEVICE, triton_test_device  # noqa: E402

DEVICE = triton_test_device()
if DEVICE is None:  # pragma: no cover
    pytest.skip(TRITON_NO_DEVICE, allow_module_level=True)

from spformer.kernels import functional, pixel_attention, reference, superpixel_attention, torch_backend
from spformer.kernels import triton_backend as tb

SCALE = 0.45
TOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}


@pytest.fixture(autouse=True)
def _nan_filled_buffers(monkeypatch):
    def empty(like, shape, dtype=None):
        return torch.full(tuple(shape), float('nan'), dtype=like.dtype if dtype is None else dtype, device=like.device)
    monkeypatch.setattr(tb, '_empty', empty)


def _err(got, want):
    got, want = got.double(), want.double()
    return ((got - want).abs().max() / want.abs().max().clamp(min=1.0)).item()


def _assert_close(got, want, tol, what):
    got, want = got.cpu(), want.cpu()
    assert got.shape == want.shape, f'{what}: shape {tuple(got.shape)} != {tuple(want.shape)}'
    assert not got.isnan().any(), f'{what}: NaN (an element was never written)'
    err = _err(got, want)
    assert err <= tol, f'{what}: normalized max error {err:.3g} > {tol:g}'


def _rand(gen, shape, dtype, noncontig=False):
    """Random tensor; ``noncontig``: a channels-first buffer viewed channels-last (non-contiguous)."""
    if not noncontig:
        return torch.randn(shape, generator=gen, dtype=torch.float64).to(DEVICE, dtype)
    t = torch.randn((shape[0], shape[-1]) + tuple(shape[1:-1]), generator=gen, dtype=torch.float64)
    return t.to(DEVICE, dtype).movedim(1, -1)


def _cells_to_probs(wt, Mp, cell):
    """(B, M, H, W, 9) per-pixel neighbour weights -> the contract layout (B * Mp, h, w, n, G * 9)."""
    B, M, H, W, _ = wt.shape
    G = M // Mp
    h, w = H // cell, W // cell
    wt = wt.reshape(B, Mp, G, h, cell, w, cell, 9).permute(0, 1, 3, 5, 4, 6, 2, 7)
    return wt.reshape(B * Mp, h, w, cell * cell, G * 9)


def _superpixel_probs(q, k, cell, scale):
    """Dense float64 superpixel-direction probabilities, picked into the contract layout."""
    B, M, h, w, d = q.shape
    Mp, H, W = k.shape[1:4]
    k = k.expand(B, M, H, W, d)
    logits = torch.einsum('bmsd,bmpd->bmps', q.reshape(B, M, h * w, d), k.reshape(B, M, H * W, d)) * scale
    mask = reference.neighborhood(H, W, h, w, cell, q.device)  # (H*W, h*w)
    attn = logits.masked_fill(~mask, float('-inf')).softmax(dim=2)  # over the superpixel's pixels
    idx, valid = reference.neighbor_index(H, W, h, w, cell, q.device)
    picked = torch.gather(attn, 3, idx.expand(B, M, -1, -1)) * valid
    return _cells_to_probs(picked.reshape(B, M, H, W, 9), Mp, cell)


def _excluded(h, w, cell, G):
    """(h, w, n, 9G) bool: neighbour outside the grid."""
    k = torch.arange(9)
    ni = torch.arange(h)[:, None, None] + k // 3 - 1
    nj = torch.arange(w)[None, :, None] + k % 3 - 1
    outside = (ni < 0) | (ni >= h) | (nj < 0) | (nj >= w)  # (h, w, 9)
    return outside[:, :, None, None, :].expand(h, w, cell * cell, G, 9).reshape(h, w, cell * cell, 9 * G)


# --- pixel direction ---------------------------------------------------------------------------

PIXEL_CASES = [
    # B, M, Mp, h, w, cell, d, dv, bias, noncontig
    (1, 1, 1, 1, 1, 4, 8, 8, True, False),    # 1x1 grid: the own cell is the only neighbour
    (2, 2, 2, 1, 3, 4, 5, 7, False, False),   # 1xN, batch 2, all heads, d != dv
    (1, 3, 1, 3, 1, 2, 6, 4, True, False),    # Nx1, cell 2, one pixel head shared by 3
    (1, 2, 1, 3, 4, 4, 16, 8, True, True),    # interior cells, shared head, channels-last views
    (1, 2, 2, 2, 3, 7, 4, 6, True, False),    # cell 7 (n = 49 in a 64-row tile), non-square
]


def _pixel_case(case, dtype, seed=0):
    B, M, Mp, h, w, cell, d, dv, bias, noncontig = case
    gen = torch.Generator().manual_seed(seed)
    q = _rand(gen, (B, Mp, h * cell, w * cell, d), dtype, noncontig)
    k = _rand(gen, (B, M, h, w, d), dtype, noncontig)
    v = _rand(gen, (B, M, h, w, dv), dtype, noncontig)
    b = _rand(gen, (B, M, h, w), dtype) if bias else None
    go = _rand(gen, (B, h * cell, w * cell, M, dv), dtype)
    return q, k, v, b, go, cell


def _pixel_oracle(q, k, v, b, go, cell):
    """float64 reference: out heads-last, probs in the contract layout, grads through autograd."""
    ins = [t.detach().cpu().double().requires_grad_() for t in (q, k, v) + (() if b is None else (b,))]
    out, wt = reference.pixel_attention(*ins[:3], cell, SCALE, ins[3] if b is not None else None)
    grads = torch.autograd.grad(out, ins, go.cpu().double().permute(0, 3, 1, 2, 4))
    return out.detach().permute(0, 2, 3, 1, 4), _cells_to_probs(wt.detach(), q.shape[1], cell), grads


def _check_pixel(case, dtype, against_torch=True):
    q, k, v, b, go, cell = _pixel_case(case, dtype)
    tol = TOL[dtype]
    out, probs = tb.pixel_attention_fwd(q, k, v, b, cell, SCALE)
    assert out.dtype == dtype and out.is_contiguous()
    assert probs.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    want_out, want_probs, want_grads = _pixel_oracle(q, k, v, b, go, cell)
    _assert_close(out, want_out, tol, 'out')
    _assert_close(probs, want_probs, max(tol, 1e-6), 'probs')
    G = k.shape[1] // q.shape[1]
    excluded = probs.cpu()[:, _excluded(k.shape[2], k.shape[3], cell, G)]
    assert (excluded == 0).all(), 'excluded neighbours must be exactly 0'
    grads = tb.pixel_attention_bwd(go, q, k, v, b, probs, cell, SCALE)
    assert (grads[3] is None) == (b is None)
    for name, got, x, want in zip(('dq', 'dk', 'dv', 'dbias'), grads, (q, k, v, b), want_grads):
        assert got.dtype == x.dtype and got.shape == x.shape
        _assert_close(got, want, tol, name)
    if against_torch:
        t_out, t_probs = torch_backend.pixel_attention_fwd(q, k, v, b, cell, SCALE)
        _assert_close(out, t_out, tol, 'out vs torch backend')
        _assert_close(probs, t_probs, max(tol, 1e-6), 'probs vs torch backend')
        t_grads = torch_backend.pixel_attention_bwd(go, q, k, v, b, t_probs, cell, SCALE)
        for name, got, want in zip(('dq', 'dk', 'dv', 'dbias'), grads, t_grads):
            if want is not None:
                _assert_close(got, want, tol, f'{name} vs torch backend')


@pytest.mark.parametrize('case', PIXEL_CASES, ids=lambda c: 'B{}M{}Mp{}_{}x{}_cell{}_d{}dv{}_bias{}_nc{}'.format(*c))
def test_pixel_attention_fp32(case):
    _check_pixel(case, torch.float32)


# --- superpixel direction ----------------------------------------------------------------------

SUPERPIXEL_CASES = [
    # B, M, Mp, h, w, cell, d, dv, shared_kv, noncontig
    (1, 1, 1, 1, 1, 4, 8, 8, False, False),   # 1x1: the window is the own cell
    (2, 2, 2, 1, 3, 4, 5, 7, False, False),   # 1xN, batch 2, all heads, d != dv
    (1, 3, 1, 3, 1, 2, 6, 6, True, False),    # Nx1, cell 2, shared head, k is v
    (1, 2, 1, 3, 4, 4, 16, 8, False, True),   # interior cells, shared head, channels-last views
    (1, 2, 2, 2, 3, 7, 4, 4, True, False),    # cell 7, k is v, all heads
]


def _superpixel_case(case, dtype, seed=1):
    B, M, Mp, h, w, cell, d, dv, shared, noncontig = case
    gen = torch.Generator().manual_seed(seed)
    q = _rand(gen, (B, M, h, w, d), dtype, noncontig)
    k = _rand(gen, (B, Mp, h * cell, w * cell, d), dtype, noncontig)
    v = k if shared else _rand(gen, (B, Mp, h * cell, w * cell, dv), dtype, noncontig)
    go = _rand(gen, (B, h, w, M, dv), dtype)
    return q, k, v, go, cell, shared


def _superpixel_oracle(q, k, v, go, cell, shared):
    q64, k64 = (t.detach().cpu().double().requires_grad_() for t in (q, k))
    v64 = k64 if shared else v.detach().cpu().double().requires_grad_()
    out = reference.superpixel_attention(q64, k64, v64, cell, SCALE)
    ins = [q64, k64] + ([] if shared else [v64])
    grads = torch.autograd.grad(out, ins, go.cpu().double().permute(0, 3, 1, 2, 4))
    probs = _superpixel_probs(q64.detach(), k64.detach(), cell, SCALE)
    return out.detach().permute(0, 2, 3, 1, 4), probs, grads


def _check_superpixel(case, dtype, against_torch=True):
    q, k, v, go, cell, shared = _superpixel_case(case, dtype)
    tol = TOL[dtype]
    out, probs = tb.superpixel_attention_fwd(q, k, v, cell, SCALE, shared)
    assert out.dtype == dtype and out.is_contiguous()
    assert probs.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    want_out, want_probs, want_grads = _superpixel_oracle(q, k, v, go, cell, shared)
    _assert_close(out, want_out, tol, 'out')
    _assert_close(probs, want_probs, max(tol, 1e-6), 'probs')
    G = q.shape[1] // k.shape[1]
    excluded = probs.cpu()[:, _excluded(q.shape[2], q.shape[3], cell, G)]
    assert (excluded == 0).all(), 'excluded neighbours must be exactly 0'
    grads = tb.superpixel_attention_bwd(go, out, q, k, v, probs, cell, SCALE, shared)
    assert (grads[2] is None) == shared
    for name, got, x, want in zip(('dq', 'dk', 'dv'), grads, (q, k, v), want_grads):
        assert got.dtype == x.dtype and got.shape == x.shape
        _assert_close(got, want, tol, name)
    if against_torch:
        t_out, t_probs = torch_backend.superpixel_attention_fwd(q, k, v, cell, SCALE, shared)
        _assert_close(out, t_out, tol, 'out vs torch backend')
        _assert_close(probs, t_probs, max(tol, 1e-6), 'probs vs torch backend')
        t_grads = torch_backend.superpixel_attention_bwd(go, t_out, q, k, v, t_probs, cell, SCALE, shared)
        for name, got, want in zip(('dq', 'dk', 'dv'), grads, t_grads):
            if want is not None:
                _assert_close(got, want, tol, f'{name} vs torch backend')


@pytest.mark.parametrize('case', SUPERPIXEL_CASES,
                         ids=lambda c: 'B{}M{}Mp{}_{}x{}_cell{}_d{}dv{}_shared{}_nc{}'.format(*c))
def test_superpixel_attention_fp32(case):
    _check_superpixel(case, torch.float32)


# --- cell-major pixel tensors ------------------------------------------------------------------

def _to_cells(x, cell):
    """(B, Mp, H, W, c) -> (B, Mp, h, w, cell*cell, c), written out index by index (independent of
    spformer.kernels.image_to_cells)."""
    B, Mp, H, W, c = x.shape
    out = x.new_empty(B, Mp, H // cell, W // cell, cell * cell, c)
    for y in range(H):
        for x_ in range(W):
            out[:, :, y // cell, x_ // cell, (y % cell) * cell + x_ % cell] = x[:, :, y, x_]
    return out


@pytest.mark.parametrize('case', [PIXEL_CASES[2], PIXEL_CASES[4]], ids=['cell2_shared', 'cell7_all_heads'])
def test_pixel_attention_cells_layout(case):
    """pixel_layout='cells': the kernels read q and write out / dq cell-major; same numbers as image layout."""
    q, k, v, b, go, cell = _pixel_case(case, torch.float32)
    out, probs = tb.pixel_attention_fwd(q, k, v, b, cell, SCALE)
    grads = tb.pixel_attention_bwd(go, q, k, v, b, probs, cell, SCALE)
    go_cells = _to_cells(go.permute(0, 3, 1, 2, 4), cell).permute(0, 2, 3, 4, 1, 5).contiguous()  # (B, h, w, n, M, dv)
    c_out, c_probs = tb.pixel_attention_fwd(_to_cells(q, cell), k, v, b, cell, SCALE, cells=True)
    want_out = _to_cells(out.permute(0, 3, 1, 2, 4), cell).permute(0, 2, 3, 4, 1, 5)
    _assert_close(c_out, want_out, TOL[torch.float32], 'out (cells)')
    _assert_close(c_probs, probs, TOL[torch.float32], 'probs (cells)')
    c_grads = tb.pixel_attention_bwd(go_cells, _to_cells(q, cell), k, v, b, c_probs, cell, SCALE, cells=True)
    _assert_close(c_grads[0], _to_cells(grads[0], cell), TOL[torch.float32], 'dq (cells)')
    for name, got, want in zip(('dk', 'dv', 'dbias'), c_grads[1:], grads[1:]):
        if want is not None:
            _assert_close(got, want, TOL[torch.float32], f'{name} (cells)')


@pytest.mark.parametrize('case', [SUPERPIXEL_CASES[1], SUPERPIXEL_CASES[4]], ids=['1xN_all_heads', 'cell7_shared_kv'])
def test_superpixel_attention_cells_layout(case):
    q, k, v, go, cell, shared = _superpixel_case(case, torch.float32)
    out, probs = tb.superpixel_attention_fwd(q, k, v, cell, SCALE, shared)
    grads = tb.superpixel_attention_bwd(go, out, q, k, v, probs, cell, SCALE, shared)
    kc = _to_cells(k, cell)
    vc = kc if shared else _to_cells(v, cell)
    c_out, c_probs = tb.superpixel_attention_fwd(q, kc, vc, cell, SCALE, shared, cells=True)
    _assert_close(c_out, out, TOL[torch.float32], 'out (cells)')
    _assert_close(c_probs, probs, TOL[torch.float32], 'probs (cells)')
    c_grads = tb.superpixel_attention_bwd(go, c_out, q, kc, vc, c_probs, cell, SCALE, shared, cells=True)
    _assert_close(c_grads[0], grads[0], TOL[torch.float32], 'dq (cells)')
    _assert_close(c_grads[1], _to_cells(grads[1], cell), TOL[torch.float32], 'dk (cells)')
    if not shared:
        _assert_close(c_grads[2], _to_cells(grads[2], cell), TOL[torch.float32], 'dv (cells)')


# --- other dtypes ------------------------------------------------------------------------------

@pytest.mark.parametrize('dtype', [torch.float16, torch.bfloat16, torch.float64], ids=str)
def test_pixel_attention_dtypes(dtype):
    _check_pixel((1, 2, 1, 2, 2, 4, 8, 6, True, False), dtype)


@pytest.mark.parametrize('dtype', [torch.float16, torch.bfloat16, torch.float64], ids=str)
def test_superpixel_attention_dtypes(dtype):
    _check_superpixel((1, 2, 1, 2, 2, 4, 8, 6, False, False), dtype)


# --- edge cases --------------------------------------------------------------------------------

def test_empty_batch():
    q, k, v = (torch.randn(shape, device=DEVICE) for shape in ((0, 1, 8, 8, 4), (0, 2, 2, 2, 4), (0, 2, 2, 2, 3)))
    out, probs = tb.pixel_attention_fwd(q, k, v, None, 4, SCALE)
    assert out.shape == (0, 8, 8, 2, 3) and probs.shape == (0, 2, 2, 16, 18)
    dq, dk, dv, db = tb.pixel_attention_bwd(torch.randn(0, 8, 8, 2, 3, device=DEVICE), q, k, v, None, probs, 4, SCALE)
    assert (dq.shape, dk.shape, dv.shape, db) == (q.shape, k.shape, v.shape, None)
    out, probs = tb.superpixel_attention_fwd(k, q, q, 4, SCALE, True)
    assert out.shape == (0, 2, 2, 2, 4) and probs.shape == (0, 2, 2, 16, 18)
    dq, dk, dv = tb.superpixel_attention_bwd(torch.randn_like(out), out, k, q, q, probs, 4, SCALE, True)
    assert (dq.shape, dk.shape, dv) == (k.shape, q.shape, None)


def test_deterministic():
    q, k, v, b, go, cell = _pixel_case((1, 2, 1, 2, 2, 2, 4, 4, True, False), torch.float32)
    out, probs = tb.pixel_attention_fwd(q, k, v, b, cell, SCALE)
    first = tb.pixel_attention_bwd(go, q, k, v, b, probs, cell, SCALE)
    again = tb.pixel_attention_bwd(go, q, k, v, b, probs, cell, SCALE)
    assert all(torch.equal(x, y) for x, y in zip(first, again))


def test_public_api_through_custom_ops(monkeypatch):
    """pixel_attention / superpixel_attention (custom ops, registered autograd, return_weights) on this
    backend against the reference backend."""
    if 'triton' in functional.BACKENDS:
        backend = 'triton'
    else:  # until kernels/functional.py dispatches here: route 'auto' to this module
        monkeypatch.setattr(functional, '_impl', lambda backend, device: tb)
        backend = 'auto'
    gen = torch.Generator().manual_seed(3)
    q, k, v, b = (_rand(gen, shape, torch.float32).requires_grad_()
                  for shape in ((1, 1, 8, 12, 8), (1, 2, 2, 3, 8), (1, 2, 2, 3, 6), (1, 2, 2, 3)))
    for name, fn, ins in (
            ('pixel_attention', lambda be: pixel_attention(q, k, v, 4, bias=b, return_weights=True, backend=be),
             (q, k, v, b)),
            ('superpixel_attention', lambda be: (superpixel_attention(k, q, q, 4, backend=be),), (k, q))):
        got, want = fn(backend), fn('reference')
        for x, y in zip(got, want):
            _assert_close(x.detach(), y.detach(), TOL[torch.float32], f'{name} value')
        grads = torch.autograd.grad(got[0].square().sum(), ins)
        want_grads = torch.autograd.grad(want[0].square().sum(), ins)
        for i, (x, y) in enumerate(zip(grads, want_grads)):
            _assert_close(x, y, TOL[torch.float32], f'{name} grad {i}')


# --- GPU legality without a GPU ----------------------------------------------------------------

_COMPILE_ALL = r'''
import os, sys
os.environ.pop('TRITON_INTERPRET', None)
import torch, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from spformer.kernels import triton_backend as tb

TY = {torch.float32: 'fp32', torch.bfloat16: 'bf16', torch.float16: 'fp16', torch.float64: 'fp64'}
SIZES = ('h', 'w', 'Mp', 'G', 'D', 'DV')


def compile_one(kernel, dtype, cell, d, dv, G, **flags):
    cfg = tb._config(dtype, cell, d, dv, G)
    num_warps = cfg.pop('num_warps')
    consts = dict(cfg, BK=tb._BK, BG=tb._block(G), **flags)
    sig, constexprs = {}, {}
    for name in kernel.arg_names:
        if name.endswith('_ptr'):
            exact = name in ('probs_ptr', 'delta_ptr') and dtype != torch.float64
            sig[name] = '*' + ('fp32' if exact else TY[dtype])
        elif name in SIZES:
            sig[name] = 'i32'
        elif name in ('scale', 'scale_lo'):
            sig[name] = 'fp32'
        else:
            sig[name] = 'constexpr'
            constexprs[name] = consts[name]
    triton.compile(ASTSource(kernel, sig, constexprs), target=GPUTarget('cuda', 90, 32),
                   options=dict(num_warps=num_warps))


F32, BF16 = torch.float32, torch.bfloat16
# fp32 (tf32x3 dots): every flag variant; bf16 (tf32 dots on upcast tiles, cell 7): every kernel once.
JOBS = [(tb._pixel_fwd_kernel, F32, 4, 32, 48, dict(HAS_BIAS=False)),
        (tb._pixel_fwd_kernel, F32, 4, 32, 48, dict(HAS_BIAS=True)),
        (tb._pixel_bwd_dq_kernel, F32, 4, 32, 48, {}),
        (tb._pixel_bwd_dkv_kernel, F32, 4, 32, 48, dict(HAS_BIAS=False)),
        (tb._pixel_bwd_dkv_kernel, F32, 4, 32, 48, dict(HAS_BIAS=True)),
        (tb._superpixel_fwd_kernel, F32, 4, 32, 48, dict(SHARED_KV=False)),
        (tb._superpixel_bwd_dq_kernel, F32, 4, 32, 48, dict(SHARED_KV=False)),
        (tb._superpixel_bwd_dq_kernel, F32, 4, 32, 32, dict(SHARED_KV=True)),
        (tb._superpixel_bwd_dkv_kernel, F32, 4, 32, 48, dict(SHARED_KV=False)),
        (tb._superpixel_bwd_dkv_kernel, F32, 4, 32, 32, dict(SHARED_KV=True)),
        (tb._pixel_fwd_kernel, BF16, 7, 16, 16, dict(HAS_BIAS=True)),
        (tb._pixel_bwd_dq_kernel, BF16, 7, 16, 16, {}),
        (tb._pixel_bwd_dkv_kernel, BF16, 7, 16, 16, dict(HAS_BIAS=True)),
        (tb._superpixel_fwd_kernel, BF16, 7, 16, 16, dict(SHARED_KV=True)),
        (tb._superpixel_bwd_dq_kernel, BF16, 7, 16, 16, dict(SHARED_KV=True)),
        (tb._superpixel_bwd_dkv_kernel, BF16, 7, 16, 16, dict(SHARED_KV=False)),
        (tb._pixel_fwd_kernel, F32, 4, 32, 32, dict(HAS_BIAS=True, CELLS=True)),
        (tb._pixel_bwd_dq_kernel, F32, 4, 32, 32, dict(CELLS=True)),
        (tb._pixel_bwd_dkv_kernel, F32, 4, 32, 32, dict(HAS_BIAS=True, CELLS=True)),
        (tb._superpixel_fwd_kernel, F32, 4, 32, 32, dict(SHARED_KV=True, CELLS=True)),
        (tb._superpixel_bwd_dq_kernel, F32, 4, 32, 32, dict(SHARED_KV=True, CELLS=True)),
        (tb._superpixel_bwd_dkv_kernel, F32, 4, 32, 32, dict(SHARED_KV=True, CELLS=True))]
part, parts = int(sys.argv[1]), int(sys.argv[2])
for kernel, dtype, cell, d, dv, flags in JOBS[part::parts]:
    compile_one(kernel, dtype, cell, d, dv, 6, **flags)
print('compiled')
'''


def test_kernels_compile_for_sm90(compile_for_sm90):
    """The interpreter accepts code a GPU compile rejects (dot shapes, constexpr rebinding, dtype
    mixes): compile every kernel variant for sm_90 (front end, LLVM and ptxas; no GPU needed)."""
    compile_for_sm90(_COMPILE_ALL, timeout=600)
