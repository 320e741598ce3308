"""Bad input gets a clear error before anything expensive happens; faults lose nothing."""

from __future__ import annotations

import json
import re
import signal
import subprocess
from pathlib import Path

import lightning as L
import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from safetensors.torch import load_file
from torch.multiprocessing import ProcessExitedException
from transformers import AutoConfig

from prefix_lightning.cli import report_errors
from prefix_lightning.evaluate import evaluate
from prefix_lightning.files.atomic import atomic_write
from prefix_lightning.training.build import (
    build_model,
    build_module,
    configured_data,
    load_configured_backbone,
    read_data_first,
)
from prefix_lightning.training.checks import ConfigError, check_config, check_validation_reached
from prefix_lightning.training.compose import check_group_choices, compose_config
from prefix_lightning.training.early_stopping import early_stopping
from prefix_lightning.training.train import train
from tests.helpers.cli import FAST, run_cli, run_failing, run_python
from tests.helpers.config import compose_train


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("prefix.length=0", "prefix.length must be a positive integer, got 0"),
        ("prefix.length=-3", "prefix.length must be a positive integer, got -3"),
        ("prefix.hidden_dim=0", "prefix.hidden_dim must be a positive integer, got 0"),
        ("prefix.reparam=lstm", "prefix.reparam must be 'mlp' or 'none'"),
        ("method.lr=-0.001", "method.lr=-0.001 is not valid: the learning rate must be > 0"),
        (
            "+optim.lr=0.001",
            "optim has no option lr: its options are weight_decay, warmup_steps (the learning rate is method.lr)",
        ),
        ("method.lr=0", "method.lr=0 is not valid: the learning rate must be > 0"),
        (
            "optim.warmup_steps=150",
            "optim.warmup_steps=150 is not valid: warm up over fewer steps than trainer.max_steps",
        ),
        ("trainer.deterministic=maybe", "trainer.deterministic='maybe' is not valid: use true, false or warn"),
        ("trainer.check_val_every_n_epoch=0", "trainer.check_val_every_n_epoch=0 is not valid: use a positive integer"),
        ("generation.num_beams=0", "generation.num_beams=0 is not valid: use 1 (greedy) or more beams"),
        ("data.train_size=0", "data.train_size=0 is not valid: use a positive integer or null"),
        ("data.max_source_tokens=abc", "data.max_source_tokens='abc' is not valid: use tokens > 0"),
        ("data.max_target_tokens=0", "data.max_target_tokens=0 is not valid: use tokens > 0"),
        ("data.num_workers=-1", "data.num_workers=-1 is not valid: use 0 (the main process) or more"),
        ("model.backbone.source=huggingface", "allowed: embedded, hub, random"),
        ("model.backbone.name=smollm3", "embedded models: smollm2-135m-instruct"),
        ("export=final", "export='final' is not valid: use best or last"),
        ("optim.weight_decay=abc", "optim.weight_decay='abc' is not valid: use a value >= 0"),
        ("optim.warmup_steps=-1", "optim.warmup_steps=-1 is not valid: use a value >= 0"),
        ("trainer.max_steps=abc", "trainer.max_steps='abc' is not valid: use a positive number of steps"),
        ("trainer.gradient_clip_val=-1", "trainer.gradient_clip_val=-1 is not valid: use a norm > 0, or 0 or null"),
        ("trainer.accumulate_grad_batches=0", "trainer.accumulate_grad_batches=0 is not valid: use 1 or more"),
        ("trainer.max_steps=-1", "trainer.max_epochs=-1 is not valid: with trainer.max_steps=-1 the run trains by"),
        ("trainer.val_check_interval=0", "trainer.val_check_interval=0 is not valid: use a number of training batches"),
        ("trainer.val_check_interval=1.5", "trainer.val_check_interval=1.5 is not valid"),
        (
            "trainer.precision=bf16-true",
            "trainer.precision='bf16-true' is not valid: use 32-true (the default), bf16-mi",
        ),
        ("trainer.precision=64", "trainer.precision='64' is not valid"),
        ("trainer.precision=16-mixed", "trainer.precision=16-mixed is for GPUs (on the CPU Lightning would run bf16-m"),
        ("+generation.num_return_sequences=3", "generation.num_return_sequences=3 is not valid: runs, generate and"),
        ("test=flase", "test='flase' is not valid: use true or false"),
        ("data.group_by_length=yes", "data.group_by_length='yes' is not valid: use true or false"),
        ("model.gradient_checkpointing=1", "model.gradient_checkpointing=1 is not valid: use true or false"),
        ("generation.do_sample=flase", "generation.do_sample='flase' is not valid: use true or false"),
        ("generation.ban_newline=no", "generation.ban_newline='no' is not valid: use true or false"),
        ("seed=abc", "seed='abc' is not valid: use an integer"),
        ("seed=null", "seed=None is not valid: use an integer"),
        ("model.target_end=null", "model.target_end=None is not valid: use the token that ends a target"),
        ("seed=-1", "seed=-1 is not valid: use an integer from 0 to 2**32 - 1"),
        ("data.subset_seed=null", "data.subset_seed=None is not valid: use an integer"),
        ("trainer.val_check_interval=0.5", "with trainer.check_val_every_n_epoch=1"),
        ("generation.length_penalty=abc", "generation.length_penalty='abc' is not valid: use a number"),
        ("generation.max_new_tokens=null", "generation.max_new_tokens=None is not valid: use a positive integer (null"),
        ("generation.no_repeat_ngram_size=-1", "generation.no_repeat_ngram_size=-1 is not valid"),
        ("generation.early_stopping=maybe", "generation.early_stopping='maybe' is not valid"),
        ("+generation.num_beam=3", "generation has no option num_beam: use transformers' GenerationConfig"),
        ("+generation.repetition_penalty=0", "generation.repetition_penalty=0 is not valid: use a number > 0"),
        ("callbacks.early_stopping.patience=0", "callbacks.early_stopping.patience=0 is not valid: use validations"),
        ("callbacks.early_stopping.patience=true", "callbacks.early_stopping.patience=True is not valid: use valid"),
        ("callbacks.last_checkpoint.every_minutes=-1", "every_minutes=-1 is not valid: use minutes >= 0, or null"),
    ],
)
def test_bad_values_are_rejected_naming_the_option(override: str, message: str, tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        check_config(compose_train(tmp_path, [override]))
    assert message in str(caught.value)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["method=lora", "method.model.dropout=maybe"], "method.model.dropout='maybe' is not valid: LoRA takes a"),
        (["method=top2", "method.model.layers=x"], "method.model.layers='x' is not valid: TopLayers takes an integer"),
    ],
)
def test_a_method_option_of_another_kind_than_its_annotation_is_named_first(
    overrides: list[str], message: str, tmp_path: Path
) -> None:
    """LoRA's dropout=maybe failed after the model load, in "'>' not supported between instances of 'str' and
    'float'"."""
    with pytest.raises(ConfigError, match=re.escape(message)):
        check_config(compose_train(tmp_path, overrides))


