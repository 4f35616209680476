"""From a model reference to a model: registered names, Hub ids, training folders and ``.safetensors`` files.

:func:`load_model` is the one way every tool (``spformer-demo``, ``spformer-eval-superpixels``,
``spformer-visualize``, ``spformer-hub``, ``train_imagenet.py``) turns what a user typed into a model:

    spformer_small_sp16_224            a registered name (its published weights, else an UNTRAINED random init)
    hf-hub:ORG/NAME[@REVISION]         a model published on the Hub (timm's loader)
    local-dir:FOLDER, or FOLDER        a folder with config.json and model.safetensors / model_ema.safetensors:
                                       timm's save_for_hf layout, train_imagenet.py's or train_segmentation.py's
                                       final/ (the better-validating of the weights and their EMA unless told
                                       otherwise)
    NAME=FILE.safetensors              a weights file of the registered model NAME
    FILE.safetensors                   a weights file next to the config.json that names its model

Loading goes through timm (``local-dir:`` configs, ``pretrained_cfg_overlay=dict(file=...)``, the
model's ``checkpoint_filter_fn``; our factories, SPFormer's and SP-Transformer's, read a file's head size
and token grid themselves, so a fine-tuned file loads with its own class count and input size). A weights
file takes the construction arguments of the ``config.json`` beside it that describes it (its
``model_args``, as timm's ``local-dir:`` loader does). What is added here is what timm lacks: the EMA choice, refusing pickles, a config that names another variant refused
naming both, and errors that name the argument the user passed.
"""
import contextlib
import json
import math
import os
import pathlib
from dataclasses import dataclass
from typing import Any, Dict, Mapping, Optional, Sequence, Union

import torch

from spformer.errors import UserError
from spformer.models.pretrained import (
    CONFIG_NAME, CheckpointTensors, PretrainedWeightsUnavailable, checkpoint_tensor_info, hub_http_client,
)

__all__ = [
    'CheckpointFolder', 'read_checkpoint_folder', 'load_checkpoint_folder', 'load_safetensors_checkpoint',
    'spformer_variant', 'our_variant', 'OUR_FAMILIES', 'CONFIG_NAME', 'WEIGHTS_NAME', 'EMA_WEIGHTS_NAME', 'TRAIN_CONFIG_NAME', 'RESULTS_NAME',
    'PICKLE_PATTERNS', 'hub_http_client', 'WeightsChoice', 'choose_weights', 'load_model', 'LoadedModel',
    'ModelReferenceError', 'checkpoint_tensor_info', 'CheckpointTensors', 'weights_source',
]

WEIGHTS_NAME = 'model.safetensors'
EMA_WEIGHTS_NAME = 'model_ema.safetensors'
TRAIN_CONFIG_NAME = 'train_config.yaml'
RESULTS_NAME = 'results.json'
# Pickled weights: never loaded here, and removed from a repo when we push to it.
PICKLE_PATTERNS = ('*.bin', '*.pth', '*.pt', '*.pth.tar', '*.ckpt', '*.pkl', '*.pickle')

PathLike = Union[str, pathlib.Path]


# The model families of this library, by the prefix of their registered timm names: their factories read a weights
# file's head size and token grid themselves, and spformer.hub publishes them.
OUR_FAMILIES = {'spformer_': 'SPFormer', 'sp_transformer_': 'SP-Transformer'}


def our_variant(name: Any, argument: str = 'model_name', families: Sequence[str] = tuple(OUR_FAMILIES),
                why: str = '') -> str:
    """``name`` without its pretrained tag, checked to be a registered variant of ``families`` (prefixes of
    :data:`OUR_FAMILIES`); the error names ``argument``, the families, ``why`` and the registered names."""
    import timm
    if not isinstance(name, str):
        raise TypeError(f'{argument} must be a model name string, got {type(name).__name__}')
    variant = name.split('.')[0]
    registered = {prefix: timm.list_models(f'{prefix}*') for prefix in families}
    if not any(variant in names for names in registered.values()):
        nouns = [f'{OUR_FAMILIES[prefix]} variant' for prefix in families]
        expected = '; '.join(f'{OUR_FAMILIES[prefix]} variants: {", ".join(names)}'
                             for prefix, names in registered.items())
        raise ValueError(f'{argument}={name!r} is not an {" nor an ".join(nouns)}{why}; expected one of the {expected}')
    return variant


