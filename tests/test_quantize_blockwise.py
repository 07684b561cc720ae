"""Blockwise 4-bit quantization (`trilora.kernels.quantize_blockwise`, through quantize_4bit)
against bitsandbytes (the byte-exact oracle), and Triton against torch."""
import pytest
import torch
from _bnb import bnb_dequantize, bnb_quantize, nearest_code_ties_low
from hypothesis import given, settings
from hypothesis import strategies as st

from trilora.kernels.codebooks import dynamic_map_signed
from trilora.quant import BLOCKSIZES, dequantize_4bit, quantize_4bit

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SHAPES = [(33, 67), (1, 5), (4097, 3), (64, 128), (7,), (3, 5, 11)]


def _randn(shape, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * 0.05).to(dtype)


def _check_nested_codes(state, absmax_fp32):
    """Nested codes equal the CUDA rule (nearest code, ties low) on bnb's scaled values."""
    code = dynamic_map_signed()
    v = absmax_fp32 - state.offset
    nb = state.nested_blocksize
    for b in range(state.nested_absmax.numel()):
        blk = v[b * nb:(b + 1) * nb]
        am = state.nested_absmax[b]
        assert am == blk.abs().max()
        if am == 0:  # every code decodes to the offset then; any code is right
            continue
        scaled = (blk * (1.0 / am)).clamp(-1, 1)
        assert torch.equal(state.absmax[b * nb:(b + 1) * nb].long(), nearest_code_ties_low(scaled, code))


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_bytes_and_absmax_equal_bnb(shape, dtype, quant_type, backend):
    w = _randn(shape, dtype, seed=37 + len(shape) + shape[0])
    packed, state = quantize_4bit(w, quant_type, 64, double_quant=False, backend=backend)
    ref_packed, ref_state = bnb_quantize(w, quant_type, 64, False)
    assert packed.dtype == torch.uint8 and packed.shape == ((w.numel() + 1) // 2, 1)
    assert torch.equal(packed, ref_packed)
    assert state.absmax.dtype == torch.float32
    assert torch.equal(state.absmax, ref_state.absmax)
    assert state.shape == w.shape and state.dtype == dtype


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("blocksize", BLOCKSIZES)
def test_every_blocksize_double_quant(blocksize, backend):
    w = _randn((37, 300), torch.float16, seed=blocksize)
    packed, state = quantize_4bit(w, "nf4", blocksize, double_quant=True, backend=backend)
    ref_packed, ref_state = bnb_quantize(w, "nf4", blocksize, True)
    assert torch.equal(packed, ref_packed)  # 4-bit bytes do not depend on double quant
    assert state.nested and state.absmax.dtype == torch.uint8
    assert torch.equal(state.nested_absmax, ref_state.state2.absmax)
    assert state.offset.item() == ref_state.offset.item()
    # bnb's CPU nested step takes a lookup-table shortcut: allow one code of difference there,
    # and hold ours exactly to the CUDA rule
    assert (state.absmax.int() - ref_state.absmax.int()).abs().max() <= 1 or state.nblocks == 1
    _, plain = quantize_4bit(w, "nf4", blocksize, double_quant=False, backend="torch")
    _check_nested_codes(state, plain.absmax)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_triton_equals_torch_bit_for_bit(quant_type, dtype):
    w = _randn((129, 77), dtype, seed=7) * 20
    a_packed, a = quantize_4bit(w, quant_type, 128, True, backend="triton")
    b_packed, b = quantize_4bit(w, quant_type, 128, True, backend="torch")
    assert torch.equal(a_packed, b_packed)
    for name in ("absmax", "nested_absmax", "offset", "code", "nested_code"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name


def test_zero_blocks_and_exact_table_values():
    # whole zero blocks, exact +-absmax, values on the table entries
    w = torch.zeros(4, 64)
    w[1] = torch.linspace(-1, 1, 64)
    w[2, ::2] = 3.0
    w[3] = -2.5
    for backend in ("torch", "triton"):
        for qt in ("nf4", "fp4"):
            packed, state = quantize_4bit(w, qt, 64, False, backend=backend)
            ref_packed, ref_state = bnb_quantize(w, qt, 64, False)
            assert torch.equal(packed, ref_packed), (backend, qt)
            assert torch.equal(state.absmax, ref_state.absmax)
            assert torch.equal(dequantize_4bit(packed, state, backend=backend)[0], w[0])


def test_odd_tail_nibble_is_code_of_zero():
    packed, _ = quantize_4bit(torch.tensor([1.0, -1.0, 0.5]), "nf4", 64, False)
    assert packed.view(-1).tolist() == [0xF0, 0xC7]
    packed, _ = quantize_4bit(torch.tensor([1.0, -1.0, 0.5]), "fp4", 64, False)
    assert packed.view(-1)[1].item() & 0xF == 0x0


def test_round_trip_error_matches_bnb():
    w = torch.randn(512, 512, generator=torch.Generator().manual_seed(0))
    packed, state = quantize_4bit(w, "nf4", 64, True)
    err = (dequantize_4bit(packed, state) - w).abs().mean().item()
    ref_packed, ref_state = bnb_quantize(w, "nf4", 64, True)
    ref_err = (bnb_dequantize(ref_packed, ref_state) - w).abs().mean().item()
    # the error of nearest-code rounding, computed here in float64 from the NF4 table (the
    # double-quantized absmax moves it a little)
    from trilora.kernels.codebooks import code_4bit
    blocks = w.double().reshape(-1, 64)
    absmax = blocks.abs().amax(1, keepdim=True)
    table = code_4bit("nf4", torch.device("cpu")).double()
    nearest = table[(blocks / absmax).unsqueeze(-1).sub(table).abs().argmin(-1)] * absmax
    assert abs(err - (nearest - blocks).abs().mean().item()) < 1e-3
    assert abs(err - ref_err) < 1e-4


@settings(max_examples=30, deadline=None)
@given(rows=st.integers(1, 40), cols=st.integers(1, 70), blocksize=st.sampled_from(BLOCKSIZES),
       quant_type=st.sampled_from(["nf4", "fp4"]), double_quant=st.booleans(),
       dtype=st.sampled_from(DTYPES), scale=st.floats(1e-3, 1e3), seed=st.integers(0, 2**16))
def test_property_random_shapes(rows, cols, blocksize, quant_type, double_quant, dtype, scale, seed):
    w = (torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed)) * scale).to(dtype)
    packed, state = quantize_4bit(w, quant_type, blocksize, double_quant, backend="triton")
    ref_packed, ref_state = bnb_quantize(w, quant_type, blocksize, double_quant)
    assert torch.equal(packed, ref_packed)
    if double_quant:
        assert torch.equal(state.nested_absmax, ref_state.state2.absmax)
    else:
        assert torch.equal(state.absmax, ref_state.absmax)
    t_packed, t_state = quantize_4bit(w, quant_type, blocksize, double_quant, backend="torch")
    assert torch.equal(packed, t_packed) and torch.equal(state.absmax, t_state.absmax)
    # dequantized values: same as bnb's wherever the absmax codes agree
    out = dequantize_4bit(packed, state, backend="torch")
    assert torch.isfinite(out).all() and out.shape == w.shape and out.dtype == dtype
    if not double_quant:
        assert torch.equal(out, bnb_dequantize(ref_packed, ref_state))
