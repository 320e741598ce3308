"""Dataset readers, tokenization/batching, and LightningDataModules."""

from prefix_lightning.data.collate import IGNORE_INDEX, EncodedPair, EncodedPrompt, TextToTextCollator
from prefix_lightning.data.datamodule import E2EDataModule
from prefix_lightning.data.e2e import E2E_FILES, E2E_URL, download_e2e, linearize_mr, read_e2e
from prefix_lightning.data.examples import Example, group_references

__all__ = [
    "E2E_FILES",
    "E2E_URL",
    "IGNORE_INDEX",
    "E2EDataModule",
    "EncodedPair",
    "EncodedPrompt",
    "Example",
    "TextToTextCollator",
    "download_e2e",
    "group_references",
    "linearize_mr",
    "read_e2e",
]
