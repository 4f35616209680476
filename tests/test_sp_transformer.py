"""SP-Transformer (spformer/models/sp_transformer.py), its loss and the segmentation metrics.

Oracles, each written from the definition and independently of the code under test:

- the association: a distribution over the in-image neighbours of each pixel's cell (neighbour ids computed
  here from the grid);
- the upsampling to input resolution: for every superpixel a dense logit map over the pixel-feature grid
  (its logit inside its 3x3-cell window, the nearest window pixel's elsewhere), resized on its own by
  ``F.interpolate(mode='bilinear', align_corners=False)``; each input pixel takes its cell's 9 candidates;
- the unfolding Y_p = sum_i Q_pi C_i: a dense (B, H, W, h*w) association matrix times the class logits;
- top-k cross-entropy: per image, the valid pixels' losses sorted, the mean of the first k;
- mIoU and pixel accuracy: confusion matrices worked out by hand in the comments.

Small backbones (resnet18) at 64x128 with small decoders keep every model test to seconds on two cores.
"""
import itertools
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import timm

from spformer.eval.segmentation_metrics import (
    ConfusionMatrix, confusion_matrix, iou_per_class, mean_iou, pixel_accuracy)
from spformer.kernels import NEIGHBOR_OFFSETS, OWN_CELL_MARGIN, upsample_association
from spformer.models.pretrained import PretrainedWeightsUnavailable
from spformer.models.sp_transformer import (
    SEGMENTATION_CONFIGS, SPTransformer, backbone_levels, create_segmentation_model, list_segmentation_models,
    topk_cross_entropy, unfold_superpixel_logits)


def _tiny(seed=0, **kwargs) -> SPTransformer:
    """resnet18, pixel stride 8, cells of 2: token stride 16 (a 4x8 grid at 64x128)."""
    args = dict(backbone='resnet18', num_classes=5, img_size=(64, 128), pixel_stride=8, neck_dim=32, cell_size=2,
                tokenizer_layers=2, tokenizer_heads=2, num_blocks=1, block_heads=2, mlp_ratio=2.)
    args.update(kwargs)
    torch.manual_seed(seed)
    return SPTransformer(**args)


def _neighbour_ids(H: int, W: int, T: int, grid):
    """(9, H, W) raster id of neighbour k of every pixel's T x T cell on the grid, and whether it is in the grid."""
    h, w = grid
    cy = torch.arange(H)[:, None] // T
    cx = torch.arange(W)[None, :] // T
    ids, valid = [], []
    for dy, dx in NEIGHBOR_OFFSETS:
        y, x = cy + dy, cx + dx
        valid.append((y >= 0) & (y < h) & (x >= 0) & (x < w))
        ids.append(y.clamp(0, h - 1) * w + x.clamp(0, w - 1))
    return torch.stack(ids), torch.stack(valid)


