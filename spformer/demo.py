"""spformer-demo: run one SPFormer on one photo and draw its superpixels.

    spformer-demo                                  # spformer_small_sp16_224 on scikit-image's astronaut
    spformer-demo --model spformer_tiny_sp16_224 --image cat.jpg --out cat.png
    spformer-demo --checkpoint out/run/final       # your own weights: a training folder or a .safetensors file
    spformer-demo --model hf-hub:ORG/NAME          # any model reference (spformer.hub.load_model)
    python -m spformer.demo --help

Prints the model, where its weights come from, parameters, GMACs, the output shape, the top
classes (trained weights only) and the number of superpixels per stage, and writes a PNG with the
superpixel boundaries of every stage and association head.

The image is read by :func:`spformer.images.open_rgb`, as every spformer tool reads images: 16-bit
PNG/TIFF scaled by their full range (not clipped to black and white), EXIF orientation applied.
An unreadable image, a model that cannot be loaded or an ``--out`` that cannot be written is named
in one line (exit status 1) before the model is built; ``SPFORMER_DEBUG=1`` shows the traceback.
"""
import argparse
import os
import sys
import time
from typing import List, Optional, Tuple

import torch
import timm
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode
from timm.data import create_transform, resolve_data_config

import spformer  # noqa: F401  (registers the spformer_* models with timm)
from spformer.cli import DEBUG_HELP, check_output_file, make_parent, run_main
from spformer.hub.checkpoint import load_model
from spformer.images import ImageReadError, open_rgb
from spformer.pictures import save_superpixel_figure, tensor_to_image

__all__ = ['main', 'count_macs']

DEFAULT_MODEL = 'spformer_small_sp16_224'


def count_macs(model: torch.nn.Module, x: torch.Tensor) -> Tuple[int, torch.Tensor]:
    """Multiply-accumulates of one forward (FLOPs / 2, ``torch.utils.flop_counter``), and its output.

    Attention runs on the math SDPA backend: the counter does not see the fused CPU kernel.
    """
    counter = FlopCounterMode(display=False)
    with torch.inference_mode(), sdpa_kernel(SDPBackend.MATH), counter:
        out = model(x)
    return counter.get_total_flops() // 2, out


def _load_image(path: Optional[str]):
    """The image as 8-bit RGB (:func:`spformer.images.open_rgb`: 16-bit images scaled, not clipped), and its name."""
    if path is None:
        from PIL import Image
        from skimage.data import astronaut
        return Image.fromarray(astronaut()), "scikit-image's astronaut"
    return open_rgb(path), path


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog='spformer-demo',
        description='Run an SPFormer on one image: print its size and cost, draw its superpixels.',
        epilog=DEBUG_HELP)
    p.add_argument('--model', default=None, metavar='REF',
                   help=f"registered name (timm.list_models('spformer*')), 'hf-hub:ORG/NAME', a training folder or "
                        f"'NAME=FILE.safetensors' (default: {DEFAULT_MODEL}, or the model --checkpoint names)")
    p.add_argument('--image', default=None, help="image file, any PIL format; 16-bit PNG/TIFF are scaled to 8 bits, "
                                                 "not clipped (default: scikit-image's astronaut)")
    p.add_argument('--out', default='spformer_demo.png', help='output PNG (default: %(default)s)')
    p.add_argument('--checkpoint', default=None, metavar='PATH',
                   help="your weights: a training output folder (e.g. out/run/final: its better-validating "
                        "weights) or a .safetensors file (its model from --model, else from the config.json beside it)")
    p.add_argument('--device', default='cpu', help='torch device (default: %(default)s)')
    p.add_argument('--seed', type=int, default=0, help='seed of the random init when weights are untrained '
                                                       '(default: %(default)s)')
    return p


