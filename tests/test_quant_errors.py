"""Bad input to quantize_4bit / dequantize_4bit: a clear error that names the problem."""
import dataclasses

import pytest
import torch

from trilora.quant import dequantize_4bit, quantize_4bit


@pytest.fixture
def quantized():
    w = torch.randn(20, 30)
    return quantize_4bit(w, "nf4", 64, True)


@pytest.mark.parametrize("w, err, match", [
    (torch.arange(10), TypeError, "float32, float16 or bfloat16"),
    (torch.randn(4, 4, dtype=torch.float64), TypeError, "float64"),
    (torch.empty(0, 8), ValueError, "empty"),
    (torch.tensor([1.0, float("nan"), 2.0]), ValueError, "NaN/Inf"),
    (torch.tensor([1.0, float("inf")]), ValueError, "NaN/Inf"),
    ([1.0, 2.0], TypeError, "torch.Tensor"),
])
def test_quantize_rejects_bad_weights(w, err, match):
    with pytest.raises(err, match=match):
        quantize_4bit(w)


@pytest.mark.parametrize("kwargs, match", [
    (dict(blocksize=48), "blocksize"),
    (dict(blocksize=8192), "blocksize"),
    (dict(quant_type="int4"), "quant_type"),
    (dict(backend="cuda"), "backend"),
])
def test_quantize_rejects_bad_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        quantize_4bit(torch.randn(8, 8), **kwargs)


def test_triton_backend_without_cuda_or_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="CUDA tensors"):
        quantize_4bit(torch.randn(8, 8), backend="triton")


def test_state_from_another_tensor(quantized):
    _, other = quantize_4bit(torch.randn(21, 30))
    packed, _ = quantized
    with pytest.raises(ValueError, match="another tensor"):
        dequantize_4bit(packed, other)


@pytest.mark.parametrize("change, match", [
    (dict(quant_type="fp8"), "quant_type"),
    (dict(blocksize=100), "blocksize"),
    (dict(absmax=torch.zeros(3, dtype=torch.uint8)), "absmax"),
    (dict(nested_absmax=torch.ones(5)), "nested_absmax"),
    (dict(absmax=torch.ones(10)), "uint8 absmax"),
    (dict(code=torch.zeros(8)), "16 entries"),
    (dict(dtype=torch.int8), "dtype"),
])
def test_inconsistent_state(quantized, change, match):
    packed, state = quantized
    with pytest.raises(ValueError, match=match):
        dequantize_4bit(packed, dataclasses.replace(state, **change))


def test_packed_must_be_uint8(quantized):
    packed, state = quantized
    with pytest.raises(TypeError, match="uint8"):
        dequantize_4bit(packed.to(torch.int16), state)


def test_state_type(quantized):
    packed, _ = quantized
    with pytest.raises(TypeError, match="QuantState"):
        dequantize_4bit(packed, {"absmax": None})


def test_output_dtype(quantized):
    packed, state = quantized
    with pytest.raises(TypeError, match="dtype"):
        dequantize_4bit(packed, state, dtype=torch.int32)


def test_device_mismatch(quantized):
    packed, state = quantized
    with pytest.raises(ValueError, match="one device"):
        dequantize_4bit(packed.to("meta"), state, backend="torch")
