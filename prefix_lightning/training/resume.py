"""Going on with a run: ``run.py resume=<run dir>`` (that run's own config, in its folder), the checkpoint a run
resumes from, and re-running a sweep (a run folder with a complete record is skipped, one with a last checkpoint
resumes from it; sweep job folders are named by their overrides, not by time, so the same command finds them).
Every attempt that goes on from an earlier one is checked against the config the run started with.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hydra._internal.utils import get_args_parser
from hydra.errors import HydraException
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from prefix_lightning.files.atomic import atomic_write
from prefix_lightning.files.checkpoints import check_checkpoint
from prefix_lightning.prefix.multitask import task_folders
from prefix_lightning.training.checks import ConfigError
from prefix_lightning.training.compose import compose_config, config_leaves, quoted, searchpath_override
from prefix_lightning.training.last_checkpoint import LAST
from prefix_lightning.training.record import RECORD_FILE, read_record

log = logging.getLogger(__name__)

RUN_CONFIG = Path(".hydra", "config.yaml")
RUN_OVERRIDES = Path(".hydra", "overrides.yaml")
HYDRA_CONFIG = Path(".hydra", "hydra.yaml")
# The config a run started with. Hydra rewrites .hydra/config.yaml whenever the same folder is run again (a sweep's
# job, a fixed hydra.run.dir), before any of our code runs; this copy is written only by an attempt that starts the
# run from nothing, so later attempts are compared with what the run's results were computed by.
STARTED_CONFIG = Path(".hydra", "started_config.yaml")
STARTED_OVERRIDES = Path(".hydra", "started_overrides.yaml")
# Where Hydra writes a resumed attempt's config, so that the run's own .hydra/config.yaml stays what it ran with.
RESUMED_PLACEMENT = "hydra.output_subdir=.hydra/resumed"
# Settings that do not change what a run computes, so a resumed run may change them: where files are, the device
# kind and the strategy that shards the same batches, logging and progress display, whether it tests at the end.
# Not the number of devices or nodes: data.batch_size is per device, so they set the global batch.
NOT_COMPUTED = (
    "resume",
    "ckpt_path",
    "test",
    "paths",
    "logger",
    "trainer.accelerator",
    "trainer.strategy",
    "trainer.enable_progress_bar",
    "trainer.log_every_n_steps",
    "data.num_workers",
    "callbacks.last_checkpoint",
    "callbacks.progress_bar",
    "callbacks.lr_monitor",
    "callbacks.generation_samples",
    "sweep",  # the sweep config's choice: the values it sets are compared as themselves
)


def run_overrides(run_dir: str | Path) -> list[str]:
    """The command-line overrides that composed the run in ``run_dir`` (as it started: Hydra rewrites
    ``.hydra/overrides.yaml`` at every attempt, one a changed setting refuses too), and the config folders of the
    user's that it read (``hydra.searchpath``, which Hydra keeps in ``.hydra/hydra.yaml``)."""
    path = _started(Path(run_dir), STARTED_OVERRIDES, RUN_OVERRIDES)
    overrides = [
        str(override) for override in OmegaConf.load(path) if not str(override).startswith(("resume=", "ckpt_path="))
    ]
    searchpath = _hydra_setting(Path(run_dir), "hydra.searchpath")
    if not searchpath:
        return overrides
    started_in = _hydra_setting(Path(run_dir), "hydra.runtime.cwd")
    return [*overrides, searchpath_override([_found_from(started_in, str(entry)) for entry in searchpath])]


def _found_from(started_in: str | None, entry: str) -> str:
    """A config folder of a run's ``hydra.searchpath`` as the run found it: a relative ``file://`` folder (the
    README's ``file://my_conf``) from the folder the run started in, so that it resumes from any other."""
    folder = entry.removeprefix("file://")
    if not entry.startswith("file://") or started_in is None or Path(folder).is_absolute():
        return entry
    return f"file://{Path(started_in) / folder}"


def run_model_overrides(run_dir: str | Path) -> list[str]:
    """The overrides that gave the run in ``run_dir`` its model: its model config, the ``model.*`` settings given and
    the config folders of the user's that it read (a model config of one's own); none where Hydra's record of its
    choices is missing."""
    choice = _choices(Path(run_dir)).get("model")
    if choice is None:
        return []
    given = [item for item in run_overrides(run_dir) if override_key(item).startswith(("model.", "hydra.searchpath"))]
    return [f"model={choice}", *given]


