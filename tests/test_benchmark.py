"""The speed work changes no result, PEFT's decoding path really uses its prefix, and the benchmark runs."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import torch
from peft import PrefixTuningConfig, get_peft_model

from prefix_lightning import PrefixConfig, PrefixModel
from prefix_lightning.baselines.peft_prefix import peft_generate
from prefix_lightning.benchmark import PHASES, Setting, run_benchmark
from prefix_lightning.benchmark.__main__ import main as benchmark_main
from prefix_lightning.benchmark.hardware import matmul_parameters, mfu, peak_tflops
from prefix_lightning.benchmark.phases import (
    CHECKED_TOKENS,
    _backbone,
    _greedy,
    _start,
    decoding_batches,
    training_batches,
)
from prefix_lightning.benchmark.suites import SUITES, format_comparison
from prefix_lightning.training.build import load_configured_backbone
from tests.helpers.cli import run_python
from tests.helpers.config import compose_train
from tests.helpers.data import rows_and_padded_tokens
from tests.helpers.peft import set_peft_prefix
from tests.helpers.quantized import needs_bitsandbytes


def _setup(tmp_path: Path, name: str, reparam: str = "mlp") -> tuple[PrefixModel, object, object]:
    cfg = compose_train(tmp_path, [f"model={name}"])
    lm, tokenizer = load_configured_backbone(cfg)
    model = PrefixModel(lm, PrefixConfig(length=3, hidden_dim=16, reparam=reparam))
    return model, tokenizer, cfg


@pytest.mark.parametrize("name", ["tiny_llama", "tiny_gpt2", "tiny_bart"])
def test_target_logits_loss_is_the_lms_own_loss(name: str, tmp_path: Path, data_dir: Path) -> None:
    """Logits at target positions only, rows in length groups, the right-padded batch without its mask (the GPU
    path: plain causal attention): the same token-mean loss and prefix gradient. (BART takes the LM's own path.)"""
    model, tokenizer, cfg = _setup(tmp_path, name)
    model.train()
    (batch,) = training_batches(cfg, tokenizer, 1)  # real E2E pairs of different lengths, right-padded
    reference = model(**batch, use_cache=False).loss
    expected = torch.autograd.grad(reference, model.trainable_parameters())
    for groups, unmasked in ((None, None), (1, False), (2, False), (3, False), (1, True), (2, True)):
        loss = model.loss(**batch, length_groups=groups, drop_right_padding_mask=unmasked)
        torch.testing.assert_close(loss, reference, atol=1e-6, rtol=1e-6)
        for got, want in zip(torch.autograd.grad(loss, model.trainable_parameters()), expected, strict=True):
            torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-4)


def test_batches_grouped_by_length_as_training_groups_them(tmp_path: Path, data_dir: Path) -> None:
    """``data.group_by_length``: the benchmark's batches of the same pairs, regrouped as training regroups its
    order, pad to fewer tokens (what a GPU step's time follows)."""

    def batches(grouped: bool) -> list[dict[str, Any]]:
        cfg = compose_train(tmp_path, ["model=tiny_llama", "data.batch_size=8", f"data.group_by_length={grouped}"])
        return training_batches(cfg, load_configured_backbone(cfg)[1], 6)

    (plain_rows, plain_padded), (rows, padded) = (rows_and_padded_tokens(batches(g)) for g in (False, True))
    assert rows == plain_rows
    real = sum(map(len, rows))
    assert padded - real < (plain_padded - real) / 3