def _dense_upsampled(logits: torch.Tensor, cell: int, scale: int) -> torch.Tensor:
    """(B, Hs, Ws, 9) coarse logits -> (B, h*w, Hs*scale, Ws*scale): each superpixel's own logit map (inside its
    3x3-cell window; outside it, the nearest window pixel's), resized by F.interpolate."""
    B, Hs, Ws, _ = logits.shape
    h, w = Hs // cell, Ws // cell
    out = torch.empty(B, h * w, Hs * scale, Ws * scale, dtype=logits.dtype)
    for i, j in itertools.product(range(h), range(w)):
        ys = torch.arange(Hs).clamp(max(0, (i - 1) * cell), min(Hs, (i + 2) * cell) - 1)
        xs = torch.arange(Ws).clamp(max(0, (j - 1) * cell), min(Ws, (j + 2) * cell) - 1)
        k = (i - ys // cell + 1)[:, None] * 3 + (j - xs // cell + 1)[None, :]  # superpixel (i, j) seen from (y, x)
        dense = logits[:, ys[:, None], xs[None, :], k]
        out[:, i * w + j] = F.interpolate(dense[:, None], scale_factor=scale, mode='bilinear', align_corners=False)[:, 0]
    return out


def _oracle_association(coarse: torch.Tensor, cell: int, scale: int, grid):
    """Upsampled logits (-inf outside the image) and their softmax over the 9 candidates, (B, H, W, 9) each."""
    dense = _dense_upsampled(coarse, cell, scale)
    B, _, H, W = dense.shape
    ids, valid = _neighbour_ids(H, W, cell * scale, grid)
    logits = torch.stack([dense.gather(1, ids[k].expand(B, 1, H, W))[:, 0] for k in range(9)], dim=-1)
    logits = logits.masked_fill(~valid.permute(1, 2, 0), float('-inf'))
    return logits, logits.softmax(-1)


@pytest.fixture(scope='module')
def f64_run():
    """A float64 model in eval mode on a 64x96 input (a 4x6 grid: the reference 4x8 queries resized), its
    association projections scaled up so that the association is far from uniform."""
    model = _tiny().double().eval()
    with torch.no_grad():
        model.assoc_px_proj.weight.mul_(15.0)
        model.assoc_sp_proj.weight.mul_(15.0)
        model.head.weight.mul_(50.0)
    x = torch.randn(2, 3, 64, 96, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        parts = model.forward_parts(x)
        out = model.forward_superpixels(x)
    return model, x, parts, out


# --- association, upsampling, unfolding ------------------------------------------------------------

def test_association_is_a_distribution_over_in_image_neighbours(f64_run):
    model, x, parts, out = f64_run
    assoc = out['association']
    assert out['grid'] == parts.grid == (4, 6)
    assert assoc.shape == (2, 64, 96, 9) and assoc.dtype == torch.float64
    _, valid = _neighbour_ids(64, 96, model.token_stride, out['grid'])
    valid = valid.permute(1, 2, 0).expand_as(assoc)
    torch.testing.assert_close(assoc.sum(-1), torch.ones(2, 64, 96, dtype=torch.float64), rtol=0, atol=1e-12)
    assert torch.all(assoc[~valid] == 0)  # exactly 0 outside the image
    assert torch.all(assoc[valid] > 0)
    assert not valid.all()  # the border pixels have out-of-image neighbours
    # far from uniform: the test below would otherwise compare near-constants
    assert assoc.amax(-1).mean() > 0.5


def test_upsampled_association_equals_per_superpixel_interpolation(f64_run):
    model, x, parts, out = f64_run
    coarse = parts.association_logits
    assert coarse.shape == (2, 64 // 8, 96 // 8, 9)
    logits, probs = _oracle_association(coarse, model.cell_size, model.pixel_stride, parts.grid)
    torch.testing.assert_close(out['association'], probs, rtol=0, atol=1e-12)
    # hard superpixels: argmax of the upsampled logits, the own cell's raised by the margin (ties to it)
    scores = logits.clone()
    scores[..., 4] += OWN_CELL_MARGIN
    best = torch.where(scores[..., 4] >= scores.amax(-1), torch.full_like(scores[..., 4], 4, dtype=torch.long),
                       scores.argmax(-1))
    ids, _ = _neighbour_ids(64, 96, model.token_stride, parts.grid)
    want = ids.permute(1, 2, 0).expand(2, 64, 96, 9).gather(-1, best[..., None])[..., 0]
    assert out['labels'].dtype == torch.int64 and torch.equal(out['labels'], want)
    assert (out['labels'] != ids[4]).any() and len(out['labels'].unique()) > 6  # neither the regular grid nor a few


def test_upsampling_never_mixes_superpixels(f64_run):
    # Shift every coarse logit of one superpixel by delta: after upsampling, exactly the entries naming that
    # superpixel move, each by exactly delta (bilinear weights sum to 1); no other entry moves.
    model, x, parts, out = f64_run
    cell, s, (h, w) = model.cell_size, model.pixel_stride, parts.grid
    coarse = parts.association_logits
    Hs, Ws = coarse.shape[1:3]
    coarse_ids, _ = _neighbour_ids(Hs, Ws, cell, (h, w))
    fine_ids, fine_valid = _neighbour_ids(Hs * s, Ws * s, cell * s, (h, w))
    base = upsample_association(coarse, cell, s)
    for target in (1 * w + 2, 0, h * w - 1):  # an interior superpixel and two corners
        mask = (coarse_ids == target).permute(1, 2, 0) & torch.isfinite(coarse[0])
        moved = upsample_association(coarse + 0.75 * mask, cell, s)
        names = ((fine_ids == target) & fine_valid).permute(1, 2, 0).expand_as(base)
        torch.testing.assert_close((moved - base)[names], torch.full_like(moved[names], 0.75), rtol=0, atol=1e-12)
        same = ~names & torch.isfinite(base)
        assert torch.equal(moved[same], base[same])


def test_unfolding_equals_dense_association_matrix(f64_run):
    model, x, parts, out = f64_run
    (h, w), B, H, W = parts.grid, 2, 64, 96
    ids, valid = _neighbour_ids(H, W, model.token_stride, (h, w))
    dense = torch.zeros(B, H, W, h * w, dtype=torch.float64)
    for k in range(9):
        dense.scatter_add_(-1, ids[k].expand(B, H, W)[..., None], (out['association'][..., k] * valid[k])[..., None])
    torch.testing.assert_close(dense.sum(-1), torch.ones(B, H, W, dtype=torch.float64), rtol=0, atol=1e-12)
    want = torch.einsum('bhwn,bnk->bkhw', dense, parts.superpixel_logits)
    assert out['logits'].shape == (B, 5, H, W)
    torch.testing.assert_close(out['logits'], want, rtol=0, atol=1e-10)
    with torch.no_grad():
        torch.testing.assert_close(model(x), want, rtol=0, atol=1e-10)
    assert torch.equal(out['superpixel_logits'], parts.superpixel_logits)


def test_one_hot_association_gives_each_pixel_its_superpixels_class():
    g = torch.Generator().manual_seed(2)
    B, h, w, T, K = 2, 3, 5, 4, 7
    H, W = h * T, w * T
    ids, valid = _neighbour_ids(H, W, T, (h, w))
    # every pixel picks a random in-image neighbour
    scores = torch.rand(B, H, W, 9, generator=g).masked_fill(~valid.permute(1, 2, 0), -1)
    pick = scores.argmax(-1)
    q = F.one_hot(pick, 9).double()
    classes = torch.randn(B, h * w, K, dtype=torch.float64, generator=g)
    got = unfold_superpixel_logits(q, classes, (h, w))
    chosen = ids.permute(1, 2, 0).expand(B, H, W, 9).gather(-1, pick[..., None])[..., 0]  # (B, H, W)
    want = classes.gather(1, chosen.reshape(B, H * W, 1).expand(B, H * W, K)).reshape(B, H, W, K).permute(0, 3, 1, 2)
    assert torch.equal(got, want)
    with pytest.raises(ValueError, match='do not fit a 3x4 grid'):
        unfold_superpixel_logits(q, classes, (3, 4))


# --- loss ----------------------------------------------------------------------------------------

def _topk_reference(logits, target, p, ignore_index):
    """Per image: the valid pixels' losses, sorted, the mean of the first k = min(round(p * H * W), valid)."""
    B, K, H, W = logits.shape
    per_image = []
    for b in range(B):
        logp = logits[b].log_softmax(0)
        losses = [-logp[int(target[b, y, x]), y, x] for y in range(H) for x in range(W)
                  if int(target[b, y, x]) != ignore_index]
        losses.sort(key=lambda v: -v.detach().item())
        k = min(len(losses), max(1, round(p * H * W)))
        per_image.append(sum(losses[:k]) / k if losses else logits.new_zeros(()))
    return sum(per_image) / B


@pytest.mark.parametrize('p', [0.2, 0.05, 1.0])
def test_topk_cross_entropy_matches_sorted_reference(p):
    g = torch.Generator().manual_seed(3)
    B, K, H, W = 4, 5, 6, 7
    logits = torch.randn(B, K, H, W, dtype=torch.float64, generator=g, requires_grad=True)
    target = torch.randint(0, K, (B, H, W), generator=g)
    target[0, :2] = 255  # some ignored
    target[1] = 255  # all ignored: contributes 0
    target[2, :5] = 255  # 7 valid pixels of 42: fewer than k = round(0.2 * 42) = 8
    got = topk_cross_entropy(logits, target, p)
    want = _topk_reference(logits, target, p, 255)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    g_got, = torch.autograd.grad(got, logits)
    g_want, = torch.autograd.grad(want, logits)
    torch.testing.assert_close(g_got, g_want, rtol=0, atol=1e-12)
    assert torch.all(g_got[1] == 0) and torch.all(g_got[0, :, :2] == 0)  # ignored pixels get no gradient


def test_topk_counts_all_pixels_for_k():
    # deeplab2's rule: k from all H*W pixels (ignored included). 2x5 image, p = 0.2: k = 2 of the 4 valid pixels.
    logits = torch.zeros(1, 2, 2, 5, dtype=torch.float64)
    logits[0, 1] = torch.tensor([[0., 1., 2., 3., 4.], [0., 0., 0., 0., 0.]])
    target = torch.full((1, 2, 5), 255)
    target[0, 0, 1:] = 0  # losses log(1 + e^z) for z = 1, 2, 3, 4
    loss = topk_cross_entropy(logits, target, 0.2)
    want = (math.log1p(math.exp(4)) + math.log1p(math.exp(3))) / 2
    assert abs(float(loss) - want) < 1e-12


def test_topk_cross_entropy_rejects_bad_labels():
    logits = torch.zeros(1, 5, 2, 3)
    target = torch.tensor([[[0, 4, 255], [7, -1, 7]]])
    with pytest.raises(ValueError, match=r'target holds values outside \[0, 5\) for 5 classes: -1, 7 '):
        topk_cross_entropy(logits, target)
    with pytest.raises(ValueError, match='target must be an integer'):
        topk_cross_entropy(logits, target.float())
    with pytest.raises(ValueError, match='top_k_percent'):
        topk_cross_entropy(logits, target.clamp(0, 4), top_k_percent=0)
    assert torch.isfinite(topk_cross_entropy(logits, target.clamp(0, 4)))


# --- metrics -------------------------------------------------------------------------------------

def test_confusion_and_miou_by_hand():
    pred = torch.tensor([[0, 1, 1], [2, 2, 0]])
    target = torch.tensor([[0, 1, 2], [2, 255, 1]])
    # counted (gt, pred) pairs: (0,0) (1,1) (2,1) (2,2) (1,0); the 255 pixel is left out.
    # rows = gt:        pred 0  1  2
    want = torch.tensor([[1, 0, 0],    # gt 0
                         [1, 1, 0],    # gt 1
                         [0, 1, 1]])   # gt 2
    cm = confusion_matrix(pred, target, 3)
    assert cm.dtype == torch.int64 and torch.equal(cm, want)
    # IoU = TP / (row + column - TP): class 0: 1 / (1 + 2 - 1) = 1/2; class 1: 1 / (2 + 2 - 1) = 1/3;
    # class 2: 1 / (2 + 1 - 1) = 1/2. mIoU = (1/2 + 1/3 + 1/2) / 3 = 4/9; pixel accuracy 3 / 5.
    torch.testing.assert_close(iou_per_class(cm), torch.tensor([1 / 2, 1 / 3, 1 / 2], dtype=torch.float64))
    assert abs(mean_iou(cm) - 4 / 9) < 1e-15 and abs(pixel_accuracy(cm) - 3 / 5) < 1e-15
    # numpy works too; a 4th class absent from both: NaN, left out of the mean
    cm4 = confusion_matrix(pred.numpy(), target.numpy(), 4)
    iou4 = iou_per_class(cm4)
    assert torch.isnan(iou4[3]) and abs(mean_iou(cm4) - 4 / 9) < 1e-15
    # a class only predicted (3 at the (0,0) pixel): IoU 0 for it, 0 for class 0 too (TP gone): (0 + 1/3 + 1/2 + 0) / 4
    pred3 = pred.clone()
    pred3[0, 0] = 3
    assert abs(mean_iou(confusion_matrix(pred3, target, 4)) - (1 / 3 + 1 / 2) / 4) < 1e-15
    assert math.isnan(pixel_accuracy(torch.zeros(3, 3))) and math.isnan(mean_iou(torch.zeros(3, 3)))


def test_confusion_accumulates_over_batches_and_names_bad_labels():
    meter = ConfusionMatrix(3)
    # batch 1: all 4 pixels of class 0 right. batch 2: gt 1 1 2 2, pred 1 2 2 2.
    meter.update(torch.zeros(4, dtype=torch.long), torch.zeros(4, dtype=torch.long))
    meter.update(torch.tensor([1, 2, 2, 2]), np.array([1, 1, 2, 2]))
    # summed: rows gt 0: [4 0 0], 1: [0 1 1], 2: [0 0 2]. IoU: 1, 1/2, 2/3; mIoU 13/18; accuracy 7/8.
    assert torch.equal(meter.confusion, torch.tensor([[4, 0, 0], [0, 1, 1], [0, 0, 2]]))
    assert abs(meter.mean_iou() - 13 / 18) < 1e-15 and abs(meter.pixel_accuracy() - 7 / 8) < 1e-15
    torch.testing.assert_close(meter.iou_per_class(), torch.tensor([1, 1 / 2, 2 / 3], dtype=torch.float64))
    meter.reset()
    assert meter.confusion.sum() == 0
    with pytest.raises(ValueError, match=r'target holds values outside \[0, 3\) for 3 classes: 3, 9'):
        confusion_matrix(torch.zeros(3, dtype=torch.long), torch.tensor([3, 9, 255]), 3)
    with pytest.raises(ValueError, match=r'pred holds values outside \[0, 3\) for 3 classes: 5'):
        confusion_matrix(torch.tensor([5, 0]), torch.tensor([1, 0]), 3)
    with pytest.raises(ValueError, match=r'pred must hold integer class ids.*argmax'):
        confusion_matrix(torch.zeros(2), torch.zeros(2, dtype=torch.long), 3)
    with pytest.raises(ValueError, match='same shape'):
        confusion_matrix(torch.zeros(2, dtype=torch.long), torch.zeros(3, dtype=torch.long), 3)


# --- training ------------------------------------------------------------------------------------

def test_gradients_reach_every_parameter():
    model = _tiny()
    x = torch.randn(2, 3, 48, 96, generator=torch.Generator().manual_seed(4))  # a 3x6 grid: queries resized
    target = torch.randint(0, 5, (2, 48, 96), generator=torch.Generator().manual_seed(5))
    topk_cross_entropy(model(x), target).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        # (inside the backbone's residual branches timm zero-inits the last BatchNorm: their convs get 0 at init)
        assert p.grad.abs().sum() > 0 or name.startswith('backbone.layer'), name
    assert model.backbone.conv1.weight.grad.abs().sum() > 0
    named = dict(model.named_parameters())
    for name in ('sp_queries', 'sp_pos_embed', 'sp_pos_periodic', 'pixel_pos_periodic', 'backbone.conv1.weight'):
        assert name in named
    assert model.no_weight_decay() <= set(named)


def test_torch_and_triton_backends_agree(triton_device):
    # One tokenizer layer, a 2x2 grid, batch 1: few, large Triton programs (the interpreter runs each in Python).
    kwargs = dict(img_size=(64, 64), cell_size=4, tokenizer_layers=1)
    results = []
    for backend in ('torch', 'triton'):
        model = _tiny(attn_backend=backend, **kwargs).to(triton_device).eval()
        x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(6)).to(triton_device)
        out = model(x)
        out.square().mean().backward()
        results.append((out.detach().cpu(), {n: p.grad.cpu() for n, p in model.named_parameters()}))
    (out_t, grads_t), (out_tr, grads_tr) = results
    torch.testing.assert_close(out_tr, out_t, rtol=1e-4, atol=1e-5)
    for name, g in grads_t.items():
        torch.testing.assert_close(grads_tr[name], g, rtol=1e-3, atol=1e-5 * max(1.0, float(g.abs().max())), msg=name)


def test_compiled_model_matches_eager():
    """fullgraph=True: any graph break fails. The 'aot_eager' backend traces the whole forward and backward
    (dynamo, AOTAutograd, the ops' fake kernels, the 'cells' pixel layout used under compile) in seconds;
    inductor's code generation adds ~2 minutes on two cores for the same model (it matched to 1e-7 when run)."""
    torch._dynamo.reset()
    model = _tiny(img_size=(64, 64), tokenizer_layers=1)
    x = torch.randn(2, 3, 64, 96, generator=torch.Generator().manual_seed(7))  # 4x6 grid: the 4x4 queries resized
    out = torch.compile(model, fullgraph=True, backend='aot_eager')(x)
    out.square().mean().backward()
    compiled = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    ref = model(x)
    ref.square().mean().backward()
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    for name, p in model.named_parameters():
        torch.testing.assert_close(compiled[name], p.grad, rtol=1e-3, atol=1e-5 * max(1.0, float(p.grad.abs().max())),
                                   msg=name)
    torch._dynamo.reset()


def _rectangles(n: int, seed: int = 0, H: int = 64, W: int = 128):
    """n images of flat-coloured rectangles (classes 1..3, one colour per class) on a background (class 0),
    normalized, and their exact labels."""
    g = torch.Generator().manual_seed(seed)
    colours = torch.tensor([[0.1, 0.1, 0.1], [0.9, 0.2, 0.2], [0.2, 0.9, 0.2], [0.2, 0.2, 0.9]])
    labels = torch.zeros(n, H, W, dtype=torch.long)
    for i, c in itertools.product(range(n), range(1, 4)):
        h, w = (int(torch.randint(lo, hi, (1,), generator=g)) for lo, hi in ((16, 33), (24, 49)))
        y0, x0 = int(torch.randint(0, H - h + 1, (1,), generator=g)), int(torch.randint(0, W - w + 1, (1,), generator=g))
        labels[i, y0:y0 + h, x0:x0 + w] = c
    return (colours[labels].permute(0, 3, 1, 2) - 0.5) / 0.25, labels


def test_overfits_flat_rectangles():
    # convnext_atto (LayerNorm: no train/eval difference, and half resnet18's cost here); top-30% pixel mining
    # keeps the small rectangles from being drowned by the background. ~0.1 s of CPU per step.
    x, y = _rectangles(2)
    assert len(y.unique()) == 4 and (y == 0).double().mean() < 0.8
    model = _tiny(backbone='convnext_atto', num_classes=4)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.)
    for step in range(60):
        loss = topk_cross_entropy(model(x), y, top_k_percent=0.3)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        out = model.forward_superpixels(x)
    accuracy = float((out['logits'].argmax(1) == y).double().mean())
    assert accuracy > 0.9, accuracy  # 0.96 when written
    # the hard superpixels follow the rectangles: each is (almost) one class
    purity = sum(int(torch.bincount(y[b][out['labels'][b] == s]).max()) for b in range(2)
                 for s in out['labels'][b].unique()) / y.numel()
    assert purity > 0.9, purity


# --- arguments -----------------------------------------------------------------------------------

def test_bad_inputs_are_named(tmp_path):
    model = _tiny(tokenizer_layers=1).eval()
    with pytest.raises(ValueError, match=r'x has spatial size 64x120; both sides must be positive multiples of the '
                                         r'superpixel token stride \(pixel_stride=8 x cell_size=2\) = 16'):
        model(torch.randn(1, 3, 64, 120))
    with pytest.raises(TypeError, match='x must be a floating-point image tensor'):
        model(torch.zeros(1, 3, 64, 128, dtype=torch.uint8))
    with pytest.raises(ValueError, match='x has 1 channels, expected in_chans=3'):
        model(torch.randn(1, 1, 64, 128))
    with pytest.raises(ValueError, match="backbone must be the name of a timm model.*got 'resnet_nope'"):
        _tiny(backbone='resnet_nope')
    with pytest.raises(ValueError, match=r"backbone='spformer_small_sp32_224' has feature levels at strides "
                                         r"\[8, 16, 32, 64\]"):
        _tiny(backbone='spformer_small_sp32_224')
    for name in ('weights.pth', 'weights.pt', 'weights.bin', 'weights.ckpt', 'weights.pkl'):
        (tmp_path / name).write_bytes(b'not read')
        with pytest.raises(ValueError, match=r'backbone_pretrained=.*is a pickle-based checkpoint.*never loaded'):
            _tiny(backbone_pretrained=str(tmp_path / name))
    with pytest.raises(ValueError, match='backbone_pretrained=.*missing.safetensors.*no such file'):
        _tiny(backbone_pretrained=str(tmp_path / 'missing.safetensors'))
    with pytest.raises(ValueError, match='backbone_pretrained must be False, True'):
        _tiny(backbone_pretrained=3)
    for kwargs, match in ((dict(num_classes=0), 'num_classes must be an int >= 1, got 0'),
                          (dict(decoder='fpn'), "decoder must be one of .*got 'fpn'"),
                          (dict(attn_backend='cuda'), "attn_backend must be one of .*got 'cuda'"),
                          (dict(img_size=(64, 120)), r'img_size=\(64, 120\) must be positive multiples of the token '
                                                     r'stride 16'),
                          (dict(block_heads=3), 'block_heads=3 must divide neck_dim=32'),
                          (dict(tokenizer_mlp_ratio=-1), 'tokenizer_mlp_ratio must be a number >= 0, got -1'),
                          (dict(tokenizer_mlp_ratio='4'), "tokenizer_mlp_ratio must be a number >= 0, got '4'"),
                          (dict(mlp_ratio=0), 'mlp_ratio must be a number > 0, got 0')):
        with pytest.raises(ValueError, match=match):
            _tiny(**kwargs)
    with pytest.raises(ValueError, match="decoder='bilinear': no superpixels"):
        _tiny(decoder='bilinear').forward_superpixels(torch.randn(1, 3, 64, 128))


def test_backbone_weights_from_a_local_safetensors_file(tmp_path):
    from safetensors.torch import save_file
    torch.manual_seed(11)
    reference = timm.create_model('resnet18')
    path = tmp_path / 'resnet18.safetensors'
    save_file(reference.state_dict(), str(path))
    model = _tiny(backbone_pretrained=str(path), tokenizer_layers=1)
    for name, tensor in model.backbone.state_dict().items():
        assert torch.equal(tensor, reference.state_dict()[name]), name


def test_backbone_levels():
    assert backbone_levels('resnet18') == (0, 2, 4)  # strides 2, 8, 32
    assert backbone_levels('convnext_atto') == (0, 1, 3)  # no stride-2 level: 4, 8, 32
    assert backbone_levels('resnet18', [2, 4, 8, 8, 16, 32]) == (0, 3, 5)  # the deepest level of a stride
    with pytest.raises(ValueError, match=r"backbone='resnet18' has feature levels at strides \[4, 16\]"):
        backbone_levels('resnet18', [4, 16])


def test_bilinear_decoder_shares_backbone_and_neck():
    sp = _tiny(tokenizer_layers=1)
    bl = _tiny(decoder='bilinear')
    shared = {n for n, _ in bl.named_parameters() if n.startswith(('backbone.', 'neck.'))}
    assert shared == {n for n, _ in sp.named_parameters() if n.startswith(('backbone.', 'neck.'))}
    assert {n for n, _ in bl.named_parameters()} - shared == {'head.weight', 'head.bias'}
    x = torch.randn(1, 3, 64, 128)
    out = bl(x)
    assert out.shape == (1, 5, 64, 128)
    # the logits are the bilinear upsampling of a per-pixel linear map of the neck's features
    want = F.interpolate(torch.einsum('bchw,kc->bkhw', bl.forward_pixels(x), bl.head.weight)
                         + bl.head.bias[:, None, None], size=(64, 128), mode='bilinear', align_corners=False)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)


