"""LoRA linear: `y = x Wᵀ + b + scaling · dropout(x) Aᵀ Bᵀ` over a dense or 4-bit base weight.

Why fused: an unfused LoRA layer writes the base output x Wᵀ, reads it back to add the
low-rank term, and (for QLoRA) first materialises a dequantized copy of W. Here the forward
computes the small t = s·dropout(x)Aᵀ [M, r] first and then one GEMM over [x, t]·[W; B]ᵀ,
bias in its epilogue, writes y once; a 4-bit W is dequantized tile by tile inside the K-loop.
The backward computes dX = dY W + s·((dY B) A) ⊙ mask/(1-p) in one pass (W dequantized in
tiles again) plus two skinny GEMMs for dA and dB. The dropout mask is regenerated from a
seed in every kernel (Philox, keyed on the element's index in x), never stored; the base
weight is frozen (no gradient). Kernels: `lora_linear_kernels.py`; block sizes: `BLOCKS`.

Reading order: reference (+ the mask in plain PyTorch) → launchers → autograd Function →
`lora_linear`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .backend import HAS_TRITON, interpreter_active, resolve_backend
from .dequantize_4bit import dequantize_4bit_ref, dequantize_4bit_triton, restore_absmax_ref
from .lora_linear_checks import check_lora_linear_inputs

if HAS_TRITON:
    import triton
    import triton.language as tl

    from .lora_linear_kernels import (_dropout_keep_kernel, _lora_dx_kernel, _lora_fwd_kernel,
                                      _lowrank_kernel, _matmul_tn_kernel)

# Block sizes of every launch, in one place for a later GPU tuning pass. Untuned defaults.
BLOCKS = {
    "gemm": dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, GROUP_M=8, num_warps=4, num_stages=3),
    "lowrank": dict(BLOCK_M=64, BLOCK_K=64, num_warps=4),  # + BLOCK_R from the rank
    "tn": dict(BLOCK_WIDE=64, BLOCK_M=32, num_warps=4),     # + the rank side from the rank
}
# 4-bit base with M >= this: dequantize W once into a scratch buffer and run the dense kernels
# instead of dequantizing in the K-loop (which repeats the unpacking for every row-tile).
# None = always in-loop. Unmeasured: to be set by a GPU benchmark (bench/bench_lora_linear.py).
DEQUANT_BUFFER_MIN_M: int | None = None


# ----------------------------------------------------------------------------- reference

def dequantize_base_ref(weight: torch.Tensor, quant_state, dtype: torch.dtype) -> torch.Tensor:
    """Dense [out, in] base weight in `dtype` from packed 4-bit bytes and a QuantState-like object."""
    absmax = quant_state.absmax
    if quant_state.nested_absmax is not None:
        absmax = restore_absmax_ref(absmax, quant_state.nested_absmax, quant_state.nested_code,
                                    quant_state.offset, quant_state.nested_blocksize)
    n = 1
    for d in quant_state.shape:
        n *= d
    flat = dequantize_4bit_ref(weight, absmax, quant_state.code.float(), quant_state.blocksize, n, dtype)
    return flat.view(tuple(quant_state.shape))


def lora_linear_ref(x: torch.Tensor, weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor,
                    scaling: float, bias: torch.Tensor | None = None, dropout_p: float = 0.0,
                    quant_state=None, dropout_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Plain-PyTorch LoRA linear (autograd through torch ops).

    `dropout_mask` (bool, x's shape, True = keep) replaces F.dropout's own random mask, so the
    reference can reproduce the kernels' mask (`lora_dropout_mask`).
    """
    if quant_state is not None:
        weight = dequantize_base_ref(weight, quant_state, x.dtype)
    if dropout_mask is not None:
        lora_in = x * dropout_mask.to(x.dtype) / (1.0 - dropout_p)
    else:
        lora_in = F.dropout(x, dropout_p, training=True) if dropout_p > 0 else x
    return F.linear(x, weight, bias) + F.linear(F.linear(lora_in, lora_A), lora_B) * scaling


_M32 = 0xFFFFFFFF


