"""Decode new inputs with one or several exported prefixes on their frozen LM, no references needed.

    python -m prefix_lightning.generate --prefix e2e=runs/a/prefix --prefix webnlg=runs/b/prefix \\
        --input inputs.jsonl --output outputs.jsonl [generation.num_beams=3 model=smollm2_135m ...]

Input: JSONL, one object per line with ``source`` and optionally ``prefix`` (a name given with --prefix; null for
the plain LM; may be left out when one prefix is loaded); or plain text, one source per line, with one prefix.
``-`` reads stdin / writes stdout. Output: JSONL, each input's fields plus ``prefix`` and ``generation``, in input
order (plain text, one generation per line, for an output file ending in ``.txt`` or with ``--output-format
text``). Inputs are checked before anything loads (a bad line is named by its number); outputs are written and
flushed batch by batch, so a stopped run keeps every finished batch. Rows of a batch may read different prefixes
(``PrefixBank``; an infix, which only the target reads, decodes alone). A prefix still in the folder of the run that
exported it is decoded as that run built its prompts and decoded its test: its separator and end marker, its source
budget (``data.max_source_tokens``), its ``generation`` settings, unless given here.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import torch
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from prefix_lightning.cli import device_option, positive_int, report_errors
from prefix_lightning.data import EncodedPrompt, Group, TextToTextCollator
from prefix_lightning.data.files import read_text
from prefix_lightning.decoding import generated_texts
from prefix_lightning.prefix import PrefixBank, PrefixModel, read_prefix
from prefix_lightning.prefix.export import ExportedPrefix
from prefix_lightning.prefix.multitask import task_folders
from prefix_lightning.training.build import fitted_source_budget, generation_settings, load_configured_backbone
from prefix_lightning.training.checks import check_decoding_options
from prefix_lightning.training.compose import compose_config, model_config_for
from prefix_lightning.training.resume import (
    exporting_run,
    override_key,
    run_config,
    run_export,
    run_model_overrides,
)

FORMATS = ("auto", "jsonl", "text")
# What a prefix still in its run folder takes from its run, unless given.
ADOPTED = ("model.separator", "model.target_end", "generation")
SOURCE_BUDGET = "data.max_source_tokens"
TARGET_BUDGET = "data.max_target_tokens"


@dataclass(frozen=True)
class Request:
    """One input line: its number (for messages), its source, the prefix it reads, and its other fields."""

    line: int
    source: str
    prefix: str | None
    fields: dict[str, Any] = field(default_factory=dict)


def parse_prefixes(specs: Sequence[str]) -> dict[str, Path]:
    """``NAME=FOLDER`` (or ``FOLDER``, named by its last component) -> {name: folder}; each folder is read now. A
    folder's path may hold ``=`` (sweep job folders do): a NAME is what comes before the first ``=``, if no ``/``."""
    prefixes: dict[str, Path] = {}
    for spec in specs:
        name, named, folder = spec.partition("=")
        if not named or "/" in name or Path(spec).is_dir():
            name, folder = "", spec
        name = name or Path(folder).name
        if name in prefixes:
            raise ValueError(f"--prefix {spec}: the name {name!r} is given twice")
        export = run_export(folder)  # a run's folder: the export it holds
        tasks = task_folders(export)
        if tasks:  # read_prefix would only say that the folder holds no prefix_config.json
            each = " ".join(f"--prefix {task.name}={task}" for task in tasks)
            raise ValueError(f"--prefix {spec} holds a multi-task run's prefixes, one per task: give each ({each})")
        read_prefix(export)  # a missing or foreign folder is named before anything else runs
        prefixes[name] = export
    return prefixes


def read_requests(stream: TextIO, form: str, prefixes: Sequence[str], where: str) -> list[Request]:
    """Every input line, checked: JSON, a non-empty ``source`` string, a known ``prefix``."""
    if form not in FORMATS:
        raise ValueError(f"--format must be one of {', '.join(FORMATS)}, got {form!r}")
    # Split at line ends only (text mode has made "\r\n" one): splitlines() also splits at U+2028, form feeds, ...,
    # which a JSON string or a source may hold. Without the byte-order mark some editors write.
    lines = stream.read().removeprefix("\ufeff").split("\n")
    while lines and not lines[-1].strip():  # blank lines at the end, as editors leave them
        lines.pop()
    if form == "auto":
        first = next((line for line in lines if line.strip()), "")
        form = "jsonl" if first.lstrip().startswith("{") else "text"
    if form == "text" and len(prefixes) > 1:
        raise ValueError(
            f"{where} is plain text, one source per line: it reads one prefix, but {len(prefixes)} are given "
            f'({", ".join(prefixes)}); use JSONL with a "prefix" per line'
        )
    default = prefixes[0] if len(prefixes) == 1 else None
    requests = []
    for number, line in enumerate(lines, start=1):
        if form == "text":
            if not line.strip():
                raise ValueError(f"{where}, line {number}: empty source (plain text holds one source per line)")
            requests.append(Request(number, line.strip(), default))
        elif line.strip():
            requests.append(_json_request(line, number, prefixes, where))
    if not requests:
        raise ValueError(f"{where} holds no input")
    return requests


