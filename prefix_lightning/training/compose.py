"""Composing the shipped Hydra configs from Python, inside a running Hydra app (whose config search path it
uses) or on its own (the repository's ``conf/``)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig, ListConfig, OmegaConf

from prefix_lightning.prefix import read_prefix

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"
# The groups a run does without when left out with ~group (the others are the run itself).
OPTIONAL_GROUPS = ("logger", "callbacks", "experiment", "debug")


def compose_config(name: str, overrides: Sequence[str] = ()) -> DictConfig:
    """The config ``name`` (e.g. "train") with ``overrides``, as a command line would compose it."""
    check_group_choices(overrides)
    if GlobalHydra.instance().is_initialized():
        return compose(name, overrides=list(overrides))
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(name, overrides=list(overrides))


def check_group_choices(overrides: Sequence[str]) -> None:
    """Refuse ``group=null`` for a config group of ``conf/``, naming its options: Hydra stops on it with a traceback
    from its defaults list."""
    for argument in overrides:
        key, _, value = argument.partition("=")
        group = key.lstrip("+")
        if value.strip().lower() == "null" and (CONF_DIR / group).is_dir():
            options = ", ".join(sorted(path.stem for path in (CONF_DIR / group).glob("*.yaml")))
            leave_out = f"; ~{group} leaves it out" if group in OPTIONAL_GROUPS else ""
            raise ValueError(f"{argument}: the config group {group} takes one of {options}{leave_out}")


def config_leaves(config: DictConfig | ListConfig) -> dict[str, Any]:
    """``{"a.b": value}`` for every setting of ``config``, interpolations unresolved (lists are values)."""
    return _leaves(OmegaConf.to_container(config))


def _leaves(tree: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(tree, dict) or not tree:
        return {prefix: tree}
    leaves: dict[str, Any] = {}
    for key, value in tree.items():
        leaves |= _leaves(value, f"{prefix}{key}" if not prefix else f"{prefix}.{key}")
    return leaves


def quoted(value: str | Path) -> str:
    """A value quoted for Hydra's override grammar, whatever characters it holds."""
    escaped = str(value).replace("\\", "\\\\").replace("'", "\\'")
    return f"'{escaped}'"


def searchpath_override(entries: Sequence[str]) -> str:
    """``hydra.searchpath=[...]``: config folders of the user's, beside the shipped ones (each entry quoted)."""
    return f"hydra.searchpath=[{','.join(map(quoted, entries))}]"


def model_config_for(prefixes: Iterable[str | Path]) -> str:
    """The model config (``conf/model/<name>.yaml``) whose backbone the exported prefixes record as their base
    model (``backbone_identity``); different records, or none or several configs matching, are refused, asking
    for ``model=``."""
    recorded = {read_prefix(folder).base_model.get("name_or_path") for folder in prefixes}
    named = sorted(str(name) for name in recorded if name)
    if len(named) > 1:
        raise ValueError(
            f"the prefixes were trained on different base models ({', '.join(named)}): a batch decodes on one LM, so "
            "decode each model's prefixes in a call of their own (or give model=<name> where they name one LM twice)"
        )
    if len(recorded) != 1 or None in recorded or "" in recorded:
        raise ValueError(
            f"the prefixes record different or unknown base models ({sorted(map(str, recorded))}): give model=<name>"
        )
    (identity,) = recorded
    names = sorted(path.stem for path in (CONF_DIR / "model").glob("*.yaml"))
    matches = [name for name in names if _backbone_of(name) == identity]
    if len(matches) != 1:
        found = f"configs {', '.join(matches)} match it" if matches else "no config under conf/model/ matches it"
        raise ValueError(
            f"the export was trained on {identity}, and {found}: give the model config, model=<name> "
            "(with model.backbone.name=... for another Hub model)"
        )
    return matches[0]


def _backbone_of(name: str) -> str | None:
    """The identity the backbone of model config ``name`` records (``backbone_identity``): embedded:<name>,
    random:<model_type>, or the Hub id / folder; None for a random model shaped like another one (``like``), whose
    type only its config on the Hub says."""
    backbone = compose_config("train", [f"model={name}"]).model.backbone
    if backbone.source == "embedded":
        return f"embedded:{backbone.name}"
    if backbone.source == "random":
        model_type = OmegaConf.select(backbone, "random_config.model_type")
        return f"random:{model_type}" if model_type is not None else None
    return str(backbone.name)
