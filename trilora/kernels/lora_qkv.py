"""LoRA projections sharing one input (q, k, v; the MLP's gate and up), one backward pass for dX.

Why a block: q_proj, k_proj and v_proj each read the same hidden states, and each of their
backwards writes its own [tokens, hidden] dX that autograd then adds (two more passes over
dX). Here, with t_i = dropout(x) A_iᵀ and u_i = s_i · dY_i B_i:

    forward:   t = x [A_q; A_k; A_v]ᵀ            ONE rank-Σr launch: x read once for all adapters
               y_i = x W_iᵀ + b_i + t_i (s_i B_i)ᵀ  the fused LoRA GEMM of `lora_linear`, per projection
    backward:  dX = Σ_i dY_i W_i + (Σ_i u_i A_i) ⊙ keep/(1-p)     ONE kernel, `_multi_dx_kernel`:
                    the 1-3 K-loops and the low-rank term run into one fp32 accumulator, dX is
                    written once (4-bit bases dequantized tile by tile)
               dA = [u_q | u_k | u_v]ᵀ (x ⊙ keep)/(1-p)           ONE launch, x read once
               dB_i = s_i · dY_iᵀ t_i,  dbias_i = Σ dY_i           per projection

Design choices:
- The base GEMMs are one launch per projection, not one GEMM over a concatenated
  [Wq; Wk; Wv]: that weight would be a per-call copy of W (as many bytes as the GEMM reads)
  or a change of the checkpoint layout, and 4-bit bases with double quant cannot be
  concatenated (each has its own nested absmax and offset). Each GEMM streams x once more
  (M·H·2 bytes, 64 MB at 8192 tokens × 4096), small next to its 2·M·N·H flops.
- Dropout: ONE keep-mask over x for all projections of the block (one seed), so the masked
  low-rank terms can be summed before the mask is applied. PEFT draws an independent mask per
  projection: same expected update, but here the q/k/v adapters see the same dropped features.
- s_i·B_i is rounded once to the compute dtype (one launch for all t_i has one scale), where
  `lora_linear` rounds s·t instead: a different, equally small rounding.
- A projection without adapter (k_proj when LoRA targets q and v) is a base-only segment.
- The base weights are frozen (no gradient), as in `lora_linear`.

Reading order: `Projection` → reference → kernel → launchers → autograd Function → public ops.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .backend import HAS_TRITON, resolve_backend
from .lora_linear import dequantize_base_ref, lora_dropout_mask, lora_linear_ref
from .lora_linear_checks import check_lora_linear_inputs

if HAS_TRITON:
    import triton
    import triton.language as tl

    from .dequantize_4bit import dequantize_4bit_triton
    from .lora_linear import (BLOCKS, _base_args, _dot_dtype, _gemm_grid, _lowrank, _matmul_tn,
                              _precision)
    from .lora_linear_kernels import (_dx_lowrank_and_store, _dx_segment, _grouped_tile_offsets,
                                      _lora_fwd_kernel)

MAX_SEGMENTS = 3


@dataclass(frozen=True)
class Projection:
    """One frozen linear layer of a block and its optional LoRA adapter, all in the compute dtype.

    weight: dense [out, in], or packed 4-bit uint8 with `quant_state` (as `lora_linear` takes it).
    lora_A [r, in], lora_B [out, r], scaling (alpha / r): both None for a base-only projection.
    bias: [out] or None.
    """
    weight: torch.Tensor
    quant_state: object = None
    lora_A: torch.Tensor | None = None
    lora_B: torch.Tensor | None = None
    scaling: float = 1.0
    bias: torch.Tensor | None = None

    @property
    def out_features(self) -> int:
        return int(self.quant_state.shape[0]) if self.quant_state is not None else self.weight.shape[0]

    @property
    def rank(self) -> int:
        return 0 if self.lora_A is None else self.lora_A.shape[0]

    def trainables(self) -> tuple:
        """(lora_A, lora_B, bias): the tensors that may get a gradient."""
        return self.lora_A, self.lora_B, self.bias


# ----------------------------------------------------------------------------- reference

def projection_ref(x: torch.Tensor, proj: Projection, dropout_p: float = 0.0,
                   dropout_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Plain-PyTorch `x Wᵀ + b + s · dropout(x) Aᵀ Bᵀ` (autograd through torch ops)."""
    if proj.lora_A is None:
        w = proj.weight if proj.quant_state is None else dequantize_base_ref(proj.weight, proj.quant_state, x.dtype)
        return F.linear(x, w, proj.bias)
    return lora_linear_ref(x, proj.weight, proj.lora_A, proj.lora_B, proj.scaling, proj.bias, dropout_p,
                           proj.quant_state, dropout_mask)


