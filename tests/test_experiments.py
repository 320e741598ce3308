"""The paper's settings (conf/experiment/): every experiment composes and instantiates, its values reach the code
that reads them, and its sweep is the paper's grid."""

from __future__ import annotations

import inspect
import itertools
from pathlib import Path
from typing import Any

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.utils import instantiate
from omegaconf import OmegaConf
from omegaconf.errors import InterpolationKeyError

from prefix_lightning.backbones import load_backbone
from prefix_lightning.training.build import build_model, build_module
from prefix_lightning.training.checks import check_config
from prefix_lightning.training.optimized import settle_optimized_metric
from prefix_lightning.training.train import instantiate_all
from tests.helpers.cli import run_python
from tests.helpers.config import CONF, build_datamodule, compose_train, options
from tests.helpers.data import offline_datamodule

EXPERIMENTS = options("experiment")

# What each experiment must set, per the paper (ACL 2021 version: Table 6, footnote 4, section 5.3, A.1, A.2).
TABLE_TO_TEXT = {"model": "gpt2_medium", "prefix.hidden_dim": 512, "generation.num_beams": 5}
E2E = {**TABLE_TO_TEXT, "data.dataset": "e2e", "method.lr": 8e-5, "trainer.max_epochs": 5, "data.batch_size": 10}
DART = {**TABLE_TO_TEXT, "data.dataset": "dart", "method.lr": 5e-5, "trainer.max_epochs": 10, "data.batch_size": 5}
XSUM = {
    "model": "bart_large",
    "data.dataset": "xsum",
    "method.lr": 5e-5,
    "trainer.max_epochs": 30,
    "data.batch_size": 14,
    "prefix.hidden_dim": 800,
    "data.max_source_tokens": 512,
    "generation.num_beams": 6,
    "generation.length_penalty": 0.8,
    "prefix.shift_positions": False,  # the paper's BART code: positions not moved by the prefix
}
PAPER: dict[str, dict[str, Any]] = {
    "paper_e2e": {**E2E, "prefix.length": 5, "method.name": "prefix"},
    "paper_webnlg": {
        **E2E,
        "data.dataset": "webnlg",
        "method.lr": 5e-5,
        "data.batch_size": 5,
        "prefix.length": 5,
        "method.name": "prefix",
    },
    "paper_dart": {**DART, "prefix.length": 10, "method.name": "prefix"},
    "paper_xsum": {**XSUM, "prefix.length": 100, "method.name": "prefix"},
    "paper_lowdata": {
        **TABLE_TO_TEXT,
        "data.dataset": "e2e",
        "method.lr": 5e-5,
        "data.batch_size": 10,
        "data.val_fraction": 0.3,
        "prefix.length": 6,
        "prefix.init_text": "table-to-text:",
        "method.name": "prefix",
    },
    "paper_length_dart": DART,
    "paper_length_xsum": XSUM,
    "paper_embedding": {**E2E, "method.name": "embedding"},
    "paper_infix": {**E2E, "method.name": "infix"},
}

# The sweeps (hydra.sweeper.params) the paper's figures and tables ran.
SWEEPS: dict[str, dict[str, list[str]]] = {
    # Section 6.3 / Table 8: sizes {50, 100, 200, 500}, 5 subsets x 2 seeds, prefix-tuning vs fine-tuning.
    "paper_lowdata": {
        "method": ["prefix", "full"],
        "data.train_size": ["50", "100", "200", "500"],
        "data.subset_seed": ["1", "2", "3", "4", "5"],
        "seed": ["1", "2"],
    },
    # Figure 4 over A.2's length ranges.
    "paper_length_dart": {"prefix.length": ["1", "5", "10", "20", "40"]},
    "paper_length_xsum": {"prefix.length": ["1", "10", "20", "50", "80", "100", "200", "300"]},
    # Table 5: EMB-1/10/20 and INFIX-1/10/20.
    "paper_embedding": {"prefix.length": ["1", "10", "20"]},
    "paper_infix": {"prefix.length": ["1", "10", "20"]},
}

