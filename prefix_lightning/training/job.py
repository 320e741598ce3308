"""What Hydra knows about the running job: its name, its sweep and its overrides, read once in the main process.

Spawned processes (DDP ``ddp_spawn`` workers) and configs composed in tests have no Hydra runtime: ``current_job``
then returns None and callers fall back to plain values.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.types import RunMode


@dataclass(frozen=True)
class HydraJob:
    name: str  # the job folder's name inside a sweep: its sorted overrides (Hydra's override dirname)
    sweep: str | None  # the sweep folder's name in a multirun, else None
    overrides: dict[str, Any] = field(default_factory=dict)  # {key: typed value}, e.g. {"prefix.length": 5}
    choices: dict[str, str | None] = field(default_factory=dict)  # config group choices, e.g. {"model": "gpt2"}
    added: tuple[str, ...] = ()  # the keys the command line adds (+key=value, ++key=value)


def current_job() -> HydraJob | None:
    if not HydraConfig.initialized():
        return None
    hydra = HydraConfig.get()
    parsed = OverridesParser.create().parse_overrides(list(hydra.overrides.task))
    return HydraJob(
        name=hydra.job.override_dirname,
        sweep=Path(hydra.sweep.dir).name if hydra.mode == RunMode.MULTIRUN else None,
        overrides={override.key_or_group: override.value() for override in parsed},
        choices={group: choice for group, choice in hydra.runtime.choices.items() if group.split("/")[0] != "hydra"},
        added=tuple(override.key_or_group for override in parsed if override.is_add() or override.is_force_add()),
    )


def resumable_folder(outputs: str) -> str:
    """The folder ``resume=`` goes on from: the one Hydra wrote the run's config into, which is not the run's
    ``outputs`` where ``paths.output_dir`` was given (Hydra's runtime unknown: ``outputs``)."""
    return HydraConfig.get().runtime.output_dir if HydraConfig.initialized() else outputs
