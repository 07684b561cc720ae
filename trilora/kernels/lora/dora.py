"""DoRA linear (Liu et al. 2024): LoRA with the weight split into magnitude and direction,
as PEFT computes it (its `DoraLinearLayer`, so adapters and gradients match PEFT's); the math,
the norm and the reference are in `dora_math.py`.

Two paths:
- "torch": `dora_linear_ref`, W + s·BA formed densely (PEFT's cost: a dequantized copy of W
  and an [out, in] temporary per layer and step).
- "triton": nothing [out, in] is formed. The norm comes from `dora_weight_norm_lowrank`; the
  output is the fused LoRA GEMM with the per-column rescale m/n and the bias in its epilogue
  (`DoRALinearFunction`), and with dropout one more base GEMM:
      y = (x − x̃) Wᵀ + (m/n) ⊙ (x̃ Wᵀ + s·x̃ Aᵀ Bᵀ) + b
  (= PEFT's formula regrouped), so x̃ Wᵀ and the low-rank term come out of one fused call.
"""
from __future__ import annotations

import torch

from ..backend import resolve_backend
from ..quant_state import BaseWeight, QuantStateLike
from .checks import autocast_and_check, check_frozen, check_magnitude
from .dora_math import (Rescale, base_sq_norm, dense_weight, dora_linear_ref, dora_weight_norm,  # noqa: F401
                        dora_weight_norm_lowrank, rescale_backward)
from .dropout import check_seed, lora_dropout_mask, resolve_seed
from .engine import gemm, lowrank, output
from .linear import lora_backward
from .projections import Projection, lora_projections


class DoRALinearFunction(torch.autograd.Function):
    """Triton forward/backward of DoRA without dropout (`dora_linear` feeds it x̃ and adds
    the dropped part): y = c ⊙ (x Wᵀ + s·x Aᵀ Bᵀ) + b with c = m/n per output column, the
    rescale and the bias in the fused LoRA GEMM's epilogue (one store of y, nothing else
    of size M·out in the forward).

    Backward: dZ = dY ⊙ c, then LoRA's backward of z (`lora_backward`: dX, dA, dB); n is
    detached (the paper's §4.3, PEFT's), so dm = Σ_rows dY ⊙ z / n, with z = (y − b)/c read
    back from the saved output (z itself is recomputed by one GEMM if some c is 0). Saved:
    x, A, B, t = x Aᵀ [M, r], y (the output: shared with whoever else keeps it); the forward's
    `Rescale` (c, n) stays on ctx.

    apply(x, base: BaseWeight, lora_A, lora_B, bias, scaling, magnitude [out], rescale: Rescale
    (c and n of this magnitude)).
    """

    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda")
    def forward(ctx, x, base, lora_A, lora_B, bias, scaling, magnitude, rescale):
        x2d = x.reshape(-1, x.shape[-1])
        n_out = lora_B.shape[0]
        t, _ = lowrank(x2d, lora_A, scaling)
        y = gemm(output((x2d.shape[0], n_out), x.dtype, x.device), [(x2d, base)], True, lowrank=(t, lora_B.t()),
                 bias=bias, col_scale=rescale.col_scale)
        ctx.save_for_backward(x2d, lora_A, lora_B, t, y, bias)
        ctx.base, ctx.x_shape, ctx.scaling, ctx.rescale = base, x.shape, scaling, rescale
        ctx.magnitude_dtype = magnitude.dtype
        return y.view(*x.shape[:-1], n_out)

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx, dy):
        x2d, lora_A, lora_B, t, y, bias = ctx.saved_tensors
        dy = dy.reshape(-1, dy.shape[-1]).to(x2d.dtype)
        need = ctx.needs_input_grad
        recompute_z = lambda: gemm(output(y.shape, y.dtype, y.device), [(x2d, ctx.base)], True,  # noqa: E731
                                   lowrank=(t, lora_B.t()))
        dz, dm = rescale_backward(dy, y, bias, ctx.rescale, recompute_z,
                                  ctx.magnitude_dtype if need[6] else None)
        dx, da, dlb = lora_backward(dz, x2d, lora_A, lora_B, t, None, ctx.base, ctx.scaling, 0.0,
                                    need[0], need[2], need[3])
        dbias = None
        if need[4] and bias is not None:
            dbias = dy.sum(0, dtype=torch.float32).to(bias.dtype)
        return (None if dx is None else dx.view(ctx.x_shape), None, da, dlb, dbias, None, dm, None)


def dora_linear(x: torch.Tensor, weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor,
                scaling: float, magnitude: torch.Tensor, bias: torch.Tensor | None = None, dropout_p: float = 0.0,
                quant_state: QuantStateLike | None = None, backend: str = "auto", seed: int | None = None,
                weight_sq: torch.Tensor | None = None) -> torch.Tensor:
    """DoRA linear, autograd-aware; arguments as `lora_linear`'s plus `magnitude` [out]
    (fp32 or x's dtype; it gets the gradient of the DoRA rescale) and `weight_sq`, the base's
    `base_sq_norm` if the caller keeps it (else computed here). See the module docstring for
    the two backends; "auto" picks Triton where it runs. Returns [..., out] in x's dtype.
    """
    x, weight, lora_A, lora_B, bias = autocast_and_check(x, weight, lora_A, lora_B, scaling, bias, dropout_p,
                                                         quant_state)
    check_magnitude(magnitude, lora_B.shape[0], x.device)
    check_seed(seed)
    if resolve_backend(backend, x) == "torch":
        mask = lora_dropout_mask(seed, x.shape, dropout_p, x.device) if dropout_p > 0 and seed is not None else None
        return dora_linear_ref(x, weight, lora_A, lora_B, float(scaling), magnitude, bias, dropout_p, quant_state,
                               mask)
    rescale = Rescale.of(weight, quant_state, lora_A, lora_B, scaling, magnitude, weight_sq)
    if dropout_p > 0:
        seed = resolve_seed(dropout_p, seed)
        x_in = x * lora_dropout_mask(seed, x.shape, dropout_p, x.device) / (1.0 - dropout_p)
        (rest,) = lora_projections(x - x_in, [Projection(weight, quant_state)], backend="triton")
    else:
        x_in, rest = x, None
    check_frozen(weight)
    y = DoRALinearFunction.apply(x_in, BaseWeight.of(weight, quant_state), lora_A, lora_B, bias, float(scaling),
                                 magnitude, rescale)
    return y if rest is None else y + rest


__all__ = ["base_sq_norm", "dense_weight", "dora_linear", "dora_linear_ref", "dora_weight_norm",
           "dora_weight_norm_lowrank"]
