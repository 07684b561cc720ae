"""DoRA linear (Liu et al. 2024): LoRA with the weight split into magnitude and direction.

    W' = m ⊙ (W + s·BA) / ‖W + s·BA‖_row          (m: [out], the trained magnitude)

as PEFT computes it (its `DoraLinearLayer`, so adapters and gradients match PEFT's):

    n      = ‖W + s·BA‖ per output row, detached (the paper's §4.3: no gradient through it)
    y      = x Wᵀ + b + (m/n − 1) ⊙ (x̃ Wᵀ) + (m/n) ⊙ s·(x̃ Aᵀ Bᵀ),   x̃ = dropout(x)

Without dropout this is (m/n) ⊙ (x (W + s·BA)ᵀ) + b. With dropout PEFT applies the base's
rescale to the dropped input too (x̃ Wᵀ), and so does this op. The norm is computed in x's
dtype from W dequantized to it, as PEFT does.

Only the PyTorch reference exists so far (`backend="torch"`); the fused Triton path (the row
norms accumulated tile by tile inside the LoRA GEMM, the rescale in its epilogue) is to come.
`backend="auto"` runs the reference and says so once on a GPU; `backend="triton"` is refused.
"""
from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F

from ..backend import autocast_dtype
from ..quant_state import BaseWeight, QuantStateLike
from .checks import cast_floats, check_lora_linear_inputs
from .dropout import check_seed, lora_dropout_mask

_warned = False


def dora_weight_norm(weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float) -> torch.Tensor:
    """‖W + s·BA‖ per output row, [out], detached; W dense [out, in] in the compute dtype."""
    with torch.no_grad():
        return torch.linalg.norm(weight + scaling * (lora_B @ lora_A), dim=1)


def dense_weight(weight: torch.Tensor, quant_state: QuantStateLike | None, dtype: torch.dtype) -> torch.Tensor:
    """The base weight [out, in] in `dtype` (a packed 4-bit one dequantized)."""
    if quant_state is None:
        return weight.to(dtype)
    return BaseWeight.of(weight, quant_state).dequantized(dtype, backend="torch").weight


def dora_linear_ref(x: torch.Tensor, weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor,
                    scaling: float, magnitude: torch.Tensor, bias: torch.Tensor | None = None,
                    dropout_p: float = 0.0, quant_state: QuantStateLike | None = None,
                    dropout_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Plain-PyTorch DoRA linear (autograd through torch ops); see the module docstring.
    `dropout_mask` (bool, x's shape, True = keep) replaces F.dropout's own mask."""
    w = dense_weight(weight, quant_state, x.dtype)
    norm = dora_weight_norm(w, lora_A, lora_B, scaling)
    scale = magnitude.to(x.dtype) / norm                               # [out], grads to m only
    base = F.linear(x, w)                                              # x Wᵀ, no bias
    if dropout_p > 0:
        x_in = x * dropout_mask / (1.0 - dropout_p) if dropout_mask is not None else F.dropout(x, dropout_p)
        base_in = F.linear(x_in, w)
    else:
        x_in, base_in = x, base
    lowrank = F.linear(F.linear(x_in, lora_A), lora_B) * scaling
    y = base + (scale - 1) * base_in + scale * lowrank
    return y if bias is None else y + bias


def dora_linear(x: torch.Tensor, weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor,
                scaling: float, magnitude: torch.Tensor, bias: torch.Tensor | None = None, dropout_p: float = 0.0,
                quant_state: QuantStateLike | None = None, backend: str = "auto",
                seed: int | None = None) -> torch.Tensor:
    """DoRA linear, autograd-aware; arguments as `lora_linear`'s plus `magnitude` [out]
    (fp32 or x's dtype; it gets the gradient of the DoRA rescale).

    Only the PyTorch reference exists yet: backend "auto" or "torch" runs it ("auto" warns
    once on a GPU), "triton" raises NotImplementedError. Returns [..., out] in x's dtype.
    """
    if backend == "triton":
        raise NotImplementedError("DoRA has no fused Triton kernel yet: use backend='torch' (or 'auto')")
    if isinstance(x, torch.Tensor):
        cast_to = autocast_dtype(x.device.type)
        x, lora_A, lora_B, bias = cast_floats(cast_to, x, lora_A, lora_B, bias)
        if quant_state is None:
            (weight,) = cast_floats(cast_to, weight)
    check_lora_linear_inputs(x, weight, lora_A, lora_B, scaling, bias, dropout_p, quant_state)
    out_features = lora_B.shape[0]
    if not isinstance(magnitude, torch.Tensor) or tuple(magnitude.shape) != (out_features,) \
            or not magnitude.is_floating_point():
        got = tuple(magnitude.shape) if isinstance(magnitude, torch.Tensor) else type(magnitude).__name__
        raise ValueError(f"magnitude must be a float tensor of shape ({out_features},) [out], got {got}")
    check_seed(seed)
    global _warned
    if x.is_cuda and not _warned:
        _warned = True
        warnings.warn("DoRA runs trilora's PyTorch reference path: no fused kernel yet (about LoRA's cost plus "
                      "a dequantize and a row-norm pass per layer and step)", RuntimeWarning, stacklevel=2)
    mask = lora_dropout_mask(seed, x.shape, dropout_p, x.device) if dropout_p > 0 and seed is not None else None
    return dora_linear_ref(x, weight, lora_A, lora_B, float(scaling), magnitude, bias, dropout_p, quant_state, mask)


__all__ = ["dense_weight", "dora_linear", "dora_linear_ref", "dora_weight_norm"]
