"""Side by side on one model, one data set and the same batches: our prefix training against PEFT's prefix tuning
and full fine-tuning, our beam-search decoding against PEFT's, and a batch mixing 4 prefixes against one-prefix
batches; tokens/s, peak memory, and the ratios that the project aims for. Run it with
``python -m prefix_lightning.benchmark`` (``--help`` for the options).

Each phase runs in a fresh process (spawned), one after the other, so that peak memories do not mix and a phase
does not run on memory another one left fragmented.
"""

from __future__ import annotations

import json
import multiprocessing
import tempfile
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from prefix_lightning.benchmark import phases
from prefix_lightning.benchmark.phases import Setting

PHASES: dict[str, Callable[[Setting], dict[str, Any]]] = {
    "train_ours": phases.train_ours,
    "train_peft": phases.train_peft,
    "train_full": phases.train_full,
    "generate_ours": phases.generate_ours,
    "generate_peft": phases.generate_peft,
    "generate_mixed": phases.generate_mixed,
}


@dataclass(frozen=True)
class Target:
    """A ratio of ours to a baseline that the project aims for (issue: SmolLM2-135M, E2E, batch 10, 2 CPU cores)."""

    name: str
    ours: str
    baseline: str
    metric: str
    at_least: float | None = None
    at_most: float | None = None

    def check(self, ratio: float) -> bool:
        return (self.at_least is None or ratio >= self.at_least) and (self.at_most is None or ratio <= self.at_most)

    def bound(self) -> str:
        return f">= {self.at_least}" if self.at_least is not None else f"<= {self.at_most}"


TARGETS = (
    Target("training tokens/s vs PEFT prefix tuning", "train_ours", "train_peft", "tokens_per_s", at_least=1.3),
    Target("training tokens/s vs full fine-tuning", "train_ours", "train_full", "tokens_per_s", at_least=1.75),
    Target("training peak memory vs PEFT prefix tuning", "train_ours", "train_peft", "peak_memory_mb", at_most=0.9),
    Target("training peak memory vs full fine-tuning", "train_ours", "train_full", "peak_memory_mb", at_most=0.55),
    Target("beam-search tokens/s vs PEFT", "generate_ours", "generate_peft", "tokens_per_s", at_least=1.5),
)


def _run_alone(phase: str, setting: Setting) -> dict[str, Any]:
    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(PHASES[phase], setting).result()