def test_macs_are_counted_in_inference_mode():
    # the model table's counter (inference_mode + module hooks) once failed on the expanded query parameter;
    # it must count what a plain forward with frozen parameters counts
    from torch.utils.flop_counter import FlopCounterMode
    from spformer.demo import count_macs
    model = _tiny().eval()
    x = torch.randn(2, 3, 64, 128)
    macs, out = count_macs(model, x)
    for p in model.parameters():
        p.requires_grad_(False)
    from torch.nn.attention import SDPBackend, sdpa_kernel
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), counter:
        want = model(x)
    assert macs == counter.get_total_flops() // 2 > 0
    torch.testing.assert_close(out, want)


# --- timm registration ---------------------------------------------------------------------------

def test_timm_registration_and_configs(tmp_path):
    names = list_segmentation_models()
    for name in ('sp_transformer_r50_cityscapes', 'sp_transformer_convnext_large_cityscapes',
                 'sp_transformer_r50_ade20k', 'sp_transformer_r18_cityscapes', 'sp_transformer_convnext_atto_cityscapes'):
        assert name in names and timm.is_model(name)
    model = timm.create_model('sp_transformer_r18_cityscapes', num_classes=5, neck_dim=32, img_size=(64, 128))
    assert isinstance(model, SPTransformer) and model.backbone_name == 'resnet18'
    assert model.pretrained_cfg['architecture'] == 'sp_transformer_r18_cityscapes'
    assert model.pretrained_cfg['num_classes'] == 5 and model.pretrained_cfg['input_size'] == (3, 64, 128)
    model.eval()
    x = torch.randn(1, 3, 64, 128)
    with torch.no_grad():
        out = model(x)
    assert out.shape == (1, 5, 64, 128) and torch.isfinite(out).all()
    # a local weights file goes through timm (checkpoint filter, head size read from the file)
    from safetensors.torch import save_file
    save_file(model.state_dict(), str(tmp_path / 'model.safetensors'))
    loaded = create_segmentation_model('sp_transformer_r18_cityscapes', pretrained=True, neck_dim=32, img_size=(64, 128),
                                       pretrained_cfg_overlay=dict(file=str(tmp_path / 'model.safetensors'))).eval()
    assert loaded.num_classes == 5
    with torch.no_grad():
        assert torch.equal(loaded(x), out)
    with pytest.raises(PretrainedWeightsUnavailable, match='no weights are published'):
        create_segmentation_model('sp_transformer_r18_cityscapes', pretrained=True)
    with pytest.raises(ValueError, match="name must be one of .*got 'sp_transformer_r1'"):
        create_segmentation_model('sp_transformer_r1')
    # the configs as published: grids and strides (built on the meta device: no memory, no init)
    expect = {'sp_transformer_r50_cityscapes': ('resnet50', 8, (32, 64), 19),
              'sp_transformer_convnext_large_cityscapes': ('convnext_large', 8, (32, 64), 19),
              'sp_transformer_r50_ade20k': ('resnet50', 4, (40, 40), 150)}
    for name, (backbone, stride, grid, classes) in expect.items():
        assert SEGMENTATION_CONFIGS[name]['backbone'] == backbone
        with torch.device('meta'):
            m = timm.create_model(name)
        assert (m.pixel_stride, m.grid_size, m.num_classes, m.sp_queries.shape[1:3]) == (stride, grid, classes, grid)
        assert m.pretrained_cfg['mean'] == timm.models.get_pretrained_cfg(backbone).mean


