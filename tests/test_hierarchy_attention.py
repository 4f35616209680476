"""Hierarchy attention (spformer.layers.hierarchy_attention) and the hierarchy_pvt_v2_b0_* models.

- every mode equals a naive float64 implementation written from the definition (explicit loops for the
  pooling regions and the pixel -> centre masks, dense masked attention), values and every gradient;
- 'window' with one centre per window is pool -> LayerNorm -> MHSA -> v -> proj -> nearest upsample, and
  its queries and keys get exactly zero gradient (the softmax over one key is identically 1);
- the cost model equals torch.utils.flop_counter / 2 on the modules (the mixer's three modes, timm's
  PVTv2 SRA for every sr_ratio, linear SRA) on several shapes;
- the models pass the model checks of the SPFormer family that apply to a PVTv2: forward, backward,
  grad checkpointing, features_only, forward_intermediates, torch.compile, a state-dict round trip;
- bad arguments fail with errors naming the argument.
"""
import math
import re

import pytest
import timm
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode
from timm.models.pvt_v2 import Attention as PvtAttention

import spformer  # noqa: F401  (registers the models)
from spformer.layers import HierarchyAttention, hierarchy_attention_macs, linear_sra_macs, sra_macs, \
    vanilla_attention_macs

MODELS = ['hierarchy_pvt_v2_b0_window', 'hierarchy_pvt_v2_b0_local', 'hierarchy_pvt_v2_b0_global']


# ------------------------------------------------------------------------------ the naive reference

def naive_pool(x, H, W, Sh, Sw):
    """Adaptive average pooling by its definition: centre (i, j) averages rows floor(i H / Sh) ..
    ceil((i + 1) H / Sh) - 1 and the columns likewise. x (B, N, C) -> (B, Sh * Sw, C)."""
    grid = x.reshape(x.shape[0], H, W, x.shape[-1])
    out = []
    for i in range(Sh):
        for j in range(Sw):
            r0, r1 = (i * H) // Sh, -((-(i + 1) * H) // Sh)
            c0, c1 = (j * W) // Sw, -((-(j + 1) * W) // Sw)
            out.append(grid[:, r0:r1, c0:c1].mean(dim=(1, 2)))
    return torch.stack(out, dim=1)


