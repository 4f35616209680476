"""Publishing weights: the timm Hub folder (:func:`save_pretrained`) and the push (:func:`push_to_hub`).

What is published: the families of :data:`spformer.hub.card.FAMILIES`, SPFormer image classifiers
(``spformer_*``) and SP-Transformer semantic segmenters (``sp_transformer_*``); any other model is refused
naming both. The same code publishes both; the family decides the card and the picture.

The folder is what timm's ``save_for_hf`` writes (``config.json`` through
``timm.models._hub.save_config_for_hf``, weights as ``model.safetensors`` only) plus a model card
``README.md`` and the superpixel picture, so ``timm.create_model('hf-hub:ORG/NAME', pretrained=True)``
loads it with nothing but ``import spformer`` first. timm's ``push_to_hf_hub`` is not used: it also
writes ``pytorch_model.bin`` by default, keeps an existing card, and has no EMA / training metadata.
"""
import json
import pathlib
import tempfile
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn

from spformer.models.pretrained import unwrapped_key

from .card import (FAMILIES, FAMILY_NOUNS, PICTURE_NAME, ModelFamily, _load_image, model_card, model_family,
                   resolve_datasets, save_superpixel_picture)
from .checkpoint import CONFIG_NAME, PICKLE_PATTERNS, WEIGHTS_NAME, load_model, our_variant, read_checkpoint_folder

__all__ = ['save_pretrained', 'push_to_hub', 'save_config', 'unwrap_model', 'clean_state_dict', 'PUBLISHED_FILES',
           'publishable_variant']

README_NAME = 'README.md'
# Exactly what save_pretrained writes and push_to_hub commits.
PUBLISHED_FILES = (CONFIG_NAME, WEIGHTS_NAME, README_NAME, PICTURE_NAME)
# Construction arguments that choose how a model runs, not what it is: never exported.
_RUNTIME_ARGS = ('attn_backend',)
# Construction arguments that load weights the published file already holds (a segmenter's backbone): False.
_WEIGHT_ARGS = ('backbone_pretrained',)


def unwrap_model(model: nn.Module) -> nn.Module:
    """The model inside DDP / DataParallel, ``torch.compile`` and timm ``ModelEma*`` wrappers."""
    from timm.utils.model_ema import ModelEma, ModelEmaV2, ModelEmaV3
    wrappers = (nn.DataParallel, nn.parallel.DistributedDataParallel, ModelEma, ModelEmaV2, ModelEmaV3)
    while True:
        if type(model).__name__ == 'OptimizedModule' and hasattr(model, '_orig_mod'):  # torch.compile
            model = model._orig_mod
        elif isinstance(model, wrappers):
            model = model.ema if isinstance(model, ModelEma) else model.module
        else:
            return model


