"""Composing the shipped Hydra configs from Python, inside a running Hydra app (whose config search path it
uses) or on its own (the repository's ``conf/``)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"


def compose_config(name: str, overrides: Sequence[str] = ()) -> DictConfig:
    """The config ``name`` (e.g. "train") with ``overrides``, as a command line would compose it."""
    if GlobalHydra.instance().is_initialized():
        return compose(name, overrides=list(overrides))
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(name, overrides=list(overrides))
