"""Hugging Face Hub tools, shipped as ``spformer.hub`` (``hub`` is another PyPI project's name).

Publish trained weights (SPFormer classifiers and SP-Transformer segmenters) in timm's Hub format with a
model card, and load them back the timm way (``timm.create_model('hf-hub:ORG/NAME', pretrained=True)`` after ``import spformer``)::

    from spformer.hub import load_model, save_pretrained, push_to_hub, load_checkpoint_folder
    loaded = load_model('out/run/final')                       # any model reference: name, hf-hub:, folder, file
    save_pretrained(model, 'out/')                             # config.json, model.safetensors, README.md, superpixels.png
    push_to_hub(model_or_training_folder, 'ORG/NAME')          # one commit; returns its URL
    model = load_checkpoint_folder('out/run/final')            # a training folder (its better-validating weights)

The command line is ``spformer-hub`` (:mod:`spformer.hub.cli`); :mod:`spformer.hub.testing` is an
in-memory Hub for tests.
"""
from .card import model_card, save_superpixel_picture
from .checkpoint import (
    CheckpointFolder, LoadedModel, ModelReferenceError, WeightsChoice, choose_weights, load_checkpoint_folder,
    load_model, load_safetensors_checkpoint, read_checkpoint_folder)
from .publish import PUBLISHED_FILES, clean_state_dict, push_to_hub, save_pretrained, unwrap_model

__all__ = [
    'load_model', 'LoadedModel', 'ModelReferenceError', 'WeightsChoice', 'choose_weights', 'save_pretrained', 'push_to_hub', 'load_checkpoint_folder', 'load_safetensors_checkpoint',
    'read_checkpoint_folder', 'CheckpointFolder', 'model_card', 'save_superpixel_picture', 'unwrap_model',
    'clean_state_dict', 'PUBLISHED_FILES',
]
