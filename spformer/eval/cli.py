"""``spformer-eval-superpixels``: zero-shot superpixel quality of models beside a regular patch grid
and SLIC with the same number of segments (docs/design.md §3).

    spformer-eval-superpixels VOCdevkit/VOC2012 --model spformer_small_sp16_224=weights.safetensors
    spformer-eval-superpixels BSR/BSDS500/data --model hf-hub:org/repo --model spformer_tiny_sp16_224
    spformer-eval-superpixels my_folder --methods slic patch --segments 196
    python -m spformer.eval --help

Datasets: :func:`spformer.eval.datasets.open_dataset` (Pascal VOC 2012, BSDS500 or a plain folder of
images and label PNGs); their images are read by :mod:`spformer.images` (16-bit PNG/TIFF scaled by
their full range, not clipped; an unreadable image stops the run with its file named). Models come
from :func:`spformer.hub.checkpoint.load_model`; the scoring is :func:`spformer.eval.evaluate`.
"""
import argparse
import os
import sys
from typing import List, Optional

from spformer.cli import DEBUG_HELP, check_output_dir, run_main
from spformer.eval.datasets import LAYOUTS, open_dataset
from spformer.eval.evaluation import evaluate, format_table, write_results
from spformer.eval.metrics import InputError
from spformer.eval.segmenters import LEVELS, ModelSuperpixels, PatchGrid, Segmenter, Slic
from spformer.hub.checkpoint import load_model

__all__ = ['main']


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog='spformer-eval-superpixels',
        description='Score superpixels against segmentation ground truth: models beside the patch grid and SLIC '
                    'at the same number of segments (oracle mIoU/mAcc, ASA, boundary recall, '
                    'undersegmentation error, compactness). Images are read by spformer.images (16-bit PNG/TIFF '
                    'scaled by their full range, not clipped).',
        epilog=DEBUG_HELP)
    p.add_argument('dataset', help='dataset folder: Pascal VOC 2012, BSDS500, Cityscapes, ADE20K, or images/ + labels/')
    p.add_argument('--layout', default='auto', choices=['auto', *LAYOUTS],
                   help='dataset layout (default: detect)')
    p.add_argument('--split', default=None, help="split: VOC 'val' (default), 'train'; BSDS500 'test' (default), 'val'; Cityscapes 'val' "
                        "(default), 'train'; ADE20K 'validation' (default), 'training'")
    p.add_argument('--model', action='append', default=[], metavar='SPEC',
                   help="a model to score (repeatable): registered name, 'hf-hub:ORG/REPO', a training folder "
                        "('local-dir:FOLDER' or FOLDER), 'NAME=FILE.safetensors', or FILE.safetensors beside its "
                        "config.json")
    p.add_argument('--methods', nargs='*', default=['patch', 'slic'], choices=['patch', 'slic'],
                   help='baselines (default: patch slic; give the flag alone for none)')
    p.add_argument('--stage', type=int, default=-1, help='model stage, 1-based (default: -1, the last)')
    p.add_argument('--head', default='merged', help="'merged' (default) or an association head number, 1-based")
    p.add_argument('--level', default='superpixel', choices=list(LEVELS), help='what to score (default: %(default)s)')
    p.add_argument('--label-upsampling', default='bilinear', choices=['bilinear', 'repeat'],
                   help="how a model's hard maps reach the input resolution: 'bilinear' resamples the association "
                        "logits in superpixel perspective, as the SPFormer authors do; 'repeat' repeats the pixel "
                        "stream's argmax (boundaries step by its stride) (default: %(default)s)")
    p.add_argument('--segments', type=int, default=None,
                   help="segments of the baselines (default: the models' token count, else 196)")
    p.add_argument('--input-size', type=int, default=None,
                   help="side of the square input the images are resized to "
                        "(default: the models' input size, else 224)")
    p.add_argument('--score-at', default='gt', choices=['gt', 'input'],
                   help="'gt': resize segment maps to the ground truth (nearest; default); "
                        "'input': resize the ground truth to the input size (nearest)")
    p.add_argument('--tolerance', type=int, default=2, help='boundary recall tolerance in pixels (default: 2)')
    p.add_argument('--ignore-index', default='255',
                   help="label of pixels to skip for voc/folder, or 'none' (default: 255)")
    p.add_argument('--slic-compactness', type=float, default=10.0, help='SLIC compactness (default: 10)')
    p.add_argument('--slic-runs', type=int, default=4,
                   help="SLIC runs per image to match the segment count (default: 4; 1: scikit-image's n_segments "
                        "as is, which often leaves 20-40%% fewer segments)")
    p.add_argument('--limit', type=int, default=None, help='evaluate only the first N images')
    p.add_argument('--batch-size', type=int, default=8, help='images per model batch (default: 8)')
    p.add_argument('--pictures', type=int, default=4, help='comparison PNGs for the first N images (default: 4)')
    p.add_argument('--out-dir', default='superpixel_eval',
                   help='where results.csv, results.json, per_image.csv and pictures/ go (default: %(default)s)')
    p.add_argument('--device', default='cpu', help='torch device (default: cpu)')
    p.add_argument('--seed', type=int, default=0, help='seed of the random init of untrained models')
    p.add_argument('--no-progress', action='store_true', help='no progress bar')
    return p


