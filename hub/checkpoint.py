"""Reading trained SPFormer checkpoints from disk: a training output folder, or one ``.safetensors`` file.

Loading goes through timm (``local-dir:`` configs, ``pretrained_cfg_overlay=dict(file=...)``, the
model's ``checkpoint_filter_fn``); what is added here is what timm lacks: choosing the EMA weights
of a training folder, refusing pickles, checking that the config names the variant that was asked
for, and recovering ``img_size`` / ``num_classes`` of a bare state dict.
"""
import json
import math
import pathlib
from dataclasses import dataclass
from typing import Any, Dict, Optional, Union

import torch

__all__ = [
    'CheckpointFolder', 'read_checkpoint_folder', 'load_checkpoint_folder', 'load_safetensors_checkpoint',
    'spformer_variant', 'CONFIG_NAME', 'WEIGHTS_NAME', 'EMA_WEIGHTS_NAME', 'TRAIN_CONFIG_NAME', 'RESULTS_NAME',
    'PICKLE_PATTERNS', 'hub_http_client',
]

CONFIG_NAME = 'config.json'
WEIGHTS_NAME = 'model.safetensors'
EMA_WEIGHTS_NAME = 'model_ema.safetensors'
TRAIN_CONFIG_NAME = 'train_config.yaml'
RESULTS_NAME = 'results.json'
# Pickled weights: never loaded here, and removed from a repo when we push to it.
PICKLE_PATTERNS = ('*.bin', '*.pth', '*.pt', '*.pth.tar', '*.ckpt', '*.pkl', '*.pickle')

PathLike = Union[str, pathlib.Path]


def hub_http_client():
    """The HTTP client module huggingface_hub runs on (httpx2 from huggingface_hub 2 on, httpx before):
    where its network errors (``TransportError``) and, for tests, its transports come from."""
    from huggingface_hub.utils import _http
    return getattr(_http, 'httpx2', None) or _http.httpx


def spformer_variant(name: str, argument: str = 'model_name') -> str:
    """``name`` without its pretrained tag, checked to be a registered SPFormer variant."""
    import timm
    if not isinstance(name, str):
        raise TypeError(f'{argument} must be a model name string, got {type(name).__name__}')
    variant = name.split('.')[0]
    names = timm.list_models('spformer_*')
    if variant not in names:
        raise ValueError(f'{argument}={name!r} is not an SPFormer variant; expected one of: {", ".join(names)}')
    return variant


@dataclass
class CheckpointFolder:
    """What a training output folder holds (timm ``save_for_hf`` layout plus the training script's extras)."""
    path: pathlib.Path
    config: Dict[str, Any]
    weights: Optional[pathlib.Path]
    ema_weights: Optional[pathlib.Path]
    train_config: Optional[Dict[str, Any]]
    results: Optional[Dict[str, Any]]

    @property
    def architecture(self) -> str:
        return self.config['architecture']

    def select_weights(self, ema: Optional[bool] = None) -> pathlib.Path:
        """The weights to use: EMA when present (``ema=None``), required (``True``) or refused (``False``)."""
        if ema is None:
            ema = self.ema_weights is not None
        chosen = self.ema_weights if ema else self.weights
        if chosen is None:
            name = EMA_WEIGHTS_NAME if ema else WEIGHTS_NAME
            raise FileNotFoundError(f'{self.path} has no {name} (ema={ema})')
        return chosen


def read_checkpoint_folder(folder: PathLike) -> CheckpointFolder:
    """Read ``config.json``, find the weights, and read ``train_config.yaml`` / ``results.json`` if present."""
    import yaml
    path = pathlib.Path(folder)
    if not path.is_dir():
        raise FileNotFoundError(f'checkpoint folder {str(folder)!r} is not a directory')
    config_file = path / CONFIG_NAME
    if not config_file.is_file():
        raise FileNotFoundError(f'{path} has no {CONFIG_NAME}: expected a timm save_for_hf / training output folder')
    config = json.loads(config_file.read_text())
    if not isinstance(config, dict) or 'architecture' not in config:
        raise ValueError(f'{config_file} has no "architecture": not a timm config.json')
    spformer_variant(config['architecture'], argument=f'{config_file} "architecture"')
    weights = path / WEIGHTS_NAME if (path / WEIGHTS_NAME).is_file() else None
    ema_weights = path / EMA_WEIGHTS_NAME if (path / EMA_WEIGHTS_NAME).is_file() else None
    if weights is None and ema_weights is None:
        pickles = sorted(p.name for pattern in PICKLE_PATTERNS for p in path.glob(pattern))
        found = f' (found {", ".join(pickles)}: pickled weights are never loaded; save them with safetensors)' \
            if pickles else ''
        raise FileNotFoundError(f'{path} has neither {WEIGHTS_NAME} nor {EMA_WEIGHTS_NAME}{found}')
    train_config = results = None
    if (path / TRAIN_CONFIG_NAME).is_file():
        train_config = yaml.safe_load((path / TRAIN_CONFIG_NAME).read_text())
        if train_config is not None and not isinstance(train_config, dict):
            raise ValueError(f'{path / TRAIN_CONFIG_NAME} must hold a YAML mapping, got {type(train_config).__name__}')
    if (path / RESULTS_NAME).is_file():
        results = json.loads((path / RESULTS_NAME).read_text())
        if not isinstance(results, dict):
            raise ValueError(f'{path / RESULTS_NAME} must hold a JSON object, got {type(results).__name__}')
    return CheckpointFolder(path, config, weights, ema_weights, train_config, results)