def test_a_method_class_that_cannot_be_imported_is_said_once(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Hydra's get_class logs the error it raises (three lines, then ours said it again)."""
    with pytest.raises(ConfigError, match=r"method.model._target_='prefix_lightning.prefix.PrefixModell' is not a"):
        check_config(compose_train(tmp_path, ["method.model._target_=prefix_lightning.prefix.PrefixModell"]))
    assert not caplog.records


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("+generation.temperature=0", "generation.temperature=0 is not valid: use a number > 0"),
        ("+generation.top_k=-1", "generation.top_k=-1 is not valid: use an integer >= 0"),
        ("+generation.top_p=1.5", "generation.top_p=1.5 is not valid: use a number from 0 to 1"),
        ("+generation.min_p=-0.1", "generation.min_p=-0.1 is not valid: use a number from 0 to 1"),
        ("+generation.typical_p=0", "generation.typical_p=0 is not valid: use a number > 0, up to 1"),
    ],
)
def test_sampling_values_transformers_refuses_at_the_first_validation_are_named_first(
    override: str, message: str, tmp_path: Path
) -> None:
    with pytest.raises(ConfigError) as caught:
        check_config(compose_train(tmp_path, ["generation.do_sample=true", override]))
    assert message in str(caught.value)
    check_config(compose_train(tmp_path, [override]))  # without sampling, generate ignores it


def test_no_max_new_tokens_is_a_budget_with_max_length(tmp_path: Path) -> None:
    """Without either, transformers would stop at its default 20 tokens, prompt included."""
    check_config(compose_train(tmp_path, ["generation.max_new_tokens=null", "+generation.max_length=150"]))


@pytest.mark.parametrize("interval", ["0.25", "1.0"])
def test_a_fraction_of_an_epoch_up_to_a_whole_one_is_a_validation_interval(interval: str, tmp_path: Path) -> None:
    overrides = [f"trainer.val_check_interval={interval}", "trainer.check_val_every_n_epoch=1"]
    check_config(compose_train(tmp_path, overrides))


