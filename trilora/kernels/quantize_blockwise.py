"""Blockwise quantization to bitsandbytes' 4-bit (NF4/FP4) and 8-bit dynamic formats.

Why a kernel: one pass reads the weight once and writes the packed bytes and per-block
absmax, with the absmax reduction, code search and nibble packing fused; the nested 8-bit
step of double quantization (on the absmax vector) reuses the same kernel.

The format, bit for bit (bitsandbytes >= 0.50):
- flatten row-major, blocks of `blocksize` elements, the last block may be partial;
- absmax = max|x| per block (fp32); x is scaled by the correctly rounded reciprocal,
  `x * (1 / absmax)`, except in a partial last block, which bitsandbytes divides, `x / absmax`
  (the two differ in the last bit, which flips codes of values on a midpoint: bf16 weights
  hit midpoints often); then clamped to [-1, 1];
- the code is the table entry nearest to the scaled value, ties to the lower entry: the
  number of fp32 midpoints of the sorted table strictly below it (then mapped to the code's
  bit pattern; FP4's table is not sorted);
- 4-bit: byte k = code[2k] << 4 | code[2k+1]; an odd tail is padded with the code of 0.
"""
from __future__ import annotations

import torch

from .backend import HAS_TRITON
from .codebooks import quantize_bounds_4bit, quantize_bounds_8bit

if HAS_TRITON:
    import triton
    import triton.language as tl


# ----------------------------------------------------------------------------- reference