def run_config(run_dir: str | Path) -> DictConfig:
    """The composed config of the run in ``run_dir``, as it started (Hydra rewrites ``.hydra/config.yaml`` at every
    attempt, one a changed setting refuses too)."""
    path = _started(Path(run_dir), STARTED_CONFIG, RUN_CONFIG)
    config = OmegaConf.load(path)
    if not isinstance(config, DictConfig):
        raise ValueError(f"{path} is not a run config (a YAML mapping)")
    return config


def run_export(path: str | Path) -> Path:
    """The export that ``path`` stands for: a run's folder stands for the export it holds (``<run>/prefix`` for a
    prefix run, ``<run>/adapter`` for LoRA, ...); any other folder for itself."""
    path = Path(path)
    return path / run_config(path).method.export_dir if (path / RUN_CONFIG).is_file() else path


def exporting_run(export: str | Path) -> tuple[Path, str | None] | None:
    """The run folder an export lies in (``<run>/prefix``, or another export of its checkpoints into its folder), and
    the task, for one task's prefix of a multi-task run (``<run>/prefix/<task>``); None for an export moved out of
    its run."""
    export = Path(export).resolve()
    if (export.parent / RUN_CONFIG).is_file():
        return export.parent, None
    if task_folders(export.parent) and (export.parent.parent / RUN_CONFIG).is_file():
        return export.parent.parent, export.name
    return None


def _started(run_dir: Path, started: Path, hydras: Path) -> Path:
    """The file the run's first attempt kept, else Hydra's (runs from before started files were kept)."""
    if (run_dir / started).is_file():
        return run_dir / started
    if not (run_dir / hydras).is_file():
        raise FileNotFoundError(f"{run_dir} is not a run folder: {hydras} is missing")
    return run_dir / hydras


def resume_arguments(argv: Sequence[str]) -> list[str]:
    """The command line of ``run.py resume=<run dir> [overrides]``: that run's own overrides, then the given ones, in
    its folder. Hydra writes this attempt's config to ``.hydra/resumed/``; ``train`` compares it with the run's."""
    given = [argument for argument in argv[1:] if argument.startswith("resume=")]
    if not given or RESUMED_PLACEMENT in argv:
        # No resume, or one expanded already: DDP and FSDP start the other ranks with the first one's command line.
        return list(argv)
    run_dir = Path(unquoted(given[-1].partition("=")[2]))
    if not (run_dir / RUN_CONFIG).is_file():
        outputs = (run_dir / "checkpoints").is_dir()  # a run's outputs, given paths.output_dir: its config is elsewhere
        where = (
            f": {run_dir} holds a run's outputs (paths.output_dir); resume the folder its config went to, "
            "hydra.run.dir, which its stop message and its run.log name"
            if outputs
            else ""
        )
        raise FileNotFoundError(f"resume={run_dir}: not a run folder ({RUN_CONFIG} is missing){where}")
    rest, flags = split_hydra_flags([argument for argument in argv[1:] if not argument.startswith("resume=")])
    placement = [
        override("hydra.run.dir", run_dir),
        RESUMED_PLACEMENT,
        override("resume", run_dir),
    ]
    kept = composing_with_new_choices(run_dir, run_overrides(run_dir), rest, "train")
    return [argv[0], *kept, *rest, *placement, *flags]


def split_hydra_flags(arguments: Sequence[str]) -> tuple[list[str], list[str]]:
    """The overrides, and Hydra's flags with their values (``--cfg job``): Hydra's parser takes the overrides in one
    run, so the rebuilt command line puts the flags last (one in the middle left the overrides after it unread)."""
    options = {option: action for action in get_args_parser()._actions for option in action.option_strings}
    overrides: list[str] = []
    flags: list[str] = []
    tokens = list(arguments)
    while tokens:
        token = tokens.pop(0)
        if not token.startswith("-"):
            overrides.append(token)
            continue
        flags.append(token)
        action = options.get(token)
        if action is None or not tokens:
            continue
        if action.nargs is None or (action.nargs == "?" and tokens[0] in (action.choices or ())):  # --info config
            flags.append(tokens.pop(0))
    return overrides, flags


def _choices(run_dir: Path) -> dict[str, str]:
    """The config group choices the run composed with (``data: multi``), as Hydra keeps them."""
    choices = _hydra_setting(run_dir, "hydra.runtime.choices")
    return {str(key): str(value) for key, value in (choices or {}).items()}


def _hydra_setting(run_dir: Path, key: str) -> Any:
    """A setting of Hydra's own record of the run (``.hydra/hydra.yaml``); None where the run has none."""
    hydra_file = run_dir / HYDRA_CONFIG
    return OmegaConf.select(OmegaConf.load(hydra_file), key) if hydra_file.is_file() else None


