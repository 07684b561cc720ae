"""The GEMM kernels of the LoRA family: one computation, two ways of feeding the tensor cores.

    out[M, N] = c ⊙ (mask ⊙ (L Rm)·inv_keep  +  Σ_s A_s op(W_s))  +  bias    (fp32 accumulator)

- forward of a LoRA linear: A = x, op(W) = Wᵀ (W_T), L Rm = t · (s·B)ᵀ with t = dropout(x) Aᵀ
  already masked, no mask here; bias; DoRA's column scale c = m/‖W + s·BA‖ (else none).
- dX of 1-3 projections sharing x (q/k/v, gate/up): A_s = dY_s, op(W_s) = W_s, L Rm = u A with
  u = [s_i dY_i B_i], masked by the forward's keep bits. The masked low-rank term is computed
  FIRST into the same accumulator and the base segments accumulate on top: one accumulator,
  so 128×256 tiles do not spill.

`_gemm_kernel` (pointers): any strides, sm_80 and the interpreter, and 4-bit bases unpacked in
the K-loop (small M): the packed bytes of a W tile are loaded contiguous along W's rows, each
byte looked up in a 256-entry table of (code[hi], code[lo]) fp32 pairs (one 8-byte shared-memory
load per two weights, no nibble arithmetic), multiplied by one absmax per (row, block) and
rounded once to the compute dtype: exactly `dequantize_4bit`'s numbers (bnb's fp32 product).
The lookup alternatives measured in the compiled code (sm_90, 64×64×64 tile, per 32 weights
per thread): a 16-entry `tl.where` tree in registers 747 SASS instructions per iteration, a
16-entry gather 315, the 256-entry pair gather 208; the dense loop 71.

`_gemm_tma_kernel` (sm_90+, dense operands): TMA tensor descriptors for A, W and the output,
a persistent grid over output tiles (GROUP_M-swizzled so W tiles stay in L2).
"""
from __future__ import annotations

from ..backend import HAS_TRITON