def lora_projections_ref(x: torch.Tensor, projs, dropout_p: float = 0.0,
                         dropout_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
    """Reference of `lora_projections`: each projection by `projection_ref`, one mask for all."""
    return tuple(projection_ref(x, p, dropout_p, dropout_mask) for p in projs)


# ----------------------------------------------------------------------------- kernel

if HAS_TRITON:

    @triton.jit
    def _multi_dx_kernel(
        # pointers of segment i (i < N_SEG): its dY [M, N_i], base weight and 4-bit tables
        dy0_ptr, w0_ptr, absmax0_ptr, code0_ptr, nabsmax0_ptr, ncode0_ptr, offset0_ptr,
        dy1_ptr, w1_ptr, absmax1_ptr, code1_ptr, nabsmax1_ptr, ncode1_ptr, offset1_ptr,
        dy2_ptr, w2_ptr, absmax2_ptr, code2_ptr, nabsmax2_ptr, ncode2_ptr, offset2_ptr,
        # pointers of the low-rank term and the output
        u_ptr,            # [M, R] [s_0·dY_0 B_0 | s_1·dY_1 B_1 | ...] of the projections with adapters
        lora_a_ptr,       # [R, K] [A_0; A_1; ...]
        dx_ptr,           # [M, K] output, x's dtype
        # scalars
        seed, p, inv_keep,
        # sizes
        M, K, R, N0, N1, N2,
        # strides: dY and W of each segment, then u, A, dX
        s_dy0m, s_dy0n, s_w0n, s_w0k, s_dy1m, s_dy1n, s_w1n, s_w1k, s_dy2m, s_dy2n, s_w2n, s_w2k,
        stride_um, stride_ur, stride_ar, stride_ak, stride_dxm, stride_dxk,
        # meta-parameters (the base format is one for all segments)
        N_SEG: tl.constexpr, HAS_DROPOUT: tl.constexpr, QUANT: tl.constexpr, NESTED: tl.constexpr,
        BLOCKSIZE: tl.constexpr, NESTED_BLOCKSIZE: tl.constexpr, DOT_DTYPE: tl.constexpr,
        PRECISION: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    ):
        # The output's columns are in-features (BLOCK_N of K); reductions run over out-features.
        # 1. map program id to a dX tile, GROUP_M row-tiles at a time (W tiles stay in L2)
        offs_m, offs_k = _grouped_tile_offsets(M, K, BLOCK_M, BLOCK_N, GROUP_M)

        # 2./3. base terms of every segment into one accumulator: acc += dY_i @ W_i
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        acc = _dx_segment(acc, offs_m, offs_k, M, K, dy0_ptr, s_dy0m, s_dy0n, N0, w0_ptr, s_w0n, s_w0k,
                          absmax0_ptr, code0_ptr, nabsmax0_ptr, ncode0_ptr, offset0_ptr, dx_ptr, QUANT,
                          NESTED, BLOCKSIZE, NESTED_BLOCKSIZE, DOT_DTYPE, PRECISION, BLOCK_K)
        if N_SEG >= 2:
            acc = _dx_segment(acc, offs_m, offs_k, M, K, dy1_ptr, s_dy1m, s_dy1n, N1, w1_ptr, s_w1n, s_w1k,
                              absmax1_ptr, code1_ptr, nabsmax1_ptr, ncode1_ptr, offset1_ptr, dx_ptr,
                              QUANT, NESTED, BLOCKSIZE, NESTED_BLOCKSIZE, DOT_DTYPE, PRECISION, BLOCK_K)
        if N_SEG >= 3:
            acc = _dx_segment(acc, offs_m, offs_k, M, K, dy2_ptr, s_dy2m, s_dy2n, N2, w2_ptr, s_w2n, s_w2k,
                              absmax2_ptr, code2_ptr, nabsmax2_ptr, ncode2_ptr, offset2_ptr, dx_ptr,
                              QUANT, NESTED, BLOCKSIZE, NESTED_BLOCKSIZE, DOT_DTYPE, PRECISION, BLOCK_K)

        # 4./5. the adapters' low-rank terms, summed before the (shared) dropout mask; the only
        #       store of dX
        _dx_lowrank_and_store(acc, offs_m, offs_k, M, K, R, u_ptr, stride_um, stride_ur,
                              lora_a_ptr, stride_ar, stride_ak, dx_ptr, stride_dxm, stride_dxk,
                              seed, p, inv_keep, HAS_DROPOUT, DOT_DTYPE, PRECISION, BLOCK_M, BLOCK_N, BLOCK_K)


# ----------------------------------------------------------------------------- launchers

# Outputs are allocated here, so tests can swap in NaN-filled buffers.
_empty = torch.empty


def _dequantized(proj: Projection, dtype: torch.dtype) -> torch.Tensor:
    """Dense [out, in] copy of a 4-bit base in `dtype` (the numbers the in-loop tiles use)."""
    qs = proj.quant_state
    n_out, k_in = qs.shape
    kw = {}
    if qs.nested_absmax is not None:
        kw = dict(nested_absmax=qs.nested_absmax.float(), nested_code=qs.nested_code.float(),
                  offset=torch.as_tensor(qs.offset, dtype=torch.float32, device=proj.weight.device).reshape(1),
                  nested_blocksize=int(qs.nested_blocksize))
    flat = dequantize_4bit_triton(proj.weight.reshape(-1), qs.absmax, qs.code.float(), int(qs.blocksize),
                                  n_out * k_in, dtype, **kw)
    return flat.view(n_out, k_in)


def _base_segments(projs, dtype: torch.dtype, m: int) -> list[tuple]:
    """`_base_args` of every projection, in one base format: when the projections mix dense and
    4-bit (or 4-bit formats), the 4-bit ones are dequantized into scratch buffers."""
    args = [_base_args(p.weight, p.quant_state, dtype, m) for p in projs]
    if any(a[4] != args[0][4] for a in args):
        args = [_base_args(_dequantized(p, dtype), None, dtype, m) if p.quant_state is not None else a
                for p, a in zip(projs, args)]
    return args


def _adapter_inputs(x: torch.Tensor, projs, dropout_p: float, seed: int) -> list:
    """t_i = (x ⊙ keep)/(1-p) A_iᵀ [M, r_i] of every adapter (None for base-only projections)
    from ONE launch over [A_0; A_1; ...]: x is read once for all adapters. The scalings s_i
    are applied to B (forward) or in dB's epilogue, since one launch has one scale."""
    ranks = [p.rank for p in projs]
    if not any(ranks):
        return [None] * len(projs)
    a = torch.cat([p.lora_A for p in projs if p.rank])                        # [Σr, in], tiny
    t = _lowrank(x, a, 1.0 / (1.0 - dropout_p), seed, dropout_p)               # [M, Σr]
    parts = iter(t.split([r for r in ranks if r], dim=1))
    return [next(parts) if r else None for r in ranks]


def _project(x: torch.Tensor, proj: Projection, t: torch.Tensor | None, out: torch.Tensor) -> None:
    """out [M, N] (any strides) = x Wᵀ + b + t (s·B)ᵀ, one `_lora_fwd_kernel` launch; t [M, r] or None."""
    (m, k), n = x.shape, out.shape[1]
    w, swn, swk, extra, meta = _base_args(proj.weight, proj.quant_state, x.dtype, m)
    if t is not None:  # s·B rounded once to x's dtype ([N, r], tiny)
        t_, b_ = t, (proj.lora_B.float() * proj.scaling).to(x.dtype)
    else:
        t_, b_ = out, out  # R = 0: never read
    _lora_fwd_kernel[_gemm_grid(m, n)](
        x, w, t_, b_, proj.bias if proj.bias is not None else out, out, *extra,
        m, n, k, 0 if t is None else t.shape[1],
        x.stride(0), x.stride(1), swn, swk, t_.stride(0), t_.stride(1),
        b_.stride(0), b_.stride(1), out.stride(0), out.stride(1),
        HAS_BIAS=proj.bias is not None, **meta, DOT_DTYPE=_dot_dtype(x.dtype), PRECISION=_precision(x.dtype),
        **BLOCKS["gemm"], enable_fp_fusion=False)


def projections_forward(x: torch.Tensor, projs, dropout_p: float, seed: int, outs) -> None:
    """Triton: outs[i] [M, N_i] (any strides) = x W_iᵀ + b_i + s_i·(x ⊙ keep)/(1-p) A_iᵀ B_iᵀ.

    x [M, in]; one keep-mask (from `seed`) for every projection. Inputs already checked.
    """
    if x.shape[0] == 0:
        return
    for proj, t, out in zip(projs, _adapter_inputs(x, projs, dropout_p, seed), outs):
        _project(x, proj, t, out)


def _multi_dx(dys, x: torch.Tensor, projs, u: torch.Tensor | None, a: torch.Tensor | None,
              dropout_p: float, seed: int) -> torch.Tensor:
    """dX [M, in] = Σ_i dY_i W_i + (u a) ⊙ keep/(1-p), one `_multi_dx_kernel` launch."""
    m, k = x.shape
    dx = _empty((m, k), dtype=x.dtype, device=x.device)
    bases = _base_segments(projs, x.dtype, m)
    meta = bases[0][4]
    segs = [(dy, *b) for dy, b in zip(dys, bases)]
    segs += [segs[0]] * (MAX_SEGMENTS - len(segs))  # unused slots: never read (N_SEG)
    ptrs, sizes, strides = [], [], []
    for i, (dy, w, swn, swk, extra, _) in enumerate(segs):
        ptrs += [dy, w, *extra]
        sizes.append(dy.shape[1] if i < len(dys) else 0)
        strides += [dy.stride(0), dy.stride(1), swn, swk]
    u_, a_ = (u, a) if u is not None else (dx, dx)  # R = 0: never read
    g = BLOCKS["gemm"]
    _multi_dx_kernel[(triton.cdiv(m, g["BLOCK_M"]) * triton.cdiv(k, g["BLOCK_N"]),)](
        *ptrs, u_, a_, dx, seed, dropout_p, 1.0 / (1.0 - dropout_p),
        m, k, 0 if u is None else u.shape[1], *sizes,
        *strides, u_.stride(0), u_.stride(1), a_.stride(0), a_.stride(1), dx.stride(0), dx.stride(1),
        N_SEG=len(dys), HAS_DROPOUT=dropout_p > 0 and u is not None, **meta,
        DOT_DTYPE=_dot_dtype(x.dtype), PRECISION=_precision(x.dtype), **g, enable_fp_fusion=False)
    return dx


def projections_backward(dys, x: torch.Tensor, projs, dropout_p: float, seed: int, need_dx: bool,
                         needs) -> tuple[torch.Tensor | None, list[tuple]]:
    """Triton backward of `projections_forward`.

    dys[i] [M, N_i] (any strides), x [M, in]; needs[i] = (dA, dB, dbias) flags of projection i.
    Returns (dX [M, in] or None, [(dA_i, dB_i, dbias_i)]), None where not needed or absent.
    """
    m, keep = x.shape[0], 1.0 - dropout_p
    if m == 0:  # empty batch: zero gradients of the right shapes
        zeros = lambda t, need: torch.zeros_like(t) if need and t is not None else None  # noqa: E731
        return (torch.zeros_like(x) if need_dx else None), \
            [tuple(zeros(t, f) for t, f in zip(p.trainables(), nd)) for p, nd in zip(projs, needs)]
    grads = [[None, None, None] for _ in projs]
    adapted = [i for i, p in enumerate(projs) if p.rank]
    need_da = [i for i in adapted if needs[i][0]]
    u = a = None
    # 1. u = [s_i · dY_i B_i]   [M, Σr]  (B viewed as Bᵀ [r, N])
    if adapted and (need_dx or need_da):
        u = torch.cat([_lowrank(dys[i], projs[i].lora_B.t(), projs[i].scaling, 0, 0.0) for i in adapted], 1)
        a = torch.cat([projs[i].lora_A for i in adapted], 0)
    # 2. dX, one pass over every segment
    dx = _multi_dx(dys, x, projs, u, a, dropout_p, seed) if need_dx else None
    # 3. dA of every adapter in one launch: uᵀ (x ⊙ keep) / (1-p)   [Σr, in], split by rank
    if need_da:
        da = _matmul_tn(u, x, 1.0 / keep, seed, dropout_p, x.dtype)
        for i, part in zip(adapted, da.split([projs[i].rank for i in adapted], 0)):
            grads[i][0] = part if needs[i][0] else None
    # 4. dB_i = s_i · dY_iᵀ t_i   [N_i, r_i], t recomputed (r columns: cheaper to redo than to keep)
    if any(p.rank and nd[1] for p, nd in zip(projs, needs)):
        for i, t in enumerate(_adapter_inputs(x, projs, dropout_p, seed)):
            if t is not None and needs[i][1]:
                grads[i][1] = _matmul_tn(dys[i], t, projs[i].scaling, 0, 0.0, projs[i].lora_B.dtype)
    # 5. dbias_i = Σ_m dY_i
    for i, proj in enumerate(projs):
        if proj.bias is not None and needs[i][2]:
            grads[i][2] = dys[i].sum(0, dtype=torch.float32).to(proj.bias.dtype)
    return dx, [tuple(g) for g in grads]


# ----------------------------------------------------------------------------- autograd

class LoRAProjectionsFunction(torch.autograd.Function):
    """x → (y_0, y_1, ...) of 1-3 LoRA projections sharing x. Saves x; the projections (frozen
    bases and the adapters, which are also inputs) stay referenced on ctx.

    apply(x, projs, dropout_p, seed, *trainables): trainables = the projections' (lora_A,
    lora_B, bias) in order, passed separately so autograd routes their gradients.
    """

    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda")
    def forward(ctx, x, projs, dropout_p, seed, *trainables):
        x2d = x.reshape(-1, x.shape[-1])  # [M, in]
        outs = [_empty((x2d.shape[0], p.out_features), dtype=x.dtype, device=x.device) for p in projs]
        projections_forward(x2d, projs, dropout_p, seed, outs)
        ctx.save_for_backward(x2d)
        ctx.projs, ctx.dropout_p, ctx.seed, ctx.x_shape = projs, dropout_p, seed, x.shape
        return tuple(o.view(*x.shape[:-1], o.shape[1]) for o in outs)

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx, *dys):
        (x2d,) = ctx.saved_tensors
        dys = [dy.reshape(-1, dy.shape[-1]).to(x2d.dtype) for dy in dys]
        need = ctx.needs_input_grad
        needs = [tuple(need[4 + 3 * i + j] for j in range(3)) for i in range(len(ctx.projs))]
        dx, grads = projections_backward(dys, x2d, ctx.projs, ctx.dropout_p, ctx.seed, need[0], needs)
        return (None if dx is None else dx.view(ctx.x_shape), None, None, None,
                *[g for triple in grads for g in triple])