@pytest.mark.parametrize(
    ("budget", "refused"),
    [
        (["trainer.val_check_interval=151"], "val_check_interval=151 is not valid: the run trains 150 batches"),
        # The interval is in batches: 4 steps of 2 batches reach a validation at batch 8, not at batch 9.
        (["trainer.max_steps=4", "trainer.accumulate_grad_batches=2", "trainer.val_check_interval=9"], "use at most 8"),
    ],
)
def test_a_step_budget_that_never_reaches_a_validation_is_refused(
    budget: list[str], refused: str, tmp_path: Path
) -> None:
    """Refused by train() before anything loads: the run would train its whole budget without a validation."""
    with pytest.raises(ConfigError, match=refused):
        train(compose_train(tmp_path, budget))
    check_validation_reached(compose_train(tmp_path, [*budget[:-1], "trainer.val_check_interval=8"]))


@pytest.mark.integration
def test_an_epoch_budget_that_never_reaches_a_validation_is_refused_before_training(tmp_path: Path) -> None:
    """2 epochs of 4 batches and a validation every 10 batches: refused once the epoch's batches are known."""
    budget = ["trainer.max_steps=-1", "trainer.max_epochs=2", "trainer.val_check_interval=10", "logger=none"]
    with pytest.raises(ConfigError, match=r"the run trains 8 batches \(2 epochs of 4, trainer.max_epochs\)"):
        train(compose_train(tmp_path, ["model=tiny_gpt2", "debug=fast", *budget]))
    assert not (tmp_path / "checkpoints").exists()


@pytest.mark.parametrize("missing", ["lr", "export_dir"])
def test_a_method_config_without_a_setting_the_run_reads_is_named(missing: str, tmp_path: Path) -> None:
    """A method config of one's own without lr failed in OmegaConf's words ("Key 'lr' is not in struct"), one
    without export_dir only once the callbacks were built, after the model load."""
    folder = tmp_path / "conf" / "method"
    folder.mkdir(parents=True)
    model = "model:\n  _target_: prefix_lightning.prefix.PrefixModel\n  config: ${prefix}\n"
    settings = {"name": "name: mine\n", "model": model, "lr": "lr: 1.0e-3\n", "export_dir": "export_dir: prefix\n"}
    (folder / "mine.yaml").write_text("".join(text for key, text in settings.items() if key != missing))
    cfg = compose_train(tmp_path, [f"hydra.searchpath=[file://{folder.parent}]", "method=mine", "model=tiny_gpt2"])
    with pytest.raises(ConfigError, match=f"method: the method's config lacks {missing}; a method config gives"):
        check_config(cfg)


@pytest.mark.parametrize("patience", [0, True])
def test_early_stopping_built_in_python_refuses_a_patience_that_is_no_count(patience: object) -> None:
    with pytest.raises(ValueError, match=f"patience={patience} is not valid: use validations > 0, or null"):
        early_stopping("val/bleu", "max", patience)  # type: ignore[arg-type]


def test_compiled_blocks_with_gradient_checkpointing_are_refused(tmp_path: Path) -> None:
    cfg = compose_train(tmp_path, ["model.compile=true", "model.gradient_checkpointing=true"])
    with pytest.raises(ConfigError, match="checkpointed blocks would run eager"):
        check_config(cfg)


@pytest.mark.skipif(torch.cuda.is_available(), reason="what a machine without a GPU says")
def test_a_gpu_trainer_without_a_gpu_is_refused_before_the_model_loads(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="trainer.accelerator=gpu .* sees no GPU on this machine"):
        check_config(compose_train(tmp_path, ["trainer=gpu"]))


@pytest.mark.skipif(torch.cuda.is_available(), reason="accelerator=auto picks the CPU only without a GPU")
def test_half_precision_on_an_automatic_accelerator_without_a_gpu_is_refused(tmp_path: Path) -> None:
    cfg = compose_train(tmp_path, ["trainer.accelerator=auto", "trainer.precision=16-mixed"])
    with pytest.raises(ConfigError, match=r"trainer.precision=16-mixed is for GPUs \(on the CPU Lightning would run"):
        check_config(cfg)


def test_a_config_entry_that_fails_to_build_is_named_by_its_key(capsys: pytest.CaptureFixture) -> None:
    cfg = OmegaConf.create({"trainer": {"_target_": "builtins.int", "_args_": ["abc"]}})
    with pytest.raises(SystemExit) as stopped:
        report_errors(lambda: instantiate(cfg.trainer))
    assert stopped.value.code == 1
    message = "error: trainer: invalid literal for int() with base 10: 'abc' (set HYDRA_FULL_ERROR=1 for the traceback)"
    assert capsys.readouterr().err == message + "\n"