def _reference(args) -> Tuple[str, Optional[str]]:
    """The model reference the flags make, and the architecture --model asks for (checked against it)."""
    if args.checkpoint is None:
        return args.model or DEFAULT_MODEL, None
    if not os.path.exists(args.checkpoint):
        raise SystemExit(f'spformer-demo: --checkpoint {args.checkpoint!r} does not exist; expected a training '
                         f'output folder or a .safetensors file')
    if args.model is not None and os.path.isfile(args.checkpoint) and timm.is_model(args.model):
        return f'{args.model}={args.checkpoint}', None
    return args.checkpoint, args.model


def main(argv: Optional[List[str]] = None) -> int:
    args = _parser().parse_args(argv)
    return run_main('spformer-demo', _run, args)


def _run(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    reference, model_name = _reference(args)
    # The cheap checks first: the output path and the image, before the model is built.
    check_output_file(args.out, '--out')
    try:
        image, image_name = _load_image(args.image)
    except ImageReadError as e:
        raise ImageReadError(f'--image: {e}', e.path, e.reason) from e
    loaded = load_model(reference, argument='--checkpoint' if args.checkpoint else '--model',
                        model_name=model_name, seed=args.seed)
    model, trained = loaded.model, loaded.trained
    name = model.pretrained_cfg.get('architecture') or reference
    if not callable(getattr(model, 'forward_superpixels', None)):
        raise SystemExit(f'spformer-demo: --model {reference!r} is a {type(model).__name__}, which makes no '
                         f"superpixels; expected an SPFormer (timm.list_models('spformer*'))")
    model = model.to(args.device).eval()

    data_config = resolve_data_config(model=model)
    transform = create_transform(**data_config, is_training=False)
    x = transform(image).unsqueeze(0).to(args.device)

    params = sum(p.numel() for p in model.parameters())
    macs, logits = count_macs(model, x)
    with torch.inference_mode():
        superpixels = model.forward_superpixels(x)

    print(f'model       : {name}' + (f' ({reference})' if reference != name else ''))
    print(f'weights     : {loaded.weights}')
    if not trained:
        print('!' * 78)
        print('!!  WEIGHTS ARE UNTRAINED: the class scores are meaningless, and the superpixels')
        print('!!  below come from a random init (they follow colour/texture only).')
        print('!!  Use --checkpoint PATH (a training folder or a .safetensors file) for trained weights.')
        print('!' * 78)
    print(f'image       : {image_name} -> {tuple(x.shape)} '
          f'(crop_pct {data_config["crop_pct"]}, {data_config["interpolation"]})')
    print(f'parameters  : {params / 1e6:.2f} M')
    print(f'GMACs       : {macs / 1e9:.3f} (batch 1, torch.utils.flop_counter, FLOPs / 2)')
    print(f'output      : {tuple(logits.shape)}')
    num_classes = logits.shape[-1]
    label_names = model.pretrained_cfg.get('label_names')
    if label_names is None and num_classes == 1000:
        info = timm.data.ImageNetInfo()
        label_names = [info.index_to_description(i) for i in range(1000)]
    if trained and num_classes > 0:
        top = logits.softmax(-1)[0].topk(min(5, num_classes))
        print(f'top-{len(top.indices)}       :' + ('' if label_names else ' (class indices: the weights carry no label names)'))
        for p, i in zip(top.values.tolist(), top.indices.tolist()):
            print(f'  {p:6.1%}  {label_names[i] if label_names else i}')
    else:
        print('top classes : not shown (untrained weights)' if num_classes else 'top classes : none (no classifier)')
    for i, stage in enumerate(superpixels):
        h, w = (int(v) for v in stage['grid'])
        n = int(stage['labels'][0].unique().numel())
        print(f'stage {i + 1}     : {n} superpixel segments used of {h}x{w} = {h * w} tokens')

    img = tensor_to_image(x[0], data_config['mean'], data_config['std'])
    title = f'{name}: {loaded.title}'
    make_parent(args.out)
    save_superpixel_figure(img, superpixels, args.out, title=title)
    print(f'wrote       : {args.out}')
    print(f'time        : {time.perf_counter() - start:.1f} s')
    return 0


if __name__ == '__main__':
    sys.exit(main())
