"""GLU `act(gate) * up` (SwiGLU, GeGLU-tanh) against HF's activations and a float64 reference.

Output, d_gate and d_up; contiguous and strided (fused gate_up halves) inputs; the in-place
backward the LoRA MLP runs; Triton through the interpreter on CPU (tests/conftest.py), fp32
and fp16.
"""
from __future__ import annotations

import pytest
import torch
from _blocks import FP32_TOL, check, leaves, rel_err
from transformers.activations import ACT2FN

from trilora.kernels.glu import GLU, SwiGLU, glu, glu_backward, glu_forward, glu_ref, swiglu, swiglu_ref

HAS_CUDA = torch.cuda.is_available()
DEV = "cuda" if HAS_CUDA else "cpu"


def hf_swiglu(gate, up):
    """LlamaMLP's `act_fn(gate_proj(x)) * up_proj(x)` with act_fn = ACT2FN["silu"]."""
    return ACT2FN["silu"](gate) * up


def _inputs(shape, dtype, seed, fused=False, device=DEV):
    """(leaves, gate, up, dh); fused: gate and up are the two halves of one [.., 2I] tensor."""
    g = torch.Generator().manual_seed(seed)
    if fused:
        gu = (torch.randn(*shape[:-1], 2 * shape[-1], generator=g) * 3).to(device, dtype).requires_grad_()
        srcs = [gu]
    else:
        srcs = [(torch.randn(shape, generator=g) * 3).to(device, dtype).requires_grad_() for _ in range(2)]
    return srcs, torch.randn(shape, generator=g).to(device, dtype)


def _run(fn, srcs, dh, dtype=None):
    srcs = leaves(*srcs, dtype=dtype)
    gate, up = srcs[0].chunk(2, dim=-1) if len(srcs) == 1 else srcs
    h = fn(gate, up)
    h.backward(dh.to(h.dtype))
    return [h] + [s.grad for s in srcs]