@pytest.mark.parametrize('ratio', [0, 1, 4, 0.5])
def test_tokenizer_mlp_ratio_sizes_the_tokenizer_by_hand(ratio):
    """Parameters of one tokenizer layer at C channels, hidden r*C, counted from the layer's description: 2 LayerNorms,
    the q|k (2C) and v (C) projections and the output projection (C) of each path, with biases; and per path an MLP
    (LayerNorm, C -> rC -> C with biases) when r > 0."""
    C = 32
    model = _tiny(tokenizer_layers=1, tokenizer_mlp_ratio=ratio)
    hidden = int(C * ratio)
    attention = 2 * 2 * C + 2 * ((C * 2 * C + 2 * C) + (C * C + C) + (C * C + C))
    mlps = 2 * (2 * C + C * hidden + hidden + hidden * C + C) if hidden else 0
    assert sum(p.numel() for p in model.tokenizer[0].parameters()) == attention + mlps
    assert model.tokenizer[0].has_mlp == (hidden > 0)
    assert sum(p.numel() for p in _tiny(tokenizer_layers=1).tokenizer[0].parameters()) == (
        attention + 2 * (2 * C + 2 * C * C + C + C)), 'the default is ratio 1'


def test_the_docs_model_table_is_the_models():
    """docs/segmentation.md's table of registered models (params with the default arguments) against the models,
    built on the meta device (no memory, no init): a changed default must change the page."""
    from pathlib import Path
    page = (Path(__file__).resolve().parents[1] / 'docs' / 'segmentation.md').read_text()
    section = page[page.index('## Models'):page.index('## Train')]
    rows = [[c.strip() for c in line.strip('|').split('|')] for line in section.splitlines()
            if line.startswith('| `sp_transformer_')]
    assert {r[0].strip('`') for r in rows} == set(list_segmentation_models())
    for name, backbone, classes, size, stride, token_stride, grid, params in rows:
        with torch.device('meta'):
            m = timm.create_model(name.strip('`'))
        got = (m.backbone_name, m.num_classes, 'x'.join(map(str, m.img_size)), m.pixel_stride, m.token_stride,
               'x'.join(map(str, m.grid_size)), f'{sum(p.numel() for p in m.parameters()) / 1e6:.1f}M')
        assert got == (backbone, int(classes), size, int(stride), int(token_stride), grid, params), name


