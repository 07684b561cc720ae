"""LoRA projections sharing one input (q, k, v; the MLP's gate and up), one backward pass for dX.

Why a block: q_proj, k_proj and v_proj each read the same hidden states, and each of their
backwards writes its own [tokens, hidden] dX that autograd then adds (two more passes over
dX). Here, with t_i = dropout(x) A_iᵀ/(1-p) and u_i = s_i · dY_i B_i:

    forward:   t = x [A_q; A_k; A_v]ᵀ            ONE low-rank launch: x read once, one mask drawn
               y_i = x W_iᵀ + b_i + t_i (s_i B_i)ᵀ  the fused LoRA GEMM, per projection
    backward:  dX = Σ_i dY_i W_i + keep ⊙ (Σ_i u_i A_i)/(1-p)    ONE GEMM: 1-3 base segments and
                                                                the low-rank term, one accumulator
               dA = (x ⊙ keep)ᵀ [u_q | u_k | u_v] /(1-p)        ONE launch, x read once
               dB_i = s_i · dY_iᵀ t_i,  dbias_i = Σ dY_i         t kept from the forward

Design choices:
- The base GEMMs are one launch per projection, not one GEMM over a concatenated
  [Wq; Wk; Wv]: that weight would be a per-call copy of W or a change of the checkpoint layout,
  and 4-bit bases with double quant cannot be concatenated (each has its own nested absmax and
  offset). Each GEMM streams x once more (M·H·2 bytes), small next to its 2·M·N·H flops.
- Dropout: ONE keep-mask over x for all projections of the block (one seed), so the masked
  low-rank terms can be summed before the mask is applied. PEFT draws an independent mask per
  projection: same expected update, but here the q/k/v adapters see the same dropped features.
- s_i·B_i is rounded once to the compute dtype (one launch for all t_i has one scale), where
  `lora_linear` rounds s·t instead: a different, equally small rounding.
- A projection without adapter (k_proj when LoRA targets q and v) is a base-only segment.
- A DoRA projection (`magnitude` given; dropout 0) adds its column rescale c = m/‖W + s·BA‖ to
  its GEMM's epilogue (`dora_math.py`): y_i = c_i ⊙ z_i + b_i. Its backward feeds
  dZ_i = dY_i ⊙ c_i to the pass above and gets dm_i = Σ_rows dY_i ⊙ z_i / n_i from the output
  (z_i = (y_i − b_i)/c_i), which the block keeps for it.
- The base weights are frozen (no gradient), as in `lora_linear`.

Reading order: `Projection` → reference → forward/backward → autograd Function → public ops.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..backend import autocast_dtype, resolve_backend
from ..quant_state import QuantStateLike
from .checks import cast_floats, check_frozen, check_lora_linear_inputs, check_magnitude
from .dora_math import Rescale, dora_linear_ref, rescale_backward
from .dropout import lora_dropout_mask, resolve_seed
from .engine import BaseWeight, gemm, lowrank, matmul_tn, output
from .linear import linear_4bit_ref, lora_linear_ref

MAX_SEGMENTS = 3


@dataclass(frozen=True)
class Projection:
    """One frozen linear layer of a block and its optional LoRA adapter, all in the compute dtype.

    weight: dense [out, in], or packed 4-bit uint8 with `quant_state` (as `lora_linear` takes it).
    lora_A [r, in], lora_B [out, r], scaling (alpha / r): both None for a base-only projection.
    bias: [out] or None.
    magnitude: DoRA's m [out] (fp32 or the compute dtype): the adapter is DoRA; None: LoRA.
    weight_sq: ‖W‖² per row, fp32 [out] (`base_sq_norm`), when the caller keeps it; else a DoRA
        projection computes it at every call.
    """
    weight: torch.Tensor
    quant_state: QuantStateLike | None = None
    lora_A: torch.Tensor | None = None
    lora_B: torch.Tensor | None = None
    scaling: float = 1.0
    bias: torch.Tensor | None = None
    magnitude: torch.Tensor | None = None
    weight_sq: torch.Tensor | None = None

    @property
    def out_features(self) -> int:
        return int(self.quant_state.shape[0]) if self.quant_state is not None else self.weight.shape[0]

    @property
    def rank(self) -> int:
        return 0 if self.lora_A is None else self.lora_A.shape[0]

    def base(self) -> BaseWeight:
        return BaseWeight.of(self.weight, self.quant_state)

    @property
    def dora(self) -> bool:
        return self.magnitude is not None

    def trainables(self) -> tuple:
        """(lora_A, lora_B, bias, magnitude): the tensors that may get a gradient (TRAINABLES of them)."""
        return self.lora_A, self.lora_B, self.bias, self.magnitude


TRAINABLES = 4  # len(Projection.trainables()): how the autograd Functions count their inputs


# ----------------------------------------------------------------------------- reference

def projection_ref(x: torch.Tensor, proj: Projection, dropout_p: float = 0.0,
                   dropout_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Plain-PyTorch `x Wᵀ + b + s · dropout(x) Aᵀ Bᵀ` (autograd through torch ops); DoRA's
    `dora_linear_ref` for a DoRA projection."""
    if proj.dora:
        return dora_linear_ref(x, proj.weight, proj.lora_A, proj.lora_B, proj.scaling, proj.magnitude, proj.bias,
                               dropout_p, proj.quant_state, dropout_mask)
    if proj.lora_A is None:
        if proj.quant_state is None:
            return F.linear(x, proj.weight, proj.bias)
        return linear_4bit_ref(x, proj.weight, proj.quant_state, proj.bias)  # no dense W kept for backward
    return lora_linear_ref(x, proj.weight, proj.lora_A, proj.lora_B, proj.scaling, proj.bias, dropout_p,
                           proj.quant_state, dropout_mask)


