"""Multi-task training: one prefix per task on one frozen LM, batches mixing tasks, each row's gradient reaching
only its task's prefix; the data mixture (data=multi), per-task export and per-task scoring."""

from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
import yaml
from hydra import compose, initialize_config_dir
from lightning.pytorch.trainer.states import TrainerFn

from prefix_lightning import PrefixConfig, PrefixModel
from prefix_lightning.data.datamodule import TextToTextDataModule
from prefix_lightning.evaluate import evaluate, with_run_settings
from prefix_lightning.evaluation import task_metrics
from prefix_lightning.prefix.attention import record_attention_calls
from prefix_lightning.prefix.export import CONFIG_NAME
from prefix_lightning.prefix.multitask import MultiTaskPrefix
from prefix_lightning.training.build import build_model, build_module, configured_data
from prefix_lightning.training.checks import ConfigError, check_config
from prefix_lightning.training.compose import CONF_DIR
from prefix_lightning.training.optimized import settle_optimized_metric
from prefix_lightning.training.resume import RUN_CONFIG, RUN_OVERRIDES
from tests.helpers.cli import run_cli
from tests.helpers.config import build_datamodule, compose_train
from tests.helpers.data import GPT2_LAYOUT, rows_and_padded_tokens
from tests.helpers.families import DECODERS
from tests.helpers.tiny import PAD, pad_batch, tiny_lm

TASKS = ["e2e", "webnlg", "dart"]
ROWS = [torch.tensor([10, 11, 12, 13, 14]), torch.tensor([20, 21, 22]), torch.tensor([30, 31, 32, 33])]


def multitask(family: str = "llama_gqa") -> MultiTaskPrefix:
    model_type, fields = DECODERS[family]
    torch.manual_seed(0)
    return MultiTaskPrefix(tiny_lm(model_type, **fields), TASKS, PrefixConfig(length=3, hidden_dim=16))


def batch(rows: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    ids, mask = pad_batch(rows, left=False)
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :2] = -100  # the first tokens stand for the source
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


@pytest.mark.parametrize("family", ["gpt2", "llama_gqa"])
def test_a_step_changes_only_the_prefixes_of_the_tasks_in_the_batch(family: str) -> None:
    model = multitask(family).train()
    before = {task: {k: v.clone() for k, v in model.task_parameters(task).items()} for task in TASKS}
    lm_before = copy.deepcopy(model.lm.state_dict())
    optimizer = torch.optim.AdamW(model.trainable_parameters(), lr=1e-2)
    loss = model.loss(prefixes=["e2e", "dart", "e2e"], **batch(ROWS))
    loss.backward()
    assert all(parameter.grad is None for parameter in model.lm.parameters())
    optimizer.step()
    for task in ("e2e", "dart"):
        for name, tensor in model.task_parameters(task).items():
            assert not torch.equal(tensor, before[task][name]), f"{task}: {name} did not move"
    for name, tensor in model.task_parameters("webnlg").items():
        assert torch.equal(tensor, before["webnlg"][name]), f"webnlg (not in the batch): {name} moved"
    assert all(torch.equal(lm_before[key], value) for key, value in model.lm.state_dict().items())


def test_each_rows_gradient_reaches_only_its_tasks_prefix() -> None:
    model = multitask().train()
    inputs = batch(ROWS)
    logits = model(prefixes=["e2e", "webnlg", "dart"], input_ids=inputs["input_ids"]).logits
    parameters = model.trainable_parameters()
    for row, task in enumerate(["e2e", "webnlg", "dart"]):
        grads = torch.autograd.grad(logits[row].sum(), parameters, retain_graph=True, allow_unused=True)
        reached = {id(p) for p, g in zip(parameters, grads, strict=True) if g is not None and g.any()}
        for other in TASKS:
            own = {id(p) for p in model.task_parameters(other).values()}
            assert (own <= reached) if other == task else not (own & reached), (row, other)