def test_a_weights_file_loads_through_timm_as_it_was_saved(tmp_path):
    """timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=...)), the way timm documents local
    weights: the file's head size and the input its superpixel queries were made for are taken from the file
    (not the registered 1024x2048 with the queries resampled, which changes every output), and the
    construction arguments from the config.json that spformer.hub writes beside it; a given img_size still
    resamples. The oracle is the saved model's own output."""
    from safetensors.torch import save_file
    from spformer.hub.publish import save_config
    torch.manual_seed(0)
    saved = timm.create_model('sp_transformer_r18_cityscapes', num_classes=5, neck_dim=32, img_size=(64, 128),
                              tokenizer_mlp_ratio=2).eval()
    save_file(saved.state_dict(), str(tmp_path / 'model.safetensors'))
    x = torch.randn(1, 3, 64, 128)
    overlay = dict(file=str(tmp_path / 'model.safetensors'))
    with torch.no_grad():
        want = saved(x)
        # no config.json: the architecture's arguments are the caller's, head and grid the file's
        loaded = timm.create_model('sp_transformer_r18_cityscapes', pretrained=True, pretrained_cfg_overlay=overlay,
                                   neck_dim=32, tokenizer_mlp_ratio=2).eval()
        assert (loaded.num_classes, loaded.img_size, loaded.grid_size) == (5, (64, 128), (2, 4))
        assert loaded.pretrained_cfg['input_size'] == (3, 64, 128)
        torch.testing.assert_close(loaded(x), want)
        # with the config.json beside it: nothing to repeat
        written = save_config(saved, tmp_path / 'config.json')
        loaded = timm.create_model('sp_transformer_r18_cityscapes', pretrained=True,
                                   pretrained_cfg_overlay=overlay).eval()
        assert (loaded.neck_dim, loaded.num_classes, loaded.img_size) == (32, 5, (64, 128))
        torch.testing.assert_close(loaded(x), want)
        # and it remembers how it was built: saved again, its config.json rebuilds the same architecture
        assert save_config(loaded, tmp_path / 'again.json')['model_args'] == written['model_args']
        # a given input size resamples the queries to its grid
        bigger = timm.create_model('sp_transformer_r18_cityscapes', pretrained=True, pretrained_cfg_overlay=overlay,
                                   img_size=(128, 256)).eval()
        assert bigger.grid_size == (4, 8) and bigger.pretrained_cfg['input_size'] == (3, 128, 256)
        # spformer.hub's loader of a bare file takes segmenters too (the config.json beside it still applies)
        from spformer.hub import load_safetensors_checkpoint
        loaded = load_safetensors_checkpoint(tmp_path / 'model.safetensors', 'sp_transformer_r18_cityscapes').eval()
        torch.testing.assert_close(loaded(x), want)
    with pytest.raises(ValueError, match=r"model_name='resnet18' is not an SPFormer variant nor an SP-Transformer "
                                         r"variant; expected one of the SPFormer variants: .*SP-Transformer variants: "):
        load_safetensors_checkpoint(tmp_path / 'model.safetensors', 'resnet18')