def test_a_worker_killed_by_a_signal_is_an_error_not_a_stop(capsys: pytest.CaptureFixture) -> None:
    """trainer=ddp_cpu's worker killed (the OOM killer's SIGKILL): torch's error carries the worker's exit code too,
    which is no status to exit with (-9 exited 247, and in a sweep ended it instead of failing the job)."""

    def killed() -> None:
        raise ProcessExitedException(
            "process 0 terminated with signal SIGKILL", error_index=0, error_pid=1, exit_code=-9, signal_name="SIGKILL"
        )

    with pytest.raises(SystemExit) as ended:
        report_errors(killed)
    assert ended.value.code == 1
    message = "error: process 0 terminated with signal SIGKILL (set HYDRA_FULL_ERROR=1 for the traceback)"
    assert capsys.readouterr().err == message + "\n"


def test_missing_local_model_folder_is_named(tmp_path: Path) -> None:
    cfg = compose_train(tmp_path, ["model=gpt2", f"model.backbone.name={tmp_path}/no-such-model"])
    with pytest.raises(ConfigError, match="no-such-model.*no such local model folder"):
        check_config(cfg)


def test_a_random_models_tokenizer_out_of_reach_says_how_to_give_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # no network: at once, not after retries
    cfg = compose_train(tmp_path, ["model=tiny_llama", "paths.tokenizer_dir=gpt2-not-cached"])
    with pytest.raises(OSError, match="tokenizer 'gpt2-not-cached' of the random model: .*PREFIX_LIGHTNING_TOKENIZER"):
        load_configured_backbone(cfg)


@pytest.mark.parametrize(
    ("option", "folder", "message"),
    [
        ("name", "no-such-model", "no such local model folder"),
        ("name", "empty", "holds no config.json: not a transformers model folder"),
        ("tokenizer", "no-such-tokenizer", "no such local tokenizer folder"),
        ("tokenizer", "empty", "holds no tokenizer.json or .* or \\*.model: not a transformers tokenizer folder"),
        ("tokenizer", "notes", "holds no tokenizer.json or tokenizer_config.json or vocab.json or vocab.txt or"),
    ],
)
def test_model_and_tokenizer_folders_are_checked_before_loading(
    option: str, folder: str, message: str, tmp_path: Path
) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "README.md").write_text("not a tokenizer")  # transformers asked for sentencepiece
    cfg = compose_train(tmp_path, ["model=gpt2", f"++model.backbone.{option}={tmp_path}/{folder}"])
    with pytest.raises(ConfigError, match=message):
        check_config(cfg)


@pytest.mark.parametrize("hub_id", ["gpt2", "HuggingFaceTB/SmolLM2-1.7B", "Qwen/Qwen2.5-0.5B"])
def test_hub_ids_with_dots_are_not_taken_for_missing_folders(hub_id: str, tmp_path: Path) -> None:
    check_config(compose_train(tmp_path, ["model=gpt2", f"model.backbone.name={hub_id}"]))


@pytest.mark.integration
def test_cli_error_is_one_line_before_any_model_loads(tmp_path: Path) -> None:
    result = run_failing(tmp_path, "prefix.length=0")
    assert result.returncode == 1
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines == [
        "error: prefix.length must be a positive integer, got 0 (set HYDRA_FULL_ERROR=1 for the traceback)"
    ]
    assert "Traceback" not in result.stdout + result.stderr
    assert "Loading embedded backbone" not in result.stdout + result.stderr
    assert "ConfigError: prefix.length must be a positive integer" in (tmp_path / "run.log").read_text()


@pytest.mark.integration
def test_a_sweep_without_multirun_is_refused_before_any_model_loads(tmp_path: Path) -> None:
    """Without -m, +sweep=length would train one job of the defaults (the 12-minute main job)."""
    result = run_failing(tmp_path, "+sweep=length")
    assert "+sweep=length is a multirun's settings: run it with -m" in result.stderr
    assert "Loading embedded backbone" not in result.stdout + result.stderr


def test_null_for_a_config_group_is_named_and_leaving_out_offered_where_a_run_does_without_the_group() -> None:
    with pytest.raises(ValueError, match=r"^trainer=NULL: the config group trainer takes one of cpu, .*, slurm$"):
        check_group_choices(["trainer=NULL"])
    with pytest.raises(ValueError, match=r"^debug= null: the config group debug takes one of fast; ~debug leaves it"):
        check_group_choices(["debug= null"])
    check_group_choices(["seed=null", "model.backbone.name=null", "+generation.max_length=null"])  # settings


