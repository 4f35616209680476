"""The SPFormer family against timm's own model checks (tests/test_models.py in timm), the
published sizes (docs/design.md §1.1) and independent naive re-implementations of its layers.

Every test is parametrized over ``timm.list_models('spformer*')``: registering a model is
enough to have it tested.
"""
import contextlib
import copy
import math

import pytest
import torch
import torch.nn.functional as F
import timm
from timm.layers import get_notrace_functions, get_notrace_modules
from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names

import spformer  # noqa: F401  (registers the models)
from spformer.models.spformer import SuperpixelCrossAttention
from test_model_oracle import sca_iteration  # docs/design.md §1.3, the direct form written out densely

MODELS = timm.list_models('spformer*')

# docs/design.md §1.1: parameters measured on the author's code, the paper's GFLOPs (ranges where the
# paper gives several) and what the counter gives on the author's code (S/56).
EXPECTED_PARAMS = {
    'spformer_tiny_sp16_224': 5.740e6,
    'spformer_small_sp16_224': 22.334e6,
    'spformer_base_sp16_224': 87.581e6,
    'spformer_small_sp56_224': 22.217e6,
}
# The authors' code counts exactly this for S/56 (its stem: three 3x3 stride-2 convs, 3 -> 16 -> 32 -> 64).
AUTHORS_SP56_PARAMS = 22_216_632
SP56_STEM = ((16, 3, 2), (32, 3, 2), (64, 3, 2))  # (out_channels, kernel, stride) per conv
# Every variant's exact count (docs/design.md §1.1; the hierarchical ones from the formula): a stem change
# must not move any of them but the one it is meant for.
EXACT_PARAMS = {
    'spformer_tiny_sp16_224': 5_740_488,
    'spformer_small_sp16_224': 22_334_376,
    'spformer_base_sp16_224': 87_581_320,
    'spformer_small_sp32_224': 22_230_696,
    'spformer_small_sp56_224': AUTHORS_SP56_PARAMS,
    'spformer_small_sp32_448': 22_343_592,
    'spformer_hier_tiny_sp16_224': 5_927_112,
    'spformer_hier_small_sp16_224': 23_076_264,
    'spformer_hier_small_local_sp16_224': 23_380_392,
}


