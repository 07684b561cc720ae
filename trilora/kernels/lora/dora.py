"""DoRA linear (Liu et al. 2024): LoRA with the weight split into magnitude and direction.

    W' = m ⊙ (W + s·BA) / ‖W + s·BA‖_row          (m: [out], the trained magnitude)

as PEFT computes it (its `DoraLinearLayer`, so adapters and gradients match PEFT's):

    n      = ‖W + s·BA‖ per output row, detached (the paper's §4.3: no gradient through it)
    y      = x Wᵀ + b + (m/n − 1) ⊙ (x̃ Wᵀ) + (m/n) ⊙ s·(x̃ Aᵀ Bᵀ),   x̃ = dropout(x)

Without dropout this is (m/n) ⊙ (x (W + s·BA)ᵀ) + b. With dropout PEFT applies the base's
rescale to the dropped input too (x̃ Wᵀ), and so does this op. The norm is computed in x's
dtype from W dequantized to it, as PEFT does.

Two paths:
- "torch": the reference above, W + s·BA formed densely (PEFT's cost: a dequantized copy of W
  and an [out, in] temporary per layer and step).
- "triton": nothing [out, in] is formed. The norm comes from
      n² = ‖W‖²_row + 2s·rowsum(B ⊙ W Aᵀ) + s²·rowsum((B·AAᵀ) ⊙ B)
  with ‖W‖²_row computed once per frozen base (`base_sq_norm`, cached by the layer), W Aᵀ one
  base GEMM with A's r rows as its input (4-bit W unpacked in the kernel's K-loop), AAᵀ [r, r].
  The output is the fused LoRA GEMM with the per-column rescale m/n and the bias in its
  epilogue (`DoRALinearFunction`), and with dropout one more base GEMM:
      y = (x − x̃) Wᵀ + (m/n) ⊙ (x̃ Wᵀ + s·x̃ Aᵀ Bᵀ) + b
  (= the formula above, regrouped), so x̃ Wᵀ and the low-rank term come out of one fused call.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..backend import resolve_backend
from ..quant_state import BaseWeight, QuantStateLike
from .checks import autocast_and_check, check_frozen
from .dropout import check_seed, lora_dropout_mask, resolve_seed
from .engine import gemm, lowrank, output
from .linear import lora_backward
from .projections import Projection, lora_projections


def dora_weight_norm(weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float) -> torch.Tensor:
    """‖W + s·BA‖ per output row, [out], detached; W dense [out, in] in the compute dtype."""
    with torch.no_grad():
        return torch.linalg.norm(weight + scaling * (lora_B @ lora_A), dim=1)


def base_sq_norm(weight: torch.Tensor, quant_state: QuantStateLike | None) -> torch.Tensor:
    """‖W‖² per output row, fp32 [out], of a dense [out, in] or packed 4-bit base (the frozen
    part of the DoRA norm: a layer computes it once and keeps it)."""
    with torch.no_grad():
        return dense_weight(weight, quant_state, torch.float32).square().sum(1)


def dora_weight_norm_lowrank(weight: torch.Tensor, quant_state: QuantStateLike | None, lora_A: torch.Tensor,
                             lora_B: torch.Tensor, scaling: float, weight_sq: torch.Tensor,
                             backend: str = "triton") -> torch.Tensor:
    """‖W + s·BA‖ per output row, fp32 [out], detached, without forming W + s·BA (see the
    module docstring); `weight_sq` = `base_sq_norm(weight, quant_state)`."""
    with torch.no_grad():
        (wa,) = lora_projections(lora_A, [Projection(weight, quant_state)], backend=backend)  # [r, out] = A Wᵀ
        a, b = lora_A.float(), lora_B.float()
        cross = (b * wa.float().t()).sum(1)                     # ⟨W_o, (BA)_o⟩
        quad = ((b @ (a @ a.t())) * b).sum(1)                    # ‖(BA)_o‖²
        return (weight_sq.float() + 2 * scaling * cross + scaling * scaling * quad).clamp_min(0).sqrt()


def dense_weight(weight: torch.Tensor, quant_state: QuantStateLike | None, dtype: torch.dtype) -> torch.Tensor:
    """The base weight [out, in] in `dtype` (a packed 4-bit one dequantized)."""
    if quant_state is None:
        return weight.to(dtype)
    return BaseWeight.of(weight, quant_state).dequantized(dtype, backend="torch").weight


def dora_linear_ref(x: torch.Tensor, weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor,
                    scaling: float, magnitude: torch.Tensor, bias: torch.Tensor | None = None,
                    dropout_p: float = 0.0, quant_state: QuantStateLike | None = None,
                    dropout_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Plain-PyTorch DoRA linear (autograd through torch ops); see the module docstring.
    `dropout_mask` (bool, x's shape, True = keep) replaces F.dropout's own mask."""
    w = dense_weight(weight, quant_state, x.dtype)
    norm = dora_weight_norm(w, lora_A, lora_B, scaling)
    scale = magnitude.to(x.dtype) / norm                               # [out], grads to m only
    base = F.linear(x, w)                                              # x Wᵀ, no bias
    if dropout_p > 0:
        x_in = x * dropout_mask / (1.0 - dropout_p) if dropout_mask is not None else F.dropout(x, dropout_p)
        base_in = F.linear(x_in, w)
    else:
        x_in, base_in = x, base
    lowrank = F.linear(F.linear(x_in, lora_A), lora_B) * scaling
    y = base + (scale - 1) * base_in + scale * lowrank
    return y if bias is None else y + bias


