"""Rotary embedding of Q and K against HF's `apply_rotary_pos_emb` and a float64 reference.

cos/sin come from HF's own LlamaRotaryEmbedding (default, linear, dynamic, llama3, yarn
scaling; packed-sequence position ids), q/k are HF's transposed projection views, GQA.
Triton through the interpreter on CPU (tests/conftest.py).
"""
from __future__ import annotations

import pytest
import torch
import trilora.kernels.backend as kernel_backend
from _blocks import FP32_TOL, check, leaves, rel_err
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb as hf_apply

from trilora.kernels.rope import apply_rotary_pos_emb, rope_apply, rope_ref

HAS_CUDA = torch.cuda.is_available()
DEV = "cuda" if HAS_CUDA else "cpu"
SCALINGS = {
    "default": None,
    "linear": {"rope_type": "linear", "factor": 2.0},
    "dynamic": {"rope_type": "dynamic", "factor": 2.0},
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8},
    "yarn": {"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 8},
}


def _cos_sin(position_ids, dtype, head_dim=24, scaling=None, device=DEV):
    """cos/sin [B, L, D] from HF's rotary module (max_position_embeddings 16: dynamic scaling kicks in)."""
    extra = {} if scaling is None else {"rope_parameters": {"rope_theta": 10000.0, **scaling}}
    cfg = LlamaConfig(hidden_size=head_dim * 6, num_attention_heads=6, num_key_value_heads=2,
                      max_position_embeddings=16, **extra)
    rotary = LlamaRotaryEmbedding(cfg).to(device)
    return rotary(torch.ones(1, dtype=dtype, device=device), position_ids.to(device))


def _qk(batch, seq, n_q, n_kv, dim, dtype, seed, device=DEV):
    """q [B, Hq, L, D], k [B, Hkv, L, D] as HF makes them: views of [B, L, H, D] projections."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, seq, n_q, dim, generator=g).to(device, dtype).requires_grad_()
    k = torch.randn(batch, seq, n_kv, dim, generator=g).to(device, dtype).requires_grad_()
    dq = torch.randn(batch, n_q, seq, dim, generator=g).to(device, dtype)
    dk = torch.randn(batch, n_kv, seq, dim, generator=g).to(device, dtype)
    return q, k, dq, dk


def _run(fn, q, k, cos, sin, dq, dk):
    """(q_embed, k_embed, dq, dk) of fn on fresh leaves; q/k are transposed views as in HF."""
    q, k = leaves(q, k, dtype=cos.dtype if cos.dtype == torch.float64 else None)
    qe, ke = fn(q.transpose(1, 2), k.transpose(1, 2), cos, sin)
    ((qe * dq.to(qe.dtype)).sum() + (ke * dk.to(ke.dtype)).sum()).backward()
    return qe, ke, q.grad.transpose(1, 2), k.grad.transpose(1, 2)


def _compare(q, k, cos, sin, dq, dk):
    ours = _run(lambda *a: apply_rotary_pos_emb(*a, backend="triton"), q, k, cos, sin, dq, dk)
    hf = _run(hf_apply, q, k, cos, sin, dq, dk)
    ref = _run(rope_ref, q, k, cos.double(), sin.double(), dq, dk)
    for name, o, r, h in zip(("q_embed", "k_embed", "dq", "dk"), ours, ref, hf):
        assert o.dtype == h.dtype and o.shape == h.shape, name
        check(o, r, h, name)
        if o.dtype == torch.float32:
            assert rel_err(o, h) <= FP32_TOL, name
    return ours


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", [(2, 13, 6, 2, 24), (1, 9, 5, 5, 10)],
                         ids=["gqa-B2-L13-D24", "mha-L9-D10"])
def test_matches_hf_and_fp64(shape, dtype):
    batch, seq, n_q, n_kv, dim = shape
    q, k, dq, dk = _qk(*shape, dtype, seed=seq)
    pos = torch.arange(seq).repeat(batch, 1) + torch.arange(batch)[:, None] * 3
    cos, sin = _cos_sin(pos, dtype, head_dim=dim)
    qe, ke, *_ = _compare(q, k, cos, sin, dq, dk)
    # outputs keep HF's layout ([B, L, H, D] memory seen as [B, H, L, D]) and inputs are untouched
    assert qe.stride() == q.transpose(1, 2).stride() and ke.stride() == k.transpose(1, 2).stride()


@pytest.mark.parametrize("scaling", list(SCALINGS))
def test_rope_scalings_and_packed_positions(scaling):
    """Any HF rope type works: the op only applies HF's cos/sin. Two packed sequences per row."""
    pos = torch.cat([torch.arange(7), torch.arange(13)])[None].repeat(2, 1)   # [2, 20], max 12
    pos[1] += 9                                                                # beyond 16 for dynamic
    cos, sin = _cos_sin(pos, torch.float32, scaling=SCALINGS[scaling])
    q, k, dq, dk = _qk(2, 20, 4, 2, 24, torch.float32, seed=len(scaling))
    _compare(q, k, cos, sin, dq, dk)


