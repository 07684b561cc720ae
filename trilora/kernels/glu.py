"""Gated linear units `act(gate) * up`, forward and backward fused; the activation a constexpr.

Why a kernel: HF's gated MLP runs `act_fn(gate_proj(x)) * up_proj(x)` as two elementwise ops,
and autograd keeps act(gate) [tokens, intermediate] besides gate and up. Here the forward reads
gate and up once and writes h; the backward saves nothing beyond gate and up (the activation
and its derivative are recomputed in registers, cheaper than a round trip through memory) and
writes d_gate and d_up in one pass. All arithmetic is fp32, one rounding per output:

    h      = a(g)·u
    d_up   = dh·a(g)
    d_gate = dh·u·a'(g)

Activations (`ACTIVATIONS`): "silu" (SwiGLU: Llama, Mistral, Qwen2), a = g·σ(g),
a' = σ(g)·(1 + g·(1 − σ(g))); "gelu_tanh" (GeGLU: Gemma's gelu_pytorch_tanh), written with a
sigmoid, 0.5·(1 + tanh(z)) = σ(2z), so no libdevice call is needed.

gate and up are any [rows, I] views with unit column stride — two tensors, or the two halves
of one [rows, 2I] gate_up buffer (the LoRA MLP block, `lora/mlp.py`, which also passes its
buffer as the backward's output: d_gate, d_up overwrite g, u in place, each element read then
written by the same program).
Reading order: reference → kernels → launchers → autograd Function → `glu` / `swiglu` → modules.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .backend import FLOAT_DTYPES, HAS_TRITON, check_same_device, output, resolve_backend, rows_2d

if HAS_TRITON:
    import triton
    import triton.language as tl

ACTIVATIONS = ("silu", "gelu_tanh")
BLOCK = 1024  # elements per program (fewer for short rows). Untuned default.


# ----------------------------------------------------------------------------- reference

def glu_ref(gate: torch.Tensor, up: torch.Tensor, act: str = "silu") -> torch.Tensor:
    """HF's `act_fn(gate) * up`: silu, or gelu with the tanh approximation (autograd through torch)."""
    a = F.silu(gate) if act == "silu" else F.gelu(gate, approximate="tanh")
    return a * up


