"""Modules of spformer/sna.py: the SNA attention layer, the superpixel probability models (differentiable
SLIC, a small deep one) and the denoiser of the benchmark."""
import math

import pytest
import torch
from torch import nn

from spformer.kernels import hard_superpixel_attention, neighborhood_attention, superpixel_labels
from spformer.sna import (
    DeepSuperpixelProbs,
    SimpleDenoiser,
    SlicSuperpixelProbs,
    SoftSuperpixelNeighborhoodAttention2d,
)


def _valid(H, W, cell):
    """(H, W, 9) neighbour n of the pixel's cell inside the ceil(H / cell) x ceil(W / cell) grid (by hand)."""
    h, w = math.ceil(H / cell), math.ceil(W / cell)
    out = torch.zeros(H, W, 9, dtype=torch.bool)
    for y in range(H):
        for x in range(W):
            for n in range(9):
                sy, sx = y // cell + n // 3 - 1, x // cell + n % 3 - 1
                out[y, x, n] = 0 <= sy < h and 0 <= sx < w
    return out


# --- the attention layer -------------------------------------------------------------------------

@pytest.mark.parametrize('mode', ['sna', 'hsna', 'na'])
@pytest.mark.parametrize('scale', ['fixed', 'learned', 'map'])
def test_attention_layer_shapes_and_grads(mode, scale):
    torch.manual_seed(0)
    layer = SoftSuperpixelNeighborhoodAttention2d(8, num_heads=2, kernel_size=5, cell=4, mode=mode, scale=scale)
    x = torch.randn(2, 9, 11, 8, requires_grad=True)
    probs = torch.randn(2, 9, 11, 9).softmax(-1).requires_grad_()
    out = layer(x, probs=None if mode == 'na' else probs)
    assert out.shape == x.shape
    out.square().sum().backward()
    assert all(p.grad is not None for p in layer.parameters())
    assert (probs.grad is not None) == (mode == 'sna')


def test_scale_modes_start_equal():
    """'learned' and 'map' start at head_dim**-0.5, so all three scale modes agree at init."""
    torch.manual_seed(1)
    x = torch.randn(1, 8, 8, 12)
    probs = torch.randn(1, 8, 8, 9).softmax(-1)
    layers = [SoftSuperpixelNeighborhoodAttention2d(12, 3, 3, 4, scale=s) for s in ('fixed', 'learned', 'map')]
    for layer in layers[1:]:
        layer.load_state_dict(layers[0].state_dict(), strict=False)
    outs = [layer(x, probs) for layer in layers]
    torch.testing.assert_close(outs[1], outs[0])
    torch.testing.assert_close(outs[2], outs[0])


def test_l2_distance_is_negative_squared_distance():
    """dist='l2' weights keys by exp(-lambda ||q - k||^2) over the window (checked against the op on
    explicit logits: NA with q' = [q, 0], and the -||q-k||^2 computed directly on a 1-window image)."""
    torch.manual_seed(2)
    layer = SoftSuperpixelNeighborhoodAttention2d(4, 1, 5, mode='na', dist='l2', qkv_bias=False, proj_bias=False)
    x = torch.randn(1, 5, 5, 4, dtype=torch.float64)
    layer = layer.double()
    got = layer(x)
    q, k, v = layer.qkv(x).view(1, 5, 5, 3, 1, 4).permute(3, 0, 4, 1, 2, 5).unbind(0)
    qf, kf, vf = q.reshape(25, 4), k.reshape(25, 4), v.reshape(25, 4)
    logits = -0.5 * torch.cdist(qf, kf).square()  # k = 5 = image: every window is the whole image
    want = layer.proj((logits.softmax(-1) @ vf).view(1, 5, 5, 4))
    torch.testing.assert_close(got, want)


def test_hsna_from_probs_uses_their_labels():
    torch.manual_seed(3)
    layer = SoftSuperpixelNeighborhoodAttention2d(6, 2, 3, cell=3, mode='hsna')
    x = torch.randn(1, 7, 9, 6)
    probs = torch.randn(1, 7, 9, 9).softmax(-1)
    torch.testing.assert_close(layer(x, probs=probs), layer(x, labels=superpixel_labels(probs, 3)))