def composing_with_new_choices(run_dir: Path, run: Sequence[str], given: Sequence[str], config: str) -> list[str]:
    """The overrides ``run`` of the run in ``run_dir``, less those of a config group ``given`` another choice
    (``trainer=ddp_cpu``) that do not compose with it in the command's ``config`` (train, evaluate). The others are
    the run's settings (its budget, ``trainer.max_steps=40``) and stay, as the attempt's check expects; one the new
    choice lacks (``data.tasks=[...]`` of a ``data=multi`` run resumed with ``data=e2e``) would stop Hydra, so it is
    left out, said on the console, and the check lists what the new choice changes. Settings a resumed run may
    change (``trainer.strategy``: ``NOT_COMPUTED``) are the new choice's."""
    choices = _choices(run_dir)
    rechosen = {}
    for item in given:
        group, _, choice = item.partition("=")
        group = override_key(group)
        if "." not in group and group in choices and choices[group] != choice:
            rechosen[group] = choice
    outside, inside = [], []
    for item in run:
        key = override_key(item)
        if key.partition(".")[0] not in rechosen:
            outside.append(item)
        elif key not in rechosen and not not_computed(key):  # not the choice itself, which the given one replaces
            inside.append(item)
    settings = [item for item in given if "=" in item]
    if not inside or not _composes(config, [*outside, *settings]):
        return outside  # Hydra stops at what is given and says why (or it reads configs by flag: --config-dir)
    kept: list[str] = []
    for item in inside:
        if _composes(config, [*outside, *kept, item, *settings]):
            kept.append(item)
    dropped = [item for item in inside if item not in kept]
    if dropped:
        log.warning(
            "left out the run's %s, which Hydra does not compose with %s",
            " ".join(dropped),
            " ".join(f"{group}={choice}" for group, choice in rechosen.items()),
        )
    return [item for item in run if item in outside or item in kept]


def _composes(config: str, overrides: Sequence[str]) -> bool:
    """Whether Hydra composes the ``config`` (train, evaluate) with ``overrides``."""
    try:
        compose_config(config, overrides)
    except HydraException:
        return False
    return True


def override(key: str, value: str | Path) -> str:
    """``key=value`` for Hydra's command line, the value quoted: sweep job folders are named like
    ``data.train_size=50,prefix.length=5``, whose ``=`` and ``,`` Hydra would otherwise parse."""
    return f"{key}={quoted(value)}"


def override_key(argument: str) -> str:
    """The key a command-line override sets (``prefix.length`` for ``+prefix.length=5``)."""
    return argument.partition("=")[0].lstrip("+~")


def unquoted(value: str) -> str:
    """A command-line value as the user meant it: without the quotes Hydra's grammar may have needed."""
    return value[1:-1] if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"" else value


def check_earlier_attempt(cfg: DictConfig) -> None:
    """Refuse settings that differ from the config the run started with and change what it computes, listing them,
    when this attempt goes on from an earlier one: ``resume=``, or a folder that holds a result record (to be
    skipped) or a checkpoint (to resume from), as a re-run sweep's jobs do (not with ``ckpt_path=``, which starts
    from a checkpoint of the user's choice with the settings given). An attempt that starts the run from nothing
    writes its config as the run's started config."""
    run_dir = Path(cfg.paths.output_dir)
    earlier = read_record(run_dir) is not None or bool(_folder_checkpoints(cfg))
    if cfg.get("resume"):
        saved = _started(Path(cfg.resume), STARTED_CONFIG, RUN_CONFIG)
        _refuse_changes(
            cfg,
            saved,
            f"resume={cfg.resume}: these settings differ from the run's own ({saved.relative_to(cfg.resume)})",
            "Resume without them, or start a new run",
        )
    elif earlier and not cfg.get("ckpt_path") and (run_dir / STARTED_CONFIG).is_file():
        _refuse_changes(
            cfg,
            run_dir / STARTED_CONFIG,
            f"{run_dir} holds an earlier attempt of this run (its {RECORD_FILE} or checkpoint), whose settings "
            f"({STARTED_CONFIG}) differ from these",
            "Run again without them, delete the folder to start it anew, or give the run (the sweep) another "
            "folder: hydra.run.dir=... (hydra.sweep.dir=...)",
        )
    rank_zero = getattr(rank_zero_only, "rank", 0) == 0  # the other ranks of a multi-process run share its config
    if not earlier and rank_zero:
        atomic_write(run_dir / STARTED_CONFIG, lambda path: OmegaConf.save(cfg, path))
        if (run_dir / RUN_OVERRIDES).is_file():
            overrides = (run_dir / RUN_OVERRIDES).read_bytes()
            atomic_write(run_dir / STARTED_OVERRIDES, lambda path: path.write_bytes(overrides))