def test_gradient_checkpointing_recomputes_each_row_with_its_own_prefix() -> None:
    """Recomputed layers read the prefixes of the whole batch (length groups would leave the last group's)."""
    model = multitask().train()
    parameters, inputs = model.trainable_parameters(), batch(ROWS)
    prefixes = ["e2e", "dart", "webnlg"]
    expected = torch.autograd.grad(model.loss(prefixes=prefixes, length_groups=2, **inputs), parameters)
    model.enable_gradient_checkpointing()
    loss = model.loss(prefixes=prefixes, length_groups=2, **inputs)
    with record_attention_calls() as recomputed:
        got = torch.autograd.grad(loss, parameters)
    assert len(recomputed) == len(model.bank.sites)  # the layers did run again in backward, the batch as one group
    for want, have in zip(expected, got, strict=True):
        torch.testing.assert_close(have, want, atol=1e-6, rtol=1e-4)


def test_prefix_dropout_applies_in_training_only() -> None:
    """prefix.dropout drops entries of each task's prefix in training only: evaluation and decoding read the prefix
    without dropout, as PrefixModel does."""
    model_type, fields = DECODERS["llama_gqa"]
    torch.manual_seed(0)
    model = MultiTaskPrefix(tiny_lm(model_type, **fields), TASKS, PrefixConfig(length=3, hidden_dim=16, dropout=0.5))
    torch.manual_seed(0)
    undropped = MultiTaskPrefix(tiny_lm(model_type, **fields), TASKS, PrefixConfig(length=3, hidden_dim=16)).eval()
    ids = batch(ROWS)["input_ids"]
    with torch.no_grad():
        expected = undropped(prefixes=TASKS, input_ids=ids).logits
        torch.testing.assert_close(model.eval()(prefixes=TASKS, input_ids=ids).logits, expected)
        model.train()
        torch.manual_seed(1)
        first, second = (model(prefixes=TASKS, input_ids=ids).logits for _ in range(2))
    assert not torch.allclose(first, expected, atol=1e-4) and not torch.allclose(first, second, atol=1e-4)


def test_each_task_exports_an_ordinary_prefix(tmp_path: Path) -> None:
    """prefix/<task>/ loads as a PrefixModel and gives the row's logits of the multi-task model."""
    model = multitask().eval()
    model.save(tmp_path / "prefix")
    assert sorted(path.name for path in (tmp_path / "prefix").iterdir()) == sorted(TASKS)
    ids, mask = pad_batch(ROWS, left=True)
    with torch.no_grad():
        mixed = model(prefixes=TASKS, input_ids=ids, attention_mask=mask).logits
        for i, task in enumerate(TASKS):
            model_type, fields = DECODERS["llama_gqa"]
            single = PrefixModel.from_prefix(tiny_lm(model_type, **fields), tmp_path / "prefix" / task).eval()
            expected = single(input_ids=ROWS[i][None]).logits[0]
            torch.testing.assert_close(mixed[i][mask[i].bool()], expected, atol=1e-5, rtol=0)
            # and PEFT's files, as every prefix export where PEFT can hold the prefix
            peft = PrefixModel.from_peft(tiny_lm(model_type, **fields), tmp_path / "prefix" / task).eval()
            torch.testing.assert_close(peft(input_ids=ROWS[i][None]).logits[0], expected, atol=1e-5, rtol=0)
        greedy = dict(max_new_tokens=4, pad_token_id=PAD, eos_token_id=None)
        assert model.generate(prefixes=TASKS, input_ids=ids, attention_mask=mask, **greedy).shape == (3, 9)