def test_parameter_groups_run_from_input_to_output():
    """timm's group_parameters / layer decay on group_matcher: the groups in data-flow order (written out by hand),
    every parameter in exactly one; coarse merges the tokenizer layers and the blocks."""
    from timm.models import group_parameters
    from timm.optim import param_groups_layer_decay
    model = _tiny(num_blocks=2)

    def modules(groups):
        return [sorted({'.'.join(n.split('.')[:2]) if n.startswith(('tokenizer.', 'blocks.')) else n.split('.')[0]
                        for n in names}) for names in groups.values()]
    tables = ['neck', 'pixel_pos_periodic', 'sp_pos_embed', 'sp_pos_periodic', 'sp_queries']
    out = ['assoc_px_norm', 'assoc_px_proj', 'assoc_sp_norm', 'assoc_sp_proj', 'head', 'norm']
    fine = group_parameters(model, model.group_matcher())
    assert modules(fine) == [['backbone'], tables, ['tokenizer.0'], ['tokenizer.1'], ['blocks.0'], ['blocks.1'], out]
    assert sorted(n for names in fine.values() for n in names) == sorted(n for n, _ in model.named_parameters())
    coarse = group_parameters(model, model.group_matcher(coarse=True))
    assert modules(coarse) == [['backbone'], tables, ['tokenizer.0', 'tokenizer.1'], ['blocks.0', 'blocks.1'], out]
    # layer decay: the learning-rate scale rises along the data flow
    scale_of = {id(p): g['lr_scale'] for g in param_groups_layer_decay(model, layer_decay=0.5) for p in g['params']}
    scales = {n: scale_of[id(p)] for n, p in model.named_parameters()}
    assert (scales['backbone.conv1.weight'] < scales['sp_queries'] < scales['tokenizer.0.sp_qk.weight']
            < scales['tokenizer.1.sp_qk.weight'] < scales['blocks.0.attn.qkv.weight'] < scales['blocks.1.attn.qkv.weight']
            < scales['head.weight'] == scales['assoc_px_proj.weight'] == 1)


