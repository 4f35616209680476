"""What ``pretrained=True`` loads for the SPFormer family, and what a weights file tells about itself.

- Which weights are published (:data:`PUBLISHED_WEIGHTS`, on the Hub under :data:`HF_HUB_ORG`): a tag names
  its Hub repo only once weights are there, so timm never advertises weights that do not exist.
- :func:`build_model_with_weights`: timm's builder with a clear :class:`PretrainedWeightsUnavailable` (and how
  to load your own) where timm would warn and return a random init, and local ``.safetensors`` files taken
  with their own head and image size.
- Reading a weights file without loading it: :func:`checkpoint_tensor_info` (head size, token grid, the
  ``config.json`` beside it) and :func:`unwrapped_key` (keys without DDP / torch.compile prefixes), shared
  with the model-loading module :mod:`spformer.hub.checkpoint` and the publisher :mod:`spformer.hub.publish`.

This module imports no model: the model file (:mod:`spformer.models.spformer`) passes its class and
checkpoint filter in, and the Hub tools build on it, so the data flows one way (models -> hub).
"""
import inspect
import json
import math
import os
import pathlib
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

from torch import nn
from timm.models import build_model_with_cfg

__all__ = [
    'HF_HUB_ORG', 'PUBLISHED_WEIGHTS', 'published_source', 'PretrainedWeightsUnavailable', 'build_model_with_weights',
    'unwrapped_key', 'hub_http_client', 'CheckpointTensors', 'checkpoint_tensor_info', 'CONFIG_NAME',
]

CONFIG_NAME = 'config.json'  # timm's / the Hub's model config, next to the weights

PathLike = Union[str, pathlib.Path]


# A tag names its Hub repo (hf_hub_id='spformer/<model>.<tag>') only once weights are published there, so
# that timm (list_models(pretrained=True), pretrained=True) never advertises weights that do not exist.
# None is published yet: pretrained=True on a registered name raises PretrainedWeightsUnavailable with how
# to load your own (hf-hub: ids and local files work for every model).
HF_HUB_ORG = 'spformer'
PUBLISHED_WEIGHTS: Tuple[str, ...] = ()  # e.g. ('spformer_small_sp16_224.in1k',) once pushed to HF_HUB_ORG


def published_source(name: str) -> Dict[str, str]:
    """The pretrained-cfg entries naming where the weights of ``name`` (``model.tag``) are published:
    ``hf_hub_id`` on the Hub once the tag is in :data:`PUBLISHED_WEIGHTS`, else none."""
    return dict(hf_hub_id=f'{HF_HUB_ORG}/{name}') if name in PUBLISHED_WEIGHTS else {}


class PretrainedWeightsUnavailable(RuntimeError):
    """``pretrained=True`` could not get the weights: none published for the tag, offline and not cached, a
    missing file."""


def _how_to_load_your_own(variant: str) -> str:
    return ("To load your own: timm.create_model('hf-hub:ORG/NAME', pretrained=True) for weights pushed with "
            f"spformer-hub, or timm.create_model('{variant}', pretrained=True, "
            "pretrained_cfg_overlay=dict(file='model.safetensors')) for a local file; or pretrained=False for a "
            'random init.')


def _weights_unavailable(variant: str, cfg: Dict[str, Any], error: BaseException) -> PretrainedWeightsUnavailable:
    from timm.models._builder import _resolve_pretrained_source
    name = f"{variant}.{cfg['tag']}" if cfg.get('tag') else variant
    load_from, location = _resolve_pretrained_source(cfg)
    where = f'the Hugging Face Hub repo {location}' if load_from == 'hf-hub' else f'{load_from} {location}'
    cause = type(error).__name__ + (f': {str(error).splitlines()[0]}' if str(error).strip() else '')
    return PretrainedWeightsUnavailable(
        f'pretrained=True: could not load the weights of {name} from {where} ({cause}). '
        + _how_to_load_your_own(variant))


def _checkpoint_file(cfg: Dict[str, Any]) -> Optional[str]:
    """The local weights file a pretrained cfg points at (timm's ``local-dir:`` cfgs name the folder)."""
    file = cfg.get('file')
    if not file:
        return None
    if cfg.get('source') == 'local-dir' and os.path.isdir(file):
        return os.path.join(file, 'model.safetensors')
    return file


