"""Whole SPFormer models against an independent, deliberately plain re-implementation (the oracle).

The oracle below is written from docs/design.md alone (§1.1 configurations, §1.2 data flow, §1.3 one
SCA iteration in its *direct* form, §2 the group level): it shares no code with ``spformer.models``
or ``spformer.kernels`` (they are used only to build the model under test, through
``timm.create_model``). It builds the pixel q|k|v with the full projection and LayerNorm, works on
flattened raster-order pixels (B, H*W, C) and tokens (B, h*w, C), and evaluates every local
attention as a dense (H*W) x (h*w) logit matrix with -inf outside the 3 x 3-cell neighbourhood
(clipped to the image), one head at a time in a Python loop. It is slow and obviously the design,
which is the point: the model's fast paths (projection-free SCA, cell-major layouts, fused C
kernels) must compute the same function.

Both are loaded with the same weights: the oracle reads the model's ``state_dict`` by name
(``params['stages.0.sca.0.pixel_qkv.weight']``) and checks that it read every tensor, so a
parameter the design does not account for fails the test. Before comparing, every parameter and
buffer is randomised far from its init (:func:`randomise_far_from_init`): at the models' init the
LayerScales are 1e-5 and the position embeddings 0.02, which hides wiring mistakes. The
comparison is in float64: logits, d(loss)/d(every parameter) and d(loss)/d(image) for one scalar
loss, the per-stage associations of ``forward_superpixels`` and, for hierarchical models, the
group associations of ``forward_groups``.

A small golden file, ``tests/data/golden_spformer.safetensors``, pins the outputs of one
reduced model (a uint8 image, the logits and one stage's merged association) so that a change
that moves the model and the oracle together is seen too. Regenerate it (only on purpose) with::

    python tests/test_model_oracle.py --write-golden
"""
import functools
import math
import os
import sys

import pytest
import torch
import torch.nn.functional as F
import timm

import spformer  # noqa: F401  (registers the models)

# docs/design.md §1.1: LayerNorm eps 1e-6 everywhere, BatchNorm (stem) eps 1e-5.
LN_EPS = 1e-6
BN_EPS = 1e-5
# Width rows of docs/design.md §1.1: pixel channels C_p, token channels C, ViT heads, SCA heads M.
TINY = dict(pixel_dim=32, embed_dim=192, vit_heads=3, sca_heads=2)
SMALL = dict(pixel_dim=64, embed_dim=384, vit_heads=6, sca_heads=2)
SCA_ITERS = 2  # per stage, §1.1
MLP_RATIO = 4
NUM_CLASSES = 10  # a small head: the classifier width is not what is tested

GOLDEN_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'data', 'golden_spformer.safetensors')


# --- the oracle: plain SPFormer from docs/design.md ----------------------------------------------

class ReadTracker(dict):
    """The model's state dict; remembers which names the oracle read, so the test can check that
    every tensor of the model takes part in the function the design describes."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.read = set()

    def __getitem__(self, name):
        self.read.add(name)
        return super().__getitem__(name)


def layer_norm(x, params, name):
    """LayerNorm over the last axis with the weight and bias stored under ``name``."""
    return F.layer_norm(x, (x.shape[-1],), params[f'{name}.weight'], params[f'{name}.bias'], LN_EPS)


def linear(x, params, name, bias=True):
    y = x @ params[f'{name}.weight'].t()
    return y + params[f'{name}.bias'] if bias else y


def to_image(x, grid):
    """(B, H*W, C) raster-order rows -> (B, C, H, W)."""
    B, _, C = x.shape
    return x.transpose(1, 2).reshape(B, C, *grid)


def from_image(x):
    """(B, C, H, W) -> (B, H*W, C) raster-order rows."""
    B, C = x.shape[:2]
    return x.reshape(B, C, -1).transpose(1, 2)


def depthwise_conv3x3(x, grid, params, name):
    """The conditional position encoding's depthwise 3 x 3 conv (zero padding, with bias) on raster rows."""
    weight = params[f'{name}.weight']
    return from_image(F.conv2d(to_image(x, grid), weight, params[f'{name}.bias'], padding=1, groups=weight.shape[0]))