def test_a_multitask_export_loads_back_each_tasks_prefix(tmp_path: Path) -> None:
    """from_export gives every task the prefix saved under its name (the logits of the saved model, row by row), and
    refuses task prefixes of different settings, which one MultiTaskPrefix cannot hold."""
    model = multitask().eval()
    model.save(tmp_path / "prefix")
    model_type, fields = DECODERS["llama_gqa"]
    loaded = MultiTaskPrefix.from_export(tiny_lm(model_type, **fields), tmp_path / "prefix").eval()
    assert loaded.tasks == sorted(TASKS)
    names = ["webnlg", "dart", "e2e"]
    ids, mask = pad_batch(ROWS, left=True)
    with torch.no_grad():
        expected = model(prefixes=names, input_ids=ids, attention_mask=mask).logits
        torch.testing.assert_close(loaded(prefixes=names, input_ids=ids, attention_mask=mask).logits, expected)
    PrefixModel(tiny_lm(model_type, **fields), length=2, hidden_dim=8).save(tmp_path / "prefix" / "dart")
    with pytest.raises(ValueError, match="differ in their settings"):
        MultiTaskPrefix.from_export(tiny_lm(model_type, **fields), tmp_path / "prefix")


def test_the_mixture_tags_every_row_with_its_task(tmp_path: Path, data_dir: Path) -> None:
    cfg = compose_train(
        tmp_path, ["model=tiny_llama", "debug=fast", "data=multi", "data.tasks=[e2e_devsplit,webnlg,dart_devsplit]"]
    )
    assert cfg.method.name == "multitask_prefix"  # data=multi picks the multi-task method
    model, tokenizer = build_model(cfg)
    assert model.tasks == ["e2e_devsplit", "webnlg", "dart_devsplit"]
    datamodule = build_datamodule(cfg, tokenizer, model)
    datamodule.setup("fit")
    datamodule.setup("test")
    assert {task: data.metric_suite for task, data in datamodule.tasks.items()} == dict.fromkeys(model.tasks, "bleu")
    batches = list(datamodule.train_dataloader())
    assert sum(len(b["prefixes"]) for b in batches) == 3 * 16
    assert any(len(set(b["prefixes"])) > 1 for b in batches), "training batches mix tasks"
    for b in batches:  # E2E sources are "attribute : value | ...", WebNLG's and DART's "subject : relation : object"
        texts = tokenizer.batch_decode(b["input_ids"], skip_special_tokens=True)
        for task, text in zip(b["prefixes"], texts, strict=True):
            assert (text.split(" | ")[0].count(" : ") == 1) == (task == "e2e_devsplit"), (task, text)
    prompts = [p for b in datamodule.test_dataloader() for p in zip(b["prefixes"], b["group_ids"], strict=True)]
    assert [task for task, _ in prompts] == [task for task in model.tasks for _ in range(4)]
    assert [group for _, group in prompts] == list(range(12))


# A task of its own: 20 training pairs drawn with seed 3.
TASK_SETTINGS = {**GPT2_LAYOUT, "train_file": "devset.csv", "val_size": 5, "train_size": 20, "subset_seed": 3}


class _BuildsATask(L.LightningDataModule):
    """A data module whose __init__ builds a task with the settings above while its own arguments of the same names
    are None, as MultiTaskDataModule builds its tasks (in a comprehension, which Python >= 3.12 runs in the
    __init__'s frame)."""

    def __init__(self, tokenizer: Any, data_dir: Path, train_size: int | None = None, subset_seed: int | None = None):
        super().__init__()
        self.task = TextToTextDataModule(tokenizer, data_dir, "e2e", **TASK_SETTINGS)


def test_a_task_built_inside_another_data_module_keeps_its_own_settings(gpt2_tokenizer: Any, data_dir: Path) -> None:
    """Lightning's save_hyperparameters also collects the arguments of an enclosing data module's __init__, whose
    values won: every task of a mixture took its None sizes and seed (on Python >= 3.12 the mixture failed in
    manual_seed(None), or trained on all pairs where a seed was given)."""
    task = _BuildsATask(gpt2_tokenizer, data_dir).task
    assert (task.hparams.train_size, task.hparams.subset_seed) == (20, 3)
    task.setup("fit")
    alone = TextToTextDataModule(gpt2_tokenizer, data_dir, "e2e", **TASK_SETTINGS)
    alone.setup("fit")
    assert len(task.train_examples) == 20
    assert task.train_examples == alone.train_examples