# ----------------------------------------------------------------------------- public

def check_projection(x: torch.Tensor, proj: Projection, dropout_p: float, name: str) -> None:
    """Raise TypeError/ValueError naming the projection when it does not fit x [..., in]."""
    if not isinstance(proj, Projection):
        raise TypeError(f"{name} must be a Projection, got {type(proj).__name__}")
    a, b = proj.lora_A, proj.lora_B
    if (a is None) != (b is None):
        raise ValueError(f"{name}: lora_A and lora_B must both be given or both be None")
    if a is None:  # base only: check the base with a stand-in rank-1 adapter
        qs = proj.quant_state
        out = int(qs.shape[0]) if qs is not None and getattr(qs, "shape", None) is not None else \
            (proj.weight.shape[0] if isinstance(proj.weight, torch.Tensor) and proj.weight.dim() == 2 else 1)
        a, b = x.new_zeros(1, x.shape[-1]), x.new_zeros(out, 1)
    try:
        check_lora_linear_inputs(x, proj.weight, a, b, proj.scaling, proj.bias, dropout_p, proj.quant_state)
    except (TypeError, ValueError) as err:
        raise type(err)(f"{name}: {err}") from None


def autocast_projections(x: torch.Tensor, projs) -> tuple[torch.Tensor, tuple]:
    """Under torch.autocast, x and every float tensor of `projs` (not packed 4-bit) in the autocast dtype."""
    if not torch.is_autocast_enabled(x.device.type):
        return x, tuple(projs)
    dtype = torch.get_autocast_dtype(x.device.type)
    cast = lambda t: t.to(dtype) if t is not None and t.is_floating_point() else t  # noqa: E731
    return cast(x), tuple(Projection(cast(p.weight), p.quant_state, cast(p.lora_A), cast(p.lora_B), p.scaling,
                                     cast(p.bias)) for p in projs)


