"""``data=multi``: the data config of every task named in ``data.tasks``, composed as ``data=<task>`` would be: the
shipped ones, and a user's own on the run's ``hydra.searchpath``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from prefix_lightning.training.compose import CONF_DIR, compose_config, searchpath_override

SINGLE = "prefix_lightning.data.datamodule.TextToTextDataModule"


class TaskConfigError(ValueError):
    """A name in data.tasks that is not a single-dataset data config."""


def data_choices() -> list[str]:
    """The single-dataset configs of the data group (``conf/data/*.yaml`` but the base and the mixture, and the
    ``data/*.yaml`` of the run's own config folders)."""
    own = [Path(entry.removeprefix("file://")) for entry in _searchpath() if entry.startswith("file://")]
    folders = [CONF_DIR, *own]
    names = {path.stem for folder in folders for path in (folder / "data").glob("*.yaml")}
    return sorted(names - {"default", "multi"})


def _searchpath() -> list[str]:
    """The run's ``hydra.searchpath``: config folders of the user's, beside the shipped ones."""
    return list(HydraConfig.get().searchpath) if HydraConfig.initialized() else []


def check_tasks(tasks: Any) -> list[str]:
    """``data.tasks`` as a list of distinct data config names, or a one-line error naming what is wrong."""
    if isinstance(tasks, str) or not OmegaConf.is_list(tasks) and not isinstance(tasks, (list, tuple)):
        raise TaskConfigError(f"data.tasks={tasks!r} is not valid: give a list, e.g. data.tasks=[e2e_devsplit,webnlg]")
    names = [str(task) for task in tasks]
    choices = data_choices()
    unknown = [name for name in names if name not in choices]
    if not names or unknown or len(set(names)) != len(names):
        problem = f"unknown {', '.join(unknown)}" if unknown else "empty or repeated names"
        raise TaskConfigError(
            f"data.tasks={names} is not valid ({problem}): give distinct data configs, from {', '.join(choices)}"
        )
    return names


def task_data_configs(cfg: DictConfig) -> dict[str, dict[str, Any]]:
    """Task name -> the resolved arguments of its ``TextToTextDataModule`` (its data config without ``_target_``)."""
    configs = {}
    for task in check_tasks(cfg.data.tasks):
        searchpath = [searchpath_override(_searchpath())] if _searchpath() else []
        node = OmegaConf.to_container(compose_config("train", [f"data={task}", *searchpath]).data, resolve=True)
        assert isinstance(node, dict)  # a config group's node is a mapping
        fields = {str(key): value for key, value in node.items()}
        if fields.pop("_target_", None) != SINGLE:
            raise TaskConfigError(f"data.tasks: {task} is not a single-dataset data config")
        configs[task] = fields
    return configs
