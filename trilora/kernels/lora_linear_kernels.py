"""Triton kernels of the fused LoRA linear op (launchers and autograd live in `lora_linear.py`).

Forward, two launches:
  1. `_lowrank_kernel`:   t = s/(1-p) · (x ⊙ keep) Aᵀ                     [M, r], tiny
  2. `_lora_fwd_kernel`:  y = [x, t] · [W; B]ᵀ + b                          [M, N]
     the low-rank product is one more K-segment of the base GEMM's accumulator, so the
     output is written once; a 4-bit W is dequantized tile by tile inside the K-loop from the
     packed bytes and absmax (never materialised).
Backward:
  `_lowrank_kernel` again for u = s · dY B [M, r] (and t, recomputed for dB),
  `_lora_dx_kernel`:      dX = dY W + (u A) ⊙ keep / (1-p)                 [M, K], one pass
  `_matmul_tn_kernel`:    dA = uᵀ (x ⊙ keep) / (1-p) [r, K],  dB = dYᵀ t [N, r]

Dropout: `keep = rand(seed, m*K + k) >= p`, Philox counter keyed on the element's logical
index of x, so every kernel (and `_dropout_keep_kernel`, for tests) regenerates the same mask
from one integer; no mask tensor is ever stored. The 1/(1-p) factor is applied to the fp32
accumulator, not to x, so dropout adds no rounding of its own.

Numerics: tiles are loaded, cast to DOT_DTYPE (the input dtype; fp32 for bf16 under the
interpreter, whose bf16 arithmetic is wrong) and accumulated in fp32. A 4-bit W element is
`code[nibble] * absmax` in fp32, rounded once to x's dtype: the numbers `dequantize_4bit`
writes. Launch with `enable_fp_fusion=False` so a nested absmax `nested_code[q] *
nested_absmax + offset` is rounded twice, as in bitsandbytes.
"""
from __future__ import annotations

from .backend import HAS_TRITON

