"""A method added the way the README shows (one class, one ``conf/method/<name>.yaml``): tests add it to a run from
a config folder of their own."""

from __future__ import annotations

from pathlib import Path

from safetensors.torch import save_file
from transformers import PreTrainedModel

from prefix_lightning.baselines import FineTunedLM


class NormTuning(FineTunedLM):
    """Trains the LM's normalization weights only (LayerNorm, RMSNorm): a few hundred parameters of a tiny model."""

    def __init__(self, lm: PreTrainedModel) -> None:
        lm.requires_grad_(False)
        for module in lm.modules():
            if type(module).__name__.endswith(("LayerNorm", "RMSNorm")):
                module.requires_grad_(True)
        super().__init__(lm)

    def save(self, path: str | Path) -> Path:
        """The trained weights by their names in the LM."""
        folder = Path(path)
        folder.mkdir(parents=True, exist_ok=True)
        tensors = {name: p.detach().contiguous() for name, p in self.lm.named_parameters() if p.requires_grad}
        save_file(tensors, folder / "norms.safetensors")
        return folder


class TrainsNothing(FineTunedLM):
    """A method written wrong: it freezes everything."""

    def __init__(self, lm: PreTrainedModel) -> None:
        lm.requires_grad_(False)
        super().__init__(lm)


class SavesNothing(NormTuning):
    """A method written wrong: its save writes no file."""

    def save(self, path: str | Path) -> Path:
        return Path(path)