@pytest.mark.parametrize("tested", [True, False])
def test_a_mixture_reads_its_tasks_test_files_only_where_the_run_tests(
    tested: bool, tmp_path: Path, data_dir: Path
) -> None:
    """test=false reaches every task of the mixture: a run that does not test needs no test file."""
    (tmp_path / "data" / "e2e").mkdir(parents=True)
    # No testset_w_refs.csv; the link's target resolved, as the data dir may be given relative to the repository.
    (tmp_path / "data" / "e2e" / "devset.csv").symlink_to((data_dir / "e2e" / "devset.csv").resolve())
    overrides = ["model=tiny_llama", "debug=fast", "data=multi", "data.tasks=[e2e_devsplit]"]
    overrides += [f"data.data_dir={tmp_path / 'data'}", f"test={str(tested).lower()}"]
    cfg = compose_train(tmp_path, overrides)
    model, tokenizer = build_model(cfg)
    datamodule = build_datamodule(cfg, tokenizer, model)
    if tested:
        with pytest.raises(FileNotFoundError, match="testset_w_refs.csv"):
            datamodule.setup("fit")
        return
    datamodule.setup("fit")
    assert len(datamodule.tasks["e2e_devsplit"].train_examples) == 16


def test_a_mixture_under_test_downloads_only_its_tasks_test_files(tmp_path: Path, monkeypatch) -> None:
    """Each task asks for the stage of the mixture's trainer: the tasks have none attached."""
    overrides = ["model=tiny_llama", "data=multi", "data.tasks=[e2e_devsplit]", f"data.data_dir={tmp_path}"]
    datamodule = configured_data(compose_train(tmp_path, overrides))
    fetched: list[list[str]] = []
    task = datamodule.tasks["e2e_devsplit"]
    monkeypatch.setattr(task, "spec", dataclasses.replace(task.spec, download=lambda _, names: fetched.append(names)))
    datamodule.trainer = L.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False)
    datamodule.trainer.state.fn = TrainerFn.TESTING
    datamodule.prepare_data()
    assert fetched == [["testset_w_refs.csv"]]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["data=multi", "method=full"], "use method=multitask_prefix"),
        (["method=multitask_prefix"], "use it with data=multi"),
        (["data=multi", "data.tasks=[e2e_devsplit,e2e]"], None),
        (["data=multi", "data.tasks=[e2e_devsplit,gpt3]"], "unknown gpt3.*from custom, dart"),
        (["data=multi", "data.tasks=[webnlg,webnlg]"], "repeated"),
        (["data=multi", "data.tasks=webnlg"], "give a list"),
        (["data=multi", "method.model.tasks=[e2e_devsplit]"], r"method.model.tasks=\['e2e_devsplit'\] is not data"),
        (
            ["data=multi", "data.tasks=[e2e_devsplit,e2e]", "method.model.tasks=[e2e,e2e_devsplit]"],
            r"method.model.tasks=\['e2e', 'e2e_devsplit'\] is not data.tasks=\['e2e_devsplit', 'e2e'\]",
        ),
    ],
)
def test_mixture_configs_are_checked(overrides: list[str], message: str | None, tmp_path: Path) -> None:
    cfg = compose_train(tmp_path, ["model=tiny_llama", *overrides])
    if message is None:
        check_config(cfg)
        return
    with pytest.raises(ConfigError, match=message):
        check_config(cfg)


