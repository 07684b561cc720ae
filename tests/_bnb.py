"""bitsandbytes as the oracle for the 4-bit format (CPU, bitsandbytes >= 0.50)."""
import warnings

import torch

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    import bitsandbytes as bnb  # noqa: F401
    import bitsandbytes.functional as bnbF
    import bitsandbytes.nn.modules as bnb_modules
    from bitsandbytes.backends.default.ops import _dequantize_4bit_compute
    from bitsandbytes.backends.utils import _get_4bit_code

from packaging.version import Version

assert Version(bnb.__version__) >= Version("0.50"), "tests need bitsandbytes >= 0.50"


def _portable_dequantize_4bit(A, absmax, blocksize, quant_type, shape, dtype):
    """bnb's own default (device-independent, CUDA-semantics) `dequantize_4bit` kernel."""
    code = _get_4bit_code(quant_type, A.device)
    return _dequantize_4bit_compute(A.view(torch.uint8).reshape(-1), absmax, code, blocksize, shape, dtype)


def use_portable_cpu_kernels() -> None:
    """Make bitsandbytes' modules (PEFT and transformers over bnb: the tests' references) run
    bnb's portable 4-bit code on every CPU, so a reference does not depend on the machine.

    bitsandbytes 0.50's native CPU `dequantize_4bit` decodes FP4 with a wrong table (see
    `bnb_dequantize`) and, on AVX512 CPUs, NF4 blocks that span two weight rows wrongly
    (in_features % blocksize != 0, as in the tiny test models: in 96, blocks of 64; errors up
    to 2.0); and `Linear4bit`'s eval forward on AVX512-BF16 CPUs repacks the weight into a
    layout that raises on such rows ("shape '[64, 1]' is invalid") and computes in bf16.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Overriding a previously registered kernel": that is the point
        torch.library.register_kernel("bitsandbytes::dequantize_4bit", "cpu", _portable_dequantize_4bit)
    bnb_modules.has_avx512bf16 = lambda: False  # read by each Linear4bit as it is built


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
