"""SP-Transformer's superpixel tokenizer on CPU: our local attention ops against the naive 9x copy.

One tokenizer layer of the Cityscapes configurations (``spformer.models.sp_transformer.TokenizerLayer``:
pixel features 128x256 at 256 channels, a 32x64 superpixel grid, cells of 4x4 pixels, 2 heads; batch 1,
fp32), three ways:

* ``auto``: the layer as the model runs it on CPU: ``superpixel_attention`` / ``pixel_attention`` with
  the fused C kernels, pixels in image layout;
* ``torch``: the same ops on the cell-major PyTorch backend (pixels cell-major, as the model keeps them
  with ``attn_backend='torch'``);
* ``naive``: the same layer, same weights, with the attention written the way the paper blames for a
  large share of its latency: every superpixel's 3x3-cell neighbourhood of pixels copied out into a
  (B, h*w, 9*cell*cell, C) tensor (keys and values), every pixel's 9 candidate superpixels into a
  (B, H*W, 9, C) tensor, then plain attention (matmul, masked softmax, matmul).

Each is timed for the attention alone (the two ops, on the layer's q/k/v) and for the whole layer
(norms, projections, both attentions, both MLPs), forward (``torch.no_grad``) and forward + backward,
as the median over interleaved rounds (every variant once per round, so load from other processes
hits all alike). Peak memory is the peak of torch-allocated CPU bytes during one call above what was
live before it (inputs, weights and upstream gradients excluded), replayed from the allocation and free
events of ``torch.profiler`` (``profile_memory=True``): it sees every tensor allocation, including
those made inside our custom ops and in the backward, which a TorchDispatchMode-based tracker (torch's
MemTracker) does not see inside a custom op; ``ru_maxrss`` would only give the process's high-water
mark (allocator caching, libraries, never going down), and ``tracemalloc`` does not see torch's
allocations at all. The C kernels' own scratch (a few KB per thread, plain ``malloc``) is not counted.

Before timing, the naive layer is checked equal to ``TokenizerLayer`` on a small shape with both
backends (``tests/test_sp_tokenizer_bench.py`` checks it in float64).

    python bench/sp_tokenizer.py                  # ~4 min on 2 busy cores
    python bench/sp_tokenizer.py --rounds 7       # more rounds, steadier medians
    python bench/sp_tokenizer.py --doc            # also write the table into docs/segmentation.md (DOC_PAGE)
"""
import argparse
import datetime
import inspect
import os
import statistics
import sys
import time
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from model_table import git_revision, machine_info, write_between_markers  # noqa: E402
from spformer.kernels import NEIGHBOR_OFFSETS, image_to_cells, native_pixel_layout, pixel_attention, \
    superpixel_attention  # noqa: E402
from spformer.models.sp_transformer import SPTransformer, TokenizerLayer  # noqa: E402

START = '<!-- sp-tokenizer:start -->'
END = '<!-- sp-tokenizer:end -->'
DOC_PAGE = 'docs/segmentation.md'  # where the table lives, relative to the repository root (--doc writes there)

# Cityscapes: 1024x2048 input, pixel stride 8 -> 128x256 pixel features, cells of 4 -> 32x64 superpixels.
CITYSCAPES = dict(batch=1, height=128, width=256, channels=256, cell=4, heads=2)
# The tokenizer MLPs' hidden ratio the models are built with (SPTransformer's default).
MODEL_MLP_RATIO = inspect.signature(SPTransformer).parameters['tokenizer_mlp_ratio'].default
BACKENDS = ('auto', 'torch')


# --- the naive tokenizer: 9x copies, then plain attention -----------------------------------------

