"""Beam search for decoder-only LMs that stops computing an input as soon as its search is over.

transformers' beam search runs every input's beams until the last input of the batch is done: on data whose
outputs vary a lot in length (E2E), most steps are spent on inputs whose result can no longer change. This one
follows transformers' rules step by step (top-k continuations, stopping criteria, length penalty, the
``early_stopping`` done test), so that it returns the same sequences, but drops an input's rows from the running
batch, its cache and its mask once transformers' done test says its finished hypotheses are final. The prompt is
run once per input, not once per beam: the beams of an input are identical until the first token is chosen. On
CUDA, where a step's time is the host's, the steps after the first are replayed from a CUDA graph instead, every
row kept (see :mod:`prefix_lightning.decoding.steps`).

Only the options that the project's generation configs use are supported (:func:`beam_search_options` says
whether a ``generate`` call is one of those); anything else goes through transformers' ``generate``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager, ExitStack
from dataclasses import dataclass, fields
from typing import Any

import torch
from torch import nn
from transformers import (
    GenerationConfig,
    LogitsProcessorList,
    MinNewTokensLengthLogitsProcessor,
    NoBadWordsLogitsProcessor,
    NoRepeatNGramLogitsProcessor,
    PreTrainedModel,
)
from transformers.cache_utils import Cache, DynamicLayer

from prefix_lightning.decoding.masks import generation_mask, positions_from_mask, token_ids
from prefix_lightning.decoding.steps import Forward, GrowingSteps, StaticSteps, static_steps_pay

# transformers' mark for a score that must not be chosen (added, not assigned, exactly as its beam search does).
_HIDDEN = -1.0e9

# generate() options this search implements, with the value generate gives them when they are unset.
_SUPPORTED = {
    "num_beams": 1,
    "max_new_tokens": None,
    "min_new_tokens": 0,
    "length_penalty": 1.0,
    "early_stopping": False,
    "no_repeat_ngram_size": 0,
    "bad_words_ids": None,
    "eos_token_id": None,
    "pad_token_id": None,
}
# Options that change nothing when they hold these values (or None); any other value needs transformers.
_NEUTRAL: dict[str, tuple[Any, ...]] = {
    "num_return_sequences": (1,),
    "do_sample": (False,),
    "use_cache": (True,),
    "min_length": (0,),
    "repetition_penalty": (1.0,),
    "encoder_repetition_penalty": (1.0,),
    "encoder_no_repeat_ngram_size": (0,),
    "num_beam_groups": (1,),
    "diversity_penalty": (0.0,),
    "remove_invalid_values": (False,),
    "renormalize_logits": (False,),
    "output_attentions": (False,),
    "output_hidden_states": (False,),
    "output_scores": (False,),
    "output_logits": (False,),
    "return_dict_in_generate": (False,),
    "is_assistant": (False,),
    "low_memory": (False,),
    "guidance_scale": (1.0,),
}
# Options with no effect on a decoder-only beam search without sampling or an assistant model: any value.
_IGNORED = {
    "max_length",  # max_new_tokens takes precedence (and is required here)
    "bos_token_id",
    "decoder_start_token_id",
    "transformers_version",
    "_from_model_config",
    "temperature",
    "top_k",
    "top_p",
    "min_p",
    "top_h",
    "typical_p",
    "epsilon_cutoff",
    "eta_cutoff",
    "num_assistant_tokens",
    "num_assistant_tokens_schedule",
    "assistant_confidence_threshold",
    "assistant_lookbehind",
    "target_lookbehind",
    "disable_compile",
    "compile_config",
}
_INPUTS = {"input_ids", "attention_mask", "generation_config"}


@dataclass(frozen=True)
class CachedPrefix:
    """Keys/values that every token attends to, put in front of each row's cache once the prompt is in it.

    A prefix that attention prepends on every call costs a copy of the whole cache per layer and step; held in
    the cache, it is copied only with the cache itself. ``decoding`` is entered for the steps after the prompt
    and must turn off the other route of the same keys/values into attention; ``shift`` is added to the new
    tokens' positions (where that route would have moved them).

    A batch that mixes prefixes gives each input its own: ``layers`` with a leading row dimension, ``columns``
    saying which of the (padded) prefix columns each input sees, ``shift`` per input; and, for a cache that
    cannot take the prefix (which then stays with attention), ``follow_rows`` to tell that route each reordering
    of the rows.
    """

    # cache layer -> keys and values stacked: (2, kv_heads, L, head_dim), or (inputs, 2, kv_heads, L, head_dim)
    layers: Mapping[int, torch.Tensor]
    shift: int | torch.Tensor  # or (inputs,)
    decoding: Callable[[], AbstractContextManager[Any]]
    columns: torch.Tensor | None = None  # (inputs, L) bool
    follow_rows: Callable[[torch.Tensor], None] | None = None

    @property
    def length(self) -> int:
        return next(iter(self.layers.values())).shape[-2]


def beam_search_options(lm: PreTrainedModel, kwargs: dict[str, Any]) -> dict[str, Any] | None:
    """The keyword arguments of :func:`beam_search` for this ``generate(**kwargs)`` call, or None where the call
    is not a plain decoder-only beam search with options this module follows exactly.

    The options are layered as ``generate`` layers them: call keywords over the given ``generation_config`` over
    the LM's own generation config, with transformers' defaults for what none of them sets.
    """
    if lm.config.is_encoder_decoder or kwargs.get("input_ids") is None or set(kwargs) - _INPUTS - _known_options():
        return None
    given = kwargs.get("generation_config")
    settings: dict[str, Any] = {}
    for source in (lm.generation_config, given):
        if source is not None:
            settings.update({key: value for key, value in source.to_dict().items() if value is not None})
    settings.update({key: value for key, value in kwargs.items() if key not in _INPUTS})
    for key, value in settings.items():
        if key in _SUPPORTED or key in _IGNORED or value is None:
            continue
        if key not in _NEUTRAL or value not in _NEUTRAL[key]:
            return None
    options: dict[str, Any] = {key: settings.get(key) for key in _SUPPORTED}
    options.update({key: default for key, default in _SUPPORTED.items() if options[key] is None})
    if (
        options["num_beams"] <= 1
        or not isinstance(options["max_new_tokens"], int)
        or options["max_new_tokens"] < 1
        or options["eos_token_id"] is None
        or options["early_stopping"] not in (True, False, "never")
    ):
        return None
    return {"input_ids": kwargs["input_ids"], "attention_mask": kwargs.get("attention_mask"), **options}


@functools.cache
def _known_options() -> frozenset[str]:
    return frozenset(GenerationConfig().to_dict())


@torch.no_grad()
def beam_search(
    lm: PreTrainedModel,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    num_beams: int,
    max_new_tokens: int,
    eos_token_id: int | Sequence[int],
    pad_token_id: int | None = None,
    length_penalty: float = 1.0,
    early_stopping: bool | str = False,
    bad_words_ids: list[list[int]] | None = None,
    no_repeat_ngram_size: int = 0,
    min_new_tokens: int = 0,
    cached_prefix: CachedPrefix | None = None,
    on_step: Callable[[int, int], None] | None = None,
    static: bool | None = None,
) -> torch.Tensor:
    """``lm.generate(num_beams=..., ...)``'s sequences (prompt + new tokens, padded after the end token, as wide
    as the prompt plus the longest output), computing only the inputs whose search is not over.

    ``cached_prefix`` moves a prefix into the cache after the prompt (see :class:`CachedPrefix`; it is left
    where it is for a cache whose layers cannot take it). ``on_step(step, rows)`` is told how many rows each
    step searched (step 0: the prompt, one row per input). ``static`` runs the steps after the prompt on every row
    the search started with, on a static cache, replayed from a CUDA graph on CUDA (:class:`StaticSteps`; by
    default where that pays: :func:`static_steps_pay`).
    """
    device = input_ids.device
    batch, width = input_ids.shape
    eos = token_ids(eos_token_id, device)
    if pad_token_id is None:
        pad_token_id = int(eos[0])
    if attention_mask is None:
        attention_mask = generation_mask(input_ids, pad_token_id, eos_token_id)
    # generate drops an all-ones mask (no padding anywhere) before its first forward; positions come from it.
    model_mask = None if bool((attention_mask == 1).all()) else attention_mask
    positions = positions_from_mask(attention_mask)
    forward = Forward(lm)
    rules = _Rules(
        width=width,
        max_new_tokens=max_new_tokens,
        eos=eos,
        length_penalty=length_penalty,
        early_stopping=early_stopping,
        processors=_processors(width, eos, bad_words_ids, no_repeat_ngram_size, min_new_tokens),
    )
    # transformers' filler for the positions after a hypothesis's end (a pad id of 0 reads as "none" there)
    search = _Search.start(input_ids, num_beams, width + max_new_tokens, pad_token_id or int(eos[0]))
    outputs = search.finished[:, 0].clone()
    output_lengths = torch.zeros(batch, dtype=torch.long, device=device)

    # The prompt, once per input.
    logits, cache = forward(input_ids, model_mask, positions, None)
    if on_step is not None:
        on_step(0, batch)
    with ExitStack() as stack:
        shift: int | torch.Tensor = 0
        follow_rows = cached_prefix.follow_rows if cached_prefix is not None else None
        if cached_prefix is not None and _put_in_front(cache, cached_prefix.layers):
            stack.enter_context(cached_prefix.decoding())
            shift, follow_rows = cached_prefix.shift, None
            model_mask = _with_prefix_columns(model_mask, attention_mask, cached_prefix)
        steps: GrowingSteps | StaticSteps = GrowingSteps(forward, cache, model_mask, num_beams, follow_rows)
        if static is None:
            static = static_steps_pay(lm, device)
        for step in range(max_new_tokens):
            rows = search.active.numel()
            if step == 0:  # one row per input: its beams would all compute the same log-probabilities
                log_probs = rules.log_probs(search.running[:, 0, :width], logits)[:, None].expand(-1, num_beams, -1)
            else:
                if step == 1 and static and isinstance(steps, GrowingSteps):  # the rows are beams from now on
                    steps = steps.static(batch, max_new_tokens, search.active) or steps
                tokens = search.running[:, :, width + step - 1].reshape(-1, 1)
                moved = shift[search.active, None] if isinstance(shift, torch.Tensor) else shift
                token_positions = (positions[search.active, -1:] + step + moved).repeat_interleave(num_beams, dim=0)
                logits = steps(tokens, token_positions, search.active, step)
                if on_step is not None:
                    on_step(step, rows * num_beams)
                sequences = search.running[:, :, : width + step].reshape(rows * num_beams, width + step)
                log_probs = rules.log_probs(sequences, logits).view(rows, num_beams, -1)
            search, sources, done = rules.advance(search, log_probs, step)

            if bool(done.any()):
                ended = search.active[done]
                outputs[ended] = search.finished[done, 0]
                output_lengths[ended] = search.finished_lengths[done, 0]
                if bool(done.all()):
                    break
                kept = (~done).nonzero()[:, 0]
                search, sources = search.select(kept), sources[kept]
            else:
                kept = torch.arange(rows, device=device)
            # The next step's cache rows: the beam each going beam extends, for the inputs still searched. Before
            # the first token the cache has one row per input.
            going = kept.repeat_interleave(num_beams) if step == 0 else (kept[:, None] * num_beams + sources).flatten()
            steps.reorder(going)
    return outputs[:, : width + int(output_lengths.max())]


@dataclass
class _Search:
    """The state of the inputs still searched: one row per input in every tensor, beams along dimension 1."""

    active: torch.Tensor  # (inputs,): their indices in the batch
    running: torch.Tensor  # (inputs, beams, max_length): the beams that go on, filler after their last token
    running_scores: torch.Tensor  # their summed log-probabilities
    finished: torch.Tensor  # the best ended hypotheses (or filler) ...
    finished_scores: torch.Tensor  # ... their length-penalized scores
    finished_lengths: torch.Tensor  # ... their new tokens
    is_finished: torch.Tensor

    @classmethod
    def start(cls, input_ids: torch.Tensor, beams: int, max_length: int, fill: int) -> _Search:
        batch, width = input_ids.shape
        device = input_ids.device
        running = torch.full((batch, beams, max_length), fill, dtype=torch.long, device=device)
        running[:, :, :width] = input_ids[:, None]
        running_scores = torch.zeros(batch, beams, dtype=torch.float32, device=device)
        running_scores[:, 1:] = _HIDDEN  # the beams start identical: only the first one's continuations count
        return cls(
            active=torch.arange(batch, device=device),
            running=running,
            running_scores=running_scores,
            finished=running.clone(),
            finished_scores=torch.full((batch, beams), _HIDDEN, dtype=torch.float32, device=device),
            finished_lengths=torch.zeros(batch, beams, dtype=torch.long, device=device),
            is_finished=torch.zeros(batch, beams, dtype=torch.bool, device=device),
        )

    def select(self, rows: torch.Tensor) -> _Search:
        return _Search(**{field.name: getattr(self, field.name)[rows] for field in fields(self)})


@dataclass
class _Rules:
    """transformers' beam search step, per input: ``_beam_search`` and the helpers it calls."""

    width: int
    max_new_tokens: int
    eos: torch.Tensor
    length_penalty: float
    early_stopping: bool | str
    processors: LogitsProcessorList

    def log_probs(self, sequences: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        # transformers annotates LongTensor, which no tensor operation returns statically.
        return self.processors(sequences, nn.functional.log_softmax(logits.float(), dim=-1))  # type: ignore[arg-type]

    def advance(
        self, search: _Search, log_probs: torch.Tensor, step: int
    ) -> tuple[_Search, torch.Tensor, torch.Tensor]:
        """The state after choosing the ``step``-th new token from ``log_probs`` (inputs, beams, vocabulary); the
        beam each going beam extends; which inputs are done (their finished hypotheses can no longer change)."""
        rows, beams, vocabulary = log_probs.shape
        length = self.width + step  # tokens before this one
        last = step + 1 >= self.max_new_tokens
        candidates = max(2, 1 + self.eos.numel()) * beams  # so that `beams` of them are left once some end

        # The best `candidates` continuations over all beams of each input.
        totals = (log_probs + search.running_scores[:, :, None]).reshape(rows, beams * vocabulary)
        scores, picked = torch.topk(totals, candidates)
        sources, tokens = picked // vocabulary, picked % vocabulary
        max_length = search.running.shape[-1]
        sequences = search.running.gather(1, sources[:, :, None].expand(-1, -1, max_length))
        sequences[:, :, length] = tokens
        ends = torch.isin(tokens, self.eos) | last

        # The best `beams` of them that go on (ended ones are pushed behind).
        going_scores = scores + ends.to(torch.float32) * _HIDDEN
        going = torch.topk(going_scores, beams)[1]
        running = sequences.gather(1, going[:, :, None].expand(-1, -1, max_length))
        running_scores = going_scores.gather(1, going)

        # Ended continuations among the top `beams` join the finished hypotheses if they beat them.
        just_finished = ends & (torch.arange(candidates, device=ends.device) < beams)
        penalized = scores / ((step + 1) ** self.length_penalty)
        penalized += (~just_finished) * _HIDDEN
        merged_scores = torch.cat([search.finished_scores, penalized], dim=1)
        best = torch.topk(merged_scores, beams)[1]
        finished_scores = merged_scores.gather(1, best)
        merged = torch.cat([search.finished, sequences], dim=1)
        finished = merged.gather(1, best[:, :, None].expand(-1, -1, max_length))
        lengths = torch.cat(
            [search.finished_lengths, search.finished_lengths.new_full((rows, candidates), step + 1)], 1
        )
        finished_lengths = lengths.gather(1, best)
        is_finished = torch.cat([search.is_finished, just_finished], dim=1).gather(1, best)

        # The done test: can the best running beam still beat the worst finished hypothesis?
        # (with "never" and a penalty that favours length, at the longest a running beam may still get)
        longest = self.early_stopping == "never" and self.length_penalty > 0.0
        hoped_length = self.max_new_tokens if longest else step + 1
        best_running = running_scores[:, :1] / (hoped_length**self.length_penalty)
        worst_finished = torch.where(is_finished, finished_scores.min(dim=1, keepdim=True)[0], _HIDDEN)
        # (an input leaves the search once done: none here is done yet)
        done = ~(best_running > worst_finished).any(dim=-1)
        if self.early_stopping is True:
            done |= is_finished.all(dim=-1)
        if last:  # every continuation ends: every input is final
            done = torch.ones_like(done)
        state = _Search(
            search.active,
            running,
            running_scores,
            finished,
            finished_scores,
            finished_lengths,
            is_finished,
        )
        return state, sources.gather(1, going), done


def _put_in_front(cache: Cache, layers: Mapping[int, torch.Tensor]) -> bool:
    """Put each layer's keys/values in front of every row of its cache (each row its own where they have a row
    dimension); False (cache untouched) unless every layer is a plain growing one (a sliding window would count
    them against its window) with a prefix."""
    cached = getattr(cache, "layers", None)
    if not cached or set(layers) != set(range(len(cached))):
        return False
    if not all(type(layer) is DynamicLayer and layer.get_seq_length() > 0 for layer in cached):
        return False
    for index, layer in enumerate(cached):
        block = layers[index].to(layer.keys.dtype)
        if block.dim() == 4:  # one prefix for every row
            block = block[None].expand(layer.keys.shape[0], -1, -1, -1, -1)
        layer.keys = torch.cat([block[:, 0], layer.keys], dim=-2)
        layer.values = torch.cat([block[:, 1], layer.values], dim=-2)
    return True


def _with_prefix_columns(
    model_mask: torch.Tensor | None, attention_mask: torch.Tensor, prefix: CachedPrefix
) -> torch.Tensor | None:
    """The 2-D mask once the prefix is in the cache: its columns seen by every token (or by the inputs that
    ``prefix.columns`` says), in front of the prompt's mask."""
    if prefix.columns is not None:
        return torch.cat([prefix.columns.to(attention_mask.dtype), attention_mask], dim=1)
    if model_mask is None:
        return None
    return torch.cat([model_mask.new_ones(model_mask.shape[0], prefix.length), model_mask], dim=1)


def _processors(
    width: int,
    eos: torch.Tensor,
    bad_words_ids: list[list[int]] | None,
    no_repeat_ngram_size: int,
    min_new_tokens: int,
) -> LogitsProcessorList:
    """transformers' processors for these options, in the order ``generate`` applies them."""
    processors = LogitsProcessorList()
    if no_repeat_ngram_size and no_repeat_ngram_size > 0:
        processors.append(NoRepeatNGramLogitsProcessor(no_repeat_ngram_size))
    if bad_words_ids is not None:
        processors.append(NoBadWordsLogitsProcessor(bad_words_ids, eos))
    if min_new_tokens and min_new_tokens > 0:
        processors.append(MinNewTokensLengthLogitsProcessor(width, min_new_tokens, eos, device=str(eos.device)))
    return processors
