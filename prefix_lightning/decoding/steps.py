"""The forwards of a search's steps after the prompt: on a cache that grows (the rows of the inputs still searched),
or on a static one replayed from a CUDA graph.

On a GPU, a step of a small LM is the host's work: 500 rows of one token each cost the GPU well under a millisecond
and the host tens of milliseconds of operator calls (docs/gpu.md). Captured once as a CUDA graph, a step is one
launch. A graph replays fixed shapes at fixed addresses, so :class:`StaticSteps` keeps a row for every beam the
search started with (the rows of inputs whose search is over keep computing, unread), a cache as long as the longest
sequence the search can make, and a mask over all of it. On the CPU, where the work is the arithmetic,
:class:`GrowingSteps` computes only the rows still searched.
"""

from __future__ import annotations

import inspect
import logging
import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers.cache_utils import Cache, CacheLayerMixin, DynamicLayer, StaticLayer
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

logger = logging.getLogger(__name__)


def static_steps_pay(lm: nn.Module, device: torch.device) -> bool:
    """Whether the search's steps run static, as a CUDA graph: on CUDA, where the host's pace sets a step's time,
    for an LM whose forward can be replayed (not one whose weights are gathered from shards at every call, nor one
    that failed to be captured before)."""
    return device.type == "cuda" and lm not in _uncapturable and not _sharded(lm)


def _sharded(lm: nn.Module) -> bool:
    """Whether FSDP (either version) or DeepSpeed's ZeRO-3 (whose parameters carry a ``ds_id``) shards the LM."""
    if any(hasattr(parameter, "ds_id") for parameter in lm.parameters()):
        return True
    if not torch.distributed.is_available():
        return False
    from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel

    return any(isinstance(module, (FullyShardedDataParallel, FSDPModule)) for module in lm.modules())


# LMs whose step could not be captured: their later searches take the growing steps.
_uncapturable: weakref.WeakSet[nn.Module] = weakref.WeakSet()


class Forward:
    """One forward of the LM with the inputs ``generate`` would give it: positions if it takes them, logits of
    the last position only if it can cut them."""

    def __init__(self, lm: PreTrainedModel) -> None:
        self.lm = lm
        parameters = inspect.signature(lm.forward).parameters
        self.takes_positions = "position_ids" in parameters
        self.cuts_logits = "logits_to_keep" in parameters

    def __call__(
        self, tokens: torch.Tensor, mask: torch.Tensor | None, positions: torch.Tensor, cache: Cache | None
    ) -> tuple[torch.Tensor, Cache]:
        inputs: dict[str, Any] = {"input_ids": tokens, "use_cache": True, "return_dict": True}
        if cache is not None:
            inputs["cache"] = cache
        if mask is not None:
            inputs["attention_mask"] = mask
        if self.takes_positions:
            inputs["position_ids"] = positions
        if self.cuts_logits:
            inputs["logits_to_keep"] = 1
        output = self.lm(**inputs)
        return output.logits[:, -1], output.cache


