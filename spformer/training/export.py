"""The end of a run: final/ (the weights in timm's save_for_hf layout, their EMA, the configuration and the
final validation), which of the two weights to use, and the Hub client that publishes it."""
import argparse
import json
import os
import shutil
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch.nn as nn
import yaml
from timm.utils import ModelEmaV3

from spformer.hub.card import resolve_datasets
from spformer.hub.checkpoint import WeightsChoice, choose_weights
from spformer.hub.publish import clean_state_dict, save_config
from spformer.training.checkpoints import fsync_tree
from spformer.training.config import ConfigError


def import_push_to_hub(args: argparse.Namespace) -> Optional[Callable]:
    """spformer.hub.push_to_hub when --push-to-hub is given (else None), imported at the start: an install
    without it fails before training rather than after."""
    if not args.push_to_hub:
        return None
    try:
        from spformer.hub import push_to_hub
    except ImportError as e:
        raise ConfigError(f'--push-to-hub: got {args.push_to_hub!r} but spformer.hub.push_to_hub cannot be '
                          f'imported ({e}); expected a complete install of spformer (pip install spformer)') from e
    return push_to_hub


def final_results(val_results: Dict[str, Any]) -> Tuple[Dict[str, Any], Optional[WeightsChoice]]:
    """(results.json, the better weights): the final validation (validate's, less the sample counts) and which
    of the weights and their EMA validated better (selected_weights, selection_reason; None when the results
    cannot tell). final/ keeps both weight files; results.json says which to use, for whoever loads them."""
    results = {k: v for k, v in val_results.items() if not k.startswith('samples')}
    choice = choose_weights(val_results)
    if choice is not None:
        results.update(selected_weights='ema' if choice.ema else 'model', selection_reason=choice.reason)
    return results, choice


def export_final(accelerator, model: nn.Module, model_ema: Optional[ModelEmaV3], folder: Path,
                 class_names: List[str], data_config: Dict[str, Any], config_text: str,
                 results: Dict[str, Any], model_args: Optional[Dict[str, Any]] = None) -> None:
    """final/: config.json + model.safetensors (timm's save_for_hf layout), model_ema.safetensors, config, results.
    The config is spformer.hub's (save_config): no run-time arguments, and no pretrained tag that the data does
    not earn (``in1k`` only for 1000 classes of ImageNet-1k). `model_args` replaces factory arguments recorded
    in config.json (e.g. a segmentation model's backbone_pretrained: the exported weights hold the backbone)."""
    import safetensors.torch
    if not accelerator.is_main_process:
        return
    tmp = folder.with_name(folder.name + '.tmp')
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    unwrapped = accelerator.unwrap_model(model, keep_torch_compile=False)
    label_names = list(class_names) if len(class_names) == unwrapped.num_classes else None
    export_data_config = {k: data_config[k] for k in ('input_size', 'interpolation', 'mean', 'std', 'crop_pct')}
    datasets = resolve_datasets(None, yaml.safe_load(config_text), unwrapped.num_classes)
    for name, module in (('model.safetensors', unwrapped), ('model_ema.safetensors', model_ema and model_ema.module)):
        if module is not None:
            safetensors.torch.save_file(clean_state_dict(module.state_dict()), str(tmp / name), metadata={'format': 'pt'})
    save_config(unwrapped, tmp / 'config.json', label_names=label_names, datasets=datasets,
                data_config=export_data_config)
    if model_args:
        config = json.loads((tmp / 'config.json').read_text())
        config.setdefault('model_args', {}).update(model_args)
        (tmp / 'config.json').write_text(json.dumps(config, indent=2))
    (tmp / 'train_config.yaml').write_text(config_text)
    (tmp / 'results.json').write_text(json.dumps(results, indent=2) + '\n')
    fsync_tree(tmp)
    if folder.exists():
        shutil.rmtree(folder)
    os.rename(tmp, folder)
