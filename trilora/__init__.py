"""trilora: fast, exact LoRA / QLoRA fine-tuning with fused Triton kernels."""
__version__ = "0.1.0"