def naive_mask(mode, H, W, Sh, Sw, windows=None):
    """(N, M) bool: which centres pixel (y, x) attends, from the definitions, one pair at a time."""
    mask = torch.zeros(H * W, Sh * Sw, dtype=torch.bool)
    for y in range(H):
        for x in range(W):
            for i in range(Sh):
                for j in range(Sw):
                    if mode == 'global':
                        ok = True
                    elif mode == 'local':  # the 3x3 cells around the pixel's own cell
                        cell = H // Sh
                        ok = abs(i - y // cell) <= 1 and abs(j - x // cell) <= 1
                    else:  # same window: pixel window floor(y P / H), centre window floor(i P / S)
                        Ph, Pw = windows
                        ok = (y * Ph) // H == (i * Ph) // Sh and (x * Pw) // W == (j * Pw) // Sw
                    mask[y * W + x, i * Sw + j] = ok
    return mask


def naive_attention(q, k, v, heads, mask=None):
    """Multi-head attention written out: (B, Lq, C), (B, Lk, C) -> (B, Lq, C); mask (Lq, Lk) bool."""
    B, Lq, C = q.shape
    d = C // heads
    outs = []
    for h in range(heads):
        qh, kh, vh = (t[..., h * d:(h + 1) * d] for t in (q, k, v))
        logits = qh @ kh.transpose(1, 2) / math.sqrt(d)
        if mask is not None:
            logits = logits.masked_fill(~mask, float('-inf'))
        outs.append(torch.softmax(logits, dim=-1) @ vh)
    return torch.cat(outs, dim=-1)


def naive_centres(m, x, H, W):
    Sh, Sw = m.pool_size
    c = naive_pool(x, H, W, Sh, Sw)
    mu, var = c.mean(-1, keepdim=True), c.var(-1, unbiased=False, keepdim=True)
    c = (c - mu) / torch.sqrt(var + m.norm.eps) * m.norm.weight + m.norm.bias
    C = c.shape[-1]
    qkv = c @ m.centre_qkv.weight.T + m.centre_qkv.bias
    a = naive_attention(qkv[..., :C], qkv[..., C:2 * C], qkv[..., 2 * C:], m.num_heads)
    return c + a @ m.centre_proj.weight.T + m.centre_proj.bias


def naive_hierarchy(m, x, H, W):
    """HierarchyAttention m's forward, from the definition: pool, LayerNorm, MHSA (residual), masked
    cross-attention of pixel queries over centre keys / values, output projection."""
    Sh, Sw = m.pool_size
    C = x.shape[-1]
    c = naive_centres(m, x, H, W)
    q = x @ m.q.weight.T + m.q.bias
    kv = c @ m.kv.weight.T + m.kv.bias
    mask = naive_mask(m.mode, H, W, Sh, Sw, m.windows)
    out = naive_attention(q, kv[..., :C], kv[..., C:], m.num_heads, mask)
    return out @ m.proj.weight.T + m.proj.bias


def _randomized(m):
    with torch.no_grad():  # off the default init (zero biases, unit LayerNorm) so every term is tested
        for p in m.parameters():
            p.copy_(torch.randn_like(p) * 0.5)
    return m


CASES = [  # mode, (H, W), pool_size, windows, heads
    ('window', (5, 7), 3, None, 2),          # one centre per window, uneven windows (floor rule)
    ('window', (8, 6), (4, 2), None, 1),
    ('window', (7, 9), 4, 2, 2),             # 2 x 2 windows of 4 centres each
    ('global', (5, 6), (2, 3), None, 2),
    ('global', (2, 3), 3, None, 1),          # a grid smaller than the centre grid (overlapping regions)
    ('local', (6, 9), (2, 3), None, 2),      # cell 3
    ('local', (4, 4), 4, None, 2),           # cell 1
    ('local', (8, 4), (2, 1), None, 1),      # cell 4, a 2 x 1 centre grid (border neighbours missing)
]


@pytest.mark.parametrize('mode, grid, pool, windows, heads', CASES)
def test_modes_match_naive_float64(mode, grid, pool, windows, heads):
    """Values and the gradients of the input and of every parameter, float64."""
    torch.manual_seed(0)
    H, W = grid
    C = 4 * heads
    m = _randomized(HierarchyAttention(C, heads, mode, pool, windows, dtype=torch.float64))
    x = torch.randn(2, H * W, C, dtype=torch.float64, requires_grad=True)
    g = torch.randn(2, H * W, C, dtype=torch.float64)
    out = m(x, (H, W))
    want = naive_hierarchy(m, x, H, W)
    torch.testing.assert_close(out, want, rtol=1e-10, atol=1e-10)
    params = [x] + list(m.parameters())
    got = torch.autograd.grad(out, params, g)
    ref = torch.autograd.grad(want, params, g)
    names = ['x'] + [n for n, _ in m.named_parameters()]
    for name, a, b in zip(names, got, ref):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10, msg=lambda s: f'{name}: {s}')


@pytest.mark.parametrize('backend', ['torch', 'reference'])
def test_local_mode_backends_agree(backend):
    torch.manual_seed(0)
    m = _randomized(HierarchyAttention(8, 2, 'local', (2, 3), dtype=torch.float64))
    x = torch.randn(1, 54, 8, dtype=torch.float64)
    m2 = HierarchyAttention(8, 2, 'local', (2, 3), backend=backend, dtype=torch.float64)
    m2.load_state_dict(m.state_dict())
    torch.testing.assert_close(m2(x, (6, 9)), m(x, (6, 9)), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize('grid, pool', [((8, 8), 4), ((14, 7), (7, 7)), ((6, 9), (3, 3))])
def test_window_mode_is_pool_mhsa_upsample(grid, pool):
    """One centre per window: out = nearest_upsample(proj(v(centres))), where the centres are the pooled,
    normalized, self-attended grid; q and k take no part (exactly zero gradients)."""
    torch.manual_seed(0)
    H, W = grid
    m = _randomized(HierarchyAttention(8, 2, 'window', pool, dtype=torch.float64))
    Sh, Sw = m.pool_size
    x = torch.randn(2, H * W, 8, dtype=torch.float64)
    out = m(x, (H, W))
    c = naive_centres(m, x, H, W)  # (B, M, C)
    v = (c @ m.kv.weight.T + m.kv.bias)[..., 8:]
    y = (v @ m.proj.weight.T + m.proj.bias).transpose(1, 2).reshape(2, 8, Sh, Sw)
    want = F.interpolate(y, size=(H, W), mode='nearest').flatten(2).transpose(1, 2)
    torch.testing.assert_close(out, want, rtol=1e-10, atol=1e-10)
    out.square().sum().backward()
    assert m.q.weight.grad.abs().max() == 0 and m.q.bias.grad.abs().max() == 0
    assert m.kv.weight.grad[:8].abs().max() == 0 and m.kv.bias.grad[:8].abs().max() == 0  # the keys
    assert m.kv.weight.grad[8:].abs().max() > 0  # the values are used


# ------------------------------------------------------------------------------ the cost model

def _counted_macs(module, x, feat_size):
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), counter:
        module(x, feat_size)
    return counter.get_total_flops() // 2


