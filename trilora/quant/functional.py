"""`quantize_4bit` / `dequantize_4bit`: bitsandbytes-exact 4-bit weights, Triton or PyTorch."""
from __future__ import annotations

import torch

from ..kernels.backend import FLOAT_DTYPES, check_has_data, resolve_backend
from ..kernels.codebooks import QUANT_TYPES, code_4bit, dynamic_map_signed
from ..kernels.quant_state import BaseWeight, check_packed_state
from ..kernels.quantize_blockwise import (quantize_4bit_ref, quantize_4bit_triton,
                                          quantize_8bit_blockwise_ref, quantize_8bit_blockwise_triton)
from .state import QuantState

BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
NESTED_BLOCKSIZE = 256


def _check_options(quant_type: str, blocksize: int) -> None:
    if quant_type not in QUANT_TYPES:
        raise ValueError(f"quant_type must be one of {QUANT_TYPES}, got {quant_type!r}")
    if isinstance(blocksize, bool) or not isinstance(blocksize, int) or blocksize not in BLOCKSIZES:
        raise ValueError(f"blocksize must be one of {BLOCKSIZES}, got {blocksize!r}")


def quantize_4bit(w: torch.Tensor, quant_type: str = "nf4", blocksize: int = 64,
                  double_quant: bool = True, backend: str = "auto") -> tuple[torch.Tensor, QuantState]:
    """Quantize `w` to 4 bits exactly as bitsandbytes does.

    Args:
        w: fp32/fp16/bf16 tensor of any shape and size (flattened row-major).
        quant_type: "nf4" or "fp4".
        blocksize: elements per absmax block, a power of two in 32..4096.
        double_quant: also quantize the absmax to 8 bits (bnb's `compress_statistics`).
        backend: "auto", "triton" or "torch" (see `trilora.kernels.backend`).

    Returns:
        (packed uint8 [(n+1)//2, 1], QuantState).
    """
    if not isinstance(w, torch.Tensor):
        raise TypeError(f"w must be a torch.Tensor, got {type(w).__name__}")
    if w.dtype not in FLOAT_DTYPES:
        raise TypeError(f"w must be float32, float16 or bfloat16, got {w.dtype}")
    if w.numel() == 0:
        raise ValueError(f"cannot quantize an empty tensor (shape {tuple(w.shape)})")
    check_has_data(w=w)
    _check_options(quant_type, blocksize)
    bad = (~torch.isfinite(w)).sum().item()
    if bad:
        raise ValueError(f"w contains {bad} NaN/Inf values; refusing to quantize them")
    use = resolve_backend(backend, w)
    flat = w.reshape(-1).contiguous()
    if use == "triton":
        packed, absmax = quantize_4bit_triton(flat, blocksize, quant_type)
    else:
        packed, absmax = quantize_4bit_ref(flat, blocksize, quant_type)
    state = QuantState(absmax=absmax, shape=w.shape, dtype=w.dtype, blocksize=blocksize,
                       quant_type=quant_type, code=code_4bit(quant_type, w.device).clone())
    if double_quant:
        offset = absmax.mean()
        if use == "triton":
            codes, nested_absmax = quantize_8bit_blockwise_triton(absmax, NESTED_BLOCKSIZE, offset)
        else:
            codes, nested_absmax = quantize_8bit_blockwise_ref(absmax, NESTED_BLOCKSIZE, offset)
        state.absmax, state.nested_absmax, state.offset = codes, nested_absmax, offset
        state.nested_code = dynamic_map_signed(w.device).clone()
        state.nested_blocksize = NESTED_BLOCKSIZE
    return packed, state


def validate_quant_state(packed: torch.Tensor, state: QuantState) -> None:
    """Raise TypeError/ValueError naming the problem when `packed` and `state` do not fit
    together: a trilora QuantState, supported options and dtype, and the kernels' one
    packed/state check (`kernels.quant_state.check_packed_state`)."""
    if not isinstance(state, QuantState):
        raise TypeError(f"state must be a trilora QuantState, got {type(state).__name__}")
    _check_options(state.quant_type, state.blocksize)
    if state.dtype not in FLOAT_DTYPES:
        raise ValueError(f"state.dtype must be float32, float16 or bfloat16, got {state.dtype}")
    check_packed_state(packed, state, name="state")


def dequantize_4bit(packed: torch.Tensor, state: QuantState, dtype: torch.dtype | None = None,
                    backend: str = "auto") -> torch.Tensor:
    """Dequantize to a tensor of `state.shape` in `dtype` (default `state.dtype`).

    With double quant the absmax is restored inside the same Triton launch.
    """
    validate_quant_state(packed, state)
    dtype = state.dtype if dtype is None else dtype
    if dtype not in FLOAT_DTYPES:
        raise TypeError(f"dtype must be float32, float16 or bfloat16, got {dtype}")
    out = BaseWeight.of(packed, state).dequantized(dtype, resolve_backend(backend, packed)).weight
    return out.view(state.shape)
