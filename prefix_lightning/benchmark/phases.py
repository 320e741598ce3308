"""The benchmark's measurements. Each phase runs alone in a fresh process, so that peak memories do not mix.

Every phase composes the project's Hydra config (the same ``model``, ``prefix``, ``data`` and ``generation``
groups as ``run.py``), loads the backbone, builds the same batches from the E2E files, and times only its
measured part: training steps after ``warmup`` steps, or beam-search decoding after a greedy check.
"""

from __future__ import annotations

import resource
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext, suppress
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig
from transformers import PreTrainedModel, PreTrainedTokenizerBase
from transformers.utils import logging as transformers_logging

from prefix_lightning.baselines.peft_prefix import peft_generate, peft_prefix_config, set_peft_prefix
from prefix_lightning.data import TextToTextCollator, read_e2e, reference_groups
from prefix_lightning.prefix import PrefixConfig, PrefixModel
from prefix_lightning.prefix.export import read_prefix
from prefix_lightning.training.build import build_model, generation_settings, load_configured_backbone
from prefix_lightning.training.checks import check_config, options_at

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"
TRAIN_FILE = Path("e2e") / "devset.csv"
TEST_FILE = Path("e2e") / "testset_w_refs.csv"
FULL_FINETUNING_LR = 5e-5  # a usual rate for full fine-tuning; the speed does not depend on it
PRECISIONS = ("32", "bf16-mixed")

Batch = dict[str, torch.Tensor]


@dataclass(frozen=True)
class Setting:
    """What every phase needs to rebuild the same model, data and batches (plain values: sent to a process)."""

    overrides: tuple[str, ...]  # Hydra overrides of the train config, e.g. ("model=tiny_llama",)
    steps: int  # timed training steps
    warmup: int  # untimed training steps before them
    inputs: int  # test inputs decoded with the configured beam search
    check_inputs: int  # test inputs decoded greedily to check that both models decode alike
    precision: str  # "32", or "bf16-mixed" (autocast; our frozen LM is then stored in bf16 too)
    device: str
    threads: int | None  # torch threads per phase (None: torch's default)
    prefix_dir: str | None  # exported prefix that both decoders load (None: the one train_ours ends with)


# -- setting up a phase ------------------------------------------------------------------------------------
def compose_config(overrides: tuple[str, ...]) -> DictConfig:
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("train", overrides=list(overrides))


def _start(setting: Setting, frozen_in_compute_dtype: bool = False) -> DictConfig:
    """The phase's config; under bf16-mixed a model that stays frozen is stored in bf16 (half the memory)."""
    if setting.threads:
        torch.set_num_threads(setting.threads)
    warnings.filterwarnings("ignore", category=FutureWarning)  # PEFT's and transformers' deprecation notes
    transformers_logging.disable_progress_bar()
    overrides = setting.overrides
    if frozen_in_compute_dtype and setting.precision == "bf16-mixed":
        overrides = (*overrides, "model.backbone.dtype=bfloat16")
    cfg = compose_config(overrides)
    check_config(cfg)
    torch.manual_seed(cfg.seed)
    return cfg


def frozen_lm(cfg: DictConfig) -> str:
    """How the phase's LM is stored: its quantization, else its dtype."""
    return cfg.model.backbone.get("quantization") or cfg.model.backbone.dtype


def _prefix_dir(setting: Setting) -> str:
    if setting.prefix_dir is None:
        raise ValueError("this phase needs the prefix folder: setting.prefix_dir (run_benchmark fills it)")
    return setting.prefix_dir


def _prefix_config(cfg: DictConfig) -> PrefixConfig:
    return PrefixConfig.of(options_at(cfg, "prefix"))


def _causal(lm: PreTrainedModel, device: str) -> PreTrainedModel:
    if lm.config.is_encoder_decoder:
        raise ValueError("the benchmark compares causal LMs (PEFT's prefix tuning and ours on the same decoder)")
    # transformers wraps `to` with functools.wraps, whose type needs self.
    return lm.to(device)  # type: ignore[arg-type]


def _backbone(cfg: DictConfig, device: str) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    lm, tokenizer = load_configured_backbone(cfg)
    return _causal(lm, device), tokenizer


def _collator(cfg: DictConfig, tokenizer: PreTrainedTokenizerBase) -> TextToTextCollator:
    return TextToTextCollator(
        tokenizer,
        cfg.model.separator,
        cfg.model.target_end,
        max_source_tokens=cfg.data.max_source_tokens,
        max_target_tokens=cfg.data.max_target_tokens,
    )