STAGES = [(56, 56, 32, 1), (28, 28, 64, 2), (14, 14, 160, 5), (7, 7, 256, 8)]  # PVTv2-b0 at 224 px


@pytest.mark.parametrize('mode, h, w, C, heads, pool, windows', [
    *[(mode, h, w, C, heads, 7, None) for mode in ('window', 'local', 'global') for h, w, C, heads in STAGES],
    ('window', 30, 22, 48, 3, (6, 4), 2),    # uneven pixel windows, 6 centres per window
    ('window', 13, 17, 24, 2, 5, None),
    ('global', 13, 17, 24, 2, (3, 4), None),
    ('local', 24, 36, 40, 4, (4, 6), None),
])
def test_cost_model_matches_flop_counter(mode, h, w, C, heads, pool, windows):
    torch.manual_seed(0)
    m = HierarchyAttention(C, heads, mode, pool, windows).eval()
    M = m.pool_size[0] * m.pool_size[1]
    P = None if windows is None else windows
    counted = _counted_macs(m, torch.randn(1, h * w, C), (h, w))
    predicted = hierarchy_attention_macs(mode, h, w, C, M, P=P, heads=heads)
    assert abs(counted - predicted) <= 0.01 * counted, (counted, predicted)


@pytest.mark.parametrize('h, w, C, heads, sr_ratio', [
    (56, 56, 32, 1, 8), (28, 28, 64, 2, 4), (14, 14, 160, 5, 2), (7, 7, 256, 8, 1), (30, 22, 48, 3, 4)])
def test_sra_cost_matches_flop_counter(h, w, C, heads, sr_ratio):
    a = PvtAttention(C, heads, sr_ratio=sr_ratio).eval()
    counted = _counted_macs(a, torch.randn(1, h * w, C), (h, w))
    assert abs(counted - sra_macs(h, w, C, sr_ratio, heads)) <= 0.01 * counted
    if sr_ratio == 1:
        assert counted == vanilla_attention_macs(h, w, C, heads)


@pytest.mark.parametrize('h, w, C, heads', [*[s for s in STAGES], (30, 22, 48, 3), (5, 4, 16, 2)])
def test_linear_sra_cost_matches_flop_counter(h, w, C, heads):
    a = PvtAttention(C, heads, linear_attn=True).eval()
    counted = _counted_macs(a, torch.randn(1, h * w, C), (h, w))
    assert abs(counted - linear_sra_macs(h, w, C, heads=heads)) <= 0.01 * counted


def test_cost_model_closed_forms():
    """The formulas as docs/hierarchy_attention.md states them: the q / k / v-only count plus the output
    projections."""
    h, w, C, M = 56, 56, 32, 49
    N = h * w
    qkv_only = lambda K: 2 * (N * K + M * M) * C + N * C * C + 5 * M * C * C  # noqa: E731
    # + the two output projections (pixels N C^2, centre MHSA M C^2)
    assert hierarchy_attention_macs('window', h, w, C, M) == qkv_only(1) + N * C * C + M * C * C
    assert hierarchy_attention_macs('global', h, w, C, M) == qkv_only(M) + N * C * C + M * C * C
    assert hierarchy_attention_macs('window', h, w, C, 64, P=4) == \
        2 * (N * 4 + 64 * 64) * C + 2 * N * C * C + 6 * 64 * C * C
    assert hierarchy_attention_macs('local', h, w, C, M) == 2 * (9 * N + M * M) * C + 2 * N * C * C + 6 * M * C * C
    assert vanilla_attention_macs(h, w, C) == 2 * N * N * C + 3 * N * C * C + N * C * C  # qkv + proj
    assert linear_sra_macs(h, w, C) == 98 * N * C + (N + 98) * C * C + N * C * C + 49 * C * C  # + proj, 1x1 conv


# ------------------------------------------------------------------------------ the models

def test_models_registered():
    assert sorted(timm.list_models('hierarchy_pvt_v2_b0_*')) == sorted(MODELS)


