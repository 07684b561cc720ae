"""Shared by the transformer-block kernel tests (rms_norm, rope, swiglu, cross_entropy).

Error metric: ‖out − ref‖ / ‖ref‖ against a float64
reference computed from the same (rounded) inputs. fp32 must be ≤ FP32_TOL; a low-precision
result must be within 2 × the error of torch/HF in the same dtype, plus FP16_ATOL.
"""
from __future__ import annotations

import torch

FP32_TOL = 1e-5
FP16_ATOL = 1e-4


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    assert out.shape == ref.shape, (out.shape, ref.shape)
    assert torch.isfinite(out).all(), "non-finite values (unwritten output?)"
    return ((out.double() - ref.double()).norm() / ref.double().norm().clamp(min=1e-300)).item()


def check(out: torch.Tensor, ref64: torch.Tensor, baseline: torch.Tensor, what: str = "",
          dtype: torch.dtype | None = None) -> float:
    """Assert `out` is as close to the fp64 `ref64` as its dtype (or the inputs' `dtype`, e.g.
    an fp32 loss of fp16 logits) allows; `baseline` is the torch/HF result from inputs of the
    same dtype (the low-precision yardstick). Returns the error."""
    err = rel_err(out, ref64)
    if (dtype or out.dtype) == torch.float32:
        assert err <= FP32_TOL, f"{what}: fp32 error {err:.2e} > {FP32_TOL}"
    else:
        base = rel_err(baseline, ref64)
        assert err <= 2 * base + FP16_ATOL, f"{what}: {out.dtype} error {err:.2e} > 2 × torch's {base:.2e} + atol"
    return err


def leaves(*ts: torch.Tensor, dtype=None) -> list[torch.Tensor]:
    """Fresh leaf copies (optionally cast) that require grad."""
    return [t.detach().to(dtype or t.dtype).clone().requires_grad_(t.requires_grad) for t in ts]
