"""RMSNorm (Llama and Gemma) against HF's LlamaRMSNorm / GemmaRMSNorm and a float64 reference.

Output, dX and dW; Triton through the interpreter on CPU (tests/conftest.py), fp32 and fp16.
"""
from __future__ import annotations

import pytest
import torch
import trilora.kernels.backend as kernel_backend
from _blocks import FP32_TOL, check, leaves, rel_err
from transformers.models.gemma.modeling_gemma import GemmaRMSNorm
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from trilora.kernels.rms_norm import (RMSNorm, rms_norm, rms_norm_backward, rms_norm_forward,
                                      rms_norm_ref)

HAS_CUDA = torch.cuda.is_available()
DEV = "cuda" if HAS_CUDA else "cpu"
EPS = 1e-6


def _hf(gemma: bool, weight: torch.Tensor) -> torch.nn.Module:
    m = (GemmaRMSNorm if gemma else LlamaRMSNorm)(weight.shape[0], eps=EPS)
    m.weight = torch.nn.Parameter(weight.detach().clone(), requires_grad=weight.requires_grad)
    return m


def _case(shape, dtype, gemma, seed, w_dtype=None, device=DEV):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g) * 3 + 0.5).to(device, dtype).requires_grad_()
    w = (torch.randn(shape[-1], generator=g) * 0.2 + (0.0 if gemma else 1.0)).to(device, w_dtype or dtype)
    dy = torch.randn(shape, generator=g).to(device, dtype)
    return x, w.requires_grad_(), dy


def _run(fn, x, w, dy):
    x, w = leaves(x, w)
    y = fn(x, w)
    y.backward(dy.to(y.dtype))
    return y, x.grad, w.grad


def _run_hf(gemma, x, w, dy):
    """(y, dx, dw) of HF's module holding weight w."""
    m = _hf(gemma, w)
    (x,) = leaves(x)
    y = m(x)
    y.backward(dy.to(y.dtype))
    return y, x.grad, m.weight.grad