def _heads_first(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, *grid, C) channels-last -> (B, M, *grid, C / M), a view."""
    return x.reshape(*x.shape[:-1], heads, x.shape[-1] // heads).movedim(-2, 1)


def _neighbour_valid(h: int, w: int, device) -> torch.Tensor:
    """(h, w, 9) bool: whether neighbour k (``NEIGHBOR_OFFSETS`` order) of each cell lies inside the grid."""
    ys = torch.arange(h, device=device)[:, None, None]
    xs = torch.arange(w, device=device)[None, :, None]
    dy = torch.tensor([o[0] for o in NEIGHBOR_OFFSETS], device=device)
    dx = torch.tensor([o[1] for o in NEIGHBOR_OFFSETS], device=device)
    return (ys + dy >= 0) & (ys + dy < h) & (xs + dx >= 0) & (xs + dx < w)


def _stack_neighbours(padded: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """(B, M, h+2, w+2, ...) zero-padded -> (B, M, h, w, 9, ...): each cell's 9 neighbours, copied out."""
    return torch.stack([padded[:, :, 1 + dy:1 + dy + h, 1 + dx:1 + dx + w] for dy, dx in NEIGHBOR_OFFSETS], dim=4)


def naive_superpixel_attention(q_s: torch.Tensor, k_p: torch.Tensor, v_p: torch.Tensor, cell: int,
                               heads: int) -> torch.Tensor:
    """Superpixels attend to the pixels of the 3x3 cells around them, with the neighbourhoods copied out.

    q_s (B, h, w, C), k_p / v_p (B, H, W, C) channels-last, H = h * cell. Keys and values are unfolded
    into (B, M, h*w, 9*cell*cell, C/M) (a 9x copy of the pixels each), then plain attention with the
    cells outside the image masked out. Returns (B, h, w, C)."""
    B, h, w, C = q_s.shape
    d = C // heads
    n = 9 * cell * cell

    def unfold(x):  # (B, H, W, C) -> (B, M, h*w, 9*cell*cell, d), the 9x copy
        x = _heads_first(x, heads)  # (B, M, H, W, d)
        x = F.pad(x, (0, 0, cell, cell, cell, cell))  # one zero cell around the image
        x = x.reshape(B, heads, h + 2, cell, w + 2, cell, d).transpose(3, 4)  # (B, M, h+2, w+2, c, c, d)
        return _stack_neighbours(x, h, w).reshape(B, heads, h * w, n, d)

    k, v = unfold(k_p), unfold(v_p)
    q = _heads_first(q_s, heads).reshape(B, heads, h * w, 1, d)
    logits = (q @ k.transpose(-1, -2)) * d ** -0.5  # (B, M, h*w, 1, n)
    valid = _neighbour_valid(h, w, q_s.device)[:, :, :, None].expand(h, w, 9, cell * cell).reshape(h * w, 1, n)
    attn = logits.masked_fill(~valid, float('-inf')).softmax(dim=-1)
    out = attn @ v  # (B, M, h*w, 1, d)
    return out.reshape(B, heads, h, w, d).movedim(1, -2).reshape(B, h, w, C)


def naive_pixel_attention(q_p: torch.Tensor, k_s: torch.Tensor, v_s: torch.Tensor, cell: int,
                          heads: int) -> torch.Tensor:
    """Pixels attend to the 9 superpixels around their cell, with each pixel's candidates copied out.

    q_p (B, H, W, C), k_s / v_s (B, h, w, C) channels-last. Keys and values of each pixel's 9 candidate
    superpixels are gathered into (B, M, H*W, 9, C/M) (9 superpixel vectors per pixel), then plain
    attention with the neighbours outside the image masked out. Returns (B, H, W, C)."""
    B, H, W, C = q_p.shape
    h, w = k_s.shape[1:3]
    d = C // heads

    def gather(x):  # (B, h, w, C) -> (B, M, H*W, 9, d), 9 superpixels copied to every pixel
        x = F.pad(_heads_first(x, heads), (0, 0, 1, 1, 1, 1))  # (B, M, h+2, w+2, d)
        x = _stack_neighbours(x, h, w)  # (B, M, h, w, 9, d)
        x = x[:, :, :, None, :, None].expand(B, heads, h, cell, w, cell, 9, d)
        return x.reshape(B, heads, H * W, 9, d)

    k, v = gather(k_s), gather(v_s)
    q = _heads_first(q_p, heads).reshape(B, heads, H * W, 1, d)
    logits = (q @ k.transpose(-1, -2)) * d ** -0.5  # (B, M, H*W, 1, 9)
    valid = _neighbour_valid(h, w, q_p.device)[:, None, :, None].expand(h, cell, w, cell, 9).reshape(H * W, 1, 9)
    attn = logits.masked_fill(~valid, float('-inf')).softmax(dim=-1)
    out = attn @ v  # (B, M, H*W, 1, d)
    return out.reshape(B, heads, H, W, d).movedim(1, -2).reshape(B, H, W, C)