def _json_request(line: str, number: int, prefixes: Sequence[str], where: str) -> Request:
    try:
        fields = json.loads(line)
    except json.JSONDecodeError as error:
        raise ValueError(f"{where}, line {number}: not JSON ({error.msg})") from error
    if not isinstance(fields, dict):
        raise ValueError(f'{where}, line {number}: expected a JSON object with a "source"')
    source = fields.get("source")
    if not isinstance(source, str) or not source.strip():
        raise ValueError(f'{where}, line {number}: "source" must be a non-empty string')
    if "prefix" in fields:
        prefix = fields["prefix"]
        if prefix is not None and prefix not in prefixes:
            known = ", ".join(prefixes) or "none"
            raise ValueError(f"{where}, line {number}: unknown prefix {prefix!r} (given with --prefix: {known})")
    elif len(prefixes) == 1:
        prefix = prefixes[0]
    else:
        raise ValueError(
            f'{where}, line {number}: no "prefix", and {len(prefixes)} prefixes are given '
            f"({', '.join(prefixes) or 'none'}): say which (null for the plain LM)"
        )
    return Request(number, source.strip(), prefix, fields)


def compose(prefixes: dict[str, Path], overrides: Sequence[str], runs: dict[str, Path]) -> DictConfig:
    """The generate config; its model, unless given: the one the runs that exported every prefix chose (a random or
    Hub model as configured there), else the model config whose backbone the prefixes record."""
    if "model" in map(override_key, overrides):
        return compose_config("generate", overrides)
    chosen = {tuple(run_model_overrides(run)) for run in runs.values()}
    if len(runs) == len(prefixes) and len(chosen) == 1 and () not in chosen:
        return compose_config("generate", [*chosen.pop(), *overrides])
    return compose_config("generate", [f"model={model_config_for(prefixes.values())}", *overrides])


def exporting_runs(prefixes: dict[str, Path]) -> dict[str, Path]:
    """The run folder of each prefix still in it."""
    runs = {}
    for name, folder in prefixes.items():
        exported_by = exporting_run(folder)
        if exported_by:
            runs[name], _ = exported_by
            print(f"{name}: prompts built and decoded as the run in {runs[name]} did", file=sys.stderr)
    return runs


def adopt_run_settings(cfg: DictConfig, trained: dict[str, DictConfig], given: set[str]) -> None:
    """Prompts built and decoded as the prefixes' runs built and decoded their tests (an XSum run's beam 6 and
    length penalty, not table-to-text's defaults): their separator, end marker and ``generation`` settings, unless
    given; a ``generation.<option>`` given keeps the rest of the runs' settings."""
    for key in ADOPTED:
        values = {name: _plain(config, key) for name, config in trained.items() if _plain(config, key) is not None}
        if key in given or not values:
            continue
        if len({json.dumps(value, sort_keys=True) for value in values.values()}) > 1:
            raise ValueError(
                f"the prefixes' runs used different {key} ({values}): decode them in separate calls, or give {key}=..."
            )
        adopted = next(iter(values.values()))
        if isinstance(adopted, dict):
            own = _plain(cfg, key)
            for option in (given_key.removeprefix(f"{key}.") for given_key in given if given_key.startswith(f"{key}.")):
                if option in own:
                    adopted[option] = own[option]
                else:
                    adopted.pop(option, None)  # removed with ~
        OmegaConf.update(cfg, key, adopted, merge=False)


def _plain(config: DictConfig, key: str) -> Any:
    value = OmegaConf.select(config, key)
    return OmegaConf.to_container(value, resolve=True) if isinstance(value, DictConfig) else value


