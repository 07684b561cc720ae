"""Rotary position embedding of Q and K in one launch, HF's `rotate_half` (non-interleaved) layout.

Why a kernel: HF's `apply_rotary_pos_emb` is ~10 elementwise ops per tensor (two slices, a
negation, a concatenation, four multiplies, two adds) with a temporary per op; autograd
keeps cos/sin and replays them. Here one program per (batch, position) loads that
position's cos/sin row once and rotates every query head and every key head (GQA: Hkv ≤ Hq)
in fp32 registers, one read and one write per element.

cos/sin are the tensors HF's rotary module returns ([B, L, D], or [1, L, D] broadcast over
the batch): position ids of packed sequences and every rope scaling (linear, dynamic,
llama3, yarn, ...) are HF's own computation; this op only applies them. With x = [x1, x2]
(halves of the head dim) and c = [c1, c2], s = [s1, s2]:

    forward:   y1 = x1·c1 − x2·s1,   y2 = x2·c2 + x1·s2      (= x·cos + rotate_half(x)·sin)
    backward:  dx1 = dy1·c1 + dy2·s2, dx2 = dy2·c2 − dy1·s1   (the transpose: rotation by −θ)

Out-of-place: `apply_rotary_pos_emb` does not modify q and k; its outputs have q's and k's
strides when those are dense (HF passes transposed views of the projections), so no layout
change leaks out. Out-of-place on purpose: the backward saves only cos/sin, so the unrotated
q/k are freed as soon as the caller drops them, and in-place writes into HF's projection views
would need autograd's view/in-place bookkeeping. cos and sin get no gradient (HF computes them
under no_grad).
Reading order: reference → kernel → launcher → autograd Function → `apply_rotary_pos_emb`.
"""
from __future__ import annotations

import torch

from .backend import FLOAT_DTYPES, HAS_TRITON, check_same_device, output_like, resolve_backend

if HAS_TRITON:
    import triton
    import triton.language as tl



# ----------------------------------------------------------------------------- reference