@pytest.mark.integration
def test_a_config_group_set_to_null_names_its_options(tmp_path: Path) -> None:
    """Hydra stops on ``logger=null`` with a traceback from its defaults list ("Config group override must be a
    string or a list"); run.py and evaluate name the group's options instead."""
    result = run_failing(tmp_path, "logger=null")
    assert "error: logger=null: the config group logger takes one of csv, none, tensorboard, wandb; ~logger" in (
        result.stderr
    )
    assert "Traceback" not in result.stderr
    evaluation = run_python("-m", "prefix_lightning.evaluate", "experiment=null")
    assert evaluation.returncode == 1
    assert "error: experiment=null: the config group experiment takes one of paper_dart," in evaluation.stderr


@pytest.mark.integration
def test_a_misspelled_setting_added_with_plus_is_refused(tmp_path: Path) -> None:
    """Hydra refuses exprot=last and suggests +exprot=last, which then trained with export=best without a word. A
    setting that a config reads through an interpolation may be added."""
    result = run_failing(tmp_path / "typo", "+exprot=last")
    assert "error: +exprot: the run has no setting exprot and no config reads it; did you mean export=...?" in (
        result.stderr
    )
    assert "Loading embedded backbone" not in result.stdout + result.stderr
    for added, meant in (("+lr=0.1", "method.lr"), ("+model.sepparator=x", "model.separator")):
        result = run_failing(tmp_path / "typo", added)
        assert f"error: {added.split('=')[0]}: the run has no setting" in result.stderr
        assert f"did you mean {meant}=...?" in result.stderr
    read = run_failing(tmp_path / "read", "+lr_value=-1", "method.lr=${lr_value}")
    assert "method.lr=-1 is not valid: the learning rate must be > 0" in read.stderr  # past the check, read


@pytest.mark.integration
def test_cli_shows_the_traceback_with_the_debug_switch(tmp_path: Path) -> None:
    result = run_failing(tmp_path, "prefix.length=0", env={"HYDRA_FULL_ERROR": "1"})
    assert "Traceback" in result.stderr and "ConfigError" in result.stderr


@pytest.mark.integration
@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["model=gpt3"], "Could not find 'model/gpt3'"),
        (["data=e2e_typo"], "Could not find 'data/e2e_typo'"),
    ],
)
def test_unknown_config_choices_list_the_options(overrides: list[str], message: str, tmp_path: Path) -> None:
    result = run_failing(tmp_path, *overrides)
    assert message in result.stderr and "Available options" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.integration
def test_train_size_larger_than_the_data_says_how_many_there_are(tmp_path: Path) -> None:
    result = run_failing(tmp_path, *FAST, "data.train_size=100000")
    assert "train_size=100000, but devset.csv has" in result.stderr
    assert "training pairs available" in result.stderr


@pytest.mark.integration
def test_missing_data_says_where_it_looked(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    result = run_failing(tmp_path / "run", *FAST, f"paths.data_dir={empty}", "data.download=false")
    assert str(empty / "e2e") in result.stderr and "error:" in result.stderr


@pytest.mark.integration
def test_unsupported_architecture_names_the_supported_ones(tmp_path: Path) -> None:
    mamba = {"model_type": "mamba", "hidden_size": 16, "num_hidden_layers": 1, "state_size": 4}
    overrides = [f"++model.backbone.random_config.{key}={value}" for key, value in mamba.items()]
    result = run_failing(tmp_path, *FAST, *overrides)
    assert "MambaForCausalLM has no attention layers that a prefix can reach" in result.stderr
    assert "Supported: decoder-only LMs (GPT-2, the Llama family" in result.stderr


def test_the_seed_sets_the_prefixs_initialization(tmp_path: Path) -> None:
    """build_model seeds before building: the same seed starts the same prefix, another seed another one."""

    def initial_prefix(seed: int) -> list[torch.Tensor]:
        model, _ = build_model(compose_train(tmp_path, ["model=tiny_llama", f"seed={seed}"]))
        return [parameter.detach().clone() for parameter in model.trainable_parameters()]

    first, again, other = initial_prefix(1), initial_prefix(1), initial_prefix(2)
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(first, other, strict=True))


def test_a_checkpoint_of_a_run_on_another_kind_of_base_model_is_refused(tmp_path: Path) -> None:
    """Prefixes of the same shapes on another model type (tiny BART's and tiny T5's, say) would load silently."""
    cfg = compose_train(tmp_path, ["model=tiny_llama"])
    model, tokenizer = build_model(cfg)
    module = build_module(cfg, model, tokenizer)
    checkpoint = {"state_dict": module.state_dict()}
    module.on_save_checkpoint(checkpoint)
    assert checkpoint["base_model"]["model_type"] == "llama"
    module.on_load_checkpoint(checkpoint)  # its own run's
    checkpoint["base_model"]["model_type"] = "t5"
    with pytest.raises(ValueError, match="written by a run on a t5 model, but this run's base model is a llama"):
        module.on_load_checkpoint(checkpoint)