def prompt_collators(
    cfg: DictConfig,
    lm: PreTrainedModel,
    virtual_positions: dict[str, int],
    tokenizer: PreTrainedTokenizerBase,
    trained: dict[str, DictConfig],
    given: set[str],
) -> dict[str | None, TextToTextCollator]:
    """For each prefix name (None: the plain LM) the collator that cuts sources as its run cut them: to the run's
    ``data.max_source_tokens`` (unless given here), within what the model's positions leave beside that prefix's
    own virtual tokens and the longer of the run's target budget and the tokens decoded here."""
    settings: dict[str | None, tuple[int, int, int]] = {}  # virtual tokens, wanted source tokens, target tokens
    for name in [None, *virtual_positions]:
        run = trained.get(name) if name is not None else None
        wanted, target = cfg.data.max_source_tokens, cfg.data.max_target_tokens
        if run is not None and SOURCE_BUDGET not in given:
            wanted = OmegaConf.select(run, SOURCE_BUDGET, default=wanted)
        if run is not None and TARGET_BUDGET not in given:
            target = OmegaConf.select(run, TARGET_BUDGET, default=target)
        virtual = 0 if name is None else virtual_positions[name]
        settings[name] = (virtual, wanted, max(target, cfg.generation.max_new_tokens or 0))
    budgets = {setting: fitted_source_budget(lm.config, *setting) for setting in set(settings.values())}
    made = {
        budget: TextToTextCollator(
            tokenizer,
            cfg.model.separator,
            cfg.model.target_end,
            bool(lm.config.is_encoder_decoder),
            max_source_tokens=budget,
            max_target_tokens=max(cfg.data.max_target_tokens, 2),
        )
        for budget in set(budgets.values())
    }
    return {name: made[budgets[setting]] for name, setting in settings.items()}


def batches(requests: list[Request], size: int) -> Iterator[list[Request]]:
    for start in range(0, len(requests), size):
        yield requests[start : start + size]


def encode(collators: dict[str | None, TextToTextCollator], requests: list[Request]) -> list[EncodedPrompt]:
    """Each request's prompt, made by the collator of the prefix it reads."""
    rows: dict[TextToTextCollator, list[int]] = {}
    for index, request in enumerate(requests):
        rows.setdefault(collators[request.prefix], []).append(index)
    prompts: dict[int, EncodedPrompt] = {}
    for collator, indices in rows.items():
        groups = [Group(requests[i].line, requests[i].source, [], "") for i in indices]
        prompts.update(zip(indices, collator.encode_prompts(groups, "inputs"), strict=True))
    return [prompts[index] for index in range(len(requests))]


def decode(
    decoder: PrefixBank | PrefixModel,
    tokenizer: PreTrainedTokenizerBase,
    collators: dict[str | None, TextToTextCollator],
    requests: list[Request],
    settings: dict[str, Any],
) -> list[str]:
    """The generations of one batch (rows may read different prefixes)."""
    batch = collators[None].generation_batch(encode(collators, requests))
    device = next(decoder.lm.parameters()).device
    inputs = {"input_ids": batch["input_ids"].to(device), "attention_mask": batch["attention_mask"].to(device)}
    if isinstance(decoder, PrefixBank):
        output = decoder.generate(**inputs, prefixes=[request.prefix for request in requests], **settings)
    else:
        output = decoder.generate(**inputs, **settings)
    return generated_texts(output, inputs["input_ids"].shape[1], decoder.lm, tokenizer)


def check_infix_alone(kinds: dict[str, str], requests: list[Request]) -> None:
    """Only the target reads an infix, so its rows cannot share a batch with rows of other prefixes (a bank holds
    none): an infix decodes alone, before anything loads."""
    infixes = [name for name, kind in kinds.items() if kind == "infix"]
    if infixes and (len(kinds) > 1 or any(request.prefix is None for request in requests)):
        raise ValueError(
            f"--prefix {infixes[0]} is an infix, which only the target reads: it decodes alone, not in batches with "
            "other prefixes or the plain LM (prefix null): run generate once for it"
        )


def load_decoder(lm: PreTrainedModel, exported: dict[str, ExportedPrefix]) -> PrefixBank | PrefixModel:
    """The prefixes on ``lm``: a bank, whose batches mix them, or an infix's own ``PrefixModel``."""
    first, *others = exported.values()
    if not others and first.config.kind == "infix":
        return PrefixModel.from_prefix(lm, first.folder).eval()
    bank = PrefixBank(lm).eval()
    for name, prefix in exported.items():
        bank.add(name, prefix.folder)
    return bank


