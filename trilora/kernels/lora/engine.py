"""The LoRA GEMM engine: the base-weight operand and the launchers every LoRA op builds on.

    BaseWeight  a frozen W [out, in], dense or packed 4-bit (`../quant_state.py`, re-exported here)
    gemm        out = c ⊙ (mask ⊙ (L Rm)/(1-p) + Σ_s A_s op(W_s)) + bias   (`gemm_kernels.py`)
    lowrank     t = scale · (a ⊙ keep) bᵀ, drawing the dropout mask and keeping it as bits
    matmul_tn   scale · wideᵀ small, split over M (dA, dB)

`gemm` picks the path: a 4-bit W is unpacked inside the K-loop below
`configs.DEQUANT_BUFFER_MIN_M` rows, else dequantized once into a transient buffer; dense
operands go through TMA descriptors and a persistent grid on sm_90+ when their strides allow
it, through pointer loads otherwise (sm_80, the interpreter, any strides). The tile comes from
`configs.gemm_tile`. Inputs are not checked here (the public ops check them).
"""
from __future__ import annotations

import torch

from ..backend import HAS_TRITON, interpreter_active, output  # noqa: F401  (output: the LoRA ops' allocator)
from ..quant_state import BaseWeight  # noqa: F401  (the engine's operand; defined with the quant-state contract)
from . import configs
from .dropout import keep_threshold

if HAS_TRITON:
    import triton
    import triton.language as tl
    from triton.tools.tensor_descriptor import TensorDescriptor

    from .gemm_kernels import _gemm_kernel, _gemm_tma_kernel
    from .side_kernels import _lowrank_kernel, _matmul_tn_kernel



_TL_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16} if HAS_TRITON else {}


def dot_dtype(dtype: torch.dtype):
    # The interpreter's bf16 arithmetic is wrong (raw uint16 bits): multiply bf16 tiles in fp32.
    if dtype == torch.bfloat16 and interpreter_active():
        return tl.float32
    return _TL_DTYPES[dtype]


def precision(dtype: torch.dtype) -> str:
    # fp32 operands: TF32 only where torch's own fp32 matmuls may use it (float32_matmul_precision),
    # else exact fp32 ("ieee"). fp16/bf16 operands ignore it.
    if dtype == torch.float32 and (interpreter_active() or torch.get_float32_matmul_precision() == "highest"):
        return "ieee"
    return "tf32"


def _rank_block(r: int, cap: int) -> int:
    return min(cap, max(16, triton.next_power_of_2(r)))


# ----------------------------------------------------------------------------- gemm

def _unpack_in_loop(bases, m: int) -> bool:
    """4-bit W unpacked in the K-loop: small M, one format, blocks that do not straddle rows."""
    first = bases[0]
    return (m < configs.DEQUANT_BUFFER_MIN_M and all(b.quantized and b.format() == first.format() for b in bases)
            and all(b.shape[1] % b.blocksize == 0 for b in bases))


def _tma_ready(*tensors: torch.Tensor) -> bool:
    """2-D, unit last stride, 16-byte aligned base and row strides: what a TMA descriptor needs."""
    return all(t.dim() == 2 and t.stride(1) == 1 and t.data_ptr() % 16 == 0
               and (t.stride(0) * t.element_size()) % 16 == 0 for t in tensors)


