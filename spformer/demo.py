"""spformer-demo: run one SPFormer on one photo and draw its superpixels.

    spformer-demo                                  # spformer_small_sp16_224 on scikit-image's astronaut
    spformer-demo --model spformer_tiny_sp16_224 --image cat.jpg --out cat.png
    spformer-demo --checkpoint model.safetensors   # your own trained weights
    python -m spformer.demo --help

Prints the model, whether its weights are trained, parameters, GMACs, the output shape, the
top-5 ImageNet classes (trained weights only) and the number of superpixels per stage, and
writes a PNG with the superpixel boundaries of every stage and association head.
"""
import argparse
import os
import sys
import time
from typing import Any, List, Mapping, Optional, Tuple, Union

import torch
import timm
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode
from timm.data import create_transform, resolve_data_config

import spformer  # noqa: F401  (registers the spformer_* models with timm)
from spformer.visualize import save_superpixel_figure, tensor_to_image

__all__ = ['main', 'published_weights', 'count_macs']

_WEIGHT_KEYS = ('hf_hub_id', 'url', 'file')


def published_weights(cfg: Union[Mapping[str, Any], Any, None]) -> Optional[str]:
    """Where a pretrained cfg's weights come from ('hf_hub_id', 'url' or 'file'), or None if it has none.

    The registered SPFormer tags name their future Hub repos (``hf_hub_id``) before any weights are
    published there: those count as none until listed in ``PUBLISHED_WEIGHTS``.
    """
    from spformer.models.spformer import HF_HUB_ORG, PUBLISHED_WEIGHTS
    if cfg is None:
        return None
    if not isinstance(cfg, Mapping):
        cfg = cfg.to_dict()  # timm PretrainedCfg
    name = f"{cfg.get('architecture')}.{cfg.get('tag')}"
    for key in _WEIGHT_KEYS:
        if cfg.get(key):
            if key == 'hf_hub_id' and cfg[key] == f'{HF_HUB_ORG}/{name}' and name not in PUBLISHED_WEIGHTS:
                continue
            return f'{key}={cfg[key]}'
    return None


def count_macs(model: torch.nn.Module, x: torch.Tensor) -> Tuple[int, torch.Tensor]:
    """Multiply-accumulates of one forward (FLOPs / 2, ``torch.utils.flop_counter``), and its output.

    Attention runs on the math SDPA backend: the counter does not see the fused CPU kernel.
    """
    counter = FlopCounterMode(display=False)
    with torch.inference_mode(), sdpa_kernel(SDPBackend.MATH), counter:
        out = model(x)
    return counter.get_total_flops() // 2, out


def _load_image(path: Optional[str]):
    from PIL import Image
    if path is None:
        from skimage.data import astronaut
        return Image.fromarray(astronaut()), "scikit-image's astronaut"
    return Image.open(path).convert('RGB'), path


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog='spformer-demo',
        description='Run an SPFormer on one image: print its size and cost, draw its superpixels.')
    p.add_argument('--model', default='spformer_small_sp16_224',
                   help="model name, one of timm.list_models('spformer*') (default: %(default)s)")
    p.add_argument('--image', default=None, help="image file (default: scikit-image's astronaut)")
    p.add_argument('--out', default='spformer_demo.png', help='output PNG (default: %(default)s)')
    p.add_argument('--checkpoint', default=None, metavar='PATH',
                   help='load trained weights from this .safetensors file')
    p.add_argument('--device', default='cpu', help='torch device (default: %(default)s)')
    p.add_argument('--seed', type=int, default=0, help='seed of the random init when weights are untrained')
    return p


def main(argv: Optional[List[str]] = None) -> int:
    args = _parser().parse_args(argv)
    start = time.perf_counter()
    names = timm.list_models('spformer*')
    if args.model not in names:
        raise SystemExit(f'spformer-demo: unknown model {args.model!r}; choose one of: {", ".join(names)}')

    # Trained weights: a --checkpoint file, else whatever the model's pretrained cfg publishes.
    source = published_weights(timm.models.get_pretrained_cfg(args.model))
    if args.checkpoint is not None:
        if not os.path.isfile(args.checkpoint):
            raise SystemExit(f'spformer-demo: --checkpoint {args.checkpoint!r} is not a file')
        model = timm.create_model(args.model, pretrained=True, pretrained_cfg_overlay=dict(file=args.checkpoint))
        weights = f'loaded from --checkpoint {args.checkpoint}'
        trained = True
    elif source is not None:
        try:
            model = timm.create_model(args.model, pretrained=True)
        except Exception as e:  # offline, missing file, ...
            raise SystemExit(f'spformer-demo: could not load the published weights of {args.model} ({source}): '
                             f'{e}\nPass --checkpoint PATH to use a local file.')
        weights = f'trained, published ({source})'
        trained = True
    else:
        torch.manual_seed(args.seed)
        model = timm.create_model(args.model)
        weights = (f'UNTRAINED: random init (seed {args.seed}); no weights are published for {args.model} yet '
                   f'and no --checkpoint was given')
        trained = False
    model = model.to(args.device).eval()

    data_config = resolve_data_config(model=model)
    transform = create_transform(**data_config, is_training=False)
    image, image_name = _load_image(args.image)
    x = transform(image).unsqueeze(0).to(args.device)

    params = sum(p.numel() for p in model.parameters())
    macs, logits = count_macs(model, x)
    with torch.inference_mode():
        superpixels = model.forward_superpixels(x)

    print(f'model       : {args.model}')
    print(f'weights     : {weights}')
    if not trained:
        print('!' * 78)
        print('!!  WEIGHTS ARE UNTRAINED: the class scores are meaningless, and the superpixels')
        print('!!  below come from a random init (they follow colour/texture only).')
        print('!!  Use --checkpoint PATH (a .safetensors file) for trained weights.')
        print('!' * 78)
    print(f'image       : {image_name} -> {tuple(x.shape)} '
          f'(crop_pct {data_config["crop_pct"]}, {data_config["interpolation"]})')
    print(f'parameters  : {params / 1e6:.2f} M')
    print(f'GMACs       : {macs / 1e9:.3f} (batch 1, torch.utils.flop_counter, FLOPs / 2)')
    print(f'output      : {tuple(logits.shape)}')
    if trained and logits.shape[-1] == 1000:
        info = timm.data.ImageNetInfo()
        probs = logits.softmax(-1)[0]
        top = probs.topk(5)
        print('top-5       :')
        for p, i in zip(top.values.tolist(), top.indices.tolist()):
            print(f'  {p:6.1%}  {info.index_to_description(i)}')
    else:
        print('top-5       : not shown (untrained weights)' if not trained else
              f'top-5       : not shown ({logits.shape[-1]} classes, not ImageNet-1k)')
    for i, stage in enumerate(superpixels):
        h, w = (int(v) for v in stage['grid'])
        n = int(stage['labels'][0].unique().numel())
        print(f'stage {i + 1}     : {n} superpixel segments used of {h}x{w} = {h * w} tokens')

    img = tensor_to_image(x[0], data_config['mean'], data_config['std'])
    title = f'{args.model} ({"trained weights" if trained else "UNTRAINED weights"})'
    save_superpixel_figure(img, superpixels, args.out, title=title)
    print(f'wrote       : {args.out}')
    print(f'time        : {time.perf_counter() - start:.1f} s')
    return 0


if __name__ == '__main__':
    sys.exit(main())