def _mulhilo32(a: int, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # (hi, lo) 32-bit halves of a * b for a uint32 constant and uint32 values held in int64;
    # b is split in 16-bit halves so no product overflows int64.
    low = a * (b & 0xFFFF)
    mid = a * (b >> 16) + (low >> 16)
    return mid >> 16, ((mid & 0xFFFF) << 16) | (low & 0xFFFF)


def _philox_uniform(seed: int, offsets: torch.Tensor) -> torch.Tensor:
    """`tl.rand(seed, offsets)` in plain PyTorch, bit for bit: Philox-4x32-10 → fp32 in [0, 1)."""
    c0, c1 = offsets & _M32, (offsets >> 32) & _M32
    c2 = c3 = torch.zeros_like(offsets)
    k0, k1 = seed & _M32, (seed >> 32) & _M32
    for _ in range(10):
        hi_b, lo_b = _mulhilo32(0xCD9E8D57, c2)
        hi_a, lo_a = _mulhilo32(0xD2511F53, c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0, k1 = (k0 + 0x9E3779B9) & _M32, (k1 + 0xBB67AE85) & _M32
    signed = torch.where(c0 >= 2**31, c0 - 2**32, c0)     # bitcast to int32
    signed = torch.where(signed < 0, -signed - 1, signed)  # ~x for negatives, as Triton does
    return signed.to(torch.float32) * torch.tensor(4.6566127342e-10, dtype=torch.float32)


def lora_dropout_mask(seed: int, shape, p: float, device: torch.device | str = "cpu",
                      backend: str = "torch") -> torch.Tensor:
    """The kernels' dropout keep-mask for an x of `shape` [..., in]: bool, True = keep.

    Element x[m, k] (leading dims flattened) is kept when `rand(seed, m*in + k) >= p`. For
    tests and the reference; the kernels never materialise it. backend "torch" replays the
    Philox generator in PyTorch; "triton" runs it in a kernel (they agree bit for bit).
    """
    shape = tuple(shape)
    cols = shape[-1]
    rows = 1
    for d in shape[:-1]:
        rows *= d
    if resolve_backend(backend, torch.empty(0, device=device)) == "triton":
        out = torch.empty((rows, cols), dtype=torch.int8, device=device)
        grid = (triton.cdiv(rows, 32), triton.cdiv(cols, 32))
        _dropout_keep_kernel[grid](out, seed, p, rows, cols, BLOCK_M=32, BLOCK_K=32)
        return out.bool().view(shape)
    offsets = torch.arange(rows * cols, dtype=torch.int64, device=device)
    return (_philox_uniform(seed, offsets) >= torch.tensor(p, dtype=torch.float32)).view(shape)


# ----------------------------------------------------------------------------- launchers

# Every launcher output is allocated here, so tests can swap in NaN-filled buffers: an element
# a kernel forgets to write then fails the comparison.
_empty = torch.empty


def _dot_dtype(dtype: torch.dtype):
    # The interpreter's bf16 arithmetic is wrong (raw uint16 bits): multiply bf16 tiles in fp32.
    if dtype == torch.bfloat16 and interpreter_active():
        return tl.float32
    return {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}[dtype]


def _precision(dtype: torch.dtype) -> str:
    # fp32 operands: TF32 only where torch's own fp32 matmuls may use it (float32_matmul_precision),
    # else exact fp32 ("ieee"). fp16/bf16 operands ignore it; "tf32" is Triton's default there.
    if dtype == torch.float32 and (interpreter_active() or torch.get_float32_matmul_precision() == "highest"):
        return "ieee"
    return "tf32"


def _rank_block(r: int) -> int:
    return min(64, max(16, triton.next_power_of_2(r)))


def _base_args(weight: torch.Tensor, quant_state, dtype: torch.dtype, m: int) -> tuple:
    """(w, stride_n, stride_k, (absmax, code, nested_absmax, nested_code, offset), meta) for a kernel."""
    if quant_state is None:
        return weight, weight.stride(0), weight.stride(1), (weight,) * 5, \
            dict(QUANT=False, NESTED=False, BLOCKSIZE=1, NESTED_BLOCKSIZE=1)
    n_out, k_in = quant_state.shape
    code, packed = quant_state.code.float(), weight.reshape(-1)
    nested = quant_state.nested_absmax is not None
    if nested:
        offset = torch.as_tensor(quant_state.offset, dtype=torch.float32, device=weight.device).reshape(1)
        extra = (quant_state.absmax, code, quant_state.nested_absmax.float(), quant_state.nested_code.float(),
                 offset)
    else:
        extra = (quant_state.absmax, code, code, code, code)  # unused pointers
    nested_blocksize = int(quant_state.nested_blocksize) if nested else 1
    if DEQUANT_BUFFER_MIN_M is not None and m >= DEQUANT_BUFFER_MIN_M:
        # scratch W in x's dtype (same numbers as the in-loop tiles), freed after the launch
        kw = dict(nested_absmax=extra[2], nested_code=extra[3], offset=extra[4],
                  nested_blocksize=nested_blocksize) if nested else {}
        dense = dequantize_4bit_triton(packed, quant_state.absmax, code, int(quant_state.blocksize),
                                       n_out * k_in, dtype, **kw).view(n_out, k_in)
        return _base_args(dense, None, dtype, m)
    return packed, 0, 0, extra, dict(QUANT=True, NESTED=nested, BLOCKSIZE=int(quant_state.blocksize),
                                     NESTED_BLOCKSIZE=nested_blocksize)


def _lowrank(a: torch.Tensor, b: torch.Tensor, scale: float, seed: int, p: float) -> torch.Tensor:
    """out [M, R] = scale · (a ⊙ keep) bᵀ for a [M, K], b [R, K] (any strides), in a's dtype."""
    (m, k), r = a.shape, b.shape[0]
    out = _empty((m, r), dtype=a.dtype, device=a.device)
    cfg = dict(BLOCKS["lowrank"], BLOCK_R=_rank_block(r))
    grid = (triton.cdiv(m, cfg["BLOCK_M"]), triton.cdiv(r, cfg["BLOCK_R"]))
    _lowrank_kernel[grid](a, b, out, seed, p, scale, m, k, r,
                          a.stride(0), a.stride(1), b.stride(0), b.stride(1), out.stride(0), out.stride(1),
                          HAS_DROPOUT=p > 0, DOT_DTYPE=_dot_dtype(a.dtype), PRECISION=_precision(a.dtype),
                          **cfg)
    return out


def _matmul_tn(a: torch.Tensor, b: torch.Tensor, scale: float, seed: int, p: float,
               dtype: torch.dtype) -> torch.Tensor:
    """out [P, Q] = scale · aᵀ (b ⊙ keep) for a [M, P], b [M, Q] (any strides), in `dtype`."""
    (m, pdim), q = a.shape, b.shape[1]
    out = _empty((pdim, q), dtype=dtype, device=a.device)
    wide, tn = BLOCKS["tn"]["BLOCK_WIDE"], BLOCKS["tn"]
    block_p = _rank_block(pdim) if pdim < q else wide  # the rank side gets a rank-sized tile
    block_q = _rank_block(q) if q <= pdim else wide
    grid = (triton.cdiv(pdim, block_p), triton.cdiv(q, block_q))
    _matmul_tn_kernel[grid](a, b, out, seed, p, scale, m, pdim, q,
                            a.stride(0), a.stride(1), b.stride(0), b.stride(1), out.stride(0), out.stride(1),
                            HAS_DROPOUT=p > 0, DOT_DTYPE=_dot_dtype(a.dtype), PRECISION=_precision(a.dtype),
                            BLOCK_P=block_p, BLOCK_Q=block_q, BLOCK_M=tn["BLOCK_M"], num_warps=tn["num_warps"])
    return out


def _gemm_grid(m: int, n: int) -> tuple[int]:
    g = BLOCKS["gemm"]
    return (triton.cdiv(m, g["BLOCK_M"]) * triton.cdiv(n, g["BLOCK_N"]),)


def lora_linear_forward(x: torch.Tensor, weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor,
                        scaling: float, bias: torch.Tensor | None, dropout_p: float, seed: int,
                        quant_state=None) -> torch.Tensor:
    """Triton forward. x [M, in] (any strides) → y [M, out] in x's dtype; inputs already checked."""
    (m, k), n = x.shape, lora_B.shape[0]
    y = _empty((m, n), dtype=x.dtype, device=x.device)
    if m == 0:
        return y
    # 1. t = s/(1-p) · (x ⊙ keep) Aᵀ   [M, r]
    t = _lowrank(x, lora_A, scaling / (1.0 - dropout_p), seed, dropout_p)
    # 2. y = [x, t] · [W; B]ᵀ + b      [M, N], one write
    w, swn, swk, extra, meta = _base_args(weight, quant_state, x.dtype, m)
    _lora_fwd_kernel[_gemm_grid(m, n)](
        x, w, t, lora_B, bias if bias is not None else y, y, *extra,
        m, n, k, lora_A.shape[0],
        x.stride(0), x.stride(1), swn, swk, t.stride(0), t.stride(1),
        lora_B.stride(0), lora_B.stride(1), y.stride(0), y.stride(1),
        HAS_BIAS=bias is not None, **meta, DOT_DTYPE=_dot_dtype(x.dtype), PRECISION=_precision(x.dtype),
        **BLOCKS["gemm"], enable_fp_fusion=False)
    return y


def lora_linear_backward(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, lora_A: torch.Tensor,
                         lora_B: torch.Tensor, scaling: float, dropout_p: float, seed: int, quant_state,
                         need_dx: bool, need_da: bool, need_db: bool, need_dbias: bool):
    """Triton backward. dy [M, out], x [M, in] → (dX [M, in], dA [r, in], dB [out, r], dbias [out]).

    Gradients not asked for are None. With keep = the forward's mask and q = 1-p:
    u = s·dY B;  dX = dY W + (u A) ⊙ keep/q;  dA = uᵀ (x ⊙ keep)/q;  dB = dYᵀ t, t = s·(x ⊙ keep)Aᵀ/q.
    """
    (m, k), (n, r) = x.shape, lora_B.shape
    keep_q = 1.0 - dropout_p
    dx = da = dlb = dbias = None
    if m == 0:  # empty batch: zero gradients of the right shapes
        z = lambda *s_, like: torch.zeros(s_, dtype=like.dtype, device=like.device)  # noqa: E731
        return (z(0, k, like=x) if need_dx else None, z(r, k, like=lora_A) if need_da else None,
                z(n, r, like=lora_B) if need_db else None, z(n, like=dy) if need_dbias else None)
    # 1. u = s · dY B   [M, r]   (B viewed as Bᵀ [r, N])
    if need_dx or need_da:
        u = _lowrank(dy, lora_B.t(), scaling, 0, 0.0)
    # 2. dX = dY W + (u A) ⊙ keep/q, one pass, 4-bit W dequantized in tiles
    if need_dx:
        dx = _empty((m, k), dtype=x.dtype, device=x.device)
        w, swn, swk, extra, meta = _base_args(weight, quant_state, x.dtype, m)
        g = BLOCKS["gemm"]
        _lora_dx_kernel[(triton.cdiv(m, g["BLOCK_M"]) * triton.cdiv(k, g["BLOCK_N"]),)](
            dy, w, u, lora_A, dx, *extra, seed, dropout_p, 1.0 / keep_q,
            m, n, k, r,
            dy.stride(0), dy.stride(1), swn, swk, u.stride(0), u.stride(1),
            lora_A.stride(0), lora_A.stride(1), dx.stride(0), dx.stride(1),
            HAS_DROPOUT=dropout_p > 0, **meta, DOT_DTYPE=_dot_dtype(x.dtype),
            PRECISION=_precision(x.dtype), **g, enable_fp_fusion=False)
    # 3. dA = uᵀ (x ⊙ keep) / q   [r, in]
    if need_da:
        da = _matmul_tn(u, x, 1.0 / keep_q, seed, dropout_p, lora_A.dtype)
    # 4. dB = dYᵀ t   [out, r], t recomputed (r columns: cheaper to redo than to keep)
    if need_db:
        t = _lowrank(x, lora_A, scaling / keep_q, seed, dropout_p)
        dlb = _matmul_tn(dy, t, 1.0, 0, 0.0, lora_B.dtype)
    # 5. dbias = Σ_m dY
    if need_dbias:
        dbias = dy.sum(0, dtype=torch.float32)
    return dx, da, dlb, dbias


# ----------------------------------------------------------------------------- autograd

class LoRALinearFunction(torch.autograd.Function):
    """Autograd wrapper of the Triton forward/backward; saves x, A, B, W (and the seed), not the mask.

    Under autocast the inputs arrive already cast (see `lora_linear`); custom_fwd/custom_bwd
    run the backward under the forward's autocast state.
    """

    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda")
    def forward(ctx, x, weight, lora_A, lora_B, bias, scaling, dropout_p, seed, quant_state):
        x2d = x.reshape(-1, x.shape[-1])  # [M, in], a view unless x's strides forbid it
        y = lora_linear_forward(x2d, weight, lora_A, lora_B, scaling, bias, dropout_p, seed, quant_state)
        ctx.save_for_backward(x2d, weight, lora_A, lora_B)
        ctx.x_shape, ctx.scaling, ctx.dropout_p, ctx.seed = x.shape, scaling, dropout_p, seed
        ctx.quant_state, ctx.bias_dtype = quant_state, None if bias is None else bias.dtype
        return y.view(*x.shape[:-1], lora_B.shape[0])

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx, dy):
        x2d, weight, lora_A, lora_B = ctx.saved_tensors
        dy = dy.reshape(-1, dy.shape[-1]).to(x2d.dtype)  # [M, out]
        need = ctx.needs_input_grad
        dx, da, dlb, dbias = lora_linear_backward(
            dy, x2d, weight, lora_A, lora_B, ctx.scaling, ctx.dropout_p, ctx.seed, ctx.quant_state,
            need[0], need[2], need[3], need[4] and ctx.bias_dtype is not None)
        if dx is not None:
            dx = dx.view(ctx.x_shape)
        if dbias is not None:
            dbias = dbias.to(ctx.bias_dtype)
        return dx, None, da, dlb, dbias, None, None, None, None


def _autocast(*tensors: torch.Tensor | None, device_type: str) -> list:
    dtype = torch.get_autocast_dtype(device_type)
    return [t.to(dtype) if t is not None and t.is_floating_point() else t for t in tensors]


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
        seed: dropout seed. Given, both backends derive the same mask from it
            (`lora_dropout_mask`); None: the Triton path draws one from torch's default
            generator, the torch path uses F.dropout.

    Under torch.autocast the float inputs are cast to the autocast dtype first.
    Returns [..., out] in x's (compute) dtype.
    """
    device_type = x.device.type if isinstance(x, torch.Tensor) else "cpu"
    if isinstance(x, torch.Tensor) and torch.is_autocast_enabled(device_type):
        x, lora_A, lora_B, bias = _autocast(x, lora_A, lora_B, bias, device_type=device_type)
        if quant_state is None:
            (weight,) = _autocast(weight, device_type=device_type)
    check_lora_linear_inputs(x, weight, lora_A, lora_B, scaling, bias, dropout_p, quant_state)
    use = resolve_backend(backend, x)
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63):
        raise ValueError(f"seed must be an int in [0, 2**63), got {seed!r}")
    if use == "torch":  # with an explicit seed, the kernels' mask (replayed); else F.dropout's
        mask = lora_dropout_mask(seed, x.shape, dropout_p, x.device) if dropout_p > 0 and seed is not None else None
        return lora_linear_ref(x, weight, lora_A, lora_B, float(scaling), bias, dropout_p, quant_state, mask)
    if dropout_p > 0 and seed is None:
        seed = int(torch.randint(0, 2**31 - 1, ()).item())
    if weight.requires_grad and torch.is_grad_enabled():
        raise ValueError("lora_linear treats the base weight as frozen and computes no gradient for it; "
                         "set weight.requires_grad_(False) (or use backend='torch')")
    return LoRALinearFunction.apply(x, weight, lora_A, lora_B, bias, float(scaling), float(dropout_p),
                                    0 if seed is None else int(seed), quant_state)