def _quantize_blockwise_ref(x: torch.Tensor, blocksize: int, mids: torch.Tensor,
                            order: torch.Tensor, offset: torch.Tensor | None = None):
    """Codes (int64 [n], in table order) and absmax (fp32 [nblocks]) of flat `x`."""
    flat = x.reshape(-1).float()
    if offset is not None:
        flat = flat - offset
    n = flat.numel()
    nblocks = -(-n // blocksize)
    blocks = torch.nn.functional.pad(flat, (0, nblocks * blocksize - n)).view(nblocks, blocksize)
    absmax = blocks.abs().amax(dim=1)
    safe = torch.where(absmax > 0, absmax.clamp(min=1e-38), torch.ones_like(absmax))
    scaled = blocks * (1.0 / safe)[:, None]
    if n % blocksize:
        scaled[-1] = blocks[-1] / safe[-1]
    scaled = scaled.clamp(-1.0, 1.0)
    pos = torch.bucketize(scaled, mids[:-1])  # count of midpoints strictly below
    return order.long()[pos].view(-1), absmax


def pack_4bit_ref(codes: torch.Tensor, n: int) -> torch.Tensor:
    """Pack 4-bit codes (the first `n` of `codes`, padded by its next entry) into uint8 [(n+1)//2, 1]."""
    codes = codes[: n + (n % 2)].to(torch.uint8)
    return ((codes[0::2] << 4) | codes[1::2]).unsqueeze(1)


def quantize_4bit_ref(x: torch.Tensor, blocksize: int, quant_type: str):
    """Reference: packed uint8 [(n+1)//2, 1] and absmax fp32 [ceil(n/blocksize)] of `x`."""
    mids, order = quantize_bounds_4bit(quant_type, x.device)
    codes, absmax = _quantize_blockwise_ref(x, blocksize, mids, order)
    # the padding elements of the last block are 0, so codes[n] is the code of 0.0
    return pack_4bit_ref(codes, x.numel()), absmax


def quantize_8bit_blockwise_ref(x: torch.Tensor, blocksize: int = 256,
                                offset: torch.Tensor | None = None):
    """Reference: codes uint8 [n] (signed dynamic map) and absmax fp32 of `x - offset`."""
    mids, order = quantize_bounds_8bit(x.device)
    codes, absmax = _quantize_blockwise_ref(x, blocksize, mids, order, offset)
    return codes[: x.numel()].to(torch.uint8), absmax


# ----------------------------------------------------------------------------- kernel

if HAS_TRITON:

    @triton.jit
    def _quantize_blockwise_kernel(
        # pointers
        x_ptr,        # input, any float dtype, flat [n]
        offset_ptr,   # fp32 [1], subtracted first when SUB_OFFSET
        mids_ptr,     # fp32 [TABLE_SIZE]: sorted midpoints, +inf last
        order_ptr,    # int32 [TABLE_SIZE]: sorted position -> code
        codes_ptr,    # uint8 out: packed bytes [(n+1)//2] or codes [n]
        absmax_ptr,   # fp32 out [n_blocks]
        # sizes
        n, n_blocks,
        # meta-parameters
        BLOCKSIZE: tl.constexpr,
        ROWS: tl.constexpr,          # quantization blocks per program
        LOG2_TABLE: tl.constexpr,    # 4 or 8
        PACK_4BIT: tl.constexpr,
        REMAP: tl.constexpr,         # table not sorted (FP4)
        SUB_OFFSET: tl.constexpr,
    ):
        # 1. this program's blocks: a [ROWS, BLOCKSIZE] tile of the flat input
        rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
        idx = rows[:, None] * BLOCKSIZE + tl.arange(0, BLOCKSIZE)[None, :]
        in_bounds = idx < n
        x = tl.load(x_ptr + idx, mask=in_bounds, other=0.0).to(tl.float32)
        if SUB_OFFSET:
            x = tl.where(in_bounds, x - tl.load(offset_ptr), 0.0)

        # 2. per-block absmax
        absmax = tl.max(tl.abs(x), axis=1)
        tl.store(absmax_ptr + rows, absmax, mask=rows < n_blocks)

        # 3. scale: reciprocal-multiply, division in a partial last block, both correctly
        # rounded (div_rn: GPU `/` is approximate). An all-zero block divides by 1, not by 0.
        # (the bound as an fp32 tensor: triton 3.6 types a bare 1e-38 literal as fp64)
        safe = tl.where(absmax > 0, tl.maximum(absmax, tl.full([], 1e-38, tl.float32)), 1.0)
        full = (rows + 1) * BLOCKSIZE <= n
        scaled = tl.where(full[:, None], x * tl.math.div_rn(1.0, safe)[:, None],
                          tl.math.div_rn(x, safe[:, None]))
        scaled = tl.minimum(tl.maximum(scaled, -1.0), 1.0)

        # 4. branchless binary search: pos = number of midpoints < scaled
        pos = tl.zeros([ROWS, BLOCKSIZE], dtype=tl.int32)
        for level in tl.static_range(LOG2_TABLE):
            candidate = pos + (1 << (LOG2_TABLE - 1 - level))
            mid = tl.load(mids_ptr + candidate - 1)
            pos = tl.where(mid < scaled, candidate, pos)
        if REMAP:
            pos = tl.load(order_ptr + pos)

        # 5. store codes, two per byte (even element in the high nibble) for 4-bit
        if PACK_4BIT:
            hi, lo = tl.split(tl.reshape(pos, [ROWS, BLOCKSIZE // 2, 2]))
            packed = ((hi << 4) | lo).to(tl.uint8)
            bidx = rows[:, None] * (BLOCKSIZE // 2) + tl.arange(0, BLOCKSIZE // 2)[None, :]
            tl.store(codes_ptr + bidx, packed, mask=bidx < (n + 1) // 2)
        else:
            tl.store(codes_ptr + idx, pos.to(tl.uint8), mask=in_bounds)


def _rows_per_program(blocksize: int) -> int:
    # ~2048 elements per program: enough work per program, small enough register tiles
    return max(1, 2048 // blocksize)


def _launch_quantize(x, blocksize, mids, order, codes, offset, pack_4bit, remap):
    n = x.numel()
    n_blocks = -(-n // blocksize)
    absmax = torch.empty(n_blocks, dtype=torch.float32, device=x.device)
    rows = _rows_per_program(blocksize)
    grid = (triton.cdiv(n_blocks, rows),)
    _quantize_blockwise_kernel[grid](
        x, offset if offset is not None else absmax, mids, order, codes, absmax,
        n, n_blocks,
        BLOCKSIZE=blocksize, ROWS=rows, LOG2_TABLE=mids.numel().bit_length() - 1,
        PACK_4BIT=pack_4bit, REMAP=remap, SUB_OFFSET=offset is not None,
        num_warps=8,  # 8 elements per thread: 4 warps spilled on sm_80 under triton 3.6
    )
    return absmax


def quantize_4bit_triton(x: torch.Tensor, blocksize: int, quant_type: str):
    """Triton: packed uint8 [(n+1)//2, 1] and absmax fp32 of contiguous `x` (one launch)."""
    mids, order = quantize_bounds_4bit(quant_type, x.device)
    packed = torch.empty(((x.numel() + 1) // 2, 1), dtype=torch.uint8, device=x.device)
    absmax = _launch_quantize(x, blocksize, mids, order, packed, None,
                              pack_4bit=True, remap=quant_type != "nf4")
    return packed, absmax


def quantize_8bit_blockwise_triton(x: torch.Tensor, blocksize: int = 256,
                                   offset: torch.Tensor | None = None):
    """Triton: codes uint8 [n] and absmax fp32 of contiguous `x - offset`, signed dynamic map."""
    mids, order = quantize_bounds_8bit(x.device)
    codes = torch.empty(x.numel(), dtype=torch.uint8, device=x.device)
    absmax = _launch_quantize(x, blocksize, mids, order, codes, offset,
                              pack_4bit=False, remap=False)
    return codes, absmax
