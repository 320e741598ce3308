"""The decoding routes of a prefixed causal LM, chosen per call: the project's beam search, transformers' generate
with the prompt run once per input, or transformers' generate as it is."""

from __future__ import annotations

import inspect
from typing import Any

import torch
from transformers import GenerationConfig, PreTrainedModel

from prefix_lightning.decoding.beam_search import CachedPrefix, beam_search, beam_search_options
from prefix_lightning.decoding.masks import generation_mask, positions_from_mask
from prefix_lightning.decoding.packed_linear import PackedWeights, packed_linears
from prefix_lightning.methods.loss import slices_logits
from prefix_lightning.numbers import is_int


def rows_per_input(defaults: GenerationConfig, kwargs: dict[str, Any]) -> int:
    """How many rows ``generate`` makes of each input: beams, or sequences returned (transformers' rule)."""
    config = kwargs.get("generation_config") or defaults
    beams = kwargs.get("num_beams", config.num_beams) or 1
    return max(beams, kwargs.get("num_return_sequences", config.num_return_sequences) or 1)


def tokens_to_generate(lm: PreTrainedModel, kwargs: dict[str, Any]) -> int:
    """How many tokens ``generate`` may add to each row at most (transformers' rule: ``max_new_tokens``, else
    ``max_length`` less the prompt, or less the decoder's start token); 0 where the settings are not numbers
    (transformers then says what is wrong with them)."""
    config = kwargs.get("generation_config") or lm.generation_config
    new = kwargs.get("max_new_tokens", config.max_new_tokens)
    if new is None:
        prompt = kwargs.get("input_ids")
        start = 1 if lm.config.is_encoder_decoder or prompt is None else prompt.shape[-1]
        total = kwargs.get("max_length", config.max_length)
        new = total - start if is_int(total) else 0
    return new if is_int(new) else 0


def check_rows_per_input(kwargs: dict[str, Any]) -> None:
    """Refuse a number of beams or of returned sequences below 1 (transformers divides by it, or makes a tensor of
    that many rows)."""
    for option in ("num_beams", "num_return_sequences"):
        value = kwargs.get(option)
        if value is not None and not (is_int(value) and value >= 1):
            raise ValueError(f"{option} must be a positive integer, got {value!r}")


def check_left_padded(lm: PreTrainedModel, kwargs: dict[str, Any]) -> None:
    """Refuse a decoder-only batch whose mask ends a row in padding: generation continues every row from the last
    column, so a right-padded row goes on from its padding into wrong text (transformers only warns)."""
    mask = kwargs.get("attention_mask")
    if lm.config.is_encoder_decoder or not (isinstance(mask, torch.Tensor) and mask.ndim == 2 and mask.shape[1]):
        return
    ends_padded = mask[:, -1] == 0
    if bool(ends_padded.any()):
        rows = ends_padded.nonzero().flatten().tolist()
        raise ValueError(
            f"attention_mask: row(s) {rows} end in padding; a decoder-only LM generates after each row's last "
            "column, so pad a batch on the left (tokenizer.padding_side = 'left')"
        )


@torch.no_grad()
def generate(
    lm: PreTrainedModel, kwargs: dict[str, Any], packed: PackedWeights, cached_prefix: CachedPrefix | None = None
) -> Any:
    """``lm.generate(**kwargs)``'s result, computed the fastest way that gives the same one.

    A plain beam search (the options of the project's generation configs, sequences only) goes through
    :func:`beam_search`, which runs each prompt once, reads the prefix from the cache after the prompt
    (``cached_prefix``) and stops computing each input once its search is over. Other calls with several rows
    per input run the prompt once per input and repeat its cache for the copies (transformers would run it once
    per copy). On CPU the frozen linear layers compute with weights packed once for oneDNN (``packed``).
    """
    # Compiled blocks (model.compile) decode eager: the cache is read by block index, which a block's graph would
    # specialize on, one compilation per block (see backbones.compiled).
    check_rows_per_input(kwargs)
    check_left_padded(lm, kwargs)
    with packed_linears(lm, packed), torch.compiler.set_stance("force_eager"):
        return _route(lm, kwargs, cached_prefix)


def _route(lm: PreTrainedModel, kwargs: dict[str, Any], cached_prefix: CachedPrefix | None) -> Any:
    copies = rows_per_input(lm.generation_config, kwargs)
    input_ids, mask = kwargs.get("input_ids"), kwargs.get("attention_mask")
    own_cache = {"cache", "past_key_values", "inputs_embeds"} & kwargs.keys()
    config = kwargs.get("generation_config") or lm.generation_config
    cached = kwargs.get("use_cache", config.use_cache) is not False  # False: every step reruns the whole sequence
    # A cache implementation asked for (a static cache) makes generate build its own cache: it refuses a given one.
    own_cache_kind = kwargs.get("cache_implementation", config.cache_implementation) is not None
    searched = beam_search_options(lm, kwargs) if copies > 1 and slices_logits(lm) else None
    if searched is not None:
        if mask is None:
            searched["attention_mask"] = generation_mask(
                searched["input_ids"], searched["pad_token_id"], searched["eos_token_id"]
            )
        return beam_search(lm, **searched, cached_prefix=cached_prefix)
    if (
        copies > 1
        and cached
        and not own_cache
        and not own_cache_kind
        and input_ids is not None
        # Without a mask, only a single row is sure to hold no padding that generate would infer a mask for.
        and (mask is not None or input_ids.shape[0] == 1)
        and input_ids.shape[1] > 1
        and slices_logits(lm)
    ):
        prompt = {"input_ids": input_ids[:, :-1]}
        if mask is not None:  # positions as generate counts them: from each row's first real token
            prompt["attention_mask"] = mask[:, :-1]
            if "position_ids" in inspect.signature(lm.forward).parameters:
                prompt["position_ids"] = positions_from_mask(prompt["attention_mask"])
        cache = lm(**prompt, use_cache=True, logits_to_keep=1).cache
        cache.batch_repeat_interleave(copies)
        kwargs = {**kwargs, "cache": cache}  # generate sees the prompt's last token as the only one left to run
    # `generate` is GenerationMixin's, which PreTrainedModel does not declare.
    return lm.generate(**kwargs)  # type: ignore[operator]