def test_each_task_is_scored_alone_and_the_shared_metrics_averaged() -> None:
    by_task = {
        "e2e": {"BLEU": 60.0, "NIST": 6.0},
        "webnlg": {"BLEU": 40.0, "TER": 0.5, "seen/BLEU": 45.0},
    }
    assert task_metrics(by_task) == {
        "e2e/BLEU": 60.0,
        "e2e/NIST": 6.0,
        "webnlg/BLEU": 40.0,
        "webnlg/TER": 0.5,
        "webnlg/seen/BLEU": 45.0,
        "BLEU": 50.0,
    }
    # Subset scores (seen/..., unseen/...) are not averaged over the tasks, even where every task has them.
    subsets = {"webnlg": {"BLEU": 40.0, "seen/BLEU": 45.0}, "webnlg_again": {"BLEU": 30.0, "seen/BLEU": 35.0}}
    assert set(task_metrics(subsets)) == {
        "webnlg/BLEU",
        "webnlg/seen/BLEU",
        "webnlg_again/BLEU",
        "webnlg_again/seen/BLEU",
        "BLEU",
    }


@pytest.mark.parametrize(
    ("tasks", "metric", "settled"),
    [
        ("[e2e_devsplit,webnlg]", "null", ("val/bleu", "max")),  # the tasks' common metric, averaged
        ("[e2e_devsplit,webnlg]", "val/webnlg/bleu", ("val/webnlg/bleu", "max")),
        ("[e2e_devsplit,xsum_sample]", "val/xsum_sample/rougel", ("val/xsum_sample/rougel", "max")),
        ("[e2e_devsplit,xsum_sample]", "null", "validated by different metrics; name one of val/loss, "),
        ("[e2e_devsplit,webnlg]", "val/rougel", "validation on e2e_devsplit, webnlg logs val/loss, "),
    ],
)
def test_the_optimized_metric_of_a_mixture(tasks: str, metric: str, settled, tmp_path: Path) -> None:
    cfg = compose_train(
        tmp_path, ["model=tiny_llama", "data=multi", f"data.tasks={tasks}", f"optimized_metric={metric}"]
    )
    if isinstance(settled, str):
        with pytest.raises(ConfigError, match=settled):
            settle_optimized_metric(cfg)
        return
    settle_optimized_metric(cfg)
    assert (cfg.optimized_metric, cfg.optimized_mode) == settled


def test_a_checkpoint_of_the_tasks_in_another_order_is_refused(tmp_path: Path) -> None:
    """The weights would load by name, the optimizer's state by position: each task would get another's."""
    cfg = compose_train(tmp_path, ["model=tiny_llama", "data=multi", "data.tasks=[e2e_devsplit,webnlg]"])
    model, tokenizer = build_model(cfg)
    checkpoint = {"state_dict": build_module(cfg, model, tokenizer).state_dict()}
    build_module(cfg, model, tokenizer).on_save_checkpoint(checkpoint)
    cfg.data.tasks = ["webnlg", "e2e_devsplit"]
    model, tokenizer = build_model(cfg)
    with pytest.raises(ValueError, match="the same tensors in another order .* tasks in another order"):
        build_module(cfg, model, tokenizer).on_load_checkpoint(checkpoint)