def lora_projections_ref(x: torch.Tensor, projs, dropout_p: float = 0.0,
                         dropout_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
    """Reference of `lora_projections`: each projection by `projection_ref`, one mask for all."""
    return tuple(projection_ref(x, p, dropout_p, dropout_mask) for p in projs)


# ----------------------------------------------------------------------------- forward / backward

@dataclass
class Saved:
    """What a block's backward needs of its forward: the adapters' inputs t [M, Σr], the
    keep bits of x (None without dropout) and each projection's DoRA `Rescale` (None: LoRA)."""
    t: torch.Tensor | None
    bits: torch.Tensor | None
    rescales: list | None = None


def _split(t: torch.Tensor | None, projs) -> list:
    """t [M, Σr] → one [M, r_i] view per projection (None for base-only projections)."""
    ranks = [p.rank for p in projs]
    if t is None:
        return [None] * len(projs)
    parts = iter(t.split([r for r in ranks if r], dim=1))
    return [next(parts) if r else None for r in ranks]


def projections_forward(x: torch.Tensor, projs, dropout_p: float, seed: int, outs, save_bits: bool = False,
                        saved: Saved | None = None) -> Saved:
    """Triton: outs[i] [M, N_i] (any strides) = x W_iᵀ + b_i + s_i·(x ⊙ keep)/(1-p) A_iᵀ B_iᵀ.

    x [M, in]; one keep-mask (from `seed`) for every projection; a DoRA projection's outs[i] is
    c_i ⊙ z_i + b_i. `saved` (a previous call's return) reuses its t and DoRA rescales instead
    of recomputing them. Returns what the backward needs.
    """
    if saved is None:
        t, bits = None, None
        if any(p.rank for p in projs):
            a = torch.cat([p.lora_A for p in projs if p.rank])                # [Σr, in], tiny
            t, bits = lowrank(x, a, 1.0 / (1.0 - dropout_p), seed, dropout_p, write_bits=save_bits)
        rescales = [Rescale.of(p.weight, p.quant_state, p.lora_A, p.lora_B, p.scaling, p.magnitude, p.weight_sq)
                    if p.dora else None for p in projs]
        saved = Saved(t, bits, rescales)
    for proj, t_i, out, rescale in zip(projs, _split(saved.t, projs), outs, saved.rescales or [None] * len(projs)):
        gemm(out, [(x, proj.base())], True, lowrank=_lowrank_term(proj, t_i, x.dtype), bias=proj.bias,
             col_scale=None if rescale is None else rescale.col_scale)
    return saved


def _lowrank_term(proj: Projection, t_i: torch.Tensor | None, dtype: torch.dtype):
    """(t_i, (s·B_i)ᵀ) of the fused GEMM, None for a base-only projection."""
    return None if t_i is None else (t_i, (proj.lora_B.float() * proj.scaling).to(dtype).t())


def projections_backward(dys, x: torch.Tensor, projs, dropout_p: float, saved: Saved, need_dx: bool,
                         needs, ys=None) -> tuple[torch.Tensor | None, list[tuple]]:
    """Triton backward of `projections_forward`.

    dys[i] [M, N_i] (any strides), x [M, in]; needs[i] = (dA, dB, dbias, dm) flags of
    projection i; ys[i] the forward's output of each DoRA projection (None for the others).
    Returns (dX [M, in] or None, [(dA_i, dB_i, dbias_i, dm_i)]), None where not needed or absent.
    """
    inv_keep = 1.0 / (1.0 - dropout_p)
    grads = [[None] * TRAINABLES for _ in projs]
    # 0. DoRA: the rescale's backward, dY_i → dZ_i = dY_i ⊙ c_i for everything below but dbias
    dbias_from = list(dys)
    dys = list(dys)
    for i, (proj, rescale) in enumerate(zip(projs, saved.rescales or [None] * len(projs))):
        if rescale is not None:
            t_i = _split(saved.t, projs)[i]
            recompute_z = lambda i=i, t_i=t_i: gemm(  # noqa: E731
                output(dys[i].shape, x.dtype, x.device), [(x, projs[i].base())], True,
                lowrank=_lowrank_term(projs[i], t_i, x.dtype))
            dys[i], grads[i][3] = rescale_backward(dys[i], ys[i], proj.bias, rescale, recompute_z,
                                                   proj.magnitude.dtype if needs[i][3] else None)
    adapted = [i for i, p in enumerate(projs) if p.rank]
    need_da = [i for i in adapted if needs[i][0]]
    u = a = None
    # 1. u = [s_i · dY_i B_i]   [M, Σr]  (B viewed as Bᵀ [r, N])
    if adapted and (need_dx or need_da):
        u = torch.cat([lowrank(dys[i], projs[i].lora_B.t(), projs[i].scaling)[0] for i in adapted], 1)
        a = torch.cat([projs[i].lora_A for i in adapted], 0)
    # 2. dX, one pass over every segment and the masked low-rank term
    dx = None
    if need_dx:
        dx = gemm(output(x.shape, x.dtype, x.device), [(dy, p.base()) for dy, p in zip(dys, projs)], False,
                  lowrank=None if u is None else (u, a), keep_bits=saved.bits, inv_keep=inv_keep)
    # 3. dA of every adapter in one launch: (x ⊙ keep)ᵀ u / (1-p) → [Σr, in], split by rank
    if need_da:
        da = matmul_tn(x, u, inv_keep, x.dtype, keep_bits=saved.bits, transpose=True)
        for i, part in zip(adapted, da.split([projs[i].rank for i in adapted], 0)):
            grads[i][0] = part if needs[i][0] else None
    # 4. dB_i = s_i · dY_iᵀ t_i   [N_i, r_i], t from the forward
    for i, t_i in enumerate(_split(saved.t, projs)):
        if t_i is not None and needs[i][1]:
            grads[i][1] = matmul_tn(dys[i], t_i, projs[i].scaling, projs[i].lora_B.dtype)
    # 5. dbias_i = Σ_m dY_i
    for i, proj in enumerate(projs):
        if proj.bias is not None and needs[i][2]:
            grads[i][2] = dbias_from[i].sum(0, dtype=torch.float32).to(proj.bias.dtype)
    return dx, [tuple(g) for g in grads]


# ----------------------------------------------------------------------------- autograd

class LoRAProjectionsFunction(torch.autograd.Function):
    """x → (y_0, y_1, ...) of 1-3 LoRA projections sharing x. Saves x, t, the keep bits and the
    outputs of DoRA projections; the projections (frozen bases and the adapters, which are also
    inputs) and the DoRA rescales stay referenced on ctx.

    apply(x, projs, dropout_p, seed, save_bits, *trainables): trainables = the projections'
    (lora_A, lora_B, bias, magnitude) in order, passed separately so autograd routes their gradients.
    """

    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda")
    def forward(ctx, x, projs, dropout_p, seed, save_bits, *trainables):
        x2d = x.reshape(-1, x.shape[-1])  # [M, in]
        outs = [output((x2d.shape[0], p.out_features), x.dtype, x.device) for p in projs]
        saved = projections_forward(x2d, projs, dropout_p, seed, outs, save_bits)
        ctx.save_for_backward(x2d, saved.t, saved.bits, *(o for o, p in zip(outs, projs) if p.dora))
        ctx.projs, ctx.dropout_p, ctx.x_shape, ctx.rescales = projs, dropout_p, x.shape, saved.rescales
        return tuple(o.view(*x.shape[:-1], o.shape[1]) for o in outs)

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx, *dys):
        x2d, t, bits, *dora_ys = ctx.saved_tensors
        dys = [dy.reshape(-1, dy.shape[-1]).to(x2d.dtype) for dy in dys]
        need = ctx.needs_input_grad
        needs = [need[5 + TRAINABLES * i:5 + TRAINABLES * (i + 1)] for i in range(len(ctx.projs))]
        ys = iter(dora_ys)
        ys = [next(ys) if p.dora else None for p in ctx.projs]
        dx, grads = projections_backward(dys, x2d, ctx.projs, ctx.dropout_p, Saved(t, bits, ctx.rescales), need[0],
                                         needs, ys)
        return (None if dx is None else dx.view(ctx.x_shape), None, None, None, None,
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
        if proj.dora:
            if proj.lora_A is None:
                raise ValueError("a DoRA magnitude needs lora_A and lora_B")
            if dropout_p > 0:
                raise ValueError(f"a DoRA projection takes dropout_p = 0 in a fused block, got {dropout_p} "
                                 "(dora_linear takes DoRA with dropout)")
            check_magnitude(proj.magnitude, b.shape[0], x.device)
    except (TypeError, ValueError) as err:
        raise type(err)(f"{name}: {err}") from None


def autocast_projections(x: torch.Tensor, projs) -> tuple[torch.Tensor, tuple]:
    """Under torch.autocast, x and every float tensor of `projs` (not packed 4-bit) in the autocast dtype."""
    dtype = autocast_dtype(x.device.type)
    if dtype is None:
        return x, tuple(projs)
    return cast_floats(dtype, x)[0], tuple(
        Projection(*cast_floats(dtype, p.weight, p.quant_state, p.lora_A, p.lora_B, p.scaling, p.bias),
                   p.magnitude, p.weight_sq) for p in projs)  # m keeps its dtype (its gradient's), as in dora_linear


def wants_grad(x: torch.Tensor, projs) -> bool:
    """Will autograd call the backward: does x or any trainable of `projs` need a gradient?"""
    tensors = [x] + [t for p in projs for t in p.trainables()]
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def lora_projections(x: torch.Tensor, projs, dropout_p: float = 0.0, backend: str = "auto",
                     seed: int | None = None) -> tuple[torch.Tensor, ...]:
    """`x W_iᵀ + b_i + s_i · dropout(x) A_iᵀ B_iᵀ` for 1-3 projections of one input, autograd-aware.

    Args:
        x: [..., in], fp32/fp16/bf16, any strides.
        projs: 1-3 `Projection`s in x's dtype (packed 4-bit bases are dequantized to it); a
            DoRA one (`magnitude` given) needs dropout_p = 0 and gets m's gradient too.
        dropout_p: dropout on the adapters' input, in [0, 1); ONE mask for all projections.
        backend: "auto" (Triton on CUDA or under the interpreter), "triton" or "torch".
        seed: dropout seed in [0, 2**62); both backends derive the same mask from it
            (`lora_dropout_mask`). None: drawn from torch's default generator (both backends,
            so a seeded run repeats).
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
    check_frozen(*(p.weight for p in projs))
    trainables = [t for p in projs for t in p.trainables()]
    return LoRAProjectionsFunction.apply(x, projs, float(dropout_p), seed,
                                         dropout_p > 0 and wants_grad(x, projs), *trainables)


def lora_qkv(x: torch.Tensor, q: Projection, k: Projection, v: Projection, dropout_p: float = 0.0,
             backend: str = "auto", seed: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Query, key and value projections of x [..., hidden] → (q [..., Nq], k [..., Nk], v [..., Nv]).

    Each projection is a LoRA linear over a dense or 4-bit base, with optional bias (Qwen2) and
    optional adapter; the backward writes dX once for all three (see the module docstring).
    Arguments as `lora_projections`.
    """
    return lora_projections(x, (q, k, v), dropout_p, backend, seed)
