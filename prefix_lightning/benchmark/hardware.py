"""Model FLOPs utilization: the share of the accelerator's peak that a training run's model FLOPs reach.

Per token a forward costs 2N FLOPs (N: the parameters used in matrix products), the backward through the
activations another 2N, and the weight gradients another 2N: 4N for methods whose LM stays frozen (prefix
tuning, ours and PEFT's), 6N for full fine-tuning. Attention's own FLOPs are left out (short E2E sequences).
"""

from __future__ import annotations

import torch
from transformers import PreTrainedModel

# Dense peak TFLOP/s by GPU name (vendor data sheets, SXM parts): bf16 on tensor cores; float32 without TF32
# (PyTorch's default for matrix products).
PEAK_TFLOPS = {  # the first key in the device's name wins: variants before their family
    "H100 PCIe": {"bf16-mixed": 756.0, "32": 51.2},
    "H200": {"bf16-mixed": 989.4, "32": 66.9},
    "H100": {"bf16-mixed": 989.4, "32": 66.9},
    "A100": {"bf16-mixed": 312.0, "32": 19.5},
    "L4": {"bf16-mixed": 121.0, "32": 30.3},
}


def matmul_parameters(lm: PreTrainedModel) -> int:
    """The LM's parameters that take part in matrix products: all but an input embedding table that is not also
    the output layer (a lookup, no FLOPs)."""
    total = sum(p.numel() for p in lm.parameters())
    embedding = lm.get_input_embeddings().weight
    assert isinstance(embedding, torch.Tensor)  # typed by Module.__getattr__ as a tensor or a module
    output = lm.get_output_embeddings()
    tied = isinstance(output, torch.nn.Module) and output.weight is embedding
    return total if tied else total - embedding.numel()


def peak_tflops(device: str, precision: str) -> float | None:
    """The device's dense peak for ``precision``, where its name is in ``PEAK_TFLOPS``; None elsewhere (CPUs)."""
    if not device.startswith("cuda"):
        return None
    name = torch.cuda.get_device_name(torch.device(device))
    return next((peaks[precision] for gpu, peaks in PEAK_TFLOPS.items() if gpu in name), None)


def mfu(tokens_per_s: float, flops_per_token: float, peak: float | None) -> float | None:
    return None if peak is None else tokens_per_s * flops_per_token / (peak * 1e12)
