"""prefix-lightning: prefix-tuning of frozen transformers LMs.

The core (this package's top level) knows nothing of Lightning or Hydra: ``PrefixModel`` works in any
PyTorch loop.
"""

from prefix_lightning.backbones import load_backbone
from prefix_lightning.config import PrefixConfig
from prefix_lightning.model import PrefixModel
from prefix_lightning.sites import UnsupportedModelError

__all__ = ["PrefixConfig", "PrefixModel", "UnsupportedModelError", "load_backbone"]