def training_batches(cfg: DictConfig, tokenizer: PreTrainedTokenizerBase, count: int) -> list[Batch]:
    """``count`` batches of ``data.batch_size`` pairs of E2E's devset.csv, drawn with ``data.subset_seed``."""
    examples = read_e2e(Path(cfg.paths.data_dir) / TRAIN_FILE)
    size = cfg.data.batch_size
    if count * size > len(examples):
        raise ValueError(f"{count} batches of {size} need more than the {len(examples)} pairs of {TRAIN_FILE}")
    order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(cfg.data.subset_seed))
    collator = _collator(cfg, tokenizer)
    pairs = collator.encode_pairs([examples[i] for i in order[: count * size].tolist()], "benchmark training")
    return [collator.train_batch(pairs[i : i + size]) for i in range(0, len(pairs), size)]


def decoding_batches(cfg: DictConfig, tokenizer: PreTrainedTokenizerBase, count: int) -> list[Batch]:
    """The first ``count`` inputs (meaning representations) of E2E's test set, ``data.eval_batch_size`` a batch."""
    groups = reference_groups(read_e2e(Path(cfg.paths.data_dir) / TEST_FILE))[:count]
    collator = _collator(cfg, tokenizer)
    prompts = collator.encode_prompts(groups, "benchmark generation")
    size = cfg.data.eval_batch_size
    batches = [collator.generation_batch(prompts[i : i + size]) for i in range(0, len(prompts), size)]
    return [{"input_ids": b["input_ids"], "attention_mask": b["attention_mask"]} for b in batches]


def _to(batch: Batch, device: str) -> Batch:
    return {key: value.to(device) for key, value in batch.items()}


def _autocast(setting: Setting) -> Any:
    if setting.precision == "bf16-mixed":
        return torch.autocast(torch.device(setting.device).type, dtype=torch.bfloat16)
    return nullcontext()


# -- time and memory ---------------------------------------------------------------------------------------
def _reset_peak_memory(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats(device)
        return
    with suppress(OSError):  # Linux: "5" resets the resident-set high-water mark (VmHWM) to the current size
        Path("/proc/self/clear_refs").write_text("5")


def _peak_memory_mb(device: str) -> float:
    """GPU: peak allocated bytes; CPU: peak resident set size (since the last reset where Linux allows it)."""
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024


@contextmanager
def measured(device: str) -> Iterator[dict[str, float]]:
    """Wall time, CPU time (all threads: steadier than wall time on a shared machine) and peak memory."""
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)
    _reset_peak_memory(device)
    stats: dict[str, float] = {}
    wall, cpu = time.perf_counter(), time.process_time()
    yield stats
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)
    stats.update(
        seconds=time.perf_counter() - wall,
        cpu_seconds=time.process_time() - cpu,
        peak_memory_mb=_peak_memory_mb(device),
    )


# -- training ----------------------------------------------------------------------------------------------
def _train(
    setting: Setting,
    cfg: DictConfig,
    model: torch.nn.Module,
    loss_of: Callable[[Batch], torch.Tensor],
    batches: list[Batch],
    lr: float,
) -> dict[str, Any]:
    """AdamW steps over the trainable parameters; the steps after ``warmup`` are measured."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=lr)
    batches = [_to(batch, setting.device) for batch in batches]
    losses = []

    def step(batch: Batch) -> None:
        with _autocast(setting):
            loss = loss_of(batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())

    for batch in batches[: setting.warmup]:
        step(batch)
    with measured(setting.device) as stats:
        for batch in batches[setting.warmup :]:
            step(batch)
    tokens = sum(int(batch["attention_mask"].sum()) for batch in batches[setting.warmup :])
    return {
        **stats,
        "steps": len(batches) - setting.warmup,
        "tokens": tokens,
        "tokens_per_s": tokens / stats["seconds"],
        "tokens_per_cpu_s": tokens / stats["cpu_seconds"],
        "trainable_parameters": sum(p.numel() for p in trainable),
        "first_loss": losses[0],
        "last_loss": losses[-1],
        "frozen_lm": frozen_lm(cfg),
    }


def train_ours(setting: Setting) -> dict[str, Any]:
    """The model run.py trains, with the LightningModule's loss (target-token logits); exports its last prefix."""
    cfg = _start(setting, frozen_in_compute_dtype=True)
    model, tokenizer = build_model(cfg)
    assert isinstance(model, torch.nn.Module)  # every method is a module (see TrainableLM)
    _causal(model.lm, setting.device)
    model.to(setting.device).train()
    batches = training_batches(cfg, tokenizer, setting.warmup + setting.steps)
    result = _train(setting, cfg, model, lambda batch: model.loss(**batch), batches, cfg.method.lr)
    model.save(_prefix_dir(setting))
    return result