# Table 8: max update steps per training size.
LOWDATA_STEPS = {"prefix": {50: 200, 100: 200, 200: 200, 500: 400}, "full": {50: 100, 100: 100, 200: 200, 500: 400}}

TINY = {"gpt2_medium": "tiny_gpt2", "bart_large": "tiny_bart"}


def compose_with_hydra(overrides: list[str]) -> Any:
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("train", overrides=overrides, return_hydra_config=True)


def expected_settings(name: str) -> dict[str, Any]:
    return {key: value for key, value in PAPER[name].items() if key != "model"}


def test_every_experiment_states_its_paper_settings() -> None:
    assert set(EXPERIMENTS) == set(PAPER)
    assert set(SWEEPS) <= set(EXPERIMENTS)
    for path in (CONF / "experiment").glob("*.yaml"):
        assert path.read_text().startswith("# @package _global_\n"), path.name


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiment_composes_and_instantiates(name: str, tmp_path: Path, gpt2_tokenizer) -> None:
    """As run: hub backbones stay as named (the loader accepts their settings; nothing is downloaded)."""
    cfg = compose_train(tmp_path, [f"experiment={name}"])
    OmegaConf.to_container(cfg, resolve=True)
    check_config(cfg)
    assert OmegaConf.select(cfg, "model.backbone.source") == "hub"
    assert cfg.model.backbone.name in ("openai-community/gpt2-medium", "facebook/bart-large")
    inspect.signature(load_backbone).bind(**OmegaConf.to_container(cfg.model.backbone, resolve=True))
    for key, value in expected_settings(name).items():
        assert OmegaConf.select(cfg, key) == value, key

    datamodule = instantiate(
        cfg.data, tokenizer=gpt2_tokenizer, separator=cfg.model.separator, target_end=cfg.model.target_end
    )
    assert (datamodule.hparams.dataset, datamodule.hparams.batch_size) == (cfg.data.dataset, cfg.data.batch_size)
    settle_optimized_metric(cfg)  # as train() does: the checkpoint callback monitors it
    callbacks, loggers = instantiate_all(cfg.callbacks), instantiate_all(cfg.logger)
    trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)
    assert (trainer.max_epochs, trainer.max_steps) == (cfg.trainer.max_epochs, cfg.trainer.max_steps)


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_paper_settings_reach_the_code(name: str, tmp_path: Path) -> None:
    """The run's own builders, on the tiny random twin of the paper's backbone (same layout, no download)."""
    cfg = compose_train(tmp_path, [f"experiment={name}", f"model={TINY[PAPER[name]['model']]}"])
    settings = expected_settings(name)
    model, tokenizer = build_model(cfg)
    datamodule = build_datamodule(cfg, tokenizer, model)
    module = build_module(cfg, model, tokenizer)
    trainer = instantiate(cfg.trainer)

    assert model.config.length == settings.get("prefix.length", cfg.prefix.length)
    assert model.config.hidden_dim == settings["prefix.hidden_dim"]
    assert module.hparams.lr == settings["method.lr"]
    assert datamodule.hparams.batch_size == settings["data.batch_size"]
    assert datamodule.hparams.dataset == settings["data.dataset"]
    assert module.generation["num_beams"] == settings["generation.num_beams"]
    assert module.generation.get("length_penalty", 1.0) == settings.get("generation.length_penalty", 1.0)
    if "trainer.max_epochs" in settings:
        assert (trainer.max_epochs, trainer.max_steps) == (settings["trainer.max_epochs"], -1)
    if "data.max_source_tokens" in settings:
        assert datamodule.collator.max_source_tokens == settings["data.max_source_tokens"]


@pytest.mark.parametrize(
    ("method", "size", "steps"),
    [(method, size, steps) for method, budget in LOWDATA_STEPS.items() for size, steps in budget.items()],
)
def test_lowdata_step_budget_follows_table_8(method: str, size: int, steps: int, tmp_path: Path) -> None:
    cfg = compose_train(tmp_path, ["experiment=paper_lowdata", f"method={method}", f"data.train_size={size}"])
    check_config(cfg)
    trainer = instantiate(cfg.trainer)
    assert trainer.max_steps == steps
    assert cfg.method.lr == 5e-5
    # Only prefix-tuning starts from the words; fine-tuning has no prefix.
    assert cfg.prefix.init_text == ("table-to-text:" if method == "prefix" else None)