def load_checkpoint_folder(
        folder: PathLike,
        *,
        model_name: Optional[str] = None,
        ema: Optional[bool] = None,
        **kwargs,
) -> torch.nn.Module:
    """Build the model a training output folder describes and load its weights, the timm way.

    Args:
        folder: Folder with ``config.json`` and ``model.safetensors`` and/or ``model_ema.safetensors``.
        model_name: If given, the variant the caller expects; a config naming another one is refused.
        ema: Use ``model_ema.safetensors``: when present (None, default), required (True), never (False).
        **kwargs: Passed to ``timm.create_model`` (e.g. ``features_only=True``, ``attn_backend=...``).

    Equivalent to ``timm.create_model('local-dir:FOLDER', pretrained=True)`` (which always takes
    ``model.safetensors``) with the EMA choice added.
    """
    import timm
    ckpt = read_checkpoint_folder(folder)
    if model_name is not None and spformer_variant(model_name) != ckpt.architecture:
        raise ValueError(
            f'{ckpt.path / CONFIG_NAME} names {ckpt.architecture}, but model_name={model_name!r} was asked for')
    weights = ckpt.select_weights(ema)
    return timm.create_model(
        f'local-dir:{ckpt.path}', pretrained=True,
        pretrained_cfg_overlay=dict(file=str(weights), source='file'), **kwargs)


def _safetensors_shapes(path: pathlib.Path) -> Dict[str, tuple]:
    from safetensors import safe_open
    try:
        with safe_open(str(path), framework='pt') as f:
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception as e:  # SafetensorError: a pickle renamed, a truncated file, ...
        raise ValueError(f'{path} is not a readable safetensors file: {e}') from e
    out = {}
    for k, shape in shapes.items():
        for prefix in ('module.', '_orig_mod.'):
            while k.startswith(prefix):
                k = k[len(prefix):]
        out[k.replace('._orig_mod.', '.')] = shape
    return out


def load_safetensors_checkpoint(
        path: PathLike,
        model_name: str,
        *,
        img_size: Optional[int] = None,
        num_classes: Optional[int] = None,
        **kwargs,
) -> torch.nn.Module:
    """Load a bare ``.safetensors`` state dict into ``model_name``.

    ``num_classes`` defaults to the checkpoint's classifier (0 without one) and ``img_size`` to the
    one its position embeddings were made for (square token grids), so the weights load unchanged
    instead of having their head dropped or position embeddings resampled. Tensors made for another
    variant are refused by the model's ``checkpoint_filter_fn``, naming both.
    """
    import timm
    from spformer.models.spformer import _variant_shapes
    path = pathlib.Path(path)
    if path.suffix != '.safetensors':
        raise ValueError(f'checkpoint {str(path)!r} must be a .safetensors file (pickled weights are never loaded)')
    if not path.is_file():
        raise FileNotFoundError(f'checkpoint {str(path)!r} is not a file')
    variant = spformer_variant(model_name)
    shapes = _safetensors_shapes(path)
    if num_classes is None:
        num_classes = shapes['head.weight'][0] if 'head.weight' in shapes else 0
    if img_size is None and 'stages.0.pos_embed' in shapes:
        default_size = timm.models.get_pretrained_cfg(variant).input_size[-1]
        default_grid = math.isqrt(_variant_shapes(variant)['stages.0.pos_embed'][1])
        side = math.isqrt(shapes['stages.0.pos_embed'][1])
        if side * side == shapes['stages.0.pos_embed'][1]:
            img_size = side * (default_size // default_grid)
    if img_size is not None:
        kwargs['img_size'] = img_size
    return timm.create_model(
        variant, pretrained=True, num_classes=num_classes,
        pretrained_cfg_overlay=dict(file=str(path), num_classes=num_classes), **kwargs)
