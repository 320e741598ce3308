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
from omegaconf import DictConfig
from transformers import PreTrainedModel, PreTrainedTokenizerBase
from transformers.utils import logging as transformers_logging

from prefix_lightning.baselines import PeftPrefixTuning
from prefix_lightning.baselines.peft_prefix import peft_generate, peft_prefix_config
from prefix_lightning.benchmark.hardware import matmul_parameters, mfu, peak_tflops
from prefix_lightning.benchmark.profiling import profiled
from prefix_lightning.data import TextToTextCollator, read_e2e, reference_groups
from prefix_lightning.data.sampler import grouped_by_length
from prefix_lightning.prefix import PrefixBank, PrefixConfig, PrefixModel
from prefix_lightning.prefix.bank import StoredPrefix
from prefix_lightning.training.build import (
    build_model,
    generation_settings,
    load_configured_backbone,
)
from prefix_lightning.training.checks import check_config, options_at
from prefix_lightning.training.compose import compose_config

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
    precision: str  # "32", or "bf16-mixed" (autocast; a frozen LM, ours or PEFT's, is then stored in bf16)
    device: str
    threads: int | None  # torch threads per phase (None: torch's default)
    prefix_dir: str | None  # exported prefix that both decoders load (None: the one train_ours ends with)
    mixed_prefix_dirs: tuple[str, ...] = ()  # more prefixes for the mixed batches (filled up with random ones)
    fixed_new_tokens: int | None = None  # mixed batches: every input decodes exactly this many tokens
    peak_tflops: float | None = None  # the device's peak for MFU (None: from hardware.PEAK_TFLOPS where known)
    profile_dir: str | None = None  # where each phase writes the profile of one more step or batch (None: none)


# -- setting up a phase ------------------------------------------------------------------------------------
def _start(setting: Setting, frozen_in_compute_dtype: bool = False) -> DictConfig:
    """The phase's config; under bf16-mixed a model that stays frozen (ours, PEFT's) is stored in bf16 (half the
    memory), one whose weights train (full fine-tuning) in float32, as mixed precision keeps them."""
    if setting.threads:
        torch.set_num_threads(setting.threads)
    warnings.filterwarnings("ignore", category=FutureWarning)  # PEFT's and transformers' deprecation notes
    transformers_logging.disable_progress_bar()
    overrides = setting.overrides
    if frozen_in_compute_dtype and setting.precision == "bf16-mixed":
        overrides = (*overrides, "model.backbone.dtype=bfloat16")
    cfg = compose_config("train", overrides)
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
    """The LM built on the phase's device: a random 1.7B model's weights drawn on the CPU took most of a minute of
    every phase on a GPU machine."""
    with torch.device(device):
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
    """``count`` batches of ``data.batch_size`` pairs of E2E's devset.csv, drawn with ``data.subset_seed``; with
    ``data.group_by_length``, regrouped into batches of similar lengths as training regroups its order."""
    examples = read_e2e(Path(cfg.paths.data_dir) / TRAIN_FILE)
    size = cfg.data.batch_size
    if count * size > len(examples):
        raise ValueError(f"{count} batches of {size} need more than the {len(examples)} pairs of {TRAIN_FILE}")
    generator = torch.Generator().manual_seed(cfg.data.subset_seed)
    order = torch.randperm(len(examples), generator=generator)
    collator = _collator(cfg, tokenizer)
    pairs = collator.encode_pairs([examples[i] for i in order[: count * size].tolist()], "benchmark training")
    if cfg.data.get("group_by_length"):
        grouped = grouped_by_length(list(range(len(pairs))), [pair.length for pair in pairs], size, generator)
        pairs = [pairs[i] for i in grouped]
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
    phase: str,
    setting: Setting,
    cfg: DictConfig,
    model: torch.nn.Module,
    loss_of: Callable[[Batch], torch.Tensor],
    batches: list[Batch],
    lr: float,
    flops_per_token: float,
) -> dict[str, Any]:
    """AdamW steps over the trainable parameters; the steps after ``warmup`` are measured; with a profile folder,
    one more step is profiled. ``flops_per_token``: the model FLOPs of a step per token (see hardware)."""
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
    peak = setting.peak_tflops or peak_tflops(setting.device, setting.precision)
    profile = _profile(setting, phase, lambda: step(batches[-1]))
    return {
        **stats,
        **profile,
        "steps": len(batches) - setting.warmup,
        "tokens": tokens,
        "tokens_per_s": tokens / stats["seconds"],
        "tokens_per_cpu_s": tokens / stats["cpu_seconds"],
        "flops_per_token": flops_per_token,
        "peak_tflops": peak,
        "mfu": mfu(tokens / stats["seconds"], flops_per_token, peak),
        "trainable_parameters": sum(p.numel() for p in trainable),
        "first_loss": losses[0],
        "last_loss": losses[-1],
        "frozen_lm": frozen_lm(cfg),
    }