def swiglu_ref(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """HF's LlamaMLP activation: `F.silu(gate) * up`."""
    return glu_ref(gate, up, "silu")


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
    def _gate_act(g, ACT: tl.constexpr):
        """(a(g), a'(g)) in fp32. ACT 0: silu; 1: gelu_tanh = g·σ(2z), z = √(2/π)(g + 0.044715 g³)."""
        if ACT == 0:
            sig = tl.sigmoid(g)
            a = g * sig
            da = sig * (1.0 + g * (1.0 - sig))
        else:
            c = 1.5957691216057308  # 2·√(2/π)
            sig = tl.sigmoid(c * (g + 0.044715 * g * g * g))
            a = g * sig
            da = sig + g * sig * (1.0 - sig) * c * (1.0 + 3.0 * 0.044715 * g * g)
        return a, da

    @triton.jit
    def _glu_fwd_kernel(
        gate_ptr, up_ptr, h_ptr,                 # [n_rows, n_cols], unit column stride
        n_cols, stride_gate, stride_up, stride_h,
        ACT: tl.constexpr, BLOCK: tl.constexpr,
    ):
        row, cols, mask = _tile(n_cols, BLOCK)
        g = tl.load(gate_ptr + row * stride_gate + cols, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(up_ptr + row * stride_up + cols, mask=mask, other=0.0).to(tl.float32)
        a, _ = _gate_act(g, ACT)
        tl.store(h_ptr + row * stride_h + cols, (a * u).to(h_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _glu_bwd_kernel(
        dh_ptr, gate_ptr, up_ptr,                # inputs [n_rows, n_cols]
        dgate_ptr, dup_ptr,                      # outputs [n_rows, n_cols]; may alias gate / up
        n_cols, stride_dh, stride_gate, stride_up, stride_dgate, stride_dup,
        ACT: tl.constexpr, BLOCK: tl.constexpr,
    ):
        row, cols, mask = _tile(n_cols, BLOCK)
        dh = tl.load(dh_ptr + row * stride_dh + cols, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(gate_ptr + row * stride_gate + cols, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(up_ptr + row * stride_up + cols, mask=mask, other=0.0).to(tl.float32)
        a, da = _gate_act(g, ACT)
        tl.store(dgate_ptr + row * stride_dgate + cols, (dh * u * da).to(dgate_ptr.dtype.element_ty), mask=mask)
        tl.store(dup_ptr + row * stride_dup + cols, (dh * a).to(dup_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------- launchers

def _flat(*ts: torch.Tensor) -> tuple[int, int, list[int]]:
    """(rows, cols, row strides) of the launch: contiguous operands collapse to one long row
    (no partial block at every row end)."""
    n_rows, n_cols = ts[0].shape
    if all(t.is_contiguous() for t in ts):
        return 1, n_rows * n_cols, [0] * len(ts)
    return n_rows, n_cols, [t.stride(0) for t in ts]


def _launch(kernel, n_rows: int, n_cols: int, *args, act: str) -> None:
    block = min(BLOCK, triton.next_power_of_2(n_cols))
    kernel[(n_rows * triton.cdiv(n_cols, block),)](*args, ACT=ACTIVATIONS.index(act), BLOCK=block, num_warps=4)


def glu_forward(gate: torch.Tensor, up: torch.Tensor, act: str, out: torch.Tensor | None = None) -> torch.Tensor:
    """Triton: h = a(gate)·up. gate, up [rows, I] (unit column stride) → h [rows, I], written
    into `out` when given (the LoRA MLP's own buffer)."""
    h = output(gate.shape, gate.dtype, gate.device) if out is None else out
    if h.numel():
        n_rows, n_cols, strides = _flat(gate, up, h)
        _launch(_glu_fwd_kernel, n_rows, n_cols, gate, up, h, n_cols, *strides, act=act)
    return h


def glu_backward(dh: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, act: str,
                 out: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton: (d_gate, d_up) [rows, I] in gate's dtype from dh, gate, up [rows, I]; written
    into `out` when given — which may be (gate, up) themselves (in place)."""
    if out is None:
        out = tuple(output(gate.shape, gate.dtype, gate.device) for _ in range(2))
    dgate, dup = out
    if dgate.numel():
        n_rows, n_cols, strides = _flat(dh, gate, up, dgate, dup)
        _launch(_glu_bwd_kernel, n_rows, n_cols, dh, gate, up, dgate, dup, n_cols, *strides, act=act)
    return dgate, dup


# ----------------------------------------------------------------------------- autograd

class GLUFunction(torch.autograd.Function):
    """Saves gate and up only; the activation is recomputed in backward."""

    @staticmethod
    def forward(ctx, gate, up, act):
        gate2d, up2d = rows_2d(gate), rows_2d(up)     # [rows, I]
        ctx.save_for_backward(gate2d, up2d)
        ctx.shape, ctx.act = gate.shape, act
        return glu_forward(gate2d, up2d, act).view(gate.shape)

    @staticmethod
    def backward(ctx, dh):
        gate2d, up2d = ctx.saved_tensors
        dgate, dup = glu_backward(rows_2d(dh), gate2d, up2d, ctx.act)
        return dgate.view(ctx.shape), dup.view(ctx.shape), None


def _check_inputs(gate, up, act) -> None:
    if not isinstance(gate, torch.Tensor) or not isinstance(up, torch.Tensor):
        raise TypeError("glu expects tensors gate and up")
    if gate.dtype not in FLOAT_DTYPES or gate.dtype != up.dtype:
        raise TypeError(f"gate and up must share one dtype of float32/float16/bfloat16, "
                        f"got {gate.dtype} and {up.dtype}")
    if gate.shape != up.shape or gate.dim() == 0:
        raise ValueError(f"gate and up must have one shape [..., I], got {list(gate.shape)} and {list(up.shape)}")
    if act not in ACTIVATIONS:
        raise ValueError(f"act must be one of {ACTIVATIONS}, got {act!r}")
    check_same_device(gate=gate, up=up)


def glu(gate: torch.Tensor, up: torch.Tensor, act: str = "silu", backend: str = "auto") -> torch.Tensor:
    """`act(gate) * up`, autograd-aware; fp32 math, one rounding per output.

    Args:
        gate, up: [..., I], one dtype (fp32/fp16/bf16) and shape; any strides (e.g. the two
            halves of a fused gate_up projection).
        act: "silu" (SwiGLU) or "gelu_tanh" (GeGLU, tanh approximation).
        backend: "auto" (Triton on CUDA or under the interpreter), "triton" or "torch".
    Returns [..., I] in the inputs' dtype.
    """
    _check_inputs(gate, up, act)
    if resolve_backend(backend, gate, up) == "torch":
        return glu_ref(gate, up, act)
    return GLUFunction.apply(gate, up, act)


def swiglu(gate: torch.Tensor, up: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """`silu(gate) * up` (`glu` with act="silu")."""
    return glu(gate, up, "silu", backend)


class GLU(torch.nn.Module):
    """`act(gate) * up` as a module (HF's `act_fn(gate) * up` of gated MLP blocks)."""

    def __init__(self, act: str = "silu", backend: str = "auto"):
        super().__init__()
        if act not in ACTIVATIONS:
            raise ValueError(f"act must be one of {ACTIVATIONS}, got {act!r}")
        self.act, self.backend = act, backend

    def forward(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        return glu(gate, up, self.act, self.backend)


class SwiGLU(GLU):
    """`silu(gate) * up` as a module (LlamaMLP-style blocks)."""

    def __init__(self, backend: str = "auto"):
        super().__init__("silu", backend)


__all__ = ["ACTIVATIONS", "GLU", "GLUFunction", "SwiGLU", "glu", "glu_backward", "glu_forward", "glu_ref", "swiglu",
           "swiglu_ref"]
