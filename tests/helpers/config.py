"""Composing the shipped Hydra configs in tests, as run.py does."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from hydra import compose, initialize_config_dir
from omegaconf import DictConfig
from transformers import PreTrainedTokenizerBase

from prefix_lightning.methods import TrainableLM
from prefix_lightning.training.build import RunData, configured_data, encode_for

REPO = Path(__file__).resolve().parents[2]
CONF = REPO / "conf"


def compose_train(output_dir: Path, overrides: Sequence[str] = ()) -> DictConfig:
    """The config `python run.py <overrides>` would run, writing into ``output_dir``."""
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("train", overrides=[f"paths.output_dir={output_dir}", *overrides])


def options(group: str) -> list[str]:
    """The choices of a config group; data/default.yaml is only the base of the others (it names no dataset)."""
    return sorted(p.stem for p in (CONF / group).glob("*.yaml") if (group, p.stem) != ("data", "default"))


def run_folder(path: Path, config: str, overrides: Sequence[str]) -> Path:
    """A run's folder as Hydra leaves it, with only its ``.hydra/`` config (YAML text) and overrides."""
    (path / ".hydra").mkdir(parents=True)
    (path / ".hydra" / "config.yaml").write_text(config)
    (path / ".hydra" / "overrides.yaml").write_text("".join(f"- {item}\n" for item in overrides))
    return path


def build_datamodule(cfg: DictConfig, tokenizer: PreTrainedTokenizerBase, model: TrainableLM) -> RunData:
    """The configured data module, tokenizing for ``model`` (a run reads its data before the model loads, then
    tokenizes: ``configured_data``, then ``encode_for``)."""
    datamodule = configured_data(cfg)
    encode_for(datamodule, cfg, tokenizer, model)
    return datamodule
