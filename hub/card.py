"""The model card (``README.md``) of a published SPFormer, and the superpixel picture it shows.

timm's own card (``timm.models._hub.generate_readme``) takes a free-form dict; this one is built
from what a checkpoint knows about itself (its ``config.json``, training configuration and
evaluation results) so every field is either true or left out.
"""
import math
import pathlib
from typing import Any, Dict, List, Mapping, Optional, Sequence, Union

import numpy as np
import torch
import yaml

__all__ = ['model_card', 'save_superpixel_picture', 'resolve_datasets', 'split_metrics', 'public_train_config',
           'PICTURE_NAME']

PICTURE_NAME = 'superpixels.png'
TAGS = ('image-classification', 'timm', 'spformer')
PAPER = 'https://arxiv.org/abs/2401.02931'
CITATION = """@article{mei2024spformer,
  title={SPFormer: Enhancing Vision Transformer with Superpixel Representation},
  author={Mei, Jieru and Chen, Liang-Chieh and Yuille, Alan and Xie, Cihang},
  journal={arXiv preprint arXiv:2401.02931},
  year={2024}
}"""

# Training-config keys that name the dataset, in the order they are looked up (train_imagenet.py writes
# `hf_dataset` or `data_dir`).
_DATASET_KEYS = ('dataset', 'dataset_name', 'hf_dataset', 'data', 'data_dir')
# Hub dataset ids for the names a training configuration uses (timm's `hfds/`, `torch/` prefixes stripped).
_DATASET_IDS = {
    'imagenet': 'imagenet-1k', 'imagenet-1k': 'imagenet-1k', 'imagenet1k': 'imagenet-1k', 'in1k': 'imagenet-1k',
    'ilsvrc2012': 'imagenet-1k', 'ilsvrc/imagenet-1k': 'imagenet-1k', 'timm/imagenet-1k-wds': 'imagenet-1k',
    'imagenet-21k': 'imagenet-21k', 'in21k': 'imagenet-21k', 'imagenet-22k': 'imagenet-21k',
}
_METRIC_NAMES = {'top1': ('accuracy', 'Top-1 accuracy'), 'top5': ('top_5_accuracy', 'Top-5 accuracy')}
# Class counts of the Hub datasets a local folder's name may stand for: a folder named `imagenet` is
# ImageNet-1k only if the model has its 1000 classes (a 3-class subset in /data/imagenet is not).
_DATASET_CLASSES = {'imagenet-1k': 1000, 'imagenet-21k': None}
# Training-config keys that hold local paths: never published (they name the publisher's disks).
_LOCAL_PATH_KEYS = ('data_dir', 'output', 'config', 'initial_checkpoint', 'resume')


def _is_local_path(value: str) -> bool:
    return value.startswith(('/', './', '../', '~')) or (len(value) > 2 and value[1:3] in (':\\', ':/'))


def public_train_config(train_config: Optional[Mapping[str, Any]]) -> Optional[Dict[str, Any]]:
    """The training configuration without what names the publisher's disks (data folder, output folder,
    config file, initial checkpoint, resume folder, a local ``hf_dataset`` path)."""
    if train_config is None:
        return None
    out = {}
    for key, value in train_config.items():
        if key in _LOCAL_PATH_KEYS or (isinstance(value, str) and _is_local_path(value)):
            continue
        out[key] = value
    return out


def resolve_datasets(datasets: Union[str, Sequence[str], None], train_config: Optional[Mapping[str, Any]],
                     num_classes: Optional[int] = None) -> List[str]:
    """Hub dataset ids: ``datasets`` if given, else the training configuration's Hub dataset, else none.

    A local folder counts only when its name is a known dataset's and the class count agrees
    (``/data/imagenet`` with 1000 classes is ImageNet-1k; with 3 it is a folder of the publisher's).
    """
    if datasets is not None:
        datasets = [datasets] if isinstance(datasets, str) else list(datasets)
        if not all(isinstance(d, str) and d for d in datasets):
            raise TypeError(f'datasets must be a string or a list of strings, got {datasets!r}')
        return datasets
    for key in _DATASET_KEYS:
        value = (train_config or {}).get(key)
        if isinstance(value, str) and value.strip():
            name = value.strip().rstrip('/')
            for prefix in ('hfds/', 'hfids/', 'hf-hub:', 'torch/', 'tfds/', 'wds/'):
                if name.lower().startswith(prefix):
                    name = name[len(prefix):]
            local = key == 'data_dir' or _is_local_path(name)
            known = _DATASET_IDS.get((pathlib.PurePath(name).name if local else name).lower())
            if known is not None:
                expected = _DATASET_CLASSES.get(known) if local else None
                return [known] if expected is None or num_classes in (None, expected) else []
            return [] if local else [name]  # a Hub dataset id
    return []


def _meaningful(key: str, num_classes: Optional[int]) -> bool:
    """Top-5 says nothing with 5 classes or fewer (it is 100% by construction)."""
    return not (key.startswith('top5') and num_classes is not None and num_classes <= 5)


