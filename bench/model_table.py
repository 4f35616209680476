"""The model table of the README: size, cost and CPU speed of every SPFormer (and DeiT baselines).

    python bench/model_table.py                         # print the table and the machine
    python bench/model_table.py --doc                   # also rewrite the table in README.md (DOC_PAGE)
    python bench/model_table.py --models spformer_tiny_sp16_224 --runs 3

Per model: token grid, parameters, GMACs (batch 1, default input size; FLOPs / 2 from
``torch.utils.flop_counter`` with the math SDPA backend so attention is counted) and CPU inference throughput (``--batch-size`` images, eval,
``torch.inference_mode``, ``--warmup`` untimed runs per model, then up to ``--runs`` timed
runs taken in rounds over all models, fewer once ``--budget-s`` is spent; the fastest run and
the median run are reported: on a shared machine the fastest is the one that estimates idle speed).
The paper's GFLOPs and top-1 are copied from the SPFormer and DeiT papers for reference, not measured
(the hierarchical variants, docs/design.md §2, have no published numbers).
"""
import argparse
import datetime
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from typing import Dict, List, Optional

import torch
import timm

from spformer.demo import count_macs
from spformer.hub.checkpoint import weights_source

START = '<!-- model-table:start -->'
END = '<!-- model-table:end -->'
DOC_PAGE = 'README.md'  # where the table lives, relative to the repository root (--doc writes it there)

BASELINES = ['deit_tiny_patch16_224', 'deit_small_patch16_224']
REFERENCE = 'deit_small_patch16_224'  # the speed column is relative to this model

# (GFLOPs, ImageNet-1k top-1) as published: SPFormer paper (arXiv 2401.02931), DeiT paper.
PAPER = {
    'spformer_tiny_sp16_224': ('1.3', '73.6'),
    'spformer_small_sp16_224': ('4.9', '81.0'),
    'spformer_base_sp16_224': ('17.0–18.5', '82.4'),
    'spformer_small_sp32_224': ('~1.2', '76.1'),
    'spformer_small_sp56_224': ('~0.5', '72.3'),
    'spformer_small_sp32_448': ('~4.9', '81.3'),
    'deit_tiny_patch16_224': ('1.3', '72.2'),
    'deit_small_patch16_224': ('4.6', '79.9'),
}


def _paper_order(name: str):
    """tiny, small, base first, then the coarser and larger-input variants (the paper's order), then the
    hierarchical variants (global groups before local ones)."""
    m = re.fullmatch(r'spformer_(hier_)?(tiny|small|base)(_local)?_sp(\d+)_(\d+)', name)
    if m is None:  # a name outside the scheme: last, alphabetically
        return (True, 0, 0, 0, 0, 0, name)
    hier, size, local, sp, img = bool(m.group(1)), m.group(2), bool(m.group(3)), int(m.group(4)), int(m.group(5))
    return (False, hier, sp != 16 or img != 224, img, sp, local, ('tiny', 'small', 'base').index(size))


def replace_between_markers(text: str, content: str, start: str = START, end: str = END) -> str:
    """Replace what lies between the ``start`` and ``end`` marker lines of ``text`` with ``content``.

    The markers stay; everything between them is replaced. Raises ValueError if either marker
    is missing, appears twice, or the end marker comes first.
    """
    for marker in (start, end):
        n = text.count(marker)
        if n != 1:
            raise ValueError(f'expected the marker {marker!r} exactly once, found it {n} times')
    i, j = text.index(start) + len(start), text.index(end)
    if j < i:
        raise ValueError(f'{end!r} comes before {start!r}')
    return text[:i] + '\n' + content.strip('\n') + '\n' + text[j:]


def write_between_markers(path: str, content: str, start: str = START, end: str = END) -> None:
    """Rewrite what lies between the marker lines of the page at ``path`` (:func:`replace_between_markers`): the
    new text is made before the file is opened for writing, so a page without its markers is left as it was."""
    with open(path) as f:
        text = replace_between_markers(f.read(), content, start, end)
    with open(path, 'w') as f:
        f.write(text)


