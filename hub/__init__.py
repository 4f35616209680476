"""Hugging Face Hub tools, shipped as ``spformer.hub`` (``hub`` is another PyPI project's name).

Publishing weights with a model card and loading them back the timm way is issue 5; until
then, load local weights with
``timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file='model.safetensors'))``.
"""
