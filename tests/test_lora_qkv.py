"""LoRA QKV block (`trilora.kernels.lora.projections`) against a float64 reference and HF-style modules.

q, k, v of one input (GQA sizes: 4 query heads, 2 key/value heads of dim 12, hidden 48),
dense and 4-bit bases, ranks 3/8 and adapter-less projections, Qwen2's q/k/v bias, dropout
on/off; outputs and every gradient (dX, dA, dB, dbias). Triton runs through the interpreter
on CPU (tests/conftest.py). Error metric and tolerances: tests/_blocks.py.
"""
from __future__ import annotations

import importlib

import pytest
import torch
import torch.nn as nn
from _blocks import FP32_TOL, check, rel_err
from _lora_blocks import DEV, cast, grads_of, make_projection, with_dora

from trilora.kernels.lora import Projection, lora_dropout_mask, lora_projections, lora_projections_ref, lora_qkv
from trilora.lora import LoraLinear
from trilora.patching.blocks import projections_of

projections = importlib.import_module("trilora.kernels.lora.projections")
kernel_backend = importlib.import_module("trilora.kernels.backend")
configs = importlib.import_module("trilora.kernels.lora.configs")
HIDDEN, NQ, NKV = 48, 48, 24  # 4 query heads and 2 key/value heads of dim 12


def make_qkv(ranks=(8, 0, 3), dtype=torch.float32, bias=False, quant=(None, None, None), seed=0, hidden=HIDDEN):
    return [make_projection(n, hidden, r, dtype, bias, q, seed + i)
            for i, (n, r, q) in enumerate(zip((NQ, NKV, NKV), ranks, quant))]


def inputs(dtype, seed=0, shape=(2, 7), hidden=HIDDEN):
    g = torch.Generator().manual_seed(100 + seed)
    x = torch.randn(*shape, hidden, generator=g).to(DEV, dtype)
    dys = [torch.randn(*shape, n, generator=g).to(DEV, dtype) for n in (NQ, NKV, NKV)]
    return x, dys


def run(x, projs, dys, p, seed, backend="triton", dtype=None):
    """Outputs and gradients of lora_qkv (dtype None) or of the reference in `dtype`."""
    dtype = dtype or x.dtype
    xl = x.detach().to(dtype).clone().requires_grad_()
    pl = [cast(pr, dtype) for pr in projs]
    if dtype == torch.float64:
        mask = lora_dropout_mask(seed, x.shape, p, x.device) if p > 0 else None
        outs = lora_projections_ref(xl, pl, p, mask)
    else:
        outs = lora_qkv(xl, *pl, dropout_p=p, backend=backend, seed=seed)
    return grads_of(tuple(outs), xl, pl, dys)


def check_all(x, projs, dys, p=0.0, seed=7, backend="triton"):
    ours = run(x, projs, dys, p, seed, backend)
    ref = run(x, projs, dys, p, seed, dtype=torch.float64)
    base = run(x, projs, dys, p, seed, backend="torch") if x.dtype != torch.float32 else ours
    assert ours.keys() == ref.keys()
    for name in ref:  # a DoRA magnitude's gradient has m's dtype (fp32: `with_dora`)
        assert ours[name].dtype == (torch.float32 if name.startswith("dm") else x.dtype), name
        check(ours[name], ref[name], base[name], name, dtype=x.dtype)
    return ours


CASES = [  # (dtype, ranks, bias, quant of q/k/v, dropout p)
    (torch.float32, (8, 0, 3), True, (None, None, None), 0.0),
    (torch.float32, (3, 3, 8), False, (None, None, None), 0.25),
    (torch.float32, (8, 0, 3), True, (("nf4", True, 32),) * 3, 0.2),
    (torch.float32, (3, 8, 0), True, (("fp4", False, 64), None, None), 0.0),  # mixed bases
    (torch.float16, (8, 0, 3), True, (None, None, None), 0.1),
    (torch.float16, (3, 3, 8), False, (("nf4", False, 64),) * 3, 0.0),
]


@pytest.mark.parametrize("dtype,ranks,bias,quant,p", CASES)
def test_matches_fp64_reference(dtype, ranks, bias, quant, p):
    x, dys = inputs(dtype, seed=len(ranks))
    check_all(x, make_qkv(ranks, dtype, bias, quant, seed=3), dys, p)


@pytest.mark.parametrize("dtype,quant", [(torch.float32, None), (torch.float32, ("nf4", True, 32)),
                                         (torch.float16, ("fp4", False, 64))])
