"""Tests of the local pixel <-> superpixel cross-attention ops (``spformer.kernels``).

The oracle here is written from the definition alone, with plain Python loops over pixels
and superpixels and explicit index lists in float64; it shares no code with the library.
The ``reference`` backend is checked against it, and the ``torch`` backend against both it
and the ``reference`` backend (values and gradients of every input).

Definition (cell = side of a superpixel cell in pixels; cell of pixel (y, x) is
(y // cell, x // cell)):

* superpixel_attention: superpixel (i, j) takes a softmax over all pixels whose cell lies
  in the 3x3 block of cells around (i, j), clipped to the image (no padding, no shift);
* pixel_attention: pixel (y, x) takes a softmax over the superpixels of the 3x3 block of
  cells around its own cell, clipped to the image; neighbour k is the cell at offset
  (k // 3 - 1, k % 3 - 1), with weight exactly 0 outside the image;
* default scale = d ** -0.5.
"""
import math

import numpy as np
import pytest
import torch

from spformer.kernels import (
    NEIGHBOR_OFFSETS,
    image_to_cells,
    pixel_attention,
    superpixel_association,
    superpixel_attention,
    torch_backend,
)

BACKENDS = ('reference', 'torch')


# --------------------------------------------------------------------------------------
# Naive oracle (independent of the library): Python loops, float64.
# --------------------------------------------------------------------------------------

def _np64(t):
    return t.detach().to(torch.float64).cpu().numpy()


def _oracle_scale(scale, d):
    return d ** -0.5 if scale is None else float(scale)


def _softmax_list(logits):
    mx = max(logits)
    e = [math.exp(a - mx) for a in logits]
    z = sum(e)
    return [x / z for x in e]


def naive_window_pixels(i, j, h, w, cell):
    """Explicit list of the pixels (y, x) in the 3x3 block of cells around cell (i, j), inside the image."""
    pix = []
    for ci in range(i - 1, i + 2):
        for cj in range(j - 1, j + 2):
            if 0 <= ci < h and 0 <= cj < w:
                for y in range(ci * cell, (ci + 1) * cell):
                    for x in range(cj * cell, (cj + 1) * cell):
                        pix.append((y, x))
    return pix


def naive_pixel_neighbours(y, x, h, w, cell):
    """List of (k, ny, nx) for the in-image neighbour superpixels of pixel (y, x)."""
    cy, cx = y // cell, x // cell
    out = []
    for k in range(9):
        dy, dx = k // 3 - 1, k % 3 - 1
        ny, nx = cy + dy, cx + dx
        if 0 <= ny < h and 0 <= nx < w:
            out.append((k, ny, nx))
    return out


def naive_superpixel_attention(q_s, k_p, v_p, cell, scale=None):
    q, k, v = _np64(q_s), _np64(k_p), _np64(v_p)
    B, M, h, w, d = q.shape
    dv = v.shape[-1]
    s = _oracle_scale(scale, d)
    out = np.zeros((B, M, h, w, dv))
    for b in range(B):
        for m in range(M):
            for i in range(h):
                for j in range(w):
                    pix = naive_window_pixels(i, j, h, w, cell)
                    logits = [s * float(np.dot(q[b, m, i, j], k[b, m, y, x])) for y, x in pix]
                    probs = _softmax_list(logits)
                    acc = np.zeros(dv)
                    for (y, x), p in zip(pix, probs):
                        acc += p * v[b, m, y, x]
                    out[b, m, i, j] = acc
    return torch.from_numpy(out)


def naive_pixel_attention(q_p, k_s, v_s, cell, scale=None):
    """Returns (out (B, M, H, W, dv), weights (B, M, H, W, 9)) in float64."""
    q, k = _np64(q_p), _np64(k_s)
    v = _np64(v_s) if v_s is not None else None
    B, M, H, W, d = q.shape
    h, w = k.shape[2:4]
    s = _oracle_scale(scale, d)
    dv = v.shape[-1] if v is not None else 1
    out = np.zeros((B, M, H, W, dv))
    weights = np.zeros((B, M, H, W, 9))
    for b in range(B):
        for m in range(M):
            for y in range(H):
                for x in range(W):
                    nbrs = naive_pixel_neighbours(y, x, h, w, cell)
                    logits = [s * float(np.dot(q[b, m, y, x], k[b, m, ny, nx])) for _, ny, nx in nbrs]
                    probs = _softmax_list(logits)
                    for (kk, ny, nx), p in zip(nbrs, probs):
                        weights[b, m, y, x, kk] = p
                        if v is not None:
                            out[b, m, y, x] += p * v[b, m, ny, nx]
    return torch.from_numpy(out), torch.from_numpy(weights)


def naive_valid_mask(H, W, h, w, cell):
    """(H, W, 9) bool: neighbour k of pixel (y, x) lies inside the superpixel grid."""
    valid = torch.zeros(H, W, 9, dtype=torch.bool)
    for y in range(H):
        for x in range(W):
            for k, _, _ in naive_pixel_neighbours(y, x, h, w, cell):
                valid[y, x, k] = True
    return valid


def naive_gather_values(v_s, H, W, cell):
    """(B, M, H, W, 9, dv): value of the k-th neighbour superpixel of each pixel (0 outside)."""
    B, M, h, w, dv = v_s.shape
    g = torch.zeros(B, M, H, W, 9, dv, dtype=v_s.dtype)
    for y in range(H):
        for x in range(W):
            for k, ny, nx in naive_pixel_neighbours(y, x, h, w, cell):
                g[:, :, y, x, k] = v_s[:, :, ny, nx]
    return g


# --------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------

def make_inputs(B, M, h, w, cell, d, dv, dtype=torch.float64, seed=0, q_mult=1.0, channels_last=False):
    """Both directions' inputs. With channels_last, every tensor is a non-contiguous
    ``x.view(B, H, W, M, c).permute(0, 3, 1, 2, 4)`` of a channels-last buffer."""
    g = torch.Generator().manual_seed(seed)
    H, W = h * cell, w * cell

    def rnd(hh, ww, c, mult=1.0):
        if channels_last:
            x = torch.randn(B, hh, ww, M * c, generator=g, dtype=torch.float64) * mult
            return x.to(dtype).view(B, hh, ww, M, c).permute(0, 3, 1, 2, 4)
        return (torch.randn(B, M, hh, ww, c, generator=g, dtype=torch.float64) * mult).to(dtype)

    return dict(
        q_s=rnd(h, w, d, q_mult), k_p=rnd(H, W, d), v_p=rnd(H, W, dv),
        q_p=rnd(H, W, d, q_mult), k_s=rnd(h, w, d), v_s=rnd(h, w, dv),
    )


# (B, M, h, w, cell, d, dv, scale): grids 1x1, 1xN, Nx1, non-square, interior cells;
# cells 1, 2, 3, 4, 7; heads 1, 2, 3; d != dv; batch > 1; non-default scales.
CONFIGS = [
    (1, 1, 1, 1, 1, 3, 3, None),
    (1, 2, 1, 1, 4, 4, 2, None),
    (2, 1, 1, 4, 2, 3, 5, None),
    (1, 3, 4, 1, 3, 2, 4, 0.7),
    (2, 2, 3, 5, 4, 4, 3, None),
    (1, 1, 3, 5, 7, 3, 2, None),
    (1, 2, 2, 3, 7, 2, 3, 1.3),
    (2, 3, 4, 4, 2, 5, 3, 0.25),
    (1, 1, 5, 3, 3, 4, 4, None),
    (2, 2, 2, 2, 1, 3, 2, 2.0),
    (1, 1, 1, 6, 1, 2, 2, None),
    (1, 2, 5, 1, 4, 3, 1, None),
]