def clean_state_dict(state_dict: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Drop ``module.`` / ``_orig_mod.`` wrapper prefixes (and compiled submodules' ``._orig_mod.``) from keys;
    contiguous CPU tensors, as safetensors wants them."""
    out = {}
    for k, v in state_dict.items():
        k = unwrapped_key(k)
        if k in out:
            raise ValueError(f'state_dict key {k!r} appears twice once wrapper prefixes are removed')
        out[k] = v.detach().to('cpu').contiguous()
    return out


def _check_publishable(model: Any) -> Tuple[nn.Module, ModelFamily]:
    """The model inside its wrappers, and its family; anything but an SPFormer classifier or an SP-Transformer
    segmenter made by timm.create_model is refused naming both."""
    if not isinstance(model, nn.Module):
        raise TypeError(f'model must be {FAMILY_NOUNS} (torch.nn.Module), got {type(model).__name__}')
    inner = unwrap_model(model)
    family = model_family(inner)
    if family is None:
        raise TypeError(
            f'model must be {FAMILY_NOUNS} made by timm.create_model (optionally inside DDP, torch.compile or '
            f'ModelEma), got {type(inner).__name__}')
    cfg = getattr(inner, 'pretrained_cfg', None)
    if not isinstance(cfg, dict) or not cfg.get('architecture'):
        raise ValueError('model has no pretrained_cfg["architecture"]: build it with timm.create_model(name, ...) '
                         'so config.json can name its variant')
    return inner, family


def publishable_variant(name: Any, argument: str = 'model_name') -> str:
    """``name`` without its pretrained tag, checked to be a registered model of a published family: an SPFormer
    classifier (``spformer_*``) or an SP-Transformer segmenter (``sp_transformer_*``)."""
    return our_variant(name, argument, why=f' (spformer.hub publishes {" and ".join(f.noun + "s" for f in FAMILIES)})')


def _check_label_names(label_names, num_classes: int):
    if label_names is None:
        return None
    if isinstance(label_names, str) or not isinstance(label_names, (list, tuple)) or \
            not all(isinstance(n, str) for n in label_names):
        raise TypeError(f'label_names must be a list of strings, got {type(label_names).__name__}')
    if len(label_names) != num_classes:
        raise ValueError(f'label_names has {len(label_names)} names but the model has num_classes={num_classes}')
    return list(label_names)


def _check_mapping(value, argument: str):
    if value is not None and not isinstance(value, Mapping):
        raise TypeError(f'{argument} must be a dict (or None), got {type(value).__name__}')
    return dict(value) if value is not None else None


def save_config(
        model: nn.Module,
        path: Union[str, pathlib.Path],
        *,
        label_names: Optional[Sequence[str]] = None,
        datasets: Sequence[str] = (),
        data_config: Optional[Dict[str, Any]] = None,
) -> Dict[str, Any]:
    """Write timm's ``config.json`` for ``model`` (``timm.models._hub.save_config_for_hf``), true for weights
    that are not the registered ones: no run-time arguments (``attn_backend``), and the pretrained tag
    ``in1k`` only for a 1000-class model trained on ImageNet-1k (a fine-tune on other data has no tag).
    Returns the config."""
    from timm.models._hub import save_config_for_hf
    path = pathlib.Path(path)
    save_config_for_hf(model, str(path), model_config=dict(label_names=list(label_names)) if label_names else None,
                       data_config=data_config)
    config = json.loads(path.read_text())
    for key in _RUNTIME_ARGS:
        config.get('model_args', {}).pop(key, None)
    for key in _WEIGHT_ARGS:
        if key in config.get('model_args', {}):
            config['model_args'][key] = False  # the weights published hold them
    pretrained_cfg = config.get('pretrained_cfg', {})
    if config.get('num_classes') == 1000 and list(datasets)[:1] == ['imagenet-1k']:
        pretrained_cfg['tag'] = 'in1k'
    else:
        pretrained_cfg.pop('tag', None)
    path.write_text(json.dumps(config, indent=2))
    return config


def save_pretrained(
        model: nn.Module,
        save_directory: Union[str, pathlib.Path],
        *,
        label_names: Optional[Sequence[str]] = None,
        train_config: Optional[Dict[str, Any]] = None,
        metrics: Optional[Dict[str, Any]] = None,
        sample_image=None,
        datasets: Union[str, Sequence[str], None] = None,
        ema: bool = False,
        weights_note: Optional[str] = None,
        repo_id: Optional[str] = None,
        revision: Optional[str] = None,
) -> pathlib.Path:
    """Write the Hub folder of a model: ``config.json``, ``model.safetensors``, ``README.md``, ``superpixels.png``.

    Args:
        model: An SPFormer classifier or an SP-Transformer segmenter from ``timm.create_model`` (DDP /
            ``torch.compile`` / ``ModelEma`` wrappers are removed, and never reach the key names).
        save_directory: Folder to write (created if needed; other files in it are left alone).
        label_names: One name per class; default: the model's own, or ImageNet-1k's synsets for a
            1000-class model trained on ``imagenet-1k``.
        train_config: The effective training configuration (shown in the card).
        metrics: Evaluation results, e.g. ``{'top1': 72.1, 'top5': 91.0, 'top1_ema': 72.4}``, or a segmenter's
            ``{'miou': 41.2, 'pixel_accuracy': 88.0, 'iou': {class name: IoU}}`` (train_segmentation.py's).
        sample_image: Image for the picture: a path, PIL image or (H, W, 3) uint8 array; default
            scikit-image's astronaut.
        datasets: Hub dataset ids for the card; default from ``train_config`` (``dataset`` key).
        ema: The weights are EMA weights (the card says so and reports the ``*_ema`` metrics).
        weights_note: Why these weights were chosen over the others of their run (shown in the card).
        repo_id / revision: Where the folder will be pushed (for the card's usage block).

    Returns:
        The folder.
    """
    import safetensors.torch

    inner, family = _check_publishable(model)
    train_config = _check_mapping(train_config, 'train_config')
    metrics = _check_mapping(metrics, 'metrics')
    label_names = _check_label_names(label_names, inner.num_classes)
    datasets = resolve_datasets(datasets, train_config, inner.num_classes)
    if label_names is None:
        label_names = inner.pretrained_cfg.get('label_names')
        if label_names is not None and len(label_names) != inner.num_classes:
            label_names = None
    if label_names is None and inner.num_classes == 1000 and datasets[:1] == ['imagenet-1k']:
        from timm.data import ImageNetInfo
        label_names = list(ImageNetInfo('imagenet-1k').label_names())
    save_directory = pathlib.Path(save_directory)
    save_directory.mkdir(parents=True, exist_ok=True)

    safetensors.torch.save_file(clean_state_dict(inner.state_dict()), str(save_directory / WEIGHTS_NAME),
                                metadata={'format': 'pt'})
    config = save_config(inner, save_directory / CONFIG_NAME, label_names=label_names, datasets=datasets)

    arch = config['architecture']
    save_superpixel_picture(inner, save_directory / PICTURE_NAME, sample_image,
                            title=f'{repo_id or arch}: {family.picture}', label_names=label_names)
    facts = dict(backbone=getattr(inner, 'backbone_name', None), decoder=getattr(inner, 'decoder', None),
                 token_stride=getattr(inner, 'token_stride', None)) if family.segmenter else None
    card = model_card(
        repo_id or 'ORG/NAME', config, num_params=sum(p.numel() for p in inner.parameters()),
        datasets=datasets, train_config=train_config, metrics=metrics, ema=ema, weights_note=weights_note,
        revision=revision, family=family, facts=facts,
        picture_image=("scikit-image's astronaut" if sample_image is None else
                       f'`{pathlib.Path(sample_image).name}`' if isinstance(sample_image, (str, pathlib.Path))
                       else 'a sample image'))
    (save_directory / README_NAME).write_text(card, encoding='utf-8')
    return save_directory


def _load_source(model_or_folder, *, ema: Optional[bool], model_name: Optional[str]) -> Tuple[nn.Module, Dict[str, Any]]:
    """The model to publish, and what its source knows (label names, training config, results, which weights
    and why). A folder or file goes through :func:`spformer.hub.load_model`; a training folder's weights are
    the better-validating of the weights and their EMA unless ``ema`` says which."""
    if isinstance(model_or_folder, nn.Module):
        if model_name is not None or ema is not None:
            raise ValueError('model_name and ema are only for a .safetensors file or a folder, not for a model')
        return model_or_folder, {}
    if not isinstance(model_or_folder, (str, pathlib.Path)):
        raise TypeError(f'model_or_folder must be a model ({FAMILY_NOUNS}), a training output folder or a '
                        f'.safetensors file, got {type(model_or_folder).__name__}')
    if model_name is not None:
        publishable_variant(model_name)  # refuse models of other families before loading anything
    path = pathlib.Path(model_or_folder)
    if not path.exists():
        raise FileNotFoundError(f'model_or_folder {str(model_or_folder)!r} is neither a folder nor a file')
    if path.is_dir():
        ckpt = read_checkpoint_folder(path)
        loaded = load_model(str(path), argument='checkpoint', model_name=model_name, ema=ema)
        # The card says why these weights and not the others of the run only where there was a choice.
        chose = ckpt.weights is not None and ckpt.ema_weights is not None
        return loaded.model, dict(label_names=ckpt.config.get('label_names'), train_config=ckpt.train_config,
                                  metrics=ckpt.results, ema=loaded.choice.ema,
                                  weights_note=loaded.choice.reason if chose else None,
                                  weights_file=str(path / loaded.choice.file_name),
                                  weights_reason=loaded.choice.reason)
    if ema is not None:
        raise ValueError(f'ema={ema} chooses between the weights of a training folder; {path} is a single file')
    if model_name is not None:
        reference = f'{model_name}={path}'
    elif path.suffix == '.safetensors' and not (path.parent / CONFIG_NAME).is_file():
        raise ValueError(f'a single weights file ({path}) needs model_name (the SPFormer or SP-Transformer variant '
                         f'it is for): no {CONFIG_NAME} beside it names one')
    else:
        reference = str(path)
    loaded = load_model(reference, argument='checkpoint')
    return loaded.model, dict(weights_file=str(path))


def push_to_hub(
        model_or_folder: Union[nn.Module, str, pathlib.Path],
        repo_id: str,
        *,
        private: bool = False,
        revision: Optional[str] = None,
        token: Optional[str] = None,
        commit_message: Optional[str] = None,
        label_names: Optional[Sequence[str]] = None,
        train_config: Optional[Dict[str, Any]] = None,
        metrics: Optional[Dict[str, Any]] = None,
        ema: Optional[bool] = None,
        model_name: Optional[str] = None,
        datasets: Union[str, Sequence[str], None] = None,
        sample_image=None,
) -> str:
    """Publish an SPFormer classifier or an SP-Transformer segmenter to the Hub repo ``repo_id`` in one commit;
    returns the commit URL.

    Args:
        model_or_folder: A model; a training output folder (``config.json``, ``model.safetensors``,
            optional ``model_ema.safetensors``, ``train_config.yaml``, ``results.json``: train_imagenet.py's or
            train_segmentation.py's ``final/``); or one ``.safetensors`` file together with ``model_name``.
        repo_id: ``ORG/NAME``; created (``private`` or public) if it does not exist.
        revision: Branch to commit to (created from ``main`` if missing); default ``main``.
        token: Hub token; default the one ``huggingface_hub`` finds (``HF_TOKEN``, ``hf auth login``).
        commit_message: Default ``'Add <architecture> weights'``.
        label_names / train_config / metrics: Override what a folder carries (see :func:`save_pretrained`).
        ema: For a training folder: None (default) publishes the better-validating of ``model.safetensors`` and
            ``model_ema.safetensors`` (``results.json``; the card says which and why), True the EMA weights,
            False the model weights. Whichever is published is named ``model.safetensors`` in the repo.
        model_name: The variant of a single ``.safetensors`` file; for a folder, the variant it must be.
        datasets: Hub dataset ids for the card (default from the training configuration).
        sample_image: Image for the picture (default scikit-image's astronaut).

    The commit holds exactly ``config.json``, ``model.safetensors``, ``README.md`` and ``superpixels.png``
    and deletes pickled weights (``*.bin``, ``*.pth``, ...) left in the repo; the card is always rewritten.
    """
    from huggingface_hub import HfApi
    import spformer

    if not isinstance(repo_id, str) or repo_id.count('/') != 1 or not all(repo_id.split('/')):
        raise ValueError(f"repo_id must be 'ORG/NAME' (namespace and name), got {repo_id!r}")
    if revision is not None and (not isinstance(revision, str) or not revision):
        raise ValueError(f'revision must be a branch name, got {revision!r}')
    model, found = _load_source(model_or_folder, ema=ema, model_name=model_name)
    _check_publishable(model)
    if sample_image is not None:
        _load_image(sample_image)  # a bad picture fails here, before the repo is created
    api = HfApi(token=token, library_name='spformer', library_version=spformer.__version__)
    api.create_repo(repo_id, private=private, exist_ok=True)
    if revision is not None and revision != 'main':
        api.create_branch(repo_id, branch=revision, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix='spformer-hub-') as tmp:
        save_pretrained(
            model, tmp,
            label_names=label_names if label_names is not None else found.get('label_names'),
            train_config=train_config if train_config is not None else found.get('train_config'),
            metrics=metrics if metrics is not None else found.get('metrics'),
            sample_image=sample_image, datasets=datasets, ema=found.get('ema', False),
            weights_note=found.get('weights_note'), repo_id=repo_id, revision=revision)
        arch = json.loads((pathlib.Path(tmp) / CONFIG_NAME).read_text())['architecture']
        info = api.upload_folder(
            repo_id=repo_id, folder_path=tmp, revision=revision,
            commit_message=commit_message or f'Add {arch} weights' + (' (EMA)' if found.get('ema') else ''),
            allow_patterns=list(PUBLISHED_FILES), delete_patterns=list(PICKLE_PATTERNS))
    return info.commit_url
