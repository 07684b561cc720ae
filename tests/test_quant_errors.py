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


@pytest.mark.parametrize("blocksize", [64.0, True, "64", None])
def test_blocksize_must_be_an_int(blocksize):
    """64.0 == 64, so a membership test alone let a float through to fail inside torch.pad."""
    with pytest.raises(ValueError, match=rf"blocksize must be one of .* got {blocksize!r}"):
        quantize_4bit(torch.randn(8, 8), blocksize=blocksize)


def test_meta_tensors_get_a_clear_error():
    with pytest.raises(ValueError, match=r"w is on the meta device \(shape \(8, 16\), no data\)"):
        quantize_4bit(torch.empty(8, 16, device="meta"))
    from trilora.quant import quantize_model
    with torch.device("meta"):
        model = torch.nn.Sequential(torch.nn.Linear(16, 8))
    with pytest.raises(ValueError, match=r"0\.weight is on the meta device"):
        quantize_model(model)


@pytest.mark.parametrize("field, double_quant", [("absmax", False), ("nested_absmax", True),
                                                 ("offset", True), ("code", False)])
def test_non_finite_quant_state_is_refused(field, double_quant):
    from trilora.quant import QuantState
    packed, state = quantize_4bit(torch.randn(20, 30), "nf4", 64, double_quant)
    poisoned = getattr(state, field).clone()
    poisoned.view(-1)[0] = float("nan")
    with pytest.raises(ValueError, match=rf"quant state {field} holds 1 NaN/Inf"):
        dataclasses.replace(state, **{field: poisoned})
    # and through bitsandbytes' serialized form
    tensors = dataclasses.replace(state).to_bnb_dict()
    key = {"absmax": "absmax", "nested_absmax": "nested_absmax", "code": "quant_map"}.get(field)
    if key is not None:
        tensors[key] = poisoned
        with pytest.raises(ValueError, match=f"quant state {field} holds"):
            QuantState.from_bnb_dict(tensors)