def machine_info(threads: int) -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open('/proc/cpuinfo') as f:
            cpu = next(line.split(':', 1)[1].strip() for line in f if line.startswith('model name'))
    except (OSError, StopIteration):
        pass
    return (f'{cpu}, {os.cpu_count()} cores, {threads} threads; torch {torch.__version__}, '
            f'timm {timm.__version__}, Python {platform.python_version()}')


def describe(name: str) -> Dict:
    """Build one model (eval) and measure what does not depend on time: grid, parameters, MACs."""
    model = timm.create_model(name).eval()
    input_size = tuple(model.pretrained_cfg['input_size'])
    grid = getattr(model, 'grid_size', None) or model.patch_embed.grid_size
    macs, _ = count_macs(model, torch.randn(1, *input_size))
    return dict(
        name=name,
        model=model,
        grid=tuple(grid),
        input_size=input_size,
        params=sum(p.numel() for p in model.parameters()),
        macs=macs,
        weights=weights_source(model.pretrained_cfg),
        times=[],
    )


def time_models(rows: List[Dict], batch_size: int, warmup: int, runs: int, budget_s: float, min_runs: int = 3):
    """Throughput of every row's model, in rounds: one timed forward of each model per round.

    Interleaving spreads a burst of load from other processes over all models instead of
    ruining one row. Stops after ``runs`` rounds, or earlier once ``min_runs`` rounds are done
    and the timed forwards have taken ``budget_s`` seconds in all.
    """
    inputs = {r['name']: torch.randn(batch_size, *r['input_size']) for r in rows}
    spent = 0.0
    with torch.inference_mode():
        for r in rows:
            for _ in range(warmup):
                r['model'](inputs[r['name']])
        for i in range(runs):
            if i >= min_runs and spent >= budget_s:
                break
            for r in rows:
                t = time.perf_counter()
                r['model'](inputs[r['name']])
                r['times'].append(time.perf_counter() - t)
                spent += r['times'][-1]
    for r in rows:
        r['img_s'] = batch_size / min(r['times'])
        r['img_s_median'] = batch_size / statistics.median(r['times'])