@pytest.mark.integration
def test_a_multitask_run_exports_and_scores_every_task(tmp_path: Path, data_dir: Path) -> None:
    """run.py data=multi: one prefix per task in prefix/<task>/, each task tested with its own metric suite."""
    run_cli(
        tmp_path,
        "model=tiny_llama",
        "debug=fast",
        "data=multi",
        "data.tasks=[e2e_devsplit,webnlg]",
        "data.metric_suite=null",
        "generation.max_new_tokens=4",
    )
    assert sorted(path.name for path in (tmp_path / "prefix").iterdir()) == ["e2e_devsplit", "webnlg"]
    metrics = json.loads((tmp_path / "test_metrics.json").read_text())
    assert {"e2e_devsplit/BLEU", "e2e_devsplit/NIST", "e2e_devsplit/CIDEr", "BLEU"} <= metrics.keys()
    assert {"webnlg/BLEU", "webnlg/TER", "webnlg/seen/BLEU"} <= metrics.keys()
    assert "webnlg/NIST" not in metrics and "e2e_devsplit/TER" not in metrics
    rows = [json.loads(line) for line in (tmp_path / "test_generations.jsonl").read_text().splitlines()]
    assert [row["task"] for row in rows] == ["e2e_devsplit"] * 4 + ["webnlg"] * 4
    record = json.loads((tmp_path / "result.json").read_text())
    assert "test/webnlg/ter" in record["test"] and record["last_val"] is not None
    for task in ("e2e_devsplit", "webnlg"):  # each task's folder: its own model card with its own scores
        card = (tmp_path / "prefix" / task / "README.md").read_text()
        assert f"for tiny_llama on {task}\n" in card and "also as PEFT's prefix-tuning adapter" in card
        assert f"| test/bleu | {record['test'][f'test/{task}/bleu']:.4g} |" in card
    assert not (tmp_path / "prefix" / "README.md").exists()
    # the export, evaluated with the run's settings: every task as the run tested it, or one task on its own data
    evaluate = ("-m", "prefix_lightning.evaluate")
    run_cli(tmp_path / "all", f"export_path={tmp_path / 'prefix'}", entry=evaluate)
    assert json.loads((tmp_path / "all" / "test_metrics.json").read_text()) == metrics
    generations = (tmp_path / "test_generations.jsonl").read_text()
    assert (tmp_path / "all" / "test_generations.jsonl").read_text() == generations
    result = run_cli(tmp_path / "webnlg", f"export_path={tmp_path / 'prefix' / 'webnlg'}", entry=evaluate)
    said = result.stderr
    assert f"evaluating with the settings of the run in {tmp_path}: " in said and " data=webnlg" in said
    alone = json.loads((tmp_path / "webnlg" / "test_metrics.json").read_text())
    webnlg = {name.removeprefix("webnlg/"): value for name, value in metrics.items() if name.startswith("webnlg/")}
    assert alone == webnlg


@pytest.mark.integration
def test_a_multitask_run_trains_on_two_processes(tmp_path: Path, data_dir: Path) -> None:
    """Each process's batch of 2 rows lacks one of the 3 tasks at every step: DDP is told that a step may leave some
    prefixes without a gradient (it waited for them forever)."""
    tasks = ["e2e_devsplit", "webnlg", "dart_devsplit"]
    mixture = ["data=multi", f"data.tasks=[{','.join(tasks)}]", "data.batch_size=2", "test=false"]
    run_cli(tmp_path, "model=tiny_llama", "debug=fast", "trainer=ddp_cpu", *mixture, "generation.max_new_tokens=4")
    assert sorted(path.name for path in (tmp_path / "prefix").iterdir()) == sorted(tasks)
    assert json.loads((tmp_path / "result.json").read_text())["train_steps"] == 4


@pytest.mark.integration
def test_a_data_config_of_ones_own_is_a_task(tmp_path: Path, data_dir: Path) -> None:
    """A data config in a folder of the user's (hydra.searchpath) mixes with the shipped ones; resume= and evaluate
    of its prefix find it again (Hydra keeps the search path apart from the run's overrides)."""
    own = tmp_path / "conf" / "data" / "mine.yaml"
    own.parent.mkdir(parents=True)
    own.write_text("defaults:\n  - e2e_devsplit\n  - _self_\ntrain_size: 12\n")
    run = tmp_path / "run"
    mixture = ["data=multi", "data.tasks=[webnlg,mine]", f"hydra.searchpath=[file://{tmp_path / 'conf'}]"]
    run_cli(run, "model=tiny_llama", "debug=fast", *mixture, "trainer.max_steps=2", "generation.max_new_tokens=4")
    assert sorted(path.name for path in (run / "prefix").iterdir()) == ["mine", "webnlg"]
    resumed = run_cli(run, f"resume={run}")
    assert "already holds a complete result.json" in resumed.stdout + resumed.stderr
    evaluate = ("-m", "prefix_lightning.evaluate")
    run_cli(tmp_path / "mine", f"export_path={run / 'prefix' / 'mine'}", entry=evaluate)
    alone = json.loads((tmp_path / "mine" / "test_metrics.json").read_text())
    assert alone["BLEU"] == json.loads((run / "test_metrics.json").read_text())["mine/BLEU"]


