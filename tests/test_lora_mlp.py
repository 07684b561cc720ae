"""LoRA MLP block (`trilora.kernels.lora.mlp`) against a float64 reference and HF's MLP modules.

`down(act(gate(x)) * up(x))` with hidden 48, intermediate 80, SwiGLU and GeGLU-tanh, dense
and 4-bit bases, ranks 3/8 and adapter-less projections, bias, dropout on/off; outputs and
every gradient. Also: only x is saved for backward, and the GLU kernels on extreme inputs.
Triton runs through the interpreter on CPU (tests/conftest.py).
"""
from __future__ import annotations

import importlib

import pytest
import torch
import torch.nn as nn
from _blocks import FP32_TOL, check, rel_err
from _lora_blocks import DEV, cast, grads_of, make_projection, with_dora
from transformers import GemmaConfig, LlamaConfig
from transformers.models.gemma.modeling_gemma import GemmaMLP
from transformers.models.llama.modeling_llama import LlamaMLP

from trilora.kernels.lora import lora_dropout_mask, lora_mlp, lora_mlp_ref
from trilora.lora import LoraLinear
from trilora.patching.blocks import TriloraMLP

kernel_backend = importlib.import_module("trilora.kernels.backend")
HIDDEN, INTER = 48, 80


def make_mlp(ranks=(3, 8, 3), dtype=torch.float32, bias=False, quant=None, seed=0, hidden=HIDDEN, inter=INTER):
    shapes = ((inter, hidden), (inter, hidden), (hidden, inter))
    return [make_projection(n, k, r, dtype, bias, quant, seed + i)
            for i, ((n, k), r) in enumerate(zip(shapes, ranks))]


def inputs(dtype, seed=0, hidden=HIDDEN):
    g = torch.Generator().manual_seed(200 + seed)
    return (torch.randn(2, 7, hidden, generator=g).to(DEV, dtype),
            torch.randn(2, 7, hidden, generator=g).to(DEV, dtype))


def run(x, projs, dy, act, p, seed, backend="triton", dtype=None):
    dtype = dtype or x.dtype
    xl = x.detach().to(dtype).clone().requires_grad_()
    pl = [cast(pr, dtype) for pr in projs]
    if dtype == torch.float64:
        masks = None
        if p > 0:
            masks = (lora_dropout_mask(seed, x.shape, p, x.device),
                     lora_dropout_mask(seed + 1, (*x.shape[:-1], pl[0].out_features), p, x.device))
        y = lora_mlp_ref(xl, *pl, act=act, dropout_p=p, masks=masks)
    else:
        y = lora_mlp(xl, *pl, act=act, dropout_p=p, backend=backend, seed=seed)
    return grads_of(y, xl, pl, [dy])


def check_all(x, projs, dy, act, p=0.0, seed=11, backend="triton"):
    ours = run(x, projs, dy, act, p, seed, backend)
    ref = run(x, projs, dy, act, p, seed, dtype=torch.float64)
    base = run(x, projs, dy, act, p, seed, backend="torch") if x.dtype != torch.float32 else ours
    assert ours.keys() == ref.keys()
    for name in ref:  # a DoRA magnitude's gradient has m's dtype (fp32: `with_dora`)
        assert ours[name].dtype == (torch.float32 if name.startswith("dm") else x.dtype), name
        check(ours[name], ref[name], base[name], name, dtype=x.dtype)
    return ours


CASES = [  # (act, dtype, ranks of gate/up/down, bias, quant, dropout p)
    ("silu", torch.float32, (3, 8, 3), False, None, 0.0),
    ("silu", torch.float32, (8, 0, 3), True, None, 0.25),
    ("gelu_tanh", torch.float32, (3, 3, 8), False, None, 0.1),
    ("silu", torch.float32, (3, 8, 8), True, ("nf4", True, 32), 0.0),
    ("gelu_tanh", torch.float32, (8, 3, 0), False, ("fp4", False, 64), 0.2),
    ("silu", torch.float16, (3, 8, 3), False, None, 0.25),
    ("gelu_tanh", torch.float16, (3, 8, 3), True, ("nf4", True, 64), 0.0),
]


