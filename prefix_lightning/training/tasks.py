"""``data=multi``: the data config of every task named in ``data.tasks``, composed as ``data=<task>`` would be."""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig, OmegaConf

from prefix_lightning.training.compose import CONF_DIR, compose_config

SINGLE = "prefix_lightning.data.datamodule.TextToTextDataModule"


class TaskConfigError(ValueError):
    """A name in data.tasks that is not a single-dataset data config."""


def data_choices() -> list[str]:
    """The single-dataset configs of the data group (``conf/data/*.yaml`` but the base and the mixture)."""
    return sorted(path.stem for path in (CONF_DIR / "data").glob("*.yaml") if path.stem not in ("default", "multi"))


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
        node = OmegaConf.to_container(compose_config("train", [f"data={task}"]).data, resolve=True)
        assert isinstance(node, dict)  # a config group's node is a mapping
        fields = {str(key): value for key, value in node.items()}
        if fields.pop("_target_", None) != SINGLE:
            raise TaskConfigError(f"data.tasks: {task} is not a single-dataset data config")
        configs[task] = fields
    return configs
