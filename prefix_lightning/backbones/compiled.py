"""The LM's transformer blocks compiled with ``torch.compile``: for accelerators, where eager steps are host-bound.

On a GPU a small LM's step waits on the host, which launches one kernel per operator and runs transformers'
Python around each (docs/gpu.md: 17 ms of GPU work in a 173 ms training step at SmolLM2-135M's shape). Compiled,
the pointwise work of a block (norms, rotary positions, the MLP's gate, residuals) fuses and that Python runs once.

Each block is compiled in place (``nn.Module.compile``: parameter names, state dicts and checkpoints do not change),
and the blocks share one compilation: a block's module is an input of the compiled code, not a constant of it, so a
30-block model compiles the code of one block (regional compilation). The whole stack as one graph compiled for
minutes at SmolLM2-135M's shape on an H200, past a 160 s limit (docs/gpu.md). Attention is traced into the block's
graph (``prefix.attention``), so that a block is one graph forward and one backward: each site's prefix is an input
of the graph (set on the site's binding for each forward, not looked up by the block's index, which the graph would
specialize on, compiling once per block), and the prefix's causal columns take an explicit mask there (the
bottom-right causal bias that keeps eager attention on SDPA's flash kernel cannot be traced). A bank's per-row
prefixes and T5's position bias run eager, a break in the graph. Decoding runs eager (``decoding.routes``): its
cache is read by block index too. Shapes are dynamic: a new batch length does not compile again. Compile after the
method is built: what wraps or hooks the LM must be in place at its first compiled call.
"""

from __future__ import annotations

import torch
from transformers import PreTrainedModel
from transformers.modeling_layers import GradientCheckpointingLayer

# Dynamo compiles a frame again for each variant of its call, and a block's frames see many in one run: training
# and validation (grad mode), the first block's input without grad and the others' with it, a batch of one row,
# with and without a mask, and two call styles of transformers' deprecation wrapper. Past dynamo's default of 8 a
# frame silently runs eager from then on.
RECOMPILE_LIMIT = 64


def compile_lm(lm: PreTrainedModel, backend: str = "inductor") -> int:
    """Compile each of ``lm``'s transformer blocks in place (compilation itself happens at the first call); returns
    how many."""
    blocks = [module for module in lm.modules() if isinstance(module, GradientCheckpointingLayer)]
    if not blocks:
        raise ValueError(
            f"model.compile: no transformer blocks (transformers' GradientCheckpointingLayer) in {type(lm).__name__}"
            ": leave model.compile off for this model"
        )
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
    for block in blocks:
        block.compile(dynamic=True, backend=backend)
    return len(blocks)
