"""DoRA's pieces shared by the DoRA linear (`dora.py`) and the fused blocks (`projections.py`,
`mlp.py`): the weight norm, the PyTorch reference, and the column rescale's backward.

    W' = m ⊙ (W + s·BA) / ‖W + s·BA‖_row          (m: [out], the trained magnitude)
    y  = x Wᵀ + b + (m/n − 1) ⊙ (x̃ Wᵀ) + (m/n) ⊙ s·(x̃ Aᵀ Bᵀ),   n = ‖W + s·BA‖ detached

as PEFT computes it (its `DoraLinearLayer`). Without dropout (x̃ = x) this is
y = c ⊙ z + b with c = m/n and z = x Wᵀ + s·x Aᵀ Bᵀ, which the fused LoRA GEMM computes with c
in its epilogue; the backward is then LoRA's on dZ = dY ⊙ c, plus dm = Σ_rows dY ⊙ z / n
(`rescale_backward`).

The norm without forming W + s·BA ([out, in]):
    n² = ‖W‖²_row + 2s·rowsum(B ⊙ W Aᵀ) + s²·rowsum((B·AAᵀ) ⊙ B)
with ‖W‖²_row computed once per frozen base (`base_sq_norm`, cached by the layer), W Aᵀ one base
GEMM with A's r rows as its input (a 4-bit W unpacked in the kernel's K-loop), AAᵀ [r, r].
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..quant_state import BaseWeight, QuantStateLike
from .engine import gemm, output


def dense_weight(weight: torch.Tensor, quant_state: QuantStateLike | None, dtype: torch.dtype) -> torch.Tensor:
    """The base weight [out, in] in `dtype` (a packed 4-bit one dequantized)."""
    if quant_state is None:
        return weight.to(dtype)
    return BaseWeight.of(weight, quant_state).dequantized(dtype, backend="torch").weight


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
    module docstring); `weight_sq` = `base_sq_norm(weight, quant_state)`. backend "triton":
    A Wᵀ by the LoRA engine's GEMM; "torch": by F.linear on the dequantized W."""
    with torch.no_grad():
        if backend == "torch":
            wa = F.linear(lora_A, dense_weight(weight, quant_state, lora_A.dtype))
        else:
            base = BaseWeight.of(weight, quant_state)
            wa = gemm(output((lora_A.shape[0], lora_B.shape[0]), lora_A.dtype, lora_A.device), [(lora_A, base)], True)
        a, b = lora_A.float(), lora_B.float()
        cross = (b * wa.float().t()).sum(1)                     # ⟨W_o, (BA)_o⟩
        quad = ((b @ (a @ a.t())) * b).sum(1)                    # ‖(BA)_o‖²
        return (weight_sq.float() + 2 * scaling * cross + scaling * scaling * quad).clamp_min(0).sqrt()


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


def _host_flag(flag: torch.Tensor) -> Callable[[], bool]:
    """A 0-d bool tensor copied to the host without waiting for it: the returned function reads
    it, waiting only until the stream has passed this point — long done when the backward asks,
    unless activation checkpointing re-ran this forward just before (then it waits, as a plain
    read would)."""
    if not flag.is_cuda:
        return lambda: bool(flag)
    host = torch.empty((), dtype=torch.bool, pin_memory=True)
    host.copy_(flag, non_blocking=True)
    copied = torch.cuda.Event()
    copied.record()

    def read() -> bool:
        copied.synchronize()
        return bool(host)
    return read


@dataclass
class Rescale:
    """The DoRA column rescale of one projection in a forward: c = m/n (fp32 [out], the GEMM's
    `col_scale`), the detached norm n (fp32 [out]) and `has_zero()`, whether some c is 0 (then
    z cannot be read back from y), fetched in the forward so the backward never syncs for it."""
    col_scale: torch.Tensor
    norm: torch.Tensor
    has_zero: Callable[[], bool] = field(init=False, repr=False)

    def __post_init__(self):
        self.has_zero = _host_flag((self.col_scale == 0).any())

    @staticmethod
    def of(weight, quant_state, lora_A, lora_B, scaling: float, magnitude: torch.Tensor,
           weight_sq: torch.Tensor | None) -> "Rescale":
        """Computed on the Triton path (`weight_sq` None: ‖W‖² computed here, once per call)."""
        if weight_sq is None:
            weight_sq = base_sq_norm(weight, quant_state)
        norm = dora_weight_norm_lowrank(weight, quant_state, lora_A, lora_B, float(scaling), weight_sq, "triton")
        return Rescale(magnitude.detach().float() / norm, norm)


def rescale_backward(dy: torch.Tensor, y: torch.Tensor, bias: torch.Tensor | None, rescale: Rescale,
                     recompute_z, magnitude_dtype: torch.dtype | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(dZ = dY ⊙ c in dY's dtype, dm or None) of y = c ⊙ z + b, from dY and the forward's y
    [M, out]. z = (y − b)/c is read back from y; `recompute_z()` returns z when some c is 0.
    magnitude_dtype None: dm not needed."""
    c = rescale.col_scale
    dz = (dy.float() * c).to(dy.dtype)
    dm = None
    if magnitude_dtype is not None:
        if rescale.has_zero():  # z cannot be read back from y
            z = recompute_z().float()
        else:
            z = (y.float() if bias is None else y.float() - bias.float()) / c
        dm = ((dy.float() * z).sum(0) / rescale.norm).to(magnitude_dtype)
    return dz, dm


__all__ = ["Rescale", "base_sq_norm", "dense_weight", "dora_linear_ref", "dora_weight_norm",
           "dora_weight_norm_lowrank", "rescale_backward"]