if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _dropout_keep(seed, rows, cols, n_cols, p):
        """Keep-mask of dropout for x[rows, cols] (broadcast index tensors): rand >= p."""
        return tl.rand(seed, rows.to(tl.int64) * n_cols + cols) >= p

    @triton.jit
    def _load_base_tile(w_ptr, absmax_ptr, code_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr,
                        rows, cols, N, K, stride_wn, stride_wk,
                        QUANT: tl.constexpr, NESTED: tl.constexpr, BLOCKSIZE: tl.constexpr,
                        NESTED_BLOCKSIZE: tl.constexpr):
        """Tile W[rows, cols] of the base weight [N, K], zero outside W: W's dtype when dense,
        fp32 `code[nibble] * absmax` when QUANT (the caller rounds it once to x's dtype).

        `rows`/`cols` are broadcastable index tensors ([1, BN] and [BK, 1] give Wᵀ's tile).
        QUANT: W is packed 4-bit, element i = row*K + col (flat, row-major) sits in byte i//2,
        high nibble for even i; its absmax block is i // BLOCKSIZE, which may straddle rows.
        """
        inside = (rows < N) & (cols < K)
        if QUANT:
            i = rows.to(tl.int64) * K + cols
            byte = tl.load(w_ptr + i // 2, mask=inside, other=0).to(tl.int32)
            nibble = (byte >> (4 - 4 * (i & 1)).to(tl.int32)) & 0xF
            blk = i // BLOCKSIZE
            if NESTED:  # double quant: the absmax is itself 8-bit, restored here
                q = tl.load(absmax_ptr + blk, mask=inside, other=0).to(tl.int32)
                scale = tl.load(nested_absmax_ptr + blk // NESTED_BLOCKSIZE, mask=inside, other=0.0)
                absmax = tl.load(nested_code_ptr + q) * scale + tl.load(offset_ptr)
            else:
                absmax = tl.load(absmax_ptr + blk, mask=inside, other=0.0)
            w = tl.load(code_ptr + nibble) * absmax  # fp32, exactly dequantize_4bit's product
            w = tl.where(inside, w, 0.0)
        else:
            w = tl.load(w_ptr + rows * stride_wn + cols * stride_wk, mask=inside, other=0.0)
        return w

    @triton.jit
    def _grouped_tile_offsets(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
        """Row and column offsets of this program's [BLOCK_M, BLOCK_N] output tile, GROUP_M row
        tiles at a time so the weight tiles they share stay in L2 (Triton's matmul tutorial)."""
        pid = tl.program_id(0)
        num_m = tl.cdiv(M, BLOCK_M)
        num_n = tl.cdiv(N, BLOCK_N)
        group = pid // (GROUP_M * num_n)
        first_m = group * GROUP_M
        group_size = min(num_m - first_m, GROUP_M)
        pid_m = first_m + (pid % (GROUP_M * num_n)) % group_size
        pid_n = (pid % (GROUP_M * num_n)) // group_size
        offs_m = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)  # int64: M·K may pass 2**31
        return offs_m, pid_n * BLOCK_N + tl.arange(0, BLOCK_N)

    @triton.jit
    def _lowrank_kernel(
        # pointers
        a_ptr,            # [M, K] activations (x, or dY)
        b_ptr,            # [R, K] low-rank factor (A, or Bᵀ as a strided view)
        out_ptr,          # [M, R] out = scale · (a ⊙ keep) bᵀ, in out's dtype
        # scalars
        seed, p, scale,
        # sizes
        M, K, R,
        # strides
        stride_am, stride_ak, stride_br, stride_bk, stride_om, stride_or,
        # meta-parameters
        HAS_DROPOUT: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
    ):
        # 1. map program id to an output tile [BLOCK_M, BLOCK_R]
        offs_m = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)  # int64: M·K may pass 2**31
        offs_r = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
        acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        # 2./3. K-loop over the shared dimension
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            a_ok = (offs_m[:, None] < M) & (offs_k[None, :] < K)
            a = tl.load(a_ptr + offs_m[:, None] * stride_am + offs_k[None, :] * stride_ak, mask=a_ok, other=0.0)
            if HAS_DROPOUT:
                a = tl.where(_dropout_keep(seed, offs_m[:, None], offs_k[None, :], K, p), a, 0.0)
            b_ok = (offs_k[:, None] < K) & (offs_r[None, :] < R)
            b = tl.load(b_ptr + offs_r[None, :] * stride_br + offs_k[:, None] * stride_bk, mask=b_ok, other=0.0)
            acc = tl.dot(a.to(DOT_DTYPE), b.to(DOT_DTYPE), acc, input_precision=PRECISION)
        # 4. epilogue: scale in fp32 (dropout's 1/(1-p) folded in), one rounding
        out = (acc * scale).to(out_ptr.dtype.element_ty)
        # 5. store
        ok = (offs_m[:, None] < M) & (offs_r[None, :] < R)
        tl.store(out_ptr + offs_m[:, None] * stride_om + offs_r[None, :] * stride_or, out, mask=ok)

    @triton.jit
    def _lora_fwd_kernel(
        # pointers
        x_ptr,            # [M, K] input, any strides
        w_ptr,            # [N, K] dense base weight, or packed uint8 [(N*K+1)//2] when QUANT
        t_ptr,            # [M, R] t = s·dropout(x)Aᵀ, x's dtype
        lora_b_ptr,       # [N, R]
        bias_ptr,         # [N] (HAS_BIAS)
        y_ptr,            # [M, N] output, x's dtype
        absmax_ptr, code_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr,  # QUANT only
        # sizes
        M, N, K, R,
        # strides
        stride_xm, stride_xk, stride_wn, stride_wk, stride_tm, stride_tr,
        stride_bn, stride_br, stride_ym, stride_yn,
        # meta-parameters
        HAS_BIAS: tl.constexpr, QUANT: tl.constexpr, NESTED: tl.constexpr,
        BLOCKSIZE: tl.constexpr, NESTED_BLOCKSIZE: tl.constexpr,
        DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    ):
        # 1. map program id to an output tile, GROUP_M row-tiles at a time so the W tiles they
        #    share stay in L2
        offs_m, offs_n = _grouped_tile_offsets(M, N, BLOCK_M, BLOCK_N, GROUP_M)
        compute_dtype = y_ptr.dtype.element_ty

        # 2./3. base K-loop: acc += x[:, k] @ W[:, k]ᵀ, W's tile dequantized in registers
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            x_ok = (offs_m[:, None] < M) & (offs_k[None, :] < K)
            x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk, mask=x_ok, other=0.0)
            w_t = _load_base_tile(w_ptr, absmax_ptr, code_ptr, nested_absmax_ptr, nested_code_ptr,
                                  offset_ptr, offs_n[None, :], offs_k[:, None], N, K, stride_wn, stride_wk,
                                  QUANT, NESTED, BLOCKSIZE, NESTED_BLOCKSIZE)  # [BK, BN]
            w_t = w_t.to(compute_dtype).to(DOT_DTYPE)
            acc = tl.dot(x.to(DOT_DTYPE), w_t, acc, input_precision=PRECISION)

        # 4. low-rank K-segment into the same accumulator: acc += t @ Bᵀ
        for r0 in range(0, R, BLOCK_K):
            offs_r = r0 + tl.arange(0, BLOCK_K)
            t_ok = (offs_m[:, None] < M) & (offs_r[None, :] < R)
            t = tl.load(t_ptr + offs_m[:, None] * stride_tm + offs_r[None, :] * stride_tr, mask=t_ok, other=0.0)
            b_ok = (offs_r[:, None] < R) & (offs_n[None, :] < N)
            b_t = tl.load(lora_b_ptr + offs_n[None, :] * stride_bn + offs_r[:, None] * stride_br, mask=b_ok, other=0.0)
            acc = tl.dot(t.to(DOT_DTYPE), b_t.to(DOT_DTYPE), acc, input_precision=PRECISION)

        # 5. epilogue (bias) and the only store of y
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
        y_ok = (offs_m[:, None] < M) & (offs_n[None, :] < N)
        tl.store(y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :] * stride_yn,
                 acc.to(compute_dtype), mask=y_ok)

    @triton.jit
    def _dx_segment(acc, offs_m, offs_k, M, K,
                    dy_ptr, stride_dym, stride_dyn, N,
                    w_ptr, stride_wn, stride_wk, absmax_ptr, code_ptr, nested_absmax_ptr, nested_code_ptr,
                    offset_ptr, dx_ptr,
                    QUANT: tl.constexpr, NESTED: tl.constexpr, BLOCKSIZE: tl.constexpr,
                    NESTED_BLOCKSIZE: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
                    BLOCK_K: tl.constexpr):
        """acc += dY[rows, :N] @ W[:N, cols] of one projection; W's tiles (dequantized when QUANT)
        rounded to dX's dtype first."""
        for n0 in range(0, N, BLOCK_K):
            offs_n = n0 + tl.arange(0, BLOCK_K)
            dy_ok = (offs_m[:, None] < M) & (offs_n[None, :] < N)
            dy = tl.load(dy_ptr + offs_m[:, None] * stride_dym + offs_n[None, :] * stride_dyn, mask=dy_ok, other=0.0)
            w = _load_base_tile(w_ptr, absmax_ptr, code_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr,
                                offs_n[:, None], offs_k[None, :], N, K, stride_wn, stride_wk,
                                QUANT, NESTED, BLOCKSIZE, NESTED_BLOCKSIZE)  # [BK, BN]
            acc = tl.dot(dy.to(DOT_DTYPE), w.to(dx_ptr.dtype.element_ty).to(DOT_DTYPE), acc,
                         input_precision=PRECISION)
        return acc

    @triton.jit
    def _dx_lowrank_and_store(acc, offs_m, offs_k, M, K, R, u_ptr, stride_um, stride_ur,
                              lora_a_ptr, stride_ar, stride_ak, dx_ptr, stride_dxm, stride_dxk,
                              seed, p, inv_keep, HAS_DROPOUT: tl.constexpr, DOT_DTYPE: tl.constexpr,
                              PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                              BLOCK_K: tl.constexpr):
        """dX[rows, cols] = acc + (u A) ⊙ keep / (1-p): the low-rank term in its own accumulator
        (dropout's mask multiplies it alone), then one rounding and one store."""
        lora = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for r0 in range(0, R, BLOCK_K):
            offs_r = r0 + tl.arange(0, BLOCK_K)
            u_ok = (offs_m[:, None] < M) & (offs_r[None, :] < R)
            u = tl.load(u_ptr + offs_m[:, None] * stride_um + offs_r[None, :] * stride_ur, mask=u_ok, other=0.0)
            a_ok = (offs_r[:, None] < R) & (offs_k[None, :] < K)
            a = tl.load(lora_a_ptr + offs_r[:, None] * stride_ar + offs_k[None, :] * stride_ak, mask=a_ok, other=0.0)
            lora = tl.dot(u.to(DOT_DTYPE), a.to(DOT_DTYPE), lora, input_precision=PRECISION)
        if HAS_DROPOUT:
            keep = _dropout_keep(seed, offs_m[:, None], offs_k[None, :], K, p)
            lora = tl.where(keep, lora * inv_keep, 0.0)
        dx_ok = (offs_m[:, None] < M) & (offs_k[None, :] < K)
        tl.store(dx_ptr + offs_m[:, None] * stride_dxm + offs_k[None, :] * stride_dxk,
                 (acc + lora).to(dx_ptr.dtype.element_ty), mask=dx_ok)

    @triton.jit
    def _lora_dx_kernel(
        # pointers
        dy_ptr,           # [M, N] output gradient
        w_ptr,            # [N, K] dense base weight, or packed uint8 when QUANT
        u_ptr,            # [M, R] u = s · dY B, x's dtype
        lora_a_ptr,       # [R, K]
        dx_ptr,           # [M, K] input gradient, x's dtype
        absmax_ptr, code_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr,  # QUANT only
        # scalars
        seed, p, inv_keep,
        # sizes
        M, N, K, R,
        # strides
        stride_dym, stride_dyn, stride_wn, stride_wk, stride_um, stride_ur,
        stride_ar, stride_ak, stride_dxm, stride_dxk,
        # meta-parameters
        HAS_DROPOUT: tl.constexpr, QUANT: tl.constexpr, NESTED: tl.constexpr,
        BLOCKSIZE: tl.constexpr, NESTED_BLOCKSIZE: tl.constexpr,
        DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    ):
        # Here the output's columns are in-features (BLOCK_N of K) and the reduction runs over
        # out-features (BLOCK_K of N).
        # 1. map program id to a dX tile (grouped, as in the forward)
        offs_m, offs_k = _grouped_tile_offsets(M, K, BLOCK_M, BLOCK_N, GROUP_M)

        # 2./3. base loop over out-features: acc += dY[:, n] @ W[n, :]
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        acc = _dx_segment(acc, offs_m, offs_k, M, K, dy_ptr, stride_dym, stride_dyn, N, w_ptr, stride_wn,
                          stride_wk, absmax_ptr, code_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr,
                          dx_ptr, QUANT, NESTED, BLOCKSIZE, NESTED_BLOCKSIZE, DOT_DTYPE, PRECISION, BLOCK_K)
        # 4./5. low-rank term (u A) with dropout's mask, then the one store of dX
        _dx_lowrank_and_store(acc, offs_m, offs_k, M, K, R, u_ptr, stride_um, stride_ur,
                              lora_a_ptr, stride_ar, stride_ak, dx_ptr, stride_dxm, stride_dxk,
                              seed, p, inv_keep, HAS_DROPOUT, DOT_DTYPE, PRECISION, BLOCK_M, BLOCK_N, BLOCK_K)

    @triton.jit
    def _matmul_tn_kernel(
        # pointers
        a_ptr,            # [M, P]
        b_ptr,            # [M, Q] (x when HAS_DROPOUT: masked by its dropout keep-mask)
        out_ptr,          # [P, Q] out = scale · aᵀ (b ⊙ keep), in out's dtype
        # scalars
        seed, p, scale,
        # sizes
        M, P, Q,
        # strides
        stride_am, stride_ap, stride_bm, stride_bq, stride_op, stride_oq,
        # meta-parameters
        HAS_DROPOUT: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
        BLOCK_P: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_M: tl.constexpr,
    ):
        # 1. map program id to an output tile [BLOCK_P, BLOCK_Q]
        offs_p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
        offs_q = tl.program_id(1) * BLOCK_Q + tl.arange(0, BLOCK_Q)
        acc = tl.zeros((BLOCK_P, BLOCK_Q), dtype=tl.float32)
        # 2./3. reduction over the rows (tokens) of both operands
        for m0 in range(0, M, BLOCK_M):
            offs_m = m0 + tl.arange(0, BLOCK_M).to(tl.int64)
            a_ok = (offs_p[:, None] < P) & (offs_m[None, :] < M)
            a_t = tl.load(a_ptr + offs_m[None, :] * stride_am + offs_p[:, None] * stride_ap, mask=a_ok, other=0.0)
            b_ok = (offs_m[:, None] < M) & (offs_q[None, :] < Q)
            b = tl.load(b_ptr + offs_m[:, None] * stride_bm + offs_q[None, :] * stride_bq, mask=b_ok, other=0.0)
            if HAS_DROPOUT:
                b = tl.where(_dropout_keep(seed, offs_m[:, None], offs_q[None, :], Q, p), b, 0.0)
            acc = tl.dot(a_t.to(DOT_DTYPE), b.to(DOT_DTYPE), acc, input_precision=PRECISION)
        # 4./5. scale in fp32, store
        ok = (offs_p[:, None] < P) & (offs_q[None, :] < Q)
        tl.store(out_ptr + offs_p[:, None] * stride_op + offs_q[None, :] * stride_oq,
                 (acc * scale).to(out_ptr.dtype.element_ty), mask=ok)

    @triton.jit
    def _dropout_keep_kernel(out_ptr, seed, p, M, K, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
        """Materialise the keep-mask bool [M, K] (for tests and the reference only)."""
        offs_m = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
        keep = _dropout_keep(seed, offs_m[:, None], offs_k[None, :], K, p)
        ok = (offs_m[:, None] < M) & (offs_k[None, :] < K)
        tl.store(out_ptr + offs_m[:, None] * K + offs_k[None, :], keep.to(tl.int8), mask=ok)
