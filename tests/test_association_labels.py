"""Hard superpixel maps at input resolution: association logits upsampled in superpixel perspective.

The oracle is written from the definition, independently of ``spformer.kernels.upsample_association``:
for every superpixel, a dense logit map over the whole pixel grid (its logit where it is a candidate,
i.e. inside its 3x3-cell window; elsewhere the value of the nearest window pixel, coordinates clamped),
resized with ``F.interpolate(mode='bilinear', align_corners=False)``; then every output pixel takes the
9 superpixels around its own cell at output resolution.
"""
import itertools

import pytest
import torch
import torch.nn.functional as F

from spformer.kernels import (
    OWN_CELL_MARGIN, cells_to_image, superpixel_association, superpixel_labels, upsample_association)


def _dense_upsampled(logits: torch.Tensor, cell: int, scale: int) -> torch.Tensor:
    """(B, H, W, 9) logits -> (B, h*w, H*scale, W*scale): each superpixel's logit map, window-clamped and
    resized by F.interpolate (the oracle)."""
    B, H, W, _ = logits.shape
    h, w = H // cell, W // cell
    out = torch.empty(B, h * w, H * scale, W * scale, dtype=logits.dtype)
    for i, j in itertools.product(range(h), range(w)):
        y_lo, y_hi = max(0, (i - 1) * cell), min(H, (i + 2) * cell) - 1
        x_lo, x_hi = max(0, (j - 1) * cell), min(W, (j + 2) * cell) - 1
        ys = torch.arange(H).clamp(y_lo, y_hi)
        xs = torch.arange(W).clamp(x_lo, x_hi)
        # channel of superpixel (i, j) as seen from pixel (y, x): offset (i - y // cell, j - x // cell)
        k = (i - ys // cell + 1)[:, None] * 3 + (j - xs // cell + 1)[None, :]
        dense = logits[:, ys[:, None], xs[None, :], k]  # (B, H, W)
        out[:, i * w + j] = F.interpolate(dense[:, None], size=(H * scale, W * scale), mode='bilinear',
                                          align_corners=False)[:, 0]
    return out


def _oracle(logits: torch.Tensor, cell: int, scale: int) -> torch.Tensor:
    B, H, W, _ = logits.shape
    h, w = H // cell, W // cell
    dense = _dense_upsampled(logits, cell, scale)
    Ho, Wo = H * scale, W * scale
    out = torch.full((B, Ho, Wo, 9), float('-inf'), dtype=logits.dtype)
    for y, x in itertools.product(range(Ho), range(Wo)):
        cy, cx = y // (cell * scale), x // (cell * scale)
        for k in range(9):
            i, j = cy + k // 3 - 1, cx + k % 3 - 1
            if 0 <= i < h and 0 <= j < w:
                out[:, y, x, k] = dense[:, i * w + j, y, x]
    return out


def _logits(B, h, w, cell, d=5, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, 1, h * cell, w * cell, d, generator=g, dtype=dtype)
    k = torch.randn(B, 1, h, w, d, generator=g, dtype=dtype)
    bias = torch.randn(B, 1, h, w, generator=g, dtype=dtype)
    return superpixel_association(q, k, cell, scale=1.0, bias=bias, backend='reference', logits=True)[:, 0]


@pytest.mark.parametrize('h,w,cell,scale', [(3, 4, 2, 4), (2, 2, 3, 2), (4, 3, 1, 3), (1, 2, 2, 4)])
def test_upsampled_logits_equal_per_superpixel_interpolation(h, w, cell, scale):
    logits = _logits(2, h, w, cell)
    got = upsample_association(logits, cell, scale)
    want = _oracle(logits, cell, scale)
    assert got.shape == want.shape == (2, h * cell * scale, w * cell * scale, 9)
    assert torch.equal(torch.isinf(got), torch.isinf(want))
    finite = torch.isfinite(want)
    torch.testing.assert_close(got[finite], want[finite], rtol=0, atol=1e-12)


def test_logits_match_probabilities():
    # superpixel_association(logits=True) is the softmax's input: every backend, -inf where probability is 0.
    g = torch.Generator().manual_seed(3)
    q = torch.randn(2, 2, 12, 8, 4, generator=g, dtype=torch.float64)
    k = torch.randn(2, 2, 3, 2, 4, generator=g, dtype=torch.float64)
    probs = superpixel_association(q, k, 4, backend='reference')
    for backend in ('reference', 'torch'):
        logits = superpixel_association(q, k, 4, backend=backend, logits=True)
        torch.testing.assert_close(logits.softmax(-1), probs, rtol=0, atol=1e-12)
        assert torch.equal(torch.isinf(logits), probs == 0)


def test_scale_one_and_uniform_logits_keep_the_regular_grid():
    logits = _logits(1, 3, 3, 2)
    assert upsample_association(logits, 2, 1) is logits
    # Equal logits everywhere: every output pixel stays in its own cell (the margin breaks the tie).
    flat = torch.zeros(1, 6, 6, 9, dtype=torch.float64).masked_fill(torch.isinf(logits), float('-inf'))
    labels = superpixel_labels(upsample_association(flat, 2, 4), 8, OWN_CELL_MARGIN)
    grid = (torch.arange(24)[:, None] // 8) * 3 + torch.arange(24)[None, :] // 8
    assert torch.equal(labels[0], grid)


def test_own_cell_margin_decides_near_ties_only():
    # Neighbour 5 leads the own cell by less than the margin at one pixel, by more at another.
    logits = torch.zeros(1, 2, 2, 9, dtype=torch.float64)
    logits[..., :] = -1.0
    logits[..., 4] = 0.0
    logits[0, 0, 0, 5] = 0.5 * OWN_CELL_MARGIN
    logits[0, 1, 0, 5] = 2.0 * OWN_CELL_MARGIN
    labels = superpixel_labels(logits, 1, OWN_CELL_MARGIN)
    assert labels[0, 0, 0] == 0 and labels[0, 1, 0] == 3  # own cell (0, 0) / the right neighbour (1, 1)
    assert superpixel_labels(logits, 1)[0, 0, 0] == 1  # without the margin the larger logit wins


def test_bad_arguments_are_named():
    logits = _logits(1, 2, 2, 2)
    with pytest.raises(ValueError, match=r'upsample_association: logits must be a \(\.\.\., H, W, 9\) tensor'):
        upsample_association(logits[..., :8], 2, 2)
    with pytest.raises(ValueError, match='scale must be an int >= 1, got 0'):
        upsample_association(logits, 2, 0)
    with pytest.raises(ValueError, match='whole number of 3x3 cells'):
        upsample_association(logits, 3, 2)


def _oracle_labels(logits: torch.Tensor, cell: int, scale: int) -> torch.Tensor:
    """Hard ids from the oracle's upsampled logits: the own cell raised by the margin, then the argmax, ties to
    the own cell, written out per pixel."""
    up = _oracle(logits, cell, scale)
    B, Ho, Wo, _ = up.shape
    C = cell * scale
    w = Wo // C
    labels = torch.empty(B, Ho, Wo, dtype=torch.long)
    for b, y, x in itertools.product(range(B), range(Ho), range(Wo)):
        scores = up[b, y, x].clone()
        scores[4] += OWN_CELL_MARGIN
        best = 4 if scores[4] >= scores.max() else int(scores.argmax())
        labels[b, y, x] = (y // C + best // 3 - 1) * w + (x // C + best % 3 - 1)
    return labels


@pytest.mark.parametrize('model_name', ['spformer_tiny_sp16_224', 'spformer_small_sp32_224'])
def test_model_labels_are_the_argmax_of_the_upsampled_logits(model_name):
    import timm
    import spformer  # noqa: F401  (registers the models)
    torch.manual_seed(0)
    model = timm.create_model(model_name, img_size=64, pixel_dim=16, embed_dim=32, num_heads=2, sca_heads=2,
                              num_classes=0).eval().double()
    with torch.no_grad():  # LayerScales away from their 1e-5 init, so that the stages differ
        for name, p in model.named_parameters():
            if name.endswith('.gamma'):
                p.fill_(0.5)
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        stages = model.forward_superpixels(x)
        repeated = model.forward_superpixels(x, label_upsampling='repeat')
        associations = model._forward_stages(x).associations
    s, cell = model.stem_stride, model.cell_size
    for stage, stage_repeated, assoc in zip(stages, repeated, associations):
        pixels = cells_to_image(assoc.pixels, cell) if assoc.pixel_layout == 'cells' else assoc.pixels
        M = assoc.queries.shape[1]
        merged_q = assoc.queries.sum(1, keepdim=True) * M ** -0.5
        merged_b = assoc.bias.sum(1, keepdim=True) * M ** -0.5
        logits = superpixel_association(pixels, merged_q, cell, scale=1.0, bias=merged_b, backend='reference',
                                        logits=True)[:, 0]
        assert torch.equal(stage['labels'], _oracle_labels(logits, cell, s))
        head0 = superpixel_association(pixels, assoc.queries[:, :1], cell, scale=1.0, bias=assoc.bias[:, :1],
                                       backend='reference', logits=True)[:, 0]
        assert torch.equal(stage['head_labels'][:, 0], _oracle_labels(head0, cell, s))
        # 'repeat': the argmax on the pixel stream, each label over its s x s input pixels.
        coarse = _oracle_labels(logits, cell, 1)
        assert torch.equal(stage_repeated['labels'], coarse.repeat_interleave(s, 1).repeat_interleave(s, 2))
        # Same superpixels, finer boundaries: most pixels agree, some (near boundaries) move.
        agree = (stage['labels'] == stage_repeated['labels']).double().mean()
        assert 0.6 < agree < 1.0, agree
    with pytest.raises(ValueError, match="label_upsampling must be one of .*'bilinear'.*got 'nearest'"):
        model.forward_superpixels(x, label_upsampling='nearest')