def test_lowdata_step_budget_names_what_is_missing(tmp_path: Path) -> None:
    cfg = compose_train(tmp_path, ["experiment=paper_lowdata", "data.train_size=1000"])
    with pytest.raises(InterpolationKeyError, match=r"lowdata\.max_steps\.prefix\.size_1000"):
        OmegaConf.to_container(cfg.trainer, resolve=True)


def test_lowdata_debug_run_overrides_the_budget(tmp_path: Path) -> None:
    cfg = compose_train(tmp_path, ["experiment=paper_lowdata", "debug=fast"])
    assert (cfg.trainer.max_steps, cfg.data.train_size, cfg.data.val_size) == (4, 16, 4)


def test_lowdata_prefix_length_is_the_init_words(tmp_path: Path, gpt2_tokenizer) -> None:
    """A.2: length 6 because "table-to-text:" is 6 GPT-2 tokens (GPT-2 medium shares GPT-2's tokenizer)."""
    cfg = compose_train(tmp_path, ["experiment=paper_lowdata"])
    ids = gpt2_tokenizer(cfg.prefix.init_text, add_special_tokens=False).input_ids
    assert len(ids) == cfg.prefix.length == 6


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_sweeps_are_the_papers_grids(name: str, tmp_path: Path) -> None:
    cfg = compose_with_hydra([f"experiment={name}", f"paths.output_dir={tmp_path}"])
    params = cfg.hydra.sweeper.get("params") or {}
    overrides = OverridesParser.create().parse_overrides([f"{key}={value}" for key, value in params.items()])
    grid = {override.key_or_group: list(override.sweep_string_iterator()) for override in overrides}
    assert grid == SWEEPS.get(name, {})
    if not grid:
        return
    assert cfg.hydra.sweep.dir == f"multirun/{name}"
    # Every job composes and resolves (seeds aside: they change no key that others read).
    varying = {key: values for key, values in grid.items() if key not in ("seed", "data.subset_seed")}
    for values in itertools.product(*varying.values()):
        job = [f"{key}={value}" for key, value in zip(varying, values, strict=True)]
        job_cfg = compose_train(tmp_path, [f"experiment={name}", *job])
        OmegaConf.to_container(job_cfg, resolve=True)
        check_config(job_cfg)


@pytest.mark.integration
@pytest.mark.parametrize("name", EXPERIMENTS)
def test_command_line_prints_the_experiment(name: str) -> None:
    printed = run_python("run.py", f"experiment={name}", "--cfg", "job", "--resolve", timeout=120)
    assert printed.returncode == 0, printed.stderr
    job = OmegaConf.create(printed.stdout)
    for key, value in expected_settings(name).items():
        assert OmegaConf.select(job, key) == value, key


# --- data.val_fraction (the paper's low-data dev split: 30% of the training size) -----------------------------


@pytest.mark.parametrize(("train_size", "groups"), [(1, 1), (5, 2), (50, 15), (100, 30), (200, 60), (500, 150)])
def test_val_fraction_sizes_held_out_validation(train_size: int, groups: int, gpt2_tokenizer, data_dir) -> None:
    module = offline_datamodule(gpt2_tokenizer, data_dir, train_size=train_size, val_size=None, val_fraction=0.3)
    module.setup("fit")
    assert module.val_size == groups and len(module.val_groups) == groups
    assert len(module.train_examples) == train_size
    held_out = {group.source for group in module.val_groups}
    assert not held_out & {example.source for example in module.train_examples}


def test_val_fraction_takes_the_first_groups_of_a_separate_file(gpt2_tokenizer, data_dir) -> None:
    module = offline_datamodule(
        gpt2_tokenizer, data_dir, val_file="testset_w_refs.csv", train_size=100, val_size=None, val_fraction=0.3
    )
    module.setup("fit")
    full = offline_datamodule(gpt2_tokenizer, data_dir, val_file="testset_w_refs.csv", val_size=30)
    full.setup("fit")
    assert [group.source for group in module.val_groups] == [group.source for group in full.val_groups]