def test_layer_in_a_timm_style_block_compiles():
    """A pre-norm residual block around the layer compiles with fullgraph=True and matches eager."""
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm = nn.LayerNorm(8)
            self.attn = SoftSuperpixelNeighborhoodAttention2d(8, 2, 3, 4, scale='learned')

        def forward(self, x, probs):
            return x + self.attn(self.norm(x), probs)

    torch._dynamo.reset()
    torch.manual_seed(4)
    block = Block().double()
    x = torch.randn(1, 8, 8, 8, dtype=torch.float64)
    probs = torch.randn(1, 8, 8, 9, dtype=torch.float64).softmax(-1)
    got = torch.compile(block, fullgraph=True)(x, probs)
    got.square().sum().backward()
    grads = {n: p.grad.clone() for n, p in block.named_parameters()}
    block.zero_grad()
    want = block(x, probs)
    want.square().sum().backward()
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    for n, p in block.named_parameters():
        torch.testing.assert_close(grads[n], p.grad, rtol=1e-9, atol=1e-10, msg=n)


@pytest.mark.parametrize('kwargs, match', [
    (dict(dim=6, num_heads=4), 'divisible'), (dict(dim=4, mode='soft'), 'mode'),
    (dict(dim=4, scale='auto'), 'scale'), (dict(dim=4, dist='cos'), 'dist'),
    (dict(dim=0), r'dim must be an int >= 1, got 0'),
    (dict(dim=4, num_heads=0), r'num_heads must be an int >= 1, got 0'),
    # at construction, with the neighbourhood ops' own list (no 'cpu' backend there)
    (dict(dim=4, attn_backend='bogus'), r"attn_backend must be one of \('auto', 'torch', 'triton', 'reference'\), "
                                        r"got 'bogus'"),
    (dict(dim=4, attn_backend='cpu'), r"attn_backend must be one of .*got 'cpu'")])
def test_attention_layer_bad_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SoftSuperpixelNeighborhoodAttention2d(**kwargs)


def test_denoiser_bad_attn_backend_fails_at_construction():
    with pytest.raises(ValueError, match=r"attn_backend must be one of .*got 'bogus'"):
        SimpleDenoiser('sna-deep', attn_backend='bogus')


def test_attention_layer_missing_superpixels():
    with pytest.raises(ValueError, match='needs probs'):
        SoftSuperpixelNeighborhoodAttention2d(4, mode='sna', kernel_size=3)(torch.zeros(1, 4, 4, 4))
    with pytest.raises(ValueError, match='needs labels'):
        SoftSuperpixelNeighborhoodAttention2d(4, mode='hsna', kernel_size=3)(torch.zeros(1, 4, 4, 4))


# --- superpixel probability models ---------------------------------------------------------------

