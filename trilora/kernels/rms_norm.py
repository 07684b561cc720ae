"""RMSNorm, Llama's and Gemma's, forward and backward in one pass over the rows each.

Why a kernel: HF's RMSNorm is five elementwise/reduction ops (cast, pow, mean, rsqrt, mul,
cast, mul), each a round trip through memory, and autograd keeps their fp32 intermediates
for backward. Here the forward reads x once and writes y and one fp32 rstd per row (the only
thing saved besides x and the weight); the backward recomputes x·rstd and writes dX in one
pass, and reduces dW over a block of rows per program into a small fp32 partial buffer
[n_programs, H] that torch sums, so no atomics and no [rows, H] weight-gradient buffer.

Rounding follows HF exactly:
- Llama (`LlamaRMSNorm`): `weight * (x_fp32 * rsqrt(mean(x_fp32²) + eps)).to(x.dtype)`; the
  normalized value is rounded to x's dtype *before* the weight multiply, and the output
  dtype is the promotion of the weight's and x's dtypes (an fp32 weight on bf16 x gives fp32).
- Gemma (`GemmaRMSNorm`): `(x_fp32 * rsqrt(...) * (1 + weight.float())).to(x.dtype)`; one
  rounding at the end, output in x's dtype.
The backward is exact math in fp32 (HF's autograd rounds dy·w to the model dtype first).

Reading order: reference → kernels → launchers → autograd Function → `rms_norm` → `RMSNorm`.
"""
from __future__ import annotations

import torch

from .backend import FLOAT_DTYPES, HAS_TRITON, check_same_device, output, resolve_backend, rows_2d

if HAS_TRITON:
    import triton
    import triton.language as tl

MAX_HIDDEN = 65536  # one row must fit one program's registers


# ----------------------------------------------------------------------------- reference

def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6,
                 gemma: bool = False) -> torch.Tensor:
    """HF's LlamaRMSNorm (gemma=False) or GemmaRMSNorm (gemma=True) math, autograd through torch.

    x [..., H], weight [H]. Computes in fp32 (or in float64 for float64 inputs, so the same
    function is the tests' exact reference).
    """
    wide = torch.promote_types(x.dtype, torch.float32)
    xf = x.to(wide)
    xn = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    if gemma:
        return (xn * (1.0 + weight.to(wide))).to(x.dtype)
    return weight * xn.to(x.dtype)


# ----------------------------------------------------------------------------- kernels

