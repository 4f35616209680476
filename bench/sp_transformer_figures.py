"""SP-Transformer's parameters and multiply-accumulates beside the paper's (arXiv 2309.16889).

    python bench/sp_transformer_figures.py          # print the tables (~1 min: meta device, no memory)
    python bench/sp_transformer_figures.py --doc    # also write them into docs/segmentation.md (DOC_PAGE)

Every registered ``sp_transformer_*`` configuration at its reference input (1024x2048 for the Cityscapes
ones, 640x640 for ADE20K); the three with published sizes (ResNet-50 and ConvNeXt-L Cityscapes, ResNet-50
ADE20K) also with the tokenizer's MLPs at the blocks' ratio 4 and without them (``tokenizer_mlp_ratio`` 4 and 0,
beside the default 1: the paper does not give their width, and these show how its sizes bound it); and the
paper's Table III ablation (ResNet-50, 1024x2048: 16x32 / 32x64 / 64x128 superpixels, 1 or 2 tokenizer layers)
for the three widths.

Counting: ``torch.utils.flop_counter.FlopCounterMode`` FLOPs / 2 = multiply-accumulates (GMACs), batch 1,
inference, attention on the math SDPA backend: the convention of ``spformer.demo.count_macs`` and the
README's model table. The counter sees matmuls, convolutions and attention (and our local attention
ops through the formulas they register), not normalizations, activations, softmaxes, resampling or
element-wise ops. Models are built and run on the meta device: shapes only, no memory, no weights, so
ConvNeXt-L at 1024x2048 costs nothing; one model is also counted on a real CPU forward at a small input
to check that the meta count is the same.

The paper's "GFLOPs" are multiply-accumulates: a plain ResNet-50 alone costs 171 GMACs (342 GFLOPs) at
1024x2048, more than the paper's whole ResNet-50 model (253 G) if those were FLOPs.
"""
import argparse
import datetime
import os
import sys
import time
from typing import Dict, List, Optional, Tuple

import torch
import timm
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from model_table import git_revision, machine_info, write_between_markers  # noqa: E402
import spformer  # noqa: E402,F401  (registers the models)
from spformer.demo import count_macs  # noqa: E402
from spformer.models.sp_transformer import SEGMENTATION_CONFIGS  # noqa: E402

START = '<!-- sp-transformer-figures:start -->'
END = '<!-- sp-transformer-figures:end -->'
DOC_PAGE = 'docs/segmentation.md'  # where the tables live, relative to the repository root (--doc writes there)

# The paper's figures (Zhu, Mei et al., "Superpixel Transformers for Efficient Semantic Segmentation", IROS 2023):
# (params in M, G multiply-accumulates) of the Cityscapes models at 1024x2048 and of the ResNet-50 ADE20K model (at
# its 640x640 crops, the input size these counts take for it).
PAPER = {
    'sp_transformer_r50_cityscapes': (29, 253),
    'sp_transformer_convnext_large_cityscapes': (202, 1557),
    'sp_transformer_r50_ade20k': (29, 78),
}
# Table III (ResNet-50, Cityscapes, 1024x2048): (superpixel grid, tokenizer layers) -> G. 253 G is the main model
# (32x64, 2 layers) and 404 G the largest grid; which of 234 and 240 G is the 16x32 grid and which the single
# tokenizer layer could not be read here (the paper's text was not at hand): both are kept as candidates.
PAPER_ABLATION = {((32, 64), 2): 253, ((64, 128), 2): 404}
PAPER_ABLATION_PAIR = (((16, 32), 2), ((32, 64), 1))  # 234 and 240 G, in an order not known here
PAPER_PAIR_VALUES = (234, 240)
ABLATION_GRIDS = ((16, 32), (32, 64), (64, 128))
ABLATION_LAYERS = (1, 2)
ORDER = ['sp_transformer_r50_cityscapes', 'sp_transformer_convnext_large_cityscapes', 'sp_transformer_r50_ade20k',
         'sp_transformer_convnext_large_ade20k', 'sp_transformer_r18_cityscapes',
         'sp_transformer_convnext_atto_cityscapes']
# The tokenizer MLPs' width (the paper does not give it): the default, the blocks' ratio, none.
DEFAULT = 'default (MLP ratio 1)'
VARIANTS = {DEFAULT: {}, 'MLP ratio 4': dict(tokenizer_mlp_ratio=4), 'no MLP': dict(tokenizer_mlp_ratio=0)}
PARTS = ('backbone', 'neck', 'tokenizer', 'blocks')


