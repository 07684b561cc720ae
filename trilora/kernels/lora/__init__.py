"""The LoRA GEMM family: fused LoRA linear, multi-projection blocks (q/k/v, gate/up) and the
LoRA MLP block, on one engine (`engine.py`: the base-weight operand and the launchers).

Modules: `dropout` (the mask, drawn once, kept as bits) · `configs` (tiles, regime switches) ·
`gemm_kernels` / `side_kernels` (Triton) · `engine` · `linear` · `projections` · `mlp` ·
`checks` (input validation) · `dora` (DoRA linear) · `dora_math` (DoRA's norm, reference and
rescale backward, shared with the blocks).
"""
from .dora import dora_linear, dora_linear_ref
from .dropout import lora_dropout_mask
from .linear import lora_linear, lora_linear_ref
from .mlp import lora_mlp, lora_mlp_ref
from .projections import Projection, lora_projections, lora_projections_ref, lora_qkv

__all__ = ["dora_linear", "dora_linear_ref", "lora_dropout_mask", "lora_linear", "lora_linear_ref", "lora_mlp", "lora_mlp_ref", "Projection",
           "lora_projections", "lora_projections_ref", "lora_qkv"]
