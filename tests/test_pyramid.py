"""The dense-prediction pyramid (docs/models.md, "A feature pyramid"): ``features_only=True`` gives strides 4, 8,
16, 32 in the superpixel way, and segmentation_models_pytorch's timm encoders ("tu-...") take it.

Level 1 is checked against a sum written out from ``forward_superpixels``' association and the final tokens,
pixel by pixel; levels 0, 2 and 3 against the per-block features they are made of.
"""
import pytest
import timm
import torch
import torch.nn.functional as F

import spformer  # noqa: F401  (registers the models)

TINY = 'spformer_tiny_sp16_224'
HIER = 'spformer_hier_tiny_sp16_224'


def _unfolded_by_hand(association: torch.Tensor, tokens: torch.Tensor, cell: int) -> torch.Tensor:
    """association (B, 9, H, W) over each stride-4 pixel's 9 neighbour tokens, tokens (B, C, h, w) -> (B, C, H/2, W/2):
    every pixel's association-weighted sum of its neighbours, written out, then the mean of every 2x2 block."""
    B, _, H, W = association.shape
    C, h, w = tokens.shape[1:]
    out = torch.zeros(B, C, H, W, dtype=tokens.dtype)
    rows, cols = torch.arange(H)[:, None] // cell, torch.arange(W)[None, :] // cell  # each pixel's own cell
    for k in range(9):
        i, j = rows + k // 3 - 1, cols + k % 3 - 1  # neighbour k's cell, for every pixel
        inside = (i >= 0) & (i < h) & (j >= 0) & (j < w)
        assert (association[:, k][:, ~inside] == 0).all()  # a neighbour outside the image: probability 0
        out += association[:, k, None] * tokens[:, :, i.clamp(0, h - 1), j.clamp(0, w - 1)]
    return out.reshape(B, C, H // 2, 2, W // 2, 2).mean(dim=(3, 5))


@pytest.mark.parametrize('name, size', [(TINY, (64, 96)), (HIER, (64, 64))])
def test_pyramid_levels(name, size):
    """features_only=True alone: four levels, strides 4, 8, 16, 32, NCHW; each what it is made of."""
    torch.manual_seed(0)
    kwargs = dict(img_size=size, num_classes=0)
    feats = timm.create_model(name, features_only=True, **kwargs).eval()
    full = timm.create_model(name, **kwargs).eval()
    full.load_state_dict({k[len('model.'):]: v for k, v in feats.state_dict().items()}, strict=False)
    assert feats.feature_info.reduction() == [4, 8, 16, 32]
    C, Cp = full.embed_dim, full.pixel_dim
    assert feats.feature_info.channels() == [Cp, C, C, C]
    x = torch.randn(2, 3, *size)
    H, W = size
    with torch.no_grad():
        levels = feats(x)
        _, per_block = full.forward_intermediates(x)
        association = full.forward_superpixels(x)[-1]['association_merged']
    assert [tuple(t.shape) for t in levels] == [(2, Cp, H // 4, W // 4), (2, C, H // 8, W // 8),
                                               (2, C, H // 16, W // 16), (2, C, H // 32, W // 32)]
    torch.testing.assert_close(levels[0], per_block[0])  # the pixel stream
    tokens = per_block[sum(full.depths)]  # the last ViT block: the final tokens
    torch.testing.assert_close(levels[2], tokens)
    torch.testing.assert_close(levels[1], _unfolded_by_hand(association, tokens, full.cell_size),
                               rtol=1e-4, atol=1e-5)
    if full.grouping:
        torch.testing.assert_close(levels[3], per_block[-1])  # the groups
    else:
        torch.testing.assert_close(levels[3], F.avg_pool2d(tokens, 2))
    with torch.no_grad():
        torch.testing.assert_close(full.forward_pyramid(x), levels)  # what the model itself gives


def test_which_index_space():
    """out_indices given: the per-block indices as before; feature_pyramid=True picks among the levels, and is
    pruned like them; dynamic sizes (an odd token grid: the last level in ceil mode); models it cannot serve."""
    torch.manual_seed(0)
    blocks = timm.create_model(TINY, features_only=True, out_indices=(0, 4, 12), img_size=64)
    assert blocks.feature_info.reduction() == [4, 16, 16]
    two = timm.create_model(TINY, features_only=True, feature_pyramid=True, out_indices=(1, 3), img_size=64).eval()
    assert two.feature_info.reduction() == [8, 32]
    pixels_only = timm.create_model(TINY, features_only=True, feature_pyramid=True, out_indices=(0,), img_size=64)
    assert len(pixels_only.model.stages) == 1  # the last stage reads the pixels: pruned away
    dynamic = timm.create_model(TINY, features_only=True, dynamic_img_size=True, img_size=64).eval()
    with torch.no_grad():
        shapes = [tuple(t.shape[-2:]) for t in dynamic(torch.randn(1, 3, 80, 112))]
    assert shapes == [(20, 28), (10, 14), (5, 7), (3, 4)]
    # sp56's 7x7 cells cannot be halved: features_only keeps the per-block indices, the pyramid is refused
    assert timm.create_model('spformer_small_sp56_224', features_only=True, pretrained=False,
                             device='meta').feature_info.reduction() == [56, 56, 56]
    with pytest.raises(ValueError, match='even cell_size'):
        timm.create_model('spformer_small_sp56_224', feature_pyramid=True, device='meta')
    with pytest.raises(ValueError, match="feature_cls='getter'"):
        timm.create_model(TINY, features_only=True, feature_pyramid=True, feature_cls='fx', device='meta')


@pytest.mark.parametrize('architecture', ['Unet', 'FPN'])
def test_segmentation_models_pytorch(architecture):
    """smp's timm encoder ("tu-" + the model name) takes the pyramid: forward and backward at 64 px, every
    parameter gets a gradient. smp probes the model with features_only=True alone (the pyramid) and builds it
    with out_indices=(0, 1, 2, 3) and the encoder kwargs: feature_pyramid=True, img_size."""
    import segmentation_models_pytorch as smp
    torch.manual_seed(0)
    net = getattr(smp, architecture)(encoder_name=f'tu-{TINY}', encoder_weights=None, classes=3,
                                     feature_pyramid=True, img_size=64)
    assert net.encoder.model.feature_info.reduction() == [4, 8, 16, 32]
    x = torch.randn(2, 3, 64, 64)
    out = net(x)
    assert out.shape == (2, 3, 64, 64)
    out.square().mean().backward()
    assert all(p.grad is not None for p in net.parameters())
