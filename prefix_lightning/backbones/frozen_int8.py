"""bitsandbytes' LLM.int8() layer for a frozen LM that a prefix trains through: the same product forward, and a
backward that keeps nothing of the layer's input.

bitsandbytes' own autograd function keeps every int8 layer's input for the weight's gradient even when the weight
is frozen (0.50: ``MatMul8bitLt`` stores it whenever any input needs a gradient), and needs only the weight for
the input's gradient. On SmolLM2-135M that made a training step's peak memory higher than with the float32 LM.
Here the product runs without autograd and the input's gradient is the output's gradient times the dequantized
weight: bitsandbytes' own formula, with nothing saved but the layer.

Imported only when a model is quantized (bitsandbytes is optional).
"""

from __future__ import annotations

from typing import Any

import bitsandbytes as bnb
import torch


class FrozenLinear8bitLt(bnb.nn.Linear8bitLt):
    """A ``Linear8bitLt`` whose weight never trains (PEFT's LoRA still wraps it as one)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and x.requires_grad:
            return _FrozenInt8Product.apply(x, self)
        return super().forward(x)

    def _load_from_state_dict(self, state_dict: Any, prefix: str, *args: Any, **kwargs: Any) -> None:
        """bitsandbytes refuses a state dict ("non-quantized Linear8bitLt") once the first forward has moved the
        scales from the weight into the state (Lightning's spawned DDP loads the workers' weights so): the weight
        points at them for the load."""
        moved = getattr(self.weight, "SCB", None) is None and self.state.SCB is not None
        if moved:
            self.weight.SCB = self.state.SCB  # type: ignore[attr-defined]  # bitsandbytes' Int8Params
        try:
            super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        finally:
            if moved:
                self.weight.SCB = None  # type: ignore[attr-defined]

    def dequantized_weight(self, dtype: torch.dtype) -> torch.Tensor:
        """The float weight the int8 one stands for: each row's int8 values times its scale / 127."""
        # bitsandbytes moves the int8 weight and its scales into the state at the first forward.
        weight, scales = self.state.CB, self.state.SCB
        if weight is None or scales is None:
            raise RuntimeError(f"{type(self).__name__}: no int8 weight before the first forward")
        return bnb.functional.int8_vectorwise_dequant(weight, scales).to(dtype)


class _FrozenInt8Product(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, layer: FrozenLinear8bitLt) -> torch.Tensor:
        ctx.layer, ctx.input_dtype = layer, x.dtype
        return bnb.nn.Linear8bitLt.forward(layer, x)  # autograd is off here: bitsandbytes saves nothing

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        weight = ctx.layer.dequantized_weight(grad.dtype)
        return (grad @ weight).to(ctx.input_dtype), None