def spformer_variant(name: str, argument: str = 'model_name') -> str:
    """``name`` without its pretrained tag, checked to be a registered SPFormer variant."""
    return our_variant(name, argument, families=('spformer_',))


@dataclass(frozen=True)
class WeightsChoice:
    """Which of a training run's two weight files to use, and why (one sentence, for terminals and cards)."""
    ema: bool
    reason: str

    @property
    def file_name(self) -> str:
        return EMA_WEIGHTS_NAME if self.ema else WEIGHTS_NAME

    @property
    def label(self) -> str:
        return 'EMA' if self.ema else 'model'


def choose_weights(results: Optional[Mapping[str, Any]]) -> Optional[WeightsChoice]:
    """The better-validating of a run's weights and their EMA, from its validation results.

    ``results`` holds ``top1`` / ``loss`` of the weights and ``top1_ema`` / ``loss_ema`` of the EMA
    (``results.json`` of ``train_imagenet.py``). Higher top-1 wins; a tie goes to the lower loss, and
    a full tie to the weights themselves (the EMA then adds nothing). None when the results do not
    hold both top-1 values.
    """
    def number(key):
        value = (results or {}).get(key)
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        return float(value) if ok else None

    top1, top1_ema = number('top1'), number('top1_ema')
    if top1 is None or top1_ema is None:
        return None
    loss, loss_ema = number('loss'), number('loss_ema')
    samples = (results or {}).get('samples')
    on = f' on {samples} validation images' if isinstance(samples, int) and samples > 0 else ''
    if top1_ema != top1:
        ema = top1_ema > top1
        best, other = (top1_ema, top1) if ema else (top1, top1_ema)
        return WeightsChoice(ema, f'{"EMA" if ema else "model"} weights validated better{on}: top-1 {best:.2f} vs '
                                  f'{other:.2f} for the {"model" if ema else "EMA"} weights')
    if loss is not None and loss_ema is not None and loss_ema != loss:
        ema = loss_ema < loss
        best, other = (loss_ema, loss) if ema else (loss, loss_ema)
        return WeightsChoice(ema, f'{"EMA" if ema else "model"} weights validated better{on}: equal top-1 '
                                  f'({top1:.2f}), validation loss {best:.4f} vs {other:.4f}')
    return WeightsChoice(False, f'model and EMA weights validated equally{on} (top-1 {top1:.2f}): the model weights')


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

    def choose(self, ema: Optional[bool] = None) -> WeightsChoice:
        """Which weights to use, and why: the better-validating of the weights and their EMA (``ema=None``:
        ``results.json``'s record, else its top-1 values; the model weights when there are none), or the
        EMA weights (``True``) or the model weights (``False``) as asked."""
        if ema is None:
            if self.ema_weights is None or self.weights is None:
                ema = self.weights is None
                return WeightsChoice(ema, f'{EMA_WEIGHTS_NAME if ema else WEIGHTS_NAME}: the only weights in the folder')
            recorded = (self.results or {}).get('selected_weights')
            if recorded in ('ema', 'model'):
                reason = (self.results or {}).get('selection_reason')
                return WeightsChoice(recorded == 'ema', reason if isinstance(reason, str) and reason else
                                     f'{RESULTS_NAME} selects the {"EMA" if recorded == "ema" else "model"} weights')
            return choose_weights(self.results) or WeightsChoice(
                False, f'no validation results ({RESULTS_NAME}) to compare them with the EMA weights: the model '
                       f'weights, as timm\'s local-dir: loader takes them (ask for the EMA weights explicitly)')
        chosen = self.ema_weights if ema else self.weights
        if chosen is None:
            raise FileNotFoundError(f'{self.path} has no {EMA_WEIGHTS_NAME if ema else WEIGHTS_NAME} (ema={ema})')
        return WeightsChoice(bool(ema), f'{"EMA" if ema else "model"} weights, as asked')

    def select_weights(self, ema: Optional[bool] = None) -> pathlib.Path:
        """The file of :meth:`choose`."""
        return self.path / self.choose(ema).file_name


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
    import timm
    if not isinstance(config['architecture'], str) or not timm.is_model(config['architecture']):
        raise ValueError(f'{config_file} names architecture {config["architecture"]!r}, which is not a registered '
                         f'timm model (import the package that registers it; spformer models: '
                         f'{", ".join(timm.list_models("spformer_*"))})')
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
        ema: None (default): the better-validating of the weights and their EMA (``results.json``, see
            :meth:`CheckpointFolder.choose`); True: ``model_ema.safetensors``; False: ``model.safetensors``.
        **kwargs: Passed to ``timm.create_model`` (e.g. ``features_only=True``, ``attn_backend=...``).

    Equivalent to ``timm.create_model('local-dir:FOLDER', pretrained=True)`` (which always takes
    ``model.safetensors``) with the EMA choice added. :func:`load_model` does the same and also says
    which weights it took and why.
    """
    return load_model(f'local-dir:{folder}', model_name=model_name, ema=ema, argument='folder', **kwargs).model


def load_safetensors_checkpoint(
        path: PathLike,
        model_name: str,
        *,
        img_size: Optional[int] = None,
        num_classes: Optional[int] = None,
        **kwargs,
) -> torch.nn.Module:
    """Load a bare ``.safetensors`` state dict into ``model_name``, an SPFormer or SP-Transformer variant.

    ``num_classes`` defaults to the checkpoint's classifier (0 without one) and ``img_size`` to the
    one its token grid was made for (SPFormer's position embeddings, SP-Transformer's superpixel queries),
    so the weights load unchanged instead of having their head dropped or their grid resampled; the
    construction arguments come from a ``config.json`` beside the file that names ``model_name``. Tensors
    made for another variant are refused by the model's ``checkpoint_filter_fn``, naming both.
    """
    import timm
    path = pathlib.Path(path)
    if path.suffix != '.safetensors':
        raise ValueError(f'checkpoint {str(path)!r} must be a .safetensors file (pickled weights are never loaded)')
    if not path.is_file():
        raise FileNotFoundError(f'checkpoint {str(path)!r} is not a file')
    variant = our_variant(model_name)
    # Our factories take num_classes and img_size from the file when they are not given.
    for key, value in (('num_classes', num_classes), ('img_size', img_size)):
        if value is not None:
            kwargs[key] = value
    return timm.create_model(variant, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)), **kwargs)


# --------------------------------------------------------------------------------------------------
# One way from a model reference to a model
# --------------------------------------------------------------------------------------------------

class ModelReferenceError(UserError):
    """A model reference that cannot be loaded: the message names the argument, what it got and what it expects."""


_WEIGHT_SOURCE_KEYS = ('hf_hub_id', 'url', 'file')
REFERENCE_FORMS = ("a registered name (timm.list_models('spformer*')), 'hf-hub:ORG/NAME', 'local-dir:FOLDER' or "
                   "a FOLDER (config.json + model.safetensors, e.g. train_imagenet.py's final/), "
                   "'NAME=FILE.safetensors', or a FILE.safetensors next to its config.json")


def weights_source(cfg: Union[Mapping[str, Any], Any, None]) -> Optional[str]:
    """Where a pretrained cfg's weights come from (``'hf_hub_id=timm/...'``, ``'url=...'``, ``'file=...'``), or
    None when it names none (a registered SPFormer tag names its Hub repo only once weights are published)."""
    if cfg is None:
        return None
    if not isinstance(cfg, Mapping):
        cfg = cfg.to_dict()  # timm PretrainedCfg
    for key in _WEIGHT_SOURCE_KEYS:
        if cfg.get(key):
            return f'{key}={cfg[key]}'
    return None


@dataclass
class LoadedModel:
    """A model made from a reference, with where its weights came from."""
    model: torch.nn.Module
    reference: str
    source: str  # where the weights came from: a file, a Hub id, 'published (hf_hub_id=...)', 'random init (seed 0)'
    trained: bool  # False: a random init (a registered name without published weights)
    choice: Optional[WeightsChoice] = None  # a training folder's choice between its weights and their EMA

    @property
    def weights(self) -> str:
        """One line for terminals: the source, and why a training folder's weights were chosen."""
        if not self.trained:
            return f'UNTRAINED: {self.source}'
        return f'{self.source} ({self.choice.reason})' if self.choice is not None else self.source

    @property
    def title(self) -> str:
        """A few words for picture titles."""
        return 'UNTRAINED weights (random init)' if not self.trained else f'weights: {self.source}'