def naive_slic(x, cell, iters, compactness, temperature):
    """Dense soft SLIC from the definition: features [x, m * (y, x) / cell], centroids = cell means,
    assignments softmax over the in-grid 3x3 neighbour superpixels of -T ||f - c||^2, centroid =
    assignment-weighted mean. Loops over pixels; float64."""
    B, C, H, W = x.shape
    h, w = math.ceil(H / cell), math.ceil(W / cell)
    Hp, Wp = h * cell, w * cell
    xp = torch.nn.functional.pad(x, (0, Wp - W, 0, Hp - H), mode='replicate')
    yy, xx = torch.meshgrid(torch.arange(Hp, dtype=x.dtype) / cell, torch.arange(Wp, dtype=x.dtype) / cell, indexing='ij')
    f = torch.cat([xp, compactness * torch.stack([yy, xx])[None].expand(B, 2, Hp, Wp)], 1)  # (B, c, Hp, Wp)
    f = f.permute(0, 2, 3, 1).reshape(B, Hp * Wp, -1)
    cell_of = [(y // cell) * w + (xq // cell) for y in range(Hp) for xq in range(Wp)]
    cents = torch.stack([f[:, [p for p, s in enumerate(cell_of) if s == j]].mean(1) for j in range(h * w)], 1)
    nbrs = []
    for y in range(Hp):
        for xq in range(Wp):
            nbrs.append([(n, (y // cell + n // 3 - 1) * w + xq // cell + n % 3 - 1) for n in range(9)
                         if 0 <= y // cell + n // 3 - 1 < h and 0 <= xq // cell + n % 3 - 1 < w])
    for it in range(iters):
        probs = torch.zeros(B, Hp * Wp, 9, dtype=x.dtype)
        dense = torch.zeros(B, Hp * Wp, h * w, dtype=x.dtype)
        for p, nb in enumerate(nbrs):
            logits = torch.stack([-temperature * (f[:, p] - cents[:, s]).square().sum(-1) for _, s in nb], -1)
            a = logits.softmax(-1)
            for i, (n, s) in enumerate(nb):
                probs[:, p, n] = a[:, i]
                dense[:, p, s] = a[:, i]
        if it < iters - 1:
            cents = (dense.transpose(1, 2) @ f) / dense.sum(1)[..., None]
    return probs.view(B, Hp, Wp, 9)[:, :H, :W]


@pytest.mark.parametrize('size, cell, m', [((8, 12), 4, 0.5), ((7, 10), 3, 0.0), ((9, 9), 4, 2.0)])
def test_slic_matches_naive(size, cell, m):
    torch.manual_seed(5)
    x = torch.rand(2, 3, *size, dtype=torch.float64)
    slic = SlicSuperpixelProbs(cell, iters=3, compactness=m, temperature=4.0).double()
    got = slic(x)
    torch.testing.assert_close(got, naive_slic(x, cell, 3, m, 4.0), rtol=1e-9, atol=1e-12)
    assert (got[..., ~_valid(*size, cell)] == 0).all()


def test_slic_learns_its_parameters_and_follows_regions():
    """learn=True: compactness and temperature get gradients; colour-only SLIC on two flat regions gives
    each region its own superpixels (hard labels never straddle the boundary)."""
    slic = SlicSuperpixelProbs(4, iters=5, compactness=0.1, temperature=50.0, learn=True)
    x = torch.zeros(1, 3, 16, 16)
    x[:, :, :, 6:] = 1.0  # boundary at column 6, inside the second cell column
    x = x + 0.01 * torch.randn(x.shape, generator=torch.Generator().manual_seed(6))
    probs = slic(x)
    probs[..., 4].sum().backward()
    params = dict(slic.named_parameters())
    assert set(params) == {'log_compactness', 'log_temperature'}
    assert all(p.grad is not None and p.grad != 0 for p in params.values())
    labels = superpixel_labels(probs.detach(), 4)
    left, right = set(labels[0, :, :6].flatten().tolist()), set(labels[0, :, 6:].flatten().tolist())
    assert not left & right


def test_deep_probs_valid_and_uniform_at_init():
    torch.manual_seed(7)
    model = DeepSuperpixelProbs(3, cell=4, hidden=8)
    x = torch.randn(2, 3, 10, 13)
    probs = model(x)
    valid = _valid(10, 13, 4)
    assert probs.shape == (2, 10, 13, 9)
    assert (probs[..., ~valid] == 0).all()
    torch.testing.assert_close(probs.sum(-1), torch.ones(2, 10, 13))
    torch.testing.assert_close(probs, (valid / valid.sum(-1, keepdim=True)).float().expand_as(probs))


# --- the denoiser -------------------------------------------------------------------------------

@pytest.mark.parametrize('kind', SimpleDenoiser.KINDS)
def test_denoiser_trains(kind):
    """Every variant runs forward and backward, every parameter gets a gradient, and a few Adam
    steps on one noisy image lower its loss."""
    torch.manual_seed(8)
    model = SimpleDenoiser(kind, dim=6, kernel_size=5, cell=4, slic_iters=2)
    clean = torch.rand(2, 3, 12, 12)
    noisy = clean + 0.1 * torch.randn(clean.shape)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(6):
        loss = (model(noisy) - clean).square().mean()
        opt.zero_grad()
        loss.backward()
        if not losses:
            missing = [n for n, p in model.named_parameters() if p.grad is None]
            # H-SNA's SLIC is only used through its argmax: no gradient reaches it (it has no parameters)
            assert not missing, missing
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


def test_denoiser_kinds_share_the_attention_path():
    """NA and H-SNA with a single superpixel (cell >= image) compute the same function."""
    torch.manual_seed(9)
    na = SimpleDenoiser('na', dim=4, kernel_size=3, cell=16)
    hsna = SimpleDenoiser('hsna', dim=4, kernel_size=3, cell=16, slic_iters=1)
    hsna.load_state_dict(na.state_dict(), strict=False)
    x = torch.rand(1, 3, 10, 10)
    torch.testing.assert_close(hsna(x), na(x))
    # the default is y = f_attn(x W0, g) W1 + x W0 W1 exactly; input_skip=True adds x (the authors' code)
    skip = SimpleDenoiser('na', dim=4, kernel_size=3, cell=16, input_skip=True)
    skip.load_state_dict(na.state_dict())
    torch.testing.assert_close(skip(x), na(x) + x)
    with pytest.raises(ValueError, match='kind'):
        SimpleDenoiser('ssn')