@pytest.mark.parametrize('model_name', MODELS)
def test_model_forward_backward(model_name):
    """Forward at 224 px; backward in train mode with num_classes=10: every parameter gets a finite
    gradient, the cross-attention q ones exactly zero for 'window' (one key per softmax) and nonzero
    for the other modes (no drop path here: a block dropped for the whole batch has zero gradients);
    grad checkpointing gives the same output."""
    torch.manual_seed(0)
    model = timm.create_model(model_name, num_classes=10).train()
    assert all(type(b.attn).__name__ == 'HierarchyAttention' for s in model.stages for b in s.blocks)
    x = torch.randn(2, 3, 224, 224)
    out = model(x)
    assert out.shape == (2, 10) and torch.isfinite(out).all()
    out.square().mean().backward()
    bad = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not bad, bad
    q_grads = [p.grad.abs().max().item() for n, p in model.named_parameters() if n.endswith('attn.q.weight')]
    if model_name.endswith('window'):
        assert max(q_grads) == 0
    else:
        assert min(q_grads) > 0
    model.eval()
    with torch.no_grad():
        ref = model(x)
        model.set_grad_checkpointing()
        torch.testing.assert_close(model(x), ref, rtol=1e-5, atol=1e-6)


def test_grad_checkpointing_gradients_match():
    torch.manual_seed(0)
    model = timm.create_model('hierarchy_pvt_v2_b0_local', num_classes=10, pool_sizes=2)
    x = torch.randn(2, 3, 64, 64)
    grads = []
    for enable in (False, True):
        model.zero_grad()
        model.set_grad_checkpointing(enable)
        model(x).square().sum().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], rtol=1e-4, atol=1e-6, msg=lambda s: f'{n}: {s}')


@pytest.mark.parametrize('model_name', MODELS)
def test_model_features_only_and_intermediates(model_name):
    """features_only matches forward_intermediates of the full model (channels / strides of
    feature_info), whose final output is forward_features."""
    torch.manual_seed(0)
    full = timm.create_model(model_name).eval()
    feats_model = timm.create_model(model_name, features_only=True, out_indices=(0, 2, 3)).eval()
    # FeatureListNet flattens the stages (stages.0 -> stages_0) and drops the head
    feats_model.load_state_dict({re.sub(r'^stages\.(\d+)', r'stages_\1', k): v
                                 for k, v in full.state_dict().items() if not k.startswith('head')})
    assert feats_model.feature_info.channels() == [32, 160, 256]
    assert feats_model.feature_info.reduction() == [4, 16, 32]
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        final, inter = full.forward_intermediates(x)
        feats = feats_model(x)
        torch.testing.assert_close(final, full.forward_features(x))
        sub = full.forward_intermediates(x, indices=[1], stop_early=True, intermediates_only=True)
    assert [f.shape[1:] for f in inter] == [(32, 56, 56), (64, 28, 28), (160, 14, 14), (256, 7, 7)]
    for got, i in zip(feats, (0, 2, 3)):
        torch.testing.assert_close(got, inter[i])
    torch.testing.assert_close(sub[0], inter[1])


def test_state_dict_round_trip(tmp_path):
    """Saved and loaded into a fresh model (strict), the outputs are identical; a PVTv2-b0 state dict
    does not load silently into a hierarchy model (other attention parameters)."""
    from safetensors.torch import load_file, save_file
    torch.manual_seed(0)
    model = timm.create_model('hierarchy_pvt_v2_b0_global').eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    path = tmp_path / 'model.safetensors'
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    loaded = timm.create_model('hierarchy_pvt_v2_b0_global').eval()
    loaded.load_state_dict(load_file(str(path)))
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    with pytest.raises(RuntimeError, match='centre_qkv'):
        loaded.load_state_dict(timm.create_model('pvt_v2_b0').state_dict())


