"""Input checks of `lora_linear`: every bad input gets an error that names the problem.

The quant state is any `QuantStateLike` (`../quant_state.py`, where its one check lives): the
kernels layer does not import `trilora.quant`.
"""
from __future__ import annotations

import math
import numbers

import torch

from ..backend import FLOAT_DTYPES, autocast_dtype, check_same_device
from ..quant_state import QuantStateLike, check_packed_state


def _check_quant_state(weight: torch.Tensor, quant_state: QuantStateLike, in_features: int) -> tuple[int, int]:
    """(out, in) of a packed 4-bit base (the one packed/state check, plus the LoRA ops' 2-D rule)."""
    shape = check_packed_state(weight, quant_state)
    if len(shape) != 2:
        raise ValueError(f"quant_state.shape must be [out, in] of the base weight, got {list(shape)}")
    if shape[1] != in_features:
        raise ValueError(f"x has {in_features} input features but the 4-bit weight's shape is {list(shape)}")
    return shape


def check_lora_linear_inputs(x, weight, lora_A, lora_B, scaling, bias, dropout_p, quant_state) -> None:
    """Raise TypeError/ValueError naming the problem with `lora_linear`'s arguments."""
    for name, t in (("x", x), ("weight", weight), ("lora_A", lora_A), ("lora_B", lora_B)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if bias is not None and not isinstance(bias, torch.Tensor):
        raise TypeError(f"bias must be a torch.Tensor or None, got {type(bias).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"x must be float32, float16 or bfloat16, got {x.dtype}")
    if x.dim() < 1 or x.shape[-1] == 0:
        raise ValueError(f"x must be [..., in] with in > 0, got shape {list(x.shape)}")
    if not isinstance(scaling, numbers.Real) or isinstance(scaling, bool) or not math.isfinite(scaling):
        raise TypeError(f"scaling must be a finite real number, got {scaling!r}")
    if not isinstance(dropout_p, numbers.Real) or not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p!r}")
    in_features = x.shape[-1]

    # the base weight: packed 4-bit with its state, or dense [out, in] in x's dtype
    if quant_state is not None:
        out_features = _check_quant_state(weight, quant_state, in_features)[0]
    else:
        if weight.dtype == torch.uint8:
            raise TypeError("weight is uint8 (packed 4-bit?) but no quant_state was given")
        if weight.dim() != 2:
            raise ValueError(f"weight must be [out, in], got shape {list(weight.shape)}")
        if weight.dtype != x.dtype:
            raise TypeError(f"weight dtype {weight.dtype} does not match x dtype {x.dtype}")
        if weight.shape[1] != in_features:
            raise ValueError(f"x has {in_features} input features but weight is {list(weight.shape)} [out, in]")
        out_features = weight.shape[0]

    # the adapter
    if lora_A.dim() != 2 or lora_B.dim() != 2:
        raise ValueError(f"lora_A must be [r, in] and lora_B [out, r], got {list(lora_A.shape)} "
                         f"and {list(lora_B.shape)}")
    r = lora_A.shape[0]
    if r <= 0:
        raise ValueError(f"LoRA rank must be >= 1, lora_A has shape {list(lora_A.shape)}")
    if lora_A.shape[1] != in_features:
        raise ValueError(f"lora_A is {list(lora_A.shape)} [r, in] but x has {in_features} input features")
    if lora_B.shape[1] != r:
        raise ValueError(f"lora_B is {list(lora_B.shape)} [out, r] but lora_A's rank is {r}")
    if lora_B.shape[0] != out_features:
        raise ValueError(f"lora_B is {list(lora_B.shape)} [out, r] but the base weight has {out_features} outputs")
    for name, t in (("lora_A", lora_A), ("lora_B", lora_B), ("bias", bias)):
        if t is not None and t.dtype != x.dtype:
            raise TypeError(f"{name} dtype {t.dtype} does not match x dtype {x.dtype} "
                            "(cast it, or run under torch.autocast)")
    if bias is not None and tuple(bias.shape) != (out_features,):
        raise ValueError(f"bias must be [{out_features}], got shape {list(bias.shape)}")

    # (the quant state's tensors were checked against the packed weight's device above)
    check_same_device(x=x, weight=weight, lora_A=lora_A, lora_B=lora_B, bias=bias)


def autocast_and_check(x, weight, lora_A, lora_B, scaling, bias, dropout_p, quant_state) -> tuple:
    """(x, weight, lora_A, lora_B, bias) cast to the autocast dtype under torch.autocast (a
    packed 4-bit weight stays as it is), then checked (`check_lora_linear_inputs`)."""
    if isinstance(x, torch.Tensor):
        cast_to = autocast_dtype(x.device.type)
        x, lora_A, lora_B, bias = cast_floats(cast_to, x, lora_A, lora_B, bias)
        if quant_state is None:
            (weight,) = cast_floats(cast_to, weight)
    check_lora_linear_inputs(x, weight, lora_A, lora_B, scaling, bias, dropout_p, quant_state)
    return x, weight, lora_A, lora_B, bias


def check_magnitude(magnitude, out_features: int, device: torch.device) -> None:
    """Raise ValueError unless `magnitude` (DoRA's m) is a float [out_features] tensor on `device`."""
    if not isinstance(magnitude, torch.Tensor) or tuple(magnitude.shape) != (out_features,) \
            or not magnitude.is_floating_point():
        got = tuple(magnitude.shape) if isinstance(magnitude, torch.Tensor) else type(magnitude).__name__
        raise ValueError(f"magnitude must be a float tensor of shape ({out_features},) [out], got {got}")
    if magnitude.device != device:
        raise ValueError(f"magnitude is on {magnitude.device}, x on {device}: they must be on one device")


def check_frozen(*weights: torch.Tensor) -> None:
    """The fused ops compute no gradient for base weights: refuse one that asks for it."""
    if torch.is_grad_enabled() and any(w.requires_grad for w in weights):
        raise ValueError("the fused LoRA ops treat base weights as frozen and compute no gradient for them; "
                         "set weight.requires_grad_(False) (or use backend='torch')")


def cast_floats(dtype: torch.dtype | None, *tensors):
    """Each tensor cast to `dtype` if it is floating point (packed 4-bit bytes are not); None stays."""
    if dtype is None:
        return tensors
    return tuple(t.to(dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() else t for t in tensors)