def _fail(argument: str, reference: str, message: str, cause: Optional[BaseException] = None):
    error = ModelReferenceError(f'{argument} {reference!r}: {message}')
    raise error from cause


def _create(argument: str, reference: str, name: str, **kwargs) -> torch.nn.Module:
    """timm.create_model with its errors (a checkpoint of another variant, a missing file, the Hub offline)
    turned into one line that names the argument."""
    import timm
    from huggingface_hub.errors import HfHubHTTPError
    try:
        return timm.create_model(name, **kwargs)
    except (PretrainedWeightsUnavailable, FileNotFoundError, ConnectionError, HfHubHTTPError) as e:  # incl. offline
        _fail(argument, reference, f'{type(e).__name__}: {e}' if not isinstance(e, PretrainedWeightsUnavailable)
              else str(e), e)
    except (ValueError, RuntimeError) as e:  # checkpoint_filter_fn refusals, state-dict mismatches
        text = str(e).strip().splitlines()
        _fail(argument, reference, f'could not load it into {name}: {type(e).__name__}: {text[0] if text else ""}'
              + (f' ... ({len(text) - 1} more lines)' if len(text) > 1 else ''), e)


def _checked_file(argument: str, reference: str, path: str) -> pathlib.Path:
    file = pathlib.Path(path)
    if not file.is_file():
        _fail(argument, reference, f'{path!r} is not a file; expected {REFERENCE_FORMS}')
    if file.suffix != '.safetensors':
        _fail(argument, reference, f'{path!r} is not a .safetensors weights file; expected one (pickled weights, '
                                   '.pth/.bin/.pt/..., are never loaded: save the state dict with safetensors)')
    return file


