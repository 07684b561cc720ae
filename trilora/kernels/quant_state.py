"""What a 4-bit quant state is to the kernels: one protocol, one check, one dequantize.

A packed 4-bit weight (bitsandbytes' format: element i in byte i // 2, the even element in the
high nibble) means nothing without its state: the block scales (`absmax`, fp32, or with double
quantization uint8 codes restored as `nested_code[q] · nested_absmax[block // nested_blocksize]
+ offset`), the 16-entry `code` book and the `shape`. `trilora.quant.QuantState` is the
implementation; the kernels take anything with these attributes (`QuantStateLike`), so that
e.g. PEFT's bitsandbytes states convert without copies.

- `check_packed_state`: the one check that packed bytes and a state fit together (every
  public entry point — `quant.validate_quant_state`, the LoRA ops — runs it).
- `BaseWeight`: a frozen base weight as the kernels read it (dense, or packed + the state's
  tensors in the kernels' dtypes), and `BaseWeight.dequantized`, the one dequantize-from-state
  (Triton or PyTorch reference) everything else calls.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Protocol

import torch

from .backend import HAS_TRITON, check_same_device
from .dequantize_4bit import dequantize_4bit_ref, restore_absmax_ref

if HAS_TRITON:
    from .dequantize_4bit import dequantize_4bit_triton


class QuantStateLike(Protocol):
    """The attributes a 4-bit quant state must have (`trilora.quant.QuantState` has them)."""
    shape: torch.Size | tuple
    absmax: torch.Tensor          # fp32 [nblocks], or uint8 codes when double-quantized
    code: torch.Tensor            # 16 entries: the 4-bit code book (NF4 / FP4)
    blocksize: int
    nested_absmax: torch.Tensor | None   # fp32 [ceil(nblocks / nested_blocksize)], or None
    nested_code: torch.Tensor | None     # 256 entries
    offset: torch.Tensor | None          # scalar
    nested_blocksize: int


def check_packed_state(packed: torch.Tensor, state: QuantStateLike, name: str = "quant_state") -> tuple[int, ...]:
    """The shape `state` describes; raises TypeError/ValueError naming `name` and the problem
    when `packed` (the uint8 bytes) and `state` do not fit together."""
    for attr in ("absmax", "code", "blocksize", "shape"):
        if getattr(state, attr, None) is None:
            raise TypeError(f"{name} lacks '{attr}' (expected a QuantState-like object)")
    if not isinstance(packed, torch.Tensor) or packed.dtype != torch.uint8:
        got = packed.dtype if isinstance(packed, torch.Tensor) else type(packed).__name__
        raise TypeError(f"{name} was given, so the weight must be the packed uint8 4-bit tensor, got {got}")
    shape = tuple(int(d) for d in state.shape)
    n = math.prod(shape)
    if packed.numel() != (n + 1) // 2:
        raise ValueError(f"the packed weight has {packed.numel()} bytes but {name}.shape {list(shape)} needs "
                         f"{(n + 1) // 2}: is the state from another tensor?")
    if not packed.is_contiguous():
        raise ValueError("the packed 4-bit weight must be contiguous")
    blocksize = int(state.blocksize)
    nblocks = -(-n // blocksize) if blocksize > 0 else -1
    absmax = state.absmax
    if blocksize <= 0 or absmax.numel() != nblocks:
        raise ValueError(f"{name}.absmax has {absmax.numel()} entries; shape {list(shape)} with blocksize "
                         f"{blocksize} needs {nblocks}")
    if state.code.numel() != 16:
        raise ValueError(f"{name}.code must have 16 entries, got {state.code.numel()}")
    nested_absmax = getattr(state, "nested_absmax", None)
    if nested_absmax is not None:
        nested_code, offset = getattr(state, "nested_code", None), getattr(state, "offset", None)
        if nested_code is None or offset is None:
            raise ValueError(f"a double-quantized {name} needs nested_code and offset")
        if absmax.dtype != torch.uint8:
            raise ValueError(f"a double-quantized {name} needs uint8 absmax codes, got {absmax.dtype}")
        need = -(-nblocks // int(state.nested_blocksize))
        if nested_absmax.numel() != need:
            raise ValueError(f"{name}.nested_absmax has {nested_absmax.numel()} entries, needs {need}")
        if nested_code.numel() != 256:
            raise ValueError(f"{name}.nested_code has {nested_code.numel()} entries, needs 256")
    elif absmax.dtype != torch.float32:
        raise ValueError(f"{name}.absmax must be float32 without double quant, got {absmax.dtype}")
    offset = getattr(state, "offset", None)
    check_same_device(packed=packed, absmax=absmax, code=state.code, nested_absmax=nested_absmax,
                      nested_code=getattr(state, "nested_code", None),
                      offset=offset if torch.is_tensor(offset) else None)
    return shape


class BaseWeight(NamedTuple):
    """A frozen base weight W as the kernels read it.

    Dense: `weight` is W itself [out, in], any strides. 4-bit: `weight` holds the packed bytes
    (flat), `absmax` fp32 [nblocks] or, double-quantized, uint8 codes restored as
    nested_code[q] · nested_absmax[block // nested_blocksize] + offset.
    """
    weight: torch.Tensor
    shape: tuple
    absmax: torch.Tensor | None = None
    code: torch.Tensor | None = None
    blocksize: int = 0
    nested_absmax: torch.Tensor | None = None
    nested_code: torch.Tensor | None = None
    offset: torch.Tensor | None = None
    nested_blocksize: int = 0

    @classmethod
    def of(cls, weight: torch.Tensor, quant_state: QuantStateLike | None = None) -> "BaseWeight":
        """From a dense W, or from packed bytes and a quant state (checked by the caller)."""
        if quant_state is None:
            return cls(weight, tuple(weight.shape))
        qs = quant_state
        nested = qs.nested_absmax is not None
        offset = torch.as_tensor(qs.offset, dtype=torch.float32, device=weight.device).reshape(1) if nested else None
        return cls(weight.reshape(-1), tuple(int(d) for d in qs.shape), qs.absmax, qs.code.float(), int(qs.blocksize),
                   qs.nested_absmax.float() if nested else None, qs.nested_code.float() if nested else None,
                   offset, int(qs.nested_blocksize) if nested else 0)

    @property
    def quantized(self) -> bool:
        return self.absmax is not None

    @property
    def nested(self) -> bool:
        return self.nested_absmax is not None

    def format(self) -> tuple:
        return self.quantized, self.nested, self.blocksize, self.nested_blocksize

    def dequantized(self, dtype: torch.dtype, backend: str = "triton") -> "BaseWeight":
        """Dense W of `self.shape` in `dtype`: with "triton" one launch of the standalone kernel
        (the numbers the GEMMs' in-loop unpack gives), with "torch" the PyTorch reference (the
        same bits: fp32 products, one rounding)."""
        if not self.quantized:
            return self
        n = math.prod(self.shape)
        if backend == "triton":
            kw = dict(nested_absmax=self.nested_absmax, nested_code=self.nested_code, offset=self.offset,
                      nested_blocksize=self.nested_blocksize) if self.nested else {}
            flat = dequantize_4bit_triton(self.weight, self.absmax, self.code, self.blocksize, n, dtype, **kw)
        else:
            absmax = self.absmax
            if self.nested:
                absmax = restore_absmax_ref(absmax, self.nested_absmax, self.nested_code, self.offset,
                                            self.nested_blocksize)
            flat = dequantize_4bit_ref(self.weight, absmax, self.code, self.blocksize, n, dtype)
        return BaseWeight(flat.view(self.shape), self.shape)


__all__ = ["BaseWeight", "QuantStateLike", "check_packed_state"]
