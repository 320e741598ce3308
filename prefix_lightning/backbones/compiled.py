"""The LM's transformer compiled with ``torch.compile``: for accelerators, where eager steps are host-bound.

On a GPU a small LM's step waits on the host, which launches one kernel per operator and runs transformers'
Python around each (docs/gpu.md: 17 ms of GPU work in a 173 ms training step at SmolLM2-135M's shape). Compiled,
the pointwise operators fuse and that Python runs once, at tracing.

The base model (the embeddings and every block, the LM head and the loss left out) is compiled in place with
``nn.Module.compile``, so parameter names, state dicts and checkpoints do not change, and the prefix reaches
attention as in eager mode: the injector's tensors become inputs of the graph, gradients flow back through them.
The whole stack is one graph, not one per block: a block reads its prefix and its cache layer by its index, which
a per-block compilation would specialize on, compiling again for every block. Shapes are dynamic: a new batch
length or a longer decoding cache does not compile again. Compile after the method is built: what wraps or hooks
the LM must be in place at its first compiled call.
"""

from __future__ import annotations

from torch import nn
from transformers import PreTrainedModel


def compile_lm(lm: PreTrainedModel, backend: str = "inductor") -> None:
    """Compile ``lm``'s base model in place (compilation itself happens at its first call)."""
    lm.base_model.compile(dynamic=True, backend=backend)


def is_compiled(model: nn.Module) -> bool:
    """Whether any part of ``model`` runs compiled (eager-only tricks such as swapping a module's forward must
    keep off: a compiled call does not see them)."""
    return any(getattr(module, "_compiled_call_impl", None) is not None for module in model.modules())