def _fit_to_checkpoint(model_cls: type, variant: str, cfg: Dict[str, Any], kwargs: Dict[str, Any],
                       defaults: Dict[str, Any]) -> Dict[str, Any]:
    """kwargs for a model that takes a local ``.safetensors`` file as it is, each unless given: the construction
    arguments of the ``config.json`` beside it when that describes this variant (as timm's ``local-dir:`` loader
    reads them), its head size (``num_classes``; a given one re-initialises the head, as timm does) and the
    input size its token grid was made for (``img_size``: SPFormer's position embeddings, SP-Transformer's
    superpixel queries; a given one resamples them); and the cfg that tells timm the checkpoint's head size (else
    timm loads a head of another size and fails). ``defaults`` are the registered configuration's arguments:
    the file's override them, the caller's override both; ``model_cls``'s own defaults fill in the rest."""
    file = _checkpoint_file(cfg)
    if file is None or not file.endswith('.safetensors'):
        return kwargs
    if not os.path.isfile(file):
        missing = FileNotFoundError(f'no file {file}')
        raise _weights_unavailable(variant, cfg, missing) from missing
    info = checkpoint_tensor_info(file, classifier=cfg.get('classifier') or 'head')
    kwargs = dict(kwargs)
    for key, value in info.model_args_for(variant).items():
        kwargs.setdefault(key, value)
    kwargs.setdefault('num_classes', info.num_classes)
    signature = inspect.signature(model_cls).parameters
    args = {**{k: p.default for k, p in signature.items() if p.default is not p.empty}, **defaults, **kwargs}
    made_for = None
    if info.grid is not None:
        # token stride: SP-Transformer's pixel stride x cell, SPFormer's stem stride x cell
        stride = args['pixel_stride' if 'sp_queries' in info.shapes else 'stem_stride'] * args['cell_size']
        made_for = (info.grid[0] * stride, info.grid[1] * stride)
        kwargs.setdefault('img_size', made_for)
    overlay = dict(kwargs.get('pretrained_cfg_overlay') or {})
    overlay['num_classes'] = info.num_classes  # what the file holds, whatever a cfg says
    if made_for is not None:
        # the file's channels (timm adapts the first conv from them to in_chans), not the model's
        overlay['input_size'] = ((cfg.get('input_size') or (3,))[0], *made_for)
    if info.label_names is not None and len(info.label_names) == info.num_classes:
        overlay.setdefault('label_names', info.label_names)
    kwargs['pretrained_cfg_overlay'] = overlay
    return kwargs


def _describe_built_model(model: nn.Module) -> None:
    """Make ``pretrained_cfg`` describe the model as built: its input size (a fixed-size model rejects any
    other, and timm's ``resolve_data_config`` reads it from here), its class count, and label names
    only when there is one per class."""
    cfg = getattr(model, 'pretrained_cfg', None)
    img_size, num_classes = getattr(model, 'img_size', None), getattr(model, 'num_classes', None)
    if not isinstance(cfg, dict) or img_size is None or num_classes is None:  # e.g. a features_only wrapper
        return
    cfg['input_size'] = (getattr(model, 'in_chans', 3), *img_size)
    cfg['num_classes'] = num_classes
    for key in ('label_names', 'label_descriptions'):
        if cfg.get(key) is not None and len(cfg[key]) != num_classes:
            cfg.pop(key)


def build_model_with_weights(model_cls: type, variant: str, pretrained: bool, pretrained_filter_fn: Callable,
                             feature_cfg: Dict[str, Any], defaults: Optional[Dict[str, Any]] = None,
                             **kwargs) -> nn.Module:
    """timm's ``build_model_with_cfg`` with what ``pretrained=True`` needs here: a registered name with no
    published weights, a missing local file or an unreachable (or offline) Hub raise
    :class:`PretrainedWeightsUnavailable` saying how to load your own, instead of timm's warning and a
    random init; a local ``.safetensors`` file is taken as it is (its head size and image size, see
    :func:`_fit_to_checkpoint`); and the built model's ``pretrained_cfg`` describes it as built. ``defaults``: the
    registered configuration's arguments, which ``kwargs`` and a local weights file's own override."""
    from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError, OfflineModeIsEnabled
    from timm.models._builder import resolve_pretrained_cfg
    cfg = None
    if pretrained:
        cfg = resolve_pretrained_cfg(variant, kwargs.get('pretrained_cfg'), kwargs.get('pretrained_cfg_overlay')).to_dict()
        if not any(cfg.get(k) for k in ('file', 'url', 'hf_hub_id', 'state_dict')):
            # timm would log a warning and return a random init; say it, and how to get weights.
            name = f"{variant}.{cfg['tag']}" if cfg.get('tag') else variant
            raise PretrainedWeightsUnavailable(
                f'pretrained=True: no weights are published for {name} yet (see the model table in README.md). '
                + _how_to_load_your_own(variant))
        given = kwargs
        kwargs = _fit_to_checkpoint(model_cls, variant, cfg, kwargs, defaults or {})
        from_file = {k: v for k, v in kwargs.items() if k not in given and k != 'pretrained_cfg_overlay'}
    else:
        from_file = {}
    kwargs = dict(defaults or {}, **kwargs)
    try:
        model = build_model_with_cfg(
            model_cls, variant, pretrained, pretrained_filter_fn=pretrained_filter_fn, feature_cfg=feature_cfg, **kwargs)
    except (HfHubHTTPError, EntryNotFoundError, OfflineModeIsEnabled, ConnectionError, FileNotFoundError,
            hub_http_client().TransportError) as e:
        if not pretrained:
            raise
        raise _weights_unavailable(variant, cfg, e) from e
    if from_file:
        # timm records the create_model arguments to rebuild the model (config.json's model_args when it is saved
        # again); the arguments taken from the weights file and its config.json belong there too
        model._model_args = {**getattr(model, '_model_args', {}), **from_file}
    _describe_built_model(model)
    return model


