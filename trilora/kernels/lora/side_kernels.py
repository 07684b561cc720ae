"""The skinny GEMMs beside the base GEMM of a LoRA layer (r ≪ K, N; M = tokens).

    `_lowrank_kernel`    t = scale · (x ⊙ keep) Aᵀ  [M, r]   (forward; u = s·dY B in backward)
                         draws the dropout mask (4 draws per Philox call) and writes its bits
    `_matmul_tn_kernel`  C = scale · wideᵀ small    [W, r]   dA = uᵀ (x ⊙ keep)/(1-p) as (xᵀu)ᵀ,
                                                             dB = dYᵀ t
Both are reductions over or along M = batch × sequence, which is large in training and small
in count of output tiles (dA at K = 4096, r = 16 is 32 tiles of 128 for 132 SMs): the launchers
split the reduction (over M for `_matmul_tn_kernel`, over K for `_lowrank_kernel`) so that
every SM has work, writing fp32 partials that one sum reduces (deterministic: no atomics).
The wide operand is the MMA's M side (64-128 rows), r the N side (wgmma takes N = 8..256).
"""
from __future__ import annotations

from ..backend import HAS_TRITON

if HAS_TRITON:
    import triton
    import triton.language as tl

    from .dropout import expand_bits, keep_bytes, load_keep_bits

    @triton.jit
    def _lowrank_kernel(
        # pointers
        a_ptr, stride_am, stride_ak,                 # [M, K] activations (x, or dY)
        b_ptr, stride_br, stride_bk,                 # [R, K] low-rank factor (A, or Bᵀ as a view)
        out_ptr, stride_os, stride_om, stride_or,    # [splits, M, R]: fp32 partials, or the result
        bits_ptr, stride_bits,                       # uint8 [M, ⌈K/8⌉] keep bits written, or None
        # scalars and sizes
        seed, threshold, scale, M, K, R, K_PER_SPLIT,       # threshold: `dropout.keep_threshold(p)`
        # meta-parameters
        HAS_DROPOUT: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
    ):
        # 1. program → rows, rank columns, K range
        pid_m, pid_r, pid_s = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        offs_m = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)  # int64: M·K may pass 2**31
        offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
        k_start = pid_s * K_PER_SPLIT
        k_end = min(K, k_start + K_PER_SPLIT)
        acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        # 2. K-loop; the mask is drawn here, once per element of x, and kept as bits
        for k0 in range(k_start, k_end, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            a = tl.load(a_ptr + offs_m[:, None] * stride_am + offs_k[None, :] * stride_ak,
                        mask=(offs_m[:, None] < M) & (offs_k[None, :] < K), other=0.0)
            if HAS_DROPOUT:
                packed = keep_bytes(seed, offs_m, k0 // 8, K, threshold, BLOCK_M, BLOCK_K // 8)
                if bits_ptr is not None:
                    if pid_r == 0:  # one writer per row tile
                        offs_b = k0 // 8 + tl.arange(0, BLOCK_K // 8)
                        ok = (offs_m[:, None] < M) & (offs_b[None, :] < (K + 7) // 8)
                        tl.store(bits_ptr + offs_m[:, None] * stride_bits + offs_b[None, :], packed, mask=ok)
                a = tl.where(expand_bits(packed, BLOCK_M, BLOCK_K), a, 0.0)
            b = tl.load(b_ptr + offs_r[None, :] * stride_br + offs_k[:, None] * stride_bk,
                        mask=(offs_k[:, None] < K) & (offs_r[None, :] < R), other=0.0)
            acc = tl.dot(a.to(DOT_DTYPE), b.to(DOT_DTYPE), acc, input_precision=PRECISION)
        # 3. scale in fp32 (dropout's 1/(1-p) folded in), one rounding, store
        ok = (offs_m[:, None] < M) & (offs_r[None, :] < R)
        tl.store(out_ptr + pid_s * stride_os + offs_m[:, None] * stride_om + offs_r[None, :] * stride_or,
                 (acc * scale).to(out_ptr.dtype.element_ty), mask=ok)

    @triton.jit
    def _matmul_tn_kernel(
        # pointers
        wide_ptr, stride_wm, stride_ww,              # [M, W] (x, masked by keep bits; or dY)
        small_ptr, stride_sm, stride_ss,             # [M, S] (u, or t)
        out_ptr, stride_osplit, stride_ow, stride_os,  # C [splits, W, S]: fp32 partials, or the result
        bits_ptr, stride_bits,                       # keep bits of `wide`, or None
        # scalars and sizes
        scale, M, W, S, M_PER_SPLIT,
        # meta-parameters
        DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
        BLOCK_W: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_M: tl.constexpr,
    ):
        # 1. program → output tile and its share of the rows
        pid_w, pid_s, pid_k = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        offs_w = pid_w * BLOCK_W + tl.arange(0, BLOCK_W)
        offs_s = pid_s * BLOCK_S + tl.arange(0, BLOCK_S)
        m_start = pid_k * M_PER_SPLIT
        m_end = min(M, m_start + M_PER_SPLIT)
        acc = tl.zeros((BLOCK_W, BLOCK_S), dtype=tl.float32)
        # 2. reduction over the rows (tokens) of both operands
        for m0 in range(m_start, m_end, BLOCK_M):
            offs_m = m0 + tl.arange(0, BLOCK_M).to(tl.int64)
            x = tl.load(wide_ptr + offs_m[:, None] * stride_wm + offs_w[None, :] * stride_ww,
                        mask=(offs_m[:, None] < m_end) & (offs_w[None, :] < W), other=0.0)
            if bits_ptr is not None:
                x = tl.where(load_keep_bits(bits_ptr, stride_bits, offs_m, pid_w * BLOCK_W, M, W, BLOCK_M, BLOCK_W),
                             x, 0.0)
            y = tl.load(small_ptr + offs_m[:, None] * stride_sm + offs_s[None, :] * stride_ss,
                        mask=(offs_m[:, None] < m_end) & (offs_s[None, :] < S), other=0.0)
            acc = tl.dot(tl.trans(x.to(DOT_DTYPE)), y.to(DOT_DTYPE), acc, input_precision=PRECISION)
        # 3. scale in fp32, store
        ok = (offs_w[:, None] < W) & (offs_s[None, :] < S)
        tl.store(out_ptr + pid_k * stride_osplit + offs_w[:, None] * stride_ow + offs_s[None, :] * stride_os,
                 (acc * scale).to(out_ptr.dtype.element_ty), mask=ok)