def gemm(out: torch.Tensor, segments, w_transposed: bool, lowrank=None, keep_bits=None, inv_keep: float = 1.0,
         bias: torch.Tensor | None = None, col_scale: torch.Tensor | None = None) -> torch.Tensor:
    """out [M, N] (any strides) = c ⊙ (mask ⊙ (L Rm)·inv_keep + Σ_s A_s op(W_s)) + bias, in out's dtype.

    segments: 1-3 (A_s [M, K_s], BaseWeight); op(W) = Wᵀ (W [N, K_s]) when `w_transposed`,
    else W (W [K_s, N]). lowrank: (L [M, R], Rm [R, N]) views or None. keep_bits: uint8
    [M, ⌈N/8⌉] masking the low-rank term, or None. bias: [N] or None. col_scale: fp32 [N]
    multiplying each output column in the epilogue (DoRA's rescale), or None.
    """
    m, n = out.shape
    if m == 0:
        return out
    dtype, device = out.dtype, out.device
    acts = [a for a, _ in segments]
    bases = [b for _, b in segments]
    quant = any(b.quantized for b in bases)
    if quant and not _unpack_in_loop(bases, m):
        bases, quant = [b.dequantized(dtype) for b in bases], False  # transient dense copies of W
    tensor_cores = precision(dtype) == "tf32"
    tile = configs.gemm_tile(m, n, out.element_size(), device, unpack_4bit=quant, tensor_cores=tensor_cores,
                             segments=len(segments))
    lr = (None, 0, 0, None, 0, 0, 0) if lowrank is None else (
        lowrank[0], *lowrank[0].stride(), lowrank[1], *lowrank[1].stride(), lowrank[0].shape[1])
    masked = (keep_bits, keep_bits.stride(0) if keep_bits is not None else 0, inv_keep)
    common = dict(N_SEG=len(segments), W_T=w_transposed, DOT_DTYPE=dot_dtype(dtype), PRECISION=precision(dtype),
                  BLOCK_R=_rank_block(lr[-1], 64), **tile.meta())
    seg_ks = tuple(a.shape[1] for a in acts)
    num_tiles = triton.cdiv(m, tile.block_m) * triton.cdiv(n, tile.block_n)
    ws = [b.weight for b in bases]
    # TMA for single-segment GEMMs: triton 3.6 (the GPU image's) stops pipelining the wgmma of a
    # persistent TMA kernel with two K-loops; the pointer kernel pipelines every segment's loop.
    if (not quant and tensor_cores and len(segments) == 1 and configs.USE_TMA and configs.arch_of(device) >= 90
            and _tma_ready(out, *acts, *ws)):
        bm, bn, bk = tile.block_m, tile.block_n, tile.block_k
        desc = TensorDescriptor.from_tensor
        w_block = [bn, bk] if w_transposed else [bk, bn]
        _gemm_tma_kernel[(min(num_tiles, configs.num_sms(device)),)](
            desc(out, [bm, bn]), m, n, tuple(desc(a, [bm, bk]) for a in acts), tuple(desc(w, w_block) for w in ws),
            seg_ks, *lr, *masked, bias, col_scale, OUT_DTYPE=_TL_DTYPES[dtype], **common)
        return out
    if quant:
        b0 = bases[0]
        w_args = (tuple(ws), None, tuple(b.absmax for b in bases), tuple(b.code for b in bases),
                  tuple(b.nested_absmax for b in bases), tuple(b.offset for b in bases), b0.nested_code)
        fmt = dict(QUANT=True, NESTED=b0.nested, BLOCKSIZE=b0.blocksize, NESTED_BLOCKSIZE=max(1, b0.nested_blocksize))
    else:  # op(W)'s strides as a [K_s, N] matrix
        strides = [s for w in ws for s in (w.stride()[::-1] if w_transposed else w.stride())]
        w_args = (tuple(ws), tuple(strides), None, None, None, None, None)
        fmt = dict(QUANT=False, NESTED=False, BLOCKSIZE=1, NESTED_BLOCKSIZE=1)
    _gemm_kernel[(num_tiles,)](
        out, *out.stride(), m, n, tuple(acts), tuple(s for a in acts for s in a.stride()), seg_ks, *w_args,
        *lr, *masked, bias, col_scale, **fmt, **common,
        # a nested absmax is code·scale + offset, two roundings as in bitsandbytes: no fma
        **(dict(enable_fp_fusion=False) if quant else {}))
    return out


# ----------------------------------------------------------------------------- side GEMMs

