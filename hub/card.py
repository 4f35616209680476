"""The model card (``README.md``) of a published model, and the picture it shows.

Two families are published (:data:`FAMILIES`): SPFormer image classifiers and SP-Transformer semantic
segmenters; each entry says what its card needs (pipeline tag, tags, paper and citation, the results
reported in the card's metadata) and the picture is drawn for its kind of output.

timm's own card (``timm.models._hub.generate_readme``) takes a free-form dict; this one is built
from what a checkpoint knows about itself (its ``config.json``, training configuration and
evaluation results) so every field is either true or left out.
"""
import math
import pathlib
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import yaml

__all__ = ['model_card', 'save_superpixel_picture', 'resolve_datasets', 'split_metrics', 'public_train_config',
           'PICTURE_NAME', 'ModelFamily', 'FAMILIES', 'CLASSIFIER', 'SEGMENTER', 'model_family', 'FAMILY_NOUNS']

PICTURE_NAME = 'superpixels.png'


@dataclass(frozen=True)
class ModelFamily:
    """A family of models that spformer.hub publishes, and what its card and picture need."""
    noun: str  # 'SPFormer classifier': errors and cards name the family so
    prefix: str  # its registered timm names start with it
    model_class: str  # module.Class of its models (matched on the model's type and its bases, nothing imported)
    pipeline_tag: str
    tags: Tuple[str, ...]
    task_name: str  # model-index task name
    summary: str  # the card's first sentence ({arch}, {paper} filled in)
    paper_title: str
    paper_url: str
    citation: str
    metric_names: Mapping[str, Tuple[str, str]]  # results key -> (model-index metric type, its name)
    picture: str  # what the picture title says the picture shows
    per_class: Optional[Tuple[str, str]] = None  # results key of per-class values, and their column header

    @property
    def segmenter(self) -> bool:
        return self.pipeline_tag == 'image-segmentation'

    def owns(self, model_or_name: Union[torch.nn.Module, str]) -> bool:
        """A model of this family (its class or a subclass), or a registered name of it (tag allowed)."""
        if isinstance(model_or_name, str):
            import timm
            return model_or_name.split('.')[0] in timm.list_models(f'{self.prefix}*')
        return any(f'{c.__module__}.{c.__qualname__}' == self.model_class for c in type(model_or_name).__mro__)


CLASSIFIER = ModelFamily(
    noun='SPFormer classifier', prefix='spformer_', model_class='spformer.models.spformer.SPFormer',
    pipeline_tag='image-classification', tags=('image-classification', 'timm', 'spformer'),
    task_name='Image Classification',
    summary='An SPFormer image classifier (`{arch}`): a vision transformer whose tokens are learned superpixels '
            'that follow object boundaries ([paper]({paper})), implemented in the `spformer` library for timm.',
    paper_title='SPFormer: Enhancing Vision Transformer with Superpixel Representation',
    paper_url='https://arxiv.org/abs/2401.02931',
    citation="""@article{mei2024spformer,
  title={SPFormer: Enhancing Vision Transformer with Superpixel Representation},
  author={Mei, Jieru and Chen, Liang-Chieh and Yuille, Alan and Xie, Cihang},
  journal={arXiv preprint arXiv:2401.02931},
  year={2024}
}""",
    metric_names={'top1': ('accuracy', 'Top-1 accuracy'), 'top5': ('top_5_accuracy', 'Top-5 accuracy')},
    picture='superpixels per stage')