def train_peft(setting: Setting) -> dict[str, Any]:
    """PEFT's prefix tuning, used the usual way: ``model(**batch).loss``."""
    from peft import get_peft_model

    cfg = _start(setting)
    lm, tokenizer = _backbone(cfg, setting.device)
    model = get_peft_model(lm, peft_prefix_config(_prefix_config(cfg))).train()
    batches = training_batches(cfg, tokenizer, setting.warmup + setting.steps)
    return _train(setting, cfg, model, lambda batch: model(**batch).loss, batches, cfg.method.lr)


def train_full(setting: Setting) -> dict[str, Any]:
    """Full fine-tuning of every LM weight: ``lm(**batch).loss``."""
    cfg = _start(setting)
    lm, tokenizer = _backbone(cfg, setting.device)
    lm.requires_grad_(True).train()
    batches = training_batches(cfg, tokenizer, setting.warmup + setting.steps)
    return _train(setting, cfg, lm, lambda batch: lm(**batch).loss, batches, FULL_FINETUNING_LR)


# -- decoding ----------------------------------------------------------------------------------------------
def _outputs(
    setting: Setting, generate: Callable[..., torch.Tensor], batches: list[Batch], options: dict[str, Any]
) -> list[list[int]]:
    """The new tokens of every input (padding dropped)."""
    outputs = []
    for batch in batches:
        batch = _to(batch, setting.device)
        with _autocast(setting):
            new = generate(**batch, **options)[:, batch["input_ids"].shape[1] :]
        outputs += [[token for token in row.tolist() if token != options["pad_token_id"]] for row in new]
    return outputs


def _greedy(
    setting: Setting, cfg: DictConfig, tokenizer: Any, generate: Callable[..., torch.Tensor]
) -> list[list[int]]:
    options = {**generation_settings(cfg, tokenizer), "num_beams": 1}
    return _outputs(setting, generate, decoding_batches(cfg, tokenizer, setting.check_inputs), options)


def _decode(setting: Setting, cfg: DictConfig, tokenizer: Any, generate: Callable[..., torch.Tensor]) -> dict[str, Any]:
    """Greedy outputs of the check inputs (untimed), then the configured beam search over all inputs (timed)."""
    greedy = _greedy(setting, cfg, tokenizer, generate)
    options = generation_settings(cfg, tokenizer)
    batches = decoding_batches(cfg, tokenizer, setting.inputs)
    with measured(setting.device) as stats:
        outputs = _outputs(setting, generate, batches, options)
    tokens = sum(len(output) for output in outputs)
    return {
        **stats,
        "frozen_lm": frozen_lm(cfg),
        "inputs": len(outputs),
        "num_beams": options.get("num_beams", 1),
        "tokens": tokens,
        "tokens_per_s": tokens / stats["seconds"],
        "tokens_per_cpu_s": tokens / stats["cpu_seconds"],
        "greedy": greedy,
        "outputs": outputs,
        "texts": tokenizer.batch_decode(outputs, skip_special_tokens=True),
    }


def generate_ours(setting: Setting) -> dict[str, Any]:
    """Our exported prefix on the frozen LM: ``PrefixModel.generate``."""
    cfg = _start(setting, frozen_in_compute_dtype=True)
    lm, tokenizer = _backbone(cfg, setting.device)
    model = PrefixModel.from_prefix(lm, _prefix_dir(setting)).to(setting.device).eval()
    return _decode(setting, cfg, tokenizer, model.generate)


def generate_peft(setting: Setting) -> dict[str, Any]:
    """The same prefix values in PEFT's inference layout (its MLP dropped, as PEFT saves it), decoded through
    ``peft_generate``; the bare LM's greedy outputs come along to show that the prefix is used."""
    from peft import get_peft_model

    cfg = _start(setting)
    lm, tokenizer = _backbone(cfg, setting.device)
    model = get_peft_model(lm, peft_prefix_config(_prefix_config(cfg), inference_mode=True)).eval()
    exported = read_prefix(_prefix_dir(setting))
    sites = exported.tensors()
    set_peft_prefix(model, torch.stack([sites[f"self.{i}"] for i in range(len(exported.sites))]).to(setting.device))
    result = _decode(setting, cfg, tokenizer, partial(peft_generate, model))
    # PEFT types base_model as a plain Module.
    result["bare_greedy"] = _greedy(setting, cfg, tokenizer, model.base_model.generate)  # type: ignore[arg-type]
    return result