def _ratios(results: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Each target whose two phases ran; speeds also by CPU time, which a busy machine disturbs less."""
    ratios = []
    for target in TARGETS:
        if target.ours in results and target.baseline in results:
            ours, baseline = results[target.ours], results[target.baseline]
            value = ours[target.metric] / baseline[target.metric]
            entry = {"name": target.name, "value": value, "target": target.bound(), "met": target.check(value)}
            if target.metric == "tokens_per_s":
                entry["by_cpu_time"] = ours["tokens_per_cpu_s"] / baseline["tokens_per_cpu_s"]
            ratios.append(entry)
    return ratios + results.get("generate_mixed", {}).get("ratios", [])


def _checks(results: dict[str, dict[str, Any]]) -> dict[str, bool]:
    """Both decoders hold the same prefix values, so they must decode alike; PEFT's prefix must matter; mixed
    batches decode every row as its prefix alone does."""
    checks: dict[str, bool] = {}
    if {"generate_ours", "generate_peft"} <= results.keys():
        ours, peft = results["generate_ours"], results["generate_peft"]
        checks |= {
            "greedy outputs identical (ours, PEFT)": ours["greedy"] == peft["greedy"],
            "PEFT's greedy outputs differ from the bare LM's": peft["greedy"] != peft["bare_greedy"],
            "beam-search outputs identical (ours, PEFT)": ours["outputs"] == peft["outputs"],
        }
    if "generate_mixed" in results:
        same = results["generate_mixed"]["outputs_identical_to_one_prefix_batches"]
        checks["mixed-prefix batches decode as one-prefix batches"] = same
    return checks


def run_benchmark(
    setting: Setting, names: tuple[str, ...] = tuple(PHASES), report: Callable[[str], None] = print
) -> dict[str, Any]:
    """Run the phases ``names`` in order, each in a fresh process; return results, ratios and checks.

    Without ``setting.prefix_dir``, decoding uses the prefix that ``train_ours`` ends with (it must run first).
    """
    unknown = set(names) - PHASES.keys()
    if unknown:
        raise ValueError(f"unknown phases {sorted(unknown)}; choose from {list(PHASES)}")
    cfg = phases.compose_config("train", setting.overrides)
    if cfg.method.name != "prefix":
        raise ValueError(
            f"method={cfg.method.name}: the benchmark measures our prefix tuning (method=prefix) against PEFT's "
            "prefix tuning and full fine-tuning; leave method= out"
        )
    quantization = cfg.model.backbone.get("quantization")
    if quantization and "train_full" in names:
        raise ValueError(
            f"phase train_full trains the LM's own weights, which cannot train quantized "
            f"(model.backbone.quantization={quantization}): leave it out of --phases"
        )
    decodes = [name for name in names if name in ("generate_ours", "generate_peft", "generate_mixed")]
    trained_first = "train_ours" in names and names.index("train_ours") < names.index(decodes[0]) if decodes else True
    if not (setting.prefix_dir or trained_first):
        raise ValueError(f"{decodes[0]} decodes with a prefix: give one (--prefix) or run train_ours before it")
    results: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="benchmark-prefix-") as scratch:
        export = replace(setting, prefix_dir=str(Path(scratch) / "prefix"))
        for name in names:
            own_prefix = name == "train_ours" or not setting.prefix_dir
            results[name] = _run_alone(name, export if own_prefix else setting)
            report(_headline(name, results[name]))
    return {"setting": asdict(setting), "results": results, "ratios": _ratios(results), "checks": _checks(results)}


def _headline(name: str, result: dict[str, Any]) -> str:
    return (
        f"{name}: {result['tokens_per_s']:.1f} tokens/s ({result['tokens_per_cpu_s']:.1f} per CPU-second), "
        f"peak {result['peak_memory_mb']:.0f} MB, {result['seconds']:.1f} s measured"
        + (f", MFU {result['mfu']:.1%}" if result.get("mfu") is not None else "")
    )


def format_report(benchmark: dict[str, Any]) -> str:
    """The results table, the ratios against the targets, and the decoding checks, as plain text."""
    header = f"{'phase':<15}{'frozen LM':>10}{'tokens/s':>10}{'tokens/CPU-s':>14}{'peak MB':>10}{'seconds':>9}"
    lines = [f"{header}{'MFU':>7}  what"]
    for name, result in benchmark["results"].items():
        what = f"{result['steps']} steps" if "steps" in result else f"{result['inputs']} inputs"
        utilization = f"{result['mfu']:.1%}" if result.get("mfu") is not None else "-"
        lines.append(
            f"{name:<15}{result['frozen_lm']:>10}{result['tokens_per_s']:>10.1f}{result['tokens_per_cpu_s']:>14.1f}"
            f"{result['peak_memory_mb']:>10.0f}{result['seconds']:>9.1f}{utilization:>7}  {what}"
        )
        if "profile" in result:
            profile = result["profile"]
            syncs = f"; {profile['syncs']} host-device syncs" if "syncs" in profile else ""
            lines.append(f"{'':<15}profile: {profile['table']}{syncs}")
    if benchmark["ratios"]:
        lines += ["", f"{'ours / baseline':<46}{'ratio':>7}{'by CPU time':>13}  target   met"]
        for ratio in benchmark["ratios"]:
            cpu = f"{ratio['by_cpu_time']:.2f}" if "by_cpu_time" in ratio else ""
            met = "yes" if ratio["met"] else "NO"
            lines.append(f"{ratio['name']:<46}{ratio['value']:>7.2f}{cpu:>13}  {ratio['target']:<8} {met}")
    if benchmark["checks"]:
        lines.append("")
        lines += [f"{name}: {'yes' if passed else 'NO'}" for name, passed in benchmark["checks"].items()]
    return "\n".join(lines)


def write_json(benchmark: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(benchmark, indent=2) + "\n")


__all__ = ["PHASES", "TARGETS", "Setting", "format_report", "run_benchmark", "write_json"]