def split_metrics(metrics: Optional[Mapping[str, Any]], ema: bool, num_classes: Optional[int] = None) -> Dict[str, float]:
    """The numeric results of the published weights: ``top1_ema`` -> ``top1`` for EMA weights, else the plain keys
    (top-5 left out for 5 classes or fewer)."""
    out = {}
    for key, value in (metrics or {}).items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            continue
        if not _meaningful(key, num_classes):
            continue
        if ema and key.endswith('_ema'):
            out[key[:-len('_ema')]] = value
        elif not ema and not key.endswith('_ema'):
            out[key] = value
    return out


def _front_matter(repo_name: str, license: str, datasets: List[str], results: Dict[str, float]) -> str:
    meta: Dict[str, Any] = {
        'library_name': 'timm',
        'license': license,
        'tags': list(TAGS),
        'pipeline_tag': 'image-classification',
    }
    if datasets:
        meta['datasets'] = datasets
    reported = {k: v for k, v in results.items() if k in _METRIC_NAMES}
    if reported:
        meta['metrics'] = sorted({_METRIC_NAMES[k][0] for k in reported})
        if datasets:
            meta['model-index'] = [{
                'name': repo_name,
                'results': [{
                    'task': {'type': 'image-classification', 'name': 'Image Classification'},
                    'dataset': {'type': datasets[0], 'name': datasets[0], 'split': 'validation'},
                    'metrics': [{'type': _METRIC_NAMES[k][0], 'name': _METRIC_NAMES[k][1], 'value': float(v)}
                                for k, v in reported.items()],
                }],
            }]
    return '---\n' + yaml.safe_dump(meta, sort_keys=False, allow_unicode=True) + '---\n'


def model_card(
        repo_id: str,
        config: Mapping[str, Any],
        *,
        num_params: int,
        datasets: Sequence[str] = (),
        train_config: Optional[Mapping[str, Any]] = None,
        metrics: Optional[Mapping[str, Any]] = None,
        ema: bool = False,
        weights_note: Optional[str] = None,
        revision: Optional[str] = None,
        picture: Optional[str] = PICTURE_NAME,
        picture_image: str = "scikit-image's astronaut",
) -> str:
    """README.md text: YAML front matter, what the model is, its superpixels, usage, results, training config.

    Args:
        repo_id: ``ORG/NAME`` the card is for (the usage block loads ``hf-hub:ORG/NAME``).
        config: The checkpoint's ``config.json`` content (timm format).
        num_params: Parameter count.
        datasets: Hub dataset ids the weights were trained on (:func:`resolve_datasets`).
        train_config: The effective training configuration, shown as YAML.
        metrics: Evaluation results (e.g. ``results.json``); ``*_ema`` keys belong to the EMA weights.
        ema: The published weights are the EMA weights.
        weights_note: Why these weights were published rather than the others of their run.
        revision: Branch the weights are pushed to (the usage block pins it).
        picture: File name of the superpixel picture in the repo, or None.
        picture_image: What the picture shows.
    """
    arch = config['architecture']
    pcfg = config.get('pretrained_cfg', {})
    size = pcfg.get('input_size', (3, 224, 224))
    num_classes = config.get('num_classes')
    metrics = {k: v for k, v in (metrics or {}).items() if _meaningful(k, num_classes)} if metrics else metrics
    local_data = bool((train_config or {}).get('data_dir'))
    train_config = public_train_config(train_config)
    results = split_metrics(metrics, ema)
    repo_name = repo_id.split('/')[-1]
    hub_id = f'hf-hub:{repo_id}' + (f'@{revision}' if revision and revision != 'main' else '')
    lines = [_front_matter(repo_name, pcfg.get('license') or 'apache-2.0', list(datasets), results)]
    lines += [
        f'# Model card for {repo_name}',
        '',
        f'An SPFormer image classifier (`{arch}`): a vision transformer whose tokens are learned superpixels '
        f'that follow object boundaries ([paper]({PAPER})), implemented in the `spformer` library for timm.',
        '',
    ]
    if weights_note:
        lines += [f'These are the {"exponential-moving-average (EMA)" if ema else "model (not the EMA)"} weights of '
                  f'the training run: {weights_note[0].lower() + weights_note[1:]}.', '']
    elif ema:
        lines += ['These are the exponential-moving-average (EMA) weights of the training run.', '']
    if not train_config and not metrics:
        lines += ['No training configuration or evaluation results came with these weights.', '']
    if picture:
        lines += [f'![Superpixels of {repo_name}]({picture})', '',
                  f'*The superpixels of these weights on {picture_image}: the input crop, then per stage the hard '
                  f'superpixels of the merged association heads and (small) of each head.*', '']
    lines += ['## Model details', '']
    details = [
        ('Architecture', f'`{arch}`'),
        ('Parameters (M)', f'{num_params / 1e6:.2f}'),
        ('Image size', f'{size[1]} x {size[2]}'),
        ('Classes', str(config.get('num_classes'))),
        ('Dataset', ', '.join(datasets) if datasets else 'a local image folder, not on the Hub' if local_data
         else 'not recorded'),
        ('Weights', 'EMA' if ema else 'model'),
        ('Paper', f'[SPFormer: Enhancing Vision Transformer with Superpixel Representation]({PAPER})'),
    ]
    lines += [f'- **{k}:** {v}' for k, v in details] + ['']
    lines += [
        '## Usage',
        '',
        '```python',
        'import spformer  # registers the SPFormer models with timm: import it before timm.create_model',
        'import timm',
        'import torch',
        'from spformer.images import open_rgb  # any image file as 8-bit RGB (16-bit images scaled, not clipped)',
        '',
        f"model = timm.create_model('{hub_id}', pretrained=True).eval()",
        f'config = timm.data.resolve_model_data_config(model)   # {size[1]}x{size[2]} input, as trained',
        'transform = timm.data.create_transform(**config, is_training=False)',
        "x = transform(open_rgb('image.jpg')).unsqueeze(0)",
        'with torch.inference_mode():',
        f'    probs = model(x).softmax(-1)[0]              # {num_classes} class probabilities',
        '    superpixels = model.forward_superpixels(x)   # per stage: labels, association, grid',
    ]
    if num_classes:
        named = bool(pcfg.get('label_names') or config.get('label_names'))
        lines += (["labels = model.pretrained_cfg['label_names']"] if named else []) + [
            f'top = probs.topk({min(5, num_classes)})',
            'for p, i in zip(top.values.tolist(), top.indices.tolist()):',
            "    print(f'{labels[i]}: {p:.1%}')" if named else "    print(f'class {i}: {p:.1%}')",
        ]
    lines += ['```', '']
    if metrics:
        lines += ['## Evaluation results', '']
        numeric = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        if numeric:
            lines += ['| metric | value | weights |', '|---|---|---|']
            for k, v in numeric.items():
                if k.endswith('_ema'):
                    which = 'EMA' + (' (published)' if ema else '')
                elif f'{k}_ema' in numeric:
                    which = 'model' + ('' if ema else ' (published)')
                else:
                    which = ''
                lines.append(f'| {k} | {v:.6g} | {which} |')
            lines.append('')
        other = {k: v for k, v in metrics.items() if k not in numeric}
        if other:
            lines += ['```yaml', yaml.safe_dump(dict(other), sort_keys=False).rstrip(), '```', '']
    if train_config:
        lines += ['## Training configuration', '', '```yaml',
                  yaml.safe_dump(_plain(train_config), sort_keys=False, allow_unicode=True).rstrip(), '```', '']
    lines += ['## Citation', '', '```bibtex', CITATION, '```', '']
    return '\n'.join(lines)