SEGMENTER = ModelFamily(
    noun='SP-Transformer segmenter', prefix='sp_transformer_',
    model_class='spformer.models.sp_transformer.SPTransformer',
    pipeline_tag='image-segmentation', tags=('timm', 'spformer', 'sp-transformer', 'semantic-segmentation'),
    task_name='Semantic Segmentation',
    summary='An SP-Transformer semantic segmenter (`{arch}`): a backbone\'s pixel features are grouped into learned '
            'soft superpixels by local cross-attention, transformer blocks classify the superpixels, and each '
            'pixel\'s class scores are the association-weighted sum of those of its 9 nearest superpixels, so the '
            'predicted boundaries follow the superpixels at the input resolution ([paper]({paper})); implemented '
            'in the `spformer` library for timm.',
    paper_title='Superpixel Transformers for Efficient Semantic Segmentation',
    paper_url='https://arxiv.org/abs/2309.16889',
    # The authors as the arXiv page (2309.16889) lists them.
    citation="""@article{zhu2023superpixel,
  title={Superpixel Transformers for Efficient Semantic Segmentation},
  author={Zhu, Alex Zihao and Mei, Jieru and Qiao, Siyuan and Yan, Hang and Zhu, Yukun and Chen, Liang-Chieh and Kretzschmar, Henrik},
  journal={arXiv preprint arXiv:2309.16889},
  year={2023}
}""",
    metric_names={'miou': ('mean_iou', 'mIoU'), 'pixel_accuracy': ('accuracy', 'Pixel accuracy')},
    picture='predicted classes and superpixels', per_class=('iou', 'IoU'))
# What spformer.hub publishes; anything else is refused with FAMILY_NOUNS.
FAMILIES = (CLASSIFIER, SEGMENTER)
FAMILY_NOUNS = ' or '.join(f'an {f.noun}' for f in FAMILIES)  # 'an SPFormer classifier or an SP-Transformer segmenter'


def model_family(model_or_name: Union[torch.nn.Module, str, None]) -> Optional[ModelFamily]:
    """The family of a model (unwrapped) or of a registered name / config architecture, or None."""
    if model_or_name is None:
        return None
    return next((f for f in FAMILIES if f.owns(model_or_name)), None)


# Training-config keys that name the dataset, in the order they are looked up (train_imagenet.py writes
# `hf_dataset` or `data_dir`).
_DATASET_KEYS = ('dataset', 'dataset_name', 'hf_dataset', 'data', 'data_dir')
# Hub dataset ids for the names a training configuration uses (timm's `hfds/`, `torch/` prefixes stripped).
_DATASET_IDS = {
    'imagenet': 'imagenet-1k', 'imagenet-1k': 'imagenet-1k', 'imagenet1k': 'imagenet-1k', 'in1k': 'imagenet-1k',
    'ilsvrc2012': 'imagenet-1k', 'ilsvrc/imagenet-1k': 'imagenet-1k', 'timm/imagenet-1k-wds': 'imagenet-1k',
    'imagenet-21k': 'imagenet-21k', 'in21k': 'imagenet-21k', 'imagenet-22k': 'imagenet-21k',
}
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


def _front_matter(repo_name: str, license: str, datasets: List[str], results: Dict[str, float],
                  family: ModelFamily, split: str) -> str:
    meta: Dict[str, Any] = {
        'library_name': 'timm',
        'license': license,
        'tags': list(family.tags),
        'pipeline_tag': family.pipeline_tag,
    }
    if datasets:
        meta['datasets'] = datasets
    names = family.metric_names
    reported = {k: v for k, v in results.items() if k in names}
    if reported:
        meta['metrics'] = sorted({names[k][0] for k in reported})
        if datasets:
            meta['model-index'] = [{
                'name': repo_name,
                'results': [{
                    'task': {'type': family.pipeline_tag, 'name': family.task_name},
                    'dataset': {'type': datasets[0], 'name': datasets[0], 'split': split},
                    'metrics': [{'type': names[k][0], 'name': names[k][1], 'value': float(v)}
                                for k, v in reported.items()],
                }],
            }]
    return '---\n' + yaml.safe_dump(meta, sort_keys=False, allow_unicode=True) + '---\n'