def test_a_checkpoint_of_another_method_is_refused_naming_both(tmp_path: Path) -> None:
    """A top2 checkpoint given to a prefix run was said not to fit "another prefix length, reparametrization or base
    model"."""
    checkpoints = {}
    for method in ("top2", "prefix"):
        cfg = compose_train(tmp_path, ["model=tiny_llama", f"method={method}"])
        model, tokenizer = build_model(cfg)
        module = build_module(cfg, model, tokenizer)
        checkpoints[method] = {"state_dict": module.state_dict()}
        module.on_save_checkpoint(checkpoints[method])
    with pytest.raises(ValueError, match="written by a run of the method TopLayers, but this run's method is Prefix"):
        module.on_load_checkpoint(checkpoints["top2"])
    module.on_load_checkpoint(checkpoints["prefix"])


def test_a_checkpoint_missing_a_prefix_tensor_is_refused_naming_it(tmp_path: Path) -> None:
    """Non-strict loading would leave a tensor the file lacks at its initial value (a multi-task run resumed with a
    task more, say): the hook names it, as it names tensors of another shape."""
    cfg = compose_train(tmp_path, ["model=tiny_llama"])
    model, tokenizer = build_model(cfg)
    module = build_module(cfg, model, tokenizer)
    checkpoint = {"state_dict": module.state_dict()}
    module.on_save_checkpoint(checkpoint)
    dropped = sorted(checkpoint["state_dict"])[-1]
    del checkpoint["state_dict"][dropped]
    with pytest.raises(ValueError, match=f"does not fit the configured prefix: {re.escape(dropped)}: checkpoint None"):
        module.on_load_checkpoint(checkpoint)


@pytest.mark.integration
def test_checkpoint_of_another_prefix_is_refused_and_nothing_is_overwritten(tmp_path: Path) -> None:
    first = tmp_path / "first"
    run_cli(first, *FAST)
    checkpoint = first / "checkpoints" / "last.ckpt"
    before = checkpoint.read_bytes()
    second = tmp_path / "second"
    result = run_failing(second, *FAST, "prefix.length=3", f"ckpt_path={checkpoint}")
    assert "this checkpoint does not fit the configured prefix" in result.stderr
    assert checkpoint.read_bytes() == before
    assert not (second / "prefix").exists()


def test_atomic_write_keeps_the_old_file_when_writing_fails(tmp_path: Path) -> None:
    target = tmp_path / "file.bin"
    target.write_bytes(b"old")

    def crash(temporary: Path) -> None:
        temporary.write_bytes(b"half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(target, crash)
    assert target.read_bytes() == b"old"
    assert list(tmp_path.iterdir()) == [target]


class FailsToSerialize:
    """Part of a checkpoint whose serialization fails, as a full disk fails a write part-way."""

    def __reduce__(self) -> tuple:
        raise OSError("disk full")


def test_a_checkpoint_write_that_fails_leaves_the_previous_checkpoint_whole(tmp_path: Path) -> None:
    """With the configured trainer's checkpoint writer: a write straight into last.ckpt would have truncated the
    checkpoint a run resumes from before failing."""
    writer = instantiate(compose_train(tmp_path).trainer).strategy.checkpoint_io
    last = tmp_path / "last.ckpt"
    writer.save_checkpoint({"global_step": 3, "state_dict": {"prefix": torch.ones(4)}}, last)
    failing = {"global_step": 4, "state_dict": {"prefix": torch.zeros(4)}, "callbacks": FailsToSerialize()}
    with pytest.raises(OSError, match="disk full"):
        writer.save_checkpoint(failing, last)
    kept = torch.load(last, weights_only=True)
    assert kept["global_step"] == 3 and torch.equal(kept["state_dict"]["prefix"], torch.ones(4))
    assert list(tmp_path.iterdir()) == [last]


KILL_OVERRIDES = [
    *FAST[:-2],
    "trainer.val_check_interval=2",
    "+callbacks.fault._target_=tests.helpers.faults.SignalAt",
]


@pytest.mark.integration
def test_sigkill_mid_epoch_then_resume_ends_with_the_uninterrupted_prefix(tmp_path: Path) -> None:
    """Killed at step 7 (checkpoint at step 6, mid-epoch), resumed with one command, bit-identical at the end."""
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    run_cli(straight, *FAST[:-2], "trainer.val_check_interval=2")
    result = run_failing(killed, *KILL_OVERRIDES, "+callbacks.fault.step=7", "+callbacks.fault.name=SIGKILL")
    assert result.returncode == -9
    checkpoint = killed / "checkpoints" / "last.ckpt"
    assert torch.load(checkpoint, weights_only=True)["global_step"] == 6  # 6 = 4 + 2: in the second epoch
    assert not list((killed / "checkpoints").glob(".*tmp*"))
    log = run_cli(killed, *FAST[:-2], "trainer.val_check_interval=2", f"ckpt_path={checkpoint}")
    # From step 6, not trained again from step 0 (which would end with the same prefix as well).
    assert f"Restored all states from the checkpoint at {checkpoint}" in log.stdout + log.stderr
    resumed = load_file(killed / "prefix" / "prefix.safetensors")
    expected = load_file(straight / "prefix" / "prefix.safetensors")
    for group in expected:
        torch.testing.assert_close(resumed[group], expected[group], atol=1e-6, rtol=0)


@pytest.mark.integration
def test_ctrl_c_saves_a_checkpoint_to_resume_from(tmp_path: Path) -> None:
    result = run_failing(tmp_path, *KILL_OVERRIDES, "+callbacks.fault.step=3", "+callbacks.fault.name=SIGINT")
    assert result.returncode == 128 + signal.SIGINT.value
    assert torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 3
    output = result.stdout + result.stderr
    assert "stopped by SIGINT at step 3" in output and f"to go on, run: python run.py resume={tmp_path}" in output


def _diverging_at(run_dir: Path, step: int) -> subprocess.CompletedProcess:
    """A run whose loss turns non-finite at ``step``."""
    faults = ["+callbacks.fault._target_=tests.helpers.faults.DivergeAt", f"+callbacks.fault.step={step}"]
    return run_failing(run_dir, *KILL_OVERRIDES[:-1], *faults)


@pytest.mark.integration
def test_infinite_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path: Path) -> None:
    result = _diverging_at(tmp_path, 5)
    assert (
        "the training loss is nan at step 5" in result.stderr or "the training loss is inf at step 5" in result.stderr
    )
    good = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert good["global_step"] == 4
    assert all(torch.isfinite(tensor).all() for tensor in good["state_dict"].values())
    assert not (tmp_path / "prefix").exists()
    assert f"the last good checkpoint is kept in {tmp_path / 'checkpoints'}" in result.stderr