class GrowingSteps:
    """Steps on the rows still searched: the cache grows by a token a step and loses the rows of ended inputs.

    ``mask`` is the 2-D mask of each input's cached columns (None where nothing is masked); ``follow_rows`` is told
    every reordering of the rows (a prefix that attention adds, not the cache).
    """

    def __init__(
        self,
        forward: Forward,
        cache: Cache,
        mask: torch.Tensor | None,
        beams: int,
        follow_rows: Callable[[torch.Tensor], None] | None,
    ) -> None:
        self.forward, self.cache, self.mask, self.beams, self.follow_rows = forward, cache, mask, beams, follow_rows

    def __call__(self, tokens: torch.Tensor, positions: torch.Tensor, active: torch.Tensor, step: int) -> torch.Tensor:
        """The next-token logits of each row (a row per beam of the ``active`` inputs) at the search's ``step``."""
        mask = None
        if self.mask is not None:
            mask = self.mask[active].repeat_interleave(self.beams, dim=0)
            mask = torch.cat([mask, mask.new_ones(mask.shape[0], step)], dim=1)
        logits, self.cache = self.forward(tokens, mask, positions, self.cache)
        return logits

    def reorder(self, going: torch.Tensor) -> None:
        """Make row ``i`` of the next step what row ``going[i]`` is now."""
        # transformers annotates LongTensor, which no tensor operation returns statically.
        self.cache.reorder_cache(going)  # type: ignore[arg-type]
        if self.follow_rows is not None:
            self.follow_rows(going)

    def static(self, inputs: int, new_tokens: int, active: torch.Tensor) -> StaticSteps | None:
        """These steps on a static cache for the beams of ``inputs`` inputs with room for ``new_tokens`` more
        tokens, made once the cache's rows are the beams of the ``active`` inputs; None where its layers cannot be
        made static (a sliding window, a prefix that attention adds) or its attention takes another mask than
        SDPA's."""
        layers = getattr(self.cache, "layers", None)
        if not layers or self.follow_rows is not None or not all(type(layer) is DynamicLayer for layer in layers):
            return None
        masks = ALL_MASK_ATTENTION_FUNCTIONS
        if masks.get(self.forward.lm.config._attn_implementation) is not masks["sdpa"]:
            return None
        mask = None if self.mask is None else self.mask[active].repeat_interleave(self.beams, dim=0)
        return StaticSteps(self.forward, layers, mask, self.beams, inputs, new_tokens, active)