def git_revision() -> str:
    """Short commit of the measured code, '+ local changes' when the model or kernels differ from it."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        rev = subprocess.run(['git', 'rev-parse', '--short', 'HEAD'], cwd=root, capture_output=True,
                             text=True, check=True).stdout.strip()
        dirty = subprocess.run(['git', 'status', '--porcelain', '--', 'spformer', 'kernels'], cwd=root,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return 'unknown commit'
    return f'commit {rev}' + (' + local changes' if dirty else '')


def format_table(rows: List[Dict]) -> str:
    ref = next((r['img_s'] for r in rows if r['name'] == REFERENCE), None)
    lines = [
        '| model | input | tokens | params (M) | GMACs | CPU img/s | (median) | vs DeiT-S | paper GFLOPs | paper top-1 | weights |',
        '|---|---|---|---|---|---|---|---|---|---|---|',
    ]
    for r in rows:
        gflops, top1 = PAPER.get(r['name'], ('—', '—'))
        h, w = r['grid']
        rel = f'{r["img_s"] / ref:.2f}×' if ref else '—'
        if r['weights'] is None:
            weights = 'none published yet'
        elif r['weights'].startswith('hf_hub_id='):
            weights = r['weights'][len('hf_hub_id='):]
        else:
            weights = r['weights']
        lines.append(
            f'| `{r["name"]}` | {r["input_size"][-1]} | {h}×{w} = {h * w} | {r["params"] / 1e6:.2f} | '
            f'{r["macs"] / 1e9:.3f} | {r["img_s"]:.1f} | {r["img_s_median"]:.1f} | {rel} | {gflops} | {top1} | {weights} |')
    return '\n'.join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--models', nargs='+', default=None,
                   help="models to measure (default: timm.list_models('spformer*') and the DeiT-T/S baselines)")
    p.add_argument('--batch-size', type=int, default=8)
    p.add_argument('--threads', type=int, default=os.cpu_count() or 1, help='torch intra-op threads (default: all cores)')
    p.add_argument('--warmup', type=int, default=1, help='untimed runs per model')
    p.add_argument('--runs', type=int, default=7, help='timed runs per model (rounds over all models, at most)')
    p.add_argument('--budget-s', type=float, default=120.0,
                   help='stop starting new rounds after this many timed seconds in all, once 3 rounds are done')
    p.add_argument('--doc', '--readme', nargs='?', const=os.path.join(os.path.dirname(os.path.dirname(
        os.path.abspath(__file__))), DOC_PAGE), default=None, metavar='PATH',
        help=f'rewrite the table between the markers of PATH (default: {DOC_PAGE}, where it lives)')
    args = p.parse_args(argv)

    torch.set_num_threads(args.threads)
    models = args.models or (sorted(timm.list_models('spformer*'), key=_paper_order) + BASELINES)
    machine = machine_info(torch.get_num_threads())
    revision = git_revision()  # before measuring: others may commit meanwhile
    load_before = os.getloadavg()[0]
    print(f'machine: {machine}; 1-min load average {load_before:.1f}', file=sys.stderr)
    start = time.perf_counter()
    rows = []
    for name in models:
        rows.append(describe(name))
        print(f'  {name}: {rows[-1]["macs"] / 1e9:.3f} GMACs', file=sys.stderr)
    time_models(rows, args.batch_size, args.warmup, args.runs, args.budget_s)
    for r in rows:
        print(f'  {r["name"]}: {r["img_s"]:.1f} img/s best, {r["img_s_median"]:.1f} median of {len(r["times"])} ('
              f'{", ".join(f"{t:.2f}" for t in r["times"])} s)', file=sys.stderr)
    load = f'{load_before:.1f} before, {os.getloadavg()[0]:.1f} after'

    command = 'python bench/model_table.py' + (' ' + ' '.join(argv if argv is not None else sys.argv[1:])).rstrip()
    block = '\n'.join([
        format_table(rows),
        '',
        f'- Command: `{command}` ({datetime.date.today().isoformat()}, {revision}).',
        f'- Machine: {machine}; 1-min load average {load} (above the core count means other jobs '
        f'shared the CPU and slowed every row).',
        '- GMACs: batch 1 at the default input size, `torch.utils.flop_counter` FLOPs / 2 with the math '
        'SDPA backend so attention is counted; the local pixel/superpixel attention ops '
        '(`torch.ops.spformer.*`) register their own formula. These are the MACs this implementation '
        'executes: its SCA never builds the pixel q|k|v ([design §1.5](docs/design.md#15-the-projection-free-sca)), '
        'which the paper\'s structure '
        'computes for the same result.',
        f'- CPU img/s: batch {args.batch_size}, eval, `torch.inference_mode`, random weights (speed does not '
        f'depend on them); {args.warmup} warm-up, then {len(rows[0]["times"])} timed runs taken in rounds '
        f'over all models, so that load from other processes hits every row alike. CPU img/s and vs DeiT-S '
        f'use the fastest run (closest to an idle machine), (median) the median run; a median well below '
        f'the best means other jobs shared the cores during the measurement.',
        '- Paper columns: copied from the SPFormer and DeiT papers for reference, not measured here '
        '(none exist for the `spformer_hier_*` models). '
        "The authors' code, counted as here, gives 1.400 (T), 5.155 (S), 19.087 (B) and 0.522 (S/56) "
        'GMACs: the difference is the pixel q|k|v projection. Compare GMACs with the DeiT rows measured here.',
    ])
    print(block)
    print(f'({time.perf_counter() - start:.0f} s)', file=sys.stderr)
    if args.doc:
        write_between_markers(args.doc, block)
        print(f'updated {args.doc}', file=sys.stderr)
    return 0


if __name__ == '__main__':
    sys.exit(main())
