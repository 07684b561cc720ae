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
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)  # what every op computes in


# Every kernel output is allocated through `output` / `output_like`, which read `_empty` at call
# time, so tests can swap in NaN-filled buffers: an element a kernel forgets to write then fails.
_empty = torch.empty


def output(shape, dtype: torch.dtype, device) -> torch.Tensor:
    """An uninitialised contiguous output tensor."""
    return _empty(shape, dtype=dtype, device=device)


def output_like(t: torch.Tensor) -> torch.Tensor:
    """An uninitialised tensor of `t`'s shape and dtype laid out like `t` (its dimensions in
    `t`'s stride order, dense), as `torch.empty_like` lays it out."""
    order = sorted(range(t.dim()), key=lambda d: -t.stride(d))          # outermost first
    buf = output([t.shape[d] for d in order], t.dtype, t.device)
    return buf.permute(*sorted(range(t.dim()), key=order.index))


def rows_2d(t: torch.Tensor) -> torch.Tensor:
    """[..., N] → [rows, N] with unit column stride (a view when the strides allow it): the
    layout the row-wise kernels (RMSNorm, GLU) read."""
    t2 = t.reshape(-1, t.shape[-1])
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


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
    if any(t.is_meta for t in tensors):
        # shape-only tensors: the PyTorch reference propagates shapes, as plain torch layers do
        if backend == "triton":
            raise ValueError("backend='triton' cannot run on meta tensors (no data); "
                             "use backend='torch' or 'auto' for a shape-only pass")
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


def autocast_dtype(device_type: str) -> torch.dtype | None:
    """The dtype float inputs are cast to under torch.autocast on `device_type`, or None: every
    op casts its float operands to it first, as torch's own autocast-listed ops do."""
    if device_type == "meta":  # a shape-only pass: autocast has no meta device
        return None
    return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None


def check_same_device(**tensors: torch.Tensor | None) -> None:
    """Raise ValueError naming the tensors when they are not all on one device."""
    present = {k: t for k, t in tensors.items() if t is not None}
    devices = {t.device for t in present.values()}
    if len(devices) > 1:
        where = ", ".join(f"{k} on {t.device}" for k, t in present.items())
        raise ValueError(f"tensors must be on one device, got {where}")


def check_has_data(**tensors: torch.Tensor | None) -> None:
    """Raise ValueError naming the first tensor on the meta device: a shape-only placeholder
    (from `torch.device("meta")` or an empty-weights init) has no values to compute from."""
    for name, t in tensors.items():
        if t is not None and t.is_meta:
            raise ValueError(f"{name} is on the meta device (shape {tuple(t.shape)}, no data): "
                             "load or materialize the weights first (e.g. model.to_empty(device=...) "
                             "then load_state_dict)")


def arch_of(device: torch.device) -> int:
    """Compute capability ×10 of `device` (90 = H100/H200), or of the target Triton compiles for
    when there is no CUDA device (a stand-in driver for compile-only reports); 0 under the
    interpreter."""
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        return 10 * major + minor
    if interpreter_active() or not HAS_TRITON:
        return 0
    try:
        from triton.runtime import driver
        return int(driver.active.get_current_target().arch)
    except Exception:  # noqa: BLE001 - no driver at all: nothing will be compiled for a GPU
        return 0


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of `device`: 132 when compiling for a GPU without one (an H100),
    4 under the interpreter (which runs programs one after another: few, large ones are fastest)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 132 if arch_of(device) else 4
