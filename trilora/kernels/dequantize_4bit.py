"""Dequantization of bitsandbytes 4-bit weights (NF4/FP4), double-quantized absmax included.

Why a kernel: bitsandbytes restores a double-quantized absmax with one launch and expands the
4-bit codes with a second. Here one launch does both, as a persistent loop over tiles of whole
quantization blocks: the packed bytes are read with 16-byte loads, each byte looked up once in a
256-entry table of (code[hi], code[lo]) fp32 pairs (`pair_table`, built per program in shared
memory: one 8-byte load per two weights, no nibble arithmetic and no global gathers), scaled by
the block's absmax (restored from its 8-bit nested code, `nested_code[q] * nested_absmax +
offset`, all fp32) and stored in element order with 16-byte stores (`join` keeps a byte's two
weights in one thread). The same table serves the GEMMs' in-loop unpack.

Rounding matches bitsandbytes: products in fp32, then one cast. The kernel is compiled
without fp contraction so `code * absmax + offset` is two roundings, as bitsandbytes does it.
"""
from __future__ import annotations

import torch

from .backend import HAS_TRITON, num_sms

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
    def pair_table(code_ptr):
        """uint64 [256]: byte b → (bits of code[b >> 4]) << 32 | bits of code[b & 15] (fp32 codes)."""
        byte = tl.arange(0, 256)
        hi = tl.load(code_ptr + (byte >> 4)).to(tl.uint32, bitcast=True).to(tl.uint64)
        lo = tl.load(code_ptr + (byte & 15)).to(tl.uint32, bitcast=True).to(tl.uint64)
        return (hi << 32) | lo

    @triton.jit
    def _dequantize_4bit_kernel(
        # pointers
        packed_ptr,          # uint8 [n_bytes]: two codes per byte, even element high
        absmax_ptr,          # fp32 [n_blocks], or uint8 codes [n_blocks] when NESTED
        code_ptr,            # fp32 [16]: the 4-bit table
        nested_absmax_ptr,   # fp32 [ceil(n_blocks / NESTED_BLOCKSIZE)]     (NESTED only)
        nested_code_ptr,     # fp32 [256]: the 8-bit dynamic map            (NESTED only)
        offset_ptr,          # fp32 [1]: mean of the absmax before nesting  (NESTED only)
        out_ptr,             # [n] output in its dtype
        # sizes (n_bytes = ceil(n / 2), passed so that its divisibility by 16 is known)
        n, n_bytes, n_blocks,
        # meta-parameters
        BLOCKSIZE: tl.constexpr,
        ROWS: tl.constexpr,  # quantization blocks per tile
        NESTED: tl.constexpr,
        NESTED_BLOCKSIZE: tl.constexpr,
    ):
        HALF: tl.constexpr = BLOCKSIZE // 2  # bytes per quantization block
        table = pair_table(code_ptr)
        # persistent: each program walks tiles num_programs apart
        for tile in tl.range(tl.program_id(0), tl.cdiv(n_blocks, ROWS), tl.num_programs(0)):
            # 1. a [ROWS, HALF] tile of bytes: whole blocks
            rows = tl.arange(0, ROWS).to(tl.int64) + tile * ROWS  # int64: n may pass 2**31
            row_ok = rows < n_blocks
            bidx = rows[:, None] * HALF + tl.arange(0, HALF)[None, :]
            packed = tl.load(packed_ptr + bidx, mask=bidx < n_bytes, other=0)
            # 2. one absmax per block, restored from its nested 8-bit code in the same launch
            if NESTED:
                q = tl.load(absmax_ptr + rows, mask=row_ok, other=0).to(tl.int32)
                nested_scale = tl.load(nested_absmax_ptr + rows // NESTED_BLOCKSIZE, mask=row_ok, other=0.0)
                absmax = tl.load(nested_code_ptr + q) * nested_scale + tl.load(offset_ptr)
            else:
                absmax = tl.load(absmax_ptr + rows, mask=row_ok, other=0.0)
            # 3. both codes of each byte from one table entry, scaled in fp32
            pair = tl.gather(table, tl.reshape(packed.to(tl.int32), (ROWS * HALF,)), 0)
            scale = tl.reshape(tl.broadcast_to(absmax[:, None], (ROWS, HALF)), (ROWS * HALF,))
            hi = (pair >> 32).to(tl.uint32).to(tl.float32, bitcast=True) * scale
            lo = pair.to(tl.uint32).to(tl.float32, bitcast=True) * scale
            # 4. nibbles back in element order, one rounding, contiguous stores
            vals = tl.reshape(tl.join(hi, lo), (ROWS, BLOCKSIZE)).to(out_ptr.dtype.element_ty)
            idx = rows[:, None] * BLOCKSIZE + tl.arange(0, BLOCKSIZE)[None, :]
            tl.store(out_ptr + idx, vals, mask=idx < n)


def _rows_per_tile(blocksize: int) -> int:
    # 4096 outputs per tile: 2 KB of bytes in, 8 KB of bf16 out
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
    rows = _rows_per_tile(blocksize)
    tiles = triton.cdiv(n_blocks, rows)
    grid = (max(1, min(tiles, 8 * num_sms(packed.device))),)  # persistent: a few programs per SM
    _dequantize_4bit_kernel[grid](
        packed, absmax, code, nested_absmax, nested_code, offset,
        out, n, (n + 1) // 2, n_blocks,
        BLOCKSIZE=blocksize, ROWS=rows, NESTED=nested, NESTED_BLOCKSIZE=nested_blocksize,
        enable_fp_fusion=False,
    )
    return out
