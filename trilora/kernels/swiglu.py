"""SwiGLU activation `silu(gate) * up`, forward and backward fused.

Why a kernel: HF's MLP runs `act_fn(gate_proj(x)) * up_proj(x)` as two elementwise ops, and
autograd keeps silu(gate) [tokens, intermediate] besides gate and up. Here the forward reads
gate and up once and writes h; the backward saves nothing beyond gate and up (silu and
sigmoid are recomputed in registers, cheaper than a round trip through memory) and writes
d_gate and d_up in one pass. All arithmetic is fp32, one rounding per output:

    h      = silu(g)·u,              silu(g) = g·σ(g)
    d_up   = dh·silu(g)
    d_gate = dh·u·σ(g)·(1 + g·(1 − σ(g)))

Out-of-place: gate and up are not modified (the backward writes new tensors).
Reading order: reference → kernels → launchers → autograd Function → `swiglu` → `SwiGLU`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .backend import FLOAT_DTYPES, HAS_TRITON, check_same_device, resolve_backend, rows_2d

if HAS_TRITON:
    import triton
    import triton.language as tl

BLOCK = 1024  # elements per program (fewer for short rows). Untuned default.


# ----------------------------------------------------------------------------- reference

def swiglu_ref(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """HF's LlamaMLP activation: `F.silu(gate) * up` (autograd through torch)."""
    return F.silu(gate) * up


# ----------------------------------------------------------------------------- kernels