def test_val_size_wins_over_val_fraction(gpt2_tokenizer, data_dir) -> None:
    module = offline_datamodule(gpt2_tokenizer, data_dir, train_size=100, val_size=7, val_fraction=0.3)
    assert module.val_size == 7


@pytest.mark.parametrize(
    "settings", [{"train_size": None, "val_size": None, "val_fraction": 0.3}, {"val_fraction": 0.0}]
)
def test_val_fraction_needs_a_positive_fraction_and_a_training_size(
    settings: dict[str, Any], gpt2_tokenizer, data_dir
) -> None:
    with pytest.raises(ValueError, match="val_fraction"):
        offline_datamodule(gpt2_tokenizer, data_dir, **settings)


# --- the offline low-data sweep (conf/sweep/smollm2_lowdata.yaml): paper_lowdata's rules on SmolLM2 -------------


@pytest.mark.parametrize(
    ("method", "size", "steps"),
    [(method, size, steps) for method, budget in LOWDATA_STEPS.items() for size, steps in budget.items()],
)
def test_offline_lowdata_sweep_keeps_the_papers_rules(method: str, size: int, steps: int, tmp_path: Path) -> None:
    cfg = compose_train(tmp_path, ["+sweep=smollm2_lowdata", f"method={method}", f"data.train_size={size}"])
    check_config(cfg)
    assert instantiate(cfg.trainer).max_steps == steps
    assert (cfg.model.backbone.source, cfg.model.backbone.name) == ("embedded", "smollm2-135m-instruct")
    assert (cfg.method.lr, cfg.data.batch_size, cfg.generation.num_beams) == (5e-5, 10, 5)
    assert cfg.prefix.init_text == ("table-to-text:" if method == "prefix" else None)
    assert (cfg.data.train_file, cfg.data.val_file, cfg.data.val_size, cfg.data.val_fraction) == (
        "devset.csv",
        "devset.csv",
        None,
        0.3,
    )
    assert cfg.data.test_size == 200


def test_offline_lowdata_sweep_grid() -> None:
    cfg = compose_with_hydra(["+sweep=smollm2_lowdata"])
    assert cfg.hydra.sweep.dir == "multirun/smollm2_lowdata"
    assert {key: str(value) for key, value in cfg.hydra.sweeper.params.items()} == {
        "method": "prefix,full",
        "data.train_size": "50,100,200",
        "data.subset_seed": "1,2,3",
        "seed": "1",
    }


@pytest.mark.parametrize(("size", "held_out"), [(50, 15), (200, 60), (500, 150)])
def test_offline_lowdata_sweep_validates_on_held_out_devset_mrs(
    size: int, held_out: int, tmp_path: Path, gpt2_tokenizer
) -> None:
    """The data config as the sweep composes it: 30% of the size held out from devset.csv, 200 test MRs."""
    cfg = compose_train(tmp_path, ["+sweep=smollm2_lowdata", f"data.train_size={size}", "data.subset_seed=2"])
    datamodule = instantiate(
        cfg.data, tokenizer=gpt2_tokenizer, separator=cfg.model.separator, target_end=cfg.model.target_end
    )
    datamodule.setup()
    assert (len(datamodule.train_examples), len(datamodule.val_groups), len(datamodule.test_groups)) == (
        size,
        held_out,
        200,
    )
    assert not {group.source for group in datamodule.val_groups} & {ex.source for ex in datamodule.train_examples}
    assert datamodule.metric_suite == "e2e"


@pytest.mark.slow
def test_offline_lowdata_prefix_length_is_the_init_words_in_smollm2_tokens(tmp_path: Path) -> None:
    """A.2's rule (length = the tokens of "table-to-text:") holds for SmolLM2's tokenizer too: 6 tokens."""
    cfg = compose_train(tmp_path, ["+sweep=smollm2_lowdata"])
    _, tokenizer = load_backbone(**OmegaConf.to_container(cfg.model.backbone, resolve=True))
    assert len(tokenizer(cfg.prefix.init_text, add_special_tokens=False).input_ids) == cfg.prefix.length == 6
