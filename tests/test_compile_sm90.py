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
from importlib import import_module  # (trilora.kernels re-exports functions named like its modules)
CE, MLP, QKV, RN, RP, SW = (import_module("trilora.kernels." + m) for m in
                            ("cross_entropy", "lora_mlp", "lora_qkv", "rms_norm", "rope", "swiglu"))

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

# the other kernels: a dict of the types that differ from the defaults: *bf16 pointers, fp32 float
# scalars (the launchers pass Python floats), i32 ints
FLOATS = ("p", "inv_keep", "eps", "smoothing", "grad_scale")
def sig4(fn, consts, types={}):
    return {n: "constexpr" if n in consts else types.get(n, "*bf16" if n.endswith("_ptr") else
                                                           "fp32" if n in FLOATS else "i32") for n in fn.arg_names}

for nested in (False, True):
    consts = dict(BLOCKSIZE=64, ROWS=64, NESTED=nested, NESTED_BLOCKSIZE=256)
    types = dict(packed_ptr="*u8", absmax_ptr="*u8" if nested else "*fp32", code_ptr="*fp32",
                 nested_absmax_ptr="*fp32", nested_code_ptr="*fp32", offset_ptr="*fp32", out_ptr="*bf16")
    jobs.append((_dequantize_4bit_kernel, consts, types))
for pack, log2, remap, sub in ((True, 4, False, False), (True, 4, True, False), (False, 8, False, True)):
    consts = dict(BLOCKSIZE=256 if not pack else 64, ROWS=8, LOG2_TABLE=log2, PACK_4BIT=pack, REMAP=remap,
                  SUB_OFFSET=sub)
    types = dict(x_ptr="*fp32" if sub else "*bf16", offset_ptr="*fp32", mids_ptr="*fp32", order_ptr="*i32",
                 codes_ptr="*u8", absmax_ptr="*fp32")
    jobs.append((_quantize_blockwise_kernel, consts, types))

# RMSNorm: forward at H 4096 (1 row, 8 warps), backward at H 896 (4 rows); Llama (bf16 or fp32 weight) or Gemma
fp32 = dict(rstd_ptr="*fp32", dw_ptr="*fp32")
jobs += [(RN._rms_norm_fwd_kernel, dict(GEMMA=g, BLOCK_ROWS=1, BLOCK_COLS=4096),
          dict(fp32, w_ptr="*fp32", y_ptr="*fp32") if w32 else fp32, 8) for g, w32 in ((0, 0), (1, 0), (0, 1))]
jobs += [(RN._rms_norm_bwd_kernel, dict(GEMMA=g, HAS_DW=dw, BLOCK_ROWS=4, BLOCK_COLS=1024),
          fp32 if dw else dict(rstd_ptr="*fp32"), 4)  # no dW: dw_ptr is dx
         for g in (0, 1) for dw in (0, 1)]
# RoPE (D 128, 32 q heads, 8 kv heads), forward and backward rotation
jobs += [(RP._rope_kernel, dict(HALF=64, BACKWARD=b, BLOCK_HQ=32, BLOCK_HKV=8, BLOCK_HALF=64), {}, 4)
         for b in (0, 1)]
# SwiGLU, GLU of the MLP block (each ACT)
jobs += [(fn, dict(BLOCK=1024), {}, 4) for fn in (SW._swiglu_fwd_kernel, SW._swiglu_bwd_kernel)]
jobs += [(fn, dict(ACT=a, BLOCK=1024), {}, 4) for fn in (MLP._glu_fwd_kernel, MLP._glu_bwd_kernel) for a in (0, 1)]
# cross entropy: int64 labels, fp32 loss, vocab blocks of 8192 (16 warps)
jobs += [(CE._cross_entropy_kernel, dict(HAS_SMOOTHING=s, WRITE_GRAD=w, BLOCK_V=8192),
          dict(labels_ptr="*i64", loss_ptr="*fp32"), 16)
         for s in (0, 1) for w in (0, 1)]
# multi-projection dX: N_SEG 1..3, dense / 4-bit / 4-bit double-quant bases, dropout on and off
def qtypes(quant, nested):
    if not quant:
        return {}
    per = dict(w="*u8", absmax="*u8" if nested else "*fp32", code="*fp32", nabsmax="*fp32", ncode="*fp32",
               offset="*fp32")
    return {f"{k}{i}_ptr": v for k, v in per.items() for i in range(3)}
for n_seg, q, nested, drop in ((1, 0, 0, 0), (2, 1, 1, 1), (3, 0, 0, 1), (3, 1, 0, 0)):
    consts = dict(gemm, **bf16, N_SEG=n_seg, HAS_DROPOUT=drop, QUANT=q, NESTED=nested)
    if not q:
        consts.update(BLOCKSIZE=1, NESTED_BLOCKSIZE=1)
    jobs.append((QKV._multi_dx_kernel, consts, qtypes(q, nested), 4))

for fn, consts, dtype, *warps in jobs:  # dtype: "bf16"/"fp32" (sig) or a dict (sig4)
    signature = sig4(fn, consts, dtype) if isinstance(dtype, dict) else sig(fn, consts, dtype)
    compiled = triton.compile(ASTSource(fn, signature, consts), target=GPUTarget("cuda", 90, 32),
                              options=dict(num_warps=(warps or [4])[0], num_stages=3, enable_fp_fusion=False))
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
    assert "compiled 36" in done.stdout
