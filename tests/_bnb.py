"""bitsandbytes as the oracle for the 4-bit format (CPU, bitsandbytes >= 0.50)."""
import warnings

import torch

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    import bitsandbytes as bnb  # noqa: F401
    import bitsandbytes.functional as bnbF
    from bitsandbytes.backends.default.ops import _dequantize_4bit_compute

from packaging.version import Version

assert Version(bnb.__version__) >= Version("0.50"), "tests need bitsandbytes >= 0.50"


def bnb_quantize(w, quant_type, blocksize, double_quant):
    return bnbF.quantize_4bit(w, blocksize=blocksize, quant_type=quant_type,
                              compress_statistics=double_quant)


def bnb_dequantize(packed, state):
    """bnb's dequantize with its device-independent (CUDA-semantics) 4-bit step.

    bitsandbytes 0.50's native CPU kernel decodes FP4 with a wrong table (values up to 1.75x
    the absmax; NF4 is right), so the 4-bit step uses bnb's default PyTorch implementation.
    The nested absmax is restored by bnb itself.
    """
    absmax = state.absmax
    if state.nested:
        absmax = bnbF.dequantize_blockwise(state.absmax, state.state2) + state.offset
    out = _dequantize_4bit_compute(packed.view(-1), absmax.float(), state.code, state.blocksize,
                                   state.shape, state.dtype)
    return out.reshape(state.shape)


def nearest_code_ties_low(values: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    """Independent oracle for bnb's CUDA 8-bit rule: nearest table entry, ties to the lower index."""
    dist = (values.double()[:, None] - code.double()[None, :]).abs()
    return dist.argmin(dim=1)  # argmin returns the first (lowest) index among equals
