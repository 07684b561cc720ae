"""Compile Triton kernels for an NVIDIA GPU on a machine that has none, through the real launchers.

Triton's JIT binds a launch's arguments, specializes them (pointers 16-byte aligned, integers
divisible by 16 or equal to 1 become compile-time facts) and compiles for the current driver's
target. With a stand-in driver that reports a CUDA target, every launcher of the project can
be called on CPU tensors: the JIT compiles exactly what a GPU launch of the same shapes would
run, and `record_compiles` keeps each compiled kernel instead of launching it.

Compiling a kernel and then compiling it for another architecture in the same process reuses
the first target (the JIT caches its binder per device), so use one process per architecture.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field

import torch


@dataclass
class Compiled:
    """One compiled kernel variant, and where it came from."""
    kernel_name: str
    scenario: str              # the launcher call that compiled it
    constexprs: dict           # the launch's meta-parameters (block sizes, flags)
    none_args: list            # arguments passed as None (optional pointers: a compile-time fact)
    kernel: object             # triton's CompiledKernel: .asm (ttgir, ptx, cubin), .metadata
    grid: tuple | None = None  # the launch grid, when it is a tuple
    seen_in: list = field(default_factory=list)


class _StandInDriver:
    """What Triton's JIT asks of a driver before launching: a target, a device, a stream."""

    def __init__(self, arch: int):
        from triton.backends.compiler import GPUTarget
        self.target = GPUTarget("cuda", arch, 32)

    def get_current_target(self):
        return self.target

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_active_torch_device(self):
        return torch.device("cpu")

    def is_active(self):
        return True


@contextlib.contextmanager
def record_compiles(arch: int):
    """Within the block, every Triton launch compiles for sm_`arch` and is recorded, never run.

    Yields (records, set_scenario): a list that fills with `Compiled` (one per distinct
    compiled variant) and a function that names the scenario of the launches that follow.
    """
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("unset TRITON_INTERPRET: the interpreter never compiles")
    from triton.runtime import driver
    from triton.runtime.jit import JITFunction

    records: list[Compiled] = []
    by_hash: dict = {}
    scenario = [""]
    original_run = JITFunction.run

    def run(self, *args, grid, warmup, **kwargs):
        kernel = original_run(self, *args, grid=grid, warmup=True, **kwargs)
        key = (self.fn.__name__, kernel.hash)
        if key in by_hash:
            by_hash[key].seen_in.append(scenario[0])
        else:
            consts = {k: v for k, v in kwargs.items() if k in self.arg_names}
            given = dict(zip(self.arg_names, args), **kwargs)
            rec = Compiled(self.fn.__name__, scenario[0], consts, [k for k, v in given.items() if v is None], kernel,
                           tuple(grid) if isinstance(grid, (tuple, list)) else None)
            by_hash[key] = rec
            records.append(rec)
        return kernel

    previous = driver._active  # no public getter; reset_active() needs a real GPU driver
    driver.set_active(_StandInDriver(arch))
    JITFunction.run = run
    try:
        yield records, lambda name: scenario.__setitem__(0, name)
    finally:
        JITFunction.run = original_run
        driver._active = previous