@pytest.mark.parametrize("fused", [False, True], ids=["separate", "fused-halves"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", [(6, 42, 123), (3, 431)])
def test_matches_hf_and_fp64(shape, dtype, fused):
    if fused and shape[0] == 6:
        shape = (2, 21, 123)  # strided rows: one program per row in the interpreter, keep it short
    srcs, dh = _inputs(shape, dtype, seed=shape[-1], fused=fused)
    ours = _run(lambda g, u: swiglu(g, u, backend="triton"), srcs, dh)
    hf = _run(hf_swiglu, srcs, dh)
    ref = _run(swiglu_ref, srcs, dh, dtype=torch.float64)
    for name, o, r, h in zip(("h", "dsrc0", "dsrc1"), ours, ref, hf):
        assert o.dtype == h.dtype, name
        check(o, r, h, name)
        if dtype == torch.float32:
            assert rel_err(o, h) <= FP32_TOL, name


def test_torch_backend_is_hf_exactly():
    srcs, dh = _inputs((5, 33), torch.float16, seed=1)
    for o, h in zip(_run(lambda g, u: swiglu(g, u, backend="torch"), srcs, dh), _run(hf_swiglu, srcs, dh)):
        assert torch.equal(o, h)


@pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")  # interpreter's numpy
def test_extreme_values_stay_finite():
    """|gate| up to 1e4 (sigmoid saturates): no inf/NaN, and matches fp64."""
    gate = torch.tensor([-1e4, -100.0, -20.0, -1e-3, 0.0, 1e-3, 20.0, 100.0, 1e4]).repeat(3, 1)
    up = torch.linspace(-2, 2, 9).repeat(3, 1)
    (g, u), (g64, u64) = leaves(gate, up), leaves(gate, up, dtype=torch.float64)
    for t in (g, u, g64, u64):
        t.requires_grad_()
    swiglu(g, u, backend="triton").sum().backward()
    swiglu_ref(g64, u64).sum().backward()
    assert rel_err(g.grad, g64.grad) <= FP32_TOL and rel_err(u.grad, u64.grad) <= FP32_TOL


def test_module():
    srcs, dh = _inputs((4, 7, 50), torch.float32, seed=3)
    assert rel_err(SwiGLU(backend="triton")(*srcs), hf_swiglu(*srcs)) <= FP32_TOL


@pytest.mark.parametrize("strided", [False, True])
def test_launchers_write_every_element(strided):
    """Poisoned outputs (strided: views with a padded row) are written exactly where they should be."""
    g = torch.Generator().manual_seed(8)
    gate, up, dh = (torch.randn(9, 70, generator=g) for _ in range(3))
    width = 75 if strided else 70
    bufs = [torch.full((10, width), float("nan")) for _ in range(3)]
    h = glu_forward(gate, up, "silu", out=bufs[0][:9, :70])
    if not strided:
        dgate, dup = glu_backward(dh, gate, up, "silu", out=(bufs[1][:9], bufs[2][:9]))
    else:
        dgate, dup = glu_backward(dh, gate, up, "silu")
    for buf in bufs[: 1 if strided else 3]:
        assert torch.isfinite(buf[:9, :70]).all() and torch.isnan(buf[9]).all() and torch.isnan(buf[:, 70:]).all()
    g64, u64 = gate.double().requires_grad_(), up.double().requires_grad_()
    h64 = swiglu_ref(g64, u64)
    h64.backward(dh.double())
    assert rel_err(h, h64) <= FP32_TOL
    assert rel_err(dgate, g64.grad) <= FP32_TOL and rel_err(dup, u64.grad) <= FP32_TOL


def test_bad_inputs():
    x = torch.randn(4, 8)
    with pytest.raises(ValueError, match="one shape"):
        swiglu(x, torch.randn(4, 9))
    with pytest.raises(TypeError, match="one dtype"):
        swiglu(x, x.half())
    with pytest.raises(TypeError, match="one dtype"):
        swiglu(x.long(), x.long())
    with pytest.raises(TypeError, match="tensors"):
        swiglu(x, 1.0)


@pytest.mark.gpu
@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("shape", [(8192, 14336), (3, 37, 123)])
def test_gpu_bf16(shape, fused):
    srcs, dh = _inputs(shape, torch.bfloat16, seed=0, fused=fused, device="cuda")
    ours = _run(lambda g, u: swiglu(g, u, backend="triton"), srcs, dh)
    hf = _run(hf_swiglu, srcs, dh)
    ref = _run(swiglu_ref, srcs, dh, dtype=torch.float64)
    for name, o, r, h in zip(("h", "dsrc0", "dsrc1"), ours, ref, hf):
        check(o, r, h, name)


@pytest.mark.filterwarnings("ignore:overflow encountered in exp")  # numpy's σ(-large) in the interpreter: 0, exact
@pytest.mark.parametrize("act", ["silu", "gelu_tanh"])
def test_extreme_values_and_the_in_place_backward(act):
    """Gates over ±40 (σ saturates) and random ones; the backward writes d_gate, d_up over the
    [g | u] halves it reads, as the LoRA MLP runs it."""
    g = torch.Generator().manual_seed(3)
    gate = torch.cat([torch.linspace(-40, 40, 161), torch.randn(159, generator=g) * 3]).view(4, 80)
    up, dh = torch.randn(4, 80, generator=g), torch.randn(4, 80, generator=g)
    gu = torch.cat([gate, up], 1)
    h = glu_forward(gu[:, :80], gu[:, 80:], act)
    glu_backward(dh, gu[:, :80], gu[:, 80:], act, out=(gu[:, :80], gu[:, 80:]))  # gu now holds [d_gate | d_up]
    ref_in = [gate.double().requires_grad_(), up.double().requires_grad_()]
    ref = glu_ref(*ref_in, act)
    ref_grads = torch.autograd.grad(ref, ref_in, dh.double())
    assert rel_err(h, ref) <= FP32_TOL
    assert rel_err(gu[:, :80], ref_grads[0]) <= FP32_TOL and rel_err(gu[:, 80:], ref_grads[1]) <= FP32_TOL


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_geglu_matches_hf_gelu_pytorch_tanh(dtype):
    """glu(act="gelu_tanh") against Gemma's act_fn (gelu_pytorch_tanh) and float64, with gradients;
    the GLU module gives the same."""
    srcs, dh = _inputs((5, 97), dtype, seed=12)
    hf = lambda a, b: ACT2FN["gelu_pytorch_tanh"](a) * b  # noqa: E731
    ours = _run(lambda a, b: glu(a, b, "gelu_tanh", backend="triton"), srcs, dh)
    for o, h, r in zip(ours, _run(hf, srcs, dh), _run(lambda a, b: glu_ref(a, b, "gelu_tanh"), srcs, dh,
                                                      dtype=torch.float64)):
        check(o, r, h, "geglu")
    with torch.no_grad():
        assert torch.equal(GLU("gelu_tanh", backend="triton")(*srcs), glu(*srcs, "gelu_tanh", backend="triton"))
    with pytest.raises(ValueError, match="act must be one of"):
        glu(*srcs, act="relu")
