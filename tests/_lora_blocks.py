"""Shared by the LoRA block tests (test_lora_qkv.py, test_lora_mlp.py): random projections and
the float64 view of them the references run on."""
from __future__ import annotations

import math

import torch

from trilora.kernels.lora import Projection
from trilora.quant import dequantize_4bit, quantize_4bit

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def make_projection(n: int, k: int, r: int, dtype=torch.float32, bias: bool = False, quant=None,
                    seed: int = 0, scaling: float = 1.7) -> Projection:
    """A random [n, k] projection with a rank-r adapter (r = 0: none); quant = (type, double, blocksize)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) / math.sqrt(k)
    qs = None
    if quant is None:
        w = w.to(DEV, dtype)
    else:
        w, qs = quantize_4bit(w.to(DEV), quant[0], quant[2], quant[1], backend="torch")
    lora_a = (torch.randn(r, k, generator=g) / math.sqrt(k)).to(DEV, dtype) if r else None
    lora_b = (torch.randn(n, r, generator=g) / math.sqrt(r)).to(DEV, dtype) if r else None
    b = torch.randn(n, generator=g).to(DEV, dtype) if bias else None
    return Projection(w, qs, lora_a, lora_b, scaling, b)


def dense_weight(proj: Projection, dtype: torch.dtype) -> torch.Tensor:
    if proj.quant_state is None:
        return proj.weight.to(dtype)
    return dequantize_4bit(proj.weight, proj.quant_state, torch.float32, backend="torch").to(dtype)


def cast(proj: Projection, dtype: torch.dtype, grad: bool = True) -> Projection:
    """The projection with every float tensor a fresh leaf in `dtype` (4-bit bases dequantized
    when dtype is float64: the reference sees the numbers the kernels use)."""
    def leaf(t):
        return None if t is None else t.detach().to(dtype).clone().requires_grad_(grad)
    if dtype == torch.float64 or proj.quant_state is None:
        weight, qs = dense_weight(proj, dtype), None
    else:
        weight, qs = proj.weight, proj.quant_state
    return Projection(weight, qs, leaf(proj.lora_A), leaf(proj.lora_B), proj.scaling, leaf(proj.bias),
                      leaf(proj.magnitude) if proj.magnitude is None or dtype == torch.float64 else
                      proj.magnitude.detach().clone().requires_grad_(grad),  # m keeps its dtype (fp32)
                      proj.weight_sq)


def with_dora(proj: Projection, seed: int = 0, keep_weight_sq: bool = True) -> Projection:
    """`proj` with a DoRA magnitude m = ‖W + s·BA‖ · U(1, 1.3) per row (fp32, so the rescale
    m/n is not 1) and, when `keep_weight_sq`, its base's ‖W‖² as a layer keeps it."""
    from trilora.kernels.lora.dora_math import base_sq_norm, dora_weight_norm
    g = torch.Generator().manual_seed(500 + seed)
    w = dense_weight(proj, torch.float32)
    norm = dora_weight_norm(w, proj.lora_A.float(), proj.lora_B.float(), proj.scaling)
    m = (norm.cpu() * (1 + 0.3 * torch.rand(norm.shape, generator=g))).to(DEV)
    sq = base_sq_norm(proj.weight, proj.quant_state) if keep_weight_sq else None
    return Projection(proj.weight, proj.quant_state, proj.lora_A, proj.lora_B, proj.scaling, proj.bias, m, sq)


def grads_of(outs, x: torch.Tensor, projs, dys) -> dict:
    """{name: tensor} of the outputs and the gradients of x and every adapter/bias tensor."""
    names, inputs = ["dx"], [x]
    for i, p in enumerate(projs):
        for what, t in zip(("dA", "dB", "dbias", "dm"), p.trainables()):
            if t is not None and t.requires_grad:
                names.append(f"{what}{i}")
                inputs.append(t)
    outs = outs if isinstance(outs, tuple) else (outs,)
    got = torch.autograd.grad(outs, inputs, [dy.to(o.dtype) for dy, o in zip(dys, outs)])
    result = {f"y{i}": o.detach() for i, o in enumerate(outs)}
    result.update(zip(names, got))
    return result
