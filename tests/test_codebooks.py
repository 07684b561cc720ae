"""Our code tables, built from their definitions, equal bitsandbytes' bit for bit."""
import pytest
import torch
from _bnb import bnbF

from trilora.kernels.codebooks import code_4bit, dynamic_map_signed, quantize_bounds_4bit


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_4bit_tables_equal_bnb(quant_type):
    ours = code_4bit(quant_type)
    theirs = bnbF.get_4bit_type(quant_type, device="cpu")
    assert ours.dtype == torch.float32
    assert torch.equal(ours.view(torch.int32), theirs.view(torch.int32))  # sign of zero too


def test_dynamic_map_equals_bnb():
    ours, theirs = dynamic_map_signed(), bnbF.create_dynamic_map(signed=True)
    assert torch.equal(ours.view(torch.int32), theirs.view(torch.int32))
    assert ours.numel() == 256 and torch.all(ours[1:] > ours[:-1])


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_bounds_pick_the_nearest_code(quant_type):
    mids, order = quantize_bounds_4bit(quant_type)
    code = code_4bit(quant_type)
    x = torch.linspace(-1, 1, 2001)
    picked = code[order.long()[torch.bucketize(x, mids[:-1])]]
    nearest = (x[:, None] - code[None, :]).abs().min(dim=1).values
    assert torch.allclose((x - picked).abs(), nearest, atol=1e-7)
    assert torch.isinf(mids[-1])


def test_unknown_quant_type():
    with pytest.raises(ValueError, match="quant_type"):
        code_4bit("int4")
