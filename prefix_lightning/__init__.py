"""prefix-lightning: prefix-tuning of frozen transformers LMs.

The library (this package's subpackages but ``training`` and ``sweeps``) knows nothing of Lightning or Hydra:
``PrefixModel`` works in any PyTorch loop. The modules at this level besides this one are the commands
(``python -m prefix_lightning.<command>``), and ``_import_notices`` (imported first: it quiets what optional
libraries log on import).
"""

from prefix_lightning import _import_notices  # noqa: F401  (first: before transformers imports torchao)
from prefix_lightning.backbones import load_backbone
from prefix_lightning.prefix import PrefixConfig, PrefixModel, UnsupportedModelError

__all__ = ["PrefixConfig", "PrefixModel", "UnsupportedModelError", "load_backbone"]
