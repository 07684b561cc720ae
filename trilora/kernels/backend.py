"""Which implementation runs an op: the Triton kernels or the plain-PyTorch reference.

"triton" runs the kernels on CUDA tensors, or on CPU tensors under Triton's interpreter
(`TRITON_INTERPRET=1`, set before triton is imported — that is how the kernels are tested
without a GPU). "torch" runs the reference. "auto" picks Triton wherever it can run.
"""
from __future__ import annotations

import os
import warnings

import torch

try:
    import triton  # noqa: F401
    import triton.language as tl  # noqa: F401

    HAS_TRITON = True
except ImportError:  # e.g. macOS / Windows wheels of torch without triton
    HAS_TRITON = False

BACKENDS = ("auto", "triton", "torch")


def interpreter_active() -> bool:
    """True when Triton kernels run on CPU tensors through the interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def resolve_backend(backend: str, *tensors: torch.Tensor) -> str:
    """Return "triton" or "torch" for `backend` and the device of `tensors`.

    Raises ValueError for an unknown backend name or for "triton" on tensors it cannot run
    on, instead of silently running something slower than asked for.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "torch":
        return "torch"
    on_cuda = all(t.is_cuda for t in tensors)
    runnable = HAS_TRITON and (on_cuda or interpreter_active())
    if backend == "triton":
        if not HAS_TRITON:
            raise ValueError("backend='triton' needs the triton package, which is not installed")
        if not runnable:
            raise ValueError(
                "backend='triton' needs CUDA tensors, or TRITON_INTERPRET=1 set before triton is "
                "imported to run the kernels on CPU tensors; use backend='torch' on CPU"
            )
        return "triton"
    if runnable:
        return "triton"
    if on_cuda:  # CUDA without triton: say so once rather than silently running slower code
        warnings.warn("triton is not installed: trilora runs its slower PyTorch reference ops",
                      RuntimeWarning, stacklevel=3)
    return "torch"


def check_same_device(**tensors: torch.Tensor | None) -> None:
    """Raise ValueError naming the tensors when they are not all on one device."""
    present = {k: t for k, t in tensors.items() if t is not None}
    devices = {t.device for t in present.values()}
    if len(devices) > 1:
        where = ", ".join(f"{k} on {t.device}" for k, t in present.items())
        raise ValueError(f"tensors must be on one device, got {where}")
