"""The methods prefix-tuning is compared with, each a class with the method interface
(``prefix_lightning.methods.TrainableLM``): full fine-tuning, the top layers only, LoRA, PEFT's prefix tuning."""

from prefix_lightning.baselines.base import FineTunedLM
from prefix_lightning.baselines.full import FullFineTuning
from prefix_lightning.baselines.lora import LoRA
from prefix_lightning.baselines.peft_prefix import PeftPrefixTuning
from prefix_lightning.baselines.top_layers import TopLayers, decoder_blocks, load_top_layers

__all__ = [
    "FineTunedLM",
    "FullFineTuning",
    "LoRA",
    "PeftPrefixTuning",
    "TopLayers",
    "decoder_blocks",
    "load_top_layers",
]
