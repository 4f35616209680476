"""Hierarchical SPFormer (pixel -> superpixel -> group, docs/design.md §2) beyond what tests/test_models.py
checks for every registered model: the group level as an output (hard and soft composition), the
grouping and ungroup layers against naive re-implementations, the group block's MACs from a formula,
FLOPs against SPFormer-S, pruning, layer decay, checkpoints, torch.compile and bad input.

Both groupings are tested on the tiny model (``grouping='local'`` overrides the registered global one);
LayerScales are set to 0.5 where an effect must show (at 1e-5 wiring mistakes would hide).
"""
import math

import pytest
import torch
import torch.nn.functional as F
import timm

import spformer  # noqa: F401  (registers the models)
from spformer.demo import count_macs
from spformer.models.spformer import checkpoint_filter_fn
from test_models import _naive_sca, fill_layer_scales  # the SCA of docs/design.md §1.3 written out densely

TINY = 'spformer_hier_tiny_sp16_224'
GROUPINGS = ['global', 'local']


def _tiny(grouping, img_size=96, gamma=0.5, **kwargs):
    torch.manual_seed(0)
    model = timm.create_model(TINY, grouping=grouping, img_size=img_size, **kwargs)
    return fill_layer_scales(model, gamma).eval()


def _image(B, size, seed=1):
    """Smooth random images (blobs rather than white noise), so superpixels and groups have some shape."""
    g = torch.Generator().manual_seed(seed)
    return F.interpolate(torch.randn(B, 3, size // 8, size // 8, generator=g), size=(size, size), mode='bicubic')


# --- the group level as an output ----------------------------------------------------------------

@pytest.mark.parametrize('grouping', GROUPINGS)
def test_hard_group_map_is_the_composition_of_the_hard_maps(grouping):
    """Every pixel's group is the group of its superpixel: the pixel -> group map computed by hand from
    the pixel -> superpixel map (forward_superpixels) and the superpixel -> group map."""
    model = _tiny(grouping)
    x = _image(2, 96)
    with torch.no_grad():
        groups = model.forward_groups(x)
        superpixels = model.forward_superpixels(x)
    assert len(groups) == 1 and groups[0]['stage'] == 2
    out = groups[0]
    sp_labels = superpixels[-1]['labels']  # (B, 96, 96) token ids of the last stage, where the groups are
    h, w = model.grid_size
    gh, gw = out['grid'].tolist()
    assert (h, w, gh, gw) == (6, 6, 3, 3)
    assert torch.equal(out['superpixel_labels'], sp_labels)
    sp_groups = out['superpixel_groups']  # (B, h, w) group id of every token
    assert sp_groups.shape == (2, h, w) and int(sp_groups.min()) >= 0 and int(sp_groups.max()) < gh * gw
    # The superpixel -> group map is the argmax of the merged association.
    merged = out['superpixel_association_merged']
    assert torch.equal(sp_groups.flatten(1), merged.argmax(-1))

    expected = torch.empty_like(sp_labels)
    for b in range(2):
        for y in range(96):
            for x_ in range(96):
                token = int(sp_labels[b, y, x_])
                expected[b, y, x_] = sp_groups[b, token // w, token % w]
    assert torch.equal(out['labels'], expected)
    # Per grouping head: the head's own superpixel -> group argmax, composed the same way.
    for m in range(model.group_heads):
        head_groups = out['superpixel_association'][:, m].argmax(-1)  # (B, h*w)
        assert torch.equal(out['head_labels'][:, m], torch.stack([head_groups[b][sp_labels[b]] for b in range(2)]))
    # Not a trivial map: several groups are used and some superpixels left their pooling block.
    assert out['labels'].unique().numel() > 2
    pooled = (torch.arange(h)[:, None] // 2) * gw + torch.arange(w)[None, :] // 2
    assert (sp_groups != pooled).any()


@pytest.mark.parametrize('grouping', GROUPINGS)
def test_soft_group_association_is_the_composition(grouping):
    """P(pixel -> g) = sum over the pixel's 9 neighbouring superpixels s of P(pixel -> s) P(s -> g),
    written out pixel by pixel; it sums to 1 over the groups."""
    model = _tiny(grouping, img_size=64)
    x = _image(2, 64)
    with torch.no_grad():
        out = model.forward_groups(x)[0]
        sp = model.forward_superpixels(x)[-1]
    P = sp['association_merged']  # (B, 9, 16, 16)
    h, w = model.grid_size
    G = 4
    for key, Q in (('association_merged', out['superpixel_association_merged'][:, None]),
                   ('association', out['superpixel_association'])):
        K = Q.shape[1]
        expected = torch.zeros(2, K, G, 16, 16)
        for y in range(16):
            for x_ in range(16):
                for k in range(9):
                    ty, tx = y // 4 + k // 3 - 1, x_ // 4 + k % 3 - 1
                    if 0 <= ty < h and 0 <= tx < w:
                        expected[:, :, :, y, x_] += P[:, k, y, x_, None, None] * Q[:, :, ty * w + tx]
        got = out[key] if key == 'association' else out[key][:, None]
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(got.sum(2), torch.ones(2, K, 16, 16), rtol=1e-5, atol=1e-6)
    if grouping == 'local':  # a token considers only the 9 groups around its 2x2-token cell: all of 2x2 here
        assert (out['superpixel_association'] > 0).all()


def test_local_grouping_considers_only_the_groups_around_a_token():
    model = _tiny('local', img_size=128)  # 8x8 tokens, 4x4 groups
    with torch.no_grad():
        Q = model.forward_groups(_image(1, 128))[0]['superpixel_association']  # (1, M, 64, 16)
    ty, tx = torch.meshgrid(torch.arange(8), torch.arange(8), indexing='ij')
    gy, gx = torch.meshgrid(torch.arange(4), torch.arange(4), indexing='ij')
    near = ((ty.reshape(-1, 1) // 2 - gy.reshape(1, -1)).abs() <= 1) & \
        ((tx.reshape(-1, 1) // 2 - gx.reshape(1, -1)).abs() <= 1)
    assert (Q[0][:, ~near] == 0).all() and (Q[0][:, near] > 0).all()


def test_forward_groups_needs_a_hierarchical_model():
    model = timm.create_model('spformer_tiny_sp16_224', img_size=64).eval()
    with pytest.raises(ValueError, match=r"spformer_tiny_sp16_224 has no group level \(grouping=None\).*spformer_hier"):
        model.forward_groups(torch.randn(1, 3, 64, 64))


# --- the layers against naive re-implementations ---------------------------------------------------

def _layer_norm(x, norm):
    mu = x.mean(-1, keepdim=True)
    var = x.var(-1, unbiased=False, keepdim=True)
    return (x - mu) / torch.sqrt(var + norm.eps) * norm.weight + norm.bias


def _naive_global_grouping(layer, superpixels, groups):
    """Group queries over all superpixel keys, one head and one group at a time."""
    B, h, w, C = superpixels.shape
    M = layer.num_heads
    d = C // M
    s = _layer_norm(superpixels.reshape(B, h * w, C), layer.sp_norm)
    g = _layer_norm(groups.reshape(B, -1, C), layer.group_norm)
    q = g @ layer.q.weight.t() + layer.q.bias
    kv = s @ layer.kv.weight.t() + layer.kv.bias
    k, v = kv[..., :C], kv[..., C:]
    G = g.shape[1]
    logits = torch.zeros(B, M, h * w, G, dtype=s.dtype)
    out = torch.zeros(B, G, C, dtype=s.dtype)
    for m in range(M):
        ch = slice(m * d, (m + 1) * d)
        for j in range(G):
            a = (k[:, :, ch] * q[:, j, None, ch]).sum(-1) / math.sqrt(d)  # (B, h*w)
            logits[:, m, :, j] = a
            out[:, j, ch] = (a.softmax(-1)[..., None] * v[:, :, ch]).sum(1)
    new_groups = groups.reshape(B, G, C) + layer.ls.gamma * (out @ layer.proj.weight.t() + layer.proj.bias)
    return new_groups.reshape(groups.shape), logits


def _naive_local_grouping(layer, superpixels, groups):
    """The SCA of docs/design.md §1.3 with tokens as pixels; per-head logits <k_p, q_s> / sqrt(d), masked to
    the 3x3 cells of 2x2 tokens around each group, as a dense (B, M, h*w, G) matrix (-inf elsewhere)."""
    _, new_groups, logits = _naive_sca(layer, superpixels, groups)
    return new_groups, logits


def _naive_ungroup(layer, superpixels, groups, logits):
    """Every token takes back sum_g softmax_g(logits) * LayerNorm(proj(groups))_g per head, LayerScaled."""
    B, h, w, C = superpixels.shape
    M = layer.num_heads
    d = C // M
    values = _layer_norm(groups.reshape(B, -1, C) @ layer.proj.weight.t(), layer.norm)  # (B, G, C)
    out = torch.cat([logits[:, m].softmax(-1) @ values[:, :, m * d:(m + 1) * d] for m in range(M)], -1)
    return superpixels + layer.ls.gamma * out.reshape(B, h, w, C)


@pytest.mark.parametrize('grouping', GROUPINGS)
def test_grouping_and_ungroup_match_naive(grouping):
    """In a whole model (float64): the group tokens after the grouping, the superpixel -> group
    association forward_groups reports (per head and merged) and the tokens after the ungroup equal
    naive re-implementations fed the same inputs."""
    model = _tiny(grouping, img_size=64).double()
    block = model.stages[-1].group_block
    seen = {}
    hooks = [block.group_attn.register_forward_hook(lambda m, i, o: seen.update(group_in=i, group_out=o)),
             block.ungroup.register_forward_hook(lambda m, i, o: seen.update(ungroup_in=i, ungroup_out=o))]
    with torch.no_grad():
        out = model.forward_groups(_image(2, 64).double())[0]
        for hook in hooks:
            hook.remove()
        superpixels, groups = seen['group_in']
        naive = _naive_global_grouping if grouping == 'global' else _naive_local_grouping
        new_groups, logits = naive(block.group_attn, superpixels, groups)
        torch.testing.assert_close(seen['group_out'][1], new_groups, rtol=1e-9, atol=1e-10)
        torch.testing.assert_close(out['superpixel_association'], logits.softmax(-1), rtol=1e-9, atol=1e-10)
        merged = (logits.sum(1) / math.sqrt(logits.shape[1])).softmax(-1)
        torch.testing.assert_close(out['superpixel_association_merged'], merged, rtol=1e-9, atol=1e-10)

        sp_in, groups_after_blocks, _ = seen['ungroup_in']
        assert torch.equal(sp_in, superpixels)  # the ungroup updates the tokens the grouping read
        expected = _naive_ungroup(block.ungroup, superpixels, groups_after_blocks, logits)
        torch.testing.assert_close(seen['ungroup_out'], expected, rtol=1e-9, atol=1e-10)


# --- cost ----------------------------------------------------------------------------------------

def _group_block_macs(grouping, C, M, S, G):
    """MACs of one group block as torch.utils.flop_counter counts them (linear layers, matmuls, convs and
    the local attention ops' own formula; norms, softmax and means are not counted)."""
    block = G * 12 * C * C + 2 * G * G * C  # ViT block over the groups: projections + q.k and attn.v
    ungroup_proj = G * C * C
    if grouping == 'global':
        grouping_macs = G * C * C + 2 * S * C * C + 2 * S * G * C + G * C * C  # q, kv, logits + values, proj
        ungroup_attn = S * G * C  # every token over every group
    else:
        grouping_macs = (9 * S * C + 9 * G * C  # depthwise 3x3 position convs on tokens and groups
                         + 3 * C * C * C  # Gram matrix of the centred 3C x C token projection (once per forward)
                         + S * C * C  # the LayerNorm variance x^T G x of every token
                         + 3 * G * C * C  # group q|k|v
                         + G * C * C + G * C  # queries through W_k, and the bias <beta_k, q>
                         + M * S * 9 * (C + C)  # superpixel_attention op: logits and values per (token, group)
                         + G * C * C)  # values through W_v
        ungroup_attn = M * S * 9 * (C + C // M)  # pixel_attention op
    return grouping_macs + block + ungroup_proj + ungroup_attn


@pytest.mark.parametrize('grouping', GROUPINGS)
def test_group_block_macs_match_formula(grouping):
    """The hierarchical model costs the same model without grouping plus the group block's formula."""
    hier = timm.create_model(TINY, grouping=grouping, img_size=128).eval()
    plain = timm.create_model('spformer_tiny_sp16_224', depths=(2, 9), img_size=128).eval()
    x = torch.randn(1, 3, 128, 128)
    extra = count_macs(hier, x)[0] - count_macs(plain, x)[0]
    assert extra == _group_block_macs(grouping, C=192, M=2, S=64, G=16)


def test_hier_small_flops_not_above_spformer_small():
    """At 224 px the hierarchical small models execute no more MACs than
    SPFormer-S (the group block replaces one of stage 2's ten ViT blocks over 196 tokens)."""
    x = torch.randn(1, 3, 224, 224)
    macs = {name: count_macs(timm.create_model(name).eval(), x)[0] for name in (
        'spformer_small_sp16_224', 'spformer_hier_small_sp16_224', 'spformer_hier_small_local_sp16_224')}
    assert macs['spformer_hier_small_sp16_224'] < macs['spformer_small_sp16_224']
    assert macs['spformer_hier_small_local_sp16_224'] < macs['spformer_small_sp16_224']
    # ... by the group block's formula minus one ViT block over 196 tokens (C = 384, 6 heads)
    vit_block = 196 * 12 * 384 ** 2 + 2 * 196 ** 2 * 384
    for name, grouping in (('spformer_hier_small_sp16_224', 'global'), ('spformer_hier_small_local_sp16_224', 'local')):
        assert macs[name] - macs['spformer_small_sp16_224'] == _group_block_macs(grouping, 384, 2, 196, 49) - vit_block


# --- timm interface ------------------------------------------------------------------------------

def test_feature_pyramid_and_pruning():
    """features_only gives pixels (stride 4), superpixels (16) and groups (32); pruning keeps the group
    block only when a wanted feature needs it."""
    model = _tiny('global', img_size=64, gamma=None)
    n = len(model.feature_info)
    assert [model.feature_info[i]['reduction'] for i in (0, 1, n - 2, n - 1)] == [4, 16, 16, 32]
    assert model.feature_info[-1]['module'] == 'stages.1.group_block.blocks.0'
    feats = timm.create_model(TINY, img_size=64, features_only=True, out_indices=(0, -2, -1))
    assert feats.feature_info.reduction() == [4, 16, 32]
    assert [f.shape for f in feats(torch.randn(1, 3, 64, 64))] == [(1, 32, 16, 16), (1, 192, 4, 4), (1, 192, 2, 2)]

    def pruned(indices):
        m = _tiny('global', img_size=64, gamma=None)
        m.prune_intermediate_layers(indices)
        return [len(s.blocks) for s in m.stages], m.stages[-1].group_block is not None

    # stage-2 block 4 (feature 7) runs before the group block (after stage-2 block 5): not needed
    assert pruned([7]) == ([2, 5], False)
    # the groups are the last index, which keeps the whole trunk (timm's contract: pruned to the last
    # index, forward keeps its output), although they need only 5 blocks and the group block
    assert pruned([n - 1]) == ([2, 9], True)
    assert pruned([n - 2]) == ([2, 9], True)  # the last block runs after the group block
    assert pruned([8]) == ([2, 6], True)  # a block after the group block needs it
    assert pruned([0]) == ([2], False)  # the pixel stream is final after stage 1


@pytest.mark.parametrize('grouping', GROUPINGS)
def test_grad_checkpointing_gradients_match(grouping):
    model = _tiny(grouping, img_size=64, num_classes=10).train()
    x = _image(2, 64)
    model(x).square().mean().backward()
    ref = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model.set_grad_checkpointing(True)
    assert model.stages[-1].group_block.grad_checkpointing
    model(x).square().mean().backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, ref[n], rtol=1e-4, atol=1e-6, msg=n)
    assert ref['stages.1.group_block.ungroup.ls.gamma'].abs().sum() > 0  # the group block is in the graph


def test_layer_decay_puts_the_group_block_between_the_blocks_it_runs_between():
    from timm.optim._param_groups import param_groups_layer_decay
    model = timm.create_model(TINY, img_size=64)
    groups = param_groups_layer_decay(model, weight_decay=0.05, layer_decay=0.5,
                                      no_weight_decay_list=model.no_weight_decay())
    scale_of = {id(p): g['lr_scale'] for g in groups for p in g['params']}
    named = dict(model.named_parameters())
    scale = lambda n: scale_of[id(named[n])]  # noqa: E731
    order = ['stages.1.blocks.4.attn.qkv.weight', 'stages.1.group_block.group_attn.q.weight',
             'stages.1.blocks.5.attn.qkv.weight']
    assert scale(order[0]) < scale(order[1]) < scale(order[2])
    assert scale('stages.1.group_block.group_attn.q.weight') == scale('stages.1.group_block.blocks.0.mlp.fc1.weight') \
        == scale('stages.1.group_block.ungroup.proj.weight')
    assert model.no_weight_decay() == {'stages.0.pos_embed', 'stages.1.pos_embed'}


def test_dynamic_img_size():
    """Any multiple of the group stride 32, non-square; same output as the fixed model at its size."""
    torch.manual_seed(0)
    fixed = timm.create_model(TINY, img_size=64).eval()
    dyn = timm.create_model(TINY, img_size=64, dynamic_img_size=True).eval()
    dyn.load_state_dict(fixed.state_dict())
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(dyn(x), fixed(x))
        out = dyn.forward_groups(torch.randn(1, 3, 160, 96))[0]
    assert out['grid'].tolist() == [5, 3] and out['labels'].shape == (1, 160, 96)
    assert out['association'].shape == (1, 2, 15, 40, 24) and int(out['labels'].max()) < 15


@pytest.mark.parametrize('grouping', GROUPINGS)
def test_compiled_group_block_matches_eager(grouping):
    """The group block compiles as one graph (fullgraph: no graph break; the local grouping runs the custom
    ops on the token grid), forward and backward equal eager. Only the block: the rest of the model is
    what tests/test_compile.py compiles, and a whole hierarchical model took ~5 minutes on 2 busy cores."""
    torch._dynamo.reset()
    block = _tiny(grouping, img_size=64).stages[-1].group_block.train()
    tokens = torch.randn(2, 4, 4, 192, requires_grad=True)

    def loss(fn):
        superpixels, groups, _ = fn(tokens)
        return superpixels.square().mean() + groups.square().mean()

    compiled = loss(torch.compile(block, fullgraph=True))
    compiled.backward()
    grads = {n: p.grad.clone() for n, p in block.named_parameters()}
    block.zero_grad()
    eager = loss(block)
    eager.backward()
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)
    for n, p in block.named_parameters():
        torch.testing.assert_close(grads[n], p.grad, rtol=1e-3, atol=1e-5 * float(p.grad.abs().max()), msg=n)


def test_local_group_block_triton_backend_matches_torch(triton_device):
    """The local grouping runs the attention ops with head dimension C (192 here, 384 for the small model):
    the fused Triton kernels (under TRITON_INTERPRET=1 on CPU, see conftest; compiled, on CUDA, under
    .ci/gpu) equal the torch backend, forward and backward."""
    pytest.importorskip('triton', reason='the triton package is not installed (Linux only)')
    from spformer.models.spformer import GroupBlock
    torch.manual_seed(0)
    blocks = [GroupBlock(192, 3, 2, 2, 'local', attn_backend=backend) for backend in ('torch', 'triton')]
    blocks[1].load_state_dict(blocks[0].state_dict())
    blocks = [block.to(triton_device) for block in blocks]
    with torch.no_grad():
        for block in blocks:
            for name, p in block.named_parameters():
                if name.endswith('.gamma'):
                    p.fill_(0.5)
    tokens = torch.randn(2, 4, 6, 192, device=triton_device)
    outs = [block(tokens)[0] for block in blocks]
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-4, atol=1e-5)
    for out in outs:
        out.square().mean().backward()
    grads = dict(blocks[0].named_parameters())
    for name, p in blocks[1].named_parameters():
        torch.testing.assert_close(p.grad, grads[name].grad, rtol=1e-3, atol=1e-6, msg=name)


# --- bad input and checkpoints -------------------------------------------------------------------

@pytest.mark.parametrize('kwargs, match', [
    (dict(grouping='nearby'), r"grouping must be None, 'global' or 'local', got 'nearby'"),
    (dict(group_size=0), r'group_size must be an int >= 1, got 0'),
    (dict(group_depth=1.5), r'group_depth must be an int >= 1, got 1.5'),
    (dict(group_index=10), r'group_index must be an int in 0..9 .*got 10'),
    (dict(group_heads=5), r'group_heads=5 must divide embed_dim=192'),
    (dict(img_size=208),
     r'img_size=\(208, 208\) must be a multiple of the group stride 32 \(token stride 16 x group_size=2\)'),
])
def test_bad_constructor_args(kwargs, match):
    with pytest.raises(ValueError, match=match):
        timm.create_model(TINY, **kwargs)


def test_bad_input_shapes():
    model = timm.create_model(TINY, img_size=64, dynamic_img_size=True).eval()
    with pytest.raises(ValueError, match=r'x has spatial size 64x80; .*multiples of the group stride '
                                         r'\(superpixel token stride 16 x group_size=2\): 32'):
        model(torch.randn(1, 3, 64, 80))
    with pytest.raises(ValueError, match=r'1 channels, expected in_chans=3'):
        model(torch.randn(1, 1, 64, 64))


def test_checkpoint_of_another_variant_names_both(tmp_path):
    from safetensors.torch import save_file
    plain = tmp_path / 'plain.safetensors'
    save_file(timm.create_model('spformer_tiny_sp16_224').state_dict(), str(plain))
    with pytest.raises(ValueError, match=r"does not fit spformer_hier_tiny_sp16_224 .*grouping='global'.*"
                                         r'tensors are those of spformer_tiny_sp16_224\b'):
        timm.create_model(TINY, pretrained=True, pretrained_cfg_overlay=dict(file=str(plain)))
    hier = timm.create_model('spformer_hier_small_sp16_224')
    with pytest.raises(ValueError, match=r"does not fit spformer_hier_small_local_sp16_224 .*grouping='local'.*"
                                         r'tensors are those of spformer_hier_small_sp16_224\b'):
        checkpoint_filter_fn(hier.state_dict(), timm.create_model('spformer_hier_small_local_sp16_224'))
    with pytest.raises(ValueError,
                       match=r'does not fit spformer_small_sp16_224 .*those of spformer_hier_small_sp16_224\b'):
        checkpoint_filter_fn(hier.state_dict(), timm.create_model('spformer_small_sp16_224'))


def test_hard_groups_ties_go_to_the_pooled_group():
    """forward_groups' ``superpixel_groups``: the argmax of P(s -> g), a tie going to the group the token was
    pooled into (docs/design.md §2), so that a uniform association gives the regular group grid. Hand values
    on a 4 x 6 token grid with 2 x 2 groups (a 2 x 3 group grid)."""
    from spformer.models.spformer import hard_groups
    h, w, g = 4, 6, 2
    pooled = torch.tensor([[0, 0, 1, 1, 2, 2], [0, 0, 1, 1, 2, 2], [3, 3, 4, 4, 5, 5], [3, 3, 4, 4, 5, 5]])
    uniform = torch.full((1, 1, h * w, 6), 1 / 6)
    assert torch.equal(hard_groups(uniform, (h, w), g)[0, 0], pooled)
    # Token 9 (row 1, column 3; pooled into group 1) ties between groups 4 and 1: its own wins. Token 14
    # (row 2, column 2; pooled into group 4) prefers group 0 strictly: group 0 wins. A tie between two
    # groups that are both not its own goes to the first of them (token 0 between 2 and 5).
    p = torch.full((1, 1, h * w, 6), 0.1)
    p[0, 0, 9, [1, 4]] = 0.3
    p[0, 0, 14, 0] = 0.5
    p[0, 0, 0, [2, 5]] = 0.3
    expected = pooled.clone()
    expected[2, 2] = 0
    expected[0, 0] = 2
    assert torch.equal(hard_groups(p, (h, w), g)[0, 0], expected)
