"""prefix-lightning: prefix-tuning of frozen transformers LMs.

The library (this package's subpackages but ``training``, ``sweeps``, the ``benchmark`` command and the data modules
``data.datamodule`` and ``data.multitask``) knows nothing of Lightning or Hydra: ``PrefixModel`` works in any PyTorch
loop. The modules at this level are the commands (``python -m prefix_lightning.<command>``; ``benchmark`` is a
package) and ``cli``, how they end.
"""

from prefix_lightning.backbones import load_backbone
from prefix_lightning.prefix import PrefixBank, PrefixConfig, PrefixModel, UnsupportedModelError

__all__ = ["PrefixBank", "PrefixConfig", "PrefixModel", "UnsupportedModelError", "load_backbone"]