def lowrank(a: torch.Tensor, b: torch.Tensor, scale: float, seed: int = 0, p: float = 0.0,
            write_bits: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(out [M, R] in a's dtype, keep bits uint8 [M, ⌈K/8⌉] or None).

    out = scale · (a ⊙ keep) bᵀ for a [M, K], b [R, K] (any strides); keep = the dropout mask of
    (seed, p) over a (all True when p == 0). Bits are written when `write_bits` and p > 0.
    """
    (m, k), r = a.shape, b.shape[0]
    device = a.device
    bits = output((m, (k + 7) // 8), torch.uint8, device) if write_bits and p > 0 else None
    block_m, block_k, block_r = 64, 64, _rank_block(r, 256)
    tiles = triton.cdiv(m, block_m) * triton.cdiv(r, block_r)
    splits = configs.split_count(tiles, k, device)
    k_per = triton.cdiv(triton.cdiv(k, splits), block_k) * block_k
    splits = triton.cdiv(k, k_per)
    out = output((m, r), a.dtype, device) if splits == 1 else \
        torch.empty((splits, m, r), dtype=torch.float32, device=device)
    if m:
        o = out if splits > 1 else out.unsqueeze(0)
        _lowrank_kernel[(triton.cdiv(m, block_m), triton.cdiv(r, block_r), splits)](
            a, *a.stride(), b, *b.stride(), o, *o.stride(), bits, bits.stride(0) if bits is not None else 0,
            seed, keep_threshold(p) if p > 0 else 0, scale, m, k, r, k_per, HAS_DROPOUT=p > 0, DOT_DTYPE=dot_dtype(a.dtype),
            PRECISION=precision(a.dtype), BLOCK_M=block_m, BLOCK_R=block_r, BLOCK_K=block_k,
            num_warps=8 if block_r >= 128 else 4)
    if splits > 1:
        out = out.sum(0).to(a.dtype)
    return out, bits


def matmul_tn(wide: torch.Tensor, small: torch.Tensor, scale: float, dtype: torch.dtype,
              keep_bits: torch.Tensor | None = None, transpose: bool = False) -> torch.Tensor:
    """scale · (wide ⊙ keep)ᵀ small: [W, S] (or its transpose [S, W] when `transpose`), in `dtype`.

    wide [M, W], small [M, S] (any strides); keep from bits uint8 [M, ⌈W/8⌉], or all True.
    """
    (m, w), s = wide.shape, small.shape[1]
    device = wide.device
    block_w, block_s, block_m = (128 if w >= 128 else 64), _rank_block(s, 128), 64
    tiles = triton.cdiv(w, block_w) * triton.cdiv(s, block_s)
    splits = configs.split_count(tiles, m, device)
    m_per = triton.cdiv(triton.cdiv(max(m, 1), splits), block_m) * block_m
    splits = triton.cdiv(max(m, 1), m_per)
    if splits == 1:
        out = output((s, w) if transpose else (w, s), dtype, device)
        strides = (0, *(out.stride()[::-1] if transpose else out.stride()))
    else:
        part = torch.empty((splits, w, s), dtype=torch.float32, device=device)
        out, strides = part, part.stride()
    _matmul_tn_kernel[(triton.cdiv(w, block_w), triton.cdiv(s, block_s), splits)](
        wide, *wide.stride(), small, *small.stride(), out, *strides,
        keep_bits, keep_bits.stride(0) if keep_bits is not None else 0, scale, m, w, s, m_per,
        DOT_DTYPE=dot_dtype(wide.dtype), PRECISION=precision(wide.dtype),
        BLOCK_W=block_w, BLOCK_S=block_s, BLOCK_M=block_m, num_warps=8 if block_w * block_s >= 128 * 64 else 4)
    if splits > 1:
        out = out.sum(0)
        out = (out.t() if transpose else out).to(dtype).contiguous()
    return out