def spformer_params(Cp, C, depths, stem_stride=4, cell=4, img=224, sca_iters=2, num_classes=1000,
                    grouping=None, group_depth=1, stem_layers=None):
    """Parameters of an SPFormer counted from docs/design.md §1.2-1.3 and 2, layer by layer (independent of
    the code: it gives the author's 22.334M for SPFormer-S, see test_param_formula_matches_the_authors).
    ``stem_layers``: (out_channels, kernel, stride) per stem conv; default one patchify conv."""
    block = 12 * C * C + 13 * C  # 2 LayerNorms, qkv (bias), proj, fc1, fc2 (biases)

    def sca(Cp, C, update_pixels):  # position convs (with bias), projections (no bias), norms, LayerScales
        return (9 * Cp + Cp) + (9 * C + C) + C * 3 * Cp + 2 * 3 * Cp + Cp * (2 * Cp + C) + 2 * (2 * Cp + C) \
            + C + (Cp if update_pixels else 0)

    def pixel_update(Cp, C):  # projection (no bias), LayerNorm, LayerScale
        return C * Cp + 2 * Cp + Cp

    tokens = (img // (stem_stride * cell)) ** 2
    n, cin = 0, 3
    for cout, k, _ in stem_layers or ((Cp, stem_stride, stem_stride),):
        n, cin = n + cin * cout * k * k + 2 * cout, cout  # stem convs (no bias) + BatchNorms
    n += Cp * C + 2 * C  # superpixel init: 1x1 conv (no bias) + LayerNorm
    for i, depth in enumerate(depths):
        n += sum(sca(Cp, C, it < sca_iters - 1) for it in range(sca_iters)) + tokens * C + depth * block
        n += pixel_update(Cp, C) if i < len(depths) - 1 else 0
    if grouping == 'global':  # 2 LayerNorms, q (bias), kv (bias), proj (bias), LayerScale
        n += 4 * C + (C * C + C) + (2 * C * C + 2 * C) + (C * C + C) + C
    elif grouping == 'local':  # an SCA layer with C-channel "pixels" and no pixel update
        n += sca(C, C, False)
    if grouping is not None:
        n += group_depth * block + pixel_update(C, C)  # ViT blocks over the groups, ungroup
    return n + 2 * C + C * num_classes + num_classes  # head: LayerNorm + Linear


# The hierarchical variants: exact counts from the formula (no published numbers exist).
HIER_CONFIGS = {
    'spformer_hier_tiny_sp16_224': dict(Cp=32, C=192, depths=(2, 9), grouping='global'),
    'spformer_hier_small_sp16_224': dict(Cp=64, C=384, depths=(2, 9), grouping='global'),
    'spformer_hier_small_local_sp16_224': dict(Cp=64, C=384, depths=(2, 9), grouping='local'),
}
HIER_PARAMS = {name: spformer_params(**cfg) for name, cfg in HIER_CONFIGS.items()}
PAPER_GFLOPS = {
    'spformer_tiny_sp16_224': (1.3, 1.3),
    'spformer_small_sp16_224': (4.9, 4.9),
    'spformer_base_sp16_224': (17.0, 18.5),
    'spformer_small_sp32_224': (1.2, 1.2),
    'spformer_small_sp56_224': (0.5, 0.5),
    'spformer_small_sp32_448': (4.9, 4.9),
}


def _input_size(model):
    return (model.in_chans, *model.img_size)


def _fx_tracer_kwargs():
    return dict(leaf_modules=get_notrace_modules(), autowrap_functions=get_notrace_functions(),
                param_shapes_constant=True)


def test_all_variants_registered():
    assert set(MODELS) == set(PAPER_GFLOPS) | set(HIER_CONFIGS)


@pytest.mark.parametrize('model_name', MODELS)
def test_model_forward(model_name):
    """Forward at the default size; grad checkpointing does not change the output."""
    torch.manual_seed(0)
    model = timm.create_model(model_name).eval()
    x = torch.randn(1, *_input_size(model))
    with torch.no_grad():
        out = model(x)
        assert out.shape == (1, 1000)
        assert not torch.isnan(out).any()
        model.set_grad_checkpointing()
        out2 = model(x)
    assert torch.allclose(out, out2, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize('model_name', MODELS)
def test_model_backward(model_name):
    """num_classes=42, train mode, every parameter gets a gradient (grad checkpointing on and off agree)."""
    torch.manual_seed(0)
    model = timm.create_model(model_name, num_classes=42, drop_path_rate=0.1).train()
    x = torch.randn(2, *_input_size(model))
    out = model(x)
    assert out.shape == (2, 42)
    out.mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, f'no gradient for {missing}'
    assert not torch.isnan(out).any()


@pytest.mark.parametrize('model_name, kwargs', [
    ('spformer_tiny_sp16_224', {}), ('spformer_hier_tiny_sp16_224', {}),
    ('spformer_hier_tiny_sp16_224', dict(group_index=1))])
def test_stochastic_depth_rises_linearly_in_execution_order(model_name, kwargs):
    """docs/design.md §1.2: the drop-path rate rises linearly over all ViT blocks in the order they run,
    0 for the first and drop_path_rate for the last; a hierarchical model's group-level blocks take their
    place in that order (after the first group_index blocks of the last stage)."""
    rate = 0.3
    model = timm.create_model(model_name, drop_path_rate=rate, **kwargs)
    blocks = []  # the timm Blocks in execution order, written out from the design, not from units()
    for stage in model.stages:
        if stage.group_block is None:
            blocks += list(stage.blocks)
        else:
            k = stage.group_index
            blocks += list(stage.blocks[:k]) + list(stage.group_block.blocks) + list(stage.blocks[k:])
    rates = [getattr(b.drop_path1, 'drop_prob', 0.0) for b in blocks]
    assert all(getattr(b.drop_path2, 'drop_prob', 0.0) == r for b, r in zip(blocks, rates))
    expected = [rate * i / (len(blocks) - 1) for i in range(len(blocks))]
    assert rates == pytest.approx(expected, abs=1e-12), rates


@pytest.mark.parametrize('model_name, kwargs', [
    ('spformer_tiny_sp16_224', {}), ('spformer_small_sp56_224', {}), ('spformer_hier_tiny_sp16_224', {}),
    ('spformer_hier_tiny_sp16_224', dict(grouping='local'))])
def test_model_bf16_autocast(model_name, kwargs):
    """Mixed precision (what train_imagenet.py --mixed-precision bf16 does): forward and backward under
    CPU bf16 autocast run, every parameter gets a finite gradient, and the logits stay close to fp32's."""
    torch.manual_seed(0)
    model = timm.create_model(model_name, num_classes=10, img_size=64 if '_sp16_' in model_name else 112, **kwargs)
    x = torch.randn(2, 3, *model.img_size)
    want = model(x)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        got = model(x)
    assert got.dtype == torch.bfloat16
    got.float().square().mean().backward()
    bad = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not bad, f'missing or non-finite gradients: {bad[:5]}'
    err = (got.float() - want).abs().max() / want.abs().max()
    assert err < 0.05, f'bf16 logits differ from fp32 by {err:.3f} of their scale'


def test_model_bf16_autocast_cuda(triton_device):
    """The same on CUDA, where under autocast the attention ops run on bf16 pixel features (fused
    Triton kernels, fp32 accumulation): needs a GPU and TRITON_INTERPRET=0 (.ci/gpu)."""
    if triton_device.type != 'cuda':
        pytest.skip('needs a CUDA device with TRITON_INTERPRET=0 (.ci/gpu); on CPU, test_model_bf16_autocast')
    torch.manual_seed(0)
    model = timm.create_model('spformer_tiny_sp16_224', num_classes=10, img_size=64).cuda()
    with torch.no_grad():  # LayerScales of 1e-5 would hide the SCA's contribution
        for name, p in model.named_parameters():
            if name.endswith('.gamma'):
                p.fill_(0.5)
    x = torch.randn(2, 3, 64, 64, device='cuda')
    want = model(x)
    with torch.autocast('cuda', dtype=torch.bfloat16):
        got = model(x)
    got.float().square().mean().backward()
    bad = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not bad, f'missing or non-finite gradients: {bad[:5]}'
    err = (got.float() - want).abs().max() / want.abs().max()
    assert err < 0.05, f'bf16 logits differ from fp32 by {err:.3f} of their scale'


def test_grad_checkpointing_gradients_match():
    torch.manual_seed(0)
    model = timm.create_model('spformer_tiny_sp16_224', num_classes=10, img_size=64).train()
    x = torch.randn(2, 3, 64, 64)
    model(x).square().mean().backward()
    ref = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model.set_grad_checkpointing(True)
    model(x).square().mean().backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, ref[n], rtol=1e-4, atol=1e-6, msg=n)


@pytest.mark.parametrize('model_name', MODELS)
def test_model_default_cfgs_non_std(model_name):
    """timm's check for ViT-family models (NLC forward_features)."""
    model = timm.create_model(model_name).eval()
    assert model.num_classes >= 0 and model.num_features > 0 and model.head_hidden_size > 0
    cfg = model.pretrained_cfg
    x = torch.randn(1, *_input_size(model))
    with torch.no_grad():
        feats = model.forward_features(x)
        pre = model.forward_head(feats, pre_logits=True)
        h, w = model.grid_size
        assert feats.shape == (1, h * w, model.num_features)
        assert pre.shape == (1, model.head_hidden_size)
        model.reset_classifier(0)
        assert model.num_classes == 0
        pooled = model(x)
        assert pooled.shape == pre.shape
        torch.testing.assert_close(pooled, pre)
        model.reset_classifier(0, '')
        assert model(x).shape == (1, h * w, model.num_features)
    model = timm.create_model(model_name, num_classes=0).eval()
    with torch.no_grad():
        assert model(x).shape == (1, model.num_features)
    state_dict = model.state_dict()
    assert cfg['first_conv'] + '.weight' in state_dict
    assert cfg['classifier'] == 'head'
    assert timm.create_model(model_name).head.weight.shape == (cfg['num_classes'], model.num_features)


@pytest.mark.parametrize('model_name', MODELS)
def test_model_forward_intermediates(model_name):
    """Every feature has the channels/stride of feature_info, the final output equals forward_features,
    and stop_early / a subset of indices give the same features."""
    torch.manual_seed(0)
    model = timm.create_model(model_name).eval()
    x = torch.randn(1, *_input_size(model))
    H, W = x.shape[-2:]
    with torch.no_grad():
        final, inter = model.forward_intermediates(x)
        # pixels, one feature per ViT block, and (hierarchical models) the groups last
        assert len(inter) == len(model.feature_info) == 1 + sum(model.depths) + (model.grouping is not None)
        for info, feat in zip(model.feature_info, inter):
            assert feat.shape == (1, info['num_chs'], H // info['reduction'], W // info['reduction'])
        reductions = [info['reduction'] for info in model.feature_info]
        assert reductions == sorted(reductions)  # what timm's feature wrappers require
        torch.testing.assert_close(final, model.forward_features(x))
        sub = model.forward_intermediates(x, indices=[0, 2, 5], stop_early=True, intermediates_only=True)
        for got, idx in zip(sub, [0, 2, 5]):
            torch.testing.assert_close(got, inter[idx])
        last_block = sum(model.depths)  # the feature index of the last ViT block
        nlc = model.forward_intermediates(x, indices=[last_block], output_fmt='NLC', intermediates_only=True)[0]
        torch.testing.assert_close(nlc, final)  # the last block's output is the final token map
        model.set_grad_checkpointing()
        final3, _ = model.forward_intermediates(x)
    torch.testing.assert_close(final, final3, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize('model_name', MODELS)
def test_model_features_only(model_name):
    """features_only=True (timm's FeatureGetterNet over forward_intermediates) matches the full model."""
    torch.manual_seed(0)
    full = timm.create_model(model_name).eval()
    out_indices = (0, 2, len(full.feature_info) - 1)
    feat_model = timm.create_model(model_name, features_only=True, out_indices=out_indices).eval()
    # FeatureGetterNet holds the (pruned) model as `.model`; the head is pruned away.
    missing, _ = feat_model.load_state_dict({'model.' + k: v for k, v in full.state_dict().items()}, strict=False)
    assert not missing
    assert feat_model.feature_info.channels() == [full.feature_info[i]['num_chs'] for i in out_indices]
    assert feat_model.feature_info.reduction() == [full.feature_info[i]['reduction'] for i in out_indices]
    x = torch.randn(1, *_input_size(full))
    with torch.no_grad():
        feats = feat_model(x)
        _, inter = full.forward_intermediates(x)
    assert len(feats) == len(out_indices)
    for got, i in zip(feats, out_indices):
        torch.testing.assert_close(got, inter[i])


@pytest.mark.parametrize('model_name', MODELS)
def test_model_forward_fx(model_name):
    """FX feature extraction traces the model (SCA layers as registered leaf modules)."""
    model = timm.create_model(model_name).eval()
    x = torch.randn(1, *_input_size(model))
    train_nodes, eval_nodes = get_graph_node_names(model, tracer_kwargs=_fx_tracer_kwargs())
    last = f'stages.{len(model.depths) - 1}.blocks.{model.depths[-1] - 1}'
    assert any(n.startswith(last) for n in eval_nodes)
    fx_model = create_feature_extractor(model, return_nodes=[eval_nodes[-1]], tracer_kwargs=_fx_tracer_kwargs())
    with torch.no_grad():
        assert torch.equal(next(iter(fx_model(x).values())), model(x))


def test_model_backward_fx():
    model = timm.create_model('spformer_tiny_sp16_224', num_classes=42).train()
    train_nodes, eval_nodes = get_graph_node_names(model, tracer_kwargs=_fx_tracer_kwargs())
    fx_model = create_feature_extractor(
        model, train_return_nodes=[train_nodes[-1]], eval_return_nodes=[eval_nodes[-1]],
        tracer_kwargs=_fx_tracer_kwargs()).train()
    out = next(iter(fx_model(torch.randn(2, 3, 224, 224)).values()))
    assert out.shape == (2, 42)
    out.mean().backward()
    assert all(p.grad is not None for p in fx_model.parameters())


@pytest.mark.parametrize('model_name', sorted(EXPECTED_PARAMS))
def test_param_counts_match_design(model_name):
    model = timm.create_model(model_name)
    n = sum(p.numel() for p in model.parameters())
    assert abs(n / EXPECTED_PARAMS[model_name] - 1) < 0.03, f'{n} params vs {EXPECTED_PARAMS[model_name]}'


def test_param_formula_matches_the_authors():
    """The formula that gives the hierarchical models' counts reproduces the author's measured counts."""
    assert spformer_params(32, 192, (2, 10)) == pytest.approx(EXPECTED_PARAMS['spformer_tiny_sp16_224'], rel=1e-3)
    assert spformer_params(64, 384, (2, 10)) == pytest.approx(EXPECTED_PARAMS['spformer_small_sp16_224'], rel=1e-4)
    assert spformer_params(96, 768, (2, 10)) == pytest.approx(EXPECTED_PARAMS['spformer_base_sp16_224'], rel=1e-4)
    # S/56, exactly: its stem is three 3x3 convs (with one 8x8 conv it was 11,280 below the authors' count).
    assert spformer_params(64, 384, (2, 10), stem_stride=8, cell=7, stem_layers=SP56_STEM) == AUTHORS_SP56_PARAMS
    assert AUTHORS_SP56_PARAMS - spformer_params(64, 384, (2, 10), stem_stride=8, cell=7) == 11_280


@pytest.mark.parametrize('model_name', MODELS)
def test_exact_param_counts(model_name):
    """S/56 has the authors' exact count; every other variant keeps its count."""
    model = timm.create_model(model_name, device='meta')
    assert sum(p.numel() for p in model.parameters()) == EXACT_PARAMS[model_name]


@pytest.mark.parametrize('model_name', sorted(HIER_PARAMS))
def test_hier_param_counts_match_formula(model_name):
    model = timm.create_model(model_name)
    assert sum(p.numel() for p in model.parameters()) == HIER_PARAMS[model_name]


@pytest.mark.parametrize('model_name', sorted(PAPER_GFLOPS))
def test_flops_match_paper(model_name):
    """GMACs (= flops / 2 from torch.utils.flop_counter, math attention so it is counted) against the
    paper's GFLOPs, the way docs/design.md reports them: within 10% for the 196-token models. The SCA here
    never materializes the pixel q|k|v (docs/design.md §1.5), so it executes fewer MACs than the paper's
    structure for the same function; on the coarse grids that projection is a larger share (20% of
    S/56), hence the looser lower bound there."""
    from spformer.demo import count_macs  # the counting the README table and the demo use
    model = timm.create_model(model_name).eval()
    gmacs = count_macs(model, torch.randn(1, *_input_size(model)))[0] / 1e9
    low, high = PAPER_GFLOPS[model_name]
    lower = 0.9 if model.grid_size == (14, 14) else 0.75
    assert lower * low <= gmacs <= 1.1 * high, f'{gmacs:.3f} GMACs vs paper {low}-{high}'


# --- the stem: one patchify conv, or S/56's three 3x3 stride-2 convs with TensorFlow 'same' padding ------

def _reference_stem(pads, channels=(3, 16, 32, 64), symmetric=False):
    """S/56's stem written out with torch layers: per conv an explicit zero pad (left, right, top, bottom),
    a 3x3 stride-2 conv without bias, BatchNorm (eps 1e-5), ReLU. ``symmetric``: PyTorch's padding=1
    instead (what TF-same is not), to show the comparison tells them apart."""
    layers = []
    for pad, cin, cout in zip(pads, channels[:-1], channels[1:]):
        layers += [torch.nn.Identity() if symmetric else torch.nn.ZeroPad2d(pad),
                   torch.nn.Conv2d(cin, cout, 3, stride=2, padding=1 if symmetric else 0, bias=False),
                   torch.nn.BatchNorm2d(cout), torch.nn.ReLU()]
    ref = torch.nn.Sequential(*layers).double()
    torch.manual_seed(0)
    with torch.no_grad():  # every tensor off its init, so that a BatchNorm or a conv mixed up would show
        for m in ref.modules():
            if isinstance(m, torch.nn.Conv2d):
                m.weight.normal_(0, 0.3)
            elif isinstance(m, torch.nn.BatchNorm2d):
                m.weight.normal_(1, 0.2), m.bias.normal_(0, 0.2)
                m.running_mean.normal_(0, 0.5), m.running_var.uniform_(0.5, 2)
    return ref


def _authors_layout(ref):
    """The reference stem's tensors as a state dict laid out like the authors' S/56 stem: three convs, each
    followed by its BatchNorm (stem.conv1, stem.bn1, stem.conv2, ...)."""
    convs = [m for m in ref if isinstance(m, torch.nn.Conv2d)]
    norms = [m for m in ref if isinstance(m, torch.nn.BatchNorm2d)]
    out = {}
    for i, (conv, norm) in enumerate(zip(convs, norms), 1):
        out[f'stem.conv{i}.weight'] = conv.weight.detach().clone()
        out.update({f'stem.bn{i}.{k}': v.clone() for k, v in norm.state_dict().items()})
    return out


EVEN = (0, 1, 0, 1)  # TF 'same' for a 3x3 stride-2 conv on even sides: 0 before, 1 after


@pytest.mark.parametrize('size, pads', [
    ((224, 224), [EVEN] * 3),  # 224 -> 112 -> 56 -> 28
    ((280, 168), [EVEN] * 3),  # non-square, a size dynamic_img_size takes
    # odd sides pad 1 before and 1 after: H 225 -> 113 -> 57 -> 29, W 226 (even) -> 113 (odd) -> 57 -> 29
    ((225, 226), [(0, 1, 1, 1), (1, 1, 1, 1), (1, 1, 1, 1)]),
])
def test_sp56_stem_is_three_tf_same_convs(size, pads):
    """S/56's stem equals three 3x3 stride-2 torch convs (+ BatchNorm + ReLU) with the zero padding TF's 'same'
    gives, written out by hand, in float64, eval and train mode; PyTorch's symmetric padding=1 does not."""
    model = timm.create_model('spformer_small_sp56_224', dynamic_img_size=True).double()
    assert model.stem_stride == 8
    ref = _reference_stem(pads)
    model.load_state_dict(_authors_layout(ref), strict=False)
    torch.manual_seed(1)
    x = torch.randn(2, 3, *size, dtype=torch.float64)
    with torch.no_grad():
        for mode in (False, True):
            model.train(mode), ref.train(mode)
            want = ref(x)
            assert want.shape == (2, 64, -(-size[0] // 8), -(-size[1] // 8))
            torch.testing.assert_close(model.stem(x), want, rtol=1e-12, atol=1e-12)
        if size[0] % 56 == 0 and size[1] % 56 == 0:  # the model's own path: channels-last pixels
            model.eval(), ref.eval()
            torch.testing.assert_close(model._stem(x)[0], ref(x).permute(0, 2, 3, 1), rtol=1e-12, atol=1e-12)
        if pads[0] == EVEN:
            symmetric = _reference_stem(pads, symmetric=True).eval()
            assert symmetric(x).shape == want.shape and not torch.allclose(model.eval().stem(x), symmetric(x))


def test_sp56_loads_the_authors_stem_layout(tmp_path):
    """A checkpoint whose stem is laid out like the authors' (three convs, each followed by its BatchNorm) loads
    through timm's pretrained path, and the model's pixels are the hand-built stem's output; a checkpoint with
    S/56's earlier stem (one 8x8 conv) is refused, saying how to build that stem."""
    from safetensors.torch import save_file
    ref = _reference_stem([EVEN] * 3).float().eval()
    state = {k: v for k, v in timm.create_model('spformer_small_sp56_224').state_dict().items()
             if not k.startswith('stem.')}
    state.update(_authors_layout(ref))
    path = tmp_path / 'authors.safetensors'
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    model = timm.create_model('spformer_small_sp56_224', pretrained=True,
                              pretrained_cfg_overlay=dict(file=str(path))).eval()
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(model._stem(x)[0], ref(x).permute(0, 2, 3, 1), rtol=1e-5, atol=1e-5)

    old = tmp_path / 'old.safetensors'
    save_file(timm.create_model('spformer_small_sp56_224', stem_layers=((64, 8, 8),)).state_dict(), str(old))
    with pytest.raises(ValueError, match=r'stem\.conv1\.weight: missing.*stem\.bn\.\w+: not in the model.*'
                                         r'Its stem is one patchify conv, stem_layers=\(\(64, 8, 8\),\)'):
        timm.create_model('spformer_small_sp56_224', pretrained=True, pretrained_cfg_overlay=dict(file=str(old)))
    loaded = timm.create_model('spformer_small_sp56_224', stem_layers=((64, 8, 8),), pretrained=True,
                               pretrained_cfg_overlay=dict(file=str(old)))
    assert loaded.stem.conv.weight.shape == (64, 3, 8, 8)


@pytest.mark.parametrize('model_name', MODELS)
def test_stem_layout_and_first_conv(model_name):
    """S/56's stem is conv1/bn1/act1 ... conv3 (3 -> 16 -> 32 -> 64), every other stem one patchify conv with
    the names its checkpoints have (stem.conv, stem.bn) and no padding copy (a plain nn.Conv2d); the cfg's
    first_conv names the stem's first conv (timm adapts it for in_chans != 3)."""
    model = timm.create_model(model_name, device='meta')
    stem = {k: tuple(v.shape) for k, v in model.state_dict().items() if k.startswith('stem.') and v.dim() > 1}
    if '_sp56_' in model_name:
        assert stem == {'stem.conv1.weight': (16, 3, 3, 3), 'stem.conv2.weight': (32, 16, 3, 3),
                        'stem.conv3.weight': (64, 32, 3, 3)}
        assert [type(m).__name__ for m in model.stem] == ['Conv2dSame', 'BatchNorm2d', 'ReLU'] * 3
    else:
        s, Cp = model.stem_stride, model.pixel_dim
        assert stem == {'stem.conv.weight': (Cp, 3, s, s)}
        assert [type(m) for m in model.stem] == [torch.nn.Conv2d, torch.nn.BatchNorm2d, torch.nn.ReLU]
    assert all(m.eps == 1e-5 for m in model.stem if isinstance(m, torch.nn.BatchNorm2d))
    first = model.pretrained_cfg['first_conv']
    assert model.get_submodule(first) is model.stem[0]
    assert first == ('stem.conv1' if '_sp56_' in model_name else 'stem.conv')
    # the model tells timm its own first conv, whatever stem_layers built it
    other = timm.create_model(model_name, device='meta', stem_layers=(
        (model.pixel_dim, model.stem_stride, model.stem_stride),) if '_sp56_' in model_name else (
        (16, 3, 2), (model.pixel_dim, model.stem_stride // 2, model.stem_stride // 2)))
    want = 'stem.conv' if '_sp56_' in model_name else 'stem.conv1'
    assert timm.models.get_model_traits(other)['first_conv'] == want


@pytest.mark.parametrize('model_name', ['spformer_tiny_sp16_224', 'spformer_small_sp56_224'])
def test_in_chans_adapts_first_conv(tmp_path, model_name):
    """pretrained=True with in_chans=1 from RGB weights: timm sums the RGB filters of the stem's first conv
    (stem.conv, or S/56's stem.conv1), and the rest loads as it is."""
    from safetensors.torch import save_file
    src = timm.create_model(model_name)
    path = tmp_path / 'w.safetensors'
    save_file(src.state_dict(), str(path))
    model = timm.create_model(model_name, pretrained=True, in_chans=1,
                              pretrained_cfg_overlay=dict(file=str(path))).eval()
    first = model.pretrained_cfg['first_conv'] + '.weight'
    got, want = model.state_dict(), src.state_dict()
    torch.testing.assert_close(got[first], want[first].sum(1, keepdim=True))
    assert all(torch.equal(got[k], v) for k, v in want.items() if k != first)
    with torch.no_grad():
        assert model(torch.randn(1, 1, 224, 224)).shape == (1, 1000)


@pytest.mark.parametrize('model_name, stem_layers, match', [
    ('spformer_small_sp56_224', ((64, 4, 4),), r'strides that multiply to stem_stride=8'),
    ('spformer_small_sp32_224', ((32, 8, 8),), r'end with pixel_dim=64 channels'),
    ('spformer_small_sp32_224', ((64, 8),), r'\(out_channels, kernel, stride\) triples'),
    ('spformer_small_sp32_224', (), r'non-empty sequence'),
])
def test_bad_stem_layers(model_name, stem_layers, match):
    with pytest.raises(ValueError, match=match):
        timm.create_model(model_name, stem_layers=stem_layers)


def test_token_grids():
    grids = {n: timm.create_model(n).grid_size for n in MODELS}
    assert grids['spformer_small_sp16_224'] == (14, 14)
    assert grids['spformer_small_sp32_224'] == (7, 7)
    assert grids['spformer_small_sp56_224'] == (4, 4)
    assert grids['spformer_small_sp32_448'] == (14, 14)


def test_dynamic_img_size():
    """dynamic_img_size=True: any multiple of the token stride, non-square; same output at the default size."""
    torch.manual_seed(0)
    fixed = timm.create_model('spformer_tiny_sp16_224').eval()
    dyn = timm.create_model('spformer_tiny_sp16_224', dynamic_img_size=True).eval()
    dyn.load_state_dict(fixed.state_dict())
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(dyn(x), fixed(x))
        feats = dyn.forward_features(torch.randn(2, 3, 160, 96))
        assert feats.shape == (2, 10 * 6, 192)
        sp = dyn.forward_superpixels(torch.randn(1, 3, 160, 96))
        assert sp[-1]['labels'].shape == (1, 160, 96) and int(sp[-1]['labels'].max()) < 60


def test_img_size_kwarg_resamples_pretrained_pos_embed(tmp_path):
    """Weights saved at 224 load into a model built for 288 (position embeddings resampled by the filter)."""
    from safetensors.torch import save_file
    src = timm.create_model('spformer_tiny_sp16_224')
    path = tmp_path / 'w.safetensors'
    save_file(src.state_dict(), str(path))
    model = timm.create_model('spformer_tiny_sp16_224', pretrained=True, img_size=288,
                              pretrained_cfg_overlay=dict(file=str(path)))
    assert model.stages[0].pos_embed.shape == (1, 18 * 18, 192)
    torch.testing.assert_close(model.stem.conv.weight, src.stem.conv.weight)


def test_safetensors_roundtrip(tmp_path):
    """A state dict saved as safetensors loads through timm's pretrained path with identical outputs."""
    from safetensors.torch import save_file
    torch.manual_seed(0)
    model = timm.create_model('spformer_tiny_sp16_224').eval()
    with torch.no_grad():  # move every tensor off its init so a silent re-init would show
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    path = tmp_path / 'model.safetensors'
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    loaded = timm.create_model('spformer_tiny_sp16_224', pretrained=True,
                               pretrained_cfg_overlay=dict(file=str(path))).eval()
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_checkpoint_filter_strips_wrappers():
    """Checkpoints from DDP / torch.compile / training scripts load (prefixes and wrappers removed)."""
    from spformer.models.spformer import checkpoint_filter_fn
    model = timm.create_model('spformer_tiny_sp16_224')
    sd = model.state_dict()
    wrapped = {'state_dict': {'module._orig_mod.' + k: v for k, v in sd.items()}}
    out = checkpoint_filter_fn(wrapped, model)
    assert out.keys() == sd.keys()


# --- bad input ------------------------------------------------------------------------------

@pytest.mark.parametrize('shape, match', [
    ((1, 3, 224, 200), r'200.*multiples of the superpixel token stride 16'),
    ((1, 1, 224, 224), r'1 channels, expected in_chans=3'),
    ((3, 224, 224), r'4-D image batch'),
    ((1, 3, 192, 192), r"img_size=\(224, 224\).*dynamic_img_size=True"),
])
def test_bad_input_shapes(shape, match):
    model = timm.create_model('spformer_tiny_sp16_224').eval()
    with pytest.raises(ValueError, match=match):
        model(torch.randn(*shape))


def test_bad_input_dynamic_size_not_multiple():
    model = timm.create_model('spformer_small_sp56_224', dynamic_img_size=True).eval()
    with pytest.raises(ValueError, match=r'multiples of the superpixel token stride 56'):
        model(torch.randn(1, 3, 224, 240))


def test_state_dict_from_other_variant(tmp_path):
    from safetensors.torch import save_file
    path = tmp_path / 'small.safetensors'
    save_file(timm.create_model('spformer_small_sp16_224').state_dict(), str(path))
    with pytest.raises(ValueError, match=r'pixel_dim=32, embed_dim=192.*another variant.*stem\.conv\.weight'):
        timm.create_model('spformer_tiny_sp16_224', pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
    with pytest.raises(RuntimeError, match=r'size mismatch for stem\.conv\.weight'):
        timm.create_model('spformer_tiny_sp16_224').load_state_dict(
            timm.create_model('spformer_small_sp16_224').state_dict())


def test_bad_constructor_args():
    with pytest.raises(ValueError, match=r'img_size=\(200, 200\) must be a multiple of the token stride 16'):
        timm.create_model('spformer_tiny_sp16_224', img_size=200)
    with pytest.raises(ValueError, match=r'sca_heads=5 must divide pixel_dim=32'):
        timm.create_model('spformer_tiny_sp16_224', sca_heads=5)


@pytest.mark.parametrize('kwargs, match', [
    (dict(attn_backend='bogus'),
     r"attn_backend must be one of \('auto', 'torch', 'cpu', 'triton', 'reference'\), got 'bogus'"),
    (dict(attn_backend='Torch'), r"attn_backend must be one of .*got 'Torch'"),
    (dict(sca_heads=0), r'sca_heads must be an int >= 1, got 0'),
    (dict(num_heads=0), r'num_heads must be an int >= 1, got 0'),
])
def test_bad_constructor_args_fail_at_construction(kwargs, match):
    """An unknown attention backend (the op family's own list, spformer.kernels.BACKENDS) or zero heads fail
    when the model is built, naming the argument, not at the first forward."""
    with pytest.raises(ValueError, match=match):
        timm.create_model('spformer_tiny_sp16_224', device='meta', **kwargs)


def _batch_shapes(out, batch=None):
    """The structure of a forward's output with every tensor replaced by (shape, dtype), the batch (first)
    dim replaced by ``batch`` if given; ``grid`` (a size, not a batch) and plain values kept as they are."""
    if isinstance(out, dict):
        return {k: v.tolist() if k == 'grid' else _batch_shapes(v, batch) for k, v in out.items()}
    if isinstance(out, (list, tuple)):
        return [_batch_shapes(v, batch) for v in out]
    if isinstance(out, torch.Tensor):
        return ((out.shape[0] if batch is None else batch, *out.shape[1:]), out.dtype)
    return out


@pytest.mark.parametrize('model_name', MODELS)
def test_empty_batch(model_name):
    """B = 0 (as timm's ViTs take it: the last, empty, batch of a sharded eval) gives empty outputs: every
    forward returns what it returns for B = 1 with the batch dim 0 (the oracle is the B = 1 run), and a
    training step runs (gradients of zeros, every parameter reached)."""
    model = _narrow(model_name, gamma=0.5)
    forwards = ['forward', 'forward_features', 'forward_intermediates', 'forward_superpixels']
    forwards += ['forward_groups'] if model.grouping else []
    one, empty = torch.randn(1, 3, *model.img_size), torch.zeros(0, 3, *model.img_size)
    with torch.no_grad():
        for name in forwards:
            want = _batch_shapes(getattr(model, name)(one), batch=0)
            assert _batch_shapes(getattr(model, name)(empty)) == want, name
    model.train()
    logits = model(empty.requires_grad_())
    assert logits.shape == (0, 5)
    logits.sum().backward()
    assert empty.grad.shape == empty.shape
    assert all(p.grad is not None and not p.grad.any() for p in model.parameters())


@pytest.mark.parametrize('dtype', [torch.uint8, torch.int8, torch.int64, torch.bool, torch.complex64,
                                   torch.float64, torch.float16, torch.bfloat16], ids=str)
def test_bad_input_dtype(dtype):
    """x must be floating point, in the model's dtype outside autocast: the error names x and its dtype (not a
    convolution's dtype error deep inside the stem)."""
    model = _narrow('spformer_tiny_sp16_224')
    x = (torch.rand(1, 3, *model.img_size) * 255).to(dtype)
    with pytest.raises(TypeError, match=rf'\bx\b.*{dtype}'):
        model(x)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        if dtype in (torch.float16, torch.bfloat16):  # autocast casts them as torch's layers do: fine
            assert model(x).shape == (1, 5)
        else:  # autocast takes no integer, bool, complex or float64 input either
            with pytest.raises(TypeError, match=rf'\bx\b.*{dtype}'):
                model(x)


@pytest.mark.parametrize('model_name, attn_backend', [
    ('spformer_tiny_sp16_224', 'auto'), ('spformer_tiny_sp16_224', 'cpu'), ('spformer_tiny_sp16_224', 'triton'),
    ('spformer_hier_small_local_sp16_224', 'auto')])
def test_meta_model_under_autocast(model_name, attn_backend):
    """A model moved to the meta device runs shape-only forwards, with and without autocast, whatever its
    attention backend (the ops run their fake implementations): meta outputs of the CPU model's shapes."""
    cpu = _narrow(model_name)
    x = torch.randn(2, 3, *cpu.img_size)
    with torch.no_grad():
        want = [_batch_shapes(f(x))[0] for f in (cpu, cpu.forward_features)]
        want.append(_batch_shapes(cpu.forward_superpixels(x)))
    model = _narrow(model_name, attn_backend=attn_backend).to('meta')
    xm = x.to('meta')
    for autocast in (False, True):
        with torch.no_grad(), torch.autocast('cpu', dtype=torch.bfloat16, enabled=autocast):
            outs = [model(xm), model.forward_features(xm)]
            superpixels = model.forward_superpixels(xm)
        assert all(t.is_meta for t in outs) and [tuple(t.shape) for t in outs] == want[:2]
        # meta tensors escape CPU autocast (it dispatches on CPU tensors only): float32 throughout
        assert _batch_shapes(superpixels) == want[2]



# --- timm's factory kwargs: device, dtype, meta builds ------------------------------------------

def _narrow(model_name, gamma=None, **kwargs):
    """The registered variant's layout (depths, strides, cells, grouping) at a small width and image
    (64 px, 112 for the 56-px token stride), to build many times fast; LayerScales set to ``gamma``
    (their 1e-5 init would hide whether the SCA and pixel updates are there)."""
    img = 112 if '_sp56_' in model_name else 64
    model = timm.create_model(model_name, img_size=img, pixel_dim=16, embed_dim=32, num_heads=2, sca_heads=2,
                              num_classes=5, **kwargs)
    return fill_layer_scales(model, gamma).eval()


def fill_layer_scales(model, gamma):
    """Every LayerScale set to ``gamma`` (None: left at its init); the model, for chaining."""
    if gamma is not None:
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith('.gamma'):
                    p.fill_(gamma)
    return model


@pytest.mark.parametrize('model_name', MODELS)
def test_meta_device_builds(model_name):
    """create_model(device='meta') and `with torch.device('meta')` build the full model without
    storage: every parameter and buffer on meta, the parameter count of the formula of docs/design.md, a CPU
    build's tensor names/shapes/dtypes, and shape-only forwards; reset_classifier follows the model."""
    full = timm.create_model(model_name, device='meta')
    assert all(t.is_meta for t in full.state_dict().values())
    n = sum(p.numel() for p in full.parameters())
    assert n == spformer_params(full.pixel_dim, full.embed_dim, full.depths, full.stem_stride, full.cell_size,
                                full.img_size[0], grouping=full.grouping, group_depth=full.group_depth or 1,
                                stem_layers=SP56_STEM if '_sp56_' in model_name else None)

    cpu = _narrow(model_name)
    want = {k: (v.shape, v.dtype) for k, v in cpu.state_dict().items()}
    x = torch.randn(2, 3, *cpu.img_size)
    with torch.no_grad():
        want_out = [t.shape for t in (cpu.forward_features(x), cpu(x))]
    with torch.device('meta'):
        in_context = _narrow(model_name)
    for model in (_narrow(model_name, device='meta'), in_context):
        tensors = model.state_dict()
        assert {k: (v.shape, v.dtype) for k, v in tensors.items()} == want
        assert all(t.is_meta for t in tensors.values()), [k for k, t in tensors.items() if not t.is_meta][:5]
        xm = x.to('meta')
        assert [t.shape for t in (model.forward_features(xm), model(xm))] == want_out
        model.to(torch.float64)
        model.reset_classifier(3)
        assert model.head.weight.is_meta and model.head.weight.dtype == torch.float64
        assert not model.head.training  # the model is in eval mode


@pytest.mark.parametrize('model_name', MODELS)
def test_float64_build(model_name):
    """dtype=torch.float64 builds float64 parameters and buffers, initialized as the float32 build
    (the same constants; random weights of the same scale), and computes the float32 model's function:
    with the float32 model's weights loaded, its float64 output is the float32 output within float32
    rounding, and is float64 (no silent float32 path)."""
    torch.manual_seed(0)
    m32 = _narrow(model_name)
    m64 = _narrow(model_name, dtype=torch.float64)
    floating = {k: v for k, v in m64.state_dict().items() if v.is_floating_point()}
    assert floating and all(v.dtype == torch.float64 for v in floating.values())
    for name, t32 in m32.state_dict().items():
        if not t32.is_floating_point():
            continue
        t64 = floating[name]
        if t32.numel() > 1 and bool((t32 == t32.flatten()[0]).all()):  # a constant init: ones, zeros, 1e-5
            torch.testing.assert_close(t64, t32.double(), msg=name)
        elif t32.numel() >= 256:  # a random init: same scale
            assert 0.7 < float(t64.std()) / float(t32.std()) < 1.4, name
    m64.load_state_dict(m32.state_dict())
    for m in (m32, m64):  # LayerScales of 0.5: the SCA and pixel updates count in the output
        with torch.no_grad():
            for name, p in m.named_parameters():
                if name.endswith('.gamma'):
                    p.fill_(0.5)
    x = torch.randn(2, 3, *m32.img_size)
    with torch.no_grad():
        out32, out64 = m32(x), m64(x.double())
    assert out64.dtype == torch.float64
    torch.testing.assert_close(out64, out32.double(), rtol=1e-4, atol=1e-4 * float(out32.abs().max()))


def test_bad_dtype():
    with pytest.raises(ValueError, match=r'dtype must be a floating point torch.dtype.*torch.int64'):
        timm.create_model('spformer_tiny_sp16_224', dtype=torch.int64, device='meta')


# --- prune_intermediate_layers ------------------------------------------------------------------

@pytest.mark.parametrize('model_name', MODELS)
def test_prune_intermediate_layers_keeps_only_what_the_features_read(model_name):
    """After pruning to a set of feature indices (each one, and a few pairs), the wanted intermediates
    equal the unpruned model's, and every parameter left receives a gradient from them alone (from
    forward_features too when the last index is wanted: it keeps the whole trunk, timm's contract,
    and the hierarchical models' last index, the groups, comes before their last blocks). Random
    weights on the features, so that no gradient cancels (a LayerNorm'd sum has none)."""
    model = _narrow(model_name, gamma=0.5)
    x = torch.randn(2, 3, *model.img_size)
    n = len(model.feature_info)
    with torch.no_grad():
        taps = model.forward_intermediates(x, intermediates_only=True)
        logits = model(x)
    g = torch.Generator().manual_seed(0)
    for indices in [[i] for i in range(n)] + [[0, 1], [0, n - 2], [1, n - 1], [0, n - 1]]:
        pruned = copy.deepcopy(model)
        take = pruned.prune_intermediate_layers(indices, prune_norm=True)
        assert sorted(take) == indices
        feats = pruned.forward_intermediates(x, indices=take, intermediates_only=True)
        assert len(feats) == len(indices)
        for got, i in zip(feats, take):
            torch.testing.assert_close(got, taps[i], msg=f'feature {i} pruned to {indices}')
        outputs = feats + ([pruned.forward_features(x)] if n - 1 in indices else [])
        sum((f * torch.randn(f.shape, generator=g)).sum() for f in outputs).backward()
        unused = [k for k, p in pruned.named_parameters() if p.grad is None or not p.grad.any()]
        assert not unused, f'pruned to {indices}, parameters the features do not read: {unused}'
    pruned = copy.deepcopy(model)
    pruned.prune_intermediate_layers([n - 1], prune_head=False)
    with torch.no_grad():
        torch.testing.assert_close(pruned(x), logits)


# --- optimizer integration --------------------------------------------------------------------

def test_layer_decay_groups_follow_depth():
    from timm.optim import create_optimizer_v2
    from timm.optim._param_groups import param_groups_layer_decay
    model = timm.create_model('spformer_tiny_sp16_224')
    groups = param_groups_layer_decay(model, weight_decay=0.05, layer_decay=0.5, no_weight_decay_list=model.no_weight_decay())
    layer_of = {}
    for g in groups:
        for p in g['params']:
            layer_of[id(p)] = g['lr_scale']
    named = dict(model.named_parameters())
    scale = lambda n: layer_of[id(named[n])]  # noqa: E731
    # Stem, superpixel init and stage-1 SCA share the first (most decayed) group ...
    assert scale('stem.conv.weight') == scale('sp_init.proj.weight') == scale('stages.0.sca.0.sp_qkv.weight')
    # ... then blocks in order, stage 2's SCA between stage 1's last block and stage 2's first block.
    order = ['stem.conv.weight', 'stages.0.blocks.0.attn.qkv.weight', 'stages.0.blocks.1.attn.qkv.weight',
             'stages.1.sca.0.sp_qkv.weight', 'stages.1.blocks.0.attn.qkv.weight',
             'stages.1.blocks.9.attn.qkv.weight', 'head.weight']
    scales = [scale(n) for n in order]
    assert scales == sorted(scales) and len(set(scales)) == len(scales)
    assert scale('head.weight') == 1.0
    assert scale('stages.0.unfold.proj.weight') == scale('stages.0.blocks.1.attn.qkv.weight')
    opt = create_optimizer_v2(model, 'adamw', lr=1e-3, weight_decay=0.05, layer_decay=0.65)
    no_decay = {id(p) for g in opt.param_groups if g['weight_decay'] == 0 for p in g['params']}
    assert id(named['stages.0.pos_embed']) in no_decay and id(named['stages.1.pos_embed']) in no_decay
    assert id(named['stages.0.sca.0.sp_ls.gamma']) in no_decay
    assert id(named['stages.0.blocks.0.attn.qkv.weight']) not in no_decay


# --- the SCA layer against a naive re-implementation of docs/design.md §1.3 --------------------------

def _naive_sca(layer: SuperpixelCrossAttention, pixels, superpixels):
    """docs/design.md §1.3 written out densely on one layer's weights: the whole-model oracle's SCA iteration
    (test_model_oracle.sca_iteration: the direct q|k|v, an (HW x hw) logit matrix per head with a 3x3-cell
    mask). Channels-last in and out; also returns the per-head association logits (B, M, H*W, h*w), -inf
    outside the 3x3 cells. The layer's parameters themselves go in, so gradients reach them."""
    B, H, W, Cp = pixels.shape
    _, h, w, C = superpixels.shape
    params = {f'sca.{k}': v for k, v in layer.state_dict(keep_vars=True).items()}
    P, S, logits = sca_iteration(params, 'sca', pixels.reshape(B, H * W, Cp), superpixels.reshape(B, h * w, C),
                                 (H, W), layer.cell_size, layer.num_heads, layer.pixel_ls is not None)
    return P.reshape(B, H, W, Cp), S.reshape(B, h, w, C), logits


def _randomized_sca(update_pixels, cell, heads=2, Cp=8, C=12):
    torch.manual_seed(1)
    layer = SuperpixelCrossAttention(Cp, C, heads, cell, update_pixels=update_pixels, attn_backend='torch').double()
    with torch.no_grad():  # LayerScales of 1e-5 would hide wiring mistakes; norms get random affines
        for p in layer.parameters():
            p.copy_(torch.randn_like(p) * 0.5)
    return layer


@pytest.mark.parametrize('grid, cell, update_pixels, heads', [
    ((3, 5), 4, True, 2), ((1, 4), 3, True, 1), ((4, 1), 2, False, 2), ((2, 3), 7, True, 2), ((3, 3), 4, False, 1),
])
def test_sca_layer_matches_naive(grid, cell, update_pixels, heads):
    layer = _randomized_sca(update_pixels, cell, heads)
    h, w = grid
    pixels = torch.randn(2, h * cell, w * cell, 8, dtype=torch.float64)
    superpixels = torch.randn(2, h, w, 12, dtype=torch.float64)
    P, S, _ = layer(pixels, superpixels)
    P_ref, S_ref, _ = _naive_sca(layer, pixels, superpixels)
    torch.testing.assert_close(S, S_ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(P, P_ref, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize('backend', ['torch', 'cpu', 'reference'])
def test_sca_layer_gradcheck(backend):
    layer = _randomized_sca(True, cell=2, heads=2)
    layer.attn_backend = backend
    pixels = torch.randn(1, 4, 6, 8, dtype=torch.float64, requires_grad=True)
    superpixels = torch.randn(1, 2, 3, 12, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda p, s: layer(p, s)[:2], (pixels, superpixels), eps=1e-6, atol=1e-5)


def test_sca_layer_parameter_gradients_match_naive():
    """Gradients of every SCA parameter equal those of the naive (direct q|k|v) formulation."""
    layer = _randomized_sca(True, cell=3, heads=2)
    pixels = torch.randn(2, 6, 9, 8, dtype=torch.float64)
    superpixels = torch.randn(2, 2, 3, 12, dtype=torch.float64)
    w_p, w_s = torch.randn(2, 6, 9, 8, dtype=torch.float64), torch.randn(2, 2, 3, 12, dtype=torch.float64)
    P, S, _ = layer(pixels, superpixels)
    ((P * w_p).sum() + (S * w_s).sum()).backward()
    fast = {n: p.grad.clone() for n, p in layer.named_parameters()}
    layer.zero_grad()
    P, S, _ = _naive_sca(layer, pixels, superpixels)
    ((P * w_p).sum() + (S * w_s).sum()).backward()
    for n, p in layer.named_parameters():
        torch.testing.assert_close(fast[n], p.grad, rtol=1e-9, atol=1e-10, msg=n)


@pytest.mark.parametrize('c_kernel', [True, False], ids=['C forward', 'chunked forward'])
@pytest.mark.parametrize('grid,cell,chunk_bytes', [((2, 3), 4, 1 << 20), ((3, 1), 7, 1), ((1, 1), 4, 1)])
def test_superpixel_init_chunked_matches_autograd(grid, cell, chunk_bytes, c_kernel, monkeypatch):
    """The chunked CPU superpixel init (forward and hand-written backward) equals the plain
    Linear -> LayerNorm -> GELU -> avg_pool computed by autograd, in float64, including a chunk size
    (one cell row) that leaves a remainder; its forward runs the C kernel where one is built, and
    the chunked torch ops without it."""
    from spformer.models import spformer as spf
    if not c_kernel:
        monkeypatch.setattr(spf.cpu_backend, 'cell_pooled_projection', lambda *args: None)
    torch.manual_seed(0)
    init = spf.SuperpixelInit(8, 12, cell).double()
    for p in init.parameters():
        p.data.normal_()
    pixels = torch.randn(3, grid[0] * cell, grid[1] * cell, 8, dtype=torch.float64, requires_grad=True)
    weights = torch.randn(3, *grid, 12, dtype=torch.float64)
    # 1 byte forces chunks of one cell row (3 * grid[0] rows, not a multiple of 2)
    monkeypatch.setattr(spf.SuperpixelInit, '_chunk_bytes', chunk_bytes)
    assert init._chunked(pixels)
    out = init(pixels)
    (out * weights).sum().backward()
    fast = [pixels.grad] + [p.grad for p in init.parameters()]
    ref_pixels = pixels.detach().clone().requires_grad_()
    init.zero_grad()
    x = F.gelu(F.layer_norm(ref_pixels @ init.proj.weight.t(), (12,), init.norm.weight, init.norm.bias, 1e-6))
    ref = F.avg_pool2d(x.permute(0, 3, 1, 2), cell).permute(0, 2, 3, 1)
    (ref * weights).sum().backward()
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    for name, a, b in zip(['pixels', 'proj.weight', 'norm.weight', 'norm.bias'], fast,
                          [ref_pixels.grad] + [p.grad for p in init.parameters()]):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10, msg=name)


@pytest.mark.parametrize('backend', ['torch', 'cpu'])
@pytest.mark.parametrize('model_name', ['spformer_tiny_sp16_224', 'spformer_small_sp56_224'])
def test_model_backends_agree(model_name, backend):
    """The whole model with the cell-major torch backend, and with the fused C kernels, equals the
    dense reference backend."""
    from spformer.kernels import cpu_backend
    if backend == 'cpu' and not cpu_backend.available():
        pytest.skip(f'no C compiler: {cpu_backend.unavailable_reason()}')
    torch.manual_seed(0)
    model = timm.create_model(model_name, attn_backend=backend).double().eval()
    ref = timm.create_model(model_name, attn_backend='reference').double().eval()
    ref.load_state_dict(model.state_dict())
    x = torch.randn(1, 3, 224, 224, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref(x), rtol=1e-9, atol=1e-9)


def test_cpu_inference_runs_fused_kernels(monkeypatch):
    """CPU inference (no autograd recorded) computes every SCA iteration's pixel features and the
    superpixel init in the one-pass C kernels; with autograd recording the SCA takes the
    differentiable ops, and both agree."""
    from spformer.kernels import cpu_backend
    from spformer.models.spformer import SuperpixelCrossAttention
    if not cpu_backend.available():
        pytest.skip(f'no C compiler: {cpu_backend.unavailable_reason()}')
    calls = []
    for name in ('conv_rescale', 'cell_pooled_projection'):
        kernel = getattr(cpu_backend, name)
        monkeypatch.setattr(cpu_backend, name,
                            lambda *args, name=name, kernel=kernel: calls.append(name) or kernel(*args))
    torch.manual_seed(0)
    model = timm.create_model('spformer_tiny_sp16_224', img_size=64).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        fused = model(x)
    scas = sum(isinstance(m, SuperpixelCrossAttention) for m in model.modules())
    assert sorted(calls) == ['cell_pooled_projection'] + ['conv_rescale'] * scas
    calls.clear()
    plain = model(x)
    # the init's autograd Function runs the C kernel as its forward (its backward needs only the input)
    assert calls == ['cell_pooled_projection']
    calls.clear()
    torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-5)
    # neither for the torch backend (pure PyTorch) nor under CPU autocast (bf16 matmuls)
    torch_backend_model = timm.create_model('spformer_tiny_sp16_224', img_size=64, attn_backend='torch').eval()
    torch_backend_model.load_state_dict(model.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(torch_backend_model(x), plain, rtol=1e-5, atol=1e-5)
        with torch.autocast('cpu', dtype=torch.bfloat16):
            model(x)
    assert not calls


# --- superpixels as an output ------------------------------------------------------------------

def test_forward_superpixels_consistent():
    """Association shapes, normalization, border exclusion, and labels = argmax of the merged
    association computed independently from the dense head-merged logits."""
    torch.manual_seed(0)
    model = timm.create_model('spformer_tiny_sp16_224', img_size=96).eval()
    with torch.no_grad():  # make associations non-trivial
        for stage in model.stages:
            for sca in stage.sca:
                sca.sp_ls.gamma.fill_(0.5)
                if sca.pixel_ls is not None:
                    sca.pixel_ls.gamma.fill_(0.5)
    x = torch.randn(2, 3, 96, 96)
    captured = []
    hook = model.stages[-1].sca[-1].register_forward_hook(lambda m, i, o: captured.append(i))
    with torch.no_grad():  # the stride-4 argmax, repeated (tests/test_association_labels.py: the default)
        outs = model.forward_superpixels(x, label_upsampling='repeat')
    hook.remove()
    assert len(outs) == len(model.stages)
    h, w = model.grid_size
    Hp, Wp = 96 // model.stem_stride, 96 // model.stem_stride
    last = outs[-1]
    assert last['association'].shape == (2, model.sca_heads, 9, Hp, Wp)
    assert last['association_merged'].shape == (2, 9, Hp, Wp)
    assert last['labels'].shape == (2, 96, 96) and last['labels'].dtype == torch.int64
    torch.testing.assert_close(last['association'].sum(2), torch.ones(2, model.sca_heads, Hp, Wp))
    assert (last['association_merged'][:, 0, :4] == 0).all()  # top-left neighbour of the top cell row
    assert (last['association_merged'][:, 8, -4:] == 0).all()  # bottom-right of the bottom row

    # Independent oracle: the naive SCA's dense per-head logits (masked to the 3x3 cells), head-merged as
    # sum_m a_m / sqrt(M), softmax, argmax.
    with torch.no_grad():
        _, _, logits = _naive_sca(model.stages[-1].sca[-1], *captured[-1])
    probs = (logits.sum(1) / math.sqrt(logits.shape[1])).softmax(-1)
    expected = probs.argmax(-1).reshape(2, Hp, Wp)
    expected = expected.repeat_interleave(4, 1).repeat_interleave(4, 2)
    assert (last['labels'] == expected).float().mean() > 0.999  # argmax ties aside
    # The merged association holds the same probabilities as the dense softmax.
    torch.testing.assert_close(last['association_merged'].amax(1).reshape(2, -1), probs.amax(-1), rtol=1e-5, atol=1e-6)
    assert int(last['labels'].max()) < h * w and int(last['labels'].min()) >= 0


def test_model_triton_backend_matches_torch(triton_device):
    """The whole model with the fused Triton kernels (under TRITON_INTERPRET=1 on CPU, see conftest;
    compiled, on CUDA, under .ci/gpu) equals the torch backend, forward and backward."""
    pytest.importorskip('triton', reason='the triton package is not installed (Linux only)')
    torch.manual_seed(0)
    model = timm.create_model('spformer_tiny_sp16_224', img_size=32, num_classes=10, attn_backend='torch')
    fused = timm.create_model('spformer_tiny_sp16_224', img_size=32, num_classes=10, attn_backend='triton')
    fused.load_state_dict(model.state_dict())
    model, fused = model.to(triton_device), fused.to(triton_device)
    with torch.no_grad():  # LayerScales of 1e-5 would hide the SCA's contribution
        for m in (model, fused):
            for name, p in m.named_parameters():
                if name.endswith('.gamma'):
                    p.fill_(0.5)
    x = torch.randn(2, 3, 32, 32, device=triton_device)
    with torch.no_grad():  # inference: the init and the rescaling run fused too (kernels/pixel_maps_triton.py)
        torch.testing.assert_close(fused(x), model(x), rtol=1e-4, atol=1e-5)
    out, out_fused = model(x), fused(x)
    torch.testing.assert_close(out_fused, out, rtol=1e-4, atol=1e-5)
    out.square().sum().backward()
    out_fused.square().sum().backward()
    grads = dict(model.named_parameters())
    for name, p in fused.named_parameters():
        torch.testing.assert_close(p.grad, grads[name].grad, rtol=1e-3, atol=1e-5, msg=name)


@pytest.mark.parametrize('autocast', [False, True], ids=['fp32', 'bf16-autocast'])
@pytest.mark.parametrize('cell, grid', [(4, (3, 2)), (7, (1, 2))])
def test_superpixel_init_fused_triton_matches_unfused(triton_device, cell, grid, autocast):
    """Inference on the Triton backend runs the superpixel init as one fused kernel (projection,
    LayerNorm, GELU, cell mean; kernels/pixel_maps_triton.py): equal to the unfused torch ops, in fp32
    and under bf16 autocast (where those round the projection to bf16), on a non-power-of-two width
    (48 of 64 lanes) and cells of 4 and 7 (16 and 49 of 64 pixel lanes)."""
    pytest.importorskip('triton', reason='the triton package is not installed (Linux only)')
    import spformer.models.spformer as spf
    torch.manual_seed(0)
    init = spf.SuperpixelInit(12, 48, cell, attn_backend='triton').to(triton_device).eval()
    with torch.no_grad():
        init.norm.weight.normal_(1.0, 0.5)
        init.norm.bias.normal_(0.0, 0.5)
    x = torch.randn(2, grid[0] * cell, grid[1] * cell, 12, device=triton_device)
    ctx = torch.autocast(triton_device.type, dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
    with torch.no_grad(), ctx:
        got = init._fused_forward(x)  # what forward returns here
        assert got is not None
        torch.testing.assert_close(init(x), got, rtol=0, atol=0)
        want = init._pooled(x)
    assert got.shape == (2, *grid, 48) and got.dtype == torch.float32
    tol = dict(rtol=2e-2, atol=2e-2) if autocast else dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got, want.float(), **tol)
    assert init._fused_forward(x) is None  # autograd records (the weights need gradients): the unfused path


@pytest.mark.parametrize('out_dtype', [torch.float32, torch.bfloat16], ids=['fp32', 'bf16'])
def test_fused_rescale_rows_matches_expression(triton_device, out_dtype):
    """The SCA's pixel rescaling as one Triton pass (inference on the Triton backend) equals
    x (x^T G x + eps)^-1/2 computed in fp64, for 150 rows (not a multiple of the 64-row block) of
    48 channels (not a power of two), written in fp32 or in the autocast dtype the ops then read."""
    pytest.importorskip('triton', reason='the triton package is not installed (Linux only)')
    from spformer.kernels import pixel_maps_triton
    from spformer.models.spformer import centred_projection
    torch.manual_seed(0)
    x = torch.randn(2, 5, 15, 48, device=triton_device)
    wc, gram = centred_projection(torch.randn(100, 48, device=triton_device))
    x64, g64 = x.double(), gram.double()
    want = x64 * ((x64 @ g64) * x64).sum(-1, keepdim=True).add(1e-6).rsqrt()
    got = pixel_maps_triton.rescale_rows(x, gram, 1e-6, out_dtype)
    assert got.dtype == out_dtype and got.shape == x.shape
    tol = dict(rtol=1e-5, atol=1e-6) if out_dtype == torch.float32 else dict(rtol=8e-3, atol=1e-3)
    torch.testing.assert_close(got.double(), want, **tol)


def test_rescale_to_cells_gradcheck():
    """The pixel rescaling x (x^T G x + eps)^-1/2 fused with the cell-major layout copy (or kept in
    image layout): its
    hand-written backward against finite differences (symmetric G, as every SCA's Gram matrix is,
    and the variance read through G's QR factor as on CPU, or through G itself), and its no-grad
    form against the plain expression."""
    from spformer.kernels import image_to_cells
    from spformer.models.spformer import _RescaleByProjectionStd, centred_projection, gram_factor, rescale_to_cells
    torch.manual_seed(0)
    x = torch.randn(2, 4, 6, 5, dtype=torch.float64, requires_grad=True)  # (B, H, W, C), cells of 2x2
    wc, gram = centred_projection(torch.randn(9, 5, dtype=torch.float64))
    gram.requires_grad_()
    assert torch.autograd.gradcheck(lambda x, g: _RescaleByProjectionStd.apply(x, g, None, 1e-6, 2), (x, gram))
    # through the factor the value no longer reads G (finite differences in G see nothing): x only
    factor = gram_factor(wc, gram)
    assert torch.autograd.gradcheck(lambda x: _RescaleByProjectionStd.apply(x, gram, factor, 1e-6, 2), (x,))
    xd = x.detach()
    plain = (xd / (((xd @ gram.detach()) * xd).sum(-1, keepdim=True) + 1e-6).sqrt()).unsqueeze(1)
    expected = image_to_cells(plain, 2)
    with torch.no_grad():
        torch.testing.assert_close(rescale_to_cells(xd, wc, gram, 1e-6, 2), expected)
        torch.testing.assert_close(rescale_to_cells(xd, wc, gram, 1e-6, 2, cells=False), plain)
    torch.testing.assert_close(rescale_to_cells(x, wc, gram, 1e-6, 2), expected)
    # image layout (what the fused kernels read): the same Function with cells of one pixel, and
    # its gradient through the public function against finite differences
    torch.testing.assert_close(rescale_to_cells(x, wc, gram, 1e-6, 2, cells=False), plain)
    assert torch.autograd.gradcheck(lambda x, g: _RescaleByProjectionStd.apply(x, g, None, 1e-6, 1), (x, gram))
    assert torch.autograd.gradcheck(lambda x: rescale_to_cells(x, wc, gram, 1e-6, 2, cells=False), (x,))