def test_dora_projections_match_fp64_reference(dtype, quant):
    """DoRA q (its ‖W‖² kept, as a layer keeps it) and v (computed per call), k without
    adapter: outputs, dX, dA, dB, dbias and the magnitudes' gradients."""
    x, dys = inputs(dtype, seed=4)
    q, k, v = make_qkv((8, 0, 3), dtype, True, (quant,) * 3, seed=9)
    got = check_all(x, [with_dora(q, 0), k, with_dora(v, 1, keep_weight_sq=False)], dys)
    assert {"dm0", "dm2"} <= got.keys()


def test_dora_zero_magnitude_and_in_loop_unpack(monkeypatch):
    """A magnitude with zeros (z cannot be read back from y: recomputed) over 4-bit bases
    unpacked in the K-loop (hidden 64), outputs poisoned: still the float64 reference."""
    from test_lora_linear import poison
    monkeypatch.setattr(kernel_backend, "_empty", poison)
    x, dys = inputs(torch.float32, seed=5, hidden=64)
    q, k, v = make_qkv((5, 3, 0), bias=True, quant=(("nf4", True, 32),) * 3, seed=4, hidden=64)
    q, k = with_dora(q, 2), with_dora(k, 3)
    q.magnitude[::3] = 0.0
    check_all(x, [q, k, v], dys)


def test_torch_backend_and_strided_input():
    x, dys = inputs(torch.float32, seed=1)
    xt = x.transpose(0, 1).contiguous().transpose(0, 1)  # [2, 7, 48] with permuted strides
    assert not xt.is_contiguous()
    projs = make_qkv((3, 8, 3), bias=True, seed=5)
    ours = check_all(xt, projs, dys, p=0.3)
    torch_path = check_all(xt, projs, dys, p=0.3, backend="torch")  # same mask from the same seed
    for name in ours:
        assert rel_err(ours[name], torch_path[name].double()) <= FP32_TOL, name


def test_dx_is_one_launch(monkeypatch):
    """The backward writes dX once for all three projections (one GEMM over three segments)."""
    calls = []
    real = projections.gemm
    monkeypatch.setattr(projections, "gemm", lambda out, segs, w_t, **kw: calls.append((w_t, len(segs))) or
                        real(out, segs, w_t, **kw))
    x, dys = inputs(torch.float32)
    check_all(x, make_qkv((8, 0, 3), bias=True), dys)
    assert [n for w_t, n in calls if not w_t] == [3]


@pytest.mark.parametrize("quant", [("nf4", True, 32), ("fp4", False, 64)])
@pytest.mark.parametrize("p", [0.0, 0.2])
def test_in_loop_unpack_of_three_segments(quant, p):
    """hidden 64: the 4-bit bases are unpacked inside the K-loops of one dX GEMM (no buffer)."""
    x, dys = inputs(torch.float32, seed=6, hidden=64)
    check_all(x, make_qkv((8, 0, 3), bias=True, quant=(quant,) * 3, seed=2, hidden=64), dys, p)


def test_outputs_are_poisoned_then_written(monkeypatch):
    """Launcher outputs poisoned: an element a kernel forgets to write fails the comparison."""
    from test_lora_linear import poison
    monkeypatch.setattr(kernel_backend, "_empty", poison)  # every kernel output is allocated through it
    for hidden in (HIDDEN, 64):  # the buffer path and the in-loop unpack
        x, dys = inputs(torch.float32, seed=2, hidden=hidden)
        check_all(x, make_qkv((8, 0, 3), bias=True, quant=(("nf4", True, 32),) * 3, hidden=hidden), dys, p=0.2)


def test_tma_and_wide_tiles(monkeypatch):
    monkeypatch.setattr(configs, "arch_of", lambda device: 90)
    monkeypatch.setattr(configs, "FORCE_TILE", configs.WIDE)
    x, dys = inputs(torch.float32, seed=3, hidden=64)
    check_all(x, make_qkv((8, 3, 3), bias=True, hidden=64), dys, p=0.2)


def test_only_adapters_train_and_empty_batch():
    x, dys = inputs(torch.float32, seed=3)
    projs = [cast(p, torch.float32) for p in make_qkv((3, 0, 8), bias=True)]
    frozen = [Projection(p.weight, p.quant_state, p.lora_A, p.lora_B, p.scaling, p.bias.detach()) for p in projs]
    outs = lora_qkv(x, *frozen, backend="triton")
    torch.autograd.grad(outs, [frozen[0].lora_A, frozen[2].lora_B], dys)
    empty = x[:, :0].detach().requires_grad_()  # [2, 0, 48]
    outs = lora_qkv(empty, *projs, dropout_p=0.1, backend="triton")
    assert [tuple(o.shape) for o in outs] == [(2, 0, NQ), (2, 0, NKV), (2, 0, NKV)]
    got = grads_of(outs, empty, projs, [d[:, :0] for d in dys])
    assert all(g.abs().sum() == 0 for k, g in got.items() if not k.startswith("y"))