def neighbourhood_mask(grid, cell, device=None):
    """(H*W, h*w) bool: token j is one of the <= 9 tokens whose cells are the 3 x 3 cells around pixel p's
    cell (the same relation read the other way: p is in token j's window Omega(j)). Clipped to the image
    simply because tokens outside the grid do not exist."""
    H, W = grid
    h, w = H // cell, W // cell
    pixel_cell_row = (torch.arange(H * W, device=device) // W) // cell
    pixel_cell_col = (torch.arange(H * W, device=device) % W) // cell
    token_row = torch.arange(h * w, device=device) // w
    token_col = torch.arange(h * w, device=device) % w
    return (((pixel_cell_row[:, None] - token_row[None, :]).abs() <= 1)
            & ((pixel_cell_col[:, None] - token_col[None, :]).abs() <= 1))


def head(x, m, heads):
    """Channel chunk ``m`` of ``heads`` equal chunks of the last axis."""
    d = x.shape[-1] // heads
    return x[..., m * d:(m + 1) * d]


def sca_iteration(params, name, pixels, tokens, pixel_grid, cell, heads, update_pixels):
    """One SCA iteration, docs/design.md §1.3, direct form. pixels (B, H*W, C_p), tokens (B, h*w, C).

    Returns (pixels, tokens, association logits (B, M, H*W, h*w), -inf outside the neighbourhood)."""
    C_p, C = pixels.shape[-1], tokens.shape[-1]
    token_grid = (pixel_grid[0] // cell, pixel_grid[1] // cell)
    # 1. conditional position encoding, for the projections only
    pixels_pos = pixels + depthwise_conv3x3(pixels, pixel_grid, params, f'{name}.pixel_pos')
    tokens_pos = tokens + depthwise_conv3x3(tokens, token_grid, params, f'{name}.sp_pos')
    # 2. tokens: one LayerNorm over all 3 C_p channels of q|k|v
    q_s, k_s, v_s = layer_norm(linear(tokens_pos, params, f'{name}.sp_qkv', bias=False), params,
                               f'{name}.sp_norm').split([C_p, C_p, C_p], dim=-1)
    # 3. pixels: the full 2 C_p + C projection, one LayerNorm over all of it
    q_p, k_p, v_p = layer_norm(linear(pixels_pos, params, f'{name}.pixel_qkv', bias=False), params,
                               f'{name}.pixel_norm').split([C_p, C_p, C], dim=-1)
    inside = neighbourhood_mask(pixel_grid, cell, pixels.device)
    d = C_p // heads
    token_updates, pixel_updates, association = [], [], []
    for m in range(heads):  # 4. each head its own association
        # 5. token update: softmax over the pixels of the token's window (axis 1 = pixels)
        a = (head(k_p, m, heads) @ head(q_s, m, heads).transpose(1, 2)) / math.sqrt(d)  # (B, HW, hw)
        a = a.masked_fill(~inside, -math.inf)
        token_updates.append(a.softmax(dim=1).transpose(1, 2) @ head(v_p, m, heads))
        association.append(a)
        if update_pixels:
            # 6. pixel update: softmax over the pixel's <= 9 tokens (axis 2 = tokens)
            b = (head(q_p, m, heads) @ head(k_s, m, heads).transpose(1, 2)) / math.sqrt(d)
            b = b.masked_fill(~inside, -math.inf)
            pixel_updates.append(b.softmax(dim=2) @ head(v_s, m, heads))
    # 7. both updates read the iteration's inputs
    new_tokens = tokens + params[f'{name}.sp_ls.gamma'] * torch.cat(token_updates, dim=-1)
    new_pixels = pixels + params[f'{name}.pixel_ls.gamma'] * torch.cat(pixel_updates, dim=-1) if update_pixels \
        else pixels
    return new_pixels, new_tokens, torch.stack(association, dim=1)


def association_update(params, name, targets, sources, association_logits, heads):
    """Stage-end pixel update (§1.2 step 3.4) and ungroup (§2 step 4): every target row takes back, per
    head, sum_j softmax_j(logits) LayerNorm(W_u source_j), scaled by its LayerScale and added.
    association_logits (B, M, targets, sources), -inf for excluded sources."""
    values = layer_norm(linear(sources, params, f'{name}.proj', bias=False), params, f'{name}.norm')
    update = torch.cat([association_logits[:, m].softmax(dim=-1) @ head(values, m, heads)
                        for m in range(heads)], dim=-1)
    return targets + params[f'{name}.ls.gamma'] * update


def vit_block(params, name, x, heads):
    """A plain pre-norm ViT block (timm's ``Block`` as the models build it: qkv bias, no LayerScale)."""
    B, n, C = x.shape
    assert params[f'{name}.mlp.fc1.weight'].shape == (MLP_RATIO * C, C)  # §1.1
    q, k, v = linear(layer_norm(x, params, f'{name}.norm1'), params, f'{name}.attn.qkv').split([C, C, C], dim=-1)
    d = C // heads
    attended = torch.cat([(head(q, m, heads) @ head(k, m, heads).transpose(1, 2) / math.sqrt(d)).softmax(dim=-1)
                          @ head(v, m, heads) for m in range(heads)], dim=-1)
    x = x + linear(attended, params, f'{name}.attn.proj')
    hidden = F.gelu(linear(layer_norm(x, params, f'{name}.norm2'), params, f'{name}.mlp.fc1'))
    return x + linear(hidden, params, f'{name}.mlp.fc2')


def tf_same_pad(x, kernel, stride):
    """TensorFlow 'same' padding (§1.1): total = max((ceil(n / s) - 1) s + k - n, 0), the odd one after."""
    pads = []
    for n in (x.shape[3], x.shape[2]):  # F.pad order: last axis first
        total = max((-(-n // stride) - 1) * stride + kernel - n, 0)
        pads += [total // 2, total - total // 2]
    return F.pad(x, pads)


def stem(params, images, layers):
    """conv (no bias) + BatchNorm (running statistics) + ReLU per layer; (B, 3, H, W) -> (B, C_p, H/s, W/s)."""
    x = images
    for i, (out_channels, kernel, stride) in enumerate(layers):
        suffix = '' if len(layers) == 1 else str(i + 1)
        if kernel > stride:  # a patchify conv (kernel = stride) pads nothing
            x = tf_same_pad(x, kernel, stride)
        x = F.conv2d(x, params[f'stem.conv{suffix}.weight'], stride=stride)
        assert x.shape[1] == out_channels  # the stem of §1.1
        bn = f'stem.bn{suffix}'
        x = ((x - params[f'{bn}.running_mean'][:, None, None])
             / torch.sqrt(params[f'{bn}.running_var'][:, None, None] + BN_EPS)
             * params[f'{bn}.weight'][:, None, None] + params[f'{bn}.bias'][:, None, None])
        x = F.relu(x)
    return x


def cell_means(x, grid, cell):
    """(B, H*W, C) -> (B, (H/cell)*(W/cell), C): the mean over every cell x cell block."""
    B, _, C = x.shape
    H, W = grid
    return x.reshape(B, H // cell, cell, W // cell, cell, C).mean(dim=(2, 4)).reshape(B, -1, C)


def group_block(params, name, tokens, token_grid, cfg):
    """§2: init groups -> grouping -> ViT blocks over groups -> ungroup. Returns (tokens, groups, token ->
    group association logits (B, M_g, h*w, G), -inf where a local grouping excludes a group)."""
    g, M = cfg['group_size'], cfg['group_heads']
    groups = cell_means(tokens, token_grid, g)  # 1. no position embedding
    if cfg['grouping'] == 'global':
        # 2. cross-attention of every group over all tokens, pre-norm on both sides
        attn = f'{name}.group_attn'
        C = tokens.shape[-1]
        q = linear(layer_norm(groups, params, f'{attn}.group_norm'), params, f'{attn}.q')
        # the map named kv gives [k | v] (§2 does not spell out the order; k first is the name's reading)
        k, v = linear(layer_norm(tokens, params, f'{attn}.sp_norm'), params, f'{attn}.kv').split([C, C], dim=-1)
        d = C // M
        logits = torch.stack([head(k, m, M) @ head(q, m, M).transpose(1, 2) / math.sqrt(d) for m in range(M)], 1)
        gathered = torch.cat([logits[:, m].softmax(dim=1).transpose(1, 2) @ head(v, m, M)  # over the tokens
                              for m in range(M)], dim=-1)
        groups = groups + params[f'{attn}.ls.gamma'] * linear(gathered, params, f'{attn}.proj')
    else:
        # 2. local: the SCA one level up (tokens as pixels, groups as superpixels), no pixel update
        _, groups, logits = sca_iteration(params, f'{name}.group_attn', tokens, groups, token_grid, g, M,
                                          update_pixels=False)
    for i in range(cfg['group_depth']):  # 3.
        groups = vit_block(params, f'{name}.blocks.{i}', groups, cfg['vit_heads'])
    # 4. ungroup with the grouping's association, softmax over the groups
    tokens = association_update(params, f'{name}.ungroup', tokens, groups, logits, M)
    return tokens, groups, logits


def position_embedding(params, name, cfg, token_grid):
    """A stage's learned embedding (1, h*w, C), made for ``cfg['pos_embed_grid']`` (the model's img_size over
    its token stride). At another grid (``dynamic_img_size``, §1.1) it is resampled on the fly as an image:
    bicubic with antialiasing, in float32 (timm's convention for ViT position embeddings)."""
    pos = params[name]
    built_for = tuple(cfg.get('pos_embed_grid', token_grid))
    if built_for == tuple(token_grid):
        return pos
    image = pos.reshape(1, *built_for, -1).permute(0, 3, 1, 2)
    resampled = F.interpolate(image.float(), size=token_grid, mode='bicubic', antialias=True).to(pos.dtype)
    return resampled.permute(0, 2, 3, 1).reshape(1, token_grid[0] * token_grid[1], -1)


def oracle_forward(params, cfg, images):
    """The whole model, §1.2 (and §2 where ``cfg['grouping']``). Returns a dict: ``logits`` (B, classes),
    ``associations`` per stage the last SCA iteration's logits (B, M, H*W, h*w), ``pixel_grid``,
    ``token_grid``, and for hierarchical models ``group_logits`` (B, M_g, h*w, G)."""
    cell = cfg['cell_size']
    pixels = stem(params, images, cfg['stem_layers'])
    pixel_grid = tuple(pixels.shape[2:])
    token_grid = (pixel_grid[0] // cell, pixel_grid[1] // cell)
    pixels = from_image(pixels)
    # superpixel init: mean over each cell of GELU(LayerNorm(W_init P))
    tokens = cell_means(F.gelu(layer_norm(linear(pixels, params, 'sp_init.proj', bias=False), params, 'sp_init.norm')),
                        pixel_grid, cell)
    # the widths of §1.1 (the oracle takes every other size from the tensors it reads)
    assert (pixels.shape[-1], tokens.shape[-1]) == (cfg['pixel_dim'], cfg['embed_dim'])
    associations, group_logits = [], None
    depths = cfg['depths']
    for k, depth in enumerate(depths):
        stage = f'stages.{k}'
        stage_pixels = pixels  # the pixel update adds to the pixels the stage started with
        for i in range(SCA_ITERS):  # the last iteration skips the pixel update
            pixels, tokens, association = sca_iteration(params, f'{stage}.sca.{i}', pixels, tokens, pixel_grid,
                                                        cell, cfg['sca_heads'], update_pixels=i < SCA_ITERS - 1)
        associations.append(association)
        tokens = tokens + position_embedding(params, f'{stage}.pos_embed', cfg, token_grid)  # one per stage
        last = k == len(depths) - 1
        for i in range(depth):
            if last and cfg.get('grouping') and i == cfg['group_index']:
                tokens, _, group_logits = group_block(params, f'{stage}.group_block', tokens, token_grid, cfg)
            tokens = vit_block(params, f'{stage}.blocks.{i}', tokens, cfg['vit_heads'])
        if last and cfg.get('grouping') and cfg['group_index'] == depth:
            tokens, _, group_logits = group_block(params, f'{stage}.group_block', tokens, token_grid, cfg)
        if not last:
            pixels = association_update(params, f'{stage}.unfold', stage_pixels, tokens, association,
                                        cfg['sca_heads'])
    # head: mean over tokens -> LayerNorm -> Linear
    logits = linear(layer_norm(tokens.mean(dim=1), params, 'fc_norm'), params, 'head')
    return dict(logits=logits, associations=associations, pixel_grid=pixel_grid, token_grid=token_grid,
                group_logits=group_logits)


def merge_heads(logits):
    """(B, M, ...) logits -> (B, ...): sum_m logits_m / sqrt(M) (§1.3, §2)."""
    return logits.sum(dim=1) / math.sqrt(logits.shape[1])


def to_neighbour_layout(probs, pixel_grid, cell):
    """Dense (..., H*W, h*w) pixel -> token probabilities as (..., 9, H, W): neighbour k is the cell at
    offset (k // 3 - 1, k % 3 - 1) from the pixel's own cell (§1.4), 0 outside the grid."""
    H, W = pixel_grid
    h, w = H // cell, W // cell
    rows = torch.arange(H)[:, None].expand(H, W)
    cols = torch.arange(W)[None, :].expand(H, W)
    out = probs.new_zeros(*probs.shape[:-2], 9, H, W)
    for k in range(9):
        token_row, token_col = rows // cell + k // 3 - 1, cols // cell + k % 3 - 1
        inside = (token_row >= 0) & (token_row < h) & (token_col >= 0) & (token_col < w)
        token = (token_row.clamp(0, h - 1) * w + token_col.clamp(0, w - 1)).reshape(-1)
        picked = probs[..., torch.arange(H * W), token].reshape(*probs.shape[:-2], H, W)
        out[..., k, :, :] = torch.where(inside, picked, torch.zeros_like(picked))
    return out


# --- weights far from init ----------------------------------------------------------------------

def randomise_far_from_init(model, seed):
    """Overwrite every parameter and buffer (but ``num_batches_tracked``) of ``model`` from one
    ``torch.Generator(seed)``, in sorted name order, drawing in float64 (torch's CPU generator is
    stable across versions and platforms, so this is reproducible; the golden file relies on it):

    - LayerScale ``*.gamma``: U(0.5, 1.5) times a random sign;
    - ``*pos_embed``: N(0, 1);
    - norm layers (module name ``*norm*`` or ``bn*``): weight 1 + 0.5 N, bias 0.5 N;
      BatchNorm ``running_mean`` 0.5 N, ``running_var`` U(0.5, 2);
    - every other weight: N(0, 1) / sqrt(fan in) (fan in = product of all but the first axis);
    - every other bias: 0.5 N.
    """
    generator = torch.Generator().manual_seed(seed)
    normal = lambda shape: torch.randn(shape, generator=generator, dtype=torch.float64)  # noqa: E731
    uniform = lambda shape: torch.rand(shape, generator=generator, dtype=torch.float64)  # noqa: E731
    state = model.state_dict()
    with torch.no_grad():
        for name in sorted(state):
            t = state[name]
            module, leaf = name.rsplit('.', 1) if '.' in name else ('', name)
            owner = module.rsplit('.', 1)[-1]
            if leaf == 'num_batches_tracked':
                continue
            if leaf == 'gamma':
                value = (0.5 + uniform(t.shape)) * torch.where(uniform(t.shape) < 0.5, -1.0, 1.0)
            elif leaf == 'pos_embed':
                value = normal(t.shape)
            elif leaf == 'running_mean':
                value = 0.5 * normal(t.shape)
            elif leaf == 'running_var':
                value = 0.5 + 1.5 * uniform(t.shape)
            elif 'norm' in owner or owner.startswith('bn'):
                value = 1 + 0.5 * normal(t.shape) if leaf == 'weight' else 0.5 * normal(t.shape)
            elif leaf == 'weight':
                value = normal(t.shape) / math.sqrt(math.prod(t.shape[1:]))
            else:
                value = 0.5 * normal(t.shape)
            t.copy_(value)
    return model


# --- the cases ------------------------------------------------------------------------------------

# Each case: the model built with reduced depth and a small input (sides multiples of its token or group
# stride), and the oracle's configuration written from docs/design.md §1.1 / §2 (not read from the model).
CASES = {
    # 4 x 4 tokens (interior tokens see all 9 cells), square, two stages of 1 + 2 ViT blocks
    'tiny_sp16': dict(
        model='spformer_tiny_sp16_224', input=(2, 3, 64, 64), depths=(1, 2),
        oracle=dict(TINY, stem_layers=((32, 4, 4),), cell_size=4)),
    # three stages (the constructor takes any number; docs/design.md §1.2: every stage but the last has a
    # pixel update): stage 2's pixel update must use stage 2's association, not stage 1's. Non-square 3 x 4 grid.
    'tiny_sp16_3_stages': dict(
        model='spformer_tiny_sp16_224', input=(2, 3, 48, 64), depths=(1, 1, 1),
        oracle=dict(TINY, stem_layers=((32, 4, 4),), cell_size=4)),
    # built for 224 px (14 x 14 position embeddings) and run at another size: the embeddings resampled to 3 x 5
    'tiny_sp16_dynamic': dict(
        model='spformer_tiny_sp16_224', input=(2, 3, 48, 80), depths=(1, 1),
        model_kwargs=dict(img_size=224, dynamic_img_size=True),
        oracle=dict(TINY, stem_layers=((32, 4, 4),), cell_size=4, pos_embed_grid=(14, 14))),
    # stride-8 patchify stem, non-square 4 x 3 token grid
    'small_sp32': dict(
        model='spformer_small_sp32_224', input=(2, 3, 128, 96), depths=(1, 1),
        oracle=dict(SMALL, stem_layers=((64, 8, 8),), cell_size=4)),
    # cell 7 and the three-conv TF-'same' stem, non-square 2 x 3 token grid
    'small_sp56': dict(
        model='spformer_small_sp56_224', input=(2, 3, 112, 168), depths=(1, 1),
        oracle=dict(SMALL, stem_layers=((16, 3, 2), (32, 3, 2), (64, 3, 2)), cell_size=7)),
    # global groups between the last stage's two ViT blocks: 4 x 6 tokens, 2 x 3 groups
    'hier_tiny_global': dict(
        model='spformer_hier_tiny_sp16_224', input=(2, 3, 64, 96), depths=(1, 2), model_kwargs=dict(group_index=1),
        oracle=dict(TINY, stem_layers=((32, 4, 4),), cell_size=4, grouping='global', group_size=2, group_depth=1,
                    group_index=1, group_heads=2)),
    # local groups (the SCA one level up; the tiny width of spformer_hier_small_local_sp16_224, for time):
    # 6 x 4 tokens, 3 x 2 groups, so a token's 9 candidate groups are clipped differently along each side
    'hier_tiny_local': dict(
        model='spformer_hier_tiny_sp16_224', input=(2, 3, 96, 64), depths=(1, 2),
        model_kwargs=dict(grouping='local', group_index=1),
        oracle=dict(TINY, stem_layers=((32, 4, 4),), cell_size=4, grouping='local', group_size=2, group_depth=1,
                    group_index=1, group_heads=2)),
}
# How the model under test runs: 'auto' (the default backend: the C kernels on CPU, the torch backend
# without a compiler), 'reference' (the dense backend), and 'autocast': 'auto' inside
# torch.autocast('cpu', bfloat16). Autocast leaves float64 alone, so the numbers stay float64, but it
# switches the model to the plain-autograd paths that CUDA and torch.compile take (the superpixel init
# through activation checkpointing, the plain rescaling expression), which the CPU otherwise never runs.
PATHS = ['auto', 'reference', 'autocast']


def oracle_config(case):
    return dict(case['oracle'], depths=case['depths'])


@functools.lru_cache(maxsize=None)
def randomised_model(case_name, backend, seed=0):
    """The case's model in float64, eval mode (BatchNorm on its running statistics), weights randomised
    (:func:`randomise_far_from_init`). Cached: every test of a case and backend reads the same one (the
    tests only accumulate gradients into it, each reading them right after its own backward)."""
    case = CASES[case_name]
    H, W = case['input'][2:]
    kwargs = dict(dict(img_size=(H, W)), **case.get('model_kwargs', {}))
    model = timm.create_model(case['model'], depths=case['depths'], num_classes=NUM_CLASSES,
                              attn_backend=backend, dtype=torch.float64, **kwargs)
    return randomise_far_from_init(model.eval(), seed)


def oracle_params(model):
    """The oracle's parameters: leaf float64 copies of the model's state dict by name (gradients for the
    model's parameters), in a :class:`ReadTracker`."""
    trainable = {name for name, _ in model.named_parameters()}
    return ReadTracker({name: t.detach().clone().requires_grad_(name in trainable)
                        for name, t in model.state_dict().items() if not name.endswith('num_batches_tracked')})


def smooth_images(shape, seed):
    """Random images with some spatial structure (upsampled noise plus a little pixel noise), float64."""
    g = torch.Generator().manual_seed(seed)
    B, C, H, W = shape
    coarse = torch.randn(B, C, H // 8, W // 8, generator=g, dtype=torch.float64)
    return F.interpolate(coarse, size=(H, W), mode='bilinear') + 0.3 * torch.randn(shape, generator=g,
                                                                                    dtype=torch.float64)


def loss_weights(case):
    """Fixed random weights of the scalar loss sum(logits * weights) that both sides backpropagate."""
    return torch.randn(case['input'][0], NUM_CLASSES, generator=torch.Generator().manual_seed(2), dtype=torch.float64)


@functools.lru_cache(maxsize=None)
def oracle_gradients(case_name):
    """The oracle's logits, parameter gradients (by name), image gradient and the names it read, for the
    weights of ``randomised_model(case_name, 'auto')`` (every backend's model has the same weights)."""
    case = CASES[case_name]
    params = oracle_params(randomised_model(case_name, 'auto'))
    images = smooth_images(case['input'], seed=1).requires_grad_()
    logits = oracle_forward(params, oracle_config(case), images)['logits']
    (logits * loss_weights(case)).sum().backward()
    grads = {name: t.grad for name, t in params.items() if t.requires_grad}
    return dict(logits=logits.detach(), grads=grads, image_grad=images.grad, read=params.read, names=set(params))


def assert_close_to_scale(actual, expected, what, tol=1e-10):
    """max |actual - expected| <= tol * max(|actual|, |expected|): a relative error for the whole tensor,
    so small entries of a tensor with large ones are not held to their own (noisier) relative error."""
    assert actual.shape == expected.shape, f'{what}: shape {tuple(actual.shape)} vs oracle {tuple(expected.shape)}'
    scale = max(actual.abs().max().item(), expected.abs().max().item())
    err = (actual - expected).abs().max().item()
    assert err <= tol * scale, f'{what}: max error {err:.3e} vs scale {scale:.3e} (rel {err / max(scale, 1e-300):.2e})'


@pytest.fixture(autouse=True, scope='module')
def one_thread():
    """Every tensor here is tiny (the whole file is ~3 s of CPU time on one thread): a second OpenMP
    thread only adds synchronisation, which on a loaded machine costs tens of seconds."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize('path', PATHS)
@pytest.mark.parametrize('case_name', list(CASES))
def test_model_matches_oracle(case_name, path):
    """Logits, every parameter gradient and the image gradient of one scalar loss, float64, against the
    oracle; with weights far from init so that every path shows in the output."""
    case = CASES[case_name]
    oracle = oracle_gradients(case_name)
    # the oracle read every tensor of the model: nothing in it is outside the design's function
    assert oracle['read'] == oracle['names'], f'not read by the oracle: {sorted(oracle["names"] - oracle["read"])}'
    # the weights are far enough from init for the logits to spread
    assert oracle['logits'].std() > 0.1

    model = randomised_model(case_name, 'reference' if path == 'reference' else 'auto')
    model.zero_grad(set_to_none=True)
    images = smooth_images(case['input'], seed=1).requires_grad_()
    with torch.autocast('cpu', dtype=torch.bfloat16, enabled=path == 'autocast'):
        logits = model(images)
    assert logits.dtype == torch.float64
    (logits * loss_weights(case)).sum().backward()

    assert_close_to_scale(logits, oracle['logits'], 'logits')
    assert_close_to_scale(images.grad, oracle['image_grad'], 'd loss / d image')
    params = dict(model.named_parameters())
    assert set(params) == set(oracle['grads'])
    for name, p in params.items():
        expected = oracle['grads'][name]
        assert expected is not None and expected.abs().max() > 0, f'{name}: no oracle gradient'
        assert p.grad is not None, f'{name}: no gradient in the model'
        assert_close_to_scale(p.grad, expected, f'd loss / d {name}')


@pytest.mark.parametrize('case_name', list(CASES))
def test_inference_outputs_match_oracle(case_name):
    """Without autograd the model takes its fused inference paths (on CPU the C kernels for the SCA's
    pixel features and the superpixel init): logits, per-stage associations (per head and head-merged)
    and hard labels; for hierarchical models the token -> group and pixel -> group associations."""
    case = CASES[case_name]
    cfg = oracle_config(case)
    model = randomised_model(case_name, 'auto')
    params = oracle_params(model)
    images = smooth_images(case['input'], seed=3)
    with torch.no_grad():
        oracle = oracle_forward(params, cfg, images)
        assert_close_to_scale(model(images), oracle['logits'], 'logits (inference)')
        stages = model.forward_superpixels(images, label_upsampling='repeat')
        groups = model.forward_groups(images, label_upsampling='repeat') if cfg.get('grouping') else []

    cell, (H, W), (h, w) = cfg['cell_size'], oracle['pixel_grid'], oracle['token_grid']
    stem_stride = images.shape[2] // H
    assert len(stages) == len(oracle['associations'])
    for k, (out, logits) in enumerate(zip(stages, oracle['associations'])):
        per_head = to_neighbour_layout(logits.softmax(dim=-1), (H, W), cell)  # (B, M, 9, H, W)
        merged_logits = merge_heads(logits)
        merged = to_neighbour_layout(merged_logits.softmax(dim=-1), (H, W), cell)  # (B, 9, H, W)
        assert_close_to_scale(out['association'], per_head, f'stage {k + 1} association')
        assert_close_to_scale(out['association_merged'], merged, f'stage {k + 1} merged association')
        # hard labels ('repeat'): argmax token of the merged logits, the own cell favoured by 1e-5 (§1.6),
        # each pixel-stream label repeated over its stem_stride x stem_stride input pixels
        own = (torch.arange(H)[:, None] // cell * w + torch.arange(W)[None, :] // cell).reshape(-1)
        scores = merged_logits.clone()
        scores[:, torch.arange(H * W), own] += 1e-5
        labels = scores.argmax(dim=-1).reshape(-1, H, W)
        labels = labels.repeat_interleave(stem_stride, dim=1).repeat_interleave(stem_stride, dim=2)
        assert torch.equal(out['labels'], labels), f'stage {k + 1} labels'
        assert torch.equal(out['grid'], torch.tensor([h, w]))

    if cfg.get('grouping'):
        (out,) = groups
        group_logits = oracle['group_logits']  # (B, M_g, h*w, G)
        assert_close_to_scale(out['superpixel_association'], group_logits.softmax(dim=-1), 'token -> group')
        merged_groups = merge_heads(group_logits).softmax(dim=-1)  # (B, h*w, G)
        assert_close_to_scale(out['superpixel_association_merged'], merged_groups, 'merged token -> group')
        # P(pixel -> g) = sum_s P(pixel -> s) P(s -> g), with the last stage's merged pixel association
        pixel_to_token = merge_heads(oracle['associations'][-1]).softmax(dim=-1)  # (B, H*W, h*w)
        pixel_to_group = (pixel_to_token @ merged_groups).transpose(1, 2).reshape(images.shape[0], -1, H, W)
        assert_close_to_scale(out['association_merged'], pixel_to_group, 'merged pixel -> group')


# --- golden outputs -------------------------------------------------------------------------------

GOLDEN = dict(model='spformer_tiny_sp16_224', depths=(1, 1), image=(2, 3, 32, 32), weight_seed=1234, image_seed=5678)


def golden_model():
    """spformer_tiny_sp16_224 with depths (1, 1), img_size 32, 10 classes, float64, weights from
    :func:`randomise_far_from_init` with ``GOLDEN['weight_seed']`` (which overwrites every tensor the
    constructor initialised, so the constructor's own random init does not matter)."""
    model = timm.create_model(GOLDEN['model'], img_size=GOLDEN['image'][2:], depths=GOLDEN['depths'],
                              num_classes=NUM_CLASSES, dtype=torch.float64)
    return randomise_far_from_init(model.eval(), GOLDEN['weight_seed'])


def golden_image():
    """A uint8 image from ``GOLDEN['image_seed']`` (stored as uint8: exact, and 6 KB)."""
    g = torch.Generator().manual_seed(GOLDEN['image_seed'])
    return torch.randint(0, 256, GOLDEN['image'], generator=g, dtype=torch.uint8)


def golden_input(image_uint8):
    """The model input: pixels in [-1, 1], float64 (exact arithmetic on every platform)."""
    return image_uint8.to(torch.float64) / 127.5 - 1


def golden_outputs(model, image_uint8):
    """The tensors the golden file holds: the image, the logits (float64) and the last stage's merged
    association (float32: 4.6 KB instead of 9)."""
    x = golden_input(image_uint8)
    with torch.no_grad():
        logits = model(x)
        association = model.forward_superpixels(x, label_upsampling='repeat')[-1]['association_merged']
    return dict(image=image_uint8, logits=logits, association_merged=association.float().contiguous())


def write_golden():
    from safetensors.torch import save_file
    os.makedirs(os.path.dirname(GOLDEN_PATH), exist_ok=True)
    save_file(golden_outputs(golden_model(), golden_image()), GOLDEN_PATH,
              metadata={'generator': 'tests/test_model_oracle.py --write-golden', **{k: str(v) for k, v in
                                                                                       GOLDEN.items()}})
    print(f'wrote {GOLDEN_PATH} ({os.path.getsize(GOLDEN_PATH)} bytes)')


def test_golden_outputs():
    """The model (and the oracle) reproduce the stored outputs of a fixed image and fixed random weights."""
    from safetensors.torch import load_file
    stored = load_file(GOLDEN_PATH)
    assert torch.equal(stored['image'], golden_image())  # the image generator itself has not moved
    model = golden_model()
    now = golden_outputs(model, stored['image'])
    assert_close_to_scale(now['logits'], stored['logits'], 'golden logits', tol=1e-9)
    assert_close_to_scale(now['association_merged'], stored['association_merged'], 'golden association', tol=1e-6)
    # the oracle, from the same weights, lands on the same numbers: the file pins the design, not the code
    cfg = dict(TINY, stem_layers=((32, 4, 4),), cell_size=4, depths=GOLDEN['depths'])
    with torch.no_grad():
        oracle = oracle_forward(oracle_params(model), cfg, golden_input(stored['image']))
    assert_close_to_scale(oracle['logits'], stored['logits'], 'oracle vs golden logits', tol=1e-9)
    H, W = oracle['pixel_grid']
    merged = to_neighbour_layout(merge_heads(oracle['associations'][-1]).softmax(dim=-1), (H, W), 4)
    assert_close_to_scale(merged.float(), stored['association_merged'], 'oracle vs golden association', tol=1e-6)


if __name__ == '__main__':
    if sys.argv[1:] == ['--write-golden']:
        write_golden()
    else:
        sys.exit(f'usage: python {sys.argv[0]} --write-golden   (run the tests with pytest)')
