"""Dequantization of bitsandbytes 4-bit weights (NF4/FP4), double-quantized absmax included.

Why a kernel: bitsandbytes restores a double-quantized absmax with one launch and expands the
4-bit codes with a second. Here one launch does both: each program takes whole quantization
blocks, restores their absmax from the 8-bit nested code (`nested_code[q] * nested_absmax +
offset`, all fp32) and writes `table[code] * absmax` in the output dtype, with contiguous
wide stores (the two nibbles of a byte are interleaved with `join`, not with strided stores).

Rounding matches bitsandbytes: products in fp32, then one cast. The kernel is compiled
without fp contraction so `code * absmax + offset` is two roundings, as bitsandbytes does it.
"""
from __future__ import annotations

import torch

from .backend import HAS_TRITON

if HAS_TRITON:
    import triton
    import triton.language as tl


# ----------------------------------------------------------------------------- reference

def restore_absmax_ref(absmax_codes: torch.Tensor, nested_absmax: torch.Tensor,
                       nested_code: torch.Tensor, offset: torch.Tensor,
                       nested_blocksize: int = 256) -> torch.Tensor:
    """fp32 absmax [nblocks] from its 8-bit codes: `nested_code[q] * nested_absmax[i // 256] + offset`."""
    n = absmax_codes.numel()
    scale = nested_absmax.repeat_interleave(nested_blocksize)[:n]
    return nested_code[absmax_codes.long()] * scale + offset


def dequantize_4bit_ref(packed: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor,
                        blocksize: int, n: int, dtype: torch.dtype) -> torch.Tensor:
    """Reference: flat [n] tensor in `dtype` from packed uint8 bytes and fp32 absmax."""
    flat = packed.reshape(-1)
    codes = torch.stack([flat >> 4, flat & 0xF], dim=1).view(-1)[:n].long()
    scale = absmax.float().repeat_interleave(blocksize)[:n]
    return (code[codes] * scale).to(dtype)


# ----------------------------------------------------------------------------- kernel

if HAS_TRITON:

    @triton.jit
    def _dequantize_4bit_kernel(
        # pointers
        packed_ptr,          # uint8 [ceil(n/2)]: two codes per byte, even element high
        absmax_ptr,          # fp32 [n_blocks], or uint8 codes [n_blocks] when NESTED
        code_ptr,            # fp32 [16]: the 4-bit table
        nested_absmax_ptr,   # fp32 [ceil(n_blocks / NESTED_BLOCKSIZE)]     (NESTED only)
        nested_code_ptr,     # fp32 [256]: the 8-bit dynamic map            (NESTED only)
        offset_ptr,          # fp32 [1]: mean of the absmax before nesting  (NESTED only)
        out_ptr,             # [n] output in its dtype
        # sizes
        n, n_blocks,
        # meta-parameters
        BLOCKSIZE: tl.constexpr,
        ROWS: tl.constexpr,  # quantization blocks per program
        NESTED: tl.constexpr,
        NESTED_BLOCKSIZE: tl.constexpr,
    ):
        HALF: tl.constexpr = BLOCKSIZE // 2  # bytes per quantization block
        # 1. this program's blocks: a [ROWS, HALF] tile of bytes
        rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
        row_ok = rows < n_blocks
        bidx = rows[:, None] * HALF + tl.arange(0, HALF)[None, :]
        byte = tl.load(packed_ptr + bidx, mask=bidx < (n + 1) // 2, other=0)

        # 2. one absmax per block, restored from its nested 8-bit code in the same launch
        if NESTED:
            q = tl.load(absmax_ptr + rows, mask=row_ok, other=0).to(tl.int32)
            nested_scale = tl.load(nested_absmax_ptr + rows // NESTED_BLOCKSIZE, mask=row_ok, other=0.0)
            absmax = tl.load(nested_code_ptr + q) * nested_scale + tl.load(offset_ptr)
        else:
            absmax = tl.load(absmax_ptr + rows, mask=row_ok, other=0.0)

        # 3. table lookup (a gather, no branches) and scale, in fp32
        hi = tl.load(code_ptr + (byte >> 4).to(tl.int32)) * absmax[:, None]
        lo = tl.load(code_ptr + (byte & 0xF).to(tl.int32)) * absmax[:, None]

        # 4. interleave the nibbles back into element order and store one contiguous row per block
        vals = tl.reshape(tl.join(hi, lo), [ROWS, BLOCKSIZE])
        idx = rows[:, None] * BLOCKSIZE + tl.arange(0, BLOCKSIZE)[None, :]
        tl.store(out_ptr + idx, vals.to(out_ptr.dtype.element_ty), mask=idx < n)


def _rows_per_program(blocksize: int) -> int:
    # 4096 outputs per program: 2 KB of bytes in, 8 KB of bf16 out
    return max(1, 4096 // blocksize)


def dequantize_4bit_triton(packed: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor,
                           blocksize: int, n: int, dtype: torch.dtype,
                           nested_absmax: torch.Tensor | None = None,
                           nested_code: torch.Tensor | None = None,
                           offset: torch.Tensor | None = None,
                           nested_blocksize: int = 256,
                           out: torch.Tensor | None = None) -> torch.Tensor:
    """Triton: flat [n] tensor in `dtype`, one launch; nested absmax when `nested_absmax` is given."""
    nested = nested_absmax is not None
    if out is None:
        out = torch.empty(n, dtype=dtype, device=packed.device)
    n_blocks = absmax.numel()
    rows = _rows_per_program(blocksize)
    grid = (triton.cdiv(n_blocks, rows),)
    _dequantize_4bit_kernel[grid](
        packed, absmax, code,
        nested_absmax if nested else absmax, nested_code if nested else code,
        offset if nested else code,
        out, n, n_blocks,
        BLOCKSIZE=blocksize, ROWS=rows, NESTED=nested, NESTED_BLOCKSIZE=nested_blocksize,
        enable_fp_fusion=False,
    )
    return out
