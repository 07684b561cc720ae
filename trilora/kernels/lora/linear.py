"""LoRA linear: `y = x Wᵀ + b + scaling · dropout(x) Aᵀ Bᵀ` over a dense or 4-bit base weight.

Why fused: an unfused LoRA layer writes the base output x Wᵀ, reads it back to add the
low-rank term, and (for QLoRA) first materialises a dequantized copy of W. Here (M = tokens,
`engine.py` for the kernels and the path each shape takes):

    forward:   t, keep = lowrank(x, A, s/(1-p))        [M, r]; the dropout mask drawn once, kept as bits
               y = [x, t] · [W; B]ᵀ + b                 one GEMM, the low-rank term one more K-segment
    backward:  u = s · dY B                             [M, r]
               dX = dY W + keep ⊙ (u A)/(1-p)           one GEMM, one accumulator
               dA = (x ⊙ keep)ᵀ u / (1-p)               split over M so every SM has work
               dB = dYᵀ t                               t kept from the forward (r columns)

The base weight is frozen (no gradient). Saved for backward: x, t, the keep bits (M·in/8
bytes) and the adapter; nothing of size M·out.

Reading order: reference → autograd Function → `lora_linear`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..backend import resolve_backend
from ..quant_state import QuantStateLike
from .checks import autocast_and_check, check_frozen
from .dropout import check_seed, lora_dropout_mask, resolve_seed
from .engine import BaseWeight, gemm, lowrank, matmul_tn, output

# ----------------------------------------------------------------------------- reference


def dequantize_base_ref(weight: torch.Tensor, quant_state: QuantStateLike, dtype: torch.dtype) -> torch.Tensor:
    """Dense [out, in] base weight in `dtype` from packed 4-bit bytes and a quant state (PyTorch)."""
    return BaseWeight.of(weight, quant_state).dequantized(dtype, backend="torch").weight


def _dx_like_autograd(dy: torch.Tensor, w: torch.Tensor, x_shape, colmajor: bool) -> torch.Tensor:
    """dX = dY · W laid out as autograd's backward of `F.linear(x, w)` lays it out (matmul folds
    x to 2-D, and mm's backward returns a column-major dX for a column-major x), so the
    recomputing path below gives the very bits autograd did."""
    dy2 = dy.reshape(-1, dy.shape[-1])                                    # [M, out]
    if colmajor:
        return w.t().mm(dy2.t()).t().view(x_shape)
    return dy2.mm(w).view(x_shape)


class DequantizedLinearFunction(torch.autograd.Function):
    """`F.linear(x, dequantize(weight, quant_state, x.dtype), bias)` that saves only the packed
    4-bit weight for backward and dequantizes it again there.

    Why: autograd through `F.linear(x, dense_w)` saves the dense weight for dX = dY · W, so
    each layer's dequantized copy ([out, in] in x's dtype: 8x the packed bytes in fp32) lived
    from its forward to its backward, and at the loss a QLoRA model held a dense copy of all
    its 4-bit weights (+403 MiB of saved tensors on SmolLM2-135M's shape in fp32, see
    bench/bench_cpu_memory.py). bitsandbytes' MatMul4Bit recomputes the same way. The forward
    is the same F.linear call and the gradients the same ops autograd runs, so every number
    is bit-identical; the cost is one more dequantization per backward.

    apply(x, weight, quant_state, bias, dequantize); `dequantize(weight, quant_state, dtype)`
    returns the dense [out, in] weight (`dequantize_base_ref`, or a layer's own backend).
    """

    @staticmethod
    def forward(ctx, x, weight, quant_state, bias, dequantize):
        ctx.save_for_backward(weight)  # the packed bytes, a frozen parameter: nothing is copied
        ctx.quant_state, ctx.dequantize, ctx.x_shape = quant_state, dequantize, x.shape
        try:  # matmul folds x to [M, in] by a view when it can; mm's backward keys on its layout
            x2d = x.view(-1, x.shape[-1])
            ctx.colmajor = x.dim() >= 2 and x2d.stride(0) == 1 and x2d.stride(1) == x2d.shape[0]
        except RuntimeError:  # not viewable: folded by a copy, which is row-major
            ctx.colmajor = False
        return F.linear(x, dequantize(weight, quant_state, x.dtype), bias)  # the dense copy dies here

    @staticmethod
    def backward(ctx, dy):
        (weight,) = ctx.saved_tensors
        dx = dbias = None
        if ctx.needs_input_grad[0]:
            w = ctx.dequantize(weight, ctx.quant_state, dy.dtype)
            dx = _dx_like_autograd(dy, w, ctx.x_shape, ctx.colmajor)
        if ctx.needs_input_grad[3]:  # autograd's sum_to: over every leading dim (none for a 1-D x)
            dbias = dy.sum(tuple(range(dy.dim() - 1))) if dy.dim() > 1 else dy
        return dx, None, None, dbias, None


def linear_4bit_ref(x: torch.Tensor, weight: torch.Tensor, quant_state, bias: torch.Tensor | None = None,
                    dequantize=dequantize_base_ref) -> torch.Tensor:
    """`x Wᵀ + b` over a packed 4-bit W (dequantized to x's dtype) without keeping the dense W
    for backward (`DequantizedLinearFunction`). x [..., in] → [..., out] in x's dtype."""
    return DequantizedLinearFunction.apply(x, weight, quant_state, bias, dequantize)


def lora_linear_ref(x: torch.Tensor, weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor,
                    scaling: float, bias: torch.Tensor | None = None, dropout_p: float = 0.0,
                    quant_state=None, dropout_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Plain-PyTorch LoRA linear (autograd through torch ops).

    `dropout_mask` (bool, x's shape, True = keep) replaces F.dropout's own random mask, so the
    reference can reproduce the kernels' mask (`lora_dropout_mask`).

    Memory, saved for backward: x (or its dropped copy) and t = x Aᵀ for the adapter's
    gradients, the base weight only when it is a dense parameter (a 4-bit one is dequantized
    again in backward), and the mask as bool (1 byte an element, not a float copy).
    """
    if quant_state is not None:
        base = linear_4bit_ref(x, weight, quant_state, bias)
    else:
        base = F.linear(x, weight, bias)
    if dropout_mask is not None:
        # x * bool promotes exactly like x * mask.to(x.dtype), but mul saves the bool mask
        lora_in = x * dropout_mask / (1.0 - dropout_p)
    else:
        lora_in = F.dropout(x, dropout_p, training=True) if dropout_p > 0 else x
    # the low-rank term is scaled and summed in place: its buffer is no one's saved tensor, and
    # one [M, out] temporary fewer is alive at a time (a + b == b + a bit for bit)
    lowrank = F.linear(F.linear(lora_in, lora_A), lora_B)
    return lowrank.mul_(scaling).add_(base)


# ----------------------------------------------------------------------------- autograd

class LoRALinearFunction(torch.autograd.Function):
    """Triton forward/backward of `lora_linear`. Saves x, A, B, t and the keep bits.

    apply(x, base: BaseWeight, lora_A, lora_B, bias, scaling, dropout_p, seed, save_bits).
    Under autocast the inputs arrive already cast (see `lora_linear`); custom_fwd/custom_bwd
    run the backward under the forward's autocast state.
    """

    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda")
    def forward(ctx, x, base, lora_A, lora_B, bias, scaling, dropout_p, seed, save_bits):
        x2d = x.reshape(-1, x.shape[-1])  # [M, in], a view unless x's strides forbid it
        n = lora_B.shape[0]
        t, bits = lowrank(x2d, lora_A, scaling / (1.0 - dropout_p), seed, dropout_p, write_bits=save_bits)
        y = gemm(output((x2d.shape[0], n), x.dtype, x.device), [(x2d, base)], True,
                 lowrank=(t, lora_B.t()), bias=bias)
        ctx.save_for_backward(x2d, lora_A, lora_B, t, bits)
        ctx.base, ctx.x_shape, ctx.scaling, ctx.dropout_p = base, x.shape, scaling, dropout_p
        ctx.bias_dtype = None if bias is None else bias.dtype
        return y.view(*x.shape[:-1], n)

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx, dy):
        x2d, lora_A, lora_B, t, bits = ctx.saved_tensors
        dy = dy.reshape(-1, dy.shape[-1]).to(x2d.dtype)  # [M, out]; any strides (sum().backward() gives stride 0)
        need = ctx.needs_input_grad
        dx, da, dlb = lora_backward(dy, x2d, lora_A, lora_B, t, bits, ctx.base, ctx.scaling, ctx.dropout_p,
                                    need[0], need[2], need[3])
        dbias = None  # an empty batch (M = 0) goes through too: the reductions give zeros
        if need[4] and ctx.bias_dtype is not None:
            dbias = dy.sum(0, dtype=torch.float32).to(ctx.bias_dtype)
        return (None if dx is None else dx.view(ctx.x_shape), None, da, dlb, dbias, None, None, None, None)


def lora_backward(dy, x2d, lora_A, lora_B, t, bits, base, scaling: float, dropout_p: float,
                  need_x: bool, need_a: bool, need_b: bool) -> tuple:
    """(dX [M, in], dA, dB) of the LoRA linear from dY [M, out] (None where not needed); the
    saved x2d, t and keep bits as the forward left them. DoRA's backward reuses it."""
    inv_keep = 1.0 / (1.0 - dropout_p)
    dx = da = dlb = None
    if need_x or need_a:
        u, _ = lowrank(dy, lora_B.t(), scaling)                                # [M, r]
    if need_x:
        dx = gemm(output(x2d.shape, x2d.dtype, x2d.device), [(dy, base)], False, lowrank=(u, lora_A),
                  keep_bits=bits, inv_keep=inv_keep)
    if need_a:
        da = matmul_tn(x2d, u, inv_keep, lora_A.dtype, keep_bits=bits, transpose=True)  # [r, in]
    if need_b:
        dlb = matmul_tn(dy, t, 1.0, lora_B.dtype)                              # [out, r]
    return dx, da, dlb


# ----------------------------------------------------------------------------- public

def lora_linear(x: torch.Tensor, weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor,
                scaling: float, bias: torch.Tensor | None = None, dropout_p: float = 0.0,
                quant_state=None, backend: str = "auto", seed: int | None = None) -> torch.Tensor:
    """LoRA linear `x Wᵀ + b + scaling · dropout(x) Aᵀ Bᵀ`, autograd-aware.

    Args:
        x: [..., in], fp32/fp16/bf16, any strides.
        weight: dense [out, in] in x's dtype, or packed 4-bit uint8 [(out*in+1)//2, 1] with
            `quant_state` (QuantState-like: absmax, code, blocksize, shape, nested_*, offset);
            dequantized to x's dtype. Frozen: it gets no gradient.
        lora_A: [r, in], lora_B: [out, r], bias: [out] or None; all in x's dtype.
        scaling: the LoRA scale (alpha / r).
        dropout_p: dropout probability in [0, 1) on the LoRA branch's input (always applied).
        backend: "auto" (Triton on CUDA or under the interpreter), "triton" or "torch".
        seed: dropout seed in [0, 2**62). Given, both backends derive the same mask from it
            (`lora_dropout_mask`); None: the Triton path draws one from torch's default
            generator, the torch path uses F.dropout.

    Under torch.autocast the float inputs are cast to the autocast dtype first.
    Returns [..., out] in x's (compute) dtype.
    """
    x, weight, lora_A, lora_B, bias = autocast_and_check(x, weight, lora_A, lora_B, scaling, bias, dropout_p,
                                                         quant_state)
    use = resolve_backend(backend, x)
    check_seed(seed)
    if use == "torch":  # with an explicit seed, the kernels' mask (replayed); else F.dropout's
        mask = lora_dropout_mask(seed, x.shape, dropout_p, x.device) if dropout_p > 0 and seed is not None else None
        return lora_linear_ref(x, weight, lora_A, lora_B, float(scaling), bias, dropout_p, quant_state, mask)
    seed = resolve_seed(dropout_p, seed)
    check_frozen(weight)
    grads = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, lora_A, lora_B, bias))
    return LoRALinearFunction.apply(x, BaseWeight.of(weight, quant_state), lora_A, lora_B, bias, float(scaling),
                                    float(dropout_p), seed, grads and dropout_p > 0)