def test_target_logits_loss_with_left_padding(tmp_path: Path, data_dir: Path) -> None:
    model, tokenizer, cfg = _setup(tmp_path, "tiny_llama")
    (batch,) = training_batches(cfg, tokenizer, 1)
    shifts = (batch["attention_mask"] == 0).sum(1).tolist()
    left = {
        key: torch.stack([row.roll(s) for row, s in zip(value, shifts, strict=True)]) for key, value in batch.items()
    }
    assert (left["attention_mask"][:, 0] == 0).any()
    reference = model(**left, use_cache=False).loss
    torch.testing.assert_close(model.loss(**left, length_groups=2), reference, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("options", [{"num_beams": 3}, {"num_beams": 3, "num_return_sequences": 2}])
def test_prompt_run_once_for_all_beams_decodes_as_transformers(options: dict, tmp_path: Path, data_dir: Path) -> None:
    """``generate`` runs each prompt once and repeats its cache for the beams: same beams as per-beam prompts."""
    model, tokenizer, cfg = _setup(tmp_path, "tiny_llama")
    model.eval()
    (batch,) = decoding_batches(cfg, tokenizer, 4)  # left-padded prompts
    settings = {"max_new_tokens": 6, "pad_token_id": tokenizer.pad_token_id, "eos_token_id": None, **options}
    shared = model.generate(**batch, **settings)
    per_beam = model.lm.generate(**batch, **settings)  # the prefix generate materialized is still in place
    assert torch.equal(shared, per_beam)


@pytest.mark.filterwarnings("ignore::FutureWarning")  # PEFT calls transformers' deprecated names
def test_peft_decoding_uses_its_prefix_and_matches_ours(tmp_path: Path, data_dir: Path) -> None:
    """PEFT's own generate drops the prefix under transformers 5; peft_generate must not."""
    ours, tokenizer, cfg = _setup(tmp_path, "tiny_llama", reparam="none")
    ours.eval()
    lm, _ = load_configured_backbone(cfg)  # the same random weights
    config = PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3, inference_mode=True)
    peft = get_peft_model(lm, config).eval()
    with torch.no_grad():
        set_peft_prefix(peft, ours.prefix_key_values())
    (batch,) = decoding_batches(cfg, tokenizer, 4)
    for beams in (1, 3):
        settings = {"max_new_tokens": 6, "num_beams": beams, "pad_token_id": tokenizer.pad_token_id}
        theirs = peft_generate(peft, **batch, **settings)
        assert torch.equal(theirs, ours.generate(**batch, **settings))
        assert not torch.equal(theirs, peft.base_model.generate(**batch, **settings))


@pytest.mark.integration
def test_benchmark_command_runs_on_a_tiny_model(tmp_path: Path, data_dir: Path) -> None:
    output = tmp_path / "benchmark.json"
    arguments = ["-m", "prefix_lightning.benchmark", "--steps", "2", "--warmup", "1", "--inputs", "3"]
    arguments += ["--check-inputs", "3", "--threads", "1", "--output", str(output)]
    arguments += ["--peak-tflops", "0.5", "--profile", str(tmp_path / "profile")]
    arguments += ["model=tiny_llama", "generation.max_new_tokens=6", "generation.num_beams=2"]
    result = run_python(*arguments)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "beam-search tokens/s vs PEFT" in result.stdout
    benchmark = json.loads(output.read_text())
    phases = {"train_ours", "train_peft", "train_full", "generate_ours", "generate_peft", "generate_mixed"}
    assert set(benchmark["results"]) == phases
    for name, phase in benchmark["results"].items():
        assert phase["tokens_per_s"] > 0 and phase["peak_memory_mb"] > 0
        table = Path(phase["profile"]["table"]).read_text()
        assert Path(phase["profile"]["trace"]).stat().st_size > 0 and "aten::" in table, name
    training = {name: benchmark["results"][name] for name in ("train_ours", "train_peft", "train_full")}
    for phase in training.values():
        assert phase["mfu"] == pytest.approx(phase["tokens_per_s"] * phase["flops_per_token"] / 0.5e12)
    # 4N per token with the LM frozen, 6N with its weights trained, N the same LM's
    assert training["train_ours"]["flops_per_token"] == training["train_peft"]["flops_per_token"]
    assert training["train_full"]["flops_per_token"] == 1.5 * training["train_ours"]["flops_per_token"]
    ours, full = benchmark["results"]["train_ours"], benchmark["results"]["train_full"]
    assert ours["steps"] == 2 and ours["trainable_parameters"] < full["trainable_parameters"]
    assert len(benchmark["ratios"]) == 7
    assert all(benchmark["checks"].values()), benchmark["checks"]
    mixed = benchmark["results"]["generate_mixed"]
    assert mixed["inputs"] == 3 and len(mixed["prefix_lengths"]) == 4
    assert mixed["single"]["seconds"] > 0 and mixed["sequential"]["seconds"] > 0


def test_the_greedy_check_compares_tokens_of_every_input() -> None:
    """Random tiny GPT-2 ends some inputs at once (its end token is its padding): the check still compares
    tokens of each."""
    setting = Setting(("model=tiny_gpt2",), 1, 0, 1, 4, "32", "cpu", 1, None)
    cfg = _start(setting)
    lm, tokenizer = _backbone(cfg, "cpu")
    assert all(len(output) >= CHECKED_TOKENS for output in _greedy(setting, cfg, tokenizer, lm.generate))