def _classifier_usage(hub_id: str, config: Mapping[str, Any], size) -> List[str]:
    num_classes = config.get('num_classes')
    pcfg = config.get('pretrained_cfg', {})
    lines = [
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
    return lines


def _segmenter_usage(hub_id: str, config: Mapping[str, Any], size, facts: Mapping[str, Any]) -> List[str]:
    num_classes = config.get('num_classes')
    named = bool(config.get('pretrained_cfg', {}).get('label_names') or config.get('label_names'))
    stride = facts.get('token_stride')
    superpixel = (facts.get('decoder') or 'superpixel') == 'superpixel'
    lines = [
        'import spformer  # registers SPFormer and SP-Transformer with timm: import it before timm.create_model',
        'import timm',
        'import torch',
        'from torchvision.transforms.functional import normalize, to_tensor',
        'from spformer.images import open_rgb  # any image file as 8-bit RGB (16-bit images scaled, not clipped)',
        '',
        f"model = timm.create_model('{hub_id}', pretrained=True).eval()",
        "cfg = model.pretrained_cfg  # mean, std, label_names; input_size: the reference input, as trained",
        f"image = open_rgb('image.jpg').resize(({size[2]}, {size[1]}))  # W, H: any multiples of model.token_stride"
        + (f' ({stride})' if stride else ''),
        "x = normalize(to_tensor(image), cfg['mean'], cfg['std']).unsqueeze(0)",
        'with torch.inference_mode():',
        f'    logits = model(x)                    # (1, {num_classes}, {size[1]}, {size[2]}): class scores per pixel',
    ]
    if superpixel:
        lines.append("    out = model.forward_superpixels(x)   # dict: logits, labels (1, H, W) superpixel ids, "
                     "association, grid")
    lines += ['classes = logits.argmax(1)[0]            # (H, W) class ids']
    if named:
        lines += ["labels = cfg['label_names']",
                  'for i in classes.unique().tolist():',
                  "    print(f'{labels[i]}: {(classes == i).float().mean():.1%} of the pixels')"]
    else:
        lines += ['for i in classes.unique().tolist():',
                  "    print(f'class {i}: {(classes == i).float().mean():.1%} of the pixels')"]
    if superpixel:
        lines.append("print(f\"{out['labels'][0].unique().numel()} superpixels on a {out['grid'][0]}x{out['grid'][1]} "
                     "grid\")")
    return lines


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


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
        family: Optional[ModelFamily] = None,
        facts: Optional[Mapping[str, Any]] = None,
) -> str:
    """README.md text: YAML front matter, what the model is, its picture, usage, results, training config.

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
        family: The model's :class:`ModelFamily` (default: the one of ``config['architecture']``, else the
            classifiers').
        facts: What the config does not say about a segmenter: ``backbone``, ``decoder``, ``token_stride``.
    """
    arch = config['architecture']
    family = family or model_family(arch) or CLASSIFIER
    facts = dict(facts or {})
    pcfg = config.get('pretrained_cfg', {})
    size = pcfg.get('input_size', (3, 224, 224))
    num_classes = config.get('num_classes')
    metrics = {k: v for k, v in (metrics or {}).items() if _meaningful(k, num_classes)} if metrics else metrics
    local_data = bool((train_config or {}).get('data_dir'))
    layout = (train_config or {}).get('layout')
    val_split = (train_config or {}).get('val_split')
    train_config = public_train_config(train_config)
    results = split_metrics(metrics, ema)
    repo_name = repo_id.split('/')[-1]
    hub_id = f'hf-hub:{repo_id}' + (f'@{revision}' if revision and revision != 'main' else '')
    lines = [_front_matter(repo_name, pcfg.get('license') or 'apache-2.0', list(datasets), results, family,
                           val_split if isinstance(val_split, str) and val_split else 'validation')]
    lines += [f'# Model card for {repo_name}', '', family.summary.format(arch=arch, paper=family.paper_url), '']
    if weights_note:
        lines += [f'These are the {"exponential-moving-average (EMA)" if ema else "model (not the EMA)"} weights of '
                  f'the training run: {weights_note[0].lower() + weights_note[1:]}.', '']
    elif ema:
        lines += ['These are the exponential-moving-average (EMA) weights of the training run.', '']
    if not train_config and not metrics:
        lines += ['No training configuration or evaluation results came with these weights.', '']
    if picture and family.segmenter:
        shown = 'the learned superpixels (every pixel drawn in its most associated superpixel)' \
            if (facts.get('decoder') or 'superpixel') == 'superpixel' else 'no superpixels (the bilinear baseline head)'
        lines += [f'![Predicted classes and superpixels of {repo_name}]({picture})', '',
                  f'*These weights on {picture_image}, resized and centre-cropped to the reference input '
                  f'({size[1]} x {size[2]}): the input, the predicted class of every pixel, and {shown}.*', '']
    elif picture:
        lines += [f'![Superpixels of {repo_name}]({picture})', '',
                  f'*The superpixels of these weights on {picture_image}: the input crop, then per stage the hard '
                  f'superpixels of the merged association heads and (small) of each head.*', '']
    lines += ['## Model details', '']
    dataset = ', '.join(datasets) if datasets else \
        (f'a local dataset folder ({layout} layout), not on the Hub' if isinstance(layout, str) and layout != 'auto'
         else 'a local image folder, not on the Hub') if local_data else 'not recorded'
    details = [('Architecture', f'`{arch}`'), ('Parameters (M)', f'{num_params / 1e6:.2f}')]
    if family.segmenter:
        stride = facts.get('token_stride')
        details += [(k, v) for k, v in (
            ('Backbone', f"`{facts['backbone']}`" if facts.get('backbone') else None),
            ('Decoder', facts.get('decoder')),
            ('Reference input', f'{size[1]} x {size[2]}' + (
                f' ({size[1] // stride} x {size[2] // stride} superpixels; any input whose sides are multiples of '
                f'the token stride {stride})' if stride else ''))) if v]
    else:
        details += [('Image size', f'{size[1]} x {size[2]}')]
    details += [
        ('Classes', str(config.get('num_classes'))),
        ('Dataset', dataset),
        ('Weights', 'EMA' if ema else 'model'),
        ('Paper', f'[{family.paper_title}]({family.paper_url})'),
    ]
    lines += [f'- **{k}:** {v}' for k, v in details] + ['']
    usage = _segmenter_usage(hub_id, config, size, facts) if family.segmenter else \
        _classifier_usage(hub_id, config, size)
    lines += ['## Usage', '', '```python', *usage, '```', '']
    if metrics:
        lines += ['## Evaluation results', '']
        numeric = {k: v for k, v in metrics.items() if _number(v)}
        both = any(k.endswith('_ema') for k in numeric)  # results of the weights and of their EMA: say whose
        if numeric:
            lines += ['| metric | value | weights |' if both else '| metric | value |',
                      '|---|---|---|' if both else '|---|---|']
            for k, v in numeric.items():
                if k.endswith('_ema'):
                    which = 'EMA' + (' (published)' if ema else '')
                elif f'{k}_ema' in numeric:
                    which = 'model' + ('' if ema else ' (published)')
                else:
                    which = ''
                lines.append(f'| {k} | {v:.6g} | {which} |' if both else f'| {k} | {v:.6g} |')
            lines.append('')
        per_class = {}
        if family.per_class and isinstance(metrics.get(family.per_class[0]), Mapping):
            key, header = family.per_class
            per_class = metrics[key]
            lines += [f'{header} per class (`{key}`; - for a class absent from both the ground truth and the '
                      f'predictions):', '', f'| class | {header} |', '|---|---:|']
            lines += [f'| {name} | {f"{v:.2f}" if _number(v) else "-"} |' for name, v in per_class.items()]
            lines.append('')
        other = {k: v for k, v in metrics.items() if k not in numeric and not (per_class and k == family.per_class[0])}
        if other:
            lines += ['```yaml', yaml.safe_dump(_plain(other), sort_keys=False).rstrip(), '```', '']
    if train_config:
        lines += ['## Training configuration', '', '```yaml',
                  yaml.safe_dump(_plain(train_config), sort_keys=False, allow_unicode=True).rstrip(), '```', '']
    lines += ['## Citation', '', '```bibtex', family.citation, '```', '']
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