def _plain(value):
    """YAML-safe copy: tuples to lists, paths and other objects to strings."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def _load_image(image):
    """The sample image as an 8-bit RGB PIL image, read as every spformer tool reads images
    (:mod:`spformer.images`: 16-bit images scaled, not clipped; EXIF orientation applied; a file that
    cannot be read raises ``ImageReadError`` naming it)."""
    from PIL import Image
    from spformer.images import open_rgb, to_rgb
    if image is None:
        from skimage.data import astronaut
        return Image.fromarray(astronaut())
    if isinstance(image, (str, pathlib.Path)):
        return open_rgb(image)
    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(f'sample_image as an array must be (H, W, 3) uint8 RGB, got {image.dtype} {image.shape}')
        return Image.fromarray(image)
    if isinstance(image, Image.Image):
        return to_rgb(image)
    raise TypeError(f'sample_image must be None (astronaut), a path, a PIL image or an (H, W, 3) uint8 array, '
                    f'got {type(image).__name__}')


def save_superpixel_picture(model: torch.nn.Module, path, image=None, title: Optional[str] = None) -> pathlib.Path:
    """Draw the model's superpixels on ``image`` (default: scikit-image's astronaut) into ``path`` (PNG).

    The image goes through the model's own eval transform at its input size; the model is run in
    eval mode and put back into the mode it was in.
    """
    import timm
    from spformer.pictures import save_superpixel_figure, tensor_to_image

    data_config = timm.data.resolve_model_data_config(model)
    data_config['input_size'] = (3, *model.img_size)  # the size the model was built for, not its source cfg's
    transform = timm.data.create_transform(**data_config, is_training=False)
    device = next(model.parameters()).device
    x = transform(_load_image(image)).unsqueeze(0).to(device)
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            superpixels = model.forward_superpixels(x)
    finally:
        model.train(was_training)
    img = tensor_to_image(x[0], data_config['mean'], data_config['std'])
    save_superpixel_figure(img, superpixels, str(path), title=title)
    return pathlib.Path(path)