if HAS_TRITON:

    @triton.jit
    def _tile(n_cols, BLOCK: tl.constexpr):
        # 1-D grid (no 65535 limit on rows): program → (row, block of columns)
        pid = tl.program_id(0).to(tl.int64)
        n_col_blocks = tl.cdiv(n_cols, BLOCK)
        row = pid // n_col_blocks
        cols = (pid % n_col_blocks) * BLOCK + tl.arange(0, BLOCK)
        return row, cols, cols < n_cols

    @triton.jit
    def _swiglu_fwd_kernel(
        gate_ptr, up_ptr, h_ptr,                 # [n_rows, n_cols], unit column stride
        n_cols, stride_gate, stride_up, stride_h,
        BLOCK: tl.constexpr,
    ):
        row, cols, mask = _tile(n_cols, BLOCK)
        g = tl.load(gate_ptr + row * stride_gate + cols, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(up_ptr + row * stride_up + cols, mask=mask, other=0.0).to(tl.float32)
        h = g * tl.sigmoid(g) * u
        tl.store(h_ptr + row * stride_h + cols, h.to(h_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _swiglu_bwd_kernel(
        dh_ptr, gate_ptr, up_ptr,                # inputs [n_rows, n_cols]
        dgate_ptr, dup_ptr,                      # outputs [n_rows, n_cols], contiguous
        n_cols, stride_dh, stride_gate, stride_up,
        BLOCK: tl.constexpr,
    ):
        row, cols, mask = _tile(n_cols, BLOCK)
        dh = tl.load(dh_ptr + row * stride_dh + cols, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(gate_ptr + row * stride_gate + cols, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(up_ptr + row * stride_up + cols, mask=mask, other=0.0).to(tl.float32)
        sig = tl.sigmoid(g)
        silu = g * sig
        dgate = dh * u * sig * (1.0 + g * (1.0 - sig))
        out = row * n_cols + cols
        tl.store(dgate_ptr + out, dgate.to(dgate_ptr.dtype.element_ty), mask=mask)
        tl.store(dup_ptr + out, (dh * silu).to(dup_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------- launchers


def _flat(*ts: torch.Tensor) -> tuple[int, int, list[int]]:
    """(rows, cols, row strides) of the launch: contiguous operands collapse to one long row
    (no partial block at every row end)."""
    n_rows, n_cols = ts[0].shape
    if all(t.is_contiguous() for t in ts):
        return 1, n_rows * n_cols, [0] * len(ts)
    return n_rows, n_cols, [t.stride(0) for t in ts]


def _launch(kernel, n_rows: int, n_cols: int, *args) -> None:
    block = min(BLOCK, triton.next_power_of_2(n_cols))
    kernel[(n_rows * triton.cdiv(n_cols, block),)](*args, BLOCK=block, num_warps=4)


def swiglu_forward(gate: torch.Tensor, up: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """Triton: h = silu(gate)·up. gate, up [rows, I] (unit column stride) → h [rows, I] (or `out`)."""
    h = torch.empty(gate.shape, dtype=gate.dtype, device=gate.device) if out is None else out
    if h.numel():
        n_rows, n_cols, strides = _flat(gate, up, h)
        _launch(_swiglu_fwd_kernel, n_rows, n_cols, gate, up, h, n_cols, *strides)
    return h


def swiglu_backward(dh: torch.Tensor, gate: torch.Tensor, up: torch.Tensor,
                    out: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton: (d_gate, d_up), contiguous [rows, I] in gate's dtype (or the contiguous pair
    `out`), from dh, gate, up [rows, I]."""
    if out is None:
        out = tuple(torch.empty(gate.shape, dtype=gate.dtype, device=gate.device) for _ in range(2))
    dgate, dup = out
    if dgate.numel():
        n_rows, n_cols, strides = _flat(dh, gate, up)
        _launch(_swiglu_bwd_kernel, n_rows, n_cols, dh, gate, up, dgate, dup, n_cols, *strides)
    return dgate, dup


# ----------------------------------------------------------------------------- autograd

class SwiGLUFunction(torch.autograd.Function):
    """Saves gate and up only; silu is recomputed in backward."""

    @staticmethod
    def forward(ctx, gate, up):
        gate2d, up2d = rows_2d(gate), rows_2d(up)     # [rows, I]
        ctx.save_for_backward(gate2d, up2d)
        ctx.shape = gate.shape
        return swiglu_forward(gate2d, up2d).view(gate.shape)

    @staticmethod
    def backward(ctx, dh):
        gate2d, up2d = ctx.saved_tensors
        dgate, dup = swiglu_backward(rows_2d(dh), gate2d, up2d)
        return dgate.view(ctx.shape), dup.view(ctx.shape)


def _check_inputs(gate, up) -> None:
    if not isinstance(gate, torch.Tensor) or not isinstance(up, torch.Tensor):
        raise TypeError("swiglu expects tensors gate and up")
    if gate.dtype not in FLOAT_DTYPES or gate.dtype != up.dtype:
        raise TypeError(f"gate and up must share one dtype of float32/float16/bfloat16, "
                        f"got {gate.dtype} and {up.dtype}")
    if gate.shape != up.shape or gate.dim() == 0:
        raise ValueError(f"gate and up must have one shape [..., I], got {list(gate.shape)} and {list(up.shape)}")
    check_same_device(gate=gate, up=up)


def swiglu(gate: torch.Tensor, up: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """`silu(gate) * up`, autograd-aware; fp32 math, one rounding per output.

    Args:
        gate, up: [..., I], one dtype (fp32/fp16/bf16) and shape; any strides (e.g. the two
            halves of a fused gate_up projection).
        backend: "auto" (Triton on CUDA or under the interpreter), "triton" or "torch".
    Returns [..., I] in the inputs' dtype.
    """
    _check_inputs(gate, up)
    if resolve_backend(backend, gate, up) == "torch":
        return swiglu_ref(gate, up)
    return SwiGLUFunction.apply(gate, up)


class SwiGLU(torch.nn.Module):
    """`silu(gate) * up` as a module (HF's `act_fn(gate) * up` of LlamaMLP-style blocks)."""

    def __init__(self, backend: str = "auto"):
        super().__init__()
        self.backend = backend

    def forward(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        return swiglu(gate, up, self.backend)