def unwrapped_key(key: str) -> str:
    """A state-dict key without the wrappers' prefixes: DDP's ``module.`` and torch.compile's ``_orig_mod.``,
    leading in any order and number (``torch.compile(DDP(m))`` saves ``_orig_mod.module.``), and the
    ``._orig_mod.`` of a compiled submodule inside the key."""
    while key.startswith(('module.', '_orig_mod.')):
        key = key.split('.', 1)[1]
    return key.replace('._orig_mod.', '.')


def hub_http_client():
    """The HTTP client module huggingface_hub runs on (httpx2 from huggingface_hub 2 on, httpx before):
    where its network errors (``TransportError``) and, for tests, its transports come from."""
    from huggingface_hub.utils import _http
    return getattr(_http, 'httpx2', None) or _http.httpx


def _safetensors_shapes(path: pathlib.Path) -> Dict[str, tuple]:
    from safetensors import safe_open
    try:
        with safe_open(str(path), framework='pt') as f:
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception as e:  # SafetensorError: a pickle renamed, a truncated file, ...
        raise ValueError(f'{path} is not a readable safetensors file: {e}') from e
    return {unwrapped_key(k): shape for k, shape in shapes.items()}


@dataclass(frozen=True)
class CheckpointTensors:
    """What a ``.safetensors`` file tells about the model it was saved from, read from its header alone."""
    path: pathlib.Path
    shapes: Dict[str, Tuple[int, ...]]  # keys without DDP / torch.compile prefixes
    num_classes: int  # rows of the classifier (0: saved without one)
    grid: Optional[Tuple[int, int]]  # token grid: SPFormer's position embeddings, SP-Transformer's queries; or None
    config: Optional[Dict[str, Any]]  # the timm config.json next to it, when it describes this file

    @property
    def architecture(self) -> Optional[str]:
        return (self.config or {}).get('architecture')

    def model_args_for(self, variant: str) -> Dict[str, Any]:
        """The construction arguments (``model_args``) of the config.json beside the file when it describes
        ``variant`` (JSON lists as tuples), else none."""
        if self.architecture != variant or not isinstance(self.config.get('model_args'), dict):
            return {}
        return {k: tuple(v) if isinstance(v, list) else v for k, v in self.config['model_args'].items()}

    @property
    def label_names(self) -> Optional[List[str]]:
        names = (self.config or {}).get('label_names') or (self.config or {}).get('pretrained_cfg', {}).get('label_names')
        return list(names) if isinstance(names, list) and len(names) == self.num_classes else None


def checkpoint_tensor_info(path: PathLike, classifier: str = 'head') -> CheckpointTensors:
    """Head size and token grid of a ``.safetensors`` file (from its header: no tensor is read),
    and the ``config.json`` beside it when that names a timm architecture with this head size."""
    path = pathlib.Path(path)
    shapes = _safetensors_shapes(path)
    head = shapes.get(f'{classifier}.weight')
    num_classes = head[0] if head is not None and len(head) == 2 else 0
    grid = None
    pos, queries = shapes.get('stages.0.pos_embed'), shapes.get('sp_queries')
    if pos is not None and len(pos) == 3 and math.isqrt(pos[1]) ** 2 == pos[1]:
        grid = (math.isqrt(pos[1]),) * 2
    elif queries is not None and len(queries) == 4:  # SP-Transformer: (1, h, w, C)
        grid = (queries[1], queries[2])
    config = None
    config_file = path.parent / CONFIG_NAME
    if config_file.is_file():
        try:
            found = json.loads(config_file.read_text())
        except ValueError:
            found = None
        if isinstance(found, dict) and isinstance(found.get('architecture'), str) and \
                found.get('num_classes', num_classes) == num_classes:
            config = found
    return CheckpointTensors(path, shapes, num_classes, grid, config)