def load_model(
        reference: str,
        *,
        argument: str = 'model',
        pretrained: bool = True,
        require_weights: bool = False,
        model_name: Optional[str] = None,
        ema: Optional[bool] = None,
        seed: Optional[int] = 0,
        device: Union[str, torch.device, None] = None,
        **kwargs,
) -> LoadedModel:
    """Make the model a reference names, the way every spformer tool does (see the module docstring).

    Args:
        reference: What the user typed: a registered name, ``hf-hub:ORG/NAME``, ``local-dir:FOLDER`` or a
            folder, ``NAME=FILE.safetensors``, or ``FILE.safetensors`` next to its ``config.json``.
        argument: The option the reference came from (``'--model'``): every error names it.
        pretrained: For a registered name: load its published weights, if any.
        require_weights: Refuse a registered name without published weights instead of a random init.
        model_name: The architecture the caller expects; a reference to another one is refused naming both.
        ema: For a training folder: None picks the better-validating of the weights and their EMA
            (:meth:`CheckpointFolder.choose`), True the EMA weights, False the model weights.
        seed: Seed of a random init (the caller's RNG state is left as it was); None: the global RNG.
        device: Where to put the model (default: where timm builds it).
        **kwargs: Passed to ``timm.create_model`` (``num_classes``, ``img_size``, ``features_only``, ...).
            A weights file keeps its own head size and input size unless these are given (the head is then
            re-initialised, the position embeddings resampled, as timm does).

    Returns:
        A :class:`LoadedModel`: the model (in train mode, as timm returns it), where its weights came from,
        and whether it is trained.
    """
    import timm
    if not isinstance(reference, str) or not reference.strip():
        raise ModelReferenceError(f'{argument}: expected {REFERENCE_FORMS}, got {reference!r}')

    def expect(architecture: str, where: str):
        if model_name is not None and model_name.split('.')[0] != architecture:
            _fail(argument, reference, f'{where} names {architecture}, but {model_name} was asked for; pass a '
                                       f'reference to {model_name} weights, or ask for {architecture}')

    def finish(model, weights, trained, choice=None) -> LoadedModel:
        if device is not None:
            model = model.to(device)
        return LoadedModel(model, reference, weights, trained, choice)

    if reference.startswith('hf-hub:'):
        model = _create(argument, reference, reference, pretrained=True, **kwargs)
        expect(model.pretrained_cfg.get('architecture', ''), f'the config.json of {reference}')
        return finish(model, reference, True)

    folder = reference[len('local-dir:'):] if reference.startswith('local-dir:') else \
        reference if os.path.isdir(reference) else None
    if folder is not None:
        try:
            ckpt = read_checkpoint_folder(folder)
            choice = ckpt.choose(ema)
        except (FileNotFoundError, ValueError) as e:
            _fail(argument, reference, str(e), e)
        expect(ckpt.architecture, str(ckpt.path / CONFIG_NAME))
        file = ckpt.path / choice.file_name
        model = _create(argument, reference, f'local-dir:{ckpt.path}', pretrained=True,
                        pretrained_cfg_overlay=dict(file=str(file), source='file'), **kwargs)
        return finish(model, str(file), True, choice)

    name, path = reference.split('=', 1) if '=' in reference else (None, None)
    if name is not None and timm.is_model(name):
        file = _checked_file(argument, reference, path)
        info = checkpoint_tensor_info(file)
        if info.architecture is not None and info.architecture != name.split('.')[0]:
            _fail(argument, reference, f'{file.parent / CONFIG_NAME} says the file holds {info.architecture} '
                                       f'weights, not {name}; pass {info.architecture}={path}')
        expect(name.split('.')[0], argument)
        model = _create(argument, reference, name, pretrained=True, **_file_kwargs(name, info, kwargs))
        return finish(model, str(file), True)

    if name is not None and not os.path.exists(reference):
        _fail(argument, reference, f'{name!r} is not a registered model{_close_models(name)}; expected {REFERENCE_FORMS}')
    if reference.endswith('.safetensors') or os.path.isfile(reference):
        file = _checked_file(argument, reference, reference)
        info = checkpoint_tensor_info(file)
        if info.architecture is None:
            _fail(argument, reference, f'which model are these weights for? No {CONFIG_NAME} naming it lies beside '
                                       f'the file; pass NAME={reference} (e.g. spformer_small_sp16_224={reference})')
        expect(info.architecture, str(file.parent / CONFIG_NAME))
        model = _create(argument, reference, info.architecture, pretrained=True,
                        **_file_kwargs(info.architecture, info, kwargs))
        return finish(model, str(file), True)

    if not timm.is_model(reference):
        _fail(argument, reference, f'no such file or folder, and not a registered model{_close_models(reference)}; '
                                   f'expected {REFERENCE_FORMS}')
    expect(reference.split('.')[0], argument)
    source = weights_source(timm.models.get_pretrained_cfg(reference)) if pretrained else None
    if source is not None:
        return finish(_create(argument, reference, reference, pretrained=True, **kwargs), f'published ({source})', True)
    if require_weights:
        _fail(argument, reference, 'no weights are published for it yet; pass a weights file '
                                   f'({reference}=FILE.safetensors or a training folder) or an hf-hub: id')
    with torch.random.fork_rng(devices=[]) if seed is not None else contextlib.nullcontext():
        if seed is not None:
            torch.manual_seed(seed)
        model = _create(argument, reference, reference, **kwargs)
    source = 'random init' + (f' (seed {seed})' if seed is not None else '') + \
        ('; no weights are published for it' if pretrained else '')
    return finish(model, source, False)