def save_superpixel_picture(model: torch.nn.Module, path, image=None, title: Optional[str] = None,
                            label_names: Optional[Sequence[str]] = None) -> pathlib.Path:
    """Draw what the model sees in ``image`` (default: scikit-image's astronaut) into ``path`` (PNG).

    A classifier: its superpixels per stage, the image going through the model's own eval transform at its
    input size. A segmenter: the image resized and centre-cropped to its reference input, the predicted class
    of every pixel (with a legend of the classes present, by ``label_names``, default the model's) and its
    superpixels. The model is run in eval mode and put back into the mode it was in.
    """
    if SEGMENTER.owns(model):
        return _save_segmentation_picture(model, path, image, title, label_names)
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


def _save_segmentation_picture(model: torch.nn.Module, path, image=None, title: Optional[str] = None,
                               label_names: Optional[Sequence[str]] = None) -> pathlib.Path:
    """A segmenter's picture (see :func:`save_superpixel_picture`): input, predicted classes, superpixels."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch
    from PIL import Image, ImageOps
    from spformer.pictures import class_palette, superpixel_boundaries, tensor_to_image

    cfg = model.pretrained_cfg
    mean, std = cfg.get('mean', (0.485, 0.456, 0.406)), cfg.get('std', (0.229, 0.224, 0.225))
    H, W = model.img_size
    crop = ImageOps.fit(_load_image(image), (W, H), method=Image.BILINEAR)  # fill, keep the aspect
    x = torch.from_numpy(np.asarray(crop).copy()).permute(2, 0, 1).float().div(255)
    x = ((x - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)).unsqueeze(0)
    x = x.to(next(model.parameters()).device)
    superpixel = getattr(model, 'decoder', 'superpixel') == 'superpixel'
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            out = model.forward_superpixels(x) if superpixel else dict(logits=model(x))
    finally:
        model.train(was_training)
    img = tensor_to_image(x[0], mean, std)  # the crop the model saw
    classes = out['logits'][0].float().argmax(0).cpu().numpy()
    colours = class_palette(model.num_classes)
    names = label_names if label_names is not None else cfg.get('label_names')
    names = list(names) if names is not None and len(names) == model.num_classes else None
    scale = max(1, -(-320 // W))  # panels at least 320 px wide, so 1-px boundaries stay thin

    def up(a):
        return np.asarray(a).repeat(scale, 0).repeat(scale, 1)

    panels = [('input', up(img)),
              ('predicted classes', up((0.35 * img + 0.65 * colours[classes]).round().astype(np.uint8)))]
    if superpixel:
        labels = out['labels'][0].cpu().numpy()
        h, w = (int(v) for v in out['grid'])
        panels.append((f'{len(np.unique(labels))} of {h * w} superpixels', superpixel_boundaries(up(img), up(labels))))
    ids, counts = np.unique(classes, return_counts=True)
    shown = ids[np.argsort(-counts, kind='stable')][:12]  # the largest classes in the picture
    fig = Figure(figsize=(3.2 * len(panels), 3.2 * H / W + 0.4))
    FigureCanvasAgg(fig)
    axes = []
    for k, (text, panel) in enumerate(panels):
        axes.append(fig.add_subplot(1, len(panels), k + 1))
        axes[-1].imshow(panel, interpolation='nearest')
        axes[-1].set_title(text, fontsize=9, pad=3)
        axes[-1].set_axis_off()
    # The legend of the largest classes under the class panel (the saved box is trimmed to what is drawn).
    axes[1].legend(handles=[Patch(color=colours[i] / 255, label=names[i] if names else f'class {i}') for i in shown],
                   loc='upper center', bbox_to_anchor=(0.5, -0.02), ncol=min(4, len(shown)), fontsize=7,
                   frameon=False, handlelength=1.2, columnspacing=1.0)
    fig.subplots_adjust(left=0.01, right=0.99, top=0.88, bottom=0.02, wspace=0.03)
    if title:
        fig.suptitle(title, fontsize=10, y=1.0, va='bottom')  # above the panels' titles (the tight box keeps it)
    fig.savefig(str(path), dpi=100, bbox_inches='tight')
    return pathlib.Path(path)