@pytest.mark.parametrize(
    ("export", "overrides", "message"),
    [
        ("prefix", ["data=webnlg"], r"holds one prefix per task \(e2e_devsplit, webnlg\): score it with data=multi"),
        ("prefix/webnlg", ["data=multi"], "holds no prefix per task: score it on one dataset"),
        ("prefix", ["data=multi", "data.tasks=[webnlg,dart_devsplit]"], "names dart_devsplit, which .* holds no"),
    ],
)
def test_evaluate_refuses_data_that_does_not_fit_the_export(
    export: str, overrides: list[str], message: str, tmp_path: Path
) -> None:
    """Before anything loads: a mismatch failed at the first test batch, deep in decoding."""
    for task in ("e2e_devsplit", "webnlg"):
        (tmp_path / "prefix" / task).mkdir(parents=True)
        (tmp_path / "prefix" / task / CONFIG_NAME).write_text("{}")
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("evaluate", [f"export_path={tmp_path / export}", "model=tiny_llama", *overrides])
    with pytest.raises(ConfigError, match=message):
        evaluate(cfg)


def test_one_task_of_a_mixture_is_evaluated_with_the_settings_set_for_every_task(tmp_path: Path) -> None:
    """``evaluate export_path=<run>/prefix/<task>`` replays the run's ``data.*`` values on the task's own data
    config, ``data.metric_suite`` among them, and the mixture's token budgets and test batch size; the mixture's
    metric is not the task's."""
    run = tmp_path / "run"
    (run / RUN_OVERRIDES).parent.mkdir(parents=True)
    mixture = ["data=multi", "data.tasks=[e2e_devsplit,webnlg]", "data.metric_suite=bleu", "data.test_size=4"]
    chosen = ["optimized_metric=val/e2e_devsplit/bleu", "optimized_mode=max"]
    (run / RUN_OVERRIDES).write_text(yaml.safe_dump(["model=tiny_llama", *mixture, *chosen]))
    budgets = {"max_source_tokens": 100, "max_target_tokens": 30, "eval_batch_size": 3}
    (run / RUN_CONFIG).write_text(yaml.safe_dump({"data": {"tasks": ["e2e_devsplit", "webnlg"], **budgets}}))
    for task in ("e2e_devsplit", "webnlg"):
        (run / "prefix" / task).mkdir(parents=True)
        (run / "prefix" / task / CONFIG_NAME).write_text("{}")
    _, *overrides, export = with_run_settings(["evaluate", f"export_path={run / 'prefix' / 'webnlg'}"])
    assert export.startswith("export_path=")
    cfg = compose_train(tmp_path, overrides)
    assert (cfg.data.dataset, cfg.data.metric_suite, cfg.data.test_size) == ("webnlg", "bleu", 4)
    assert {key: cfg.data[key] for key in budgets} == budgets
    assert "optimized_metric" not in " ".join(overrides)


def test_mixed_batches_grouped_by_length_pad_less_over_the_same_rows(tmp_path: Path, data_dir: Path) -> None:
    def padded_rows(grouped: bool) -> tuple[list[tuple[int, ...]], int]:
        overrides = ["model=tiny_llama", "debug=fast", "data=multi", f"data.group_by_length={grouped}"]
        cfg = compose_train(tmp_path, [*overrides, "data.tasks=[e2e_devsplit,webnlg]", "data.batch_size=4"])
        model, tokenizer = build_model(cfg)
        datamodule = build_datamodule(cfg, tokenizer, model)
        datamodule.setup("fit")
        return rows_and_padded_tokens(list(datamodule.train_dataloader()))

    (plain_rows, plain_padded), (rows, padded) = padded_rows(False), padded_rows(True)
    assert rows == plain_rows
    assert padded < 0.9 * plain_padded
