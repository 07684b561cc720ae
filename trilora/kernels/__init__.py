"""Triton kernels and their plain-PyTorch references. Tensors in, tensors out.

Every op takes `backend="auto" | "triton" | "torch"` (see `backend.resolve_backend`).
"""
from .backend import HAS_TRITON, interpreter_active, resolve_backend
from .codebooks import code_4bit, dynamic_map_signed
from .cross_entropy import (FusedLinearCrossEntropyLoss, cross_entropy, cross_entropy_ref,
                            fused_linear_cross_entropy, fused_linear_cross_entropy_ref)
from .dequantize_4bit import dequantize_4bit_ref, dequantize_4bit_triton
from .glu import GLU, SwiGLU, glu, glu_ref, swiglu, swiglu_ref
from .lora import (Projection, dora_linear, dora_linear_ref, lora_dropout_mask, lora_linear, lora_linear_ref, lora_mlp, lora_mlp_ref,
                   lora_projections, lora_projections_ref, lora_qkv)
from .quantize_blockwise import (quantize_4bit_ref, quantize_4bit_triton,
                                 quantize_8bit_blockwise_ref, quantize_8bit_blockwise_triton)
from .rms_norm import RMSNorm, rms_norm, rms_norm_ref
from .rope import apply_rotary_pos_emb, rope_ref

__all__ = [
    "HAS_TRITON", "interpreter_active", "resolve_backend",
    "code_4bit", "dynamic_map_signed",
    "dequantize_4bit_ref", "dequantize_4bit_triton",
    "quantize_4bit_ref", "quantize_4bit_triton", "quantize_8bit_blockwise_ref",
    "quantize_8bit_blockwise_triton",
    "dora_linear", "dora_linear_ref", "lora_dropout_mask", "lora_linear", "lora_linear_ref",
    "lora_mlp", "lora_mlp_ref", "Projection", "lora_projections", "lora_projections_ref", "lora_qkv",
    "RMSNorm", "rms_norm", "rms_norm_ref",
    "apply_rotary_pos_emb", "rope_ref",
    "GLU", "SwiGLU", "glu", "glu_ref", "swiglu", "swiglu_ref",
    "FusedLinearCrossEntropyLoss", "cross_entropy", "cross_entropy_ref",
    "fused_linear_cross_entropy", "fused_linear_cross_entropy_ref",
]