def test_broadcast_cos_and_contiguous_inputs():
    """cos/sin [1, L, D] broadcast over the batch; contiguous [B, H, L, D] q/k; one output unused."""
    cos, sin = _cos_sin(torch.arange(11)[None], torch.float32)
    g = torch.Generator().manual_seed(2)
    q = torch.randn(3, 4, 11, 24, generator=g, requires_grad=True)
    k = torch.randn(3, 1, 11, 24, generator=g, requires_grad=True)
    qe, ke = apply_rotary_pos_emb(q, k, cos, sin, backend="triton")
    qe.square().sum().backward()                       # k_embed unused: dk must be zeros
    q64 = q.detach().double().requires_grad_()
    qr, kr = rope_ref(q64, k.detach().double(), cos.double(), sin.double())
    qr.square().sum().backward()
    assert rel_err(qe, qr) <= FP32_TOL and rel_err(ke, kr) <= FP32_TOL
    assert rel_err(q.grad, q64.grad) <= FP32_TOL and torch.equal(k.grad, torch.zeros_like(k))


@pytest.mark.parametrize("backward", [False, True])
def test_launcher_writes_every_element(backward, monkeypatch):
    """Poisoned outputs (every kernel output is allocated through backend._empty), laid out like
    the transposed q/k views HF passes: every element is written."""
    monkeypatch.setattr(kernel_backend, "_empty", lambda *a, **k: torch.full(*a, float("nan"), **k))
    cos, sin = _cos_sin(torch.arange(5).repeat(2, 1), torch.float32)
    q, k, _, _ = _qk(2, 5, 3, 1, 24, torch.float32, seed=4)
    q, k = q.detach().transpose(1, 2), k.detach().transpose(1, 2)
    qo, ko = rope_apply(q, k, cos, sin, backward=backward)
    for out, src in ((qo, q), (ko, k)):  # laid out like q and k (a size-1 dim's stride is arbitrary)
        assert [st for st, n in zip(out.stride(), out.shape) if n > 1] == \
               [st for st, n in zip(src.stride(), src.shape) if n > 1]
    c, s = cos.double(), sin.double()
    if backward:  # rotation by −θ undoes the forward
        c, s = c, -s
    qr, kr = rope_ref(q.double(), k.double(), c, s)
    assert rel_err(qo, qr) <= FP32_TOL and rel_err(ko, kr) <= FP32_TOL


def test_backward_inverts_forward():
    """Rotation is orthogonal: backward(forward(x)) = x."""
    cos, sin = _cos_sin(torch.arange(6)[None], torch.float32)
    q, k, _, _ = _qk(1, 6, 2, 2, 24, torch.float32, seed=9)
    q, k = q.detach().transpose(1, 2), k.detach().transpose(1, 2)
    qe, ke = rope_apply(q, k, cos, sin)
    qb, kb = rope_apply(qe, ke, cos, sin, backward=True)
    assert rel_err(qb, q) <= FP32_TOL and rel_err(kb, k) <= FP32_TOL


def test_bad_inputs():
    cos, sin = _cos_sin(torch.arange(4)[None], torch.float32)
    q, k = torch.randn(1, 4, 4, 24), torch.randn(1, 2, 4, 24)
    with pytest.raises(ValueError, match="must be \\[B, H, L, D\\]"):
        apply_rotary_pos_emb(q[0], k, cos, sin)
    with pytest.raises(ValueError, match="must agree"):
        apply_rotary_pos_emb(q, torch.randn(1, 2, 5, 24), cos, sin)
    with pytest.raises(ValueError, match="even"):
        apply_rotary_pos_emb(q[..., :23], k[..., :23], cos[..., :23], sin[..., :23])
    with pytest.raises(ValueError, match="cos and sin must both be"):
        apply_rotary_pos_emb(q, k, cos[:, :3], sin[:, :3])
    with pytest.raises(ValueError, match="cos and sin must both be"):
        apply_rotary_pos_emb(q, k, cos.expand(2, 4, 24), sin.expand(2, 4, 24))
    with pytest.raises(TypeError, match="one dtype"):
        apply_rotary_pos_emb(q, k.half(), cos, sin)
    with pytest.raises(TypeError, match="float32/float16/bfloat16"):
        apply_rotary_pos_emb(q.double(), k.double(), cos, sin)
    with pytest.raises(ValueError, match="no gradient"):
        apply_rotary_pos_emb(q, k, cos.requires_grad_(), sin, backend="triton")


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(2, 1024, 32, 8, 128), (3, 37, 6, 2, 24)])
def test_gpu_bf16(shape):
    batch, seq, n_q, n_kv, dim = shape
    q, k, dq, dk = _qk(*shape, torch.bfloat16, seed=0, device="cuda")
    cos, sin = _cos_sin(torch.arange(seq).repeat(batch, 1), torch.bfloat16, head_dim=dim, device="cuda")
    _compare(q, k, cos, sin, dq, dk)
