"""A quantized frozen LM: its linear layers stored in 8 or 4 bits (weight-only), so that a larger LM fits in memory
while the prefix trains in float32. The prefix's gradient reaches it through the quantized layers, which therefore
must compute a gradient for their input: both schemes here do, on CPU and on CUDA.

- ``int8``: torchao's ``Int8WeightOnlyConfig``, one scale per output channel.
- ``int4``: bitsandbytes' ``Linear4bit`` in NormalFloat-4 (QLoRA's format), blocks of 64 with quantized scales.
  torchao's 4-bit layouts compute through kernels without a backward (``_weight_int4pack_mm*``): a prefix
  cannot train through them, so 4 bits come from bitsandbytes.

Only the transformer blocks are quantized: the embeddings and the output layer (often tied to the embeddings;
quantizing it would untie and duplicate them) stay in the LM's dtype. GPT-2's ``Conv1D`` layers become
``nn.Linear`` first (the same product, transposed weight), since both libraries quantize ``nn.Linear``.

The libraries are optional (extra ``quant``) and imported only when a model is quantized.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass

from torch import nn
from transformers import PreTrainedModel
from transformers.pytorch_utils import Conv1D


@dataclass(frozen=True)
class Scheme:
    library: str  # import name
    requirement: str  # what pip installs
    layer: str  # what a quantized layer is


QUANTIZATIONS = {
    "int8": Scheme("torchao", "torchao>=0.18", "int8 weights, one scale per output channel (torchao)"),
    "int4": Scheme("bitsandbytes", "bitsandbytes>=0.46", "NF4 weights in blocks of 64 (bitsandbytes)"),
}
QUANTIZED_TENSOR_LIBRARIES = ("torchao", "bitsandbytes")


def check_quantization(quantization: str | None) -> None:
    """A known scheme whose library is installed (or None: the LM's own dtype)."""
    if quantization is None:
        return
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"unknown quantization {quantization!r}; allowed: {', '.join(QUANTIZATIONS)} or null (none)")
    scheme = QUANTIZATIONS[quantization]
    if importlib.util.find_spec(scheme.library) is None:
        raise ModuleNotFoundError(
            f"quantization={quantization} needs {scheme.library}, which is not installed: "
            f"pip install '{scheme.requirement}' (or the extra: pip install 'prefix-lightning[quant]')"
        )


def quantize(model: PreTrainedModel, quantization: str) -> PreTrainedModel:
    """Quantize ``model``'s transformer-block linear layers in place (weights frozen) and return it."""
    check_quantization(quantization)
    replace = _int8_torchao if quantization == "int8" else _nf4_bitsandbytes
    output_layer = model.get_output_embeddings()
    count = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if child is output_layer or type(child) not in (nn.Linear, Conv1D):
                continue
            linear = _conv1d_as_linear(child) if isinstance(child, Conv1D) else child
            linear.requires_grad_(False)
            setattr(parent, name, replace(linear))
            count += 1
    if count == 0:
        raise ValueError(
            f"quantization={quantization}: {type(model).__name__} has no nn.Linear or Conv1D layer besides its "
            "output layer to quantize"
        )
    return model


def quantized_layers(model: nn.Module) -> list[str]:
    """Names of the modules whose weight is a quantized tensor of torchao or bitsandbytes."""
    return [
        name
        for name, module in model.named_modules()
        if type(getattr(module, "weight", None)).__module__.split(".")[0] in QUANTIZED_TENSOR_LIBRARIES
    ]


def refuse_quantized(model: nn.Module, method: str) -> None:
    """Methods that train the LM's own weights cannot train integer weights."""
    layers = quantized_layers(model)
    if layers:
        raise ValueError(quantized_training_error(method, f"{len(layers)} quantized layers, e.g. {layers[0]}"))


def quantized_training_error(method: str, what: str) -> str:
    return (
        f"{method} trains the LM's own weights, which cannot train in quantized form ({what}): set "
        "model.backbone.quantization=null, or use a method that keeps the LM frozen (prefix, lora, ...)"
    )


def _conv1d_as_linear(conv: Conv1D) -> nn.Linear:
    """GPT-2's Conv1D computes x @ W + b with W of shape (in, out); nn.Linear holds W transposed."""
    inputs, outputs = conv.weight.shape
    linear = nn.Linear(inputs, outputs, device="meta")
    linear.weight = nn.Parameter(conv.weight.detach().t().contiguous(), requires_grad=False)
    linear.bias = nn.Parameter(conv.bias.detach(), requires_grad=False)
    return linear


def _int8_torchao(linear: nn.Linear) -> nn.Linear:
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    # set_inductor_config=False: leave torch.compile's global settings alone (nothing here compiles).
    quantize_(linear, Int8WeightOnlyConfig(set_inductor_config=False))
    return linear


def _nf4_bitsandbytes(linear: nn.Linear) -> nn.Module:
    import bitsandbytes as bnb

    weight = linear.weight
    layer = bnb.nn.Linear4bit(
        linear.in_features,
        linear.out_features,
        bias=linear.bias is not None,
        compute_dtype=weight.dtype,
        quant_type="nf4",
        device="meta",
    )
    layer.weight = bnb.nn.Params4bit(weight.detach(), requires_grad=False, quant_type="nf4", module=layer)
    layer.bias = linear.bias
    # Params4bit quantizes when it is moved to a device (here: to where it already is).
    return layer.to(weight.device).requires_grad_(False)