def _cfg_id(c):
    B, M, h, w, cell, d, dv, scale = c
    return f'B{B}-M{M}-{h}x{w}-cell{cell}-d{d}-dv{dv}-scale{scale}'


CFG_IDS = [_cfg_id(c) for c in CONFIGS]


# --------------------------------------------------------------------------------------
# 0. The oracle itself (so that a wrong oracle cannot silently agree with a wrong library)
# --------------------------------------------------------------------------------------

def test_oracle_hand_computed_case():
    """1x2 superpixel grid, cell 1, d = 1: the softmaxes written out by hand."""
    q_p = torch.tensor([1.0, 2.0], dtype=torch.float64).view(1, 1, 1, 2, 1)
    k_s = torch.tensor([0.5, -1.0], dtype=torch.float64).view(1, 1, 1, 2, 1)
    v_s = torch.tensor([3.0, 7.0], dtype=torch.float64).view(1, 1, 1, 2, 1)
    out, wts = naive_pixel_attention(q_p, k_s, v_s, 1, scale=1.0)
    # pixel 0: logits (own=0.5, right=-1.0) -> neighbours k=4 and k=5
    p0 = 1 / (1 + math.exp(-1.5))
    assert wts[0, 0, 0, 0].tolist() == pytest.approx([0, 0, 0, 0, p0, 1 - p0, 0, 0, 0])
    assert out[0, 0, 0, 0, 0].item() == pytest.approx(3 * p0 + 7 * (1 - p0))
    # pixel 1: logits (left=1.0, own=-2.0) -> neighbours k=3 and k=4
    p1 = 1 / (1 + math.exp(-3.0))
    assert wts[0, 0, 0, 1].tolist() == pytest.approx([0, 0, 0, p1, 1 - p1, 0, 0, 0, 0])
    # superpixel direction, same numbers: each superpixel sees both pixels
    q_s, k_p, v_p = k_s, q_p, torch.tensor([3.0, 7.0], dtype=torch.float64).view(1, 1, 1, 2, 1)
    o = naive_superpixel_attention(q_s, k_p, v_p, 1, scale=1.0)
    a = 1 / (1 + math.exp(0.5))  # softmax(0.5, 1.0)[0]
    assert o[0, 0, 0, 0, 0].item() == pytest.approx(3 * a + 7 * (1 - a))
    # default scale of the oracle is d ** -0.5
    o2 = naive_superpixel_attention(q_s * 2, k_p, v_p, 1)  # d = 1 -> scale 1
    a2 = 1 / (1 + math.exp(1.0))
    assert o2[0, 0, 0, 0, 0].item() == pytest.approx(3 * a2 + 7 * (1 - a2))
    # window sizes: corner / edge / interior cells of a 3x3 grid with cell 2
    assert len(naive_window_pixels(0, 0, 3, 3, 2)) == 4 * 4
    assert len(naive_window_pixels(0, 1, 3, 3, 2)) == 6 * 4
    assert len(naive_window_pixels(1, 1, 3, 3, 2)) == 9 * 4
    assert len(naive_window_pixels(0, 0, 1, 1, 7)) == 49


def test_neighbor_offsets_constant():
    assert tuple(NEIGHBOR_OFFSETS) == ((-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 0), (0, 1), (1, -1), (1, 0), (1, 1))


# --------------------------------------------------------------------------------------
# 1. Values against the naive oracle; torch vs reference values and gradients
# --------------------------------------------------------------------------------------

