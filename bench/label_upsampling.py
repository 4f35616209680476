"""Hard superpixel maps at input resolution: resampled logits (the default) against the repeated stride-s argmax.

    python bench/label_upsampling.py [--model spformer_small_sp16_224] [--seed 0] [--runs 5]

On scikit-image's astronaut (resized to the model's input size, as spformer-eval-superpixels does), with
the model's random init of ``--seed`` (no weights are published yet), per stage: how many input pixels
change superpixel, the boundary recall of each map against the other (2-pixel tolerance: how many of one
map's boundary pixels the other map has nearby), the segments used, and the time of ``forward_superpixels``
in each mode (median of ``--runs``). Prints a Markdown table.
"""
import argparse
import statistics
import time

import numpy as np
import timm
import torch
from skimage.data import astronaut

import spformer  # noqa: F401  (registers the models)
from spformer.eval import boundary_recall, num_segments, resize_image


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--model', default='spformer_small_sp16_224')
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--runs', type=int, default=5)
    args = p.parse_args()

    torch.manual_seed(args.seed)
    model = timm.create_model(args.model).eval()
    cfg = timm.data.resolve_data_config({}, model=model)
    image = resize_image(astronaut(), tuple(cfg['input_size'][1:]))
    x = torch.tensor(image).permute(2, 0, 1)[None].float().div(255)
    x = (x - torch.tensor(cfg['mean']).view(1, 3, 1, 1)) / torch.tensor(cfg['std']).view(1, 3, 1, 1)

    maps, seconds = {}, {}
    with torch.inference_mode():
        for mode in ('bilinear', 'repeat'):
            model.forward_superpixels(x, label_upsampling=mode)  # warm-up
            times = []
            for _ in range(args.runs):
                t = time.perf_counter()
                stages = model.forward_superpixels(x, label_upsampling=mode)
                times.append(time.perf_counter() - t)
            maps[mode] = [s['labels'][0].numpy() for s in stages]
            seconds[mode] = statistics.median(times)

    print(f'{args.model}, random init (seed {args.seed}), astronaut at {image.shape[1]}x{image.shape[0]}; '
          f'forward_superpixels {seconds["bilinear"] * 1e3:.0f} ms (bilinear) vs {seconds["repeat"] * 1e3:.0f} ms '
          f'(repeat), median of {args.runs}, {torch.get_num_threads()} threads')
    print()
    print('| stage | pixels that change superpixel | BR of bilinear against repeat | BR of repeat against '
          'bilinear | segments bilinear | segments repeat |')
    print('|---|---:|---:|---:|---:|---:|')
    for i, (new, old) in enumerate(zip(maps['bilinear'], maps['repeat'])):
        # boundary_recall(segments, reference): the reference's boundary pixels with a segment boundary nearby
        print(f'| {i + 1} | {np.mean(new != old):.1%} | {boundary_recall(new, old, ignore_index=None):.1%} | '
              f'{boundary_recall(old, new, ignore_index=None):.1%} | {num_segments(new)} | {num_segments(old)} |')


if __name__ == '__main__':
    main()