@pytest.mark.parametrize("gemma", [False, True], ids=["llama", "gemma"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", [(6, 42, 123), (5, 431), (1, 3, 64)])
def test_matches_hf_and_fp64(shape, dtype, gemma):
    x, w, dy = _case(shape, dtype, gemma, seed=shape[-1] + gemma)
    ours = _run(lambda a, b: rms_norm(a, b, EPS, gemma, backend="triton"), x, w, dy)
    hf = _run_hf(gemma, x, w, dy)
    x64, w64 = leaves(x, w, dtype=torch.float64)
    ref = _run(lambda a, b: rms_norm_ref(a, b, EPS, gemma), x64, w64, dy.double())
    for name, o, r, h in zip(("y", "dx", "dw"), ours, ref, hf):
        assert o.dtype == h.dtype, name
        check(o, r, h, name)
        if dtype == torch.float32:  # and agrees with HF itself
            assert rel_err(o, h) <= FP32_TOL, name


@pytest.mark.parametrize("gemma", [False, True], ids=["llama", "gemma"])
def test_torch_backend_is_hf_exactly(gemma):
    x, w, dy = _case((4, 9, 80), torch.float16, gemma, seed=7)
    ours = _run(lambda a, b: rms_norm(a, b, EPS, gemma, backend="torch"), x, w, dy)
    for o, h in zip(ours, _run_hf(gemma, x, w, dy)):
        assert torch.equal(o, h)


@pytest.mark.parametrize("gemma", [False, True], ids=["llama", "gemma"])
def test_weight_dtype_promotion_like_hf(gemma):
    """fp32 weight on fp16 x: Llama outputs fp32 (weight * x.to(fp16) promotes), Gemma fp16."""
    x, w, dy = _case((3, 5, 40), torch.float16, gemma, seed=3, w_dtype=torch.float32)
    y = rms_norm(x, w, EPS, gemma, backend="triton")
    h = _hf(gemma, w)(x)
    assert y.dtype == h.dtype == (torch.float16 if gemma else torch.float32)
    assert rel_err(y, h) <= (FP32_TOL if not gemma else 1e-3)
    y.backward(dy.to(y.dtype))
    assert x.grad.dtype == torch.float16 and w.grad.dtype == torch.float32


def test_frozen_weight_and_strided_input():
    """No dW when the weight is frozen; a transposed x is read correctly."""
    g = torch.Generator().manual_seed(11)
    x = torch.randn(77, 9, generator=g).t().requires_grad_()         # [9, 77], strides (1, 9)
    w = torch.randn(77, generator=g)
    y = rms_norm(x, w, EPS, backend="triton")
    y.backward(torch.ones_like(y))
    x64 = x.detach().double().requires_grad_()
    y64 = rms_norm_ref(x64, w.double(), EPS)
    y64.backward(torch.ones_like(y64))
    assert w.grad is None
    assert rel_err(y, y64) <= FP32_TOL and rel_err(x.grad, x64.grad) <= FP32_TOL


def test_module_loads_hf_state_dict():
    hf = LlamaRMSNorm(96, eps=1e-5)
    torch.nn.init.normal_(hf.weight)
    ours = RMSNorm(96, eps=1e-5, backend="triton")
    ours.load_state_dict(hf.state_dict())
    x = torch.randn(2, 5, 96)
    assert rel_err(ours(x), hf(x)) <= FP32_TOL
    assert torch.equal(RMSNorm(8, gemma=True).weight, torch.zeros(8))


@pytest.mark.parametrize("gemma", [False, True], ids=["llama", "gemma"])
def test_launchers_write_every_element(gemma, monkeypatch):
    """Poisoned outputs (every kernel output is allocated through backend._empty): the forward's
    y and rstd and the backward's dx are fully overwritten."""
    monkeypatch.setattr(kernel_backend, "_empty", lambda *a, **k: torch.full(*a, float("nan"), **k))
    x, w, dy = _case((19, 50), torch.float32, gemma, seed=5)
    x, w = x.detach(), w.detach()
    y, rstd = rms_norm_forward(x, w, EPS, gemma)
    assert rel_err(y, rms_norm_ref(x.double(), w.double(), EPS, gemma)) <= FP32_TOL and torch.isfinite(rstd).all()
    dx, dw = rms_norm_backward(dy, x, w, rstd, gemma, need_dw=True)
    x64, w64 = (t.double().requires_grad_() for t in (x, w))
    rms_norm_ref(x64, w64, EPS, gemma).backward(dy.double())
    assert rel_err(dx, x64.grad) <= FP32_TOL and rel_err(dw, w64.grad) <= FP32_TOL


def test_empty_batch():
    x = torch.randn(0, 16, requires_grad=True)
    w = torch.ones(16, requires_grad=True)
    y = rms_norm(x, w, backend="triton")
    y.sum().backward()
    assert y.shape == (0, 16) and torch.equal(w.grad, torch.zeros(16))


def test_bad_inputs():
    x = torch.randn(4, 8)
    with pytest.raises(ValueError, match=r"weight must be \[H\]"):
        rms_norm(x, torch.ones(7))
    with pytest.raises(ValueError, match=r"weight must be \[H\]"):
        rms_norm(x, torch.ones(1, 8))
    with pytest.raises(TypeError, match="float32/float16/bfloat16"):
        rms_norm(x.long(), torch.ones(8))
    with pytest.raises(TypeError, match="float32/float16/bfloat16"):
        rms_norm(x.double(), torch.ones(8))
    with pytest.raises(ValueError, match="eps"):
        rms_norm(x, torch.ones(8), eps=-1.0)
    with pytest.raises(ValueError, match="backend"):
        rms_norm(x, torch.ones(8), backend="cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("gemma", [False, True], ids=["llama", "gemma"])
@pytest.mark.parametrize("shape", [(8, 512, 4096), (3, 37, 123)])
def test_gpu_bf16(shape, gemma):
    x, w, dy = _case(shape, torch.bfloat16, gemma, seed=1, device="cuda")
    ours = _run(lambda a, b: rms_norm(a, b, EPS, gemma, backend="triton"), x, w, dy)
    x64, w64 = leaves(x, w, dtype=torch.float64)
    ref = _run(lambda a, b: rms_norm_ref(a, b, EPS, gemma), x64, w64, dy.double())
    for name, o, r, h in zip(("y", "dx", "dw"), ours, ref, _run_hf(gemma, x, w, dy)):
        check(o, r, h, name)