@pytest.mark.integration
def test_infinite_loss_before_any_checkpoint_says_there_is_none(tmp_path: Path) -> None:
    """Diverged at step 1, before the first validation: the message named a checkpoint folder that did not exist."""
    result = _diverging_at(tmp_path, 1)
    assert "at step 1: stopped before it could spoil the prefix; no checkpoint had been written yet" in result.stderr
    assert not list(tmp_path.glob("checkpoints/*.ckpt"))


def test_sources_longer_than_the_context_are_cut_with_a_warning(tmp_path: Path, caplog) -> None:
    from prefix_lightning.training.build import build_model, fitted_source_budget, source_budget

    cfg = compose_train(tmp_path, ["model=tiny_gpt2", "data.max_source_tokens=1000", "data.max_target_tokens=100"])
    model, _ = build_model(cfg)
    with caplog.at_level("WARNING"):
        budget = source_budget(cfg, model)
    assert budget == 256 - cfg.prefix.length - 100  # tiny_gpt2 has 256 positions
    assert "data.max_source_tokens=1000 does not fit the model's 256 positions" in caplog.text
    cfg.generation.max_new_tokens = 120  # decoding goes further than training: room for the longer
    assert source_budget(cfg, model) == 256 - cfg.prefix.length - 120
    cfg.data.max_target_tokens = 250
    with pytest.raises(ConfigError, match="a target of 250 tokens .* leave no room for the source"):
        source_budget(cfg, model)
    cfg.data.max_source_tokens, cfg.data.max_target_tokens = 20, 100
    assert source_budget(cfg, model) == 20  # within the positions: as asked
    # An encoder's positions hold the source alone: the target goes to the decoder.
    bart = AutoConfig.for_model("bart", max_position_embeddings=64)
    assert fitted_source_budget(bart, 4, wanted=1000, target=50) == 60


def test_the_generations_text_file_has_one_line_per_input(tmp_path: Path) -> None:
    """Line-based scorers pair its lines with the inputs: a generation's own line breaks must not add lines."""
    from prefix_lightning import PrefixModel
    from prefix_lightning.training.module import MethodModule
    from tests.helpers.tiny import tiny_lm

    module = MethodModule(PrefixModel(tiny_lm("gpt2"), length=2), tokenizer=None, output_dir=str(tmp_path))
    outputs = [{"generation": "first\n\nparagraph\u2028end", "group_id": 0}, {"generation": "second", "group_id": 1}]
    module._write("test", outputs, {"BLEU": 1.0})
    assert (tmp_path / "test_generations.txt").read_text() == "first  paragraph end\nsecond\n"
    assert [json.loads(line)["generation"] for line in (tmp_path / "test_generations.jsonl").open()] == [
        "first\n\nparagraph\u2028end",
        "second",
    ]