def main(argv: Optional[List[str]] = None) -> int:
    """spformer-eval-superpixels: errors the user can fix (a bad argument, dataset folder or image, a model
    that cannot be loaded, an --out-dir that cannot be written) end it with one line naming the file or
    argument (:func:`spformer.cli.run_main`; ``SPFORMER_DEBUG=1`` for the traceback)."""
    args = _parser().parse_args(argv)
    return run_main('spformer-eval-superpixels', _run, args)


def _run(args: argparse.Namespace) -> int:
    if args.ignore_index.lower() == 'none':
        ignore_index = None
    elif args.ignore_index.isdigit():
        ignore_index = int(args.ignore_index)
    else:
        raise InputError(f"--ignore-index {args.ignore_index!r}: expected a label value (e.g. 255) or 'none'")
    for flag, value, low in (('--tolerance', args.tolerance, 0), ('--pictures', args.pictures, 0),
                             ('--batch-size', args.batch_size, 1), ('--segments', args.segments, 1),
                             ('--slic-runs', args.slic_runs, 1),
                             ('--input-size', args.input_size, 1), ('--limit', args.limit, 1)):
        if value is not None and value < low:
            raise InputError(f'{flag} {value}: expected an integer >= {low}')
    if not args.model and not args.methods:
        raise InputError('nothing to evaluate: give --model SPEC and/or --methods patch slic')
    check_output_dir(args.out_dir, '--out-dir')  # before the models are loaded and the images scored
    dataset = open_dataset(args.dataset, args.layout, args.split, ignore_index)

    models: List[ModelSuperpixels] = []
    for spec in args.model:
        loaded = load_model(spec, argument='--model', seed=args.seed, device=args.device)
        models.append(ModelSuperpixels(loaded.model.eval(), spec, args.stage, args.head, args.level, loaded.weights,
                                       args.device, trained=loaded.trained, label_upsampling=args.label_upsampling))
    if models:
        sizes = {m.input_size for m in models}
        if len(sizes) > 1:
            listed = ', '.join(f'{m.name}: {m.input_size}' for m in models)
            raise InputError(f'--model: the models take different input sizes ({listed}); '
                             f'evaluate them in separate runs so the baselines match each')
        input_size = sizes.pop()
        if args.input_size is not None and (args.input_size, args.input_size) != input_size:
            raise InputError(f'--input-size {args.input_size}: the models take {input_size[0]}x{input_size[1]}; '
                             f'leave --input-size out or make it match')
        tokens = {m.tokens for m in models}
        if args.segments is None and len(tokens) > 1:
            listed = ', '.join(f'{m.name}: {m.tokens}' for m in models)
            raise InputError(f'--model: the models use different token counts ({listed}); '
                             f'give --segments N for the baselines or evaluate them separately')
        segments = args.segments if args.segments is not None else tokens.pop()
    else:
        input_size = (args.input_size or 224,) * 2
        segments = args.segments or 196

    baselines: List[Segmenter] = []
    for method in dict.fromkeys(args.methods):
        baselines.append(PatchGrid(segments) if method == 'patch' else
                         Slic(segments, args.slic_compactness, max_runs=args.slic_runs))

    print(f'dataset   : {dataset.describe()}')
    print(f'input     : every image resized to {input_size[1]}x{input_size[0]} (bicubic); ' + (
        'segment maps resized to the ground truth with nearest neighbour (--score-at gt)' if args.score_at == 'gt'
        else 'ground truth resized to the input with nearest neighbour (--score-at input)'))
    if baselines:
        print(f'baselines : {", ".join(m.name for m in baselines)} with {segments} segments')
    untrained = False
    for m in models:
        print(f'model     : {m.name}: {m.weights}; {m.level.noun} of stage {m.stage_number}, '
              f'{"merged heads" if m.head == "merged" else f"head {m.head}"}, {m.tokens} tokens, hard maps '
              f'{"resampled in superpixel perspective" if m.label_upsampling == "bilinear" else "repeated"} to the '
              f'input (--label-upsampling {m.label_upsampling})')
        untrained |= not m.trained
    if untrained:
        print('!!  UNTRAINED weights: their superpixels come from a random init and say nothing about the method.')

    picture_dir = os.path.join(args.out_dir, 'pictures')
    result = evaluate(dataset, baselines + models, input_size, args.score_at, args.tolerance, args.limit,
                      args.batch_size, args.pictures, picture_dir, progress=not args.no_progress)
    result.config.update(segments=segments, weights={m.name: m.weights for m in models},
                         label_upsampling=args.label_upsampling if models else None,
                         slic=dict(compactness=args.slic_compactness, runs=args.slic_runs)
                         if 'slic' in args.methods else None)
    paths = write_results(result, args.out_dir)
    print()
    print(format_table(result.summary))
    print()
    pooled = 'one confusion matrix over the dataset' if dataset.label_kind == 'class' else 'per ground truth, averaged'
    print(f'mIoU/mAcc: oracle (majority label per segment), {pooled}; '
          f'BR: tolerance {args.tolerance} px; UE: Neubert-Protzel; CO: Schick et al.; '
          f'segments: mean used per image.')
    pictures = f' and {len(result.pictures)} pictures in {picture_dir}' if result.pictures else ''
    print(f'wrote     : {", ".join(paths)}{pictures}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