def _profile(setting: Setting, phase: str, work: Callable[[], object]) -> dict[str, Any]:
    """``work`` once more under the profiler, when the setting asks for it; what the profile found."""
    if setting.profile_dir is None:
        return {}
    with profiled(setting.profile_dir, phase, setting.device) as found:
        work()
    return {"profile": found}


def train_ours(setting: Setting) -> dict[str, Any]:
    """The model run.py trains, with the LightningModule's loss (target-token logits); exports its last prefix."""
    cfg = _start(setting, frozen_in_compute_dtype=True)
    with torch.device(setting.device):  # as _backbone
        model, tokenizer = build_model(cfg)
    assert isinstance(model, torch.nn.Module)  # every method is a module (see TrainableLM)
    _causal(model.lm, setting.device)
    model.to(setting.device).train()
    batches = training_batches(cfg, tokenizer, setting.warmup + setting.steps)
    flops = 4 * matmul_parameters(model.lm)  # frozen LM: no weight gradients
    result = _train("train_ours", setting, cfg, model, lambda batch: model.loss(**batch), batches, cfg.method.lr, flops)
    model.save(_prefix_dir(setting))
    return result


def train_peft(setting: Setting) -> dict[str, Any]:
    """PEFT's prefix tuning, used the usual way: ``model(**batch).loss``."""
    from peft import get_peft_model

    cfg = _start(setting, frozen_in_compute_dtype=True)  # PEFT's frozen LM stored as ours is
    lm, tokenizer = _backbone(cfg, setting.device)
    flops = 4 * matmul_parameters(lm)  # frozen LM: no weight gradients
    model = get_peft_model(lm, peft_prefix_config(_prefix_config(cfg))).train()
    batches = training_batches(cfg, tokenizer, setting.warmup + setting.steps)
    return _train("train_peft", setting, cfg, model, lambda batch: model(**batch).loss, batches, cfg.method.lr, flops)


def train_full(setting: Setting) -> dict[str, Any]:
    """Full fine-tuning of every LM weight: ``lm(**batch).loss``."""
    cfg = _start(setting)
    lm, tokenizer = _backbone(cfg, setting.device)
    lm.requires_grad_(True).train()
    batches = training_batches(cfg, tokenizer, setting.warmup + setting.steps)
    flops = 6 * matmul_parameters(lm)
    return _train("train_full", setting, cfg, lm, lambda batch: lm(**batch).loss, batches, FULL_FINETUNING_LR, flops)


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


CHECKED_TOKENS = 8  # new tokens every greedy check compares at least (an LM may end an input at once)


def _greedy(
    setting: Setting, cfg: DictConfig, tokenizer: Any, generate: Callable[..., torch.Tensor]
) -> list[list[int]]:
    options = {**generation_settings(cfg, tokenizer), "num_beams": 1}
    options["min_new_tokens"] = max(options.get("min_new_tokens") or 0, min(CHECKED_TOKENS, options["max_new_tokens"]))
    return _outputs(setting, generate, decoding_batches(cfg, tokenizer, setting.check_inputs), options)