def _unloadable_model(tmp_path: Path) -> list[str]:
    """Overrides for a model folder that passes the config checks and fails as it loads (its config.json is no
    JSON): a run that reaches the model stops with that model's error, not the data's."""
    folder = tmp_path / "unloadable-model"
    folder.mkdir()
    (folder / "config.json").write_text("not JSON")
    return ["model=gpt2", f"model.backbone.name={folder}"]


def _custom_files(folder: Path, files: dict[str, str]) -> list[str]:
    """Overrides for data=custom on ``files`` (name -> text) written into ``folder``."""
    folder.mkdir()
    for name, text in files.items():
        (folder / name).write_text(text)
    return ["data=custom", f"paths.data_dir={folder}", "data.train_file=train.csv", "data.val_file=val.csv"]


GOOD_CSV = "source,target\na,b\nc,d\n"


@pytest.mark.parametrize(
    ("files", "message"),
    [
        (None, "E2E file devset.csv not found: looked for"),
        ({"val.csv": GOOD_CSV, "test.csv": GOOD_CSV}, "data file not found: looked for .*train.csv"),
        ({"train.csv": "source,target\n", "val.csv": GOOD_CSV, "test.csv": GOOD_CSV}, "train.csv holds no examples"),
        (
            {"train.csv": "src,tgt\na,b\n", "val.csv": GOOD_CSV, "test.csv": GOOD_CSV},
            r"train.csv, line 1: missing column\(s\) \['source', 'target'\]",
        ),
        ({"train.csv": GOOD_CSV, "val.csv": GOOD_CSV}, "data file not found: looked for .*test.csv"),
    ],
    ids=["e2e-missing", "own-file-missing", "empty-file", "csv-header", "test-file-missing"],
)
def test_a_data_problem_is_said_before_the_model_loads(
    files: dict[str, str] | None, message: str, tmp_path: Path
) -> None:
    """The datamodule read its files only after the model had loaded (half a minute for SmolLM2, minutes for a
    large model) to find them missing or malformed."""
    if files is None:  # the E2E default, nothing in the data dir and no download
        data = [f"paths.data_dir={tmp_path / 'empty'}", "data.download=false"]
    else:
        data = _custom_files(tmp_path / "data", files)
        data.append("data.test_file=test.csv")
    cfg = compose_train(tmp_path / "run", [*_unloadable_model(tmp_path), *data, "logger=none"])
    with pytest.raises((FileNotFoundError, ValueError), match=message):
        train(cfg)


def test_the_unloadable_model_of_these_tests_fails_as_it_loads(data_dir: Path, tmp_path: Path) -> None:
    """With good data the run reaches the model, and stops there (what makes the test above prove the order)."""
    cfg = compose_train(tmp_path / "run", [*_unloadable_model(tmp_path), f"paths.data_dir={data_dir}", "logger=none"])
    with pytest.raises(Exception, match="unloadable-model") as stopped:
        train(cfg)
    assert not isinstance(stopped.value, FileNotFoundError)


def test_evaluate_says_a_data_problem_before_the_model_loads(tmp_path: Path) -> None:
    overrides = [*_unloadable_model(tmp_path), f"paths.data_dir={tmp_path / 'empty'}", "data.download=false"]
    cfg = compose_config("evaluate", [f"paths.output_dir={tmp_path / 'out'}", *overrides])
    with pytest.raises(FileNotFoundError, match="E2E file testset_w_refs.csv not found: looked for"):
        evaluate(cfg)


def test_only_the_process_that_prepares_data_reads_it_before_the_model_loads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The other processes of a multi-process run may start alongside the one that downloads: they must neither
    download again nor find the files missing while it writes them (they read in setup, after Lightning's wait)."""
    cfg = compose_train(tmp_path / "run", [f"paths.data_dir={tmp_path / 'empty'}", "data.download=false"])
    monkeypatch.setenv("LOCAL_RANK", "1")
    second = L.Trainer(accelerator="cpu", devices=2, strategy="ddp", logger=False)
    assert second.local_rank == 1
    read_data_first(configured_data(cfg), second, "fit")  # nothing read: no error
    monkeypatch.delenv("LOCAL_RANK")
    first = L.Trainer(accelerator="cpu", devices=2, strategy="ddp", logger=False)
    with pytest.raises(FileNotFoundError, match="E2E file devset.csv not found"):
        read_data_first(configured_data(cfg), first, "fit")
