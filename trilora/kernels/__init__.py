"""Triton kernels and their plain-PyTorch references. Tensors in, tensors out."""
from .backend import HAS_TRITON, interpreter_active, resolve_backend
from .codebooks import code_4bit, dynamic_map_signed
from .dequantize_4bit import dequantize_4bit_ref, dequantize_4bit_triton
from .lora_linear import lora_linear, lora_linear_ref
from .quantize_blockwise import (quantize_4bit_ref, quantize_4bit_triton,
                                 quantize_8bit_blockwise_ref, quantize_8bit_blockwise_triton)

__all__ = [
    "HAS_TRITON", "interpreter_active", "resolve_backend", "code_4bit", "dynamic_map_signed",
    "dequantize_4bit_ref", "dequantize_4bit_triton", "lora_linear", "lora_linear_ref",
    "quantize_4bit_ref", "quantize_4bit_triton", "quantize_8bit_blockwise_ref",
    "quantize_8bit_blockwise_triton",
]