def resolve_seed(dropout_p: float, seed: int | None) -> int:
    """The dropout seed of one call: `seed`, or one drawn from torch's default generator."""
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**62):
        raise ValueError(f"seed must be an int in [0, 2**62), got {seed!r}")
    if dropout_p > 0 and seed is None:
        seed = int(torch.randint(0, 2**31 - 1, ()).item())
    return 0 if seed is None else seed


def lora_projections(x: torch.Tensor, projs, dropout_p: float = 0.0, backend: str = "auto",
                     seed: int | None = None) -> tuple[torch.Tensor, ...]:
    """`x W_iᵀ + b_i + s_i · dropout(x) A_iᵀ B_iᵀ` for 1-3 projections of one input, autograd-aware.

    Args:
        x: [..., in], fp32/fp16/bf16, any strides.
        projs: 1-3 `Projection`s in x's dtype (packed 4-bit bases are dequantized to it).
        dropout_p: dropout on the adapters' input, in [0, 1); ONE mask for all projections.
        backend: "auto" (Triton on CUDA or under the interpreter), "triton" or "torch".
        seed: dropout seed; both backends derive the same mask from it (`lora_dropout_mask`).
            None: drawn from torch's default generator (both backends, so a seeded run repeats).
    Under torch.autocast the float inputs are cast to the autocast dtype first.
    Returns a tuple of [..., out_i] in x's (compute) dtype.
    """
    projs = tuple(projs)
    if not 1 <= len(projs) <= MAX_SEGMENTS:
        raise ValueError(f"lora_projections takes 1 to {MAX_SEGMENTS} projections, got {len(projs)}")
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    x, projs = autocast_projections(x, projs)
    for i, p in enumerate(projs):
        check_projection(x, p, dropout_p, f"projection {i}")
    seed = resolve_seed(dropout_p, seed)
    if resolve_backend(backend, x) == "torch":
        mask = lora_dropout_mask(seed, x.shape, dropout_p, x.device) if dropout_p > 0 else None
        return lora_projections_ref(x, projs, dropout_p, mask)
    if torch.is_grad_enabled() and any(p.weight.requires_grad for p in projs):
        raise ValueError("the LoRA blocks treat base weights as frozen and compute no gradient for them; "
                         "set weight.requires_grad_(False) (or use backend='torch')")
    trainables = [t for p in projs for t in p.trainables()]
    return LoRAProjectionsFunction.apply(x, projs, float(dropout_p), seed, *trainables)


def lora_qkv(x: torch.Tensor, q: Projection, k: Projection, v: Projection, dropout_p: float = 0.0,
             backend: str = "auto", seed: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Query, key and value projections of x [..., hidden] → (q [..., Nq], k [..., Nk], v [..., Nv]).

    Each projection is a LoRA linear over a dense or 4-bit base, with optional bias (Qwen2) and
    optional adapter; the backward writes dX once for all three (see the module docstring).
    Arguments as `lora_projections`.
    """
    return lora_projections(x, (q, k, v), dropout_p, backend, seed)