def test_matches_hf_lora_modules():
    """Qwen2-style q/k/v (biased nn.Linear under LoraLinear, k without adapter): the block
    gives the modules' outputs and the gradients of x and the fp32 adapter parameters."""
    torch.manual_seed(0)
    mods = [nn.Linear(HIDDEN, n, bias=True) for n in (NQ, NKV, NKV)]
    for m in mods:
        m.weight.requires_grad_(False)
    mods = [LoraLinear(mods[0], 8, 16, backend="torch"), mods[1], LoraLinear(mods[2], 3, 6, backend="torch")]
    for m in (mods[0], mods[2]):
        nn.init.normal_(m.lora_B["default"].weight, std=0.2)
    x, dys = inputs(torch.float32, seed=4)
    params = [p for m in mods for p in m.parameters() if p.requires_grad]
    results = []
    for fused in (False, True):
        xl = x.clone().requires_grad_()
        if fused:
            xc, projs, p = projections_of(mods, xl)
            outs = lora_qkv(xc, *projs, dropout_p=p, backend="triton")
        else:
            outs = [m(xl) for m in mods]
        results.append([o.detach() for o in outs] + list(torch.autograd.grad(outs, [xl, *params], dys)))
    for hf, ours in zip(*results):
        assert rel_err(ours, hf) <= FP32_TOL


def test_input_errors():
    x, _ = inputs(torch.float32)
    q, k, v = make_qkv()
    with pytest.raises(ValueError, match="projection 1"):
        lora_qkv(x, q, make_projection(NKV, HIDDEN + 1, 0), v, backend="triton")
    with pytest.raises(ValueError, match="both be given"):
        lora_qkv(x, Projection(q.weight, lora_A=q.lora_A), k, v, backend="triton")
    with pytest.raises(TypeError, match="dtype"):
        lora_qkv(x.half(), q, k, v, backend="triton")
    with pytest.raises(ValueError, match="1 to 3"):
        lora_projections(x, [q, k, v, v], backend="triton")
    with pytest.raises(ValueError, match="seed"):
        lora_qkv(x, q, k, v, dropout_p=0.1, backend="triton", seed=-1)
    with pytest.raises(ValueError, match="projection 0: a DoRA projection takes dropout_p = 0"):
        lora_qkv(x, with_dora(q), k, v, dropout_p=0.1, backend="triton")
    with pytest.raises(ValueError, match=r"projection 2: magnitude must be a float tensor of shape \(24,\)"):
        lora_qkv(x, q, k, Projection(v.weight, None, v.lora_A, v.lora_B, magnitude=torch.ones(23)), backend="triton")
    with pytest.raises(ValueError, match="frozen"):
        lora_qkv(x, Projection(q.weight.clone().requires_grad_(), None, q.lora_A, q.lora_B), k, v, backend="triton")


# ----------------------------------------------------------------------------- GPU only

@pytest.mark.gpu
@pytest.mark.skipif(DEV != "cuda", reason="bf16 kernels are only exact on a GPU")
@pytest.mark.parametrize("quant,dora", [(None, False), (("nf4", True, 64), False), (("nf4", True, 64), True)])
def test_bf16_gpu(quant, dora):
    """bf16 at a size that takes the real tiles (M = 999, hidden 512, GQA 512/128/128): every
    output and gradient within 2 × torch-bf16's error against float64; DoRA on q (one
    magnitude 0) and v."""
    g = torch.Generator().manual_seed(31)
    hidden, sizes = 512, (512, 128, 128)
    x = torch.randn(3, 333, hidden, generator=g).to(DEV, torch.bfloat16)
    dys = [torch.randn(3, 333, n, generator=g).to(DEV, torch.bfloat16) for n in sizes]
    projs = [make_projection(n, hidden, r, torch.bfloat16, True, quant, seed=40 + i)
             for i, (n, r) in enumerate(zip(sizes, (16, 0, 12)))]
    if dora:
        projs = [with_dora(projs[0], 0), projs[1], with_dora(projs[2], 2)]
        projs[0].magnitude[5] = 0.0  # q's z recomputed: the zero found through the forward's host flag
    ours = run(x, projs, dys, 0.0, 7)
    ref = run(x, projs, dys, 0.0, 7, dtype=torch.float64)
    base = run(x, projs, dys, 0.0, 7, backend="torch")
    for name in ref:
        check(ours[name], ref[name], base[name], name, dtype=torch.bfloat16)
