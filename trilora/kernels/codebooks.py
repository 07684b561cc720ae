"""Code tables of the bitsandbytes 4-bit and 8-bit formats, built from their definitions.

Every table here must equal bitsandbytes' bit for bit (tests compare them against the
installed package): a checkpoint quantized by bitsandbytes stores these tables and the codes
index into them.
"""
from __future__ import annotations

import functools

import torch

# NormalFloat4: quantiles of N(0, 1) rescaled to [-1, 1], sorted, index 7 exactly 0.
NF4_CODE = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)

# FP4 (e2m1-like): bit 3 is the sign, bits 0-2 index these magnitudes (divided by 12 so the
# largest is 1). bitsandbytes stores +0.0 (not -0.0) at index 8, so negative codes negate
# only the non-zero magnitudes.
_FP4_MAGNITUDES = (0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0)

QUANT_TYPES = ("nf4", "fp4")


@functools.lru_cache(maxsize=None)
def _code_4bit_cpu(quant_type: str) -> torch.Tensor:
    if quant_type == "nf4":
        return torch.tensor(NF4_CODE, dtype=torch.float32)
    if quant_type == "fp4":
        mags = torch.tensor(_FP4_MAGNITUDES, dtype=torch.float64) / 12.0
        negative = torch.cat([mags[:1], -mags[1:]])  # keep +0.0 at index 8, as bnb does
        return torch.cat([mags, negative]).float()
    raise ValueError(f"quant_type must be one of {QUANT_TYPES}, got {quant_type!r}")


@functools.lru_cache(maxsize=None)
def _dynamic_map_signed_cpu() -> torch.Tensor:
    # bitsandbytes' signed "dynamic" 8-bit map (Dettmers 2015): for decimal exponents
    # 10^-6 .. 10^0, 2^i evenly spaced mantissas in [0.1, 1] (bin centres), both signs,
    # plus 0 and 1. 254 + 2 = 256 sorted values. Used for the double-quantized absmax.
    values = []
    for i in range(7):
        edges = torch.linspace(0.1, 1, 2**i + 1, dtype=torch.float32)
        centres = (edges[:-1] + edges[1:]) / 2.0
        scale = 10 ** (i - 6)
        values += (scale * centres).tolist()
        values += (-scale * centres).tolist()
    values += [0.0, 1.0]
    return torch.tensor(sorted(values), dtype=torch.float32)


def _midpoints_and_order(code: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # Quantization picks the table entry nearest to x, ties to the lower one: the sorted
    # index is the number of midpoints strictly below x. The midpoints are rounded to fp32
    # exactly as bitsandbytes rounds them, so decisions match it bit for bit. A trailing
    # +inf pads the midpoints to the table size for the kernels' branchless binary search.
    order = torch.argsort(code, stable=True)
    ordered = code[order]
    mids = (ordered[:-1] + ordered[1:]) / 2
    mids = torch.cat([mids, torch.tensor([float("inf")])])
    return mids, order.to(torch.int32)


@functools.lru_cache(maxsize=None)
def _cached(kind: str, quant_type: str | None, device: torch.device):
    if kind == "code4":
        return _code_4bit_cpu(quant_type).to(device)
    if kind == "dyn8":
        return _dynamic_map_signed_cpu().to(device)
    if kind == "mid4":
        return tuple(t.to(device) for t in _midpoints_and_order(_code_4bit_cpu(quant_type)))
    if kind == "mid8":
        return tuple(t.to(device) for t in _midpoints_and_order(_dynamic_map_signed_cpu()))
    raise AssertionError(kind)


def code_4bit(quant_type: str, device: torch.device | str = "cpu") -> torch.Tensor:
    """The 16-entry fp32 table of `quant_type` ("nf4" or "fp4"), indexed by 4-bit code."""
    return _cached("code4", quant_type, torch.device(device))


def dynamic_map_signed(device: torch.device | str = "cpu") -> torch.Tensor:
    """bitsandbytes' signed dynamic 8-bit map: 256 sorted fp32 values in [-0.99297, 1]."""
    return _cached("dyn8", None, torch.device(device))


def quantize_bounds_4bit(quant_type: str, device: torch.device | str = "cpu"):
    """(midpoints fp32 [16] with +inf last, order int32 [16]) for 4-bit quantization.

    The sorted position of x is the count of midpoints < x; `order[pos]` is its 4-bit code.
    """
    return _cached("mid4", quant_type, torch.device(device))


def quantize_bounds_8bit(device: torch.device | str = "cpu"):
    """(midpoints fp32 [256] with +inf last, order int32 [256]) of the signed dynamic map."""
    return _cached("mid8", None, torch.device(device))