def _refuse_changes(cfg: DictConfig, saved_file: Path, refused: str, remedy: str) -> None:
    saved = config_leaves(OmegaConf.load(saved_file))
    before = {
        key: MOVED_TARGETS.get(value, value) if key.endswith("._target_") else value for key, value in saved.items()
    }
    now = config_leaves(cfg)
    changed = sorted(
        key
        for key in before.keys() | now.keys()
        if before.get(key, ABSENT) != now.get(key, ABSENT) and not not_computed(key)
    )
    if changed:
        listed = "; ".join(f"{key}: {before.get(key, ABSENT)!r} -> {now.get(key, ABSENT)!r}" for key in changed)
        # Not always given by hand: a new group choice (trainer=ddp_cpu) brings its own trainer.devices.
        own = [
            f"{key}={_override_value(before[key])}"
            for key in changed
            if key in before and key in now and not isinstance(before[key], (dict, list))
        ]
        restore = f" (the run's own: {' '.join(own)})" if own else ""
        raise ConfigError(f"{refused} and change what it computes: {listed}. {remedy}{restore}")


def _override_value(value: Any) -> str:
    """A setting's value as Hydra's command line takes it back."""
    if value is None or isinstance(value, bool):
        return {None: "null", True: "true", False: "false"}[value]
    if isinstance(value, (int, float)):
        return str(value)
    word = re.fullmatch(r"[A-Za-z_][\w./:-]*", value) and value.lower() not in ("true", "false", "null")
    return value if word else quoted(value)


ABSENT = "<absent>"
# Classes a run's config names that have since moved module, by their new place: a run started before the move
# resumes with the same callbacks (generation samples are not compared: NOT_COMPUTED).
MOVED_TARGETS = {
    f"prefix_lightning.training.callbacks.{name}": f"prefix_lightning.training.{module}.{name}"
    for module, name in (
        ("method_export", "MethodExport"),
        ("early_stopping", "early_stopping"),
        ("result_record", "ResultRecord"),
    )
}


def not_computed(key: str) -> bool:
    """Whether a setting leaves what a run computes as it is (``NOT_COMPUTED``)."""
    return any(key == name or key.startswith(name + ".") for name in NOT_COMPUTED)


def finished_record(run_dir: str | Path) -> dict[str, Any] | None:
    """The complete record of a run that already finished in ``run_dir`` (then skip it), else None."""
    record = read_record(run_dir)
    if record is not None:
        log.info("skipped: %s already holds a complete %s (delete it to run again)", run_dir, RECORD_FILE)
    return record


def resume_checkpoint(cfg: DictConfig) -> str | None:
    """``cfg.ckpt_path`` when given, else the newest checkpoint an earlier attempt of this run left in its folder
    (``checkpoints/last.ckpt``, or on SLURM Lightning's ``hpc_ckpt_<n>.ckpt`` from a requeue). A damaged or
    missing file is refused, naming the newest intact checkpoint beside it."""
    if cfg.get("ckpt_path"):
        given = Path(cfg.ckpt_path)
        deepspeed = "deepspeed" in str(OmegaConf.select(cfg, "trainer.strategy")).lower()
        if given.is_dir() and not deepspeed:  # only DeepSpeed's checkpoints are folders; others failed once loaded
            raise ConfigError(
                f"ckpt_path={given} is a folder, not a checkpoint file: give one of its .ckpt files (a run keeps "
                "them in <run>/checkpoints/), or go on with an interrupted run: resume=<run dir>"
            )
        return str(check_checkpoint(given))
    found = _folder_checkpoints(cfg)
    if not found:
        if cfg.get("resume"):
            log.warning("resume=%s: the run left no checkpoint yet, so it starts over in its folder", cfg.resume)
        return None
    newest = max(found, key=lambda path: path.stat().st_mtime)
    log.info("resuming from %s, left by an earlier attempt of this run", newest)
    return str(check_checkpoint(newest))


def _folder_checkpoints(cfg: DictConfig) -> list[Path]:
    """The checkpoints earlier attempts of this run left in its folder to resume from."""
    dirpath = OmegaConf.select(cfg, "callbacks.last_checkpoint.dirpath")
    candidates = [Path(dirpath, LAST)] if dirpath else []
    candidates += Path(cfg.paths.output_dir).glob("hpc_ckpt_*.ckpt")
    return [path for path in candidates if path.is_file()]
