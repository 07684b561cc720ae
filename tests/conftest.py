"""Test setup: Triton kernels run through the interpreter on CPU-only machines.

TRITON_INTERPRET must be set before triton is first imported, so this runs first.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
    # on a small shared CPU, torch's worker threads spin-wait while another process is busy
    # (a 0.5 s test took 43 s); the tensors here are tiny, one thread is fastest
    torch.set_num_threads(1)

import importlib.util  # noqa: E402

import pytest  # noqa: E402

if importlib.util.find_spec("bitsandbytes") is not None:  # the 4-bit references, alike on every CPU
    from _bnb import use_portable_cpu_kernels
    use_portable_cpu_kernels()

HAS_CUDA = torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_gpu)
