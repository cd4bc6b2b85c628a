"""Linear layers on oneDNN's fused CPU kernel at inference: ``act(x Wᵀ + b) [+ residual]`` in one call.

On CPUs, oneDNN's inner-product kernel runs the encoder's (1024·B, 768) × (768, 3072) products about
10 % faster than the MKL GEMM behind ``nn.Linear``, and it applies the exact GELU or adds the residual
while the output is still in cache, which saves a pass over (and an allocation of) the activations.
The function is the same as ``nn.Linear`` up to float rounding. Anything else (autograd, GPUs, float16,
a build without oneDNN) takes the ordinary modules, so training is untouched.
"""

import functools
import weakref
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .lora import LoRAQKV


@functools.cache
def onednn_works(dtype: torch.dtype = torch.float32) -> bool:
    """Whether this build has oneDNN's fused linear and it computes a linear layer in ``dtype`` on this
    CPU (checked once per dtype on a tiny input, so that a build or CPU where the op exists but fails,
    such as bfloat16 weight packing on AVX2-only CPUs, falls back instead of breaking)."""
    if not torch.backends.mkldnn.is_available() or not hasattr(torch.ops.mkldnn, "_linear_pointwise"):
        return False
    x, weight, bias = torch.arange(6.0).reshape(2, 3), torch.ones(2, 3), torch.tensor([1.0, -1.0])
    try:
        with torch.inference_mode():
            if dtype != torch.float32:
                x, bias = x.to(dtype), bias.to(dtype)
                weight = torch.ops.mkldnn._reorder_linear_weight(weight.to(dtype), x.shape[0])
            y = torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
    except RuntimeError:
        return False
    return torch.equal(y.float(), torch.tensor([[4.0, 2.0], [13.0, 11.0]]))


# Kept beside the layers rather than on them, so that copying or pickling a model never meets oneDNN's
# opaque tensors, and dropped with the layer.
PACKED_WEIGHTS: "weakref.WeakKeyDictionary[nn.Linear, tuple[tuple, torch.Tensor]]" = weakref.WeakKeyDictionary()


def fused_dtype(x: torch.Tensor) -> Optional[torch.dtype]:
    """The dtype oneDNN computes ``x``'s linear layers in, or None where ``nn.Linear`` must run."""
    if x.device.type != "cpu" or torch.is_grad_enabled():
        return None
    dtype = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else x.dtype
    return dtype if dtype in (torch.float32, torch.bfloat16) and onednn_works(dtype) else None


def _plain_linear(module: nn.Module) -> Optional[nn.Linear]:
    """The single ``nn.Linear`` computing ``module``, or None (unmerged LoRA adapters)."""
    if isinstance(module, LoRAQKV):
        return module.qkv if module.merged else None
    return module if type(module) is nn.Linear else None


def _weights(layer: nn.Linear, dtype: torch.dtype) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """``layer``'s weight and bias for oneDNN in ``dtype``. A bfloat16 copy is kept for the layer in
    oneDNN's blocked layout (memory: half the float32 weight again; rebuilt when the weight changes),
    so that autocast does not convert every weight on every call."""
    bias = None if layer.bias is None else layer.bias.to(dtype)
    if dtype == layer.weight.dtype:
        return layer.weight, bias
    if torch.is_inference(layer.weight):  # made under inference_mode: no version counter to key a copy on
        return layer.weight.to(dtype), bias
    key = (dtype, layer.weight.data_ptr(), layer.weight._version)
    cached = PACKED_WEIGHTS.get(layer)
    if cached is None or cached[0] != key:
        cached = (key, torch.ops.mkldnn._reorder_linear_weight(layer.weight.to(dtype), 1024))
        PACKED_WEIGHTS[layer] = cached
    return cached[1], bias


def linear(
    module: nn.Module, x: torch.Tensor, gelu: bool = False, residual: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """``[residual +] [gelu](module(x))``; x: (..., in) -> (..., out). ``gelu`` is the exact (erf) GELU."""
    dtype = fused_dtype(x)
    layer = _plain_linear(module)
    if dtype is None or layer is None:
        y = module(x)
        y = F.gelu(y) if gelu else y
        return y if residual is None else residual + y
    weight, bias = _weights(layer, dtype)
    flat = x.reshape(-1, x.shape[-1]).to(dtype)
    shape = (*x.shape[:-1], layer.out_features)
    if residual is not None and residual.dtype == dtype and not gelu:
        other = residual.reshape(-1, layer.out_features)
        return torch.ops.mkldnn._linear_pointwise.binary(flat, other, weight, bias, "add").view(shape)
    attr, algorithm = ("gelu", "none") if gelu else ("none", "")
    y = torch.ops.mkldnn._linear_pointwise(flat, weight, bias, attr, [], algorithm).view(shape)
    return y if residual is None else residual + y