@pytest.mark.parametrize("act,dtype,ranks,bias,quant,p", CASES)
def test_matches_fp64_reference(act, dtype, ranks, bias, quant, p):
    x, dy = inputs(dtype, seed=sum(ranks))
    check_all(x, make_mlp(ranks, dtype, bias, quant, seed=4), dy, act, p)


def test_torch_backend_same_masks():
    x, dy = inputs(torch.float32, seed=1)
    projs = make_mlp((3, 8, 3), bias=True, seed=6)
    ours = check_all(x, projs, dy, "silu", p=0.3)
    torch_path = check_all(x, projs, dy, "silu", p=0.3, backend="torch")
    for name in ours:
        assert rel_err(ours[name], torch_path[name].double()) <= FP32_TOL, name


def test_outputs_are_poisoned_then_written(monkeypatch):
    from test_lora_linear import poison
    monkeypatch.setattr(kernel_backend, "_empty", poison)  # every kernel output is allocated through it
    x, dy = inputs(torch.float32, seed=2)
    check_all(x, make_mlp((3, 8, 3), bias=True, quant=("nf4", True, 32)), dy, "gelu_tanh", p=0.2)


@pytest.mark.parametrize("p", [0.0, 0.25])
def test_in_loop_unpack(p):
    """hidden 64, intermediate 96: every 4-bit base is unpacked inside the K-loops (no buffer)."""
    x, dy = inputs(torch.float32, seed=3, hidden=64)
    check_all(x, make_mlp((3, 8, 3), bias=True, quant=("nf4", True, 32), hidden=64, inter=96), dy, "silu", p)


@pytest.mark.parametrize("act,dtype,quant,dora", [
    ("silu", torch.float32, None, (True, False, True)),
    ("gelu_tanh", torch.float32, ("nf4", True, 32), (False, True, False)),
    ("silu", torch.float16, ("nf4", True, 64), (True, True, True)),
])
def test_dora_projections_match_fp64_reference(act, dtype, quant, dora):
    """DoRA gate/up/down in every combination the backward treats apart (a DoRA gate or up
    keeps [g | u] for its dm; a DoRA down keeps the output): outputs and every gradient."""
    x, dy = inputs(dtype, seed=5)
    projs = [with_dora(p, i, keep_weight_sq=i != 1) if d else p
             for i, (p, d) in enumerate(zip(make_mlp((3, 8, 5), dtype, True, quant, seed=8), dora))]
    got = check_all(x, projs, dy, act)
    assert {f"dm{i}" for i, d in enumerate(dora) if d} <= got.keys()


def test_dora_saves_its_output_only_for_down():
    """DoRA adds the block's output [tokens, H] to what it saves when down is DoRA, nothing when
    only gate/up are (their outputs are recomputed in backward anyway)."""
    x, _ = inputs(torch.float32)
    x.requires_grad_()
    plain = [cast(p, torch.float32) for p in make_mlp((3, 8, 3))]
    gate_up = [cast(with_dora(p, i), torch.float32) if i < 2 else p for i, p in enumerate(plain)]
    down = plain[:2] + [cast(with_dora(plain[2], 2), torch.float32)]
    base = _saved_numel(lambda: lora_mlp(x, *plain, backend="triton"))
    assert _saved_numel(lambda: lora_mlp(x, *gate_up, backend="triton")) == base
    assert _saved_numel(lambda: lora_mlp(x, *down, backend="triton")) == base + x.numel()


def _saved_numel(fn) -> int:
    """Elements autograd keeps for backward while running fn (views of an input count fully)."""
    sizes = []

    def pack(t):
        sizes.append(t.numel())
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(sizes)