class StaticSteps:
    """Steps of fixed shape: a row for every beam of every input, a cache of fixed length, a mask over all of it;
    a CUDA graph on CUDA.

    Row ``input * beams + beam`` is always that beam of that input: the beams of an input share its prefix and
    prompt, so a reordering of the beams moves only the generated tokens' columns, and the rows of an input whose
    search is over stay where they are, computing unread. The first step runs eager (it also warms up what the
    capture records), the graph is captured after it, and every later step copies its tokens and positions into the
    graph's inputs and replays it. A step first moves the generated columns as the last :meth:`reorder` said, then
    runs the LM on one token per row. An LM that cannot be captured (one that synchronizes with the host in its
    forward, such as a mixture of experts' routing) runs the rest of its static steps eager, with a warning, and its
    later searches grow.
    """

    def __init__(
        self,
        forward: Forward,
        grown: list[DynamicLayer],
        mask: torch.Tensor | None,
        beams: int,
        inputs: int,
        new_tokens: int,
        active: torch.Tensor,
    ) -> None:
        first = _stored(grown[0])[0]
        device, cached = first.device, first.shape[-2]
        rows, length = inputs * beams, cached + new_tokens
        self.forward, self.beams, self.active = forward, beams, active
        self.beam = torch.arange(beams, device=device)
        placed = self._rows(active)
        self.layers = [_static_layer(layer, rows, length, placed) for layer in grown]
        self.cache = Cache(layers=[layer for layer in self.layers])  # (a new list: transformers types it wider)
        self.seen = torch.zeros(rows, length, dtype=torch.bool, device=device)  # the prefix and prompt columns
        self.seen[placed, :cached] = True if mask is None else mask.bool()
        self.columns = torch.arange(length, device=device)
        self.first_new = cached
        self.unmoved = torch.arange(rows, device=device)
        self.going = self.unmoved.clone()
        self.tokens = torch.zeros(rows, 1, dtype=torch.long, device=device)
        self.positions = torch.zeros(rows, 1, dtype=torch.long, device=device)
        self.last_step = new_tokens - 1
        self.graph: torch.cuda.CUDAGraph | None = None
        self.logits = torch.empty(0)  # the graph's output, rewritten by every replay
        self.eager = device.type != "cuda"

    def __call__(self, tokens: torch.Tensor, positions: torch.Tensor, active: torch.Tensor, step: int) -> torch.Tensor:
        """The next-token logits of each row of the search (a row per beam of the ``active`` inputs)."""
        self.active = active
        rows = self._rows(active)
        self.tokens[rows] = tokens
        self.positions[rows] = positions
        if self.graph is not None:
            self.graph.replay()
            return self.logits[rows]
        if self.eager:
            return self._step()[rows]
        logits = _on_side_stream(self._step)
        if step < self.last_step:  # a later step will replay it
            captured = _captured(self._step)
            if captured is None:
                self.eager = True
                _uncapturable.add(self.forward.lm)
            else:
                self.graph, self.logits = captured
        return logits[rows]

    def reorder(self, going: torch.Tensor) -> None:
        """Make row ``i`` of the search's next step what its row ``going[i]`` is now (the search's rows: the beams
        of the inputs it still searches)."""
        inputs = self.active[going // self.beams]
        self.going.copy_(self.unmoved)
        self.going[inputs * self.beams + self.beam.repeat(going.numel() // self.beams)] = (
            inputs * self.beams + going % self.beams
        )

    def _rows(self, active: torch.Tensor) -> torch.Tensor:
        """The static rows of the search's rows (the beams of the ``active`` inputs)."""
        return (active[:, None] * self.beams + self.beam).flatten()

    def _step(self) -> torch.Tensor:
        for layer in self.layers:
            for stored in _stored(layer):
                generated = stored[:, :, self.first_new :]
                generated.copy_(generated.index_select(0, self.going))
        written = self.layers[0].cumulative_length  # the column this step's token goes to
        seen = self.seen | ((self.columns >= self.first_new) & (self.columns <= written))
        logits, _ = self.forward(self.tokens, seen[:, None, None, :], self.positions, self.cache)
        return logits


def _static_layer(grown: DynamicLayer, rows: int, length: int, placed: torch.Tensor) -> StaticLayer:
    """A static layer of ``rows`` rows and ``length`` columns holding ``grown``'s keys and values in front, its row
    ``i`` at row ``placed[i]``."""
    keys, values = _stored(grown)
    layer = StaticLayer(max_cache_len=length)
    # (it reads only the shapes, dtype and device of what it is given: views of the first row, no copies)
    layer.lazy_initialization(keys[:1].expand(rows, -1, -1, -1), values[:1].expand(rows, -1, -1, -1))
    for stored, grown_part in zip(_stored(layer), (keys, values), strict=True):
        stored[placed, :, : grown_part.shape[-2]] = grown_part
    layer.cumulative_length.fill_(keys.shape[-2])
    return layer


def _stored(layer: CacheLayerMixin) -> tuple[torch.Tensor, torch.Tensor]:
    """A filled cache layer's keys and values (transformers types them optional, for a layer not yet filled)."""
    assert layer.keys is not None and layer.values is not None
    return layer.keys, layer.values


def _on_side_stream(step: Callable[[], torch.Tensor]) -> torch.Tensor:
    """Run ``step`` on a side stream, as CUDA graphs' warm-up must (its memory is then not the capture's)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        result = step()
    torch.cuda.current_stream().wait_stream(stream)
    return result


def _captured(step: Callable[[], torch.Tensor]) -> tuple[torch.cuda.CUDAGraph, torch.Tensor] | None:
    """``step`` recorded as a CUDA graph (recording runs nothing), and the tensor its replays write; None, with a
    warning, where it cannot be recorded. Under autocast, casts are not cached across the capture, which would
    free what the graph reads."""
    graph = torch.cuda.CUDAGraph()
    autocast = torch.is_autocast_enabled("cuda")
    dtype = torch.get_autocast_dtype("cuda")
    try:
        with torch.autocast("cuda", dtype=dtype, enabled=autocast, cache_enabled=False), torch.cuda.graph(graph):
            output = step()
    except RuntimeError as error:
        logger.warning("Decoding steps run without a CUDA graph: the LM's step could not be captured (%s)", error)
        return None
    return graph, output
