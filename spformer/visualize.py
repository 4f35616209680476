"""``spformer-visualize``: draw a model's superpixels on any image.

    spformer-visualize IMAGE --model spformer_small_sp16_224 [--out superpixels.png]
    spformer-visualize IMAGE --model spformer_hier_small_sp16_224 --level group

draws every stage and association head of a model's superpixels (or a hierarchical model's groups)
on an image (:func:`main`). The model comes from :func:`spformer.hub.checkpoint.load_model`, its hard
maps from :class:`spformer.eval.ModelSuperpixels`, the figure from :mod:`spformer.pictures` (whose
drawing functions are also importable from here, as before they moved).
"""
import argparse
import os
import sys
from typing import List, Optional

from spformer.cli import DEBUG_HELP, check_output_file, make_parent, run_main
from spformer.eval.datasets import read_image
from spformer.eval.segmenters import LEVELS, ModelSuperpixels, resize_image
from spformer.hub.checkpoint import load_model
from spformer.images import ImageReadError
from spformer.pictures import (
    save_comparison_figure, save_stages_figure, save_superpixel_figure, stage_labels, superpixel_boundaries,
    tensor_to_image,
)

# main, and the drawing functions of spformer.pictures at their old address
__all__ = ['main', 'superpixel_boundaries', 'tensor_to_image', 'stage_labels', 'save_superpixel_figure',
           'save_stages_figure', 'save_comparison_figure']


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog='spformer-visualize',
        description="Draw a model's superpixels (or groups) of every stage and association head on one image.",
        epilog=DEBUG_HELP)
    p.add_argument('image', help='image file (any PIL format; 16-bit PNG/TIFF are scaled to 8 bits, not clipped)')
    p.add_argument('--model', required=True, metavar='SPEC',
                   help="registered name, 'hf-hub:ORG/REPO', a training folder ('local-dir:FOLDER' or FOLDER), "
                        "'NAME=FILE.safetensors', or FILE.safetensors beside its config.json")
    p.add_argument('--out', default=None, help='output PNG (default: <image name>_superpixels.png, _groups.png)')
    p.add_argument('--level', default='superpixel', choices=list(LEVELS), help='what to draw (default: %(default)s)')
    p.add_argument('--label-upsampling', default='bilinear', choices=['bilinear', 'repeat'],
                   help="'bilinear': association logits resampled to the image in superpixel perspective, as the "
                        "SPFormer authors draw superpixels; 'repeat': the pixel stream's argmax repeated "
                        "(default: %(default)s)")
    p.add_argument('--device', default='cpu', help='torch device (default: cpu)')
    p.add_argument('--seed', type=int, default=0, help='seed of the random init of untrained models')
    return p


def main(argv: Optional[List[str]] = None) -> int:
    """spformer-visualize IMAGE --model SPEC: the image resized to the model's input size (as
    spformer-eval-superpixels does, no crop), then a PNG of every stage's and head's segments.

    Errors the user can fix (an unreadable IMAGE, an --out that cannot be written, a bad --model) end
    it with one line naming the file or argument, before the model is built (:func:`spformer.cli.run_main`)."""
    args = _parser().parse_args(argv)
    return run_main('spformer-visualize', _run, args)


def _run(args: argparse.Namespace) -> int:
    out = args.out or os.path.splitext(os.path.basename(args.image))[0] + f'_{LEVELS[args.level].noun}.png'
    check_output_file(out, '--out')
    try:
        image = read_image(args.image)  # spformer.images: 16-bit images scaled, not clipped
    except ImageReadError as e:
        raise ImageReadError(f'IMAGE: {e}', e.path, e.reason) from e
    loaded = load_model(args.model, argument='--model', seed=args.seed, device=args.device)
    segmenter = ModelSuperpixels(loaded.model.eval(), args.model, level=args.level, weights=loaded.weights,
                                 device=args.device, trained=loaded.trained, label_upsampling=args.label_upsampling)
    resized = resize_image(image, segmenter.input_size)
    stages = segmenter.stages(resized[None])
    level = LEVELS[args.level]
    print(f'model   : {args.model}: {loaded.weights}')
    if not loaded.trained:
        print(f'!!  UNTRAINED weights: these {level.noun} come from a random init (colour/texture only).')
    print(f'image   : {args.image} ({image.shape[1]}x{image.shape[0]}) resized to '
          f'{resized.shape[1]}x{resized.shape[0]}')
    for i, stage in enumerate(stages):
        h, w = stage['grid']
        used = [int(stage['merged'][0].unique().numel())] + [int(x[0].unique().numel()) for x in stage['heads']]
        print(f'stage {stage.get("stage", i + 1)} : {used[0]} of {h * w} {level.noun} (merged heads); per head: '
              f'{", ".join(str(u) for u in used[1:])}')
    title = f'{args.model}: {loaded.title}'
    make_parent(out)
    save_stages_figure(resized, stages, out, title=title, noun=level.noun)
    print(f'wrote   : {out}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