def test_saves_only_x_and_the_adapters_inputs():
    """The block keeps x, the adapters' inputs t ([tokens, Σr]) and, with dropout, the keep bits
    (1 bit per input element) for backward, not the [tokens, intermediate] activations HF keeps."""
    x, _ = inputs(torch.float32)
    x.requires_grad_()
    tokens = x.shape[0] * x.shape[1]
    projs = [cast(p, torch.float32) for p in make_mlp((3, 8, 3))]
    ours = _saved_numel(lambda: lora_mlp(x, *projs, backend="triton"))
    hf = _saved_numel(lambda: lora_mlp(x, *projs, backend="torch"))
    assert ours == x.numel() + tokens * (3 + 8 + 3)
    assert hf >= 4 * tokens * INTER
    with_dropout = _saved_numel(lambda: lora_mlp(x, *projs, dropout_p=0.1, seed=1, backend="triton"))
    assert with_dropout == ours + tokens * (-(-HIDDEN // 8) + -(-INTER // 8))


@pytest.mark.parametrize("family", ["llama", "gemma"])
def test_matches_hf_mlp_module(family):
    """TriloraMLP over HF's LlamaMLP (SwiGLU) / GemmaMLP (GeGLU-tanh) with LoRA on gate and
    down (up without adapter): the outputs and the gradients of x and the adapters."""
    torch.manual_seed(1)
    if family == "llama":
        hf = LlamaMLP(LlamaConfig(hidden_size=HIDDEN, intermediate_size=INTER, num_attention_heads=4, mlp_bias=True))
    else:
        hf = GemmaMLP(GemmaConfig(hidden_size=HIDDEN, intermediate_size=INTER, num_attention_heads=4, head_dim=12))
    hf.requires_grad_(False)
    for name, r in (("gate_proj", 3), ("down_proj", 8)):
        lora = LoraLinear(getattr(hf, name), r, 2 * r, backend="torch")
        nn.init.normal_(lora.lora_B["default"].weight, std=0.2)
        setattr(hf, name, lora)
    ours = TriloraMLP(hf, "silu" if family == "llama" else "gelu_tanh", backend="triton")
    x, dy = inputs(torch.float32, seed=5)
    params = [p for p in hf.parameters() if p.requires_grad]
    results = []
    for module in (hf, ours):
        xl = x.clone().requires_grad_()
        y = module(xl)
        results.append([y.detach(), *torch.autograd.grad(y, [xl, *params], dy)])
    for a, b in zip(*results):
        assert rel_err(b, a) <= FP32_TOL


def test_input_errors():
    x, _ = inputs(torch.float32)
    gate, up, down = make_mlp()
    with pytest.raises(ValueError, match="act"):
        lora_mlp(x, gate, up, down, act="relu", backend="triton")
    with pytest.raises(ValueError, match="down"):
        lora_mlp(x, gate, up, make_projection(HIDDEN, INTER + 1, 3), backend="triton")
    with pytest.raises(ValueError, match="down: a DoRA projection takes dropout_p = 0"):
        lora_mlp(x, gate, up, with_dora(down), dropout_p=0.1, backend="triton")
    with pytest.raises(ValueError, match="one out size"):
        lora_mlp(x, gate, make_projection(INTER + 2, HIDDEN, 3), down, backend="triton")


# ----------------------------------------------------------------------------- GPU only

@pytest.mark.gpu
@pytest.mark.skipif(DEV != "cuda", reason="bf16 kernels are only exact on a GPU")
@pytest.mark.parametrize("quant,dora,p", [(None, False, 0.1), (("nf4", True, 64), False, 0.0),
                                          (("nf4", True, 64), True, 0.0)])
def test_bf16_gpu(quant, dora, p):
    """bf16 at a size that takes the real tiles (M = 999, hidden 512, intermediate 1376): every
    output and gradient within 2 × torch-bf16's error against float64; DoRA on all three."""
    g = torch.Generator().manual_seed(32)
    hidden, inter = 512, 1376
    x = torch.randn(3, 333, hidden, generator=g).to(DEV, torch.bfloat16)
    dy = torch.randn(3, 333, hidden, generator=g).to(DEV, torch.bfloat16)
    projs = make_mlp((16, 16, 12), torch.bfloat16, False, quant, seed=50, hidden=hidden, inter=inter)
    if dora:
        projs = [with_dora(pr, i) for i, pr in enumerate(projs)]
    ours = run(x, projs, dy, "silu", p, 11)
    ref = run(x, projs, dy, "silu", p, 11, dtype=torch.float64)
    base = run(x, projs, dy, "silu", p, 11, backend="torch")
    for name in ref:
        check(ours[name], ref[name], base[name], name, dtype=torch.bfloat16)