class DoRALinearFunction(torch.autograd.Function):
    """Triton forward/backward of DoRA without dropout (`dora_linear` feeds it x̃ and adds
    the dropped part): y = c ⊙ (x Wᵀ + s·x Aᵀ Bᵀ) + b with c = m/n per output column, the
    rescale and the bias in the fused LoRA GEMM's epilogue (one store of y, nothing else
    of size M·out in the forward).

    Backward: dZ = dY ⊙ c, then LoRA's backward of z (`lora_backward`: dX, dA, dB); n is
    detached (the paper's §4.3, PEFT's), so dm = Σ_rows dY ⊙ z / n, with z = (y − b)/c read
    back from the saved output (z itself is recomputed by one GEMM if some c is 0). Saved:
    x, A, B, t = x Aᵀ [M, r], y (the output: shared with whoever else keeps it), c and n.

    apply(x, base: BaseWeight, lora_A, lora_B, bias, scaling, magnitude [out], norm [out] fp32).
    """

    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda")
    def forward(ctx, x, base, lora_A, lora_B, bias, scaling, magnitude, norm):
        x2d = x.reshape(-1, x.shape[-1])
        n_out = lora_B.shape[0]
        t, _ = lowrank(x2d, lora_A, scaling)
        col_scale = magnitude.detach().float() / norm
        y = gemm(output((x2d.shape[0], n_out), x.dtype, x.device), [(x2d, base)], True, lowrank=(t, lora_B.t()),
                 bias=bias, col_scale=col_scale)
        ctx.save_for_backward(x2d, lora_A, lora_B, t, y, col_scale, norm, bias)
        ctx.base, ctx.x_shape, ctx.scaling = base, x.shape, scaling
        ctx.magnitude_dtype = magnitude.dtype
        return y.view(*x.shape[:-1], n_out)

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx, dy):
        x2d, lora_A, lora_B, t, y, col_scale, norm, bias = ctx.saved_tensors
        dy = dy.reshape(-1, dy.shape[-1]).to(x2d.dtype)
        need = ctx.needs_input_grad
        dz = (dy.float() * col_scale).to(x2d.dtype)
        dx, da, dlb = lora_backward(dz, x2d, lora_A, lora_B, t, None, ctx.base, ctx.scaling, 0.0,
                                    need[0], need[2], need[3])
        dbias = dm = None
        if need[4] and bias is not None:
            dbias = dy.sum(0, dtype=torch.float32).to(bias.dtype)
        if need[6]:
            if bool((col_scale == 0).any()):  # z cannot be read back from y: compute it
                z = gemm(output(y.shape, y.dtype, y.device), [(x2d, ctx.base)], True, lowrank=(t, lora_B.t())).float()
            else:
                z = (y.float() if bias is None else y.float() - bias.float()) / col_scale
            dm = ((dy.float() * z).sum(0) / norm).to(ctx.magnitude_dtype)
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
    out_features = lora_B.shape[0]
    if not isinstance(magnitude, torch.Tensor) or tuple(magnitude.shape) != (out_features,) \
            or not magnitude.is_floating_point():
        got = tuple(magnitude.shape) if isinstance(magnitude, torch.Tensor) else type(magnitude).__name__
        raise ValueError(f"magnitude must be a float tensor of shape ({out_features},) [out], got {got}")
    check_seed(seed)
    if resolve_backend(backend, x) == "torch":
        mask = lora_dropout_mask(seed, x.shape, dropout_p, x.device) if dropout_p > 0 and seed is not None else None
        return dora_linear_ref(x, weight, lora_A, lora_B, float(scaling), magnitude, bias, dropout_p, quant_state,
                               mask)
    if weight_sq is None:
        weight_sq = base_sq_norm(weight, quant_state)
    norm = dora_weight_norm_lowrank(weight, quant_state, lora_A, lora_B, float(scaling), weight_sq, "triton")
    if dropout_p > 0:
        seed = resolve_seed(dropout_p, seed)
        x_in = x * lora_dropout_mask(seed, x.shape, dropout_p, x.device) / (1.0 - dropout_p)
        (rest,) = lora_projections(x - x_in, [Projection(weight, quant_state)], backend="triton")
    else:
        x_in, rest = x, None
    check_frozen(weight)
    y = DoRALinearFunction.apply(x_in, BaseWeight.of(weight, quant_state), lora_A, lora_B, bias, float(scaling),
                                 magnitude, norm)
    return y if rest is None else y + rest


__all__ = ["base_sq_norm", "dense_weight", "dora_linear", "dora_linear_ref", "dora_weight_norm",
           "dora_weight_norm_lowrank"]