@contextmanager
def opened(path: str, mode: str) -> Iterator[TextIO]:
    if path == "-":
        yield sys.stdin if mode == "r" else sys.stdout
        return
    if mode == "r":  # as data files are read: UTF-16 too (PowerShell's `>`), bad bytes named by file and line
        yield io.StringIO(read_text(Path(path)), newline=None)  # newline=None: "\r\n" made "\n", as open() does
        return
    with open(path, mode, encoding="utf-8") as file:
        yield file  # type: ignore[misc]  # open() in text mode returns a TextIOWrapper, typed as IO[Any] here


def run(args: argparse.Namespace) -> int:
    prefixes = parse_prefixes(args.prefix)
    where = "stdin" if args.input == "-" else args.input
    with opened(args.input, "r") as stream:
        requests = read_requests(stream, args.format, list(prefixes), where)
    runs = exporting_runs(prefixes)
    cfg = compose(prefixes, args.overrides, runs)
    trained = {name: run_config(run) for name, run in runs.items()}
    given = set(map(override_key, args.overrides))
    adopt_run_settings(cfg, trained, given)
    if cfg.generation.get("max_new_tokens") is None and TARGET_BUDGET not in given:
        cfg.data.max_target_tokens = cfg.generation.get("max_length")  # then it bounds the output (a check says so)
    check_decoding_options(cfg)
    exported = {name: read_prefix(folder) for name, folder in prefixes.items()}
    check_infix_alone({name: prefix.config.kind for name, prefix in exported.items()}, requests)
    if args.output != "-":  # before the model loads
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    if args.threads:
        torch.set_num_threads(args.threads)
    lm, tokenizer = load_configured_backbone(cfg)
    decoder = load_decoder(lm.to(args.device), exported)
    settings = generation_settings(cfg, tokenizer)
    virtual_positions = {name: prefix.config.virtual_positions for name, prefix in exported.items()}
    collators = prompt_collators(cfg, decoder.lm, virtual_positions, tokenizer, trained, given)
    torch.manual_seed(cfg.seed)  # sampled decoding: the same seed, the same outputs
    text_output = args.output_format == "text" or (args.output_format == "auto" and args.output.endswith(".txt"))
    with opened(args.output, "w") as out:
        for chunk in tqdm(list(batches(requests, args.batch_size)), desc="generate", unit="batch", file=sys.stderr):
            for request, text in zip(chunk, decode(decoder, tokenizer, collators, chunk, settings), strict=True):
                if text_output:
                    out.write(" ".join(text.splitlines()) + "\n")
                else:
                    record = {**request.fields, "source": request.source, "prefix": request.prefix, "generation": text}
                    out.write(json.dumps(record, ensure_ascii=False) + "\n")
            out.flush()
    return 0


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m prefix_lightning.generate",
        description="Decode new inputs with exported prefixes (several may share one batch); no references needed.",
        epilog="Overrides choose the decoding (generation=summarization, generation.num_beams=3, ...) and the model "
        "config (model=<name>; by default the one whose backbone the prefixes record), as for run.py.",
    )
    parser.add_argument(
        "--prefix",
        action="append",
        default=[],
        metavar="NAME=FOLDER",
        help="an exported prefix folder and the name input lines use for it (repeat for several; FOLDER alone is "
        "named by its last component)",
    )
    parser.add_argument("--input", required=True, help="JSONL (source, prefix) or text (a source per line); -: stdin")
    parser.add_argument("--output", required=True, help="where the generations go; -: stdout")
    parser.add_argument("--format", choices=FORMATS, default="auto", help="of --input; auto: JSONL if it opens with {")
    parser.add_argument(
        "--output-format",
        choices=FORMATS,
        default="auto",
        help="JSONL (each input's fields plus its generation) or text (one generation per line); auto: text for "
        "an --output ending in .txt",
    )
    parser.add_argument("--batch-size", type=positive_int, default=10, help="inputs decoded together (default 10)")
    parser.add_argument("--device", type=device_option, default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=positive_int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides: generation.*, model=..., paths.*")
    args = parser.parse_intermixed_args(argv)  # options may follow the overrides
    if not args.prefix:
        parser.error("give at least one --prefix NAME=FOLDER")
    if "-" not in (args.input, args.output) and Path(args.input).resolve() == Path(args.output).resolve():
        parser.error(f"--output {args.output} is the --input file: the outputs would overwrite the inputs")
    if args.output != "-" and Path(args.output).is_dir():  # found now, not once the model has loaded
        parser.error(f"--output {args.output} is a folder: give the file to write the generations to")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    return report_errors(lambda: run(parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