def test_association_logits_are_not_rounded_to_bf16_under_autocast():
    """Under bf16 autocast the association's dot products are taken from fp32 copies of q and k: logits rounded
    to bf16 (what a bf16 op returns) would all survive a round trip through bf16 unchanged; fp32 ones do not."""
    model = _tiny().eval()
    with torch.no_grad(), torch.autocast('cpu', dtype=torch.bfloat16):
        parts = model.forward_parts(torch.randn(1, 3, 64, 128))
    logits = parts.association_logits
    finite = logits[torch.isfinite(logits)]
    assert logits.dtype == torch.float32 and parts.superpixels.dtype == torch.bfloat16  # autocast was on
    assert (finite.bfloat16().float() != finite).float().mean() > 0.9


def test_speed_benchmark_runs_from_the_command_line(tmp_path):
    """bench/sp_transformer_speed.py (the GPU check of .ci/gpu) the way a person runs it, in a fresh process: a CPU
    smoke run prints one row per backend and kind with images/s = batch * 1000 / ms, and --device cuda on a
    machine without CUDA stops with a one-line usage error instead of a traceback."""
    import re
    import subprocess
    import sys
    from pathlib import Path
    script = Path(__file__).resolve().parents[1] / 'bench' / 'sp_transformer_speed.py'
    run = subprocess.run([sys.executable, str(script), '--device', 'cpu', '--model', 'sp_transformer_r18_cityscapes',
                          '--size', '64', '128', '--batch-size', '2', '--dtype', 'float32', '--runs', '1',
                          '--warmup', '0', '--backends', 'torch'], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    rows = [line for line in run.stdout.splitlines() if line.startswith('| `sp_transformer_r18_cityscapes`')]
    assert [r.split('|')[4].strip() for r in rows] == ['inference', 'training step']
    for row in rows:
        ms, per_s = (float(c) for c in row.split('|')[5:7])
        assert ms > 0 and abs(per_s - 2000 / ms) <= 0.051 + 1e-3 * per_s
    if not torch.cuda.is_available():
        run = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300)
        assert run.returncode == 2 and 'Traceback' not in run.stderr
        assert re.search(r'--device cuda: no CUDA device here', run.stderr)