if HAS_TRITON:
    import triton
    import triton.language as tl

    from ..dequantize_4bit import pair_table
    from .dropout import load_keep_bits

    @triton.jit
    def tile_of(tile_id, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
        """(row tile, column tile) of `tile_id`, GROUP_M row tiles at a time (Triton's matmul
        tutorial): consecutive programs share W's column tiles while they sit in L2."""
        num_m = tl.cdiv(M, BLOCK_M)
        num_n = tl.cdiv(N, BLOCK_N)
        group = tile_id // (GROUP_M * num_n)
        first_m = group * GROUP_M
        group_size = min(num_m - first_m, GROUP_M)
        pid_m = first_m + (tile_id % (GROUP_M * num_n)) % group_size
        pid_n = (tile_id % (GROUP_M * num_n)) // group_size
        return pid_m, pid_n

    @triton.jit
    def dequant_tile(w_ptr, absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr, table,
                     rows, c0, NR, NC, out_dtype: tl.constexpr,
                     NESTED: tl.constexpr, BLOCKSIZE: tl.constexpr, NESTED_BLOCKSIZE: tl.constexpr,
                     ROWS: tl.constexpr, COLS: tl.constexpr):
        """W[rows, c0:c0+COLS] of a packed 4-bit W [NR, NC] in `out_dtype`, 0 outside W.

        Needs NC % BLOCKSIZE == 0 (quantization blocks do not straddle rows) and c0 % min(COLS,
        BLOCKSIZE) == 0: the tile then spans G = max(1, COLS // BLOCKSIZE) blocks per row.
        """
        HALF: tl.constexpr = COLS // 2
        G: tl.constexpr = COLS // BLOCKSIZE if COLS > BLOCKSIZE else 1
        rows = rows.to(tl.int64)
        # 1. the packed bytes, contiguous along the row (the even column is the high nibble)
        bcols = c0 // 2 + tl.arange(0, HALF)
        ok = (rows[:, None] < NR) & (bcols[None, :] < NC // 2)
        packed = tl.load(w_ptr + rows[:, None] * (NC // 2) + bcols[None, :], mask=ok, other=0)
        # 2. both codes of every byte from one table entry
        pair = tl.gather(table, tl.reshape(packed.to(tl.int32), (ROWS * HALF,)), 0)
        hi = (pair >> 32).to(tl.uint32).to(tl.float32, bitcast=True)
        lo = pair.to(tl.uint32).to(tl.float32, bitcast=True)
        # 3. one absmax per (row, block), restored from its 8-bit code when NESTED
        blocks = c0 // BLOCKSIZE + tl.arange(0, G)
        blk = rows[:, None] * (NC // BLOCKSIZE) + blocks[None, :]
        bok = (rows[:, None] < NR) & (blocks[None, :] < NC // BLOCKSIZE)
        if NESTED:
            q = tl.load(absmax_ptr + blk, mask=bok, other=0).to(tl.int32)
            scale = tl.load(nested_absmax_ptr + blk // NESTED_BLOCKSIZE, mask=bok, other=0.0)
            absmax = tl.where(bok, tl.load(nested_code_ptr + q) * scale + tl.load(offset_ptr), 0.0)
        else:
            absmax = tl.load(absmax_ptr + blk, mask=bok, other=0.0)
        absmax = tl.reshape(tl.broadcast_to(absmax[:, :, None], (ROWS, G, HALF // G)), (ROWS * HALF,))
        # 4. fp32 products, one rounding, nibbles back in column order
        w = tl.join((hi * absmax).to(out_dtype), (lo * absmax).to(out_dtype))
        return tl.reshape(w, (ROWS, COLS))

    @triton.jit
    def lowrank_first(acc, offs_m, offs_n, n0, M, N, l_ptr, stride_lm, stride_lr, r_ptr, stride_rr, stride_rn, R,
                      bits_ptr, stride_bits, inv_keep, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr):
        """acc = L[rows, :] Rm[:, cols] (masked by keep bits ⊙ inv_keep when bits_ptr is given);
        `n0` = offs_n's first column, a multiple of 8."""
        for r0 in range(0, R, BLOCK_R):
            offs_r = r0 + tl.arange(0, BLOCK_R)
            lt = tl.load(l_ptr + offs_m[:, None] * stride_lm + offs_r[None, :] * stride_lr,
                         mask=(offs_m[:, None] < M) & (offs_r[None, :] < R), other=0.0)
            rt = tl.load(r_ptr + offs_r[:, None] * stride_rr + offs_n[None, :] * stride_rn,
                         mask=(offs_r[:, None] < R) & (offs_n[None, :] < N), other=0.0)
            acc = tl.dot(lt.to(DOT_DTYPE), rt.to(DOT_DTYPE), acc, input_precision=PRECISION)
        if bits_ptr is not None:
            keep = load_keep_bits(bits_ptr, stride_bits, offs_m, n0, M, N, BLOCK_M, BLOCK_N)
            acc = tl.where(keep, acc * inv_keep, 0.0)
        return acc

    @triton.jit
    def _gemm_kernel(
        # output [M, N], any strides
        out_ptr, stride_om, stride_on, M, N,
        # base segments s < N_SEG (tuples): A_s [M, K_s] and op(W_s) [K_s, N]
        a_ptrs, a_strides,           # a_strides = (stride_m, stride_k) of each segment, flattened
        seg_ks,                      # K_s
        w_ptrs, w_strides,           # dense: op(W_s)'s (stride_k, stride_n); QUANT: packed bytes
        absmax_ptrs, code_ptrs, nested_absmax_ptrs, offset_ptrs, nested_code_ptr,  # QUANT only
        # low-rank term (l_ptr None: none) and its keep bits (bits_ptr None: no mask)
        l_ptr, stride_lm, stride_lr, r_ptr, stride_rr, stride_rn, R,
        bits_ptr, stride_bits, inv_keep,
        bias_ptr,                    # [N] or None
        col_scale_ptr,               # [N] fp32 or None: DoRA's m/‖W + s·BA‖, applied before the bias
        # meta-parameters
        N_SEG: tl.constexpr, W_T: tl.constexpr, QUANT: tl.constexpr, NESTED: tl.constexpr,
        BLOCKSIZE: tl.constexpr, NESTED_BLOCKSIZE: tl.constexpr,
        DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
        GROUP_M: tl.constexpr,
    ):
        # 1. program → output tile
        pid_m, pid_n = tile_of(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
        offs_m = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)  # int64: M·K may pass 2**31
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        out_dtype = out_ptr.dtype.element_ty

        # 2. the (masked) low-rank term first, into the one accumulator
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        if l_ptr is not None:
            acc = lowrank_first(acc, offs_m, offs_n, pid_n * BLOCK_N, M, N, l_ptr, stride_lm, stride_lr, r_ptr,
                                stride_rr, stride_rn, R, bits_ptr, stride_bits, inv_keep, DOT_DTYPE, PRECISION,
                                BLOCK_M, BLOCK_N, BLOCK_R)

        # 3. K-loops of the base segments
        for s in tl.static_range(N_SEG):
            k_s = seg_ks[s]
            if QUANT:
                table = pair_table(code_ptrs[s])
            for k0 in range(0, k_s, BLOCK_K):
                offs_k = k0 + tl.arange(0, BLOCK_K)
                a = tl.load(a_ptrs[s] + offs_m[:, None] * a_strides[2 * s] + offs_k[None, :] * a_strides[2 * s + 1],
                            mask=(offs_m[:, None] < M) & (offs_k[None, :] < k_s), other=0.0)
                if QUANT:
                    if W_T:  # W [N, K_s]: the tile of W's rows offs_n, transposed
                        b = tl.trans(dequant_tile(w_ptrs[s], absmax_ptrs[s], nested_absmax_ptrs[s], nested_code_ptr,
                                                  offset_ptrs[s], table, offs_n, k0, N, k_s, out_dtype, NESTED,
                                                  BLOCKSIZE, NESTED_BLOCKSIZE, BLOCK_N, BLOCK_K))
                    else:    # W [K_s, N]: the tile of W's rows offs_k
                        b = dequant_tile(w_ptrs[s], absmax_ptrs[s], nested_absmax_ptrs[s], nested_code_ptr,
                                         offset_ptrs[s], table, offs_k, pid_n * BLOCK_N, k_s, N, out_dtype, NESTED,
                                         BLOCKSIZE, NESTED_BLOCKSIZE, BLOCK_K, BLOCK_N)
                else:
                    b = tl.load(w_ptrs[s] + offs_k[:, None] * w_strides[2 * s] + offs_n[None, :] * w_strides[2 * s + 1],
                                mask=(offs_k[:, None] < k_s) & (offs_n[None, :] < N), other=0.0)
                acc = tl.dot(a.to(DOT_DTYPE), b.to(DOT_DTYPE), acc, input_precision=PRECISION)

        # 4. epilogue: column scale, bias, one rounding, the only store
        if col_scale_ptr is not None:
            acc *= tl.load(col_scale_ptr + offs_n, mask=offs_n < N, other=0.0)[None, :]
        if bias_ptr is not None:
            acc += tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
        tl.store(out_ptr + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on, acc.to(out_dtype),
                 mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))

    @triton.jit
    def _gemm_tma_kernel(
        # output [M, N] through a TMA descriptor (block [BLOCK_M, BLOCK_N])
        out_desc, M, N,
        # base segments (tuples of descriptors): A_s blocks [BLOCK_M, BLOCK_K]; W_s blocks
        # [BLOCK_N, BLOCK_K] of W [N, K_s] when W_T, else [BLOCK_K, BLOCK_N] of W [K_s, N]
        a_descs, w_descs, seg_ks,
        # low-rank term and keep bits, as `_gemm_kernel` (small: plain pointer loads)
        l_ptr, stride_lm, stride_lr, r_ptr, stride_rr, stride_rn, R,
        bits_ptr, stride_bits, inv_keep,
        bias_ptr, col_scale_ptr,
        # meta-parameters
        N_SEG: tl.constexpr, W_T: tl.constexpr, OUT_DTYPE: tl.constexpr,
        DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
        GROUP_M: tl.constexpr,
    ):
        num_tiles = tl.cdiv(M, BLOCK_M) * tl.cdiv(N, BLOCK_N)
        # persistent: each program walks output tiles num_programs apart
        for tile_id in tl.range(tl.program_id(0), num_tiles, tl.num_programs(0)):
            # 1. tile
            pid_m, pid_n = tile_of(tile_id, M, N, BLOCK_M, BLOCK_N, GROUP_M)
            first_m = pid_m * BLOCK_M
            first_n = pid_n * BLOCK_N
            offs_m = tl.arange(0, BLOCK_M).to(tl.int64) + first_m
            offs_n = first_n + tl.arange(0, BLOCK_N)
            # 2. masked low-rank term first
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            if l_ptr is not None:
                acc = lowrank_first(acc, offs_m, offs_n, first_n, M, N, l_ptr, stride_lm, stride_lr, r_ptr,
                                    stride_rr, stride_rn, R, bits_ptr, stride_bits, inv_keep, DOT_DTYPE, PRECISION,
                                    BLOCK_M, BLOCK_N, BLOCK_R)
            # 3. base K-loops: TMA loads (out-of-bounds boxes read as zeros)
            for s in tl.static_range(N_SEG):
                for k0 in range(0, seg_ks[s], BLOCK_K):
                    a = a_descs[s].load([first_m, k0])
                    if W_T:
                        b = w_descs[s].load([first_n, k0]).T
                    else:
                        b = w_descs[s].load([k0, first_n])
                    acc = tl.dot(a.to(DOT_DTYPE), b.to(DOT_DTYPE), acc, input_precision=PRECISION)
            # 4. epilogue, TMA store (clipped at the tensor's edge)
            if col_scale_ptr is not None:
                acc *= tl.load(col_scale_ptr + offs_n, mask=offs_n < N, other=0.0)[None, :]
            if bias_ptr is not None:
                acc += tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
            out_desc.store([first_m, first_n], acc.to(OUT_DTYPE))