def test_model_flops_count_each_matrix_once(tmp_path: Path) -> None:
    """A tied output layer is the embedding table (one matrix product); an untied one adds its own, and the input
    table alone is a lookup."""
    for name in ("tiny_gpt2", "tiny_llama"):
        lm, _ = load_configured_backbone(compose_train(tmp_path, [f"model={name}"]))
        total = sum(p.numel() for p in lm.parameters())
        tied = lm.get_output_embeddings().weight is lm.get_input_embeddings().weight
        expected = total if tied else total - lm.get_input_embeddings().weight.numel()
        assert matmul_parameters(lm) == expected and (name == "tiny_gpt2") == tied
    assert mfu(1000.0, 4e9, 989.4) == pytest.approx(1000 * 4e9 / 989.4e12)


@pytest.mark.parametrize(
    ("name", "peak"), [("NVIDIA H100 80GB HBM3", 989.4), ("NVIDIA H100 PCIe", 756.0), ("NVIDIA H200", 989.4)]
)
def test_a_gpus_peak_is_its_variants(name: str, peak: float, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device: name)
    assert peak_tflops("cuda", "bf16-mixed") == peak and peak_tflops("cpu", "bf16-mixed") is None
    assert mfu(1000.0, 4e9, None) is None


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--fixed-new-tokens", "0"], "argument --fixed-new-tokens: 0 is not valid: use 1 or more"),
        (["--peak-tflops", "-5"], "argument --peak-tflops: -5 is not valid: use a number above 0"),
        (["--threads", "0"], "argument --threads: 0 is not valid"),
        (["--device", "nonsense"], "argument --device: 'nonsense' is not a torch device"),
        (["--device", "meta"], "argument --device: 'meta' holds no data: give a device that computes"),
        (["--mixed-prefix", "a", "--mixed-prefix", "b", "--mixed-prefix", "c", "--mixed-prefix", "d"], "at most 3"),
        (["--phases", "train_ours", "--fixed-new-tokens", "4"], "--fixed-new-tokens: for generate_mixed, which"),
        (["--phases", ","], "argument --phases: ',' names no phase"),
        (["--phases", "train_ours,train_lora"], "argument --phases: 'train_lora' is not a phase; choose from train_"),
        # One result per phase: the first of the two was lost.
        (["--phases", "train_ours,train_peft,train_ours"], "'train_ours,train_peft,train_ours' names train_ours more"),
        (["--output", "."], "--output .: a folder; give the JSON file to write"),
        (["--run", "float32"], "--run picks runs of a suite: give --suite too"),
        (["--suite", "frozen_lm", "--run", "fp32"], "--run 'fp32': not a run of suite frozen_lm; its runs: ['float32'"),
    ],
)
def test_bad_options_are_refused_before_anything_runs(
    arguments: list[str], message: str, capsys: pytest.CaptureFixture
) -> None:
    with pytest.raises(SystemExit):
        benchmark_main(arguments)
    assert message in capsys.readouterr().err


def test_devices_this_machine_lacks_are_refused(capsys: pytest.CaptureFixture) -> None:
    lacking = [f"cuda:{torch.cuda.device_count()}" if torch.cuda.is_available() else "cuda"]
    lacking += [] if torch.backends.mps.is_available() else ["mps"]
    for device in lacking:
        with pytest.raises(SystemExit):
            benchmark_main(["--device", device])
        assert f"argument --device: '{device}': this " in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="what a machine without a GPU says")
def test_the_gpu_suite_is_refused_on_the_cpu(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):
        benchmark_main(["--suite", "gpu", "--device", "cpu"])
    assert "--suite gpu measures real model shapes on a GPU" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("overrides", "names", "message"),
    [
        ((), ("generate_ours", "train_ours"), "generate_ours decodes with a prefix: give one (--prefix) or run train"),
        (("method=lora",), ("train_ours",), "method=lora: the benchmark measures our prefix tuning (method=prefix)"),
    ],
)
def test_phases_that_cannot_measure_what_they_say_are_refused(
    overrides: tuple[str, ...], names: tuple[str, ...], message: str
) -> None:
    setting = Setting(("model=tiny_llama", *overrides), 1, 0, 1, 1, "32", "cpu", 1, None)
    with pytest.raises(ValueError, match=re.escape(message)):
        run_benchmark(setting, names, report=pytest.fail)