def test_compiled_local_model_matches_eager():
    """torch.compile(fullgraph=True) traces the whole 'local' model without a graph break (the 3x3 op is
    a custom op with a fake kernel and registered autograd) and matches eager, forward and backward.
    Kept small: 64 px, 2 x 2 centres per stage, the aot_eager backend (dynamo + AOT autograd, no
    Inductor code generation: Inductor takes ~2 min on this model on 2 cores, ~20 s on one mixer)."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = timm.create_model('hierarchy_pvt_v2_b0_local', num_classes=10, pool_sizes=2)
    x = torch.randn(2, 3, 64, 64)
    out = torch.compile(model, fullgraph=True, backend='aot_eager')(x)
    out.square().sum().backward()
    compiled = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    ref = model(x)
    ref.square().sum().backward()
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    for n, p in model.named_parameters():
        torch.testing.assert_close(compiled[n], p.grad, rtol=1e-3, atol=1e-5, msg=lambda s: f'{n}: {s}')


def test_model_kwargs():
    """pool_sizes per stage and windows reach the mixers; other sizes run where the rule allows."""
    model = timm.create_model('hierarchy_pvt_v2_b0_window', pool_sizes=(8, 4, 2, 1), windows=(4, 2, 1, 1))
    attns = [s.blocks[0].attn for s in model.stages]
    assert [a.pool_size for a in attns] == [(8, 8), (4, 4), (2, 2), (1, 1)]
    assert [a.windows for a in attns] == [(4, 4), (2, 2), (1, 1), (1, 1)]
    with torch.no_grad():
        assert model(torch.randn(1, 3, 96, 160)).shape == (1, 1000)  # 'window' / 'global': any grid
    local = timm.create_model('hierarchy_pvt_v2_b0_local')
    with pytest.raises(ValueError, match='pool_size'):
        local(torch.randn(1, 3, 160, 160))  # a 40 x 40 grid over 7 x 7 centres


# ------------------------------------------------------------------------------ bad arguments

@pytest.mark.parametrize('kwargs, match', [
    (dict(mode='windows'), 'mode must be one of'),
    (dict(num_heads=3), 'num_heads=3 must divide dim=8'),
    (dict(num_heads=0), 'num_heads must be a positive int'),
    (dict(pool_size=0), 'pool_size must be a positive int'),
    (dict(pool_size=(3, 3, 3)), 'pool_size must be'),
    (dict(pool_size=2.5), 'pool_size must be'),
    (dict(mode='local', windows=2), "windows is only for mode='window'"),
    (dict(mode='window', pool_size=6, windows=4), 'windows=4 must divide pool_size=6'),
    (dict(mode='window', windows=0), 'windows must be a positive int'),
    (dict(mode='local', attn_drop=0.1), 'attn_drop=0.1'),
    (dict(proj_drop=1.5), 'proj_drop must be a probability'),
    (dict(backend='cuda'), 'backend must be one of'),
])
def test_bad_constructor_args(kwargs, match):
    args = dict(dim=8, num_heads=2, mode='global', pool_size=7)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        HierarchyAttention(**args)


def test_bad_forward_args():
    m = HierarchyAttention(8, 2, 'local', pool_size=3)
    with pytest.raises(ValueError, match=r'pool_size=\(3, 3\)'):
        m(torch.randn(1, 64, 8), (8, 8))   # 8 is not a multiple of 3
    with pytest.raises(ValueError, match=r'pool_size=\(3, 3\)'):
        m(torch.randn(1, 54, 8), (6, 9))   # cells 2 x 3 are not square
    with pytest.raises(ValueError, match='feat_size'):
        m(torch.randn(1, 36, 8), (6, 5))


@pytest.mark.parametrize('call, match', [
    (lambda: hierarchy_attention_macs('glob', 7, 7, 32, 49), 'mode must be one of'),
    (lambda: hierarchy_attention_macs('window', 7, 7, 32, 49, P=2), 'P=2'),
    (lambda: hierarchy_attention_macs('global', 7, 7, 32, 49, P=7), 'P=7'),
    (lambda: hierarchy_attention_macs('local', 7, 7, 32, 49, P=1), 'P=1'),
    (lambda: hierarchy_attention_macs('local', 7, 0, 32, 49), 'w must be a positive int'),
    (lambda: hierarchy_attention_macs('local', 7, 7, 32, 49, heads=3), 'heads=3 must divide C=32'),
    (lambda: sra_macs(7, 7, 32, 0), 'sr_ratio must be a positive int'),
    (lambda: sra_macs(7, 7, 32, 8), 'sr_ratio=8'),
    (lambda: linear_sra_macs(7, 7, 32, pool=0), 'pool must be a positive int'),
    (lambda: vanilla_attention_macs(7, 7, 32.0), 'C must be a positive int'),
])
def test_bad_cost_model_args(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_bad_model_args():
    from spformer.models.hierarchy_pvt import HierarchyPyramidVisionTransformerV2
    with pytest.raises(ValueError, match='hierarchy_mode must be one of'):
        HierarchyPyramidVisionTransformerV2(hierarchy_mode='loc', depths=(1,), embed_dims=(8,), num_heads=(1,))
    with pytest.raises(ValueError, match='pool_sizes must be'):
        timm.create_model('hierarchy_pvt_v2_b0_local', pool_sizes=(7, 7, 7))