def rotate_half_ref(x: torch.Tensor) -> torch.Tensor:
    """HF's rotate_half: [x1, x2] → [−x2, x1] over the last dim."""
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rope_ref(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor,
             sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """HF's `apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1)` math (autograd through torch).

    q [B, Hq, L, D], k [B, Hkv, L, D], cos/sin [B or 1, L, D].
    """
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return q * cos + rotate_half_ref(q) * sin, k * cos + rotate_half_ref(k) * sin


# ----------------------------------------------------------------------------- kernel

if HAS_TRITON:

    @triton.jit
    def _rotate_heads(in_ptr, out_ptr, n_heads, s_in_h, s_out_h, c1, c2, s1, s2,
                      HALF: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr):
        # all heads of one (batch, position): a [BLOCK_H, BLOCK_HALF] tile per half
        heads = tl.arange(0, BLOCK_H)
        dims = tl.arange(0, BLOCK_HALF)
        mask = (heads < n_heads)[:, None] & (dims < HALF)[None, :]
        src = in_ptr + heads[:, None] * s_in_h + dims[None, :]
        x1 = tl.load(src, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(src + HALF, mask=mask, other=0.0).to(tl.float32)
        y1 = x1 * c1[None, :] - x2 * s1[None, :]
        y2 = x2 * c2[None, :] + x1 * s2[None, :]
        dst = out_ptr + heads[:, None] * s_out_h + dims[None, :]
        tl.store(dst, y1.to(out_ptr.dtype.element_ty), mask=mask)
        tl.store(dst + HALF, y2.to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _rope_kernel(
        # pointers
        q_ptr, k_ptr,            # [B, Hq, L, D], [B, Hkv, L, D] inputs (unit stride on D)
        q_out_ptr, k_out_ptr,    # outputs, same shapes
        cos_ptr, sin_ptr,        # [B or 1, L, D] (batch stride 0 when broadcast)
        # sizes
        seq_len, n_q_heads, n_kv_heads,
        # strides (batch, head, position) of q, q_out, k, k_out; (batch, position) of cos/sin
        sqb, sqh, sql, sqob, sqoh, sqol,
        skb, skh, skl, skob, skoh, skol,
        scb, scl,
        # meta-parameters
        HALF: tl.constexpr,          # D // 2
        BACKWARD: tl.constexpr,      # rotate by −θ: swap and negate the sine halves
        BLOCK_HQ: tl.constexpr, BLOCK_HKV: tl.constexpr, BLOCK_HALF: tl.constexpr,
    ):
        # 1. map program id to (batch, position)
        pid = tl.program_id(0).to(tl.int64)
        b = pid // seq_len
        pos = pid % seq_len

        # 2. this position's cos/sin halves, in fp32
        dims = tl.arange(0, BLOCK_HALF)
        dmask = dims < HALF
        cs = b * scb + pos * scl + dims
        c1 = tl.load(cos_ptr + cs, mask=dmask, other=0.0).to(tl.float32)
        c2 = tl.load(cos_ptr + cs + HALF, mask=dmask, other=0.0).to(tl.float32)
        s1 = tl.load(sin_ptr + cs, mask=dmask, other=0.0).to(tl.float32)
        s2 = tl.load(sin_ptr + cs + HALF, mask=dmask, other=0.0).to(tl.float32)
        if BACKWARD:
            s1, s2 = -s2, -s1

        # 3. rotate every query head, then every key head
        _rotate_heads(q_ptr + b * sqb + pos * sql, q_out_ptr + b * sqob + pos * sqol, n_q_heads,
                      sqh, sqoh, c1, c2, s1, s2, HALF, BLOCK_HQ, BLOCK_HALF)
        _rotate_heads(k_ptr + b * skb + pos * skl, k_out_ptr + b * skob + pos * skol, n_kv_heads,
                      skh, skoh, c1, c2, s1, s2, HALF, BLOCK_HKV, BLOCK_HALF)


# ----------------------------------------------------------------------------- launcher

def _unit_last(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def rope_apply(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
               backward: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton: rotate q [B, Hq, L, D] and k [B, Hkv, L, D] by cos/sin [B or 1, L, D] in one launch.

    `backward=True` rotates by the negative angle (the gradient). Outputs: new tensors laid
    out like q and k. Inputs are assumed checked (`apply_rotary_pos_emb` checks them).
    """
    q, k, cos, sin = _unit_last(q), _unit_last(k), _unit_last(cos), _unit_last(sin)
    q_out, k_out = output_like(q), output_like(k)
    batch, n_q, seq_len, dim = q.shape
    n_kv = k.shape[1]
    if q.numel() == 0 and k.numel() == 0:
        return q_out, k_out
    if cos.stride() != sin.stride():  # the kernel indexes both with cos's strides
        cos, sin = cos.contiguous(), sin.contiguous()
    scb = 0 if cos.shape[0] == 1 else cos.stride(0)  # [1, L, D] broadcasts over the batch
    block_half = triton.next_power_of_2(dim // 2)
    block_hq, block_hkv = triton.next_power_of_2(n_q), triton.next_power_of_2(max(n_kv, 1))
    num_warps = 4 if block_hq * block_half <= 2048 else 8
    _rope_kernel[(batch * seq_len,)](
        q, k, q_out, k_out, cos, sin,
        seq_len, n_q, n_kv,
        *q.stride()[:3], *q_out.stride()[:3], *k.stride()[:3], *k_out.stride()[:3],
        scb, cos.stride(1),
        HALF=dim // 2, BACKWARD=backward, BLOCK_HQ=block_hq, BLOCK_HKV=block_hkv,
        BLOCK_HALF=block_half, num_warps=num_warps)
    return q_out, k_out


# ----------------------------------------------------------------------------- autograd

class RopeFunction(torch.autograd.Function):
    """Saves cos and sin only; the backward is the same kernel rotating by −θ."""

    @staticmethod
    def forward(ctx, q, k, cos, sin):
        ctx.save_for_backward(cos, sin)
        return rope_apply(q, k, cos, sin)

    @staticmethod
    def backward(ctx, dq, dk):
        # autograd materializes a missing output gradient as zeros (materialize_grads)
        cos, sin = ctx.saved_tensors
        dq, dk = rope_apply(dq, dk, cos, sin, backward=True)
        return dq, dk, None, None


def _check_inputs(q, k, cos, sin) -> None:
    for name, t in (("q", q), ("k", k), ("cos", cos), ("sin", sin)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
        if t.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{name} must be float32/float16/bfloat16, got {t.dtype}")
    if q.dtype != k.dtype:
        raise TypeError(f"q and k must have one dtype, got {q.dtype} and {k.dtype}")
    if q.dim() != 4 or k.dim() != 4:
        raise ValueError(f"q and k must be [B, H, L, D]; got q {list(q.shape)}, k {list(k.shape)}")
    (b, _, seq, dim), (bk, _, seqk, dimk) = q.shape, k.shape
    if (b, seq, dim) != (bk, seqk, dimk):
        raise ValueError(f"q {list(q.shape)} and k {list(k.shape)} must agree on batch, length and head dim")
    if dim % 2:
        raise ValueError(f"head dim must be even for rotate_half, got {dim}")
    if cos.shape != sin.shape or cos.dim() != 3 or cos.shape[0] not in (1, b) or tuple(cos.shape[1:]) != (seq, dim):
        raise ValueError(f"cos and sin must both be [B or 1, L, D] = [{b} or 1, {seq}, {dim}]; got "
                         f"cos {list(cos.shape)}, sin {list(sin.shape)}")
    check_same_device(q=q, k=k, cos=cos, sin=sin)


def apply_rotary_pos_emb(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                         backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary embedding of q and k, HF's `apply_rotary_pos_emb` (unsqueeze_dim=1) math, autograd-aware.

    Args:
        q: [B, Hq, L, D], k: [B, Hkv, L, D] (Hkv ≤ Hq for GQA), one dtype (fp32/fp16/bf16), D even;
            any strides (HF's transposed projection views are read in place).
        cos, sin: [B, L, D] or [1, L, D], as HF's rotary module returns them (any float dtype;
            used in fp32). They get no gradient.
        backend: "auto" (Triton on CUDA or under the interpreter), "triton" or "torch".
    Returns (q_embed, k_embed), new tensors in q's dtype; q and k are not modified.
    """
    _check_inputs(q, k, cos, sin)
    if resolve_backend(backend, q, k, cos, sin) == "torch":
        return rope_ref(q, k, cos, sin)
    if torch.is_grad_enabled() and (cos.requires_grad or sin.requires_grad):
        raise ValueError("the rope kernel gives cos/sin no gradient; compute them under torch.no_grad() "
                         "(as HF does) or use backend='torch'")
    return RopeFunction.apply(q, k, cos, sin)
