"""Segmenters (DeepLabV2 on ResNets, encoder-decoders on MiT / DINOv2 / MobileNetV2), the
backbone presets the config loader checks model keys against, and weight loading by path."""
from .presets import model_config, resolve_model_config  # registers the backbone and head presets

__all__ = ["model_config", "resolve_model_config"]