def naive_tokenizer_layer(layer: TokenizerLayer, pixels: torch.Tensor, superpixels: torch.Tensor,
                          pixel_pos: torch.Tensor, sp_pos: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """``layer``'s forward (its weights, image layout) with the naive attention of this module in place of
    ``superpixel_attention`` / ``pixel_attention``."""
    M, cell = layer.num_heads, layer.cell_size
    p, s = layer.px_norm(pixels), layer.sp_norm(superpixels)
    q_s, k_s = layer.sp_qk(s + sp_pos).chunk(2, dim=-1)
    q_p, k_p = layer.px_qk(p + pixel_pos).chunk(2, dim=-1)
    v_s, v_p = layer.sp_v(s), layer.px_v(p)
    superpixels = superpixels + layer.drop_path(layer.sp_proj(naive_superpixel_attention(q_s, k_p, v_p, cell, M)))
    pixels = pixels + layer.drop_path(layer.px_proj(naive_pixel_attention(q_p, k_s, v_s, cell, M)))
    if layer.has_mlp:
        superpixels = superpixels + layer.drop_path(layer.sp_mlp(layer.sp_mlp_norm(superpixels)))
        pixels = pixels + layer.drop_path(layer.px_mlp(layer.px_mlp_norm(pixels)))
    return pixels, superpixels


# --- our layer and ops, in the layout each backend reads --------------------------------------------

def to_layout(x: torch.Tensor, cell: int, layout: str) -> torch.Tensor:
    """Channels-last pixels (B, H, W, C) (or a (H, W, C) table) in ``layout`` ('image' or cell-major 'cells')."""
    if layout == 'image':
        return x
    batched = x if x.dim() == 4 else x[None]
    out = image_to_cells(batched[:, None], cell)[:, 0]
    return out if x.dim() == 4 else out[0]


def from_layout(x: torch.Tensor, cell: int, layout: str) -> torch.Tensor:
    """Inverse of :func:`to_layout` for (B, ...) pixel tensors."""
    if layout == 'image':
        return x
    B, h, w, _, C = x.shape
    return x.reshape(B, h, w, cell, cell, C).transpose(2, 3).reshape(B, h * cell, w * cell, C)


def make_layer(channels: int, heads: int, cell: int, mlp_ratio: float = MODEL_MLP_RATIO, dtype=torch.float32,
               seed: int = 0) -> TokenizerLayer:
    """A TokenizerLayer as SPTransformer builds it (eval), with random weights, biases and norms."""
    torch.manual_seed(seed)
    layer = TokenizerLayer(channels, heads, cell, mlp_ratio, 0., 'auto', dtype=dtype).eval()
    with torch.no_grad():
        for p in layer.parameters():  # non-trivial norms and biases, so that a mix-up would show
            p.add_(torch.randn_like(p) * 0.1)
    return layer


def make_inputs(batch: int, height: int, width: int, channels: int, cell: int, dtype=torch.float32,
                seed: int = 1) -> Dict[str, torch.Tensor]:
    """Channels-last pixels (B, H, W, C), superpixels (B, h, w, C) and position tables, image layout."""
    g = torch.Generator().manual_seed(seed)
    h, w = height // cell, width // cell
    return dict(
        pixels=torch.randn(batch, height, width, channels, generator=g, dtype=dtype),
        superpixels=torch.randn(batch, h, w, channels, generator=g, dtype=dtype),
        pixel_pos=torch.randn(height, width, channels, generator=g, dtype=dtype) * 0.5,
        sp_pos=torch.randn(h, w, channels, generator=g, dtype=dtype) * 0.5,
    )


def run_layer(layer: TokenizerLayer, inputs: Dict[str, torch.Tensor], variant: str):
    """The layer's (pixels (B, H, W, C) image layout, superpixels) by ``variant``: 'naive' or a backend."""
    if variant == 'naive':
        return naive_tokenizer_layer(layer, **inputs)
    layer.attn_backend = variant
    layout = native_pixel_layout(variant, inputs['pixels'].device)
    cell = layer.cell_size
    pixels, superpixels = layer(to_layout(inputs['pixels'], cell, layout), inputs['superpixels'],
                                to_layout(inputs['pixel_pos'], cell, layout), inputs['sp_pos'], layout)
    return from_layout(pixels, cell, layout), superpixels


def attention_inputs(layer: TokenizerLayer, inputs: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """The layer's q/k/v of both paths for ``inputs``, channels-last (B, ..., C), detached."""
    with torch.no_grad():
        p, s = layer.px_norm(inputs['pixels']), layer.sp_norm(inputs['superpixels'])
        q_s, k_s = layer.sp_qk(s + inputs['sp_pos']).chunk(2, dim=-1)
        q_p, k_p = layer.px_qk(p + inputs['pixel_pos']).chunk(2, dim=-1)
        v_s, v_p = layer.sp_v(s), layer.px_v(p)
    return {k: v.contiguous() for k, v in dict(q_s=q_s, k_s=k_s, v_s=v_s, q_p=q_p, k_p=k_p, v_p=v_p).items()}


def ops_call(qkv: Dict[str, torch.Tensor], cell: int, heads: int, variant: str, requires_grad: bool):
    """(call, its leaf inputs): both attentions on ``qkv`` by ``variant``; the call returns (superpixel
    out (B, h, w, C), pixel out in the variant's layout). Inputs are prepared in the layout the variant
    reads (the model keeps pixels that way), outside the call."""
    if variant == 'naive':
        leaves = {k: v.detach().clone().requires_grad_(requires_grad) for k, v in qkv.items()}

        def call():
            return (naive_superpixel_attention(leaves['q_s'], leaves['k_p'], leaves['v_p'], cell, heads),
                    naive_pixel_attention(leaves['q_p'], leaves['k_s'], leaves['v_s'], cell, heads))
        return call, leaves
    layout = native_pixel_layout(variant, qkv['q_p'].device)
    leaves = {k: (to_layout(v, cell, layout) if k.endswith('_p') else v).detach().clone().requires_grad_(requires_grad)
              for k, v in qkv.items()}

    def merge(x):  # (B, M, *grid, d) -> (B, *grid, M * d)
        x = x.movedim(1, -2)
        return x.reshape(*x.shape[:-2], -1)

    def call():
        split = {k: _heads_first(v, heads) for k, v in leaves.items()}
        sp = superpixel_attention(split['q_s'], split['k_p'], split['v_p'], cell, backend=variant, pixel_layout=layout)
        px = pixel_attention(split['q_p'], split['k_s'], split['v_s'], cell, backend=variant, pixel_layout=layout)
        return merge(sp), merge(px)
    return call, leaves


# --- checks and measurements ---------------------------------------------------------------------------

def check_equal(dtype=torch.float32, shape=None, backends=BACKENDS) -> Dict[str, float]:
    """Max |naive - ours| of the layer's two outputs and of the two ops, per backend, on a small shape
    (a 3x5 grid: every cell a border cell or next to one); raises AssertionError where they differ."""
    shape = shape or dict(batch=2, height=12, width=20, channels=16, cell=4, heads=2)
    tol = dict(rtol=1e-4, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-9, atol=1e-10)
    layer = make_layer(shape['channels'], shape['heads'], shape['cell'], dtype=dtype)
    inputs = make_inputs(shape['batch'], shape['height'], shape['width'], shape['channels'], shape['cell'], dtype)
    qkv = attention_inputs(layer, inputs)
    diffs = {}
    with torch.no_grad():
        ref_layer = run_layer(layer, inputs, 'naive')
        ref_ops = ops_call(qkv, shape['cell'], shape['heads'], 'naive', False)[0]()
        for backend in backends:
            got_layer = run_layer(layer, inputs, backend)
            layout = native_pixel_layout(backend, qkv['q_p'].device)
            sp, px = ops_call(qkv, shape['cell'], shape['heads'], backend, False)[0]()
            got_ops = (sp, from_layout(px, shape['cell'], layout))
            for what, ref, got in (('layer', ref_layer, got_layer), ('ops', ref_ops, got_ops)):
                names = ('superpixels', 'pixels') if what == 'ops' else ('pixels', 'superpixels')
                for name, a, b in zip(names, ref, got):
                    assert a.shape == b.shape, (what, backend, name, a.shape, b.shape)
                    torch.testing.assert_close(b, a, **tol, msg=lambda m: f'{what} {backend} {name}: {m}')
                    diffs[f'{what}/{backend}/{name}'] = float((a - b).abs().max())
    return diffs


def peak_mb(call: Callable[[], None]) -> float:
    """Peak torch-allocated CPU bytes (MB) during one ``call()`` above what was live before it: the
    allocation and free events of torch.profiler, replayed in time order."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        call()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == '[memory]']
    events.sort(key=lambda e: e.start_ns())
    live = peak = 0
    for e in events:
        live += e.nbytes()
        peak = max(peak, live)
    return peak / 2 ** 20


def build_cases(shape: Dict[str, int], mlp_ratio: float = MODEL_MLP_RATIO) -> List[Dict]:
    """Per (part, variant): a forward closure (no_grad) and a forward + backward closure."""
    cell, heads = shape['cell'], shape['heads']
    layer = make_layer(shape['channels'], heads, cell, mlp_ratio)
    inputs = make_inputs(shape['batch'], shape['height'], shape['width'], shape['channels'], cell)
    qkv = attention_inputs(layer, inputs)
    g = torch.Generator().manual_seed(2)
    grad_px = torch.randn(inputs['pixels'].shape, generator=g)
    grad_sp = torch.randn(inputs['superpixels'].shape, generator=g)
    cases = []
    for variant in BACKENDS + ('naive',):
        layout = 'image' if variant == 'naive' else native_pixel_layout(variant, torch.device('cpu'))
        g_px = to_layout(grad_px, cell, layout)
        # the layer, pixels (and their position table) already in the layout the variant reads, as the
        # model keeps them from layer to layer
        leaves = {k: (to_layout(v, cell, layout) if k.startswith('pixel') else v).detach().clone()
                  .requires_grad_(k in ('pixels', 'superpixels')) for k, v in inputs.items()}

        def layer_call(variant=variant, leaves=leaves, layout=layout):
            if variant == 'naive':
                return naive_tokenizer_layer(layer, **leaves)
            layer.attn_backend = variant
            return layer(leaves['pixels'], leaves['superpixels'], leaves['pixel_pos'], leaves['sp_pos'], layout)

        def layer_fwd(layer_call=layer_call):
            with torch.no_grad():
                layer_call()

        def layer_fwd_bwd(layer_call=layer_call, leaves=leaves, g_px=g_px):
            for p in list(layer.parameters()) + [leaves['pixels'], leaves['superpixels']]:
                p.grad = None
            px, sp = layer_call()
            torch.autograd.backward((px, sp), (g_px, grad_sp))

        cases.append(dict(part='layer', variant=variant, fwd=layer_fwd, fwd_bwd=layer_fwd_bwd))
        # the two ops alone
        call, op_leaves = ops_call(qkv, cell, heads, variant, True)

        def ops_fwd(call=call):
            with torch.no_grad():
                call()

        def ops_fwd_bwd(call=call, op_leaves=op_leaves, g_px=g_px):
            for t in op_leaves.values():
                t.grad = None
            sp, px = call()
            torch.autograd.backward((sp, px), (grad_sp, g_px))

        cases.append(dict(part='ops', variant=variant, fwd=ops_fwd, fwd_bwd=ops_fwd_bwd))
    for case in cases:
        case['times'] = {'fwd': [], 'fwd_bwd': []}
    return cases


def measure(cases: List[Dict], rounds: int, warmup: int):
    for case in cases:  # warm-up, then peaks (the allocator and the C kernels' first-use costs out of the way)
        for _ in range(warmup):
            case['fwd']()
            case['fwd_bwd']()
        case['peak'] = {kind: peak_mb(case[kind]) for kind in ('fwd', 'fwd_bwd')}
        print(f"  {case['part']:5s} {case['variant']:5s} peak MB: forward {case['peak']['fwd']:.0f}, "
              f"forward+backward {case['peak']['fwd_bwd']:.0f}", file=sys.stderr)
    for r in range(rounds):
        for kind in ('fwd', 'fwd_bwd'):
            for case in cases:
                t = time.perf_counter()
                case[kind]()
                case['times'][kind].append(time.perf_counter() - t)
        print(f'  round {r + 1}/{rounds} done', file=sys.stderr)
    for case in cases:
        case['ms'] = {kind: 1e3 * statistics.median(ts) for kind, ts in case['times'].items()}


LABELS = {'auto': 'ours, C kernels (`auto` on CPU)', 'torch': "ours, torch backend (`'torch'`)",
          'naive': 'naive 9x copy + plain attention'}


def format_table(cases: List[Dict]) -> str:
    lines = ['| part | implementation | forward ms | forward + backward ms | forward peak MB | '
             'forward + backward peak MB | naive / this: time (fwd, fwd+bwd) | naive / this: peak (fwd, fwd+bwd) |',
             '|---|---|---:|---:|---:|---:|---:|---:|']
    for part, title in (('ops', 'the two attentions'), ('layer', 'whole TokenizerLayer')):
        rows = [c for c in cases if c['part'] == part]
        naive = next(c for c in rows if c['variant'] == 'naive')
        for c in rows:
            if c['variant'] == 'naive':
                t_ratio = p_ratio = '1 (reference)'
            else:
                t_ratio = ', '.join(f"{naive['ms'][k] / c['ms'][k]:.1f}x" for k in ('fwd', 'fwd_bwd'))
                p_ratio = ', '.join(f"{naive['peak'][k] / max(c['peak'][k], 1e-9):.1f}x" for k in ('fwd', 'fwd_bwd'))
            lines.append(f"| {title} | {LABELS[c['variant']]} | {c['ms']['fwd']:.1f} | {c['ms']['fwd_bwd']:.1f} | "
                         f"{c['peak']['fwd']:.0f} | {c['peak']['fwd_bwd']:.0f} | {t_ratio} | {p_ratio} |")
    return '\n'.join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--rounds', type=int, default=5, help='timed rounds (every variant once per round; median)')
    p.add_argument('--warmup', type=int, default=1, help='untimed calls per variant first')
    p.add_argument('--threads', type=int, default=os.cpu_count() or 1, help='torch intra-op threads (default: all cores)')
    p.add_argument('--height', type=int, default=CITYSCAPES['height'], help='pixel feature rows (default: %(default)s)')
    p.add_argument('--width', type=int, default=CITYSCAPES['width'], help='pixel feature columns (default: %(default)s)')
    p.add_argument('--mlp-ratio', type=float, default=MODEL_MLP_RATIO,
                   help="the tokenizer MLPs' hidden ratio (default: the models', %(default)s)")
    p.add_argument('--doc', '--readme', nargs='?', const=os.path.join(os.path.dirname(os.path.dirname(
        os.path.abspath(__file__))), DOC_PAGE), default=None, metavar='PATH',
        help=f'rewrite the table between the markers of PATH (default: {DOC_PAGE}, where it lives)')
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    shape = dict(CITYSCAPES, height=args.height, width=args.width)
    if shape['height'] % shape['cell'] or shape['width'] % shape['cell']:
        p.error(f"--height and --width must be multiples of the cell size {shape['cell']}")
    machine = machine_info(torch.get_num_threads())
    revision = git_revision()
    load_before = os.getloadavg()[0]
    start = time.perf_counter()

    diffs = check_equal()
    worst = max(diffs.values())
    print(f'naive == ours on a small shape (fp32): max |difference| {worst:.1e} over {len(diffs)} outputs',
          file=sys.stderr)
    cases = build_cases(shape, args.mlp_ratio)
    measure(cases, args.rounds, args.warmup)
    elapsed = time.perf_counter() - start
    load = f'{load_before:.1f} before, {os.getloadavg()[0]:.1f} after'

    H, W, C, cell, M = shape['height'], shape['width'], shape['channels'], shape['cell'], shape['heads']
    h, w = H // cell, W // cell
    copy_mb = 2 * (h * w * 9 * cell * cell + H * W * 9) * C * 4 / 2 ** 20
    command = 'python bench/sp_tokenizer.py' + (' ' + ' '.join(argv if argv is not None else sys.argv[1:])).rstrip()
    block = '\n'.join([
        format_table(cases),
        '',
        f'- Command: `{command}` ({datetime.date.today().isoformat()}, {revision}; {elapsed / 60:.0f} min).',
        f'- Machine: {machine}; 1-min load average {load} (a load above the core count means other jobs shared the CPU).',
        f'- Shapes: one tokenizer layer at the Cityscapes configurations\' shapes: pixel features {H}x{W}x{C}, '
        f'{h}x{w} superpixels, cells of {cell}x{cell}, {M} heads, MLP ratio {args.mlp_ratio:g}, batch 1, fp32, eval. "The two '
        f'attentions": `superpixel_attention` + `pixel_attention` (or their naive forms) on the layer\'s '
        f'q/k/v, pixels already in the layout the implementation reads; "whole TokenizerLayer": norms, '
        f'projections, both attentions and both MLPs.',
        f'- Naive: the same weights and the same results (checked before timing: max |difference| '
        f'{worst:.1e} on a small shape; `tests/test_sp_tokenizer_bench.py` in float64), with the keys and '
        f'values of every superpixel\'s 3x3 cells of pixels copied into (B, h*w, 9*cell*cell, C) tensors and '
        f'those of every pixel\'s 9 candidate superpixels into (B, H*W, 9, C) tensors: {copy_mb / 2:.0f} MB of '
        f'copies per path (the two paths run one after the other, so their copies are not live together), '
        f'before any gradient.',
        f'- Times: median of {args.rounds} interleaved rounds after {args.warmup} warm-up call(s); forward '
        f'under `torch.no_grad`, forward + backward with the gradients of the inputs (and of the layer\'s '
        f'weights) computed. Peaks: torch-allocated CPU bytes above those live before the call (inputs, '
        f'weights, upstream gradients not counted), replayed from `torch.profiler`\'s allocation events '
        f'(`profile_memory=True`), which include the allocations inside our custom ops and in the backward.',
        '- What this does not show: GPU times (the paper\'s latencies are on an accelerator, where the copies '
        'cost bandwidth rather than CPU time), the rest of the model (backbone, neck, blocks), and batch '
        'sizes above 1.',
    ])
    print(block)
    print(f'({elapsed:.0f} s)', file=sys.stderr)
    if args.doc:
        write_between_markers(args.doc, block, START, END)
        print(f'updated {args.doc}', file=sys.stderr)
    return 0


if __name__ == '__main__':
    sys.exit(main())
