"""Triton kernels compiled for sm_90 (H100/H200) on a machine without a GPU.

The interpreter never runs Triton's compiler: a kernel it accepts may still fail the real
compile path (frontend, MLIR passes, ptxas). This compiles the kernels for sm_90 in a
subprocess without TRITON_INTERPRET, so such a failure shows here and not first on a GPU.
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()

_COMPILE_SCRIPT = r"""
import triton, triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from trilora.kernels import lora_linear_kernels as K
from trilora.kernels.dequantize_4bit import _dequantize_4bit_kernel
from trilora.kernels.quantize_blockwise import _quantize_blockwise_kernel

def sig(fn, consts, dtype):
    out = {}
    for name in fn.arg_names:
        if name in consts:
            out[name] = "constexpr"
        elif name == "w_ptr" and consts.get("QUANT"):
            out[name] = "*u8"
        elif name == "absmax_ptr":
            out[name] = "*u8" if consts.get("NESTED") else "*fp32"
        elif name in ("code_ptr", "nested_absmax_ptr", "nested_code_ptr", "offset_ptr"):
            out[name] = "*fp32"
        elif name == "out_ptr" and fn is K._dropout_keep_kernel:
            out[name] = "*i8"
        elif name.endswith("_ptr"):
            out[name] = "*" + dtype
        else:
            out[name] = "fp32" if name in ("p", "scale", "inv_keep") else "i32"
    return out

gemm = dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, GROUP_M=8, NESTED_BLOCKSIZE=256, BLOCKSIZE=64)
bf16 = dict(DOT_DTYPE=tl.bfloat16, PRECISION="tf32")
jobs = [(K._lora_fwd_kernel, dict(gemm, **bf16, HAS_BIAS=True, QUANT=q, NESTED=q), "bf16") for q in (0, 1)]
jobs += [(K._lora_dx_kernel, dict(gemm, **bf16, HAS_DROPOUT=True, QUANT=q, NESTED=q), "bf16") for q in (0, 1)]
jobs += [(K._lowrank_kernel, dict(bf16, HAS_DROPOUT=True, BLOCK_M=64, BLOCK_R=16, BLOCK_K=64), "bf16"),
         (K._matmul_tn_kernel, dict(bf16, HAS_DROPOUT=True, BLOCK_P=16, BLOCK_Q=64, BLOCK_M=32), "bf16"),
         (K._lora_fwd_kernel, dict(gemm, DOT_DTYPE=tl.float32, PRECISION="ieee", HAS_BIAS=True, QUANT=True,
                                   NESTED=False), "fp32")]
jobs.append((K._dropout_keep_kernel, dict(BLOCK_M=32, BLOCK_K=32), "fp32"))

# the 4-bit format's kernels: explicit signatures
def sig4(fn, consts, types):
    return {n: "constexpr" if n in consts else types.get(n, "i32") for n in fn.arg_names}

for nested in (False, True):
    consts = dict(BLOCKSIZE=64, ROWS=64, NESTED=nested, NESTED_BLOCKSIZE=256)
    types = dict(packed_ptr="*u8", absmax_ptr="*u8" if nested else "*fp32", code_ptr="*fp32",
                 nested_absmax_ptr="*fp32", nested_code_ptr="*fp32", offset_ptr="*fp32", out_ptr="*bf16")
    jobs.append((_dequantize_4bit_kernel, consts, sig4(_dequantize_4bit_kernel, consts, types)))
for pack, log2, remap, sub in ((True, 4, False, False), (True, 4, True, False), (False, 8, False, True)):
    consts = dict(BLOCKSIZE=256 if not pack else 64, ROWS=8, LOG2_TABLE=log2, PACK_4BIT=pack, REMAP=remap,
                  SUB_OFFSET=sub)
    types = dict(x_ptr="*fp32" if sub else "*bf16", offset_ptr="*fp32", mids_ptr="*fp32", order_ptr="*i32",
                 codes_ptr="*u8", absmax_ptr="*fp32")
    jobs.append((_quantize_blockwise_kernel, consts, sig4(_quantize_blockwise_kernel, consts, types)))

for fn, consts, dtype in jobs:
    signature = dtype if isinstance(dtype, dict) else sig(fn, consts, dtype)
    compiled = triton.compile(ASTSource(fn, signature, consts), target=GPUTarget("cuda", 90, 32),
                              options=dict(num_warps=4, num_stages=3, enable_fp_fusion=False))
    assert "cubin" in compiled.asm, fn
print("compiled", len(jobs))
"""


@pytest.mark.slow
@pytest.mark.skipif(HAS_CUDA, reason="on a GPU the other tests compile and run the kernels")
def test_kernels_compile_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # silence triton 3.9's default-change warning
    done = subprocess.run([sys.executable, "-c", _COMPILE_SCRIPT], env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "compiled 13" in done.stdout