def build(name: str, device: str = 'meta', **kwargs) -> torch.nn.Module:
    """A model with ``timm.create_model`` on ``device`` (meta: shapes only), eval."""
    with torch.device(device):
        model = timm.create_model(name, **kwargs)
    return model.eval()


def count(model: torch.nn.Module, input_size: Tuple[int, int], device: str = 'meta') -> Dict[str, int]:
    """Multiply-accumulates of one forward (batch 1), in all and per part: ``torch.utils.flop_counter`` FLOPs / 2
    with the math SDPA backend, as ``spformer.demo.count_macs``; 'other' = association, classifier, unfolding."""
    x = torch.zeros(1, 3, *input_size, device=device)  # the count depends on shapes only
    counter = FlopCounterMode(display=False)
    with torch.inference_mode(), sdpa_kernel(SDPBackend.MATH), counter:
        model(x)
    flops = counter.get_flop_counts()
    root = type(model).__name__
    out = {'total': counter.get_total_flops() // 2}

    def module_flops(prefix: str) -> int:
        if prefix in flops:
            return sum(flops[prefix].values())
        children = [k for k in flops if k.startswith(prefix + '.') and '.' not in k[len(prefix) + 1:]]
        return sum(sum(flops[k].values()) for k in children)  # a ModuleList is never called itself

    for part in PARTS:
        out[part] = module_flops(f'{root}.{part}') // 2
    out['other'] = out['total'] - sum(out[p] for p in PARTS)
    return out


def describe(name: str, input_size: Tuple[int, int], **kwargs) -> Dict:
    model = build(name, **kwargs)
    macs = count(model, input_size)
    grid = (input_size[0] // model.token_stride, input_size[1] // model.token_stride)
    return dict(name=name, kwargs=kwargs, input_size=input_size, grid=grid,
                params=sum(p.numel() for p in model.parameters()), macs=macs)


def reference_size(name: str) -> Tuple[int, int]:
    return tuple(SEGMENTATION_CONFIGS[name]['img_size'])


def _pct(ours: float, paper: float) -> str:
    return f'{100 * (ours - paper) / paper:+.1f} %'


def _variant(kwargs: Dict) -> str:
    return next(name for name, kw in VARIANTS.items() if kw == kwargs)


def model_rows() -> List[Dict]:
    rows = []
    names = [n for n in ORDER if n in SEGMENTATION_CONFIGS] + sorted(set(SEGMENTATION_CONFIGS) - set(ORDER))
    for name in names:
        for kwargs in VARIANTS.values() if name in PAPER else ({},):
            rows.append(describe(name, reference_size(name), **kwargs))
            print(f'  {name} {_variant(kwargs)}: {rows[-1]["macs"]["total"] / 1e9:.1f} GMACs', file=sys.stderr)
    return rows


def format_models(rows: List[Dict]) -> str:
    lines = ['| model | tokenizer | input | superpixels | params (M) | paper | Δ | GMACs | paper G | Δ | '
             'backbone / neck / tokenizer / blocks / other GMACs |',
             '|---|---|---|---|---:|---:|---:|---:|---:|---:|---|']
    for r in rows:
        paper = PAPER.get(r['name'])
        params, macs = r['params'] / 1e6, r['macs']['total'] / 1e9
        p_params, d_params = (f'{paper[0]}', _pct(params, paper[0])) if paper else ('—', '')
        p_macs, d_macs = (f'{paper[1]}', _pct(macs, paper[1])) if paper else ('—', '')
        parts = ' / '.join(f"{r['macs'][p] / 1e9:.1f}" for p in PARTS + ('other',))
        h, w = r['grid']
        lines.append(f"| `{r['name']}` | {_variant(r['kwargs'])} | {r['input_size'][0]}x{r['input_size'][1]} | "
                     f'{h}x{w} | {params:.1f} | {p_params} | {d_params} | {macs:.1f} | {p_macs} | {d_macs} | {parts} |')
    return '\n'.join(lines)


def convention_rows() -> List[Dict]:
    """Plain timm classifiers (their heads included) at 224x224 and at 1024x2048."""
    rows = []
    for name in ('resnet50', 'convnext_large'):
        model = build(name)
        rows.append(dict(name=name, macs={size: count_macs(model, torch.empty(1, 3, *size, device='meta'))[0]
                                          for size in ((224, 224), (1024, 2048))}))
    return rows


def format_convention(rows: List[Dict], models: List[Dict]) -> str:
    paper = {'resnet50': PAPER['sp_transformer_r50_cityscapes'][1],
             'convnext_large': PAPER['sp_transformer_convnext_large_cityscapes'][1]}
    defaults = {m['name']: m for m in models if not m['kwargs']}
    ours = {'resnet50': defaults.get('sp_transformer_r50_cityscapes'),
            'convnext_large': defaults.get('sp_transformer_convnext_large_cityscapes')}
    lines = ['| classifier (timm) | GMACs at 224x224 | GMACs at 1024x2048 | = GFLOPs at 1024x2048 | '
             'paper\'s whole model at 1024x2048 (G) | our backbone in it (GMACs) |',
             '|---|---:|---:|---:|---:|---:|']
    for r in rows:
        small, big = r['macs'][(224, 224)] / 1e9, r['macs'][(1024, 2048)] / 1e9
        backbone = ours[r['name']]['macs']['backbone'] / 1e9 if ours.get(r['name']) else float('nan')
        lines.append(f"| `{r['name']}` | {small:.2f} | {big:.1f} | {2 * big:.1f} | {paper[r['name']]} | "
                     f'{backbone:.1f} |')
    return '\n'.join(lines)


def ablation_rows() -> List[Dict]:
    """Table III: sp_transformer_r50_cityscapes at 1024x2048 with the pixel stride kept at 8 and the cell size
    changed for the grid (8, 4, 2 pixel features per cell side), with 1 or 2 tokenizer layers."""
    name, size = 'sp_transformer_r50_cityscapes', (1024, 2048)
    stride = SEGMENTATION_CONFIGS[name]['pixel_stride']
    rows = []
    for grid in ABLATION_GRIDS:
        cell = size[0] // stride // grid[0]
        for layers in ABLATION_LAYERS:
            kw = dict(cell_size=cell, tokenizer_layers=layers)
            counted = {v: describe(name, size, **kw, **vkw) for v, vkw in VARIANTS.items()}
            rows.append(dict(grid=grid, cell=cell, layers=layers, params={v: c['params'] for v, c in counted.items()},
                             macs={v: c['macs']['total'] for v, c in counted.items()},
                             blocks=counted[DEFAULT]['macs']['blocks'], paper=PAPER_ABLATION.get((grid, layers))))
            print(f'  Table III {grid[0]}x{grid[1]}, {layers} layer(s): '
                  + ' / '.join(f'{m / 1e9:.1f}' for m in rows[-1]['macs'].values()) + ' GMACs', file=sys.stderr)
    return rows


def format_ablation(rows: List[Dict]) -> str:
    """One row per (grid, layers): params (M) / GMACs / Δ for each tokenizer variant, and the paper's G."""
    lines = ['| superpixels | cell (pixel features) | tokenizer layers | '
             + ' | '.join(f'{v}: params (M) | GMACs | Δ' for v in VARIANTS) + ' | paper G (Table III) |',
             '|---|---:|---:|' + '---:|---:|---:|' * len(VARIANTS) + '---:|']
    for r in rows:
        paper = r['paper']
        cells = ' | '.join(f"{r['params'][v] / 1e6:.1f} | {r['macs'][v] / 1e9:.1f} | "
                           f"{_pct(r['macs'][v] / 1e9, paper) if paper else ''}" for v in VARIANTS)
        if (r['grid'], r['layers']) in PAPER_ABLATION_PAIR:
            shown = ' or '.join(str(v) for v in PAPER_PAIR_VALUES) + ' (†)'
        else:
            shown = str(paper) if paper else '—'
        lines.append(f"| {r['grid'][0]}x{r['grid'][1]} | {r['cell']}x{r['cell']} | {r['layers']} | {cells} | {shown} |")
    return '\n'.join(lines)


def ordering(rows: List[Dict]) -> Dict[str, Dict[str, bool]]:
    """Whether our counts rise with the grid (at 2 layers) and with the layers (at each grid), as the paper's do
    (its 16x32 grid and its single layer both cost less than its 32x64, 2-layer model, whichever of 234 / 240 G
    each is, and its 64x128 grid more), for each tokenizer variant."""
    result = {}
    for key in VARIANTS:
        by = {(r['grid'], r['layers']): r['macs'][key] for r in rows}
        grids = all(by[(a, 2)] < by[(b, 2)] for a, b in zip(ABLATION_GRIDS, ABLATION_GRIDS[1:]))
        layers = all(by[(g, 1)] < by[(g, 2)] for g in ABLATION_GRIDS)
        result[key] = dict(grids=grids, layers=layers)
    return result


def acceptance(models: List[Dict]) -> str:
    """Which of the paper's models are within 5 % in parameters and 15 % in MACs, per tokenizer variant."""
    parts = []
    for r in models:
        paper = PAPER.get(r['name'])
        if paper is None:
            continue
        dp = r['params'] / 1e6 / paper[0] - 1
        dm = r['macs']['total'] / 1e9 / paper[1] - 1
        verdict = ('both met' if abs(dp) <= 0.05 and abs(dm) <= 0.15 else
                   'parameters only' if abs(dp) <= 0.05 else 'MACs only' if abs(dm) <= 0.15 else 'neither')
        parts.append(f"`{r['name']}` {_variant(r['kwargs'])}: {verdict} ({dp:+.1%}, {dm:+.1%})")
    return '; '.join(parts) + '.'


def cpu_check() -> Tuple[int, int, Tuple[int, int]]:
    """The meta count against a real CPU forward (random weights) of the same model at a small input."""
    name, size = 'sp_transformer_r50_cityscapes', (256, 512)
    meta = count(build(name), size)['total']
    torch.manual_seed(0)
    real = count(build(name, device='cpu'), size, device='cpu')['total']
    return meta, real, size


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--threads', type=int, default=os.cpu_count() or 1, help='torch intra-op threads (the CPU check)')
    p.add_argument('--doc', '--readme', nargs='?', const=os.path.join(os.path.dirname(os.path.dirname(
        os.path.abspath(__file__))), DOC_PAGE), default=None, metavar='PATH',
        help=f'rewrite the tables between the markers of PATH (default: {DOC_PAGE}, where they live)')
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    machine = machine_info(torch.get_num_threads())
    revision = git_revision()

    models = model_rows()
    convention = convention_rows()
    ablation = ablation_rows()
    order = ordering(ablation)
    meta, real, check_size = cpu_check()
    count_macs_r50 = count_macs(build('sp_transformer_r50_cityscapes'),
                                torch.empty(1, 3, 1024, 2048, device='meta'))[0]
    r50 = {_variant(m['kwargs']): m for m in models if m['name'] == 'sp_transformer_r50_cityscapes'}
    assert count_macs_r50 == r50[DEFAULT]['macs']['total'], (count_macs_r50, r50[DEFAULT]['macs']['total'])
    elapsed = time.perf_counter() - start

    def yes(b: bool) -> str:
        return 'yes' if b else 'NO'

    def order_line(key: str) -> str:
        o = order[key]
        return (f'{key}: 16x32 < 32x64 < 64x128 superpixels (2 layers) {yes(o["grids"])}; 1 layer < 2 layers '
                f'(every grid) {yes(o["layers"])}')

    by = {(r['grid'], r['layers']): r for r in ablation}
    grid_saving = (by[((32, 64), 2)]['macs'][DEFAULT] - by[((16, 32), 2)]['macs'][DEFAULT]) / 1e9
    grid_saving_blocks = (by[((32, 64), 2)]['blocks'] - by[((16, 32), 2)]['blocks']) / 1e9
    pair = [by[c] for c in PAPER_ABLATION_PAIR]
    fits = []
    for values in (PAPER_PAIR_VALUES, PAPER_PAIR_VALUES[::-1]):
        fits.append(', '.join(f"{r['grid'][0]}x{r['grid'][1]} / {r['layers']} layer{'s' if r['layers'] > 1 else ''} "
                              f"-> {v}: " + ' / '.join(_pct(r['macs'][k] / 1e9, v) for k in VARIANTS)
                              for r, v in zip(pair, values)))
    layer_saving = ', '.join(f"{(by[((32, 64), 2)]['macs'][k] - by[((32, 64), 1)]['macs'][k]) / 1e9:.1f} GMACs {k}"
                             for k in VARIANTS)
    r50_mlp_params = (r50[DEFAULT]['params'] - r50['no MLP']['params']) / 1e6
    args_shown = ' '.join(argv if argv is not None else sys.argv[1:])
    command = f'python bench/sp_transformer_figures.py {args_shown}'.rstrip()
    block = '\n'.join([
        format_models(models),
        '',
        format_convention(convention, models),
        '',
        'Table III of the paper (ResNet-50, Cityscapes, 1024x2048), counted the same way:',
        '',
        format_ablation(ablation),
        '',
        f'- Command: `{command}` ({datetime.date.today().isoformat()}, {revision}; {elapsed:.0f} s).',
        f'- Machine: {machine}. The counts do not depend on it: every model is built and run on the meta '
        f'device (shapes only; no weights, no memory); `sp_transformer_r50_cityscapes` at '
        f'{check_size[0]}x{check_size[1]} counts {meta / 1e9:.3f} GMACs on meta and {real / 1e9:.3f} in a real '
        f'CPU forward{"" if meta == real else " (DIFFERENT)"}.',
        '- GMACs: `torch.utils.flop_counter.FlopCounterMode` FLOPs / 2 (multiply-accumulates), batch 1, '
        'inference, attention on the math SDPA backend: the convention of `spformer.demo.count_macs` and the '
        "README's model table (the totals agree with `count_macs`). Counted: convolutions, matmuls, attention, "
        'and the local attention ops through their registered formulas; not counted: normalizations, '
        'activations, softmaxes, resampling, element-wise ops.',
        "- The paper's G are multiply-accumulates as well: the plain ResNet-50 classifier alone is "
        f"{convention[0]['macs'][(1024, 2048)] / 1e9:.0f} GMACs = {2 * convention[0]['macs'][(1024, 2048)] / 1e9:.0f} "
        'GFLOPs at 1024x2048, more than the paper\'s 253 G for the whole model if these were FLOPs (and '
        '4.1 GMACs at 224x224 is the figure usually quoted as ResNet-50\'s "4.1 GFLOPs").',
        '- Paper columns: copied from the paper, not measured (it gives no ConvNeXt-L ADE20K or small-backbone '
        'figures to set beside ours; its ADE20K input size is taken to be the 640x640 crop). Δ = ours / paper - 1. The tokenizer column: the width of the MLPs on the tokenizer\'s '
        'two paths (`tokenizer_mlp_ratio`), which the paper does not give: `default` is the registered '
        'configuration (ratio 1), `MLP ratio 4` the blocks\' ratio, `no MLP` attention only.',
        '- Table III: the grid is changed through the cell size (the pixel features stay at stride 8, '
        '128x256); `superpixels` at 1024x2048. 253 G is the paper\'s main model (32x64, 2 layers) and 404 G '
        f'its largest grid. (†) The paper\'s text was not at hand here (only its abstract could be read), so '
        f'which of 234 and 240 G is the 16x32 grid and which the single tokenizer layer is not known here; '
        f'either order (Δ for ' + ' / '.join(VARIANTS) + f'): {fits[0]}; or {fits[1]}. Here the 16x32 grid saves '
        f'{grid_saving:.1f} GMACs ({grid_saving_blocks:.1f} of them in the ViT blocks: 4x fewer tokens) and one '
        f'tokenizer layer fewer {layer_saving}.',
        '- Ordering: in the paper more superpixels and more tokenizer layers cost more (its 16x32 grid and its '
        'single layer both below 253 G, whichever is which, its 64x128 grid above). Here: '
        + '; '.join(order_line(k) for k in VARIANTS) + '.',
        '- Acceptance (params within 5 %, MACs within 15 % of the paper\'s): ' + acceptance(models) + ' Why '
        'ratio 1 is the default: the ResNet-50 model\'s backbone, neck, superpixel queries and blocks are fixed '
        'by the paper\'s description, and what is left of its 29M parameters and 253 G bounds the tokenizer\'s '
        f'MLPs: at ratio 4 they add {(r50["MLP ratio 4"]["params"] - r50["no MLP"]["params"]) / 1e6:.1f}M '
        'parameters (over 5 % above 29M), without them '
        f'{(253e9 - r50["no MLP"]["macs"]["total"]) / 1e9:.0f} GMACs are missing (over 15 % below 253 G); ratio 1 '
        f'adds {r50_mlp_params:.1f}M and {(r50[DEFAULT]["macs"]["total"] - r50["no MLP"]["macs"]["total"]) / 1e9:.0f} '
        'GMACs, within both. The paper does not describe its neck and tokenizer layers closely enough to say '
        'where its model spends the rest (anything costing MACs without parameters would close the gap: the '
        'neck at a finer stride, a dilated backbone stage); `SPTransformer`\'s docstring lists the choices made '
        'here.',
        '- What this does not show: speed (MACs are not time: the local attention and the association are '
        'memory-bound), memory, or accuracy.',
    ])
    print(block)
    print(f'({elapsed:.0f} s)', file=sys.stderr)
    if args.doc:
        write_between_markers(args.doc, block, START, END)
        print(f'updated {args.doc}', file=sys.stderr)
    return 0


if __name__ == '__main__':
    sys.exit(main())