def _close_models(name: str) -> str:
    import difflib
    import timm
    close = difflib.get_close_matches(name, timm.list_models('spformer*'), n=3)  # ours first, then timm's
    close += [m for m in difflib.get_close_matches(name, timm.list_models(), n=3) if m not in close][:3 - len(close)]
    return f' (did you mean {", ".join(close)}?)' if close else ''


def _file_kwargs(name: str, info: CheckpointTensors, kwargs: Dict[str, Any]) -> Dict[str, Any]:
    """create_model kwargs that load ``info.path``: the file; and for timm models other than ours, unless given,
    the construction arguments (``model_args``) of the config.json beside it that describes it and its head size.
    Our factories read all of that from the file themselves (``spformer.models.pretrained``), with the input
    size its token grid was made for."""
    import timm
    overlay = dict(kwargs.get('pretrained_cfg_overlay') or {}, file=str(info.path))
    kwargs = dict(kwargs, pretrained_cfg_overlay=overlay)
    if name.startswith(tuple(OUR_FAMILIES)):
        return kwargs
    for key, value in info.model_args_for(name.split('.')[0]).items():
        kwargs.setdefault(key, value)
    cfg = timm.models.get_pretrained_cfg(name)
    classifier = cfg.classifier if cfg is not None else None
    if 'num_classes' not in kwargs and isinstance(classifier, str) and f'{classifier}.weight' in info.shapes:
        kwargs['num_classes'] = overlay['num_classes'] = info.shapes[f'{classifier}.weight'][0]
    return kwargs
