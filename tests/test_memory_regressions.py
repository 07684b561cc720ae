"""What the torch (CPU reference) path keeps alive for backward: the memory fixes, held.

Autograd's saved tensors are what a training step holds from forward to backward, so these
tests read them directly (`saved_tensors_hooks`) instead of timing or measuring RSS. The
side-by-side RSS figures against HF + PEFT are `bench/bench_cpu_memory.py`'s.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from trilora.kernels.lora import lora_dropout_mask, lora_linear_ref
from trilora.kernels.lora.linear import dequantize_base_ref, linear_4bit_ref
from trilora.lora.layer import LoraLinear
from trilora.quant import Linear4bit

IN, OUT, R = 96, 160, 8  # odd-ish sizes; the dense weight (OUT·IN) matches no activation's numel


def saved_by(fn):
    """(fn's result, [(shape, dtype, numel, data_ptr)] of every distinct tensor autograd saved)."""
    seen = {}

    def pack(t):
        seen.setdefault((t.untyped_storage().data_ptr(), tuple(t.shape)),
                        (tuple(t.shape), t.dtype, t.numel(), t.untyped_storage().data_ptr()))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, list(seen.values())


def _dense_sized(saved):
    return [s for s in saved if s[1].is_floating_point and s[2] == OUT * IN]


def _quantized(bias=False, compute_dtype=None):
    torch.manual_seed(0)
    return Linear4bit.from_linear(nn.Linear(IN, OUT, bias=bias), compute_dtype=compute_dtype, backend="torch")


def test_lora_over_4bit_base_saves_no_dense_weight():
    # before the fix, every layer's dequantized [out, in] weight was saved for dX = dY·W
    layer = LoraLinear(_quantized(), R, 16, backend="torch")
    x = torch.randn(2, 5, IN, requires_grad=True)
    y, saved = saved_by(lambda: layer(x))
    assert _dense_sized(saved) == [], saved
    assert any(s[1] == torch.uint8 for s in saved)  # the packed weight stands in for it
    y.sum().backward()  # and the backward, which dequantizes again, still runs
    assert x.grad is not None and layer.lora_A["default"].weight.grad is not None


def test_plain_linear4bit_saves_no_dense_weight():
    layer = _quantized(bias=True)
    x = torch.randn(7, IN, requires_grad=True)
    _, saved = saved_by(lambda: layer(x))
    assert _dense_sized(saved) == [], saved


def test_recomputed_4bit_gradients_are_autograds_bits():
    # the recomputing Function must give exactly what autograd through the dense weight gave
    layer = _quantized(bias=True)
    for shape in ((3, 11, IN), (13, IN)):
        x0, gy = torch.randn(*shape), torch.randn(*shape[:-1], OUT)
        got, want = [], []
        for out, fn in ((got, lambda x, b: linear_4bit_ref(x, layer.weight, layer.quant_state, b)),
                        (want, lambda x, b: F.linear(x, dequantize_base_ref(layer.weight, layer.quant_state,
                                                                            x.dtype), b))):
            x = x0.clone().requires_grad_()
            b = layer.bias.detach().clone().requires_grad_()
            y = fn(x, b)
            y.backward(gy)
            out += [y.detach(), x.grad, b.grad]
        for g, w in zip(got, want):
            assert torch.equal(g, w)


def test_bf16_input_is_saved_as_is_not_as_fp32_copy():
    # adapters are fp32 (PEFT's default); the layer casts them down rather than x up
    torch.manual_seed(0)
    for base in (nn.Linear(IN, OUT, bias=False).to(torch.bfloat16), _quantized(compute_dtype=torch.bfloat16)):
        layer = LoraLinear(base, R, 16, backend="torch")
        x = torch.randn(4, 6, IN, dtype=torch.bfloat16, requires_grad=True)
        _, saved = saved_by(lambda layer=layer, x=x: layer(x))
        big = [s for s in saved if s[2] >= x.numel()]
        assert all(s[1] == torch.bfloat16 for s in big if s[1].is_floating_point), saved
        assert x.untyped_storage().data_ptr() in {s[3] for s in saved}  # x itself, no copy
        assert _dense_sized(saved) == [] or isinstance(base, nn.Linear)


def test_dropout_mask_is_saved_as_bool():
    # before: x * mask.to(x.dtype) saved a float copy of the mask beside the dropped x
    torch.manual_seed(0)
    x = torch.randn(6, IN, requires_grad=True)
    w, a, b = torch.randn(OUT, IN), torch.randn(R, IN, requires_grad=True), torch.randn(OUT, R, requires_grad=True)
    mask = lora_dropout_mask(7, x.shape, 0.25, x.device)
    _, saved = saved_by(lambda: lora_linear_ref(x, w, a, b, 2.0, None, 0.25, None, mask))
    x_sized = [s for s in saved if s[2] == x.numel()]
    assert sorted(str(s[1]) for s in x_sized) == ["torch.bool", "torch.float32"], saved