def test_every_suite_runs_configs_and_phases_that_exist(tmp_path: Path) -> None:
    for name, suite in SUITES.items():
        for run in suite.runs:
            assert set(run.phases) <= PHASES.keys() and run.precision in ("32", "bf16-mixed"), (name, run.label)
            cfg = compose_train(tmp_path, list(run.overrides))
            if name == "gpu":
                assert cfg.model.backbone.source == "random" and cfg.data.batch_size == 32  # the acceptance settings
    stored = [(run.precision, compose_train(tmp_path, list(run.overrides))) for run in SUITES["frozen_lm"].runs]
    assert [(precision, cfg.model.backbone.quantization) for precision, cfg in stored] == [
        ("32", None),
        ("bf16-mixed", None),
        ("32", "int8"),
        ("32", "int4"),
    ]


def test_a_compared_suite_sets_each_run_against_the_first() -> None:
    def run(train: tuple[float, float], decode: tuple[float, float]) -> dict[str, Any]:
        phases = {"train_ours": train, "generate_ours": decode}
        return {"results": {k: {"tokens_per_s": s, "peak_memory_mb": m} for k, (s, m) in phases.items()}}

    table = format_comparison({"float32": run((100, 2000), (20, 1800)), "int8": run((50, 1500), (5, 900))})
    rows = [line.split() for line in table.splitlines()[1:]]
    assert rows == [
        ["train_ours", "float32", "100.0", "1.00", "2000", "1.00"],
        ["train_ours", "int8", "50.0", "0.50", "1500", "0.75"],
        ["generate_ours", "float32", "20.0", "1.00", "1800", "1.00"],
        ["generate_ours", "int8", "5.0", "0.25", "900", "0.50"],
    ]


@pytest.mark.integration
@needs_bitsandbytes
def test_benchmark_compares_a_quantized_frozen_lm(tmp_path: Path, data_dir: Path) -> None:
    """The same command and table with model.backbone.quantization=int8: our training and decoding phases."""
    output = tmp_path / "benchmark.json"
    arguments = ["-m", "prefix_lightning.benchmark", "--steps", "2", "--warmup", "1", "--inputs", "3"]
    arguments += ["--check-inputs", "3", "--threads", "1", "--output", str(output)]
    arguments += ["--phases", "train_ours,generate_ours", "model=tiny_llama", "model.backbone.quantization=int8"]
    arguments += ["generation.max_new_tokens=6"]
    result = run_python(*arguments)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [line.split() for line in result.stdout.splitlines() if line.startswith(("train_ours ", "generate_ours "))]
    assert [row[:2] for row in rows] == [["train_ours", "int8"], ["generate_ours", "int8"]]
    benchmark = json.loads(output.read_text())
    assert {phase["frozen_lm"] for phase in benchmark["results"].values()} == {"int8"}


def test_benchmark_refuses_full_finetuning_of_a_quantized_lm_before_running() -> None:
    setting = Setting(("model=tiny_llama", "model.backbone.quantization=int8"), 1, 0, 1, 1, "32", "cpu", 1, None)
    with pytest.raises(ValueError, match="phase train_full trains the LM's own weights"):
        run_benchmark(setting, ("train_ours", "train_full"), report=pytest.fail)


@pytest.mark.integration
def test_under_bf16_every_frozen_lm_is_stored_in_bf16(tmp_path: Path, data_dir: Path) -> None:
    """PEFT's frozen LM is stored as ours is (bf16), or the comparison measures float32 storage against bf16; full
    fine-tuning keeps float32 weights, as mixed precision trains them."""
    output = tmp_path / "benchmark.json"
    arguments = ["-m", "prefix_lightning.benchmark", "--steps", "1", "--warmup", "1", "--threads", "1"]
    arguments += ["--precision", "bf16-mixed", "--phases", "train_ours,train_peft,train_full", "--output", str(output)]
    result = run_python(*arguments, "model=tiny_llama")
    assert result.returncode == 0, result.stderr[-3000:]
    stored = {name: phase["frozen_lm"] for name, phase in json.loads(output.read_text())["results"].items()}
    assert stored == {"train_ours": "bfloat16", "train_peft": "bfloat16", "train_full": "float32"}