def _decode(
    phase: str,
    setting: Setting,
    cfg: DictConfig,
    tokenizer: Any,
    generate: Callable[..., torch.Tensor],
) -> dict[str, Any]:
    """Greedy outputs of the check inputs (untimed), then the configured beam search over all inputs (timed); with
    a profile folder, the first batch's first decoding steps once more under the profiler."""
    greedy = _greedy(setting, cfg, tokenizer, generate)
    options = generation_settings(cfg, tokenizer)
    batches = decoding_batches(cfg, tokenizer, setting.inputs)
    with measured(setting.device) as stats:
        outputs = _outputs(setting, generate, batches, options)
    tokens = sum(len(output) for output in outputs)
    return {
        **stats,
        **_profile(setting, phase, lambda: _outputs(setting, generate, batches[:1], _profiled_steps(options))),
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


PROFILED_STEPS = 10  # decoding steps profiled: a whole batch's trace runs to hundreds of MB


def _profiled_steps(options: dict[str, Any]) -> dict[str, Any]:
    """The decoding options cut to the first ``PROFILED_STEPS`` new tokens."""
    steps = min(PROFILED_STEPS, options.get("max_new_tokens") or PROFILED_STEPS)
    return {**options, "max_new_tokens": steps, "min_new_tokens": min(steps, options.get("min_new_tokens") or 0)}


def generate_ours(setting: Setting) -> dict[str, Any]:
    """Our exported prefix on the frozen LM: ``PrefixModel.generate``."""
    cfg = _start(setting, frozen_in_compute_dtype=True)
    lm, tokenizer = _backbone(cfg, setting.device)
    model = PrefixModel.from_prefix(lm, _prefix_dir(setting)).to(setting.device).eval()
    return _decode("generate_ours", setting, cfg, tokenizer, model.generate)


def generate_peft(setting: Setting) -> dict[str, Any]:
    """The same prefix values as PEFT loads them from the export's PEFT files (inference layout: its MLP dropped, as
    PEFT saves it), decoded through ``peft_generate``; the bare LM's greedy outputs come along to show that the
    prefix is used."""
    cfg = _start(setting, frozen_in_compute_dtype=True)  # PEFT's frozen LM stored as ours is
    lm, tokenizer = _backbone(cfg, setting.device)
    model = PeftPrefixTuning.from_export(lm, _prefix_dir(setting)).lm.to(setting.device).eval()  # PEFT files
    result = _decode("generate_peft", setting, cfg, tokenizer, partial(peft_generate, model))
    result["bare_greedy"] = _greedy(setting, cfg, tokenizer, model.base_model.generate)
    return result


# -- mixed prefixes ----------------------------------------------------------------------------------------
MIXED = 4  # prefixes in a mixed batch


def _mixed_prefixes(bank: PrefixBank, setting: Setting) -> list[str]:
    """The prefix and the mixed ones given, then random prefixes of the first one's length and scale up to
    ``MIXED`` (decoding time does not depend on the values, and fixed-length decoding not on the outputs)."""
    folders = [_prefix_dir(setting), *setting.mixed_prefix_dirs][:MIXED]
    names = [f"prefix{index}" for index in range(len(folders))]
    for name, folder in zip(names, folders, strict=True):
        bank.add(name, folder)
    first = bank.held(names[0])
    generator = torch.Generator().manual_seed(0)
    while len(names) < MIXED:
        blocks = [torch.randn(block.shape, generator=generator) * block.std() for block in first.site_blocks()]
        names.append(f"random{len(names)}")
        bank.hold(names[-1], StoredPrefix(first.config, [block.to(setting.device) for block in blocks]))
    return names


def _decoded(bank: PrefixBank, batch: Batch, names: list[str], options: dict[str, Any]) -> list[list[int]]:
    """Each row's new tokens (padding dropped), the row reading the prefix named at its index."""
    output = bank.generate(**batch, prefixes=names, **options)[:, batch["input_ids"].shape[1] :]
    return [[token for token in row.tolist() if token != options["pad_token_id"]] for row in output]


def generate_mixed(setting: Setting) -> dict[str, Any]:
    """A batch whose rows read ``MIXED`` different prefixes (row i the (i mod 4)-th) against the same inputs in a
    batch of one prefix (each batch the next prefix in turn), and against the 4 batches of one prefix each that its
    rows make, run one after the other (each cut to its own width): ``PrefixBank.generate`` with the configured
    beam search, the three timed batch by batch in turn, so that a busy machine slows them alike; with a profile
    folder, the first mixed batch's first decoding steps once more under the profiler.

    With ``fixed_new_tokens`` every input decodes exactly that many tokens (the search never stops early), so
    that the three do the same steps whatever the prefixes make of the inputs.
    """
    cfg = _start(setting, frozen_in_compute_dtype=True)
    lm, tokenizer = _backbone(cfg, setting.device)
    bank = PrefixBank(lm).eval()
    names = _mixed_prefixes(bank, setting)
    options = generation_settings(cfg, tokenizer)
    if setting.fixed_new_tokens:
        options |= {"min_new_tokens": setting.fixed_new_tokens, "max_new_tokens": setting.fixed_new_tokens}
    batches = [_to(batch, setting.device) for batch in decoding_batches(cfg, tokenizer, setting.inputs)]
    warmup = {key: value[:1] for key, value in batches[0].items()}  # packs the frozen weights once, untimed
    bank.generate(**warmup, prefixes=names[:1], **{**options, "min_new_tokens": 0, "max_new_tokens": 2})
    kinds = ("mixed", "single", "sequential")
    totals = {kind: {"seconds": 0.0, "cpu_seconds": 0.0, "peak_memory_mb": 0.0} for kind in kinds}
    outputs: dict[str, list[list[int]]] = {kind: [] for kind in kinds}

    def timed(kind: str, run: Callable[[], list[list[int]]]) -> None:
        with measured(setting.device) as stats:
            new = run()
        outputs[kind] += new
        for key in ("seconds", "cpu_seconds"):
            totals[kind][key] += stats[key]
        totals[kind]["peak_memory_mb"] = max(totals[kind]["peak_memory_mb"], stats["peak_memory_mb"])

    for index, batch in enumerate(batches):
        rows = batch["input_ids"].shape[0]
        mixed = [names[row % MIXED] for row in range(rows)]
        timed("mixed", partial(_decoded, bank, batch, mixed, options))
        timed("single", partial(_decoded, bank, batch, [names[index % MIXED]] * rows, options))
        timed("sequential", partial(_one_prefix_batches, bank, batch, mixed, options))
    tokens = {kind: sum(len(output) for output in outputs[kind]) for kind in kinds}
    mixed_time, cpu = totals["mixed"]["seconds"], totals["mixed"]["cpu_seconds"]
    ratios = [
        _ratio("mixed batch vs a one-prefix batch (time)", totals, "single", "<= 1.15", 1.15),
        _ratio("mixed batch vs its 4 one-prefix batches (time)", totals, "sequential", "< 1", 1.0),
    ]
    first_mixed = [names[row % MIXED] for row in range(batches[0]["input_ids"].shape[0])]
    return {
        **totals["mixed"],
        **_profile(
            setting, "generate_mixed", partial(_decoded, bank, batches[0], first_mixed, _profiled_steps(options))
        ),
        "frozen_lm": frozen_lm(cfg),
        "inputs": len(outputs["mixed"]),
        "num_beams": options.get("num_beams", 1),
        "fixed_new_tokens": setting.fixed_new_tokens,
        "prefix_lengths": {name: bank.held(name).config.length for name in names},
        "tokens": tokens["mixed"],
        "tokens_per_s": tokens["mixed"] / mixed_time,
        "tokens_per_cpu_s": tokens["mixed"] / cpu,
        "single": {**totals["single"], "tokens": tokens["single"]},
        "sequential": {**totals["sequential"], "tokens": tokens["sequential"]},
        "ratios": ratios,
        "outputs_identical_to_one_prefix_batches": outputs["mixed"] == outputs["sequential"],
        "texts": tokenizer.batch_decode(outputs["mixed"], skip_special_tokens=True),
    }


def _one_prefix_batches(bank: PrefixBank, batch: Batch, names: list[str], options: dict[str, Any]) -> list[list[int]]:
    """The rows of ``batch`` as one batch per prefix (each cut to its own widest row), in row order again."""
    new: dict[int, list[int]] = {}
    for name in dict.fromkeys(names):
        rows = torch.tensor([row for row, own in enumerate(names) if own == name], device=batch["input_ids"].device)
        mask = batch["attention_mask"][rows]
        start = int(mask.any(0).long().argmax())  # left padding that every row of this batch has
        part = {"input_ids": batch["input_ids"][rows, start:], "attention_mask": mask[:, start:]}
        new |= dict(zip(rows.tolist(), _decoded(bank, part, [name] * len(rows), options), strict=True))
    return [new[row] for row in range(len(names))]


def _ratio(name: str, totals: dict[str, dict[str, float]], baseline: str, target: str, bound: float) -> dict:
    value = totals["mixed"]["seconds"] / totals[baseline]["seconds"]
    met = value <= bound if target.startswith("<=") else value < bound
    by_cpu = totals["mixed"]["cpu_seconds"] / totals[baseline]["cpu_seconds"]
    return {"name": name, "value": value, "target": target, "met": met, "by_cpu_time": by_cpu}
