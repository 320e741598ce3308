"""The prefix mechanism: config, encoder (reparametrization), attention sites, injection inside attention,
position shift, the ``PrefixModel`` wrapper and its export, the ``PrefixBank`` of many prefixes on one LM. No
Lightning, no Hydra: usable in any PyTorch loop."""

from prefix_lightning.prefix.bank import PrefixBank
from prefix_lightning.prefix.config import KINDS, PrefixConfig
from prefix_lightning.prefix.export import read_prefix
from prefix_lightning.prefix.model import PrefixModel
from prefix_lightning.prefix.sites import UnsupportedModelError

__all__ = ["KINDS", "PrefixBank", "PrefixConfig", "PrefixModel", "UnsupportedModelError", "read_prefix"]