@pytest.mark.parametrize('backend', ['reference', 'torch', 'auto'])
@pytest.mark.parametrize('cfg', CONFIGS, ids=CFG_IDS)
def test_matches_naive_oracle(cfg, backend):
    """All three ops, float64, every superpixel and every pixel (borders included) vs the oracle."""
    B, M, h, w, cell, d, dv, scale = cfg
    x = make_inputs(B, M, h, w, cell, d, dv, seed=CONFIGS.index(cfg))
    before = {k: v.clone() for k, v in x.items()}

    want_s = naive_superpixel_attention(x['q_s'], x['k_p'], x['v_p'], cell, scale)
    want_p, want_w = naive_pixel_attention(x['q_p'], x['k_s'], x['v_s'], cell, scale)

    got_s = superpixel_attention(x['q_s'], x['k_p'], x['v_p'], cell, scale=scale, backend=backend)
    got_p, got_w = pixel_attention(x['q_p'], x['k_s'], x['v_s'], cell, scale=scale, return_weights=True,
                                   backend=backend)
    got_p_only = pixel_attention(x['q_p'], x['k_s'], x['v_s'], cell, scale=scale, backend=backend)
    got_a = superpixel_association(x['q_p'], x['k_s'], cell, scale=scale, backend=backend)

    assert got_s.shape == (B, M, h, w, dv) and got_s.dtype == torch.float64
    assert got_p.shape == (B, M, h * cell, w * cell, dv) and got_p.dtype == torch.float64
    assert got_w.shape == (B, M, h * cell, w * cell, 9) and got_a.shape == got_w.shape
    torch.testing.assert_close(got_s, want_s, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(got_p, want_p, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(got_p_only, want_p, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(got_w, want_w, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(got_a, want_w, rtol=1e-10, atol=1e-10)
    for k, v in x.items():  # inputs untouched
        assert torch.equal(v, before[k]), k


def _grads(fn_name, x, cell, scale, backend, up):
    """Outputs and d(loss)/d(every input) for loss = <outputs, random upstream gradients>."""
    if fn_name == 'superpixel_attention':
        ins = [x['q_s'], x['k_p'], x['v_p']]
    elif fn_name == 'pixel_attention':
        ins = [x['q_p'], x['k_s'], x['v_s']]
    else:
        ins = [x['q_p'], x['k_s']]
    ins = [t.detach().clone().requires_grad_(True) for t in ins]
    if fn_name == 'superpixel_attention':
        outs = [superpixel_attention(*ins, cell, scale=scale, backend=backend)]
    elif fn_name == 'pixel_attention':
        outs = list(pixel_attention(*ins, cell, scale=scale, return_weights=True, backend=backend))
    else:
        outs = [superpixel_association(*ins, cell, scale=scale, backend=backend)]
    loss = sum((o * u).sum() for o, u in zip(outs, up))
    grads = torch.autograd.grad(loss, ins)
    return [o.detach() for o in outs], grads


def _upstream(fn_name, B, M, h, w, cell, dv, seed):
    g = torch.Generator().manual_seed(seed)
    H, W = h * cell, w * cell
    if fn_name == 'superpixel_attention':
        shapes = [(B, M, h, w, dv)]
    elif fn_name == 'pixel_attention':
        shapes = [(B, M, H, W, dv), (B, M, H, W, 9)]
    else:
        shapes = [(B, M, H, W, 9)]
    return [torch.randn(*s, generator=g, dtype=torch.float64) for s in shapes]


FN_NAMES = ['superpixel_attention', 'pixel_attention', 'superpixel_association']


@pytest.mark.parametrize('fn_name', FN_NAMES)
@pytest.mark.parametrize('cfg', CONFIGS, ids=CFG_IDS)
def test_torch_matches_reference_values_and_grads(cfg, fn_name):
    """torch backend == reference backend in float64: outputs and the gradient of every input
    for a random upstream gradient (pixel_attention: through the output and the weights)."""
    B, M, h, w, cell, d, dv, scale = cfg
    x = make_inputs(B, M, h, w, cell, d, dv, seed=7)
    up = _upstream(fn_name, B, M, h, w, cell, dv, seed=11)
    outs_r, grads_r = _grads(fn_name, x, cell, scale, 'reference', up)
    outs_t, grads_t = _grads(fn_name, x, cell, scale, 'torch', up)
    for a, b in zip(outs_t, outs_r):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    for i, (a, b) in enumerate(zip(grads_t, grads_r)):
        assert a.shape == b.shape
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10, msg=lambda m: f'grad of input {i}: {m}')
    # the comparison is not vacuous: every gradient is nonzero unless the softmax has a single
    # candidate (1x1 grid; for superpixel_attention also cell 1), where q and k get exactly 0
    single = h * w == 1 and (fn_name != 'superpixel_attention' or cell == 1)
    for i, b in enumerate(grads_r):
        is_value = fn_name != 'superpixel_association' and i == 2
        if single and not is_value:
            assert (b == 0).all() and (grads_t[i] == 0).all()
        else:
            assert b.abs().max() > 0


def _to_cells_loop(x, cell):
    """(B, M, H, W, *c) -> (B, M, h, w, cell*cell, *c) by explicit indexing (pixel (y, x) is entry
    (y % cell) * cell + x % cell of cell (y // cell, x // cell)); shares no code with the library."""
    B, M, H, W = x.shape[:4]
    out = x.new_zeros(B, M, H // cell, W // cell, cell * cell, *x.shape[4:])
    for y in range(H):
        for x_ in range(W):
            out[:, :, y // cell, x_ // cell, (y % cell) * cell + x_ % cell] = x[:, :, y, x_]
    return out


@pytest.mark.parametrize('backend', BACKENDS)
@pytest.mark.parametrize('fn_name', FN_NAMES)
@pytest.mark.parametrize('cfg', [CONFIGS[3], CONFIGS[4], CONFIGS[6]], ids=[CFG_IDS[3], CFG_IDS[4], CFG_IDS[6]])
def test_cells_layout_matches_image_layout(cfg, fn_name, backend):
    """pixel_layout='cells' takes and returns pixel tensors cell-major; values and the gradients of
    every input equal the image-layout call's, rearranged by the loop above."""
    B, M, h, w, cell, d, dv, scale = cfg
    x = make_inputs(B, M, h, w, cell, d, dv, seed=5)
    up = _upstream(fn_name, B, M, h, w, cell, dv, seed=6)
    outs, grads = _grads(fn_name, x, cell, scale, backend, up)
    pixel_inputs = {'superpixel_attention': ('k_p', 'v_p')}.get(fn_name, ('q_p',))
    xc = {k: _to_cells_loop(v, cell) if k in pixel_inputs else v for k, v in x.items()}
    up_c = up if fn_name == 'superpixel_attention' else [_to_cells_loop(u, cell) for u in up]
    ins = {'superpixel_attention': ['q_s', 'k_p', 'v_p'], 'pixel_attention': ['q_p', 'k_s', 'v_s']}.get(
        fn_name, ['q_p', 'k_s'])
    ins_c = [xc[k].detach().clone().requires_grad_(True) for k in ins]
    fn = dict(superpixel_attention=superpixel_attention, pixel_attention=pixel_attention,
              superpixel_association=superpixel_association)[fn_name]
    extra = dict(return_weights=True) if fn_name == 'pixel_attention' else {}
    outs_c = fn(*ins_c, cell, scale=scale, backend=backend, pixel_layout='cells', **extra)
    outs_c = list(outs_c) if isinstance(outs_c, tuple) else [outs_c]
    grads_c = torch.autograd.grad(sum((o * u).sum() for o, u in zip(outs_c, up_c)), ins_c)
    for got, want in zip(outs_c, outs):
        want = want if fn_name == 'superpixel_attention' else _to_cells_loop(want, cell)
        torch.testing.assert_close(got.detach(), want, rtol=1e-10, atol=1e-10)
    for name, got, want in zip(ins, grads_c, grads):
        want = _to_cells_loop(want, cell) if name in pixel_inputs else want
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-10, msg=lambda m: f'grad of {name}: {m}')


def test_cells_layout_helpers_roundtrip():
    from spformer.kernels import cells_to_image, image_to_cells
    x = torch.randn(2, 3, 8, 12, 5, dtype=torch.float64)
    torch.testing.assert_close(image_to_cells(x, 4), _to_cells_loop(x, 4), rtol=0, atol=0)
    torch.testing.assert_close(cells_to_image(image_to_cells(x, 4), 4), x, rtol=0, atol=0)


# --------------------------------------------------------------------------------------
# 2. gradcheck
# --------------------------------------------------------------------------------------

GRADCHECK_CFGS = [
    (1, 2, 3, 3, 1, 3, 2, None),  # corners, edges and an interior cell, cell 1
    (2, 1, 1, 3, 1, 2, 3, 0.8),  # 1xN, batch 2, non-default scale
    (1, 1, 2, 1, 2, 2, 1, None),  # Nx1, cell 2 (larger cells: fast mode below)
]


def _gradcheck_fn(fn_name, x, cell, scale, backend):
    if fn_name == 'superpixel_attention':
        ins = (x['q_s'], x['k_p'], x['v_p'])

        def f(a, b, c):
            return superpixel_attention(a, b, c, cell, scale=scale, backend=backend)
    elif fn_name == 'pixel_attention':
        ins = (x['q_p'], x['k_s'], x['v_s'])

        def f(a, b, c):
            return pixel_attention(a, b, c, cell, scale=scale, return_weights=True, backend=backend)
    else:
        ins = (x['q_p'], x['k_s'])

        def f(a, b):
            return superpixel_association(a, b, cell, scale=scale, backend=backend)
    return f, tuple(t.detach().clone().requires_grad_(True) for t in ins)


@pytest.mark.parametrize('backend', BACKENDS)
@pytest.mark.parametrize('fn_name', FN_NAMES)
@pytest.mark.parametrize('cfg', GRADCHECK_CFGS, ids=[_cfg_id(c) for c in GRADCHECK_CFGS])
def test_gradcheck(cfg, fn_name, backend):
    """Full (every Jacobian entry) float64 gradcheck, tiny shapes."""
    B, M, h, w, cell, d, dv, scale = cfg
    f, ins = _gradcheck_fn(fn_name, make_inputs(B, M, h, w, cell, d, dv, seed=3), cell, scale, backend)
    assert torch.autograd.gradcheck(f, ins, eps=1e-6, atol=1e-6, rtol=1e-5)


GRADCHECK_FAST_CFGS = [
    (1, 2, 3, 3, 2, 3, 2, None),  # interior cell with cell 2
    (1, 1, 4, 1, 3, 2, 2, None),  # Nx1, cell 3
    (1, 1, 2, 2, 7, 3, 2, 0.6),  # cell 7
    (2, 3, 3, 4, 4, 2, 3, None),  # cell 4, 3 heads, batch 2
]


@pytest.mark.parametrize('fn_name', FN_NAMES)
@pytest.mark.parametrize('cfg', GRADCHECK_FAST_CFGS, ids=[_cfg_id(c) for c in GRADCHECK_FAST_CFGS])
def test_gradcheck_fast_mode_torch(cfg, fn_name):
    """Larger cells on the torch backend with gradcheck's fast mode (random projections of the
    Jacobian: a full Jacobian of these sizes would take minutes)."""
    B, M, h, w, cell, d, dv, scale = cfg
    f, ins = _gradcheck_fn(fn_name, make_inputs(B, M, h, w, cell, d, dv, seed=8), cell, scale, 'torch')
    assert torch.autograd.gradcheck(f, ins, eps=1e-6, atol=1e-6, rtol=1e-5, fast_mode=True)


def test_gradcheck_noncontiguous_torch():
    """gradcheck on the torch backend with permuted channels-last (non-contiguous) inputs."""
    x = make_inputs(1, 2, 2, 3, 1, 2, 3, seed=5, channels_last=True)
    sp = tuple(t.detach().requires_grad_(True) for t in (x['q_s'], x['k_p'], x['v_p']))
    px = tuple(t.detach().requires_grad_(True) for t in (x['q_p'], x['k_s'], x['v_s']))
    assert not any(t.is_contiguous() for t in sp + px)
    assert torch.autograd.gradcheck(lambda a, b, c: superpixel_attention(a, b, c, 1, backend='torch'), sp)
    assert torch.autograd.gradcheck(
        lambda a, b, c: pixel_attention(a, b, c, 1, return_weights=True, backend='torch'), px)
    x = make_inputs(1, 2, 2, 3, 3, 2, 3, seed=6, channels_last=True)
    sp = tuple(t.detach().requires_grad_(True) for t in (x['q_s'], x['k_p'], x['v_p']))
    px = tuple(t.detach().requires_grad_(True) for t in (x['q_p'], x['k_s'], x['v_s']))
    assert torch.autograd.gradcheck(lambda a, b, c: superpixel_attention(a, b, c, 3, backend='torch'), sp,
                                    fast_mode=True)
    assert torch.autograd.gradcheck(
        lambda a, b, c: pixel_attention(a, b, c, 3, return_weights=True, backend='torch'), px, fast_mode=True)


# --------------------------------------------------------------------------------------
# 3. Non-contiguous inputs, large logits
# --------------------------------------------------------------------------------------

@pytest.mark.parametrize('backend', BACKENDS)
@pytest.mark.parametrize('cfg', [CONFIGS[4], CONFIGS[6], CONFIGS[7]], ids=[CFG_IDS[4], CFG_IDS[6], CFG_IDS[7]])
def test_noncontiguous_inputs(cfg, backend):
    """Inputs from ``x.view(B, H, W, M, d).permute(0, 3, 1, 2, 4)``: same values as the oracle,
    same values and gradients as the contiguous copies."""
    B, M, h, w, cell, d, dv, scale = cfg
    x = make_inputs(B, M, h, w, cell, d, dv, seed=2, channels_last=True)
    assert not any(t.is_contiguous() for t in x.values())
    xc = {k: v.contiguous() for k, v in x.items()}

    torch.testing.assert_close(
        superpixel_attention(x['q_s'], x['k_p'], x['v_p'], cell, scale=scale, backend=backend),
        naive_superpixel_attention(x['q_s'], x['k_p'], x['v_p'], cell, scale), rtol=1e-10, atol=1e-10)
    want_p, want_w = naive_pixel_attention(x['q_p'], x['k_s'], x['v_s'], cell, scale)
    got_p, got_w = pixel_attention(x['q_p'], x['k_s'], x['v_s'], cell, scale=scale, return_weights=True,
                                   backend=backend)
    torch.testing.assert_close(got_p, want_p, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(got_w, want_w, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(superpixel_association(x['q_p'], x['k_s'], cell, scale=scale, backend=backend),
                               want_w, rtol=1e-10, atol=1e-10)

    for fn_name in FN_NAMES:
        up = _upstream(fn_name, B, M, h, w, cell, dv, seed=1)
        outs_nc, grads_nc = _grads(fn_name, x, cell, scale, backend, up)
        outs_c, grads_c = _grads(fn_name, xc, cell, scale, backend, up)
        for a, b in zip(outs_nc + list(grads_nc), outs_c + list(grads_c)):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize('dtype', [torch.float64, torch.float32], ids=['float64', 'float32'])
@pytest.mark.parametrize('backend', BACKENDS)
@pytest.mark.parametrize('cfg', [CONFIGS[4], CONFIGS[5], CONFIGS[9]], ids=[CFG_IDS[4], CFG_IDS[5], CFG_IDS[9]])
def test_large_logits_stable(cfg, backend, dtype):
    """Queries scaled by 30 (logits in the hundreds: exp would overflow without max subtraction):
    finite outputs, weights and gradients, still equal to the oracle."""
    B, M, h, w, cell, d, dv, scale = cfg
    x = make_inputs(B, M, h, w, cell, d, dv, seed=4, q_mult=30.0, dtype=dtype)
    s = _oracle_scale(scale, d)
    big = (torch.einsum('bmhwd,bmyxd->bmhwyx', x['q_s'].double(), x['k_p'].double()).abs().max() * s).item()
    assert big > 100  # really large logits (exp(100) ~ 2.7e43: overflows float32)
    tol = dict(rtol=1e-9, atol=1e-9) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-4)

    got_s = superpixel_attention(x['q_s'], x['k_p'], x['v_p'], cell, scale=scale, backend=backend)
    got_p, got_w = pixel_attention(x['q_p'], x['k_s'], x['v_s'], cell, scale=scale, return_weights=True,
                                   backend=backend)
    got_a = superpixel_association(x['q_p'], x['k_s'], cell, scale=scale, backend=backend)
    for t in (got_s, got_p, got_w, got_a):
        assert torch.isfinite(t).all()
    want_p, want_w = naive_pixel_attention(x['q_p'], x['k_s'], x['v_s'], cell, scale)
    torch.testing.assert_close(got_s.double(), naive_superpixel_attention(x['q_s'], x['k_p'], x['v_p'], cell, scale),
                               **tol)
    torch.testing.assert_close(got_p.double(), want_p, **tol)
    torch.testing.assert_close(got_w.double(), want_w, **tol)
    torch.testing.assert_close(got_a.double(), want_w, **tol)

    for fn_name in FN_NAMES:
        _, grads = _grads(fn_name, x, cell, scale, backend, _upstream(fn_name, B, M, h, w, cell, dv, seed=2))
        for gr in grads:
            assert torch.isfinite(gr).all(), fn_name


# --------------------------------------------------------------------------------------
# 4. Properties
# --------------------------------------------------------------------------------------

@pytest.mark.parametrize('dtype', [torch.float64, torch.float32], ids=['float64', 'float32'])
@pytest.mark.parametrize('backend', BACKENDS)
@pytest.mark.parametrize('cfg', CONFIGS, ids=CFG_IDS)
def test_pixel_weight_properties(cfg, backend, dtype):
    """Weights: sum to 1 over the 9 neighbours, exactly 0 outside the image and > 0 inside;
    output == weights @ gathered neighbour values; superpixel_association == those weights."""
    B, M, h, w, cell, d, dv, scale = cfg
    H, W = h * cell, w * cell
    x = make_inputs(B, M, h, w, cell, d, dv, seed=9, dtype=dtype)
    out, wts = pixel_attention(x['q_p'], x['k_s'], x['v_s'], cell, scale=scale, return_weights=True,
                               backend=backend)
    assert out.dtype == dtype and wts.dtype == dtype
    tol = 1e-12 if dtype == torch.float64 else 1e-6
    valid = naive_valid_mask(H, W, h, w, cell).expand(B, M, H, W, 9)
    assert (wts[~valid] == 0).all(), 'weights of neighbours outside the image must be exactly 0'
    assert (wts[valid] > 0).all()
    torch.testing.assert_close(wts.sum(-1), torch.ones(B, M, H, W, dtype=dtype), rtol=0, atol=tol)
    gathered = naive_gather_values(x['v_s'], H, W, cell)
    torch.testing.assert_close(out, torch.einsum('bmyxk,bmyxkc->bmyxc', wts, gathered), rtol=tol, atol=tol)
    assoc = superpixel_association(x['q_p'], x['k_s'], cell, scale=scale, backend=backend)
    torch.testing.assert_close(assoc, wts, rtol=tol, atol=tol)
    # own cell (k = 4) is always a candidate
    assert (wts[..., 4] > 0).all()


def test_every_config_has_border_neighbours():
    """Sanity of the sweep: every config has pixels with out-of-image neighbours, and some
    have pixels / superpixels with the full 3x3 neighbourhood (interior)."""
    interior = False
    for B, M, h, w, cell, d, dv, scale in CONFIGS:
        valid = naive_valid_mask(h * cell, w * cell, h, w, cell)
        assert (~valid).any()
        interior |= bool(valid.all(-1).any())
    assert interior


@pytest.mark.parametrize('backend', BACKENDS)
def test_locality_and_convexity(backend):
    """Changing a pixel outside superpixel j's 3x3 window leaves j's output bit-identical;
    changing a superpixel outside a pixel's 3x3 neighbourhood leaves that pixel bit-identical;
    constant values give that constant (the weights form a convex combination)."""
    B, M, h, w, cell, d, dv = 1, 2, 4, 5, 3, 3, 2
    H, W = h * cell, w * cell
    x = make_inputs(B, M, h, w, cell, d, dv, seed=13)
    base_s = superpixel_attention(x['q_s'], x['k_p'], x['v_p'], cell, backend=backend)
    # perturb pixel (0, 0) (cell (0, 0)): only superpixels with |i| <= 1 and |j| <= 1 may change
    k2, v2 = x['k_p'].clone(), x['v_p'].clone()
    k2[:, :, 0, 0] += 5.0
    v2[:, :, 0, 0] -= 3.0
    new_s = superpixel_attention(x['q_s'], k2, v2, cell, backend=backend)
    changed = (new_s != base_s).any(-1).any(0).any(0)  # (h, w)
    expect = torch.zeros(h, w, dtype=torch.bool)
    expect[:2, :2] = True
    assert torch.equal(changed, expect)
    # perturb superpixel (3, 4) (bottom-right): only pixels in cells (2..3, 3..4) may change
    ks2, vs2 = x['k_s'].clone(), x['v_s'].clone()
    ks2[:, :, 3, 4] += 5.0
    vs2[:, :, 3, 4] -= 3.0
    base_p = pixel_attention(x['q_p'], x['k_s'], x['v_s'], cell, backend=backend)
    new_p = pixel_attention(x['q_p'], ks2, vs2, cell, backend=backend)
    changed = (new_p != base_p).any(-1).any(0).any(0)  # (H, W)
    expect = torch.zeros(H, W, dtype=torch.bool)
    expect[2 * cell:, 3 * cell:] = True
    assert torch.equal(changed, expect)
    # constant values
    c = torch.tensor([1.5, -2.0], dtype=torch.float64)
    out = superpixel_attention(x['q_s'], x['k_p'], c.expand(B, M, H, W, dv), cell, backend=backend)
    torch.testing.assert_close(out, c.expand(B, M, h, w, dv), rtol=1e-12, atol=1e-12)
    out = pixel_attention(x['q_p'], x['k_s'], c.expand(B, M, h, w, dv), cell, backend=backend)
    torch.testing.assert_close(out, c.expand(B, M, H, W, dv), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize('backend', BACKENDS)
def test_default_scale_is_rsqrt_d(backend):
    B, M, h, w, cell, d, dv = 1, 2, 2, 3, 2, 5, 3
    x = make_inputs(B, M, h, w, cell, d, dv, seed=17, q_mult=2.0)
    a = superpixel_attention(x['q_s'], x['k_p'], x['v_p'], cell, backend=backend)
    b = superpixel_attention(x['q_s'], x['k_p'], x['v_p'], cell, scale=d ** -0.5, backend=backend)
    c = superpixel_attention(x['q_s'], x['k_p'], x['v_p'], cell, scale=1.0, backend=backend)
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    assert (a - c).abs().max() > 1e-3  # the scale matters for these inputs
    wa = superpixel_association(x['q_p'], x['k_s'], cell, backend=backend)
    wb = superpixel_association(x['q_p'], x['k_s'], cell, scale=d ** -0.5, backend=backend)
    wc = superpixel_association(x['q_p'], x['k_s'], cell, scale=1.0, backend=backend)
    torch.testing.assert_close(wa, wb, rtol=1e-12, atol=1e-12)
    assert (wa - wc).abs().max() > 1e-3
    pa = pixel_attention(x['q_p'], x['k_s'], x['v_s'], cell, backend=backend)
    pb = pixel_attention(x['q_p'], x['k_s'], x['v_s'], cell, scale=d ** -0.5, backend=backend)
    torch.testing.assert_close(pa, pb, rtol=1e-12, atol=1e-12)
    # an integer scale is accepted and means the same as the float
    torch.testing.assert_close(
        superpixel_attention(x['q_s'], x['k_p'], x['v_p'], cell, scale=2, backend=backend),
        naive_superpixel_attention(x['q_s'], x['k_p'], x['v_p'], cell, 2.0), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize('layout', ['image', 'cells'])
@pytest.mark.parametrize('backend', BACKENDS + ('cpu',))
def test_empty_batch(backend, layout):
    """B = 0 gives empty outputs of the right shapes (and no error), forward and backward, in both pixel
    layouts (the fused C kernels included): what the B = 1 call gives, with batch 0."""
    cell = 2
    to_layout = (lambda t: image_to_cells(t, cell)) if layout == 'cells' else (lambda t: t)
    for B in (1, 0):
        x = {k: v.float().requires_grad_() for k, v in make_inputs(B, 2, 2, 3, cell, 3, 4).items()}
        k_p, v_p, q_p = (to_layout(x[k]) for k in ('k_p', 'v_p', 'q_p'))
        bias = torch.zeros(B, 2, 2, 3, requires_grad=True)
        outs = [superpixel_attention(x['q_s'], k_p, v_p, cell, backend=backend, pixel_layout=layout),
                *pixel_attention(q_p, x['k_s'], x['v_s'], cell, bias=bias, return_weights=True, backend=backend,
                                 pixel_layout=layout),
                superpixel_association(q_p, x['k_s'], cell, bias=bias, backend=backend, pixel_layout=layout)]
        sum(o.sum() for o in outs).backward()
        shapes = [o.shape[1:] for o in outs] + [t.grad.shape[1:] for t in (*x.values(), bias)]
        if B == 1:
            want = shapes
        else:
            assert shapes == want and all(o.shape[0] == 0 for o in outs)


# --------------------------------------------------------------------------------------
# 5. Reduced precision on the torch backend (reference: output dtype only)
# --------------------------------------------------------------------------------------

# Tolerances (absolute): outputs relative to the value scale max|v| (outputs are convex
# combinations of values); weights (in [0, 1]) as they are; input gradients relative to the
# largest float64 gradient. Measured max errors on CPU for these inputs: fp32 ~1e-7 / 1e-7 /
# 3e-7, fp16 5e-4 / 6e-4 / 2e-3, bf16 3.5e-3 / 5.3e-3 / 1.7e-2 (bf16 keeps 8 significant bits).
LOW_PRECISION_TOL = {
    torch.float32: dict(out=1e-5, weights=1e-5, grad=1e-5),
    torch.float16: dict(out=4e-3, weights=3e-3, grad=1e-2),
    torch.bfloat16: dict(out=2e-2, weights=2e-2, grad=6e-2),
}


@pytest.mark.parametrize('dtype', list(LOW_PRECISION_TOL), ids=lambda t: str(t).split('.')[-1])
@pytest.mark.parametrize('cfg', [CONFIGS[4], CONFIGS[5], CONFIGS[7]], ids=[CFG_IDS[4], CFG_IDS[5], CFG_IDS[7]])
def test_low_precision_torch_backend(cfg, dtype):
    """Output dtype == input dtype; values close to the float64 oracle evaluated on the same
    (rounded) inputs; gradients have the input dtype, are finite, and are close to float64's."""
    B, M, h, w, cell, d, dv, scale = cfg
    x = make_inputs(B, M, h, w, cell, d, dv, seed=21, dtype=dtype)
    tol = LOW_PRECISION_TOL[dtype]

    vs_scale = max(x['v_p'].abs().max().item(), x['v_s'].abs().max().item())
    atol_out = tol['out'] * vs_scale
    got_s = superpixel_attention(x['q_s'], x['k_p'], x['v_p'], cell, scale=scale, backend='torch')
    got_p, got_w = pixel_attention(x['q_p'], x['k_s'], x['v_s'], cell, scale=scale, return_weights=True,
                                   backend='torch')
    got_a = superpixel_association(x['q_p'], x['k_s'], cell, scale=scale, backend='torch')
    assert got_s.dtype == dtype and got_p.dtype == dtype and got_w.dtype == dtype and got_a.dtype == dtype
    want_s = naive_superpixel_attention(x['q_s'], x['k_p'], x['v_p'], cell, scale)
    want_p, want_w = naive_pixel_attention(x['q_p'], x['k_s'], x['v_s'], cell, scale)
    torch.testing.assert_close(got_s.double(), want_s, rtol=0, atol=atol_out)
    torch.testing.assert_close(got_p.double(), want_p, rtol=0, atol=atol_out)
    torch.testing.assert_close(got_w.double(), want_w, rtol=0, atol=tol['weights'])
    torch.testing.assert_close(got_a.double(), want_w, rtol=0, atol=tol['weights'])
    valid = naive_valid_mask(h * cell, w * cell, h, w, cell).expand_as(got_w)
    assert (got_w[~valid] == 0).all() and (got_a[~valid] == 0).all()

    # gradients: dtype, finite, close to the float64 gradients (loose: backward in low precision)
    x64 = {k: v.double() for k, v in x.items()}
    for fn_name in FN_NAMES:
        up = _upstream(fn_name, B, M, h, w, cell, dv, seed=5)
        _, g_low = _grads(fn_name, x, cell, scale, 'torch', [u.to(dtype) for u in up])
        _, g64 = _grads(fn_name, x64, cell, scale, 'reference', [u.to(dtype).double() for u in up])
        for a, b in zip(g_low, g64):
            assert a.dtype == dtype and torch.isfinite(a).all()
            gscale = b.abs().max().item()
            torch.testing.assert_close(a.double(), b, rtol=0, atol=tol['grad'] * gscale)


@pytest.mark.parametrize('dtype', [torch.float32, torch.float16, torch.bfloat16], ids=lambda t: str(t).split('.')[-1])
def test_reference_backend_keeps_dtype(dtype):
    cfg = CONFIGS[4]
    B, M, h, w, cell, d, dv, scale = cfg
    x = make_inputs(B, M, h, w, cell, d, dv, seed=22, dtype=dtype)
    got_s = superpixel_attention(x['q_s'], x['k_p'], x['v_p'], cell, backend='reference')
    got_p, got_w = pixel_attention(x['q_p'], x['k_s'], x['v_s'], cell, return_weights=True, backend='reference')
    got_a = superpixel_association(x['q_p'], x['k_s'], cell, backend='reference')
    assert {got_s.dtype, got_p.dtype, got_w.dtype, got_a.dtype} == {dtype}
    tol = LOW_PRECISION_TOL[dtype]
    torch.testing.assert_close(got_s.double(), naive_superpixel_attention(x['q_s'], x['k_p'], x['v_p'], cell),
                               rtol=0, atol=tol['out'] * x['v_p'].abs().max().item())
    torch.testing.assert_close(got_w.double(), naive_pixel_attention(x['q_p'], x['k_s'], None, cell)[1],
                               rtol=0, atol=tol['weights'])


# --------------------------------------------------------------------------------------
# 6. Bad input
# --------------------------------------------------------------------------------------

def _t(*shape, dtype=torch.float32):
    return torch.zeros(*shape, dtype=dtype)


def _sp(q=(1, 2, 2, 3, 4), k=(1, 2, 8, 12, 4), v=(1, 2, 8, 12, 5), cell=4, **kw):
    """superpixel_attention call on shapes (valid by default: 2x3 superpixels, cell 4)."""
    q, k, v = (_t(*s) if isinstance(s, tuple) else s for s in (q, k, v))
    return superpixel_attention(q, k, v, cell, **kw)


def _px(q=(1, 2, 8, 12, 4), k=(1, 2, 2, 3, 4), v=(1, 2, 2, 3, 5), cell=4, **kw):
    q, k, v = (_t(*s) if isinstance(s, tuple) else s for s in (q, k, v))
    return pixel_attention(q, k, v, cell, **kw)


def _as(q=(1, 2, 8, 12, 4), k=(1, 2, 2, 3, 4), cell=4, **kw):
    q, k = (_t(*s) if isinstance(s, tuple) else s for s in (q, k))
    return superpixel_association(q, k, cell, **kw)


def _both(name, word):
    """Regex: the message names the argument ``name`` and mentions ``word`` (either order)."""
    return rf'(?s)(?=.*\b{name}\b)(?=.*{word})'


BAD_INPUTS = [
    # wrong ndim
    ('ndim-q_s', lambda: _sp(q=(2, 2, 3, 4)), ValueError, r'q_s must be 5-D'),
    ('ndim-k_p', lambda: _sp(k=(1, 2, 8, 12, 4, 1)), ValueError, r'k_p must be 5-D'),
    ('ndim-v_p', lambda: _sp(v=(2, 8, 12, 5)), ValueError, r'v_p must be 5-D'),
    ('ndim-q_p', lambda: _px(q=(8, 12, 4)), ValueError, r'q_p must be 5-D'),
    ('ndim-k_s', lambda: _px(k=(1, 2, 2, 3)), ValueError, r'k_s must be 5-D'),
    ('ndim-v_s', lambda: _px(v=(1, 1, 2, 2, 3, 5)), ValueError, r'v_s must be 5-D'),
    ('ndim-assoc-k_s', lambda: _as(k=(2, 2, 3, 4)), ValueError, r'k_s must be 5-D'),
    # mismatched batch / heads
    ('batch-k_p', lambda: _sp(k=(2, 2, 8, 12, 4), v=(2, 2, 8, 12, 5)), ValueError, _both('k_p', 'batch')),
    ('heads-v_p', lambda: _sp(v=(1, 3, 8, 12, 5)), ValueError, _both('v_p', 'head')),
    ('batch-k_s', lambda: _px(k=(3, 2, 2, 3, 4)), ValueError, _both('k_s', 'batch')),
    ('heads-v_s', lambda: _px(v=(1, 1, 2, 3, 5)), ValueError, _both('v_s', 'head')),
    ('heads-assoc', lambda: _as(k=(1, 1, 2, 3, 4)), ValueError, _both('k_s', 'head')),
    # pixel grid != superpixel grid * cell (the expected grid must be named)
    ('grid-k_p', lambda: _sp(k=(1, 2, 8, 11, 4), v=(1, 2, 8, 11, 5)), ValueError,
     r'k_p.*expected a pixel grid of 8x12'),
    ('grid-k_p-cell', lambda: _sp(cell=3), ValueError, r'k_p.*expected a pixel grid of 6x9'),
    ('grid-q_p', lambda: _px(q=(1, 2, 12, 8, 4)), ValueError, r'q_p.*expected a pixel grid of 8x12'),
    ('grid-q_p-assoc', lambda: _as(q=(1, 2, 9, 12, 4)), ValueError, r'q_p.*expected a pixel grid of 8x12'),
    ('grid-empty', lambda: _sp(q=(1, 2, 0, 3, 4), k=(1, 2, 0, 12, 4), v=(1, 2, 0, 12, 5)), ValueError, r'q_s.*(1x1|empty|grid)'),
    # mismatched q / k channels
    ('channels-sp', lambda: _sp(q=(1, 2, 2, 3, 3)), ValueError, r'q_s.*k_p.*channels'),
    ('channels-px', lambda: _px(k=(1, 2, 2, 3, 6), v=(1, 2, 2, 3, 5)), ValueError, r'q_p.*k_s.*channels'),
    ('channels-assoc', lambda: _as(k=(1, 2, 2, 3, 2)), ValueError, r'q_p.*k_s.*channels'),
    # k / v grid mismatch
    ('kv-grid-sp', lambda: _sp(v=(1, 2, 8, 8, 5)), ValueError, r'k_p.*v_p.*pixel grid'),
    ('kv-grid-px', lambda: _px(v=(1, 2, 3, 2, 5)), ValueError, r'k_s.*v_s.*superpixel grid'),
    # dtype mismatch
    ('dtype-k_p', lambda: _sp(k=_t(1, 2, 8, 12, 4, dtype=torch.float64)), TypeError, r'k_p.*dtype'),
    ('dtype-v_s', lambda: _px(v=_t(1, 2, 2, 3, 5, dtype=torch.bfloat16)), TypeError, r'v_s.*dtype'),
    ('dtype-assoc', lambda: _as(q=_t(1, 2, 8, 12, 4, dtype=torch.float16)), TypeError, r'k_s.*dtype'),
    # integer / bool tensors
    ('int-all', lambda: _sp(q=_t(1, 2, 2, 3, 4, dtype=torch.int64), k=_t(1, 2, 8, 12, 4, dtype=torch.int64),
                            v=_t(1, 2, 8, 12, 5, dtype=torch.int64)), TypeError, r'q_s.*floating point'),
    ('int-v_s', lambda: _px(v=_t(1, 2, 2, 3, 5, dtype=torch.int32)), TypeError, r'v_s.*floating point'),
    ('bool-k_s', lambda: _as(k=_t(1, 2, 2, 3, 4, dtype=torch.bool)), TypeError, r'k_s.*floating point'),
    # not a tensor
    ('numpy-q_s', lambda: _sp(q=np.zeros((1, 2, 2, 3, 4), dtype=np.float32)), (ValueError, TypeError), r'q_s.*torch\.Tensor'),
    # device mismatch (meta device: no GPU needed)
    ('device-v_p', lambda: _sp(v=torch.zeros(1, 2, 8, 12, 5, device='meta')), ValueError, r'v_p.*(device|meta)'),
    # cell
    ('cell-0', lambda: _sp(cell=0), ValueError, r'cell'),
    ('cell-neg', lambda: _px(cell=-1), ValueError, r'cell'),
    ('cell-float', lambda: _as(cell=2.5), (ValueError, TypeError), r'cell'),
    ('cell-float-int-valued', lambda: _sp(cell=4.0), (ValueError, TypeError), r'cell'),
    ('cell-true', lambda: _sp(q=(1, 2, 8, 12, 4), cell=True), (ValueError, TypeError), r'cell'),
    ('cell-none', lambda: _px(cell=None), (ValueError, TypeError), r'cell'),
    # backend
    ('backend-unknown-sp', lambda: _sp(backend='cuda'), ValueError, r'backend'),
    ('backend-unknown-px', lambda: _px(backend='Torch'), ValueError, r'backend'),
    ('backend-unknown-assoc', lambda: _as(backend='naive'), ValueError, r'backend'),
    # scale
    ('scale-0', lambda: _sp(scale=0.0), ValueError, r'scale'),
    ('scale-neg', lambda: _px(scale=-1.0), ValueError, r'scale'),
    ('scale-neg-int', lambda: _as(scale=-2), ValueError, r'scale'),
    ('scale-nan', lambda: _sp(scale=float('nan')), ValueError, r'scale'),
    ('scale-inf', lambda: _px(scale=float('inf')), ValueError, r'scale'),
    ('scale-str', lambda: _as(scale='1'), (ValueError, TypeError), r'scale'),
    # a head dim of 0 (last dim: channels per head), also with an explicit scale
    ('head-dim-0-q_s', lambda: _sp(q=(1, 2, 2, 3, 0), k=(1, 2, 8, 12, 0)), ValueError,
     r'q_s.*head dim.*\(1, 2, 2, 3, 0\)'),
    ('head-dim-0-scale', lambda: _sp(q=(1, 2, 2, 3, 0), k=(1, 2, 8, 12, 0), scale=1.0), ValueError, r'q_s.*head dim'),
    ('head-dim-0-v_p', lambda: _sp(v=(1, 2, 8, 12, 0)), ValueError, r'v_p.*head dim.*\(1, 2, 8, 12, 0\)'),
    ('head-dim-0-q_p', lambda: _px(q=(1, 2, 8, 12, 0), k=(1, 2, 2, 3, 0)), ValueError, r'q_p.*head dim'),
    ('head-dim-0-v_s', lambda: _px(v=(1, 2, 2, 3, 0)), ValueError, r'v_s.*head dim'),
    ('head-dim-0-assoc', lambda: _as(q=(1, 2, 8, 12, 0), k=(1, 2, 2, 3, 0)), ValueError, r'q_p.*head dim'),
    ('head-dim-0-assoc-k_s', lambda: _as(k=(1, 2, 2, 3, 0)), ValueError, r'k_s.*head dim'),
    # pixel layout
    ('layout-unknown', lambda: _px(pixel_layout='nchw'), ValueError, r"pixel_layout.*'image'.*'cells'"),
    ('layout-cells-5d', lambda: _px(pixel_layout='cells'), ValueError, r'q_p.*6-D.*cell\*cell=16'),
    ('layout-cells-n', lambda: _sp(k=(1, 2, 2, 3, 9, 4), v=(1, 2, 2, 3, 9, 5), pixel_layout='cells'), ValueError,
     r'k_p.*6-D.*cell\*cell=16'),
    ('layout-cells-grid', lambda: _as(q=(1, 2, 3, 2, 16, 4), pixel_layout='cells'), ValueError,
     r'q_p.*grid of 3x2 cells.*2x3'),
]


@pytest.mark.parametrize('call,exc,match', [b[1:] for b in BAD_INPUTS], ids=[b[0] for b in BAD_INPUTS])
def test_bad_input_raises(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


def test_valid_calls_used_by_bad_input_tests_pass():
    """The defaults of the bad-input helpers are valid, so each bad case fails for its one defect."""
    assert _sp().shape == (1, 2, 2, 3, 5)
    assert _px().shape == (1, 2, 8, 12, 5)
    assert _as().shape == (1, 2, 8, 12, 9)
    for b in BACKENDS + ('auto',):
        _sp(backend=b, scale=0.5)
        _px(backend=b, return_weights=True)


# --- pixel tensors shared by all heads, and the per-superpixel logit bias ------------------------

def _expand_heads(t, M):
    return t.expand(t.shape[0], M, *t.shape[2:])


@pytest.mark.parametrize('M, grid, cell', [(2, (3, 5), 4), (3, (1, 4), 2), (2, (4, 1), 7), (1, (2, 2), 3)])
def test_shared_pixel_heads_and_bias_match_reference(M, grid, cell):
    """Pixel tensors with one head shared by all M heads equal the same tensor repeated M times, and
    the torch backend equals the reference with a bias, on values and on every gradient (float64)."""
    torch.manual_seed(0)
    B, d, dv = 2, 5, 3
    h, w = grid
    H, W = h * cell, w * cell
    dt = torch.float64
    q_p = (torch.randn(B, 1, H, W, d, dtype=dt) * 3).requires_grad_()
    k_s, v_s = torch.randn(B, M, h, w, d, dtype=dt, requires_grad=True), torch.randn(B, M, h, w, dv, dtype=dt, requires_grad=True)
    bias = torch.randn(B, M, h, w, dtype=dt, requires_grad=True)
    q_s = (torch.randn(B, M, h, w, d, dtype=dt) * 3).requires_grad_()
    x_p = torch.randn(B, 1, H, W, d, dtype=dt, requires_grad=True)  # k = v, shared by all heads
    leaves = [q_p, k_s, v_s, bias, q_s, x_p]

    def run(backend, expand):
        e = (lambda t: _expand_heads(t, M)) if expand else (lambda t: t)
        out_p = pixel_attention(e(q_p), k_s, v_s, cell, bias=bias, backend=backend)
        out_s = superpixel_attention(q_s, e(x_p), e(x_p), cell, backend=backend)
        g_p, g_s = torch.randn(out_p.shape, dtype=dt, generator=torch.Generator().manual_seed(1)), \
            torch.randn(out_s.shape, dtype=dt, generator=torch.Generator().manual_seed(2))
        grads = torch.autograd.grad((out_p * g_p).sum() + (out_s * g_s).sum(), leaves)
        return out_p, out_s, grads

    ref = run('reference', expand=True)
    for backend, expand in (('torch', False), ('torch', True), ('reference', False)):
        got = run(backend, expand)
        torch.testing.assert_close(got[0], ref[0], rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(got[1], ref[1], rtol=1e-10, atol=1e-10)
        for g, r in zip(got[2], ref[2]):
            torch.testing.assert_close(g, r, rtol=1e-9, atol=1e-10)
    weights = pixel_attention(q_p, k_s, v_s, cell, bias=bias, return_weights=True)[1]
    assoc = superpixel_association(q_p, k_s, cell, bias=bias, backend='reference')
    torch.testing.assert_close(weights, assoc, rtol=1e-10, atol=1e-12)


def test_shared_heads_bias_gradcheck():
    torch.manual_seed(0)
    dt = torch.float64
    q_p = torch.randn(1, 1, 6, 4, 3, dtype=dt, requires_grad=True)
    k_s, v_s = torch.randn(1, 2, 3, 2, 3, dtype=dt, requires_grad=True), torch.randn(1, 2, 3, 2, 2, dtype=dt, requires_grad=True)
    bias = torch.randn(1, 2, 3, 2, dtype=dt, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b, c, e: pixel_attention(a, b, c, 2, bias=e, backend='torch'),
                                    (q_p, k_s, v_s, bias))
    q_s = torch.randn(1, 2, 3, 2, 3, dtype=dt, requires_grad=True)
    x_p = torch.randn(1, 1, 6, 4, 3, dtype=dt, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: superpixel_attention(a, b, b, 2, backend='torch'), (q_s, x_p))


@pytest.mark.parametrize('chunk_items', [1, 2])
@pytest.mark.parametrize('shared', [False, True], ids=['per-head', 'shared-kv'])
@pytest.mark.parametrize('layout, dtype', [('image', torch.float64), ('cells', torch.bfloat16)])
def test_superpixel_batch_slices_match_reference(monkeypatch, layout, dtype, shared, chunk_items):
    """The torch backend runs the superpixel passes over a large batch in slices whenever it copies
    the pixel tensors (image layout, or a conversion to fp32): with the budget (CHUNK_BYTES) shrunk
    to 1 or 2 batch items, a batch of 3 (uneven slices) gives the reference's output and every
    gradient, per head and with k = v shared by the heads."""
    B, M, h, w, cell, d = 3, 2, 3, 2, 4, 5
    dv = d if shared else 3
    Mp = 1 if shared else M
    H, W = h * cell, w * cell
    g = torch.Generator().manual_seed(4)
    q = torch.randn(B, M, h, w, d, generator=g, dtype=torch.float64)
    k = torch.randn(B, Mp, H, W, d, generator=g, dtype=torch.float64)
    v = k if shared else torch.randn(B, Mp, H, W, dv, generator=g, dtype=torch.float64)
    up = torch.randn(B, M, h, w, dv, generator=g, dtype=torch.float64)
    if layout == 'cells':
        k, v = _to_cells_loop(k, cell), _to_cells_loop(v, cell)
    # bytes of one item's cell-major fp32/fp64 copies
    item_bytes = (k[0].numel() + (0 if shared else v[0].numel())) * (4 if dtype == torch.bfloat16 else 8)

    def run(backend):
        ins = [t.detach().to(dtype).requires_grad_() for t in ((q, k) if shared else (q, k, v))]
        out = superpixel_attention(ins[0], ins[1], ins[1] if shared else ins[2], cell, backend=backend,
                                   pixel_layout=layout)
        return out.detach(), torch.autograd.grad((out * up.to(dtype)).sum(), ins)

    want = run('reference')
    monkeypatch.setattr(torch_backend, 'CHUNK_BYTES', chunk_items * item_bytes)
    assert len(torch_backend.batch_slices(B, item_bytes)) == -(-B // chunk_items)
    got = run('torch')
    tol = dict(rtol=1e-10, atol=1e-10) if dtype == torch.float64 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(got[0], want[0], **tol)
    for a, b in zip(got[1], want[1]):
        torch.testing.assert_close(a, b, **tol)


@pytest.mark.parametrize('kwargs, match', [
    (dict(bias_shape=(2, 2, 3)), r'bias must have shape \(B, M, h, w\)'),
    (dict(q_heads=3), r'q_p has 3 heads but k_s has 2'),
])
def test_bad_bias_and_head_broadcast(kwargs, match):
    q_p = torch.randn(2, kwargs.get('q_heads', 1), 8, 12, 4)
    k_s, v_s = torch.randn(2, 2, 2, 3, 4), torch.randn(2, 2, 2, 3, 5)
    bias = torch.randn(*kwargs.get('bias_shape', (2, 2, 2, 3)))
    with pytest.raises(ValueError, match=match):
        pixel_attention(q_p, k_s, v_s, 4, bias=bias)