if HAS_TRITON:

    @triton.jit
    def _rms_norm_fwd_kernel(
        # pointers
        x_ptr,        # [n_rows, n_cols], unit column stride
        w_ptr,        # [n_cols]
        y_ptr,        # [n_rows, n_cols] output
        rstd_ptr,     # fp32 [n_rows] output, saved for backward
        # sizes and strides
        n_rows, n_cols, stride_x, stride_y,
        eps,
        # meta-parameters
        GEMMA: tl.constexpr,       # y = xn * (1 + w) rounded once, else y = w * round(xn)
        BLOCK_ROWS: tl.constexpr,
        BLOCK_COLS: tl.constexpr,  # >= n_cols: a whole row per program row
    ):
        # 1. a [BLOCK_ROWS, n_cols] tile of rows
        rows = tl.program_id(0).to(tl.int64) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
        cols = tl.arange(0, BLOCK_COLS)
        mask = (rows < n_rows)[:, None] & (cols < n_cols)[None, :]
        x = tl.load(x_ptr + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        w = tl.load(w_ptr + cols, mask=cols < n_cols, other=0.0).to(tl.float32)

        # 2. 1 / rms per row, in fp32
        rstd = tl.math.rsqrt(tl.sum(x * x, axis=1) / n_cols + eps)
        tl.store(rstd_ptr + rows, rstd, mask=rows < n_rows)
        xn = x * rstd[:, None]

        # 3. weight, with HF's rounding order
        if GEMMA:
            y = xn * (1.0 + w)[None, :]
        else:
            y = w[None, :] * xn.to(x_ptr.dtype.element_ty).to(tl.float32)
        tl.store(y_ptr + rows[:, None] * stride_y + cols[None, :], y.to(y_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _rms_norm_bwd_kernel(
        # pointers
        dy_ptr,       # [n_rows, n_cols]
        x_ptr,        # [n_rows, n_cols]
        w_ptr,        # [n_cols]
        rstd_ptr,     # fp32 [n_rows] from the forward
        dx_ptr,       # [n_rows, n_cols] output
        dw_ptr,       # fp32 [n_programs, n_cols] output: this program's partial dW (HAS_DW only)
        # sizes and strides
        n_rows, n_cols, rows_per_program, stride_dy, stride_x, stride_dx,
        # meta-parameters
        GEMMA: tl.constexpr,
        HAS_DW: tl.constexpr,
        BLOCK_ROWS: tl.constexpr,
        BLOCK_COLS: tl.constexpr,
    ):
        # 1. this program's rows: [start, end), walked in tiles of BLOCK_ROWS
        pid = tl.program_id(0)
        start = pid.to(tl.int64) * rows_per_program
        end = tl.minimum(start + rows_per_program, n_rows)
        cols = tl.arange(0, BLOCK_COLS)
        col_ok = cols < n_cols
        w = tl.load(w_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
        if GEMMA:
            w = w + 1.0
        dw = tl.zeros([BLOCK_COLS], dtype=tl.float32)

        for r0 in range(start, end, BLOCK_ROWS):
            # 2. recompute xn = x * rstd
            rows = r0 + tl.arange(0, BLOCK_ROWS)
            mask = (rows < end)[:, None] & col_ok[None, :]
            x = tl.load(x_ptr + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            dy = tl.load(dy_ptr + rows[:, None] * stride_dy + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            rstd = tl.load(rstd_ptr + rows, mask=rows < end, other=0.0)
            xn = x * rstd[:, None]

            # 3. dW += Σ_rows dy ⊙ (the normalized value the forward multiplied by w)
            if HAS_DW:
                if GEMMA:
                    dw += tl.sum(dy * xn, axis=0)
                else:
                    dw += tl.sum(dy * xn.to(x_ptr.dtype.element_ty).to(tl.float32), axis=0)

            # 4. dx = rstd * (g - xn * mean(g ⊙ xn)),  g = dy ⊙ w
            g = dy * w[None, :]
            c = tl.sum(g * xn, axis=1) / n_cols
            dx = rstd[:, None] * (g - xn * c[:, None])
            tl.store(dx_ptr + rows[:, None] * stride_dx + cols[None, :], dx.to(dx_ptr.dtype.element_ty), mask=mask)

        if HAS_DW:
            tl.store(dw_ptr + pid * n_cols + cols, dw, mask=col_ok)


# ----------------------------------------------------------------------------- launchers

def _blocks(n_cols: int) -> tuple[int, int, int]:
    """(BLOCK_ROWS, BLOCK_COLS, num_warps): ~4K elements per tile. Untuned defaults."""
    block_cols = triton.next_power_of_2(n_cols)
    block_rows = max(1, min(16, 4096 // block_cols))
    num_warps = 4 if block_cols <= 2048 else 8 if block_cols <= 8192 else 16
    return block_rows, block_cols, num_warps


def _n_programs(device: torch.device) -> int:
    # backward: a few programs per SM, each reduces its rows' dW in registers
    if device.type == "cuda":
        return 4 * torch.cuda.get_device_properties(device).multi_processor_count
    return 4



def rms_norm_forward(x: torch.Tensor, weight: torch.Tensor, eps: float, gemma: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton forward. x [rows, H] (unit column stride), weight [H] → (y [rows, H], rstd fp32 [rows]).

    y's dtype: x's for Gemma, promote(weight, x) for Llama.
    """
    n_rows, n_cols = x.shape
    y_dtype = x.dtype if gemma else torch.promote_types(weight.dtype, x.dtype)
    y = output((n_rows, n_cols), y_dtype, x.device)
    rstd = torch.empty(n_rows, dtype=torch.float32, device=x.device)
    if n_rows == 0:
        return y, rstd
    block_rows, block_cols, num_warps = _blocks(n_cols)
    _rms_norm_fwd_kernel[(triton.cdiv(n_rows, block_rows),)](
        x, weight, y, rstd, n_rows, n_cols, x.stride(0), y.stride(0), float(eps),
        GEMMA=gemma, BLOCK_ROWS=block_rows, BLOCK_COLS=block_cols, num_warps=num_warps)
    return y, rstd


def rms_norm_backward(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor,
                      gemma: bool, need_dw: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Triton backward. dy, x [rows, H] (unit column stride) → (dx [rows, H] in x's dtype, dW [H] or None)."""
    n_rows, n_cols = x.shape
    dx = output((n_rows, n_cols), x.dtype, x.device)
    if n_rows == 0:
        return dx, weight.new_zeros(weight.shape) if need_dw else None
    block_rows, block_cols, num_warps = _blocks(n_cols)
    n_prog = max(1, min(_n_programs(x.device), triton.cdiv(n_rows, block_rows)))
    rows_per_program = triton.cdiv(triton.cdiv(n_rows, n_prog), block_rows) * block_rows
    n_prog = max(1, triton.cdiv(n_rows, rows_per_program))
    dw_partial = torch.empty((n_prog, n_cols), dtype=torch.float32, device=x.device) if need_dw else None
    _rms_norm_bwd_kernel[(n_prog,)](
        dy, x, weight, rstd, dx, dw_partial if need_dw else dx,
        n_rows, n_cols, rows_per_program, dy.stride(0), x.stride(0), dx.stride(0),
        GEMMA=gemma, HAS_DW=need_dw, BLOCK_ROWS=block_rows, BLOCK_COLS=block_cols, num_warps=num_warps)
    return dx, dw_partial.sum(0).to(weight.dtype) if need_dw else None


# ----------------------------------------------------------------------------- autograd

class RMSNormFunction(torch.autograd.Function):
    """Saves x, the weight and one fp32 rstd per row; recomputes x·rstd in backward."""

    @staticmethod
    def forward(ctx, x, weight, eps, gemma):
        x2d = rows_2d(x)                                   # [rows, H]
        y, rstd = rms_norm_forward(x2d, weight, eps, gemma)
        ctx.save_for_backward(x2d, weight, rstd)
        ctx.gemma, ctx.x_shape = gemma, x.shape
        return y.view(x.shape)

    @staticmethod
    def backward(ctx, dy):
        x2d, weight, rstd = ctx.saved_tensors
        dx, dw = rms_norm_backward(rows_2d(dy), x2d, weight, rstd, ctx.gemma, ctx.needs_input_grad[1])
        return dx.view(ctx.x_shape), dw, None, None


def _check_inputs(x: torch.Tensor, weight: torch.Tensor, eps: float) -> None:
    if not isinstance(x, torch.Tensor) or not isinstance(weight, torch.Tensor):
        raise TypeError("rms_norm expects tensors x and weight")
    if x.dtype not in FLOAT_DTYPES or weight.dtype not in FLOAT_DTYPES:
        raise TypeError(f"rms_norm supports float32/float16/bfloat16, got x {x.dtype}, weight {weight.dtype}")
    if x.dim() == 0 or weight.dim() != 1 or weight.shape[0] != x.shape[-1]:
        raise ValueError(f"weight must be [H] with H = x.shape[-1]; got x {list(x.shape)}, "
                         f"weight {list(weight.shape)}")
    if x.shape[-1] > MAX_HIDDEN:
        raise ValueError(f"hidden size {x.shape[-1]} exceeds the kernel's limit {MAX_HIDDEN}")
    if not eps >= 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    check_same_device(x=x, weight=weight)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, gemma: bool = False,
             backend: str = "auto") -> torch.Tensor:
    """RMSNorm over the last dim, HF's math and rounding, autograd-aware (dX, and dW when trainable).

    Args:
        x: [..., H], fp32/fp16/bf16, any strides (rows are gathered into a view or a copy).
        weight: [H], fp32/fp16/bf16. Llama: y = w * norm(x); Gemma (`gemma=True`): y = (1 + w) * norm(x).
        eps: added to mean(x²) before the rsqrt.
        backend: "auto" (Triton on CUDA or under the interpreter), "triton" or "torch".
    Returns [..., H]: x's dtype for Gemma, promote(weight, x) for Llama (as HF).
    """
    _check_inputs(x, weight, eps)
    if resolve_backend(backend, x, weight) == "torch":
        return rms_norm_ref(x, weight, eps, gemma)
    return RMSNormFunction.apply(x, weight, float(eps), bool(gemma))


class RMSNorm(torch.nn.Module):
    """Drop-in for HF's LlamaRMSNorm (`gemma=False`, weight starts at 1) and GemmaRMSNorm
    (`gemma=True`, weight starts at 0); same `weight` parameter name, so state dicts load."""

    def __init__(self, hidden_size: int, eps: float = 1e-6, gemma: bool = False, backend: str = "auto",
                 device=None, dtype=None):
        super().__init__()
        init = torch.zeros if gemma else torch.ones
        self.weight = torch.nn.Parameter(init(hidden_size, device=device, dtype=dtype))
        self.eps, self.gemma, self.backend = eps, gemma, backend

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps, self.gemma, self.backend)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.eps}, gemma={self.gemma}, backend={self.backend!r}"