def test_an_spformer_backbone_feeds_its_feature_pyramid():
    """backbone='spformer_tiny_sp16_224' (the issue's "and SPFormer itself"): the segmenter reads the pyramid's levels
    of strides 4, 8 and 32, which equal SPFormer's own forward_pyramid levels 0, 1 and 3 with the same weights;
    other input sizes work with dynamic_img_size, and gradients reach the SPFormer's parameters."""
    torch.manual_seed(0)
    model = _tiny(backbone='spformer_tiny_sp16_224', backbone_kwargs=dict(dynamic_img_size=True))
    assert model.backbone.feature_info.reduction() == [4, 8, 32]
    spformer_model = timm.create_model('spformer_tiny_sp16_224', dynamic_img_size=True).eval()
    missing, unexpected = spformer_model.load_state_dict(model.backbone.model.state_dict(), strict=False)
    assert not unexpected and all(k.startswith(('head', 'fc_norm')) for k in missing), (missing, unexpected)
    model.eval()
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        want = spformer_model.forward_pyramid(x)
        got = model.backbone(x)
    for level, (g, w) in enumerate(zip(got, (want[0], want[1], want[3]))):
        torch.testing.assert_close(g, w, msg=f'level {level}')
    model.train()
    model(torch.randn(1, 3, 96, 128)).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for n, p in model.backbone.named_parameters()
               if 'stages.2' in n and n.endswith('weight')), 'no gradient in the last SPFormer stage'
