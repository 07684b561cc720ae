"""dequantize_4bit against bitsandbytes, Triton (one launch, nested absmax inside) against torch."""
import pytest
import torch
from _bnb import bnb_dequantize, bnb_quantize

from trilora.kernels.codebooks import code_4bit
from trilora.kernels.dequantize_4bit import dequantize_4bit_triton
from trilora.quant import BLOCKSIZES, QuantState, dequantize_4bit

SHAPES = [(33, 67), (1, 5), (4097, 3), (3, 5, 11), (256, 64)]


def _bnb_state_as_ours(state) -> QuantState:
    nested = state.nested
    return QuantState(
        absmax=state.absmax, shape=state.shape, dtype=state.dtype, blocksize=state.blocksize,
        quant_type=state.quant_type, code=state.code,
        nested_absmax=state.state2.absmax if nested else None,
        nested_code=state.state2.code if nested else None,
        offset=state.offset if nested else None)


def _weights(shape, dtype, seed):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES)
def test_dequantize_bnb_states_equals_bnb(shape, dtype, quant_type, double_quant, backend):
    """A state quantized by bitsandbytes decodes to bitsandbytes' values exactly."""
    w = _weights(shape, dtype, seed=len(shape) * 1000 + shape[0])
    packed, state = bnb_quantize(w, quant_type, 64, double_quant)
    out = dequantize_4bit(packed, _bnb_state_as_ours(state), backend=backend)
    ref = bnb_dequantize(packed, state)
    assert out.shape == w.shape and out.dtype == dtype
    if backend == "triton" and dtype == torch.bfloat16:
        # the interpreter rounds fp32 -> bf16 stores toward zero (a GPU rounds to nearest):
        # at most one bf16 ulp here; exact on the GPU (test_gpu_bf16_exact)
        ulp = ref.float().abs() * 2.0**-7
        assert ((out.float() - ref.float()).abs() <= ulp).all()
    else:
        assert torch.equal(out, ref)


@pytest.mark.parametrize("blocksize", BLOCKSIZES)
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.float16])
def test_triton_equals_torch_bit_for_bit(blocksize, out_dtype):
    w = _weights((37, 300), torch.float32, seed=blocksize)
    packed, state = bnb_quantize(w, "nf4", blocksize, True)
    ours = _bnb_state_as_ours(state)
    a = dequantize_4bit(packed, ours, dtype=out_dtype, backend="triton")
    b = dequantize_4bit(packed, ours, dtype=out_dtype, backend="torch")
    assert torch.equal(a, b)


@pytest.mark.parametrize("nested", [False, True])
def test_kernel_writes_every_element(nested):
    """Poisoned output: the single launch must overwrite all n elements, and no more."""
    w = _weights((5, 77), torch.float32, seed=3)
    packed, state = bnb_quantize(w, "fp4", 32, nested)
    n = w.numel()
    out = torch.full((n + 9,), float("nan"))
    extra = dict(nested_absmax=state.state2.absmax, nested_code=state.state2.code,
                 offset=state.offset) if nested else {}
    absmax = state.absmax if nested else state.absmax.float()
    dequantize_4bit_triton(packed, absmax, code_4bit("fp4"), 32, n, torch.float32, out=out, **extra)
    assert torch.isfinite(out[:n]).all()
    assert torch.isnan(out[n:]).all()
    assert torch.equal(out[:n].view(w.shape), bnb_dequantize(packed, state))


def test_dtype_override():
    w = _weights((16, 64), torch.bfloat16, seed=1)
    packed, state = bnb_quantize(w, "nf4", 64, True)
    out = dequantize_4bit(packed, _bnb_state_as_ours(state), dtype=torch.float32)
    assert out.dtype == torch.float32
    assert torch.equal(out.to(torch.bfloat16), bnb_dequantize(packed, state))


@pytest.mark.gpu
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("shape", [(4096, 4096), (33, 67), (14336, 4096)])
def test_gpu_bf16_exact(quant_type, shape):
    """On CUDA: Triton quantize/dequantize equal the torch reference bit for bit in bf16."""
    from trilora.quant import quantize_4bit
    w = torch.randn(shape, device="cuda").to(torch.bfloat16)
    packed, state = quantize_4bit(w, quant_type, 64, True, backend="triton")
    ref_packed, ref_state = quantize_4bit(w, quant_type, 64, True, backend="torch")
    assert torch.equal(packed, ref_packed)
    assert torch.equal(state.nested_absmax, ref_state.nested_absmax)
    out = dequantize_4bit(packed, state, backend="triton")
    ref = dequantize_4bit(packed, state, backend="torch")
    assert torch.equal(out, ref)
    cpu_packed, _ = quantize_4bit(w.cpu(), quant_type, 64, True, backend="torch")
    assert torch.equal(packed.cpu(), cpu_packed)
